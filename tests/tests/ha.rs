//! High availability behind a load balancer: HAProxy (TCP mode) in front of two
//! gateways, each with its own journal, producing to one real Kafka. A fleet of 50
//! vehicles publishes QoS 1 at 50 msgs/s each through HAProxy. Gateway 1's bridge is
//! paused for two seconds (so its journal holds acknowledged records Kafka does not have
//! yet, as after a Kafka hiccup) and then it is SIGKILLed: its vehicles reconnect through
//! HAProxy to gateway 2 and carry on. Gateway 1 then restarts on its journal and drains
//! it. Every message the fleet got a PUBACK for must be in Kafka (checked by vehicle id
//! and counter in the payload).
//!
//! Per-vehicle order across the failover is not asserted, and it is not kept: the
//! records gateway 1 acknowledged before it died reach Kafka when it drains, after what
//! the same vehicles sent through gateway 2 meanwhile (docs/OPERATIONS.md, "A gateway
//! dies"). The run prints how many vehicles that affected.

use std::time::{Duration, Instant};

use integration::audit::{self, Audit};
use integration::fleet::{Fleet, FleetConfig};
use integration::haproxy::{region_gateway, HaProxy};
use integration::kafka::{free_tcp_port, free_tcp_ports, Kafka};
use integration::{http_request, kafka_config, Gateway};

const PARTITIONS: i32 = 4;
const VEHICLES: usize = 50;

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_gateways_vehicles_move_to_the_other_and_its_journal_drains_on_restart() {
    let kafka = Kafka::start();
    kafka.create_topic("ha", PARTITIONS);
    let kcfg = kafka_config(&kafka.bootstrap(), "ha");
    let [p1, p2] = free_tcp_ports();
    let gw1 = region_gateway(p1, "gw1", &kcfg);
    let gw2 = region_gateway(p2, "gw2", &kcfg);
    let lb = HaProxy::start(&[p1, p2]);
    wait_for("HAProxy to see both gateways up", Duration::from_secs(10), || {
        lb.servers_up().iter().filter(|(_, up)| *up).count() == 2
    });

    let mut cfg = FleetConfig::new("ha", VEHICLES);
    cfg.pace = Duration::from_millis(20); // 50 msgs/s per vehicle, 2,500/s in all
    cfg.window = 8;
    let fleet = Fleet::start(lb.addr, &cfg);
    assert!(
        fleet.wait_acked(VEHICLES as u64 * 50, Duration::from_secs(30)),
        "the fleet gets PUBACKs through HAProxy: {} acked\n{}",
        fleet.acked(),
        lb.log()
    );
    let active = |g: &Gateway| g.metric("gateway_connections_active");
    let (on1, on2) = (active(&gw1), active(&gw2));
    eprintln!("before the kill: gateway 1 holds {on1} vehicles, gateway 2 {on2}");
    assert_eq!(on1 + on2, VEHICLES as u64, "every vehicle connected once");
    assert!(on1 > 0 && on2 > 0, "HAProxy spread the vehicles: {on1} / {on2}");

    // Gateway 1 keeps acknowledging into its journal while its bridge is paused: those
    // records are acknowledged and not in Kafka when it dies.
    let (code, body) = http_request(gw1.admin.expect("admin"), "POST", "/api/v1/bridge/pause", None);
    assert_eq!(code, 200, "{body}");
    std::thread::sleep(Duration::from_secs(2));
    let m = gw1.metrics();
    let backlog =
        audit::metric(&m, "gateway_journal_durable_seq") - audit::metric(&m, "gateway_journal_released_seq");
    assert!(
        backlog > 500,
        "gateway 1's journal holds a backlog before the kill: {backlog}"
    );
    let acked_at_kill = fleet.acked();
    let (dir1, config1) = gw1.kill9();
    eprintln!("gateway 1 SIGKILLed with {backlog} acknowledged records not yet in Kafka");

    // Its vehicles reconnect through HAProxy to gateway 2 and keep being acknowledged.
    let moved = Instant::now();
    wait_for("every vehicle on gateway 2", Duration::from_secs(20), || {
        active(&gw2) == VEHICLES as u64
    });
    eprintln!("all {VEHICLES} vehicles on gateway 2 after {:?}", moved.elapsed());
    let after_move = fleet.acked();
    assert!(
        fleet.wait_acked(after_move + VEHICLES as u64 * 100, Duration::from_secs(20)),
        "vehicles publish through gateway 2 after the failover"
    );
    assert!(fleet.acked() > acked_at_kill);

    // Gateway 1 comes back on its journal (same directory, same port) and drains it.
    let gw1 = Gateway::start_in(dir1, config1);
    wait_for("gateway 1 to drain its journal", Duration::from_secs(60), || {
        let m = gw1.metrics();
        audit::metric(&m, "gateway_journal_released_seq") >= audit::metric(&m, "gateway_journal_durable_seq")
    });
    wait_for(
        "HAProxy to see gateway 1 up again",
        Duration::from_secs(10),
        || lb.servers_up().iter().filter(|(_, up)| *up).count() == 2,
    );

    // Traffic goes on while both run.
    std::thread::sleep(Duration::from_secs(2));
    let (logs, complete) = fleet.finish(Duration::from_secs(30));
    assert!(complete, "every in-flight publish acknowledged at the end");
    wait_for("gateway 2 to drain its journal", Duration::from_secs(60), || {
        let m = gw2.metrics();
        audit::metric(&m, "gateway_journal_released_seq") >= audit::metric(&m, "gateway_journal_durable_seq")
    });
    let records = kafka.consume_all("ha", PARTITIONS, Duration::from_secs(120));
    let a = Audit::new(&logs, &records);
    eprintln!("{a}");
    let reconnects: u64 = logs.iter().map(|l| l.connects.saturating_sub(1)).sum();
    eprintln!(
        "acknowledged {}, in Kafka {} ({} distinct), reconnects {reconnects}, vehicles whose \
         first copies are out of counter order (the audit lists at most 10): {}",
        a.acked,
        a.records,
        a.unique,
        a.order_violations.len()
    );
    assert!(a.acked > VEHICLES * 200, "the run carried traffic: {}", a.acked);
    assert_eq!(
        a.lost, 0,
        "acknowledged messages missing from Kafka: {:?}",
        a.lost_examples
    );
    assert!(
        a.headers_present,
        "every record carries gateway.journal and gateway.seq"
    );
    assert!(
        reconnects >= on1,
        "gateway 1's vehicles reconnected: {reconnects} < {on1}"
    );
}

/// The operator's path for a node that never returns (docs/OPERATIONS.md): its journal
/// volume is attached elsewhere and a gateway is started on it under the dead node's
/// `gateway.id`, with the MQTT listener on loopback only and the TLS listener off, using
/// exactly the environment overrides the document gives; it drains the journal into
/// Kafka.
#[test]
fn a_dead_nodes_journal_is_drained_by_a_gateway_started_on_its_volume() {
    let kafka = Kafka::start();
    kafka.create_topic("orphan", PARTITIONS);
    let kcfg = kafka_config(&kafka.bootstrap(), "orphan");
    let gw = region_gateway(free_tcp_port(), "gw7", &kcfg);
    let (code, body) = http_request(gw.admin.expect("admin"), "POST", "/api/v1/bridge/pause", None);
    assert_eq!(code, 200, "{body}");
    let mut cfg = FleetConfig::new("orphan", 10);
    cfg.pace = Duration::from_millis(10);
    let fleet = Fleet::start(gw.mqtt(), &cfg);
    assert!(
        fleet.wait_acked(2_000, Duration::from_secs(30)),
        "PUBACKs into the paused journal"
    );
    fleet.pause(true);
    std::thread::sleep(Duration::from_millis(500));
    let (logs, complete) = fleet.finish(Duration::from_secs(5));
    assert!(complete, "nothing left in flight before the node dies");
    let m = gw.metrics();
    let backlog =
        audit::metric(&m, "gateway_journal_durable_seq") - audit::metric(&m, "gateway_journal_released_seq");
    assert!(
        backlog >= 2_000,
        "the journal holds what Kafka never saw: {backlog}"
    );
    assert_eq!(
        kafka.record_count("orphan", PARTITIONS),
        0,
        "nothing reached Kafka yet"
    );
    let (dead_dir, dead_config) = gw.kill9();

    // "Attach the volume to another host": a copy of the journal directory elsewhere.
    let new_host = tempfile::tempdir().expect("tempdir");
    let volume = new_host.path().join("gw7-journal");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(dead_dir.path().join("journal"))
        .arg(&volume)
        .status()
        .expect("cp");
    assert!(status.success());
    let config = new_host.path().join("gateway.toml");
    std::fs::copy(&dead_config, &config).expect("config");
    let volume_env = volume.display().to_string();
    let drainer = Gateway::start_in_env(
        new_host,
        config,
        &[
            ("GATEWAY_GATEWAY__ID", "gw7"),
            ("GATEWAY_JOURNAL__DIR", &volume_env),
            ("GATEWAY_MQTT__LISTEN", "127.0.0.1:0"),
            ("GATEWAY_MQTT__TLS_LISTEN", "\"\""),
            ("GATEWAY_ADMIN__LISTEN", "127.0.0.1:0"),
            ("GATEWAY_AUTH__ALLOW_ANONYMOUS", "true"),
        ],
    );
    assert!(drainer.tls.is_none(), "no TLS listener");
    assert!(drainer.mqtt().ip().is_loopback(), "MQTT on loopback only");
    wait_for("the journal to drain", Duration::from_secs(60), || {
        let m = drainer.metrics();
        let durable = audit::metric(&m, "gateway_journal_durable_seq");
        durable > 0 && audit::metric(&m, "gateway_journal_released_seq") >= durable
    });
    let records = kafka.consume_all("orphan", PARTITIONS, Duration::from_secs(60));
    let a = Audit::new(&logs, &records);
    eprintln!("{a}");
    assert_eq!(
        a.lost, 0,
        "acknowledged messages missing from Kafka: {:?}",
        a.lost_examples
    );
    assert!(
        a.order_violations.is_empty(),
        "one journal keeps each vehicle's order"
    );
}
