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

use super::{encode, Store, StoreError, TREE_COMMANDS_DONE};

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

impl Store {
    /// Marks the commands at `offsets` of (`topic`, `partition`) done: one write.
    pub fn put_commands_done(&self, topic: &str, partition: i32, offsets: &[i64]) -> Result<u64, StoreError> {
        self.check_writable()?;
        let mut sorted = offsets.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let Some(first) = sorted.first().copied() else {
            return Ok(self.generation());
        };
        let k = key(topic, partition, first);
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
        Ok(self.wrote())
    }

    /// Whether the command at (`topic`, `partition`, `offset`) is done.
    pub fn command_done(&self, topic: &str, partition: i32, offset: i64) -> Result<bool, StoreError> {
        let from = prefix(topic, partition);
        let to = key(topic, partition, offset.saturating_add(1));
        for item in self.commands_done.range(from..to) {
            let (k, v) = item.map_err(self.sled_err("command_done"))?;
            let offsets: Vec<i64> = self.decode(TREE_COMMANDS_DONE, &k, &v)?;
            if offsets.binary_search(&offset).is_ok() {
                return Ok(true);
            }
        }
        Ok(false)
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
        let mut gone = Vec::new();
        for item in self.commands_done.range(from..to) {
            let (k, v) = item.map_err(self.sled_err("forget_commands_below"))?;
            let offsets: Vec<i64> = self.decode(TREE_COMMANDS_DONE, &k, &v)?;
            if offsets.last().is_none_or(|last| *last < position) {
                gone.push(k);
            }
        }
        for k in &gone {
            self.commands_done
                .remove(k)
                .map_err(self.sled_err("forget_commands_below"))?;
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
        let done = |t: &str, p: i32, o: i64| store.command_done(t, p, o).unwrap_or_else(|e| panic!("{e}"));
        assert!(done("t", 0, 9) && done("t", 0, 5) && done("t", 0, 12));
        assert!(!done("t", 0, 6) && !done("t", 0, 13) && !done("t", 0, 4));
        // The batch {5, 9} stays while 9 is not below the committed position.
        assert_eq!(store.forget_commands_below("t", 0, 9).unwrap_or(9), 0);
        assert!(done("t", 0, 9));
        assert_eq!(store.forget_commands_below("t", 0, 10).unwrap_or(9), 1);
        assert!(!done("t", 0, 5) && !done("t", 0, 9) && done("t", 0, 12));
        assert!(done("t", 1, 2) && done("t", -1, 3) && done("t2", 0, 1));
        assert_eq!(store.commands_done_len(), 4);
    }
}
