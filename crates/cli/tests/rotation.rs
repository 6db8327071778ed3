//! KEK rotation through the real binary (issue 17): online through the admin API while
//! clients read, search, page and create patients without one failed request; the
//! destroyed generation's wrapped KEK is in none of the database's files; offline through
//! `phivault keys rotate kek`; every record still reads; the audit log verifies and shows
//! each rotation.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const ROTATION_SCOPE: &str = "system/PhivaultKeys.u";

/// The wrapped KEK of `generation`, read from the database.
fn wrapped_generation(s: &Server, generation: u32) -> Vec<u8> {
    let conn = rusqlite::Connection::open_with_flags(
        s.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open db");
    conn.query_row(
        "SELECT wrapped FROM kek_generation WHERE generation = ?1",
        [generation],
        |r| r.get(0),
    )
    .expect("the generation is stored")
}

/// Clients looping over reads, searches (with a page followed through its cursor) and
/// patient creations until `stop`; (requests, failures as messages).
fn clients(
    s: &Server,
    token: &str,
    targets: &[String],
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(u64, Vec<String>)>> {
    let done = Arc::new(AtomicU64::new(0));
    (0..5)
        .map(|t| {
            let (agent, base, token) = (s.agent.clone(), s.base.clone(), token.to_owned());
            let (targets, stop, done) = (targets.to_vec(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut n, mut bad) = (0u64, Vec::new());
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let target = &targets[i % targets.len()];
                    i += 7;
                    let (method, url, body, want) = match (t, i % 3) {
                        (4, _) => {
                            let p = json!({"resourceType": "Patient", "name": [{"family": format!("Rotation{i}")}]});
                            ("POST", format!("{base}/Patient"), Some(p), 201)
                        }
                        (_, 0) => ("GET", format!("{base}/Patient?_count=2"), None, 200),
                        (_, 1) if target.starts_with("Patient/") => (
                            "GET",
                            format!("{base}/Observation?subject={target}&_count=3"),
                            None,
                            200,
                        ),
                        _ => ("GET", format!("{base}/{target}"), None, 200),
                    };
                    let body = body.map(|b| ("application/fhir+json", b.to_string().into_bytes()));
                    let r = try_send(&agent, method, &url, Some(&token), body, &[]);
                    n += 1;
                    match r {
                        Ok(r) if r.status == want => {
                            // follow the next page through its sealed cursor
                            let next = r.json()["link"].as_array().and_then(|l| {
                                l.iter().find(|x| x["relation"] == "next").cloned()
                            });
                            if let Some(next) = next.and_then(|x| x["url"].as_str().map(str::to_owned)) {
                                n += 1;
                                match try_send(&agent, "GET", &next, Some(&token), None, &[]) {
                                    Ok(r) if r.status == 200 => {}
                                    Ok(r) => bad.push(format!("next page: {}", r.status)),
                                    Err(e) => bad.push(e),
                                }
                            }
                        }
                        Ok(r) => bad.push(format!("{method} {url}: {} {}", r.status, String::from_utf8_lossy(&r.body))),
                        Err(e) => bad.push(e),
                    }
                }
                done.fetch_add(n, Ordering::Relaxed);
                (n, bad)
            })
        })
        .collect()
}

fn rotate_online(s: &Server, token: &str) -> Value {
    // two data keys a write: the rotation is many writes among the clients' requests
    let url = format!("{}/admin/keys/rotate-kek?batch=2", s.origin);
    let r = s.send("POST", &url, Some(token), None, &[]);
    assert_eq!(
        r.status,
        200,
        "rotate: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

fn every_record_reads(s: &Server, token: &str, targets: &[String]) {
    for t in targets {
        let r = s.get(t, token);
        assert_eq!(r.status, 200, "{t}: {}", String::from_utf8_lossy(&r.body));
    }
}

fn run_cli(s: &Server, args: &[&str]) -> String {
    let o = std::process::Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(&s.data)
        .output()
        .expect("run phivault");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{args:?}: {text}");
    text
}

#[test]
fn the_kek_rotates_online_under_load_and_offline_and_old_generations_are_gone() {
    let mut s = Server::start();
    let token = s.token("system/*.cruds");
    let loaded = s.load_synth(&token, 25, 1717);
    let targets: Vec<String> = loaded
        .iter()
        .flat_map(|(_, m)| m.values().cloned())
        .collect();
    assert!(targets.len() > 100, "{} records", targets.len());

    // nobody else may rotate: not system/*, not a reader
    let url = format!("{}/admin/keys/rotate-kek", s.origin);
    assert_eq!(s.send("POST", &url, Some(&token), None, &[]).status, 403);
    let admin = s.add_client(ROTATION_SCOPE);
    let admin_token = s.token_for(&admin, ROTATION_SCOPE);

    let stop = Arc::new(AtomicBool::new(false));
    let threads = clients(&s, &token, &targets, &stop);
    std::thread::sleep(Duration::from_millis(500));
    let first = rotate_online(&s, &admin_token);
    assert_eq!(first["generation"], 1);
    assert_eq!(first["destroyed"], json!([0]));
    assert!(first["rewrapped"].as_u64().unwrap() >= 25, "{first}");
    let gen1 = wrapped_generation(&s, 1);
    std::thread::sleep(Duration::from_millis(300));
    let second = rotate_online(&s, &admin_token);
    assert_eq!(second["generation"], 2);
    assert_eq!(second["destroyed"], json!([1]));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (mut requests, mut failures) = (0, Vec::new());
    for t in threads {
        let (n, bad) = t.join().expect("client thread");
        requests += n;
        failures.extend(bad);
    }
    assert!(requests > 50, "{requests} requests");
    assert!(
        failures.is_empty(),
        "{} of {requests} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!("{requests} requests while rotating, none failed");
    every_record_reads(&s, &token, &targets);

    // generation 1's wrapped KEK is in no file of the database
    for f in ["phivault.db", "phivault.db-wal", "phivault.db-shm"] {
        let bytes = std::fs::read(s.data.join(f)).unwrap_or_default();
        assert!(
            !contains(&bytes, &gen1),
            "{f} still holds the destroyed generation"
        );
    }

    // offline: refused while the server runs, done once it is stopped
    let o = std::process::Command::new(BIN)
        .args(["keys", "rotate", "kek", "--data-dir"])
        .arg(&s.data)
        .output()
        .expect("run");
    assert!(
        !o.status.success(),
        "rotated offline under a running server"
    );
    s.stop();
    let gen2 = wrapped_generation(&s, 2);
    let out = run_cli(&s, &["keys", "rotate", "kek"]);
    assert!(out.contains("KEK generation 3 is current"), "{out}");
    let status = run_cli(&s, &["keys", "status"]);
    assert!(
        status.contains("KEK generation 3, last rotated 20"),
        "{status}"
    );
    for f in ["phivault.db", "phivault.db-wal", "phivault.db-shm"] {
        let bytes = std::fs::read(s.data.join(f)).unwrap_or_default();
        assert!(!contains(&bytes, &gen2), "{f} still holds generation 2");
    }

    s.restart();
    let token = s.token("system/*.rs");
    every_record_reads(&s, &token, &targets);
    let (ok, report) = s.audit_verify();
    assert!(ok, "audit verify: {report}");
    let rotations: Vec<Value> = audit_events(&s)
        .into_iter()
        .filter(|e| e["interaction"] == "rotate-kek")
        .collect();
    let by = |client: &str, status: u64| {
        rotations
            .iter()
            .filter(|e| e["client_id"] == client && e["outcome"]["http_status"] == status)
            .count()
    };
    assert_eq!(by(&admin.client_id, 200), 2, "{rotations:?}");
    assert_eq!(by("phivault-cli", 200), 1, "{rotations:?}");
    assert_eq!(
        rotations.len(),
        4,
        "the refused attempt is audited too: {rotations:?}"
    );
}
