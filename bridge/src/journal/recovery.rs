//! Opening an existing journal: torn tail versus corruption in the head segment, and the
//! cheap check of older segments. See "Recovery" in the journal module doc.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;

use super::dir::{gap_is_legal, preallocate, SegmentMeta};
use super::record::{decode_salted, Frame, Salt, FRAME_HEADER};
use super::scan;
use super::JournalError;

/// Result of scanning the head segment on open.
pub(super) struct Scan {
    pub(super) next_seq: u64,
    pub(super) end: u64,
}

/// Finds the end of the valid records of the head segment and cuts a torn tail.
///
/// Only the unsynced end of the last write batch can be torn: if any valid record follows
/// the first bad frame, the damage is corruption of written (maybe acknowledged) records,
/// and opening is refused rather than cutting them and re-using their sequences.
///
/// The release checkpoint never exceeds what was durable: if it lies beyond the last valid
/// record of the head (and inside the head), the missing end was synced and acknowledged,
/// so it is damage (a lost write, a zeroed block), not a torn tail, and opening is refused
/// as well: cutting it would re-use sequences Kafka already holds.
pub(super) fn recover_head(
    meta: &SegmentMeta,
    checkpoint: u64,
    salt: Salt,
) -> Result<(File, Scan), JournalError> {
    let path = &meta.path;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| JournalError::io(path, e))?;
    let data = fs::read(path).map_err(|e| JournalError::io(path, e))?;
    let found = scan::scan(&data, meta.first_seq, salt);
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
    if checkpoint >= meta.first_seq && checkpoint > next_seq - 1 {
        return Err(JournalError::Corrupt {
            segment: path.clone(),
            offset: end,
            first_seq: next_seq,
            last_seq: checkpoint,
            reason: format!(
                "the head segment's valid records end at sequence {}, but the release checkpoint says records up to \
                 {checkpoint} were durable and delivered, so the missing end is damage, not a torn tail",
                next_seq - 1
            ),
        });
    }
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
///
/// A segment whose every sequence is released or a gap `repair` recorded as lost holds
/// nothing to deliver and is not checked.
pub(super) fn check_older_segments(
    segments: &[SegmentMeta],
    released: u64,
    gaps: &[(u64, u64)],
    salt: Salt,
) -> Result<(), JournalError> {
    for pair in segments.windows(2) {
        let (seg, next) = (&pair[0], &pair[1]);
        if gap_is_legal(seg.first_seq, next.first_seq.saturating_sub(1), released, gaps) {
            continue;
        }
        let problem = first_frame_problem(seg, salt)?;
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

fn first_frame_problem(seg: &SegmentMeta, salt: Salt) -> Result<Option<String>, JournalError> {
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
    Ok(match decode_salted(&frame, salt) {
        Frame::Record(rec, _) if rec.seq == seg.first_seq => None,
        Frame::Record(rec, _) => Some(format!(
            "first record has sequence {}, the file name says {}",
            rec.seq, seg.first_seq
        )),
        Frame::End => Some("first frame is empty".into()),
        Frame::Torn(why) => Some(format!("first frame: {why}")),
    })
}
