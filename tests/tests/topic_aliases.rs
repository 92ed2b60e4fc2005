//! Topic aliases (MQTT 5 §3.3.2.3.4) against the gateway: re-mapping, the bounds, use before set, and the stored-bytes budget.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::raw::{publish5, subscribe, Outcome, Raw};
use integration::{Gateway, ANON};

/// Topic of a server PUBLISH, if `p` is one.
fn publish_topic(p: &[u8]) -> Option<String> {
    if p[0] >> 4 != 3 {
        return None;
    }
    // Skip the remaining length.
    let mut i = 1;
    while p[i] & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let len = usize::from(u16::from_be_bytes([p[i], p[i + 1]]));
    Some(String::from_utf8(p[i + 2..i + 2 + len].to_vec()).unwrap())
}

fn closed_with(raw: &mut Raw, code: u8, what: &str) {
    let (outcome, packets) = raw.until_closed(Duration::from_secs(5));
    assert_eq!(outcome, Outcome::Closed, "{what}");
    assert!(
        packets.iter().any(|p| p == &[0xE0, 0x01, code]),
        "{what}: DISCONNECT {code:#x}: {packets:?}"
    );
}

#[test]
fn topic_alias_rules_hold() {
    let gw = Gateway::start_env(ANON, &[("GATEWAY_MQTT__TOPIC_ALIAS_MAX", "4")]);
    // Remapping: alias 1 -> a, then alias 1 -> b; an empty topic through alias 1 is b.
    let (mut raw, code) = Raw::mqtt5(gw.mqtt(), "ac", 30);
    assert_eq!(code, 0);
    raw.send(&subscribe(5, 1, &["vehicles/ac/commands/#".to_string()]))
        .expect("send");
    assert_eq!(raw.read_packet().expect("SUBACK")[0], 0x90);
    raw.send(&publish5(b"vehicles/ac/commands/a", 1, Some(1)))
        .expect("send");
    raw.send(&publish5(b"", 2, Some(1))).expect("send");
    raw.send(&publish5(b"vehicles/ac/commands/b", 3, Some(1)))
        .expect("send");
    raw.send(&publish5(b"", 4, Some(1))).expect("send");
    // Alias 4 (the maximum) is valid.
    raw.send(&publish5(b"vehicles/ac/commands/c", 5, Some(4)))
        .expect("send");
    raw.send(&publish5(b"", 6, Some(4))).expect("send");
    let mut topics = Vec::new();
    let mut acks = 0;
    while acks < 6 || topics.len() < 6 {
        let p = raw.read_packet().expect("packet");
        if p[0] == 0x40 {
            acks += 1;
        } else if let Some(t) = publish_topic(&p) {
            topics.push(t);
        }
    }
    let t = |s: &str| format!("vehicles/ac/commands/{s}");
    assert_eq!(topics, vec![t("a"), t("a"), t("b"), t("b"), t("c"), t("c")]);
    drop(raw);

    // Alias 0: invalid (0x94).
    let (mut raw, _) = Raw::mqtt5(gw.mqtt(), "ac0", 30);
    raw.send(&publish5(b"vehicles/ac0/t", 1, Some(0))).expect("send");
    closed_with(&mut raw, 0x94, "alias 0");
    // Above the maximum: invalid (0x94).
    let (mut raw, _) = Raw::mqtt5(gw.mqtt(), "ac5", 30);
    raw.send(&publish5(b"vehicles/ac5/t", 1, Some(5))).expect("send");
    closed_with(&mut raw, 0x94, "alias above the maximum");
    // Used before it is set, on a fresh connection (no table yet): protocol error.
    let (mut raw, _) = Raw::mqtt5(gw.mqtt(), "acu", 30);
    raw.send(&publish5(b"", 1, Some(2))).expect("send");
    closed_with(&mut raw, 0x82, "alias never set (no table)");
    // Used before it is set, with a table allocated for a lower alias.
    let (mut raw, _) = Raw::mqtt5(gw.mqtt(), "acv", 30);
    raw.send(&publish5(b"vehicles/acv/t", 1, Some(1))).expect("send");
    assert_eq!(raw.read_packet().expect("PUBACK")[0], 0x40);
    raw.send(&publish5(b"", 2, Some(3))).expect("send");
    closed_with(&mut raw, 0x82, "alias never set (beyond the table)");
    // Aliases do not outlive their connection (§3.3.2.3.4).
    let (mut raw, _) = Raw::mqtt5(gw.mqtt(), "acv", 30);
    raw.send(&publish5(b"", 1, Some(1))).expect("send");
    closed_with(&mut raw, 0x82, "alias from an earlier connection");
}

#[test]
fn alias_topics_count_against_the_stored_bytes_once() {
    let gw = Gateway::start(ANON);
    let (mut raw, code) = Raw::mqtt5(gw.mqtt(), "acq", 30);
    assert_eq!(code, 0);
    let topic = |c: char, n: usize| format!("vehicles/acq/{}", c.to_string().repeat(n));
    // 40 kB under alias 1, then alias 1 re-mapped to another 40 kB: 40 kB stored, not 80.
    raw.send(&publish5(topic('a', 40_000).as_bytes(), 1, Some(1)))
        .expect("send");
    raw.send(&publish5(topic('b', 40_000).as_bytes(), 2, Some(1)))
        .expect("send");
    for _ in 0..2 {
        assert_eq!(raw.read_packet().expect("PUBACK")[0], 0x40);
    }
    // A 20 kB subscription filter still fits (60 kB) ...
    let filter = format!("vehicles/acq/commands/{}", "f".repeat(20_000));
    raw.send(&subscribe(5, 3, &[filter])).expect("send");
    let suback = raw.read_packet().expect("SUBACK");
    assert_eq!((suback[0], *suback.last().unwrap()), (0x90, 1), "{suback:?}");
    // ... a further 10 kB alias topic does not (70 kB > 64 KiB): 0x97.
    raw.send(&publish5(topic('c', 10_000).as_bytes(), 4, Some(2)))
        .expect("send");
    closed_with(&mut raw, 0x97, "alias beyond the stored-bytes bound");
}
