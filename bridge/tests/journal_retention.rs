//! Replay retention: released segments kept for a time window and a byte cap, outside
//! `max_bytes`; a pinned replay reader; restarts honour the window and never re-send.

use std::path::Path;
use std::time::{Duration, Instant};

use bridge::journal::ReplayRetention;
use bridge::{Entry, FullPolicy, Journal, JournalConfig, Record, SegmentedJournal};
use bytes::Bytes;

mod tmpfs;

const SEGMENT: u64 = 4096;

fn entry(n: u64) -> Entry {
    Entry {
        received_at_ms: 1_700_000_000_000 + n,
        qos: 1,
        client_id: format!("vehicle-{}", n % 3),
        topic: format!("vehicles/vehicle-{}/telemetry", n % 3),
        payload: Bytes::from(format!("payload {n:05} ").repeat(4)),
        ..Entry::default()
    }
}

fn config(dir: &Path, max_age: Duration, retained_bytes: u64) -> JournalConfig {
    let mut cfg = JournalConfig::new(dir, SEGMENT * 8);
    cfg.segment_bytes = SEGMENT;
    cfg.replay_retention = ReplayRetention {
        max_age,
        max_bytes: retained_bytes,
    };
    cfg
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn append(rt: &tokio::runtime::Runtime, j: &SegmentedJournal, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        rt.block_on(j.append(&entry(n))).expect("append");
    }
    rt.block_on(j.flush()).expect("flush");
}

fn seg_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))
        })
        .count()
}

/// Waits until the writer's maintenance reached `cond`.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_range(j: &SegmentedJournal, from: u64, to: u64) -> Vec<Record> {
    let mut r = j.replay_reader(from, to).expect("retained");
    let mut out = Vec::new();
    loop {
        let batch = r.next_batch(7).expect("read");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

#[test]
fn without_retention_released_segments_go_and_nothing_is_replayable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let j = SegmentedJournal::open(config(dir.path(), Duration::ZERO, 1 << 20)).expect("open");
    append(&rt, &j, 1..=200);
    j.release(200);
    until("segments deleted", || j.stats().segments == 1);
    let st = j.stats();
    assert_eq!(
        (st.retained_segments, st.retained_bytes, st.retained),
        (0, 0, None)
    );
    until("files unlinked", || seg_files(dir.path()) == 1);
    let refused = j.replay_reader(1, 10).expect_err("nothing retained");
    assert!(
        refused.message.contains("replay_retention_secs = 0"),
        "{}",
        refused.message
    );
}

#[test]
fn released_segments_are_retained_outside_max_bytes_and_replayed_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let j = SegmentedJournal::open(config(dir.path(), Duration::from_secs(3600), 1 << 20)).expect("open");
    append(&rt, &j, 1..=200);
    j.release(150);
    until("segments retained", || j.stats().retained_segments > 0);
    let st = j.stats();
    let range = st.retained.expect("a retained range");
    assert_eq!((range.from_seq, range.to_seq), (1, 150));
    // Retained segments left max_bytes: live ones are what still holds 151..=200.
    assert!(st.disk_bytes <= 3 * SEGMENT, "{st:?}");
    assert_eq!(st.records, 50);
    let seqs: Vec<u64> = read_range(&j, 17, 133).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (17..=133).collect::<Vec<_>>());
    let recs = read_range(&j, 140, 150);
    assert_eq!(recs[0].entry, entry(140));
    // Not released yet, before the oldest retained: refused with the range.
    let refused = j.replay_reader(100, 151).expect_err("151 is not released");
    assert!(refused.message.contains("1..=150"), "{}", refused.message);
    assert_eq!(refused.retained, Some(range));
    // Ingest still has all of max_bytes: 8 segments' worth of new records fit at once
    // after the rest is released (nothing waits for retained segments).
    j.release(200);
    until("all but the head retained", || j.stats().segments == 1);
    let appended = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            for n in 201..=400 {
                j.append_with(&entry(n), FullPolicy::Reject)
                    .await
                    .expect("append")
                    .expect("not refused");
            }
        })
        .await
    });
    assert!(appended.is_ok(), "live ingest waited for retained segments");
}

#[test]
fn the_byte_cap_deletes_the_oldest_but_never_what_a_replay_pins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let j = SegmentedJournal::open(config(dir.path(), Duration::from_secs(3600), 2 * SEGMENT)).expect("open");
    append(&rt, &j, 1..=100);
    j.release(100);
    until("retained", || {
        j.stats().retained.is_some() && j.stats().retained_segments >= 2
    });
    let first = j.stats().retained.expect("range").from_seq;
    // A replay pins from `first`: more releases must not delete what it reads.
    let mut pinned = j.replay_reader(first, 100).expect("retained");
    // Over the cap, not yet at the pin ceiling (twice the cap).
    let mut next = 101;
    while j.stats().retained_bytes <= 2 * SEGMENT + SEGMENT / 2 {
        append(&rt, &j, next..=next + 19);
        j.release(next + 19);
        next += 20;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(j.stats().retained_bytes < 4 * SEGMENT, "{:?}", j.stats());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        j.stats().retained.expect("range").from_seq,
        first,
        "pinned segments went"
    );
    assert!(
        j.stats().retained_bytes > 2 * SEGMENT,
        "over the cap while pinned"
    );
    let mut n = 0;
    loop {
        let batch = pinned.next_batch(50).expect("read");
        if batch.is_empty() {
            break;
        }
        n += batch.len();
    }
    assert_eq!(n as u64, 100 - first + 1);
    assert!(pinned.revoked().is_none());
    drop(pinned);
    until("cap applied after the replay", || {
        j.stats().retained_bytes <= 2 * SEGMENT
    });
    assert!(j.stats().retained.expect("range").from_seq > first);
    let refused = j.replay_reader(first, first + 1).expect_err("deleted");
    assert!(
        refused.message.contains("not all retained"),
        "{}",
        refused.message
    );
}

#[test]
fn the_time_window_deletes_old_segments_also_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    {
        let j = SegmentedJournal::open(config(dir.path(), Duration::from_secs(3600), 1 << 20)).expect("open");
        append(&rt, &j, 1..=200);
        j.release(200);
        until("retained", || j.stats().retained_segments > 2);
        j.close();
    }
    // Restart with the same window: still retained, and nothing is read again by the
    // producer's reader (it starts after the release watermark).
    {
        let j =
            SegmentedJournal::open(config(dir.path(), Duration::from_secs(3600), 1 << 20)).expect("reopen");
        let st = j.stats();
        assert_eq!(st.released_seq, 200);
        assert_eq!(st.records, 0);
        assert_eq!(st.retained.expect("range").from_seq, 1);
        let mut live = j.reader(st.released_seq + 1);
        assert!(live.next_batch(100).expect("read").is_empty());
        assert_eq!(read_range(&j, 1, 200).len(), 200);
        j.close();
    }
    // Restart with a 1 s window: the segments were written more than 1 s ago once this
    // sleep is over; they go, and the live head stays.
    std::thread::sleep(Duration::from_millis(1100));
    let j = SegmentedJournal::open(config(dir.path(), Duration::from_secs(1), 1 << 20)).expect("reopen");
    // The set empties before the files are unlinked; wait for both.
    until("window applied", || {
        j.stats().retained_segments == 0 && seg_files(dir.path()) == 1
    });
    // New records are kept until they are a second old.
    append(&rt, &j, 201..=400);
    j.release(400);
    until("retained", || j.stats().retained_segments > 0);
    until("expired", || j.stats().retained_segments == 0);
    // Retention turned off on a restart deletes what was kept.
    append(&rt, &j, 401..=600);
    j.release(600);
    until("retained", || j.stats().retained_segments > 0);
    j.close();
    drop(j);
    let j = SegmentedJournal::open(config(dir.path(), Duration::ZERO, 1 << 20)).expect("reopen");
    append(&rt, &j, 601..=601);
    j.release(601);
    until("deleted with the next release", || seg_files(dir.path()) == 1);
    assert_eq!(j.stats().retained_segments, 0);
}

#[test]
fn segments_dropped_undelivered_are_not_retained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let j = SegmentedJournal::open(config(dir.path(), Duration::from_secs(3600), 1 << 20)).expect("open");
    // Fill max_bytes with nothing released, then drop_oldest makes room.
    let mut n = 0;
    rt.block_on(async {
        while j.stats().dropped == 0 {
            n += 1;
            j.append_with(&entry(n), FullPolicy::DropOldest)
                .await
                .expect("append");
        }
    });
    rt.block_on(j.flush()).expect("flush");
    std::thread::sleep(Duration::from_millis(500));
    let st = j.stats();
    assert_eq!(st.retained_segments, 0, "{st:?}");
    assert!(st.retained.is_none_or(|r| r.from_seq > st.dropped), "{st:?}");
}

/// A full volume: the writer stalls on ENOSPC, deletes every retained segment (even one a
/// replay pins, which is told so) and live ingest goes on.
#[test]
fn a_full_volume_gives_retained_segments_up_for_live_ingest() {
    if !tmpfs::is_root() {
        eprintln!(
            "SKIPPED a_full_volume_gives_retained_segments_up_for_live_ingest: needs root to mount a tmpfs"
        );
        return;
    }
    let mount = tmpfs::TmpfsMount::new("1m").expect("mount a 1 MiB tmpfs");
    let dir = mount.path.join("journal");
    let mut cfg = JournalConfig::new(&dir, 512 << 10);
    cfg.segment_bytes = 64 << 10;
    cfg.max_buffer_bytes = 16 << 10;
    cfg.replay_retention = ReplayRetention {
        max_age: Duration::from_secs(3600),
        max_bytes: 1 << 30,
    };
    let big = |n: u64| Entry {
        payload: Bytes::from(vec![(n % 251) as u8; 1000]),
        ..entry(n)
    };
    let j = SegmentedJournal::open(cfg).expect("open");
    let rt = rt();
    for n in 1..=300 {
        rt.block_on(j.append(&big(n))).expect("append");
    }
    rt.block_on(j.flush()).expect("flush");
    j.release(300);
    until("retained", || j.stats().retained_segments >= 3);
    let range = j.stats().retained.expect("range");
    let pinned = j.replay_reader(range.from_seq, 300).expect("retained");
    // Fill what is left of the volume.
    let filler = mount.path.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0xa5u8; 4096];
        while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {}
    }
    let done = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            for n in 301..=450 {
                j.append(&big(n)).await.expect("append");
            }
            j.flush().await
        })
        .await
    });
    assert!(
        matches!(done, Ok(Ok(()))),
        "live ingest stayed blocked: {:?}",
        j.stats()
    );
    let st = j.stats();
    assert_eq!((st.retained_segments, st.retained_bytes), (0, 0), "{st:?}");
    assert_eq!(
        pinned.revoked(),
        Some(bridge::journal::Revoked::VolumeFull),
        "the replay is told its segments went"
    );
    drop(pinned);
    j.close();
    drop(j);
    drop(mount);
}

/// Retention turned off across a restart: the formerly retained segments come back as
/// live ones at an already checkpointed watermark, and are deleted for new appends
/// instead of holding the journal full for ever.
#[test]
fn turning_retention_off_frees_the_formerly_retained_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    {
        let j = SegmentedJournal::open(config(dir.path(), Duration::from_secs(3600), 1 << 20)).expect("open");
        // In steps within max_bytes: unreleased records would hold the journal full.
        for step in 0..3u64 {
            append(&rt, &j, step * 100 + 1..=step * 100 + 100);
            j.release(step * 100 + 100);
        }
        until("segments retained", || j.stats().retained_segments >= 6);
    }
    let j = SegmentedJournal::open(config(dir.path(), Duration::ZERO, 0)).expect("reopen without retention");
    let appended = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            for n in 301..=500 {
                j.append(&entry(n)).await.expect("append");
            }
        })
        .await
    });
    assert!(appended.is_ok(), "appends waited for segments nothing deletes");
    until("old segments deleted", || seg_files(dir.path()) <= 8);
    // Only released records went: the new ones are all there for the producer.
    rt.block_on(j.flush()).expect("flush");
    let mut live = j.reader(301);
    let mut seqs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seqs.len() < 200 {
        assert!(
            Instant::now() < deadline,
            "records after {:?} missing",
            seqs.last()
        );
        let batch = live.next_batch(64).expect("read");
        seqs.extend(batch.into_iter().map(|r| r.seq));
    }
    assert_eq!(seqs, (301..=500).collect::<Vec<_>>());
}

/// A replay that cannot finish (Kafka unreachable) pins at most twice the cap: past that
/// the oldest retained segments go and the replay is told why, instead of the retained
/// set growing until the volume is full.
#[test]
fn a_stuck_replay_pins_at_most_twice_the_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let j = SegmentedJournal::open(config(dir.path(), Duration::from_secs(3600), 2 * SEGMENT)).expect("open");
    append(&rt, &j, 1..=60);
    j.release(60);
    until("retained", || j.stats().retained.is_some());
    let first = j.stats().retained.expect("range").from_seq;
    let pinned = j.replay_reader(first, 60).expect("retained");
    for from in (61..=1000).step_by(20) {
        append(&rt, &j, from..=from + 19);
        j.release(from + 19);
    }
    until("ceiling applied", || j.stats().retained_bytes <= 4 * SEGMENT);
    assert!(j.stats().retained.expect("range").from_seq > first);
    assert_eq!(pinned.revoked(), Some(bridge::journal::Revoked::PinCeiling));
}

/// `drop_oldest` deleting released records a replay reads tells the replay, which would
/// otherwise skip them as a gap and report a short range as done.
#[test]
fn drop_oldest_deleting_pinned_records_revokes_the_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let j = SegmentedJournal::open(config(dir.path(), Duration::from_secs(3600), 1 << 20)).expect("open");
    append(&rt, &j, 1..=20);
    j.release(20);
    // Released records still in the live head segment: replayable and pinned.
    let pinned = j.replay_reader(1, 20).expect("retained");
    let mut n = 20;
    rt.block_on(async {
        while j.stats().dropped == 0 {
            n += 1;
            j.append_with(&entry(n), FullPolicy::DropOldest)
                .await
                .expect("append");
        }
    });
    rt.block_on(j.flush()).expect("flush");
    until("the segment deleted", || pinned.revoked().is_some());
    assert_eq!(pinned.revoked(), Some(bridge::journal::Revoked::DroppedOldest));
}

/// `drop_oldest` evicting a live segment far after a replay's range leaves the replay
/// alone (its pin is bounded above: before, every eviction revoked every replay).
#[test]
fn drop_oldest_evicting_a_live_segment_does_not_revoke_a_replay_of_older_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let j = SegmentedJournal::open(config(dir.path(), Duration::from_secs(3600), 1 << 20)).expect("open");
    for n in 1..=100 {
        rt.block_on(j.append(&entry(n))).expect("append");
    }
    rt.block_on(j.flush()).expect("flush");
    j.release(100);
    until("retained", || j.stats().retained_segments >= 2);
    let range = j.stats().retained.expect("range");
    assert_eq!(range.from_seq, 1);
    // The replay reads 1..=20: the oldest retained segment, nowhere near the live ones.
    let mut pinned = j.replay_reader(1, 20).expect("retained");
    // Kafka is down for the live pipeline: nothing more is released; drop_oldest evicts
    // the oldest *live* segment (unreleased records 101..).
    let mut n = 100;
    rt.block_on(async {
        while j.stats().dropped == 0 {
            n += 1;
            j.append_with(&entry(n), FullPolicy::DropOldest)
                .await
                .expect("append");
        }
    });
    rt.block_on(j.flush()).expect("flush");
    std::thread::sleep(Duration::from_millis(500));
    let st = j.stats();
    assert!(st.dropped > 0 && st.released_seq > 100, "{st:?}");
    // The replay's records are all still there ...
    let mut got = Vec::new();
    loop {
        let b = pinned.next_batch(50).expect("read");
        if b.is_empty() {
            break;
        }
        got.extend(b.into_iter().map(|r| r.seq));
    }
    assert_eq!(
        got,
        (1..=20).collect::<Vec<_>>(),
        "the replay's records are intact"
    );
    // ... and the replay is not told otherwise.
    assert_eq!(
        pinned.revoked(),
        None,
        "revoked although none of 1..=20 was deleted"
    );
}
