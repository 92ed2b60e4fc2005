//! The write-ahead journal: where a vehicle's message becomes durable.
//!
//! # Contract
//!
//! * [`Journal::append`] gives an entry the next sequence number (strictly increasing,
//!   never reused, also across restarts) and returns it once the entry is admitted to the
//!   write buffer. It does **not** mean durable. Appends number records densely (+1);
//!   *gaps* appear only between segments, and only explicit ones are legal: released
//!   sequences (`drop_oldest` releases a segment before deleting it) and ranges `repair`
//!   recorded as lost in `<dir>/GAPS`. Readers skip those and stop with
//!   [`JournalError::Corrupt`] at any other gap (see Reading). After a `repair`, new
//!   appends get sequences above every sequence that existed before it.
//! * [`Journal::durable`] is a watch of the highest sequence on stable storage: every
//!   record with `seq <= *durable.borrow()` survives a crash at any instant (process
//!   kill or power loss). The gateway PUBACKs a QoS1 message only once its sequence is
//!   covered (invariant 1 in DESIGN.md).
//! * [`Journal::release`] declares every record up to a sequence delivered downstream
//!   (Kafka acknowledged it with `acks=all`). Released records may be deleted; the
//!   release watermark is checkpointed, so after a restart readers start after it and
//!   re-send only what was not confirmed (invariant 2). A record is never deleted before
//!   it is released.
//! * [`Journal::reader`] reads durable records in sequence order, which is the order in
//!   which they were appended, hence each vehicle's order (invariant 3).
//! * The journal never holds more than `max_bytes` of segment files. When full,
//!   `append` waits until releases free a segment: back-pressure that propagates to
//!   the sockets (invariant 4). `append_with` applies the other policies: `Reject`
//!   returns without appending, `DropOldest` deletes the oldest segment undelivered.
//! * The journal never silently discards an acknowledged record (invariant 6): only the
//!   unsynced end of the last write can be torn (and cut); any other damage (including
//!   records missing at the end of a segment, or below the release checkpoint at the end
//!   of the head) stops the journal with [`JournalError::Corrupt`] until an operator runs
//!   [`verify`] / [`repair`].
//! * Released segments are deleted, or, with replay retention on, kept for a while so
//!   that an operator can re-send delivered records (see Replay retention). Retained
//!   segments never count toward `max_bytes`: live ingest is never held back for them.
//! * [`SegmentedJournal::id`] identifies this journal: sequences restart when a journal
//!   directory is recreated, the identity tells consumers that it happened.
//!
//! # On disk
//!
//! ```text
//! <dir>/LOCK                           flock'ed by the owning process (and by verify/repair)
//! <dir>/JOURNAL_ID                     identity: 32 hex digits (128 random bits) + newline
//! <dir>/JOURNAL_KEY                    secret salt of the record CRCs and its CRC32C,
//!                                      8 hex digits each + newline (absent: a journal
//!                                      from before salts, unsalted CRCs; with salted
//!                                      segments: refused); part of the journal, copy it
//!                                      with the segments
//! <dir>/00000000000000000001.seg       segment; name = sequence of its first record
//! <dir>/00000000000000052311.seg
//! <dir>/release.checkpoint             released-up-to sequence: u64le + crc32c u32le
//! <dir>/GAPS                           sequence ranges `repair` recorded as lost: one
//!                                      `<first> <last>` (inclusive, decimal) per line
//! <dir>/quarantine/<segment>-<offset>.bin   damaged bytes moved aside by `repair`
//! ```
//!
//! Segments are pre-sized (`fallocate`) to `segment_bytes`, so an `fdatasync` of a write
//! inside one does not have to update file metadata. Records are framed as described in
//! [`record`]: length + CRC32C + body carrying sequence, client id, topic, payload, QoS,
//! receive time, and the MQTT 5 properties downstream needs. `JOURNAL_ID` is written
//! (temp file, fsync, rename, directory fsync) when the journal is created, or on the
//! first open of a directory from before identities existed.
//!
//! Every accounting uses a segment's real file size: `segment_bytes` may change between
//! restarts. Segments written under the old size keep it (the head keeps its real room),
//! new segments get the new size, and `max_bytes` counts real sizes. A lone head larger
//! than `max_bytes` (a much smaller limit than before) may still roll once, since it can
//! only be deleted after a roll; the journal then stays full until releases free it.
//!
//! # Writing: one writer, group commit
//!
//! Appenders encode their frame into a shared buffer under a short lock and leave. One
//! writer thread takes the whole buffer, writes it, and calls `fdatasync` once for all of
//! it, then advances the durable watermark. While it syncs, new appends accumulate into
//! the next batch, so a slow disk yields larger batches rather than lower throughput.
//! When a frame does not fit the current segment, the appender plans a roll: the writer
//! syncs the full segment, advances the durable watermark to its last record, creates the
//! next (pre-sized, fsync'd, directory fsync'd) and continues there: a batch spanning
//! several segments becomes durable segment by segment, so after a transient error its
//! retry restarts at the first unsynced segment and released segments behind it can be
//! deleted meanwhile (a batch larger than the free space still gets through). The buffer is bounded (`max_buffer_bytes`); appenders wait when it
//! is full.
//!
//! # Stalls: transient I/O errors
//!
//! ENOSPC, EDQUOT, EMFILE, ENFILE and EIO from any writer step (segment create or
//! `fallocate`, write, `fdatasync`, checkpoint, directory fsync) do not stop the journal.
//! The writer keeps the batch in memory and retries with back-off (50 ms doubling to 5 s):
//!
//! * the durable watermark does not advance, so no PUBACK goes out for anything newer;
//! * appends fill the bounded buffer and then wait: sessions stop reading their sockets;
//! * [`JournalStats::stalled`] holds the error; one error line is logged when the stall
//!   starts and one info line when it ends;
//! * each retry rewrites the *whole* batch from memory at the same offsets before syncing:
//!   after a failed `fdatasync` the page cache cannot be trusted (the kernel may have
//!   dropped the dirty pages and marked them clean, "fsyncgate");
//! * retries are idempotent: a segment file a failed roll left half-created is reused;
//! * released segments before the one the pending batch is written to are still deleted
//!   during the stall: on a full volume they may be what frees the space.
//!
//! It resumes by itself once the cause goes away. Other I/O errors are fatal: appends
//! then fail with [`JournalError::Stopped`]. A close during a stall gives up on the
//! unsynced batch (it was never acknowledged).
//!
//! # Releasing
//!
//! The writer thread persists the release watermark (write temp file, fsync, rename,
//! fsync directory) and then deletes every segment whose records are all released
//! (never the head segment): the segment leaves the in-memory list first, then its file
//! is unlinked, then the directory is fsync'd, so a reader never looks up a segment
//! whose file is gone (one that raced the lookup retries). With replay retention on it
//! moves the segment to the retained set instead (both lists locked together, so a
//! replay's reader finds it in one of them) and deletes retained segments as described
//! next.
//!
//! # Replay retention
//!
//! With `replay_retention` on ([`ReplayRetention::enabled`]), a segment whose records are
//! all released leaves the live list for the *retained* set instead of being deleted. A
//! retained segment is deleted (oldest first) once
//!
//! * its last record was written more than `max_age` ago (the file's modification time,
//!   made durable by the `fsync` that sealed the segment at its roll), **or**
//! * the retained set holds more than `max_bytes` (real file sizes),
//!
//! except while a replay pins it ([`ReplayReader`]): a replay does not lose the records
//! it is reading to the window or the cap, which may then be exceeded until it finishes —
//! up to twice the cap ([`retained::PIN_CEILING`]): past that the oldest go anyway, so a
//! replay stuck behind an unreachable Kafka cannot fill the volume. Retained segments are
//! outside `max_bytes`, so the journal-full policy never applies because of them: the
//! disk holds at most `max_bytes` + 2 × `replay_retention.max_bytes` (plus one segment).
//! When the volume itself is full (the writer stalls on ENOSPC or EDQUOT) every retained
//! segment is deleted at once, pinned or not: live ingest comes first. Segments
//! `drop_oldest` released undelivered are deleted, never retained. Whatever deletes
//! records a replay pinned tells it ([`ReplayReader::revoked`], with the reason): the
//! replay fails instead of reporting a short range as done.
//!
//! Nothing about retention is persisted besides the files themselves: at open (with
//! retention on), every wholly released segment (by the release checkpoint) is retained
//! and the window and cap apply at once, so a restart keeps honouring them; with retention
//! turned off they are deleted with the next release. Readers start after the release
//! watermark as always (a restart never re-sends a retained record by itself). The
//! replayable range is from the oldest retained segment (or the oldest live one) to the
//! release watermark: [`SegmentedJournal::retained_range`].
//!
//! # Reading
//!
//! A reader returns every durable record from its position in sequence order. It jumps
//! over explicit gaps only: when the segment it reads was evicted (`drop_oldest`) it
//! continues with the first retained segment; when a segment ends (zeros or end of file)
//! before the next segment's first sequence, it continues there only if nothing but zeros
//! follows in the finished segment *and* every sequence of the gap is released or recorded
//! in `GAPS`. Otherwise acknowledged records are missing at the end of the segment (a lost
//! write, a zeroed block, a truncated file): [`JournalError::Corrupt`] ("records x..=y
//! missing at the end of segment S"). Anything else it cannot read (a bad CRC, a sequence
//! out of place, zeros hiding data) is returned as [`JournalError::Corrupt`]; it never
//! skips a damaged record.
//!
//! # Recovery: torn tail versus corruption
//!
//! On open, segments are listed by name; the checkpoint gives the release watermark.
//!
//! * The head segment is scanned in full. Records are accepted while their length, CRC
//!   and sequence are valid. At the first invalid frame the scanner searches the rest of
//!   the segment for a *plausible* valid frame (length fits, sequence above the last good
//!   one and within what the skipped bytes could hold, CRC matches, body parses).
//!   - None follows: a **torn tail**, the unsynced end of the last write batch the crash
//!     interrupted (never acknowledged, since acknowledgement follows the sync). It is
//!     cut and re-zeroed, and appends continue after the last valid record.
//!   - Except below the checkpoint: the release checkpoint never exceeds what was durable,
//!     so when it lies inside the head (`checkpoint >= head first sequence`) and beyond
//!     its last valid record, the missing end was synced, acknowledged and delivered.
//!     That is damage, not a torn tail: open fails with [`JournalError::Corrupt`] (the
//!     segment, the offset where the valid records end, sequences `last+1..=checkpoint`);
//!     cutting it would re-use sequences Kafka already holds, and the next restart would
//!     mark the new records released (never forwarded).
//!   - One follows: **corruption** of written, possibly acknowledged records. Open fails
//!     with [`JournalError::Corrupt`] naming the segment, the byte offset and the
//!     sequence range at risk; nothing is cut and no sequence is re-used.
//! * `GAPS` is read; the release watermark is the checkpoint (or the first retained
//!   segment's first sequence - 1, if higher), moved over any recorded gap right after it
//!   (lost sequences are not records waiting for Kafka), never above `durable`.
//! * Older segments were synced before the roll that followed them. Each one that still
//!   holds unreleased records (sequences neither released nor in `GAPS`) gets a cheap check (its size can hold a record, its first
//!   record decodes and carries the sequence of its name); a failure refuses to open the
//!   same way. Damage further inside an older segment is found by the reader when it
//!   gets there (and by `verify`), not by reading the whole journal at every start.
//!
//! Limitation: a *power loss* (not a process kill) can persist pages of the last,
//! unsynced batch out of order, leaving a hole followed by valid frames that were never
//! acknowledged. That looks like corruption and refuses to open; `repair` then loses
//! only records that were never acknowledged.
//!
//! # Verify and repair (a stopped gateway)
//!
//! [`verify`] reads every segment in full and reports records and damaged spans
//! (segment, offset, length, the sequences lost), including records missing at the end of
//! an older segment (a gap neither released nor in `GAPS`) and a head ending below the
//! release checkpoint (DAMAGE, not TORN TAIL). [`repair`] moves each damaged span's bytes
//! to `quarantine/`, records the lost ranges in `GAPS` (temp file, fsync, rename,
//! directory fsync; read at every open), keeps every intact record (the valid records
//! after damage move to a new segment named by their first sequence; the damaged segment
//! is cut at the damage), reports and logs the lost sequence ranges, and fsyncs files and
//! directories. When the head's end was damaged below the checkpoint, it also starts an
//! empty head segment after every sequence the damaged bytes could have held
//! (`max(checkpoint, last valid + free bytes / smallest frame) + 1`, that range in `GAPS`),
//! so no sequence that ever existed is re-used. Afterwards the journal opens and readers
//! return every intact record across the gap.
//! Both take the directory lock, so they fail with [`JournalError::Locked`] while a
//! gateway runs. See [`repair`] for crash safety.

mod dir;
mod metrics;
mod reader;
mod record;
mod recovery;
mod repair;
mod retained;
mod scan;
mod segmented;
mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

#[doc(hidden)]
pub use dir::key_line;
pub use dir::salt;
pub use reader::JournalReader;
pub use record::{
    decode, decode_salted, encode, encode_salted, frame_len, EncodeError, Entry, EntryKind, EntryRef, Frame,
    Record, Salt, FRAME_HEADER,
};
pub use repair::{repair, verify, DamagedSpan, RepairReport, SegmentSummary, VerifyReport};
pub use retained::{NotRetained, ReplayReader, RetainedRange, Revoked};
pub(crate) use segmented::now_ms;
pub use segmented::{FullPolicy, SegmentedJournal, TryAppend};
use tokio::sync::watch;

/// Tuning of the segmented journal. `dir` and `max_bytes` are the operator's `[journal]`
/// keys; the others have defaults that suit the gateway.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// Upper bound on segment files on disk.
    pub max_bytes: u64,
    /// Size each segment file is pre-allocated to; also the largest possible record.
    pub segment_bytes: u64,
    /// Upper bound on appended bytes waiting for the writer.
    pub max_buffer_bytes: usize,
    /// How long and how much of the released segments stay for replays; off by default.
    pub replay_retention: ReplayRetention,
}

/// Released segments kept for replays (`journal.replay_retention_secs` and
/// `journal.replay_retention_bytes`); see "Replay retention" in the module doc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayRetention {
    /// A retained segment is deleted once its last record is older than this. Zero keeps
    /// nothing: released segments are deleted at once.
    pub max_age: Duration,
    /// Bound on the retained segments' bytes, outside `max_bytes`; the oldest go first.
    pub max_bytes: u64,
}

impl ReplayRetention {
    pub fn enabled(&self) -> bool {
        !self.max_age.is_zero() && self.max_bytes > 0
    }
}

impl JournalConfig {
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        JournalConfig {
            dir: dir.into(),
            max_bytes,
            segment_bytes: 64 * 1024 * 1024,
            max_buffer_bytes: 32 * 1024 * 1024,
            replay_retention: ReplayRetention::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("journal directory {0} is in use by another gateway process")]
    Locked(PathBuf),
    #[error("record of {len} bytes does not fit a {segment_bytes}-byte journal segment")]
    TooLarge { len: usize, segment_bytes: u64 },
    #[error("record cannot be encoded: {0}")]
    Encode(#[from] EncodeError),
    #[error("journal configuration: {0}")]
    Config(String),
    /// Damage that is not a torn tail: records written (and possibly acknowledged) are
    /// unreadable. The gateway refuses to start (or the bridge stops forwarding) rather
    /// than cut or skip them; `gateway journal verify` / `repair` are the way out.
    #[error(
        "journal corrupt: segment {} is damaged at byte {offset} ({reason}); records {first_seq}..={last_seq} are at risk. \
         Stop the gateway, run `gateway journal verify` to see the damage, then `gateway journal repair` \
         to quarantine it and keep every intact record",
        segment.display()
    )]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        first_seq: u64,
        last_seq: u64,
        reason: String,
    },
    /// The writer failed (disk error) or the journal was closed. Nothing more is accepted:
    /// the gateway must not acknowledge anything it cannot make durable.
    #[error("journal stopped: {0}")]
    Stopped(String),
}

impl JournalError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        JournalError::Io {
            path: path.into(),
            source,
        }
    }
}

/// What the journal holds now; exported as metrics and in the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records appended and not yet released.
    pub records: u64,
    /// Bytes of live segment files on disk (pre-allocated size): what counts toward
    /// `max_bytes`. Retained segments are counted apart.
    pub disk_bytes: u64,
    pub segments: u64,
    /// Released segments kept for replays (replay retention), and their bytes.
    pub retained_segments: u64,
    pub retained_bytes: u64,
    /// Released records a replay can re-send, if any (see [`SegmentedJournal::retained_range`]).
    pub retained: Option<RetainedRange>,
    /// Age of the oldest unreleased durable record, if any.
    pub oldest_age: Option<Duration>,
    pub next_seq: u64,
    pub durable_seq: u64,
    pub released_seq: u64,
    /// Number of fdatasync batches written since open (group commits).
    pub syncs: u64,
    /// True while the journal holds `max_bytes` (the journal-full policy is active).
    pub full: bool,
    /// Appends refused by the `reject` policy since open.
    pub rejected: u64,
    /// Records dropped undelivered by the `drop_oldest` policy since open.
    pub dropped: u64,
    /// Set while the writer retries a transient I/O error (ENOSPC, EDQUOT, EMFILE,
    /// ENFILE, EIO): the error and the durable sequence it holds at. Meanwhile nothing
    /// new becomes durable, so no PUBACK goes out, and appends back-pressure once the
    /// write buffer is full. Clears by itself when a retry succeeds.
    pub stalled: Option<String>,
}

/// The write-ahead log seen by the gateway (appends) and by the bridge (reads, releases).
pub trait Journal: Send + Sync + 'static {
    /// Admits `entry` and returns its sequence number; waits while the journal is full.
    fn append(&self, entry: &Entry) -> impl Future<Output = Result<u64, JournalError>> + Send;
    /// Watermark of durable records: every `seq <= *borrow()` is on stable storage.
    fn durable(&self) -> watch::Receiver<u64>;
    /// A reader of durable records starting at `from_seq` (or the oldest retained).
    fn reader(&self, from_seq: u64) -> JournalReader;
    /// Every record up to and including `seq` has been delivered downstream.
    fn release(&self, seq: u64);
    fn stats(&self) -> JournalStats;
}
