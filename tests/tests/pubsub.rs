//! Publish/subscribe through the real gateway: a persistent session and its queue survive
//! SIGKILL, a QoS 2 PUBLISH re-sent after a crash reaches Kafka once, a subscriber that
//! never reads costs bounded memory (drops counted) without starving the others,
//! mosquitto_pub → mosquitto_sub (3.1.1, 5.0, retained), and the vehicle subscribe ACL.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration::kafka::Kafka;
use integration::mqtt_raw2::{
    ack, connect311, metric_sum, parse_publish, publish, rss_bytes, subscribe311, PUBACK, PUBCOMP, PUBREC,
    PUBREL,
};
use integration::raw::{suback_codes, subscribe, Connect, Raw};
use integration::{kafka_config, mosquitto, Gateway};

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

/// Anonymous vehicles under the default ACL (publish `vehicles/{client_id}/#`, subscribe
/// `vehicles/{client_id}/commands/#`) plus an operator user (password "pw", client ids
/// `operator-*`) that may publish any vehicle's commands and retained messages.
fn vehicles_and_operator() -> String {
    format!(
        "[auth]\nallow_anonymous = true\n\
         [[auth.users]]\nusername = \"operator\"\npassword_hash = \"{}\"\nclient_ids = [\"operator-*\"]\n\
         publish_acl = [\"vehicles/+/commands/#\"]\nsubscribe_acl = [\"vehicles/#\"]\nallow_retain = true\n",
        hash("pw")
    )
}

/// The operator publishes `count` QoS 1 messages (payload = the number) with rumqttc and
/// returns how many were PUBACKed.
fn operator_publish(addr: SocketAddr, topic: &str, count: usize) -> usize {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut opts = MqttOptions::new("operator-1", addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_credentials("operator", "pw");
        let (client, mut el) = AsyncClient::new(opts, count + 10);
        let topic = topic.to_string();
        tokio::spawn(async move {
            for n in 0..count {
                client
                    .publish(&topic, QoS::AtLeastOnce, false, n.to_string())
                    .await
                    .expect("queue");
            }
        });
        let mut acks = 0;
        while acks < count {
            match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("operator: error after {acks} PUBACKs: {e}"),
                Err(_) => break,
            }
        }
        acks
    })
}

/// SUBSCRIBE and the SUBACK's return codes (3.1.1).
fn subscribe_codes(raw: &mut Raw, filters: &[(&str, u8)]) -> Vec<u8> {
    raw.send(&subscribe311(1, filters)).expect("subscribe");
    loop {
        match raw.read_packet() {
            Some(p) if p[0] == 0x90 => return suback_codes(4, &p),
            Some(_) => continue,
            None => return Vec::new(),
        }
    }
}

#[test]
fn persistent_session_and_its_queue_survive_sigkill() {
    let gw = Gateway::start(&vehicles_and_operator());
    let (mut veh, connack) = connect311(gw.mqtt(), "veh-1", false);
    assert_eq!(connack.code, 0, "{}", gw.log());
    assert_eq!(
        subscribe_codes(&mut veh, &[("vehicles/veh-1/commands/#", 1)]),
        vec![1]
    );
    veh.send(&[0xE0, 0x00]).expect("disconnect");
    drop(veh);

    assert_eq!(
        operator_publish(gw.mqtt(), "vehicles/veh-1/commands/x", 100),
        100,
        "every command PUBACKed"
    );
    let (dir, config) = gw.kill9();
    let gw = Gateway::start_in(dir, config);

    let (mut veh, connack) = connect311(gw.mqtt(), "veh-1", false);
    assert_eq!(connack.code, 0);
    assert!(connack.session_present, "session present after SIGKILL");
    // No gaps, in order; a repeat is allowed only as a redelivery (DUP set).
    let mut next = 0usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next < 100 && Instant::now() < deadline {
        let Some(packet) = veh.read_packet() else {
            continue;
        };
        let Some(p) = parse_publish(&packet) else {
            continue;
        };
        assert_eq!(p.topic, "vehicles/veh-1/commands/x");
        assert_eq!(p.qos, 1, "granted QoS 1");
        veh.send(&ack(PUBACK, p.pkid)).expect("puback");
        let n: usize = String::from_utf8_lossy(&p.payload).parse().expect("number");
        assert!(n <= next, "gap: got {n}, expected {next}");
        if n == next {
            next += 1;
        } else {
            assert!(p.dup, "{n} repeated without DUP (expected {next})");
        }
    }
    assert_eq!(next, 100, "only {next} of 100 queued commands arrived");
    assert!(metric_sum(&gw.metrics(), "gateway_sessions_persistent") >= 1.0);
}

/// Waits until the bridge has released everything the journal made durable.
fn wait_drained(gw: &Gateway, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let m = gw.metrics();
        let durable = metric_sum(&m, "gateway_journal_durable_seq");
        if durable > 0.0 && metric_sum(&m, "gateway_journal_released_seq") == durable {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn qos2_publish_resent_after_sigkill_reaches_kafka_once() {
    let kafka = Kafka::start();
    kafka.create_topic("telemetry", 1);
    let gw = Gateway::start(&kafka_config(&kafka.bootstrap(), "telemetry"));
    let topic = "vehicles/q2-car/telemetry";
    let payload = format!("exactly-once-{}", std::process::id());

    let (mut car, connack) = connect311(gw.mqtt(), "q2-car", false);
    assert_eq!(connack.code, 0);
    car.send(&publish(topic, 2, 7, false, false, payload.as_bytes()))
        .expect("publish");
    assert_eq!(car.read_packet(), Some(ack(PUBREC, 7)), "PUBREC 7");
    // No PUBREL: the gateway holds the packet id. Let the bridge deliver what it has, so
    // that only the QoS 2 state decides whether a second record appears.
    assert!(wait_drained(&gw, Duration::from_secs(30)), "{}", gw.metrics());
    // The release watermark is checkpointed every 200 ms; past it, a restart does not
    // replay the record (a replay would repeat its gateway.seq, see the check below).
    std::thread::sleep(Duration::from_secs(1));
    drop(car);
    let (dir, config) = gw.kill9();
    let gw = Gateway::start_in(dir, config);

    let (mut car, connack) = connect311(gw.mqtt(), "q2-car", false);
    assert_eq!(connack.code, 0);
    assert!(connack.session_present, "QoS 2 state is session state");
    car.send(&publish(topic, 2, 7, true, false, payload.as_bytes()))
        .expect("re-send");
    assert_eq!(car.read_packet(), Some(ack(PUBREC, 7)), "PUBREC for the DUP");
    car.send(&ack(PUBREL, 7)).expect("pubrel");
    assert_eq!(car.read_packet(), Some(ack(PUBCOMP, 7)), "PUBCOMP 7");
    assert!(wait_drained(&gw, Duration::from_secs(30)), "{}", gw.metrics());

    let records = kafka.consume_all("telemetry", 1, Duration::from_secs(30));
    let ours: Vec<_> = records.iter().filter(|r| r.payload == payload).collect();
    // Journaled once: one gateway.seq. (A bridge replay after a crash may repeat a record
    // with the same journal id and seq; consumers dedupe on that pair — README.)
    let mut seqs: Vec<&str> = ours
        .iter()
        .flat_map(|r| {
            r.headers
                .iter()
                .filter(|(k, _)| k == "gateway.seq")
                .map(|(_, v)| v.as_str())
        })
        .collect();
    seqs.dedup();
    assert_eq!(seqs.len(), 1, "journaled more than once: {records:?}");
    assert_eq!(ours.len(), 1, "records with the payload in Kafka: {records:?}");
}

#[test]
fn a_subscriber_that_never_reads_costs_bounded_memory() {
    let gw = Gateway::start_env(
        "[auth]\nallow_anonymous = true\npublish_acl = [\"#\"]\nsubscribe_acl = [\"#\"]\n\
         [sessions]\nmax_outbound_qos0 = 1000\nmax_queued_messages = 1000\nmax_queued_bytes = 4194304\n",
        &[("GATEWAY_MQTT__MAX_PUBLISH_RATE", "0")],
    );
    let topic = "load/broadcast";
    // Two stuck subscribers: QoS 0 and QoS 1. They read their SUBACK, then never again.
    let mut stuck = Vec::new();
    for (id, qos) in [("stuck-0", 0u8), ("stuck-1", 1u8)] {
        let (mut raw, connack) = connect311(gw.mqtt(), id, true);
        assert_eq!(connack.code, 0);
        assert_eq!(subscribe_codes(&mut raw, &[(topic, qos)]), vec![qos]);
        stuck.push(raw);
    }
    // A healthy subscriber reads and acknowledges everything.
    let (mut healthy, connack) = connect311(gw.mqtt(), "healthy", true);
    assert_eq!(connack.code, 0);
    assert_eq!(subscribe_codes(&mut healthy, &[(topic, 1)]), vec![1]);
    let received = Arc::new(AtomicUsize::new(0));
    let saw_end = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut writer = healthy.split();
        let (received, saw_end) = (received.clone(), saw_end.clone());
        healthy.stream.set_read_timeout(None).expect("blocking");
        std::thread::spawn(move || {
            while let Some(packet) = healthy.read_packet() {
                if let Some(p) = parse_publish(&packet) {
                    if p.qos == 1 && writer.send(&ack(PUBACK, p.pkid)).is_err() {
                        return;
                    }
                    if p.payload == b"END" {
                        saw_end.store(true, Ordering::Relaxed);
                        return;
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let baseline = rss_bytes(gw.pid());
    let (mut publisher, connack) = connect311(gw.mqtt(), "flooder", true);
    assert_eq!(connack.code, 0);
    let mut acks = publisher.split();
    acks.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let acked = Arc::new(AtomicUsize::new(0));
    let counter = acked.clone();
    let ack_reader = std::thread::spawn(move || {
        while let Some(p) = acks.read_packet() {
            if p[0] == PUBACK {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let total = 20_000usize;
    let payload = integration::incompressible(1024);
    let writer = std::thread::spawn(move || {
        for n in 0..total {
            let pkid = (n % 65_535) as u16 + 1;
            publisher
                .send(&publish(topic, 1, pkid, false, false, payload.as_bytes()))
                .expect("publish");
        }
        publisher
    });
    let mut peak = baseline;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        peak = peak.max(rss_bytes(gw.pid()));
        std::thread::sleep(Duration::from_millis(50));
    }
    peak = peak.max(rss_bytes(gw.pid()));
    assert_eq!(
        acked.load(Ordering::Relaxed),
        total,
        "the flood was not acknowledged: stuck subscribers must not stop publishers"
    );
    let mut publisher = writer.join().expect("writer");
    let bound = baseline + 64 * 1024 * 1024;
    assert!(
        peak < bound,
        "RSS peaked at {} MiB (baseline {} MiB)",
        peak >> 20,
        baseline >> 20
    );
    assert!(
        metric_sum(&gw.metrics(), "gateway_messages_dropped_total") > 0.0,
        "drops for the stuck subscribers are counted:\n{}",
        gw.metrics()
    );
    // The healthy subscriber still gets messages, the last one included.
    publisher
        .send(&publish(topic, 1, 1, false, false, b"END"))
        .expect("end");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !saw_end.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        saw_end.load(Ordering::Relaxed),
        "healthy subscriber got {} messages and not the last",
        received.load(Ordering::Relaxed)
    );
    assert!(received.load(Ordering::Relaxed) > 0);
    assert!(metric_sum(&gw.metrics(), "gateway_messages_delivered_total") > 0.0);
    drop(stuck);
    drop(publisher);
    let _ = reader.join();
    let _ = ack_reader.join();
}

/// Starts mosquitto_sub in the background; its output is returned by `wait_with_output`.
fn mosquitto_sub_bg(port: &str, args: &[&str]) -> std::process::Child {
    std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", port])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (the test set-up installs mosquitto-clients)")
}

#[test]
fn mosquitto_pub_to_mosquitto_sub_through_the_gateway() {
    let gw = Gateway::start(&vehicles_and_operator());
    let port = gw.mqtt().port().to_string();
    for (version, id) in [("mqttv311", "veh-m4"), ("mqttv5", "veh-m5")] {
        let filter = format!("vehicles/{id}/commands/#");
        let topic = format!("vehicles/{id}/commands/hello");
        let sub = mosquitto_sub_bg(
            &port,
            &[
                "-V", version, "-i", id, "-t", &filter, "-q", "1", "-C", "1", "-W", "10", "-v",
            ],
        );
        std::thread::sleep(Duration::from_millis(700));
        let (code, out) = mosquitto(
            "mosquitto_pub",
            &port,
            &[
                "-V",
                version,
                "-i",
                "operator-pub",
                "-u",
                "operator",
                "-P",
                "pw",
                "-t",
                &topic,
                "-q",
                "1",
                "-m",
                "hi there",
            ],
        );
        assert_eq!(code, 0, "mosquitto_pub {version}: {out}");
        let out = sub.wait_with_output().expect("mosquitto_sub");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "mosquitto_sub {version}: {text} {:?}",
            out.stderr
        );
        assert_eq!(text.trim(), format!("{topic} hi there"), "{version}");
    }
    // A retained message reaches a subscriber that comes later.
    let topic = "vehicles/veh-r/commands/config";
    let (code, out) = mosquitto(
        "mosquitto_pub",
        &port,
        &[
            "-i",
            "operator-ret",
            "-u",
            "operator",
            "-P",
            "pw",
            "-t",
            topic,
            "-q",
            "1",
            "-r",
            "-m",
            "mode=eco",
        ],
    );
    assert_eq!(code, 0, "retained publish: {out}");
    for version in ["mqttv311", "mqttv5"] {
        let (code, out) = mosquitto(
            "mosquitto_sub",
            &port,
            &[
                "-V",
                version,
                "-i",
                "veh-r",
                "-t",
                "vehicles/veh-r/commands/#",
                "-C",
                "1",
                "-W",
                "5",
                "-v",
            ],
        );
        assert_eq!(code, 0, "retained to a later subscriber ({version}): {out}");
        assert_eq!(out.trim(), format!("{topic} mode=eco"));
    }
    assert!(metric_sum(&gw.metrics(), "gateway_retained_messages") >= 1.0);
    // An empty retained payload deletes it: a later subscriber gets nothing.
    let (code, _) = mosquitto(
        "mosquitto_pub",
        &port,
        &[
            "-i",
            "operator-ret",
            "-u",
            "operator",
            "-P",
            "pw",
            "-t",
            topic,
            "-r",
            "-n",
        ],
    );
    assert_eq!(code, 0);
    let (_, out) = mosquitto(
        "mosquitto_sub",
        &port,
        &[
            "-i",
            "veh-r",
            "-t",
            "vehicles/veh-r/commands/#",
            "-C",
            "1",
            "-W",
            "2",
            "-v",
        ],
    );
    assert!(
        !out.contains("mode=eco"),
        "deleted retained message delivered: {out}"
    );
}

#[test]
fn a_vehicle_cannot_subscribe_beyond_its_own_commands() {
    let gw = Gateway::start(&vehicles_and_operator());
    // 3.1.1: failure is 0x80.
    let (mut veh, connack) = connect311(gw.mqtt(), "veh-2", true);
    assert_eq!(connack.code, 0);
    for filter in [
        "vehicles/#",
        "#",
        "vehicles/veh-3/commands/#",
        "vehicles/+/commands/#",
    ] {
        assert_eq!(subscribe_codes(&mut veh, &[(filter, 1)]), vec![0x80], "{filter}");
    }
    assert_eq!(
        subscribe_codes(&mut veh, &[("vehicles/veh-2/commands/#", 1)]),
        vec![1]
    );
    // MQTT 5: a failure code (0x87 Not authorized expected).
    let (mut veh5, connack) = Raw::connect_with(gw.mqtt(), &Connect::new(5, "veh-5"));
    assert_eq!(integration::raw::connack_code(&connack), 0);
    veh5.send(&subscribe(5, 1, &["vehicles/#".into(), "#".into()]))
        .expect("subscribe");
    let suback = veh5.read_packet().expect("SUBACK");
    assert_eq!(suback[0], 0x90);
    let codes = suback_codes(5, &suback);
    assert_eq!(codes.len(), 2);
    assert!(codes.iter().all(|c| *c >= 0x80), "{codes:?}");

    // veh-3's commands reach veh-3 and nobody else.
    let (mut veh3, connack) = connect311(gw.mqtt(), "veh-3", true);
    assert_eq!(connack.code, 0);
    assert_eq!(
        subscribe_codes(&mut veh3, &[("vehicles/veh-3/commands/#", 1)]),
        vec![1]
    );
    assert_eq!(
        operator_publish(gw.mqtt(), "vehicles/veh-3/commands/unlock", 1),
        1
    );
    let got = veh3
        .read_packet()
        .and_then(|p| parse_publish(&p))
        .expect("veh-3 command");
    assert_eq!(got.topic, "vehicles/veh-3/commands/unlock");
    veh.stream
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let leaked: BTreeSet<String> = std::iter::from_fn(|| veh.read_packet())
        .filter_map(|p| parse_publish(&p))
        .map(|p| p.topic)
        .collect();
    assert!(
        leaked.is_empty(),
        "veh-2 read another vehicle's commands: {leaked:?}"
    );
}
