//! The router: which sessions on this gateway a PUBLISH reaches, and the retained
//! messages a new subscription receives.
//!
//! Invariants:
//! - Routing is local fan-out only: the Kafka path (journal → bridge) is decided by
//!   `[[routes]]` in the session, independently. One `Arc<Message>` is shared by every
//!   subscriber it reaches; the payload is never copied per subscriber.
//! - A message reaches each matching session once (overlapping subscriptions merge: the
//!   highest granted QoS, every matching subscription identifier), plus once per
//!   matching shared-subscription group (one member, round robin, online members first).
//! - Routing never waits for a subscriber: it offers the message to each session's
//!   bounded queue ([`crate::session::state::SessionCell::offer`]), which queues, drops
//!   (counted) or persists it. The store generation it returns is what the publisher's
//!   acknowledgement must wait for.
//! - Retained messages are bounded in count and bytes (`[retained]`); an empty payload
//!   deletes; each change is written to the store (they survive restarts).

pub mod retained;
pub mod trie;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::commands::Ticket;
use crate::config::{RetainedSection, SessionsSection};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::session::state::{store_failed, Offer, OutItem};
use crate::state::Shared;
use crate::store::Store;
use retained::RetainedIndex;
use trie::Presence;
use trie::SubscriptionTrie;

/// Who holds a subscription: a client id and the incarnation of its session. A session
/// discarded by a clean start (or expiry) and its successor share the client id but not
/// the incarnation, so the old one's filters can neither be removed on the new one's
/// behalf nor deliver into it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub id: Arc<str>,
    pub incarnation: u64,
}

/// No Local compares client ids: during a clean-start takeover, a publish still routed by
/// the old connection (or its Will) is not sent to the new session's No Local
/// subscriptions, although their incarnations differ.
impl trie::SubscriberKey for SessionKey {
    fn same_client(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

/// A subscription's options (MQTT 5 §3.8.3.1; 3.1.1 has only the QoS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubOptions {
    /// Granted QoS: a message is delivered at min(its QoS, this).
    pub qos: u8,
    /// Do not deliver the subscriber's own publishes (never set on shared subscriptions).
    pub no_local: bool,
    /// Keep the RETAIN flag as published (otherwise it is cleared on live delivery).
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
    /// MQTT 5 Subscription Identifier, echoed in every PUBLISH this subscription matches.
    pub id: Option<u32>,
}

impl SubOptions {
    pub fn qos(qos: u8) -> Self {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id: None,
        }
    }
}

/// What became of a command's copy for its vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandRoute {
    /// Queued for the vehicle's connection.
    Online,
    /// Queued in its offline session; `gen` is the store write to wait for.
    Offline { gen: Option<u64> },
    /// The vehicle's session has no subscription matching the command topic.
    NotSubscribed,
    /// Not queued (the reason is also counted in `messages_dropped`).
    Dropped(&'static str),
}

/// What routing one message did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Routed {
    /// Sessions it was offered to (queued or dropped).
    pub matched: usize,
    /// Store generation covering its queue entries (persistent sessions).
    pub gen: Option<u64>,
}

/// Where routing offers into.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    registry: &'a Registry,
    limits: &'a SessionsSection,
    store: &'a Store,
    metrics: &'a Metrics,
}

#[derive(Default)]
struct RetainedSet {
    index: RetainedIndex<Arc<Message>>,
    bytes: usize,
}

/// Subscriptions (a trie keyed by client id) and retained messages.
#[derive(Default)]
pub struct Router {
    trie: RwLock<SubscriptionTrie<SessionKey>>,
    /// Subscriptions in the trie, read without its lock on the ingest path.
    count: AtomicUsize,
    retained: Mutex<RetainedSet>,
}

impl Router {
    fn trie_read(&self) -> std::sync::RwLockReadGuard<'_, SubscriptionTrie<SessionKey>> {
        self.trie.read().unwrap_or_else(|e| e.into_inner())
    }

    fn trie_write(&self) -> std::sync::RwLockWriteGuard<'_, SubscriptionTrie<SessionKey>> {
        self.trie.write().unwrap_or_else(|e| e.into_inner())
    }

    fn retained_lock(&self) -> std::sync::MutexGuard<'_, RetainedSet> {
        self.retained.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces `client_id`'s subscription; true when it replaced one.
    pub fn subscribe(&self, key: &SessionKey, filter: &str, opts: SubOptions) -> Result<bool, &'static str> {
        let replaced = self.trie_write().subscribe(key.clone(), filter, opts)?;
        if !replaced {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(replaced)
    }

    pub fn unsubscribe(&self, key: &SessionKey, filter: &str) -> bool {
        let removed = self.trie_write().unsubscribe(key, filter);
        if removed {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Subscriptions held (all sessions).
    pub fn subscriptions(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Offers `msg` to every session with a matching subscription.
    pub fn route(
        &self,
        msg: &Arc<Message>,
        publisher: Option<&SessionKey>,
        registry: &Registry,
        limits: &SessionsSection,
        store: &Store,
        metrics: &Metrics,
    ) -> Routed {
        let ctx = Ctx {
            registry,
            limits,
            store,
            metrics,
        };
        self.offer_all(msg, publisher, None, &ctx).0
    }

    /// Routes a command like any message (diagnostic subscribers see it too); the
    /// vehicle's own copy carries `ticket`. Says what routing did and what became of
    /// the vehicle's copy.
    pub fn route_command(
        &self,
        msg: &Arc<Message>,
        publisher: Option<&SessionKey>,
        ticket: &Arc<Ticket>,
        shared: &Shared,
    ) -> (Routed, CommandRoute) {
        let ctx = Ctx {
            registry: &shared.registry,
            limits: &shared.cfg.sessions,
            store: &shared.store,
            metrics: &shared.metrics,
        };
        self.offer_all(msg, publisher, Some(ticket), &ctx)
    }

    fn offer_all(
        &self,
        msg: &Arc<Message>,
        publisher: Option<&SessionKey>,
        ticket: Option<&Arc<Ticket>>,
        ctx: &Ctx<'_>,
    ) -> (Routed, CommandRoute) {
        let Ctx {
            registry,
            limits,
            store,
            metrics,
        } = *ctx;
        let mut routed = Routed::default();
        let mut command = CommandRoute::NotSubscribed;
        if self.subscriptions() == 0 {
            return (routed, command);
        }
        let current = |k: &SessionKey| registry.get(&k.id).filter(|c| c.incarnation == k.incarnation);
        let targets = self
            .trie_read()
            .route_with(&msg.topic, publisher, |k| match current(k) {
                Some(c) if c.is_online() => Presence::Online,
                Some(_) => Presence::Offline,
                None => Presence::Gone,
            });
        for t in targets {
            // A filter of a session that was just discarded reaches nobody.
            let Some(cell) = current(&t.key) else {
                continue;
            };
            routed.matched += 1;
            let mut item = OutItem::new(
                msg.clone(),
                msg.qos.min(t.qos),
                t.retain_as_published && msg.retain,
                t.subscription_ids,
            );
            let ours = ticket.filter(|tk| *tk.info.record.client_id == *t.key.id);
            item.command = ours.cloned();
            let offered = cell.offer(item, limits, store, metrics);
            match offered {
                Offer::Queued { gen, .. } => routed.gen = routed.gen.max(gen),
                Offer::Dropped(reason) => metrics.messages_dropped.inc(reason),
            }
            if ours.is_some() {
                command = match offered {
                    Offer::Queued { online: true, .. } => CommandRoute::Online,
                    Offer::Queued { gen, online: false } => CommandRoute::Offline { gen },
                    Offer::Dropped(reason) => CommandRoute::Dropped(reason),
                };
            }
        }
        (routed, command)
    }

    /// Stores (or, with an empty payload, deletes) the retained message of its topic.
    /// Returns the store generation to wait for, or the reason it was not stored.
    pub fn retain(
        &self,
        msg: &Arc<Message>,
        limits: &RetainedSection,
        store: &Store,
        metrics: &Metrics,
    ) -> Result<Option<u64>, &'static str> {
        let mut set = self.retained_lock();
        if msg.payload.is_empty() {
            let Some(old) = set.index.remove(&msg.topic) else {
                return Ok(None);
            };
            set.bytes = set.bytes.saturating_sub(old.weight());
            gauges(metrics, &set);
            return match store.remove_retained(&msg.topic) {
                Ok(g) => Ok(Some(g)),
                Err(e) => {
                    store_failed(metrics, &msg.topic, &e);
                    Ok(None)
                }
            };
        }
        let old_weight = set.index.get(&msg.topic).map(|m| m.weight());
        let bytes = set.bytes - old_weight.unwrap_or(0) + msg.weight();
        let count = set.index.len() + usize::from(old_weight.is_none());
        if count > limits.max_messages || bytes > limits.max_bytes {
            return Err("full");
        }
        let gen = match store.put_retained(msg) {
            Ok(g) => g,
            Err(e) => {
                store_failed(metrics, &msg.topic, &e);
                return Err("store_error");
            }
        };
        set.index.insert(&msg.topic, msg.clone());
        set.bytes = bytes;
        gauges(metrics, &set);
        Ok(Some(gen))
    }

    /// Retained messages whose topic matches `filter` (a plain filter, not `$share`).
    pub fn retained_for(&self, filter: &str) -> Vec<Arc<Message>> {
        let set = self.retained_lock();
        let mut out = Vec::new();
        set.index.matching(filter, |_, m| out.push(m.clone()));
        out
    }

    /// Puts back retained messages loaded from the store at start.
    pub fn restore_retained(&self, msgs: Vec<Message>, metrics: &Metrics) {
        let mut set = self.retained_lock();
        for m in msgs {
            set.bytes += m.weight();
            let topic = m.topic.clone();
            if let Some(old) = set.index.insert(&topic, Arc::new(m)) {
                set.bytes = set.bytes.saturating_sub(old.weight());
            }
        }
        gauges(metrics, &set);
    }
}

fn gauges(metrics: &Metrics, set: &RetainedSet) {
    metrics.retained_messages.set(set.index.len() as i64);
    metrics.retained_bytes.set(set.bytes as i64);
}
