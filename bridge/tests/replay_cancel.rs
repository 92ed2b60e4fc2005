//! Operator cancel of a replay stuck behind a down broker (librdkafka's mock cluster for
//! the outage; tests/tests/replay.rs does the same against a real broker), and what a
//! replay pins while it waits for Kafka's confirmations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge::journal::ReplayRetention;
use bridge::producer::ProducerConfig;
use bridge::replay::{Range, ReplayState, Replays, Request};
use bridge::routes::{Routes, Unmatched};
use bridge::{Entry, Journal, JournalConfig, SegmentedJournal};
use bytes::Bytes;
use rdkafka::mocking::MockCluster;

const SEGMENT: u64 = 4096;

fn entry(n: u64) -> Entry {
    Entry {
        received_at_ms: 1_700_000_000_000 + n,
        qos: 1,
        client_id: format!("vehicle-{}", n % 3),
        topic: format!("vehicles/vehicle-{}/telemetry", n % 3),
        payload: Bytes::from(format!("payload {n:05} ").repeat(4)),
        ..Entry::default()
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn setup(dir: &std::path::Path, bootstrap: String) -> (Arc<SegmentedJournal>, Arc<Replays>) {
    let mut jc = JournalConfig::new(dir.join("journal"), SEGMENT * 8);
    jc.segment_bytes = SEGMENT;
    jc.replay_retention = ReplayRetention {
        max_age: Duration::from_secs(3600),
        max_bytes: 2 * SEGMENT,
    };
    let journal = Arc::new(SegmentedJournal::open(jc).expect("journal"));
    for n in 1..=50 {
        journal.append(&entry(n)).await.expect("append");
    }
    journal.flush().await.expect("flush");
    journal.release(50);
    let routes = Arc::new(Routes {
        events: Default::default(),
        routes: vec![],
        unmatched: Unmatched::DefaultTopic("telemetry".into()),
    });
    let cfg = ProducerConfig {
        bootstrap,
        compression: "none".into(),
        linger_ms: 5,
        batch_bytes: 16 * 1024,
        max_inflight: 500,
        gateway_id: "test".into(),
        journal_id: "j-test".into(),
        dead_letter_topic: String::new(),
        parked_dir: dir.join("parked"),
        max_parked: 100,
        properties: Default::default(),
        stall_rebuild: Duration::from_secs(60),
    };
    let replays = Replays::new(journal.clone(), routes, cfg);
    (journal, replays)
}

/// Cancelling a replay stuck behind a down broker ends it `cancelled`; the records purged
/// from its producer are not reported as refused by Kafka (`failed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_replay_does_not_report_purged_records_as_refused() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("telemetry", 1, 1).expect("topic");
    cluster.broker_down(1).expect("down");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_journal, replays) = setup(dir.path(), cluster.bootstrap_servers()).await;
    let p = replays
        .start(Request {
            range: Range::Seq { from: 1, to: 50 },
            topic: None,
        })
        .await
        .expect("start");
    assert_eq!(p.records, 50);
    until("all handed to the producer", || {
        replays.get(&p.id).expect("known replay").sent == 50
    })
    .await;
    let c = replays
        .cancel(&p.id, Duration::from_secs(5))
        .await
        .expect("known");
    assert_eq!(c.state, ReplayState::Cancelled);
    assert_eq!(c.delivered, 0);
    assert_eq!(c.failed, 0, "purged records counted as refused by Kafka: {c:?}");
}

/// A replay that has read and sent its whole range and only waits for Kafka's
/// confirmations pins nothing after its range: the byte cap keeps applying to the
/// segments retained since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_waiting_for_confirmations_does_not_hold_newer_segments() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("telemetry", 1, 1).expect("topic");
    cluster.broker_down(1).expect("down");
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, replays) = setup(dir.path(), cluster.bootstrap_servers()).await;
    let p = replays
        .start(Request {
            range: Range::Seq { from: 1, to: 50 },
            topic: None,
        })
        .await
        .expect("start");
    until("all handed to the producer", || {
        replays.get(&p.id).expect("known replay").sent == 50
    })
    .await;
    // Live traffic goes on (its own pipeline delivers and releases).
    let mut n = 50;
    for _ in 0..12 {
        for _ in 0..20 {
            n += 1;
            journal.append(&entry(n)).await.expect("append");
        }
        journal.flush().await.expect("flush");
        journal.release(n);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = journal.stats();
    let still = replays.get(&p.id).expect("known replay").state;
    replays.cancel(&p.id, Duration::from_secs(5)).await;
    assert_eq!(still, ReplayState::Running);
    assert!(
        st.retained_bytes <= 2 * SEGMENT + SEGMENT,
        "retention cap (2 segments) held open by a replay that needs none of them: {st:?}"
    );
}
