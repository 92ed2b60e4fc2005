//! Every session this gateway holds, by client id: the connected ones and the
//! persistent ones whose vehicle is offline.
//!
//! Invariants:
//! - At most one session per client id, and at most one connection owns it. A new
//!   CONNECT with the same id takes the session over: the older connection loses the
//!   owner (and is woken; it closes with MQTT 5 reason 0x8E) under the same lock that
//!   installs the new owner, so two connections never both believe they own a session,
//!   and every change a connection makes to the session checks ownership under the
//!   cell's lock.
//! - Clean start (or an expired session, or one with expiry 0 whose connection this
//!   CONNECT takes over) discards the old session completely — its
//!   subscriptions leave the router and its queue leaves the store — before the new one
//!   is visible; otherwise the session continues and CONNACK says session present.
//! - A session whose connection ends is removed at once if its expiry is 0, otherwise
//!   kept (offline) until its expiry interval passes ([`Registry::expired`]).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use crate::message::now_ms;
use crate::metrics::Metrics;
use crate::router::{Router, SessionKey};
use crate::session::state::{DelayedWill, DisconnectedAt, OutItem, Owner, SessionCell, SessionState};
use crate::store::Store;

#[derive(Default, Debug)]
pub struct Registry {
    sessions: RwLock<Sessions>,
}

/// Sessions by client id: a set of cells found by the id each cell holds (a slot is one
/// pointer), not a map from a second copy of the id (three words a slot, which a million
/// idle vehicles would each pay).
#[derive(Default, Debug)]
struct Sessions(HashSet<ById>);

/// A cell, compared and hashed by its client id.
#[derive(Debug)]
struct ById(Arc<SessionCell>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.client_id == other.0.client_id
    }
}

impl Eq for ById {}

impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As the `str` it borrows as hashes (the set is searched by `&str`).
        (*self.0.client_id).hash(state);
    }
}

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.client_id
    }
}

impl Sessions {
    fn get(&self, client_id: &str) -> Option<&Arc<SessionCell>> {
        self.0.get(client_id).map(|e| &e.0)
    }

    /// Adds `cell`, replacing the session of the same client id if there is one.
    fn insert(&mut self, cell: Arc<SessionCell>) {
        self.0.replace(ById(cell));
    }

    fn remove(&mut self, client_id: &str) {
        self.0.remove(client_id);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn values(&self) -> impl Iterator<Item = &Arc<SessionCell>> {
        self.0.iter().map(|e| &e.0)
    }
}

/// What a CONNECT found.
pub struct Attached {
    pub cell: Arc<SessionCell>,
    /// CONNACK session present.
    pub present: bool,
    /// A Will that was waiting for its delay and whose session just ended (clean start
    /// discarded it): due now.
    pub will_due: Option<(SessionKey, Box<DelayedWill>)>,
}

/// What happened to a session when its connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Detached {
    /// Expiry 0: the session is gone.
    Ended,
    /// Persistent: kept offline until it expires.
    Kept,
    /// Another connection holds the session now (takeover).
    TakenOver,
}

/// Settings of a new or resumed session.
pub struct Connecting<'a> {
    /// Shared with a new session's cell (one allocation per client id, not two).
    pub client_id: &'a Arc<str>,
    pub owner: Owner,
    pub clean_start: bool,
    pub expiry_secs: u32,
    pub protocol: u8,
}

impl Registry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Sessions> {
        self.sessions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Sessions> {
        self.sessions.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, client_id: &str) -> Option<Arc<SessionCell>> {
        self.read().get(client_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes every session's connection (at shutdown, after the shutdown token was
    /// cancelled: a connection not waiting now looks at the token before it waits).
    pub fn wake_all(&self) {
        for cell in self.read().values() {
            cell.wake.notify_waiters();
        }
    }

    /// Every session (for the expiry sweep and the admin API).
    pub fn all(&self) -> Vec<Arc<SessionCell>> {
        self.read().values().cloned().collect()
    }

    /// Puts back a session restored from the store at start.
    pub fn restore(&self, cell: Arc<SessionCell>, metrics: &Metrics) {
        metrics.sessions.inc();
        metrics.sessions_persistent.inc();
        self.write().insert(cell);
    }

    /// A CONNECT: takes over, resumes or (clean start, expired) replaces the session.
    pub fn attach(&self, c: Connecting<'_>, router: &Router, store: &Store, metrics: &Metrics) -> Attached {
        let mut map = self.write();
        let now = now_ms();
        let mut will_due = None;
        let mut stale = None;
        if let Some(cell) = map.get(c.client_id).cloned() {
            let mut st = cell.lock();
            cell.take_owner(&mut st);
            // A session with expiry 0 (3.1.1 clean session) lasts as long as its
            // connection, which this takeover ends: there is nothing to resume even if
            // that connection's close is not processed yet (3.1.2-6; MQTT 5 §3.1.2.11.2).
            if !c.clean_start && !st.expired(now) && !st.gone && st.persistent() {
                if let Some(w) = st.delayed_will.take() {
                    // Resumed within the Will Delay Interval: no Will (MQTT 5 §3.1.2.5).
                    w.cancel.cancel();
                }
                let was_persistent = st.persistent();
                st.owner = Some(c.owner);
                st.expiry_secs = c.expiry_secs;
                st.disconnected_at = DisconnectedAt::default();
                st.protocol = c.protocol;
                let now_persistent = st.persistent();
                drop(st);
                persistent_gauge(metrics, was_persistent, now_persistent);
                if now_persistent {
                    let _ = cell.persist(store, metrics);
                } else if was_persistent {
                    if let Err(e) = store.remove_session(c.client_id) {
                        crate::session::state::store_failed(metrics, c.client_id, &e);
                    }
                }
                return Attached {
                    cell,
                    present: true,
                    will_due: None,
                };
            }
            if let Some(w) = st.delayed_will.take() {
                w.cancel.cancel();
                will_due = Some((cell.key(), w));
            }
            stale = Some((cell.key(), discard(&cell, &mut st, store, metrics)));
        }
        let state = SessionState::new(
            Some(c.owner),
            c.expiry_secs,
            DisconnectedAt::default(),
            c.protocol,
        );
        let cell = SessionCell::new(c.client_id.clone(), state);
        map.insert(cell.clone());
        drop(map);
        // The old session's filters leave the router (under its own incarnation, so
        // nothing of the new session can be touched) before this CONNECT is answered.
        if let Some((key, filters)) = stale {
            unroute(router, &key, filters);
        }
        metrics.sessions.inc();
        if c.expiry_secs > 0 {
            metrics.sessions_persistent.inc();
            let _ = cell.persist(store, metrics);
        }
        Attached {
            cell,
            present: false,
            will_due,
        }
    }

    /// The connection `conn` ended. A session with expiry 0 ends with it; a persistent
    /// one stays, offline, and is written to the store with its disconnect time.
    pub fn detach(
        &self,
        cell: &Arc<SessionCell>,
        conn: u64,
        router: &Router,
        store: &Store,
        metrics: &Metrics,
    ) -> Detached {
        let mut map = self.write();
        let mut st = cell.lock();
        if st.owner.as_ref().map(Owner::conn) != Some(conn) {
            return Detached::TakenOver;
        }
        st.owner = None;
        if st.gone {
            return Detached::Ended;
        }
        if !st.persistent() {
            if map.get(&cell.client_id).is_some_and(|c| Arc::ptr_eq(c, cell)) {
                map.remove(&cell.client_id);
            }
            let filters = discard(cell, &mut st, store, metrics);
            drop(st);
            drop(map);
            unroute(router, &cell.key(), filters);
            return Detached::Ended;
        }
        st.disconnected_at = DisconnectedAt::at(Some(now_ms()));
        st.out.went_offline(store.generation(), metrics);
        drop(st);
        drop(map);
        let _ = cell.persist(store, metrics);
        Detached::Kept
    }

    /// One pass over the sessions for the periodic sweep (one lock of each, no copy of
    /// the whole registry: at a million sessions the sweep must stay cheap). Returns the
    /// sessions holding queued or in-flight messages (they may hold commands whose expiry
    /// passed, [`SessionCell::expire_commands`]) and the offline sessions whose expiry
    /// interval passed (for [`Registry::expired`]). Most idle vehicles are in neither.
    pub fn sweep_due(&self, now: u64) -> SweepDue {
        let mut due = SweepDue::default();
        for cell in self.read().values() {
            let st = cell.lock();
            // An expiring session's commands are expired first (outcome `expired`, not
            // `dropped` by the session's end).
            if !st.out.is_idle() {
                due.holding.push(cell.clone());
            }
            if st.expired(now) {
                due.expired.push(cell.clone());
            }
        }
        due
    }

    /// Removes the offline sessions among `candidates` whose expiry interval passed (at
    /// `now`); returns the Wills that were still waiting for their delay (the session's
    /// end makes them due).
    pub fn expired(
        &self,
        candidates: Vec<Arc<SessionCell>>,
        now: u64,
        router: &Router,
        store: &Store,
        metrics: &Metrics,
    ) -> Vec<(SessionKey, Box<DelayedWill>)> {
        let mut wills = Vec::new();
        for cell in candidates {
            let mut map = self.write();
            let mut st = cell.lock();
            if !st.expired(now) || st.gone {
                continue;
            }
            if map.get(&cell.client_id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                map.remove(&cell.client_id);
            }
            if let Some(w) = st.delayed_will.take() {
                w.cancel.cancel();
                wills.push((cell.key(), w));
            }
            let filters = discard(&cell, &mut st, store, metrics);
            drop(st);
            drop(map);
            unroute(router, &cell.key(), filters);
            metrics.sessions_expired.inc();
            tracing::info!(client_id = %cell.client_id, "persistent session expired; removed");
        }
        wills
    }
}

/// What [`Registry::sweep_due`] found.
#[derive(Default)]
pub struct SweepDue {
    /// Sessions holding queued or in-flight messages (expired ones included).
    pub holding: Vec<Arc<SessionCell>>,
    /// Offline sessions whose expiry interval passed.
    pub expired: Vec<Arc<SessionCell>>,
}

impl Registry {
    /// The vehicle connected to another gateway at `since_ms` and this gateway holds its
    /// session offline, left before then: the session moved. Returns the command copies
    /// it holds (queued and in flight, in delivery order) for handing over; `None` when
    /// the session is not (or no longer) one that moved.
    pub fn moved_commands(&self, client_id: &str, since_ms: u64) -> Option<Vec<OutItem>> {
        let cell = self.get(client_id)?;
        let st = cell.lock();
        if !moved(&st, since_ms) {
            return None;
        }
        let items = st.out.inflight.iter().chain(st.out.queue.iter());
        Some(items.filter(|i| i.command.is_some()).cloned().collect())
    }

    /// Ends a session that moved to another gateway (see [`Registry::moved_commands`]),
    /// once its commands were handed over. A Will waiting for its delay is cancelled:
    /// the vehicle is back, elsewhere. False when the session came back here meanwhile.
    pub fn discard_moved(
        &self,
        client_id: &str,
        since_ms: u64,
        router: &Router,
        store: &Store,
        metrics: &Metrics,
    ) -> bool {
        let Some(cell) = self.get(client_id) else {
            return false;
        };
        let mut map = self.write();
        let mut st = cell.lock();
        if !moved(&st, since_ms) {
            return false;
        }
        if map.get(&cell.client_id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(&cell.client_id);
        }
        if let Some(w) = st.delayed_will.take() {
            w.cancel.cancel();
        }
        let filters = discard(&cell, &mut st, store, metrics);
        drop(st);
        drop(map);
        unroute(router, &cell.key(), filters);
        true
    }
}

/// Why an operator's discard did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum DiscardRefused {
    NoSession,
    /// A connection holds it: kick the connection first.
    Online,
}

impl Registry {
    /// Asks the connection holding `client_id`'s session to close (MQTT 5 reason 0x98).
    /// False when no connection holds it.
    pub fn kick(&self, client_id: &str) -> bool {
        let Some(cell) = self.get(client_id) else {
            return false;
        };
        let st = cell.lock();
        let Some(owner) = &st.owner else {
            return false;
        };
        owner.info.kicked.store(true, Ordering::Relaxed);
        drop(st);
        cell.wake.notify_waiters();
        true
    }

    /// An operator discards an offline session: it leaves the registry, the router and
    /// the store now (its queued commands report `dropped`). Its delayed Will, if one was
    /// waiting, is handed back: the session ended, so it is due (MQTT 5 §3.1.3.2.2).
    pub fn discard_offline(
        &self,
        client_id: &str,
        router: &Router,
        store: &Store,
        metrics: &Metrics,
    ) -> Result<Option<(SessionKey, Box<DelayedWill>)>, DiscardRefused> {
        let cell = self.get(client_id).ok_or(DiscardRefused::NoSession)?;
        let mut map = self.write();
        let mut st = cell.lock();
        if st.owner.is_some() {
            return Err(DiscardRefused::Online);
        }
        if st.gone {
            return Err(DiscardRefused::NoSession);
        }
        if map.get(&cell.client_id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(&cell.client_id);
        }
        let will = st.delayed_will.take();
        if let Some(w) = &will {
            w.cancel.cancel();
        }
        let filters = discard(&cell, &mut st, store, metrics);
        drop(st);
        drop(map);
        unroute(router, &cell.key(), filters);
        Ok(will.map(|w| (cell.key(), w)))
    }
}

/// An offline, live session its vehicle left before `since_ms`.
fn moved(st: &SessionState, since_ms: u64) -> bool {
    st.owner.is_none() && !st.gone && st.disconnected_at_ms().is_some_and(|t| t <= since_ms)
}

fn persistent_gauge(metrics: &Metrics, was: bool, now: bool) {
    match (was, now) {
        (false, true) => {
            metrics.sessions_persistent.inc();
        }
        (true, false) => {
            metrics.sessions_persistent.dec();
        }
        _ => {}
    }
}

/// Ends a session for good: queue emptied, out of the store. Returns its filters, which
/// the caller takes out of the router once it released the registry and cell locks
/// (lock order: the router's trie is never taken under the registry lock, because
/// routing takes the registry under the trie).
#[must_use]
fn discard(cell: &SessionCell, st: &mut SessionState, store: &Store, metrics: &Metrics) -> Vec<String> {
    st.gone = true;
    let filters: Vec<String> = std::mem::take(&mut st.subscriptions).into_keys().collect();
    metrics.subscriptions_active.sub(filters.len() as i64);
    st.out.clear(metrics);
    st.inbound_qos2.clear();
    metrics.sessions.dec();
    if st.persistent() {
        metrics.sessions_persistent.dec();
        if let Err(e) = store.remove_session(&cell.client_id) {
            crate::session::state::store_failed(metrics, &cell.client_id, &e);
        }
    }
    filters
}

/// Takes a discarded session's filters out of the router (no registry lock held).
fn unroute(router: &Router, key: &SessionKey, filters: Vec<String>) {
    for f in filters {
        router.unsubscribe(key, &f);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod lock_order_tests {
    use super::*;
    use crate::config::SessionsSection;
    use crate::message::Message;
    use crate::router::SubOptions;
    use crate::session::state::Owner;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// route() holds the trie read lock while `pick` calls registry.is_online (registry
    /// read lock); attach/detach hold the registry write lock while discard() takes the
    /// trie write lock. A shared subscription plus a clean-start reconnect deadlocks.
    #[test]
    fn route_vs_attach_lock_order_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let shared = Arc::new((Registry::default(), Router::default(), store, Metrics::default()));
        // A shared-subscription member (so `pick` calls `online`).
        let member = SessionKey {
            id: Arc::from("member"),
            incarnation: 0,
        };
        shared
            .1
            .subscribe(&member, "$share/g/t", SubOptions::qos(0))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut hs = Vec::new();
        {
            let (s, stop, progress) = (shared.clone(), stop.clone(), progress.clone());
            hs.push(std::thread::spawn(move || {
                let msg = Arc::new(Message {
                    topic: "t".into(),
                    payload: bytes::Bytes::from_static(b"x"),
                    qos: 0,
                    retain: false,
                    props: Default::default(),
                    received_at_ms: 0,
                    expires_at_ms: None,
                });
                let lim = SessionsSection::default();
                while !stop.load(Ordering::Relaxed) {
                    s.1.route(&msg, None, &s.0, &lim, &s.2, &s.3);
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        {
            let (s, stop, progress) = (shared.clone(), stop.clone(), progress.clone());
            hs.push(std::thread::spawn(move || {
                let mut conn = 0;
                while !stop.load(Ordering::Relaxed) {
                    conn += 1;
                    let a = s.0.attach(
                        Connecting {
                            client_id: &Arc::from("churn"),
                            owner: Owner::bare(conn),
                            clean_start: true,
                            expiry_secs: 0,
                            protocol: 5,
                        },
                        &s.1,
                        &s.2,
                        &s.3,
                    );
                    s.1.subscribe(&a.cell.key(), "other", SubOptions::qos(0)).unwrap();
                    a.cell
                        .lock()
                        .subscriptions
                        .insert("other".into(), SubOptions::qos(0));
                    s.0.detach(&a.cell, conn, &s.1, &s.2, &s.3);
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let mut last = 0;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(500));
            let now = progress.load(Ordering::Relaxed);
            if now == last {
                panic!("DEADLOCK: no progress for 500 ms after {now} operations (route vs attach/detach lock order)");
            }
            last = now;
        }
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.join().unwrap();
        }
    }

    /// 3.1.2-6: a clean-session connection whose close the gateway has not processed
    /// yet is taken over by a CONNECT with clean session 0: there is no session to
    /// resume (present 0, its subscriptions gone); a persistent one is resumed.
    #[test]
    fn taking_over_a_live_clean_session_resumes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (reg, router, m) = (Registry::default(), Router::default(), Metrics::default());
        let connect = |conn: u64, clean_start: bool, expiry_secs: u32| {
            reg.attach(
                Connecting {
                    client_id: &Arc::from("car"),
                    owner: Owner::bare(conn),
                    clean_start,
                    expiry_secs,
                    protocol: 4,
                },
                &router,
                &store,
                &m,
            )
        };
        let a = connect(1, true, 0);
        router.subscribe(&a.cell.key(), "t", SubOptions::qos(1)).unwrap();
        a.cell.lock().subscriptions.insert("t".into(), SubOptions::qos(1));
        let b = connect(2, false, u32::MAX);
        assert!(!b.present, "a clean session ends with the connection taken over");
        assert!(b.cell.lock().subscriptions.is_empty());
        b.cell.lock().subscriptions.insert("u".into(), SubOptions::qos(1));
        let c = connect(3, false, u32::MAX);
        assert!(c.present, "a persistent session is resumed by a takeover");
        assert!(c.cell.lock().subscriptions.contains_key("u"));
    }

    /// A command whose own expiry passed while its offline session waited reports
    /// `expired`, also when the session's expiry passes before the next sweep (the sweep
    /// of `session::will::expire_sessions`: sweep_due, expire_commands over `holding`,
    /// then `expired`). Found by review: the first single-pass sweep left expired
    /// sessions out of `holding`, and the command ended `dropped` / `session_ended`.
    #[tokio::test]
    async fn the_sweep_reports_expired_for_a_command_that_expired_before_its_session() {
        use crate::commands::{CommandRecord, Commands, Outcome, Source};
        use crate::session::state::{OutItem, SessionState};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (reg, router, m) = (Registry::default(), Router::default(), Metrics::default());
        let commands = Commands::default();
        let mut reports = commands.take_reports().unwrap();
        let now = now_ms();
        // Offline for 70 s with a 60 s session expiry; the command expired after 30 s.
        let cell = SessionCell::new(
            Arc::from("car"),
            SessionState::new(
                None,
                60,
                crate::session::state::DisconnectedAt::at(Some(now - 70_000)),
                5,
            ),
        );
        cell.persist(&store, &m).unwrap();
        let mut item = OutItem::new(
            Arc::new(Message {
                topic: "vehicles/car/commands".into(),
                payload: bytes::Bytes::from_static(b"unlock"),
                qos: 1,
                retain: false,
                props: Default::default(),
                received_at_ms: now - 70_000,
                expires_at_ms: Some(now - 40_000),
            }),
            1,
            false,
            vec![],
        );
        item.command = Some(commands.restore(CommandRecord {
            id: "kafka:c:0:7".into(),
            client_id: "car".into(),
            correlation_id: None,
            source: Source::Kafka {
                topic: "c".into(),
                partition: 0,
                offset: 7,
            },
            issued_at_ms: now - 70_000,
            qos: 1,
        }));
        cell.lock().out.restore(item, &m);
        reg.restore(cell, &m);

        // The sweep, as expire_sessions runs it on the blocking pool.
        let found = reg.sweep_due(now);
        let ended: usize = found
            .holding
            .iter()
            .map(|c| c.expire_commands(now, &store, &m))
            .sum();
        let _wills = reg.expired(found.expired, now, &router, &store, &m);
        assert!(reg.get("car").is_none(), "the session expired");
        let mut seen = Vec::new();
        while let Ok(r) = reports.try_recv() {
            seen.push((r.outcome, r.reason));
        }
        assert_eq!(
            (ended, seen),
            (1, vec![(Some(Outcome::Expired), None)]),
            "the command expired 40 s ago, 30 s before its session did"
        );
    }
}
