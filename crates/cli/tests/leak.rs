//! Acceptance 1: a copy of the data directory (or the server's log) reveals no patient
//! data, and what goes in through the API comes back out unchanged.
mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::Value;

const SEED: u64 = 8_675_309;
const PATIENTS: usize = 200;

/// Many needles searched in one pass over a haystack, bucketed by their first two bytes
/// (all needles are at least 4 bytes long).
struct Needles {
    /// (patient index, needle)
    list: Vec<(usize, Vec<u8>)>,
    buckets: Vec<Vec<u32>>,
}

impl Needles {
    fn new(list: Vec<(usize, Vec<u8>)>) -> Self {
        let mut buckets = vec![Vec::new(); 1 << 16];
        for (i, (_, n)) in list.iter().enumerate() {
            assert!(n.len() >= 2, "needle too short: {n:?}");
            buckets[(usize::from(n[0]) << 8) | usize::from(n[1])].push(i as u32);
        }
        Needles { list, buckets }
    }

    /// Indices of the needles occurring in `hay`.
    fn find(&self, hay: &[u8]) -> Vec<usize> {
        let mut found = vec![false; self.list.len()];
        for i in 0..hay.len().saturating_sub(1) {
            let b = &self.buckets[(usize::from(hay[i]) << 8) | usize::from(hay[i + 1])];
            for &k in b {
                let n = &self.list[k as usize].1;
                if hay[i..].starts_with(n) {
                    found[k as usize] = true;
                }
            }
        }
        found
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i)
            .collect()
    }

    /// Every (file, patient, needle) hit under `dir`.
    fn hits_under(&self, dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for f in files_under(dir) {
            let Ok(bytes) = std::fs::read(&f) else {
                continue; // a file removed while listing (e.g. the -shm at shutdown)
            };
            for k in self.find(&bytes) {
                let (p, n) = &self.list[k];
                out.push(format!(
                    "{}: patient {} needle {:?}",
                    f.display(),
                    p + 1,
                    String::from_utf8_lossy(n)
                ));
            }
        }
        out
    }
}

/// The PostgreSQL side of the leak test: no needle in `pg_dump`'s output of the store's
/// database, in the cluster's files of that database and its write-ahead log (after a
/// checkpoint), or in the database server's log.
fn postgres_holds_no_phi(s: &Server, needles: &Needles) {
    let cfg: Value = serde_json::from_slice(
        &std::fs::read(s.data.join("database.json")).expect("database.json"),
    )
    .expect("json");
    let url = cfg["url"].as_str().expect("url");
    let passfile = PathBuf::from(std::env::var("PGPASSFILE").expect("PGPASSFILE"));
    let dump = std::process::Command::new("pg_dump")
        .args(["-d", url])
        .env("PGPASSFILE", &passfile)
        .output()
        .expect("pg_dump runs");
    assert!(
        dump.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(dump.stdout.len() > 100_000, "the dump holds the store");
    let hits = needles.find(&dump.stdout);
    assert!(
        hits.is_empty(),
        "PHI in pg_dump's output: {} needles",
        hits.len()
    );
    let psql = |sql: &str| phivault_store::postgres::testdb::psql(url, &passfile, sql);
    psql("CHECKPOINT");
    let cluster = PathBuf::from(std::env::var("PHIVAULT_TEST_PG_DIR").expect("the test cluster"))
        .join("data");
    // the files of the store's tables, their indexes and TOAST (segments, free-space and
    // visibility maps included)
    let rels = psql(
        "SELECT pg_relation_filepath(c.oid) FROM pg_class c \
         WHERE c.relnamespace = 'public'::regnamespace AND pg_relation_filepath(c.oid) IS NOT NULL \
         UNION SELECT pg_relation_filepath(t.oid) FROM pg_class c JOIN pg_class t \
         ON t.oid = c.reltoastrelid OR t.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = c.reltoastrelid) \
         WHERE c.relnamespace = 'public'::regnamespace",
    );
    let mut scanned = 0u64;
    let mut files = 0;
    for rel in rels.lines().filter(|l| !l.is_empty()) {
        let base = cluster.join(rel);
        let dir = base.parent().expect("a relation's directory");
        let stem = base
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a file name");
        for entry in std::fs::read_dir(dir)
            .expect("the database's directory")
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == stem
                || name.starts_with(&format!("{stem}."))
                || name.starts_with(&format!("{stem}_"))
            {
                let bytes = std::fs::read(entry.path()).unwrap_or_default();
                scanned += bytes.len() as u64;
                files += 1;
                let hits = needles.find(&bytes);
                assert!(
                    hits.is_empty(),
                    "PHI in the table file {name}: {} needles",
                    hits.len()
                );
            }
        }
    }
    assert!(files >= 10, "the store's table files were found ({files})");
    // the write-ahead log also holds PostgreSQL's own catalogs (a new database's pages are
    // logged when it is made): a needle that PostgreSQL's stock catalogs hold (a name
    // that is also a time zone's, say) is not evidence there, and is left out of this part
    let template: Vec<usize> = {
        let t = psql("SELECT oid FROM pg_database WHERE datname = 'template1'");
        let mut found = std::collections::BTreeSet::new();
        for f in files_under(&cluster.join("base").join(t.trim())) {
            found.extend(needles.find(&std::fs::read(f).unwrap_or_default()));
        }
        found.into_iter().collect()
    };
    for f in files_under(&cluster.join("pg_wal")) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        scanned += bytes.len() as u64;
        let hits: Vec<usize> = needles
            .find(&bytes)
            .into_iter()
            .filter(|k| !template.contains(k))
            .collect();
        assert!(
            hits.is_empty(),
            "PHI in the write-ahead log {}: {:?}",
            f.display(),
            hits.iter()
                .map(|k| String::from_utf8_lossy(&needles.list[*k].1).into_owned())
                .collect::<Vec<_>>()
        );
    }
    let log = std::fs::read(cluster.join("server.log")).unwrap_or_default();
    assert!(
        needles.find(&log).is_empty(),
        "PHI in the database server's log"
    );
    println!(
        "leak: PostgreSQL: pg_dump {} bytes, {files} table files and the WAL {scanned} bytes, server log {} bytes: no PHI ({} needles also in PostgreSQL's own catalogs, not counted in the WAL)",
        dump.stdout.len(),
        log.len(),
        template.len()
    );
}

/// Compare two JSON values; numbers compare by value (so 5 and 5.0 are equal).
/// Differences are collected with their JSON path.
fn diff(a: &Value, b: &Value, path: &str, loose_numbers: &mut usize, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                match y.get(k) {
                    Some(vb) => diff(va, vb, &format!("{path}.{k}"), loose_numbers, out),
                    None => out.push(format!("{path}.{k}: missing from the server's copy")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the server"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                out.push(format!("{path}: length {} vs {}", x.len(), y.len()));
            }
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                diff(va, vb, &format!("{path}[{i}]"), loose_numbers, out);
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            if x != y {
                if x.as_f64() == y.as_f64() {
                    *loose_numbers += 1;
                } else {
                    out.push(format!("{path}: {x} vs {y}"));
                }
            }
        }
        _ => {
            if a != b {
                out.push(format!("{path}: {a} vs {b}"));
            }
        }
    }
}

/// Rewrite `reference` values found in `map` (urn:uuid → Type/id), as the server must.
fn rewrite_refs(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "reference"
                    && let Some(s) = x.as_str()
                    && let Some(t) = map.get(s)
                {
                    *x = Value::String(t.clone());
                } else {
                    rewrite_refs(x, map);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_refs(x, map)),
        _ => {}
    }
}

fn strip_server_fields(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
}

fn synth(dir: &Path) -> Vec<PathBuf> {
    let o = run(&[
        "synth",
        "--patients",
        &PATIENTS.to_string(),
        "--seed",
        &SEED.to_string(),
        "--out",
        dir.to_str().expect("utf-8 path"),
    ]);
    assert!(
        o.status.success(),
        "phivault synth failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let files: Vec<PathBuf> = (0..PATIENTS)
        .map(|i| dir.join(phivault_synth::bundle_file_name(i)))
        .collect();
    for f in &files {
        assert!(f.is_file(), "synth did not write {}", f.display());
    }
    files
}

#[test]
fn synthetic_patients_leave_no_phi_at_rest_and_read_back_unchanged() {
    let work = tempfile::tempdir().expect("tempdir");
    let files = synth(&work.path().join("synth"));

    // Needles per patient, and proof that they are really in the plaintext input.
    let mut bundles = Vec::new();
    let mut needle_list = Vec::new();
    let mut json_bytes = 0u64;
    for (i, f) in files.iter().enumerate() {
        let raw = std::fs::read(f).expect("bundle file");
        json_bytes += raw.len() as u64;
        let bundle: Value = serde_json::from_slice(&raw).expect("bundle json");
        assert_eq!(
            bundle,
            phivault_synth::patient_bundle(SEED, i),
            "the CLI's bundle differs from the library's"
        );
        let needles = phivault_synth::phi_needles(&bundle);
        assert!(
            needles.len() >= 6,
            "patient {}: too few needles: {needles:?}",
            i + 1
        );
        for n in &needles {
            // Decoded note text appears in the file as its base64 form.
            let b64 = base64::engine::general_purpose::STANDARD.encode(n);
            assert!(
                contains(&raw, n.as_bytes()) || contains(&raw, b64.as_bytes()),
                "patient {}: needle {n:?} is not in its own JSON file",
                i + 1
            );
            needle_list.push((i, n.as_bytes().to_vec()));
        }
        bundles.push((raw, bundle));
    }
    let needles = Needles::new(needle_list);
    let total_needles = needles.list.len();

    // The search itself works: a plaintext control file with every needle finds every needle.
    let control = tempfile::tempdir().expect("tempdir");
    let mut plain = Vec::new();
    for (k, (_, n)) in needles.list.iter().enumerate() {
        plain.extend_from_slice(format!("\x00{k}:").as_bytes());
        plain.extend_from_slice(n);
    }
    std::fs::create_dir_all(control.path().join("sub")).expect("mkdir");
    std::fs::write(control.path().join("sub/plain.bin"), &plain).expect("write control");
    assert_eq!(
        needles.hits_under(control.path()).len(),
        total_needles,
        "the needle search misses plaintext"
    );
    // ... and the synthetic JSON files themselves hit (all but decoded note text).
    assert!(!needles.hits_under(&work.path().join("synth")).is_empty());

    // Load every bundle as a transaction.
    let mut s = Server::start();
    let t = s.token("system/*.cruds");
    let mut pairs = Vec::new(); // (sent resource with refs rewritten, "Type/id")
    for (i, (raw, bundle)) in bundles.iter().enumerate() {
        let r = s.send(
            "POST",
            &s.base,
            Some(&t),
            Some(("application/fhir+json", raw.clone())),
            &[],
        );
        assert_eq!(
            r.status,
            200,
            "patient {}: transaction failed: {}",
            i + 1,
            String::from_utf8_lossy(&r.body)
        );
        let resp = r.json();
        assert_eq!(resp["type"], "transaction-response");
        let sent = bundle["entry"].as_array().expect("entries");
        let got = resp["entry"].as_array().expect("response entries");
        assert_eq!(sent.len(), got.len(), "patient {}: entry count", i + 1);
        let mut map = HashMap::new();
        let mut targets = Vec::new();
        for (e, g) in sent.iter().zip(got) {
            assert!(
                g["response"]["status"]
                    .as_str()
                    .is_some_and(|st| st.starts_with("201")),
                "patient {}: entry response {g}",
                i + 1
            );
            let loc = g["response"]["location"].as_str().expect("location");
            let rel = loc
                .strip_prefix(&format!("{}/", s.base))
                .unwrap_or_else(|| panic!("location {loc} is not under {}", s.base));
            let target = rel
                .split_once("/_history/")
                .map(|(a, _)| a)
                .unwrap_or(rel)
                .to_owned();
            let rtype = e["resource"]["resourceType"].as_str().expect("type");
            assert!(target.starts_with(&format!("{rtype}/")), "{target}");
            map.insert(
                e["fullUrl"].as_str().expect("fullUrl").to_owned(),
                target.clone(),
            );
            targets.push(target);
        }
        for (e, target) in sent.iter().zip(targets) {
            let mut res = e["resource"].clone();
            rewrite_refs(&mut res, &map);
            pairs.push((res, target));
        }
    }

    // Read every resource back: identical apart from id/meta.
    let mut loose_numbers = 0usize;
    let mut problems = Vec::new();
    for (sent, target) in &pairs {
        let r = s.get(target, &t);
        assert_eq!(r.status, 200, "GET {target}");
        let mut got = r.json();
        assert_eq!(
            got["id"].as_str(),
            target.split_once('/').map(|(_, id)| id),
            "{target}: id"
        );
        assert_eq!(got["meta"]["versionId"], "1", "{target}: versionId");
        strip_server_fields(&mut got);
        let mut want = sent.clone();
        strip_server_fields(&mut want);
        let mut d = Vec::new();
        diff(&want, &got, target, &mut loose_numbers, &mut d);
        problems.extend(d);
    }
    assert!(
        problems.is_empty(),
        "{} differences between what was sent and what was read back, e.g.:\n{}",
        problems.len(),
        problems[..problems.len().min(20)].join("\n")
    );

    // Search by the PHI itself (names, birth dates, identifiers, phones, note text as
    // :contains is not indexed): the values travel only in request URLs, which are never
    // logged, and reach the database only as truncated keyed tokens.
    let enc = |v: &str| -> String {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let mut searched = 0;
    for (i, (_, bundle)) in bundles.iter().enumerate().take(25) {
        let patient = bundle["entry"]
            .as_array()
            .and_then(|e| {
                e.iter()
                    .find(|e| e["resource"]["resourceType"] == "Patient")
            })
            .map(|e| e["resource"].clone())
            .expect("patient");
        let (_, target) = pairs
            .iter()
            .find(|(sent, _)| {
                sent["resourceType"] == "Patient" && sent["identifier"] == patient["identifier"]
            })
            .expect("loaded patient");
        let id = target.trim_start_matches("Patient/");
        let family = patient["name"][0]["family"].as_str().expect("family");
        let birth = patient["birthDate"].as_str().expect("birthDate");
        let ident = patient["identifier"][0]["value"]
            .as_str()
            .expect("identifier");
        let queries = [
            format!("Patient?family={}&birthdate={}", enc(family), enc(birth)),
            format!("Patient?identifier={}", enc(ident)),
            format!("Patient?name={}", enc(&family[..3.min(family.len())])),
            format!("Observation?patient={id}&_count=5"),
        ];
        for q in &queries {
            let r = s.get(q, &t);
            assert_eq!(
                r.status,
                200,
                "patient {}: search failed: {}",
                i + 1,
                String::from_utf8_lossy(&r.body)
            );
            let b = r.json();
            let ids: Vec<&str> = b["entry"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .filter_map(|e| e["resource"]["id"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            if q.starts_with("Patient?") {
                assert!(
                    ids.contains(&id),
                    "patient {}: search did not find the patient",
                    i + 1
                );
            } else {
                assert!(!ids.is_empty(), "patient {}: no observations found", i + 1);
            }
            if let Some(links) = b["link"].as_array() {
                // `self` restates the caller's own query to the caller; every other
                // link (`next`) carries only a sealed cursor
                for l in links.iter().filter(|l| l["relation"] != "self") {
                    let url = l["url"].as_str().unwrap_or("");
                    assert!(
                        !url.contains(family) && !url.contains(ident) && !url.contains(birth),
                        "search values in a link"
                    );
                }
            }
            searched += 1;
        }
    }
    println!("leak: {searched} searches by PHI values");

    // No needle anywhere under the data directory or in the log, while running ...
    let listing = |dir: &Path| -> Vec<String> {
        files_under(dir)
            .iter()
            .map(|p| {
                let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                let name = p.strip_prefix(dir).unwrap_or(p).display().to_string();
                format!("{name} ({len} B)")
            })
            .collect()
    };
    let running = listing(&s.data);
    if postgres_mode() {
        postgres_holds_no_phi(&s, &needles);
    } else {
        assert!(
            running.iter().any(|f| f.starts_with("phivault.db ")),
            "no database file under the data directory: {running:?}"
        );
    }
    println!("leak: searched while running: {running:?}");
    let hits = needles.hits_under(&s.data);
    assert!(
        hits.is_empty(),
        "PHI in the data directory while running:\n{}",
        hits[..hits.len().min(30)].join("\n")
    );
    let log_hits = needles.find(&s.logs());
    assert!(
        log_hits.is_empty(),
        "PHI in the server log: {:?}",
        log_hits
            .iter()
            .map(|k| String::from_utf8_lossy(&needles.list[*k].1).into_owned())
            .collect::<Vec<_>>()
    );

    // ... and after a clean stop.
    s.stop();
    println!("leak: searched after stop: {:?}", listing(&s.data));
    let hits = needles.hits_under(&s.data);
    assert!(
        hits.is_empty(),
        "PHI in the data directory after stop:\n{}",
        hits[..hits.len().min(30)].join("\n")
    );
    let log = s.logs();
    assert!(
        needles.find(&log).is_empty(),
        "PHI in the server log after stop"
    );

    let db_bytes: u64 = files_under(&s.data)
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("phivault.db"))
        })
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let dir_bytes: u64 = files_under(&s.data)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "leak: {PATIENTS} patients, {} resources, {total_needles} needles searched; \
         JSON {json_bytes} bytes; database {db_bytes} bytes ({:.2}x); data dir {dir_bytes} bytes; \
         log {} bytes; numbers equal only numerically: {loose_numbers}",
        pairs.len(),
        db_bytes as f64 / json_bytes as f64,
        log.len()
    );
}
