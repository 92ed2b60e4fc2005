//! MQTT on the wire: framing, the version-neutral packets the session works with, and
//! the encoders for what the gateway sends. Parsing itself is rumqttc's `mqttbytes`
//! (v4 for 3.1.1, v5 for 5.0); this module adds what it lacks on the server side
//! (protocol sniffing, AUTH, short v5 DISCONNECT, fixed-header flags, reserved
//! subscription option bits, topic validation) and hand-encodes the outbound PUBLISH.

pub mod codec;
pub mod packet;

pub use codec::{Codec, ConnAckParams, Framing, OutPublish};
pub use packet::{ConnectRequest, Inbound, ProtocolError, PublishRequest, SubscribeFilter, Version, Will};
