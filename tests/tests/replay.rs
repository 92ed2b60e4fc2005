//! `POST /api/v1/replay` against a real Apache Kafka broker: released segments are kept
//! for `journal.replay_retention_secs`; a replay by sequence or by receive time re-sends
//! exactly the requested records (payloads, keys and order, with `gateway.replay`), its
//! progress reaches `done`, a range outside the retained window is refused, a restart
//! re-sends nothing by itself and keeps the window; retention 0 keeps nothing.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration::kafka::{Consumed, Kafka};
use integration::{http_send, kafka_config, Gateway, Stream, ANON};
use serde_json::Value;

fn api(gw: &Gateway, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (code, text) = http_send(gw.admin.expect("admin"), method, path, None, body);
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Publishes `count` QoS 1 messages as `id` (payloads "0", "1", ...), all acknowledged.
fn publish(gw: &Gateway, id: &str, count: usize) {
    let s = Stream::start(gw.mqtt(), id, count, Duration::ZERO);
    assert!(
        s.wait_acked(count, Duration::from_secs(30)),
        "{id}: only {} PUBACKs",
        s.acked()
    );
    s.finish();
}

/// Waits until the bridge released everything durable (`durable_seq` = `released_seq` = n).
fn wait_released(gw: &Gateway, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, j) = api(gw, "GET", "/api/v1/journal", "");
        if j["released_seq"] == n && j["durable_seq"] == n {
            return j;
        }
        assert!(Instant::now() < deadline, "not released: {j}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls a replay until it is no longer running.
fn wait_finished(gw: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, p) = api(gw, "GET", &format!("/api/v1/replay/{id}"), "");
        assert_eq!(code, 200, "{p}");
        if p["state"] != "running" {
            return p;
        }
        assert!(Instant::now() < deadline, "replay still running: {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn seq(r: &Consumed) -> u64 {
    r.header("gateway.seq").unwrap().parse().unwrap()
}

/// The records of `topic` split into originals and copies of replay `id` (the topic has
/// one partition: consumption order is production order).
fn split(kafka: &Kafka, topic: &str, id: &str) -> (Vec<Consumed>, Vec<Consumed>) {
    let all = kafka.consume_all(topic, 1, Duration::from_secs(60));
    let originals = all
        .iter()
        .filter(|r| r.header("gateway.replay").is_none())
        .cloned()
        .collect();
    let replayed = all
        .iter()
        .filter(|r| r.header("gateway.replay") == Some(id))
        .cloned()
        .collect();
    (originals, replayed)
}

/// The same record: key, payload and every header but the replay marker.
fn assert_copy(original: &Consumed, copy: &Consumed) {
    assert_eq!((&copy.key, &copy.payload), (&original.key, &original.payload));
    let headers = |r: &Consumed| {
        let mut h: Vec<_> = r
            .headers
            .iter()
            .filter(|(k, _)| k != "gateway.replay")
            .cloned()
            .collect();
        h.sort();
        h
    };
    assert_eq!(headers(copy), headers(original));
}

#[test]
fn replay_resends_exactly_the_requested_range_to_real_kafka() {
    let kafka = Kafka::start();
    kafka.create_topic("telemetry", 1);
    let mut gw = Gateway::start_env(
        &kafka_config(&kafka.bootstrap(), "telemetry"),
        &[("GATEWAY_JOURNAL__REPLAY_RETENTION_SECS", "3600")],
    );
    // Three vehicles one after the other; the second one's messages bound a time range.
    publish(&gw, "VIN-A", 100);
    std::thread::sleep(Duration::from_millis(50));
    let t1 = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    publish(&gw, "VIN-B", 50);
    std::thread::sleep(Duration::from_millis(50));
    let t2 = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    publish(&gw, "VIN-C", 50);
    let journal = wait_released(&gw, 200);
    assert_eq!(
        (&journal["retained_from_seq"], &journal["retained_to_seq"]),
        (&Value::from(1), &Value::from(200)),
        "{journal}"
    );
    let originals = kafka.consume("telemetry", 1, 200, Duration::from_secs(60));
    assert_eq!(originals.len(), 200);
    let by_seq = |s: u64| originals.iter().find(|r| seq(r) == s).unwrap().clone();

    // By sequence: 20..=60, both inclusive.
    let (code, q) = api(&gw, "POST", "/api/v1/replay", r#"{"from_seq": 20, "to_seq": 60}"#);
    assert_eq!(code, 202, "{q}");
    let bytes: usize = (20..=60).map(|s| by_seq(s).payload.len()).sum();
    assert_eq!(
        (&q["records"], &q["bytes"], &q["from_seq"], &q["to_seq"]),
        (
            &Value::from(41),
            &Value::from(bytes),
            &Value::from(20),
            &Value::from(60)
        ),
        "{q}"
    );
    let id = q["replay_id"].as_str().unwrap().to_string();
    let done = wait_finished(&gw, &id);
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(
        (&done["sent"], &done["delivered"], &done["failed"]),
        (&Value::from(41), &Value::from(41), &Value::from(0)),
        "{done}"
    );
    assert_eq!(done["current_seq"], 60, "{done}");
    let (again, replayed) = split(&kafka, "telemetry", &id);
    assert_eq!(again.len(), 200, "the live pipeline sent nothing twice");
    assert_eq!(
        replayed.iter().map(seq).collect::<Vec<_>>(),
        (20..=60).collect::<Vec<_>>(),
        "exactly the range, in journal order"
    );
    for r in &replayed {
        assert_copy(&by_seq(seq(r)), r);
    }

    // By receive time: [t1, t2) is exactly VIN-B's 50 messages.
    let (code, q) = api(
        &gw,
        "POST",
        "/api/v1/replay",
        &format!(r#"{{"from_ms": {t1}, "to_ms": {t2}, "topic": "telemetry"}}"#),
    );
    assert_eq!(code, 202, "{q}");
    assert_eq!(q["records"], 50, "{q}");
    let id = q["replay_id"].as_str().unwrap().to_string();
    assert_eq!(wait_finished(&gw, &id)["state"], "done");
    let (_, replayed) = split(&kafka, "telemetry", &id);
    let b: Vec<&Consumed> = originals.iter().filter(|r| r.key == "VIN-B").collect();
    assert_eq!(replayed.len(), 50);
    for (original, copy) in b.iter().zip(&replayed) {
        assert_copy(original, copy);
    }
    assert_eq!(
        replayed.iter().map(|r| r.payload.as_str()).collect::<Vec<_>>(),
        (0..50).map(|n| n.to_string()).collect::<Vec<_>>(),
        "VIN-B in its order"
    );

    // Refused: not released yet / not a destination / malformed.
    let (code, e) = api(
        &gw,
        "POST",
        "/api/v1/replay",
        r#"{"from_seq": 150, "to_seq": 250}"#,
    );
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (422, Some("replay_range_not_retained")),
        "{e}"
    );
    assert!(e["error"]["message"].as_str().unwrap().contains("1..=200"), "{e}");
    let (code, e) = api(
        &gw,
        "POST",
        "/api/v1/replay",
        r#"{"from_seq": 1, "to_seq": 2, "topic": "nope"}"#,
    );
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{e}"
    );

    // Progress while it runs: Kafka frozen, the replay cannot finish; a second one is
    // refused meanwhile.
    kafka.freeze();
    let (code, q) = api(&gw, "POST", "/api/v1/replay", r#"{"from_seq": 1, "to_seq": 200}"#);
    assert_eq!(
        (code, &q["records"], &q["state"]),
        (202, &Value::from(200), &Value::from("running")),
        "{q}"
    );
    let id = q["replay_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(500));
    let (_, p) = api(&gw, "GET", &format!("/api/v1/replay/{id}"), "");
    assert_eq!(p["state"], "running", "{p}");
    assert_eq!(p["delivered"], 0, "{p}");
    let (code, e) = api(&gw, "POST", "/api/v1/replay", r#"{"from_seq": 1, "to_seq": 2}"#);
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (409, Some("replay_running")),
        "{e}"
    );
    let (_, list) = api(&gw, "GET", "/api/v1/replay", "");
    assert_eq!(list["replays"][0]["replay_id"], id.as_str(), "{list}");
    assert_eq!(list["replays"].as_array().unwrap().len(), 3, "{list}");
    kafka.thaw();
    let done = wait_finished(&gw, &id);
    assert_eq!(
        (&done["state"], &done["delivered"]),
        (&Value::from("done"), &Value::from(200)),
        "{done}"
    );
    let (_, replayed) = split(&kafka, "telemetry", &id);
    assert_eq!(
        replayed.iter().map(seq).collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>()
    );

    // A restart re-sends nothing by itself and keeps what is retained.
    let before = kafka.record_count("telemetry", 1);
    assert!(gw.terminate(Duration::from_secs(20)), "clean shutdown");
    let dir = std::mem::replace(&mut gw.dir, tempfile::tempdir().unwrap());
    let config = std::fs::read_to_string(&gw.config_path)
        .unwrap()
        .replace("[journal]\n", "[journal]\nreplay_retention_secs = 3600\n");
    std::fs::write(&gw.config_path, config).unwrap();
    let gw = Gateway::start_in(dir, gw.config_path.clone());
    let journal = wait_released(&gw, 200);
    assert_eq!(journal["retained_from_seq"], 1, "{journal}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        kafka.record_count("telemetry", 1),
        before,
        "a restart re-sent records"
    );
    let (code, q) = api(
        &gw,
        "POST",
        "/api/v1/replay",
        r#"{"from_seq": 101, "to_seq": 103}"#,
    );
    assert_eq!(code, 202, "{q}");
    let id = q["replay_id"].as_str().unwrap().to_string();
    assert_eq!(wait_finished(&gw, &id)["state"], "done");
    let (_, replayed) = split(&kafka, "telemetry", &id);
    assert_eq!(replayed.iter().map(seq).collect::<Vec<_>>(), vec![101, 102, 103]);
    assert!(replayed.iter().all(|r| r.key == "VIN-B"));
}

#[test]
fn retention_zero_keeps_nothing_and_the_window_is_honoured() {
    // Retention off (the default): nothing is retained, every replay is refused.
    let gw = Gateway::start(&format!("{ANON}[kafka]\nbootstrap = \"embedded\"\n"));
    publish(&gw, "VIN-Z", 20);
    let journal = wait_released(&gw, 20);
    assert_eq!(
        (&journal["retained_from_seq"], &journal["retained_bytes"]),
        (&Value::Null, &Value::from(0)),
        "{journal}"
    );
    for body in [
        r#"{"from_seq": 1, "to_seq": 5}"#,
        r#"{"from_ms": 0, "to_ms": 99999999999999}"#,
    ] {
        let (code, e) = api(&gw, "POST", "/api/v1/replay", body);
        assert_eq!(
            (code, e["error"]["code"].as_str()),
            (422, Some("replay_range_not_retained")),
            "{e}"
        );
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("replay_retention_secs = 0"),
            "{e}"
        );
    }
    for body in [
        "",
        "{}",
        r#"{"from_seq": 5, "to_seq": 1}"#,
        r#"{"from_seq": 1}"#,
        r#"{"from_seq": 1, "to_seq": 2, "from_ms": 1, "to_ms": 2}"#,
        r#"{"from_ms": 5, "to_ms": 5}"#,
        r#"{"from": 1}"#,
    ] {
        let (code, e) = api(&gw, "POST", "/api/v1/replay", body);
        assert_eq!(
            (code, e["error"]["code"].as_str()),
            (400, Some("invalid_body")),
            "{body}: {e}"
        );
    }
    drop(gw);

    // A 15 s window over small segments: kept at first, gone once older than the window
    // (the live head segment stays), then a replay from the start is refused. (Wide
    // enough that a loaded machine publishing slowly still sees them kept first.)
    let gw = Gateway::start_env(
        &format!("{ANON}[kafka]\nbootstrap = \"embedded\"\n"),
        &[
            ("GATEWAY_JOURNAL__REPLAY_RETENTION_SECS", "15"),
            ("GATEWAY_JOURNAL__SEGMENT_BYTES", "16384"),
            ("GATEWAY_MQTT__MAX_PACKET_SIZE", "4096"),
        ],
    );
    publish(&gw, "VIN-W", 1000);
    wait_released(&gw, 1000);
    // Released segments move to the kept list at the writer's next maintenance.
    let deadline = Instant::now() + Duration::from_secs(10);
    let journal = loop {
        let (_, j) = api(&gw, "GET", "/api/v1/journal", "");
        if j["retained_segments"].as_u64().unwrap_or(0) >= 2 {
            break j;
        }
        assert!(Instant::now() < deadline, "released segments not kept: {j}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(journal["retained_from_seq"], 1, "{journal}");
    let deadline = Instant::now() + Duration::from_secs(45);
    let journal = loop {
        let (_, j) = api(&gw, "GET", "/api/v1/journal", "");
        if j["retained_segments"] == 0 {
            break j;
        }
        assert!(Instant::now() < deadline, "the window was not applied: {j}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let from = journal["retained_from_seq"].as_u64().unwrap();
    assert!(from > 1, "{journal}");
    let (code, e) = api(&gw, "POST", "/api/v1/replay", r#"{"from_seq": 1, "to_seq": 10}"#);
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (422, Some("replay_range_not_retained")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{from}..=1000")),
        "{e}"
    );
    let (code, e) = api(
        &gw,
        "POST",
        "/api/v1/replay",
        r#"{"from_ms": 0, "to_ms": 99999999999999}"#,
    );
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (422, Some("replay_range_not_retained")),
        "{e}"
    );
    // What the live head still holds is replayable (to the embedded cluster here).
    let (code, q) = api(
        &gw,
        "POST",
        "/api/v1/replay",
        &format!(r#"{{"from_seq": {from}, "to_seq": 1000}}"#),
    );
    assert_eq!(code, 202, "{q}");
    assert_eq!(q["records"], 1000 - from + 1, "{q}");
    let done = wait_finished(&gw, q["replay_id"].as_str().unwrap());
    assert_eq!(done["state"], "done", "{done}");
}

/// A replay stuck behind an unreachable Kafka is cancelled by `DELETE
/// /api/v1/replay/{id}`: it ends `cancelled` at once, nothing was confirmed, and the slot
/// is free for the next replay.
#[test]
fn a_stuck_replay_is_cancelled_by_an_operator() {
    let mut kafka = Kafka::start();
    kafka.create_topic("telemetry", 1);
    let gw = Gateway::start_env(
        &kafka_config(&kafka.bootstrap(), "telemetry"),
        &[("GATEWAY_JOURNAL__REPLAY_RETENTION_SECS", "3600")],
    );
    publish(&gw, "VIN-A", 50);
    wait_released(&gw, 50);
    kafka.kill();
    let (code, q) = api(&gw, "POST", "/api/v1/replay", r#"{"from_seq": 1, "to_seq": 50}"#);
    assert_eq!(code, 202, "{q}");
    let id = q["replay_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(1));
    let (_, p) = api(&gw, "GET", &format!("/api/v1/replay/{id}"), "");
    assert_eq!(p["state"], "running", "Kafka is down: {p}");

    let (code, p) = api(&gw, "DELETE", &format!("/api/v1/replay/{id}"), "");
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["state"], "cancelled", "{p}");
    assert_eq!(p["delivered"], 0, "{p}");
    assert_eq!(p["failed"], 0, "purged records are not refused by Kafka: {p}");
    assert!(p["error"].as_str().unwrap().contains("cancelled"), "{p}");
    // Cancelling again leaves it as it is; an unknown id is 404.
    let (code, again) = api(&gw, "DELETE", &format!("/api/v1/replay/{id}"), "");
    assert_eq!(
        (code, &again["state"]),
        (200, &Value::from("cancelled")),
        "{again}"
    );
    let (code, _) = api(&gw, "DELETE", "/api/v1/replay/replay-0-0", "");
    assert_eq!(code, 404);
    // The slot is free.
    let (code, next) = api(&gw, "POST", "/api/v1/replay", r#"{"from_seq": 1, "to_seq": 5}"#);
    assert_eq!(code, 202, "{next}");
    let next_id = next["replay_id"].as_str().unwrap().to_string();
    let (_, p) = api(&gw, "DELETE", &format!("/api/v1/replay/{next_id}"), "");
    assert_eq!(p["state"], "cancelled", "{p}");
}
