//! Regression: with librdkafka's queue full and Kafka unreachable, a shutdown request
//! made the QueueFull retry loop spin (its `select!` returned at once, forever) and the
//! pipeline never stopped. Now sending stops at the request, the pipeline waits for
//! confirmations only until the one shutdown deadline, and unsent or unconfirmed records
//! stay in the journal.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bridge::producer::{self, BridgeControl, BridgeStatus, Shutdown};
use bridge::{Journal, JournalConfig, SegmentedJournal};
use common::*;
use rdkafka::mocking::MockCluster;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_a_full_queue_stops_by_the_deadline() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("telemetry", 2, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    cluster.broker_down(1).expect("down");
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Arc::new(
        SegmentedJournal::open(JournalConfig::new(dir.path().join("journal"), 1 << 30)).expect("journal"),
    );
    for n in 0..100 {
        journal
            .append(&entry(n % 4, n, "telemetry"))
            .await
            .expect("append");
    }
    journal.flush().await.expect("flush");

    let mut cfg = config(&bootstrap, dir.path(), 1000);
    // librdkafka's queue holds 10: the 11th send finds it full.
    cfg.properties
        .insert("queue.buffering.max.messages".into(), "10".into());
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(producer::run(
        journal.clone(),
        Arc::new(default_routes("telemetry")),
        cfg,
        status.clone(),
        BridgeControl::new(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let requested = Instant::now();
    let deadline = requested + Duration::from_millis(1500);
    stop.stop_by(deadline);
    let ended = tokio::time::timeout(Duration::from_secs(15), task).await;
    let took = requested.elapsed();
    let result = ended.expect("the pipeline stops after a shutdown request (no spinning)");
    result.expect("join").expect("bridge");
    // Correctness bound, not a performance figure: nothing waits past the deadline
    // (plus the destroy of the producer, bounded too, and scheduling slack).
    assert!(
        took < Duration::from_millis(1500) + Duration::from_secs(3),
        "stopped {took:?} after the request, deadline was 1.5 s"
    );
    let stats = journal.stats();
    assert_eq!(stats.released_seq, 0, "nothing confirmed, nothing released");
    assert_eq!(
        stats.records, 100,
        "unsent and unconfirmed records stay in the journal"
    );
}
