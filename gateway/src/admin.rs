//! The operator's HTTP surface: Prometheus `/metrics`, `/healthz`, and the REST API
//! under `/api/v1` (bearer token from `admin.token` when set).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bridge::Journal;
use serde_json::json;

use crate::server::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/api/v1/journal", get(journal))
        .route("/api/v1/status", get(status))
        .route("/api/v1/bridge", get(bridge))
        .route_layer(middleware::from_fn_with_state(shared.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .merge(api)
        .with_state(shared)
}

async fn require_token(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let token = &s.cfg.admin.token;
    if !token.is_empty() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(format!("Bearer {token}").as_str()) {
            let body = json!({"error": {"code": "unauthorized", "message": "missing or wrong bearer token"}});
            return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
        }
    }
    next.run(req).await
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let text = s.metrics.render(&s.journal.stats(), &s.bridge);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn healthz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if s.journal_stopped() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "journal_stopped"})),
        )
    } else {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    }
}

async fn journal(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let st = s.journal.stats();
    Json(json!({
        "records": st.records,
        "disk_bytes": st.disk_bytes,
        "segments": st.segments,
        "oldest_age_secs": st.oldest_age.map(|d| d.as_secs_f64()),
        "next_seq": st.next_seq,
        "durable_seq": st.durable_seq,
        "released_seq": st.released_seq,
        "syncs": st.syncs,
        "full": st.full,
    }))
}

async fn bridge(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let b = &s.bridge;
    let j = s.journal.stats();
    Json(json!({
        "bootstrap": s.bootstrap,
        "embedded": s.embedded,
        "dev_only": s.embedded,
        "state": b.state().as_str(),
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

async fn status(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "connections": s.metrics.connections_active.load(std::sync::atomic::Ordering::Relaxed),
        "sessions": s.registry.len(),
        "kafka": {"bootstrap": s.cfg.kafka.bootstrap, "embedded": s.cfg.kafka.bootstrap == "embedded"},
        "shutting_down": s.shutdown.is_cancelled(),
    }))
}
