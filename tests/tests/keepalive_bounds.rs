//! Regression for a hostile-review finding (fixed): while the journal is stalled (disk full) a
//! 3.1.1 session at `mqtt.max_inflight` stops reading its socket (back-pressure), but its
//! keep-alive timer keeps running on packets it no longer reads. A healthy vehicle that
//! keeps sending PINGREQ is closed for "keepalive_timeout" and its Will is published: a
//! false "vehicle offline" for every such vehicle during any stall longer than 1.5 × its
//! keep alive, then a reconnect storm. Needs root (tmpfs).

use std::process::Command;
use std::time::{Duration, Instant};

use integration::raw::{Connect, Outcome, Raw};
use integration::tmpfs::Tmpfs;
use integration::Gateway;

#[test]
fn back_pressured_session_is_not_closed_for_keep_alive() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root {
        eprintln!("SKIPPED: needs root to mount a tmpfs");
        return;
    }
    let mount = Tmpfs::mount("256k");
    let dir = mount.path().join("journal");
    let mut gw = Gateway::start_env(
        "[kafka]\nbootstrap = \"127.0.0.1:9\"\n[auth]\nallow_anonymous = true\n",
        &[
            ("GATEWAY_JOURNAL__DIR", dir.to_str().expect("utf8")),
            ("GATEWAY_JOURNAL__MAX_BYTES", "67108864"),
            ("GATEWAY_JOURNAL__SEGMENT_BYTES", "65536"),
            ("GATEWAY_MQTT__MAX_PACKET_SIZE", "4096"),
            ("GATEWAY_MQTT__MAX_INFLIGHT", "5"),
        ],
    );
    let c = Connect::new(4, "ka-car")
        .keep_alive(2)
        .will("vehicles/ka-car/status", b"offline");
    let (mut raw, connack) = Raw::connect_with(gw.mqtt(), &c);
    assert_eq!(connack.get(3), Some(&0), "connected: {connack:?}");
    let mut reader = raw.split();
    reader
        .stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // Publish until the disk is full and PUBACKs stop (the journal stalls).
    let payload = vec![b'x'; 1000];
    let mut pkid = 1u16;
    loop {
        raw.publish311("vehicles/ka-car/t", pkid, &payload).expect("send");
        match reader.read_packet() {
            Some(p) if p[0] == 0x40 => pkid += 1,
            _ => break,
        }
        assert!(pkid < 2000, "the tmpfs never filled");
    }
    assert!(gw.wait_log("stalled", Duration::from_secs(5)), "journal stalled");
    // Reach max_inflight, then behave: a PINGREQ every second.
    for _ in 0..5 {
        pkid += 1;
        raw.publish311("vehicles/ka-car/t", pkid, &payload).expect("send");
    }
    let until = Instant::now() + Duration::from_secs(8);
    let mut closed = false;
    while Instant::now() < until {
        if raw.send(&[0xC0, 0x00]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let (outcome, _) = reader.until_closed(Duration::from_millis(200));
    closed |= outcome == Outcome::Closed;
    let ka = gw.metric("gateway_connections_closed_total{reason=\"keepalive_timeout\"}");
    gw.terminate(Duration::from_secs(10));
    drop(mount);
    assert!(
        !closed && ka == 0,
        "a vehicle sending PINGREQ every second was closed for keep-alive ({ka}) while the gateway \
         itself withheld reading; its Will was published"
    );
}
