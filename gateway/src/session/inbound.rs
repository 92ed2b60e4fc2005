//! What the client sends: PUBLISH (journal for Kafka, route to local subscribers,
//! retain), SUBSCRIBE / UNSUBSCRIBE, the QoS 2 release, PINGREQ and DISCONNECT.

use std::sync::Arc;
use std::time::Duration;

use bridge::{Entry, TryAppend};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::warn;

use super::{AckKind, Close, ReadReady, Session, MAX_STORED_TOPIC_BYTES, PUBLISH_BURST, STORE_WAIT};
use crate::commands::Commands;
use crate::message::{now_ms, Message};
use crate::mqtt::codec::Granted;
use crate::mqtt::packet::SubscribeFilter;
use crate::mqtt::{Inbound, ProtocolError, PublishRequest, Version};
use crate::router::trie::{parse_filter, FilterKind};
use crate::router::SubOptions;
use crate::session::state::{OutItem, Qos2In};
use crate::topic;

/// The handling of a packet that waits (for the journal, the store or a rate limit).
type Waiting<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Close>> + Send + 'a>>;

/// A PUBLISH that passed its checks, on its way to the journal (if a route takes it) and
/// then to delivery and its acknowledgement.
struct Accepted {
    p: PublishRequest,
    /// When it was read: PUBACK latency counts from here.
    taken: std::time::Instant,
    /// Its topic (the alias resolved).
    topic: String,
    /// The message for local delivery, when anything here may take it.
    msg: Option<Arc<Message>>,
    /// Journaled for Kafka.
    kafka: bool,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Handles every complete packet in the read buffer, pausing a 3.1.1 client at the
    /// in-flight bound.
    pub(super) async fn process_buffered(&mut self, max_inflight: usize) -> Result<(), Close> {
        loop {
            // A connection taken over handles nothing more: its buffered SUBSCRIBEs must
            // not reach the router on behalf of the new session.
            if let Some(close) = self.ended() {
                return Err(close);
            }
            if self.codec.version == Version::V4 && !self.inbound_room(max_inflight) {
                return Ok(());
            }
            let packet = match self.codec.decode(&mut self.read_buf) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Close::Protocol(e)),
            };
            self.touch();
            if let Some(waiting) = self.handle(packet, max_inflight)? {
                waiting.await?;
            }
            // Time spent waiting inside `handle` (journal back-pressure) was ours, not the
            // client's silence.
            self.touch();
        }
    }

    /// Handles a packet, or returns the boxed handling of one that waits (PUBLISH for
    /// durability, SUBSCRIBE / UNSUBSCRIBE for the store): an idle vehicle's future then
    /// holds neither a packet nor room for its handling, only this box while it runs.
    fn handle(&mut self, packet: Inbound, max_inflight: usize) -> Result<Option<Waiting<'_>>, Close> {
        let waiting: Waiting<'_> = match packet {
            Inbound::Publish(p) => return self.publish(p, max_inflight),
            Inbound::Subscribe {
                pkid,
                filters,
                subscription_id,
            } => Box::pin(self.subscribe(pkid, filters, subscription_id)),
            Inbound::Unsubscribe { pkid, filters } => Box::pin(self.unsubscribe(pkid, filters)),
            Inbound::PingReq => {
                self.codec.pingresp(&mut self.out);
                return Ok(None);
            }
            Inbound::PubAck { pkid, reason } => {
                self.on_puback(pkid, reason);
                return Ok(None);
            }
            Inbound::PubRec { pkid, reason } => return self.on_pubrec(pkid, reason).map(|()| None),
            Inbound::PubComp { pkid, .. } => {
                self.on_pubcomp(pkid);
                return Ok(None);
            }
            Inbound::PubRel { pkid, .. } => {
                self.bound_owed(max_inflight)?;
                return self.release(pkid).map(|()| None);
            }
            Inbound::Disconnect {
                reason,
                session_expiry_secs,
            } => {
                if let Some(expiry) = session_expiry_secs {
                    self.set_expiry(expiry)?;
                }
                if reason == 0x04 {
                    return Err(Close::DisconnectWithWill);
                }
                self.will = None;
                return Err(Close::ClientDisconnect);
            }
            Inbound::Connect(_) => {
                return Err(Close::Protocol(ProtocolError::protocol(
                    "second_connect",
                    "second CONNECT",
                )))
            }
            Inbound::Auth => {
                return Err(Close::Protocol(ProtocolError {
                    reason: 0x8C,
                    label: "auth_not_supported",
                    detail: "enhanced authentication (AUTH) is not supported".into(),
                }))
            }
            Inbound::ServerOnly => {
                return Err(Close::Protocol(ProtocolError::protocol(
                    "server_packet",
                    "client sent a server-only packet",
                )))
            }
        };
        Ok(Some(waiting))
    }

    /// DISCONNECT with a Session Expiry Interval (MQTT 5 §3.14.2.2.2): not from 0.
    fn set_expiry(&mut self, expiry: u32) -> Result<(), Close> {
        if self.connect_expiry == 0 && expiry != 0 {
            return Err(Close::Protocol(ProtocolError::protocol(
                "session_expiry_from_zero",
                "DISCONNECT sets a Session Expiry Interval after CONNECT set 0",
            )));
        }
        let expiry = expiry.min(self.shared.cfg.sessions.max_expiry_secs);
        let (store, metrics) = (&self.shared.store, &self.shared.metrics);
        let mut st = self.cell.lock();
        // Checked under the lock the change is made under: a successor that took the
        // session meanwhile (the DISCONNECT was read before its CONNECT won) keeps the
        // expiry its CONNECT asked for, and one that started clean keeps its new record.
        // The DISCONNECT itself still counts: no Will after a normal disconnect.
        if !st.owned_by(self.info.conn) {
            drop(st);
            self.will = None;
            return Err(Close::TakenOver);
        }
        let was = st.expiry_secs;
        st.expiry_secs = expiry;
        if was > 0 && expiry == 0 {
            metrics.sessions_persistent.dec();
            // Still under the lock: a clean start discards this cell (under it) before it
            // writes its own record, so this removal cannot delete the successor's.
            if let Err(e) = store.remove_session(&self.cell.client_id) {
                super::state::store_failed(metrics, &self.cell.client_id, &e);
            }
            return Ok(());
        }
        drop(st);
        self.cell
            .persist(store, metrics)
            .map_err(|e| Close::StoreFailed(e.to_string()))?;
        Ok(())
    }

    /// Acknowledgements owed are bounded: a client sending PUBRELs for unknown ids or
    /// re-sending QoS 2 duplicates faster than they become durable is cut off.
    fn bound_owed(&self, max_inflight: usize) -> Result<(), Close> {
        if self.owed_to_client() >= 2 * max_inflight {
            return Err(Close::Protocol(ProtocolError {
                reason: 0x93,
                label: "too_many_unacknowledged",
                detail: format!("more than {} acknowledgements owed", 2 * max_inflight),
            }));
        }
        Ok(())
    }

    /// PUBREL: the client releases a QoS 2 packet id; PUBCOMP once that is flushed (a
    /// crash must not leave the id marked, or the client's next message under it would
    /// be taken for a duplicate).
    fn release(&mut self, pkid: u16) -> Result<(), Close> {
        let known = {
            let mut st = self.cell.lock();
            if !st.owned_by(self.info.conn) {
                return Err(Close::TakenOver);
            }
            st.inbound_qos2.remove(&pkid).is_some()
        };
        if known {
            if self.cell.lock().persistent() {
                // Before the record's change: from here the record alone says whether
                // the id is held (`journal_qos2`).
                self.shared
                    .store
                    .remove_qos2_pending(&self.cell.client_id, pkid)
                    .map_err(|e| Close::StoreFailed(e.to_string()))?;
            }
            if let Some(g) = self
                .cell
                .persist(&self.shared.store, &self.shared.metrics)
                .map_err(|e| Close::StoreFailed(e.to_string()))?
            {
                self.last_gen = self.last_gen.max(g);
            }
        }
        self.owe(AckKind::Complete, pkid, if known { 0 } else { 0x92 });
        Ok(())
    }

    async fn subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        id: Option<u32>,
    ) -> Result<(), Close> {
        let shared = self.shared.clone();
        let (cfg, metrics) = (&shared.cfg, &shared.metrics);
        let max = cfg.mqtt.max_subscriptions;
        let mut granted = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for f in filters {
            let kind = match parse_filter(&f.filter) {
                Ok(k) => k,
                Err(_) => {
                    metrics.subscribe_refused.inc("filter_invalid");
                    granted.push(Granted::FilterInvalid);
                    continue;
                }
            };
            let (inner, shared_sub) = match kind {
                FilterKind::Plain(f) => (f.to_string(), false),
                FilterKind::Shared { filter, .. } => (filter.to_string(), true),
            };
            if shared_sub && f.no_local {
                // MQTT 5 §3.8.3.1: No Local on a shared subscription is a protocol error.
                return Err(Close::Protocol(ProtocolError::protocol(
                    "shared_no_local",
                    "No Local set on a shared subscription",
                )));
            }
            if !shared
                .auth
                .may_subscribe_as(self.user.as_deref(), &self.cell.client_id, &inner)
            {
                metrics.subscribe_refused.inc("not_authorized");
                granted.push(Granted::NotAuthorized);
                continue;
            }
            let exists = self.cell.lock().subscriptions.contains_key(&f.filter);
            let count = self.cell.lock().subscriptions.len();
            if !exists && (count >= max || self.stored_bytes() + f.filter.len() > MAX_STORED_TOPIC_BYTES) {
                metrics.subscribe_refused.inc("quota_exceeded");
                granted.push(Granted::QuotaExceeded);
                continue;
            }
            let opts = SubOptions {
                qos: f.qos.min(cfg.mqtt.max_qos),
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
                retain_handling: f.retain_handling,
                id,
            };
            if !self.cell.owned_by(self.info.conn) {
                return Err(self.ended().unwrap_or(Close::TakenOver));
            }
            let replaced = match shared.router.subscribe(&self.cell.key(), &f.filter, opts) {
                Ok(r) => r,
                Err(_) => {
                    metrics.subscribe_refused.inc("filter_invalid");
                    granted.push(Granted::FilterInvalid);
                    continue;
                }
            };
            {
                let mut st = self.cell.lock();
                if !st.owned_by(self.info.conn) {
                    // Taken over (or discarded by a clean start) while this subscribed:
                    // the filter must not stay in the router on behalf of a session this
                    // connection no longer holds.
                    drop(st);
                    if !replaced {
                        shared.router.unsubscribe(&self.cell.key(), &f.filter);
                    }
                    return Err(self.ended().unwrap_or(Close::TakenOver));
                }
                st.subscriptions.insert(f.filter.clone(), opts);
            }
            if !replaced {
                self.set_stored_bytes(self.stored_bytes() + f.filter.len());
                metrics.subscriptions_active.inc();
            }
            // Retained messages (§3.3.1.3): not for shared subscriptions; handling 1 only
            // for a new subscription, 2 never.
            let send = !shared_sub && (opts.retain_handling == 0 || (opts.retain_handling == 1 && !replaced));
            if send && cfg.retained.enabled {
                for m in shared.router.retained_for(&inner) {
                    retained.push((m, opts));
                }
            }
            granted.push(Granted::Qos(opts.qos));
        }
        if !self.quota_logged && granted.contains(&Granted::QuotaExceeded) {
            self.quota_logged = true;
            warn!(client_id = %self.cell.client_id, peer = %self.info.peer, max, "SUBSCRIBE filters refused beyond mqtt.max_subscriptions (logged once per session; counted in gateway_subscribe_refused_total)");
        }
        self.persist_and_wait().await?;
        self.codec.suback(&mut self.out, pkid, &granted);
        // After the SUBACK: the retained messages follow it.
        for (m, opts) in retained {
            let qos = m.qos.min(opts.qos);
            let item = OutItem::new(m, qos, true, opts.id.into_iter().collect());
            if let super::state::Offer::Dropped(reason) =
                self.cell.offer(item, &cfg.sessions, &shared.store, metrics)
            {
                metrics.messages_dropped.inc(reason);
            }
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, pkid: u16, filters: Vec<String>) -> Result<(), Close> {
        let shared = self.shared.clone();
        let mut existed = Vec::with_capacity(filters.len());
        for f in &filters {
            let had = {
                let mut st = self.cell.lock();
                if !st.owned_by(self.info.conn) {
                    return Err(Close::TakenOver);
                }
                st.subscriptions.remove(f).is_some()
            };
            if had {
                shared.router.unsubscribe(&self.cell.key(), f);
                self.set_stored_bytes(self.stored_bytes().saturating_sub(f.len()));
                shared.metrics.subscriptions_active.dec();
            }
            existed.push(had);
        }
        self.persist_and_wait().await?;
        self.codec.unsuback(&mut self.out, pkid, &existed);
        Ok(())
    }

    /// Writes the session record (persistent sessions) and waits, bounded, until the
    /// store flushed it: a SUBACK promises the subscription survives a crash.
    async fn persist_and_wait(&mut self) -> Result<(), Close> {
        let persisted = self
            .cell
            .persist(&self.shared.store, &self.shared.metrics)
            .map_err(|e| Close::StoreFailed(e.to_string()))?;
        let Some(gen) = persisted else {
            return Ok(());
        };
        let store = self.shared.store.clone();
        tokio::select! {
            biased;
            _ = self.shared.shutdown.cancelled() => Err(Close::Shutdown),
            _ = self.cell.lost_by(self.info.conn) => Err(Close::TakenOver),
            r = tokio::time::timeout(STORE_WAIT, store.wait_flushed(gen)) => match r {
                Ok(Ok(())) => Ok(()),
                // Not acknowledged as kept: the client resubscribes when it reconnects.
                Ok(Err(e)) => Err(Close::StoreFailed(e.to_string())),
                Err(_) => Err(Close::StoreFailed(format!(
                    "the session store did not flush a subscription change within {} s",
                    STORE_WAIT.as_secs()
                ))),
            },
        }
    }

    /// A refused PUBLISH: MQTT 5 acknowledgement with a reason (QoS > 0), nothing for
    /// QoS 0, and a closed connection for 3.1.1 QoS > 0 (which cannot be refused).
    fn refuse_publish(&mut self, p: &PublishRequest, why: ProtocolError) -> Result<(), Close> {
        let reason = why.reason;
        match (self.codec.version, p.qos) {
            (_, 0) => Ok(()),
            (Version::V5, 1) => {
                self.owe(AckKind::Ack, p.pkid, reason);
                Ok(())
            }
            (Version::V5, _) => {
                self.owe(AckKind::Received, p.pkid, reason);
                Ok(())
            }
            (Version::V4, _) => Err(Close::Protocol(why)),
        }
    }

    /// Handles a PUBLISH: at once when nothing makes it wait (the usual case: no future
    /// is allocated for it, and a boxed future the size of this handling costs glibc a
    /// trip past its per-thread cache on every message), else as a boxed future that
    /// waits for its pace (`mqtt.max_publish_rate`) or for journal space, then goes on.
    fn publish(&mut self, p: PublishRequest, max_inflight: usize) -> Result<Option<Waiting<'_>>, Close> {
        // PUBACK latency counts from here: throttling, waiting for journal space and the
        // group commit are all part of what the vehicle waits for.
        let taken = std::time::Instant::now();
        super::state::ConnInfo::add(&self.info.messages_in, 1);
        if let Some(ahead) = self.pace_ahead() {
            return Ok(Some(Box::pin(async move {
                self.paced(ahead).await?;
                match self.publish_paced(p, max_inflight, taken)? {
                    Some(waiting) => waiting.await,
                    None => Ok(()),
                }
            })));
        }
        self.publish_paced(p, max_inflight, taken)
    }

    /// A PUBLISH within its pace: checked, journaled if a route takes it (waiting for
    /// journal space only in the returned future), then routed and owed its
    /// acknowledgement.
    fn publish_paced(
        &mut self,
        p: PublishRequest,
        max_inflight: usize,
        taken: std::time::Instant,
    ) -> Result<Option<Waiting<'_>>, Close> {
        let Some((accepted, entry)) = self.check_publish(p, max_inflight, taken)? else {
            return Ok(None);
        };
        let Some(entry) = entry else {
            return self.deliver_publish(accepted).map(|()| None);
        };
        // As the slow path's select does: a connection taken over (or the gateway
        // shutting down) since this packet was read journals nothing more.
        if let Some(close) = self.ended() {
            return Err(close);
        }
        if accepted.p.qos == 2 && self.cell.lock().persistent() {
            return Ok(Some(Box::pin(self.journal_qos2(accepted, entry))));
        }
        let shared = self.shared.clone();
        let appended = match shared.journal.try_append_with(&entry, shared.full_policy) {
            Ok(TryAppend::Appended(seq)) => Ok(Some(seq)),
            Ok(TryAppend::Rejected) => Ok(None),
            Err(e) => Err(e),
            Ok(TryAppend::Full) => {
                return Ok(Some(Box::pin(async move {
                    // Waiting for journal space must not make the session deaf to a
                    // takeover or to shutdown. Cancelling the wait is safe: admission is
                    // synchronous, so nothing was appended yet.
                    let appended = tokio::select! {
                        biased;
                        _ = shared.shutdown.cancelled() => return Err(Close::Shutdown),
                        _ = self.cell.lost_by(self.info.conn) => return Err(Close::TakenOver),
                        r = shared.journal.append_with(&entry, shared.full_policy) => r,
                    };
                    self.journaled(accepted, appended)
                })));
            }
        };
        self.journaled(accepted, appended).map(|()| None)
    }

    /// A persistent session's QoS 2 PUBLISH: a marker (client id, packet id, the journal's
    /// last accepted sequence, this connection) is flushed to the store *before* the
    /// record is appended; it is removed at the vehicle's PUBREL, or at once if the
    /// PUBLISH was not journaled after all.
    ///
    /// The record's fsync and the store's flush of the id otherwise race: a crash after
    /// the first and before the second (both precede the PUBREC, so the vehicle re-sends)
    /// left a journaled message whose id the restored session did not know, and the
    /// re-send was journaled again: Kafka got it twice. With the marker, the restart looks
    /// in the journal after the marker's sequence for this client's record with this
    /// packet id (these records carry it) and restores the id if it is there
    /// (`server::restore`). The price: the store's flush and the journal's fsync one after
    /// the other for these publishes, not side by side.
    async fn journal_qos2(&mut self, accepted: Accepted, mut entry: Entry) -> Result<(), Close> {
        let shared = self.shared.clone();
        let client_id = self.cell.client_id.clone();
        let (pkid, conn) = (accepted.p.pkid, self.info.conn);
        entry.packet_id = Some(pkid);
        // The last sequence the journal accepted, durable or not: an earlier message
        // under this id (a session started clean reuses ids) lies at or before it.
        let after = bridge::Journal::stats(&*shared.journal)
            .next_seq
            .saturating_sub(1);
        let gen = shared
            .store
            .put_qos2_pending(&client_id, pkid, after, conn)
            .map_err(|e| Close::StoreFailed(e.to_string()))?;
        let before = self.last_seq;
        let done = async {
            tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return Err(Close::Shutdown),
                _ = self.cell.lost_by(conn) => return Err(Close::TakenOver),
                r = tokio::time::timeout(super::STORE_WAIT, shared.store.wait_flushed(gen)) => match r {
                    Ok(r) => r.map_err(|e| Close::StoreFailed(e.to_string()))?,
                    Err(_) => return Err(Close::StoreFailed("the store did not flush within its bound".into())),
                },
            }
            // Cancelling this wait is safe: admission is synchronous, nothing is appended
            // until it returns.
            let appended = tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return Err(Close::Shutdown),
                _ = self.cell.lost_by(conn) => return Err(Close::TakenOver),
                r = shared.journal.append_with(&entry, shared.full_policy) => r,
            };
            self.journaled(accepted, appended)
        }
        .await;
        if self.last_seq == before {
            // Not journaled (refused, or the connection ended first): this connection's
            // marker goes. Journaled, it stays until the vehicle's PUBREL (`release`),
            // so that a crash before the session record holding the id is flushed can be
            // told from one after the id was released.
            if let Err(e) = shared.store.withdraw_qos2_pending(&client_id, pkid, conn) {
                super::state::store_failed(&shared.metrics, &client_id, &e);
            }
        }
        done
    }

    /// The checks a PUBLISH passes before it is journaled (QoS, QoS 2 duplicate, alias,
    /// topic, Receive Maximum, ACL, retain rules), and what it becomes: the message for
    /// local delivery and the journal entry, if a route takes it. `None`: handled already
    /// (a QoS 2 re-send answered, or refused with a reason).
    fn check_publish(
        &mut self,
        p: PublishRequest,
        max_inflight: usize,
        taken: std::time::Instant,
    ) -> Result<Option<(Accepted, Option<Entry>)>, Close> {
        let shared = self.shared.clone();
        let metrics = &shared.metrics;
        if p.qos > shared.cfg.mqtt.max_qos {
            return Err(Close::Protocol(ProtocolError {
                reason: 0x9B,
                label: "qos_not_supported",
                detail: format!("QoS {} above the maximum QoS {}", p.qos, shared.cfg.mqtt.max_qos),
            }));
        }
        let duplicate = if p.qos == 2 {
            self.cell.lock().inbound_qos2.get(&p.pkid).copied()
        } else {
            None
        };
        if let Some(first) = duplicate {
            // Re-sent before PUBREL: already journaled and routed once. Answered again,
            // behind what the first copy's PUBREC waits for (it may be another
            // connection's append, not durable yet).
            self.bound_owed(max_inflight)?;
            metrics.qos2_duplicates.inc();
            self.pending.push_back(super::Pending {
                kind: AckKind::Received,
                pkid: p.pkid,
                seq: first.seq.max(self.last_seq),
                gen: first.gen.max(self.last_gen),
                reason: 0,
                since: None,
            });
            return Ok(None);
        }
        let alias = self.alias_slot(&p).map_err(Close::Protocol)?;
        let topic = match alias {
            Some(slot) if p.topic.is_empty() => self
                .aliases
                .as_ref()
                .and_then(|a| a.inbound.get(slot))
                .cloned()
                .flatten()
                .ok_or_else(|| {
                    Close::Protocol(ProtocolError::protocol(
                        "topic_alias_unknown",
                        format!("topic alias {} was never set", slot + 1),
                    ))
                })?,
            _ => p.topic.clone(),
        };
        topic::validate_name(&topic).map_err(|e| Close::Protocol(ProtocolError::topic_invalid(e)))?;
        // Receive Maximum counts QoS 1 and 2 publishes until PUBACK / PUBCOMP (§4.9). A
        // 3.1.1 client has none: it is paused on owed acknowledgements instead, and its
        // QoS 2 ids waiting for PUBREL are capped at 4 × mqtt.max_inflight.
        let over = match self.codec.version {
            Version::V5 => self.client_inflight() >= max_inflight,
            Version::V4 => p.qos == 2 && self.cell.lock().inbound_qos2.len() >= 4 * max_inflight,
        };
        if p.qos > 0 && over {
            return Err(Close::Protocol(ProtocolError {
                reason: 0x93,
                label: "receive_maximum_exceeded",
                detail: format!("more than {max_inflight} unacknowledged QoS 1/2 publishes"),
            }));
        }
        let qos_label = super::state::qos_label(p.qos);
        if !shared
            .auth
            .may_publish_as(self.user.as_deref(), &self.cell.client_id, &topic)
        {
            metrics.acl_denied.inc(qos_label);
            warn!(client_id = %self.cell.client_id, peer = %self.info.peer, topic, qos = p.qos, "publish denied by the publish ACL");
            let detail = format!("not authorised to publish to {topic}");
            return self
                .refuse_publish(
                    &p,
                    ProtocolError {
                        reason: 0x87,
                        label: "not_authorized",
                        detail,
                    },
                )
                .map(|()| None);
        }
        if p.retain && !shared.cfg.retained.enabled {
            // MQTT 5 §3.3.1.3: Retain Available is 0, a retained PUBLISH is a protocol error.
            metrics.retained_refused.inc("disabled");
            return Err(Close::Protocol(ProtocolError {
                reason: 0x9A,
                label: "retain_not_supported",
                detail: "retained messages are disabled (retained.enabled = false)".into(),
            }));
        }
        if p.retain && !shared.auth.may_retain(self.user.as_deref()) {
            bridge::counted!(warn, metrics.retained_refused, "not_allowed", client_id = %self.cell.client_id, peer = %self.info.peer, topic, "retained publish refused: auth.allow_retain");
            let detail = format!("not authorised to retain on {topic}");
            return self
                .refuse_publish(
                    &p,
                    ProtocolError {
                        reason: 0x87,
                        label: "retain_not_allowed",
                        detail,
                    },
                )
                .map(|()| None);
        }
        // A command is for now, once: retained, it would be replayed to the vehicle on
        // every later subscription (an old "unlock" after each reconnect), with no
        // outcome. Clearing one (empty payload) stays allowed.
        if p.retain
            && !p.payload.is_empty()
            && Commands::vehicle_of(&shared.cfg.commands.mqtt_topic, &topic).is_some()
        {
            bridge::counted!(warn, metrics.retained_refused, "command_topic", client_id = %self.cell.client_id, peer = %self.info.peer, topic, "retained publish refused: a command topic");
            let detail = format!("commands are not retained ({topic} is a command topic)");
            return self
                .refuse_publish(
                    &p,
                    ProtocolError {
                        reason: 0x87,
                        label: "retain_on_command_topic",
                        detail,
                    },
                )
                .map(|()| None);
        }
        // Only a topic that is valid and allowed may be remembered under an alias.
        if let Some(slot) = alias.filter(|_| !p.topic.is_empty()) {
            let aliases = &mut self.aliases.get_or_insert_with(Box::default).inbound;
            if aliases.len() <= slot {
                aliases.resize(slot + 1, None);
            }
            let replaced = aliases[slot].as_ref().map_or(0, String::len);
            let held = self.stored_bytes();
            let stored = held - replaced.min(held) + topic.len();
            if stored > MAX_STORED_TOPIC_BYTES {
                return Err(Close::Protocol(ProtocolError {
                    reason: 0x97,
                    label: "topic_alias_quota",
                    detail: format!(
                        "alias topics and subscriptions would hold {stored} bytes, more than {MAX_STORED_TOPIC_BYTES}"
                    ),
                }));
            }
            self.set_stored_bytes(stored);
            if let Some(a) = self.aliases.as_mut().and_then(|a| a.inbound.get_mut(slot)) {
                *a = Some(topic.clone());
            }
        }
        let now = now_ms();
        // An operator's publish to a vehicle's command topic is a command: its copy for
        // the vehicle reports an outcome like a command from Kafka or REST.
        let vehicle = self.commanded(&topic, &p);
        let local = p.retain || vehicle.is_some() || shared.router.subscriptions() > 0;
        let msg = local.then(|| {
            Arc::new(Message {
                topic: topic.clone(),
                payload: p.payload.clone(),
                qos: p.qos,
                retain: p.retain,
                props: p.props.clone(),
                received_at_ms: now,
                expires_at_ms: p.message_expiry_secs.map(|s| now + u64::from(s) * 1000),
            })
        });
        // A command is not telemetry: it reaches Kafka as its outcome record (like a
        // REST command), and its payload only where a `[[routes]]` entry names command
        // topics, never through `kafka.unmatched`'s default topic. (Journaling it cost a
        // second record, fsync'd and produced, per command, and delivered nothing: a
        // record in the default topic brings no command back after a crash.)
        let kafka = if vehicle.is_some() {
            shared.routes.routed(&topic)
        } else {
            shared.routes.accepts(&topic)
        };
        if vehicle.is_some() && !kafka && shared.journal_stopped() {
            // Its outcome could not be journaled: not accepted.
            return Err(Close::JournalStopped("the journal has stopped".into()));
        }
        if vehicle.is_some() && shared.commands.backlogged(shared.cfg.commands.max_pending) {
            // Its outcome would wait in memory behind the others (journal full or
            // stalled): refused like a publish over a quota (3.1.1 QoS 1/2: closed).
            warn!(client_id = %self.cell.client_id, peer = %self.info.peer, topic, "command refused: commands.max_pending outcome records wait to be journaled");
            let detail = "command outcomes wait to be journaled (commands.max_pending)".to_string();
            return self
                .refuse_publish(
                    &p,
                    ProtocolError {
                        reason: 0x97,
                        label: "commands_backlogged",
                        detail,
                    },
                )
                .map(|()| None);
        }
        let entry = kafka.then(|| Entry {
            kind: Default::default(),
            // Set by `journal_qos2` for a persistent session's QoS 2 record only: a
            // record with it is not readable by builds from before it existed.
            packet_id: None,
            received_at_ms: now,
            qos: p.qos,
            retain: p.retain,
            client_id: self.cell.client_id.to_string(),
            topic: topic.clone(),
            payload: p.payload.clone(),
            content_type: p.props.content_type.clone(),
            message_expiry_secs: p.message_expiry_secs,
            user_properties: p.props.user_properties.clone(),
        });
        Ok(Some((
            Accepted {
                p,
                taken,
                topic,
                msg,
                kafka,
            },
            entry,
        )))
    }

    /// What the journal said to a PUBLISH's record: refused (too large to journal, or
    /// the journal full under `journal.full_policy = "reject"`), the journal stopped,
    /// or appended, and then delivered.
    fn journaled(
        &mut self,
        a: Accepted,
        appended: Result<Option<u64>, bridge::JournalError>,
    ) -> Result<(), Close> {
        let metrics = &self.shared.metrics;
        match appended {
            // Too large to journal (an aliased topic plus a payload larger than a
            // segment): refused, never acknowledged as stored, not a disconnect loop.
            Err(e @ (bridge::JournalError::TooLarge { .. } | bridge::JournalError::Encode(_))) => {
                bridge::counted!(warn, metrics.protocol_errors, "record_too_large", client_id = %self.cell.client_id, peer = %self.info.peer, error = %e, qos = a.p.qos, "publish refused: too large to journal");
                let (reason, label) = if self.codec.version == Version::V5 {
                    (0x83, "record_too_large")
                } else {
                    (0x95, "record_too_large")
                };
                self.refuse_publish(
                    &a.p,
                    ProtocolError {
                        reason,
                        label,
                        detail: e.to_string(),
                    },
                )
            }
            Err(e) => Err(Close::JournalStopped(e.to_string())),
            Ok(None) => {
                // Journal full under the `reject` policy: refused, not acknowledged.
                metrics.journal_rejected.inc(super::state::qos_label(a.p.qos));
                let detail = "journal full (journal.full_policy = \"reject\")".to_string();
                self.refuse_publish(
                    &a.p,
                    ProtocolError {
                        reason: 0x97,
                        label: "journal_full",
                        detail,
                    },
                )
            }
            Ok(Some(seq)) => {
                self.last_seq = seq;
                self.deliver_publish(a)
            }
        }
    }

    /// A PUBLISH accepted (and journaled, if a route takes it): routed to local
    /// subscribers (or, a command, to its vehicle), retained if asked, and owed its
    /// acknowledgement.
    fn deliver_publish(&mut self, a: Accepted) -> Result<(), Close> {
        let shared = self.shared.clone();
        let metrics = &shared.metrics;
        let Accepted {
            p,
            taken,
            topic,
            msg,
            kafka,
        } = a;
        let qos_label = super::state::qos_label(p.qos);
        // The same rule as in `check_publish`, on the same inputs.
        let vehicle = self.commanded(&topic, &p);
        let len = p.payload.len() as u64;
        let mut matched = 0;
        if let Some(msg) = &msg {
            let key = self.cell.key();
            let routed = match vehicle {
                Some(v) => shared.commands.issue_published(&shared, msg, v, &key),
                None => shared.router.route(
                    msg,
                    Some(&key),
                    &shared.registry,
                    &shared.cfg.sessions,
                    &shared.store,
                    metrics,
                ),
            };
            matched = routed.matched;
            if let Some(g) = routed.gen {
                self.last_gen = self.last_gen.max(g);
            }
            if p.retain {
                match shared
                    .router
                    .retain(msg, &shared.cfg.retained, &shared.store, metrics)
                {
                    Ok(Some(g)) => self.last_gen = self.last_gen.max(g),
                    Ok(None) => {}
                    Err(reason) => {
                        metrics.retained_refused.inc(reason);
                        warn!(client_id = %self.cell.client_id, peer = %self.info.peer, topic, reason, "retained message not stored ([retained] bounds)");
                    }
                }
            }
        }
        if !kafka && matched == 0 && !p.retain && vehicle.is_none() {
            // kafka.unmatched = "refuse" and nobody here subscribes: never silent, never
            // acknowledged as stored.
            metrics.unrouted.inc(qos_label);
            warn!(
                client_id = %self.cell.client_id, peer = %self.info.peer,
                topic,
                "publish refused: no route to Kafka (kafka.unmatched = \"refuse\") and no subscriber"
            );
            let detail = format!("no route to Kafka for {topic} (kafka.unmatched = \"refuse\")");
            return self.refuse_publish(
                &p,
                ProtocolError {
                    reason: 0x90,
                    label: "no_route",
                    detail,
                },
            );
        }
        metrics.message_bytes_received.inc_by(len);
        match p.qos {
            0 => {
                metrics.messages_received[0].inc();
            }
            1 => {
                metrics.messages_received[1].inc();
                self.owe_since(AckKind::Ack, p.pkid, 0, Some(taken));
            }
            _ => {
                metrics.messages_received[2].inc();
                // The journal sequence the id depends on (0: nothing journaled, local only).
                let seq = if kafka { self.last_seq } else { 0 };
                self.cell.lock().inbound_qos2.insert(
                    p.pkid,
                    Qos2In {
                        seq,
                        gen: self.last_gen,
                    },
                );
                let persisted = self
                    .cell
                    .persist(&shared.store, metrics)
                    .map_err(|e| Close::StoreFailed(e.to_string()))?;
                if let Some(g) = persisted {
                    self.last_gen = self.last_gen.max(g);
                    if let Some(q) = self.cell.lock().inbound_qos2.get_mut(&p.pkid) {
                        q.gen = self.last_gen;
                    }
                }
                self.owe_since(AckKind::Received, p.pkid, 0, Some(taken));
            }
        }
        Ok(())
    }

    /// The vehicle this client's publish `p` to `topic` commands, if any
    /// ([`Commands::commanded`]).
    fn commanded<'t>(&self, topic: &'t str, p: &PublishRequest) -> Option<&'t str> {
        Commands::commanded(
            &self.shared.cfg.commands.mqtt_topic,
            topic,
            &self.cell.client_id,
            p.retain,
            &p.payload,
        )
    }

    /// MQTT 5 topic aliases (§3.3.2.3.4): a non-empty topic with an alias sets it (once
    /// the topic passed validation and the ACL); an empty topic uses it. Returns the
    /// alias's slot, checked against the advertised maximum.
    fn alias_slot(&self, p: &PublishRequest) -> Result<Option<usize>, ProtocolError> {
        let Some(alias) = p.topic_alias else {
            return Ok(None);
        };
        let max = self.shared.cfg.mqtt.topic_alias_max;
        if alias == 0 || alias > max {
            return Err(ProtocolError {
                reason: 0x94,
                label: "topic_alias_invalid",
                detail: format!("topic alias {alias} outside 1..={max}"),
            });
        }
        Ok(Some(usize::from(alias) - 1))
    }

    /// How long this PUBLISH must wait because the connection runs ahead of
    /// `mqtt.max_publish_rate` by more than [`PUBLISH_BURST`] (counted), if it must.
    fn pace_ahead(&mut self) -> Option<Duration> {
        let rate = self.shared.cfg.mqtt.max_publish_rate;
        if rate == 0 {
            return None;
        }
        let now = Instant::now();
        self.pace = self.pace.max(now) + Duration::from_secs(1) / rate;
        let ahead = self.pace - now;
        if ahead <= PUBLISH_BURST {
            return None;
        }
        self.shared.metrics.publish_throttled.inc();
        Some(ahead - PUBLISH_BURST)
    }

    /// Holds this PUBLISH for `wait` ([`Self::pace_ahead`]). Meanwhile the session reads
    /// nothing, so the client is slowed by TCP back-pressure; nothing is dropped.
    /// Takeover and shutdown still end the wait.
    async fn paced(&mut self, wait: Duration) -> Result<(), Close> {
        tokio::select! {
            biased;
            _ = self.shared.shutdown.cancelled() => Err(Close::Shutdown),
            _ = self.cell.lost_by(self.info.conn) => Err(Close::TakenOver),
            _ = tokio::time::sleep(wait) => Ok(()),
        }
    }
}
