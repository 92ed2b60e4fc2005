//! An application message as it travels inside the gateway: from the publishing
//! session through the router to every matching subscriber, into the offline queue
//! and the retained store.
//!
//! Invariants:
//! - One `Arc<Message>` per PUBLISH, shared by every subscriber it reaches: the payload
//!   (`Bytes`, reference-counted) is never copied per subscriber.
//! - Times are wall-clock milliseconds, so a message kept in the store across a restart
//!   keeps its expiry: the Message Expiry Interval sent to a subscriber is what is left
//!   of the publisher's interval after the time spent in the gateway (MQTT 5 §3.3.2.3.3).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// MQTT 5 PUBLISH properties that are forwarded unchanged to subscribers (§3.3.2.3).
/// Topic alias and subscription identifiers are per connection and are not here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl MessageProperties {
    pub fn is_empty(&self) -> bool {
        *self == MessageProperties::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// QoS the publisher used; a subscriber gets min(this, its granted QoS).
    pub qos: u8,
    /// RETAIN flag as published (subscribers see it only with Retain As Published, or
    /// when the message is sent because of a subscription to a retained topic).
    pub retain: bool,
    pub props: MessageProperties,
    /// When the gateway received it (wall clock, ms).
    pub received_at_ms: u64,
    /// When it expires (wall clock, ms), from the MQTT 5 Message Expiry Interval.
    pub expires_at_ms: Option<u64>,
}

impl Message {
    /// Whether the message expired at `now_ms` (an expired message is not delivered).
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }

    /// The Message Expiry Interval to send now: what is left, rounded up, at least 1.
    pub fn remaining_expiry_secs(&self, now_ms: u64) -> Option<u32> {
        self.expires_at_ms
            .map(|t| (t.saturating_sub(now_ms).div_ceil(1000)).clamp(1, u64::from(u32::MAX)) as u32)
    }

    /// Bytes this message accounts for in queue and retained bounds.
    pub fn weight(&self) -> usize {
        let p = &self.props;
        let props = p.content_type.as_ref().map_or(0, String::len)
            + p.response_topic.as_ref().map_or(0, String::len)
            + p.correlation_data.as_ref().map_or(0, |c| c.len())
            + p.user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 16)
                .sum::<usize>();
        self.topic.len() + self.payload.len() + props + 64
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_decremented_and_rounded_up() {
        let m = Message {
            topic: "t".into(),
            payload: Bytes::new(),
            qos: 1,
            retain: false,
            props: MessageProperties::default(),
            received_at_ms: 1_000,
            expires_at_ms: Some(11_000),
        };
        assert_eq!(m.remaining_expiry_secs(1_000), Some(10));
        assert_eq!(m.remaining_expiry_secs(5_500), Some(6));
        assert!(!m.expired(10_999));
        assert!(m.expired(11_000));
    }
}
