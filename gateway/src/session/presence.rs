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

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bridge::{Entry, EntryKind};
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

/// Which presence event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Connected,
    Disconnected,
}

impl Presence {
    /// The label of `gateway_presence_events_total{event}`.
    pub fn label(self) -> &'static str {
        match self {
            Presence::Connected => "connected",
            Presence::Disconnected => "disconnected",
        }
    }
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
    pub tls_identity: Option<String>,
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

impl Event<'_> {
    /// The journal record carrying this event.
    fn entry(&self) -> serde_json::Result<Entry> {
        Ok(Entry {
            kind: EntryKind::Presence,
            received_at_ms: self.at_ms,
            // QoS 1: stored and confirmed like a vehicle's QoS 1 message.
            qos: 1,
            client_id: self.client_id.to_string(),
            topic: TOPIC.to_string(),
            payload: serde_json::to_vec(self)?.into(),
            content_type: Some("application/json".to_string()),
            ..Default::default()
        })
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
        let gateway_id = shared.cfg.gateway_id();
        let mut event = self.event(Presence::Connected, &gateway_id, identity);
        event.session_present = Some(session_present);
        event.at_ms = self.connected_at_ms;
        // Waits like a PUBLISH would, as long as the connection is still wanted.
        let give_up = async {
            tokio::select! {
                _ = shared.shutdown.cancelled() => "shutdown",
                _ = self.cell.lost_by(self.conn) => "taken_over",
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
        let gateway_id = shared.cfg.gateway_id();
        let identity = self.stream.client_certificate();
        let mut event = self.event(Presence::Disconnected, &gateway_id, identity.as_ref());
        event.reason = Some(close.label());
        event.session_kept = Some(kept);
        event.session_expiry_secs = kept.then(|| self.cell.lock().expiry_secs);
        let give_up = async {
            tokio::select! {
                _ = shared.shutdown.cancelled() => "shutdown",
                _ = tokio::time::sleep(DISCONNECTED_WAIT) => "timeout",
            }
        };
        journal(shared, &event, give_up).await;
    }

    /// The fields both events share.
    fn event<'a>(
        &'a self,
        event: Presence,
        gateway_id: &'a str,
        identity: Option<&CertIdentity>,
    ) -> Event<'a> {
        Event {
            event,
            client_id: &self.client_id,
            gateway_id,
            protocol: protocol(self.codec.version),
            listener: S::LISTENER,
            tls_identity: identity.and_then(|i| i.preferred(&self.shared.cfg.tls.identity)),
            peer: self.peer,
            session_present: None,
            clean_start: self.clean_start,
            // `keep_alive_ms` is 1.5 × the keep alive in force, in milliseconds.
            keep_alive_secs: u16::try_from(self.keep_alive_ms / 1500).unwrap_or(u16::MAX),
            reason: None,
            session_kept: None,
            session_expiry_secs: None,
            connected_at_ms: self.connected_at_ms,
            at_ms: crate::message::now_ms(),
            conn: self.conn,
        }
    }
}

/// Appends `event` under `journal.full_policy`; a wait for space ends when `give_up`
/// does (with the reason it gives). The outcome is counted, and a drop logged.
async fn journal(shared: &Shared, event: &Event<'_>, give_up: impl Future<Output = &'static str>) {
    let outcome = match event.entry() {
        Err(e) => Err(("encode_error", e.to_string())),
        Ok(entry) => tokio::select! {
            // Tried first: with room the event is journaled, even during a shutdown
            // (admission is synchronous; only a wait for space is given up).
            biased;
            r = shared.journal.append_with(&entry, shared.full_policy) => match r {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(("journal_full", "journal full (journal.full_policy = \"reject\")".into())),
                Err(e) => Err(("journal_error", e.to_string())),
            },
            why = give_up => Err((why, "gave up waiting for journal space".into())),
        },
    };
    let metrics = &shared.metrics;
    match outcome {
        Ok(()) => metrics.presence_events.inc(event.event.label()),
        Err((reason, detail)) => {
            metrics.presence_dropped.inc(reason);
            warn!(client_id = %event.client_id, peer = %event.peer, conn = event.conn,
                event = event.event.label(), reason, detail, "presence event not journaled");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn connected() -> Event<'static> {
        Event {
            event: Presence::Connected,
            client_id: "VIN0001",
            gateway_id: "gw-eu-1",
            protocol: protocol(Version::V5),
            listener: "tls",
            tls_identity: Some("VIN0001".into()),
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
    fn the_record_is_a_presence_record_of_its_client() {
        let entry = connected().entry().unwrap();
        assert_eq!(entry.kind, EntryKind::Presence);
        assert_eq!(entry.client_id, "VIN0001");
        assert_eq!(entry.topic, TOPIC);
        assert_eq!(entry.received_at_ms, 1_700_000_000_000);
        assert_eq!(entry.content_type.as_deref(), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap();
        assert_eq!(v["event"], "connected");
    }
}
