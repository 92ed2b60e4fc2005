//! The segmented, group-committed implementation of [`Journal`]; see the module doc of
//! [`crate::journal`] for the on-disk layout and the guarantees.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify};

use super::dir::{
    list_segments, load_or_create_id, lock_dir, open_or_create_segment, preallocate, sync_dir, write_durably,
    SegmentMeta,
};
use super::record::{decode, encode, frame_len, Frame, Record, FRAME_HEADER};
use super::scan;
use super::{Entry, Journal, JournalConfig, JournalError, JournalStats};

const CHECKPOINT: &str = "release.checkpoint";
/// How often the writer wakes without appends to persist releases and delete segments.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(200);
/// Granularity of the receive-time marks behind `oldest_age`.
const MARK_INTERVAL_MS: u64 = 1000;
/// Back-off of the writer while a transient I/O error lasts (doubling).
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Appender-side state; guarded by one mutex held only to copy a frame in.
struct State {
    buf: Vec<u8>,
    /// Offsets in `buf` where a new segment starts, with the sequence of its first record.
    rolls: Vec<(usize, u64)>,
    next_seq: u64,
    /// Free bytes in the head segment as planned by appenders (ahead of the writer).
    head_remaining: u64,
    /// Segments on disk plus those planned by `rolls`.
    planned_segments: u64,
    /// Bytes of those segments (real file sizes; planned ones at `segment_bytes`).
    planned_bytes: u64,
    full: bool,
    /// The writer is parked on the condvar: only then does an append pay for a wake-up
    /// (a futex syscall per append otherwise).
    writer_waiting: bool,
    stopped: Option<String>,
    /// The writer is retrying a transient I/O error; see [`JournalStats::stalled`].
    stalled: Option<String>,
    closing: bool,
    crash: Option<bool>,
    /// (first seq, receive time) samples, at most one a second, for `oldest_age`.
    marks: VecDeque<(u64, u64)>,
}

struct Inner {
    cfg: JournalConfig,
    id: String,
    state: Mutex<State>,
    wake_writer: Condvar,
    /// Signalled whenever buffer or disk space is freed, or the journal stops.
    space: Notify,
    durable_tx: watch::Sender<u64>,
    released: AtomicU64,
    syncs: AtomicU64,
    /// Appends refused by the `reject` policy.
    rejected: AtomicU64,
    /// Records deleted undelivered by the `drop_oldest` policy.
    dropped: AtomicU64,
    segments: Mutex<Vec<SegmentMeta>>,
    /// Holds the flock for as long as anything uses the journal.
    _lock: File,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic while copying bytes; the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn segments(&self) -> MutexGuard<'_, Vec<SegmentMeta>> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The gateway's write-ahead log. Cheap to share behind an `Arc`.
pub struct SegmentedJournal {
    inner: Arc<Inner>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn read_checkpoint(dir: &Path) -> Option<u64> {
    let bytes = fs::read(dir.join(CHECKPOINT)).ok()?;
    if bytes.len() != 12 {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[..8]);
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    (crc32c::crc32c(&seq) == crc).then(|| u64::from_le_bytes(seq))
}

fn write_checkpoint(dir: &Path, seq: u64) -> Result<(), JournalError> {
    let mut bytes = seq.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&seq.to_le_bytes()).to_le_bytes());
    write_durably(dir, CHECKPOINT, &bytes)
}

/// The head segment as the writer sees it.
struct Head {
    file: File,
    path: PathBuf,
    offset: u64,
}

/// Result of scanning the head segment on open.
struct Scan {
    next_seq: u64,
    end: u64,
}

/// Finds the end of the valid records of the head segment and cuts a torn tail.
///
/// Only the unsynced end of the last write batch can be torn: if any valid record follows
/// the first bad frame, the damage is corruption of written (maybe acknowledged) records,
/// and opening is refused rather than cutting them and re-using their sequences.
fn recover_head(meta: &SegmentMeta) -> Result<(File, Scan), JournalError> {
    let path = &meta.path;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| JournalError::io(path, e))?;
    let data = fs::read(path).map_err(|e| JournalError::io(path, e))?;
    let found = scan::scan(&data, meta.first_seq);
    if let Some(span) = found.mid_damage() {
        return Err(JournalError::Corrupt {
            segment: path.clone(),
            offset: span.offset,
            first_seq: span.after_seq + 1,
            last_seq: found.last_seq().unwrap_or(span.after_seq + 1),
            reason: format!(
                "{}; valid records follow it, so it is not a torn tail",
                span.reason
            ),
        });
    }
    let end = found.valid_end();
    let next_seq = found
        .runs
        .first()
        .filter(|r| r.start == 0)
        .map_or(meta.first_seq, |r| r.last_seq + 1);
    if let Some(span) = found.spans.first() {
        tracing::warn!(
            segment = %path.display(),
            offset = span.offset,
            bytes = span.len,
            reason = span.reason,
            "journal: cutting torn tail left by an interrupted write (never acknowledged)"
        );
        file.set_len(end).map_err(|e| JournalError::io(path, e))?;
        preallocate(&file, path, data.len() as u64)?;
        file.sync_all().map_err(|e| JournalError::io(path, e))?;
    }
    Ok((file, Scan { next_seq, end }))
}

/// Cheap check of the segments before the head at open: each one still holding
/// unreleased records must start with a valid record carrying the sequence of its name.
/// (A full scan of every segment at every start would read the whole journal; `verify`
/// does that, and the reader checks every frame it forwards.)
fn check_older_segments(segments: &[SegmentMeta], released: u64) -> Result<(), JournalError> {
    for pair in segments.windows(2) {
        let (seg, next) = (&pair[0], &pair[1]);
        if next.first_seq.saturating_sub(1) <= released {
            continue;
        }
        let problem = first_frame_problem(seg)?;
        if let Some(reason) = problem {
            return Err(JournalError::Corrupt {
                segment: seg.path.clone(),
                offset: 0,
                first_seq: seg.first_seq.max(released + 1),
                last_seq: next.first_seq - 1,
                reason,
            });
        }
    }
    Ok(())
}

fn first_frame_problem(seg: &SegmentMeta) -> Result<Option<String>, JournalError> {
    if seg.size < scan::MIN_FRAME as u64 {
        return Ok(Some(format!(
            "segment is {} bytes, too small to hold a record",
            seg.size
        )));
    }
    let file = File::open(&seg.path).map_err(|e| JournalError::io(&seg.path, e))?;
    let mut header = [0u8; FRAME_HEADER];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| JournalError::io(&seg.path, e))?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
    if len == 0 || FRAME_HEADER as u64 + len > seg.size {
        return Ok(Some(format!("first frame has an impossible length {len}")));
    }
    let mut frame = vec![0u8; FRAME_HEADER + len as usize];
    file.read_exact_at(&mut frame, 0)
        .map_err(|e| JournalError::io(&seg.path, e))?;
    Ok(match decode(&frame) {
        Frame::Record(rec, _) if rec.seq == seg.first_seq => None,
        Frame::Record(rec, _) => Some(format!(
            "first record has sequence {}, the file name says {}",
            rec.seq, seg.first_seq
        )),
        Frame::End => Some("first frame is empty".into()),
        Frame::Torn(why) => Some(format!("first frame: {why}")),
    })
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
        let _ = fs::remove_file(dir.join(format!("{}.tmp", super::dir::ID_FILE)));
        let id = load_or_create_id(&dir)?;

        let mut segments = list_segments(&dir)?;
        let checkpoint = read_checkpoint(&dir).unwrap_or(0);
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
        check_older_segments(&segments, checkpoint)?;
        let (file, scan) = recover_head(&head_meta)?;
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
        let released = checkpoint.max(first_retained.saturating_sub(1)).min(durable);
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
        let inner = Arc::new(Inner {
            id,
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
            _lock: lock,
        });
        let writer_inner = inner.clone();
        let writer = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer_loop(writer_inner, head, released.max(checkpoint)))
            .map_err(|e| JournalError::io(&dir, e))?;
        Ok(SegmentedJournal {
            inner,
            writer: Mutex::new(Some(writer)),
        })
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

    fn try_admit(&self, entry: &Entry, flen: usize) -> Result<Admit, JournalError> {
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
        encode(&mut st.buf, seq, entry)?;
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

    /// Appends under a journal-full policy; see [`FullPolicy`].
    pub async fn append_with(&self, entry: &Entry, policy: FullPolicy) -> Result<Option<u64>, JournalError> {
        let flen = frame_len(entry);
        if flen as u64 > self.inner.cfg.segment_bytes {
            return Err(JournalError::TooLarge {
                len: flen,
                segment_bytes: self.inner.cfg.segment_bytes,
            });
        }
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
        JournalReader {
            inner: self.inner.clone(),
            next_seq: from_seq,
            seg: None,
        }
    }

    fn release(&self, seq: u64) {
        let durable = *self.inner.durable_tx.borrow();
        self.inner.released.fetch_max(seq.min(durable), Ordering::AcqRel);
    }

    fn stats(&self) -> JournalStats {
        let inner = &self.inner;
        let released = inner.released.load(Ordering::Acquire);
        let durable = *inner.durable_tx.borrow();
        let (segments, disk_bytes) = {
            let segs = inner.segments();
            (segs.len() as u64, segs.iter().map(|s| s.size).sum())
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
}

/// The writer thread: takes whole batches, writes, syncs once, publishes durability.
///
/// A transient I/O error (ENOSPC, EDQUOT, EMFILE, ENFILE, EIO) does not stop it: the batch
/// stays in memory, `stalled` says why, the durable watermark stays where it is (so no
/// PUBACK goes out and appenders back-pressure once the buffer is full), and the whole
/// batch is rewritten from memory at the same offsets after a back-off. Rewriting rather
/// than re-syncing matters after a failed `fdatasync`: the kernel may have dropped the
/// dirty pages and marked them clean ("fsyncgate"), so a second sync could succeed on
/// data that never reached the disk.
fn writer_loop(inner: Arc<Inner>, mut head: Head, checkpointed: u64) {
    let mut maint = Maintenance {
        seq: checkpointed,
        at: std::time::Instant::now(),
        orphans: Vec::new(),
    };
    let mut batch = Vec::new();
    let mut rolls = Vec::new();
    let mut last_seq = 0;
    // Where the pending batch starts; a retry rewrites it from there.
    let mut start: Option<(PathBuf, u64)> = None;
    let mut backoff = RETRY_MIN;
    loop {
        let exit = {
            let mut st = inner.state();
            loop {
                if let Some(torn) = st.crash {
                    if torn && !st.buf.is_empty() && batch.is_empty() {
                        let half = st.buf.len() / 2;
                        let end = st.rolls.first().map_or(half, |(off, _)| half.min(*off));
                        let _ = head.file.write_all_at(&st.buf[..end], head.offset);
                    }
                    st.buf.clear();
                    return;
                }
                if !batch.is_empty() {
                    break;
                }
                let maintenance_due = maint.due(&inner, false);
                if !st.buf.is_empty() || maintenance_due || st.closing {
                    break;
                }
                st.writer_waiting = true;
                st = inner
                    .wake_writer
                    .wait_timeout(st, MAINTENANCE_INTERVAL)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
                st.writer_waiting = false;
            }
            if batch.is_empty() && !st.buf.is_empty() {
                std::mem::swap(&mut st.buf, &mut batch);
                std::mem::swap(&mut st.rolls, &mut rolls);
                last_seq = st.next_seq - 1;
                start = Some((head.path.clone(), head.offset));
            }
            st.closing
        };
        let mut result = Ok(());
        if let Some((path, offset)) = &start {
            result = rewind(&mut head, path, *offset)
                .and_then(|()| write_batch(&inner, &mut head, &batch, &rolls));
            if result.is_ok() {
                inner.syncs.fetch_add(1, Ordering::Relaxed);
                inner.durable_tx.send_replace(last_seq);
                batch.clear();
                rolls.clear();
                start = None;
                inner.space.notify_waiters();
            }
        }
        if result.is_ok() {
            result = maintain(&inner, &mut maint, exit);
        }
        match result {
            Ok(()) => {
                backoff = RETRY_MIN;
                let recovered = inner.state().stalled.take();
                if let Some(was) = recovered {
                    tracing::info!(
                        durable = *inner.durable_tx.borrow(),
                        was = %was,
                        "journal: writer recovered; acknowledgements resume"
                    );
                }
                if exit && inner.state().buf.is_empty() {
                    return;
                }
            }
            Err(e) if is_transient(&e) && !exit => {
                stall(&inner, &e);
                pause(&inner, backoff);
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            Err(e) => {
                tracing::error!(error = %e, "journal: writer failed; no further message will be acknowledged");
                inner.state().stopped = Some(e.to_string());
                inner.space.notify_waiters();
                return;
            }
        }
    }
}

/// Errors the writer waits out instead of stopping for good.
fn is_transient(e: &JournalError) -> bool {
    let JournalError::Io { source, .. } = e else {
        return false;
    };
    use rustix::io::Errno;
    [Errno::NOSPC, Errno::DQUOT, Errno::MFILE, Errno::NFILE, Errno::IO]
        .iter()
        .any(|errno| source.raw_os_error() == Some(errno.raw_os_error()))
}

/// Marks the journal stalled; logs once per stall.
fn stall(inner: &Inner, e: &JournalError) {
    let durable = *inner.durable_tx.borrow();
    let mut st = inner.state();
    if st.stalled.is_none() {
        tracing::error!(
            error = %e,
            durable,
            "journal: writer stalled on an I/O error; retrying with back-off, acknowledgements withheld until it succeeds"
        );
    }
    st.stalled = Some(format!("{e} (retrying; durable held at {durable})"));
}

/// Sleeps for the back-off; cut short by close or crash.
fn pause(inner: &Inner, backoff: Duration) {
    let deadline = std::time::Instant::now() + backoff;
    let mut st = inner.state();
    while st.crash.is_none() && !st.closing {
        let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
            break;
        };
        st = inner
            .wake_writer
            .wait_timeout(st, left)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

/// Puts the head back where the pending batch starts (a no-op on the first attempt).
fn rewind(head: &mut Head, path: &Path, offset: u64) -> Result<(), JournalError> {
    if head.path != path {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| JournalError::io(path, e))?;
        *head = Head {
            file,
            path: path.to_path_buf(),
            offset,
        };
    }
    head.offset = offset;
    Ok(())
}

/// Writes one batch and syncs it. Idempotent: running it again after a failure writes
/// the same bytes at the same offsets and reuses segments an earlier attempt created.
fn write_batch(
    inner: &Inner,
    head: &mut Head,
    batch: &[u8],
    rolls: &[(usize, u64)],
) -> Result<(), JournalError> {
    let mut start = 0;
    for &(off, first_seq) in rolls {
        write_at(head, &batch[start..off])?;
        head.file
            .sync_data()
            .map_err(|e| JournalError::io(&head.path, e))?;
        let (file, path) = open_or_create_segment(&inner.cfg.dir, first_seq, inner.cfg.segment_bytes)?;
        {
            let mut segs = inner.segments();
            match segs.last_mut() {
                // Created by an earlier attempt of this batch, or an empty head that a
                // failed roll left short: the same file, now sized.
                Some(last) if last.first_seq == first_seq => {
                    last.size = last.size.max(inner.cfg.segment_bytes)
                }
                _ => segs.push(SegmentMeta {
                    first_seq,
                    path: path.clone(),
                    size: inner.cfg.segment_bytes,
                }),
            }
        }
        *head = Head {
            file,
            path,
            offset: 0,
        };
        start = off;
    }
    write_at(head, &batch[start..])?;
    head.file
        .sync_data()
        .map_err(|e| JournalError::io(&head.path, e))?;
    Ok(())
}

fn write_at(head: &mut Head, bytes: &[u8]) -> Result<(), JournalError> {
    head.file
        .write_all_at(bytes, head.offset)
        .map_err(|e| JournalError::io(&head.path, e))?;
    head.offset += bytes.len() as u64;
    Ok(())
}

/// The writer's housekeeping state: the last persisted release watermark, when it was
/// written, and segment files already out of the list whose unlink failed.
struct Maintenance {
    seq: u64,
    at: std::time::Instant,
    orphans: Vec<SegmentMeta>,
}

impl Maintenance {
    /// Whether to persist now. The checkpoint only bounds how much is re-sent after a
    /// restart, so it is written at most every `MAINTENANCE_INTERVAL` (three syncs each
    /// time: writing it on every group commit quadrupled the commit latency) — except
    /// when a segment became deletable (space is waiting on it) or on close.
    fn due(&self, inner: &Inner, force: bool) -> bool {
        if !self.orphans.is_empty() {
            return true;
        }
        let released = inner.released.load(Ordering::Acquire);
        if released <= self.seq {
            return false;
        }
        if force || self.at.elapsed() >= MAINTENANCE_INTERVAL {
            return true;
        }
        let segs = inner.segments();
        segs.get(1).is_some_and(|next| next.first_seq - 1 <= released)
    }
}

/// Persists the release watermark, then deletes segments whose records are all released.
///
/// A segment leaves the in-memory list *before* its file is unlinked, so a reader never
/// looks up a segment whose file is gone (a reader that raced the lookup retries).
fn maintain(inner: &Inner, maint: &mut Maintenance, force: bool) -> Result<(), JournalError> {
    if !maint.due(inner, force) {
        return Ok(());
    }
    let released = inner.released.load(Ordering::Acquire);
    if released > maint.seq {
        write_checkpoint(&inner.cfg.dir, released)?;
        maint.seq = released;
        maint.at = std::time::Instant::now();
    }
    {
        let mut segs = inner.segments();
        let n = segs
            .windows(2)
            .take_while(|w| w[1].first_seq - 1 <= released)
            .count();
        maint.orphans.extend(segs.drain(..n));
    }
    if maint.orphans.is_empty() {
        return Ok(());
    }
    while let Some(seg) = maint.orphans.first() {
        match fs::remove_file(&seg.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(JournalError::io(&seg.path, e)),
        }
        let seg = maint.orphans.remove(0);
        let mut st = inner.state();
        st.planned_segments -= 1;
        st.planned_bytes = st.planned_bytes.saturating_sub(seg.size);
    }
    sync_dir(&inner.cfg.dir)?;
    inner.space.notify_waiters();
    Ok(())
}

/// Sequential reader of durable records, for the Kafka producer and for inspection.
///
/// Returns every durable record in sequence order. It jumps over sequence gaps between
/// segments (segments evicted by `drop_oldest`, records lost to a repaired corruption)
/// and returns [`JournalError::Corrupt`] for anything else it cannot read: it never skips
/// a damaged record silently.
pub struct JournalReader {
    inner: Arc<Inner>,
    next_seq: u64,
    seg: Option<OpenSegment>,
}

struct OpenSegment {
    file: File,
    path: PathBuf,
    first_seq: u64,
    /// File offset of `chunk[0]`.
    chunk_offset: u64,
    chunk: Vec<u8>,
    pos: usize,
}

const READ_CHUNK: usize = 1 << 20;

impl OpenSegment {
    /// Reads a fresh chunk starting at the current position, at least `need` bytes.
    fn refill(&mut self, need: usize) -> Result<(), JournalError> {
        let offset = self.chunk_offset + self.pos as u64;
        let len = need.max(READ_CHUNK);
        self.chunk.resize(len, 0);
        let mut filled = 0;
        while filled < len {
            match self
                .file
                .read_at(&mut self.chunk[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(JournalError::io(&self.path, e)),
            }
        }
        self.chunk.truncate(filled);
        self.chunk_offset = offset;
        self.pos = 0;
        Ok(())
    }

    fn offset(&self) -> u64 {
        self.chunk_offset + self.pos as u64
    }

    /// Offset of the first non-zero byte from the current position to the end of file.
    fn first_nonzero(&mut self) -> Result<Option<u64>, JournalError> {
        loop {
            if let Some(i) = self.chunk[self.pos..].iter().position(|b| *b != 0) {
                return Ok(Some(self.offset() + i as u64));
            }
            self.pos = self.chunk.len();
            self.refill(READ_CHUNK)?;
            if self.chunk.is_empty() {
                return Ok(None);
            }
        }
    }
}

impl JournalReader {
    /// The sequence the next returned record will have (or, after a gap, the first
    /// sequence the reader will look for).
    pub fn position(&self) -> u64 {
        self.next_seq
    }

    /// Up to `max` durable records in sequence order; empty when caught up.
    pub fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, JournalError> {
        let durable = *self.inner.durable_tx.borrow();
        self.leave_evicted_segment();
        let mut out = Vec::new();
        while out.len() < max && self.next_seq <= durable {
            if self.seg.is_none() && !self.open_segment()? {
                break;
            }
            let Some(seg) = self.seg.as_mut() else { break };
            let rest = &seg.chunk[seg.pos..];
            let need = if rest.len() >= FRAME_HEADER {
                FRAME_HEADER + u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize
            } else {
                FRAME_HEADER
            };
            if rest.len() < need {
                let before = seg.chunk.len() - seg.pos;
                seg.refill(need)?;
                if seg.chunk.len() > before {
                    continue;
                }
            }
            match decode(&seg.chunk[seg.pos..]) {
                Frame::Record(rec, n) => {
                    let at = seg.offset();
                    seg.pos += n;
                    if rec.seq == self.next_seq {
                        self.next_seq += 1;
                        out.push(rec);
                    } else if rec.seq > self.next_seq {
                        return Err(self.corrupt(
                            at,
                            durable,
                            format!("expected sequence {} found {}", self.next_seq, rec.seq),
                        ));
                    }
                }
                // Either cached bytes the writer had not finished when they were read, or
                // the unwritten rest of this segment: read again, then decide.
                Frame::End | Frame::Torn(_) => {
                    seg.refill(need)?;
                    match decode(&seg.chunk[seg.pos..]) {
                        Frame::Record(..) => {}
                        Frame::End => self.next_segment(durable)?,
                        Frame::Torn(why) => {
                            let at = seg.offset();
                            return Err(self.corrupt(at, durable, why.to_string()));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn corrupt(&self, offset: u64, last_seq: u64, reason: String) -> JournalError {
        let segment = self
            .seg
            .as_ref()
            .map(|s| s.path.clone())
            .unwrap_or_else(|| self.inner.cfg.dir.clone());
        JournalError::Corrupt {
            segment,
            offset,
            first_seq: self.next_seq,
            last_seq: last_seq.max(self.next_seq),
            reason,
        }
    }

    /// `drop_oldest` may evict the segment being read: continue with the next retained one.
    fn leave_evicted_segment(&mut self) {
        let Some(seg) = &self.seg else { return };
        let first_retained = self.inner.segments().first().map(|s| s.first_seq);
        if first_retained.is_some_and(|f| f > seg.first_seq) {
            self.seg = None;
        }
    }

    /// The current segment ended (zeros or end of file) before `durable`: move to the next
    /// segment. A sequence gap before it is legal only if nothing follows in this segment
    /// (an evicted or repaired journal); otherwise the zeros hide damage.
    fn next_segment(&mut self, durable: u64) -> Result<(), JournalError> {
        let Some(seg) = self.seg.as_mut() else {
            return Ok(());
        };
        let end = seg.offset();
        let finished = seg.first_seq;
        let next = {
            let segs = self.inner.segments();
            segs.iter().find(|s| s.first_seq > finished).map(|s| s.first_seq)
        };
        let Some(next) = next else {
            return Err(self.corrupt(
                end,
                durable,
                format!(
                    "durable sequence {} missing at the end of the journal",
                    self.next_seq
                ),
            ));
        };
        if next > self.next_seq {
            if let Some(at) = seg.first_nonzero()? {
                return Err(self.corrupt(
                    at,
                    next - 1,
                    format!(
                        "records {}..{} missing: the segment has zeros at byte {end} and data after them",
                        self.next_seq,
                        next - 1
                    ),
                ));
            }
            tracing::debug!(
                from = self.next_seq,
                to = next,
                "journal reader: skipping a sequence gap"
            );
            self.next_seq = next;
        }
        self.seg = None;
        if !self.open_segment()? || self.seg.as_ref().is_some_and(|s| s.first_seq == finished) {
            return Err(self.corrupt(
                end,
                durable,
                format!("durable sequence {} missing", self.next_seq),
            ));
        }
        Ok(())
    }

    /// Opens the segment holding `next_seq`; skips forward over deleted (released or
    /// evicted) ones, also when one is deleted between looking it up and opening it.
    fn open_segment(&mut self) -> Result<bool, JournalError> {
        loop {
            let meta = {
                let segs = self.inner.segments();
                let Some(first) = segs.first() else {
                    return Ok(false);
                };
                if self.next_seq < first.first_seq {
                    self.next_seq = first.first_seq;
                }
                let idx = segs.partition_point(|s| s.first_seq <= self.next_seq);
                match idx.checked_sub(1).and_then(|i| segs.get(i)) {
                    Some(m) => m.clone(),
                    None => return Ok(false),
                }
            };
            let file = match File::open(&meta.path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let still_listed = self
                        .inner
                        .segments()
                        .iter()
                        .any(|s| s.first_seq == meta.first_seq);
                    if still_listed {
                        return Err(JournalError::io(&meta.path, e));
                    }
                    continue;
                }
                Err(e) => return Err(JournalError::io(&meta.path, e)),
            };
            self.seg = Some(OpenSegment {
                file,
                path: meta.path,
                first_seq: meta.first_seq,
                chunk_offset: 0,
                chunk: Vec::new(),
                pos: 0,
            });
            return Ok(true);
        }
    }
}

impl std::fmt::Debug for JournalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seg = self.seg.as_ref().map(|s| s.first_seq);
        f.debug_struct("JournalReader")
            .field("next_seq", &self.next_seq)
            .field("segment", &seg)
            .finish()
    }
}
