//! Replays the checked-in journal fuzz corpus on stable: every file of
//! `fuzz/corpus/journal_recover/`, `fuzz/seeds/journal_recover/` and
//! `fuzz/regressions/journal_recover/` goes through `bridge::fuzzing::journal_recover`,
//! the body of the cargo-fuzz target. A panic on any file fails the test, naming it.
//!
//! `write_seeds` (ignored) regenerates the seeds: segments written by the real journal
//! (`SegmentedJournal`), with the 5-byte header described in `bridge::fuzzing`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use bridge::journal::{Journal, JournalConfig};
use bridge::{Entry, SegmentedJournal};
use bytes::Bytes;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs `target` on every file in `dir` except `skip`; fails listing those that panicked.
fn replay(dir: &str, skip: &[&str], target: fn(&[u8])) {
    let dir = fuzz_dir().join(dir);
    let files: Vec<PathBuf> = files(&dir)
        .into_iter()
        .filter(|f| !skip.iter().any(|s| f.ends_with(s)))
        .collect();
    assert!(
        !files.is_empty() || !skip.is_empty(),
        "no inputs in {}",
        dir.display()
    );
    let failed: Vec<String> = files
        .iter()
        .filter(|f| {
            let data = std::fs::read(f).expect("read corpus file");
            catch_unwind(AssertUnwindSafe(|| target(&data))).is_err()
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} inputs panicked: {failed:#?}",
        failed.len(),
        files.len()
    );
}

fn replay_one(name: &str) {
    let path = fuzz_dir().join("regressions/journal_recover").join(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bridge::fuzzing::journal_recover_unguarded(&data);
}

#[test]
fn journal_recover_corpus() {
    replay("corpus/journal_recover", &[], bridge::fuzzing::journal_recover);
}

#[test]
fn journal_recover_seeds() {
    replay("seeds/journal_recover", &[], bridge::fuzzing::journal_recover);
}

/// Every seed again as a salted journal (flag 8: a `JOURNAL_KEY`; flag 1: CRCs fixed
/// under its salt), so the checked-in inputs reach the salted path too; and the salt is
/// really in play: a salted head reads all its records, and the same bytes without the
/// key (CRCs salted, no key file) are refused rather than cut.
#[test]
fn journal_recover_seeds_salted() {
    replay("seeds/journal_recover", &[], |data| {
        let mut salted = data.to_vec();
        if let Some(flags) = salted.first_mut() {
            *flags |= 8 | 1;
        }
        bridge::fuzzing::journal_recover_unguarded(&salted);
    });
    let head = journal_segments(6, 4096, 0).remove(0);
    assert_eq!(
        bridge::fuzzing::recovered_records(&input(8 | 1, 0, 0, 0, &head)),
        Some(6)
    );
    assert_eq!(
        bridge::fuzzing::recovered_records(&input(1, 0, 0, 0, &head)),
        Some(6),
        "unsalted, as a journal from before salts"
    );
    let mut salted_without_key = head.clone();
    let mut pos = 0;
    while pos + 8 <= salted_without_key.len() {
        let len = u32::from_le_bytes(salted_without_key[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let end = pos + 8 + len;
        let crc = crc32c::crc32c_append(bridge::fuzzing::FUZZ_KEY, &salted_without_key[pos + 8..end]);
        salted_without_key[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
    assert_eq!(
        bridge::fuzzing::recovered_records(&input(0, 0, 0, 0, &salted_without_key)),
        None,
        "salted records without their key: refused"
    );
}

/// Regression inputs whose bug is fixed; the open ones have their own ignored test below.
#[test]
fn journal_recover_regressions() {
    replay(
        "regressions/journal_recover",
        OPEN_BUGS,
        bridge::fuzzing::journal_recover_unguarded,
    );
}

/// Inputs in `fuzz/regressions/journal_recover/` that still fail (each has a test below).
const OPEN_BUGS: &[&str] = &[];

#[test]
fn regression_segment_bytes_lowered() {
    replay_one("segment_bytes_lowered");
}

#[test]
fn regression_record_seq_u64_max() {
    replay_one("record_seq_u64_max");
}

#[test]
fn regression_append_at_seq_u64_max() {
    replay_one("append_at_seq_u64_max");
}

/// Two more inputs of the overflow class above that the fuzz input format cannot express
/// (the target never names a segment 0 and always writes a head segment).
fn open_dir(dir: &Path) {
    let cfg = JournalConfig {
        segment_bytes: bridge::fuzzing::SEGMENT_BYTES,
        ..JournalConfig::new(dir, bridge::fuzzing::MAX_BYTES)
    };
    // Refusing to open is fine; a panic is not.
    let _ = SegmentedJournal::open(cfg);
}

#[test]
fn regression_segment_named_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("00000000000000000000.seg"), b"").expect("write");
    open_dir(dir.path());
}

#[test]
fn regression_checkpoint_u64_max() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seq = u64::MAX.to_le_bytes();
    let mut bytes = seq.to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&seq).to_le_bytes());
    std::fs::write(dir.path().join("release.checkpoint"), bytes).expect("write");
    open_dir(dir.path());
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/self/status");
    kb * 1024
}

#[test]
fn regression_older_segment_huge_frame_len() {
    // A 6.5 KB journal whose older segment's first frame claims 512 MiB.
    replay_one("older_segment_huge_frame_len");
    let peak = peak_rss();
    assert!(
        peak < 256 << 20,
        "reading a 6.5 KB journal peaked at {} MiB of memory",
        peak >> 20
    );
}

fn entry(i: usize) -> Entry {
    Entry {
        kind: Default::default(),
        received_at_ms: 1_700_000_000_000 + i as u64,
        qos: (i % 2) as u8,
        retain: i.is_multiple_of(5),
        client_id: format!("vin-{}", i % 3),
        topic: format!("vehicles/vin-{}/telemetry", i % 3),
        payload: Bytes::from(vec![i as u8; 8 + (i * 7) % 40]),
        content_type: i.is_multiple_of(2).then(|| "application/json".to_string()),
        message_expiry_secs: i.is_multiple_of(3).then_some(300),
        user_properties: if i % 4 == 1 {
            vec![("trip".into(), format!("t-{i}")), ("fw".into(), "1.2.3".into())]
        } else {
            Vec::new()
        },
        packet_id: None,
    }
}

/// Writes `n` entries (payload of `entry(i)` padded by `pad` bytes) with the real journal
/// and returns its segment files, in order, cut after their last record (the rest is the
/// zero-filled pre-allocation).
fn journal_segments(n: usize, segment_bytes: u64, pad: usize) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cfg = JournalConfig {
        segment_bytes,
        max_buffer_bytes: 1 << 20,
        ..JournalConfig::new(dir.path(), segment_bytes * 64)
    };
    let journal = SegmentedJournal::open(cfg).expect("open journal");
    rt.block_on(async {
        for i in 0..n {
            let mut e = entry(i);
            if pad > 0 {
                e.payload = Bytes::from(vec![b'p'; pad]);
            }
            journal.append(&e).await.expect("append");
        }
        journal.flush().await.expect("flush");
    });
    journal.close();
    drop(journal);
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("read journal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let salt = bridge::journal::salt(dir.path()).expect("journal key");
    segs.iter()
        .map(|p| {
            let mut bytes = std::fs::read(p).expect("read segment");
            let mut end = 0;
            while let bridge::journal::Frame::Record(_, n) =
                bridge::journal::decode_salted(&bytes[end..], salt)
            {
                // The harness's journal has no key: its frames carry unsalted CRCs.
                let crc = crc32c::crc32c(&bytes[end + 8..end + n]);
                bytes[end + 4..end + 8].copy_from_slice(&crc.to_le_bytes());
                end += n;
            }
            bytes.truncate(end);
            bytes
        })
        .collect()
}

/// `flags`, split, checkpoint, name delta (see `bridge::fuzzing`) then the segment bytes.
fn input(flags: u8, split: usize, checkpoint: u8, delta: u8, seg: &[u8]) -> Vec<u8> {
    let split = u16::try_from(split).expect("split fits u16").to_le_bytes();
    let mut out = vec![flags, split[0], split[1], checkpoint, delta];
    out.extend_from_slice(seg);
    out
}

/// Regenerates `fuzz/seeds/journal_recover/` and the regression inputs.
/// Run: `cargo test -p bridge --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore = "writes fuzz/seeds/journal_recover (run by hand when the seed set changes)"]
fn write_seeds() {
    let seeds = fuzz_dir().join("seeds/journal_recover");
    std::fs::create_dir_all(&seeds).expect("mkdir");
    let put = |name: &str, data: Vec<u8>| std::fs::write(seeds.join(name), data).expect("write seed");

    let head = journal_segments(6, 4096, 0).remove(0);
    put("head_6_records", input(0, 0, 0, 0, &head));
    put("head_6_records_fix_crc", input(1, 0, 0, 0, &head));
    put("head_6_records_checkpoint_3", input(4, 0, 3, 0, &head));
    put("head_6_records_salted", input(8 | 1, 0, 0, 0, &head));
    put("torn_tail", input(0, 0, 0, 0, &head[..head.len() - 11]));
    let mut corrupt = head.clone();
    corrupt[head.len() / 2] ^= 0x40;
    put("corrupt_middle", input(0, 0, 0, 0, &corrupt));
    put("empty", input(0, 0, 0, 0, &[]));
    put("zeros", input(0, 0, 0, 0, &[0; 64]));

    let segs = journal_segments(60, 4096, 0);
    assert!(segs.len() >= 2, "60 records roll a 4 KiB segment");
    let (older, head) = (&segs[segs.len() - 2], &segs[segs.len() - 1]);
    let mut both = older.clone();
    both.extend_from_slice(head);
    put("two_segments", input(2, older.len(), 0, 0, &both));
    put(
        "two_segments_fix_crc_checkpoint",
        input(7, older.len(), 20, 0, &both),
    );
    // The head's first record is gone: it is named older's first seq + delta.
    put("two_segments_gap", input(2, older.len() + 9, 0, 200, &both));

    // A journal written with 128 KiB segments, opened with the fuzz target's 64 KiB ones
    // (`journal.segment_bytes` lowered between restarts): the head holds more valid bytes
    // than a segment.
    let regressions = fuzz_dir().join("regressions/journal_recover");
    std::fs::create_dir_all(&regressions).expect("mkdir");
    let big = journal_segments(70, 128 * 1024, 1000).remove(0);
    assert!(big.len() as u64 > bridge::fuzzing::SEGMENT_BYTES);
    std::fs::write(regressions.join("segment_bytes_lowered"), input(0, 0, 0, 0, &big)).expect("write");

    // The older segment's first frame length corrupted (high byte 0x20: 512 MiB).
    // A valid (CRC-correct) record with the largest sequence.
    let mut max = journal_segments(1, 4096, 0).remove(0);
    max[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(regressions.join("record_seq_u64_max"), input(1, 0, 0, 0, &max)).expect("write");

    let mut huge = both.clone();
    huge[3] = 0x20;
    std::fs::write(
        regressions.join("older_segment_huge_frame_len"),
        input(2, older.len(), 0, 0, &huge),
    )
    .expect("write");
}
