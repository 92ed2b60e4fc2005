//! One MQTT connection, from its CONNECT to its close, and the session it holds.
//!
//! Files, in the order a connection meets them: [`connect`] (read and decide the
//! CONNECT), this module (attach to a session, the connection loop, the close),
//! [`inbound`] (what the client sends: PUBLISH, SUBSCRIBE, ...), [`outbound`] (what the
//! gateway sends: deliveries and the acknowledgements it owes), [`will`] (Will
//! messages, their delay, session expiry), [`presence`] (connected / disconnected
//! events, journaled in order with the connection's publishes) and [`state`] (the
//! session itself, which outlives connections). Shared by all connections: [`gate`]
//! (set-ups and goodbyes yield to connected vehicles) and [`keepalive`] (one clock for
//! every connection's keep-alive deadline: the loop arms no timer of its own).
//!
//! The ingest rule lives here: a QoS 1/2 PUBLISH is appended to the journal and its
//! PUBACK / PUBREC is written only once the journal's durable watermark covers the
//! record — and, when the message was queued for persistent sessions, once the store
//! flushed those queue entries. Acknowledgements leave in arrival order (a refused
//! publish waits behind the accepted ones before it). At most `mqtt.max_inflight`
//! QoS 1/2 publishes wait per session: an MQTT 5 client that sends more violates the
//! Receive Maximum we advertised and is disconnected (0x93); reading from a 3.1.1
//! client pauses until acknowledgements drain. When the journal is full, `append`
//! waits, so the session stops reading: back-pressure reaches the vehicle's socket.
//!
//! A QoS 2 PUBLISH is journaled once: its packet id is remembered (in the store for a
//! persistent session) until PUBREL, and a re-sent PUBLISH with that id is answered with
//! PUBREC without being journaled or routed again — across a restart too.
//!
//! Nothing unacknowledgeable is acknowledged: a publish with no route under
//! `kafka.unmatched = "refuse"` and no local subscriber gets MQTT 5 PUBACK 0x90, and a
//! 3.1.1 client (which cannot be refused a QoS 1 PUBLISH) is disconnected, like an ACL
//! violation. A Will is checked against the ACL and the routes at CONNECT and again
//! before it is journaled.
//!
//! Per-connection state is bounded: `mqtt.max_subscriptions` filters, topic aliases up
//! to `mqtt.topic_alias_max` stored only after the topic passed validation and the
//! publish ACL, [`MAX_STORED_TOPIC_BYTES`] of both, the gateway's own aliases towards
//! the client ([`aliases`]: at most 64 topics of 256 bytes), a keep alive of at most
//! `mqtt.max_keep_alive_secs`, and the outbound queue bounds of [`state`].

pub mod aliases;
pub mod connect;
pub mod gate;
mod inbound;
pub mod keepalive;
mod outbound;
pub mod presence;
pub mod qos2_pending;
pub mod state;
pub mod will;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bridge::Journal;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::either::Either;
use tracing::{debug, info, warn, Instrument};

use crate::message::now_ms;
use crate::mqtt::codec::{ConnAckParams, ConnectRefusal};
use crate::mqtt::packet::Will;
use crate::mqtt::{Codec, ProtocolError, Version};
use crate::registry::{Connecting, Detached};
use crate::state::Shared;
use crate::tls::CertIdentity;
pub use connect::refuse_busy;
use presence::Transport;
use state::{ConnInfo, Owner, SessionCell};

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed to write the DISCONNECT on the way out.
const GOODBYE_WRITE: Duration = Duration::from_secs(2);
/// How often a session that stopped reading checks that the journal still runs.
const JOURNAL_CHECK: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 4096;
/// Read buffer for the CONNECT: most fit (a larger one grows it). Small on purpose: it is
/// freed once the session runs, and a 4 KiB buffer per connecting vehicle, freed between
/// the long-lived allocations of the vehicles connecting at the same time, stayed in the
/// process's memory as holes after a connect burst.
const CONNECT_READ: usize = 512;
/// Read buffer of a session that is not streaming (64 bytes is also what `BytesMut`
/// allocates for a read into an empty buffer).
const IDLE_READ: usize = 64;
/// Deliveries are encoded into the write buffer up to this many bytes before the
/// socket is written: bounds a connection's write buffer whatever is queued for it.
const OUT_BUDGET: usize = 64 * 1024;
/// Longest a SUBSCRIBE / UNSUBSCRIBE waits for the store to flush its change; past it
/// the connection closes (`store_failed`) rather than acknowledge what may not survive.
const STORE_WAIT: Duration = Duration::from_secs(5);

/// A stream that can tell "bytes are waiting" without being read into a buffer, so an
/// idle vehicle's connection waits holding no read buffer at all. Like every stream a
/// session runs on, it also names its listener for the presence events.
pub trait ReadReady: Transport {
    /// Ready when a read would make progress (bytes, end of stream or an error).
    fn poll_read_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>>;
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

/// Burst a connection may publish ahead of `mqtt.max_publish_rate`.
const PUBLISH_BURST: Duration = Duration::from_secs(1);

/// Per-connection budget for stored topic strings (subscription filters + alias topics).
pub const MAX_STORED_TOPIC_BYTES: usize = 64 * 1024;

/// Why a session ended; the label of `gateway_connections_closed_total`.
#[derive(Debug)]
enum Close {
    ClientDisconnect,
    /// DISCONNECT with reason 0x04: the client asks for its Will.
    DisconnectWithWill,
    PeerClosed,
    KeepAlive,
    TakenOver,
    /// An operator kicked the connection (admin API): MQTT 5 reason 0x98.
    Kicked,
    Shutdown,
    Protocol(ProtocolError),
    Io(std::io::Error),
    JournalStopped(String),
    /// The session store failed: what this session promised cannot be made durable.
    StoreFailed(String),
}

impl Close {
    fn label(&self) -> &'static str {
        match self {
            Close::ClientDisconnect => "client_disconnect",
            Close::DisconnectWithWill => "client_disconnect_with_will",
            Close::PeerClosed => "peer_closed",
            Close::KeepAlive => "keepalive_timeout",
            Close::TakenOver => "taken_over",
            Close::Kicked => "administrative_action",
            Close::Shutdown => "shutdown",
            Close::Protocol(_) => "protocol_error",
            Close::Io(_) => "io_error",
            Close::JournalStopped(_) => "journal_stopped",
            Close::StoreFailed(_) => "store_failed",
        }
    }
    /// Whether the Will message is published (MQTT: any close without a normal DISCONNECT).
    fn publishes_will(&self) -> bool {
        !matches!(self, Close::ClientDisconnect)
    }
}

/// Which acknowledgement a client's PUBLISH (or PUBREL) is owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    /// PUBACK (QoS 1).
    Ack,
    /// PUBREC (QoS 2, first half).
    Received,
    /// PUBCOMP (answer to PUBREL).
    Complete,
    /// PUBREL (answer to the client's PUBREC of a QoS 2 delivery), once "released" is
    /// flushed to the store.
    Release,
}

/// An acknowledgement waiting until what it acknowledges is durable.
struct Pending {
    kind: AckKind,
    pkid: u16,
    /// Acknowledge once the journal's durable watermark reaches this sequence...
    seq: u64,
    /// ...and the store's flushed generation reaches this one (0 = nothing to wait for).
    gen: u64,
    reason: u8,
    /// When the client's PUBLISH was taken (`None`: not an acknowledgement of one),
    /// for `gateway_puback_latency_seconds`.
    since: Option<std::time::Instant>,
}

impl Pending {
    /// A PUBREL owed for an outbound QoS 2 message the vehicle PUBRECed: waits only for
    /// the store generation `gen` that recorded the PUBREC.
    fn release(pkid: u16, gen: u64) -> Pending {
        Pending {
            kind: AckKind::Release,
            pkid,
            seq: 0,
            gen,
            reason: 0,
            since: None,
        }
    }
}

struct Session<S> {
    stream: S,
    shared: Arc<Shared>,
    codec: Codec,
    /// Password user (operator ACLs apply), if any.
    user: Option<Box<str>>,
    /// The session (its client id is this connection's).
    cell: Arc<SessionCell>,
    read_buf: BytesMut,
    /// Size of the latest read, to tell a streaming session from an idle one.
    last_read: u32,
    out: BytesMut,
    pending: VecDeque<Pending>,
    /// Sequence of this session's latest append; refused publishes wait behind it.
    last_seq: u64,
    /// Store generation of this session's latest write that an ack must wait for.
    last_gen: u64,
    /// 1.5 × the effective keep alive (always set: see `mqtt.max_keep_alive_secs`).
    keep_alive_ms: u32,
    /// Topic aliases, both directions; allocated on the first: most vehicles use none.
    aliases: Option<Box<aliases::Aliases>>,
    /// Whether the subscription bound was logged already (once per session, not per packet).
    quota_logged: bool,
    /// Bytes of topic strings this session stores (subscription filters and alias
    /// topics), bounded by [`MAX_STORED_TOPIC_BYTES`]: a count bound alone let 100
    /// filters of 60 KiB each hold 6 MiB per connection. `u32`: it never passes 64 KiB,
    /// and with the codec's limits it packs into the session's small fields.
    stored_bytes: u32,
    /// Boxed: most vehicles send none, and the session lives as long as its connection.
    will: Option<Box<Will>>,
    /// The client's Receive Maximum: QoS 1/2 deliveries in flight at once.
    receive_max: u16,
    /// Session Expiry Interval of the CONNECT (a DISCONNECT may change it, not from 0).
    connect_expiry: u32,
    /// Theoretical arrival time of the next PUBLISH under `mqtt.max_publish_rate`
    /// (GCRA: one instant instead of a token count and a timestamp).
    pace: Instant,
    /// The CONNECT's clean start flag: the `disconnected` presence event repeats it (the
    /// other facts it needs are kept anyway).
    clean_start: bool,
    /// The connection's facts (its number, the vehicle's address, when it connected) and
    /// counters, in one allocation shared with the session cell: the admin API reads it
    /// (and may kick). The vehicle's address is named in every close and refusal event,
    /// the lead an SRE follows (and blocks) for a hostile client.
    info: Arc<ConnInfo>,
}

/// Runs one connection. `identity` is set when TLS verified a client certificate.
///
/// Not an `async fn`: an async fn keeps its arguments (the stream, TLS state included)
/// in its future for its whole life even after moving them on. Here they go straight
/// into the boxed CONNECT phase, which is freed once the session runs, so an idle
/// vehicle's future is the session loop alone (measured by `size_tests`).
///
/// `guard` (the connection's permit under `mqtt.max_connections`) is held until the
/// connection ends.
pub fn run<S, G>(
    stream: S,
    peer: SocketAddr,
    identity: Option<CertIdentity>,
    shared: Arc<Shared>,
    guard: G,
    span: tracing::Span,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
    G: Send,
{
    // The connection's span (from accept) covers the CONNECT phase only, and is boxed
    // with it: it is gone once the session runs.
    // Behind the set-up gate: a reconnect storm's CONNECTs wait their turn.
    let gate = shared.setups.clone();
    let opening = Box::pin(gate::Gated::new(
        Box::pin(open(stream, peer, identity, shared).instrument(span)),
        &gate,
    ));
    async move {
        // `let else`, not `if let`, whose scrutinee would stay stored for the session's life.
        let Some((s, span)) = opening.await else {
            return drop(guard);
        };
        traced(s.live(), span).await;
        // Dropped here, not moved into a local first (that would store it twice).
        drop(guard);
    }
}

/// `f` instrumented with `span` only when the span is enabled (the session's span is at
/// `debug`), and then boxed: a disabled span kept beside every idle vehicle's future
/// would cost it 40 bytes.
fn traced<F: std::future::Future>(
    f: F,
    span: tracing::Span,
) -> Either<F, std::pin::Pin<Box<tracing::instrument::Instrumented<F>>>> {
    if span.is_disabled() {
        Either::Left(f)
    } else {
        Either::Right(Box::pin(f.instrument(span)))
    }
}

/// The CONNECT phase: reads and decides the CONNECT, attaches the session and queues the
/// CONNACK (and any re-sends). `None` when the connection ended here.
///
/// Not an `async fn`, which would store its arguments twice (as arguments and as the
/// locals they move into): this future is boxed for every connecting vehicle, and kept
/// small enough for the allocator to recycle (see `size_tests`).
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn open<S>(
    mut stream: S,
    peer: SocketAddr,
    identity: Option<CertIdentity>,
    shared: Arc<Shared>,
) -> impl std::future::Future<Output = Option<(Box<Session<S>>, tracing::Span)>>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    async move {
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let connect_timeout = Duration::from_secs(shared.cfg.mqtt.connect_timeout_secs);
        // One deadline for reading the CONNECT and deciding it (authentication included).
        let connect_deadline = Instant::now() + connect_timeout;
        let mut read_buf = BytesMut::with_capacity(CONNECT_READ);
        // A connection still without a session does not hold up a shutdown.
        let reading = timeout_at(
            connect_deadline,
            Box::pin(connect::read_connect(&mut stream, &mut read_buf, &shared)),
        );
        let read = tokio::select! {
            _ = shared.shutdown.cancelled() => return None,
            r = reading => r,
        };
        let first = match read {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                bridge::counted!(warn, shared.metrics.protocol_errors, e.label, %peer, detail = ?e.to_string(), "connection closed before CONNECT");
                return None;
            }
            Err(_) => {
                bridge::counted!(warn, shared.metrics.protocol_errors, "connect_timeout", %peer, timeout_secs = connect_timeout.as_secs(), "no complete CONNECT in time; closing");
                return None;
            }
        };
        let (codec, req) = first;
        if !req.client_id.is_empty() {
            tracing::Span::current().record("client_id", req.client_id.as_str());
        }
        let mut out = BytesMut::new();
        let decided = timeout_at(
            connect_deadline,
            Box::pin(connect::accept_connect(
                &codec,
                &req,
                peer,
                identity.as_ref(),
                &shared,
            )),
        )
        .await
        .unwrap_or(Err(ConnectRefusal::AuthTimeout));
        let admitted = match decided {
            Ok(a) => a,
            Err(why) => {
                let counter = &shared.metrics.connack_refused;
                if matches!(
                    why,
                    ConnectRefusal::RateLimitedAddress | ConnectRefusal::RateLimitedGlobal
                ) {
                    // A flood must not turn into a log flood: counted, logged at debug.
                    bridge::counted!(debug, counter, why.label(), %peer, "CONNECT refused: rate limit");
                } else {
                    bridge::counted!(warn, counter, why.label(), %peer, client_id = ?req.client_id, "CONNECT refused");
                }
                codec.connack_refuse(&mut out, why);
                let _ = timeout(WRITE_TIMEOUT, stream.write_all(&out)).await;
                let _ = stream.shutdown().await;
                return None;
            }
        };
        let client_id: Arc<str> = Arc::from(admitted.client_id.as_str());
        // Recorded once: the log formatter appends every `record`, and an id recorded
        // from the CONNECT again printed `client_id` twice on each line.
        if req.client_id.is_empty() {
            tracing::Span::current().record("client_id", &*client_id);
        }
        // The span is attached to the session's future (not entered across awaits, which
        // would label other tasks' log lines with this vehicle). A debug span: an enabled span
        // lives in the subscriber's registry with its formatted fields for the connection's
        // whole life (0.5 KiB per idle vehicle, measured), so the info and warn events of a
        // session name the client id themselves.
        // No parent: the connection's `conn` span ends at CONNACK and is not kept alive by it.
        let span = tracing::debug_span!(parent: None, "session", client_id = %client_id, %peer, listener = S::LISTENER);
        let _entered = span.clone().entered();
        let m = &shared.cfg.mqtt;
        let max_expiry = shared.cfg.sessions.max_expiry_secs;
        // 3.1.1: clean session 0 keeps the session for `sessions.max_expiry_secs`.
        let (expiry, expiry_capped) = match codec.version {
            Version::V4 if req.clean_start => (0, false),
            Version::V4 => (max_expiry, false),
            Version::V5 => {
                let asked = req.session_expiry_secs.unwrap_or(0);
                (asked.min(max_expiry), asked > max_expiry)
            }
        };
        // Keep alive 0 ("never") or above the cap becomes the cap.
        let capped = req.keep_alive == 0 || req.keep_alive > m.max_keep_alive_secs;
        let keep_alive_secs = if capped {
            shared.metrics.keep_alive_capped.inc();
            m.max_keep_alive_secs
        } else {
            req.keep_alive
        };
        let connected_at_ms = now_ms();
        let info = Arc::new(ConnInfo {
            conn,
            peer,
            tls: S::LISTENER == "tls",
            tls_identity: identity
                .as_ref()
                .and_then(|i| i.preferred(&shared.cfg.tls.identity))
                .map(Box::from),
            connected_at_ms,
            keep_alive_secs,
            ..ConnInfo::default()
        });
        let attached = shared.registry.attach(
            Connecting {
                client_id: &client_id,
                owner: Owner { info: info.clone() },
                clean_start: req.clean_start,
                expiry_secs: expiry,
                protocol: if codec.version == Version::V5 { 5 } else { 4 },
            },
            &shared.router,
            &shared.store,
            &shared.metrics,
        );
        if let Some((old, w)) = attached.will_due {
            // The discarded session's delayed Will is due now; published beside this CONNECT.
            let shared = shared.clone();
            tokio::spawn(async move { will::publish(&shared, &old, w.user.as_deref(), w.will).await });
        }
        let assigned = (*client_id != *req.client_id).then(|| client_id.to_string());
        let mut codec = codec;
        if let Some(max) = req.max_packet_size {
            codec.max_out = max;
        }
        if codec.version == Version::V5 {
            codec.alias_out = req.topic_alias_max.unwrap_or(0).min(m.outbound_topic_aliases);
        }
        let server_keep_alive = (capped && codec.version == Version::V5).then_some(keep_alive_secs);
        codec.connack(
            &mut out,
            &ConnAckParams {
                session_present: attached.present,
                receive_max: m.max_inflight,
                topic_alias_max: m.topic_alias_max,
                assigned,
                server_keep_alive,
                max_qos: m.max_qos,
                session_expiry_secs: expiry_capped.then_some(expiry),
                retain_available: shared.cfg.retained.enabled,
            },
        );
        let cell = attached.cell;
        // Messages sent before and not acknowledged go first, with DUP (§4.4).
        let receive_max = usize::from(req.receive_maximum.unwrap_or(u16::MAX).max(1));
        let releases = cell.resend_inflight(&mut out, &codec, receive_max, &shared.store, &shared.metrics);
        let keep_alive = Duration::from_millis(u64::from(keep_alive_secs) * 1500);
        shared.metrics.connections_active.inc();
        info!(client_id = %client_id, %peer, conn, version = ?codec.version, keep_alive = req.keep_alive, clean_start = req.clean_start,
        session_present = attached.present, session_expiry = expiry, "connected");
        let stored_bytes: usize = cell.lock().subscriptions.keys().map(str::len).sum();
        let s = Box::new(Session {
            stream,
            shared: shared.clone(),
            codec,
            user: admitted.user.map(String::into_boxed_str),
            cell,
            read_buf,
            last_read: 0,
            out,
            pending: releases
                .into_iter()
                .map(|(pkid, gen)| Pending::release(pkid, gen))
                .collect(),
            last_seq: 0,
            last_gen: 0,
            keep_alive_ms: u32::try_from(keep_alive.as_millis()).unwrap_or(u32::MAX),
            aliases: None,
            quota_logged: false,
            stored_bytes: u32::try_from(stored_bytes).unwrap_or(u32::MAX),
            will: req.will.clone().map(Box::new),
            receive_max: req.receive_maximum.unwrap_or(u16::MAX).max(1),
            connect_expiry: expiry,
            pace: Instant::now(),
            clean_start: req.clean_start,
            info,
        });
        drop(_entered);
        // Before the session reads anything more: every publish of this connection is
        // journaled after its `connected` event.
        s.journal_connected(attached.present, identity.as_ref()).await;
        // That may have waited for journal space: the keep alive counts from the CONNACK,
        // which leaves only now.
        s.touch();
        shared.keep_alive.watch(&s.info, &s.cell);
        Some((s, span))
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// The connection's life after its CONNECT: serve it, then say goodbye.
    ///
    /// Not an `async fn`, which would store the boxed session twice (its argument and
    /// the local it moves into).
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn live(mut self: Box<Self>) -> impl std::future::Future<Output = ()> {
        async move {
            let close = self.serve().await;
            // Out of the keep-alive clock before the goodbye, which may wait at the set-up
            // gate: a cell taken over meanwhile is not woken for this connection.
            self.shared.keep_alive.forget(&self.info);
            // Boxed: the goodbye path is rare; keeping it out of the session's future keeps
            // an idle connection small (a million of them must fit in memory).
            if matches!(close, Close::TakenOver) {
                // Not gated: the new owner already runs, and this goodbye (the stolen
                // wake-up passed on, the Will, `disconnected`) must not land after its
                // traffic.
                Box::pin(self.finish(close)).await;
            } else {
                // Behind the set-up gate: thousands of connections cut at once say their
                // goodbyes (presence events, Wills) without stalling the connected vehicles.
                let gate = self.shared.setups.clone();
                gate::Gated::new(Box::pin(self.finish(close)), &gate).await;
            }
            self.shared.metrics.connections_active.dec();
        }
    }

    async fn serve(&mut self) -> Close {
        // Nothing is kept across the waits below that can be looked up again (the
        // watermarks, the in-flight bound): this future's size is an idle vehicle's memory.
        let cell = self.cell.clone();
        loop {
            let (durable, flushed) = self.watermarks();
            if self.store_stuck(flushed) {
                return Close::StoreFailed(
                    "a store flush failed; acknowledgements cannot be made durable".into(),
                );
            }
            // Acknowledge first: that frees in-flight room for packets already buffered
            // (a paused 3.1.1 client may have nothing more to send until they are read).
            self.ack_durable(durable, flushed);
            if let Err(close) = self.process_buffered(self.max_inflight()).await {
                return close;
            }
            // And after: a refused publish may be acknowledgeable at once.
            let (durable, flushed) = self.watermarks();
            self.ack_durable(durable, flushed);
            let (more, hold) = self.fill_outbound();
            if hold > 0 && self.shared.store.has_failed() {
                // A held QoS 2 delivery waits for a flush that will never come (and its
                // wait below would return at once, for ever).
                return Close::StoreFailed(
                    "a store flush failed; a QoS 2 delivery cannot be made durable".into(),
                );
            }
            if let Err(e) = self.flush().await {
                return Close::Io(e);
            }
            // Room freed while whole packets wait in the buffer: handle them now. The peer
            // may have sent everything already, so no new bytes would wake us.
            if self.inbound_room(self.max_inflight()) && self.packet_buffered() {
                continue;
            }
            let can_read = self.inbound_room(self.max_inflight()) || self.codec.version == Version::V5;
            if !can_read {
                // We stopped reading (in-flight bound, e.g. while the journal withholds
                // durability): the client's PINGREQs wait unread in the socket, so its
                // keep-alive is not counting against it until we read again.
                self.touch();
            }
            // One wait covers deliveries, a takeover, shutdown and the keep-alive clock
            // (`keepalive`): registered before the look below, so none can slip in between.
            let woken = cell.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(close) = self.ended() {
                return close;
            }
            if can_read && self.keep_alive_expired() {
                return Close::KeepAlive;
            }
            // Not reading, waiting on the journal: a writer that stopped for good wakes
            // nobody, so look now and then (the session must not outlive it). Boxed: only
            // a back-pressured session pays for the timer.
            let check = (!can_read).then(|| Box::pin(tokio::time::sleep(JOURNAL_CHECK)));
            // Acknowledgements waiting on the journal or the store, or else a QoS 2
            // delivery waiting for its packet id's flush: their watches are waited on
            // (boxed) only while something waits, so an idle vehicle's future reserves
            // no room for them.
            let acks = self
                .pending
                .front()
                .map(|p| (p.seq, p.gen))
                .or((hold > 0).then_some((0, hold)))
                .map(|(seq, gen)| Box::pin(covered(self.shared.clone(), seq, gen)));
            tokio::select! {
                biased;
                journal_open = WhenSome(acks) => {
                    if !journal_open {
                        return Close::JournalStopped("journal closed".into());
                    }
                }
                _ = WhenSome(check) => {
                    if self.store_stuck(self.shared.store.flushed_gen()) {
                        return Close::StoreFailed("a store flush failed".into());
                    }
                    if self.shared.journal_stopped() {
                        return Close::JournalStopped("journal stopped".into());
                    }
                }
                read = std::future::poll_fn(|cx| self.poll_read_more(cx)), if can_read => match read {
                    Ok(0) => return Close::PeerClosed,
                    Ok(_) => {}
                    Err(e) => return Close::Io(e),
                },
                _ = &mut woken => {}
                // More deliveries are ready (the write budget stopped the last fill):
                // after the reads above had their chance.
                _ = std::future::ready(()), if more => {}
            }
        }
    }

    /// Ends the session: tells the client why (MQTT 5), publishes the Will when due,
    /// detaches from the session (which ends, or stays for a persistent session),
    /// journals the `disconnected` presence event, and on shutdown first waits for
    /// pending acknowledgements to become durable.
    async fn finish(&mut self, close: Close) {
        if matches!(close, Close::TakenOver) {
            // The new owner shares this cell's wake-ups, and one meant for it may have
            // been taken by this connection as it noticed the takeover: pass it on now,
            // not after the goodbye.
            self.cell.wake.notify_one();
        }
        let metrics = &self.shared.metrics;
        metrics.connections_closed.inc(close.label());
        let reason = match &close {
            Close::Protocol(e) => {
                metrics.protocol_errors.inc(e.label);
                warn!(client_id = %self.cell.client_id, peer = %self.info.peer, conn = self.info.conn, reason = e.label, detail = ?e.detail, "closing connection: protocol error");
                Some(e.reason)
            }
            Close::KeepAlive => {
                info!(client_id = %self.cell.client_id, peer = %self.info.peer, conn = self.info.conn, "closing connection: no packet within 1.5 × keep alive");
                Some(0x8D)
            }
            Close::TakenOver => {
                info!(client_id = %self.cell.client_id, peer = %self.info.peer, conn = self.info.conn, "closing connection: client id taken over by a new connection");
                Some(0x8E)
            }
            Close::Kicked => {
                warn!(client_id = %self.cell.client_id, peer = %self.info.peer, conn = self.info.conn, "closing connection: kicked by an operator (admin API)");
                Some(0x98)
            }
            Close::Shutdown => {
                self.drain_acks().await;
                Some(0x8B)
            }
            Close::JournalStopped(why) => {
                warn!(client_id = %self.cell.client_id, peer = %self.info.peer, conn = self.info.conn, error = %why, "closing connection: journal stopped");
                Some(0x80)
            }
            Close::StoreFailed(why) => {
                warn!(client_id = %self.cell.client_id, peer = %self.info.peer, conn = self.info.conn, error = %why, "closing connection: session store failed");
                Some(0x80)
            }
            Close::Io(e) => {
                debug!(error = %e, "connection I/O error");
                None
            }
            Close::ClientDisconnect | Close::PeerClosed | Close::DisconnectWithWill => {
                debug!(reason = close.label(), "connection closed by client");
                None
            }
        };
        if let Some(reason) = reason {
            self.codec.disconnect(&mut self.out, reason);
        }
        // The goodbye is best effort: a peer whose writes already timed out gets a short
        // chance, not another full write timeout.
        let _ = self.flush_within(GOODBYE_WRITE).await;
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
        let detached = self.shared.registry.detach(
            &self.cell,
            self.info.conn,
            &self.shared.router,
            &self.shared.store,
            &self.shared.metrics,
        );
        if close.publishes_will() {
            if let Some(w) = self.will.take() {
                let user = self.user.as_deref().map(str::to_owned);
                will::on_close(&self.shared, &self.cell, user, *w, &detached).await;
            }
        }
        // Last: after the connection's final publish and its Will (when published now).
        self.journal_disconnected(&close, detached == Detached::Kept)
            .await;
        if detached == Detached::Kept {
            debug!("persistent session kept offline");
        }
    }

    /// The journal's durable watermark and the store's flushed generation, now.
    fn watermarks(&self) -> (u64, u64) {
        (self.shared.journal.durable_seq(), self.shared.store.flushed_gen())
    }

    /// Bytes of topic strings this session stores (see the field).
    fn stored_bytes(&self) -> usize {
        self.stored_bytes as usize
    }

    fn set_stored_bytes(&mut self, bytes: usize) {
        self.stored_bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
    }

    /// `mqtt.max_inflight`: QoS 1/2 publishes of the client waiting for acknowledgement.
    fn max_inflight(&self) -> usize {
        usize::from(self.shared.cfg.mqtt.max_inflight)
    }

    /// 1.5 × the effective keep alive.
    fn keep_alive(&self) -> Duration {
        Duration::from_millis(u64::from(self.keep_alive_ms))
    }

    /// The client was heard from (or is not being read): its keep-alive deadline is
    /// 1.5 × its keep alive from now.
    fn touch(&self) {
        let due = self.shared.keep_alive.due_in(self.keep_alive());
        self.info.keep_alive_due.store(due, Ordering::Relaxed);
    }

    /// The keep-alive clock passed this connection's deadline.
    fn keep_alive_expired(&self) -> bool {
        self.shared
            .keep_alive
            .expired(self.info.keep_alive_due.load(Ordering::Relaxed))
    }

    /// Whether this connection must end now: the gateway is shutting down, or a newer
    /// connection took the session (or its client id) over.
    fn ended(&self) -> Option<Close> {
        if self.shared.shutdown.is_cancelled() {
            Some(Close::Shutdown)
        } else if !self.cell.owned_by(self.info.conn) {
            Some(Close::TakenOver)
        } else if self.info.kicked.load(Ordering::Relaxed) {
            Some(Close::Kicked)
        } else {
            None
        }
    }

    /// Acknowledgements wait for a store flush that will never come (a failed store
    /// stays failed; sessions that owe nothing to it are not affected).
    fn store_stuck(&self, flushed: u64) -> bool {
        self.shared.store.has_failed() && self.pending.iter().any(|p| p.gen > flushed)
    }

    /// On shutdown: acknowledge everything already accepted once it is durable.
    async fn drain_acks(&mut self) {
        let mut rx = self.shared.journal.durable();
        let mut flushed = self.shared.store.flushed();
        while !self.pending.is_empty() {
            let durable = *rx.borrow_and_update();
            self.ack_durable(durable, *flushed.borrow_and_update());
            if self.pending.is_empty() || self.shared.store.has_failed() {
                break;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                r = flushed.changed() => if r.is_err() { break },
            }
        }
    }
}

/// Until the journal's durable watermark reaches `seq` and the store's flushed generation
/// `gen` (what the first waiting acknowledgement needs), or the store failed while this
/// acknowledgement waits on it; false when the journal's watch is gone. Subscribes before
/// it looks, so a move between the caller's look and the subscription is not missed (the
/// store flags a failure before it wakes the watchers).
///
/// A failed store ends the wait only when the acknowledgement needs the store (`f <
/// gen`): one that waits on the journal alone keeps waiting. (Ending it whatever it waits
/// on made the session loop spin without yielding until the next fsync, found by review.)
async fn covered(shared: Arc<Shared>, seq: u64, gen: u64) -> bool {
    let mut durable = shared.journal.durable();
    let mut flushed = shared.store.flushed();
    loop {
        let (d, f) = (*durable.borrow_and_update(), *flushed.borrow_and_update());
        if (d >= seq && f >= gen) || (f < gen && shared.store.has_failed()) {
            return true;
        }
        tokio::select! {
            changed = durable.changed() => if changed.is_err() {
                return false;
            },
            _ = flushed.changed() => {}
        }
    }
}

/// `f`, or never when there is none (a `select!` branch that may be absent). A struct,
/// not an `async fn`: the session's future holds only the option, not room for its state.
struct WhenSome<F>(Option<F>);

impl<F: std::future::Future + Unpin> std::future::Future for WhenSome<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        match self.0.as_mut() {
            Some(f) => std::pin::Pin::new(f).poll(cx),
            None => std::task::Poll::Pending,
        }
    }
}

#[cfg(test)]
mod size_tests {
    use std::mem::size_of;

    type Tcp = tokio::net::TcpStream;
    type Tls = crate::tls::stream::TlsStream;

    /// The largest task future tokio (1.54, x86_64) fits in a 384-byte task cell.
    const TASK_FUTURE_FOR_384: usize = 264;

    /// Size of what `f` returns (a future's size without having to run it).
    fn returned4<A, B, C, D, R>(_: fn(A, B, C, D) -> R) -> usize {
        size_of::<R>()
    }

    fn returned5<A, B, C, D, E, R>(_: fn(A, B, C, D, E) -> R) -> usize {
        size_of::<R>()
    }

    fn returned6<A, B, C, D, E, F, R>(_: fn(A, B, C, D, E, F) -> R) -> usize {
        size_of::<R>()
    }

    /// Every idle vehicle holds its connection's future, a boxed `Session` and a
    /// `SessionCell`: their sizes are most of the gateway's memory at a million
    /// connections. The CONNECT phase must not stay in the future (it once made a plain
    /// connection's future 1,768 bytes and a TLS one's 5,320), and the TLS state lives
    /// in the boxed session, not in the future.
    #[test]
    fn idle_state_sizes() {
        let session = size_of::<super::Session<Tcp>>();
        let cell = size_of::<super::state::SessionCell>();
        let state = size_of::<super::state::SessionState>();
        let out = size_of::<super::state::Outbound>();
        let plain = returned6(super::run::<Tcp, tokio::sync::OwnedSemaphorePermit>);
        let tls = returned6(super::run::<Tls, tokio::sync::OwnedSemaphorePermit>);
        println!(
            "run future: plain {plain} B, TLS {tls} B; Session {session} B, \
             SessionCell {cell} B (state {state} B, outbound {out} B)"
        );
        // glibc rounds a block to 16 bytes with 8 of its own: each 16 bytes more here is
        // 16 bytes more per idle vehicle.
        assert!(session <= 256, "Session grew to {session} bytes");
        assert!(cell <= 152, "SessionCell grew to {cell} bytes");
        // In an `Arc` (16 bytes of counts): up to 120 bytes it is a 144-byte glibc chunk.
        let info = size_of::<super::state::ConnInfo>();
        println!("ConnInfo {info} B");
        assert!(info <= 120, "ConnInfo grew to {info} bytes");
        assert!(plain <= 512, "a plain connection's future grew to {plain} bytes");
        assert!(tls <= 512, "a TLS connection's future grew to {tls} bytes");
        // The task a plain connection runs in holds that future once, not twice.
        // The CONNECT phase is boxed and freed once the session runs: up to 1,032 bytes,
        // glibc recycles a freed block of one size for the next of that size (its
        // thread cache); a larger one is split for other requests, and a connect burst
        // leaves holes between the long-lived allocations of its vehicles.
        let opening = size_of::<tracing::instrument::Instrumented<()>>() + returned4(super::open::<Tcp>);
        let tls_opening = size_of::<tracing::instrument::Instrumented<()>>() + returned4(super::open::<Tls>);
        println!("CONNECT phase: plain {opening} B, TLS {tls_opening} B");
        assert!(opening <= 1032, "the plain CONNECT phase is {opening} bytes");
        // (A TLS stream alone is over 1 KiB: the TLS phase cannot be that small.)
        assert!(
            tls_opening <= 2304,
            "the TLS CONNECT phase is {tls_opening} bytes"
        );
        let task = returned5(crate::server::plain_connection);
        println!("plain connection task future {task} B");
        let tls_task = returned6(crate::server::tls_connection);
        println!("TLS connection task future {tls_task} B");
        assert!(
            task <= plain + 16,
            "a plain connection's task future is {task} bytes"
        );
        // tokio keeps a task in one allocation aligned to 128 bytes: 32 bytes of header,
        // the future with 32 bytes of bookkeeping (40 with `--cfg tokio_unstable`, our
        // build: see .cargo/config.toml), 48 bytes of trailer. Up to 264 bytes of future,
        // that is 384 bytes per idle vehicle; 8 bytes more costs 512. (What keeps it
        // there: no timer in the session's loop — the keep alive is one shared clock,
        // `keepalive`, and a write arms a timer only when the socket does not take it
        // at once — and the loop's waits are polled in place, not `async fn`s.)
        assert!(
            task <= TASK_FUTURE_FOR_384,
            "a plain connection's task future is {task} bytes: its task takes 512 bytes"
        );
        assert!(
            tls_task <= TASK_FUTURE_FOR_384,
            "a TLS connection's task future is {tls_task} bytes: its task takes 512 bytes"
        );
    }
}
