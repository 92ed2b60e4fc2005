//! Bad input ends only the offending connection, with a reason in the log and the
//! metrics, while a well-behaved vehicle keeps publishing and getting PUBACKs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration::raw::{put_len, Outcome, Raw};
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
