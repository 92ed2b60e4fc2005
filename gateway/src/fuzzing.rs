//! Fuzz target bodies, shared by the cargo-fuzz targets in `fuzz/` (nightly, libFuzzer)
//! and by `tests/fuzz_corpus.rs`, which replays the checked-in corpus on stable.
//!
//! Each function takes arbitrary bytes and must never panic, loop or allocate without
//! bound; a panic is a finding. Besides "no panic", they assert properties a hostile
//! vehicle must not be able to break (our own encoders frame what they write, the
//! publish ACL never lets a client id escape its own topic subtree). Not part of the
//! gateway's API: hidden from the docs, kept in the library only so both harnesses run
//! the same code.

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;

use crate::auth::{self, Auth, Refusal};
use crate::config::{AuthSection, User};
use crate::mqtt::codec::{frame, sniff, ConnAckParams, ConnectRefusal, Framing, Granted, Sniff};
use crate::mqtt::{Codec, Inbound, Version};
use crate::topic;

/// A small packet limit, so the "too large" paths are reached with short inputs.
pub const SMALL_MAX_PACKET: usize = 64;
/// The largest packet MQTT can express (268,435,455 bytes of body plus the fixed header).
pub const LARGE_MAX_PACKET: usize = 268_435_460;

const REFUSALS: [ConnectRefusal; 12] = [
    ConnectRefusal::UnsupportedVersion,
    ConnectRefusal::BadClientId,
    ConnectRefusal::ServerUnavailable,
    ConnectRefusal::BadCredentials,
    ConnectRefusal::NotAuthorized,
    ConnectRefusal::BadAuthMethod,
    ConnectRefusal::ClientIdNotAllowed,
    ConnectRefusal::WillUnroutable,
    ConnectRefusal::RateLimitedAddress,
    ConnectRefusal::RateLimitedGlobal,
    ConnectRefusal::MaxConnections,
    ConnectRefusal::AuthTimeout,
];

/// The MQTT decoder on arbitrary bytes, as a session meets them: framing and protocol
/// sniffing of the first packet, then `Codec::decode` in a loop over the buffer, for both
/// versions and a small and a large maximum packet size. Every decoded packet is answered
/// with the encoders the session uses (CONNACK, PUBACK, SUBACK, ...); each answer must be
/// one whole frame. Decoding the same bytes delivered in small pieces must give the same
/// packets as decoding them at once.
pub fn mqtt_decode(data: &[u8]) {
    for max in [SMALL_MAX_PACKET, LARGE_MAX_PACKET] {
        if let Ok(Framing::Complete(len)) = frame(data, max) {
            let _ = sniff(&data[..len]);
        }
        for version in [Version::V4, Version::V5] {
            let codec = Codec::new(version, max);
            let whole = decode_all(&codec, data, data.len().max(1));
            let piece = 1 + data.first().map_or(0, |b| usize::from(*b % 7));
            let pieces = decode_all(&codec, data, piece);
            assert_eq!(whole, pieces, "decoding depends on how the bytes arrive");
        }
    }
}

/// Feeds `data` to `codec` `piece` bytes at a time, answering every packet; returns what
/// was decoded (as debug text, for comparison) up to the first error.
fn decode_all(codec: &Codec, data: &[u8], piece: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(packet)) => {
                    assert!(buf.len() < before, "a decoded packet consumed no bytes");
                    answer(codec, &packet, &mut out);
                    seen.push(format!("{packet:?}"));
                }
                Ok(None) => break,
                Err(e) => {
                    seen.push(format!("error {e:?}"));
                    return seen;
                }
            }
        }
    }
    seen
}

/// Answers `packet` the way the session would, checking each answer is one whole frame.
fn answer(codec: &Codec, packet: &Inbound, out: &mut BytesMut) {
    let mut codec = codec.clone();
    match packet {
        Inbound::Connect(req) => {
            if let Some(max) = req.max_packet_size {
                codec.max_out = max;
            }
            let assigned = req
                .client_id
                .is_empty()
                .then(|| "auto-0000000000000000".to_string());
            let receive_max = req.receive_maximum.unwrap_or(u16::MAX);
            let params = ConnAckParams {
                receive_max,
                topic_alias_max: 16,
                assigned,
                max_qos: 1,
                retain_available: true,
                ..ConnAckParams::default()
            };
            answered(&codec, out, |c, o| c.connack(o, &params));
            for why in REFUSALS {
                answered(&codec, out, |c, o| c.connack_refuse(o, why));
            }
        }
        Inbound::Publish(p) => {
            for reason in [0x00, 0x87, 0x90, 0x97, 0x80] {
                answered(&codec, out, |c, o| c.puback(o, p.pkid, reason));
            }
        }
        Inbound::Subscribe { pkid, filters, .. } => {
            let granted: Vec<Granted> = filters
                .iter()
                .enumerate()
                .map(
                    |(i, f)| match (topic::validate_filter(&f.filter).is_ok(), i % 3) {
                        (false, _) => Granted::FilterInvalid,
                        (true, 0) => Granted::Qos(f.qos.min(1)),
                        (true, 1) => Granted::NotAuthorized,
                        (true, _) => Granted::QuotaExceeded,
                    },
                )
                .collect();
            answered(&codec, out, |c, o| c.suback(o, *pkid, &granted));
        }
        Inbound::Unsubscribe { pkid, filters } => {
            let existed = vec![true; filters.len()];
            answered(&codec, out, |c, o| c.unsuback(o, *pkid, &existed));
        }
        Inbound::PingReq => answered(&codec, out, |c, o| c.pingresp(o)),
        Inbound::Disconnect { reason, .. } => answered(&codec, out, |c, o| c.disconnect(o, *reason)),
        Inbound::PubAck { .. }
        | Inbound::PubRec { .. }
        | Inbound::PubRel { .. }
        | Inbound::PubComp { .. }
        | Inbound::Auth
        | Inbound::ServerOnly => {
            answered(&codec, out, |c, o| c.disconnect(o, 0x82));
        }
    }
}

fn answered(codec: &Codec, out: &mut BytesMut, write: impl FnOnce(&Codec, &mut BytesMut)) {
    out.clear();
    write(codec, out);
    if out.is_empty() {
        return;
    }
    assert!(
        out.len() <= codec.max_out as usize,
        "answer of {} bytes exceeds the client's maximum of {}",
        out.len(),
        codec.max_out
    );
    assert_eq!(
        frame(out, usize::MAX),
        Ok(Framing::Complete(out.len())),
        "an answer is not exactly one frame: {:02x?}",
        &out[..]
    );
}

/// The fixed user of the fuzzing user table, and its password.
pub const FUZZ_USER: &str = "fleet";
pub const FUZZ_PASSWORD: &str = "s3cret";

/// The user table of the `connect_auth` target, built once: argon2 is deliberately slow,
/// so its hash uses the cheapest parameters (m = 8 KiB, t = 1, p = 1) and a fixed salt.
/// A second user has a hash that does not parse, as a mistyped configuration would.
pub fn fuzz_auth() -> Arc<Auth> {
    static AUTH: OnceLock<Arc<Auth>> = OnceLock::new();
    AUTH.get_or_init(|| {
        let cfg = AuthSection {
            allow_anonymous: false,
            users: vec![
                User {
                    username: FUZZ_USER.into(),
                    password_hash: cheap_hash(FUZZ_PASSWORD),
                    client_ids: None,
                    ..User::default()
                },
                User {
                    username: "broken".into(),
                    password_hash: "$argon2id$not-a-phc-string".into(),
                    client_ids: None,
                    ..User::default()
                },
            ],
            ..AuthSection::default()
        };
        Auth::new(&cfg)
    })
    .clone()
}

fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use argon2::{Algorithm, Argon2, Params};
    // Fixed, valid constants: none of these can fail (and a fuzz harness may panic).
    let params = Params::new(8, 1, 1, None).unwrap_or_else(|e| panic!("argon2 parameters: {e}"));
    let salt = SaltString::from_b64("ZnV6emZ1enpmdXp6").unwrap_or_else(|e| panic!("salt: {e}"));
    Argon2::new(Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .unwrap_or_else(|e| panic!("cheap argon2 hash: {e}"))
}

/// The CONNECT path up to the auth decision, on arbitrary bytes: the first packet is
/// framed, sniffed and decoded; then the pure parts of `session::accept_connect` run:
/// client-id validation, `Auth::authenticate` (whether a certificate identity is present
/// is taken from the input), the will topic's validation and publish ACL. The bytes after
/// the CONNECT are split at NUL into topics and filters for the publish and subscribe
/// ACLs. Properties checked: the right password for the known user is accepted and a
/// wrong one refused; a valid client id can publish and subscribe only inside its own
/// subtree (`vehicles/<id>/...`, `vehicles/<id>/commands/...`).
pub fn connect_auth(data: &[u8]) {
    let max = 1 << 20;
    let Ok(Framing::Complete(len)) = frame(data, max) else {
        return;
    };
    let Ok(Sniff::Mqtt(version)) = sniff(&data[..len]) else {
        return;
    };
    let codec = Codec::new(version, max);
    let mut buf = BytesMut::from(&data[..len]);
    let Ok(Some(Inbound::Connect(req))) = codec.decode(&mut buf) else {
        return;
    };
    let auth = fuzz_auth();
    let cert = data.last().is_some_and(|b| b & 1 == 1).then_some("cert");
    let client_id = if req.client_id.is_empty() {
        "auto-0000000000000000".to_string()
    } else {
        req.client_id.clone()
    };
    let id_ok = auth::valid_client_id(&client_id);

    let verdict = auth.authenticate(req.username.as_deref(), req.password.as_deref(), cert);
    // Identity is earned: the fuzz user may connect only as its username (the default
    // binding); nobody else's id, whatever the input.
    let principal = auth
        .check(req.username.as_deref(), req.password.as_deref(), cert.is_some())
        .result;
    if let Ok(p @ auth::Principal::User(_)) = &principal {
        assert_eq!(
            auth.may_use_client_id(p, &client_id),
            client_id == FUZZ_USER,
            "user {FUZZ_USER} bound to client id {client_id:?}"
        );
    }
    match (req.username.as_deref(), req.password.as_deref()) {
        (Some(FUZZ_USER), Some(FUZZ_PASSWORD)) => assert_eq!(verdict, Ok(()), "right password refused"),
        (Some(_), Some(_)) => assert_eq!(verdict, Err(Refusal::BadCredentials), "wrong password accepted"),
        (None, None) if cert.is_none() => assert_eq!(verdict, Err(Refusal::NotAuthorized)),
        (None, None) => assert_eq!(verdict, Ok(())),
        _ => assert_eq!(verdict, Err(Refusal::BadCredentials), "half a login accepted"),
    }

    if let Some(w) = &req.will {
        let name_ok = topic::validate_name(&w.topic).is_ok();
        check_publish(&auth, &client_id, id_ok, &w.topic, name_ok);
    }
    for t in data[len..].split(|b| *b == 0).take(64) {
        let t = String::from_utf8_lossy(t);
        check_publish(&auth, &client_id, id_ok, &t, topic::validate_name(&t).is_ok());
        let filter_ok = topic::validate_filter(&t).is_ok();
        let may = auth.may_subscribe(&client_id, &t);
        if id_ok && filter_ok && may {
            assert!(
                within(&t, &format!("vehicles/{client_id}/commands")),
                "client {client_id:?} may subscribe to {t:?}"
            );
        }
        if filter_ok && topic::validate_name(&t).is_ok() {
            // A filter without wildcards matches exactly itself.
            assert!(topic::matches(&t, &t));
            assert!(topic::covers(&t, &t));
        }
    }
}

fn check_publish(auth: &Auth, client_id: &str, id_ok: bool, topic_name: &str, name_ok: bool) {
    let may = auth.may_publish(client_id, topic_name);
    if id_ok && name_ok && may {
        assert!(
            within(topic_name, &format!("vehicles/{client_id}")),
            "client {client_id:?} may publish to {topic_name:?}"
        );
    }
}

/// `t` is `root` or below it.
fn within(t: &str, root: &str) -> bool {
    t == root || t.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cheap_hash_verifies() {
        let auth = fuzz_auth();
        assert_eq!(
            auth.authenticate(Some(FUZZ_USER), Some(FUZZ_PASSWORD), None),
            Ok(())
        );
        assert_eq!(
            auth.authenticate(Some("broken"), Some("x"), None),
            Err(Refusal::BadCredentials)
        );
    }
}
