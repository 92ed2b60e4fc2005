//! Journal throughput and commit latency at fixed group sizes, against the physical
//! limit of the same disk: plain `write` + `fdatasync` of the same bytes.
//!
//! `cargo run --release -p bridge --example journal_bench -- <dir> [seconds-per-case]`
//! prints one JSON line per case: `{"kind":"journal"|"raw","group":G,"records_per_sec":..,
//! "p50_commit_us":..,"p99_commit_us":..}`.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use bridge::{Entry, Journal, JournalConfig, SegmentedJournal};

fn entry(n: u64) -> Entry {
    Entry {
        kind: Default::default(),
        received_at_ms: 1_700_000_000_000 + n,
        qos: 1,
        client_id: format!("veh-{}", n % 1000),
        topic: format!("vehicles/veh-{}/telemetry", n % 1000),
        payload: bytes::Bytes::from(vec![b'x'; 200]),
        ..Entry::default()
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q) as usize)
        .copied()
        .unwrap_or(0)
}

fn report(kind: &str, group: usize, records: u64, elapsed: Duration, mut commits: Vec<u64>) {
    commits.sort_unstable();
    println!(
        "{{\"kind\":\"{kind}\",\"group\":{group},\"records_per_sec\":{:.0},\"p50_commit_us\":{},\"p99_commit_us\":{}}}",
        records as f64 / elapsed.as_secs_f64(),
        percentile(&commits, 0.5),
        percentile(&commits, 0.99)
    );
    let _ = std::io::stdout().flush();
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let base = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("./bench-journal"));
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    for group in [1usize, 16, 256, 4096] {
        // The journal: `group` appends, then wait until all are durable (one commit).
        let dir = base.join(format!("journal-{group}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = JournalConfig::new(&dir, 8 << 30);
        cfg.segment_bytes = 256 << 20;
        let j = SegmentedJournal::open(cfg)?;
        let (mut n, mut commits) = (0u64, Vec::new());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            let t = Instant::now();
            rt.block_on(async {
                for _ in 0..group {
                    let _ = j.append(&entry(n)).await;
                    n += 1;
                }
                j.flush().await
            })?;
            commits.push(t.elapsed().as_micros() as u64);
            j.release(n);
        }
        report("journal", group, n, start.elapsed(), commits);
        j.close();
        drop(j);
        let _ = std::fs::remove_dir_all(&dir);

        // The physical limit: the same bytes appended to a pre-allocated file + fdatasync.
        let path = base.join(format!("raw-{group}"));
        std::fs::create_dir_all(&base)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        f.set_len(4 << 30)?;
        let mut frame = Vec::new();
        bridge::journal::encode(&mut frame, 1, &entry(1))?;
        let batch: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * group).collect();
        let (mut off, mut n, mut commits) = (0u64, 0u64, Vec::new());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) && off + (batch.len() as u64) < (4 << 30) {
            let t = Instant::now();
            f.write_all_at(&batch, off)?;
            f.sync_data()?;
            off += batch.len() as u64;
            n += group as u64;
            commits.push(t.elapsed().as_micros() as u64);
        }
        report("raw", group, n, start.elapsed(), commits);
        drop(f);
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}
