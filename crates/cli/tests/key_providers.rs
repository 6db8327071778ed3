//! Keys kept apart from the data, through the real binary: a copy of the whole data
//! directory — what leaks most often — opens nothing, in the `file` and `passphrase`
//! provider modes; the passphrase comes from a file, a descriptor or a systemd credential
//! and a wrong one changes nothing; a data directory of an older version, with its key
//! inside, is refused until `keys migrate` moves the key out.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

const PASSPHRASE: &str = "correct horse battery staple";

/// A provider mode: its `init` arguments (beside `--data-dir`).
struct Mode {
    name: &'static str,
    init: Vec<String>,
}

fn modes(tmp: &Path) -> Vec<Mode> {
    vec![
        Mode {
            name: "file",
            init: vec![],
        },
        Mode {
            name: "passphrase",
            init: vec![
                "--key-provider".into(),
                "passphrase".into(),
                "--passphrase-file".into(),
                tmp.join("passphrase").display().to_string(),
            ],
        },
    ]
}

/// `phivault init` in `mode` for `tmp/data`, then a running server on it.
fn start(tmp: tempfile::TempDir, mode: &Mode) -> Server {
    let data = tmp.path().join("data");
    if mode.name == "passphrase" {
        phivault_crypto::write_private_file(&tmp.path().join("passphrase"), PASSPHRASE.as_bytes())
            .expect("passphrase file");
    }
    let mut c = Command::new(BIN);
    c.args(["init", "--data-dir"]).arg(&data).args(&mode.init);
    key_home(&mut c, &data);
    let o = c.output().expect("init");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (child, origin, stderr) = launch_with(&data, &refs(&unlock_args(&data)));
    server_from(tmp, data, child, origin, stderr)
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn server_from(
    tmp: tempfile::TempDir,
    data: PathBuf,
    child: std::process::Child,
    origin: String,
    stderr: Arc<Mutex<Vec<u8>>>,
) -> Server {
    let ca = std::fs::read(data.join("tls/ca.pem")).expect("ca.pem");
    Server {
        child: Some(child),
        tmp,
        base: format!("{origin}/fhir"),
        origin,
        data,
        stderr,
        agent: agent_for(&ca),
    }
}

/// Run `serve` on `data` with `args`; Ok(stderr) when it refused (exited non-zero at once).
fn refused_serve(data: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<String, String> {
    let mut c = Command::new(BIN);
    c.args(["serve", "--data-dir"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("spawn");
    for _ in 0..400 {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let running = child.try_wait().ok().flatten().is_none();
    if running {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if running || out.status.success() {
        Err(err)
    } else {
        Ok(err)
    }
}

/// The key check value stored in a data directory's database.
fn kcv_of(data: &Path) -> Vec<u8> {
    let db = rusqlite::Connection::open_with_flags(
        data.join("phivault.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("db");
    db.query_row("SELECT v FROM meta WHERE k = 'key_check_value'", [], |r| {
        r.get(0)
    })
    .expect("kcv")
}

#[test]
fn a_whole_copy_of_the_data_directory_opens_nothing_in_every_provider_mode() {
    for which in 0..2 {
        let tmp = tempfile::tempdir().expect("tmp");
        let mode = modes(tmp.path()).remove(which);
        let mut s = start(tmp, &mode);
        let t = s.token("system/*.cruds");
        let loaded = s.load_synth(&t, 3, 1717);
        let needles: Vec<String> = loaded
            .iter()
            .flat_map(|(b, _)| phivault_synth::phi_needles(b))
            .collect();
        assert!(needles.len() > 10);
        let unlock = match mode.name {
            "passphrase" => phivault_keys::Unlock {
                passphrase: phivault_keys::PassphraseSource::File(s.tmp.path().join("passphrase")),
                ..Default::default()
            },
            _ => phivault_keys::Unlock::default(),
        };
        let (master, cfg) = phivault_keys::load(&s.data, &unlock).expect("the key opens");
        let key = *master.expose_to_provider();
        s.stop();

        // what leaks: a copy of the whole directory, somewhere else
        let scratch = tempfile::tempdir().expect("scratch");
        let copy = scratch.path().join("copy");
        let o = Command::new("cp")
            .args(["-a"])
            .arg(&s.data)
            .arg(&copy)
            .status()
            .expect("cp");
        assert!(o.success());
        let files = files_under(&copy);
        assert!(files.iter().any(|f| f.ends_with("phivault.db")));
        let kcv = kcv_of(&copy);
        for f in &files {
            let bytes = std::fs::read(f).expect("read");
            for n in &needles {
                assert!(
                    !contains(&bytes, n.as_bytes()),
                    "{}: PHI in {}",
                    mode.name,
                    f.display()
                );
            }
            for sp in key_spellings(&key) {
                assert!(
                    !contains(&bytes, &sp),
                    "{}: the master key in {}",
                    mode.name,
                    f.display()
                );
            }
            // everything small in the copy (keys/, tls/, records of the provider), tried
            // as a master key at every offset: none is this database's key
            if bytes.len() <= 64 * 1024 {
                for w in bytes.windows(32) {
                    let candidate =
                        phivault_crypto::MasterKey::from_bytes(w.try_into().expect("32"));
                    assert!(
                        !phivault_crypto::KeyHierarchy::new(&candidate)
                            .verify_key_check_value(&kcv),
                        "{}: a key that opens the data in {}",
                        mode.name,
                        f.display()
                    );
                }
            }
        }

        // the copy alone does not start: the key file is elsewhere (moved away here, as
        // on the thief's machine), the passphrase is in nobody's copy
        let empty = scratch.path().join("no-config");
        std::fs::create_dir(&empty).expect("mkdir");
        let err = match &cfg.provider {
            phivault_keys::Provider::File { key_file } => {
                let away = scratch.path().join("away.key");
                std::fs::rename(key_file, &away).expect("move key away");
                let r = refused_serve(&copy, &[], &[("XDG_CONFIG_HOME", &empty)]);
                std::fs::rename(&away, key_file).expect("move key back");
                r
            }
            _ => refused_serve(&copy, &[], &[("XDG_CONFIG_HOME", &empty)]),
        }
        .unwrap_or_else(|e| panic!("{}: the copy started: {e}", mode.name));
        assert!(err.contains("refusing to start"), "{}: {err}", mode.name);

        // and the original still serves with its key
        s.restart_with(&refs(&unlock_args(&s.data)));
        let t = s.token("system/Patient.rs");
        assert_eq!(s.get("Patient", &t).status, 200, "{}", mode.name);
    }
}

#[test]
fn a_passphrase_comes_from_a_file_a_descriptor_or_a_credential_and_a_wrong_one_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mode = modes(tmp.path()).remove(1);
    let mut s = start(tmp, &mode);
    let t = s.token("system/*.cruds");
    let id = s
        .post(
            "Patient",
            &t,
            &serde_json::json!({"resourceType": "Patient", "gender": "other"}),
        )
        .json()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    s.stop();
    let data = s.data.clone();
    let before: Vec<(PathBuf, Vec<u8>)> = files_under(&data)
        .into_iter()
        .map(|f| {
            let b = std::fs::read(&f).expect("read");
            (f, b)
        })
        .collect();

    // wrong passphrase, or none (no terminal): refused, nothing written
    let wrong = s.tmp.path().join("wrong");
    phivault_crypto::write_private_file(&wrong, b"incorrect horse battery").expect("write");
    let err = refused_serve(
        &data,
        &["--passphrase-file", wrong.to_str().expect("utf8")],
        &[],
    )
    .expect("a wrong passphrase is refused");
    assert!(err.contains("passphrase does not open"), "{err}");
    let err = refused_serve(&data, &[], &[]).expect("no passphrase is refused");
    assert!(err.contains("--passphrase-file"), "{err}");
    let after: Vec<(PathBuf, Vec<u8>)> = files_under(&data)
        .into_iter()
        .map(|f| {
            let b = std::fs::read(&f).expect("read");
            (f, b)
        })
        .collect();
    assert_eq!(before.len(), after.len(), "no file added or removed");
    for ((fa, a), (fb, b)) in before.iter().zip(after.iter()) {
        assert_eq!(fa, fb);
        assert!(a == b, "{} changed by a refused start", fa.display());
    }

    // from an inherited descriptor
    let pass = s.tmp.path().join("passphrase");
    let mut c = Command::new("bash");
    c.arg("-c").arg(format!(
        "exec '{BIN}' serve --data-dir '{}' --listen 127.0.0.1:0 --passphrase-fd 3 3<'{}'",
        data.display(),
        pass.display()
    ));
    let (child, origin, stderr) = spawn_command(c);
    let mut by_fd = server_from(
        tempfile::tempdir().expect("t"),
        data.clone(),
        child,
        origin,
        stderr,
    );
    let t = by_fd.token("system/Patient.rs");
    assert_eq!(by_fd.get(&format!("Patient/{id}"), &t).status, 200);
    by_fd.stop();

    // from a systemd credential directory
    let creds = s.tmp.path().join("credentials");
    std::fs::create_dir(&creds).expect("mkdir");
    std::fs::copy(&pass, creds.join("phivault-passphrase")).expect("cp");
    let mut c = Command::new(BIN);
    c.args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0"])
        .env("CREDENTIALS_DIRECTORY", &creds);
    let (child, origin, stderr) = spawn_command(c);
    let mut by_cred = server_from(
        tempfile::tempdir().expect("t"),
        data.clone(),
        child,
        origin,
        stderr,
    );
    let t = by_cred.token("system/Patient.rs");
    assert_eq!(by_cred.get(&format!("Patient/{id}"), &t).status, 200);
    by_cred.stop();
}

#[test]
fn a_key_kept_inside_the_data_directory_is_refused_until_it_is_moved_out() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mode = modes(tmp.path()).remove(0);
    let mut s = start(tmp, &mode);
    let t = s.token("system/*.cruds");
    let id = s
        .post(
            "Patient",
            &t,
            &serde_json::json!({"resourceType": "Patient", "gender": "other"}),
        )
        .json()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    s.stop();
    // the layout of earlier versions: master.key inside, no provider record
    let key_file = master_key_file(&s.data);
    std::fs::rename(&key_file, s.data.join("master.key")).expect("mv");
    std::fs::remove_file(s.data.join("keys/provider.json")).expect("rm");
    let err = refused_serve(&s.data, &[], &[]).expect("refused");
    assert!(
        err.contains("inside the data directory") && err.contains("keys migrate"),
        "{err}"
    );
    // a provider record pointing inside the tree is refused too
    let inside = serde_json::json!({"version": 1, "data_dir_id": "00112233445566778899aabbccddeeff",
        "provider": "file", "key_file": s.data.join("master.key"), "since": 0});
    std::fs::write(s.data.join("keys/provider.json"), inside.to_string()).expect("write");
    let err = refused_serve(&s.data, &[], &[]).expect("refused");
    assert!(err.contains("inside the data directory"), "{err}");
    std::fs::remove_file(s.data.join("keys/provider.json")).expect("rm");

    // keys migrate moves it out and shreds the inside copy
    let out = s.tmp.path().join("elsewhere.key");
    let o = run(&[
        "keys",
        "migrate",
        "--data-dir",
        s.data.to_str().expect("utf8"),
        "--to",
        "file",
        "--key-file",
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!s.data.join("master.key").exists());
    assert!(out.exists());
    let o = run(&[
        "keys",
        "status",
        "--data-dir",
        s.data.to_str().expect("utf8"),
    ]);
    let status = String::from_utf8_lossy(&o.stdout);
    assert!(
        status.contains("provider file") && status.contains("elsewhere.key"),
        "{status}"
    );
    s.restart();
    let t = s.token("system/Patient.rs");
    assert_eq!(s.get(&format!("Patient/{id}"), &t).status, 200);

    // and on to a passphrase: the key file is shredded, the records untouched
    s.stop();
    let pass = s.tmp.path().join("new-pass");
    phivault_crypto::write_private_file(&pass, PASSPHRASE.as_bytes()).expect("write");
    let o = run(&[
        "keys",
        "migrate",
        "--data-dir",
        s.data.to_str().expect("utf8"),
        "--to",
        "passphrase",
        "--new-passphrase-file",
        pass.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.exists(), "the old key file is gone");
    s.restart_with(&["--passphrase-file", pass.to_str().expect("utf8")]);
    std::fs::copy(&pass, s.tmp.path().join("passphrase")).expect("for client add");
    let t = s.token("system/Patient.rs");
    let r = s.get(&format!("Patient/{id}"), &t);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
