//! Hostile-review finding (helper "review"): per-connection state is bounded in *count*
//! (`mqtt.max_subscriptions`, `mqtt.topic_alias_max`) but not in *bytes*: each stored
//! filter or alias topic may be 64 KiB (an MQTT string), all within the default ACL
//! (`vehicles/{client_id}/commands/#` covers any suffix). With the defaults
//! (100 subscriptions, 10,000 connections) that is ~6.5 MB per connection and ~65 GB
//! for a full gateway: one credential with a prefix pattern (or anonymous) takes the
//! 24 GiB machine down (invariant 4: bounded everything; invariant 7).

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
#[ignore = "bug: subscription filters (and alias topics) are bounded in count, not bytes: ~6.5 MB per connection"]
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
        for p in 0..25u16 {
            let filters: Vec<String> = (0..4)
                .map(|i| format!("{prefix}{p}-{i}-{}", "a".repeat(60_000)))
                .collect();
            raw.send(&subscribe(p + 1, &filters)).expect("send");
            let ack = raw.read_packet().expect("SUBACK");
            assert_eq!(ack[0], 0x90);
            assert!(
                ack[ack.len() - 4..].iter().all(|g| *g == 1),
                "granted: {:?}",
                &ack[ack.len() - 4..]
            );
        }
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
