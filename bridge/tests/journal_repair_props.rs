//! Property: whatever single damage hits a journal's records (a flipped bit, or a zeroed
//! run of records, anywhere but the newest record), the journal never silently loses a
//! record, `repair` always gets it going again (also when a first `repair` was interrupted
//! before its cut), and afterwards new appends get sequences
//! above every sequence that existed before.

use std::path::{Path, PathBuf};

use bridge::journal::{repair, verify, Frame};
use bridge::{Entry, Journal, JournalConfig, Record, SegmentedJournal};
use bytes::Bytes;
use proptest::prelude::*;

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

fn config(dir: &Path) -> JournalConfig {
    let mut cfg = JournalConfig::new(dir, 4096 * 64);
    cfg.segment_bytes = 4096;
    cfg
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Every record on disk: (segment, offset, frame length, seq).
fn frames(dir: &Path) -> Vec<(PathBuf, usize, usize, u64)> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let mut out = Vec::new();
    for seg in segs {
        let data = std::fs::read(&seg).expect("read segment");
        let mut pos = 0;
        while let Frame::Record(rec, n) = decode(dir, &data[pos..]) {
            out.push((seg.clone(), pos, n, rec.seq));
            pos += n;
        }
    }
    out
}

fn read_all(j: &SegmentedJournal, from: u64) -> Result<Vec<Record>, bridge::JournalError> {
    let mut r = j.reader(from);
    let mut out = Vec::new();
    loop {
        let batch = r.next_batch(37)?;
        if batch.is_empty() {
            return Ok(out);
        }
        out.extend(batch);
    }
}

/// `interrupt`: the first `repair` dies before it cuts the damaged segment (emulated by
/// putting the damaged bytes back); a second `repair` must finish the job.
fn check(
    n: u64,
    released: u64,
    victim: usize,
    count: usize,
    flip: Option<(usize, u8)>,
    interrupt: bool,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    {
        let j = SegmentedJournal::open(config(dir.path())).expect("opens");
        for i in 1..=n {
            rt.block_on(j.append(&entry(i))).expect("append");
        }
        rt.block_on(j.flush()).expect("flush");
        j.release(released);
        j.close();
    }
    let on_disk = frames(dir.path());
    // Never the newest record: damage there is indistinguishable from a torn tail.
    let candidates = &on_disk[..on_disk.len() - 1];
    prop_assume!(!candidates.is_empty());
    let (seg, off, len, first_victim) = candidates[victim % candidates.len()].clone();
    let mut data = std::fs::read(&seg).expect("read");
    let damaged_seqs: Vec<u64> = match flip {
        Some((byte, bit)) => {
            data[off + byte % len] ^= 1 << bit;
            vec![first_victim]
        }
        None => {
            // Zero `count` consecutive records of the same segment (not the newest).
            let run: Vec<_> = candidates
                .iter()
                .filter(|f| f.0 == seg && f.3 >= first_victim)
                .take(count.max(1))
                .collect();
            let end = run.last().map_or(off + len, |f| f.1 + f.2);
            for b in &mut data[off..end] {
                *b = 0;
            }
            run.iter().map(|f| f.3).collect()
        }
    };
    std::fs::write(&seg, &data).expect("write");
    let unreleased_damage = damaged_seqs.iter().any(|s| *s > released);

    // Detected, or nothing unreleased was touched and every unreleased record reads back.
    let outcome = SegmentedJournal::open(config(dir.path())).map(|j| {
        let from = j.stats().released_seq + 1;
        read_all(&j, from)
    });
    match outcome {
        Err(_) | Ok(Err(_)) => {}
        Ok(Ok(records)) => {
            prop_assert!(
                !unreleased_damage,
                "damage to {damaged_seqs:?} (released {released}) went unnoticed"
            );
            prop_assert_eq!(records.len() as u64, n - released);
        }
    }

    let mut report = repair(dir.path()).expect("repair");
    if interrupt {
        std::fs::write(&seg, &data).expect("the cut never happened");
        let second = repair(dir.path());
        prop_assert!(
            second.is_ok(),
            "second repair fails: {:?}",
            second.err().map(|e| e.to_string())
        );
        if let Ok(second) = second {
            report.lost.extend(second.lost);
        }
    }
    let verified = verify(dir.path()).expect("verify");
    prop_assert!(
        verified.is_clean(),
        "after repair:\n{}\nverify:\n{}",
        report,
        verified
    );
    let lost = |s: u64| report.lost.iter().any(|(a, b)| *a <= s && s <= *b);
    let new_seq = {
        let j = SegmentedJournal::open(config(dir.path())).expect("opens after repair");
        let records = read_all(&j, 0).expect("reads after repair");
        for r in &records {
            let e = entry(r.seq);
            prop_assert_eq!(&r.entry.payload, &e.payload);
            prop_assert_eq!(&r.entry.topic, &e.topic);
            prop_assert!(
                !damaged_seqs.contains(&r.seq),
                "damaged record {} read back",
                r.seq
            );
        }
        let got: std::collections::HashSet<u64> = records.iter().map(|r| r.seq).collect();
        let released_now = j.stats().released_seq;
        for s in (released_now + 1)..=n {
            prop_assert!(
                got.contains(&s) || lost(s),
                "record {} neither kept nor reported lost:\n{}",
                s,
                report
            );
        }
        for s in &damaged_seqs {
            prop_assert!(
                *s <= released_now || lost(*s),
                "damaged {} not reported lost:\n{}",
                s,
                report
            );
        }
        let seq = rt.block_on(j.append(&entry(10_000))).expect("append");
        rt.block_on(j.flush()).expect("flush");
        j.close();
        seq
    };
    prop_assert!(
        new_seq > n,
        "new record got sequence {new_seq}, re-using one of 1..={n}"
    );
    let j = SegmentedJournal::open(config(dir.path())).expect("reopens");
    prop_assert!(j.stats().released_seq < new_seq);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn a_flipped_bit_is_detected_and_repaired(
        n in 10u64..150,
        released_pick in 0u64..1000,
        victim in 0usize..1000,
        byte in 0usize..1000,
        bit in 0u8..8,
        interrupt in any::<bool>(),
    ) {
        let released = released_pick % (n + 1);
        check(n, released, victim, 1, Some((byte, bit)), interrupt)?;
    }

    #[test]
    fn zeroed_records_are_detected_and_repaired(
        n in 10u64..150,
        released_pick in 0u64..1000,
        victim in 0usize..1000,
        count in 1usize..6,
        interrupt in any::<bool>(),
    ) {
        let released = released_pick % (n + 1);
        check(n, released, victim, count, None, interrupt)?;
    }

    /// The newest records of the head are zeroed although the release checkpoint covers
    /// (some of) them: not a torn tail. Open refuses; after `repair` no sequence is re-used.
    #[test]
    fn a_damaged_head_end_below_the_checkpoint_is_never_reused(
        n in 10u64..150,
        count in 1u64..8,
        released_pick in 0u64..1000,
        interrupt in any::<bool>(),
    ) {
        check_head_end(n, count, released_pick, interrupt)?;
    }
}

fn check_head_end(n: u64, count: u64, released_pick: u64, interrupt: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let on_disk = {
        let j = SegmentedJournal::open(config(dir.path())).expect("opens");
        for i in 1..=n {
            rt.block_on(j.append(&entry(i))).expect("append");
        }
        rt.block_on(j.flush()).expect("flush");
        let on_disk = frames(dir.path());
        let head = on_disk.last().map(|f| f.0.clone()).expect("records");
        let in_head: Vec<_> = on_disk.iter().filter(|f| f.0 == head).cloned().collect();
        let count = (count as usize).min(in_head.len());
        let zeroed = in_head[in_head.len() - count..].to_vec();
        let first = zeroed[0].3;
        // Released at least up to the first zeroed record: it was durable.
        let released = first + released_pick % (n - first + 1);
        j.release(released);
        j.close();
        (zeroed, released)
    };
    let (zeroed, released) = on_disk;
    let intact = frames(dir.path()).iter().filter(|f| f.3 < zeroed[0].3).count();
    let seg = zeroed[0].0.clone();
    let mut data = std::fs::read(&seg).expect("read");
    let (from, to) = (zeroed[0].1, zeroed.last().map(|f| f.1 + f.2).unwrap_or(0));
    for b in &mut data[from..to] {
        *b = 0;
    }
    std::fs::write(&seg, &data).expect("write");

    prop_assert!(
        SegmentedJournal::open(config(dir.path())).is_err(),
        "opened as if torn"
    );
    let v = verify(dir.path()).expect("verify");
    prop_assert!(!v.is_clean(), "verify calls it clean:\n{}", v);
    repair(dir.path()).expect("repair");
    if interrupt {
        std::fs::write(&seg, &data).expect("the cut never happened");
        repair(dir.path()).expect("second repair");
    }
    let v = verify(dir.path()).expect("verify");
    prop_assert!(v.is_clean(), "after repair:\n{}", v);
    let seq = {
        let j = SegmentedJournal::open(config(dir.path())).expect("opens after repair");
        let got = read_all(&j, 0).expect("reads");
        prop_assert_eq!(got.len(), intact);
        prop_assert!(j.stats().released_seq >= released);
        let seq = rt.block_on(j.append(&entry(10_000))).expect("append");
        rt.block_on(j.flush()).expect("flush");
        j.close();
        seq
    };
    prop_assert!(
        seq > n,
        "new record got sequence {}, re-using one of 1..={}",
        seq,
        n
    );
    let j = SegmentedJournal::open(config(dir.path())).expect("reopens");
    prop_assert!(j.stats().released_seq < seq);
    let got = read_all(&j, j.stats().released_seq + 1).expect("reads");
    prop_assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![seq]);
    Ok(())
}
