//! Replays through the admin API: re-send a range of records Kafka already confirmed
//! (by journal sequence or by receive time, optionally one Kafka topic), and watch the
//! progress. The engine and its guarantees are in [`bridge::replay`]; the records come
//! from the segments the journal retains (`journal.replay_retention_secs`,
//! `journal.replay_retention_bytes`).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use bridge::replay::{Progress, Range, ReplayError, Request};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, ErrorCode};
use crate::state::Shared;

/// What to replay: `from_seq` and `to_seq` (journal sequences, both inclusive), or
/// `from_ms` (inclusive) and `to_ms` (exclusive), receive times in ms since the epoch.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    /// Only records whose current route leads to this **Kafka** topic.
    pub topic: Option<String>,
}

/// A replay: what it queued and how far it got.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayStatus {
    /// Also the value of the `gateway.replay` header of every record it sends.
    pub replay_id: String,
    /// `running`, `done` (every record confirmed by Kafka), `failed` (see `error`) or
    /// `cancelled` (`DELETE /api/v1/replay/{replay_id}`).
    pub state: String,
    /// Records queued, their payload bytes, and the first and last sequence among them
    /// (`null` when nothing matched).
    pub records: u64,
    pub bytes: u64,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    /// The range as asked for.
    pub requested: RequestedRange,
    pub topic: Option<String>,
    /// Records in the range never replayed: no current route, or commands handed over to
    /// another gateway.
    pub skipped: u64,
    /// Handed to the producer; confirmed by Kafka; refused.
    pub sent: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Sequence of the last record handed to the producer.
    pub current_seq: Option<u64>,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub error: Option<String>,
}

/// The range a replay was asked for (one pair is set).
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestedRange {
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayList {
    /// The last 16 replays, newest first.
    pub replays: Vec<ReplayStatus>,
}

fn status(p: Progress) -> ReplayStatus {
    let requested = match p.request.range {
        Range::Seq { from, to } => RequestedRange {
            from_seq: Some(from),
            to_seq: Some(to),
            from_ms: None,
            to_ms: None,
        },
        Range::Time { from_ms, to_ms } => RequestedRange {
            from_seq: None,
            to_seq: None,
            from_ms: Some(from_ms),
            to_ms: Some(to_ms),
        },
    };
    ReplayStatus {
        replay_id: p.id,
        state: p.state.as_str().to_string(),
        records: p.records,
        bytes: p.bytes,
        from_seq: p.from_seq,
        to_seq: p.to_seq,
        requested,
        topic: p.request.topic,
        skipped: p.skipped,
        sent: p.sent,
        delivered: p.delivered,
        failed: p.failed,
        current_seq: p.current_seq,
        started_at_ms: p.started_at_ms,
        finished_at_ms: p.finished_at_ms,
        error: p.error,
    }
}

/// The range of a request body, checked: exactly one complete pair.
fn range(b: &ReplayBody) -> Result<Range, ApiError> {
    let bad = |m: &str| ApiError::new(ErrorCode::InvalidBody, m);
    match (b.from_seq, b.to_seq, b.from_ms, b.to_ms) {
        (Some(from), Some(to), None, None) => Ok(Range::Seq { from, to }),
        (None, None, Some(from_ms), Some(to_ms)) => Ok(Range::Time { from_ms, to_ms }),
        (None, None, None, None) => Err(bad(
            "give from_seq and to_seq (inclusive), or from_ms (inclusive) and to_ms (exclusive)",
        )),
        (Some(_), None, None, None) | (None, Some(_), None, None) => {
            Err(bad("from_seq and to_seq go together (both inclusive)"))
        }
        (None, None, Some(_), None) | (None, None, None, Some(_)) => Err(bad(
            "from_ms and to_ms go together (from_ms inclusive, to_ms exclusive)",
        )),
        _ => Err(bad("give a sequence range or a time range, not both")),
    }
}

/// Re-sends released records to Kafka (with the header `gateway.replay`), in journal
/// order, through a producer of its own: live delivery is neither blocked nor
/// reordered. Answers once the range is pinned and counted, with exactly what it
/// queued; `GET /api/v1/replay/{replay_id}` shows the progress. One replay at a time.
#[utoipa::path(post, path = "/api/v1/replay", tag = "bridge", request_body = ReplayBody,
    responses((status = 202, body = ReplayStatus),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 500, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start(
    State(s): State<Arc<Shared>>,
    body: Result<Json<ReplayBody>, JsonRejection>,
) -> Result<(StatusCode, Json<ReplayStatus>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::new(ErrorCode::InvalidBody, e.body_text()))?;
    let request = Request {
        range: range(&body)?,
        topic: body.topic,
    };
    match s.replays.start(request).await {
        Ok(p) => Ok((StatusCode::ACCEPTED, Json(status(p)))),
        Err(ReplayError::Running(id)) => Err(ApiError::new(
            ErrorCode::ReplayRunning,
            format!("replay {id} is still running; one replay at a time (GET /api/v1/replay/{id})"),
        )),
        Err(ReplayError::NotRetained(e)) => Err(ApiError::new(ErrorCode::ReplayRangeNotRetained, e.message)),
        Err(ReplayError::Invalid(m)) => Err(ApiError::new(ErrorCode::InvalidBody, m)),
        Err(ReplayError::Failed(m)) => Err(ApiError::new(ErrorCode::ReplayFailed, m)),
    }
}

/// The last 16 replays, newest first, with their progress.
#[utoipa::path(get, path = "/api/v1/replay", tag = "bridge",
    responses((status = 200, body = ReplayList), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(s): State<Arc<Shared>>) -> Json<ReplayList> {
    Json(ReplayList {
        replays: s.replays.list().into_iter().map(status).collect(),
    })
}

/// One replay's progress: state, records queued / sent / delivered / failed, current
/// sequence.
#[utoipa::path(get, path = "/api/v1/replay/{replay_id}", tag = "bridge",
    params(("replay_id" = String, Path, description = "As answered by POST /api/v1/replay")),
    responses((status = 200, body = ReplayStatus), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<ReplayStatus>, ApiError> {
    s.replays.get(&id).map(|p| Json(status(p))).ok_or_else(|| {
        ApiError::not_found(format!("no replay {id:?} (the last 16 are kept until a restart)"))
    })
}

/// Cancels a running replay: it stops sending, its producer's queue is purged, and its
/// pins on the retained segments go (retention applies again). Records Kafka already
/// confirmed stay confirmed (`delivered`). Answers once it stopped (at most 5 s; `state`
/// may still say `running` after that) with its progress, `state` `cancelled`; a replay
/// that had already ended is left as it was.
#[utoipa::path(delete, path = "/api/v1/replay/{replay_id}", tag = "bridge",
    params(("replay_id" = String, Path, description = "As answered by POST /api/v1/replay")),
    responses((status = 200, body = ReplayStatus), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<ReplayStatus>, ApiError> {
    s.replays
        .cancel(&id, std::time::Duration::from_secs(5))
        .await
        .map(|p| Json(status(p)))
        .ok_or_else(|| {
            ApiError::not_found(format!("no replay {id:?} (the last 16 are kept until a restart)"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> ReplayBody {
        serde_json::from_str(json).expect("body")
    }

    #[test]
    fn exactly_one_complete_range() {
        assert_eq!(
            range(&body(r#"{"from_seq": 3, "to_seq": 9}"#)).ok(),
            Some(Range::Seq { from: 3, to: 9 })
        );
        assert_eq!(
            range(&body(r#"{"from_ms": 3, "to_ms": 9, "topic": "t"}"#)).ok(),
            Some(Range::Time { from_ms: 3, to_ms: 9 })
        );
        for bad in [
            "{}",
            r#"{"from_seq": 3}"#,
            r#"{"to_ms": 3}"#,
            r#"{"from_seq": 1, "to_seq": 2, "from_ms": 1, "to_ms": 2}"#,
        ] {
            let e = range(&body(bad)).expect_err(bad);
            assert_eq!(e.code, ErrorCode::InvalidBody, "{bad}");
        }
        assert!(serde_json::from_str::<ReplayBody>(r#"{"from": 1}"#).is_err());
    }
}
