//! Which Kafka topic and key an MQTT message goes to.
//!
//! `[[routes]]` are tried in order; the first whose MQTT filter matches wins, so a
//! message is written to Kafka exactly once however many consumer groups read it.
//! Key templates may use `{client_id}` and `{N}`, the N-th level of the MQTT topic
//! (0-based): `vehicles/{1}/telemetry` → `{1}` is the vehicle segment.

use crate::journal::{Entry, EntryKind};
use crate::topic;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub mqtt: String,
    pub kafka_topic: String,
    pub key: String,
}

/// What happens to a message no route matches. Never a silent drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmatched {
    /// Write it to this topic (keyed by client id).
    DefaultTopic(String),
    /// Refuse at publish: MQTT 5 PUBACK 0x90; 3.1.1 acknowledged and counted as dropped.
    Refuse,
}

#[derive(Debug, Clone)]
pub struct Routes {
    pub routes: Vec<Route>,
    pub unmatched: Unmatched,
    /// Where the gateway's own records go (keyed by client id).
    pub events: EventTopics,
}

/// Kafka topics of the gateway's own records. `None`: that kind is not journaled (a
/// record of it found in the journal anyway, from a run with other settings, is
/// refused like an unroutable message: parked or dead-lettered, never dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventTopics {
    /// `[presence] kafka_topic`: connected / disconnected events.
    pub presence: Option<String>,
    /// `[commands] outcome_topic`: what became of each command.
    pub outcomes: Option<String>,
    /// `[commands] kafka_topic`: commands handed over to the gateway holding the vehicle.
    pub commands: Option<String>,
}

/// Destination of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub topic: String,
    pub key: String,
}

impl Routes {
    /// The destination, or `None` when unmatched and the policy is `Refuse`.
    pub fn resolve(&self, client_id: &str, mqtt_topic: &str) -> Option<Destination> {
        for r in &self.routes {
            if topic::matches(&r.mqtt, mqtt_topic) {
                return Some(Destination {
                    topic: r.kafka_topic.clone(),
                    key: render(&r.key, client_id, mqtt_topic),
                });
            }
        }
        match &self.unmatched {
            Unmatched::DefaultTopic(t) => Some(Destination {
                topic: t.clone(),
                key: client_id.to_string(),
            }),
            Unmatched::Refuse => None,
        }
    }

    /// Whether a message on `mqtt_topic` goes to Kafka at all ([`Routes::resolve`] is
    /// `Some`), without building its destination: asked for every PUBLISH.
    pub fn accepts(&self, mqtt_topic: &str) -> bool {
        matches!(self.unmatched, Unmatched::DefaultTopic(_)) || self.routed(mqtt_topic)
    }

    /// Whether a `[[routes]]` entry names `mqtt_topic` (not only `kafka.unmatched`'s
    /// default topic).
    pub fn routed(&self, mqtt_topic: &str) -> bool {
        self.routes.iter().any(|r| topic::matches(&r.mqtt, mqtt_topic))
    }

    /// The destination of a journal record: an MQTT message by its topic, a gateway
    /// event by its kind.
    pub fn destination(&self, e: &Entry) -> Option<Destination> {
        let event = |topic: &Option<String>| {
            topic.as_ref().map(|t| Destination {
                topic: t.clone(),
                key: e.client_id.clone(),
            })
        };
        match e.kind {
            EntryKind::Message => self.resolve(&e.client_id, &e.topic),
            EntryKind::Presence => event(&self.events.presence),
            EntryKind::Outcome => event(&self.events.outcomes),
            EntryKind::Command => event(&self.events.commands),
        }
    }

    /// Every Kafka topic a record can be written to (for the embedded cluster).
    pub fn topics(&self) -> Vec<String> {
        let mut t: Vec<String> = self.routes.iter().map(|r| r.kafka_topic.clone()).collect();
        if let Unmatched::DefaultTopic(d) = &self.unmatched {
            t.push(d.clone());
        }
        t.extend(self.events.presence.iter().cloned());
        t.extend(self.events.outcomes.iter().cloned());
        t.extend(self.events.commands.iter().cloned());
        t.sort();
        t.dedup();
        t
    }
}

/// Checks a key template: only `{client_id}` and `{N}` placeholders.
pub fn validate_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            return Err("unclosed '{'".into());
        };
        let name = &rest[start + 1..start + end];
        if name != "client_id" && name.parse::<usize>().is_err() {
            return Err(format!(
                "unknown placeholder {{{name}}}; use {{client_id}} or a topic level like {{1}}"
            ));
        }
        rest = &rest[start + end + 1..];
    }
    Ok(())
}

fn render(template: &str, client_id: &str, mqtt_topic: &str) -> String {
    let mut out = String::with_capacity(template.len() + client_id.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else { break };
        let name = &rest[start + 1..start + end];
        if name == "client_id" {
            out.push_str(client_id);
        } else if let Ok(n) = name.parse::<usize>() {
            out.push_str(mqtt_topic.split('/').nth(n).unwrap_or(""));
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_match_wins_and_templates_render() {
        let routes = Routes {
            events: Default::default(),
            routes: vec![
                Route {
                    mqtt: "vehicles/+/telemetry".into(),
                    kafka_topic: "telemetry".into(),
                    key: "{client_id}".into(),
                },
                Route {
                    mqtt: "vehicles/+/#".into(),
                    kafka_topic: "events".into(),
                    key: "{1}-{2}".into(),
                },
            ],
            unmatched: Unmatched::DefaultTopic("unrouted".into()),
        };
        assert_eq!(
            routes.resolve("v1", "vehicles/v1/telemetry").map(|d| d.topic),
            Some("telemetry".into())
        );
        let d = routes.resolve("v1", "vehicles/v1/doors/open").expect("routed");
        assert_eq!((d.topic.as_str(), d.key.as_str()), ("events", "v1-doors"));
        assert_eq!(
            routes.resolve("v1", "other").map(|d| d.topic),
            Some("unrouted".into())
        );
        let refuse = Routes {
            events: Default::default(),
            routes: vec![],
            unmatched: Unmatched::Refuse,
        };
        assert_eq!(refuse.resolve("v1", "x"), None);
        for (r, t) in [
            (&routes, "vehicles/v1/telemetry"),
            (&routes, "other"),
            (&refuse, "x"),
        ] {
            assert_eq!(r.accepts(t), r.resolve("v1", t).is_some(), "{t}");
        }
        let only = Routes {
            events: Default::default(),
            routes: routes.routes.clone(),
            unmatched: Unmatched::Refuse,
        };
        assert!(only.accepts("vehicles/v1/telemetry"));
        assert!(!only.accepts("other"));
        assert!(validate_template("{client_id}/{3}").is_ok());
        assert!(validate_template("{vin}").is_err());
    }

    #[test]
    fn gateway_events_go_to_their_topics_by_kind_not_by_mqtt_topic() {
        let routes = Routes {
            events: EventTopics {
                presence: Some("presence".into()),
                outcomes: None,
                commands: None,
            },
            routes: vec![],
            unmatched: Unmatched::DefaultTopic("unrouted".into()),
        };
        let e = |kind| Entry {
            kind,
            client_id: "v1".into(),
            topic: "vehicles/v1/telemetry".into(),
            ..Entry::default()
        };
        let d = routes.destination(&e(EntryKind::Presence)).expect("presence");
        assert_eq!((d.topic.as_str(), d.key.as_str()), ("presence", "v1"));
        assert_eq!(routes.destination(&e(EntryKind::Outcome)), None);
        assert_eq!(
            routes.destination(&e(EntryKind::Message)).map(|d| d.topic),
            Some("unrouted".into())
        );
        assert_eq!(
            routes.topics(),
            vec!["presence".to_string(), "unrouted".to_string()]
        );
    }
}
