//! Reading durable records in sequence order, across segment rolls and gaps.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::dir::{gap_is_legal, SegmentMeta};
use super::record::{decode_salted, Frame, Record, FRAME_HEADER};
use super::segmented::Inner;
use super::JournalError;

/// Sequential reader of durable records, for the Kafka producer and for inspection.
///
/// Returns every durable record in sequence order. It jumps over sequence gaps between
/// segments only when they are explicit: released (segments evicted by `drop_oldest`,
/// which releases before deleting) or recorded as lost by `repair` (`<dir>/GAPS`). It
/// returns [`JournalError::Corrupt`] for anything else it cannot read: it never skips
/// a damaged record silently.
pub struct JournalReader {
    inner: Arc<Inner>,
    next_seq: u64,
    seg: Option<OpenSegment>,
    /// Also reads the segments kept for replays (a [`super::ReplayReader`], which pins
    /// them); the producer's reader starts after the release watermark and never needs to.
    retained: bool,
}

impl JournalReader {
    pub(super) fn new(inner: Arc<Inner>, from_seq: u64) -> Self {
        JournalReader {
            inner,
            next_seq: from_seq,
            seg: None,
            retained: false,
        }
    }

    /// A reader that finds retained segments too (for a pinned replay).
    pub(super) fn retained(inner: Arc<Inner>, from_seq: u64) -> Self {
        JournalReader {
            retained: true,
            ..Self::new(inner, from_seq)
        }
    }
}

struct OpenSegment {
    file: File,
    path: PathBuf,
    first_seq: u64,
    /// File size when opened (segments are pre-sized; repaired ones are not written to).
    size: u64,
    /// File offset of `chunk[0]`.
    chunk_offset: u64,
    chunk: Vec<u8>,
    pos: usize,
    /// Bytes the next refill reads: small while the reader follows the writer (a few
    /// fresh records per group commit), doubling up to [`READ_CHUNK`] while it reads
    /// through a backlog. Segments are pre-sized, so a read returns the whole window
    /// except near a segment's end: a fixed 1 MiB window made the caught-up reader copy
    /// 1 MiB from the page cache for every commit (9 % of the gateway's CPU in the
    /// fan-in benchmark).
    window: usize,
}

const READ_CHUNK: usize = 1 << 20;
/// Refill size of a reader that caught up with the writer.
const FOLLOW_CHUNK: usize = 16 << 10;

impl OpenSegment {
    /// Reads a fresh chunk starting at the current position, at least `need` bytes.
    fn refill(&mut self, need: usize) -> Result<(), JournalError> {
        let offset = self.chunk_offset + self.pos as u64;
        let len = need.max(self.window);
        if self.chunk.capacity() > 4 * len {
            // A backlog is read through: the reader follows the writer again and gives
            // the large window back (a connect burst's presence events left a 1 MiB
            // buffer held for good, in the process's memory of idle vehicles).
            self.chunk = Vec::new();
        }
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

    /// Bytes the frame at the current position needs (its header's length, or a header
    /// while unknown). A damaged length must not make the reader allocate gigabytes: no
    /// frame runs past the end of its segment (decoding then reports the damage).
    fn frame_need(&self) -> usize {
        let rest = &self.chunk[self.pos..];
        let need = match rest.get(..4) {
            Some(len) if rest.len() >= FRAME_HEADER => {
                FRAME_HEADER + u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize
            }
            _ => FRAME_HEADER,
        };
        need.min(self.size.saturating_sub(self.offset()).max(FRAME_HEADER as u64) as usize)
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
        let mut out = Vec::new();
        self.next_batch_into(&mut out, max)?;
        Ok(out)
    }

    /// [`JournalReader::next_batch`] into `out` (cleared first), so that a caller that
    /// reads batch after batch (the producer pump) keeps one buffer: grown record by
    /// record, a fresh vector was reallocated (and copied) several times per batch.
    pub fn next_batch_into(&mut self, out: &mut Vec<Record>, max: usize) -> Result<(), JournalError> {
        out.clear();
        let durable = *self.inner.durable_tx.borrow();
        self.leave_evicted_segment();
        if self.next_seq <= durable {
            // At most what is durable and not read yet.
            let available = usize::try_from(durable - self.next_seq + 1).unwrap_or(usize::MAX);
            out.reserve(available.min(max));
        }
        while out.len() < max && self.next_seq <= durable {
            if self.seg.is_none() && !self.open_segment()? {
                break;
            }
            let Some(seg) = self.seg.as_mut() else { break };
            let need = seg.frame_need();
            if seg.chunk.len() - seg.pos < need {
                // Ran off the end of the chunk with records still coming: a backlog.
                seg.window = (seg.window * 2).min(READ_CHUNK);
                let before = seg.chunk.len() - seg.pos;
                seg.refill(need)?;
                if seg.chunk.len() > before {
                    continue;
                }
            }
            match decode_salted(&seg.chunk[seg.pos..], self.inner.salt) {
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
                    // Caught up with the writer: what comes next is a few fresh records.
                    seg.window = FOLLOW_CHUNK;
                    seg.refill(need)?;
                    // A fresh frame may be longer than the window: read all of it before
                    // deciding (a partial frame would look torn).
                    let full = seg.frame_need();
                    if seg.chunk.len() - seg.pos < full {
                        seg.refill(full)?;
                    }
                    match decode_salted(&seg.chunk[seg.pos..], self.inner.salt) {
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
        Ok(())
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
        if self.retained {
            // A replay's segments are pinned: its current one is retained, not evicted.
            return;
        }
        let Some(seg) = &self.seg else { return };
        let first_retained = self.inner.segments().first().map(|s| s.first_seq);
        if first_retained.is_some_and(|f| f > seg.first_seq) {
            self.seg = None;
        }
    }

    /// The current segment ended (zeros or end of file) before `durable`: move to the next
    /// segment. A sequence gap before it is legal only if nothing follows in this segment
    /// and every sequence in it is released or recorded as lost by `repair`; otherwise
    /// records are missing (zeros hiding damage, a lost write, a truncated file).
    fn next_segment(&mut self, durable: u64) -> Result<(), JournalError> {
        let Some(seg) = self.seg.as_mut() else {
            return Ok(());
        };
        let end = seg.offset();
        let finished = seg.first_seq;
        let next = {
            let segs = self.inner.segments();
            let live = segs.iter().find(|s| s.first_seq > finished).map(|s| s.first_seq);
            let kept = self
                .retained
                .then(|| {
                    let ret = self.inner.retained();
                    ret.segs.iter().map(|s| s.meta.first_seq).find(|f| *f > finished)
                })
                .flatten();
            match (kept, live) {
                (Some(k), Some(l)) => Some(k.min(l)),
                (k, l) => k.or(l),
            }
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
            let released = self.inner.released.load(Ordering::Acquire);
            if !gap_is_legal(self.next_seq, next - 1, released, &self.inner.gaps) {
                let name = seg
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let reason = format!(
                    "records {}..={} missing at the end of segment {name} (it ends at byte {end}); \
                     they are neither released nor recorded as lost by `repair`",
                    self.next_seq,
                    next - 1
                );
                return Err(self.corrupt(end, next - 1, reason));
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
                let first_live = segs.first().map(|s| s.first_seq);
                if self.retained && first_live.is_none_or(|f| self.next_seq < f) {
                    let ret = self.inner.retained();
                    if let Some(kept) = ret.lookup(self.next_seq) {
                        // Skips a gap (a segment dropped undelivered) like a live reader.
                        self.next_seq = self.next_seq.max(kept.meta.first_seq);
                        let meta = kept.meta.clone();
                        drop(ret);
                        drop(segs);
                        match self.open_file(meta)? {
                            true => return Ok(true),
                            false => continue,
                        }
                    }
                }
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
            if self.open_file(meta)? {
                return Ok(true);
            }
        }
    }

    /// Opens a segment file as the current segment; false when it was deleted since it
    /// was looked up (look again).
    fn open_file(&mut self, meta: SegmentMeta) -> Result<bool, JournalError> {
        let file = match File::open(&meta.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let still_listed = self
                    .inner
                    .segments()
                    .iter()
                    .any(|s| s.first_seq == meta.first_seq)
                    || (self.retained
                        && self
                            .inner
                            .retained()
                            .segs
                            .iter()
                            .any(|s| s.meta.first_seq == meta.first_seq));
                if still_listed {
                    return Err(JournalError::io(&meta.path, e));
                }
                return Ok(false);
            }
            Err(e) => return Err(JournalError::io(&meta.path, e)),
        };
        let size = file
            .metadata()
            .map_err(|e| JournalError::io(&meta.path, e))?
            .len()
            .max(meta.size);
        self.seg = Some(OpenSegment {
            file,
            path: meta.path,
            first_seq: meta.first_seq,
            size,
            chunk_offset: 0,
            chunk: Vec::new(),
            pos: 0,
            window: READ_CHUNK,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A reader that read through a backlog with the 1 MiB window gives it back once it
    /// follows the writer again.
    #[test]
    fn a_caught_up_reader_gives_its_large_window_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        std::fs::write(&path, vec![0u8; 2 * READ_CHUNK]).unwrap();
        let mut seg = OpenSegment {
            file: File::open(&path).unwrap(),
            path,
            first_seq: 1,
            size: 2 * READ_CHUNK as u64,
            chunk_offset: 0,
            chunk: Vec::new(),
            pos: 0,
            window: READ_CHUNK,
        };
        seg.refill(0).unwrap();
        assert!(seg.chunk.capacity() >= READ_CHUNK);
        seg.pos = 100;
        seg.window = FOLLOW_CHUNK;
        seg.refill(0).unwrap();
        assert_eq!(seg.chunk.len(), FOLLOW_CHUNK);
        assert!(
            seg.chunk.capacity() < 4 * FOLLOW_CHUNK,
            "{}",
            seg.chunk.capacity()
        );
        assert_eq!(
            seg.chunk_offset, 100,
            "the refill reads on from where the reader was"
        );
    }
}
