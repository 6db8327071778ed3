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
use phivault_audit::merkle::{self, Frontier};
use phivault_audit::{ChainHead, StoredEvent};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::pending::{self, Pending, Staged, Tok};
use crate::rows::RowCache;
use crate::segments;
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
    rno INTEGER NOT NULL,
    PRIMARY KEY (rtype, id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS resource_no (
    rno INTEGER PRIMARY KEY,
    id BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS search_seg (
    ix INTEGER NOT NULL,
    tok BLOB NOT NULL,
    lo INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (ix, tok, lo)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS index_log (
    seq INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_event (
    seq INTEGER PRIMARY KEY,
    event BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoint (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    time_ms INTEGER NOT NULL,
    signature BLOB NOT NULL,
    frontier BLOB NOT NULL
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
CREATE TABLE IF NOT EXISTS resource_epoch (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    n INTEGER NOT NULL
);
INSERT OR IGNORE INTO resource_epoch (one, n) VALUES (1, 0);
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

/// The number naming the index of `(rtype, param)` in `search_seg` and `index_log`: a stable 31-bit
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
}

/// What readers have read of rows that never change once committed (`resource_no`,
/// `data_key`'s number → id): only ever inserted, never updated or deleted, and a reader
/// sees committed rows only (a number handed out in a transaction that rolled back is
/// never seen, even if it is handed out again), so what a reader read once holds for
/// good. Every commit makes SQLite drop a reader's page cache, and with every request
/// audited that is always, so each look-up kept here saves a B-tree descent through pages
/// read again from the file. The writer, which sees its own uncommitted rows, must not
/// use these. At most [`REMEMBERED_MAX`] entries (~100 bytes each); emptied when full.
#[derive(Default)]
struct Remembered(RwLock<HashMap<i64, String>>);

/// See [`Remembered`].
const REMEMBERED_MAX: usize = 1 << 18;

impl Remembered {
    fn get_or_read(
        &self,
        key: i64,
        read: impl FnOnce() -> Result<String, rusqlite::Error>,
    ) -> Result<String, rusqlite::Error> {
        if let Some(v) = self.0.read().get(&key) {
            return Ok(v.clone());
        }
        let v = read()?;
        let mut known = self.0.write();
        if known.len() >= REMEMBERED_MAX {
            known.clear();
        }
        known.insert(key, v.clone());
        Ok(v)
    }
}

/// A writer that has written no index rows for this long (ms) merges whatever is pending.
const IDLE_MERGE_MS: u64 = 1_000;

/// Pending index rows merged into the segments at once (about 100 bytes of memory
/// each). Larger merges cost fewer passes over the main index.
const DEFAULT_MERGE_ROWS: usize = 200_000;

type Stop = Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>;

/// Prepared statements each connection keeps.
const STATEMENT_CACHE: usize = 128;

/// How often the WAL is folded back into the database while the server runs.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// How long a connection waits on another's lock before giving up with `SQLITE_BUSY`.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Frames in the WAL past which the writer restarts it (see [`restart_wal`]): 2,048 pages
/// of 4 KiB, 8 MiB. (Under `GET` load, 512 and 2,048 served the same; 8,192 a little less.)
const WAL_RESTART_FRAMES: u64 = 2_048;

/// How long a WAL restart waits for readers still reading old frames; it gives up (and is
/// tried again later) rather than hold the writer longer.
const WAL_RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// After restarts that readers held off, the next try waits 5 ms, doubled after each one
/// that fails again up to this: a long read transaction (an export, a backup, an operator's
/// `sqlite3`) then costs the writer one wait every quarter of a second, not one per group.
const WAL_RESTART_RETRY_MAX: std::time::Duration = std::time::Duration::from_millis(250);

/// When the writer restarts the WAL, shared with the store (tests change and watch it).
#[derive(Debug)]
struct WalRestart {
    /// Frames in the log past which the writer restarts it.
    frames: AtomicU64,
    /// Restarts tried so far.
    tries: AtomicU64,
}

impl WalRestart {
    fn new() -> Arc<Self> {
        Arc::new(WalRestart {
            frames: AtomicU64::new(WAL_RESTART_FRAMES),
            tries: AtomicU64::new(0),
        })
    }
}

/// The writer's side of WAL restarts: when the next one may be tried.
struct WalRestarter {
    shared: Arc<WalRestart>,
    /// No restart is tried before this (set after one that readers held off).
    retry_at: Option<std::time::Instant>,
    /// Restarts held off in a row.
    held_off: u32,
}

impl WalRestarter {
    fn new(shared: Arc<WalRestart>) -> Self {
        WalRestarter {
            shared,
            retry_at: None,
            held_off: 0,
        }
    }

    /// After a group is answered (the wait for readers delays the next group only): restart
    /// the WAL if it is long and no back-off holds the try.
    fn after_group(&mut self, conn: &Connection) {
        let now = std::time::Instant::now();
        if WAL_FRAMES.with(std::cell::Cell::get) < self.shared.frames.load(Ordering::Relaxed)
            || self.retry_at.is_some_and(|t| now < t)
        {
            return;
        }
        self.shared.tries.fetch_add(1, Ordering::Relaxed);
        match restart_wal(conn) {
            Restart::Done => {
                WAL_FRAMES.with(|f| f.set(0));
                self.retry_at = None;
                self.held_off = 0;
            }
            // it gave up at once: again after the next group
            Restart::Checkpointing => {}
            Restart::HeldOff => {
                let wait = std::time::Duration::from_millis(5)
                    .saturating_mul(1 << self.held_off.min(16))
                    .min(WAL_RESTART_RETRY_MAX);
                self.held_off = self.held_off.saturating_add(1);
                self.retry_at = Some(std::time::Instant::now() + wait);
            }
        }
    }
}

/// A WAL file longer than this is cut back to it when the log restarts.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Passive checkpoints beside the writer: they copy committed WAL frames into the database
/// without blocking the writer or readers, so commits stay fast.
///
/// They alone never make the WAL start again from its beginning while readers come one
/// after another (a reader in flight pins the log), so under a steady read load — every
/// read appends an audit event — the file would grow without bound (480 MB in 20 s of `GET`
/// at 16,000 req/s), every commit would extend it, and every page a reader looks up would be
/// searched for in a WAL index that keeps growing: the writer restarts it (see
/// [`restart_wal`]).
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

thread_local! {
    /// Frames in the WAL after the last commit of the writer connection on this thread.
    static WAL_FRAMES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The writer connection's WAL hook: SQLite calls it after each commit with the number of
/// frames in the log.
fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.with(|f| f.set(u64::try_from(frames).unwrap_or(0)));
    Ok(())
}

/// How a WAL restart went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// The log is checkpointed and no reader reads from it: the next commit starts it again.
    Done,
    /// The checkpoint thread was checkpointing (SQLite gives up at once then).
    Checkpointing,
    /// Readers on old frames did not finish in time.
    HeldOff,
}

/// Checkpoint the whole WAL and wait (briefly) until no reader still reads from it, so the
/// writer's next transaction writes the log from its beginning again. The passive
/// checkpoints have copied almost every frame already; what is left is waiting for the
/// readers in flight, which take well under a millisecond each.
fn restart_wal(conn: &Connection) -> Restart {
    let _ = conn.busy_timeout(WAL_RESTART_WAIT);
    // (busy, frames in the log, frames checkpointed); the frames are -1 when the
    // checkpoint lock was taken
    let r = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
    });
    let _ = conn.busy_timeout(BUSY_TIMEOUT);
    match r {
        Ok((0, _)) => Restart::Done,
        Ok((_, -1)) => Restart::Checkpointing,
        _ => Restart::HeldOff,
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

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

/// Replay `index_log` into the set of pending postings, and note which indexes the
/// segments hold (one seek per index).
fn load_pending(conn: &Connection) -> Result<Pending, StoreError> {
    let mut p = Pending::default();
    let mut st = conn
        .prepare(
            "WITH RECURSIVE t(ix) AS (SELECT min(ix) FROM search_seg \
             UNION ALL SELECT (SELECT min(ix) FROM search_seg WHERE ix > t.ix) FROM t \
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
        .prepare("SELECT data FROM index_log ORDER BY seq")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let data = r
            .get_ref(0)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(engine)?;
        for (ix, rno, token, live) in
            decode_log_record(data).ok_or(StoreError::Corrupt("index log record"))?
        {
            p.apply((ix, Tok::new(token), rno), live);
        }
    }
    Ok(p)
}

/// One `index_log` record: every posting one group commit adds or removes, in order, as
/// `live u8 ‖ ix u32 BE ‖ resource number u64 BE ‖ token_len u8 ‖ token` each (one row
/// per commit instead of one per posting or per write: the writer is serial, and rows
/// are what it pays for).
fn encode_log_record(out: &mut Vec<u8>, ix: i64, rno: i64, token: &[u8], live: bool) {
    out.push(u8::from(live));
    out.extend_from_slice(&(ix as u32).to_be_bytes());
    out.extend_from_slice(&(rno as u64).to_be_bytes());
    out.push(token.len() as u8);
    out.extend_from_slice(token);
}

type LogEntry<'a> = (i64, i64, &'a [u8], bool);

fn decode_log_record(mut data: &[u8]) -> Option<Vec<LogEntry<'_>>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let live = match data.first()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let ix = i64::from(u32::from_be_bytes(data.get(1..5)?.try_into().ok()?));
        let rno = i64::try_from(u64::from_be_bytes(data.get(5..13)?.try_into().ok()?)).ok()?;
        let len = usize::from(*data.get(13)?);
        let token = data.get(14..14 + len)?;
        out.push((ix, rno, token, live));
        data = &data[14 + len..];
    }
    Some(out)
}

/// Whether a `SELECT count(*) …` query counts anything.
fn counts_any(conn: &Connection, sql: &str, args: &[&str]) -> Result<bool, StoreError> {
    conn.query_row(sql, rusqlite::params_from_iter(args), |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n > 0)
    .map_err(engine)
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    counts_any(
        conn,
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        &[name],
    )
}

fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool, StoreError> {
    counts_any(
        conn,
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
        &[table, column],
    )
}

/// Databases written before resource numbers and index segments: number every resource,
/// and move the index (one B-tree row per posting, keyed by id, in `search_index`, with
/// unmerged rows in `search_log` or, earlier still, `search_recent`) into segments. The
/// old rows do not name their resource type, so an id that several types use gets a
/// posting for each of them: candidates are a superset anyway, and every one is verified
/// against its decrypted record. One transaction: a crash leaves the old form.
fn migrate_to_segments(conn: &mut Connection) -> Result<(), StoreError> {
    if has_column(conn, "resource_version", "rno")? {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(engine)?;
    tx.execute_batch(
        "ALTER TABLE resource_version ADD COLUMN rno INTEGER NOT NULL DEFAULT 0; \
         CREATE TEMP TABLE rno_map (rno INTEGER PRIMARY KEY, rtype TEXT NOT NULL, id NOT NULL); \
         INSERT INTO rno_map (rtype, id) SELECT DISTINCT rtype, id FROM resource_version ORDER BY rtype, id; \
         CREATE UNIQUE INDEX temp.rno_map_key ON rno_map (rtype, id); \
         CREATE INDEX temp.rno_map_id ON rno_map (id); \
         UPDATE resource_version SET rno = (SELECT m.rno FROM rno_map m \
             WHERE m.rtype = resource_version.rtype AND m.id = resource_version.id); \
         INSERT INTO resource_no (rno, id) SELECT rno, id FROM rno_map;",
    )
    .map_err(engine)?;
    let mut p = Pending::default();
    let mut sources = Vec::new();
    for (table, order) in [
        ("search_index", ""),
        ("search_recent", ""),
        ("search_log", " ORDER BY s.seq"),
    ] {
        if table_exists(&tx, table)? {
            let live = if table == "search_log" { "s.live" } else { "1" };
            sources.push(format!(
                "SELECT s.ix, s.token, m.rno, {live} FROM {table} s JOIN rno_map m ON m.id = s.id{order}"
            ));
        }
    }
    for sql in &sources {
        let mut st = tx.prepare(sql).map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        while let Some(r) = rows.next().map_err(engine)? {
            let token: Vec<u8> = r.get(1).map_err(engine)?;
            let live: i64 = r.get(3).map_err(engine)?;
            p.apply(
                (
                    r.get(0).map_err(engine)?,
                    Tok::new(&token),
                    r.get(2).map_err(engine)?,
                ),
                live != 0,
            );
        }
    }
    let rows: Vec<(pending::Row, bool)> = p.all().collect();
    merge_into_segments(&tx, &rows).map_err(engine)?;
    tx.execute_batch(
        "DROP TABLE IF EXISTS search_index; DROP TABLE IF EXISTS search_recent; \
         DROP TABLE IF EXISTS search_log; DROP TABLE temp.rno_map;",
    )
    .map_err(engine)?;
    tx.commit().map_err(engine)
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`. `signer` signs audit heads.
    pub fn open(path: &Path, signer: HeadSigner) -> Result<Self, StoreError> {
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(engine)?;
        configure(&conn)?;
        // A new database returns free pages to the filesystem on a clean stop (the index
        // log empties at every merge); this must be chosen before the first table exists
        // and before the switch to WAL.
        if !table_exists(&conn, "resource_version")? {
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
        // Checkpoints run on their own thread (below), never inside a commit: an automatic
        // checkpoint would stall every request waiting on that commit.
        conn.pragma_update(None, "wal_autocheckpoint", "0")
            .map_err(engine)?;
        // The writer restarts the WAL (see `restart_wal`); a log that grew long before
        // (a burst, or a build without restarts) is cut back when it does.
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
            .map_err(engine)?;
        conn.execute_batch(SCHEMA).map_err(engine)?;
        migrate_to_segments(&mut conn)?;
        let head = load_head(&conn)?;
        let frontier = load_frontier(&conn, head.size)?;
        let pending = Arc::new(RwLock::new(load_pending(&conn)?));
        let merge_rows = Arc::new(AtomicUsize::new(DEFAULT_MERGE_ROWS));
        let (tx, rx) = mpsc::channel();
        let idle_merge_ms = Arc::new(AtomicU64::new(IDLE_MERGE_MS));
        let wal_restart = WalRestart::new();
        let writer_state = Writer {
            head,
            frontier,
            last_checkpoint: None,
            signer,
            pending: pending.clone(),
            merge_rows: merge_rows.clone(),
            idle_merge_ms: idle_merge_ms.clone(),
            wal: WalRestarter::new(wal_restart.clone()),
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
            wal_restart,
            pending,
            ids_by_number: Remembered::default(),
            key_ids: Remembered::default(),
            rows: Some(RowCache::default()),
        })
    }

    /// Merge pending index rows once no index row has been written for `ms`
    /// milliseconds (tests use a long time to keep rows pending).
    pub fn set_idle_merge_ms(&self, ms: u64) {
        self.idle_merge_ms.store(ms, Ordering::Relaxed);
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

    /// The id of resource number `rno` (search pages turn every candidate number into
    /// an id), remembered (see [`Remembered`]). Readers only.
    fn id_of_number(&self, c: &Connection, rno: i64) -> Result<String, rusqlite::Error> {
        self.ids_by_number.get_or_read(rno, || {
            c.prepare_cached("SELECT id FROM resource_no WHERE rno = ?1")?
                .query_row(params![rno], |r| read_id(r, 0))
        })
    }

    /// The key id of data key number `key_no` (every version row read names one),
    /// remembered (see [`Remembered`]). Readers only.
    fn key_id_of(&self, c: &Connection, key_no: i64) -> Result<String, rusqlite::Error> {
        self.key_ids.get_or_read(key_no, || {
            c.prepare_cached("SELECT key_id FROM data_key WHERE key_no = ?1")?
                .query_row(params![key_no], |r| r.get(0))
        })
    }

    /// The kept rows and the resource state `c` reads (see [`crate::rows`]).
    fn kept(&self, c: &Connection) -> Result<Option<(&RowCache, i64)>, rusqlite::Error> {
        let Some(cache) = &self.rows else {
            return Ok(None);
        };
        let epoch = c
            .prepare_cached("SELECT n FROM resource_epoch")?
            .query_row([], |r| r.get(0))?;
        Ok(Some((cache, epoch)))
    }

    /// A version row as read by [`raw_version`], with its key id.
    fn named(
        &self,
        c: &Connection,
        (key_no, mut row): (i64, VersionRow),
    ) -> Result<VersionRow, rusqlite::Error> {
        row.key_id = self.key_id_of(c, key_no)?;
        Ok(row)
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
        let pending = if table_exists(&conn, "index_log")? {
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
            wal_restart: WalRestart::new(),
            pending: Arc::new(RwLock::new(pending)),
            ids_by_number: Remembered::default(),
            key_ids: Remembered::default(),
            rows: None,
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
        self.with_connection(false, f)
    }

    /// [`Self::with_reader`] for reads of several statements: all in one read transaction.
    fn with_snapshot<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        self.with_connection(true, f)
    }

    fn with_connection<T>(
        &self,
        snapshot: bool,
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
        let out = if snapshot {
            // One read transaction for every statement of `f`: SQLite drops a
            // connection's page cache at the start of a read transaction whenever the
            // WAL has changed (audited requests commit all the time), so per-statement
            // transactions re-read the same pages; and the statements see one state.
            conn.prepare_cached("BEGIN")
                .and_then(|mut s| s.execute([]))
                .and_then(|_| {
                    let out = f(&conn);
                    let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
                    conn.prepare_cached(end)?.execute([])?;
                    out
                })
                .map_err(engine)
        } else {
            f(&conn).map_err(engine)
        };
        let mut pool = self.readers.lock();
        // a connection left inside a transaction (its COMMIT or ROLLBACK failed) is dropped
        if pool.len() < MAX_IDLE_READERS && conn.is_autocommit() {
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

/// A row of [`select_version!`]: its data key number, and the row without its key id
/// (see [`SqliteStore::named`]).
fn raw_version(r: &rusqlite::Row<'_>) -> Result<(i64, VersionRow), rusqlite::Error> {
    Ok((
        r.get(3)?,
        VersionRow {
            rtype: r.get(0)?,
            id: read_id(r, 1)?,
            version: r.get::<_, i64>(2)? as u64,
            key_id: String::new(),
            deleted: r.get::<_, i64>(4)? != 0,
            updated_ms: r.get(5)?,
            sealed: r.get(6)?,
        },
    ))
}

macro_rules! select_version {
    () => {
        "SELECT v.rtype, v.id, v.version, v.key_no, v.deleted, v.updated_ms, v.sealed \
         FROM resource_version v"
    };
}

const SELECT_VERSION: &str = select_version!();

const SELECT_CURRENT: &str = concat!(
    select_version!(),
    " WHERE v.rtype = ?1 AND v.id = ?2 ORDER BY v.version DESC LIMIT 1"
);

impl Store for SqliteStore {
    fn current(&self, rtype: &str, id: &str) -> Result<Option<VersionRow>, StoreError> {
        // two statements without a common snapshot: the row read after the count is at
        // least as new as the state counted, so never stale for it (crate::rows)
        self.with_reader(|c| {
            let kept = self.kept(c)?;
            let ids = [id.to_owned()];
            if let Some((cache, epoch)) = kept
                && let Some(row) = cache.get_many(epoch, rtype, &ids).pop().flatten()
            {
                return Ok(Some(row));
            }
            let row = c
                .prepare_cached(SELECT_CURRENT)?
                .query_row(params![rtype, DbId(id)], raw_version)
                .optional()?
                .map(|raw| self.named(c, raw))
                .transpose()?;
            if let Some((cache, epoch)) = kept {
                cache.keep(epoch, &row);
            }
            Ok(row)
        })
    }

    fn current_many(
        &self,
        rtype: &str,
        ids: &[String],
    ) -> Result<Vec<Option<VersionRow>>, StoreError> {
        // one connection, one snapshot and one prepared statement for the lot; rows kept
        // for this snapshot's resource state are not read again
        self.with_snapshot(|c| {
            let kept = self.kept(c)?;
            let mut out = match kept {
                Some((cache, epoch)) => cache.get_many(epoch, rtype, ids),
                None => vec![None; ids.len()],
            };
            let mut st = c.prepare_cached(SELECT_CURRENT)?;
            let mut read = Vec::new();
            for (slot, id) in out.iter_mut().zip(ids) {
                if slot.is_none() {
                    *slot = st
                        .query_row(params![rtype, DbId(id)], raw_version)
                        .optional()?
                        .map(|raw| self.named(c, raw))
                        .transpose()?;
                    read.extend(slot.as_ref());
                }
            }
            if let Some((cache, epoch)) = kept {
                cache.keep(epoch, read);
            }
            Ok(out)
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
            .query_row(params![rtype, DbId(id), v], raw_version)
            .optional()?
            .map(|raw| self.named(c, raw))
            .transpose()
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
                .query_map(params![rtype, DbId(id), limit], raw_version)?
                .map(|raw| self.named(c, raw?))
                .collect(),
            None => c
                .prepare_cached(&format!(
                    "{SELECT_VERSION} WHERE v.rtype = ?1 ORDER BY v.updated_ms DESC, v.id DESC, v.version DESC LIMIT ?2"
                ))?
                .query_map(params![rtype, limit], raw_version)?
                .map(|raw| self.named(c, raw?))
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
        // held until the segments have been read: a merge cannot move postings between
        // the two places while this reader looks at both
        let pending = self.pending.read();
        self.with_snapshot(|c| {
            let mut bound = 0;
            let numbers = evaluate(c, rtype, &q, &pending, &mut bound)?;
            let after = match after {
                None => 0,
                Some(a) => c
                    .prepare_cached(
                        "SELECT rno FROM resource_version WHERE rtype = ?1 AND id = ?2 LIMIT 1",
                    )?
                    .query_row(params![rtype, DbId(a)], |r| r.get(0))
                    .optional()?
                    .unwrap_or(i64::MAX),
            };
            let start = numbers.partition_point(|n| *n <= after);
            numbers[start..]
                .iter()
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .map(|&n| self.id_of_number(c, n))
                .collect()
        })
    }

    fn index_stats(&self, rtype: &str, param: &str) -> Result<IndexStats, StoreError> {
        let ix = index_no(rtype, param);
        let pending = self.pending.read();
        self.with_snapshot(|c| {
            let mut postings: HashSet<(Tok, i64)> = HashSet::new();
            let mut st = c.prepare_cached("SELECT data FROM search_seg WHERE ix = ?1")?;
            let mut rows = st.query(params![ix])?;
            while let Some(r) = rows.next()? {
                postings.extend(decode_segment(r.get_ref(0)?.as_blob()?)?);
            }
            for ((_, token, n), live) in pending.rows_of(ix) {
                if live {
                    postings.insert((token, n));
                } else {
                    postings.remove(&(token, n));
                }
            }
            let mut per_token: HashMap<Tok, u64> = HashMap::new();
            let mut resources: HashSet<i64> = HashSet::new();
            for (t, n) in postings {
                *per_token.entry(t).or_default() += 1;
                resources.insert(n);
            }
            Ok(IndexStats {
                resources: resources.len() as u64,
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

    fn meta_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // keys are ASCII: the range [prefix, prefix + U+10FFFF) holds exactly the keys
        // that start with it
        let end = format!("{prefix}\u{10FFFF}");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            c.prepare_cached("SELECT k, v FROM meta WHERE k >= ?1 AND k < ?2 ORDER BY k LIMIT ?3")?
                .query_map(params![prefix, end, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
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

    fn audit_checkpoints(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<merkle::Checkpoint>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            c.prepare_cached(
                "SELECT size, root, time_ms, signature FROM audit_checkpoint \
                 WHERE size > ?1 ORDER BY size LIMIT ?2",
            )?
            .query_map(params![after, limit], |r| {
                let root: Vec<u8> = r.get(1)?;
                Ok(merkle::Checkpoint {
                    size: r.get::<_, i64>(0)? as u64,
                    // a root of the wrong length cannot match any tree: zeros
                    root: root.try_into().unwrap_or([0u8; 32]),
                    time_ms: r.get::<_, i64>(2)? as u64,
                    signature: r.get(3)?,
                })
            })?
            .collect()
        })
    }

    fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            c.prepare_cached(
                "SELECT seq, event, hash FROM audit_event WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?
            .query_map(params![after, limit], |r| {
                Ok(StoredEvent {
                    seq: r.get::<_, i64>(0)? as u64,
                    event: r.get(1)?,
                    hash: r.get(2)?,
                })
            })?
            .collect()
        })
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

/// The Merkle tree of the audit log as of `head_size` events: from the newest checkpoint's
/// stored frontier, and the events after it.
fn load_frontier(conn: &Connection, head_size: u64) -> Result<Frontier, StoreError> {
    let stored: Option<Vec<u8>> = conn
        .query_row(
            "SELECT frontier FROM audit_checkpoint ORDER BY size DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(engine)?;
    let mut f = match stored {
        Some(b) => {
            Frontier::from_bytes(&b).ok_or(StoreError::Corrupt("audit checkpoint frontier"))?
        }
        None => Frontier::new(),
    };
    let mut st = conn
        .prepare("SELECT seq, event FROM audit_event WHERE seq > ?1 ORDER BY seq")
        .map_err(engine)?;
    let mut rows = st
        .query(params![i64::try_from(f.size()).unwrap_or(i64::MAX)])
        .map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let seq: i64 = r.get(0).map_err(engine)?;
        if u64::try_from(seq).ok() != Some(f.size() + 1) {
            return Err(StoreError::Corrupt("audit sequence has a gap"));
        }
        let event: Vec<u8> = r.get(1).map_err(engine)?;
        f.push(merkle::leaf_hash(&event));
    }
    if f.size() != head_size {
        return Err(StoreError::Corrupt("audit checkpoint beyond the log"));
    }
    Ok(f)
}

/// How often (at most) a signed checkpoint of the audit tree is written while events come.
pub const CHECKPOINT_INTERVAL_MS: u64 = 2_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the writer thread owns besides its connection.
struct Writer {
    head: ChainHead,
    /// The audit log's Merkle tree, as far as `head`.
    frontier: Frontier,
    /// When the last checkpoint was written by this process.
    last_checkpoint: Option<std::time::Instant>,
    signer: HeadSigner,
    pending: Arc<RwLock<Pending>>,
    merge_rows: Arc<AtomicUsize>,
    idle_merge_ms: Arc<AtomicU64>,
    wal: WalRestarter,
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Command>, mut w: Writer) {
    let mut staged = Staged::default();
    let mut last_index_write = std::time::Instant::now();
    // (after open: `wal_autocheckpoint` would replace it)
    conn.wal_hook(Some(note_wal_frames));
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
        let frontier_before = w.frontier.clone();
        let checkpoint_due = w
            .last_checkpoint
            .is_none_or(|t| t.elapsed().as_millis() >= u128::from(CHECKPOINT_INTERVAL_MS));
        let results = {
            // the writer is the only one to change `pending`: reading it here is stable
            let pending = w.pending.read();
            apply_group(
                &mut conn,
                &mut group,
                Audit {
                    head: &mut w.head,
                    frontier: &mut w.frontier,
                    signer: &w.signer,
                    checkpoint_due,
                },
                &pending,
                &mut staged,
            )
        };
        if checkpoint_due && w.head.size != before.size {
            w.last_checkpoint = Some(std::time::Instant::now());
        }
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
                w.wal.after_group(&conn);
            }
            Err(e) => {
                staged.take();
                w.head = before;
                w.frontier = frontier_before;
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
    // a clean stop is the longest idle: merge, so the next open has no log to replay
    if w.idle_merge_ms.load(Ordering::Relaxed) != u64::MAX && w.pending.read().len() > 0 {
        merge_or_warn(&mut conn, &w.pending);
    }
    // free pages (a merged log's, mostly) go back to the filesystem; a database created
    // before auto_vacuum was set ignores this
    incremental_vacuum(&conn);
    checkpoint(&conn);
}

/// [`merge_pending`]; a failed merge changes nothing and is retried later.
fn merge_or_warn(conn: &mut Connection, pending: &RwLock<Pending>) {
    if let Err(e) = merge_pending(conn, pending) {
        tracing::warn!(error = %e, "index merge failed; retried later");
    }
}

/// Merge every pending posting into the segments and empty `index_log`, in one
/// transaction.
fn merge_pending(conn: &mut Connection, pending: &RwLock<Pending>) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let p = pending.read();
        let rows: Vec<(pending::Row, bool)> = p.all().collect();
        merge_into_segments(&tx, &rows)?;
    }
    tx.execute("DELETE FROM index_log", [])?;
    // readers hold the read lock across their queries: none sees the postings in neither
    // place (committed here, cleared from memory) nor in both
    let mut p = pending.write();
    tx.commit()?;
    p.clear();
    Ok(())
}

fn corrupt_segment() -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, "search_seg.data".into(), rusqlite::types::Type::Blob)
}

fn decode_segment(data: &[u8]) -> Result<Vec<segments::Pair>, rusqlite::Error> {
    segments::decode(data).ok_or_else(corrupt_segment)
}

/// Apply log records (in key order: `live` = the posting exists after it) to the
/// segments. Only the segments the records fall into are rewritten (re-cut when they
/// grow); records below an index's first segment go into it, an index without segments
/// gets new ones.
fn merge_into_segments(
    c: &Connection,
    rows: &[(pending::Row, bool)],
) -> Result<(), rusqlite::Error> {
    let mut at_or_before = c.prepare_cached(
        "SELECT tok, lo, data FROM search_seg WHERE ix = ?1 AND (tok, lo) <= (?2, ?3) \
         ORDER BY tok DESC, lo DESC LIMIT 1",
    )?;
    let mut first = c.prepare_cached(
        "SELECT tok, lo, data FROM search_seg WHERE ix = ?1 ORDER BY tok, lo LIMIT 1",
    )?;
    let mut next_key = c.prepare_cached(
        "SELECT tok, lo FROM search_seg WHERE ix = ?1 AND (tok, lo) > (?2, ?3) \
         ORDER BY tok, lo LIMIT 1",
    )?;
    let mut delete =
        c.prepare_cached("DELETE FROM search_seg WHERE ix = ?1 AND tok = ?2 AND lo = ?3")?;
    let mut insert =
        c.prepare_cached("INSERT INTO search_seg (ix, tok, lo, data) VALUES (?1, ?2, ?3, ?4)")?;
    type Seg = (Vec<u8>, i64, Vec<u8>);
    let seg_row = |r: &rusqlite::Row<'_>| -> Result<Seg, rusqlite::Error> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    };
    let mut i = 0;
    while i < rows.len() {
        let ((ix, tok, n), _) = &rows[i];
        let ix = *ix;
        let seg = match at_or_before
            .query_row(params![ix, tok.bytes(), n], seg_row)
            .optional()?
        {
            Some(s) => Some(s),
            None => first.query_row(params![ix], seg_row).optional()?,
        };
        let upper: Option<(Tok, i64)> = match &seg {
            Some((t, lo, _)) => next_key
                .query_row(params![ix, t, lo], |r| {
                    Ok((Tok::new(&r.get::<_, Vec<u8>>(0)?), r.get(1)?))
                })
                .optional()?,
            None => None,
        };
        let mut j = i;
        while j < rows.len() {
            let ((jx, jt, jn), _) = &rows[j];
            let below = upper.as_ref().is_none_or(|(ut, un)| (jt, *jn) < (ut, *un));
            if *jx != ix || !below {
                break;
            }
            j += 1;
        }
        let old = match &seg {
            Some((_, _, data)) => decode_segment(data)?,
            None => Vec::new(),
        };
        let merged = apply_records(old, &rows[i..j]);
        if let Some((t, lo, _)) = &seg {
            delete.execute(params![ix, t, lo])?;
        }
        for ((t, lo), data) in segments::cut(&merged) {
            insert.execute(params![ix, t.bytes(), lo, data])?;
        }
        i = j;
    }
    Ok(())
}

/// Sorted postings `old` with sorted log records applied.
fn apply_records(
    old: Vec<segments::Pair>,
    records: &[(pending::Row, bool)],
) -> Vec<segments::Pair> {
    let mut out = Vec::with_capacity(old.len() + records.len());
    let mut old = old.into_iter().peekable();
    for ((_, t, n), live) in records {
        while let Some(p) = old.next_if(|(ot, on)| (ot, *on) < (t, *n)) {
            out.push(p);
        }
        // the record decides whether this posting exists
        old.next_if(|(ot, on)| ot == t && on == n);
        if *live {
            out.push((t.clone(), *n));
        }
    }
    out.extend(old);
    out
}

/// Return every free page to the filesystem (each step of the pragma frees one).
fn incremental_vacuum(conn: &Connection) {
    let Ok(mut st) = conn.prepare("PRAGMA incremental_vacuum") else {
        return;
    };
    let Ok(mut rows) = st.query([]) else { return };
    while let Ok(Some(_)) = rows.next() {}
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

/// The audit state a group appends to.
struct Audit<'a> {
    head: &'a mut ChainHead,
    frontier: &'a mut Frontier,
    signer: &'a HeadSigner,
    /// Write a signed checkpoint of the tree if the group appends events.
    checkpoint_due: bool,
}

/// Apply a group in one transaction; per-command results, or an error that failed them all.
fn apply_group(
    conn: &mut Connection,
    group: &mut [Command],
    audit: Audit<'_>,
    pending: &Pending,
    staged: &mut Staged,
) -> Result<Vec<Result<Committed, CommitError>>, StoreError> {
    let Audit {
        head,
        frontier,
        signer,
        checkpoint_due,
    } = audit;
    let tx = conn.transaction().map_err(engine)?;
    let start_size = head.size;
    let mut versions_written = false;
    let mut leaves = Vec::new();
    let group_mark = staged.mark();
    let mut results = Vec::with_capacity(group.len());
    for cmd in group.iter_mut() {
        let res = match cmd {
            Command::Batch(batch, _) => {
                let saved = *head;
                let mark = staged.mark();
                leaves.clear();
                run_cached(&tx, "SAVEPOINT b")?;
                match apply_batch(&tx, batch, head, &mut leaves, pending, staged) {
                    Ok(c) => {
                        run_cached(&tx, "RELEASE b")?;
                        versions_written |= !batch.puts.is_empty();
                        // the batch's events join the tree once they are in
                        for l in &leaves {
                            frontier.push(*l);
                        }
                        Ok(c)
                    }
                    Err(e) => {
                        *head = saved;
                        staged.rollback_to(mark);
                        run_cached(&tx, "ROLLBACK TO b")?;
                        run_cached(&tx, "RELEASE b")?;
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
    if versions_written {
        // a new resource state: rows readers kept for the old one are stale (crate::rows)
        run_cached(&tx, "UPDATE resource_epoch SET n = n + 1")?;
    }
    let logged = staged.since(group_mark);
    if !logged.is_empty() {
        let mut data = Vec::with_capacity(logged.len() * 18);
        for ((ix, token, rno), live) in logged {
            encode_log_record(&mut data, *ix, *rno, token.bytes(), *live);
        }
        tx.prepare_cached("INSERT INTO index_log (data) VALUES (?1)")
            .and_then(|mut st| st.execute(params![data]))
            .map_err(engine)?;
    }
    if head.size != start_size {
        let signature = signer(&head.signing_message());
        tx.execute(
            "INSERT INTO audit_head (one, size, hash, signature) VALUES (1, ?1, ?2, ?3) \
             ON CONFLICT (one) DO UPDATE SET size = excluded.size, hash = excluded.hash, signature = excluded.signature",
            params![head.size as i64, head.hash.as_slice(), signature],
        )
        .map_err(engine)?;
        if checkpoint_due {
            // only the newest checkpoint keeps its frontier (what a restart resumes from)
            tx.execute(
                "UPDATE audit_checkpoint SET frontier = x'' \
                 WHERE size = (SELECT max(size) FROM audit_checkpoint)",
                [],
            )
            .map_err(engine)?;
            let root = frontier.root();
            let time = now_ms();
            let sig = signer(&merkle::Checkpoint::signing_message(
                frontier.size(),
                &root,
                time,
            ));
            tx.prepare_cached(
                "INSERT INTO audit_checkpoint (size, root, time_ms, signature, frontier) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    frontier.size() as i64,
                    root.as_slice(),
                    time as i64,
                    sig,
                    frontier.to_bytes()
                ])
            })
            .map_err(engine)?;
        }
    }
    tx.commit().map_err(engine)?;
    Ok(results)
}

/// Run a statement without results through the statement cache: the savepoint around
/// every batch of a group (one per request, reads' audit events included) was parsed
/// anew each time, on the writer that every request waits for.
fn run_cached(tx: &rusqlite::Transaction<'_>, sql: &str) -> Result<(), StoreError> {
    tx.prepare_cached(sql)
        .and_then(|mut st| st.execute([]))
        .map(|_| ())
        .map_err(engine)
}

fn apply_batch(
    tx: &rusqlite::Transaction<'_>,
    batch: &WriteBatch,
    head: &mut ChainHead,
    leaves: &mut Vec<merkle::Hash>,
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
        let current: Option<(i64, i64)> = tx
            .prepare_cached(
                "SELECT version, rno FROM resource_version WHERE rtype = ?1 AND id = ?2 \
                 ORDER BY version DESC LIMIT 1",
            )
            .map_err(e)?
            .query_row(params![row.rtype, DbId(&row.id)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(e)?;
        let (current, rno) = match current {
            Some((v, rno)) => (Some(v as u64), rno),
            None => (None, 0),
        };
        let ok = match put.expect {
            Expect::Absent => current.is_none(),
            Expect::Version(v) => current == Some(v),
        };
        if !ok || row.version != current.unwrap_or(0) + 1 {
            return Err(CommitError::Conflict { index, current });
        }
        // a new resource gets the next resource number (rolled back with its batch)
        let rno = if current.is_none() {
            tx.prepare_cached("INSERT INTO resource_no (id) VALUES (?1)")
                .map_err(e)?
                .execute(params![DbId(&row.id)])
                .map_err(e)?;
            tx.last_insert_rowid()
        } else {
            rno
        };
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
            "INSERT INTO resource_version (rtype, id, version, key_no, deleted, updated_ms, sealed, rno) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(e)?
        .execute(params![
            row.rtype,
            DbId(&row.id),
            version,
            key_no,
            row.deleted as i64,
            row.updated_ms,
            row.sealed,
            rno
        ])
        .map_err(e)?;
        let old = postings_of_entries(&row.rtype, &put.replaces);
        let new = if row.deleted {
            Vec::new()
        } else {
            postings_of_entries(&row.rtype, &put.index)
        };
        // only what changes is logged: an update that keeps a value keeps its posting
        let removed: Vec<(i64, &[u8])> = old
            .iter()
            .filter(|p| new.binary_search(p).is_err())
            .copied()
            .collect();
        let added: Vec<(i64, &[u8])> = new
            .iter()
            .filter(|p| old.binary_search(p).is_err())
            .copied()
            .collect();
        log_index(rno, &removed, &added, staged);
    }
    let mut last_audit_seq = None;
    for ev in &batch.audit {
        let bytes = ev.encode();
        let hash = head.append(&bytes);
        leaves.push(merkle::leaf_hash(&bytes));
        tx.prepare_cached("INSERT INTO audit_event (seq, event, hash) VALUES (?1, ?2, ?3)")
            .map_err(e)?
            .execute(params![head.size as i64, bytes, hash.as_slice()])
            .map_err(e)?;
        last_audit_seq = Some(head.size);
    }
    Ok(Committed { last_audit_seq })
}

/// The `(index number, token)` pairs of index entries of `rtype`, sorted and distinct.
fn postings_of_entries<'a>(rtype: &str, entries: &'a [IndexEntry]) -> Vec<(i64, &'a [u8])> {
    let mut v: Vec<(i64, &[u8])> = entries
        .iter()
        .map(|en| (index_no(rtype, &en.param), en.token.as_slice()))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Stage the postings of resource number `rno` that a write removes and adds (in that
/// order); [`apply_group`] logs what its batches staged in one record.
fn log_index(rno: i64, removed: &[(i64, &[u8])], added: &[(i64, &[u8])], staged: &mut Staged) {
    for (rows, live) in [(removed, false), (added, true)] {
        for (ix, token) in rows {
            staged.push((*ix, Tok::new(token), rno), live);
        }
    }
}

/// The resource numbers holding `tok` in index `ix`: the segments, with the pending and
/// (inside a transaction) staged records applied. Sorted.
fn token_postings(
    c: &Connection,
    ix: i64,
    tok: &Tok,
    pending: &Pending,
    staged: Option<&mut Staged>,
) -> Result<Vec<i64>, rusqlite::Error> {
    let mut st = c.prepare_cached(
        "SELECT data FROM (SELECT data FROM search_seg WHERE ix = ?1 AND tok < ?2 \
         ORDER BY tok DESC, lo DESC LIMIT 1) \
         UNION ALL SELECT data FROM search_seg WHERE ix = ?1 AND tok = ?2",
    )?;
    let mut rows = st.query(params![ix, tok.bytes()])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.extend(
            segments::postings_of(r.get_ref(0)?.as_blob()?, tok).ok_or_else(corrupt_segment)?,
        );
    }
    out.sort_unstable();
    out.dedup();
    let mut overlay: Vec<(i64, bool)> = pending.list(ix, tok).collect();
    if let Some(s) = staged {
        // staged records come after the pending ones
        overlay.extend(s.list(ix, tok));
    }
    if overlay.is_empty() {
        return Ok(out);
    }
    let mut set: std::collections::BTreeSet<i64> = out.into_iter().collect();
    for (n, live) in overlay {
        if live {
            set.insert(n);
        } else {
            set.remove(&n);
        }
    }
    Ok(set.into_iter().collect())
}

/// Ids of resources of `rtype` carrying all `tokens` (at most `limit`), in the segments,
/// `pending` or the current transaction's `staged` records. The blind index only holds
/// postings of current, non-deleted versions.
fn matching_ids(
    c: &Connection,
    rtype: &str,
    tokens: &[IndexEntry],
    limit: usize,
    pending: &Pending,
    staged: &mut Staged,
) -> Result<Vec<String>, rusqlite::Error> {
    let mut numbers: Option<Vec<i64>> = None;
    for t in tokens {
        let ix = index_no(rtype, &t.param);
        let list = token_postings(c, ix, &Tok::new(&t.token), pending, Some(staged))?;
        numbers = Some(match numbers {
            None => list,
            Some(prev) => intersect(&prev, &list),
        });
    }
    let mut st = c.prepare_cached("SELECT id FROM resource_no WHERE rno = ?1")?;
    numbers
        .unwrap_or_default()
        .iter()
        .take(limit)
        .map(|n| st.query_row(params![n], |r| read_id(r, 0)))
        .collect()
}

fn intersect(a: &[i64], b: &[i64]) -> Vec<i64> {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    small
        .iter()
        .filter(|n| large.binary_search(n).is_ok())
        .copied()
        .collect()
}

fn union(a: &[i64], b: &[i64]) -> Vec<i64> {
    let mut v = Vec::with_capacity(a.len() + b.len());
    v.extend_from_slice(a);
    v.extend_from_slice(b);
    v.sort_unstable();
    v.dedup();
    v
}

/// Largest number of tokens one candidate query looks up.
const MAX_BOUND_TOKENS: usize = 30_000;

/// The resource numbers a candidate query selects, sorted. `All` never reaches here (the
/// caller scans the type instead).
fn evaluate(
    c: &Connection,
    rtype: &str,
    q: &Candidates,
    pending: &Pending,
    bound: &mut usize,
) -> Result<Vec<i64>, rusqlite::Error> {
    let unexpected = || {
        rusqlite::Error::InvalidParameterName("unexpected full scan in a candidate query".into())
    };
    match q {
        Candidates::Tokens { param, tokens } => {
            *bound += tokens.len();
            if *bound > MAX_BOUND_TOKENS {
                return Err(rusqlite::Error::InvalidParameterName(
                    "too many tokens in one query".into(),
                ));
            }
            let ix = index_no(rtype, param);
            if !pending.may_have(ix) {
                return Ok(Vec::new());
            }
            let mut out = Vec::new();
            for t in tokens {
                let list = token_postings(c, ix, &Tok::new(t), pending, None)?;
                out = if out.is_empty() {
                    list
                } else {
                    union(&out, &list)
                };
            }
            Ok(out)
        }
        Candidates::And(parts) => {
            let mut acc: Option<Vec<i64>> = None;
            for p in parts.iter().filter(|p| !matches!(p, Candidates::All)) {
                let v = evaluate(c, rtype, p, pending, bound)?;
                acc = Some(match acc {
                    None => v,
                    Some(prev) => intersect(&prev, &v),
                });
                if acc.as_ref().is_some_and(Vec::is_empty) {
                    break;
                }
            }
            acc.ok_or_else(unexpected)
        }
        Candidates::Or(parts) => {
            let mut acc = Vec::new();
            for p in parts {
                if matches!(p, Candidates::All) {
                    return Err(unexpected());
                }
                let v = evaluate(c, rtype, p, pending, bound)?;
                acc = union(&acc, &v);
            }
            Ok(acc)
        }
        Candidates::All => Err(unexpected()),
    }
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
    fn log_records_round_trip_and_malformed_ones_are_refused() {
        let mut d = Vec::new();
        encode_log_record(&mut d, 0x7fff_fffe, 7, b"ab", false);
        encode_log_record(&mut d, 1, 1 << 40, b"", true);
        assert_eq!(
            decode_log_record(&d).unwrap(),
            [
                (0x7fff_fffe, 7, &b"ab"[..], false),
                (1, 1 << 40, &b""[..], true)
            ]
        );
        assert!(decode_log_record(&d[..d.len() - 1]).is_none());
        assert!(decode_log_record(&[2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0]).is_none());
        assert!(decode_log_record(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 3, b'a']).is_none());
    }

    #[test]
    fn shared_suite_passes_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        crate::testsuite::run_all(&store);
    }

    #[test]
    fn shared_suite_passes_with_frequent_index_merges() {
        // pending rows move to the segments every few batches, so lookups, guards,
        // deletes and candidate queries see rows in both places
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_merge_rows(7);
        crate::testsuite::run_all(&store);
        assert!(rows(dir.path(), "search_seg") > 0, "merges happened");
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
            rows(dir.path(), "index_log"),
            rows(dir.path(), "search_seg"),
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
            puts: vec![put_of("Condition", "late", 1, false, &[b"even"], &[])],
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
        assert_eq!(rows(dir.path(), "index_log"), 0);
    }

    /// The checkpoint sequence number in the WAL's header: SQLite adds one each time the
    /// log starts again from its beginning.
    fn wal_restarts(dir: &Path) -> u32 {
        let head = std::fs::read(dir.join("db.sqlite-wal")).unwrap_or_default();
        head.get(12..16)
            .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()))
    }

    #[test]
    fn the_wal_starts_again_while_readers_never_stop() {
        // readers that overlap, so at every moment one of them reads from the log: a
        // passive checkpoint alone would let it grow for as long as they go on
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_wal_restart_frames(64);
        crate::testsuite::append_audit(&store, 1);
        let first = wal_restarts(dir.path());
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for i in 0..4u64 {
                let (store, stop) = (&store, &stop);
                s.spawn(move || {
                    // out of step with each other: 3, 4, 5 and 6 ms each, from 0, 1, 2 and 3 ms
                    std::thread::sleep(std::time::Duration::from_millis(i));
                    while !stop.load(Ordering::Relaxed) {
                        store
                            .with_snapshot(|c| {
                                let n: i64 =
                                    c.query_row("SELECT count(*) FROM audit_event", [], |r| {
                                        r.get(0)
                                    })?;
                                std::thread::sleep(std::time::Duration::from_millis(3 + i));
                                Ok(n)
                            })
                            .unwrap();
                    }
                });
            }
            // each commit adds two frames or more: 8,000 in all, 31 MiB, without restarts
            crate::testsuite::append_audit(&store, 4_000);
            stop.store(true, Ordering::Relaxed);
        });
        let restarts = wal_restarts(dir.path()) - first;
        let size = std::fs::metadata(dir.path().join("db.sqlite-wal"))
            .unwrap()
            .len();
        eprintln!("WAL restarts {restarts}, file {size} B");
        assert!(restarts >= 10, "the log started again {restarts} times");
        // the file keeps its longest length: the restart frames, a group's and some slack
        // for readers that held a restart off
        assert!(size <= 2048 * (4096 + 24) + 32, "the log grew to {size} B");
    }

    #[test]
    fn a_reader_that_holds_the_wal_delays_no_group_after_the_first_try() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_wal_restart_frames(8);
        crate::testsuite::append_audit(&store, 1);
        // a long read transaction (an export, an operator's sqlite3) pins the log (or, begun
        // when every frame was checkpointed, the database file: then no checkpoint can copy
        // frames into it and restarts are held off all the same)
        let reader = Connection::open(dir.path().join("db.sqlite")).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT count(*) FROM audit_event", [], |r| r.get(0))
            .unwrap();
        let t = std::time::Instant::now();
        crate::testsuite::append_audit(&store, 300);
        let ms = u64::try_from(t.elapsed().as_millis()).unwrap();
        let tries = store.wal_restart.tries.load(Ordering::Relaxed);
        // past the threshold after a few commits; then tries further and further apart
        // (5, 10, 20 … 250 ms), not one (and its wait) after every group
        assert!(tries >= 1, "no restart was tried");
        assert!(tries <= 8 + ms / 250, "{tries} tries in {ms} ms");
        // once it is gone, the log starts again
        let held = wal_restarts(dir.path());
        reader.execute_batch("COMMIT").unwrap();
        drop(reader);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while wal_restarts(dir.path()) == held {
            assert!(
                std::time::Instant::now() < deadline,
                "the log never started again"
            );
            crate::testsuite::append_audit(&store, 10);
        }
    }

    #[test]
    fn a_snapshot_read_sees_one_state_and_a_failed_one_leaves_no_transaction_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let write = |b: WriteBatch| store.submit(b).blocking_recv().unwrap().unwrap();
        write(WriteBatch {
            new_keys: vec![("k1".into(), b"w".to_vec())],
            puts: vec![put("a", 1, false, &[], &[])],
            ..Default::default()
        });
        let count = |c: &Connection| -> Result<i64, rusqlite::Error> {
            c.query_row("SELECT count(*) FROM resource_version", [], |r| r.get(0))
        };
        // a write committed between two statements of one snapshot is seen by neither
        let (before, after) = store
            .with_snapshot(|c| {
                let before = count(c)?;
                write(WriteBatch {
                    puts: vec![put("b", 1, false, &[], &[])],
                    ..Default::default()
                });
                Ok((before, count(c)?))
            })
            .unwrap();
        assert_eq!((before, after), (1, 1));
        // plain reads see each commit as it lands
        assert_eq!(store.with_reader(count).unwrap(), 2);
        // a failing snapshot is rolled back; its connection goes back to the pool usable
        assert!(
            store
                .with_snapshot(|c| c.query_row("SELECT * FROM no_such_table", [], |_| Ok(())))
                .is_err()
        );
        for _ in 0..MAX_IDLE_READERS + 1 {
            assert_eq!(store.with_snapshot(count).unwrap(), 2);
        }
        assert!(store.readers.lock().iter().all(Connection::is_autocommit));
    }

    fn put(id: &str, version: u64, deleted: bool, index: &[&[u8]], replaces: &[&[u8]]) -> Put {
        put_of("Observation", id, version, deleted, index, replaces)
    }

    fn put_of(
        rtype: &str,
        id: &str,
        version: u64,
        deleted: bool,
        index: &[&[u8]],
        replaces: &[&[u8]],
    ) -> Put {
        let entries = |ts: &[&[u8]]| -> Vec<IndexEntry> {
            ts.iter()
                .map(|t| IndexEntry {
                    param: "code".into(),
                    token: t.to_vec(),
                })
                .collect()
        };
        Put {
            row: VersionRow {
                rtype: rtype.into(),
                id: id.into(),
                version,
                key_id: "k1".into(),
                deleted,
                updated_ms: 1,
                sealed: if deleted { vec![] } else { b"x".to_vec() },
            },
            expect: if version == 1 {
                Expect::Absent
            } else {
                Expect::Version(version - 1)
            },
            index: entries(index),
            replaces: entries(replaces),
        }
    }

    #[test]
    fn kept_rows_never_outlive_a_write_even_from_another_process() {
        // two stores on one file stand for the server and a command-line tool
        let dir = tempfile::tempdir().unwrap();
        let (server, tool) = (open(dir.path()), open(dir.path()));
        let write = |s: &SqliteStore, b: WriteBatch| s.submit(b).blocking_recv().unwrap().unwrap();
        let versions = |s: &SqliteStore| -> Vec<Option<(u64, bool)>> {
            let ids = ["a".to_owned(), "b".to_owned()];
            let many = s.current_many("Observation", &ids).unwrap();
            for (id, row) in ids.iter().zip(&many) {
                assert_eq!(&s.current("Observation", id).unwrap(), row);
            }
            many.into_iter()
                .map(|r| r.map(|r| (r.version, r.deleted)))
                .collect()
        };
        write(
            &server,
            WriteBatch {
                new_keys: vec![("k1".into(), b"w".to_vec())],
                puts: vec![put_of("Observation", "a", 1, false, &[], &[])],
                ..Default::default()
            },
        );
        assert_eq!(versions(&server), vec![Some((1, false)), None]);
        for (store, put, want) in [
            (
                &server,
                put_of("Observation", "a", 2, false, &[], &[]),
                [Some((2, false)), None],
            ),
            (
                &tool,
                put_of("Observation", "a", 3, false, &[], &[]),
                [Some((3, false)), None],
            ),
            (
                &tool,
                put_of("Observation", "b", 1, false, &[], &[]),
                [Some((3, false)), Some((1, false))],
            ),
            (
                &server,
                put_of("Observation", "a", 4, true, &[], &[]),
                [Some((4, true)), Some((1, false))],
            ),
        ] {
            // read twice (the second from what the first kept), then write
            assert_eq!(versions(&server), versions(&server));
            write(
                store,
                WriteBatch {
                    puts: vec![put],
                    ..Default::default()
                },
            );
            assert_eq!(versions(&server), want.to_vec());
            assert_eq!(versions(&tool), want.to_vec());
        }
        // audit-only commits keep the kept rows
        crate::testsuite::append_audit(&server, 3);
        let epoch = |s: &SqliteStore| {
            s.with_reader(|c| {
                c.query_row("SELECT n FROM resource_epoch", [], |r| r.get::<_, i64>(0))
            })
            .unwrap()
        };
        assert_eq!(epoch(&server), 5);
        assert_eq!(epoch(&tool), 5);
    }

    #[test]
    fn segments_stay_exact_through_updates_deletes_and_merges() {
        // 600 resources, each with two of 40 tokens, updated and deleted at random, with
        // merges every few hundred records: segments are cut, split, emptied and
        // rewritten, and every answer must match a model.
        use std::collections::{BTreeMap, BTreeSet};
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_idle_merge_ms(u64::MAX);
        store.set_merge_rows(300);
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let tokens: Vec<Vec<u8>> = (0..40u8).map(|i| vec![b't', i]).collect();
        // id -> (version, tokens or None when deleted)
        let mut model: BTreeMap<String, (u64, Option<Vec<usize>>)> = BTreeMap::new();
        store
            .submit(WriteBatch {
                new_keys: vec![("k1".into(), b"w".to_vec())],
                ..Default::default()
            })
            .blocking_recv()
            .unwrap()
            .unwrap();
        for step in 0..3000 {
            let id = format!("r{}", rnd(600));
            let (version, old) = model.get(&id).cloned().unwrap_or((0, None));
            let old_toks: Vec<&[u8]> = old
                .iter()
                .flatten()
                .map(|i| tokens[*i].as_slice())
                .collect();
            let p = if version > 0 && old.is_some() && rnd(5) == 0 {
                model.insert(id.clone(), (version + 1, None));
                put(&id, version + 1, true, &[], &old_toks)
            } else {
                let new = vec![rnd(40) as usize, rnd(40) as usize];
                let new_toks: Vec<&[u8]> = new.iter().map(|i| tokens[*i].as_slice()).collect();
                model.insert(id.clone(), (version + 1, Some(new.clone())));
                put(&id, version + 1, false, &new_toks, &old_toks)
            };
            store
                .submit(WriteBatch {
                    puts: vec![p],
                    ..Default::default()
                })
                .blocking_recv()
                .unwrap()
                .unwrap_or_else(|e| panic!("step {step}: {e}"));
            if step % 500 == 499 {
                for (i, t) in tokens.iter().enumerate() {
                    let q = Candidates::Tokens {
                        param: "code".into(),
                        tokens: vec![t.clone()],
                    };
                    let got: BTreeSet<String> = store
                        .candidates("Observation", &q, None, usize::MAX)
                        .unwrap()
                        .into_iter()
                        .collect();
                    let want: BTreeSet<String> = model
                        .iter()
                        .filter(|(_, (_, ts))| ts.as_ref().is_some_and(|ts| ts.contains(&i)))
                        .map(|(id, _)| id.clone())
                        .collect();
                    assert_eq!(got, want, "token {i} after step {step}");
                }
            }
        }
        assert!(rows(dir.path(), "search_seg") > 1, "the index was cut");
        // paging through a large answer in resource-number order loses nothing
        let all = Candidates::Or(
            tokens
                .iter()
                .map(|t| Candidates::Tokens {
                    param: "code".into(),
                    tokens: vec![t.clone()],
                })
                .collect(),
        );
        let everything = store
            .candidates("Observation", &all, None, usize::MAX)
            .unwrap();
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store
                .candidates("Observation", &all, after.as_deref(), 37)
                .unwrap();
            let Some(last) = page.last().cloned() else {
                break;
            };
            paged.extend(page);
            after = Some(last);
        }
        assert_eq!(paged, everything);
        let live = model.values().filter(|(_, t)| t.is_some()).count();
        assert_eq!(everything.len(), live);
    }

    #[test]
    fn databases_of_the_earlier_index_form_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        {
            // the schema of the earlier form: no resource numbers, one index row per posting
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE data_key (key_no INTEGER PRIMARY KEY, key_id TEXT NOT NULL UNIQUE, wrapped BLOB NOT NULL);
                 CREATE TABLE resource_version (rtype TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
                     key_no INTEGER NOT NULL, deleted INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
                     sealed BLOB NOT NULL, PRIMARY KEY (rtype, id, version)) WITHOUT ROWID;
                 CREATE TABLE search_index (ix INTEGER NOT NULL, token BLOB NOT NULL, id BLOB NOT NULL,
                     PRIMARY KEY (ix, token, id)) WITHOUT ROWID;
                 CREATE TABLE search_log (seq INTEGER PRIMARY KEY, ix INTEGER NOT NULL, token BLOB NOT NULL,
                     id BLOB NOT NULL, live INTEGER NOT NULL);
                 INSERT INTO data_key (key_id, wrapped) VALUES ('k1', x'00');",
            )
            .unwrap();
            let ix = index_no("Observation", "code");
            for (id, v, tok, deleted) in [
                ("a", 1, &b"t1"[..], 0),
                ("b", 1, b"t1", 0),
                ("b", 2, b"t2", 0),
                ("c", 1, b"t1", 0),
                ("c", 2, b"", 1),
            ] {
                c.execute(
                    "INSERT INTO resource_version VALUES ('Observation', ?1, ?2, 1, ?3, 1, x'01')",
                    params![id, v, deleted],
                )
                .unwrap();
                if !(tok.is_empty() || (id == "b" && v == 1)) {
                    // a and c merged, b's update still in the log
                    let table = if id == "b" {
                        "search_log (ix, token, id, live) VALUES (?1, ?2, ?3, 1)"
                    } else {
                        "search_index VALUES (?1, ?2, ?3)"
                    };
                    c.execute(&format!("INSERT INTO {table}"), params![ix, tok, id])
                        .unwrap();
                }
            }
            // c was deleted: its posting was removed from the index
            c.execute("DELETE FROM search_index WHERE id = 'c'", [])
                .unwrap();
        }
        let store = open(dir.path());
        let q = |t: &[u8]| Candidates::Tokens {
            param: "code".into(),
            tokens: vec![t.to_vec()],
        };
        assert_eq!(
            store
                .candidates("Observation", &q(b"t1"), None, 10)
                .unwrap(),
            ["a"]
        );
        assert_eq!(
            store
                .candidates("Observation", &q(b"t2"), None, 10)
                .unwrap(),
            ["b"]
        );
        // new writes continue the numbering
        store
            .submit(WriteBatch {
                puts: vec![put("d", 1, false, &[b"t2"], &[])],
                ..Default::default()
            })
            .blocking_recv()
            .unwrap()
            .unwrap();
        assert_eq!(
            store
                .candidates("Observation", &q(b"t2"), None, 10)
                .unwrap(),
            ["b", "d"]
        );
        assert_eq!(
            store.current("Observation", "b").unwrap().unwrap().version,
            2
        );
        store.close();
        for old in ["search_index", "search_log"] {
            let c = Connection::open(&path).unwrap();
            assert!(!table_exists(&c, old).unwrap(), "{old} dropped");
        }
    }

    #[test]
    fn checkpoints_sign_the_merkle_tree_of_the_log_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            crate::testsuite::append_audit(&store, 3);
            store.close();
        }
        let store = open(dir.path());
        crate::testsuite::append_audit(&store, 2);
        let mut leaves = Vec::new();
        store
            .scan_audit(&mut |e| {
                leaves.push(merkle::leaf_hash(&e.event));
                true
            })
            .unwrap();
        assert_eq!(leaves.len(), 5);
        let cps = store.audit_checkpoints(0, 100).unwrap();
        // the first group of each process writes one (then at most every interval)
        assert!(cps.len() >= 2, "{cps:?}");
        let mut last = 0;
        for cp in &cps {
            assert!(cp.size > last);
            last = cp.size;
            let n = usize::try_from(cp.size).unwrap();
            assert_eq!(cp.root, merkle::root(&leaves[..n]), "size {n}");
            // the test signer signs with the identity: the signature is the message
            assert_eq!(
                cp.signature,
                merkle::Checkpoint::signing_message(cp.size, &cp.root, cp.time_ms)
            );
        }
        assert!(cps.iter().any(|c| c.size > 3), "the reopened tree went on");
        assert!(store.audit_checkpoints(last, 10).unwrap().is_empty());
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
