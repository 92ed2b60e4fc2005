//! The first packet of a connection: reading the CONNECT (within
//! `mqtt.connect_timeout_secs`, authentication included), deciding it, and answering
//! connections beyond `mqtt.max_connections`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{CONNECT_READ, NEXT_CONN};
use crate::auth::{Limited, Principal};
use crate::message::now_ms;
use crate::mqtt::codec::{frame, sniff, ConnectRefusal, Framing, Sniff};
use crate::mqtt::{Codec, ConnectRequest, Inbound, ProtocolError, Version};
use crate::state::Shared;
use crate::tls::CertIdentity;
use crate::{auth, topic};

/// Who connected: the session's client id and, for a password user, the username (its
/// per-user ACLs apply).
pub struct Admitted {
    pub client_id: String,
    pub user: Option<String>,
}

/// Reads until the first packet is complete and decodes it; it must be a CONNECT.
pub(super) async fn read_connect<S>(
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
        buf.reserve(CONNECT_READ);
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Decides the CONNECT: returns the session's client id or the refusal. Cheap checks
/// first; the rate limits before any password work; the identity binding after it.
pub(super) async fn accept_connect(
    codec: &Codec,
    req: &ConnectRequest,
    peer: SocketAddr,
    identity: Option<&CertIdentity>,
    shared: &Arc<Shared>,
) -> Result<Admitted, ConnectRefusal> {
    if req.auth_method.is_some() {
        return Err(ConnectRefusal::BadAuthMethod);
    }
    if shared.shutdown.is_cancelled() || shared.journal_stopped() {
        return Err(ConnectRefusal::ServerUnavailable);
    }
    let m = &shared.cfg.mqtt;
    let id_ok = |id: &str| auth::client_id_allowed(id, m.client_id_policy, m.max_client_id_len);
    if !req.client_id.is_empty() && !id_ok(&req.client_id) {
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
            Some(id) => id.to_owned(),
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
    if !id_ok(&client_id) {
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
    let user = match &principal {
        Principal::User(u) => Some(u.clone()),
        _ => None,
    };
    if let Some(w) = &req.will {
        if topic::validate_name(&w.topic).is_err()
            || !shared.auth.may_publish_as(user.as_deref(), &client_id, &w.topic)
            || (w.retain && !(shared.cfg.retained.enabled && shared.auth.may_retain(user.as_deref())))
            || w.qos > shared.cfg.mqtt.max_qos
        {
            return Err(ConnectRefusal::NotAuthorized);
        }
        // Retained on a command topic, a Will would be replayed to the vehicle as a
        // command on every later subscription, with no outcome (as a retained PUBLISH
        // there is refused: `inbound`).
        if w.retain
            && !w.payload.is_empty()
            && crate::commands::Commands::vehicle_of(&shared.cfg.commands.mqtt_topic, &w.topic).is_some()
        {
            bridge::counted!(warn, shared.metrics.retained_refused, "command_topic", client_id, topic = ?w.topic, "CONNECT refused: a retained Will on a command topic");
            return Err(ConnectRefusal::NotAuthorized);
        }
        // A Will that is a command needs no route: it reaches Kafka as its outcome (as
        // a live command publish does, `inbound`).
        let command = crate::commands::Commands::commanded(
            &shared.cfg.commands.mqtt_topic,
            &w.topic,
            &client_id,
            w.retain,
            &w.payload,
        );
        if command.is_none() && !shared.routes.accepts(&w.topic) {
            warn!(client_id, topic = ?w.topic, "Will topic has no route to Kafka (kafka.unmatched = \"refuse\")");
            return Err(ConnectRefusal::WillUnroutable);
        }
    }
    Ok(Admitted { client_id, user })
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
