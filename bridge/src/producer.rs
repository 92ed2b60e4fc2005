//! The producer pipeline: journal → Kafka, in journal order, released on confirmation.
//!
//! # Forwarding
//!
//! * Reads durable records from the journal in sequence order and produces each with an
//!   idempotent producer (`enable.idempotence=true`, `acks=all`, at most 5 requests in
//!   flight per connection), so one vehicle's records (one key, one partition) reach
//!   Kafka in the order the vehicle sent them, across librdkafka's retries.
//! * `message.timeout.ms = 0`: librdkafka retries a retryable failure (broker down, not
//!   enough replicas, request timeout) forever while the journal buffers. A message that
//!   timed out would have to be re-sent behind younger ones, which breaks order.
//! * Records in flight are bounded by `max_inflight`; the producer queue is sized to
//!   match, and a full queue makes the pipeline wait for delivery reports (back-pressure
//!   by readiness).
//! * A fatal producer error (idempotence state lost) rebuilds the producer and replays from
//!   the release watermark: duplicates are possible, reordering is not.
//!
//! # The release watermark
//!
//! The pipeline tracks every record it produced by its **real** journal sequence number.
//! Sequence numbers are not contiguous: the reader skips gaps between segments (segments
//! evicted undelivered by the `drop_oldest` policy, spans removed by journal repair). A
//! record is *done* when Kafka confirmed it, when the dead-letter topic confirmed it, or
//! when it was parked (below). The journal is released up to the last record of the
//! contiguous done prefix: a record is released only when it and every record read
//! before it are done (invariant 2). After a restart, forwarding replays from the
//! checkpointed watermark, in journal order.
//!
//! # Records Kafka refuses for good: dead letter, then the parked store
//!
//! Per-record fatal errors (record too large, topic authorisation failed, unknown topic, an
//! invalid timestamp, a policy violation: [`refused_for_good`]; an error no list names,
//! once the record failed with it under [`UNKNOWN_ERROR_STRIKES`] producers in a row, each
//! rebuilt and replayed in order; no route under `unmatched = "refuse"`) go to the
//! dead-letter topic with the error in the `gateway.error` header. Without a dead-letter topic, or when the dead-letter write
//! fails too, the record is **parked**: written durably (file and directory fsync'd) to
//! the [`crate::parked::ParkedStore`] at `parked_dir`, and only then marked done. So a
//! parked record **no longer holds the release watermark**: it lives in the parked store
//! until an operator re-drives it, and the records after it — including the same
//! vehicle's later records — are forwarded and released without waiting for it.
//! `gateway_bridge_parked_total` counts parkings and `parked_now` the records in the store;
//! every parking is logged as an error.
//!
//! The store is bounded (`max_parked`). When it is full (or cannot be written), the record
//! is held in the journal as before: its slot stays open, the watermark stops before it,
//! and once `max_inflight` records passed it forwarding stalls, with a loud error naming
//! the cause. The pipeline retries parking it when the store has room again. Never a
//! silent drop.
//!
//! **Re-drive** ([`BridgeControl::redrive`]): the pipeline produces each parked record
//! (one, or all) again to its *current* route (routes or topics may have been fixed
//! meanwhile), with the extra header `gateway.redrive = "true"`, and deletes its file only
//! after a successful delivery report. The answer says how many were sent, delivered,
//! failed again (with the reason; they stay parked) and are still pending (no delivery
//! report within [`REDRIVE_WAIT`]; their files are deleted if the delivery is confirmed
//! later). A re-driven record reaches Kafka after its vehicle's younger records: re-drive
//! is an explicit, out-of-order repair.
//!
//! # Headers and exact de-duplication downstream
//!
//! Every record carries `gateway.id` (the configured gateway id), `gateway.journal` (the
//! journal's identity, random, new if the journal directory is recreated) and
//! `gateway.seq` (the journal sequence number, decimal text), besides the `mqtt.*`
//! metadata. Delivery is at-least-once: a crash, a producer rebuild or a restart re-sends
//! what was not yet released, always in journal order, so a replayed record arrives after
//! its first copy and in the same partition (same key). A consumer drops replays exactly:
//!
//! 1. for each `(gateway.journal, partition)` remember the highest `gateway.seq` seen
//!    (persist it with the consumer's own state or offsets);
//! 2. a record whose `gateway.seq` is at or below that value is a replay: drop it;
//!    otherwise process it and raise the value.
//!
//! This holds because one journal's records reach a partition in increasing sequence
//! order and a replay starts at the release watermark and re-sends in the same order —
//! as long as a record's partition does not change between its first send and its
//! replay: a topic's partition count (or a route) changed while records were unconfirmed
//! breaks it (docs/RELIABILITY.md, "The consumer dedupe recipe").
//! Records carrying `gateway.redrive` are re-driven parked records, out of order by
//! nature: exempt them from the rule (process them; a re-drive interrupted by a crash may
//! repeat one, so dedupe those by the `(gateway.journal, gateway.seq)` pair if needed).
//!
//! # Shutdown
//!
//! [`Shutdown::stop_by`] carries one deadline for the whole shutdown: the pipeline stops
//! reading and sending at once (a record that did not fit the producer queue stays in the
//! journal), waits for the delivery reports of what is in flight, releasing as they
//! arrive, and never waits past the deadline. Unconfirmed records stay in the journal.
//!
//! # Supervision
//!
//! [`run`] returns an error when the pipeline cannot continue (journal read error, invalid
//! producer configuration). [`crate::supervisor::supervise`] runs it, restarts it with
//! back-off and turns [`BridgeStatus::state`] to [`State::Failed`] when it keeps failing.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::ClientContext;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use prometheus::{Histogram, IntCounter, IntGauge, IntGaugeVec};

use crate::journal::{EntryKind, Journal, JournalError, Record};
use crate::metrics::Defs;
use crate::parked::{ParkedError, ParkedStore};
use crate::routes::Routes;

/// How long a re-drive waits for delivery reports before answering with `pending`.
pub const REDRIVE_WAIT: Duration = Duration::from_secs(10);
/// Delivery opaque bit marking a re-driven record (journal sequences stay below 2^63).
const REDRIVE_BIT: u64 = 1 << 63;
/// How often parking is retried for records held because the parked store was full.
const STALLED_RETRY: Duration = Duration::from_secs(2);

/// Producer settings from the `[kafka]` section.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub bootstrap: String,
    pub compression: String,
    pub linger_ms: u64,
    pub batch_bytes: u64,
    /// Records produced and not yet confirmed; bounds memory and the replay after a crash.
    pub max_inflight: usize,
    /// Written to the `gateway.id` header of every record.
    pub gateway_id: String,
    /// Identity of the journal, written to the `gateway.journal` header of every record;
    /// with `gateway.seq` it lets consumers drop replays exactly.
    pub journal_id: String,
    /// Where per-record fatal failures go; empty parks them in the parked store.
    pub dead_letter_topic: String,
    /// Durable store of parked records (`<journal dir>/parked`).
    pub parked_dir: PathBuf,
    /// Bound on parked records; beyond it forwarding stalls on the next refused record.
    pub max_parked: usize,
    /// librdkafka properties applied last (SASL, SSL, timeouts...).
    pub properties: BTreeMap<String, String>,
    /// Records in flight and no delivery report for this long, while a fresh client gets
    /// metadata from the brokers: the producer is rebuilt (see [`Pump::stalled`]).
    /// `Duration::ZERO` never rebuilds a silent producer.
    pub stall_rebuild: Duration,
}

/// Pipeline state for the admin API and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting = 0,
    Connected = 1,
    Degraded = 2,
    Down = 3,
    /// The pipeline keeps failing (see [`BridgeStatus::failed`]); the supervisor retries.
    Failed = 4,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Degraded => "degraded",
            State::Down => "down",
            State::Failed => "failed",
        }
    }
}

/// Live counters of the pipeline, shared with the admin API; its metrics are the
/// bridge's own (see [`BridgeStatus::gather`]).
pub struct BridgeStatus {
    state: AtomicU8,
    pub in_flight: IntGauge,
    pub delivered: IntCounter,
    pub dead_lettered: IntCounter,
    /// Records parked since start (counter).
    pub parked: IntCounter,
    /// Records in the parked store now (gauge).
    pub parked_now: IntGauge,
    /// Parked records delivered by a re-drive (counter).
    pub redriven: IntCounter,
    /// Errors reported by librdkafka (connection failures, retried requests).
    pub errors: IntCounter,
    pub producer_rebuilds: IntCounter,
    /// Old producers whose destroy outran its bound and still runs in the background
    /// (a wedged librdkafka instance: its threads and buffers are held until it returns).
    pub producers_lingering: IntGauge,
    /// Pipeline restarts by the supervisor after an error or a panic (counter).
    pub restarts: IntCounter,
    /// From handing a record to the Kafka producer to its `acks=all` confirmation.
    pub delivery_latency: Histogram,
    /// From the vehicle's PUBLISH reaching the gateway (its journal append) to the
    /// record's `acks=all` confirmation: what a consumer sees as lag.
    pub record_age: Histogram,
    state_gauge: IntGaugeVec,
    failed_gauge: IntGauge,
    paused_gauge: IntGauge,
    /// An operator paused forwarding (admin API): ingest goes on into the journal, no
    /// new record is produced (those in flight finish); resuming drains the journal in
    /// order. Not persisted: a restarted gateway forwards.
    paused: std::sync::atomic::AtomicBool,
    last_error: Mutex<Option<String>>,
    /// The latest error other than librdkafka's "all brokers down" summary, and when:
    /// that summary's likely cause.
    broker_error: Mutex<Option<(std::time::Instant, String)>>,
    /// The failure in `failed` is one a restart meets again (see `is_persistent`).
    failed_persistent: AtomicBool,
    failed: Mutex<Option<String>>,
    defs: Defs,
}

impl std::fmt::Debug for BridgeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeStatus")
            .field("state", &self.state())
            .field("delivered", &self.delivered.get())
            .field("in_flight", &self.in_flight.get())
            .finish_non_exhaustive()
    }
}

/// The values `gateway_bridge_state{state}` takes (1 for the current one).
const STATES: [State; 5] = [
    State::Connecting,
    State::Connected,
    State::Degraded,
    State::Down,
    State::Failed,
];

impl Default for BridgeStatus {
    fn default() -> Self {
        let defs = Defs::default();
        let status = BridgeStatus {
            state: AtomicU8::new(0),
            in_flight: defs.gauge("gateway_bridge_in_flight", "Records produced, not yet confirmed."),
            delivered: defs.counter("gateway_bridge_delivered_total", "Records confirmed by Kafka (acks=all)."),
            dead_lettered: defs.counter(
                "gateway_bridge_dead_lettered_total",
                "Records written to the dead-letter topic.",
            ),
            parked: defs.counter(
                "gateway_bridge_parked_total",
                "Records Kafka refused for good that were moved to the parked store.",
            ),
            parked_now: defs.gauge(
                "gateway_bridge_parked_records",
                "Records in the parked store now (re-drive them with POST /api/v1/bridge/parked/redrive).",
            ),
            redriven: defs.counter(
                "gateway_bridge_redriven_total",
                "Parked records delivered by a re-drive.",
            ),
            errors: defs.counter(
                "gateway_bridge_errors_total",
                "Errors reported by the Kafka client (retried).",
            ),
            producer_rebuilds: defs.counter(
                "gateway_bridge_producer_rebuilds_total",
                "Kafka producers rebuilt after a fatal error (every unconfirmed record is sent again, in order).",
            ),
            producers_lingering: defs.gauge(
                "gateway_bridge_producers_lingering",
                "Old Kafka producers still being destroyed in the background after a rebuild or a stop (their threads and memory are held until it returns).",
            ),
            restarts: defs.counter(
                "gateway_bridge_restarts_total",
                "Restarts of the Kafka bridge pipeline by its supervisor.",
            ),
            delivery_latency: defs.histogram(
                "gateway_bridge_delivery_latency_seconds",
                "From handing a record to the Kafka producer to its acks=all confirmation.",
                crate::metrics::LATENCY_BUCKETS,
            ),
            record_age: defs.histogram(
                "gateway_bridge_record_age_seconds",
                "End-to-end age of records when Kafka confirmed them: from the PUBLISH reaching the gateway (journal append) to acks=all.",
                crate::metrics::AGE_BUCKETS,
            ),
            state_gauge: defs.gauge_vec(
                "gateway_bridge_state",
                "Kafka bridge state (1 for the current one).",
                &["state"],
            ),
            failed_gauge: defs.gauge(
                "gateway_bridge_failed",
                "1 while the Kafka bridge fails persistently (/readyz is 503).",
            ),
            paused_gauge: defs.gauge(
                "gateway_bridge_paused",
                "1 while an operator paused forwarding to Kafka (POST /api/v1/bridge/pause); ingest goes on into the journal.",
            ),
            paused: std::sync::atomic::AtomicBool::new(false),
            last_error: Mutex::new(None),
            broker_error: Mutex::new(None),
            failed_persistent: AtomicBool::new(false),
            failed: Mutex::new(None),
            defs,
        };
        status.show_state();
        status
    }
}

impl BridgeStatus {
    /// The pipeline state; [`State::Failed`] while [`BridgeStatus::failed`] is set.
    pub fn state(&self) -> State {
        if self.failed().is_some() {
            return State::Failed;
        }
        match self.state.load(Ordering::Relaxed) {
            1 => State::Connected,
            2 => State::Degraded,
            3 => State::Down,
            _ => State::Connecting,
        }
    }
    pub(crate) fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
    /// The state gauges as the state is now (set when scraped: written from several
    /// threads as it changes, they could be left showing two states).
    fn show_state(&self) {
        let now = self.state();
        for st in STATES {
            self.state_gauge
                .with_label_values(&[st.as_str()])
                .set(i64::from(st == now));
        }
        self.failed_gauge.set(i64::from(now == State::Failed));
        self.paused_gauge.set(i64::from(self.paused()));
    }
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
    /// Pauses (true) or resumes (false) forwarding; the pipeline notices within 250 ms.
    /// Returns whether it was paused before.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.paused.swap(paused, Ordering::Relaxed)
    }
    /// The bridge's metrics, for `/metrics`.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.show_state();
        self.defs.gather()
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub(crate) fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }
    /// The latest broker error if it is recent enough to explain an "all brokers down"
    /// now (librdkafka reports that summary right after the brokers' own failures; an
    /// error from an earlier outage must not be shown as today's cause).
    fn broker_error(&self) -> Option<String> {
        let cause = self.broker_error.lock().unwrap_or_else(|e| e.into_inner());
        cause
            .as_ref()
            .filter(|(at, _)| at.elapsed() < BROKER_ERROR_RECENT)
            .map(|(_, why)| why.clone())
    }
    fn set_broker_error(&self, e: String) {
        *self.broker_error.lock().unwrap_or_else(|e| e.into_inner()) = Some((std::time::Instant::now(), e));
    }
    /// Why the bridge is persistently failing (set by the supervisor after repeated
    /// failures or a non-transient error; cleared once the pipeline runs healthily).
    /// `Some` means unhealthy: `/readyz` fails.
    pub fn failed(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Whether the failure is one a process restart may fix: the pipeline keeps failing
    /// (panics, journal I/O errors such as running out of file descriptors) rather than
    /// failing on something a restart meets again (an invalid producer setting, damaged
    /// journal data). `/healthz` fails only for these.
    pub fn failed_restart_may_help(&self) -> bool {
        self.failed().is_some() && !self.failed_persistent.load(Ordering::Relaxed)
    }
    pub(crate) fn set_failed(&self, why: Option<String>) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }
    pub(crate) fn set_failed_persistent(&self, persistent: bool) {
        self.failed_persistent.store(persistent, Ordering::Relaxed);
    }
}

/// A shutdown request with the one deadline of the whole shutdown.
///
/// Cheap to clone; every clone sees the same request.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    deadline: Arc<Mutex<Option<Instant>>>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests the stop: sending stops now; confirmations of what is in flight are
    /// awaited until `deadline`, never later. A second call can only bring it forward.
    pub fn stop_by(&self, deadline: Instant) {
        {
            let mut d = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
            *d = Some(d.map_or(deadline, |old| old.min(deadline)));
        }
        self.token.cancel();
    }

    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once a stop is requested.
    pub async fn requested(&self) {
        self.token.cancelled().await
    }

    /// The deadline of a requested stop; `None` while running.
    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The deadline, or now when none was given.
    fn deadline_or_now(&self) -> Instant {
        self.deadline().unwrap_or_else(Instant::now)
    }
}

/// Outcome of a re-drive of parked records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Records handed to the producer again.
    pub sent: usize,
    /// Records Kafka confirmed; their parked files are deleted.
    pub delivered: usize,
    /// Records that failed again (or could not be sent); they stay parked.
    pub failed: Vec<RedriveFailure>,
    /// Sent records without a delivery report after [`REDRIVE_WAIT`]; they stay parked
    /// until Kafka confirms them (then their files are deleted).
    pub pending: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveFailure {
    pub seq: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedriveError {
    #[error("the Kafka bridge is busy with other control requests; try again")]
    Busy,
    #[error("the Kafka bridge stopped or restarted before answering; list the parked records again")]
    Interrupted,
    #[error("parked store: {0}")]
    Store(String),
}

type RedriveReply = oneshot::Sender<Result<RedriveReport, RedriveError>>;

enum Command {
    Redrive { seq: Option<u64>, reply: RedriveReply },
}

/// Control handle of the pipeline (admin API): cheap to clone, created next to
/// [`BridgeStatus`] and handed to [`run`] / [`crate::supervisor::supervise`]. Requests
/// wait in a small queue while the pipeline restarts.
#[derive(Clone)]
pub struct BridgeControl {
    tx: mpsc::Sender<Command>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Command>>>,
}

impl Default for BridgeControl {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(16);
        BridgeControl {
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }
}

impl fmt::Debug for BridgeControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeControl").finish_non_exhaustive()
    }
}

impl BridgeControl {
    pub fn new() -> Self {
        Self::default()
    }

    /// Produces parked record `seq` (or every parked record, `None`) again to its current
    /// route; deletes each parked file once Kafka confirmed it. Answers after every sent
    /// record has a delivery report or after [`REDRIVE_WAIT`]. Waits while the pipeline
    /// is restarting; callers bound it with their own timeout.
    pub async fn redrive(&self, seq: Option<u64>) -> Result<RedriveReport, RedriveError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Command::Redrive { seq, reply })
            .map_err(|_| RedriveError::Busy)?;
        answer.await.map_err(|_| RedriveError::Interrupted)?
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("kafka producer configuration: {0}")]
    Config(#[from] KafkaError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Parked(#[from] ParkedError),
}

impl BridgeError {
    /// Errors a restart cannot fix (configuration, corrupt journal data): the supervisor
    /// marks the bridge failed at once instead of after repeated failures.
    pub fn is_persistent(&self) -> bool {
        match self {
            BridgeError::Config(_) => true,
            BridgeError::Journal(JournalError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::InvalidData
            }
            BridgeError::Journal(
                JournalError::Config(_) | JournalError::Stopped(_) | JournalError::Corrupt { .. },
            ) => true,
            BridgeError::Journal(_) => false,
            BridgeError::Parked(_) => false,
        }
    }
}

/// How old a broker error may be to be named as the cause of "all brokers down".
const BROKER_ERROR_RECENT: Duration = Duration::from_secs(10);

/// Delivery reports handed from librdkafka's thread to the pipeline task.
#[derive(Default)]
struct Reports {
    queue: Mutex<Vec<(u64, Result<(), KafkaError>)>>,
    notify: Notify,
    fatal: AtomicBool,
}

struct Ctx {
    reports: Arc<Reports>,
    status: Arc<BridgeStatus>,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        self.status.errors.inc();
        if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            // A summary that follows each broker's own failure: keep that cause in view
            // (rejected credentials, a TLS handshake refused), or the operator reads only
            // "all brokers down" and looks for a network problem.
            let cause = self.status.broker_error();
            self.status.set_error(match cause {
                Some(cause) => format!("{error}: {reason}; last broker error: {cause}"),
                None => format!("{error}: {reason}"),
            });
        } else {
            let message = format!("{error}: {reason}");
            self.status.set_broker_error(message.clone());
            self.status.set_error(message);
        }
        if code == Some(RDKafkaErrorCode::Fatal) {
            self.reports.fatal.store(true, Ordering::Relaxed);
            self.reports.notify.notify_one();
        }
        let down = code == Some(RDKafkaErrorCode::AllBrokersDown);
        self.status
            .set_state(if down { State::Down } else { State::Degraded });
        warn!(error = %error, reason, "kafka: producer error (retrying; the journal buffers)");
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => error!(target: "librdkafka", fac, "{message}"),
            L::Warning => warn!(target: "librdkafka", fac, "{message}"),
            _ => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        self.reports
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((opaque as u64, outcome));
        self.reports.notify.notify_one();
    }
}

/// Whether a failed delivery (or send) is about the producer rather than the record: the
/// producer's fatal state or its idempotence bookkeeping, its credentials or cluster
/// authorisation (a fix for those holds every record, in order, rather than parking
/// them all), a purge, or a message timeout (possible only if an operator property
/// re-enabled them). Those rebuild the producer and replay in order.
fn producer_failed(e: &KafkaError, fatal_flagged: bool) -> bool {
    fatal_flagged
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::PurgeQueue
                    | RDKafkaErrorCode::PurgeInflight
                    | RDKafkaErrorCode::MessageTimedOut
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::DuplicateSequenceNumber
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::InvalidProducerIdMapping
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
            )
        )
}

/// Errors Kafka gives a record it will never take: dead-lettered, then parked.
fn refused_for_good(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidTimestamp
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::InvalidTopic
        )
    )
}

/// How many times a record may fail with an error neither list names, a rebuild and an
/// in-order replay after each, before it is taken as refused for good. librdkafka
/// reports only what it does not retry (message timeouts are off), but an unlisted code
/// may still be a broker's passing trouble (UNKNOWN_SERVER_ERROR) or a setting that
/// refuses every record: replaying keeps the order for those; the bound keeps one
/// record from holding the journal for ever (an allow-list alone once did exactly that,
/// rebuilding and re-sending what followed it while the journal filled).
const UNKNOWN_ERROR_STRIKES: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Sent,
    DeadLettering,
    /// Refused for good and not (yet) in the parked store: holds the watermark.
    Held,
    Done,
}

/// In-flight records by their real sequence numbers (ascending, gaps allowed); the
/// contiguous done prefix is releasable.
#[derive(Default)]
struct Tracker {
    slots: VecDeque<(u64, Slot)>,
    /// Beside each slot: when it was handed to the producer and when its PUBLISH
    /// reached the gateway (ms since epoch), for the latency histograms; and its topic
    /// (an index into the pump's [`Topics`]), for the silent-producer watchdog's probe.
    sent: VecDeque<(Instant, u64, u16)>,
}

impl Tracker {
    fn push(&mut self, seq: u64, received_at_ms: u64, topic: u16) {
        debug_assert!(self.slots.back().is_none_or(|(s, _)| *s < seq));
        self.slots.push_back((seq, Slot::Sent));
        self.sent.push_back((Instant::now(), received_at_ms, topic));
    }
    fn sent_at(&self, seq: u64) -> Option<(Instant, u64)> {
        let i = self.slots.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        self.sent.get(i).map(|&(at, received, _)| (at, received))
    }
    fn slot(&mut self, seq: u64) -> Option<&mut Slot> {
        let i = self.slots.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        self.slots.get_mut(i).map(|(_, slot)| slot)
    }
    /// Pops done records; returns the new release watermark (the last popped) if it moved.
    fn advance(&mut self) -> Option<u64> {
        let mut last = None;
        while let Some((seq, Slot::Done)) = self.slots.front() {
            last = Some(*seq);
            self.slots.pop_front();
            self.sent.pop_front();
        }
        last
    }
    fn len(&self) -> usize {
        self.slots.len()
    }
    /// Where the oldest record waiting for its delivery report goes: its topic's index,
    /// or `None` for a dead-letter write.
    fn oldest_waiting(&self) -> Option<Option<u16>> {
        self.slots
            .iter()
            .zip(&self.sent)
            .find_map(|((_, slot), &(_, _, topic))| match slot {
                Slot::Sent => Some(Some(topic)),
                Slot::DeadLettering => Some(None),
                _ => None,
            })
    }
    /// Records waiting for a delivery report.
    fn unconfirmed(&self) -> usize {
        self.slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Sent | Slot::DeadLettering))
            .count()
    }
}

/// The Kafka topics records went to, each once (a handful: the routes' and the event
/// topics), so that the tracker keeps a 2-byte index per record instead of a name.
#[derive(Default)]
struct Topics(Vec<String>);

impl Topics {
    /// Index kept for a destination the tracker cannot name.
    const UNKNOWN: u16 = u16::MAX;

    fn index(&mut self, topic: &str) -> u16 {
        if let Some(i) = self.0.iter().position(|t| t == topic) {
            return i as u16;
        }
        if self.0.len() >= Self::UNKNOWN as usize {
            return Self::UNKNOWN;
        }
        self.0.push(topic.to_string());
        (self.0.len() - 1) as u16
    }

    fn name(&self, index: u16) -> Option<&str> {
        self.0.get(index as usize).map(String::as_str)
    }
}

/// Whether librdkafka knows `key` and accepts `value` for it, checked at config load
/// so that a typo or a bad value is refused naming the key instead of failing the bridge
/// once the gateway runs. (Properties that are valid alone but cannot work together, or
/// need something this build lacks, are still found when the client is created: the
/// bridge then reports `failed` with librdkafka's reason.) The message is librdkafka's.
///
/// Callers skip it when `plugin.library.paths` is set: plugins add properties of their
/// own, and loading them belongs to the bridge, not to every config load.
pub fn check_property(key: &str, value: &str) -> Result<(), String> {
    match ClientConfig::new().set(key, value).create_native_config() {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(_, why, _, _)) => Err(why),
        Err(e) => Err(e.to_string()),
    }
}

/// What every Kafka client of the gateway starts from. `ssl.ca.location = probe`: the
/// OpenSSL compiled into librdkafka (rdkafka's `ssl-vendored`) looks for CA certificates
/// under its own build prefix, not where the system keeps them, so without this a broker
/// with a public certificate (a managed Kafka) fails verification unless the operator
/// names the CA file. `probe` searches the usual system locations; used only over TLS,
/// and `[kafka.properties]` (applied after) may set a file instead.
pub fn base_config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("ssl.ca.location", "probe");
    c
}

/// Builds the librdkafka configuration; our safety settings first, operator properties
/// last (they may add SASL/SSL but should not weaken acks or idempotence).
pub fn client_config(cfg: &ProducerConfig) -> ClientConfig {
    let mut c = base_config();
    c.set("bootstrap.servers", &cfg.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("message.timeout.ms", "0")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.size", cfg.batch_bytes.to_string())
        .set(
            "queue.buffering.max.messages",
            (cfg.max_inflight + 1024).to_string(),
        )
        .set("retry.backoff.ms", "100")
        .set("retry.backoff.max.ms", "2000")
        .set("reconnect.backoff.max.ms", "2000")
        .set("client.id", format!("edge-gateway-{}", cfg.gateway_id));
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Runs the pipeline until `shutdown`; then waits for what is in flight until the
/// shutdown deadline, never later. Errors end it (see [`crate::supervisor`]).
pub async fn run<J: Journal>(
    journal: Arc<J>,
    routes: Arc<Routes>,
    cfg: ProducerConfig,
    status: Arc<BridgeStatus>,
    control: BridgeControl,
    shutdown: Shutdown,
) -> Result<(), BridgeError> {
    info!(bootstrap = %cfg.bootstrap, "kafka bridge: starting");
    let store = ParkedStore::open(&cfg.parked_dir, cfg.max_parked)?;
    status.parked_now.set(store.len() as i64);
    // One pipeline at a time holds the control queue (a restarted one waits for the old).
    let mut commands = control.rx.lock().await;
    // How long a silent producer is given before it is rebuilt; doubles while rebuilt
    // producers hear nothing either (a broker refusing every produce with a retriable
    // error answers metadata too: rebuilding it every minute would only churn).
    let mut stall_after = cfg.stall_rebuild;
    // Pause between rebuilds; doubles while rebuilt producers confirm nothing (a cause
    // that outlives the producer, such as a revoked authorisation, must not spin).
    let mut rebuild_wait = REBUILD_WAIT_MIN;
    let mut strikes = (0, 0);
    loop {
        let reports = Arc::new(Reports::default());
        let ctx = Ctx {
            reports: reports.clone(),
            status: status.clone(),
        };
        let producer: ThreadedProducer<Ctx> = client_config(&cfg).create_with_context(ctx)?;
        let mut pump = Pump::new(
            journal.clone(),
            routes.clone(),
            &cfg,
            status.clone(),
            reports,
            &producer,
            &store,
        );
        pump.stall_after = stall_after;
        pump.strikes = strikes;
        let caught = CatchPanic(Box::pin(pump.run(&shutdown, &mut commands))).await;
        let outcome = match caught {
            Ok(outcome) => outcome,
            Err(panic) => {
                // Left to the unwind, the producer would be destroyed on this runtime
                // worker, with no bound (a destroy with records in flight to a broker
                // that does not answer can block for ever, and the worker's sessions
                // with it). The supervisor then sees the panic as before.
                drop(pump);
                dispose(producer, Instant::now() + DISPOSE_BOUND, &status).await;
                std::panic::resume_unwind(panic);
            }
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                pump.finish_redrives(true);
                drop(pump);
                // Bounded like a rebuild's: the supervisor restarts the pipeline after
                // this returns, and a wedged destroy must not hold that restart.
                dispose(producer, Instant::now() + DISPOSE_BOUND, &status).await;
                return Err(e);
            }
        };
        match outcome {
            Exit::Shutdown => {
                let deadline = shutdown.deadline_or_now();
                while (pump.tracker.unconfirmed() > 0 || !pump.redriving.is_empty())
                    && Instant::now() < deadline
                {
                    let _ = tokio::time::timeout_at(
                        deadline.min(Instant::now() + Duration::from_millis(50)),
                        pump.reports.notify.notified(),
                    )
                    .await;
                    pump.absorb_reports();
                    // Release as confirmations arrive, so a restart re-sends less.
                    if let Some(w) = pump.tracker.advance() {
                        pump.journal.release(w);
                    }
                }
                let unconfirmed = pump.tracker.len();
                pump.finish_redrives(true);
                drop(pump);
                dispose(producer, deadline, &status).await;
                info!(
                    unconfirmed,
                    "kafka bridge: stopped; unconfirmed records stay in the journal"
                );
                return Ok(());
            }
            Exit::Rebuild { why, stalled } => {
                status.producer_rebuilds.inc();
                status.set_state(State::Degraded);
                status.set_error(why.clone());
                warn!(reason = %why, "kafka bridge: rebuilding the producer, replaying from the release watermark");
                stall_after = if stalled && !pump.heard_back {
                    (stall_after * 2).min(STALL_REBUILD_MAX.max(cfg.stall_rebuild))
                } else {
                    cfg.stall_rebuild
                };
                strikes = pump.strikes;
                rebuild_wait = if pump.heard_back {
                    REBUILD_WAIT_MIN
                } else {
                    (rebuild_wait * 2).min(REBUILD_WAIT_MAX)
                };
                pump.finish_redrives(true);
                drop(pump);
                // A wedged producer's destroy may never return: give it a bound, and let
                // it finish in the background (it was purged: it sends nothing more).
                dispose(producer, Instant::now() + DISPOSE_BOUND, &status).await;
                tokio::select! {
                    _ = shutdown.requested() => return Ok(()),
                    _ = tokio::time::sleep(rebuild_wait) => {}
                }
            }
        }
    }
}

/// A future whose panic is caught and returned (as [`std::panic::catch_unwind`] does for
/// a closure), so that the caller can dispose of what the future borrowed.
struct CatchPanic<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchPanic<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// Whether a new client with the producer's settings is served metadata for `topic`
/// with a leader for every partition (without a topic: by any broker), within
/// [`PROBE_TIMEOUT`]; runs off the async threads, the answer comes on the channel.
fn leaders_answer(config: ClientConfig, topic: Option<String>) -> oneshot::Receiver<Result<String, String>> {
    let (tx, rx) = oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let answer = config
            .create::<BaseProducer>()
            .map_err(|e| e.to_string())
            .and_then(|client| served(&client, topic.as_deref()));
        let _ = tx.send(answer);
    });
    rx
}

fn served(client: &BaseProducer, topic: Option<&str>) -> Result<String, String> {
    let md = client
        .client()
        .fetch_metadata(topic, PROBE_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let Some(topic) = topic else {
        return match md.brokers().len() {
            0 => Err("no broker in the metadata".into()),
            n => Ok(format!("{n} broker(s)")),
        };
    };
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("no metadata for {topic}"))?;
    if let Some(e) = t.error() {
        return Err(format!("{topic}: {e:?}"));
    }
    if t.partitions().is_empty() {
        return Err(format!("{topic}: no partitions"));
    }
    for p in t.partitions() {
        if p.leader() < 0 || p.error().is_some() {
            return Err(format!(
                "{topic} partition {} has no leader ({:?})",
                p.id(),
                p.error()
            ));
        }
    }
    Ok(format!(
        "{topic}: {} partitions with a leader",
        t.partitions().len()
    ))
}

/// Purges and destroys a producer off the async threads (librdkafka's destroy joins its
/// threads and flushes for up to 500 ms); waits for it at most until `deadline`. One left
/// running past it is counted in `gateway_bridge_producers_lingering` until it returns.
async fn dispose(producer: ThreadedProducer<Ctx>, deadline: Instant, status: &BridgeStatus) {
    // The purge waits for librdkafka's broker threads too: off the async threads with
    // the destroy, so that a wedged producer cannot hold a runtime worker.
    let mut task = tokio::task::spawn_blocking(move || {
        producer.purge(PurgeConfig::default().queue().inflight());
        drop(producer)
    });
    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
        warn!("kafka bridge: the old producer did not stop in time; left to finish in the background (it was purged: it sends nothing new)");
        let lingering = status.producers_lingering.clone();
        lingering.inc();
        tokio::spawn(async move {
            let _ = task.await;
            lingering.dec();
            info!("kafka bridge: an old producer left in the background finished stopping");
        });
    }
}

enum Exit {
    Shutdown,
    /// `stalled`: by the silent-producer watchdog ([`Pump::stalled`]).
    Rebuild {
        why: String,
        stalled: bool,
    },
}

/// Longest wait between rebuilds of a producer that hears nothing back.
const STALL_REBUILD_MAX: Duration = Duration::from_secs(16 * 60);

/// Pause before a rebuilt producer starts, after one that confirmed something...
const REBUILD_WAIT_MIN: Duration = Duration::from_millis(500);
/// ...and at most, after rebuilds that confirmed nothing.
const REBUILD_WAIT_MAX: Duration = Duration::from_secs(30);

/// How long a rebuild waits for the old producer's destroy.
const DISPOSE_BOUND: Duration = Duration::from_secs(10);

/// How long the brokers must answer a new client while the producer stays silent
/// before it is rebuilt (at most; `stall_after` if shorter).
const STALL_GRACE: Duration = Duration::from_secs(45);

/// The broker probe's metadata timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A re-drive request being answered.
struct RedriveOp {
    reply: RedriveReply,
    waiting: HashSet<u64>,
    report: RedriveReport,
    deadline: Instant,
}

struct Pump<'p, J> {
    journal: Arc<J>,
    routes: Arc<Routes>,
    cfg: &'p ProducerConfig,
    status: Arc<BridgeStatus>,
    reports: Arc<Reports>,
    producer: &'p ThreadedProducer<Ctx>,
    store: &'p ParkedStore,
    tracker: Tracker,
    reader: crate::journal::JournalReader,
    /// The buffer batches are read into, kept between batches (up to [`KEPT_BATCH`]).
    batch: Vec<Record>,
    failures: Vec<(u64, KafkaError)>,
    rebuild: Option<String>,
    /// Records refused for good that could not be parked (store full or failing), with
    /// the reason; retried every `STALLED_RETRY`.
    held: Vec<(u64, String)>,
    held_retry_at: Instant,
    /// Parked records produced again and awaiting their delivery report.
    redriving: HashSet<u64>,
    ops: Vec<RedriveOp>,
    /// When a delivery report last arrived (or nothing was in flight): records in flight
    /// with no report for [`UNCONFIRMED_ALARM`] mean Kafka is not taking them (a deleted
    /// topic, a broker that accepts connections but does not answer), which librdkafka
    /// reports through no error callback.
    last_progress: Instant,
    unconfirmed_alarm: bool,
    /// Silence after which the producer is rebuilt if the brokers answer a fresh client.
    stall_after: Duration,
    /// When the brokers may be probed next (at most once per `stall_after`).
    next_probe: Instant,
    /// Whether the release watermark moved in this producer's life (delivery reports
    /// alone do not count: records of healthy partitions keep coming while one partition
    /// without a leader holds the watermark, and rebuilding for that would only re-send).
    heard_back: bool,
    /// The record that last failed with an unlisted error, and how many producers in a
    /// row it failed under (carried over rebuilds; see [`UNKNOWN_ERROR_STRIKES`]).
    strikes: (u64, u32),
    /// Since when a new client has got metadata while this producer stayed silent.
    answering_since: Option<Instant>,
    /// The topics of the records in the tracker.
    topics: Topics,
    /// The broker probe running, if any (it never holds up the pump), and when it was
    /// launched.
    probe: Option<(Instant, oneshot::Receiver<Result<String, String>>)>,
}

/// Largest read buffer the pump keeps between batches (records; a larger one, from a
/// backlog, is dropped after use).
const KEPT_BATCH: usize = 1024;

/// Records in flight without any delivery report for this long mark the bridge degraded.
const UNCONFIRMED_ALARM: Duration = Duration::from_secs(3);

enum Sent {
    Queued,
    /// Shutdown was requested while the producer queue was full: not sent, not tracked.
    Abandoned,
}

impl<'p, J: Journal> Pump<'p, J> {
    fn new(
        journal: Arc<J>,
        routes: Arc<Routes>,
        cfg: &'p ProducerConfig,
        status: Arc<BridgeStatus>,
        reports: Arc<Reports>,
        producer: &'p ThreadedProducer<Ctx>,
        store: &'p ParkedStore,
    ) -> Self {
        let start = journal.stats().released_seq + 1;
        let reader = journal.reader(start);
        Pump {
            journal,
            routes,
            cfg,
            status,
            reports,
            producer,
            store,
            tracker: Tracker::default(),
            reader,
            batch: Vec::new(),
            failures: Vec::new(),
            rebuild: None,
            held: Vec::new(),
            held_retry_at: Instant::now(),
            redriving: HashSet::new(),
            ops: Vec::new(),
            last_progress: Instant::now(),
            unconfirmed_alarm: false,
            stall_after: cfg.stall_rebuild,
            next_probe: Instant::now(),
            heard_back: false,
            strikes: (0, 0),
            answering_since: None,
            topics: Topics::default(),
            probe: None,
        }
    }

    async fn run(
        &mut self,
        shutdown: &Shutdown,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<Exit, BridgeError> {
        let mut durable = self.journal.durable();
        loop {
            self.absorb_reports();
            if self.reports.fatal.load(Ordering::Relaxed) {
                let why = self
                    .producer
                    .client()
                    .fatal_error()
                    .map(|(c, s)| format!("{c:?}: {s}"));
                return Ok(Exit::Rebuild {
                    why: why.unwrap_or_else(|| "fatal producer error".into()),
                    stalled: false,
                });
            }
            if let Some(why) = self.rebuild.take() {
                return Ok(Exit::Rebuild { why, stalled: false });
            }
            self.handle_failures()?;
            self.retry_held()?;
            if let Some(w) = self.tracker.advance() {
                self.journal.release(w);
                self.heard_back = true;
            }
            self.finish_redrives(false);
            self.status.in_flight.set(self.tracker.len() as i64);
            self.watch_progress();
            if shutdown.is_requested() {
                return Ok(Exit::Shutdown);
            }
            if let Some(why) = self.stalled() {
                return Ok(Exit::Rebuild { why, stalled: true });
            }
            if let Ok(cmd) = commands.try_recv() {
                self.command(cmd, shutdown).await;
                continue;
            }
            let room = if self.status.paused() {
                0
            } else {
                self.cfg.max_inflight.saturating_sub(self.tracker.len())
            };
            if room > 0 {
                let mut batch = std::mem::take(&mut self.batch);
                self.reader.next_batch_into(&mut batch, room.min(4096))?;
                let read = !batch.is_empty();
                for rec in &batch {
                    if let Sent::Abandoned = self.send(rec, shutdown).await {
                        break;
                    }
                    // Draining a backlog (after an outage: up to `max_inflight` records
                    // without an await that waits) must not hold a runtime worker for
                    // hundreds of ms: the sessions on it would wait, PUBACKs with them.
                    // The task's coop budget yields every so many records.
                    tokio::task::coop::consume_budget().await;
                }
                batch.clear();
                if batch.capacity() <= KEPT_BATCH {
                    self.batch = batch;
                }
                if read {
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.requested() => {}
                _ = self.reports.notify.notified() => {}
                cmd = commands.recv() => {
                    if let Some(cmd) = cmd {
                        self.command(cmd, shutdown).await;
                    }
                }
                _ = durable.changed(), if room > 0 => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Tells the truth about a pipeline that sends but hears nothing back.
    fn watch_progress(&mut self) {
        // Only records waiting for Kafka count (not held or done slots behind a held one).
        let unconfirmed = self.tracker.unconfirmed();
        if unconfirmed == 0 {
            self.last_progress = Instant::now();
            self.unconfirmed_alarm = false;
            return;
        }
        let silent = self.last_progress.elapsed();
        if silent >= UNCONFIRMED_ALARM && !self.unconfirmed_alarm {
            self.unconfirmed_alarm = true;
            let why = format!(
                "{} records in flight and no delivery report for {} s (topic missing, or a broker that does not answer); the journal keeps them",
                unconfirmed,
                silent.as_secs()
            );
            if self.status.state() == State::Connected || self.status.state() == State::Connecting {
                self.status.set_state(State::Degraded);
            }
            warn!(reason = %why, "kafka bridge: deliveries stalled");
            self.status.set_error(why);
        }
    }

    /// The silent-producer watchdog. Records in flight, no delivery report for
    /// `stall_after`, and yet a new client with the same settings keeps getting metadata
    /// from the brokers for a grace period: this producer is wedged, not waiting for
    /// Kafka. (Seen twice in CI on a loaded machine: after a broker was frozen past the
    /// request timeouts and thawed, the idempotent producer reported nothing for the
    /// test's whole 120 s, with no error either; the cause inside librdkafka is not
    /// known.) A rebuilt producer replays from the release watermark: at-least-once, and
    /// consumers drop replays by `gateway.seq`. Returns the reason when the producer
    /// should be rebuilt.
    fn stalled(&mut self) -> Option<String> {
        // The silence first: counting the unconfirmed records walks the tracker.
        let silent = self.last_progress.elapsed();
        if self.stall_after.is_zero() || silent < self.stall_after {
            return None;
        }
        let unconfirmed = self.tracker.unconfirmed();
        if unconfirmed == 0 {
            return None;
        }
        // Brokers that just came back get `grace` to be found by this producer too (its
        // reconnect backoff, a connection set-up or request timing out on a dead
        // connection) before it is called wedged: a probe launched `grace` after another
        // one was answered must be answered too.
        let grace = self.stall_after.min(STALL_GRACE);
        if let Some((launched, probe)) = &mut self.probe {
            let launched = *launched;
            let answer = match probe.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return None,
                Err(oneshot::error::TryRecvError::Closed) => Err("probe task ended".to_string()),
                Ok(answer) => answer,
            };
            self.probe = None;
            let answered = Instant::now();
            match (answer, self.answering_since) {
                (Err(e), _) => {
                    self.answering_since = None;
                    debug!(reason = %e, "kafka bridge: stalled, and a new client is not served either; not rebuilding");
                }
                // Served by the time the answer came (a probe launched during an outage
                // may succeed at its end): the grace runs from here.
                (Ok(_), None) => {
                    self.answering_since = Some(answered);
                    self.next_probe = answered + grace;
                }
                (Ok(served), Some(since)) if launched.saturating_duration_since(since) >= grace => {
                    return Some(format!(
                        "{unconfirmed} records in flight and no delivery report for {} s while a new client was served ({served}) for {} s: the producer is rebuilt",
                        silent.as_secs(),
                        launched.saturating_duration_since(since).as_secs()
                    ));
                }
                (Ok(_), Some(_)) => {}
            }
        }
        let now = Instant::now();
        if self.probe.is_none() && now >= self.next_probe {
            self.next_probe = now + grace;
            // The topic the oldest waiting record goes to: its partitions must all have a
            // leader, or the silence is Kafka's (a partition without a leader holds the
            // watermark and, once `max_inflight` is reached, everything behind it).
            // Without a name for it, the brokers answering at all is the test.
            let topic = match self.tracker.oldest_waiting() {
                Some(Some(i)) => self.topics.name(i).map(str::to_string),
                Some(None) => Some(self.cfg.dead_letter_topic.clone()).filter(|t| !t.is_empty()),
                None => None,
            };
            let mut config = client_config(self.cfg);
            config.set("enable.idempotence", "false");
            self.probe = Some((now, leaders_answer(config, topic)));
        }
        None
    }

    async fn command(&mut self, cmd: Command, shutdown: &Shutdown) {
        match cmd {
            Command::Redrive { seq, reply } => self.redrive(seq, reply, shutdown).await,
        }
    }

    fn absorb_reports(&mut self) {
        let reports = std::mem::take(&mut *self.reports.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let mut to_park = Vec::new();
        if !reports.is_empty() {
            self.last_progress = Instant::now();
            self.unconfirmed_alarm = false;
            // A probe launched during the silence answers an old question.
            self.answering_since = None;
            self.probe = None;
        }
        for (opaque, outcome) in reports {
            if opaque & REDRIVE_BIT != 0 {
                self.redrive_report(opaque & !REDRIVE_BIT, outcome);
                continue;
            }
            let seq = opaque;
            let Some(slot) = self.tracker.slot(seq) else {
                continue;
            };
            match (outcome, slot.clone()) {
                (Ok(()), Slot::DeadLettering) => {
                    *slot = Slot::Done;
                    self.status.dead_lettered.inc();
                }
                (Ok(()), _) => {
                    *slot = Slot::Done;
                    self.status.delivered.inc();
                    if let Some((sent_at, received_at_ms)) = self.tracker.sent_at(seq) {
                        self.status
                            .delivery_latency
                            .observe(sent_at.elapsed().as_secs_f64());
                        self.status.record_age.observe(crate::metrics::secs_between_ms(
                            received_at_ms,
                            crate::journal::now_ms(),
                        ));
                    }
                    self.status.set_state(State::Connected);
                }
                (Err(e), Slot::DeadLettering) => {
                    to_park.push((seq, format!("dead-letter write failed: {e}")))
                }
                (Err(e), _) if producer_failed(&e, self.reports.fatal.load(Ordering::Relaxed)) => {
                    // Re-sending this one record alone would reorder: replay all.
                    self.rebuild
                        .get_or_insert_with(|| format!("record {seq} failed: {e}"));
                }
                (Err(e), _) if refused_for_good(&e) => self.failures.push((seq, e)),
                // Rebuilding already: this record is replayed with the rest.
                (Err(_), _) if self.rebuild.is_some() => {}
                (Err(e), _) => {
                    if self.strikes.0 != seq {
                        self.strikes = (seq, 0);
                    }
                    self.strikes.1 += 1;
                    if self.strikes.1 >= UNKNOWN_ERROR_STRIKES {
                        self.failures.push((seq, e));
                    } else {
                        self.rebuild = Some(format!(
                            "record {seq} failed: {e} (failure {} of {UNKNOWN_ERROR_STRIKES} before it is taken as refused)",
                            self.strikes.1
                        ));
                    }
                }
            }
        }
        for (seq, why) in to_park {
            // A read error here surfaces on the next `handle_failures` read as well.
            if let Err(e) = self.park(seq, None, &why) {
                self.rebuild
                    .get_or_insert_with(|| format!("parking record {seq}: {e}"));
            }
        }
    }

    /// The record `seq` from the journal; `None` when it is no longer there (evicted by
    /// the `drop_oldest` policy since it was read, hence already released).
    fn read_record(&self, seq: u64) -> Result<Option<Record>, BridgeError> {
        Ok(self
            .journal
            .reader(seq)
            .next_batch(1)?
            .into_iter()
            .next()
            .filter(|r| r.seq == seq))
    }

    /// Moves a record Kafka refused for good into the parked store, then marks it done so
    /// the watermark moves past it. If the store is full or failing, holds it (slot stays
    /// open, the watermark stops before it) and retries later. Counted and logged.
    fn park(&mut self, seq: u64, rec: Option<Record>, why: &str) -> Result<(), BridgeError> {
        self.status.parked.inc();
        self.park_or_hold(seq, rec, why)
    }

    fn park_or_hold(&mut self, seq: u64, rec: Option<Record>, why: &str) -> Result<(), BridgeError> {
        let rec = match rec {
            Some(r) => Some(r),
            None => self.read_record(seq)?,
        };
        let Some(rec) = rec else {
            warn!(
                seq,
                reason = why,
                "kafka bridge: refused record left the journal meanwhile (drop_oldest); not parked"
            );
            self.mark(seq, Slot::Done);
            return Ok(());
        };
        match self.store.park(&rec, why) {
            Ok(()) => {
                self.mark(seq, Slot::Done);
                self.status.parked_now.set(self.store.len() as i64);
                self.status.set_error(format!("record {seq} parked: {why}"));
                error!(
                    seq,
                    client_id = %rec.entry.client_id,
                    reason = why,
                    parked_dir = %self.store.dir().display(),
                    "kafka bridge: record refused by Kafka parked in the parked store; forwarding continues; fix the cause and re-drive it"
                );
            }
            Err(e) => {
                self.mark(seq, Slot::Held);
                self.status.set_error(format!(
                    "record {seq} refused ({why}) and could not be parked: {e}"
                ));
                error!(
                    seq,
                    reason = why,
                    error = %e,
                    "kafka bridge: record refused by Kafka could NOT be parked; it is held in the journal and forwarding STALLS once kafka.max_inflight records passed it; re-drive or clear parked records"
                );
                self.held.push((seq, why.to_string()));
                self.held_retry_at = Instant::now() + STALLED_RETRY;
            }
        }
        Ok(())
    }

    fn mark(&mut self, seq: u64, to: Slot) {
        if let Some(slot) = self.tracker.slot(seq) {
            *slot = to;
        }
    }

    /// Retries parking held records once the store may have room.
    fn retry_held(&mut self) -> Result<(), BridgeError> {
        if self.held.is_empty()
            || Instant::now() < self.held_retry_at
            || self.store.len() >= self.store.capacity()
        {
            return Ok(());
        }
        for (seq, why) in std::mem::take(&mut self.held) {
            self.park_or_hold(seq, None, &why)?;
        }
        Ok(())
    }

    fn handle_failures(&mut self) -> Result<(), BridgeError> {
        for (seq, e) in std::mem::take(&mut self.failures) {
            let dlq = &self.cfg.dead_letter_topic;
            let Some(rec) = self.read_record(seq)? else {
                self.park(seq, None, &e.to_string())?;
                continue;
            };
            if dlq.is_empty() {
                self.park(seq, Some(rec), &e.to_string())?;
                continue;
            }
            warn!(seq, error = %e, topic = %dlq, "kafka bridge: record refused by Kafka; writing it to the dead-letter topic");
            self.mark(seq, Slot::DeadLettering);
            let key = rec.entry.client_id.clone();
            let headers = headers(&rec, &self.cfg.gateway_id, &self.cfg.journal_id).insert(Header {
                key: "gateway.error",
                value: Some(&e.to_string()),
            });
            let record = BaseRecord::with_opaque_to(dlq, seq as usize)
                .key(&key)
                .payload(&rec.entry.payload[..])
                .headers(headers)
                .timestamp(rec.entry.received_at_ms as i64);
            if let Err((e, _)) = self.producer.send(record) {
                self.park(seq, Some(rec), &format!("dead-letter write failed: {e}"))?;
            }
        }
        Ok(())
    }

    /// Produces `rec`; tracks it unless shutdown stopped the send (then it stays in the
    /// journal, unreleased, for the next start).
    async fn send(&mut self, rec: &Record, shutdown: &Shutdown) -> Sent {
        let e = &rec.entry;
        let Some(dest) = self.routes.destination(e) else {
            self.tracker.push(rec.seq, e.received_at_ms, Topics::UNKNOWN);
            let err = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopic);
            self.failures.push((rec.seq, err));
            return Sent::Queued;
        };
        let topic = self.topics.index(&dest.topic);
        loop {
            let record = BaseRecord::with_opaque_to(&dest.topic, rec.seq as usize)
                .key(&dest.key)
                .payload(&e.payload[..])
                .headers(headers(rec, &self.cfg.gateway_id, &self.cfg.journal_id))
                .timestamp(e.received_at_ms as i64);
            match self.producer.send(record) {
                Ok(()) => {
                    self.tracker.push(rec.seq, e.received_at_ms, topic);
                    return Sent::Queued;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if !self.wait_for_queue(shutdown).await {
                        return Sent::Abandoned;
                    }
                }
                Err((err, _)) => {
                    self.tracker.push(rec.seq, e.received_at_ms, topic);
                    if producer_failed(&err, self.reports.fatal.load(Ordering::Relaxed)) {
                        // The fatal flag may not be up yet: this record is replayed by the
                        // rebuild, not parked beside it.
                        self.rebuild
                            .get_or_insert_with(|| format!("record {} not sent: {err}", rec.seq));
                    } else {
                        self.failures.push((rec.seq, err));
                    }
                    return Sent::Queued;
                }
            }
        }
    }

    /// librdkafka's queue is full: waits for delivery reports. False once shutdown is
    /// requested (stop sending; never spin).
    async fn wait_for_queue(&mut self, shutdown: &Shutdown) -> bool {
        if shutdown.is_requested() {
            return false;
        }
        tokio::select! {
            _ = self.reports.notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = shutdown.requested() => return false,
        }
        self.absorb_reports();
        true
    }

    /// Starts re-driving parked records; the answer is sent by `finish_redrives`.
    async fn redrive(&mut self, seq: Option<u64>, reply: RedriveReply, shutdown: &Shutdown) {
        let seqs = match seq {
            Some(s) => vec![s],
            None => match self.store.seqs() {
                Ok(v) => v,
                Err(e) => {
                    let _ = reply.send(Err(RedriveError::Store(e.to_string())));
                    return;
                }
            },
        };
        info!(records = seqs.len(), "kafka bridge: re-driving parked records");
        self.ops.push(RedriveOp {
            reply,
            waiting: HashSet::new(),
            report: RedriveReport::default(),
            deadline: Instant::now() + REDRIVE_WAIT,
        });
        let op = self.ops.len() - 1;
        for s in seqs {
            let outcome = self.redrive_one(s, shutdown).await;
            let report = &mut self.ops[op];
            match outcome {
                Ok(()) => {
                    report.waiting.insert(s);
                    report.report.sent += 1;
                }
                Err(reason) => report.report.failed.push(RedriveFailure { seq: s, reason }),
            }
        }
        self.finish_redrives(false);
    }

    async fn redrive_one(&mut self, seq: u64, shutdown: &Shutdown) -> Result<(), String> {
        if self.redriving.contains(&seq) {
            return Err("already being re-driven".into());
        }
        let rec = match self.store.load(seq) {
            Ok(Some((rec, _))) => rec,
            Ok(None) => return Err("not parked".into()),
            Err(e) => return Err(e.to_string()),
        };
        let e = &rec.entry;
        let Some(dest) = self.routes.destination(e) else {
            return Err("no destination: no route matches its MQTT topic (kafka.unmatched = refuse), or its event topic is not configured".into());
        };
        loop {
            let headers = headers(&rec, &self.cfg.gateway_id, &self.cfg.journal_id).insert(Header {
                key: "gateway.redrive",
                value: Some("true"),
            });
            let record = BaseRecord::with_opaque_to(&dest.topic, (seq | REDRIVE_BIT) as usize)
                .key(&dest.key)
                .payload(&e.payload[..])
                .headers(headers)
                .timestamp(e.received_at_ms as i64);
            match self.producer.send(record) {
                Ok(()) => {
                    self.redriving.insert(seq);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if !self.wait_for_queue(shutdown).await {
                        return Err("not sent: the gateway is shutting down".into());
                    }
                }
                Err((err, _)) => return Err(err.to_string()),
            }
        }
    }

    fn redrive_report(&mut self, seq: u64, outcome: Result<(), KafkaError>) {
        if !self.redriving.remove(&seq) {
            return;
        }
        let result = match outcome {
            Ok(()) => {
                match self.store.remove(seq) {
                    Ok(_) => {
                        self.status.redriven.inc();
                        info!(seq, "kafka bridge: parked record re-driven and confirmed; removed from the parked store");
                        Ok(())
                    }
                    Err(e) => Err(format!(
                        "delivered, but its parked file could not be removed: {e}"
                    )),
                }
            }
            Err(e) => {
                warn!(seq, error = %e, "kafka bridge: re-driven record refused again; it stays parked");
                Err(e.to_string())
            }
        };
        self.status.parked_now.set(self.store.len() as i64);
        for op in &mut self.ops {
            if op.waiting.remove(&seq) {
                match &result {
                    Ok(()) => op.report.delivered += 1,
                    Err(why) => op.report.failed.push(RedriveFailure {
                        seq,
                        reason: why.clone(),
                    }),
                }
            }
        }
    }

    /// Answers re-drives that are complete or past their wait (`all`: every one, as the
    /// pipeline stops).
    fn finish_redrives(&mut self, all: bool) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.ops.len() {
            let op = &self.ops[i];
            if all || op.waiting.is_empty() || now >= op.deadline {
                let mut op = self.ops.swap_remove(i);
                op.report.pending = op.waiting.len();
                op.report.failed.sort_by_key(|f| f.seq);
                let _ = op.reply.send(Ok(op.report));
            } else {
                i += 1;
            }
        }
    }
}

/// A handed-over command is a command record like any other (headers `qos`,
/// `expiry_secs`, `correlation_id`, ... are its user properties), plus where it was
/// journaled, so that a replay can be recognised.
fn command_headers(rec: &Record, gateway_id: &str, journal_id: &str) -> OwnedHeaders {
    let e = &rec.entry;
    let qos = e.qos.to_string();
    let h = OwnedHeaders::new_with_capacity(4 + e.user_properties.len()).insert(Header {
        key: "qos",
        value: Some(&qos),
    });
    let mut h = provenance(h, rec, gateway_id, journal_id);
    for (k, v) in &e.user_properties {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    h
}

/// Where a record was journaled: `gateway.id`, `gateway.journal`, `gateway.seq` (with
/// the last two a consumer drops replays exactly).
fn provenance(h: OwnedHeaders, rec: &Record, gateway_id: &str, journal_id: &str) -> OwnedHeaders {
    let seq = rec.seq.to_string();
    h.insert(Header {
        key: "gateway.id",
        value: Some(gateway_id),
    })
    .insert(Header {
        key: "gateway.journal",
        value: Some(journal_id),
    })
    .insert(Header {
        key: "gateway.seq",
        value: Some(&seq),
    })
}

/// Kafka headers carried by every record: where it came from (gateway, journal and
/// sequence, for exact de-duplication) and the MQTT 5 metadata.
pub fn headers(rec: &Record, gateway_id: &str, journal_id: &str) -> OwnedHeaders {
    let e = &rec.entry;
    if e.kind == EntryKind::Command {
        return command_headers(rec, gateway_id, journal_id);
    }
    let qos = e.qos.to_string();
    let received = e.received_at_ms.to_string();
    let h = OwnedHeaders::new_with_capacity(8 + e.user_properties.len())
        .insert(Header {
            key: "mqtt.topic",
            value: Some(&e.topic),
        })
        .insert(Header {
            key: "mqtt.client_id",
            value: Some(&e.client_id),
        })
        .insert(Header {
            key: "mqtt.qos",
            value: Some(&qos),
        })
        .insert(Header {
            key: "mqtt.received_at_ms",
            value: Some(&received),
        });
    let mut h = provenance(h, rec, gateway_id, journal_id);
    if let Some(ct) = &e.content_type {
        h = h.insert(Header {
            key: "mqtt.content_type",
            value: Some(ct),
        });
    }
    for (k, v) in &e.user_properties {
        h = h.insert(Header {
            key: &format!("mqtt.user.{k}"),
            value: Some(v),
        });
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipeline's panic is caught where the producer can still be disposed of with a
    /// bound, and what the future borrowed is usable again.
    #[tokio::test]
    async fn a_panic_in_the_pump_is_caught_and_its_borrow_ends() {
        let mut held = vec![1];
        let caught = CatchPanic(Box::pin(async {
            held.push(2);
            tokio::task::yield_now().await;
            if held.len() == 2 {
                panic!("pump bug");
            }
        }))
        .await;
        let panic = caught.expect_err("the panic is returned");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"pump bug"));
        held.push(3);
        assert_eq!(held, [1, 2, 3]);
        assert_eq!(CatchPanic(Box::pin(async { 7 })).await.ok(), Some(7));
    }

    #[test]
    fn tracker_releases_across_sequence_gaps() {
        let mut t = Tracker::default();
        for seq in [3, 4, 10, 11, 40] {
            t.push(seq, 0, 0);
        }
        *t.slot(4).expect("4") = Slot::Done;
        assert_eq!(t.advance(), None, "3 is not done");
        *t.slot(3).expect("3") = Slot::Done;
        *t.slot(10).expect("10") = Slot::Done;
        assert_eq!(t.advance(), Some(10), "done prefix 3, 4, 10 across the gap");
        assert!(t.slot(5).is_none(), "5 was never read (gap)");
        *t.slot(40).expect("40") = Slot::Done;
        assert_eq!(t.advance(), None);
        *t.slot(11).expect("11") = Slot::Done;
        assert_eq!(t.advance(), Some(40));
        assert_eq!(t.len(), 0);
    }
}
