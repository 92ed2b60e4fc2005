//! Replay retention: released segments kept on disk for a while so that an operator can
//! re-send records Kafka already confirmed (see "Replay retention" in the journal module
//! doc), the pins a replay holds on them, and the pinned reader it reads them with.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use super::dir::SegmentMeta;
use super::reader::JournalReader;
use super::record::Record;
use super::segmented::Inner;
use super::JournalError;

/// A wholly released segment kept for replays.
#[derive(Debug, Clone)]
pub(crate) struct RetainedSegment {
    pub meta: SegmentMeta,
    /// Sequence of its last record (the next segment's first sequence - 1).
    pub last_seq: u64,
    /// When its last record was written (the file's modification time, made durable by
    /// the `fsync` that sealed the segment), in ms since the epoch: the age the time
    /// window is measured against.
    pub written_ms: u64,
}

/// A replay's hold on retained segments: nothing holding a sequence in
/// `from_seq..=to_seq` is deleted by the window or the byte cap while the pin exists (up
/// to [`PIN_CEILING`]). Bounded above too, so that a replay of old records neither holds
/// newer segments past the cap nor is revoked when one of them goes.
#[derive(Debug)]
struct PinEntry {
    id: u64,
    from_seq: u64,
    to_seq: u64,
    /// Set (to a [`Revoked`] code) when a segment it pins was deleted anyway.
    revoked: Arc<AtomicU8>,
}

/// How far pins may hold the retained set over its cap: a replay that cannot finish
/// (Kafka unreachable for days) must not grow the disk without bound. Past
/// `PIN_CEILING` × `replay_retention_bytes`, the oldest retained segments go even when
/// pinned, and the replays reading them fail saying why.
pub(crate) const PIN_CEILING: u64 = 2;

/// Why a replay's pinned segments were deleted under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Revoked {
    /// The volume filled up: live ingest comes first.
    VolumeFull = 1,
    /// The retained set reached [`PIN_CEILING`] × the cap while the replay held it.
    PinCeiling = 2,
    /// `drop_oldest` released the records undelivered and deleted their segment.
    DroppedOldest = 3,
}

impl Revoked {
    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Revoked::VolumeFull),
            2 => Some(Revoked::PinCeiling),
            3 => Some(Revoked::DroppedOldest),
            _ => None,
        }
    }

    /// For the replay's `error`.
    pub fn reason(self) -> &'static str {
        match self {
            Revoked::VolumeFull => {
                "the volume filled up and the retained segments were deleted to make room for live ingest"
            }
            Revoked::PinCeiling => {
                "the replay held the retained segments past twice journal.replay_retention_bytes \
                 (Kafka too slow or unreachable?); the oldest were deleted"
            }
            Revoked::DroppedOldest => {
                "the journal was full under journal.full_policy = \"drop_oldest\" and deleted segments \
                 the replay was reading"
            }
        }
    }
}

/// The retained segments (oldest first) and the pins on them. Lock order: the
/// journal's state, then its segment list, then this.
#[derive(Debug, Default)]
pub(crate) struct RetainedSet {
    pub segs: VecDeque<RetainedSegment>,
    /// Sum of their real file sizes.
    pub bytes: u64,
    pins: Vec<PinEntry>,
    next_pin: u64,
    /// Sequence ranges `drop_oldest` released undelivered: the segments holding them are
    /// deleted, not retained (a replay re-sends delivered records only). In memory only:
    /// the writer moves such a segment out within one maintenance round.
    pub dropped: Vec<(u64, u64)>,
}

/// Why the oldest retained segment goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trim {
    /// Past the window, over the byte cap, or retention is off.
    Expired,
    /// The volume is full: every retained segment goes, pinned or not.
    ForSpace,
}

impl RetainedSet {
    pub fn push(&mut self, seg: RetainedSegment) {
        self.bytes += seg.meta.size;
        self.segs.push_back(seg);
    }

    fn pins_on(&self, first_seq: u64, last_seq: u64) -> impl Iterator<Item = &PinEntry> {
        self.pins
            .iter()
            .filter(move |p| p.from_seq <= last_seq && first_seq <= p.to_seq)
    }

    fn pinned(&self, seg: &RetainedSegment) -> bool {
        self.pins_on(seg.meta.first_seq, seg.last_seq).next().is_some()
    }

    /// Tells every replay pinning a sequence in `first_seq..=last_seq` (a segment being
    /// deleted) that it lost records. Called for every deletion of released records a pin
    /// may cover, whatever deletes them (the first reason sticks).
    pub fn revoke(&self, first_seq: u64, last_seq: u64, why: Revoked) {
        for p in self.pins_on(first_seq, last_seq) {
            let _ = p
                .revoked
                .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Whether pins hold the set past [`PIN_CEILING`] × the cap.
    fn over_pin_ceiling(&self, inner: &Inner) -> bool {
        self.bytes > inner.cfg.replay_retention.max_bytes.saturating_mul(PIN_CEILING)
    }

    /// Whether the oldest retained segment must go now (a pinned one only past the pin
    /// ceiling).
    pub fn trim_due(&self, inner: &Inner, now_ms: u64) -> bool {
        let Some(oldest) = self.segs.front() else {
            return false;
        };
        let r = &inner.cfg.replay_retention;
        let expired = !r.enabled()
            || self.bytes > r.max_bytes
            || now_ms >= oldest.written_ms.saturating_add(r.max_age.as_millis() as u64);
        expired && (!self.pinned(oldest) || self.over_pin_ceiling(inner))
    }

    /// Takes the segments to delete out of the set, oldest first; revokes the pins on
    /// those that go.
    pub fn take_trimmed(&mut self, inner: &Inner, now_ms: u64, how: Trim) -> Vec<RetainedSegment> {
        let mut out = Vec::new();
        while let Some(oldest) = self.segs.front() {
            let why = match how {
                Trim::Expired if !self.trim_due(inner, now_ms) => break,
                Trim::Expired => Revoked::PinCeiling,
                Trim::ForSpace => Revoked::VolumeFull,
            };
            self.revoke(oldest.meta.first_seq, oldest.last_seq, why);
            if let Some(seg) = self.segs.pop_front() {
                self.bytes = self.bytes.saturating_sub(seg.meta.size);
                out.push(seg);
            }
        }
        out
    }

    /// The retained segment holding `seq`, or else the first one after it.
    pub fn lookup(&self, seq: u64) -> Option<&RetainedSegment> {
        let idx = self.segs.partition_point(|s| s.meta.first_seq <= seq);
        match idx.checked_sub(1).and_then(|i| self.segs.get(i)) {
            Some(s) if s.last_seq >= seq => Some(s),
            _ => self.segs.get(idx),
        }
    }

    /// Whether a segment holding `first..=last` was released undelivered by `drop_oldest`;
    /// forgets the ranges it covers.
    pub fn take_dropped(&mut self, first: u64, last: u64) -> bool {
        let hit = self.dropped.iter().any(|(f, l)| *f <= last && first <= *l);
        self.dropped.retain(|(_, l)| *l > last);
        hit
    }
}

/// The file's modification time in ms since the epoch (now when unknown).
pub(crate) fn written_ms(meta: &SegmentMeta) -> u64 {
    std::fs::metadata(&meta.path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or_else(super::segmented::now_ms, |d| d.as_millis() as u64)
}

/// Records the journal still holds for replays: released ones, from the oldest retained
/// segment (or the oldest live one) to the release watermark, both inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedRange {
    pub from_seq: u64,
    pub to_seq: u64,
}

/// A replay asked for records the journal does not hold (any more, or not yet released).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NotRetained {
    /// What is retained now; `None` when nothing is (retention off, or nothing released).
    pub retained: Option<RetainedRange>,
    pub message: String,
}

/// Reads released records for a replay while pinning the segments that hold them.
///
/// The pin starts at the first requested sequence and moves only when the caller says
/// so ([`ReplayReader::release_before`]), so the same range can be read twice (count,
/// then send). Dropping the reader removes the pin.
pub struct ReplayReader {
    inner: Arc<Inner>,
    reader: JournalReader,
    pin: u64,
    revoked: Arc<AtomicU8>,
    to_seq: u64,
}

impl ReplayReader {
    pub(super) fn open(inner: &Arc<Inner>, from_seq: u64, to_seq: u64) -> Result<Self, NotRetained> {
        let released = inner.released.load(Ordering::Acquire);
        let retention = inner.cfg.replay_retention;
        // The segment list, then the retained set: the order the writer takes them in when
        // it moves a segment from one to the other.
        let segs = inner.segments();
        let mut ret = inner.retained();
        let range = retained_range(&segs, &ret, released, retention.enabled());
        let fits = range.is_some_and(|r| r.from_seq <= from_seq && from_seq <= to_seq && to_seq <= r.to_seq);
        if !fits {
            let message = match range {
                _ if !retention.enabled() => {
                    "the journal retains nothing for replays (journal.replay_retention_secs = 0)".to_string()
                }
                None => "no released record is retained yet".to_string(),
                Some(r) => format!(
                    "records {from_seq}..={to_seq} are not all retained: the journal holds released records \
                     {}..={} for replays (journal.replay_retention_secs = {}, journal.replay_retention_bytes = {})",
                    r.from_seq,
                    r.to_seq,
                    retention.max_age.as_secs(),
                    retention.max_bytes
                ),
            };
            return Err(NotRetained {
                retained: range,
                message,
            });
        }
        let id = ret.next_pin;
        ret.next_pin += 1;
        let revoked = Arc::new(AtomicU8::new(0));
        ret.pins.push(PinEntry {
            id,
            from_seq,
            to_seq,
            revoked: revoked.clone(),
        });
        drop(ret);
        drop(segs);
        Ok(ReplayReader {
            inner: inner.clone(),
            reader: JournalReader::retained(inner.clone(), from_seq),
            pin: id,
            revoked,
            to_seq,
        })
    }

    /// Up to `max` records of the range in sequence order; empty once past its end.
    /// Sequences the journal does not hold inside the range (segments `drop_oldest`
    /// released undelivered, spans `repair` recorded as lost) are skipped.
    pub fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, JournalError> {
        if self.reader.position() > self.to_seq {
            return Ok(Vec::new());
        }
        let mut batch = self.reader.next_batch(max)?;
        batch.retain(|r| r.seq <= self.to_seq);
        if batch.is_empty() {
            // Nothing more up to `to_seq` (the rest of the range was a gap).
            self.reader = JournalReader::retained(self.inner.clone(), self.to_seq + 1);
        }
        Ok(batch)
    }

    /// Reads the range again from `seq` (at or after where the pin is).
    pub fn rewind(&mut self, seq: u64) {
        self.reader = JournalReader::retained(self.inner.clone(), seq);
    }

    /// The sequence the next record will have at least.
    pub fn position(&self) -> u64 {
        self.reader.position()
    }

    /// Lets retention delete segments holding only sequences below `seq` again.
    pub fn release_before(&mut self, seq: u64) {
        let mut ret = self.inner.retained();
        if let Some(p) = ret.pins.iter_mut().find(|p| p.id == self.pin) {
            p.from_seq = p.from_seq.max(seq);
        }
    }

    /// Set when segments this reader pinned were deleted anyway (a full volume, the pin
    /// ceiling, `drop_oldest`): the records it has not read yet may be gone.
    pub fn revoked(&self) -> Option<Revoked> {
        Revoked::from_code(self.revoked.load(Ordering::Acquire))
    }
}

impl Drop for ReplayReader {
    fn drop(&mut self) {
        let mut ret = self.inner.retained();
        ret.pins.retain(|p| p.id != self.pin);
    }
}

impl std::fmt::Debug for ReplayReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayReader")
            .field("position", &self.reader.position())
            .field("to_seq", &self.to_seq)
            .finish()
    }
}

/// The replayable range: from the oldest retained segment (or, with none, the oldest
/// live one) up to the release watermark; `None` when retention is off or nothing in
/// that span is released.
pub(crate) fn retained_range(
    segs: &[SegmentMeta],
    ret: &RetainedSet,
    released: u64,
    enabled: bool,
) -> Option<RetainedRange> {
    if !enabled {
        return None;
    }
    let from = ret
        .segs
        .front()
        .map(|s| s.meta.first_seq)
        .or_else(|| segs.first().map(|s| s.first_seq))?;
    (from <= released).then_some(RetainedRange {
        from_seq: from,
        to_seq: released,
    })
}
