//! Security against the real gateway: identity binding (a password user owns only its
//! client ids), the username oracle (unknown users cost a hash too), CONNECT rate limits,
//! authentication under the CONNECT timeout, and nothing acknowledged or journaled
//! without a route (publishes and Wills under `kafka.unmatched = "refuse"`).

use std::time::Duration;

use integration::raw::{connack_code, publish5, Connect, Outcome, Raw};
use integration::{Gateway, ANON};

/// An argon2id hash from `gateway hash-password`.
fn hash(password: &str) -> String {
    let out = std::process::Command::new(integration::gateway_bin())
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(password.as_bytes())?;
            c.wait_with_output()
        })
        .expect("hash-password");
    String::from_utf8(out.stdout).expect("utf8").trim().to_string()
}

fn users_config(extra_auth: &str) -> String {
    let h = hash("pw");
    format!(
        "[auth]\nallow_anonymous = false\n{extra_auth}\n\
         [[auth.users]]\nusername = \"car1\"\npassword_hash = \"{h}\"\n\
         [[auth.users]]\nusername = \"car2\"\npassword_hash = \"{h}\"\n\
         [[auth.users]]\nusername = \"bench\"\npassword_hash = \"{h}\"\nclient_ids = [\"bench-*\"]\n"
    )
}

fn code(gw: &Gateway, c: &Connect) -> u8 {
    connack_code(&Raw::connect_with(gw.mqtt(), c).1)
}

#[test]
fn a_password_user_owns_only_its_client_ids() {
    let gw = Gateway::start(&users_config(""));
    // Its own id (the default binding: exactly the username): accepted, both versions.
    for v in [4, 5] {
        assert_eq!(code(&gw, &Connect::new(v, "car1").login("car1", "pw")), 0);
    }
    // User car1 presenting car2's id: refused (3.1.1: 5, MQTT 5: 0x87).
    assert_eq!(code(&gw, &Connect::new(4, "car2").login("car1", "pw")), 5);
    assert_eq!(code(&gw, &Connect::new(5, "car2").login("car1", "pw")), 0x87);
    // A prefix pattern: bench-* but not bench1 or a vehicle's id.
    assert_eq!(code(&gw, &Connect::new(5, "bench-7").login("bench", "pw")), 0);
    assert_eq!(code(&gw, &Connect::new(5, "bench1").login("bench", "pw")), 0x87);
    assert_eq!(code(&gw, &Connect::new(4, "car1").login("bench", "pw")), 5);

    // Takeover is impossible: car2 is connected; car1 tries to connect as car2.
    let (mut car2, connack) = Raw::connect_with(gw.mqtt(), &Connect::new(5, "car2").login("car2", "pw"));
    assert_eq!(connack_code(&connack), 0);
    assert_eq!(code(&gw, &Connect::new(5, "car2").login("car1", "pw")), 0x87);
    car2.send(&[0xC0, 0x00]).expect("ping");
    assert_eq!(
        car2.read_packet(),
        Some(vec![0xD0, 0x00]),
        "car2 keeps its session"
    );
    assert_eq!(
        gw.metric("gateway_connections_closed_total{reason=\"taken_over\"}"),
        0
    );

    // Publishing under another vehicle's topic is impossible: car1 can only be car1,
    // and car1 may not publish under vehicles/car2/.
    let (mut car1, connack) = Raw::connect_with(gw.mqtt(), &Connect::new(5, "car1").login("car1", "pw"));
    assert_eq!(connack_code(&connack), 0);
    car1.send(&publish5(b"vehicles/car2/telemetry", 1, None))
        .expect("send");
    let ack = car1.read_packet().expect("PUBACK");
    assert_eq!((ack[0], ack.get(4).copied()), (0x40, Some(0x87)), "{ack:?}");

    // An empty client id: a password user gets its username when that is allowed …
    let (_, connack) = Raw::connect_with(gw.mqtt(), &Connect::new(5, "").login("car1", "pw"));
    assert_eq!(connack_code(&connack), 0);
    assert!(
        connack
            .windows(6)
            .any(|w| w == [0x12, 0x00, 0x04, b'c', b'a', b'r']),
        "assigned client id car1: {connack:?}"
    );
    // … and is refused when it is not (bench may only be bench-*).
    assert_eq!(code(&gw, &Connect::new(5, "").login("bench", "pw")), 0x87);
    assert_eq!(code(&gw, &Connect::new(4, "").login("bench", "pw")), 5);

    assert_eq!(
        gw.metric("gateway_connack_refused_total{reason=\"client_id_not_allowed\"}"),
        7
    );
    assert!(gw.log().contains("auth.users[].client_ids"), "refusal logged");
}

#[test]
fn anonymous_access_is_loudly_logged() {
    let gw = Gateway::start(ANON);
    assert!(
        gw.wait_log("auth.allow_anonymous = true", Duration::from_secs(2)),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("WARN"), "a warning: {}", gw.log());
}

#[test]
fn unknown_user_and_wrong_password_take_the_same_path() {
    let gw = Gateway::start(&users_config(""));
    assert_eq!(code(&gw, &Connect::new(4, "car1").login("car1", "nope")), 4);
    assert_eq!(code(&gw, &Connect::new(4, "ghost").login("ghost", "nope")), 4);
    assert_eq!(code(&gw, &Connect::new(5, "ghost").login("ghost", "nope")), 0x86);
    // Both ran one argon2 verification (a dummy one for the unknown user).
    assert_eq!(
        gw.metric("gateway_auth_password_checks_total{result=\"wrong_password\"}"),
        1
    );
    assert_eq!(
        gw.metric("gateway_auth_password_checks_total{result=\"unknown_user\"}"),
        2
    );
    assert_eq!(
        gw.metric("gateway_connack_refused_total{reason=\"bad_credentials\"}"),
        3
    );
}

#[test]
fn connect_bursts_beyond_the_rate_limits_are_refused_with_0x9f_and_3() {
    // Per address: a burst of 3, then nothing for a second.
    let gw = Gateway::start(&format!(
        "{ANON}connect_rate_per_ip = 1\nconnect_burst_per_ip = 3\nconnect_rate_global = 0\n"
    ));
    for i in 0..3 {
        assert_eq!(
            code(&gw, &Connect::new(4, &format!("burst-{i}"))),
            0,
            "within the burst"
        );
    }
    assert_eq!(code(&gw, &Connect::new(5, "burst-3")), 0x9F);
    assert_eq!(code(&gw, &Connect::new(4, "burst-4")), 3);
    assert_eq!(
        gw.metric("gateway_connack_refused_total{reason=\"connect_rate_per_ip\"}"),
        2
    );
    // The bucket refills: one more attempt a little over a second later.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(code(&gw, &Connect::new(5, "burst-5")), 0);
    drop(gw);

    // Global: a burst of 2 over every address.
    let gw = Gateway::start(&format!(
        "{ANON}connect_rate_per_ip = 0\nconnect_rate_global = 1\nconnect_burst_global = 2\n"
    ));
    assert_eq!(code(&gw, &Connect::new(5, "g-0")), 0);
    assert_eq!(code(&gw, &Connect::new(5, "g-1")), 0);
    assert_eq!(code(&gw, &Connect::new(5, "g-2")), 0x9F);
    assert_eq!(code(&gw, &Connect::new(4, "g-3")), 3);
    assert_eq!(
        gw.metric("gateway_connack_refused_total{reason=\"connect_rate_global\"}"),
        2
    );
}

#[test]
fn authentication_runs_under_the_connect_timeout() {
    // A user whose hash is very expensive (t = 400 passes) and one hash slot: password
    // checks cannot finish within connect_timeout_secs (2 s in the harness), so every
    // CONNECT is answered at the deadline with 3 / 0x89 instead of waiting for argon2.
    let slow =
        "$argon2id$v=19$m=19456,t=400,p=1$c29tZXNhbHRzb21lc2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let gw = Gateway::start(&format!(
        "[auth]\nallow_anonymous = false\nmax_concurrent_hashes = 1\n\
         [[auth.users]]\nusername = \"slow\"\npassword_hash = \"{slow}\"\n"
    ));
    let addr = gw.mqtt();
    let clients: Vec<_> = [4u8, 5, 4]
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            std::thread::spawn(move || {
                let c = Connect::new(v, "slow").login("slow", &format!("guess-{i}"));
                (v, connack_code(&Raw::connect_with(addr, &c).1))
            })
        })
        .collect();
    for c in clients {
        let (v, code) = c.join().expect("client");
        assert_eq!(code, if v == 5 { 0x89 } else { 3 }, "version {v}");
    }
    assert_eq!(
        gw.metric("gateway_connack_refused_total{reason=\"auth_timeout\"}"),
        3
    );
    // Only one hash ran (the slot bound), and none finished.
    assert_eq!(
        gw.metric("gateway_auth_password_checks_total{result=\"wrong_password\"}"),
        0
    );
}

fn refuse_config() -> String {
    format!(
        "[kafka]\nunmatched = \"refuse\"\n\
         [[routes]]\nmqtt = \"vehicles/+/telemetry\"\nkafka_topic = \"vehicles.telemetry\"\n{ANON}"
    )
}

#[test]
fn an_unroutable_publish_is_never_acknowledged() {
    let mut gw = Gateway::start(&refuse_config());
    // 3.1.1 cannot be refused a QoS 1 PUBLISH: the connection is closed, no PUBACK.
    let (mut v4, rc) = Raw::mqtt311(gw.mqtt(), "lost-car", 30);
    assert_eq!(rc, 0);
    v4.publish311("vehicles/lost-car/diagnostics", 1, b"x")
        .expect("send");
    let (outcome, packets) = v4.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed);
    assert!(packets.iter().all(|p| p[0] != 0x40), "no PUBACK: {packets:?}");
    // MQTT 5: PUBACK 0x90, the connection stays.
    let (mut v5, rc) = Raw::mqtt5(gw.mqtt(), "lost-car-5", 30);
    assert_eq!(rc, 0);
    v5.send(&publish5(b"vehicles/lost-car-5/diagnostics", 1, None))
        .expect("send");
    let ack = v5.read_packet().expect("PUBACK");
    assert_eq!((ack[0], ack.get(4).copied()), (0x40, Some(0x90)), "{ack:?}");
    // A routed publish still works.
    v5.send(&publish5(b"vehicles/lost-car-5/telemetry", 2, None))
        .expect("send");
    let ack = v5.read_packet().expect("PUBACK");
    assert_eq!(ack, vec![0x40, 0x02, 0x00, 0x02], "success PUBACK");
    assert_eq!(gw.metric("gateway_messages_unrouted_total{qos=\"1\"}"), 2);
    assert_eq!(gw.metric("gateway_protocol_errors_total{reason=\"no_route\"}"), 1);
    drop(v5);
    assert!(gw.terminate(Duration::from_secs(10)));
    let records = Gateway::journal_records(gw.dir.path());
    assert_eq!(records.len(), 1, "only the routed publish is journaled");
    assert_eq!(records[0].entry.topic, "vehicles/lost-car-5/telemetry");
}

#[test]
fn an_unroutable_will_is_refused_at_connect_and_never_journaled() {
    let mut gw = Gateway::start(&refuse_config());
    let unroutable = |v: u8, id: &str| Connect::new(v, id).will(&format!("vehicles/{id}/status"), b"gone");
    assert_eq!(code(&gw, &unroutable(4, "will-4")), 5);
    assert_eq!(code(&gw, &unroutable(5, "will-5")), 0x90);
    assert_eq!(
        gw.metric("gateway_connack_refused_total{reason=\"will_unroutable\"}"),
        2
    );
    // A routable Will is accepted and journaled when the connection drops.
    let (raw, connack) = Raw::connect_with(
        gw.mqtt(),
        &Connect::new(5, "will-ok").will("vehicles/will-ok/telemetry", b"gone"),
    );
    assert_eq!(connack_code(&connack), 0);
    drop(raw);
    std::thread::sleep(Duration::from_millis(300));
    assert!(gw.terminate(Duration::from_secs(10)));
    let records = Gateway::journal_records(gw.dir.path());
    let topics: Vec<_> = records.iter().map(|r| r.entry.topic.as_str()).collect();
    assert_eq!(topics, ["vehicles/will-ok/telemetry"]);
}
