//! The gateway's account of a command run: its outcome records (`commands.outcome_topic`,
//! JSON with `client_id` and `outcome`), counted per outcome for this run's vehicles.
//!
//! The topic's end offsets are taken before the first command; afterwards everything
//! from there is read until as many outcomes as commands issued were seen, nothing new
//! arrived for a while, or a limit passed. A topic that did not exist yet is read from
//! its beginning (it was created during the run). Blocking: call from a blocking thread.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// Where reading starts: the end offset of each partition, or the beginning of a topic
/// that did not exist yet.
pub struct Watch {
    consumer: BaseConsumer,
    topic: String,
    start: Option<Vec<(i32, i64)>>,
    /// Vehicle client ids of this run start with it (`<id-prefix>-`).
    prefix: String,
}

fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, String> {
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("outcome topic {topic}: metadata: {e}"))?;
    Ok(meta
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

pub fn start(bootstrap: &str, topic: &str, id_prefix: &str) -> Result<Watch, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "fleet-command-outcomes")
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(|e| format!("outcome consumer: {e}"))?;
    let parts = partitions(&consumer, topic)?;
    let start = if parts.is_empty() {
        None
    } else {
        let mut ends = Vec::with_capacity(parts.len());
        for p in parts {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map_err(|e| format!("outcome topic {topic}[{p}]: offsets: {e}"))?;
            ends.push((p, high));
        }
        Some(ends)
    };
    Ok(Watch {
        consumer,
        topic: topic.to_string(),
        start,
        prefix: format!("{id_prefix}-"),
    })
}

impl Watch {
    /// Counts this run's outcomes, by outcome, until `expected` were seen, `quiet` passed
    /// without one, or `limit` passed.
    pub fn collect(
        self,
        expected: u64,
        quiet: Duration,
        limit: Duration,
    ) -> Result<BTreeMap<String, u64>, String> {
        let mut tpl = TopicPartitionList::new();
        let from: Vec<(i32, Offset)> = match &self.start {
            Some(ends) => ends.iter().map(|(p, o)| (*p, Offset::Offset(*o))).collect(),
            None => partitions(&self.consumer, &self.topic)?
                .into_iter()
                .map(|p| (p, Offset::Beginning))
                .collect(),
        };
        let mut counts = BTreeMap::new();
        if from.is_empty() {
            return Ok(counts);
        }
        for (p, o) in from {
            tpl.add_partition_offset(&self.topic, p, o)
                .map_err(|e| format!("outcome topic: {e}"))?;
        }
        self.consumer
            .assign(&tpl)
            .map_err(|e| format!("outcome topic: assign: {e}"))?;
        let (begun, mut last) = (Instant::now(), Instant::now());
        let mut seen = 0u64;
        while seen < expected && last.elapsed() < quiet && begun.elapsed() < limit {
            let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let Some(v) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            else {
                continue;
            };
            let ours = v["client_id"]
                .as_str()
                .is_some_and(|c| c.starts_with(&self.prefix));
            if let (true, Some(outcome)) = (ours, v["outcome"].as_str()) {
                *counts.entry(outcome.to_string()).or_insert(0) += 1;
                // `queued` is not final: only final outcomes count towards `expected`.
                if outcome != "queued" {
                    seen += 1;
                }
                last = Instant::now();
            }
        }
        Ok(counts)
    }
}
