//! An operator's path through journal damage: the gateway refuses to start on a
//! journal damaged in the middle (never cutting acknowledged records as a "torn tail"),
//! `gateway journal verify` shows the damage, `gateway journal repair` quarantines it
//! and keeps every intact record, and the gateway starts again.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::{gateway_bin, read_journal, Gateway, Stream, ANON};

/// Offsets of the frames in a segment (length u32le + crc u32le + body; 0 = end).
fn frame_offsets(data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 8 <= data.len() {
        let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        if len == 0 {
            break;
        }
        out.push(pos);
        pos += 8 + len;
    }
    out
}

fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(gateway_bin())
        .args(args)
        .output()
        .expect("run gateway");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn only_segment(journal: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(journal)
        .expect("journal dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs.remove(0)
}

#[test]
fn mid_journal_damage_refuses_start_and_verify_repair_keep_every_intact_record() {
    // An unreachable Kafka: nothing is released, every record stays in the journal.
    let mut gw = Gateway::start(&format!("{ANON}[kafka]\nbootstrap = \"127.0.0.1:9\"\n"));
    let s = Stream::start(gw.mqtt(), "vin-damage", 20, Duration::ZERO);
    assert!(s.wait_acked(20, Duration::from_secs(20)), "acked {}", s.acked());
    s.finish();
    assert!(gw.terminate(Duration::from_secs(15)));
    let journal = gw.dir.path().join("journal");
    let config = gw.config_path.clone();
    let config = config.to_str().expect("utf-8 path");

    // Flip a byte inside the 10th record's body: 11..=20 follow it intact.
    let seg = only_segment(&journal);
    let mut data = std::fs::read(&seg).expect("segment");
    let offsets = frame_offsets(&data);
    assert_eq!(offsets.len(), 20);
    data[offsets[9] + 20] ^= 0xFF;
    std::fs::write(&seg, &data).expect("write segment");

    // The gateway refuses to start and says what to do.
    let (code, text) = cli(&["run", "--config", config]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("journal corrupt"), "{text}");
    assert!(text.contains("gateway journal verify"), "{text}");
    assert!(
        text.contains(&seg.file_name().expect("name").to_string_lossy().to_string()),
        "{text}"
    );

    // verify: exit 1, names the damage; nothing is changed.
    let (code, text) = cli(&["journal", "verify", "--config", config]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(
        std::fs::read(&seg).expect("segment"),
        data,
        "verify must not write"
    );

    // repair: quarantine the damaged record, keep the 19 others.
    let (code, text) = cli(&["journal", "repair", "--config", config]);
    assert_eq!(code, 0, "{text}");
    let quarantined = std::fs::read_dir(journal.join("quarantine"))
        .expect("quarantine dir")
        .count();
    assert_eq!(quarantined, 1, "{text}");
    let (code, text) = cli(&["journal", "verify", "--dir", journal.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{text}");

    let records = read_journal(&journal);
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    let expected: Vec<u64> = (1..=20).filter(|s| *s != 10).collect();
    assert_eq!(seqs, expected, "every intact record kept, in order");

    // And the gateway starts again; new records get new sequences (never re-used).
    let (dir, config_path) = gw.kill9();
    let gw = Gateway::start_in(dir, config_path);
    let s = Stream::start(gw.mqtt(), "vin-damage", 1, Duration::ZERO);
    assert!(s.wait_acked(1, Duration::from_secs(20)));
    s.finish();
    let (dir, _) = gw.kill9();
    let records = read_journal(&dir.path().join("journal"));
    let last = records.last().expect("records");
    assert!(last.seq > 20, "sequence re-used: {}", last.seq);
}
