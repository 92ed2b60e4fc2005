//! A crash at an arbitrary instant loses no PUBACK'd message: publish a QoS1 stream,
//! SIGKILL the gateway mid-stream, restart it on the same journal, and find every
//! acknowledged message there.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::raw::Raw;
use integration::{Gateway, ANON};

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_message() {
    let gw = Gateway::start(ANON);
    let (raw, code) = Raw::mqtt311(gw.mqtt(), "crash-car", 0);
    assert_eq!(code, 0);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut reader = raw.split();
    reader.stream.set_read_timeout(None).expect("blocking reads");
    let sink = acked.clone();
    let acks = std::thread::spawn(move || {
        // PUBACK = 0x40 0x02 pkid; pkid n was the n-th message.
        while let Some(p) = reader.read_packet() {
            if p[0] == 0x40 {
                sink.lock()
                    .expect("lock")
                    .insert(u16::from_be_bytes([p[2], p[3]]));
            }
        }
    });
    let mut writer = raw;
    let publisher = std::thread::spawn(move || {
        for n in 1..=60_000u16 {
            if writer
                .publish311("vehicles/crash-car/telemetry", n, n.to_string().as_bytes())
                .is_err()
            {
                return n;
            }
        }
        60_001
    });
    // Kill once a good part of the stream is acknowledged and more is in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().expect("lock").len() < 3_000 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (dir, config) = gw.kill9();
    let _ = publisher.join();
    let _ = acks.join();
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() >= 3_000,
        "only {} PUBACKs before the kill",
        acked.len()
    );

    // Restart on the same journal: recovery must succeed, then read it back.
    let mut gw = Gateway::start_in(dir, config);
    assert!(gw.terminate(Duration::from_secs(10)));
    let records = Gateway::journal_records(gw.dir.path());
    // Every record is the crash-car's; its payload is the message number.
    let order: Vec<u16> = records
        .iter()
        .inspect(|r| assert_eq!(r.entry.client_id, "crash-car"))
        .map(|r| {
            std::str::from_utf8(&r.entry.payload)
                .expect("utf8")
                .parse()
                .expect("number")
        })
        .collect();
    let journaled: BTreeSet<u16> = order.iter().copied().collect();
    let lost: Vec<_> = acked.difference(&journaled).take(10).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but not journaled: {lost:?} (of {} acked)",
        acked.len()
    );
    // Journal order is the vehicle's order.
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "journal order differs from publish order"
    );
}
