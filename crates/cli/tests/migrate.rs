//! `phivault migrate`: an embedded store with synthetic patients moves to PostgreSQL
//! without opening a record; the same data directory then serves every record and search
//! from the database, `verify` and `audit verify` accept it, and the database holds no PHI.
mod common;

use std::process::Command;

use common::*;
use phivault_store::postgres::testdb::TestDb;

#[test]
fn an_embedded_store_moves_to_postgres_and_serves_the_same_records() {
    // the source: the embedded default, as `serve` makes it on first run
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let launched = launch(&data);
    let mut s = Server::running(tmp, data, launched);
    let t = s.token("system/*.cruds");
    let bundles = s.load_synth(&t, 6, 2020);
    let mut refs: Vec<String> = bundles
        .iter()
        .flat_map(|(_, map)| map.values().cloned())
        .collect();
    refs.sort();
    let before: Vec<(String, serde_json::Value)> = refs
        .iter()
        .map(|r| {
            let got = s.get(r, &t);
            assert_eq!(got.status, 200);
            (r.clone(), got.json())
        })
        .collect();
    let family = before
        .iter()
        .find(|(r, _)| r.starts_with("Patient/"))
        .and_then(|(_, p)| p["name"][0]["family"].as_str().map(str::to_owned))
        .expect("a family name");
    let found = s.get(&format!("Patient?family={family}"), &t).json();
    assert!(found["entry"].as_array().is_some_and(|e| !e.is_empty()));

    // a running server's store is not moved
    let db = TestDb::new();
    let pwfile = database_password_file(&db, s.tmp.path());
    let migrate = |data: &std::path::Path| {
        let mut c = Command::new(BIN);
        c.args(["migrate", "--from"])
            .arg(data)
            .args(["--to", db.target.url(), "--database-password-file"])
            .arg(&pwfile);
        key_home(&mut c, data);
        c.output().expect("migrate")
    };
    let o = migrate(&s.data);
    assert!(!o.status.success(), "moved while serving");
    assert!(String::from_utf8_lossy(&o.stderr).contains("stop the server"));
    s.stop();
    let o = migrate(&s.data);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "migrate: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("the copy sums to it"), "{out}");
    assert!(s.data.join("database.json").exists());
    assert!(!s.db_path().exists(), "the embedded file is renamed");

    // the same directory serves the same records and searches from the database
    s.restart();
    let t = s.token("system/*.cruds");
    for (r, body) in &before {
        let got = s.get(r, &t);
        assert_eq!(got.status, 200, "{r}");
        assert_eq!(&got.json(), body, "{r}");
    }
    let again = s.get(&format!("Patient?family={family}"), &t).json();
    assert_eq!(
        again["entry"].as_array().map(Vec::len),
        found["entry"].as_array().map(Vec::len)
    );
    s.stop();
    let (ok, text) = s.audit_verify();
    assert!(ok, "{text}");
    let o = Command::new(BIN)
        .args(["verify", "--data-dir"])
        .arg(&s.data)
        .output()
        .expect("verify");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // only ciphertext reached the database
    let dump = store_bytes(&s);
    assert!(
        !contains(&dump, family.as_bytes()),
        "a family name in pg_dump's output"
    );
    // a second move into the same database is refused
    let o = migrate(&s.data);
    assert!(!o.status.success());
}
