//! The MQTT 3.1.1/5.0 conformance suite (tests/conformance, Python + paho-mqtt) against the
//! real gateway: a permissive ACL so that the suite may use any topic, a one-second
//! session-expiry sweep so that the expiry tests stay short, no publish rate limit.
//! `scripts/test.sh` creates `.venv-tests/`; the suite's reference run against Mosquitto
//! is a manual command (tests/conformance/README.md).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::Gateway;

const PERMISSIVE: &str = "[auth]\nallow_anonymous = true\npublish_acl = [\"#\"]\nsubscribe_acl = [\"#\"]\n";

/// The workspace root (the parent of this package's directory).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().expect("workspace root").to_path_buf()
}

#[test]
fn paho_conformance_suite_passes_against_the_gateway() {
    let root = workspace_root();
    let python = root.join(".venv-tests/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/test.sh (it creates .venv-tests with paho-mqtt and pytest)",
        python.display()
    );
    let gw = Gateway::start_env(
        PERMISSIVE,
        &[
            ("GATEWAY_SESSIONS__EXPIRY_CHECK_SECS", "1"),
            ("GATEWAY_MQTT__MAX_PUBLISH_RATE", "0"),
        ],
    );
    let addr = gw.mqtt();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out_path = out_dir.path().join("pytest.out");
    let out = std::fs::File::create(&out_path).expect("output file");
    let mut child = Command::new(&python)
        .args(["-m", "pytest", "tests/conformance", "-q", "-rfE"])
        .current_dir(&root)
        .env("MQTT_HOST", addr.ip().to_string())
        .env("MQTT_PORT", addr.port().to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("CONFORMANCE_SERVER")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup output"))
        .stderr(out)
        .spawn()
        .expect("run pytest");
    // The suite takes under a minute; a hang is a failure, not a stuck CI run.
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait pytest") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => {}
        Some(s) => {
            let log = gw.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "conformance suite failed ({s}) against the gateway at {addr}:\n{output}\n\
                 --- last 200 gateway log lines ---\n{}",
                tail.join("\n")
            )
        }
        None => panic!("conformance suite did not finish within 240 s:\n{output}"),
    }
}
