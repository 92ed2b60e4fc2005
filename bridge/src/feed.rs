//! A feed: every record of a topic, from its beginning, on every start — for state a
//! gateway rebuilds from a topic rather than consumes once (which vehicles other
//! gateways of the region hold, from the presence topic).
//!
//! No consumer group and no commits: each start reads the topic again (keep such topics
//! compacted or short-lived). Partitions are assigned by hand, so the feed never takes
//! part in a rebalance and never steals work from anyone; partitions added to the topic
//! later are looked for every [`PARTITION_CHECK`] and read from their beginning (records
//! of one key then come from two partitions, in no order across them: the feed's reader
//! must order them itself, as the region map does by event time).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the feed hands over: records, and once, the moment it has read everything the
/// topic held when the feed started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    Record(FeedRecord),
    CaughtUp,
}

/// One record of the feed: its key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// How often the feed looks for partitions added to its topic.
pub const PARTITION_CHECK: Duration = Duration::from_secs(30);

/// Reads `topic` from the beginning into `out` until `shutdown`, re-creating the
/// consumer after errors (and then reading from the beginning again).
pub async fn run(
    bootstrap: String,
    topic: String,
    properties: BTreeMap<String, String>,
    out: mpsc::Sender<FeedItem>,
    shutdown: CancellationToken,
) {
    run_checking(bootstrap, topic, properties, out, shutdown, PARTITION_CHECK).await
}

/// [`run`], looking for added partitions every `partition_check`.
pub async fn run_checking(
    bootstrap: String,
    topic: String,
    properties: BTreeMap<String, String>,
    out: mpsc::Sender<FeedItem>,
    shutdown: CancellationToken,
    partition_check: Duration,
) {
    let mut backoff = Duration::from_millis(500);
    let mut announced = false;
    while !shutdown.is_cancelled() {
        match follow(
            &bootstrap,
            &topic,
            &properties,
            &out,
            &shutdown,
            &mut announced,
            partition_check,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(topic, error = %e, "feed failed; reading it again");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn follow(
    bootstrap: &str,
    topic: &str,
    properties: &BTreeMap<String, String>,
    out: &mpsc::Sender<FeedItem>,
    shutdown: &CancellationToken,
    announced: &mut bool,
    partition_check: Duration,
) -> Result<(), String> {
    let mut c = crate::producer::base_config();
    c.set("bootstrap.servers", bootstrap)
        // librdkafka wants a group id even for assigned partitions; nothing is committed.
        .set("group.id", format!("edge-gateway-feed-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    for (k, v) in properties {
        c.set(k, v);
    }
    let consumer: StreamConsumer = c.create().map_err(|e| format!("creating the consumer: {e}"))?;
    let partitions = loop {
        let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        let found = meta.ok().and_then(|m| {
            m.topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
        });
        match found {
            Some(p) if !p.is_empty() => break p,
            // The topic does not exist yet (nobody wrote presence so far): nothing to
            // catch up with; look again.
            _ => {
                caught_up(out, announced).await;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| format!("assigning partition {p}: {e}"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| format!("assigning {topic}: {e}"))?;
    // Where each partition ends now: reading up to there is catching up.
    let mut behind: BTreeMap<i32, i64> = BTreeMap::new();
    for p in &partitions {
        let (low, high) =
            tokio::task::block_in_place(|| consumer.fetch_watermarks(topic, *p, Duration::from_secs(10)))
                .map_err(|e| format!("watermarks of partition {p}: {e}"))?;
        if high > low {
            behind.insert(*p, high);
        }
    }
    tracing::info!(topic, partitions = partitions.len(), "feed started");
    if behind.is_empty() {
        caught_up(out, announced).await;
    }
    // The record at `high - 1` may never come (a compacted-away tombstone): the consumer's
    // position reaching `high` counts as caught up too, looked at every second.
    let mut look = tokio::time::interval(Duration::from_secs(1));
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut assigned = partitions;
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + partition_check, partition_check);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = check.tick() => {
                // Partitions added since: a vehicle's later events land there (a key's
                // partition moves with the count), and a feed blind to them would keep
                // the vehicle where it was.
                let added = tokio::task::block_in_place(|| added_partitions(&consumer, topic, &assigned));
                if !added.is_empty() {
                    let mut tpl = TopicPartitionList::new();
                    for p in &added {
                        tpl.add_partition_offset(topic, *p, Offset::Beginning)
                            .map_err(|e| format!("assigning partition {p}: {e}"))?;
                    }
                    consumer
                        .incremental_assign(&tpl)
                        .map_err(|e| format!("assigning the added partitions of {topic}: {e}"))?;
                    tracing::info!(topic, added = ?added, "feed: reading partitions added to the topic");
                    if !*announced {
                        // Still catching up: what the added partitions hold is part of it
                        // (a moved vehicle's latest events may be there).
                        for p in &added {
                            let marks = tokio::task::block_in_place(|| {
                                consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))
                            });
                            if let Ok((low, high)) = marks {
                                if high > low {
                                    behind.insert(*p, high);
                                }
                            }
                        }
                    }
                    assigned.extend(added);
                }
            }
            _ = look.tick(), if !behind.is_empty() => {
                let position = consumer.position().map_err(|e| format!("position: {e}"))?;
                behind.retain(|p, high| {
                    !matches!(
                        position.find_partition(topic, *p).map(|e| e.offset()),
                        Some(Offset::Offset(o)) if o >= *high
                    )
                });
                if behind.is_empty() {
                    caught_up(out, announced).await;
                }
            }
            m = consumer.recv() => match m {
                Ok(m) => {
                    let r = FeedRecord {
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    };
                    if out.send(FeedItem::Record(r)).await.is_err() {
                        return Ok(());
                    }
                    let p = m.partition();
                    if behind.get(&p).is_some_and(|high| m.offset() + 1 >= *high) {
                        behind.remove(&p);
                        if behind.is_empty() {
                            caught_up(out, announced).await;
                        }
                    }
                }
                Err(e) => return Err(e.to_string()),
            },
        }
    }
}

/// Partitions of `topic` the metadata lists beyond `assigned` (none when the metadata
/// cannot be had now: looked for again on the next check).
fn added_partitions(consumer: &StreamConsumer, topic: &str, assigned: &[i32]) -> Vec<i32> {
    let Ok(meta) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
        return Vec::new();
    };
    meta.topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .filter(|p| !assigned.contains(p))
        .collect()
}

/// Says `CaughtUp` once per feed (not again after a re-read).
async fn caught_up(out: &mpsc::Sender<FeedItem>, announced: &mut bool) {
    if !*announced {
        *announced = true;
        let _ = out.send(FeedItem::CaughtUp).await;
    }
}
