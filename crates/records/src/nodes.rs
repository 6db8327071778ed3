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

/// The store's shared records as the sign-in state asks for them: each value sealed
/// (AES-256-GCM under the master key's secret key, the namespace and key bound as
/// associated data: a record moved to another key does not open), so the database holds
/// no grant, user name or patient id in clear.
struct SealedShared {
    store: Arc<dyn Store>,
    keys: phivault_crypto::KeyHierarchy,
}

fn label(ns: &str, key: &[u8]) -> String {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("shared-state-v1:{ns}:{hex}")
}

impl phivault_auth::authorize::SharedState for SealedShared {
    fn update(
        &self,
        ns: &str,
        key: &[u8],
        now_ms: u64,
        f: &mut dyn FnMut(Option<&[u8]>) -> phivault_auth::authorize::Change,
    ) -> Result<(), String> {
        use phivault_auth::authorize::Change;
        use phivault_store::SharedChange;
        let label = label(ns, key);
        let mut failed = None;
        let done = self.store.update_shared(
            ns,
            key,
            i64::try_from(now_ms).unwrap_or(i64::MAX),
            &mut |sealed| {
                // (a record that does not open was not sealed here: as if absent)
                let plain = sealed.and_then(|s| self.keys.open_secret(&label, s).ok());
                match f(plain.as_ref().map(|p| p.expose().as_slice())) {
                    Change::Keep => SharedChange::Keep,
                    Change::Delete => SharedChange::Delete,
                    Change::Put { value, until_ms } => {
                        match self.keys.seal_secret(&label, &value) {
                            Ok(value) => SharedChange::Put {
                                value,
                                until_ms: i64::try_from(until_ms).unwrap_or(i64::MAX),
                            },
                            Err(e) => {
                                failed = Some(e.to_string());
                                SharedChange::Keep
                            }
                        }
                    }
                }
            },
        );
        match (done, failed) {
            (Ok(true), None) => Ok(()),
            (Ok(false), _) => Err("the store keeps no shared records".into()),
            (Ok(true), Some(e)) => Err(e),
            (Err(e), _) => {
                tracing::error!(error = %e, "the shared sign-in records cannot be reached");
                Err(e.to_string())
            }
        }
    }

    fn scan(
        &self,
        ns: &str,
        now_ms: u64,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), String> {
        self.store
            .scan_shared(
                ns,
                i64::try_from(now_ms).unwrap_or(i64::MAX),
                &mut |k, sealed| {
                    if let Ok(plain) = self.keys.open_secret(&label(ns, k), sealed) {
                        visit(k, plain.expose());
                    }
                },
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// How often (at most) a node reads the other nodes' erasures.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Engine {
    /// Forget the data keys other nodes of the store erased since this one last looked
    /// (at most every [`FOLLOW_EVERY`]; each named key's MAC'd marker checked first, so a
    /// row a storage writer adds to the feed erases nothing here).
    pub(crate) fn follow_erasures(&self) {
        let store = self.store();
        if !store.shared_by_nodes() {
            return;
        }
        let mut feed = self.feed.lock();
        if feed.1.is_some_and(|t| t.elapsed() < FOLLOW_EVERY) {
            return;
        }
        let first = feed.1.is_none();
        feed.1 = Some(std::time::Instant::now());
        if first {
            // at the first look every key is still to be read: the history is skipped
            while let Ok(Some((newest, keys))) = store.erasures_after(feed.0) {
                feed.0 = newest;
                if keys.is_empty() {
                    break;
                }
            }
            return;
        }
        match store.erasures_after(feed.0) {
            Ok(Some((newest, keys))) => {
                feed.0 = newest;
                for k in keys {
                    if self.is_erased(&k).unwrap_or(false) {
                        tracing::info!("a data key another node erased is forgotten here");
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "the other nodes' erasures could not be read"),
        }
    }

    /// Sign-in codes and sessions shared by every node of this store, if other nodes can
    /// serve it (none: one process, whose authorization server keeps them in memory).
    pub fn shared_state(&self) -> Option<Arc<dyn phivault_auth::authorize::SharedState>> {
        let store = self.store();
        store.shared_by_nodes().then(|| {
            Arc::new(SealedShared {
                store: store.clone(),
                keys: self.keys().clone(),
            }) as Arc<dyn phivault_auth::authorize::SharedState>
        })
    }

    /// Replay records shared by every node of this store, if other nodes can serve it
    /// (none: one process, whose caches stay in memory).
    pub fn shared_seen(&self) -> Option<Arc<dyn phivault_auth::SharedSeen>> {
        let store = self.store();
        store
            .shared_by_nodes()
            .then(|| Arc::new(StoreSeen(store.clone())) as Arc<dyn phivault_auth::SharedSeen>)
    }

    /// Whether other nodes may serve this store at the same time (then what one process
    /// holds in memory is not all there is).
    pub fn shared_by_nodes(&self) -> bool {
        self.store().shared_by_nodes()
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
                Arc::new(PgStore::create(&db.target, StoreKeys::for_tests()).unwrap());
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

    /// App Launch across two nodes: a code issued by one is exchanged at the other, a
    /// replayed code and a reused refresh token end the session on both, and what the
    /// database holds of a grant is sealed.
    #[test]
    fn sign_in_codes_and_sessions_are_one_across_nodes() {
        use phivault_auth::authorize::{AuthorizationServer, AuthorizeRequest, Grant};
        const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        let db = TestDb::new();
        let keys = KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32]));
        let node = || {
            let store: Arc<dyn Store> =
                Arc::new(PgStore::create(&db.target, StoreKeys::for_tests()).unwrap());
            AuthorizationServer::with_state(
                Engine::new(store, keys.clone()).shared_state().unwrap(),
            )
        };
        let (a, b) = (node(), node());
        let scope = phivault_auth::ScopeSet::parse("patient/*.rs openid").unwrap();
        let req = AuthorizeRequest {
            client_id: "app1".into(),
            redirect_uri: "https://app.example/cb".into(),
            scope: scope.clone(),
            state: "s".into(),
            code_challenge: CHALLENGE.into(),
            nonce: None,
        };
        let grant = Grant {
            client_id: "app1".into(),
            user_id: "u-mariana".into(),
            username: "mariana.quintero".into(),
            role: phivault_auth::Role::Patient,
            generation: 1,
            fhir_user: Some("Patient/p-quintero".into()),
            patient: Some("p-quintero".into()),
            scope,
            nonce: None,
            auth_time: now(),
        };
        let exchange = |s: &AuthorizationServer, code: &str| {
            s.exchange_code("app1", code, "https://app.example/cb", VERIFIER, now())
        };
        let code = a.issue_code(&req, grant.clone(), now()).unwrap();
        let (g, r1) = exchange(&b, &code.0).unwrap();
        assert_eq!(g, grant);
        assert!(a.introspect_refresh(&r1.0, now()).is_some());
        // the code again, at either node: refused, and the session it started ends
        assert!(exchange(&a, &code.0).is_err());
        assert!(b.introspect_refresh(&r1.0, now()).is_none());
        // a new sign-in; refreshed at one node, the retired token at the other
        let code = b.issue_code(&req, grant.clone(), now()).unwrap();
        let (_, r1) = exchange(&a, &code.0).unwrap();
        a.bind_dpop(&r1.0, "thumbprint");
        assert_eq!(b.dpop_key_of(&r1.0).as_deref(), Some("thumbprint"));
        let (_, r2) = b.refresh("app1", &r1.0, None, now()).unwrap();
        assert!(a.introspect_refresh(&r2.0, now()).is_some());
        assert!(
            a.refresh("app1", &r1.0, None, now()).is_err(),
            "a retired token"
        );
        assert!(
            b.introspect_refresh(&r2.0, now()).is_none(),
            "the family is revoked"
        );
        // a third session, revoked for its person from the other node
        let code = a.issue_code(&req, grant.clone(), now()).unwrap();
        let (_, r3) = exchange(&a, &code.0).unwrap();
        b.revoke_user("u-mariana");
        assert!(a.introspect_refresh(&r3.0, now()).is_none());
        // sealed at rest
        let held = db.sql("SELECT count(*) FROM shared_state WHERE v IS NOT NULL");
        assert!(held.trim().parse::<u32>().unwrap() >= 6, "{held}");
        let dump = db.sql("SELECT string_agg(encode(v, 'escape'), '') FROM shared_state");
        for clear in ["mariana", "quintero", "app.example", "u-mariana"] {
            assert!(!dump.contains(clear), "{clear} in the shared records");
        }
    }

    /// A KEK rotation on one node: the other opens the rewrapped keys (it learns the new
    /// generation when a key does not open) and wraps new keys under the newest
    /// generation, so the rotation's destruction of the old one loses nothing.
    #[test]
    fn a_kek_rotation_on_one_node_is_followed_by_the_other() {
        use crate::engine::Batch;
        use crate::kek::KeyAdmin;
        let db = TestDb::new();
        let node = || {
            let store: Arc<dyn Store> =
                Arc::new(PgStore::create(&db.target, StoreKeys::for_tests()).unwrap());
            Engine::new(store, KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32])))
        };
        let add = |e: &Engine, ids: std::ops::Range<usize>| {
            let mut ring = e.key_ring();
            for i in ids {
                ring.key(&format!("p:{i}")).unwrap();
            }
            let batch = Batch {
                new_keys: ring.new_keys(),
                ..Default::default()
            };
            e.submit(batch).blocking_recv().unwrap().unwrap();
            ring.committed();
        };
        let (a, b) = (node(), node());
        add(&a, 0..10);
        let r = a.rotate_kek(&KeyAdmin::local_operator(), 4).unwrap();
        assert_eq!((r.generation, r.rewrapped, r.destroyed), (1, 10, vec![0]));
        // b started before the rotation, under generation 0 only
        for i in 0..10 {
            b.key_ring()
                .key(&format!("p:{i}"))
                .expect("opens after the rotation");
        }
        add(&b, 10..12);
        let w = b.store().data_key("p:11").unwrap().unwrap();
        assert_eq!(phivault_crypto::data_key_generation(&w), Some(1));
        // and back: b rotates, a follows
        let r = b.rotate_kek(&KeyAdmin::local_operator(), 100).unwrap();
        assert_eq!((r.generation, r.destroyed), (2, vec![1]));
        for i in 0..12 {
            a.key_ring()
                .key(&format!("p:{i}"))
                .expect("opens on the other node");
        }
    }

    /// A patient erased through one node: the other, which held the patient's data key,
    /// forgets it within a quarter second and refuses their records too.
    #[test]
    fn an_erasure_on_one_node_reaches_the_other_nodes_key_cache() {
        let db = TestDb::new();
        let node = || {
            let store: Arc<dyn Store> =
                Arc::new(PgStore::create(&db.target, StoreKeys::for_tests()).unwrap());
            Engine::new(store, KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32])))
        };
        let (a, b) = (node(), node());
        crate::erase::tests::write(
            &b,
            "Patient",
            "p1",
            serde_json::json!({"resourceType": "Patient", "name": [{"family": "Erasedson"}]}),
        );
        let key = crate::engine::patient_key_id("p1");
        b.key_ring().key(&key).expect("b holds the key");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(a.erase_patient("p1", "a request of the data subject", "r-1", Vec::new()))
            .expect("erased on a");
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(b.key_ring().key(&key).is_err(), "b forgot the key");
        // a row a storage writer adds to the feed erases nothing
        let other = crate::engine::patient_key_id("p2");
        b.key_ring().key(&other).unwrap();
        db.sql(&format!(
            "INSERT INTO erasure_feed (key_id) VALUES ('{other}')"
        ));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(b.key_ring().key(&other).is_ok());
    }
}
