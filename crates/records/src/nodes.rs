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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use phivault_auth::ReplayCache;
    use phivault_auth::dpop::{DpopProof, ProofCache};
    use phivault_crypto::{KeyHierarchy, MasterKey};
    use phivault_store::StoreKeys;
    use phivault_store::postgres::PgStore;
    use phivault_store::postgres::testdb::TestDb;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// Two nodes' token checks on one database: a DPoP proof or a client assertion used
    /// through one node's caches is a replay through the other's.
    #[test]
    fn a_proof_used_on_one_node_is_a_replay_on_another() {
        let db = TestDb::new();
        let keys = KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32]));
        let node = || {
            let store: Arc<dyn Store> =
                Arc::new(PgStore::open(&db.target, StoreKeys::for_tests()).unwrap());
            Engine::new(store, keys.clone())
        };
        let (a, b) = (node(), node());
        let (sa, sb) = (a.shared_seen().unwrap(), b.shared_seen().unwrap());
        let (da, dbb) = (
            ProofCache::shared(sa.clone()),
            ProofCache::shared(sb.clone()),
        );
        let proof = DpopProof {
            jkt: "thumbprint".into(),
            jti: "proof-1".into(),
            replay_until: now() + 150,
        };
        da.check_and_insert(&proof, now()).unwrap();
        assert_eq!(
            dbb.check_and_insert(&proof, now()),
            Err("DPoP proof replayed")
        );
        assert_eq!(
            da.check_and_insert(&proof, now()),
            Err("DPoP proof replayed")
        );
        let other = DpopProof {
            jti: "proof-2".into(),
            ..proof
        };
        dbb.check_and_insert(&other, now()).unwrap();
        let (ra, rb) = (ReplayCache::shared(sa), ReplayCache::shared(sb));
        ra.check_and_insert("client", "jti-1", now() + 240, now())
            .unwrap();
        assert!(
            rb.check_and_insert("client", "jti-1", now() + 240, now())
                .is_err()
        );
        // the same jti of another client is another record
        rb.check_and_insert("other-client", "jti-1", now() + 240, now())
            .unwrap();
        // one process alone keeps its records in memory
        let dir = tempfile::tempdir().unwrap();
        let sqlite: Arc<dyn Store> = Arc::new(
            phivault_store::sqlite::SqliteStore::open(
                &dir.path().join("db"),
                StoreKeys::for_tests(),
            )
            .unwrap(),
        );
        assert!(Engine::new(sqlite, keys).shared_seen().is_none());
    }
}
