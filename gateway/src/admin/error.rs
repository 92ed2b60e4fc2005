//! The admin API's one error shape, `{"error": {"code", "message"}}`, and every code it
//! can carry.
//!
//! Codes are stable: scripts and dashboards branch on them, so a code is never renamed
//! or reused for another meaning. [`ErrorCode::ALL`] is the list `docs/API.md` documents
//! (a test checks that the two agree). Command outcomes answered with a 4xx (`rejected`,
//! `expired`, ...) carry their outcome as the code; they are listed in the README's
//! command section, not here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// A stable, machine-readable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthorized,
    NotFound,
    UnknownVehicle,
    InvalidQuery,
    InvalidBody,
    InvalidClientId,
    InvalidPayload,
    InvalidBase64,
    InvalidQos,
    InvalidResponseTopic,
    InvalidString,
    BodyTooLarge,
    PayloadTooLarge,
    SessionOnline,
    BridgeBusy,
    BridgeUnavailable,
    BridgeTimeout,
    BridgePaused,
    ParkedStore,
    ReplayRangeNotRetained,
    ReplayRunning,
    ReplayFailed,
    ShuttingDown,
    CommandsBacklogged,
    Store,
    Internal,
}

impl ErrorCode {
    /// Every code, in the order `docs/API.md` lists them.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::UnknownVehicle,
        ErrorCode::InvalidQuery,
        ErrorCode::InvalidBody,
        ErrorCode::InvalidClientId,
        ErrorCode::InvalidPayload,
        ErrorCode::InvalidBase64,
        ErrorCode::InvalidQos,
        ErrorCode::InvalidResponseTopic,
        ErrorCode::InvalidString,
        ErrorCode::BodyTooLarge,
        ErrorCode::PayloadTooLarge,
        ErrorCode::SessionOnline,
        ErrorCode::BridgeBusy,
        ErrorCode::BridgeUnavailable,
        ErrorCode::BridgeTimeout,
        ErrorCode::BridgePaused,
        ErrorCode::ParkedStore,
        ErrorCode::ReplayRangeNotRetained,
        ErrorCode::ReplayRunning,
        ErrorCode::ReplayFailed,
        ErrorCode::ShuttingDown,
        ErrorCode::CommandsBacklogged,
        ErrorCode::Store,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UnknownVehicle => "unknown_vehicle",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::InvalidClientId => "invalid_client_id",
            ErrorCode::InvalidPayload => "invalid_payload",
            ErrorCode::InvalidBase64 => "invalid_base64",
            ErrorCode::InvalidQos => "invalid_qos",
            ErrorCode::InvalidResponseTopic => "invalid_response_topic",
            ErrorCode::InvalidString => "invalid_string",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::SessionOnline => "session_online",
            ErrorCode::BridgeBusy => "bridge_busy",
            ErrorCode::BridgeUnavailable => "bridge_unavailable",
            ErrorCode::BridgeTimeout => "bridge_timeout",
            ErrorCode::BridgePaused => "bridge_paused",
            ErrorCode::ParkedStore => "parked_store",
            ErrorCode::ReplayRangeNotRetained => "replay_range_not_retained",
            ErrorCode::ReplayRunning => "replay_running",
            ErrorCode::ReplayFailed => "replay_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::CommandsBacklogged => "commands_backlogged",
            ErrorCode::Store => "store",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status this code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::UnknownVehicle => StatusCode::NOT_FOUND,
            ErrorCode::InvalidQuery => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidBody => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidClientId => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidPayload => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidBase64 => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidQos => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidResponseTopic => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidString => StatusCode::BAD_REQUEST,
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::SessionOnline => StatusCode::CONFLICT,
            ErrorCode::BridgeBusy => StatusCode::CONFLICT,
            ErrorCode::BridgeUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::BridgeTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::BridgePaused => StatusCode::CONFLICT,
            ErrorCode::ParkedStore => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::ReplayRangeNotRetained => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ReplayRunning => StatusCode::CONFLICT,
            ErrorCode::ReplayFailed => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::CommandsBacklogged => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Store => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error answer: the code's status and `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn bad_query(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidQuery, message)
    }
}

/// The body of every error answer (OpenAPI schema).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (docs/API.md).
    pub code: String,
    /// For the operator: what went wrong and what to do.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.code.status(), self.code.as_str(), self.message)
    }
}

/// The error shape with any status and code (command outcomes use their own codes).
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_string(),
            message: message.into(),
        },
    };
    (status, Json(body)).into_response()
}

/// Default and largest page of a listing.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// The page size a listing asked for, checked.
pub fn page_limit(asked: Option<usize>) -> Result<usize, ApiError> {
    match asked {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_query(format!("limit {n}: must be 1–{MAX_LIMIT}"))),
    }
}

/// `Query<T>` whose rejection answers in the error shape (`invalid_query`), not axum's
/// plain text.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

#[axum::async_trait]
impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(t)| ApiQuery(t))
            .map_err(|e| ApiError::bad_query(e.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_documented_in_api_md_with_its_status() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md"))
            .unwrap_or_else(|e| panic!("docs/API.md: {e}"));
        for code in ErrorCode::ALL {
            let row = format!("| `{}` | {} |", code.as_str(), code.status().as_u16());
            assert!(doc.contains(&row), "docs/API.md lacks the row starting {row:?}");
        }
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "a code appears twice");
    }
}
