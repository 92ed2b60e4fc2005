//! One keep-alive clock for every connection: a timing wheel ticked by one task.
//!
//! A session used to arm a `tokio::time::Sleep` for its keep-alive deadline on every
//! turn of its loop, and a streaming vehicle turns a few times per message: each turn
//! registered the timer in the runtime's wheel and removed it again (a lock each). Here
//! a packet only stores its connection's new deadline, in ticks, into an atomic of its
//! [`ConnInfo`]; this wheel looks at a connection once per deadline, not per packet.
//!
//! Invariants:
//! - A connection is closed for keep alive only once the clock passed its deadline
//!   (never early); up to two [`TICK`]s late (the deadline rounded up to a tick, the
//!   ticker's phase) plus the ticker's own delay under load.
//! - Every connection in the loop has exactly one entry until it ends: the entry is
//!   re-armed at the deadline in force when it comes due, so a deadline that moved on
//!   costs one look per period, however many packets moved it.
//! - An expired connection is woken through its session cell (the wake-up its loop
//!   waits on anyway) and looked at again every `RETRY` (1 s) until it is gone; a wake-up
//!   that finds a live deadline, or reaches a newer owner of the cell, is harmless.
//! - An entry holds no strong reference, and a connection removes its own when its loop
//!   ends ([`KeepAlive::forget`]), before its goodbye: a closed connection leaves
//!   nothing behind, however fast clients come and go. (A session task that panicked
//!   leaves its entry while its cell still names the connection: woken every
//!   `RETRY` (1 s), harmlessly, until the client id is taken over.)
//!
//! All under one mutex, held for one slot at a time: registrations (at CONNACK) and
//! removals (at close; constant time, each connection knows its place) wait at most for
//! one slot's look.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::state::{ConnInfo, SessionCell};

/// The clock's resolution.
pub const TICK: Duration = Duration::from_millis(100);
const TICK_MS: u128 = TICK.as_millis();
/// Slots of the wheel: its horizon is `SLOTS × TICK` (about 7 minutes). A deadline
/// beyond it waits in the last slot of the horizon and is placed again from there.
const SLOTS: u32 = 4096;
/// How often an expired connection that is still there is woken again.
const RETRY: u32 = 10;

/// One connection in the wheel.
struct Entry {
    info: Weak<ConnInfo>,
    cell: Weak<SessionCell>,
}

/// The wheel (see the module documentation).
pub struct KeepAlive {
    start: Instant,
    /// The tick the ticker last reached: a deadline at or before it has passed.
    now: AtomicU32,
    slots: Mutex<Vec<Vec<Entry>>>,
}

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive {
            start: Instant::now(),
            now: AtomicU32::new(0),
            slots: Mutex::new((0..SLOTS).map(|_| Vec::new()).collect()),
        }
    }
}

impl KeepAlive {
    /// The deadline `after` from now, in ticks (rounded up: never early).
    pub fn due_in(&self, after: Duration) -> u32 {
        let at = Instant::now().saturating_duration_since(self.start) + after;
        u32::try_from(at.as_nanos().div_ceil(TICK.as_nanos())).unwrap_or(u32::MAX)
    }

    /// Whether a deadline of [`KeepAlive::due_in`] has passed.
    pub fn expired(&self, due: u32) -> bool {
        due <= self.now.load(Ordering::Acquire)
    }

    /// Starts watching a connection whose deadline is in its `keep_alive_due`.
    pub fn watch(&self, info: &Arc<ConnInfo>, cell: &Arc<SessionCell>) {
        let entry = Entry {
            info: Arc::downgrade(info),
            cell: Arc::downgrade(cell),
        };
        let mut slots = self.lock();
        let now = self.now.load(Ordering::Acquire);
        place(
            &mut slots,
            now,
            info.keep_alive_due.load(Ordering::Relaxed),
            entry,
            info,
        );
    }

    /// Stops watching a connection (it is closing). Constant time: the connection knows
    /// its slot and index (a mass disconnect of connections that share a slot must not
    /// scan it once per connection under the lock).
    pub fn forget(&self, info: &Arc<ConnInfo>) {
        let mut slots = self.lock();
        let at = info.keep_alive_at.load(Ordering::Relaxed);
        let slot = &mut slots[(at >> 32) as usize % SLOTS as usize];
        let me = Arc::as_ptr(info);
        let index = (at & u64::from(u32::MAX)) as usize;
        let found = match slot.get(index) {
            Some(e) if std::ptr::eq(e.info.as_ptr(), me) => Some(index),
            // Not where it says: never expected; look through the slot rather than leave it.
            _ => slot.iter().position(|e| std::ptr::eq(e.info.as_ptr(), me)),
        };
        let Some(index) = found else {
            return;
        };
        slot.swap_remove(index);
        // The slot's last entry took its place: tell it (a connection already gone needs
        // no telling; its entry is dropped when the slot comes due).
        if let Some(moved) = slot.get(index).and_then(|e| e.info.upgrade()) {
            let moved_slot = at >> 32;
            moved
                .keep_alive_at
                .store(moved_slot << 32 | index as u64, Ordering::Relaxed);
        }
    }

    /// Connections watched.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().iter().map(Vec::len).sum()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Advances the clock to now and looks at every slot it passed.
    pub fn advance(&self) {
        let target =
            u32::try_from(Instant::now().saturating_duration_since(self.start).as_millis() / TICK_MS)
                .unwrap_or(u32::MAX);
        self.advance_to(target);
    }

    fn advance_to(&self, target: u32) {
        let from = self.now.load(Ordering::Acquire);
        if target <= from {
            return;
        }
        // A clock that fell behind by more than the horizon looks at each slot once.
        let first = from.saturating_add(1).max(target.saturating_sub(SLOTS - 1));
        for tick in first..=target {
            let mut slots = self.lock();
            // Published before the look, under the lock: a connection registered from
            // here on is placed after this tick, and one looked at sees its deadline
            // judged by the same clock its session reads.
            self.now.store(tick, Ordering::Release);
            let due_here = std::mem::take(&mut slots[(tick % SLOTS) as usize]);
            let mut again = Vec::new();
            for entry in due_here {
                let Some(info) = entry.info.upgrade() else {
                    continue;
                };
                let due = info.keep_alive_due.load(Ordering::Relaxed);
                if due <= tick {
                    if let Some(cell) = entry.cell.upgrade() {
                        cell.wake.notify_one();
                    }
                    again.push((tick.saturating_add(RETRY), entry, info));
                } else {
                    again.push((due, entry, info));
                }
            }
            for (due, entry, info) in again {
                place(&mut slots, tick, due, entry, &info);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<Entry>>> {
        // A panic while holding it left whole slots: still a consistent wheel.
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Puts `entry` in the slot of `due`, or of the horizon's end when `due` is beyond it,
/// and records where in the connection's facts (for [`KeepAlive::forget`]).
fn place(slots: &mut [Vec<Entry>], now: u32, due: u32, entry: Entry, info: &ConnInfo) {
    let at = due.clamp(now.saturating_add(1), now.saturating_add(SLOTS - 1));
    let slot = at % SLOTS;
    let entries = &mut slots[slot as usize];
    info.keep_alive_at
        .store(u64::from(slot) << 32 | entries.len() as u64, Ordering::Relaxed);
    entries.push(entry);
}

/// Ticks the wheel until shutdown.
pub async fn run(wheel: Arc<KeepAlive>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => wheel.advance(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::session::state::{DisconnectedAt, Owner, SessionState};

    fn connection(wheel: &KeepAlive, due: u32) -> (Arc<ConnInfo>, Arc<SessionCell>) {
        let info = Arc::new(ConnInfo::default());
        info.keep_alive_due.store(due, Ordering::Relaxed);
        let state = SessionState::new(Some(Owner { info: info.clone() }), 0, DisconnectedAt::at(None), 5);
        let cell = SessionCell::new(Arc::from("car"), state);
        wheel.watch(&info, &cell);
        (info, cell)
    }

    /// The connection's recorded place holds its entry (so `forget` needs no scan).
    fn placed_right(wheel: &KeepAlive, info: &Arc<ConnInfo>) -> bool {
        let at = info.keep_alive_at.load(Ordering::Relaxed);
        let slots = wheel.lock();
        slots[(at >> 32) as usize]
            .get((at & u64::from(u32::MAX)) as usize)
            .is_some_and(|e| std::ptr::eq(e.info.as_ptr(), Arc::as_ptr(info)))
    }

    /// Takes the cell's wake-up if one is waiting.
    fn woken(cell: &SessionCell) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(pin!(cell.wake.notified()).poll(&mut cx), Poll::Ready(()))
    }

    #[test]
    fn a_silent_connection_is_woken_when_its_deadline_passes_not_before() {
        let wheel = KeepAlive::default();
        let (info, cell) = connection(&wheel, 15);
        wheel.advance_to(14);
        assert!(!woken(&cell));
        assert!(!wheel.expired(info.keep_alive_due.load(Ordering::Relaxed)));
        wheel.advance_to(15);
        assert!(woken(&cell));
        assert!(wheel.expired(info.keep_alive_due.load(Ordering::Relaxed)));
        // Still there (its session has not closed yet): woken again, not forgotten.
        wheel.advance_to(15 + RETRY);
        assert!(woken(&cell));
        assert_eq!(wheel.len(), 1);
    }

    #[test]
    fn a_deadline_moved_on_is_looked_at_again_not_acted_on() {
        let wheel = KeepAlive::default();
        let (info, cell) = connection(&wheel, 10);
        info.keep_alive_due.store(30, Ordering::Relaxed);
        wheel.advance_to(29);
        assert!(!woken(&cell), "woken at the deadline it had before the packet");
        wheel.advance_to(30);
        assert!(woken(&cell));
    }

    #[test]
    fn a_deadline_beyond_the_horizon_waits_at_its_end_and_is_kept() {
        let wheel = KeepAlive::default();
        let far = 3 * SLOTS + 5;
        let (_info, cell) = connection(&wheel, far);
        for step in (0..far).step_by(1000) {
            wheel.advance_to(step);
            assert!(!woken(&cell), "woken at tick {step}");
        }
        wheel.advance_to(far - 1);
        assert!(!woken(&cell));
        wheel.advance_to(far);
        assert!(woken(&cell));
    }

    #[test]
    fn closed_connections_leave_the_wheel() {
        let wheel = KeepAlive::default();
        let (a, _cell_a) = connection(&wheel, 20);
        let (b, cell_b) = connection(&wheel, 20);
        let (c, cell_c) = connection(&wheel, 40);
        assert_eq!(wheel.len(), 3);
        // Closed normally: removed at once.
        wheel.forget(&a);
        assert_eq!(wheel.len(), 2);
        // Gone without a goodbye (its session and cell dropped): dropped when its slot
        // comes.
        drop((c, cell_c));
        wheel.advance_to(40);
        assert_eq!(wheel.len(), 1);
        assert!(woken(&cell_b));
        wheel.forget(&b);
        assert!(wheel.is_empty());
    }

    #[test]
    fn connections_sharing_a_slot_leave_it_in_any_order() {
        let wheel = KeepAlive::default();
        let conns: Vec<_> = (0..6).map(|_| connection(&wheel, 30)).collect();
        // The first, then the one moved into its place, then one from the middle...
        let mut left: Vec<usize> = (0..6).collect();
        for i in [0, 5, 2, 4, 1, 3] {
            let before = wheel.len();
            wheel.forget(&conns[i].0);
            assert_eq!(wheel.len(), before - 1, "connection {i} was not removed");
            left.retain(|&j| j != i);
            for &j in &left {
                assert!(placed_right(&wheel, &conns[j].0), "connection {j} lost its place");
            }
        }
        // ...and nothing is left to wake.
        wheel.advance_to(30);
        assert!(conns.iter().all(|(_, cell)| !woken(cell)));
        // Re-armed entries (a deadline that moved on) keep their place known too.
        let (a, _) = connection(&wheel, 40);
        let (b, _) = connection(&wheel, 40);
        a.keep_alive_due.store(60, Ordering::Relaxed);
        b.keep_alive_due.store(60, Ordering::Relaxed);
        wheel.advance_to(40);
        assert!(placed_right(&wheel, &a) && placed_right(&wheel, &b));
        wheel.forget(&a);
        wheel.forget(&b);
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_clock_behind_by_more_than_the_horizon_still_looks_at_every_slot() {
        let wheel = KeepAlive::default();
        let cells: Vec<_> = [7, 2_000, SLOTS - 2, SLOTS + 300]
            .into_iter()
            .map(|due| connection(&wheel, due))
            .collect();
        wheel.advance_to(10 * SLOTS);
        for (info, cell) in &cells {
            let due = info.keep_alive_due.load(Ordering::Relaxed);
            assert!(woken(cell), "deadline {due} missed");
        }
        assert_eq!(wheel.len(), cells.len());
    }

    #[test]
    fn deadlines_round_up_to_the_tick_never_down() {
        let wheel = KeepAlive::default();
        for ms in [1, 99, 100, 101, 1_499, 1_500, 1_501] {
            let before = Instant::now().saturating_duration_since(wheel.start);
            let due = wheel.due_in(Duration::from_millis(ms));
            assert!(
                TICK * due >= before + Duration::from_millis(ms),
                "{ms} ms from {before:?}: tick {due} is early"
            );
        }
    }

    #[test]
    fn a_deadline_already_passed_at_registration_is_woken_on_the_next_tick() {
        let wheel = KeepAlive::default();
        wheel.advance_to(50);
        let (_info, cell) = connection(&wheel, 20);
        wheel.advance_to(51);
        assert!(woken(&cell));
    }
}
