//! A raw MQTT 3.1.1/5.0 client over a plain socket, for exact control of the bytes:
//! hostile input, PUBACK accounting, DISCONNECT reason codes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

/// What the gateway did with a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It closed the connection (EOF or reset).
    Closed,
    /// It is still open after the wait.
    Open,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// A second handle on the same socket (e.g. a reader thread beside a writer).
    pub fn split(&self) -> Raw {
        Raw {
            stream: self.stream.try_clone().expect("clone socket"),
            buf: BytesMut::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// 3.1.1 CONNECT; returns the CONNACK return code.
    pub fn mqtt311(addr: SocketAddr, client_id: &str, keep_alive: u16) -> (Raw, u8) {
        let mut raw = Raw::connect(addr);
        let mut c = v4::Connect::new(client_id);
        c.keep_alive = keep_alive;
        let mut out = BytesMut::new();
        c.write(&mut out).expect("encode connect");
        raw.send(&out).expect("send connect");
        let code = raw.read_packet().map(|p| p[3]).unwrap_or(0xff);
        (raw, code)
    }

    /// MQTT 5 CONNECT with no properties; returns the CONNACK reason code.
    pub fn mqtt5(addr: SocketAddr, client_id: &str, keep_alive: u16) -> (Raw, u8) {
        let mut raw = Raw::connect(addr);
        let mut p = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x02];
        p.extend_from_slice(&keep_alive.to_be_bytes());
        p.push(0); // no properties
        p.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        p.extend_from_slice(client_id.as_bytes());
        let mut frame = vec![0x10];
        put_len(&mut frame, p.len());
        frame.extend_from_slice(&p);
        raw.send(&frame).expect("send connect");
        let code = raw.read_packet().map(|p| p[3]).unwrap_or(0xff);
        (raw, code)
    }

    /// Sends `connect` (see [`Connect::encode`]) and returns the whole CONNACK (empty if
    /// the gateway closed the connection without one).
    pub fn connect_with(addr: SocketAddr, connect: &Connect) -> (Raw, Vec<u8>) {
        let mut raw = Raw::connect(addr);
        raw.send(&connect.encode()).expect("send connect");
        let connack = raw.read_packet().unwrap_or_default();
        (raw, connack)
    }

    /// 3.1.1 QoS1 PUBLISH.
    pub fn publish311(&mut self, topic: &str, pkid: u16, payload: &[u8]) -> std::io::Result<()> {
        let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = pkid;
        let mut out = BytesMut::new();
        p.write(&mut out).expect("encode publish");
        self.send(&out)
    }

    /// Next whole packet from the gateway, or `None` on close/timeout.
    pub fn read_packet(&mut self) -> Option<Vec<u8>> {
        loop {
            if self.buf.len() >= 2 {
                let mut len = 0usize;
                let mut shift = 0;
                let mut i = 1;
                while i < self.buf.len() && i <= 4 {
                    len |= ((self.buf[i] & 0x7f) as usize) << shift;
                    if self.buf[i] & 0x80 == 0 {
                        break;
                    }
                    shift += 7;
                    i += 1;
                }
                let total = 1 + i + len;
                if i < self.buf.len() && self.buf.len() >= total {
                    return Some(self.buf.split_to(total).to_vec());
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until the gateway closes the connection (returns the packets it sent on
    /// the way) or `wait` passes.
    pub fn until_closed(&mut self, wait: Duration) -> (Outcome, Vec<Vec<u8>>) {
        self.stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut packets = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return (Outcome::Open, packets);
                }
                Err(_) => break,
            }
        }
        while self.buf.len() >= 2 {
            let len = self.buf[1] as usize;
            if self.buf.len() < 2 + len {
                break;
            }
            packets.push(self.buf.split_to(2 + len).to_vec());
        }
        (Outcome::Closed, packets)
    }
}

pub fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

/// A CONNECT with every field a test may need, in 3.1.1 (`version` 4) or 5.0 (5).
#[derive(Debug, Clone)]
pub struct Connect {
    pub version: u8,
    pub client_id: String,
    pub keep_alive: u16,
    pub clean: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Will topic and payload (QoS 1).
    pub will: Option<(String, Vec<u8>)>,
}

impl Connect {
    pub fn new(version: u8, client_id: &str) -> Connect {
        Connect {
            version,
            client_id: client_id.into(),
            keep_alive: 30,
            clean: true,
            username: None,
            password: None,
            will: None,
        }
    }

    pub fn login(mut self, user: &str, password: &str) -> Connect {
        self.username = Some(user.into());
        self.password = Some(password.into());
        self
    }

    pub fn will(mut self, topic: &str, payload: &[u8]) -> Connect {
        self.will = Some((topic.into(), payload.to_vec()));
        self
    }

    pub fn keep_alive(mut self, secs: u16) -> Connect {
        self.keep_alive = secs;
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &[u8]) {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s);
        }
        let v5 = self.version == 5;
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if self.will.is_some() {
            flags |= 0x04 | 0x08; // will, QoS 1
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        let mut p = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', self.version, flags];
        p.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            p.push(0); // no CONNECT properties
        }
        string(&mut p, self.client_id.as_bytes());
        if let Some((topic, payload)) = &self.will {
            if v5 {
                p.push(0); // no will properties
            }
            string(&mut p, topic.as_bytes());
            string(&mut p, payload);
        }
        if let Some(u) = &self.username {
            string(&mut p, u.as_bytes());
        }
        if let Some(pw) = &self.password {
            string(&mut p, pw.as_bytes());
        }
        let mut frame = vec![0x10];
        put_len(&mut frame, p.len());
        frame.extend_from_slice(&p);
        frame
    }
}

/// The reason code of a CONNACK (3.1.1 return code or 5.0 reason code); 0xff if none.
pub fn connack_code(connack: &[u8]) -> u8 {
    match connack {
        [0x20, _, _, code, ..] => *code,
        _ => 0xff,
    }
}

/// The value of a two-byte MQTT 5 CONNACK property (e.g. 0x13 Server Keep Alive).
pub fn connack_u16_property(connack: &[u8], id: u8) -> Option<u16> {
    // Fixed header, flags, reason, then the property length (a varint) and properties.
    let mut i = 1;
    while connack.get(i)? & 0x80 != 0 {
        i += 1;
    }
    let mut at = i + 3;
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = *connack.get(at)?;
        len |= usize::from(b & 0x7f) << shift;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let props = connack.get(at..at + len)?;
    let mut j = 0;
    while j < props.len() {
        let pid = props[j];
        j += 1;
        let size = match pid {
            0x11 | 0x27 => 4,
            0x12 | 0x15 | 0x1A | 0x1C | 0x1F => {
                2 + usize::from(u16::from_be_bytes([*props.get(j)?, *props.get(j + 1)?]))
            }
            0x13 | 0x21 | 0x22 => 2,
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x26 => {
                let k = u16::from_be_bytes([*props.get(j)?, *props.get(j + 1)?]) as usize;
                let v = u16::from_be_bytes([*props.get(j + 2 + k)?, *props.get(j + 3 + k)?]) as usize;
                4 + k + v
            }
            _ => return None,
        };
        if pid == id && size == 2 {
            return Some(u16::from_be_bytes([*props.get(j)?, *props.get(j + 1)?]));
        }
        j += size;
    }
    None
}

/// A QoS 1 MQTT 5 PUBLISH, with an optional topic alias (property 0x23).
pub fn publish5(topic: &[u8], pkid: u16, alias: Option<u16>) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    body.extend_from_slice(&pkid.to_be_bytes());
    match alias {
        Some(a) => {
            body.push(3);
            body.push(0x23);
            body.extend_from_slice(&a.to_be_bytes());
        }
        None => body.push(0),
    }
    body.extend_from_slice(b"p");
    let mut frame = vec![0x32];
    put_len(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

/// A SUBSCRIBE (3.1.1 or 5.0) for `filters` at QoS 1.
pub fn subscribe(version: u8, pkid: u16, filters: &[String]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if version == 5 {
        body.push(0); // no properties
    }
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

/// The reason codes of a SUBACK (3.1.1 or 5.0).
pub fn suback_codes(version: u8, suback: &[u8]) -> Vec<u8> {
    let mut i = 1;
    while suback.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    let mut at = i + 3; // past the remaining length and the packet id
    if version == 5 {
        at += 1 + usize::from(suback.get(at).copied().unwrap_or(0)); // property length < 128
    }
    suback.get(at..).map(<[u8]>::to_vec).unwrap_or_default()
}
