//! The backup targets against real stores, through `phivault_backup::target::open`: a
//! `file://` temporary directory, and moto's S3 server (common/moto_s3.rs) with its
//! signature checking on.
//!
//! The S3 target reads its credentials from the AWS environment variables, which a test
//! cannot set in its own process (`std::env::set_var` is unsafe); so an S3 test starts
//! moto, then runs itself again as a child of this test binary (`--exact NAME`) with
//! moto's credentials in the child's environment, and checks afterwards, with its own
//! signed requests, what the child left in moto.
mod common;

use std::process::Command;

use base64::Engine as _;
use common::moto_s3::MotoS3;
use phivault_backup::target::{self, Target, TargetError, s3::S3Target};

/// In a child: the moto endpoint (`http://127.0.0.1:PORT`).
const CHILD_ENDPOINT: &str = "PHIVAULT_TEST_TARGET_ENDPOINT";
/// In a child: which case of the test to run.
const CHILD_CASE: &str = "PHIVAULT_TEST_TARGET_CASE";

/// Retention of the locked object: 2100-01-01T00:00:00Z.
const RETAIN_UNTIL: u64 = 4_102_444_800;
const LOCK_BUCKET: &str = "phi-backups-locked";
const PLAIN_BUCKET: &str = "phi-backups-plain";

/// The child's moto endpoint and case, when this process is a child.
fn child() -> Option<(String, String)> {
    let endpoint = std::env::var(CHILD_ENDPOINT).ok()?;
    Some((endpoint, std::env::var(CHILD_CASE).unwrap_or_default()))
}

/// Run `test` again in a child of this binary with `env` as its AWS environment and
/// `case`; it must pass.
fn in_child(test: &str, moto: &MotoS3, env: &[(&str, String)], case: &str) {
    let home = tempfile::tempdir().expect("home");
    let mut c = Command::new(std::env::current_exe().expect("test binary"));
    c.args([test, "--exact", "--nocapture", "--test-threads=1"]);
    MotoS3::apply_env(&mut c, home.path(), env);
    c.env(CHILD_ENDPOINT, moto.endpoint()).env(CHILD_CASE, case);
    let out = c.output().expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child {test} ({case}) failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "child {test} ({case}) ran no test:\n{stdout}"
    );
}

fn url(endpoint: &str, bucket: &str, prefix: &str, extra: &str) -> String {
    let mut u = format!("s3://{bucket}/{prefix}?endpoint={endpoint}&region=us-east-1");
    if !extra.is_empty() {
        u.push('&');
        u.push_str(extra);
    }
    u
}

fn is_config<T: std::fmt::Debug>(r: Result<T, TargetError>) -> bool {
    matches!(r, Err(TargetError::Config(_)))
}

/// What every target does: put, overwrite, get, list (sorted, sizes), delete, names.
fn suite(t: &dyn Target) {
    assert_eq!(t.list().expect("list empty"), vec![], "{}", t.describe());
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 7u32)
        .map(|i| u8::try_from(i.wrapping_mul(31) % 251).unwrap_or(0))
        .collect();
    t.put("base/0001/data.obj", &big, None).expect("put big");
    t.put("wal/0000000002.seg", b"two", None).expect("put");
    t.put("wal/0000000001.seg", b"one", None).expect("put");
    t.put("manifest.json", b"{}", None).expect("put");
    t.put("manifest.json", b"{\"v\":2}", None)
        .expect("overwrite");
    t.put("empty", b"", None).expect("put empty");
    assert_eq!(t.get("base/0001/data.obj").expect("get big"), Some(big));
    assert_eq!(
        t.get("manifest.json").expect("get"),
        Some(b"{\"v\":2}".to_vec())
    );
    assert_eq!(t.get("empty").expect("get empty"), Some(vec![]));
    assert_eq!(t.get("missing.obj").expect("get missing"), None);
    assert_eq!(t.get("wal").expect("a prefix is no object"), None);
    let all = vec![
        ("base/0001/data.obj".to_owned(), 3 * 1024 * 1024 + 7),
        ("empty".to_owned(), 0),
        ("manifest.json".to_owned(), 7),
        ("wal/0000000001.seg".to_owned(), 3),
        ("wal/0000000002.seg".to_owned(), 3),
    ];
    assert_eq!(t.list().expect("list"), all);
    t.delete("wal/0000000001.seg").expect("delete");
    t.delete("wal/0000000001.seg").expect("delete again");
    t.delete("never/there.obj").expect("delete absent");
    assert_eq!(t.get("wal/0000000001.seg").expect("get deleted"), None);
    let left: Vec<_> = all
        .into_iter()
        .filter(|(n, _)| n != "wal/0000000001.seg")
        .collect();
    assert_eq!(t.list().expect("list after delete"), left);
    for bad in ["../escape", "/abs", "Upper", "a//b", "sp ace", ""] {
        assert!(is_config(t.put(bad, b"x", None)), "put {bad:?}");
        assert!(is_config(t.get(bad)), "get {bad:?}");
        assert!(is_config(t.delete(bad)), "delete {bad:?}");
    }
    assert_eq!(t.list().expect("list after refusals"), left);
}

#[test]
fn the_file_target_keeps_objects_in_a_private_directory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("backups");
    let t = target::open(&format!("file://{}", dir.display()), None).expect("open");
    suite(&*t);
    assert!(!t.object_lock().expect("object lock"));
    // retention does not exist here; the object is written all the same
    t.put("held.obj", b"held", Some(RETAIN_UNTIL))
        .expect("put retained");
    t.delete("held.obj").expect("delete");
    assert_eq!(t.get("held.obj").expect("get"), None);
    use std::os::unix::fs::PermissionsExt as _;
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("wal")), 0o700);
    assert_eq!(mode(&dir.join("wal/0000000002.seg")), 0o600);
    // reopened: the same objects
    let again = target::open(&format!("file://{}", dir.display()), None).expect("reopen");
    assert_eq!(again.list().expect("list").len(), 4);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    match target::open(&format!("file://{}", dir.display()), None) {
        Err(TargetError::Config(why)) => {
            assert!(why.contains(&dir.display().to_string()), "{why}");
        }
        other => panic!(
            "a world-readable directory: {:?}",
            other.map(|t| t.describe())
        ),
    }
    assert!(target::open("file://relative/path", None).is_err());
}

#[test]
fn the_s3_target_puts_gets_lists_deletes_and_locks_with_signatures_checked() {
    let Some((endpoint, _)) = child() else {
        let moto = MotoS3::start_with_auth();
        in_child(
            "the_s3_target_puts_gets_lists_deletes_and_locks_with_signatures_checked",
            &moto,
            &moto.env(),
            "suite",
        );
        // what the child left, seen by requests of our own
        let versions = moto.s3(
            "GET",
            &format!("/{LOCK_BUCKET}"),
            "prefix=site-a%2Fheld.obj&versions=",
            &[],
            b"",
        );
        assert_eq!(versions.status, 200, "{}", versions.body);
        assert!(
            versions.body.contains("<DeleteMarker>"),
            "{}",
            versions.body
        );
        let at = versions.body.find("<Version>").expect("the locked version");
        let version =
            common::moto_s3::between(&versions.body[at..], "VersionId").expect("version id");
        let held = moto.s3(
            "GET",
            &format!("/{LOCK_BUCKET}/site-a/held.obj"),
            &format!("versionId={version}"),
            &[("x-amz-checksum-mode", "ENABLED")],
            b"",
        );
        assert_eq!(held.status, 200);
        assert_eq!(held.body, "kept by the lock");
        assert_eq!(held.header("x-amz-object-lock-mode"), Some("COMPLIANCE"));
        assert_eq!(
            held.header("x-amz-object-lock-retain-until-date"),
            Some("2100-01-01T00:00:00Z")
        );
        let sum = base64::engine::general_purpose::STANDARD
            .encode(ring::digest::digest(&ring::digest::SHA256, b"kept by the lock").as_ref());
        assert_eq!(
            held.header("x-amz-checksum-sha256"),
            Some(sum.as_str()),
            "{:?}",
            held.headers
        );
        return;
    };
    let lock_url = url(&endpoint, LOCK_BUCKET, "site-a", "max-keys=2");
    let plain_url = url(&endpoint, PLAIN_BUCKET, "", "");
    S3Target::open(&lock_url, None)
        .expect("open")
        .create_bucket(true)
        .expect("create the lock bucket");
    S3Target::open(&plain_url, None)
        .expect("open")
        .create_bucket(false)
        .expect("create the plain bucket");

    // the lock bucket, under a prefix, listed two keys a page
    let t = target::open(&lock_url, None).expect("open lock");
    suite(&*t);
    assert!(t.object_lock().expect("object lock"));
    // the plain bucket, no prefix, default page size
    let plain = target::open(&plain_url, None).expect("open plain");
    suite(&*plain);
    assert!(!plain.object_lock().expect("no object lock"));
    // another prefix of the same bucket is another target
    let other = target::open(&url(&endpoint, LOCK_BUCKET, "site-b", ""), None).expect("site-b");
    other.put("manifest.json", b"b", None).expect("put b");
    assert_eq!(
        t.get("manifest.json").expect("get a"),
        Some(b"{\"v\":2}".to_vec())
    );
    assert_eq!(
        other.list().expect("list b"),
        vec![("manifest.json".to_owned(), 1)]
    );
    assert_eq!(t.list().expect("list a").len(), 4);
    assert!(
        t.describe().starts_with(&format!(
            "s3://{LOCK_BUCKET}/site-a?endpoint=http://127.0.0.1:"
        )),
        "{}",
        t.describe()
    );

    // retention: the version stays whatever DELETE is asked
    let s3 = S3Target::open(&lock_url, None).expect("open");
    t.put("held.obj", b"kept by the lock", Some(RETAIN_UNTIL))
        .expect("put retained");
    let ids = s3.version_ids("held.obj").expect("versions");
    assert_eq!(ids.len(), 1, "{ids:?}");
    match s3.delete_version("held.obj", &ids[0]) {
        Err(TargetError::Locked(name)) => assert_eq!(name, "held.obj"),
        other => panic!("deleting a retained version: {other:?}"),
    }
    assert_eq!(
        t.get("held.obj").expect("get"),
        Some(b"kept by the lock".to_vec())
    );
    // a plain DELETE "succeeds": a delete marker hides the object, the version stays
    t.delete("held.obj").expect("delete");
    assert_eq!(t.get("held.obj").expect("get after delete"), None);
    assert!(!t.list().expect("list").iter().any(|(n, _)| n == "held.obj"));
    assert_eq!(s3.version_ids("held.obj").expect("versions"), ids);
    assert!(matches!(
        s3.delete_version("held.obj", &ids[0]),
        Err(TargetError::Locked(_))
    ));
    // a version without retention is removed by its id
    t.put("free.obj", b"free", None).expect("put free");
    let free = s3.version_ids("free.obj").expect("versions");
    assert_eq!(free.len(), 1);
    s3.delete_version("free.obj", &free[0])
        .expect("delete an unretained version");
    assert_eq!(
        s3.version_ids("free.obj").expect("versions"),
        Vec::<String>::new()
    );
    assert_eq!(t.get("free.obj").expect("get"), None);
    // retention asked of a bucket without Object Lock is refused
    match plain.put("held.obj", b"x", Some(RETAIN_UNTIL)) {
        Err(TargetError::Refused(why)) => assert!(why.contains("PUT object held.obj"), "{why}"),
        other => panic!("retention without Object Lock: {other:?}"),
    }
    // a missing bucket
    let none = target::open(&url(&endpoint, "no-such-bucket", "", ""), None).expect("open");
    match none.list() {
        Err(TargetError::Refused(why)) => assert!(why.contains("NoSuchBucket"), "{why}"),
        other => panic!("listing a missing bucket: {other:?}"),
    }
    assert!(matches!(none.get("x"), Err(TargetError::Refused(_))));
}

#[test]
fn the_s3_target_refuses_wrong_credentials_and_reports_an_absent_endpoint() {
    let name = "the_s3_target_refuses_wrong_credentials_and_reports_an_absent_endpoint";
    const WRONG: &str = "wrong-secret-3b1f0c6e9d2a";
    let Some((endpoint, case)) = child() else {
        let moto = MotoS3::start_with_auth();
        moto.create_bucket(PLAIN_BUCKET, false);
        let right = moto.env();
        let mut wrong_secret = right.clone();
        wrong_secret[1].1 = WRONG.to_owned();
        let mut unknown_key = right.clone();
        unknown_key[0].1 = "AKIAUNKNOWN000000000".to_owned();
        in_child(name, &moto, &wrong_secret, "SignatureDoesNotMatch");
        in_child(name, &moto, &unknown_key, "InvalidAccessKeyId");
        in_child(name, &moto, &right, "right");
        in_child(name, &moto, &[], "no credentials");
        // nothing was written by the refused puts
        let list = moto.s3("GET", &format!("/{PLAIN_BUCKET}"), "list-type=2", &[], b"");
        assert_eq!(list.status, 200, "{}", list.body);
        assert_eq!(list.xml("KeyCount").as_deref(), Some("1"), "{}", list.body);
        return;
    };
    let u = url(&endpoint, PLAIN_BUCKET, "", "");
    match case.as_str() {
        "right" => {
            let t = target::open(&u, None).expect("open");
            t.put("ok.obj", b"ok", None).expect("the right credentials");
            assert_eq!(t.get("ok.obj").expect("get"), Some(b"ok".to_vec()));
            // an endpoint where nothing listens is unavailable, not refused
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .expect("bind")
                .local_addr()
                .expect("addr")
                .port();
            let gone = target::open(
                &url(&format!("http://127.0.0.1:{port}"), "bkt", "", ""),
                None,
            )
            .expect("open");
            assert!(
                matches!(gone.get("x"), Err(TargetError::Unavailable(_))),
                "{:?}",
                gone.get("x")
            );
        }
        "no credentials" => match target::open(&u, None) {
            Err(TargetError::Config(why)) => assert!(why.contains("no AWS credentials"), "{why}"),
            other => panic!("no credentials: {:?}", other.map(|t| t.describe())),
        },
        code => {
            let t = target::open(&u, None).expect("open");
            let refusals = [
                (
                    "PUT object a.obj",
                    t.put("a.obj", b"body-bytes-never-shown", None).err(),
                ),
                ("GET object a.obj", t.get("a.obj").err()),
                ("ListObjectsV2", t.list().err()),
                ("DELETE object a.obj", t.delete("a.obj").err()),
                ("GetObjectLockConfiguration", t.object_lock().err()),
            ];
            for (op, err) in refusals {
                match err {
                    Some(TargetError::Refused(why)) => {
                        assert!(why.contains(code) && why.contains(op), "{why}");
                        assert!(why.contains("wrong or expired AWS credentials"), "{why}");
                        assert!(!why.contains(WRONG), "the secret in: {why}");
                        assert!(!why.contains("Signature="), "a signature in: {why}");
                        assert!(!why.contains("body-bytes"), "the body in: {why}");
                    }
                    other => panic!("{op} with {code}: {other:?}"),
                }
            }
        }
    }
}
