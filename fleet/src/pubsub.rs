//! Delivery benchmark: messages from publishers to subscribers through the broker,
//! timed at the subscribers.
//!
//! * **fan-out**: one publisher, N subscribers of the same topic (every message is
//!   delivered N times);
//! * **fan-in**: N publishers, each on its own `vehicles/<id>/telemetry`, one subscriber
//!   of `vehicles/+/telemetry`.
//!
//! Publish QoS = subscribe QoS (0 or 1); a QoS 1 delivery is acknowledged at once.
//!
//! Timeline: every subscriber connects and subscribes (each SUBACK checked) before any
//! publisher connects; then every publisher connects; then all publish at the offered
//! rate (spread evenly over the publishers, their first sends staggered) for a warm-up
//! and then the measured window, and stop. Subscribers keep reading after the window
//! until every message sent has arrived, nothing more arrives for a second, or the
//! drain limit passes.
//!
//! What is measured:
//! * **delivered msgs/s**: PUBLISH packets the subscribers *received* inside the window;
//! * **latency**: receive time minus the send time the publisher wrote into the payload
//!   (wall clock; publisher and subscriber share the host, so one clock), for those
//!   same deliveries;
//! * **completeness**: deliveries of the messages *sent* inside the window, received by
//!   the end of the drain, over what the subscriptions call for (sent × subscribers);
//!   below 1 means the broker dropped or the drain gave up;
//! * **CPU**: utime + stime of each `--cpu-pid` process (and of this one) between the
//!   window's two edges, from `/proc/<pid>/stat`.
//!
//! Payload: the send time (µs since the Unix epoch) and the publisher's sequence number,
//! both big-endian u64, zero-padded to `--payload-bytes`.
//!
//! Nothing waits without a bound: connects and SUBACKs time out, a run where nothing at
//! all was delivered by the end of the warm-up stops there, and the drain has a limit.
//! The report is printed either way; [`Report::failure`] says why a run is not valid.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::report::Latency;
use crate::tls::VehicleTls;
use crate::vehicle::{dial, now_us, Io};
use crate::wire;

/// Bytes of the payload header: send time and sequence number.
const HEADER: usize = 16;
/// Time a connect, a CONNACK or a SUBACK may take.
pub(crate) const HANDSHAKE: Duration = Duration::from_secs(30);
/// The drain ends once nothing has arrived for this long.
const QUIET: Duration = Duration::from_secs(1);
/// Kernel clock ticks per second in `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    FanOut,
    FanIn,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::FanOut => "fanout",
            Pattern::FanIn => "fanin",
        }
    }
}

/// One benchmark run, as the command line asked for it.
pub struct Plan {
    pub pattern: Pattern,
    pub addr: SocketAddr,
    pub tls: Option<(VehicleTls, rustls::pki_types::ServerName<'static>)>,
    pub v5: bool,
    pub qos: u8,
    /// Subscribers (fan-out) or publishers (fan-in).
    pub clients: usize,
    /// Messages per second offered by all publishers together.
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    /// Longest wait after the window for messages still on their way.
    pub drain: Duration,
    pub payload_bytes: usize,
    pub connect_rate: f64,
    /// QoS 1 publishes in flight per publisher.
    pub window: usize,
    pub keep_alive: u16,
    pub id_prefix: String,
    /// The fan-out topic.
    pub topic: String,
    /// Processes whose CPU time is reported, by name.
    pub cpu_pids: Vec<(String, u32)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// "fanout" or "fanin".
    pub pattern: String,
    pub qos: u8,
    pub publishers: usize,
    pub subscribers: usize,
    pub offered_per_sec: f64,
    pub window_secs: f64,
    /// Publishes sent inside the window.
    pub published: u64,
    pub published_per_sec: f64,
    /// Deliveries received inside the window.
    pub delivered: u64,
    pub delivered_per_sec: f64,
    /// Deliveries of in-window messages by the drain's end / sent × subscribers reached.
    pub completeness: f64,
    /// Publish → receive, for the deliveries received inside the window.
    pub latency: Latency,
    /// CPU seconds spent inside the window, per `--cpu-pid` name and `fleet` (this process).
    pub cpu_secs: BTreeMap<String, f64>,
    pub errors: BTreeMap<String, u64>,
    /// Why this run is not a valid measurement (then the process exits non-zero).
    pub failure: Option<String>,
}

impl Report {
    pub fn print(&self) {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "{} QoS {}: {} publisher(s) → {} subscriber(s), {:.0} msgs/s offered, {:.0} s window",
            self.pattern, self.qos, self.publishers, self.subscribers, self.offered_per_sec, self.window_secs
        );
        println!(
            "published       {} ({:.0} msgs/s)",
            self.published, self.published_per_sec
        );
        println!(
            "delivered       {} ({:.0} msgs/s), completeness {:.4}",
            self.delivered, self.delivered_per_sec, self.completeness
        );
        let l = &self.latency;
        println!(
            "latency         p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            ms(l.p50_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us)
        );
        for (name, secs) in &self.cpu_secs {
            println!(
                "cpu {name:<11} {secs:.2} s ({:.0} delivered msgs per CPU-second)",
                self.delivered as f64 / secs.max(1e-9)
            );
        }
        for (k, v) in &self.errors {
            println!("error           {k}: {v}");
        }
        if let Some(f) = &self.failure {
            println!("FAILED          {f}");
        }
    }
}

/// When publishing starts and stops, and the measured window in wall-clock µs.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    stop: Instant,
    warm_us: u64,
    end_us: u64,
}

impl Schedule {
    fn in_window(&self, us: u64) -> bool {
        (self.warm_us..self.end_us).contains(&us)
    }
}

/// Counters every task updates while the run goes on.
#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    received: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn error(&self, kind: &str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.to_string())
            .or_default() += 1;
    }
}

#[derive(Default)]
struct SubTally {
    /// Received inside the window.
    in_window: u64,
    /// Sent inside the window (received whenever).
    of_window: u64,
    latency: Option<Histogram<u64>>,
}

#[derive(Default)]
struct PubTally {
    in_window: u64,
}

/// Two significant digits: 1% resolution is plenty for p50/p99 and keeps a thousand
/// subscribers' histograms at ~20 KiB each.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("constant histogram bounds are valid")
}

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

fn cpu_sample(plan: &Plan) -> Vec<Option<f64>> {
    plan.cpu_pids
        .iter()
        .map(|(_, pid)| cpu_secs(&pid.to_string()))
        .chain([cpu_secs("self")])
        .collect()
}

/// Connects, sends CONNECT, checks the CONNACK.
async fn open(plan: &Plan, id: &str) -> Result<(Box<dyn Io>, BytesMut), String> {
    let tls = match &plan.tls {
        Some((t, _)) => Some(t.for_vehicle(id).map_err(|e| format!("tls: {e}"))?),
        None => None,
    };
    let mut io = timeout(
        HANDSHAKE,
        dial(plan.addr, plan.tls.as_ref().map(|(_, n)| n), None, tls),
    )
    .await
    .map_err(|_| "connect: timeout".to_string())?
    .map_err(|e| format!("connect: {}", e.kind()))?;
    let mut out = BytesMut::new();
    wire::connect(&mut out, id, plan.keep_alive, plan.v5);
    io.write_all(&out)
        .await
        .map_err(|e| format!("write: {}", e.kind()))?;
    let mut buf = BytesMut::with_capacity(4096);
    let (first, body) = timeout(HANDSHAKE, read_packet(&mut io, &mut buf))
        .await
        .map_err(|_| "connack: timeout".to_string())??;
    let code = body.get(1).copied().unwrap_or(0xff);
    if first >> 4 != 2 || code != 0 {
        return Err(format!("connack refused: 0x{code:02x}"));
    }
    Ok((io, buf))
}

/// Writes what `out` holds and empties it; false when the socket failed.
async fn send(io: &mut Box<dyn Io>, out: &mut BytesMut) -> bool {
    let ok = io.write_all(out).await.is_ok();
    out.clear();
    ok
}

/// A clean end: DISCONNECT, then close.
async fn goodbye(io: &mut Box<dyn Io>, out: &mut BytesMut) {
    out.clear();
    wire::disconnect(out);
    let _ = io.write_all(out).await;
    let _ = io.shutdown().await;
}

pub(crate) async fn read_packet(io: &mut Box<dyn Io>, buf: &mut BytesMut) -> Result<(u8, BytesMut), String> {
    loop {
        if let Some(p) = wire::next_packet(buf) {
            return Ok(p);
        }
        match io.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            _ => return Err("closed by broker".into()),
        }
    }
}

/// Waits until publishing starts (`None`: the run was called off).
async fn schedule(
    go: &mut watch::Receiver<Option<Schedule>>,
    cancel: &CancellationToken,
) -> Option<Schedule> {
    tokio::select! {
        _ = cancel.cancelled() => None,
        s = go.wait_for(Option::is_some) => s.ok().and_then(|s| *s),
    }
}

struct Task {
    id: String,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    ready: mpsc::Sender<Result<(), String>>,
    go: watch::Receiver<Option<Schedule>>,
    cancel: CancellationToken,
}

async fn subscriber(mut t: Task, filter: String) -> SubTally {
    let mut tally = SubTally::default();
    let plan = t.plan.clone();
    let subscribed = async {
        let (mut io, mut buf) = open(&plan, &t.id).await?;
        let mut out = BytesMut::new();
        wire::subscribe(&mut out, 1, &filter, plan.qos, plan.v5);
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
            let _ = t.ready.send(Ok(())).await;
            c
        }
        Err(e) => {
            let _ = t.ready.send(Err(e)).await;
            return tally;
        }
    };
    let Some(sched) = schedule(&mut t.go, &t.cancel).await else {
        return tally;
    };
    let mut hist = histogram();
    let mut out = BytesMut::new();
    let ping_every = Duration::from_secs(u64::from(plan.keep_alive.max(2)) / 2);
    let mut next_ping = Instant::now() + ping_every;
    let mut broken = false;
    'run: loop {
        tokio::select! {
            biased;
            _ = t.cancel.cancelled() => break,
            read = io.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    t.shared.error("subscriber: closed by broker");
                    broken = true;
                    break;
                }
                // Everything in one read arrived together: one clock reading for all.
                let now = now_us();
                let mut n = 0;
                while let Some((first, body)) = wire::next_packet(&mut buf) {
                    match first >> 4 {
                        3 => {
                            let Some(p) = wire::parse_publish(first, &body, plan.v5) else {
                                t.shared.error("subscriber: malformed PUBLISH");
                                continue;
                            };
                            if let Some(pkid) = p.pkid {
                                wire::puback(&mut out, pkid);
                            }
                            n += 1;
                            let Some(sent) = p.payload.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                                t.shared.error("subscriber: payload without a timestamp");
                                continue;
                            };
                            let sent = u64::from_be_bytes(sent);
                            if sched.in_window(now) {
                                tally.in_window += 1;
                                let _ = hist.record(now.saturating_sub(sent).max(1));
                            }
                            if sched.in_window(sent) {
                                tally.of_window += 1;
                            }
                        }
                        14 => {
                            t.shared.error("subscriber: disconnected by broker");
                            broken = true;
                            break 'run;
                        }
                        _ => {}
                    }
                }
                t.shared.received.fetch_add(n, Ordering::Relaxed);
                if !out.is_empty() {
                    if !send(&mut io, &mut out).await {
                        t.shared.error("subscriber: write failed");
                        broken = true;
                        break;
                    }
                    next_ping = Instant::now() + ping_every;
                }
            }
            _ = sleep_until(next_ping) => {
                wire::pingreq(&mut out);
                if !send(&mut io, &mut out).await {
                    t.shared.error("subscriber: write failed");
                    broken = true;
                    break;
                }
                next_ping = Instant::now() + ping_every;
            }
        }
    }
    if !broken {
        goodbye(&mut io, &mut out).await;
    }
    tally.latency = Some(hist);
    tally
}

async fn publisher(mut t: Task, index: usize, publishers: usize, topic: String) -> PubTally {
    let mut tally = PubTally::default();
    let plan = t.plan.clone();
    let (mut io, mut buf) = match open(&plan, &t.id).await {
        Ok(c) => {
            let _ = t.ready.send(Ok(())).await;
            c
        }
        Err(e) => {
            let _ = t.ready.send(Err(e)).await;
            return tally;
        }
    };
    let Some(sched) = schedule(&mut t.go, &t.cancel).await else {
        return tally;
    };
    let interval = Duration::from_secs_f64(publishers as f64 / plan.rate);
    // Publishers take turns: the fleet's sends are spread evenly, not bunched per tick.
    let mut next = sched.start + Duration::from_secs_f64(index as f64 / plan.rate);
    let give_up = sched.stop + plan.drain;
    let mut payload = vec![0u8; plan.payload_bytes.max(HEADER)];
    let mut out = BytesMut::new();
    let (mut pkid, mut seq, mut inflight) = (0u16, 0u64, 0usize);
    let ping_every = Duration::from_secs(u64::from(plan.keep_alive.max(2)) / 2);
    let mut next_ping = Instant::now() + ping_every;
    let mut broken = false;
    'run: loop {
        let now = Instant::now();
        let sending = now < sched.stop;
        if !sending && (inflight == 0 || now >= give_up) {
            if inflight > 0 {
                t.shared.error("publisher: PUBACK missing at the drain limit");
            }
            break;
        }
        let window_open = plan.qos == 0 || inflight < plan.window;
        tokio::select! {
            biased;
            _ = t.cancel.cancelled() => break,
            read = io.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    t.shared.error("publisher: closed by broker");
                    broken = true;
                    break;
                }
                while let Some((first, body)) = wire::next_packet(&mut buf) {
                    match first >> 4 {
                        4 => {
                            inflight = inflight.saturating_sub(1);
                            if body.get(2).is_some_and(|r| *r >= 0x80) {
                                t.shared.error("publisher: PUBACK refused");
                            }
                        }
                        14 => {
                            t.shared.error("publisher: disconnected by broker");
                            broken = true;
                            break 'run;
                        }
                        _ => {}
                    }
                }
            }
            _ = sleep_until(next), if sending && window_open && next < sched.stop => {
                // Every message now due (several per timer tick at high rates), within
                // the window; one write for all of them.
                let mut n = 0;
                while next <= Instant::now()
                    && next < sched.stop
                    && (plan.qos == 0 || inflight < plan.window)
                {
                    let ts = now_us();
                    payload[..8].copy_from_slice(&ts.to_be_bytes());
                    payload[8..HEADER].copy_from_slice(&seq.to_be_bytes());
                    if plan.qos > 0 {
                        pkid = pkid.checked_add(1).unwrap_or(1);
                        inflight += 1;
                    }
                    wire::publish(&mut out, &topic, plan.qos, pkid, &payload, plan.v5);
                    if sched.in_window(ts) {
                        tally.in_window += 1;
                    }
                    seq += 1;
                    n += 1;
                    next += interval;
                }
                t.shared.sent.fetch_add(n, Ordering::Relaxed);
                if !send(&mut io, &mut out).await {
                    t.shared.error("publisher: write failed");
                    broken = true;
                    break;
                }
                next_ping = Instant::now() + ping_every;
            }
            _ = sleep_until(sched.stop), if sending => {}
            _ = sleep_until(give_up), if !sending => {}
            _ = sleep_until(next_ping) => {
                wire::pingreq(&mut out);
                if !send(&mut io, &mut out).await {
                    t.shared.error("publisher: write failed");
                    broken = true;
                    break;
                }
                next_ping = Instant::now() + ping_every;
            }
        }
    }
    if !broken {
        goodbye(&mut io, &mut out).await;
    }
    tally
}

/// Collects `n` readiness reports; an error names how many failed and why.
pub(crate) async fn ready(
    rx: &mut mpsc::Receiver<Result<(), String>>,
    n: usize,
    what: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + HANDSHAKE * 2 + Duration::from_secs(5);
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut ok = 0;
    for _ in 0..n {
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(()))) => ok += 1,
            Ok(Some(Err(e))) => *failed.entry(e).or_default() += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if ok == n {
        return Ok(());
    }
    let why: Vec<String> = failed.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
    Err(format!(
        "{ok} of {n} {what} ready ({}); not publishing",
        if why.is_empty() {
            "the rest did not answer in time".to_string()
        } else {
            why.join(", ")
        }
    ))
}

/// Spawns one task per client id, paced at the plan's connect rate.
pub(crate) async fn spawn_paced<T, F>(ids: Vec<String>, connect_rate: f64, mut spawn: F) -> Vec<JoinHandle<T>>
where
    F: FnMut(usize, String) -> JoinHandle<T>,
{
    let pace = Duration::from_secs_f64(1.0 / connect_rate.max(1.0));
    let mut next = Instant::now();
    let mut tasks = Vec::with_capacity(ids.len());
    for (i, id) in ids.into_iter().enumerate() {
        tasks.push(spawn(i, id));
        next += pace;
        sleep_until(next).await;
    }
    tasks
}

pub async fn run(plan: Plan) -> Report {
    let plan = Arc::new(plan);
    let (publishers, subscribers) = match plan.pattern {
        Pattern::FanOut => (1, plan.clients),
        Pattern::FanIn => (plan.clients, 1),
    };
    // Subscribers each message reaches.
    let reach = match plan.pattern {
        Pattern::FanOut => subscribers as u64,
        Pattern::FanIn => 1,
    };
    let mut report = Report {
        pattern: plan.pattern.name().into(),
        qos: plan.qos,
        publishers,
        subscribers,
        offered_per_sec: plan.rate,
        window_secs: plan.duration.as_secs_f64(),
        ..Report::default()
    };
    let shared = Arc::new(Shared::default());
    let cancel = CancellationToken::new();
    let (go_tx, go) = watch::channel(None);
    let p = &plan.id_prefix;
    let task = |id: String, ready: &mpsc::Sender<Result<(), String>>| Task {
        id,
        plan: plan.clone(),
        shared: shared.clone(),
        ready: ready.clone(),
        go: go.clone(),
        cancel: cancel.clone(),
    };

    // Subscribers first, every SUBACK in, then the publishers.
    let (ready_tx, mut ready_rx) = mpsc::channel(subscribers.max(1));
    let (sub_ids, filter) = match plan.pattern {
        Pattern::FanOut => (
            (0..subscribers).map(|i| format!("{p}-sub-{i}")).collect(),
            plan.topic.clone(),
        ),
        Pattern::FanIn => (vec![format!("{p}-sub")], "vehicles/+/telemetry".to_string()),
    };
    let subs = spawn_paced(sub_ids, plan.connect_rate, |_, id| {
        tokio::spawn(subscriber(task(id, &ready_tx), filter.clone()))
    })
    .await;
    let stage = ready(&mut ready_rx, subscribers, "subscribers").await;
    let (ready_tx, mut ready_rx) = mpsc::channel(publishers.max(1));
    let pubs = match stage {
        Ok(()) => {
            let pub_ids = match plan.pattern {
                Pattern::FanOut => vec![format!("{p}-pub")],
                Pattern::FanIn => (0..publishers).map(|i| format!("{p}-{i}")).collect(),
            };
            let pubs = spawn_paced(pub_ids, plan.connect_rate, |i, id| {
                let topic = match plan.pattern {
                    Pattern::FanOut => plan.topic.clone(),
                    Pattern::FanIn => format!("vehicles/{id}/telemetry"),
                };
                tokio::spawn(publisher(task(id, &ready_tx), i, publishers, topic))
            })
            .await;
            report.failure = ready(&mut ready_rx, publishers, "publishers").await.err();
            pubs
        }
        Err(e) => {
            report.failure = Some(e);
            Vec::new()
        }
    };
    if report.failure.is_some() {
        cancel.cancel();
        report.errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
        return report;
    }

    let start = Instant::now();
    let warm_us = now_us() + plan.warmup.as_micros() as u64;
    let sched = Schedule {
        start,
        stop: start + plan.warmup + plan.duration,
        warm_us,
        end_us: warm_us + plan.duration.as_micros() as u64,
    };
    let _ = go_tx.send(Some(sched));
    sleep_until(start + plan.warmup).await;
    let cpu0 = cpu_sample(&plan);
    if !plan.warmup.is_zero() && shared.received.load(Ordering::Relaxed) == 0 {
        report.failure = Some(format!(
            "nothing delivered to any subscriber during the {:.0} s warm-up ({} messages published, \
             every SUBACK granted): the broker does not deliver to subscribers",
            plan.warmup.as_secs_f64(),
            shared.sent.load(Ordering::Relaxed)
        ));
    } else {
        sleep_until(sched.stop).await;
    }
    let cpu1 = cpu_sample(&plan);
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

    // Drain: until everything sent has arrived, nothing arrives for a while, or the limit.
    if report.failure.is_none() {
        let limit = sched.stop + plan.drain;
        let (mut last, mut quiet_since) = (u64::MAX, Instant::now());
        while Instant::now() < limit {
            let received = shared.received.load(Ordering::Relaxed);
            let all_sent = pubs.iter().all(|p| p.is_finished());
            if all_sent && received >= shared.sent.load(Ordering::Relaxed) * reach {
                break;
            }
            if received != last {
                (last, quiet_since) = (received, Instant::now());
            } else if all_sent && quiet_since.elapsed() >= QUIET {
                break;
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
    cancel.cancel();

    let mut hist = histogram();
    let mut of_window = 0;
    for s in subs {
        if let Ok(Ok(t)) = timeout(Duration::from_secs(10), s).await {
            report.delivered += t.in_window;
            of_window += t.of_window;
            if let Some(h) = t.latency {
                let _ = hist.add(&h);
            }
        }
    }
    for p in pubs {
        if let Ok(Ok(t)) = timeout(Duration::from_secs(10), p).await {
            report.published += t.in_window;
        }
    }
    let secs = plan.duration.as_secs_f64().max(1e-9);
    report.published_per_sec = report.published as f64 / secs;
    report.delivered_per_sec = report.delivered as f64 / secs;
    let expected = report.published * reach;
    report.completeness = of_window as f64 / expected.max(1) as f64;
    report.latency = Latency::of(&hist);
    report.errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if report.failure.is_none() && report.published == 0 {
        report.failure = Some("nothing was published inside the window".into());
    } else if report.failure.is_none() && report.delivered == 0 {
        report.failure = Some("nothing was delivered to any subscriber inside the window".into());
    }
    report
}
