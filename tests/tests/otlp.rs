//! Trace export over OTLP/HTTP (`--features otlp`, `log.otlp_endpoint`): a gateway
//! built with the feature sends its connections' `conn` spans, with the client id and
//! the service name, to a collector. The collector here is a minimal HTTP server that
//! records what it is sent; the gateway is built with the feature into `target/otlp`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration::{mosquitto, Gateway, ANON};

/// Builds the gateway with `--features otlp` into its own target directory (so the
/// default build the other tests run is left alone).
fn otlp_gateway() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target").join("otlp");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(&root)
        .args(["build", "-p", "gateway", "--features", "otlp", "--target-dir"])
        .arg(&target)
        .status()
        .expect("cargo build --features otlp");
    assert!(
        status.success(),
        "the gateway does not build with --features otlp"
    );
    target.join("debug").join("gateway")
}

/// A collector that answers 200 to every POST and hands over (path, body).
fn collector() -> (u16, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            let _ = tx.send((path, body));
        }
    });
    (port, rx)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn connection_spans_reach_an_otlp_collector() {
    let bin = otlp_gateway();
    let (port, received) = collector();
    let gw = Gateway::start_bin(
        &bin,
        &format!("{ANON}[log]\notlp_endpoint = \"http://127.0.0.1:{port}\"\n"),
        // Export batches every 200 ms instead of every 5 s.
        &[("OTEL_BSP_SCHEDULE_DELAY", "200")],
    );
    let (code, out) = mosquitto(
        "mosquitto_pub",
        &gw.mqtt().port().to_string(),
        &[
            "-i",
            "VIN-OTLP-1",
            "-q",
            "1",
            "-t",
            "vehicles/VIN-OTLP-1/telemetry",
            "-m",
            "x",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Ok((path, body)) = received.recv_timeout(Duration::from_millis(500)) else {
            continue;
        };
        seen.push(path.clone());
        if path == "/v1/traces"
            && contains(&body, b"conn")
            && contains(&body, b"VIN-OTLP-1")
            && contains(&body, b"edge-gateway")
        {
            return;
        }
    }
    panic!(
        "no conn span for VIN-OTLP-1 reached the collector; requests: {seen:?}\n{}",
        gw.log()
    );
}
