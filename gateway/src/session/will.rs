//! Will messages and session expiry.
//!
//! A Will is published when its connection ends without a normal DISCONNECT (socket
//! loss, keep-alive timeout, protocol error, takeover, shutdown, DISCONNECT 0x04). With
//! an MQTT 5 Will Delay Interval it waits: a connection that resumes the session within
//! the delay cancels it, and the session ending first (expiry, clean start) publishes it
//! at once (§3.1.2.5). A published Will goes where a PUBLISH would: the journal when a
//! Kafka route matches, local subscribers, and the retained store when it is retained.
//! A delayed Will lives in memory only: a gateway restart within the delay loses it.

use std::sync::Arc;
use std::time::Duration;

use bridge::{Entry, Journal};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::state::{DelayedWill, SessionCell};
use crate::commands::Commands;
use crate::message::{now_ms, Message};
use crate::mqtt::packet::Will;
use crate::registry::Detached;
use crate::router::SessionKey;
use crate::state::Shared;
use crate::topic;

/// How long a Will waits for journal space when its connection closes.
const WILL_APPEND_WAIT: Duration = Duration::from_secs(5);

/// The connection of `cell` closed without a normal DISCONNECT: publish its Will now,
/// or after its delay if the session outlives the connection.
pub async fn on_close(
    shared: &Arc<Shared>,
    cell: &Arc<SessionCell>,
    user: Option<String>,
    will: Will,
    detached: &Detached,
) {
    let delay = will.delay_interval_secs;
    match detached {
        Detached::Kept if delay > 0 => {
            let cancel = CancellationToken::new();
            let stored = {
                let mut st = cell.lock();
                if st.gone {
                    // A clean start ended the session between the detach and here: the
                    // Will is due now (MQTT 5 §3.1.2.5), not after its delay.
                    Err((will, user))
                } else if st.owner.is_some() {
                    // Resumed already (between the detach and here): within the delay,
                    // so no Will.
                    return;
                } else {
                    st.delayed_will = Some(Box::new(DelayedWill {
                        will,
                        user,
                        cancel: cancel.clone(),
                    }));
                    Ok(st.expiry_secs)
                }
            };
            let expiry = match stored {
                Ok(expiry) => expiry,
                Err((will, user)) => {
                    publish(shared, &cell.key(), user.as_deref(), will).await;
                    return;
                }
            };
            let wait = Duration::from_secs(u64::from(delay.min(expiry)));
            let (shared, cell) = (shared.clone(), cell.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(wait) => {
                        let due = {
                            let mut st = cell.lock();
                            match &st.delayed_will {
                                Some(w) if !w.cancel.is_cancelled() && st.owner.is_none() => st.delayed_will.take(),
                                _ => None,
                            }
                        };
                        if let Some(w) = due {
                            publish(&shared, &cell.key(), w.user.as_deref(), w.will).await;
                        }
                    }
                }
            });
        }
        // Taken over and resumed by the new connection: a delayed Will is cancelled by
        // the resumption (§3.1.3.2.2); without a delay, or when the takeover's clean
        // start ended the session, it is due now.
        Detached::TakenOver if delay > 0 && !cell.lock().gone => {}
        _ => publish(shared, &cell.key(), user.as_deref(), will).await,
    }
}

/// Publishes a Will as its client would have: journaled when a route matches (checked
/// again against the ACL and routes), routed to local subscribers, retained if asked.
pub async fn publish(shared: &Arc<Shared>, key: &SessionKey, user: Option<&str>, w: Will) {
    let client_id = &key.id;
    let metrics = &shared.metrics;
    if topic::validate_name(&w.topic).is_err() || !shared.auth.may_publish_as(user, client_id, &w.topic) {
        metrics.unrouted.inc(if w.qos == 0 { "0" } else { "1" });
        warn!(client_id = %client_id, topic = ?w.topic, "Will not published: not allowed");
        return;
    }
    metrics.wills_published.inc();
    let now = now_ms();
    // An operator's Will on a vehicle's command topic is a command, as its live publish
    // would be: an outcome, and journaled only where a route names the topic.
    let vehicle = Commands::commanded(
        &shared.cfg.commands.mqtt_topic,
        &w.topic,
        client_id,
        w.retain,
        &w.payload,
    )
    .map(str::to_owned);
    if vehicle.is_some() && shared.commands.backlogged(shared.cfg.commands.max_pending) {
        // As its live publish would be: its outcome would wait in memory behind the
        // others (journal full or stalled). Counted in `gateway_commands_refused_backlog_total`.
        warn!(client_id = %client_id, topic = ?w.topic, "Will not published: a command, and commands.max_pending outcome records wait to be journaled");
        return;
    }
    let kafka = if vehicle.is_some() {
        shared.routes.routed(&w.topic)
    } else {
        shared.routes.accepts(&w.topic)
    };
    if kafka {
        let entry = Entry {
            kind: Default::default(),
            packet_id: None,
            received_at_ms: now,
            qos: w.qos,
            retain: w.retain,
            client_id: client_id.to_string(),
            topic: w.topic.clone(),
            payload: w.payload.clone(),
            content_type: w.props.content_type.clone(),
            message_expiry_secs: w.message_expiry_secs,
            user_properties: w.props.user_properties.clone(),
        };
        // A full journal must not hold the closing connection (and its slot) forever:
        // the Will waits for space a bounded time, then is counted lost.
        match timeout(WILL_APPEND_WAIT, shared.journal.append(&entry)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                bridge::counted!(warn, metrics.protocol_errors, "will_not_journaled", client_id = %client_id, error = %e, "will message could not be journaled");
            }
            Err(_) => {
                bridge::counted!(
                    warn,
                    metrics.protocol_errors,
                    "will_not_journaled",
                    client_id = %client_id,
                    wait_secs = WILL_APPEND_WAIT.as_secs(),
                    "will message not journaled: the journal stayed full"
                );
            }
        }
    }
    let msg = Arc::new(Message {
        topic: w.topic,
        payload: w.payload,
        qos: w.qos,
        retain: w.retain,
        props: w.props,
        received_at_ms: now,
        expires_at_ms: w.message_expiry_secs.map(|s| now + u64::from(s) * 1000),
    });
    match &vehicle {
        Some(v) => {
            shared.commands.issue_published(shared, &msg, v, key);
        }
        None => {
            shared.router.route(
                &msg,
                Some(key),
                &shared.registry,
                &shared.cfg.sessions,
                &shared.store,
                metrics,
            );
        }
    }
    // A Will stored before retained Wills on command topics were refused at CONNECT is
    // still delivered, but not retained.
    let on_command_topic = !msg.payload.is_empty()
        && Commands::vehicle_of(&shared.cfg.commands.mqtt_topic, &msg.topic).is_some();
    if msg.retain && on_command_topic {
        bridge::counted!(warn, metrics.retained_refused, "command_topic", client_id = %client_id, topic = ?msg.topic, "retained Will not retained: a command topic");
    } else if msg.retain && shared.cfg.retained.enabled {
        if let Err(reason) = shared
            .router
            .retain(&msg, &shared.cfg.retained, &shared.store, metrics)
        {
            metrics.retained_refused.inc(reason);
        }
    }
}

/// Removes expired persistent sessions every `sessions.expiry_check_secs`, publishing
/// Wills that were still waiting for their delay, and ends the commands whose expiry
/// passed in a session (queued, or in flight and not acknowledged).
pub async fn expire_sessions(shared: Arc<Shared>) {
    let every = Duration::from_secs(shared.cfg.sessions.expiry_check_secs);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // Off the async workers: the pass locks every session and the store writes are
        // blocking (a worker stalled here would delay the PUBACKs of its sessions).
        let sh = shared.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let now = crate::message::now_ms();
            let found = sh.registry.sweep_due(now);
            let ended: usize = found
                .holding
                .iter()
                .map(|c| c.expire_commands(now, &sh.store, &sh.metrics))
                .sum();
            let due = sh
                .registry
                .expired(found.expired, now, &sh.router, &sh.store, &sh.metrics);
            (ended, due)
        })
        .await;
        let (ended, due) = match swept {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "session expiry sweep panicked; retrying at the next interval");
                continue;
            }
        };
        if ended > 0 {
            info!(commands = ended, "commands expired in sessions that held them");
        }
        for (key, w) in due {
            info!(client_id = %key.id, "session expired before its Will delay: publishing the Will");
            publish(&shared, &key, w.user.as_deref(), w.will).await;
        }
    }
}
