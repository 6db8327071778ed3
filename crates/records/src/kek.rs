//! KEK rotation while the server serves, the daily cursor key, and the durable seal
//! counts of the key hierarchy (issue 17).
//!
//! **Generations.** The store keeps each KEK generation wrapped (`kek_generation`); a data
//! key's wrapped form names its generation. [`load`] teaches the engine's key hierarchy
//! every stored generation when the engine starts (none stored: generation 0, the KEK
//! HKDF derives from the master key, as data directories had before generations).
//!
//! **Rotation** ([`Engine::rotate_kek`]): make generation g+1 (random, stored wrapped);
//! switch new wraps to it under the engine's KEK gate, so that no batch sent afterwards
//! carries a key wrapped under an older generation (`Engine::submit` rewraps a write's
//! fresh keys of an older generation under the gate); wait until the batches sent before
//! the switch are committed (the writer is first in, first out); then rewrap every data
//! key in pages, each page one compare-and-set write through the writer while requests go
//! on (reads unwrap either generation meanwhile); finally destroy every older generation
//! — the store deletes its row only if no data key names it any more, and empties the WAL
//! — and forget it in memory. Generation 0 is destroyed the same way: once its marker row
//! is gone it is never derived again.
//!
//! Who may rotate: a [`KeyAdmin`], made by [`crate::Vault::decide_key_admin`] (a person
//! with the admin role, or a back-end client holding the explicit
//! [`phivault_auth::policy::KEY_ROTATION_SCOPE`]) or, for the command line, which holds
//! the master key anyway, [`KeyAdmin::local_operator`].

use std::sync::Arc;

use phivault_crypto::{KeyHierarchy, data_key_generation, kek_generation_prefix};
use phivault_store::{KekRow, KeyChange, Rewrap, Store};

use crate::engine::{Batch, Engine, now_ms};
use crate::{Error, Kind, Vault};

/// Metadata key prefix of the durable seal reservations (`seals:<key name>`).
pub const SEALS_PREFIX: &str = "seals:";
/// The one metadata row of the cursor keys' reservation (`<day> <seals>`): only today's
/// key seals, so older days' counts are never needed again.
const CURSOR_SEALS: &str = "seals:cursor";
/// Data keys rewrapped per write.
pub const DEFAULT_REWRAP_BATCH: usize = 256;
/// Passes over the data keys before a rotation gives up on destroying old generations.
const MAX_PASSES: u32 = 5;

/// Proof that the caller may rotate keys (only this module makes one).
pub struct KeyAdmin {
    who: String,
}

impl KeyAdmin {
    /// The operator of the command line on the data directory (who holds the master key).
    pub fn local_operator() -> KeyAdmin {
        KeyAdmin {
            who: "local-operator".to_owned(),
        }
    }

    /// Who it is (client id or `local-operator`).
    pub fn who(&self) -> &str {
        &self.who
    }
}

impl Vault {
    /// Whether `auth` may rotate keys (see [`phivault_auth::policy::may_rotate_keys`]).
    pub fn decide_key_admin(&self, auth: &phivault_auth::Authenticated) -> Result<KeyAdmin, Error> {
        if phivault_auth::policy::may_rotate_keys(auth) {
            Ok(KeyAdmin {
                who: auth.client_id().to_owned(),
            })
        } else {
            Err(Error::forbidden())
        }
    }
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The new generation.
    pub generation: u32,
    /// Data keys wrapped again.
    pub rewrapped: u64,
    /// Generations destroyed.
    pub destroyed: Vec<u32>,
    /// Data keys that opened under no known generation (left as they were).
    pub unreadable: u64,
}

/// Teach `keys` the generations `store` holds, and resume its seal counters from their
/// reservations (made durable in `store` from now on).
pub fn load(store: &Arc<dyn Store>, keys: &KeyHierarchy) {
    install_generations(store, keys);
    install_seal_counts(store, keys);
}

/// Teach `keys` the generations `store` holds now, the newest current (another node of
/// the store may have rotated the KEK since this one started).
pub fn install_generations(store: &Arc<dyn Store>, keys: &KeyHierarchy) {
    match store.kek_generations() {
        Ok(rows) if !rows.is_empty() => {
            for r in &rows {
                if keys
                    .install_kek_generation(r.generation, &r.wrapped)
                    .is_err()
                {
                    tracing::error!(
                        generation = r.generation,
                        "a KEK generation does not open under this master key"
                    );
                }
            }
            let newest = rows.iter().map(|r| r.generation).max().unwrap_or(0);
            if keys.set_kek_generation(newest).is_ok() {
                for g in keys.kek_generations() {
                    if !rows.iter().any(|r| r.generation == g) {
                        let _ = keys.forget_kek_generation(g);
                    }
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::error!("cannot read the KEK generations: {e}"),
    }
}

fn install_seal_counts(store: &Arc<dyn Store>, keys: &KeyHierarchy) {
    let mut stored = Vec::new();
    for (k, v) in store.meta_prefix(SEALS_PREFIX, 10_000).unwrap_or_default() {
        let text = String::from_utf8_lossy(&v).into_owned();
        if k == CURSOR_SEALS {
            if let Some((day, n)) = text.split_once(' ')
                && let Ok(n) = n.parse::<u64>()
            {
                stored.push((format!("cursor.{day}"), n));
            }
        } else if let (Some(name), Ok(n)) = (k.strip_prefix(SEALS_PREFIX), text.parse::<u64>()) {
            stored.push((name.to_owned(), n));
        }
    }
    let store = store.clone();
    keys.install_seal_counts(
        &stored,
        Arc::new(move |name: &str, upto: u64| {
            let (key, value) = match name.strip_prefix("cursor.") {
                Some(day) => (CURSOR_SEALS.to_owned(), format!("{day} {upto}")),
                None => (format!("{SEALS_PREFIX}{name}"), upto.to_string()),
            };
            // on a thread of its own: the seal may be made on the async runtime, where
            // waiting for the writer directly is not allowed (once per 2^20 seals)
            let store = store.clone();
            std::thread::spawn(move || store.set_meta(&key, value.as_bytes()).is_ok())
                .join()
                .unwrap_or(false)
        }),
    );
}

fn unavailable<E>(_: E) -> Error {
    Error::unavailable()
}

impl Engine {
    /// Seal a paging cursor under today's cursor key.
    pub fn seal_cursor(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys().seal_cursor(plain, now_ms()).ok()
    }

    /// Open a cursor sealed today or yesterday; None if forged, altered, foreign or older.
    pub fn open_cursor(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        self.keys()
            .open_cursor(sealed, now_ms())
            .ok()
            .map(|s| s.expose().clone())
    }

    /// Rotate the KEK while requests go on (see the module docs); blocking.
    pub fn rotate_kek(&self, admin: &KeyAdmin, batch: usize) -> Result<Rotation, Error> {
        static ONE_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
        let _one = ONE_AT_A_TIME.try_lock().ok_or_else(|| {
            Error::new(
                Kind::Conflict,
                phivault_fhir::IssueCode::Conflict,
                "a key rotation is already running",
            )
        })?;
        let store = self.store();
        let keys = self.keys();
        if store.shared_by_nodes() {
            // another node may have rotated since this one looked: its generations first
            install_generations(store, keys);
        }
        let rows = store.kek_generations().map_err(unavailable)?;
        let newest = rows
            .iter()
            .map(|r| r.generation)
            .chain(keys.kek_generations())
            .max();
        let generation = newest.unwrap_or(0) + 1;
        if rows.is_empty() {
            // generation 0 on record, so that it is destroyed (never derived again) like any
            store
                .change_keys(KeyChange::AddKek(KekRow {
                    generation: 0,
                    wrapped: Vec::new(),
                    created_ms: 0,
                }))
                .map_err(unavailable)?;
        }
        let wrapped = keys
            .new_kek_generation(generation)
            .map_err(|_| Error::internal())?;
        store
            .change_keys(KeyChange::AddKek(KekRow {
                generation,
                wrapped,
                created_ms: now_ms(),
            }))
            .map_err(|e| {
                // (another node of the store made the same generation first)
                if store.shared_by_nodes() && e.to_string().contains("23505") {
                    Error::new(
                        Kind::Conflict,
                        phivault_fhir::IssueCode::Conflict,
                        "another node is rotating the KEK; try again when it is done",
                    )
                } else {
                    unavailable(e)
                }
            })?;
        self.switch_kek(generation)?;
        tracing::info!(
            generation,
            by = admin.who(),
            "KEK rotation: rewrapping data keys"
        );
        let mut done = Rotation {
            generation,
            rewrapped: 0,
            destroyed: Vec::new(),
            unreadable: 0,
        };
        for _ in 0..MAX_PASSES {
            let (n, bad) = self.rewrap_pass(batch.max(1))?;
            done.rewrapped += n;
            done.unreadable = bad;
            if self.destroy_older(generation, &mut done.destroyed)? {
                return Ok(done);
            }
        }
        Err(Error::new(
            Kind::Conflict,
            phivault_fhir::IssueCode::Conflict,
            "older KEK generations still wrap data keys; rotate again",
        ))
    }

    /// Make `generation` the one new keys are wrapped under, and wait until every batch
    /// sent before is committed.
    fn switch_kek(&self, generation: u32) -> Result<(), Error> {
        {
            let _gate = self.kek_gate().write();
            self.keys()
                .set_kek_generation(generation)
                .map_err(|_| Error::internal())?;
        }
        // the writer takes batches in order: once this one is answered, so are they
        let _ = self.submit(Batch::default()).blocking_recv();
        Ok(())
    }

    /// One pass over every data key, rewrapping those of older generations, `batch` per
    /// write; (rewrapped, unreadable).
    fn rewrap_pass(&self, batch: usize) -> Result<(u64, u64), Error> {
        let (store, keys) = (self.store(), self.keys());
        let (mut after, mut rewrapped, mut unreadable) = (0i64, 0u64, 0u64);
        loop {
            let page = store.data_keys_after(after, batch).map_err(unavailable)?;
            let Some(last) = page.last() else {
                return Ok((rewrapped, unreadable));
            };
            after = last.0;
            let mut changes = Vec::new();
            for (_, key_id, old) in page {
                if old.is_empty() {
                    continue; // erased
                }
                match keys.rewrap_data_key(&key_id, &old) {
                    Ok(Some(new)) => changes.push(Rewrap { key_id, old, new }),
                    Ok(None) => {}
                    Err(_) => unreadable += 1,
                }
            }
            if !changes.is_empty() {
                rewrapped += store
                    .change_keys(KeyChange::Rewrap(changes))
                    .map_err(unavailable)?;
            }
        }
    }

    /// Destroy every stored generation but `current` that no data key names; true when
    /// none is left.
    fn destroy_older(&self, current: u32, destroyed: &mut Vec<u32>) -> Result<bool, Error> {
        let (store, keys) = (self.store(), self.keys());
        let mut all_gone = true;
        for row in store.kek_generations().map_err(unavailable)? {
            let g = row.generation;
            if g == current {
                continue;
            }
            let prefix = kek_generation_prefix(g);
            if store
                .change_keys(KeyChange::DestroyKek {
                    generation: g,
                    prefix,
                })
                .map_err(unavailable)?
                > 0
            {
                let _ = keys.forget_kek_generation(g);
                destroyed.push(g);
            } else {
                all_gone = false;
            }
        }
        Ok(all_gone)
    }
}

/// The KEK generation of a data directory and when it was made, for `keys status`:
/// generation, its creation time (ms; None for generation 0), and the data keys wrapped
/// under each generation.
pub fn kek_status(store: &dyn Store) -> Result<KekStatus, phivault_store::StoreError> {
    let rows = store.kek_generations()?;
    let current = rows.iter().max_by_key(|r| r.generation);
    let mut by_generation = std::collections::BTreeMap::new();
    let (mut after, mut erased) = (0i64, 0u64);
    loop {
        let page = store.data_keys_after(after, 10_000)?;
        let Some(last) = page.last() else { break };
        after = last.0;
        for (_, _, w) in &page {
            match data_key_generation(w) {
                Some(g) => *by_generation.entry(g).or_insert(0u64) += 1,
                None => erased += 1,
            }
        }
    }
    Ok(KekStatus {
        generation: current.map_or(0, |r| r.generation),
        rotated_ms: current.map(|r| r.created_ms).filter(|&t| t > 0),
        generations: rows.iter().map(|r| r.generation).collect(),
        keys_by_generation: by_generation.into_iter().collect(),
        other_keys: erased,
    })
}

/// See [`kek_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekStatus {
    /// The current generation.
    pub generation: u32,
    /// When it was made (None: generation 0, never rotated).
    pub rotated_ms: Option<i64>,
    /// Generations stored (empty: only the derived generation 0).
    pub generations: Vec<u32>,
    /// Data keys per generation.
    pub keys_by_generation: Vec<(u32, u64)>,
    /// Data keys that name no generation (erased).
    pub other_keys: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use phivault_crypto::MasterKey;
    use phivault_store::sqlite::SqliteStore;

    fn open(path: &std::path::Path) -> Engine {
        let store = SqliteStore::open(path, phivault_store::StoreKeys::for_tests()).expect("open");
        Engine::new(
            Arc::new(store),
            KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32])),
        )
    }

    fn add_keys(e: &Engine, from: usize, to: usize) {
        let mut ring = e.key_ring();
        for i in from..to {
            ring.key(&format!("p:{i}")).expect("key");
        }
        let batch = Batch {
            new_keys: ring.new_keys(),
            ..Default::default()
        };
        e.submit(batch)
            .blocking_recv()
            .expect("reply")
            .expect("commit");
        ring.committed();
    }

    #[test]
    fn rotations_rewrap_every_key_and_destroy_the_old_generations() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.sqlite");
        let e = open(&path);
        add_keys(&e, 0, 40);
        let before: Vec<_> = (0..40)
            .map(|i| e.store().data_key(&format!("p:{i}")).unwrap().unwrap())
            .collect();
        assert!(before.iter().all(|w| data_key_generation(w) == Some(0)));
        let status = kek_status(&**e.store()).expect("status");
        assert_eq!((status.generation, status.rotated_ms), (0, None));

        let r = e
            .rotate_kek(&KeyAdmin::local_operator(), 7)
            .expect("rotate");
        assert_eq!(
            (r.generation, r.rewrapped, r.destroyed.clone(), r.unreadable),
            (1, 40, vec![0], 0)
        );
        assert_eq!(e.keys().kek_generations(), vec![1]);
        add_keys(&e, 40, 45); // new keys: generation 1
        let status = kek_status(&**e.store()).expect("status");
        assert_eq!(status.generation, 1);
        assert!(status.rotated_ms.is_some());
        assert_eq!(status.keys_by_generation, vec![(1, 45)]);
        let gen1 = e.store().kek_generations().unwrap()[0].wrapped.clone();

        // a restart knows generation 1 only, and every key still opens
        drop(e);
        let e = open(&path);
        assert_eq!(e.keys().kek_generations(), vec![1]);
        for i in 0..45 {
            let w = e.store().data_key(&format!("p:{i}")).unwrap().unwrap();
            let k = e
                .keys()
                .unwrap_data_key(&format!("p:{i}"), &w)
                .expect("opens");
            if let Some(old_wrap) = before.get(i) {
                let old = KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32]));
                let was = old
                    .unwrap_data_key(&format!("p:{i}"), old_wrap)
                    .expect("old form");
                let sealed = was.seal(&aad(), b"record").expect("seal");
                assert_eq!(k.open(&aad(), &sealed).expect("same key"), b"record");
            }
        }
        let r = e
            .rotate_kek(&KeyAdmin::local_operator(), 1000)
            .expect("rotate");
        assert_eq!((r.generation, r.rewrapped, r.destroyed), (2, 45, vec![1]));
        assert_eq!(
            kek_status(&**e.store()).unwrap().keys_by_generation,
            vec![(2, 45)]
        );
        drop(e);
        for f in ["db.sqlite", "db.sqlite-wal", "db.sqlite-shm"] {
            let bytes = std::fs::read(dir.path().join(f)).unwrap_or_default();
            assert!(
                !bytes.windows(gen1.len()).any(|w| w == gen1.as_slice()),
                "{f}"
            );
        }
    }

    fn aad() -> phivault_crypto::RecordAad<'static> {
        phivault_crypto::RecordAad {
            resource_type: "Patient",
            id: "1",
            version: 1,
            key_id: "p:1",
            updated_ms: 0,
        }
    }

    #[test]
    fn seal_counts_are_reserved_in_the_store_and_resumed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.sqlite");
        let e = open(&path);
        e.keys().seal_secret("x", b"y").expect("seal");
        let c = e.seal_cursor(b"cursor").expect("cursor");
        assert_eq!(e.open_cursor(&c).as_deref(), Some(&b"cursor"[..]));
        let block = phivault_crypto::SEAL_RESERVE_BLOCK.to_string();
        assert_eq!(
            e.store().meta("seals:secret").unwrap().as_deref(),
            Some(block.as_bytes())
        );
        let cursor = String::from_utf8(e.store().meta("seals:cursor").unwrap().unwrap()).unwrap();
        assert!(cursor.ends_with(&format!(" {block}")), "{cursor}");
        drop(e);
        let e = open(&path);
        assert_eq!(
            e.keys().seals_used("secret"),
            phivault_crypto::SEAL_RESERVE_BLOCK
        );
        e.keys().seal_secret("x", b"y").expect("seal");
        let two = (2 * phivault_crypto::SEAL_RESERVE_BLOCK).to_string();
        assert_eq!(
            e.store().meta("seals:secret").unwrap().as_deref(),
            Some(two.as_bytes())
        );
    }
}
