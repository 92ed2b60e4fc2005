//! `gateway healthcheck`, the container image's HEALTHCHECK: exit 0 while the running
//! gateway's `/healthz` answers 200, 1 when it does not answer, with the token when the
//! probes are closed (`admin.open_probes = false`).

use std::process::Command;
use std::time::Duration;

use integration::{gateway_bin, Gateway, ANON};

/// Runs `gateway healthcheck` against `gw`'s config, pointing it at the bound admin
/// address (the test config listens on port 0).
fn healthcheck(gw: &Gateway, admin: &str, env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(gateway_bin())
        .args(["healthcheck", "--timeout", "2", "--config"])
        .arg(&gw.config_path)
        .env("GATEWAY_ADMIN__LISTEN", admin)
        .envs(env.iter().copied())
        .output()
        .expect("run gateway healthcheck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn healthcheck_follows_healthz() {
    let mut gw = Gateway::start(ANON);
    let admin = gw.admin.expect("admin listener").to_string();
    let (code, text) = healthcheck(&gw, &admin, &[]);
    assert_eq!(code, 0, "healthy gateway: {text}");
    assert!(text.starts_with("healthy"), "{text}");
    // A wildcard listen address is asked on loopback.
    let wildcard = admin.replace("127.0.0.1", "0.0.0.0");
    let (code, text) = healthcheck(&gw, &wildcard, &[("GATEWAY_ADMIN__TOKEN", "t")]);
    assert_eq!(code, 0, "0.0.0.0 asked on loopback: {text}");

    assert!(gw.terminate(Duration::from_secs(10)), "gateway did not stop");
    let (code, text) = healthcheck(&gw, &admin, &[]);
    assert_eq!(code, 1, "stopped gateway must be unhealthy: {text}");
    assert!(text.contains("unhealthy"), "{text}");
}

#[test]
fn healthcheck_sends_the_token_when_probes_are_closed() {
    let env = [
        ("GATEWAY_ADMIN__TOKEN", "s3cret-token"),
        ("GATEWAY_ADMIN__OPEN_PROBES", "false"),
    ];
    let gw = Gateway::start_env(ANON, &env);
    let admin = gw.admin.expect("admin listener").to_string();
    let (code, text) = healthcheck(&gw, &admin, &env);
    assert_eq!(code, 0, "healthcheck with the token: {text}");
    // The same probe with another token is refused by the gateway.
    let (code, text) = healthcheck(
        &gw,
        &admin,
        &[
            ("GATEWAY_ADMIN__TOKEN", "wrong"),
            ("GATEWAY_ADMIN__OPEN_PROBES", "false"),
        ],
    );
    assert_eq!(code, 1, "wrong token must fail: {text}");
    assert!(text.contains("401"), "{text}");
}

#[test]
fn healthcheck_never_exits_2() {
    // Docker reserves a HEALTHCHECK's exit code 2: a configuration it cannot read is 1.
    let out = Command::new(gateway_bin())
        .args(["healthcheck", "--config", "/nonexistent/gateway.toml"])
        .output()
        .expect("run gateway healthcheck");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// During the drain after SIGTERM the admin listener still answers: `/readyz` is 503
/// `shutting_down` (a load balancer takes the node out on that answer), `/healthz` stays
/// 200 (liveness must not kill a draining gateway) and `/metrics` is scraped; it closes
/// when the gateway exits.
#[test]
fn readyz_says_shutting_down_while_the_gateway_drains() {
    use integration::{http_get, http_request, Stream};
    // Kafka unreachable: the PUBACK'd record cannot be confirmed, so the bridge uses the
    // whole grace period trying.
    let mut gw = Gateway::start_env(
        ANON,
        &[
            ("GATEWAY_KAFKA__BOOTSTRAP", "127.0.0.1:1"),
            ("GATEWAY_GATEWAY__SHUTDOWN_GRACE_SECS", "6"),
        ],
    );
    let admin = gw.admin.expect("admin listener");
    let s = Stream::start(gw.mqtt(), "VIN-DRAIN", 1, Duration::ZERO);
    assert!(s.wait_acked(1, Duration::from_secs(10)), "PUBACK");
    s.finish();
    assert_eq!(http_request(admin, "GET", "/readyz", None).0, 200);

    let pid = gw.pid();
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    std::thread::sleep(Duration::from_millis(500));
    let (code, ready) = http_request(admin, "GET", "/readyz", None);
    assert_eq!(code, 503, "{ready}");
    assert!(ready.contains("shutting_down"), "{ready}");
    let (code, live) = http_request(admin, "GET", "/healthz", None);
    assert_eq!(code, 200, "{live}");
    assert!(http_get(admin, "/metrics").contains("gateway_connections"));
    assert!(
        gw.terminate(Duration::from_secs(15)),
        "gateway did not exit within its grace"
    );
    assert!(
        std::net::TcpStream::connect(admin).is_err(),
        "admin still open after exit"
    );
}

/// A Kafka bridge that fails persistently (here a SASL mechanism this build cannot
/// provide, so the producer cannot be created: the gateway's librdkafka has no GSSAPI;
/// should it ever have, pick another setting that only client creation refuses) takes the gateway out of the load
/// balancer (`/readyz` 503) but is not a liveness failure: a restart would fail the same
/// way, and a probe restarting on it would cycle every gateway of a region, and with
/// them the whole fleet, for as long as the Kafka-side problem lasts. `/healthz` names it
/// under `warnings`, and `gateway healthcheck` (the image's HEALTHCHECK) passes. Messages
/// are still acknowledged from the journal.
#[test]
fn a_failed_bridge_is_not_a_liveness_failure() {
    use integration::{http_request, Stream};
    let config = format!(
        "{ANON}[kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanisms\" = \"GSSAPI\"\n"
    );
    let gw = Gateway::start(&config);
    let admin = gw.admin.expect("admin listener");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut ready = (0, String::new());
    while std::time::Instant::now() < deadline {
        ready = http_request(admin, "GET", "/readyz", None);
        if ready.0 == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ready.0, 503, "{}", ready.1);
    assert!(ready.1.contains("bridge_failed"), "{}", ready.1);
    let (code, live) = http_request(admin, "GET", "/healthz", None);
    assert_eq!(code, 200, "{live}");
    let body: serde_json::Value = serde_json::from_str(&live).expect("json");
    assert_eq!(body["problems"], serde_json::json!([]), "{live}");
    assert_eq!(body["warnings"][0]["code"], "bridge_failed", "{live}");
    assert!(gw.metric("gateway_bridge_failed") == 1, "{}", gw.metrics());
    let (code, text) = healthcheck(&gw, &admin.to_string(), &[]);
    assert_eq!(code, 0, "gateway healthcheck: {text}");
    let s = Stream::start(gw.mqtt(), "VIN-FAILED-BRIDGE", 3, Duration::ZERO);
    assert!(
        s.wait_acked(3, Duration::from_secs(10)),
        "PUBACKs from the journal"
    );
    s.finish();
}
