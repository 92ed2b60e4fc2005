//! The silent-producer watchdog (`kafka.stall_rebuild_secs`) on librdkafka's mock
//! cluster: a producer that hears nothing back while the brokers answer a new client is
//! rebuilt and the records arrive, once each and in order; a producer that hears nothing
//! because the brokers are down is left alone.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bridge::producer::{self, BridgeControl, BridgeStatus, Shutdown};
use bridge::{Journal, JournalConfig, SegmentedJournal};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const VEHICLES: usize = 4;
const PER_VEHICLE: usize = 50;
const PARTITIONS: i32 = 4;
const TOPIC: &str = "telemetry";

async fn journal_with_records(dir: &std::path::Path) -> Arc<SegmentedJournal> {
    let journal = Arc::new(SegmentedJournal::open(JournalConfig::new(dir, 1 << 30)).expect("journal"));
    for n in 0..PER_VEHICLE {
        for v in 0..VEHICLES {
            journal
                .append(&common::entry(v, n, "telemetry"))
                .await
                .expect("append");
        }
    }
    journal.flush().await.expect("flush");
    journal
}

/// Every vehicle's numbers, once each and in order.
fn assert_all_once_in_order(bootstrap: &str) {
    let total = VEHICLES * PER_VEHICLE;
    let got = common::consume(bootstrap, TOPIC, PARTITIONS, total, Duration::from_secs(30));
    let mut per: HashMap<String, Vec<usize>> = HashMap::new();
    for c in &got {
        per.entry(c.key.clone())
            .or_default()
            .push(c.payload.parse().expect("number"));
    }
    assert_eq!(got.len(), total, "every record once");
    let expected: Vec<usize> = (0..PER_VEHICLE).collect();
    for (key, ns) in &per {
        assert_eq!(ns, &expected, "{key}: in the vehicle's order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_producer_is_rebuilt_while_the_brokers_answer() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = journal_with_records(dir.path()).await;
    // Every Produce request refused with a retriable error for a while: librdkafka retries
    // without end (message.timeout.ms = 0) and reports nothing, while metadata is served.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 12],
    );
    let mut cfg = common::config(&bootstrap, dir.path(), 10_000);
    cfg.stall_rebuild = Duration::from_secs(2);
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(producer::run(
        journal.clone(),
        Arc::new(common::default_routes(TOPIC)),
        cfg,
        status.clone(),
        BridgeControl::new(),
        stop.clone(),
    ));
    let total = (VEHICLES * PER_VEHICLE) as u64;
    assert!(
        common::wait_released(&*journal, total, Duration::from_secs(60)).await,
        "every record confirmed after the stall; released {}, last error {:?}",
        journal.stats().released_seq,
        status.last_error()
    );
    assert!(
        status.producer_rebuilds.get() >= 1,
        "the silent producer was rebuilt (gateway_bridge_producer_rebuilds_total)"
    );
    stop.stop_by(tokio::time::Instant::now() + Duration::from_secs(5));
    task.await.expect("join").expect("bridge");
    let b = bootstrap.clone();
    tokio::task::spawn_blocking(move || assert_all_once_in_order(&b))
        .await
        .expect("consume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_silent_because_the_brokers_are_down_is_not_rebuilt() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    cluster.broker_down(1).expect("down");
    let journal = journal_with_records(dir.path()).await;
    let mut cfg = common::config(&bootstrap, dir.path(), 10_000);
    cfg.stall_rebuild = Duration::from_secs(2);
    // The producer finds the broker again well within the watchdog's grace (2 s here).
    cfg.properties
        .insert("reconnect.backoff.max.ms".into(), "200".into());
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(producer::run(
        journal.clone(),
        Arc::new(common::default_routes(TOPIC)),
        cfg,
        status.clone(),
        BridgeControl::new(),
        stop.clone(),
    ));
    // Several times the watchdog's silence, the probe failing each time.
    tokio::time::sleep(Duration::from_secs(9)).await;
    eprintln!(
        "after the outage: rebuilds {} error {:?}",
        status.producer_rebuilds.get(),
        status.last_error()
    );
    assert_eq!(
        journal.stats().released_seq,
        0,
        "nothing can be confirmed while down"
    );
    cluster.broker_up(1).expect("up");
    let total = (VEHICLES * PER_VEHICLE) as u64;
    assert!(
        common::wait_released(&*journal, total, Duration::from_secs(60)).await,
        "every record confirmed once the broker is back; last error {:?}",
        status.last_error()
    );
    eprintln!(
        "at the end: rebuilds {} error {:?}",
        status.producer_rebuilds.get(),
        status.last_error()
    );
    assert_eq!(
        status.producer_rebuilds.get(),
        0,
        "no rebuild while the brokers did not answer"
    );
    stop.stop_by(tokio::time::Instant::now() + Duration::from_secs(5));
    task.await.expect("join").expect("bridge");
}
