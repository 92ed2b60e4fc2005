//! The process's log: human lines or JSON objects on stderr (`log.format`), with a
//! filter changeable at run time (`PUT /api/v1/log-level`): an SRE turns a module to
//! `debug` while an incident runs, without a restart that would drop every vehicle's
//! connection. Starts from `RUST_LOG`, else `info`. Built with `--features otlp`, spans
//! are also exported to an OpenTelemetry collector over OTLP/HTTP (`log.otlp_endpoint`).
//!
//! Spans: each connection has an `info` span `conn` (listener, peer, then client id)
//! from accept until its CONNACK, so every refusal says where it came from; a live
//! session runs under a `debug` span `session`, kept disabled by default because an
//! enabled span holds about 0.5 KiB per connection in the subscriber.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::{Layered, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LogSection};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
/// The directives in force, as given (EnvFilter does not print them back faithfully).
static CURRENT: Mutex<String> = Mutex::new(String::new());

/// What the layers after the filter sit on.
type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// Keeps the trace exporter alive; dropping it flushes what is batched.
#[must_use = "dropping the guard stops trace export"]
#[derive(Default)]
pub struct Guard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("trace export: shutdown: {e}");
            }
        }
    }
}

/// Installs the process's subscriber. `ansi`: colours (stderr is a terminal).
/// `gateway_id` names this gateway in exported traces.
pub fn init(ansi: bool, cfg: &LogSection, gateway_id: &str) -> Guard {
    let directives = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, directives) = match EnvFilter::try_new(&directives) {
        Ok(f) if !directives.trim().is_empty() => (f, directives),
        _ => (EnvFilter::new("info"), "info".to_string()),
    };
    let (layer, handle) = reload::Layer::new(filter);
    let fmt: Box<dyn Layer<Filtered> + Send + Sync> = match cfg.format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let mut guard = Guard::default();
    let mut layers = vec![fmt];
    layers.extend(otlp_layer(cfg, gateway_id, &mut guard));
    if tracing_subscriber::registry()
        .with(layer)
        .with(layers)
        .try_init()
        .is_ok()
    {
        let _ = HANDLE.set(handle);
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = directives;
    }
    guard
}

#[cfg(not(feature = "otlp"))]
fn otlp_layer(_: &LogSection, _: &str, _: &mut Guard) -> Option<Box<dyn Layer<Filtered> + Send + Sync>> {
    // `check-config` refuses an endpoint in a build without the feature.
    None
}

/// The OpenTelemetry layer exporting spans in batches over OTLP/HTTP, or `None`
/// without an endpoint (or when the exporter cannot be built: logged, not fatal).
#[cfg(feature = "otlp")]
fn otlp_layer(
    cfg: &LogSection,
    gateway_id: &str,
    guard: &mut Guard,
) -> Option<Box<dyn Layer<Filtered> + Send + Sync>> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    if cfg.otlp_endpoint.is_empty() {
        return None;
    }
    let endpoint = format!("{}/v1/traces", cfg.otlp_endpoint.trim_end_matches('/'));
    let built = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.clone())
        .build();
    let exporter = match built {
        Ok(e) => e,
        Err(e) => {
            eprintln!("trace export to {endpoint} not started: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("edge-gateway")
        .with_attribute(opentelemetry::KeyValue::new("gateway.id", gateway_id.to_string()))
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("gateway");
    guard.provider = Some(provider);
    Some(tracing_opentelemetry::layer().with_tracer(tracer).boxed())
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
