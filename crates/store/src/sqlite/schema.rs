//! The database's tables, created where missing on every open, and the migration of
//! databases written in an earlier form.

use rusqlite::Connection;

use super::engine;
use super::index::merge_into_segments;
use crate::StoreError;
use crate::pending::{self, Pending, Tok};

/// Every table; run on every read-write open.
pub(super) const SCHEMA: &str = r#"
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
    id BLOB NOT NULL,
    rtype TEXT,
    version INTEGER,
    deleted INTEGER
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
    signature BLOB NOT NULL,
    state BLOB
);
CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v BLOB NOT NULL,
    mac BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS resource_epoch (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    n INTEGER NOT NULL
);
INSERT OR IGNORE INTO resource_epoch (one, n) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS kek_generation (
    generation INTEGER PRIMARY KEY,
    wrapped BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
"#;

/// Whether a `SELECT count(*) …` query counts anything.
fn counts_any(conn: &Connection, sql: &str, args: &[&str]) -> Result<bool, StoreError> {
    conn.query_row(sql, rusqlite::params_from_iter(args), |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n > 0)
    .map_err(engine)
}

pub(super) fn table_exists(conn: &Connection, name: &str) -> Result<bool, StoreError> {
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

/// Databases written before settings rows had MACs and heads a state summary: add the
/// columns. True while nothing in the database carries either yet (a database of an older
/// version, adopted once, see `trust`; a storage writer who strips them finds the head's
/// signature no longer verifies without its state).
pub(super) fn add_integrity_columns(conn: &Connection) -> Result<bool, StoreError> {
    if !has_column(conn, "meta", "mac")? {
        conn.execute_batch("ALTER TABLE meta ADD COLUMN mac BLOB")
            .map_err(engine)?;
    }
    if !has_column(conn, "audit_head", "state")? {
        conn.execute_batch("ALTER TABLE audit_head ADD COLUMN state BLOB")
            .map_err(engine)?;
    }
    if !has_column(conn, "resource_no", "version")? {
        conn.execute_batch(
            "ALTER TABLE resource_no ADD COLUMN rtype TEXT; \
             ALTER TABLE resource_no ADD COLUMN version INTEGER; \
             ALTER TABLE resource_no ADD COLUMN deleted INTEGER;",
        )
        .map_err(engine)?;
    }
    Ok(
        !counts_any(conn, "SELECT count(*) FROM meta WHERE mac IS NOT NULL", &[])?
            && !counts_any(
                conn,
                "SELECT count(*) FROM audit_head WHERE length(coalesce(state, x'')) > 0",
                &[],
            )?,
    )
}

/// Databases written before resource numbers and index segments: number every resource,
/// and move the index (one B-tree row per posting, keyed by id, in `search_index`, with
/// unmerged rows in `search_log` or, earlier still, `search_recent`) into segments. The
/// old rows do not name their resource type, so an id that several types use gets a
/// posting for each of them: candidates are a superset anyway, and every one is verified
/// against its decrypted record. One transaction: a crash leaves the old form.
pub(super) fn migrate_to_segments(conn: &mut Connection) -> Result<(), StoreError> {
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
