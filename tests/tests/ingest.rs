//! Ingest against the real gateway process: rumqttc and mosquitto clients publish QoS 0
//! and 1, get their PUBACKs, and the messages are in the journal afterwards.

use std::time::Duration;

use integration::{run_cli, Gateway, ANON};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

async fn rumqttc_v4(addr: std::net::SocketAddr, id: &str, qos1: usize, qos0: usize) -> usize {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 200);
    let topic = format!("vehicles/{id}/telemetry");
    tokio::spawn(async move {
        for i in 0..qos1 {
            client
                .publish(&topic, QoS::AtLeastOnce, false, format!("{{\"seq\":{i}}}"))
                .await
                .expect("queue");
        }
        for i in 0..qos0 {
            client
                .publish(&topic, QoS::AtMostOnce, false, format!("{{\"q0\":{i}}}"))
                .await
                .expect("queue");
        }
    });
    let mut acks = 0;
    while acks < qos1 {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("v4 client error after {acks} acks: {e}"),
            Err(_) => panic!("v4 client: only {acks} of {qos1} PUBACKs"),
        }
    }
    // Let the QoS0 messages leave before the test stops the gateway.
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            let _ = el.poll().await;
        }
    })
    .await;
    acks
}

async fn rumqttc_v5(addr: std::net::SocketAddr, id: &str, qos1: usize) -> usize {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};
    let mut opts = O5::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = C5::new(opts, 200);
    let topic = format!("vehicles/{id}/telemetry");
    tokio::spawn(async move {
        for i in 0..qos1 {
            let props = PublishProperties {
                content_type: Some("application/json".into()),
                user_properties: vec![("fw".into(), "1.0".into())],
                ..Default::default()
            };
            client
                .publish_with_properties(&topic, Q5::AtLeastOnce, false, format!("{{\"seq\":{i}}}"), props)
                .await
                .expect("queue");
        }
    });
    let mut acks = 0;
    while acks < qos1 {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(E5::Incoming(P5::PubAck(ack)))) => {
                assert_eq!(ack.reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
                acks += 1
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("v5 client error after {acks} acks: {e}"),
            Err(_) => panic!("v5 client: only {acks} of {qos1} PUBACKs"),
        }
    }
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v4_and_v5_publish_and_messages_are_journaled() {
    let mut gw = Gateway::start(ANON);
    let addr = gw.mqtt();
    assert_eq!(rumqttc_v4(addr, "veh-v4", 200, 20).await, 200);
    assert_eq!(rumqttc_v5(addr, "veh-v5", 200).await, 200);
    assert!(gw.metric("gateway_pubacks_sent_total") >= 400);
    assert!(gw.terminate(Duration::from_secs(10)), "clean exit on SIGTERM");
    let records = Gateway::journal_records(gw.dir.path());
    let v4: Vec<_> = records.iter().filter(|r| r.entry.client_id == "veh-v4").collect();
    let v5: Vec<_> = records.iter().filter(|r| r.entry.client_id == "veh-v5").collect();
    assert_eq!(v4.iter().filter(|r| r.entry.qos == 1).count(), 200);
    assert_eq!(v4.iter().filter(|r| r.entry.qos == 0).count(), 20);
    assert_eq!(v5.len(), 200);
    // Per-vehicle order is journal order.
    for (i, r) in v4.iter().filter(|r| r.entry.qos == 1).enumerate() {
        assert_eq!(r.entry.payload, format!("{{\"seq\":{i}}}").as_bytes());
    }
    assert_eq!(v5[0].entry.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        v5[0].entry.user_properties,
        vec![("fw".to_string(), "1.0".to_string())]
    );
    assert_eq!(v5[0].entry.topic, "vehicles/veh-v5/telemetry");
}

#[test]
fn mosquitto_pub_and_sub_v311_and_v5() {
    let mut gw = Gateway::start(ANON);
    let port = gw.mqtt().port().to_string();
    for (version, qos) in [
        ("mqttv311", "1"),
        ("mqttv5", "1"),
        ("mqttv311", "0"),
        ("mqttv5", "0"),
    ] {
        let id = format!("mosq-{version}-{qos}");
        let topic = format!("vehicles/{id}/telemetry");
        let (code, out) = integration::mosquitto(
            "mosquitto_pub",
            &port,
            &[
                "-V",
                version,
                "-q",
                qos,
                "-i",
                &id,
                "-t",
                &topic,
                "-m",
                "{\"v\":1}",
                "-d",
            ],
        );
        assert_eq!(code, 0, "{version} q{qos}: {out}");
        if qos == "1" {
            assert!(out.contains("received PUBACK"), "{version}: {out}");
        }
    }
    // A vehicle subscribes to its command topic; a foreign filter is refused in the SUBACK.
    let (_, out) = integration::mosquitto(
        "mosquitto_sub",
        &port,
        &[
            "-V",
            "mqttv311",
            "-i",
            "car7",
            "-t",
            "vehicles/car7/commands/#",
            "-W",
            "1",
            "-d",
        ],
    );
    assert!(
        out.contains("received SUBACK") && out.contains("Subscribed (mid: 1): 0"),
        "{out}"
    );
    let (_, out) = integration::mosquitto(
        "mosquitto_sub",
        &port,
        &["-V", "mqttv5", "-i", "car7", "-t", "vehicles/#", "-W", "1", "-d"],
    );
    assert!(
        out.contains("received SUBACK") && out.contains("135"),
        "refused subscription: {out}"
    );
    // QoS 2 is accepted: PUBREC once the record is durable, PUBCOMP after PUBREL.
    let (code, out) = integration::mosquitto(
        "mosquitto_pub",
        &port,
        &[
            "-V",
            "mqttv5",
            "-q",
            "2",
            "-i",
            "q2",
            "-t",
            "vehicles/q2/t",
            "-m",
            "x",
            "-d",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("received PUBREC") && out.contains("received PUBCOMP"),
        "{out}"
    );
    assert!(gw.terminate(Duration::from_secs(10)));
    let records = Gateway::journal_records(gw.dir.path());
    assert_eq!(
        records
            .iter()
            .filter(|r| r.entry.client_id.starts_with("mosq-"))
            .count(),
        4
    );
    let q2: Vec<_> = records.iter().filter(|r| r.entry.client_id == "q2").collect();
    assert_eq!(q2.len(), 1, "the QoS 2 publish is journaled once");
    assert_eq!(q2[0].entry.qos, 2);
}

#[test]
fn acl_denial_v5_puback_0x87_and_v311_disconnect() {
    let gw = Gateway::start(ANON);
    let port = gw.mqtt().port().to_string();
    let (_, out) = integration::mosquitto(
        "mosquitto_pub",
        &port,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-i",
            "v1",
            "-t",
            "vehicles/v2/x",
            "-m",
            "x",
            "-d",
        ],
    );
    assert!(
        out.contains("RC:135"),
        "v5 PUBACK carries 0x87 Not authorized: {out}"
    );
    let (code, out) = integration::mosquitto(
        "mosquitto_pub",
        &port,
        &[
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-i",
            "v1",
            "-t",
            "vehicles/v2/x",
            "-m",
            "x",
        ],
    );
    assert_ne!(code, 0, "3.1.1 violator is disconnected: {out}");
    assert_eq!(gw.metric("gateway_acl_denied_total{qos=\"1\"}"), 2);
}

#[test]
fn password_users_are_checked_and_anonymous_refused() {
    let hash = std::process::Command::new(integration::gateway_bin())
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(b"s3cret")?;
            c.wait_with_output()
        })
        .expect("hash-password");
    let hash = String::from_utf8(hash.stdout).expect("utf8").trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let gw = Gateway::start(&format!(
        "[auth]\nallow_anonymous = false\n[[auth.users]]\nusername = \"bench\"\npassword_hash = \"{hash}\"\n\
         client_ids = [\"bench*\"]\n"
    ));
    let port = gw.mqtt().port().to_string();
    let publish = |version: &str, creds: &[&str]| {
        let mut args = vec![
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            version,
            "-q",
            "1",
            "-i",
            "bench1",
            "-t",
            "vehicles/bench1/t",
            "-m",
            "x",
            "-d",
        ];
        args.extend_from_slice(creds);
        run_cli("mosquitto_pub", &args)
    };
    let (code, out) = publish("mqttv311", &["-u", "bench", "-P", "s3cret"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("received PUBACK"), "{out}");
    let (_, out) = publish("mqttv311", &["-u", "bench", "-P", "wrong"]);
    assert!(out.contains("CONNACK (4)"), "3.1.1 bad credentials = 4: {out}");
    let (_, out) = publish("mqttv5", &["-u", "bench", "-P", "wrong"]);
    assert!(out.contains("CONNACK (134)"), "5.0 bad credentials = 0x86: {out}");
    let (_, out) = publish("mqttv311", &[]);
    assert!(out.contains("CONNACK (5)"), "anonymous not authorised = 5: {out}");
    assert_eq!(
        gw.metric("gateway_connack_refused_total{reason=\"bad_credentials\"}"),
        2
    );
    // The right password under an id outside the user's client_ids: not authorised.
    let (code, out) = run_cli(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-i",
            "car9",
            "-t",
            "vehicles/car9/t",
            "-m",
            "x",
            "-u",
            "bench",
            "-P",
            "s3cret",
            "-d",
        ],
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("CONNACK (5)"), "3.1.1 not authorised = 5: {out}");
}

#[test]
fn pipelined_v311_vehicles_beyond_the_inflight_bound_all_get_pubacks() {
    // Each vehicle writes 1,000 QoS1 publishes without waiting: far beyond
    // mqtt.max_inflight, so the gateway pauses reading and must resume from what it
    // already buffered once PUBACKs free room (a regression: it once waited for new bytes).
    let gw = Gateway::start(ANON);
    let streams: Vec<_> = (0..10)
        .map(|v| integration::Stream::start(gw.mqtt(), &format!("pipe-{v}"), 1000, Duration::ZERO))
        .collect();
    for s in &streams {
        assert!(
            s.wait_acked(1000, Duration::from_secs(30)),
            "only {} PUBACKs",
            s.acked()
        );
    }
    assert_eq!(gw.metric("gateway_pubacks_sent_total"), 10_000);
    for s in streams {
        s.finish();
    }
}

#[test]
fn a_burst_sent_in_one_write_is_fully_acknowledged_under_a_tiny_inflight_bound() {
    // 200 QoS1 publishes in one write, then silence: with max_inflight 2 the gateway
    // must work through its own buffer as PUBACKs free room.
    let gw = Gateway::start_env(ANON, &[("GATEWAY_MQTT__MAX_INFLIGHT", "2")]);
    let (mut raw, code) = integration::raw::Raw::mqtt311(gw.mqtt(), "burst", 0);
    assert_eq!(code, 0);
    let mut burst = bytes::BytesMut::new();
    for pkid in 1..=200u16 {
        let mut p = rumqttc::Publish::new("vehicles/burst/t", QoS::AtLeastOnce, vec![b'x'; 10]);
        p.pkid = pkid;
        p.write(&mut burst).expect("encode");
    }
    raw.send(&burst).expect("send");
    let acks: Vec<u16> = (0..200)
        .map_while(|_| raw.read_packet())
        .map(|p| u16::from_be_bytes([p[2], p[3]]))
        .collect();
    assert_eq!(acks, (1..=200).collect::<Vec<_>>(), "all PUBACKs, in order");
}
