//! Erasure by crypto-shredding (issue 17) through the real binary: a patient erased through
//! the API while the server runs, and with `phivault patient erase` while it is stopped.
//! Afterwards every one of their records answers 410 on read, vread and history; searches,
//! counts and `$everything` leave them out; other patients are intact; no index posting of
//! theirs is left; the old wrapped key's bytes are in none of the database's files; the
//! audit log verifies and records the erasure by ids, without the reason in clear.

mod common;

use std::collections::HashSet;

use common::{BIN, Server};
use serde_json::{Value, json};

const SEED: u64 = 1717;
const REASON: &str = "Right-to-erasure request RTE-55731 from the data subject";

/// A stored id as text (canonical UUIDs are stored as 16 bytes).
fn id_text(v: rusqlite::types::Value) -> String {
    match v {
        rusqlite::types::Value::Blob(b) => phivault_audit::uuid_text(&b.try_into().expect("16")),
        rusqlite::types::Value::Text(t) => t,
        other => panic!("id {other:?}"),
    }
}

fn db(s: &Server) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(s.db_path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open db")
}

/// The resources sealed under patient `p`'s key: (type, id, resource number).
fn sealed_under(s: &Server, p: &str) -> Vec<(String, String, i64)> {
    let c = db(s);
    let mut st = c
        .prepare(
            "SELECT v.rtype, v.id, v.rno FROM resource_version v JOIN data_key d \
             ON d.key_no = v.key_no WHERE d.key_id = ?1 AND v.version = 1",
        )
        .expect("test setup");
    st.query_map([format!("p:{p}")], |r| {
        Ok((r.get(0)?, id_text(r.get(1)?), r.get(2)?))
    })
    .expect("test setup")
    .map(|r| r.expect("row"))
    .collect()
}

fn wrapped_key(s: &Server, p: &str) -> Vec<u8> {
    db(s)
        .query_row(
            "SELECT wrapped FROM data_key WHERE key_id = ?1",
            [format!("p:{p}")],
            |r| r.get(0),
        )
        .expect("test setup")
}

fn varint(d: &[u8], pos: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let b = d[*pos];
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// Every resource number with a posting: in the merged segments and, live, in the log.
fn posted_numbers(s: &Server) -> HashSet<i64> {
    let c = db(s);
    let mut out = HashSet::new();
    let mut st = c
        .prepare("SELECT data FROM search_seg")
        .expect("test setup");
    for d in st
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .expect("test setup")
    {
        let d = d.expect("test setup");
        let mut pos = 0;
        while pos < d.len() {
            pos += 1 + usize::from(d[pos]);
            let count = varint(&d, &mut pos);
            let mut n = 0i64;
            for k in 0..count {
                let v = varint(&d, &mut pos) as i64;
                n = if k == 0 { v } else { n + v };
                out.insert(n);
            }
        }
    }
    let mut st = c.prepare("SELECT data FROM index_log").expect("test setup");
    for d in st
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .expect("test setup")
    {
        let d = d.expect("test setup");
        let mut pos = 0;
        while pos < d.len() {
            let rno = u64::from_be_bytes(d[pos + 5..pos + 13].try_into().expect("test setup"));
            if d[pos] == 1 {
                out.insert(rno as i64);
            }
            pos += 14 + usize::from(d[pos + 13]);
        }
    }
    out
}

fn patients(loaded: &[(Value, std::collections::HashMap<String, String>)]) -> Vec<String> {
    loaded
        .iter()
        .map(|(_, map)| {
            map.values()
                .find_map(|t| t.strip_prefix("Patient/"))
                .expect("a patient")
                .to_owned()
        })
        .collect()
}

fn total(s: &Server, tok: &str, query: &str) -> u64 {
    let r = s.get(query, tok);
    assert_eq!(
        r.status,
        200,
        "{query}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()["total"].as_u64().expect("total")
}

fn erase_api(s: &Server, tok: &str, p: &str) -> common::Resp {
    let body = json!({"resourceType": "Parameters",
        "parameter": [{"name": "reason", "valueString": REASON}]});
    s.post(&format!("Patient/{p}/$erase"), tok, &body)
}

/// What the server answers about patient `gone` and its resources once erased, and about
/// `kept`'s; the counts before erasure are `before` (Patient, Observation).
fn check_erased(
    s: &Server,
    tok: &str,
    gone: &[(String, String, i64)],
    kept: &str,
    before: (u64, u64),
) {
    for (rtype, id, _) in gone {
        for path in [
            format!("{rtype}/{id}"),
            format!("{rtype}/{id}/_history/1"),
            format!("{rtype}/{id}/_history"),
        ] {
            let r = s.get(&path, tok);
            assert_eq!(
                r.status,
                410,
                "{path}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert!(r.is_outcome());
            assert!(
                String::from_utf8_lossy(&r.body).contains("erased"),
                "{path}"
            );
        }
    }
    let observations = gone.iter().filter(|(t, _, _)| t == "Observation").count() as u64;
    assert_eq!(total(s, tok, "Patient?_summary=count"), before.0 - 1);
    assert_eq!(
        total(s, tok, "Observation?_summary=count"),
        before.1 - observations
    );
    let ids: HashSet<&str> = gone.iter().map(|(_, id, _)| id.as_str()).collect();
    for q in [
        "Patient?_count=500",
        "Observation?_count=500",
        "Patient/_history?_count=500",
    ] {
        let r = s.get(q, tok);
        assert_eq!(r.status, 200, "{q}");
        for e in r.json()["entry"].as_array().into_iter().flatten() {
            let id = e["resource"]["id"].as_str().unwrap_or("");
            assert!(!ids.contains(id), "{q} lists an erased record");
        }
    }
    let patient = &gone
        .iter()
        .find(|(t, _, _)| t == "Patient")
        .expect("test setup")
        .1;
    let r = s.get(&format!("Patient/{patient}/$everything"), tok);
    let listed = r.json()["entry"].as_array().map_or(0, Vec::len);
    assert_eq!(listed, 0, "$everything of the erased patient: {}", r.status);
    let r = s.get(&format!("Patient/{kept}/$everything"), tok);
    assert_eq!(r.status, 200);
    assert!(r.json()["entry"].as_array().map_or(0, Vec::len) > 1);
    assert_eq!(s.get(&format!("Patient/{kept}"), tok).status, 200);
    let posted = posted_numbers(s);
    assert!(!posted.is_empty());
    for (rtype, id, rno) in gone {
        assert!(
            !posted.contains(rno),
            "{rtype}/{id} still has index postings"
        );
    }
}

/// The old wrapped key is in none of the database's files; the reason in none at all.
fn check_no_bytes_left(s: &Server, wrapped: &[u8]) {
    for suffix in ["", "-wal", "-shm"] {
        let path = s.data.join(format!("phivault.db{suffix}"));
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !common::contains(&bytes, wrapped),
            "{} holds the erased wrapped key",
            path.display()
        );
    }
    for f in common::files_under(&s.data) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !common::contains(&bytes, REASON.as_bytes()),
            "{}",
            f.display()
        );
    }
}

/// `audit verify` passes, and the report shows the erasure of `p` by ids, with no reason.
fn check_audit(s: &Server, p: &str, client: &str) {
    let (ok, out) = s.audit_verify();
    assert!(ok, "audit verify: {out}");
    let o = std::process::Command::new(BIN)
        .args(["audit", "report", "--format", "json", "--data-dir"])
        .arg(&s.data)
        .output()
        .expect("test setup");
    assert!(o.status.success());
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(!report.contains(REASON) && !report.contains("RTE-55731"));
    let erasures: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("\"erase\"") && l.contains(p) && l.contains(client))
        .collect();
    assert!(!erasures.is_empty(), "no erasure event for {p} by {client}");
    let raw = common::audit_events(s);
    let ev = raw
        .iter()
        .find(|e| {
            e["interaction"] == "erase" && e["patient"] == p && e["outcome"]["http_status"] == 200
        })
        .expect("erasure event");
    assert_eq!(ev["resource_id"], p);
    assert_eq!(ev["action"], "D");
}

#[test]
fn a_patient_erased_through_the_api_is_gone_everywhere_and_leaves_no_key_bytes() {
    let s = Server::start();
    let tok = s.token("system/*.cruds");
    let loaded = s.load_synth(&tok, 3, SEED);
    let ps = patients(&loaded);
    let before = (
        total(&s, &tok, "Patient?_summary=count"),
        total(&s, &tok, "Observation?_summary=count"),
    );
    let gone = sealed_under(&s, &ps[0]);
    assert!(gone.len() > 3, "the patient has records");
    let wrapped = wrapped_key(&s, &ps[0]);
    // refusals: no grant (even system/*.cruds), unknown patient, wrong resource type
    let r = erase_api(&s, &tok, &ps[0]);
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let creds = s.add_client("system/Patient.$erase");
    let eraser = s.token_for(&creds, "system/Patient.$erase");
    assert_eq!(erase_api(&s, &eraser, "no-such-patient").status, 404);
    let r = s.post(
        &format!("Observation/{}/$erase", gone[1].1),
        &eraser,
        &json!({}),
    );
    assert_eq!(r.status, 405);
    let r = s.post(
        &format!("Patient/{}/$erase", ps[0]),
        &eraser,
        &json!({"resourceType": "Parameters"}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(s.get(&format!("Patient/{}", ps[0]), &tok).status, 200);
    // the erasure, then a second one
    let r = erase_api(&s, &eraser, &ps[0]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("erased"));
    let r = erase_api(&s, &eraser, &ps[0]);
    assert_eq!(r.status, 410);
    assert!(String::from_utf8_lossy(&r.body).contains("already erased"));
    check_erased(&s, &tok, &gone, &ps[1], before);
    check_no_bytes_left(&s, &wrapped);
    check_audit(&s, &ps[0], &creds.client_id);
    // writes for the erased patient are refused
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": format!("Patient/{}", ps[0])}});
    assert_eq!(s.post("Observation", &tok, &obs).status, 410);
}

#[test]
fn the_offline_erasure_is_refused_while_a_server_runs_and_works_when_it_is_stopped() {
    let mut s = Server::start();
    let tok = s.token("system/*.cruds");
    let loaded = s.load_synth(&tok, 2, SEED + 1);
    let ps = patients(&loaded);
    let before = (
        total(&s, &tok, "Patient?_summary=count"),
        total(&s, &tok, "Observation?_summary=count"),
    );
    let gone = sealed_under(&s, &ps[0]);
    let wrapped = wrapped_key(&s, &ps[0]);
    let erase = |s: &Server| {
        std::process::Command::new(BIN)
            .args([
                "patient",
                "erase",
                "--patient",
                &ps[0],
                "--reason",
                REASON,
                "--data-dir",
            ])
            .arg(&s.data)
            .output()
            .expect("test setup")
    };
    let o = erase(&s);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains(&format!("process {}", s.pid())), "{err}");
    assert_eq!(s.get(&format!("Patient/{}", ps[0]), &tok).status, 200);
    s.stop();
    let o = erase(&s);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = erase(&s);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already erased"));
    check_no_bytes_left(&s, &wrapped);
    s.restart();
    let tok = s.token("system/*.cruds");
    check_erased(&s, &tok, &gone, &ps[1], before);
    check_no_bytes_left(&s, &wrapped);
    check_audit(&s, &ps[0], "phivault-cli");
}
