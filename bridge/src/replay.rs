//! Operator replays: re-sending to Kafka a range of records Kafka already confirmed,
//! from the segments the journal keeps for that purpose (replay retention, see the
//! journal module doc).
//!
//! # Contract
//!
//! * A replay names a range by journal sequence (`from_seq..=to_seq`, both inclusive) or
//!   by receive time (`from_ms <= received_at_ms < to_ms`), optionally narrowed to one
//!   Kafka topic (the destination under the **current** routes). The range must be
//!   retained: a sequence range lies within [`SegmentedJournal::retained_range`] (released
//!   records only); a time range must not start before the oldest retained record unless
//!   nothing was ever deleted before it. Otherwise [`ReplayError::NotRetained`], whose
//!   message gives the retained range.
//! * [`Replays::start`] pins the range ([`crate::journal::ReplayReader`]), counts exactly
//!   what matches (records, payload bytes, first and last sequence) and answers with that
//!   *before* sending anything; then a task reads the same pinned range again and sends
//!   exactly those records. Retention cannot delete them meanwhile (only a full volume
//!   can: the replay then fails and says so).
//! * Records go out in journal order through their own idempotent producer (`acks=all`,
//!   the pipeline's settings, [`crate::producer::client_config`]), so the live pipeline is
//!   neither blocked nor reordered by a replay: its producer, queue and release watermark
//!   are untouched, and a replay never releases or deletes anything.
//! * Each record is built like the pipeline builds it (topic and key from the routes,
//!   headers from [`crate::producer::headers`], timestamp = receive time), plus the header
//!   `gateway.replay = <replay id>`. Consumers that drop duplicates by
//!   (`gateway.journal`, `gateway.seq`) must exempt replayed records (like
//!   `gateway.redrive` ones) if they want them: a replay is an explicit, out-of-order
//!   re-send.
//! * Skipped, and counted as `skipped`: records no current route accepts
//!   (`kafka.unmatched = "refuse"`, event topics switched off) and commands handed over
//!   to another gateway (re-sending them would deliver a command to a vehicle again).
//! * An operator can cancel a running replay ([`Replays::cancel`]): it ends `cancelled`,
//!   its unsent records are purged from its producer, and its pins go at once (a replay
//!   stuck behind an unreachable Kafka otherwise pins retained segments, up to twice
//!   `replay_retention_bytes`; past that the journal deletes the oldest and the replay
//!   fails saying so).
//! * One replay at a time ([`ReplayError::Running`]). Progress ([`Progress`]) is readable
//!   while it runs; the last [`HISTORY`] replays are kept in memory. A replay is not
//!   persisted: a restarted gateway does not resume or repeat one.
//! * `message.timeout.ms = 0` as in the pipeline: while Kafka is unreachable the replay
//!   waits (progress shows it); a record Kafka refuses for good counts as `failed` and
//!   the replay ends `failed` once every record has its delivery report.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Header;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::journal::{NotRetained, ReplayReader};
use crate::producer::{client_config, headers, ProducerConfig};
use crate::routes::{Destination, Routes};
use crate::{EntryKind, Record, SegmentedJournal};

/// Replays remembered for the progress route.
pub const HISTORY: usize = 16;
/// Header marking a replayed record; its value is the replay id.
pub const REPLAY_HEADER: &str = "gateway.replay";
/// Records a replay has in flight at most (bounded further by `kafka.max_inflight`).
const MAX_IN_FLIGHT: usize = 10_000;
const READ_BATCH: usize = 512;

/// Which records to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Journal sequences `from..=to`.
    Seq { from: u64, to: u64 },
    /// Receive times `from_ms <= received_at_ms < to_ms` (ms since the epoch).
    Time { from_ms: u64, to_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub range: Range,
    /// Only records whose current route leads to this Kafka topic.
    pub topic: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayState {
    Running,
    /// Every record sent and confirmed by Kafka.
    Done,
    /// Interrupted (shutdown, journal error, segments deleted for space) or some records
    /// refused by Kafka; `error` says which.
    Failed,
    /// Stopped by an operator ([`Replays::cancel`]); what was confirmed stays confirmed.
    Cancelled,
}

impl ReplayState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayState::Running => "running",
            ReplayState::Done => "done",
            ReplayState::Failed => "failed",
            ReplayState::Cancelled => "cancelled",
        }
    }
}

/// A replay as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub id: String,
    pub state: ReplayState,
    pub request: Request,
    /// What it queued: records, their payload bytes, first and last sequence.
    pub records: u64,
    pub bytes: u64,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    /// Records in the range left out (no current route, or a command hand-over).
    pub skipped: u64,
    /// Handed to the producer (or refused by it at once: then also `failed`) /
    /// confirmed by Kafka / refused.
    pub sent: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Sequence of the last record handed to the producer.
    pub current_seq: Option<u64>,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("replay {0} is still running; one replay at a time")]
    Running(String),
    #[error(transparent)]
    NotRetained(#[from] NotRetained),
    #[error("{0}")]
    Invalid(String),
    /// The range could not be read or the producer not created.
    #[error("{0}")]
    Failed(String),
}

/// What the counting pass found.
#[derive(Debug, Default, Clone, Copy)]
struct Planned {
    records: u64,
    bytes: u64,
    first: Option<u64>,
    last: Option<u64>,
    skipped: u64,
}

/// One replay's live counters.
struct Tracked {
    id: String,
    request: Request,
    planned: Planned,
    started_at_ms: u64,
    sent: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    current_seq: AtomicU64,
    end: Mutex<Option<End>>,
    first_error: Mutex<Option<String>>,
    /// Cancelled by an operator, or (a child of the gateway's token) at shutdown.
    stop: CancellationToken,
}

#[derive(Debug, Clone)]
struct End {
    state: ReplayState,
    at_ms: u64,
    error: Option<String>,
}

impl Tracked {
    fn progress(&self) -> Progress {
        let end = self.end.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let current = self.current_seq.load(Ordering::Relaxed);
        Progress {
            id: self.id.clone(),
            state: end.as_ref().map_or(ReplayState::Running, |e| e.state),
            request: self.request.clone(),
            records: self.planned.records,
            bytes: self.planned.bytes,
            from_seq: self.planned.first,
            to_seq: self.planned.last,
            skipped: self.planned.skipped,
            sent: self.sent.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            current_seq: (current > 0).then_some(current),
            started_at_ms: self.started_at_ms,
            finished_at_ms: end.as_ref().map(|e| e.at_ms),
            error: end.and_then(|e| e.error),
        }
    }

    fn finish(&self, state: ReplayState, error: Option<String>) {
        *self.end.lock().unwrap_or_else(|e| e.into_inner()) = Some(End {
            state,
            at_ms: now_ms(),
            error,
        });
    }

    fn confirmed(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Registry {
    history: VecDeque<Arc<Tracked>>,
    /// A replay is being planned or sent.
    busy: Option<String>,
    task: Option<tokio::task::JoinHandle<()>>,
    next: u64,
}

/// The gateway's replays: at most one running, the last [`HISTORY`] remembered.
pub struct Replays {
    journal: Arc<SegmentedJournal>,
    routes: Arc<Routes>,
    cfg: ProducerConfig,
    registry: Mutex<Registry>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Replays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replays").finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Replays {
    /// `cfg` is the pipeline's producer configuration (bootstrap, gateway and journal id,
    /// operator properties); a replay builds its own producer from it.
    pub fn new(journal: Arc<SegmentedJournal>, routes: Arc<Routes>, cfg: ProducerConfig) -> Arc<Self> {
        Arc::new(Replays {
            journal,
            routes,
            cfg,
            registry: Mutex::new(Registry::default()),
            cancel: CancellationToken::new(),
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plans the replay (pins and counts the range) and starts sending it; answers with
    /// what it queued. See the module doc.
    pub async fn start(self: &Arc<Self>, request: Request) -> Result<Progress, ReplayError> {
        self.check(&request)?;
        let id = {
            let mut reg = self.registry();
            if let Some(running) = &reg.busy {
                return Err(ReplayError::Running(running.clone()));
            }
            if self.cancel.is_cancelled() {
                return Err(ReplayError::Failed("the gateway is shutting down".into()));
            }
            reg.next += 1;
            let id = format!("replay-{}-{}", now_ms(), reg.next);
            reg.busy = Some(id.clone());
            id
        };
        let this = self.clone();
        let req = request.clone();
        let planned = tokio::task::spawn_blocking(move || this.plan(&req))
            .await
            .map_err(|e| ReplayError::Failed(format!("replay planning task: {e}")))
            .and_then(|r| r);
        let (reader, planned) = match planned {
            Ok(p) => p,
            Err(e) => {
                self.registry().busy = None;
                return Err(e);
            }
        };
        let tracked = Arc::new(Tracked {
            id: id.clone(),
            request,
            planned,
            started_at_ms: now_ms(),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            current_seq: AtomicU64::new(0),
            end: Mutex::new(None),
            first_error: Mutex::new(None),
            stop: self.cancel.child_token(),
        });
        let producer = if planned.records == 0 {
            None
        } else {
            match self.producer(&tracked) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.registry().busy = None;
                    return Err(ReplayError::Failed(format!("replay producer: {e}")));
                }
            }
        };
        info!(
            replay = %id,
            records = planned.records,
            bytes = planned.bytes,
            from_seq = ?planned.first,
            to_seq = ?planned.last,
            skipped = planned.skipped,
            "replay: re-sending delivered records to Kafka"
        );
        {
            let mut reg = self.registry();
            reg.history.push_back(tracked.clone());
            while reg.history.len() > HISTORY {
                reg.history.pop_front();
            }
        }
        let progress = match producer {
            None => {
                self.end(&tracked, ReplayState::Done, None);
                tracked.progress()
            }
            Some(producer) => {
                let progress = tracked.progress();
                let this = self.clone();
                let task = tokio::task::spawn_blocking(move || this.send(tracked, reader, producer));
                self.registry().task = Some(task);
                progress
            }
        };
        Ok(progress)
    }

    /// The replay `id`, if remembered.
    pub fn get(&self, id: &str) -> Option<Progress> {
        self.registry()
            .history
            .iter()
            .find(|t| t.id == id)
            .map(|t| t.progress())
    }

    /// The remembered replays, newest first.
    pub fn list(&self) -> Vec<Progress> {
        self.registry()
            .history
            .iter()
            .rev()
            .map(|t| t.progress())
            .collect()
    }

    /// Stops the replay `id` if it is still running and waits (up to `wait`) until it
    /// has: its producer's queue is purged, records Kafka already confirmed stay
    /// confirmed, and its pins go, so retention applies again. `None`: no such replay.
    pub async fn cancel(&self, id: &str, wait: Duration) -> Option<Progress> {
        let tracked = self.registry().history.iter().find(|t| t.id == id).cloned()?;
        tracked.stop.cancel();
        let deadline = tokio::time::Instant::now() + wait;
        while tracked.progress().state == ReplayState::Running && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some(tracked.progress())
    }

    /// Why a stopped replay stopped.
    fn interrupted(&self) -> String {
        if self.cancel.is_cancelled() {
            "interrupted by the gateway's shutdown".to_string()
        } else {
            "cancelled by an operator".to_string()
        }
    }

    /// Gateway shutdown: interrupts a running replay (it ends `failed`, what it sent
    /// stays sent) and waits for it until `deadline`.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        self.cancel.cancel();
        let task = self.registry().task.take();
        if let Some(task) = task {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                warn!("replay: did not stop within the grace period");
            }
        }
    }

    fn check(&self, request: &Request) -> Result<(), ReplayError> {
        match request.range {
            Range::Seq { from, to } if from > to => {
                return Err(ReplayError::Invalid(format!(
                    "from_seq ({from}) is above to_seq ({to}); both are inclusive"
                )))
            }
            Range::Time { from_ms, to_ms } if from_ms >= to_ms => {
                return Err(ReplayError::Invalid(format!(
                    "from_ms ({from_ms}) must be below to_ms ({to_ms}); from_ms is inclusive, to_ms exclusive"
                )))
            }
            _ => {}
        }
        if let Some(topic) = &request.topic {
            let topics = self.routes.topics();
            if !topics.contains(topic) {
                return Err(ReplayError::Invalid(format!(
                    "topic {topic:?} is no destination of the current routes; one of {topics:?}"
                )));
            }
        }
        Ok(())
    }

    /// Where `rec` goes if it belongs to the replay.
    fn destination(&self, rec: &Record, request: &Request) -> Match {
        if let Range::Time { from_ms, to_ms } = request.range {
            if !(from_ms..to_ms).contains(&rec.entry.received_at_ms) {
                return Match::Outside;
            }
        }
        if rec.entry.kind == EntryKind::Command {
            return Match::Skipped;
        }
        let Some(dest) = self.routes.destination(&rec.entry) else {
            return Match::Skipped;
        };
        match &request.topic {
            Some(t) if *t != dest.topic => Match::Outside,
            _ => Match::Send(dest),
        }
    }

    /// Pins the range and counts what matches; the reader is rewound to the first match.
    fn plan(&self, request: &Request) -> Result<(ReplayReader, Planned), ReplayError> {
        let (from, to) = match request.range {
            Range::Seq { from, to } => (from, to),
            Range::Time { .. } => {
                let r = self.journal.retained_range().ok_or_else(|| {
                    // Let the journal phrase why nothing is retained.
                    match self.journal.replay_reader(1, 0) {
                        Err(e) => ReplayError::NotRetained(e),
                        Ok(_) => ReplayError::Failed("nothing is retained".into()),
                    }
                })?;
                (r.from_seq, r.to_seq)
            }
        };
        let mut reader = self.journal.replay_reader(from, to)?;
        let mut planned = Planned::default();
        let mut first = true;
        loop {
            let batch = reader
                .next_batch(READ_BATCH)
                .map_err(|e| ReplayError::Failed(format!("reading the journal: {e}")))?;
            if batch.is_empty() {
                break;
            }
            if let (true, Range::Time { from_ms, .. }, Some(oldest)) = (first, request.range, batch.first()) {
                // Records received before the oldest retained one may have existed.
                if from_ms < oldest.entry.received_at_ms && oldest.seq > 1 {
                    return Err(ReplayError::NotRetained(NotRetained {
                        retained: self.journal.retained_range(),
                        message: format!(
                            "records received from {from_ms} ms are not all retained: the oldest retained record \
                             (sequence {}) was received at {} ms; start at or after it",
                            oldest.seq, oldest.entry.received_at_ms
                        ),
                    }));
                }
            }
            first = false;
            for rec in &batch {
                match self.destination(rec, request) {
                    Match::Send(_) => {
                        planned.records += 1;
                        planned.bytes += rec.entry.payload.len() as u64;
                        planned.first.get_or_insert(rec.seq);
                        planned.last = Some(rec.seq);
                    }
                    Match::Skipped => planned.skipped += 1,
                    Match::Outside => {}
                }
            }
        }
        if let Some(why) = reader.revoked() {
            return Err(ReplayError::Failed(why.reason().into()));
        }
        reader.rewind(planned.first.unwrap_or(to.saturating_add(1)));
        Ok((reader, planned))
    }

    fn producer(&self, tracked: &Arc<Tracked>) -> Result<ThreadedProducer<ReplayContext>, KafkaError> {
        let mut c = client_config(&self.cfg);
        c.set(
            "client.id",
            format!("edge-gateway-{}-replay", self.cfg.gateway_id),
        );
        c.create_with_context(ReplayContext {
            tracked: tracked.clone(),
        })
    }

    /// The sending task (a blocking thread: it reads the journal).
    fn send(
        self: Arc<Self>,
        tracked: Arc<Tracked>,
        mut reader: ReplayReader,
        producer: ThreadedProducer<ReplayContext>,
    ) {
        // Frees the slot however this ends, a panic included.
        let _slot = Slot {
            replays: &self,
            tracked: &tracked,
        };
        let window = self.cfg.max_inflight.clamp(1, MAX_IN_FLIGHT) as u64;
        let result = self.send_all(&tracked, &mut reader, &producer, window);
        let result = result.and_then(|()| {
            let sent = tracked.sent.load(Ordering::Relaxed);
            if sent != tracked.planned.records {
                return Err(format!(
                    "sent {sent} records of the {} counted (the journal changed under the replay)",
                    tracked.planned.records
                ));
            }
            // Every delivery report, however long Kafka takes.
            while tracked.confirmed() < sent {
                if tracked.stop.is_cancelled() {
                    return Err(format!(
                        "{} before Kafka confirmed every record",
                        self.interrupted()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        });
        producer.purge(PurgeConfig::default().queue().inflight());
        drop(producer);
        drop(reader);
        let failed = tracked.failed.load(Ordering::Relaxed);
        let first_error = tracked
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match (result, failed) {
            (Ok(()), 0) => {
                self.end(&tracked, ReplayState::Done, None);
                info!(replay = %tracked.id, records = tracked.planned.records, "replay: done; Kafka confirmed every record");
            }
            (Ok(()), _) => {
                let why = format!(
                    "Kafka refused {failed} records for good (first: {})",
                    first_error.unwrap_or_default()
                );
                warn!(replay = %tracked.id, reason = %why, "replay: failed");
                self.end(&tracked, ReplayState::Failed, Some(why));
            }
            (Err(why), _) if tracked.stop.is_cancelled() && !self.cancel.is_cancelled() => {
                info!(replay = %tracked.id, sent = tracked.sent.load(Ordering::Relaxed), "replay: cancelled by an operator");
                self.end(&tracked, ReplayState::Cancelled, Some(why));
            }
            (Err(why), _) => {
                warn!(replay = %tracked.id, reason = %why, "replay: failed");
                self.end(&tracked, ReplayState::Failed, Some(why));
            }
        }
    }

    /// Ends a replay: its slot is free before its state says so, so that a client that
    /// saw `done` can start the next one at once.
    fn end(&self, tracked: &Tracked, state: ReplayState, error: Option<String>) {
        {
            let mut reg = self.registry();
            if reg.busy.as_deref() == Some(tracked.id.as_str()) {
                reg.busy = None;
            }
        }
        tracked.finish(state, error);
    }

    fn send_all(
        &self,
        tracked: &Tracked,
        reader: &mut ReplayReader,
        producer: &ThreadedProducer<ReplayContext>,
        window: u64,
    ) -> Result<(), String> {
        let interrupted = || self.interrupted();
        loop {
            if tracked.stop.is_cancelled() {
                return Err(interrupted());
            }
            let batch = reader
                .next_batch(READ_BATCH)
                .map_err(|e| format!("reading the journal: {e}"))?;
            if let Some(why) = reader.revoked() {
                return Err(why.reason().into());
            }
            let Some(last) = batch.last().map(|r| r.seq) else {
                return Ok(());
            };
            for rec in &batch {
                let Match::Send(dest) = self.destination(rec, &tracked.request) else {
                    continue;
                };
                while tracked.sent.load(Ordering::Relaxed) - tracked.confirmed() >= window {
                    if tracked.stop.is_cancelled() {
                        return Err(interrupted());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                match self.send_one(tracked, rec, &dest, producer) {
                    Ok(()) => {}
                    Err(None) => return Err(interrupted()),
                    // Refused by the producer at once (too large, ...): counted as sent
                    // and failed, like a refusal in a delivery report.
                    Err(Some(why)) => {
                        tracked.failed.fetch_add(1, Ordering::Relaxed);
                        let mut first = tracked.first_error.lock().unwrap_or_else(|e| e.into_inner());
                        first.get_or_insert(why);
                    }
                }
                tracked.sent.fetch_add(1, Ordering::Relaxed);
                tracked.current_seq.store(rec.seq, Ordering::Relaxed);
            }
            reader.release_before(last + 1);
        }
    }

    /// Produces one record; waits while librdkafka's queue is full. `Err(None)` on
    /// shutdown.
    fn send_one(
        &self,
        tracked: &Tracked,
        rec: &Record,
        dest: &Destination,
        producer: &ThreadedProducer<ReplayContext>,
    ) -> Result<(), Option<String>> {
        loop {
            let h = headers(rec, &self.cfg.gateway_id, &self.cfg.journal_id).insert(Header {
                key: REPLAY_HEADER,
                value: Some(&tracked.id),
            });
            let record = BaseRecord::to(&dest.topic)
                .key(&dest.key)
                .payload(&rec.entry.payload[..])
                .headers(h)
                .timestamp(rec.entry.received_at_ms as i64);
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if tracked.stop.is_cancelled() {
                        return Err(None);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(Some(format!("record {} could not be produced: {e}", rec.seq))),
            }
        }
    }
}

/// The running replay's slot: released when its task ends, however it ends.
struct Slot<'a> {
    replays: &'a Replays,
    tracked: &'a Tracked,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let ended = self
            .tracked
            .end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !ended {
            self.replays.end(
                self.tracked,
                ReplayState::Failed,
                Some("the replay task ended unexpectedly (a bug: see the gateway log)".into()),
            );
        }
    }
}

enum Match {
    Send(Destination),
    /// In the range, but never replayed (no route, a command hand-over).
    Skipped,
    /// Not asked for (receive time or topic).
    Outside,
}

/// Counts a replay's delivery reports.
struct ReplayContext {
    tracked: Arc<Tracked>,
}

impl ClientContext for ReplayContext {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(replay = %self.tracked.id, error = %error, reason, "replay: producer error (retrying)");
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", fac, "{message}")
            }
            L::Warning => warn!(target: "librdkafka", fac, "{message}"),
            _ => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }
}

impl ProducerContext for ReplayContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.tracked.delivered.fetch_add(1, Ordering::Relaxed);
            }
            // Purged by a cancel or a shutdown (`send` purges its producer's queue):
            // never refused by Kafka, only not sent; `sent` - `delivered` says how many.
            Err((
                KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight),
                _,
            )) => {}
            Err((e, _)) => {
                self.tracked.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.tracked.first_error.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}
