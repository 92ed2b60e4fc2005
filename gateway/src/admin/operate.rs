//! Running the gateway: pause and resume the Kafka bridge, read the effective
//! configuration (secrets masked) and the routes, change the log filter at run time.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, ErrorCode};
use crate::state::Shared;

/// What stands in for a secret in `GET /api/v1/config`.
const MASK: &str = "***";

#[derive(Debug, Serialize, ToSchema)]
pub struct BridgePause {
    /// Forwarding to Kafka is paused now.
    pub paused: bool,
    /// It was paused before this request.
    pub was_paused: bool,
    /// Records in the journal not yet confirmed by Kafka.
    pub journal_waiting: u64,
}

fn pause_answer(s: &Shared, paused: bool, was_paused: bool) -> Json<BridgePause> {
    use bridge::Journal as _;
    Json(BridgePause {
        paused,
        was_paused,
        journal_waiting: s.journal.stats().records,
    })
}

/// Pauses forwarding to Kafka: vehicles keep publishing (journaled and acknowledged
/// as always) and the journal grows, up to `journal.max_bytes` and its full policy.
/// Records already handed to Kafka finish. Not kept across a restart.
#[utoipa::path(post, path = "/api/v1/bridge/pause", tag = "bridge",
    responses((status = 200, body = BridgePause), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn pause(State(s): State<Arc<Shared>>) -> Json<BridgePause> {
    let was = s.bridge.set_paused(true);
    if !was {
        tracing::warn!("Kafka bridge paused through the admin API: the journal keeps what vehicles send");
    }
    pause_answer(&s, true, was)
}

/// Resumes forwarding: the journal drains to Kafka in journal order.
#[utoipa::path(post, path = "/api/v1/bridge/resume", tag = "bridge",
    responses((status = 200, body = BridgePause), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume(State(s): State<Arc<Shared>>) -> Json<BridgePause> {
    let was = s.bridge.set_paused(false);
    if was {
        tracing::warn!("Kafka bridge resumed through the admin API");
    }
    pause_answer(&s, false, was)
}

/// The configuration in force (file, then environment), secrets replaced by `***`:
/// `admin.token`, password hashes, and `[kafka.properties]` whose name says password,
/// secret, token or key (librdkafka's `sasl.password`, `ssl.key.password`, ...).
#[utoipa::path(get, path = "/api/v1/config", tag = "operate",
    responses((status = 200, description = "The configuration as JSON, keys as in gateway.toml", body = Object),
        (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn config(State(s): State<Arc<Shared>>) -> Result<Json<serde_json::Value>, ApiError> {
    let mut v =
        serde_json::to_value(&*s.cfg).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    mask(&mut v);
    Ok(Json(v))
}

/// Replaces every secret in a serialized configuration.
fn mask(v: &mut serde_json::Value) {
    let set = |v: &mut serde_json::Value| {
        if v.as_str().is_some_and(|s| !s.is_empty()) {
            *v = serde_json::Value::String(MASK.into());
        }
    };
    if let Some(t) = v.pointer_mut("/admin/token") {
        set(t);
    }
    // A collector URL may carry credentials (`https://user:token@host`).
    if let Some(serde_json::Value::String(url)) = v.pointer_mut("/log/otlp_endpoint") {
        if let Some((scheme, rest)) = url.split_once("://") {
            if let Some((_, host)) = rest.split_once('@') {
                *url = format!("{scheme}://{MASK}@{host}");
            }
        }
    }
    if let Some(users) = v.pointer_mut("/auth/users").and_then(|u| u.as_array_mut()) {
        for u in users {
            if let Some(h) = u.get_mut("password_hash") {
                set(h);
            }
        }
    }
    if let Some(props) = v.pointer_mut("/kafka/properties").and_then(|p| p.as_object_mut()) {
        for (k, val) in props.iter_mut() {
            let k = k.to_ascii_lowercase();
            // Every SASL setting but the mechanism and user name can carry a secret
            // (`sasl.oauthbearer.config` holds a client secret, for one).
            let sasl_secret = k.starts_with("sasl.")
                && !["sasl.mechanism", "sasl.mechanisms", "sasl.username"].contains(&k.as_str());
            if sasl_secret
                || ["password", "secret", "token", "key", "jaas", "credential"]
                    .iter()
                    .any(|w| k.contains(w))
            {
                set(val);
            }
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Route {
    /// MQTT topic filter.
    pub mqtt: String,
    pub kafka_topic: String,
    /// Record key template.
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Routes {
    /// First match wins.
    pub routes: Vec<Route>,
    /// `default_topic` or `refuse`.
    pub unmatched: String,
    pub default_topic: Option<String>,
    pub dead_letter_topic: Option<String>,
    /// The gateway's own records.
    pub presence_topic: Option<String>,
    pub command_topic: Option<String>,
    pub outcome_topic: String,
}

/// How MQTT topics map to Kafka topics and keys.
#[utoipa::path(get, path = "/api/v1/routes", tag = "operate",
    responses((status = 200, body = Routes), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn routes(State(s): State<Arc<Shared>>) -> Json<Routes> {
    let c = &s.cfg;
    let some = |t: &str| (!t.is_empty()).then(|| t.to_string());
    Json(Routes {
        routes: c
            .routes
            .iter()
            .map(|r| Route {
                mqtt: r.mqtt.clone(),
                kafka_topic: r.kafka_topic.clone(),
                key: r.key.clone(),
            })
            .collect(),
        unmatched: c.kafka.unmatched.clone(),
        default_topic: (c.kafka.unmatched == "default_topic").then(|| c.kafka.default_topic.clone()),
        dead_letter_topic: some(&c.kafka.dead_letter_topic),
        presence_topic: c.presence.enabled.then(|| c.presence.kafka_topic.clone()),
        command_topic: c.commands.enabled.then(|| c.commands.kafka_topic.clone()),
        outcome_topic: c.commands.outcome_topic.clone(),
    })
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogLevel {
    /// `tracing` filter directives, as in `RUST_LOG`: e.g. `info` or
    /// `info,gateway::session=debug`.
    pub level: String,
}

/// The log filter in force.
#[utoipa::path(get, path = "/api/v1/log-level", tag = "operate",
    responses((status = 200, body = LogLevel), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_log_level() -> Result<Json<LogLevel>, ApiError> {
    crate::logging::level()
        .map(|level| Json(LogLevel { level }))
        .ok_or_else(|| ApiError::not_found("this process has no reloadable log filter"))
}

/// Replaces the log filter until the next restart (which goes back to `RUST_LOG`).
#[utoipa::path(put, path = "/api/v1/log-level", tag = "operate", request_body = LogLevel,
    responses((status = 200, body = LogLevel), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_log_level(
    body: Result<Json<LogLevel>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<LogLevel>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::new(ErrorCode::InvalidBody, e.body_text()))?;
    crate::logging::set_level(&body.level).map_err(|e| ApiError::new(ErrorCode::InvalidBody, e))?;
    Ok(Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_the_rest_is_kept() {
        let mut v = serde_json::json!({
            "admin": {"token": "s3cret", "listen": "0.0.0.0:8080"},
            "auth": {"users": [{"username": "ops", "password_hash": "$argon2id$..."}]},
            "kafka": {"properties": {"sasl.password": "pw", "ssl.key.password": "k", "sasl.username": "u",
                "sasl.oauthbearer.config": "clientSecret=x", "sasl.mechanism": "OAUTHBEARER"}},
        });
        mask(&mut v);
        assert_eq!(v["admin"]["token"], MASK);
        assert_eq!(v["admin"]["listen"], "0.0.0.0:8080");
        assert_eq!(v["auth"]["users"][0]["password_hash"], MASK);
        assert_eq!(v["auth"]["users"][0]["username"], "ops");
        assert_eq!(v["kafka"]["properties"]["sasl.password"], MASK);
        assert_eq!(v["kafka"]["properties"]["ssl.key.password"], MASK);
        assert_eq!(v["kafka"]["properties"]["sasl.username"], "u");
        assert_eq!(v["kafka"]["properties"]["sasl.oauthbearer.config"], MASK);
        assert_eq!(v["kafka"]["properties"]["sasl.mechanism"], "OAUTHBEARER");
        let mut v = serde_json::json!({"log": {"otlp_endpoint": "https://svc:s3cret@otel:4318"}});
        mask(&mut v);
        assert_eq!(v["log"]["otlp_endpoint"], format!("https://{MASK}@otel:4318"));
    }
}
