//! Metrics on the `prometheus` crate (the Prometheus text format 0.0.4 that
//! `promtool check metrics` and every scraper read).
//!
//! Each subsystem defines its own metrics, in a registry of its own built with
//! [`Defs`], next to the code that moves them; `/metrics` gathers every subsystem's
//! registry. Labels only ever come from small fixed sets (a reason, a listener kind, an
//! outcome): never a vehicle id.

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Latencies on the acknowledgement path, in seconds: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Ages that can span an outage, in seconds: 1 ms to a day.
pub const AGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    3600.0, 21600.0, 86400.0,
];

/// Counts of things in one batch.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Why `expect` is sound here: names, help texts and labels are literals of this
/// program, each defined once per registry; a test gathers every registry.
const DEFINED_ONCE: &str = "a metric is defined once, with a valid literal name";

/// Builds one subsystem's metrics into its own registry.
#[derive(Default)]
pub struct Defs {
    registry: Registry,
}

impl Defs {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> C {
        self.registry.register(Box::new(c.clone())).expect(DEFINED_ONCE);
        c
    }

    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect(DEFINED_ONCE))
    }

    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect(DEFINED_ONCE))
    }

    pub fn counter_vec(&self, name: &str, help: &str, label: &str) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), &[label]).expect(DEFINED_ONCE))
    }

    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect(DEFINED_ONCE))
    }

    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts).expect(DEFINED_ONCE))
    }

    pub fn histogram_vec(&self, name: &str, help: &str, label: &str, buckets: &[f64]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, &[label]).expect(DEFINED_ONCE))
    }

    /// A collector that reads its values when scraped (gauges of a subsystem's state).
    pub fn collector(&self, c: Box<dyn Collector>) {
        self.registry.register(c).expect(DEFINED_ONCE);
    }

    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }
}

/// A counter family keyed by one label whose values come from a small fixed set.
#[derive(Clone, Debug)]
pub struct Labeled(IntCounterVec);

impl Labeled {
    pub fn new(defs: &Defs, name: &str, help: &str, label: &str) -> Self {
        Labeled(defs.counter_vec(name, help, label))
    }

    pub fn inc(&self, label: &str) {
        self.0.with_label_values(&[label]).inc();
    }

    /// The count under `label` (0 when never counted).
    pub fn get(&self, label: &str) -> u64 {
        self.0
            .get_metric_with_label_values(&[label])
            .map(|c| c.get())
            .unwrap_or(0)
    }
}

#[doc(hidden)]
pub use tracing as __tracing;

/// Counts an event under a label of a [`Labeled`] family and logs it at the given level
/// with that label as its `reason`, in one statement: the log line and the counter come
/// from one place and cannot drift apart.
///
/// `counted!(warn, metrics.protocol_errors, "connect_timeout", %peer, "no CONNECT in time")`
#[macro_export]
macro_rules! counted {
    ($level:ident, $counter:expr, $label:expr, $($rest:tt)+) => {{
        let reason: &'static str = $label;
        $counter.inc(reason);
        $crate::metrics::__tracing::$level!(reason, $($rest)+);
    }};
}

/// Seconds between two wall-clock times in ms (0 when `to` is before `from`: clocks
/// step).
pub fn secs_between_ms(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}

/// Prometheus text of `families`, sorted by name.
pub fn encode(mut families: Vec<MetricFamily>) -> String {
    use prometheus::Encoder as _;
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "metrics not encoded");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn families_render_in_the_prometheus_text_format() {
        let defs = Defs::default();
        let l = Labeled::new(&defs, "x_refused_total", "Refused.", "reason");
        l.inc("full");
        l.inc("full");
        assert_eq!(l.get("full"), 2);
        assert_eq!(l.get("other"), 0);
        let h = defs.histogram("x_latency_seconds", "Latency.", &[0.001, 0.01]);
        h.observe(0.005);
        let text = encode(defs.gather());
        assert!(text.contains("# TYPE x_refused_total counter\nx_refused_total{reason=\"full\"} 2\n"));
        assert!(text.contains("x_latency_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(text.contains("x_latency_seconds_bucket{le=\"0.01\"} 1\n"));
        assert!(text.contains("x_latency_seconds_count 1\n"));
    }
}
