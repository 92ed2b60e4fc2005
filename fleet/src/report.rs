//! Counters shared by the vehicles, the final report (text or JSON) and the optional
//! latency-over-time plot (SVG).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Live counters, updated by every vehicle task.
#[derive(Default)]
pub struct Stats {
    pub connected: AtomicU64,
    /// Microseconds from start to the latest successful CONNACK.
    pub last_connect_us: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub refused: AtomicU64,
    pub commands: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// PUBACK latency in microseconds, merged from the vehicles.
    pub latency: Mutex<Option<Histogram<u64>>>,
    pub command_latency: Mutex<Option<Histogram<u64>>>,
    /// (second since start, PUBACK latency µs) samples for the plot.
    pub samples: Mutex<Vec<(f64, u64)>>,
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

impl Stats {
    pub fn error(&self, kind: &str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.to_string())
            .or_default() += 1;
    }

    pub fn merge(slot: &Mutex<Option<Histogram<u64>>>, h: &Histogram<u64>) {
        let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            Some(all) => {
                let _ = all.add(h);
            }
            None => *g = Some(h.clone()),
        }
    }

    pub fn report(&self, elapsed: Duration, vehicles: usize) -> Report {
        let hist = |slot: &Mutex<Option<Histogram<u64>>>| {
            slot.lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(histogram)
        };
        let acked = self.acked.load(Ordering::Relaxed);
        let sent = self.sent.load(Ordering::Relaxed);
        Report {
            vehicles,
            connected: self.connected.load(Ordering::Relaxed),
            connect_secs: self.last_connect_us.load(Ordering::Relaxed) as f64 / 1e6,
            sent,
            acked,
            refused: self.refused.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            elapsed_secs: elapsed.as_secs_f64(),
            msgs_per_sec: sent as f64 / elapsed.as_secs_f64().max(1e-9),
            acked_per_sec: acked as f64 / elapsed.as_secs_f64().max(1e-9),
            puback_latency: Latency::of(&hist(&self.latency)),
            command_latency: Latency::of(&hist(&self.command_latency)),
            errors: self.errors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            histogram: encode(&hist(&self.latency)),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub vehicles: usize,
    pub connected: u64,
    /// Time until the last vehicle was connected (for connect rate).
    #[serde(default)]
    pub connect_secs: f64,
    pub sent: u64,
    pub acked: u64,
    /// PUBACKs with a failure reason (MQTT 5).
    pub refused: u64,
    pub commands: u64,
    pub elapsed_secs: f64,
    pub msgs_per_sec: f64,
    pub acked_per_sec: f64,
    pub puback_latency: Latency,
    pub command_latency: Latency,
    pub errors: BTreeMap<String, u64>,
    /// HdrHistogram V2, base64: lets a parent process merge its workers exactly.
    #[serde(default)]
    pub histogram: String,
}

fn encode(h: &Histogram<u64>) -> String {
    use base64::Engine;
    let mut buf = Vec::new();
    if V2Serializer::new().serialize(h, &mut buf).is_err() {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn decode(s: &str) -> Option<Histogram<u64>> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    Deserializer::new().deserialize(&mut &bytes[..]).ok()
}

impl Report {
    /// Sums worker reports; latency percentiles come from the merged histograms.
    pub fn combine(parts: &[Report]) -> Report {
        let mut all = Report::default();
        let mut h = histogram();
        for p in parts {
            all.vehicles += p.vehicles;
            all.connected += p.connected;
            all.connect_secs = all.connect_secs.max(p.connect_secs);
            all.sent += p.sent;
            all.acked += p.acked;
            all.refused += p.refused;
            all.commands += p.commands;
            all.elapsed_secs = all.elapsed_secs.max(p.elapsed_secs);
            for (k, v) in &p.errors {
                *all.errors.entry(k.clone()).or_default() += v;
            }
            if let Some(ph) = decode(&p.histogram) {
                let _ = h.add(&ph);
            }
        }
        all.msgs_per_sec = all.sent as f64 / all.elapsed_secs.max(1e-9);
        all.acked_per_sec = all.acked as f64 / all.elapsed_secs.max(1e-9);
        all.puback_latency = Latency::of(&h);
        all.histogram = encode(&h);
        all
    }

    pub fn print(&self) {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "vehicles        {} ({} connected in {:.1} s, {:.0} connections/s)",
            self.vehicles,
            self.connected,
            self.connect_secs,
            self.connected as f64 / self.connect_secs.max(1e-9)
        );
        println!(
            "messages        {} sent, {} PUBACK'd, {} refused",
            self.sent, self.acked, self.refused
        );
        println!("elapsed         {:.1} s", self.elapsed_secs);
        println!(
            "rate            {:.0} msgs/s sent, {:.0} msgs/s acknowledged",
            self.msgs_per_sec, self.acked_per_sec
        );
        let l = &self.puback_latency;
        println!(
            "PUBACK latency  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us)
        );
        if self.commands > 0 {
            let c = &self.command_latency;
            println!(
                "command latency p50 {:.3} ms  p99 {:.3} ms  ({} commands)",
                ms(c.p50_us),
                ms(c.p99_us),
                self.commands
            );
        }
        if self.errors.is_empty() {
            println!("errors          none");
        } else {
            for (k, v) in &self.errors {
                println!("error           {k}: {v}");
            }
        }
    }
}

/// Writes PUBACK latency over time as an SVG scatter plot (log-scaled y).
pub fn plot_svg(samples: &[(f64, u64)], path: &std::path::Path) -> std::io::Result<()> {
    let (w, h, pad) = (900.0, 400.0, 50.0);
    let tmax = samples.iter().map(|s| s.0).fold(1.0, f64::max);
    let ymax = samples.iter().map(|s| s.1).max().unwrap_or(1).max(10) as f64;
    let y = |us: u64| h - pad - ((us.max(1) as f64).log10() / ymax.log10()) * (h - 2.0 * pad);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{pad}' y='20'>PUBACK latency over time (log scale, µs; max {ymax:.0} µs)</text>\
         <line x1='{pad}' y1='{}' x2='{}' y2='{}' stroke='black'/>\
         <line x1='{pad}' y1='{pad}' x2='{pad}' y2='{}' stroke='black'/>\
         <text x='{}' y='{}'>{tmax:.0} s</text>",
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        w - pad - 20.0,
        h - pad + 20.0
    );
    for (t, us) in samples {
        let x = pad + t / tmax * (w - 2.0 * pad);
        svg.push_str(&format!(
            "<circle cx='{x:.1}' cy='{:.1}' r='1' fill='steelblue'/>",
            y(*us)
        ));
    }
    svg.push_str("</svg>");
    std::fs::write(path, svg)
}
