//! Version-neutral packets as the session sees them.

use bytes::Bytes;

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
    /// MQTT 5 enhanced authentication; not supported (CONNACK 0x8C).
    pub auth_method: Option<String>,
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
    pub content_type: Option<String>,
    pub message_expiry_secs: Option<u32>,
    pub user_properties: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub enum Inbound {
    Connect(Box<ConnectRequest>),
    Publish(PublishRequest),
    PubAck(u16),
    /// PUBREC / PUBREL / PUBCOMP: QoS 2 flow, which this gateway does not offer.
    QoS2Flow,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
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
