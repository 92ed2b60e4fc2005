//! Commands over REST: `POST /api/v1/vehicles/{client_id}/commands` issues a command to a
//! vehicle through the command service (the same path as commands from Kafka), and `GET`
//! on the same path lists the commands the vehicle's session holds.
//!
//! Invariants:
//! - An answer states only what is durable. An outcome is answered once the command
//!   service reported it to this request's waiter, which happens only after the outcome
//!   record is in the journal, so the caller never hears of an outcome that Kafka's
//!   outcome topic could miss after a crash. Anything not yet durable is `pending`.
//! - A request that cannot be a command (bad JSON, payload, QoS, client id, query, or too
//!   large) is answered 400 / 413 before anything is issued: no command id, no outcome
//!   record. Everything issued gets exactly one final outcome record, as from Kafka.
//! - Giving up waiting never cancels a command: the ticket travels with the vehicle's
//!   copy, which is still delivered, and its outcome still goes to the outcome topic.
//! - Waiting is bounded: [`FIRST_WORD_WAIT`] without `wait`, `timeout_ms` (capped by
//!   [`MAX_WAIT`] and the admin connection's lifetime) with `wait=delivered`, and never
//!   past shutdown. Waiting handlers are bounded by `admin.max_connections`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorCode};
use super::listener::MAX_LIFETIME_FACTOR;
use crate::commands::{CommandRequest, Issued, Outcome, Progress, Source};
use crate::router::CommandRoute;
use crate::state::Shared;

/// How long a request without `wait` waits for the command's first durable word (its
/// `queued` record, or the final outcome of a command refused at once). Only a journal
/// or store that is not syncing makes it run out; then the answer is `pending`.
const FIRST_WORD_WAIT: Duration = Duration::from_secs(5);
/// `timeout_ms` when `wait=delivered` gives none.
const DEFAULT_DELIVERED_WAIT: Duration = Duration::from_secs(10);
/// Upper bound of `timeout_ms`: a caller that needs longer polls the outcome topic.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// An MQTT string or binary field carries a two-byte length.
const MAX_MQTT_STRING: usize = u16::MAX as usize;

/// Why a request is not a command (400 / 413), answered in the admin API's error shape
/// with a stable code.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn bad(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        ApiError::new(self.code, self.message).into_response()
    }
}

/// The JSON body of `POST .../commands`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// The payload as UTF-8 text; exactly one of `payload` and `payload_base64`.
    payload: Option<String>,
    /// The payload as standard base64, for binary commands.
    payload_base64: Option<String>,
    /// 0–2; absent: `commands.default_qos`.
    qos: Option<u8>,
    /// Seconds the vehicle has to receive it; absent: `commands.default_expiry_secs`;
    /// 0: no expiry.
    expiry_secs: Option<u32>,
    /// Sent as MQTT 5 correlation data and written to the outcome record.
    correlation_id: Option<String>,
    response_topic: Option<String>,
    content_type: Option<String>,
    /// MQTT 5 user properties as `[name, value]` pairs: ordered and repeatable, as MQTT
    /// allows (a JSON object could be neither).
    #[schema(value_type = Option<Vec<Vec<String>>>)]
    user_properties: Option<Vec<(String, String)>>,
}

/// The query of `POST .../commands`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct IssueQuery {
    /// `delivered`: wait for the final outcome.
    wait: Option<String>,
    /// How long to wait with `wait=delivered`, in ms.
    timeout_ms: Option<u64>,
}

/// What the caller waits for.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// The first durable word, unless the command went to a connected vehicle (answered
    /// `pending` at once: its outcome is the vehicle's acknowledgement).
    FirstWord,
    /// A final outcome, for at most this long.
    Final(Duration),
}

/// `POST /api/v1/vehicles/{client_id}/commands`: issues a command and answers its
/// durable outcome (see the README, "Commands to vehicles").
#[utoipa::path(post, path = "/api/v1/vehicles/{client_id}/commands", tag = "commands",
    params(("client_id" = String, Path, description = "The vehicle's MQTT client id"), IssueQuery),
    request_body = CommandBody,
    responses((status = 200, description = "delivered", body = CommandAnswer), (status = 202, description = "pending or queued", body = CommandAnswer),
        (status = 404, description = "unknown_vehicle", body = CommandAnswer), (status = 422, description = "rejected, expired or dropped", body = CommandAnswer),
        (status = 400, body = super::error::ErrorBody), (status = 413, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn issue(
    State(s): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<IssueQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (wait, req) = match parse(&s, path, query, body) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    if s.commands.backlogged(s.cfg.commands.max_pending) {
        return ApiError::new(
            ErrorCode::CommandsBacklogged,
            format!(
                "{} command outcome records wait to be journaled (the journal is full or stalled); retry later",
                s.cfg.commands.max_pending
            ),
        )
        .into_response();
    }
    let topic = s.cfg.commands.mqtt_topic.replace("{client_id}", &req.client_id);
    let client_id = req.client_id.clone();
    let id = s.commands.new_id("rest");
    let (tx, mut rx) = watch::channel(None);
    let Issued { ticket, route } = s.commands.issue(&s, id.clone(), Source::Rest, req, Some(tx));
    // The vehicle's copy holds the ticket (and the waiter) from here; ours would keep the
    // waiter open after the copy is gone, hiding a command that ended without a word.
    drop(ticket);
    // Debug, not info: at thousands of commands a second an info line each would flood
    // the log (and cost the path a write(2) each); the outcome record is the audit trail.
    tracing::debug!(command_id = %id, %client_id, ?route, "command issued over REST");
    let answer = Answer {
        command_id: id,
        client_id,
        topic,
    };
    let limit = match (wait, route) {
        (Wait::FirstWord, Some(CommandRoute::Online)) => return answer.pending(),
        (Wait::FirstWord, _) => FIRST_WORD_WAIT,
        (Wait::Final(t), _) => t,
    };
    let want_final = matches!(wait, Wait::Final(_));
    let waited = tokio::select! {
        _ = s.shutdown.cancelled() => None,
        r = tokio::time::timeout(limit, async {
            rx.wait_for(|p| p.is_some_and(|p| !want_final || p.outcome.is_final())).await.map(|p| *p)
        }) => Some(r),
    };
    let latest = *rx.borrow();
    match (waited, latest) {
        // The waiter is gone without a word: the outcome was settled without a record, or
        // its record could not be journaled.
        (Some(Ok(Err(_closed))), None) => answer.without_record(&s, route),
        (_, latest) => answer.progress(latest),
    }
}

/// `GET /api/v1/vehicles/{client_id}/commands`: what the vehicle's session holds, in
/// delivery order (in flight first), whichever source issued it.
#[utoipa::path(get, path = "/api/v1/vehicles/{client_id}/commands", tag = "commands",
    params(("client_id" = String, Path, description = "The vehicle's MQTT client id")),
    responses((status = 200, body = HeldCommands), (status = 404, body = super::error::ErrorBody),
        (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(s): State<Arc<Shared>>, path: Result<Path<String>, PathRejection>) -> Response {
    let client_id = match client_id(&s, path) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let Some(cell) = s.registry.get(&client_id) else {
        return ApiError::new(
            ErrorCode::UnknownVehicle,
            format!("this gateway holds no session for {client_id:?}"),
        )
        .into_response();
    };
    let commands = cell
        .held_commands()
        .into_iter()
        .map(|(c, in_flight)| HeldCommand {
            command_id: c.id,
            correlation_id: c.correlation_id,
            source: c.source.label().to_string(),
            qos: c.qos,
            issued_at_ms: c.issued_at_ms,
            in_flight,
        })
        .collect();
    Json(HeldCommands {
        online: cell.is_online(),
        client_id,
        commands,
    })
    .into_response()
}

/// What a POST asks for, or why it is not a command.
fn parse(
    s: &Shared,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<IssueQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Wait, CommandRequest), Refusal> {
    let client_id = client_id(s, path)?;
    let Query(q) = query.map_err(|e| Refusal::bad(ErrorCode::InvalidQuery, e.body_text()))?;
    let wait = wait_of(s, q).map_err(|m| Refusal::bad(ErrorCode::InvalidQuery, m))?;
    let body = body.map_err(|e| match e.status() {
        // Over the admin listener's body limit (axum's default, 2 MiB).
        StatusCode::PAYLOAD_TOO_LARGE => Refusal {
            code: ErrorCode::BodyTooLarge,
            message: e.body_text(),
        },
        _ => Refusal::bad(ErrorCode::InvalidBody, e.body_text()),
    })?;
    Ok((wait, request(s, client_id, &body)?))
}

/// The client id of the path, if a command can be addressed to it.
fn client_id(s: &Shared, path: Result<Path<String>, PathRejection>) -> Result<String, Refusal> {
    let Path(id) = path.map_err(|e| Refusal::bad(ErrorCode::InvalidClientId, e.body_text()))?;
    // The rule of the command service: one topic level of the command topic, so a
    // command can reach no other vehicle's topic.
    if !crate::commands::valid_client_id(&id, s.cfg.mqtt.max_client_id_len) {
        return Err(Refusal::bad(
            ErrorCode::InvalidClientId,
            format!(
                "{id:?} is not a client id a command can be sent to (1 to {} bytes, no '/', '+', '#' or NUL)",
                s.cfg.mqtt.max_client_id_len
            ),
        ));
    }
    Ok(id)
}

fn wait_of(s: &Shared, q: IssueQuery) -> Result<Wait, String> {
    match (q.wait.as_deref(), q.timeout_ms) {
        (None, None) => Ok(Wait::FirstWord),
        (None, Some(_)) => Err("timeout_ms needs wait=delivered".into()),
        (Some("delivered"), t) => {
            let t = t.map_or(DEFAULT_DELIVERED_WAIT, Duration::from_millis);
            Ok(Wait::Final(t.min(max_wait(s))))
        }
        (Some(other), _) => Err(format!("wait={other:?}: the only value is \"delivered\"")),
    }
}

/// The longest wait: [`MAX_WAIT`], and short enough that the answer leaves before the
/// admin listener closes the connection at its lifetime (less one request timeout, for
/// reading the request).
fn max_wait(s: &Shared) -> Duration {
    let timeout = Duration::from_secs(s.cfg.admin.request_timeout_secs);
    (timeout * MAX_LIFETIME_FACTOR)
        .saturating_sub(timeout)
        .min(MAX_WAIT)
}

/// The command a body describes, or the 400 / 413 answer saying why it is none.
fn request(s: &Shared, client_id: String, body: &[u8]) -> Result<CommandRequest, Refusal> {
    let bad = Refusal::bad;
    let de = &mut serde_json::Deserializer::from_slice(body);
    let b: CommandBody = serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        // "." is the whole body, "?" a place serde_path_to_error could not name.
        let msg = if at == "." || at == "?" {
            e.inner().to_string()
        } else {
            format!("{at}: {}", e.inner())
        };
        bad(ErrorCode::InvalidBody, msg)
    })?;
    let payload = match (b.payload, b.payload_base64) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(b64)) => match decode_base64(&b64) {
            Some(p) => Bytes::from(p),
            None => {
                return Err(bad(
                    ErrorCode::InvalidBase64,
                    "payload_base64 is not standard base64 (A-Z a-z 0-9 + /, '=' padding)".into(),
                ))
            }
        },
        (Some(_), Some(_)) | (None, None) => {
            return Err(bad(
                ErrorCode::InvalidPayload,
                "give exactly one of payload (text) and payload_base64".into(),
            ))
        }
    };
    if let Some(q) = b.qos.filter(|q| *q > 2) {
        return Err(bad(ErrorCode::InvalidQos, format!("qos {q}: must be 0, 1 or 2")));
    }
    if let Some(t) = &b.response_topic {
        if t.is_empty() || t.contains(['+', '#']) {
            return Err(bad(
                ErrorCode::InvalidResponseTopic,
                format!("response_topic {t:?} must be a topic name (no wildcards)"),
            ));
        }
    }
    let user_properties = b.user_properties.unwrap_or_default();
    let strings = [
        ("correlation_id", b.correlation_id.as_deref()),
        ("response_topic", b.response_topic.as_deref()),
        ("content_type", b.content_type.as_deref()),
    ];
    let props = user_properties.iter().flat_map(|(k, v)| {
        [
            ("user_properties", Some(k.as_str())),
            ("user_properties", Some(v.as_str())),
        ]
    });
    let mut size = payload.len();
    for (field, value) in strings.into_iter().chain(props) {
        let Some(v) = value else { continue };
        // MQTT strings may not hold NUL (a vehicle must close the connection on one).
        if v.len() > MAX_MQTT_STRING || v.contains('\0') {
            return Err(bad(
                ErrorCode::InvalidString,
                format!("{field}: at most {MAX_MQTT_STRING} bytes, no NUL"),
            ));
        }
        size += v.len();
    }
    // What the vehicle would receive, less a few bytes of framing; a command no vehicle
    // can accept is refused here rather than queued and dropped.
    let max = s.cfg.mqtt.max_packet_size as usize;
    if size > max {
        return Err(Refusal {
            code: ErrorCode::PayloadTooLarge,
            message: format!("payload and properties are {size} bytes; mqtt.max_packet_size is {max}"),
        });
    }
    Ok(CommandRequest {
        client_id,
        payload,
        qos: b.qos,
        expiry_secs: b.expiry_secs,
        correlation_id: b.correlation_id,
        response_topic: b.response_topic,
        content_type: b.content_type,
        user_properties,
        issued_at_ms: None,
    })
}

/// What every answer about an issued command names.
/// What issuing a command answers: its id and its latest outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandAnswer {
    pub command_id: String,
    pub client_id: String,
    /// The MQTT topic it was published to.
    pub topic: String,
    /// `pending` (sent to the connected vehicle, not acknowledged yet), `queued`,
    /// `delivered`, `expired`, `dropped`, `rejected` or `unknown_vehicle`.
    pub outcome: String,
    pub reason: Option<String>,
    /// On a 4xx/5xx: the admin API's error shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<super::error::ErrorDetail>,
}

/// A command a session holds.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeldCommand {
    pub command_id: String,
    pub correlation_id: Option<String>,
    /// `kafka`, `rest` or `mqtt`.
    pub source: String,
    pub qos: u8,
    pub issued_at_ms: u64,
    /// Sent to the vehicle and not acknowledged yet (else queued behind).
    pub in_flight: bool,
}

/// What `GET /api/v1/vehicles/{client_id}/commands` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeldCommands {
    pub client_id: String,
    pub online: bool,
    /// In delivery order, in flight first.
    pub commands: Vec<HeldCommand>,
}

struct Answer {
    command_id: String,
    client_id: String,
    topic: String,
}

impl Answer {
    fn pending(self) -> Response {
        self.progress(None)
    }

    /// The latest durable word (`None`: none yet) as status and body: 200 delivered,
    /// 202 pending / queued, 404 unknown_vehicle, 422 expired / dropped / rejected.
    fn progress(self, p: Option<Progress>) -> Response {
        let (outcome, reason) = match p {
            Some(p) => (p.outcome.label(), p.reason),
            None => ("pending", None),
        };
        let status = match p.map(|p| p.outcome) {
            None | Some(Outcome::Queued) => StatusCode::ACCEPTED,
            Some(Outcome::Delivered) => StatusCode::OK,
            Some(Outcome::UnknownVehicle) => StatusCode::NOT_FOUND,
            Some(Outcome::Expired | Outcome::Dropped | Outcome::Rejected) => StatusCode::UNPROCESSABLE_ENTITY,
        };
        self.respond(status, outcome, reason)
    }

    /// The waiter closed without a word. For a vehicle this gateway holds no session for,
    /// the command service settles without an outcome record when this gateway is not the
    /// one that reports `unknown_vehicle` (`commands.report_unknown = false`): the caller
    /// still learns that the vehicle is not here (404, reason `not_reported`). Otherwise
    /// the outcome record could not be journaled (shutdown, journal failure) and the
    /// command's fate is unknown here (503).
    fn without_record(self, s: &Shared, route: Option<CommandRoute>) -> Response {
        let not_routed = matches!(route, None | Some(CommandRoute::Dropped("session_gone")));
        if not_routed && s.registry.get(&self.client_id).is_none() {
            return self.respond(StatusCode::NOT_FOUND, "unknown_vehicle", Some("not_reported"));
        }
        self.respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "pending",
            Some("outcome_not_recorded"),
        )
    }

    fn respond(self, status: StatusCode, outcome: &str, reason: Option<&str>) -> Response {
        // Failures also carry the admin API's error shape, so a client that reads
        // `error.code` on any 4xx/5xx finds one.
        let error = (status.is_client_error() || status.is_server_error()).then(|| {
            let code = reason.filter(|_| status.is_server_error()).unwrap_or(outcome);
            let message = match reason {
                Some(r) => format!("command {outcome}: {r}"),
                None => format!("command {outcome}"),
            };
            super::error::ErrorDetail {
                code: code.to_string(),
                message,
            }
        });
        let body = CommandAnswer {
            command_id: self.command_id,
            client_id: self.client_id,
            topic: self.topic,
            outcome: outcome.to_string(),
            reason: reason.map(str::to_string),
            error,
        };
        (status, Json(body)).into_response()
    }
}

/// Standard base64 (RFC 4648 §4: `+` and `/`, `=` padding optional but exact), strict:
/// no whitespace, no stray bits. (Written out because it is the gateway's only use.)
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let all = s.as_bytes();
    let data = all
        .strip_suffix(b"==")
        .or_else(|| all.strip_suffix(b"="))
        .unwrap_or(all);
    if (data.len() != all.len() && !all.len().is_multiple_of(4)) || data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / 4 * 3 + 2);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in data {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from(acc >> bits).ok()?);
            acc &= (1 << bits) - 1;
        }
    }
    // Bits left over must be zero, so each payload has one encoding.
    (acc == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::decode_base64;

    #[test]
    fn base64_round_trips_and_is_strict() {
        let cases: [(&str, &[u8]); 7] = [
            ("", b""),
            ("YQ==", b"a"),
            ("YWI=", b"ab"),
            ("YWJj", b"abc"),
            ("YQ", b"a"),
            ("YWI", b"ab"),
            ("AP8+/w==", &[0x00, 0xff, 0x3e, 0xff]),
        ];
        for (text, bytes) in cases {
            assert_eq!(decode_base64(text).as_deref(), Some(bytes), "{text}");
        }
        for bad in [
            "Y", "YQ=", "Y===", "YR==", "YQ==YQ==", "YW J", "YWJ\n", "YW-_", "=", "====",
        ] {
            assert_eq!(decode_base64(bad), None, "{bad:?}");
        }
    }
}
