//! The tables, created and migrated at start under an advisory lock (several nodes may
//! start at once), each migration once, numbered in `phivault_schema`.
//!
//! Every table that grows with patients carries `pkey`, the data key id a row is sealed
//! under (`p:{patient id}`; shared keys for resources outside any compartment), and every
//! unique constraint of those tables includes it: each can be distributed on `pkey` with
//! Citus, co-located (see ARCHITECTURE.md). Uniqueness of a resource's `(rtype, id)` is
//! kept by the writer, which holds the audit head's row lock across its transaction.

use super::conn::PgConn;
use crate::StoreError;

/// The advisory lock key of schema changes (`'phivault'` as a number).
const MIGRATION_LOCK: i64 = 0x7068_6976_6175_6c74;

/// The migrations, in order; `phivault_schema` holds the number of each one applied.
const MIGRATIONS: &[&str] = &[
    // 1: the store
    r#"CREATE TABLE data_key (
        pkey text COLLATE "C" PRIMARY KEY,
        key_no bigint GENERATED ALWAYS AS IDENTITY,
        wrapped bytea NOT NULL
     );
     CREATE INDEX data_key_by_no ON data_key (key_no);
     CREATE TABLE resource_head (
        rtype text COLLATE "C" NOT NULL,
        id text COLLATE "C" NOT NULL,
        pkey text COLLATE "C" NOT NULL,
        rno bigint NOT NULL,
        version bigint NOT NULL,
        deleted boolean NOT NULL,
        mac bytea NOT NULL,
        PRIMARY KEY (rtype, id, pkey)
     );
     CREATE INDEX resource_head_by_pkey ON resource_head (pkey);
     CREATE SEQUENCE resource_no;
     CREATE TABLE resource_version (
        rtype text COLLATE "C" NOT NULL,
        id text COLLATE "C" NOT NULL,
        version bigint NOT NULL,
        pkey text COLLATE "C" NOT NULL,
        deleted boolean NOT NULL,
        updated_ms bigint NOT NULL,
        sealed bytea NOT NULL,
        mac bytea NOT NULL,
        PRIMARY KEY (rtype, id, version, pkey)
     );
     CREATE INDEX resource_version_by_time ON resource_version (rtype, updated_ms DESC, id DESC, version DESC);
     CREATE TABLE posting (
        ix bigint NOT NULL,
        token bytea NOT NULL,
        id text COLLATE "C" NOT NULL,
        pkey text COLLATE "C" NOT NULL,
        rtype text COLLATE "C" NOT NULL,
        PRIMARY KEY (ix, token, id, pkey)
     );
     CREATE INDEX posting_by_pkey ON posting (pkey, rtype, id);
     CREATE TABLE meta (
        k text COLLATE "C" PRIMARY KEY,
        v bytea NOT NULL,
        mac bytea NOT NULL
     );
     CREATE TABLE kek_generation (
        generation bigint PRIMARY KEY,
        wrapped bytea NOT NULL,
        created_ms bigint NOT NULL
     );
     CREATE TABLE audit_event (
        seq bigint PRIMARY KEY,
        event bytea NOT NULL,
        hash bytea NOT NULL
     );
     CREATE TABLE audit_checkpoint (
        size bigint PRIMARY KEY,
        root bytea NOT NULL,
        time_ms bigint NOT NULL,
        signature bytea NOT NULL
     );
     CREATE TABLE audit_head (
        one int PRIMARY KEY CHECK (one = 1),
        size bigint NOT NULL,
        hash bytea NOT NULL,
        state bytea NOT NULL,
        signature bytea NOT NULL,
        frontier bytea NOT NULL
     );"#,
    // 2: what several nodes must each see once (replay records), until it expires
    r#"CREATE TABLE once_seen (
        ns text COLLATE "C" NOT NULL,
        k bytea NOT NULL,
        until_ms bigint NOT NULL,
        PRIMARY KEY (ns, k)
     );
     CREATE INDEX once_seen_by_expiry ON once_seen (until_ms);"#,
    // 3: short-lived records every node reads and changes (sign-in codes and sessions),
    // sealed by the layer above
    r#"CREATE TABLE shared_state (
        ns text COLLATE "C" NOT NULL,
        k bytea NOT NULL,
        v bytea,
        until_ms bigint NOT NULL,
        PRIMARY KEY (ns, k)
     );
     CREATE INDEX shared_state_by_expiry ON shared_state (until_ms);"#,
    // 4: every node's erasures, in order, for the others to forget the keys they hold
    r#"CREATE TABLE erasure_feed (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key_id text COLLATE "C" NOT NULL
     );"#,
];

/// The columns phivault reads, with the types it made them: (table, column, type as
/// `information_schema` names it).
const COLUMNS: &[(&str, &str, &str)] = &[
    ("audit_checkpoint", "root", "bytea"),
    ("audit_checkpoint", "signature", "bytea"),
    ("audit_checkpoint", "size", "bigint"),
    ("audit_checkpoint", "time_ms", "bigint"),
    ("audit_event", "event", "bytea"),
    ("audit_event", "hash", "bytea"),
    ("audit_event", "seq", "bigint"),
    ("audit_head", "frontier", "bytea"),
    ("audit_head", "hash", "bytea"),
    ("audit_head", "one", "integer"),
    ("audit_head", "signature", "bytea"),
    ("audit_head", "size", "bigint"),
    ("audit_head", "state", "bytea"),
    ("data_key", "key_no", "bigint"),
    ("data_key", "pkey", "text"),
    ("data_key", "wrapped", "bytea"),
    ("kek_generation", "created_ms", "bigint"),
    ("kek_generation", "generation", "bigint"),
    ("kek_generation", "wrapped", "bytea"),
    ("meta", "k", "text"),
    ("meta", "mac", "bytea"),
    ("meta", "v", "bytea"),
    ("once_seen", "k", "bytea"),
    ("once_seen", "ns", "text"),
    ("once_seen", "until_ms", "bigint"),
    ("posting", "id", "text"),
    ("posting", "ix", "bigint"),
    ("posting", "pkey", "text"),
    ("posting", "rtype", "text"),
    ("posting", "token", "bytea"),
    ("resource_head", "deleted", "boolean"),
    ("resource_head", "id", "text"),
    ("resource_head", "mac", "bytea"),
    ("resource_head", "pkey", "text"),
    ("resource_head", "rno", "bigint"),
    ("resource_head", "rtype", "text"),
    ("resource_head", "version", "bigint"),
    ("resource_version", "deleted", "boolean"),
    ("resource_version", "id", "text"),
    ("resource_version", "mac", "bytea"),
    ("resource_version", "pkey", "text"),
    ("resource_version", "rtype", "text"),
    ("resource_version", "sealed", "bytea"),
    ("resource_version", "updated_ms", "bigint"),
    ("resource_version", "version", "bigint"),
    ("shared_state", "k", "bytea"),
    ("shared_state", "ns", "text"),
    ("shared_state", "until_ms", "bigint"),
    ("shared_state", "v", "bytea"),
    ("erasure_feed", "seq", "bigint"),
    ("erasure_feed", "key_id", "text"),
];

/// Refuse a schema whose columns are not the ones phivault made (a column dropped or its
/// type changed outside phivault): every row is read by those types.
pub(super) async fn check_columns(c: &mut PgConn) -> Result<(), StoreError> {
    let rows = c
        .client
        .query(
            "SELECT table_name::text, column_name::text, data_type::text \
             FROM information_schema.columns WHERE table_schema = current_schema()",
            &[],
        )
        .await
        .map_err(super::conn::pg)?;
    let found: std::collections::HashMap<(String, String), String> = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    for (table, column, want) in COLUMNS {
        match found.get(&((*table).to_owned(), (*column).to_owned())) {
            Some(t) if t == want => {}
            Some(t) => {
                return Err(super::trust::tampered(format!(
                    "column {table}.{column} is {t}, not the {want} phivault made (changed outside phivault)"
                )));
            }
            None => {
                return Err(super::trust::tampered(format!(
                    "column {table}.{column} is missing (removed outside phivault)"
                )));
            }
        }
    }
    Ok(())
}

/// Whether the database holds a phivault store (its schema table).
pub(super) async fn exists(c: &mut PgConn) -> Result<bool, StoreError> {
    Ok(c
        .client
        .query_opt(
            "SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'phivault_schema'",
            &[],
        )
        .await
        .map_err(super::conn::pg)?
        .is_some())
}

/// Whether the database's schema holds no table at all (where `init` makes a store).
pub(super) async fn empty(c: &mut PgConn) -> Result<bool, StoreError> {
    Ok(c.client
        .query_opt(
            "SELECT 1 FROM pg_tables WHERE schemaname = current_schema() LIMIT 1",
            &[],
        )
        .await
        .map_err(super::conn::pg)?
        .is_none())
}

/// Apply the migrations not yet applied, one transaction each, holding the advisory lock
/// so that nodes starting together apply each once.
pub(super) async fn migrate(c: &mut PgConn) -> Result<(), StoreError> {
    c.batch("SET client_min_messages = warning").await?;
    c.client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(super::conn::pg)?;
    let out = apply(c).await;
    let _ = c
        .client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    out?;
    check_columns(c).await
}

async fn apply(c: &mut PgConn) -> Result<(), StoreError> {
    c.batch(
        "CREATE TABLE IF NOT EXISTS phivault_schema (
            version int PRIMARY KEY,
            applied_ms bigint NOT NULL
         )",
    )
    .await?;
    let row = c
        .client
        .query_one("SELECT coalesce(max(version), 0) FROM phivault_schema", &[])
        .await
        .map_err(super::conn::pg)?;
    let applied: i32 = row.get(0);
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if applied > known {
        return Err(StoreError::Engine(format!(
            "the database is at schema version {applied}, newer than this phivault knows \
             ({known}): run the newer phivault"
        )));
    }
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = i32::try_from(n + 1).unwrap_or(i32::MAX);
        let tx = c.client.transaction().await.map_err(super::conn::pg)?;
        tx.batch_execute(sql).await.map_err(super::conn::pg)?;
        tx.execute(
            "INSERT INTO phivault_schema (version, applied_ms) VALUES ($1, $2)",
            &[&version, &(super::now_ms() as i64)],
        )
        .await
        .map_err(super::conn::pg)?;
        tx.commit().await.map_err(super::conn::pg)?;
        tracing::info!(version, "database schema migrated");
    }
    Ok(())
}
