#![forbid(unsafe_code)]
//! Persistence of sealed resource versions, blind indexes, wrapped data keys and the
//! audit chain.
//!
//! Only ciphertext and keyed blind-index tokens reach an engine: this crate never sees a
//! plaintext resource. Writes go through [`Store::submit`] as a [`WriteBatch`] that is
//! applied atomically together with its audit events; engines group-commit concurrent
//! batches (one durable commit for many requests) without weakening durability: a
//! batch's result is only reported after the commit that holds it is durable.
//!
//! Engines: [`sqlite::SqliteStore`] (embedded default) and [`postgres::PgStore`] (several
//! nodes on one PostgreSQL database). Every engine must pass the shared
//! suite in `testsuite`, compiled for this crate's tests and, for other crates' tests, with
//! the `testsuite` feature (off by default, so release builds do not contain it).

use phivault_audit::AuditEvent;
use tokio::sync::oneshot;

pub use any::AnyStore;

mod any;
pub mod integrity;
mod pending;
pub mod postgres;
pub mod replay;
mod rows;
mod segments;
pub mod sqlite;
#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;

/// One stored version of a resource: identifiers in clear, content sealed.
#[derive(Clone, PartialEq, Eq)]
pub struct VersionRow {
    /// Resource type.
    pub rtype: String,
    /// Server-assigned logical id.
    pub id: String,
    /// Version number, starting at 1.
    pub version: u64,
    /// Identifier of the data key that sealed `sealed`.
    pub key_id: String,
    /// True for a delete tombstone (then `sealed` is empty).
    pub deleted: bool,
    /// Time of the write, milliseconds since the Unix epoch.
    pub updated_ms: i64,
    /// AEAD ciphertext of the resource JSON.
    pub sealed: Vec<u8>,
}

impl std::fmt::Debug for VersionRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionRow")
            .field("rtype", &self.rtype)
            .field("id", &self.id)
            .field("version", &self.version)
            .field("key_id", &self.key_id)
            .field("deleted", &self.deleted)
            .field("sealed_len", &self.sealed.len())
            .finish()
    }
}

/// What the current version of a resource must be for a put to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The resource must not exist at all.
    Absent,
    /// The current version must be exactly this (deleted or not).
    Version(u64),
}

/// A blind-index entry: a keyed token for one searchable value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Search parameter name (e.g. `identifier`).
    pub param: String,
    /// Keyed blind-index token of the normalised value.
    pub token: Vec<u8>,
}

/// One version to write.
#[derive(Debug, Clone)]
pub struct Put {
    /// The version row (tombstone for deletes).
    pub row: VersionRow,
    /// Precondition on the current version.
    pub expect: Expect,
    /// Blind-index entries of this version.
    pub index: Vec<IndexEntry>,
    /// Blind-index entries of the version it replaces, removed with this write. The
    /// engine keeps no reverse index from ids to tokens (it would double the index), so
    /// the writer, which can open the previous version, names them.
    pub replaces: Vec<IndexEntry>,
}

/// A precondition that is not tied to one resource.
#[derive(Debug, Clone)]
pub enum Guard {
    /// No current resource of `rtype` has all these index tokens (conditional create).
    NoMatch {
        /// Resource type searched.
        rtype: String,
        /// Tokens that must all match for a resource to count.
        tokens: Vec<IndexEntry>,
        /// Resources known not to match although they carry the tokens (tokens are
        /// truncated, so distinct values can share one; the writer decrypted these and
        /// found them different). The guard fails if any *other* resource has the tokens.
        except: Vec<String>,
    },
}

/// A blind-index query: which resources of one type can match. Evaluated by the engine
/// over index tokens only; the result is a superset of the true matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidates {
    /// Resources with at least one of `tokens` in the index of `param`.
    Tokens {
        /// Search parameter code.
        param: String,
        /// Tokens (OR).
        tokens: Vec<Vec<u8>>,
    },
    /// Every part holds.
    And(Vec<Candidates>),
    /// Some part holds.
    Or(Vec<Candidates>),
    /// Every current, non-deleted resource of the type.
    All,
}

/// Statistics of one blind index, for the coincidence check. Counts only, no tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexStats {
    /// Resources with at least one entry (resources with a value for the parameter).
    pub resources: u64,
    /// Index rows of the parameter.
    pub rows: u64,
    /// Distinct tokens of the parameter.
    pub distinct_tokens: u64,
    /// The most rows sharing one token.
    pub max_rows_per_token: u64,
}

/// A set of changes applied atomically, with the audit events that record them.
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Wrapped data keys this batch's rows were sealed with that were not yet stored.
    /// If another batch stored a different key under the same id first, the batch fails
    /// with [`CommitError::KeyConflict`] and must be re-sealed.
    pub new_keys: Vec<(String, Vec<u8>)>,
    /// Preconditions checked before anything is written.
    pub guards: Vec<Guard>,
    /// Versions to write.
    pub puts: Vec<Put>,
    /// Audit events appended in the same transaction.
    pub audit: Vec<AuditEvent>,
}

/// A data key to destroy (crypto-shredding, [`Store::erase_key`]): the key's wrapped form is
/// overwritten and deleted, the resources sealed under it lose their index postings, and
/// `marker` is stored under [`erased_marker_key`] in the same transaction, with `audit`.
#[derive(Debug)]
pub struct Erasure {
    /// The data key to destroy (`p:{patient id}`).
    pub key_id: String,
    /// The erasure's record, kept under [`erased_marker_key`] for good: an erased key id is
    /// never unwrapped, nor sealed under, again (whatever `data_key` later finds).
    pub marker: Vec<u8>,
    /// Audit events recording it.
    pub audit: Vec<AuditEvent>,
}

/// What an erasure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erased {
    /// Resources whose current version was sealed under the key (their postings removed).
    pub resources: u64,
    /// Index postings removed.
    pub postings: u64,
    /// Whether the write-ahead log was emptied afterwards (readers can hold it off; then the
    /// old wrapped key's page may stay in the log until its next restart).
    pub wal_truncated: bool,
    /// Sequence number of the last audit event written, if any.
    pub last_audit_seq: Option<u64>,
}

/// What an update of a shared record does ([`Store::update_shared`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedChange {
    /// Leave it as it is.
    Keep,
    /// Store this value until `until_ms` (ms since the Unix epoch).
    Put {
        /// The record (sealed by the caller).
        value: Vec<u8>,
        /// When it expires (it is cleared away after).
        until_ms: i64,
    },
    /// Remove it.
    Delete,
}

/// How [`Store::update_meta`] changes a settings row: given its value (None: absent), the
/// new value, or None to leave it.
pub type MetaUpdate = Box<dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>> + Send>;

/// The metadata key marking `key_id` erased (see [`Erasure`]).
pub fn erased_marker_key(key_id: &str) -> String {
    format!("erased:{key_id}")
}

/// One generation of the key-encryption key as stored ([`Store::kek_generations`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekRow {
    /// Generation number (0: the KEK derived from the master key; its `wrapped` is empty).
    pub generation: u32,
    /// The generation's KEK, wrapped under a key derived from the master key.
    pub wrapped: Vec<u8>,
    /// When the generation was made (ms since the Unix epoch).
    pub created_ms: i64,
}

/// A data key wrapped again ([`KeyChange::Rewrap`]): applied only if still `old`.
#[derive(Debug, Clone)]
pub struct Rewrap {
    /// The data key's id.
    pub key_id: String,
    /// The wrapped form the rotation read.
    pub old: Vec<u8>,
    /// The wrapped form under the new generation.
    pub new: Vec<u8>,
}

/// A change of the KEK generations ([`Store::change_keys`], KEK rotation).
#[derive(Debug)]
pub enum KeyChange {
    /// Store a new generation (refused if the generation exists).
    AddKek(KekRow),
    /// Replace wrapped data keys, each only if it is still wrapped as its `old`.
    Rewrap(Vec<Rewrap>),
    /// Delete the generation's row (overwritten: `secure_delete`) only if no data key's
    /// wrapped form starts with `prefix`, then empty the write-ahead log.
    DestroyKek {
        /// The generation.
        generation: u32,
        /// How the data keys wrapped under it start.
        prefix: Vec<u8>,
    },
}

/// A resource's blind-index postings replaced without a new version (the index scheme
/// changed): `old` are removed and `new` added, only if the resource is still at
/// `version` and not deleted.
#[derive(Debug, Clone)]
pub struct Reindex {
    /// Resource type.
    pub rtype: String,
    /// Resource id.
    pub id: String,
    /// The version whose entries these are.
    pub version: u64,
    /// Its entries as indexed before.
    pub old: Vec<IndexEntry>,
    /// Its entries as indexed now.
    pub new: Vec<IndexEntry>,
}

/// Result of a committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Sequence number of the last audit event written, if any.
    pub last_audit_seq: Option<u64>,
}

/// Why a batch was not committed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A put's precondition failed: the current version differs from the expected one.
    #[error("version conflict on put {index}")]
    Conflict {
        /// Index into `puts`.
        index: usize,
        /// The current version found (None if absent).
        current: Option<u64>,
    },
    /// A guard failed (a matching resource exists).
    #[error("guard {index} failed")]
    Guard {
        /// Index into `guards`.
        index: usize,
    },
    /// A different data key was stored under the same id first.
    #[error("data key conflict")]
    KeyConflict,
    /// The data key was erased: nothing is sealed under it, nor erased, again.
    #[error("data key erased")]
    KeyErased,
    /// No data key is stored under the id to erase.
    #[error("no such data key")]
    NoKey,
    /// The engine failed (I/O, disk full, closed). Nothing of the batch is durable.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CommitError {
    /// The failure as a [`StoreError`] (for calls that answer with one): an engine
    /// failure as it is, any other refusal by its message.
    pub fn into_store_error(self) -> StoreError {
        match self {
            CommitError::Store(s) => s,
            other => StoreError::Engine(other.to_string()),
        }
    }
}

/// Engine failures. Messages carry no data values.
#[non_exhaustive]
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database engine reported an error.
    #[error("database error: {0}")]
    Engine(String),
    /// The store's writer has stopped.
    #[error("store is closed")]
    Closed,
    /// Stored data is not in the expected shape.
    #[error("stored data is corrupt: {0}")]
    Corrupt(&'static str),
    /// Storage holds what this store did not write (a row inserted, edited, removed or
    /// restored from an older copy, the audit log cut or rewritten). The message names
    /// row keys, ids and kinds, never values.
    #[error("storage was changed outside phivault: {0}")]
    Tampered(String),
}

/// The signed head of the audit chain as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// Number of events.
    pub size: u64,
    /// Hash of the last event.
    pub hash: [u8; 32],
    /// The sealed state summary signed with the head ([`integrity`]; empty for heads
    /// signed before stores had one).
    pub state: Vec<u8>,
    /// Ed25519 signature over [`phivault_audit::ChainHead::signing_message_with`] the state.
    pub signature: Vec<u8>,
}

/// What a read-write store needs of the keys: the audit key's signer and public key,
/// and the integrity keys derived from the master key.
pub struct StoreKeys {
    /// Signs audit heads and checkpoints.
    pub signer: HeadSigner,
    /// The audit key's public half (Ed25519), to check the heads and checkpoints found.
    pub audit_public: [u8; 32],
    /// MACs of settings rows and the sealed state summary.
    pub integrity: integrity::Integrity,
}

impl std::fmt::Debug for StoreKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKeys([redacted])")
    }
}

/// Signs audit heads; provided by whoever holds the audit key.
pub type HeadSigner = Box<dyn Fn(&[u8]) -> Vec<u8> + Send + 'static>;

/// A storage engine.
///
/// Reads are synchronous (call them from a blocking context); writes are submitted and
/// their durable outcome awaited.
pub trait Store: Send + Sync + 'static {
    /// The current version (possibly a tombstone) of a resource.
    fn current(&self, rtype: &str, id: &str) -> Result<Option<VersionRow>, StoreError>;
    /// The current versions of several resources of one type, in the order of `ids`.
    fn current_many(
        &self,
        rtype: &str,
        ids: &[String],
    ) -> Result<Vec<Option<VersionRow>>, StoreError> {
        ids.iter().map(|id| self.current(rtype, id)).collect()
    }
    /// One version of a resource.
    fn version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<VersionRow>, StoreError>;
    /// Versions, newest first: of one resource when `id` is given, else of the whole type.
    fn history(
        &self,
        rtype: &str,
        id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError>;
    /// Ids of current, non-deleted resources of `rtype` having all `tokens`.
    fn lookup(&self, rtype: &str, tokens: &[IndexEntry]) -> Result<Vec<String>, StoreError>;
    /// Ids of current, non-deleted resources of `rtype` selected by `query`, in the
    /// store's id order, strictly after `after`, at most `limit`.
    fn candidates(
        &self,
        rtype: &str,
        query: &Candidates,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    /// Statistics of the index of `param` on `rtype` (offline tools; scans the index).
    fn index_stats(&self, rtype: &str, param: &str) -> Result<IndexStats, StoreError>;
    /// The wrapped data key stored under `key_id`.
    fn data_key(&self, key_id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// A value of the store's small metadata table.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Set a metadata value (durable on return).
    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Read settings row `key` (its MAC checked), let `f` decide its new value (None: leave
    /// it as it is) and write that — inside the writer's transaction, so no other write of
    /// the row (this process's, or another node's on a shared database) comes between the
    /// read and the write; durable when this returns. `f` may be called more than once
    /// (a group retried): the last call's answer is what was written. `f` runs inside the
    /// writer: it must not call the store, nor anything that may (sealing under a key that
    /// counts its seals reserves counts through the writer) — decide on bytes only.
    fn update_meta(&self, key: &str, f: MetaUpdate) -> Result<(), StoreError>;
    /// The metadata rows whose key starts with `prefix`, in key order, at most `limit`.
    fn meta_prefix(&self, prefix: &str, limit: usize)
    -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Submit a batch; the receiver yields once the batch is durable or rejected.
    fn submit(&self, batch: WriteBatch) -> oneshot::Receiver<Result<Committed, CommitError>>;
    /// Destroy a data key (see [`Erasure`]) in a transaction of its own, with secure
    /// deletion, then empty the write-ahead log; the receiver yields once it is durable or
    /// refused ([`CommitError::KeyErased`] when already erased, [`CommitError::NoKey`]).
    fn erase_key(&self, erasure: Erasure) -> oneshot::Receiver<Result<Erased, CommitError>>;
    /// Apply a change of the KEK generations through the writer, like any write (blocking:
    /// call it off the async runtime); the rows it changed (0: a destroy found keys left).
    fn change_keys(&self, change: KeyChange) -> Result<u64, StoreError> {
        let _ = change;
        Err(StoreError::Engine(
            "KEK generations are not supported".into(),
        ))
    }
    /// Replace resources' blind-index postings through the writer (blocking: call it off
    /// the async runtime); how many resources were reindexed (those changed since are
    /// skipped: their new versions were indexed as they were written).
    fn reindex(&self, changes: Vec<Reindex>) -> Result<u64, StoreError> {
        let _ = changes;
        Err(StoreError::Engine("reindexing is not supported".into()))
    }
    /// The stored KEK generations, ascending (none: only the derived generation 0).
    fn kek_generations(&self) -> Result<Vec<KekRow>, StoreError> {
        Ok(Vec::new())
    }
    /// Data keys numbered above `after`, ascending, at most `limit`: (number, id, wrapped).
    fn data_keys_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
        let _ = (after, limit);
        Err(StoreError::Engine(
            "listing data keys is not supported".into(),
        ))
    }
    /// Recompute the state summary from everything stored and compare it with the one
    /// signed with the audit head (the background verifier): the kinds of rows that
    /// differ, none when all match. `pace` is called every few thousand rows (a verifier
    /// sleeps there so requests go first).
    fn check_state(&self, pace: &mut dyn FnMut()) -> Result<Vec<String>, StoreError> {
        let _ = pace;
        Ok(Vec::new())
    }
    /// What readers refused as changed outside phivault since the last call (row keys, ids
    /// and kinds; never values), for alerts.
    fn take_detections(&self) -> Vec<String> {
        Vec::new()
    }
    /// Record `key` in namespace `ns` until `until_ms` (ms since the Unix epoch), once for
    /// every node that shares this store: `Some(true)` the first time, `Some(false)` if it
    /// is recorded and not expired (a replay), `None` if this engine keeps no state shared
    /// by several processes (one node: its callers keep such records in memory).
    fn claim_once(&self, ns: &str, key: &[u8], until_ms: i64) -> Result<Option<bool>, StoreError> {
        let _ = (ns, key, until_ms);
        Ok(None)
    }
    /// Read the shared record `ns`/`key` (none: absent, or expired at `now_ms`; 0: none
    /// is), let `f` decide, apply its change — no other node's update of the record runs
    /// meanwhile. `Ok(false)`: this engine keeps no records shared by several processes.
    fn update_shared(
        &self,
        ns: &str,
        key: &[u8],
        now_ms: i64,
        f: &mut dyn FnMut(Option<&[u8]>) -> SharedChange,
    ) -> Result<bool, StoreError> {
        let _ = (ns, key, now_ms, f);
        Ok(false)
    }
    /// Visit every shared record of `ns` not expired at `now_ms`; `Ok(false)` as above.
    fn scan_shared(
        &self,
        ns: &str,
        now_ms: i64,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<bool, StoreError> {
        let _ = (ns, now_ms, visit);
        Ok(false)
    }
    /// The data keys erased since position `after` of the erasure feed (every node's
    /// erasures, in order), and the feed's newest position; `None`: this engine has no
    /// other nodes to hear from. A storage writer can add to the feed: callers check each
    /// key's MAC'd erasure marker before they believe it.
    fn erasures_after(&self, after: i64) -> Result<Option<(i64, Vec<String>)>, StoreError> {
        let _ = after;
        Ok(None)
    }
    /// Whether other processes may serve this store at the same time (several nodes on one
    /// database): then state kept in one process's memory is not enough.
    fn shared_by_nodes(&self) -> bool {
        false
    }
    /// Whether this process runs the periodic task `task` now (scans, checks): with several
    /// nodes on one store, one of them at a time, another taking over when it stops. A
    /// store of one process always leads.
    fn lead(&self, task: &str) -> bool {
        let _ = task;
        true
    }
    /// The signed audit head, if any event was ever written.
    fn audit_head(&self) -> Result<Option<SignedHead>, StoreError>;
    /// Visit audit events in sequence order (for verification and reports).
    fn scan_audit(
        &self,
        visit: &mut dyn FnMut(phivault_audit::StoredEvent) -> bool,
    ) -> Result<(), StoreError>;
    /// At most `limit` signed checkpoints of the audit tree with a size above `after`, in
    /// order of size.
    fn audit_checkpoints(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<phivault_audit::merkle::Checkpoint>, StoreError>;
    /// At most `limit` audit events with a sequence number above `after`, in order.
    fn audit_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<phivault_audit::StoredEvent>, StoreError>;
}

#[cfg(any(test, feature = "testsuite"))]
impl StoreKeys {
    /// Fixed keys for tests (an Ed25519 key from a fixed seed, a fixed integrity secret):
    /// every call gives the same keys, so a test can reopen its store.
    pub fn for_tests() -> StoreKeys {
        use ring::signature::KeyPair as _;
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7u8; 32])
            .expect("a 32-byte seed");
        let mut audit_public = [0u8; 32];
        audit_public.copy_from_slice(pair.public_key().as_ref());
        StoreKeys {
            signer: Box::new(move |m: &[u8]| pair.sign(m).as_ref().to_vec()),
            audit_public,
            integrity: integrity::Integrity::new(&[9u8; 32]),
        }
    }
}
