//! The silent-producer watchdog (`kafka.stall_rebuild_secs`) on librdkafka's mock
//! cluster: a producer that hears nothing back while a new client is served is rebuilt
//! and the records arrive, once each and in order; a producer that hears nothing
//! because the brokers are down, or because a partition has no leader, is left alone.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bridge::producer::{self, BridgeControl, BridgeError, BridgeStatus, ProducerConfig, Shutdown};
use bridge::{Journal, JournalConfig, SegmentedJournal};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const VEHICLES: usize = 4;
const PER_VEHICLE: usize = 50;
const PARTITIONS: i32 = 4;
const TOPIC: &str = "telemetry";

async fn journal_with_records(dir: &std::path::Path, vehicles: usize) -> Arc<SegmentedJournal> {
    let journal = Arc::new(SegmentedJournal::open(JournalConfig::new(dir, 1 << 30)).expect("journal"));
    for n in 0..PER_VEHICLE {
        for v in 0..vehicles {
            journal
                .append(&common::entry(v, n, "telemetry"))
                .await
                .expect("append");
        }
    }
    journal.flush().await.expect("flush");
    journal
}

/// The producer pipeline running on a journal.
struct Pipeline {
    status: Arc<BridgeStatus>,
    stop: Shutdown,
    task: tokio::task::JoinHandle<Result<(), BridgeError>>,
}

impl Pipeline {
    fn start(journal: &Arc<SegmentedJournal>, cfg: ProducerConfig) -> Pipeline {
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
        Pipeline { status, stop, task }
    }

    async fn stop(self) {
        self.stop
            .stop_by(tokio::time::Instant::now() + Duration::from_secs(5));
        self.task.await.expect("join").expect("bridge");
    }
}

/// Every vehicle's numbers, once each and in order.
async fn assert_all_once_in_order(bootstrap: &str, vehicles: usize) {
    let bootstrap = bootstrap.to_string();
    let total = vehicles * PER_VEHICLE;
    let got = tokio::task::spawn_blocking(move || {
        common::consume(&bootstrap, TOPIC, PARTITIONS, total, Duration::from_secs(30))
    })
    .await
    .expect("consume");
    let mut per: HashMap<String, Vec<usize>> = HashMap::new();
    for c in &got {
        per.entry(c.key.clone())
            .or_default()
            .push(c.payload.parse().expect("number"));
    }
    assert_eq!(got.len(), total, "every record once");
    assert_eq!(per.len(), vehicles);
    let expected: Vec<usize> = (0..PER_VEHICLE).collect();
    for (key, ns) in &per {
        assert_eq!(ns, &expected, "{key}: in the vehicle's order");
    }
}

/// The mechanism: every Produce request refused with a retriable error (librdkafka
/// retries without end, message.timeout.ms = 0, and reports nothing) while metadata is
/// served with every leader present, which is how a wedged producer looks from outside.
/// The errors outlast the test unless the watchdog acts: they are cleared only once the
/// producer was rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_producer_is_rebuilt_while_the_brokers_answer() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = journal_with_records(dir.path(), VEHICLES).await;
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 10_000],
    );
    let mut cfg = common::config(&bootstrap, dir.path(), 10_000);
    cfg.stall_rebuild = Duration::from_secs(2);
    let pipeline = Pipeline::start(&journal, cfg);
    let status = &pipeline.status;
    assert!(
        common::wait_until(Duration::from_secs(30), || status.producer_rebuilds.get() >= 1).await,
        "the silent producer was rebuilt (gateway_bridge_producer_rebuilds_total); last error {:?}",
        status.last_error()
    );
    assert_eq!(journal.stats().released_seq, 0, "nothing was confirmed before");
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    let total = (VEHICLES * PER_VEHICLE) as u64;
    assert!(
        common::wait_released(&*journal, total, Duration::from_secs(60)).await,
        "every record confirmed after the rebuild; released {}, last error {:?}",
        journal.stats().released_seq,
        status.last_error()
    );
    pipeline.stop().await;
    assert_all_once_in_order(&bootstrap, VEHICLES).await;
}

/// One partition without a leader holds the release watermark; the pipeline's window
/// (`max_inflight`) fills behind it and the producer goes silent, while a new client is
/// served for the other partitions. Rebuilding would only re-send what the healthy
/// partitions already have: the watchdog must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_without_a_leader_is_not_a_wedged_producer() {
    const MANY: usize = 32;
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = journal_with_records(dir.path(), MANY).await;
    cluster.partition_leader(TOPIC, 0, None).expect("leaderless");
    let mut cfg = common::config(&bootstrap, dir.path(), 200);
    cfg.stall_rebuild = Duration::from_secs(2);
    let pipeline = Pipeline::start(&journal, cfg);
    let status = &pipeline.status;
    // Several times the watchdog's silence and grace.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let total = (MANY * PER_VEHICLE) as u64;
    assert!(
        journal.stats().released_seq < total,
        "some vehicle's records go to the leaderless partition (else this test proves nothing)"
    );
    assert_eq!(
        status.producer_rebuilds.get(),
        0,
        "no rebuild for a partition without a leader; last error {:?}",
        status.last_error()
    );
    cluster.partition_leader(TOPIC, 0, Some(1)).expect("leader back");
    assert!(
        common::wait_released(&*journal, total, Duration::from_secs(60)).await,
        "every record confirmed once the partition has a leader; last error {:?}",
        status.last_error()
    );
    pipeline.stop().await;
    assert_all_once_in_order(&bootstrap, MANY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_silent_because_the_brokers_are_down_is_not_rebuilt() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    cluster.broker_down(1).expect("down");
    let journal = journal_with_records(dir.path(), VEHICLES).await;
    let mut cfg = common::config(&bootstrap, dir.path(), 10_000);
    cfg.stall_rebuild = Duration::from_secs(2);
    // The producer finds the broker again well within the watchdog's grace (2 s here).
    cfg.properties
        .insert("reconnect.backoff.max.ms".into(), "200".into());
    let pipeline = Pipeline::start(&journal, cfg);
    let status = &pipeline.status;
    // Several times the watchdog's silence, the probe failing each time.
    tokio::time::sleep(Duration::from_secs(9)).await;
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
    assert_eq!(
        status.producer_rebuilds.get(),
        0,
        "no rebuild while the brokers did not answer"
    );
    pipeline.stop().await;
}
