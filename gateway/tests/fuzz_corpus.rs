//! Replays the checked-in fuzz corpus on stable: every file of `fuzz/corpus/<target>/`
//! and `fuzz/regressions/<target>/` goes through the same target body the cargo-fuzz
//! target runs (`gateway::fuzzing`). A panic on any file fails the test, naming the file.
//!
//! `write_seeds` (ignored) regenerates `fuzz/seeds/<target>/`: real packets encoded by
//! rumqttc's client encoders (3.1.1 and 5.0), from which the corpus was grown and then
//! minimised with `cargo fuzz cmin` (see docs/FUZZING.md).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use gateway::mqtt::{Codec, Inbound, Version};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs `target` on every file in `dir`; fails listing the files that panicked.
fn replay(dir: &str, target: fn(&[u8])) {
    let dir = fuzz_dir().join(dir);
    let files = files(&dir);
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|f| {
            let data = std::fs::read(f).expect("read corpus file");
            catch_unwind(AssertUnwindSafe(|| target(&data))).is_err()
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} inputs panicked: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn mqtt_decode_corpus() {
    replay("corpus/mqtt_decode", gateway::fuzzing::mqtt_decode);
}

#[test]
fn connect_auth_corpus() {
    replay("corpus/connect_auth", gateway::fuzzing::connect_auth);
}

#[test]
fn seeds_replay_too() {
    replay("seeds/mqtt_decode", gateway::fuzzing::mqtt_decode);
    replay("seeds/connect_auth", gateway::fuzzing::connect_auth);
}

#[test]
fn seeds_are_the_packets_they_claim() {
    // The seed streams decode completely in their version: they are real packets, not noise.
    for (name, version, stream) in mqtt_seeds() {
        let codec = Codec::new(version, 1 << 20);
        let mut buf = BytesMut::from(&stream[..]);
        let mut n = 0;
        while !buf.is_empty() {
            match codec.decode(&mut buf) {
                Ok(Some(p)) => {
                    if n == 0 && !name.contains("mqtt31") {
                        assert!(matches!(p, Inbound::Connect(_)), "{name}: first packet {p:?}");
                    }
                    n += 1;
                }
                other => {
                    assert!(name.contains("mqtt31"), "{name}: packet {n} decodes as {other:?}");
                    break;
                }
            }
        }
    }
}

/// Regenerates `fuzz/seeds/`. Run: `cargo test -p gateway --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore = "writes fuzz/seeds/ (run by hand when the seed set changes)"]
fn write_seeds() {
    for target in ["mqtt_decode", "connect_auth"] {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (name, _, stream) in mqtt_seeds() {
            let mut data = stream.clone();
            if target == "connect_auth" {
                // After the CONNECT, connect_auth reads NUL-separated topics for the ACLs.
                data.truncate(connect_len(&stream));
                data.extend_from_slice(ACL_TOPICS);
            }
            std::fs::write(dir.join(name), data).expect("write seed");
        }
    }
}

const ACL_TOPICS: &[u8] = b"vehicles/vin-1/telemetry\0vehicles/vin-2/telemetry\0vehicles/vin-1/commands/#\0\
vehicles/vin-1\0vehicles/+/telemetry\0#\0$SYS/x\0vehicles/vin-1/commands\0vehicles/vin-10/x";

fn connect_len(stream: &[u8]) -> usize {
    match gateway::mqtt::codec::frame(stream, usize::MAX) {
        Ok(gateway::mqtt::Framing::Complete(n)) => n,
        other => panic!("seed does not start with a whole packet: {other:?}"),
    }
}

fn w<E: std::fmt::Debug, T>(r: Result<T, E>) {
    r.unwrap_or_else(|e| panic!("encode seed packet: {e:?}"));
}

/// Seed streams: (file name, version, bytes). Each starts with a CONNECT (except the
/// MQTT 3.1 one) followed by the packets a vehicle sends in that version.
fn mqtt_seeds() -> Vec<(&'static str, Version, Vec<u8>)> {
    use rumqttc::mqttbytes::{v4, QoS};
    use rumqttc::v5::mqttbytes::{v5, QoS as QoS5};

    let mut seeds = Vec::new();

    // 3.1.1
    let mut b = BytesMut::new();
    w(v4::Connect::new("vin-1").write(&mut b));
    seeds.push(("v4_connect_min", Version::V4, b.to_vec()));

    let mut b = BytesMut::new();
    let mut c = v4::Connect::new("vin-1");
    c.set_login("fleet", "s3cret");
    c.last_will = Some(v4::LastWill::new(
        "vehicles/vin-1/status",
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    c.keep_alive = 30;
    c.clean_session = false;
    w(c.write(&mut b));
    seeds.push(("v4_connect_will_login", Version::V4, b.to_vec()));

    let mut b = BytesMut::new();
    let mut c = v4::Connect::new("vin-2");
    c.set_login("fleet", "wrong");
    w(c.write(&mut b));
    seeds.push(("v4_connect_wrong_password", Version::V4, b.to_vec()));

    let mut b = BytesMut::new();
    w(v4::Connect::new("").write(&mut b));
    seeds.push(("v4_connect_empty_id", Version::V4, b.to_vec()));

    let mut b = BytesMut::new();
    w(v4::Connect::new("vin-1").write(&mut b));
    w(v4::Publish::new(
        "vehicles/vin-1/telemetry",
        QoS::AtMostOnce,
        &b"{\"speed\":42}"[..],
    )
    .write(&mut b));
    let mut p = v4::Publish::new("vehicles/vin-1/telemetry", QoS::AtLeastOnce, vec![7u8; 40]);
    p.pkid = 1;
    w(p.write(&mut b));
    let mut s = v4::Subscribe::new("vehicles/vin-1/commands/#", QoS::AtLeastOnce);
    s.pkid = 2;
    s.filters
        .push(v4::SubscribeFilter::new("vehicles/+/x".into(), QoS::AtMostOnce));
    w(s.write(&mut b));
    let mut u = v4::Unsubscribe::new("vehicles/vin-1/commands/#");
    u.pkid = 3;
    w(u.write(&mut b));
    w(v4::PubAck::new(9).write(&mut b));
    w(v4::PingReq.write(&mut b));
    w(v4::Disconnect.write(&mut b));
    seeds.push(("v4_session", Version::V4, b.to_vec()));

    // MQTT 3.1 (protocol name MQIsdp, level 3): sniffed as unsupported.
    let mut v3 = vec![0x10, 0x00, 0x00, 0x06];
    v3.extend_from_slice(b"MQIsdp");
    v3.extend_from_slice(&[3, 0x02, 0x00, 0x3c, 0x00, 0x05]);
    v3.extend_from_slice(b"vin-1");
    v3[1] = (v3.len() - 2) as u8;
    seeds.push(("v3_mqtt31_connect", Version::V4, v3));

    // 5.0
    let connect5 = |id: &str, props: Option<v5::ConnectProperties>| v5::Connect {
        keep_alive: 30,
        client_id: id.into(),
        clean_start: true,
        properties: props,
    };
    let mut b = BytesMut::new();
    w(connect5("vin-1", None).write(&None, &None, &mut b));
    seeds.push(("v5_connect_min", Version::V5, b.to_vec()));

    let mut props = v5::ConnectProperties::new();
    props.session_expiry_interval = Some(3600);
    props.receive_maximum = Some(20);
    props.max_packet_size = Some(4096);
    props.topic_alias_max = Some(10);
    props.request_response_info = Some(1);
    props.request_problem_info = Some(1);
    props.user_properties = vec![("fleet".into(), "eu-west".into()), ("fw".into(), "1.2.3".into())];
    let will_props = v5::LastWillProperties {
        delay_interval: Some(5),
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        content_type: Some("application/json".into()),
        response_topic: Some("vehicles/vin-1/replies".into()),
        correlation_data: Some(Bytes::from_static(b"corr")),
        user_properties: vec![("k".into(), "v".into())],
    };
    let will = Some(v5::LastWill::new(
        "vehicles/vin-1/status",
        "offline",
        QoS5::AtLeastOnce,
        true,
        Some(will_props),
    ));
    let login = Some(v5::Login::new("fleet", "s3cret"));
    let mut b = BytesMut::new();
    w(connect5("vin-1", Some(props)).write(&will, &login, &mut b));
    seeds.push(("v5_connect_props_will_login", Version::V5, b.to_vec()));

    let mut b = BytesMut::new();
    let will = Some(v5::LastWill::new(
        "vehicles/vin-2/status",
        "",
        QoS5::AtMostOnce,
        false,
        None,
    ));
    w(connect5("vin-1", None).write(&will, &None, &mut b));
    seeds.push(("v5_connect_foreign_will", Version::V5, b.to_vec()));

    let mut props = v5::ConnectProperties::new();
    props.authentication_method = Some("SCRAM-SHA-256".into());
    props.authentication_data = Some(Bytes::from_static(b"client-first"));
    let mut b = BytesMut::new();
    w(connect5("vin-1", Some(props)).write(&None, &None, &mut b));
    // AUTH continue (0x18) with method and data, then a bare AUTH.
    let method = b"SCRAM-SHA-256";
    let mut auth = vec![0x18];
    let mut props = vec![0x15, 0x00, method.len() as u8];
    props.extend_from_slice(method);
    props.extend_from_slice(&[0x16, 0x00, 0x04]);
    props.extend_from_slice(b"data");
    auth.push(props.len() as u8);
    auth.extend_from_slice(&props);
    b.extend_from_slice(&[0xF0, auth.len() as u8]);
    b.extend_from_slice(&auth);
    b.extend_from_slice(&[0xF0, 0x00]);
    seeds.push(("v5_connect_auth_method_then_auth", Version::V5, b.to_vec()));

    let mut b = BytesMut::new();
    w(connect5("vin-1", None).write(&None, &None, &mut b));
    let mut p = v5::Publish::new(
        "vehicles/vin-1/telemetry",
        QoS5::AtMostOnce,
        &b"{\"speed\":42}"[..],
        None,
    );
    p.properties = Some(v5::PublishProperties {
        topic_alias: Some(1),
        content_type: Some("application/json".into()),
        message_expiry_interval: Some(300),
        payload_format_indicator: Some(1),
        user_properties: vec![("trip".into(), "t-17".into()), ("seq".into(), "1".into())],
        ..Default::default()
    });
    w(p.write(&mut b));
    // QoS 1 by alias only: empty topic, alias 1.
    let mut p = v5::Publish::new("", QoS5::AtLeastOnce, vec![1u8; 30], None);
    p.pkid = 1;
    p.properties = Some(v5::PublishProperties {
        topic_alias: Some(1),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    });
    w(p.write(&mut b));
    let mut p = v5::Publish::new("vehicles/vin-1/telemetry", QoS5::AtLeastOnce, vec![2u8; 10], None);
    p.pkid = 2;
    p.dup = true;
    w(p.write(&mut b));
    let mut s = v5::Subscribe::new(
        v5::Filter::new("vehicles/vin-1/commands/#", QoS5::AtLeastOnce),
        None,
    );
    s.pkid = 3;
    s.properties = Some(v5::SubscribeProperties {
        id: Some(7),
        user_properties: vec![("a".into(), "b".into())],
    });
    s.filters.push(v5::Filter::new("vehicles/+/x", QoS5::AtMostOnce));
    w(s.write(&mut b));
    let mut u = v5::Unsubscribe::new("vehicles/vin-1/commands/#", None);
    u.pkid = 4;
    w(u.write(&mut b));
    w(v5::PubAck::new(5, None).write(&mut b));
    w(v5::PingReq::write(&mut b));
    // Zero-length DISCONNECT (reason 0 implied), as MQTT 5 allows.
    b.extend_from_slice(&[0xE0, 0x00]);
    seeds.push(("v5_session", Version::V5, b.to_vec()));

    let mut b = BytesMut::new();
    w(connect5("vin-1", None).write(&None, &None, &mut b));
    // DISCONNECT 0x04 (with will) and properties: session expiry, reason string, user
    // property (rumqttc does not export DisconnectProperties; encoded by hand).
    let mut props = vec![0x11, 0, 0, 0, 0, 0x1F, 0, 3];
    props.extend_from_slice(b"bye");
    props.extend_from_slice(&[0x26, 0, 1, b'k', 0, 1, b'v']);
    b.extend_from_slice(&[0xE0, (props.len() + 2) as u8, 0x04, props.len() as u8]);
    b.extend_from_slice(&props);
    seeds.push(("v5_disconnect_with_will", Version::V5, b.to_vec()));

    seeds
}
