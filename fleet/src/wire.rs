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
    let mut body = BytesMut::new();
    put_str(&mut body, "MQTT");
    body.put_u8(if v5 { 5 } else { 4 });
    body.put_u8(0x02);
    body.put_u16(keep_alive);
    if v5 {
        body.put_u8(0);
    }
    put_str(&mut body, client_id);
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

pub fn subscribe(out: &mut BytesMut, pkid: u16, filter: &str, v5: bool) {
    let len = 2 + usize::from(v5) + 2 + filter.len() + 1;
    out.put_u8(0x82);
    put_len(out, len);
    out.put_u16(pkid);
    if v5 {
        out.put_u8(0);
    }
    put_str(out, filter);
    out.put_u8(1);
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
