//! Framing (is a whole packet there, and is it within the size limit?) and the
//! version-specific encoders and decoders.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::packet::{ConnectRequest, Inbound, ProtocolError, PublishRequest, Version, Will};

/// Outcome of looking at the start of the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// Read more bytes.
    Incomplete,
    /// A whole packet of this many bytes is buffered.
    Complete(usize),
}

/// Step one of parsing: checks that a whole frame is buffered without parsing it, and
/// refuses a remaining length over `max` before the bytes arrive.
pub fn frame(buf: &[u8], max: usize) -> Result<Framing, ProtocolError> {
    let mut remaining: usize = 0;
    let mut shift = 0;
    for i in 1..=4 {
        let Some(&b) = buf.get(i) else {
            return Ok(Framing::Incomplete);
        };
        remaining |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            let total = 1 + i + remaining;
            if total > max {
                return Err(ProtocolError::too_large(total, max));
            }
            return Ok(if buf.len() >= total {
                Framing::Complete(total)
            } else {
                Framing::Incomplete
            });
        }
        shift += 7;
    }
    Err(ProtocolError::malformed("remaining length longer than 4 bytes"))
}

/// What the first packet of a connection says about the protocol.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniff {
    Mqtt(Version),
    /// A CONNECT for a protocol level we do not speak (e.g. 3 = MQTT 3.1).
    Unsupported(u8),
}

/// Reads the protocol name and level from a complete CONNECT frame.
pub fn sniff(frame: &[u8]) -> Result<Sniff, ProtocolError> {
    if frame.first().map(|b| b >> 4) != Some(1) {
        return Err(ProtocolError::protocol(
            "not_connect",
            "first packet is not CONNECT",
        ));
    }
    let mut i = 1;
    while frame.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    let start = i + 1;
    let name_len = match frame.get(start..start + 2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]) as usize,
        None => return Err(ProtocolError::malformed("CONNECT too short")),
    };
    let name = frame
        .get(start + 2..start + 2 + name_len)
        .ok_or_else(|| ProtocolError::malformed("CONNECT too short"))?;
    let level = *frame
        .get(start + 2 + name_len)
        .ok_or_else(|| ProtocolError::malformed("CONNECT too short"))?;
    match (name, level) {
        (b"MQTT", 4) => Ok(Sniff::Mqtt(Version::V4)),
        (b"MQTT", 5) => Ok(Sniff::Mqtt(Version::V5)),
        (b"MQTT", l) | (b"MQIsdp", l) => Ok(Sniff::Unsupported(l)),
        _ => Err(ProtocolError::protocol(
            "bad_protocol_name",
            "protocol name is not MQTT",
        )),
    }
}

/// CONNACK refusals, each with its 3.1.1 return code and 5.0 reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    UnsupportedVersion,
    BadClientId,
    ServerUnavailable,
    BadCredentials,
    NotAuthorized,
    BadAuthMethod,
    /// A password user presented a client id outside its `client_ids` (3.1.1: 5, 5.0: 0x87).
    ClientIdNotAllowed,
    /// The Will topic has no route under `kafka.unmatched = "refuse"` (3.1.1: 5, 5.0: 0x90).
    WillUnroutable,
    /// `auth.connect_rate_per_ip` refused the attempt (3.1.1: 3, 5.0: 0x9F).
    RateLimitedAddress,
    /// `auth.connect_rate_global` refused the attempt (3.1.1: 3, 5.0: 0x9F).
    RateLimitedGlobal,
    /// `mqtt.max_connections` reached (3.1.1: 3, 5.0: 0x97 quota exceeded).
    MaxConnections,
    /// Authentication did not finish within `mqtt.connect_timeout_secs` (3.1.1: 3,
    /// 5.0: 0x89 server busy): the password-check slots were all taken.
    AuthTimeout,
}

impl ConnectRefusal {
    pub fn label(self) -> &'static str {
        match self {
            ConnectRefusal::UnsupportedVersion => "unsupported_protocol_version",
            ConnectRefusal::BadClientId => "bad_client_id",
            ConnectRefusal::ServerUnavailable => "server_unavailable",
            ConnectRefusal::BadCredentials => "bad_credentials",
            ConnectRefusal::NotAuthorized => "not_authorized",
            ConnectRefusal::BadAuthMethod => "bad_authentication_method",
            ConnectRefusal::ClientIdNotAllowed => "client_id_not_allowed",
            ConnectRefusal::WillUnroutable => "will_unroutable",
            ConnectRefusal::RateLimitedAddress => "connect_rate_per_ip",
            ConnectRefusal::RateLimitedGlobal => "connect_rate_global",
            ConnectRefusal::MaxConnections => "max_connections",
            ConnectRefusal::AuthTimeout => "auth_timeout",
        }
    }
}

/// One filter's answer in a SUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// Granted at this QoS (0 or 1).
    Qos(u8),
    /// Outside `auth.subscribe_acl` (5.0: 0x87).
    NotAuthorized,
    /// Not a valid topic filter (5.0: 0x8F).
    FilterInvalid,
    /// Beyond `mqtt.max_subscriptions` (5.0: 0x97).
    QuotaExceeded,
}

/// Encodes and decodes one connection's packets in its negotiated version.
#[derive(Debug, Clone)]
pub struct Codec {
    pub version: Version,
    /// Largest packet accepted from the client (our `mqtt.max_packet_size`).
    pub max_in: usize,
    /// Largest packet the client accepts from us (MQTT 5 Maximum Packet Size).
    pub max_out: usize,
}

fn qos_u8(q: rumqttc::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos5_u8(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

fn v4_error(e: rumqttc::mqttbytes::Error) -> ProtocolError {
    match e {
        rumqttc::mqttbytes::Error::TopicNotUtf8 => ProtocolError::topic_invalid("topic is not valid UTF-8"),
        rumqttc::mqttbytes::Error::InvalidQoS(q) => ProtocolError::malformed(format!("invalid QoS {q}")),
        other => ProtocolError::malformed(other.to_string()),
    }
}

fn v5_error(e: rumqttc::v5::mqttbytes::Error) -> ProtocolError {
    match e {
        rumqttc::v5::mqttbytes::Error::TopicNotUtf8 => {
            ProtocolError::topic_invalid("topic is not valid UTF-8")
        }
        other => ProtocolError::malformed(other.to_string()),
    }
}

impl Codec {
    pub fn new(version: Version, max_in: usize) -> Self {
        Codec {
            version,
            max_in,
            max_out: 268_435_460,
        }
    }

    /// Takes the next complete packet off `buf`, or `None` if more bytes are needed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Inbound>, ProtocolError> {
        let Framing::Complete(len) = frame(buf, self.max_in)? else {
            return Ok(None);
        };
        let mut packet = buf.split_to(len);
        let kind = packet[0] >> 4;
        match self.version {
            Version::V4 => self.decode_v4(&mut packet).map(Some),
            Version::V5 if kind == 15 => Ok(Some(Inbound::Auth)),
            // rumqttc refuses the two-byte DISCONNECT MQTT 5 allows (reason 0 implied).
            Version::V5 if kind == 14 && len == 2 => Ok(Some(Inbound::Disconnect { reason: 0 })),
            Version::V5 => self.decode_v5(&mut packet).map(Some),
        }
    }

    fn decode_v4(&self, packet: &mut BytesMut) -> Result<Inbound, ProtocolError> {
        let p = v4::read(packet, self.max_in).map_err(v4_error)?;
        Ok(match p {
            v4::Packet::Connect(c) => Inbound::Connect(Box::new(ConnectRequest {
                client_id: c.client_id,
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                username: c
                    .login
                    .as_ref()
                    .map(|l| l.username.clone())
                    .filter(|u| !u.is_empty()),
                password: c.login.map(|l| l.password).filter(|p| !p.is_empty()),
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: qos_u8(w.qos),
                    retain: w.retain,
                }),
                receive_maximum: None,
                max_packet_size: None,
                auth_method: None,
            })),
            v4::Packet::Publish(p) => Inbound::Publish(PublishRequest {
                qos: qos_u8(p.qos),
                retain: p.retain,
                dup: p.dup,
                topic: p.topic,
                pkid: p.pkid,
                payload: p.payload,
                topic_alias: None,
                content_type: None,
                message_expiry_secs: None,
                user_properties: Vec::new(),
            }),
            v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
            v4::Packet::PubRec(_) | v4::Packet::PubRel(_) | v4::Packet::PubComp(_) => Inbound::QoS2Flow,
            v4::Packet::Subscribe(s) => Inbound::Subscribe {
                pkid: s.pkid,
                filters: s.filters.into_iter().map(|f| (f.path, qos_u8(f.qos))).collect(),
            },
            v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            },
            v4::Packet::PingReq => Inbound::PingReq,
            v4::Packet::Disconnect => Inbound::Disconnect { reason: 0 },
            v4::Packet::ConnAck(_)
            | v4::Packet::SubAck(_)
            | v4::Packet::UnsubAck(_)
            | v4::Packet::PingResp => Inbound::ServerOnly,
        })
    }

    fn decode_v5(&self, packet: &mut BytesMut) -> Result<Inbound, ProtocolError> {
        let p = v5::Packet::read(packet, Some(self.max_in)).map_err(v5_error)?;
        Ok(match p {
            v5::Packet::Connect(c, will, login) => {
                let props = c.properties.unwrap_or_default();
                Inbound::Connect(Box::new(ConnectRequest {
                    client_id: c.client_id,
                    clean_start: c.clean_start,
                    keep_alive: c.keep_alive,
                    username: login
                        .as_ref()
                        .map(|l| l.username.clone())
                        .filter(|u| !u.is_empty()),
                    password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                    will: match will {
                        Some(w) => Some(Will {
                            topic: String::from_utf8(w.topic.to_vec())
                                .map_err(|_| ProtocolError::topic_invalid("will topic is not UTF-8"))?,
                            payload: w.message,
                            qos: qos5_u8(w.qos),
                            retain: w.retain,
                        }),
                        None => None,
                    },
                    receive_maximum: props.receive_maximum,
                    max_packet_size: props.max_packet_size,
                    auth_method: props.authentication_method,
                }))
            }
            v5::Packet::Publish(p) => {
                let topic = String::from_utf8(p.topic.to_vec())
                    .map_err(|_| ProtocolError::topic_invalid("topic is not valid UTF-8"))?;
                let props = p.properties.unwrap_or_default();
                Inbound::Publish(PublishRequest {
                    qos: qos5_u8(p.qos),
                    retain: p.retain,
                    dup: p.dup,
                    topic,
                    pkid: p.pkid,
                    payload: p.payload,
                    topic_alias: props.topic_alias,
                    content_type: props.content_type,
                    message_expiry_secs: props.message_expiry_interval,
                    user_properties: props.user_properties,
                })
            }
            v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
            v5::Packet::PubRec(_) | v5::Packet::PubRel(_) | v5::Packet::PubComp(_) => Inbound::QoS2Flow,
            v5::Packet::Subscribe(s) => Inbound::Subscribe {
                pkid: s.pkid,
                filters: s.filters.into_iter().map(|f| (f.path, qos5_u8(f.qos))).collect(),
            },
            v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                pkid: u.pkid,
                filters: u.filters,
            },
            v5::Packet::PingReq(_) => Inbound::PingReq,
            v5::Packet::Disconnect(d) => Inbound::Disconnect {
                reason: d.reason_code as u8,
            },
            v5::Packet::ConnAck(_)
            | v5::Packet::SubAck(_)
            | v5::Packet::UnsubAck(_)
            | v5::Packet::PingResp(_) => Inbound::ServerOnly,
        })
    }

    /// Appends a packet to `out` unless it exceeds the client's Maximum Packet Size
    /// (MQTT 5 §3.1.2.11.4: the server must not send it then). Returns whether it fit.
    fn put<E>(&self, out: &mut BytesMut, write: impl FnOnce(&mut BytesMut) -> Result<usize, E>) -> bool {
        let start = out.len();
        if write(out).is_err() || out.len() - start > self.max_out {
            out.truncate(start);
            return false;
        }
        true
    }

    pub fn connack_accept(
        &self,
        out: &mut BytesMut,
        receive_max: u16,
        topic_alias_max: u16,
        assigned: Option<String>,
    ) {
        self.connack_accept_keep_alive(out, receive_max, topic_alias_max, assigned, None);
    }

    /// As [`Codec::connack_accept`]; MQTT 5 also carries `server_keep_alive` (the
    /// keep alive the client must use, when the server capped it).
    pub fn connack_accept_keep_alive(
        &self,
        out: &mut BytesMut,
        receive_max: u16,
        topic_alias_max: u16,
        assigned: Option<String>,
        server_keep_alive: Option<u16>,
    ) {
        match self.version {
            Version::V4 => {
                self.put(out, |o| {
                    v4::ConnAck::new(v4::ConnectReturnCode::Success, false).write(o)
                });
            }
            Version::V5 => {
                let props = v5::ConnAckProperties {
                    receive_max: Some(receive_max),
                    max_qos: Some(1),
                    max_packet_size: Some(self.max_in as u32),
                    topic_alias_max: Some(topic_alias_max),
                    assigned_client_identifier: assigned,
                    shared_subscription_available: Some(0),
                    subscription_identifiers_available: Some(0),
                    wildcard_subscription_available: Some(1),
                    session_expiry_interval: None,
                    retain_available: None,
                    reason_string: None,
                    user_properties: Vec::new(),
                    server_keep_alive,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                };
                let ack = v5::ConnAck {
                    session_present: false,
                    code: v5::ConnectReturnCode::Success,
                    properties: Some(props),
                };
                self.put(out, |o| ack.write(o));
            }
        }
    }

    pub fn connack_refuse(&self, out: &mut BytesMut, why: ConnectRefusal) {
        match self.version {
            Version::V4 => {
                let code = match why {
                    ConnectRefusal::UnsupportedVersion => v4::ConnectReturnCode::RefusedProtocolVersion,
                    ConnectRefusal::BadClientId => v4::ConnectReturnCode::BadClientId,
                    ConnectRefusal::ServerUnavailable => v4::ConnectReturnCode::ServiceUnavailable,
                    ConnectRefusal::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                    ConnectRefusal::NotAuthorized
                    | ConnectRefusal::BadAuthMethod
                    | ConnectRefusal::ClientIdNotAllowed
                    | ConnectRefusal::WillUnroutable => v4::ConnectReturnCode::NotAuthorized,
                    ConnectRefusal::RateLimitedAddress
                    | ConnectRefusal::RateLimitedGlobal
                    | ConnectRefusal::MaxConnections
                    | ConnectRefusal::AuthTimeout => v4::ConnectReturnCode::ServiceUnavailable,
                };
                self.put(out, |o| v4::ConnAck::new(code, false).write(o));
            }
            Version::V5 => {
                let code = match why {
                    ConnectRefusal::UnsupportedVersion => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                    ConnectRefusal::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                    ConnectRefusal::ServerUnavailable => v5::ConnectReturnCode::ServerUnavailable,
                    ConnectRefusal::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                    ConnectRefusal::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                    ConnectRefusal::BadAuthMethod => v5::ConnectReturnCode::BadAuthenticationMethod,
                    ConnectRefusal::ClientIdNotAllowed => v5::ConnectReturnCode::NotAuthorized,
                    ConnectRefusal::WillUnroutable => v5::ConnectReturnCode::TopicNameInvalid,
                    ConnectRefusal::RateLimitedAddress | ConnectRefusal::RateLimitedGlobal => {
                        v5::ConnectReturnCode::ConnectionRateExceeded
                    }
                    ConnectRefusal::MaxConnections => v5::ConnectReturnCode::QuotaExceeded,
                    ConnectRefusal::AuthTimeout => v5::ConnectReturnCode::ServerBusy,
                };
                let ack = v5::ConnAck {
                    session_present: false,
                    code,
                    properties: None,
                };
                self.put(out, |o| ack.write(o));
            }
        }
    }

    /// PUBACK with an MQTT 5 reason (0 = success; 3.1.1 has no reasons).
    pub fn puback(&self, out: &mut BytesMut, pkid: u16, reason: u8) {
        match self.version {
            Version::V4 => {
                self.put(out, |o| v4::PubAck::new(pkid).write(o));
            }
            Version::V5 => {
                let reason = match reason {
                    0x00 => v5::PubAckReason::Success,
                    0x87 => v5::PubAckReason::NotAuthorized,
                    0x90 => v5::PubAckReason::TopicNameInvalid,
                    0x97 => v5::PubAckReason::QuotaExceeded,
                    0x83 => v5::PubAckReason::ImplementationSpecificError,
                    _ => v5::PubAckReason::UnspecifiedError,
                };
                let ack = v5::PubAck {
                    pkid,
                    reason,
                    properties: None,
                };
                self.put(out, |o| ack.write(o));
            }
        }
    }

    /// SUBACK, one answer per filter. 3.1.1 has a single failure code (0x80).
    pub fn suback(&self, out: &mut BytesMut, pkid: u16, granted: &[Granted]) {
        match self.version {
            Version::V4 => {
                let codes = granted
                    .iter()
                    .map(|g| match g {
                        Granted::Qos(0) => {
                            v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtMostOnce)
                        }
                        Granted::Qos(_) => {
                            v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce)
                        }
                        _ => v4::SubscribeReasonCode::Failure,
                    })
                    .collect();
                self.put(out, |o| v4::SubAck::new(pkid, codes).write(o));
            }
            Version::V5 => {
                let return_codes = granted
                    .iter()
                    .map(|g| match g {
                        Granted::Qos(0) => {
                            v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtMostOnce)
                        }
                        Granted::Qos(_) => {
                            v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                        }
                        Granted::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                        Granted::FilterInvalid => v5::SubscribeReasonCode::TopicFilterInvalid,
                        Granted::QuotaExceeded => v5::SubscribeReasonCode::QuotaExceeded,
                    })
                    .collect();
                let ack = v5::SubAck {
                    pkid,
                    return_codes,
                    properties: None,
                };
                self.put(out, |o| ack.write(o));
            }
        }
    }

    pub fn unsuback(&self, out: &mut BytesMut, pkid: u16, count: usize) {
        match self.version {
            Version::V4 => {
                self.put(out, |o| v4::UnsubAck::new(pkid).write(o));
            }
            Version::V5 => {
                let ack = v5::UnsubAck {
                    pkid,
                    reasons: vec![v5::UnsubAckReason::Success; count],
                    properties: None,
                };
                self.put(out, |o| ack.write(o));
            }
        }
    }

    pub fn pingresp(&self, out: &mut BytesMut) {
        match self.version {
            Version::V4 => self.put(out, |o| v4::PingResp.write(o)),
            Version::V5 => self.put(out, v5::PingResp::write),
        };
    }

    /// MQTT 5 DISCONNECT with a reason; 3.1.1 has no server DISCONNECT (the socket closes).
    pub fn disconnect(&self, out: &mut BytesMut, reason: u8) {
        if self.version != Version::V5 {
            return;
        }
        // Encoded by hand: rumqttc's reason enum cannot represent every code we send.
        let packet = [0xE0, 0x01, reason];
        if packet.len() <= self.max_out {
            out.extend_from_slice(&packet);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_waits_and_caps() {
        assert_eq!(frame(&[0x30], 100), Ok(Framing::Incomplete));
        assert_eq!(frame(&[0x30, 0x03, 1, 2], 100), Ok(Framing::Incomplete));
        assert_eq!(frame(&[0x30, 0x02, 1, 2], 100), Ok(Framing::Complete(4)));
        assert!(
            frame(&[0x30, 0xff, 0xff, 0x7f], 100).is_err(),
            "over the maximum before the body arrives"
        );
        assert!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX).is_err(),
            "5-byte length"
        );
    }

    #[test]
    fn zero_length_v5_disconnect_and_auth() {
        let c = Codec::new(Version::V5, 1024);
        let mut buf = BytesMut::from(&[0xE0u8, 0x00, 0xF0, 0x00][..]);
        assert!(matches!(
            c.decode(&mut buf),
            Ok(Some(Inbound::Disconnect { reason: 0 }))
        ));
        assert!(matches!(c.decode(&mut buf), Ok(Some(Inbound::Auth))));
        assert!(buf.is_empty());
    }

    #[test]
    fn refusal_codes_per_version() {
        use ConnectRefusal::*;
        let cases = [
            (ClientIdNotAllowed, 5, 0x87),
            (WillUnroutable, 5, 0x90),
            (RateLimitedAddress, 3, 0x9F),
            (RateLimitedGlobal, 3, 0x9F),
            (MaxConnections, 3, 0x97),
            (AuthTimeout, 3, 0x89),
            (BadCredentials, 4, 0x86),
        ];
        for (why, v4, v5) in cases {
            let mut out = BytesMut::new();
            Codec::new(Version::V4, 1024).connack_refuse(&mut out, why);
            assert_eq!(&out[..], &[0x20, 0x02, 0x00, v4], "{why:?} 3.1.1");
            let mut out = BytesMut::new();
            Codec::new(Version::V5, 1024).connack_refuse(&mut out, why);
            assert_eq!((out[0], out[3]), (0x20, v5), "{why:?} 5.0");
        }
    }

    #[test]
    fn server_keep_alive_and_suback_reasons() {
        let c = Codec::new(Version::V5, 1024);
        let mut out = BytesMut::new();
        c.connack_accept_keep_alive(&mut out, 10, 4, None, Some(1200));
        assert!(
            out.windows(3).any(|w| w == [0x13, 0x04, 0xB0]),
            "Server Keep Alive 1200: {out:?}"
        );
        let mut out = BytesMut::new();
        let granted = [
            Granted::Qos(1),
            Granted::NotAuthorized,
            Granted::FilterInvalid,
            Granted::QuotaExceeded,
        ];
        c.suback(&mut out, 7, &granted);
        assert_eq!(&out[out.len() - 4..], &[0x01, 0x87, 0x8F, 0x97]);
        let mut out = BytesMut::new();
        Codec::new(Version::V4, 1024).suback(&mut out, 7, &granted);
        assert_eq!(&out[..], &[0x90, 0x06, 0x00, 0x07, 0x01, 0x80, 0x80, 0x80]);
    }
}
