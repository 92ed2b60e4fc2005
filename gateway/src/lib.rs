//! The gateway: everything that faces a vehicle or an operator.
//!
//! Data path, in module order: [`server`] binds listeners ([`tls`] for TLS) and hands
//! each connection to [`session`], which speaks MQTT through [`mqtt`], checks
//! [`auth`], and appends to the journal (`bridge::journal`) before acknowledging.
//! [`registry`] resolves client-id takeovers; [`router`] delivers to subscribers;
//! [`commands`] brings commands to vehicles and their outcomes back; [`admin`] serves
//! operators.

/// The git commit this binary was built from (`unknown` without `.git`).
pub const BUILD_COMMIT: &str = env!("EDGE_GATEWAY_COMMIT");

pub mod admin;
pub mod auth;
pub mod certs;
pub mod commands;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod mqtt;
pub mod registry;
pub mod router;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod tls;
pub use bridge::topic;
