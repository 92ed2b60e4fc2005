//! Regression: forwarding continues across sequence gaps left by the `drop_oldest`
//! policy. Segments are evicted undelivered while the producer has records in flight and
//! its reader is inside the oldest segment; the reader then jumps over the gap. The
//! tracker used to assume contiguous sequence numbers and stalled forever.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bridge::producer::{self, BridgeControl, BridgeStatus, Shutdown};
use bridge::{FullPolicy, Journal, JournalConfig, SegmentedJournal};
use common::*;
use rdkafka::mocking::MockCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_continues_across_dropped_segments() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("telemetry", 2, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();

    let dir = tempfile::tempdir().expect("tempdir");
    let mut jcfg = JournalConfig::new(dir.path().join("journal"), 3 * 4096);
    jcfg.segment_bytes = 4096;
    let journal = Arc::new(SegmentedJournal::open(jcfg).expect("journal"));
    let big = |v: usize, n: usize| {
        let mut e = entry(v, n, "telemetry");
        e.payload = format!("{n:0>200}").into();
        e
    };
    for n in 0..20 {
        journal
            .append_with(&big(n % 3, n), FullPolicy::DropOldest)
            .await
            .expect("append");
    }
    journal.flush().await.expect("flush");

    // Kafka unreachable: the first records stay in flight, the reader inside segment 1.
    cluster.broker_down(1).expect("down");
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(producer::run(
        journal.clone(),
        Arc::new(default_routes("telemetry")),
        config(&bootstrap, dir.path(), 10),
        status.clone(),
        BridgeControl::new(),
        stop.clone(),
    ));
    let in_flight = wait_until(Duration::from_secs(10), || status.in_flight.get() == 10).await;
    assert!(in_flight, "ten records in flight");

    // The journal fills up: drop_oldest evicts the oldest segments, undelivered.
    for n in 20..200 {
        journal
            .append_with(&big(n % 3, n), FullPolicy::DropOldest)
            .await
            .expect("append");
    }
    journal.flush().await.expect("flush");
    let stats = journal.stats();
    assert!(stats.dropped > 0, "segments were evicted: {stats:?}");
    let last = stats.next_seq - 1;

    cluster.broker_up(1).expect("up");
    let released = wait_released(&*journal, last, Duration::from_secs(30)).await;
    assert!(
        released,
        "forwarding continued past the gap: released {} of {last}; in flight {}; {:?}",
        journal.stats().released_seq,
        status.in_flight.get(),
        status.last_error()
    );

    // The newest records (after the gap) reached Kafka exactly once.
    let delivered = status.delivered.get() as usize;
    let seen = tokio::task::spawn_blocking(move || {
        consume(&bootstrap, "telemetry", 2, delivered, Duration::from_secs(30))
    })
    .await
    .expect("consume");
    assert_eq!(seen.len(), delivered, "each delivered record once");
    let newest = format!("{:0>200}", 199);
    assert_eq!(seen.iter().filter(|m| m.payload == newest).count(), 1);
    let seqs: std::collections::HashSet<&str> =
        seen.iter().map(|m| m.headers["gateway.seq"].as_str()).collect();
    assert_eq!(seqs.len(), seen.len(), "distinct journal sequences");
    assert!(seqs.contains(last.to_string().as_str()));

    stop.stop_by(tokio::time::Instant::now() + Duration::from_secs(5));
    task.await.expect("join").expect("bridge");
}
