//! Presence events against a real Apache Kafka broker: a connection's `connected` and
//! `disconnected` events reach `[presence] kafka_topic` keyed by client id, and their
//! journal sequences (`gateway.seq`) bracket the connection's telemetry, so a consumer
//! sees them in order with it. A takeover closes the first connection with
//! `taken_over`; `[presence] enabled = false` journals none; a full journal neither
//! holds a connection forever nor drops an event without counting it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::certs::Ca;
use integration::kafka::{Consumed, Kafka};
use integration::raw::{connack_code, Connect, Outcome, Raw};
use integration::{kafka_config, mosquitto, Gateway};

const WAIT: Duration = Duration::from_secs(30);
/// A zero-length DISCONNECT (3.1.1 and 5.0 alike): a normal close.
const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// A gateway producing telemetry to `telemetry` and presence events to `presence` (one
/// partition each, so Kafka order is journal order), with `extra` config sections and
/// `env` overrides. The harness config turns presence off; the environment decides here.
fn start(kafka: &Kafka, enabled: bool, extra: &str, env: &[(&str, &str)]) -> Gateway {
    kafka.create_topic("telemetry", 1);
    kafka.create_topic("presence", 1);
    let enabled = enabled.to_string();
    let mut all = vec![
        ("GATEWAY_PRESENCE__ENABLED", enabled.as_str()),
        ("GATEWAY_PRESENCE__KAFKA_TOPIC", "presence"),
    ];
    all.extend_from_slice(env);
    let config = format!("{extra}{}", kafka_config(&kafka.bootstrap(), "telemetry"));
    Gateway::start_env(&config, &all)
}

/// The raw JSON token of `key` in a flat JSON object: a string without its quotes, or a
/// number, boolean or `null` as written. Enough for the gateway's presence events.
fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &json[at..];
    match rest.strip_prefix('"') {
        Some(s) => s.split('"').next(),
        None => rest.split([',', '}']).next(),
    }
}

fn seq(r: &Consumed) -> u64 {
    r.header("gateway.seq").unwrap().parse().unwrap()
}

/// Publishes `count` QoS 1 messages and waits for their PUBACKs.
fn publish(v: &mut Raw, id: &str, count: u16) {
    for pkid in 1..=count {
        v.publish311(
            &format!("vehicles/{id}/telemetry"),
            pkid,
            format!("{{\"n\":{pkid}}}").as_bytes(),
        )
        .unwrap();
    }
    for _ in 0..count {
        assert_eq!(v.read_packet().map(|p| p[0]), Some(0x40), "PUBACK");
    }
}

/// Sends DISCONNECT and waits until the gateway closed the connection.
fn disconnect(v: &mut Raw) {
    v.send(&DISCONNECT).unwrap();
    assert_eq!(v.until_closed(Duration::from_secs(5)).0, Outcome::Closed);
}

#[test]
fn connected_and_disconnected_bracket_the_telemetry_in_kafka() {
    let kafka = Kafka::start();
    let gw = start(&kafka, true, "", &[]);
    let (mut v, code) = Raw::mqtt311(gw.mqtt(), "veh-1", 30);
    assert_eq!(code, 0);
    let peer = v.stream.local_addr().unwrap().to_string();
    publish(&mut v, "veh-1", 2);
    disconnect(&mut v);

    let presence = kafka.consume("presence", 1, 2, WAIT);
    let telemetry = kafka.consume("telemetry", 1, 2, WAIT);
    assert_eq!(presence.len(), 2, "{presence:?}\n{}", gw.log());
    assert_eq!(telemetry.len(), 2, "{telemetry:?}");
    let (on, off) = (&presence[0], &presence[1]);
    let (on_json, off_json) = (on.payload.as_str(), off.payload.as_str());
    assert_eq!(field(on_json, "event"), Some("connected"), "{on_json}");
    assert_eq!(field(off_json, "event"), Some("disconnected"), "{off_json}");
    for (r, json) in [(on, on_json), (off, off_json)] {
        assert_eq!(r.key, "veh-1", "keyed by client id");
        assert_eq!(r.header("mqtt.client_id"), Some("veh-1"));
        assert_eq!(r.header("mqtt.content_type"), Some("application/json"));
        assert_eq!(field(json, "client_id"), Some("veh-1"));
        assert_eq!(field(json, "gateway_id"), r.header("gateway.id"), "{json}");
        assert_eq!(field(json, "protocol"), Some("3.1.1"));
        assert_eq!(field(json, "listener"), Some("tcp"));
        assert_eq!(field(json, "tls_identity"), Some("null"));
        assert_eq!(field(json, "peer"), Some(peer.as_str()));
        assert_eq!(field(json, "clean_start"), Some("true"));
        assert_eq!(field(json, "keep_alive_secs"), Some("30"));
    }
    assert_eq!(field(on_json, "session_present"), Some("false"));
    assert_eq!(field(on_json, "reason"), None);
    assert_eq!(field(off_json, "session_present"), None);
    assert_eq!(field(off_json, "reason"), Some("client_disconnect"));
    assert_eq!(field(on_json, "conn"), field(off_json, "conn"), "pairs by conn");
    let connected_at: u64 = field(on_json, "connected_at_ms").unwrap().parse().unwrap();
    assert_eq!(field(on_json, "at_ms"), Some(connected_at.to_string().as_str()));
    assert_eq!(
        field(off_json, "connected_at_ms"),
        Some(connected_at.to_string().as_str())
    );
    let left: u64 = field(off_json, "at_ms").unwrap().parse().unwrap();
    assert!(left >= connected_at);

    // Journal order, which is Kafka order per key: connected, the telemetry, disconnected.
    for t in &telemetry {
        assert_eq!(t.key, "veh-1");
        assert!(
            seq(on) < seq(t) && seq(t) < seq(off),
            "connected {} < telemetry {} < disconnected {}",
            seq(on),
            seq(t),
            seq(off)
        );
    }
    assert_eq!(gw.metric("gateway_presence_events_total{event=\"connected\"}"), 1);
    assert_eq!(
        gw.metric("gateway_presence_events_total{event=\"disconnected\"}"),
        1
    );
}

#[test]
fn a_takeover_closes_the_first_connection_with_taken_over() {
    let kafka = Kafka::start();
    let gw = start(&kafka, true, "", &[]);
    let (mut first, code) = Raw::mqtt5(gw.mqtt(), "veh-2", 30);
    assert_eq!(code, 0);
    let (mut second, code) = Raw::mqtt5(gw.mqtt(), "veh-2", 30);
    assert_eq!(code, 0);
    let (outcome, packets) = first.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    assert!(
        packets.iter().any(|p| p[0] == 0xE0 && p.get(2) == Some(&0x8E)),
        "DISCONNECT 0x8E: {packets:?}"
    );
    disconnect(&mut second);

    let presence = kafka.consume("presence", 1, 4, WAIT);
    assert_eq!(presence.len(), 4, "{presence:?}\n{}", gw.log());
    assert!(presence.iter().all(|r| r.key == "veh-2"));
    let events: Vec<(&str, &str, Option<&str>, u64)> = presence
        .iter()
        .map(|r| {
            let json = r.payload.as_str();
            assert_eq!(field(json, "protocol"), Some("5.0"));
            (
                field(json, "event").unwrap(),
                field(json, "conn").unwrap(),
                field(json, "reason"),
                seq(r),
            )
        })
        .collect();
    // The first connected event is the first connection's (its CONNACK came first).
    let (event, first_conn, _, _) = events[0];
    assert_eq!(event, "connected");
    let second_conn = events
        .iter()
        .find(|e| e.0 == "connected" && e.1 != first_conn)
        .map(|e| e.1)
        .expect("the second connection's connected event");
    let ended = |conn: &str| {
        let on = events.iter().find(|e| e.0 == "connected" && e.1 == conn).unwrap();
        let off = events
            .iter()
            .find(|e| e.0 == "disconnected" && e.1 == conn)
            .unwrap();
        assert!(on.3 < off.3, "connected before disconnected for conn {conn}");
        off.2
    };
    assert_eq!(ended(first_conn), Some("taken_over"));
    assert_eq!(ended(second_conn), Some("client_disconnect"));
}

#[test]
fn a_will_is_journaled_before_the_disconnected_event() {
    let kafka = Kafka::start();
    let gw = start(&kafka, true, "", &[]);
    let connect = Connect::new(4, "veh-w").will("vehicles/veh-w/telemetry", b"{\"will\":true}");
    let (v, connack) = Raw::connect_with(gw.mqtt(), &connect);
    assert_eq!(connack_code(&connack), 0);
    // The socket closes without DISCONNECT: the Will is due at once.
    drop(v);

    let presence = kafka.consume("presence", 1, 2, WAIT);
    let will = kafka.consume("telemetry", 1, 1, WAIT);
    assert_eq!(presence.len(), 2, "{presence:?}\n{}", gw.log());
    assert_eq!(will.len(), 1, "the Will");
    assert_eq!(will[0].payload, "{\"will\":true}");
    let (on, off) = (&presence[0], &presence[1]);
    assert_eq!(
        field(&off.payload, "reason"),
        Some("peer_closed"),
        "{}",
        off.payload
    );
    assert!(
        seq(on) < seq(&will[0]) && seq(&will[0]) < seq(off),
        "connected {} < Will {} < disconnected {}",
        seq(on),
        seq(&will[0]),
        seq(off)
    );
}

#[test]
fn mtls_events_name_the_tls_listener_and_the_certificate_identity() {
    let kafka = Kafka::start();
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "presence");
    let server = ca.server(pki.path());
    let vin = ca.vehicle(pki.path(), "VIN0001");
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        server.cert.display(),
        server.key.display(),
        ca.cert_path.display()
    );
    let gw = start(&kafka, true, &tls, &[("GATEWAY_MQTT__TLS_LISTEN", "127.0.0.1:0")]);
    let port = gw.tls.unwrap().port().to_string();
    let (cafile, cert, key) = (
        ca.cert_path.display().to_string(),
        vin.cert.display().to_string(),
        vin.key.display().to_string(),
    );
    let (code, out) = mosquitto(
        "mosquitto_pub",
        &port,
        &[
            "--cafile",
            &cafile,
            "--cert",
            &cert,
            "--key",
            &key,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-i",
            "VIN0001",
            "-t",
            "vehicles/VIN0001/telemetry",
            "-m",
            "{}",
        ],
    );
    assert_eq!(code, 0, "{out}");

    let presence = kafka.consume("presence", 1, 2, WAIT);
    assert_eq!(presence.len(), 2, "{presence:?}\n{}", gw.log());
    for (r, event) in presence.iter().zip(["connected", "disconnected"]) {
        let json = r.payload.as_str();
        assert_eq!(field(json, "event"), Some(event), "{json}");
        assert_eq!(field(json, "listener"), Some("tls"), "{json}");
        assert_eq!(field(json, "tls_identity"), Some("VIN0001"), "{json}");
        assert_eq!(field(json, "protocol"), Some("5.0"), "{json}");
    }
    assert_eq!(field(&presence[1].payload, "reason"), Some("client_disconnect"));
}

#[test]
fn disabled_presence_journals_nothing() {
    let kafka = Kafka::start();
    let mut gw = start(&kafka, false, "", &[]);
    let (mut v, code) = Raw::mqtt311(gw.mqtt(), "veh-3", 30);
    assert_eq!(code, 0);
    publish(&mut v, "veh-3", 2);
    disconnect(&mut v);
    // The telemetry reached Kafka, so the bridge forwarded everything journaled up to
    // the disconnect; the gateway then stops, flushing what it journaled since.
    assert_eq!(kafka.consume("telemetry", 1, 2, WAIT).len(), 2);
    assert!(gw.terminate(Duration::from_secs(10)), "clean exit");
    assert_eq!(kafka.record_count("presence", 1), 0);
    let records = Gateway::journal_records(gw.dir.path());
    assert_eq!(records.len(), 2, "the two messages and nothing else: {records:?}");
    assert!(records.iter().all(|r| r.entry.kind == bridge::EntryKind::Message));
    assert!(!gw.log().contains("presence event not journaled"));
}

/// A gateway whose journal holds 2 segments of 8 KiB and never drains (Kafka is
/// unreachable), under `policy`, with presence events on.
fn tiny_journal(policy: &str) -> Gateway {
    Gateway::start_env(
        "[kafka]\nbootstrap = \"127.0.0.1:9\"\n[auth]\nallow_anonymous = true\n",
        &[
            ("GATEWAY_PRESENCE__ENABLED", "true"),
            ("GATEWAY_JOURNAL__MAX_BYTES", "16384"),
            ("GATEWAY_JOURNAL__SEGMENT_BYTES", "8192"),
            ("GATEWAY_JOURNAL__FULL_POLICY", policy),
            ("GATEWAY_MQTT__MAX_PACKET_SIZE", "4096"),
            ("GATEWAY_MQTT__MAX_INFLIGHT", "100"),
        ],
    )
}

/// A QoS 1 MQTT 5 PUBLISH with a `len`-byte payload.
fn publish5(topic: &str, pkid: u16, len: usize) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.push(0);
    body.extend(std::iter::repeat_n(b'x', len));
    let mut frame = vec![0x32];
    integration::raw::put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

/// Publishes `len`-byte messages until one is not acknowledged as stored: refused
/// (reason 0x97, the `reject` policy) or left waiting for `wait` (back-pressure).
fn fill(v: &mut Raw, id: &str, pkid: &mut u16, len: usize, wait: Duration) {
    v.stream.set_read_timeout(Some(wait)).unwrap();
    loop {
        *pkid += 1;
        v.send(&publish5(&format!("vehicles/{id}/telemetry"), *pkid, len))
            .unwrap();
        match v.read_packet() {
            Some(p) if p[0] == 0x40 && p[1] == 2 => continue,
            Some(p) if p[0] == 0x40 => return assert_eq!(p[4], 0x97, "{p:?}"),
            Some(p) => panic!("unexpected packet {p:?}"),
            None => return,
        }
    }
}

#[test]
fn a_full_journal_under_reject_drops_events_visibly() {
    let gw = tiny_journal("reject");
    let (mut v, code) = Raw::mqtt5(gw.mqtt(), "full-car", 60);
    assert_eq!(code, 0);
    // Big messages, then small ones: no room is left for an event.
    let mut pkid = 0;
    fill(&mut v, "full-car", &mut pkid, 1000, Duration::from_secs(2));
    fill(&mut v, "full-car", &mut pkid, 10, Duration::from_secs(2));
    disconnect(&mut v);
    // A refused event costs no wait: the next vehicle gets its CONNACK at once.
    let (_late, code) = Raw::mqtt5(gw.mqtt(), "late-car", 60);
    assert_eq!(code, 0);
    assert_eq!(gw.metric("gateway_presence_events_total{event=\"connected\"}"), 1);
    let dropped = "gateway_presence_dropped_total{reason=\"journal_full\"}";
    assert_eq!(
        gw.metric(dropped),
        2,
        "full-car's disconnected, late-car's connected"
    );
    assert!(gw.wait_log("presence event not journaled", Duration::from_secs(1)));
}

#[test]
fn a_full_journal_under_backpressure_holds_no_connection_forever() {
    let mut gw = tiny_journal("backpressure");
    let (mut v, code) = Raw::mqtt5(gw.mqtt(), "full-car", 60);
    assert_eq!(code, 0);
    let mut pkid = 0;
    fill(&mut v, "full-car", &mut pkid, 1000, Duration::from_secs(1));
    // full-car now waits for space; a second vehicle takes what is left with small
    // messages until it waits too.
    let (mut w, code) = Raw::mqtt5(gw.mqtt(), "fill-car", 60);
    assert_eq!(code, 0, "its connected event still fit");
    fill(&mut w, "fill-car", &mut pkid, 10, Duration::from_secs(1));

    // A vehicle connecting now waits for space for its connected event: no CONNACK...
    let connect = Connect::new(5, "late-car");
    let mut first = Raw::connect(gw.mqtt());
    first.send(&connect.encode()).unwrap();
    first
        .stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(first.read_packet(), None, "CONNACK waits for the connected event");
    // ...until it reconnects: the takeover ends the wait, counted.
    let mut second = Raw::connect(gw.mqtt());
    second.send(&connect.encode()).unwrap();
    assert_eq!(first.until_closed(Duration::from_secs(5)).0, Outcome::Closed);
    assert_eq!(
        gw.metric("gateway_presence_dropped_total{reason=\"taken_over\"}"),
        1
    );
    // A shutdown ends every wait: the gateway exits within its grace period.
    assert!(gw.terminate(Duration::from_secs(10)), "clean exit");
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("presence event not journaled") && l.contains("reason=\"shutdown\"")),
        "{log}"
    );
}
