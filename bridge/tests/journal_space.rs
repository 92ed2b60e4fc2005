//! Disk space: `drop_oldest` eviction under a live reader, and `segment_bytes` changed
//! between restarts.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge::{Entry, FullPolicy, Journal, JournalConfig, Record, SegmentedJournal};
use bytes::Bytes;

fn entry(n: u64, size: usize) -> Entry {
    Entry {
        kind: Default::default(),
        received_at_ms: 1_700_000_000_000 + n,
        qos: 1,
        client_id: format!("vehicle-{}", n % 7),
        topic: format!("vehicles/vehicle-{}/telemetry", n % 7),
        payload: Bytes::from(vec![(n % 251) as u8; size]),
        ..Entry::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn oldest_segment_on_disk(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "seg").then(|| p.file_stem()?.to_str()?.parse().ok())?
        })
        .min()
}

fn read_all(j: &SegmentedJournal) -> Vec<Record> {
    let mut r = j.reader(0);
    let mut out = Vec::new();
    loop {
        let batch = r.next_batch(100).expect("reads");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

#[test]
fn a_reader_in_an_evicted_segment_continues_with_the_next_retained_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = JournalConfig::new(dir.path(), 4096 * 3);
    cfg.segment_bytes = 4096;
    let j = SegmentedJournal::open(cfg).expect("opens");
    let rt = rt();
    let mut n = 0;
    let mut append = |j: &SegmentedJournal| {
        n += 1;
        rt.block_on(j.append_with(&entry(n, 900), FullPolicy::DropOldest))
            .expect("append")
            .expect("drop_oldest never declines");
        rt.block_on(j.flush()).expect("flush");
    };
    for _ in 0..6 {
        append(&j);
    }
    // The reader is positioned inside the oldest segment, its file open.
    let mut reader = j.reader(0);
    let first = reader.next_batch(1).expect("reads");
    assert_eq!(first[0].seq, 1);

    // Keep appending until drop_oldest evicted that segment and it is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while j.stats().dropped == 0 || oldest_segment_on_disk(dir.path()) == Some(1) {
        assert!(Instant::now() < deadline, "segment 1 was never evicted");
        append(&j);
    }
    // Let the writer finish deleting whatever the last eviction released.
    let deadline = Instant::now() + Duration::from_secs(10);
    while oldest_segment_on_disk(dir.path()) != Some(j.stats().released_seq + 1) {
        assert!(Instant::now() < deadline, "evicted segments are never deleted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let retained = j.stats().released_seq + 1;
    let rest = reader
        .next_batch(10_000)
        .expect("the reader survives the eviction");
    assert_eq!(
        rest.first().map(|r| r.seq),
        Some(retained),
        "the reader continues with the first retained record"
    );
    let seqs: Vec<u64> = rest.iter().map(|r| r.seq).collect();
    let expected: Vec<u64> = (retained..=j.stats().durable_seq).collect();
    assert_eq!(seqs, expected);
}

#[test]
fn readers_never_hit_a_deleted_segment_file_under_drop_oldest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = JournalConfig::new(dir.path(), 4096 * 2);
    cfg.segment_bytes = 4096;
    let j = Arc::new(SegmentedJournal::open(cfg).expect("opens"));
    let stop = Arc::new(AtomicBool::new(false));
    let readers = {
        let (j, stop) = (j.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut r = j.reader(0);
                loop {
                    match r.next_batch(16) {
                        Ok(b) if b.is_empty() => break,
                        Ok(b) => reads += b.len() as u64,
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
            Ok(reads)
        })
    };
    let rt = rt();
    for n in 0..3000 {
        rt.block_on(j.append_with(&entry(n, 700), FullPolicy::DropOldest))
            .expect("append")
            .expect("appended");
        if n % 8 == 0 {
            rt.block_on(j.flush()).expect("flush");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reads = readers.join().expect("reader thread");
    let reads = reads.unwrap_or_else(|e| panic!("a reader failed during eviction: {e}"));
    assert!(reads > 0);
    assert!(j.stats().dropped > 0);
}

#[test]
fn lowering_segment_bytes_between_restarts_keeps_max_bytes_and_every_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let mut n = 0u64;
    {
        let mut cfg = JournalConfig::new(dir.path(), 4 << 20);
        cfg.segment_bytes = 1 << 20;
        let j = SegmentedJournal::open(cfg).expect("opens");
        for _ in 0..1500 {
            n += 1;
            rt.block_on(j.append(&entry(n, 200))).expect("append");
        }
        rt.block_on(j.flush()).expect("flush");
        j.close();
    }
    let max_bytes = 2 << 20;
    let mut cfg = JournalConfig::new(dir.path(), max_bytes);
    cfg.segment_bytes = 64 << 10;
    let j = SegmentedJournal::open(cfg).expect("reopens with smaller segments");
    assert_eq!(j.stats().disk_bytes, 1 << 20, "the old head keeps its real size");
    // Fill the journal to its limit; the limit holds at every step.
    loop {
        let seq = rt
            .block_on(j.append_with(&entry(n + 1, 200), FullPolicy::Reject))
            .expect("append");
        let stats = j.stats();
        assert!(
            stats.disk_bytes <= max_bytes,
            "{} bytes on disk, max_bytes {max_bytes}",
            stats.disk_bytes
        );
        match seq {
            Some(seq) => {
                n += 1;
                assert_eq!(seq, n);
            }
            None => break,
        }
        assert!(n < 100_000, "the journal never became full");
    }
    rt.block_on(j.flush()).expect("flush");
    assert!(
        j.stats().segments > 2,
        "new segments were created at the new size"
    );
    let all = read_all(&j);
    assert_eq!(all.len() as u64, n);
    for (i, rec) in all.iter().enumerate() {
        assert_eq!(rec.seq, i as u64 + 1);
        assert_eq!(rec.entry, entry(rec.seq, 200));
    }
    // Releasing everything frees the old, larger segment too.
    j.release(n);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = rt.block_on(j.append_with(&entry(n + 1, 200), FullPolicy::Reject));
        if res.expect("append").is_some() {
            n += 1;
            break;
        }
        assert!(Instant::now() < deadline, "space never returned after release");
        std::thread::sleep(Duration::from_millis(20));
    }
    rt.block_on(j.flush()).expect("flush");
    assert!(j.stats().disk_bytes <= max_bytes);
    assert_eq!(j.stats().next_seq, n + 1);
}

#[test]
fn an_empty_segment_left_by_a_failed_roll_is_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let config = || {
        let mut cfg = JournalConfig::new(dir.path(), 4096 * 16);
        cfg.segment_bytes = 4096;
        cfg
    };
    {
        let j = SegmentedJournal::open(config()).expect("opens");
        for n in 1..=3 {
            rt.block_on(j.append(&entry(n, 900))).expect("append");
        }
        rt.block_on(j.flush()).expect("flush");
        j.close();
    }
    // A roll created the next segment and crashed before fallocate succeeded.
    std::fs::File::create(dir.path().join(format!("{:020}.seg", 4))).expect("create");
    let j = SegmentedJournal::open(config()).expect("opens with a zero-length head");
    for n in 4..=40 {
        assert_eq!(rt.block_on(j.append(&entry(n, 900))).expect("append"), n);
    }
    rt.block_on(j.flush()).expect("flush");
    let all = read_all(&j);
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    let stats = j.stats();
    let files = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))
        })
        .count() as u64;
    assert_eq!(stats.segments, files, "the segment count matches the files");
    assert_eq!(stats.disk_bytes, files * 4096);
}
