//! Resource operations above the store: sealing, blind indexing, version
//! preconditions and the retry of optimistic conflicts.
//!
//! Every version is sealed under the data key of the patient whose compartment holds it
//! (`p:{patient id}`), or under the `shared` key for resources outside any patient
//! compartment. The AEAD associated data binds resource type, id, version and key id, so
//! a ciphertext copied to another row never opens.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use phivault_crypto::{DataKey, KeyHierarchy, RecordAad, TruncatedIndexKey};
use phivault_fhir::search::{self, Lookup};
use phivault_store::{Candidates, IndexEntry, Put, Store, VersionRow, WriteBatch};
use serde_json::Value;

use crate::Error;
use crate::access::Access;
use phivault_auth::Interaction;

/// Number of per-resource write locks (hashed shards).
const LOCK_SHARDS: usize = 1024;

/// Key id for resources outside every patient compartment.
pub const SHARED_KEY_ID: &str = "shared";
/// Most data keys kept unwrapped in memory.
const DEK_CACHE_MAX: usize = 200_000;

/// Metadata key holding the blind-index token width (bits) of a data directory.
pub const INDEX_BITS_META: &str = "search.index_bits";
/// Token width when a data directory names none: the coincidence band of DR3
/// (2 ≤ R/2^bits ≤ √R) then holds for indexes of 131,072 to 4.3 billion resources.
pub const DEFAULT_INDEX_BITS: u32 = 16;
/// The metadata key of the blind index's scheme (absent: the first, with every token
/// global; [`INDEX_SCHEME`]: per-patient tokens, see `search`).
pub const INDEX_SCHEME_META: &str = "search.index_scheme";
/// The blind index's scheme written by this build.
pub const INDEX_SCHEME: u32 = 2;
/// Parameters whose tokens stay global although their type would make them per-patient:
/// identifiers and contact points name one record each (a dictionary of them is a
/// dictionary of people, guessed one at a time), and conditional creates and record
/// matching look them up across all patients.
const GLOBAL_TOKEN_PARAMS: [&str; 4] = ["identifier", "telecom", "phone", "email"];
/// Most patients a search computes per-patient tokens for; beyond, the criterion narrows
/// nothing and the other criteria (or a scan) supply the candidates.
pub const MAX_PINNED_PATIENTS: usize = 64;

/// Whether `rtype`'s index `def` is keyed per patient: the codes, statuses, numbers and
/// quantities of records in a patient's compartment (what a patient has), whose values
/// are few enough that a file-holder who may write records could otherwise write each
/// value once and read off who else has it (see the search module's *Tokens*).
pub fn per_patient_index(rtype: &str, def: &search::SearchParamDef) -> bool {
    matches!(
        def.ptype,
        search::ParamType::Token | search::ParamType::Number | search::ParamType::Quantity
    ) && !GLOBAL_TOKEN_PARAMS.contains(&def.code.as_str())
        && (rtype == "Patient" || !phivault_fhir::patient_compartment_params(rtype).is_empty())
}

/// The data-key id of a patient.
pub fn patient_key_id(patient: &str) -> String {
    format!("p:{patient}")
}

/// The patient a key id belongs to.
pub fn key_patient(key_id: &str) -> Option<&str> {
    key_id.strip_prefix("p:")
}

/// Shared state of resource operations.
pub struct Engine {
    /// The storage engine: reached only through the engine (rows come out of it through
    /// calls that take an [`Access`] proof, or the server's own jobs).
    store: Arc<dyn Store>,
    /// This server's own FHIR base: references spelled as absolute URLs to it are local.
    local_base: Option<phivault_fhir::LocalBase>,
    keys: KeyHierarchy,
    deks: RwLock<HashMap<String, DataKey>>,
    /// Key ids known to be erased (`crate::erase`): never unwrapped or cached again.
    erased: RwLock<std::collections::HashSet<String>>,
    blind: RwLock<HashMap<String, Arc<BlindKey>>>,
    /// Per resource type: its indexed parameters with their keys (one lookup per write)
    indexers: RwLock<HashMap<String, Indexers>>,
    index_bits: u32,
    /// Writers of the same resource queue here instead of racing: without it, N concurrent
    /// unconditional updates of one resource need up to N-1 optimistic retries each.
    locks: Vec<tokio::sync::Mutex<()>>,
    /// Held (read) while a batch with new data keys is sent, and (write) while a KEK
    /// rotation switches generations (`crate::kek`).
    kek_gate: RwLock<()>,
    /// With other nodes on the store: where this node is in their erasure feed, and when
    /// it last looked (`crate::nodes`).
    pub(crate) feed: parking_lot::Mutex<(i64, Option<std::time::Instant>)>,
}

/// Data keys used while preparing one write: cached, stored, or newly generated.
pub struct KeyRing<'a> {
    engine: &'a Engine,
    fresh: Vec<(String, DataKey, Vec<u8>)>,
}

impl KeyRing<'_> {
    /// The data key for `key_id`, generating (and remembering to store) a new one if none exists.
    pub fn key(&mut self, key_id: &str) -> Result<DataKey, Error> {
        if let Some((_, k, _)) = self.fresh.iter().find(|(id, _, _)| id == key_id) {
            return Ok(k.clone());
        }
        if let Some(k) = self.engine.existing_key(key_id)? {
            return Ok(k);
        }
        if self.engine.store.shared_by_nodes() {
            // a new key goes under the newest generation, whichever node rotated to it
            crate::kek::install_generations(&self.engine.store, &self.engine.keys);
        }
        let (k, wrapped) = self
            .engine
            .keys
            .new_data_key(key_id)
            .map_err(|_| Error::internal())?;
        self.fresh.push((key_id.to_owned(), k.clone(), wrapped));
        Ok(k)
    }

    /// Wrapped keys to store with the batch.
    pub fn new_keys(&self) -> NewKeys {
        NewKeys(
            self.fresh
                .iter()
                .map(|(id, k, w)| (id.clone(), w.clone(), k.clone()))
                .collect(),
        )
    }

    /// After a successful commit: the new keys are stored; cache them.
    pub fn committed(self) {
        for (id, k, _) in self.fresh {
            self.engine.cache_key(id, k);
        }
    }
}

/// A version sealed by [`Engine::prepare`] under an [`Access`]: the only thing a
/// [`Batch`] writes (no other code can make one).
pub struct Sealed(Put);

impl Sealed {
    /// The resource type written.
    pub fn rtype(&self) -> &str {
        &self.0.row.rtype
    }
}

/// Wrapped data keys a [`KeyRing`] generated for a write.
#[derive(Default)]
pub struct NewKeys(Vec<(String, Vec<u8>, DataKey)>);

/// One atomic write for [`Engine::submit`]: sealed versions, the new keys they were
/// sealed with, preconditions, and the audit events recording it.
#[derive(Default)]
pub struct Batch {
    /// Keys generated for this batch's versions (a conflicting key fails the batch with
    /// `KeyConflict`: re-seal and retry).
    pub new_keys: NewKeys,
    /// Preconditions checked before anything is written.
    pub guards: Vec<phivault_store::Guard>,
    /// Versions to write.
    pub puts: Vec<Sealed>,
    /// Audit events appended in the same transaction.
    pub audit: Vec<phivault_audit::AuditEvent>,
}

/// The audit log as stored, read-only: events, the signed head, checkpoints.
pub struct AuditLog<'a>(&'a dyn Store);

impl AuditLog<'_> {
    /// The signed head, if any event was ever written.
    pub fn head(&self) -> Result<Option<phivault_store::SignedHead>, Error> {
        self.0.audit_head().map_err(Error::from_store)
    }

    /// At most `limit` events with a sequence number above `after`, in order.
    pub fn after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<phivault_audit::StoredEvent>, Error> {
        self.0.audit_after(after, limit).map_err(Error::from_store)
    }

    /// At most `limit` signed checkpoints with a size above `after`, in order of size.
    pub fn checkpoints(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<phivault_audit::merkle::Checkpoint>, Error> {
        self.0
            .audit_checkpoints(after, limit)
            .map_err(Error::from_store)
    }
}

/// What a prepared write will produce once committed.
#[derive(Clone)]
pub struct Written {
    /// Resource type.
    pub rtype: String,
    /// Logical id.
    pub id: String,
    /// New version.
    pub version: u64,
    /// Write time (ms since epoch).
    pub updated_ms: i64,
    /// The stored form of the new version (empty for deletes and for versions already
    /// stored); [`Written::body`] expands it for a response that carries the resource.
    stored: Vec<u8>,
    /// Patient compartment, if any.
    pub patient: Option<String>,
    /// True when the write created the resource.
    pub created: bool,
    /// True for a delete.
    pub deleted: bool,
}

/// The prefixes of the settings rows [`Engine::update_sharing_row`] may write.
pub const SHARING_ROWS: [&str; 2] = ["shl:", "export:"];

/// A new logical id: a UUID version 7, so ids sort by creation time and inserts append to
/// the storage B-tree instead of splitting pages at random positions.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Written {
    /// What a read of this version returns, byte for byte (empty for a delete or a
    /// version already stored). Only responses that carry the resource ask for it: a
    /// transaction's entries do not.
    pub fn body(&self) -> Result<Vec<u8>, Error> {
        if self.stored.is_empty() {
            return Ok(Vec::new());
        }
        crate::stored::expand(
            &self.stored,
            &self.rtype,
            &self.id,
            self.version,
            &instant(self.updated_ms),
        )
        .ok_or_else(Error::internal)
    }

    /// A version already stored (nothing is written; no body).
    pub fn from_row(row: &VersionRow) -> Self {
        Written {
            rtype: row.rtype.clone(),
            id: row.id.clone(),
            version: row.version,
            updated_ms: row.updated_ms,
            stored: Vec::new(),
            patient: key_patient(&row.key_id).map(str::to_owned),
            created: false,
            deleted: row.deleted,
        }
    }
}

/// One indexed parameter with its blind-index key (and, for dates, the index and key of
/// its span terms: see `search::span_index`).
struct Indexer {
    def: &'static search::SearchParamDef,
    extractor: Option<search::Extractor>,
    key: Arc<BlindKey>,
    span: Option<(String, Arc<BlindKey>)>,
    /// Tokens keyed per patient ([`per_patient_index`]).
    per_patient: bool,
}

/// One index's terms of a resource: (index code, keyed per patient, each term's global
/// token with the term).
pub type IndexTerms = (String, bool, Vec<(Vec<u8>, Vec<u8>)>);

/// A blind-index key, with the tokens it made of coarse date terms (years, months and
/// wider: see `search::is_coarse_date_term`). A search on a date window hashes some thirty
/// of them, the same few hundred over and over, and most dates written hash two. Terms
/// that name a day or any other value are hashed every time and never kept. At most
/// [`COARSE_TOKENS_MAX`] per key; emptied when full.
struct BlindKey {
    key: TruncatedIndexKey,
    coarse: RwLock<HashMap<Vec<u8>, Vec<u8>>>,
}

/// See [`BlindKey`].
const COARSE_TOKENS_MAX: usize = 4096;

impl BlindKey {
    /// The token of `term` in the compartment of `patient` (a per-patient index): the term
    /// prefixed by a zero byte and the patient's id, which no plain term is.
    fn patient_token(&self, patient: &str, term: &[u8]) -> Vec<u8> {
        let mut t = Vec::with_capacity(2 + patient.len() + term.len());
        t.push(0);
        t.push(u8::try_from(patient.len()).unwrap_or(u8::MAX));
        t.extend_from_slice(patient.as_bytes());
        t.extend_from_slice(term);
        self.key.token(&t)
    }

    fn token(&self, term: &[u8]) -> Vec<u8> {
        if !search::is_coarse_date_term(term) {
            return self.key.token(term);
        }
        if let Some(t) = self.coarse.read().get(term) {
            return t.clone();
        }
        let t = self.key.token(term);
        let mut kept = self.coarse.write();
        if kept.len() >= COARSE_TOKENS_MAX {
            kept.clear();
        }
        kept.insert(term.to_vec(), t.clone());
        t
    }
}

/// The indexed parameters of one resource type.
type Indexers = Arc<[Indexer]>;

/// Append the entries of one index (truncated tokens of distinct terms may coincide: each
/// token once).
fn push_entries(out: &mut Vec<IndexEntry>, param: &str, mut tokens: Vec<Vec<u8>>) {
    tokens.sort_unstable();
    tokens.dedup();
    out.extend(tokens.into_iter().map(|token| IndexEntry {
        param: param.to_owned(),
        token,
    }));
}

/// RFC 3339 instant of a millisecond timestamp, always with three fraction digits so
/// that instants sort as strings the way they sort as times.
pub fn instant(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    // (`time` keeps years within ±9999: four digits unless negative)
    let Ok(year) = u32::try_from(t.year()) else {
        return instant_formatted(&t);
    };
    // digit by digit: every response and every written version carries one or more of
    // these, and the formatting machinery cost more than the date arithmetic
    let mut out = String::with_capacity(24);
    let mut push = |n: u32, width: u32, then: char| {
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (n / 10u32.pow(place) % 10) as u8));
        }
        out.push(then);
    };
    push(year, 4, '-');
    push(u32::from(u8::from(t.month())), 2, '-');
    push(u32::from(t.day()), 2, 'T');
    push(u32::from(t.hour()), 2, ':');
    push(u32::from(t.minute()), 2, ':');
    push(u32::from(t.second()), 2, '.');
    push(u32::from(t.millisecond()), 3, 'Z');
    out
}

/// [`instant`] through `format!`, for negative years.
fn instant_formatted(t: &time::OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Engine {
    /// A new engine over `store` with the key hierarchy `keys`.
    pub fn new(store: Arc<dyn Store>, keys: KeyHierarchy) -> Self {
        crate::kek::load(&store, &keys);
        let index_bits = store
            .meta(INDEX_BITS_META)
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u32>().ok())
            .filter(|b| (1..=128).contains(b))
            .unwrap_or(DEFAULT_INDEX_BITS);
        Engine {
            store,
            local_base: None,
            keys,
            deks: RwLock::new(HashMap::new()),
            erased: RwLock::new(Default::default()),
            blind: RwLock::new(HashMap::new()),
            indexers: RwLock::new(HashMap::new()),
            index_bits,
            locks: (0..LOCK_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            kek_gate: RwLock::new(()),
            feed: parking_lot::Mutex::new((0, None)),
        }
    }

    /// The storage engine, for this crate's own jobs (search, care, snooping, accounts);
    /// everyone else reaches it through the calls below, record rows only under an
    /// [`Access`] and writes only as [`Sealed`] versions.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The current version (possibly a tombstone) of `id` of `access`'s type, if `access`
    /// reaches it (None when absent or not reached: the caller cannot tell which).
    pub fn current(&self, access: &Access, id: &str) -> Result<Option<VersionRow>, Error> {
        let row = self
            .store
            .current(access.rtype(), id)
            .map_err(Error::from_store)?;
        Ok(row.filter(|r| access.admits_row(r)))
    }

    /// Version `version` of `id`, if `access` reaches it.
    pub fn version(
        &self,
        access: &Access,
        id: &str,
        version: u64,
    ) -> Result<Option<VersionRow>, Error> {
        let row = self
            .store
            .version(access.rtype(), id, version)
            .map_err(Error::from_store)?;
        Ok(row.filter(|r| access.admits_row(r)))
    }

    /// The versions `access` reaches, newest first: of `id`, or of the whole type (at most
    /// `limit` read). A record moved between patients shows each only its own versions.
    pub fn history(
        &self,
        access: &Access,
        id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VersionRow>, Error> {
        let rows = self
            .store
            .history(access.rtype(), id, limit)
            .map_err(Error::from_store)?;
        Ok(rows.into_iter().filter(|r| access.admits_row(r)).collect())
    }

    /// Commit one atomic write: versions sealed under an [`Access`], the keys they need,
    /// guards and the audit events recording it; the receiver yields once it is durable
    /// or rejected.
    pub fn submit(
        &self,
        batch: Batch,
    ) -> tokio::sync::oneshot::Receiver<
        Result<phivault_store::Committed, phivault_store::CommitError>,
    > {
        // new keys go out wrapped under the current KEK generation (`crate::kek`)
        let _gate = (!batch.new_keys.0.is_empty()).then(|| self.kek_gate.read());
        let new_keys = batch
            .new_keys
            .0
            .into_iter()
            .map(|(id, wrapped, k)| {
                let current = phivault_crypto::data_key_generation(&wrapped)
                    == Some(self.keys.kek_generation());
                match current {
                    true => (id, wrapped),
                    false => {
                        let w = self.keys.wrap_data_key(&id, &k).unwrap_or(wrapped);
                        (id, w)
                    }
                }
            })
            .collect();
        self.store.submit(WriteBatch {
            new_keys,
            guards: batch.guards,
            puts: batch.puts.into_iter().map(|s| s.0).collect(),
            audit: batch.audit,
        })
    }

    /// Append audit events alone (reads, refusals); the receiver yields once durable.
    pub fn append_audit(
        &self,
        events: Vec<phivault_audit::AuditEvent>,
    ) -> tokio::sync::oneshot::Receiver<
        Result<phivault_store::Committed, phivault_store::CommitError>,
    > {
        self.submit(Batch {
            audit: events,
            ..Default::default()
        })
    }

    /// The audit log as stored (events, signed head, checkpoints): no records.
    pub fn audit_log(&self) -> AuditLog<'_> {
        AuditLog(&*self.store)
    }

    /// A registration or setting of the metadata table (clients, apps, providers).
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.store.meta(key).map_err(Error::from_store)
    }

    /// The metadata rows whose key starts with `prefix`, at most `limit`.
    pub fn meta_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, Error> {
        self.store
            .meta_prefix(prefix, limit)
            .map_err(Error::from_store)
    }

    /// Settings rows of trusted sharing (`shl:` share links, `export:` export jobs): read,
    /// decided by `f` (None: leave it) and written inside the writer's transaction, so no
    /// other write of the row — another request's, another node's — comes between (a
    /// passcode's failure count is exact under any number of parallel requests). Other
    /// rows (accounts, clients, keys) are not reachable this way.
    pub fn update_sharing_row(
        &self,
        key: &str,
        f: phivault_store::MetaUpdate,
    ) -> Result<(), Error> {
        if !SHARING_ROWS.iter().any(|p| key.starts_with(p)) {
            return Err(Error::internal());
        }
        self.store.update_meta(key, f).map_err(Error::from_store)
    }

    /// Tell the engine this server's FHIR base URL (references to it are local).
    pub(crate) fn set_base_url(&mut self, base_url: &str) {
        self.local_base = phivault_fhir::LocalBase::new(base_url);
    }

    /// Take the write locks of these resources (in a fixed order, so two writers never
    /// deadlock). Hold the guards until the write is committed.
    pub async fn lock_resources<'a>(
        &self,
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        use std::hash::{Hash, Hasher};
        let mut shards: Vec<usize> = keys
            .into_iter()
            .map(|(t, i)| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (t, i).hash(&mut h);
                (h.finish() % LOCK_SHARDS as u64) as usize
            })
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let mut guards = Vec::with_capacity(shards.len());
        for s in shards {
            if let Some(m) = self.locks.get(s) {
                guards.push(m.lock().await);
            }
        }
        guards
    }

    /// A key ring for one write.
    pub fn key_ring(&self) -> KeyRing<'_> {
        KeyRing {
            engine: self,
            fresh: Vec::new(),
        }
    }

    fn existing_key(&self, key_id: &str) -> Result<Option<DataKey>, Error> {
        // (another node's erasure makes this one forget the key within a quarter second)
        self.follow_erasures();
        if let Some(k) = self.deks.read().get(key_id) {
            return Ok(Some(k.clone()));
        }
        // an erased key's marker wins over whatever the key table holds
        if self.is_erased(key_id)? {
            return Err(Error::erased());
        }
        let Some(wrapped) = self.store.data_key(key_id).map_err(Error::from_store)? else {
            return Ok(None);
        };
        let k = match self.keys.unwrap_data_key(key_id, &wrapped) {
            Ok(k) => k,
            // read just before a KEK rotation rewrapped it and forgot the old generation?
            // (or wrapped under a generation another node of the store made since)
            Err(_) => {
                if self.store.shared_by_nodes() {
                    crate::kek::install_generations(&self.store, &self.keys);
                }
                let again = self
                    .store
                    .data_key(key_id)
                    .map_err(Error::from_store)?
                    .ok_or_else(Error::integrity)?;
                self.keys
                    .unwrap_data_key(key_id, &again)
                    .map_err(|_| Error::integrity())?
            }
        };
        self.cache_key(key_id.to_owned(), k.clone());
        Ok(Some(k))
    }

    /// Remember an unwrapped data key (bounded: the cache is dropped when full).
    fn cache_key(&self, key_id: String, k: DataKey) {
        let mut cache = self.deks.write();
        // (a key read just before its erasure is not kept after it)
        if self.erased.read().contains(&key_id) {
            return;
        }
        if cache.len() >= DEK_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key_id, k);
    }

    /// Whether the data key `key_id` was erased (its marker is in the store).
    pub fn is_erased(&self, key_id: &str) -> Result<bool, Error> {
        if self.erased.read().contains(key_id) {
            return Ok(true);
        }
        let marked = self
            .store
            .meta(&phivault_store::erased_marker_key(key_id))
            .map_err(Error::from_store)?
            .is_some();
        if marked {
            self.mark_erased(key_id);
        }
        Ok(marked)
    }

    /// Remember that `key_id` is erased, and drop it from the cache of unwrapped keys.
    pub(crate) fn mark_erased(&self, key_id: &str) {
        self.erased.write().insert(key_id.to_owned());
        self.deks.write().remove(key_id);
    }

    /// Undo [`Engine::mark_erased`] (an erasure that did not happen).
    pub(crate) fn unmark_erased(&self, key_id: &str) {
        self.erased.write().remove(key_id);
    }

    /// Forget a cached key (after a key conflict).
    pub fn forget_key(&self, key_id: &str) {
        self.deks.write().remove(key_id);
    }

    /// The key hierarchy (for records sealed outside resources: alerts).
    pub fn keys(&self) -> &KeyHierarchy {
        &self.keys
    }

    /// See the field (`crate::kek`).
    pub(crate) fn kek_gate(&self) -> &RwLock<()> {
        &self.kek_gate
    }

    /// Seal a server-internal secret (paging cursors) under a key derived for `label`.
    pub fn seal_secret(&self, label: &str, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys.seal_secret(label, plain).ok()
    }

    /// Open what [`Engine::seal_secret`] sealed; None if forged, altered or foreign.
    pub fn open_secret(&self, label: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        self.keys
            .open_secret(label, sealed)
            .ok()
            .map(|s| s.expose().clone())
    }

    /// The people's accounts of this data directory.
    pub fn users(&self) -> crate::users::UserDirectory<'_> {
        crate::users::UserDirectory::new(&self.keys, &*self.store)
    }

    /// Token width of this data directory's blind indexes.
    pub fn index_bits(&self) -> u32 {
        self.index_bits
    }

    fn blind_key(&self, rtype: &str, param: &str) -> Arc<BlindKey> {
        let scope = format!("{rtype}.{param}");
        if let Some(k) = self.blind.read().get(&scope) {
            return k.clone();
        }
        let k = Arc::new(BlindKey {
            key: self
                .keys
                .blind_index_key(&scope)
                .truncating(self.index_bits),
            coarse: RwLock::new(HashMap::new()),
        });
        self.blind.write().insert(scope, k.clone());
        k
    }

    /// The index token of one term of `rtype`'s parameter `param`.
    pub fn term_token(&self, rtype: &str, param: &str, term: &[u8]) -> Vec<u8> {
        self.blind_key(rtype, param).token(term)
    }

    fn indexers(&self, rtype: &str) -> Indexers {
        if let Some(v) = self.indexers.read().get(rtype) {
            return v.clone();
        }
        let v: Indexers = search::indexed_params(rtype)
            .map(|def| {
                let span = (def.ptype == search::ParamType::Date).then(|| {
                    let code = search::span_index(&def.code);
                    let key = self.blind_key(rtype, &code);
                    (code, key)
                });
                Indexer {
                    def,
                    extractor: search::extractor(def),
                    key: self.blind_key(rtype, &def.code),
                    span,
                    per_patient: per_patient_index(rtype, def),
                }
            })
            .collect();
        self.indexers.write().insert(rtype.to_owned(), v.clone());
        v
    }

    /// Blind-index entries of a resource: for every search parameter of its type with a
    /// value, the tokens of each value's terms. (Parameters whose values are a subset of
    /// a wider one's share its index and write nothing.)
    pub fn index_entries(&self, rtype: &str, resource: &Value) -> Vec<IndexEntry> {
        self.entries_under(rtype, resource, true)
    }

    /// Every current record of `rtype` that opens (not a tombstone, not an erased
    /// patient's), opened for the server's own maintenance (reindexing, `phivault index
    /// check`): `visit` gets each batch of at most `batch`, in id order.
    pub fn each_record(
        &self,
        rtype: &str,
        batch: usize,
        visit: &mut dyn FnMut(Vec<(VersionRow, Value)>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut after: Option<String> = None;
        loop {
            let ids = self
                .store
                .candidates(rtype, &Candidates::All, after.as_deref(), batch)
                .map_err(Error::from_store)?;
            let Some(last) = ids.last().cloned() else {
                return Ok(());
            };
            let rows = self
                .store
                .current_many(rtype, &ids)
                .map_err(Error::from_store)?;
            visit(
                rows.into_iter()
                    .flatten()
                    .filter_map(|row| self.open_for_maintenance(&row).map(|json| (row, json)))
                    .collect(),
            )?;
            after = Some(last);
        }
    }

    /// A current record opened for the server's own maintenance: its JSON, or None when
    /// it is a tombstone or does not open (an erased patient's).
    fn open_for_maintenance(&self, row: &VersionRow) -> Option<Value> {
        if row.deleted {
            return None;
        }
        let access = Access::internal(&row.rtype, phivault_auth::Interaction::Read);
        let plain = self.open(&access, row).ok()?;
        serde_json::from_slice(&plain).ok()
    }

    /// The terms of each index of a resource, for `phivault index check`: (index code,
    /// keyed per patient, the terms' global tokens with the terms).
    pub fn index_terms(&self, rtype: &str, resource: &Value) -> Vec<IndexTerms> {
        let mut out = Vec::new();
        self.each_index(rtype, resource, |ix, terms| {
            let (mut point, mut span) = (Vec::new(), Vec::new());
            for t in terms {
                match &ix.span {
                    Some((_, key)) if search::is_span_term(t) => {
                        span.push((key.token(t), t.clone()))
                    }
                    _ => point.push((ix.key.token(t), t.clone())),
                }
            }
            out.push((ix.def.code.clone(), ix.per_patient, point));
            if let Some((code, _)) = &ix.span
                && !span.is_empty()
            {
                out.push((code.clone(), false, span));
            }
        });
        out
    }

    /// Call `f` with each index of `rtype` that `resource` has values for, and the terms
    /// of those values.
    fn each_index(&self, rtype: &str, resource: &Value, mut f: impl FnMut(&Indexer, &[Vec<u8>])) {
        let mut terms = Vec::new();
        for ix in self.indexers(rtype).iter() {
            let Some(extractor) = ix.extractor else {
                continue;
            };
            let values = extractor.extract(resource);
            if values.is_empty() {
                continue;
            }
            terms.clear();
            for v in &values {
                search::index_terms(v, &mut terms);
            }
            f(ix, &terms);
        }
    }

    /// [`Self::index_entries`] as the first index scheme made them (every token global),
    /// for moving a store to this build's ([`crate::reindex`]).
    pub(crate) fn index_entries_global(&self, rtype: &str, resource: &Value) -> Vec<IndexEntry> {
        self.entries_under(rtype, resource, false)
    }

    fn entries_under(&self, rtype: &str, resource: &Value, per_patient: bool) -> Vec<IndexEntry> {
        let mut out = Vec::new();
        // per-patient tokens are made for every patient whose compartment holds it (a
        // record in none gets tokens of the empty patient: found by scans only)
        let mut patients = phivault_fhir::patient_compartments(resource);
        if patients.is_empty() {
            patients.push(String::new());
        }
        self.each_index(rtype, resource, |ix, terms| {
            let (mut point, mut span) = (Vec::new(), Vec::new());
            for t in terms {
                match &ix.span {
                    Some((_, key)) if search::is_span_term(t) => span.push(key.token(t)),
                    _ if per_patient && ix.per_patient => {
                        point.extend(patients.iter().map(|p| ix.key.patient_token(p, t)));
                    }
                    _ => point.push(ix.key.token(t)),
                }
            }
            push_entries(&mut out, &ix.def.code, point);
            if let Some((code, _)) = &ix.span {
                push_entries(&mut out, code, span);
            }
        });
        out
    }

    /// Whether `rtype`'s index `param` is keyed per patient.
    pub fn is_per_patient(&self, rtype: &str, param: &str) -> bool {
        search::search_param(rtype, param).is_some_and(|def| per_patient_index(rtype, def))
    }

    /// The store query of an index lookup on `rtype`, for a search confined to `pinned`
    /// patients when it is: a per-patient index is looked up for each of them (at most
    /// [`MAX_PINNED_PATIENTS`]), and narrows nothing for a search that is not.
    pub fn candidates(
        &self,
        rtype: &str,
        lookup: &Lookup,
        pinned: Option<&[String]>,
    ) -> Candidates {
        match lookup {
            Lookup::Terms { param, terms } if self.is_per_patient(rtype, param) => {
                let Some(pinned) =
                    pinned.filter(|p| !p.is_empty() && p.len() <= MAX_PINNED_PATIENTS)
                else {
                    return Candidates::All;
                };
                let key = self.blind_key(rtype, param);
                let mut tokens: Vec<Vec<u8>> = pinned
                    .iter()
                    .flat_map(|p| terms.iter().map(|t| key.patient_token(p, t)))
                    .collect();
                tokens.sort_unstable();
                tokens.dedup();
                Candidates::Tokens {
                    param: param.clone(),
                    tokens,
                }
            }
            Lookup::Terms { param, terms } => {
                let key = self.blind_key(rtype, param);
                let mut tokens: Vec<Vec<u8>> = terms.iter().map(|t| key.token(t)).collect();
                tokens.sort_unstable();
                tokens.dedup();
                Candidates::Tokens {
                    param: param.clone(),
                    tokens,
                }
            }
            Lookup::And(parts) => Candidates::And(
                parts
                    .iter()
                    .map(|p| self.candidates(rtype, p, pinned))
                    .collect(),
            ),
            Lookup::Or(parts) => Candidates::Or(
                parts
                    .iter()
                    .map(|p| self.candidates(rtype, p, pinned))
                    .collect(),
            ),
            Lookup::All => Candidates::All,
        }
    }

    /// Seal a new version of `rtype/id`. `resource` None writes a delete tombstone. The
    /// resource gets its server-owned fields (id, meta) set in place, so a caller that
    /// retries after a conflict passes the same value again without copying it.
    ///
    /// The one door of writes: `access` must grant a write of `rtype`, and reach the
    /// patient the version will belong to and the one the replaced version belongs to
    /// (403 otherwise). References spelled as this server's own absolute URL are made
    /// relative first, so they count for the compartment like any local reference (400
    /// for one on this server that names no resource).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        access: &Access,
        ring: &mut KeyRing<'_>,
        rtype: &str,
        id: &str,
        version: u64,
        expect: phivault_store::Expect,
        resource: Option<&mut Value>,
        now: i64,
        previous: Option<&VersionRow>,
    ) -> Result<(Sealed, Written), Error> {
        let writes = matches!(
            access.interaction(),
            Interaction::Create | Interaction::Update | Interaction::Delete
        );
        if !writes
            || access.rtype() != rtype
            || previous.is_some_and(|p| !p.deleted && !access.admits_row(p))
        {
            return Err(Error::forbidden());
        }
        let previous_key = previous.map(|p| p.key_id.as_str());
        // The blind-index entries of the version being replaced, recomputed from its content.
        let replaces = match previous {
            Some(p) if !p.deleted => {
                let old = self.open(access, p)?;
                let old: Value = serde_json::from_slice(&old).map_err(|_| Error::integrity())?;
                self.index_entries(rtype, &old)
            }
            _ => Vec::new(),
        };
        let (stored, patient, index, deleted) = match resource {
            Some(r) => {
                if let Some(base) = &self.local_base {
                    phivault_fhir::localize_references(r, base).map_err(|_| {
                        Error::bad_request(
                            "a reference to this server must name Type/id or \
                             Type/id/_history/version below its FHIR base",
                        )
                    })?;
                }
                set_server_fields(r, id, version, now);
                let patient = phivault_fhir::patient_compartment(r);
                if !access.admits(patient.as_deref()) {
                    return Err(Error::forbidden());
                }
                let index = self.index_entries(rtype, r);
                let stored = crate::stored::compact(r).map_err(|_| Error::internal())?;
                (stored, patient, index, false)
            }
            None => (
                Vec::new(),
                previous_key.and_then(key_patient).map(str::to_owned),
                Vec::new(),
                true,
            ),
        };
        let key_id = match &patient {
            Some(p) => patient_key_id(p),
            None => SHARED_KEY_ID.to_owned(),
        };
        let sealed = if deleted {
            Vec::new()
        } else {
            let key = ring.key(&key_id)?;
            let aad = RecordAad {
                resource_type: rtype,
                id,
                version,
                key_id: &key_id,
                updated_ms: now,
            };
            key.seal(&aad, &stored).map_err(|_| Error::internal())?
        };
        let put = Sealed(Put {
            row: VersionRow {
                rtype: rtype.to_owned(),
                id: id.to_owned(),
                version,
                key_id,
                deleted,
                updated_ms: now,
                sealed,
            },
            expect,
            index,
            replaces,
        });
        let written = Written {
            rtype: rtype.to_owned(),
            id: id.to_owned(),
            version,
            updated_ms: now,
            stored,
            patient,
            created: version == 1,
            deleted,
        };
        Ok((put, written))
    }

    /// Open a stored version `access` reaches (403 for any other: callers filter first, so
    /// this is the backstop); any failure is an integrity error, never data.
    pub fn open(&self, access: &Access, row: &VersionRow) -> Result<Vec<u8>, Error> {
        if !access.admits_row(row) {
            return Err(Error::forbidden());
        }
        let Some(key) = self.existing_key(&row.key_id)? else {
            return Err(Error::integrity());
        };
        let aad = RecordAad {
            resource_type: &row.rtype,
            id: &row.id,
            version: row.version,
            key_id: &row.key_id,
            updated_ms: row.updated_ms,
        };
        let (format, plain) = key
            .open_record(&aad, &row.sealed)
            .map_err(|_| Error::integrity())?;
        if format == phivault_crypto::RECORD_FORMAT_V1 {
            // sealed before the stored form: the whole resource
            return Ok(plain);
        }
        crate::stored::expand(
            &plain,
            &row.rtype,
            &row.id,
            row.version,
            &instant(row.updated_ms),
        )
        .ok_or_else(Error::integrity)
    }
}

/// Set the server-owned fields: id, meta.versionId, meta.lastUpdated (clients cannot set them).
fn set_server_fields(r: &mut Value, id: &str, version: u64, now: i64) {
    let Some(obj) = r.as_object_mut() else {
        return;
    };
    obj.insert("id".into(), Value::String(id.to_owned()));
    let meta = obj
        .entry("meta")
        .or_insert_with(|| Value::Object(Default::default()));
    if !meta.is_object() {
        *meta = Value::Object(Default::default());
    }
    if let Some(m) = meta.as_object_mut() {
        m.insert("versionId".into(), Value::String(version.to_string()));
        m.insert("lastUpdated".into(), Value::String(instant(now)));
    }
}

/// Decode `a=b&c=d` (application/x-www-form-urlencoded: percent-decoding, `+` as space,
/// invalid UTF-8 replaced, empty pairs skipped).
pub fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_coarse_tokens_are_the_hashed_ones_and_nothing_else_is_kept() {
        let keys = KeyHierarchy::new(&phivault_crypto::MasterKey::from_bytes(&[5; 32]));
        let plain = || keys.blind_index_key("Observation.date").truncating(40);
        let memo = BlindKey {
            key: plain(),
            coarse: RwLock::new(HashMap::new()),
        };
        let terms: Vec<Vec<u8>> = (0..COARSE_TOKENS_MAX + 10)
            .map(|i| format!("pM{}-{}", 1800 + i / 12, i % 12 + 1).into_bytes())
            .chain([b"pd2016-1-15".to_vec(), b"^smi".to_vec(), b"e+".to_vec()])
            .collect();
        for round in 0..2 {
            for t in &terms {
                assert_eq!(memo.token(t), plain().token(t), "round {round}");
            }
        }
        let kept = memo.coarse.read();
        assert!(kept.len() <= COARSE_TOKENS_MAX);
        assert!(kept.contains_key(&b"e+"[..]));
        assert!(!kept.contains_key(&b"pd2016-1-15"[..]) && !kept.contains_key(&b"^smi"[..]));
    }

    #[test]
    fn decodes_forms() {
        assert_eq!(
            form_urlencoded_pairs("identifier=http%3A%2F%2Fx%7C12+3&a"),
            vec![
                ("identifier".to_string(), "http://x|12 3".to_string()),
                ("a".to_string(), String::new())
            ]
        );
        let one = |q: &str| form_urlencoded_pairs(q).remove(0).1;
        assert_eq!(one("a=%"), "%");
        assert_eq!(one("a=%4"), "%4");
        assert_eq!(one("a=%zz"), "%zz");
        assert_eq!(one("a=%41"), "A");
        assert_eq!(one("a=%FF"), "\u{FFFD}");
        assert!(form_urlencoded_pairs("&&").is_empty());
    }

    #[test]
    fn instants_are_rfc3339() {
        assert_eq!(instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(instant(1_700_000_000_120), "2023-11-14T22:13:20.120Z");
        assert!(instant(1_700_000_000_123).ends_with(".123Z"));
        assert_eq!(instant(-1), "1969-12-31T23:59:59.999Z");
    }

    proptest::proptest! {
        #[test]
        fn digit_by_digit_instants_equal_formatted_ones(ms in -62_135_596_800_000i64..253_402_300_799_999) {
            let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
            proptest::prop_assert_eq!(instant(ms), instant_formatted(&t));
        }
    }
}
