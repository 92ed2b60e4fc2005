//! Damage in the journal: only the unsynced end of the last write may be cut; corruption
//! with records after it refuses to open, and `verify`/`repair` keep every intact record.

use std::path::{Path, PathBuf};

use bridge::journal::{repair, verify, Frame};
use bridge::{Entry, Journal, JournalConfig, JournalError, Record, SegmentedJournal};
use bytes::Bytes;

/// Decodes a frame of the journal in `dir` (its CRCs are salted with its key).
fn decode(dir: &Path, bytes: &[u8]) -> Frame {
    bridge::journal::decode_salted(bytes, bridge::journal::salt(dir).expect("journal key"))
}

fn entry(n: u64) -> Entry {
    Entry {
        kind: Default::default(),
        received_at_ms: 1_700_000_000_000 + n,
        qos: 1,
        client_id: format!("vehicle-{}", n % 5),
        topic: format!("vehicles/vehicle-{}/telemetry", n % 5),
        payload: Bytes::from(format!("payload {n} ").repeat(3)),
        ..Entry::default()
    }
}

fn config(dir: &Path, segment_bytes: u64) -> JournalConfig {
    let mut cfg = JournalConfig::new(dir, segment_bytes * 64);
    cfg.segment_bytes = segment_bytes;
    cfg
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Appends `n` records and closes the journal cleanly.
fn write(dir: &Path, segment_bytes: u64, n: u64) {
    let rt = rt();
    let j = SegmentedJournal::open(config(dir, segment_bytes)).expect("opens");
    for i in 1..=n {
        assert_eq!(rt.block_on(j.append(&entry(i))).expect("append"), i);
    }
    rt.block_on(j.flush()).expect("flush");
    j.close();
}

fn read_all(j: &SegmentedJournal) -> Result<Vec<Record>, JournalError> {
    let mut r = j.reader(0);
    let mut out = Vec::new();
    loop {
        let batch = r.next_batch(37)?;
        if batch.is_empty() {
            return Ok(out);
        }
        out.extend(batch);
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// (segment, offset, frame length) of the record `seq`.
fn locate(dir: &Path, seq: u64) -> (PathBuf, usize, usize) {
    for seg in segments(dir) {
        let data = std::fs::read(&seg).expect("read segment");
        let mut pos = 0;
        while let Frame::Record(rec, n) = decode(dir, &data[pos..]) {
            if rec.seq == seq {
                return (seg, pos, n);
            }
            pos += n;
        }
    }
    panic!("record {seq} not found on disk");
}

fn flip_byte(path: &Path, at: usize) {
    let mut data = std::fs::read(path).expect("read");
    data[at] ^= 0x5a;
    std::fs::write(path, data).expect("write");
}

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

#[test]
fn corruption_in_the_middle_of_the_head_refuses_to_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1 << 20, 100);
    let (seg, off, len) = locate(dir.path(), 50);
    let (_, off100, _) = locate(dir.path(), 100);
    flip_byte(&seg, off + len - 3);

    let err = SegmentedJournal::open(config(dir.path(), 1 << 20))
        .err()
        .expect("must refuse to open");
    match &err {
        JournalError::Corrupt {
            segment,
            offset,
            first_seq,
            last_seq,
            ..
        } => {
            assert_eq!(segment, &seg);
            assert_eq!(*offset, off as u64);
            assert_eq!((*first_seq, *last_seq), (50, 100));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let msg = err.to_string();
    let name = seg.file_name().and_then(|n| n.to_str()).expect("name");
    for needle in [
        name,
        &format!("byte {off}"),
        "50..=100",
        "gateway journal verify",
        "gateway journal repair",
    ] {
        assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    }
    // Nothing was cut: the records after the damage are still on disk.
    let data = std::fs::read(&seg).expect("read");
    assert!(matches!(decode(dir.path(), &data[off100..]), Frame::Record(r, _) if r.seq == 100));
}

#[test]
fn a_torn_tail_is_still_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1 << 20, 100);
    // Half of record 91 written, then garbage that holds no valid frame.
    let (seg, off, len) = locate(dir.path(), 91);
    let mut data = std::fs::read(&seg).expect("read");
    for (i, b) in data[off + len / 2..off + len * 12].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(7) | 1;
    }
    std::fs::write(&seg, data).expect("write");

    let j = SegmentedJournal::open(config(dir.path(), 1 << 20)).expect("a torn tail opens");
    assert_eq!(j.stats().next_seq, 91);
    assert_eq!(seqs(&read_all(&j).expect("reads")), (1..=90).collect::<Vec<_>>());
    let rt = rt();
    assert_eq!(rt.block_on(j.append(&entry(91))).expect("append"), 91);
    rt.block_on(j.flush()).expect("flush");
    assert_eq!(read_all(&j).expect("reads").len(), 91);
}

/// A vehicle can put the bytes of a whole frame, CRC and all, in a payload. When a crash
/// tears the record carrying it, recovery searches the torn bytes for a valid frame to
/// tell a torn tail from damage: a planted frame found there made the journal refuse to
/// open (damage with records after it), and `repair` would have kept the forged record
/// (another vehicle's topic, any sequence) and sent it to Kafka. The CRCs are salted
/// with the journal's secret key, so a planted frame does not check.
#[test]
fn a_frame_planted_in_a_payload_is_not_taken_for_a_record_after_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1 << 20, 10);
    let forged = Entry {
        client_id: "someone-else".into(),
        topic: "vehicles/someone-else/unlock".into(),
        payload: Bytes::from_static(b"forged"),
        ..entry(0)
    };
    let mut planted = b"looks like telemetry ".to_vec();
    bridge::journal::encode(&mut planted, 12, &forged).expect("encodes");
    planted.extend_from_slice(&[b'x'; 64]);
    {
        let rt = rt();
        let j = SegmentedJournal::open(config(dir.path(), 1 << 20)).expect("opens");
        let carrier = Entry {
            payload: Bytes::from(planted),
            ..entry(11)
        };
        assert_eq!(rt.block_on(j.append(&carrier)).expect("append"), 11);
        rt.block_on(j.flush()).expect("flush");
        j.close();
    }
    // The crash: the end of record 11 never reached the file.
    let (seg, off, len) = locate(dir.path(), 11);
    let mut data = std::fs::read(&seg).expect("read");
    data[off + len - 32..off + len].fill(0);
    std::fs::write(&seg, data).expect("write");

    assert!(verify(dir.path()).expect("verify").lost().is_empty());
    let j = SegmentedJournal::open(config(dir.path(), 1 << 20)).expect("a torn tail opens");
    assert_eq!(j.stats().next_seq, 11, "the torn record is cut, nothing after it");
    let records = read_all(&j).expect("reads");
    assert_eq!(seqs(&records), (1..=10).collect::<Vec<_>>());
    assert!(records.iter().all(|r| r.entry.client_id != "someone-else"));
}

/// A journal written before salts (segments, no `JOURNAL_KEY`) opens and reads as
/// before, and keeps unsalted CRCs; a malformed key refuses the open, naming the file.
#[test]
fn a_journal_from_before_salts_still_opens_and_a_malformed_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seg = Vec::new();
    for n in 1..=3 {
        bridge::journal::encode(&mut seg, n, &entry(n)).expect("encodes");
    }
    seg.resize(1 << 20, 0);
    std::fs::write(dir.path().join(format!("{:020}.seg", 1)), &seg).expect("write segment");
    {
        let rt = rt();
        let j = SegmentedJournal::open(config(dir.path(), 1 << 20)).expect("a legacy journal opens");
        assert_eq!(seqs(&read_all(&j).expect("reads")), vec![1, 2, 3]);
        assert_eq!(rt.block_on(j.append(&entry(4))).expect("append"), 4);
        rt.block_on(j.flush()).expect("flush");
        j.close();
    }
    assert!(
        !dir.path().join("JOURNAL_KEY").exists(),
        "no key for a legacy journal"
    );
    assert!(verify(dir.path()).expect("verify").is_clean());

    std::fs::write(dir.path().join("JOURNAL_KEY"), "not a key\n").expect("write key");
    let err = SegmentedJournal::open(config(dir.path(), 1 << 20))
        .err()
        .expect("a malformed key is refused");
    assert!(err.to_string().contains("JOURNAL_KEY"), "{err}");
    let err = verify(dir.path()).expect_err("verify refuses too");
    assert!(err.to_string().contains("JOURNAL_KEY"), "{err}");
}

/// Under a wrong salt no record checks, and recovery would cut the head's records as a
/// torn tail: a lost or damaged key refuses the open (and `verify`), and nothing is cut.
#[test]
fn a_lost_or_damaged_key_refuses_the_open_and_cuts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1 << 20, 20);
    let key_path = dir.path().join("JOURNAL_KEY");
    let key = std::fs::read_to_string(&key_path).expect("a new journal has a key");
    let (seg, _, _) = locate(dir.path(), 20);
    let before = std::fs::read(&seg).expect("read");

    std::fs::remove_file(&key_path).expect("remove key");
    let err = SegmentedJournal::open(config(dir.path(), 1 << 20))
        .err()
        .expect("a lost key is refused");
    assert!(err.to_string().contains("JOURNAL_KEY is missing"), "{err}");
    assert!(verify(dir.path()).is_err());
    assert!(repair(dir.path()).is_err());

    // One hex digit of the key changed: its check digits no longer match.
    let flipped = if key.starts_with('0') { "1" } else { "0" };
    std::fs::write(&key_path, format!("{flipped}{}", &key[1..])).expect("write key");
    let err = SegmentedJournal::open(config(dir.path(), 1 << 20))
        .err()
        .expect("a damaged key is refused");
    assert!(err.to_string().contains("malformed"), "{err}");
    assert_eq!(std::fs::read(&seg).expect("read"), before, "nothing was cut");

    std::fs::write(&key_path, &key).expect("restore key");
    let j = SegmentedJournal::open(config(dir.path(), 1 << 20)).expect("opens with its key");
    assert_eq!(seqs(&read_all(&j).expect("reads")), (1..=20).collect::<Vec<_>>());
}

#[test]
fn verify_and_repair_keep_every_intact_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1 << 20, 100);
    let (seg, off, len) = locate(dir.path(), 50);
    flip_byte(&seg, off + 12);

    let report = verify(dir.path()).expect("verify");
    assert!(!report.is_clean(), "{report}");
    assert_eq!(report.lost(), vec![(50, 50)]);
    assert_eq!(report.records(), 99);
    let d = &report.damaged[0];
    assert_eq!((d.offset, d.len, d.intact_after), (off as u64, len as u64, 50));
    let text = report.to_string();
    assert!(
        text.contains("records 50 lost") && text.contains("DAMAGED"),
        "{text}"
    );

    let fixed = repair(dir.path()).expect("repair");
    assert_eq!(fixed.lost, vec![(50, 50)]);
    assert_eq!(fixed.records_kept, 99);
    let quarantined = fixed.quarantined[0].1.clone().expect("quarantine file");
    assert!(quarantined.starts_with(dir.path().join("quarantine")));
    assert_eq!(std::fs::read(&quarantined).expect("quarantine").len(), len);
    assert!(fixed.to_string().contains("records lost: 50"), "{fixed}");

    let j = SegmentedJournal::open(config(dir.path(), 1 << 20)).expect("opens after repair");
    let got = seqs(&read_all(&j).expect("reads across the gap"));
    let expected: Vec<u64> = (1..=100).filter(|s| *s != 50).collect();
    assert_eq!(got, expected);
    for rec in read_all(&j).expect("reads") {
        assert_eq!(rec.entry, entry(rec.seq), "record {} differs", rec.seq);
    }
    // Sequences are never re-used.
    let rt = rt();
    assert_eq!(rt.block_on(j.append(&entry(101))).expect("append"), 101);
    rt.block_on(j.flush()).expect("flush");
    j.close();
    drop(j);
    assert!(verify(dir.path()).expect("verify").is_clean());
    let again = repair(dir.path()).expect("repair again");
    assert!(again.quarantined.is_empty() && again.lost.is_empty(), "{again}");
}

#[test]
fn damage_in_an_older_segment_refuses_to_open_or_stops_the_reader() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 4096, 300);
    let segs = segments(dir.path());
    assert!(segs.len() >= 5, "test needs several segments, got {}", segs.len());

    // Damage inside an older segment (its first record intact): open's cheap check passes,
    // the reader reports it instead of skipping it.
    let target_seg = &segs[2];
    let first_of_target: u64 = target_seg
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("name");
    let victim = first_of_target + 3;
    let (seg, off, len) = locate(dir.path(), victim);
    assert_eq!(&seg, target_seg);
    flip_byte(&seg, off + len - 1);
    {
        let j = SegmentedJournal::open(config(dir.path(), 4096)).expect("cheap check passes");
        let err = read_all(&j).expect_err("the reader must not skip damage");
        match err {
            JournalError::Corrupt {
                segment, first_seq, ..
            } => {
                assert_eq!(segment, seg);
                assert_eq!(first_seq, victim);
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    // Damage of an older segment's first record refuses to open.
    let (seg1, off1, _) = locate(dir.path(), {
        let s = &segs[1];
        s.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .expect("name")
    });
    flip_byte(&seg1, off1 + 9);
    match SegmentedJournal::open(config(dir.path(), 4096)) {
        Err(JournalError::Corrupt { segment, offset, .. }) => {
            assert_eq!(segment, seg1);
            assert_eq!(offset, 0);
        }
        Err(other) => panic!("expected Corrupt, got {other:?}"),
        Ok(_) => panic!("damage in an older segment must refuse to open"),
    }

    let fixed = repair(dir.path()).expect("repair");
    let lost: Vec<u64> = fixed.lost.iter().flat_map(|(a, b)| *a..=*b).collect();
    assert!(lost.contains(&victim), "{fixed}");
    assert_eq!(lost.len(), 2, "one record lost per flipped byte: {fixed}");
    let j = SegmentedJournal::open(config(dir.path(), 4096)).expect("opens after repair");
    let got = seqs(&read_all(&j).expect("reads across the gaps"));
    let expected: Vec<u64> = (1..=300).filter(|s| !lost.contains(s)).collect();
    assert_eq!(got, expected);
}

#[test]
fn verify_and_repair_refuse_while_a_gateway_holds_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = SegmentedJournal::open(config(dir.path(), 4096)).expect("opens");
    assert!(matches!(verify(dir.path()), Err(JournalError::Locked(_))));
    assert!(matches!(repair(dir.path()), Err(JournalError::Locked(_))));
    drop(j);
    assert!(verify(dir.path()).expect("verify").is_clean());
}

#[test]
fn journal_identity_is_durable_and_new_for_a_new_journal() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let id_a = {
        let j = SegmentedJournal::open(config(a.path(), 4096)).expect("opens");
        j.id().to_string()
    };
    assert_eq!(id_a.len(), 32);
    assert!(id_a.bytes().all(|c| c.is_ascii_hexdigit()));
    let on_disk = std::fs::read_to_string(a.path().join("JOURNAL_ID")).expect("JOURNAL_ID");
    assert_eq!(on_disk.trim(), id_a);
    {
        let j = SegmentedJournal::open(config(a.path(), 4096)).expect("reopens");
        assert_eq!(j.id(), id_a, "the identity survives a restart");
    }
    let j = SegmentedJournal::open(config(b.path(), 4096)).expect("opens");
    assert_ne!(j.id(), id_a, "another journal has another identity");
    drop(j);
    // A journal directory from before identities existed gets one.
    std::fs::remove_file(a.path().join("JOURNAL_ID")).expect("remove");
    let j = SegmentedJournal::open(config(a.path(), 4096)).expect("opens");
    assert_eq!(j.id().len(), 32);
    assert!(a.path().join("JOURNAL_ID").exists());
}

#[test]
fn a_damaged_length_is_reported_not_allocated() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 4096, 100);
    let (seg, off, _) = locate(dir.path(), 10);
    let mut data = std::fs::read(&seg).expect("read");
    data[off..off + 4].copy_from_slice(&0xfff0_0000u32.to_le_bytes());
    std::fs::write(&seg, data).expect("write");
    let opened = SegmentedJournal::open(config(dir.path(), 4096));
    let err = match opened {
        Ok(j) => read_all(&j).expect_err("damage is reported"),
        Err(e) => e,
    };
    match err {
        JournalError::Corrupt {
            segment, first_seq, ..
        } => {
            assert_eq!(segment, seg);
            assert_eq!(first_seq, 10);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}
