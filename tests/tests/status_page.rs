//! The status page at `/` in a real browser: headless Chromium (Debian package
//! `chromium`, installed by scripts/test.sh) loads it from the real gateway, runs its
//! script for a few refreshes of virtual time, and the figures it renders are compared
//! with what the API and `/metrics` say at that moment. The page must be
//! self-contained (no external resource, strict CSP), take its token from the URL
//! fragment, and ask for one when the API answers 401.
//!
//! Latency percentiles are checked twice: against the gateway's own `/metrics` (the
//! page shows "–" while the gateway exposes no such histogram), and against canned
//! histograms served by a small proxy in front of the gateway, so the page's
//! `histogram_quantile` is always exercised and compared with the one below.
//!
//! `UPDATE_SCREENSHOT=1` writes the screenshot of the first test to
//! `docs/status-page.png` (the README shows it); otherwise it goes to a temp dir.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration::{http_send, Gateway, ANON};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

const TOKEN: &str = "status-page-test-token-0123456789";
const PUBACK: &str = "gateway_puback_latency_seconds";
const DELIVERY: &str = "gateway_bridge_delivery_latency_seconds";
const DASH: &str = "\u{2013}";
/// Virtual time the page runs in the browser: refreshes at 0, 2, 4 and 6 s.
const VIRTUAL_TIME_MS: u32 = 7000;

fn gateway() -> Gateway {
    Gateway::start_env(
        &format!("{ANON}[kafka]\nbootstrap = \"embedded\"\n"),
        &[("GATEWAY_ADMIN__TOKEN", TOKEN)],
    )
}

fn api(admin: SocketAddr, method: &str, path: &str) -> Value {
    let (code, text) = http_send(admin, method, path, Some(TOKEN), "");
    assert_eq!(code, 200, "{method} {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn status_page_shows_what_the_api_says() {
    let gw = gateway();
    let admin = gw.admin.expect("admin listener");
    check_served_page(admin);

    // Three vehicles publish QoS 1; the bridge delivers it all. Then the bridge is paused
    // and one more burst stays in the journal, so the page has records, an age and a
    // paused bridge to show. Traffic stops; the connections stay open.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let vehicles: Vec<Vehicle> = (1..=3)
        .map(|n| rt.block_on(Vehicle::connect(gw.mqtt(), &format!("VIN-PAGE-{n}"))))
        .collect();
    for v in &vehicles {
        rt.block_on(v.publish(20));
    }
    for v in &vehicles {
        v.wait_acked(20);
    }
    wait_for(
        "the bridge to deliver everything",
        Duration::from_secs(20),
        || api(admin, "GET", "/api/v1/journal")["records"] == 0,
    );
    assert_eq!(api(admin, "POST", "/api/v1/bridge/pause")["paused"], true);
    rt.block_on(vehicles[0].publish(7));
    vehicles[0].wait_acked(27);
    wait_for("7 records held in the journal", Duration::from_secs(10), || {
        api(admin, "GET", "/api/v1/journal")["records"] == 7
    });

    let before = Snapshot::take(admin);
    let shot = screenshot_path();
    let page = Page::render(&format!("http://{admin}/#token={TOKEN}"), &shot.path);
    let after = Snapshot::take(admin);

    // Nothing moved while the browser looked (traffic stopped, bridge paused), so "the
    // API at that moment" is both snapshots.
    for (what, a, b) in [
        (
            "connections",
            &before.status["connections"],
            &after.status["connections"],
        ),
        ("sessions", &before.status["sessions"], &after.status["sessions"]),
        (
            "journal records",
            &before.journal["records"],
            &after.journal["records"],
        ),
        (
            "journal bytes",
            &before.journal["disk_bytes"],
            &after.journal["disk_bytes"],
        ),
        ("bridge state", &before.bridge["state"], &after.bridge["state"]),
        (
            "bridge delivered",
            &before.bridge["delivered"],
            &after.bridge["delivered"],
        ),
    ] {
        assert_eq!(a, b, "{what} changed while the page was rendered");
    }
    assert_eq!(before.received(), after.received());
    for name in [PUBACK, DELIVERY] {
        assert_eq!(
            buckets(&before.metrics, name),
            buckets(&after.metrics, name),
            "{name} moved"
        );
    }

    page.assert_live();
    let api = &after;
    assert_eq!(api.status["connections"], 3, "{}", api.status);
    page.assert_shows("connections", &api.status["connections"].to_string());
    page.assert_shows("sessions", &api.status["sessions"].to_string());
    page.assert_shows("version", api.status["version"].as_str().unwrap());
    page.assert_shows("received", &api.received().to_string());
    assert_eq!(api.received(), 67.0);
    // Traffic stopped before the page's first refresh: two refreshes, no new messages.
    page.assert_shows("ingest-rate", "0.0");
    assert_eq!(page.value("ingest-rate"), "0");

    assert_eq!(api.journal["records"], 7);
    page.assert_shows("journal-records", &api.journal["records"].to_string());
    assert_eq!(
        page.value("journal-bytes"),
        api.journal["disk_bytes"].to_string(),
        "journal bytes"
    );
    page.assert_shows("journal-full", "no");
    page.assert_shows("journal-stalled", "no");
    // The age the page got lies between the two snapshots'.
    let age: f64 = page.value("journal-age").parse().unwrap();
    let (lo, hi) = (
        before.journal["oldest_age_secs"].as_f64().unwrap(),
        after.journal["oldest_age_secs"].as_f64().unwrap(),
    );
    assert!(
        lo <= age && age <= hi,
        "journal age {age} not within [{lo}, {hi}]"
    );
    assert!(
        page.text("journal-age").ends_with(" s"),
        "{}",
        page.text("journal-age")
    );

    page.assert_shows("bridge-state", api.bridge["state"].as_str().unwrap());
    assert_eq!(api.bridge["paused"], true);
    page.assert_shows("bridge-paused", "yes");
    assert!(page.dom.contains("Kafka bridge PAUSED"), "no paused banner");
    assert!(api.bridge["failed"].is_null(), "{}", api.bridge);
    page.assert_shows("bridge-failed", "no");
    page.assert_shows("bridge-delivered", &api.bridge["delivered"].to_string());

    for (prefix, name) in [("puback", PUBACK), ("kafka", DELIVERY)] {
        let b = buckets(&api.metrics, name);
        for q in [0.5, 0.99] {
            let id = format!("{prefix}-p{}", (q * 100.0_f64).round());
            match histogram_quantile(q, &b) {
                Some(expected) => page.assert_latency(&id, expected),
                None => {
                    // Not exposed by this gateway (yet), or no observation.
                    page.assert_shows(&id, DASH);
                    assert_eq!(page.value(&id), "", "{id}");
                }
            }
        }
    }

    assert!(shot.path.exists(), "no screenshot at {}", shot.path.display());
    let png = std::fs::read(&shot.path).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot is not a PNG"
    );
    drop(vehicles);
}

#[test]
fn page_asks_for_the_token_when_the_api_answers_401() {
    let gw = gateway();
    let admin = gw.admin.expect("admin listener");
    check_served_page(admin);
    let shots = tempfile::tempdir().unwrap();
    for url in [
        format!("http://{admin}/"),
        format!("http://{admin}/#token=not-the-token"),
    ] {
        let page = Page::render(&url, &shots.path().join("401.png"));
        assert_eq!(
            page.body_attr("data-state"),
            "unauthorized",
            "{url}: {}",
            page.dom
        );
        assert!(
            !page.tag("id=\"login\"").contains("hidden"),
            "{url}: the token form is hidden"
        );
        page.assert_shows("connections", DASH);
    }
}

#[test]
fn percentiles_and_rate_follow_the_metrics() {
    let gw = gateway();
    let admin = gw.admin.expect("admin listener");
    check_served_page(admin);
    let proxy = CannedMetrics::start(admin);
    let shots = tempfile::tempdir().unwrap();
    let page = Page::render(
        &format!("http://{}/#token={TOKEN}", proxy.addr),
        &shots.path().join("canned.png"),
    );
    page.assert_live();
    let metrics = CannedMetrics::doctor(&integration::http_get(admin, "/metrics"), 0);
    // By hand: p50 of PUBACK lies in (2.5 ms, 5 ms] at 10/50 of the way; p99 in
    // (10 ms, 50 ms] at 2/3; p50 of delivery is exactly the 100 ms bound; p99 falls into
    // the +Inf bucket, which PromQL answers with the highest finite bound, 1 s.
    for (id, name, q, by_hand, text) in [
        ("puback-p50", PUBACK, 0.5, 0.003, "3.00 ms"),
        ("puback-p99", PUBACK, 0.99, 0.01 + 0.04 * 2.0 / 3.0, "36.7 ms"),
        ("kafka-p50", DELIVERY, 0.5, 0.1, "100 ms"),
        ("kafka-p99", DELIVERY, 0.99, 1.0, "1.00 s"),
    ] {
        let computed = histogram_quantile(q, &buckets(&metrics, name)).unwrap();
        assert!(
            (computed - by_hand).abs() < 1e-12,
            "{id}: {computed} vs {by_hand}"
        );
        page.assert_latency(id, computed);
        page.assert_shows(id, text);
    }
    // Each scrape of the proxy's /metrics adds 100 messages; refreshes are 2 s (plus
    // the fetches' own virtual time) apart.
    let rate: f64 = page.value("ingest-rate").parse().unwrap();
    assert!((45.0..=50.0).contains(&rate), "ingest rate {rate}");
    assert_eq!(page.text("ingest-rate"), format!("{rate:.1}"));
}

// --- the page as served -------------------------------------------------------------

/// Headers and body of `GET /`; the CSP names the page's own script and style.
fn check_served_page(admin: SocketAddr) {
    let (code, headers, body) = get_raw(admin, "/");
    assert_eq!(code, 200, "{body}");
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-store");
    let csp = &headers["content-security-policy"];
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    for tag in ["script", "style"] {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        let start = body.find(&open).unwrap() + open.len();
        let end = body.find(&close).unwrap();
        let hash = format!("'sha256-{}'", sha256_base64(&body[start..end]));
        assert!(
            csp.contains(&hash),
            "status.html's <{tag}> changed: put {hash} in gateway/src/admin/page.rs (CSP now: {csp})"
        );
    }
    assert_no_external_references("the served page", &body);
    // The rest of the API still needs the token; the page is only a page.
    assert_eq!(
        integration::http_request(admin, "GET", "/api/v1/status", None).0,
        401
    );
}

fn get_raw(addr: SocketAddr, path: &str) -> (u16, HashMap<String, String>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let code = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (code, headers, body.to_string())
}

fn sha256_base64(text: &str) -> String {
    let mut child = Command::new("sh")
        .args(["-c", "openssl dgst -sha256 -binary | openssl base64 -A"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl failed (scripts/test.sh installs it)"
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// No `src`/`href` leaving the gateway: the page must work in an air-gapped region.
fn assert_no_external_references(what: &str, html: &str) {
    let lower = html.to_ascii_lowercase();
    for needle in ["http://", "https://", "@import", "url("] {
        assert!(!lower.contains(needle), "{what} contains {needle:?}");
    }
    for attr in ["src=", "href="] {
        for (i, _) in lower.match_indices(attr) {
            let value = lower[i + attr.len()..].trim_start_matches(['"', '\'']);
            assert!(
                value.starts_with("data:") || value.starts_with('#'),
                "{what}: external {attr}{}",
                &value[..value.len().min(60)]
            );
        }
    }
}

// --- MQTT traffic -------------------------------------------------------------------

/// A vehicle on rumqttc whose event loop runs (keep alive, PUBACKs counted) until dropped.
struct Vehicle {
    client: AsyncClient,
    id: String,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Vehicle {
    async fn connect(addr: SocketAddr, id: &str) -> Vehicle {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 100);
        let acked = Arc::new(AtomicUsize::new(0));
        let (connected, up) = tokio::sync::oneshot::channel();
        let counter = acked.clone();
        let who = id.to_string();
        let task = tokio::spawn(async move {
            let mut connected = Some(connected);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(c) = connected.take() {
                            let _ = c.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("{who}: {e}"),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), up)
            .await
            .expect("CONNACK")
            .expect("event loop");
        Vehicle {
            client,
            id: id.to_string(),
            acked,
            task,
        }
    }

    async fn publish(&self, count: usize) {
        let topic = format!("vehicles/{}/telemetry", self.id);
        for i in 0..count {
            self.client
                .publish(&topic, QoS::AtLeastOnce, false, format!("{{\"seq\":{i}}}"))
                .await
                .unwrap();
        }
    }

    fn wait_acked(&self, total: usize) {
        wait_for(
            &format!("{total} PUBACKs for {}", self.id),
            Duration::from_secs(15),
            || self.acked.load(Ordering::Relaxed) >= total,
        );
    }
}

impl Drop for Vehicle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// --- what the API says ----------------------------------------------------------------

struct Snapshot {
    status: Value,
    journal: Value,
    bridge: Value,
    metrics: String,
}

impl Snapshot {
    fn take(admin: SocketAddr) -> Snapshot {
        Snapshot {
            status: api(admin, "GET", "/api/v1/status"),
            journal: api(admin, "GET", "/api/v1/journal"),
            bridge: api(admin, "GET", "/api/v1/bridge"),
            metrics: integration::http_get(admin, "/metrics"),
        }
    }

    /// PUBLISHes accepted, every QoS.
    fn received(&self) -> f64 {
        samples(&self.metrics, "gateway_messages_received_total")
            .iter()
            .map(|(_, v)| v)
            .sum()
    }
}

/// The samples of one metric: (labels as written, value).
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            Some((labels.to_string(), prom_value(value.trim())))
        })
        .collect()
}

fn prom_value(s: &str) -> f64 {
    match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => s.parse().unwrap_or(f64::NAN),
    }
}

/// A classic histogram's cumulative buckets (upper bound, count), summed by `le`,
/// sorted by bound; empty when `/metrics` has no such histogram.
fn buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (labels, count) in samples(metrics, &format!("{name}_bucket")) {
        let Some(le) = labels.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let le = prom_value(le);
        match out.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += count,
            None => out.push((le, count)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// PromQL's `histogram_quantile` over classic buckets (prometheus/promql/quantile.go,
/// `bucketQuantile`), written independently of the page's: None where PromQL gives NaN.
fn histogram_quantile(q: f64, sorted: &[(f64, f64)]) -> Option<f64> {
    if sorted.len() < 2 || sorted.last()?.0 != f64::INFINITY {
        return None;
    }
    let mut b = sorted.to_vec();
    for i in 1..b.len() {
        b[i].1 = b[i].1.max(b[i - 1].1);
    }
    let total = b.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let i = b[..b.len() - 1]
        .iter()
        .position(|(_, c)| *c >= rank)
        .unwrap_or(b.len() - 1);
    if i == b.len() - 1 {
        return Some(b[b.len() - 2].0);
    }
    if i == 0 && b[0].0 <= 0.0 {
        return Some(b[0].0);
    }
    let (start, below) = if i > 0 { b[i - 1] } else { (0.0, 0.0) };
    Some(start + (b[i].0 - start) * ((rank - below) / (b[i].1 - below)))
}

// --- the browser ------------------------------------------------------------------------

/// One Chromium at a time: they are heavy on a shared machine.
static BROWSER: Mutex<()> = Mutex::new(());

fn chromium() -> String {
    let bin = std::env::var("EDGE_TEST_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => bin,
        Ok(o) => panic!("`{bin} --version` failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!(
            "{bin} is not runnable ({e}): the status page test needs headless Chromium; install the \
             Debian package `chromium` (scripts/test.sh does) or set EDGE_TEST_CHROMIUM to a Chromium binary"
        ),
    }
}

struct Screenshot {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

fn screenshot_path() -> Screenshot {
    if std::env::var("UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/status-page.png");
        return Screenshot { path, _dir: None };
    }
    let dir = tempfile::tempdir().unwrap();
    Screenshot {
        path: dir.path().join("status-page.png"),
        _dir: Some(dir),
    }
}

/// The DOM as the page rendered it after [`VIRTUAL_TIME_MS`] of virtual time.
struct Page {
    dom: String,
}

impl Page {
    fn render(url: &str, screenshot: &Path) -> Page {
        let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
            ])
            .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--screenshot={}", screenshot.display()))
            .arg("--dump-dom")
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chromium");
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish within 90 s: {}", err.join().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let dom = out.join().unwrap();
        let err = err.join().unwrap();
        assert!(
            status.success() && dom.contains("</html>"),
            "chromium failed ({status}): {err}"
        );
        assert_no_external_references("the rendered page", &dom);
        Page { dom }
    }

    /// The start tag holding `needle` (an attribute as serialized).
    fn tag(&self, needle: &str) -> &str {
        let at = self
            .dom
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle} in the page"));
        let start = self.dom[..at].rfind('<').unwrap();
        let end = at + self.dom[at..].find('>').unwrap();
        &self.dom[start..=end]
    }

    fn body_attr(&self, name: &str) -> String {
        attr(self.tag("<body"), name).unwrap_or_default()
    }

    /// The script ran and refreshed at least twice (so the rate has two samples).
    fn assert_live(&self) {
        let refreshes: u32 = self.body_attr("data-refreshes").parse().unwrap_or(0);
        assert!(
            self.body_attr("data-state") == "live" && refreshes >= 2,
            "the page is {:?} after {refreshes} refreshes (a script blocked by the CSP never \
             refreshes: check the hashes in page.rs):\n{}",
            self.body_attr("data-state"),
            self.dom
        );
    }

    fn figure(&self, id: &str) -> (&str, Option<String>) {
        let tag = self.tag(&format!("data-figure=\"{id}\""));
        let at = self.dom.find(tag).unwrap() + tag.len();
        let text = &self.dom[at..at + self.dom[at..].find('<').unwrap()];
        (text, attr(tag, "data-value"))
    }

    fn text(&self, id: &str) -> String {
        unescape(self.figure(id).0)
    }

    /// The raw value behind a figure ("" when the page shows "–").
    fn value(&self, id: &str) -> String {
        self.figure(id)
            .1
            .unwrap_or_else(|| panic!("figure {id} has no data-value: never rendered"))
    }

    fn assert_shows(&self, id: &str, expected: &str) {
        assert_eq!(self.text(id), expected, "figure {id}");
    }

    /// The percentile the page computed is exactly ours, and its text says the same
    /// (in ms below 1 s, with at most 2 decimals, or in s).
    fn assert_latency(&self, id: &str, seconds: f64) {
        let raw: f64 = self.value(id).parse().unwrap();
        assert_eq!(raw, seconds, "figure {id}: the page's histogram_quantile differs");
        let text = self.text(id);
        let (number, scale) = match text.strip_suffix(" ms") {
            Some(n) => (n, 1000.0),
            None => (
                text.strip_suffix(" s").unwrap_or_else(|| panic!("{id}: {text}")),
                1.0,
            ),
        };
        let shown: f64 = number.parse().unwrap();
        assert!(
            (shown - seconds * scale).abs() <= 0.0051 * shown.max(1.0),
            "figure {id} shows {text} for {seconds} s"
        );
    }
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let end = start + tag[start..].find('"')?;
    Some(unescape(&tag[start..end]))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

// --- canned histograms ----------------------------------------------------------------

/// A proxy in front of the gateway's admin listener that serves its page and API as they
/// are and its `/metrics` with two canned latency histograms (replacing the gateway's
/// own, if any) and 100 more received messages per scrape.
struct CannedMetrics {
    addr: SocketAddr,
}

const CANNED: &str = "\
# TYPE gateway_puback_latency_seconds histogram
gateway_puback_latency_seconds_bucket{le=\"0.001\"} 5
gateway_puback_latency_seconds_bucket{le=\"0.0025\"} 40
gateway_puback_latency_seconds_bucket{le=\"0.005\"} 90
gateway_puback_latency_seconds_bucket{le=\"0.01\"} 97
gateway_puback_latency_seconds_bucket{le=\"0.05\"} 100
gateway_puback_latency_seconds_bucket{le=\"+Inf\"} 100
gateway_puback_latency_seconds_sum 0.41
gateway_puback_latency_seconds_count 100
# TYPE gateway_bridge_delivery_latency_seconds histogram
gateway_bridge_delivery_latency_seconds_bucket{le=\"0.01\"} 10
gateway_bridge_delivery_latency_seconds_bucket{le=\"0.1\"} 50
gateway_bridge_delivery_latency_seconds_bucket{le=\"1\"} 90
gateway_bridge_delivery_latency_seconds_bucket{le=\"+Inf\"} 100
gateway_bridge_delivery_latency_seconds_sum 61.5
gateway_bridge_delivery_latency_seconds_count 100
";

impl CannedMetrics {
    fn start(gateway: SocketAddr) -> CannedMetrics {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let scrapes = Arc::new(AtomicU64::new(0));
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let scrapes = scrapes.clone();
                std::thread::spawn(move || Self::serve(conn, gateway, &scrapes));
            }
        });
        CannedMetrics { addr }
    }

    /// The gateway's metrics with the canned histograms, as at scrape `n`.
    fn doctor(metrics: &str, n: u64) -> String {
        let mut out = String::new();
        for line in metrics.lines() {
            if line.contains(PUBACK) || line.contains(DELIVERY) {
                continue;
            }
            match line.strip_prefix("gateway_messages_received_total{qos=\"1\"} ") {
                Some(v) => out.push_str(&format!(
                    "gateway_messages_received_total{{qos=\"1\"}} {}\n",
                    v.parse::<u64>().unwrap() + 100 * n
                )),
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out + CANNED
    }

    fn serve(mut conn: TcpStream, gateway: SocketAddr, scrapes: &AtomicU64) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match conn.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let token = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Authorization: Bearer ")
                    .or(l.strip_prefix("authorization: Bearer "))
            })
            .map(str::to_string);
        let (code, mut headers, body) = if path == "/metrics" {
            let n = scrapes.fetch_add(1, Ordering::Relaxed);
            let metrics = integration::http_get(gateway, "/metrics");
            let doctored = Self::doctor(&metrics, n);
            (200, HashMap::new(), doctored)
        } else if path.starts_with("/api/") {
            let (code, body) = http_send(gateway, "GET", &path, token.as_deref(), "");
            (code, HashMap::new(), body)
        } else {
            get_raw(gateway, &path)
        };
        let ctype = headers.remove("content-type").unwrap_or_else(|| {
            if path.starts_with("/api/") {
                "application/json"
            } else {
                "text/plain"
            }
            .into()
        });
        let csp = headers
            .remove("content-security-policy")
            .map(|c| format!("Content-Security-Policy: {c}\r\n"))
            .unwrap_or_default();
        let _ = write!(
            conn,
            "HTTP/1.1 {code} X\r\nContent-Type: {ctype}\r\n{csp}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}
