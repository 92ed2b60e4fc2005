//! Command latency benchmark: commands issued at a fixed rate to N online vehicles,
//! through one path, timed at the vehicles.
//!
//! Paths (`--via`):
//! * **mqtt**: `--issuers` operator connections publish each command (QoS `--qos`, at
//!   most `--window` unacknowledged per connection) to `vehicles/<id>/commands`, as an
//!   operator whose publish ACL allows it would. Works against any broker (Mosquitto).
//! * **rest**: `--issuers` HTTP/1.1 keep-alive connections to the gateway's admin API,
//!   each sending one `POST /api/v1/vehicles/<id>/commands` (`{"payload": ..., "qos": q}`)
//!   at a time and reading its answer before the next (no pipelining).
//! * **kafka**: one librdkafka producer (`linger.ms` 0, `acks` all) writes each command to
//!   `--kafka-topic` (key = client id, value = payload, header `qos`); `--issuers` tasks
//!   share it.
//!
//! Timeline: every vehicle connects (spread over `--source-ips` loopback addresses) and
//! subscribes to `vehicles/<id>/commands` at QoS 1, every SUBACK checked; then the issuers
//! connect; then commands are issued at `--rate` per second, round robin over the
//! vehicles (command n goes to vehicle n mod N, issuer n mod K sends it at start + n/rate),
//! for a warm-up and then the measured window, and stop. Vehicles keep reading after the
//! window until every command issued inside it has arrived, nothing arrives for
//! [`QUIET`], or `--drain-secs` pass.
//!
//! What is measured, for the commands *issued inside the window* (wherever they arrive):
//! * **issued → received**: the vehicle's clock reading right after the read that
//!   brought the PUBLISH returned, minus the issue time the issuer wrote into the payload
//!   just before handing the command to its path (MQTT: building the PUBLISH; REST:
//!   building the request; Kafka: `produce`). Same host, one clock (`CLOCK_REALTIME`, ns).
//! * **issued → acknowledged**: the vehicle's clock reading right after its `write` of the
//!   PUBACK returned (the PUBACK handed to the kernel), minus the issue time. QoS 1 only.
//!   This is when the vehicle acknowledged, not when the gateway learnt it.
//! * **issue lag**: actual issue time minus the scheduled one. Tokio's timer has 1 ms
//!   granularity (commands due within one tick leave together), so 1–2 ms is the timer;
//!   much more means the issuer (or the path's back-pressure: MQTT window, REST round
//!   trip) did not keep up and the offered rate was not met.
//! * **completeness**: distinct commands received / issued (inside the window);
//!   duplicates are counted apart.
//! * **CPU**: utime + stime of each `--cpu-pid` process (and of this one) over the window.
//! * **outcomes** (with `--outcomes-topic`): the gateway's outcome records for this run's
//!   vehicles, by outcome, read after the run (see `outcomes.rs`), against every command
//!   issued (warm-up included) and not refused: `delivered` should account for all.
//!
//! Payload: ASCII `seq=<n> t_ns=<issue time> ` padded with `x` to `--payload-bytes`
//! (text, so that the REST path can carry it as a JSON string unchanged).
//!
//! Nothing waits without a bound; the report is printed either way, and
//! [`Report::failure`] says why a run is not a valid measurement.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig as KafkaConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::http;
use crate::outcomes;
use crate::pubsub::{cpu_secs, read_packet, ready, spawn_paced, HANDSHAKE};
use crate::report::{histogram, Latency};
use crate::tls::VehicleTls;
use crate::vehicle::{dial, Io};
use crate::wire;

/// The drain ends once nothing has arrived for this long (issuers done).
const QUIET: Duration = Duration::from_secs(2);
/// Longest wait for one REST answer.
const REST_ANSWER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    Mqtt,
    Rest,
    Kafka,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Mqtt => "mqtt",
            Via::Rest => "rest",
            Via::Kafka => "kafka",
        }
    }
}

/// One run, as the command line asked for it.
pub struct Plan {
    pub via: Via,
    /// The MQTT listener the vehicles (and MQTT operators) connect to.
    pub addr: SocketAddr,
    pub tls: Option<(VehicleTls, rustls::pki_types::ServerName<'static>)>,
    pub v5: bool,
    pub vehicles: usize,
    /// Commands per second over all vehicles.
    pub rate: f64,
    /// QoS of the commands (the subscriptions are QoS 1).
    pub qos: u8,
    /// Operator connections (MQTT), HTTP connections (REST), tasks sharing the producer (Kafka).
    pub issuers: usize,
    /// QoS 1 publishes in flight per operator connection (MQTT).
    pub window: usize,
    /// Username and password of the MQTT operators.
    pub operator_login: Option<(String, String)>,
    /// Operator client ids are `<prefix>-<n>`.
    pub operator_prefix: String,
    pub kafka_bootstrap: Option<String>,
    pub kafka_topic: String,
    /// `linger.ms` of the Kafka issuer's producer.
    pub kafka_linger_ms: u64,
    /// Read the gateway's outcome records from this topic afterwards (needs `kafka_bootstrap`).
    pub outcomes_topic: Option<String>,
    /// The admin API (REST).
    pub admin: Option<SocketAddr>,
    pub token: Option<String>,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub connect_rate: f64,
    /// Loopback source addresses the vehicles' connections are spread over (0: none).
    pub source_ips: usize,
    pub keep_alive: u16,
    pub payload_bytes: usize,
    /// Vehicle client ids are `<prefix>-<n>`.
    pub id_prefix: String,
    pub cpu_pids: Vec<(String, u32)>,
}

impl Plan {
    /// Commands scheduled over warm-up and window (the sequence numbers in use).
    fn scheduled(&self) -> u64 {
        ((self.warmup + self.duration).as_secs_f64() * self.rate).ceil() as u64 + 1
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// "mqtt", "rest" or "kafka".
    pub via: String,
    pub qos: u8,
    pub vehicles: usize,
    /// Vehicles connected and subscribed.
    pub subscribed: u64,
    pub issuers: usize,
    pub offered_per_sec: f64,
    pub window_secs: f64,
    /// Commands issued inside the window.
    pub issued: u64,
    pub issued_per_sec: f64,
    /// Commands the path refused (any time): MQTT PUBACK ≥ 0x80, REST answers other than
    /// 2xx, Kafka produce or delivery failures.
    pub refused: u64,
    /// Distinct in-window commands received by the vehicles by the end of the drain.
    pub received: u64,
    /// Of those, PUBACK'd by the vehicle (QoS 1).
    pub acknowledged: u64,
    /// In-window commands received more than once (not counted in `received`).
    pub duplicates: u64,
    /// received / issued.
    pub completeness: f64,
    /// Issue → the vehicle read it.
    pub received_latency: Latency,
    /// Issue → the vehicle wrote its PUBACK.
    pub acked_latency: Latency,
    /// Scheduled → actual issue time (the issuer keeping up with the offered rate).
    pub issue_lag: Latency,
    /// CPU seconds inside the window, per `--cpu-pid` name and `fleet` (this process).
    pub cpu_secs: BTreeMap<String, f64>,
    pub errors: BTreeMap<String, u64>,
    /// The gateway's outcome records for this run's vehicles, by outcome (`--outcomes-topic`).
    #[serde(default)]
    pub outcomes: BTreeMap<String, u64>,
    /// Commands issued in all (warm-up included) and not refused: the final outcomes due.
    #[serde(default)]
    pub outcomes_expected: u64,
    /// Why this run is not a valid measurement (then the process exits non-zero).
    pub failure: Option<String>,
    /// The REST command route is not there (404/405): the path cannot be measured on this
    /// gateway (exit status 3).
    #[serde(default)]
    pub unavailable: bool,
}

impl Report {
    pub fn print(&self) {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "commands via {} QoS {}: {} vehicle(s) ({} subscribed), {} issuer(s), {:.0} commands/s offered, {:.0} s window",
            self.via, self.qos, self.vehicles, self.subscribed, self.issuers, self.offered_per_sec, self.window_secs
        );
        println!(
            "issued          {} ({:.0} commands/s), refused {}",
            self.issued, self.issued_per_sec, self.refused
        );
        println!(
            "received        {} (completeness {:.4}), acknowledged {}, duplicates {}",
            self.received, self.completeness, self.acknowledged, self.duplicates
        );
        for (what, l) in [
            ("issued→received", &self.received_latency),
            ("issued→acked   ", &self.acked_latency),
            ("issue lag      ", &self.issue_lag),
        ] {
            println!(
                "{what} p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} commands)",
                ms(l.p50_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us),
                l.count
            );
        }
        if !self.outcomes.is_empty() || self.outcomes_expected > 0 {
            let list: Vec<String> = self.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!(
                "outcomes        {} (of {} commands issued in all)",
                if list.is_empty() {
                    "none".to_string()
                } else {
                    list.join(", ")
                },
                self.outcomes_expected
            );
        }
        for (name, secs) in &self.cpu_secs {
            println!("cpu {name:<11} {secs:.2} s");
        }
        for (k, v) in &self.errors {
            println!("error           {k}: {v}");
        }
        if let Some(f) = &self.failure {
            println!("FAILED          {f}");
        }
    }
}

/// Wall-clock nanoseconds: what payloads carry.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Microseconds from `from` to `to` (ns), at least 1 (the histogram's floor).
fn us_between(from: u64, to: u64) -> u64 {
    (to.saturating_sub(from) / 1000).max(1)
}

/// The payload of command `seq` issued at `t_ns`.
fn payload(seq: u64, t_ns: u64, pad: usize) -> String {
    let mut s = format!("seq={seq} t_ns={t_ns} ");
    if s.len() < pad {
        s.push_str(&"x".repeat(pad - s.len()));
    }
    s
}

/// (sequence number, issue time ns) of a command payload.
fn parse_payload(p: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(p).ok()?;
    let (mut seq, mut t) = (None, None);
    for word in text.split(' ') {
        if let Some(v) = word.strip_prefix("seq=") {
            seq = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("t_ns=") {
            t = v.parse().ok();
        }
    }
    Some((seq?, t?))
}

/// When issuing starts and stops, and the measured window in wall-clock ns.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    stop: Instant,
    warm_ns: u64,
    end_ns: u64,
}

impl Schedule {
    fn in_window(&self, ns: u64) -> bool {
        (self.warm_ns..self.end_ns).contains(&ns)
    }
}

/// What the vehicles record, shared (one lock per read that brought commands).
struct Recorder {
    window: OnceLock<(u64, u64)>,
    tally: Mutex<Tally>,
    /// Distinct in-window commands received so far (the drain watches it).
    distinct: AtomicU64,
    /// Commands received, any time.
    all: AtomicU64,
}

struct Tally {
    received: Histogram<u64>,
    acked: Histogram<u64>,
    /// One bit per sequence number: seen inside the window.
    seen: Vec<u64>,
    distinct: u64,
    acknowledged: u64,
    duplicates: u64,
}

/// One command as a vehicle read it.
struct Got {
    seq: u64,
    issued_ns: u64,
    acked: bool,
}

impl Recorder {
    fn new(scheduled: u64) -> Recorder {
        Recorder {
            window: OnceLock::new(),
            tally: Mutex::new(Tally {
                received: histogram(),
                acked: histogram(),
                seen: vec![0; (scheduled as usize).div_ceil(64)],
                distinct: 0,
                acknowledged: 0,
                duplicates: 0,
            }),
            distinct: AtomicU64::new(0),
            all: AtomicU64::new(0),
        }
    }

    /// Commands read together at `recv_ns`, their PUBACKs written at `ack_ns`.
    fn record(&self, got: &[Got], recv_ns: u64, ack_ns: u64) {
        self.all.fetch_add(got.len() as u64, Ordering::Relaxed);
        let Some(&(warm, end)) = self.window.get() else {
            return;
        };
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        for g in got.iter().filter(|g| (warm..end).contains(&g.issued_ns)) {
            let (word, bit) = ((g.seq / 64) as usize, 1u64 << (g.seq % 64));
            if let Some(w) = t.seen.get_mut(word) {
                if *w & bit != 0 {
                    t.duplicates += 1;
                    continue;
                }
                *w |= bit;
            }
            t.distinct += 1;
            let _ = t.received.record(us_between(g.issued_ns, recv_ns));
            if g.acked {
                t.acknowledged += 1;
                let _ = t.acked.record(us_between(g.issued_ns, ack_ns));
            }
        }
        self.distinct.store(t.distinct, Ordering::Relaxed);
    }
}

/// What every task shares.
struct Ctx {
    plan: Plan,
    recorder: Recorder,
    /// Commands issued inside the window so far.
    issued: AtomicU64,
    /// Commands issued so far, warm-up included.
    issued_all: AtomicU64,
    refused: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    go: watch::Receiver<Option<Schedule>>,
    cancel: CancellationToken,
}

impl Ctx {
    fn error(&self, kind: &str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.to_string())
            .or_default() += 1;
    }

    /// Waits until issuing starts (`None`: the run was called off).
    async fn schedule(&self) -> Option<Schedule> {
        let mut go = self.go.clone();
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            s = go.wait_for(Option::is_some) => s.ok().and_then(|s| *s),
        }
    }

    fn vehicle_id(&self, seq: u64) -> String {
        format!(
            "{}-{}",
            self.plan.id_prefix,
            seq % self.plan.vehicles.max(1) as u64
        )
    }
}

/// An issuer's own count, merged at the end.
struct Issued {
    lag: Histogram<u64>,
}

impl Issued {
    fn new() -> Issued {
        Issued { lag: histogram() }
    }

    /// Command issued at `t_ns`, scheduled for `due`.
    fn note(&mut self, ctx: &Ctx, sched: &Schedule, due: Instant, t_ns: u64) {
        ctx.issued_all.fetch_add(1, Ordering::Relaxed);
        if sched.in_window(t_ns) {
            ctx.issued.fetch_add(1, Ordering::Relaxed);
            let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
            let _ = self.lag.record(lag.max(1));
        }
    }
}

/// When command `seq` is due.
fn due(sched: &Schedule, rate: f64, seq: u64) -> Instant {
    sched.start + Duration::from_secs_f64(seq as f64 / rate)
}

/// Connects, sends CONNECT (with a login if given), checks the CONNACK.
async fn open(
    plan: &Plan,
    id: &str,
    source: Option<IpAddr>,
    login: Option<(&str, &str)>,
) -> Result<(Box<dyn Io>, BytesMut), String> {
    let tls = match &plan.tls {
        Some((t, _)) => Some(t.for_vehicle(id).map_err(|e| format!("tls: {e}"))?),
        None => None,
    };
    let mut io = timeout(
        HANDSHAKE,
        dial(plan.addr, plan.tls.as_ref().map(|(_, n)| n), source, tls),
    )
    .await
    .map_err(|_| "connect: timeout".to_string())?
    .map_err(|e| format!("connect: {}", e.kind()))?;
    let mut out = BytesMut::new();
    wire::connect_as(&mut out, id, plan.keep_alive, plan.v5, login);
    io.write_all(&out)
        .await
        .map_err(|e| format!("write: {}", e.kind()))?;
    let mut buf = BytesMut::with_capacity(256);
    let (first, body) = timeout(HANDSHAKE, read_packet(&mut io, &mut buf))
        .await
        .map_err(|_| "connack: timeout".to_string())??;
    let code = body.get(1).copied().unwrap_or(0xff);
    if first >> 4 != 2 || code != 0 {
        return Err(format!("connack refused: 0x{code:02x}"));
    }
    Ok((io, buf))
}

fn source_ip(plan: &Plan, index: usize) -> Option<IpAddr> {
    (plan.source_ips > 0).then(|| crate::source_ip(index % plan.source_ips))
}

/// One vehicle: subscribe to its command topic, then acknowledge and time every command.
async fn vehicle(ctx: Arc<Ctx>, index: usize, id: String, ready: mpsc::Sender<Result<(), String>>) {
    let plan = &ctx.plan;
    let subscribed = async {
        let (mut io, mut buf) = open(plan, &id, source_ip(plan, index), None).await?;
        let mut out = BytesMut::new();
        wire::subscribe(&mut out, 1, &format!("vehicles/{id}/commands"), 1, plan.v5);
        io.write_all(&out)
            .await
            .map_err(|e| format!("write: {}", e.kind()))?;
        let (first, body) = timeout(HANDSHAKE, read_packet(&mut io, &mut buf))
            .await
            .map_err(|_| "suback: timeout".to_string())??;
        match wire::suback_code(&body, plan.v5) {
            Some(code) if first >> 4 == 9 && code < 0x80 => Ok((io, buf)),
            code => Err(format!("suback refused: {code:02x?}")),
        }
    }
    .await;
    let (mut io, mut buf) = match subscribed {
        Ok(c) => {
            let _ = ready.send(Ok(())).await;
            c
        }
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return;
        }
    };
    drop(ready);
    let mut out = BytesMut::new();
    let mut got = Vec::new();
    let ping_every = Duration::from_secs(u64::from(plan.keep_alive.max(2)) / 2);
    let mut next_ping = Instant::now() + ping_every;
    let mut broken = false;
    'run: loop {
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => break,
            read = io.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    ctx.error("vehicle: closed by broker");
                    broken = true;
                    break;
                }
                // Everything in one read arrived together: one clock reading for all.
                let recv_ns = now_ns();
                got.clear();
                while let Some((first, body)) = wire::next_packet(&mut buf) {
                    match first >> 4 {
                        3 => {
                            let Some(p) = wire::parse_publish(first, &body, plan.v5) else {
                                ctx.error("vehicle: malformed PUBLISH");
                                continue;
                            };
                            let qos = (first >> 1) & 0b11;
                            if qos > 1 {
                                ctx.error("vehicle: QoS 2 command (subscribed at QoS 1)");
                            }
                            if let (1, Some(pkid)) = (qos, p.pkid) {
                                wire::puback(&mut out, pkid);
                            }
                            match parse_payload(p.payload) {
                                Some((seq, issued_ns)) => got.push(Got { seq, issued_ns, acked: qos == 1 }),
                                None => ctx.error("vehicle: command without seq and t_ns"),
                            }
                        }
                        14 => {
                            ctx.error("vehicle: disconnected by broker");
                            broken = true;
                            break 'run;
                        }
                        _ => {}
                    }
                }
                let mut ack_ns = recv_ns;
                if !out.is_empty() {
                    let ok = io.write_all(&out).await.is_ok();
                    ack_ns = now_ns();
                    out.clear();
                    if !ok {
                        ctx.error("vehicle: write failed");
                        broken = true;
                        break;
                    }
                    next_ping = Instant::now() + ping_every;
                }
                if !got.is_empty() {
                    ctx.recorder.record(&got, recv_ns, ack_ns);
                }
            }
            _ = sleep_until(next_ping) => {
                wire::pingreq(&mut out);
                let ok = io.write_all(&out).await.is_ok();
                out.clear();
                if !ok {
                    ctx.error("vehicle: write failed");
                    broken = true;
                    break;
                }
                next_ping = Instant::now() + ping_every;
            }
        }
    }
    if !broken {
        out.clear();
        wire::disconnect(&mut out);
        let _ = io.write_all(&out).await;
        let _ = io.shutdown().await;
    }
}

/// An MQTT operator: publishes commands `index`, `index + K`, ... to the vehicles'
/// command topics.
async fn mqtt_issuer(ctx: Arc<Ctx>, index: usize, ready: mpsc::Sender<Result<(), String>>) -> Issued {
    let mut tally = Issued::new();
    let plan = &ctx.plan;
    let id = format!("{}-{index}", plan.operator_prefix);
    let login = plan
        .operator_login
        .as_ref()
        .map(|(u, p)| (u.as_str(), p.as_str()));
    let (mut io, mut buf) = match open(plan, &id, None, login).await {
        Ok(c) => {
            let _ = ready.send(Ok(())).await;
            c
        }
        Err(e) => {
            let _ = ready.send(Err(format!("operator {e}"))).await;
            return tally;
        }
    };
    drop(ready);
    let Some(sched) = ctx.schedule().await else {
        return tally;
    };
    let step = plan.issuers as u64;
    let mut seq = index as u64;
    let give_up = sched.stop + plan.drain;
    let mut out = BytesMut::new();
    let (mut pkid, mut inflight) = (0u16, 0usize);
    let ping_every = Duration::from_secs(u64::from(plan.keep_alive.max(2)) / 2);
    let mut next_ping = Instant::now() + ping_every;
    let mut broken = false;
    'run: loop {
        let next = due(&sched, plan.rate, seq);
        let sending = next < sched.stop && !ctx.cancel.is_cancelled();
        let now = Instant::now();
        if !sending && (inflight == 0 || now >= give_up) {
            if inflight > 0 {
                ctx.error("operator: PUBACK missing at the drain limit");
            }
            break;
        }
        let window_open = plan.qos == 0 || inflight < plan.window;
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => break,
            read = io.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    ctx.error("operator: closed by broker");
                    broken = true;
                    break;
                }
                while let Some((first, body)) = wire::next_packet(&mut buf) {
                    match first >> 4 {
                        4 => {
                            inflight = inflight.saturating_sub(1);
                            if body.get(2).is_some_and(|r| *r >= 0x80) {
                                ctx.refused.fetch_add(1, Ordering::Relaxed);
                                ctx.error(&format!("operator: PUBACK 0x{:02x}", body.get(2).copied().unwrap_or(0)));
                            }
                        }
                        14 => {
                            ctx.error("operator: disconnected by broker");
                            broken = true;
                            break 'run;
                        }
                        _ => {}
                    }
                }
            }
            _ = sleep_until(next), if sending && window_open => {
                // Every command now due (several per timer tick at high rates), within
                // the window; one write for all of them.
                loop {
                    let next = due(&sched, plan.rate, seq);
                    if next > Instant::now() || next >= sched.stop || (plan.qos > 0 && inflight >= plan.window) {
                        break;
                    }
                    let topic = format!("vehicles/{}/commands", ctx.vehicle_id(seq));
                    let t_ns = now_ns();
                    if plan.qos > 0 {
                        pkid = pkid.checked_add(1).unwrap_or(1);
                        inflight += 1;
                    }
                    let body = payload(seq, t_ns, plan.payload_bytes);
                    wire::publish(&mut out, &topic, plan.qos, pkid, body.as_bytes(), plan.v5);
                    tally.note(&ctx, &sched, next, t_ns);
                    seq += step;
                }
                let ok = io.write_all(&out).await.is_ok();
                out.clear();
                if !ok {
                    ctx.error("operator: write failed");
                    broken = true;
                    break;
                }
                next_ping = Instant::now() + ping_every;
            }
            _ = sleep_until(sched.stop), if sending => {}
            _ = sleep_until(give_up), if !sending => {}
            _ = sleep_until(next_ping) => {
                wire::pingreq(&mut out);
                let ok = io.write_all(&out).await.is_ok();
                out.clear();
                if !ok {
                    ctx.error("operator: write failed");
                    broken = true;
                    break;
                }
                next_ping = Instant::now() + ping_every;
            }
        }
    }
    if !broken {
        out.clear();
        wire::disconnect(&mut out);
        let _ = io.write_all(&out).await;
        let _ = io.shutdown().await;
    }
    tally
}

fn rest_path(client_id: &str) -> String {
    format!("/api/v1/vehicles/{client_id}/commands")
}

/// Asks the admin API whether the REST command route exists, with a body it must refuse
/// (no payload), so that nothing is issued: `Ok(false)` on a 404 / 405 that is not one of
/// the API's own errors (those carry `{"error": {"code": ...}}`; a missing route has none).
async fn rest_route_exists(admin: SocketAddr, token: Option<&str>, id: &str) -> Result<bool, String> {
    let mut c = timeout(REST_ANSWER, http::Conn::connect(admin, token))
        .await
        .map_err(|_| "admin API: connect timeout".to_string())?
        .map_err(|e| format!("admin API {admin}: connect: {}", e.kind()))?;
    let a = timeout(REST_ANSWER, c.post_json(&rest_path(id), b"{}"))
        .await
        .map_err(|_| "admin API: no answer".to_string())?
        .map_err(|e| format!("admin API: {e}"))?;
    let api_error = serde_json::from_slice::<serde_json::Value>(&a.body)
        .ok()
        .is_some_and(|v| v["error"]["code"].is_string());
    match a.status {
        404 | 405 if !api_error => Ok(false),
        401 | 403 => Err(format!(
            "admin API answered {} (give the admin token with --token)",
            a.status
        )),
        _ => Ok(true),
    }
}

/// A REST issuer: one keep-alive connection, one request at a time.
async fn rest_issuer(ctx: Arc<Ctx>, index: usize, ready: mpsc::Sender<Result<(), String>>) -> Issued {
    let mut tally = Issued::new();
    let plan = &ctx.plan;
    let Some(admin) = plan.admin else {
        let _ = ready.send(Err("no --admin address".into())).await;
        return tally;
    };
    let token = plan.token.as_deref();
    let mut conn = match http::Conn::connect(admin, token).await {
        Ok(c) => {
            let _ = ready.send(Ok(())).await;
            Some(c)
        }
        Err(e) => {
            let _ = ready.send(Err(format!("admin API connect: {}", e.kind()))).await;
            return tally;
        }
    };
    drop(ready);
    let Some(sched) = ctx.schedule().await else {
        return tally;
    };
    let mut seq = index as u64;
    loop {
        let next = due(&sched, plan.rate, seq);
        if next >= sched.stop || ctx.cancel.is_cancelled() {
            break;
        }
        sleep_until(next).await;
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match http::Conn::connect(admin, token).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    ctx.error(&format!("rest: reconnect: {}", e.kind()));
                    seq += plan.issuers as u64;
                    continue;
                }
            },
        };
        let t_ns = now_ns();
        let body = serde_json::json!({
            "payload": payload(seq, t_ns, plan.payload_bytes),
            "qos": plan.qos,
        });
        let body = body.to_string();
        let path = rest_path(&ctx.vehicle_id(seq));
        tally.note(&ctx, &sched, next, t_ns);
        match timeout(REST_ANSWER, c.post_json(&path, body.as_bytes())).await {
            Ok(Ok(a)) => {
                if !(200..300).contains(&a.status) {
                    ctx.refused.fetch_add(1, Ordering::Relaxed);
                    // The admin API's errors say `{"error": {"code": ...}}`.
                    let code = serde_json::from_slice::<serde_json::Value>(&a.body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    ctx.error(&format!("rest: HTTP {} {code}", a.status));
                }
                if a.close {
                    conn = None;
                }
            }
            Ok(Err(e)) => {
                ctx.error(&format!("rest: {e}"));
                conn = None;
            }
            Err(_) => {
                ctx.error("rest: no answer within 10 s");
                conn = None;
            }
        }
        seq += plan.issuers as u64;
    }
    tally
}

/// Counts delivery failures of the command producer.
struct KafkaCtx {
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for KafkaCtx {}

impl ProducerContext for KafkaCtx {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        }
    }
}

type CommandProducer = ThreadedProducer<KafkaCtx>;

/// The command producer, once its topic is known to exist (it is not created here: a
/// gateway started before its command topic existed may not see it for minutes).
async fn kafka_producer(
    bootstrap: &str,
    topic: &str,
    linger_ms: u64,
) -> Result<Arc<CommandProducer>, String> {
    let ctx = KafkaCtx {
        failed: AtomicU64::new(0),
        last_error: Mutex::new(None),
    };
    let producer: CommandProducer = KafkaConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "fleet-commands")
        .set("linger.ms", linger_ms.to_string())
        .set("acks", "all")
        .set("allow.auto.create.topics", "false")
        .create_with_context(ctx)
        .map_err(|e| format!("kafka producer: {e}"))?;
    let producer = Arc::new(producer);
    let p = producer.clone();
    let t = topic.to_string();
    let meta = tokio::task::spawn_blocking(move || {
        p.client()
            .fetch_metadata(Some(&t), Duration::from_secs(10))
            .map(|m| {
                m.topics()
                    .first()
                    .map(|t| (t.error().is_none(), t.partitions().len()))
            })
    })
    .await
    .map_err(|e| format!("kafka metadata: {e}"))?
    .map_err(|e| format!("kafka metadata from {bootstrap}: {e}"))?;
    match meta {
        Some((true, n)) if n > 0 => Ok(producer),
        _ => Err(format!(
            "command topic {topic} does not exist on {bootstrap}: create it before starting the gateway"
        )),
    }
}

/// A Kafka issuer: produces commands `index`, `index + K`, ... on the shared producer.
async fn kafka_issuer(ctx: Arc<Ctx>, index: usize, producer: Arc<CommandProducer>) -> Issued {
    let mut tally = Issued::new();
    let plan = &ctx.plan;
    let Some(sched) = ctx.schedule().await else {
        return tally;
    };
    let qos = plan.qos.to_string();
    let mut seq = index as u64;
    loop {
        let next = due(&sched, plan.rate, seq);
        if next >= sched.stop || ctx.cancel.is_cancelled() {
            break;
        }
        sleep_until(next).await;
        let key = ctx.vehicle_id(seq);
        let t_ns = now_ns();
        let body = payload(seq, t_ns, plan.payload_bytes);
        let record = BaseRecord::to(&plan.kafka_topic)
            .key(&key)
            .payload(&body)
            .headers(OwnedHeaders::new().insert(Header {
                key: "qos",
                value: Some(&qos),
            }));
        tally.note(&ctx, &sched, next, t_ns);
        if let Err((e, _)) = producer.send(record) {
            ctx.refused.fetch_add(1, Ordering::Relaxed);
            let kind = match e {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    "kafka: producer queue full".into()
                }
                e => format!("kafka: produce: {e}"),
            };
            ctx.error(&kind);
        }
        seq += plan.issuers as u64;
    }
    tally
}

fn cpu_sample(plan: &Plan) -> Vec<Option<f64>> {
    plan.cpu_pids
        .iter()
        .map(|(_, pid)| cpu_secs(&pid.to_string()))
        .chain([cpu_secs("self")])
        .collect()
}

pub async fn run(plan: Plan) -> Report {
    let mut report = Report {
        via: plan.via.name().into(),
        qos: plan.qos,
        vehicles: plan.vehicles,
        issuers: plan.issuers,
        offered_per_sec: plan.rate,
        window_secs: plan.duration.as_secs_f64(),
        ..Report::default()
    };
    // The path first: a missing route or topic fails before 10,000 vehicles connect.
    let producer = match plan.via {
        Via::Mqtt => None,
        Via::Rest => {
            let Some(admin) = plan.admin else {
                report.failure = Some("--via rest needs --admin HOST:PORT".into());
                return report;
            };
            let probe_id = format!("{}-probe", plan.id_prefix);
            match rest_route_exists(admin, plan.token.as_deref(), &probe_id).await {
                Ok(true) => None,
                Ok(false) => {
                    report.unavailable = true;
                    report.failure = Some(format!(
                        "rest_unavailable: POST {} answered 404/405: this gateway has no REST command route",
                        rest_path(&probe_id)
                    ));
                    return report;
                }
                Err(e) => {
                    report.failure = Some(e);
                    return report;
                }
            }
        }
        Via::Kafka => {
            let Some(bootstrap) = plan.kafka_bootstrap.as_deref() else {
                report.failure = Some("--via kafka needs --kafka-bootstrap HOST:PORT".into());
                return report;
            };
            match kafka_producer(bootstrap, &plan.kafka_topic, plan.kafka_linger_ms).await {
                Ok(p) => Some(p),
                Err(e) => {
                    report.failure = Some(e);
                    return report;
                }
            }
        }
    };

    let (go_tx, go) = watch::channel(None);
    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(plan.scheduled()),
        plan,
        issued: AtomicU64::new(0),
        issued_all: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        go,
        cancel: CancellationToken::new(),
    });
    let plan = &ctx.plan;

    // Vehicles first, every SUBACK in.
    let (ready_tx, mut ready_rx) = mpsc::channel(plan.vehicles.max(1));
    let started = Instant::now();
    let ids = (0..plan.vehicles)
        .map(|i| format!("{}-{i}", plan.id_prefix))
        .collect();
    let vehicles = spawn_paced(ids, plan.connect_rate, |i, id| {
        tokio::spawn(vehicle(ctx.clone(), i, id, ready_tx.clone()))
    })
    .await;
    drop(ready_tx);
    let mut stage = ready(&mut ready_rx, plan.vehicles, "vehicles").await;
    report.subscribed = if stage.is_ok() { plan.vehicles as u64 } else { 0 };
    if stage.is_ok() {
        eprintln!(
            "fleet commands: {} vehicles subscribed in {:.1} s",
            plan.vehicles,
            started.elapsed().as_secs_f64()
        );
    }

    // Then the issuers.
    let mut issuers: Vec<JoinHandle<Issued>> = Vec::new();
    if stage.is_ok() {
        let (ready_tx, mut ready_rx) = mpsc::channel(plan.issuers.max(1));
        for i in 0..plan.issuers {
            let c = ctx.clone();
            issuers.push(match (plan.via, &producer) {
                (Via::Mqtt, _) => tokio::spawn(mqtt_issuer(c, i, ready_tx.clone())),
                (Via::Rest, _) => tokio::spawn(rest_issuer(c, i, ready_tx.clone())),
                (Via::Kafka, Some(p)) => tokio::spawn(kafka_issuer(c, i, p.clone())),
                (Via::Kafka, None) => tokio::spawn(async { Issued::new() }),
            });
        }
        drop(ready_tx);
        if plan.via != Via::Kafka {
            stage = ready(&mut ready_rx, plan.issuers, "issuers").await;
        }
    }
    if let Err(e) = stage {
        report.failure = Some(e);
        ctx.cancel.cancel();
        report.errors = ctx.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
        return report;
    }

    // The outcome topic's end, before the first command.
    let mut watch = None;
    if let Some(topic) = plan.outcomes_topic.clone() {
        match plan.kafka_bootstrap.clone() {
            Some(bootstrap) => {
                let prefix = plan.id_prefix.clone();
                match tokio::task::spawn_blocking(move || outcomes::start(&bootstrap, &topic, &prefix)).await
                {
                    Ok(Ok(w)) => watch = Some(w),
                    Ok(Err(e)) => ctx.error(&e),
                    Err(e) => ctx.error(&format!("outcome watch: {e}")),
                }
            }
            None => ctx.error("--outcomes-topic needs --kafka-bootstrap"),
        }
    }

    let start = Instant::now();
    let warm_ns = now_ns() + plan.warmup.as_nanos() as u64;
    let sched = Schedule {
        start,
        stop: start + plan.warmup + plan.duration,
        warm_ns,
        end_ns: warm_ns + plan.duration.as_nanos() as u64,
    };
    let _ = ctx.recorder.window.set((sched.warm_ns, sched.end_ns));
    let _ = go_tx.send(Some(sched));
    sleep_until(start + plan.warmup).await;
    let cpu0 = cpu_sample(plan);
    sleep_until(sched.stop).await;
    let cpu1 = cpu_sample(plan);
    let names = plan
        .cpu_pids
        .iter()
        .map(|(n, _)| n.clone())
        .chain(["fleet".to_string()]);
    for ((name, a), b) in names.zip(cpu0).zip(cpu1) {
        if let (Some(a), Some(b)) = (a, b) {
            report.cpu_secs.insert(name, b - a);
        }
    }

    // Drain: until every in-window command arrived, nothing arrives for a while, or the limit.
    let limit = sched.stop + plan.drain;
    let (mut last, mut quiet_since) = (u64::MAX, Instant::now());
    while Instant::now() < limit {
        let got = ctx.recorder.distinct.load(Ordering::Relaxed);
        let done = issuers.iter().all(|t| t.is_finished());
        if done && got >= ctx.issued.load(Ordering::Relaxed) {
            break;
        }
        if got != last {
            (last, quiet_since) = (got, Instant::now());
        } else if done && quiet_since.elapsed() >= QUIET {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    ctx.cancel.cancel();

    let mut lag = histogram();
    for t in issuers {
        if let Ok(Ok(i)) = timeout(Duration::from_secs(10), t).await {
            let _ = lag.add(&i.lag);
        }
    }
    if let Some(p) = producer {
        let flushed = tokio::task::spawn_blocking(move || {
            let r = p.flush(Duration::from_secs(10));
            let c = p.context();
            let last = c.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
            (r, c.failed.load(Ordering::Relaxed), last)
        })
        .await;
        if let Ok((r, failed, last)) = flushed {
            if let Err(e) = r {
                ctx.error(&format!("kafka: flush: {e}"));
            }
            if failed > 0 {
                ctx.refused.fetch_add(failed, Ordering::Relaxed);
                ctx.error(&format!("kafka: delivery failed ({})", last.unwrap_or_default()));
            }
        }
    }
    for v in vehicles {
        let _ = timeout(Duration::from_secs(10), v).await;
    }

    if let Some(w) = watch {
        let expected = ctx
            .issued_all
            .load(Ordering::Relaxed)
            .saturating_sub(ctx.refused.load(Ordering::Relaxed));
        report.outcomes_expected = expected;
        let counted = tokio::task::spawn_blocking(move || {
            w.collect(expected, Duration::from_secs(5), Duration::from_secs(30))
        })
        .await;
        match counted {
            Ok(Ok(c)) => report.outcomes = c,
            Ok(Err(e)) => ctx.error(&e),
            Err(e) => ctx.error(&format!("outcome watch: {e}")),
        }
    }

    let t = ctx.recorder.tally.lock().unwrap_or_else(|e| e.into_inner());
    report.issued = ctx.issued.load(Ordering::Relaxed);
    report.issued_per_sec = report.issued as f64 / plan.duration.as_secs_f64().max(1e-9);
    report.refused = ctx.refused.load(Ordering::Relaxed);
    report.received = t.distinct;
    report.acknowledged = t.acknowledged;
    report.duplicates = t.duplicates;
    report.completeness = t.distinct as f64 / report.issued.max(1) as f64;
    report.received_latency = Latency::of(&t.received);
    report.acked_latency = Latency::of(&t.acked);
    report.issue_lag = Latency::of(&lag);
    report.errors = ctx.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if report.issued == 0 {
        report.failure = Some("nothing was issued inside the window".into());
    } else if report.received == 0 {
        report.failure = Some(format!(
            "no command issued inside the window reached a vehicle ({} received in all, {} issued inside the window)",
            ctx.recorder.all.load(Ordering::Relaxed),
            report.issued
        ));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let p = payload(42, 1_795_639_203_328_000_123, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(parse_payload(p.as_bytes()), Some((42, 1_795_639_203_328_000_123)));
        assert_eq!(parse_payload(payload(7, 9, 0).as_bytes()), Some((7, 9)));
        assert_eq!(parse_payload(b"seq=1"), None);
        assert_eq!(parse_payload(b"t_ns=1 seq=x"), None);
        assert_eq!(parse_payload(&[0xff, 0xfe]), None);
    }

    #[test]
    fn recorder_counts_window_and_duplicates() {
        let r = Recorder::new(100);
        let got = |seq, issued_ns| Got {
            seq,
            issued_ns,
            acked: true,
        };
        // Before the window is set nothing is timed.
        r.record(&[got(0, 1_000)], 2_000, 3_000);
        let _ = r.window.set((1_000_000, 2_000_000));
        r.record(
            &[
                got(1, 1_000_000),
                got(2, 1_500_000),
                got(3, 999_999),
                got(4, 2_000_000),
            ],
            1_600_000,
            1_700_000,
        );
        r.record(&[got(2, 1_500_000)], 1_800_000, 1_900_000);
        let t = r.tally.lock().expect("tally");
        assert_eq!((t.distinct, t.acknowledged, t.duplicates), (2, 2, 1));
        assert_eq!(r.distinct.load(Ordering::Relaxed), 2);
        assert_eq!(r.all.load(Ordering::Relaxed), 6);
        // 600 µs and 100 µs to receive; 700 and 200 to acknowledge.
        assert_eq!(t.received.max(), 600);
        assert_eq!(t.acked.min(), 200);
    }
}
