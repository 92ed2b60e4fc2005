//! The write-ahead journal: where a vehicle's message becomes durable.
//!
//! # Contract
//!
//! * [`Journal::append`] gives an entry the next sequence number (strictly increasing by
//!   one, never reused, also across restarts) and returns it once the entry is admitted
//!   to the write buffer. It does **not** mean durable.
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
//!
//! # On disk
//!
//! ```text
//! <dir>/LOCK                           flock'ed by the owning process
//! <dir>/00000000000000000001.seg       segment; name = sequence of its first record
//! <dir>/00000000000000052311.seg
//! <dir>/release.checkpoint             released-up-to sequence: u64le + crc32c u32le
//! ```
//!
//! Segments are pre-sized (`fallocate`) to `segment_bytes`, so an `fdatasync` of a write
//! inside one does not have to update file metadata. Records are framed as described in
//! [`record`]: length + CRC32C + body carrying sequence, client id, topic, payload, QoS,
//! receive time, and the MQTT 5 properties downstream needs.
//!
//! # Writing: one writer, group commit
//!
//! Appenders encode their frame into a shared buffer under a short lock and leave. One
//! writer thread takes the whole buffer, writes it, and calls `fdatasync` once for all of
//! it, then advances the durable watermark. While it syncs, new appends accumulate into
//! the next batch, so a slow disk yields larger batches rather than lower throughput.
//! When a frame does not fit the current segment, the appender plans a roll: the writer
//! syncs the full segment, creates the next (pre-sized, fsync'd, directory fsync'd) and
//! continues there. The buffer is bounded (`max_buffer_bytes`); appenders wait when it
//! is full.
//!
//! # Releasing
//!
//! The writer thread persists the release watermark (write temp file, fsync, rename,
//! fsync directory) and then deletes every segment whose records are all released
//! (never the head segment), fsyncing the directory afterwards.
//!
//! # Recovery
//!
//! On open, segments are listed by name; the checkpoint gives the release watermark.
//! Segments before the head were synced before the roll that followed them, so only the
//! head segment is scanned: records are accepted while their length, CRC and sequence
//! are valid; the first invalid frame is a torn tail from a write the crash interrupted
//! (it was never acknowledged, since acknowledgement follows the sync). The tail is cut
//! and re-zeroed, and appends continue after the last valid record.

mod dir;
mod record;
mod repair;
mod scan;
mod segmented;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use record::{decode, encode, frame_len, EncodeError, Entry, Frame, Record, FRAME_HEADER};
pub use repair::{repair, verify, DamagedSpan, RepairReport, SegmentSummary, VerifyReport};
pub use segmented::{FullPolicy, JournalReader, SegmentedJournal};
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
}

impl JournalConfig {
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        JournalConfig {
            dir: dir.into(),
            max_bytes,
            segment_bytes: 64 * 1024 * 1024,
            max_buffer_bytes: 32 * 1024 * 1024,
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
    /// Bytes of segment files on disk (pre-allocated size).
    pub disk_bytes: u64,
    pub segments: u64,
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
