//! A newcomer's first hour, through the real binary: the start-up hint's commands work as
//! printed from where the server was started, and `phivault token` turns a credentials
//! file into a token (or says why not).
mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

/// A server child killed when the test ends, even by a failed assertion.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `serve` with `cwd` as its working directory; returns the child and its hint.
fn serve_in(cwd: &std::path::Path) -> (Running, String, Vec<String>) {
    let mut child = Command::new(BIN)
        .current_dir(cwd)
        // as a user runs it, not as cargo test does; the new key beside the test's files
        .env_remove("CARGO")
        .env_remove("CARGO_MANIFEST_DIR")
        .env("XDG_CONFIG_HOME", cwd.join("config"))
        .args([
            "serve",
            "--data-dir",
            "./phivault-data",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let listening = out.next().expect("a line").expect("utf8");
    let origin = listening
        .strip_prefix("listening on ")
        .expect("listening")
        .to_owned();
    std::thread::spawn(move || for _ in out {});
    // the hint follows the new-store banner on stderr; read until its curl line
    let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut hint = Vec::new();
    for line in err.by_ref() {
        let line = line.expect("utf8");
        let done = line.trim_start().starts_with("curl ");
        hint.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || for _ in err {});
    (Running(child), origin, hint)
}

#[test]
fn the_start_up_hint_works_as_printed_from_where_the_server_started() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_server, origin, hint) = serve_in(tmp.path());
    let text = hint.join("\n");
    assert!(text.contains("NEW, EMPTY data directory"), "{text}");
    let add = hint
        .iter()
        .find(|l| l.contains(" client add "))
        .unwrap_or_else(|| panic!("no client add line: {text}"));
    // outside cargo and off PATH, the hint names the binary by its path
    assert!(add.trim_start().starts_with(BIN), "{add}");
    let o = Command::new("bash")
        .current_dir(tmp.path())
        .args(["-c", add.trim()])
        .output()
        .expect("bash");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let curl = hint
        .iter()
        .find(|l| l.trim_start().starts_with("curl "))
        .expect("curl line");
    assert!(curl.contains(&format!("{origin}/fhir/Patient")), "{curl}");
    // the token part of the curl line, run as printed
    let token_cmd = curl
        .split("$(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("$(… token …)");
    let o = Command::new("bash")
        .current_dir(tmp.path())
        .args(["-c", token_cmd])
        .output()
        .expect("bash");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = String::from_utf8(o.stdout).expect("utf8");
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    // and the token searches, trusting the data directory's CA as the hint says
    let ca = std::fs::read(tmp.path().join("phivault-data/tls/ca.pem")).expect("ca");
    let r = try_send(
        &agent_for(&ca),
        "GET",
        &format!("{origin}/fhir/Patient?_count=10"),
        Some(token),
        None,
        &[],
    )
    .expect("search");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["type"], "searchset");
}

#[test]
fn token_prints_a_token_or_says_why_not() {
    let server = Server::start();
    let creds = server.tmp.path().join("reader.json");
    let o = run(&[
        "client",
        "add",
        "--data-dir",
        server.data.to_str().expect("utf8"),
        "--name",
        "reader",
        "--scope",
        "system/Patient.rs system/Observation.rs",
        "--token-url",
        &server.token_url(),
        "--out",
        creds.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let creds_arg = creds.to_str().expect("utf8");

    // the registered scopes by default; --scope narrows
    let o = run(&["token", "--client", creds_arg]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = String::from_utf8(o.stdout).expect("utf8").trim().to_owned();
    assert_eq!(server.get("Patient", &token).status, 200);
    let o = run(&[
        "token",
        "--client",
        creds_arg,
        "--scope",
        "system/Patient.rs",
    ]);
    assert!(o.status.success());
    let narrow = String::from_utf8(o.stdout).expect("utf8").trim().to_owned();
    assert_eq!(server.get("Patient", &narrow).status, 200);
    assert_eq!(server.get("Observation", &narrow).status, 403);

    // a scope the client was not registered for: refused, with the server's reason
    let o = run(&[
        "token",
        "--client",
        creds_arg,
        "--scope",
        "system/Encounter.rs",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid_scope"), "{err}");
    assert!(o.stdout.is_empty(), "nothing on stdout for $(…)");

    // a credentials file others can read is refused, naming the file
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let o = run(&["token", "--client", creds_arg]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(creds_arg), "{err}");
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    // no server there: says so instead of hanging
    let mut server = server;
    server.stop();
    let o = run(&["token", "--client", creds_arg]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot reach"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn client_add_refuses_to_overwrite_credentials_and_registers_nothing_then() {
    let server = Server::start();
    let creds = server.tmp.path().join("taken.json");
    std::fs::write(&creds, b"{}").expect("write");
    let o = run(&[
        "client",
        "add",
        "--data-dir",
        server.data.to_str().expect("utf8"),
        "--name",
        "x",
        "--scope",
        "system/*.rs",
        "--out",
        creds.to_str().expect("utf8"),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(&creds).expect("read"), b"{}");
}

#[test]
fn credentials_never_send_an_assertion_in_clear_and_typos_are_named() {
    let server = Server::start();
    let data = server.data.to_str().expect("utf8");
    let creds = server.tmp.path().join("plain.json");
    let o = run(&[
        "client",
        "add",
        "--data-dir",
        data,
        "--name",
        "plain",
        "--scope",
        "system/*.rs",
        "--token-url",
        "http://127.0.0.1:8443/auth/token",
        "--out",
        creds.to_str().expect("utf8"),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("https://"));
    assert!(!creds.exists());
    // a credentials file edited to an http:// token URL is refused before anything is sent
    let o = run(&[
        "client",
        "add",
        "--data-dir",
        data,
        "--name",
        "ok",
        "--scope",
        "system/*.rs",
        "--token-url",
        &server.token_url(),
        "--out",
        creds.to_str().expect("utf8"),
    ]);
    assert!(o.status.success());
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&creds).expect("read")).expect("json");
    v["token_url"] = server.token_url().replace("https://", "http://").into();
    let edited = server.tmp.path().join("edited.json");
    let o = std::process::Command::new("install")
        .args(["-m", "600", "/dev/null"])
        .arg(&edited)
        .status()
        .expect("install");
    assert!(o.success());
    std::fs::write(&edited, v.to_string()).expect("write");
    let o = run(&["token", "--client", edited.to_str().expect("utf8")]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not an https:// URL"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // an offline report on a mistyped directory names it
    let typo = server.tmp.path().join("dta");
    let o = run(&[
        "audit",
        "report",
        "--data-dir",
        typo.to_str().expect("utf8"),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(typo.to_str().expect("utf8")), "{err}");
}
