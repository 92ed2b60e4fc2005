//! Every Kafka record carries `gateway.journal` and `gateway.seq`; a replay (here: the
//! pipeline restarted from an older release watermark, as after a crash before the
//! checkpoint) re-sends records in journal order, and a consumer applying the documented
//! recipe — per (gateway.journal, partition) keep the highest gateway.seq, drop records
//! at or below it — sees every record exactly once.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bridge::producer::{self, BridgeControl, BridgeStatus, Shutdown};
use bridge::{Journal, JournalConfig, SegmentedJournal};
use common::*;
use rdkafka::mocking::MockCluster;

const VEHICLES: usize = 8;
const FIRST: usize = 200;
const MORE: usize = 60;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for ent in std::fs::read_dir(from).expect("read_dir") {
        let path = ent.expect("entry").path();
        let name = path.file_name().expect("name");
        if path.is_file() && name != "LOCK" {
            std::fs::copy(&path, to.join(name)).expect("copy");
        }
    }
}

async fn run_until_released(journal: Arc<SegmentedJournal>, bootstrap: &str, dir: &Path, upto: u64) {
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(producer::run(
        journal.clone(),
        Arc::new(default_routes("telemetry")),
        config(bootstrap, dir, 1000),
        status.clone(),
        BridgeControl::new(),
        stop.clone(),
    ));
    assert!(
        wait_released(&*journal, upto, Duration::from_secs(30)).await,
        "released {} of {upto}: {:?}",
        journal.stats().released_seq,
        status.last_error()
    );
    stop.stop_by(tokio::time::Instant::now() + Duration::from_secs(5));
    task.await.expect("join").expect("bridge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_recipe_drops_replays_exactly() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("telemetry", 3, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("journal");
    let journal = Arc::new(SegmentedJournal::open(JournalConfig::new(&live, 1 << 30)).expect("journal"));
    let mut n_of = HashMap::new();
    for n in 0..FIRST {
        let seq = journal
            .append(&entry(n % VEHICLES, n, "telemetry"))
            .await
            .expect("append");
        n_of.insert(seq, n);
    }
    journal.flush().await.expect("flush");
    // The journal as it was before anything was confirmed.
    let older = dir.path().join("older");
    copy_dir(&live, &older);

    run_until_released(journal.clone(), &bootstrap, dir.path(), FIRST as u64).await;
    journal.close();
    drop(journal);

    // Restart from the older release watermark: everything is replayed, then new records.
    let journal = Arc::new(SegmentedJournal::open(JournalConfig::new(&older, 1 << 30)).expect("journal"));
    assert_eq!(journal.stats().released_seq, 0);
    for n in FIRST..FIRST + MORE {
        let seq = journal
            .append(&entry(n % VEHICLES, n, "telemetry"))
            .await
            .expect("append");
        n_of.insert(seq, n);
    }
    journal.flush().await.expect("flush");
    run_until_released(journal.clone(), &bootstrap, dir.path(), (FIRST + MORE) as u64).await;

    let raw_expected = 2 * FIRST + MORE;
    let seen = tokio::task::spawn_blocking(move || {
        consume(&bootstrap, "telemetry", 3, raw_expected, Duration::from_secs(30))
    })
    .await
    .expect("consume");
    assert_eq!(seen.len(), raw_expected, "the replay re-sent the first {FIRST}");

    // The recipe, per partition in offset order.
    let mut highest: HashMap<(String, i32), u64> = HashMap::new();
    let mut kept: Vec<(u64, &Consumed)> = Vec::new();
    for m in &seen {
        assert_eq!(m.headers["gateway.id"], "test");
        let journal_id = m.headers["gateway.journal"].clone();
        assert_eq!(journal_id, "journal-test");
        let seq: u64 = m.headers["gateway.seq"].parse().expect("decimal gateway.seq");
        let top = highest.entry((journal_id, m.partition)).or_insert(0);
        if seq <= *top {
            continue;
        }
        *top = seq;
        kept.push((seq, m));
    }
    assert_eq!(
        kept.len(),
        FIRST + MORE,
        "each record exactly once after de-duplication"
    );
    let mut seqs: Vec<u64> = kept.iter().map(|(s, _)| *s).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=(FIRST + MORE) as u64).collect::<Vec<_>>());
    let mut per_vehicle: HashMap<&str, Vec<usize>> = HashMap::new();
    for (seq, m) in &kept {
        let n: usize = m.payload.parse().expect("n");
        assert_eq!(n_of[seq], n, "gateway.seq names the journal record");
        per_vehicle.entry(m.key.as_str()).or_default().push(n);
    }
    for (key, ns) in per_vehicle {
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{key}: in order");
    }
}
