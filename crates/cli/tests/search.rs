//! Search over the real binary: exact answers even when blind-index tokens are so short
//! that almost every candidate is a false positive, opaque and authenticated paging
//! cursors, bounded work, 4xx on bad input, audit of every search, and the coincidence
//! check of the index. Counts and `self` links: `counts_and_links.rs`.
mod common;
use common::*;

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

const SEED: u64 = 4242;

fn enc(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ids(b: &Value) -> BTreeSet<String> {
    b["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["search"]["mode"] == "match")
                .filter_map(|e| {
                    Some(format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str()?,
                        e["resource"]["id"].as_str()?
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn next_link(b: &Value) -> Option<String> {
    b["link"]
        .as_array()?
        .iter()
        .find_map(|l| (l["relation"] == "next").then(|| l["url"].as_str().unwrap_or("").to_owned()))
}

/// Every page of a search, following `next` links.
fn all_pages(s: &Server, t: &str, first: &str) -> (BTreeSet<String>, usize) {
    let mut out = BTreeSet::new();
    let mut pages = 0;
    let mut r = s.get(first, t);
    loop {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        pages += 1;
        let b = r.json();
        for id in ids(&b) {
            assert!(out.insert(id), "a resource appeared on two pages");
        }
        match next_link(&b) {
            Some(url) => r = s.send("GET", &url, Some(t), None, &[]),
            None => return (out, pages),
        }
    }
}

/// Resources of the loaded bundles of type `rtype` (with references rewritten), as
/// (Type/id, resource).
fn loaded(bundles: &[(Value, HashMap<String, String>)], rtype: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (b, map) in bundles {
        for e in b["entry"].as_array().into_iter().flatten() {
            if e["resource"]["resourceType"] == rtype {
                let target = map[e["fullUrl"].as_str().unwrap_or("")].clone();
                let mut r = e["resource"].clone();
                rewrite(&mut r, map);
                out.push((target, r));
            }
        }
    }
    out
}

fn rewrite(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "reference"
                    && let Some(t) = x.as_str().and_then(|s| map.get(s))
                {
                    *x = Value::String(t.clone());
                } else {
                    rewrite(x, map);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite(x, map)),
        _ => {}
    }
}

#[test]
fn answers_are_exact_even_with_2_bit_tokens() {
    // 2-bit tokens: every token is shared by a quarter of all values, so nearly every
    // candidate the index yields is a false positive that only decryption rules out.
    let s = Server::start_with_init(&["--index-bits", "2"]);
    let t = s.token("system/*.cruds");
    let bundles = s.load_synth(&t, 12, SEED);
    let patients = loaded(&bundles, "Patient");
    let observations = loaded(&bundles, "Observation");
    assert_eq!(patients.len(), 12);
    for (target, p) in &patients {
        let family = p["name"][0]["family"].as_str().expect("family");
        let want: BTreeSet<String> = patients
            .iter()
            .filter(|(_, q)| {
                q["name"].as_array().into_iter().flatten().any(|n| {
                    n["family"]
                        .as_str()
                        .is_some_and(|f| f.to_lowercase().starts_with(&family.to_lowercase()))
                })
            })
            .map(|(t, _)| t.clone())
            .collect();
        let (got, _) = all_pages(&s, &t, &format!("Patient?family={}", enc(family)));
        assert_eq!(got, want, "family search");
        assert!(got.contains(target));
        let id = target.trim_start_matches("Patient/");
        let want: BTreeSet<String> = observations
            .iter()
            .filter(|(_, o)| o["subject"]["reference"] == target.as_str())
            .map(|(t, _)| t.clone())
            .collect();
        let (got, pages) = all_pages(&s, &t, &format!("Observation?subject={target}&_count=2"));
        assert_eq!(got, want, "subject search for {id}");
        assert!(pages >= want.len() / 2, "paged by 2");
        let (got, _) = all_pages(&s, &t, &format!("Patient/{id}/Observation"));
        assert_eq!(got, want, "compartment search");
    }
}

#[test]
fn cursors_are_opaque_bound_and_tamper_evident() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let bundles = s.load_synth(&t, 6, SEED);
    let family = bundles[0].0["entry"][0]["resource"]["name"][0]["family"]
        .as_str()
        .expect("family")
        .to_owned();
    let r = s.get("Observation?_count=3&_sort=-_lastUpdated", &t);
    assert_eq!(r.status, 200);
    let b = r.json();
    let next = next_link(&b).expect("a next link");
    assert!(next.contains("_cursor="));
    let r = s.get(&format!("Patient?family={}&_count=1", enc(&family)), &t);
    let b = r.json();
    for l in b["link"].as_array().expect("links") {
        let url = l["url"].as_str().unwrap_or("");
        if l["relation"] == "self" {
            // the client's own query, as applied, comes back in `self` only
            assert_eq!(
                url,
                format!("{}/Patient?_count=1&family={}", s.base, enc(&family))
            );
        } else {
            assert!(!url.contains(&family), "search value in a next link");
        }
    }
    // the cursor works for its client only
    let other = s.token("system/*.cruds");
    let r = s.send("GET", &next, Some(&other), None, &[]);
    assert_eq!(r.status, 400, "another client's cursor");
    assert!(r.is_outcome());
    // a flipped character is rejected
    let (head, cur) = next.split_once("_cursor=").expect("cursor");
    let mut bytes = cur.as_bytes().to_vec();
    let k = bytes.len() / 2;
    bytes[k] = if bytes[k] == b'A' { b'B' } else { b'A' };
    let forged = format!("{head}_cursor={}", String::from_utf8(bytes).expect("utf8"));
    let r = s.send("GET", &forged, Some(&t), None, &[]);
    assert_eq!(r.status, 400);
    assert!(r.is_outcome());
    // ... and the genuine one continues
    let r = s.send("GET", &next, Some(&t), None, &[]);
    assert_eq!(r.status, 200);
    // a cursor cannot be combined with other parameters than its own search's
    let r = s.send("GET", &format!("{next}&family=x"), Some(&t), None, &[]);
    assert_eq!(r.status, 400);
}

#[test]
fn bad_input_is_a_4xx_outcome_and_work_is_bounded() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    s.load_synth(&t, 3, SEED);
    for q in [
        "Patient?nonsense=1",
        "Patient?birthdate=1999-13-45",
        "Patient?family:below=x",
        "Patient?_sort=nonsense",
        "Observation?subject.name.family=x",
        "Observation?value-quantity=abc",
        "Patient?_include=*",
        "Patient?_count=-1",
        "NotAType?name=x",
    ] {
        let r = s.get(q, &t);
        assert!(
            (400..500).contains(&r.status),
            "{q}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.is_outcome(), "{q}: not an OperationOutcome");
    }
    // lenient handling ignores the unknown parameter with a warning
    let r = s.send(
        "GET",
        &format!("{}/Patient?nonsense=1", s.base),
        Some(&t),
        None,
        &[("Prefer", "handling=lenient")],
    );
    assert_eq!(r.status, 200);
    let b = r.json();
    assert!(
        b["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["search"]["mode"] == "outcome")
    );
    assert_eq!(ids(&b).len(), 3);
    // _count is capped
    let r = s.get("Observation?_count=100000", &t);
    assert_eq!(r.status, 200);
    assert!(r.json()["entry"].as_array().map_or(0, Vec::len) <= 1000);
    // POST _search with a form body
    let r = s.send(
        "POST",
        &format!("{}/Patient/_search", s.base),
        Some(&t),
        Some((
            "application/x-www-form-urlencoded",
            b"gender=male,female,other,unknown".to_vec(),
        )),
        &[],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(ids(&r.json()).len(), 3);
    // a search needs the s scope
    let read_only = s.token("system/*.r");
    assert_eq!(s.get("Patient?gender=male", &read_only).status, 403);
    assert_eq!(
        s.send("GET", &format!("{}/Patient", s.base), None, None, &[])
            .status,
        401
    );
}

#[test]
fn every_search_is_audited_with_what_it_disclosed() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let bundles = s.load_synth(&t, 2, SEED);
    let pid = bundles[0]
        .1
        .values()
        .find(|v| v.starts_with("Patient/"))
        .expect("patient")
        .clone();
    let r = s.get(&format!("Observation?subject={pid}&_count=4"), &t);
    assert_eq!(r.status, 200);
    let request_id = r.header("x-request-id").expect("request id").to_owned();
    let shown = ids(&r.json());
    assert!(!shown.is_empty());
    let events = audit_events(&s);
    let e = events
        .iter()
        .find(|e| e["request_id"] == request_id.as_str())
        .expect("the search's audit event");
    assert_eq!(e["interaction"], "search-type");
    let listed: BTreeSet<String> = e["entities"]
        .as_array()
        .expect("entities")
        .iter()
        .map(|x| {
            format!(
                "{}/{}",
                x["resource_type"].as_str().unwrap_or(""),
                x["resource_id"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(listed, shown, "the event lists exactly what was returned");
    assert_eq!(e["patient"], pid.trim_start_matches("Patient/"));
    let (ok, out) = s.audit_verify();
    assert!(ok, "{out}");
}

#[test]
fn index_check_reports_the_coincidence_band() {
    // 5-bit tokens suit indexes of 64 to 1,024 resources.
    let mut s = Server::start_with_init(&["--index-bits", "5"]);
    let t = s.token("system/*.cruds");
    s.load_synth(&t, 70, SEED);
    s.stop();
    let o = run(&[
        "index",
        "check",
        "--data-dir",
        s.data.to_str().expect("path"),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Patient.name\t70\t"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("Patient.name\t") && l.contains("\tin band")),
        "{out}"
    );
    assert!(o.status.success(), "index check failed:\n{out}");
    // the same data with 16-bit tokens is far below the band: tokens are nearly unique
    let mut s16 = Server::start();
    let t = s16.token("system/*.cruds");
    s16.load_synth(&t, 70, SEED);
    s16.stop();
    let o = run(&[
        "index",
        "check",
        "--data-dir",
        s16.data.to_str().expect("path"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("BELOW band"));
}
