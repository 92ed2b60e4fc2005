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

#[test]
fn commands_over_mqtt_reach_every_vehicle_and_are_timed() {
    let broker = Mosquitto::start();
    let port = broker.1.to_string();
    let pid = format!("broker={}", broker.0.id());
    for version in ["4", "5"] {
        let r = fleet(&[
            "commands",
            "--via",
            "mqtt",
            "--vehicles",
            "50",
            "--rate",
            "200",
            "--issuers",
            "3",
            "--warmup-secs",
            "1",
            "--duration-secs",
            "2",
            "--source-ips",
            "2",
            "--mqtt-version",
            version,
            "--port",
            &port,
            "--id-prefix",
            &format!("cmd{version}"),
            "--cpu-pid",
            &pid,
            "--json",
        ]);
        let issued = r["issued"].as_u64().unwrap_or(0);
        assert!(issued >= 350, "{r}");
        assert_eq!(r["subscribed"], 50, "{r}");
        assert_eq!(r["received"].as_u64(), Some(issued), "{r}");
        assert_eq!(r["acknowledged"].as_u64(), Some(issued), "{r}");
        assert_eq!(r["completeness"], 1.0, "{r}");
        assert_eq!(r["received_latency"]["count"].as_u64(), Some(issued), "{r}");
        assert!(
            r["acked_latency"]["p99_us"].as_u64().is_some_and(|v| v > 0),
            "{r}"
        );
        assert!(
            r["acked_latency"]["p50_us"].as_u64() >= r["received_latency"]["p50_us"].as_u64(),
            "a PUBACK is written after its command was read: {r}"
        );
        assert!(r["cpu_secs"]["broker"].as_f64().is_some(), "{r}");
        assert!(
            r["failure"].is_null() && r["errors"].as_object().is_some_and(|e| e.is_empty()),
            "{r}"
        );
    }
}

/// A gateway without the REST command route answers 404: the run stops before any
/// vehicle connects, with exit status 3 and `unavailable` set, so that a harness can skip
/// the path.
#[test]
fn commands_over_rest_report_a_missing_route() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let admin = listener.local_addr().expect("addr").to_string();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "request");
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .expect("write");
        String::from_utf8_lossy(&got).into_owned()
    });
    let out = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "commands",
            "--via",
            "rest",
            "--admin",
            &admin,
            "--port",
            "1",
            "--vehicles",
            "10",
            "--json",
        ])
        .output()
        .expect("run fleet");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(text.lines().last().expect("report")).expect("json");
    assert_eq!(r["unavailable"], true, "{r}");
    assert_eq!(r["subscribed"], 0, "{r}");
    let request = server.join().expect("server");
    assert!(
        request.starts_with("POST /api/v1/vehicles/veh-probe/commands HTTP/1.1\r\n"),
        "{request}"
    );
}
