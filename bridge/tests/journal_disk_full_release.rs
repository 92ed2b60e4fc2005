//! Regression for a hostile-review finding (fixed): while the writer is stalled on ENOSPC it never
//! runs its housekeeping, so segments Kafka already confirmed (released) are not deleted
//! and the space they hold never comes back: a journal that filled its own volume stays
//! stalled forever although everything on it is delivered. Needs root (tmpfs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge::{Entry, Journal, JournalConfig, SegmentedJournal};
use bytes::Bytes;

mod tmpfs;
use tmpfs::TmpfsMount;

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

#[test]
fn stalled_writer_frees_space_by_deleting_released_segments() {
    let is_root = tmpfs::is_root();
    if !is_root {
        eprintln!("SKIPPED: needs root to mount a tmpfs");
        return;
    }
    // The volume (1 MiB) is smaller than journal.max_bytes (4 MiB): the journal itself
    // fills it (or anything else on the volume does: parked store, quarantine, logs).
    let mount = TmpfsMount::new("1m").expect("mount a 1 MiB tmpfs");
    let dir = mount.path.join("journal");
    let mut cfg = JournalConfig::new(&dir, 4 << 20);
    cfg.segment_bytes = 64 << 10;
    let j = Arc::new(SegmentedJournal::open(cfg).expect("opens"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    const TOTAL: u64 = 2000;
    for n in 1..=TOTAL {
        rt.block_on(j.append(&entry(n))).expect("append");
    }
    // Kafka confirms everything that becomes durable, continuously (the bridge).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut saw_stall = false;
    while Instant::now() < deadline {
        let s = j.stats();
        saw_stall |= s.stalled.is_some();
        j.release(s.durable_seq);
        if s.durable_seq == TOTAL {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = j.stats();
    assert!(saw_stall, "the test expects the volume to fill");
    assert_eq!(
        s.durable_seq, TOTAL,
        "stalled for good although every durable record was released: released {} durable {} segments {} disk {} stalled {:?}",
        s.released_seq, s.durable_seq, s.segments, s.disk_bytes, s.stalled
    );
    drop(j);
    drop(mount);
}
