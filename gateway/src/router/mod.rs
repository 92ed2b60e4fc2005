//! The router: which sessions on this gateway a PUBLISH reaches.
//!
//! (Being built: the subscription trie in `trie.rs`, the retained-message index in
//! `retained.rs`.)

use serde::{Deserialize, Serialize};

/// A subscription's options (MQTT 5 §3.8.3.1; 3.1.1 has only the QoS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubOptions {
    /// Granted QoS: a message is delivered at min(its QoS, this).
    pub qos: u8,
    /// Do not deliver the subscriber's own publishes (never set on shared subscriptions).
    pub no_local: bool,
    /// Keep the RETAIN flag as published (otherwise it is cleared on live delivery).
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
    /// MQTT 5 Subscription Identifier, echoed in every PUBLISH this subscription matches.
    pub id: Option<u32>,
}

impl SubOptions {
    pub fn qos(qos: u8) -> Self {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id: None,
        }
    }
}

pub mod retained;
pub mod trie;
