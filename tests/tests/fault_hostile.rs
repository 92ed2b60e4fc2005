//! Fault suite, hostile clients while a well-behaved fleet runs: slowloris CONNECTs, slow
//! TLS handshakes, a connection flood past `mqtt.max_connections`, clients that never read
//! their PUBACKs, QoS 1 floods past Receive Maximum, 10,000 subscriptions from one client,
//! reconnect storms. Each CI test asserts containment: the gateway stays up, the fleet
//! keeps getting PUBACKs, and the hostile connection is closed with the documented reason
//! and metric. Throughput impact is measured, never asserted here: the ignored
//! `hostile_impact_figures` program (docs/RELIABILITY.md) writes the ratios.

use std::time::{Duration, Instant};

use integration::audit;
use integration::certs::Ca;
use integration::fleet::{Fleet, FleetConfig};
use integration::hostile::{self, Load, Tally};
use integration::{http_get, Gateway};

const MAX_CONNECTIONS: usize = 100;

/// A gateway with a TLS listener beside the plain one, 2 s CONNECT and handshake
/// timeouts, `max_connections` = 100, anonymous access, the embedded Kafka.
fn gateway() -> (Gateway, tempfile::TempDir) {
    gateway_with("")
}

/// As [`gateway`], with extra `[mqtt]` keys (one per line, each ending in a newline).
fn gateway_with(mqtt_extra: &str) -> (Gateway, tempfile::TempDir) {
    let pki = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(pki.path(), "hostile");
    let server = ca.server(pki.path());
    let tmp = tempfile::tempdir().expect("tempdir");
    let config_path = tmp.path().join("gateway.toml");
    let text = integration::config(
        &tmp.path().join("journal"),
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nhandshake_timeout_secs = 2\n[auth]\nallow_anonymous = true\n",
            server.cert.display(),
            server.key.display(),
        ),
    )
    .replace(
        "listen = \"127.0.0.1:0\"\nconnect",
        &format!("listen = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\nmax_connections = {MAX_CONNECTIONS}\n{mqtt_extra}connect"),
    );
    std::fs::write(&config_path, text).expect("config");
    (Gateway::start_in(tmp, config_path), pki)
}

fn fleet(gw: &Gateway, pace: Duration) -> Fleet {
    let mut cfg = FleetConfig::new("calm", 6);
    cfg.pace = pace;
    let f = Fleet::start(gw.mqtt(), &cfg);
    assert!(f.wait_acked(100, Duration::from_secs(30)), "fleet warm-up");
    f
}

/// The fleet still gets PUBACKs (progress, not a rate) and the gateway answers.
fn fleet_progresses(gw: &Gateway, fleet: &Fleet, case: &str) {
    let before = fleet.acked();
    assert!(
        fleet.wait_acked(before + 100, Duration::from_secs(30)),
        "{case}: the fleet stopped getting PUBACKs ({} after {before})",
        fleet.acked()
    );
    let health = http_get(gw.admin.expect("admin"), "/healthz");
    assert!(health.contains("\"ok\""), "{case}: /healthz {health}");
}

fn wait_until(within: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

fn finish(fleet: Fleet, case: &str) {
    let (logs, complete) = fleet.finish(Duration::from_secs(30));
    assert!(complete, "{case}: the fleet's last publishes were acknowledged");
    let resent = integration::audit::Audit::resends(&logs);
    let reconnects: u64 = logs.iter().map(|l| l.connects.saturating_sub(1)).sum();
    assert_eq!(
        reconnects, 0,
        "{case}: fleet vehicles lost their connections ({resent} re-sends)"
    );
}

fn closed(t: &Tally) -> u64 {
    Tally::get(&t.closed)
}

#[test]
fn slowloris_connects_are_cut_at_connect_timeout() {
    let case = "slowloris";
    let (gw, _pki) = gateway();
    let fleet = fleet(&gw, Duration::from_millis(10));
    let load = hostile::slowloris(gw.mqtt(), 50, Duration::from_millis(300));
    let tally = load.tally.clone();
    assert!(
        wait_until(Duration::from_secs(15), || closed(&tally) >= 50),
        "{case}: {} of 50 dribbling connections closed",
        closed(&tally)
    );
    fleet_progresses(&gw, &fleet, case);
    load.stop();
    let m = gw.metrics();
    assert!(
        audit::metric(&m, "gateway_protocol_errors_total{reason=\"connect_timeout\"}") >= 50,
        "{case}: counted as connect_timeout:\n{m}"
    );
    finish(fleet, case);
}

#[test]
fn slow_tls_handshakes_are_cut_at_handshake_timeout() {
    let case = "slow TLS";
    let (gw, _pki) = gateway();
    let fleet = fleet(&gw, Duration::from_millis(10));
    let load = hostile::slow_tls(gw.tls.expect("tls listener"), 30);
    let tally = load.tally.clone();
    assert!(
        wait_until(Duration::from_secs(15), || closed(&tally) >= 30),
        "{case}: {} of 30 stalled handshakes closed",
        closed(&tally)
    );
    fleet_progresses(&gw, &fleet, case);
    load.stop();
    let m = gw.metrics();
    assert!(
        audit::metric(
            &m,
            "gateway_connections_rejected_total{reason=\"tls_handshake_timeout\"}"
        ) >= 30,
        "{case}: counted as tls_handshake_timeout:\n{m}"
    );
    finish(fleet, case);
}

/// Starts a flood of 150 connections on a gateway allowing 100 while 6 vehicles are on.
fn flood(gw: &Gateway) -> (Load, std::sync::Arc<Tally>) {
    let load = hostile::connection_flood(gw.mqtt(), 150);
    let tally = load.tally.clone();
    let refused_at_least = (150 + 6 - MAX_CONNECTIONS) as u64;
    assert!(
        wait_until(Duration::from_secs(20), || closed(&tally) >= refused_at_least),
        "flood: {} connections closed, {} CONNACKed",
        closed(&tally),
        Tally::get(&tally.connacks_ok)
    );
    (load, tally)
}

#[test]
fn connection_flood_past_max_connections_is_refused() {
    let case = "connection flood";
    let (gw, _pki) = gateway();
    let fleet = fleet(&gw, Duration::from_millis(10));
    let (load, tally) = flood(&gw);
    fleet_progresses(&gw, &fleet, case);
    let ok = Tally::get(&tally.connacks_ok);
    assert!(
        ok + 6 <= MAX_CONNECTIONS as u64,
        "{case}: {ok} flood connections accepted beside the fleet, above max_connections"
    );
    let m = gw.metrics();
    assert!(
        audit::metric(
            &m,
            "gateway_connections_rejected_total{reason=\"max_connections\"}"
        ) >= 50,
        "{case}: counted as max_connections:\n{m}"
    );
    load.stop();
    finish(fleet, case);
}

/// Issue 7 fix 14: a refused CONNECT that could be read gets CONNACK 3 (server
/// unavailable) so that device SDKs back off.
#[test]
fn connection_flood_refusals_get_connack_server_unavailable() {
    let (gw, _pki) = gateway();
    let fleet = fleet(&gw, Duration::from_millis(10));
    let (load, tally) = flood(&gw);
    let refused = Tally::get(&tally.connacks_refused);
    assert!(
        refused >= 50 && Tally::get(&tally.last_refusal) == 3,
        "refused flood connections are told why: {} CONNACK refusals (last code {})",
        refused,
        Tally::get(&tally.last_refusal)
    );
    load.stop();
    finish(fleet, "connack 3");
}

/// Clients that publish and never read their PUBACKs. The gateway's send buffer to each
/// grows to 4 MiB (≈ 1 M PUBACKs) before its writes block, so in CI the deaf clients
/// mostly flood; `EDGE_FAULT_LONG=1` waits (up to 3 min) until every deaf socket is full.
#[test]
fn clients_that_never_read_do_not_stall_the_fleet() {
    let case = "never read";
    let (gw, _pki) = gateway();
    let fleet = fleet(&gw, Duration::from_millis(10));
    let deaf = 2;
    let load = hostile::never_read(gw.mqtt(), deaf, 5);
    let tally = load.tally.clone();
    let wait = if audit::long() { 180 } else { 10 };
    let full = wait_until(Duration::from_secs(wait), || {
        Tally::get(&tally.stuck) >= deaf as u64
    });
    fleet_progresses(&gw, &fleet, case);
    if full {
        std::thread::sleep(Duration::from_secs(10)); // past 1.5 × their 5 s keep-alive
        fleet_progresses(&gw, &fleet, case);
    }
    audit::report(
        "clients_that_never_read",
        &format!(
            "{deaf} deaf clients published {}, sockets full {full}, closed by the gateway {} of {deaf}",
            Tally::get(&tally.published),
            closed(&tally)
        ),
    );
    load.stop();
    finish(fleet, case);
}

#[test]
fn qos1_flood_past_receive_maximum_is_disconnected() {
    let case = "receive maximum";
    let (gw, _pki) = gateway();
    let fleet = fleet(&gw, Duration::from_millis(10));
    let load = hostile::receive_max_flood(gw.mqtt(), 2000);
    let tally = load.tally.clone();
    assert!(
        wait_until(Duration::from_secs(15), || closed(&tally) == 1),
        "{case}: the flooding client is disconnected"
    );
    assert_eq!(
        Tally::get(&tally.disconnect_reason),
        0x93,
        "{case}: DISCONNECT 0x93 (Receive Maximum exceeded)"
    );
    fleet_progresses(&gw, &fleet, case);
    load.stop();
    let m = gw.metrics();
    assert!(
        audit::metric(
            &m,
            "gateway_protocol_errors_total{reason=\"receive_maximum_exceeded\"}"
        ) >= 1,
        "{case}: counted:\n{m}"
    );
    finish(fleet, case);
}

#[test]
fn ten_thousand_subscriptions_are_contained() {
    let case = "10,000 subscriptions";
    let (gw, _pki) = gateway();
    let fleet = fleet(&gw, Duration::from_millis(10));
    let load = hostile::subscription_hog(gw.mqtt(), 10_000);
    let tally = load.tally.clone();
    let answered = || Tally::get(&tally.granted) + Tally::get(&tally.refused);
    let done = wait_until(Duration::from_secs(120), || {
        answered() >= 10_000 || closed(&tally) > 0
    });
    fleet_progresses(&gw, &fleet, case);
    audit::report(
        "ten_thousand_subscriptions",
        &format!(
            "answered {done}: granted {} refused {} closed {} disconnect reason {:#x}",
            Tally::get(&tally.granted),
            Tally::get(&tally.refused),
            closed(&tally),
            Tally::get(&tally.disconnect_reason)
        ),
    );
    assert!(done, "{case}: every SUBSCRIBE answered or the connection closed");
    load.stop();
    finish(fleet, case);
}

/// Issue 7 fix 13: subscriptions per connection are bounded (configured); past the bound a
/// SUBSCRIBE is refused (SUBACK failure) or the connection closed, never stored.
#[test]
fn subscriptions_per_connection_are_bounded() {
    let (gw, _pki) = gateway();
    let load = hostile::subscription_hog(gw.mqtt(), 10_000);
    let tally = load.tally.clone();
    let answered = || Tally::get(&tally.granted) + Tally::get(&tally.refused);
    wait_until(Duration::from_secs(120), || {
        answered() >= 10_000 || closed(&tally) > 0
    });
    assert!(
        Tally::get(&tally.refused) > 0 || closed(&tally) > 0,
        "10,000 subscriptions all granted: {} granted",
        Tally::get(&tally.granted)
    );
    assert!(Tally::get(&tally.granted) < 10_000);
    load.stop();
}

#[test]
fn reconnect_storm_leaves_the_fleet_alone() {
    let case = "reconnect storm";
    let (gw, _pki) = gateway();
    let fleet = fleet(&gw, Duration::from_millis(10));
    let load = hostile::reconnect_storm(gw.mqtt(), 4, 20);
    let tally = load.tally.clone();
    assert!(
        wait_until(Duration::from_secs(30), || Tally::get(&tally.opened) >= 500),
        "{case}: storm running ({} connections)",
        Tally::get(&tally.opened)
    );
    fleet_progresses(&gw, &fleet, case);
    let opened = Tally::get(&tally.opened);
    load.stop();
    // The storm's connections go away; only the fleet stays.
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .metric("gateway_connections_active")
            <= 6),
        "{case}: connections after the storm: {}",
        gw.metric("gateway_connections_active")
    );
    audit::report("reconnect_storm", &format!("storm connections {opened}"));
    finish(fleet, case);
}

/// Measuring program (not a test of rates): for each hostile load, the fleet's PUBACK
/// rate with the load running divided by the mean of its undisturbed rates just before
/// and just after, so that machine noise between loads mostly cancels out. Target ≥ 0.8. The fleet is paced
/// (`EDGE_FAULT_PACE_MS`, default 2 ms between publishes per vehicle, 6 vehicles: what
/// vehicles offer) or saturating (`EDGE_FAULT_PACE_MS=0`: as fast as a window of 8
/// allows, which measures fairness rather than containment). Run with
/// `cargo test --release -p integration --test fault_hostile -- --ignored hostile_impact_figures --nocapture`
/// (`EDGE_FAULT_REPORT=<file>` appends the figures; `EDGE_FAULT_LONG=1` measures 20 s windows).
#[test]
#[ignore = "measurement program: run with --ignored (see docs/RELIABILITY.md)"]
fn hostile_impact_figures() {
    let secs = if audit::long() { 20 } else { 6 };
    let window = Duration::from_secs(secs);
    let pace_ms: u64 = std::env::var("EDGE_FAULT_PACE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let (gw, _pki) = gateway();
    let mut cfg = FleetConfig::new("calm", 6);
    cfg.pace = Duration::from_millis(pace_ms);
    let fleet = Fleet::start(gw.mqtt(), &cfg);
    assert!(fleet.wait_acked(1000, Duration::from_secs(30)));
    let rate = |fleet: &Fleet| {
        let a = fleet.acked();
        let t = Instant::now();
        std::thread::sleep(window);
        (fleet.acked() - a) as f64 / t.elapsed().as_secs_f64()
    };
    let mut lines = Vec::new();
    let mut worst = f64::MAX;
    type Start = Box<dyn Fn(&Gateway) -> Load>;
    let loads: Vec<(&str, Start)> = vec![
        (
            "slowloris x200",
            Box::new(|g: &Gateway| hostile::slowloris(g.mqtt(), 200, Duration::from_millis(300))),
        ),
        (
            "slow TLS x200",
            Box::new(|g: &Gateway| hostile::slow_tls(g.tls.expect("tls"), 200)),
        ),
        (
            "connection flood x150",
            Box::new(|g: &Gateway| hostile::connection_flood(g.mqtt(), 150)),
        ),
        (
            "never read x8",
            Box::new(|g: &Gateway| hostile::never_read(g.mqtt(), 8, 5)),
        ),
        (
            "receive-max flood",
            Box::new(|g: &Gateway| hostile::receive_max_flood(g.mqtt(), 5000)),
        ),
        (
            "10,000 subscriptions",
            Box::new(|g: &Gateway| hostile::subscription_hog(g.mqtt(), 10_000)),
        ),
        (
            "reconnect storm x4",
            Box::new(|g: &Gateway| hostile::reconnect_storm(g.mqtt(), 4, 20)),
        ),
    ];
    let mut after = rate(&fleet);
    for (name, start) in &loads {
        // Baseline: the undisturbed rates just before and just after the load.
        let before = after;
        let load = start(&gw);
        std::thread::sleep(Duration::from_millis(500));
        let r = rate(&fleet);
        load.stop();
        std::thread::sleep(Duration::from_secs(3)); // let timeouts clear the leftovers
        after = rate(&fleet);
        let base = (before + after) / 2.0;
        let ratio = r / base.max(1.0);
        worst = worst.min(ratio);
        lines.push(format!(
            "{name}: {r:.0} msg/s vs {before:.0} before / {after:.0} after, ratio {ratio:.2}"
        ));
    }
    let (_, complete) = fleet.finish(Duration::from_secs(30));
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut report =
        format!("{build} build, fleet 6 vehicles, pace {pace_ms} ms, window 8, {secs} s windows; ");
    report.push_str(&lines.join("; "));
    report.push_str(&format!("; worst ratio {worst:.2}; fleet completed {complete}"));
    audit::report("hostile_impact_figures", &report);
}

/// A client that never reads its PUBACKs holds its connection only until the gateway's
/// writes to it have been blocked past 1.5 × its keep-alive: then it is closed and
/// counted, like any other stalled peer. Takes ~40 s (the socket buffers must fill).
#[test]
fn never_reading_client_is_closed_once_its_socket_is_full() {
    // Unpaced: at the default mqtt.max_publish_rate the deaf client's PUBACKs trickle
    // (1,000/s, 4 bytes each) and take many minutes to fill its socket. This test is
    // about what happens once they do: the gateway's writes time out and it closes it.
    let (gw, _pki) = gateway_with("max_publish_rate = 0\n");
    let load = hostile::never_read(gw.mqtt(), 1, 5);
    let tally = load.tally.clone();
    assert!(
        wait_until(Duration::from_secs(180), || Tally::get(&tally.stuck) >= 1),
        "the deaf client's socket filled"
    );
    assert!(
        wait_until(Duration::from_secs(30), || closed(&tally) >= 1),
        "the gateway closed the deaf client ({} published)",
        Tally::get(&tally.published)
    );
    load.stop();
}
