//! `gateway.toml`: defaults, then the file, then `GATEWAY_<SECTION>__<KEY>` environment
//! variables. Unknown keys are rejected; cross-field rules are checked by [`Config::validate`]
//! and every problem is reported with the key that causes it and how to fix it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One problem with the configuration, tied to the key that causes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `mqtt.max_packet_size`.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found; `Display` prints one per line.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invalid configuration ({}):", self.source_name)?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gateway: GatewaySection,
    pub mqtt: MqttSection,
    pub tls: TlsSection,
    pub journal: JournalSection,
    pub kafka: KafkaSection,
    pub admin: AdminSection,
    pub auth: AuthSection,
    pub sessions: SessionsSection,
    pub retained: RetainedSection,
    pub presence: PresenceSection,
    pub commands: CommandsSection,
    pub log: LogSection,
    pub routes: Vec<RouteEntry>,
}

/// `[log]`: how the gateway writes its log and exports its traces. The filter comes
/// from `RUST_LOG` (default `info`) and changes at run time (`PUT /api/v1/log-level`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `human` (a line per event) or `json` (a JSON object per line, for log shippers).
    pub format: LogFormat,
    /// OTLP/HTTP collector for traces, e.g. `http://otel-collector:4318`; empty: no
    /// export. Needs a gateway built with `--features otlp`.
    pub otlp_endpoint: String,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// This gateway's name in the `gateway.id` Kafka header; empty = the host name.
    pub id: String,
    /// Time allowed on SIGTERM/SIGINT for sessions to drain and the journal to flush.
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// Plain-TCP listener; empty disables it.
    pub listen: String,
    /// TLS listener; empty disables it. Needs `tls.cert` and `tls.key`.
    pub tls_listen: String,
    /// Connections beyond this are closed right after accept (counted, logged).
    pub max_connections: usize,
    /// Largest MQTT packet accepted or sent, in bytes (whole packet).
    pub max_packet_size: u32,
    /// QoS1 PUBLISHes per session waiting for their PUBACK; advertised as MQTT 5
    /// Receive Maximum. Reading from a 3.1.1 client pauses at this bound.
    pub max_inflight: u16,
    /// Time a new connection has to complete its CONNECT.
    pub connect_timeout_secs: u64,
    /// Connection set-ups and goodbyes (TLS handshake, CONNECT, presence events) that run
    /// at the same moment; the rest wait their turn without holding the CPU, so that a
    /// reconnect storm does not stall the vehicles already connected. A set-up waiting
    /// for its peer holds no slot. 0 = half the CPU cores, at least 1.
    pub max_concurrent_setups: usize,
    /// MQTT 5 Topic Alias Maximum advertised to clients; 0 refuses topic aliases.
    pub topic_alias_max: u16,
    /// Topic aliases the gateway uses on deliveries to an MQTT 5 client that allows them
    /// (its CONNECT's Topic Alias Maximum caps it): a vehicle's command topic is then
    /// sent once per connection, then as two bytes. 0 never sends aliases.
    pub outbound_topic_aliases: u16,
    /// Topic filters one session may hold; further SUBSCRIBE filters are refused
    /// (MQTT 5 SUBACK 0x97, 3.1.1 0x80) so that a client cannot grow its state without bound.
    pub max_subscriptions: usize,
    /// Longest keep alive a client may ask for, in seconds. A client keep alive of 0
    /// ("never time out") or above this is capped to it: MQTT 5 clients are told through
    /// the CONNACK Server Keep Alive, 3.1.1 clients are closed after 1.5 × this silence.
    pub max_keep_alive_secs: u16,
    /// PUBLISH packets per second one connection may send, averaged over a one-second
    /// burst; beyond it the session stops reading its socket until the rate allows
    /// (TCP back-pressure, never a drop). Keeps one flat-out client from taking the
    /// journal's capacity from the fleet. 0 = unlimited.
    pub max_publish_rate: u32,
    /// Highest QoS the gateway grants and accepts (CONNACK Maximum QoS): 0, 1 or 2.
    pub max_qos: u8,
    /// Which client ids are accepted: "any" (any UTF-8 id without NUL up to
    /// `max_client_id_len` bytes, as the specification allows) or "strict" (letters,
    /// digits and `- _ . :` only).
    pub client_id_policy: ClientIdPolicy,
    /// Longest client id accepted, in bytes.
    pub max_client_id_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIdPolicy {
    Any,
    Strict,
}

/// What happens when a session's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueOverflow {
    /// The oldest queued message is dropped (counted) to make room.
    DropOldest,
    /// The new message is not queued for this session (counted).
    RefuseNew,
}

/// `[sessions]`: persistent sessions and their queues (kept in the sled store).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsSection {
    /// Directory of the sled store (sessions, subscriptions, queues, retained
    /// messages); empty = `<journal.dir>/store`, so one volume holds all state.
    pub store_dir: PathBuf,
    /// Longest session expiry granted to an MQTT 5 client, and the expiry of a 3.1.1
    /// session with clean session = 0, in seconds.
    pub max_expiry_secs: u32,
    /// QoS 1/2 messages one session may hold (in flight + queued), online or offline.
    pub max_queued_messages: usize,
    /// Bytes (topic + payload) one session's queue may hold.
    pub max_queued_bytes: usize,
    /// QoS 1/2 messages all sessions together may hold, applied to offline sessions
    /// (0: no gateway-wide bound).
    pub max_total_queued_messages: usize,
    /// Their bytes (message weight, each session's copy counted; 0: no bound).
    pub max_total_queued_bytes: usize,
    /// When a session's queue (or the gateway-wide bound) is full: "drop_oldest" or
    /// "refuse_new" (both counted).
    pub queue_overflow: QueueOverflow,
    /// QoS 0 messages waiting to be written to one connection; beyond it they are
    /// dropped for that subscriber (counted).
    pub max_outbound_qos0: usize,
    /// How often expired sessions are looked for.
    pub expiry_check_secs: u64,
}

/// `[retained]`: retained messages (kept in the sled store).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetainedSection {
    /// Retain Available: false refuses retained publishes (MQTT 5 0x9A; 3.1.1 closes).
    pub enabled: bool,
    /// Retained messages kept at once; a new topic beyond it is not retained (counted).
    pub max_messages: usize,
    /// Bytes (topic + payload) of retained messages kept at once.
    pub max_bytes: usize,
}

/// `[presence]`: connected / disconnected events, journaled like telemetry and written
/// to Kafka keyed by client id, so a consumer sees a vehicle's presence in order with
/// its messages.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceSection {
    pub enabled: bool,
    pub kafka_topic: String,
}

/// `[commands]`: commands to vehicles from a Kafka topic (and the admin API), and the
/// topic their outcomes are written to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsSection {
    /// Consume `kafka_topic` (the REST and MQTT sources work either way).
    pub enabled: bool,
    /// Commands: key = client id, value = payload; optional headers (see README).
    pub kafka_topic: String,
    /// Consumer group; `{gateway_id}` is replaced by this gateway's id. Every gateway
    /// of a region reads every command in its own group and acts for the sessions it
    /// holds.
    pub consumer_group: String,
    /// MQTT topic a command is published to; `{client_id}` is the vehicle.
    pub mqtt_topic: String,
    /// QoS of a command that does not say (header `qos`).
    pub default_qos: u8,
    /// Expiry of a command that does not say (header `expiry_secs`); 0 = none.
    pub default_expiry_secs: u32,
    /// Where every command's outcome goes (JSON keyed by client id).
    pub outcome_topic: String,
    /// Commands taken from Kafka and not settled yet (acknowledged, durably queued or
    /// final); beyond it the consumer pauses.
    pub max_pending: usize,
    /// Whether this gateway reports `unknown_vehicle` for a command to a vehicle it
    /// holds no session for. With several gateways in a region, exactly one should
    /// (the others stay silent for vehicles they do not hold).
    pub report_unknown: bool,
    /// Several gateways serve the region: follow the presence topic, so that commands
    /// queued here follow a vehicle that moved to another gateway, and the reporter
    /// knows which vehicles other gateways hold. Needs `[presence] enabled`.
    pub many_gateways: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    pub cert: String,
    pub key: String,
    /// PEM bundle of CAs; when set, every TLS client must present a certificate.
    pub client_ca: String,
    pub handshake_timeout_secs: u64,
    /// With client certificates: the MQTT client id must equal the certificate identity.
    pub require_client_id_match: bool,
    /// Where the vehicle identity is read from: "cn", "san" (first DNS or URI SAN), or
    /// "cn_or_san" (either matches).
    pub identity: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSection {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// When `max_bytes` is reached: "backpressure" (default), "reject", "drop_oldest".
    pub full_policy: String,
    /// Released segments are kept this long for `POST /api/v1/replay` (measured from
    /// their last record); 0 keeps nothing.
    pub replay_retention_secs: u64,
    /// Cap on the bytes of kept released segments, outside `max_bytes`; the oldest go first.
    pub replay_retention_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSection {
    /// "embedded" (dev-only in-process mock cluster) or a broker list `host:port,...`.
    pub bootstrap: String,
    /// none, gzip, snappy, lz4, zstd.
    pub compression: String,
    pub linger_ms: u64,
    pub batch_bytes: u64,
    /// Records produced and not yet confirmed by Kafka.
    pub max_inflight: usize,
    /// Records Kafka refuses for good (too large, not authorised) go here; empty parks
    /// them in the journal instead.
    pub dead_letter_topic: String,
    /// Messages no `[[routes]]` entry matches: "default_topic" or "refuse".
    pub unmatched: String,
    pub default_topic: String,
    /// Partitions of each topic in the embedded cluster.
    pub embedded_partitions: i32,
    /// Records Kafka refused for good that may be parked (kept for re-drive) at once.
    pub max_parked: usize,
    /// Records in flight and no delivery report for this long while a fresh client gets
    /// metadata from the brokers: the producer is rebuilt (replaying from the journal).
    /// 0 turns the watchdog off.
    pub stall_rebuild_secs: u64,
    /// librdkafka properties passed through verbatim (SASL, SSL, ...); values are strings.
    pub properties: BTreeMap<String, String>,
}

/// `[[routes]]`: MQTT topic filter → Kafka topic and key template.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    pub mqtt: String,
    pub kafka_topic: String,
    #[serde(default = "default_key")]
    pub key: String,
}

fn default_key() -> String {
    "{client_id}".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// REST API and `/metrics`; empty disables it.
    pub listen: String,
    /// Bearer token required on `/api/*`; empty means no authentication, which is only
    /// allowed on a loopback `listen`. Resolve with [`Config::admin_token`].
    pub token: String,
    /// File holding the bearer token (trimmed), e.g. a mounted secret; excludes `token`.
    pub token_file: String,
    /// Concurrent admin HTTP connections; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Time an admin request (headers and body) may take before it is cut.
    pub request_timeout_secs: u64,
    /// `/metrics`, `/healthz` and `/readyz` answer without the token (what scrapers and
    /// orchestrator probes expect). false: they need it too.
    pub open_probes: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    pub allow_anonymous: bool,
    /// Topic patterns a client may publish to; `{client_id}` is replaced by its id.
    pub publish_acl: Vec<String>,
    /// Topic filters a client may subscribe to; `{client_id}` as above.
    pub subscribe_acl: Vec<String>,
    pub users: Vec<User>,
    /// Argon2 password checks running at once (each takes one CPU for milliseconds);
    /// further CONNECTs wait for a slot within `mqtt.connect_timeout_secs`.
    pub max_concurrent_hashes: usize,
    /// CONNECT attempts per second from one source IP address (token bucket); 0 = unlimited.
    pub connect_rate_per_ip: u32,
    /// Bucket size of `connect_rate_per_ip`: attempts one address may make at once.
    pub connect_burst_per_ip: u32,
    /// CONNECT attempts per second over all addresses; 0 = unlimited (the default: size
    /// it to what a region's reconnect storm may cost).
    pub connect_rate_global: u32,
    /// Bucket size of `connect_rate_global`.
    pub connect_burst_global: u32,
    /// Whether clients without a per-user `allow_retain` may publish retained messages
    /// (within their publish ACL). False keeps vehicles from leaving retained state.
    pub allow_retain: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub username: String,
    /// PHC string, e.g. from `gateway hash-password` (argon2id). Never a plain password.
    pub password_hash: String,
    /// Client ids this user may connect as: exact ids or a prefix ending in `*`;
    /// `{username}` stands for the username. Absent: exactly the username.
    #[serde(default)]
    pub client_ids: Option<Vec<String>>,
    /// Operator users: their own publish ACL instead of `auth.publish_acl` (patterns,
    /// `{client_id}` allowed), e.g. `["vehicles/+/commands/#"]`.
    #[serde(default)]
    pub publish_acl: Option<Vec<String>>,
    /// Their own subscribe ACL instead of `auth.subscribe_acl`, e.g. `["vehicles/#"]`.
    #[serde(default)]
    pub subscribe_acl: Option<Vec<String>>,
    /// Whether this user may publish retained messages (default: `auth.allow_retain`).
    #[serde(default)]
    pub allow_retain: Option<bool>,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            id: String::new(),
            shutdown_grace_secs: 10,
        }
    }
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            listen: "127.0.0.1:1883".into(),
            tls_listen: String::new(),
            max_connections: 10_000,
            max_packet_size: 256 * 1024,
            max_inflight: 64,
            connect_timeout_secs: 10,
            max_concurrent_setups: 0,
            topic_alias_max: 16,
            outbound_topic_aliases: 16,
            max_subscriptions: 100,
            max_keep_alive_secs: 1200,
            max_publish_rate: 1000,
            max_qos: 2,
            client_id_policy: ClientIdPolicy::Any,
            max_client_id_len: 128,
        }
    }
}

impl Default for SessionsSection {
    fn default() -> Self {
        SessionsSection {
            store_dir: PathBuf::new(),
            max_expiry_secs: 7 * 24 * 3600,
            max_queued_messages: 1000,
            max_queued_bytes: 1024 * 1024,
            max_total_queued_messages: 5_000_000,
            max_total_queued_bytes: 2 << 30,
            queue_overflow: QueueOverflow::DropOldest,
            max_outbound_qos0: 1000,
            expiry_check_secs: 10,
        }
    }
}

impl Default for RetainedSection {
    fn default() -> Self {
        RetainedSection {
            enabled: true,
            max_messages: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for PresenceSection {
    fn default() -> Self {
        PresenceSection {
            enabled: true,
            kafka_topic: "vehicles.presence".into(),
        }
    }
}

impl Default for CommandsSection {
    fn default() -> Self {
        CommandsSection {
            enabled: true,
            kafka_topic: "vehicles.commands".into(),
            consumer_group: "edge-gateway-commands-{gateway_id}".into(),
            mqtt_topic: "vehicles/{client_id}/commands".into(),
            default_qos: 1,
            default_expiry_secs: 3600,
            outcome_topic: "vehicles.command-outcomes".into(),
            max_pending: 100_000,
            report_unknown: true,
            many_gateways: false,
        }
    }
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: String::new(),
            key: String::new(),
            client_ca: String::new(),
            handshake_timeout_secs: 10,
            require_client_id_match: true,
            identity: "cn_or_san".into(),
        }
    }
}

impl Default for JournalSection {
    fn default() -> Self {
        JournalSection {
            dir: PathBuf::from("./data/journal"),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            full_policy: "backpressure".into(),
            replay_retention_secs: 0,
            replay_retention_bytes: 1 << 30,
        }
    }
}

impl Default for KafkaSection {
    fn default() -> Self {
        KafkaSection {
            bootstrap: "embedded".into(),
            compression: "lz4".into(),
            linger_ms: 5,
            batch_bytes: 1 << 20,
            max_inflight: 100_000,
            dead_letter_topic: "vehicles.dead-letter".into(),
            unmatched: "default_topic".into(),
            default_topic: "vehicles.unrouted".into(),
            embedded_partitions: 4,
            max_parked: 10_000,
            stall_rebuild_secs: 60,
            properties: BTreeMap::new(),
        }
    }
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:8080".into(),
            token: String::new(),
            token_file: String::new(),
            max_connections: 64,
            request_timeout_secs: 10,
            open_probes: true,
        }
    }
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            allow_anonymous: false,
            publish_acl: vec!["vehicles/{client_id}/#".into()],
            subscribe_acl: vec!["vehicles/{client_id}/commands/#".into()],
            users: Vec::new(),
            max_concurrent_hashes: 2,
            connect_rate_per_ip: 100,
            connect_burst_per_ip: 1000,
            connect_rate_global: 0,
            connect_burst_global: 2000,
            allow_retain: true,
        }
    }
}

const ENV_PREFIX: &str = "GATEWAY_";

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Where the sled store lives (`sessions.store_dir`, default `<journal.dir>/store`).
    pub fn store_dir(&self) -> PathBuf {
        if self.sessions.store_dir.as_os_str().is_empty() {
            self.journal.dir.join("store")
        } else {
            self.sessions.store_dir.clone()
        }
    }

    /// Loads `path` (if it exists; a missing file given explicitly is an error) and
    /// applies the environment, then validates.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            problems: vec![problem("(file)", format!("cannot read {}: {e}", path.display()))],
        })?;
        Self::from_toml(&text, env, &source_name)
    }

    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        source_name: &str,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        };
        let mut value: toml::Table = toml::from_str(text).map_err(|e| {
            let key = e
                .span()
                .map(|s| line_of(text, s.start))
                .unwrap_or_else(|| "(syntax)".into());
            fail(vec![problem(key, e.message().to_string())])
        })?;
        let mut from_env = BTreeMap::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                return Err(fail(vec![problem(
                    name.clone(),
                    "environment overrides are GATEWAY_<SECTION>__<KEY>, e.g. GATEWAY_MQTT__LISTEN",
                )]));
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            // Numbers, booleans and arrays are written as in TOML; anything else is a string.
            let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.clone()));
            let table = value
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match table {
                toml::Value::Table(t) => {
                    t.insert(key.clone(), parsed);
                }
                _ => return Err(fail(vec![problem(section, "is not a section")])),
            }
            from_env.insert(format!("{section}.{key}"), name);
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
            let key = e.path().to_string();
            let origin = from_env
                .get(&key)
                .map(|v| format!(" (from environment variable {v})"))
                .unwrap_or_default();
            fail(vec![problem(key, format!("{}{origin}", e.inner().message()))])
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Cross-field rules. Returns every violation, not just the first.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let otlp = &self.log.otlp_endpoint;
        if !otlp.is_empty() {
            if !cfg!(feature = "otlp") {
                p.push(problem(
                    "log.otlp_endpoint",
                    "this gateway was built without OTLP export; build it with `cargo build --release -p gateway --features otlp`, or leave log.otlp_endpoint empty",
                ));
            } else if !(otlp.starts_with("http://") || otlp.starts_with("https://")) {
                p.push(problem(
                    "log.otlp_endpoint",
                    format!("{otlp:?} is not an http(s) URL; write e.g. \"http://otel-collector:4318\""),
                ));
            }
        }
        let m = &self.mqtt;
        let addr_ok = |key: &str, v: &str, p: &mut Vec<Problem>| {
            if !v.is_empty() && v.parse::<SocketAddr>().is_err() {
                p.push(problem(
                    key,
                    format!("{v:?} is not an address; write ip:port, e.g. \"0.0.0.0:1883\""),
                ));
            }
        };
        addr_ok("mqtt.listen", &m.listen, &mut p);
        addr_ok("mqtt.tls_listen", &m.tls_listen, &mut p);
        addr_ok("admin.listen", &self.admin.listen, &mut p);
        if m.listen.is_empty() && m.tls_listen.is_empty() {
            p.push(problem(
                "mqtt.listen",
                "both mqtt.listen and mqtt.tls_listen are empty; set at least one",
            ));
        }
        if m.max_connections == 0 {
            p.push(problem("mqtt.max_connections", "must be at least 1"));
        }
        if m.max_concurrent_setups > 65_535 {
            p.push(problem(
                "mqtt.max_concurrent_setups",
                "must be at most 65535 (0 = half the CPU cores; a few per core is plenty)",
            ));
        }
        if !(128..=268_435_455).contains(&m.max_packet_size) {
            p.push(problem(
                "mqtt.max_packet_size",
                "must be between 128 and 268435455 bytes",
            ));
        }
        if m.max_inflight == 0 {
            p.push(problem(
                "mqtt.max_inflight",
                "must be at least 1 (MQTT 5 Receive Maximum)",
            ));
        }
        if m.connect_timeout_secs == 0 {
            p.push(problem("mqtt.connect_timeout_secs", "must be at least 1"));
        }
        if m.topic_alias_max > MAX_TOPIC_ALIASES {
            p.push(problem(
                "mqtt.topic_alias_max",
                format!("must be at most {MAX_TOPIC_ALIASES} (each alias holds a topic per session)"),
            ));
        }
        if m.outbound_topic_aliases > MAX_OUTBOUND_TOPIC_ALIASES {
            p.push(problem(
                "mqtt.outbound_topic_aliases",
                format!(
                    "must be at most {MAX_OUTBOUND_TOPIC_ALIASES} (each alias holds a topic of up to 256 bytes per connection)"
                ),
            ));
        }
        if m.max_subscriptions == 0 {
            p.push(problem(
                "mqtt.max_subscriptions",
                "must be at least 1 (vehicles subscribe to their command topic)",
            ));
        }
        if m.max_keep_alive_secs == 0 {
            p.push(problem(
                "mqtt.max_keep_alive_secs",
                "must be at least 1 second; e.g. 1200 (20 minutes)",
            ));
        }
        if m.max_qos > 2 {
            p.push(problem("mqtt.max_qos", "must be 0, 1 or 2"));
        }
        if !(1..=65_535).contains(&m.max_client_id_len) {
            p.push(problem(
                "mqtt.max_client_id_len",
                "must be between 1 and 65535 bytes (MQTT strings are at most 65535 bytes)",
            ));
        }
        let s = &self.sessions;
        if s.max_queued_messages == 0 {
            p.push(problem(
                "sessions.max_queued_messages",
                "must be at least 1 (a session holds its unacknowledged messages here)",
            ));
        }
        if s.max_queued_bytes < 1024 {
            p.push(problem("sessions.max_queued_bytes", "must be at least 1024"));
        }
        if s.max_outbound_qos0 == 0 {
            p.push(problem("sessions.max_outbound_qos0", "must be at least 1"));
        }
        if s.expiry_check_secs == 0 {
            p.push(problem("sessions.expiry_check_secs", "must be at least 1"));
        }
        let t = &self.tls;
        if !m.tls_listen.is_empty() {
            for (key, v) in [("tls.cert", &t.cert), ("tls.key", &t.key)] {
                if v.is_empty() {
                    p.push(problem(
                        key,
                        "required when mqtt.tls_listen is set: path to a PEM file",
                    ));
                }
            }
        } else if !t.client_ca.is_empty() {
            p.push(problem(
                "tls.client_ca",
                "set, but mqtt.tls_listen is empty: client certificates need TLS",
            ));
        }
        if t.handshake_timeout_secs == 0 {
            p.push(problem("tls.handshake_timeout_secs", "must be at least 1"));
        }
        if !["cn", "san", "cn_or_san"].contains(&t.identity.as_str()) {
            p.push(problem(
                "tls.identity",
                format!("{:?} is not one of \"cn\", \"san\", \"cn_or_san\"", t.identity),
            ));
        }
        let j = &self.journal;
        if j.dir.as_os_str().is_empty() {
            p.push(problem("journal.dir", "must be a directory path"));
        }
        let min_segment = u64::from(m.max_packet_size) + 1024;
        if j.segment_bytes < min_segment.max(4096) {
            p.push(problem(
                "journal.segment_bytes",
                format!("must be at least mqtt.max_packet_size + 1024 = {min_segment} so any message fits"),
            ));
        }
        if j.max_bytes < j.segment_bytes.saturating_mul(2) {
            p.push(problem(
                "journal.max_bytes",
                format!(
                    "must be at least two segments (2 × journal.segment_bytes = {})",
                    j.segment_bytes.saturating_mul(2)
                ),
            ));
        }
        if j.replay_retention_secs > 0 && j.replay_retention_bytes < j.segment_bytes {
            p.push(problem(
                "journal.replay_retention_bytes",
                format!(
                    "must hold at least one segment (journal.segment_bytes = {}) when journal.replay_retention_secs \
                     is set, or nothing could be kept for replays",
                    j.segment_bytes
                ),
            ));
        }
        if self.kafka.bootstrap.trim().is_empty() {
            p.push(problem(
                "kafka.bootstrap",
                "must be \"embedded\" or a broker list like \"kafka-1:9092,kafka-2:9092\"",
            ));
        }
        let k = &self.kafka;
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&k.compression.as_str()) {
            p.push(problem(
                "kafka.compression",
                "must be one of none, gzip, snappy, lz4, zstd",
            ));
        }
        if k.max_inflight == 0 {
            p.push(problem("kafka.max_inflight", "must be at least 1"));
        }
        if !k.dead_letter_topic.is_empty() && !valid_kafka_topic(&k.dead_letter_topic) {
            p.push(problem(
                "kafka.dead_letter_topic",
                "Kafka topic names use [a-zA-Z0-9._-], at most 249 characters",
            ));
        }
        let topic_ok = |key: &str, t: &str, p: &mut Vec<Problem>| {
            if !valid_kafka_topic(t) {
                p.push(problem(
                    key,
                    format!("{t:?} is not a Kafka topic name: use [a-zA-Z0-9._-], at most 249 characters"),
                ));
            }
        };
        if self.presence.enabled {
            topic_ok("presence.kafka_topic", &self.presence.kafka_topic, &mut p);
        }
        let c = &self.commands;
        topic_ok("commands.outcome_topic", &c.outcome_topic, &mut p);
        if c.enabled {
            topic_ok("commands.kafka_topic", &c.kafka_topic, &mut p);
            if c.consumer_group.trim().is_empty() {
                p.push(problem(
                    "commands.consumer_group",
                    "must not be empty; e.g. \"edge-gateway-commands-{gateway_id}\"",
                ));
            }
        }
        if c.mqtt_topic.matches("{client_id}").count() != 1
            || c.mqtt_topic.contains(['+', '#'])
            || c.mqtt_topic.starts_with('$')
        {
            p.push(problem(
                "commands.mqtt_topic",
                format!(
                    "{:?} must be a topic name (no wildcards, not a $-topic) with {{client_id}} once, e.g. \"vehicles/{{client_id}}/commands\"",
                    c.mqtt_topic
                ),
            ));
        }
        if c.default_qos > 2 {
            p.push(problem("commands.default_qos", "must be 0, 1 or 2"));
        }
        if c.max_pending == 0 {
            p.push(problem("commands.max_pending", "must be at least 1"));
        }
        if c.many_gateways && !self.presence.enabled {
            p.push(problem(
                "commands.many_gateways",
                "needs [presence] enabled = true: gateways learn where vehicles are from the presence topic",
            ));
        }
        match k.unmatched.as_str() {
            "refuse" => {}
            "default_topic" if valid_kafka_topic(&k.default_topic) => {}
            "default_topic" => p.push(problem(
                "kafka.default_topic",
                "needed by kafka.unmatched = \"default_topic\": a Kafka topic name ([a-zA-Z0-9._-])",
            )),
            _ => p.push(problem(
                "kafka.unmatched",
                "must be \"default_topic\" or \"refuse\"",
            )),
        }
        if k.max_parked == 0 {
            p.push(problem("kafka.max_parked", "must be at least 1"));
        }
        if (1..60).contains(&k.stall_rebuild_secs) {
            p.push(problem(
                "kafka.stall_rebuild_secs",
                "must be 0 (never rebuild a silent producer) or at least 60: shorter would rebuild producers still inside librdkafka's request.timeout.ms and socket.connection.setup.timeout.ms (30 s each unless set)",
            ));
        }
        // Plugins add properties of their own (and loading them is the bridge's job).
        let plugins = k
            .properties
            .keys()
            .any(|key| key.trim().eq_ignore_ascii_case("plugin.library.paths"));
        for (key, value) in &k.properties {
            if let Some(why) = guarded_kafka_property(key) {
                p.push(problem(
                    format!("kafka.properties.{key}"),
                    format!("may not be overridden: {why}; remove it from [kafka.properties]"),
                ));
            } else if let Err(why) =
                bridge::producer::check_property(key, value)
                    .or_else(|e| if plugins { Ok(()) } else { Err(e) })
            {
                p.push(problem(
                    format!("kafka.properties.{key}"),
                    format!(
                        "librdkafka refuses it: {why}; fix or remove it in [kafka.properties] \
                         (librdkafka's CONFIGURATION.md lists the properties and their values)"
                    ),
                ));
            }
        }
        if !(1..=1000).contains(&k.embedded_partitions) {
            p.push(problem("kafka.embedded_partitions", "must be between 1 and 1000"));
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Err(e) = crate::topic::validate_filter(&r.mqtt) {
                p.push(problem(format!("routes[{i}].mqtt"), format!("{:?}: {e}", r.mqtt)));
            }
            if !valid_kafka_topic(&r.kafka_topic) {
                p.push(problem(
                    format!("routes[{i}].kafka_topic"),
                    format!(
                        "{:?}: Kafka topic names use [a-zA-Z0-9._-], at most 249 characters",
                        r.kafka_topic
                    ),
                ));
            }
            if let Err(e) = bridge::routes::validate_template(&r.key) {
                p.push(problem(format!("routes[{i}].key"), format!("{:?}: {e}", r.key)));
            }
        }
        self.gateway_topics_apart(&mut p);
        if !["backpressure", "reject", "drop_oldest"].contains(&self.journal.full_policy.as_str()) {
            p.push(problem(
                "journal.full_policy",
                "must be \"backpressure\", \"reject\" or \"drop_oldest\"",
            ));
        }
        let ad = &self.admin;
        if !ad.token.is_empty() && !ad.token_file.is_empty() {
            p.push(problem(
                "admin.token_file",
                "set together with admin.token: keep one of them (token_file for a mounted secret)",
            ));
        }
        if ad.token.is_empty() && ad.token_file.is_empty() && !admin_listen_is_private(&ad.listen) {
            p.push(problem(
                "admin.token",
                format!(
                    "empty while admin.listen = {:?} is reachable from other hosts: set admin.token \
                     (or admin.token_file), or listen on loopback (127.0.0.1:8080)",
                    ad.listen
                ),
            ));
        }
        if ad.max_connections == 0 {
            p.push(problem("admin.max_connections", "must be at least 1"));
        }
        if ad.request_timeout_secs == 0 {
            p.push(problem("admin.request_timeout_secs", "must be at least 1"));
        }
        let a = &self.auth;
        if a.max_concurrent_hashes == 0 {
            p.push(problem(
                "auth.max_concurrent_hashes",
                "must be at least 1 (password checks would never run)",
            ));
        }
        for (rate_key, rate, burst_key, burst) in [
            (
                "auth.connect_rate_per_ip",
                a.connect_rate_per_ip,
                "auth.connect_burst_per_ip",
                a.connect_burst_per_ip,
            ),
            (
                "auth.connect_rate_global",
                a.connect_rate_global,
                "auth.connect_burst_global",
                a.connect_burst_global,
            ),
        ] {
            if rate > 0 && burst == 0 {
                p.push(problem(
                    burst_key,
                    format!("must be at least 1 while {rate_key} = {rate} (0 would refuse every CONNECT)"),
                ));
            }
        }
        if !a.allow_anonymous && a.users.is_empty() && t.client_ca.is_empty() {
            p.push(problem(
                "auth.users",
                "no users, no client certificates and auth.allow_anonymous = false: nobody could connect",
            ));
        }
        for (i, u) in a.users.iter().enumerate() {
            if u.username.is_empty() {
                p.push(problem(format!("auth.users[{i}].username"), "must not be empty"));
            }
            match &u.client_ids {
                None if !u.username.is_empty() && !crate::auth::valid_client_id(&u.username) => {
                    p.push(problem(
                        format!("auth.users[{i}].client_ids"),
                        format!(
                            "absent, so the user may connect only as its username, but {:?} is not a valid \
                             client id (A-Z a-z 0-9 - _ . :): list the allowed ids, e.g. client_ids = [\"svc-*\"]",
                            u.username
                        ),
                    ));
                }
                None => {}
                Some(list) if list.is_empty() => p.push(problem(
                    format!("auth.users[{i}].client_ids"),
                    "is empty: the user could never connect; list ids or prefixes like \"bench-*\"",
                )),
                Some(list) => {
                    for (j, pat) in list.iter().enumerate() {
                        if let Err(e) = crate::auth::validate_client_id_pattern(pat) {
                            p.push(problem(
                                format!("auth.users[{i}].client_ids[{j}]"),
                                format!("{pat:?}: {e}"),
                            ));
                        }
                    }
                }
            }
            if argon2::PasswordHash::new(&u.password_hash).is_err() {
                p.push(problem(
                    format!("auth.users[{i}].password_hash"),
                    "is not a PHC password hash; create one with `gateway hash-password`",
                ));
            }
        }
        let mut acls = vec![
            ("auth.publish_acl".to_string(), &a.publish_acl, true),
            ("auth.subscribe_acl".to_string(), &a.subscribe_acl, false),
        ];
        for (i, u) in a.users.iter().enumerate() {
            if let Some(l) = &u.publish_acl {
                acls.push((format!("auth.users[{i}].publish_acl"), l, true));
            }
            if let Some(l) = &u.subscribe_acl {
                acls.push((format!("auth.users[{i}].subscribe_acl"), l, false));
            }
        }
        for (key, list, publish) in acls {
            for (i, pat) in list.iter().enumerate() {
                if let Err(e) = crate::topic::validate_filter(&pat.replace("{client_id}", "x")) {
                    p.push(problem(format!("{key}[{i}]"), format!("{pat:?}: {e}")));
                } else if publish && crate::topic::is_sys(pat) {
                    p.push(problem(
                        format!("{key}[{i}]"),
                        format!("{pat:?}: no client may publish under $SYS (the server's own tree); remove the entry"),
                    ));
                }
            }
        }
        p
    }
}

impl Config {
    /// The topics the gateway writes its own records to (presence events, commands
    /// handed over, outcomes) may receive no vehicle publish: a route, the default
    /// topic or the dead-letter topic naming one of them would let a vehicle forge a
    /// presence event (which `commands::region` trusts), a command or an outcome.
    /// They must differ from each other too, so that no consumer mistakes one for another.
    fn gateway_topics_apart(&self, p: &mut Vec<Problem>) {
        let mut owned: Vec<(&str, &str)> = vec![
            ("commands.kafka_topic", self.commands.kafka_topic.as_str()),
            ("commands.outcome_topic", self.commands.outcome_topic.as_str()),
        ];
        if self.presence.enabled {
            owned.push(("presence.kafka_topic", self.presence.kafka_topic.as_str()));
        }
        for (i, (key, topic)) in owned.iter().enumerate() {
            if let Some((other, _)) = owned[..i].iter().find(|(_, t)| t == topic) {
                p.push(problem(
                    *key,
                    format!(
                        "{topic:?} is also {other}: give each of the gateway's own topics a name of its own"
                    ),
                ));
            }
        }
        let k = &self.kafka;
        let mut vehicle: Vec<(String, &str)> = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("routes[{i}].kafka_topic"), r.kafka_topic.as_str()))
            .collect();
        if k.unmatched == "default_topic" {
            vehicle.push(("kafka.default_topic".into(), k.default_topic.as_str()));
        }
        if !k.dead_letter_topic.is_empty() {
            vehicle.push(("kafka.dead_letter_topic".into(), k.dead_letter_topic.as_str()));
        }
        for (key, topic) in vehicle {
            if let Some((owner, _)) = owned.iter().find(|(_, t)| *t == topic) {
                p.push(problem(
                    key,
                    format!(
                        "{topic:?} is {owner}, the gateway's own topic: a vehicle's publish there could pass \
                         for one of the gateway's records; route vehicle messages to another topic"
                    ),
                ));
            }
        }
    }

    /// Problems only visible on the machine that runs the gateway: files named by the
    /// configuration that do not exist. `check-config` and `run` both apply it.
    pub fn check_files(&self) -> Vec<Problem> {
        let t = &self.tls;
        let mut p = Vec::new();
        if !self.admin.token_file.is_empty() {
            if let Err(e) = self.admin_token() {
                p.push(e);
            }
        }
        if self.mqtt.tls_listen.is_empty() {
            return p;
        }
        for (key, v) in [
            ("tls.cert", &t.cert),
            ("tls.key", &t.key),
            ("tls.client_ca", &t.client_ca),
        ] {
            if !v.is_empty() && !Path::new(v).is_file() {
                p.push(problem(
                    key,
                    format!("file {v:?} does not exist or is not readable"),
                ));
            }
        }
        p
    }

    /// The admin bearer token: `admin.token`, or the trimmed content of
    /// `admin.token_file`; empty means none (validation allows that only on a loopback
    /// `admin.listen`). The integrator's admin server calls this once at start.
    pub fn admin_token(&self) -> Result<String, Problem> {
        let a = &self.admin;
        if a.token_file.is_empty() {
            return Ok(a.token.clone());
        }
        let text = std::fs::read_to_string(&a.token_file).map_err(|e| {
            problem(
                "admin.token_file",
                format!(
                    "cannot read {:?}: {e}; point it at a readable file holding the token",
                    a.token_file
                ),
            )
        })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(problem(
                "admin.token_file",
                format!("{:?} is empty: write the bearer token into it", a.token_file),
            ));
        }
        Ok(token)
    }

    /// [`Config::load`] plus [`Config::check_files`]: what `run` and `check-config` use.
    pub fn load_for_host(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let config = Self::load(path, env)?;
        let problems = config.check_files();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                source_name: path.display().to_string(),
                problems,
            })
        }
    }
}

/// Largest `mqtt.topic_alias_max`: each alias keeps a topic string per session.
pub const MAX_TOPIC_ALIASES: u16 = 1024;

/// Largest `mqtt.outbound_topic_aliases`: at most 64 topics of 256 bytes per connection
/// (16 KiB; a client that subscribes to its own publishes can fill the table), looked up
/// by a scan on every delivery.
pub const MAX_OUTBOUND_TOPIC_ALIASES: u16 = 64;

/// librdkafka properties that carry the delivery guarantees (invariants 2 and 3) or
/// that the gateway sizes itself; `[kafka.properties]` may not override them.
pub const GUARDED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    ("acks", "the gateway releases a record only after acks=all"),
    (
        "request.required.acks",
        "alias of acks; the gateway requires acks=all",
    ),
    (
        "enable.idempotence",
        "the idempotent producer keeps each vehicle's order",
    ),
    (
        "message.timeout.ms",
        "0 makes librdkafka retry forever instead of timing a record out and re-sending it out of order",
    ),
    (
        "delivery.timeout.ms",
        "alias of message.timeout.ms, which the gateway sets to 0",
    ),
    (
        "max.in.flight.requests.per.connection",
        "the idempotent producer needs at most 5 for per-vehicle order",
    ),
    ("max.in.flight", "alias of max.in.flight.requests.per.connection"),
    ("retries", "a record must be retried until Kafka confirms it"),
    ("message.send.max.retries", "alias of retries"),
    (
        "enable.gapless.guarantee",
        "it turns a retriable error into a fatal producer error; the gateway handles order itself",
    ),
    (
        "queue.buffering.max.messages",
        "the gateway sizes the producer queue from kafka.max_inflight",
    ),
    // The command consumer reads with these same properties (invariant 5).
    (
        "enable.auto.commit",
        "command offsets are committed only after the vehicle acknowledged or the command settled",
    ),
    (
        "enable.auto.offset.store",
        "command offsets are stored only after the vehicle acknowledged or the command settled",
    ),
    (
        "group.id",
        "the command consumer's group is [commands] consumer_group (the many-gateways rule depends on it)",
    ),
    (
        "group.instance.id",
        "the gateway sets static membership from its consumer group",
    ),
    (
        "auto.offset.reset",
        "a new group starts at the oldest command so that stale ones end as expired, not skipped unseen",
    ),
    (
        "transactional.id",
        "the gateway's producer is idempotent, not transactional",
    ),
];

fn guarded_kafka_property(key: &str) -> Option<&'static str> {
    GUARDED_KAFKA_PROPERTIES
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key.trim()))
        .map(|(_, why)| *why)
}

/// Whether an admin listener is reachable only from this host (or disabled).
fn admin_listen_is_private(listen: &str) -> bool {
    listen.is_empty()
        || listen
            .parse::<SocketAddr>()
            .map(|a| a.ip().is_loopback())
            // Unparseable: reported under admin.listen already.
            .unwrap_or(true)
}

fn valid_kafka_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Config {
    /// The routing table the session (refusals) and the producer (destinations) share.
    pub fn routing(&self) -> bridge::routes::Routes {
        use bridge::routes::{Route, Routes, Unmatched};
        Routes {
            routes: self
                .routes
                .iter()
                .map(|r| Route {
                    mqtt: r.mqtt.clone(),
                    kafka_topic: r.kafka_topic.clone(),
                    key: r.key.clone(),
                })
                .collect(),
            unmatched: if self.kafka.unmatched == "refuse" {
                Unmatched::Refuse
            } else {
                Unmatched::DefaultTopic(self.kafka.default_topic.clone())
            },
            events: bridge::routes::EventTopics {
                presence: self.presence.enabled.then(|| self.presence.kafka_topic.clone()),
                outcomes: Some(self.commands.outcome_topic.clone()),
                commands: self.commands.enabled.then(|| self.commands.kafka_topic.clone()),
            },
        }
    }

    pub fn full_policy(&self) -> bridge::FullPolicy {
        match self.journal.full_policy.as_str() {
            "reject" => bridge::FullPolicy::Reject,
            "drop_oldest" => bridge::FullPolicy::DropOldest,
            _ => bridge::FullPolicy::Backpressure,
        }
    }

    /// `gateway.id`, or the host name when empty.
    pub fn gateway_id(&self) -> String {
        if !self.gateway.id.is_empty() {
            return self.gateway.id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "gateway".into())
    }
}

fn line_of(text: &str, offset: usize) -> String {
    let line = text[..offset.min(text.len())].matches('\n').count() + 1;
    let content = text.lines().nth(line - 1).unwrap_or("").trim();
    format!("line {line} ({content})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_toml(text, env, "test")
    }

    #[test]
    fn environment_overrides_file() {
        let c = parse(
            "[mqtt]\nlisten = \"127.0.0.1:1000\"\n[auth]\nallow_anonymous = true\n",
            &[
                ("GATEWAY_MQTT__LISTEN", "0.0.0.0:1883"),
                ("GATEWAY_MQTT__MAX_INFLIGHT", "10"),
            ],
        )
        .expect("valid");
        assert_eq!(c.mqtt.listen, "0.0.0.0:1883");
        assert_eq!(c.mqtt.max_inflight, 10);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[mqtt]\nlisn = \"x\"\n", &[]).expect_err("unknown key");
        assert_eq!(e.problems[0].key, "mqtt.lisn");
        let e = parse("[auth]\nallow_anonymous = true\n", &[("GATEWAY_MQTT__PORT", "1")])
            .expect_err("unknown env key");
        assert!(e.problems[0].message.contains("GATEWAY_MQTT__PORT"), "{e}");
    }

    /// ACL entries are checked where the gateway reads them: operators' own lists too,
    /// and a publish entry under `$SYS` (which no client may publish to) is refused
    /// rather than silently never matching.
    #[test]
    fn acl_entries_are_checked_and_sys_publish_refused() {
        let e = parse(
            "[mqtt]\noutbound_topic_aliases = 65\n[auth]\nallow_anonymous = true\npublish_acl = [\"$SYS/#\"]\n\
             [[auth.users]]\nusername = \"ops\"\npassword_hash = \"x\"\nclient_ids = [\"ops\"]\n\
             publish_acl = [\"a/#/b\"]\nsubscribe_acl = [\"$SYS/#\"]\n",
            &[],
        )
        .expect_err("invalid");
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "mqtt.outbound_topic_aliases",
            "auth.publish_acl[0]",
            "auth.users[0].publish_acl[0]",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert!(!keys.contains(&"auth.users[0].subscribe_acl[0]"), "{keys:?}");
        assert!(e.to_string().contains("no client may publish under $SYS"), "{e}");
    }

    #[test]
    fn all_cross_field_problems_are_reported() {
        let e = parse(
            "[mqtt]\nmax_packet_size = 10\ntls_listen = \"0.0.0.0:8883\"\n[journal]\nmax_bytes = 1\n",
            &[],
        )
        .expect_err("invalid");
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "mqtt.max_packet_size",
            "tls.cert",
            "tls.key",
            "journal.max_bytes",
            "auth.users",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn defaults_of_the_hardening_keys() {
        let c = parse("[auth]\nallow_anonymous = true\n", &[]).expect("valid");
        assert_eq!(c.mqtt.max_subscriptions, 100);
        assert_eq!(c.mqtt.max_keep_alive_secs, 1200);
        assert_eq!(c.auth.max_concurrent_hashes, 2);
        assert_eq!(
            (c.auth.connect_rate_per_ip, c.auth.connect_burst_per_ip),
            (100, 1000)
        );
        assert_eq!(
            (c.auth.connect_rate_global, c.auth.connect_burst_global),
            (0, 2000)
        );
        assert_eq!((c.admin.max_connections, c.admin.request_timeout_secs), (64, 10));
        assert_eq!(c.kafka.max_parked, 10_000);
        assert_eq!(c.kafka.stall_rebuild_secs, 60);
        assert_eq!(c.admin_token(), Ok(String::new()));
    }

    /// A watchdog shorter than a request timeout would rebuild healthy producers.
    #[test]
    fn a_short_stall_rebuild_is_refused_by_name() {
        let e = parse(
            "[kafka]
stall_rebuild_secs = 5
[auth]
allow_anonymous = true
",
            &[],
        )
        .expect_err("too short");
        assert_eq!(e.problems[0].key, "kafka.stall_rebuild_secs", "{e}");
        assert!(e.problems[0].message.contains("request.timeout.ms"), "{e}");
        for ok in [0, 60, 600] {
            let text = format!(
                "[kafka]
stall_rebuild_secs = {ok}
[auth]
allow_anonymous = true
"
            );
            assert!(parse(&text, &[]).is_ok(), "{ok} is valid");
        }
    }

    #[test]
    fn guarded_kafka_properties_are_refused_by_name() {
        let e = parse(
            "[kafka.properties]\n\"enable.idempotence\" = \"false\"\n\"Message.Timeout.Ms\" = \"5000\"\n\
             \"sasl.username\" = \"u\"\n[auth]\nallow_anonymous = true\n",
            &[],
        )
        .expect_err("guarded");
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "kafka.properties.Message.Timeout.Ms",
                "kafka.properties.enable.idempotence"
            ]
        );
        assert!(e.problems[1].message.contains("order"), "{e}");
        for (key, _) in GUARDED_KAFKA_PROPERTIES {
            let text = format!("[kafka.properties]\n\"{key}\" = \"1\"\n[auth]\nallow_anonymous = true\n");
            assert!(parse(&text, &[]).is_err(), "{key} must be refused");
        }
    }

    /// A typo or a bad value in `[kafka.properties]` is refused at load, naming the key
    /// (it used to start and fail the bridge). Valid ones, SASL/SSL included, pass.
    #[test]
    fn kafka_properties_librdkafka_refuses_are_named() {
        let e = parse(
            "[kafka.properties]\n\"compression.type\" = \"bogus\"\n\"compresion.codec\" = \"lz4\"\n\
             \"sasl.pasword\" = \"s3cret\"\n[auth]\nallow_anonymous = true\n",
            &[],
        )
        .expect_err("bad properties");
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "kafka.properties.compresion.codec",
                "kafka.properties.compression.type",
                "kafka.properties.sasl.pasword"
            ],
            "{e}"
        );
        assert!(e.problems[1].message.contains("bogus"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        parse(
            "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\
             \"sasl.username\" = \"u\"\n\"sasl.password\" = \"p\"\n\"ssl.ca.location\" = \"/etc/ssl/certs/ca-certificates.crt\"\n\
             [auth]\nallow_anonymous = true\n",
            &[],
        )
        .expect("SASL_SSL properties");
    }

    #[test]
    fn admin_token_rules_and_token_file() {
        // Empty token on a public listener: refused, naming admin.token and the fix.
        let e = parse(
            "[admin]\nlisten = \"0.0.0.0:8080\"\n[auth]\nallow_anonymous = true\n",
            &[],
        )
        .expect_err("public without token");
        assert_eq!(e.problems[0].key, "admin.token");
        assert!(e.problems[0].message.contains("127.0.0.1"), "{e}");
        // Loopback (v4 or v6) without a token is fine.
        for listen in ["127.0.0.1:8080", "[::1]:8080", ""] {
            let text = format!("[admin]\nlisten = \"{listen}\"\n[auth]\nallow_anonymous = true\n");
            parse(&text, &[]).expect("loopback or disabled");
        }
        // A token file on a public listener: read and trimmed.
        let dir = std::env::temp_dir().join(format!("gw-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, "  s3cret-token\n").expect("write");
        let text = format!(
            "[admin]\nlisten = \"0.0.0.0:8080\"\ntoken_file = \"{}\"\n[auth]\nallow_anonymous = true\n",
            file.display()
        );
        let c = parse(&text, &[]).expect("token file");
        assert_eq!(c.admin_token(), Ok("s3cret-token".to_string()));
        assert!(c.check_files().is_empty());
        std::fs::write(&file, "\n").expect("write");
        assert_eq!(
            c.admin_token().map_err(|p| p.key),
            Err("admin.token_file".to_string())
        );
        std::fs::remove_file(&file).expect("rm");
        let missing = c.check_files();
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].key, "admin.token_file");
        let _ = std::fs::remove_dir(&dir);
        // Both set: refused.
        let e = parse(
            "[admin]\ntoken = \"a\"\ntoken_file = \"/x\"\n[auth]\nallow_anonymous = true\n",
            &[],
        )
        .expect_err("both");
        assert_eq!(e.problems[0].key, "admin.token_file");
    }
}
