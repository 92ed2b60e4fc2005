//! One simulated vehicle: connect (from its source address, over TCP or TLS), CONNACK,
//! optionally subscribe to its command topic, then publish telemetry at its pace and
//! time each PUBACK.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::time::{sleep_until, Instant};
use tokio_rustls::TlsConnector;

use crate::report::{histogram, Stats};
use crate::wire;

/// What every vehicle of a run does.
pub struct Plan {
    pub addr: SocketAddr,
    pub tls_server_name: Option<rustls::pki_types::ServerName<'static>>,
    pub v5: bool,
    pub qos: u8,
    pub keep_alive: u16,
    /// Time between two publishes of one vehicle; `None` = as fast as the window allows.
    pub interval: Option<Duration>,
    /// Messages per vehicle; 0 = until the deadline.
    pub messages: u64,
    /// QoS1 publishes in flight per vehicle.
    pub window: usize,
    pub start: Instant,
    pub deadline: Instant,
    /// Connect and hold the connection, publishing nothing.
    pub idle: bool,
    pub subscribe_commands: bool,
    pub topic_prefix: String,
    pub payload_bytes: usize,
}

/// A broker connection, plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Wall-clock microseconds: what payload timestamps carry, so that any process on the
/// same host can time a message.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Realistic telemetry: position, speed, battery, odometer, sequence and send time.
fn telemetry(id: &str, seq: u64, pad: usize) -> Vec<u8> {
    let t = seq as f64;
    let mut s = format!(
        "{{\"vin\":\"{id}\",\"seq\":{seq},\"ts_us\":{},\"lat\":{:.6},\"lon\":{:.6},\"speed_kmh\":{:.1},\
         \"battery_pct\":{:.1},\"odometer_km\":{:.3}}}",
        now_us(),
        48.137 + (t * 0.0001).sin() * 0.05,
        11.575 + (t * 0.0001).cos() * 0.05,
        60.0 + (t * 0.01).sin() * 40.0,
        (90.0 - t * 0.001).max(5.0),
        12_000.0 + t * 0.01,
    );
    if s.len() < pad {
        s.insert_str(
            s.len() - 1,
            &format!(",\"pad\":\"{}\"", "x".repeat(pad - s.len() - 9)),
        );
    }
    s.into_bytes()
}

/// Opens a connection to `addr` (from `source` if given), with TLS when both a client
/// config and a server name are given.
pub async fn dial(
    addr: SocketAddr,
    server_name: Option<&rustls::pki_types::ServerName<'static>>,
    source: Option<IpAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> std::io::Result<Box<dyn Io>> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    match (tls, server_name) {
        (Some(cfg), Some(name)) => {
            let s = TlsConnector::from(cfg).connect(name.clone(), stream).await?;
            Ok(Box::new(s))
        }
        _ => Ok(Box::new(stream)),
    }
}

/// Runs one vehicle to the plan's end; every outcome lands in `stats`.
pub async fn run(
    id: String,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    source: Option<IpAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
) {
    let mut io = match tokio::time::timeout(
        Duration::from_secs(30),
        dial(plan.addr, plan.tls_server_name.as_ref(), source, tls),
    )
    .await
    {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return stats.error(&format!("connect: {}", e.kind())),
        Err(_) => return stats.error("connect: timeout"),
    };
    let mut out = BytesMut::new();
    wire::connect(&mut out, &id, plan.keep_alive, plan.v5);
    if plan.subscribe_commands {
        wire::subscribe(
            &mut out,
            1,
            &format!("{}/{id}/commands/#", plan.topic_prefix),
            1,
            plan.v5,
        );
    }
    if io.write_all(&out).await.is_err() {
        return stats.error("write: connect");
    }
    out.clear();
    let mut buf = BytesMut::with_capacity(4096);
    // CONNACK first.
    loop {
        if let Some((first, body)) = wire::next_packet(&mut buf) {
            let code = body.get(1).copied().unwrap_or(0xff);
            if first != 0x20 || code != 0 {
                return stats.error(&format!("connack refused: {code}"));
            }
            break;
        }
        match tokio::time::timeout(Duration::from_secs(30), io.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return stats.error("connack: no answer"),
        }
    }
    stats.connected.fetch_add(1, Ordering::Relaxed);
    stats
        .last_connect_us
        .fetch_max(plan.start.elapsed().as_micros() as u64, Ordering::Relaxed);

    let topic = format!("{}/{id}/telemetry", plan.topic_prefix);
    let mut hist = histogram();
    let mut cmd_hist = histogram();
    let mut samples = Vec::new();
    let mut inflight: VecDeque<(u16, Instant)> = VecDeque::new();
    let mut pkid: u16 = 1;
    let mut seq: u64 = 0;
    let mut next_send = Instant::now();
    let keep_alive = Duration::from_secs(u64::from(plan.keep_alive.max(1)));
    let mut next_ping = Instant::now() + keep_alive;
    let mut broken = None;
    'run: loop {
        let done_sending = plan.idle || (plan.messages > 0 && seq >= plan.messages);
        if done_sending && inflight.is_empty() && !plan.idle {
            break;
        }
        let window_open = plan.qos == 0 || inflight.len() < plan.window;
        let can_send = !done_sending && window_open;
        let send_at = if plan.interval.is_some() {
            next_send
        } else {
            Instant::now()
        };
        tokio::select! {
            biased;
            _ = sleep_until(plan.deadline) => break,
            read = io.read_buf(&mut buf) => {
                match read {
                    Ok(0) | Err(_) => { broken = Some("closed by broker"); break }
                    Ok(_) => {}
                }
                while let Some((first, body)) = wire::next_packet(&mut buf) {
                    match first >> 4 {
                        4 => {
                            let id = u16::from_be_bytes([body.first().copied().unwrap_or(0), body.get(1).copied().unwrap_or(0)]);
                            let reason = body.get(2).copied().unwrap_or(0);
                            if let Some(pos) = inflight.iter().position(|(p, _)| *p == id) {
                                let (_, sent_at) = inflight.remove(pos).unwrap_or((0, Instant::now()));
                                let us = sent_at.elapsed().as_micros() as u64;
                                let _ = hist.record(us.max(1));
                                if hist.len() % 64 == 1 {
                                    samples.push((plan.start.elapsed().as_secs_f64(), us));
                                }
                            }
                            if reason >= 0x80 {
                                stats.refused.fetch_add(1, Ordering::Relaxed);
                            } else {
                                stats.acked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        3 => {
                            // A command: acknowledge QoS1 (or the broker stops delivering),
                            // then time it from the sender's timestamp in the payload.
                            if (first >> 1) & 0b11 == 1 {
                                let tlen = usize::from(u16::from_be_bytes([body.first().copied().unwrap_or(0), body.get(1).copied().unwrap_or(0)]));
                                if let (Some(a), Some(b)) = (body.get(2 + tlen), body.get(3 + tlen)) {
                                    out.extend_from_slice(&[0x40, 0x02, *a, *b]);
                                }
                            }
                            let text = String::from_utf8_lossy(&body);
                            if let Some(ts) = text.split("\"ts_us\":").nth(1).and_then(|r| r.split([',', '}']).next()).and_then(|v| v.parse::<u64>().ok()) {
                                let _ = cmd_hist.record(now_us().saturating_sub(ts).max(1));
                                stats.commands.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        14 => { broken = Some("disconnected by broker"); break 'run }
                        _ => {}
                    }
                }
                if !out.is_empty() {
                    if io.write_all(&out).await.is_err() { broken = Some("write failed"); break }
                    out.clear();
                }
            }
            _ = sleep_until(send_at), if can_send => {
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                let payload = telemetry(&id, seq, plan.payload_bytes);
                wire::publish(&mut out, &topic, plan.qos, pkid, &payload, plan.v5);
                if plan.qos > 0 {
                    inflight.push_back((pkid, Instant::now()));
                }
                seq += 1;
                stats.sent.fetch_add(1, Ordering::Relaxed);
                if let Some(iv) = plan.interval {
                    next_send += iv;
                }
                if let Err(_e) = io.write_all(&out).await {
                    broken = Some("write failed");
                    break;
                }
                out.clear();
                next_ping = Instant::now() + keep_alive;
            }
            _ = sleep_until(next_ping), if plan.keep_alive > 0 => {
                wire::pingreq(&mut out);
                if io.write_all(&out).await.is_err() { broken = Some("write failed"); break }
                out.clear();
                next_ping = Instant::now() + keep_alive;
            }
        }
    }
    if let Some(kind) = broken {
        stats.error(kind);
    } else {
        wire::disconnect(&mut out);
        let _ = io.write_all(&out).await;
        let _ = io.shutdown().await;
    }
    Stats::merge(&stats.latency, &hist);
    if !cmd_hist.is_empty() {
        Stats::merge(&stats.command_latency, &cmd_hist);
    }
    stats
        .samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(samples);
}
