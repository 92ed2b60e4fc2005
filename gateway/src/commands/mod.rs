//! Commands to vehicles: from the Kafka command topic (`kafka`), the admin REST API and
//! operators' MQTT publishes, through the router into the vehicle's session, and the
//! outcome of each back to Kafka (`outcome`).
//!
//! Invariants:
//! - A command is an MQTT message on the vehicle's command topic (`commands.mqtt_topic`),
//!   routed like any other: diagnostic subscribers see it too, the vehicle receives it at
//!   min(command QoS, its granted QoS), and its per-vehicle order is the order the
//!   gateway took the commands (Kafka: partition order, and commands are keyed by
//!   client id).
//! - Its outcome follows the vehicle's own session only, through a [`Ticket`] that
//!   travels with the vehicle's copy (in memory and, for a persistent session, in the
//!   store): exactly one final outcome per command, plus `queued` when it waits in an
//!   offline session.
//! - A command for a vehicle whose session this gateway does not hold is reported
//!   `unknown_vehicle` by this gateway only with `commands.report_unknown` (see the
//!   README, "Many gateways in a region"); otherwise it is settled without a record.

pub mod kafka;
pub mod outcome;
pub mod region;
pub mod ticket;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::message::{now_ms, Message, MessageProperties};
use crate::router::{CommandRoute, Routed, SessionKey};
use crate::state::Shared;
use bridge::metrics::{Defs, Labeled};
pub use outcome::Outcome;
use outcome::{Report, Sink};
pub use ticket::{CommandRecord, Progress, Source, Ticket};

/// A command as a source hands it over, before the gateway decides anything.
#[derive(Debug, Clone, Default)]
pub struct CommandRequest {
    pub client_id: String,
    pub payload: Bytes,
    /// `None`: `commands.default_qos`.
    pub qos: Option<u8>,
    /// `None`: `commands.default_expiry_secs`. 0 (here or there): no expiry.
    pub expiry_secs: Option<u32>,
    pub correlation_id: Option<String>,
    pub response_topic: Option<String>,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
    /// When it was issued (ms since epoch); expiry counts from here. `None`: now.
    pub issued_at_ms: Option<u64>,
}

/// What issuing a command did at once.
#[derive(Debug)]
pub struct Issued {
    pub ticket: Arc<Ticket>,
    /// Where the vehicle's copy went, when it was routed (`None`: refused or unknown
    /// before routing; the ticket has reported that outcome).
    pub route: Option<CommandRoute>,
}

/// The command path's metrics.
pub struct CommandMetrics {
    /// Commands taken, by source (`kafka`, `rest`, `mqtt`).
    pub received: Labeled,
    /// Outcome records journaled, by outcome.
    pub outcomes: Labeled,
    /// Outcome records that could not be journaled (`encode`, `journal`).
    pub outcomes_failed: Labeled,
    /// From a command being taken to its final outcome, by outcome.
    pub latency: prometheus::HistogramVec,
    partitions_assigned: prometheus::IntGauge,
    done_markers: prometheus::IntGauge,
    pending: prometheus::IntGauge,
    consumer_paused: prometheus::IntGauge,
    outcome_backlog: prometheus::IntGauge,
    /// REST and MQTT commands refused at `commands.max_pending` outcome reports waiting.
    pub refused_backlog: prometheus::IntCounter,
    defs: Defs,
}

impl Default for CommandMetrics {
    fn default() -> Self {
        let d = Defs::default();
        CommandMetrics {
            received: Labeled::new(&d, "gateway_commands_received_total", "Commands taken, by source.", "source"),
            outcomes: Labeled::new(
                &d,
                "gateway_command_outcomes_total",
                "Command outcome records journaled, by outcome.",
                "outcome",
            ),
            outcomes_failed: Labeled::new(
                &d,
                "gateway_command_outcomes_failed_total",
                "Command outcome records that could not be journaled (the command stays unsettled).",
                "reason",
            ),
            latency: d.histogram_vec(
                "gateway_command_latency_seconds",
                "From a command being taken by this gateway process (Kafka, REST, MQTT; a restored one: from the restart) to its final outcome, by outcome (delivered: the vehicle's acknowledgement).",
                "outcome",
                bridge::metrics::AGE_BUCKETS,
            ),
            partitions_assigned: d.gauge(
                "gateway_commands_partitions_assigned",
                "Command topic partitions this gateway's consumer holds (0: not reading yet).",
            ),
            done_markers: d.gauge(
                "gateway_commands_done_markers",
                "Kafka commands with a final outcome whose offset is not committed yet (kept so a crash does not deliver them again).",
            ),
            pending: d.gauge(
                "gateway_commands_pending",
                "Kafka commands taken and not settled (vehicles yet to acknowledge).",
            ),
            consumer_paused: d.gauge(
                "gateway_commands_consumer_paused",
                "1 while the command consumer waits at commands.max_pending.",
            ),
            outcome_backlog: d.gauge(
                "gateway_command_outcomes_backlog",
                "Command outcome reports waiting to be journaled (grows while the journal is full or stalled).",
            ),
            refused_backlog: d.counter(
                "gateway_commands_refused_backlog_total",
                "REST and MQTT commands refused because commands.max_pending outcome reports waited to be journaled.",
            ),
            defs: d,
        }
    }
}

impl std::fmt::Debug for CommandMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandMetrics").finish_non_exhaustive()
    }
}

/// The command service every source goes through.
#[derive(Debug)]
pub struct Commands {
    sink: Arc<Sink>,
    /// The outcome task takes it at start.
    reports: Mutex<Option<mpsc::UnboundedReceiver<Report>>>,
    pub metrics: CommandMetrics,
    /// Who holds the vehicles this gateway does not (see [`region`]).
    pub region: region::Region,
    /// The Kafka command consumer's state.
    pub consumer: Arc<bridge::commands::ConsumerStatus>,
    /// Cancelled once sessions ended at shutdown (see [`Commands::stop`]).
    pub stopping: tokio_util::sync::CancellationToken,
    /// REST and MQTT command ids: `<source>-<start ms>-<n>`, unique per gateway run.
    next: AtomicU64,
    started_ms: u64,
}

impl Default for Commands {
    fn default() -> Self {
        let (sink, rx) = Sink::new();
        Commands {
            sink,
            reports: Mutex::new(Some(rx)),
            metrics: CommandMetrics::default(),
            region: region::Region::default(),
            consumer: Arc::default(),
            stopping: tokio_util::sync::CancellationToken::new(),
            next: AtomicU64::new(1),
            started_ms: now_ms(),
        }
    }
}

impl Commands {
    /// The command path's metrics, with the consumer's state and the number of done
    /// markers (`done_offsets`, from the store) read now.
    pub fn gather(&self, done_offsets: usize) -> Vec<prometheus::proto::MetricFamily> {
        let m = &self.metrics;
        let c = &self.consumer;
        m.pending.set(c.pending.load(Ordering::Relaxed) as i64);
        m.consumer_paused.set(i64::from(c.paused.load(Ordering::Relaxed)));
        m.outcome_backlog.set(self.sink.backlog() as i64);
        m.partitions_assigned
            .set(c.assigned.load(Ordering::Relaxed) as i64);
        m.done_markers.set(done_offsets as i64);
        m.defs.gather()
    }

    /// The outcome reports, once (for the outcome task).
    pub fn take_reports(&self) -> Option<mpsc::UnboundedReceiver<Report>> {
        self.reports.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// This gateway is one of a region's: a Kafka command may reach it twice (its
    /// record and a copy handed over by the vehicle's previous gateway); the second
    /// settles without a word.
    pub fn expect_copies(&self) {
        self.sink.remember_recent();
    }

    /// Shutdown began: Kafka commands dropped from now on stay unsettled (Kafka
    /// re-delivers them after the restart).
    pub fn close(&self) {
        self.sink.close();
    }

    /// Sessions have ended: the outcome task journals what is left and stops.
    pub fn stop(&self) {
        self.stopping.cancel();
    }

    /// A ticket for a command restored from the store at start.
    pub fn restore(&self, record: CommandRecord) -> Arc<Ticket> {
        Ticket::new(record, None, self.sink.clone())
    }

    /// A fresh command id for a source without its own (REST, MQTT).
    pub fn new_id(&self, source: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{source}-{}-{n}", self.started_ms)
    }

    /// Issues a command: routes it to the vehicle's session (and any other subscriber of
    /// its topic) and reports what it can at once. `waiter` is told every outcome once
    /// its record is durable.
    pub fn issue(
        &self,
        shared: &Arc<Shared>,
        id: String,
        source: Source,
        req: CommandRequest,
        waiter: Option<watch::Sender<Option<Progress>>>,
    ) -> Issued {
        let cfg = &shared.cfg.commands;
        let now = now_ms();
        let issued_at_ms = req.issued_at_ms.unwrap_or(now);
        let qos = req.qos.unwrap_or(cfg.default_qos);
        self.metrics.received.inc(source.label());
        let record = CommandRecord {
            id,
            client_id: req.client_id.clone(),
            correlation_id: req.correlation_id.clone(),
            source,
            issued_at_ms,
            qos: qos.min(2),
        };
        let ticket = Ticket::new(record, waiter, self.sink.clone());
        // Before anything that could end it: a second copy ends without a word, even
        // one that would now be refused or expired.
        if self.taken_already(shared, &ticket) {
            return Issued { ticket, route: None };
        }
        if qos > 2 {
            ticket.finish(Outcome::Rejected, Some("invalid_qos"));
            return Issued { ticket, route: None };
        }
        if !valid_client_id(&req.client_id, shared.cfg.mqtt.max_client_id_len) {
            ticket.finish(Outcome::Rejected, Some("invalid_client_id"));
            return Issued { ticket, route: None };
        }
        let expiry_secs = req.expiry_secs.unwrap_or(cfg.default_expiry_secs);
        let expires_at_ms =
            (expiry_secs > 0).then(|| issued_at_ms.saturating_add(u64::from(expiry_secs) * 1000));
        if expires_at_ms.is_some_and(|t| t <= now) {
            ticket.finish(Outcome::Expired, Some("expired_before_delivery"));
            return Issued { ticket, route: None };
        }
        let msg = Arc::new(Message {
            topic: cfg.mqtt_topic.replace("{client_id}", &req.client_id),
            payload: req.payload,
            qos,
            retain: false,
            props: MessageProperties {
                payload_format_indicator: None,
                content_type: req.content_type,
                response_topic: req.response_topic,
                correlation_data: req.correlation_id.map(Bytes::from),
                user_properties: req.user_properties,
            },
            received_at_ms: now,
            expires_at_ms,
        });
        let (_, route) = self.place(shared, &ticket, &msg, None);
        Issued { ticket, route }
    }

    /// An operator's PUBLISH to a vehicle's command topic (`vehicle`): routed like any
    /// message, with the vehicle's copy accounted for as a command. Returns what the
    /// routing did, for the publisher's acknowledgement.
    pub fn issue_published(
        &self,
        shared: &Arc<Shared>,
        msg: &Arc<Message>,
        vehicle: &str,
        publisher: &SessionKey,
    ) -> Routed {
        let correlation_id = msg
            .props
            .correlation_data
            .as_ref()
            .map(|c| String::from_utf8_lossy(c).into_owned());
        let record = CommandRecord {
            id: self.new_id("mqtt"),
            client_id: vehicle.to_string(),
            correlation_id,
            source: Source::Mqtt {
                publisher: publisher.id.to_string(),
            },
            issued_at_ms: msg.received_at_ms,
            qos: msg.qos,
        };
        self.metrics.received.inc("mqtt");
        let ticket = Ticket::new(record, None, self.sink.clone());
        self.place(shared, &ticket, msg, Some(publisher)).0
    }

    /// Routes `msg` with the vehicle's copy carrying `ticket`, and reports what routing
    /// decided at once. A vehicle this gateway does not hold is left to the region rule.
    fn place(
        &self,
        shared: &Arc<Shared>,
        ticket: &Arc<Ticket>,
        msg: &Arc<Message>,
        publisher: Option<&SessionKey>,
    ) -> (Routed, Option<CommandRoute>) {
        let client_id = &ticket.info.record.client_id;
        if shared.registry.get(client_id).is_none() {
            // Still routed: diagnostic subscribers of the topic get it.
            let routed = shared.router.route(
                msg,
                publisher,
                &shared.registry,
                &shared.cfg.sessions,
                &shared.store,
                &shared.metrics,
            );
            self.not_held(shared, ticket);
            return (routed, None);
        }
        let (routed, route) = shared.router.route_command(msg, publisher, ticket, shared);
        match route {
            CommandRoute::Online => {}
            CommandRoute::Offline { gen } => ticket.queued(gen),
            CommandRoute::NotSubscribed => ticket.finish(Outcome::Rejected, Some("not_subscribed")),
            CommandRoute::Dropped("session_gone") => self.not_held(shared, ticket),
            CommandRoute::Dropped(reason) => ticket.finish(Outcome::Dropped, Some(reason)),
        }
        (routed, Some(route))
    }

    /// Whether this Kafka command was taken here already, under the same id: the
    /// record read again (a restart, the consumer rejoining its group), or in a region
    /// the other copy of a command handed over by the vehicle's previous gateway. Then
    /// it is settled without a word (after the copy that counts) and true is returned.
    fn taken_already(&self, shared: &Shared, ticket: &Ticket) -> bool {
        if !matches!(ticket.info.record.source, Source::Kafka { .. }) {
            return false;
        }
        // The session still holds it: the held copy reports the outcome. In the store
        // (a persistent session, or reported `queued`) the command is durably queued, so
        // this one settles once the store is flushed. Held in memory only: the same
        // record read again is settled by the held copy when it ends; another record
        // (a copy at another offset) settles at once, its offset is nobody else's.
        if let Some(cell) = shared.registry.get(&ticket.info.record.client_id) {
            if let Some((held, persistent)) = cell.held_command(ticket.id()) {
                if persistent || held.is_queued() {
                    ticket.settle_after_flush(shared.store.generation());
                } else if held.info.record.source != ticket.info.record.source {
                    ticket.settle_silently();
                } else {
                    ticket.forget();
                }
                return true;
            }
        }
        // Not held, but its final outcome is reported already (the vehicle acknowledged
        // it a moment ago; its "done" marker may not be written yet), or in a region the
        // other copy ended here lately: not again.
        if ticket.settle_if_finished(|(t, p, o)| shared.store.command_done(t, *p, *o)) {
            self.metrics.received.inc("kafka_already_done");
            return true;
        }
        false
    }

    /// This gateway holds no session for the command's vehicle. A Kafka command (every
    /// gateway reads it) is left silently to the others unless this gateway is the
    /// region's reporter and, as far as the presence topic says, no other gateway holds
    /// the vehicle. A REST or MQTT command reached only this gateway: it is always
    /// reported (reason `held_by_other_gateway` when another gateway holds the vehicle).
    fn not_held(&self, shared: &Shared, ticket: &Ticket) {
        let cfg = &shared.cfg.commands;
        let client_id = &ticket.info.record.client_id;
        let from_kafka = matches!(ticket.info.record.source, Source::Kafka { .. });
        let elsewhere = self.region.held_by(client_id).is_some();
        if from_kafka && (!cfg.report_unknown || elsewhere) {
            ticket.settle_silently();
            return;
        }
        let reason = elsewhere.then_some("held_by_other_gateway");
        ticket.finish(Outcome::UnknownVehicle, reason);
    }

    /// Whether `max_pending` outcome reports wait to be journaled (the journal full or
    /// stalled): then a new REST or MQTT command is refused (counted), since each one
    /// ends in a report that would wait in memory too. Kafka commands are bounded by the
    /// consumer's own `commands.max_pending` pause.
    pub fn backlogged(&self, max_pending: usize) -> bool {
        let full = self.sink.backlog() >= max_pending;
        if full {
            self.metrics.refused_backlog.inc();
        }
        full
    }

    /// The vehicle that `publisher`'s publish to `topic` commands, if it is a command: a
    /// command topic of another client (a vehicle publishing to its own command topic is
    /// not commanding itself), and not an empty retained publish (that clears a retained
    /// message). One rule for live publishes, Wills (at CONNECT and when published) and
    /// anything else an MQTT client sends, so a command has an outcome whichever way it
    /// came.
    pub fn commanded<'t>(
        template: &str,
        topic: &'t str,
        publisher: &str,
        retain: bool,
        payload: &[u8],
    ) -> Option<&'t str> {
        Self::vehicle_of(template, topic)
            .filter(|v| *v != publisher)
            .filter(|_| !(retain && payload.is_empty()))
    }

    /// The vehicle `commands.mqtt_topic` names in `topic`, if `topic` is a command
    /// topic (the template's `{client_id}` matched exactly one topic level).
    pub fn vehicle_of<'t>(template: &str, topic: &'t str) -> Option<&'t str> {
        let (prefix, suffix) = template.split_once("{client_id}")?;
        let id = topic.strip_prefix(prefix)?.strip_suffix(suffix)?;
        (!id.is_empty() && !id.contains('/')).then_some(id)
    }
}

/// A client id a command can be addressed to: one topic level of the command topic.
pub(crate) fn valid_client_id(id: &str, max_len: usize) -> bool {
    !id.is_empty() && id.len() <= max_len && !id.contains(['/', '+', '#', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_topics_name_one_vehicle_level() {
        let t = "vehicles/{client_id}/commands";
        assert_eq!(Commands::vehicle_of(t, "vehicles/VIN1/commands"), Some("VIN1"));
        assert_eq!(Commands::vehicle_of(t, "vehicles/a/b/commands"), None);
        assert_eq!(Commands::vehicle_of(t, "vehicles//commands"), None);
        assert_eq!(Commands::vehicle_of(t, "vehicles/VIN1/commands/x"), None);
        assert_eq!(Commands::vehicle_of(t, "fleet/VIN1/commands"), None);
        assert_eq!(Commands::vehicle_of("cmd/{client_id}", "cmd/VIN2"), Some("VIN2"));
    }

    #[test]
    fn a_command_is_a_publish_to_another_clients_command_topic_that_is_not_a_clearing() {
        let t = "vehicles/{client_id}/commands";
        let topic = "vehicles/VIN1/commands";
        assert_eq!(
            Commands::commanded(t, topic, "op-1", false, b"unlock"),
            Some("VIN1")
        );
        assert_eq!(
            Commands::commanded(t, topic, "op-1", true, b"unlock"),
            Some("VIN1")
        );
        assert_eq!(Commands::commanded(t, topic, "op-1", false, b""), Some("VIN1"));
        // Clearing a retained message is not a command.
        assert_eq!(Commands::commanded(t, topic, "op-1", true, b""), None);
        // A vehicle does not command itself.
        assert_eq!(Commands::commanded(t, topic, "VIN1", false, b"x"), None);
        assert_eq!(
            Commands::commanded(t, "vehicles/VIN1/telemetry", "op-1", false, b"x"),
            None
        );
    }
}
