//! The embedded default engine: one SQLite database file in WAL mode.
//!
//! One writer thread owns the only read-write connection and group-commits every batch
//! queued while the previous commit was being made durable; readers use a small pool of
//! read-only connections, which WAL lets run concurrently with the writer. This module
//! opens and closes the store; each concern has a module of its own:
//!
//! - `schema`: the tables, and migrations of databases written in an earlier form;
//! - `wal`: checkpoints beside the writer, and restarts of the write-ahead log;
//! - `writer`: the writer thread and its group commit;
//! - `read`: the reader pool and the reads of versions, keys, metadata and audit;
//! - `index`: the blind index on disk, its log and its segments;
//! - `lists`: candidate queries evaluated over posting lists;
//! - `erase`: crypto-shredding one data key (its own transaction, then the WAL truncated).
//!
//! # Design
//!
//! `DIR/phivault.db` in WAL mode, `synchronous=FULL`, `secure_delete=ON`, `temp_store=MEMORY`.
//!
//! | table | holds |
//! |---|---|
//! | `resource_version(rtype, id, version, key_no, deleted, updated_ms, sealed, rno)` | every version, sealed; a delete is a tombstone version; the current version is the highest; `rno` is the resource's number |
//! | `data_key(key_no, key_id, wrapped)` | data keys, wrapped by the KEK |
//! | `resource_no(rno, id)` | resource numbers (assigned in creation order) → id, for turning postings back into ids |
//! | `search_seg(ix, tok, lo, data)` | the merged blind index: for index `ix` (a type and parameter), its sorted `(token, resource number)` postings cut into ~512-byte segments keyed by their first posting |
//! | `index_log(seq, data)` | one record per group commit since the last merge: the postings its writes added and removed, in order |
//! | `audit_event(seq, event, hash)`, `audit_head` | the hash-chained audit log and its Ed25519-signed head |
//! | `meta` | key check value, registered clients (public keys and scopes only) |
//! | `resource_epoch(one, n)` | the resource state: incremented by every commit that writes a version, in that commit (see *Kept rows*) |
//!
//! Logical ids are UUIDv7 (time-ordered) so new versions append to the B-tree, and canonical
//! UUIDs are stored as 16-byte blobs (other FHIR ids as text). The search index has no reverse
//! (id → tokens) index: an update or delete names the tokens of the version it replaces, which
//! the server recomputes by opening that version. WAL checkpoints run on their own thread
//! (`PRAGMA wal_checkpoint(PASSIVE)` every 250 ms), never inside a commit. Passive checkpoints
//! alone never let the log start again from its beginning while readers keep coming (one in
//! flight pins it), and every read appends an audit event: under a steady `GET` load the WAL
//! grew to 480 MB in 20 s, each commit extended the file and each page lookup searched a
//! growing WAL index. So the writer watches the WAL's length (SQLite's WAL hook reports it
//! after each commit) and, once it holds 2,048 frames (8 MiB), after answering its group runs
//! `wal_checkpoint(RESTART)`, waiting at most 20 ms for the readers still on old frames; its
//! next commit then writes the log from its beginning, and `journal_size_limit` cuts a file that
//! grew longer back to 64 MiB. If the checkpoint thread held the checkpoint lock, it tries again
//! after the next group; if readers held it off, after 5 ms, then 10, 20 … at most 250 ms, so a
//! long read transaction (an export, a backup, an operator's `sqlite3`) costs the writer one
//! 20 ms wait per quarter second, not one per group. The WAL stays at 8.5 MB at 18,000 –
//! 23,000 audited reads/s, where it grew to 480 MB in 20 s before (tests
//! `the_wal_starts_again_while_readers_never_stop`,
//! `a_reader_that_holds_the_wal_delays_no_group_after_the_first_try`; BENCHMARKS.md). Reads of several
//! statements (a candidate query, a page's rows, index statistics) run in one read transaction:
//! they see one state, and SQLite drops a connection's page cache at the start of a read
//! transaction whenever the WAL has changed — which, with every request audited, is nearly
//! always — so per-statement transactions re-read the same pages (≈7% of a date search's server
//! CPU).
//!
//! **Kept rows** (`crates/store/src/rows.rs`). For the same reason every row a reader reads is
//! a B-tree descent through pages read again from the file (a 10-row search page: ≈13% of a
//! date search's server CPU). Readers therefore keep the current rows they read — as stored:
//! sealed ciphertext and the identifiers the database holds in clear, never plaintext — for the
//! resource state they read them in. Every commit that writes a version increments
//! `resource_epoch` in the same transaction, whichever process commits it; a reader reads the
//! count in its snapshot (`current_many`: the same read transaction as the rows; `current`: the
//! statement before the row, so the row is at least as new as the count), uses and keeps rows
//! only for that count, forgets them all when it sees a higher one, and keeps nothing from an
//! older snapshot. So a kept row is never older than any acknowledged write (tests: the shared
//! suite compares `current` and `current_many` after every write; a second store on the same
//! file writes and the first sees it at once). Audit-only commits do not change the count, so a
//! read-mostly load is served from memory; bounded to 64 MiB of ciphertext, emptied when full.
//! A read-only open (reports, offline verification) keeps nothing: its database may predate the
//! table.
//!
//! **Index segments** (`crates/store/src/segments.rs`). A posting is a truncated token and a
//! resource number; within a token's run numbers are delta-coded varints, so a posting costs
//! 1–2 bytes instead of a ~33-byte B-tree row keyed by a 16-byte id (200 patients: the index
//! fell from 1.0 MB to 94 KB plus 78 KB of `resource_no`). A lookup of one token reads the
//! segment where its run starts and any later segment that begins inside it (one statement),
//! decodes them and applies the pending records below; AND/OR are intersections and unions of
//! sorted number lists, answered in resource-number order after the cursor's resource.
//!
//! **Pending postings.** Tokens are keyed hashes, so one write's postings land all over an
//! index; rewriting segments one commit at a time would rewrite a page or more per posting. So
//! the writer appends one record per group commit (the postings its writes add, and those of
//! the versions they replace that no longer hold) to the rowid-ordered `index_log` — a commit
//! touches only its last pages — and applies them, once committed and before any answer, to an in-memory map
//! (`Pending`, `crates/store/src/pending.rs`) of posting → live/dead. Lookups read the segments
//! and apply that map; conditional-create guards inside a transaction also see the records
//! staged earlier in it. When 200,000 postings are pending, after 1 s without index writes, or
//! on a clean stop, the writer merges them: only the segments the records fall into are
//! decoded, changed, re-cut and rewritten, and the log is emptied, in one transaction; readers
//! hold a read lock across their query and the writer a write lock across that commit, so no
//! lookup sees a posting in neither place or twice. On open, the log is replayed into a fresh
//! map: nothing depends on memory surviving a crash. New databases use `auto_vacuum =
//! INCREMENTAL`, and a clean stop returns free pages (an emptied log's) to the filesystem.
//! Databases of the earlier form (one `search_index` row per posting, keyed by id) are
//! migrated on open in one transaction: resources are numbered, old rows become postings (an
//! id several types share gets a posting for each — a superset, which verification removes).
//!
//! **Group commit.** All writes — resource versions, new data keys, blind-index tokens and audit
//! events — go to one writer thread as `WriteBatch`es. The writer takes every batch that queued
//! while the previous commit was syncing, applies each inside its own savepoint (a failed
//! precondition rolls back only that batch), commits once, and only then answers. One fsync
//! serves many requests; nothing is acknowledged before it is durable.
//!
//! **Concurrency.** Writes are optimistic: a batch names the version it expects to replace
//! (`Expect::Version(n)` / `Expect::Absent`) and the writer checks it inside the transaction.
//! A lost race is retried by the server with a fresh read (up to 16 times); with `If-Match` it
//! is a 412. Conditional create runs the criteria as a search (candidates from the index,
//! confirmed by decryption) and, when the criteria are a conjunction of single tokens (the
//! usual `identifier=system|value`), adds a `Guard::NoMatch` over those tokens to the batch,
//! listing the candidates it decrypted and found different; the writer re-checks it in the
//! same transaction. Identical conditional creates in one process also queue on a lock. A new patient's data key is stored with the first batch that uses it; a
//! concurrent batch that generated a different key for the same patient fails with
//! `KeyConflict` and is re-sealed under the stored key.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

use parking_lot::{Mutex, RwLock};
use phivault_audit::StoredEvent;
use phivault_audit::merkle;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::integrity::{Integrity, Known};
use crate::pending::Pending;
use crate::rows::RowCache;
use crate::{
    Candidates, CommitError, Committed, IndexEntry, IndexStats, SignedHead, Store, StoreError,
    StoreKeys, VersionRow, WriteBatch,
};

mod erase;
pub(crate) mod export;
mod fresh;
mod heads;
mod index;
mod kek;
mod lists;
mod read;
mod schema;
mod state;
pub mod tap;
#[cfg(test)]
mod tests;
mod trust;
pub mod verify;
mod wal;
mod writer;

pub use writer::CHECKPOINT_INTERVAL_MS;

// (shared with the PostgreSQL engine: the same audit events, digests and index numbers)
pub(crate) use index::index_no;
pub(crate) use state::sealed_digest;
pub(crate) use trust::{setting_event, store_event, tampered};
pub(crate) use writer::MetaChange;
pub(crate) use writer::{PutDigest, now_ms, postings_of_entries};

use index::load_pending;
use read::Remembered;
use schema::{SCHEMA, add_integrity_columns, migrate_to_segments, table_exists};
use wal::{Stop, WAL_SIZE_LIMIT, WalRestart, WalRestarter, spawn_checkpointer};
use writer::{Command, DEFAULT_MERGE_ROWS, IDLE_MERGE_MS, Writer, writer_loop};

/// Prepared statements each connection keeps.
const STATEMENT_CACHE: usize = 128;

/// How long a connection waits on another's lock before giving up with `SQLITE_BUSY`.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A logical id as stored: canonical lower-case UUIDs as 16-byte blobs (ids are the bulk of
/// every key), any other FHIR id as text. The mapping is one-to-one.
struct DbId<'a>(&'a str);

impl rusqlite::ToSql for DbId<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match phivault_audit::uuid_bytes(self.0) {
            Some(b) => ToSqlOutput::Owned(Value::Blob(b.to_vec())),
            None => ToSqlOutput::Borrowed(ValueRef::Text(self.0.as_bytes())),
        })
    }
}

/// An id column in its stored form (a UUID as 16 bytes, any other id as text) as text.
fn read_id(r: &rusqlite::Row<'_>, idx: usize) -> Result<String, rusqlite::Error> {
    use rusqlite::types::ValueRef;
    match r.get_ref(idx)? {
        ValueRef::Blob(b) => <[u8; 16]>::try_from(b)
            .map(|b| phivault_audit::uuid_text(&b))
            .map_err(|_| {
                rusqlite::Error::InvalidColumnType(idx, "id".into(), rusqlite::types::Type::Blob)
            }),
        ValueRef::Text(t) => std::str::from_utf8(t).map(str::to_owned).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
        }),
        other => Err(rusqlite::Error::InvalidColumnType(
            idx,
            "id".into(),
            other.data_type(),
        )),
    }
}

/// A stored flag: phivault writes 0 or 1 only, so anything else was written by someone
/// else (read as a conversion failure, which [`engine`] reports as tampering).
fn flag(r: &rusqlite::Row<'_>, idx: usize) -> Result<bool, rusqlite::Error> {
    match r.get::<_, i64>(idx)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(rusqlite::Error::IntegralValueOutOfRange(idx, other)),
    }
}

/// Whether the database behind `c` holds any resource version or settings row.
fn holds_data(c: &Connection) -> Result<bool, rusqlite::Error> {
    c.query_row(
        "SELECT EXISTS (SELECT 1 FROM resource_version) OR EXISTS (SELECT 1 FROM meta)",
        [],
        |r| r.get(0),
    )
}

fn engine(e: rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match e {
        // a stored value of a type or size phivault never writes: changed outside it
        // (rusqlite names the column and type, never the value)
        E::InvalidColumnType(..)
        | E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..) => StoreError::Tampered(format!(
            "a stored row is not in the form phivault writes ({e})"
        )),
        // rusqlite messages name SQL and constraint names, never bound values.
        _ => StoreError::Engine(e.to_string()),
    }
}

/// SQLite engine.
pub struct SqliteStore {
    path: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    readers: Mutex<Vec<Connection>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<(thread::JoinHandle<()>, Stop)>>,
    merge_rows: Arc<AtomicUsize>,
    idle_merge_ms: Arc<AtomicU64>,
    /// Shortest time between two audit checkpoints (ms).
    checkpoint_ms: Arc<AtomicU64>,
    /// When the writer restarts the WAL.
    wal_restart: Arc<WalRestart>,
    /// Index rows of `index_log` not yet merged into the segments (see
    /// [`crate::pending`]). Readers hold the read lock across their SQL query, and the
    /// writer holds the write lock across a merge's commit, so every lookup sees each
    /// committed row in exactly one of the two places.
    pending: Arc<RwLock<Pending>>,
    /// Resource numbers readers have turned into ids (see [`SqliteStore::id_of_number`]).
    ids_by_number: Remembered,
    /// Data key numbers readers have turned into key ids (see [`SqliteStore::key_id_of`]).
    key_ids: Remembered,
    /// Current rows readers have read (see [`crate::rows`]); none on a read-only open,
    /// whose database may predate `resource_epoch`.
    rows: Option<RowCache>,
    /// The integrity keys; none on a read-only open (offline tools), which checks nothing.
    integ: Option<Arc<Integrity>>,
    /// What this process knows it wrote ([`crate::integrity::Known`]).
    known: Arc<RwLock<Known>>,
    /// The resources' heads, loading or loaded ([`heads`]).
    heads: Arc<heads::HeadsGate>,
    /// Whether settings rows have a MAC column (a read-only open of an older database
    /// may not).
    has_mac: bool,
    /// What readers refused since [`Store::take_detections`] last took it (at most
    /// [`MAX_DETECTIONS`]).
    detections: Mutex<Vec<String>>,
}

/// Detections kept until the watcher takes them (more are counted in the last one).
const MAX_DETECTIONS: usize = 100;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

/// Settings of every connection.
fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT).map_err(engine)?;
    // Room for every statement a connection prepares (the writer alone uses more than
    // rusqlite's default 16, and an evicted statement is parsed again on its next use).
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(engine)?;
    // Everything SQLite would spill to a temporary file stays in memory: no plaintext
    // ever reaches a file anyway, but temp files outside the data directory would
    // escape its backup and permission regime.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(engine)?;
    // 64 MiB of page cache per connection (the default 2 MiB makes the writer spill
    // dirty index pages mid-transaction and re-read them from the WAL)
    conn.pragma_update(None, "cache_size", -65536)
        .map_err(engine)?;
    // Plans never depend on bound values: without this, a statement whose parameters
    // feed an index constraint is re-prepared whenever the values change (with the
    // bundled STAT4), which cost search more than running it.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map_err(engine)?;
    Ok(())
}

/// Settings of the writer's connection.
fn configure_writer(conn: &Connection) -> Result<(), StoreError> {
    // A new database returns free pages to the filesystem on a clean stop (the index
    // log empties at every merge); this must be chosen before the first table exists
    // and before the switch to WAL.
    if !table_exists(conn, "resource_version")? {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(engine)?;
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(engine)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Engine("WAL journal mode unavailable".into()));
    }
    // Durability: every commit is fsynced before any batch in it is acknowledged.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(engine)?;
    // Overwrite deleted content so freed pages keep no old ciphertext around.
    conn.pragma_update(None, "secure_delete", "ON")
        .map_err(engine)?;
    // Checkpoints run on their own thread (`wal`), never inside a commit: an automatic
    // checkpoint would stall every request waiting on that commit.
    conn.pragma_update(None, "wal_autocheckpoint", "0")
        .map_err(engine)?;
    // The writer restarts the WAL (see `wal::restart_wal`); a log that grew long before
    // (a burst, or a build without restarts) is cut back when it does.
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
        .map_err(engine)?;
    Ok(())
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`, checking what it holds against
    /// the signed audit head (see `trust`): a database changed outside phivault is refused
    /// with [`StoreError::Tampered`] naming what differs.
    pub fn open(path: &Path, keys: StoreKeys) -> Result<Self, StoreError> {
        let StoreKeys {
            signer,
            audit_public,
            integrity,
        } = keys;
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(engine)?;
        configure(&conn)?;
        configure_writer(&conn)?;
        conn.execute_batch(SCHEMA).map_err(engine)?;
        migrate_to_segments(&mut conn)?;
        let legacy = add_integrity_columns(&conn)?;
        let integ = Arc::new(integrity);
        // one snapshot: another process (an administrator's command beside a running
        // server) may be committing meanwhile
        conn.execute_batch("BEGIN").map_err(engine)?;
        let loaded = trust::load(&conn, &integ, &audit_public, legacy);
        conn.execute_batch(if loaded.is_ok() { "COMMIT" } else { "ROLLBACK" })
            .map_err(engine)?;
        let loaded = loaded?;
        let (head, frontier, digests, known, adopted) =
            trust::adopt(&mut conn, &integ, &signer, loaded, legacy)?;
        let known = Arc::new(RwLock::new(known));
        // an adopted store's heads were summed with everything else; any other's are
        // loaded on a thread of their own, beside the rest of the start
        let heads_gate = if adopted {
            heads::HeadsGate::loaded(known.clone())
        } else {
            heads::HeadsGate::spawn(path, integ.clone(), known.clone())?
        };
        let checkpointed: i64 = conn
            .query_row(
                "SELECT coalesce(max(size), 0) FROM audit_checkpoint",
                [],
                |r| r.get(0),
            )
            .map_err(engine)?;
        let pending = Arc::new(RwLock::new(load_pending(&conn)?));
        let merge_rows = Arc::new(AtomicUsize::new(DEFAULT_MERGE_ROWS));
        let (tx, rx) = mpsc::channel();
        let idle_merge_ms = Arc::new(AtomicU64::new(IDLE_MERGE_MS));
        let checkpoint_ms = Arc::new(AtomicU64::new(CHECKPOINT_INTERVAL_MS));
        let wal_restart = WalRestart::new();
        let writer_state = Writer {
            head,
            frontier,
            last_checkpoint: None,
            signer,
            pending: pending.clone(),
            merge_rows: merge_rows.clone(),
            idle_merge_ms: idle_merge_ms.clone(),
            checkpoint_ms: checkpoint_ms.clone(),
            wal: WalRestarter::new(wal_restart.clone()),
            integ: integ.clone(),
            digests,
            known: known.clone(),
            checkpointed: u64::try_from(checkpointed).unwrap_or(0),
            data_version: None,
            heads: heads_gate.clone(),
        };
        let writer = thread::Builder::new()
            .name("phivault-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_state))
            .map_err(|e| StoreError::Engine(format!("cannot start writer thread: {e}")))?;
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let checkpointer = spawn_checkpointer(path, stop.clone())?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some((checkpointer, stop))),
            merge_rows,
            idle_merge_ms,
            checkpoint_ms,
            wal_restart,
            pending,
            ids_by_number: Remembered::default(),
            key_ids: Remembered::default(),
            rows: Some(RowCache::default()),
            integ: Some(integ),
            known,
            heads: heads_gate,
            has_mac: true,
            detections: Mutex::new(Vec::new()),
        })
    }

    /// Merge pending index rows once no index row has been written for `ms`
    /// milliseconds (tests use a long time to keep rows pending).
    pub fn set_idle_merge_ms(&self, ms: u64) {
        self.idle_merge_ms.store(ms, Ordering::Relaxed);
    }

    /// Write an audit checkpoint at most every `ms` milliseconds while events come
    /// (default [`CHECKPOINT_INTERVAL_MS`]; at least 1).
    pub fn set_checkpoint_interval_ms(&self, ms: u64) {
        self.checkpoint_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Restart the WAL once it holds this many frames (tests use small values to restart
    /// it often).
    pub fn set_wal_restart_frames(&self, frames: u64) {
        self.wal_restart
            .frames
            .store(frames.max(1), Ordering::Relaxed);
    }

    /// Merge pending index rows into the segments once there are this many (tests use
    /// small values to exercise merges).
    pub fn set_merge_rows(&self, rows: usize) {
        self.merge_rows.store(rows.max(1), Ordering::Relaxed);
    }

    /// Open the database read-only (offline verification, reports); writes fail.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Engine("database file does not exist".into()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(engine)?;
        // (offline tools read what they can: an index log that does not read is for
        // `verify` to report, not a reason to open nothing)
        let pending = if table_exists(&conn, "index_log")? {
            load_pending(&conn).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the index log does not read; lookups ignore it");
                Pending::default()
            })
        } else {
            Pending::default()
        };
        let has_mac = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('meta') WHERE name = 'mac'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(engine)?
            > 0;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            tx: Mutex::new(None),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(None),
            checkpointer: Mutex::new(None),
            merge_rows: Arc::new(AtomicUsize::new(DEFAULT_MERGE_ROWS)),
            idle_merge_ms: Arc::new(AtomicU64::new(IDLE_MERGE_MS)),
            checkpoint_ms: Arc::new(AtomicU64::new(CHECKPOINT_INTERVAL_MS)),
            wal_restart: WalRestart::new(),
            pending: Arc::new(RwLock::new(pending)),
            ids_by_number: Remembered::default(),
            key_ids: Remembered::default(),
            rows: None,
            integ: None,
            heads: heads::HeadsGate::loaded(Arc::default()),
            known: Arc::default(),
            has_mac,
            detections: Mutex::new(Vec::new()),
        })
    }

    /// The blind-index postings (index number, token) of the current resource
    /// `rtype`/`id`: the segments', with the log's records applied (tests of what a
    /// file-holder reads off the index).
    #[cfg(any(test, feature = "testsuite"))]
    pub fn postings_of(&self, rtype: &str, id: &str) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.with_snapshot(|c| {
            let rno: i64 = c.query_row(
                "SELECT rno FROM resource_version WHERE rtype = ?1 AND id = ?2 LIMIT 1",
                rusqlite::params![rtype, DbId(id)],
                |r| r.get(0),
            )?;
            let mut out = std::collections::BTreeSet::new();
            let mut st = c.prepare("SELECT ix, data FROM search_seg")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let ix: i64 = r.get(0)?;
                for (tok, n) in index::decode_segment(r.get_ref(1)?.as_blob()?)? {
                    if n == rno {
                        out.insert((ix, tok.bytes().to_vec()));
                    }
                }
            }
            let pending = load_pending(c).map_err(|_| index::corrupt_segment())?;
            for ((ix, tok, n), live) in pending.all() {
                if n == rno {
                    if live {
                        out.insert((ix, tok.bytes().to_vec()));
                    } else {
                        out.remove(&(ix, tok.bytes().to_vec()));
                    }
                }
            }
            Ok(out.into_iter().collect())
        })
    }

    /// The index number of `rtype`'s parameter `param` (see [`Self::postings_of`]).
    #[cfg(any(test, feature = "testsuite"))]
    pub fn index_number(rtype: &str, param: &str) -> i64 {
        index::index_no(rtype, param)
    }

    /// Whether the database holds any resource version or settings row.
    pub fn holds_data(&self) -> Result<bool, StoreError> {
        self.with_reader(holds_data)
    }

    /// How many resources the store has a head for (tombstoned ones included): what a
    /// backup records with each restore point, and a drill compares.
    pub fn resource_heads(&self) -> Result<u64, StoreError> {
        self.with_reader(|c| {
            c.query_row("SELECT count(*) FROM resource_no", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map(|n| u64::try_from(n).unwrap_or(0))
    }

    /// Wait until the start-up check of the resources' heads is done: the refusal, with
    /// the reason, if storage was changed (`serve` calls it before it listens).
    pub fn ready(&self) -> Result<(), StoreError> {
        self.heads.wait()
    }

    /// Stop the writer after it has finished the queued batches.
    pub fn close(&self) {
        // (the heads thread is joined first: it reads the file)
        let _ = self.heads.wait();
        if let Some((h, stop)) = self.checkpointer.lock().take() {
            if let Ok(mut s) = stop.0.lock() {
                *s = true;
            }
            stop.1.notify_all();
            let _ = h.join();
        }
        self.readers.lock().clear();
        self.tx.lock().take();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads in `read` and `lists`; writes are queued for the `writer`.
impl Store for SqliteStore {
    fn current(&self, rtype: &str, id: &str) -> Result<Option<VersionRow>, StoreError> {
        self.read_current(rtype, id)
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
        self.read_lookup(rtype, tokens)
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
        self.submit_meta(key, writer::MetaChange::Set(value.to_vec()))
    }

    fn update_meta(&self, key: &str, f: crate::MetaUpdate) -> Result<(), StoreError> {
        self.submit_meta(key, writer::MetaChange::Update(f))
    }

    fn submit(&self, batch: WriteBatch) -> oneshot::Receiver<Result<Committed, CommitError>> {
        self.submit_batch(batch)
    }

    fn erase_key(
        &self,
        erasure: crate::Erasure,
    ) -> oneshot::Receiver<Result<crate::Erased, CommitError>> {
        self.submit_erasure(erasure)
    }

    fn change_keys(&self, change: crate::KeyChange) -> Result<u64, StoreError> {
        self.submit_key_change(change)
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

    fn audit_head(&self) -> Result<Option<SignedHead>, StoreError> {
        self.read_audit_head()
    }

    fn check_state(&self, pace: &mut dyn FnMut()) -> Result<Vec<String>, StoreError> {
        self.check_state_now(pace)
    }

    fn reindex(&self, changes: Vec<crate::Reindex>) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Reindex(changes, tx)) {
            return Err(StoreError::Closed);
        }
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn take_detections(&self) -> Vec<String> {
        std::mem::take(&mut *self.detections.lock())
    }

    fn audit_checkpoints(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<merkle::Checkpoint>, StoreError> {
        self.read_audit_checkpoints(after, limit)
    }

    fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.read_audit_after(after, limit)
    }

    fn scan_audit(&self, visit: &mut dyn FnMut(StoredEvent) -> bool) -> Result<(), StoreError> {
        self.read_scan_audit(visit)
    }
}
