//! Framing (is a whole packet there, and is it within the size limit?) and the
//! version-specific encoders and decoders.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::packet::{ConnectRequest, Inbound, ProtocolError, PublishRequest, SubscribeFilter, Version, Will};
use crate::message::MessageProperties;

/// Largest Remaining Length a 4-byte variable byte integer can carry (§1.5.5).
const MAX_REMAINING: usize = 268_435_455;

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
    /// Granted at this QoS (0, 1 or 2; a larger value is sent as 2).
    Qos(u8),
    /// An internal failure (store error, ...): 3.1.1 and 5.0 both 0x80.
    Unspecified,
    /// Outside `auth.subscribe_acl` (5.0: 0x87).
    NotAuthorized,
    /// Not a valid topic filter (5.0: 0x8F).
    FilterInvalid,
    /// Beyond `mqtt.max_subscriptions` (5.0: 0x97).
    QuotaExceeded,
}

/// What a CONNACK accepting a connection says (the 5.0 properties are ignored in 3.1.1).
#[derive(Debug, Clone, Default)]
pub struct ConnAckParams {
    /// The server resumed a stored session (§3.2.2.1.1); false whenever Clean Start was set.
    pub session_present: bool,
    /// How many QoS > 0 PUBLISHes the client may have unacknowledged towards us.
    pub receive_max: u16,
    /// Highest topic alias the client may use towards us (0 = none).
    pub topic_alias_max: u16,
    /// The client id the server chose for a client that sent an empty one.
    pub assigned: Option<String>,
    /// The keep alive the client must use instead of its own (when the server capped it).
    pub server_keep_alive: Option<u16>,
    /// Highest QoS the server accepts (`mqtt.max_qos`); 2 is the default and not sent.
    pub max_qos: u8,
    /// The Session Expiry Interval the server uses when it differs from the client's.
    pub session_expiry_secs: Option<u32>,
    /// Whether retained messages are accepted (`retained.enabled`); false sends 0.
    pub retain_available: bool,
}

/// One PUBLISH to a subscriber, borrowed from the shared message so a fan-out to many
/// sessions copies nothing but the encoded bytes.
#[derive(Debug, Clone, Copy)]
pub struct OutPublish<'a> {
    pub topic: &'a str,
    pub payload: &'a Bytes,
    /// min(message QoS, granted QoS).
    pub qos: u8,
    /// RETAIN as the subscriber sees it (Retain As Published, or a retained message
    /// sent because of a subscription).
    pub retain: bool,
    /// Set on a resend of a QoS > 0 message (§3.3.1.1); ignored at QoS 0.
    pub dup: bool,
    /// Packet identifier; ignored at QoS 0 (no identifier is written).
    pub pkid: u16,
    pub props: &'a MessageProperties,
    /// What is left of the publisher's Message Expiry Interval.
    pub message_expiry_secs: Option<u32>,
    /// The Subscription Identifiers of the subscriptions this message matched (5.0).
    pub subscription_ids: &'a [u32],
    /// A Topic Alias (5.0): with a topic, it sets the alias; with an empty topic, the
    /// alias stands for it. `None` in 3.1.1.
    pub topic_alias: Option<u16>,
}

/// Bytes a variable byte integer takes (values up to 268,435,455).
fn vbi_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_vbi(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

/// A length-prefixed string or binary (the caller checked it fits in 65,535 bytes).
fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.extend_from_slice(b);
}

/// Length of the 5.0 PUBLISH properties of `p`, `None` if one cannot be encoded.
fn publish_props_len(p: &OutPublish) -> Option<usize> {
    let max = usize::from(u16::MAX);
    let s = |v: &[u8]| (v.len() <= max).then_some(1 + 2 + v.len());
    let m = p.props;
    let mut n = 0;
    if m.payload_format_indicator.is_some() {
        n += 2;
    }
    if p.message_expiry_secs.is_some() {
        n += 5;
    }
    if p.topic_alias.is_some() {
        n += 3;
    }
    if let Some(t) = &m.content_type {
        n += s(t.as_bytes())?;
    }
    if let Some(t) = &m.response_topic {
        n += s(t.as_bytes())?;
    }
    if let Some(d) = &m.correlation_data {
        n += s(d)?;
    }
    for &id in p.subscription_ids {
        if id == 0 || id as usize > MAX_REMAINING {
            return None;
        }
        n += 1 + vbi_len(id as usize);
    }
    for (k, v) in &m.user_properties {
        n += s(k.as_bytes())? + s(v.as_bytes())? - 1;
    }
    Some(n)
}

/// Encodes and decodes one connection's packets in its negotiated version.
#[derive(Debug, Clone)]
pub struct Codec {
    pub version: Version,
    /// Largest packet accepted from the client (our `mqtt.max_packet_size`). `u32`, like
    /// MQTT's own field: every idle connection holds a codec.
    pub max_in: u32,
    /// Largest packet the client accepts from us (MQTT 5 Maximum Packet Size).
    pub max_out: u32,
    /// Topic aliases we may use towards the client: its CONNECT's Topic Alias Maximum,
    /// capped by `mqtt.outbound_topic_aliases` (0 in 3.1.1). Fits the struct's padding.
    pub alias_out: u16,
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
        rumqttc::mqttbytes::Error::EmptySubscription => {
            ProtocolError::protocol("empty_subscribe", "SUBSCRIBE without topic filters")
        }
        other => ProtocolError::malformed(other.to_string()),
    }
}

fn v5_error(e: rumqttc::v5::mqttbytes::Error) -> ProtocolError {
    match e {
        rumqttc::v5::mqttbytes::Error::TopicNotUtf8 => {
            ProtocolError::topic_invalid("topic is not valid UTF-8")
        }
        rumqttc::v5::mqttbytes::Error::EmptySubscription => {
            ProtocolError::protocol("empty_subscribe", "SUBSCRIBE without topic filters")
        }
        other => ProtocolError::malformed(other.to_string()),
    }
}

/// The wire code of a PUBREC reason (rumqttc's enum has no explicit discriminants).
fn puback_code(r: v5::PubAckReason) -> u8 {
    match r {
        v5::PubAckReason::Success => 0x00,
        v5::PubAckReason::NoMatchingSubscribers => 0x10,
        v5::PubAckReason::UnspecifiedError => 0x80,
        v5::PubAckReason::ImplementationSpecificError => 0x83,
        v5::PubAckReason::NotAuthorized => 0x87,
        v5::PubAckReason::TopicNameInvalid => 0x90,
        v5::PubAckReason::PacketIdentifierInUse => 0x91,
        v5::PubAckReason::QuotaExceeded => 0x97,
        v5::PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code(r: v5::PubRecReason) -> u8 {
    match r {
        v5::PubRecReason::Success => 0x00,
        v5::PubRecReason::NoMatchingSubscribers => 0x10,
        v5::PubRecReason::UnspecifiedError => 0x80,
        v5::PubRecReason::ImplementationSpecificError => 0x83,
        v5::PubRecReason::NotAuthorized => 0x87,
        v5::PubRecReason::TopicNameInvalid => 0x90,
        v5::PubRecReason::PacketIdentifierInUse => 0x91,
        v5::PubRecReason::QuotaExceeded => 0x97,
        v5::PubRecReason::PayloadFormatInvalid => 0x99,
    }
}

/// MQTT-2.2.2-2: the fixed header's low four bits are reserved (0, or 0b0010 for PUBREL,
/// SUBSCRIBE and UNSUBSCRIBE) except in PUBLISH; anything else is malformed. rumqttc
/// does not look at them. Type 0 is left to rumqttc (invalid packet type).
fn check_fixed_flags(byte1: u8) -> Result<(), ProtocolError> {
    let expected = match byte1 >> 4 {
        0 | 3 => return Ok(()),
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if byte1 & 0x0F != expected {
        return Err(ProtocolError::malformed(format!(
            "reserved fixed header flags {:#06b} in packet type {}",
            byte1 & 0x0F,
            byte1 >> 4
        )));
    }
    Ok(())
}

/// Reads a variable byte integer at `buf[at..]`: (value, bytes used), `None` if cut short
/// or longer than four bytes.
fn read_vbi(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for i in 0..4 {
        let b = *buf.get(at + i)?;
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Length of a complete frame's fixed header (type byte and Remaining Length).
fn header_len(frame: &[u8]) -> usize {
    read_vbi(frame, 1).map_or(frame.len(), |(_, n)| 1 + n)
}

/// Refuses reserved bits in SUBSCRIBE options, which rumqttc ignores: 3.1.1 allows only
/// the QoS bits (MQTT-3.8.3-4), 5.0 reserves bits 6 and 7 (§3.8.3.1). Walks the raw
/// frame; a frame too short to walk is left to rumqttc to report.
fn check_subscribe_options(frame: &[u8], version: Version) -> Result<(), ProtocolError> {
    let reserved = match version {
        Version::V4 => 0b1111_1100,
        Version::V5 => 0b1100_0000,
    };
    let Some((_, len_len)) = read_vbi(frame, 1) else {
        return Ok(());
    };
    let mut at = 1 + len_len + 2;
    if version == Version::V5 {
        let Some((props, n)) = read_vbi(frame, at) else {
            return Ok(());
        };
        at += n + props;
    }
    while let Some(len) = frame.get(at..at + 2) {
        at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
        let Some(options) = frame.get(at) else {
            return Ok(());
        };
        if options & reserved != 0 {
            return Err(ProtocolError::malformed(format!(
                "reserved subscription option bits set ({options:#010b})"
            )));
        }
        at += 1;
    }
    Ok(())
}

/// MQTT-2.3.1-1: SUBSCRIBE and UNSUBSCRIBE carry a non-zero packet identifier (rumqttc
/// reads 0 without complaint, and a SUBACK for 0 would be unanswerable).
fn nonzero_pkid(pkid: u16) -> Result<u16, ProtocolError> {
    if pkid == 0 {
        return Err(ProtocolError::malformed("packet identifier 0"));
    }
    Ok(pkid)
}

/// An UNSUBSCRIBE without a filter is a protocol error in both versions (3.1.1 §3.10.3,
/// 5.0 §3.10.3); rumqttc accepts it.
fn nonempty_unsubscribe(filters: Vec<String>) -> Result<Vec<String>, ProtocolError> {
    if filters.is_empty() {
        return Err(ProtocolError::protocol(
            "empty_unsubscribe",
            "UNSUBSCRIBE without topic filters",
        ));
    }
    Ok(filters)
}

impl Codec {
    pub fn new(version: Version, max_in: usize) -> Self {
        Codec {
            version,
            max_in: u32::try_from(max_in).unwrap_or(u32::MAX),
            max_out: 268_435_460,
            alias_out: 0,
        }
    }

    /// Takes the next complete packet off `buf`, or `None` if more bytes are needed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Inbound>, ProtocolError> {
        let Framing::Complete(len) = frame(buf, self.max_in as usize)? else {
            return Ok(None);
        };
        let mut packet = buf.split_to(len);
        let kind = packet[0] >> 4;
        check_fixed_flags(packet[0])?;
        if kind == 8 {
            check_subscribe_options(&packet, self.version)?;
        }
        match self.version {
            Version::V4 => self.decode_v4(&mut packet).map(Some),
            Version::V5 if kind == 15 => Ok(Some(Inbound::Auth)),
            // rumqttc refuses the two-byte DISCONNECT MQTT 5 allows (reason 0 implied), and
            // the three-byte one (reason, no property length: §3.14.2.2.1 allows omitting it).
            Version::V5 if kind == 14 && len - header_len(&packet) <= 1 => {
                let reason = packet.get(header_len(&packet)).copied().unwrap_or(0);
                v5::DisconnectReasonCode::try_from(reason).map_err(v5_error)?;
                Ok(Some(Inbound::Disconnect {
                    reason,
                    session_expiry_secs: None,
                }))
            }
            Version::V5 => self.decode_v5(&mut packet).map(Some),
        }
    }

    fn decode_v4(&self, packet: &mut BytesMut) -> Result<Inbound, ProtocolError> {
        let p = v4::read(packet, self.max_in as usize).map_err(v4_error)?;
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
                    ..Will::default()
                }),
                receive_maximum: None,
                max_packet_size: None,
                topic_alias_max: None,
                auth_method: None,
                session_expiry_secs: None,
            })),
            v4::Packet::Publish(p) => Inbound::Publish(PublishRequest {
                qos: qos_u8(p.qos),
                retain: p.retain,
                dup: p.dup,
                topic: p.topic,
                pkid: p.pkid,
                payload: p.payload,
                topic_alias: None,
                message_expiry_secs: None,
                props: MessageProperties::default(),
            }),
            v4::Packet::PubAck(a) => Inbound::PubAck {
                pkid: a.pkid,
                reason: 0,
            },
            v4::Packet::PubRec(a) => Inbound::PubRec {
                pkid: a.pkid,
                reason: 0,
            },
            v4::Packet::PubRel(a) => Inbound::PubRel {
                pkid: a.pkid,
                reason: 0,
            },
            v4::Packet::PubComp(a) => Inbound::PubComp {
                pkid: a.pkid,
                reason: 0,
            },
            v4::Packet::Subscribe(s) => Inbound::Subscribe {
                pkid: nonzero_pkid(s.pkid)?,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| SubscribeFilter {
                        filter: f.path,
                        qos: qos_u8(f.qos),
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: 0,
                    })
                    .collect(),
                subscription_id: None,
            },
            v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                pkid: nonzero_pkid(u.pkid)?,
                filters: nonempty_unsubscribe(u.topics)?,
            },
            v4::Packet::PingReq => Inbound::PingReq,
            v4::Packet::Disconnect => Inbound::Disconnect {
                reason: 0,
                session_expiry_secs: None,
            },
            v4::Packet::ConnAck(_)
            | v4::Packet::SubAck(_)
            | v4::Packet::UnsubAck(_)
            | v4::Packet::PingResp => Inbound::ServerOnly,
        })
    }

    fn decode_v5(&self, packet: &mut BytesMut) -> Result<Inbound, ProtocolError> {
        let p = v5::Packet::read(packet, Some(self.max_in as usize)).map_err(v5_error)?;
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
                        Some(w) => {
                            let wp = w.properties.unwrap_or(v5::LastWillProperties {
                                delay_interval: None,
                                payload_format_indicator: None,
                                message_expiry_interval: None,
                                content_type: None,
                                response_topic: None,
                                correlation_data: None,
                                user_properties: Vec::new(),
                            });
                            Some(Will {
                                topic: String::from_utf8(w.topic.to_vec())
                                    .map_err(|_| ProtocolError::topic_invalid("will topic is not UTF-8"))?,
                                payload: w.message,
                                qos: qos5_u8(w.qos),
                                retain: w.retain,
                                delay_interval_secs: wp.delay_interval.unwrap_or(0),
                                message_expiry_secs: wp.message_expiry_interval,
                                props: MessageProperties {
                                    payload_format_indicator: wp.payload_format_indicator,
                                    content_type: wp.content_type,
                                    response_topic: wp.response_topic,
                                    correlation_data: wp.correlation_data,
                                    user_properties: wp.user_properties,
                                },
                            })
                        }
                        None => None,
                    },
                    receive_maximum: props.receive_maximum,
                    max_packet_size: props.max_packet_size,
                    topic_alias_max: props.topic_alias_max,
                    auth_method: props.authentication_method,
                    session_expiry_secs: props.session_expiry_interval,
                }))
            }
            v5::Packet::Publish(p) => {
                let topic = String::from_utf8(p.topic.to_vec())
                    .map_err(|_| ProtocolError::topic_invalid("topic is not valid UTF-8"))?;
                let props = p.properties.unwrap_or_default();
                // §3.3.4: a Subscription Identifier is for server-to-client PUBLISHes only.
                if !props.subscription_identifiers.is_empty() {
                    return Err(ProtocolError::protocol(
                        "subscription_id_from_client",
                        "PUBLISH from the client carries a Subscription Identifier",
                    ));
                }
                Inbound::Publish(PublishRequest {
                    qos: qos5_u8(p.qos),
                    retain: p.retain,
                    dup: p.dup,
                    topic,
                    pkid: p.pkid,
                    payload: p.payload,
                    topic_alias: props.topic_alias,
                    message_expiry_secs: props.message_expiry_interval,
                    props: MessageProperties {
                        payload_format_indicator: props.payload_format_indicator,
                        content_type: props.content_type,
                        response_topic: props.response_topic,
                        correlation_data: props.correlation_data,
                        user_properties: props.user_properties,
                    },
                })
            }
            v5::Packet::PubAck(a) => Inbound::PubAck {
                pkid: a.pkid,
                reason: puback_code(a.reason),
            },
            v5::Packet::PubRec(a) => Inbound::PubRec {
                pkid: a.pkid,
                reason: pubrec_code(a.reason),
            },
            v5::Packet::PubRel(a) => Inbound::PubRel {
                pkid: a.pkid,
                reason: match a.reason {
                    v5::PubRelReason::Success => 0x00,
                    v5::PubRelReason::PacketIdentifierNotFound => 0x92,
                },
            },
            v5::Packet::PubComp(a) => Inbound::PubComp {
                pkid: a.pkid,
                reason: match a.reason {
                    v5::PubCompReason::Success => 0x00,
                    v5::PubCompReason::PacketIdentifierNotFound => 0x92,
                },
            },
            v5::Packet::Subscribe(s) => {
                let subscription_id = match s.properties.and_then(|p| p.id) {
                    // §3.8.2.1.2: the identifier is 1..=268,435,455; 0 is a protocol error.
                    Some(0) => {
                        return Err(ProtocolError::protocol(
                            "subscription_id_zero",
                            "SUBSCRIBE carries Subscription Identifier 0",
                        ))
                    }
                    Some(id) => Some(
                        u32::try_from(id)
                            .map_err(|_| ProtocolError::malformed("subscription identifier too large"))?,
                    ),
                    None => None,
                };
                Inbound::Subscribe {
                    pkid: nonzero_pkid(s.pkid)?,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| SubscribeFilter {
                            filter: f.path,
                            qos: qos5_u8(f.qos),
                            no_local: f.nolocal,
                            retain_as_published: f.preserve_retain,
                            retain_handling: match f.retain_forward_rule {
                                v5::RetainForwardRule::OnEverySubscribe => 0,
                                v5::RetainForwardRule::OnNewSubscribe => 1,
                                v5::RetainForwardRule::Never => 2,
                            },
                        })
                        .collect(),
                    subscription_id,
                }
            }
            v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
                pkid: nonzero_pkid(u.pkid)?,
                filters: nonempty_unsubscribe(u.filters)?,
            },
            v5::Packet::PingReq(_) => Inbound::PingReq,
            v5::Packet::Disconnect(d) => Inbound::Disconnect {
                reason: d.reason_code as u8,
                session_expiry_secs: d.properties.and_then(|p| p.session_expiry_interval),
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
        if write(out).is_err() || out.len() - start > self.max_out as usize {
            out.truncate(start);
            return false;
        }
        true
    }

    /// CONNACK accepting the connection. 3.1.1 carries only the session present flag;
    /// 5.0 also tells the client the limits and features of this server (§3.2.2.3).
    pub fn connack(&self, out: &mut BytesMut, p: &ConnAckParams) {
        match self.version {
            Version::V4 => {
                self.put(out, |o| {
                    v4::ConnAck::new(v4::ConnectReturnCode::Success, p.session_present).write(o)
                });
            }
            Version::V5 => {
                let props = v5::ConnAckProperties {
                    receive_max: Some(p.receive_max),
                    // Absent means 2 (§3.2.2.3.4); only 0 and 1 may be sent.
                    max_qos: (p.max_qos < 2).then_some(p.max_qos),
                    max_packet_size: Some(self.max_in),
                    topic_alias_max: Some(p.topic_alias_max),
                    assigned_client_identifier: p.assigned.clone(),
                    shared_subscription_available: Some(1),
                    subscription_identifiers_available: Some(1),
                    wildcard_subscription_available: Some(1),
                    session_expiry_interval: p.session_expiry_secs,
                    // Absent means available (§3.2.2.3.5).
                    retain_available: (!p.retain_available).then_some(0),
                    reason_string: None,
                    user_properties: Vec::new(),
                    server_keep_alive: p.server_keep_alive,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                };
                let ack = v5::ConnAck {
                    session_present: p.session_present,
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

    /// PUBACK with an MQTT 5 reason (0 = success; 3.1.1 has no reasons). Any code is
    /// sent as given (0x10 no matching subscribers, 0x87, 0x90, 0x97, 0x99, ...).
    pub fn puback(&self, out: &mut BytesMut, pkid: u16, reason: u8) {
        self.ack(out, 0x40, pkid, reason);
    }

    /// PUBREC for a client's QoS 2 PUBLISH: received (0x00, 0x10) or refused (>= 0x80;
    /// the exchange ends there, no PUBREL follows).
    pub fn pubrec(&self, out: &mut BytesMut, pkid: u16, reason: u8) {
        self.ack(out, 0x50, pkid, reason);
    }

    /// PUBREL for our QoS 2 PUBLISH after the client's PUBREC (0x92 when we no longer
    /// know the packet id, e.g. after a session was lost).
    pub fn pubrel(&self, out: &mut BytesMut, pkid: u16, reason: u8) {
        self.ack(out, 0x62, pkid, reason);
    }

    /// PUBCOMP answering the client's PUBREL (0x92 when the packet id is unknown).
    pub fn pubcomp(&self, out: &mut BytesMut, pkid: u16, reason: u8) {
        self.ack(out, 0x70, pkid, reason);
    }

    /// The four acknowledgements share one shape, encoded by hand so every reason code
    /// goes out as given (rumqttc's enums cannot carry some, and would turn an unknown
    /// one into another). 3.1.1: packet id only. 5.0: the short form for success
    /// (§3.4.2.1), else the reason without a property length (allowed when the
    /// Remaining Length is below 4, §3.4.2.2.1).
    fn ack(&self, out: &mut BytesMut, byte1: u8, pkid: u16, reason: u8) {
        let [hi, lo] = pkid.to_be_bytes();
        if self.version == Version::V5 && reason != 0 {
            self.put_raw(out, &[byte1, 3, hi, lo, reason]);
        } else {
            self.put_raw(out, &[byte1, 2, hi, lo]);
        }
    }

    /// Appends a small fixed packet if the client accepts its size.
    fn put_raw(&self, out: &mut BytesMut, packet: &[u8]) {
        if packet.len() <= self.max_out as usize {
            out.extend_from_slice(packet);
        }
    }

    /// SUBACK, one answer per filter. 3.1.1 has a single failure code (0x80).
    pub fn suback(&self, out: &mut BytesMut, pkid: u16, granted: &[Granted]) {
        match self.version {
            Version::V4 => {
                use rumqttc::mqttbytes::QoS;
                let codes = granted
                    .iter()
                    .map(|g| match g {
                        Granted::Qos(0) => v4::SubscribeReasonCode::Success(QoS::AtMostOnce),
                        Granted::Qos(1) => v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                        Granted::Qos(_) => v4::SubscribeReasonCode::Success(QoS::ExactlyOnce),
                        _ => v4::SubscribeReasonCode::Failure,
                    })
                    .collect();
                self.put(out, |o| v4::SubAck::new(pkid, codes).write(o));
            }
            Version::V5 => {
                use rumqttc::v5::mqttbytes::QoS;
                let return_codes = granted
                    .iter()
                    .map(|g| match g {
                        Granted::Qos(0) => v5::SubscribeReasonCode::Success(QoS::AtMostOnce),
                        Granted::Qos(1) => v5::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                        Granted::Qos(_) => v5::SubscribeReasonCode::Success(QoS::ExactlyOnce),
                        Granted::Unspecified => v5::SubscribeReasonCode::Unspecified,
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

    /// UNSUBACK. 5.0 answers each filter: 0x00 removed, 0x11 no such subscription
    /// (`existed[i]` false). 3.1.1 has no per-filter answer.
    pub fn unsuback(&self, out: &mut BytesMut, pkid: u16, existed: &[bool]) {
        match self.version {
            Version::V4 => {
                self.put(out, |o| v4::UnsubAck::new(pkid).write(o));
            }
            Version::V5 => {
                let ack = v5::UnsubAck {
                    pkid,
                    reasons: existed
                        .iter()
                        .map(|&e| {
                            if e {
                                v5::UnsubAckReason::Success
                            } else {
                                v5::UnsubAckReason::NoSubscriptionExisted
                            }
                        })
                        .collect(),
                    properties: None,
                };
                self.put(out, |o| ack.write(o));
            }
        }
    }

    /// Outbound PUBLISH (delivery to a subscriber), encoded straight into `out`: this is
    /// the fan-out hot path, so no intermediate `Publish`, `String` or `Vec` per send.
    /// Returns false and writes nothing when the packet would exceed the client's
    /// Maximum Packet Size (MQTT 5 §3.1.2.11.4: the server discards it instead, as if
    /// delivered), or cannot be encoded at all (a string over 65,535 bytes, a
    /// subscription id out of range, a body over 268,435,455 bytes, QoS > 2, or a
    /// packet id of 0 at QoS > 0; the last two are caller bugs).
    /// 3.1.1 sends no properties; 5.0 sends, in this order, payload format indicator,
    /// message expiry, content type, response topic, correlation data, one subscription
    /// identifier per id, and the user properties.
    pub fn publish(&self, out: &mut BytesMut, p: &OutPublish) -> bool {
        debug_assert!(
            p.qos <= 2 && (p.qos == 0 || p.pkid != 0),
            "qos {} pkid {}",
            p.qos,
            p.pkid
        );
        if p.qos > 2 || (p.qos > 0 && p.pkid == 0) || p.topic.len() > usize::from(u16::MAX) {
            return false;
        }
        // An empty topic needs an alias to stand for it, and 3.1.1 has none (§3.3.2.1).
        if (p.topic.is_empty() || p.topic_alias.is_some())
            && (self.version == Version::V4 || p.topic_alias.is_none_or(|a| a == 0 || a > self.alias_out))
        {
            return false;
        }
        let props_len = match self.version {
            Version::V4 => None,
            Version::V5 => match publish_props_len(p) {
                Some(n) => Some(n),
                None => return false,
            },
        };
        let mut remaining = 2 + p.topic.len() + p.payload.len();
        if p.qos > 0 {
            remaining += 2;
        }
        if let Some(n) = props_len {
            if n > MAX_REMAINING {
                return false;
            }
            remaining += vbi_len(n) + n;
        }
        if remaining > MAX_REMAINING || 1 + vbi_len(remaining) + remaining > self.max_out as usize {
            return false;
        }
        out.reserve(1 + vbi_len(remaining) + remaining);
        // DUP is always 0 at QoS 0 (MQTT-3.3.1-2).
        out.put_u8(0x30 | u8::from(p.dup && p.qos > 0) << 3 | p.qos << 1 | u8::from(p.retain));
        put_vbi(out, remaining);
        put_bytes(out, p.topic.as_bytes());
        if p.qos > 0 {
            out.put_u16(p.pkid);
        }
        if let Some(n) = props_len {
            put_vbi(out, n);
            let m = p.props;
            if let Some(f) = m.payload_format_indicator {
                out.put_u8(0x01);
                out.put_u8(f);
            }
            if let Some(e) = p.message_expiry_secs {
                out.put_u8(0x02);
                out.put_u32(e);
            }
            if let Some(a) = p.topic_alias {
                out.put_u8(0x23);
                out.put_u16(a);
            }
            if let Some(t) = &m.content_type {
                out.put_u8(0x03);
                put_bytes(out, t.as_bytes());
            }
            if let Some(t) = &m.response_topic {
                out.put_u8(0x08);
                put_bytes(out, t.as_bytes());
            }
            if let Some(d) = &m.correlation_data {
                out.put_u8(0x09);
                put_bytes(out, d);
            }
            for &id in p.subscription_ids {
                out.put_u8(0x0B);
                put_vbi(out, id as usize);
            }
            for (k, v) in &m.user_properties {
                out.put_u8(0x26);
                put_bytes(out, k.as_bytes());
                put_bytes(out, v.as_bytes());
            }
        }
        out.extend_from_slice(p.payload);
        true
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
        if packet.len() <= self.max_out as usize {
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
            Ok(Some(Inbound::Disconnect {
                reason: 0,
                session_expiry_secs: None
            }))
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
        c.connack(
            &mut out,
            &ConnAckParams {
                receive_max: 10,
                topic_alias_max: 4,
                server_keep_alive: Some(1200),
                max_qos: 2,
                retain_available: true,
                ..ConnAckParams::default()
            },
        );
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

    fn v4c() -> Codec {
        Codec::new(Version::V4, 1 << 20)
    }

    fn v5c() -> Codec {
        Codec::new(Version::V5, 1 << 20)
    }

    fn decode_one(c: &Codec, bytes: &[u8]) -> Result<Inbound, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let p = c.decode(&mut buf).map(|p| p.expect("a whole packet"));
        assert!(buf.is_empty() || p.is_err(), "left over: {buf:?}");
        p
    }

    fn decode_err(c: &Codec, bytes: &[u8]) -> ProtocolError {
        match decode_one(c, bytes) {
            Err(e) => e,
            Ok(p) => panic!("{bytes:02x?} decoded as {p:?}"),
        }
    }

    /// A frame from a body (fixed header byte + remaining length + body).
    fn framed(byte1: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8(byte1);
        put_vbi(&mut out, body.len());
        out.extend_from_slice(body);
        out.to_vec()
    }

    #[test]
    fn v5_subscribe_with_options_and_identifier() {
        let body = [
            0x00,
            0x0A, // packet id 10
            0x02,
            0x0B,
            0x07, // properties: subscription identifier 7
            0x00,
            0x03,
            b'a',
            b'/',
            b'+',
            0b0010_1110, // retain handling 2, RAP, NL, QoS 2
            0x00,
            0x01,
            b'b',
            0x01, // QoS 1, no options
        ];
        let p = decode_one(&v5c(), &framed(0x82, &body)).expect("decodes");
        let Inbound::Subscribe {
            pkid,
            filters,
            subscription_id,
        } = p
        else {
            panic!("{p:?}")
        };
        assert_eq!((pkid, subscription_id), (10, Some(7)));
        assert_eq!(
            filters,
            vec![
                SubscribeFilter {
                    filter: "a/+".into(),
                    qos: 2,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
                SubscribeFilter {
                    filter: "b".into(),
                    qos: 1,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                },
            ]
        );
    }

    #[test]
    fn subscribe_refusals() {
        let sub = |props: &[u8], options: u8| {
            let mut body = vec![0x00, 0x01];
            body.extend_from_slice(props);
            body.extend_from_slice(&[0x00, 0x01, b'x', options]);
            framed(0x82, &body)
        };
        let e = decode_err(&v5c(), &sub(&[0x00], 0x30));
        assert_eq!(e.reason, 0x81, "retain handling 3: {e:?}");
        let e = decode_err(&v5c(), &sub(&[0x00], 0x41));
        assert_eq!(e.reason, 0x81, "reserved bit 6: {e:?}");
        let e = decode_err(&v5c(), &sub(&[0x02, 0x0B, 0x00], 0x01));
        assert_eq!((e.reason, e.label), (0x82, "subscription_id_zero"));
        let e = decode_err(&v5c(), &framed(0x82, &[0x00, 0x01, 0x00]));
        assert_eq!((e.reason, e.label), (0x82, "empty_subscribe"));
        let e = decode_err(&v5c(), &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'x', 0x00]);
        assert_eq!(e.reason, 0x81, "SUBSCRIBE flags must be 0b0010: {e:?}");
        let e = decode_err(
            &v5c(),
            &sub(&[0x00], 0x01)
                .iter()
                .enumerate()
                .map(|(i, b)| if i == 3 { 0 } else { *b })
                .collect::<Vec<_>>(),
        );
        assert_eq!(e.reason, 0x81, "packet id 0: {e:?}");

        // 3.1.1: only the QoS bits; the 5.0 options are reserved there.
        let v4_sub = |options: u8| framed(0x82, &[0x00, 0x01, 0x00, 0x01, b'x', options]);
        assert_eq!(decode_err(&v4c(), &v4_sub(0x04)).reason, 0x81);
        let e = decode_err(&v4c(), &framed(0x82, &[0x00, 0x01]));
        assert_eq!(e.label, "empty_subscribe");
        let p = decode_one(&v4c(), &v4_sub(0x02)).expect("decodes");
        let Inbound::Subscribe {
            filters,
            subscription_id: None,
            ..
        } = p
        else {
            panic!("{p:?}")
        };
        assert_eq!(
            (filters[0].qos, filters[0].no_local, filters[0].retain_handling),
            (2, false, 0)
        );

        for c in [v4c(), v5c()] {
            let body: &[u8] = if c.version == Version::V5 {
                &[0x00, 0x01, 0x00]
            } else {
                &[0x00, 0x01]
            };
            let e = decode_err(&c, &framed(0xA2, body));
            assert_eq!(e.label, "empty_unsubscribe", "{:?}", c.version);
        }
    }

    #[test]
    fn qos2_acks_both_versions() {
        for c in [v4c(), v5c()] {
            let v5 = c.version == Version::V5;
            let mut out = BytesMut::new();
            c.pubrec(&mut out, 0x1234, 0x10);
            c.pubrel(&mut out, 0x1234, 0x92);
            c.pubcomp(&mut out, 0x1234, 0x00);
            c.pubrec(&mut out, 0x0102, 0x00);
            let expected: &[u8] = if v5 {
                &[
                    0x50, 3, 0x12, 0x34, 0x10, 0x62, 3, 0x12, 0x34, 0x92, 0x70, 2, 0x12, 0x34, 0x50, 2, 1, 2,
                ]
            } else {
                &[
                    0x50, 2, 0x12, 0x34, 0x62, 2, 0x12, 0x34, 0x70, 2, 0x12, 0x34, 0x50, 2, 1, 2,
                ]
            };
            assert_eq!(&out[..], expected, "{:?}", c.version);

            // rumqttc (the client side) reads what we write.
            let mut check = out.clone();
            while !check.is_empty() {
                if v5 {
                    v5::Packet::read(&mut check, None).expect("rumqttc v5 reads it");
                } else {
                    v4::read(&mut check, 1 << 20).expect("rumqttc v4 reads it");
                }
            }

            // And our decoder reads the same shapes from a client.
            let r = |v: u8| if v5 { v } else { 0 };
            let mut buf = out;
            let mut got = Vec::new();
            while let Some(p) = c.decode(&mut buf).expect("decodes") {
                got.push(format!("{p:?}"));
            }
            assert_eq!(
                got,
                vec![
                    format!(
                        "{:?}",
                        Inbound::PubRec {
                            pkid: 0x1234,
                            reason: r(0x10)
                        }
                    ),
                    format!(
                        "{:?}",
                        Inbound::PubRel {
                            pkid: 0x1234,
                            reason: r(0x92)
                        }
                    ),
                    format!(
                        "{:?}",
                        Inbound::PubComp {
                            pkid: 0x1234,
                            reason: 0
                        }
                    ),
                    format!(
                        "{:?}",
                        Inbound::PubRec {
                            pkid: 0x0102,
                            reason: 0
                        }
                    ),
                ]
            );
        }
        // PUBREL with flags 0 is malformed (MQTT-3.6.1-1).
        assert_eq!(decode_err(&v5c(), &[0x60, 2, 0, 1]).reason, 0x81);
        assert_eq!(decode_err(&v4c(), &[0x60, 2, 0, 1]).reason, 0x81);
    }

    #[test]
    fn puback_codes_are_sent_as_given() {
        let c = v5c();
        for code in [0x00u8, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99, 0x9A] {
            let mut out = BytesMut::new();
            c.puback(&mut out, 5, code);
            if code == 0 {
                assert_eq!(&out[..], &[0x40, 2, 0, 5]);
            } else {
                assert_eq!(&out[..], &[0x40, 3, 0, 5, code]);
            }
        }
        let mut out = BytesMut::new();
        c.puback(&mut out, 5, 0x99);
        let p = v5::Packet::read(&mut out, None).expect("rumqttc reads it");
        assert!(matches!(p, v5::Packet::PubAck(a) if a.reason == v5::PubAckReason::PayloadFormatInvalid));
        let mut out = BytesMut::new();
        v4c().puback(&mut out, 5, 0x99);
        assert_eq!(&out[..], &[0x40, 2, 0, 5]);
    }

    #[test]
    fn disconnect_forms() {
        let c = v5c();
        let p = decode_one(&c, &[0xE0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0x0E, 0x10]).expect("decodes");
        assert!(
            matches!(
                p,
                Inbound::Disconnect {
                    reason: 0,
                    session_expiry_secs: Some(3600)
                }
            ),
            "{p:?}"
        );
        // Reason only, property length omitted (§3.14.2.2.1).
        let p = decode_one(&c, &[0xE0, 0x01, 0x04]).expect("decodes");
        assert!(matches!(
            p,
            Inbound::Disconnect {
                reason: 4,
                session_expiry_secs: None
            }
        ));
        // The same with a (non-minimal) two-byte Remaining Length.
        let p = decode_one(&c, &[0xE0, 0x81, 0x00, 0x04]).expect("decodes");
        assert!(matches!(p, Inbound::Disconnect { reason: 4, .. }), "{p:?}");
        assert_eq!(decode_err(&c, &[0xE0, 0x01, 0x05]).reason, 0x81, "unknown reason");
        assert_eq!(decode_err(&c, &[0xE1, 0x00]).reason, 0x81, "reserved flags");
        let p = decode_one(&v4c(), &[0xE0, 0x00]).expect("decodes");
        assert!(matches!(
            p,
            Inbound::Disconnect {
                reason: 0,
                session_expiry_secs: None
            }
        ));
    }

    fn params() -> ConnAckParams {
        ConnAckParams {
            session_present: true,
            receive_max: 20,
            topic_alias_max: 8,
            assigned: Some("auto-1".into()),
            server_keep_alive: Some(60),
            max_qos: 2,
            session_expiry_secs: Some(86_400),
            retain_available: true,
        }
    }

    fn v5_connack(c: &Codec, p: &ConnAckParams) -> v5::ConnAck {
        let mut out = BytesMut::new();
        c.connack(&mut out, p);
        match v5::Packet::read(&mut out, None) {
            Ok(v5::Packet::ConnAck(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connack_both_versions() {
        let mut out = BytesMut::new();
        v4c().connack(&mut out, &params());
        assert_eq!(&out[..], &[0x20, 0x02, 0x01, 0x00]);
        let mut out = BytesMut::new();
        v4c().connack(
            &mut out,
            &ConnAckParams {
                session_present: false,
                ..params()
            },
        );
        assert_eq!(&out[..], &[0x20, 0x02, 0x00, 0x00]);

        let c = Codec::new(Version::V5, 4096);
        let a = v5_connack(&c, &params());
        assert!(a.session_present);
        assert_eq!(a.code, v5::ConnectReturnCode::Success);
        let props = a.properties.expect("properties");
        assert_eq!(props.max_qos, None, "2 is the default and not sent");
        assert_eq!(props.retain_available, None, "available is the default");
        assert_eq!(props.receive_max, Some(20));
        assert_eq!(props.topic_alias_max, Some(8));
        assert_eq!(props.max_packet_size, Some(4096));
        assert_eq!(props.assigned_client_identifier.as_deref(), Some("auto-1"));
        assert_eq!(props.server_keep_alive, Some(60));
        assert_eq!(props.session_expiry_interval, Some(86_400));
        assert_eq!(props.shared_subscription_available, Some(1));
        assert_eq!(props.subscription_identifiers_available, Some(1));
        assert_eq!(props.wildcard_subscription_available, Some(1));

        let p = ConnAckParams {
            session_present: false,
            max_qos: 1,
            retain_available: false,
            session_expiry_secs: None,
            assigned: None,
            server_keep_alive: None,
            ..params()
        };
        let a = v5_connack(&c, &p);
        assert!(!a.session_present);
        let props = a.properties.expect("properties");
        assert_eq!(props.max_qos, Some(1));
        assert_eq!(props.retain_available, Some(0));
        assert_eq!(props.session_expiry_interval, None);
        assert_eq!(props.assigned_client_identifier, None);
        assert_eq!(props.server_keep_alive, None);
        let p = ConnAckParams { max_qos: 0, ..p };
        assert_eq!(v5_connack(&c, &p).properties.and_then(|p| p.max_qos), Some(0));
    }

    #[test]
    fn suback_qos2_and_unspecified() {
        let granted = [
            Granted::Qos(0),
            Granted::Qos(1),
            Granted::Qos(2),
            Granted::Unspecified,
        ];
        let mut out = BytesMut::new();
        v4c().suback(&mut out, 3, &granted);
        assert_eq!(&out[..], &[0x90, 6, 0, 3, 0x00, 0x01, 0x02, 0x80]);
        let mut out = BytesMut::new();
        v5c().suback(&mut out, 3, &granted);
        assert_eq!(&out[..], &[0x90, 7, 0, 3, 0, 0x00, 0x01, 0x02, 0x80]);
    }

    #[test]
    fn unsuback_reasons() {
        let mut out = BytesMut::new();
        v5c().unsuback(&mut out, 9, &[true, false]);
        assert_eq!(&out[..], &[0xB0, 5, 0, 9, 0, 0x00, 0x11]);
        let mut out = BytesMut::new();
        v4c().unsuback(&mut out, 9, &[true, false]);
        assert_eq!(&out[..], &[0xB0, 2, 0, 9]);
    }

    fn full_props() -> MessageProperties {
        MessageProperties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("replies/vin-1".into()),
            correlation_data: Some(Bytes::from_static(b"\x00corr")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        }
    }

    #[test]
    fn outbound_publish_round_trips_v5() {
        let props = full_props();
        for size in [0usize, 5, 200, 20_000] {
            for qos in 0..=2u8 {
                let payload = Bytes::from(vec![0xA5u8; size]);
                let ids = [7u32, 128, 268_435_455];
                let p = OutPublish {
                    topic: "vehicles/vin-1/commands/unlock",
                    payload: &payload,
                    qos,
                    retain: qos == 1,
                    dup: qos == 2,
                    pkid: 0x0203,
                    props: &props,
                    message_expiry_secs: Some(30),
                    subscription_ids: &ids,
                    topic_alias: None,
                };
                let mut out = BytesMut::from(&b"prefix"[..]);
                assert!(v5c().publish(&mut out, &p));
                let _ = out.split_to(6);
                let written = out.len();
                let Ok(v5::Packet::Publish(got)) = v5::Packet::read(&mut out, None) else {
                    panic!("not a PUBLISH");
                };
                assert!(out.is_empty(), "exactly one frame");
                assert_eq!(&got.topic[..], p.topic.as_bytes());
                assert_eq!(got.payload, payload);
                assert_eq!((qos5_u8(got.qos), got.retain, got.dup), (qos, qos == 1, qos == 2));
                assert_eq!(got.pkid, if qos > 0 { 0x0203 } else { 0 });
                let gp = got.properties.expect("properties");
                assert_eq!(gp.payload_format_indicator, Some(1));
                assert_eq!(gp.message_expiry_interval, Some(30));
                assert_eq!(gp.content_type, props.content_type);
                assert_eq!(gp.response_topic, props.response_topic);
                assert_eq!(gp.correlation_data, props.correlation_data);
                assert_eq!(gp.user_properties, props.user_properties);
                assert_eq!(gp.subscription_identifiers, vec![7, 128, 268_435_455]);
                assert_eq!(gp.topic_alias, None);

                // The Maximum Packet Size is a hard limit: one byte less and nothing is written.
                let exact = Codec {
                    max_out: written as u32,
                    ..v5c()
                };
                let mut out = BytesMut::new();
                assert!(exact.publish(&mut out, &p));
                assert_eq!(out.len(), written);
                let short = Codec {
                    max_out: written as u32 - 1,
                    ..v5c()
                };
                let mut out = BytesMut::from(&b"kept"[..]);
                assert!(!short.publish(&mut out, &p));
                assert_eq!(&out[..], b"kept");
            }
        }
    }

    #[test]
    fn outbound_publish_without_properties() {
        let empty = MessageProperties::default();
        let payload = Bytes::from_static(b"hi");
        let p = OutPublish {
            topic: "t",
            payload: &payload,
            qos: 0,
            retain: false,
            dup: false,
            pkid: 0,
            props: &empty,
            message_expiry_secs: None,
            subscription_ids: &[],
            topic_alias: None,
        };
        let mut out = BytesMut::new();
        assert!(v5c().publish(&mut out, &p));
        assert_eq!(&out[..], &[0x30, 6, 0, 1, b't', 0, b'h', b'i']);
        let mut out = BytesMut::new();
        assert!(v4c().publish(&mut out, &p));
        assert_eq!(&out[..], &[0x30, 5, 0, 1, b't', b'h', b'i']);
        // Caller bugs write nothing.
        let mut out = BytesMut::new();
        assert!(!v5c().publish(
            &mut out,
            &OutPublish {
                subscription_ids: &[0],
                ..p
            }
        ));
        let long = "x".repeat(70_000);
        assert!(!v4c().publish(&mut out, &OutPublish { topic: &long, ..p }));
        assert!(out.is_empty());
    }

    /// A Topic Alias is written as property 0x23, with the topic (setting it) or with an
    /// empty topic (using it); never beyond what the client allowed, never in 3.1.1.
    #[test]
    fn outbound_publish_topic_alias() {
        let empty = MessageProperties::default();
        let payload = Bytes::from_static(b"hi");
        let p = OutPublish {
            topic: "vehicles/v1/commands",
            payload: &payload,
            qos: 1,
            retain: false,
            dup: false,
            pkid: 9,
            props: &empty,
            message_expiry_secs: None,
            subscription_ids: &[],
            topic_alias: Some(2),
        };
        let codec = Codec {
            alias_out: 2,
            ..v5c()
        };
        for topic in ["vehicles/v1/commands", ""] {
            let mut out = BytesMut::new();
            assert!(codec.publish(&mut out, &OutPublish { topic, ..p }));
            let Ok(v5::Packet::Publish(got)) = v5::Packet::read(&mut out, None) else {
                panic!("not a PUBLISH");
            };
            assert_eq!(&got.topic[..], topic.as_bytes());
            assert_eq!(got.properties.expect("properties").topic_alias, Some(2));
            assert_eq!((got.pkid, &got.payload[..]), (9, &b"hi"[..]));
        }
        let mut out = BytesMut::new();
        for refused in [
            OutPublish {
                topic_alias: Some(3),
                ..p
            },
            OutPublish {
                topic_alias: Some(0),
                ..p
            },
            OutPublish {
                topic: "",
                topic_alias: None,
                ..p
            },
        ] {
            assert!(!codec.publish(&mut out, &refused));
        }
        assert!(!Codec {
            alias_out: 2,
            ..v4c()
        }
        .publish(&mut out, &p));
        assert!(!v5c().publish(&mut out, &p), "the client allowed no alias");
        assert!(out.is_empty());
    }

    #[test]
    fn outbound_publish_round_trips_v4() {
        let props = full_props();
        for size in [0usize, 200, 20_000] {
            for qos in 0..=2u8 {
                let payload = Bytes::from(vec![0x5Au8; size]);
                let p = OutPublish {
                    topic: "a/b",
                    payload: &payload,
                    qos,
                    retain: true,
                    dup: qos > 0,
                    pkid: 77,
                    props: &props,
                    message_expiry_secs: Some(30),
                    subscription_ids: &[1, 2],
                    topic_alias: None,
                };
                let mut out = BytesMut::new();
                assert!(v4c().publish(&mut out, &p));
                let written = out.len();
                let body = 2 + 3 + usize::from(qos > 0) * 2 + size;
                assert_eq!(written, 1 + vbi_len(body) + body, "no properties in 3.1.1");
                let Ok(v4::Packet::Publish(got)) = v4::read(&mut out, 1 << 20) else {
                    panic!("not a PUBLISH");
                };
                assert!(out.is_empty());
                assert_eq!((got.topic.as_str(), &got.payload), ("a/b", &payload));
                assert_eq!((qos_u8(got.qos), got.retain, got.dup), (qos, true, qos > 0));
                assert_eq!(got.pkid, if qos > 0 { 77 } else { 0 });
                let short = Codec {
                    max_out: written as u32 - 1,
                    ..v4c()
                };
                let mut out = BytesMut::new();
                assert!(!short.publish(&mut out, &p));
                assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn v5_publish_properties_decoded_and_subscription_id_refused() {
        let props = v5::PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(9),
            topic_alias: Some(2),
            response_topic: Some("r".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: vec![("a".into(), "b".into())],
            subscription_identifiers: Vec::new(),
            content_type: Some("text/plain".into()),
        };
        let mut publish = v5::Publish::new("t/1", rumqttc::v5::mqttbytes::QoS::ExactlyOnce, "x", Some(props));
        publish.pkid = 4;
        let mut out = BytesMut::new();
        publish.write(&mut out).expect("encodes");
        let p = decode_one(&v5c(), &out).expect("decodes");
        let Inbound::Publish(p) = p else { panic!("{p:?}") };
        assert_eq!(
            (p.qos, p.pkid, p.topic_alias, p.message_expiry_secs),
            (2, 4, Some(2), Some(9))
        );
        assert_eq!(
            p.props,
            MessageProperties {
                payload_format_indicator: Some(1),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("a".into(), "b".into())],
            }
        );

        let mut with_id = publish.clone();
        if let Some(pp) = with_id.properties.as_mut() {
            pp.subscription_identifiers = vec![3];
        }
        let mut out = BytesMut::new();
        with_id.write(&mut out).expect("encodes");
        let e = decode_err(&v5c(), &out);
        assert_eq!((e.reason, e.label), (0x82, "subscription_id_from_client"));
    }

    #[test]
    fn v5_connect_will_properties_and_session_expiry() {
        let mut connect = v5::Connect {
            keep_alive: 30,
            client_id: "vin-1".into(),
            clean_start: false,
            properties: Some(v5::ConnectProperties::new()),
        };
        if let Some(p) = connect.properties.as_mut() {
            p.session_expiry_interval = Some(600);
        }
        let will = v5::LastWill::new(
            "vehicles/vin-1/status",
            "offline",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            Some(v5::LastWillProperties {
                delay_interval: Some(15),
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(3600),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"id")),
                user_properties: vec![("u".into(), "p".into())],
            }),
        );
        let mut out = BytesMut::new();
        connect.write(&Some(will), &None, &mut out).expect("encodes");
        let p = decode_one(&v5c(), &out).expect("decodes");
        let Inbound::Connect(req) = p else { panic!("{p:?}") };
        assert_eq!(req.session_expiry_secs, Some(600));
        let w = req.will.expect("will");
        assert_eq!(
            (w.topic.as_str(), &w.payload[..], w.qos, w.retain),
            ("vehicles/vin-1/status", &b"offline"[..], 1, true)
        );
        assert_eq!((w.delay_interval_secs, w.message_expiry_secs), (15, Some(3600)));
        assert_eq!(
            w.props,
            MessageProperties {
                payload_format_indicator: Some(1),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"id")),
                user_properties: vec![("u".into(), "p".into())],
            }
        );

        // 3.1.1: the will has defaults for what 3.1.1 cannot say.
        let mut connect = v4::Connect::new("vin-1");
        connect.last_will = Some(v4::LastWill::new(
            "w",
            "bye",
            rumqttc::mqttbytes::QoS::AtMostOnce,
            false,
        ));
        let mut out = BytesMut::new();
        connect.write(&mut out).expect("encodes");
        let p = decode_one(&v4c(), &out).expect("decodes");
        let Inbound::Connect(req) = p else { panic!("{p:?}") };
        assert_eq!(req.session_expiry_secs, None);
        let w = req.will.expect("will");
        assert_eq!((w.delay_interval_secs, w.message_expiry_secs), (0, None));
        assert!(w.props.is_empty());
    }
}
