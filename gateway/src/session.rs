//! One vehicle connection, from its CONNECT to its close.
//!
//! The ingest rule lives here: a QoS1 PUBLISH is appended to the journal and its PUBACK
//! is written only once the journal's durable watermark covers the record. PUBACKs leave
//! in arrival order (a denied publish waits behind the accepted ones before it). At most
//! `mqtt.max_inflight` QoS1 publishes wait per session: an MQTT 5 client that sends
//! more violates the Receive Maximum we advertised and is disconnected (0x93); reading
//! from a 3.1.1 client pauses until PUBACKs drain. When the journal is full, `append`
//! waits, so the session stops reading: back-pressure reaches the vehicle's socket.
//!
//! Nothing unacknowledgeable is acknowledged: a publish with no route under
//! `kafka.unmatched = "refuse"` gets MQTT 5 PUBACK 0x90, and a 3.1.1 client (which
//! cannot be refused a QoS 1 PUBLISH) is disconnected, like an ACL violation. A Will is
//! checked against the ACL and the routes at CONNECT (refused: 3.1.1 return code 5,
//! MQTT 5 0x90) and again before it is journaled.
//!
//! The CONNECT, authentication included, must finish within `mqtt.connect_timeout_secs`.
//! Per-connection state is bounded: `mqtt.max_subscriptions` filters (a set), topic
//! aliases up to `mqtt.topic_alias_max` stored only after the topic passed validation
//! and the publish ACL, and a keep alive of at most `mqtt.max_keep_alive_secs` (0 =
//! "never" is capped too; MQTT 5 clients learn it from the CONNACK Server Keep Alive).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bridge::{Entry, Journal};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::auth::{Limited, Principal};
use crate::mqtt::codec::{frame, sniff, ConnAckParams, ConnectRefusal, Framing, Granted, Sniff};
use crate::mqtt::packet::Will;
use crate::mqtt::{Codec, ConnectRequest, Inbound, ProtocolError, PublishRequest, SubscribeFilter, Version};
use crate::server::Shared;
use crate::tls::CertIdentity;
use crate::{auth, topic};

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
/// How long a Will waits for journal space when its connection closes.
const WILL_APPEND_WAIT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed to write the DISCONNECT on the way out.
const GOODBYE_WRITE: Duration = Duration::from_secs(2);
/// How often a session that stopped reading checks that the journal still runs.
const JOURNAL_CHECK: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 4096;
/// Read buffer of a session that is not streaming (64 bytes is also what `BytesMut`
/// allocates for a read into an empty buffer).
const IDLE_READ: usize = 64;

/// Why a session ended; the label of `gateway_connections_closed_total`.
#[derive(Debug)]
enum Close {
    ClientDisconnect,
    PeerClosed,
    KeepAlive,
    TakenOver,
    Shutdown,
    Protocol(ProtocolError),
    Io(std::io::Error),
    JournalStopped(String),
}

impl Close {
    fn label(&self) -> &'static str {
        match self {
            Close::ClientDisconnect => "client_disconnect",
            Close::PeerClosed => "peer_closed",
            Close::KeepAlive => "keepalive_timeout",
            Close::TakenOver => "taken_over",
            Close::Shutdown => "shutdown",
            Close::Protocol(_) => "protocol_error",
            Close::Io(_) => "io_error",
            Close::JournalStopped(_) => "journal_stopped",
        }
    }
    /// Whether the Will message is published (MQTT: any close without a DISCONNECT).
    fn publishes_will(&self) -> bool {
        !matches!(self, Close::ClientDisconnect)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A QoS1 publish waiting for its PUBACK.
struct Pending {
    pkid: u16,
    /// Acknowledge once the durable watermark reaches this sequence.
    seq: u64,
    reason: u8,
}

struct Session<S> {
    stream: S,
    shared: Arc<Shared>,
    codec: Codec,
    client_id: String,
    read_buf: BytesMut,
    /// Size of the latest read, to tell a streaming session from an idle one.
    last_read: usize,
    out: BytesMut,
    pending: VecDeque<Pending>,
    /// Sequence of this session's latest append; denied publishes wait behind it.
    last_seq: u64,
    /// 1.5 × the effective keep alive (always set: see `mqtt.max_keep_alive_secs`).
    keep_alive: Duration,
    deadline: Instant,
    aliases: Vec<Option<String>>,
    subscriptions: HashSet<String>,
    /// Whether the subscription bound was logged already (once per session, not per packet).
    quota_logged: bool,
    /// Bytes of topic strings this session stores (subscription filters and alias
    /// topics), bounded by [`MAX_STORED_TOPIC_BYTES`]: a count bound alone let 100
    /// filters of 60 KiB each hold 6 MiB per connection.
    stored_bytes: usize,
    will: Option<Will>,
    /// Cancelled when a newer connection takes this client id over. Also watched while
    /// an append waits for journal space, so a back-pressured session still yields.
    kicked: tokio_util::sync::CancellationToken,
    /// Theoretical arrival time of the next PUBLISH under `mqtt.max_publish_rate`
    /// (GCRA: one instant instead of a token count and a timestamp).
    pace: Instant,
}

/// Burst a connection may publish ahead of `mqtt.max_publish_rate`.
const PUBLISH_BURST: Duration = Duration::from_secs(1);

/// Per-connection budget for stored topic strings (subscription filters + alias topics).
pub const MAX_STORED_TOPIC_BYTES: usize = 64 * 1024;

/// Runs one connection. `identity` is set when TLS verified a client certificate.
pub async fn run<S>(mut stream: S, peer: SocketAddr, identity: Option<CertIdentity>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let connect_timeout = Duration::from_secs(shared.cfg.mqtt.connect_timeout_secs);
    // One deadline for reading the CONNECT and deciding it (authentication included).
    let connect_deadline = Instant::now() + connect_timeout;
    let mut read_buf = BytesMut::with_capacity(READ_CHUNK);
    // A connection still without a session does not hold up a shutdown.
    let reading = timeout_at(
        connect_deadline,
        Box::pin(read_connect(&mut stream, &mut read_buf, &shared)),
    );
    let read = tokio::select! {
        _ = shared.shutdown.cancelled() => return,
        r = reading => r,
    };
    let first = match read {
        Ok(Ok(Some(first))) => first,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            shared.metrics.protocol_errors.inc(e.label);
            warn!(%peer, reason = e.label, detail = %e, "connection closed before CONNECT");
            return;
        }
        Err(_) => {
            shared.metrics.protocol_errors.inc("connect_timeout");
            warn!(%peer, timeout_secs = connect_timeout.as_secs(), "no complete CONNECT in time; closing");
            return;
        }
    };
    let (codec, req) = first;
    let mut out = BytesMut::new();
    let decided = timeout_at(
        connect_deadline,
        Box::pin(accept_connect(&codec, &req, peer, identity.as_ref(), &shared)),
    )
    .await
    .unwrap_or(Err(ConnectRefusal::AuthTimeout));
    let client_id = match decided {
        Ok(id) => id,
        Err(why) => {
            shared.metrics.connack_refused.inc(why.label());
            if matches!(
                why,
                ConnectRefusal::RateLimitedAddress | ConnectRefusal::RateLimitedGlobal
            ) {
                // A flood must not turn into a log flood: counted, logged at debug.
                debug!(%peer, reason = why.label(), "CONNECT refused: rate limit");
            } else {
                warn!(%peer, client_id = %req.client_id, reason = why.label(), "CONNECT refused");
            }
            codec.connack_refuse(&mut out, why);
            let _ = timeout(WRITE_TIMEOUT, stream.write_all(&out)).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    // The span is attached to the session's future (not entered across awaits, which
    // would label other tasks' log lines with this vehicle).
    let span = tracing::info_span!("session", client_id = %client_id, %peer);
    let _entered = span.clone().entered();
    let kicked = shared.registry.claim(&client_id, conn);
    let assigned = (client_id != req.client_id).then(|| client_id.clone());
    let mut codec = codec;
    if let Some(max) = req.max_packet_size {
        codec.max_out = max as usize;
    }
    let m = &shared.cfg.mqtt;
    // Keep alive 0 ("never") or above the cap becomes the cap.
    let capped = req.keep_alive == 0 || req.keep_alive > m.max_keep_alive_secs;
    let keep_alive_secs = if capped {
        shared.metrics.keep_alive_capped.fetch_add(1, Ordering::Relaxed);
        m.max_keep_alive_secs
    } else {
        req.keep_alive
    };
    let server_keep_alive = (capped && codec.version == Version::V5).then_some(keep_alive_secs);
    codec.connack(
        &mut out,
        &ConnAckParams {
            session_present: false,
            receive_max: m.max_inflight,
            topic_alias_max: m.topic_alias_max,
            assigned,
            server_keep_alive,
            // This session still refuses QoS 2 flows.
            max_qos: 1,
            session_expiry_secs: None,
            retain_available: true,
        },
    );
    let keep_alive = Duration::from_millis(u64::from(keep_alive_secs) * 1500);
    shared.metrics.connections_active.fetch_add(1, Ordering::Relaxed);
    info!(version = ?codec.version, keep_alive = req.keep_alive, clean_start = req.clean_start, "connected");
    let mut s = Session {
        stream,
        shared: shared.clone(),
        codec,
        client_id: client_id.clone(),
        read_buf,
        last_read: 0,
        out,
        pending: VecDeque::new(),
        last_seq: 0,
        keep_alive,
        deadline: Instant::now() + keep_alive,
        aliases: Vec::new(),
        subscriptions: HashSet::new(),
        quota_logged: false,
        stored_bytes: 0,
        will: req.will.clone(),
        kicked: kicked.clone(),
        pace: Instant::now(),
    };
    // Not needed any more: do not keep the CONNECT (and its strings) for the session's life.
    drop(req);
    drop(_entered);
    async {
        let close = s.serve().await;
        // Boxed: the goodbye path is rare; keeping it out of the session's future keeps an
        // idle connection small (a million of them must fit in memory).
        Box::pin(s.finish(close)).await;
    }
    .instrument(span)
    .await;
    shared.registry.release(&client_id, conn);
    shared.metrics.connections_active.fetch_sub(1, Ordering::Relaxed);
}

/// Reads until the first packet is complete and decodes it; it must be a CONNECT.
async fn read_connect<S>(
    stream: &mut S,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Result<Option<(Codec, Box<ConnectRequest>)>, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = shared.cfg.mqtt.max_packet_size as usize;
    loop {
        // Refuse anything that is not a CONNECT from its first byte, without waiting.
        if buf.first().is_some_and(|b| b >> 4 != 1) {
            return Err(ProtocolError::protocol(
                "not_connect",
                "first packet is not CONNECT",
            ));
        }
        if let Framing::Complete(len) = frame(buf, max)? {
            let version = match sniff(&buf[..len])? {
                Sniff::Mqtt(v) => v,
                Sniff::Unsupported(level) => {
                    // Answer in 3.1.1 form, which every client version can read.
                    let mut out = BytesMut::new();
                    Codec::new(Version::V4, max).connack_refuse(&mut out, ConnectRefusal::UnsupportedVersion);
                    let _ = stream.write_all(&out).await;
                    shared
                        .metrics
                        .connack_refused
                        .inc(ConnectRefusal::UnsupportedVersion.label());
                    return Err(ProtocolError::protocol(
                        "unsupported_protocol_version",
                        format!("protocol level {level} is not supported (3.1.1 and 5.0 are)"),
                    ));
                }
            };
            let codec = Codec::new(version, max);
            return match codec.decode(buf)? {
                Some(Inbound::Connect(req)) => Ok(Some((codec, req))),
                _ => Err(ProtocolError::protocol(
                    "not_connect",
                    "first packet is not CONNECT",
                )),
            };
        }
        buf.reserve(READ_CHUNK);
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Decides the CONNECT: returns the session's client id or the refusal. Cheap checks
/// first; the rate limits before any password work; the identity binding after it.
async fn accept_connect(
    codec: &Codec,
    req: &ConnectRequest,
    peer: SocketAddr,
    identity: Option<&CertIdentity>,
    shared: &Arc<Shared>,
) -> Result<String, ConnectRefusal> {
    if req.auth_method.is_some() {
        return Err(ConnectRefusal::BadAuthMethod);
    }
    if shared.shutdown.is_cancelled() || shared.journal_stopped() {
        return Err(ConnectRefusal::ServerUnavailable);
    }
    if !req.client_id.is_empty() && !auth::valid_client_id(&req.client_id) {
        return Err(ConnectRefusal::BadClientId);
    }
    match shared.auth.admit(peer.ip()) {
        Ok(()) => {}
        Err(Limited::PerAddress) => return Err(ConnectRefusal::RateLimitedAddress),
        Err(Limited::Global) => return Err(ConnectRefusal::RateLimitedGlobal),
    }
    let verdict = shared
        .auth
        .authenticate_bounded(req.username.clone(), req.password.clone(), identity.is_some())
        .await;
    if let Some(check) = verdict.check {
        shared.metrics.auth_password_checks.inc(check.label());
    }
    let principal = match verdict.result {
        Ok(p) => p,
        Err(auth::Refusal::BadCredentials) => return Err(ConnectRefusal::BadCredentials),
        Err(auth::Refusal::NotAuthorized) => return Err(ConnectRefusal::NotAuthorized),
    };
    let tls = &shared.cfg.tls;
    let client_id = if req.client_id.is_empty() {
        match identity.and_then(|i| i.preferred(&tls.identity)) {
            Some(id) => id,
            // 3.1.1 allows a server-assigned id only with a clean session.
            None if codec.version == Version::V4 && !req.clean_start => {
                return Err(ConnectRefusal::BadClientId)
            }
            // A password user is given its username, if that is one of its ids.
            None if matches!(principal, Principal::User(_)) => shared
                .auth
                .assigned_client_id(&principal)
                .ok_or(ConnectRefusal::ClientIdNotAllowed)?,
            None => format!("auto-{:016x}", rand_id()),
        }
    } else {
        req.client_id.clone()
    };
    if !auth::valid_client_id(&client_id) {
        return Err(ConnectRefusal::BadClientId);
    }
    if let Some(id) = identity {
        if tls.require_client_id_match && !id.matches(&client_id, &tls.identity) {
            warn!(client_id, cert = ?id, "client id does not match the client certificate");
            return Err(ConnectRefusal::NotAuthorized);
        }
    }
    if !shared.auth.may_use_client_id(&principal, &client_id) {
        if let Principal::User(user) = &principal {
            warn!(
                client_id,
                user, "client id is not one of the user's auth.users[].client_ids"
            );
        }
        return Err(ConnectRefusal::ClientIdNotAllowed);
    }
    if let Some(w) = &req.will {
        if topic::validate_name(&w.topic).is_err() || !shared.auth.may_publish(&client_id, &w.topic) {
            return Err(ConnectRefusal::NotAuthorized);
        }
        if shared.routes.resolve(&client_id, &w.topic).is_none() {
            warn!(client_id, topic = %w.topic, "Will topic has no route to Kafka (kafka.unmatched = \"refuse\")");
            return Err(ConnectRefusal::WillUnroutable);
        }
    }
    Ok(client_id)
}

/// Refusal tasks for connections over `mqtt.max_connections`: beyond this many at
/// once, a refused connection is simply closed.
const BUSY_REFUSALS: usize = 64;
static BUSY_SLOTS: Semaphore = Semaphore::const_new(BUSY_REFUSALS);
/// How long a refused connection may take to show its CONNECT (TLS handshake included).
const BUSY_WAIT: Duration = Duration::from_secs(1);
/// Enough of a CONNECT to read its protocol version.
const BUSY_READ: usize = 256;

/// Answers a connection turned away by `mqtt.max_connections` (the caller counted it)
/// so that device SDKs back off: CONNACK 3.1.1 return code 3 / MQTT 5 0x97 (quota
/// exceeded) in the client's version, if its CONNECT (and TLS handshake) arrives
/// within a second; then closes. At most 64 refusals run at once; beyond that the
/// socket is just closed. Returns at once (the refusal runs in its own task).
pub fn refuse_busy(stream: TcpStream, peer: SocketAddr, tls: Option<TlsAcceptor>, shared: &Arc<Shared>) {
    let Ok(slot) = BUSY_SLOTS.try_acquire() else {
        debug!(%peer, "refusal slots busy; closing without CONNACK");
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let _ = timeout(BUSY_WAIT, async move {
            match tls {
                None => answer_busy(stream, &shared).await,
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(stream).await {
                        answer_busy(s, &shared).await;
                    }
                }
            }
        })
        .await;
    });
}

async fn answer_busy<S>(mut stream: S, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(BUSY_READ);
    let version = loop {
        if buf.first().is_some_and(|b| b >> 4 != 1) {
            return;
        }
        if !buf.is_empty() {
            match sniff(&buf) {
                Ok(Sniff::Mqtt(v)) => break v,
                Ok(Sniff::Unsupported(_)) => break Version::V4,
                // Only the first bytes are needed: "too short" means read more.
                Err(e) if e.label == "malformed_packet" && buf.len() < BUSY_READ => {}
                Err(_) => return,
            }
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    };
    let mut out = BytesMut::new();
    Codec::new(version, shared.cfg.mqtt.max_packet_size as usize)
        .connack_refuse(&mut out, ConnectRefusal::MaxConnections);
    shared
        .metrics
        .connack_refused
        .inc(ConnectRefusal::MaxConnections.label());
    if stream.write_all(&out).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write_u64(NEXT_CONN.load(Ordering::Relaxed));
    h.finish()
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn serve(&mut self) -> Close {
        let kicked = self.kicked.clone();
        let mut durable_rx = self.shared.journal.durable();
        let shutdown = self.shared.shutdown.clone();
        let max_inflight = usize::from(self.shared.cfg.mqtt.max_inflight);
        loop {
            // Acknowledge first: that frees in-flight room for packets already buffered
            // (a paused 3.1.1 client may have nothing more to send until they are read).
            self.ack_durable(*durable_rx.borrow_and_update());
            if let Err(close) = self.process_buffered(max_inflight).await {
                return close;
            }
            // And after: a refused publish may be acknowledgeable at once.
            self.ack_durable(*durable_rx.borrow_and_update());
            if let Err(e) = self.flush().await {
                return Close::Io(e);
            }
            // Room freed while whole packets wait in the buffer: handle them now. The peer
            // may have sent everything already, so no new bytes would wake us.
            if self.pending.len() < max_inflight
                && !matches!(frame(&self.read_buf, self.codec.max_in), Ok(Framing::Incomplete))
            {
                continue;
            }
            let can_read = self.pending.len() < max_inflight || self.codec.version == Version::V5;
            if !can_read {
                // We stopped reading (in-flight bound, e.g. while the journal withholds
                // durability): the client's PINGREQs wait unread in the socket, so its
                // keep-alive is not counting against it until we read again.
                self.deadline = Instant::now() + self.keep_alive;
            }
            tokio::select! {
                biased;
                _ = kicked.cancelled() => return Close::TakenOver,
                _ = shutdown.cancelled() => return Close::Shutdown,
                changed = durable_rx.changed(), if !self.pending.is_empty() => {
                    if changed.is_err() {
                        return Close::JournalStopped("journal closed".into());
                    }
                }
                _ = sleep_until(self.deadline), if can_read => return Close::KeepAlive,
                // Not reading and waiting on the journal: a writer that stopped for good
                // wakes nobody, so look now and then (the session must not outlive it).
                _ = tokio::time::sleep(JOURNAL_CHECK), if !can_read => {
                    if self.shared.journal_stopped() {
                        return Close::JournalStopped("journal stopped".into());
                    }
                }
                read = self.read_more(), if can_read => match read {
                    Ok(0) => return Close::PeerClosed,
                    Ok(_) => {}
                    Err(e) => return Close::Io(e),
                },
            }
        }
    }

    /// Reads more bytes. An idle vehicle (nothing buffered, last read small) waits with a
    /// small buffer: at a million connections the read buffer is most of the memory.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        if self.read_buf.is_empty() && self.last_read < IDLE_READ {
            if self.read_buf.capacity() > 4 * IDLE_READ {
                self.read_buf = BytesMut::new();
            }
            self.read_buf.reserve(IDLE_READ);
        } else {
            self.read_buf.reserve(READ_CHUNK);
        }
        let n = self.stream.read_buf(&mut self.read_buf).await?;
        self.last_read = n;
        Ok(n)
    }

    /// Answers a QoS1 publish with a failure reason (MQTT 5), in arrival order: it waits
    /// behind this session's earlier publishes that are not durable yet.
    fn refuse(&mut self, pkid: u16, reason: u8) {
        self.pending.push_back(Pending {
            pkid,
            seq: self.last_seq,
            reason,
        });
    }

    fn ack_durable(&mut self, durable: u64) {
        while let Some(p) = self.pending.front() {
            if p.seq > durable {
                break;
            }
            self.codec.puback(&mut self.out, p.pkid, p.reason);
            if p.reason == 0 {
                self.shared.metrics.pubacks_sent.fetch_add(1, Ordering::Relaxed);
            }
            self.pending.pop_front();
        }
    }

    /// Holds this PUBLISH while the connection runs ahead of `mqtt.max_publish_rate` by
    /// more than [`PUBLISH_BURST`]. Meanwhile the session reads nothing, so the client is
    /// slowed by TCP back-pressure; nothing is dropped. Takeover and shutdown still end
    /// the wait.
    async fn pace_publish(&mut self) -> Result<(), Close> {
        let rate = self.shared.cfg.mqtt.max_publish_rate;
        if rate == 0 {
            return Ok(());
        }
        let now = Instant::now();
        self.pace = self.pace.max(now) + Duration::from_secs(1) / rate;
        let ahead = self.pace - now;
        if ahead <= PUBLISH_BURST {
            return Ok(());
        }
        self.shared
            .metrics
            .publish_throttled
            .fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            biased;
            _ = self.kicked.cancelled() => Err(Close::TakenOver),
            _ = self.shared.shutdown.cancelled() => Err(Close::Shutdown),
            _ = tokio::time::sleep(ahead - PUBLISH_BURST) => Ok(()),
        }
    }

    /// Writes what is queued. A peer that does not drain its socket for its whole
    /// keep-alive window (or [`WRITE_TIMEOUT`], whichever is shorter) is as good as gone:
    /// the write times out and the connection closes, so a client that never reads
    /// cannot hold a session (and its memory) forever.
    async fn flush(&mut self) -> std::io::Result<()> {
        self.flush_within(WRITE_TIMEOUT.min(self.keep_alive)).await
    }

    async fn flush_within(&mut self, limit: Duration) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        match timeout(limit, self.stream.write_all(&self.out)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "write timed out",
                ))
            }
        }
        self.out.clear();
        Ok(())
    }

    /// Handles every complete packet in the read buffer, pausing a 3.1.1 client at the
    /// in-flight bound.
    async fn process_buffered(&mut self, max_inflight: usize) -> Result<(), Close> {
        loop {
            if self.codec.version == Version::V4 && self.pending.len() >= max_inflight {
                return Ok(());
            }
            let packet = match self.codec.decode(&mut self.read_buf) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Close::Protocol(e)),
            };
            self.deadline = Instant::now() + self.keep_alive;
            self.handle(packet, max_inflight).await?;
            // Time spent waiting inside `handle` (journal back-pressure) was ours, not the
            // client's silence.
            self.deadline = Instant::now() + self.keep_alive;
        }
    }

    async fn handle(&mut self, packet: Inbound, max_inflight: usize) -> Result<(), Close> {
        match packet {
            Inbound::Publish(p) => Box::pin(self.publish(p, max_inflight)).await,
            Inbound::PingReq => {
                self.codec.pingresp(&mut self.out);
                Ok(())
            }
            Inbound::Subscribe { pkid, filters, .. } => {
                let max = self.shared.cfg.mqtt.max_subscriptions;
                let metrics = &self.shared.metrics;
                let mut granted = Vec::with_capacity(filters.len());
                for SubscribeFilter { filter: f, qos, .. } in filters {
                    let g = if topic::validate_filter(&f).is_err() {
                        Granted::FilterInvalid
                    } else if !self.shared.auth.may_subscribe(&self.client_id, &f) {
                        Granted::NotAuthorized
                    } else if self.subscriptions.contains(&f) {
                        Granted::Qos(qos.min(1))
                    } else if self.subscriptions.len() >= max
                        || self.stored_bytes + f.len() > MAX_STORED_TOPIC_BYTES
                    {
                        Granted::QuotaExceeded
                    } else {
                        self.stored_bytes += f.len();
                        self.subscriptions.insert(f);
                        metrics.subscriptions_active.fetch_add(1, Ordering::Relaxed);
                        Granted::Qos(qos.min(1))
                    };
                    match g {
                        Granted::Qos(_) | Granted::Unspecified => {}
                        Granted::FilterInvalid => metrics.subscribe_refused.inc("filter_invalid"),
                        Granted::NotAuthorized => metrics.subscribe_refused.inc("not_authorized"),
                        Granted::QuotaExceeded => metrics.subscribe_refused.inc("quota_exceeded"),
                    }
                    granted.push(g);
                }
                if !self.quota_logged && granted.contains(&Granted::QuotaExceeded) {
                    self.quota_logged = true;
                    warn!(max, "SUBSCRIBE filters refused beyond mqtt.max_subscriptions (logged once per session; counted in gateway_subscribe_refused_total)");
                }
                self.codec.suback(&mut self.out, pkid, &granted);
                Ok(())
            }
            Inbound::Unsubscribe { pkid, filters } => {
                let mut existed = Vec::with_capacity(filters.len());
                for f in &filters {
                    let removed = self.subscriptions.remove(f);
                    if removed {
                        self.stored_bytes = self.stored_bytes.saturating_sub(f.len());
                        self.shared
                            .metrics
                            .subscriptions_active
                            .fetch_sub(1, Ordering::Relaxed);
                    }
                    existed.push(removed);
                }
                self.codec.unsuback(&mut self.out, pkid, &existed);
                Ok(())
            }
            // Acknowledgements of messages we send; none are sent before command delivery exists.
            Inbound::PubAck(_) => Ok(()),
            Inbound::Disconnect { reason, .. } => {
                if reason != 0x04 {
                    self.will = None;
                }
                Err(if reason == 0x04 {
                    Close::PeerClosed
                } else {
                    Close::ClientDisconnect
                })
            }
            Inbound::Connect(_) => Err(Close::Protocol(ProtocolError::protocol(
                "second_connect",
                "second CONNECT",
            ))),
            Inbound::PubRec { .. } | Inbound::PubRel { .. } | Inbound::PubComp { .. } => {
                Err(Close::Protocol(qos2_refused()))
            }
            Inbound::Auth => Err(Close::Protocol(ProtocolError {
                reason: 0x8C,
                label: "auth_not_supported",
                detail: "enhanced authentication (AUTH) is not supported".into(),
            })),
            Inbound::ServerOnly => Err(Close::Protocol(ProtocolError::protocol(
                "server_packet",
                "client sent a server-only packet",
            ))),
        }
    }

    async fn publish(&mut self, p: PublishRequest, max_inflight: usize) -> Result<(), Close> {
        self.pace_publish().await?;
        if p.qos == 2 {
            return Err(Close::Protocol(qos2_refused()));
        }
        let alias = self.alias_slot(&p).map_err(Close::Protocol)?;
        let topic = match alias {
            Some(slot) if p.topic.is_empty() => {
                self.aliases.get(slot).cloned().flatten().ok_or_else(|| {
                    Close::Protocol(ProtocolError::protocol(
                        "topic_alias_unknown",
                        format!("topic alias {} was never set", slot + 1),
                    ))
                })?
            }
            _ => p.topic.clone(),
        };
        topic::validate_name(&topic).map_err(|e| Close::Protocol(ProtocolError::topic_invalid(e)))?;
        if p.qos == 1 && self.pending.len() >= max_inflight {
            return Err(Close::Protocol(ProtocolError {
                reason: 0x93,
                label: "receive_maximum_exceeded",
                detail: format!("more than {max_inflight} unacknowledged QoS1 publishes"),
            }));
        }
        let metrics = &self.shared.metrics;
        if !self.shared.auth.may_publish(&self.client_id, &topic) {
            metrics.acl_denied.inc(if p.qos == 0 { "0" } else { "1" });
            warn!(topic, qos = p.qos, "publish denied by the publish ACL");
            return match (self.codec.version, p.qos) {
                (Version::V5, 1) => {
                    self.refuse(p.pkid, 0x87);
                    Ok(())
                }
                (Version::V5, _) => Ok(()),
                (Version::V4, _) => Err(Close::Protocol(ProtocolError {
                    reason: 0x87,
                    label: "not_authorized",
                    detail: format!("not authorised to publish to {topic}"),
                })),
            };
        }
        // Only a topic that is valid and allowed may be remembered under an alias.
        if let Some(slot) = alias.filter(|_| !p.topic.is_empty()) {
            if self.aliases.len() <= slot {
                self.aliases.resize(slot + 1, None);
            }
            let replaced = self.aliases[slot].as_ref().map_or(0, String::len);
            let stored = self.stored_bytes - replaced.min(self.stored_bytes) + topic.len();
            if stored > MAX_STORED_TOPIC_BYTES {
                return Err(Close::Protocol(ProtocolError {
                    reason: 0x97,
                    label: "topic_alias_quota",
                    detail: format!(
                        "alias topics and subscriptions would hold {stored} bytes, more than {MAX_STORED_TOPIC_BYTES}"
                    ),
                }));
            }
            self.stored_bytes = stored;
            self.aliases[slot] = Some(topic.clone());
        }
        if self.shared.routes.resolve(&self.client_id, &topic).is_none() {
            // kafka.unmatched = "refuse": never journaled, never silent, never acknowledged.
            metrics.unrouted.inc(if p.qos == 0 { "0" } else { "1" });
            warn!(
                topic,
                "publish refused: no route to Kafka (kafka.unmatched = \"refuse\")"
            );
            return match (self.codec.version, p.qos) {
                (Version::V5, 1) => {
                    self.refuse(p.pkid, 0x90);
                    Ok(())
                }
                (_, 0) => Ok(()),
                // 3.1.1 cannot refuse a QoS 1 PUBLISH and a PUBACK would claim it stored.
                _ => Err(Close::Protocol(ProtocolError {
                    reason: 0x90,
                    label: "no_route",
                    detail: format!("no route to Kafka for {topic} (kafka.unmatched = \"refuse\")"),
                })),
            };
        }
        let entry = Entry {
            received_at_ms: now_ms(),
            qos: p.qos,
            retain: p.retain,
            client_id: self.client_id.clone(),
            topic,
            payload: p.payload,
            content_type: p.props.content_type,
            message_expiry_secs: p.message_expiry_secs,
            user_properties: p.props.user_properties,
        };
        let len = entry.payload.len() as u64;
        // Waiting for journal space must not make the session deaf to a takeover or to
        // shutdown: a taken-over session would otherwise stay open, hold its connection
        // slot and append this (older) publish after the new session's. Cancelling the
        // wait is safe: admission is synchronous, so nothing was appended yet.
        let appended = tokio::select! {
            biased;
            _ = self.kicked.cancelled() => return Err(Close::TakenOver),
            _ = self.shared.shutdown.cancelled() => return Err(Close::Shutdown),
            r = self.shared.journal.append_with(&entry, self.shared.full_policy) => r,
        };
        let appended = match appended {
            // This message cannot be journaled (an aliased topic plus a payload larger
            // than a segment; only MQTT 5 aliases get there): the vehicle's fault, not
            // the journal's. Refused, never acknowledged as stored, and not a disconnect
            // (the client would re-send the same message on every reconnect).
            Err(e @ (bridge::JournalError::TooLarge { .. } | bridge::JournalError::Encode(_))) => {
                metrics.protocol_errors.inc("record_too_large");
                warn!(error = %e, qos = p.qos, "publish refused: too large to journal");
                return match (self.codec.version, p.qos) {
                    (Version::V5, 1) => {
                        self.refuse(p.pkid, 0x83);
                        Ok(())
                    }
                    (_, 0) => Ok(()),
                    _ => Err(Close::Protocol(ProtocolError {
                        reason: 0x95,
                        label: "record_too_large",
                        detail: e.to_string(),
                    })),
                };
            }
            Err(e) => return Err(Close::JournalStopped(e.to_string())),
            Ok(a) => a,
        };
        let Some(seq) = appended else {
            // Journal full under the `reject` policy: refused, not acknowledged as stored.
            metrics.journal_rejected.inc(if p.qos == 0 { "0" } else { "1" });
            return match (self.codec.version, p.qos) {
                (Version::V5, 1) => {
                    self.refuse(p.pkid, 0x97);
                    Ok(())
                }
                (_, 0) => Ok(()),
                // 3.1.1 cannot refuse a PUBLISH: close, the vehicle retries later.
                _ => Err(Close::Protocol(ProtocolError {
                    reason: 0x97,
                    label: "journal_full",
                    detail: "journal full (journal.full_policy = \"reject\")".into(),
                })),
            };
        };
        self.last_seq = seq;
        metrics.message_bytes_received.fetch_add(len, Ordering::Relaxed);
        if p.qos == 1 {
            metrics.messages_received_qos1.fetch_add(1, Ordering::Relaxed);
            self.pending.push_back(Pending {
                pkid: p.pkid,
                seq,
                reason: 0,
            });
        } else {
            metrics.messages_received_qos0.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// MQTT 5 topic aliases (§3.3.2.3.4): a non-empty topic with an alias sets it (once
    /// the topic passed validation and the ACL); an empty topic uses it. Returns the
    /// alias's slot, checked against the advertised maximum.
    fn alias_slot(&self, p: &PublishRequest) -> Result<Option<usize>, ProtocolError> {
        let Some(alias) = p.topic_alias else {
            return Ok(None);
        };
        let max = self.shared.cfg.mqtt.topic_alias_max;
        if alias == 0 || alias > max {
            return Err(ProtocolError {
                reason: 0x94,
                label: "topic_alias_invalid",
                detail: format!("topic alias {alias} outside 1..={max}"),
            });
        }
        Ok(Some(usize::from(alias) - 1))
    }

    /// Ends the session: tells the client why (MQTT 5), publishes the Will when due,
    /// and on shutdown first waits for pending PUBACKs to become durable.
    async fn finish(&mut self, close: Close) {
        let metrics = &self.shared.metrics;
        metrics.connections_closed.inc(close.label());
        let reason = match &close {
            Close::Protocol(e) => {
                metrics.protocol_errors.inc(e.label);
                warn!(reason = e.label, detail = %e.detail, "closing connection: protocol error");
                Some(e.reason)
            }
            Close::KeepAlive => {
                info!("closing connection: no packet within 1.5 × keep alive");
                Some(0x8D)
            }
            Close::TakenOver => {
                info!("closing connection: client id taken over by a new connection");
                Some(0x8E)
            }
            Close::Shutdown => {
                self.drain_acks().await;
                Some(0x8B)
            }
            Close::JournalStopped(why) => {
                warn!(error = %why, "closing connection: journal stopped");
                Some(0x80)
            }
            Close::Io(e) => {
                debug!(error = %e, "connection I/O error");
                None
            }
            Close::ClientDisconnect | Close::PeerClosed => {
                debug!(reason = close.label(), "connection closed by client");
                None
            }
        };
        if close.publishes_will() {
            if let Some(w) = self.will.take().filter(|w| self.will_publishable(w)) {
                let entry = Entry {
                    received_at_ms: now_ms(),
                    qos: w.qos.min(1),
                    retain: w.retain,
                    client_id: self.client_id.clone(),
                    topic: w.topic,
                    payload: w.payload,
                    ..Entry::default()
                };
                // A full journal must not hold the closing connection (and its slot)
                // forever: the Will waits for space a bounded time, then is counted lost.
                match timeout(WILL_APPEND_WAIT, self.shared.journal.append(&entry)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        self.shared.metrics.protocol_errors.inc("will_not_journaled");
                        warn!(error = %e, "will message could not be journaled");
                    }
                    Err(_) => {
                        self.shared.metrics.protocol_errors.inc("will_not_journaled");
                        warn!(
                            wait_secs = WILL_APPEND_WAIT.as_secs(),
                            "will message not journaled: the journal stayed full"
                        );
                    }
                }
            }
        }
        if let Some(reason) = reason {
            self.codec.disconnect(&mut self.out, reason);
        }
        // The goodbye is best effort: a peer whose writes already timed out gets a short
        // chance, not another full write timeout.
        let _ = self.flush_within(GOODBYE_WRITE).await;
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
        self.shared
            .metrics
            .subscriptions_active
            .fetch_sub(self.subscriptions.len() as i64, Ordering::Relaxed);
        self.subscriptions.clear();
    }

    /// The Will was checked at CONNECT; checked again here so that an unroutable or
    /// forbidden Will can never reach the journal.
    fn will_publishable(&self, w: &Will) -> bool {
        let ok = topic::validate_name(&w.topic).is_ok()
            && self.shared.auth.may_publish(&self.client_id, &w.topic)
            && self.shared.routes.resolve(&self.client_id, &w.topic).is_some();
        if !ok {
            self.shared
                .metrics
                .unrouted
                .inc(if w.qos == 0 { "0" } else { "1" });
            warn!(topic = %w.topic, "Will not journaled: no route or not allowed");
        }
        ok
    }

    /// On shutdown: acknowledge everything already accepted once it is durable.
    async fn drain_acks(&mut self) {
        let mut rx = self.shared.journal.durable();
        while !self.pending.is_empty() {
            let durable = *rx.borrow_and_update();
            self.ack_durable(durable);
            if self.pending.is_empty() || rx.changed().await.is_err() {
                break;
            }
        }
    }
}

fn qos2_refused() -> ProtocolError {
    ProtocolError {
        reason: 0x9B,
        label: "qos2_not_supported",
        detail: "QoS 2 is not supported (maximum QoS is 1)".into(),
    }
}
