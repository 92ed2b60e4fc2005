//! Retained messages (tree "retained"), one per topic name.

use super::{encode, Store, StoreError, TREE_RETAINED};
use crate::message::Message;

impl Store {
    /// Stores `msg` as the retained message of `msg.topic`, replacing the previous one.
    /// (A retained PUBLISH with an empty payload deletes: call [`Store::remove_retained`].)
    pub fn put_retained(&self, msg: &Message) -> Result<u64, StoreError> {
        self.check_writable()?;
        let key = msg.topic.as_bytes();
        let value = encode(TREE_RETAINED, key, msg)?;
        self.retained
            .insert(key, value)
            .map_err(self.sled_err("put_retained"))?;
        Ok(self.wrote())
    }

    /// Deletes the retained message of `topic`; deleting an absent one is fine.
    pub fn remove_retained(&self, topic: &str) -> Result<u64, StoreError> {
        self.check_writable()?;
        self.retained
            .remove(topic.as_bytes())
            .map_err(self.sled_err("remove_retained"))?;
        Ok(self.wrote())
    }

    /// Every retained message, in topic byte order, expired ones included (the caller
    /// knows the clock and drops them). A value that does not decode fails the load.
    pub fn load_retained(&self) -> Result<Vec<Message>, StoreError> {
        let mut out = Vec::new();
        for item in self.retained.iter() {
            let (key, value) = item.map_err(self.sled_err("load_retained"))?;
            let msg: Message = self.decode(TREE_RETAINED, &key, &value)?;
            if msg.topic.as_bytes() != &*key {
                return Err(self.corrupt(
                    TREE_RETAINED,
                    &key,
                    format!("holds a message of topic {:?}", msg.topic),
                ));
            }
            out.push(msg);
        }
        Ok(out)
    }
}
