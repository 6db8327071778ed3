//! The server never starts in an insecure configuration; it refuses and says why.
mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn serve(data: &Path, extra: &[&str]) -> (bool, String) {
    let mut c = Command::new(BIN);
    c.args(["serve", "--data-dir"]).arg(data);
    if !extra.contains(&"--listen") {
        c.args(["--listen", "127.0.0.1:0"]);
    }
    c.args(extra);
    // A refusal exits at once; a server that starts would print its listening line and
    // keep running, so give it a bounded time and kill it.
    let mut child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    for _ in 0..200 {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let started = child.try_wait().ok().flatten().is_none();
    if started {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    (
        !started && !out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn init() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let mut c = Command::new(BIN);
    c.args(["init", "--data-dir"]).arg(&data);
    key_home(&mut c, &data);
    let o = c.output().expect("init");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (tmp, data)
}

#[test]
fn init_refuses_an_existing_directory() {
    let (_tmp, data) = init();
    let o = run(&["init", "--data-dir", data.to_str().expect("utf8")]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
}

#[test]
fn readable_master_key_is_refused() {
    let (_tmp, data) = init();
    std::fs::set_permissions(
        master_key_file(&data),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let (refused, msg) = serve(&data, &[]);
    assert!(refused, "server started with a world-readable key file");
    assert!(msg.contains("chmod 600"), "{msg}");
}

#[test]
fn shared_data_directory_is_refused() {
    let (_tmp, data) = init();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (refused, msg) = serve(&data, &[]);
    assert!(refused);
    assert!(msg.contains("chmod 700"), "{msg}");
}

#[test]
fn non_loopback_without_operator_certificate_is_refused() {
    let (_tmp, data) = init();
    let (refused, msg) = serve(&data, &["--listen", "0.0.0.0:0"]);
    assert!(refused);
    assert!(msg.contains("--tls-cert"), "{msg}");
}

#[test]
fn readable_tls_key_is_refused() {
    let (_tmp, data) = init();
    let key = data.join("tls/server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let (refused, msg) = serve(
        &data,
        &[
            "--tls-cert",
            data.join("tls/server.pem").to_str().expect("utf8"),
            "--tls-key",
            key.to_str().expect("utf8"),
        ],
    );
    assert!(refused);
    assert!(msg.contains("TLS private key"), "{msg}");
}

#[test]
fn plain_http_public_url_is_refused() {
    let (_tmp, data) = init();
    let (refused, msg) = serve(&data, &["--public-url", "http://example.test"]);
    assert!(refused);
    assert!(msg.contains("https://"), "{msg}");
}

#[test]
fn a_master_key_from_another_deployment_is_refused() {
    let (_tmp, a) = init();
    let (_tmp2, b) = init();
    let (ka, kb) = (master_key_file(&a), master_key_file(&b));
    std::fs::remove_file(&ka).expect("rm");
    std::fs::copy(&kb, &ka).expect("cp");
    std::fs::set_permissions(&ka, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (refused, msg) = serve(&a, &[]);
    assert!(refused);
    assert!(msg.contains("refusing to start"), "{msg}");
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused_and_named() {
    let mut first = Server::start();
    let (refused, err) = serve(&first.data, &[]);
    assert!(refused, "a second serve started: {err}");
    assert!(
        err.contains("in use by process") && err.contains(&first.pid().to_string()),
        "the refusal names the holder: {err}"
    );
    // deleting the pid file does not release the lock
    std::fs::remove_file(first.data.join("serve.lock")).expect("rm serve.lock");
    let (refused, err) = serve(&first.data, &[]);
    assert!(
        refused,
        "a second serve started once serve.lock was deleted: {err}"
    );
    assert!(err.contains("in use by another process"), "{err}");
    // the first server is untouched
    let t = first.token("system/*.rs");
    assert_eq!(first.get("Patient", &t).status, 200);
    // the lock dies with its holder, even by SIGKILL
    first.kill9();
    first.restart();
    assert_eq!(
        first.get("Patient", &first.token("system/*.rs")).status,
        200
    );
}

#[test]
fn a_mistyped_data_directory_is_not_created() {
    let tmp = tempfile::tempdir().expect("tmp");
    let missing_parent = tmp.path().join("phivault-dta");
    let (refused, err) = serve(&missing_parent.join("data"), &[]);
    assert!(
        refused,
        "serve created a store under a missing parent: {err}"
    );
    assert!(err.contains("does not exist"), "{err}");
    assert!(!missing_parent.exists(), "no directory is created");
    let o = run(&[
        "init",
        "--data-dir",
        missing_parent.join("data").to_str().expect("utf8"),
    ]);
    assert!(!o.status.success());
    assert!(!missing_parent.exists());
}

#[test]
fn a_new_store_is_announced_with_where_its_key_went() {
    let server = Server::start();
    let logs = String::from_utf8_lossy(&server.logs()).into_owned();
    assert!(logs.contains("NEW, EMPTY data directory"), "{logs}");
    let key = master_key_file(&server.data);
    assert!(
        logs.contains(&key.display().to_string()),
        "names the key file: {logs}"
    );
    assert!(
        !key.starts_with(&server.data),
        "the key lives outside the data"
    );
    // and a restart on the same directory says nothing of the kind
    let mut server = server;
    server.stop();
    server.restart();
    let again = String::from_utf8_lossy(&server.logs()).into_owned();
    assert!(!again.contains("NEW, EMPTY"), "{again}");
}

#[test]
fn a_listing_into_a_closed_pipe_ends_quietly() {
    let server = Server::start();
    let t = server.token("system/*.rs");
    for _ in 0..30 {
        assert_eq!(server.get("Patient", &t).status, 200);
    }
    for args in [
        &["audit", "report", "--data-dir"][..],
        &["audit", "checkpoints", "--data-dir"][..],
    ] {
        let mut child = Command::new(BIN)
            .args(args)
            .arg(&server.data)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        drop(child.stdout.take()); // the reader (`| head -0`) is gone
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(
            !err.contains("Broken pipe") && !err.contains("panick"),
            "{err}"
        );
    }
}
