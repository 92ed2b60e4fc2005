//! The simulator against a real broker (Mosquitto from the test set-up): every QoS1
//! message it reports as acknowledged really was, the JSON report is complete, and
//! worker processes merge into one report.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The broker process, its port, and the directory holding its config (kept alive).
struct Mosquitto(std::process::Child, u16, #[allow(dead_code)] tempfile::TempDir);

impl Mosquitto {
    fn start() -> Mosquitto {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
        )
        .expect("conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .or_else(|_| {
                Command::new("/usr/sbin/mosquitto")
                    .arg("-c")
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            })
            .expect("mosquitto broker (Debian package `mosquitto`, installed by scripts/test.sh)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Mosquitto(child, port, dir)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fleet(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(args)
        .output()
        .expect("run fleet");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().expect("report")).expect("json report")
}

#[test]
fn counts_every_acknowledged_message_and_merges_workers() {
    let broker = Mosquitto::start();
    let port = broker.1.to_string();
    for version in ["4", "5"] {
        let r = fleet(&[
            "run",
            "--port",
            &port,
            "--mqtt-version",
            version,
            "--vehicles",
            "10",
            "--messages",
            "50",
            "--json",
            "--duration-secs",
            "30",
            "--source-ips",
            "2",
            "--id-prefix",
            &format!("v{version}"),
        ]);
        assert_eq!(r["connected"], 10, "{r}");
        assert_eq!(r["sent"], 500, "{r}");
        assert_eq!(r["acked"], 500, "{r}");
        assert_eq!(r["puback_latency"]["count"], 500, "{r}");
        assert!(
            r["puback_latency"]["p99_us"].as_u64().is_some_and(|v| v > 0),
            "{r}"
        );
        assert!(r["errors"].as_object().is_some_and(|e| e.is_empty()), "{r}");
    }
    let r = fleet(&[
        "run",
        "--port",
        &port,
        "--vehicles",
        "20",
        "--messages",
        "10",
        "--workers",
        "2",
        "--json",
        "--duration-secs",
        "30",
        "--id-prefix",
        "wk",
    ]);
    assert_eq!(
        (r["connected"].as_u64(), r["acked"].as_u64()),
        (Some(20), Some(200)),
        "{r}"
    );
    assert_eq!(
        r["puback_latency"]["count"], 200,
        "histograms merged exactly: {r}"
    );
}

#[test]
fn fan_out_and_fan_in_deliver_everything_with_latency_and_cpu() {
    let broker = Mosquitto::start();
    let port = broker.1.to_string();
    let pid = format!("broker={}", broker.0.id());
    for (pattern, many, qos) in [
        ("fanout", "--subscribers", "0"),
        ("fanout", "--subscribers", "1"),
        ("fanin", "--publishers", "0"),
        ("fanin", "--publishers", "1"),
    ] {
        let r = fleet(&[
            pattern,
            many,
            "20",
            "--rate",
            "100",
            "--qos",
            qos,
            "--warmup-secs",
            "1",
            "--duration-secs",
            "2",
            "--port",
            &port,
            "--id-prefix",
            &format!("{pattern}{qos}"),
            "--cpu-pid",
            &pid,
            "--json",
        ]);
        let reach = if pattern == "fanout" { 20 } else { 1 };
        let published = r["published"].as_u64().unwrap_or(0);
        assert!(published >= 150, "{r}");
        assert_eq!(r["completeness"], 1.0, "{r}");
        // Received inside the window: what was sent in it, give or take the edges.
        let delivered = r["delivered"].as_u64().unwrap_or(0);
        assert!(delivered.abs_diff(published * reach) <= 5 * reach, "{r}");
        assert!(r["latency"]["p99_us"].as_u64().is_some_and(|v| v > 0), "{r}");
        assert!(r["cpu_secs"]["broker"].as_f64().is_some(), "{r}");
        assert!(
            r["failure"].is_null() && r["errors"].as_object().is_some_and(|e| e.is_empty()),
            "{r}"
        );
    }
}
