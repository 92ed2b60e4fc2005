#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::message::{Message, MessageProperties};
use crate::router::SubOptions;

fn msg(topic: &str, payload: &'static [u8]) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos: 1,
        retain: false,
        props: MessageProperties {
            content_type: Some("text/plain".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into())],
            ..MessageProperties::default()
        },
        received_at_ms: 1_700_000_000_000,
        expires_at_ms: Some(1_700_000_060_000),
    }
}

fn session() -> SessionRecord {
    SessionRecord {
        expiry_secs: 3600,
        disconnected_at_ms: Some(1_700_000_000_123),
        subscriptions: vec![
            ("v/+/cmd".into(), SubOptions::qos(1)),
            (
                "$share/g/fleet/#".into(),
                SubOptions {
                    id: Some(7),
                    ..SubOptions::qos(2)
                },
            ),
        ],
        inbound_qos2: vec![(3, 1), (9, 2)],
        protocol: 5,
    }
}

fn queued(n: u8) -> QueuedRecord {
    QueuedRecord {
        message: msg("v/1/cmd", b"payload"),
        qos: 1 + n % 2,
        retain: n > 100,
        subscription_ids: vec![u32::from(n)],
        pkid: u16::from(n),
        state: OutState::Published,
        command: None,
    }
}

/// Opens a store this test process held a moment ago. sled releases its directory lock
/// only when its own background threads let go of the last handle, which can be a moment
/// after our last `Arc` dropped (CI saw `WouldBlock`). A different process holding the
/// lock is the case `second_open_of_a_held_dir_fails_naming_it` covers.
pub(super) fn reopen(dir: &Path) -> Arc<Store> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(store) => return store,
            Err(e) if e.to_string().contains("could not acquire lock") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reopen {}: {e}", dir.display()),
        }
    }
}

pub(super) async fn close(store: Arc<Store>, flusher: tokio::task::JoinHandle<()>) {
    store.close();
    flusher.await.unwrap();
}

#[tokio::test]
async fn round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_session("car-1", &session()).unwrap();
    store.put_queued("car-1", 2, &queued(2)).unwrap();
    store.put_queued("car-1", 1, &queued(1)).unwrap();
    store
        .put_queued(
            "car-1",
            1,
            &QueuedRecord {
                state: OutState::Released,
                ..queued(1)
            },
        )
        .unwrap();
    store.put_retained(&msg("a/b", b"r1")).unwrap();
    store.put_retained(&msg("a/b", b"r2")).unwrap();
    store.put_retained(&msg("a/c", b"r3")).unwrap();
    store.remove_retained("a/c").unwrap();

    let sessions = store.load_sessions().unwrap();
    assert_eq!(
        sessions,
        vec![LoadedSession {
            client_id: "car-1".into(),
            record: session(),
            queue: vec![
                (
                    1,
                    QueuedRecord {
                        state: OutState::Released,
                        ..queued(1)
                    }
                ),
                (2, queued(2))
            ],
        }]
    );
    assert_eq!(store.load_retained().unwrap(), vec![msg("a/b", b"r2")]);
    assert_eq!((store.session_count(), store.queued_count()), (1, 2));

    store.remove_queued("car-1", 1).unwrap();
    store.remove_queued("car-1", 99).unwrap();
    assert_eq!(store.queued_count(), 1);
    assert_eq!(store.load_sessions().unwrap()[0].queue, vec![(2, queued(2))]);
    assert_eq!(store.generation(), 10);
}

#[tokio::test]
async fn survives_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let flusher = store.spawn_flusher();
        store.put_session("car-1", &session()).unwrap();
        store.put_session("car-2", &session()).unwrap();
        for id in 0..100 {
            store.put_queued("car-2", id, &queued(id as u8)).unwrap();
        }
        store.put_retained(&msg("r/1", b"x")).unwrap();
        close(store, flusher).await;
    }
    let store = reopen(dir.path());
    assert_eq!((store.session_count(), store.queued_count()), (2, 100));
    let sessions = store.load_sessions().unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0].client_id, "car-1");
    assert!(sessions[0].queue.is_empty());
    let ids: Vec<u64> = sessions[1].queue.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
    assert_eq!(store.load_retained().unwrap(), vec![msg("r/1", b"x")]);
    // Generations restart with the process.
    assert_eq!(store.generation(), 0);
}

#[tokio::test]
async fn second_open_of_a_held_dir_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.contains("another gateway process"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_watermark_passes_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let flusher = store.spawn_flusher();
    let mut flushed = store.flushed();
    assert_eq!(*flushed.borrow(), 0);
    let g = store.put_session("car-1", &session()).unwrap();
    assert_eq!(g, 1);
    let seen = tokio::time::timeout(Duration::from_secs(10), flushed.wait_for(|f| *f >= g)).await;
    assert!(*seen.unwrap().unwrap() >= g);
    let g2 = store.put_queued("car-1", 1, &queued(1)).unwrap();
    tokio::time::timeout(Duration::from_secs(10), store.wait_flushed(g2))
        .await
        .unwrap()
        .unwrap();
    assert!(store.flushes() >= 2);
    close(store, flusher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_coalesces_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let flusher = store.spawn_flusher();
    store.put_session("car", &session()).unwrap();
    let before = store.flushes();
    // 100 publishers, 10 acknowledged writes each: 1000 writes, each waited for.
    let tasks: Vec<_> = (0..100u64)
        .map(|t| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for i in 0..10 {
                    let g = store.put_queued("car", t * 10 + i, &queued(i as u8)).unwrap();
                    store.wait_flushed(g).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let flushes = store.flushes() - before;
    eprintln!("1000 acknowledged writes took {flushes} flushes");
    assert!(
        flushes < 250,
        "group commit did not coalesce: {flushes} flushes for 1000 writes"
    );
    assert_eq!(store.queued_count(), 1000);
    assert!(*store.flushed().borrow() >= store.generation());
    close(store, flusher).await;
}

/// On one thread the flusher runs only when the writer yields: 1000 writes, one flush.
#[tokio::test(flavor = "current_thread")]
async fn a_burst_of_writes_needs_few_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let flusher = store.spawn_flusher();
    let mut last = 0;
    for i in 0..1000 {
        last = store.put_retained(&msg(&format!("t/{i}"), b"x")).unwrap();
    }
    store.wait_flushed(last).await.unwrap();
    assert_eq!(store.flushes(), 1);
    close(store, flusher).await;
}

#[tokio::test]
async fn remove_session_removes_exactly_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for client in ["a", "ab", "a\u{1}", "b"] {
        store.put_session(client, &session()).unwrap();
        for id in [0, 1, 255, 256, u64::MAX] {
            store.put_queued(client, id, &queued(1)).unwrap();
        }
    }
    assert_eq!(store.queued_count(), 20);
    store.remove_session("a").unwrap();
    assert_eq!((store.session_count(), store.queued_count()), (3, 15));
    let sessions = store.load_sessions().unwrap();
    let names: Vec<&str> = sessions.iter().map(|s| s.client_id.as_str()).collect();
    assert_eq!(names, ["a\u{1}", "ab", "b"]);
    for s in &sessions {
        let ids: Vec<u64> = s.queue.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [0, 1, 255, 256, u64::MAX], "{}", s.client_id);
    }
    // Removing an absent session is a no-op that still counts as a write.
    store.remove_session("a").unwrap();
    assert_eq!((store.session_count(), store.queued_count()), (3, 15));
}

#[tokio::test]
async fn queue_needs_a_session_and_client_ids_no_nul() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = store.put_queued("ghost", 1, &queued(1)).unwrap_err();
    assert!(matches!(err, StoreError::NoSession { .. }), "{err}");
    let err = store.put_session("a\0b", &session()).unwrap_err();
    assert!(matches!(err, StoreError::InvalidClientId { .. }), "{err}");
    assert_eq!(store.generation(), 0);
}

#[tokio::test]
async fn orphaned_queue_entries_are_dropped_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_session("a", &session()).unwrap();
    store.put_queued("a", 1, &queued(1)).unwrap();
    // Bypass the API: an entry whose session is gone.
    store
        .queue
        .insert(
            sessions::queue_key("zz", 5),
            encode_as(FORMAT_V2, TREE_QUEUE, b"", &queued(5)).unwrap(),
        )
        .unwrap();
    let loaded = store.load_sessions().unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].queue.len(), 1);
    assert_eq!(store.queue.len(), 1);
}

#[tokio::test]
async fn corrupt_values_fail_the_load_naming_tree_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_session("car-7", &session()).unwrap();
    store.put_queued("car-7", 42, &queued(1)).unwrap();
    store.put_retained(&msg("x/y", b"z")).unwrap();

    store
        .sessions
        .insert("car-7", &[FORMAT_V1, 0xff, 0xff, 0xff][..])
        .unwrap();
    let err = store.load_sessions().unwrap_err().to_string();
    assert!(err.contains("\"sessions\"") && err.contains("\"car-7\""), "{err}");
    assert!(
        err.contains("move") && err.contains(&dir.path().display().to_string()),
        "{err}"
    );

    store.put_session("car-7", &session()).unwrap();
    store
        .queue
        .insert(sessions::queue_key("car-7", 42), &[9u8, 1, 2][..])
        .unwrap();
    let err = store.load_sessions().unwrap_err().to_string();
    assert!(
        err.contains("\"queue\"") && err.contains("\"car-7\" #42"),
        "{err}"
    );
    assert!(err.contains("unknown format version 9"), "{err}");

    // Trailing garbage after a valid value is corruption too.
    let mut v = encode(TREE_RETAINED, b"x/y", &msg("x/y", b"z")).unwrap();
    v.push(0);
    store.retained.insert("x/y", v).unwrap();
    let err = store.load_retained().unwrap_err().to_string();
    assert!(err.contains("\"retained\"") && err.contains("\"x/y\""), "{err}");

    store.retained.insert("x/y", &[][..]).unwrap();
    let err = store.load_retained().unwrap_err().to_string();
    assert!(err.contains("empty value"), "{err}");
}

#[tokio::test]
async fn close_stops_writes_and_uncovered_waits_fail() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let flusher = store.spawn_flusher();
    let g = store.put_session("a", &session()).unwrap();
    store.close();
    flusher.await.unwrap();
    // The last flush covered the write made before close.
    store.wait_flushed(g).await.unwrap();
    let err = store.put_session("a", &session()).unwrap_err();
    assert!(matches!(err, StoreError::Closed { .. }), "{err}");
    // A generation the flusher never covered (a write racing close) fails, not hangs.
    let err = tokio::time::timeout(Duration::from_secs(5), store.wait_flushed(g + 1))
        .await
        .unwrap();
    assert!(matches!(err, Err(StoreError::Closed { .. })));
    // Explicit flush still works after close.
    store.flush().await.unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A copy of the directory taken while the database is open is what a SIGKILL leaves
/// behind: whatever sled wrote to the files, nothing from its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_are_in_a_copy_taken_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let flusher = store.spawn_flusher();
    store.put_session("car-1", &session()).unwrap();
    let mut g = 0;
    for id in 0..50 {
        g = store.put_queued("car-1", id, &queued(id as u8)).unwrap();
    }
    store.put_retained(&msg("r", b"1")).unwrap();
    g = g.max(store.remove_queued("car-1", 0).unwrap());
    store.wait_flushed(g).await.unwrap();

    copy_dir(&dir.path().join("store"), copy.path());
    let reopened = Store::open(copy.path()).unwrap();
    let sessions = reopened.load_sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].record, session());
    let ids: Vec<u64> = sessions[0].queue.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..50).collect::<Vec<_>>());
    assert_eq!(reopened.load_retained().unwrap(), vec![msg("r", b"1")]);
    close(store, flusher).await;
}

const CHILD_DIR_ENV: &str = "GATEWAY_STORE_SIGKILL_CHILD_DIR";

/// The child half of `flushed_writes_survive_sigkill` (does nothing on its own): writes,
/// waits for the flush, reports, then keeps writing unflushed until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by flushed_writes_survive_sigkill"]
async fn sigkill_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&dir)).unwrap();
    let _flusher = store.spawn_flusher();
    store.put_session("car-1", &session()).unwrap();
    let mut g = 0;
    for id in 0..200 {
        g = store.put_queued("car-1", id, &queued(id as u8)).unwrap();
    }
    store.wait_flushed(g).await.unwrap();
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "FLUSHED 200").unwrap();
    out.flush().unwrap();
    drop(out);
    // Keep the store busy (including flushes) so the kill lands mid-activity; bounded,
    // in case the parent is gone.
    for id in 200..20_000 {
        store.put_queued("car-1", id, &queued(id as u8)).unwrap();
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[test]
fn flushed_writes_survive_sigkill() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::sigkill_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // libtest prints "test <name> ... " without a newline first, so look inside lines.
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("FLUSHED 200") {
                let _ = tx.send(());
                break;
            }
        }
    });
    let flushed = rx.recv_timeout(Duration::from_secs(60)).is_ok();
    std::thread::sleep(Duration::from_millis(20));
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(flushed, "child did not report its flush");

    let store = Store::open(dir.path()).unwrap();
    let sessions = store.load_sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    let ids: Vec<u64> = sessions[0].queue.iter().map(|(id, _)| *id).collect();
    assert!(ids.len() >= 200, "only {} entries survived", ids.len());
    // Whatever survived beyond the flushed prefix is a prefix too (no holes).
    assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
}

/// Prints the flush latency on this machine (`cargo test -- --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_latency() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_session("car", &session()).unwrap();
    let mut times = Vec::new();
    for id in 0..21 {
        store.put_queued("car", id, &queued(1)).unwrap();
        let start = Instant::now();
        store.flush().await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    eprintln!(
        "store flush latency: min {:?} median {:?} max {:?}",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    assert!(*store.flushed().borrow() >= store.generation());
}

#[tokio::test]
async fn journal_binding_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.journal_binding().unwrap(), None);
        store.bind_journal("journal-a").unwrap();
        store.flush().await.unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(store.journal_binding().unwrap().as_deref(), Some("journal-a"));
}

#[tokio::test]
async fn version_1_queue_entries_load_as_entries_without_a_command() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_session("a", &session()).unwrap();
    // What a gateway before commands wrote.
    let q = queued(1);
    let old = sessions::QueuedRecordV1 {
        message: q.message.clone(),
        qos: q.qos,
        retain: q.retain,
        subscription_ids: q.subscription_ids.clone(),
        pkid: q.pkid,
        state: q.state,
    };
    store
        .queue
        .insert(
            sessions::queue_key("a", 1),
            encode(TREE_QUEUE, b"", &old).unwrap(),
        )
        .unwrap();
    // And one carrying a command's ticket.
    let cmd = QueuedRecord {
        command: Some(crate::commands::CommandRecord {
            id: "kafka:vehicles.commands:0:7".into(),
            client_id: "a".into(),
            correlation_id: Some("c-1".into()),
            source: crate::commands::Source::Kafka {
                topic: "vehicles.commands".into(),
                partition: 0,
                offset: 7,
            },
            issued_at_ms: 1_700_000_000_000,
            qos: 1,
        }),
        ..queued(2)
    };
    store.put_queued("a", 2, &cmd).unwrap();
    let loaded = store.load_sessions().unwrap();
    assert_eq!(loaded[0].queue, vec![(1, q), (2, cmd)]);
}

/// Inbound QoS 2 markers: a connection withdraws only its own (a successor's for the same
/// packet id stays), PUBREL's removal and a session's end remove any, and one that does
/// not parse is skipped rather than failing the start.
#[tokio::test]
async fn qos2_markers_belong_to_their_connection_and_end_with_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_session("car", &session()).unwrap();
    store.put_qos2_pending("car", 7, 41, 1).unwrap();
    // Connection 2 took over and marked its re-send of the same id.
    store.put_qos2_pending("car", 7, 42, 2).unwrap();
    store.withdraw_qos2_pending("car", 7, 1).unwrap();
    let left = store.load_qos2_pending().unwrap();
    assert_eq!(
        left,
        vec![Qos2Pending {
            client_id: "car".into(),
            pkid: 7,
            after_seq: 42
        }],
        "the successor's marker stays"
    );
    store.withdraw_qos2_pending("car", 7, 2).unwrap();
    assert!(store.load_qos2_pending().unwrap().is_empty());
    store.put_qos2_pending("car", 8, 50, 2).unwrap();
    store.remove_qos2_pending("car", 8).unwrap();
    assert!(store.load_qos2_pending().unwrap().is_empty(), "PUBREL");
    // "car" and "car2": a session's end takes its own markers only.
    store.put_qos2_pending("car", 9, 60, 2).unwrap();
    store.put_session("car2", &session()).unwrap();
    store.put_qos2_pending("car2", 9, 61, 3).unwrap();
    store.remove_session("car").unwrap();
    let left = store.load_qos2_pending().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].client_id, "car2");
    store.db.insert(b"qos2-pending\0x", &b"junk"[..]).unwrap();
    assert_eq!(store.load_qos2_pending().unwrap().len(), 1, "junk skipped");
}
