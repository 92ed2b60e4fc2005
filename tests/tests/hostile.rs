//! Bad input ends only the offending connection, with a reason in the log and the
//! metrics, while a well-behaved vehicle keeps publishing and getting PUBACKs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration::raw::{publish5, put_len, suback_codes, subscribe, Outcome, Raw};
use integration::{Gateway, ANON};

/// A vehicle publishing QoS1 in a loop; counts PUBACKs.
fn steady_vehicle(gw: &Gateway, stop: Arc<AtomicUsize>) -> (Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
    let acks = Arc::new(AtomicUsize::new(0));
    let (mut raw, code) = Raw::mqtt311(gw.mqtt(), "steady", 30);
    assert_eq!(code, 0);
    let counter = acks.clone();
    let handle = std::thread::spawn(move || {
        let mut n: u16 = 0;
        while stop.load(Ordering::Relaxed) == 0 {
            n = n.wrapping_add(1).max(1);
            raw.publish311("vehicles/steady/telemetry", n, b"ok")
                .expect("steady publish");
            match raw.read_packet() {
                Some(p) if p[0] == 0x40 => counter.fetch_add(1, Ordering::Relaxed),
                other => panic!("steady vehicle lost its connection: {other:?}"),
            };
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    (acks, handle)
}

fn connected_v5(gw: &Gateway, id: &str) -> Raw {
    let (raw, code) = Raw::mqtt5(gw.mqtt(), id, 30);
    assert_eq!(code, 0, "CONNACK");
    raw
}

fn publish_frame(topic: &[u8], qos1: bool) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    if qos1 {
        body.extend_from_slice(&1u16.to_be_bytes());
    }
    body.extend_from_slice(b"payload");
    let mut frame = vec![if qos1 { 0x32 } else { 0x30 }];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

fn publish5_frame(topic: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    body.extend_from_slice(&1u16.to_be_bytes());
    body.push(0); // no properties
    body.extend_from_slice(b"payload");
    let mut frame = vec![0x32];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

fn assert_closed(raw: &mut Raw, case: &str) -> Vec<Vec<u8>> {
    let (outcome, packets) = raw.until_closed(Duration::from_secs(5));
    assert_eq!(
        outcome,
        Outcome::Closed,
        "{case}: the gateway must close the connection"
    );
    packets
}

#[test]
fn each_bad_input_closes_only_its_connection() {
    let gw = Gateway::start(ANON);
    let stop = Arc::new(AtomicUsize::new(0));
    let (acks, steady) = steady_vehicle(&gw, stop.clone());
    let mut last = 0;
    let mut still_flowing = |case: &str| {
        std::thread::sleep(Duration::from_millis(100));
        let now = acks.load(Ordering::Relaxed);
        assert!(now > last, "{case}: the steady vehicle stopped getting PUBACKs");
        last = now;
    };

    // Random bytes instead of a CONNECT.
    let mut raw = Raw::connect(gw.mqtt());
    raw.send(&[
        0x00, 0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0x42, 0x99, 0x01, 0x02, 0x03,
    ])
    .expect("send");
    assert_closed(&mut raw, "random bytes");
    still_flowing("random bytes");

    // A remaining length far over mqtt.max_packet_size: refused before the bytes arrive.
    let mut raw = Raw::connect(gw.mqtt());
    raw.send(&[0x10, 0xff, 0xff, 0xff, 0x7f]).expect("send");
    assert_closed(&mut raw, "oversized remaining length");
    still_flowing("oversized");

    // PUBLISH before CONNECT.
    let mut raw = Raw::connect(gw.mqtt());
    raw.send(&publish_frame(b"vehicles/x/t", false)).expect("send");
    assert_closed(&mut raw, "publish before connect");
    still_flowing("publish before connect");

    // Invalid UTF-8 in a topic (3.1.1 and 5.0; 5.0 is told why).
    let (mut raw, _) = Raw::mqtt311(gw.mqtt(), "badutf8", 30);
    raw.send(&publish_frame(&[b'v', 0xc3, 0x28], true)).expect("send");
    assert_closed(&mut raw, "invalid utf-8 topic");
    let mut raw = connected_v5(&gw, "badutf8-5");
    raw.send(&publish5_frame(&[b'v', 0xc3, 0x28])).expect("send");
    let packets = assert_closed(&mut raw, "invalid utf-8 topic v5");
    assert!(
        packets.iter().any(|p| p[0] == 0xE0 && p[2] == 0x90),
        "DISCONNECT 0x90: {packets:?}"
    );
    still_flowing("invalid utf-8");

    // A wildcard in a PUBLISH topic.
    let mut raw = connected_v5(&gw, "wild");
    raw.send(&publish5_frame(b"vehicles/wild/+")).expect("send");
    let packets = assert_closed(&mut raw, "wildcard topic");
    assert!(
        packets.iter().any(|p| p[0] == 0xE0 && p[2] == 0x90),
        "DISCONNECT 0x90: {packets:?}"
    );
    still_flowing("wildcard");

    // A second CONNECT on the same connection.
    let (mut raw, _) = Raw::mqtt311(gw.mqtt(), "twice", 30);
    let connect = [
        0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 4, 0x02, 0x00, 0x1e, 0x00, 0x02, b'i', b'd',
    ];
    raw.send(&connect).expect("send");
    assert_closed(&mut raw, "second connect");
    still_flowing("second connect");

    // A CONNECT trickled one byte at a time, slower than connect_timeout_secs (2 s).
    let mut raw = Raw::connect(gw.mqtt());
    let start = std::time::Instant::now();
    let mut closed = false;
    for b in connect.iter().cycle().take(40) {
        if raw.send(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        if start.elapsed() > Duration::from_secs(6) {
            break;
        }
    }
    if !closed {
        assert_closed(&mut raw, "slow connect");
    }
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "slow CONNECT not cut at the timeout"
    );
    still_flowing("slow connect");

    stop.store(1, Ordering::Relaxed);
    steady.join().expect("steady vehicle thread");
    let m = gw.metrics();
    for label in [
        "packet_too_large",
        "not_connect",
        "topic_invalid",
        "second_connect",
        "connect_timeout",
    ] {
        assert!(
            m.contains(&format!("gateway_protocol_errors_total{{reason=\"{label}\"}}")),
            "{label} not counted:\n{m}"
        );
    }
    assert!(
        gw.wait_log("protocol error", Duration::from_secs(1)),
        "reasons are logged"
    );
}

#[test]
fn state_floods_are_contained_while_a_vehicle_publishes() {
    let gw = Gateway::start(ANON);
    let stop = Arc::new(AtomicUsize::new(0));
    let (acks, steady) = steady_vehicle(&gw, stop.clone());

    // 10,000 SUBSCRIBE filters in one burst from one client: 100 are kept (the bound),
    // the rest refused; the connection stays usable.
    let mut flood = connected_v5(&gw, "sub-flood");
    let mut burst = Vec::new();
    for batch in 0..100u16 {
        let filters: Vec<String> = (0..100)
            .map(|i| format!("vehicles/sub-flood/commands/{}", batch * 100 + i))
            .collect();
        burst.extend(subscribe(5, batch + 1, &filters));
    }
    flood.send(&burst).expect("send");
    let granted: usize = (0..100)
        .map(|_| {
            let suback = flood.read_packet().expect("SUBACK");
            suback_codes(5, &suback).iter().filter(|c| **c == 1).count()
        })
        .sum();
    assert_eq!(granted, 100);
    flood.send(&[0xC0, 0x00]).expect("ping");
    assert_eq!(flood.read_packet(), Some(vec![0xD0, 0x00]));

    // Topic aliases beyond the advertised maximum, and aliases for forbidden topics:
    // refused without being stored.
    let mut aliases = connected_v5(&gw, "alias-flood");
    let mut burst = Vec::new();
    for alias in 1..=16u16 {
        burst.extend(publish5(
            format!("vehicles/victim-{alias}/t").as_bytes(),
            alias,
            Some(alias),
        ));
    }
    aliases.send(&burst).expect("send");
    for _ in 1..=16 {
        let ack = aliases.read_packet().expect("PUBACK");
        assert_eq!((ack[0], ack.get(4).copied()), (0x40, Some(0x87)), "{ack:?}");
    }
    aliases
        .send(&publish5(b"vehicles/alias-flood/t", 17, Some(1000)))
        .expect("send");
    let packets = assert_closed(&mut aliases, "alias above the maximum");
    assert!(packets.iter().any(|p| p == &[0xE0, 0x01, 0x94]), "{packets:?}");

    let before = acks.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        acks.load(Ordering::Relaxed) > before,
        "the steady vehicle kept getting PUBACKs"
    );
    stop.store(1, Ordering::Relaxed);
    steady.join().expect("steady vehicle thread");
    assert_eq!(gw.metric("gateway_subscriptions_active"), 100);
}

/// A client publishing flat out is slowed to `mqtt.max_publish_rate` by back-pressure
/// (the gateway stops reading it), and nothing it sent is dropped.
#[test]
fn a_flat_out_publisher_is_paced_not_dropped() {
    let gw = Gateway::start_env(ANON, &[("GATEWAY_MQTT__MAX_PUBLISH_RATE", "50")]);
    let (mut raw, code) = Raw::mqtt311(gw.mqtt(), "flat-out", 60);
    assert_eq!(code, 0);
    let burst: Vec<u8> = (0..200)
        .flat_map(|_| publish_frame(b"vehicles/flat-out/telemetry", false))
        .collect();
    raw.send(&burst).expect("send 200 QoS 0 publishes at once");
    std::thread::sleep(Duration::from_millis(1000));
    // 50/s with a one-second burst: about 100 by now, far from all 200.
    let early = gw.metric("gateway_messages_received_total{qos=\"0\"}");
    assert!(early < 180, "{early} of 200 accepted within a second at 50/s");
    assert!(gw.metric("gateway_publish_throttled_total") > 0);
    // Paced, not dropped: all of them arrive.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while gw.metric("gateway_messages_received_total{qos=\"0\"}") < 200
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gw.metric("gateway_messages_received_total{qos=\"0\"}"), 200);
}

/// MQTT 5 PUBLISH QoS 1 with a topic alias property (empty `topic` uses the alias).
fn publish5_alias(topic: &str, alias: u16, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(&[3, 0x23]);
    body.extend_from_slice(&alias.to_be_bytes());
    body.extend_from_slice(payload);
    let mut frame = vec![0x32];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

/// An aliased topic plus a large payload can exceed a journal segment although the
/// packet itself is within `mqtt.max_packet_size`: the publish is refused (PUBACK 0x83),
/// never acknowledged as stored, and the connection stays up (a disconnect would make
/// the vehicle re-send the same message forever).
#[test]
fn a_publish_too_large_to_journal_is_refused_not_disconnected() {
    let gw = Gateway::start_env(
        ANON,
        &[
            ("GATEWAY_MQTT__MAX_PACKET_SIZE", "4096"),
            ("GATEWAY_JOURNAL__SEGMENT_BYTES", "5120"),
            ("GATEWAY_JOURNAL__MAX_BYTES", "20480"),
        ],
    );
    let mut raw = connected_v5(&gw, "alias-car");
    let topic = format!("vehicles/alias-car/{}", "t".repeat(3000));
    raw.send(&publish5_alias(&topic, 1, 1, b"small")).expect("send");
    let ack = raw.read_packet().expect("PUBACK");
    assert_eq!(ack[0], 0x40, "{ack:?}");
    assert!(
        ack.len() < 5 || ack[4] == 0,
        "the first publish is stored: {ack:?}"
    );
    raw.send(&publish5_alias("", 1, 2, &[b'x'; 3000])).expect("send");
    let ack = raw.read_packet().expect("PUBACK");
    assert_eq!((ack[0], ack[4]), (0x40, 0x83), "refused as too large: {ack:?}");
    // Still connected: a small publish through the same alias is stored.
    raw.send(&publish5_alias("", 1, 3, b"small again")).expect("send");
    let ack = raw.read_packet().expect("PUBACK");
    assert_eq!(ack[0], 0x40, "{ack:?}");
    assert!(ack.len() < 5 || ack[4] == 0, "{ack:?}");
    assert_eq!(
        gw.metric("gateway_protocol_errors_total{reason=\"record_too_large\"}"),
        1
    );
}
