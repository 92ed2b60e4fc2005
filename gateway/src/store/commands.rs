//! Kafka commands that reached a final outcome (tree "commands_done"), kept until the
//! consumer group's committed offset passes them.
//!
//! Why: the offset is committed a moment after the outcome record is durable. A crash
//! in between makes Kafka deliver the command again; the marker says it is done, so it
//! is neither delivered a second time nor given a second final outcome.
//!
//! Key: topic bytes, 0x00, partition (i32 big endian, sign bit flipped), offset (i64
//! big endian, sign bit flipped), so one partition's markers are one range in offset
//! order. Value: the outcome label.

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
    /// Marks the command at (`topic`, `partition`, `offset`) done with `outcome`.
    pub fn put_command_done(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        outcome: &str,
    ) -> Result<u64, StoreError> {
        self.check_writable()?;
        let k = key(topic, partition, offset);
        let value = encode(TREE_COMMANDS_DONE, &k, &outcome.to_string())?;
        self.commands_done
            .insert(k, value)
            .map_err(self.sled_err("put_command_done"))?;
        Ok(self.wrote())
    }

    /// Whether the command at (`topic`, `partition`, `offset`) is done.
    pub fn command_done(&self, topic: &str, partition: i32, offset: i64) -> Result<bool, StoreError> {
        self.commands_done
            .contains_key(key(topic, partition, offset))
            .map_err(self.sled_err("command_done"))
    }

    /// Forgets the markers of `partition` below `position` (its committed offset).
    pub fn forget_commands_below(
        &self,
        topic: &str,
        partition: i32,
        position: i64,
    ) -> Result<usize, StoreError> {
        let from = prefix(topic, partition);
        let to = key(topic, partition, position);
        let mut n = 0;
        for item in self.commands_done.range(from..to) {
            let (k, _) = item.map_err(self.sled_err("forget_commands_below"))?;
            self.commands_done
                .remove(k)
                .map_err(self.sled_err("forget_commands_below"))?;
            n += 1;
        }
        if n > 0 {
            self.wrote();
        }
        Ok(n)
    }

    /// Markers held (metrics, tests).
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
        for (p, o) in [(0, 5), (0, 9), (1, 2), (-1, 3)] {
            store
                .put_command_done("t", p, o, "delivered")
                .unwrap_or_else(|e| panic!("{e}"));
        }
        store
            .put_command_done("t2", 0, 1, "expired")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(store.command_done("t", 0, 9).unwrap_or(false));
        assert!(!store.command_done("t", 0, 6).unwrap_or(true));
        assert_eq!(store.forget_commands_below("t", 0, 9).unwrap_or(0), 1);
        assert!(!store.command_done("t", 0, 5).unwrap_or(true));
        assert!(store.command_done("t", 0, 9).unwrap_or(false));
        assert!(store.command_done("t", 1, 2).unwrap_or(false));
        assert!(store.command_done("t", -1, 3).unwrap_or(false));
        assert!(store.command_done("t2", 0, 1).unwrap_or(false));
        assert_eq!(store.commands_done_len(), 4);
    }
}
