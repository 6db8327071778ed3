//! Issue 18: a writer of the storage — who can write the SQLite file but holds neither
//! the master key nor the audit key — cannot roll back, hide, forge or launder. Each case
//! edits the real database of the real binary and asserts the exact outcome: the server
//! refuses to start (naming why), refuses the affected request (a 5xx OperationOutcome,
//! the rest still served), or finds it in its background check (logged and raised as an
//! alert); and `phivault verify` names the discrepancy.
mod common;
use common::*;

use std::process::Command;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use serde_json::{Value, json};

const SCOPE: &str = "system/*.cruds";

/// A server with: patient `a` updated once (version 2) with an observation `obs`, and
/// patient `b`.
struct Fixture {
    s: Server,
    t: String,
    a: String,
    b: String,
    obs: String,
}

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "gender": "female",
           "birthDate": "1970-01-02"})
}

fn fixture(args: &[&str]) -> Fixture {
    let s = Server::start_with_args(args);
    let t = s.token(SCOPE);
    let created = |r: Resp| -> String {
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()["id"].as_str().expect("id").to_owned()
    };
    let a = created(s.post("Patient", &t, &patient("Tamperalpha")));
    let mut v2 = patient("Tamperalpha");
    v2["id"] = json!(a);
    v2["gender"] = json!("other");
    let r = s.put(&format!("Patient/{a}"), &t, &v2, &[]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let obs = created(s.post(
        "Observation",
        &t,
        &json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": format!("Patient/{a}")},
                "valueQuantity": {"value": 72, "unit": "/min"}}),
    ));
    let b = created(s.post("Patient", &t, &patient("Tamperbravo")));
    Fixture { s, t, a, b, obs }
}

/// A logical id as the SQLite engine stores it (canonical UUIDs as 16 bytes).
fn db_id(id: &str) -> rusqlite::types::Value {
    match phivault_audit::uuid_bytes(id) {
        Some(b) => rusqlite::types::Value::Blob(b.to_vec()),
        None => rusqlite::types::Value::Text(id.to_owned()),
    }
}

fn db(s: &Server) -> Connection {
    let c = Connection::open(s.db_path()).expect("open db");
    c.busy_timeout(Duration::from_secs(10)).expect("busy");
    c
}

/// `phivault verify` on the data directory: (passed, output).
fn verify(s: &Server, extra: &[&str]) -> (bool, String) {
    let o = Command::new(BIN)
        .args(unlock_args(&s.data))
        .args(["verify", "--data-dir"])
        .arg(&s.data)
        .args(extra)
        .output()
        .expect("verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn assert_verify_finds(s: &Server, wants: &[&str]) {
    let (ok, text) = verify(s, &[]);
    assert!(!ok, "verify passed a tampered store: {text}");
    assert!(text.contains("verify: FAILED"), "{text}");
    for w in wants {
        assert!(text.contains(w), "verify does not name {w:?}: {text}");
    }
    for secret in ["Tamperalpha", "Tamperbravo", "1970-01-02"] {
        assert!(!text.contains(secret), "verify printed PHI: {text}");
    }
}

/// A 5xx integrity OperationOutcome.
fn assert_integrity_error(r: &Resp, what: &str) {
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 500, "{what}: {text}");
    assert!(r.is_outcome(), "{what}: {text}");
    assert!(text.contains("integrity"), "{what}: {text}");
    assert!(!text.contains("Tamperalpha"), "{what}: {text}");
}

/// Wait until the server's log holds `needle` (the store check's finding).
fn await_log(s: &Server, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = String::from_utf8_lossy(&s.logs()).into_owned();
        if log.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server never logged {needle:?}: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The background check and `verify` both find the body changed (stops the server).
fn body_differs_online_and_offline(s: &mut Server) {
    const BODY: &str = "stored versions, index postings, data keys or KEK generations differ from the signed state";
    await_log(s, BODY);
    s.stop();
    assert_verify_finds(s, &[BODY]);
}

fn stop_and_edit(s: &mut Server, edit: impl FnOnce(&Connection)) {
    s.stop();
    edit(&db(s));
}

#[test]
fn a_version_rolled_back_is_refused_on_read_found_by_the_check_and_named_by_verify() {
    let mut f = fixture(&["--verify-every", "1"]);
    let a = f.a.clone();
    stop_and_edit(&mut f.s, |c| {
        let n = c
            .execute(
                "DELETE FROM resource_version WHERE rtype = 'Patient' AND id = ?1 AND version = 2",
                params![db_id(&a)],
            )
            .expect("delete");
        assert_eq!(n, 1);
    });
    f.s.restart_with(&["--verify-every", "1"]);
    let t = f.s.token(SCOPE);
    assert_integrity_error(&f.s.get(&format!("Patient/{a}"), &t), "read");
    assert_integrity_error(&f.s.get(&format!("Patient/{a}/_history"), &t), "history");
    // the rest is served
    let r = f.s.get(&format!("Patient/{}", f.b), &t);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    await_log(
        &f.s,
        "stored versions, index postings, data keys or KEK generations differ",
    );
    await_log(&f.s, &format!("Patient/{a}"));
    f.s.stop();
    assert_verify_finds(
        &f.s,
        &[&format!("Patient/{a} version 2: committed but missing")],
    );
}

#[test]
fn a_record_rolled_back_with_its_head_stops_the_server_from_starting() {
    let mut f = fixture(&[]);
    let a = f.a.clone();
    stop_and_edit(&mut f.s, |c| {
        c.execute(
            "DELETE FROM resource_version WHERE rtype = 'Patient' AND id = ?1 AND version = 2",
            params![db_id(&a)],
        )
        .expect("delete");
        c.execute(
            "UPDATE resource_no SET version = 1 WHERE rtype = 'Patient' AND id = ?1",
            params![db_id(&a)],
        )
        .expect("head");
    });
    assert_start_refused(&mut f.s, "current versions differ from the signed state");
    assert_verify_finds(
        &f.s,
        &[&format!("Patient/{a} version 2: committed but missing")],
    );
}

#[test]
fn rows_deleted_outright_and_a_forged_tombstone_are_refused_and_named() {
    let mut f = fixture(&[]);
    let (a, b, obs) = (f.a.clone(), f.b.clone(), f.obs.clone());
    stop_and_edit(&mut f.s, |c| {
        // the observation's rows, gone; b gets a tombstone it never had
        c.execute(
            "DELETE FROM resource_version WHERE rtype = 'Observation' AND id = ?1",
            params![db_id(&obs)],
        )
        .expect("delete");
        c.execute(
            "INSERT INTO resource_version (rtype, id, version, key_no, deleted, updated_ms, sealed, rno) \
             SELECT rtype, id, 2, key_no, 1, updated_ms + 1, x'', rno FROM resource_version \
             WHERE rtype = 'Patient' AND id = ?1 AND version = 1",
            params![db_id(&b)],
        )
        .expect("tombstone");
    });
    f.s.restart();
    let t = f.s.token(SCOPE);
    assert_integrity_error(&f.s.get(&format!("Observation/{obs}"), &t), "deleted read");
    assert_integrity_error(&f.s.get(&format!("Patient/{b}"), &t), "tombstone read");
    assert_integrity_error(
        &f.s.get(&format!("Observation?subject=Patient/{a}"), &t),
        "a search reaching the deleted row",
    );
    // other records and searches are served
    let r = f.s.get(&format!("Patient/{a}"), &t);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = f.s.get("Patient?gender=other", &t);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // the refusals were raised as findings
    await_log(&f.s, "storage was changed outside phivault");
    f.s.stop();
    assert_verify_finds(
        &f.s,
        &[
            &format!("Observation/{obs} version 1: committed but missing"),
            &format!("Patient/{b} version 2: stored but never committed"),
        ],
    );
}

#[test]
fn swapped_ciphertexts_are_named_by_verify() {
    let mut f = fixture(&[]);
    let (a, b) = (f.a.clone(), f.b.clone());
    stop_and_edit(&mut f.s, |c| {
        let get = |id: &str, v: i64| -> Vec<u8> {
            c.query_row(
                "SELECT sealed FROM resource_version WHERE rtype = 'Patient' AND id = ?1 AND version = ?2",
                params![db_id(id), v],
                |r| r.get(0),
            )
            .expect("sealed")
        };
        let (x, y) = (get(&a, 2), get(&b, 1));
        for (id, v, bytes) in [(&a, 2, &y), (&b, 1, &x)] {
            c.execute(
                "UPDATE resource_version SET sealed = ?3 WHERE rtype = 'Patient' AND id = ?1 AND version = ?2",
                params![db_id(id), v, bytes],
            )
            .expect("swap");
        }
    });
    f.s.restart();
    let t = f.s.token(SCOPE);
    assert_integrity_error(&f.s.get(&format!("Patient/{a}"), &t), "swapped a");
    assert_integrity_error(&f.s.get(&format!("Patient/{b}"), &t), "swapped b");
    f.s.stop();
    assert_verify_finds(
        &f.s,
        &[
            &format!("Patient/{a} version 2: not what was committed"),
            &format!("Patient/{b} version 1: not what was committed"),
        ],
    );
}

#[test]
fn a_deleted_index_segment_is_found_by_the_background_check_and_by_verify() {
    let mut f = fixture(&["--verify-every", "1"]);
    stop_and_edit(&mut f.s, |c| {
        let n = c.execute("DELETE FROM search_seg", []).expect("segments");
        let m = c.execute("DELETE FROM index_log", []).expect("log");
        assert!(n + m > 0, "no postings to delete");
    });
    f.s.restart_with(&["--verify-every", "1"]);
    body_differs_online_and_offline(&mut f.s);
}

#[test]
fn a_cut_emptied_or_rewritten_audit_log_stops_the_server_from_starting() {
    // the tail cut
    let mut f = fixture(&[]);
    stop_and_edit(&mut f.s, |c| {
        c.execute(
            "DELETE FROM audit_event WHERE seq > (SELECT max(seq) - 3 FROM audit_event)",
            [],
        )
        .expect("cut");
    });
    assert_start_refused(&mut f.s, "but its signed head is at event");
    let (ok, text) = verify(&f.s, &[]);
    assert!(!ok && text.contains("audit log: FAILED"), "{text}");

    // every audit table emptied
    let mut f = fixture(&[]);
    stop_and_edit(&mut f.s, |c| {
        c.execute_batch(
            "DELETE FROM audit_event; DELETE FROM audit_head; DELETE FROM audit_checkpoint;",
        )
        .expect("empty");
    });
    assert_start_refused(&mut f.s, "holds records but no audit log");
    let (ok, text) = f.s.audit_verify();
    assert!(!ok && text.contains("no audit log"), "{text}");
    let (ok, text) = verify(&f.s, &[]);
    assert!(!ok, "{text}");

    // one event removed and the unkeyed chain recomputed, the signed head and checkpoints
    // dropped
    let mut f = fixture(&[]);
    stop_and_edit(&mut f.s, |c| {
        c.execute("DELETE FROM audit_event WHERE seq = 2", [])
            .expect("remove");
        let rows: Vec<(i64, Vec<u8>)> = c
            .prepare("SELECT seq, event FROM audit_event ORDER BY seq")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        c.execute("DELETE FROM audit_event", []).expect("clear");
        let mut head = phivault_audit::ChainHead::EMPTY;
        for (_, event) in rows {
            let hash = head.append(&event);
            c.execute(
                "INSERT INTO audit_event (seq, event, hash) VALUES (?1, ?2, ?3)",
                params![head.size as i64, event, hash.as_slice()],
            )
            .expect("insert");
        }
        c.execute_batch("DELETE FROM audit_head; DELETE FROM audit_checkpoint;")
            .expect("drop head");
    });
    assert_start_refused(&mut f.s, "the audit log has events but no signed head");
    let (ok, text) = f.s.audit_verify();
    assert!(!ok, "{text}");
}

/// A client row with a chosen record (its own key, every scope); its credentials.
fn forged_client(c: &Connection, id: &str) -> Creds {
    let (private, public) = phivault_auth::generate_es384_jwk(&format!("{id}-1")).expect("jwk");
    let record = json!({"client_id": id, "name": "forged", "jwks": [public],
                        "scopes": "system/*.cruds", "disabled": false});
    c.execute(
        "INSERT INTO meta (k, v) VALUES (?1, ?2)",
        params![
            format!("client:{id}"),
            serde_json::to_vec(&record).expect("json")
        ],
    )
    .expect("insert client");
    Creds {
        client_id: id.to_owned(),
        private_jwk: private.to_json_string().expect("private jwk").to_string(),
    }
}

#[test]
fn an_inserted_client_row_gets_no_token_and_stops_the_next_start() {
    let mut f = fixture(&[]);
    // while the server runs: the row is refused where it is read, and raised
    let creds = f.s.add_client(SCOPE);
    let forged = forged_client(&db(&f.s), "evil-running");
    let url = f.s.token_url();
    let r =
        f.s.token_request(&f.s.assertion(&forged, &url, &rand_hex()), SCOPE);
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    await_log(&f.s, "settings row client:evil-running");
    // a legitimate client still gets its token
    let _ = f.s.token_for(&creds, SCOPE);
    assert_start_refused(
        &mut f.s,
        "settings row client:evil-running has no valid MAC",
    );
    assert_verify_finds(&f.s, &["settings row client:evil-running: no valid MAC"]);
}

#[test]
fn a_disabled_client_restored_from_an_older_copy_stays_disabled() {
    let mut f = fixture(&[]);
    let creds = f.s.add_client(SCOPE);
    let key = format!("client:{}", creds.client_id);
    let old: (Vec<u8>, Vec<u8>) = db(&f.s)
        .query_row("SELECT v, mac FROM meta WHERE k = ?1", [&key], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("client row");
    let _ = f.s.token_for(&creds, SCOPE);
    let o = Command::new(BIN)
        .args(unlock_args(&f.s.data))
        .args(["client", "disable", "--data-dir"])
        .arg(&f.s.data)
        .args(["--client-id", &creds.client_id])
        .output()
        .expect("disable");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let url = f.s.token_url();
    let r =
        f.s.token_request(&f.s.assertion(&creds, &url, &rand_hex()), SCOPE);
    assert_eq!(
        r.status,
        401,
        "disabled: {}",
        String::from_utf8_lossy(&r.body)
    );
    // the enabled row, MAC and all, put back while the server runs
    db(&f.s)
        .execute(
            "UPDATE meta SET v = ?2, mac = ?3 WHERE k = ?1",
            params![key, old.0, old.1],
        )
        .expect("restore");
    let r =
        f.s.token_request(&f.s.assertion(&creds, &url, &rand_hex()), SCOPE);
    assert_eq!(
        r.status,
        401,
        "restored: {}",
        String::from_utf8_lossy(&r.body)
    );
    await_log(
        &f.s,
        &format!("settings row {key} is not the one phivault last wrote"),
    );
    assert_start_refused(&mut f.s, "the settings rows differ from the signed state");
    assert_verify_finds(
        &f.s,
        &[&format!("settings row {key}: not the value last committed")],
    );
}

#[test]
fn edited_settings_stop_the_next_start() {
    for (key, value) in [("search.index_bits", "8"), ("snoop:position", "999999")] {
        let mut f = fixture(&[]);
        // (the scan position exists once a scan ran)
        let o = Command::new(BIN)
            .args(unlock_args(&f.s.data))
            .args(["audit", "scan", "--data-dir"])
            .arg(&f.s.data)
            .output()
            .expect("scan");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        stop_and_edit(&mut f.s, |c| {
            let n = c
                .execute(
                    "UPDATE meta SET v = ?2 WHERE k = ?1",
                    params![key, value.as_bytes()],
                )
                .expect("edit");
            assert_eq!(n, 1, "{key}");
        });
        assert_start_refused(&mut f.s, &format!("settings row {key} has no valid MAC"));
        assert_verify_finds(&f.s, &[&format!("settings row {key}: no valid MAC")]);
    }
}

#[test]
fn a_database_rolled_back_past_the_witness_stops_the_server_from_starting() {
    let tmp = tempfile::tempdir().expect("tmp");
    let witness = tmp.path().join("witness.txt");
    let w = witness.to_str().expect("path").to_owned();
    let args = ["--witness-file", w.as_str(), "--checkpoint-every-ms", "50"];
    let mut f = fixture(&args);
    f.s.stop();
    let copy = tmp.path().join("old.db");
    std::fs::copy(f.s.db_path(), &copy).expect("copy");
    f.s.restart_with(&args);
    let t = f.s.token(SCOPE);
    let before = std::fs::read_to_string(&witness).unwrap_or_default();
    for _ in 0..3 {
        let r = f.s.post("Patient", &t, &patient("Tamperlater"));
        assert_eq!(r.status, 201);
    }
    // the witness has a checkpoint of those writes
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&witness).unwrap_or_default() == before {
        assert!(
            Instant::now() < deadline,
            "no checkpoint reached the witness"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    f.s.stop();
    // the whole database put back as it was before those writes
    std::fs::copy(&copy, f.s.db_path()).expect("roll back");
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(f.s.data.join(format!("phivault.db{ext}")));
    }
    let mut c = Command::new(BIN);
    c.args(["serve", "--data-dir"])
        .arg(&f.s.data)
        .args(["--listen", "127.0.0.1:0"])
        .args(args);
    key_home(&mut c, &f.s.data);
    match try_spawn_server(c) {
        Ok(_) => panic!("the server started on a database older than its witness"),
        Err(e) => assert!(
            e.contains("does not hold the witness's newest checkpoint"),
            "{e}"
        ),
    }
    let (ok, text) = verify(&f.s, &["--witness", &w]);
    assert!(!ok, "{text}");
    // every witness line names the key it verifies with; a line naming another is refused
    let lines = std::fs::read_to_string(&witness).expect("witness");
    assert!(
        lines.lines().all(|l| l
            .split_whitespace()
            .nth(4)
            .is_some_and(|k| k.starts_with("ed25519:"))),
        "{lines}"
    );
    let other = tmp.path().join("other-key.txt");
    let first = lines.lines().next().expect("a line");
    let (cp, _) = first.rsplit_once(' ').expect("fields");
    std::fs::write(&other, format!("{cp} ed25519:{}\n", "ab".repeat(32))).expect("write");
    let (ok, text) = verify(&f.s, &["--witness", other.to_str().expect("path")]);
    assert!(!ok && text.contains("names another key"), "{text}");
}

#[test]
fn an_untampered_store_verifies() {
    let mut f = fixture(&[]);
    let _ = f.s.get(&format!("Patient/{}", f.a), &f.t);
    f.s.stop();
    let (ok, text) = verify(&f.s, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("verify: OK"), "{text}");
}

#[test]
fn an_edited_resource_number_neither_hides_records_nor_aims_an_erasure_elsewhere() {
    let mut f = fixture(&["--verify-every", "1"]);
    let (a, t) = (f.a.clone(), f.t.clone());
    let mut obs = vec![f.obs.clone()];
    for v in [60, 61] {
        let r = f.s.post(
            "Observation",
            &t,
            &json!({"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": format!("Patient/{a}")},
                    "valueQuantity": {"value": v, "unit": "/min"}}),
        );
        assert_eq!(r.status, 201);
        obs.push(r.json()["id"].as_str().expect("id").to_owned());
    }
    // while the server runs: the first observation's stored number pointed elsewhere
    let n = db(&f.s)
        .execute(
            "UPDATE resource_version SET rno = 0 WHERE rtype = 'Observation' AND id = ?1",
            params![db_id(&obs[0])],
        )
        .expect("edit");
    assert_eq!(n, 1);
    // paging one at a time still lists each observation once, then ends
    let mut seen = Vec::new();
    let mut url = format!("Observation?subject=Patient/{a}&_count=1");
    for _ in 0..10 {
        let r = f.s.get(&url, &t);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let b = r.json();
        for e in b["entry"].as_array().into_iter().flatten() {
            seen.push(e["resource"]["id"].as_str().expect("id").to_owned());
        }
        match b["link"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["relation"] == "next"))
        {
            Some(next) => {
                let u = next["url"].as_str().expect("url");
                url = u
                    .strip_prefix(&format!("{}/", f.s.base))
                    .expect("own base")
                    .to_owned();
            }
            None => break,
        }
    }
    seen.sort();
    obs.sort();
    assert_eq!(seen, obs, "every observation once");
    body_differs_online_and_offline(&mut f.s);
}

#[test]
fn a_row_the_check_cannot_read_is_a_finding_not_the_end_of_checking() {
    let mut f = fixture(&["--verify-every", "1"]);
    let a = f.a.clone();
    db(&f.s)
        .execute(
            "UPDATE resource_no SET version = 'x' WHERE rtype = 'Patient' AND id = ?1",
            params![db_id(&a)],
        )
        .expect("edit");
    await_log(&f.s, "not in the form phivault writes");
    // the store check goes on: a later deletion is found too
    db(&f.s)
        .execute("DELETE FROM search_seg", [])
        .expect("segments");
    f.s.stop();
    let (ok, text) = verify(&f.s, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("not in the form phivault writes"), "{text}");
}

#[test]
fn everything_reports_a_damaged_record_in_its_place_and_completes() {
    let mut f = fixture(&[]);
    let (a, obs) = (f.a.clone(), f.obs.clone());
    stop_and_edit(&mut f.s, |c| {
        let mut sealed: Vec<u8> = c
            .query_row(
                "SELECT sealed FROM resource_version WHERE rtype = 'Observation' AND id = ?1",
                params![db_id(&obs)],
                |r| r.get(0),
            )
            .expect("sealed");
        let mid = sealed.len() / 2;
        sealed[mid] ^= 1;
        c.execute(
            "UPDATE resource_version SET sealed = ?2 WHERE rtype = 'Observation' AND id = ?1",
            params![db_id(&obs), sealed],
        )
        .expect("flip");
    });
    f.s.restart();
    let t = f.s.token(SCOPE);
    let r = f.s.get(&format!("Patient/{a}/$everything"), &t);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // the body is complete JSON: the damaged record is an outcome entry, the rest listed
    let b = r.json();
    let entries = b["entry"].as_array().expect("entries");
    let outcome = entries
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .expect("an outcome entry");
    let text = outcome["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .expect("diagnostics");
    assert!(text.contains(&format!("Observation/{obs}")), "{text}");
    assert!(entries.iter().any(|e| e["resource"]["id"] == a.as_str()));
    assert!(
        !entries
            .iter()
            .any(|e| e["resource"]["resourceType"] == "Observation"),
        "the damaged record is not returned"
    );
}

#[test]
fn inserted_app_and_user_rows_stop_the_next_start() {
    for key in ["app:forged-app", "user:forged-user", "idp:forged"] {
        let mut f = fixture(&[]);
        stop_and_edit(&mut f.s, |c| {
            c.execute(
                "INSERT INTO meta (k, v) VALUES (?1, ?2)",
                params![key, br#"{"client_id":"forged","name":"x"}"#.to_vec()],
            )
            .expect("insert");
        });
        assert_start_refused(&mut f.s, &format!("settings row {key} has no valid MAC"));
        assert_verify_finds(&f.s, &[&format!("settings row {key}: no valid MAC")]);
    }
}

#[test]
fn a_disabled_account_restored_from_an_older_copy_stops_the_next_start() {
    let mut f = fixture(&[]);
    let cli = |args: &[&str], stdin: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(unlock_args(&f.s.data)).args(args);
        if stdin.is_some() {
            c.stdin(std::process::Stdio::piped());
        }
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().expect("spawn");
        if let Some(text) = stdin {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write");
        }
        let o = child.wait_with_output().expect("wait");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let data = f.s.data.to_str().expect("path").to_owned();
    cli(
        &[
            "user",
            "add",
            "--data-dir",
            &data,
            "--username",
            "audrey.auditor",
            "--role",
            "auditor",
        ],
        Some("correct horse battery staple 42\n"),
    );
    let rows = |c: &Connection| -> Vec<(String, Vec<u8>, Vec<u8>)> {
        c.prepare("SELECT k, v, mac FROM meta WHERE k LIKE 'user:%' ORDER BY k")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    let enabled = rows(&db(&f.s));
    assert_eq!(enabled.len(), 1, "one account row");
    cli(
        &[
            "user",
            "disable",
            "--data-dir",
            &data,
            "--username",
            "audrey.auditor",
        ],
        None,
    );
    assert_ne!(rows(&db(&f.s)), enabled, "the account row changed");
    let key = enabled[0].0.clone();
    stop_and_edit(&mut f.s, |c| {
        let (k, v, mac) = &enabled[0];
        c.execute(
            "UPDATE meta SET v = ?2, mac = ?3 WHERE k = ?1",
            params![k, v, mac],
        )
        .expect("restore");
    });
    assert_start_refused(&mut f.s, "the settings rows differ from the signed state");
    assert_verify_finds(
        &f.s,
        &[&format!("settings row {key}: not the value last committed")],
    );
}

#[test]
fn a_segment_moved_under_another_key_is_found() {
    // the postings stay as they were, only the key lookups use is changed: every search
    // would miss them
    let mut f = fixture(&["--verify-every", "1"]);
    stop_and_edit(&mut f.s, |c| {
        // (merged at the clean stop: the postings are all in segments)
        let n = c
            .execute("UPDATE search_seg SET tok = x'FFFF'", [])
            .expect("re-key");
        assert!(n > 0, "no segments");
    });
    f.s.restart_with(&["--verify-every", "1"]);
    await_log(&f.s, "is not where phivault put it");
    f.s.stop();
    assert_verify_finds(&f.s, &["is not where phivault put it"]);
}

/// An offline command beside a running server (`audit alerts` opens the store, and its
/// clean stop signs the same head again with a state that counts its checkpoint): the
/// server goes on from that state, and the store verifies afterwards.
#[test]
fn an_offline_command_beside_a_running_server_leaves_the_store_verifiable() {
    let mut s = Server::start();
    let tok = s.token("system/*.cruds");
    assert_eq!(s.get("Patient", &tok).status, 200);
    let mut c = Command::new(BIN);
    c.args(["audit", "alerts", "--data-dir"]).arg(&s.data);
    key_home(&mut c, &s.data);
    let o = c.output().expect("audit alerts");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for _ in 0..3 {
        assert_eq!(s.get("Patient", &tok).status, 200);
    }
    s.stop();
    let (ok, out) = verify(&s, &[]);
    assert!(ok, "{out}");
}
