//! Fault injection with librdkafka's mock cluster (in addition to the real-broker tests
//! in `tests/`): Produce requests failing with NOT_ENOUGH_REPLICAS and transport errors,
//! the broker going down and coming back, 50 ms round trips. Every record must arrive,
//! each vehicle's records in order, and the journal must release everything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge::producer::{self, BridgeControl, BridgeStatus, ProducerConfig, Shutdown};
use bridge::routes::{Routes, Unmatched};
use bridge::{Entry, Journal, JournalConfig, SegmentedJournal};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const VEHICLES: usize = 10;
const PER_VEHICLE: usize = 300;
const PARTITIONS: i32 = 4;

fn entry(vehicle: usize, n: usize) -> Entry {
    Entry {
        kind: Default::default(),
        received_at_ms: 1_700_000_000_000,
        qos: 1,
        client_id: format!("veh-{vehicle}"),
        topic: format!("vehicles/veh-{vehicle}/telemetry"),
        payload: format!("{n}").into(),
        ..Entry::default()
    }
}

/// Reads `expected` messages back; returns key → payload numbers in partition order.
fn consume(bootstrap: &str, expected: usize) -> HashMap<String, Vec<usize>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "verify")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset("telemetry", p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let key = String::from_utf8_lossy(m.key().expect("key")).into_owned();
            let n: usize = std::str::from_utf8(m.payload().expect("payload"))
                .expect("utf8")
                .parse()
                .expect("n");
            seen.entry(key).or_default().push(n);
            count += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_lose_and_reorder_nothing() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("telemetry", PARTITIONS, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    cluster
        .broker_round_trip_time(1, Duration::from_millis(50))
        .expect("rtt");

    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Arc::new(SegmentedJournal::open(JournalConfig::new(dir.path(), 1 << 30)).expect("journal"));
    // Interleave vehicles as a real gateway would see them.
    for n in 0..PER_VEHICLE {
        for v in 0..VEHICLES {
            journal.append(&entry(v, n)).await.expect("append");
        }
    }
    journal.flush().await.expect("flush");

    // Produce requests fail: retriable broker errors, then broken connections.
    let mut errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 6];
    errors.extend([RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT; 3]);
    errors.extend([RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND; 3]);
    cluster.request_errors(RDKafkaApiKey::Produce, &errors);

    let routes = Arc::new(Routes {
        events: Default::default(),
        routes: vec![],
        unmatched: Unmatched::DefaultTopic("telemetry".into()),
    });
    let cfg = ProducerConfig {
        bootstrap: bootstrap.clone(),
        compression: "lz4".into(),
        linger_ms: 5,
        batch_bytes: 16 * 1024,
        max_inflight: 500,
        gateway_id: "test".into(),
        journal_id: "j-test".into(),
        dead_letter_topic: String::new(),
        parked_dir: dir.path().join("parked"),
        max_parked: 100,
        properties: Default::default(),
        stall_rebuild: Duration::from_secs(60),
    };
    let status = Arc::new(BridgeStatus::default());
    let stop = Shutdown::new();
    let task = tokio::spawn(producer::run(
        journal.clone(),
        routes,
        cfg,
        status.clone(),
        BridgeControl::new(),
        stop.clone(),
    ));

    // Broker down mid-stream, back after two seconds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.broker_down(1).expect("down");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.broker_up(1).expect("up");

    let total = (VEHICLES * PER_VEHICLE) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal.stats().released_seq < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        journal.stats().released_seq,
        total,
        "every record confirmed and released; status {:?}",
        status.last_error()
    );

    let seen = tokio::task::spawn_blocking(move || consume(&bootstrap, VEHICLES * PER_VEHICLE))
        .await
        .expect("consume");
    assert_eq!(seen.len(), VEHICLES);
    for (key, ns) in &seen {
        let expected: Vec<usize> = (0..PER_VEHICLE).collect();
        assert_eq!(ns, &expected, "{key}: every record once, in the vehicle's order");
    }
    assert!(status.errors.get() > 0, "the faults were seen");
    stop.stop_by(tokio::time::Instant::now() + Duration::from_secs(5));
    task.await.expect("join").expect("bridge");
}
