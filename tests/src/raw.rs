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
