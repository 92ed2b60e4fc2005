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
//!   commands by the session queues they sit in, and, once their reports wait here
//!   because the journal cannot take them, by refusing new ones at
//!   `commands.max_pending` reports waiting: [`Sink::backlog`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge::commands::Settled;
use bridge::{Entry, EntryKind, FullPolicy, Journal as _};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::ticket::{CommandRecord, Progress, Source, TicketInfo};
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
    /// Reports sent and not yet taken by the outcome task (appended to the journal or
    /// given up): what the unbounded channel holds. It grows while outcome records cannot
    /// be journaled (the journal full or stalled); REST and MQTT commands are refused
    /// past `commands.max_pending` of it ([`Sink::backlog`]).
    backlog: AtomicUsize,
    closed: AtomicBool,
    /// Kafka commands whose final outcome is reported and whose "done" marker is not
    /// in the store yet. Between a vehicle's PUBACK and that marker the command is held
    /// by no session and not marked done: a re-read of its offset then (a restart, the
    /// consumer rejoining) must not deliver it again. Inserting here and sending the
    /// report happen under this lock, and so do a re-read's check and its own report, so
    /// the re-read settles after the original.
    finishing: Mutex<HashSet<KafkaKey>>,
    /// In a region (`commands.many_gateways`, see [`Sink::remember_recent`]): Kafka
    /// commands that reached a final outcome here lately, by identity. One command can
    /// reach a gateway twice there: as its original record (read late, after the
    /// vehicle had moved here) and as the copy its previous gateway handed over (see
    /// `region`), at another offset but under the original's id. Whichever comes
    /// second settles without a word. Bounded: see [`RECENT_MAX`], [`RECENT_FOR_MS`].
    recent: Mutex<Recent>,
    remember: AtomicBool,
    /// The memory's clock: monotonic, so that a wall-clock step neither keeps entries
    /// nor drops them early.
    origin: std::time::Instant,
}

/// Whether a final outcome ended the command for the vehicle, so that another copy of
/// it must not reach the vehicle: it has it (`delivered`), or any copy would end the
/// same (`expired`; refused by the vehicle or too large for it). Not so for outcomes
/// about where the vehicle was then (`unknown_vehicle`, `not_subscribed`, `dropped`
/// with its session): a copy that comes once the vehicle is here is delivered, and
/// its `delivered` is the later, authoritative record.
fn settled_by_vehicle(r: &Report) -> bool {
    match r.outcome {
        Some(Outcome::Delivered | Outcome::Expired) => true,
        Some(Outcome::Rejected) => matches!(r.reason, Some("refused_by_vehicle" | "too_large_for_client")),
        _ => false,
    }
}

/// How many command identities [`Sink`] keeps for recognising a second copy.
pub const RECENT_MAX: usize = 65_536;
/// How long [`Sink`] keeps a command identity: a copy handed over comes within
/// seconds of the vehicle's move, an original read late within the consumer's lag.
pub const RECENT_FOR_MS: u64 = 10 * 60 * 1000;

/// Command identities with when they were first finished; `order` oldest first.
#[derive(Debug, Default)]
struct Recent {
    at: HashMap<KafkaKey, u64>,
    order: VecDeque<KafkaKey>,
}

impl Recent {
    fn insert(&mut self, key: KafkaKey, now: u64) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.at.entry(key) {
            self.order.push_back(e.key().clone());
            e.insert(now);
        }
        while self.order.len() > RECENT_MAX
            || self
                .order
                .front()
                .and_then(|k| self.at.get(k))
                .is_some_and(|t| now.saturating_sub(*t) >= RECENT_FOR_MS)
        {
            if let Some(k) = self.order.pop_front() {
                self.at.remove(&k);
            }
        }
    }

    fn contains(&self, key: &KafkaKey, now: u64) -> bool {
        self.at
            .get(key)
            .is_some_and(|t| now.saturating_sub(*t) < RECENT_FOR_MS)
    }
}

/// Which command a Kafka command is, whatever record carried it: the coordinates in
/// its id when another gateway handed it over (`kafka:<topic>:<partition>:<offset>` of
/// the original), else its own record's. `None` for REST and MQTT commands.
pub fn identity(record: &CommandRecord) -> Option<KafkaKey> {
    let own = kafka_key(&record.source)?;
    let parsed = record.id.strip_prefix("kafka:").and_then(|rest| {
        let mut it = rest.rsplitn(3, ':');
        let offset = it.next()?.parse().ok()?;
        let partition = it.next()?.parse().ok()?;
        let topic = it.next()?;
        // Exactly as a gateway writes it (no `+7`, no `007`).
        (format!("kafka:{topic}:{partition}:{offset}") == record.id)
            .then(|| (topic.to_string(), partition, offset))
    });
    Some(parsed.unwrap_or(own))
}

impl Sink {
    pub fn new() -> (Arc<Sink>, mpsc::UnboundedReceiver<Report>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Sink {
                tx,
                backlog: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                finishing: Mutex::new(HashSet::new()),
                recent: Mutex::default(),
                remember: AtomicBool::new(false),
                origin: std::time::Instant::now(),
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
                if self.remember.load(Ordering::Relaxed) && settled_by_vehicle(&r) {
                    if let Some(id) = identity(&r.info.record) {
                        let now = self.clock();
                        self.recent().insert(id, now);
                    }
                }
                finishing.insert(k);
                self.send(r);
            }
            None => self.send(r),
        }
    }

    /// Keeps the identities of finished Kafka commands from now on (a region: a
    /// command may come twice, see [`Sink::recent`]).
    pub fn remember_recent(&self) {
        self.remember.store(true, Ordering::Relaxed);
    }

    /// Reports `r` (a re-read settling without a word) when the Kafka command at `key`
    /// already has a final outcome: reported and still settling, (`done`) marked in the
    /// store, or, in a region, finished lately under its identity (another copy of it,
    /// see [`identity`]). False, and nothing sent, otherwise.
    pub(super) fn report_if_finished(&self, key: &KafkaKey, done: impl FnOnce() -> bool, r: Report) -> bool {
        let finishing = self.finishing();
        // Only in a region: a single gateway neither keeps nor asks the memory.
        let copy = || {
            if !self.remember.load(Ordering::Relaxed) {
                return false;
            }
            let id = identity(&r.info.record);
            let now = self.clock();
            let recent = self.recent();
            recent.contains(key, now) || id.is_some_and(|id| recent.contains(&id, now))
        };
        if !finishing.contains(key) && !copy() && !done() {
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

    /// Milliseconds on the memory's monotonic clock.
    fn clock(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Taken only under [`Sink::finishing`]'s lock, or alone.
    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, r: Report) {
        self.backlog.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(r).is_err() {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            if !self.is_closed() {
                warn!("command outcome reported after the outcome task ended");
            }
        }
    }

    /// Reports waiting for the outcome task (see [`Sink::backlog`]'s field).
    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }

    /// The outcome task took a report off the channel and is done with it.
    fn taken(&self) {
        self.backlog.fetch_sub(1, Ordering::Relaxed);
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
    let mut unflushed = Unflushed::default();
    let mut tick = tokio::time::interval(MARKER_FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let gateway_id = shared.gateway_id.clone();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            // Markers are written without waking the store's flusher: one flush per tick
            // covers them all (or any other write's flush does, sooner).
            _ = tick.tick(), if !unflushed.is_empty() => {
                if unflushed.newest().is_some_and(|g| shared.store.flushed_gen() < g) {
                    shared.store.request_flush();
                }
            }
            // A flush covered markers: settle their offsets now, not at the next tick.
            changed = flushed.changed(), if !unflushed.is_empty() => if changed.is_err() { break },
            r = rx.recv() => {
                let Some(r) = r else { break };
                if let Some(gen) = r.store_gen {
                    // A `queued` outcome waits for its queue entry to be flushed. (The
                    // generation may be a marker's, written without waking the flusher.)
                    if shared.store.flushed_gen() < gen {
                        shared.store.request_flush();
                    }
                    let flushed = tokio::select! {
                        _ = stop.cancelled() => false,
                        res = shared.store.wait_flushed(gen) => res.is_ok(),
                    };
                    if !flushed {
                        shared.commands.sink.taken();
                        break;
                    }
                }
                let journaled = journal(&shared, &gateway_id, &r, &stop).await;
                shared.commands.sink.taken();
                match journaled {
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
        release(&shared, &mut waiting, d, &mut unflushed);
        unflushed.settle(shared.store.flushed_gen(), settle.as_ref());
    }
    // Shutdown: what was reported before it is journaled and settled if it becomes
    // durable within the drain time; anything later is re-delivered after the restart.
    let _ = tokio::time::timeout(drain, async {
        let never = CancellationToken::new();
        while let Ok(r) = rx.try_recv() {
            shared.commands.sink.taken();
            if r.store_gen.is_some_and(|g| shared.store.flushed_gen() < g) {
                continue;
            }
            if let Some(seq) = journal(&shared, &gateway_id, &r, &never).await {
                waiting.push_back((seq, r));
            }
        }
        while !waiting.is_empty() {
            let d = *durable.borrow_and_update();
            release(&shared, &mut waiting, d, &mut unflushed);
            if waiting.is_empty() || durable.changed().await.is_err() {
                break;
            }
        }
        if let Some(need) = unflushed.newest() {
            shared.store.request_flush();
            // Fails at once on a failed or closed store: those offsets stay unsettled.
            let _ = shared.store.wait_flushed(need).await;
        }
        unflushed.settle(shared.store.flushed_gen(), settle.as_ref());
    })
    .await;
}

/// How often, at most, the outcome task asks for a store flush covering the "done"
/// markers it wrote. The consumer commits every 200 ms; a marker only has to be flushed
/// before the commit that passes its offset, so up to one tick more before an offset is
/// settled costs nothing, and a flush per settled batch (hundreds a second at 10,000
/// commands/s, each an `fsync` of its own) is avoided.
pub const MARKER_FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Kafka commands whose outcome is durable, waiting for the store flush that covers
/// their "done" marker (generation) before their offset may be committed.
#[derive(Debug, Default)]
struct Unflushed {
    items: VecDeque<(u64, Settled)>,
}

impl Unflushed {
    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The newest generation waited for.
    fn newest(&self) -> Option<u64> {
        self.items.iter().map(|(g, _)| *g).max()
    }

    /// Settles every command whose marker `flushed` covers. (Generations grow with
    /// each batch, so the queue is in generation order.)
    fn settle(&mut self, flushed: u64, settle: Option<&mpsc::UnboundedSender<Settled>>) {
        while self.items.front().is_some_and(|(g, _)| *g <= flushed) {
            if let (Some((_, s)), Some(tx)) = (self.items.pop_front(), settle) {
                let _ = tx.send(s);
            }
        }
    }
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
        packet_id: None,
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

/// Takes, in report order, every report whose outcome record is durable. A Kafka
/// command's final outcome first leaves a "done" marker in the store, so that a crash
/// before its offset is committed does not deliver it again: its offset is settled (in
/// `unflushed`) once a flush covers the marker. A REST caller waiting is told at once.
fn release(shared: &Shared, waiting: &mut VecDeque<(u64, Report)>, durable: u64, unflushed: &mut Unflushed) {
    let mut ready = Vec::new();
    while waiting.front().is_some_and(|(seq, _)| *seq <= durable) {
        let Some((_, r)) = waiting.pop_front() else {
            break;
        };
        ready.push(r);
    }
    if ready.is_empty() {
        return;
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
    for r in ready {
        if let Source::Kafka {
            partition, offset, ..
        } = &r.info.record.source
        {
            let s = Settled {
                partition: *partition,
                offset: *offset,
            };
            unflushed.items.push_back((gen, s));
        }
        if let (Some(w), Some(outcome)) = (&r.info.waiter, r.outcome) {
            w.send_replace(Some(Progress {
                outcome,
                reason: r.reason,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(id: &str, topic: &str, partition: i32, offset: i64) -> CommandRecord {
        CommandRecord {
            id: id.into(),
            client_id: "VIN1".into(),
            correlation_id: None,
            source: Source::Kafka {
                topic: topic.into(),
                partition,
                offset,
            },
            issued_at_ms: 1,
            qos: 1,
        }
    }

    #[test]
    fn a_command_is_known_by_its_original_coordinates() {
        let key = |t: &str, p, o| Some((t.to_string(), p, o));
        // Its own record.
        assert_eq!(
            identity(&kafka("kafka:region.cmds:3:17", "region.cmds", 3, 17)),
            key("region.cmds", 3, 17)
        );
        // A copy handed over: the id names the original.
        assert_eq!(
            identity(&kafka("kafka:region.cmds:0:5", "region.cmds", 1, 90)),
            key("region.cmds", 0, 5)
        );
        // An id that is not a Kafka one: its record's coordinates.
        assert_eq!(identity(&kafka("weird", "t", 2, 4)), key("t", 2, 4));
        assert_eq!(identity(&kafka("kafka:t:x:4", "t", 2, 4)), key("t", 2, 4));
        assert_eq!(identity(&kafka("kafka:t:+0:04", "t", 2, 4)), key("t", 2, 4));
        let rest = CommandRecord {
            source: Source::Rest,
            ..kafka("rest-1-1", "t", 0, 0)
        };
        assert_eq!(identity(&rest), None);
    }

    #[test]
    fn an_offset_is_settled_only_once_a_flush_covers_its_marker() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut u = Unflushed::default();
        let s = |offset| Settled { partition: 0, offset };
        // Batches in order: markers at generations 3 and 5; a batch without markers
        // (gen 0) waits behind them, settled with the next flush.
        u.items.extend([(3, s(1)), (3, s(2)), (5, s(3)), (0, s(4))]);
        assert_eq!(u.newest(), Some(5));
        u.settle(2, Some(&tx));
        assert!(rx.try_recv().is_err(), "nothing flushed yet");
        u.settle(4, Some(&tx));
        let got: Vec<i64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|s| s.offset)
            .collect();
        assert_eq!(got, vec![1, 2]);
        u.settle(5, Some(&tx));
        let got: Vec<i64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|s| s.offset)
            .collect();
        assert_eq!(got, vec![3, 4]);
        assert!(u.is_empty());
    }

    #[test]
    fn the_memory_of_finished_commands_is_bounded_in_count_and_age() {
        let mut r = Recent::default();
        let k = |o: i64| ("t".to_string(), 0, o);
        for o in 0..(RECENT_MAX as i64 + 10) {
            r.insert(k(o), 1_000);
        }
        assert_eq!((r.at.len(), r.order.len()), (RECENT_MAX, RECENT_MAX));
        assert!(!r.contains(&k(9), 1_000), "the oldest went first");
        assert!(r.contains(&k(10), 1_000));
        // Too old to be asked about, and gone at the next insert.
        assert!(!r.contains(&k(10), 1_000 + RECENT_FOR_MS));
        r.insert(k(-1), 1_000 + RECENT_FOR_MS);
        assert_eq!(r.at.len(), 1);
        // The same identity twice is kept once.
        r.insert(k(-1), 2_000 + RECENT_FOR_MS);
        assert_eq!(r.order.len(), 1);
    }
}
