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

fn run(cfg: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
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
    })
}
