//! The operator's HTTP surface: Prometheus `/metrics`, `/healthz`, and the REST API
//! under `/api/v1` (bearer token from `admin.token` when set, compared in constant
//! time). [`listener`] serves it with a connection bound and timeouts.

mod commands;
pub mod error;
pub mod listener;
mod operate;
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
        .routes(routes!(replay::get))
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
        .route_layer(middleware::from_fn_with_state(shared.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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

/// Constant-time comparison, so response timing does not reveal how much of a guessed
/// token was right. (Only the length can leak; tokens should be long and random.)
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.ct_eq(expected).into()
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let mut text = s.metrics.render(&s.journal.stats(), &s.bridge);
    s.commands.render(&mut text, s.store.commands_done_offsets());
    text.push_str(&format!(
        "# HELP gateway_admin_connections_rejected_total Admin connections closed at admin.max_connections.\n\
         # TYPE gateway_admin_connections_rejected_total counter\n\
         gateway_admin_connections_rejected_total {}\n",
        s.admin_rejected.load(std::sync::atomic::Ordering::Relaxed)
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// Liveness as an orchestrator should act on it: 503 when the journal stopped (nothing can
/// be acknowledged) or the Kafka bridge is failing persistently (the journal would only
/// fill up). A journal stalled on a transient I/O error (disk full) is reported but is
/// still 200: restarting the process would not free the disk, and the journal resumes by
/// itself. `problems` lists every reason, for the operator paged at 3 am.
async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let journal = s.journal.stats();
    let mut problems = Vec::new();
    if s.journal_stopped() {
        problems.push(json!({"code": "journal_stopped", "message": "the journal writer stopped; nothing more is acknowledged"}));
    }
    if let Some(why) = s.bridge.failed() {
        problems.push(json!({"code": "bridge_failed", "message": why}));
    }
    let mut warnings = Vec::new();
    if let Some(why) = &journal.stalled {
        warnings.push(json!({"code": "journal_stalled", "message": why}));
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

#[utoipa::path(get, path = "/api/v1/journal", tag = "journal",
    responses((status = 200, body = Object), (status = 401, body = error::ErrorBody)),
    security(("bearer" = [])))]
async fn journal(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let st = s.journal.stats();
    Json(json!({
        "id": s.journal.id(),
        "records": st.records,
        "disk_bytes": st.disk_bytes,
        "segments": st.segments,
        "oldest_age_secs": st.oldest_age.map(|d| d.as_secs_f64()),
        "next_seq": st.next_seq,
        "durable_seq": st.durable_seq,
        "released_seq": st.released_seq,
        "syncs": st.syncs,
        "full": st.full,
        "stalled": st.stalled.is_some(),
        "stalled_reason": st.stalled,
        "retained_from_seq": st.retained.map(|r| r.from_seq),
        "retained_to_seq": st.retained.map(|r| r.to_seq),
        "retained_bytes": st.retained_bytes,
        "retained_segments": st.retained_segments,
    }))
}

#[utoipa::path(get, path = "/api/v1/bridge", tag = "bridge",
    responses((status = 200, body = Object), (status = 401, body = error::ErrorBody)),
    security(("bearer" = [])))]
async fn bridge(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let b = &s.bridge;
    let j = s.journal.stats();
    Json(json!({
        "bootstrap": s.bootstrap,
        "embedded": s.embedded,
        "dev_only": s.embedded,
        "state": b.state().as_str(),
        "paused": b.paused(),
        "failed": b.failed(),
        "restarts": b.restarts.load(Relaxed),
        "parked_now": b.parked_now.load(Relaxed),
        "redriven": b.redriven.load(Relaxed),
        "in_flight": b.in_flight.load(Relaxed),
        "delivered": b.delivered.load(Relaxed),
        "dead_lettered": b.dead_lettered.load(Relaxed),
        "parked": b.parked.load(Relaxed),
        "errors": b.errors.load(Relaxed),
        "last_error": b.last_error(),
        "journal_waiting": j.records,
        "journal_oldest_age_secs": j.oldest_age.map(|d| d.as_secs_f64()),
        "released_seq": j.released_seq,
        "durable_seq": j.durable_seq,
        "topics": s.routes.topics(),
    }))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ParkedQuery {
    /// Records to return at most (default 1000).
    limit: Option<usize>,
    /// Only records with a sequence above this (cursor for paging).
    after: Option<u64>,
}

/// Records Kafka refused for good, held in the parked store until re-driven.
#[utoipa::path(get, path = "/api/v1/bridge/parked", tag = "bridge", params(ParkedQuery),
    responses((status = 200, body = Object), (status = 500, body = error::ErrorBody), (status = 401, body = error::ErrorBody)),
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
        .map(|r| {
            json!({
                "seq": r.seq,
                "client_id": r.client_id,
                "topic": r.topic,
                "reason": r.reason,
                "parked_at_ms": r.parked_at_ms,
                "bytes": r.bytes,
            })
        })
        .collect();
    let next = (page.len() == limit)
        .then(|| page.last().and_then(|r| r["seq"].as_u64()))
        .flatten();
    Json(json!({"total": total, "records": page, "next_after": next})).into_response()
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RedriveQuery {
    /// One record; all of them when absent.
    seq: Option<u64>,
}

/// Produces parked records again to their current route; each leaves the store only once
/// Kafka confirmed it.
#[utoipa::path(post, path = "/api/v1/bridge/parked/redrive", tag = "bridge", params(RedriveQuery),
    responses((status = 200, body = Object), (status = 409, body = error::ErrorBody), (status = 503, body = error::ErrorBody), (status = 504, body = error::ErrorBody), (status = 401, body = error::ErrorBody)),
    security(("bearer" = [])))]
async fn redrive(State(s): State<Arc<Shared>>, ApiQuery(q): ApiQuery<RedriveQuery>) -> Response {
    let wait = bridge::producer::REDRIVE_WAIT + std::time::Duration::from_secs(20);
    match tokio::time::timeout(wait, s.bridge_control.redrive(q.seq)).await {
        Ok(Ok(r)) => Json(json!({
            "sent": r.sent,
            "delivered": r.delivered,
            "pending": r.pending,
            "failed": r.failed.iter().map(|f| json!({"seq": f.seq, "reason": f.reason})).collect::<Vec<_>>(),
        }))
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

#[utoipa::path(get, path = "/api/v1/status", tag = "operate",
    responses((status = 200, body = Object), (status = 401, body = error::ErrorBody)),
    security(("bearer" = [])))]
async fn status(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "connections": s.metrics.connections_active.load(std::sync::atomic::Ordering::Relaxed),
        "sessions": s.registry.len(),
        "kafka": {"bootstrap": s.cfg.kafka.bootstrap, "embedded": s.cfg.kafka.bootstrap == "embedded"},
        "shutting_down": s.shutdown.is_cancelled(),
    }))
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
