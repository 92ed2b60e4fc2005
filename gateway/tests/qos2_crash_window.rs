//! A persistent session's QoS 2 PUBLISH caught by a crash after its journal record was
//! fsync'd and before the session store flushed its packet id (both precede the PUBREC,
//! so the vehicle re-sends it). The state such a crash leaves is built here directly: the
//! record in the journal, the session in the store without the id, and the marker the
//! gateway flushes before journaling (`session::qos2_pending`). The restarted gateway
//! must take the vehicle's re-send for the duplicate it is: answered, not journaled again.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bridge::{Entry, Journal, JournalConfig, SegmentedJournal};
use gateway::store::{SessionRecord, Store};

const CLIENT: &str = "crash-car";
const TOPIC: &str = "vehicles/crash-car/telemetry";
const PKID: u16 = 7;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// An MQTT 3.1.1 packet: fixed header byte, remaining length, body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).expect("packet header");
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("remaining length");
        len |= usize::from(b[0] & 0x7F) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("packet body");
    (first[0], body)
}

fn metric(admin: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(admin).expect("admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("metrics");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_qos2_publish_journaled_before_its_id_was_stored_is_not_journaled_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal_dir = dir.path().join("journal");
    let store_dir = dir.path().join("store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // What the crash left. The journal: the record, fsync'd.
    let journal = SegmentedJournal::open(JournalConfig::new(&journal_dir, 1 << 30)).expect("journal");
    let entry = Entry {
        qos: 2,
        client_id: CLIENT.into(),
        topic: TOPIC.into(),
        payload: bytes::Bytes::from_static(b"exactly once"),
        packet_id: Some(PKID),
        ..Entry::default()
    };
    let seq = rt.block_on(journal.append(&entry)).expect("append");
    rt.block_on(journal.flush()).expect("flush");
    let journal_id = journal.id().to_string();
    drop(journal);
    // The store: the session without the id, and the marker flushed before the append.
    {
        let store = Store::open(&store_dir).expect("store");
        let record = SessionRecord {
            expiry_secs: 3600,
            disconnected_at_ms: None,
            subscriptions: Vec::new(),
            inbound_qos2: Vec::new(),
            protocol: 4,
        };
        store.put_session(CLIENT, &record).expect("session");
        store.put_qos2_pending(CLIENT, PKID, seq - 1, 1).expect("marker");
        store.bind_journal(&journal_id).expect("binding");
        rt.block_on(store.flush()).expect("store flush");
    }

    let (mqtt, admin) = (free_port(), free_port());
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[mqtt]
listen = "127.0.0.1:{mqtt}"
[journal]
dir = "{}"
[sessions]
store_dir = "{}"
[kafka]
bootstrap = "embedded"
[admin]
listen = "127.0.0.1:{admin}"
[auth]
allow_anonymous = true
publish_acl = ["vehicles/{{client_id}}/#"]
"#,
            journal_dir.display(),
            store_dir.display()
        ),
    )
    .expect("config");
    let gateway = Running(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the gateway"),
    );
    let mqtt: SocketAddr = format!("127.0.0.1:{mqtt}").parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut car = loop {
        match TcpStream::connect(mqtt) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the gateway did not listen: {e}"),
        }
    };
    car.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");

    // The vehicle comes back (clean session 0) and re-sends, DUP, the same packet id.
    let mut connect = string("MQTT");
    connect.extend_from_slice(&[4, 0x00, 0, 60]);
    connect.extend_from_slice(&string(CLIENT));
    car.write_all(&packet(0x10, &connect)).expect("connect");
    let (kind, body) = read_packet(&mut car);
    assert_eq!(
        (kind, body.as_slice()),
        (0x20, &[1u8, 0][..]),
        "CONNACK, session present"
    );
    let mut publish = string(TOPIC);
    publish.extend_from_slice(&PKID.to_be_bytes());
    publish.extend_from_slice(b"exactly once");
    car.write_all(&packet(0x3C, &publish)).expect("re-send");
    let (kind, body) = read_packet(&mut car);
    assert_eq!((kind, body), (0x50, PKID.to_be_bytes().to_vec()), "PUBREC");
    car.write_all(&packet(0x62, &PKID.to_be_bytes())).expect("pubrel");
    let (kind, _) = read_packet(&mut car);
    assert_eq!(kind, 0x70, "PUBCOMP");

    assert_eq!(
        metric(admin, "gateway_qos2_duplicates_total"),
        1.0,
        "the re-send was taken for the duplicate it is"
    );
    // Nothing journaled for it: the journal holds the record and, at most, the
    // `connected` presence event of this connection.
    let durable = metric(admin, "gateway_journal_durable_seq");
    assert!(
        durable <= (seq + 1) as f64,
        "journaled again: durable seq {durable}"
    );
    // The marker was resolved at start, and the released id is gone (PUBCOMP waits for
    // the store): a SIGKILL now leaves neither behind.
    drop(gateway);
    let store = Store::open(&store_dir).expect("store after the gateway");
    assert!(store.load_qos2_pending().expect("markers").is_empty());
    let sessions = store.load_sessions().expect("sessions");
    assert_eq!(sessions.len(), 1);
    assert!(sessions[0].record.inbound_qos2.is_empty(), "{sessions:?}");
}
