//! Each journal-full policy with a tiny journal and an unreachable Kafka (nothing is
//! ever released): backpressure withholds PUBACKs, reject answers MQTT 5 PUBACK 0x97,
//! drop_oldest keeps acknowledging and counts what it dropped.

use std::time::Duration;

use integration::raw::{put_len, Outcome, Raw};
use integration::Gateway;

/// 2 segments of 8 KiB: about a dozen 1 KiB messages fit.
fn tiny(policy: &str) -> Gateway {
    Gateway::start_env(
        &format!("[kafka]\nbootstrap = \"127.0.0.1:9\"\n[auth]\nallow_anonymous = true\n# policy {policy}\n"),
        &[
            ("GATEWAY_JOURNAL__MAX_BYTES", "16384"),
            ("GATEWAY_JOURNAL__SEGMENT_BYTES", "8192"),
            ("GATEWAY_JOURNAL__FULL_POLICY", policy),
            ("GATEWAY_MQTT__MAX_PACKET_SIZE", "4096"),
            ("GATEWAY_MQTT__MAX_INFLIGHT", "100"),
        ],
    )
}

fn publish5(topic: &str, pkid: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&[b'x'; 1000]);
    let mut frame = vec![0x32];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

/// Publishes `n` messages one at a time; returns the PUBACK reason codes received
/// (0 for success), stopping at the first publish not acknowledged within `wait`.
fn publish_all(gw: &Gateway, n: u16, wait: Duration) -> Vec<u8> {
    let (mut raw, code) = Raw::mqtt5(gw.mqtt(), "full-car", 60);
    assert_eq!(code, 0);
    raw.stream.set_read_timeout(Some(wait)).expect("timeout");
    let mut reasons = Vec::new();
    for pkid in 1..=n {
        raw.send(&publish5("vehicles/full-car/t", pkid)).expect("send");
        match raw.read_packet() {
            Some(p) if p[0] == 0x40 => reasons.push(if p[1] >= 3 { p[4] } else { 0 }),
            _ => break,
        }
    }
    reasons
}

#[test]
fn backpressure_withholds_pubacks() {
    let gw = tiny("backpressure");
    let reasons = publish_all(&gw, 40, Duration::from_secs(2));
    assert!(
        reasons.len() >= 5 && reasons.len() < 40,
        "PUBACKs stop when full: {}",
        reasons.len()
    );
    assert!(reasons.iter().all(|r| *r == 0));
    assert_eq!(gw.metric("gateway_journal_full"), 1, "visible in metrics");
    assert!(
        gw.wait_log("journal: full", Duration::from_secs(1)),
        "and in the log"
    );
}

#[test]
fn reject_answers_quota_exceeded() {
    let gw = tiny("reject");
    let reasons = publish_all(&gw, 40, Duration::from_secs(2));
    assert_eq!(reasons.len(), 40, "every publish is answered");
    let ok = reasons.iter().take_while(|r| **r == 0).count();
    assert!(ok >= 5, "accepted until full ({ok})");
    assert!(
        reasons[ok..].iter().all(|r| *r == 0x97),
        "then PUBACK 0x97: {reasons:?}"
    );
    assert_eq!(
        gw.metric("gateway_journal_rejected_total{qos=\"1\"}"),
        (40 - ok) as u64
    );
}

#[test]
fn drop_oldest_keeps_acknowledging_and_counts() {
    let gw = tiny("drop_oldest");
    let reasons = publish_all(&gw, 40, Duration::from_secs(2));
    assert_eq!(reasons, vec![0; 40], "never refuses");
    assert!(
        gw.metric("gateway_journal_dropped_records_total") > 0,
        "drops are counted"
    );
    assert!(gw.wait_log("drop_oldest", Duration::from_secs(1)), "and logged");
}

#[test]
fn unrouted_messages_are_refused_when_configured() {
    // kafka.unmatched = "refuse" and no route for this topic: MQTT 5 gets PUBACK 0x90,
    // 3.1.1 (which cannot refuse a PUBLISH) is disconnected without a PUBACK and counted;
    // nothing is journaled, and nothing unjournaled is ever acknowledged.
    let mut gw = Gateway::start(
        "[kafka]\nbootstrap = \"127.0.0.1:9\"\nunmatched = \"refuse\"\n\
         [[routes]]\nmqtt = \"vehicles/+/telemetry\"\nkafka_topic = \"telemetry\"\n\
         [auth]\nallow_anonymous = true\n",
    );
    let (mut v5, _) = Raw::mqtt5(gw.mqtt(), "route-car", 60);
    v5.send(&publish5("vehicles/route-car/elsewhere", 1))
        .expect("send");
    let ack = v5.read_packet().expect("PUBACK");
    assert_eq!((ack[0], ack[4]), (0x40, 0x90), "PUBACK 0x90: {ack:?}");
    v5.send(&publish5("vehicles/route-car/telemetry", 2))
        .expect("send");
    let ack = v5.read_packet().expect("PUBACK");
    assert!(
        ack[0] == 0x40 && (ack[1] == 2 || ack[4] == 0),
        "routed topic accepted: {ack:?}"
    );
    let (mut v4, _) = Raw::mqtt311(gw.mqtt(), "route-car-4", 60);
    v4.publish311("vehicles/route-car-4/elsewhere", 1, b"x")
        .expect("send");
    let (outcome, packets) = v4.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    assert!(packets.iter().all(|p| p[0] != 0x40), "no PUBACK: {packets:?}");
    assert_eq!(gw.metric("gateway_messages_unrouted_total{qos=\"1\"}"), 2);
    assert!(gw.terminate(Duration::from_secs(10)));
    let records = Gateway::journal_records(gw.dir.path());
    assert_eq!(records.len(), 1, "only the routed message is journaled");
}

/// While the journal is full, command outcome records cannot be journaled and wait in
/// memory: past `commands.max_pending` of them, a new REST command is refused with 503
/// `commands_backlogged` and an operator's MQTT command publish with PUBACK 0x97, so
/// commands cannot grow the gateway's memory without bound during a long outage.
#[test]
fn commands_are_refused_while_their_outcomes_cannot_be_journaled() {
    use integration::raw::{suback_codes, subscribe};
    const TOKEN: &str = "backlog-test-token";
    let gw = Gateway::start_env(
        "[kafka]\nbootstrap = \"127.0.0.1:9\"\n[auth]\nallow_anonymous = true\n\
         publish_acl = [\"#\"]\nsubscribe_acl = [\"#\"]\n",
        &[
            ("GATEWAY_JOURNAL__MAX_BYTES", "16384"),
            ("GATEWAY_JOURNAL__SEGMENT_BYTES", "8192"),
            ("GATEWAY_JOURNAL__FULL_POLICY", "reject"),
            ("GATEWAY_MQTT__MAX_PACKET_SIZE", "4096"),
            ("GATEWAY_MQTT__MAX_INFLIGHT", "100"),
            ("GATEWAY_COMMANDS__MAX_PENDING", "2"),
            ("GATEWAY_ADMIN__TOKEN", TOKEN),
        ],
    );
    // A vehicle that acknowledges its commands.
    let (mut car, code) = Raw::mqtt5(gw.mqtt(), "cmd-car", 60);
    assert_eq!(code, 0);
    car.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    car.send(&subscribe(5, 1, &["vehicles/cmd-car/commands".to_string()]))
        .expect("subscribe");
    let suback = car.read_packet().expect("SUBACK");
    assert_eq!(suback_codes(5, &suback), vec![1]);
    // Fill the journal: the reject policy refuses publishes once it is full.
    let reasons = publish_all(&gw, 40, Duration::from_secs(2));
    assert!(reasons.contains(&0x97), "the journal filled: {reasons:?}");
    let admin = gw.admin.expect("admin");
    let post = || {
        integration::http_send(
            admin,
            "POST",
            "/api/v1/vehicles/cmd-car/commands",
            Some(TOKEN),
            r#"{"payload": "unlock", "qos": 1}"#,
        )
    };
    // Each command reaches the vehicle; its `delivered` record is journaled while the
    // head segment has room for it (an outcome is smaller than the publishes that
    // filled it), then waits for journal space (outcomes wait under every policy).
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let (status, body) = post();
        statuses.push(status);
        if status == 503 {
            assert!(body.contains("commands_backlogged"), "{body}");
            break;
        }
        assert_eq!(status, 202, "{body}");
        let p = car.read_packet().expect("the command reached the vehicle");
        assert_eq!(p[0] & 0xF0, 0x30, "a PUBLISH: {p:?}");
        // Fixed header (2), topic length (2), the 25-byte topic, then the packet id.
        let pkid = u16::from_be_bytes([p[29], p[30]]);
        car.send(&[0x40, 2, (pkid >> 8) as u8, pkid as u8])
            .expect("PUBACK");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}\n{}", gw.log());
    // At the bound (one more if a PUBACK arrived after its next POST was let through).
    assert!(gw.metric("gateway_command_outcomes_backlog") >= 2);
    // An operator's MQTT command publish is refused the same way.
    let (mut op, code) = Raw::mqtt5(gw.mqtt(), "ops-1", 60);
    assert_eq!(code, 0);
    op.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    op.send(&publish5("vehicles/cmd-car/commands", 7)).expect("send");
    let puback = op.read_packet().expect("PUBACK");
    assert_eq!((puback[0], puback[4]), (0x40, 0x97), "{puback:?}");
    assert_eq!(gw.metric("gateway_commands_refused_backlog_total"), 2);
    // An operator's Will on the command topic too: the connection drops without a
    // DISCONNECT, and no command reaches the vehicle.
    let (willing, connack) = Raw::connect_with(
        gw.mqtt(),
        &integration::raw::Connect::new(5, "ops-2").will("vehicles/cmd-car/commands", b"lock"),
    );
    assert_eq!(integration::raw::connack_code(&connack), 0);
    willing
        .stream
        .shutdown(std::net::Shutdown::Both)
        .expect("drop the connection");
    drop(willing);
    assert!(
        gw.wait_log("Will not published: a command", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    assert_eq!(gw.metric("gateway_commands_refused_backlog_total"), 3);
    car.stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    assert!(car.read_packet().is_none(), "no command from the Will");
}
