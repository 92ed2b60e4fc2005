//! TLS and mutual TLS with certificates generated for the run, exercised with
//! mosquitto_pub (OpenSSL) and rumqttc (rustls).

use std::time::Duration;

use integration::certs::Ca;
use integration::{run_cli, Gateway};

fn start_tls(dir: &std::path::Path, mtls: bool) -> (Gateway, Ca) {
    start_tls_with(dir, mtls, "")
}

/// As [`start_tls`], with extra `[mqtt]` keys (`key = value\n` lines).
fn start_tls_with(dir: &std::path::Path, mtls: bool, mqtt_extra: &str) -> (Gateway, Ca) {
    // tls_listen belongs in the [mqtt] section the harness writes: add it there.
    let ca = Ca::new(dir, "fleet");
    let server = ca.server(dir);
    let client_ca = if mtls {
        ca.cert_path.display().to_string()
    } else {
        String::new()
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let config_path = tmp.path().join("gateway.toml");
    let text = integration::config(
        &tmp.path().join("journal"),
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{client_ca}\"\nhandshake_timeout_secs = 2\n\
         [auth]\nallow_anonymous = {}\n",
            server.cert.display(),
            server.key.display(),
            !mtls
        ),
    )
    .replace(
        "listen = \"127.0.0.1:0\"\nconnect",
        &format!("listen = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n{mqtt_extra}connect"),
    );
    std::fs::write(&config_path, text).expect("config");
    (Gateway::start_in(tmp, config_path), ca)
}

fn pub_tls(
    gw: &Gateway,
    ca: &Ca,
    id: &str,
    cert: Option<&integration::certs::Pair>,
    version: &str,
) -> (i32, String) {
    let port = gw.tls.expect("tls listener").port().to_string();
    let topic = format!("vehicles/{id}/telemetry");
    let cafile = ca.cert_path.display().to_string();
    let mut args = vec![
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "--cafile",
        &cafile,
        "-V",
        version,
        "-q",
        "1",
        "-i",
        id,
        "-t",
        &topic,
        "-m",
        "{}",
        "-d",
    ];
    let (c, k);
    if let Some(pair) = cert {
        c = pair.cert.display().to_string();
        k = pair.key.display().to_string();
        args.extend(["--cert", &c, "--key", &k]);
    }
    run_cli("mosquitto_pub", &args)
}

#[test]
fn tls_publish_with_mosquitto_v311_and_v5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut gw, ca) = start_tls(dir.path(), false);
    for version in ["mqttv311", "mqttv5"] {
        let (code, out) = pub_tls(&gw, &ca, "tls-car", None, version);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("received PUBACK"), "{out}");
    }
    assert!(gw.terminate(Duration::from_secs(10)));
    assert_eq!(Gateway::journal_records(gw.dir.path()).len(), 2);
}

#[test]
fn mtls_identity_binds_the_client_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gw, ca) = start_tls(dir.path(), true);
    let vin = ca.vehicle(dir.path(), "VIN0001");
    // The right certificate and the matching client id: accepted.
    for version in ["mqttv311", "mqttv5"] {
        let (code, out) = pub_tls(&gw, &ca, "VIN0001", Some(&vin), version);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("received PUBACK"), "{out}");
    }
    // No client certificate: the handshake fails.
    let (code, out) = pub_tls(&gw, &ca, "VIN0001", None, "mqttv311");
    assert_ne!(code, 0, "no certificate must be refused: {out}");
    // A certificate from another CA: refused.
    let rogue_dir = tempfile::tempdir().expect("tempdir");
    let rogue_ca = Ca::new(rogue_dir.path(), "rogue");
    let rogue = rogue_ca.vehicle(rogue_dir.path(), "VIN0001");
    let (code, out) = pub_tls(&gw, &ca, "VIN0001", Some(&rogue), "mqttv311");
    assert_ne!(code, 0, "foreign CA must be refused: {out}");
    // A valid certificate but another vehicle's client id: CONNACK not authorised.
    let (code, out) = pub_tls(&gw, &ca, "VIN0002", Some(&vin), "mqttv311");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("CONNACK (5)"), "3.1.1 return code 5: {out}");
    let (_, out) = pub_tls(&gw, &ca, "VIN0002", Some(&vin), "mqttv5");
    assert!(out.contains("CONNACK (135)"), "5.0 reason 0x87: {out}");
    assert!(gw.metric("gateway_connections_rejected_total{reason=\"tls_handshake_failed\"}") >= 2);
    assert_eq!(
        gw.metric("gateway_connack_refused_total{reason=\"not_authorized\"}"),
        2
    );
}

#[tokio::test]
async fn rumqttc_over_tls() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
    let dir = tempfile::tempdir().expect("tempdir");
    let (gw, ca) = start_tls(dir.path(), false);
    let addr = gw.tls.expect("tls");
    let mut opts = MqttOptions::new("rustls-car", "localhost", addr.port());
    let ca_pem = std::fs::read(&ca.cert_path).expect("ca");
    opts.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: ca_pem,
        alpn: None,
        client_auth: None,
    }));
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .publish("vehicles/rustls-car/t", QoS::AtLeastOnce, false, "x")
        .await
        .expect("queue");
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.expect("tls session") {
                return;
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "PUBACK over rustls");
}

#[test]
fn tls_connections_over_the_limit_get_connack_3_or_0x97() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gw, ca) = start_tls_with(dir.path(), false, "max_connections = 1\n");
    // One connection holds the only slot (a plain one: the limit covers both listeners).
    let (_held, code) = integration::raw::Raw::mqtt311(gw.mqtt(), "held", 30);
    assert_eq!(code, 0);
    // Over TLS, the refused vehicle still learns why, in its own protocol version.
    let (code, out) = pub_tls(&gw, &ca, "late-tls", None, "mqttv311");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("CONNACK (3)"), "3.1.1 server unavailable = 3: {out}");
    let (code, out) = pub_tls(&gw, &ca, "late-tls", None, "mqttv5");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("CONNACK (151)"), "5.0 quota exceeded = 0x97: {out}");
    assert_eq!(
        gw.metric("gateway_connections_rejected_total{reason=\"max_connections\"}"),
        2
    );
}
