//! Per-connection state is bounded in bytes, not only in count (found by a hostile
//! review): each stored filter or alias topic may be 64 KiB (an MQTT string) within the
//! default ACL, so 100 subscriptions × 10,000 connections could hold ~65 GB. The
//! gateway keeps at most 64 KiB of topic strings per connection (invariants 4 and 7).

use std::time::Duration;

use integration::raw::{put_len, Raw};
use integration::Gateway;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn subscribe(pkid: u16, filters: &[String]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for f in filters {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
        body.push(1);
    }
    let mut frame = vec![0x82];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

#[test]
fn stored_subscriptions_are_bounded_in_bytes() {
    let gw = Gateway::start("[kafka]\nbootstrap = \"127.0.0.1:9\"\n[auth]\nallow_anonymous = true\n");
    std::thread::sleep(Duration::from_millis(500));
    const CONNS: usize = 10;
    let before = rss_kib(gw.pid());
    let mut keep = Vec::new();
    for c in 0..CONNS {
        let id = format!("mem-{c}");
        let (mut raw, code) = Raw::mqtt311(gw.mqtt(), &id, 60);
        assert_eq!(code, 0);
        let prefix = format!("vehicles/{id}/commands/");
        let mut granted = 0;
        for p in 0..25u16 {
            let filters: Vec<String> = (0..4)
                .map(|i| format!("{prefix}{p}-{i}-{}", "a".repeat(60_000)))
                .collect();
            raw.send(&subscribe(p + 1, &filters)).expect("send");
            let ack = raw.read_packet().expect("SUBACK");
            assert_eq!(ack[0], 0x90);
            granted += ack[ack.len() - 4..].iter().filter(|g| **g == 1).count();
            assert!(
                ack[ack.len() - 4..].iter().all(|g| *g == 1 || *g == 0x80),
                "{ack:?}"
            );
        }
        // 64 KiB of stored topic strings per connection: one 60 KB filter fits.
        assert_eq!(granted, 1, "filters granted past the byte budget");
        keep.push(raw);
    }
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_kib(gw.pid()).saturating_sub(before);
    let per_conn = grown / CONNS as u64;
    assert!(
        per_conn < 1024,
        "each connection keeps {per_conn} KiB of subscription state (grew {grown} KiB for {CONNS}); \
         at mqtt.max_connections = 10000 that is {} GiB",
        per_conn * 10_000 / 1024 / 1024
    );
}
