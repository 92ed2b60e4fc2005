//! Scale-out measurement (a benchmark, not a test): does adding a gateway to a region
//! under load dip the fleet's delivered msgs/s?
//!
//! HAProxy (TCP, leastconn) in front of gateways on one real Kafka. Fleet A (50 vehicles
//! × 50 msgs/s QoS 1, 2,500/s) runs through it on gateways 1 and 2 for the whole run. At
//! `JOIN` gateway 3 starts (HAProxy lists it from the beginning, down until its health
//! check passes); at `MORE` fleet B (25 more vehicles, 1,250/s) connects, and leastconn
//! sends them to gateway 3. Every second it samples each gateway's
//! `gateway_bridge_delivered_total` and the topic's end offsets in Kafka, and prints the
//! per-second series, a summary, an ASCII plot, and writes an SVG plot.
//!
//! ```sh
//! cargo build -p gateway && cargo run -p integration --example ha_bench -- [--svg docs/ha-scale-out.svg]
//! ```

use std::time::{Duration, Instant};

use integration::fleet::{Fleet, FleetConfig};
use integration::haproxy::{region_gateway, HaProxy};
use integration::kafka::{free_tcp_ports, Kafka};
use integration::{audit, kafka_config, Gateway};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

const TOPIC: &str = "scaleout";
const PARTITIONS: i32 = 4;
const JOIN: u64 = 20;
const MORE: u64 = 30;
const END: u64 = 50;

struct Sample {
    t: u64,
    acked: u64,
    delivered: [u64; 3],
    /// Records acknowledged and not yet confirmed by Kafka, all gateways together
    /// (`gateway_journal_durable_seq - gateway_journal_released_seq`).
    backlog: u64,
    kafka: u64,
    /// The machine's 1-minute load average (shared machine: other work shows here).
    load: String,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let svg = args
        .iter()
        .position(|a| a == "--svg")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, PARTITIONS);
    let kcfg = kafka_config(&kafka.bootstrap(), TOPIC);
    let ports: [u16; 3] = free_tcp_ports();
    let mut gws: Vec<Option<Gateway>> = vec![
        Some(region_gateway(ports[0], "gw1", &kcfg)),
        Some(region_gateway(ports[1], "gw2", &kcfg)),
        None,
    ];
    let lb = HaProxy::start(&ports);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb.servers_up().iter().filter(|(_, up)| *up).count() < 2 {
        assert!(Instant::now() < deadline, "HAProxy never saw gateways 1 and 2 up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()
        .expect("kafka client");
    let end_offsets = || -> u64 {
        (0..PARTITIONS)
            .map(|p| {
                consumer
                    .fetch_watermarks(TOPIC, p, Duration::from_secs(2))
                    .map(|(_, hi)| hi.max(0) as u64)
                    .unwrap_or(0)
            })
            .sum()
    };

    let mut a = FleetConfig::new("fleetA", 50);
    a.pace = Duration::from_millis(20);
    let fleet_a = Fleet::start(lb.addr, &a);
    let mut fleet_b: Option<Fleet> = None;
    // Gateway 3 starts in its own thread so that the sampling stays on the second.
    let mut joining: Option<std::thread::JoinHandle<Gateway>> = None;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut placement = String::new();
    for t in 0..=END {
        // Sample on the second.
        let at = start + Duration::from_secs(t);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        if joining.as_ref().is_some_and(|j| j.is_finished()) {
            gws[2] = joining.take().map(|j| j.join().expect("gateway 3 started"));
            eprintln!("t={t}s: gateway 3 ready");
        }
        let mut delivered = [0u64; 3];
        let mut backlog = 0;
        for (i, g) in gws.iter().enumerate() {
            if let Some(g) = g {
                let m = g.metrics();
                delivered[i] = audit::metric(&m, "gateway_bridge_delivered_total");
                backlog += audit::metric(&m, "gateway_journal_durable_seq")
                    .saturating_sub(audit::metric(&m, "gateway_journal_released_seq"));
            }
        }
        let acked = fleet_a.acked() + fleet_b.as_ref().map_or(0, Fleet::acked);
        samples.push(Sample {
            t,
            acked,
            delivered,
            backlog,
            kafka: end_offsets(),
            load: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next().map(String::from))
                .unwrap_or_default(),
        });
        if t == JOIN {
            let (port, kcfg) = (ports[2], kcfg.clone());
            joining = Some(std::thread::spawn(move || region_gateway(port, "gw3", &kcfg)));
            eprintln!("t={t}s: gateway 3 starting");
        }
        if t == MORE {
            let mut b = FleetConfig::new("fleetB", 25);
            b.pace = Duration::from_millis(20);
            fleet_b = Some(Fleet::start(lb.addr, &b));
            eprintln!("t={t}s: fleet B (25 vehicles) connecting");
        }
        if t == END - 1 {
            let conns: Vec<u64> = gws
                .iter()
                .map(|g| g.as_ref().map_or(0, |g| g.metric("gateway_connections_active")))
                .collect();
            placement = format!(
                "connections at t={t}s: gw1 {} gw2 {} gw3 {}",
                conns[0], conns[1], conns[2]
            );
        }
    }
    let _ = fleet_a.finish(Duration::from_secs(10));
    if let Some(b) = fleet_b {
        let _ = b.finish(Duration::from_secs(10));
    }

    // Per-second rates.
    println!("| t (s) | PUBACK'd/s | gw1 delivered/s | gw2 delivered/s | gw3 delivered/s | all gateways/s | Kafka end offsets/s | journal backlog (records) | load avg 1 min |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for w in samples.windows(2) {
        let (p, c) = (&w[0], &w[1]);
        let d: Vec<u64> = (0..3)
            .map(|i| c.delivered[i].saturating_sub(p.delivered[i]))
            .collect();
        let row = (
            c.t,
            c.acked - p.acked,
            d[0],
            d[1],
            d[2],
            d.iter().sum::<u64>(),
            c.kafka.saturating_sub(p.kafka),
        );
        let mark = match c.t {
            t if t == JOIN + 1 => " ← gateway 3 starts",
            t if t == MORE + 1 => " ← fleet B connects",
            _ => "",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {}{mark} |",
            row.0, row.1, row.2, row.3, row.4, row.5, row.6, c.backlog, c.load
        );
        rows.push(row);
    }
    println!("\n{placement}");
    let max_backlog = samples.iter().skip(2).map(|s| s.backlog).max().unwrap_or(0);
    println!("largest journal backlog (all gateways, from t=2 s): {max_backlog} records");
    let window = |from: u64, to: u64| -> (f64, u64, u64) {
        let v: Vec<u64> = rows
            .iter()
            .filter(|r| r.0 > from && r.0 <= to)
            .map(|r| r.6)
            .collect();
        let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        (mean, *v.iter().min().unwrap_or(&0), *v.iter().max().unwrap_or(&0))
    };
    for (name, from, to) in [
        ("steady, 2 gateways", 5, JOIN),
        ("gateway 3 joining and idle", JOIN, MORE),
        ("fleet B on gateway 3", MORE + 2, END),
    ] {
        let (mean, min, max) = window(from, to);
        println!("Kafka msgs/s, t in ({from}, {to}]: {name}: mean {mean:.0}, min {min}, max {max}");
    }
    // ASCII series of the Kafka rate (one column per second).
    let peak = rows.iter().map(|r| r.6).max().unwrap_or(1).max(1);
    println!("\nKafka msgs/s per second (each row {} msgs/s):", peak / 10);
    for level in (1..=10).rev() {
        let cut = peak * level / 10;
        let line: String = rows.iter().map(|r| if r.6 >= cut { '#' } else { ' ' }).collect();
        println!("{:>6} |{line}", cut);
    }
    println!("       +{}", "-".repeat(rows.len()));
    println!(
        "        t=1 … {} s; gateway 3 starts at t={JOIN}, fleet B at t={MORE}",
        rows.len()
    );
    if let Some(path) = svg {
        std::fs::write(&path, plot(&rows)).expect("write svg");
        println!("\nwrote {path}");
    }
}

type Row = (u64, u64, u64, u64, u64, u64, u64);

/// A line plot of the per-second series (Kafka, all gateways, each gateway).
fn plot(rows: &[Row]) -> String {
    let (w, h, left, bottom, top) = (760.0, 340.0, 60.0, 40.0, 30.0);
    let max = rows.iter().map(|r| r.6.max(r.5)).max().unwrap_or(1) as f64 * 1.1;
    let n = rows.len().max(2) as f64;
    let x = |t: f64| left + (t - 1.0) / (n - 1.0) * (w - left - 20.0);
    let y = |v: f64| h - bottom - v / max * (h - bottom - top);
    let line = |pick: &dyn Fn(&Row) -> u64, color: &str, dash: &str| {
        let pts: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.0 as f64), y(pick(r) as f64)))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" {dash} points=\"{}\"/>\n",
            pts.join(" ")
        )
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">Delivered to Kafka per second while gateway 3 joins (t={JOIN} s) and takes new vehicles (t={MORE} s)</text>\n"
    );
    for i in 0..=5 {
        let v = max / 5.0 * i as f64;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>\n",
            w - 20.0,
            y(v),
            y(v),
            left - 5.0,
            y(v) + 4.0,
            v
        );
    }
    for t in (0..=rows.len()).step_by(10).skip(1) {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{t} s</text>\n",
            x(t as f64),
            h - bottom + 16.0
        );
    }
    for (t, label) in [(JOIN + 1, "gw3 starts"), (MORE + 1, "fleet B")] {
        s += &format!(
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{top}\" y2=\"{1}\" stroke=\"#999\" stroke-dasharray=\"4\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\" fill=\"#666\">{label}</text>\n",
            x(t as f64),
            h - bottom,
            top + 12.0
        );
    }
    s += &line(&|r| r.6, "#000", "");
    s += &line(&|r| r.2, "#1f77b4", "stroke-dasharray=\"5 3\"");
    s += &line(&|r| r.3, "#ff7f0e", "stroke-dasharray=\"5 3\"");
    s += &line(&|r| r.4, "#2ca02c", "stroke-dasharray=\"5 3\"");
    for (i, (label, color)) in [
        ("Kafka end offsets/s", "#000"),
        ("gw1 delivered/s", "#1f77b4"),
        ("gw2 delivered/s", "#ff7f0e"),
        ("gw3 delivered/s", "#2ca02c"),
    ]
    .iter()
    .enumerate()
    {
        let lx = left + 10.0 + 170.0 * i as f64;
        s += &format!(
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{label}</text>\n",
            lx + 20.0,
            h - 12.0,
            h - 12.0,
            lx + 25.0,
            h - 8.0
        );
    }
    s + "</svg>\n"
}
