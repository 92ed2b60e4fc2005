//! The bridge against Kafka over SASL_SSL (PLAIN), configured only through
//! `[kafka.properties]` as the README's "Managed Kafka (SASL/SSL)" section shows: the
//! gateway's librdkafka must be built with TLS and SASL for that to work at all (it was
//! not: "ssl.ca.location not supported in this build").

use std::time::Duration;

use integration::certs::Ca;
use integration::kafka::{Kafka, SASL_PASSWORD, SASL_USER};
use integration::{http_get, kafka_config, mosquitto, Gateway};

const PARTITIONS: i32 = 2;

fn gateway(kafka: &Kafka, ca: &Ca, password: &str) -> Gateway {
    let config = format!(
        "{}[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"PLAIN\"\n\
         \"sasl.username\" = \"{SASL_USER}\"\n\"sasl.password\" = \"{password}\"\n\
         \"ssl.ca.location\" = \"{}\"\n",
        kafka_config(&kafka.secure_bootstrap(), "telemetry"),
        ca.cert_path.display()
    );
    Gateway::start(&config)
}

/// A broker with a SASL_SSL listener (its CA in `dir`) and a gateway signing in with
/// `password`.
fn broker_and_gateway(dir: &std::path::Path, password: &str) -> (Kafka, Gateway) {
    let ca = Ca::new(dir, "kafka");
    let kafka = Kafka::start_sasl_ssl(&ca.server(dir));
    kafka.create_topic("telemetry", PARTITIONS);
    let gw = gateway(&kafka, &ca, password);
    (kafka, gw)
}

/// One QoS 1 publish of vehicle `sasl-car` with `mosquitto_pub`.
fn publish(gw: &Gateway, payload: &str) -> (i32, String) {
    let port = gw.mqtt().port().to_string();
    let args = [
        "-i",
        "sasl-car",
        "-q",
        "1",
        "-t",
        "vehicles/sasl-car/telemetry",
        "-m",
        payload,
    ];
    mosquitto("mosquitto_pub", &port, &args)
}

#[test]
fn telemetry_reaches_kafka_over_sasl_ssl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kafka, gw) = broker_and_gateway(dir.path(), SASL_PASSWORD);
    for n in 0..5 {
        let (code, out) = publish(&gw, &n.to_string());
        assert_eq!(code, 0, "mosquitto_pub: {out}");
    }
    let records = kafka.consume("telemetry", PARTITIONS, 5, Duration::from_secs(60));
    let payloads: Vec<&str> = records.iter().map(|r| r.payload.as_str()).collect();
    assert_eq!(
        payloads,
        ["0", "1", "2", "3", "4"],
        "bridge: {}",
        http_get(gw.admin.expect("admin"), "/api/v1/bridge")
    );
    assert!(records.iter().all(|r| r.key == "sasl-car"));
}

/// A wrong password is the operator's to fix: the messages stay in the journal (still
/// acknowledged: the journal is the buffer), the bridge says why, and nothing reaches
/// Kafka.
#[test]
fn a_wrong_sasl_password_keeps_the_records_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kafka, gw) = broker_and_gateway(dir.path(), "not-the-password");
    let (code, out) = publish(&gw, "kept");
    assert_eq!(code, 0, "acknowledged from the journal: {out}");
    let admin = gw.admin.expect("admin");
    // Once librdkafka sums the failures up as "all brokers down" (state `down`), the
    // bridge must still name the broker's own error: rejected credentials.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut bridge = String::new();
    while std::time::Instant::now() < deadline {
        bridge = http_get(admin, "/api/v1/bridge");
        if bridge.contains("\"state\":\"down\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(bridge.contains("\"state\":\"down\""), "{bridge}");
    let body: serde_json::Value = serde_json::from_str(&bridge).expect("json");
    let last = body["last_error"].as_str().unwrap_or_default().to_lowercase();
    assert!(last.contains("auth"), "the bridge does not say why: {bridge}");
    // Kafka refusing the credentials is not a gateway failure: it still takes vehicles.
    assert_eq!(integration::http_request(admin, "GET", "/readyz", None).0, 200);
    assert_eq!(kafka.record_count("telemetry", PARTITIONS), 0);
    assert_eq!(
        gw.metric("gateway_journal_released_seq"),
        0,
        "released without Kafka"
    );
}
