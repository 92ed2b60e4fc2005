//! Outcomes: what became of each command, journaled like telemetry and written to the
//! outcome topic (keyed by client id), and what settles the command's source.
//!
//! Invariants:
//! - An outcome record is appended to the journal before anything it settles: the
//!   command's Kafka offset moves past it (and a REST caller is answered) only once the
//!   record is durable. A crash in between re-delivers the command, never loses its
//!   outcome.
//! - One task appends outcome records in the order they were reported, so a command's
//!   `queued` precedes its final outcome in Kafka.
//! - The report channel is unbounded but fed only by tickets, and the command sources
//!   bound how many tickets exist (`commands.max_pending` for Kafka; REST and MQTT
//!   commands are bounded by the session queues they sit in).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge::commands::Settled;
use bridge::{Entry, EntryKind, FullPolicy, Journal as _};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::ticket::{Progress, Source, TicketInfo};
use crate::message::now_ms;
use crate::state::Shared;

/// What became of a command. All but `Queued` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The vehicle acknowledged it (PUBACK / PUBCOMP); QoS 0: written to its socket.
    Delivered,
    /// Stored in the queue of the vehicle's offline session (not final).
    Queued,
    /// Its expiry passed before it could be delivered.
    Expired,
    /// Not delivered: offline queue overflow, QoS 0 to an offline vehicle, or the
    /// session ended with the command still queued.
    Dropped,
    /// Refused: malformed, not allowed, too large for the vehicle, the vehicle is not
    /// subscribed to its command topic, or the vehicle refused it (MQTT 5 PUBREC ≥ 0x80).
    Rejected,
    /// This gateway holds no session for the vehicle.
    UnknownVehicle,
}

impl Outcome {
    pub fn is_final(self) -> bool {
        self != Outcome::Queued
    }

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Queued => "queued",
            Outcome::Expired => "expired",
            Outcome::Dropped => "dropped",
            Outcome::Rejected => "rejected",
            Outcome::UnknownVehicle => "unknown_vehicle",
        }
    }
}

/// The JSON value of an outcome record.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutcomeRecord {
    pub command_id: String,
    pub client_id: String,
    pub outcome: Outcome,
    /// Why, for `dropped` / `rejected` / `expired` (a short label).
    pub reason: Option<String>,
    pub correlation_id: Option<String>,
    /// Where the command came from: `kafka`, `rest` or `mqtt`.
    pub source: String,
    /// For `kafka`: the command record's coordinates.
    pub kafka: Option<KafkaCoordinates>,
    /// For `mqtt`: the client id that published the command.
    pub publisher: Option<String>,
    pub qos: u8,
    pub gateway_id: String,
    /// When the gateway took the command, and when this outcome happened (ms since epoch).
    pub issued_at_ms: u64,
    pub at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KafkaCoordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One report from a ticket to the outcome task.
#[derive(Debug)]
pub struct Report {
    pub info: Arc<TicketInfo>,
    /// `None`: settle the source without writing a record.
    pub outcome: Option<Outcome>,
    pub reason: Option<&'static str>,
    /// A store write that must be flushed first (`queued`).
    pub store_gen: Option<u64>,
}

/// A Kafka command's coordinates: (topic, partition, offset).
pub type KafkaKey = (String, i32, i64);

/// Where tickets report. Closed at shutdown: a ticket dropped then is not an outcome.
#[derive(Debug)]
pub struct Sink {
    tx: mpsc::UnboundedSender<Report>,
    closed: AtomicBool,
    /// Kafka commands whose final outcome is reported and whose "done" marker is not
    /// in the store yet. Between a vehicle's PUBACK and that marker the command is held
    /// by no session and not marked done: a re-read of its offset then (a restart, the
    /// consumer rejoining) must not deliver it again. Inserting here and sending the
    /// report happen under this lock, and so do a re-read's check and its own report, so
    /// the re-read settles after the original.
    finishing: Mutex<HashSet<KafkaKey>>,
}

impl Sink {
    pub fn new() -> (Arc<Sink>, mpsc::UnboundedReceiver<Report>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Sink {
                tx,
                closed: AtomicBool::new(false),
                finishing: Mutex::new(HashSet::new()),
            }),
            rx,
        )
    }

    pub(super) fn report(&self, r: Report) {
        let key = r
            .outcome
            .filter(|o| o.is_final())
            .and(kafka_key(&r.info.record.source));
        match key {
            Some(k) => {
                let mut finishing = self.finishing();
                finishing.insert(k);
                self.send(r);
            }
            None => self.send(r),
        }
    }

    /// Reports `r` (a re-read settling without a word) when the Kafka command at `key`
    /// already has a final outcome: reported and still settling, or (`done`) marked in
    /// the store. False, and nothing sent, otherwise.
    pub(super) fn report_if_finished(&self, key: &KafkaKey, done: impl FnOnce() -> bool, r: Report) -> bool {
        let finishing = self.finishing();
        if !finishing.contains(key) && !done() {
            return false;
        }
        self.send(r);
        true
    }

    /// The command's "done" marker is in the store, or its outcome will never be
    /// (not journaled): nothing to guard any more.
    pub(super) fn finished(&self, source: &Source) {
        if let Some(k) = kafka_key(source) {
            self.finishing().remove(&k);
        }
    }

    /// Kafka will not deliver again what lies below a committed `position`.
    pub fn forget_below(&self, topic: &str, partition: i32, position: i64) {
        self.finishing()
            .retain(|(t, p, o)| !(t == topic && *p == partition && *o < position));
    }

    /// Kafka commands whose final outcome is settling.
    #[cfg(test)]
    pub fn finishing_len(&self) -> usize {
        self.finishing().len()
    }

    fn finishing(&self) -> std::sync::MutexGuard<'_, HashSet<KafkaKey>> {
        self.finishing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, r: Report) {
        if self.tx.send(r).is_err() && !self.is_closed() {
            warn!("command outcome reported after the outcome task ended");
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// The coordinates of a Kafka command.
pub fn kafka_key(source: &Source) -> Option<KafkaKey> {
    match source {
        Source::Kafka {
            topic,
            partition,
            offset,
        } => Some((topic.clone(), *partition, *offset)),
        _ => None,
    }
}

/// Journals every reported outcome and settles its command once the record is durable.
/// Runs through shutdown until `stop` (sessions have ended: their last outcomes are
/// reported), then journals what is left and waits for it to be durable, bounded by
/// `drain`.
pub async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Report>,
    settle: Option<mpsc::UnboundedSender<Settled>>,
    stop: CancellationToken,
    drain: Duration,
) {
    let mut durable = shared.journal.durable();
    let mut flushed = shared.store.flushed();
    let mut waiting: VecDeque<(u64, Report)> = VecDeque::new();
    let gateway_id = shared.gateway_id.clone();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = rx.recv() => {
                let Some(r) = r else { break };
                if let Some(gen) = r.store_gen {
                    // A `queued` outcome waits for its queue entry to be flushed.
                    let ok = flushed.wait_for(|g| *g >= gen);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        res = ok => if res.is_err() { break },
                    }
                }
                match journal(&shared, &gateway_id, &r, &stop).await {
                    Some(seq) => waiting.push_back((seq, r)),
                    None => {
                        // Unsettled: Kafka delivers it again after a restart. (Only a
                        // final report was guarded; a `queued` one must not lift the
                        // guard of the same command's final outcome.)
                        if r.outcome.is_some_and(Outcome::is_final) {
                            shared.commands.sink.finished(&r.info.record.source);
                        }
                        continue;
                    }
                }
            }
            changed = durable.changed() => if changed.is_err() { break },
        }
        let d = *durable.borrow_and_update();
        release(&shared, &mut waiting, d, settle.as_ref(), &mut flushed).await;
    }
    // Shutdown: what was reported before it is journaled and settled if it becomes
    // durable within the drain time; anything later is re-delivered after the restart.
    let _ = tokio::time::timeout(drain, async {
        let never = CancellationToken::new();
        while let Ok(r) = rx.try_recv() {
            if r.store_gen.is_some_and(|g| *flushed.borrow() < g) {
                continue;
            }
            if let Some(seq) = journal(&shared, &gateway_id, &r, &never).await {
                waiting.push_back((seq, r));
            }
        }
        while !waiting.is_empty() {
            let d = *durable.borrow_and_update();
            release(&shared, &mut waiting, d, settle.as_ref(), &mut flushed).await;
            if waiting.is_empty() || durable.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
}

/// Appends the outcome record; the journal sequence to wait for (0: nothing appended,
/// settle in order). `None`: the record could not be journaled (counted, logged) and
/// its command stays unsettled, so Kafka re-delivers it after a restart.
async fn journal(shared: &Shared, gateway_id: &str, r: &Report, stop: &CancellationToken) -> Option<u64> {
    let Some(outcome) = r.outcome else {
        return Some(0);
    };
    let c = &r.info.record;
    let at_ms = now_ms();
    let record = OutcomeRecord {
        command_id: c.id.clone(),
        client_id: c.client_id.clone(),
        outcome,
        reason: r.reason.map(str::to_string),
        correlation_id: c.correlation_id.clone(),
        source: c.source.label().to_string(),
        kafka: match &c.source {
            Source::Kafka {
                topic,
                partition,
                offset,
            } => Some(KafkaCoordinates {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
            }),
            _ => None,
        },
        publisher: match &c.source {
            Source::Mqtt { publisher } => Some(publisher.clone()),
            _ => None,
        },
        qos: c.qos,
        gateway_id: gateway_id.to_string(),
        issued_at_ms: c.issued_at_ms,
        at_ms,
    };
    let metrics = &shared.commands.metrics;
    let payload = match serde_json::to_vec(&record) {
        Ok(p) => Bytes::from(p),
        Err(e) => {
            bridge::counted!(warn, metrics.outcomes_failed, "encode", command_id = %c.id, error = %e, "command outcome not encoded");
            return None;
        }
    };
    let entry = Entry {
        kind: EntryKind::Outcome,
        received_at_ms: at_ms,
        qos: 1,
        retain: false,
        client_id: c.client_id.clone(),
        topic: "$gateway/outcome".into(),
        payload,
        content_type: Some("application/json".into()),
        message_expiry_secs: None,
        user_properties: Vec::new(),
    };
    // Outcomes wait for journal space whatever `journal.full_policy` says for vehicles:
    // an outcome refused would leave its command unsettled until a restart.
    let appended = tokio::select! {
        _ = stop.cancelled() => return None,
        r = shared.journal.append_with(&entry, FullPolicy::Backpressure) => r,
    };
    match appended {
        Ok(Some(seq)) => {
            metrics.outcomes.inc(outcome.label());
            if outcome.is_final() {
                metrics
                    .latency
                    .with_label_values(&[outcome.label()])
                    .observe(r.info.taken_at.elapsed().as_secs_f64());
            }
            Some(seq)
        }
        Ok(None) => None,
        Err(e) => {
            bridge::counted!(warn, metrics.outcomes_failed, "journal", command_id = %c.id, client_id = %c.client_id, outcome = outcome.label(), error = %e, "command outcome not journaled; the command stays unsettled");
            None
        }
    }
}

/// Settles, in report order, every command whose outcome record is durable. A Kafka
/// command's final outcome first leaves a flushed "done" marker in the store, so that a
/// crash before its offset is committed does not deliver it again.
async fn release(
    shared: &Shared,
    waiting: &mut VecDeque<(u64, Report)>,
    durable: u64,
    settle: Option<&mpsc::UnboundedSender<Settled>>,
    flushed: &mut tokio::sync::watch::Receiver<u64>,
) {
    let mut ready = Vec::new();
    while waiting.front().is_some_and(|(seq, _)| *seq <= durable) {
        let Some((_, r)) = waiting.pop_front() else {
            break;
        };
        ready.push(r);
    }
    // Every final outcome (also after `queued`: the offset may still be behind it) of a
    // Kafka command, one marker write per partition for the whole batch.
    let mut marks: std::collections::BTreeMap<(&str, i32), Vec<i64>> = std::collections::BTreeMap::new();
    for r in &ready {
        let is_final = r.outcome.is_some_and(Outcome::is_final);
        if let (
            true,
            Source::Kafka {
                topic,
                partition,
                offset,
            },
        ) = (is_final, &r.info.record.source)
        {
            marks
                .entry((topic.as_str(), *partition))
                .or_default()
                .push(*offset);
        }
    }
    let mut gen = 0;
    for ((topic, partition), offsets) in &marks {
        match shared.store.put_commands_done(topic, *partition, offsets) {
            Ok(g) => {
                gen = gen.max(g);
                // The store's index answers for them from now on. (A marker not
                // stored stays guarded here until its offset is committed.)
                for o in offsets {
                    shared.commands.sink.finished(&Source::Kafka {
                        topic: (*topic).to_string(),
                        partition: *partition,
                        offset: *o,
                    });
                }
            }
            Err(e) => {
                warn!(topic, partition, error = %e, "command done markers not stored (a crash before the commit re-delivers them)")
            }
        }
    }
    if gen > 0 {
        let _ = flushed.wait_for(|g| *g >= gen).await;
    }
    for r in ready {
        if let (
            Some(tx),
            Source::Kafka {
                partition, offset, ..
            },
        ) = (settle, &r.info.record.source)
        {
            let _ = tx.send(Settled {
                partition: *partition,
                offset: *offset,
            });
        }
        if let (Some(w), Some(outcome)) = (&r.info.waiter, r.outcome) {
            w.send_replace(Some(Progress {
                outcome,
                reason: r.reason,
            }));
        }
    }
}
