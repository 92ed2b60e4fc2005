//! Commands from the Kafka command topic: record key = client id, value = payload (bytes
//! as-is), optional headers `qos`, `expiry_secs`, `correlation_id`, `response_topic`,
//! `content_type`; any other UTF-8 header is forwarded as an MQTT 5 user property,
//! except `gateway.*` and `mqtt.*` (the gateway's own bookkeeping). A command another
//! gateway handed over (see `region`) also carries `command_id` and `issued_at_ms`, so
//! it keeps its identity and its expiry.
//!
//! A record that cannot be a command (no key, a key that is not UTF-8, a header that
//! does not parse) still gets an outcome, `rejected`, so that it is settled and its
//! producer learns why.

use std::sync::Arc;

use bridge::commands::Consumed;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{CommandRecord, CommandRequest, Source};
use crate::message::now_ms;
use crate::state::Shared;

/// The header a gateway puts on the commands it hands over (see `region`).
pub const HANDED_OVER_FROM: &str = "gateway.handed_over_from";

/// Issues every consumed command, in the order the consumer hands them over.
pub async fn dispatch(shared: Arc<Shared>, mut rx: mpsc::Receiver<Consumed>) {
    let cfg = &shared.cfg.commands;
    if cfg.many_gateways && cfg.report_unknown {
        // The region's reporter first learns who holds what from the presence topic.
        shared.commands.region.ready().await;
    }
    while let Some(c) = rx.recv().await {
        issue(&shared, c);
    }
}

/// Drops the "done" markers below each committed position: Kafka will not deliver
/// those commands again.
pub async fn forget_committed(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<(i32, i64)>) {
    let topic = shared.cfg.commands.kafka_topic.clone();
    while let Some((partition, position)) = rx.recv().await {
        shared.commands.sink.forget_below(&topic, partition, position);
        if let Err(e) = shared.store.forget_commands_below(&topic, partition, position) {
            tracing::warn!(topic, partition, error = %e, "command done markers not removed");
        }
    }
}

fn issue(shared: &Arc<Shared>, c: Consumed) {
    let commands = &shared.commands;
    let source = Source::Kafka {
        topic: c.topic.clone(),
        partition: c.partition,
        offset: c.offset,
    };
    let id = format!("kafka:{}:{}:{}", c.topic, c.partition, c.offset);
    match decode(&c) {
        // `issue` first settles, without a word, a command taken here already.
        Ok((req, handed_over_id)) => {
            commands.issue(shared, handed_over_id.unwrap_or(id), source, req, None);
        }
        Err(reason) => {
            let client_id = c
                .key
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            let ticket = commands.restore(CommandRecord {
                id,
                client_id,
                correlation_id: None,
                source,
                issued_at_ms: now_ms(),
                qos: 0,
            });
            // Refused before (its marker is in the store: a crash came before its offset
            // commit), or its `rejected` is settling (the consumer was rebuilt and read
            // it again): not a second outcome.
            if commands.taken_already(shared, &ticket) {
                return;
            }
            commands.metrics.received.inc("kafka");
            tracing::warn!(topic = %c.topic, partition = c.partition, offset = c.offset, reason, "command record refused");
            ticket.finish(super::outcome::Outcome::Rejected, Some(reason));
        }
    }
}

/// The command a record carries (and the id it was given before it was handed over),
/// or why it carries none.
pub fn decode(c: &Consumed) -> Result<(CommandRequest, Option<String>), &'static str> {
    let client_id = match &c.key {
        None => return Err("missing_key"),
        Some(k) => String::from_utf8(k.clone()).map_err(|_| "key_not_utf8")?,
    };
    let mut req = CommandRequest {
        client_id,
        payload: Bytes::from(c.payload.clone()),
        issued_at_ms: c
            .timestamp_ms
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0),
        ..CommandRequest::default()
    };
    let mut id = None;
    let handed_over = c.headers.iter().any(|(k, _)| k == HANDED_OVER_FROM);
    for (k, v) in &c.headers {
        let text = || std::str::from_utf8(v).map(str::to_string);
        match k.as_str() {
            "qos" => {
                let q = text().ok().and_then(|t| t.trim().parse::<u8>().ok());
                req.qos = Some(q.filter(|q| *q <= 2).ok_or("bad_qos_header")?);
            }
            "expiry_secs" => {
                let e = text().ok().and_then(|t| t.trim().parse::<u32>().ok());
                req.expiry_secs = Some(e.ok_or("bad_expiry_header")?);
            }
            "correlation_id" => req.correlation_id = Some(text().map_err(|_| "bad_correlation_id_header")?),
            "response_topic" => {
                let t = text().map_err(|_| "bad_response_topic_header")?;
                if t.is_empty() || t.contains(['+', '#', '\0']) {
                    return Err("bad_response_topic_header");
                }
                req.response_topic = Some(t);
            }
            "content_type" => req.content_type = Some(text().map_err(|_| "bad_content_type_header")?),
            // A copy another gateway handed over: it keeps its id and issue time. From
            // anyone else these are user properties like any header (a producer must
            // not take another command's identity).
            "command_id" if handed_over => id = Some(text().map_err(|_| "bad_command_id_header")?),
            "issued_at_ms" if handed_over => {
                // A time from the future (beyond a day of clock skew) is not an issue time.
                let t = text().ok().and_then(|t| t.trim().parse::<u64>().ok());
                let plausible = t.filter(|t| *t <= now_ms().saturating_add(86_400_000));
                req.issued_at_ms = Some(plausible.ok_or("bad_issued_at_ms_header")?);
            }
            _ if k.starts_with("gateway.") || k.starts_with("mqtt.") => {}
            _ => {
                if let Ok(v) = text() {
                    req.user_properties.push((k.clone(), v));
                }
            }
        }
    }
    Ok((req, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: Option<&[u8]>, headers: &[(&str, &[u8])]) -> Consumed {
        Consumed {
            topic: "vehicles.commands".into(),
            partition: 2,
            offset: 7,
            key: key.map(<[u8]>::to_vec),
            payload: b"unlock".to_vec(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    #[test]
    fn headers_become_command_settings_and_user_properties() {
        let r = decode(&rec(
            Some(b"VIN1"),
            &[
                ("qos", b"2"),
                ("expiry_secs", b"30"),
                ("correlation_id", b"c-1"),
                ("response_topic", b"vehicles/VIN1/replies"),
                ("content_type", b"application/json"),
                ("trace", b"abc"),
            ],
        ))
        .expect("a command")
        .0;
        assert_eq!(r.client_id, "VIN1");
        assert_eq!(&r.payload[..], b"unlock");
        assert_eq!(r.qos, Some(2));
        assert_eq!(r.expiry_secs, Some(30));
        assert_eq!(r.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(r.response_topic.as_deref(), Some("vehicles/VIN1/replies"));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(r.user_properties, vec![("trace".to_string(), "abc".to_string())]);
        assert_eq!(r.issued_at_ms, Some(1_700_000_000_000));
    }

    #[test]
    fn a_handed_over_command_keeps_its_id_and_issue_time_and_drops_bookkeeping() {
        let (r, id) = decode(&rec(
            Some(b"VIN1"),
            &[
                ("command_id", b"kafka:vehicles.commands:0:3"),
                ("issued_at_ms", b"1600000000000"),
                ("gateway.seq", b"42"),
                ("gateway.handed_over_from", b"gw-a"),
                ("mqtt.topic", b"vehicles/VIN1/commands"),
            ],
        ))
        .expect("a command");
        assert_eq!(id.as_deref(), Some("kafka:vehicles.commands:0:3"));
        assert_eq!(r.issued_at_ms, Some(1_600_000_000_000));
        assert!(r.user_properties.is_empty(), "{:?}", r.user_properties);
        // From a producer (no hand-over header) they are user properties: a record
        // cannot take another command's identity.
        let (r, id) = decode(&rec(
            Some(b"VIN1"),
            &[
                ("command_id", b"kafka:vehicles.commands:0:3"),
                ("issued_at_ms", b"1600000000000"),
            ],
        ))
        .expect("a command");
        assert_eq!(id, None);
        assert_eq!(r.issued_at_ms, Some(1_700_000_000_000), "the record's timestamp");
        assert_eq!(r.user_properties.len(), 2, "{:?}", r.user_properties);
    }

    #[test]
    fn records_that_are_not_commands_say_why() {
        assert_eq!(decode(&rec(None, &[])).err(), Some("missing_key"));
        assert_eq!(decode(&rec(Some(&[0xff, 0xfe]), &[])).err(), Some("key_not_utf8"));
        assert_eq!(
            decode(&rec(Some(b"v"), &[("qos", b"3")])).err(),
            Some("bad_qos_header")
        );
        assert_eq!(
            decode(&rec(Some(b"v"), &[("qos", b"x")])).err(),
            Some("bad_qos_header")
        );
        assert_eq!(
            decode(&rec(Some(b"v"), &[("expiry_secs", b"-1")])).err(),
            Some("bad_expiry_header")
        );
        assert_eq!(
            decode(&rec(Some(b"v"), &[("response_topic", b"a/#")])).err(),
            Some("bad_response_topic_header")
        );
        assert_eq!(
            decode(&rec(
                Some(b"v"),
                &[
                    ("issued_at_ms", b"18446744073709551615"),
                    (HANDED_OVER_FROM, b"gw-a")
                ]
            ))
            .err(),
            Some("bad_issued_at_ms_header")
        );
    }
}
