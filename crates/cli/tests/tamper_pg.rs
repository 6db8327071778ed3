//! A storage writer with write access to the PostgreSQL database (an insider, a stolen
//! database credential) changes rows; the real binary refuses to serve, sign or start on
//! what it did not write, and `audit verify` / `verify` name what changed.
//!
//! Real components: the `phivault` binary on a fresh database of the test run's cluster
//! (or one of this test's own); the edits are made with Debian's `psql`, as the attacker.
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use phivault_store::postgres::testdb::TestDb;
use serde_json::json;

const SCOPE: &str = "system/*.cruds";

fn person(family: &str) -> serde_json::Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "gender": "female",
           "birthDate": "1970-01-02"})
}

struct Fixture {
    db: TestDb,
    s: Server,
    t: String,
    /// A patient at version 2.
    a: String,
    /// Another patient.
    b: String,
}

fn fixture(serve_args: &[&str]) -> Fixture {
    let db = TestDb::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let pwfile = database_password_file(&db, tmp.path());
    let mut c = Command::new(BIN);
    c.args(["init", "--data-dir"])
        .arg(&data)
        .args(["--database", db.target.url(), "--database-password-file"])
        .arg(&pwfile);
    key_home(&mut c, &data);
    let o = c.output().expect("init");
    assert!(
        o.status.success(),
        "init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let launched = launch_with(&data, serve_args);
    let s = Server::running(tmp, data, launched);
    let t = s.token(SCOPE);
    let created = |r: Resp| -> String {
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().expect("id").to_owned()
    };
    let a = created(s.post("Patient", &t, &person("Tamperalpha")));
    let mut v2 = person("Tamperalpha");
    v2["id"] = json!(a);
    v2["gender"] = json!("other");
    assert_eq!(s.put(&format!("Patient/{a}"), &t, &v2, &[]).status, 200);
    let b = created(s.post("Patient", &t, &person("Tamperbravo")));
    Fixture { db, s, t, a, b }
}

/// A 5xx integrity OperationOutcome that shows nothing of the record.
fn assert_integrity_error(r: &Resp, what: &str) {
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 500, "{what}: {text}");
    assert!(r.is_outcome(), "{what}: {text}");
    assert!(text.contains("integrity"), "{what}: {text}");
    assert!(!text.contains("Tamperalpha"), "{what}: {text}");
}

fn verify(s: &Server) -> (bool, String) {
    let o = Command::new(BIN)
        .args(["verify", "--data-dir"])
        .arg(&s.data)
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

fn await_log(s: &Server, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&s.logs()).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the server never logged {needle:?}: {}",
            String::from_utf8_lossy(&s.logs())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_edited_ciphertext_is_refused_as_read_found_by_the_check_and_by_verify() {
    let mut f = fixture(&["--verify-every", "1"]);
    let a = f.a.clone();
    f.db.sql(&format!(
        "UPDATE resource_version SET sealed = overlay(sealed placing '\\x00'::bytea from 20) \
         WHERE rtype = 'Patient' AND id = '{a}' AND version = 2"
    ));
    assert_integrity_error(&f.s.get(&format!("Patient/{a}"), &f.t), "read");
    assert_integrity_error(&f.s.get(&format!("Patient/{a}/_history/2"), &f.t), "vread");
    // the rest is served
    assert_eq!(f.s.get(&format!("Patient/{}", f.b), &f.t).status, 200);
    await_log(&f.s, "storage was changed outside phivault finding=");
    f.s.stop();
    let (ok, text) = verify(&f.s);
    assert!(!ok, "{text}");
    assert!(text.contains("is not the one phivault wrote"), "{text}");
}

#[test]
fn a_record_rolled_back_with_its_head_stops_the_next_start() {
    let mut f = fixture(&[]);
    let t = f.t.clone();
    let r = f.s.post("Patient", &t, &person("Tampercharlie"));
    assert_eq!(r.status, 201);
    let c = r.json()["id"].as_str().expect("id").to_owned();
    // the attacker keeps the head row of version 1 (a dump), with its valid MAC ...
    let kept = f.db.sql(&format!(
        "SELECT encode(mac, 'hex') FROM resource_head WHERE id = '{c}'"
    ));
    let mut v2 = person("Tampercharlie");
    v2["id"] = json!(c);
    v2["gender"] = json!("other");
    assert_eq!(f.s.put(&format!("Patient/{c}"), &t, &v2, &[]).status, 200);
    f.s.stop();
    // ... and later puts version 1 back: every row it leaves carries a valid MAC
    f.db.sql(&format!(
        "DELETE FROM resource_version WHERE id = '{c}' AND version = 2; \
         UPDATE resource_head SET version = 1, mac = decode('{}', 'hex') WHERE id = '{c}'",
        kept.trim()
    ));
    assert_start_refused(
        &mut f.s,
        "the resources' heads differ from the signed state",
    );
    let (ok, text) = verify(&f.s);
    assert!(!ok, "{text}");
}

#[test]
fn an_inserted_client_gets_no_token_and_an_edited_audit_event_is_named_by_verify() {
    let mut f = fixture(&[]);
    // a client row of the attacker's choosing, with a MAC it cannot compute
    let (private, public) = phivault_auth::generate_es384_jwk("forged-1").expect("jwk");
    let record = json!({"client_id": "forged", "name": "forged", "jwks": [public],
                        "scopes": "system/*.cruds", "disabled": false});
    f.db.sql(&format!(
        "INSERT INTO meta (k, v, mac) VALUES ('client:forged', convert_to('{}', 'UTF8'), '\\x00')",
        record.to_string().replace('\'', "''")
    ));
    let creds = Creds {
        client_id: "forged".into(),
        private_jwk: private.to_json_string().expect("jwk").to_string(),
    };
    let a = f.s.assertion(&creds, &f.s.token_url(), &rand_hex());
    let r = f.s.token_request(&a, SCOPE);
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    f.s.stop();
    // the next start refuses the store
    assert_start_refused(
        &mut f.s,
        "settings row client:forged is not the one last written",
    );
    f.db.sql("DELETE FROM meta WHERE k = 'client:forged'");
    // an audit event edited in the middle of the log: verify names its position
    let seq: u64 =
        f.db.sql("SELECT max(seq) / 2 FROM audit_event")
            .trim()
            .parse()
            .expect("seq");
    let ev = f.db.sql(&format!(
        "SELECT encode(event, 'hex') FROM audit_event WHERE seq = {seq}"
    ));
    let bytes: Vec<u8> = (0..ev.trim().len() / 2)
        .map(|i| u8::from_str_radix(&ev.trim()[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let mut decoded = phivault_audit::AuditEvent::decode(&bytes).expect("decodes");
    decoded.outcome = phivault_audit::Outcome::from_http(if decoded.outcome.http_status == 403 {
        200
    } else {
        403
    });
    let hex: String = decoded
        .encode()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    f.db.sql(&format!(
        "UPDATE audit_event SET event = decode('{hex}', 'hex') WHERE seq = {seq}"
    ));
    let (ok, text) = f.s.audit_verify();
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("position {seq}")),
        "verify names the position: {text}"
    );
}
