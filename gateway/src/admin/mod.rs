//! The operator's HTTP surface: Prometheus `/metrics`, `/healthz`, and the REST API
//! under `/api/v1` (bearer token from `admin.token` when set, compared in constant
//! time). [`listener`] serves it with a connection bound and timeouts.

mod commands;
pub mod error;
pub mod listener;
mod operate;
mod page;
mod replay;
mod retained;
mod sessions;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bridge::Journal;
use serde_json::json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::Shared;
use error::{ApiError, ApiQuery, ErrorCode};

/// The OpenAPI document's frame; the paths come from the routes themselves
/// ([`api_routes`]), so a routed path cannot be missing from it.
#[derive(OpenApi)]
#[openapi(
    info(title = "edge-gateway admin API", description = "Operate a regional MQTT-to-Kafka gateway. Errors are {\"error\": {\"code\", \"message\"}} with the stable codes of docs/API.md."),
    modifiers(&BearerAuth),
    components(schemas(error::ErrorBody, error::ErrorDetail))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every `/api/v1` route, each registered together with its OpenAPI operation.
fn api_routes() -> OpenApiRouter<Arc<Shared>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(status))
        .routes(routes!(journal))
        .routes(routes!(bridge))
        .routes(routes!(operate::pause))
        .routes(routes!(operate::resume))
        .routes(routes!(parked))
        .routes(routes!(redrive))
        .routes(routes!(replay::start, replay::list))
        .routes(routes!(replay::get, replay::cancel))
        .routes(routes!(commands::list, commands::issue))
        .routes(routes!(sessions::list_connections))
        .routes(routes!(sessions::get_connection, sessions::kick))
        .routes(routes!(sessions::list_sessions))
        .routes(routes!(sessions::get_session, sessions::discard))
        .routes(routes!(retained::list_subscriptions))
        .routes(routes!(retained::list_retained, retained::delete_retained))
        .routes(routes!(operate::config))
        .routes(routes!(operate::routes))
        .routes(routes!(operate::get_log_level, operate::set_log_level))
}

/// The OpenAPI 3 document of the admin API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().split_for_parts().1
}

pub fn router(shared: Arc<Shared>) -> Router {
    let (api, doc) = api_routes().split_for_parts();
    let doc = Arc::new(doc);
    let api = api
        .route(
            "/api/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json((*doc).clone()) }
            }),
        )
        // Unknown paths under /api/v1 answer in the API's error shape too.
        .fallback(|| async { ApiError::not_found("no such route; see /api/v1/openapi.json") })
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            refuse_changes_while_draining,
        ))
        .route_layer(middleware::from_fn_with_state(shared.clone(), require_token));
    let mut probes = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if !shared.cfg.admin.open_probes {
        probes = probes.route_layer(middleware::from_fn_with_state(shared.clone(), require_token));
    }
    Router::new()
        .route("/", get(page::page))
        .merge(probes)
        .merge(api)
        .with_state(shared)
}

async fn require_token(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let token = &s.admin_token;
    if !token.is_empty() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if !token_matches(given, token.as_bytes()) {
            return ApiError::new(ErrorCode::Unauthorized, "missing or wrong bearer token").into_response();
        }
    }
    next.run(req).await
}

/// Once the gateway is draining (SIGTERM), every request that changes something is
/// refused with 503 `shutting_down`; reads still answer. The admin listener stays open
/// through the drain for `/readyz` and `/metrics`, but a command accepted now, a session
/// discarded now, could lose its outcome: the command sink and the store are closing.
async fn refuse_changes_while_draining(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if s.shutdown.is_cancelled() && req.method() != axum::http::Method::GET {
        return ApiError::new(
            ErrorCode::ShuttingDown,
            "the gateway is shutting down; send this to another gateway or after the restart",
        )
        .into_response();
    }
    next.run(req).await
}

/// Constant-time comparison, so response timing does not reveal how much of a guessed
/// token was right. (Only the length can leak; tokens should be long and random.)
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.ct_eq(expected).into()
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let text = bridge::metrics::encode(crate::metrics::gather_all(&s));
    ([(header::CONTENT_TYPE, bridge::metrics::CONTENT_TYPE)], text)
}

/// Liveness as an orchestrator should act on it: 503 only when restarting the process
/// may be the fix: the journal writer stopped (nothing can be acknowledged), or the Kafka
/// pipeline keeps crashing (panics, journal I/O errors such as running out of file
/// descriptors: the process's own state). Reported but still 200: a journal stalled on a
/// transient I/O error (disk full; a restart would not free the disk, and the journal
/// resumes by itself) and a bridge failed on something a restart meets again (an invalid
/// producer setting, damaged journal data: the supervisor retries every 30 s, and a
/// liveness probe acting on it would restart the gateway in a loop, its vehicles
/// reconnecting each time; `/readyz` steers new vehicles away instead). Kafka being
/// unreachable or refusing the credentials is neither: the bridge is `down` and the
/// journal buffers. `problems` and `warnings` list every reason, for the operator paged
/// at 3 am.
async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let journal = s.journal.stats();
    let mut problems = Vec::new();
    if s.journal_stopped() {
        problems.push(json!({"code": "journal_stopped", "message": "the journal writer stopped; nothing more is acknowledged"}));
    }
    let mut warnings = Vec::new();
    if let Some(why) = s.bridge.failed() {
        let failure = json!({"code": "bridge_failed", "message": why});
        if s.bridge.failed_restart_may_help() {
            problems.push(failure);
        } else {
            warnings.push(failure);
        }
    }
    if let Some(why) = &journal.stalled {
        warnings.push(json!({"code": "journal_stalled", "message": why}));
    }
    if s.bridge.paused() {
        warnings.push(json!({"code": "bridge_paused", "message": "an operator paused forwarding to Kafka (POST /api/v1/bridge/resume); the journal fills meanwhile"}));
    }
    let status = problems
        .first()
        .and_then(|p| p["code"].as_str())
        .unwrap_or("ok")
        .to_string();
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({"status": status, "problems": problems, "warnings": warnings})),
    )
}

/// Readiness as a load balancer should act on it: 503 while the gateway should not get
/// new vehicles — shutting down, journal stopped (nothing could be acknowledged), Kafka
/// bridge failing persistently. The MQTT listeners are bound before the admin listener,
/// so an answer at all means they are. `problems` says why not.
async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if s.shutdown.is_cancelled() {
        problems.push(json!({"code": "shutting_down", "message": "the gateway is draining its connections"}));
    }
    if s.journal_stopped() {
        problems.push(json!({"code": "journal_stopped", "message": "the journal writer stopped; nothing more is acknowledged"}));
    }
    if let Some(why) = s.bridge.failed() {
        problems.push(json!({"code": "bridge_failed", "message": why}));
    }
    if s.bridge.paused() && s.journal.stats().full {
        problems.push(json!({"code": "bridge_paused_journal_full", "message": "the Kafka bridge is paused and the journal is full: nothing new can be acknowledged (POST /api/v1/bridge/resume)"}));
    }
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({"ready": problems.is_empty(), "problems": problems})),
    )
}

/// The journal as `GET /api/v1/journal` shows it.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct JournalView {
    /// This journal's id (the `gateway.journal` Kafka header).
    id: String,
    /// Records appended and not yet confirmed by Kafka.
    records: u64,
    /// Bytes of the live segment files on disk (retained ones apart).
    disk_bytes: u64,
    segments: u64,
    /// `journal.max_bytes`: at it, `full_policy` applies.
    max_bytes: u64,
    /// `journal.full_policy`: `backpressure`, `reject` or `drop_oldest`.
    full_policy: String,
    /// Age of the oldest record not yet confirmed by Kafka.
    oldest_age_secs: Option<f64>,
    next_seq: u64,
    /// Highest sequence fsync'd (acknowledged to vehicles).
    durable_seq: u64,
    /// Highest sequence Kafka confirmed.
    released_seq: u64,
    /// Group commits since start.
    syncs: u64,
    /// The journal holds `max_bytes`.
    full: bool,
    /// The writer retries a transient I/O error (nothing new becomes durable).
    stalled: bool,
    stalled_reason: Option<String>,
    /// The range `POST /api/v1/replay` can re-send (with `journal.replay_retention_*`).
    retained_from_seq: Option<u64>,
    retained_to_seq: Option<u64>,
    /// Released segments kept for replays: bytes and files.
    retained_bytes: u64,
    retained_segments: u64,
}

#[utoipa::path(get, path = "/api/v1/journal", tag = "journal",
    responses((status = 200, body = JournalView), (status = 401, body = error::ErrorBody)),
    security(("bearer" = [])))]
async fn journal(State(s): State<Arc<Shared>>) -> Json<JournalView> {
    let st = s.journal.stats();
    Json(JournalView {
        id: s.journal.id().to_string(),
        records: st.records,
        disk_bytes: st.disk_bytes,
        segments: st.segments,
        max_bytes: s.cfg.journal.max_bytes,
        full_policy: s.cfg.journal.full_policy.clone(),
        oldest_age_secs: st.oldest_age.map(|d| d.as_secs_f64()),
        next_seq: st.next_seq,
        durable_seq: st.durable_seq,
        released_seq: st.released_seq,
        syncs: st.syncs,
        full: st.full,
        stalled: st.stalled.is_some(),
        stalled_reason: st.stalled,
        retained_from_seq: st.retained.map(|r| r.from_seq),
        retained_to_seq: st.retained.map(|r| r.to_seq),
        retained_bytes: st.retained_bytes,
        retained_segments: st.retained_segments,
    })
}

/// The Kafka bridge as `GET /api/v1/bridge` shows it.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct BridgeView {
    /// Kafka bootstrap in use (the mock cluster's address when embedded).
    bootstrap: String,
    /// The embedded mock cluster (development only).
    embedded: bool,
    dev_only: bool,
    /// `connecting`, `connected`, `degraded`, `down` or `failed`.
    state: String,
    /// An operator paused forwarding (`POST /api/v1/bridge/pause`).
    paused: bool,
    /// Why the bridge fails persistently (`/readyz` is 503 meanwhile).
    failed: Option<String>,
    restarts: u64,
    /// Records in the parked store now.
    parked_now: i64,
    redriven: u64,
    /// Records produced and not yet confirmed.
    in_flight: i64,
    delivered: u64,
    dead_lettered: u64,
    parked: u64,
    errors: u64,
    last_error: Option<String>,
    /// Journal records waiting for Kafka.
    journal_waiting: u64,
    journal_oldest_age_secs: Option<f64>,
    released_seq: u64,
    durable_seq: u64,
    /// Every Kafka topic the routes (and presence) write to.
    topics: Vec<String>,
}

#[utoipa::path(get, path = "/api/v1/bridge", tag = "bridge",
    responses((status = 200, body = BridgeView), (status = 401, body = error::ErrorBody)),
    security(("bearer" = [])))]
async fn bridge(State(s): State<Arc<Shared>>) -> Json<BridgeView> {
    let b = &s.bridge;
    let j = s.journal.stats();
    Json(BridgeView {
        bootstrap: s.bootstrap.clone(),
        embedded: s.embedded,
        dev_only: s.embedded,
        state: b.state().as_str().to_string(),
        paused: b.paused(),
        failed: b.failed(),
        restarts: b.restarts.get(),
        parked_now: b.parked_now.get(),
        redriven: b.redriven.get(),
        in_flight: b.in_flight.get(),
        delivered: b.delivered.get(),
        dead_lettered: b.dead_lettered.get(),
        parked: b.parked.get(),
        errors: b.errors.get(),
        last_error: b.last_error(),
        journal_waiting: j.records,
        journal_oldest_age_secs: j.oldest_age.map(|d| d.as_secs_f64()),
        released_seq: j.released_seq,
        durable_seq: j.durable_seq,
        topics: s.routes.topics(),
    })
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ParkedQuery {
    /// Records to return at most (default 1000).
    limit: Option<usize>,
    /// Only records with a sequence above this (cursor for paging).
    after: Option<u64>,
}

/// One record Kafka refused for good.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct ParkedRecord {
    seq: u64,
    client_id: String,
    topic: String,
    reason: String,
    parked_at_ms: u64,
    bytes: u64,
}

/// A page of parked records.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct ParkedPage {
    /// Records in the parked store.
    total: usize,
    records: Vec<ParkedRecord>,
    /// Pass as `after` for the next page; absent on the last one.
    next_after: Option<u64>,
}

/// Records Kafka refused for good, held in the parked store until re-driven.
#[utoipa::path(get, path = "/api/v1/bridge/parked", tag = "bridge", params(ParkedQuery),
    responses((status = 200, body = ParkedPage), (status = 500, body = error::ErrorBody), (status = 401, body = error::ErrorBody)),
    security(("bearer" = [])))]
async fn parked(State(s): State<Arc<Shared>>, ApiQuery(q): ApiQuery<ParkedQuery>) -> Response {
    let dir = s.parked_dir.clone();
    let listed = tokio::task::spawn_blocking(move || bridge::parked::ParkedStore::view(&dir).list()).await;
    let records = match listed {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return ApiError::new(ErrorCode::ParkedStore, e.to_string()).into_response(),
        Err(e) => return ApiError::new(ErrorCode::Internal, e.to_string()).into_response(),
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let total = records.len();
    let page: Vec<_> = records
        .into_iter()
        .filter(|r| q.after.is_none_or(|a| r.seq > a))
        .take(limit)
        .map(|r| ParkedRecord {
            seq: r.seq,
            client_id: r.client_id,
            topic: r.topic,
            reason: r.reason,
            parked_at_ms: r.parked_at_ms,
            bytes: r.bytes,
        })
        .collect();
    let next_after = (page.len() == limit)
        .then(|| page.last().map(|r| r.seq))
        .flatten();
    Json(ParkedPage {
        total,
        records: page,
        next_after,
    })
    .into_response()
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RedriveQuery {
    /// One record; all of them when absent.
    seq: Option<u64>,
}

/// What a re-drive did.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Redriven {
    /// Records produced again.
    sent: u64,
    /// Confirmed by Kafka (and gone from the parked store).
    delivered: u64,
    /// Produced, not confirmed within the wait: still parked, re-drive again later.
    pending: u64,
    /// Refused again, with Kafka's reason.
    failed: Vec<RedriveFailure>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct RedriveFailure {
    seq: u64,
    reason: String,
}

/// Produces parked records again to their current route; each leaves the store only once
/// Kafka confirmed it.
#[utoipa::path(post, path = "/api/v1/bridge/parked/redrive", tag = "bridge", params(RedriveQuery),
    responses((status = 200, body = Redriven), (status = 409, body = error::ErrorBody), (status = 503, body = error::ErrorBody), (status = 504, body = error::ErrorBody), (status = 401, body = error::ErrorBody)),
    security(("bearer" = [])))]
async fn redrive(State(s): State<Arc<Shared>>, ApiQuery(q): ApiQuery<RedriveQuery>) -> Response {
    if s.bridge.paused() {
        return ApiError::new(
            ErrorCode::BridgePaused,
            "the bridge is paused; resume it (POST /api/v1/bridge/resume) before a re-drive",
        )
        .into_response();
    }
    let wait = bridge::producer::REDRIVE_WAIT + std::time::Duration::from_secs(20);
    match tokio::time::timeout(wait, s.bridge_control.redrive(q.seq)).await {
        Ok(Ok(r)) => Json(Redriven {
            sent: r.sent as u64,
            delivered: r.delivered as u64,
            pending: r.pending as u64,
            failed: r
                .failed
                .iter()
                .map(|f| RedriveFailure {
                    seq: f.seq,
                    reason: f.reason.clone(),
                })
                .collect(),
        })
        .into_response(),
        Ok(Err(bridge::producer::RedriveError::Busy)) => {
            ApiError::new(ErrorCode::BridgeBusy, "a re-drive is already running; try again").into_response()
        }
        Ok(Err(e)) => ApiError::new(ErrorCode::BridgeUnavailable, e.to_string()).into_response(),
        Err(_) => ApiError::new(
            ErrorCode::BridgeTimeout,
            "the Kafka bridge did not answer (restarting?); list the parked records to see what is left",
        )
        .into_response(),
    }
}

/// What `GET /api/v1/status` answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct StatusView {
    version: String,
    /// The git commit of the build (`unknown` without `.git`).
    commit: String,
    /// Open MQTT connections.
    connections: i64,
    /// Sessions held, online and offline.
    sessions: usize,
    kafka: KafkaView,
    shutting_down: bool,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct KafkaView {
    bootstrap: String,
    embedded: bool,
}

#[utoipa::path(get, path = "/api/v1/status", tag = "operate",
    responses((status = 200, body = StatusView), (status = 401, body = error::ErrorBody)),
    security(("bearer" = [])))]
async fn status(State(s): State<Arc<Shared>>) -> Json<StatusView> {
    Json(StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        commit: crate::BUILD_COMMIT.to_string(),
        connections: s.metrics.connections_active.get(),
        sessions: s.registry.len(),
        kafka: KafkaView {
            bootstrap: s.cfg.kafka.bootstrap.clone(),
            embedded: s.cfg.kafka.bootstrap == "embedded",
        },
        shutting_down: s.shutdown.is_cancelled(),
    })
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn token_compare() {
        assert!(token_matches(b"s3cret-token", b"s3cret-token"));
        assert!(!token_matches(b"s3cret-tokem", b"s3cret-token"));
        assert!(!token_matches(b"s3cret", b"s3cret-token"));
        assert!(!token_matches(b"", b"s3cret-token"));
    }
}
