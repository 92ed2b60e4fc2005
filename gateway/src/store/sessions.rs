//! Session records (tree "sessions") and their outbound queues (tree "queue").

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{encode, encode_as, Store, StoreError, FORMAT_V2, TREE_QUEUE, TREE_SESSIONS};
use crate::commands::CommandRecord;
use crate::message::Message;
use crate::router::SubOptions;

/// What a persistent session needs to resume after a restart, apart from its queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session Expiry Interval in force, seconds (u32::MAX = never).
    pub expiry_secs: u32,
    /// Wall-clock ms of the disconnect; None while a connection holds the session.
    pub disconnected_at_ms: Option<u64>,
    /// Raw filters (including `$share/<group>/...`) with their options, in subscribe order.
    pub subscriptions: Vec<(String, SubOptions)>,
    /// Inbound QoS 2 packet ids received and not yet released by PUBREL (exactly-once
    /// across restarts), each with the journal sequence its message was appended under:
    /// at restore an id whose record the journal did not keep (an unsynced tail) is
    /// dropped, so the client's re-send is journaled instead of taken for a duplicate.
    pub inbound_qos2: Vec<(u16, u64)>,
    /// 4 or 5: the protocol level of the last connection.
    pub protocol: u8,
}

/// Where an outbound QoS 1/2 message is in its handshake; stored so that a resumed
/// session retransmits the right packet (PUBLISH with DUP, or PUBREL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutState {
    /// Not sent yet.
    Queued,
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// One message queued for (or in flight to) a persistent session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedRecord {
    pub message: Message,
    /// Delivery QoS (1 or 2): min(message QoS, granted QoS).
    pub qos: u8,
    /// RETAIN flag to send (depends on the subscription's Retain As Published).
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions, echoed in the PUBLISH.
    pub subscription_ids: Vec<u32>,
    /// Packet id; 0 until first sent, then kept so a retransmission reuses it.
    pub pkid: u16,
    pub state: OutState,
    /// The command this copy carries the outcome of (format version 2).
    pub command: Option<CommandRecord>,
}

/// A queue entry as version 1 wrote it (before commands).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct QueuedRecordV1 {
    pub message: Message,
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub pkid: u16,
    pub state: OutState,
}

impl From<QueuedRecordV1> for QueuedRecord {
    fn from(r: QueuedRecordV1) -> Self {
        QueuedRecord {
            message: r.message,
            qos: r.qos,
            retain: r.retain,
            subscription_ids: r.subscription_ids,
            pkid: r.pkid,
            state: r.state,
            command: None,
        }
    }
}

/// A session as found at startup.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedSession {
    pub client_id: String,
    pub record: SessionRecord,
    /// Queue entries in id order (the order they were enqueued, if ids increase).
    pub queue: Vec<(u64, QueuedRecord)>,
}

/// Queue key: client id bytes, 0x00, id as u64 big-endian.
pub(super) fn queue_key(client_id: &str, id: u64) -> Vec<u8> {
    let mut k = queue_prefix(client_id);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Every queue key of `client_id` starts with this, and no other client's does.
fn queue_prefix(client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(client_id.len() + 9);
    k.extend_from_slice(client_id.as_bytes());
    k.push(0);
    k
}

/// Inverse of [`queue_key`]; None for a key that is not one.
pub(super) fn split_queue_key(key: &[u8]) -> Option<(&str, u64)> {
    let split = key.len().checked_sub(9)?;
    let (client, rest) = key.split_at(split);
    let (nul, id) = rest.split_first()?;
    if *nul != 0 || client.contains(&0) {
        return None;
    }
    let client = std::str::from_utf8(client).ok()?;
    Some((client, u64::from_be_bytes(id.try_into().ok()?)))
}

fn check_client_id(client_id: &str) -> Result<(), StoreError> {
    if client_id.contains('\0') {
        return Err(StoreError::InvalidClientId {
            client_id: client_id.into(),
        });
    }
    Ok(())
}

impl Store {
    /// Inserts or replaces the session record of `client_id` (at CONNECT of a persistent
    /// session, on SUBSCRIBE/UNSUBSCRIBE, on QoS 2 inbound state changes, at disconnect).
    pub fn put_session(&self, client_id: &str, rec: &SessionRecord) -> Result<u64, StoreError> {
        check_client_id(client_id)?;
        self.check_writable()?;
        let value = encode(TREE_SESSIONS, client_id.as_bytes(), rec)?;
        let _stripe = self.stripe(client_id);
        let old = self
            .sessions
            .insert(client_id.as_bytes(), value)
            .map_err(self.sled_err("put_session"))?;
        if old.is_none() {
            self.session_count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(self.wrote())
    }

    /// Removes the session record and all its queue entries, atomically (also across a
    /// crash): at a clean start, at session expiry. Removing an absent session is fine.
    pub fn remove_session(&self, client_id: &str) -> Result<u64, StoreError> {
        check_client_id(client_id)?;
        self.check_writable()?;
        // Holding the stripe keeps `put_queued` of this client out between the scan and
        // the transaction, so no entry is left behind.
        let _stripe = self.stripe(client_id);
        let keys = self
            .queue
            .scan_prefix(queue_prefix(client_id))
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sled_err("remove_session (scan)"))?;
        let result: Result<(bool, usize), TransactionError<()>> =
            (&self.sessions, &self.queue).transaction(|(sessions, queue)| {
                let existed = sessions.remove(client_id.as_bytes())?.is_some();
                let mut removed = 0;
                for key in &keys {
                    if queue.remove(key)?.is_some() {
                        removed += 1;
                    }
                }
                Ok::<_, ConflictableTransactionError<()>>((existed, removed))
            });
        let (existed, removed) = match result {
            Ok(r) => r,
            Err(TransactionError::Storage(e)) => return Err(self.sled_err("remove_session")(e)),
            // Never aborted by the closure above.
            Err(TransactionError::Abort(())) => (false, 0),
        };
        if existed {
            self.session_count.fetch_sub(1, Ordering::Relaxed);
        }
        self.queued_count.fetch_sub(removed, Ordering::Relaxed);
        // A later session of this client id must not inherit them (written before the
        // generation returned, so the same flush covers them).
        self.remove_qos2_pending_of(client_id)?;
        Ok(self.wrote())
    }

    /// Every stored session with its queue in id order, sessions in client id order.
    /// Queue entries without a session record (only possible from tampering or an older
    /// bug) are unreachable: they are removed, with a warning. Any value that does not
    /// decode fails the whole load ([`StoreError::Corrupt`]).
    pub fn load_sessions(&self) -> Result<Vec<LoadedSession>, StoreError> {
        let mut loaded = BTreeMap::new();
        for item in self.sessions.iter() {
            let (key, value) = item.map_err(self.sled_err("load_sessions"))?;
            let client_id = std::str::from_utf8(&key)
                .ok()
                .filter(|c| !c.contains('\0'))
                .ok_or_else(|| self.corrupt(TREE_SESSIONS, &key, "key is not a client id"))?
                .to_owned();
            let record: SessionRecord = self.decode(TREE_SESSIONS, &key, &value)?;
            loaded.insert(
                client_id.clone(),
                LoadedSession {
                    client_id,
                    record,
                    queue: Vec::new(),
                },
            );
        }
        let mut orphans = Vec::new();
        // Keys are sorted, so each session's entries arrive in id order.
        for item in self.queue.iter() {
            let (key, value) = item.map_err(self.sled_err("load_sessions (queue)"))?;
            let (client_id, id) =
                split_queue_key(&key).ok_or_else(|| self.corrupt(TREE_QUEUE, &key, "not a queue key"))?;
            let rec: QueuedRecord =
                self.decode_v2::<QueuedRecord, QueuedRecordV1>(TREE_QUEUE, &key, &value)?;
            match loaded.get_mut(client_id) {
                Some(s) => s.queue.push((id, rec)),
                None => orphans.push(key),
            }
        }
        if !orphans.is_empty() {
            tracing::warn!(
                dir = %self.dir.display(),
                entries = orphans.len(),
                "store: removing queue entries that have no session record"
            );
            for key in orphans {
                if self
                    .queue
                    .remove(&key)
                    .map_err(self.sled_err("load_sessions (orphans)"))?
                    .is_some()
                {
                    self.queued_count.fetch_sub(1, Ordering::Relaxed);
                }
            }
            self.wrote();
        }
        Ok(loaded.into_values().collect())
    }

    /// Inserts or overwrites queue entry `id` of `client_id` (enqueue, then state and
    /// packet id changes while in flight). The session record must exist.
    pub fn put_queued(&self, client_id: &str, id: u64, rec: &QueuedRecord) -> Result<u64, StoreError> {
        check_client_id(client_id)?;
        self.check_writable()?;
        let key = queue_key(client_id, id);
        let value = encode_as(FORMAT_V2, TREE_QUEUE, &key, rec)?;
        let _stripe = self.stripe(client_id);
        let has_session = self
            .sessions
            .contains_key(client_id.as_bytes())
            .map_err(self.sled_err("put_queued"))?;
        if !has_session {
            return Err(StoreError::NoSession {
                dir: self.dir.clone(),
                client_id: client_id.into(),
            });
        }
        let old = self
            .queue
            .insert(key, value)
            .map_err(self.sled_err("put_queued"))?;
        if old.is_none() {
            self.queued_count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(self.wrote())
    }

    /// Removes queue entry `id` of `client_id` (delivery completed, or the message
    /// expired / was dropped). Removing an absent entry is fine.
    pub fn remove_queued(&self, client_id: &str, id: u64) -> Result<u64, StoreError> {
        check_client_id(client_id)?;
        self.check_writable()?;
        let old = self
            .queue
            .remove(queue_key(client_id, id))
            .map_err(self.sled_err("remove_queued"))?;
        if old.is_some() {
            self.queued_count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(self.wrote())
    }

    /// Stored sessions (O(1), kept exact by the writes).
    pub fn session_count(&self) -> usize {
        self.session_count.load(Ordering::Relaxed)
    }

    /// Stored queue entries over all sessions (O(1)).
    pub fn queued_count(&self) -> usize {
        self.queued_count.load(Ordering::Relaxed)
    }
}

/// Keys of the inbound QoS 2 markers (sled's default tree): this prefix, the client id,
/// 0x00, the packet id (u16 big-endian). Values: the journal sequence the record will lie
/// after, then the connection that wrote the marker (u64 big-endian each).
const QOS2_PENDING: &[u8] = b"qos2-pending\0";

fn qos2_client_prefix(client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(QOS2_PENDING.len() + client_id.len() + 3);
    k.extend_from_slice(QOS2_PENDING);
    k.extend_from_slice(client_id.as_bytes());
    k.push(0);
    k
}

fn qos2_pending_key(client_id: &str, pkid: u16) -> Vec<u8> {
    let mut k = qos2_client_prefix(client_id);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

/// An inbound QoS 2 PUBLISH of a persistent session that was about to be journaled (see
/// [`Store::put_qos2_pending`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qos2Pending {
    pub client_id: String,
    pub pkid: u16,
    /// The journal's last accepted sequence when the marker was written: the record, if
    /// it was journaled, lies after it.
    pub after_seq: u64,
}

impl Store {
    /// Marks a persistent session's inbound QoS 2 PUBLISH `pkid`, from connection `conn`,
    /// as about to be journaled, before it is. Flushed before the append, it lets a
    /// restart find out (in the journal, after `after_seq`, by client id and packet id)
    /// whether the record became durable while the session record holding its id did
    /// not: without it the vehicle's re-send would be journaled a second time. It stays
    /// until the vehicle's PUBREL ([`Store::remove_qos2_pending`]), the session's end, or
    /// the next start.
    pub fn put_qos2_pending(
        &self,
        client_id: &str,
        pkid: u16,
        after_seq: u64,
        conn: u64,
    ) -> Result<u64, StoreError> {
        check_client_id(client_id)?;
        self.check_writable()?;
        let mut value = after_seq.to_be_bytes().to_vec();
        value.extend_from_slice(&conn.to_be_bytes());
        self.db
            .insert(qos2_pending_key(client_id, pkid), value)
            .map_err(self.sled_err("put_qos2_pending"))?;
        Ok(self.wrote())
    }

    /// Removes the marker of `pkid` (the vehicle's PUBREL: from then on the session
    /// record alone says whether the id is held; written before the record's change, so
    /// a flush covering that change covers the removal).
    pub fn remove_qos2_pending(&self, client_id: &str, pkid: u16) -> Result<u64, StoreError> {
        self.check_writable()?;
        self.db
            .remove(qos2_pending_key(client_id, pkid))
            .map_err(self.sled_err("remove_qos2_pending"))?;
        Ok(self.wrote())
    }

    /// Removes the marker of `pkid` if connection `conn` wrote it (its PUBLISH was not
    /// journaled after all): a successor's marker for the same id stays.
    pub fn withdraw_qos2_pending(&self, client_id: &str, pkid: u16, conn: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        let key = qos2_pending_key(client_id, pkid);
        let Some(value) = self
            .db
            .get(&key)
            .map_err(self.sled_err("withdraw_qos2_pending"))?
        else {
            return Ok(());
        };
        if value.get(8..16) != Some(&conn.to_be_bytes()[..]) {
            return Ok(());
        }
        // Lost to a successor's write in between: that one stays.
        let _ = self
            .db
            .compare_and_swap(&key, Some(value), None::<&[u8]>)
            .map_err(self.sled_err("withdraw_qos2_pending"))?;
        self.wrote();
        Ok(())
    }

    /// Removes every marker of `client_id` (its session ends).
    pub(super) fn remove_qos2_pending_of(&self, client_id: &str) -> Result<(), StoreError> {
        for key in self.db.scan_prefix(qos2_client_prefix(client_id)).keys() {
            let key = key.map_err(self.sled_err("remove_session (markers)"))?;
            self.db
                .remove(key)
                .map_err(self.sled_err("remove_session (markers)"))?;
        }
        Ok(())
    }

    /// The markers left (at start, before anything is written). One that does not parse
    /// is skipped with a warning: at worst a re-send is journaled twice, which is better
    /// than a gateway that does not start.
    pub fn load_qos2_pending(&self) -> Result<Vec<Qos2Pending>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(QOS2_PENDING) {
            let (k, v) = kv.map_err(self.sled_err("load_qos2_pending"))?;
            let parsed = (|| {
                let rest = &k[QOS2_PENDING.len()..];
                let split = rest.len().checked_sub(3)?;
                let (client, tail) = rest.split_at(split);
                let client = std::str::from_utf8(client).ok()?;
                if tail[0] != 0 || v.len() != 16 {
                    return None;
                }
                let after: [u8; 8] = v[..8].try_into().ok()?;
                Some(Qos2Pending {
                    client_id: client.to_owned(),
                    pkid: u16::from_be_bytes([tail[1], tail[2]]),
                    after_seq: u64::from_be_bytes(after),
                })
            })();
            match parsed {
                Some(m) => out.push(m),
                None => {
                    tracing::warn!(key = %String::from_utf8_lossy(&k), "store: an inbound QoS 2 marker that does not parse is ignored")
                }
            }
        }
        Ok(out)
    }
}
