//! Fuzz target body for journal recovery, shared by the cargo-fuzz target in `fuzz/`
//! (nightly, libFuzzer) and by `tests/fuzz_corpus.rs`, which replays the checked-in
//! corpus on stable. Not part of the bridge's API: hidden from the docs.
//!
//! [`journal_recover`] turns arbitrary bytes into a journal directory and opens it.
//! Errors are fine (a damaged journal may refuse to open); panics, hangs and unbounded
//! allocations are findings.
//!
//! # Input layout
//!
//! ```text
//! flags:u8  split:u16le  checkpoint:u8  name_delta:u8  segment bytes...
//! flags & 1   fix the CRC of every frame in the segment bytes before writing them, so
//!             mutations get past the checksum and reach the record parser
//! flags & 2   split the segment bytes at `split % (len + 1)`: the first part becomes an
//!             older segment, the rest the head segment
//! flags & 4   write `release.checkpoint` holding `checkpoint`
//! flags & 8   a salted journal: write `JOURNAL_KEY` holding [`FUZZ_KEY`]; frames check
//!             (and `flags & 1` fixes their CRCs) under that salt; without the flag the
//!             directory is a journal from before salts
//! ```
//!
//! A segment is named after the sequence of its first record when its bytes start with
//! a valid frame (as the journal names them). Otherwise the older segment is named 1, and
//! the head gets the sequence after the highest of the older segment's valid records plus
//! `name_delta` (a gap, as eviction leaves). Names are never 0, never collide, and the
//! head never starts at or before a valid record of the older segment.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::journal::{
    decode_salted, Frame, FullPolicy, Journal, JournalConfig, JournalError, Record, Salt, FRAME_HEADER,
};
use crate::{Entry, SegmentedJournal};

/// Segment size of the fuzzed journal: small, so rolls and the full journal are reachable.
pub const SEGMENT_BYTES: u64 = 64 * 1024;
/// Upper bound on segment files of the fuzzed journal (four segments).
pub const MAX_BYTES: u64 = 256 * 1024;

const HEADER: usize = 5;
const FIX_CRC: u8 = 1;
const SPLIT: u8 = 2;
const CHECKPOINT: u8 = 4;
const SALTED: u8 = 8;

/// The key of a salted fuzzed journal.
pub const FUZZ_KEY: u32 = 0x5eed_1234;

/// Records per `next_batch` call.
const BATCH: usize = 16;

/// A fresh directory under the system temp dir (`TMPDIR`), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("journal-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// Rewrites the CRC of every complete frame from the start of `seg`.
fn fix_crcs(seg: &mut [u8], salt: Salt) {
    let mut pos = 0usize;
    while let Some(header) = seg.get(pos..pos + FRAME_HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let end = pos + FRAME_HEADER + len;
        if len == 0 || end > seg.len() {
            return;
        }
        let crc = crc32c::crc32c_append(salt.0, &seg[pos + FRAME_HEADER..end]);
        seg[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

fn first_seq_of(seg: &[u8], salt: Salt) -> Option<u64> {
    match decode_salted(seg, salt) {
        Frame::Record(rec, _) => Some(rec.seq),
        _ => None,
    }
}

/// The highest sequence among the valid frames from the start of `seg` (the reader goes
/// through them all, skipping lower sequences), if any.
fn last_seq(seg: &[u8], salt: Salt) -> Option<u64> {
    let (mut pos, mut max) = (0usize, None);
    while let Frame::Record(rec, len) = decode_salted(&seg[pos..], salt) {
        max = max.max(Some(rec.seq));
        pos += len;
    }
    max
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"))
    })
}

/// Reads every durable record; `Err` if the reader failed. Panics if it never finishes.
fn read_all(journal: &SegmentedJournal) -> Result<Vec<Record>, JournalError> {
    let durable = *journal.durable().borrow();
    let mut reader = journal.reader(0);
    let mut out: Vec<Record> = Vec::new();
    // Every non-empty batch holds at least one record of the (short) input.
    for _ in 0..1_000_000 {
        let batch = reader.next_batch(BATCH)?;
        if batch.is_empty() {
            return Ok(out);
        }
        let mut prev = out.last().map(|r| r.seq);
        for rec in &batch {
            assert!(
                prev.is_none_or(|p| p < rec.seq),
                "reader went backwards: {prev:?} then {}",
                rec.seq
            );
            prev = Some(rec.seq);
        }
        out.extend(batch);
        assert!(
            out.len() <= 1_000_000,
            "reader returned more records than the input can hold (durable {durable})"
        );
    }
    panic!("journal reader did not finish");
}

/// Writes `data` (see the module doc) as a journal directory and opens it with a small
/// configuration; reads everything; appends a record and checks that it gets a fresh
/// sequence and that a clean close and reopen keeps what was read.
///
/// Inputs that would only reproduce an open bug are skipped (see [`hits_open_bug`]) so
/// the fuzzer looks for new ones; [`journal_recover_unguarded`] runs them anyway.
pub fn journal_recover(data: &[u8]) {
    // Every bug the guard used to skip is fixed (see bridge/tests/fuzz_corpus.rs); the
    // guard stays as the place to park the next one while it is open.
    if OPEN_BUG_GUARD && hits_open_bug(data) {
        return;
    }
    journal_recover_unguarded(data);
}

/// The journal directory an input describes.
struct Layout {
    /// The segment before the head: (name, bytes).
    older: Option<(u64, Vec<u8>)>,
    head: (u64, Vec<u8>),
    checkpoint: Option<u64>,
    salt: Salt,
}

fn layout(data: &[u8]) -> Option<Layout> {
    let h = data.get(..HEADER)?;
    let (flags, split, checkpoint, delta) = (h[0], u16::from_le_bytes([h[1], h[2]]) as usize, h[3], h[4]);
    let mut seg = data[HEADER..].to_vec();
    let split = if flags & SPLIT != 0 {
        split % (seg.len() + 1)
    } else {
        0
    };
    let mut head = seg.split_off(split);
    let mut older = seg;
    let salt = if flags & SALTED != 0 {
        Salt(FUZZ_KEY)
    } else {
        Salt::NONE
    };
    if flags & FIX_CRC != 0 {
        fix_crcs(&mut older, salt);
        fix_crcs(&mut head, salt);
    }
    // The head is named after its first record, as the journal names segments, unless that
    // would put it at or before records of the older segment: segment names and contents
    // that disagree only arise from tampering (the reader then serves the older segment's
    // stale copies), and are not what this target explores.
    let mut next_free = 1u64;
    let mut older_seg = None;
    if !older.is_empty() {
        let first = first_seq_of(&older, salt).unwrap_or(1).max(1);
        next_free = last_seq(&older, salt)
            .unwrap_or(first)
            .max(first)
            .saturating_add(1);
        older_seg = Some((first, older));
    }
    let head_first = match first_seq_of(&head, salt) {
        Some(seq) if seq >= next_free => seq,
        _ => next_free.saturating_add(u64::from(delta)),
    };
    if older_seg.as_ref().is_some_and(|(first, _)| head_first <= *first) {
        return None; // only at the top of the sequence space
    }
    Some(Layout {
        older: older_seg,
        head: (head_first, head),
        checkpoint: (flags & CHECKPOINT != 0).then_some(u64::from(checkpoint)),
        salt,
    })
}

/// Largest read the journal reader should ever need: one segment.
const READ_BOUND: usize = SEGMENT_BYTES as usize;

/// Whether `journal_recover` skips inputs of known open bugs (none are open now).
const OPEN_BUG_GUARD: bool = false;

/// Whether `data` reproduces a bug that was open while the fuzzer ran (each has a
/// regression test in `tests/fuzz_corpus.rs` and an input in
/// `fuzz/regressions/journal_recover/`; all are fixed now, so the guard is off):
///
/// * `older_segment_huge_frame_len`: the journal reader sized its read buffer from a
///   frame's length field before checking it (up to 4 GiB zeroed).
/// * `record_seq_u64_max`, `append_at_seq_u64_max`: sequence arithmetic overflowed at
///   the top of the sequence space (segment names above 2^62 are now refused).
pub fn hits_open_bug(data: &[u8]) -> bool {
    const NEAR_MAX: u64 = u64::MAX - (1 << 32);
    let Some(l) = layout(data) else { return false };
    let segments = l.older.iter().map(|(_, b)| b).chain([&l.head.1]);
    if l.head.0 > NEAR_MAX
        || segments
            .clone()
            .any(|b| last_seq(b, l.salt).is_some_and(|s| s > NEAR_MAX))
    {
        return true;
    }
    let Some((_, older)) = &l.older else { return false };
    let mut pos = 0;
    while let Some(rest) = older.get(pos..).filter(|r| r.len() >= FRAME_HEADER) {
        let need = FRAME_HEADER + u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if need > rest.len() {
            return need > READ_BOUND;
        }
        match decode_salted(rest, l.salt) {
            Frame::Record(_, n) => pos += n,
            _ => return false,
        }
    }
    false
}

/// [`journal_recover`] without skipping inputs that reproduce an open bug.
pub fn journal_recover_unguarded(data: &[u8]) {
    let _ = recovered_records(data);
}

/// [`journal_recover_unguarded`], returning how many records the first open read
/// (`None`: the input describes no directory, or the journal refused to open or read).
pub fn recovered_records(data: &[u8]) -> Option<usize> {
    let l = layout(data)?;
    let dir = TempDir::new().ok()?;
    let mut files = vec![(segment_name(l.head.0), l.head.1)];
    if let Some((first, bytes)) = l.older {
        files.push((segment_name(first), bytes));
    }
    if l.salt != Salt::NONE {
        files.push((
            "JOURNAL_KEY".into(),
            crate::journal::key_line(l.salt.0).into_bytes(),
        ));
    }
    if let Some(seq) = l.checkpoint {
        let mut bytes = seq.to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32c::crc32c(&seq.to_le_bytes()).to_le_bytes());
        files.push(("release.checkpoint".into(), bytes));
    }
    for (name, bytes) in files {
        std::fs::write(dir.0.join(name), bytes).ok()?;
    }
    recover(&dir.0)
}

fn config(dir: &Path) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        max_bytes: MAX_BYTES,
        segment_bytes: SEGMENT_BYTES,
        max_buffer_bytes: 1 << 20,
        replay_retention: Default::default(),
    }
}

fn recover(dir: &Path) -> Option<usize> {
    let journal = match SegmentedJournal::open(config(dir)) {
        Ok(j) => j,
        Err(e) => {
            let _ = e.to_string();
            return None;
        }
    };
    let _ = journal.stats();
    let first = read_all(&journal);
    let entry = Entry {
        kind: Default::default(),
        received_at_ms: 1,
        qos: 1,
        client_id: "fuzz".into(),
        topic: "vehicles/fuzz/t".into(),
        payload: bytes::Bytes::from_static(b"after recovery"),
        ..Entry::default()
    };
    let appended = runtime().block_on(async {
        let seq = journal.append_with(&entry, FullPolicy::Reject).await?;
        journal.flush().await?;
        Ok::<_, JournalError>(seq)
    });
    let _ = journal.stats();
    journal.close();
    drop(journal);

    // The operator's tools on the same bytes: they may refuse, never panic.
    if let Ok(report) = crate::journal::verify(dir) {
        let _ = report.to_string();
    }

    let Ok(first) = first else { return None };
    let Ok(Some(seq)) = appended else {
        return Some(first.len());
    };
    if let Some(last) = first.last() {
        assert!(
            seq > last.seq,
            "append after recovery re-used sequence {seq} (read up to {})",
            last.seq
        );
    }
    let journal = match SegmentedJournal::open(config(dir)) {
        Ok(j) => j,
        Err(e) => panic!("a journal that opened, was read and closed cleanly no longer opens: {e}"),
    };
    // The new record raised the durable watermark, so this read can go further than the
    // first and meet damage the first stopped short of (garbage after the last record of
    // an older segment): a loud error is fine, a silent loss is not.
    let Ok(second) = read_all(&journal) else {
        return Some(first.len());
    };
    assert!(
        second.len() >= first.len() && second[..first.len()] == first[..],
        "records read before a clean close and reopen are gone or changed"
    );
    assert!(
        second.iter().any(|r| r.seq == seq && r.entry == entry),
        "the record appended (seq {seq}) and flushed after recovery is missing after reopen"
    );
    Some(first.len())
}
