//! Two gateways of one region against one real Kafka (README, "Many gateways in a
//! region"): a command reaches the vehicle on whichever gateway holds it, exactly once,
//! with one outcome; a vehicle that moves from A to B takes its queued commands along; a
//! gateway killed and started again tells the region what it no longer holds.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use integration::kafka::{Consumed, Kafka};
use integration::mqtt_raw2::{ack, connect311, parse_publish, subscribe311, PUBACK};
use integration::raw::Raw;
use integration::Gateway;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const COMMANDS: &str = "region.commands";
const OUTCOMES: &str = "region.outcomes";
const PRESENCE: &str = "region.presence";

fn extra(kafka: &Kafka, reporter: bool) -> String {
    format!(
        "[kafka]\nbootstrap = \"{}\"\nlinger_ms = 1\ndead_letter_topic = \"\"\n\
         [commands]\nkafka_topic = \"{COMMANDS}\"\noutcome_topic = \"{OUTCOMES}\"\n\
         many_gateways = true\nreport_unknown = {reporter}\n\
         [auth]\nallow_anonymous = true\n",
        kafka.bootstrap()
    )
}

fn gateway(kafka: &Kafka, id: &str, reporter: bool) -> Gateway {
    let extra = extra(kafka, reporter);
    // The harness writes its own [gateway] table: the id comes from the environment.
    // The harness turns presence off: these gateways need it.
    Gateway::start_env(
        &extra,
        &[
            ("GATEWAY_GATEWAY__ID", id),
            ("GATEWAY_PRESENCE__ENABLED", "true"),
            ("GATEWAY_PRESENCE__KAFKA_TOPIC", PRESENCE),
        ],
    )
}

/// As [`gateway`], with every setting in its config file: `Gateway::start_in` restarts a
/// gateway on its directory without the environment, as the same gateway.
fn restartable_gateway(kafka: &Kafka, id: &str, reporter: bool) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let harness = integration::config(&dir.path().join("journal"), &extra(kafka, reporter));
    let config = harness
        .replace("[gateway]\n", &format!("[gateway]\nid = \"{id}\"\n"))
        .replace(
            "[presence]\nenabled = false\n",
            &format!("[presence]\nenabled = true\nkafka_topic = \"{PRESENCE}\"\n"),
        );
    assert!(
        config.contains(&format!("id = \"{id}\"")) && config.contains("enabled = true"),
        "the harness config changed: {harness}"
    );
    std::fs::write(&path, config).unwrap();
    Gateway::start_in(dir, path)
}

fn produce(kafka: &Kafka, client_id: &str, payload: &str) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()
        .unwrap();
    let headers = OwnedHeaders::new().insert(Header {
        key: "qos",
        value: Some("1"),
    });
    p.send(
        BaseRecord::to(COMMANDS)
            .key(client_id)
            .payload(payload)
            .headers(headers),
    )
    .map_err(|(e, _)| e)
    .unwrap();
    p.flush(Duration::from_secs(10)).unwrap();
}

/// A 3.1.1 vehicle subscribed to its command topic at QoS 1.
fn vehicle(gw: &Gateway, id: &str, clean: bool) -> Raw {
    let (mut v, connack) = connect311(gw.mqtt(), id, clean);
    assert_eq!(connack.code, 0, "{}", gw.log());
    v.send(&subscribe311(1, &[(&format!("vehicles/{id}/commands"), 1)]))
        .unwrap();
    loop {
        let p = v.read_packet().expect("SUBACK");
        if p[0] == 0x90 {
            return v;
        }
    }
}

/// Payloads the vehicle receives within `within` (each PUBACKed).
fn receive(v: &mut Raw, within: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let Some(p) = v.read_packet() else {
            continue;
        };
        if let Some(publish) = parse_publish(&p) {
            v.send(&ack(PUBACK, publish.pkid)).unwrap();
            got.push(String::from_utf8_lossy(&publish.payload).into_owned());
        }
    }
    got
}

fn field<'a>(r: &'a Consumed, name: &str) -> Option<&'a str> {
    let needle = format!("\"{name}\":\"");
    let start = r.payload.find(&needle)? + needle.len();
    let end = r.payload[start..].find('"')? + start;
    Some(&r.payload[start..end])
}

fn outcomes(kafka: &Kafka, client_id: &str) -> Vec<(String, String, String)> {
    kafka
        .consume_all(OUTCOMES, 1, Duration::from_secs(3))
        .into_iter()
        .filter(|r| r.key == client_id)
        .map(|r| {
            (
                field(&r, "command_id").unwrap_or_default().to_string(),
                field(&r, "outcome").unwrap_or_default().to_string(),
                field(&r, "gateway_id").unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits (at most 15 s) until a presence record contains every one of `needles`, then
/// gives the reporter a moment to read it. Returns without it (the test's assertions
/// then tell what went wrong).
fn await_presence(kafka: &Kafka, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline
        && !kafka
            .consume_all(PRESENCE, 1, Duration::from_secs(3))
            .iter()
            .any(|r| needles.iter().all(|n| r.payload.contains(n)))
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));
}

fn topics(kafka: &Kafka) {
    kafka.create_topic(COMMANDS, 2);
    kafka.create_topic(OUTCOMES, 1);
    kafka.create_topic(PRESENCE, 1);
}

#[test]
fn a_vehicle_on_gateway_b_gets_its_command_once_and_only_the_reporter_says_unknown() {
    let kafka = Kafka::start();
    topics(&kafka);
    let a = gateway(&kafka, "gw-a", true);
    let b = gateway(&kafka, "gw-b", false);
    let mut v = vehicle(&b, "VIN-B1", true);
    // Let A learn from the presence topic that B holds VIN-B1.
    std::thread::sleep(Duration::from_secs(2));
    produce(&kafka, "VIN-B1", "unlock");
    produce(&kafka, "VIN-NOBODY", "climate");
    let got = receive(&mut v, Duration::from_secs(5));
    assert_eq!(got, vec!["unlock".to_string()], "{}\n{}", a.log(), b.log());
    let held = outcomes(&kafka, "VIN-B1");
    assert_eq!(held.len(), 1, "one outcome: {held:?}");
    assert_eq!((held[0].1.as_str(), held[0].2.as_str()), ("delivered", "gw-b"));
    let nobody = outcomes(&kafka, "VIN-NOBODY");
    assert_eq!(nobody.len(), 1, "one outcome: {nobody:?}");
    assert_eq!(
        (nobody[0].1.as_str(), nobody[0].2.as_str()),
        ("unknown_vehicle", "gw-a")
    );
}

#[test]
fn queued_commands_follow_a_vehicle_that_moves_from_a_to_b() {
    let kafka = Kafka::start();
    topics(&kafka);
    let a = gateway(&kafka, "gw-a", true);
    let b = gateway(&kafka, "gw-b", false);
    // A persistent session on A, then the vehicle goes offline.
    let mut v = vehicle(&a, "VIN-M1", false);
    v.send(&[0xE0, 0x00]).unwrap();
    drop(v);
    std::thread::sleep(Duration::from_millis(300));
    for n in 1..=3 {
        produce(&kafka, "VIN-M1", &format!("cmd-{n}"));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while outcomes(&kafka, "VIN-M1").len() < 3 && Instant::now() < deadline {}
    let queued = outcomes(&kafka, "VIN-M1");
    assert!(
        queued.iter().all(|(_, o, g)| o == "queued" && g == "gw-a") && queued.len() == 3,
        "{queued:?}\n{}",
        a.log()
    );
    // The vehicle comes back through the load balancer, on B this time.
    let mut v = vehicle(&b, "VIN-M1", false);
    let got = receive(&mut v, Duration::from_secs(10));
    assert_eq!(got, vec!["cmd-1", "cmd-2", "cmd-3"], "{}\n{}", a.log(), b.log());
    // Each command: queued on A, then delivered on B, under the same id.
    let all = outcomes(&kafka, "VIN-M1");
    for (id, _, _) in &queued {
        let finals: Vec<_> = all.iter().filter(|(i, o, _)| i == id && o != "queued").collect();
        assert_eq!(finals.len(), 1, "{id}: {all:?}");
        assert_eq!(
            (finals[0].1.as_str(), finals[0].2.as_str()),
            ("delivered", "gw-b")
        );
    }
    assert!(
        a.log().contains("session moved to another gateway"),
        "{}",
        a.log()
    );
}

#[test]
fn a_gateway_killed_and_started_again_leaves_no_vehicle_held_there_for_ever() {
    let kafka = Kafka::start();
    topics(&kafka);
    let a = restartable_gateway(&kafka, "gw-a", false);
    let b = gateway(&kafka, "gw-b", true);
    // A clean session on A: gone with A's process.
    let mut v = vehicle(&a, "VIN-K1", true);
    std::thread::sleep(Duration::from_secs(2));
    // The reporter knows A holds the vehicle: A delivers, B stays silent.
    produce(&kafka, "VIN-K1", "before");
    assert_eq!(
        receive(&mut v, Duration::from_secs(5)),
        vec!["before"],
        "{}",
        a.log()
    );
    let before = outcomes(&kafka, "VIN-K1");
    assert_eq!(before.len(), 1, "one outcome: {before:?}\n{}", b.log());
    assert_eq!(
        (before[0].1.as_str(), before[0].2.as_str()),
        ("delivered", "gw-a")
    );

    // SIGKILL: A journals no `disconnected` for the vehicle. Then A starts again.
    let (dir, config) = a.kill9();
    drop(v);
    let a = Gateway::start_in(dir, config);
    await_presence(&kafka, &["\"gateway_started\"", "\"gw-a\""]);

    // Nobody holds the vehicle now: the reporter says so, once. (Before A journaled its
    // start, B took the vehicle for held by A for ever, and the command had no outcome.)
    produce(&kafka, "VIN-K1", "after");
    let deadline = Instant::now() + Duration::from_secs(15);
    while outcomes(&kafka, "VIN-K1").len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let all = outcomes(&kafka, "VIN-K1");
    let after: Vec<_> = all.iter().filter(|o| o.0 != before[0].0).collect();
    assert_eq!(after.len(), 1, "one outcome: {all:?}\n{}\n{}", a.log(), b.log());
    assert_eq!(
        (after[0].1.as_str(), after[0].2.as_str()),
        ("unknown_vehicle", "gw-b"),
        "{all:?}"
    );
}

#[test]
fn a_persistent_session_restored_after_a_kill_stays_held_there() {
    let kafka = Kafka::start();
    topics(&kafka);
    let a = restartable_gateway(&kafka, "gw-a", false);
    let b = gateway(&kafka, "gw-b", true);
    // A persistent session on A, online when A is killed.
    let v = vehicle(&a, "VIN-P1", false);
    std::thread::sleep(Duration::from_secs(2));
    let (dir, config) = a.kill9();
    drop(v);
    let a = Gateway::start_in(dir, config);
    // A's start voids what it held before and announces the session it restored.
    await_presence(&kafka, &["\"gateway_restarted\"", "\"VIN-P1\""]);
    await_presence(&kafka, &["\"gateway_started\"", "\"gw-a\""]);
    produce(&kafka, "VIN-P1", "after");
    let deadline = Instant::now() + Duration::from_secs(15);
    while outcomes(&kafka, "VIN-P1").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    // Queued in A's restored session; the reporter does not call the vehicle unknown.
    let queued = outcomes(&kafka, "VIN-P1");
    assert_eq!(
        queued.len(),
        1,
        "one outcome: {queued:?}\n{}\n{}",
        a.log(),
        b.log()
    );
    assert_eq!((queued[0].1.as_str(), queued[0].2.as_str()), ("queued", "gw-a"));
    // The vehicle comes back to A and gets it (its session is subscribed already).
    let (mut v, connack) = connect311(a.mqtt(), "VIN-P1", false);
    assert_eq!(connack.code, 0, "{}", a.log());
    assert_eq!(
        receive(&mut v, Duration::from_secs(5)),
        vec!["after"],
        "{}",
        a.log()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while outcomes(&kafka, "VIN-P1").len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = outcomes(&kafka, "VIN-P1");
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(
        (all[1].1.as_str(), all[1].2.as_str()),
        ("delivered", "gw-a"),
        "{all:?}"
    );
}

/// The race CI met: the vehicle moved to B before B's consumer reached the commands A
/// had queued for it. B then delivers those records itself, and A hands the same
/// commands over as copies (other offsets, the original ids); whichever of the two
/// reaches B second must not reach the vehicle again.
#[test]
fn commands_b_reads_late_reach_the_vehicle_that_moved_there_once() {
    let kafka = Kafka::start();
    topics(&kafka);
    let a = gateway(&kafka, "gw-a", true);
    let mut b = restartable_gateway(&kafka, "gw-b", false);
    let mut v = vehicle(&a, "VIN-L1", false);
    v.send(&[0xE0, 0x00]).unwrap();
    drop(v);
    // B is away (a clean stop: it leaves its consumer group) while A queues.
    assert!(b.terminate(Duration::from_secs(20)), "{}", b.log());
    let (dir, config) = b.kill9();
    for n in 1..=3 {
        produce(&kafka, "VIN-L1", &format!("cmd-{n}"));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while outcomes(&kafka, "VIN-L1").len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(outcomes(&kafka, "VIN-L1").len(), 3, "{}", a.log());
    // B is back and the vehicle lands on it at once, before B's consumer has joined
    // its group and read the three records.
    let b = Gateway::start_in(dir, config);
    let mut v = vehicle(&b, "VIN-L1", false);
    let got = receive(&mut v, Duration::from_secs(12));
    assert_eq!(got, vec!["cmd-1", "cmd-2", "cmd-3"], "{}\n{}", a.log(), b.log());
    // One final outcome per command, whichever copy B took.
    let all = outcomes(&kafka, "VIN-L1");
    let ids: std::collections::BTreeSet<_> = all.iter().map(|(i, _, _)| i.clone()).collect();
    assert_eq!(ids.len(), 3, "{all:?}");
    for id in &ids {
        let finals: Vec<_> = all.iter().filter(|(i, o, _)| i == id && o != "queued").collect();
        assert_eq!(finals.len(), 1, "{id}: {all:?}\n{}", b.log());
        assert_eq!(
            (finals[0].1.as_str(), finals[0].2.as_str()),
            ("delivered", "gw-b")
        );
    }
}
