//! `fleet`: simulate a fleet of vehicles against any MQTT broker and measure it.
//!
//! ```text
//! fleet run --vehicles 1000 --rate 10000 --duration-secs 60 --qos 1
//! fleet run --vehicles 18000 --idle --duration-secs 60 --source-ips 4      # connection scale
//! fleet run --vehicles 40000 --idle --workers 3 --source-ips 6              # beyond one process
//! fleet probe --bootstrap 127.0.0.1:9092 --topic vehicles.telemetry        # end-to-end
//! fleet commander --vehicles 100 --rate 100 --duration-secs 30             # command latency
//! fleet fanout --subscribers 1000 --rate 100 --qos 1                       # delivery, 1 → N
//! fleet fanin --publishers 1000 --rate 10000 --qos 1                       # delivery, N → 1
//! fleet commands --vehicles 10000 --rate 1000 --via mqtt                   # command latency
//! ```

mod commands;
mod http;
mod outcomes;
mod probe;
mod pubsub;
mod report;
mod tls;
mod vehicle;
mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::BytesMut;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use report::{Report, Stats};

#[derive(Parser)]
#[command(
    name = "fleet",
    version,
    about = "Fleet simulator and end-to-end probe for MQTT brokers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulate vehicles: connect, publish telemetry, time PUBACKs.
    Run(RunArgs),
    /// Read a Kafka topic and report publish→Kafka latency and sequence gaps.
    Probe {
        #[arg(long)]
        bootstrap: String,
        #[arg(long, default_value = "vehicles.telemetry")]
        topic: String,
        /// Read from the beginning instead of only new records.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many records (0 = when idle).
        #[arg(long, default_value_t = 0)]
        expect: u64,
        /// Stop after this many seconds without a record.
        #[arg(long, default_value_t = 10)]
        idle_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Publish timestamped commands to simulated vehicles (for brokers that route them;
    /// run `fleet run --subscribe-commands` alongside).
    Commander {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value_t = 100)]
        vehicles: usize,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 30)]
        duration_secs: u64,
    },
    /// Command latency: N online vehicles subscribed to their command topics, commands
    /// issued at a fixed rate via MQTT, REST or Kafka, timed at the vehicles (issued →
    /// received, issued → PUBACK written). See `commands.rs` for the definitions.
    Commands(CommandsArgs),
    /// Delivery benchmark, one publisher → N subscribers of one topic: delivered msgs/s,
    /// publish→receive latency, broker CPU.
    Fanout {
        #[command(flatten)]
        common: PubSubArgs,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Messages per second the publisher sends (each delivered to every subscriber).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value = "bench/fanout")]
        topic: String,
    },
    /// Delivery benchmark, N publishers (`vehicles/<id>/telemetry`) → one subscriber of
    /// `vehicles/+/telemetry`.
    Fanin {
        #[command(flatten)]
        common: PubSubArgs,
        #[arg(long, default_value_t = 1000)]
        publishers: usize,
        /// Messages per second over all publishers together.
        #[arg(long, default_value_t = 10000.0)]
        rate: f64,
    },
}

/// What `fanout` and `fanin` share (see `pubsub.rs` for what is measured and when).
#[derive(Args, Clone)]
struct PubSubArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// QoS of the publishes and of the subscriptions: 0 or 1.
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Publishing before the measured window (not counted).
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// The measured window.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Longest wait after the window for messages still on their way.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// Payload size (at least the 16-byte timestamp and sequence header).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// QoS 1 publishes in flight per publisher.
    #[arg(long, default_value_t = 32)]
    window: usize,
    #[arg(long, default_value_t = 60)]
    keep_alive: u16,
    /// Report this process's CPU seconds inside the window, e.g. `broker=1234` (repeatable).
    #[arg(long = "cpu-pid", value_name = "NAME=PID", value_parser = parse_cpu_pid)]
    cpu_pid: Vec<(String, u32)>,
    #[arg(long)]
    json: bool,
}

/// `fleet commands`.
#[derive(Args, Clone)]
struct CommandsArgs {
    /// The MQTT broker the vehicles (and MQTT operators) connect to; vehicle client ids
    /// are `<id-prefix>-<n>`.
    #[command(flatten)]
    conn: ConnArgs,
    /// Path the commands take.
    #[arg(long, value_enum)]
    via: commands::Via,
    /// Vehicles, each connected and subscribed to `vehicles/<id>/commands` (QoS 1).
    #[arg(long, default_value_t = 1000)]
    vehicles: usize,
    /// Commands per second over all vehicles (round robin).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// QoS of the commands: MQTT publish QoS, REST `qos`, Kafka header `qos`.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// MQTT operator connections, REST connections, or tasks sharing the Kafka producer.
    #[arg(long, default_value_t = 8)]
    issuers: usize,
    /// QoS 1 commands in flight per MQTT operator connection.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// MQTT operators log in with this username (and --operator-password).
    #[arg(long, requires = "operator_password")]
    operator_username: Option<String>,
    #[arg(long)]
    operator_password: Option<String>,
    /// MQTT operator client ids are `<operator-prefix>-<n>` (default `<id-prefix>-op`).
    #[arg(long)]
    operator_prefix: Option<String>,
    /// Kafka bootstrap servers (`--via kafka`).
    #[arg(long)]
    kafka_bootstrap: Option<String>,
    /// The gateway's command topic (`commands.kafka_topic`); must exist.
    #[arg(long, default_value = "vehicles.commands")]
    kafka_topic: String,
    /// `linger.ms` of the Kafka issuer's producer: 0 sends each command at once (one
    /// produce request per command at low rates; the broker's CPU then dominates on a
    /// small machine), 5 is librdkafka's and the Java client's default.
    #[arg(long, default_value_t = 0)]
    kafka_linger_ms: u64,
    /// Afterwards, count the gateway's outcome records for this run's vehicles on this
    /// topic (`commands.outcome_topic`, e.g. `vehicles.command-outcomes`; needs
    /// --kafka-bootstrap).
    #[arg(long, requires = "kafka_bootstrap")]
    outcomes_topic: Option<String>,
    /// The gateway's admin API, HOST:PORT (`--via rest`).
    #[arg(long)]
    admin: Option<String>,
    /// Admin bearer token (`--via rest`).
    #[arg(long)]
    token: Option<String>,
    /// Issuing before the measured window (not counted).
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// The measured window.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Longest wait after the window for commands still on their way.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// New vehicle connections per second.
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Spread the vehicles over this many loopback source addresses (127.0.1.x);
    /// default: one per 1,000 vehicles.
    #[arg(long)]
    source_ips: Option<usize>,
    #[arg(long, default_value_t = 60)]
    keep_alive: u16,
    /// Command payload size (at least its `seq=… t_ns=…` text).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Report this process's CPU seconds inside the window, e.g. `broker=1234` (repeatable).
    #[arg(long = "cpu-pid", value_name = "NAME=PID", value_parser = parse_cpu_pid)]
    cpu_pid: Vec<(String, u32)>,
    #[arg(long)]
    json: bool,
}

fn parse_cpu_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    let pid = pid.parse().map_err(|e| format!("PID: {e}"))?;
    Ok((name.to_string(), pid))
}

#[derive(Args, Clone)]
struct ConnArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// MQTT protocol version: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4)]
    mqtt_version: u8,
    /// Connect with TLS, trusting this CA (PEM).
    #[arg(long)]
    ca: Option<String>,
    /// mTLS: CA certificate and key that sign a certificate per vehicle (CN = client id).
    #[arg(long, requires = "client_ca_key")]
    client_ca_cert: Option<String>,
    #[arg(long)]
    client_ca_key: Option<String>,
    /// Server name to verify with TLS (default: --host).
    #[arg(long)]
    server_name: Option<String>,
    /// Client ids are `<prefix>-<n>`; topics `vehicles/<id>/telemetry`.
    #[arg(long, default_value = "veh")]
    id_prefix: String,
}

#[derive(Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[arg(long, default_value_t = 100)]
    vehicles: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Total messages per second over the fleet (0 = as fast as each vehicle's window allows).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Per-vehicle publish interval in ms (overrides --rate).
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Messages per vehicle (0 = until the duration ends).
    #[arg(long, default_value_t = 0)]
    messages: u64,
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// QoS1 publishes in flight per vehicle.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Payload size to pad the JSON telemetry to.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 60)]
    keep_alive: u16,
    /// Connect and hold, publishing nothing (connection-scale runs).
    #[arg(long)]
    idle: bool,
    /// Subscribe each vehicle to `vehicles/<id>/commands/#` and time received commands.
    #[arg(long)]
    subscribe_commands: bool,
    /// Spread connections over this many loopback source addresses (127.0.1.1, ...).
    #[arg(long, default_value_t = 0)]
    source_ips: usize,
    /// Worker processes (each under the 20,000 open-file limit).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[arg(long, hide = true)]
    worker_index: Option<usize>,
    #[arg(long)]
    json: bool,
    /// Write PUBACK latency over time as SVG.
    #[arg(long)]
    plot: Option<String>,
    #[arg(long)]
    no_progress: bool,
}

fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run(args) if args.workers > 1 && args.worker_index.is_none() => run_workers(&args),
        Cmd::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(run(args.clone()))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print();
            }
            Ok(())
        }
        Cmd::Probe {
            bootstrap,
            topic,
            from_beginning,
            expect,
            idle_secs,
            json,
        } => {
            let r = probe::run(&bootstrap, &topic, from_beginning, expect, idle_secs)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let ms = |us: u64| us as f64 / 1000.0;
                println!("records {} from {} vehicles", r.records, r.vehicles);
                println!(
                    "missing {}  duplicates {}  out of order {}",
                    r.missing, r.duplicates, r.out_of_order
                );
                println!(
                    "publish→Kafka latency p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms",
                    ms(r.latency.p50_us),
                    ms(r.latency.p90_us),
                    ms(r.latency.p99_us),
                    ms(r.latency.p999_us)
                );
            }
            Ok(())
        }
        Cmd::Commander {
            conn,
            vehicles,
            rate,
            duration_secs,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(commander(conn, vehicles, rate, duration_secs))
        }
        Cmd::Commands(args) => commands_main(args),
        Cmd::Fanout {
            common,
            subscribers,
            rate,
            topic,
        } => pubsub_main(common, pubsub::Pattern::FanOut, subscribers, rate, topic),
        Cmd::Fanin {
            common,
            publishers,
            rate,
        } => pubsub_main(common, pubsub::Pattern::FanIn, publishers, rate, String::new()),
    }
}

/// Runs `fanout` or `fanin`, prints the report, and fails (non-zero exit) when the run
/// is not a valid measurement.
fn pubsub_main(
    args: PubSubArgs,
    pattern: pubsub::Pattern,
    clients: usize,
    rate: f64,
    topic: String,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.qos <= 1, "--qos must be 0 or 1");
    anyhow::ensure!(clients > 0, "at least one publisher and one subscriber");
    anyhow::ensure!(rate > 0.0, "--rate must be above 0");
    let conn = &args.conn;
    let tls = match &conn.ca {
        Some(ca) => {
            let client = conn.client_ca_cert.as_deref().zip(conn.client_ca_key.as_deref());
            let name = rustls::pki_types::ServerName::try_from(
                conn.server_name.clone().unwrap_or_else(|| conn.host.clone()),
            )
            .map_err(|e| anyhow!("--server-name: {e}"))?;
            Some((tls::VehicleTls::new(ca, client)?, name))
        }
        None => None,
    };
    let plan = pubsub::Plan {
        pattern,
        addr: resolve(conn)?,
        tls,
        v5: conn.mqtt_version == 5,
        qos: args.qos,
        clients,
        rate,
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs.max(1)),
        drain: Duration::from_secs(args.drain_secs),
        payload_bytes: args.payload_bytes,
        connect_rate: args.connect_rate,
        window: args.window.max(1),
        keep_alive: args.keep_alive,
        id_prefix: conn.id_prefix.clone(),
        topic,
        cpu_pids: args.cpu_pid.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(pubsub::run(plan));
    // Tasks still parked on a broker that never answered are dropped, not awaited.
    rt.shutdown_timeout(Duration::from_secs(1));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print();
    }
    // A harness reads the reason from stderr and the exit status; no backtrace.
    if let Some(f) = &report.failure {
        eprintln!("fleet {} QoS {}: FAILED: {f}", report.pattern, report.qos);
        std::process::exit(1);
    }
    Ok(())
}

/// Runs `commands`, prints the report, and fails (exit 1; 3 when the REST command route
/// is missing) when the run is not a valid measurement.
fn commands_main(args: CommandsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.qos <= 2, "--qos must be 0, 1 or 2");
    anyhow::ensure!(args.vehicles > 0, "at least one vehicle");
    anyhow::ensure!(args.issuers > 0, "at least one issuer");
    anyhow::ensure!(args.rate > 0.0, "--rate must be above 0");
    let conn = &args.conn;
    let tls = match &conn.ca {
        Some(ca) => {
            let client = conn.client_ca_cert.as_deref().zip(conn.client_ca_key.as_deref());
            let name = rustls::pki_types::ServerName::try_from(
                conn.server_name.clone().unwrap_or_else(|| conn.host.clone()),
            )
            .map_err(|e| anyhow!("--server-name: {e}"))?;
            Some((tls::VehicleTls::new(ca, client)?, name))
        }
        None => None,
    };
    let admin = match &args.admin {
        Some(a) => Some(
            a.to_socket_addrs()
                .with_context(|| format!("--admin {a}"))?
                .next()
                .ok_or_else(|| anyhow!("--admin {a}: no address"))?,
        ),
        None => None,
    };
    let plan = commands::Plan {
        via: args.via,
        addr: resolve(conn)?,
        tls,
        v5: conn.mqtt_version == 5,
        vehicles: args.vehicles,
        rate: args.rate,
        qos: args.qos,
        issuers: args.issuers,
        window: args.window.max(1),
        operator_login: args.operator_username.clone().zip(args.operator_password.clone()),
        operator_prefix: args
            .operator_prefix
            .clone()
            .unwrap_or_else(|| format!("{}-op", conn.id_prefix)),
        kafka_bootstrap: args.kafka_bootstrap.clone(),
        kafka_topic: args.kafka_topic.clone(),
        kafka_linger_ms: args.kafka_linger_ms,
        outcomes_topic: args.outcomes_topic.clone(),
        admin,
        token: args.token.clone(),
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs.max(1)),
        drain: Duration::from_secs(args.drain_secs),
        connect_rate: args.connect_rate,
        source_ips: args.source_ips.unwrap_or(args.vehicles.div_ceil(1000)),
        keep_alive: args.keep_alive,
        payload_bytes: args.payload_bytes,
        id_prefix: conn.id_prefix.clone(),
        cpu_pids: args.cpu_pid.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(commands::run(plan));
    // Tasks still parked on a broker that never answered are dropped, not awaited.
    rt.shutdown_timeout(Duration::from_secs(1));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print();
    }
    if let Some(f) = &report.failure {
        eprintln!("fleet commands via {}: FAILED: {f}", report.via);
        std::process::exit(if report.unavailable { 3 } else { 1 });
    }
    Ok(())
}

/// Splits the fleet over child processes and merges their JSON reports.
fn run_workers(args: &RunArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    // The parent's output flags are replaced by the workers' own.
    let raw: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--json" && a != "--no-progress" && !a.starts_with("--plot"))
        .collect();
    let mut children = Vec::new();
    for w in 0..args.workers {
        let mut cmd = Command::new(&exe);
        cmd.args(&raw)
            .args(["--worker-index", &w.to_string(), "--json", "--no-progress"]);
        cmd.stdout(Stdio::piped());
        children.push(cmd.spawn().context("spawn worker")?);
    }
    let mut parts = Vec::new();
    for c in children {
        let out = c.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .last()
            .ok_or_else(|| anyhow!("worker printed nothing"))?;
        parts.push(serde_json::from_str::<Report>(line).context("worker report")?);
    }
    let report = Report::combine(&parts);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print();
    }
    Ok(())
}

fn resolve(conn: &ConnArgs) -> anyhow::Result<SocketAddr> {
    (conn.host.as_str(), conn.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {}", conn.host))
}

async fn run(args: RunArgs) -> anyhow::Result<Report> {
    let conn = &args.conn;
    let addr = resolve(conn)?;
    let tls = match &conn.ca {
        Some(ca) => {
            let client = conn.client_ca_cert.as_deref().zip(conn.client_ca_key.as_deref());
            Some(tls::VehicleTls::new(ca, client)?)
        }
        None => None,
    };
    let server_name = match &tls {
        Some(_) => Some(
            rustls::pki_types::ServerName::try_from(
                conn.server_name.clone().unwrap_or_else(|| conn.host.clone()),
            )
            .map_err(|e| anyhow!("--server-name: {e}"))?,
        ),
        None => None,
    };
    let (first, last) = match args.worker_index {
        Some(w) => (
            w * args.vehicles / args.workers,
            (w + 1) * args.vehicles / args.workers,
        ),
        None => (0, args.vehicles),
    };
    let interval = match (args.interval_ms, args.rate) {
        (Some(ms), _) => Some(Duration::from_millis(ms)),
        (None, r) if r > 0.0 => Some(Duration::from_secs_f64(args.vehicles as f64 / r)),
        _ => None,
    };
    let start = Instant::now();
    let ramp = Duration::from_secs_f64(args.vehicles as f64 / args.connect_rate.max(1.0));
    let plan = Arc::new(vehicle::Plan {
        addr,
        tls_server_name: server_name,
        v5: conn.mqtt_version == 5,
        qos: args.qos.min(1),
        keep_alive: args.keep_alive,
        interval,
        messages: args.messages,
        window: args.window.max(1),
        start,
        deadline: start + ramp + Duration::from_secs(args.duration_secs),
        idle: args.idle,
        subscribe_commands: args.subscribe_commands,
        topic_prefix: "vehicles".into(),
        payload_bytes: args.payload_bytes,
    });
    let stats = Arc::new(Stats::default());
    let bar = if args.no_progress || args.json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(args.vehicles as u64);
        b.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} connected  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let ticker = {
        let (stats, bar) = (stats.clone(), bar.clone());
        tokio::spawn(async move {
            let mut last = (0u64, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let acked = stats.acked.load(Ordering::Relaxed);
                let rate = (acked - last.0) as f64 / last.1.elapsed().as_secs_f64();
                last = (acked, Instant::now());
                bar.set_position(stats.connected.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "sent {}  acked {}  {:.0} acks/s",
                    stats.sent.load(Ordering::Relaxed),
                    acked,
                    rate
                ));
            }
        })
    };
    let mut tasks = Vec::with_capacity(last - first);
    // --connect-rate is for the whole fleet: each worker takes its share.
    let workers = if args.worker_index.is_some() {
        args.workers.max(1)
    } else {
        1
    };
    let pace = Duration::from_secs_f64(workers as f64 / args.connect_rate.max(1.0));
    let mut next = Instant::now();
    for i in first..last {
        let id = format!("{}-{i}", conn.id_prefix);
        let client_tls = match &tls {
            Some(t) => Some(t.for_vehicle(&id)?),
            None => None,
        };
        let source = (args.source_ips > 0).then(|| source_ip(i % args.source_ips));
        tasks.push(tokio::spawn(vehicle::run(
            id,
            plan.clone(),
            stats.clone(),
            source,
            client_tls,
        )));
        next += pace;
        tokio::time::sleep_until(next).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    ticker.abort();
    bar.finish_and_clear();
    let report = stats.report(start.elapsed(), last - first);
    if let Some(path) = &args.plot {
        let samples = stats.samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
        report::plot_svg(&samples, std::path::Path::new(path))?;
    }
    Ok(report)
}

async fn commander(conn: ConnArgs, vehicles: usize, rate: f64, duration_secs: u64) -> anyhow::Result<()> {
    let addr = resolve(&conn)?;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let v5 = conn.mqtt_version == 5;
    let mut out = BytesMut::new();
    wire::connect(&mut out, &format!("{}-commander", conn.id_prefix), 60, v5);
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    while wire::next_packet(&mut buf).is_none() {
        anyhow::ensure!(s.read_buf(&mut buf).await? > 0, "commander: no CONNACK");
    }
    let (mut rd, mut wr) = s.into_split();
    tokio::spawn(async move {
        let mut sink = BytesMut::new();
        while rd.read_buf(&mut sink).await.is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let end = Instant::now() + Duration::from_secs(duration_secs);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    let (mut n, mut pkid) = (0usize, 0u16);
    while Instant::now() < end {
        tick.tick().await;
        out.clear();
        pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros();
        let topic = format!(
            "vehicles/{}-{}/commands/ping",
            conn.id_prefix,
            n % vehicles.max(1)
        );
        wire::publish(
            &mut out,
            &topic,
            1,
            pkid,
            format!("{{\"ts_us\":{ts}}}").as_bytes(),
            v5,
        );
        wr.write_all(&out).await?;
        n += 1;
    }
    println!("sent {n} commands");
    Ok(())
}
