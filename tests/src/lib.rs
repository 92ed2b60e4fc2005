//! Integration harness: starts the real `gateway` binary on port 0 with a config of the
//! test's choosing, learns its addresses from its log, and offers a raw MQTT client for
//! the hostile-input tests. Tests use real clients: rumqttc and mosquitto_pub/sub.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod certs;
pub mod kafka;
pub mod mqtt_raw2;
pub mod raw;

/// Path of the `gateway` binary built next to this test executable.
pub fn gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("gateway");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p gateway` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// A running gateway process with its own journal directory.
pub struct Gateway {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub mqtt: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

/// Config text for a test gateway; `extra` is appended (TOML sections).
///
/// Presence events are off: tests count and read the journal's records, in which a
/// connection's two events would be noise. `tests/tests/presence.rs` turns them on
/// (`GATEWAY_PRESENCE__ENABLED=true`).
pub fn config(journal_dir: &Path, extra: &str) -> String {
    format!(
        "[gateway]\nshutdown_grace_secs = 5\n\
         [mqtt]\nlisten = \"127.0.0.1:0\"\nconnect_timeout_secs = 2\n\
         [journal]\ndir = \"{}\"\nmax_bytes = 67108864\nsegment_bytes = 4194304\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [presence]\nenabled = false\n\
         {extra}",
        journal_dir.display()
    )
}

impl Gateway {
    /// Starts a gateway with `extra` config (it must include an `[auth]` section).
    pub fn start(extra: &str) -> Gateway {
        Self::start_env(extra, &[])
    }

    /// As [`Gateway::start`], with `GATEWAY_*` environment overrides.
    pub fn start_env(extra: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config(&dir.path().join("journal"), extra)).expect("write config");
        Self::spawn(dir, config_path, env)
    }

    /// Starts (or restarts) a gateway on an existing directory and config.
    pub fn start_in(dir: tempfile::TempDir, config_path: PathBuf) -> Gateway {
        Self::spawn(dir, config_path, &[])
    }

    /// As [`Gateway::start_in`], with `GATEWAY_*` environment overrides.
    pub fn start_in_env(dir: tempfile::TempDir, config_path: PathBuf, env: &[(&str, &str)]) -> Gateway {
        Self::spawn(dir, config_path, env)
    }

    /// As [`Gateway::start_env`], running another build of the gateway (`bin`).
    pub fn start_bin(bin: &Path, extra: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config(&dir.path().join("journal"), extra)).expect("write config");
        Self::spawn_bin(bin, dir, config_path, env)
    }

    fn spawn(dir: tempfile::TempDir, config_path: PathBuf, env: &[(&str, &str)]) -> Gateway {
        Self::spawn_bin(&gateway_bin(), dir, config_path, env)
    }

    fn spawn_bin(bin: &Path, dir: tempfile::TempDir, config_path: PathBuf, env: &[(&str, &str)]) -> Gateway {
        // A test's own RUST_LOG (in `env`) wins over the default.
        let mut child = Command::new(bin)
            .env(
                "RUST_LOG",
                std::env::var("EDGE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gateway");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("EDGE_TEST_LOG").is_some() {
                    eprintln!("gateway| {line}");
                }
                let _ = tx.send(line.clone());
                sink.lock().unwrap().push(line);
            }
        });
        let mut gw = Gateway {
            child: Some(child),
            dir,
            config_path,
            mqtt: None,
            tls: None,
            admin: None,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => panic!("gateway did not become ready:\n{}", gw.log()),
            };
            if line.contains("listener bound") {
                let addr: SocketAddr = field(&line, "addr").trim_matches('"').parse().expect("addr");
                match field(&line, "kind").trim_matches('"') {
                    "tcp" => gw.mqtt = Some(addr),
                    "tls" => gw.tls = Some(addr),
                    _ => gw.admin = Some(addr),
                }
            }
            if line.contains("gateway ready") {
                return gw;
            }
        }
    }

    pub fn mqtt(&self) -> SocketAddr {
        self.mqtt.expect("plain listener")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The last `n` lines of the gateway's log, for a failure message.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill9(mut self) -> (tempfile::TempDir, PathBuf) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        (dir, self.config_path.clone())
    }

    /// SIGTERM and wait for exit; returns the exit status success.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        false
    }

    /// Prometheus text from the admin listener.
    pub fn metrics(&self) -> String {
        http_get(self.admin.expect("admin"), "/metrics")
    }

    /// The value of one metric line (name with labels exactly as rendered).
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.strip_prefix(' '))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Every record in the journal, read after the gateway stopped.
    pub fn journal_records(dir: &Path) -> Vec<bridge::Record> {
        read_journal(&dir.join("journal"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A field of a log line, human (`name=value`) or JSON (`"name":"value"`, `log.format =
/// "json"`).
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=");
    if let Some(i) = line.find(&key) {
        return line[i + key.len()..].split_whitespace().next().unwrap_or("");
    }
    let key = format!("\"{name}\":");
    let start = line.find(&key).map(|i| i + key.len()).unwrap_or(line.len());
    line[start..].split([',', '}']).next().unwrap_or("")
}

/// Reads a journal directory with the bridge crate (the gateway must be stopped).
pub fn read_journal(dir: &Path) -> Vec<bridge::Record> {
    use bridge::Journal;
    let mut cfg = bridge::JournalConfig::new(dir, 67108864);
    cfg.segment_bytes = 4194304;
    let j = bridge::SegmentedJournal::open(cfg).expect("open journal");
    let mut r = j.reader(0);
    let mut out = Vec::new();
    loop {
        let batch = r.next_batch(1024).expect("read journal");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

/// Minimal HTTP/1.1 GET, enough for the admin API.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Minimal HTTP/1.1 request with an optional bearer token: (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    http_send(addr, method, path, token, "")
}

/// As [`http_request`], with a JSON body (none when empty): (status, body).
pub fn http_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let json = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{json}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Runs a command-line MQTT client and returns (exit code, stdout + stderr).
pub fn run_cli(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("{program} not runnable ({e}); the test set-up installs mosquitto-clients")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub const ANON: &str = "[auth]\nallow_anonymous = true\n";

/// A vehicle publishing QoS1 messages `0..count` (payload = the number) over a raw 3.1.1
/// connection, pipelined: one thread writes, one counts PUBACKs. `pace` sleeps between
/// messages so that a stream can span an outage.
pub struct Stream {
    pub acked: Arc<std::sync::atomic::AtomicUsize>,
    writer: std::thread::JoinHandle<()>,
    reader: std::thread::JoinHandle<()>,
}

impl Stream {
    pub fn start(addr: SocketAddr, id: &str, count: usize, pace: Duration) -> Stream {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (mut raw, code) = raw::Raw::mqtt311(addr, id, 0);
        assert_eq!(code, 0, "CONNACK for {id}");
        let mut reader = raw.split();
        reader.stream.set_read_timeout(None).expect("blocking");
        let acked = Arc::new(AtomicUsize::new(0));
        let counter = acked.clone();
        let reader = std::thread::spawn(move || {
            while let Some(p) = reader.read_packet() {
                if p[0] == 0x40 {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let topic = format!("vehicles/{id}/telemetry");
        let writer = std::thread::spawn(move || {
            for n in 0..count {
                let pkid = (n % 65_535) as u16 + 1;
                raw.publish311(&topic, pkid, n.to_string().as_bytes())
                    .expect("publish");
                if !pace.is_zero() {
                    std::thread::sleep(pace);
                }
            }
        });
        Stream {
            acked,
            writer,
            reader,
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `count` PUBACKs arrived; returns whether they did within `within`.
    pub fn wait_acked(&self, count: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.acked() < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.acked() >= count
    }

    pub fn finish(self) {
        let _ = self.writer.join();
        drop(self.reader);
    }
}

/// `[kafka]` and `[[routes]]` sections pointing a test gateway at `bootstrap`.
pub fn kafka_config(bootstrap: &str, topic: &str) -> String {
    format!(
        "[kafka]\nbootstrap = \"{bootstrap}\"\nlinger_ms = 5\ndead_letter_topic = \"\"\n\
         [[routes]]\nmqtt = \"vehicles/+/telemetry\"\nkafka_topic = \"{topic}\"\n\
         [auth]\nallow_anonymous = true\n"
    )
}

/// `len` pseudo-random base64 characters: compression cannot shrink them much.
pub fn incompressible(len: usize) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[(x >> 58) as usize],
            )
        })
        .collect()
}

/// Runs `mosquitto_pub` / `mosquitto_sub` against a local gateway on `port`.
pub fn mosquitto(program: &str, port: &str, args: &[&str]) -> (i32, String) {
    let mut all = vec!["-h", "127.0.0.1", "-p", port];
    all.extend_from_slice(args);
    run_cli(program, &all)
}

pub mod audit;
pub mod fleet;
pub mod haproxy;
pub mod hostile;
pub mod proxy;
pub mod tmpfs;
