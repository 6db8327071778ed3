//! Acceptance 3: tampered ciphertexts are reported as integrity errors, never returned as
//! data; an edited, deleted, truncated or reordered audit log fails `audit verify`, which
//! names the position.
mod common;
use common::*;

use rusqlite::{Connection, params};
use serde_json::{Value, json};

const SCOPE: &str = "system/*.cruds";

fn named_patient(family: &str, mrn: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "name": [{"family": family, "given": ["Integrity"]}],
        "birthDate": "1980-05-06",
        "identifier": [{"system": "urn:oid:1.2.3", "value": mrn}]
    })
}

fn create(s: &Server, t: &str, family: &str, mrn: &str) -> String {
    let r = s.post("Patient", t, &named_patient(family, mrn));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().expect("id").to_owned()
}

/// Stop the server, edit its database, start it again; returns a fresh token (the
/// token audience changes with the port).
fn tamper(s: &mut Server, edit: impl FnOnce(&Connection)) -> String {
    s.stop();
    {
        let c = Connection::open(s.db_path()).expect("open db");
        edit(&c);
    }
    s.restart();
    s.token(SCOPE)
}

fn has_column(c: &Connection, table: &str, column: &str) -> bool {
    let mut st = c
        .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
        .expect("table_info");
    let names: Vec<String> = st
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("names");
    names.iter().any(|n| n == column)
}

/// A logical id as the SQLite engine stores it (canonical UUIDs as 16 bytes).
fn db_id(id: &str) -> rusqlite::types::Value {
    match phivault_audit::uuid_bytes(id) {
        Some(b) => rusqlite::types::Value::Blob(b.to_vec()),
        None => rusqlite::types::Value::Text(id.to_owned()),
    }
}

fn sealed(c: &Connection, id: &str, version: i64) -> Vec<u8> {
    c.query_row(
        "SELECT sealed FROM resource_version WHERE rtype = 'Patient' AND id = ?1 AND version = ?2",
        params![db_id(id), version],
        |r| r.get(0),
    )
    .expect("sealed")
}

fn set_sealed(c: &Connection, id: &str, version: i64, bytes: &[u8]) {
    let n = c
        .execute(
            "UPDATE resource_version SET sealed = ?3 WHERE rtype = 'Patient' AND id = ?1 AND version = ?2",
            params![db_id(id), version, bytes],
        )
        .expect("update sealed");
    assert_eq!(n, 1);
}

/// A 5xx OperationOutcome that reveals none of `secrets`.
fn assert_integrity_error(r: &Resp, what: &str, secrets: &[&str]) {
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        (500..600).contains(&r.status),
        "{what}: expected an integrity error, got {}: {text}",
        r.status
    );
    assert!(r.is_outcome(), "{what}: not an OperationOutcome: {text}");
    assert_ne!(r.json()["resourceType"], "Patient", "{what}");
    assert_ne!(r.json()["resourceType"], "Bundle", "{what}");
    for sec in secrets {
        assert!(
            !contains(&r.body, sec.as_bytes()),
            "{what}: response reveals {sec:?}: {text}"
        );
    }
}

fn assert_reads_fine(s: &Server, t: &str, id: &str, family: &str) {
    let r = s.get(&format!("Patient/{id}"), t);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["name"][0]["family"], family);
}

/// Every way of reading `id` fails with an integrity error.
fn assert_unreadable(s: &Server, t: &str, id: &str, versions: &[u64], secrets: &[&str]) {
    assert_integrity_error(&s.get(&format!("Patient/{id}"), t), "read", secrets);
    for v in versions {
        assert_integrity_error(
            &s.get(&format!("Patient/{id}/_history/{v}"), t),
            &format!("vread {v}"),
            secrets,
        );
    }
    assert_integrity_error(
        &s.get(&format!("Patient/{id}/_history"), t),
        "history-instance",
        secrets,
    );
    assert_integrity_error(&s.get("Patient/_history", t), "history-type", secrets);
}

#[test]
fn flipped_ciphertext_byte_is_an_integrity_error() {
    let mut s = Server::start();
    let t = s.token(SCOPE);
    let a = create(&s, &t, "Flipalphafamily", "MRN-FLIP-A");
    let b = create(&s, &t, "Flipbravofamily", "MRN-FLIP-B");
    let c = create(&s, &t, "Flipcharliefamily", "MRN-FLIP-C");
    let t = tamper(&mut s, |db| {
        // a: one bit in the middle (ciphertext body); b: the last byte (tag).
        let mut x = sealed(db, &a, 1);
        let mid = x.len() / 2;
        x[mid] ^= 0x01;
        set_sealed(db, &a, 1, &x);
        let mut y = sealed(db, &b, 1);
        let last = y.len() - 1;
        y[last] ^= 0x80;
        set_sealed(db, &b, 1, &y);
    });
    assert_unreadable(&s, &t, &a, &[1], &["Flipalphafamily", "MRN-FLIP-A"]);
    assert_integrity_error(
        &s.get(&format!("Patient/{b}"), &t),
        "read b",
        &["Flipbravofamily", "MRN-FLIP-B"],
    );
    assert_reads_fine(&s, &t, &c, "Flipcharliefamily");
    let logs = String::from_utf8_lossy(&s.logs()).into_owned();
    for sec in ["Flipalphafamily", "Flipbravofamily", "MRN-FLIP-A"] {
        assert!(!logs.contains(sec), "log reveals {sec}");
    }
    // the failures are logged, without colour codes: standard error is not a terminal
    assert!(logs.contains("request failed"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in a log file: {logs:?}"
    );
    // The failed reads were audited and the chain is intact.
    s.stop();
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}

#[test]
fn ciphertexts_swapped_between_patients_are_integrity_errors() {
    let mut s = Server::start();
    let t = s.token(SCOPE);
    let a = create(&s, &t, "Swapalphafamily", "MRN-SWAP-A");
    let b = create(&s, &t, "Swapbravofamily", "MRN-SWAP-B");
    let c = create(&s, &t, "Swapcharliefamily", "MRN-SWAP-C");
    let t = tamper(&mut s, |db| {
        let (x, y) = (sealed(db, &a, 1), sealed(db, &b, 1));
        set_sealed(db, &a, 1, &y);
        set_sealed(db, &b, 1, &x);
    });
    let secrets = [
        "Swapalphafamily",
        "Swapbravofamily",
        "MRN-SWAP-A",
        "MRN-SWAP-B",
    ];
    assert_unreadable(&s, &t, &a, &[1], &secrets);
    assert_unreadable(&s, &t, &b, &[1], &secrets);
    assert_reads_fine(&s, &t, &c, "Swapcharliefamily");
}

#[test]
fn ciphertexts_swapped_between_versions_are_integrity_errors() {
    let mut s = Server::start();
    let t = s.token(SCOPE);
    let a = create(&s, &t, "Versionfirstfamily", "MRN-VER-A");
    let mut v2 = named_patient("Versionsecondfamily", "MRN-VER-A");
    v2["id"] = json!(a);
    let r = s.put(&format!("Patient/{a}"), &t, &v2, &[]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("etag"), Some("W/\"2\""));
    let c = create(&s, &t, "Versioncontrolfamily", "MRN-VER-C");
    let t = tamper(&mut s, |db| {
        let (x, y) = (sealed(db, &a, 1), sealed(db, &a, 2));
        set_sealed(db, &a, 1, &y);
        set_sealed(db, &a, 2, &x);
    });
    assert_unreadable(
        &s,
        &t,
        &a,
        &[1, 2],
        &["Versionfirstfamily", "Versionsecondfamily"],
    );
    assert_reads_fine(&s, &t, &c, "Versioncontrolfamily");
}

#[test]
fn key_id_moved_to_another_patients_key_is_an_integrity_error() {
    let mut s = Server::start();
    let t = s.token(SCOPE);
    let a = create(&s, &t, "Keyalphafamily", "MRN-KEY-A");
    let b = create(&s, &t, "Keybravofamily", "MRN-KEY-B");
    let t = tamper(&mut s, |db| {
        // The row names its data key by id (`key_id`) or by number (`key_no`).
        let col = if has_column(db, "resource_version", "key_no") {
            "key_no"
        } else {
            "key_id"
        };
        let key_of = |id: &str| -> rusqlite::types::Value {
            db.query_row(
                &format!("SELECT {col} FROM resource_version WHERE rtype = 'Patient' AND id = ?1"),
                params![db_id(id)],
                |r| r.get(0),
            )
            .expect("key of patient")
        };
        let (ka, kb) = (key_of(&a), key_of(&b));
        assert_ne!(ka, kb, "patients must have their own data keys");
        let n = db
            .execute(
                &format!(
                    "UPDATE resource_version SET {col} = ?2 WHERE rtype = 'Patient' AND id = ?1"
                ),
                params![db_id(&a), kb],
            )
            .expect("update key");
        assert_eq!(n, 1);
    });
    assert_unreadable(&s, &t, &a, &[1], &["Keyalphafamily", "MRN-KEY-A"]);
    assert_reads_fine(&s, &t, &b, "Keybravofamily");
}

// ---------------------------------------------------------------------------------------
// Audit log tampering.

/// A stopped server with a few dozen audit events; returns it and the number of events.
fn audited_server() -> (Server, i64) {
    let mut s = Server::start();
    let t = s.token(SCOPE);
    for i in 0..4 {
        let id = create(&s, &t, &format!("Auditfamily{i}"), &format!("MRN-AUD-{i}"));
        assert_eq!(s.get(&format!("Patient/{id}"), &t).status, 200);
        assert_eq!(s.get(&format!("Patient/{id}/_history"), &t).status, 200);
    }
    assert_eq!(s.get("Patient/no-such-id", &t).status, 404);
    s.stop();
    let (ok, msg) = s.audit_verify();
    assert!(ok, "untampered log must verify: {msg}");
    let n: i64 = Connection::open(s.db_path())
        .expect("db")
        .query_row("SELECT count(*) FROM audit_event", [], |r| r.get(0))
        .expect("count");
    assert!(n >= 10, "only {n} audit events");
    (s, n)
}

fn edit_db(s: &Server, edit: impl FnOnce(&Connection)) {
    let c = Connection::open(s.db_path()).expect("open db");
    edit(&c);
}

fn assert_fails_at(s: &Server, position: Option<i64>, what: &str) {
    let (ok, msg) = s.audit_verify();
    assert!(!ok, "{what}: audit verify passed: {msg}");
    assert!(msg.contains("FAILED"), "{what}: {msg}");
    if let Some(p) = position {
        assert!(
            msg.contains(&format!("position {p}:")) || msg.contains(&format!("position {p} ")),
            "{what}: output does not name position {p}: {msg}"
        );
    }
    println!("{what}: {}", msg.trim());
}

#[test]
fn untouched_audit_log_verifies() {
    let (s, n) = audited_server();
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
    assert!(msg.contains(&format!("{n} events")), "{msg}");
}

#[test]
fn edited_audit_event_fails_verify_naming_its_position() {
    let (s, n) = audited_server();
    let seq = n / 2;
    edit_db(&s, |c| {
        let mut ev: Vec<u8> = c
            .query_row(
                "SELECT event FROM audit_event WHERE seq = ?1",
                params![seq],
                |r| r.get(0),
            )
            .expect("event");
        // Change the recorded outcome; the event still decodes, only its hash disagrees.
        let mut decoded = phivault_audit::AuditEvent::decode(&ev).expect("stored event decodes");
        decoded.outcome = if decoded.outcome.http_status == 403 {
            phivault_audit::Outcome::from_http(200)
        } else {
            phivault_audit::Outcome::from_http(403)
        };
        ev = decoded.encode();
        assert!(phivault_audit::AuditEvent::decode(&ev).is_ok());
        c.execute(
            "UPDATE audit_event SET event = ?2 WHERE seq = ?1",
            params![seq, ev],
        )
        .expect("update");
    });
    assert_fails_at(&s, Some(seq), "edited event");
}

#[test]
fn deleted_middle_audit_event_fails_verify_naming_its_position() {
    let (s, n) = audited_server();
    let seq = n / 2;
    edit_db(&s, |c| {
        let k = c
            .execute("DELETE FROM audit_event WHERE seq = ?1", params![seq])
            .expect("delete");
        assert_eq!(k, 1);
    });
    assert_fails_at(&s, Some(seq), "deleted event");
}

#[test]
fn truncated_audit_log_fails_verify() {
    let (s, n) = audited_server();
    edit_db(&s, |c| {
        let k = c
            .execute("DELETE FROM audit_event WHERE seq > ?1", params![n - 2])
            .expect("delete");
        assert_eq!(k, 2);
    });
    assert_fails_at(&s, None, "truncated log");
}

#[test]
fn reordered_audit_events_fail_verify_naming_the_position() {
    let (s, n) = audited_server();
    let seq = n / 2;
    edit_db(&s, |c| {
        let row = |q: i64| -> (Vec<u8>, Vec<u8>) {
            c.query_row(
                "SELECT event, hash FROM audit_event WHERE seq = ?1",
                params![q],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("row")
        };
        let (e1, h1) = row(seq);
        let (e2, h2) = row(seq + 1);
        assert_ne!(e1, e2);
        let set = |q: i64, e: &[u8], h: &[u8]| {
            c.execute(
                "UPDATE audit_event SET event = ?2, hash = ?3 WHERE seq = ?1",
                params![q, e, h],
            )
            .expect("update");
        };
        set(seq, &e2, &h2);
        set(seq + 1, &e1, &h1);
    });
    assert_fails_at(&s, Some(seq), "reordered events");
}

// ---------------------------------------------------------------------------------------
// Signed checkpoints of the Merkle tree, and a witness that keeps them.

/// The audit key (Ed25519 PKCS#8) from the data directory: what an insider who copied the
/// master key could re-sign a forged log with.
fn audit_key(s: &Server) -> ring::signature::Ed25519KeyPair {
    let master = master_key_of(&s.data);
    let keys = phivault_crypto::KeyHierarchy::new(&master);
    let sealed = std::fs::read(s.data.join("keys/audit-signing.sealed")).expect("sealed key");
    let pkcs8 = keys.open_secret("audit-signing-v1", &sealed).expect("open");
    ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.expose()).expect("key")
}

/// Rewrite the whole log from `events` as a careful forger would: every chain hash
/// recomputed, the head and every checkpoint re-signed with the real audit key, the
/// checkpoints' roots recomputed — a log consistent with itself.
fn forge_log(s: &Server, events: &[Vec<u8>]) {
    use phivault_audit::merkle::{self, Checkpoint, Frontier};
    let key = audit_key(s);
    let c = Connection::open(s.db_path()).expect("db");
    let sizes: Vec<i64> = c
        .prepare("SELECT size FROM audit_checkpoint ORDER BY size")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .map(|r| r.expect("row"))
        .filter(|n| *n <= events.len() as i64)
        .collect();
    c.execute_batch(
        "DELETE FROM audit_event; DELETE FROM audit_checkpoint; DELETE FROM audit_head;",
    )
    .expect("clear");
    let mut hash = [0u8; 32];
    let mut f = Frontier::new();
    for (i, ev) in events.iter().enumerate() {
        let seq = i as u64 + 1;
        hash = phivault_audit::chain_hash(&hash, seq, ev);
        c.execute(
            "INSERT INTO audit_event (seq, event, hash) VALUES (?1, ?2, ?3)",
            params![seq as i64, ev, hash.as_slice()],
        )
        .expect("insert");
        f.push(merkle::leaf_hash(ev));
        if sizes.contains(&(seq as i64)) {
            let root = f.root();
            let sig = key.sign(&Checkpoint::signing_message(seq, &root, 1));
            c.execute(
                "INSERT INTO audit_checkpoint (size, root, time_ms, signature, frontier) VALUES (?1, ?2, 1, ?3, ?4)",
                params![seq as i64, root.as_slice(), sig.as_ref(), f.to_bytes()],
            )
            .expect("checkpoint");
        }
    }
    let head = phivault_audit::ChainHead {
        size: events.len() as u64,
        hash,
    };
    let sig = key.sign(&head.signing_message());
    c.execute(
        "INSERT INTO audit_head (one, size, hash, signature) VALUES (1, ?1, ?2, ?3)",
        params![head.size as i64, hash.as_slice(), sig.as_ref()],
    )
    .expect("head");
}

fn events_of(s: &Server) -> Vec<Vec<u8>> {
    Connection::open(s.db_path())
        .expect("db")
        .prepare("SELECT event FROM audit_event ORDER BY seq")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

fn verify_with(s: &Server, witness: &std::path::Path) -> (bool, String) {
    let o = std::process::Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(&s.data)
        .arg("--witness")
        .arg(witness)
        .output()
        .expect("audit verify");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn a_witness_catches_a_re_signed_forgery_and_a_rollback_of_the_whole_log() {
    // two bursts of requests, the second after the first is witnessed: two checkpoints or
    // more; the server appends each to a witness file on "another volume" as it is signed
    // (checkpoints every 100 ms here instead of 2 s, so nobody waits)
    let witness_dir = tempfile::tempdir().expect("tmp");
    let witness = witness_dir.path().join("audit.witness");
    let mut s = Server::start_with_args(&[
        "--witness-file",
        witness.to_str().expect("path"),
        "--checkpoint-every-ms",
        "100",
    ]);
    let witnessed = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let lines = std::fs::read_to_string(&witness).map_or(0, |t| t.lines().count());
            if lines >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{lines} checkpoints witnessed"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let t = s.token(SCOPE);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(create(
            &s,
            &t,
            &format!("Witnessfamily{i}"),
            &format!("MRN-W-{i}"),
        ));
    }
    witnessed(1);
    for id in &ids {
        assert_eq!(s.get(&format!("Patient/{id}"), &t).status, 200);
    }
    witnessed(2);
    s.stop();
    let (ok, msg) = s.audit_verify();
    assert!(ok && msg.contains("checkpoints"), "{msg}");
    // the operator exports the checkpoints to another volume
    let o = std::process::Command::new(BIN)
        .args(["audit", "checkpoints", "--data-dir"])
        .arg(&s.data)
        .output()
        .expect("checkpoints");
    assert!(o.status.success());
    let lines = String::from_utf8(o.stdout).expect("utf8");
    assert!(lines.lines().count() >= 2, "{lines}");
    // what the server exported while it ran is what the operator's export says (the last
    // checkpoint, written as the server stopped, may not have been exported yet)
    let exported = std::fs::read_to_string(&witness).expect("witness written by the server");
    assert!(exported.lines().count() >= 2, "{exported}");
    assert!(lines.starts_with(&exported), "{exported}\nvs\n{lines}");
    std::fs::write(&witness, &lines).expect("witness");
    let (ok, msg) = verify_with(&s, &witness);
    assert!(ok, "{msg}");
    let events = events_of(&s);

    // 1. an insider with the keys edits one event and re-signs everything: the log is
    //    consistent with itself, so only the witness can tell
    let mut forged = events.clone();
    let victim = 2;
    let mut ev = phivault_audit::AuditEvent::decode(&forged[victim]).expect("decode");
    ev.source = "203.0.113.9".into();
    forged[victim] = ev.encode();
    forge_log(&s, &forged);
    let (ok, msg) = s.audit_verify();
    assert!(ok, "a re-signed forgery fools the log alone: {msg}");
    let (ok, msg) = verify_with(&s, &witness);
    assert!(
        !ok && msg.contains("witnessed checkpoint") && msg.contains("does not match"),
        "{msg}"
    );

    // 2. the same insider rolls the log back to before the second burst
    let first: u64 = lines
        .lines()
        .next()
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("first checkpoint size");
    forge_log(&s, &events[..first as usize]);
    let (ok, msg) = s.audit_verify();
    assert!(ok, "a re-signed truncation fools the log alone: {msg}");
    let (ok, msg) = verify_with(&s, &witness);
    assert!(!ok && msg.contains("beyond the log"), "{msg}");

    // 3. restored: the witness agrees again; a forged witness line is refused
    forge_log(&s, &events);
    let (ok, msg) = verify_with(&s, &witness);
    assert!(ok, "{msg}");
    let mut bad = lines.clone();
    bad = bad.replacen(' ', " 1", 1);
    std::fs::write(&witness, bad).expect("witness");
    let (ok, msg) = verify_with(&s, &witness);
    assert!(!ok && msg.contains("FAILED"), "{msg}");
}
