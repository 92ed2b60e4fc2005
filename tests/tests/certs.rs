//! `gateway certs init` and server certificate rotation, against the real binary:
//! the generated PKI works for mutual TLS with mosquitto_pub (OpenSSL) and rumqttc
//! (rustls); a server certificate replaced on disk reaches new handshakes after SIGHUP
//! (and after a file change alone) while a vehicle connected before the rotation stays
//! connected and keeps getting PUBACKs; a broken replacement leaves the old one in place.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::{gateway_bin, run_cli, Gateway};

fn certs_init(out: &Path, extra: &[&str]) -> (i32, String) {
    let bin = gateway_bin();
    let out = out.display().to_string();
    let mut args = vec!["certs", "init", "--out", out.as_str()];
    args.extend_from_slice(extra);
    run_cli(bin.to_str().expect("utf-8 path"), &args)
}

/// A gateway with a TLS listener requiring client certificates from `ca`.
fn start_mtls(cert: &Path, key: &Path, ca: &Path) -> Gateway {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config_path = tmp.path().join("gateway.toml");
    let text = integration::config(
        &tmp.path().join("journal"),
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nhandshake_timeout_secs = 2\n\
             [auth]\nallow_anonymous = false\n",
            cert.display(),
            key.display(),
            ca.display()
        ),
    )
    .replace(
        "listen = \"127.0.0.1:0\"\nconnect",
        "listen = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\nconnect",
    );
    std::fs::write(&config_path, text).expect("config");
    Gateway::start_in(tmp, config_path)
}

fn mosquitto_pub(gw: &Gateway, cafile: &Path, dir: &Path, cert_of: &str, id: &str) -> (i32, String) {
    let port = gw.tls.expect("tls listener").port().to_string();
    let topic = format!("vehicles/{id}/telemetry");
    let cafile = cafile.display().to_string();
    let cert = dir.join(format!("vehicle-{cert_of}.pem")).display().to_string();
    let key = dir.join(format!("vehicle-{cert_of}.key")).display().to_string();
    run_cli(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            &cafile,
            "--cert",
            &cert,
            "--key",
            &key,
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-i",
            id,
            "-t",
            &topic,
            "-m",
            "{}",
            "-d",
        ],
    )
}

/// The base64 body of the first certificate in a PEM text (whitespace removed), to
/// compare certificates across encoders.
fn pem_body(text: &str) -> String {
    let start = text.find("-----BEGIN CERTIFICATE-----").expect("a certificate") + 27;
    let end = start + text[start..].find("-----END CERTIFICATE-----").expect("end");
    text[start..end].split_whitespace().collect()
}

/// The certificate a new TLS handshake gets, read with `openssl s_client`.
fn presented_cert(gw: &Gateway, dir: &Path) -> String {
    let addr = gw.tls.expect("tls").to_string();
    let cert = dir.join("vehicle-VIN0002.pem").display().to_string();
    let key = dir.join("vehicle-VIN0002.key").display().to_string();
    let (_, out) = run_cli(
        "openssl",
        &[
            "s_client",
            "-connect",
            &addr,
            "-servername",
            "localhost",
            "-cert",
            &cert,
            "-key",
            &key,
        ],
    );
    assert!(
        out.contains("BEGIN CERTIFICATE"),
        "openssl s_client saw no certificate:\n{out}"
    );
    pem_body(&out)
}

fn cert_of(path: &Path) -> String {
    pem_body(&std::fs::read_to_string(path).expect("read cert"))
}

/// Replaces `dst` by `src` the way a deployment tool should: a new file renamed over it.
fn replace(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).expect("copy");
    std::fs::rename(&tmp, dst).expect("rename");
}

#[test]
fn certs_init_writes_a_pki_that_works_for_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, out) = certs_init(
        dir.path(),
        &["--vehicles", "2", "--san", "localhost", "--san", "127.0.0.1"],
    );
    assert_eq!(code, 0, "{out}");
    for f in ["ca", "server", "vehicle-VIN0001", "vehicle-VIN0002"] {
        use std::os::unix::fs::PermissionsExt;
        let key = std::fs::metadata(dir.path().join(format!("{f}.key"))).expect("key written");
        assert_eq!(key.permissions().mode() & 0o777, 0o600, "{f}.key must be 0600");
        assert!(dir.path().join(format!("{f}.pem")).exists());
    }
    // A second run refuses to replace the CA.
    let (code, out) = certs_init(dir.path(), &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("exists"), "{out}");

    let d = dir.path();
    let gw = start_mtls(&d.join("server.pem"), &d.join("server.key"), &d.join("ca.pem"));
    let (code, out) = mosquitto_pub(&gw, &d.join("ca.pem"), d, "VIN0001", "VIN0001");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("received PUBACK"), "{out}");
    // The certificate's CN is the only client id it may use.
    let (code, out) = mosquitto_pub(&gw, &d.join("ca.pem"), d, "VIN0002", "VIN0001");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("CONNACK (5)"), "{out}");
}

/// Publishes QoS 1 and waits until the vehicle has seen `n` PUBACKs in all.
async fn publish_and_wait(
    client: &rumqttc::AsyncClient,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
    n: usize,
    seen: &mut Vec<&'static str>,
) {
    client
        .publish(
            "vehicles/VIN0001/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            format!("{n}"),
        )
        .await
        .expect("queue");
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.iter().filter(|e| **e == "puback").count() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(e)) => seen.push(e),
            _ => panic!("no PUBACK for publish {n}; events so far: {seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_reaches_new_handshakes_without_dropping_vehicles() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, TlsConfiguration, Transport};

    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Two PKIs: the first is what the gateway starts with; the rotated server
    // certificates come from the second CA (the harder case: vehicles trust both during
    // a CA change; a renewal under the same CA is the easy one).
    let (old_dir, new_dir) = (d.join("old"), d.join("new"));
    let (code, out) = certs_init(&old_dir, &["--vehicles", "2"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = certs_init(
        &new_dir,
        &["--vehicles", "1", "--san", "localhost", "--san", "127.0.0.1"],
    );
    assert_eq!(code, 0, "{out}");
    let live = d.join("live");
    std::fs::create_dir(&live).expect("mkdir");
    let (cert, key): (PathBuf, PathBuf) = (live.join("server.pem"), live.join("server.key"));
    replace(&old_dir.join("server.pem"), &cert);
    replace(&old_dir.join("server.key"), &key);
    let gw = start_mtls(&cert, &key, &old_dir.join("ca.pem"));
    assert_eq!(
        presented_cert(&gw, &old_dir),
        cert_of(&old_dir.join("server.pem"))
    );

    // A vehicle connected before the rotation (rustls, client certificate VIN0001).
    let addr = gw.tls.expect("tls");
    let mut opts = MqttOptions::new("VIN0001", "localhost", addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: std::fs::read(old_dir.join("ca.pem")).expect("ca"),
        alpn: None,
        client_auth: Some((
            std::fs::read(old_dir.join("vehicle-VIN0001.pem")).expect("cert"),
            std::fs::read(old_dir.join("vehicle-VIN0001.key")).expect("key"),
        )),
    }));
    let (client, mut el) = AsyncClient::new(opts, 10);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let events = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = tx.send("connack");
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    let _ = tx.send("puback");
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send("error");
                    eprintln!("vehicle connection error: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let mut seen = Vec::new();
    publish_and_wait(&client, &mut rx, 1, &mut seen).await;

    // 1. A broken replacement (the new certificate with the old key): SIGHUP keeps the
    //    current pair and says so.
    replace(&new_dir.join("server.pem"), &cert);
    let hup = |pid: u32| {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -HUP");
    };
    hup(gw.pid());
    assert!(
        gw.wait_log("TLS server certificate reload failed", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    assert_eq!(
        presented_cert(&gw, &old_dir),
        cert_of(&old_dir.join("server.pem"))
    );
    assert_eq!(gw.metric("gateway_tls_cert_reloads_total{result=\"error\"}"), 1);

    // 2. The key follows: SIGHUP, and new handshakes get the new certificate.
    replace(&new_dir.join("server.key"), &key);
    hup(gw.pid());
    assert!(
        gw.wait_log("TLS server certificate reloaded", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    assert_eq!(
        presented_cert(&gw, &old_dir),
        cert_of(&new_dir.join("server.pem"))
    );
    assert_eq!(gw.metric("gateway_tls_cert_reloads_total{result=\"ok\"}"), 1);
    // A real client that trusts the new CA completes MQTT over it (client certificates
    // are still verified against the old CA: tls.client_ca is not reloaded).
    let (code, out) = mosquitto_pub(&gw, &new_dir.join("ca.pem"), &old_dir, "VIN0002", "VIN0002");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("received PUBACK"), "{out}");

    // 3. Without a signal: the files change (back to the old pair, a new inode) and the
    //    periodic check (every 10 s) picks them up.
    replace(&old_dir.join("server.pem"), &cert);
    replace(&old_dir.join("server.key"), &key);
    let deadline = Instant::now() + Duration::from_secs(25);
    while gw.metric("gateway_tls_cert_reloads_total{result=\"ok\"}") < 2 {
        assert!(
            Instant::now() < deadline,
            "file change not picked up within 25 s:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        presented_cert(&gw, &old_dir),
        cert_of(&old_dir.join("server.pem"))
    );

    // The vehicle connected before all this is still on its first connection.
    publish_and_wait(&client, &mut rx, 2, &mut seen).await;
    while let Ok(e) = rx.try_recv() {
        seen.push(e);
    }
    assert_eq!(
        seen.iter().filter(|e| **e == "connack").count(),
        1,
        "the vehicle reconnected or failed: {seen:?}"
    );
    assert!(!seen.contains(&"error"), "{seen:?}");
    assert_eq!(gw.metric("gateway_connections_active"), 1, "{}", gw.metrics());
    events.abort();
}
