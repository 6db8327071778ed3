//! The PostgreSQL engine: several phivault nodes on one database are one store.
//!
//! The same rules as the embedded engine (`crate::sqlite`): only sealed rows and keyed
//! blind-index tokens reach the database; every commit appends to one hash-chained audit
//! log and updates one state summary (`crate::integrity`) that the audit key signs with
//! the head; and whoever can write the database is treated as hostile.
//!
//! - `conn`: where the database is, the password, the runtime and the read pool;
//! - `schema`: the tables and their migrations (advisory lock);
//! - `writer`: group commit — every node's writer takes the audit head's row lock
//!   (`SELECT … FOR UPDATE`) first in its transaction, so the chain, the Merkle frontier
//!   and the state summary are sequenced in the database: one chain, whichever node
//!   commits;
//! - `read`: reads, each row checked against its MAC;
//! - `trust`: the checks at open and the background recomputation of the state.
//!
//! | table | holds |
//! |---|---|
//! | `resource_version(rtype, id, version, pkey, deleted, updated_ms, sealed, mac)` | every version, sealed; `pkey` is the data key id |
//! | `resource_head(rtype, id, pkey, rno, version, deleted, mac)` | each resource's current version |
//! | `posting(rtype, param, token, id, pkey)` | the blind index of current versions |
//! | `data_key(pkey, key_no, wrapped)` | data keys, wrapped by the KEK |
//! | `meta(k, v, mac)` | settings rows with their MACs |
//! | `kek_generation` | stored KEK generations |
//! | `audit_event`, `audit_checkpoint`, `audit_head(size, hash, state, signature, frontier)` | the log, its checkpoints, and its signed head with the sealed state summary and the Merkle frontier |
//!
//! **Rows checked as read.** A head and a version row carry a MAC under a key derived from
//! the master key (`Integrity::row_mac`): a row a storage writer inserts or edits is
//! refused as it is read (`StoreError::Tampered`, 500 integrity), not served. A pair put
//! back from an older copy does carry valid MACs; the state summary, which the background
//! verifier recomputes ([`crate::Store::check_state`]), names it.

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};

use crate::integrity::{Head, Integrity};
use crate::{
    Candidates, CommitError, Committed, IndexEntry, IndexStats, SignedHead, Store, StoreError,
    StoreKeys, VersionRow, WriteBatch,
};

mod conn;
pub mod migrate;
mod puts;
mod read;
mod schema;
mod shared;
#[cfg(any(test, feature = "testsuite"))]
pub mod testdb;
#[cfg(test)]
mod tests;
mod tls;
mod trust;
pub mod verify;
mod writer;

pub use conn::{PasswordSource, PgTarget};

use conn::Pool;
use writer::Command;

pub(super) fn now_ms() -> u64 {
    crate::sqlite::now_ms()
}

/// Row kinds of [`Integrity::row_mac`].
const HEAD_MAC: u8 = b'H';
const VERSION_MAC: u8 = b'V';

/// The MAC of a resource's head row.
fn head_mac(integ: &Integrity, rtype: &str, id: &str, pkey: &str, head: Head) -> [u8; 32] {
    integ.row_mac(
        HEAD_MAC,
        &[
            rtype.as_bytes(),
            id.as_bytes(),
            pkey.as_bytes(),
            &head.rno.to_be_bytes(),
            &head.version.to_be_bytes(),
            &[u8::from(head.deleted)],
        ],
    )
}

fn version_parts<'a>(
    row: &'a VersionRow,
    buf: &'a [[u8; 8]; 2],
    sealed: &'a [u8; 32],
) -> [&'a [u8]; 7] {
    [
        row.rtype.as_bytes(),
        row.id.as_bytes(),
        &buf[0],
        row.key_id.as_bytes(),
        if row.deleted { &[1] } else { &[0] },
        &buf[1],
        sealed,
    ]
}

/// The MAC of a version row (its sealed bytes by their SHA-256).
fn version_mac(integ: &Integrity, row: &VersionRow, sealed: &[u8; 32]) -> [u8; 32] {
    let buf = [row.version.to_be_bytes(), row.updated_ms.to_be_bytes()];
    integ.row_mac(VERSION_MAC, &version_parts(row, &buf, sealed))
}

fn version_mac_ok(integ: &Integrity, row: &VersionRow, mac: &[u8]) -> bool {
    let sealed = crate::sqlite::sealed_digest(&row.sealed);
    let buf = [row.version.to_be_bytes(), row.updated_ms.to_be_bytes()];
    integ.row_mac_ok(VERSION_MAC, &version_parts(row, &buf, &sealed), mac)
}

/// PostgreSQL engine.
pub struct PgStore {
    pool: Arc<Pool>,
    tx: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    /// Signalled when the writer has finished (after its senders are gone).
    writer_done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// The integrity keys; none on a read-only open (offline reports), which checks no
    /// row's MAC (as the embedded engine's read-only open checks nothing).
    integ: Option<Arc<Integrity>>,
    audit_public: [u8; 32],
    /// What readers refused since [`Store::take_detections`] last took it.
    detections: Mutex<Vec<String>>,
    checkpoint_ms: Arc<std::sync::atomic::AtomicU64>,
    /// When this node last removed expired replay records (ms).
    last_purge: Mutex<i64>,
    /// The periodic tasks this node runs (`shared`).
    leader: Mutex<shared::Leader>,
    /// What this node believes of the settings rows (their MACs): what it wrote, and what
    /// it read back in a snapshot whose settings sum to the signed state. A row read
    /// otherwise (another node's change, or an older copy put back) sends it to read them
    /// all again; a row that still differs was not written by phivault.
    known: Arc<RwLock<trust::Settings>>,
    /// The largest audit head this node saw: a head that goes back is refused.
    head_seen: Arc<std::sync::atomic::AtomicU64>,
    /// The settings sum `known` adds up to, as signed (None: not known to be current).
    known_sum: Arc<Mutex<Option<crate::integrity::Sum>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connect to the database at `target`, apply the schema's migrations, and check what
    /// it holds against the signed audit head (see `trust`): a database changed outside
    /// phivault is refused with [`StoreError::Tampered`] naming what differs.
    pub fn open(target: &PgTarget, keys: StoreKeys) -> Result<Self, StoreError> {
        PgStore::open_or_create(target, keys, false)
    }

    /// [`PgStore::open`], making the store's schema and first head in a database that holds
    /// no store yet (`init`; refused if it holds any other table).
    pub fn create(target: &PgTarget, keys: StoreKeys) -> Result<Self, StoreError> {
        PgStore::open_or_create(target, keys, true)
    }

    fn open_or_create(
        target: &PgTarget,
        keys: StoreKeys,
        create: bool,
    ) -> Result<Self, StoreError> {
        let StoreKeys {
            signer,
            audit_public,
            integrity,
        } = keys;
        let integ = Arc::new(integrity);
        let pool = Pool::new(target.clone())?;
        let mut wconn = pool.connect()?;
        let checked = conn::block_on(async {
            if !schema::exists(&mut wconn).await? {
                if !create {
                    return Err(trust::tampered(
                        "the database holds no phivault store: it was emptied or replaced (only init makes a new store)",
                    ));
                }
                if !schema::empty(&mut wconn).await? {
                    return Err(StoreError::Engine(
                        "the database is not empty: a new store is made in a database of its own"
                            .into(),
                    ));
                }
            }
            schema::migrate(&mut wconn).await?;
            trust::start(&mut wconn, &integ, &audit_public, &signer, create).await
        });
        let (known, head_size, settings_sum) = match checked {
            Ok(k) => k,
            Err(e) => {
                pool.shut();
                return Err(e);
            }
        };
        let known = Arc::new(RwLock::new(known));
        let head_seen = Arc::new(std::sync::atomic::AtomicU64::new(head_size));
        let known_sum = Arc::new(Mutex::new(Some(settings_sum)));
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let checkpoint_ms = Arc::new(std::sync::atomic::AtomicU64::new(
            crate::sqlite::CHECKPOINT_INTERVAL_MS,
        ));
        let w = writer::Writer {
            conn: wconn,
            known: known.clone(),
            head_seen: head_seen.clone(),
            known_sum: known_sum.clone(),
            pending_settings: Vec::new(),
            pending_sums: Default::default(),
            pool: pool.clone(),
            signer,
            integ: integ.clone(),
            audit_public,
            last_checkpoint: None,
            checkpoint_ms: checkpoint_ms.clone(),
        };
        // (a thread of its own: the audit signer need not be shareable, and the writer's
        // futures, like a reader's, only pass messages to the connection the runtime drives)
        let spawned = std::thread::Builder::new()
            .name("phivault-postgres-writer".into())
            .spawn(move || {
                conn::block_on(writer::run(rx, w));
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            pool.shut();
            return Err(StoreError::Engine(format!(
                "cannot start the writer thread: {e}"
            )));
        }
        Ok(PgStore {
            pool,
            tx: Mutex::new(Some(tx)),
            writer_done: Mutex::new(Some(done_rx)),
            integ: Some(integ),
            audit_public,
            detections: Mutex::new(Vec::new()),
            checkpoint_ms,
            last_purge: Mutex::new(0),
            leader: Mutex::default(),
            known,
            head_seen,
            known_sum,
        })
    }

    /// Connect for reading only (offline reports and verification with the audit key's
    /// public half): no migration, no writer, no row checked against its MAC; every read
    /// sees one snapshot, taken at the open (a head and the log it signs agree while
    /// nodes go on writing).
    pub fn open_read_only(target: &PgTarget) -> Result<Self, StoreError> {
        let pool = Pool::new(target.clone())?;
        if let Err(e) = pool.pin_snapshot() {
            pool.shut();
            return Err(e);
        }
        let schema = pool.with(async |c| {
            c.query_opt(
                "SELECT 1 FROM pg_tables WHERE tablename = 'phivault_schema'",
                &[],
            )
            .await
        });
        let schema = match schema {
            Ok(Some(_)) => pool
                .with(async |c| schema::check_columns(c).await)
                .map(Some),
            other => other.map(|r| r.map(|_| ())),
        };
        match schema {
            Ok(Some(_)) => {}
            Ok(None) => {
                pool.shut();
                return Err(StoreError::Engine(
                    "the database holds no phivault store (run phivault init)".into(),
                ));
            }
            Err(e) => {
                pool.shut();
                return Err(e);
            }
        }
        Ok(PgStore {
            pool,
            tx: Mutex::new(None),
            writer_done: Mutex::new(None),
            integ: None,
            audit_public: [0; 32],
            detections: Mutex::new(Vec::new()),
            checkpoint_ms: Arc::new(std::sync::atomic::AtomicU64::new(
                crate::sqlite::CHECKPOINT_INTERVAL_MS,
            )),
            last_purge: Mutex::new(0),
            leader: Mutex::default(),
            known: Arc::default(),
            head_seen: Arc::default(),
            known_sum: Arc::default(),
        })
    }

    /// Write an audit checkpoint at most every `ms` milliseconds while events come.
    pub fn set_checkpoint_interval_ms(&self, ms: u64) {
        self.checkpoint_ms
            .store(ms.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the database holds any resource version or settings row.
    pub fn holds_data(&self) -> Result<bool, StoreError> {
        self.pool.with(async |c| {
            let r = c
                .query_opt(
                    "SELECT 1 FROM resource_version UNION ALL SELECT 1 FROM meta LIMIT 1",
                    &[],
                )
                .await?;
            Ok(r.is_some())
        })
    }

    /// How many resources the store has a head for (tombstoned ones included).
    pub fn resource_heads(&self) -> Result<u64, StoreError> {
        self.pool.with(async |c| {
            let r = c
                .query_opt("SELECT count(*) FROM resource_head", &[])
                .await?;
            Ok(r.map_or(0, |r| r.get::<_, i64>(0)).max(0) as u64)
        })
    }

    /// Stop the writer after it has finished the queued commands, then the connections.
    pub fn close(&self) {
        // (the periodic tasks' locks go with their connection)
        *self.leader.lock() = shared::Leader::default();
        self.tx.lock().take();
        if let Some(done) = self.writer_done.lock().take() {
            let _ = done.recv();
        }
        self.pool.shut();
    }

    /// Queue a command for the writer; the command back if the writer has stopped.
    fn send(&self, cmd: Command) -> Result<(), Box<Command>> {
        match self.tx.lock().as_ref() {
            Some(tx) => tx.send(cmd).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(cmd)),
        }
    }

    /// Whether a head row is the one written (always, on a read-only open).
    pub(super) fn head_ok(
        &self,
        rtype: &str,
        id: &str,
        pkey: &str,
        head: Head,
        mac: &[u8],
    ) -> bool {
        self.integ
            .as_ref()
            .is_none_or(|i| head_mac(i, rtype, id, pkey, head).as_slice() == mac)
    }

    /// Whether a version row is the one written (always, on a read-only open).
    pub(super) fn version_ok(&self, row: &VersionRow, mac: &[u8]) -> bool {
        self.integ
            .as_ref()
            .is_none_or(|i| version_mac_ok(i, row, mac))
    }

    /// Whether a settings row is the one written (always, on a read-only open): its MAC,
    /// and the MAC this node believes is the newest.
    pub(super) fn setting_ok(&self, k: &str, v: &[u8], mac: &[u8]) -> bool {
        self.integ.as_ref().is_none_or(|i| {
            i.setting_ok(k, v, mac)
                && self
                    .known
                    .read()
                    .get(k)
                    .is_some_and(|m| m.as_slice() == mac)
        })
    }

    /// Whether this node believes settings row `k` exists (true on a read-only open).
    pub(super) fn setting_known(&self, k: &str) -> bool {
        self.integ.is_none() || self.known.read().contains_key(k)
    }

    /// The keys starting with `prefix` this node believes exist, in key order, at most
    /// `limit` (None on a read-only open, which checks nothing).
    pub(super) fn known_with_prefix(&self, prefix: &str, limit: usize) -> Option<Vec<String>> {
        self.integ.as_ref()?;
        let mut keys: Vec<String> = self
            .known
            .read()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort_unstable();
        keys.truncate(limit);
        Some(keys)
    }

    /// Read every settings row again in one snapshot whose sum is the signed state's, and
    /// believe them (another node changed some); refused if they differ from the signed
    /// state or the head went back.
    pub(super) fn refresh_settings(&self) -> Result<(), StoreError> {
        let Some(integ) = &self.integ else {
            return Ok(());
        };
        let seen = self.head_seen();
        let (known, size, sum) = self
            .pool
            .with(async |c| trust::signed_settings(c, integ, &self.audit_public).await)?;
        self.head_not_back(seen, size)?;
        *self.known.write() = known;
        *self.known_sum.lock() = Some(sum);
        Ok(())
    }

    /// The largest head seen so far (read before a head is read: a head read after it is
    /// at least as new).
    fn head_seen(&self) -> u64 {
        self.head_seen.load(std::sync::atomic::Ordering::Acquire)
    }

    /// `size` was read after the node had seen `seen`: it may not be smaller.
    fn head_not_back(&self, seen: u64, size: u64) -> Result<(), StoreError> {
        self.head_seen
            .fetch_max(size, std::sync::atomic::Ordering::AcqRel);
        if size < seen {
            return Err(self.tampered(format!(
                "the audit head went back from event {seen} to {size} (the database was restored from an older copy)"
            )));
        }
        Ok(())
    }

    /// Before a settings row is believed: the signed head read now must sign the settings
    /// this node believes (else another process changed some since — read them all again);
    /// so a node never honours a row it believed once and that was changed and then put
    /// back while it was not looking.
    pub(super) fn settings_current(&self) -> Result<(), StoreError> {
        let Some(integ) = &self.integ else {
            return Ok(());
        };
        let seen = self.head_seen();
        let (size, signed) = self
            .pool
            .with(async |c| trust::signed_head_now(c, integ, &self.audit_public).await)?;
        self.head_not_back(seen, size)?;
        if *self.known_sum.lock() == Some(signed) {
            return Ok(());
        }
        self.refresh_settings()
    }

    pub(super) fn detected(&self, what: &str) {
        tracing::error!(
            what,
            "a row read from the database was not written by phivault"
        );
        let mut d = self.detections.lock();
        if d.len() < 100 {
            d.push(what.to_owned());
        }
    }

    /// A row that fails its check: reported to the watcher, and refused.
    pub(super) fn tampered(&self, what: String) -> StoreError {
        self.detected(&what);
        StoreError::Tampered(what)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads in `read`; writes are queued for the `writer`.
impl Store for PgStore {
    fn current(&self, rtype: &str, id: &str) -> Result<Option<VersionRow>, StoreError> {
        Ok(self
            .read_current_many(rtype, &[id.to_owned()])?
            .pop()
            .flatten())
    }

    fn current_many(
        &self,
        rtype: &str,
        ids: &[String],
    ) -> Result<Vec<Option<VersionRow>>, StoreError> {
        self.read_current_many(rtype, ids)
    }

    fn version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<VersionRow>, StoreError> {
        self.read_version(rtype, id, version)
    }

    fn history(
        &self,
        rtype: &str,
        id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError> {
        self.read_history(rtype, id, limit)
    }

    fn lookup(&self, rtype: &str, tokens: &[IndexEntry]) -> Result<Vec<String>, StoreError> {
        let (rtype, tokens) = (rtype.to_owned(), tokens.to_vec());
        self.pool
            .with(async |c| read::matching(&c.client, &rtype, &tokens, None).await)
    }

    fn candidates(
        &self,
        rtype: &str,
        query: &Candidates,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read_candidates(rtype, query, after, limit)
    }

    fn index_stats(&self, rtype: &str, param: &str) -> Result<IndexStats, StoreError> {
        self.read_index_stats(rtype, param)
    }

    fn data_key(&self, key_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_data_key(key_id)
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_meta(key)
    }

    fn meta_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read_meta_prefix(prefix, limit)
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::SetMeta(
            key.to_owned(),
            crate::sqlite::MetaChange::Set(value.to_vec()),
            tx,
        ))
        .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn update_meta(&self, key: &str, f: crate::MetaUpdate) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::SetMeta(
            key.to_owned(),
            crate::sqlite::MetaChange::Update(f),
            tx,
        ))
        .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn submit(&self, batch: WriteBatch) -> oneshot::Receiver<Result<Committed, CommitError>> {
        let (tx, rx) = oneshot::channel();
        let digests = batch
            .puts
            .iter()
            .map(|p| crate::sqlite::PutDigest::of(p, self.integ.as_deref()))
            .collect();
        if let Err(cmd) = self.send(Command::Batch(batch, digests, tx))
            && let Command::Batch(_, _, tx) = *cmd
        {
            let _ = tx.send(Err(CommitError::Store(StoreError::Closed)));
        }
        rx
    }

    fn erase_key(
        &self,
        erasure: crate::Erasure,
    ) -> oneshot::Receiver<Result<crate::Erased, CommitError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(cmd) = self.send(Command::Erase(erasure, tx))
            && let Command::Erase(_, tx) = *cmd
        {
            let _ = tx.send(Err(CommitError::Store(StoreError::Closed)));
        }
        rx
    }

    fn change_keys(&self, change: crate::KeyChange) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Keys(change, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn reindex(&self, changes: Vec<crate::Reindex>) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Reindex(changes, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn kek_generations(&self) -> Result<Vec<crate::KekRow>, StoreError> {
        self.read_kek_generations()
    }

    fn data_keys_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
        self.read_data_keys_after(after, limit)
    }

    fn check_state(&self, pace: &mut dyn FnMut()) -> Result<Vec<String>, StoreError> {
        let Some(integ) = &self.integ else {
            return Ok(Vec::new());
        };
        let mut c = self.pool.connect()?;
        let differ = conn::block_on(trust::check_state(&mut c, integ, &self.audit_public, pace))?;
        // (what differs is raised like any reader's refusal)
        for what in &differ {
            self.detected(what);
        }
        if differ.iter().any(|d| d.contains("settings")) {
            // believe no settings row any more: each read now sums them all against the
            // signed state, and is refused while they differ (fail closed)
            self.known.write().clear();
            *self.known_sum.lock() = None;
        }
        Ok(differ)
    }

    fn claim_once(&self, ns: &str, key: &[u8], until_ms: i64) -> Result<Option<bool>, StoreError> {
        self.claim(ns, key, until_ms).map(Some)
    }

    fn lead(&self, task: &str) -> bool {
        self.try_lead(&self.leader, task)
    }

    fn shared_by_nodes(&self) -> bool {
        true
    }

    fn erasures_after(&self, after: i64) -> Result<Option<(i64, Vec<String>)>, StoreError> {
        let rows = self.pool.with(async |c| {
            c.query(
                "SELECT seq, key_id FROM erasure_feed WHERE seq > $1 ORDER BY seq LIMIT 10000",
                &[&after],
            )
            .await
        })?;
        let newest = rows.last().map_or(after, |r| r.get(0));
        Ok(Some((newest, rows.iter().map(|r| r.get(1)).collect())))
    }

    fn update_shared(
        &self,
        ns: &str,
        key: &[u8],
        now_ms: i64,
        f: &mut dyn FnMut(Option<&[u8]>) -> crate::SharedChange,
    ) -> Result<bool, StoreError> {
        self.update_record(ns, key, now_ms, f).map(|()| true)
    }

    fn scan_shared(
        &self,
        ns: &str,
        now_ms: i64,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<bool, StoreError> {
        self.scan_records(ns, now_ms, visit).map(|()| true)
    }

    fn take_detections(&self) -> Vec<String> {
        std::mem::take(&mut *self.detections.lock())
    }

    fn audit_head(&self) -> Result<Option<SignedHead>, StoreError> {
        self.read_audit_head()
    }

    fn scan_audit(
        &self,
        visit: &mut dyn FnMut(phivault_audit::StoredEvent) -> bool,
    ) -> Result<(), StoreError> {
        self.read_scan_audit(visit)
    }

    fn audit_checkpoints(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<phivault_audit::merkle::Checkpoint>, StoreError> {
        self.read_audit_checkpoints(after, limit)
    }

    fn audit_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<phivault_audit::StoredEvent>, StoreError> {
        self.read_audit_after(after, limit)
    }
}
