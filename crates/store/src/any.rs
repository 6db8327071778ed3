//! One of the engines, chosen by the data directory: what the command line opens.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::postgres::PgStore;
use crate::sqlite::SqliteStore;
use crate::{
    Candidates, CommitError, Committed, IndexEntry, IndexStats, KekRow, SignedHead, Store,
    StoreError, VersionRow, WriteBatch,
};

/// The store of a data directory: the embedded SQLite file, or a PostgreSQL database that
/// several nodes share.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// `DIR/phivault.db`.
    Sqlite(Arc<SqliteStore>),
    /// The database `DIR/database.json` names.
    Postgres(Arc<PgStore>),
}

impl AnyStore {
    /// The SQLite engine, for what only it has (backups from its write-ahead log, the
    /// offline verification of its file).
    pub fn sqlite(&self) -> Option<&Arc<SqliteStore>> {
        match self {
            AnyStore::Sqlite(s) => Some(s),
            AnyStore::Postgres(_) => None,
        }
    }

    /// The engine's name, for messages.
    pub fn engine_name(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "SQLite",
            AnyStore::Postgres(_) => "PostgreSQL",
        }
    }

    fn inner(&self) -> &dyn Store {
        match self {
            AnyStore::Sqlite(s) => s.as_ref(),
            AnyStore::Postgres(p) => p.as_ref(),
        }
    }

    /// Write an audit checkpoint at most every `ms` milliseconds while events come.
    pub fn set_checkpoint_interval_ms(&self, ms: u64) {
        match self {
            AnyStore::Sqlite(s) => s.set_checkpoint_interval_ms(ms),
            AnyStore::Postgres(p) => p.set_checkpoint_interval_ms(ms),
        }
    }

    /// Wait until the start-up checks are done (the refusal, if storage was changed).
    pub fn ready(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.ready(),
            // (checked in full before `PgStore::open` returned)
            AnyStore::Postgres(_) => Ok(()),
        }
    }

    /// Whether the store holds any resource version or settings row.
    pub fn holds_data(&self) -> Result<bool, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.holds_data(),
            AnyStore::Postgres(p) => p.holds_data(),
        }
    }

    /// How many resources the store has a head for.
    pub fn resource_heads(&self) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.resource_heads(),
            AnyStore::Postgres(p) => p.resource_heads(),
        }
    }

    /// Finish the queued writes and stop.
    pub fn close(&self) {
        match self {
            AnyStore::Sqlite(s) => s.close(),
            AnyStore::Postgres(p) => p.close(),
        }
    }
}

impl Store for AnyStore {
    fn current(&self, rtype: &str, id: &str) -> Result<Option<VersionRow>, StoreError> {
        self.inner().current(rtype, id)
    }
    fn current_many(
        &self,
        rtype: &str,
        ids: &[String],
    ) -> Result<Vec<Option<VersionRow>>, StoreError> {
        self.inner().current_many(rtype, ids)
    }
    fn version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<VersionRow>, StoreError> {
        self.inner().version(rtype, id, version)
    }
    fn history(
        &self,
        rtype: &str,
        id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError> {
        self.inner().history(rtype, id, limit)
    }
    fn lookup(&self, rtype: &str, tokens: &[IndexEntry]) -> Result<Vec<String>, StoreError> {
        self.inner().lookup(rtype, tokens)
    }
    fn candidates(
        &self,
        rtype: &str,
        query: &Candidates,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.inner().candidates(rtype, query, after, limit)
    }
    fn index_stats(&self, rtype: &str, param: &str) -> Result<IndexStats, StoreError> {
        self.inner().index_stats(rtype, param)
    }
    fn data_key(&self, key_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner().data_key(key_id)
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner().meta(key)
    }
    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner().set_meta(key, value)
    }
    fn update_meta(&self, key: &str, f: crate::MetaUpdate) -> Result<(), StoreError> {
        self.inner().update_meta(key, f)
    }
    fn meta_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner().meta_prefix(prefix, limit)
    }
    fn submit(&self, batch: WriteBatch) -> oneshot::Receiver<Result<Committed, CommitError>> {
        self.inner().submit(batch)
    }
    fn erase_key(
        &self,
        erasure: crate::Erasure,
    ) -> oneshot::Receiver<Result<crate::Erased, CommitError>> {
        self.inner().erase_key(erasure)
    }
    fn change_keys(&self, change: crate::KeyChange) -> Result<u64, StoreError> {
        self.inner().change_keys(change)
    }
    fn reindex(&self, changes: Vec<crate::Reindex>) -> Result<u64, StoreError> {
        self.inner().reindex(changes)
    }
    fn kek_generations(&self) -> Result<Vec<KekRow>, StoreError> {
        self.inner().kek_generations()
    }
    fn data_keys_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
        self.inner().data_keys_after(after, limit)
    }
    fn check_state(&self, pace: &mut dyn FnMut()) -> Result<Vec<String>, StoreError> {
        self.inner().check_state(pace)
    }
    fn take_detections(&self) -> Vec<String> {
        self.inner().take_detections()
    }
    fn claim_once(&self, ns: &str, key: &[u8], until_ms: i64) -> Result<Option<bool>, StoreError> {
        self.inner().claim_once(ns, key, until_ms)
    }
    fn lead(&self, task: &str) -> bool {
        self.inner().lead(task)
    }
    fn shared_by_nodes(&self) -> bool {
        self.inner().shared_by_nodes()
    }
    fn erasures_after(&self, after: i64) -> Result<Option<(i64, Vec<String>)>, StoreError> {
        self.inner().erasures_after(after)
    }
    fn update_shared(
        &self,
        ns: &str,
        key: &[u8],
        now_ms: i64,
        f: &mut dyn FnMut(Option<&[u8]>) -> crate::SharedChange,
    ) -> Result<bool, StoreError> {
        self.inner().update_shared(ns, key, now_ms, f)
    }
    fn scan_shared(
        &self,
        ns: &str,
        now_ms: i64,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<bool, StoreError> {
        self.inner().scan_shared(ns, now_ms, visit)
    }
    fn audit_head(&self) -> Result<Option<SignedHead>, StoreError> {
        self.inner().audit_head()
    }
    fn scan_audit(
        &self,
        visit: &mut dyn FnMut(phivault_audit::StoredEvent) -> bool,
    ) -> Result<(), StoreError> {
        self.inner().scan_audit(visit)
    }
    fn audit_checkpoints(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<phivault_audit::merkle::Checkpoint>, StoreError> {
        self.inner().audit_checkpoints(after, limit)
    }
    fn audit_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<phivault_audit::StoredEvent>, StoreError> {
        self.inner().audit_after(after, limit)
    }
}
