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

use rustix::fs::{FallocateFlags, FlockOperation};
use tokio::sync::{watch, Notify};

use super::record::{decode, encode, frame_len, Frame, Record, FRAME_HEADER};
use super::{Entry, Journal, JournalConfig, JournalError, JournalStats};

const CHECKPOINT: &str = "release.checkpoint";
const SEGMENT_EXT: &str = "seg";
/// How often the writer wakes without appends to persist releases and delete segments.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(200);
/// Granularity of the receive-time marks behind `oldest_age`.
const MARK_INTERVAL_MS: u64 = 1000;

#[derive(Debug, Clone)]
struct SegmentMeta {
    first_seq: u64,
    path: PathBuf,
}

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
    full: bool,
    /// The writer is parked on the condvar: only then does an append pay for a wake-up
    /// (a futex syscall per append otherwise).
    writer_waiting: bool,
    stopped: Option<String>,
    closing: bool,
    crash: Option<bool>,
    /// (first seq, receive time) samples, at most one a second, for `oldest_age`.
    marks: VecDeque<(u64, u64)>,
}

struct Inner {
    cfg: JournalConfig,
    max_segments: u64,
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

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.{SEGMENT_EXT}"))
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| JournalError::io(dir, e))
}

/// Creates a zero-filled, pre-allocated segment and makes its existence durable.
fn create_segment(dir: &Path, first_seq: u64, size: u64) -> Result<(File, PathBuf), JournalError> {
    let path = segment_path(dir, first_seq);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| JournalError::io(&path, e))?;
    preallocate(&file, &path, size)?;
    file.sync_all().map_err(|e| JournalError::io(&path, e))?;
    sync_dir(dir)?;
    Ok((file, path))
}

fn preallocate(file: &File, path: &Path, size: u64) -> Result<(), JournalError> {
    match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        // Filesystems without fallocate (tmpfs on old kernels, some overlays): a sparse
        // file still reads as zeros, which is all the format needs.
        Err(rustix::io::Errno::OPNOTSUPP) => file.set_len(size).map_err(|e| JournalError::io(path, e)),
        Err(e) => Err(JournalError::io(path, e.into())),
    }
}

fn read_checkpoint(dir: &Path) -> Option<u64> {
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
    let tmp = dir.join(format!("{CHECKPOINT}.tmp"));
    let mut bytes = seq.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&seq.to_le_bytes()).to_le_bytes());
    let file = File::create(&tmp).map_err(|e| JournalError::io(&tmp, e))?;
    file.write_all_at(&bytes, 0)
        .map_err(|e| JournalError::io(&tmp, e))?;
    file.sync_all().map_err(|e| JournalError::io(&tmp, e))?;
    let dst = dir.join(CHECKPOINT);
    fs::rename(&tmp, &dst).map_err(|e| JournalError::io(&dst, e))?;
    sync_dir(dir)
}

fn list_segments(dir: &Path) -> Result<Vec<SegmentMeta>, JournalError> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir).map_err(|e| JournalError::io(dir, e))? {
        let ent = ent.map_err(|e| JournalError::io(dir, e))?;
        let path = ent.path();
        if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXT) {
            continue;
        }
        let Some(first_seq) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        out.push(SegmentMeta { first_seq, path });
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
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
fn recover_head(meta: &SegmentMeta, size: u64) -> Result<(File, Scan), JournalError> {
    let path = &meta.path;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| JournalError::io(path, e))?;
    let data = fs::read(path).map_err(|e| JournalError::io(path, e))?;
    let mut pos = 0usize;
    let mut next_seq = meta.first_seq;
    let mut torn = None;
    while pos < data.len() {
        match decode(&data[pos..]) {
            Frame::Record(rec, n) if rec.seq == next_seq => {
                pos += n;
                next_seq += 1;
            }
            Frame::Record(..) => {
                torn = Some("unexpected sequence");
                break;
            }
            Frame::End => break,
            Frame::Torn(why) => {
                torn = Some(why);
                break;
            }
        }
    }
    let garbage = data[pos..].iter().any(|b| *b != 0);
    if torn.is_some() || garbage {
        tracing::warn!(
            segment = %path.display(),
            offset = pos,
            reason = torn.unwrap_or("bytes after the last record"),
            "journal: cutting torn tail left by an interrupted write (never acknowledged)"
        );
        file.set_len(pos as u64).map_err(|e| JournalError::io(path, e))?;
        preallocate(&file, path, size.max(data.len() as u64))?;
        file.sync_all().map_err(|e| JournalError::io(path, e))?;
    }
    Ok((
        file,
        Scan {
            next_seq,
            end: pos as u64,
        },
    ))
}

impl SegmentedJournal {
    /// Opens (or creates) the journal in `cfg.dir`, recovering from any crash.
    pub fn open(cfg: JournalConfig) -> Result<Self, JournalError> {
        if cfg.segment_bytes < 4096 {
            return Err(JournalError::Config("segment_bytes must be at least 4096".into()));
        }
        let max_segments = cfg.max_bytes / cfg.segment_bytes;
        if max_segments < 2 {
            return Err(JournalError::Config(format!(
                "max_bytes ({}) must hold at least two segments of {} bytes",
                cfg.max_bytes, cfg.segment_bytes
            )));
        }
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| JournalError::io(&dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| JournalError::io(&lock_path, e))?;
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(JournalError::Locked(dir));
        }
        let _ = fs::remove_file(dir.join(format!("{CHECKPOINT}.tmp")));

        let mut segments = list_segments(&dir)?;
        let checkpoint = read_checkpoint(&dir).unwrap_or(0);
        if segments.is_empty() {
            let first = checkpoint + 1;
            let (_, path) = create_segment(&dir, first, cfg.segment_bytes)?;
            segments.push(SegmentMeta {
                first_seq: first,
                path,
            });
        }
        let head_meta = segments
            .last()
            .cloned()
            .ok_or_else(|| JournalError::Config("no segment".into()))?;
        let (file, scan) = recover_head(&head_meta, cfg.segment_bytes)?;
        let durable = scan.next_seq - 1;
        let first_retained = segments.first().map(|s| s.first_seq).unwrap_or(1);
        let released = checkpoint.max(first_retained.saturating_sub(1)).min(durable);
        tracing::info!(
            dir = %dir.display(),
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
            max_segments,
            state: Mutex::new(State {
                buf: Vec::new(),
                rolls: Vec::new(),
                next_seq: scan.next_seq,
                head_remaining: cfg.segment_bytes - scan.end,
                planned_segments: segments.len() as u64,
                full: false,
                writer_waiting: false,
                stopped: None,
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
        if need_roll && st.planned_segments >= inner.max_segments {
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
        let segments = inner.segments().len() as u64;
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
            disk_bytes: segments * inner.cfg.segment_bytes,
            segments,
            oldest_age,
            next_seq: st.next_seq,
            durable_seq: durable,
            released_seq: released,
            syncs: inner.syncs.load(Ordering::Relaxed),
            full: st.full,
            rejected: inner.rejected.load(Ordering::Relaxed),
            dropped: inner.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The writer thread: takes whole batches, writes, syncs once, publishes durability.
fn writer_loop(inner: Arc<Inner>, mut head: Head, checkpointed: u64) {
    let mut checkpointed = Checkpoint {
        seq: checkpointed,
        at: std::time::Instant::now(),
    };
    let mut spare = Vec::new();
    let mut rolls = Vec::new();
    loop {
        let (last_seq, exit) = {
            let mut st = inner.state();
            loop {
                if let Some(torn) = st.crash {
                    if torn && !st.buf.is_empty() {
                        let half = st.buf.len() / 2;
                        let end = st.rolls.first().map_or(half, |(off, _)| half.min(*off));
                        let _ = head.file.write_all_at(&st.buf[..end], head.offset);
                    }
                    st.buf.clear();
                    return;
                }
                let release_due = checkpointed.due(&inner, false);
                if !st.buf.is_empty() || release_due || st.closing {
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
            std::mem::swap(&mut st.buf, &mut spare);
            std::mem::swap(&mut st.rolls, &mut rolls);
            (st.next_seq - 1, st.closing)
        };
        let result = write_batch(&inner, &mut head, &spare, &rolls).and_then(|wrote| {
            if wrote {
                inner.syncs.fetch_add(1, Ordering::Relaxed);
                inner.durable_tx.send_replace(last_seq);
            }
            spare.clear();
            rolls.clear();
            inner.space.notify_waiters();
            maintain(&inner, &mut checkpointed, exit)
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "journal: writer failed; no further message will be acknowledged");
            inner.state().stopped = Some(e.to_string());
            inner.space.notify_waiters();
            return;
        }
        if exit && inner.state().buf.is_empty() {
            return;
        }
    }
}

fn write_batch(
    inner: &Inner,
    head: &mut Head,
    batch: &[u8],
    rolls: &[(usize, u64)],
) -> Result<bool, JournalError> {
    if batch.is_empty() {
        return Ok(false);
    }
    let mut start = 0;
    for &(off, first_seq) in rolls {
        write_at(head, &batch[start..off])?;
        head.file
            .sync_data()
            .map_err(|e| JournalError::io(&head.path, e))?;
        let (file, path) = create_segment(&inner.cfg.dir, first_seq, inner.cfg.segment_bytes)?;
        inner.segments().push(SegmentMeta {
            first_seq,
            path: path.clone(),
        });
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
    Ok(true)
}

fn write_at(head: &mut Head, bytes: &[u8]) -> Result<(), JournalError> {
    head.file
        .write_all_at(bytes, head.offset)
        .map_err(|e| JournalError::io(&head.path, e))?;
    head.offset += bytes.len() as u64;
    Ok(())
}

/// The last persisted release watermark and when it was written.
struct Checkpoint {
    seq: u64,
    at: std::time::Instant,
}

impl Checkpoint {
    /// Whether to persist now. The checkpoint only bounds how much is re-sent after a
    /// restart, so it is written at most every `MAINTENANCE_INTERVAL` (three syncs each
    /// time: writing it on every group commit quadrupled the commit latency) — except
    /// when a segment became deletable (space is waiting on it) or on close.
    fn due(&self, inner: &Inner, force: bool) -> bool {
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
fn maintain(inner: &Inner, checkpointed: &mut Checkpoint, force: bool) -> Result<(), JournalError> {
    if !checkpointed.due(inner, force) {
        return Ok(());
    }
    let released = inner.released.load(Ordering::Acquire);
    write_checkpoint(&inner.cfg.dir, released)?;
    *checkpointed = Checkpoint {
        seq: released,
        at: std::time::Instant::now(),
    };
    let doomed: Vec<SegmentMeta> = {
        let segs = inner.segments();
        let n = segs
            .windows(2)
            .take_while(|w| w[1].first_seq - 1 <= released)
            .count();
        segs[..n].to_vec()
    };
    if doomed.is_empty() {
        return Ok(());
    }
    for seg in &doomed {
        fs::remove_file(&seg.path).map_err(|e| JournalError::io(&seg.path, e))?;
    }
    sync_dir(&inner.cfg.dir)?;
    inner.segments().drain(..doomed.len());
    inner.state().planned_segments -= doomed.len() as u64;
    inner.space.notify_waiters();
    Ok(())
}

/// Sequential reader of durable records, for the Kafka producer and for inspection.
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
}

impl JournalReader {
    /// The sequence the next returned record will have.
    pub fn position(&self) -> u64 {
        self.next_seq
    }

    /// Up to `max` durable records in sequence order; empty when caught up.
    pub fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, JournalError> {
        let durable = *self.inner.durable_tx.borrow();
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
                    seg.pos += n;
                    if rec.seq == self.next_seq {
                        self.next_seq += 1;
                        out.push(rec);
                    } else if rec.seq > self.next_seq {
                        return Err(self.corrupt(format!("expected seq {} found {}", self.next_seq, rec.seq)));
                    }
                }
                // Either cached bytes the writer had not finished when they were read, or
                // the unwritten rest of this segment: read again, then decide.
                Frame::End | Frame::Torn(_) => {
                    seg.refill(need)?;
                    match decode(&seg.chunk[seg.pos..]) {
                        Frame::Record(..) => {}
                        Frame::End => {
                            let finished = seg.first_seq;
                            self.seg = None;
                            if !self.open_segment()?
                                || self.seg.as_ref().is_some_and(|s| s.first_seq == finished)
                            {
                                return Err(self.corrupt(format!("durable seq {} missing", self.next_seq)));
                            }
                        }
                        Frame::Torn(why) => {
                            return Err(self.corrupt(format!("durable seq {}: {why}", self.next_seq)));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn corrupt(&self, what: String) -> JournalError {
        let path = self
            .seg
            .as_ref()
            .map(|s| s.path.clone())
            .unwrap_or_else(|| self.inner.cfg.dir.clone());
        JournalError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, what))
    }

    /// Opens the segment holding `next_seq`; skips forward over deleted (released) ones.
    fn open_segment(&mut self) -> Result<bool, JournalError> {
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
        let file = File::open(&meta.path).map_err(|e| JournalError::io(&meta.path, e))?;
        self.seg = Some(OpenSegment {
            file,
            path: meta.path,
            first_seq: meta.first_seq,
            chunk_offset: 0,
            chunk: Vec::new(),
            pos: 0,
        });
        Ok(true)
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
