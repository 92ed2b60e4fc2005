//! Model test of the journal: random appends, releases, crashes (the writer stops
//! without syncing, optionally mid-write), reopenings and corruption of a written record
//! followed by `repair`. After every reopen the journal must hold every record that was
//! durable at the crash, in order, byte-identical, and nothing that was never appended;
//! a corrupted record is never lost silently: opening or reading reports it, and `repair`
//! loses exactly that record and keeps every other.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bridge::journal::{repair, Frame};
use bridge::{Entry, Journal, JournalConfig, JournalError, SegmentedJournal};
use bytes::Bytes;
use proptest::prelude::*;

/// Decodes a frame of the journal in `dir` (its CRCs are salted with its key).
fn decode(dir: &Path, bytes: &[u8]) -> Frame {
    bridge::journal::decode_salted(bytes, bridge::journal::salt(dir).expect("journal key"))
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        count: usize,
        size: usize,
    },
    AppendAndWait {
        count: usize,
        size: usize,
    },
    Release {
        fraction: u8,
    },
    Crash {
        torn: bool,
    },
    Reopen,
    /// Flip one byte of a written record that has a later record after it.
    Corrupt {
        pick: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..20usize, 0..600usize).prop_map(|(count, size)| Op::Append { count, size }),
        3 => (1..20usize, 0..600usize).prop_map(|(count, size)| Op::AppendAndWait { count, size }),
        2 => (0..=100u8).prop_map(|fraction| Op::Release { fraction }),
        2 => any::<bool>().prop_map(|torn| Op::Crash { torn }),
        1 => Just(Op::Reopen),
        1 => any::<u8>().prop_map(|pick| Op::Corrupt { pick }),
    ]
}

fn entry(seq_hint: usize, size: usize) -> Entry {
    Entry {
        kind: Default::default(),
        received_at_ms: 1_700_000_000_000 + seq_hint as u64,
        qos: (seq_hint % 2) as u8,
        retain: false,
        client_id: format!("vehicle-{}", seq_hint % 7),
        topic: format!("vehicles/vehicle-{}/telemetry", seq_hint % 7),
        payload: Bytes::from(vec![(seq_hint % 251) as u8; size]),
        content_type: seq_hint.is_multiple_of(3).then(|| "application/json".to_string()),
        message_expiry_secs: seq_hint.is_multiple_of(5).then_some(30),
        user_properties: vec![("n".into(), seq_hint.to_string())],
        packet_id: seq_hint.is_multiple_of(4).then_some(seq_hint as u16),
    }
}

fn config(dir: &std::path::Path) -> JournalConfig {
    let mut cfg = JournalConfig::new(dir, 4096 * 400);
    cfg.segment_bytes = 4096;
    cfg
}

/// Reads every retained record and checks it against the model (`lost`: sequences a
/// repair reported lost).
fn check(j: &SegmentedJournal, model: &[Entry], released: u64, lost: &BTreeSet<u64>) -> u64 {
    let mut reader = j.reader(0);
    let mut all = Vec::new();
    loop {
        let batch = reader.next_batch(64).expect("reads");
        if batch.is_empty() {
            break;
        }
        all.extend(batch);
    }
    let Some(last) = all.last().map(|r| r.seq) else {
        let last = j.stats().next_seq - 1;
        assert!(
            last >= released,
            "released watermark {released} beyond the recovered end {last}"
        );
        return last;
    };
    // Released records may or may not still be readable (segments go lazily);
    // every unreleased one must be, contiguously and in order.
    let mut prev = 0;
    for rec in &all {
        assert!(rec.seq > prev, "records out of order: {} after {prev}", rec.seq);
        assert!(!lost.contains(&rec.seq), "a lost record {} came back", rec.seq);
        if rec.seq > released + 1 {
            let mut expect = prev + 1;
            while lost.contains(&expect) || expect <= released {
                expect += 1;
            }
            assert_eq!(rec.seq, expect, "unreleased records missing before {}", rec.seq);
        }
        prev = rec.seq;
        let expected = &model[rec.seq as usize - 1];
        assert_eq!(&rec.entry, expected, "record {} differs", rec.seq);
    }
    assert!(
        last >= released,
        "released watermark {released} beyond the recovered end {last}"
    );
    last
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Flips a byte inside the frame of record `seq`; false if it is not on disk.
fn corrupt_record(dir: &Path, seq: u64, pick: u8) -> bool {
    for seg in segment_files(dir) {
        let mut data = std::fs::read(&seg).expect("read segment");
        let mut pos = 0;
        while let Frame::Record(rec, n) = decode(dir, &data[pos..]) {
            if rec.seq == seq {
                data[pos + pick as usize % n] ^= 0x81;
                std::fs::write(&seg, data).expect("write segment");
                return true;
            }
            pos += n;
        }
    }
    false
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut j = SegmentedJournal::open(config(dir.path())).expect("opens");
    // model[seq - 1] is the entry appended with that sequence.
    let mut model: Vec<Entry> = Vec::new();
    let mut released = 0u64;
    let mut lost = BTreeSet::new();
    for op in ops {
        match op {
            Op::Append { count, size } | Op::AppendAndWait { count, size } => {
                for i in 0..count {
                    let e = entry(model.len() + i, size);
                    let seq = rt.block_on(j.append(&e)).expect("append");
                    assert_eq!(seq as usize, model.len() + 1, "sequence numbers are dense");
                    model.push(e);
                }
                if matches!(op, Op::AppendAndWait { .. }) {
                    rt.block_on(j.flush()).expect("flush");
                    assert_eq!(*j.durable().borrow(), model.len() as u64);
                }
            }
            Op::Release { fraction } => {
                let durable = *j.durable().borrow();
                let upto = released + (durable - released) * fraction as u64 / 100;
                j.release(upto);
                released = released.max(upto);
            }
            Op::Crash { torn } => {
                let durable = *j.durable().borrow();
                j.simulate_crash(torn);
                drop(j);
                j = SegmentedJournal::open(config(dir.path())).expect("reopens after crash");
                let last = check(&j, &model, released, &lost);
                assert!(
                    last >= durable,
                    "durable record {} lost (recovered up to {last})",
                    durable
                );
                // What was never synced may be gone; new appends take over its numbers.
                model.truncate(last as usize);
                assert_eq!(j.stats().next_seq, last + 1);
            }
            Op::Reopen => {
                j.close();
                drop(j);
                j = SegmentedJournal::open(config(dir.path())).expect("reopens");
                let last = check(&j, &model, released, &lost);
                assert_eq!(last as usize, model.len(), "a clean close keeps everything");
            }
            Op::Corrupt { pick } => {
                j.close();
                drop(j);
                // A record after the release watermark with a later record after it.
                let candidates: Vec<u64> = (released + 1..model.len() as u64)
                    .filter(|s| !lost.contains(s))
                    .collect();
                let Some(&victim) = candidates.get(pick as usize % candidates.len().max(1)) else {
                    j = SegmentedJournal::open(config(dir.path())).expect("reopens");
                    continue;
                };
                assert!(
                    corrupt_record(dir.path(), victim, pick),
                    "record {victim} not on disk"
                );
                match SegmentedJournal::open(config(dir.path())) {
                    Err(JournalError::Corrupt {
                        first_seq, last_seq, ..
                    }) => {
                        assert!(
                            first_seq <= victim && victim <= last_seq,
                            "range {first_seq}..={last_seq} misses {victim}"
                        );
                    }
                    Err(e) => panic!("unexpected error opening a corrupted journal: {e}"),
                    Ok(opened) => {
                        let mut r = opened.reader(0);
                        let err = loop {
                            match r.next_batch(64) {
                                Ok(b) if b.is_empty() => panic!("record {victim} was skipped silently"),
                                Ok(b) => {
                                    assert!(b.iter().all(|rec| rec.seq < victim), "read past the damage")
                                }
                                Err(e) => break e,
                            }
                        };
                        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
                    }
                }
                let report = repair(dir.path()).expect("repair");
                let newly: BTreeSet<u64> = report
                    .lost
                    .iter()
                    .flat_map(|(a, b)| *a..=*b)
                    .filter(|s| !lost.contains(s))
                    .collect();
                assert_eq!(
                    newly,
                    BTreeSet::from([victim]),
                    "repair loses exactly the damaged record: {report}"
                );
                lost.extend(newly);
                j = SegmentedJournal::open(config(dir.path())).expect("opens after repair");
                let last = check(&j, &model, released, &lost);
                assert_eq!(last as usize, model.len(), "repair keeps the end of the journal");
            }
        }
    }
    rt.block_on(j.flush()).expect("final flush");
    check(&j, &model, released, &lost);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn nothing_synced_is_lost(ops in proptest::collection::vec(op(), 1..30)) {
        run(ops);
    }
}

#[test]
fn released_segments_are_deleted_and_space_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut cfg = JournalConfig::new(dir.path(), 4096 * 4);
    cfg.segment_bytes = 4096;
    let j = SegmentedJournal::open(cfg).expect("opens");
    // Fill all four segments.
    let mut n = 0;
    loop {
        let e = entry(n, 900);
        let fut = j.append(&e);
        match rt.block_on(async { tokio::time::timeout(Duration::from_millis(300), fut).await }) {
            Ok(r) => {
                r.expect("append");
                n += 1;
            }
            Err(_) => break,
        }
    }
    assert!(j.stats().full, "the journal reports that it is full");
    assert_eq!(j.stats().segments, 4);
    rt.block_on(j.flush()).expect("flush");
    j.release(n as u64);
    // The waiting append is admitted once the released segments are gone.
    let seq = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), j.append(&entry(n, 900))).await })
        .expect("space returns after release")
        .expect("append");
    assert_eq!(seq, n as u64 + 1);
    assert!(j.stats().segments < 4);
    assert!(!j.stats().full);
}

#[test]
fn second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _j = SegmentedJournal::open(config(dir.path())).expect("opens");
    let err = SegmentedJournal::open(config(dir.path()))
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("in use"), "{err}");
}
