//! The gateway's own metrics (connections, sessions, ingest, delivery to subscribers),
//! on the `prometheus` crate; the bridge, the journal and the command path define
//! theirs next to their code, and `/metrics` gathers them all ([`gather_all`]).
//!
//! Names follow `gateway_<thing>_<unit>[_total]`; labels come from small fixed sets
//! (a reason, a listener kind, a QoS). A vehicle id is never a label.

pub use bridge::metrics::Labeled;
use bridge::metrics::{Defs, LATENCY_BUCKETS};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, IntCounter, IntGauge};

use crate::state::Shared;

pub struct Metrics {
    pub connections_active: IntGauge,
    pub connections_accepted: Labeled,
    /// Connections turned away: `max_connections`, TLS handshake failure, ...
    pub connections_rejected: Labeled,
    /// Why sessions ended (`client_disconnect`, `keepalive_timeout`, `taken_over`, ...).
    pub connections_closed: Labeled,
    pub connack_refused: Labeled,
    pub protocol_errors: Labeled,
    /// PUBLISHes accepted from vehicles, by QoS 0, 1, 2.
    pub messages_received: [IntCounter; 3],
    pub message_bytes_received: IntCounter,
    pub pubacks_sent: IntCounter,
    /// From a QoS 1 PUBLISH taken from the connection to its PUBACK written (throttling,
    /// waits for journal space and the journal sync included), and the same for QoS 2's
    /// PUBREC.
    pub puback_latency: Histogram,
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
    pub subscriptions_active: IntGauge,
    /// SUBSCRIBE filters refused (`quota_exceeded`, `not_authorized`, `filter_invalid`).
    pub subscribe_refused: Labeled,
    /// Sessions whose keep alive (0 or above `mqtt.max_keep_alive_secs`) was capped.
    pub keep_alive_capped: IntCounter,
    /// PUBLISH packets a session had to wait for under `mqtt.max_publish_rate`.
    pub publish_throttled: IntCounter,
    /// Connection set-ups and goodbyes waiting for a turn at the set-up gate
    /// (`mqtt.max_concurrent_setups`): high during a reconnect storm, 0 otherwise.
    pub setups_waiting: IntGauge,
    /// PUBLISHes written to subscribers on this gateway, by delivery QoS (one handle
    /// each, not a label lookup: this is counted once per subscriber per message).
    pub messages_delivered: [IntCounter; 3],
    /// Messages not delivered to a subscriber, by reason (`qos0_queue_full`,
    /// `queue_full_drop_oldest`, `queue_full_refuse_new`, `gateway_queue_full`,
    /// `gateway_queue_full_drop_oldest`, `expired`,
    /// `too_large_for_client`).
    pub messages_dropped: Labeled,
    /// Sessions held (online and offline) and the persistent ones among them.
    pub sessions: IntGauge,
    pub sessions_persistent: IntGauge,
    /// Persistent sessions that expired and were removed.
    pub sessions_expired: IntCounter,
    /// QoS 1/2 messages waiting in session queues (in flight included).
    pub queued_messages: IntGauge,
    /// Their bytes (topic + payload), each session's copy counted.
    pub queued_bytes: IntGauge,
    /// Retained messages held and their bytes (bounded by `[retained]`).
    pub retained_messages: IntGauge,
    pub retained_bytes: IntGauge,
    /// Retained publishes not stored (`full`, `not_allowed`, `disabled`, `command_topic`).
    pub retained_refused: Labeled,
    /// Will messages published (immediately or after their delay).
    pub wills_published: IntCounter,
    /// Presence events journaled, by event (`connected`, `disconnected`,
    /// `gateway_started`).
    pub presence_events: Labeled,
    /// Presence events not journaled, by reason (`journal_full`, `journal_error`,
    /// `shutdown`, `taken_over`, `timeout`, `encode_error`).
    pub presence_dropped: Labeled,
    /// Duplicate QoS 2 PUBLISHes (same packet id before PUBREL) not journaled again.
    pub qos2_duplicates: IntCounter,
    /// Writes to the sled store that failed (the affected message or session is logged).
    pub store_errors: IntCounter,
    /// Admin connections turned away at `admin.max_connections`.
    pub admin_connections_rejected: IntCounter,
    /// Commands a vehicle acknowledged after they were reported `expired` (in flight,
    /// unacknowledged past their expiry: the vehicle may still have acted on them).
    pub commands_acknowledged_after_expiry: IntCounter,
    /// Reloads of the TLS server certificate (SIGHUP or a file change), by `result`
    /// (`ok`, `error`: the previous certificate stays).
    pub tls_cert_reloads: Labeled,
    /// notAfter of the server certificate new handshakes get (seconds since the epoch;
    /// 0 without a TLS listener): alert well before it.
    pub tls_cert_expiry: IntGauge,
    defs: Defs,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("connections_active", &self.connections_active.get())
            .field("sessions", &self.sessions.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let d = Defs::default();
        let labeled = |name: &str, help: &str, label: &str| Labeled::new(&d, name, help, label);
        let received = d.counter_vec(
            "gateway_messages_received_total",
            "PUBLISHes accepted from vehicles.",
            "qos",
        );
        let delivered = d.counter_vec(
            "gateway_messages_delivered_total",
            "PUBLISHes written to subscribers on this gateway, by delivery QoS.",
            "qos",
        );
        let by_qos = |v: &prometheus::IntCounterVec| ["0", "1", "2"].map(|q| v.with_label_values(&[q]));
        let build = d.gauge_vec(
            "gateway_build_info",
            "The running build (always 1): version and git commit.",
            &["version", "commit"],
        );
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::BUILD_COMMIT])
            .set(1);
        Metrics {
            connections_active: d.gauge("gateway_connections_active", "Open MQTT connections."),
            connections_accepted: labeled(
                "gateway_connections_accepted_total",
                "Accepted TCP connections.",
                "listener",
            ),
            connections_rejected: labeled(
                "gateway_connections_rejected_total",
                "Connections turned away before MQTT.",
                "reason",
            ),
            connections_closed: labeled(
                "gateway_connections_closed_total",
                "Ended MQTT sessions by reason.",
                "reason",
            ),
            connack_refused: labeled("gateway_connack_refused_total", "CONNECTs refused by reason.", "reason"),
            protocol_errors: labeled(
                "gateway_protocol_errors_total",
                "Connections ended for a protocol violation.",
                "reason",
            ),
            messages_received: by_qos(&received),
            message_bytes_received: d.counter("gateway_message_bytes_received_total", "Payload bytes accepted."),
            pubacks_sent: d.counter(
                "gateway_pubacks_sent_total",
                "PUBACKs sent after the journal synced.",
            ),
            puback_latency: d.histogram(
                "gateway_puback_latency_seconds",
                "From a QoS 1/2 PUBLISH taken from the connection to its PUBACK/PUBREC written: throttling, waits for journal space and the journal sync included.",
                LATENCY_BUCKETS,
            ),
            acl_denied: labeled("gateway_acl_denied_total", "PUBLISHes refused by the publish ACL.", "qos"),
            unrouted: labeled(
                "gateway_messages_unrouted_total",
                "Publishes refused: no route (kafka.unmatched = refuse).",
                "qos",
            ),
            journal_rejected: labeled(
                "gateway_journal_rejected_total",
                "Publishes refused: journal full (reject policy).",
                "qos",
            ),
            auth_password_checks: labeled(
                "gateway_auth_password_checks_total",
                "Password checks (one argon2 hash each, dummy for unknown users) by result.",
                "result",
            ),
            subscriptions_active: d.gauge("gateway_subscriptions_active", "Topic filters held by all sessions."),
            subscribe_refused: labeled(
                "gateway_subscribe_refused_total",
                "SUBSCRIBE filters refused by reason.",
                "reason",
            ),
            keep_alive_capped: d.counter(
                "gateway_keep_alive_capped_total",
                "Sessions whose keep alive was capped to mqtt.max_keep_alive_secs.",
            ),
            publish_throttled: d.counter(
                "gateway_publish_throttled_total",
                "PUBLISH packets delayed by mqtt.max_publish_rate (the session stopped reading meanwhile).",
            ),
            setups_waiting: d.gauge(
                "gateway_setups_waiting",
                "Connection set-ups and goodbyes waiting for a turn at the set-up gate.",
            ),
            messages_delivered: by_qos(&delivered),
            messages_dropped: labeled(
                "gateway_messages_dropped_total",
                "Messages not delivered to a subscriber, by reason.",
                "reason",
            ),
            sessions: d.gauge("gateway_sessions", "Sessions held, online and offline."),
            sessions_persistent: d.gauge(
                "gateway_sessions_persistent",
                "Persistent sessions held (kept in the store across restarts).",
            ),
            sessions_expired: d.counter(
                "gateway_sessions_expired_total",
                "Persistent sessions removed after their expiry interval.",
            ),
            queued_messages: d.gauge(
                "gateway_queued_messages",
                "QoS 1/2 messages held in session queues (in flight included).",
            ),
            queued_bytes: d.gauge(
                "gateway_queued_bytes",
                "Bytes (weight: topic, payload, properties + 64) of the QoS 1/2 messages held in session queues, each session's copy counted (offline sessions bounded by sessions.max_total_queued_bytes).",
            ),
            retained_messages: d.gauge("gateway_retained_messages", "Retained messages held."),
            retained_bytes: d.gauge(
                "gateway_retained_bytes",
                "Bytes (topic + payload) of retained messages held.",
            ),
            retained_refused: labeled(
                "gateway_retained_refused_total",
                "Retained publishes not stored, by reason.",
                "reason",
            ),
            wills_published: d.counter("gateway_wills_published_total", "Will messages published."),
            presence_events: labeled(
                "gateway_presence_events_total",
                "Presence events journaled, by event (connected, disconnected, gateway_started).",
                "event",
            ),
            presence_dropped: labeled(
                "gateway_presence_dropped_total",
                "Presence events not journaled (journal full, failing, or a wait given up), by reason.",
                "reason",
            ),
            qos2_duplicates: d.counter(
                "gateway_qos2_duplicates_total",
                "Re-sent QoS 2 PUBLISHes (same packet id before PUBREL) answered without journaling again.",
            ),
            store_errors: d.counter("gateway_store_errors_total", "Failed writes to the session store."),
            admin_connections_rejected: d.counter(
                "gateway_admin_connections_rejected_total",
                "Admin connections closed at admin.max_connections.",
            ),
            commands_acknowledged_after_expiry: d.counter(
                "gateway_commands_acknowledged_after_expiry_total",
                "Commands a vehicle acknowledged after they were reported expired (sent, unacknowledged past their expiry).",
            ),
            tls_cert_reloads: labeled(
                "gateway_tls_cert_reloads_total",
                "TLS server certificate reloads (SIGHUP or file change) by result.",
                "result",
            ),
            tls_cert_expiry: d.gauge(
                "gateway_tls_cert_expiry_timestamp_seconds",
                "notAfter of the TLS server certificate presented to new handshakes (0: no TLS listener).",
            ),
            defs: d,
        }
    }
}

impl Metrics {
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.defs.gather()
    }
}

/// Every subsystem's metrics, as `/metrics` shows them.
pub fn gather_all(s: &Shared) -> Vec<MetricFamily> {
    let mut all = s.metrics.gather();
    all.extend(s.bridge.gather());
    all.extend(s.journal.gather());
    all.extend(s.commands.gather(s.store.commands_done_offsets()));
    all
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every subsystem's families together: each name once (a name defined in two
    /// registries would be shown twice, which Prometheus refuses), each with help.
    #[test]
    fn every_family_is_named_once_with_help() {
        let dir = tempfile::tempdir().unwrap();
        let mut jcfg = bridge::journal::JournalConfig::new(dir.path(), 1 << 20);
        jcfg.segment_bytes = 1 << 16;
        let journal = bridge::SegmentedJournal::open(jcfg).unwrap();
        let m = Metrics::default();
        m.puback_latency.observe(0.002);
        let bridge = bridge::producer::BridgeStatus::default();
        let commands = crate::commands::Commands::default();
        let mut all = m.gather();
        all.extend(bridge.gather());
        all.extend(journal.gather());
        all.extend(commands.gather(0));
        let mut names: Vec<&str> = all.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len(), "a family defined twice");
        assert!(all.iter().all(|f| !f.help().is_empty()));
        let text = bridge::metrics::encode(all);
        for want in [
            "gateway_build_info{commit=",
            "gateway_puback_latency_seconds_bucket{le=\"0.0025\"} 1",
            "gateway_journal_records 0",
            "gateway_journal_syncs_total",
            "gateway_bridge_state{state=\"connecting\"} 1",
            "gateway_commands_pending 0",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
