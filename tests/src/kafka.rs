//! A real Apache Kafka 4.4 broker for the tests: single-node KRaft, from the jars that
//! `scripts/kafka.sh` resolved into `.kafka/libs`, on free loopback ports. Tests can kill
//! it (SIGKILL) and restart it on the same data. A missing installation fails the test
//! loudly: Kafka tests are never skipped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub struct Kafka {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The SASL_SSL listener, when started with one.
    secure_port: Option<u16>,
    child: Option<Child>,
    libs: PathBuf,
}

/// The SASL/PLAIN user of [`Kafka::start_sasl_ssl`]'s listener.
pub const SASL_USER: &str = "gateway";
pub const SASL_PASSWORD: &str = "gateway-secret";

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub payload: String,
    pub headers: Vec<(String, String)>,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free loopback ports: all bound at once, then released. Asking for one
/// port at a time can get the same port twice (the kernel hands a just-released port
/// out again), and a broker whose two listeners share a port does not start.
///
/// A port is also handed out only once per test process: a broker binds its ports
/// seconds after they are released here, and tests run in parallel.
fn free_ports<const N: usize>() -> [u16; N] {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Every listener stays bound until the end, so the kernel offers a new port each time.
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < N {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        let port = l.local_addr().expect("bound port").port();
        held.push(l);
        if !given.contains(&port) {
            given.push(port);
            ports.push(port);
        }
    }
    std::array::from_fn(|i| ports[i])
}

fn libs_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("KAFKA_LIBS") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.kafka/libs")
}

impl Kafka {
    /// Formats storage and starts the broker; waits until it serves metadata.
    pub fn start() -> Kafka {
        Self::start_with(None)
    }

    /// Also listens with SASL_SSL (mechanism PLAIN, user [`SASL_USER`] with password
    /// [`SASL_PASSWORD`], TLS with `server`'s certificate and key), the way managed Kafka
    /// services are reached: [`Kafka::secure_bootstrap`]. The plaintext listener stays
    /// for the test's own clients.
    pub fn start_sasl_ssl(server: &crate::certs::Pair) -> Kafka {
        Self::start_with(Some(server))
    }

    fn start_with(server: Option<&crate::certs::Pair>) -> Kafka {
        let libs = libs_dir();
        assert!(
            libs.join("kafka_2.13-4.4.0.jar").exists(),
            "Apache Kafka is not provisioned at {}: run ./scripts/kafka.sh (./scripts/test.sh does)",
            libs.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let [port, controller, secure_port] = free_ports();
        let mut listeners = format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}");
        let mut advertised = format!("PLAINTEXT://127.0.0.1:{port}");
        let mut protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT".to_string();
        let mut secure = String::new();
        if let Some(server) = server {
            // A PEM key store: the PKCS#8 key, then the certificate.
            let key = std::fs::read_to_string(&server.key).expect("server key");
            let cert = std::fs::read_to_string(&server.cert).expect("server certificate");
            let store = dir.path().join("keystore.pem");
            std::fs::write(&store, format!("{key}{cert}")).expect("keystore");
            listeners += &format!(",SASL_SSL://127.0.0.1:{secure_port}");
            advertised += &format!(",SASL_SSL://127.0.0.1:{secure_port}");
            protocols += ",SASL_SSL:SASL_SSL";
            secure = format!(
                "sasl.enabled.mechanisms=PLAIN\n\
                 listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule \
                 required user_{SASL_USER}=\"{SASL_PASSWORD}\";\n\
                 ssl.keystore.type=PEM\nssl.keystore.location={}\n",
                store.display()
            );
        }
        let props = format!(
            "process.roles=broker,controller\nnode.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners={listeners}\n\
             advertised.listeners={advertised}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map={protocols}\n{secure}\
             log.dirs={}\n\
             offsets.topic.replication.factor=1\ntransaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\nshare.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\ngroup.initial.rebalance.delay.ms=0\n\
             num.partitions=4\nauto.create.topics.enable=true\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("server.properties"), props).expect("properties");
        let cp = format!("{}/*", libs.display());
        let out = Command::new("java")
            .args(["-cp", &cp, "kafka.tools.StorageTool", "random-uuid"])
            .output()
            .expect("java");
        let uuid = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim()
            .to_string();
        assert!(
            !uuid.is_empty(),
            "StorageTool random-uuid failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = Command::new("java")
            .args(["-cp", &cp, "kafka.tools.StorageTool", "format", "-t", &uuid, "-c"])
            .arg(dir.path().join("server.properties"))
            .stdout(Stdio::null())
            .status()
            .expect("format");
        assert!(status.success(), "kafka storage format failed");
        let mut k = Kafka {
            dir,
            port,
            secure_port: server.map(|_| secure_port),
            child: None,
            libs,
        };
        k.spawn();
        k
    }

    fn spawn(&mut self) {
        let cp = format!("{}/*", self.libs.display());
        let log = std::fs::File::create(self.dir.path().join("broker.log")).expect("log");
        let child = Command::new("java")
            .args(["-Xms256m", "-Xmx768m", "-cp", &cp, "kafka.Kafka"])
            .arg(self.dir.path().join("server.properties"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start kafka");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", self.bootstrap())
                    .create()
                    .expect("client");
                if consumer
                    .fetch_metadata(None, Duration::from_secs(2))
                    .is_ok_and(|m| !m.brokers().is_empty())
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("Kafka did not start on port {}", self.port);
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The SASL_SSL listener of [`Kafka::start_sasl_ssl`].
    pub fn secure_bootstrap(&self) -> String {
        let port = self.secure_port.expect("started with Kafka::start_sasl_ssl");
        format!("127.0.0.1:{port}")
    }

    /// SIGKILL: the broker is gone at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same data and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// An admin client of this broker and a runtime to drive its requests on.
    fn admin(&self) -> (AdminClient<DefaultClientContext>, tokio::runtime::Runtime) {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("admin");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        (admin, rt)
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]);
    }

    /// Creates a topic with topic-level configuration (e.g. `max.message.bytes`).
    pub fn create_topic_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) {
        let (admin, rt) = self.admin();
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in config {
            topic = topic.set(k, v);
        }
        let result = rt
            .block_on(admin.create_topics([&topic], &AdminOptions::new()))
            .expect("create topics");
        for r in result {
            if let Err((t, e)) = r {
                assert_eq!(
                    e,
                    rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                    "create {t}: {e}"
                );
            }
        }
    }

    /// Grows `topic` to `total` partitions.
    pub fn add_partitions(&self, name: &str, total: usize) {
        let (admin, rt) = self.admin();
        let result = rt
            .block_on(admin.create_partitions(
                [&rdkafka::admin::NewPartitions::new(name, total)],
                &AdminOptions::new(),
            ))
            .expect("create partitions");
        for r in result {
            if let Err((t, e)) = r {
                panic!("add partitions to {t}: {e}");
            }
        }
    }

    /// Reads `topic` from the beginning until `expected` records or `within` passes.
    pub fn consume(&self, topic: &str, partitions: i32, expected: usize, within: Duration) -> Vec<Consumed> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "verifier")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + within;
        while out.len() < expected && Instant::now() < deadline {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Consumed {
                partition: m.partition(),
                offset: m.offset(),
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                payload: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                headers,
            });
        }
        out
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fault-injection helpers for the fault suite (`tests/tests/fault_*.rs`).
impl Kafka {
    /// Process id of the running broker, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP: the broker keeps its sockets open but answers nothing (a GC pause, a
    /// frozen VM). [`Kafka::thaw`] resumes it.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Kafka::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("broker running");
        let status = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// Deletes a topic and waits (up to 30 s) until the broker no longer lists it; returns
    /// whether that was seen. On a broker with `auto.create.topics.enable=true` a running
    /// producer re-creates the topic at once, so absence may never be observable there.
    pub fn delete_topic(&self, name: &str) -> bool {
        let (admin, rt) = self.admin();
        let result = rt
            .block_on(admin.delete_topics(&[name], &AdminOptions::new()))
            .expect("delete topics");
        for r in result {
            if let Err((t, e)) = r {
                panic!("delete {t}: {e}");
            }
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let gone = consumer
                .fetch_metadata(Some(name), Duration::from_secs(2))
                .is_ok_and(|m| m.topics().iter().all(|t| t.partitions().is_empty()));
            if gone {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// What the broker says about `topic` right now (leaders, partition errors,
    /// watermarks) and the tail of its log: for the message of a test that failed
    /// waiting on Kafka, so the failure says whether the broker or the gateway stalled.
    pub fn diagnose(&self, topic: &str, partitions: i32) -> String {
        let mut out = String::new();
        let consumer: Result<BaseConsumer, _> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create();
        match consumer {
            Err(e) => out += &format!("client: {e}\n"),
            Ok(c) => {
                match c.fetch_metadata(Some(topic), Duration::from_secs(5)) {
                    Err(e) => out += &format!("metadata: {e}\n"),
                    Ok(m) => {
                        for t in m.topics() {
                            out += &format!("topic {} error {:?}\n", t.name(), t.error());
                            for p in t.partitions() {
                                out += &format!(
                                    "  partition {} leader {} isr {:?} error {:?}\n",
                                    p.id(),
                                    p.leader(),
                                    p.isr(),
                                    p.error()
                                );
                            }
                        }
                    }
                }
                for p in 0..partitions {
                    out += &format!(
                        "  watermarks {p}: {:?}\n",
                        c.fetch_watermarks(topic, p, Duration::from_secs(5))
                    );
                }
            }
        }
        let log = std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        out += "broker log tail:\n";
        out += &lines[lines.len().saturating_sub(40)..].join("\n");
        out
    }

    /// Sum of the high watermarks of `topic`'s partitions: how many records it holds.
    pub fn record_count(&self, topic: &str, partitions: i32) -> usize {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("client");
        // Right after a broker fault (a freeze, a restart) a fresh client can meet stale
        // metadata for a few seconds (UnknownPartition): retry within a bound.
        let deadline = Instant::now() + Duration::from_secs(60);
        (0..partitions)
            .map(|p| loop {
                match consumer.fetch_watermarks(topic, p, Duration::from_secs(10)) {
                    Ok((low, high)) => break (high - low).max(0) as usize,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("watermarks of {topic}/{p}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => panic!("watermarks of {topic}/{p} for 60 s: {e}"),
                }
            })
            .sum()
    }

    /// Every record `topic` holds (its high watermarks read first).
    pub fn consume_all(&self, topic: &str, partitions: i32, within: Duration) -> Vec<Consumed> {
        let n = self.record_count(topic, partitions);
        let out = self.consume(topic, partitions, n, within);
        assert_eq!(out.len(), n, "consumed {} of {n} records of {topic}", out.len());
        out
    }

    /// Stops the broker and starts it on the same data with its client listener on
    /// `port` (advertised as `advertise`, default the listener itself). The controller
    /// port stays. [`Kafka::bootstrap`] then names the new port.
    pub fn restart_on_port(&mut self, port: u16, advertise: Option<&str>) {
        self.kill();
        let path = self.dir.path().join("server.properties");
        let props = std::fs::read_to_string(&path).expect("properties");
        let old = self.port;
        let advertised = advertise
            .map(str::to_string)
            .unwrap_or_else(|| format!("127.0.0.1:{port}"));
        let props: String = props
            .lines()
            .map(|l| {
                if l.starts_with("listeners=") {
                    l.replace(
                        &format!("PLAINTEXT://127.0.0.1:{old}"),
                        &format!("PLAINTEXT://127.0.0.1:{port}"),
                    )
                } else if l.starts_with("advertised.listeners=") {
                    format!("advertised.listeners=PLAINTEXT://{advertised}")
                } else {
                    l.to_string()
                }
            })
            .map(|l| l + "\n")
            .collect();
        std::fs::write(&path, props).expect("properties");
        self.port = port;
        self.spawn();
    }

    /// Sets the advertised client address before the first start would be too late; this
    /// restarts the broker (same data, same ports) advertising `advertise` (`host:port`).
    pub fn restart_advertising(&mut self, advertise: &str) {
        let port = self.port;
        self.restart_on_port(port, Some(advertise));
    }
}

impl Kafka {
    /// Restarts the broker (same data, same ports) with `key=value` set in its
    /// server.properties (replacing an existing value).
    pub fn restart_with_property(&mut self, key: &str, value: &str) {
        self.kill();
        let path = self.dir.path().join("server.properties");
        let props = std::fs::read_to_string(&path).expect("properties");
        let prefix = format!("{key}=");
        let mut text: String = props
            .lines()
            .filter(|l| !l.starts_with(&prefix))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&format!("{key}={value}\n"));
        std::fs::write(&path, text).expect("properties");
        self.spawn();
    }
}

/// A free loopback TCP port (bound once and released).
pub fn free_tcp_port() -> u16 {
    free_port()
}

/// `N` distinct free loopback TCP ports (see [`free_ports`]).
pub fn free_tcp_ports<const N: usize>() -> [u16; N] {
    free_ports()
}
