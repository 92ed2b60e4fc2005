//! The producer pipeline: journal → Kafka, in journal order, released on confirmation.
//!
//! * Reads durable records from the journal in sequence order and produces each with an
//!   idempotent producer (`enable.idempotence=true`, `acks=all`, at most 5 requests in
//!   flight per connection), so one vehicle's records (one key, one partition) reach
//!   Kafka in the order the vehicle sent them, across librdkafka's retries.
//! * `message.timeout.ms = 0`: librdkafka retries a retryable failure (broker down, not
//!   enough replicas, request timeout) forever while the journal buffers. A message that
//!   timed out would have to be re-sent behind younger ones, which breaks order.
//! * A record is released in the journal only when it and every record before it have a
//!   successful delivery report (contiguous watermark). Records in flight are bounded by
//!   `max_inflight`; the producer queue is sized to match, and a full queue makes the
//!   pipeline wait for delivery reports (back-pressure by readiness).
//! * Per-record fatal errors (record too large, topic authorisation failed, unknown topic)
//!   go to the dead-letter topic with the error in a header. Without a dead-letter topic,
//!   or when the dead-letter write fails too, the record is *parked*: it stays in the
//!   journal (the release watermark stops before it), `gateway_bridge_parked` counts it and
//!   an error is logged; a restart after the cause is fixed replays from it.
//! * A fatal producer error (idempotence state lost) rebuilds the producer and replays from
//!   the release watermark: duplicates are possible, reordering is not.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::ClientContext;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::journal::{Journal, Record};
use crate::routes::Routes;

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
    /// Where per-record fatal failures go; empty parks them in the journal.
    pub dead_letter_topic: String,
    /// librdkafka properties applied last (SASL, SSL, timeouts...).
    pub properties: BTreeMap<String, String>,
}

/// Pipeline state for the admin API and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting = 0,
    Connected = 1,
    Degraded = 2,
    Down = 3,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Degraded => "degraded",
            State::Down => "down",
        }
    }
}

/// Live counters of the pipeline, shared with the admin API.
#[derive(Debug, Default)]
pub struct BridgeStatus {
    state: AtomicU8,
    pub in_flight: AtomicU64,
    pub delivered: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub parked: AtomicU64,
    /// Errors reported by librdkafka (connection failures, retried requests).
    pub errors: AtomicU64,
    pub producer_rebuilds: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl BridgeStatus {
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            1 => State::Connected,
            2 => State::Degraded,
            3 => State::Down,
            _ => State::Connecting,
        }
    }
    fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("kafka producer configuration: {0}")]
    Config(#[from] KafkaError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

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
        self.status.errors.fetch_add(1, Ordering::Relaxed);
        self.status.set_error(format!("{error}: {reason}"));
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

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        self.reports
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((seq as u64, outcome));
        self.reports.notify.notify_one();
    }
}

/// Errors no retry can fix for this record; everything else is retried by librdkafka.
fn fatal_for_record(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::PolicyViolation
        )
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Sent,
    DeadLettering,
    Parked,
    Done,
}

/// In-flight records in sequence order; the contiguous done prefix is releasable.
struct Tracker {
    base: u64,
    slots: VecDeque<Slot>,
}

impl Tracker {
    fn slot(&mut self, seq: u64) -> Option<&mut Slot> {
        let i = seq.checked_sub(self.base)?;
        self.slots.get_mut(usize::try_from(i).ok()?)
    }
    /// Pops done records; returns the new release watermark if it moved.
    fn advance(&mut self) -> Option<u64> {
        let mut moved = false;
        while self.slots.front() == Some(&Slot::Done) {
            self.slots.pop_front();
            self.base += 1;
            moved = true;
        }
        moved.then(|| self.base - 1)
    }
}

/// Builds the librdkafka configuration; our safety settings first, operator properties
/// last (they may add SASL/SSL but should not weaken acks or idempotence).
pub fn client_config(cfg: &ProducerConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
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

/// Runs the pipeline until `shutdown`; then waits up to `grace` for what is in flight.
pub async fn run<J: Journal>(
    journal: Arc<J>,
    routes: Arc<Routes>,
    cfg: ProducerConfig,
    status: Arc<BridgeStatus>,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), BridgeError> {
    info!(bootstrap = %cfg.bootstrap, "kafka bridge: starting");
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
        );
        let outcome = pump.run(&shutdown).await?;
        match outcome {
            Exit::Shutdown => {
                let deadline = tokio::time::Instant::now() + grace;
                while pump
                    .tracker
                    .slots
                    .iter()
                    .any(|s| *s == Slot::Sent || *s == Slot::DeadLettering)
                    && tokio::time::Instant::now() < deadline
                {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(50), pump.reports.notify.notified()).await;
                    pump.absorb_reports();
                    // Release as confirmations arrive, so a restart re-sends less.
                    if let Some(w) = pump.tracker.advance() {
                        pump.journal.release(w);
                    }
                }
                let unconfirmed = pump.tracker.slots.len();
                producer.purge(PurgeConfig::default().queue().inflight());
                info!(
                    unconfirmed,
                    "kafka bridge: stopped; unconfirmed records stay in the journal"
                );
                return Ok(());
            }
            Exit::Rebuild(why) => {
                status.producer_rebuilds.fetch_add(1, Ordering::Relaxed);
                status.set_state(State::Degraded);
                status.set_error(why.clone());
                warn!(reason = %why, "kafka bridge: rebuilding the producer, replaying from the release watermark");
                producer.purge(PurgeConfig::default().queue().inflight());
                drop(producer);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

enum Exit {
    Shutdown,
    Rebuild(String),
}

struct Pump<'p, J> {
    journal: Arc<J>,
    routes: Arc<Routes>,
    cfg: &'p ProducerConfig,
    status: Arc<BridgeStatus>,
    reports: Arc<Reports>,
    producer: &'p ThreadedProducer<Ctx>,
    tracker: Tracker,
    reader: crate::journal::JournalReader,
    failures: Vec<(u64, KafkaError)>,
    rebuild: Option<String>,
}

impl<'p, J: Journal> Pump<'p, J> {
    fn new(
        journal: Arc<J>,
        routes: Arc<Routes>,
        cfg: &'p ProducerConfig,
        status: Arc<BridgeStatus>,
        reports: Arc<Reports>,
        producer: &'p ThreadedProducer<Ctx>,
    ) -> Self {
        let start = journal.stats().released_seq + 1;
        let reader = journal.reader(start);
        let tracker = Tracker {
            base: reader.position(),
            slots: VecDeque::new(),
        };
        Pump {
            journal,
            routes,
            cfg,
            status,
            reports,
            producer,
            tracker,
            reader,
            failures: Vec::new(),
            rebuild: None,
        }
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> Result<Exit, BridgeError> {
        let mut durable = self.journal.durable();
        loop {
            self.absorb_reports();
            if self.reports.fatal.load(Ordering::Relaxed) {
                let why = self
                    .producer
                    .client()
                    .fatal_error()
                    .map(|(c, s)| format!("{c:?}: {s}"));
                return Ok(Exit::Rebuild(
                    why.unwrap_or_else(|| "fatal producer error".into()),
                ));
            }
            if let Some(why) = self.rebuild.take() {
                return Ok(Exit::Rebuild(why));
            }
            self.handle_failures()?;
            if let Some(w) = self.tracker.advance() {
                self.journal.release(w);
            }
            self.status
                .in_flight
                .store(self.tracker.slots.len() as u64, Ordering::Relaxed);
            if shutdown.is_cancelled() {
                return Ok(Exit::Shutdown);
            }
            let room = self.cfg.max_inflight.saturating_sub(self.tracker.slots.len());
            if room > 0 {
                let batch = self.reader.next_batch(room.min(4096))?;
                if !batch.is_empty() {
                    if self.tracker.slots.is_empty() {
                        self.tracker.base = batch[0].seq;
                    }
                    for rec in &batch {
                        self.send(rec, shutdown).await;
                    }
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {}
                _ = self.reports.notify.notified() => {}
                _ = durable.changed(), if room > 0 => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    fn absorb_reports(&mut self) {
        let reports = std::mem::take(&mut *self.reports.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let mut to_park = Vec::new();
        for (seq, outcome) in reports {
            let Some(slot) = self.tracker.slot(seq) else {
                continue;
            };
            match (outcome, slot.clone()) {
                (Ok(()), Slot::DeadLettering) => {
                    *slot = Slot::Done;
                    self.status.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                (Ok(()), _) => {
                    *slot = Slot::Done;
                    self.status.delivered.fetch_add(1, Ordering::Relaxed);
                    self.status.set_state(State::Connected);
                }
                (Err(e), Slot::DeadLettering) => {
                    to_park.push((seq, format!("dead-letter write failed: {e}")))
                }
                (Err(e), _) if fatal_for_record(&e) => self.failures.push((seq, e)),
                (Err(e), _) => {
                    // Only possible when an operator property re-enabled message timeouts:
                    // re-sending this one record alone would reorder, so replay all.
                    self.rebuild
                        .get_or_insert_with(|| format!("record {seq} failed: {e}"));
                }
            }
        }
        for (seq, why) in to_park {
            self.park(seq, &why);
        }
    }

    /// Keeps the record in the journal: its slot never completes, so the release
    /// watermark stops before it. Counted and logged.
    fn park(&mut self, seq: u64, why: &str) {
        if let Some(slot) = self.tracker.slot(seq) {
            *slot = Slot::Parked;
        }
        self.status.parked.fetch_add(1, Ordering::Relaxed);
        self.status.set_error(format!("record {seq} parked: {why}"));
        error!(
            seq,
            reason = why,
            "kafka bridge: record parked in the journal (not released); fix the cause and restart to replay"
        );
    }

    fn handle_failures(&mut self) -> Result<(), BridgeError> {
        for (seq, e) in std::mem::take(&mut self.failures) {
            let dlq = &self.cfg.dead_letter_topic;
            let record = self
                .journal
                .reader(seq)
                .next_batch(1)?
                .into_iter()
                .next()
                .filter(|r| r.seq == seq);
            let (Some(rec), false) = (record, dlq.is_empty()) else {
                self.park(seq, &e.to_string());
                continue;
            };
            warn!(seq, error = %e, topic = %dlq, "kafka bridge: record refused by Kafka; writing it to the dead-letter topic");
            if let Some(slot) = self.tracker.slot(seq) {
                *slot = Slot::DeadLettering;
            }
            let key = rec.entry.client_id.clone();
            let headers = headers(&rec, &self.cfg.gateway_id).insert(Header {
                key: "gateway.error",
                value: Some(&e.to_string()),
            });
            let record = BaseRecord::with_opaque_to(dlq, seq as usize)
                .key(&key)
                .payload(&rec.entry.payload[..])
                .headers(headers)
                .timestamp(rec.entry.received_at_ms as i64);
            if let Err((e, _)) = self.producer.send(record) {
                self.park(seq, &format!("dead-letter write failed: {e}"));
            }
        }
        Ok(())
    }

    async fn send(&mut self, rec: &Record, shutdown: &CancellationToken) {
        self.tracker.slots.push_back(Slot::Sent);
        let e = &rec.entry;
        let Some(dest) = self.routes.resolve(&e.client_id, &e.topic) else {
            let err = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopic);
            self.failures.push((rec.seq, err));
            return;
        };
        loop {
            let record = BaseRecord::with_opaque_to(&dest.topic, rec.seq as usize)
                .key(&dest.key)
                .payload(&e.payload[..])
                .headers(headers(rec, &self.cfg.gateway_id))
                .timestamp(e.received_at_ms as i64);
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // librdkafka's queue is full: wait for delivery reports, then retry.
                    tokio::select! {
                        _ = self.reports.notify.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    self.absorb_reports();
                }
                Err((err, _)) => {
                    self.failures.push((rec.seq, err));
                    return;
                }
            }
        }
    }
}

/// Kafka headers carried by every record: where it came from and the MQTT 5 metadata.
pub fn headers(rec: &Record, gateway_id: &str) -> OwnedHeaders {
    let e = &rec.entry;
    let qos = e.qos.to_string();
    let received = e.received_at_ms.to_string();
    let mut h = OwnedHeaders::new_with_capacity(6 + e.user_properties.len())
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
        })
        .insert(Header {
            key: "gateway.id",
            value: Some(gateway_id),
        });
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
