//! Connections and sessions as an operator sees them: list (filtered, cursor-paged by
//! client id), one, kick a connection (MQTT 5 reason 0x98), discard an offline session.
//!
//! A *connection* is a session a connection holds now; a *session* is any session the
//! registry holds, online or persistent and offline. Both read the session cells under
//! their own lock, one cell at a time: a listing is a consistent view of each vehicle,
//! not a snapshot of the whole gateway at one instant.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{page_limit, ApiError, ApiQuery, ErrorBody, ErrorCode};
use crate::message::now_ms;
use crate::registry::DiscardRefused;
use crate::session::state::{SessionCell, SessionState};
use crate::state::Shared;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConnectionsQuery {
    /// Only client ids starting with this.
    prefix: Option<String>,
    /// `tcp` or `tls`.
    listener: Option<String>,
    /// MQTT protocol level: 4 (3.1.1) or 5.
    protocol: Option<u8>,
    /// Cursor: client ids after this one (the previous page's `next_after`).
    after: Option<String>,
    /// Page size, 1–1000 (default 100).
    limit: Option<usize>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SessionsQuery {
    /// Only client ids starting with this.
    prefix: Option<String>,
    /// true: only sessions a connection holds; false: only offline ones.
    online: Option<bool>,
    /// Cursor: client ids after this one (the previous page's `next_after`).
    after: Option<String>,
    /// Page size, 1–1000 (default 100).
    limit: Option<usize>,
}

/// A connected vehicle.
#[derive(Debug, Serialize, ToSchema)]
pub struct Connection {
    pub client_id: String,
    /// The gateway's number for this connection (presence events carry it as `conn`).
    pub conn: u64,
    pub peer: String,
    /// `tcp` or `tls`.
    pub listener: String,
    /// 4 (MQTT 3.1.1) or 5.
    pub protocol: u8,
    /// Identity from the verified client certificate (mTLS), if any.
    pub tls_identity: Option<String>,
    pub connected_at_ms: u64,
    /// Keep alive in force, seconds.
    pub keep_alive_secs: u16,
    /// QoS 1/2 messages sent to the vehicle and not acknowledged yet.
    pub in_flight: usize,
    /// Messages waiting to be sent to it.
    pub queued: usize,
    pub subscriptions: usize,
    /// PUBLISH packets received from the vehicle.
    pub messages_in: u64,
    /// PUBLISH packets sent to it.
    pub messages_out: u64,
    pub bytes_in: u64,
    /// Bytes handed to the socket.
    pub bytes_out: u64,
}

/// One subscription of a session.
#[derive(Debug, Serialize, ToSchema)]
pub struct Subscription {
    pub filter: String,
    /// Granted QoS.
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    /// MQTT 5 subscription identifier.
    pub subscription_id: Option<u32>,
}

/// A connection with its subscriptions.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionDetail {
    #[serde(flatten)]
    pub connection: Connection,
    pub subscription_list: Vec<Subscription>,
}

/// A session this gateway holds.
#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    pub client_id: String,
    pub online: bool,
    pub protocol: u8,
    /// Session expiry interval in force (0: ends with its connection).
    pub expiry_secs: u32,
    /// Offline: when its vehicle left, and when the session expires (null: never).
    pub disconnected_at_ms: Option<u64>,
    pub expires_at_ms: Option<u64>,
    pub subscriptions: usize,
    /// Messages waiting for the vehicle (offline queue when it is offline).
    pub queued: usize,
    pub in_flight: usize,
}

/// A session with its subscriptions and how old its queue is.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionDetail {
    #[serde(flatten)]
    pub session: Session,
    /// Age of the oldest queued message, seconds (null: nothing queued).
    pub oldest_queued_age_secs: Option<f64>,
    pub queued_bytes: usize,
    /// Kafka, REST or MQTT commands the session holds.
    pub commands: usize,
    pub subscription_list: Vec<Subscription>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionPage {
    pub connections: Vec<Connection>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionPage {
    pub sessions: Vec<Session>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<String>,
}

/// What a kick or a discard did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Done {
    pub client_id: String,
    /// `kicked` or `discarded`.
    pub action: String,
}

/// The cells whose client id passes `keep`, sorted, after the cursor, one page (plus
/// the cursor for the next).
fn page(
    s: &Shared,
    prefix: Option<&str>,
    after: Option<&str>,
    limit: usize,
    mut keep: impl FnMut(&SessionCell, &SessionState) -> bool,
) -> (Vec<Arc<SessionCell>>, Option<String>) {
    let mut cells: Vec<_> = s
        .registry
        .all()
        .into_iter()
        .filter(|c| prefix.is_none_or(|p| c.client_id.starts_with(p)))
        .filter(|c| after.is_none_or(|a| &*c.client_id > a))
        .collect();
    cells.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
    let mut out = Vec::new();
    let mut next = None;
    for c in cells {
        let st = c.lock();
        if st.gone || !keep(&c, &st) {
            continue;
        }
        drop(st);
        if out.len() == limit {
            next = out.last().map(|c: &Arc<SessionCell>| c.client_id.to_string());
            break;
        }
        out.push(c);
    }
    (out, next)
}

fn connection_of(cell: &SessionCell, st: &SessionState) -> Option<Connection> {
    let o = st.owner.as_ref()?;
    let i = &o.info;
    Some(Connection {
        client_id: cell.client_id.to_string(),
        conn: o.conn(),
        peer: i.peer.to_string(),
        listener: i.listener().to_string(),
        protocol: st.protocol,
        tls_identity: i.tls_identity.as_deref().map(str::to_string),
        connected_at_ms: i.connected_at_ms,
        keep_alive_secs: i.keep_alive_secs,
        in_flight: st.out.inflight.len(),
        queued: st.out.queue.len(),
        subscriptions: st.subscriptions.len(),
        messages_in: i.messages_in.load(Relaxed),
        messages_out: i.messages_out.load(Relaxed),
        bytes_in: i.bytes_in.load(Relaxed),
        bytes_out: i.bytes_out.load(Relaxed),
    })
}

fn session_of(cell: &SessionCell, st: &SessionState) -> Session {
    let expires_at_ms = match (st.disconnected_at_ms(), st.expiry_secs) {
        (Some(_), u32::MAX) | (None, _) => None,
        (Some(at), secs) => Some(at.saturating_add(u64::from(secs) * 1000)),
    };
    Session {
        client_id: cell.client_id.to_string(),
        online: st.owner.is_some(),
        protocol: st.protocol,
        expiry_secs: st.expiry_secs,
        disconnected_at_ms: st.disconnected_at_ms(),
        expires_at_ms,
        subscriptions: st.subscriptions.len(),
        queued: st.out.queue.len(),
        in_flight: st.out.inflight.len(),
    }
}

fn subscriptions_of(st: &SessionState) -> Vec<Subscription> {
    st.subscriptions
        .iter()
        .map(|(f, o)| Subscription {
            filter: f.to_string(),
            qos: o.qos,
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            retain_handling: o.retain_handling,
            subscription_id: o.id,
        })
        .collect()
}

/// Connected vehicles, sorted by client id.
#[utoipa::path(get, path = "/api/v1/connections", tag = "connections", params(ConnectionsQuery),
    responses((status = 200, body = ConnectionPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_connections(
    State(s): State<Arc<Shared>>,
    ApiQuery(q): ApiQuery<ConnectionsQuery>,
) -> Result<Json<ConnectionPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    if let Some(l) = q.listener.as_deref().filter(|l| !["tcp", "tls"].contains(l)) {
        return Err(ApiError::bad_query(format!("listener {l:?}: tcp or tls")));
    }
    let (cells, next_after) = page(&s, q.prefix.as_deref(), q.after.as_deref(), limit, |_, st| {
        st.owner.as_ref().is_some_and(|o| {
            q.listener.as_deref().is_none_or(|l| o.info.listener() == l)
                && q.protocol.is_none_or(|p| st.protocol == p)
        })
    });
    let connections = cells.iter().filter_map(|c| connection_of(c, &c.lock())).collect();
    Ok(Json(ConnectionPage {
        connections,
        next_after,
    }))
}

/// One connected vehicle.
#[utoipa::path(get, path = "/api/v1/connections/{client_id}", tag = "connections",
    params(("client_id" = String, Path, description = "The vehicle's MQTT client id")),
    responses((status = 200, body = ConnectionDetail), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_connection(
    State(s): State<Arc<Shared>>,
    Path(client_id): Path<String>,
) -> Result<Json<ConnectionDetail>, ApiError> {
    let not_connected = || ApiError::not_found(format!("{client_id:?} is not connected to this gateway"));
    let cell = s.registry.get(&client_id).ok_or_else(not_connected)?;
    let st = cell.lock();
    let connection = connection_of(&cell, &st).ok_or_else(not_connected)?;
    Ok(Json(ConnectionDetail {
        connection,
        subscription_list: subscriptions_of(&st),
    }))
}

/// Disconnects a vehicle (MQTT 5: DISCONNECT 0x98, administrative action). Its
/// persistent session stays; its Will is published as for any server-side close.
#[utoipa::path(delete, path = "/api/v1/connections/{client_id}", tag = "connections",
    params(("client_id" = String, Path, description = "The vehicle's MQTT client id")),
    responses((status = 200, body = Done), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn kick(
    State(s): State<Arc<Shared>>,
    Path(client_id): Path<String>,
) -> Result<Json<Done>, ApiError> {
    if !s.registry.kick(&client_id) {
        return Err(ApiError::not_found(format!(
            "{client_id:?} is not connected to this gateway"
        )));
    }
    tracing::warn!(client_id, "connection kicked through the admin API");
    Ok(Json(Done {
        client_id,
        action: "kicked".into(),
    }))
}

/// Sessions this gateway holds, online and offline, sorted by client id.
#[utoipa::path(get, path = "/api/v1/sessions", tag = "sessions", params(SessionsQuery),
    responses((status = 200, body = SessionPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_sessions(
    State(s): State<Arc<Shared>>,
    ApiQuery(q): ApiQuery<SessionsQuery>,
) -> Result<Json<SessionPage>, ApiError> {
    let limit = page_limit(q.limit)?;
    let (cells, next_after) = page(&s, q.prefix.as_deref(), q.after.as_deref(), limit, |_, st| {
        q.online.is_none_or(|o| o == st.owner.is_some())
    });
    let sessions = cells.iter().map(|c| session_of(c, &c.lock())).collect();
    Ok(Json(SessionPage { sessions, next_after }))
}

/// One session: subscriptions, offline queue depth and age.
#[utoipa::path(get, path = "/api/v1/sessions/{client_id}", tag = "sessions",
    params(("client_id" = String, Path, description = "The vehicle's MQTT client id")),
    responses((status = 200, body = SessionDetail), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_session(
    State(s): State<Arc<Shared>>,
    Path(client_id): Path<String>,
) -> Result<Json<SessionDetail>, ApiError> {
    let none = || ApiError::not_found(format!("this gateway holds no session for {client_id:?}"));
    let cell = s.registry.get(&client_id).ok_or_else(none)?;
    let st = cell.lock();
    if st.gone {
        return Err(none());
    }
    let now = now_ms();
    let held = || st.out.queue.iter().chain(st.out.inflight.iter());
    let oldest = held().map(|i| i.msg.received_at_ms).min();
    Ok(Json(SessionDetail {
        session: session_of(&cell, &st),
        oldest_queued_age_secs: oldest.map(|t| now.saturating_sub(t) as f64 / 1000.0),
        queued_bytes: held().map(|i| i.msg.payload.len() + i.msg.topic.len()).sum(),
        commands: held().filter(|i| i.command.is_some()).count(),
        subscription_list: subscriptions_of(&st),
    }))
}

/// Discards an offline session now: subscriptions, queue (its commands end `dropped`)
/// and stored state. A session a connection holds is refused (409): kick it first.
#[utoipa::path(delete, path = "/api/v1/sessions/{client_id}", tag = "sessions",
    params(("client_id" = String, Path, description = "The vehicle's MQTT client id")),
    responses((status = 200, body = Done), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn discard(
    State(s): State<Arc<Shared>>,
    Path(client_id): Path<String>,
) -> Result<Json<Done>, ApiError> {
    match s
        .registry
        .discard_offline(&client_id, &s.router, &s.store, &s.metrics)
    {
        Ok(will) => {
            tracing::warn!(client_id, "session discarded through the admin API");
            crate::session::presence::journal_discarded(&s, &client_id).await;
            if let Some((key, w)) = will {
                let shared = s.clone();
                tokio::spawn(async move {
                    crate::session::will::publish(&shared, &key, w.user.as_deref(), w.will).await;
                });
            }
            Ok(Json(Done {
                client_id,
                action: "discarded".into(),
            }))
        }
        Err(DiscardRefused::NoSession) => Err(ApiError::not_found(format!(
            "this gateway holds no session for {client_id:?}"
        ))),
        Err(DiscardRefused::Online) => Err(ApiError::new(
            ErrorCode::SessionOnline,
            format!("{client_id:?} is connected: DELETE /api/v1/connections/{client_id} first"),
        )),
    }
}
