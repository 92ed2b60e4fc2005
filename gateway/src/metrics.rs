//! Counters and gauges behind `/metrics` (Prometheus text format).
//!
//! Names follow `gateway_<thing>_<unit>[_total]`; labels come from small fixed sets
//! (a reason, a listener kind). A vehicle id is never a label.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// A counter family keyed by one label whose values are compile-time strings.
#[derive(Default, Debug)]
pub struct Labeled(Mutex<BTreeMap<&'static str, u64>>);

impl Labeled {
    pub fn inc(&self, label: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(label)
            .or_default() += 1;
    }
    pub fn get(&self, label: &str) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(label)
            .copied()
            .unwrap_or(0)
    }
    pub(crate) fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}

#[derive(Default, Debug)]
pub struct Metrics {
    pub connections_active: AtomicI64,
    pub connections_accepted: Labeled,
    /// Connections turned away: `max_connections`, TLS handshake failure, ...
    pub connections_rejected: Labeled,
    /// Why sessions ended (`client_disconnect`, `keepalive_timeout`, `taken_over`, ...).
    pub connections_closed: Labeled,
    pub connack_refused: Labeled,
    pub protocol_errors: Labeled,
    pub messages_received_qos0: AtomicU64,
    pub messages_received_qos1: AtomicU64,
    pub message_bytes_received: AtomicU64,
    pub pubacks_sent: AtomicU64,
    /// Publishes refused by the publish ACL.
    pub acl_denied: Labeled,
    /// Publishes with no route under `kafka.unmatched = "refuse"`.
    pub unrouted: Labeled,
    /// Publishes refused because the journal was full (`journal.full_policy = "reject"`).
    pub journal_rejected: Labeled,
    /// Argon2 password checks by result (`accepted`, `wrong_password`, `unknown_user`);
    /// every one ran exactly one hash (a dummy one for an unknown user).
    pub auth_password_checks: Labeled,
    /// Topic filters held by all sessions (each bounded by `mqtt.max_subscriptions`).
    pub subscriptions_active: AtomicI64,
    /// SUBSCRIBE filters refused (`quota_exceeded`, `not_authorized`, `filter_invalid`).
    pub subscribe_refused: Labeled,
    /// Sessions whose keep alive (0 or above `mqtt.max_keep_alive_secs`) was capped.
    pub keep_alive_capped: AtomicU64,
    /// PUBLISH packets a session had to wait for under `mqtt.max_publish_rate`.
    pub publish_throttled: AtomicU64,
    pub messages_received_qos2: AtomicU64,
    /// PUBLISHes written to subscribers on this gateway, by delivery QoS (atomics, not a
    /// labelled map: this is counted once per subscriber per message).
    pub messages_delivered: [AtomicU64; 3],
    /// Messages not delivered to a subscriber, by reason (`qos0_queue_full`,
    /// `queue_full_drop_oldest`, `queue_full_refuse_new`, `expired`, `too_large_for_client`).
    pub messages_dropped: Labeled,
    /// Sessions held (online and offline) and the persistent ones among them.
    pub sessions: AtomicI64,
    pub sessions_persistent: AtomicI64,
    /// Persistent sessions that expired and were removed.
    pub sessions_expired: AtomicU64,
    /// QoS 1/2 messages waiting in session queues (in flight included).
    pub queued_messages: AtomicI64,
    /// Retained messages held and their bytes (bounded by `[retained]`).
    pub retained_messages: AtomicI64,
    pub retained_bytes: AtomicI64,
    /// Retained publishes not stored (`full`, `not_allowed`, `disabled`).
    pub retained_refused: Labeled,
    /// Will messages published (immediately or after their delay).
    pub wills_published: AtomicU64,
    /// Presence events journaled, by event (`connected`, `disconnected`).
    pub presence_events: Labeled,
    /// Presence events not journaled, by reason (`journal_full`, `journal_error`,
    /// `shutdown`, `taken_over`, `timeout`, `encode_error`).
    pub presence_dropped: Labeled,
    /// Duplicate QoS 2 PUBLISHes (same packet id before PUBREL) not journaled again.
    pub qos2_duplicates: AtomicU64,
    /// Writes to the sled store that failed (the affected message or session is logged).
    pub store_errors: AtomicU64,
}

impl Metrics {
    /// Prometheus text exposition, with the journal's current state.
    pub fn render(&self, journal: &bridge::JournalStats, bridge: &bridge::producer::BridgeStatus) -> String {
        let mut s = String::new();
        let gauge = |s: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let labeled = |s: &mut String, name: &str, help: &str, label: &str, l: &Labeled| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, v) in l.snapshot() {
                let _ = writeln!(s, "{name}{{{label}=\"{k}\"}} {v}");
            }
        };
        gauge(
            &mut s,
            "gateway_connections_active",
            "Open MQTT connections.",
            self.connections_active.load(Ordering::Relaxed),
        );
        labeled(
            &mut s,
            "gateway_connections_accepted_total",
            "Accepted TCP connections.",
            "listener",
            &self.connections_accepted,
        );
        labeled(
            &mut s,
            "gateway_connections_rejected_total",
            "Connections turned away before MQTT.",
            "reason",
            &self.connections_rejected,
        );
        labeled(
            &mut s,
            "gateway_connections_closed_total",
            "Ended MQTT sessions by reason.",
            "reason",
            &self.connections_closed,
        );
        labeled(
            &mut s,
            "gateway_connack_refused_total",
            "CONNECTs refused by reason.",
            "reason",
            &self.connack_refused,
        );
        labeled(
            &mut s,
            "gateway_protocol_errors_total",
            "Connections ended for a protocol violation.",
            "reason",
            &self.protocol_errors,
        );
        labeled(
            &mut s,
            "gateway_acl_denied_total",
            "PUBLISHes refused by the publish ACL.",
            "qos",
            &self.acl_denied,
        );
        labeled(
            &mut s,
            "gateway_auth_password_checks_total",
            "Password checks (one argon2 hash each, dummy for unknown users) by result.",
            "result",
            &self.auth_password_checks,
        );
        gauge(
            &mut s,
            "gateway_subscriptions_active",
            "Topic filters held by all sessions.",
            self.subscriptions_active.load(Ordering::Relaxed),
        );
        labeled(
            &mut s,
            "gateway_subscribe_refused_total",
            "SUBSCRIBE filters refused by reason.",
            "reason",
            &self.subscribe_refused,
        );
        counter(
            &mut s,
            "gateway_keep_alive_capped_total",
            "Sessions whose keep alive was capped to mqtt.max_keep_alive_secs.",
            self.keep_alive_capped.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "gateway_publish_throttled_total",
            "PUBLISH packets delayed by mqtt.max_publish_rate (the session stopped reading meanwhile).",
            self.publish_throttled.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP gateway_messages_received_total PUBLISHes accepted from vehicles.\n# TYPE gateway_messages_received_total counter\n\
             gateway_messages_received_total{{qos=\"0\"}} {}\ngateway_messages_received_total{{qos=\"1\"}} {}\n\
             gateway_messages_received_total{{qos=\"2\"}} {}",
            self.messages_received_qos0.load(Ordering::Relaxed),
            self.messages_received_qos1.load(Ordering::Relaxed),
            self.messages_received_qos2.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP gateway_messages_delivered_total PUBLISHes written to subscribers on this gateway, by delivery QoS.\n\
             # TYPE gateway_messages_delivered_total counter"
        );
        for (q, c) in self.messages_delivered.iter().enumerate() {
            let _ = writeln!(
                s,
                "gateway_messages_delivered_total{{qos=\"{q}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        labeled(
            &mut s,
            "gateway_messages_dropped_total",
            "Messages not delivered to a subscriber, by reason.",
            "reason",
            &self.messages_dropped,
        );
        let get = |a: &AtomicI64| a.load(Ordering::Relaxed);
        gauge(
            &mut s,
            "gateway_sessions",
            "Sessions held, online and offline.",
            get(&self.sessions),
        );
        gauge(
            &mut s,
            "gateway_sessions_persistent",
            "Persistent sessions held (kept in the store across restarts).",
            get(&self.sessions_persistent),
        );
        counter(
            &mut s,
            "gateway_sessions_expired_total",
            "Persistent sessions removed after their expiry interval.",
            self.sessions_expired.load(Ordering::Relaxed),
        );
        gauge(
            &mut s,
            "gateway_queued_messages",
            "QoS 1/2 messages held in session queues (in flight included).",
            get(&self.queued_messages),
        );
        gauge(
            &mut s,
            "gateway_retained_messages",
            "Retained messages held.",
            get(&self.retained_messages),
        );
        gauge(
            &mut s,
            "gateway_retained_bytes",
            "Bytes (topic + payload) of retained messages held.",
            get(&self.retained_bytes),
        );
        labeled(
            &mut s,
            "gateway_retained_refused_total",
            "Retained publishes not stored, by reason.",
            "reason",
            &self.retained_refused,
        );
        counter(
            &mut s,
            "gateway_wills_published_total",
            "Will messages published.",
            self.wills_published.load(Ordering::Relaxed),
        );
        labeled(
            &mut s,
            "gateway_presence_events_total",
            "Presence events journaled, by event.",
            "event",
            &self.presence_events,
        );
        labeled(
            &mut s,
            "gateway_presence_dropped_total",
            "Presence events not journaled (journal full, failing, or a wait given up), by reason.",
            "reason",
            &self.presence_dropped,
        );
        counter(
            &mut s,
            "gateway_qos2_duplicates_total",
            "Re-sent QoS 2 PUBLISHes (same packet id before PUBREL) answered without journaling again.",
            self.qos2_duplicates.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "gateway_store_errors_total",
            "Failed writes to the session store.",
            self.store_errors.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "gateway_message_bytes_received_total",
            "Payload bytes accepted.",
            self.message_bytes_received.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "gateway_pubacks_sent_total",
            "PUBACKs sent after the journal synced.",
            self.pubacks_sent.load(Ordering::Relaxed),
        );
        gauge(
            &mut s,
            "gateway_journal_records",
            "Journaled records not yet released.",
            journal.records as i64,
        );
        gauge(
            &mut s,
            "gateway_journal_bytes",
            "Bytes of journal segment files on disk.",
            journal.disk_bytes as i64,
        );
        gauge(
            &mut s,
            "gateway_journal_segments",
            "Journal segment files.",
            journal.segments as i64,
        );
        gauge(
            &mut s,
            "gateway_journal_full",
            "1 while appends wait for space (back-pressure).",
            i64::from(journal.full),
        );
        gauge(
            &mut s,
            "gateway_journal_stalled",
            "1 while the journal writer retries a transient I/O error (disk full, EMFILE, EIO): nothing new becomes durable, PUBACKs are withheld.",
            i64::from(journal.stalled.is_some()),
        );
        gauge(
            &mut s,
            "gateway_journal_oldest_age_seconds",
            "Age of the oldest unreleased record.",
            journal.oldest_age.map(|d| d.as_secs() as i64).unwrap_or(0),
        );
        counter(
            &mut s,
            "gateway_journal_syncs_total",
            "Group commits (fdatasync calls).",
            journal.syncs,
        );
        counter(
            &mut s,
            "gateway_journal_durable_seq",
            "Highest durable journal sequence.",
            journal.durable_seq,
        );
        counter(
            &mut s,
            "gateway_journal_released_seq",
            "Highest journal sequence confirmed by Kafka.",
            journal.released_seq,
        );
        counter(
            &mut s,
            "gateway_journal_dropped_records_total",
            "Records dropped undelivered (drop_oldest policy).",
            journal.dropped,
        );
        labeled(
            &mut s,
            "gateway_journal_rejected_total",
            "Publishes refused: journal full (reject policy).",
            "qos",
            &self.journal_rejected,
        );
        labeled(
            &mut s,
            "gateway_messages_unrouted_total",
            "Publishes refused: no route (kafka.unmatched = refuse).",
            "qos",
            &self.unrouted,
        );
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut s,
            "gateway_bridge_delivered_total",
            "Records confirmed by Kafka (acks=all).",
            load(&bridge.delivered),
        );
        gauge(
            &mut s,
            "gateway_bridge_in_flight",
            "Records produced, not yet confirmed.",
            load(&bridge.in_flight) as i64,
        );
        counter(
            &mut s,
            "gateway_bridge_dead_lettered_total",
            "Records written to the dead-letter topic.",
            load(&bridge.dead_lettered),
        );
        counter(
            &mut s,
            "gateway_bridge_parked_total",
            "Records Kafka refused for good that were moved to the parked store.",
            load(&bridge.parked),
        );
        gauge(
            &mut s,
            "gateway_bridge_parked_records",
            "Records in the parked store now (re-drive them with POST /api/v1/bridge/parked/redrive).",
            load(&bridge.parked_now) as i64,
        );
        counter(
            &mut s,
            "gateway_bridge_restarts_total",
            "Restarts of the Kafka bridge pipeline by its supervisor.",
            load(&bridge.restarts),
        );
        gauge(
            &mut s,
            "gateway_bridge_failed",
            "1 while the Kafka bridge fails persistently (/healthz is 503).",
            i64::from(bridge.failed().is_some()),
        );
        gauge(
            &mut s,
            "gateway_bridge_paused",
            "1 while an operator paused forwarding to Kafka (POST /api/v1/bridge/pause); ingest goes on into the journal.",
            i64::from(bridge.paused()),
        );
        counter(
            &mut s,
            "gateway_bridge_errors_total",
            "Errors reported by the Kafka client (retried).",
            load(&bridge.errors),
        );
        let state = bridge.state().as_str();
        let _ = writeln!(s, "# HELP gateway_bridge_state Kafka bridge state (1 for the current one).\n# TYPE gateway_bridge_state gauge");
        for st in ["connecting", "connected", "degraded", "down", "failed"] {
            let _ = writeln!(
                s,
                "gateway_bridge_state{{state=\"{st}\"}} {}",
                u8::from(st == state)
            );
        }
        s
    }
}
