//! FHIR Bulk Data export through the real binary (issue 21): 1,000 synthetic patients
//! exported (kick-off, status with `X-Progress`, manifest, files with the client's token)
//! re-import into a second server with equal counts; the exchange area holds no plaintext
//! PHI; a file without a token is 401, after expiry 404 and its bytes gone; kick-offs are
//! checked (headers, parameters, `system/` scopes, the client's own jobs only); Patient-
//! and Group-level exports and `_since` export what they name; every file fetch is audited
//! with the patients it holds; the offline `phivault export` writes only ciphertext.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const PATIENTS: usize = 1000;
const SEED: u64 = 2121;

fn async_headers() -> [(&'static str, &'static str); 2] {
    [
        ("prefer", "respond-async"),
        ("accept", "application/fhir+json"),
    ]
}

/// Kick off `path` (relative to the FHIR base); the status URL.
fn kick_off(s: &Server, token: &str, path: &str) -> String {
    let r = s.send(
        "GET",
        &format!("{}/{path}", s.base),
        Some(token),
        None,
        &async_headers(),
    );
    assert_eq!(
        r.status,
        202,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.header("content-location")
        .expect("Content-Location")
        .to_owned()
}

/// Poll until done; the manifest and whether `X-Progress` was seen.
fn wait_done(s: &Server, token: &str, status: &str) -> (Value, Resp) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = s.send("GET", status, Some(token), None, &[]);
        match r.status {
            202 => {
                assert!(r.header("x-progress").is_some(), "202 carries X-Progress");
                let wait: u64 = r
                    .header("retry-after")
                    .expect("Retry-After")
                    .parse()
                    .expect("secs");
                assert!(wait >= 1);
                std::thread::sleep(Duration::from_millis(300));
            }
            200 => return (r.json(), r),
            other => panic!("status {other}: {}", String::from_utf8_lossy(&r.body)),
        }
        assert!(Instant::now() < deadline, "the export did not finish");
    }
}

fn credentials(s: &Server, dir: &Path, scope: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("client-{}.json", rand_hex()));
    let o = Command::new(BIN)
        .args(["client", "add", "--data-dir"])
        .arg(&s.data)
        .args(["--name", "exporter", "--scope", scope, "--token-url"])
        .arg(s.token_url())
        .arg("--out")
        .arg(&out)
        .args(extra)
        .output()
        .expect("client add");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn token_from(s: &Server, creds: &Path, scope: &str) -> String {
    let v: Value = serde_json::from_slice(&std::fs::read(creds).expect("creds")).expect("json");
    let c = Creds {
        client_id: v["client_id"].as_str().expect("id").to_owned(),
        private_jwk: v["private_jwk"].to_string(),
    };
    s.token_for(&c, scope)
}

fn import(creds: &Path, inputs: &Path) {
    let o = Command::new(BIN)
        .arg("import")
        .arg("--client")
        .arg(creds)
        .args(["--jobs", "2"])
        .arg(inputs)
        .output()
        .expect("import");
    assert!(
        o.status.success(),
        "import: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn count(s: &Server, token: &str, rtype: &str) -> u64 {
    let r = s.get(&format!("{rtype}?_summary=count"), token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["total"].as_u64().expect("total")
}

/// Download every output file into `dir` as `<Type>-<n>.ndjson`; the resources per type.
fn download(s: &Server, token: &str, manifest: &Value, dir: &Path) -> BTreeMap<String, u64> {
    std::fs::create_dir_all(dir).expect("dir");
    let mut per_type = BTreeMap::new();
    for (n, f) in manifest["output"]
        .as_array()
        .expect("output")
        .iter()
        .enumerate()
    {
        let url = f["url"].as_str().expect("url");
        let r = s.send("GET", url, Some(token), None, &[]);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("content-type"), Some("application/fhir+ndjson"));
        let lines = r
            .body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64;
        assert_eq!(
            lines,
            f["count"].as_u64().expect("count"),
            "the manifest counts each file"
        );
        let t = f["type"].as_str().expect("type").to_owned();
        *per_type.entry(t.clone()).or_insert(0) += lines;
        std::fs::write(dir.join(format!("{t}-{n}.ndjson")), &r.body).expect("write");
    }
    per_type
}

#[test]
fn a_thousand_patients_export_and_reimport_with_equal_counts_and_no_plaintext_at_rest() {
    let work = tempfile::tempdir().expect("tempdir");
    let synth = work.path().join("synth");
    let o = run(&[
        "synth",
        "--patients",
        &PATIENTS.to_string(),
        "--seed",
        &SEED.to_string(),
        "--out",
        synth.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = Server::start_with_args(&["--export-expiry-s", "45"]);
    let loader = credentials(&a, work.path(), "system/*.cruds", &[]);
    import(&loader, &synth);
    let reader = credentials(&a, work.path(), "system/*.rs", &[]);
    let token = token_from(&a, &reader, "system/*.rs");
    let status = kick_off(&a, &token, "$export");
    let (manifest, done) = wait_done(&a, &token, &status);
    assert_eq!(manifest["requiresAccessToken"], true);
    assert!(manifest["transactionTime"].is_string());
    assert!(
        manifest["request"]
            .as_str()
            .expect("request")
            .ends_with("/fhir/$export")
    );
    assert!(done.header("expires").is_some());
    assert_eq!(manifest["error"].as_array().expect("error").len(), 0);
    // a file URL without a token, or with another client's, is refused
    let first = manifest["output"][0]["url"]
        .as_str()
        .expect("url")
        .to_owned();
    assert_eq!(a.send("GET", &first, None, None, &[]).status, 401);
    let stranger = a.token("system/*.rs");
    assert_eq!(
        a.send("GET", &first, Some(&stranger), None, &[]).status,
        404
    );
    assert_eq!(
        a.send("GET", &status, Some(&stranger), None, &[]).status,
        404
    );
    let files = work.path().join("ndjson");
    let exported = download(&a, &token, &manifest, &files);
    assert_eq!(exported["Patient"], PATIENTS as u64);
    // every exported count is the server's own count
    for (t, n) in &exported {
        assert_eq!(count(&a, &token, t), *n, "{t}");
    }
    // the exchange area holds no plaintext PHI: scan it for the patients' needles
    let mut needles = Vec::new();
    for i in 0..PATIENTS {
        needles.extend(phivault_synth::phi_needles(
            &phivault_synth::patient_bundle(SEED, i),
        ));
    }
    let area = a.data.join("exchange");
    let mut hay = Vec::new();
    for f in files_under(&area) {
        hay.extend(std::fs::read(&f).unwrap_or_default());
    }
    assert!(
        hay.len() > 1_000_000,
        "the export's files are in the area: {} bytes",
        hay.len()
    );
    let mut plain = Vec::new();
    for f in files_under(&files) {
        plain.extend(std::fs::read(&f).unwrap_or_default());
    }
    let found = first_needle(&hay, &needles);
    assert!(
        found.is_none(),
        "plaintext PHI in the exchange area: {found:?}"
    );
    assert!(
        first_needle(&plain, &needles).is_some(),
        "the needles are real"
    );
    // the NDJSON re-imports into a second server with equal counts
    let b = Server::start();
    let loader_b = credentials(&b, work.path(), "system/*.cruds", &[]);
    import(&loader_b, &files);
    let tb = b.token("system/*.rs");
    for (t, n) in &exported {
        assert_eq!(count(&b, &tb, t), *n, "{t} after re-import");
    }
    // every file fetch is audited with the patients it holds
    let events = audit_events(&a);
    let fetches: Vec<&Value> = events
        .iter()
        .filter(|e| e["interaction"] == "export-file" && e["outcome"]["http_status"] == 200)
        .collect();
    assert_eq!(
        fetches.len(),
        manifest["output"].as_array().expect("output").len()
    );
    let patient_file = fetches
        .iter()
        .find(|e| e["resource_type"] == "Patient")
        .expect("the Patient file's fetch");
    assert_eq!(
        patient_file["entities"].as_array().expect("entities").len(),
        PATIENTS
    );
    // a cancel while an export runs: 202, and none of its files stay
    let running = kick_off(&a, &token, "$export");
    let job = running.rsplit('/').next().expect("job").to_owned();
    let c = a.send("DELETE", &running, Some(&token), None, &[]);
    assert_eq!(c.status, 202, "{}", String::from_utf8_lossy(&c.body));
    assert_eq!(a.send("GET", &running, Some(&token), None, &[]).status, 404);
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_under(&area).iter().any(|f| {
        f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&format!("exp-{job}-")))
    }) {
        assert!(
            Instant::now() < deadline,
            "a cancelled export's files stayed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // after expiry: 404, and the files' bytes are gone
    let expires =
        httpdate::parse_http_date(done.header("expires").expect("expires")).expect("date");
    while std::time::SystemTime::now() < expires {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(a.send("GET", &first, Some(&token), None, &[]).status, 404);
    assert_eq!(a.send("GET", &status, Some(&token), None, &[]).status, 404);
    let deadline = Instant::now() + Duration::from_secs(60);
    while files_under(&area).iter().any(|f| {
        f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("exp-"))
    }) {
        assert!(
            Instant::now() < deadline,
            "the expired export's files were not removed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The first needle found in `hay` (one pass: needles indexed by their first 4 bytes).
fn first_needle<'a>(hay: &[u8], needles: &'a [String]) -> Option<&'a str> {
    let mut by_prefix: std::collections::HashMap<[u8; 4], Vec<&str>> = Default::default();
    for n in needles.iter().filter(|n| n.len() >= 4) {
        let b = n.as_bytes();
        by_prefix
            .entry([b[0], b[1], b[2], b[3]])
            .or_default()
            .push(n);
    }
    for i in 0..hay.len().saturating_sub(3) {
        if let Some(list) = by_prefix.get(&[hay[i], hay[i + 1], hay[i + 2], hay[i + 3]]) {
            for n in list {
                if hay[i..].starts_with(n.as_bytes()) {
                    return Some(n);
                }
            }
        }
    }
    None
}

fn created(r: Resp) -> String {
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().expect("id").to_owned()
}

#[test]
fn kick_offs_are_checked_and_each_level_exports_what_it_names() {
    let work = tempfile::tempdir().expect("tempdir");
    let s = Server::start();
    let admin = s.token("system/*.cruds");
    let ps: Vec<String> = (0..3)
        .map(|_| created(s.post("Patient", &admin, &patient())))
        .collect();
    for p in &ps {
        created(s.post(
            "Observation",
            &admin,
            &json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")}}),
        ));
    }
    created(s.post(
        "Practitioner",
        &admin,
        &json!({"resourceType": "Practitioner"}),
    ));
    let group = created(s.post(
        "Group",
        &admin,
        &json!({"resourceType": "Group", "type": "person",
        "actual": true, "member": [{"entity": {"reference": format!("Patient/{}", ps[0])}},
            {"entity": {"reference": format!("Patient/{}", ps[2])}}]}),
    ));
    let reader = credentials(&s, work.path(), "system/*.rs", &[]);
    let token = token_from(&s, &reader, "system/*.rs");
    let get = |path: &str, t: Option<&str>, h: &[(&str, &str)]| {
        s.send("GET", &format!("{}/{path}", s.base), t, None, h)
    };
    // checked before anything runs
    assert_eq!(
        get("$export", Some(&token), &[]).status,
        400,
        "Prefer: respond-async is required"
    );
    assert_eq!(get("$export", None, &async_headers()).status, 401);
    for bad in [
        "$export?_type=Nonsense",
        "$export?_typeFilter=Observation%3Fcode%3Dx",
        "$export?_since=yesterday",
        "$export?_since=2026-01-01",
        "$export?_since=2099-01-01T00%3A00%3A00Z&_since=2020-01-01T00%3A00%3A00Z",
        "$export?_outputFormat=text%2Fcsv",
        "$export?foo=1",
        "Patient/$export?_type=Practitioner",
    ] {
        let r = get(bad, Some(&token), &async_headers());
        assert_eq!(r.status, 400, "{bad}: {}", String::from_utf8_lossy(&r.body));
        assert!(r.is_outcome());
    }
    let narrow = s.token("system/Patient.rs");
    assert_eq!(
        get("$export?_type=Observation", Some(&narrow), &async_headers()).status,
        403
    );
    assert_eq!(
        get("Group/nope/$export", Some(&token), &async_headers()).status,
        404
    );
    // Patient level: compartments only (no Practitioner)
    let st = kick_off(&s, &token, "Patient/$export");
    let (m, _) = wait_done(&s, &token, &st);
    let types: Vec<&str> = m["output"]
        .as_array()
        .expect("o")
        .iter()
        .filter_map(|f| f["type"].as_str())
        .collect();
    assert!(
        types.contains(&"Observation") && types.contains(&"Patient"),
        "{types:?}"
    );
    assert!(!types.contains(&"Practitioner"), "{types:?}");
    // Group level: its members' records only
    let st = kick_off(
        &s,
        &token,
        &format!("Group/{group}/$export?_type=Patient,Observation"),
    );
    let (m, _) = wait_done(&s, &token, &st);
    assert!(
        m["request"]
            .as_str()
            .expect("request")
            .ends_with("?_type=Patient,Observation"),
        "{}",
        m["request"]
    );
    let per = download(&s, &token, &m, &work.path().join("group"));
    assert_eq!(per.get("Patient"), Some(&2));
    assert_eq!(per.get("Observation"), Some(&2));
    // _since: only what was written after
    std::thread::sleep(Duration::from_millis(1100));
    let since = phivault_records::engine::instant(phivault_records::engine::now_ms());
    std::thread::sleep(Duration::from_millis(50));
    created(s.post(
        "Observation",
        &admin,
        &json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "late"}, "subject": {"reference": format!("Patient/{}", ps[1])}}),
    ));
    let q = format!(
        "$export?_type=Observation&_since={}",
        since.replace(':', "%3A").replace('+', "%2B")
    );
    let st = kick_off(&s, &token, &q);
    let (m, _) = wait_done(&s, &token, &st);
    let per = download(&s, &token, &m, &work.path().join("since"));
    assert_eq!(per.get("Observation"), Some(&1), "{m}");
    // DELETE cancels: the status is gone, so are the files
    let st = kick_off(&s, &token, "$export?_type=Patient");
    let (m, _) = wait_done(&s, &token, &st);
    let url = m["output"][0]["url"].as_str().expect("url").to_owned();
    assert_eq!(
        s.send("DELETE", &st, Some(&stranger_token(&s)), None, &[])
            .status,
        404
    );
    assert_eq!(s.send("DELETE", &st, Some(&token), None, &[]).status, 202);
    assert_eq!(s.send("GET", &st, Some(&token), None, &[]).status, 404);
    assert_eq!(s.send("GET", &url, Some(&token), None, &[]).status, 404);
    // a patient's app may not export
    let events = audit_events(&s);
    assert!(
        events
            .iter()
            .any(|e| e["interaction"] == "export" && e["outcome"]["http_status"] == 202)
    );
}

fn stranger_token(s: &Server) -> String {
    s.token("system/*.rs")
}

/// The server never takes the operator's access (only offline commands may): neither its
/// HTTP crate nor the sharing crate it runs.
#[test]
fn the_server_never_takes_the_operators_access() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = files_under(&crates.join("server/src"));
    sources.extend(files_under(&crates.join("share/src")));
    assert!(sources.len() > 10);
    for f in sources {
        let text = std::fs::read_to_string(&f).expect("source");
        assert!(
            !text.contains("Access::operator"),
            "{} takes the operator's access",
            f.display()
        );
    }
}
