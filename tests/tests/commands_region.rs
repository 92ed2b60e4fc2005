//! Two gateways of one region against one real Kafka (README, "Many gateways in a
//! region"): a command reaches the vehicle on whichever gateway holds it, exactly once,
//! with one outcome; a vehicle that moves from A to B takes its queued commands along.
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

fn gateway(kafka: &Kafka, id: &str, reporter: bool) -> Gateway {
    let extra = format!(
        "[kafka]\nbootstrap = \"{}\"\nlinger_ms = 1\ndead_letter_topic = \"\"\n\
         [commands]\nkafka_topic = \"{COMMANDS}\"\noutcome_topic = \"{OUTCOMES}\"\n\
         many_gateways = true\nreport_unknown = {reporter}\n\
         [auth]\nallow_anonymous = true\n",
        kafka.bootstrap()
    );
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
