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
    let o = run(&["init", "--data-dir", data.to_str().expect("utf8")]);
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
        data.join("master.key"),
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
    std::fs::remove_file(a.join("master.key")).expect("rm");
    std::fs::copy(b.join("master.key"), a.join("master.key")).expect("cp");
    std::fs::set_permissions(a.join("master.key"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    let (refused, msg) = serve(&a, &[]);
    assert!(refused);
    assert!(msg.contains("refusing to start"), "{msg}");
}
