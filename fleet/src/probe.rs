//! End-to-end probe: reads the backbone topic and reports MQTT-publish → Kafka-visible
//! latency (from the `ts_us` the simulator put in each payload) and any missing,
//! duplicated or out-of-order per-vehicle sequence numbers.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::report::{histogram, Latency};

#[derive(Debug, Default, Serialize)]
pub struct ProbeReport {
    pub records: u64,
    pub vehicles: usize,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub latency: Latency,
}

pub fn run(
    bootstrap: &str,
    topic: &str,
    from_beginning: bool,
    expect: u64,
    idle_secs: u64,
) -> anyhow::Result<ProbeReport> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "fleet-probe")
        .set("enable.auto.commit", "false")
        // Deliver records as soon as they are visible: the probe measures latency.
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = meta.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    anyhow::ensure!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(
            topic,
            p,
            if from_beginning {
                Offset::Beginning
            } else {
                Offset::End
            },
        )?;
    }
    consumer.assign(&tpl)?;
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut hist = histogram();
    let mut r = ProbeReport::default();
    let mut last_seen = Instant::now();
    while (expect == 0 || r.records < expect) && last_seen.elapsed() < Duration::from_secs(idle_secs) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        last_seen = Instant::now();
        r.records += 1;
        let Some(v) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        else {
            continue;
        };
        let (Some(vin), Some(seq), Some(ts)) = (v["vin"].as_str(), v["seq"].as_u64(), v["ts_us"].as_u64())
        else {
            continue;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let _ = hist.record(now.saturating_sub(ts).max(1));
        match last.get(vin).copied() {
            None if seq > 0 && from_beginning => r.missing += seq,
            Some(prev) if seq == prev => r.duplicates += 1,
            Some(prev) if seq < prev => r.out_of_order += 1,
            Some(prev) if seq > prev + 1 => r.missing += seq - prev - 1,
            _ => {}
        }
        let e = last.entry(vin.to_string()).or_insert(seq);
        *e = (*e).max(seq);
    }
    r.vehicles = last.len();
    r.latency = Latency::of(&hist);
    Ok(r)
}
