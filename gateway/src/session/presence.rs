//! Presence events: one `connected` and one `disconnected` per accepted connection,
//! journaled as [`EntryKind::Presence`] records that the bridge writes to
//! `[presence] kafka_topic`, keyed by client id. With `[presence] enabled = false`
//! nothing is journaled.
//!
//! Order is the point. A vehicle's presence events and its messages share a Kafka key,
//! hence a partition, and the bridge produces in journal order. `connected` is appended
//! once the CONNECT is accepted and before the session reads anything else, so its
//! journal sequence is below every publish of that connection; `disconnected` is the
//! connection's last append, after its last publish and after a Will published at once
//! (a delayed Will comes later, by nature). A refused CONNECT has no events.
//!
//! In a takeover two connections of one client id overlap: the new connection's
//! `connected` is usually journaled before the old one's `disconnected` (`taken_over`).
//! `conn` pairs them: a vehicle is online while its latest `connected` has no
//! `disconnected` with the same `gateway_id` and `conn`.
//!
//! A full journal: an event follows `journal.full_policy` like a PUBLISH. Under
//! back-pressure `connected` waits (and the CONNACK with it), as the first PUBLISH would,
//! but gives up on shutdown or a takeover; `disconnected` belongs to a connection that is
//! already closed, so it waits at most [`DISCONNECTED_WAIT`] and gives up on shutdown.
//! Under `reject` the event is not journaled. An event not journaled is never silent:
//! `gateway_presence_dropped_total{reason}` and a warn line.
//!
//! At start, in a region (`commands.many_gateways = true`): a gateway that was killed
//! (SIGKILL, power loss) journaled no `disconnected` for its connections, and the
//! region's reporter would take those vehicles for held here for ever. So once the
//! persistent sessions are restored and before the listeners accept anyone,
//! [`journal_start`] journals one `gateway_started` (key [`started_key`]) and, for each
//! restored session, a `disconnected` with reason [`GATEWAY_RESTARTED`], all at the same
//! `at_ms`: what this gateway held before is void, what it still holds is said again
//! (`commands::region` has the rule). Journaled before the listeners, they precede every
//! vehicle's next `connected` in the journal, hence in Kafka per key. They wait for
//! journal space at most [`STARTED_WAIT`] in all.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bridge::{EntryKind, EntryRef, TryAppend};
use serde::Serialize;
use tracing::warn;

use super::{Close, Session};
use crate::mqtt::Version;
use crate::state::Shared;
use crate::tls::CertIdentity;

/// The MQTT topic of presence records (their `mqtt.topic` header), for information: the
/// Kafka topic comes from the record's kind, so no vehicle can publish a presence event.
pub const TOPIC: &str = "$gateway/presence";

/// Longest a closed connection waits for journal space for its `disconnected` event:
/// the bound its Will gets, so a full journal cannot hold connection slots forever.
const DISCONNECTED_WAIT: Duration = Duration::from_secs(5);

/// Longest the start events wait for journal space, all together: a full journal that
/// does not drain (Kafka unreachable) must not keep the gateway from starting. Events
/// that did not fit are counted like any other, and logged in one line.
const STARTED_WAIT: Duration = Duration::from_secs(5);

/// `reason` of the `disconnected` event a gateway journals at start for each persistent
/// session it restored: the session is held here, offline, though no connection of this
/// process ended.
pub const GATEWAY_RESTARTED: &str = "gateway_restarted";

/// `reason` of the `disconnected` event journaled when an operator discards an offline
/// session (`DELETE /api/v1/sessions/{client_id}`): the gateway holds it no more.
pub const SESSION_DISCARDED: &str = "session_discarded";

/// Which presence event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Connected,
    Disconnected,
    /// A gateway (re)started: its events from before say nothing any more.
    GatewayStarted,
}

impl Presence {
    /// The label of `gateway_presence_events_total{event}` (and the JSON `event`).
    pub fn label(self) -> &'static str {
        match self {
            Presence::Connected => "connected",
            Presence::Disconnected => "disconnected",
            Presence::GatewayStarted => "gateway_started",
        }
    }
}

/// The Kafka key (and `mqtt.client_id` header) of `gateway_id`'s `gateway_started`
/// event: a NUL, then `gateway_started/` and the gateway id.
///
/// It must never be a vehicle's client id: the presence topic is compacted by key, and a
/// vehicle sharing it would have its events, or the gateway's start, compacted away. MQTT
/// forbids U+0000 in every string (3.1.1 §1.5.3, 5.0 §1.5.4) and this gateway refuses a
/// client id with a control character under either `mqtt.client_id_policy`, so no vehicle
/// connects, publishes or gets commands under it. One key per gateway: compaction keeps
/// its latest start, the only one the region's rule needs.
pub fn started_key(gateway_id: &str) -> String {
    format!("\0gateway_started/{gateway_id}")
}

/// The JSON value of a presence record (the README shows an example).
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    pub event: Presence,
    pub client_id: &'a str,
    /// `gateway.id`: which gateway holds the connection; with `conn`, the pairing key.
    pub gateway_id: &'a str,
    /// `"3.1.1"` or `"5.0"`.
    pub protocol: &'static str,
    /// `"tcp"` (`mqtt.listen`) or `"tls"` (`mqtt.tls_listen`), as
    /// `gateway_connections_accepted_total{listener}` names them.
    pub listener: &'static str,
    /// The verified client certificate's identity under `tls.identity` (mTLS), else null.
    pub tls_identity: Option<&'a str>,
    pub peer: SocketAddr,
    /// `connected` only: what the CONNACK told the vehicle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_present: Option<bool>,
    pub clean_start: bool,
    /// The keep alive in force (after the `mqtt.max_keep_alive_secs` cap).
    pub keep_alive_secs: u16,
    /// `disconnected` only: why the connection ended, as
    /// `gateway_connections_closed_total{reason}` names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// `disconnected` only: whether the session stays on this gateway (persistent, now
    /// offline) and for how long at most (its expiry interval; u32::MAX: never). Other
    /// gateways of the region learn from it who holds the vehicle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_kept: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_expiry_secs: Option<u32>,
    pub connected_at_ms: u64,
    /// When the event happened (also the record's `mqtt.received_at_ms`).
    pub at_ms: u64,
    /// The connection's number in this gateway process: pairs the two events.
    pub conn: u64,
}

impl Value for Event<'_> {
    fn event(&self) -> Presence {
        self.event
    }
    fn key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self.client_id)
    }
    fn at_ms(&self) -> u64 {
        self.at_ms
    }
}

/// The JSON value of a `gateway_started` record: the gateway and when it started.
#[derive(Debug, Serialize)]
pub struct Started<'a> {
    pub event: Presence,
    pub gateway_id: &'a str,
    pub at_ms: u64,
}

impl Value for Started<'_> {
    fn event(&self) -> Presence {
        self.event
    }
    fn key(&self) -> Cow<'_, str> {
        Cow::Owned(started_key(self.gateway_id))
    }
    fn at_ms(&self) -> u64 {
        self.at_ms
    }
}

/// The JSON value of the `disconnected` record journaled at start for a restored
/// persistent session (reason [`GATEWAY_RESTARTED`]). It has no connection: `conn` is 0,
/// which no connection gets, and the connection's fields are absent.
#[derive(Debug, Serialize)]
pub struct Restored<'a> {
    pub event: Presence,
    pub client_id: &'a str,
    pub gateway_id: &'a str,
    pub reason: &'static str,
    pub session_kept: bool,
    /// What remains of the session's expiry at `at_ms` (u32::MAX: never expires), so
    /// that `at_ms` + this is when the session ends here, as on any `disconnected`.
    pub session_expiry_secs: u32,
    pub at_ms: u64,
    pub conn: u64,
}

impl Value for Restored<'_> {
    fn event(&self) -> Presence {
        self.event
    }
    fn key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self.client_id)
    }
    fn at_ms(&self) -> u64 {
        self.at_ms
    }
}

/// Journals that an operator discarded `client_id`'s offline session here: consumers of
/// the presence topic, and the region's reporter, learn that this gateway no longer
/// holds it (else commands to it would be left to this gateway, which settles them
/// silently, until the session's expiry would have passed). Gives up after
/// [`STARTED_WAIT`] for journal space.
pub async fn journal_discarded(shared: &Shared, client_id: &str) {
    if !shared.cfg.presence.enabled {
        return;
    }
    let event = Restored {
        event: Presence::Disconnected,
        client_id,
        gateway_id: &shared.gateway_id,
        reason: SESSION_DISCARDED,
        session_kept: false,
        session_expiry_secs: 0,
        at_ms: crate::message::now_ms(),
        conn: 0,
    };
    let give_up = || async {
        tokio::select! {
            _ = shared.shutdown.cancelled() => "shutdown",
            _ = tokio::time::sleep(STARTED_WAIT) => "timeout",
        }
    };
    if let Err((reason, detail)) = append(shared, &event, give_up).await {
        warn!(
            client_id,
            reason, detail, "session_discarded presence event not journaled"
        );
    }
}

/// The JSON value of a presence record, and what the record needs besides it.
trait Value: Serialize {
    fn event(&self) -> Presence;
    /// The record's key: the Kafka key and the `mqtt.client_id` header.
    fn key(&self) -> Cow<'_, str>;
    /// When it happened: the record's `mqtt.received_at_ms`.
    fn at_ms(&self) -> u64;
}

/// Room on the stack for an event's JSON. A `connected` event is about 300 bytes; one
/// with a long client id, gateway id or certificate identity goes to the heap instead.
/// On the stack because every connection journals one while it connects: a heap buffer
/// per event, freed between the long-lived allocations of the connections accepted at
/// the same time, stayed in the process's memory as holes (0.2 KiB per idle vehicle
/// after a connect burst, measured).
const JSON_ROOM: usize = 512;

/// `value` as JSON: written into `room` when it fits, else into a `Vec`.
fn json<'r>(room: &'r mut [u8], value: &impl Serialize) -> serde_json::Result<Cow<'r, [u8]>> {
    let mut cursor = std::io::Cursor::new(room);
    match serde_json::to_writer(&mut cursor, value) {
        Ok(()) => {
            let len = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
            let room = cursor.into_inner();
            Ok(Cow::Borrowed(room.get(..len).unwrap_or(room)))
        }
        // Did not fit (the only I/O error writing to memory can give).
        Err(e) if e.is_io() => serde_json::to_vec(value).map(Cow::Owned),
        Err(e) => Err(e),
    }
}

/// The presence record of a JSON value, borrowing its parts.
fn record<'a>(key: &'a str, at_ms: u64, payload: &'a [u8]) -> EntryRef<'a> {
    EntryRef {
        kind: EntryKind::Presence,
        packet_id: None,
        received_at_ms: at_ms,
        // QoS 1: stored and confirmed like a vehicle's QoS 1 message.
        qos: 1,
        retain: false,
        client_id: key,
        topic: TOPIC,
        payload,
        content_type: Some("application/json"),
        message_expiry_secs: None,
        user_properties: &[],
    }
}

/// What remains at `now` of a restored offline session's expiry, rounded up to whole
/// seconds (the session lasts here at least that long: expiry is swept, not exact);
/// `None` when it already expired (the sweep removes it; nothing to announce).
fn remaining_expiry_secs(expiry_secs: u32, disconnected_at_ms: u64, now: u64) -> Option<u32> {
    if expiry_secs == u32::MAX {
        return Some(u32::MAX);
    }
    let end = disconnected_at_ms.saturating_add(u64::from(expiry_secs) * 1000);
    let left = end.checked_sub(now).filter(|l| *l > 0)?;
    u32::try_from(left.div_ceil(1000)).ok()
}

/// Journals the start events (see the module doc) when this gateway is one of a region
/// (`commands.many_gateways`) with presence on: a single gateway has nobody to tell, and
/// its presence topic keeps only vehicles' keys. Called after the persistent sessions
/// are restored and before the listeners are bound, with the bridge running (so that a
/// full journal can drain).
pub async fn journal_start(shared: &Shared) {
    let cfg = &shared.cfg;
    if !cfg.presence.enabled || !cfg.commands.many_gateways {
        return;
    }
    let gateway_id = &*shared.gateway_id;
    let at_ms = crate::message::now_ms();
    // Nothing is connected yet: every session is a restored, offline one.
    let restored: Vec<(std::sync::Arc<str>, u32)> = shared
        .registry
        .all()
        .into_iter()
        .filter_map(|cell| {
            let st = cell.lock();
            let left = match (st.owner.is_none(), st.disconnected_at_ms()) {
                (true, Some(at)) => remaining_expiry_secs(st.expiry_secs, at, at_ms)?,
                _ => return None,
            };
            Some((cell.client_id.clone(), left))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + STARTED_WAIT;
    let give_up = || async move {
        tokio::select! {
            _ = shared.shutdown.cancelled() => "shutdown",
            _ = tokio::time::sleep_until(deadline) => "timeout",
        }
    };
    let started = Started {
        event: Presence::GatewayStarted,
        gateway_id,
        at_ms,
    };
    let mut dropped: Option<(&'static str, String)> = None;
    let mut dropped_count = 0usize;
    if let Err(e) = append(shared, &started, give_up).await {
        dropped_count += 1;
        dropped.get_or_insert(e);
    }
    for (client_id, left) in &restored {
        let event = Restored {
            event: Presence::Disconnected,
            client_id,
            gateway_id,
            reason: GATEWAY_RESTARTED,
            session_kept: true,
            session_expiry_secs: *left,
            at_ms,
            conn: 0,
        };
        if let Err(e) = append(shared, &event, give_up).await {
            dropped_count += 1;
            dropped.get_or_insert(e);
        }
    }
    match dropped {
        // One line for all: a full journal at start could otherwise log one per session.
        Some((reason, detail)) => warn!(
            gateway_id,
            dropped = dropped_count,
            sessions = restored.len(),
            reason,
            detail,
            "start presence events not all journaled: the region's reporter may take vehicles for held here that are not (Kafka commands to them get no outcome until they connect again)"
        ),
        None => tracing::info!(
            gateway_id,
            sessions = restored.len(),
            "gateway_started journaled, with a disconnected (gateway_restarted) per restored session"
        ),
    }
}

/// What presence events say about the transport, read from the stream itself so that a
/// session stores neither (rustls keeps the verified peer certificates for the
/// connection's life).
pub trait Transport {
    /// The listener kind, as `gateway_connections_accepted_total{listener}` names it.
    const LISTENER: &'static str;

    /// The verified client certificate (mTLS), if any.
    fn client_certificate(&self) -> Option<CertIdentity> {
        None
    }
}

impl Transport for tokio::net::TcpStream {
    const LISTENER: &'static str = "tcp";
}

impl Transport for crate::tls::stream::TlsStream {
    const LISTENER: &'static str = "tls";

    fn client_certificate(&self) -> Option<CertIdentity> {
        let cert = self.peer_certificates()?.first()?;
        CertIdentity::from_der(cert.as_ref())
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::V4 => "3.1.1",
        Version::V5 => "5.0",
    }
}

impl<S: Transport> Session<S> {
    /// Journals `connected`. Called once the CONNECT is accepted and before the session
    /// reads anything else, so that the event precedes every publish of the connection.
    pub(super) async fn journal_connected(&self, session_present: bool, identity: Option<&CertIdentity>) {
        let shared = &self.shared;
        if !shared.cfg.presence.enabled {
            return;
        }
        let mut event = self.event(Presence::Connected, identity);
        event.session_present = Some(session_present);
        event.at_ms = self.info.connected_at_ms;
        // Waits like a PUBLISH would, as long as the connection is still wanted.
        let give_up = || async {
            tokio::select! {
                _ = shared.shutdown.cancelled() => "shutdown",
                _ = self.cell.lost_by(self.info.conn) => "taken_over",
            }
        };
        journal(shared, &event, give_up).await;
    }

    /// Journals `disconnected`: the connection's last append (after its last publish
    /// and its immediate Will).
    pub(super) async fn journal_disconnected(&self, close: &Close, kept: bool) {
        let shared = &self.shared;
        if !shared.cfg.presence.enabled {
            return;
        }
        let identity = self.stream.client_certificate();
        let mut event = self.event(Presence::Disconnected, identity.as_ref());
        event.reason = Some(close.label());
        event.session_kept = Some(kept);
        event.session_expiry_secs = kept.then(|| self.cell.lock().expiry_secs);
        let give_up = || async {
            tokio::select! {
                _ = shared.shutdown.cancelled() => "shutdown",
                _ = tokio::time::sleep(DISCONNECTED_WAIT) => "timeout",
            }
        };
        journal(shared, &event, give_up).await;
    }

    /// The fields both events share.
    fn event<'a>(&'a self, event: Presence, identity: Option<&'a CertIdentity>) -> Event<'a> {
        Event {
            event,
            client_id: &self.cell.client_id,
            gateway_id: &self.shared.gateway_id,
            protocol: protocol(self.codec.version),
            listener: S::LISTENER,
            tls_identity: identity.and_then(|i| i.preferred(&self.shared.cfg.tls.identity)),
            peer: self.info.peer,
            session_present: None,
            clean_start: self.clean_start,
            // `keep_alive_ms` is 1.5 × the keep alive in force, in milliseconds.
            keep_alive_secs: u16::try_from(self.keep_alive_ms / 1500).unwrap_or(u16::MAX),
            reason: None,
            session_kept: None,
            session_expiry_secs: None,
            connected_at_ms: self.info.connected_at_ms,
            at_ms: crate::message::now_ms(),
            conn: self.info.conn,
        }
    }
}

/// Appends `event` under `journal.full_policy`; a wait for space ends when the future
/// `give_up` makes does (with the reason it gives). The outcome is counted, and a drop
/// logged.
async fn journal<G: Future<Output = &'static str>>(
    shared: &Shared,
    event: &Event<'_>,
    give_up: impl FnOnce() -> G,
) {
    if let Err((reason, detail)) = append(shared, event, give_up).await {
        warn!(client_id = %event.client_id, peer = %event.peer, conn = event.conn,
            event = event.event.label(), reason, detail, "presence event not journaled");
    }
}

/// Appends one presence record under `journal.full_policy`, waiting for space (when the
/// policy waits) until the future `give_up` makes ends, and counts the outcome; a drop
/// comes back as (reason label, detail) for the caller to log.
///
/// Usually the journal has room: the record is admitted at once, its JSON on the stack,
/// with nothing on the heap and no future held. Only a journal without room makes the
/// event wait, boxed: every connection journals one while it connects, and the wait's
/// futures would otherwise be part of every CONNECT phase.
async fn append<G: Future<Output = &'static str>>(
    shared: &Shared,
    value: &impl Value,
    give_up: impl FnOnce() -> G,
) -> Result<(), (&'static str, String)> {
    let outcome = match append_now(shared, value) {
        Some(outcome) => outcome,
        None => Box::pin(append_waiting(shared, value, give_up())).await,
    };
    let event = value.event();
    let metrics = &shared.metrics;
    match &outcome {
        Ok(()) => metrics.presence_events.inc(event.label()),
        Err((reason, _)) => metrics.presence_dropped.inc(reason),
    }
    outcome
}

const REJECTED: &str = "journal full (journal.full_policy = \"reject\")";

/// Appends `value` if the journal has room now; `None` when it would have to wait.
fn append_now(shared: &Shared, value: &impl Value) -> Option<Result<(), (&'static str, String)>> {
    let mut room = [0u8; JSON_ROOM];
    let payload = match json(&mut room, value) {
        Ok(payload) => payload,
        Err(e) => return Some(Err(("encode_error", e.to_string()))),
    };
    let key = value.key();
    let entry = record(&key, value.at_ms(), &payload);
    match shared.journal.try_append_with(entry, shared.full_policy) {
        Ok(TryAppend::Appended(_)) => Some(Ok(())),
        Ok(TryAppend::Rejected) => Some(Err(("journal_full", REJECTED.into()))),
        Ok(TryAppend::Full) => None,
        Err(e) => Some(Err(("journal_error", e.to_string()))),
    }
}

/// Appends `value` once the journal has room, or gives up when `give_up` ends.
async fn append_waiting(
    shared: &Shared,
    value: &impl Value,
    give_up: impl Future<Output = &'static str>,
) -> Result<(), (&'static str, String)> {
    let payload = serde_json::to_vec(value).map_err(|e| ("encode_error", e.to_string()))?;
    let key = value.key();
    let entry = record(&key, value.at_ms(), &payload);
    tokio::select! {
        // Tried first: room that appeared is taken even during a shutdown (only a wait
        // for space is given up).
        biased;
        r = shared.journal.append_with(entry, shared.full_policy) => match r {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(("journal_full", REJECTED.into())),
            Err(e) => Err(("journal_error", e.to_string())),
        },
        why = give_up => Err((why, "gave up waiting for journal space".into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The record `append` journals for `value`, as reading it back gives it.
    fn entry(value: &impl Value) -> bridge::Entry {
        let mut room = [0u8; JSON_ROOM];
        let payload = json(&mut room, value).unwrap();
        record(&value.key(), value.at_ms(), &payload).to_entry()
    }

    fn connected() -> Event<'static> {
        Event {
            event: Presence::Connected,
            client_id: "VIN0001",
            gateway_id: "gw-eu-1",
            protocol: protocol(Version::V5),
            listener: "tls",
            tls_identity: Some("VIN0001"),
            peer: "10.0.0.7:51234".parse().unwrap(),
            session_present: Some(false),
            clean_start: true,
            keep_alive_secs: 60,
            reason: None,
            session_kept: None,
            session_expiry_secs: None,
            connected_at_ms: 1_700_000_000_000,
            at_ms: 1_700_000_000_000,
            conn: 42,
        }
    }

    #[test]
    fn connected_json_shape() {
        let v: serde_json::Value = serde_json::to_value(connected()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "event": "connected",
                "client_id": "VIN0001",
                "gateway_id": "gw-eu-1",
                "protocol": "5.0",
                "listener": "tls",
                "tls_identity": "VIN0001",
                "peer": "10.0.0.7:51234",
                "session_present": false,
                "clean_start": true,
                "keep_alive_secs": 60,
                "connected_at_ms": 1_700_000_000_000u64,
                "at_ms": 1_700_000_000_000u64,
                "conn": 42,
            })
        );
    }

    #[test]
    fn disconnected_json_has_a_reason_and_no_session_present() {
        let e = Event {
            event: Presence::Disconnected,
            protocol: protocol(Version::V4),
            listener: "tcp",
            tls_identity: None,
            session_present: None,
            reason: Some(Close::KeepAlive.label()),
            session_kept: Some(true),
            session_expiry_secs: Some(3600),
            at_ms: 1_700_000_060_000,
            ..connected()
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "disconnected");
        assert_eq!(v["protocol"], "3.1.1");
        assert_eq!(v["listener"], "tcp");
        assert_eq!(v["reason"], Close::KeepAlive.label());
        assert_eq!(v["session_kept"], true);
        assert_eq!(v["session_expiry_secs"], 3600);
        assert!(v["tls_identity"].is_null(), "null, not absent: {v}");
        assert!(v.get("session_present").is_none(), "{v}");
        assert_eq!(v["connected_at_ms"], 1_700_000_000_000u64);
        assert_eq!(v["at_ms"], 1_700_000_060_000u64);
    }

    #[test]
    fn gateway_started_json_and_key() {
        let e = Started {
            event: Presence::GatewayStarted,
            gateway_id: "gw-eu-1",
            at_ms: 1_700_000_000_000,
        };
        let entry = entry(&e);
        let v: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "event": "gateway_started",
                "gateway_id": "gw-eu-1",
                "at_ms": 1_700_000_000_000u64,
            })
        );
        assert_eq!(entry.kind, EntryKind::Presence);
        assert_eq!(entry.client_id, "\0gateway_started/gw-eu-1");
        assert_eq!(entry.received_at_ms, 1_700_000_000_000);
        assert_eq!(entry.topic, TOPIC);
        // No vehicle can connect under that key, whatever the client id policy.
        for policy in [
            crate::config::ClientIdPolicy::Any,
            crate::config::ClientIdPolicy::Strict,
        ] {
            assert!(!crate::auth::client_id_allowed(&entry.client_id, policy, 128));
        }
        assert!(!crate::commands::valid_client_id(&entry.client_id, 128));
    }

    #[test]
    fn restored_session_json_is_a_disconnected_without_a_connection() {
        let e = Restored {
            event: Presence::Disconnected,
            client_id: "VIN0001",
            gateway_id: "gw-eu-1",
            reason: GATEWAY_RESTARTED,
            session_kept: true,
            session_expiry_secs: 3599,
            at_ms: 1_700_000_000_000,
            conn: 0,
        };
        let entry = entry(&e);
        assert_eq!(entry.client_id, "VIN0001", "keyed by client id");
        let v: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "event": "disconnected",
                "client_id": "VIN0001",
                "gateway_id": "gw-eu-1",
                "reason": "gateway_restarted",
                "session_kept": true,
                "session_expiry_secs": 3599,
                "at_ms": 1_700_000_000_000u64,
                "conn": 0,
            })
        );
    }

    #[test]
    fn a_restored_session_is_announced_with_what_remains_of_its_expiry() {
        // Left at 10 s with an hour: at 70.5 s, 3,539.5 s remain, rounded up.
        assert_eq!(remaining_expiry_secs(3600, 10_000, 70_500), Some(3540));
        assert_eq!(remaining_expiry_secs(3600, 10_000, 10_000), Some(3600));
        assert_eq!(remaining_expiry_secs(60, 10_000, 69_999), Some(1));
        assert_eq!(remaining_expiry_secs(60, 10_000, 70_000), None, "expired");
        assert_eq!(remaining_expiry_secs(60, 10_000, 90_000), None, "expired");
        assert_eq!(remaining_expiry_secs(u32::MAX, 10_000, u64::MAX), Some(u32::MAX));
    }

    #[test]
    fn an_event_is_written_on_the_stack_and_a_long_one_on_the_heap() {
        let mut room = [0u8; JSON_ROOM];
        let event = connected();
        let fits = json(&mut room, &event).unwrap();
        assert!(matches!(fits, Cow::Borrowed(_)), "a usual event needs no heap");
        assert_eq!(&*fits, serde_json::to_vec(&event).unwrap().as_slice());
        let long_id = "v".repeat(JSON_ROOM);
        let long = Event {
            client_id: &long_id,
            ..connected()
        };
        let mut room = [0u8; JSON_ROOM];
        let spilled = json(&mut room, &long).unwrap();
        assert!(matches!(spilled, Cow::Owned(_)));
        assert_eq!(&*spilled, serde_json::to_vec(&long).unwrap().as_slice());
        let v: serde_json::Value = serde_json::from_slice(&spilled).unwrap();
        assert_eq!(v["client_id"], long_id.as_str());
    }

    #[test]
    fn the_record_is_a_presence_record_of_its_client() {
        let entry = entry(&connected());
        assert_eq!(entry.kind, EntryKind::Presence);
        assert_eq!(entry.client_id, "VIN0001");
        assert_eq!(entry.topic, TOPIC);
        assert_eq!(entry.received_at_ms, 1_700_000_000_000);
        assert_eq!(entry.content_type.as_deref(), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap();
        assert_eq!(v["event"], "connected");
    }
}
