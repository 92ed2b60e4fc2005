//! Hostile clients for the fault suite, each a load that runs on its own threads until
//! stopped, beside a well-behaved fleet: slowloris CONNECTs, slow TLS handshakes, a
//! connection flood, clients that never read their PUBACKs, QoS 1 floods past Receive
//! Maximum, one client with 10,000 subscriptions, reconnect storms. Each reports what
//! the gateway did to it (connections closed, packets received) so a test can assert
//! containment and a measuring program can compare the fleet's throughput.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;

use crate::raw::put_len;

/// Counters a load keeps while it runs.
#[derive(Default, Debug)]
pub struct Tally {
    /// Connections opened.
    pub opened: AtomicU64,
    /// Connections the gateway closed (EOF, reset, or writes refused).
    pub closed: AtomicU64,
    /// CONNACKs with return/reason code 0.
    pub connacks_ok: AtomicU64,
    /// CONNACKs refusing (any non-zero code), and the last such code.
    pub connacks_refused: AtomicU64,
    pub last_refusal: AtomicU64,
    /// SUBACK entries granted / refused.
    pub granted: AtomicU64,
    pub refused: AtomicU64,
    /// DISCONNECT reason codes received (last one).
    pub disconnect_reason: AtomicU64,
    /// PUBLISH packets written.
    pub published: AtomicU64,
    /// Writes that would block (the gateway stopped reading us), episodes.
    pub blocked: AtomicU64,
    /// Clients whose writes stayed blocked for 2 s (the gateway stopped reading them).
    pub stuck: AtomicU64,
}

impl Tally {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}

/// A running hostile load.
pub struct Load {
    pub name: &'static str,
    pub tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn new(name: &'static str) -> (Load, Arc<AtomicBool>, Arc<Tally>) {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        (
            Load {
                name,
                tally: tally.clone(),
                stop: stop.clone(),
                threads: Vec::new(),
            },
            stop,
            tally,
        )
    }

    /// Stops the load and closes its connections.
    pub fn stop(mut self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.tally.clone()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn connect_frame(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut c = v4::Connect::new(client_id);
    c.keep_alive = keep_alive;
    let mut out = BytesMut::new();
    c.write(&mut out).expect("encode connect");
    out.to_vec()
}

/// MQTT 5 CONNECT with no properties.
pub fn connect5_frame(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut p = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x02];
    p.extend_from_slice(&keep_alive.to_be_bytes());
    p.push(0);
    p.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    p.extend_from_slice(client_id.as_bytes());
    let mut frame = vec![0x10];
    put_len(&mut frame, p.len());
    frame.extend_from_slice(&p);
    frame
}

fn publish_frame(topic: &str, pkid: u16, payload: &[u8], v5: bool) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    let mut frame = vec![0x32];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

fn subscribe_frame(pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(1);
    let mut frame = vec![0x82];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

/// Whole packets in `buf` (drained); a partial one stays.
fn packets(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let mut len = 0usize;
        let mut total = None;
        for (i, b) in buf.iter().enumerate().take(5).skip(1) {
            len |= ((b & 0x7f) as usize) << (7 * (i - 1));
            if b & 0x80 == 0 {
                total = Some(1 + i + len);
                break;
            }
        }
        match total {
            Some(t) if buf.len() >= t => out.push(buf.drain(..t).collect()),
            _ => return out,
        }
    }
}

/// Reads what is there without blocking long; `false` when the connection is gone.
fn poll_read(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    match s.read(&mut chunk) {
        Ok(0) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
        Err(_) => false,
    }
}

/// `n` connections that dribble a CONNECT one byte every `every` (slowloris).
pub fn slowloris(addr: SocketAddr, n: usize, every: Duration) -> Load {
    let (mut load, stop, tally) = Load::new("slowloris CONNECTs");
    load.threads.push(std::thread::spawn(move || {
        let frame = connect_frame("slowloris", 30);
        let mut conns: Vec<Option<(TcpStream, usize)>> = (0..n)
            .map(|_| {
                let s = TcpStream::connect(addr).ok()?;
                s.set_read_timeout(Some(Duration::from_millis(1))).ok()?;
                tally.opened.fetch_add(1, Ordering::Relaxed);
                Some((s, 0))
            })
            .collect();
        while !stop.load(Ordering::Relaxed) {
            for slot in conns.iter_mut() {
                let Some((s, pos)) = slot.as_mut() else { continue };
                let byte = frame[*pos % frame.len()];
                let mut scratch = Vec::new();
                let alive = s.write_all(&[byte]).is_ok() && poll_read(s, &mut scratch);
                *pos += 1;
                if !alive {
                    tally.closed.fetch_add(1, Ordering::Relaxed);
                    *slot = None;
                }
            }
            std::thread::sleep(every);
        }
    }));
    load
}

/// `n` connections to the TLS listener that send the first bytes of a ClientHello
/// record header and then nothing.
pub fn slow_tls(addr: SocketAddr, n: usize) -> Load {
    let (mut load, stop, tally) = Load::new("slow TLS handshakes");
    load.threads.push(std::thread::spawn(move || {
        let mut conns: Vec<Option<TcpStream>> = (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(addr).ok()?;
                s.set_read_timeout(Some(Duration::from_millis(1))).ok()?;
                s.write_all(&[0x16, 0x03, 0x01]).ok()?;
                tally.opened.fetch_add(1, Ordering::Relaxed);
                Some(s)
            })
            .collect();
        while !stop.load(Ordering::Relaxed) {
            for slot in conns.iter_mut() {
                let Some(s) = slot.as_mut() else { continue };
                let mut scratch = Vec::new();
                if !poll_read(s, &mut scratch) {
                    tally.closed.fetch_add(1, Ordering::Relaxed);
                    *slot = None;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }));
    load
}

/// `n` connections, each sending a 3.1.1 CONNECT at once and then staying idle; counts
/// CONNACKs (accepted / refused with which code) and closes.
pub fn connection_flood(addr: SocketAddr, n: usize) -> Load {
    let (mut load, stop, tally) = Load::new("connection flood");
    load.threads.push(std::thread::spawn(move || {
        let mut conns: Vec<Option<(TcpStream, Vec<u8>, bool)>> = (0..n)
            .map(|i| {
                let mut s = TcpStream::connect(addr).ok()?;
                s.set_read_timeout(Some(Duration::from_millis(1))).ok()?;
                tally.opened.fetch_add(1, Ordering::Relaxed);
                let _ = s.write_all(&connect_frame(&format!("flood-{i}"), 60));
                Some((s, Vec::new(), false))
            })
            .collect();
        while !stop.load(Ordering::Relaxed) {
            for slot in conns.iter_mut() {
                let Some((s, buf, answered)) = slot.as_mut() else {
                    continue;
                };
                let alive = poll_read(s, buf);
                for p in packets(buf) {
                    if p[0] == 0x20 && !*answered && p.len() >= 4 {
                        *answered = true;
                        if p[3] == 0 {
                            tally.connacks_ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.connacks_refused.fetch_add(1, Ordering::Relaxed);
                            tally.last_refusal.store(u64::from(p[3]), Ordering::Relaxed);
                        }
                    }
                }
                if !alive {
                    tally.closed.fetch_add(1, Ordering::Relaxed);
                    *slot = None;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }));
    load
}

/// `n` clients that publish QoS 1 as fast as their socket takes it and never read a
/// PUBACK: the gateway's writes to them back up until both socket buffers are full.
/// Their receive buffers are shrunk to 4 KiB so that this happens in seconds.
pub fn never_read(addr: SocketAddr, n: usize, keep_alive: u16) -> Load {
    let (mut load, stop, tally) = Load::new("clients that never read");
    for i in 0..n {
        let (stop, tally) = (stop.clone(), tally.clone());
        load.threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            let Ok(stream) = rt.block_on(async {
                let sock = tokio::net::TcpSocket::new_v4()?;
                sock.set_recv_buffer_size(4096)?;
                let s = sock.connect(addr).await?;
                s.into_std()
            }) else {
                return;
            };
            let mut s = stream;
            let _ = s.set_nonblocking(false);
            let id = format!("deaf-{i}");
            if s.write_all(&connect_frame(&id, keep_alive)).is_err() {
                return;
            }
            tally.opened.fetch_add(1, Ordering::Relaxed);
            let _ = s.set_nonblocking(true);
            let topic = format!("vehicles/{id}/telemetry");
            let mut pkid: u16 = 0;
            let mut pending: Vec<u8> = Vec::new();
            let mut blocked_since: Option<Instant> = None;
            let mut stuck = false;
            while !stop.load(Ordering::Relaxed) {
                if pending.is_empty() {
                    pkid = pkid % 65_000 + 1;
                    pending = publish_frame(&topic, pkid, b"deaf", false);
                }
                match s.write(&pending) {
                    Ok(0) => break,
                    Ok(k) => {
                        pending.drain(..k);
                        if pending.is_empty() {
                            tally.published.fetch_add(1, Ordering::Relaxed);
                        }
                        blocked_since = None;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        let since = *blocked_since.get_or_insert_with(|| {
                            tally.blocked.fetch_add(1, Ordering::Relaxed);
                            Instant::now()
                        });
                        if !stuck && since.elapsed() >= Duration::from_secs(2) {
                            stuck = true;
                            tally.stuck.fetch_add(1, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => {
                        tally.closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    load
}

/// An MQTT 5 client that sends `burst` QoS 1 publishes in one write, past the Receive
/// Maximum the gateway advertised, then reads until it is closed.
pub fn receive_max_flood(addr: SocketAddr, burst: usize) -> Load {
    let (mut load, stop, tally) = Load::new("QoS 1 flood past Receive Maximum");
    load.threads.push(std::thread::spawn(move || {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        tally.opened.fetch_add(1, Ordering::Relaxed);
        let _ = s.write_all(&connect5_frame("rxmax", 60));
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        for k in 0..burst {
            frames.extend(publish_frame(
                "vehicles/rxmax/telemetry",
                (k % 65_000) as u16 + 1,
                b"flood",
                true,
            ));
        }
        let _ = s.write_all(&frames);
        tally.published.fetch_add(burst as u64, Ordering::Relaxed);
        while !stop.load(Ordering::Relaxed) {
            let alive = poll_read(&mut s, &mut buf);
            for p in packets(&mut buf) {
                if p[0] == 0xE0 && p.len() >= 3 {
                    tally.disconnect_reason.store(u64::from(p[2]), Ordering::Relaxed);
                }
            }
            if !alive {
                tally.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }));
    load
}

/// One 3.1.1 client (`subhog`) sending `n` SUBSCRIBEs of one filter each (all within the
/// default subscribe ACL), reading SUBACKs as they come.
pub fn subscription_hog(addr: SocketAddr, n: usize) -> Load {
    let (mut load, stop, tally) = Load::new("10,000 subscriptions");
    load.threads.push(std::thread::spawn(move || {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(5)));
        tally.opened.fetch_add(1, Ordering::Relaxed);
        let _ = s.write_all(&connect_frame("subhog", 60));
        let mut buf = Vec::new();
        let mut sent = 0usize;
        let count = |buf: &mut Vec<u8>| {
            for p in packets(buf) {
                match p[0] {
                    0x90 => {
                        for code in &p[4..] {
                            if *code < 0x80 {
                                tally.granted.fetch_add(1, Ordering::Relaxed);
                            } else {
                                tally.refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    0xE0 if p.len() >= 3 => {
                        tally.disconnect_reason.store(u64::from(p[2]), Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        };
        while !stop.load(Ordering::Relaxed) {
            if sent < n {
                let mut batch = Vec::new();
                for k in sent..(sent + 100).min(n) {
                    batch.extend(subscribe_frame(
                        (k % 65_000) as u16 + 1,
                        &format!("vehicles/subhog/commands/{k}"),
                    ));
                }
                sent = (sent + 100).min(n);
                if s.write_all(&batch).is_err() {
                    tally.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            let alive = poll_read(&mut s, &mut buf);
            count(&mut buf);
            if !alive {
                tally.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if sent >= n {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }));
    load
}

/// `threads` loops connecting as one of `ids` client ids (taking each other's sessions
/// over), half of them leaving without DISCONNECT, as fast as they can.
pub fn reconnect_storm(addr: SocketAddr, threads: usize, ids: usize) -> Load {
    let (mut load, stop, tally) = Load::new("reconnect storm");
    for t in 0..threads {
        let (stop, tally) = (stop.clone(), tally.clone());
        load.threads.push(std::thread::spawn(move || {
            let mut k = t;
            while !stop.load(Ordering::Relaxed) {
                k += threads;
                let Ok(mut s) = TcpStream::connect(addr) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                tally.opened.fetch_add(1, Ordering::Relaxed);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                if s.write_all(&connect_frame(&format!("storm-{}", k % ids), 30))
                    .is_err()
                {
                    continue;
                }
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && buf[0] == 0x20 {
                    if buf[3] == 0 {
                        tally.connacks_ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.connacks_refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if k % 2 == 0 {
                    let _ = s.write_all(&[0xE0, 0x00]);
                }
            }
        }));
    }
    load
}
