//! A fleet of well-behaved vehicles for the fault suite: each publishes QoS 1 over its
//! own MQTT 3.1.1 connection with a unique id in every payload (`<client id>:<counter>`),
//! keeps up to `window` publishes in flight, records every PUBACK, and behaves as a
//! device does when the gateway goes away: it reconnects (to whatever address the test
//! currently names) and re-sends every publish that was not acknowledged, in order.
//!
//! After the run, [`VehicleLog`] says what was acknowledged and how often each counter
//! was sent, so a test can tell gateway replays (same journal record produced twice)
//! from client retries (a new journal record for the same counter).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Client ids are `<prefix>-<n>` (n zero-padded to 3 digits).
    pub prefix: String,
    pub vehicles: usize,
    /// Publishes in flight per vehicle (keep it ≤ `mqtt.max_inflight`).
    pub window: usize,
    /// Pause between two publishes of one vehicle (zero: as fast as the window allows).
    pub pace: Duration,
    /// Extra payload bytes after the id (padding).
    pub padding: usize,
}

impl FleetConfig {
    pub fn new(prefix: &str, vehicles: usize) -> FleetConfig {
        FleetConfig {
            prefix: prefix.to_string(),
            vehicles,
            window: 8,
            pace: Duration::from_millis(10),
            padding: 0,
        }
    }
}

/// What one vehicle did.
#[derive(Debug, Default, Clone)]
pub struct VehicleLog {
    pub id: String,
    /// Counters in the order their PUBACKs arrived.
    pub acked: Vec<u64>,
    /// How many times each counter was sent (more than once: re-sent after a reconnect).
    pub sent: HashMap<u64, u32>,
    /// Successful CONNECTs (the first one included).
    pub connects: u64,
    /// Next counter that was never sent.
    pub next: u64,
}

impl VehicleLog {
    /// Counters sent more than once (client retries after a lost connection).
    pub fn resent(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.sent.iter().filter(|(_, n)| **n > 1).map(|(c, n)| (*c, *n))
    }
}

/// Splits a fleet payload `<client id>:<counter>[ padding]` into its parts.
pub fn parse_payload(payload: &str) -> Option<(&str, u64)> {
    let head = payload.split(' ').next()?;
    let (id, n) = head.rsplit_once(':')?;
    Some((id, n.parse().ok()?))
}

pub struct Fleet {
    addr: Arc<Mutex<SocketAddr>>,
    stop_new: Arc<AtomicBool>,
    abort: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    logs: Vec<Arc<Mutex<VehicleLog>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Fleet {
    pub fn start(addr: SocketAddr, cfg: &FleetConfig) -> Fleet {
        let addr = Arc::new(Mutex::new(addr));
        let stop_new = Arc::new(AtomicBool::new(false));
        let abort = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let mut logs = Vec::new();
        let mut threads = Vec::new();
        for n in 0..cfg.vehicles {
            let id = format!("{}-{n:03}", cfg.prefix);
            let log = Arc::new(Mutex::new(VehicleLog {
                id: id.clone(),
                ..VehicleLog::default()
            }));
            logs.push(log.clone());
            let v = Vehicle {
                id,
                cfg: cfg.clone(),
                addr: addr.clone(),
                stop_new: stop_new.clone(),
                abort: abort.clone(),
                paused: paused.clone(),
                acked: acked.clone(),
                log,
            };
            threads.push(std::thread::spawn(move || v.run()));
        }
        Fleet {
            addr,
            stop_new,
            abort,
            paused,
            acked,
            logs,
            threads,
        }
    }

    /// Where vehicles connect from now on (e.g. a restarted gateway's new port).
    pub fn set_addr(&self, addr: SocketAddr) {
        *self.addr.lock().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    /// PUBACKs received by the whole fleet so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// PUBACKs received so far by each vehicle (in fleet order): a mark to audit from.
    pub fn acked_per_vehicle(&self) -> Vec<usize> {
        self.logs
            .iter()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).acked.len())
            .collect()
    }

    /// Waits until the fleet has `count` PUBACKs; returns whether it did within `within`.
    pub fn wait_acked(&self, count: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.acked() < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.acked() >= count
    }

    /// Stops (true) or resumes (false) sending new messages; in-flight ones still complete.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Stops sending new messages, waits up to `within` for every in-flight publish to be
    /// acknowledged (reconnecting and re-sending as needed), and returns the logs.
    /// The second value is whether everything in flight was acknowledged.
    pub fn finish(mut self, within: Duration) -> (Vec<VehicleLog>, bool) {
        self.stop_new.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && self.threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let complete = self.threads.iter().all(|t| t.is_finished());
        self.abort.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let logs = self
            .logs
            .iter()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        (logs, complete)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.abort.store(true, Ordering::Relaxed);
    }
}

struct Vehicle {
    id: String,
    cfg: FleetConfig,
    addr: Arc<Mutex<SocketAddr>>,
    stop_new: Arc<AtomicBool>,
    abort: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    log: Arc<Mutex<VehicleLog>>,
}

/// One MQTT 3.1.1 connection of a fleet vehicle.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    fn open(addr: SocketAddr, id: &str) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut c = Conn {
            stream,
            buf: BytesMut::new(),
        };
        let mut connect = v4::Connect::new(id);
        connect.keep_alive = 60;
        let mut out = BytesMut::new();
        connect
            .write(&mut out)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        c.stream.write_all(&out)?;
        match c.read_packet()? {
            Some(p) if p.first() == Some(&0x20) && p.get(3) == Some(&0) => {
                c.stream.set_read_timeout(Some(Duration::from_millis(20)))?;
                Ok(c)
            }
            other => Err(std::io::Error::other(format!("CONNACK refused: {other:?}"))),
        }
    }

    fn publish(&mut self, topic: &str, pkid: u16, payload: &[u8]) -> std::io::Result<()> {
        let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = pkid;
        let mut out = BytesMut::new();
        p.write(&mut out)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        self.stream.write_all(&out)
    }

    /// A whole packet; `Ok(None)` when the read timed out; `Err` when the connection ended.
    fn read_packet(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(total) = frame_len(&self.buf) {
                if self.buf.len() >= total {
                    return Ok(Some(self.buf.split_to(total).to_vec()));
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, b) in buf.iter().enumerate().take(5).skip(1) {
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some(1 + i + len);
        }
    }
    None
}

impl Vehicle {
    fn run(self) {
        let topic = format!("vehicles/{}/telemetry", self.id);
        let padding = " ".to_string() + &"x".repeat(self.cfg.padding);
        let mut conn: Option<Conn> = None;
        // (pkid, counter) sent and not yet acknowledged, oldest first.
        let mut pending: VecDeque<(u16, u64)> = VecDeque::new();
        let mut next: u64 = 0;
        let mut pkid: u16 = 0;
        // Pacing by credit: publish n is due at base + n × pace, so that coarse timer
        // granularity (read timeouts round up to the kernel tick) does not lower the rate.
        let mut base = Instant::now();
        let mut since_base: u32 = 0;
        let pace = self.cfg.pace;
        let due_at = |base: Instant, n: u32| base + pace * n;
        let payload = |n: u64| {
            if self.cfg.padding > 0 {
                format!("{}:{n}{padding}", self.id)
            } else {
                format!("{}:{n}", self.id)
            }
        };
        let count_send = |n: u64| {
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            *log.sent.entry(n).or_insert(0) += 1;
            log.next = log.next.max(n + 1);
        };
        while !self.abort.load(Ordering::Relaxed) {
            let stopping = self.stop_new.load(Ordering::Relaxed);
            if stopping && pending.is_empty() {
                break;
            }
            let Some(c) = conn.as_mut() else {
                let addr = *self.addr.lock().unwrap_or_else(|e| e.into_inner());
                match Conn::open(addr, &self.id) {
                    Ok(mut c) => {
                        self.log.lock().unwrap_or_else(|e| e.into_inner()).connects += 1;
                        // A device re-sends what was never acknowledged, in order.
                        let mut ok = true;
                        for (p, n) in &pending {
                            count_send(*n);
                            if c.publish(&topic, *p, payload(*n).as_bytes()).is_err() {
                                ok = false;
                                break;
                            }
                        }
                        if ok {
                            conn = Some(c);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
                continue;
            };
            let mut broken = false;
            if Instant::now() > due_at(base, since_base + self.cfg.window as u32) {
                // Far behind (an outage): drop the missed credit instead of bursting.
                base = Instant::now();
                since_base = 0;
            }
            while !stopping
                && !self.paused.load(Ordering::Relaxed)
                && pending.len() < self.cfg.window
                && Instant::now() >= due_at(base, since_base)
            {
                pkid = pkid % 65_000 + 1;
                let n = next;
                next += 1;
                pending.push_back((pkid, n));
                count_send(n);
                since_base += 1;
                if c.publish(&topic, pkid, payload(n).as_bytes()).is_err() {
                    broken = true;
                    break;
                }
            }
            if !broken {
                // Wait for a PUBACK no longer than until the next publish is due.
                let can_send =
                    !stopping && !self.paused.load(Ordering::Relaxed) && pending.len() < self.cfg.window;
                let wait = if can_send {
                    due_at(base, since_base).saturating_duration_since(Instant::now())
                } else {
                    Duration::from_millis(20)
                };
                let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(20));
                if c.stream.set_read_timeout(Some(wait)).is_err() {
                    broken = true;
                }
            }
            if !broken {
                match c.read_packet() {
                    Ok(Some(p)) if p.first() == Some(&0x40) && p.len() >= 4 => {
                        let id = u16::from_be_bytes([p[2], p[3]]);
                        if let Some(pos) = pending.iter().position(|(k, _)| *k == id) {
                            let (_, n) = pending.remove(pos).unwrap_or_default();
                            self.log.lock().unwrap_or_else(|e| e.into_inner()).acked.push(n);
                            self.acked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => broken = true,
                }
            }
            if broken {
                conn = None;
            }
        }
        if let Some(mut c) = conn {
            let _ = c.stream.write_all(&[0xE0, 0x00]);
        }
    }
}
