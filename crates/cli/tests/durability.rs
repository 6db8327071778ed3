//! Acceptance 5: concurrent updates lose nothing (If-Match: exactly one winner per
//! version), and `kill -9` during a write load loses no acknowledged write.
mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const SCOPE: &str = "system/*.cruds";
const THREADS: usize = 32;

fn version_of(r: &Resp) -> u64 {
    let e = r.header("etag").unwrap_or_else(|| panic!("no ETag: {r:?}"));
    e.trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|_| panic!("bad ETag {e}"))
}

fn with_given(id: &str, given: &str) -> Value {
    let mut p = patient();
    p["id"] = json!(id);
    p["name"][0]["given"] = json!([given]);
    p
}

fn create_patient(s: &Server, t: &str) -> String {
    let r = s.post("Patient", t, &patient());
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().expect("id").to_owned()
}

/// Versions listed by the instance history, newest first.
fn history_versions(s: &Server, t: &str, id: &str) -> Vec<(u64, Value)> {
    let r = s.get(&format!("Patient/{id}/_history?_count=1000"), t);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            let v = e["resource"]["meta"]["versionId"]
                .as_str()
                .expect("versionId")
                .parse()
                .expect("numeric versionId");
            (v, e["resource"].clone())
        })
        .collect()
}

#[test]
fn if_match_races_have_exactly_one_winner_per_version() {
    const ROUNDS: usize = 5;
    let s = Server::start();
    let t = s.token(SCOPE);
    let id = create_patient(&s, &t);
    let mut winners: BTreeMap<u64, String> = BTreeMap::new(); // version -> given name
    for round in 0..ROUNDS {
        let barrier = Barrier::new(THREADS);
        let results: Vec<(u64, u16, String, Option<u64>)> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..THREADS)
                .map(|k| {
                    let (s, t, id, barrier) = (&s, &t, &id, &barrier);
                    sc.spawn(move || {
                        let g = s.get(&format!("Patient/{id}"), t);
                        assert_eq!(g.status, 200);
                        let seen = version_of(&g);
                        let given = format!("Round{round}Writer{k}");
                        barrier.wait();
                        let r = s.put(
                            &format!("Patient/{id}"),
                            t,
                            &with_given(id, &given),
                            &[("If-Match", &format!("W/\"{seen}\""))],
                        );
                        let v = (r.status == 200).then(|| version_of(&r));
                        (seen, r.status, given, v)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let seen: BTreeSet<u64> = results.iter().map(|r| r.0).collect();
        assert_eq!(seen.len(), 1, "all writers read before anyone wrote");
        let base = *seen.iter().next().expect("version");
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for r in &results {
            *statuses.entry(r.1).or_default() += 1;
        }
        assert_eq!(
            statuses,
            BTreeMap::from([(200, 1), (412, THREADS - 1)]),
            "round {round}: statuses"
        );
        let win = results.iter().find(|r| r.1 == 200).expect("winner");
        assert_eq!(win.3, Some(base + 1), "round {round}: winner's version");
        winners.insert(base + 1, win.2.clone());
    }
    let successes = winners.len() as u64;
    let cur = s.get(&format!("Patient/{id}"), &t);
    assert_eq!(version_of(&cur), 1 + successes);
    let hist = history_versions(&s, &t, &id);
    let versions: Vec<u64> = hist.iter().map(|(v, _)| *v).rev().collect();
    assert_eq!(versions, (1..=1 + successes).collect::<Vec<_>>());
    for (v, res) in &hist {
        if let Some(given) = winners.get(v) {
            assert_eq!(res["name"][0]["given"], json!([given]), "version {v}");
        }
    }
}

#[test]
fn concurrent_updates_without_if_match_lose_nothing() {
    let s = Server::start();
    let t = s.token(SCOPE);
    let id = create_patient(&s, &t);
    let barrier = Barrier::new(THREADS);
    let results: Vec<(String, Resp)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..THREADS)
            .map(|k| {
                let (s, t, id, barrier) = (&s, &t, &id, &barrier);
                sc.spawn(move || {
                    let given = format!("Writer{k}");
                    let body = with_given(id, &given);
                    barrier.wait();
                    (given, s.put(&format!("Patient/{id}"), t, &body, &[]))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    // First: among the acknowledged updates nothing is lost (every one is its own version,
    // the versions are contiguous, and each is in the history with its own content).
    let mut by_version: BTreeMap<u64, String> = BTreeMap::new();
    for (g, r) in results.iter().filter(|(_, r)| r.status == 200) {
        let v = version_of(r);
        assert!(
            by_version.insert(v, g.clone()).is_none(),
            "version {v} acknowledged twice"
        );
    }
    let ok = by_version.len() as u64;
    assert_eq!(
        by_version.keys().copied().collect::<Vec<_>>(),
        (2..=1 + ok).collect::<Vec<_>>(),
        "acknowledged versions are distinct and contiguous"
    );
    let hist = history_versions(&s, &t, &id);
    let versions: BTreeSet<u64> = hist.iter().map(|(v, _)| *v).collect();
    assert_eq!(hist.len(), versions.len(), "history lists a version twice");
    assert_eq!(versions, (1..=1 + ok).collect::<BTreeSet<_>>());
    for (v, res) in &hist {
        if let Some(g) = by_version.get(v) {
            assert_eq!(res["name"][0]["given"], json!([g]), "version {v}");
        }
    }
    let cur = s.get(&format!("Patient/{id}"), &t);
    assert_eq!(version_of(&cur), 1 + ok);
    // Then: every one of them succeeded (an update without If-Match has no precondition
    // that could fail), so versions 2..=33 exist and the history holds all 33.
    let bad: Vec<String> = results
        .iter()
        .filter(|(_, r)| r.status != 200)
        .map(|(g, r)| format!("{g}: {} {}", r.status, String::from_utf8_lossy(&r.body)))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {THREADS} concurrent updates without If-Match failed (the {ok} acknowledged \
         ones were all kept):\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert_eq!(ok, THREADS as u64);
    assert_eq!(hist.len(), THREADS + 1, "history holds every version");
}

/// One acknowledged write.
struct Ack {
    rtype: &'static str,
    id: String,
    version: u64,
    sent: Value,
}

fn strip(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    v
}

#[test]
fn kill9_during_write_load_loses_no_acknowledged_write() {
    const WRITERS: usize = 8;
    const TARGET: usize = 300;
    let mut s = Server::start();
    let t = s.token(SCOPE);
    let agent = s.agent.clone();
    let base = s.base.clone();
    let acked = AtomicUsize::new(0);
    let killing = AtomicBool::new(false);
    let acks: Mutex<Vec<Ack>> = Mutex::new(Vec::new());
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());

    std::thread::scope(|sc| {
        for w in 0..WRITERS {
            let (agent, base, t) = (&agent, &base, &t);
            let (acked, killing, acks, errors) = (&acked, &killing, &acks, &errors);
            sc.spawn(move || {
                let mut patient_id: Option<String> = None;
                for i in 0.. {
                    let (method, url, rtype, body) = match (&patient_id, i % 4) {
                        (None, _) | (Some(_), 0) => {
                            let mut p = patient();
                            p["name"][0]["family"] = json!(format!("Durable{w}x{i}"));
                            ("POST", format!("{base}/Patient"), "Patient", p)
                        }
                        (Some(pid), 1) => {
                            let mut p = with_given(pid, &format!("Upd{w}x{i}"));
                            p["name"][0]["family"] = json!(format!("Durable{w}x{i}"));
                            ("PUT", format!("{base}/Patient/{pid}"), "Patient", p)
                        }
                        (Some(pid), _) => (
                            "POST",
                            format!("{base}/Observation"),
                            "Observation",
                            json!({
                                "resourceType": "Observation",
                                "status": "final",
                                "code": {"text": format!("load {w}/{i}")},
                                "subject": {"reference": format!("Patient/{pid}")},
                                "valueQuantity": {"value": i, "unit": "/min"}
                            }),
                        ),
                    };
                    let r = try_send(
                        agent,
                        method,
                        &url,
                        Some(t),
                        Some(("application/fhir+json", body.to_string().into_bytes())),
                        &[],
                    );
                    let r = match r {
                        Ok(r) => r,
                        Err(e) => {
                            if !killing.load(Ordering::SeqCst) {
                                errors.lock().expect("lock").push(e);
                            }
                            return;
                        }
                    };
                    if r.status != 200 && r.status != 201 {
                        if !killing.load(Ordering::SeqCst) {
                            errors.lock().expect("lock").push(format!(
                                "{method} {url}: {} {}",
                                r.status,
                                String::from_utf8_lossy(&r.body)
                            ));
                        }
                        return;
                    }
                    let id = r.json()["id"].as_str().map(str::to_owned);
                    let Some(id) = id else {
                        errors
                            .lock()
                            .expect("lock")
                            .push(format!("{method} {url}: no id in the response"));
                        return;
                    };
                    if rtype == "Patient" {
                        patient_id = Some(id.clone());
                    }
                    acks.lock().expect("lock").push(Ack {
                        rtype,
                        id,
                        version: version_of(&r),
                        sent: body,
                    });
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // Wait (bounded) for enough acknowledged writes, then crash the server mid-load.
        let deadline = Instant::now() + Duration::from_secs(90);
        while acked.load(Ordering::SeqCst) < TARGET && errors.lock().expect("lock").is_empty() {
            assert!(
                Instant::now() < deadline,
                "only {} writes acknowledged in 90 s",
                acked.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        killing.store(true, Ordering::SeqCst);
        s.kill9();
    });
    let errors = errors.into_inner().expect("lock");
    assert!(
        errors.is_empty(),
        "writes failed before the kill: {errors:?}"
    );
    let acks = acks.into_inner().expect("lock");
    assert!(acks.len() >= TARGET, "{} acknowledged", acks.len());

    s.restart();
    let t = s.token(SCOPE);
    let mut latest: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for a in &acks {
        let r = s.get(&format!("{}/{}/_history/{}", a.rtype, a.id, a.version), &t);
        assert_eq!(
            r.status,
            200,
            "acknowledged {}/{} version {} lost after kill -9: {}",
            a.rtype,
            a.id,
            a.version,
            String::from_utf8_lossy(&r.body)
        );
        let got = r.json();
        assert_eq!(got["meta"]["versionId"], a.version.to_string());
        assert_eq!(
            strip(got),
            strip(a.sent.clone()),
            "{}/{} v{}",
            a.rtype,
            a.id,
            a.version
        );
        let e = latest.entry((a.rtype, a.id.as_str())).or_default();
        *e = (*e).max(a.version);
    }
    for ((rtype, id), v) in &latest {
        let r = s.get(&format!("{rtype}/{id}"), &t);
        assert_eq!(r.status, 200);
        assert!(version_of(&r) >= *v, "{rtype}/{id} went back in time");
    }
    // The search index was rebuilt from its log on restart: every current resource is
    // found by its values (each patient by its current family name, each acknowledged
    // observation through its subject).
    let search_ids = |query: &str| -> Vec<String> {
        let r = s.get(query, &t);
        assert_eq!(
            r.status,
            200,
            "{query}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()["entry"]
            .as_array()
            .map(|es| {
                es.iter()
                    .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut searched = 0;
    for (rtype, id) in latest.keys() {
        if *rtype != "Patient" {
            continue;
        }
        let current = s.get(&format!("Patient/{id}"), &t).json();
        let family = current["name"][0]["family"].as_str().expect("family");
        assert!(
            search_ids(&format!("Patient?family={family}&_count=1000")).contains(&(*id).to_owned()),
            "Patient/{id} not found by its family name after kill -9"
        );
        let observations = search_ids(&format!("Observation?subject=Patient/{id}&_count=1000"));
        for a in acks.iter().filter(|a| {
            a.rtype == "Observation" && a.sent["subject"]["reference"] == format!("Patient/{id}")
        }) {
            assert!(
                observations.contains(&a.id),
                "Observation/{} not found through its subject after kill -9",
                a.id
            );
            searched += 1;
        }
    }
    assert!(searched > 0, "no observation was checked by search");
    println!(
        "kill -9: {} acknowledged writes ({} resources) all read back; {searched} found by search",
        acks.len(),
        latest.len()
    );
    s.stop();
    let (ok, msg) = s.audit_verify();
    assert!(ok, "audit verify after kill -9: {msg}");
}

/// Issue 5, acceptance 3: the audit store cannot grow (the server runs with its files
/// limited to a little more than they hold, so writes past that fail as on a full disk)
/// during a read load: requests fail cleanly with 503 and an OperationOutcome, none is
/// served unaudited, and once space returns (the limit is lifted on the running process)
/// everything works again and the log verifies.
#[test]
fn a_full_audit_store_fails_requests_cleanly_and_the_server_recovers() {
    let mut s = Server::start();
    let size = |s: &Server, name: &str| std::fs::metadata(s.data.join(name)).map_or(0, |m| m.len());
    let used = size(&s, "phivault.db").max(size(&s, "phivault.db-wal"));
    s.restart_with_file_limit(used / 1024 + 1024);
    // (tokens name the origin, which a restart changes)
    let t = s.token(SCOPE);
    let id = create_patient(&s, &t);
    let family = patient()["name"][0]["family"]
        .as_str()
        .expect("family")
        .to_owned();
    let path = format!("Patient/{id}");
    let mut served: Vec<String> = Vec::new();
    let mut refused = 0;
    for _ in 0..20_000 {
        let r = s.get(&path, &t);
        match r.status {
            200 => served.push(r.header("x-request-id").expect("rid").to_owned()),
            503 => {
                refused += 1;
                assert!(r.is_outcome(), "a clean OperationOutcome");
                let body = String::from_utf8_lossy(&r.body);
                assert!(!body.contains(&family), "nothing of the record");
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
        }
        if refused >= 50 {
            break;
        }
    }
    assert!(
        refused >= 50,
        "the limit never bit ({} served)",
        served.len()
    );
    // space returns
    let o = std::process::Command::new("prlimit")
        .args(["--pid", &s.pid().to_string(), "--fsize=unlimited"])
        .output()
        .expect("prlimit (util-linux)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut after = 0;
    for _ in 0..200 {
        let r = s.get(&path, &t);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        served.push(r.header("x-request-id").expect("rid").to_owned());
        after += 1;
    }
    assert_eq!(after, 200);
    s.stop();
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
    // every response that carried the record has its audit event
    let audited: BTreeSet<String> = audit_events(&s)
        .into_iter()
        .filter(|e| e["outcome"]["http_status"] == json!(200))
        .filter_map(|e| e["request_id"].as_str().map(str::to_owned))
        .collect();
    let missing: Vec<&String> = served.iter().filter(|r| !audited.contains(*r)).collect();
    assert!(missing.is_empty(), "served unaudited: {missing:?}");
}
