//! The segmented, group-committed implementation of [`Journal`]; see the module doc of
//! [`crate::journal`] for the on-disk layout and the guarantees.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify};

use super::dir::{
    list_segments, load_or_create_id, load_or_create_key, lock_dir, open_or_create_segment, preallocate,
    read_checkpoint, read_gaps, settle_segment, sync_dir, SegmentMeta, CHECKPOINT, ID_FILE, KEY_FILE,
};
use super::metrics::{CommitMetrics, StateGauges};
use super::reader::JournalReader;
use super::record::{encode_salted, frame_len, EntryRef, Salt};
use super::recovery::{check_older_segments, recover_head};
use super::retained::{
    retained_range, written_ms, NotRetained, ReplayReader, RetainedRange, RetainedSegment, RetainedSet,
};
use super::writer::{writer_loop, Head};
use super::{Entry, Journal, JournalConfig, JournalError, JournalStats};
use crate::metrics::Defs;

/// Granularity of the receive-time marks behind `oldest_age`.
const MARK_INTERVAL_MS: u64 = 1000;

/// Appender-side state; guarded by one mutex held only to copy a frame in.
pub(super) struct State {
    pub(super) buf: Vec<u8>,
    /// Offsets in `buf` where a new segment starts, with the sequence of its first record.
    pub(super) rolls: Vec<(usize, u64)>,
    pub(super) next_seq: u64,
    /// Free bytes in the head segment as planned by appenders (ahead of the writer).
    pub(super) head_remaining: u64,
    /// Segments on disk plus those planned by `rolls`.
    pub(super) planned_segments: u64,
    /// Bytes of those segments (real file sizes; planned ones at `segment_bytes`).
    pub(super) planned_bytes: u64,
    pub(super) full: bool,
    /// The writer is parked on the condvar: only then does an append pay for a wake-up
    /// (a futex syscall per append otherwise).
    pub(super) writer_waiting: bool,
    pub(super) stopped: Option<String>,
    /// The writer is retrying a transient I/O error; see [`JournalStats::stalled`].
    pub(super) stalled: Option<String>,
    pub(super) closing: bool,
    pub(super) crash: Option<bool>,
    /// (first seq, receive time) samples, at most one a second, for `oldest_age`.
    pub(super) marks: VecDeque<(u64, u64)>,
}

pub(super) struct Inner {
    pub(super) cfg: JournalConfig,
    pub(super) id: String,
    /// The salt of the records' CRCs (see [`Salt`]).
    pub(super) salt: Salt,
    pub(super) state: Mutex<State>,
    pub(super) wake_writer: Condvar,
    /// Signalled whenever buffer or disk space is freed, or the journal stops.
    pub(super) space: Notify,
    pub(super) durable_tx: watch::Sender<u64>,
    pub(super) released: AtomicU64,
    pub(super) syncs: AtomicU64,
    /// Appends refused by the `reject` policy.
    pub(super) rejected: AtomicU64,
    /// Records deleted undelivered by the `drop_oldest` policy.
    pub(super) dropped: AtomicU64,
    /// Live segments: the head and those still holding unreleased records (what counts
    /// toward `max_bytes`).
    pub(super) segments: Mutex<Vec<SegmentMeta>>,
    /// Wholly released segments kept for replays (replay retention).
    pub(super) retained: Mutex<RetainedSet>,
    /// Sequence ranges `repair` recorded as lost (`<dir>/GAPS`): with released sequences,
    /// the only gaps a reader skips.
    pub(super) gaps: Vec<(u64, u64)>,
    /// Group-commit histograms, moved by the writer thread.
    pub(super) commit: CommitMetrics,
    /// Holds the flock for as long as anything uses the journal.
    pub(super) _lock: File,
}

impl Inner {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic while copying bytes; the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(super) fn segments(&self) -> MutexGuard<'_, Vec<SegmentMeta>> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(super) fn retained(&self) -> MutexGuard<'_, RetainedSet> {
        self.retained.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The gateway's write-ahead log. Cheap to share behind an `Arc`.
pub struct SegmentedJournal {
    inner: Arc<Inner>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The journal's metrics (see [`SegmentedJournal::gather`]).
    defs: Defs,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SegmentedJournal {
    /// Opens (or creates) the journal in `cfg.dir`, recovering from any crash.
    pub fn open(cfg: JournalConfig) -> Result<Self, JournalError> {
        if cfg.segment_bytes < 4096 {
            return Err(JournalError::Config("segment_bytes must be at least 4096".into()));
        }
        if cfg.max_bytes / cfg.segment_bytes < 2 {
            return Err(JournalError::Config(format!(
                "max_bytes ({}) must hold at least two segments of {} bytes",
                cfg.max_bytes, cfg.segment_bytes
            )));
        }
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| JournalError::io(&dir, e))?;
        let lock = lock_dir(&dir)?;
        let _ = fs::remove_file(dir.join(format!("{CHECKPOINT}.tmp")));
        let _ = fs::remove_file(dir.join(format!("{}.tmp", ID_FILE)));
        let _ = fs::remove_file(dir.join(format!("{}.tmp", KEY_FILE)));
        let id = load_or_create_id(&dir)?;

        let mut segments = list_segments(&dir)?;
        let salt = load_or_create_key(&dir, &segments)?;
        if salt == Salt::NONE {
            tracing::warn!(
                dir = %dir.display(),
                "journal: created before salted record checksums (no JOURNAL_KEY): its records keep unsalted ones, \
                 which a vehicle could forge inside a payload; drain the journal and start on an empty directory to \
                 get a salted one"
            );
        }
        let checkpoint = read_checkpoint(&dir).unwrap_or(0);
        let gaps = read_gaps(&dir)?;
        if segments.is_empty() {
            let first = checkpoint + 1;
            let (_, path) = open_or_create_segment(&dir, first, cfg.segment_bytes)?;
            segments.push(SegmentMeta {
                first_seq: first,
                path,
                size: cfg.segment_bytes,
            });
        }
        let head_meta = segments
            .last()
            .cloned()
            .ok_or_else(|| JournalError::Config("no segment".into()))?;
        check_older_segments(&segments, checkpoint, &gaps, salt)?;
        // What the last process wrote but did not sync is synced (and the directory
        // entry with it) before the scan decides what is durable: see `settle_segment`.
        // Older segments were synced by the roll that ended them.
        settle_segment(&head_meta.path)?;
        sync_dir(&dir)?;
        let (file, scan) = recover_head(&head_meta, checkpoint, salt)?;
        let mut head_size = head_meta.size;
        if scan.end == 0 && head_size < cfg.segment_bytes {
            // An empty head left short by a roll that failed half-way (ENOSPC in
            // fallocate, then a crash): size it now, or the next roll would pick its name.
            // Best effort: on a still-full disk the writer's roll reuses the file instead.
            let sized = preallocate(&file, &head_meta.path, cfg.segment_bytes)
                .and_then(|()| file.sync_all().map_err(|e| JournalError::io(&head_meta.path, e)));
            match sized {
                Ok(()) => {
                    head_size = cfg.segment_bytes;
                    if let Some(last) = segments.last_mut() {
                        last.size = head_size;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "journal: cannot size the empty head segment yet"),
            }
        }
        let durable = scan.next_seq - 1;
        let first_retained = segments.first().map(|s| s.first_seq).unwrap_or(1);
        let mut released = checkpoint.max(first_retained.saturating_sub(1)).min(durable);
        // Sequences `repair` recorded as lost right after the watermark will never be
        // delivered: count them as released (they are not records waiting for Kafka).
        while let Some(&(_, last)) = gaps.iter().find(|(f, l)| *f <= released + 1 && released < *l) {
            let next = last.min(durable);
            if next <= released {
                break;
            }
            released = next;
        }
        // With replay retention, wholly released segments before the head (kept for
        // replays, or whose deletion was cut short) leave the live list for the retained
        // set; the writer's first round applies the window and the cap to them. Without
        // it they stay live and go with the next release, as always.
        let mut retained = RetainedSet::default();
        let keep = if cfg.replay_retention.enabled() {
            segments
                .windows(2)
                .take_while(|w| w[1].first_seq - 1 <= released)
                .count()
        } else {
            0
        };
        for meta in segments.drain(..keep).collect::<Vec<_>>() {
            let written_ms = written_ms(&meta);
            retained.push(RetainedSegment {
                meta,
                last_seq: 0,
                written_ms,
            });
        }
        // Each one ends where the next (retained or live) begins.
        let starts: Vec<u64> = retained
            .segs
            .iter()
            .skip(1)
            .map(|s| s.meta.first_seq)
            .chain(segments.first().map(|s| s.first_seq))
            .collect();
        for (seg, next) in retained.segs.iter_mut().zip(starts) {
            seg.last_seq = next - 1;
        }
        let disk_bytes: u64 = segments.iter().map(|s| s.size).sum();
        if disk_bytes > cfg.max_bytes {
            tracing::warn!(
                disk_bytes,
                max_bytes = cfg.max_bytes,
                "journal: segments on disk exceed journal.max_bytes (a smaller limit than when they were written); \
                 the journal is full until releases free them"
            );
        }
        tracing::info!(
            dir = %dir.display(),
            id = %id,
            segments = segments.len(),
            retained_segments = retained.segs.len(),
            next_seq = scan.next_seq,
            released,
            unreleased = durable - released,
            "journal: opened"
        );

        let head = Head {
            file,
            path: head_meta.path.clone(),
            offset: scan.end,
        };
        let (durable_tx, _) = watch::channel(durable);
        let defs = Defs::default();
        let commit = CommitMetrics::new(&defs);
        let inner = Arc::new(Inner {
            id,
            salt,
            state: Mutex::new(State {
                buf: Vec::new(),
                rolls: Vec::new(),
                next_seq: scan.next_seq,
                // The head's real size: it may come from an earlier, larger segment_bytes.
                head_remaining: head_size.saturating_sub(scan.end),
                planned_segments: segments.len() as u64,
                planned_bytes: disk_bytes,
                full: false,
                writer_waiting: false,
                stopped: None,
                stalled: None,
                closing: false,
                crash: None,
                marks: VecDeque::new(),
            }),
            cfg,
            wake_writer: Condvar::new(),
            space: Notify::new(),
            durable_tx,
            released: AtomicU64::new(released),
            syncs: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            segments: Mutex::new(segments),
            retained: Mutex::new(retained),
            gaps,
            commit,
            _lock: lock,
        });
        defs.collector(Box::new(StateGauges::new(inner.clone())));
        let writer_inner = inner.clone();
        let writer = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer_loop(writer_inner, head, released.max(checkpoint)))
            .map_err(|e| JournalError::io(&dir, e))?;
        Ok(SegmentedJournal {
            inner,
            writer: Mutex::new(Some(writer)),
            defs,
        })
    }

    /// The journal's metrics, for `/metrics`.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.defs.gather()
    }

    /// Waits until everything appended before this call is durable.
    pub async fn flush(&self) -> Result<(), JournalError> {
        let target = self.inner.state().next_seq - 1;
        let mut rx = self.inner.durable_tx.subscribe();
        loop {
            if *rx.borrow_and_update() >= target {
                return Ok(());
            }
            if let Some(why) = self.inner.state().stopped.clone() {
                return Err(JournalError::Stopped(why));
            }
            if rx.changed().await.is_err() {
                return Err(JournalError::Stopped("journal closed".into()));
            }
        }
    }

    /// The journal's identity: 128 random bits (hex) created with the journal and kept in
    /// `<dir>/JOURNAL_ID`. Sequences restart when a journal is recreated; the identity
    /// tells a consumer that this happened.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Released records a replay can re-send now: from the oldest retained segment (or
    /// the oldest live one) to the release watermark. `None` when replay retention is off
    /// or nothing is released.
    pub fn retained_range(&self) -> Option<RetainedRange> {
        let released = self.inner.released.load(Ordering::Acquire);
        let segs = self.inner.segments();
        let ret = self.inner.retained();
        retained_range(&segs, &ret, released, self.inner.cfg.replay_retention.enabled())
    }

    /// A reader of the released records `from_seq..=to_seq` for a replay, pinning the
    /// segments that hold them until it is dropped. Refused unless the whole range is
    /// retained (see [`SegmentedJournal::retained_range`]).
    pub fn replay_reader(&self, from_seq: u64, to_seq: u64) -> Result<ReplayReader, NotRetained> {
        ReplayReader::open(&self.inner, from_seq, to_seq)
    }

    /// True once the writer has stopped (disk error or closed): appends would fail.
    pub fn append_would_fail(&self) -> bool {
        self.inner.state().stopped.is_some()
    }

    /// Flushes what is buffered, persists the release watermark and stops the writer.
    pub fn close(&self) {
        self.stop_writer(|st| st.closing = true);
    }

    /// Test hook: stops the writer the way a `SIGKILL` would. Buffered appends are lost;
    /// with `torn_write` the first half of the buffer is written without a sync, as if
    /// the crash hit in the middle of a `write`.
    #[doc(hidden)]
    pub fn simulate_crash(&self, torn_write: bool) {
        self.stop_writer(|st| st.crash = Some(torn_write));
    }

    fn stop_writer(&self, how: impl FnOnce(&mut State)) {
        how(&mut self.inner.state());
        self.inner.wake_writer.notify_all();
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        let mut st = self.inner.state();
        st.stopped.get_or_insert_with(|| "journal closed".into());
        drop(st);
        self.inner.space.notify_waiters();
    }

    fn try_admit(&self, entry: EntryRef<'_>, flen: usize) -> Result<Admit, JournalError> {
        let inner = &self.inner;
        let mut st = inner.state();
        if let Some(why) = &st.stopped {
            return Err(JournalError::Stopped(why.clone()));
        }
        if !st.buf.is_empty() && st.buf.len() + flen > inner.cfg.max_buffer_bytes {
            return Ok(Admit::BufferFull);
        }
        let need_roll = flen as u64 > st.head_remaining;
        // A lone head is always allowed to roll (it cannot be deleted before that), even
        // when a larger `segment_bytes` of an earlier run makes it exceed `max_bytes`.
        let over = st.planned_bytes + inner.cfg.segment_bytes > inner.cfg.max_bytes;
        if need_roll && over && st.planned_segments > 1 {
            if !st.full {
                tracing::warn!(
                    max_bytes = inner.cfg.max_bytes,
                    "journal: full (journal.max_bytes reached); the journal-full policy applies"
                );
            }
            st.full = true;
            return Ok(Admit::DiskFull);
        }
        let seq = st.next_seq;
        let offset = st.buf.len();
        encode_salted(&mut st.buf, seq, entry, inner.salt)?;
        if need_roll {
            st.rolls.push((offset, seq));
            st.planned_segments += 1;
            st.planned_bytes += inner.cfg.segment_bytes;
            st.head_remaining = inner.cfg.segment_bytes;
        }
        st.head_remaining -= flen as u64;
        st.next_seq += 1;
        st.full = false;
        let due = st
            .marks
            .back()
            .is_none_or(|(_, ms)| entry.received_at_ms >= ms + MARK_INTERVAL_MS);
        if due {
            st.marks.push_back((seq, entry.received_at_ms));
        }
        let wake = st.writer_waiting;
        drop(st);
        if wake {
            inner.wake_writer.notify_one();
        }
        Ok(Admit::Admitted(seq))
    }

    /// The durable watermark now (what [`Journal::durable`] watches).
    pub fn durable_seq(&self) -> u64 {
        *self.inner.durable_tx.borrow()
    }

    /// Appends under a journal-full policy; see [`FullPolicy`]. Takes an [`Entry`] or
    /// an [`EntryRef`] (parts borrowed, nothing copied before the encode).
    pub async fn append_with<'a>(
        &self,
        entry: impl Into<EntryRef<'a>>,
        policy: FullPolicy,
    ) -> Result<Option<u64>, JournalError> {
        let entry = entry.into();
        let flen = self.frame_len_within_segment(entry)?;
        loop {
            let notified = self.inner.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_admit(entry, flen)? {
                Admit::Admitted(seq) => return Ok(Some(seq)),
                Admit::BufferFull => {}
                Admit::DiskFull => match policy {
                    FullPolicy::Backpressure => {}
                    FullPolicy::Reject => {
                        self.inner.rejected.fetch_add(1, Ordering::Relaxed);
                        return Ok(None);
                    }
                    FullPolicy::DropOldest => self.evict_oldest(),
                },
            }
            notified.await;
        }
    }

    /// Appends only if that needs no wait: what [`SegmentedJournal::append_with`] does
    /// without waiting, for a caller whose usual case should not hold a future (a
    /// vehicle's presence event at CONNECT). On [`TryAppend::Full`] nothing was done (the
    /// `DropOldest` policy evicts only in `append_with`).
    pub fn try_append_with<'a>(
        &self,
        entry: impl Into<EntryRef<'a>>,
        policy: FullPolicy,
    ) -> Result<TryAppend, JournalError> {
        let entry = entry.into();
        let flen = self.frame_len_within_segment(entry)?;
        Ok(match self.try_admit(entry, flen)? {
            Admit::Admitted(seq) => TryAppend::Appended(seq),
            Admit::DiskFull if policy == FullPolicy::Reject => {
                self.inner.rejected.fetch_add(1, Ordering::Relaxed);
                TryAppend::Rejected
            }
            Admit::BufferFull | Admit::DiskFull => TryAppend::Full,
        })
    }

    fn frame_len_within_segment(&self, entry: EntryRef<'_>) -> Result<usize, JournalError> {
        let flen = frame_len(entry);
        if flen as u64 > self.inner.cfg.segment_bytes {
            return Err(JournalError::TooLarge {
                len: flen,
                segment_bytes: self.inner.cfg.segment_bytes,
            });
        }
        Ok(flen)
    }

    /// Releases every record of the oldest segment, delivered or not (the explicit
    /// `drop_oldest` opt-in), so the writer deletes it. Counted and logged.
    fn evict_oldest(&self) {
        let upto = {
            let segs = self.inner.segments();
            match segs.get(1) {
                Some(next) => next.first_seq - 1,
                None => return,
            }
        };
        // Recorded before the release, so that the writer deletes the segment rather than
        // retaining it for replays: its records were never delivered.
        let first = self.inner.released.load(Ordering::Acquire) + 1;
        self.inner.retained().dropped.push((first, upto));
        let before = self.inner.released.fetch_max(upto, Ordering::AcqRel);
        if upto > before {
            let dropped = upto - before;
            self.inner.dropped.fetch_add(dropped, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                upto,
                "journal: full, dropped the oldest undelivered records (drop_oldest policy)"
            );
        }
        self.inner.wake_writer.notify_one();
    }
}

/// What an append does when the journal holds `max_bytes` (`[journal] full_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Wait for space: the session stops reading its socket and withholds PUBACKs.
    Backpressure,
    /// Refuse the message (MQTT 5 PUBACK 0x97); counted.
    Reject,
    /// Delete the oldest segment even if undelivered; explicit opt-in, counted.
    DropOldest,
}

enum Admit {
    Admitted(u64),
    BufferFull,
    DiskFull,
}

/// What [`SegmentedJournal::try_append_with`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryAppend {
    /// Admitted, with its sequence.
    Appended(u64),
    /// Refused: the journal is full and the policy is `Reject` (counted).
    Rejected,
    /// No room now (write buffer or journal full): `append_with` would wait.
    Full,
}

impl Drop for SegmentedJournal {
    fn drop(&mut self) {
        self.close();
    }
}

impl Journal for SegmentedJournal {
    async fn append(&self, entry: &Entry) -> Result<u64, JournalError> {
        // Back-pressure waits for space and never declines.
        let seq = self.append_with(entry, FullPolicy::Backpressure).await?;
        seq.ok_or_else(|| JournalError::Stopped("append declined under back-pressure".into()))
    }

    fn durable(&self) -> watch::Receiver<u64> {
        self.inner.durable_tx.subscribe()
    }

    fn reader(&self, from_seq: u64) -> JournalReader {
        JournalReader::new(self.inner.clone(), from_seq)
    }

    fn release(&self, seq: u64) {
        let durable = *self.inner.durable_tx.borrow();
        self.inner.released.fetch_max(seq.min(durable), Ordering::AcqRel);
    }

    fn stats(&self) -> JournalStats {
        stats_of(&self.inner)
    }
}

/// The journal's state now (see [`Journal::stats`]).
pub(super) fn stats_of(inner: &Inner) -> JournalStats {
    let released = inner.released.load(Ordering::Acquire);
    let durable = *inner.durable_tx.borrow();
    let (segments, disk_bytes, retained_segments, retained_bytes, retained) = {
        let segs = inner.segments();
        let ret = inner.retained();
        let enabled = inner.cfg.replay_retention.enabled();
        (
            segs.len() as u64,
            segs.iter().map(|s| s.size).sum(),
            ret.segs.len() as u64,
            ret.bytes,
            retained_range(&segs, &ret, released, enabled),
        )
    };
    let mut st = inner.state();
    while st.marks.len() > 1 && st.marks.get(1).is_some_and(|(s, _)| *s <= released + 1) {
        st.marks.pop_front();
    }
    let oldest_age = (durable > released)
        .then(|| {
            st.marks
                .front()
                .map(|(_, ms)| Duration::from_millis(now_ms().saturating_sub(*ms)))
        })
        .flatten();
    JournalStats {
        records: st.next_seq - 1 - released,
        disk_bytes,
        segments,
        retained_segments,
        retained_bytes,
        retained,
        oldest_age,
        next_seq: st.next_seq,
        durable_seq: durable,
        released_seq: released,
        syncs: inner.syncs.load(Ordering::Relaxed),
        full: st.full,
        rejected: inner.rejected.load(Ordering::Relaxed),
        dropped: inner.dropped.load(Ordering::Relaxed),
        stalled: st.stalled.clone(),
    }
}
