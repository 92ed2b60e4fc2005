//! The command consumer: reads the Kafka command topic and hands each record to the
//! gateway, committing a partition's offset only past the commands the gateway settled.
//!
//! Invariants (DESIGN.md, invariant 5):
//! - A partition's offset is committed only up to its lowest unsettled command. The
//!   gateway settles a command once the vehicle acknowledged it, or it is durably queued
//!   for the vehicle's offline session, or it reached a final outcome whose record is
//!   durable in the journal. A crash before that makes Kafka deliver it again (at least
//!   once, in partition order, so in per-vehicle order: commands are keyed by client id).
//! - Bounded: at most `max_pending` commands are handed over and not settled (plus what
//!   librdkafka had prefetched, bounded by its `queued.max.messages.kbytes`); beyond that
//!   the partitions are paused (the consumer keeps polling, so it stays in its group). A
//!   vehicle that never acknowledges holds its partition's offset back, not the consumer.
//! - A command read again while it is pending (the group re-delivered from its last
//!   commit) is not handed over twice: only the first copy settles its offset.
//! - The consumer never decides anything about a command: malformed records are handed
//!   over too, so that each gets an outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How the consumer connects and what it reads.
#[derive(Debug, Clone)]
pub struct CommandConsumerConfig {
    pub bootstrap: String,
    pub group: String,
    pub topic: String,
    /// Commands handed over and not settled, at most.
    pub max_pending: usize,
    /// librdkafka properties applied last (SASL, SSL, ...).
    pub properties: BTreeMap<String, String>,
}

/// One command record as read from Kafka, undecoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

/// The gateway is done with the command at this position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub partition: i32,
    pub offset: i64,
}

/// Which offsets may be committed: per partition, the lowest offset handed over and not
/// settled, or one past the highest handed over when all are settled.
#[derive(Debug, Default)]
pub struct Offsets {
    parts: BTreeMap<i32, Part>,
}

#[derive(Debug, Default)]
struct Part {
    pending: BTreeSet<i64>,
    /// One past the highest offset handed over.
    next: i64,
    /// The last position committed (or asked to be).
    committed: i64,
}

impl Part {
    fn position(&self) -> i64 {
        self.pending.first().copied().unwrap_or(self.next)
    }
}

impl Offsets {
    /// A command at `offset` was read. False when it is already pending: a re-read
    /// (the group re-delivered from its committed offset) of a command the gateway has
    /// not settled yet must not be handed over again, or its second copy would settle
    /// the offset for the first.
    pub fn consumed(&mut self, partition: i32, offset: i64) -> bool {
        let p = self.parts.entry(partition).or_default();
        p.next = p.next.max(offset.saturating_add(1));
        p.pending.insert(offset)
    }

    /// The command at `offset` is settled. False when it was not pending (settled
    /// twice, or consumed before a restart of the consumer).
    pub fn settled(&mut self, partition: i32, offset: i64) -> bool {
        self.parts
            .get_mut(&partition)
            .is_some_and(|p| p.pending.remove(&offset))
    }

    /// Commands handed over and not settled.
    pub fn pending(&self) -> usize {
        self.parts.values().map(|p| p.pending.len()).sum()
    }

    /// Positions that moved since the last call: (partition, next offset to read).
    pub fn to_commit(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (&partition, p) in &mut self.parts {
            let pos = p.position();
            if pos > p.committed {
                p.committed = pos;
                out.push((partition, pos));
            }
        }
        out
    }

    /// Forgets everything (the consumer is rebuilt: Kafka re-delivers from the last
    /// commit, so nothing pending is lost).
    pub fn reset(&mut self) {
        self.parts.clear();
    }
}

/// What the consumer is doing, for metrics.
#[derive(Debug, Default)]
pub struct ConsumerStatus {
    /// Commands handed over and not settled.
    pub pending: std::sync::atomic::AtomicUsize,
    /// Reading is paused at `max_pending` (vehicles that do not acknowledge).
    pub paused: std::sync::atomic::AtomicBool,
    /// Partitions of the command topic this consumer holds (0 until the group assigned
    /// them: commands produced meanwhile wait in Kafka).
    pub assigned: std::sync::atomic::AtomicUsize,
}

/// The channels between the consumer and the gateway.
pub struct Channels {
    /// Commands handed over, in partition order.
    pub out: mpsc::Sender<Consumed>,
    /// Settlements coming back.
    pub settled: mpsc::UnboundedReceiver<Settled>,
    /// Positions committed (partition, next offset): what lies below is done for good.
    pub committed: mpsc::UnboundedSender<(i32, i64)>,
    pub status: std::sync::Arc<ConsumerStatus>,
}

/// Reads commands until `shutdown`, re-creating the consumer after errors.
pub async fn run(cfg: CommandConsumerConfig, mut ch: Channels, shutdown: CancellationToken) {
    let mut offsets = Offsets::default();
    let mut backoff = Duration::from_millis(500);
    // The commit in flight outlives a failed consumer: it is awaited before the next
    // consumer starts, so that an old position cannot land after a newer one.
    let mut committing: Option<Commit> = None;
    while !shutdown.is_cancelled() {
        match consume(&cfg, &mut ch, &mut offsets, &mut committing, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(topic = %cfg.topic, group = %cfg.group, error = %e, retry_in_ms = backoff.as_millis() as u64, "command consumer failed; restarting it");
                if let Some(c) = committing.take() {
                    let done = c.await;
                    committed(done, &mut offsets, &ch.committed, &cfg.topic);
                }
                ch.status.assigned.store(0, std::sync::atomic::Ordering::Relaxed);
                // Whatever was handed over and not settled is read again from the last
                // commit; settlements still arriving for it are ignored.
                offsets.reset();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn consumer(cfg: &CommandConsumerConfig) -> Result<StreamConsumer, String> {
    let mut c = crate::producer::base_config();
    c.set("bootstrap.servers", &cfg.bootstrap)
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A new group starts at the oldest command: commands carry an expiry, so stale
        // ones end as `expired` instead of being skipped unseen.
        .set("auto.offset.reset", "earliest")
        // Static membership: a gateway restarted after a crash takes its partitions back
        // at once instead of waiting for its dead self's session to time out.
        .set("group.instance.id", &cfg.group)
        .set("client.id", format!("edge-gateway-commands-{}", cfg.group));
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    let consumer: StreamConsumer = c.create().map_err(|e| format!("creating the consumer: {e}"))?;
    consumer
        .subscribe(&[&cfg.topic])
        .map_err(|e| format!("subscribing to {}: {e}", cfg.topic))?;
    Ok(consumer)
}

async fn consume(
    cfg: &CommandConsumerConfig,
    ch: &mut Channels,
    offsets: &mut Offsets,
    committing: &mut Option<Commit>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let consumer = Arc::new(consumer(cfg)?);
    tracing::info!(topic = %cfg.topic, group = %cfg.group, "command consumer started");
    // One commit at a time, off this task: a commit waits for the broker, and commands
    // keep flowing meanwhile.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut errors = 0u32;
    let mut paused = false;
    loop {
        // Full: the partitions are paused, not the polling — a consumer that stops
        // polling for `max.poll.interval.ms` leaves its group and re-reads from the
        // last commit.
        let room = offsets.pending() < cfg.max_pending;
        ch.status
            .pending
            .store(offsets.pending(), std::sync::atomic::Ordering::Relaxed);
        if room == paused {
            if room {
                tracing::info!(topic = %cfg.topic, "command consumer resumed");
            } else {
                tracing::warn!(topic = %cfg.topic, max_pending = cfg.max_pending, "command consumer paused: commands.max_pending commands wait for vehicles to acknowledge (or be queued offline)");
            }
            ch.status
                .paused
                .store(!room, std::sync::atomic::Ordering::Relaxed);
            let assignment = consumer.assignment().map_err(|e| format!("assignment: {e}"))?;
            let r = if room {
                consumer.resume(&assignment)
            } else {
                consumer.pause(&assignment)
            };
            r.map_err(|e| format!("pausing/resuming: {e}"))?;
            paused = !room;
        } else if paused {
            // A rebalance hands partitions over un-paused: pause what is assigned now, or
            // a new partition would be read past `max_pending` (idempotent for the rest).
            let assignment = consumer.assignment().map_err(|e| format!("assignment: {e}"))?;
            consumer.pause(&assignment).map_err(|e| format!("pausing: {e}"))?;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                if let Some(c) = committing.take() {
                    let done = c.await;
                    committed(done, offsets, &ch.committed, &cfg.topic);
                }
                while let Ok(s) = ch.settled.try_recv() {
                    offsets.settled(s.partition, s.offset);
                }
                if let Some(c) = start_commit(&consumer, &cfg.topic, offsets) {
                    let done = c.await;
                    committed(done, offsets, &ch.committed, &cfg.topic);
                }
                return Ok(());
            }
            s = ch.settled.recv() => match s {
                Some(s) => {
                    offsets.settled(s.partition, s.offset);
                }
                // The gateway side is gone: nothing can be settled any more.
                None => return Ok(()),
            },
            _ = tick.tick() => {
                let held = consumer.assignment().map(|a| a.count()).unwrap_or(0);
                ch.status.assigned.store(held, std::sync::atomic::Ordering::Relaxed);
                if committing.is_none() {
                    *committing = start_commit(&consumer, &cfg.topic, offsets);
                }
            }
            done = async {
                match committing.as_mut() {
                    Some(c) => c.await,
                    None => std::future::pending().await,
                }
            }, if committing.is_some() => {
                *committing = None;
                committed(done, offsets, &ch.committed, &cfg.topic);
            }
            m = consumer.recv() => match m {
                Ok(m) => {
                    errors = 0;
                    let c = Consumed {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        timestamp_ms: m.timestamp().to_millis(),
                    };
                    if !offsets.consumed(c.partition, c.offset) {
                        continue;
                    }
                    if ch.out.send(c).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => {
                    // Transient broker errors and a missing topic are reported and
                    // retried here; the consumer keeps its position.
                    errors += 1;
                    if errors == 1 || errors.is_multiple_of(100) {
                        tracing::warn!(topic = %cfg.topic, error = %e, "command consumer: read failed");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            },
        }
    }
}

/// What a commit carried (partition, position) and how it went.
type CommitResult = (Vec<(i32, i64)>, Result<(), String>);

/// A commit running on a blocking thread.
type Commit = tokio::task::JoinHandle<CommitResult>;

/// Starts committing the positions that moved (synchronously, on a blocking thread, so
/// that `committed` only ever reports what Kafka holds).
fn start_commit(consumer: &Arc<StreamConsumer>, topic: &str, offsets: &mut Offsets) -> Option<Commit> {
    let moved = offsets.to_commit();
    if moved.is_empty() {
        return None;
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, pos) in &moved {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*pos)) {
            tracing::warn!(topic, partition, error = %e, "command consumer: bad commit position");
        }
    }
    let consumer = consumer.clone();
    Some(tokio::task::spawn_blocking(move || {
        let r = consumer.commit(&tpl, CommitMode::Sync).map_err(|e| e.to_string());
        (moved, r)
    }))
}

/// A commit ended: report what Kafka holds now, or take the positions back so that the
/// next commit carries them again (a crash before it re-delivers: at least once).
fn committed(
    done: Result<CommitResult, tokio::task::JoinError>,
    offsets: &mut Offsets,
    committed: &mpsc::UnboundedSender<(i32, i64)>,
    topic: &str,
) {
    let (moved, result) = match done {
        Ok(d) => d,
        // The commit thread died: what it carried is unknown, so every position goes
        // out again with the next commit.
        Err(e) => (
            offsets
                .parts
                .iter()
                .map(|(p, part)| (*p, part.committed))
                .collect(),
            Err(e.to_string()),
        ),
    };
    match result {
        Ok(()) => {
            for m in moved {
                let _ = committed.send(m);
            }
        }
        Err(e) => {
            tracing::warn!(topic, error = %e, "command consumer: offset commit failed");
            for (partition, _) in moved {
                if let Some(p) = offsets.parts.get_mut(&partition) {
                    p.committed = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_at_the_lowest_unsettled_command() {
        let mut o = Offsets::default();
        for off in 10..15 {
            o.consumed(0, off);
        }
        o.consumed(1, 3);
        assert_eq!(o.pending(), 6);
        // Nothing settled: the positions are the first commands themselves.
        assert_eq!(o.to_commit(), vec![(0, 10), (1, 3)]);
        // 11 and 12 settled, 10 not: nothing moves past 10.
        assert!(o.settled(0, 11));
        assert!(o.settled(0, 12));
        assert!(o.to_commit().is_empty());
        assert!(o.settled(0, 10));
        assert_eq!(o.to_commit(), vec![(0, 13)]);
        assert!(!o.settled(0, 10), "settled twice");
        o.consumed(0, 13);
        assert!(!o.consumed(0, 13), "a re-read of a pending command");
        assert!(o.consumed(0, 10), "a re-read of a settled one is a new hand-over");
        assert!(o.settled(0, 10));
        assert!(!o.settled(7, 1), "never consumed");
        assert!(o.settled(0, 13));
        assert!(o.settled(0, 14));
        assert!(o.settled(1, 3));
        assert_eq!(o.to_commit(), vec![(0, 15), (1, 4)]);
        assert!(o.to_commit().is_empty());
        assert_eq!(o.pending(), 0);
    }
}
