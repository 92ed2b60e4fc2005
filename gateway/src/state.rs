//! What every connection task and the admin API share: configuration, the journal,
//! the session registry, the router and the store. Kept apart from `server` (which
//! assembles it) so that `session`, `router` and `admin` depend on this module and not
//! on each other.

use std::sync::Arc;

use bridge::producer::{BridgeControl, BridgeStatus};
use bridge::routes::Routes;
use bridge::{FullPolicy, SegmentedJournal};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::commands::Commands;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::router::Router;
use crate::store::Store;

/// What every connection task shares.
pub struct Shared {
    pub cfg: Arc<Config>,
    /// `gateway.id`, or the host name, resolved once at start (events name it; a host
    /// renamed while running does not split this process's events between two ids).
    pub gateway_id: Box<str>,
    pub journal: Arc<SegmentedJournal>,
    pub auth: Arc<Auth>,
    /// Every session this gateway holds, online or offline, by client id.
    pub registry: Registry,
    /// Subscriptions and retained messages: where a PUBLISH goes on this gateway.
    pub router: Router,
    /// The sled store: persistent sessions, their queues, retained messages.
    pub store: Arc<Store>,
    pub metrics: Metrics,
    /// Cancelled on SIGTERM/SIGINT: sessions drain and say goodbye (MQTT 5: 0x8B).
    pub shutdown: CancellationToken,
    pub routes: Arc<Routes>,
    pub full_policy: FullPolicy,
    pub bridge: Arc<BridgeStatus>,
    /// The Kafka bootstrap in use (the mock cluster's address when embedded).
    pub bootstrap: String,
    pub embedded: bool,
    /// Bearer token of `/api/v1` (from `admin.token`); empty = none (loopback only).
    pub admin_token: String,
    /// Re-drives parked records through the running pipeline (admin API).
    pub bridge_control: BridgeControl,
    /// Where the pipeline keeps records Kafka refused for good (`<journal.dir>/parked`).
    pub parked_dir: std::path::PathBuf,
    /// Commands to vehicles and their outcomes.
    pub commands: Commands,
    /// Operator replays of delivered records (admin API, `POST /api/v1/replay`).
    pub replays: Arc<bridge::replay::Replays>,
    /// The set-up gate (`mqtt.max_concurrent_setups`, see `session::gate`).
    pub setups: Arc<crate::session::gate::Gate>,
    /// Every connection's keep-alive deadline, on one clock (see `session::keepalive`).
    pub keep_alive: Arc<crate::session::keepalive::KeepAlive>,
}

impl Shared {
    pub fn journal_stopped(&self) -> bool {
        self.journal.append_would_fail()
    }
}
