//! The few MQTT packets a simulated vehicle sends, in 3.1.1 or 5.0, and how to find
//! whole packets in what it reads back.

use bytes::{BufMut, BytesMut};

fn put_len(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// CONNECT with clean start; `v5` adds an empty property block.
pub fn connect(out: &mut BytesMut, client_id: &str, keep_alive: u16, v5: bool) {
    connect_as(out, client_id, keep_alive, v5, None);
}

/// CONNECT with clean start and, if given, a username and password.
pub fn connect_as(
    out: &mut BytesMut,
    client_id: &str,
    keep_alive: u16,
    v5: bool,
    login: Option<(&str, &str)>,
) {
    let mut body = BytesMut::new();
    put_str(&mut body, "MQTT");
    body.put_u8(if v5 { 5 } else { 4 });
    body.put_u8(if login.is_some() { 0xC2 } else { 0x02 });
    body.put_u16(keep_alive);
    if v5 {
        body.put_u8(0);
    }
    put_str(&mut body, client_id);
    if let Some((user, password)) = login {
        put_str(&mut body, user);
        put_str(&mut body, password);
    }
    out.put_u8(0x10);
    put_len(out, body.len());
    out.put_slice(&body);
}

pub fn publish(out: &mut BytesMut, topic: &str, qos: u8, pkid: u16, payload: &[u8], v5: bool) {
    let props = usize::from(v5);
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + props + payload.len();
    out.put_u8(0x30 | (qos << 1));
    put_len(out, len);
    put_str(out, topic);
    if qos > 0 {
        out.put_u16(pkid);
    }
    if v5 {
        out.put_u8(0);
    }
    out.put_slice(payload);
}

/// SUBSCRIBE to one filter at maximum QoS `qos`.
pub fn subscribe(out: &mut BytesMut, pkid: u16, filter: &str, qos: u8, v5: bool) {
    let len = 2 + usize::from(v5) + 2 + filter.len() + 1;
    out.put_u8(0x82);
    put_len(out, len);
    out.put_u16(pkid);
    if v5 {
        out.put_u8(0);
    }
    put_str(out, filter);
    out.put_u8(qos);
}

pub fn puback(out: &mut BytesMut, pkid: u16) {
    out.put_u8(0x40);
    out.put_u8(0x02);
    out.put_u16(pkid);
}

pub fn pingreq(out: &mut BytesMut) {
    out.put_slice(&[0xC0, 0x00]);
}

pub fn disconnect(out: &mut BytesMut) {
    out.put_slice(&[0xE0, 0x00]);
}

/// Takes one whole packet off the front of `buf`: (first byte, body).
pub fn next_packet(buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        i += 1;
        if i > 4 {
            return None;
        }
    }
    if buf.len() < 1 + i + len {
        return None;
    }
    let mut packet = buf.split_to(1 + i + len);
    let first = packet[0];
    let body = packet.split_off(1 + i);
    Some((first, body))
}

/// A variable byte integer at the front of `b`: (value, bytes it took).
fn varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for (i, byte) in b.iter().take(4).enumerate() {
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// A received PUBLISH: its packet id (QoS > 0) and its payload.
pub struct Publish<'a> {
    pub pkid: Option<u16>,
    pub payload: &'a [u8],
}

/// Reads a PUBLISH body (`first` is its fixed-header byte); `None` if malformed.
pub fn parse_publish(first: u8, body: &[u8], v5: bool) -> Option<Publish<'_>> {
    let qos = (first >> 1) & 0b11;
    let tlen = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let mut at = 2 + tlen;
    let pkid = if qos > 0 {
        let id = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
        at += 2;
        Some(id)
    } else {
        None
    };
    if v5 {
        let (len, used) = varint(body.get(at..)?)?;
        at += used + len;
    }
    Some(Publish {
        pkid,
        payload: body.get(at..)?,
    })
}

/// The first reason code of a SUBACK body (one per filter; >= 0x80 is a refusal).
pub fn suback_code(body: &[u8], v5: bool) -> Option<u8> {
    let mut at = 2;
    if v5 {
        let (len, used) = varint(body.get(at..)?)?;
        at += used + len;
    }
    body.get(at).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_and_suback_round_trip() {
        for v5 in [false, true] {
            for qos in [0u8, 1] {
                let mut out = BytesMut::new();
                publish(&mut out, "a/b", qos, 7, b"payload", v5);
                let (first, body) = next_packet(&mut out).expect("whole packet");
                let p = parse_publish(first, &body, v5).expect("parses");
                assert_eq!(p.pkid, (qos > 0).then_some(7));
                assert_eq!(p.payload, b"payload");
            }
            let suback: &[u8] = if v5 { &[0, 1, 0, 0x01] } else { &[0, 1, 0x80] };
            assert_eq!(suback_code(suback, v5), Some(if v5 { 0x01 } else { 0x80 }));
        }
    }
}
