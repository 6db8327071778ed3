//! Issue 18, acceptance 1: random single-row edits, deletions, insertions and
//! restorations of older rows of a real store, each found by `phivault verify` offline.
//! The store is made once by the real binary (patients created, updated and deleted, a
//! client registered, settings written), with a copy taken half-way for the restorations;
//! each case copies it, changes one row of one table, and runs `phivault verify`.
mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use proptest::prelude::*;
use rusqlite::Connection;
use serde_json::json;

/// The tables and the columns a change may touch (the cache counter `resource_epoch`
/// and the stored trees of older checkpoints, which nothing reads, are left out; the
/// index log is empty after the clean stop that merged it).
const TABLES: &[(&str, &[&str])] = &[
    ("meta", &["v", "mac"]),
    (
        "resource_version",
        &[
            "sealed",
            "deleted",
            "version",
            "updated_ms",
            "key_no",
            "rno",
        ],
    ),
    ("resource_no", &["rtype", "version", "deleted", "id"]),
    ("search_seg", &["data"]),
    ("data_key", &["wrapped", "key_id"]),
    ("audit_event", &["event", "hash"]),
    ("audit_head", &["size", "hash", "state", "signature"]),
    ("audit_checkpoint", &["root", "signature"]),
];

struct Fixture {
    /// (kept: its temporary directory holds the key provider's files)
    _server: Server,
    _tmp: tempfile::TempDir,
    data: PathBuf,
    older: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut s = Server::start();
        let t = s.token("system/*.cruds");
        let mut ids = Vec::new();
        for family in ["Propalpha", "Propbravo", "Propcharlie"] {
            let r = s.post(
                "Patient",
                &t,
                &json!({"resourceType": "Patient", "name": [{"family": family}],
                        "gender": "male", "birthDate": "1980-02-03"}),
            );
            assert_eq!(r.status, 201);
            ids.push(r.json()["id"].as_str().expect("id").to_owned());
        }
        let tmp = tempfile::tempdir().expect("tmp");
        s.stop();
        let older = tmp.path().join("older");
        copy_dir(&s.data, &older);
        s.restart();
        let t = s.token("system/*.cruds");
        let mut v2 = json!({"resourceType": "Patient", "name": [{"family": "Propalpha"}],
                            "gender": "other", "birthDate": "1980-02-03"});
        v2["id"] = json!(ids[0]);
        assert_eq!(
            s.put(&format!("Patient/{}", ids[0]), &t, &v2, &[]).status,
            200
        );
        assert!(matches!(
            s.delete(&format!("Patient/{}", ids[1]), &t).status,
            200 | 204
        ));
        let _ = s.add_client("system/Patient.rs");
        s.stop();
        let data = tmp.path().join("data");
        copy_dir(&s.data, &data);
        let (ok, text) = verify(&data);
        assert!(ok, "the untouched store verifies: {text}");
        Fixture {
            _server: s,
            _tmp: tmp,
            data,
            older,
        }
    })
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success());
}

fn verify(data: &Path) -> (bool, String) {
    let o = Command::new(BIN)
        .args(unlock_args(data))
        .args(["verify", "--data-dir"])
        .arg(data)
        .output()
        .expect("verify");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The rows of `table` as (rowid-less) value lists, in a fixed order.
fn rows(c: &Connection, table: &str) -> Vec<Vec<rusqlite::types::Value>> {
    let mut st = c
        .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))
        .expect("select");
    let n = st.column_count();
    st.query_map([], |r| (0..n).map(|i| r.get(i)).collect())
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

fn columns(c: &Connection, table: &str) -> Vec<String> {
    c.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
        .expect("info")
        .query_map([], |r| r.get(0))
        .expect("names")
        .collect::<Result<_, _>>()
        .expect("names")
}

/// `WHERE` matching row `row` exactly (every column).
fn where_row(cols: &[String]) -> String {
    cols.iter()
        .enumerate()
        .map(|(i, c)| format!("{c} IS ?{}", i + 1))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// A changed value of the same kind.
fn changed(v: &rusqlite::types::Value, pick: usize) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match v {
        V::Integer(i) => V::Integer(i.wrapping_add(1 + (pick % 3) as i64)),
        V::Blob(b) if !b.is_empty() => {
            let mut b = b.clone();
            let at = pick % b.len();
            b[at] ^= 1 << (pick % 8);
            V::Blob(b)
        }
        V::Blob(_) => V::Blob(vec![1]),
        V::Text(t) => V::Text(format!("{t}x")),
        V::Real(r) => V::Real(r + 1.0),
        V::Null => V::Integer(1),
    }
}

#[derive(Debug, Clone)]
enum Change {
    Edit { column: usize },
    Delete,
    Insert { column: usize },
    Restore,
}

/// Apply `change` to row `pick` of `table` in `db`; false when it changed nothing (the
/// case is then not counted).
fn apply(db: &Path, older: &Path, table: &str, change: &Change, pick: usize) -> bool {
    let c = Connection::open(db).expect("open");
    let cols = columns(&c, table);
    let all = rows(&c, table);
    if all.is_empty() {
        return false;
    }
    let row = &all[pick % all.len()];
    let w = where_row(&cols);
    let editable = TABLES
        .iter()
        .find(|(t, _)| *t == table)
        .map(|(_, cs)| *cs)
        .unwrap_or(&[]);
    match change {
        Change::Edit { column } => {
            let name = editable[column % editable.len()];
            let at = cols.iter().position(|c| c == name).expect("column");
            let new = changed(&row[at], pick);
            let mut params: Vec<rusqlite::types::Value> = vec![new];
            params.extend(row.iter().cloned());
            let w2 = cols
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c} IS ?{}", i + 2))
                .collect::<Vec<_>>()
                .join(" AND ");
            c.execute(
                &format!("UPDATE {table} SET {name} = ?1 WHERE {w2}"),
                rusqlite::params_from_iter(params),
            )
            .map(|n| n > 0)
            .unwrap_or(false)
        }
        Change::Delete => c
            .execute(
                &format!("DELETE FROM {table} WHERE {w}"),
                rusqlite::params_from_iter(row.iter()),
            )
            .map(|n| n > 0)
            .unwrap_or(false),
        Change::Insert { column } => {
            // a copy of the row under a changed key column (the first editable one that
            // makes it new)
            let name = editable[column % editable.len()];
            let at = cols.iter().position(|c| c == name).expect("column");
            let mut new = row.clone();
            new[0] = match &new[0] {
                rusqlite::types::Value::Integer(i) => rusqlite::types::Value::Integer(i + 1000),
                other => changed(other, pick),
            };
            new[at] = changed(&new[at], pick + 1);
            let marks = (1..=cols.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            c.execute(
                &format!("INSERT INTO {table} VALUES ({marks})"),
                rusqlite::params_from_iter(new.iter()),
            )
            .map(|n| n > 0)
            .unwrap_or(false)
        }
        Change::Restore => {
            // a row of the older copy that differs now (same first column) put back
            let old = Connection::open(older.join("phivault.db")).expect("older");
            let old_rows = rows(&old, table);
            // (an older checkpoint's stored tree is emptied once a newer one is written;
            // nothing reads it, so a row differing only there is not a change)
            let meaningful = |r: &Vec<rusqlite::types::Value>| -> Vec<rusqlite::types::Value> {
                cols.iter()
                    .zip(r)
                    .filter(|(c, _)| *c != "frontier")
                    .map(|(_, v)| v.clone())
                    .collect()
            };
            let now_rows: Vec<_> = all.iter().map(meaningful).collect();
            let candidates: Vec<&Vec<rusqlite::types::Value>> = old_rows
                .iter()
                .filter(|r| !now_rows.contains(&meaningful(r)))
                .collect();
            if candidates.is_empty() {
                return false;
            }
            let r = candidates[pick % candidates.len()];
            let marks = (1..=cols.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            c.execute(
                &format!("INSERT OR REPLACE INTO {table} VALUES ({marks})"),
                rusqlite::params_from_iter(r.iter()),
            )
            .map(|n| n > 0)
            .unwrap_or(false)
        }
    }
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0usize..8).prop_map(|column| Change::Edit { column }),
        Just(Change::Delete),
        (0usize..8).prop_map(|column| Change::Insert { column }),
        Just(Change::Restore),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_single_row_change_is_found_offline(
        table in 0usize..TABLES.len(),
        change in change(),
        pick in 0usize..10_000,
    ) {
        let f = fixture();
        let work = tempfile::tempdir().expect("work");
        let data = work.path().join("data");
        copy_dir(&f.data, &data);
        let (table, _) = TABLES[table];
        let db = data.join("phivault.db");
        prop_assume!(apply(&db, &f.older, table, &change, pick));
        let (ok, text) = verify(&data);
        prop_assert!(!ok, "{table} {change:?} (pick {pick}) went unnoticed: {text}");
        prop_assert!(text.contains("FAILED"), "{text}");
    }
}
