//! Regression: an error out of the pipeline used to end forwarding silently (seen only at
//! shutdown) while the gateway looked healthy. The supervisor restarts it with back-off,
//! counts restarts, and marks the bridge failed on a persistent error; a transient error
//! that goes away clears the mark.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bridge::producer::{BridgeControl, BridgeError, BridgeStatus, Shutdown, State};
use bridge::supervisor::{supervise, supervise_with, RestartPolicy};
use bridge::{Journal, JournalConfig, SegmentedJournal};
use common::*;
use rdkafka::mocking::MockCluster;
use tokio::time::Instant;

fn quick() -> RestartPolicy {
    RestartPolicy {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        healthy_after: Duration::from_millis(700),
        fail_after: 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_producer_configuration_marks_the_bridge_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Arc::new(
        SegmentedJournal::open(JournalConfig::new(dir.path().join("journal"), 1 << 30)).expect("journal"),
    );
    let mut cfg = config("127.0.0.1:1", dir.path(), 100);
    cfg.properties
        .insert("no.such.librdkafka.property".into(), "1".into());
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(supervise(
        journal,
        Arc::new(default_routes("telemetry")),
        cfg,
        status.clone(),
        BridgeControl::new(),
        stop.clone(),
        quick(),
    ));
    let failed = wait_until(Duration::from_secs(10), || {
        status.failed().is_some() && status.restarts.get() >= 3
    })
    .await;
    assert!(failed, "restarts {}", status.restarts.get());
    let why = status.failed().unwrap_or_default();
    assert!(why.contains("no.such.librdkafka.property"), "{why}");
    assert!(why.contains("not transient"), "{why}");
    assert_eq!(status.state(), State::Failed);
    assert_eq!(status.state().as_str(), "failed");
    stop.stop_by(Instant::now() + Duration::from_secs(2));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("supervision ends at shutdown")
        .expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_recovers_and_clears_the_mark() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("telemetry", 2, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Arc::new(
        SegmentedJournal::open(JournalConfig::new(dir.path().join("journal"), 1 << 30)).expect("journal"),
    );
    for n in 0..20 {
        journal
            .append(&entry(n % 2, n, "telemetry"))
            .await
            .expect("append");
    }
    journal.flush().await.expect("flush");
    let cfg = config(&bootstrap, dir.path(), 100);
    // The parked store cannot be opened: a file sits where its directory should be.
    std::fs::write(&cfg.parked_dir, b"in the way").expect("block");
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(supervise(
        journal.clone(),
        Arc::new(default_routes("telemetry")),
        cfg.clone(),
        status.clone(),
        BridgeControl::new(),
        stop.clone(),
        quick(),
    ));
    let failed = wait_until(Duration::from_secs(10), || status.failed().is_some()).await;
    assert!(failed, "marked failed after repeated failures");
    assert!(status.restarts.get() >= 3);
    let why = status.failed().unwrap_or_default();
    assert!(why.contains("consecutive failures"), "{why}");
    assert_eq!(status.state(), State::Failed);
    assert_eq!(journal.stats().released_seq, 0);

    // The operator clears the obstacle: the next restart runs, forwards, turns healthy.
    std::fs::remove_file(&cfg.parked_dir).expect("unblock");
    assert!(wait_released(&*journal, 20, Duration::from_secs(20)).await);
    let healthy = wait_until(Duration::from_secs(10), || status.failed().is_none()).await;
    assert!(healthy, "failure mark cleared once healthy");
    assert_ne!(status.state(), State::Failed);
    let restarts = status.restarts.get();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status.restarts.get(), restarts, "no more restarts");
    stop.stop_by(Instant::now() + Duration::from_secs(2));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("supervision ends at shutdown")
        .expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_are_caught_and_restarted() {
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let starts = Arc::new(AtomicU32::new(0));
    let (s, st) = (starts.clone(), stop.clone());
    let task = tokio::spawn(supervise_with(status.clone(), stop.clone(), quick(), move || {
        let n = s.fetch_add(1, Ordering::SeqCst);
        let st = st.clone();
        async move {
            if n < 2 {
                panic!("injected panic {n}");
            }
            st.requested().await;
            Ok::<(), BridgeError>(())
        }
    }));
    assert!(wait_until(Duration::from_secs(5), || starts.load(Ordering::SeqCst) == 3).await);
    assert_eq!(status.restarts.get(), 2);
    assert!(status.failed().is_none(), "two failures stay below fail_after");
    assert!(status
        .last_error()
        .unwrap_or_default()
        .contains("injected panic 1"));
    stop.stop_by(Instant::now() + Duration::from_secs(1));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("ends")
        .expect("join");

    // Always panicking: failed after three, and retried at the bounded back-off.
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(supervise_with(status.clone(), stop.clone(), quick(), || async {
        if true {
            panic!("always");
        }
        Ok::<(), BridgeError>(())
    }));
    assert!(wait_until(Duration::from_secs(5), || status.restarts.get() >= 5).await);
    let why = status.failed().unwrap_or_default();
    assert!(why.contains("panicked: always"), "{why}");
    stop.stop_by(Instant::now() + Duration::from_secs(1));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("ends")
        .expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_journal_segment_under_a_running_reader_marks_the_bridge_failed() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("telemetry", 2, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    let jdir = dir.path().join("journal");
    let mut jcfg = JournalConfig::new(&jdir, 1 << 30);
    jcfg.segment_bytes = 4096;
    let journal = Arc::new(SegmentedJournal::open(jcfg).expect("journal"));
    for n in 0..60 {
        let mut e = entry(n % 2, n, "telemetry");
        e.payload = format!("{n:0>200}").into();
        journal.append(&e).await.expect("append");
    }
    journal.flush().await.expect("flush");
    let mut segments: Vec<_> = std::fs::read_dir(&jdir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "{segments:?}");
    // Flip a byte inside the first record of the second segment (an older, synced one).
    let mut bytes = std::fs::read(&segments[1]).expect("read");
    bytes[100] ^= 0xff;
    std::fs::write(&segments[1], &bytes).expect("write");

    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(supervise(
        journal.clone(),
        Arc::new(default_routes("telemetry")),
        // Small batches: a read error discards the batch it interrupts.
        config(&bootstrap, dir.path(), 5),
        status.clone(),
        BridgeControl::new(),
        stop.clone(),
        quick(),
    ));
    let failed = wait_until(Duration::from_secs(20), || {
        status.failed().is_some() && status.restarts.get() >= 3
    })
    .await;
    assert!(
        failed,
        "restarts {}, failed {:?}, last error {:?}",
        status.restarts.get(),
        status.failed(),
        status.last_error()
    );
    assert_eq!(status.state(), State::Failed);
    let why = status.failed().unwrap_or_default();
    assert!(
        why.contains(&*segments[1].to_string_lossy()),
        "names the segment: {why}"
    );
    // The records before the damage were forwarded; nothing past it was released.
    let released = journal.stats().released_seq;
    assert!(released > 0 && released < 60, "released {released}");
    stop.stop_by(Instant::now() + Duration::from_secs(2));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("supervision ends at shutdown")
        .expect("join");
}
