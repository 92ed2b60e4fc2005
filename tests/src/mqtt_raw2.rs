//! Raw MQTT 3.1.1 packets beyond [`crate::raw`], for the pub/sub tests: CONNECT with clean
//! session off and the CONNACK's Session Present flag, PUBLISH at any QoS with DUP and
//! RETAIN, the four acknowledgements, SUBSCRIBE at a chosen QoS, and a PUBLISH decoder.

use std::net::SocketAddr;

use crate::raw::{connack_code, put_len, Connect, Raw};

/// First bytes of the acknowledgement packets (PUBREL carries the required flags 0b0010).
pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;

/// What a CONNACK said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: u8,
}

/// A 3.1.1 CONNECT with `clean` session; returns the connection and its CONNACK
/// (`code` 0xff if the gateway closed without one).
pub fn connect311(addr: SocketAddr, client_id: &str, clean: bool) -> (Raw, ConnAck) {
    let mut c = Connect::new(4, client_id);
    c.clean = clean;
    let (raw, connack) = Raw::connect_with(addr, &c);
    let ack = ConnAck {
        session_present: connack.get(2).is_some_and(|f| f & 1 == 1),
        code: connack_code(&connack),
    };
    (raw, ack)
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A 3.1.1 PUBLISH (`pkid` is ignored at QoS 0).
pub fn publish(topic: &str, qos: u8, pkid: u16, dup: bool, retain: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let first = 0x30 | if dup { 0x08 } else { 0 } | (qos << 1) | u8::from(retain);
    let mut frame = vec![first];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP (`kind` is one of the constants above).
pub fn ack(kind: u8, pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![kind, 0x02, hi, lo]
}

/// A 3.1.1 SUBSCRIBE of `(filter, qos)` pairs.
pub fn subscribe311(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (f, qos) in filters {
        string(&mut body, f.as_bytes());
        body.push(*qos);
    }
    let mut frame = vec![0x82];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

/// A PUBLISH as received (3.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    /// 0 at QoS 0.
    pub pkid: u16,
    pub payload: Vec<u8>,
}

/// Decodes a whole 3.1.1 PUBLISH packet; `None` if it is not one or is cut short.
pub fn parse_publish(packet: &[u8]) -> Option<Publish> {
    let first = *packet.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let mut i = 1;
    while packet.get(i)? & 0x80 != 0 {
        i += 1;
    }
    let body = packet.get(i + 1..)?;
    let len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let topic = String::from_utf8(body.get(2..2 + len)?.to_vec()).ok()?;
    let qos = (first >> 1) & 3;
    let mut at = 2 + len;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
        at += 2;
    }
    Some(Publish {
        topic,
        qos,
        dup: first & 0x08 != 0,
        retain: first & 0x01 != 0,
        pkid,
        payload: body.get(at..)?.to_vec(),
    })
}

/// Resident set size of process `pid` in bytes (`VmRSS` of /proc/<pid>/status).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// The sum of every sample of a metric family in Prometheus text (any labels), e.g.
/// `metric_sum(&gw.metrics(), "gateway_messages_dropped_total")`.
pub fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
