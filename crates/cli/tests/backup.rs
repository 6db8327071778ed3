//! Issue 19 through the real binary, on a `file://` target: what is uploaded is ciphertext
//! under opaque names; a kill -9 under write load loses no write acknowledged more than a
//! second before; a restore refuses a changed, a missing, a foreign object and a replayed
//! manifest; an erased patient stays erased in a restore of a point before the erasure;
//! the drill, the status and the administrator's API.
mod common;
use common::backup::*;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// `serve` arguments shipping to `target` (no drills unless asked).
fn ship_args(target: &Path) -> Vec<String> {
    vec![
        "--backup-target".into(),
        format!("file://{}", target.display()),
        "--drill-every".into(),
        "0".into(),
    ]
}

fn start_shipping(target: &Path) -> Server {
    let args = ship_args(target);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with_args(&refs)
}

/// `phivault restore` (or another backup command) with the test's key home and a seen
/// file beside the data.
fn backup_cmd(data: &Path, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(args);
    key_home(&mut c, data);
    c.env(
        "XDG_STATE_HOME",
        data.parent().expect("parent").join("state"),
    );
    c.output().expect("run phivault")
}

fn restore(data: &Path, target: &Path, to: &Path, extra: &[&str]) -> std::process::Output {
    let t = format!("file://{}", target.display());
    let mut args = vec!["restore", "--target", t.as_str(), "--to"];
    let to_s = to.display().to_string();
    args.push(&to_s);
    args.extend_from_slice(extra);
    backup_cmd(data, &args)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for f in files_under(from) {
        let rel = f.strip_prefix(from).expect("under");
        let dest = to.join(rel);
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).expect("mkdir");
        }
        std::fs::copy(&f, &dest).expect("copy");
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod");
}

/// The largest object of a target (a snapshot part, where records are).
fn largest(target: &Path) -> PathBuf {
    files_under(target)
        .into_iter()
        .max_by_key(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .expect("objects")
}

#[test]
fn every_object_uploaded_is_ciphertext_under_an_opaque_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    let target = tmp.path().join("bk");
    let s = start_shipping(&target);
    let tok = s.token("system/*.cruds");
    let since = now_ms();
    let loaded = s.load_synth(&tok, 30, 4242);
    // after the load: a snapshot (a new epoch follows the registration) and segments
    wait_shipped(&s, since);
    let mut needles: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for (bundle, map) in &loaded {
        needles.extend(phivault_synth::phi_needles(bundle));
        for t in map.values() {
            ids.push(t.split('/').nth(1).expect("id").to_owned());
        }
    }
    assert!(needles.len() > 100 && ids.len() > 100);
    let files = files_under(&target);
    assert!(files.len() >= 4, "{files:?}");
    let types: Vec<&str> = phivault_fhir::resource_types().collect();
    for f in &files {
        let name = f
            .strip_prefix(&target)
            .expect("under")
            .display()
            .to_string();
        let bytes = std::fs::read(f).expect("read");
        if name != "deployment.json" {
            // sealed: an opaque hex name and no readable structure
            assert!(
                name == "head" || (name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())),
                "object name {name}"
            );
            assert!(bytes.starts_with(b"PVBK"), "{name} is not sealed");
        }
        for t in types.iter().filter(|t| t.len() >= 5) {
            assert!(!name.contains(t), "a resource type in the name {name}");
            assert!(!contains(&bytes, t.as_bytes()), "{t} in {name}");
        }
        for id in &ids {
            assert!(
                !name.contains(id.as_str()),
                "a resource id in the name {name}"
            );
            assert!(!contains(&bytes, id.as_bytes()), "a resource id in {name}");
        }
        for n in &needles {
            assert!(!contains(&bytes, n.as_bytes()), "PHI {n:?} in {name}");
        }
    }
    // the records are there all the same: restored, opened, served
    let to = tmp.path().join("restored");
    let out = ok(&restore(&s.data, &target, &to, &[]));
    assert!(out.contains("store: OK"), "{out}");
    // a restored copy is another instance: it does not ship into the original's target
    let args = ship_args(&target);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = Command::new(BIN);
    c.args(["serve", "--data-dir"])
        .arg(&to)
        .args(["--listen", "127.0.0.1:0"])
        .args(&refs);
    key_home(&mut c, &s.data);
    let o = c.output().expect("serve");
    refused(&o, "another copy of this deployment");
    // a key file given where the source's is not
    let moved_key = tmp.path().join("elsewhere.key");
    std::fs::copy(master_key_file(&s.data), &moved_key).expect("copy key");
    let to2 = tmp.path().join("restored-with-key-file");
    let out = ok(&restore(
        &s.data,
        &target,
        &to2,
        &["--key-file", &moved_key.display().to_string()],
    ));
    assert!(out.contains("store: OK"), "{out}");
    let r = serve_restored(&to);
    let rtok = r.token("system/*.cruds");
    let (first, map) = &loaded[0];
    let pid = map
        .values()
        .find(|t| t.starts_with("Patient/"))
        .expect("a patient");
    let got = r.get(pid, &rtok);
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let family = first["entry"][0]["resource"]["name"][0]["family"].clone();
    assert_eq!(got.json()["name"][0]["family"], family);
}

#[test]
fn a_kill_9_under_write_load_loses_no_write_acknowledged_a_second_before() {
    let tmp = tempfile::tempdir().expect("tmp");
    let target = tmp.path().join("bk");
    let mut s = start_shipping(&target);
    let tok = s.token("system/*.cruds");
    wait_shipped(&s, 0);
    // writers log each acknowledgement (id, when)
    let acks: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (origin, agent, data) = (s.base.clone(), s.agent.clone(), s.data.clone());
    let mut writers = Vec::new();
    for w in 0..4 {
        let (acks, stop, agent, base, tok) = (
            acks.clone(),
            stop.clone(),
            agent.clone(),
            origin.clone(),
            tok.clone(),
        );
        writers.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let body =
                    json!({"resourceType": "Patient", "name": [{"family": format!("Ack{w}x{i}")}]});
                let r = agent
                    .post(&format!("{base}/Patient"))
                    .header("Authorization", &format!("Bearer {tok}"))
                    .header("Content-Type", "application/fhir+json")
                    .send(serde_json::to_vec(&body).expect("json"));
                let Ok(mut r) = r else { break };
                if r.status() != 201 {
                    break;
                }
                let v: Value = r.body_mut().read_json().unwrap_or(Value::Null);
                if let Some(id) = v["id"].as_str() {
                    acks.lock()
                        .expect("acks")
                        .push((id.to_owned(), Instant::now()));
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(4));
    let killed = Instant::now();
    s.kill9();
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let _ = w.join();
    }
    let acks = acks.lock().expect("acks").clone();
    let due: Vec<&String> = acks
        .iter()
        .filter(|(_, t)| killed.duration_since(*t) > Duration::from_secs(1))
        .map(|(id, _)| id)
        .collect();
    assert!(
        due.len() > 50,
        "too few writes acknowledged: {}",
        acks.len()
    );
    let to = tmp.path().join("restored");
    ok(&restore(&data, &target, &to, &[]));
    let r = serve_restored(&to);
    let rtok = r.token("system/*.cruds");
    let missing: Vec<&&String> = due
        .iter()
        .filter(|id| r.get(&format!("Patient/{id}"), &rtok).status != 200)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} writes acknowledged more than 1 s before the kill are missing",
        missing.len(),
        due.len()
    );
    // (most later ones are there too; none is required)
    eprintln!(
        "acknowledged {}, due {}, all present",
        acks.len(),
        due.len()
    );
    drop(r);
    // the server starts again: the segments shipped after its last manifest stay points
    // of the crashed run, named by the next manifest (restore as of the kill)
    let killed_at = now_ms() - i64::try_from(killed.elapsed().as_millis()).expect("ms");
    let head_before = std::fs::read(target.join("head")).expect("the crashed run's head");
    let args = ship_args(&target);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    s.restart_with(&refs);
    wait_shipped(&s, 0);
    s.stop();
    // the restarted run's manifests chain to the crashed run's newest: a restore led by the
    // older head walks forward across the restart
    let stale = tmp.path().join("bk-stale-head");
    copy_dir(&target, &stale);
    std::fs::write(stale.join("head"), &head_before).expect("old head");
    ok(&restore(
        &data,
        &stale,
        &tmp.path().join("across-the-restart"),
        &[],
    ));
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(killed_at) * 1_000_000)
        .expect("time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("rfc3339");
    let to = tmp.path().join("as-of-the-kill");
    ok(&restore(&data, &target, &to, &["--at", &at]));
    let r = serve_restored(&to);
    let rtok = r.token("system/*.cruds");
    for id in due.iter().rev().take(20) {
        assert_eq!(r.get(&format!("Patient/{id}"), &rtok).status, 200, "{id}");
    }
}

#[test]
fn a_restore_refuses_changed_missing_foreign_and_replayed_objects() {
    let tmp = tempfile::tempdir().expect("tmp");
    let target = tmp.path().join("bk");
    let mut s = start_shipping(&target);
    let tok = s.token("system/*.cruds");
    s.load_synth(&tok, 5, 7);
    wait_shipped(&s, now_ms() - 2_000);
    // the target as it was: a later copy of it is a rollback
    let old = tmp.path().join("bk-old");
    copy_dir(&target, &old);
    s.load_synth(&tok, 5, 8);
    std::thread::sleep(Duration::from_millis(1500));
    s.stop();
    let seen = tmp.path().join("seen.json");
    let seen_s = seen.display().to_string();
    // a clean restore records what it saw
    ok(&restore(
        &s.data,
        &target,
        &tmp.path().join("ok"),
        &["--seen-file", &seen_s],
    ));

    // a changed object
    let changed = tmp.path().join("bk-changed");
    copy_dir(&target, &changed);
    let victim = largest(&changed);
    let mut bytes = std::fs::read(&victim).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, &bytes).expect("write");
    let to = tmp.path().join("r1");
    refused(&restore(&s.data, &changed, &to, &[]), "SHA-256 differs");
    assert!(!to.exists(), "a refused restore leaves no directory");

    // a missing object
    let missing = tmp.path().join("bk-missing");
    copy_dir(&target, &missing);
    std::fs::remove_file(largest(&missing)).expect("rm");
    refused(
        &restore(&s.data, &missing, &to, &[]),
        "missing from the target",
    );
    assert!(!to.exists());

    // an object of another deployment in its place (same name, another server's bytes)
    let other_target = tmp.path().join("bk-other");
    let o = start_shipping(&other_target);
    let otok = o.token("system/*.cruds");
    o.load_synth(&otok, 3, 9);
    wait_shipped(&o, now_ms() - 2_000);
    let foreign = tmp.path().join("bk-foreign");
    copy_dir(&target, &foreign);
    let victim = largest(&foreign);
    std::fs::copy(largest(&other_target), &victim).expect("swap in");
    let out = restore(&s.data, &foreign, &to, &[]);
    refused(&out, "another deployment");
    assert!(!to.exists());

    // the old copy put back: older than the manifest seen here
    let replayed = tmp.path().join("bk-replayed");
    copy_dir(&old, &replayed);
    refused(
        &restore(&s.data, &replayed, &to, &["--seen-file", &seen_s]),
        "older than manifest",
    );
    assert!(!to.exists());
    // an old manifest put back as the head, newer objects left: the newer ones are found
    let head_back = tmp.path().join("bk-head-back");
    copy_dir(&target, &head_back);
    std::fs::copy(old.join("head"), head_back.join("head")).expect("old head");
    ok(&restore(
        &s.data,
        &head_back,
        &tmp.path().join("r2"),
        &["--seen-file", &seen_s],
    ));
    // the target itself rolled back, restored on a machine that never saw it (a fresh
    // seen file): the newest manifest recorded beside the period keys refuses it
    std::fs::remove_dir_all(&target).expect("rm");
    copy_dir(&old, &target);
    let fresh = tmp.path().join("fresh-seen.json");
    refused(
        &restore(
            &s.data,
            &target,
            &to,
            &["--seen-file", &fresh.display().to_string()],
        ),
        "recorded with the period keys",
    );
    assert!(!to.exists());
}

#[test]
fn an_erased_patient_stays_erased_in_a_restore_from_before_the_erasure() {
    let tmp = tempfile::tempdir().expect("tmp");
    let target = tmp.path().join("bk");
    let mut s = start_shipping(&target);
    let eraser = s.token_for(
        &s.add_client("system/Patient.$erase"),
        "system/Patient.$erase",
    );
    let tok = s.token("system/*.cruds");
    let loaded = s.load_synth(&tok, 3, 11);
    wait_shipped(&s, now_ms() - 1_000);
    let before = now_ms();
    std::thread::sleep(Duration::from_millis(1200));
    let pid = loaded[0]
        .1
        .values()
        .find(|t| t.starts_with("Patient/"))
        .expect("patient")
        .clone();
    let kept = loaded[1]
        .1
        .values()
        .find(|t| t.starts_with("Patient/"))
        .expect("patient")
        .clone();
    let body = json!({"resourceType": "Parameters",
        "parameter": [{"name": "reason", "valueString": "the patient asked"}]});
    let r = s.post(&format!("{pid}/$erase"), &eraser, &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    std::thread::sleep(Duration::from_millis(1500));
    s.stop();
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(before) * 1_000_000)
        .expect("time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("rfc3339");
    let to = tmp.path().join("before-erasure");
    let out = ok(&restore(&s.data, &target, &to, &["--at", &at]));
    assert!(
        out.contains("erasures re-applied (made after this point): 1"),
        "{out}"
    );
    // the same point by its audit position
    let events: u64 = out
        .split(" audit events")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the restored point's audit events");
    let by_seq = tmp.path().join("by-audit-seq");
    let out2 = ok(&restore(
        &s.data,
        &target,
        &by_seq,
        &["--at-audit-seq", &events.to_string()],
    ));
    assert!(
        out2.contains(&format!(": {events} audit events,")),
        "{out2}"
    );
    refused(
        &restore(
            &s.data,
            &target,
            &tmp.path().join("none"),
            &["--at-audit-seq", "0"],
        ),
        "no restore point",
    );
    refused(
        &restore(
            &s.data,
            &target,
            &tmp.path().join("bad"),
            &["--at", "yesterday"],
        ),
        "not an RFC 3339 time",
    );
    let r = serve_restored(&to);
    let rtok = r.token("system/*.cruds");
    assert_eq!(r.get(&pid, &rtok).status, 410, "the erased patient is gone");
    assert_eq!(r.get(&kept, &rtok).status, 200, "the others are not");
    drop(r);
    // and the latest point holds the erasure itself
    let latest = tmp.path().join("latest");
    let out = ok(&restore(&s.data, &target, &latest, &[]));
    assert!(!out.contains("erasures re-applied"), "{out}");
    let r = serve_restored(&latest);
    let rtok = r.token("system/*.cruds");
    assert_eq!(r.get(&pid, &rtok).status, 410);
}

#[test]
fn the_server_drills_reports_its_state_and_backup_verify_restores_the_newest_point() {
    let tmp = tempfile::tempdir().expect("tmp");
    let target = tmp.path().join("bk");
    let t = format!("file://{}", target.display());
    let s = Server::start_with_args(&["--backup-target", &t, "--drill-every", "60"]);
    let admin = s.token_for(
        &s.add_client("system/PhivaultKeys.u"),
        "system/PhivaultKeys.u",
    );
    let tok = s.token("system/*.cruds");
    s.load_synth(&tok, 3, 13);
    // the first drill runs once a snapshot is there
    let deadline = Instant::now() + Duration::from_secs(60);
    let drill = loop {
        let r = s.send(
            "GET",
            &format!("{}/admin/backup", s.origin),
            Some(&admin),
            None,
            &[],
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        if v["last_drill"].is_object() {
            break v;
        }
        assert!(Instant::now() < deadline, "no drill: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(drill["last_drill"]["ok"], true, "{drill}");
    assert!(drill["last_drill"]["rto_seconds"].as_f64().is_some());
    assert!(drill["last_point_ms"].as_i64().is_some());
    // a token without the right is refused
    let r = s.send(
        "GET",
        &format!("{}/admin/backup", s.origin),
        Some(&tok),
        None,
        &[],
    );
    assert_eq!(r.status, 403);
    // the command line reads the same state
    let out = ok(&backup_cmd(
        &s.data,
        &[
            "backup",
            "status",
            "--data-dir",
            &s.data.display().to_string(),
        ],
    ));
    assert!(
        out.contains("newest point:") && out.contains("last drill:"),
        "{out}"
    );
    wait_shipped(&s, 0);
    let out = ok(&backup_cmd(&s.data, &["backup", "verify", "--target", &t]));
    assert!(out.contains("backup verify: OK"), "{out}");
    let out = ok(&backup_cmd(&s.data, &["backup", "list", "--target", &t]));
    assert!(out.contains("snapshot"), "{out}");
}

#[test]
fn a_target_with_the_data_or_the_keys_is_refused_before_anything_is_made() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    for target in [
        data.clone(),
        data.join("bk"),
        tmp.path().join("config/phivault/bk"),
    ] {
        let mut c = Command::new(BIN);
        c.args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--listen", "127.0.0.1:0", "--backup-target"])
            .arg(format!("file://{}", target.display()));
        key_home(&mut c, &data);
        let o = c.output().expect("serve");
        refused(&o, "overlaps");
        assert!(!data.exists(), "nothing made for {}", target.display());
        assert!(!tmp.path().join("config/phivault").exists());
    }
}

#[test]
fn backup_now_takes_a_stopped_directory_and_refuses_a_running_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let target = tmp.path().join("bk");
    let t = format!("file://{}", target.display());
    let mut s = Server::start();
    let tok = s.token("system/*.cruds");
    s.load_synth(&tok, 2, 17);
    let data = s.data.display().to_string();
    let o = backup_cmd(
        &s.data,
        &["backup", "now", "--data-dir", &data, "--target", &t],
    );
    refused(&o, "running server");
    s.stop();
    ok(&backup_cmd(
        &s.data,
        &["backup", "now", "--data-dir", &data, "--target", &t],
    ));
    let to = tmp.path().join("restored");
    let out = ok(&restore(&s.data, &target, &to, &[]));
    assert!(out.contains("store: OK"), "{out}");
}
