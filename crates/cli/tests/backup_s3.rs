//! Issue 19 through the real binary against S3: moto's server with its signature checks on
//! (common/moto_s3.rs), the server's credentials in its environment as in production.
//! What lands in the bucket is ciphertext under opaque names, each version locked in
//! compliance mode; the server's own credentials cannot remove a locked version; a bucket
//! without Object Lock works too. The checks read the bucket with requests of their own.
mod common;
use common::backup::*;
use common::moto_s3::{MotoS3, S3Answer, between};
use common::*;

use std::path::Path;
use std::process::{Command, Output};

use phivault_keys::sigv4::uri_encode;
use serde_json::Value;

const BUCKET: &str = "phi-backups";
const PREFIX: &str = "some/prefix";

/// A server shipping to a bucket of its own moto (the server dies first).
struct Shipping {
    s: Server,
    moto: MotoS3,
    url: String,
}

/// moto with signatures checked, a bucket (with Object Lock when `lock`), and a server
/// shipping to `PREFIX` in it with the credentials in its environment.
fn start_shipping(lock: bool, extra: &[&str]) -> Shipping {
    let moto = MotoS3::start_with_auth();
    moto.create_bucket(BUCKET, lock);
    let url = moto.url(BUCKET, PREFIX, "");
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let mut c = Command::new(BIN);
    c.args(["serve", "--data-dir"]).arg(&data);
    c.args(["--listen", "127.0.0.1:0", "--backup-target", &url])
        .args(["--drill-every", "0"])
        .args(extra);
    key_home(&mut c, &data);
    MotoS3::apply_env(&mut c, &tmp.path().join("home"), &moto.env());
    let s = Server::running(tmp, data, spawn_command(c));
    Shipping { s, moto, url }
}

/// A `phivault` backup command as an operator runs it: the test's key home, a seen file
/// of its own, moto's credentials.
fn backup_cmd(sh: &Shipping, args: &[&str]) -> Output {
    let dir = sh.s.tmp.path();
    let mut c = Command::new(BIN);
    c.args(args);
    key_home(&mut c, &sh.s.data);
    c.env("XDG_STATE_HOME", dir.join("state"));
    MotoS3::apply_env(&mut c, &dir.join("home"), &sh.moto.env());
    c.output().expect("run phivault")
}

fn restore(sh: &Shipping, to: &Path) -> Output {
    let to = to.display().to_string();
    backup_cmd(sh, &["restore", "--target", &sh.url, "--to", &to])
}

/// The first patient loaded is read back, with the family name it was loaded with.
fn reads_back(dir: &Path, loaded: &[(Value, std::collections::HashMap<String, String>)]) {
    let r = serve_restored(dir);
    let tok = r.token("system/*.cruds");
    let (bundle, map) = &loaded[0];
    let pid = map
        .values()
        .find(|t| t.starts_with("Patient/"))
        .expect("a patient");
    let got = r.get(pid, &tok);
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let family = &bundle["entry"][0]["resource"]["name"][0]["family"];
    assert!(family.is_string());
    assert_eq!(&got.json()["name"][0]["family"], family);
}

/// One entry of ListObjectVersions: a version, or a delete marker.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ver {
    key: String,
    id: String,
    marker: bool,
}

/// Every version and delete marker in the bucket (the whole bucket, not only the prefix).
fn versions(moto: &MotoS3) -> Vec<Ver> {
    let a = moto.s3("GET", &format!("/{BUCKET}"), "versions=", &[], b"");
    assert_eq!(a.status, 200, "ListObjectVersions: {}", a.body);
    assert_eq!(a.xml("IsTruncated").as_deref(), Some("false"), "{}", a.body);
    let mut out = Vec::new();
    for (tag, marker) in [("Version", false), ("DeleteMarker", true)] {
        for chunk in a.body.split(&format!("<{tag}>")).skip(1) {
            let inner = &chunk[..chunk.find(&format!("</{tag}>")).expect("closed")];
            out.push(Ver {
                key: between(inner, "Key").expect("Key"),
                id: between(inner, "VersionId").expect("VersionId"),
                marker,
            });
        }
    }
    out
}

/// A request for one version of an object.
fn on_version(moto: &MotoS3, method: &str, v: &Ver) -> S3Answer {
    let q = format!("versionId={}", uri_encode(&v.id, true));
    moto.s3(method, &format!("/{BUCKET}/{}", v.key), &q, &[], b"")
}

/// An object's name in the target (its key without the prefix).
fn name_of(key: &str) -> &str {
    key.strip_prefix(&format!("{PREFIX}/"))
        .unwrap_or_else(|| panic!("{key} is outside the prefix {PREFIX}/"))
}

/// The retain-until date (seconds) of a compliance-mode lock, `None` without a lock.
fn locked_until(a: &S3Answer) -> Option<i64> {
    let mode = a.header("x-amz-object-lock-mode");
    let until = a.header("x-amz-object-lock-retain-until-date");
    if mode.is_none() && until.is_none() {
        return None;
    }
    assert_eq!(mode, Some("COMPLIANCE"), "{:?}", a.headers);
    let rfc = time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(until.expect("a retain-until date"), &rfc);
    Some(t.expect("a retain-until date").unix_timestamp())
}

#[test]
fn every_object_in_the_bucket_is_ciphertext_under_an_opaque_name() {
    let sh = start_shipping(true, &["--backup-lock-days", "2"]);
    let s = &sh.s;
    let tok = s.token("system/*.cruds");
    let since = now_ms();
    let loaded = s.load_synth(&tok, 30, 4242);
    wait_shipped(s, since);
    assert_eq!(status(&s.data)["object_lock"], true);
    let mut needles: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for (bundle, map) in &loaded {
        needles.extend(phivault_synth::phi_needles(bundle));
        ids.extend(
            map.values()
                .map(|t| t.split('/').nth(1).expect("id").to_owned()),
        );
    }
    assert!(needles.len() > 100 && ids.len() > 100);
    let types: Vec<&str> = phivault_fhir::resource_types()
        .filter(|t| t.len() >= 5)
        .collect();
    let all = versions(&sh.moto);
    assert!(all.iter().all(|v| !v.marker), "{all:?}");
    let names: std::collections::BTreeSet<&str> = all.iter().map(|v| name_of(&v.key)).collect();
    assert!(names.len() >= 6 && names.contains("head"), "{names:?}");
    assert!(names.contains("deployment.json"), "{names:?}");
    // retention: --backup-lock-days 2 from the time of the put
    let (earliest, latest) = (now() as i64 + 2 * 86_400 - 900, now() as i64 + 2 * 86_400);
    for v in &all {
        let name = name_of(&v.key);
        let a = on_version(&sh.moto, "GET", v);
        assert_eq!(a.status, 200, "GET {name} {}: {}", v.id, a.body);
        let bytes = &a.bytes;
        if name != "deployment.json" {
            // sealed: an opaque hex name and no readable structure
            let hex = name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit());
            assert!(name == "head" || hex, "object name {name}");
            assert!(bytes.starts_with(b"PVBK"), "{name} is not sealed");
        }
        for t in &types {
            assert!(!name.contains(t), "a resource type in the name {name}");
            assert!(!contains(bytes, t.as_bytes()), "{t} in {name}");
        }
        for id in &ids {
            assert!(
                !name.contains(id.as_str()),
                "a resource id in the name {name}"
            );
            assert!(!contains(bytes, id.as_bytes()), "a resource id in {name}");
        }
        for n in &needles {
            assert!(!contains(bytes, n.as_bytes()), "PHI {n:?} in {name}");
        }
        // the head is overwritten at every manifest: never locked; the rest always
        match (name, locked_until(&a)) {
            ("head", None) => {}
            ("head", Some(t)) => panic!("the head is locked until {t}"),
            (_, Some(t)) => assert!((earliest..=latest).contains(&t), "{name} until {t}"),
            (_, None) => panic!("{name} (version {}) is not locked: {:?}", v.id, a.headers),
        }
    }
    // the records are there all the same: restored from the bucket, opened, served
    let to = s.tmp.path().join("restored");
    let out = ok(&restore(&sh, &to));
    assert!(out.contains("store: OK"), "{out}");
    reads_back(&to, &loaded);
}

#[test]
fn locked_backups_survive_a_thief_with_the_servers_credentials() {
    let mut sh = start_shipping(true, &[]);
    let tok = sh.s.token("system/*.cruds");
    // the epoch's snapshot first: every segment of the load is then needed by the newest
    // point
    wait_shipped(&sh.s, 0);
    let since = now_ms();
    let loaded = sh.s.load_synth(&tok, 5, 77);
    wait_shipped(&sh.s, since);
    // stopped: the last manifest names every segment
    sh.s.stop();
    let before = versions(&sh.moto);
    let body = |v: &Ver| on_version(&sh.moto, "GET", v).bytes;
    let bodies: Vec<(Ver, Vec<u8>)> = before.iter().map(|v| (v.clone(), body(v))).collect();

    // the thief holds the server's credentials (moto's IAM user, allowed s3:*) and asks for
    // each version to go for good: refused while its retention runs
    for v in before.iter().filter(|v| name_of(&v.key) != "head") {
        let a = on_version(&sh.moto, "DELETE", v);
        let name = name_of(&v.key);
        // (deployment.json gone for good: every restore from the bucket says "holds no
        // phivault backups (deployment.json is missing)")
        assert_eq!(
            a.status, 403,
            "{name} {} was deleted for good: {}",
            v.id, a.body
        );
        assert_eq!(a.xml("Code").as_deref(), Some("AccessDenied"), "{}", a.body);
    }
    // the head is never locked: gone for good, and a restore does not need it
    for v in before.iter().filter(|v| name_of(&v.key) == "head") {
        let a = on_version(&sh.moto, "DELETE", v);
        assert_eq!(a.status, 204, "deleting the head {}: {}", v.id, a.body);
    }
    let kept: Vec<Ver> = before
        .iter()
        .filter(|v| name_of(&v.key) != "head")
        .cloned()
        .collect();
    assert_eq!(versions(&sh.moto), kept);
    for (v, bytes) in bodies.iter().filter(|(v, _)| name_of(&v.key) != "head") {
        assert_eq!(&body(v), bytes, "{} changed", v.key);
    }

    // a plain DELETE of a segment (kind byte 1 of the sealed header) "succeeds": a delete
    // marker hides the current version — and the restore reads the locked version behind
    // it, the one the manifest names (its SHA-256), saying so
    let (seg, _) = bodies
        .iter()
        .filter(|(_, b)| b.starts_with(b"PVBK") && b.get(5) == Some(&1))
        .max_by_key(|(_, b)| b.len())
        .expect("a segment");
    let a = sh
        .moto
        .s3("DELETE", &format!("/{BUCKET}/{}", seg.key), "", &[], b"");
    assert_eq!(a.status, 204, "{}", a.body);
    let a = sh
        .moto
        .s3("GET", &format!("/{BUCKET}/{}", seg.key), "", &[], b"");
    assert_eq!(a.status, 404, "{}", a.body);
    let after = versions(&sh.moto);
    assert!(
        after.iter().any(|v| v.marker && v.key == seg.key),
        "a delete marker"
    );
    assert!(after.contains(seg), "the locked version stays: {after:?}");
    // and a forged object put over a snapshot part's name: a new current version
    let (part, _) = bodies
        .iter()
        .filter(|(_, b)| b.starts_with(b"PVBK") && b.get(5) == Some(&2))
        .max_by_key(|(_, b)| b.len())
        .expect("a snapshot part");
    let a = sh.moto.s3(
        "PUT",
        &format!("/{BUCKET}/{}", part.key),
        "",
        &[],
        b"PVBK not the snapshot",
    );
    assert!(a.status == 200, "overwrite: {}", a.body);
    let to = sh.s.tmp.path().join("restored");
    let o = restore(&sh, &to);
    let out = text(&o);
    assert!(o.status.success(), "the locked versions restore: {out}");
    assert!(
        out.contains(&format!(
            "{} was deleted or replaced in the target",
            name_of(&seg.key)
        )),
        "the hidden segment is named: {out}"
    );
    assert!(
        out.contains(&format!(
            "{} was deleted or replaced in the target",
            name_of(&part.key)
        )),
        "the replaced part is named: {out}"
    );
    assert!(out.contains("store: OK"), "{out}");
    // (a real deployment's lifecycle rule expires noncurrent versions only after their
    // retention, so what a thief hides or overwrites stays restorable for the lock's days)
    reads_back(&to, &loaded);
    reads_back(&to, &loaded);
}

#[test]
fn a_plain_bucket_works_without_object_lock() {
    let sh = start_shipping(false, &[]);
    let tok = sh.s.token("system/*.cruds");
    let since = now_ms();
    let loaded = sh.s.load_synth(&tok, 3, 99);
    wait_shipped(&sh.s, since);
    assert_eq!(status(&sh.s.data)["object_lock"], false);
    let q = "list-type=2&prefix=some%2Fprefix%2F";
    let list = sh.moto.s3("GET", &format!("/{BUCKET}"), q, &[], b"");
    assert_eq!(list.status, 200, "{}", list.body);
    let keys: Vec<String> = list
        .body
        .split("<Contents>")
        .skip(1)
        .map(|c| between(c, "Key").expect("Key"))
        .collect();
    assert!(keys.len() >= 5, "{keys:?}");
    for key in &keys {
        let a = sh
            .moto
            .s3("HEAD", &format!("/{BUCKET}/{key}"), "", &[], b"");
        assert_eq!(a.status, 200, "HEAD {key}");
        assert_eq!(
            locked_until(&a),
            None,
            "{key} carries a lock: {:?}",
            a.headers
        );
    }
    let out = ok(&backup_cmd(&sh, &["backup", "verify", "--target", &sh.url]));
    assert!(out.contains("backup verify: OK"), "{out}");
    let out = ok(&backup_cmd(&sh, &["backup", "list", "--target", &sh.url]));
    assert!(out.contains("snapshot"), "{out}");
    let to = sh.s.tmp.path().join("restored");
    ok(&restore(&sh, &to));
    reads_back(&to, &loaded);
}
