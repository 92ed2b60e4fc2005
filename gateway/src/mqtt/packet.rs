//! Version-neutral packets as the session sees them.

use bytes::Bytes;

use crate::message::MessageProperties;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

#[derive(Debug, Clone, Default)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval: how long after the connection ends the will waits
    /// (a reconnect within it cancels the will, §3.1.3.2.2). 0 when absent and in 3.1.1.
    pub delay_interval_secs: u32,
    /// MQTT 5 Message Expiry Interval of the will message once published; `None` = never.
    pub message_expiry_secs: Option<u32>,
    /// MQTT 5 will properties forwarded with the will message (§3.1.3.2); defaults in 3.1.1.
    pub props: MessageProperties,
}

#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// MQTT 5: how many QoS>0 PUBLISHes the client accepts unacknowledged.
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet the client accepts from us.
    pub max_packet_size: Option<u32>,
    /// MQTT 5: how many topic aliases the client accepts from us.
    pub topic_alias_max: Option<u16>,
    /// MQTT 5 enhanced authentication; not supported (CONNACK 0x8C).
    pub auth_method: Option<String>,
    /// MQTT 5 Session Expiry Interval: how long the session outlives the connection
    /// (0xFFFFFFFF = never expires). `None` when absent (meaning 0) and in 3.1.1, where
    /// Clean Session alone decides.
    pub session_expiry_secs: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// Empty when an MQTT 5 topic alias stands in for the topic.
    pub topic: String,
    pub pkid: u16,
    pub payload: Bytes,
    pub topic_alias: Option<u16>,
    /// MQTT 5 Message Expiry Interval as the publisher set it; `None` = never expires.
    pub message_expiry_secs: Option<u32>,
    /// MQTT 5 properties forwarded unchanged to subscribers (and to Kafka); empty in 3.1.1.
    pub props: MessageProperties,
}

/// One topic filter of a SUBSCRIBE with its MQTT 5 Subscription Options (§3.8.3.1).
/// 3.1.1 filters carry only the QoS; the options are then false / 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    pub filter: String,
    /// Maximum QoS the subscriber asked for (0..=2).
    pub qos: u8,
    /// Do not send the subscriber its own publishes on this subscription.
    pub no_local: bool,
    /// Keep the RETAIN flag as published instead of clearing it on forwarded messages.
    pub retain_as_published: bool,
    /// When retained messages are sent: 0 at subscribe, 1 only if the subscription is
    /// new, 2 never (3 is malformed and refused by the decoder).
    pub retain_handling: u8,
}

#[derive(Debug, Clone)]
pub enum Inbound {
    Connect(Box<ConnectRequest>),
    Publish(PublishRequest),
    /// The client's acknowledgement of our QoS 1 PUBLISH (`reason` >= 0x80: it did
    /// not accept it, MQTT 5 §3.4.2.1). 3.1.1: 0.
    PubAck {
        pkid: u16,
        reason: u8,
    },
    /// The client received our QoS 2 PUBLISH (`reason` >= 0x80: it refused it). 3.1.1: 0.
    PubRec {
        pkid: u16,
        reason: u8,
    },
    /// The client releases its QoS 2 PUBLISH: we may deliver it and answer PUBCOMP.
    /// `reason` 0x92 = the client lost the packet id. 3.1.1: 0.
    PubRel {
        pkid: u16,
        reason: u8,
    },
    /// The client finished our QoS 2 PUBLISH; its packet id is free again. 3.1.1: 0.
    PubComp {
        pkid: u16,
        reason: u8,
    },
    Subscribe {
        pkid: u16,
        /// Never empty (an empty SUBSCRIBE is a protocol error).
        filters: Vec<SubscribeFilter>,
        /// MQTT 5 Subscription Identifier, sent back with every message this SUBSCRIBE's
        /// filters match. Never `Some(0)` (a protocol error). `None` in 3.1.1.
        subscription_id: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        /// MQTT 5: the client changes its Session Expiry Interval on the way out
        /// (§3.14.2.2.2; a protocol error if CONNECT had 0, which the session checks).
        session_expiry_secs: Option<u32>,
    },
    /// MQTT 5 AUTH (enhanced authentication), not supported.
    Auth,
    /// A server-to-client packet (CONNACK, SUBACK, ...) sent by a client.
    ServerOnly,
}

/// Why a connection is ended for what its peer sent. `reason` is the MQTT 5 reason
/// code of the DISCONNECT (or CONNACK) we send before closing; `label` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct ProtocolError {
    pub reason: u8,
    pub label: &'static str,
    pub detail: String,
}

impl ProtocolError {
    pub fn malformed(detail: impl Into<String>) -> Self {
        ProtocolError {
            reason: 0x81,
            label: "malformed_packet",
            detail: detail.into(),
        }
    }
    pub fn protocol(label: &'static str, detail: impl Into<String>) -> Self {
        ProtocolError {
            reason: 0x82,
            label,
            detail: detail.into(),
        }
    }
    pub fn too_large(size: usize, max: usize) -> Self {
        ProtocolError {
            reason: 0x95,
            label: "packet_too_large",
            detail: format!("packet of {size} bytes exceeds the maximum of {max}"),
        }
    }
    pub fn topic_invalid(detail: impl Into<String>) -> Self {
        ProtocolError {
            reason: 0x90,
            label: "topic_invalid",
            detail: detail.into(),
        }
    }
}
