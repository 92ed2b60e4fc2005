//! Logs as an SRE reads them: `log.format = "json"` writes one JSON object per line,
//! and every event of a connection's CONNECT phase, refusals included, carries the
//! connection's span (listener, peer address, and the client id once the CONNECT named
//! it).
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::time::Duration;

use integration::{mosquitto, Gateway};
use serde_json::Value;

fn json_lines(gw: &Gateway) -> Vec<Value> {
    let log = gw.log();
    log.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}")))
        .collect()
}

fn find<'a>(lines: &'a [Value], message: &str) -> Option<&'a Value> {
    lines
        .iter()
        .find(|v| v["fields"]["message"].as_str() == Some(message))
}

/// An argon2id hash from `gateway hash-password`.
fn hash(password: &str) -> String {
    let mut c = std::process::Command::new(integration::gateway_bin())
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn json_logs_carry_the_connection_span_from_accept() {
    let gw = Gateway::start(&format!(
        "[auth]\nallow_anonymous = false\n[[auth.users]]\nusername = \"car1\"\npassword_hash = \"{}\"\n\
         [log]\nformat = \"json\"\n",
        hash("pw")
    ));

    // Garbage instead of a CONNECT: refused before any client id is known.
    let mut s = std::net::TcpStream::connect(gw.mqtt()).unwrap();
    let garbage_peer = s.local_addr().unwrap().to_string();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    // A CONNECT without credentials: refused, its client id known.
    let (code, out) = mosquitto(
        "mosquitto_pub",
        &gw.mqtt().port().to_string(),
        &["-i", "VIN-LOG-1", "-t", "vehicles/VIN-LOG-1/t", "-m", "x"],
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        gw.wait_log("CONNECT refused", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    assert!(
        gw.wait_log("connection closed before CONNECT", Duration::from_secs(5)),
        "{}",
        gw.log()
    );

    let lines = json_lines(&gw);
    let ready = find(&lines, "gateway ready").expect("gateway ready");
    assert_eq!(ready["level"], "INFO");
    assert!(ready["timestamp"].is_string());

    let garbage = find(&lines, "connection closed before CONNECT").unwrap();
    assert_eq!(garbage["level"], "WARN");
    assert_eq!(garbage["span"]["name"], "conn", "{garbage}");
    assert_eq!(garbage["span"]["listener"], "tcp", "{garbage}");
    assert_eq!(garbage["span"]["peer"], garbage_peer.as_str(), "{garbage}");
    assert!(garbage["span"].get("client_id").is_none(), "{garbage}");

    let refused = find(&lines, "CONNECT refused").unwrap();
    assert_eq!(refused["span"]["name"], "conn", "{refused}");
    assert_eq!(refused["span"]["listener"], "tcp", "{refused}");
    assert_eq!(refused["span"]["client_id"], "VIN-LOG-1", "{refused}");
    assert!(
        refused["span"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{refused}"
    );
}

#[test]
fn an_unknown_log_format_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, "[log]\nformat = \"xml\"\n").unwrap();
    let out = std::process::Command::new(integration::gateway_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("log.format"), "{text}");
    assert!(text.contains("human") && text.contains("json"), "{text}");
}
