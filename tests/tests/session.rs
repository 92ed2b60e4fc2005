//! Session rules: client-id takeover, keep alive at 1.5× (and its server maximum),
//! zero-length MQTT 5 DISCONNECT, PINGREQ, Receive Maximum, topic aliases (stored only
//! after the ACL), the subscription bound, the connection limit (answered with a
//! CONNACK), and the SIGTERM goodbye (MQTT 5 DISCONNECT 0x8B).

use std::time::{Duration, Instant};

use integration::raw::{
    connack_code, connack_u16_property, publish5, put_len, suback_codes, subscribe, Connect, Outcome, Raw,
};
use integration::{Gateway, ANON};

/// An MQTT 5 UNSUBSCRIBE of one filter.
fn unsubscribe5(pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    let mut frame = vec![0xA2];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

#[test]
fn takeover_keepalive_ping_and_zero_length_disconnect() {
    let gw = Gateway::start(ANON);
    // Takeover: the older connection gets DISCONNECT 0x8E and is closed.
    let (mut first, code) = Raw::mqtt5(gw.mqtt(), "dup-car", 30);
    assert_eq!(code, 0);
    let (mut second, code) = Raw::mqtt5(gw.mqtt(), "dup-car", 30);
    assert_eq!(code, 0);
    let (outcome, packets) = first.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    assert!(
        packets.iter().any(|p| p == &[0xE0, 0x01, 0x8E]),
        "DISCONNECT 0x8E: {packets:?}"
    );
    // The new owner works: PINGREQ → PINGRESP.
    second.send(&[0xC0, 0x00]).expect("ping");
    assert_eq!(second.read_packet(), Some(vec![0xD0, 0x00]));
    // Zero-length MQTT 5 DISCONNECT is a normal disconnect.
    second.send(&[0xE0, 0x00]).expect("disconnect");
    assert_eq!(second.until_closed(Duration::from_secs(5)).0, Outcome::Closed);

    // Keep alive 1 s: silent for longer than 1.5 s gets closed (MQTT 5: reason 0x8D).
    let (mut quiet, _) = Raw::mqtt5(gw.mqtt(), "quiet-car", 1);
    let start = Instant::now();
    let (outcome, packets) = quiet.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed too early: {waited:?}"
    );
    assert!(
        packets.iter().any(|p| p == &[0xE0, 0x01, 0x8D]),
        "DISCONNECT 0x8D: {packets:?}"
    );
    assert!(gw.metric("gateway_connections_closed_total{reason=\"taken_over\"}") >= 1);
    assert_eq!(
        gw.metric("gateway_connections_closed_total{reason=\"keepalive_timeout\"}"),
        1
    );
    assert!(gw.metric("gateway_connections_closed_total{reason=\"client_disconnect\"}") >= 1);
}

#[test]
fn topic_alias_receive_maximum_and_connection_limit() {
    // Overrides through the environment, as an operator would in a container.
    let gw = Gateway::start_env(
        ANON,
        &[
            ("GATEWAY_MQTT__MAX_INFLIGHT", "2"),
            ("GATEWAY_MQTT__TOPIC_ALIAS_MAX", "4"),
            ("GATEWAY_MQTT__MAX_CONNECTIONS", "3"),
        ],
    );
    let (mut raw, code) = Raw::mqtt5(gw.mqtt(), "alias-car", 30);
    assert_eq!(code, 0);
    // Set alias 1, then publish through it with an empty topic: both acknowledged.
    raw.send(&publish5(b"vehicles/alias-car/telemetry", 1, Some(1)))
        .expect("send");
    raw.send(&publish5(b"", 2, Some(1))).expect("send");
    let acks: Vec<_> = (0..2).filter_map(|_| raw.read_packet()).collect();
    assert!(acks.iter().all(|p| p[0] == 0x40), "PUBACKs: {acks:?}");
    // An alias above the advertised maximum ends the connection with 0x94.
    raw.send(&publish5(b"vehicles/alias-car/x", 3, Some(5)))
        .expect("send");
    let (outcome, packets) = raw.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    assert!(
        packets.iter().any(|p| p == &[0xE0, 0x01, 0x94]),
        "DISCONNECT 0x94: {packets:?}"
    );

    // Connection limit of 3: the fourth is closed at once and counted.
    let held: Vec<_> = (0..3)
        .map(|i| Raw::mqtt311(gw.mqtt(), &format!("held-{i}"), 30))
        .collect();
    assert!(held.iter().all(|(_, code)| *code == 0));
    let mut extra = Raw::connect(gw.mqtt());
    assert_eq!(extra.until_closed(Duration::from_secs(5)).0, Outcome::Closed);
    assert_eq!(
        gw.metric("gateway_connections_rejected_total{reason=\"max_connections\"}"),
        1
    );
    drop(held);

    // Receive Maximum 2: a third unacknowledged QoS1 publish violates it (0x93). Sent in
    // one write so that no PUBACK can intervene.
    std::thread::sleep(Duration::from_millis(200));
    let (mut raw, code) = Raw::mqtt5(gw.mqtt(), "greedy-car", 30);
    assert_eq!(code, 0);
    let mut burst = Vec::new();
    for pkid in 1..=40 {
        burst.extend(publish5(b"vehicles/greedy-car/t", pkid, None));
    }
    raw.send(&burst).expect("send");
    let (outcome, packets) = raw.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    assert!(
        packets.iter().any(|p| p == &[0xE0, 0x01, 0x93]),
        "DISCONNECT 0x93: {packets:?}"
    );
}

#[test]
fn sigterm_says_goodbye_and_exits() {
    let mut gw = Gateway::start(ANON);
    let (mut v5, code) = Raw::mqtt5(gw.mqtt(), "bye-car", 30);
    assert_eq!(code, 0);
    v5.send(&publish5(b"vehicles/bye-car/t", 1, None)).expect("send");
    assert_eq!(v5.read_packet().map(|p| p[0]), Some(0x40));
    let (mut v4, _) = Raw::mqtt311(gw.mqtt(), "bye-car-4", 30);
    let pid = gw.pid().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let (outcome, packets) = v5.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    assert!(
        packets.iter().any(|p| p == &[0xE0, 0x01, 0x8B]),
        "DISCONNECT 0x8B: {packets:?}"
    );
    assert_eq!(v4.until_closed(Duration::from_secs(5)).0, Outcome::Closed);
    assert!(
        gw.wait_log("gateway stopped", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    assert!(gw.terminate(Duration::from_secs(5)) || gw.log().contains("gateway stopped"));
}

#[test]
fn subscriptions_are_bounded_per_session() {
    let gw = Gateway::start(ANON);
    // 10,000 filters from one MQTT 5 client, 100 per SUBSCRIBE: the first 100
    // (mqtt.max_subscriptions) are granted, every later one gets 0x97 quota exceeded.
    let (mut raw, code) = Raw::mqtt5(gw.mqtt(), "sub-car", 30);
    assert_eq!(code, 0);
    let mut codes = Vec::new();
    for batch in 0..100u16 {
        let filters: Vec<String> = (0..100)
            .map(|i| format!("vehicles/sub-car/commands/f{}", batch * 100 + i))
            .collect();
        raw.send(&subscribe(5, batch + 1, &filters)).expect("subscribe");
        let suback = raw.read_packet().expect("SUBACK");
        assert_eq!(suback[0], 0x90);
        codes.extend(suback_codes(5, &suback));
    }
    assert_eq!(codes.len(), 10_000);
    assert!(codes[..100].iter().all(|c| *c == 1), "first 100 granted at QoS 1");
    assert!(codes[100..].iter().all(|c| *c == 0x97), "then 0x97");
    // The session holds 100 filters, not 10,000.
    assert_eq!(gw.metric("gateway_subscriptions_active"), 100);
    assert_eq!(
        gw.metric("gateway_subscribe_refused_total{reason=\"quota_exceeded\"}"),
        9_900
    );
    // A filter held already is granted again without growing the set; unsubscribing
    // frees room for a new one.
    raw.send(&subscribe(5, 200, &["vehicles/sub-car/commands/f0".to_string()]))
        .expect("subscribe");
    assert_eq!(suback_codes(5, &raw.read_packet().expect("SUBACK")), [1]);
    raw.send(&unsubscribe5(7, "vehicles/sub-car/commands/f0"))
        .expect("unsubscribe");
    assert_eq!(raw.read_packet().map(|p| p[0]), Some(0xB0));
    raw.send(&subscribe(5, 201, &["vehicles/sub-car/commands/new".to_string()]))
        .expect("subscribe");
    assert_eq!(suback_codes(5, &raw.read_packet().expect("SUBACK")), [1]);
    assert_eq!(gw.metric("gateway_subscriptions_active"), 100);

    // 3.1.1 has one failure code: 0x80.
    let (mut v4, code) = Raw::mqtt311(gw.mqtt(), "sub-car-4", 30);
    assert_eq!(code, 0);
    let filters: Vec<String> = (0..150)
        .map(|i| format!("vehicles/sub-car-4/commands/{i}"))
        .collect();
    v4.send(&subscribe(4, 1, &filters)).expect("subscribe");
    let codes = suback_codes(4, &v4.read_packet().expect("SUBACK"));
    assert_eq!(codes.len(), 150);
    assert!(codes[..100].iter().all(|c| *c == 1) && codes[100..].iter().all(|c| *c == 0x80));
    // Closed sessions give their filters back.
    drop(raw);
    drop(v4);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gw.metric("gateway_subscriptions_active"), 0);
}

#[test]
fn a_topic_alias_is_stored_only_for_an_allowed_topic() {
    let gw = Gateway::start(ANON);
    let (mut raw, code) = Raw::mqtt5(gw.mqtt(), "alias-acl", 30);
    assert_eq!(code, 0);
    // Alias 1 for another vehicle's topic: refused by the ACL (0x87), alias not stored.
    raw.send(&publish5(b"vehicles/victim/telemetry", 1, Some(1)))
        .expect("send");
    let ack = raw.read_packet().expect("PUBACK");
    assert_eq!((ack[0], ack.get(4).copied()), (0x40, Some(0x87)), "{ack:?}");
    // Using alias 1 is then a protocol error (never set), not a publish to that topic.
    raw.send(&publish5(b"", 2, Some(1))).expect("send");
    let (outcome, packets) = raw.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    assert!(
        packets.iter().any(|p| p == &[0xE0, 0x01, 0x82]),
        "DISCONNECT 0x82: {packets:?}"
    );
    assert_eq!(
        gw.metric("gateway_protocol_errors_total{reason=\"topic_alias_unknown\"}"),
        1
    );
}

#[test]
fn keep_alive_zero_is_capped_by_the_server_maximum() {
    let gw = Gateway::start_env(ANON, &[("GATEWAY_MQTT__MAX_KEEP_ALIVE_SECS", "1")]);
    // MQTT 5, keep alive 0 ("never"): CONNACK carries Server Keep Alive = 1, and a
    // silent client is closed after 1.5 s with 0x8D.
    let (mut v5, connack) = Raw::connect_with(gw.mqtt(), &Connect::new(5, "forever-5").keep_alive(0));
    assert_eq!(connack_code(&connack), 0);
    assert_eq!(connack_u16_property(&connack, 0x13), Some(1), "{connack:?}");
    let start = Instant::now();
    let (outcome, packets) = v5.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "not before 1.5 × the cap"
    );
    assert!(
        packets.iter().any(|p| p == &[0xE0, 0x01, 0x8D]),
        "DISCONNECT 0x8D: {packets:?}"
    );
    // Above the cap: capped too. Within it: no Server Keep Alive.
    let (_, connack) = Raw::connect_with(gw.mqtt(), &Connect::new(5, "long-5").keep_alive(600));
    assert_eq!(connack_u16_property(&connack, 0x13), Some(1));
    // 3.1.1, keep alive 0: simply timed out at 1.5 × the cap.
    let (mut v4, connack) = Raw::connect_with(gw.mqtt(), &Connect::new(4, "forever-4").keep_alive(0));
    assert_eq!(connack, vec![0x20, 0x02, 0x00, 0x00]);
    assert_eq!(v4.until_closed(Duration::from_secs(5)).0, Outcome::Closed);
    assert!(gw.metric("gateway_connections_closed_total{reason=\"keepalive_timeout\"}") >= 2);
    assert_eq!(gw.metric("gateway_keep_alive_capped_total"), 3);
}

#[test]
fn connections_over_the_limit_get_a_connack_in_their_version() {
    let gw = Gateway::start_env(ANON, &[("GATEWAY_MQTT__MAX_CONNECTIONS", "2")]);
    let held: Vec<_> = (0..2)
        .map(|i| Raw::mqtt311(gw.mqtt(), &format!("held-{i}"), 30))
        .collect();
    assert!(held.iter().all(|(_, code)| *code == 0));
    // 3.1.1: return code 3 (server unavailable); MQTT 5: 0x97 (quota exceeded).
    let (mut v4, connack) = Raw::connect_with(gw.mqtt(), &Connect::new(4, "late-4"));
    assert_eq!(connack, vec![0x20, 0x02, 0x00, 0x03]);
    assert_eq!(v4.until_closed(Duration::from_secs(5)).0, Outcome::Closed);
    let (mut v5, connack) = Raw::connect_with(gw.mqtt(), &Connect::new(5, "late-5"));
    assert_eq!(connack_code(&connack), 0x97, "{connack:?}");
    assert_eq!(v5.until_closed(Duration::from_secs(5)).0, Outcome::Closed);
    assert_eq!(
        gw.metric("gateway_connections_rejected_total{reason=\"max_connections\"}"),
        2
    );
    assert_eq!(
        gw.metric("gateway_connack_refused_total{reason=\"max_connections\"}"),
        2
    );
    // The held sessions are untouched.
    let (mut first, _) = held.into_iter().next().expect("held");
    first.send(&[0xC0, 0x00]).expect("ping");
    assert_eq!(first.read_packet(), Some(vec![0xD0, 0x00]));
}
