//! The journal's own metrics: group-commit histograms moved by the writer thread, and
//! gauges read from the journal's state when scraped.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, IntCounter, IntGauge};

use super::segmented::{stats_of, Inner};
use crate::metrics::{Defs, BATCH_BUCKETS, LATENCY_BUCKETS};

/// What the writer thread observes per group commit.
#[derive(Clone)]
pub(super) struct CommitMetrics {
    /// One write + `fdatasync` of a batch (retries of a failed batch not included).
    pub latency: Histogram,
    /// Records made durable by that one sync.
    pub records: Histogram,
}

impl CommitMetrics {
    pub fn new(defs: &Defs) -> Self {
        CommitMetrics {
            latency: defs.histogram(
                "gateway_journal_commit_seconds",
                "Group commit time: writing one batch and its fdatasync (PUBACKs of the batch wait for it).",
                LATENCY_BUCKETS,
            ),
            records: defs.histogram(
                "gateway_journal_commit_batch_records",
                "Records made durable by one group commit.",
                BATCH_BUCKETS,
            ),
        }
    }
}

/// Gauges of the journal's state, read when scraped.
pub(super) struct StateGauges {
    inner: Arc<Inner>,
    records: IntGauge,
    bytes: IntGauge,
    segments: IntGauge,
    full: IntGauge,
    stalled: IntGauge,
    oldest_age: IntGauge,
    syncs: IntCounter,
    durable_seq: IntGauge,
    released_seq: IntGauge,
    dropped: IntCounter,
    retained_bytes: IntGauge,
    retained_segments: IntGauge,
    descs: Vec<Desc>,
    /// One scrape at a time: the counters catch up by difference.
    scrape: std::sync::Mutex<()>,
}

impl StateGauges {
    pub fn new(inner: Arc<Inner>) -> Self {
        let g = |name: &str, help: &str| IntGauge::new(name, help).expect("a literal metric name");
        let c = |name: &str, help: &str| IntCounter::new(name, help).expect("a literal metric name");
        let mut s = StateGauges {
            inner,
            records: g("gateway_journal_records", "Journaled records not yet released."),
            bytes: g("gateway_journal_bytes", "Bytes of journal segment files on disk."),
            segments: g("gateway_journal_segments", "Journal segment files."),
            full: g("gateway_journal_full", "1 while appends wait for space (back-pressure)."),
            stalled: g(
                "gateway_journal_stalled",
                "1 while the journal writer retries a transient I/O error (disk full, EMFILE, EIO): nothing new becomes durable, PUBACKs are withheld.",
            ),
            oldest_age: g("gateway_journal_oldest_age_seconds", "Age of the oldest unreleased record."),
            syncs: c("gateway_journal_syncs_total", "Group commits (fdatasync calls)."),
            durable_seq: g("gateway_journal_durable_seq", "Highest durable journal sequence."),
            released_seq: g(
                "gateway_journal_released_seq",
                "Highest journal sequence confirmed by Kafka.",
            ),
            dropped: c(
                "gateway_journal_dropped_records_total",
                "Records dropped undelivered (drop_oldest policy).",
            ),
            retained_bytes: g(
                "gateway_journal_retained_bytes",
                "Bytes of released segments kept for replays (journal.replay_retention_*; outside max_bytes).",
            ),
            retained_segments: g("gateway_journal_retained_segments", "Released segment files kept for replays."),
            descs: Vec::new(),
            scrape: std::sync::Mutex::new(()),
        };
        s.descs = s.all().iter().flat_map(|m| m.desc()).cloned().collect();
        s
    }

    fn all(&self) -> [&dyn Collector; 12] {
        [
            &self.records,
            &self.bytes,
            &self.segments,
            &self.full,
            &self.stalled,
            &self.oldest_age,
            &self.syncs,
            &self.durable_seq,
            &self.released_seq,
            &self.dropped,
            &self.retained_bytes,
            &self.retained_segments,
        ]
    }
}

impl Collector for StateGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let st = stats_of(&self.inner);
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.records.set(i(st.records));
        self.bytes.set(i(st.disk_bytes));
        self.segments.set(i(st.segments));
        self.full.set(i64::from(st.full));
        self.stalled.set(i64::from(st.stalled.is_some()));
        self.oldest_age.set(st.oldest_age.map_or(0, |d| i(d.as_secs())));
        // The journal counts; the counters catch up (they only ever move forward).
        self.syncs.inc_by(st.syncs.saturating_sub(self.syncs.get()));
        self.durable_seq.set(i(st.durable_seq));
        self.released_seq.set(i(st.released_seq));
        self.dropped.inc_by(st.dropped.saturating_sub(self.dropped.get()));
        self.retained_bytes.set(i(st.retained_bytes));
        self.retained_segments.set(i(st.retained_segments));
        self.all().iter().flat_map(|m| m.collect()).collect()
    }
}
