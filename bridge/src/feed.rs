//! A feed: every record of a topic, from its beginning, on every start — for state a
//! gateway rebuilds from a topic rather than consumes once (which vehicles other
//! gateways of the region hold, from the presence topic).
//!
//! No consumer group and no commits: each start reads the topic again (keep such topics
//! compacted or short-lived). Partitions are assigned by hand, so the feed never takes
//! part in a rebalance and never steals work from anyone.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One record of the feed: its key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// Reads `topic` from the beginning into `out` until `shutdown`, re-creating the
/// consumer after errors (and then reading from the beginning again).
pub async fn run(
    bootstrap: String,
    topic: String,
    properties: std::collections::BTreeMap<String, String>,
    out: mpsc::Sender<FeedRecord>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    while !shutdown.is_cancelled() {
        match follow(&bootstrap, &topic, &properties, &out, &shutdown).await {
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
    properties: &std::collections::BTreeMap<String, String>,
    out: &mpsc::Sender<FeedRecord>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let mut c = ClientConfig::new();
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
            // The topic does not exist yet (nobody wrote presence so far): look again.
            _ => tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            },
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
    tracing::info!(topic, partitions = partitions.len(), "feed started");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => match m {
                Ok(m) => {
                    let r = FeedRecord {
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    };
                    if out.send(r).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.to_string()),
            },
        }
    }
}
