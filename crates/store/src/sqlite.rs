//! The embedded default engine: one SQLite database file in WAL mode.
//!
//! One writer thread owns the only read-write connection and group-commits: it takes
//! every batch queued while the previous commit was being made durable, applies each in
//! its own savepoint (so one failing batch does not affect the others), commits once
//! with `synchronous=FULL`, and only then answers every batch. Readers use a small pool
//! of read-only connections, which WAL lets run concurrently with the writer.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

use parking_lot::{Mutex, RwLock};
use phivault_audit::{ChainHead, StoredEvent};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::pending::{Pending, Sid, Staged, Tok};
use crate::{
    Candidates, CommitError, Committed, Expect, Guard, HeadSigner, IndexEntry, IndexStats,
    SignedHead, Store, StoreError, VersionRow, WriteBatch,
};

/// Most batches one group commit takes.
const MAX_GROUP: usize = 1024;
/// Read connections kept open.
const MAX_IDLE_READERS: usize = 16;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS data_key (
    key_no INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    wrapped BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS resource_version (
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    key_no INTEGER NOT NULL REFERENCES data_key (key_no),
    deleted INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (rtype, id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS search_index (
    ix INTEGER NOT NULL,
    token BLOB NOT NULL,
    id BLOB NOT NULL,
    PRIMARY KEY (ix, token, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS search_log (
    seq INTEGER PRIMARY KEY,
    ix INTEGER NOT NULL,
    token BLOB NOT NULL,
    id BLOB NOT NULL,
    live INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_event (
    seq INTEGER PRIMARY KEY,
    event BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    size INTEGER NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v BLOB NOT NULL
) WITHOUT ROWID;
"#;

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

/// An id column in its stored form.
fn read_sid(r: &rusqlite::Row<'_>, idx: usize) -> Result<Sid, rusqlite::Error> {
    use rusqlite::types::ValueRef;
    match r.get_ref(idx)? {
        ValueRef::Blob(b) => <[u8; 16]>::try_from(b).map(Sid::Uuid).map_err(|_| {
            rusqlite::Error::InvalidColumnType(idx, "id".into(), rusqlite::types::Type::Blob)
        }),
        ValueRef::Text(t) => std::str::from_utf8(t)
            .map(|t| Sid::Text(t.into()))
            .map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    idx,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            }),
        other => Err(rusqlite::Error::InvalidColumnType(
            idx,
            "id".into(),
            other.data_type(),
        )),
    }
}

fn sid_text(s: &Sid) -> String {
    match s {
        Sid::Uuid(b) => phivault_audit::uuid_text(b),
        Sid::Text(t) => t.to_string(),
    }
}

fn read_id(r: &rusqlite::Row<'_>, idx: usize) -> Result<String, rusqlite::Error> {
    read_sid(r, idx).map(|s| sid_text(&s))
}

/// The number naming the index of `(rtype, param)` in `search_index`: a stable 31-bit
/// FNV-1a hash (no registry to keep in step; stored in 4 bytes per row; a collision among
/// the few thousand R4 parameters is unlikely and would only add candidates, which the
/// server's verification removes).
fn index_no(rtype: &str, param: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rtype.bytes().chain([0u8]).chain(param.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((h ^ (h >> 32)) & 0x7fff_ffff) as i64
}

fn engine(e: rusqlite::Error) -> StoreError {
    // rusqlite messages name SQL and constraint names, never bound values.
    StoreError::Engine(e.to_string())
}

type Reply = oneshot::Sender<Result<Committed, CommitError>>;

enum Command {
    Batch(WriteBatch, Reply),
    SetMeta(String, Vec<u8>, oneshot::Sender<Result<(), StoreError>>),
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
    /// Index rows of `search_log` not yet merged into `search_index` (see
    /// [`crate::pending`]). Readers hold the read lock across their SQL query, and the
    /// writer holds the write lock across a merge's commit, so every lookup sees each
    /// committed row in exactly one of the two places.
    pending: Arc<RwLock<Pending>>,
}

/// A writer that has written no index rows for this long (ms) merges whatever is pending.
const IDLE_MERGE_MS: u64 = 1_000;

/// Pending index rows merged into `search_index` at once (about 100 bytes of memory
/// each). Larger merges cost fewer passes over the main index.
const DEFAULT_MERGE_ROWS: usize = 200_000;

type Stop = Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>;

/// How often the WAL is folded back into the database while the server runs.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Passive checkpoints beside the writer: they copy committed WAL frames into the database
/// without blocking the writer or readers, so the WAL stays small and commits stay fast.
fn checkpoint_loop(conn: Connection, stop: Stop) {
    let (lock, cv) = &*stop;
    loop {
        {
            let Ok(guard) = lock.lock() else { return };
            let Ok((guard, _)) = cv.wait_timeout_while(guard, CHECKPOINT_EVERY, |s| !*s) else {
                return;
            };
            if *guard {
                return;
            }
        }
        let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(engine)?;
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
    // `rarray(?)`: token lists and pending index ids bound as one parameter each
    rusqlite::vtab::array::load_module(conn).map_err(engine)?;
    Ok(())
}

/// Replay `search_log` into the set of pending index rows, and note which indexes
/// `search_index` holds (one seek per index).
fn load_pending(conn: &Connection) -> Result<Pending, StoreError> {
    let mut p = Pending::default();
    let mut st = conn
        .prepare(
            "WITH RECURSIVE t(ix) AS (SELECT min(ix) FROM search_index \
             UNION ALL SELECT (SELECT min(ix) FROM search_index WHERE ix > t.ix) FROM t \
             WHERE t.ix IS NOT NULL) SELECT ix FROM t WHERE ix IS NOT NULL",
        )
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        p.note_index(r.get(0).map_err(engine)?);
    }
    drop(rows);
    drop(st);
    let mut st = conn
        .prepare("SELECT ix, token, id, live FROM search_log ORDER BY seq")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let ix: i64 = r.get(0).map_err(engine)?;
        let token: Vec<u8> = r.get(1).map_err(engine)?;
        let id = read_sid(r, 2).map_err(engine)?;
        let live: i64 = r.get(3).map_err(engine)?;
        p.apply((ix, Tok::new(&token), id), live != 0);
    }
    Ok(p)
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(engine)
}

/// Earlier databases staged new index rows in a `search_recent` table: fold it in.
fn migrate_recent(conn: &Connection) -> Result<(), StoreError> {
    if table_exists(conn, "search_recent")? {
        conn.execute_batch(
            "BEGIN IMMEDIATE; \
             INSERT OR IGNORE INTO search_index (ix, token, id) SELECT ix, token, id FROM search_recent; \
             DROP TABLE search_recent; COMMIT;",
        )
        .map_err(engine)?;
    }
    Ok(())
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`. `signer` signs audit heads.
    pub fn open(path: &Path, signer: HeadSigner) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(engine)?;
        configure(&conn)?;
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
        // Checkpoints run on their own thread (below), never inside a commit: an automatic
        // checkpoint would stall every request waiting on that commit.
        conn.pragma_update(None, "wal_autocheckpoint", "0")
            .map_err(engine)?;
        conn.execute_batch(SCHEMA).map_err(engine)?;
        migrate_recent(&conn)?;
        let head = load_head(&conn)?;
        let pending = Arc::new(RwLock::new(load_pending(&conn)?));
        let merge_rows = Arc::new(AtomicUsize::new(DEFAULT_MERGE_ROWS));
        let (tx, rx) = mpsc::channel();
        let idle_merge_ms = Arc::new(AtomicU64::new(IDLE_MERGE_MS));
        let writer_state = Writer {
            head,
            signer,
            pending: pending.clone(),
            merge_rows: merge_rows.clone(),
            idle_merge_ms: idle_merge_ms.clone(),
        };
        let writer = thread::Builder::new()
            .name("phivault-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_state))
            .map_err(|e| StoreError::Engine(format!("cannot start writer thread: {e}")))?;
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let checkpointer = {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(engine)?;
            configure(&conn)?;
            let stop = stop.clone();
            thread::Builder::new()
                .name("phivault-sqlite-checkpoint".into())
                .spawn(move || checkpoint_loop(conn, stop))
                .map_err(|e| StoreError::Engine(format!("cannot start checkpoint thread: {e}")))?
        };
        Ok(SqliteStore {
            path: path.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some((checkpointer, stop))),
            merge_rows,
            idle_merge_ms,
            pending,
        })
    }

    /// Merge pending index rows once no index row has been written for `ms`
    /// milliseconds (tests use a long time to keep rows pending).
    pub fn set_idle_merge_ms(&self, ms: u64) {
        self.idle_merge_ms.store(ms, Ordering::Relaxed);
    }

    /// Merge pending index rows into `search_index` once there are this many (tests use
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
        let pending = if table_exists(&conn, "search_log")? {
            load_pending(&conn)?
        } else {
            Pending::default()
        };
        Ok(SqliteStore {
            path: path.to_path_buf(),
            tx: Mutex::new(None),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(None),
            checkpointer: Mutex::new(None),
            merge_rows: Arc::new(AtomicUsize::new(DEFAULT_MERGE_ROWS)),
            idle_merge_ms: Arc::new(AtomicU64::new(IDLE_MERGE_MS)),
            pending: Arc::new(RwLock::new(pending)),
        })
    }

    /// Stop the writer after it has finished the queued batches.
    pub fn close(&self) {
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

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.lock().pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(engine)?;
                configure(&c)?;
                c
            }
        };
        let out = f(&conn).map_err(engine);
        let mut pool = self.readers.lock();
        if pool.len() < MAX_IDLE_READERS {
            pool.push(conn);
        }
        out
    }

    fn send(&self, cmd: Command) -> bool {
        match self.tx.lock().as_ref() {
            Some(tx) => tx.send(cmd).is_ok(),
            None => false,
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn row_to_version(r: &rusqlite::Row<'_>) -> Result<VersionRow, rusqlite::Error> {
    Ok(VersionRow {
        rtype: r.get(0)?,
        id: read_id(r, 1)?,
        version: r.get::<_, i64>(2)? as u64,
        key_id: r.get(3)?,
        deleted: r.get::<_, i64>(4)? != 0,
        updated_ms: r.get(5)?,
        sealed: r.get(6)?,
    })
}

macro_rules! select_version {
    () => {
        "SELECT v.rtype, v.id, v.version, k.key_id, v.deleted, v.updated_ms, v.sealed \
         FROM resource_version v JOIN data_key k ON k.key_no = v.key_no"
    };
}

const SELECT_VERSION: &str = select_version!();

const SELECT_CURRENT: &str = concat!(
    select_version!(),
    " WHERE v.rtype = ?1 AND v.id = ?2 ORDER BY v.version DESC LIMIT 1"
);

impl Store for SqliteStore {
    fn current(&self, rtype: &str, id: &str) -> Result<Option<VersionRow>, StoreError> {
        self.with_reader(|c| {
            c.prepare_cached(SELECT_CURRENT)?
                .query_row(params![rtype, DbId(id)], row_to_version)
                .optional()
        })
    }

    fn current_many(
        &self,
        rtype: &str,
        ids: &[String],
    ) -> Result<Vec<Option<VersionRow>>, StoreError> {
        // one connection and one prepared statement for the lot
        self.with_reader(|c| {
            let mut st = c.prepare_cached(SELECT_CURRENT)?;
            ids.iter()
                .map(|id| {
                    st.query_row(params![rtype, DbId(id)], row_to_version)
                        .optional()
                })
                .collect()
        })
    }

    fn version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<VersionRow>, StoreError> {
        let v = i64::try_from(version).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            c.prepare_cached(&format!(
                "{SELECT_VERSION} WHERE v.rtype = ?1 AND v.id = ?2 AND v.version = ?3"
            ))?
            .query_row(params![rtype, DbId(id), v], row_to_version)
            .optional()
        })
    }

    fn history(
        &self,
        rtype: &str,
        id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(|c| match id {
            Some(id) => c
                .prepare_cached(&format!(
                    "{SELECT_VERSION} WHERE v.rtype = ?1 AND v.id = ?2 ORDER BY v.version DESC LIMIT ?3"
                ))?
                .query_map(params![rtype, DbId(id), limit], row_to_version)?
                .collect(),
            None => c
                .prepare_cached(&format!(
                    "{SELECT_VERSION} WHERE v.rtype = ?1 ORDER BY v.updated_ms DESC, v.id DESC, v.version DESC LIMIT ?2"
                ))?
                .query_map(params![rtype, limit], row_to_version)?
                .collect(),
        })
    }

    fn lookup(&self, rtype: &str, tokens: &[IndexEntry]) -> Result<Vec<String>, StoreError> {
        let pending = self.pending.read();
        self.with_reader(|c| {
            matching_ids(
                c,
                rtype,
                tokens,
                usize::MAX,
                &pending,
                &mut Staged::default(),
            )
        })
    }

    fn candidates(
        &self,
        rtype: &str,
        query: &Candidates,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let q = simplify(query);
        if q == Candidates::All {
            // Current versions of the type in id order; the bare columns of a max()
            // aggregate come from the row holding the maximum (SQLite guarantees this).
            return self.with_reader(|c| {
                let sql = if after.is_some() {
                    "SELECT id, deleted, max(version) FROM resource_version \
                     WHERE rtype = ?1 AND id > ?2 GROUP BY id ORDER BY id"
                } else {
                    "SELECT id, deleted, max(version) FROM resource_version \
                     WHERE rtype = ?1 AND ?2 IS NULL GROUP BY id ORDER BY id"
                };
                let mut st = c.prepare_cached(sql)?;
                let mut rows = st.query(params![rtype, after.map(DbId)])?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    if r.get::<_, i64>(1)? == 0 {
                        out.push(read_id(r, 0)?);
                        if out.len() as i64 >= limit {
                            break;
                        }
                    }
                }
                Ok(out)
            });
        }
        // DISTINCT: one resource can carry several of the looked-up tokens
        let mut sql = String::from("SELECT DISTINCT id FROM (");
        let mut binds = Vec::new();
        // held until the query has run: a merge cannot move rows between the two places
        // while this reader looks at both
        let pending = self.pending.read();
        candidate_sql(rtype, &q, &pending, &mut sql, &mut binds, &mut 0)?;
        sql.push(')');
        if after.is_some() {
            sql.push_str(" WHERE id > ?");
        }
        sql.push_str(" ORDER BY id LIMIT ?");
        self.with_reader(|c| {
            let mut st = c.prepare_cached(&sql)?;
            let mut n = 0;
            for b in &binds {
                n += 1;
                match b {
                    Bind::Index(ix) => st.raw_bind_parameter(n, ix)?,
                    Bind::List(l) => st.raw_bind_parameter(n, l)?,
                }
            }
            if let Some(a) = after {
                n += 1;
                st.raw_bind_parameter(n, DbId(a))?;
            }
            st.raw_bind_parameter(n + 1, limit)?;
            let mut rows = st.raw_query();
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(read_id(r, 0)?);
            }
            Ok(out)
        })
    }

    fn index_stats(&self, rtype: &str, param: &str) -> Result<IndexStats, StoreError> {
        let ix = index_no(rtype, param);
        let pending = self.pending.read();
        self.with_reader(|c| {
            let mut per_token: HashMap<Vec<u8>, u64> = HashMap::new();
            let mut ids: HashSet<Sid> = HashSet::new();
            let mut st = c.prepare_cached("SELECT token, id FROM search_index WHERE ix = ?1")?;
            let mut rows = st.query(params![ix])?;
            while let Some(r) = rows.next()? {
                *per_token.entry(r.get(0)?).or_default() += 1;
                ids.insert(read_sid(r, 1)?);
            }
            for (_, token, id) in pending.rows_of(ix) {
                *per_token.entry(token.bytes().to_vec()).or_default() += 1;
                ids.insert(id.clone());
            }
            Ok(IndexStats {
                resources: ids.len() as u64,
                rows: per_token.values().sum(),
                distinct_tokens: per_token.len() as u64,
                max_rows_per_token: per_token.values().copied().max().unwrap_or(0),
            })
        })
    }

    fn data_key(&self, key_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_reader(|c| {
            c.prepare_cached("SELECT wrapped FROM data_key WHERE key_id = ?1")?
                .query_row(params![key_id], |r| r.get(0))
                .optional()
        })
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_reader(|c| {
            c.prepare_cached("SELECT v FROM meta WHERE k = ?1")?
                .query_row(params![key], |r| r.get(0))
                .optional()
        })
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::SetMeta(key.to_owned(), value.to_vec(), tx)) {
            return Err(StoreError::Closed);
        }
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn submit(&self, batch: WriteBatch) -> oneshot::Receiver<Result<Committed, CommitError>> {
        let (tx, rx) = oneshot::channel();
        let sender = self.tx.lock();
        let closed = match sender.as_ref() {
            Some(s) => match s.send(Command::Batch(batch, tx)) {
                Ok(()) => None,
                Err(mpsc::SendError(Command::Batch(_, tx))) => Some(tx),
                Err(_) => None,
            },
            None => Some(tx),
        };
        if let Some(tx) = closed {
            let _ = tx.send(Err(CommitError::Store(StoreError::Closed)));
        }
        rx
    }

    fn audit_head(&self) -> Result<Option<SignedHead>, StoreError> {
        let row: Option<(i64, Vec<u8>, Vec<u8>)> = self.with_reader(|c| {
            c.query_row(
                "SELECT size, hash, signature FROM audit_head WHERE one = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })?;
        row.map(|(size, hash, signature)| {
            Ok(SignedHead {
                size: size as u64,
                hash: hash
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("audit head hash length"))?,
                signature,
            })
        })
        .transpose()
    }

    fn scan_audit(&self, visit: &mut dyn FnMut(StoredEvent) -> bool) -> Result<(), StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare("SELECT seq, event, hash FROM audit_event ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let ev = StoredEvent {
                    seq: r.get::<_, i64>(0)? as u64,
                    event: r.get(1)?,
                    hash: r.get(2)?,
                };
                if !visit(ev) {
                    break;
                }
            }
            Ok(())
        })
    }
}

fn load_head(conn: &Connection) -> Result<ChainHead, StoreError> {
    let last: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM audit_event ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(engine)?;
    match last {
        None => Ok(ChainHead::EMPTY),
        Some((seq, hash)) => Ok(ChainHead {
            size: seq as u64,
            hash: hash
                .try_into()
                .map_err(|_| StoreError::Corrupt("audit hash length"))?,
        }),
    }
}

/// What the writer thread owns besides its connection.
struct Writer {
    head: ChainHead,
    signer: HeadSigner,
    pending: Arc<RwLock<Pending>>,
    merge_rows: Arc<AtomicUsize>,
    idle_merge_ms: Arc<AtomicU64>,
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Command>, mut w: Writer) {
    let mut staged = Staged::default();
    let mut last_index_write = std::time::Instant::now();
    loop {
        // no index rows written for a while (audit-only groups do not count): fold the
        // pending rows in, so reads use the B-tree alone
        let idle = std::time::Duration::from_millis(w.idle_merge_ms.load(Ordering::Relaxed));
        if last_index_write.elapsed() >= idle && w.pending.read().len() > 0 {
            merge_or_warn(&mut conn, &w.pending);
            last_index_write = std::time::Instant::now();
        }
        let first = match rx.recv_timeout(idle.min(std::time::Duration::from_secs(1))) {
            Ok(c) => c,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        let before = w.head;
        let results = {
            // the writer is the only one to change `pending`: reading it here is stable
            let pending = w.pending.read();
            apply_group(
                &mut conn,
                &mut group,
                &mut w.head,
                &w.signer,
                &pending,
                &mut staged,
            )
        };
        match results {
            Ok(results) => {
                // committed: lookups see the new rows before any batch is acknowledged
                if staged.mark() > 0 {
                    last_index_write = std::time::Instant::now();
                    let mut pending = w.pending.write();
                    for (row, live) in staged.take() {
                        pending.apply(row, live);
                    }
                }
                for (cmd, res) in group.into_iter().zip(results) {
                    reply(cmd, res);
                }
                if w.pending.read().len() >= w.merge_rows.load(Ordering::Relaxed) {
                    merge_or_warn(&mut conn, &w.pending);
                }
            }
            Err(e) => {
                staged.take();
                w.head = before;
                let msg = e.to_string();
                for cmd in group {
                    reply(
                        cmd,
                        Err(CommitError::Store(StoreError::Engine(msg.clone()))),
                    );
                }
            }
        }
    }
    checkpoint(&conn);
}

/// [`merge_pending`]; a failed merge changes nothing and is retried later.
fn merge_or_warn(conn: &mut Connection, pending: &RwLock<Pending>) {
    if let Err(e) = merge_pending(conn, pending) {
        tracing::warn!(error = %e, "index merge failed; retried later");
    }
}

/// Rows per statement when pending rows are merged.
const MERGE_CHUNK: usize = 64;

/// Move every pending index row into `search_index` (in key order: one pass over the
/// B-tree) and empty `search_log`, in one transaction.
fn merge_pending(conn: &mut Connection, pending: &RwLock<Pending>) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let p = pending.read();
        let rows: Vec<_> = p.all().collect();
        // many rows per statement: one statement step instead of one per row
        let mut rest = rows.as_slice();
        for n in [MERGE_CHUNK, 1] {
            let mut st = tx.prepare_cached(&multi_row_insert(
                "INSERT OR IGNORE INTO search_index (ix, token, id)",
                3,
                n,
            ))?;
            while rest.len() >= n {
                let (chunk, tail) = rest.split_at(n);
                for (i, (ix, token, id)) in chunk.iter().enumerate() {
                    st.raw_bind_parameter(3 * i + 1, ix)?;
                    st.raw_bind_parameter(3 * i + 2, token.bytes())?;
                    st.raw_bind_parameter(3 * i + 3, id)?;
                }
                st.raw_execute()?;
                rest = tail;
            }
        }
    }
    tx.execute("DELETE FROM search_log", [])?;
    // readers hold the read lock across their queries: none sees the rows in neither
    // place (committed here, cleared from memory) nor in both
    let mut p = pending.write();
    tx.commit()?;
    p.clear();
    Ok(())
}

fn checkpoint(conn: &Connection) {
    // Fold the WAL back into the database file on a clean stop.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

fn reply(cmd: Command, res: Result<Committed, CommitError>) {
    match cmd {
        Command::Batch(_, tx) => {
            let _ = tx.send(res);
        }
        Command::SetMeta(_, _, tx) => {
            let _ = tx.send(res.map(|_| ()).map_err(|e| match e {
                CommitError::Store(s) => s,
                other => StoreError::Engine(other.to_string()),
            }));
        }
    }
}

/// Apply a group in one transaction; per-command results, or an error that failed them all.
fn apply_group(
    conn: &mut Connection,
    group: &mut [Command],
    head: &mut ChainHead,
    signer: &HeadSigner,
    pending: &Pending,
    staged: &mut Staged,
) -> Result<Vec<Result<Committed, CommitError>>, StoreError> {
    let tx = conn.transaction().map_err(engine)?;
    let start_size = head.size;
    let mut results = Vec::with_capacity(group.len());
    for cmd in group.iter_mut() {
        let res = match cmd {
            Command::Batch(batch, _) => {
                let saved = *head;
                let mark = staged.mark();
                tx.execute_batch("SAVEPOINT b").map_err(engine)?;
                match apply_batch(&tx, batch, head, pending, staged) {
                    Ok(c) => {
                        tx.execute_batch("RELEASE b").map_err(engine)?;
                        Ok(c)
                    }
                    Err(e) => {
                        *head = saved;
                        staged.rollback_to(mark);
                        tx.execute_batch("ROLLBACK TO b; RELEASE b").map_err(engine)?;
                        Err(e)
                    }
                }
            }
            Command::SetMeta(k, v, _) => tx
                .execute(
                    "INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                    params![&*k, &*v],
                )
                .map(|_| Committed { last_audit_seq: None })
                .map_err(|e| CommitError::Store(engine(e))),
        };
        results.push(res);
    }
    if head.size != start_size {
        let signature = signer(&head.signing_message());
        tx.execute(
            "INSERT INTO audit_head (one, size, hash, signature) VALUES (1, ?1, ?2, ?3) \
             ON CONFLICT (one) DO UPDATE SET size = excluded.size, hash = excluded.hash, signature = excluded.signature",
            params![head.size as i64, head.hash.as_slice(), signature],
        )
        .map_err(engine)?;
    }
    tx.commit().map_err(engine)?;
    Ok(results)
}

fn apply_batch(
    tx: &rusqlite::Transaction<'_>,
    batch: &WriteBatch,
    head: &mut ChainHead,
    pending: &Pending,
    staged: &mut Staged,
) -> Result<Committed, CommitError> {
    let e = |e: rusqlite::Error| CommitError::Store(engine(e));
    for (key_id, wrapped) in &batch.new_keys {
        let existing: Option<Vec<u8>> = tx
            .prepare_cached("SELECT wrapped FROM data_key WHERE key_id = ?1")
            .map_err(e)?
            .query_row(params![key_id], |r| r.get(0))
            .optional()
            .map_err(e)?;
        match existing {
            Some(w) if &w == wrapped => {}
            Some(_) => return Err(CommitError::KeyConflict),
            None => {
                tx.prepare_cached("INSERT INTO data_key (key_id, wrapped) VALUES (?1, ?2)")
                    .map_err(e)?
                    .execute(params![key_id, wrapped])
                    .map_err(e)?;
            }
        }
    }
    for (index, guard) in batch.guards.iter().enumerate() {
        match guard {
            Guard::NoMatch {
                rtype,
                tokens,
                except,
            } => {
                let found = matching_ids(tx, rtype, tokens, except.len() + 1, pending, staged)
                    .map_err(e)?;
                if found.iter().any(|id| !except.contains(id)) {
                    return Err(CommitError::Guard { index });
                }
            }
        }
    }
    for (index, put) in batch.puts.iter().enumerate() {
        let row = &put.row;
        let current: Option<i64> = tx
            .prepare_cached(
                "SELECT version FROM resource_version WHERE rtype = ?1 AND id = ?2 \
                 ORDER BY version DESC LIMIT 1",
            )
            .map_err(e)?
            .query_row(params![row.rtype, DbId(&row.id)], |r| r.get(0))
            .optional()
            .map_err(e)?;
        let current = current.map(|v| v as u64);
        let ok = match put.expect {
            Expect::Absent => current.is_none(),
            Expect::Version(v) => current == Some(v),
        };
        if !ok || row.version != current.unwrap_or(0) + 1 {
            return Err(CommitError::Conflict { index, current });
        }
        let version = row.version as i64;
        let key_no: i64 = tx
            .prepare_cached("SELECT key_no FROM data_key WHERE key_id = ?1")
            .map_err(e)?
            .query_row(params![row.key_id], |r| r.get(0))
            .optional()
            .map_err(e)?
            .ok_or(CommitError::Store(StoreError::Corrupt(
                "version sealed under a data key that is not stored",
            )))?;
        tx.prepare_cached(
            "INSERT INTO resource_version (rtype, id, version, key_no, deleted, updated_ms, sealed) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(e)?
        .execute(params![
            row.rtype,
            DbId(&row.id),
            version,
            key_no,
            row.deleted as i64,
            row.updated_ms,
            row.sealed
        ])
        .map_err(e)?;
        let mut del = tx
            .prepare_cached("DELETE FROM search_index WHERE ix = ?1 AND token = ?2 AND id = ?3")
            .map_err(e)?;
        let sid = Sid::new(&row.id);
        let mut dead = Vec::new();
        for entry in &put.replaces {
            let ix = index_no(&row.rtype, &entry.param);
            del.execute(params![ix, entry.token, &sid]).map_err(e)?;
            let key = (ix, Tok::new(&entry.token), sid.clone());
            let is_pending = staged.state(&key).unwrap_or_else(|| pending.contains(&key));
            if is_pending {
                dead.push((ix, entry.token.as_slice()));
            }
        }
        log_index(tx, &sid, &dead, false, staged).map_err(e)?;
        if !row.deleted {
            let mut rows: Vec<(i64, &[u8])> = put
                .index
                .iter()
                .map(|en| (index_no(&row.rtype, &en.param), en.token.as_slice()))
                .collect();
            rows.sort_unstable();
            rows.dedup();
            log_index(tx, &sid, &rows, true, staged).map_err(e)?;
        }
    }
    let mut last_audit_seq = None;
    for ev in &batch.audit {
        let bytes = ev.encode();
        let hash = head.append(&bytes);
        tx.prepare_cached("INSERT INTO audit_event (seq, event, hash) VALUES (?1, ?2, ?3)")
            .map_err(e)?
            .execute(params![head.size as i64, bytes, hash.as_slice()])
            .map_err(e)?;
        last_audit_seq = Some(head.size);
    }
    Ok(Committed { last_audit_seq })
}

/// Log records are inserted this many per statement (and the rest 8, then 1, at a
/// time): one statement step for many rows instead of one per row.
const INSERT_CHUNKS: [usize; 3] = [32, 8, 1];

/// `head VALUES (?,…),(?,…),…`: `rows` tuples of `arity` parameters.
fn multi_row_insert(head: &str, arity: usize, rows: usize) -> String {
    let tuple = format!("({})", vec!["?"; arity].join(","));
    format!("{head} VALUES {}", vec![tuple; rows].join(","))
}

/// Append log records for the index rows `rows` of `id` (`live`: added, else removed),
/// and stage them for [`Pending`].
fn log_index(
    c: &Connection,
    id: &Sid,
    rows: &[(i64, &[u8])],
    live: bool,
    staged: &mut Staged,
) -> Result<(), rusqlite::Error> {
    let live_n = i64::from(live);
    let mut rest = rows;
    for n in INSERT_CHUNKS {
        while rest.len() >= n {
            let (chunk, tail) = rest.split_at(n);
            let mut st = c.prepare_cached(&multi_row_insert(
                "INSERT INTO search_log (ix, token, id, live)",
                4,
                n,
            ))?;
            for (i, (ix, token)) in chunk.iter().enumerate() {
                st.raw_bind_parameter(4 * i + 1, ix)?;
                st.raw_bind_parameter(4 * i + 2, token)?;
                st.raw_bind_parameter(4 * i + 3, id)?;
                st.raw_bind_parameter(4 * i + 4, live_n)?;
            }
            st.raw_execute()?;
            rest = tail;
        }
    }
    for (ix, token) in rows {
        staged.push((*ix, Tok::new(token), id.clone()), live);
    }
    Ok(())
}

/// Ids of resources of `rtype` carrying all `tokens` (at most `limit`), in
/// `search_index`, `pending` or the current transaction's `staged` records. The blind
/// index only holds entries of current, non-deleted versions.
fn matching_ids(
    c: &Connection,
    rtype: &str,
    tokens: &[IndexEntry],
    limit: usize,
    pending: &Pending,
    staged: &mut Staged,
) -> Result<Vec<String>, rusqlite::Error> {
    let Some(first) = tokens.first() else {
        return Ok(Vec::new());
    };
    let mut check =
        c.prepare_cached("SELECT 1 FROM search_index WHERE ix = ?1 AND token = ?2 AND id = ?3")?;
    let ix = index_no(rtype, &first.param);
    let first_tok = Tok::new(&first.token);
    let mut ids: Vec<Sid> = c
        .prepare_cached("SELECT id FROM search_index WHERE ix = ?1 AND token = ?2")?
        .query_map(params![ix, first.token], |r| read_sid(r, 0))?
        .collect::<Result<_, _>>()?;
    ids.extend(pending.ids(ix, &first_tok).cloned());
    ids.extend(staged.live_ids(ix, &first_tok));
    ids.sort_unstable();
    ids.dedup();
    let mut out = Vec::new();
    'ids: for id in ids {
        for t in tokens {
            let key = (index_no(rtype, &t.param), Tok::new(&t.token), id.clone());
            let has = match staged.state(&key) {
                Some(live) => live,
                None => pending.contains(&key) || check.exists(params![key.0, t.token, &id])?,
            };
            if !has {
                continue 'ids;
            }
        }
        out.push(sid_text(&id));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// A bound value of a candidate query.
enum Bind {
    Index(i64),
    /// A list (tokens, or pending ids) as `rarray(?)`: one parameter whatever its length,
    /// so the SQL text depends only on the shape of the query and stays prepared.
    List(rusqlite::vtab::array::Array),
}

/// Largest number of tokens one candidate query looks up.
const MAX_BOUND_TOKENS: usize = 30_000;

/// Append the SQL of a candidate query (a compound SELECT of one `id` column) and its
/// bound tokens. `All` never reaches here (the caller scans the type instead).
fn candidate_sql(
    rtype: &str,
    q: &Candidates,
    pending: &Pending,
    sql: &mut String,
    binds: &mut Vec<Bind>,
    bound: &mut usize,
) -> Result<(), StoreError> {
    match q {
        Candidates::Tokens { param, tokens } => {
            let ix = index_no(rtype, param);
            if tokens.is_empty() || !pending.may_have(ix) {
                sql.push_str("SELECT id FROM search_index WHERE 0");
                return Ok(());
            }
            sql.push_str(
                "SELECT id FROM search_index WHERE ix = ? AND token IN rarray(?) \
                 UNION ALL SELECT value FROM rarray(?)",
            );
            let mut ids: Vec<rusqlite::types::Value> = Vec::new();
            for t in tokens {
                let t = Tok::new(t);
                ids.extend(pending.ids(ix, &t).map(Sid::to_value));
            }
            binds.push(Bind::Index(ix));
            binds.push(Bind::List(std::rc::Rc::new(
                tokens
                    .iter()
                    .map(|t| rusqlite::types::Value::Blob(t.clone()))
                    .collect(),
            )));
            binds.push(Bind::List(std::rc::Rc::new(ids)));
            *bound += tokens.len();
        }
        Candidates::And(parts) | Candidates::Or(parts) => {
            let op = if matches!(q, Candidates::And(_)) {
                " INTERSECT "
            } else {
                " UNION "
            };
            let parts: Vec<&Candidates> = parts
                .iter()
                .filter(|p| !matches!(p, Candidates::All))
                .collect();
            if parts.is_empty() {
                return Err(StoreError::Engine("empty candidate expression".into()));
            }
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    sql.push_str(op);
                }
                sql.push_str("SELECT id FROM (");
                candidate_sql(rtype, p, pending, sql, binds, bound)?;
                sql.push(')');
            }
        }
        Candidates::All => return Err(StoreError::Engine("unexpected full scan".into())),
    }
    if *bound > MAX_BOUND_TOKENS {
        return Err(StoreError::Engine("too many tokens in one query".into()));
    }
    Ok(())
}

/// Normalise a candidate expression: `All` inside `And` is dropped (it narrows nothing),
/// an `Or` containing `All` is `All`.
fn simplify(q: &Candidates) -> Candidates {
    match q {
        Candidates::And(parts) => {
            let mut v: Vec<Candidates> = parts
                .iter()
                .map(simplify)
                .filter(|p| *p != Candidates::All)
                .collect();
            match v.len() {
                0 => Candidates::All,
                1 => v.remove(0),
                _ => Candidates::And(v),
            }
        }
        Candidates::Or(parts) => {
            let mut v: Vec<Candidates> = parts.iter().map(simplify).collect();
            if v.is_empty() || v.contains(&Candidates::All) {
                return Candidates::All;
            }
            if v.len() == 1 {
                return v.remove(0);
            }
            Candidates::Or(v)
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Put;

    fn open(dir: &Path) -> SqliteStore {
        SqliteStore::open(&dir.join("db.sqlite"), Box::new(|m: &[u8]| m.to_vec())).unwrap()
    }

    /// Rows of `table` in the database under `dir`, read through a connection of its own.
    fn rows(dir: &Path, table: &str) -> i64 {
        Connection::open(dir.join("db.sqlite"))
            .unwrap()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn multi_row_insert_text() {
        assert_eq!(
            multi_row_insert("INSERT INTO t (a, b)", 2, 3),
            "INSERT INTO t (a, b) VALUES (?,?),(?,?),(?,?)"
        );
    }

    #[test]
    fn shared_suite_passes_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        crate::testsuite::run_all(&store);
    }

    #[test]
    fn shared_suite_passes_with_frequent_index_merges() {
        // pending rows move to search_index every few batches, so lookups, guards,
        // deletes and candidate queries see rows in both places
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_merge_rows(7);
        crate::testsuite::run_all(&store);
        assert!(rows(dir.path(), "search_index") > 0, "merges happened");
    }

    #[test]
    fn pending_index_rows_survive_a_restart_and_read_only_opens() {
        use crate::Candidates as C;
        let dir = tempfile::tempdir().unwrap();
        let even = C::Tokens {
            param: "code".into(),
            tokens: vec![b"even".to_vec()],
        };
        let store = open(dir.path());
        store.set_idle_merge_ms(u64::MAX);
        crate::testsuite::run_all(&store);
        let want = store.candidates("Condition", &even, None, 1000).unwrap();
        let stats = store.index_stats("Condition", "code").unwrap();
        assert!(!want.is_empty() && stats.rows > 0);
        store.close();
        let (logged, merged) = (
            rows(dir.path(), "search_log"),
            rows(dir.path(), "search_index"),
        );
        assert!(logged > 0 && merged == 0, "rows are still pending");
        let ro = SqliteStore::open_read_only(&dir.path().join("db.sqlite")).unwrap();
        assert_eq!(ro.candidates("Condition", &even, None, 1000).unwrap(), want);
        assert_eq!(ro.index_stats("Condition", "code").unwrap(), stats);
        drop(ro);
        let store = open(dir.path());
        assert_eq!(
            store.candidates("Condition", &even, None, 1000).unwrap(),
            want
        );
        // a merge moves them without changing any answer
        store.set_merge_rows(1);
        crate::testsuite::append_audit(&store, 1);
        let b = WriteBatch {
            puts: vec![Put {
                row: VersionRow {
                    rtype: "Condition".into(),
                    id: "late".into(),
                    version: 1,
                    key_id: "k1".into(),
                    deleted: false,
                    updated_ms: 1,
                    sealed: b"x".to_vec(),
                },
                expect: Expect::Absent,
                index: vec![IndexEntry {
                    param: "code".into(),
                    token: b"even".to_vec(),
                }],
                replaces: vec![],
            }],
            ..Default::default()
        };
        store.submit(b).blocking_recv().unwrap().unwrap();
        // the writer merges after answering; its next batch is answered after the merge
        crate::testsuite::append_audit(&store, 1);
        let mut after = store.candidates("Condition", &even, None, 1000).unwrap();
        after.retain(|id| id != "late");
        assert_eq!(after, want);
        assert_eq!(store.pending.read().len(), 0);
    }

    #[test]
    fn pending_rows_merge_once_index_writes_pause() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_idle_merge_ms(50);
        crate::testsuite::run_all(&store);
        // audit-only batches keep coming; they do not hold the merge back
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while store.pending.read().len() > 0 {
            assert!(std::time::Instant::now() < deadline, "no merge");
            crate::testsuite::append_audit(&store, 1);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(rows(dir.path(), "search_log"), 0);
    }

    #[test]
    fn audit_chain_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            crate::testsuite::append_audit(&store, 3);
            store.close();
        }
        let store = open(dir.path());
        crate::testsuite::append_audit(&store, 2);
        let mut rows = Vec::new();
        store
            .scan_audit(&mut |e| {
                rows.push(e);
                true
            })
            .unwrap();
        assert_eq!(rows.len(), 5);
        let head = store.audit_head().unwrap().unwrap();
        let verified = phivault_audit::verify_chain(
            rows.into_iter().map(Ok::<_, ()>),
            Some(ChainHead {
                size: head.size,
                hash: head.hash,
            }),
        )
        .unwrap();
        assert_eq!(verified.size, 5);
    }
}
