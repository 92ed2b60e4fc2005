//! The journal directory: its lock, its identity, the segment files and their names.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, FlockOperation};

use super::record::{decode, Frame, Salt};
use super::JournalError;

pub(crate) const SEGMENT_EXT: &str = "seg";
pub(crate) const ID_FILE: &str = "JOURNAL_ID";
pub(crate) const KEY_FILE: &str = "JOURNAL_KEY";
pub(crate) const QUARANTINE_DIR: &str = "quarantine";

/// A segment file as listed on disk.
#[derive(Debug, Clone)]
pub(crate) struct SegmentMeta {
    /// Sequence of its first record (its name).
    pub first_seq: u64,
    pub path: PathBuf,
    /// Real size of the file: what it occupies against `max_bytes`, and for the head, the
    /// room left. Segments written under an earlier `segment_bytes` keep their own size.
    pub size: u64,
}

pub(crate) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.{SEGMENT_EXT}"))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| JournalError::io(dir, e))
}

/// Makes what a previous process left in segment `path` durable before recovery reads
/// it, and has recovery read the disk rather than the page cache.
///
/// A process killed between a `pwrite` and its `fdatasync` (OOM, `kill -9`, a panic)
/// leaves bytes that were never acknowledged in the page cache. Read from there they
/// look intact; taken for durable, they would be forwarded to Kafka and their sequence
/// numbers used, and a power loss before the kernel writes them back would then reuse
/// those numbers for new, acknowledged records (which consumers de-duplicating on the
/// sequence would drop) or wedge the next start. So they are synced now, like any
/// group commit; a sync that fails refuses the open. Then the file's cached pages are
/// dropped: after an `fdatasync` that failed with EIO the kernel may have marked pages
/// clean that never reached the disk, and the scan must not take those either.
pub(crate) fn settle_segment(path: &Path) -> Result<(), JournalError> {
    let file = File::open(path).map_err(|e| JournalError::io(path, e))?;
    file.sync_all().map_err(|e| JournalError::io(path, e))?;
    // Advice only: a filesystem that ignores it keeps the cache, as before.
    let _ = rustix::fs::fadvise(&file, 0, 0, rustix::fs::Advice::DontNeed);
    Ok(())
}

/// Takes the directory's exclusive flock; fails with `Locked` if a gateway (or a
/// `verify`/`repair`) holds it. The lock lasts as long as the returned file.
pub(crate) fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| JournalError::io(&lock_path, e))?;
    if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(JournalError::Locked(dir.to_path_buf()));
    }
    Ok(lock)
}

/// Opens the segment `first_seq`, creating it if needed, pre-sized to at least `size`,
/// and makes its existence durable. Idempotent: a file left by an earlier attempt that
/// failed half-way (ENOSPC in `fallocate`, EMFILE, ...) is reused, so a retried roll never
/// trips over EEXIST.
pub(crate) fn open_or_create_segment(
    dir: &Path,
    first_seq: u64,
    size: u64,
) -> Result<(File, PathBuf), JournalError> {
    let path = segment_path(dir, first_seq);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| JournalError::io(&path, e))?;
    preallocate(&file, &path, size)?;
    file.sync_all().map_err(|e| JournalError::io(&path, e))?;
    sync_dir(dir)?;
    Ok((file, path))
}

pub(crate) fn preallocate(file: &File, path: &Path, size: u64) -> Result<(), JournalError> {
    match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        // Filesystems without fallocate (tmpfs on old kernels, some overlays): a sparse
        // file still reads as zeros, which is all the format needs.
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let len = file.metadata().map_err(|e| JournalError::io(path, e))?.len();
            if len < size {
                file.set_len(size).map_err(|e| JournalError::io(path, e))?;
            }
            Ok(())
        }
        Err(e) => Err(JournalError::io(path, e.into())),
    }
}

/// The largest sequence a journal can plausibly hold (2^62: 14,000 years at ten million
/// records a second). Anything above it on disk is damage or a foreign file, and keeping
/// every sequence below it means `+ 1` on a sequence can never overflow.
pub(crate) const MAX_SEQ: u64 = 1 << 62;

pub(crate) fn list_segments(dir: &Path) -> Result<Vec<SegmentMeta>, JournalError> {
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
        if first_seq == 0 || first_seq > MAX_SEQ {
            return Err(JournalError::Config(format!(
                "segment file {} has an implausible name (sequence {first_seq}): sequences start at 1 \
                 and stay below 2^62; it was not written by a gateway — move it out of the journal directory",
                path.display()
            )));
        }
        let size = ent.metadata().map_err(|e| JournalError::io(&path, e))?.len();
        out.push(SegmentMeta {
            first_seq,
            path,
            size,
        });
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// Writes `bytes` to `dir/name` atomically and durably (temp file, fsync, rename, fsync
/// of the directory).
pub(crate) fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), JournalError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let file = File::create(&tmp).map_err(|e| JournalError::io(&tmp, e))?;
    file.write_all_at(bytes, 0)
        .map_err(|e| JournalError::io(&tmp, e))?;
    file.sync_all().map_err(|e| JournalError::io(&tmp, e))?;
    let dst = dir.join(name);
    fs::rename(&tmp, &dst).map_err(|e| JournalError::io(&dst, e))?;
    sync_dir(dir)
}

fn valid_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reads the journal identity, creating it durably when missing (a new journal, or one
/// written before identities existed). A malformed file is replaced by a new identity,
/// loudly: consumers then treat the journal as a new one (replays look new, nothing is
/// dropped).
pub(crate) fn load_or_create_id(dir: &Path) -> Result<String, JournalError> {
    let path = dir.join(ID_FILE);
    match fs::read_to_string(&path) {
        Ok(s) if valid_id(s.trim()) => return Ok(s.trim().to_ascii_lowercase()),
        Ok(s) => tracing::warn!(
            file = %path.display(),
            content = %s.trim(),
            "journal: malformed journal identity; writing a new one (consumers will see a new journal id)"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(JournalError::io(&path, e)),
    }
    let id = random_id().map_err(|e| JournalError::io("/dev/urandom", e))?;
    write_durably(dir, ID_FILE, format!("{id}\n").as_bytes())?;
    tracing::info!(id = %id, dir = %dir.display(), "journal: created journal identity");
    Ok(id)
}

/// The salt of the journal's record CRCs (see [`Salt`]), from `<dir>/JOURNAL_KEY`.
///
/// A journal created by this build (`fresh`: no segment yet) gets a new random key,
/// written durably before its first record. A journal with segments and no key file was
/// created before salts existed: its records keep unsalted CRCs ([`Salt::NONE`]) for as
/// long as the directory holds segments, once [`check_unsalted`] found that they are.
/// A key file that exists but is malformed (its check digits included) refuses the open
/// when segments exist and is replaced when none do.
///
/// Why so strict: under a wrong salt no record checks, and recovery would take the head
/// segment's records, acknowledged ones included, for a torn tail and cut them.
pub(crate) fn load_or_create_key(dir: &Path, segments: &[SegmentMeta]) -> Result<Salt, JournalError> {
    let fresh = segments.is_empty();
    match read_key(dir)? {
        Some(Ok(salt)) => return Ok(salt),
        Some(Err(content)) if !fresh => return Err(malformed_key(dir, &content)),
        None if !fresh => {
            check_unsalted(dir, segments)?;
            return Ok(Salt::NONE);
        }
        Some(Err(_)) | None => {}
    }
    let key = loop {
        let mut bytes = [0u8; 4];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|e| JournalError::io("/dev/urandom", e))?;
        let key = u32::from_le_bytes(bytes);
        if key != 0 {
            break key;
        }
    };
    write_durably(dir, KEY_FILE, key_line(key).as_bytes())?;
    Ok(Salt(key))
}

/// The key file's line: the key and a CRC32C of it (so that a damaged key is refused
/// rather than taken, which would make every record look torn), 8 hex digits each.
pub fn key_line(key: u32) -> String {
    format!("{key:08x} {:08x}\n", crc32c::crc32c(&key.to_le_bytes()))
}

/// The key file's salt: `None` when there is no file, `Some(Err(content))` when it is
/// malformed.
fn read_key(dir: &Path) -> Result<Option<Result<Salt, String>>, JournalError> {
    let path = dir.join(KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => {
            let t = s.trim();
            let parsed = t
                .split_once(' ')
                .filter(|(k, c)| k.len() == 8 && c.len() == 8)
                .and_then(|(k, c)| Some((u32::from_str_radix(k, 16).ok()?, u32::from_str_radix(c, 16).ok()?)))
                .filter(|(k, c)| *k != 0 && crc32c::crc32c(&k.to_le_bytes()) == *c);
            Ok(Some(parsed.map(|(k, _)| Salt(k)).ok_or_else(|| t.to_string())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JournalError::io(&path, e)),
    }
}

fn malformed_key(dir: &Path, content: &str) -> JournalError {
    JournalError::Config(format!(
        "{} is malformed ({content:?}; expected the key and its check, 8 hex digits each): the journal's records \
         cannot be checked without it. Restore the file from a backup of this journal directory",
        dir.join(KEY_FILE).display()
    ))
}

/// With segments and no key file: the journal must be one from before salts, whose
/// records check unsalted. If the first record of every segment that holds one fails so,
/// the key was lost (the journal was copied without it, or it was deleted): refused,
/// since under the wrong salt recovery would cut the head's records as a torn tail.
fn check_unsalted(dir: &Path, segments: &[SegmentMeta]) -> Result<(), JournalError> {
    let mut failed = None;
    for seg in segments {
        let mut data = vec![0u8; (seg.size as usize).min(FIRST_FRAME_READ)];
        let file = File::open(&seg.path).map_err(|e| JournalError::io(&seg.path, e))?;
        let n = read_up_to(&file, &mut data).map_err(|e| JournalError::io(&seg.path, e))?;
        data.truncate(n);
        match decode(&data) {
            Frame::Record(..) => return Ok(()),
            Frame::End => {}
            Frame::Torn(_) => failed = failed.or(Some(seg.path.clone())),
        }
    }
    match failed {
        None => Ok(()),
        Some(path) => Err(JournalError::Config(format!(
            "{} is missing, and the first record of {} does not check without it: the journal was created with a key. \
             Restore {KEY_FILE} from a backup of this journal directory (it moves with the segments). Only for a \
             journal created before 2026-12-08 whose single record is torn: move that segment aside",
            dir.join(KEY_FILE).display(),
            path.display()
        ))),
    }
}

/// Bytes read to check a segment's first record without a key (a larger first record is
/// taken as not checking: a journal from before salts has another segment or record to
/// prove itself, or is refused with the reason).
const FIRST_FRAME_READ: usize = 1 << 20;

fn read_up_to(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match file.read_at(&mut buf[at..], at as u64)? {
            0 => break,
            n => at += n,
        }
    }
    Ok(at)
}

/// The salt of the journal in `dir`, for the offline tools (`verify`, `repair`) and
/// anything else reading its segments: the key file's; [`Salt::NONE`] for a journal
/// from before salts; an error when the key is malformed or lost.
pub fn salt(dir: &Path) -> Result<Salt, JournalError> {
    match read_key(dir)? {
        Some(Ok(salt)) => Ok(salt),
        Some(Err(content)) => Err(malformed_key(dir, &content)),
        None => {
            check_unsalted(dir, &list_segments(dir)?)?;
            Ok(Salt::NONE)
        }
    }
}

/// 128 random bits as 32 lowercase hex digits.
fn random_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) const CHECKPOINT: &str = "release.checkpoint";

pub(crate) fn read_checkpoint(dir: &Path) -> Option<u64> {
    let bytes = fs::read(dir.join(CHECKPOINT)).ok()?;
    if bytes.len() != 12 {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[..8]);
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    // An implausible watermark is ignored like a damaged one: everything is replayed
    // (duplicates, never a loss).
    (crc32c::crc32c(&seq) == crc)
        .then(|| u64::from_le_bytes(seq))
        .filter(|s| *s <= MAX_SEQ)
}

pub(crate) fn write_checkpoint(dir: &Path, seq: u64) -> Result<(), JournalError> {
    let mut bytes = seq.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&seq.to_le_bytes()).to_le_bytes());
    write_durably(dir, CHECKPOINT, &bytes)
}

/// Sequence ranges (inclusive) that `repair` recorded as lost: the only sequence gaps
/// between retained segments a reader may skip besides released ones.
pub(crate) const GAPS_FILE: &str = "GAPS";

/// Reads `<dir>/GAPS` (one `first last` pair per line); none when the file is missing.
pub(crate) fn read_gaps(dir: &Path) -> Result<Vec<(u64, u64)>, JournalError> {
    let path = dir.join(GAPS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(JournalError::io(&path, e)),
    };
    let mut gaps = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut parts = line.split_whitespace().map(str::parse::<u64>);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Ok(first)), Some(Ok(last)), None) if first <= last => gaps.push((first, last)),
            _ => {
                return Err(JournalError::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("malformed line {line:?} (expected `<first> <last>`)"),
                    ),
                ))
            }
        }
    }
    Ok(merge_gaps(gaps))
}

/// Sorts and merges overlapping or adjacent ranges.
pub(crate) fn merge_gaps(mut gaps: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    gaps.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(gaps.len());
    for (first, last) in gaps {
        match out.last_mut() {
            Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// Adds `lost` to `<dir>/GAPS` durably (temp file, fsync, rename, directory fsync).
pub(crate) fn add_gaps(dir: &Path, lost: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, JournalError> {
    let mut gaps = read_gaps(dir)?;
    gaps.extend_from_slice(lost);
    let gaps = merge_gaps(gaps);
    let text: String = gaps.iter().map(|(f, l)| format!("{f} {l}\n")).collect();
    write_durably(dir, GAPS_FILE, text.as_bytes())?;
    Ok(gaps)
}

/// True when every sequence of `first..=last` is released (`<= released`) or inside a
/// recorded gap: a reader may skip exactly those.
pub(crate) fn gap_is_legal(first: u64, last: u64, released: u64, gaps: &[(u64, u64)]) -> bool {
    let mut cur = first.max(released.saturating_add(1));
    while cur <= last {
        match gaps.iter().find(|(f, l)| *f <= cur && cur <= *l) {
            Some((_, l)) if *l >= last => return true,
            Some((_, l)) => cur = l + 1,
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod gap_tests {
    use super::*;

    #[test]
    fn legal_gaps() {
        let gaps = merge_gaps(vec![(10, 12), (13, 15), (30, 40)]);
        assert_eq!(gaps, vec![(10, 15), (30, 40)]);
        assert!(gap_is_legal(5, 15, 9, &gaps));
        assert!(gap_is_legal(5, 8, 9, &gaps));
        assert!(!gap_is_legal(5, 16, 9, &gaps));
        assert!(!gap_is_legal(16, 16, 9, &gaps));
        assert!(gap_is_legal(31, 35, 0, &gaps));
        assert!(!gap_is_legal(29, 35, 0, &gaps));
    }
}
