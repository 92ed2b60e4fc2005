//! Inbound QoS 2 publishes a crash caught between the journal and the session store.
//!
//! A persistent session's QoS 2 PUBLISH is marked in the store (client id, packet id, the
//! journal's last accepted sequence, the connection) and the marker flushed before its
//! record is appended (`Session::journal_qos2`). The marker stays until the vehicle's
//! PUBREL, which removes it before the session record drops the id (so a flush covering
//! the one covers the other), or until the PUBLISH turns out not journaled (withdrawn by
//! the connection that wrote it, never a successor's), the session ends, or the next
//! start. A marker found at start thus means: the vehicle has not released the id, the
//! record may or may not have been journaled, and the session record may not say. The
//! journal does: records of these PUBLISHes carry their packet id, and this one, if it
//! exists, lies after the marker's sequence. Found, the id is restored as journaled (the
//! vehicle's re-send is a duplicate, answered, not journaled again); not found, the id
//! stays unknown (the re-send is journaled, once).
//!
//! Invariants: a marker's record is the first record after `after_seq` of its client with
//! its packet id (an earlier message under that id, released or of a session started
//! clean, was accepted by the journal before the marker was written). Only the recovered
//! journal is read, up to its durable end, so a record in a lost unsynced tail is not
//! found. Not covered: a record whose whole segment Kafka confirmed and the journal
//! deleted before the store flushed the id (Kafka's round trip and a segment's worth of
//! traffic against one store flush); its re-send would be journaled again.

use std::collections::HashMap;

use bridge::{EntryKind, Journal, JournalError, Record};

use crate::store::Qos2Pending;

/// (client id, packet id) → the journal sequence of the marked PUBLISH's record, for the
/// markers whose record the journal holds.
pub type Journaled = HashMap<(String, u16), u64>;

/// Reads `journal` after the oldest marker's sequence and finds each marker's record.
pub fn find_journaled<J: Journal>(journal: &J, markers: &[Qos2Pending]) -> Result<Journaled, JournalError> {
    let Some(from) = markers.iter().map(|m| m.after_seq).min() else {
        return Ok(Journaled::new());
    };
    let mut reader = journal.reader(from + 1);
    let mut found = Journaled::new();
    loop {
        let batch = reader.next_batch(1024)?;
        if batch.is_empty() {
            return Ok(found);
        }
        match_records(markers, &batch, &mut found);
        if found.len() == markers.len() {
            return Ok(found);
        }
    }
}

/// Adds to `found` the markers whose record is in `records` (in journal order).
pub fn match_records(markers: &[Qos2Pending], records: &[Record], found: &mut Journaled) {
    for rec in records {
        let e = &rec.entry;
        let Some(pkid) = e.packet_id.filter(|_| e.kind == EntryKind::Message && e.qos == 2) else {
            continue;
        };
        let marked = markers
            .iter()
            .any(|m| m.pkid == pkid && m.client_id == e.client_id && rec.seq > m.after_seq);
        if marked {
            found.entry((e.client_id.clone(), pkid)).or_insert(rec.seq);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bridge::{Entry, JournalConfig, SegmentedJournal};

    fn publish(client: &str, qos: u8, pkid: Option<u16>) -> Entry {
        Entry {
            qos,
            client_id: client.into(),
            topic: format!("vehicles/{client}/telemetry"),
            payload: bytes::Bytes::from_static(b"x"),
            packet_id: pkid,
            ..Entry::default()
        }
    }

    fn marker(client: &str, pkid: u16, after_seq: u64) -> Qos2Pending {
        Qos2Pending {
            client_id: client.into(),
            pkid,
            after_seq,
        }
    }

    /// A marker's record is found by client id and packet id after its sequence: not an
    /// earlier message under the same id, not another client's, not a QoS 1 record, and
    /// not a record that is not there.
    #[tokio::test]
    async fn markers_find_their_own_record_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let j = SegmentedJournal::open(JournalConfig::new(dir.path(), 1 << 30)).unwrap();
        // 1: an earlier message of car-a under id 7 (released long ago).
        let earlier = j.append(&publish("car-a", 2, Some(7))).await.unwrap();
        // 2: another client under the same id; 3: car-a at QoS 1; 4: car-a's marked one.
        j.append(&publish("car-b", 2, Some(7))).await.unwrap();
        j.append(&publish("car-a", 1, None)).await.unwrap();
        let marked = j.append(&publish("car-a", 2, Some(7))).await.unwrap();
        j.flush().await.unwrap();
        let markers = [
            marker("car-a", 7, earlier),
            // Marked, never journaled (the crash came before the append).
            marker("car-a", 8, earlier),
            marker("car-c", 7, 0),
        ];
        let found = find_journaled(&j, &markers).unwrap();
        assert_eq!(found.get(&("car-a".to_string(), 7)), Some(&marked));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(find_journaled(&j, &[]).unwrap().is_empty());
    }
}
