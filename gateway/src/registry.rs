//! Which connection owns which client id, so a new CONNECT with the same id takes the
//! session over and the older connection is closed (MQTT 5 reason 0x8E).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

#[derive(Default, Debug)]
pub struct Registry {
    owners: Mutex<HashMap<String, (u64, CancellationToken)>>,
}

impl Registry {
    /// Makes `conn` the owner of `client_id`; the previous owner's token is cancelled.
    /// The returned token is cancelled when a later connection takes over.
    pub fn claim(&self, client_id: &str, conn: u64) -> CancellationToken {
        let token = CancellationToken::new();
        let old = self
            .owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client_id.to_string(), (conn, token.clone()));
        if let Some((_, old)) = old {
            old.cancel();
        }
        token
    }

    /// Forgets `client_id` if `conn` still owns it.
    pub fn release(&self, client_id: &str, conn: u64) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.get(client_id).is_some_and(|(c, _)| *c == conn) {
            owners.remove(client_id);
        }
    }

    pub fn len(&self) -> usize {
        self.owners.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
