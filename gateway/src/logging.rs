//! The log filter, changeable at run time (`PUT /api/v1/log-level`): an SRE turns a
//! module to `debug` while an incident runs, without a restart that would drop every
//! vehicle's connection. Starts from `RUST_LOG`, else `info`.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Registry};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
/// The directives in force, as given (EnvFilter does not print them back faithfully).
static CURRENT: Mutex<String> = Mutex::new(String::new());

/// Installs the process's subscriber: human-readable lines on stderr.
pub fn init(ansi: bool) {
    let directives = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, directives) = match EnvFilter::try_new(&directives) {
        Ok(f) if !directives.trim().is_empty() => (f, directives),
        _ => (EnvFilter::new("info"), "info".to_string()),
    };
    let (layer, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if tracing_subscriber::registry()
        .with(layer)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = HANDLE.set(handle);
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = directives;
    }
}

/// The filter directives in force; `None` when no reloadable subscriber is installed.
pub fn level() -> Option<String> {
    HANDLE.get()?;
    Some(CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Replaces the filter, e.g. `info,gateway::session=debug`.
pub fn set_level(directives: &str) -> Result<(), String> {
    let handle = HANDLE.get().ok_or("this process has no reloadable log filter")?;
    let filter = EnvFilter::try_new(directives).map_err(|e| format!("{directives:?}: {e}"))?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = directives.to_string();
    tracing::warn!(directives, "log filter changed through the admin API");
    Ok(())
}
