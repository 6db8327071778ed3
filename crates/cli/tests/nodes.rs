//! Several phivault nodes on one PostgreSQL database are one service: a write on one is
//! read on the other at once, a client assertion used on one is refused on the other, the
//! audit log stays one chain, and when a node is killed under load no acknowledged write
//! is lost while the other keeps serving and takes over the periodic work.
//!
//! Real components: the `phivault` binary twice, a PostgreSQL cluster (the test run's, or
//! one of this test's own), behind one public URL as a load balancer would put them.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use phivault_store::postgres::testdb::TestDb;
use serde_json::{Value, json};

/// The one public origin of both nodes (a load balancer's).
const PUBLIC: &str = "https://phivault.test";

/// A node's arguments: the shared public URL, scans and whole-store checks often.
const SERVE: &[&str] = &[
    "--public-url",
    PUBLIC,
    "--scan-every",
    "10",
    "--verify-every",
    "2",
];

/// Node A's data directory made by `init --database`, and node B's: a copy of A's (which
/// holds no key: the key file is outside it).
fn two_data_dirs(tmp: &Path, db: &TestDb) -> (PathBuf, PathBuf) {
    let password = std::fs::read_to_string(&db.passfile).expect("passfile");
    let password = password
        .lines()
        .next()
        .expect("a line")
        .rsplit(':')
        .next()
        .expect("pw");
    let pwfile = tmp.join("db-password");
    std::fs::write(&pwfile, password).expect("password file");
    let a = tmp.join("node-a");
    let mut c = Command::new(BIN);
    c.args(["init", "--data-dir"])
        .arg(&a)
        .args(["--database", db.target.url(), "--database-password-file"])
        .arg(&pwfile);
    key_home(&mut c, &a);
    let o = c.output().expect("init");
    assert!(
        o.status.success(),
        "init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let b = tmp.join("node-b");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&a)
        .arg(&b)
        .status()
        .expect("cp");
    assert!(st.success());
    // (the copy holds no key: the provider's key file is outside the data directory)
    assert!(!master_key_file(&b).starts_with(&b));
    (a, b)
}

fn start(tmp: &Path, data: &Path) -> Server {
    let launched = launch_with(data, SERVE);
    let copy = tempfile::tempdir_in(tmp).expect("tempdir");
    Server::running(copy, data.to_path_buf(), launched)
}

fn token_on(s: &Server, creds: &Creds, scope: &str) -> String {
    let a = s.assertion(creds, &format!("{PUBLIC}/auth/token"), &rand_hex());
    let r = s.token_request(&a, scope);
    assert_eq!(r.status, 200, "token: {}", String::from_utf8_lossy(&r.body));
    r.json()["access_token"].as_str().expect("token").to_owned()
}

fn create(s: &Server, token: &str, family: &str) -> Result<String, String> {
    let body = json!({"resourceType": "Patient", "name": [{"family": family}]});
    let r = s
        .try_send(
            "POST",
            &format!("{}/Patient", s.base),
            Some(token),
            Some(("application/fhir+json", body.to_string().into_bytes())),
            &[],
        )
        .map_err(|e| e.to_string())?;
    if r.status != 201 {
        return Err(format!("status {}", r.status));
    }
    Ok(r.json()["id"].as_str().expect("id").to_owned())
}

#[test]
fn two_nodes_on_one_database_are_one_service() {
    let db = TestDb::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (da, dbb) = two_data_dirs(tmp.path(), &db);
    let mut a = start(tmp.path(), &da);
    let b = start(tmp.path(), &dbb);
    let scope = "system/*.cruds";
    let creds = a.add_client(scope);
    let token = token_on(&a, &creds, scope);

    // a write acknowledged by one node is read by the other at once
    let id = create(&a, &token, "Nodeson").expect("create on A");
    let r = b.get(&format!("Patient/{id}"), &token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["name"][0]["family"], "Nodeson");
    let id_b = create(&b, &token, "Otherson").expect("create on B");
    assert_eq!(a.get(&format!("Patient/{id_b}"), &token).status, 200);

    // a client assertion used on one node is refused on the other
    let assertion = a.assertion(&creds, &format!("{PUBLIC}/auth/token"), &rand_hex());
    assert_eq!(a.token_request(&assertion, scope).status, 200);
    let replayed = b.token_request(&assertion, scope);
    assert_eq!(
        replayed.status,
        401,
        "{}",
        String::from_utf8_lossy(&replayed.body)
    );
    assert_eq!(replayed.json()["error"], "invalid_client");
    assert_eq!(a.token_request(&assertion, scope).status, 401);

    // both nodes write at once, then one is killed under load: every write acknowledged
    // (by either) is there, read through the survivor
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop_at = Instant::now() + Duration::from_secs(4);
    let writers: Vec<_> = [
        (a.base.clone(), a.agent.clone()),
        (b.base.clone(), b.agent.clone()),
    ]
    .into_iter()
    .flat_map(|node| std::iter::repeat_n(node, 3))
    .enumerate()
    .map(|(n, (base, agent))| {
        let (acked, token) = (acked.clone(), token.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while Instant::now() < stop_at {
                i += 1;
                let body =
                    json!({"resourceType": "Patient", "name": [{"family": format!("W{n}x{i}")}]});
                let r = try_send(
                    &agent,
                    "POST",
                    &format!("{base}/Patient"),
                    Some(&token),
                    Some(("application/fhir+json", body.to_string().into_bytes())),
                    &[],
                );
                if let Ok(r) = r
                    && r.status == 201
                {
                    let id = r.json()["id"].as_str().expect("id").to_owned();
                    acked.lock().expect("lock").push(id);
                }
            }
        })
    })
    .collect();
    std::thread::sleep(Duration::from_secs(2));
    let a_log_before_kill = String::from_utf8_lossy(&a.logs()).into_owned();
    a.kill9();
    for w in writers {
        w.join().expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 50,
        "writes were acknowledged under load: {}",
        acked.len()
    );
    let mut missing = Vec::new();
    for id in &acked {
        if b.get(&format!("Patient/{id}"), &token).status != 200 {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost",
        missing.len(),
        acked.len()
    );
    // the survivor keeps serving writes
    create(&b, &token, "Aftermath").expect("B writes after A died");

    // the periodic work: A ran it at first (it started first); B takes it over
    assert!(
        a_log_before_kill.contains("this node runs the periodic task now"),
        "A led: {a_log_before_kill}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let took_over = loop {
        let log = String::from_utf8_lossy(&b.logs()).into_owned();
        if log.contains("task=\"snooping-scan\"") || log.contains("task=snooping-scan") {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        took_over,
        "B took over the snooping scan: {}",
        String::from_utf8_lossy(&b.logs())
    );

    // one audit chain for both nodes, which `audit verify` and `verify` accept
    let (ok, out) = b.audit_verify();
    assert!(ok, "audit verify: {out}");
    let o = Command::new(BIN)
        .args(["verify", "--data-dir"])
        .arg(&b.data)
        .output()
        .expect("verify");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "verify: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let events: Value = json!(audit_events(&b).len());
    assert!(events.as_u64().unwrap_or(0) > acked.len() as u64);
}
