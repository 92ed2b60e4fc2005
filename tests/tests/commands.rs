//! Commands from a Kafka topic to vehicles, against a real Apache Kafka broker and the real
//! gateway binary: a command produced to `[commands] kafka_topic` (key = client id, value
//! = payload, headers `qos`, `expiry_secs`, `correlation_id`, `response_topic`,
//! `content_type`, others → MQTT 5 user properties) reaches the vehicle on
//! `vehicles/{client_id}/commands`, and every command ends in exactly one final outcome
//! record on `[commands] outcome_topic` (plus `queued` while it waits in an offline
//! persistent session). The consumer group's committed offset never passes a command the
//! vehicle has not acknowledged and that is not durably queued (DESIGN.md, invariant 5).
//!
//! The tests of this file share one broker (started by the first test, stopped when the
//! last one is done); each test has its own topics (`<test>.commands`, one partition,
//! and `<test>.outcomes`) and its own gateway id, so its own consumer group.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::Read;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use integration::kafka::Kafka;
use integration::Gateway;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

// ---------------------------------------------------------------------------------------
// One broker for the whole file.

static BROKER: Mutex<Weak<Kafka>> = Mutex::new(Weak::new());

/// The shared broker; started by the first caller, stopped when the last holder drops it.
fn broker() -> Arc<Kafka> {
    let mut slot = BROKER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = slot.upgrade() {
        return k;
    }
    let k = Arc::new(Kafka::start());
    *slot = Arc::downgrade(&k);
    k
}

// ---------------------------------------------------------------------------------------
// A test's topics, producer and gateway configuration.

struct Env {
    kafka: Arc<Kafka>,
    name: String,
    commands: String,
    outcomes: String,
    producer: FutureProducer,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn new(name: &str) -> Env {
        let kafka = broker();
        let commands = format!("{name}.commands");
        let outcomes = format!("{name}.outcomes");
        kafka.create_topic(&commands, 1);
        kafka.create_topic(&outcomes, 1);
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap())
            .set("message.timeout.ms", "15000")
            .create()
            .expect("producer");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Env {
            kafka,
            name: name.to_string(),
            commands,
            outcomes,
            producer,
            rt,
        }
    }

    fn gateway_id(&self) -> String {
        format!("gw-{}", self.name)
    }

    /// The consumer group the gateway uses by default: `edge-gateway-commands-{gateway_id}`.
    fn group(&self) -> String {
        format!("edge-gateway-commands-{}", self.gateway_id())
    }

    /// `commands` is more keys of the `[commands]` section, `extra` more sections.
    fn config_text(&self, journal: &Path, commands: &str, extra: &str) -> String {
        let sections = format!(
            "[kafka]\nbootstrap = \"{b}\"\nlinger_ms = 5\ndead_letter_topic = \"\"\n\
             [commands]\nkafka_topic = \"{c}\"\noutcome_topic = \"{o}\"\n{commands}\
             [auth]\nallow_anonymous = true\n\
             {extra}\
             [[routes]]\nmqtt = \"vehicles/+/telemetry\"\nkafka_topic = \"{n}.telemetry\"\n",
            b = self.kafka.bootstrap(),
            n = self.name,
            c = self.commands,
            o = self.outcomes,
        );
        integration::config(journal, &sections).replacen(
            "[gateway]\n",
            &format!("[gateway]\nid = \"{}\"\n", self.gateway_id()),
            1,
        )
    }

    /// Starts a gateway with this test's topics; `extra` is more TOML (whole sections).
    fn start_gateway(&self, extra: &str) -> Gateway {
        self.start_gateway_with("", extra)
    }

    /// As [`Env::start_gateway`], with more `[commands]` keys.
    fn start_gateway_with(&self, commands: &str, extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        let text = self.config_text(&dir.path().join("journal"), commands, extra);
        std::fs::write(&path, text).expect("config");
        Gateway::start_in(dir, path)
    }

    /// Produces one command record; returns its offset (the topic has one partition).
    fn send(&self, key: Option<&str>, payload: &str, headers: &[(&str, &str)]) -> i64 {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut rec = FutureRecord::<str, str>::to(&self.commands)
            .payload(payload)
            .headers(h);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        let d = self
            .rt
            .block_on(self.producer.send(rec, Duration::from_secs(10)))
            .unwrap_or_else(|(e, _)| panic!("producing a command: {e}"));
        assert_eq!(d.partition, 0, "one partition");
        d.offset
    }

    /// The id the gateway gives the command at `offset`.
    fn command_id(&self, offset: i64) -> String {
        format!("kafka:{}:0:{offset}", self.commands)
    }

    /// The offset the gateway's consumer group committed for the command topic
    /// (`None`: nothing committed yet).
    fn committed(&self) -> Option<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap())
            .set("group.id", self.group())
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.commands, 0);
        let got = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        match got.elements_for_topic(&self.commands).first().map(|e| e.offset()) {
            Some(Offset::Offset(n)) => Some(n),
            _ => None,
        }
    }

    /// Waits until the committed offset is exactly `want`; returns what was seen last.
    fn wait_committed(&self, want: i64, within: Duration) -> Option<i64> {
        let deadline = Instant::now() + within;
        loop {
            let c = self.committed();
            if c == Some(want) || Instant::now() >= deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends a command to a vehicle nobody holds and waits for its `unknown_vehicle`:
    /// the gateway's consumer is reading (and, since the topic has one partition, has
    /// handled every earlier record).
    fn probe(&self, out: &mut Outcomes, within: Duration) -> i64 {
        let offset = self.send(Some("probe-nobody"), "probe", &[]);
        let id = self.command_id(offset);
        out.wait(&format!("probe {id}"), within, |o| {
            o.iter()
                .any(|r| r.command_id == id && r.outcome == "unknown_vehicle")
        });
        offset
    }
}

// ---------------------------------------------------------------------------------------
// Outcome records.

/// One record of the outcome topic.
#[derive(Debug, Clone)]
struct Out {
    key: String,
    command_id: String,
    client_id: String,
    outcome: String,
    reason: Option<String>,
    correlation_id: Option<String>,
    /// `kafka.topic`, `kafka.partition`, `kafka.offset`.
    kafka: Option<(String, i64, i64)>,
    qos: i64,
    source: String,
    /// The `gateway.journal` and `gateway.seq` headers: the journal record it came from.
    journal_seq: (String, String),
}

impl Out {
    fn parse(key: &str, text: &str, journal_seq: (String, String)) -> Out {
        let j = Json::parse(text).unwrap_or_else(|| panic!("outcome is not JSON: {text}"));
        let s = |k: &str| j.get(k).and_then(Json::str).map(str::to_string);
        let kafka = j.get("kafka").filter(|k| **k != Json::Null).map(|k| {
            (
                k.get("topic").and_then(Json::str).unwrap_or("").to_string(),
                k.get("partition").and_then(Json::int).unwrap_or(-1),
                k.get("offset").and_then(Json::int).unwrap_or(-1),
            )
        });
        Out {
            key: key.to_string(),
            command_id: s("command_id").unwrap_or_else(|| panic!("no command_id: {text}")),
            client_id: s("client_id").unwrap_or_default(),
            outcome: s("outcome").unwrap_or_else(|| panic!("no outcome: {text}")),
            reason: s("reason"),
            correlation_id: s("correlation_id"),
            kafka,
            qos: j.get("qos").and_then(Json::int).unwrap_or(-1),
            source: s("source").unwrap_or_default(),
            journal_seq,
        }
    }

    fn is_final(&self) -> bool {
        self.outcome != "queued"
    }
}

/// Reads the outcome topic from the beginning and keeps everything it saw, minus the
/// bridge's replays: a record whose (`gateway.journal`, `gateway.seq`) was seen already
/// is the same journal record sent again after a restart (README, "Replays are
/// at-least-once, and exactly removable"), counted in `replays`.
struct Outcomes {
    consumer: BaseConsumer,
    seen: Vec<Out>,
    replays: Vec<Out>,
}

impl Outcomes {
    fn new(env: &Env) -> Outcomes {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", env.kafka.bootstrap())
            .set("group.id", format!("verifier-{}", env.name))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&env.outcomes, 0, Offset::Beginning)
            .expect("partition");
        consumer.assign(&tpl).expect("assign");
        Outcomes {
            consumer,
            seen: Vec::new(),
            replays: Vec::new(),
        }
    }

    /// Reads what arrives within `d`.
    fn poll(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let text = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == name))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_else(|| panic!("outcome record without {name}: {text}"))
            };
            let out = Out::parse(&key, &text, (header("gateway.journal"), header("gateway.seq")));
            if self.seen.iter().any(|r| r.journal_seq == out.journal_seq) {
                self.replays.push(out);
            } else {
                self.seen.push(out);
            }
        }
    }

    /// Reads until `done` holds for everything seen, or panics after `within`.
    fn wait(&mut self, what: &str, within: Duration, done: impl Fn(&[Out]) -> bool) {
        let deadline = Instant::now() + within;
        while !done(&self.seen) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; outcomes seen:\n{}",
                self.dump()
            );
            self.poll(Duration::from_millis(200));
        }
    }

    /// Waits until command `id` has an outcome `outcome`.
    fn wait_for(&mut self, id: &str, outcome: &str, within: Duration) {
        self.wait(&format!("{outcome} of {id}"), within, |o| {
            o.iter().any(|r| r.command_id == id && r.outcome == outcome)
        });
    }

    fn of(&self, id: &str) -> Vec<&Out> {
        self.seen.iter().filter(|r| r.command_id == id).collect()
    }

    fn finals(&self, id: &str) -> Vec<&Out> {
        self.of(id).into_iter().filter(|r| r.is_final()).collect()
    }

    fn dump(&self) -> String {
        self.seen
            .iter()
            .map(|r| {
                format!(
                    "  {} {} {}{} [seq {}]",
                    r.command_id,
                    r.client_id,
                    r.outcome,
                    r.reason.as_ref().map(|x| format!(" ({x})")).unwrap_or_default(),
                    r.journal_seq.1
                )
            })
            .chain(self.replays.iter().map(|r| {
                format!(
                    "  (journal replay, ignored) {} {} [seq {}]",
                    r.command_id, r.outcome, r.journal_seq.1
                )
            }))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Just enough JSON for the outcome records.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Option<Json> {
        let mut p = JsonParser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        (p.i == p.s.len()).then_some(v)
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Json::Num(n) => Some(*n as i64),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while matches!(self.s.get(self.i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }

    fn literal(&mut self, word: &str, v: Json) -> Option<Json> {
        self.s[self.i..].starts_with(word.as_bytes()).then(|| {
            self.i += word.len();
            v
        })
    }

    fn value(&mut self) -> Option<Json> {
        match self.peek()? {
            b'{' => {
                self.i += 1;
                let mut fields = Vec::new();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Some(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    if self.peek()? != b':' {
                        return None;
                    }
                    self.i += 1;
                    fields.push((k, self.value()?));
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Some(Json::Obj(fields));
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(Json::Arr(items));
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => self.string().map(Json::Str),
            b't' => self.literal("true", Json::Bool(true)),
            b'f' => self.literal("false", Json::Bool(false)),
            b'n' => self.literal("null", Json::Null),
            _ => {
                let start = self.i;
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c))
                {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()?
                    .parse()
                    .ok()
                    .map(Json::Num)
            }
        }
    }

    fn string(&mut self) -> Option<String> {
        if self.s.get(self.i) != Some(&b'"') {
            return None;
        }
        self.i += 1;
        let mut out = String::new();
        let mut run = self.i;
        loop {
            let c = *self.s.get(self.i)?;
            match c {
                b'"' => {
                    out.push_str(std::str::from_utf8(&self.s[run..self.i]).ok()?);
                    self.i += 1;
                    return Some(out);
                }
                b'\\' => {
                    out.push_str(std::str::from_utf8(&self.s[run..self.i]).ok()?);
                    let e = *self.s.get(self.i + 1)?;
                    self.i += 2;
                    match e {
                        b'n' => out.push('\n'),
                        b't' => out.push('\t'),
                        b'r' => out.push('\r'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'u' => {
                            let hex = std::str::from_utf8(self.s.get(self.i..self.i + 4)?).ok()?;
                            let code = u32::from_str_radix(hex, 16).ok()?;
                            out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                            self.i += 4;
                        }
                        other => out.push(char::from(other)),
                    }
                    run = self.i;
                }
                _ => self.i += 1,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// A vehicle: a raw MQTT 3.1.1 / 5.0 client (rumqttc's codec) that acknowledges only when
// told to.

/// A command as the vehicle received it.
#[derive(Debug, Clone)]
struct Cmd {
    topic: String,
    qos: u8,
    pkid: u16,
    dup: bool,
    payload: String,
    correlation_data: Option<Vec<u8>>,
    response_topic: Option<String>,
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
}

enum Pkt {
    ConnAck { present: bool, ok: bool },
    SubAck(Vec<bool>),
    Publish(Cmd),
    PubRel(u16),
    Other,
}

struct Vehicle {
    v5: bool,
    stream: TcpStream,
    buf: BytesMut,
    /// Publishes read while waiting for something else.
    inbox: VecDeque<Cmd>,
    closed: bool,
}

fn qos4(q: u8) -> rumqttc::mqttbytes::QoS {
    match q {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl Vehicle {
    /// Connects (`v5`: MQTT 5, else 3.1.1). `persistent`: clean session 0 / session
    /// expiry 3600 s. Returns the vehicle and CONNACK's session present.
    fn connect(addr: SocketAddr, id: &str, v5: bool, persistent: bool) -> (Vehicle, bool) {
        Vehicle::open(addr, id, v5, persistent, None)
    }

    /// As [`Vehicle::connect`]; `max_packet`: MQTT 5 Maximum Packet Size.
    fn open(
        addr: SocketAddr,
        id: &str,
        v5: bool,
        persistent: bool,
        max_packet: Option<u32>,
    ) -> (Vehicle, bool) {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        let mut v = Vehicle {
            v5,
            stream,
            buf: BytesMut::new(),
            inbox: VecDeque::new(),
            closed: false,
        };
        let mut out = BytesMut::new();
        if v5 {
            let mut props = v5::ConnectProperties::new();
            props.session_expiry_interval = Some(if persistent { 3600 } else { 0 });
            props.max_packet_size = max_packet;
            let c = v5::Connect {
                keep_alive: 120,
                client_id: id.to_string(),
                clean_start: !persistent,
                properties: Some(props),
            };
            c.write(&None, &None, &mut out).expect("encode connect");
        } else {
            let mut c = v4::Connect::new(id);
            c.keep_alive = 120;
            c.clean_session = !persistent;
            c.write(&mut out).expect("encode connect");
        }
        v.send(&out);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match v.read(deadline) {
                Some(Pkt::ConnAck { present, ok }) => {
                    assert!(ok, "CONNACK refused {id}");
                    return (v, present);
                }
                Some(_) => continue,
                None => panic!("no CONNACK for {id}"),
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).is_err() {
            self.closed = true;
        }
    }

    /// Subscribes to `filter` at `qos`; whether it was granted.
    fn subscribe(&mut self, filter: &str, qos: u8) -> bool {
        let mut out = BytesMut::new();
        if self.v5 {
            let mut s = v5::Subscribe::new(v5::Filter::new(filter, qos5(qos)), None);
            s.pkid = 1;
            s.write(&mut out).expect("encode subscribe");
        } else {
            let mut s = v4::Subscribe::new(filter, qos4(qos));
            s.pkid = 1;
            s.write(&mut out).expect("encode subscribe");
        }
        self.send(&out);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.read(deadline) {
                Some(Pkt::SubAck(codes)) => return codes.iter().all(|ok| *ok),
                Some(Pkt::Publish(c)) => self.inbox.push_back(c),
                Some(_) => continue,
                None => panic!("no SUBACK"),
            }
        }
    }

    /// Next whole packet before `deadline`; `None` on timeout or close.
    fn read(&mut self, deadline: Instant) -> Option<Pkt> {
        loop {
            if let Some(p) = self.decode() {
                return Some(p);
            }
            if self.closed {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("timeout");
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(_) => self.closed = true,
            }
        }
    }

    fn decode(&mut self) -> Option<Pkt> {
        if self.v5 {
            let p = match v5::Packet::read(&mut self.buf, None) {
                Ok(p) => p,
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => return None,
                Err(e) => panic!("undecodable packet from the gateway: {e:?}"),
            };
            Some(match p {
                v5::Packet::ConnAck(a) => Pkt::ConnAck {
                    present: a.session_present,
                    ok: a.code == v5::ConnectReturnCode::Success,
                },
                v5::Packet::SubAck(a) => Pkt::SubAck(
                    a.return_codes
                        .iter()
                        .map(|c| matches!(c, v5::SubscribeReasonCode::Success(_)))
                        .collect(),
                ),
                v5::Packet::Publish(p) => {
                    let props = p.properties.unwrap_or_default();
                    Pkt::Publish(Cmd {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        qos: p.qos as u8,
                        pkid: p.pkid,
                        dup: p.dup,
                        payload: String::from_utf8_lossy(&p.payload).into_owned(),
                        correlation_data: props.correlation_data.map(|b| b.to_vec()),
                        response_topic: props.response_topic,
                        content_type: props.content_type,
                        user_properties: props.user_properties,
                    })
                }
                v5::Packet::PubRel(r) => Pkt::PubRel(r.pkid),
                _ => Pkt::Other,
            })
        } else {
            let p = match v4::read(&mut self.buf, 1 << 20) {
                Ok(p) => p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return None,
                Err(e) => panic!("undecodable packet from the gateway: {e:?}"),
            };
            Some(match p {
                v4::Packet::ConnAck(a) => Pkt::ConnAck {
                    present: a.session_present,
                    ok: a.code == v4::ConnectReturnCode::Success,
                },
                v4::Packet::SubAck(a) => Pkt::SubAck(
                    a.return_codes
                        .iter()
                        .map(|c| matches!(c, v4::SubscribeReasonCode::Success(_)))
                        .collect(),
                ),
                v4::Packet::Publish(p) => Pkt::Publish(Cmd {
                    topic: p.topic,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    dup: p.dup,
                    payload: String::from_utf8_lossy(&p.payload).into_owned(),
                    correlation_data: None,
                    response_topic: None,
                    content_type: None,
                    user_properties: Vec::new(),
                }),
                v4::Packet::PubRel(r) => Pkt::PubRel(r.pkid),
                _ => Pkt::Other,
            })
        }
    }

    /// The next command within `within` (not acknowledged).
    fn recv(&mut self, within: Duration) -> Option<Cmd> {
        if let Some(c) = self.inbox.pop_front() {
            return Some(c);
        }
        let deadline = Instant::now() + within;
        loop {
            match self.read(deadline)? {
                Pkt::Publish(c) => return Some(c),
                Pkt::PubRel(pkid) => self.pubcomp(pkid),
                _ => continue,
            }
        }
    }

    /// Every command that arrives until nothing came for `quiet` (not acknowledged).
    fn recv_quiet(&mut self, quiet: Duration) -> Vec<Cmd> {
        let mut got = Vec::new();
        while let Some(c) = self.recv(quiet) {
            got.push(c);
        }
        got
    }

    fn pubcomp(&mut self, pkid: u16) {
        let mut out = BytesMut::new();
        if self.v5 {
            v5::PubComp::new(pkid, None).write(&mut out).expect("encode");
        } else {
            v4::PubComp::new(pkid).write(&mut out).expect("encode");
        }
        self.send(&out);
    }

    /// Acknowledges a command: PUBACK (QoS 1), or PUBREC, then PUBCOMP for the PUBREL
    /// (QoS 2). Nothing for QoS 0.
    fn ack(&mut self, c: &Cmd) {
        let mut out = BytesMut::new();
        let encoded = match (c.qos, self.v5) {
            (0, _) => return,
            (1, true) => v5::PubAck::new(c.pkid, None).write(&mut out).is_ok(),
            (1, false) => v4::PubAck::new(c.pkid).write(&mut out).is_ok(),
            (_, true) => v5::PubRec::new(c.pkid, None).write(&mut out).is_ok(),
            (_, false) => v4::PubRec::new(c.pkid).write(&mut out).is_ok(),
        };
        assert!(encoded, "encode ack");
        self.send(&out);
        if c.qos < 2 {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.read(deadline) {
                Some(Pkt::PubRel(p)) if p == c.pkid => {
                    self.pubcomp(p);
                    return;
                }
                Some(Pkt::PubRel(p)) => self.pubcomp(p),
                Some(Pkt::Publish(other)) => self.inbox.push_back(other),
                Some(_) => continue,
                None => panic!("no PUBREL for packet id {}", c.pkid),
            }
        }
    }

    /// Refuses a command (MQTT 5): PUBACK (QoS 1) or PUBREC (QoS 2) with `reason` ≥ 0x80.
    fn refuse(&mut self, c: &Cmd, reason: u8) {
        let [hi, lo] = c.pkid.to_be_bytes();
        let kind = if c.qos == 1 { 0x40 } else { 0x50 };
        self.send(&[kind, 0x03, hi, lo, reason]);
    }

    /// A normal DISCONNECT; waits until the gateway closed the connection.
    fn disconnect(mut self) {
        self.send(&[0xE0, 0x00]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.closed && Instant::now() < deadline {
            let _ = self.read(deadline);
        }
        // The session goes offline when the gateway saw the close; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A received command as `cmd-07` or `cmd-07 (DUP)`.
fn label(c: &Cmd) -> String {
    if c.dup {
        format!("{} (DUP)", c.payload)
    } else {
        c.payload.clone()
    }
}

/// A vehicle that subscribed to its command topic and disconnected: its persistent
/// session is offline on the gateway.
fn park(addr: SocketAddr, id: &str, v5: bool) {
    let (mut v, _) = Vehicle::connect(addr, id, v5, true);
    assert!(v.subscribe(&format!("vehicles/{id}/commands/#"), 2));
    v.disconnect();
}

const WAIT: Duration = Duration::from_secs(20);

/// After a SIGKILL the dead gateway's consumer stays a member of the group until its
/// session times out (librdkafka's default `session.timeout.ms` is 45 s), and the
/// restarted gateway gets no partition before that. The crash tests shorten it (the
/// broker's minimum is 6 s) to stay within their time budget.
const FAST_REJOIN: &str = "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n";

// ---------------------------------------------------------------------------------------
// 1. Online vehicles, MQTT 3.1.1 and 5.0, QoS 0, 1, 2.

#[test]
fn online_vehicles_get_commands_at_every_qos_with_their_properties() {
    let env = Env::new("online");
    let gw = env.start_gateway("");
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);

    let (mut v4car, _) = Vehicle::connect(gw.mqtt(), "car-v4", false, false);
    assert!(v4car.subscribe("vehicles/car-v4/commands/#", 2));
    let (mut v5car, _) = Vehicle::connect(gw.mqtt(), "car-v5", true, false);
    assert!(v5car.subscribe("vehicles/car-v5/commands/#", 2));

    // (offset, client id, qos, payload, correlation id)
    let mut sent: Vec<(i64, &str, u8, String, String)> = Vec::new();
    for qos in 0..=2u8 {
        for car in ["car-v4", "car-v5"] {
            let payload = format!("{{\"cmd\":\"unlock\",\"car\":\"{car}\",\"qos\":{qos}}}");
            let corr = format!("corr-{car}-{qos}");
            let q = qos.to_string();
            let trace = format!("trace-{qos}");
            let offset = env.send(
                Some(car),
                &payload,
                &[
                    ("qos", &q),
                    ("correlation_id", &corr),
                    ("response_topic", &format!("vehicles/{car}/replies")),
                    ("content_type", "application/json"),
                    ("trace", &trace),
                ],
            );
            sent.push((offset, car, qos, payload, corr));
        }
    }

    for (vehicle, car) in [(&mut v4car, "car-v4"), (&mut v5car, "car-v5")] {
        for (_, _, qos, payload, corr) in sent.iter().filter(|s| s.1 == car) {
            let c = vehicle
                .recv(WAIT)
                .unwrap_or_else(|| panic!("{car} got no QoS {qos} command"));
            assert_eq!(c.topic, format!("vehicles/{car}/commands"));
            assert_eq!(&c.payload, payload, "{car}: commands arrive in order");
            assert_eq!(c.qos, *qos, "{car}: delivered at the command's QoS");
            if car == "car-v5" {
                assert_eq!(
                    c.correlation_data.as_deref(),
                    Some(corr.as_bytes()),
                    "correlation id → Correlation Data"
                );
                assert_eq!(c.response_topic.as_deref(), Some("vehicles/car-v5/replies"));
                assert_eq!(c.content_type.as_deref(), Some("application/json"));
                assert!(
                    c.user_properties
                        .contains(&("trace".to_string(), format!("trace-{qos}"))),
                    "other headers → user properties: {:?}",
                    c.user_properties
                );
                assert!(
                    !c.user_properties
                        .iter()
                        .any(|(k, _)| k == "qos" || k == "correlation_id"),
                    "command headers are not user properties: {:?}",
                    c.user_properties
                );
            }
            vehicle.ack(&c);
        }
    }

    let ids: Vec<String> = sent.iter().map(|s| env.command_id(s.0)).collect();
    out.wait("six delivered outcomes", WAIT, |o| {
        ids.iter()
            .all(|id| o.iter().any(|r| &r.command_id == id && r.outcome == "delivered"))
    });
    // Nothing more comes for them.
    out.poll(Duration::from_secs(1));
    for (offset, car, qos, _, corr) in &sent {
        let id = env.command_id(*offset);
        let all = out.of(&id);
        assert_eq!(all.len(), 1, "{id}: exactly one outcome\n{}", out.dump());
        let r = all[0];
        assert_eq!(r.outcome, "delivered");
        assert_eq!(r.key, *car, "outcome keyed by client id");
        assert_eq!(r.client_id, *car);
        assert_eq!(r.source, "kafka");
        assert_eq!(r.correlation_id.as_deref(), Some(corr.as_str()));
        assert_eq!(r.qos, i64::from(*qos));
        assert_eq!(r.kafka, Some((env.commands.clone(), 0, *offset)), "{r:?}");
    }
    // No vehicle got anything twice.
    assert!(v4car.recv_quiet(Duration::from_millis(300)).is_empty());
    assert!(v5car.recv_quiet(Duration::from_millis(300)).is_empty());
}

// ---------------------------------------------------------------------------------------
// 2. Offline persistent session, gateway SIGKILL, restore, reconnect.

#[test]
fn queued_command_survives_sigkill_and_is_delivered_on_reconnect() {
    let env = Env::new("offline");
    let gw = env.start_gateway(FAST_REJOIN);
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);
    park(gw.mqtt(), "park-v4", false);
    park(gw.mqtt(), "park-v5", true);

    let o4 = env.send(Some("park-v4"), "open-trunk-v4", &[("qos", "1")]);
    let o5 = env.send(
        Some("park-v5"),
        "open-trunk-v5",
        &[("qos", "1"), ("correlation_id", "c-park-5")],
    );
    let (id4, id5) = (env.command_id(o4), env.command_id(o5));
    out.wait_for(&id4, "queued", WAIT);
    out.wait_for(&id5, "queued", WAIT);
    // Durably queued settles the command: the offset moves past both.
    assert_eq!(
        env.wait_committed(o5 + 1, Duration::from_secs(10)),
        Some(o5 + 1),
        "committed offset after queued"
    );

    let (dir, config) = gw.kill9();
    let gw = Gateway::start_in(dir, config);

    for (car, v5, payload, id) in [
        ("park-v4", false, "open-trunk-v4", &id4),
        ("park-v5", true, "open-trunk-v5", &id5),
    ] {
        let (mut v, present) = Vehicle::connect(gw.mqtt(), car, v5, true);
        assert!(present, "{car}: the session survived the SIGKILL");
        let c = v
            .recv(WAIT)
            .unwrap_or_else(|| panic!("{car}: queued command not delivered after restart"));
        assert_eq!(c.payload, payload);
        if v5 {
            assert_eq!(c.correlation_data.as_deref(), Some(&b"c-park-5"[..]));
        }
        v.ack(&c);
        out.wait_for(id, "delivered", WAIT);
        assert!(
            v.recv_quiet(Duration::from_millis(500)).is_empty(),
            "{car}: delivered once"
        );
    }
    // The restarted consumer is reading again (everything before the probe was handled).
    env.probe(&mut out, WAIT);
    out.poll(Duration::from_millis(500));
    for id in [&id4, &id5] {
        let finals = out.finals(id);
        assert_eq!(finals.len(), 1, "{id}: one final outcome\n{}", out.dump());
        assert_eq!(finals[0].outcome, "delivered");
        let queued = out.of(id).iter().filter(|r| r.outcome == "queued").count();
        assert_eq!(queued, 1, "{id}: queued once\n{}", out.dump());
    }
}

// ---------------------------------------------------------------------------------------
// 3. Expiry while offline.

#[test]
fn a_command_that_expires_in_an_offline_session_is_not_delivered() {
    let env = Env::new("expiry");
    let gw = env.start_gateway("");
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);
    park(gw.mqtt(), "exp-car", true);

    let offset = env.send(Some("exp-car"), "honk", &[("qos", "1"), ("expiry_secs", "1")]);
    let id = env.command_id(offset);
    out.wait_for(&id, "queued", WAIT);
    std::thread::sleep(Duration::from_secs(2));

    let (mut v, present) = Vehicle::connect(gw.mqtt(), "exp-car", true, true);
    assert!(present);
    let got = v.recv_quiet(Duration::from_secs(2));
    assert!(got.is_empty(), "an expired command was delivered: {got:?}");
    out.wait_for(&id, "expired", WAIT);
    out.poll(Duration::from_millis(500));
    let finals = out.finals(&id);
    assert_eq!(finals.len(), 1, "{}", out.dump());
    assert_eq!(finals[0].outcome, "expired");
}

// ---------------------------------------------------------------------------------------
// 4. Offline queue overflow, drop_oldest.

#[test]
fn a_full_offline_queue_drops_the_oldest_command() {
    let env = Env::new("overflow");
    let gw = env.start_gateway("[sessions]\nmax_queued_messages = 2\nqueue_overflow = \"drop_oldest\"\n");
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);
    park(gw.mqtt(), "full-car", false);

    let offsets: Vec<i64> = (1..=3)
        .map(|n| env.send(Some("full-car"), &format!("cmd-{n}"), &[("qos", "1")]))
        .collect();
    let ids: Vec<String> = offsets.iter().map(|o| env.command_id(*o)).collect();
    out.wait_for(&ids[0], "dropped", WAIT);
    out.wait_for(&ids[1], "queued", WAIT);
    out.wait_for(&ids[2], "queued", WAIT);
    let dropped = out.finals(&ids[0]);
    assert_eq!(dropped.len(), 1, "{}", out.dump());
    assert_eq!(dropped[0].reason.as_deref(), Some("queue_full_drop_oldest"));

    let (mut v, present) = Vehicle::connect(gw.mqtt(), "full-car", false, true);
    assert!(present);
    let mut got = Vec::new();
    while let Some(c) = v.recv(Duration::from_secs(3)) {
        v.ack(&c);
        got.push(c.payload);
    }
    assert_eq!(got, ["cmd-2", "cmd-3"], "the two newest, in order");
    out.wait_for(&ids[1], "delivered", WAIT);
    out.wait_for(&ids[2], "delivered", WAIT);
    out.poll(Duration::from_millis(500));
    for (id, want) in ids.iter().zip(["dropped", "delivered", "delivered"]) {
        let finals = out.finals(id);
        assert_eq!(finals.len(), 1, "{id}: one final outcome\n{}", out.dump());
        assert_eq!(finals[0].outcome, want);
    }
}

// ---------------------------------------------------------------------------------------
// 5. Unknown vehicle, malformed records, a vehicle not subscribed.

#[test]
fn unknown_malformed_and_unsubscribed_commands_are_reported() {
    let env = Env::new("refused");
    let gw = env.start_gateway("");
    let mut out = Outcomes::new(&env);
    // Connected and not subscribed (the default ACL allows only the command topic).
    let (mut deaf, _) = Vehicle::connect(gw.mqtt(), "deaf-car", false, false);
    // An MQTT 5 vehicle that takes packets of at most 256 bytes.
    let (mut tiny, _) = Vehicle::open(gw.mqtt(), "tiny-car", true, false, Some(256));
    assert!(tiny.subscribe("vehicles/tiny-car/commands/#", 1));

    let unknown = env.send(Some("ghost-car"), "x", &[]);
    let no_key = env.send(None, "x", &[]);
    let bad_qos = env.send(Some("deaf-car"), "x", &[("qos", "7")]);
    let unsubscribed = env.send(Some("deaf-car"), "x", &[("qos", "1")]);
    let too_large = env.send(Some("tiny-car"), &"x".repeat(1000), &[("qos", "1")]);
    let small = env.send(Some("tiny-car"), "fits", &[("qos", "1")]);
    let cases = [
        (unknown, "ghost-car", "unknown_vehicle", None),
        (no_key, "", "rejected", Some("missing_key")),
        (bad_qos, "deaf-car", "rejected", Some("bad_qos_header")),
        (unsubscribed, "deaf-car", "rejected", Some("not_subscribed")),
        (too_large, "tiny-car", "rejected", Some("too_large_for_client")),
    ];
    // The vehicle that could not take the large command takes the next one.
    let c = tiny.recv(WAIT).expect("tiny-car got the small command");
    assert_eq!(c.payload, "fits");
    tiny.ack(&c);
    out.wait_for(&env.command_id(small), "delivered", WAIT);
    for (offset, _, outcome, _) in &cases {
        out.wait_for(&env.command_id(*offset), outcome, WAIT);
    }
    out.poll(Duration::from_millis(500));
    for (offset, car, outcome, reason) in cases {
        let id = env.command_id(offset);
        let all = out.of(&id);
        assert_eq!(all.len(), 1, "{id}: one outcome\n{}", out.dump());
        assert_eq!(all[0].outcome, outcome);
        assert_eq!(all[0].reason.as_deref(), reason, "{id}");
        assert_eq!(all[0].client_id, car);
        assert_eq!(all[0].kafka, Some((env.commands.clone(), 0, offset)));
    }
    assert!(deaf.recv_quiet(Duration::from_millis(300)).is_empty());
    assert!(tiny.recv_quiet(Duration::from_millis(300)).is_empty());
    // Every one of them is settled.
    assert_eq!(
        env.wait_committed(small + 1, Duration::from_secs(10)),
        Some(small + 1)
    );
}

// ---------------------------------------------------------------------------------------
// 6. Committed offsets follow the vehicle.

#[test]
fn committed_offset_waits_for_the_vehicle_acknowledgement() {
    let env = Env::new("offsets");
    let gw = env.start_gateway("");
    let mut out = Outcomes::new(&env);
    let first = env.probe(&mut out, WAIT);
    assert_eq!(
        env.wait_committed(first + 1, Duration::from_secs(10)),
        Some(first + 1)
    );

    let (mut hold, _) = Vehicle::connect(gw.mqtt(), "hold-car", false, false);
    assert!(hold.subscribe("vehicles/hold-car/commands/#", 1));
    let (mut quick, _) = Vehicle::connect(gw.mqtt(), "quick-car", true, false);
    assert!(quick.subscribe("vehicles/quick-car/commands/#", 1));

    // hold-car gets a QoS 1 command and does not acknowledge it.
    let held = env.send(Some("hold-car"), "held", &[("qos", "1")]);
    let held_cmd = hold.recv(WAIT).expect("hold-car got its command");
    assert_eq!(held_cmd.payload, "held");
    // Later commands to another vehicle are delivered and acknowledged.
    let mut last = held;
    for n in 0..3 {
        last = env.send(Some("quick-car"), &format!("q{n}"), &[("qos", "1")]);
        let c = quick.recv(WAIT).expect("quick-car got its command");
        quick.ack(&c);
        out.wait_for(&env.command_id(last), "delivered", WAIT);
    }
    // Several commit rounds later the offset still points at the unacknowledged command.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        env.committed(),
        Some(held),
        "committed offset must stay at the unacknowledged command"
    );
    assert!(out.finals(&env.command_id(held)).is_empty(), "{}", out.dump());

    // The acknowledgement settles it: the offset moves past everything.
    hold.ack(&held_cmd);
    out.wait_for(&env.command_id(held), "delivered", WAIT);
    assert_eq!(
        env.wait_committed(last + 1, Duration::from_secs(10)),
        Some(last + 1),
        "committed offset after the PUBACK"
    );

    // A clean-session vehicle that disconnects with a command in flight settles it too.
    let (mut leave, _) = Vehicle::connect(gw.mqtt(), "leave-car", false, false);
    assert!(leave.subscribe("vehicles/leave-car/commands/#", 1));
    let left = env.send(Some("leave-car"), "bye", &[("qos", "1")]);
    assert_eq!(
        leave.recv(WAIT).expect("leave-car got its command").payload,
        "bye"
    );
    last = env.send(Some("quick-car"), "q-last", &[("qos", "1")]);
    let c = quick.recv(WAIT).expect("quick-car got its command");
    quick.ack(&c);
    out.wait_for(&env.command_id(last), "delivered", WAIT);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(env.committed(), Some(left), "held back by leave-car's command");
    leave.disconnect();
    out.wait_for(&env.command_id(left), "dropped", WAIT);
    assert_eq!(
        out.finals(&env.command_id(left))[0].reason.as_deref(),
        Some("session_ended")
    );
    assert_eq!(
        env.wait_committed(last + 1, Duration::from_secs(10)),
        Some(last + 1),
        "committed offset after the clean session ended"
    );
}

// ---------------------------------------------------------------------------------------
// 7. SIGKILL with commands in flight to a slowly acknowledging persistent vehicle.

#[test]
fn sigkill_with_commands_in_flight_delivers_each_in_order_with_one_final_outcome() {
    const N: usize = 20;
    let env = Env::new("inflight");
    let gw = env.start_gateway(FAST_REJOIN);
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);

    let (mut v, _) = Vehicle::connect(gw.mqtt(), "slow-car", false, true);
    assert!(v.subscribe("vehicles/slow-car/commands/#", 1));
    let offsets: Vec<i64> = (0..N)
        .map(|n| env.send(Some("slow-car"), &format!("cmd-{n:02}"), &[("qos", "1")]))
        .collect();
    let ids: Vec<String> = offsets.iter().map(|o| env.command_id(*o)).collect();

    // Received in order, acknowledged one every 250 ms; SIGKILL 50 ms after the 8th
    // acknowledgement (the gateway commits offsets every 200 ms).
    let mut received: Vec<String> = Vec::new();
    for _ in 0..8 {
        let c = v.recv(WAIT).expect("a command before the kill");
        received.push(label(&c));
        std::thread::sleep(Duration::from_millis(250));
        v.ack(&c);
    }
    std::thread::sleep(Duration::from_millis(50));
    let before_kill = env.committed();
    let (dir, config) = gw.kill9();
    // Whatever the dead gateway had written to the socket before it died.
    received.extend(v.recv_quiet(Duration::from_millis(200)).iter().map(label));
    let acked_before = 8;
    let gw = Gateway::start_in(dir, config);

    let (mut v, present) = Vehicle::connect(gw.mqtt(), "slow-car", false, true);
    assert!(present, "the session survived the SIGKILL");
    let restart_at = received.len();
    // Acknowledge everything promptly until the restarted consumer has handled every
    // record before a probe (Kafka re-delivers what was not committed).
    let probe = env.send(Some("probe-nobody"), "probe", &[]);
    let probe_id = env.command_id(probe);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut probe_seen_at: Option<Instant> = None;
    loop {
        if let Some(c) = v.recv(Duration::from_millis(200)) {
            received.push(label(&c));
            v.ack(&c);
            continue;
        }
        out.poll(Duration::from_millis(100));
        if probe_seen_at.is_none() && out.seen.iter().any(|r| r.command_id == probe_id) {
            probe_seen_at = Some(Instant::now());
        }
        if probe_seen_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted gateway did not handle the probe; outcomes:\n{}",
            out.dump()
        );
    }
    out.poll(Duration::from_millis(500));

    let after: Vec<&String> = received[restart_at..].iter().collect();
    let report = format!(
        "committed before kill: {before_kill:?} (offsets {}..={}), acknowledged before kill: {acked_before}\n\
         received before restart: {:?}\nreceived after restart: {after:?}\noutcomes:\n{}",
        offsets[0],
        offsets[N - 1],
        &received[..restart_at],
        out.dump()
    );
    let mut problems = Vec::new();
    // Every command reached the vehicle at least once.
    for n in 0..N {
        let p = format!("cmd-{n:02}");
        if !received.iter().any(|r| r.starts_with(&p)) {
            problems.push(format!("{p} never delivered"));
        }
    }
    // In order, duplicates allowed: after the restart the vehicle gets a re-send of what
    // was unacknowledged and then the rest, never an older command after a newer one.
    let numbers: Vec<usize> = after
        .iter()
        .map(|p| p["cmd-".len().."cmd-00".len()].parse().unwrap())
        .collect();
    if let Some(w) = numbers.windows(2).find(|w| w[0] > w[1]) {
        problems.push(format!(
            "out of order after the restart: cmd-{:02} after cmd-{:02}",
            w[1], w[0]
        ));
    }
    // Exactly one final outcome per command (journal replays removed), `delivered`.
    for id in &ids {
        let finals: Vec<&str> = out.finals(id).iter().map(|r| r.outcome.as_str()).collect();
        if finals != ["delivered"] {
            problems.push(format!("{id}: final outcomes {finals:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}\n{report}",
        problems.len(),
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------
// 8. A persistent vehicle that goes offline with a command in flight: the command now
//    waits in its offline session (stored), which settles it (DESIGN.md invariant 5:
//    "durably stored in that vehicle's offline queue"; outcome `queued`).

#[test]
fn a_command_in_flight_when_a_persistent_vehicle_goes_offline_is_queued() {
    let env = Env::new("gooffline");
    let gw = env.start_gateway("");
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);

    let (mut v, _) = Vehicle::connect(gw.mqtt(), "tunnel-car", false, true);
    assert!(v.subscribe("vehicles/tunnel-car/commands/#", 1));
    let offset = env.send(Some("tunnel-car"), "flash-lights", &[("qos", "1")]);
    let id = env.command_id(offset);
    assert_eq!(v.recv(WAIT).expect("the command").payload, "flash-lights");
    // The vehicle drives into a tunnel before it acknowledges.
    v.disconnect();
    let committed = env.wait_committed(offset + 1, Duration::from_secs(10));
    out.poll(Duration::from_secs(1));
    let queued = out.of(&id).iter().any(|r| r.outcome == "queued");

    // Back online: the command is re-sent and acknowledged (this part works either way).
    let (mut v, present) = Vehicle::connect(gw.mqtt(), "tunnel-car", false, true);
    assert!(present);
    let c = v.recv(WAIT).expect("the command again after the reconnect");
    assert_eq!(c.payload, "flash-lights");
    assert!(c.dup, "a re-send carries DUP");
    v.ack(&c);
    out.wait_for(&id, "delivered", WAIT);
    out.poll(Duration::from_millis(500));
    assert_eq!(out.finals(&id).len(), 1, "{}", out.dump());

    assert!(
        committed == Some(offset + 1) && queued,
        "while tunnel-car was offline with the command stored in its persistent session, the \
         command was not settled: committed offset {committed:?} (command at {offset}), \
         `queued` outcome reported: {queued}\n{}",
        out.dump()
    );
}

// ---------------------------------------------------------------------------------------
// 9. Vehicles that never acknowledge hold commands pending. `commands.max_pending` bounds
//    them (invariant 4): at the bound the consumer pauses, which the metrics and the log
//    say, and it resumes as soon as those vehicles let go.

#[test]
fn a_consumer_paused_at_max_pending_says_so_and_resumes_when_vehicles_let_go() {
    let env = Env::new("mute");
    // Small bounds so that the test needs few commands: each session holds at most 2
    // commands, the consumer at most 4 unsettled ones.
    let gw = env.start_gateway_with("max_pending = 4\n", "[sessions]\nmax_queued_messages = 2\n");
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);

    let mut mutes = Vec::new();
    for car in ["mute-a", "mute-b"] {
        let (mut v, _) = Vehicle::connect(gw.mqtt(), car, false, false);
        assert!(v.subscribe(&format!("vehicles/{car}/commands/#"), 1));
        for n in 0..2 {
            env.send(Some(car), &format!("{car}-{n}"), &[("qos", "1")]);
            assert!(v.recv(WAIT).is_some(), "{car} got command {n}");
        }
        mutes.push(v);
    }
    let (mut quick, _) = Vehicle::connect(gw.mqtt(), "quick-car", true, false);
    assert!(quick.subscribe("vehicles/quick-car/commands/#", 1));
    let offset = env.send(Some("quick-car"), "start-climate", &[("qos", "1")]);
    // The bound is hit: paused, and visibly so.
    let deadline = Instant::now() + WAIT;
    while !gw.metrics().contains("gateway_commands_consumer_paused 1") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = gw.metrics();
    assert!(m.contains("gateway_commands_consumer_paused 1"), "{m}");
    assert!(m.contains("gateway_commands_pending 4"), "{m}");
    assert!(gw.log().contains("command consumer paused"), "{}", gw.log());
    // The silent vehicles go (clean sessions: their commands end `dropped`): the
    // consumer resumes and the waiting command is delivered.
    drop(mutes);
    let got = quick
        .recv(Duration::from_secs(15))
        .expect("delivered once the others let go");
    quick.ack(&got);
    out.wait_for(&env.command_id(offset), "delivered", WAIT);
    assert!(gw.metrics().contains("gateway_commands_consumer_paused 0"));
}

// ---------------------------------------------------------------------------------------
// 10. A vehicle that refuses a command (MQTT 5 reason code ≥ 0x80 in its PUBREC or
//     PUBACK) did not take it: `rejected` (refused_by_vehicle), not `delivered`.

#[test]
fn a_command_the_vehicle_refuses_is_rejected_not_delivered() {
    let env = Env::new("refusal");
    let gw = env.start_gateway("");
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);
    let (mut v, _) = Vehicle::connect(gw.mqtt(), "picky-car", true, false);
    assert!(v.subscribe("vehicles/picky-car/commands/#", 2));

    // QoS 2, PUBREC 0x80 (unspecified error).
    let o2 = env.send(Some("picky-car"), "q2", &[("qos", "2")]);
    let c = v.recv(WAIT).expect("the QoS 2 command");
    v.refuse(&c, 0x80);
    out.wait(&format!("a final outcome of {}", env.command_id(o2)), WAIT, |o| {
        o.iter()
            .any(|r| r.command_id == env.command_id(o2) && r.is_final())
    });
    // QoS 1, PUBACK 0x87 (not authorized): MQTT 5 §3.4.2.1, "the receiver does not
    // accept the publication".
    let o1 = env.send(Some("picky-car"), "q1", &[("qos", "1")]);
    let c = v.recv(WAIT).expect("the QoS 1 command");
    v.refuse(&c, 0x87);
    out.wait(&format!("a final outcome of {}", env.command_id(o1)), WAIT, |o| {
        o.iter()
            .any(|r| r.command_id == env.command_id(o1) && r.is_final())
    });
    out.poll(Duration::from_millis(500));
    for (offset, what) in [(o2, "QoS 2, PUBREC 0x80"), (o1, "QoS 1, PUBACK 0x87")] {
        let finals = out.finals(&env.command_id(offset));
        let got: Vec<(&str, Option<&str>)> = finals
            .iter()
            .map(|r| (r.outcome.as_str(), r.reason.as_deref()))
            .collect();
        assert_eq!(
            got,
            [("rejected", Some("refused_by_vehicle"))],
            "{what}: outcome of a command the vehicle refused\n{}",
            out.dump()
        );
    }
}

// ---------------------------------------------------------------------------------------
// 11. After a SIGKILL and restart (default settings), the gateway takes commands again
//     promptly: the vehicles reconnect within seconds and their commands should too.

#[test]
fn commands_flow_again_soon_after_a_gateway_sigkill() {
    let env = Env::new("resume");
    let gw = env.start_gateway("");
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);
    let (dir, config) = gw.kill9();
    let gw = Gateway::start_in(dir, config);
    let (mut v, _) = Vehicle::connect(gw.mqtt(), "back-car", false, false);
    assert!(v.subscribe("vehicles/back-car/commands/#", 1));
    let started = Instant::now();
    env.send(Some("back-car"), "unlock", &[("qos", "1")]);
    let got = v.recv(Duration::from_secs(50));
    let took = started.elapsed();
    assert!(got.is_some(), "no command within 50 s of the restart");
    assert!(
        took < Duration::from_secs(15),
        "the restarted gateway delivered its first command {took:?} after the restart \
         (the dead consumer holds the group until session.timeout.ms, 45 s by default)"
    );
}

// ---------------------------------------------------------------------------------------
// 12. A consumer paused at `commands.max_pending` longer than `max.poll.interval.ms`
//     (librdkafka: the application must poll within it or it leaves the group) must not
//     re-deliver commands that were already settled when it resumes.

#[test]
fn a_long_pause_at_max_pending_does_not_redeliver_settled_commands() {
    let env = Env::new("pause");
    // max.poll.interval.ms 7 s instead of 5 min, so that the test is short.
    let gw = env.start_gateway_with(
        "max_pending = 2\n",
        "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"max.poll.interval.ms\" = \"7000\"\n",
    );
    let mut out = Outcomes::new(&env);
    env.probe(&mut out, WAIT);
    let (mut mute, _) = Vehicle::connect(gw.mqtt(), "mute-car", false, false);
    assert!(mute.subscribe("vehicles/mute-car/commands/#", 1));
    let (mut quick, _) = Vehicle::connect(gw.mqtt(), "quick-car", true, false);
    assert!(quick.subscribe("vehicles/quick-car/commands/#", 1));

    let a = env.send(Some("mute-car"), "a", &[("qos", "1")]);
    let ca = mute.recv(WAIT).expect("mute-car got a");
    let b = env.send(Some("quick-car"), "b", &[("qos", "1")]);
    let cb = quick.recv(WAIT).expect("quick-car got b");
    quick.ack(&cb);
    out.wait_for(&env.command_id(b), "delivered", WAIT);
    let c = env.send(Some("mute-car"), "c", &[("qos", "1")]);
    let cc = mute.recv(WAIT).expect("mute-car got c");
    // Two unsettled commands: the consumer pauses. Longer than max.poll.interval.ms.
    std::thread::sleep(Duration::from_secs(10));
    mute.ack(&ca);
    mute.ack(&cc);
    out.wait_for(&env.command_id(c), "delivered", WAIT);
    // The consumer reads again: a probe behind them is handled. Meanwhile both vehicles
    // acknowledge whatever they get.
    let probe = env.send(Some("probe-nobody"), "probe", &[]);
    let probe_id = env.command_id(probe);
    let (mut again_mute, mut again_quick) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut probe_seen: Option<Instant> = None;
    while probe_seen.is_none_or(|t| t.elapsed() < Duration::from_secs(2)) {
        assert!(
            Instant::now() < deadline,
            "the consumer did not handle a probe within 40 s after the pause; mute-car \
             received again {again_mute:?}, quick-car {again_quick:?}\n{}",
            out.dump()
        );
        for (v, seen) in [(&mut mute, &mut again_mute), (&mut quick, &mut again_quick)] {
            while let Some(c) = v.recv(Duration::from_millis(100)) {
                seen.push(label(&c));
                v.ack(&c);
            }
        }
        out.poll(Duration::from_millis(100));
        if probe_seen.is_none() && out.seen.iter().any(|r| r.command_id == probe_id) {
            probe_seen = Some(Instant::now());
        }
    }
    out.poll(Duration::from_millis(500));
    let finals: Vec<(i64, usize)> = [a, b, c]
        .iter()
        .map(|o| (*o, out.finals(&env.command_id(*o)).len()))
        .collect();
    assert!(
        again_mute.is_empty() && again_quick.is_empty() && finals.iter().all(|(_, n)| *n == 1),
        "after the pause: mute-car received again {again_mute:?}, quick-car received again \
         {again_quick:?}; final outcomes per offset {finals:?}\n{}",
        out.dump()
    );
}

// ---------------------------------------------------------------------------------------
// 8. Commands an operator publishes over MQTT.

/// An operator's publish to a vehicle's command topic is a command: acknowledged once it
/// is in the vehicle's session, delivered, reported with `source` = `mqtt` (a vehicle no
/// gateway holds: `unknown_vehicle`, the publish still acknowledged). It is not telemetry:
/// with no route naming command topics nothing of it goes to `kafka.default_topic`.
#[test]
fn an_operator_publish_is_a_command_with_an_outcome_and_no_telemetry_record() {
    let env = Env::new("operator");
    // Where the publishes would go without a route (`kafka.default_topic`).
    env.kafka.create_topic("vehicles.unrouted", 1);
    let gw = env.start_gateway("publish_acl = [\"vehicles/{client_id}/#\", \"vehicles/+/commands\"]\n");
    let mut out = Outcomes::new(&env);
    let car = "op-car";
    let (mut v, _) = Vehicle::connect(gw.mqtt(), car, true, false);
    assert!(v.subscribe("vehicles/op-car/commands", 1));
    let port = gw.mqtt().port().to_string();
    let operator = format!("ops-{}", env.name);
    let publish = |vehicle: &str, payload: &str| {
        let topic = format!("vehicles/{vehicle}/commands");
        integration::mosquitto(
            "mosquitto_pub",
            &port,
            &[
                "-V", "mqttv5", "-i", &operator, "-t", &topic, "-q", "1", "-m", payload,
            ],
        )
    };
    // mosquitto_pub exits 0 once its QoS 1 PUBLISH is acknowledged.
    let (code, text) = publish(car, "unlock");
    assert_eq!(code, 0, "{text}\n{}", gw.log());
    let c = v.recv(WAIT).expect("the vehicle got the command");
    assert_eq!((c.payload.as_str(), c.qos), ("unlock", 1));
    v.ack(&c);
    let (code, text) = publish("ghost-car", "climate");
    assert_eq!(code, 0, "acknowledged, not refused: {text}\n{}", gw.log());
    out.wait("both outcomes", WAIT, |o| {
        o.iter().any(|r| r.client_id == car && r.outcome == "delivered")
            && o.iter()
                .any(|r| r.client_id == "ghost-car" && r.outcome == "unknown_vehicle")
    });
    out.poll(Duration::from_millis(500));
    for (vehicle, outcome) in [(car, "delivered"), ("ghost-car", "unknown_vehicle")] {
        let all: Vec<_> = out.seen.iter().filter(|r| r.client_id == vehicle).collect();
        assert_eq!(all.len(), 1, "{vehicle}: one outcome\n{}", out.dump());
        assert_eq!(
            (all[0].outcome.as_str(), all[0].source.as_str()),
            (outcome, "mqtt")
        );
        assert!(all[0].command_id.starts_with("mqtt-"), "{:?}", all[0]);
    }
    // Nothing of the operator's publishes in the default topic (keyed by the publisher).
    let unrouted = env
        .kafka
        .consume_all("vehicles.unrouted", 1, Duration::from_secs(5));
    assert!(
        !unrouted.iter().any(|r| r.key == operator),
        "{:?}",
        unrouted.iter().map(|r| &r.key).collect::<Vec<_>>()
    );
}
