//! A real full file system (a size-limited tmpfs mounted by the test, so it needs root):
//! the journal stalls instead of stopping, holds durability (no PUBACK), back-pressures
//! appenders, says so in `stalled`, and resumes by itself when space returns.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge::{Entry, Journal, JournalConfig, SegmentedJournal};
use bytes::Bytes;

mod tmpfs;
use tmpfs::{is_root, TmpfsMount};

fn entry(n: u64) -> Entry {
    Entry {
        kind: Default::default(),
        received_at_ms: 1_700_000_000_000 + n,
        qos: 1,
        client_id: format!("vehicle-{}", n % 3),
        topic: format!("vehicles/vehicle-{}/telemetry", n % 3),
        payload: Bytes::from(vec![(n % 251) as u8; 1000]),
        ..Entry::default()
    }
}

/// Writes a file until the file system refuses; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0xa5u8; 4096];
    while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {}
    path
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_file_system_stalls_the_journal_and_it_resumes_by_itself() {
    if !is_root() {
        eprintln!("SKIPPED a_full_file_system_stalls_the_journal_and_it_resumes_by_itself: needs root to mount a tmpfs");
        return;
    }
    let mount = TmpfsMount::new("1m").expect("mount a 1 MiB tmpfs");
    let dir = mount.path.join("journal");
    let mut cfg = JournalConfig::new(&dir, 512 << 10);
    cfg.segment_bytes = 64 << 10;
    cfg.max_buffer_bytes = 16 << 10;
    let j = Arc::new(SegmentedJournal::open(cfg).expect("opens"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for n in 1..=10 {
        rt.block_on(j.append(&entry(n))).expect("append");
    }
    rt.block_on(j.flush()).expect("flush");

    let filler = fill(&mount.path);
    // 200 records of 1 KiB need new segments, which the full file system refuses.
    const TOTAL: u64 = 210;
    let appended = Arc::new(AtomicU64::new(10));
    let appender = {
        let (j, appended) = (j.clone(), appended.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            for n in 11..=TOTAL {
                let seq = rt
                    .block_on(j.append(&entry(n)))
                    .expect("append never fails on ENOSPC");
                assert_eq!(seq, n);
                appended.store(n, Ordering::Relaxed);
            }
        })
    };
    wait_until("the journal reports the stall", Duration::from_secs(20), || {
        j.stats().stalled.is_some()
    });
    let stalled = j.stats();
    let why = stalled.stalled.clone().unwrap_or_default();
    assert!(why.contains("No space left"), "stall reason: {why}");
    std::thread::sleep(Duration::from_millis(600));
    let later = j.stats();
    assert_eq!(
        later.durable_seq, stalled.durable_seq,
        "nothing becomes durable while the disk is full"
    );
    assert!(later.durable_seq < TOTAL);
    assert!(later.stalled.is_some());
    let blocked_at = appended.load(Ordering::Relaxed);
    assert!(
        blocked_at < TOTAL,
        "appenders back-pressure on the bounded buffer"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        appended.load(Ordering::Relaxed),
        blocked_at,
        "appenders stay blocked"
    );
    assert!(
        !j.append_would_fail(),
        "a full disk does not stop the journal for good"
    );

    // Space returns: the journal resumes by itself.
    std::fs::remove_file(&filler).expect("free space");
    appender.join().expect("appender finishes");
    rt.block_on(j.flush()).expect("flush after recovery");
    let stats = j.stats();
    assert_eq!(stats.durable_seq, TOTAL);
    assert_eq!(stats.stalled, None, "the alarm clears on recovery");
    let mut r = j.reader(0);
    let mut got = Vec::new();
    loop {
        let b = r.next_batch(64).expect("reads");
        if b.is_empty() {
            break;
        }
        got.extend(b);
    }
    assert_eq!(got.len() as u64, TOTAL);
    for rec in &got {
        assert_eq!(rec.entry, entry(rec.seq));
    }
    // Everything is still there after a restart.
    j.close();
    drop(r);
    drop(j);
    let mut cfg = JournalConfig::new(&dir, 512 << 10);
    cfg.segment_bytes = 64 << 10;
    let j = SegmentedJournal::open(cfg).expect("reopens");
    assert_eq!(j.stats().next_seq, TOTAL + 1);
    drop(j);
    drop(mount);
}
