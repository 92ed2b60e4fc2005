//! `gateway` command line: run, check a config, hash a password, inspect the journal,
//! make a development PKI.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::config::Config;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "MQTT edge gateway for connected vehicles, bridging to Apache Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
    /// Validate a configuration (file + GATEWAY_* environment); prints every problem.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print an argon2id hash for `auth.users[].password_hash`; reads the password from stdin.
    HashPassword,
    /// Ask a running gateway's `/healthz` (on its `admin.listen`, a wildcard address
    /// asked on loopback); exit 0 on 200, 1 otherwise (as Docker's HEALTHCHECK
    /// expects; a configuration error is 1 too). The container image's
    /// HEALTHCHECK: the slim runtime image carries no curl.
    Healthcheck {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Inspect or repair the write-ahead journal of a stopped gateway.
    Journal {
        #[command(subcommand)]
        action: JournalCommand,
    },
    /// Development certificates (never for production).
    Certs {
        #[command(subcommand)]
        action: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a dev CA (ca.pem/.key), a server certificate (server.pem/.key) and vehicle
    /// client certificates (vehicle-<id>.pem/.key, CN = client id); keys are mode 0600.
    Init {
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        /// Server certificate subject alternative name (DNS name or IP address); repeat
        /// for several.
        #[arg(long = "san", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        sans: Vec<String>,
        /// Number of vehicle certificates: <id-prefix>0001 ... <id-prefix>N.
        #[arg(long, default_value_t = 1)]
        vehicles: usize,
        #[arg(long, default_value = "VIN")]
        id_prefix: String,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Overwrite existing files (a new CA invalidates every certificate it signed).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Scan every segment; exit 0 when intact, 1 when damage was found (printed with
    /// segment, offset and the sequence range at risk).
    Verify(JournalTarget),
    /// Move damaged spans to `<journal dir>/quarantine/`, keep every intact record, and
    /// print what was lost. Run `verify` first; stop the gateway before either.
    Repair(JournalTarget),
}

/// Which journal: the `journal.dir` of a configuration, or a directory given directly.
#[derive(clap::Args)]
struct JournalTarget {
    #[arg(long, default_value = "config/gateway.toml", conflicts_with = "dir")]
    config: PathBuf,
    /// The journal directory (instead of reading it from `--config`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl JournalTarget {
    fn dir(&self) -> Result<PathBuf, ExitCode> {
        if let Some(d) = &self.dir {
            return Ok(d.clone());
        }
        match Config::load(&self.config, std::env::vars()) {
            Ok(c) => Ok(c.journal.dir),
            Err(e) => {
                eprint!("{e}");
                Err(ExitCode::from(2))
            }
        }
    }
}

fn journal_command(action: JournalCommand) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (target, repair) = match &action {
        JournalCommand::Verify(t) => (t, false),
        JournalCommand::Repair(t) => (t, true),
    };
    let dir = match target.dir() {
        Ok(d) => d,
        Err(code) => return code,
    };
    if repair {
        match bridge::journal::repair(&dir) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("journal repair failed: {e}");
                ExitCode::from(2)
            }
        }
    } else {
        match bridge::journal::verify(&dir) {
            Ok(report) => {
                println!("{report}");
                if report.is_clean() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("journal verify failed: {e}");
                ExitCode::from(2)
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load_for_host(&config, std::env::vars()) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Journal { action } => journal_command(action),
        Command::Certs {
            action:
                CertsCommand::Init {
                    out,
                    sans,
                    vehicles,
                    id_prefix,
                    days,
                    force,
                },
        } => {
            let opts = gateway::certs::InitOptions {
                out,
                sans,
                vehicles: gateway::certs::vehicle_ids(&id_prefix, vehicles),
                days,
                force,
            };
            match gateway::certs::init(&opts) {
                Ok(written) => {
                    print!("{written}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("certs init: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Healthcheck { config, timeout } => healthcheck(&config, timeout),
        Command::HashPassword => {
            let mut password = String::new();
            if std::io::stdin().read_to_string(&mut password).is_err() {
                eprintln!("cannot read the password from stdin");
                return ExitCode::FAILURE;
            }
            match gateway::auth::hash_password(password.trim_end_matches(['\n', '\r'])) {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("hashing failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            if let Err(e) = worker_threads_env(std::env::var_os("TOKIO_WORKER_THREADS")) {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
            let cfg = match Config::load_for_host(&config, std::env::vars()) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(2);
                }
            };
            let _log = gateway::logging::init(
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
                &cfg.log,
                &cfg.gateway_id(),
            );
            match run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("fatal: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// One `GET /healthz` over plain HTTP/1.1 on the admin listener (std only: no HTTP
/// client in the image). The token is sent when the probes are not open. Every failure,
/// a bad configuration included, exits 1: Docker reserves exit code 2 of a HEALTHCHECK.
fn healthcheck(config: &std::path::Path, timeout_secs: u64) -> ExitCode {
    use std::io::Write;
    let cfg = match Config::load(config, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let listen = cfg.admin.listen.trim();
    if listen.is_empty() {
        eprintln!("healthcheck: admin.listen is empty; the admin API is disabled");
        return ExitCode::FAILURE;
    }
    let mut addr: std::net::SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("healthcheck: admin.listen {listen:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut auth = String::new();
    if !cfg.admin.open_probes {
        match cfg.admin_token() {
            Ok(t) if !t.is_empty() => auth = format!("Authorization: Bearer {t}\r\n"),
            Ok(_) => {}
            Err(e) => {
                eprintln!("healthcheck: {}: {}", e.key, e.message);
                return ExitCode::FAILURE;
            }
        }
    }
    let timeout = std::time::Duration::from_secs(timeout_secs.max(1));
    let result = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.take(64 * 1024).read_to_string(&mut body)?;
        Ok(body)
    })();
    match result {
        Ok(answer) => {
            let status = answer.lines().next().unwrap_or("");
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
            if status.split_whitespace().nth(1) == Some("200") {
                println!("healthy: {body}");
                ExitCode::SUCCESS
            } else {
                println!("unhealthy: {status} {body}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("unhealthy: GET http://{addr}/healthz: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Checks `TOKIO_WORKER_THREADS` as the runtime will read it (a whole number above 0):
/// the runtime panics on anything else, with a backtrace instead of the fix.
fn worker_threads_env(value: Option<std::ffi::OsString>) -> Result<(), String> {
    let Some(value) = value else {
        return Ok(());
    };
    match value.to_str().map(str::parse::<usize>) {
        Some(Ok(n)) if n > 0 => Ok(()),
        _ => Err(format!(
            "environment variable TOKIO_WORKER_THREADS = {value:?}: the number of runtime worker \
             threads must be a whole number above 0 (e.g. TOKIO_WORKER_THREADS=4); unset it to \
             use one per CPU"
        )),
    }
}

fn run(cfg: Config) -> anyhow::Result<()> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    // Tokio's LIFO slot runs the task woken last first: two connections whose packets
    // arrive in one poll of the socket driver were served in reverse order, so a
    // SUBSCRIBE sent just before another client's PUBLISH routinely missed it (a
    // conformance suite's request/response test; Mosquitto serves them in order).
    // First woken, first served. Needs `--cfg tokio_unstable` (.cargo/config.toml).
    #[cfg(tokio_unstable)]
    b.disable_lifo_slot();
    let rt = b.enable_all().build()?;
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
            signal.cancel();
        });
        gateway::server::run(cfg, shutdown).await
    });
    // Everything that must finish was awaited by `server::run`. What may still run is a
    // blocking leftover (a Kafka broker probe, the destroy of a producer that was wedged):
    // dropping the runtime would wait for it without bound.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}
