//! Many gateways in a region: which gateway acts on a command, and how queued commands
//! follow a vehicle that moved to another gateway.
//!
//! The rule (README, "Many gateways in a region"):
//! - Every gateway reads every command (its own consumer group) and acts only for the
//!   sessions it holds. A gateway that does not hold the vehicle stays silent, except
//!   the one with `commands.report_unknown = true`, which reports `unknown_vehicle`
//!   when no gateway holds it: it follows the presence topic and keeps, for vehicles
//!   held by other gateways, who holds them (connected there, or disconnected there with
//!   the session kept). A vehicle that connected elsewhere within the presence topic's
//!   propagation delay may be reported unknown while the other gateway delivers it.
//! - Every gateway follows the presence topic: when a vehicle whose session this
//!   gateway holds offline connects to another gateway, the session moved. The commands
//!   it holds are journaled back to the command topic (`EntryKind::Command`, same key,
//!   original command id and issue time), where the gateway that now holds the vehicle
//!   picks them up; once those records are durable the old session is discarded. Other
//!   messages queued in it are not handed over (they were local deliveries).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bridge::feed::FeedItem;
use bridge::{Entry, EntryKind, FullPolicy, Journal as _};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::message::now_ms;
use crate::session::state::OutItem;
use crate::state::Shared;

/// The fields of a presence event this module needs.
#[derive(Debug, Deserialize)]
struct PresenceEvent {
    event: String,
    client_id: String,
    gateway_id: String,
    #[serde(default)]
    at_ms: u64,
    #[serde(default)]
    conn: u64,
    #[serde(default)]
    reason: Option<String>,
    /// On `disconnected`: whether the session stays (persistent) and for how long.
    #[serde(default)]
    session_kept: bool,
    #[serde(default)]
    session_expiry_secs: Option<u32>,
}

/// Who holds a vehicle elsewhere: a gateway, its connection (to pair the
/// `disconnected`), and, once offline, until when its session may last.
#[derive(Debug)]
struct Holder {
    gateway: Box<str>,
    conn: u64,
    until_ms: Option<u64>,
}

/// Vehicles whose session another gateway holds (kept only where `report_unknown`),
/// and whether the presence topic was read up to where it stood at start.
#[derive(Debug, Default)]
pub struct Region {
    elsewhere: Mutex<HashMap<Box<str>, Holder>>,
    caught_up: tokio::sync::Notify,
    ready: std::sync::atomic::AtomicBool,
}

impl Region {
    /// The gateway holding `client_id`'s session, if another one does.
    pub fn held_by(&self, client_id: &str) -> Option<String> {
        let now = now_ms();
        self.lock()
            .get(client_id)
            .filter(|h| h.until_ms.is_none_or(|u| u > now))
            .map(|h| h.gateway.to_string())
    }

    /// Vehicles held elsewhere, as far as this gateway knows.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the presence topic was read up to where it stood at start, so that
    /// `held_by` is not asked about a vehicle before its latest event was seen.
    pub async fn ready(&self) {
        loop {
            let notified = self.caught_up.notified();
            if self.ready.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        self.caught_up.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Holder>> {
        self.elsewhere.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one presence event (of any gateway) to the map.
    fn apply(&self, me: &str, ev: &PresenceEvent) {
        let mut map = self.lock();
        if ev.gateway_id == me {
            // The vehicle is here now: whatever another gateway held is history.
            if ev.event == "connected" {
                map.remove(ev.client_id.as_str());
            }
            return;
        }
        match ev.event.as_str() {
            "connected" => {
                let h = Holder {
                    gateway: ev.gateway_id.as_str().into(),
                    conn: ev.conn,
                    until_ms: None,
                };
                map.insert(ev.client_id.as_str().into(), h);
            }
            // A takeover: the session goes on under the new connection.
            "disconnected" if ev.reason.as_deref() == Some("taken_over") => {}
            "disconnected" => {
                let ours = map
                    .get(ev.client_id.as_str())
                    .is_some_and(|h| *h.gateway == *ev.gateway_id && h.conn == ev.conn);
                if !ours {
                    return;
                }
                match (ev.session_kept, ev.session_expiry_secs) {
                    (true, Some(secs)) if secs != u32::MAX => {
                        let until = ev.at_ms.saturating_add(u64::from(secs) * 1000);
                        if let Some(h) = map.get_mut(ev.client_id.as_str()) {
                            h.until_ms = Some(until);
                        }
                    }
                    (true, _) => {}
                    (false, _) => {
                        map.remove(ev.client_id.as_str());
                    }
                }
            }
            _ => {}
        }
    }
}

/// Follows the presence feed until it ends.
pub async fn follow(shared: Arc<Shared>, mut rx: mpsc::Receiver<FeedItem>) {
    let me = shared.cfg.gateway_id();
    let track = shared.cfg.commands.report_unknown;
    while let Some(item) = rx.recv().await {
        let r = match item {
            FeedItem::CaughtUp => {
                shared.commands.region.set_ready();
                continue;
            }
            FeedItem::Record(r) => r,
        };
        let Ok(ev) = serde_json::from_slice::<PresenceEvent>(&r.payload) else {
            continue;
        };
        if track {
            shared.commands.region.apply(&me, &ev);
        }
        if ev.gateway_id != me && ev.event == "connected" {
            hand_over(&shared, &ev.client_id, ev.at_ms, &ev.gateway_id).await;
        }
    }
}

/// Hands the commands of `client_id`'s offline session over to `to`, where the vehicle
/// connected at `since_ms`, then discards the session.
async fn hand_over(shared: &Arc<Shared>, client_id: &str, since_ms: u64, to: &str) {
    let Some(items) = shared.registry.moved_commands(client_id, since_ms) else {
        return;
    };
    if !shared.cfg.commands.enabled && !items.is_empty() {
        // Nobody would read them from the command topic: keep the session as it is.
        warn!(
            client_id,
            to,
            commands = items.len(),
            "vehicle moved to another gateway, but commands.enabled = false here: its queued commands stay"
        );
        return;
    }
    let mut last = 0;
    for item in &items {
        match journal(shared, item).await {
            Some(seq) => last = seq,
            None => return,
        }
    }
    if last > 0 {
        let mut durable = shared.journal.durable();
        if durable.wait_for(|d| *d >= last).await.is_err() {
            return;
        }
    }
    let moved = shared.registry.discard_moved(
        client_id,
        since_ms,
        &shared.router,
        &shared.store,
        &shared.metrics,
    );
    if moved {
        // The records are durable and the session is gone: the copies here end without
        // an outcome of their own (the gateway holding the vehicle reports theirs).
        for item in &items {
            if let Some(t) = &item.command {
                t.settle_silently();
            }
        }
        info!(
            client_id,
            to,
            commands = items.len(),
            "vehicle's session moved to another gateway: commands handed over, session discarded"
        );
    } else {
        // The copies here stay and report; the handed-over records reach this gateway
        // too, which holds the vehicle again and takes them for the same commands.
        info!(
            client_id,
            to,
            commands = items.len(),
            "vehicle came back while its commands were handed over: the session stays"
        );
    }
}

/// Journals one command copy as a command record for the command topic.
async fn journal(shared: &Shared, item: &OutItem) -> Option<u64> {
    let t = item.command.as_ref()?;
    let c = &t.info.record;
    let m = &item.msg;
    let mut props: Vec<(String, String)> = vec![
        ("command_id".into(), c.id.clone()),
        ("issued_at_ms".into(), c.issued_at_ms.to_string()),
        ("gateway.handed_over_from".into(), shared.cfg.gateway_id()),
    ];
    if let Some(v) = &c.correlation_id {
        props.push(("correlation_id".into(), v.clone()));
    }
    if let Some(v) = &m.props.response_topic {
        props.push(("response_topic".into(), v.clone()));
    }
    if let Some(v) = &m.props.content_type {
        props.push(("content_type".into(), v.clone()));
    }
    if let Some(e) = m.expires_at_ms {
        let left = e.saturating_sub(c.issued_at_ms).div_ceil(1000).max(1);
        props.push(("expiry_secs".into(), left.to_string()));
    } else {
        props.push(("expiry_secs".into(), "0".into()));
    }
    props.extend(m.props.user_properties.iter().cloned());
    let entry = Entry {
        kind: EntryKind::Command,
        received_at_ms: now_ms(),
        qos: c.qos,
        retain: false,
        client_id: c.client_id.clone(),
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        content_type: None,
        message_expiry_secs: None,
        user_properties: props,
    };
    match shared.journal.append_with(&entry, FullPolicy::Backpressure).await {
        Ok(Some(seq)) => Some(seq),
        Ok(None) => None,
        Err(e) => {
            warn!(client_id = %c.client_id, command_id = %c.id, error = %e, "command not handed over (journal); the session stays");
            None
        }
    }
}
