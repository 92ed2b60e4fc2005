//! Helpers shared by the mock-cluster tests of the producer pipeline.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bridge::producer::ProducerConfig;
use bridge::routes::{Route, Routes, Unmatched};
use bridge::{Entry, Journal};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub fn entry(vehicle: usize, n: usize, kind: &str) -> Entry {
    Entry {
        kind: Default::default(),
        received_at_ms: 1_700_000_000_000,
        qos: 1,
        client_id: format!("veh-{vehicle}"),
        topic: format!("vehicles/veh-{vehicle}/{kind}"),
        payload: format!("{n}").into(),
        ..Entry::default()
    }
}

/// `vehicles/+/telemetry` → `topic`; everything else refused (no dead-letter topic).
pub fn telemetry_routes(topic: &str) -> Routes {
    Routes {
        events: Default::default(),
        routes: vec![Route {
            mqtt: "vehicles/+/telemetry".into(),
            kafka_topic: topic.into(),
            key: "{client_id}".into(),
        }],
        unmatched: Unmatched::Refuse,
    }
}

pub fn default_routes(topic: &str) -> Routes {
    Routes {
        events: Default::default(),
        routes: vec![],
        unmatched: Unmatched::DefaultTopic(topic.into()),
    }
}

pub fn config(bootstrap: &str, dir: &Path, max_inflight: usize) -> ProducerConfig {
    ProducerConfig {
        bootstrap: bootstrap.to_string(),
        compression: "lz4".into(),
        linger_ms: 5,
        batch_bytes: 16 * 1024,
        max_inflight,
        gateway_id: "test".into(),
        journal_id: "journal-test".into(),
        dead_letter_topic: String::new(),
        parked_dir: dir.join("parked"),
        max_parked: 1000,
        properties: Default::default(),
        stall_rebuild: Duration::from_secs(60),
    }
}

/// Waits until `cond` holds (polling every 50 ms) or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

pub async fn wait_released<J: Journal>(journal: &J, upto: u64, limit: Duration) -> bool {
    wait_until(limit, || journal.stats().released_seq >= upto).await
}

/// One consumed Kafka record.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub key: String,
    pub payload: String,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` from the beginning until `expected` records arrived or `limit` passed
/// (then a short extra poll shows any surplus).
pub fn consume(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    limit: Duration,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "verify")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    let mut extra: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline || extra.is_some_and(|e| now > e) {
            break;
        }
        if out.len() >= expected && extra.is_none() {
            extra = Some(now + Duration::from_millis(500));
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for hd in h.iter() {
                    let v = hd.value.map(|v| String::from_utf8_lossy(v).into_owned());
                    headers.insert(hd.key.to_string(), v.unwrap_or_default());
                }
            }
            out.push(Consumed {
                partition: m.partition(),
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                payload: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                headers,
            });
        }
    }
    out
}
