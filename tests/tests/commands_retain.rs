//! A command is for now, once: an operator's retained publish to a vehicle's command
//! topic is refused (retained, it would be replayed to the vehicle on every later
//! subscription, an old "unlock" after each reconnect). Clearing one stays allowed, and
//! retained messages on other topics are untouched.
#![allow(clippy::unwrap_used)]

use integration::mqtt_raw2::metric_sum;
use integration::{mosquitto, Gateway};

#[test]
fn a_retained_command_is_refused_and_other_retained_messages_are_not() {
    let gw = Gateway::start(
        "[auth]\nallow_anonymous = true\npublish_acl = [\"#\"]\nsubscribe_acl = [\"#\"]\n\
         [kafka]\nbootstrap = \"embedded\"\n",
    );
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
    let gw = Gateway::start(
        "[auth]\nallow_anonymous = true\npublish_acl = [\"#\"]\nsubscribe_acl = [\"#\"]\n\
         [kafka]\nbootstrap = \"embedded\"\n",
    );
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
