//! Several nodes on one store: the replay records they share, and which of them runs each
//! periodic task.

use std::sync::Arc;

use phivault_store::Store;

use crate::engine::Engine;

/// The store's shared replay records, as the token checks ask for them.
struct StoreSeen(Arc<dyn Store>);

impl phivault_auth::SharedSeen for StoreSeen {
    fn first_time(&self, ns: &str, key: &[u8], until_ms: u64) -> Result<bool, String> {
        let until = i64::try_from(until_ms).unwrap_or(i64::MAX);
        match self.0.claim_once(ns, key, until) {
            Ok(Some(first)) => Ok(first),
            Ok(None) => Err("the store keeps no shared replay records".into()),
            Err(e) => {
                tracing::error!(error = %e, "the shared replay records cannot be reached");
                Err(e.to_string())
            }
        }
    }
}

impl Engine {
    /// Replay records shared by every node of this store, if other nodes can serve it
    /// (none: one process, whose caches stay in memory).
    pub fn shared_seen(&self) -> Option<Arc<dyn phivault_auth::SharedSeen>> {
        let store = self.store();
        store
            .shared_by_nodes()
            .then(|| Arc::new(StoreSeen(store.clone())) as Arc<dyn phivault_auth::SharedSeen>)
    }

    /// Whether this node runs the periodic task `task` now (always, with one node).
    pub fn lead(&self, task: &str) -> bool {
        self.store().lead(task)
    }
}
