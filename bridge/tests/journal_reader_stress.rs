//! A reader racing a writer that appends records of random sizes across segment rolls: every record arrives once, in order, byte-identical (the reader follows the writer with a small read window).
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge::{Entry, Journal, JournalConfig, SegmentedJournal};
use bytes::Bytes;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Record `i` (0-based; its sequence is i + 1), fully determined by `seed` and `i`.
fn entry(seed: u64, i: u64, max_len: u64) -> Entry {
    let mut r = Rng(seed ^ (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
    r.next();
    // Mostly small, some near the follow window, some large.
    let len = match r.next() % 4 {
        0 => 1 + r.next() % 64,
        1 => 16_000 + r.next() % 1_000,
        _ => 1 + r.next() % max_len,
    } as usize;
    let mut payload = vec![0u8; len];
    for b in payload.iter_mut() {
        *b = (r.next() >> 24) as u8;
    }
    Entry {
        kind: Default::default(),
        received_at_ms: i,
        qos: 1,
        client_id: format!("v{}", i % 7),
        topic: format!("vehicles/v{}/t", i % 7),
        payload: Bytes::from(payload),
        ..Entry::default()
    }
}

fn run(seed: u64, segment_bytes: u64, max_len: u64, n: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = JournalConfig::new(dir.path(), segment_bytes * 16);
    cfg.segment_bytes = segment_bytes;
    let j = Arc::new(SegmentedJournal::open(cfg).expect("open"));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let j = j.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut r = Rng(seed | 1);
            for i in 0..n {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                let seq = rt.block_on(j.append(&entry(seed, i, max_len))).expect("append");
                assert_eq!(seq, i + 1);
                match r.next() % 16 {
                    // Let the reader catch up (follow mode), then append more.
                    0 => {
                        rt.block_on(j.flush()).expect("flush");
                        std::thread::sleep(Duration::from_millis(r.next() % 3));
                    }
                    1 => std::thread::yield_now(),
                    _ => {}
                }
            }
            rt.block_on(j.flush()).expect("flush");
        })
    };
    let mut reader = j.reader(0);
    let mut r = Rng(seed.rotate_left(7) | 1);
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < n {
        assert!(Instant::now() < deadline, "reader stuck at {next} (seed {seed})");
        let max = if r.next().is_multiple_of(3) {
            1
        } else {
            1 + (r.next() % 300) as usize
        };
        let batch = match reader.next_batch(max) {
            Ok(b) => b,
            Err(e) => {
                done.store(true, Ordering::Relaxed);
                panic!(
                    "reader error at record {} (seed {seed}, segment {segment_bytes}): {e}",
                    next + 1
                );
            }
        };
        if batch.is_empty() {
            std::thread::yield_now();
            continue;
        }
        for rec in batch {
            assert_eq!(rec.seq, next + 1, "order (seed {seed})");
            let want = entry(seed, next, max_len);
            assert!(rec.entry == want, "record {} differs (seed {seed})", rec.seq);
            next += 1;
        }
        j.release(next);
    }
    writer.join().expect("writer");
    assert!(reader.next_batch(10).expect("end").is_empty());
}

#[test]
fn reader_races_writer_random_sizes_1mib_segments() {
    for seed in [1u64, 2, 3] {
        run(seed * 0x1234_5678_9abc, 1 << 20, 200 << 10, 600);
    }
}

#[test]
fn reader_races_writer_random_sizes_small_segments() {
    // Segments barely larger than the largest record: almost every record is "near the end".
    for seed in [11u64, 12, 13] {
        run(seed * 0x1234_5678_9abc, 210 << 10, 200 << 10, 600);
    }
}

#[test]
fn reader_races_writer_records_over_1mib() {
    for seed in [21u64, 22] {
        run(seed * 0x1234_5678_9abc, 8 << 20, 3 << 20, 60);
    }
}

/// Entry whose frame is exactly `frame` bytes.
fn sized(i: u64, frame: usize) -> Entry {
    let mut e = Entry {
        kind: Default::default(),
        received_at_ms: i,
        qos: 1,
        client_id: "v".into(),
        topic: "t".into(),
        ..Entry::default()
    };
    let overhead = bridge::journal::frame_len(&e);
    e.payload = Bytes::from(vec![(i % 251) as u8; frame - overhead]);
    assert_eq!(bridge::journal::frame_len(&e), frame);
    e
}

/// Records that fill segments to the last byte, to 1..7 bytes short of it (less than a
/// header left), and a caught-up reader at each of those ends; then a reopen with a
/// smaller `segment_bytes` (older segments keep their size).
#[test]
fn reader_at_exact_and_ragged_segment_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = 64u64 << 10;
    let mut expected: Vec<Entry> = Vec::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    {
        let mut cfg = JournalConfig::new(dir.path(), seg * 64);
        cfg.segment_bytes = seg;
        let j = SegmentedJournal::open(cfg).expect("open");
        let mut reader = j.reader(0);
        let mut got = 0usize;
        for short in 0..8usize {
            // One segment: a 40,000-byte frame then the rest minus `short`, in two
            // appends so that the reader catches up in the middle of the segment.
            for frame in [40_000usize, seg as usize - 40_000 - short] {
                let e = sized(expected.len() as u64, frame);
                rt.block_on(j.append(&e)).expect("append");
                expected.push(e);
                rt.block_on(j.flush()).expect("flush");
                for rec in reader.next_batch(100).expect("read") {
                    assert_eq!(rec.seq, got as u64 + 1);
                    assert!(rec.entry == expected[got], "record {}", rec.seq);
                    got += 1;
                }
                assert_eq!(got, expected.len());
            }
        }
        j.close();
    }
    let mut cfg = JournalConfig::new(dir.path(), seg * 64);
    cfg.segment_bytes = 20 << 10;
    let j = SegmentedJournal::open(cfg).expect("reopen");
    for n in 0..20u64 {
        let e = sized(expected.len() as u64, 1000 + (n as usize * 997) % 19_000);
        rt.block_on(j.append(&e)).expect("append");
        expected.push(e);
    }
    rt.block_on(j.flush()).expect("flush");
    let mut reader = j.reader(0);
    let mut got = 0;
    loop {
        let b = reader.next_batch(7).expect("read");
        if b.is_empty() {
            break;
        }
        for rec in b {
            assert_eq!(rec.seq, got as u64 + 1);
            assert!(rec.entry == expected[got]);
            got += 1;
        }
    }
    assert_eq!(got, expected.len());
}
