//! Fault suite, disk full: the journal lives on a 48 MiB tmpfs (mounted by the test as
//! root, unmounted by a guard) with 4 MiB segments and a `max_bytes` larger than the file
//! system, so the file system fills before the journal's own bound: segment creation
//! and writes hit ENOSPC. Kafka is down meanwhile, so nothing is released. The gateway
//! must stay up, withhold PUBACKs, say so (`/api/v1/journal` `stalled`, metric
//! `gateway_journal_stalled 1`, a log line), resume by itself once the filler file is
//! deleted, and after Kafka returns every PUBACK'd message must be in Kafka.

use std::time::{Duration, Instant};

use integration::audit::{self, Audit};
use integration::fleet::{Fleet, FleetConfig};
use integration::kafka::Kafka;
use integration::tmpfs::Tmpfs;
use integration::{http_get, kafka_config, Gateway};

const PARTITIONS: i32 = 4;

/// Waits until the fleet's PUBACK count stops moving for `quiet`; returns it.
fn wait_stalled(fleet: &Fleet, quiet: Duration, within: Duration) -> Option<u64> {
    let deadline = Instant::now() + within;
    let mut last = fleet.acked();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = fleet.acked();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return Some(now);
        }
    }
    None
}

#[test]
fn full_disk_withholds_pubacks_and_resumes_by_itself() {
    let case = "full_disk_withholds_pubacks_and_resumes_by_itself";
    let fs = Tmpfs::mount("48m");
    let mut kafka = Kafka::start();
    kafka.create_topic("disk", PARTITIONS);
    let home = tempfile::tempdir().expect("tempdir");
    let config_path = home.path().join("gateway.toml");
    let config = integration::config(
        &fs.path().join("journal"),
        &kafka_config(&kafka.bootstrap(), "disk"),
    )
    .replace("max_bytes = 67108864", "max_bytes = 268435456");
    std::fs::write(&config_path, config).expect("config");
    let gw = Gateway::start_in(home, config_path);
    // Nothing is released from here on: the journal only grows.
    kafka.kill();
    // Leave room for about two more segments, then the file system is full.
    let free = fs.free_bytes();
    let filler = fs.fill("filler", free.saturating_sub(10 << 20));
    let mut fc = FleetConfig::new("disk", 4);
    fc.window = 16;
    fc.pace = Duration::ZERO;
    fc.padding = 1000;
    let fleet = Fleet::start(gw.mqtt(), &fc);
    let stalled_at = wait_stalled(&fleet, Duration::from_secs(3), Duration::from_secs(120))
        .expect("PUBACKs stop when the disk is full");
    assert!(
        stalled_at > 1000,
        "the journal took traffic before the disk filled ({stalled_at})"
    );
    // Up, and saying why.
    let health = http_get(gw.admin.expect("admin"), "/healthz");
    let journal = http_get(gw.admin.expect("admin"), "/api/v1/journal");
    let metric = gw.metric("gateway_journal_stalled");
    let log = gw.log();
    let log_says = log
        .lines()
        .any(|l| l.contains("No space left") || l.contains("ENOSPC") || l.contains("stalled"));
    audit::report(
        case,
        &format!("PUBACKs before stall {stalled_at}; /healthz {health}; /api/v1/journal {journal}; gateway_journal_stalled {metric}"),
    );
    assert!(
        journal.contains("\"stalled\":\"") || metric == 1,
        "the stall is visible in /api/v1/journal (stalled) or gateway_journal_stalled: {journal}"
    );
    assert!(log_says, "a log line names the disk-full condition:\n{log}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.acked(), stalled_at, "no PUBACK while the disk is full");
    // Space returns: the journal resumes without a restart.
    std::fs::remove_file(&filler).expect("remove filler");
    assert!(
        fleet.wait_acked(stalled_at + 500, Duration::from_secs(60)),
        "PUBACKs resume by themselves once space returns ({} after {stalled_at})\n{}",
        fleet.acked(),
        gw.log()
    );
    let journal = http_get(gw.admin.expect("admin"), "/api/v1/journal");
    assert!(!journal.contains("\"stalled\":\""), "stall cleared: {journal}");
    kafka.restart();
    let (logs, complete) = fleet.finish(Duration::from_secs(60));
    assert!(complete, "every in-flight publish acknowledged");
    assert!(
        audit::wait_drained(&gw, Duration::from_secs(180)),
        "the bridge did not drain:\n{}",
        gw.metrics()
    );
    let records = kafka.consume_all("disk", PARTITIONS, Duration::from_secs(120));
    let a = Audit::new(&logs, &records);
    audit::report(case, &a.to_string());
    assert_eq!(a.lost, 0, "{a}");
    assert!(a.order_violations.is_empty(), "{a}");
    drop(gw);
    drop(fs);
}
