//! `/metrics` against the real gateway and a real Kafka broker: the text passes
//! `promtool check metrics` (Debian's `prometheus` package), the latency histograms
//! move with traffic (PUBACK, journal commit, Kafka delivery, record age), and
//! `gateway_build_info` names the build.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::audit::metric;
use integration::kafka::Kafka;
use integration::{kafka_config, mosquitto, Gateway};

/// `promtool check metrics` on `text`: (passed, what it said).
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; scripts/test.sh installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn metrics_pass_promtool_and_the_histograms_move_with_traffic() {
    let kafka = Kafka::start();
    let gw = Gateway::start(&kafka_config(&kafka.bootstrap(), "telemetry"));
    let before = gw.metrics();
    let (ok, said) = promtool(&before);
    assert!(ok, "promtool refused /metrics before traffic:\n{said}\n{before}");
    for h in [
        "gateway_puback_latency_seconds_count",
        "gateway_journal_commit_seconds_count",
        "gateway_bridge_delivery_latency_seconds_count",
        "gateway_bridge_record_age_seconds_count",
    ] {
        assert!(
            before.contains(&format!("{h} 0")),
            "{h} not 0 before traffic:\n{before}"
        );
    }
    assert!(
        before.contains("gateway_build_info{commit=\"")
            && before.contains(&format!("version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))),
        "{before}"
    );

    const N: usize = 25;
    let port = gw.mqtt().port().to_string();
    for i in 0..N {
        let (code, out) = mosquitto(
            "mosquitto_pub",
            &port,
            &[
                "-i",
                "VIN-METRICS",
                "-q",
                "1",
                "-t",
                "vehicles/VIN-METRICS/telemetry",
                "-m",
                &format!("m{i}"),
            ],
        );
        assert_eq!(code, 0, "{out}");
    }
    let records = kafka.consume("telemetry", 1, N, Duration::from_secs(60));
    assert_eq!(records.len(), N);
    // Confirmations are counted when the bridge absorbs them: give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let t = gw.metrics();
        if metric(&t, "gateway_bridge_record_age_seconds_count") >= N as u64
            || std::time::Instant::now() > deadline
        {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (ok, said) = promtool(&after);
    assert!(ok, "promtool refused /metrics after traffic:\n{said}\n{after}");
    assert_eq!(
        metric(&after, "gateway_puback_latency_seconds_count"),
        N as u64,
        "{after}"
    );
    assert!(
        metric(&after, "gateway_journal_commit_seconds_count") >= 1,
        "{after}"
    );
    // Presence is off: the journal holds the N messages and nothing else.
    assert!(
        metric(&after, "gateway_journal_commit_batch_records_sum") >= N as u64,
        "{after}"
    );
    assert!(
        metric(&after, "gateway_bridge_delivery_latency_seconds_count") >= N as u64,
        "{after}"
    );
    assert!(
        metric(&after, "gateway_bridge_record_age_seconds_count") >= N as u64,
        "{after}"
    );
    assert_eq!(
        metric(&after, "gateway_messages_received_total{qos=\"1\"}"),
        N as u64
    );
    // Every PUBACK took at most the +Inf bucket, and the observed sum is a real time.
    let sum: f64 = after
        .lines()
        .find_map(|l| l.strip_prefix("gateway_puback_latency_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(sum > 0.0 && sum < N as f64 * 10.0, "PUBACK latency sum {sum}");
}

#[test]
fn probes_need_the_token_when_admin_open_probes_is_false() {
    const TOKEN: &str = "probe-test-token-0123456789abcdef";
    let open = Gateway::start_env(integration::ANON, &[("GATEWAY_ADMIN__TOKEN", TOKEN)]);
    let admin = open.admin.unwrap();
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (code, body) = integration::http_send(admin, "GET", path, None, "");
        assert_eq!(code, 200, "{path} is open by default: {body}");
    }
    let closed = Gateway::start_env(
        integration::ANON,
        &[
            ("GATEWAY_ADMIN__TOKEN", TOKEN),
            ("GATEWAY_ADMIN__OPEN_PROBES", "false"),
        ],
    );
    let admin = closed.admin.unwrap();
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (code, body) = integration::http_send(admin, "GET", path, None, "");
        assert_eq!(code, 401, "{path} without the token: {body}");
        assert!(body.contains("\"unauthorized\""), "{path}: {body}");
        let (code, body) = integration::http_send(admin, "GET", path, Some(TOKEN), "");
        assert_eq!(code, 200, "{path} with the token: {body}");
    }
}
