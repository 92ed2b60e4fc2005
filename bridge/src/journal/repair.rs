//! `verify` and `repair`: the operator's way out of a journal that refuses to open.
//!
//! Both run on a stopped gateway (they take the directory lock, so they fail with
//! [`JournalError::Locked`] while a gateway runs) and read every segment in full.
//!
//! `repair` never deletes an intact record: for each damaged segment it
//! 1. copies every damaged span to `<dir>/quarantine/<segment-name>-<offset>.bin` (fsync'd),
//! 2. writes each run of valid records that follows damage into a new segment named by its
//!    first sequence (the frames byte for byte; written to a temporary file, fsync'd,
//!    renamed, directory fsync'd),
//! 3. only then cuts the damaged segment at its first damage (or deletes it when no valid
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
    list_segments, lock_dir, preallocate, read_checkpoint, segment_path, sync_dir, SegmentMeta,
    QUARANTINE_DIR,
};
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
                "  wrote {} (intact records that followed the damage)",
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

/// Scans one segment and turns its spans into the report's terms.
fn inspect(seg: &SegmentMeta, data: &[u8], next_first: Option<u64>) -> (SegmentScan, Vec<DamagedSpan>) {
    let found = scan::scan(data, seg.first_seq);
    let is_head = next_first.is_none();
    let mut damaged = Vec::new();
    for span in &found.spans {
        let torn_tail = is_head && span.resumes.is_none();
        let lost = match (span.resumes, next_first) {
            (Some(_), _) => span.lost(),
            (None, Some(next)) => (next > span.after_seq + 1).then(|| (span.after_seq + 1, next - 1)),
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
            reason: span.reason.to_string(),
            lost,
            torn_tail,
            intact_after,
        });
    }
    if let (Some(next), true) = (next_first, found.runs.is_empty() && found.spans.is_empty()) {
        damaged.push(DamagedSpan {
            segment: seg.path.clone(),
            offset: 0,
            len: 0,
            reason: "segment holds no record".into(),
            lost: (next > seg.first_seq).then(|| (seg.first_seq, next - 1)),
            torn_tail: false,
            intact_after: 0,
        });
    }
    (found, damaged)
}

fn read(path: &Path) -> Result<Vec<u8>, JournalError> {
    fs::read(path).map_err(|e| JournalError::io(path, e))
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
    check_dir(dir)?;
    let _lock = lock_dir(dir)?;
    let segments = list_segments(dir)?;
    let mut report = VerifyReport {
        dir: dir.to_path_buf(),
        released_seq: read_checkpoint(dir).unwrap_or(0),
        segments: Vec::new(),
        damaged: Vec::new(),
    };
    for (i, seg) in segments.iter().enumerate() {
        let next_first = segments.get(i + 1).map(|s| s.first_seq);
        let data = read(&seg.path)?;
        let (found, damaged) = inspect(seg, &data, next_first);
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

/// Quarantines every damaged span of the journal in `dir`, keeps every intact record and
/// reports what was lost; see the module doc. Takes the directory lock: run it on a
/// stopped gateway. A clean journal is left untouched.
pub fn repair(dir: &Path) -> Result<RepairReport, JournalError> {
    check_dir(dir)?;
    let _lock = lock_dir(dir)?;
    let segments = list_segments(dir)?;
    let mut report = RepairReport {
        dir: dir.to_path_buf(),
        quarantined: Vec::new(),
        lost: Vec::new(),
        new_segments: Vec::new(),
        truncated_segments: Vec::new(),
        removed_segments: Vec::new(),
        records_kept: 0,
    };
    let quarantine = dir.join(QUARANTINE_DIR);
    for (i, seg) in segments.iter().enumerate() {
        let next_first = segments.get(i + 1).map(|s| s.first_seq);
        let is_head = next_first.is_none();
        let data = read(&seg.path)?;
        let (found, damaged) = inspect(seg, &data, next_first);
        report.records_kept += found.records();
        if damaged.is_empty() {
            continue;
        }
        let keep = found.runs.first().filter(|r| r.start == 0).cloned();
        let moved: Vec<scan::Run> = found.runs.iter().filter(|r| r.start > 0).cloned().collect();
        if let (Some(next), Some(last)) = (next_first, moved.last()) {
            if last.last_seq >= next {
                return Err(JournalError::Corrupt {
                    segment: seg.path.clone(),
                    offset: last.start,
                    first_seq: last.first_seq,
                    last_seq: last.last_seq,
                    reason: format!(
                        "records after the damage overlap the next segment (first sequence {next}); \
                         cannot repair automatically"
                    ),
                });
            }
        }
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
                report.lost.push((first, last));
            } else {
                tracing::warn!(segment = %seg.path.display(), offset = d.offset, "journal repair: quarantined damaged bytes (no record lost)");
            }
            report.quarantined.push((d.clone(), file));
        }
        sync_dir(dir)?;
        // 2. Intact records after the damage go to segments of their own.
        let mut replaced = false;
        for run in &moved {
            let path = segment_path(dir, run.first_seq);
            replaced |= path == seg.path;
            write_file(dir, &path, &data[run.start as usize..run.end as usize])?;
            report.new_segments.push(path);
        }
        // 3. Only then is the damaged segment cut (or removed).
        if replaced {
            report.removed_segments.push(seg.path.clone());
            continue;
        }
        match (&keep, is_head && moved.is_empty()) {
            (_, true) => {
                // Still the head: cut and re-zero to its size, as opening would.
                let file = OpenOptions::new()
                    .write(true)
                    .open(&seg.path)
                    .map_err(|e| JournalError::io(&seg.path, e))?;
                file.set_len(keep.as_ref().map_or(0, |r| r.end))
                    .map_err(|e| JournalError::io(&seg.path, e))?;
                preallocate(&file, &seg.path, seg.size)?;
                file.sync_all().map_err(|e| JournalError::io(&seg.path, e))?;
                report.truncated_segments.push(seg.path.clone());
            }
            (Some(run), false) => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&seg.path)
                    .map_err(|e| JournalError::io(&seg.path, e))?;
                file.set_len(run.end)
                    .map_err(|e| JournalError::io(&seg.path, e))?;
                file.sync_all().map_err(|e| JournalError::io(&seg.path, e))?;
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
            kept = report.records_kept,
            "journal repair: done"
        );
    }
    Ok(report)
}
