//! The keyed store: persistent MQTT sessions, their outbound queues, retained messages.
//!
//! The journal (`bridge::journal`) stays the write-ahead log for everything that goes to
//! Kafka; this store (sled) holds only keyed state that the gateway reads back after a
//! restart. Losing the store loses sessions and retained messages, never telemetry.
//!
//! # Contract
//!
//! * Every write ([`Store::put_session`], [`Store::put_queued`], [`Store::put_retained`],
//!   the removals) is applied to sled and then returns a *generation*: a number from a
//!   counter that every write bumps. It does **not** mean durable.
//! * [`Store::flushed`] is a watch of the highest generation known flushed: every write
//!   whose generation is `<= *flushed.borrow()` survives a **process crash** (SIGKILL,
//!   panic, OOM kill) at any later instant. The gateway acknowledges a PUBLISH (PUBACK,
//!   PUBREC) only after every queue entry it created for persistent sessions is covered;
//!   [`Store::wait_flushed`] does that wait and fails instead of hanging when the store
//!   stopped or closed.
//! * **Not power-loss durable.** sled 0.34's flush writes its log with `pwrite` and then
//!   calls `sync_file_range` on Linux (not `fdatasync`): the data reaches the device, but
//!   neither the file's metadata (its grown size) nor the device's write cache is made
//!   stable (sled issue #1452). A SIGKILL cannot lose what was `pwrite`n (it sits in the
//!   kernel's page cache); a power cut can. The journal, which `fdatasync`s, is the
//!   power-loss-durable part of the gateway. After a power cut sled recovers to some
//!   consistent earlier state (it checks its log records' CRCs and stops at the first
//!   torn one), so sessions may come back older than acknowledged.
//! * A write is atomic, also across a crash: [`Store::remove_session`] removes the
//!   session record and all its queue entries in one sled transaction over both trees
//!   (sled logs a batch manifest and recovery ignores an incomplete batch), so a session
//!   never comes back with half its queue.
//! * Queue entries exist only for a stored session: [`Store::put_queued`] refuses a client
//!   id without a session record, and `put_queued` / `remove_session` for one client id
//!   are serialized by a lock stripe, so a removal cannot race an insertion into leaving
//!   orphans. Writers for one client id should still come from one owner (the session,
//!   or the router under the session's lock): the store linearizes them, it does not
//!   order them.
//! * A value that does not decode makes the load fail with [`StoreError::Corrupt`], naming
//!   the tree and the key; the store never skips or silently drops state it cannot read.
//!   The operator's fix is to move the store directory away and restart: persistent
//!   sessions (subscriptions, queued messages, QoS 2 state) and retained messages are
//!   lost; journaled telemetry is not, it lives in the journal directory.
//!
//! # On disk
//!
//! ```text
//! <dir>/            sled 0.34 database (conf, db, blobs/, snap.*); `db` is flock'ed by
//!                   the owning process, a second gateway on the same directory fails open
//!   tree "sessions"   key: client id (UTF-8 bytes)
//!                     value: v1 + SessionRecord
//!   tree "queue"      key: client id bytes + 0x00 + entry id (u64 big-endian)
//!                     value: v1 + QueuedRecord
//!   tree "retained"   key: topic name (UTF-8 bytes)
//!                     value: v1 + Message
//!   default tree      "journal_id": the journal the stored QoS 2 sequences refer to;
//!                     "qos2-pending\0" + client id + 0x00 + packet id (u16 BE): an
//!                     inbound QoS 2 PUBLISH about to be journaled, value the journal's
//!                     durable sequence then (u64 BE); see `session::qos2_pending`
//! ```
//!
//! Client ids never contain NUL (MQTT forbids U+0000 in every UTF-8 string, §1.5.4, and
//! the store refuses one with [`StoreError::InvalidClientId`]). NUL is the smallest byte,
//! so the queue keys of one client form one contiguous range, in entry id order (big
//! endian sorts numerically), and `"a"`'s range (`a\0…`) never contains `"ab"`'s entries
//! (`ab\0…`). A prefix scan is therefore one session's queue in order, and a range delete
//! removes exactly that queue.
//!
//! Values are one format-version byte ([`FORMAT_V1`] = 1) followed by bincode 1
//! (`DefaultOptions`: varint integers, little endian, trailing bytes rejected). A later
//! format gets a new version byte, so old values can be told apart and converted on read;
//! an unknown version is reported as corrupt (written by a newer gateway?).
//!
//! # Flushing: group commit
//!
//! One flusher task ([`Store::spawn_flusher`]) sleeps on a `Notify` that every write
//! pokes. When woken it reads the generation counter, runs **one** sled flush, and then
//! publishes that generation on the `flushed` watch. Each write bumps the counter only
//! after its sled operation returned, so a flush that started after reading generation
//! `g` covers every write numbered `<= g`. Writes that arrive during a flush leave a
//! `Notify` permit behind and are all covered by the next single flush: a slow disk gives
//! bigger groups, not more flushes.
//!
//! The flush runs as `spawn_blocking(db.flush)`, not `db.flush_async()`: sled 0.34's
//! `flush_async` runs on sled's own thread pool and can miss its wake-up when several are
//! polled at once (sled issues #1241, #1308), which here would stall every PUBACK. One
//! blocking thread per flush, one flush at a time, is cheap and well understood.
//!
//! sled's own background flush timer is off (`flush_every_ms(None)`): every write already
//! wakes our flusher, so a timer would only add flushes, and each flush seals sled's
//! current, partly filled I/O buffer (more write amplification). The price: a write made
//! while no flusher runs (before [`Store::spawn_flusher`], after [`Store::close`]) is only
//! flushed by an explicit [`Store::flush`] or by sled when the database is dropped.
//!
//! A failed flush is sticky: sled marks itself broken after an I/O error on its log, so
//! the store stops; later writes and waits return [`StoreError::Failed`] and the gateway
//! must be restarted (sled then recovers what was flushed).
//!
//! # Configuration
//!
//! `Mode::HighThroughput` (sled favours write speed over space; its space is reclaimed by
//! segment cleaning anyway), a page cache bounded to [`CACHE_BYTES`] (64 MiB: the store
//! holds sessions and queues, the hot data are the queues currently draining), no sled
//! background flush (above).

mod commands;
mod retained;
mod sessions;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bincode::Options as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, Notify};

pub use sessions::{LoadedSession, OutState, Qos2Pending, QueuedRecord, SessionRecord};

/// Version byte in front of every stored value.
pub const FORMAT_V1: u8 = 1;
/// Queue entries that may carry a command's ticket ([`sessions::QueuedRecord::command`]);
/// version 1 queue entries are read as entries without one.
pub const FORMAT_V2: u8 = 2;

/// Bound of sled's page cache.
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;

const TREE_SESSIONS: &str = "sessions";
const TREE_QUEUE: &str = "queue";
const TREE_RETAINED: &str = "retained";
const TREE_COMMANDS_DONE: &str = "commands_done";

/// Lock stripes serializing `put_queued` / `remove_session` per client id.
const STRIPES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the store directory {dir}: {source}; check that the gateway may write there")]
    CreateDir { dir: PathBuf, source: std::io::Error },
    #[error(
        "cannot open the store at {dir}: {source}; if another gateway process uses this directory, \
         stop it; if the store is damaged, move {dir} away and restart (persistent sessions and \
         retained messages are lost, journaled telemetry is not)"
    )]
    Open { dir: PathBuf, source: sled::Error },
    #[error("store {dir}: {op} failed: {source}; check the volume (free space, permissions, I/O errors)")]
    Sled {
        dir: PathBuf,
        op: &'static str,
        source: sled::Error,
    },
    #[error(
        "store {dir}: tree \"{tree}\", key {key}: {reason}; to start without it, move {dir} away and \
         restart (persistent sessions and retained messages are lost, journaled telemetry is not)"
    )]
    Corrupt {
        dir: PathBuf,
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("store: cannot encode the value for key {key}: {reason}")]
    Encode { key: String, reason: String },
    #[error("store: client id {client_id:?} contains NUL, which MQTT forbids and the queue keys rely on")]
    InvalidClientId { client_id: String },
    #[error("store {dir}: no session record for client id {client_id:?}; put the session before its queue")]
    NoSession { dir: PathBuf, client_id: String },
    #[error("store {dir} is closed")]
    Closed { dir: PathBuf },
    #[error("store {dir} stopped after a failed flush ({reason}); restart the gateway, check the volume")]
    Failed { dir: PathBuf, reason: String },
}

/// The keyed store. Shared as `Arc<Store>`; every method takes `&self`.
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    sessions: sled::Tree,
    queue: sled::Tree,
    retained: sled::Tree,
    /// Kafka commands with a final outcome whose offset may not be committed yet.
    commands_done: sled::Tree,
    /// The offsets in `commands_done`, per (topic, partition), in memory: asked for every
    /// consumed command, so a lookup may not walk the tree. Its lock also serializes the
    /// tree's read-modify-write (a batch merged by `put` while `forget` removes it).
    done_index: Mutex<commands::DoneIndex>,
    /// Bumped after every write; the number a caller waits on.
    generation: AtomicU64,
    /// Highest generation covered by a finished flush.
    flushed_tx: watch::Sender<u64>,
    /// Poked by every write and by `close`; the flusher sleeps on it.
    wake: Notify,
    /// Serializes flushes (the flusher and explicit `flush`), so `flushes` counts real ones.
    flush_lock: tokio::sync::Mutex<()>,
    flushes: AtomicU64,
    closed: AtomicBool,
    flusher_started: AtomicBool,
    /// The flusher exited: waits that its watermark does not cover yet fail instead of hanging.
    flusher_done: AtomicBool,
    /// Set (sticky) by a failed flush.
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// sled's `len` walks the tree; these are kept exact from the old values writes return.
    session_count: AtomicUsize,
    queued_count: AtomicUsize,
    stripes: [Mutex<()>; STRIPES],
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("generation", &self.generation())
            .field("flushed", &*self.flushed_tx.borrow())
            .finish_non_exhaustive()
    }
}

/// Key (in sled's default tree) of the journal binding.
const JOURNAL_BINDING: &[u8] = b"journal_id";

impl Store {
    /// Opens (creating if needed) the store in `dir`. Fails if another process holds it.
    pub fn open(dir: &Path) -> Result<Arc<Store>, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            dir: dir.into(),
            source,
        })?;
        let open_err = |source| StoreError::Open {
            dir: dir.into(),
            source,
        };
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(None)
            .open()
            .map_err(open_err)?;
        let sessions = db.open_tree(TREE_SESSIONS).map_err(open_err)?;
        let queue = db.open_tree(TREE_QUEUE).map_err(open_err)?;
        let retained = db.open_tree(TREE_RETAINED).map_err(open_err)?;
        let commands_done = db.open_tree(TREE_COMMANDS_DONE).map_err(open_err)?;
        // Counted once here (a walk of both trees), then kept by the writes.
        let session_count = sessions.len();
        let queued_count = queue.len();
        let done_index = commands::DoneIndex::load(&commands_done).map_err(open_err)?;
        let (flushed_tx, _) = watch::channel(0);
        Ok(Arc::new(Store {
            dir: dir.into(),
            db,
            sessions,
            queue,
            retained,
            commands_done,
            done_index: Mutex::new(done_index),
            generation: AtomicU64::new(0),
            flushed_tx,
            wake: Notify::new(),
            flush_lock: tokio::sync::Mutex::new(()),
            flushes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            flusher_started: AtomicBool::new(false),
            flusher_done: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            session_count: AtomicUsize::new(session_count),
            queued_count: AtomicUsize::new(queued_count),
            stripes: std::array::from_fn(|_| Mutex::new(())),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The id of the journal whose sequences the stored inbound QoS 2 ids refer to (kept
    /// in sled's default tree). A different journal (a replaced journal directory) makes
    /// those sequences meaningless, and the ids are forgotten at restore.
    pub fn journal_binding(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .get(JOURNAL_BINDING)
            .map_err(self.sled_err("journal_binding"))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records the journal the sessions now refer to.
    pub fn bind_journal(&self, journal_id: &str) -> Result<u64, StoreError> {
        self.check_writable()?;
        self.db
            .insert(JOURNAL_BINDING, journal_id.as_bytes())
            .map_err(self.sled_err("bind_journal"))?;
        Ok(self.wrote())
    }

    /// Starts the group-commit flusher. Call once, inside a tokio runtime; it holds the
    /// `Arc` and runs until [`Store::close`] (after one last flush) or a failed flush.
    /// Without it no write is ever covered by `flushed`.
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let store = Arc::clone(self);
        if store.flusher_started.swap(true, Ordering::SeqCst) {
            tracing::warn!(dir = %store.dir.display(), "store flusher already running; not starting another");
            return tokio::spawn(async {});
        }
        tokio::spawn(async move {
            loop {
                store.wake.notified().await;
                let closing = store.closed.load(Ordering::SeqCst);
                if let Err(e) = store.flush().await {
                    tracing::error!(error = %e, "store flush failed; the store is stopped");
                    break;
                }
                if closing {
                    break;
                }
            }
            store.flusher_done.store(true, Ordering::SeqCst);
            // Wake waiters so they see `flusher_done`.
            store.flushed_tx.send_modify(|_| {});
        })
    }

    /// The generation of the latest write (0 before any write since open).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Watch of the highest flushed generation: a write returning `g` survives a process
    /// crash once this is `>= g`. Generations restart at 0 on every open.
    pub fn flushed(&self) -> watch::Receiver<u64> {
        self.flushed_tx.subscribe()
    }

    /// The highest flushed generation now (what [`Store::flushed`] watches).
    pub fn flushed_gen(&self) -> u64 {
        *self.flushed_tx.borrow()
    }

    /// Waits until the write that returned `generation` is flushed. Fails rather than
    /// hangs when the store stopped (failed flush) or closed before covering it; the
    /// caller then must not acknowledge. Hangs if no flusher was ever spawned.
    pub async fn wait_flushed(&self, generation: u64) -> Result<(), StoreError> {
        let mut rx = self.flushed_tx.subscribe();
        loop {
            if *rx.borrow_and_update() >= generation {
                return Ok(());
            }
            self.check_failed()?;
            if self.flusher_done.load(Ordering::SeqCst) {
                return Err(StoreError::Closed {
                    dir: self.dir.clone(),
                });
            }
            // The sender lives in `self`, so this cannot fail while we borrow `self`.
            let _ = rx.changed().await;
        }
    }

    /// Flushes now, covering every write made before the call, and advances `flushed`.
    /// Used at shutdown and by the flusher; works after `close`.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.flush_lock.lock().await;
        self.check_failed()?;
        let covered = self.generation.load(Ordering::SeqCst);
        let db = self.db.clone();
        let result = match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(Ok(_bytes)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(join) => Err(format!("flush thread: {join}")),
        };
        match result {
            Ok(()) => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                self.flushed_tx.send_if_modified(|f| {
                    if covered > *f {
                        *f = covered;
                        true
                    } else {
                        false
                    }
                });
                Ok(())
            }
            Err(reason) => {
                if let Ok(mut failure) = self.failure.lock() {
                    failure.get_or_insert_with(|| reason.clone());
                }
                self.failed.store(true, Ordering::SeqCst);
                self.flushed_tx.send_modify(|_| {});
                Err(StoreError::Failed {
                    dir: self.dir.clone(),
                    reason,
                })
            }
        }
    }

    /// Stops the flusher after one last flush. Later writes fail with `Closed`; waits the
    /// last flush does not cover fail too.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Whether a flush failed: the store is stopped for good and nothing waiting for a
    /// flush will be acknowledged (sessions close instead of waiting forever).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Number of flushes done since open (tests and metrics: writes / flushes = group size).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        if !self.failed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let reason = match self.failure.lock() {
            Ok(f) => f.clone().unwrap_or_default(),
            Err(p) => p.into_inner().clone().unwrap_or_default(),
        };
        Err(StoreError::Failed {
            dir: self.dir.clone(),
            reason,
        })
    }

    /// Refuses writes once closed or failed.
    fn check_writable(&self) -> Result<(), StoreError> {
        self.check_failed()?;
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Called after a write's sled operation returned: numbers it and wakes the flusher.
    fn wrote(&self) -> u64 {
        let g = self.wrote_quietly();
        self.wake.notify_one();
        g
    }

    /// Numbers a write without waking the flusher (see [`Store::request_flush`]).
    fn wrote_quietly(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Asks the flusher for a flush of every write so far (a write that did not wake it).
    pub fn request_flush(&self) {
        self.wake.notify_one();
    }

    fn stripe(&self, client_id: &str) -> MutexGuard<'_, ()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        client_id.hash(&mut h);
        let m = &self.stripes[(h.finish() as usize) % STRIPES];
        // The guarded data is `()`: a panic while holding it leaves nothing inconsistent.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sled_err(&self, op: &'static str) -> impl Fn(sled::Error) -> StoreError + '_ {
        move |source| StoreError::Sled {
            dir: self.dir.clone(),
            op,
            source,
        }
    }

    fn corrupt(&self, tree: &'static str, key: &[u8], reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            tree,
            key: show_key(tree, key),
            reason: reason.into(),
        }
    }

    /// Decodes a value of a tree whose format went from `Old` (version 1) to `T`
    /// (version 2).
    fn decode_v2<T: DeserializeOwned, Old: DeserializeOwned + Into<T>>(
        &self,
        tree: &'static str,
        key: &[u8],
        value: &[u8],
    ) -> Result<T, StoreError> {
        match value.split_first() {
            Some((&FORMAT_V1, _)) => self.decode::<Old>(tree, key, value).map(Into::into),
            Some((&FORMAT_V2, body)) => self.decode_body(tree, key, body),
            _ => self.decode(tree, key, value),
        }
    }

    /// The bincode part of a value, after its version byte.
    fn decode_body<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        key: &[u8],
        body: &[u8],
    ) -> Result<T, StoreError> {
        codec()
            .deserialize(body)
            .map_err(|e| self.corrupt(tree, key, format!("value does not decode: {e}")))
    }

    fn decode<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        key: &[u8],
        value: &[u8],
    ) -> Result<T, StoreError> {
        match value.split_first() {
            Some((&FORMAT_V1, body)) => self.decode_body(tree, key, body),
            Some((v, _)) => Err(self.corrupt(
                tree,
                key,
                format!("unknown format version {v} (written by a newer gateway?)"),
            )),
            None => Err(self.corrupt(tree, key, "empty value")),
        }
    }
}

/// The one bincode configuration, for both directions.
fn codec() -> impl bincode::Options {
    bincode::DefaultOptions::new().reject_trailing_bytes()
}

fn encode<T: Serialize>(tree: &'static str, key: &[u8], value: &T) -> Result<Vec<u8>, StoreError> {
    encode_as(FORMAT_V1, tree, key, value)
}

fn encode_as<T: Serialize>(
    version: u8,
    tree: &'static str,
    key: &[u8],
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![version];
    codec()
        .serialize_into(&mut out, value)
        .map_err(|e| StoreError::Encode {
            key: show_key(tree, key),
            reason: e.to_string(),
        })?;
    Ok(out)
}

/// A key as an operator can read it: `"client" #id` for the queue, the quoted text otherwise.
fn show_key(tree: &'static str, key: &[u8]) -> String {
    if tree == TREE_QUEUE {
        if let Some((client, id)) = sessions::split_queue_key(key) {
            return format!("{client:?} #{id}");
        }
    }
    match std::str::from_utf8(key) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("b\"{}\"", key.escape_ascii()),
    }
}

#[cfg(test)]
mod tests;
