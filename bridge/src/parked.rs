//! The parked store: records Kafka refused for good, kept durably outside the journal.
//!
//! A record is *parked* when Kafka refuses it permanently (too large, topic unknown or not
//! authorised, no route) and there is no dead-letter topic, or the dead-letter write
//! failed too. The producer writes it here **durably** (file fsync'd, then directory
//! fsync'd) and only then marks its journal slot done, so the release watermark moves past
//! it and the rest of the journal keeps flowing. The record lives here until an operator
//! re-drives it ([`crate::producer::BridgeControl::redrive`]): it is produced again to its
//! current route and its file is deleted only after Kafka confirmed the delivery.
//!
//! # On disk
//!
//! ```text
//! <dir>/00000000000000001234.parked    one file per parked record; name = journal seq
//! file   = magic "GWPK"  version:u8(1)
//!          seq:u64le  parked_at_ms:u64le
//!          reason:str16  client_id:str16  topic:str16
//!          frame                       the journal record frame (journal::encode)
//! str16  = len:u16le utf8[len]
//! ```
//!
//! The header repeats client id and topic so that [`ParkedStore::list`] reads a few
//! hundred bytes per record, never the payload. The frame carries its own CRC32C. Files
//! are written as `<name>.tmp`, fsync'd, renamed and the directory fsync'd; a leftover
//! `.tmp` (crash while parking) is removed on open: its record was not yet marked done,
//! so the journal still holds it and will replay it.
//!
//! The store is bounded by `max_parked` records. When full, [`ParkedStore::park`] refuses
//! ([`ParkedError::Full`]) and the producer falls back to holding the record in the
//! journal (forwarding stalls, loudly): never a silent drop.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::journal::{decode, encode, EncodeError, Frame, Record};

const MAGIC: &[u8; 4] = b"GWPK";
const VERSION: u8 = 1;
const EXT: &str = "parked";

/// One parked record as listed for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRecord {
    /// Journal sequence of the record (also its file name).
    pub seq: u64,
    pub client_id: String,
    /// The MQTT topic the vehicle published to.
    pub topic: String,
    /// Why it was parked (the Kafka error, or why the dead-letter write failed).
    pub reason: String,
    /// Wall-clock time it was parked.
    pub parked_at_ms: u64,
    /// Size of the stored journal frame (payload plus metadata).
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    #[error("parked store I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "parked store {dir} is full ({max} records, kafka.max_parked); re-drive or remove parked records"
    )]
    Full { dir: PathBuf, max: usize },
    #[error("parked file {path} is unreadable: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("record cannot be encoded: {0}")]
    Encode(#[from] EncodeError),
}

fn io(path: &Path, source: std::io::Error) -> ParkedError {
    ParkedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sync_dir(dir: &Path) -> Result<(), ParkedError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let s = clip(s, u16::MAX as usize);
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The fixed part of the header plus the three strings, parsed from the start of a file.
struct Header {
    seq: u64,
    parked_at_ms: u64,
    reason: String,
    client_id: String,
    topic: String,
    /// Header length in bytes: the frame starts here.
    len: usize,
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<(), ParkedError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ParkedError::Malformed {
            path: path.to_path_buf(),
            why: "file ends inside the header".into(),
        },
        _ => io(path, e),
    })
}

fn read_str16(r: &mut impl Read, path: &Path) -> Result<String, ParkedError> {
    let mut len = [0u8; 2];
    read_exact_or(r, &mut len, path)?;
    let mut bytes = vec![0u8; u16::from_le_bytes(len) as usize];
    read_exact_or(r, &mut bytes, path)?;
    String::from_utf8(bytes).map_err(|_| ParkedError::Malformed {
        path: path.to_path_buf(),
        why: "header string is not UTF-8".into(),
    })
}

fn read_header(r: &mut impl Read, path: &Path) -> Result<Header, ParkedError> {
    let mut fixed = [0u8; 4 + 1 + 8 + 8];
    read_exact_or(r, &mut fixed, path)?;
    if &fixed[..4] != MAGIC || fixed[4] != VERSION {
        return Err(ParkedError::Malformed {
            path: path.to_path_buf(),
            why: "not a parked-record file (bad magic or version)".into(),
        });
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&fixed[5..13]);
    let seq = u64::from_le_bytes(n);
    n.copy_from_slice(&fixed[13..21]);
    let parked_at_ms = u64::from_le_bytes(n);
    let reason = read_str16(r, path)?;
    let client_id = read_str16(r, path)?;
    let topic = read_str16(r, path)?;
    let len = fixed.len() + 6 + reason.len() + client_id.len() + topic.len();
    Ok(Header {
        seq,
        parked_at_ms,
        reason,
        client_id,
        topic,
        len,
    })
}

/// Durable, bounded store of parked records; see the module doc.
#[derive(Debug)]
pub struct ParkedStore {
    dir: PathBuf,
    max: usize,
    /// Records in the store (files), kept in step by `park` and `remove`.
    count: AtomicUsize,
}

impl ParkedStore {
    /// Opens (creating it if needed) the store in `dir`, holding at most `max` records.
    /// Cheap: one directory listing. Several handles on one directory may coexist (the
    /// admin API lists through its own); only the producer parks and removes.
    pub fn open(dir: &Path, max: usize) -> Result<ParkedStore, ParkedError> {
        let created = !dir.exists();
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let mut count = 0;
        for ent in fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let path = ent.map_err(|e| io(dir, e))?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some(EXT) => count += 1,
                Some("tmp") => {
                    // A crash while parking: the record was not marked done, the journal
                    // still holds it and replays it.
                    let _ = fs::remove_file(&path);
                }
                _ => {}
            }
        }
        Ok(ParkedStore {
            dir: dir.to_path_buf(),
            max,
            count: AtomicUsize::new(count),
        })
    }

    /// A read-only view for listing (the admin API). It touches nothing on disk (no
    /// directory creation, no `.tmp` clean-up), so it never races with the pipeline that
    /// owns the store; a missing directory lists as empty.
    pub fn view(dir: &Path) -> ParkedStore {
        ParkedStore {
            dir: dir.to_path_buf(),
            max: 0,
            count: AtomicUsize::new(0),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records in the store.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured bound (`max_parked`).
    pub fn capacity(&self) -> usize {
        self.max
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{EXT}"))
    }

    /// Stores `rec` durably with `reason`. Returns only once file and directory entry are
    /// on stable storage. Parking a sequence already parked replaces its file (a replay
    /// after a crash re-parks the same record) and does not count twice.
    pub fn park(&self, rec: &Record, reason: &str) -> Result<(), ParkedError> {
        let path = self.path(rec.seq);
        let exists = path.exists();
        if !exists && self.len() >= self.max {
            return Err(ParkedError::Full {
                dir: self.dir.clone(),
                max: self.max,
            });
        }
        let mut bytes = Vec::with_capacity(256 + rec.entry.payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.push(VERSION);
        bytes.extend_from_slice(&rec.seq.to_le_bytes());
        bytes.extend_from_slice(&now_ms().to_le_bytes());
        put_str16(&mut bytes, reason);
        put_str16(&mut bytes, &rec.entry.client_id);
        put_str16(&mut bytes, &rec.entry.topic);
        encode(&mut bytes, rec.seq, &rec.entry)?;
        let tmp = path.with_extension("tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io(&tmp, e))?;
        file.write_all(&bytes).map_err(|e| io(&tmp, e))?;
        file.sync_all().map_err(|e| io(&tmp, e))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        sync_dir(&self.dir)?;
        if !exists {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Every parked record, in sequence order; reads only the file headers. A file that
    /// cannot be read is listed with `reason` saying so (never hidden).
    pub fn list(&self) -> Result<Vec<ParkedRecord>, ParkedError> {
        let mut out = Vec::new();
        for seq in self.seqs()? {
            let path = self.path(seq);
            let listed = File::open(&path).map_err(|e| io(&path, e)).and_then(|f| {
                let size = f.metadata().map_err(|e| io(&path, e))?.len();
                let mut r = std::io::BufReader::with_capacity(512, f);
                let h = read_header(&mut r, &path)?;
                Ok(ParkedRecord {
                    seq: h.seq,
                    client_id: h.client_id,
                    topic: h.topic,
                    reason: h.reason,
                    parked_at_ms: h.parked_at_ms,
                    bytes: size.saturating_sub(h.len as u64),
                })
            });
            match listed {
                Ok(p) => out.push(p),
                // Removed by a concurrent re-drive between listing and opening.
                Err(ParkedError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => out.push(ParkedRecord {
                    seq,
                    client_id: String::new(),
                    topic: String::new(),
                    reason: e.to_string(),
                    parked_at_ms: 0,
                    bytes: 0,
                }),
            }
        }
        Ok(out)
    }

    /// Sequences of the parked records, ascending.
    pub fn seqs(&self) -> Result<Vec<u64>, ParkedError> {
        let mut seqs = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(seqs),
            Err(e) => return Err(io(&self.dir, e)),
        };
        for ent in entries {
            let path = ent.map_err(|e| io(&self.dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                continue;
            }
            if let Some(seq) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// The parked record `seq` and why it was parked; `None` if it is not parked.
    pub fn load(&self, seq: u64) -> Result<Option<(Record, String)>, ParkedError> {
        let path = self.path(seq);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path, e)),
        };
        let h = read_header(&mut &bytes[..], &path)?;
        match decode(&bytes[h.len..]) {
            Frame::Record(rec, _) if rec.seq == seq && h.seq == seq => Ok(Some((rec, h.reason))),
            Frame::Record(rec, _) => Err(ParkedError::Malformed {
                path,
                why: format!("holds seq {} (header {})", rec.seq, h.seq),
            }),
            Frame::End | Frame::Torn(_) => Err(ParkedError::Malformed {
                path,
                why: "record frame is damaged (length or checksum)".into(),
            }),
        }
    }

    /// Deletes the parked record `seq` (after its re-drive was confirmed). Durable: the
    /// directory is fsync'd. Returns whether it was there.
    pub fn remove(&self, seq: u64) -> Result<bool, ParkedError> {
        let path = self.path(seq);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(&path, e)),
        }
        sync_dir(&self.dir)?;
        let _ = self
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Entry;

    fn rec(seq: u64) -> Record {
        Record {
            seq,
            entry: Entry {
                kind: Default::default(),
                received_at_ms: 7,
                qos: 1,
                client_id: "veh-1".into(),
                topic: "vehicles/veh-1/x".into(),
                payload: vec![9u8; 100].into(),
                user_properties: vec![("k".into(), "v".into())],
                ..Entry::default()
            },
        }
    }

    #[test]
    fn park_list_load_remove_and_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ParkedStore::open(&dir.path().join("parked"), 2).expect("open");
        store.park(&rec(5), "no route").expect("park");
        store.park(&rec(5), "no route again").expect("re-park same seq");
        store.park(&rec(3), "too large").expect("park");
        assert_eq!(store.len(), 2);
        assert!(matches!(store.park(&rec(9), "x"), Err(ParkedError::Full { .. })));
        let list = store.list().expect("list");
        assert_eq!(list.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(list[1].reason, "no route again");
        assert_eq!(list[1].client_id, "veh-1");
        assert!(list[1].bytes > 100);
        let (r, why) = store.load(5).expect("load").expect("present");
        assert_eq!(r, rec(5));
        assert_eq!(why, "no route again");
        // Survives reopening.
        let again = ParkedStore::open(&dir.path().join("parked"), 2).expect("reopen");
        assert_eq!(again.len(), 2);
        assert!(again.remove(5).expect("remove"));
        assert!(!again.remove(5).expect("remove twice"));
        assert_eq!(again.len(), 1);
        assert!(again.load(5).expect("load").is_none());
    }

    #[test]
    fn damaged_file_is_listed_not_hidden() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ParkedStore::open(dir.path(), 10).expect("open");
        store.park(&rec(1), "x").expect("park");
        let path = dir.path().join(format!("{:020}.parked", 1));
        let mut bytes = fs::read(&path).expect("read");
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        fs::write(&path, &bytes).expect("write");
        assert!(store.load(1).is_err());
        assert_eq!(store.list().expect("list").len(), 1);
        fs::write(&path, b"junk").expect("write");
        let list = store.list().expect("list");
        assert!(list[0].reason.contains("unreadable"), "{}", list[0].reason);
    }
}
