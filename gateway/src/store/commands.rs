//! Kafka commands that reached a final outcome (tree "commands_done"), kept until the
//! consumer group's committed offset passes them.
//!
//! Why: the offset is committed a moment after the outcome record is durable. A crash
//! in between makes Kafka deliver the command again; the marker says it is done, so it
//! is neither delivered a second time nor given a second final outcome.
//!
//! One entry per partition per settled batch (not per command: a sled write and its
//! share of a flush per command cost more than the rest of the command's path). Key:
//! topic bytes, 0x00, partition (i32 big endian, sign bit flipped), the batch's lowest
//! offset (i64 big endian, sign bit flipped), so one partition's entries are one range
//! in offset order. Value: the batch's offsets, ascending.
//!
//! Every consumed command asks whether it is done, and a vehicle that never
//! acknowledges holds its partition's committed offset back (so the markers above it
//! stay) for up to the command's expiry: the question is answered from an in-memory
//! index of the marked offsets ([`DoneIndex`], loaded at open, about 12 bytes an
//! offset), never by walking the tree. The index's lock is held across each write, so
//! a batch merged by `put_commands_done` and removed by `forget_commands_below` at
//! the same moment cannot lose the merged offsets.

use std::collections::{BTreeSet, HashMap};

use super::{codec, encode, Store, StoreError, FORMAT_V1, TREE_COMMANDS_DONE};
use bincode::Options as _;

fn prefix(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 13);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&((partition as u32) ^ 0x8000_0000).to_be_bytes());
    k
}

fn key(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mut k = prefix(topic, partition);
    k.extend_from_slice(&((offset as u64) ^ 0x8000_0000_0000_0000).to_be_bytes());
    k
}

/// The (topic, partition) a key belongs to.
fn split_key(k: &[u8]) -> Option<(String, i32)> {
    let nul = k.iter().position(|b| *b == 0)?;
    let topic = std::str::from_utf8(&k[..nul]).ok()?;
    let part: [u8; 4] = k.get(nul + 1..nul + 5)?.try_into().ok()?;
    Some((topic.to_string(), (u32::from_be_bytes(part) ^ 0x8000_0000) as i32))
}

/// The done offsets of every partition, as the tree holds them.
#[derive(Debug, Default)]
pub(super) struct DoneIndex {
    parts: HashMap<(String, i32), BTreeSet<i64>>,
}

impl DoneIndex {
    /// Reads the tree once. A value that does not decode is skipped with a warning: it
    /// only costs a possible second delivery of that batch after a crash.
    pub(super) fn load(tree: &sled::Tree) -> Result<DoneIndex, sled::Error> {
        let mut index = DoneIndex::default();
        for item in tree.iter() {
            let (k, v) = item?;
            let offsets = match (split_key(&k), v.split_first()) {
                (Some(part), Some((&FORMAT_V1, body))) => {
                    codec().deserialize::<Vec<i64>>(body).ok().map(|o| (part, o))
                }
                _ => None,
            };
            match offsets {
                Some((part, o)) => index.parts.entry(part).or_default().extend(o),
                None => tracing::warn!(
                    key = %k.escape_ascii(),
                    "command done marker does not decode; skipped (its commands may be delivered again after a crash)"
                ),
            }
        }
        Ok(index)
    }

    fn len(&self) -> usize {
        self.parts.values().map(BTreeSet::len).sum()
    }
}

impl Store {
    fn done_index(&self) -> std::sync::MutexGuard<'_, DoneIndex> {
        // Every change to the index follows a successful tree write; a panic between
        // leaves at most an offset the tree also holds.
        self.done_index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the commands at `offsets` of (`topic`, `partition`) done: one write. It does
    /// not wake the flusher: the caller asks for a flush on its own cadence
    /// ([`Store::request_flush`]), or another write's flush covers it sooner.
    pub fn put_commands_done(&self, topic: &str, partition: i32, offsets: &[i64]) -> Result<u64, StoreError> {
        self.check_writable()?;
        let mut sorted = offsets.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let Some(first) = sorted.first().copied() else {
            return Ok(self.generation());
        };
        let k = key(topic, partition, first);
        let mut index = self.done_index();
        // A batch starting at the same offset (a re-read settled again) adds to it.
        if let Some(old) = self
            .commands_done
            .get(&k)
            .map_err(self.sled_err("put_commands_done"))?
        {
            let old: Vec<i64> = self.decode(TREE_COMMANDS_DONE, &k, &old)?;
            sorted.extend(old);
            sorted.sort_unstable();
            sorted.dedup();
        }
        let value = encode(TREE_COMMANDS_DONE, &k, &sorted)?;
        self.commands_done
            .insert(k, value)
            .map_err(self.sled_err("put_commands_done"))?;
        index
            .parts
            .entry((topic.to_string(), partition))
            .or_default()
            .extend(sorted);
        Ok(self.wrote_quietly())
    }

    /// Whether the command at (`topic`, `partition`, `offset`) is done.
    pub fn command_done(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.done_index()
            .parts
            .get(&(topic.to_string(), partition))
            .is_some_and(|s| s.contains(&offset))
    }

    /// Forgets the markers of `partition` below `position` (its committed offset): a
    /// batch goes once all its offsets are below.
    pub fn forget_commands_below(
        &self,
        topic: &str,
        partition: i32,
        position: i64,
    ) -> Result<usize, StoreError> {
        let from = prefix(topic, partition);
        let to = key(topic, partition, position);
        let mut index = self.done_index();
        let mut gone = Vec::new();
        for item in self.commands_done.range(from..to) {
            let (k, v) = item.map_err(self.sled_err("forget_commands_below"))?;
            // A value that does not decode cannot say it is needed any more.
            let last = self
                .decode::<Vec<i64>>(TREE_COMMANDS_DONE, &k, &v)
                .map(|o| o.last().copied())
                .unwrap_or(None);
            if last.is_none_or(|last| last < position) {
                gone.push(k);
            }
        }
        for k in &gone {
            self.commands_done
                .remove(k)
                .map_err(self.sled_err("forget_commands_below"))?;
        }
        if let Some(set) = index.parts.get_mut(&(topic.to_string(), partition)) {
            // Below the committed position Kafka delivers nothing again: whatever the
            // tree still holds there (a batch straddling it) is not asked for.
            *set = set.split_off(&position);
            if set.is_empty() {
                index.parts.remove(&(topic.to_string(), partition));
            }
        }
        if !gone.is_empty() {
            self.wrote();
        }
        Ok(gone.len())
    }

    /// Marker entries held (metrics, tests).
    pub fn commands_done_len(&self) -> usize {
        self.commands_done.len()
    }

    /// Done offsets the in-memory index holds (a gauge: it grows while a vehicle that
    /// does not acknowledge holds its partition's committed offset back).
    pub fn commands_done_offsets(&self) -> usize {
        self.done_index().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_and_forgotten_per_partition_below_the_committed_position() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let put = |p: i32, offsets: &[i64]| {
            store
                .put_commands_done("t", p, offsets)
                .unwrap_or_else(|e| panic!("{e}"));
        };
        put(0, &[9, 5]);
        put(0, &[12]);
        put(1, &[2]);
        put(-1, &[3]);
        store
            .put_commands_done("t2", 0, &[1])
            .unwrap_or_else(|e| panic!("{e}"));
        let done = |t: &str, p: i32, o: i64| store.command_done(t, p, o);
        assert!(done("t", 0, 9) && done("t", 0, 5) && done("t", 0, 12));
        assert!(!done("t", 0, 6) && !done("t", 0, 13) && !done("t", 0, 4));
        // The batch {5, 9} stays while 9 is not below the committed position.
        assert_eq!(store.forget_commands_below("t", 0, 9).unwrap_or(9), 0);
        assert!(done("t", 0, 9));
        assert_eq!(store.forget_commands_below("t", 0, 10).unwrap_or(9), 1);
        assert!(!done("t", 0, 5) && !done("t", 0, 9) && done("t", 0, 12));
        assert!(done("t", 1, 2) && done("t", -1, 3) && done("t2", 0, 1));
        assert_eq!(store.commands_done_len(), 4);
        assert_eq!(store.commands_done_offsets(), 4);
    }

    #[tokio::test]
    async fn markers_survive_a_reopen_and_a_merged_batch_keeps_every_offset() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        {
            let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            let flusher = store.spawn_flusher();
            for batch in [&[4_i64, 7][..], &[4, 30], &[-2, 1]] {
                store
                    .put_commands_done("t", 3, batch)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            store
                .put_commands_done("t", -5, &[100])
                .unwrap_or_else(|e| panic!("{e}"));
            super::super::tests::close(store, flusher).await;
        }
        let store = super::super::tests::reopen(dir.path());
        for o in [4, 7, 30, -2, 1] {
            assert!(store.command_done("t", 3, o), "offset {o} lost at reopen");
        }
        assert!(store.command_done("t", -5, 100));
        assert!(!store.command_done("t", 3, 5));
        // The batch {4, 7, 30} straddles 10: it stays in the tree, but 4 and 7 are no
        // longer asked for.
        assert_eq!(store.forget_commands_below("t", 3, 10).unwrap_or(9), 1);
        assert!(!store.command_done("t", 3, 4) && store.command_done("t", 3, 30));
        assert_eq!(store.commands_done_len(), 2);
    }
}
