//! `phivault import` through the real binary against a real server: synthetic bundles with
//! several workers, an import killed halfway and run again (no duplicates), NDJSON with ids
//! (a rerun changes no count), and bad inputs reported while the others load.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Server, run};
use serde_json::{Value, json};

const PATIENTS: usize = 60;
const SEED: u64 = 16;
const TYPES: [&str; 8] = [
    "Patient",
    "Practitioner",
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "Claim",
    "DocumentReference",
];

/// A credentials file for the server (`client add --out`), in `dir`.
fn credentials(s: &Server, dir: &Path) -> PathBuf {
    let port = s.origin.rsplit(':').next().unwrap_or("0");
    let out = dir.join(format!("import-client-{port}.json"));
    let o = Command::new(BIN)
        .args(["client", "add", "--data-dir"])
        .arg(&s.data)
        .args([
            "--name",
            "importer",
            "--scope",
            "system/*.cruds",
            "--token-url",
        ])
        .arg(s.token_url())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("client add");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn import_command(creds: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("import").arg("--client").arg(creds).args(args);
    c
}

fn import(creds: &Path, args: &[&str]) -> Output {
    import_command(creds, args).output().expect("import")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The server's count of `rtype` (`_summary=count`).
fn count(s: &Server, token: &str, rtype: &str) -> u64 {
    let r = s.get(&format!("{rtype}?_summary=count"), token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["total"].as_u64().expect("total")
}

fn counts(s: &Server, token: &str, types: &[&str]) -> BTreeMap<String, u64> {
    types
        .iter()
        .map(|t| ((*t).to_owned(), count(s, token, t)))
        .collect()
}

/// Resources per type in the synthetic bundles.
fn expected_counts() -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for i in 0..PATIENTS {
        let b = phivault_synth::patient_bundle(SEED, i);
        for e in b["entry"].as_array().expect("entries") {
            let t = e["resource"]["resourceType"].as_str().expect("type");
            *m.entry(t.to_owned()).or_insert(0) += 1;
        }
    }
    m
}

fn synth(dir: &Path) -> PathBuf {
    let out = dir.join("bundles");
    let o = run(&[
        "synth",
        "--patients",
        &PATIENTS.to_string(),
        "--seed",
        &SEED.to_string(),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// Inputs the resume file records as done.
fn recorded(resume: &Path) -> usize {
    std::fs::read(resume)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| {
            v["inputs"]
                .as_object()
                .map(|o| o.values().filter(|e| e["done"] == true).count())
        })
        .unwrap_or(0)
}

#[test]
fn synthetic_bundles_load_once_even_when_the_import_is_killed_halfway() {
    let work = tempfile::tempdir().expect("tempdir");
    let bundles = synth(work.path());
    let expected = expected_counts();
    assert_eq!(expected["Patient"], PATIENTS as u64);

    // a clean import with two workers
    let clean = Server::start();
    let creds = credentials(&clean, work.path());
    let o = import(&creds, &["--jobs", "2", bundles.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("{PATIENTS} of {PATIENTS} inputs loaded")),
        "{}",
        stderr(&o)
    );
    let token = clean.token("system/*.rs");
    assert_eq!(counts(&clean, &token, &TYPES), expected);
    drop(clean);

    // another server: the import is killed (SIGKILL) as soon as the resume file shows
    // progress (its first write follows the first acknowledged bundle)
    let s = Server::start();
    let creds = credentials(&s, work.path());
    let resume = work.path().join("progress.json");
    let resume_arg = resume.to_str().expect("utf-8");
    let args = [
        "--jobs",
        "2",
        "--resume",
        resume_arg,
        bundles.to_str().expect("utf-8"),
    ];
    let mut child = import_command(&creds, &args)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn import");
    let t0 = Instant::now();
    while recorded(&resume) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        assert!(
            child.try_wait().expect("wait").is_none(),
            "finished too early"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let token = s.token("system/*.rs");
    let at_kill = recorded(&resume);
    let patients_at_kill = count(&s, &token, "Patient");
    assert!(
        (1..PATIENTS).contains(&at_kill) && patients_at_kill < PATIENTS as u64,
        "killed after {at_kill} recorded, {patients_at_kill} patients"
    );

    // the same command again: it skips what was recorded and duplicates nothing
    let o = import(&creds, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("skipped (done before)"),
        "{}",
        stderr(&o)
    );
    assert_eq!(counts(&s, &token, &TYPES), expected);
    assert_eq!(recorded(&resume), PATIENTS);

    // even without the resume file every bundle is recognised: nothing is created twice
    std::fs::remove_file(&resume).expect("remove the resume file");
    let o = import(&creds, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(" (0 created, "), "{}", stderr(&o));
    assert_eq!(counts(&s, &token, &TYPES), expected);
    let (ok, out) = s.audit_verify();
    assert!(ok, "{out}");
}

fn ndjson(lines: impl IntoIterator<Item = Value>) -> String {
    lines.into_iter().map(|v| format!("{v}\n")).collect()
}

#[test]
fn ndjson_with_ids_loads_in_chunks_and_a_rerun_changes_no_count() {
    let work = tempfile::tempdir().expect("tempdir");
    let export = work.path().join("export");
    std::fs::create_dir(&export).expect("mkdir");
    let patients = ndjson((0..40).map(|i| {
        json!({"resourceType": "Patient", "id": format!("pt-{i}"),
               "name": [{"family": format!("Bulkexport{i}")}], "gender": "unknown"})
    }));
    // more than two chunks of 250, referring to patients of the other file
    let observations = ndjson((0..600).map(|i| {
        json!({"resourceType": "Observation", "id": format!("obs-{i}"), "status": "final",
               "code": {"text": "heart rate"}, "subject": {"reference": format!("Patient/pt-{}", i % 40)},
               "valueQuantity": {"value": 60 + i % 40, "unit": "/min"}})
    }));
    // no id, but an identifier: a conditional create
    let devices = ndjson((0..5).map(|i| {
        json!({"resourceType": "Device", "identifier": [{"system": "urn:example:device", "value": format!("d {i}")}]})
    }));
    std::fs::write(export.join("Observation.ndjson"), observations).expect("write");
    std::fs::write(export.join("Patient.ndjson"), patients).expect("write");
    std::fs::write(export.join("Device.ndjson"), devices).expect("write");

    let s = Server::start();
    let creds = credentials(&s, work.path());
    let dir = export.to_str().expect("utf-8");
    let o = import(&creds, &["--jobs", "3", dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("3 of 3 inputs loaded"),
        "{}",
        stderr(&o)
    );
    let default_resume = work.path().join("export.phivault-import.json");
    assert!(
        default_resume.is_file(),
        "the resume file sits beside the input"
    );
    let token = s.token("system/*.rs");
    let types = ["Patient", "Observation", "Device"];
    let first = counts(&s, &token, &types);
    assert_eq!(
        (first["Patient"], first["Observation"], first["Device"]),
        (40, 600, 5)
    );
    let r = s.get("Observation?subject=Patient/pt-7&_summary=count", &token);
    assert_eq!(r.json()["total"], 15, "references kept as exported");

    // the same command skips everything; with a fresh resume file everything is sent
    // again, and the counts do not move
    let o = import(&creds, &["--jobs", "3", dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("3 skipped"), "{}", stderr(&o));
    let fresh = work.path().join("fresh.json");
    let o = import(
        &creds,
        &[
            "--resume",
            fresh.to_str().expect("utf-8"),
            "--jobs",
            "2",
            dir,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("645 resources (0 created"),
        "{}",
        stderr(&o)
    );
    assert_eq!(counts(&s, &token, &types), first);
}

#[test]
fn a_bad_input_is_reported_without_its_content_while_the_others_load() {
    let work = tempfile::tempdir().expect("tempdir");
    let inputs = work.path().join("inputs");
    std::fs::create_dir(&inputs).expect("mkdir");
    for i in 0..3 {
        let b = phivault_synth::patient_bundle(SEED, i);
        std::fs::write(inputs.join(format!("good-{i}.json")), b.to_string()).expect("write");
    }
    // a transaction the server refuses (an unknown gender code), naming a PHI-like name
    let bad = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": "Zebulonsecret"}], "gender": "neither"},
         "request": {"method": "POST", "url": "Patient"}}]});
    std::fs::write(inputs.join("bad-bundle.json"), bad.to_string()).expect("write");
    std::fs::write(inputs.join("broken.json"), "{\"name\": \"Zebulonsecret\"").expect("write");
    // NDJSON whose second line the server refuses: the first and third still load
    let lines = ndjson([
        json!({"resourceType": "Patient", "id": "nd-1"}),
        json!({"resourceType": "Patient", "id": "nd-2", "gender": "Zebulonsecret"}),
        json!({"resourceType": "Patient", "id": "nd-3"}),
    ]);
    std::fs::write(inputs.join("mixed.ndjson"), lines).expect("write");

    let s = Server::start();
    let creds = credentials(&s, work.path());
    let o = import(&creds, &[inputs.to_str().expect("utf-8")]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad-bundle.json: the server answered 400: Bundle.entry[0].resource.gender"),
        "{err}"
    );
    assert!(err.contains("broken.json: not JSON"), "{err}");
    assert!(
        err.contains("mixed.ndjson: line 2: 400: Patient.gender"),
        "{err}"
    );
    assert!(err.contains("3 of 6 inputs loaded"), "{err}");
    assert!(err.contains("3 failed"), "{err}");
    assert!(
        !err.contains("Zebulonsecret"),
        "resource content in the output: {err}"
    );
    let token = s.token("system/*.rs");
    assert_eq!(count(&s, &token, "Patient"), 3 + 2);

    // a rerun sends only what failed (and fails the same way)
    let o = import(&creds, &[inputs.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("3 skipped"), "{}", stderr(&o));
    assert_eq!(count(&s, &token, "Patient"), 3 + 2);
}

#[test]
fn a_server_gone_midway_stops_the_import_with_a_consistent_resume_file() {
    let work = tempfile::tempdir().expect("tempdir");
    let bundles = synth(work.path());
    let mut s = Server::start();
    let creds = credentials(&s, work.path());
    let resume = work.path().join("progress.json");
    let child = import_command(
        &creds,
        &[
            "--resume",
            resume.to_str().expect("utf-8"),
            bundles.to_str().expect("utf-8"),
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn import");
    let t0 = Instant::now();
    while recorded(&resume) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    s.kill9();
    let o = child.wait_with_output().expect("wait");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    let done = recorded(&resume);
    assert!((1..PATIENTS).contains(&done), "{done} recorded");
}
