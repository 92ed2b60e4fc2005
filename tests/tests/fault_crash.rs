//! Fault suite, crash consistency: a fleet of vehicles publishes QoS 1 with a unique id in
//! every payload while the gateway is SIGKILLed at random moments and restarted on the
//! same journal. At the end, after the bridge drained, real Kafka must hold every id the
//! fleet got a PUBACK for (lost = 0), first deliveries in each vehicle's order; duplicates
//! are counted per kill and compared to what the journal had not yet released.
//!
//! CI size by default (20 vehicles, 20 kills); `EDGE_FAULT_LONG=1` runs 40 vehicles and
//! 200 kills. `EDGE_FAULT_SEED` repeats a run; `EDGE_FAULT_REPORT=<file>` appends figures.

use std::time::{Duration, Instant};

use integration::audit::{self, Audit, Rng};
use integration::fleet::{Fleet, FleetConfig};
use integration::kafka::Kafka;
use integration::{kafka_config, Gateway};

const PARTITIONS: i32 = 4;

/// What the journal said around one kill.
#[derive(Debug, Clone, Copy)]
struct Kill {
    /// `/metrics` just before the SIGKILL.
    durable_before: u64,
    released_before: u64,
    /// `/metrics` of the restarted gateway once it was ready (its recovered view).
    durable_after: u64,
    released_after: u64,
}

struct Run {
    audit: Audit,
    kills: Vec<Kill>,
    resends: u64,
    secs: f64,
}

fn crash_run(test: &str, vehicles: usize, kills: usize) -> Run {
    let started = Instant::now();
    let mut rng = Rng::from_env(test);
    let kafka = Kafka::start();
    kafka.create_topic("crash", PARTITIONS);
    let mut gw = Gateway::start(&kafka_config(&kafka.bootstrap(), "crash"));
    let mut cfg = FleetConfig::new("crash", vehicles);
    cfg.window = 8;
    cfg.pace = Duration::from_millis(10);
    let fleet = Fleet::start(gw.mqtt(), &cfg);
    assert!(
        fleet.wait_acked(vehicles as u64 * 10, Duration::from_secs(30)),
        "the fleet gets PUBACKs before the first kill"
    );
    let mut record = Vec::new();
    for k in 0..kills {
        // Up for 0.2 .. 2.5 s of traffic, then SIGKILL at an arbitrary instant.
        std::thread::sleep(Duration::from_millis(rng.range(200, 2500)));
        let m = gw.metrics();
        let durable_before = audit::metric(&m, "gateway_journal_durable_seq");
        let released_before = audit::metric(&m, "gateway_journal_released_seq");
        let acked = fleet.acked();
        let (dir, config_path) = gw.kill9();
        gw = Gateway::start_in(dir, config_path);
        fleet.set_addr(gw.mqtt());
        let (durable_after, released_after) = recovered(&gw);
        let kill = Kill {
            durable_before,
            released_before,
            durable_after,
            released_after,
        };
        assert!(
            kill.durable_after >= kill.durable_before,
            "kill {k}: the journal recovered durable seq {} below the {} it reported before the kill",
            kill.durable_after,
            kill.durable_before
        );
        record.push(kill);
        if k % 10 == 9 {
            eprintln!("{test}: {} kills, {acked} PUBACKs", k + 1);
        }
    }
    // Traffic continues on the last incarnation, then the fleet finishes what is in flight.
    assert!(
        fleet.wait_acked(fleet.acked() + vehicles as u64 * 10, Duration::from_secs(30)),
        "the fleet gets PUBACKs after the last restart"
    );
    let (logs, complete) = fleet.finish(Duration::from_secs(60));
    assert!(complete, "every vehicle got its last PUBACKs");
    assert!(
        audit::wait_drained(&gw, Duration::from_secs(180)),
        "the bridge did not drain:\n{}",
        gw.metrics()
    );
    let records = kafka.consume_all("crash", PARTITIONS, Duration::from_secs(120));
    let audit = Audit::new(&logs, &records);
    Run {
        audit,
        kills: record,
        resends: Audit::resends(&logs),
        secs: started.elapsed().as_secs_f64(),
    }
}

/// (durable, released) as the restarted journal recovered them: from its "journal: opened"
/// log line (before the bridge could release anything), else from `/metrics`.
fn recovered(gw: &Gateway) -> (u64, u64) {
    let log = gw.log();
    let field = |line: &str, name: &str| -> Option<u64> {
        let key = format!(" {name}=");
        let start = line.find(&key)? + key.len();
        line[start..].split_whitespace().next()?.parse().ok()
    };
    if let Some(line) = log.lines().find(|l| l.contains("journal: opened")) {
        if let (Some(next), Some(released)) = (field(line, "next_seq"), field(line, "released")) {
            return (next.saturating_sub(1), released);
        }
    }
    let m = gw.metrics();
    (
        audit::metric(&m, "gateway_journal_durable_seq"),
        audit::metric(&m, "gateway_journal_released_seq"),
    )
}

/// Replays per kill: the deduped sequences that fall in the window the restarted
/// gateway re-read (above its recovered release watermark, up to its durable head).
fn replays_per_kill(run: &Run) -> Vec<usize> {
    run.kills
        .iter()
        .map(|k| {
            run.audit
                .replay_seqs
                .iter()
                .filter(|s| **s > k.released_after && **s <= k.durable_after)
                .collect::<std::collections::HashSet<_>>()
                .len()
        })
        .collect()
}

fn summary(test: &str, run: &Run) {
    let kills = run.kills.len().max(1);
    let unreleased: Vec<u64> = run
        .kills
        .iter()
        .map(|k| k.durable_before.saturating_sub(k.released_before))
        .collect();
    let window: Vec<u64> = run
        .kills
        .iter()
        .map(|k| k.durable_after.saturating_sub(k.released_after))
        .collect();
    audit::report(
        test,
        &format!(
            "kills {} | {} | client re-sends {} | duplicates per kill {:.1} | unreleased at kill (metrics before) mean {:.1} max {} | \
             replay window after restart mean {:.1} max {} | {:.0} s",
            run.kills.len(),
            run.audit,
            run.resends,
            run.audit.duplicates as f64 / kills as f64,
            unreleased.iter().sum::<u64>() as f64 / kills as f64,
            unreleased.iter().max().unwrap_or(&0),
            window.iter().sum::<u64>() as f64 / kills as f64,
            window.iter().max().unwrap_or(&0),
            run.secs
        ),
    );
}

fn sizes() -> (usize, usize) {
    if audit::long() {
        (40, 200)
    } else {
        (20, 20)
    }
}

/// Every PUBACK'd id survives ≥ 20 SIGKILLs (200 with `EDGE_FAULT_LONG=1`), first
/// deliveries stay in each vehicle's order.
#[test]
fn sigkill_loop_loses_no_acknowledged_message() {
    let (vehicles, kills) = sizes();
    let test = "sigkill_loop_loses_no_acknowledged_message";
    let run = crash_run(test, vehicles, kills);
    summary(test, &run);
    let a = &run.audit;
    assert_eq!(a.lost, 0, "acknowledged messages missing from Kafka: {a}");
    assert!(a.order_violations.is_empty(), "per-vehicle order: {a}");
    assert_eq!(a.foreign, 0, "records not from the fleet: {a}");
    assert!(a.acked > vehicles * 50, "the run carried traffic: {a}");
}

/// The consumer dedupe recipe on `gateway.journal` + `gateway.seq` removes every gateway
/// replay: what is left repeats a (vehicle, counter) only where the vehicle itself re-sent
/// it after a kill, and each kill's replays stay within the window the restarted gateway
/// had not released.
#[test]
fn sigkill_replays_dedupe_to_client_retries_only() {
    let test = "sigkill_replays_dedupe_to_client_retries_only";
    let (vehicles, kills) = if audit::long() { (20, 50) } else { (10, 8) };
    let run = crash_run(test, vehicles, kills);
    summary(test, &run);
    let a = &run.audit;
    assert_eq!(a.lost, 0, "{a}");
    assert!(
        a.headers_present,
        "every record carries gateway.seq and gateway.journal: {a}"
    );
    assert!(a.unexplained.is_empty(), "dedupe leaves only client retries: {a}");
    assert_eq!(
        a.duplicates,
        a.replays + a.client_retries,
        "every duplicate is a replay or a client retry: {a}"
    );
    assert!(
        a.client_retries as u64 <= run.resends,
        "client retries ≤ client re-sends ({}): {a}",
        run.resends
    );
    let per_kill = replays_per_kill(&run);
    for (k, (n, kill)) in per_kill.iter().zip(&run.kills).enumerate() {
        let window = kill.durable_after.saturating_sub(kill.released_after);
        assert!(
            *n as u64 <= window,
            "kill {k}: {n} replays, more than the {window} records the restart re-read"
        );
    }
    audit::report(test, &format!("replays per kill {per_kill:?}"));
}
