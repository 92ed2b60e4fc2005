//! The writer thread: group commit, rolls, stalls on transient errors, and housekeeping
//! (release checkpoint, deleting released segments). See the journal module doc.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::dir::{open_or_create_segment, sync_dir, write_checkpoint, SegmentMeta};
use super::retained::{written_ms, RetainedSegment, Revoked, Trim};
use super::segmented::{now_ms, Inner};
use super::JournalError;

/// How often the writer wakes without appends to persist releases and delete segments.
pub(super) const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(200);
/// Back-off of the writer while a transient I/O error lasts (doubling).
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The head segment as the writer sees it.
pub(super) struct Head {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) offset: u64,
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
pub(super) fn writer_loop(inner: Arc<Inner>, mut head: Head, checkpointed: u64) {
    let mut maint = Maintenance {
        seq: checkpointed,
        at: std::time::Instant::now(),
        orphans: Vec::new(),
        retry_at: None,
        backoff: RETRY_MIN,
        warned_at: None,
    };
    // Retained segments from before the restart: the window and the cap apply at once.
    maint.orphans.extend(trimmed(&inner, Trim::Expired));
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
                let maintenance_due = maint.due(&inner, false, st.full);
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
        if let Some((path, offset)) = start.clone() {
            let began = std::time::Instant::now();
            result = rewind(&mut head, &path, offset)
                .and_then(|()| write_batch(&inner, &mut head, &mut batch, &mut rolls, &mut start));
            if result.is_ok() {
                inner.commit.latency.observe(began.elapsed().as_secs_f64());
                let before = *inner.durable_tx.borrow();
                inner
                    .commit
                    .records
                    .observe(last_seq.saturating_sub(before) as f64);
                inner.syncs.fetch_add(1, Ordering::Relaxed);
                inner.durable_tx.send_replace(last_seq);
                batch.clear();
                rolls.clear();
                start = None;
                inner.space.notify_waiters();
            }
        }
        if result.is_ok() {
            // Not the commit's result: a checkpoint or an unlink that fails (EMFILE with
            // the fd table full of sockets, ENOSPC for the checkpoint's temp file) holds
            // no acknowledgement. It is retried on its own back-off while commits go on.
            match maintain(&inner, &mut maint, exit) {
                Ok(true) => maint.succeeded(),
                Ok(false) => {}
                Err(e) => maint.failed(&e),
            }
        } else if let Some((path, _)) = &start {
            // The batch could not be written (disk full?): deleting released segments
            // may be exactly what frees the space, so maintenance runs anyway — but
            // never on the segment the pending batch starts in, nor after it: the retry
            // rewrites the batch from there.
            let keep_from = inner
                .segments()
                .iter()
                .find(|s| &s.path == path)
                .map(|s| s.first_seq);
            if let Some(keep_from) = keep_from {
                let disk_full = result.as_ref().err().is_some_and(is_disk_full);
                if let Err(e) = maintain_before(&inner, &mut maint, keep_from, disk_full) {
                    tracing::debug!(error = %e, "journal: maintenance during a stall failed too");
                }
            }
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

/// The volume is full: retained segments are what can be given up for live ingest.
fn is_disk_full(e: &JournalError) -> bool {
    let JournalError::Io { source, .. } = e else {
        return false;
    };
    use rustix::io::Errno;
    [Errno::NOSPC, Errno::DQUOT]
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
///
/// A batch that spans rolls makes progress segment by segment: once the part before a
/// roll is synced, the durable watermark advances to the last record before the roll and
/// that part leaves the batch (`start` moves to the end of the synced segment). A retry
/// after a transient error then restarts from there, and a batch larger than the free
/// space of its volume still gets through while releases free the segments behind it.
fn write_batch(
    inner: &Inner,
    head: &mut Head,
    batch: &mut Vec<u8>,
    rolls: &mut Vec<(usize, u64)>,
    start: &mut Option<(PathBuf, u64)>,
) -> Result<(), JournalError> {
    while let Some(&(off, first_seq)) = rolls.first() {
        write_at(head, &batch[..off])?;
        // The segment is sealed: a full sync (once per segment) also makes its
        // modification time durable, the age replay retention measures it by.
        head.file
            .sync_all()
            .map_err(|e| JournalError::io(&head.path, e))?;
        if off > 0 {
            batch.drain(..off);
            for r in rolls.iter_mut() {
                r.0 -= off;
            }
            *start = Some((head.path.clone(), head.offset));
            inner.syncs.fetch_add(1, Ordering::Relaxed);
            inner.durable_tx.send_replace(first_seq - 1);
            inner.space.notify_waiters();
        }
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
        rolls.remove(0);
        *start = Some((head.path.clone(), 0));
    }
    write_at(head, batch)?;
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
/// written, and segment files already out of the lists whose unlink failed.
struct Maintenance {
    seq: u64,
    at: std::time::Instant,
    orphans: Vec<Orphan>,
    /// After a failed round: not due again before then (unless forced, on close).
    retry_at: Option<std::time::Instant>,
    backoff: Duration,
    /// Last warning of a failing streak (repeated at most every minute).
    warned_at: Option<std::time::Instant>,
}

/// A segment file to unlink. `live`: it still counts toward `max_bytes` until then
/// (retained segments stopped counting when they were retained).
struct Orphan {
    meta: SegmentMeta,
    live: bool,
}

/// Retained segments due for deletion, out of the retained set.
fn trimmed(inner: &Inner, how: Trim) -> Vec<Orphan> {
    let gone = inner.retained().take_trimmed(inner, now_ms(), how);
    if how == Trim::ForSpace && !gone.is_empty() {
        tracing::warn!(
            segments = gone.len(),
            bytes = gone.iter().map(|s| s.meta.size).sum::<u64>(),
            "journal: volume full; deleting every segment kept for replays (replay retention) to make room for live ingest"
        );
    }
    gone.into_iter()
        .map(|s| Orphan {
            meta: s.meta,
            live: false,
        })
        .collect()
}

impl Maintenance {
    fn failed(&mut self, e: &JournalError) {
        let first = self.retry_at.is_none();
        self.backoff = if first {
            RETRY_MIN
        } else {
            (self.backoff * 2).min(RETRY_MAX)
        };
        let now = std::time::Instant::now();
        self.retry_at = Some(now + self.backoff);
        if first
            || self
                .warned_at
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.warned_at = Some(now);
            tracing::warn!(error = %e, "journal: maintenance failed (release checkpoint or deleting released segments); commits and acknowledgements go on, retrying with back-off (until then a restart re-sends more and released space is not freed)");
        } else {
            tracing::debug!(error = %e, "journal: maintenance failed again");
        }
    }

    fn succeeded(&mut self) {
        if self.retry_at.take().is_some() {
            self.warned_at = None;
            tracing::info!("journal: maintenance recovered");
        }
    }

    /// Whether to persist now. The checkpoint only bounds how much is re-sent after a
    /// restart, so it is written at most every `MAINTENANCE_INTERVAL` (three syncs each
    /// time: writing it on every group commit quadrupled the commit latency) — except
    /// when a segment became deletable (space is waiting on it) or on close.
    ///
    /// `full`: an append is waiting for space. A wholly released segment is then due even
    /// at an already checkpointed watermark: after a restart with replay retention turned
    /// off, the formerly retained segments are live again below that watermark, and only
    /// deleting them frees the space the appends wait for. (Not otherwise: right after a
    /// restart, released records stay readable until the journal needs their room.)
    fn due(&self, inner: &Inner, force: bool, full: bool) -> bool {
        if !force && self.retry_at.is_some_and(|t| std::time::Instant::now() < t) {
            return false;
        }
        if !self.orphans.is_empty() || inner.retained().trim_due(inner, now_ms()) {
            return true;
        }
        let released = inner.released.load(Ordering::Acquire);
        if released <= self.seq {
            return full
                && inner
                    .segments()
                    .get(1)
                    .is_some_and(|next| next.first_seq - 1 <= released);
        }
        if force || self.at.elapsed() >= MAINTENANCE_INTERVAL {
            return true;
        }
        let segs = inner.segments();
        segs.get(1).is_some_and(|next| next.first_seq - 1 <= released)
    }
}

/// Persists the release watermark, then deletes segments whose records are all released
/// (or retains them for replays, deleting retained ones past the window or the cap).
///
/// A segment leaves the in-memory list *before* its file is unlinked, so a reader never
/// looks up a segment whose file is gone (a reader that raced the lookup retries).
///
/// Deleting does not wait for the checkpoint: after a restart the first retained segment
/// bounds the release watermark as well, and on a full disk (where the checkpoint's temp
/// file cannot be written) deleting released segments is what frees space.
/// `Ok(false)`: nothing was due (a back-off after a failure included).
fn maintain(inner: &Inner, maint: &mut Maintenance, force: bool) -> Result<bool, JournalError> {
    let full = inner.state().full;
    if !maint.due(inner, force, full) {
        return Ok(false);
    }
    let released = inner.released.load(Ordering::Acquire);
    let checkpoint = if released > maint.seq {
        write_checkpoint(&inner.cfg.dir, released).map(|()| {
            maint.seq = released;
            maint.at = std::time::Instant::now();
        })
    } else {
        Ok(())
    };
    // A full volume that refused the checkpoint's temp file: the retained segments go
    // too, as they do when a batch cannot be written.
    let disk_full = checkpoint.as_ref().err().is_some_and(is_disk_full);
    delete_released(inner, maint, released, disk_full)?;
    checkpoint.map(|()| true)
}

/// Maintenance while a batch is pending: deletes released segments that lie wholly
/// before `keep_from` (the first sequence of the segment the pending batch starts in).
/// On a full volume (`disk_full`) every retained segment goes too.
fn maintain_before(
    inner: &Inner,
    maint: &mut Maintenance,
    keep_from: u64,
    disk_full: bool,
) -> Result<(), JournalError> {
    let released = inner.released.load(Ordering::Acquire);
    delete_released(inner, maint, released.min(keep_from.saturating_sub(1)), disk_full)
}

fn delete_released(
    inner: &Inner,
    maint: &mut Maintenance,
    released: u64,
    disk_full: bool,
) -> Result<(), JournalError> {
    let wholly_released: Vec<(SegmentMeta, u64)> = {
        let segs = inner.segments();
        segs.windows(2)
            .take_while(|w| w[1].first_seq - 1 <= released)
            .map(|w| (w[0].clone(), w[1].first_seq - 1))
            .collect()
    };
    if !wholly_released.is_empty() {
        let retain = inner.cfg.replay_retention.enabled() && !disk_full;
        // The age is read before taking the locks (a `stat` per segment).
        let stamped: Vec<_> = wholly_released
            .into_iter()
            .map(|(meta, last_seq)| {
                let written_ms = if retain { written_ms(&meta) } else { 0 };
                (meta, last_seq, written_ms)
            })
            .collect();
        let (mut freed, mut freed_bytes) = (0u64, 0u64);
        {
            // One step under both locks (segment list, then retained set), so a replay's
            // reader always finds a segment in one of the two.
            let mut segs = inner.segments();
            let mut ret = inner.retained();
            segs.drain(..stamped.len());
            for (meta, last_seq, written_ms) in stamped {
                let dropped = ret.take_dropped(meta.first_seq, last_seq);
                if dropped || !retain {
                    // A replay may be reading the released records in it.
                    let why = if dropped {
                        Revoked::DroppedOldest
                    } else {
                        Revoked::VolumeFull
                    };
                    ret.revoke(meta.first_seq, last_seq, why);
                    maint.orphans.push(Orphan { meta, live: true });
                } else {
                    freed += 1;
                    freed_bytes += meta.size;
                    ret.push(RetainedSegment {
                        meta,
                        last_seq,
                        written_ms,
                    });
                }
            }
        }
        if freed > 0 {
            // Retained segments no longer count toward `max_bytes`.
            let mut st = inner.state();
            st.planned_segments = st.planned_segments.saturating_sub(freed);
            st.planned_bytes = st.planned_bytes.saturating_sub(freed_bytes);
            drop(st);
            inner.space.notify_waiters();
        }
    }
    let how = if disk_full { Trim::ForSpace } else { Trim::Expired };
    maint.orphans.extend(trimmed(inner, how));
    if maint.orphans.is_empty() {
        return Ok(());
    }
    // Oldest first: live segments freed for space come before the older retained ones in
    // the list, and a crash between two unlinks must leave no hole below a segment that
    // stays (a restart would read the hole as corruption).
    maint.orphans.sort_by_key(|o| o.meta.first_seq);
    while let Some(seg) = maint.orphans.first() {
        match fs::remove_file(&seg.meta.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(JournalError::io(&seg.meta.path, e)),
        }
        let seg = maint.orphans.remove(0);
        if seg.live {
            let mut st = inner.state();
            st.planned_segments = st.planned_segments.checked_sub(1).unwrap_or_else(|| {
                tracing::warn!("journal: segment accounting went below zero; corrected");
                0
            });
            st.planned_bytes = st.planned_bytes.saturating_sub(seg.meta.size);
        }
    }
    sync_dir(&inner.cfg.dir)?;
    inner.space.notify_waiters();
    Ok(())
}
