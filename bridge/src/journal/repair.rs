//! `verify` and `repair`: the operator's way out of a journal that refuses to open.
//!
//! Both run on a stopped gateway (they take the directory lock, so they fail with
//! [`JournalError::Locked`] while a gateway runs) and read every segment in full.
//!
//! `repair` never deletes an intact record: for each damaged segment it
//! 1. copies every damaged span to `<dir>/quarantine/<segment-name>-<offset>.bin` (fsync'd),
//! 2. adds the lost sequence ranges to `<dir>/GAPS` (durably), the only gaps readers skip
//!    besides released sequences,
//! 3. writes each run of valid records that follows damage into a new segment named by its
//!    first sequence (the frames byte for byte; written to a temporary file, fsync'd,
//!    renamed, directory fsync'd); a segment of that name that an interrupted earlier
//!    repair left is reused when it holds the run, completed when it holds a prefix of it,
//! 4. if the head's end was damaged below the release checkpoint, creates an empty head
//!    after every sequence the damaged bytes could have held (so none is re-used),
//! 5. only then cuts the damaged segment at its first damage (or deletes it when no valid
//!    record precedes the damage), fsyncs it and the directory.
//!
//! A crash in the middle leaves either the old state or duplicates of records that a
//! second `repair` resolves the same way: it is safe to run again. The sequences the
//! damaged bytes held are lost; they are logged and reported, and readers skip the gap.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::dir::{
    add_gaps, gap_is_legal, list_segments, lock_dir, open_or_create_segment, preallocate, read_checkpoint,
    read_gaps, salt, segment_path, sync_dir, SegmentMeta, QUARANTINE_DIR,
};
use super::record::Salt;
use super::scan::{self, SegmentScan};
use super::JournalError;

/// One segment as `verify` found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    pub path: PathBuf,
    pub first_seq: u64,
    pub size: u64,
    /// Valid records it holds.
    pub records: u64,
    pub last_seq: Option<u64>,
}

/// Bytes of a segment that do not decode as the expected records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSpan {
    pub segment: PathBuf,
    pub offset: u64,
    pub len: u64,
    pub reason: String,
    /// Sequences (inclusive) the damaged bytes held, when known.
    pub lost: Option<(u64, u64)>,
    /// The unsynced end of the head segment's last write, with nothing valid after it: it
    /// was never acknowledged, and opening the journal cuts it. Not corruption.
    pub torn_tail: bool,
    /// Valid records after the span in the same segment (kept by `repair`).
    pub intact_after: u64,
}

/// What `verify` found: every segment, every damaged span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub released_seq: u64,
    pub segments: Vec<SegmentSummary>,
    pub damaged: Vec<DamagedSpan>,
}

impl VerifyReport {
    /// True when the journal opens without `repair` (at most a torn tail, which open cuts).
    pub fn is_clean(&self) -> bool {
        self.damaged.iter().all(|d| d.torn_tail)
    }
    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }
    /// Sequence ranges (inclusive) the damage holds.
    pub fn lost(&self) -> Vec<(u64, u64)> {
        self.damaged
            .iter()
            .filter(|d| !d.torn_tail)
            .filter_map(|d| d.lost)
            .collect()
    }
}

/// What `repair` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairReport {
    pub dir: PathBuf,
    /// Each damaged span and the quarantine file holding its bytes (none for an empty span).
    pub quarantined: Vec<(DamagedSpan, Option<PathBuf>)>,
    /// Sequence ranges (inclusive) lost with the damage.
    pub lost: Vec<(u64, u64)>,
    /// Sequences above the release checkpoint that a damaged head segment could have
    /// held (durable, maybe already in Kafka): never re-used, new appends start after them.
    pub skipped: Option<(u64, u64)>,
    /// Segments written for the valid records that followed damage.
    pub new_segments: Vec<PathBuf>,
    /// Damaged segments cut at their first damage.
    pub truncated_segments: Vec<PathBuf>,
    /// Damaged segments with no valid record before the damage, removed.
    pub removed_segments: Vec<PathBuf>,
    /// Valid records in the journal after the repair.
    pub records_kept: u64,
}

fn range(r: (u64, u64)) -> String {
    if r.0 == r.1 {
        format!("{}", r.0)
    } else {
        format!("{}..={}", r.0, r.1)
    }
}

impl fmt::Display for DamagedSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes {}..{} ({}): ",
            self.segment.display(),
            self.offset,
            self.offset + self.len,
            self.reason
        )?;
        if self.torn_tail {
            write!(
                f,
                "torn tail of the last write, never acknowledged; opening the journal cuts it"
            )
        } else {
            match self.lost {
                Some(r) => write!(f, "records {} lost", range(r))?,
                None => write!(f, "no record lost")?,
            }
            write!(f, ", {} intact records after it", self.intact_after)
        }
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "journal {}: {} segment(s), {} records, released up to {}",
            self.dir.display(),
            self.segments.len(),
            self.records(),
            self.released_seq
        )?;
        for s in &self.segments {
            let seqs = s.last_seq.map_or("no records".to_string(), |l| {
                format!("{} records, sequences {}..={}", s.records, s.first_seq, l)
            });
            writeln!(f, "  {} ({} bytes): {seqs}", s.path.display(), s.size)?;
        }
        for d in &self.damaged {
            let delivered = d.lost.is_some_and(|(_, last)| last <= self.released_seq);
            let note = if delivered {
                " (already delivered to Kafka)"
            } else {
                ""
            };
            let label = if d.torn_tail { "TORN TAIL" } else { "DAMAGE" };
            writeln!(f, "  {label} {d}{note}")?;
        }
        if self.is_clean() {
            write!(f, "result: OK, the journal opens as it is")
        } else {
            write!(
                f,
                "result: DAMAGED, {} damaged span(s); the gateway refuses to start (or stops forwarding when it \
                 reaches the damage). Run `gateway journal repair` (quarantines the damaged bytes, keeps every \
                 intact record)",
                self.damaged.iter().filter(|d| !d.torn_tail).count()
            )
        }
    }
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.quarantined.is_empty() {
            return write!(
                f,
                "journal {}: nothing to repair ({} records)",
                self.dir.display(),
                self.records_kept
            );
        }
        writeln!(f, "journal {} repaired:", self.dir.display())?;
        for (span, file) in &self.quarantined {
            match file {
                Some(q) => writeln!(f, "  quarantined {span} -> {}", q.display())?,
                None => writeln!(f, "  {span}")?,
            }
        }
        for p in &self.new_segments {
            writeln!(
                f,
                "  wrote {} (intact records that followed the damage, or an empty head after the damage)",
                p.display()
            )?;
        }
        for p in &self.truncated_segments {
            writeln!(f, "  cut {} at its first damage", p.display())?;
        }
        for p in &self.removed_segments {
            writeln!(
                f,
                "  removed {} (no intact record before the damage)",
                p.display()
            )?;
        }
        if let Some(r) = self.skipped {
            writeln!(
                f,
                "  sequences {} (the damaged head segment could have held them, durable and maybe in Kafka) \
                 are never re-used: new records start after them",
                range(r)
            )?;
        }
        let lost: Vec<String> = self.lost.iter().map(|r| range(*r)).collect();
        if lost.is_empty() {
            write!(f, "records lost: none; {} records kept", self.records_kept)
        } else {
            write!(
                f,
                "records lost: {} (sequences readers will skip); {} records kept",
                lost.join(", "),
                self.records_kept
            )
        }
    }
}

/// What the journal directory says about legal gaps and durability, for `inspect`.
struct Known {
    /// The release checkpoint: never above what was durable.
    checkpoint: u64,
    /// Ranges `repair` recorded as lost (`<dir>/GAPS`).
    gaps: Vec<(u64, u64)>,
    /// The salt of the records' CRCs (`<dir>/JOURNAL_KEY`).
    salt: Salt,
}

/// The head's valid records end below the release checkpoint: the missing end was
/// durable (a checkpoint never exceeds `durable`), so it is damage, not a torn tail.
fn head_end_proven_damaged(seg: &SegmentMeta, found: &SegmentScan, checkpoint: u64) -> bool {
    let last = found.last_seq().unwrap_or(seg.first_seq - 1);
    checkpoint >= seg.first_seq && checkpoint > last
}

/// Scans one segment and turns its spans into the report's terms.
fn inspect(
    seg: &SegmentMeta,
    data: &[u8],
    next_first: Option<u64>,
    known: &Known,
) -> (SegmentScan, Vec<DamagedSpan>) {
    let found = scan::scan(data, seg.first_seq, known.salt);
    let is_head = next_first.is_none();
    let proven = is_head && head_end_proven_damaged(seg, &found, known.checkpoint);
    let mut damaged = Vec::new();
    for span in &found.spans {
        let torn_tail = is_head && span.resumes.is_none() && !proven;
        let lost = match (span.resumes, next_first) {
            (Some(_), _) => span.lost(),
            (None, Some(next)) => (next > span.after_seq + 1).then(|| (span.after_seq + 1, next - 1)),
            (None, None) if proven => Some((span.after_seq + 1, known.checkpoint)),
            (None, None) => None,
        };
        let intact_after = found
            .runs
            .iter()
            .filter(|r| r.start >= span.offset + span.len)
            .map(|r| r.last_seq - r.first_seq + 1)
            .sum();
        damaged.push(DamagedSpan {
            segment: seg.path.clone(),
            offset: span.offset,
            len: span.len,
            reason: if proven && span.resumes.is_none() {
                format!(
                    "{}; records up to the release checkpoint {} were durable, so this is not a torn tail",
                    span.reason, known.checkpoint
                )
            } else {
                span.reason.to_string()
            },
            lost,
            torn_tail,
            intact_after,
        });
    }
    // The segment ends cleanly (zeros or end of file) but records are missing before the
    // next segment (or, for the head, before the release checkpoint).
    let ends_cleanly = found.spans.last().is_none_or(|s| s.resumes.is_some());
    if ends_cleanly {
        let last = found.last_seq().unwrap_or(seg.first_seq - 1);
        let end = found.runs.last().map_or(0, |r| r.end);
        let missing = match next_first {
            Some(next) if next > last + 1 => Some((last + 1, next - 1)),
            Some(_) => None,
            None if proven => Some((last + 1, known.checkpoint)),
            None => None,
        };
        if let Some((first, upto)) = missing {
            let legal = !proven && gap_is_legal(first, upto, known.checkpoint, &known.gaps);
            // An older segment without a single record is removed by `repair` even when
            // its sequences are a recorded gap (left by an interrupted earlier repair).
            let empty_older = found.runs.is_empty() && next_first.is_some();
            if !legal || empty_older {
                let reason = if proven {
                    format!(
                        "the head segment ends at sequence {last}, below the release checkpoint {}: \
                         durable records are missing (not a torn tail)",
                        known.checkpoint
                    )
                } else if found.runs.is_empty() {
                    "segment holds no record".to_string()
                } else {
                    format!(
                        "records {first}..={upto} missing at the end of the segment \
                         (neither released nor recorded as lost by repair)"
                    )
                };
                damaged.push(DamagedSpan {
                    segment: seg.path.clone(),
                    offset: end,
                    len: 0,
                    reason,
                    lost: (!legal).then_some((first, upto)),
                    torn_tail: false,
                    intact_after: 0,
                });
            }
        }
    }
    (found, damaged)
}

fn read(path: &Path) -> Result<Vec<u8>, JournalError> {
    fs::read(path).map_err(|e| JournalError::io(path, e))
}

/// What `verify` and `repair` start from: the directory lock (the gateway must be
/// stopped), the segments and what the directory says about durability and legal gaps.
fn open_offline(dir: &Path) -> Result<(fs::File, Vec<SegmentMeta>, Known), JournalError> {
    check_dir(dir)?;
    let lock = lock_dir(dir)?;
    let segments = list_segments(dir)?;
    let salt = salt(dir)?;
    let known = Known {
        checkpoint: read_checkpoint(dir).unwrap_or(0),
        gaps: read_gaps(dir)?,
        salt,
    };
    Ok((lock, segments, known))
}

fn check_dir(dir: &Path) -> Result<(), JournalError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(JournalError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no journal directory"),
        ))
    }
}

/// Reads every segment of the journal in `dir` in full and reports its records and every
/// damaged span. Takes the directory lock: run it on a stopped gateway.
pub fn verify(dir: &Path) -> Result<VerifyReport, JournalError> {
    let (_lock, segments, known) = open_offline(dir)?;
    let checkpoint = known.checkpoint;
    let mut report = VerifyReport {
        dir: dir.to_path_buf(),
        released_seq: checkpoint,
        segments: Vec::new(),
        damaged: Vec::new(),
    };
    for (i, seg) in segments.iter().enumerate() {
        let next_first = segments.get(i + 1).map(|s| s.first_seq);
        let data = read(&seg.path)?;
        let (found, damaged) = inspect(seg, &data, next_first, &known);
        report.segments.push(SegmentSummary {
            path: seg.path.clone(),
            first_seq: seg.first_seq,
            size: seg.size,
            records: found.records(),
            last_seq: found.last_seq(),
        });
        report.damaged.extend(damaged);
    }
    Ok(report)
}

/// Writes `bytes` as the file `path`, durably, replacing it atomically if it exists.
fn write_file(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    let tmp = path.with_extension("repair.tmp");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| JournalError::io(&tmp, e))?;
    file.write_all_at(bytes, 0)
        .map_err(|e| JournalError::io(&tmp, e))?;
    file.sync_all().map_err(|e| JournalError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| JournalError::io(path, e))?;
    sync_dir(dir)
}

/// How a run of intact records after damage reaches its own segment file.
enum Target {
    /// No such file yet: write it.
    Write,
    /// An earlier, interrupted `repair` left a copy holding a prefix of the run (or all
    /// of it): complete it (rewrite it whole).
    Complete,
    /// An earlier `repair` left a copy holding the whole run (and maybe more): keep it.
    Reuse,
}

/// Checks where a run moved out of `seg` may go: no other segment may start inside it,
/// and a segment already named after its first sequence must hold the same frames (or a
/// prefix of them): the copy an interrupted `repair` made.
fn target_for(
    seg: &SegmentMeta,
    segments: &[SegmentMeta],
    run: &scan::Run,
    bytes: &[u8],
    salt: Salt,
) -> Result<Target, JournalError> {
    let overlap = segments
        .iter()
        .find(|s| s.first_seq > seg.first_seq && s.first_seq <= run.last_seq && s.first_seq != run.first_seq);
    let refuse = |reason: String| JournalError::Corrupt {
        segment: seg.path.clone(),
        offset: run.start,
        first_seq: run.first_seq,
        last_seq: run.last_seq,
        reason,
    };
    if let Some(other) = overlap {
        return Err(refuse(format!(
            "records after the damage overlap the segment {} (first sequence {}); cannot repair automatically",
            other.path.display(),
            other.first_seq
        )));
    }
    let Some(existing) = segments
        .iter()
        .find(|s| s.first_seq == run.first_seq && s.path != seg.path)
    else {
        return Ok(Target::Write);
    };
    let data = read(&existing.path)?;
    let copy = scan::scan(&data, existing.first_seq, salt);
    let held = &data[..copy.valid_end() as usize];
    if held.len() < bytes.len() && bytes.starts_with(held) {
        Ok(Target::Complete)
    } else if held.starts_with(bytes) {
        Ok(Target::Reuse)
    } else {
        Err(refuse(format!(
            "records after the damage overlap the segment {} (first sequence {}), which holds different records; \
             cannot repair automatically",
            existing.path.display(),
            existing.first_seq
        )))
    }
}

fn cut(path: &Path, len: u64, presize: Option<u64>) -> Result<(), JournalError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| JournalError::io(path, e))?;
    file.set_len(len).map_err(|e| JournalError::io(path, e))?;
    if let Some(size) = presize {
        preallocate(&file, path, size)?;
    }
    file.sync_all().map_err(|e| JournalError::io(path, e))
}

/// Quarantines every damaged span of the journal in `dir`, keeps every intact record,
/// records the lost sequences in `<dir>/GAPS` and reports them; see the module doc.
/// Afterwards new appends get sequences above every sequence that existed before.
/// Takes the directory lock: run it on a stopped gateway. A clean journal is left
/// untouched; running it again after a crash in the middle is safe.
pub fn repair(dir: &Path) -> Result<RepairReport, JournalError> {
    let (_lock, segments, known) = open_offline(dir)?;
    let checkpoint = known.checkpoint;
    let mut report = RepairReport {
        dir: dir.to_path_buf(),
        quarantined: Vec::new(),
        lost: Vec::new(),
        skipped: None,
        new_segments: Vec::new(),
        truncated_segments: Vec::new(),
        removed_segments: Vec::new(),
        records_kept: 0,
    };
    // Records of segments an interrupted repair already copied, counted with the
    // damaged segment they come from.
    let mut counted: Vec<(PathBuf, u64)> = Vec::new();
    let quarantine = dir.join(QUARANTINE_DIR);
    for (i, seg) in segments.iter().enumerate() {
        let next_first = segments.get(i + 1).map(|s| s.first_seq);
        let is_head = next_first.is_none();
        let data = read(&seg.path)?;
        let (found, damaged) = inspect(seg, &data, next_first, &known);
        let already = counted
            .iter()
            .find(|(p, _)| p == &seg.path)
            .map_or(0, |(_, n)| *n);
        report.records_kept += found.records().saturating_sub(already);
        if damaged.is_empty() {
            continue;
        }
        let keep = found.runs.first().filter(|r| r.start == 0).cloned();
        let moved: Vec<scan::Run> = found.runs.iter().filter(|r| r.start > 0).cloned().collect();
        let mut targets = Vec::new();
        for run in &moved {
            let bytes = &data[run.start as usize..run.end as usize];
            targets.push(target_for(seg, &segments, run, bytes, known.salt)?);
        }
        // The head's end is missing below the release checkpoint: those records were
        // durable and may be in Kafka. New appends must get sequences above any the
        // damaged bytes could have held, so an empty head is started after them.
        let proven = is_head && head_end_proven_damaged(seg, &found, checkpoint);
        let fresh_head = proven.then(|| {
            let last = found.last_seq().unwrap_or(seg.first_seq - 1);
            let end = found.runs.last().map_or(0, |r| r.end);
            let could_hold = seg.size.saturating_sub(end) / scan::MIN_FRAME as u64;
            checkpoint.max(last + could_hold) + 1
        });
        let mut lost_here = Vec::new();
        // 1. The damaged bytes go to quarantine first.
        for d in &damaged {
            let file = if d.len > 0 {
                fs::create_dir_all(&quarantine).map_err(|e| JournalError::io(&quarantine, e))?;
                let name = seg.path.file_name().and_then(|n| n.to_str()).unwrap_or("segment");
                let q = quarantine.join(format!("{name}-{}.bin", d.offset));
                let start = d.offset as usize;
                let end = (d.offset + d.len) as usize;
                write_file(&quarantine, &q, data.get(start..end).unwrap_or_default())?;
                Some(q)
            } else {
                None
            };
            if d.torn_tail {
                tracing::warn!(segment = %seg.path.display(), offset = d.offset, "journal repair: cut a torn tail");
            } else if let Some((first, last)) = d.lost {
                tracing::error!(
                    segment = %seg.path.display(),
                    offset = d.offset,
                    first,
                    last,
                    "journal repair: records lost with a damaged span"
                );
                lost_here.push((first, last));
            } else {
                tracing::warn!(segment = %seg.path.display(), offset = d.offset, "journal repair: quarantined damaged bytes (no record lost)");
            }
            report.quarantined.push((d.clone(), file));
        }
        sync_dir(dir)?;
        let mut gaps_here = lost_here.clone();
        if let Some(first) = fresh_head {
            let last = found.last_seq().unwrap_or(seg.first_seq - 1);
            gaps_here.push((last + 1, first - 1));
            if first - 1 > checkpoint {
                report.skipped = Some((checkpoint + 1, first - 1));
                tracing::warn!(
                    from = checkpoint + 1,
                    to = first - 1,
                    "journal repair: sequences the damaged head could have held are never re-used"
                );
            }
        }
        report.lost.extend(lost_here);
        // 2. The lost sequences become legal gaps for readers (before anything is cut).
        if !gaps_here.is_empty() {
            add_gaps(dir, &gaps_here)?;
        }
        // 3. Intact records after the damage go to segments of their own (completing or
        //    reusing the copy of an interrupted earlier repair).
        let mut replaced = false;
        for (run, target) in moved.iter().zip(&targets) {
            let path = segment_path(dir, run.first_seq);
            replaced |= path == seg.path;
            let bytes = &data[run.start as usize..run.end as usize];
            match target {
                Target::Write | Target::Complete => write_file(dir, &path, bytes)?,
                Target::Reuse => {}
            }
            if !matches!(target, Target::Write) {
                counted.push((path.clone(), run.last_seq - run.first_seq + 1));
            }
            report.new_segments.push(path);
        }
        // 4. A fresh, empty head after every sequence the damaged head could have held.
        if let Some(first) = fresh_head {
            let (_, path) = open_or_create_segment(dir, first, seg.size)?;
            report.new_segments.push(path);
        }
        // 5. Only then is the damaged segment cut (or removed).
        if replaced {
            report.removed_segments.push(seg.path.clone());
            continue;
        }
        let still_head = is_head && moved.is_empty() && fresh_head.is_none();
        match (&keep, still_head) {
            (_, true) => {
                // Still the head: cut and re-zero to its size, as opening would.
                cut(&seg.path, keep.as_ref().map_or(0, |r| r.end), Some(seg.size))?;
                report.truncated_segments.push(seg.path.clone());
            }
            (Some(run), false) => {
                cut(&seg.path, run.end, None)?;
                report.truncated_segments.push(seg.path.clone());
            }
            (None, false) => {
                fs::remove_file(&seg.path).map_err(|e| JournalError::io(&seg.path, e))?;
                report.removed_segments.push(seg.path.clone());
            }
        }
        sync_dir(dir)?;
    }
    if !report.quarantined.is_empty() {
        tracing::warn!(
            dir = %dir.display(),
            lost = ?report.lost,
            skipped = ?report.skipped,
            kept = report.records_kept,
            "journal repair: done"
        );
    }
    Ok(report)
}
