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
//!   messages queued in it are not handed over (they were local deliveries). The
//!   gateway now holding the vehicle may also read the original records (its consumer
//!   was behind when the vehicle arrived): it delivers whichever copy comes first, and
//!   the command's identity, remembered for a while once it ended (the sink's memory in
//!   `outcome`), settles the other without a word.
//!
//! The reporter's map, event by event (events of other gateways; this gateway's own
//! `connected` only removes the vehicle from the map, since it holds the vehicle now):
//! - `connected` from G at t: G holds the vehicle, online, unless the map names another
//!   gateway with a later event (the later event wins: events of one vehicle are read in
//!   Kafka order, which is journal order per gateway, not wall-clock order across
//!   gateways).
//! - `disconnected` from G: pairs with G's entry by `conn`; the session kept makes the
//!   entry offline until `at_ms` + its expiry, else the entry goes. `taken_over` changes
//!   nothing (the session goes on under the new connection).
//! - A gateway killed without a clean stop (SIGKILL, power loss) journals no
//!   `disconnected` for its connections. When it starts again it journals
//!   `gateway_started` at T (keyed apart from every vehicle, see
//!   [`presence::started_key`]) and, for each persistent session it restored, a
//!   `disconnected` with reason `gateway_restarted` at T (conn 0, the session kept for
//!   what remains of its expiry), before its listeners accept anyone. So what G held
//!   before T is void, and what it still holds is announced again at T:
//!   - `gateway_started` from G at T removes every entry of G older than T (online or
//!     offline: a session G wrote to its store but had not flushed when it died is gone
//!     too, and G announces again whatever it did restore);
//!   - any other event from G with `at_ms` < T (the latest start of G seen) is stale and
//!     changes nothing for G, in whichever order the events arrive: records of different
//!     keys are read in any order across partitions, also when the topic is read again
//!     from its beginning at start, and G's journal replays records of its previous run
//!     after it started. A stale `connected` still ends the entry of another gateway
//!     with an older event (the vehicle left that gateway then);
//!   - `gateway_restarted` from G at T makes G the holder, offline, until T + the
//!     expiry, without a `conn` to pair, unless another gateway holds the vehicle with a
//!     later event.
//! - Entries whose expiry passed are not asked for ([`Region::held_by`]) and are removed
//!   by a sweep at most once per [`SWEEP_EVERY_MS`], on the next event (without events
//!   the map does not grow).
//!
//! Limit: a gateway that leaves the region for good, killed and never started again
//! under its `gateway.id`, leaves its online entries in the reporter's map (compaction
//! keeps its last events) until its vehicles connect elsewhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bridge::feed::FeedItem;
use bridge::{Entry, EntryKind, FullPolicy, Journal as _};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::message::now_ms;
use crate::session::presence;
use crate::session::state::OutItem;
use crate::state::Shared;

/// Most often the reporter sweeps expired entries from its map: one pass over the map
/// per minute at most, so the work per event stays bounded on average.
pub const SWEEP_EVERY_MS: u64 = 60_000;

/// The fields of a presence event this module needs.
#[derive(Debug, Deserialize)]
struct PresenceEvent {
    event: String,
    /// Absent on `gateway_started`, which is about a gateway, not a vehicle.
    #[serde(default)]
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

impl PresenceEvent {
    /// Until when a kept session lasts (`None`: no limit).
    fn until_ms(&self) -> Option<u64> {
        match self.session_expiry_secs {
            Some(secs) if secs != u32::MAX => Some(self.at_ms.saturating_add(u64::from(secs) * 1000)),
            _ => None,
        }
    }
}

/// Who holds a vehicle elsewhere: a gateway, its connection (to pair the
/// `disconnected`), when that became known, and, once offline, until when its session
/// may last.
#[derive(Debug)]
struct Holder {
    gateway: Box<str>,
    conn: u64,
    /// `at_ms` of the event that set this entry: a later start of the same gateway voids
    /// it, and another gateway's event replaces it only if not older.
    since_ms: u64,
    until_ms: Option<u64>,
}

/// The reporter's view of the region, under one lock.
#[derive(Debug, Default)]
struct Map {
    /// Vehicles whose session another gateway holds.
    elsewhere: HashMap<Box<str>, Holder>,
    /// The latest `gateway_started` `at_ms` of each other gateway: its events from
    /// before are stale. One entry per gateway of the region.
    started: HashMap<Box<str>, u64>,
    /// When expired entries are swept next.
    next_sweep_ms: u64,
}

impl Map {
    /// Removes entries whose session expired, at most once per [`SWEEP_EVERY_MS`].
    fn sweep(&mut self, now: u64) {
        if now < self.next_sweep_ms {
            return;
        }
        self.next_sweep_ms = now.saturating_add(SWEEP_EVERY_MS);
        self.elsewhere.retain(|_, h| h.until_ms.is_none_or(|u| u > now));
    }

    /// Whether a gateway other than `gateway` holds `client_id` with an event later
    /// than `at_ms`: then that entry stands.
    fn later_elsewhere(&self, client_id: &str, gateway: &str, at_ms: u64) -> bool {
        self.elsewhere
            .get(client_id)
            .is_some_and(|h| *h.gateway != *gateway && h.since_ms > at_ms)
    }
}

/// Vehicles whose session another gateway holds (kept only where `report_unknown`),
/// and whether the presence topic was read up to where it stood at start.
#[derive(Debug, Default)]
pub struct Region {
    map: Mutex<Map>,
    caught_up: tokio::sync::Notify,
    ready: std::sync::atomic::AtomicBool,
}

impl Region {
    /// The gateway holding `client_id`'s session, if another one does.
    pub fn held_by(&self, client_id: &str) -> Option<String> {
        self.held_at(client_id, now_ms())
    }

    fn held_at(&self, client_id: &str, now: u64) -> Option<String> {
        self.lock()
            .elsewhere
            .get(client_id)
            .filter(|h| h.until_ms.is_none_or(|u| u > now))
            .map(|h| h.gateway.to_string())
    }

    /// Vehicles held elsewhere, as far as this gateway knows.
    pub fn len(&self) -> usize {
        self.lock().elsewhere.len()
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one presence event (of any gateway) to the map.
    fn apply(&self, me: &str, ev: &PresenceEvent) {
        self.apply_at(me, ev, now_ms());
    }

    /// [`Region::apply`] at `now` (the clock of the expiry sweep).
    fn apply_at(&self, me: &str, ev: &PresenceEvent, now: u64) {
        let mut m = self.lock();
        m.sweep(now);
        let client_id = ev.client_id.as_str();
        if ev.gateway_id == me {
            // The vehicle is here now: whatever another gateway held is history.
            if ev.event == "connected" {
                m.elsewhere.remove(client_id);
            }
            return;
        }
        let gateway = ev.gateway_id.as_str();
        if ev.event == presence::Presence::GatewayStarted.label() {
            let known = m.started.entry(gateway.into()).or_insert(0);
            if *known >= ev.at_ms {
                // Read again, or an older start read late: applied already.
                return;
            }
            *known = ev.at_ms;
            let t = ev.at_ms;
            // One pass over the map per start of another gateway.
            m.elsewhere
                .retain(|_, h| !(*h.gateway == *gateway && h.since_ms < t));
            return;
        }
        let stale = m.started.get(gateway).is_some_and(|t| ev.at_ms < *t);
        match ev.event.as_str() {
            "connected" => {
                if m.later_elsewhere(client_id, gateway, ev.at_ms) {
                    return;
                }
                if stale {
                    // The vehicle left whoever held it before then; the gateway it went
                    // to restarted since, and says itself what it still holds.
                    if m.elsewhere.get(client_id).is_some_and(|h| h.since_ms < ev.at_ms) {
                        m.elsewhere.remove(client_id);
                    }
                    return;
                }
                let h = Holder {
                    gateway: gateway.into(),
                    conn: ev.conn,
                    since_ms: ev.at_ms,
                    until_ms: None,
                };
                m.elsewhere.insert(client_id.into(), h);
            }
            _ if stale => {}
            // A takeover: the session goes on under the new connection.
            "disconnected" if ev.reason.as_deref() == Some("taken_over") => {}
            // An operator discarded the session there: whatever connection it had.
            "disconnected" if ev.reason.as_deref() == Some(presence::SESSION_DISCARDED) => {
                let held_there = m
                    .elsewhere
                    .get(client_id)
                    .is_some_and(|h| *h.gateway == *gateway && h.since_ms <= ev.at_ms);
                if held_there {
                    m.elsewhere.remove(client_id);
                }
            }
            // A restarted gateway holds the session, offline; no connection to pair.
            "disconnected" if ev.reason.as_deref() == Some(presence::GATEWAY_RESTARTED) => {
                if m.later_elsewhere(client_id, gateway, ev.at_ms) {
                    return;
                }
                let until = ev.until_ms();
                if !ev.session_kept || until.is_some_and(|u| u <= now) {
                    if m.elsewhere.get(client_id).is_some_and(|h| *h.gateway == *gateway) {
                        m.elsewhere.remove(client_id);
                    }
                    return;
                }
                let h = Holder {
                    gateway: gateway.into(),
                    conn: ev.conn,
                    since_ms: ev.at_ms,
                    until_ms: until,
                };
                m.elsewhere.insert(client_id.into(), h);
            }
            "disconnected" => {
                let Some(h) = m.elsewhere.get_mut(client_id) else {
                    return;
                };
                if *h.gateway != *gateway || h.conn != ev.conn {
                    return;
                }
                let until = ev.until_ms();
                if ev.session_kept && until.is_none_or(|u| u > now) {
                    h.until_ms = until;
                    h.since_ms = h.since_ms.max(ev.at_ms);
                } else {
                    // Gone, or already expired (read again at start).
                    m.elsewhere.remove(client_id);
                }
            }
            _ => {}
        }
    }
}

/// Follows the presence feed until it ends.
pub async fn follow(shared: Arc<Shared>, mut rx: mpsc::Receiver<FeedItem>) {
    let me = &*shared.gateway_id;
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
            shared.commands.region.apply(me, &ev);
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
        (
            super::kafka::HANDED_OVER_FROM.into(),
            shared.gateway_id.to_string(),
        ),
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
        packet_id: None,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const ME: &str = "gw-me";
    const X: &str = "gw-x";
    const Y: &str = "gw-y";

    fn connected(gw: &str, client_id: &str, at_ms: u64, conn: u64) -> PresenceEvent {
        PresenceEvent {
            event: "connected".into(),
            client_id: client_id.into(),
            gateway_id: gw.into(),
            at_ms,
            conn,
            reason: None,
            session_kept: false,
            session_expiry_secs: None,
        }
    }

    fn disconnected(gw: &str, client_id: &str, at_ms: u64, conn: u64, expiry: Option<u32>) -> PresenceEvent {
        PresenceEvent {
            event: "disconnected".into(),
            reason: Some("client_disconnect".into()),
            session_kept: expiry.is_some(),
            session_expiry_secs: expiry,
            ..connected(gw, client_id, at_ms, conn)
        }
    }

    fn restarted(gw: &str, client_id: &str, at_ms: u64, expiry: u32) -> PresenceEvent {
        PresenceEvent {
            reason: Some(presence::GATEWAY_RESTARTED.into()),
            ..disconnected(gw, client_id, at_ms, 0, Some(expiry))
        }
    }

    fn started(gw: &str, at_ms: u64) -> PresenceEvent {
        // As a gateway writes it: no client id.
        let json = format!(r#"{{"event":"gateway_started","gateway_id":"{gw}","at_ms":{at_ms}}}"#);
        serde_json::from_str(&json).unwrap()
    }

    /// Applies `events` in order, all at `now`.
    fn region(events: &[PresenceEvent], now: u64) -> Region {
        let r = Region::default();
        for ev in events {
            r.apply_at(ME, ev, now);
        }
        r
    }

    #[test]
    fn a_vehicle_is_held_while_connected_and_while_its_kept_session_lasts() {
        let r = region(&[connected(X, "V1", 1_000, 7)], 1_000);
        assert_eq!(r.held_at("V1", 2_000).as_deref(), Some(X));
        // A disconnected of another connection does not pair.
        r.apply_at(ME, &disconnected(X, "V1", 2_000, 8, None), 2_000);
        assert_eq!(r.held_at("V1", 2_000).as_deref(), Some(X));
        r.apply_at(ME, &disconnected(X, "V1", 2_000, 7, Some(60)), 2_000);
        assert_eq!(r.held_at("V1", 61_999).as_deref(), Some(X));
        assert_eq!(r.held_at("V1", 62_000), None, "expired");
        // A clean session ends with its connection.
        let r = region(
            &[
                connected(X, "V2", 1_000, 9),
                disconnected(X, "V2", 1_500, 9, None),
            ],
            1_500,
        );
        assert_eq!(r.held_at("V2", 1_500), None);
        assert!(r.is_empty());
    }

    #[test]
    fn a_discarded_session_is_held_no_more_but_a_later_connection_is() {
        let discarded = |gw: &str, at_ms: u64| PresenceEvent {
            reason: Some(presence::SESSION_DISCARDED.into()),
            ..disconnected(gw, "V1", at_ms, 0, None)
        };
        let r = region(
            &[
                connected(X, "V1", 1_000, 7),
                disconnected(X, "V1", 2_000, 7, Some(u32::MAX)),
            ],
            2_000,
        );
        // Another gateway's discard says nothing of X's session.
        r.apply_at(ME, &discarded(Y, 3_000), 3_000);
        assert_eq!(r.held_at("V1", 3_000).as_deref(), Some(X));
        r.apply_at(ME, &discarded(X, 3_000), 3_000);
        assert_eq!(r.held_at("V1", 3_000), None);
        // A discard older than the connection it would end changes nothing.
        let r = region(&[connected(X, "V1", 5_000, 8)], 5_000);
        r.apply_at(ME, &discarded(X, 4_000), 5_000);
        assert_eq!(r.held_at("V1", 5_000).as_deref(), Some(X));
    }

    #[test]
    fn a_connected_here_ends_what_another_gateway_held() {
        let r = region(
            &[connected(X, "V1", 1_000, 7), connected(ME, "V1", 2_000, 3)],
            2_000,
        );
        assert_eq!(r.held_at("V1", 2_000), None);
    }

    #[test]
    fn a_start_voids_what_the_gateway_held_before_in_either_order() {
        // X held V1 (online, clean session) and V2 (offline, kept), then was killed and
        // started again at 5_000 without V1 and V2 in its store. A stale `connected` of
        // its previous run (replayed from its journal, or from another partition) may
        // arrive after its `gateway_started`.
        let before = [
            connected(X, "V1", 1_000, 7),
            connected(X, "V2", 1_100, 8),
            disconnected(X, "V2", 1_200, 8, Some(3_600)),
        ];
        let start = started(X, 5_000);
        let orders: [Vec<&PresenceEvent>; 3] = [
            before.iter().chain([&start]).collect(),
            [&start].into_iter().chain(before.iter()).collect(),
            [&before[0], &start, &before[1], &before[2]].into(),
        ];
        for events in orders {
            let r = Region::default();
            for ev in events {
                r.apply_at(ME, ev, 5_000);
            }
            assert_eq!(r.held_at("V1", 6_000), None, "V1 stale");
            assert_eq!(r.held_at("V2", 6_000), None, "V2 stale");
            assert!(r.is_empty());
            // After the start, X's new connections count again.
            r.apply_at(ME, &connected(X, "V1", 5_001, 1), 5_001);
            assert_eq!(r.held_at("V1", 6_000).as_deref(), Some(X));
        }
    }

    #[test]
    fn a_stale_connected_still_ends_an_older_entry_of_another_gateway() {
        // V1 was on Y (100), then on X (1_000); X was killed and started again at 5_000.
        // Y's entry is history whichever order X's events arrive in.
        let events = [
            connected(Y, "V1", 100, 4),
            connected(X, "V1", 1_000, 7),
            started(X, 5_000),
        ];
        let r = region(&events, 5_000);
        assert_eq!(r.held_at("V1", 6_000), None);
        let events = [
            connected(Y, "V1", 100, 4),
            started(X, 5_000),
            connected(X, "V1", 1_000, 7),
        ];
        let r = region(&events, 5_000);
        assert_eq!(r.held_at("V1", 6_000), None);
        // But a later event of Y stands.
        let events = [
            connected(Y, "V1", 2_000, 4),
            started(X, 5_000),
            connected(X, "V1", 1_000, 7),
        ];
        let r = region(&events, 5_000);
        assert_eq!(r.held_at("V1", 6_000).as_deref(), Some(Y));
    }

    #[test]
    fn a_restored_session_is_held_until_it_expires_in_either_order() {
        let t = 5_000_000;
        let events = [
            connected(X, "V1", 1_000, 7),
            disconnected(X, "V1", 2_000, 7, Some(3_600)),
            connected(X, "V2", 3_000, 8),
            started(X, t),
            restarted(X, "V1", t, 60),
            restarted(X, "V2", t, u32::MAX),
        ];
        for reverse in [false, true] {
            let r = Region::default();
            let mut order: Vec<&PresenceEvent> = events.iter().collect();
            if reverse {
                order.reverse();
            }
            for ev in order {
                r.apply_at(ME, ev, t);
            }
            assert_eq!(
                r.held_at("V1", t + 59_999).as_deref(),
                Some(X),
                "reverse: {reverse}"
            );
            assert_eq!(r.held_at("V1", t + 60_000), None, "expired; reverse: {reverse}");
            assert_eq!(r.held_at("V2", u64::MAX).as_deref(), Some(X), "never expires");
        }
        // An announcement of an earlier start is stale too.
        let r = region(&[started(X, t), restarted(X, "V3", t - 1, 60)], t);
        assert_eq!(r.held_at("V3", t), None);
        // A restored session that expired already is not taken in.
        let r = region(&[restarted(X, "V4", t, 60)], t + 60_000);
        assert!(r.is_empty());
    }

    #[test]
    fn a_later_event_of_another_gateway_wins_over_a_restored_session() {
        let t = 5_000;
        // V1 connected to Y after X restarted, in both arrival orders: Y holds it.
        for events in [
            [restarted(X, "V1", t, 60), connected(Y, "V1", t + 10, 4)],
            [connected(Y, "V1", t + 10, 4), restarted(X, "V1", t, 60)],
        ] {
            let r = region(&events, t + 10);
            assert_eq!(r.held_at("V1", t + 10).as_deref(), Some(Y));
        }
        // V1 connected to Y while X was down: X's restored session is the later event.
        for events in [
            [restarted(X, "V1", t, 60), connected(Y, "V1", t - 10, 4)],
            [connected(Y, "V1", t - 10, 4), restarted(X, "V1", t, 60)],
        ] {
            let r = region(&events, t);
            assert_eq!(r.held_at("V1", t).as_deref(), Some(X));
        }
    }

    #[test]
    fn expired_entries_are_swept_at_most_once_per_interval() {
        let r = region(
            &[
                connected(X, "V1", 1_000, 7),
                disconnected(X, "V1", 1_000, 7, Some(10)),
                connected(X, "V2", 1_000, 8),
            ],
            1_000,
        );
        assert_eq!(r.len(), 2);
        // Expired at 11_000: no longer held, but swept only once the interval passed.
        r.apply_at(ME, &connected(Y, "V3", 12_000, 1), 12_000);
        assert_eq!(r.held_at("V1", 12_000), None);
        assert_eq!(r.len(), 3);
        r.apply_at(
            ME,
            &connected(Y, "V4", 1_000 + SWEEP_EVERY_MS, 2),
            1_000 + SWEEP_EVERY_MS,
        );
        assert_eq!(r.len(), 3, "V1 swept; V2, V3, V4 stay");
        assert_eq!(r.held_at("V2", u64::MAX).as_deref(), Some(X));
        // A kept session read after its expiry (the topic read again at start) is not
        // taken in at all.
        r.apply_at(ME, &connected(Y, "V5", 1_000, 3), 100_000);
        r.apply_at(ME, &disconnected(Y, "V5", 2_000, 3, Some(10)), 100_000);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn a_start_read_again_or_late_changes_nothing() {
        let r = region(&[started(X, 5_000), connected(X, "V1", 6_000, 1)], 6_000);
        r.apply_at(ME, &started(X, 5_000), 6_000);
        r.apply_at(ME, &started(X, 4_000), 6_000);
        assert_eq!(r.held_at("V1", 6_000).as_deref(), Some(X));
        // This gateway's own start is not about others.
        r.apply_at(ME, &started(ME, 7_000), 7_000);
        assert_eq!(r.held_at("V1", 7_000).as_deref(), Some(X));
    }
}
