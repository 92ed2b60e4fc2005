//! A command is for now, once: an operator's retained publish to a vehicle's command
//! topic is refused (retained, it would be replayed to the vehicle on every later
//! subscription, an old "unlock" after each reconnect). Clearing one stays allowed, and
//! retained messages on other topics are untouched.
#![allow(clippy::unwrap_used)]

use integration::mqtt_raw2::metric_sum;
use integration::{mosquitto, Gateway};

/// A gateway on the embedded backbone where anyone may publish and subscribe anywhere;
/// `kafka` is appended to its `[kafka]` section.
fn permissive(kafka: &str) -> Gateway {
    Gateway::start(&format!(
        "[auth]\nallow_anonymous = true\npublish_acl = [\"#\"]\nsubscribe_acl = [\"#\"]\n\
         [kafka]\nbootstrap = \"embedded\"\n{kafka}"
    ))
}

#[test]
fn a_retained_command_is_refused_and_other_retained_messages_are_not() {
    let gw = permissive("");
    let port = gw.mqtt().port().to_string();
    let publish = |topic: &str, payload: &str| {
        mosquitto(
            "mosquitto_pub",
            &port,
            &[
                "-V", "mqttv5", "-i", "ops-1", "-t", topic, "-q", "1", "-r", "-m", payload,
            ],
        )
    };
    publish("vehicles/VIN9/commands", "unlock");
    publish("vehicles/VIN9/commands", "");
    publish("vehicles/VIN9/status", "parked");
    let m = gw.metrics();
    assert_eq!(
        metric_sum(&m, "gateway_retained_refused_total{reason=\"command_topic\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "gateway_retained_messages"), 1.0, "{m}");
    // A later subscriber to the command topic gets no retained command.
    let (_, out) = mosquitto(
        "mosquitto_sub",
        &port,
        &[
            "-V",
            "mqttv5",
            "-i",
            "VIN9",
            "-t",
            "vehicles/VIN9/commands",
            "-W",
            "2",
            "-v",
        ],
    );
    assert!(!out.contains("unlock"), "{out}");
}

#[test]
fn a_retained_will_on_a_command_topic_is_refused_at_connect() {
    let gw = permissive("");
    let port = gw.mqtt().port().to_string();
    let connect_with_will = |will_topic: &str| {
        mosquitto(
            "mosquitto_sub",
            &port,
            &[
                "-V",
                "mqttv5",
                "-i",
                "ops-2",
                "-t",
                "vehicles/VIN9/status",
                "-W",
                "1",
                "--will-topic",
                will_topic,
                "--will-payload",
                "unlock",
                "--will-retain",
            ],
        )
    };
    let (code, out) = connect_with_will("vehicles/VIN9/commands");
    assert_ne!(
        code, 0,
        "CONNECT with a retained Will on a command topic accepted: {out}"
    );
    assert!(out.to_lowercase().contains("not authori"), "{out}");
    let m = gw.metrics();
    assert_eq!(
        metric_sum(&m, "gateway_retained_refused_total{reason=\"command_topic\"}"),
        1.0,
        "{m}"
    );
    // The same Will on another topic is fine (the subscriber times out normally).
    let (_, out) = connect_with_will("vehicles/VIN9/status");
    assert!(!out.to_lowercase().contains("not authori"), "{out}");
}

/// An operator's Will on a vehicle's command topic is a command when it is published, as
/// the operator's live publish there would be: delivered, counted with `source` = `mqtt`
/// and given an outcome, and, with `kafka.unmatched = "refuse"` and no route naming
/// command topics, accepted at CONNECT (it reaches Kafka as its outcome, not as a record
/// of its own). Before, it was routed as a plain message (no outcome) and its CONNECT
/// refused as unroutable.
#[test]
fn an_operators_will_on_a_command_topic_is_a_command_with_an_outcome() {
    use integration::raw::{connack_code, Connect, Raw};
    use std::time::{Duration, Instant};
    let gw = permissive("unmatched = \"refuse\"\n");
    let port = gw.mqtt().port().to_string();
    let vehicle = std::thread::spawn(move || {
        mosquitto(
            "mosquitto_sub",
            &port,
            &[
                "-V",
                "mqttv5",
                "-i",
                "VIN7",
                "-t",
                "vehicles/VIN7/commands",
                "-q",
                "1",
                "-C",
                "1",
                "-W",
                "20",
            ],
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("gateway_subscriptions_active") < 1 {
        assert!(
            Instant::now() < deadline,
            "the vehicle never subscribed\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (operator, connack) = Raw::connect_with(
        gw.mqtt(),
        &Connect::new(5, "ops-will").will("vehicles/VIN7/commands", b"safe-mode"),
    );
    assert_eq!(connack_code(&connack), 0, "CONNECT refused\n{}", gw.log());
    // The operator's connection is lost without a DISCONNECT: its Will is due.
    drop(operator);
    let (code, out) = vehicle.join().unwrap();
    assert_eq!((code, out.trim()), (0, "safe-mode"), "{}", gw.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("gateway_command_outcomes_total{outcome=\"delivered\"}") < 1 {
        assert!(Instant::now() < deadline, "no outcome\n{}", gw.metrics());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(gw.metric("gateway_commands_received_total{source=\"mqtt\"}"), 1);
    assert_eq!(gw.metric("gateway_messages_unrouted_total{qos=\"1\"}"), 0);
}
