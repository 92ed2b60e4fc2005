//! Subscriptions and retained messages, listed by filter; a retained message deleted.
//!
//! Deleting a retained message is what an empty retained PUBLISH does (MQTT 3.3.1.3):
//! it leaves the router and the store, and the answer waits for the store flush, so a
//! 200 means it will not come back after a crash.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{page_limit, ApiError, ApiQuery, ErrorBody, ErrorCode};
use crate::message::{now_ms, Message};
use crate::state::Shared;

/// Payload bytes shown per retained message (the rest is counted, not shown).
const PREVIEW_BYTES: usize = 256;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SubscriptionsQuery {
    /// Only subscription filters starting with this (e.g. `vehicles/`).
    filter_prefix: Option<String>,
    /// Only sessions whose client id starts with this.
    client_prefix: Option<String>,
    /// Page size, 1–1000 (default 100).
    limit: Option<usize>,
    /// Cursor: the previous page's `next_after`.
    after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionEntry {
    pub client_id: String,
    pub filter: String,
    pub qos: u8,
    pub online: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionPage {
    pub subscriptions: Vec<SubscriptionEntry>,
    /// Pass as `after` for the next page (it names a client id); null on the last page.
    pub next_after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RetainedQuery {
    /// An MQTT topic filter (`+`, `#`); default `#` (which, as in MQTT, does not match
    /// `$`-topics).
    filter: Option<String>,
    /// Page size, 1–1000 (default 100).
    limit: Option<usize>,
    /// Cursor: topics after this one (the previous page's `next_after`).
    after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RetainedMessage {
    pub topic: String,
    pub qos: u8,
    pub payload_bytes: usize,
    /// The first 256 bytes of the payload, as UTF-8 where they are (lossy otherwise).
    pub payload_preview: String,
    pub received_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RetainedPage {
    pub retained: Vec<RetainedMessage>,
    pub next_after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TopicQuery {
    /// The retained message's topic (a topic name, no wildcards).
    topic: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub topic: String,
}

/// Subscriptions of every session, by client id then filter.
#[utoipa::path(get, path = "/api/v1/subscriptions", tag = "subscriptions", params(SubscriptionsQuery),
    responses((status = 200, body = SubscriptionPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_subscriptions(
    State(s): State<Arc<Shared>>,
    ApiQuery(q): ApiQuery<SubscriptionsQuery>,
) -> Result<Json<SubscriptionPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    let mut cells: Vec<_> = s
        .registry
        .all()
        .into_iter()
        .filter(|c| {
            q.client_prefix
                .as_deref()
                .is_none_or(|p| c.client_id.starts_with(p))
        })
        .filter(|c| q.after.as_deref().is_none_or(|a| &*c.client_id > a))
        .collect();
    cells.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
    let mut subscriptions = Vec::new();
    let mut next_after = None;
    // Whole sessions per page: the cursor is a client id.
    for c in cells {
        let st = c.lock();
        if st.gone {
            continue;
        }
        let mine: Vec<_> = st
            .subscriptions
            .iter()
            .filter(|(f, _)| q.filter_prefix.as_deref().is_none_or(|p| f.starts_with(p)))
            .map(|(f, o)| SubscriptionEntry {
                client_id: c.client_id.to_string(),
                filter: f.to_string(),
                qos: o.qos,
                online: st.owner.is_some(),
            })
            .collect();
        if mine.is_empty() {
            continue;
        }
        if subscriptions.len() >= limit {
            next_after = subscriptions
                .last()
                .map(|e: &SubscriptionEntry| e.client_id.clone());
            break;
        }
        subscriptions.extend(mine);
    }
    Ok(Json(SubscriptionPage {
        subscriptions,
        next_after,
    }))
}

/// Retained messages whose topic matches a filter, by topic.
#[utoipa::path(get, path = "/api/v1/retained", tag = "retained", params(RetainedQuery),
    responses((status = 200, body = RetainedPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_retained(
    State(s): State<Arc<Shared>>,
    ApiQuery(q): ApiQuery<RetainedQuery>,
) -> Result<Json<RetainedPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    let filter = q.filter.unwrap_or_else(|| "#".into());
    if let Err(e) = crate::topic::validate_filter(&filter) {
        return Err(ApiError::bad_query(format!("filter {filter:?}: {e}")));
    }
    if filter.starts_with("$share/") {
        return Err(ApiError::bad_query(
            "a shared subscription filter names no retained messages",
        ));
    }
    let mut msgs = s.router.retained_for(&filter);
    msgs.retain(|m| q.after.as_deref().is_none_or(|a| m.topic.as_str() > a));
    msgs.sort_unstable_by(|a, b| a.topic.cmp(&b.topic));
    let next_after = (msgs.len() > limit).then(|| msgs[limit - 1].topic.clone());
    let retained = msgs
        .iter()
        .take(limit)
        .map(|m| RetainedMessage {
            topic: m.topic.clone(),
            qos: m.qos,
            payload_bytes: m.payload.len(),
            payload_preview: String::from_utf8_lossy(&m.payload[..m.payload.len().min(PREVIEW_BYTES)])
                .into_owned(),
            received_at_ms: m.received_at_ms,
            expires_at_ms: m.expires_at_ms,
        })
        .collect();
    Ok(Json(RetainedPage { retained, next_after }))
}

/// Deletes the retained message of a topic (as an empty retained PUBLISH would).
#[utoipa::path(delete, path = "/api/v1/retained", tag = "retained", params(TopicQuery),
    responses((status = 200, body = Deleted), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_retained(
    State(s): State<Arc<Shared>>,
    ApiQuery(q): ApiQuery<TopicQuery>,
) -> Result<Json<Deleted>, ApiError> {
    if let Err(e) = crate::topic::validate_name(&q.topic) {
        return Err(ApiError::bad_query(format!("topic {:?}: {e}", q.topic)));
    }
    let empty = Arc::new(Message {
        topic: q.topic.clone(),
        payload: Bytes::new(),
        qos: 0,
        retain: true,
        props: Default::default(),
        received_at_ms: now_ms(),
        expires_at_ms: None,
    });
    let gen = s
        .router
        .retain(&empty, &s.cfg.retained, &s.store, &s.metrics)
        .map_err(|why| ApiError::new(ErrorCode::Store, format!("not deleted: {why}")))?;
    let Some(gen) = gen else {
        return Err(ApiError::not_found(format!(
            "no retained message on {:?}",
            q.topic
        )));
    };
    let mut flushed = s.store.flushed();
    if flushed.wait_for(|g| *g >= gen).await.is_err() || s.store.has_failed() {
        return Err(ApiError::new(
            ErrorCode::Store,
            "removed from memory, but the store did not flush the deletion; check the volume",
        ));
    }
    tracing::warn!(topic = ?q.topic, "retained message deleted through the admin API");
    Ok(Json(Deleted { topic: q.topic }))
}
