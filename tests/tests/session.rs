//! Session rules: client-id takeover, keep alive at 1.5×, zero-length MQTT 5
//! DISCONNECT, PINGREQ, Receive Maximum, topic aliases, connection limit, and the
//! SIGTERM goodbye (MQTT 5 DISCONNECT 0x8B).

use std::time::{Duration, Instant};

use integration::raw::{put_len, Outcome, Raw};
use integration::{Gateway, ANON};

fn publish5(topic: &[u8], pkid: u16, alias: Option<u16>) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    body.extend_from_slice(&pkid.to_be_bytes());
    match alias {
        Some(a) => {
            body.push(3);
            body.push(0x23);
            body.extend_from_slice(&a.to_be_bytes());
        }
        None => body.push(0),
    }
    body.extend_from_slice(b"p");
    let mut frame = vec![0x32];
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
