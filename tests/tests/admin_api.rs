//! The admin REST API against the real gateway: the OpenAPI document covers every
//! route and every documented route answers (401 without the token, a documented
//! status with it); kick really disconnects (MQTT 5 reason 0x98); sessions are listed,
//! shown and discarded; retained messages are listed and deleted; pause stops Kafka
//! writes while ingest goes on and resume drains in order (real Kafka).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use integration::kafka::Kafka;
use integration::raw::{Outcome, Raw};
use integration::{http_request, http_send, kafka_config, mosquitto, Gateway, Stream, ANON};
use serde_json::Value;

const TOKEN: &str = "admin-api-test-token-0123456789";

fn gateway(extra: &str) -> Gateway {
    Gateway::start_env(extra, &[("GATEWAY_ADMIN__TOKEN", TOKEN)])
}

fn api(gw: &Gateway, method: &str, path: &str) -> (u16, Value) {
    api_body(gw, method, path, "")
}

fn api_body(gw: &Gateway, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (code, text) = http_send(gw.admin.expect("admin"), method, path, Some(TOKEN), body);
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, v)
}

#[test]
fn every_documented_route_answers_and_needs_the_token() {
    let gw = gateway(&format!("{ANON}[kafka]\nbootstrap = \"embedded\"\n"));
    let admin = gw.admin.expect("admin");
    let (code, doc) = api(&gw, "GET", "/api/v1/openapi.json");
    assert_eq!(code, 200, "{doc}");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    let paths = doc["paths"].as_object().expect("paths");
    // The routes this gateway serves are all there (the router and the document come
    // from one list, so this also proves the document is not empty or stale).
    for p in [
        "/api/v1/status",
        "/api/v1/connections",
        "/api/v1/connections/{client_id}",
        "/api/v1/sessions",
        "/api/v1/sessions/{client_id}",
        "/api/v1/subscriptions",
        "/api/v1/retained",
        "/api/v1/journal",
        "/api/v1/bridge",
        "/api/v1/bridge/pause",
        "/api/v1/bridge/resume",
        "/api/v1/bridge/parked",
        "/api/v1/bridge/parked/redrive",
        "/api/v1/replay",
        "/api/v1/replay/{replay_id}",
        "/api/v1/vehicles/{client_id}/commands",
        "/api/v1/routes",
        "/api/v1/config",
        "/api/v1/log-level",
    ] {
        assert!(paths.contains_key(p), "{p} is not in the OpenAPI document");
    }
    for (path, ops) in paths {
        let concrete = path
            .replace("{client_id}", "VIN-NOT-HERE")
            .replace("{replay_id}", "replay-not-here")
            .replace("/api/v1/retained", "/api/v1/retained?topic=a/b");
        for (method, op) in ops.as_object().expect("operations") {
            let method = method.to_uppercase();
            let (code, body) = http_request(admin, &method, &concrete, None);
            assert_eq!(code, 401, "{method} {path} without the token: {body}");
            assert!(body.contains("\"unauthorized\""), "{method} {path}: {body}");
            let body = match (method.as_str(), path.as_str()) {
                ("POST", "/api/v1/vehicles/{client_id}/commands") => r#"{"payload":"x"}"#,
                ("PUT", "/api/v1/log-level") => r#"{"level":"info"}"#,
                _ => "",
            };
            let (code, answer) = api_body(&gw, &method, &concrete, body);
            let documented = op["responses"]
                .as_object()
                .expect("responses")
                .contains_key(&code.to_string());
            assert!(
                documented,
                "{method} {path} answered {code}, not a documented status: {answer}"
            );
            if code >= 400 {
                let shape = answer["error"]["code"].is_string() && answer["error"]["message"].is_string();
                assert!(shape, "{method} {path} {code}: not the error shape: {answer}");
            }
        }
    }
    // Unknown routes answer in the error shape too; probes stay open.
    let (code, answer) = api(&gw, "GET", "/api/v1/nope");
    assert_eq!((code, answer["error"]["code"].as_str()), (404, Some("not_found")));
    assert_eq!(http_request(admin, "GET", "/readyz", None).0, 200);
    assert_eq!(http_request(admin, "GET", "/healthz", None).0, 200);
}

#[test]
fn kick_disconnects_with_0x98_and_sessions_are_listed_shown_and_discarded() {
    let gw = gateway(&format!(
        "{ANON}subscribe_acl = [\"#\"]\npublish_acl = [\"#\"]\n[kafka]\nbootstrap = \"embedded\"\n"
    ));
    let (mut vehicle, code) = Raw::mqtt5(gw.mqtt(), "VIN-KICK", 60);
    assert_eq!(code, 0);
    vehicle
        .send(&integration::raw::publish5(
            b"vehicles/VIN-KICK/telemetry",
            1,
            None,
        ))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while api(&gw, "GET", "/api/v1/connections/VIN-KICK").1["messages_in"] != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, page) = api(&gw, "GET", "/api/v1/connections?prefix=VIN-");
    assert_eq!(code, 200, "{page}");
    let conns = page["connections"].as_array().expect("connections");
    assert_eq!(conns.len(), 1, "{page}");
    assert_eq!(conns[0]["client_id"], "VIN-KICK");
    assert_eq!(conns[0]["protocol"], 5);
    assert_eq!(conns[0]["listener"], "tcp");
    assert!(conns[0]["bytes_in"].as_u64().unwrap() > 0, "{page}");
    let (code, one) = api(&gw, "GET", "/api/v1/connections/VIN-KICK");
    assert_eq!(code, 200, "{one}");
    assert_eq!(one["keep_alive_secs"], 60);
    let (code, answer) = api(&gw, "DELETE", "/api/v1/connections/VIN-KICK");
    assert_eq!(code, 200, "{answer}");
    let (outcome, packets) = vehicle.until_closed(Duration::from_secs(5));
    assert!(
        matches!(outcome, Outcome::Closed),
        "still connected after the kick"
    );
    let disconnect = packets.iter().find(|p| p[0] == 0xE0).expect("a DISCONNECT");
    assert_eq!(disconnect.get(2), Some(&0x98), "{disconnect:?}");
    let (code, _) = api(&gw, "GET", "/api/v1/connections/VIN-KICK");
    assert_eq!(code, 404);

    // A persistent session with a subscription, offline, with queued messages.
    let port = gw.mqtt().port().to_string();
    let (rc, out) = mosquitto(
        "mosquitto_sub",
        &port,
        &[
            "-V",
            "mqttv5",
            "-i",
            "VIN-SESS",
            "-c",
            "-x",
            "3600",
            "-q",
            "1",
            "-t",
            "fleet/VIN-SESS/cmd",
            "-W",
            "1",
        ],
    );
    assert!(rc == 0 || rc == 27, "{out}");
    for n in 0..3 {
        let (rc, out) = mosquitto(
            "mosquitto_pub",
            &port,
            &[
                "-V",
                "mqttv5",
                "-i",
                "ops",
                "-q",
                "1",
                "-t",
                "fleet/VIN-SESS/cmd",
                "-m",
                &format!("m{n}"),
            ],
        );
        assert_eq!(rc, 0, "{out}");
    }
    let (code, page) = api(&gw, "GET", "/api/v1/sessions?online=false&prefix=VIN-SESS");
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["sessions"][0]["client_id"], "VIN-SESS", "{page}");
    let (code, one) = api(&gw, "GET", "/api/v1/sessions/VIN-SESS");
    assert_eq!(code, 200, "{one}");
    assert_eq!(one["queued"], 3, "{one}");
    assert_eq!(
        one["subscription_list"][0]["filter"], "fleet/VIN-SESS/cmd",
        "{one}"
    );
    assert!(one["oldest_queued_age_secs"].as_f64().is_some(), "{one}");
    let (code, subs) = api(&gw, "GET", "/api/v1/subscriptions?filter_prefix=fleet/");
    assert_eq!(code, 200);
    assert_eq!(subs["subscriptions"][0]["client_id"], "VIN-SESS", "{subs}");

    // Paging: three sessions, two a page.
    for id in ["VIN-P1", "VIN-P2", "VIN-P3"] {
        mosquitto(
            "mosquitto_sub",
            &port,
            &[
                "-V", "mqttv5", "-i", id, "-c", "-x", "600", "-t", "x/y", "-W", "1",
            ],
        );
    }
    let (_, p1) = api(&gw, "GET", "/api/v1/sessions?prefix=VIN-P&limit=2");
    let after = p1["next_after"].as_str().expect("a next page").to_string();
    let (_, p2) = api(
        &gw,
        "GET",
        &format!("/api/v1/sessions?prefix=VIN-P&limit=2&after={after}"),
    );
    let ids: Vec<_> = p1["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .chain(p2["sessions"].as_array().unwrap())
        .map(|s| s["client_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["VIN-P1", "VIN-P2", "VIN-P3"]);
    assert!(p2["next_after"].is_null(), "{p2}");

    // Discard: refused while connected, done when offline; the vehicle then starts fresh.
    let (_conn, _) = Raw::mqtt5(gw.mqtt(), "VIN-P1", 60);
    let (code, answer) = api(&gw, "DELETE", "/api/v1/sessions/VIN-P1");
    assert_eq!(
        (code, answer["error"]["code"].as_str()),
        (409, Some("session_online")),
        "{answer}"
    );
    let (code, answer) = api(&gw, "DELETE", "/api/v1/sessions/VIN-SESS");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(api(&gw, "GET", "/api/v1/sessions/VIN-SESS").0, 404);
    let (rc, out) = mosquitto(
        "mosquitto_sub",
        &port,
        &[
            "-V",
            "mqttv5",
            "-i",
            "VIN-SESS",
            "-c",
            "-x",
            "3600",
            "-q",
            "1",
            "-t",
            "fleet/VIN-SESS/cmd",
            "-W",
            "2",
            "-v",
        ],
    );
    assert!(
        !out.contains("m0"),
        "a discarded session's queue was delivered (rc {rc}): {out}"
    );
}

#[test]
fn retained_messages_are_listed_and_deleted() {
    let gw = gateway(&format!(
        "{ANON}subscribe_acl = [\"#\"]\npublish_acl = [\"#\"]\n[kafka]\nbootstrap = \"embedded\"\n"
    ));
    let port = gw.mqtt().port().to_string();
    for (t, m) in [("site/a/state", "on"), ("site/b/state", "off"), ("other/x", "1")] {
        let (rc, out) = mosquitto(
            "mosquitto_pub",
            &port,
            &["-i", "ops", "-q", "1", "-r", "-t", t, "-m", m],
        );
        assert_eq!(rc, 0, "{out}");
    }
    let (code, page) = api(&gw, "GET", "/api/v1/retained?filter=site/%2B/state");
    assert_eq!(code, 200, "{page}");
    let topics: Vec<_> = page["retained"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["topic"].clone())
        .collect();
    assert_eq!(topics, ["site/a/state", "site/b/state"], "{page}");
    assert_eq!(page["retained"][0]["payload_preview"], "on");
    let (code, answer) = api(&gw, "GET", "/api/v1/retained?filter=a/%23/b");
    assert_eq!(
        (code, answer["error"]["code"].as_str()),
        (400, Some("invalid_query")),
        "{answer}"
    );
    let (code, answer) = api(&gw, "DELETE", "/api/v1/retained?topic=site/a/state");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(api(&gw, "DELETE", "/api/v1/retained?topic=site/a/state").0, 404);
    // A new subscriber no longer gets it.
    let (_, out) = mosquitto(
        "mosquitto_sub",
        &port,
        &["-i", "late", "-t", "site/+/state", "-W", "2", "-v"],
    );
    assert!(
        out.contains("site/b/state off") && !out.contains("site/a/state"),
        "{out}"
    );
}

#[test]
fn config_is_masked_and_the_log_level_changes_at_run_time() {
    let gw = gateway(&format!("{ANON}[kafka]\nbootstrap = \"embedded\"\n"));
    let (code, cfg) = api(&gw, "GET", "/api/v1/config");
    assert_eq!(code, 200, "{cfg}");
    assert_eq!(cfg["admin"]["token"], "***", "the token leaked: {cfg}");
    assert!(!cfg.to_string().contains(TOKEN));
    assert_eq!(cfg["kafka"]["bootstrap"], "embedded");
    let (code, lvl) = api(&gw, "GET", "/api/v1/log-level");
    assert_eq!(code, 200, "{lvl}");
    let (code, lvl) = api_body(
        &gw,
        "PUT",
        "/api/v1/log-level",
        r#"{"level":"info,gateway::session=debug"}"#,
    );
    assert_eq!(code, 200, "{lvl}");
    assert_eq!(
        api(&gw, "GET", "/api/v1/log-level").1["level"],
        "info,gateway::session=debug"
    );
    let (code, bad) = api_body(&gw, "PUT", "/api/v1/log-level", r#"{"level":"gateway=loud"}"#);
    assert_eq!(
        (code, bad["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{bad}"
    );
}

#[test]
fn pause_holds_kafka_writes_while_ingest_goes_on_and_resume_drains_in_order() {
    let kafka = Kafka::start();
    kafka.create_topic("telemetry", 1);
    let gw = gateway(&kafka_config(&kafka.bootstrap(), "telemetry"));
    let (code, answer) = api(&gw, "POST", "/api/v1/bridge/pause");
    assert_eq!((code, answer["paused"].as_bool()), (200, Some(true)), "{answer}");
    assert_eq!(gw.metric("gateway_bridge_paused"), 1);
    // Ingest goes on: every message is acknowledged (journaled) while paused.
    let s = Stream::start(gw.mqtt(), "VIN-PAUSE", 200, Duration::ZERO);
    assert!(
        s.wait_acked(200, Duration::from_secs(30)),
        "only {} PUBACKs while paused",
        s.acked()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        kafka.record_count("telemetry", 1),
        0,
        "records reached Kafka while paused"
    );
    let (_, bridge) = api(&gw, "GET", "/api/v1/bridge");
    assert_eq!(bridge["paused"], true, "{bridge}");
    assert!(bridge["journal_waiting"].as_u64().unwrap() >= 200, "{bridge}");
    let (code, answer) = api(&gw, "POST", "/api/v1/bridge/resume");
    assert_eq!(
        (code, answer["was_paused"].as_bool()),
        (200, Some(true)),
        "{answer}"
    );
    let records = kafka.consume("telemetry", 1, 200, Duration::from_secs(60));
    let numbers: Vec<usize> = records.iter().filter_map(|r| r.payload.parse().ok()).collect();
    assert_eq!(numbers, (0..200).collect::<Vec<_>>(), "not all, or not in order");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("gateway_bridge_paused") != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gw.metric("gateway_bridge_paused"), 0);
}
