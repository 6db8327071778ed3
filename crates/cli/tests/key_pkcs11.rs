//! The `pkcs11` key provider through the real binary against a real SoftHSM2 token (Debian's
//! `softhsm2`; scripts/test.sh installs it and exports PHIVAULT_PKCS11_MODULE): a data
//! directory whose master key is wrapped by a non-extractable AES key in the token serves,
//! restarts and reads back; a wrong PIN, a missing token, key or module is refused at start
//! by name, writing nothing; a copy of the directory without the HSM opens nothing and
//! holds no PHI; the token's key cannot be read out or wrapped out of the token.
//!
//! Each test makes its own token in its own directory (`SOFTHSM2_CONF` for the processes it
//! starts). SoftHSM2 reads that variable only at `C_Initialize`, so the in-process check of
//! the key runs in a child of this test binary with it set.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

const PIN: &str = "20261206";
const SO_PIN: &str = "99887766";
const TOKEN: &str = "phivault-test";
const KEY: &str = "phivault-master-wrap";

/// SoftHSM2's PKCS#11 module; a missing one fails the test with the way to install it.
fn module() -> PathBuf {
    let m = std::env::var_os("PHIVAULT_PKCS11_MODULE").map_or_else(
        || PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
        PathBuf::from,
    );
    assert!(
        m.is_file(),
        "these tests need SoftHSM2's PKCS#11 module at {}: install Debian's softhsm2 (sudo apt-get install softhsm2; scripts/test.sh does) or set PHIVAULT_PKCS11_MODULE",
        m.display()
    );
    m
}

/// A test's own SoftHSM2 token directory, configuration and PIN files, and data directory.
struct Hsm {
    tmp: tempfile::TempDir,
    conf: PathBuf,
    module: PathBuf,
    data: PathBuf,
    pin: PathBuf,
}

impl Hsm {
    /// A fresh token labelled [`TOKEN`] with user PIN [`PIN`].
    fn new() -> Hsm {
        let module = module();
        let tmp = tempfile::tempdir().expect("tmp");
        let conf = write_conf(tmp.path(), "tokens");
        init_token(&conf, TOKEN);
        let pin = tmp.path().join("pin");
        private(&pin, &format!("{PIN}\n"));
        let data = tmp.path().join("data");
        Hsm {
            tmp,
            conf,
            module,
            data,
            pin,
        }
    }

    /// `phivault ARGS` with this token's configuration and the test's key home.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdin(Stdio::null());
        key_home(&mut c, &self.data);
        c
    }

    fn init_args(&self) -> Vec<String> {
        vec![
            "init".into(),
            "--data-dir".into(),
            self.data.display().to_string(),
            "--key-provider".into(),
            "pkcs11".into(),
            "--pkcs11-module".into(),
            self.module.display().to_string(),
            "--pkcs11-token".into(),
            TOKEN.into(),
            "--pkcs11-key".into(),
            KEY.into(),
            "--pkcs11-pin-file".into(),
            self.pin.display().to_string(),
        ]
    }

    fn init(&self) {
        let args = self.init_args();
        let o = self
            .cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .expect("init");
        assert!(
            o.status.success(),
            "init: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `serve` on `data` with `pin` and the configuration `conf` (None: no SOFTHSM2_CONF).
    fn serve_cmd(&self, data: &Path, pin: &Path, conf: Option<&Path>) -> Command {
        let mut c = self.cmd(&["serve", "--listen", "127.0.0.1:0", "--data-dir"]);
        c.arg(data).arg("--pkcs11-pin-file").arg(pin);
        match conf {
            Some(f) => c.env("SOFTHSM2_CONF", f),
            None => c.env_remove("SOFTHSM2_CONF"),
        };
        c
    }

    fn serve(&self) -> Server {
        let c = self.serve_cmd(&self.data, &self.pin, Some(&self.conf));
        let (child, origin, stderr) = try_spawn_server(c).unwrap_or_else(|e| panic!("serve: {e}"));
        let ca = std::fs::read(self.data.join("tls/ca.pem")).expect("ca.pem");
        Server {
            child: Some(child),
            tmp: tempfile::tempdir().expect("tmp"),
            data: self.data.clone(),
            base: format!("{origin}/fhir"),
            origin,
            stderr,
            agent: agent_for(&ca),
        }
    }

    /// `client add` (which opens the data directory through the HSM too).
    fn add_client(&self, s: &Server, scope: &str) -> Creds {
        let out = self.tmp.path().join(format!("creds-{}.json", rand_hex()));
        let o = self
            .cmd(&["client", "add", "--name", "pkcs11 test", "--scope", scope])
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--token-url")
            .arg(s.token_url())
            .arg("--out")
            .arg(&out)
            .arg("--pkcs11-pin-file")
            .arg(&self.pin)
            .output()
            .expect("client add");
        assert!(
            o.status.success(),
            "client add: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&out).expect("creds")).expect("json");
        Creds {
            client_id: v["client_id"].as_str().expect("client_id").to_owned(),
            private_jwk: v["private_jwk"].to_string(),
        }
    }
}

fn write_conf(dir: &Path, tokens: &str) -> PathBuf {
    let tokendir = dir.join(tokens);
    std::fs::create_dir_all(&tokendir).expect("tokendir");
    let conf = dir.join(format!("{tokens}.conf"));
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokendir.display()
        ),
    )
    .expect("softhsm2.conf");
    conf
}

fn init_token(conf: &Path, label: &str) {
    let o = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args(["--init-token", "--free", "--label", label, "--pin", PIN])
        .args(["--so-pin", SO_PIN])
        .output()
        .expect("softhsm2-util: install Debian's softhsm2");
    assert!(
        o.status.success(),
        "softhsm2-util --init-token: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn private(path: &Path, text: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("private file");
    f.write_all(text.as_bytes()).expect("write");
}

/// `serve` must refuse: its exit code (non-zero) and message.
fn refused(c: Command) -> String {
    match try_spawn_server(c) {
        Ok((mut child, origin, _)) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started on {origin} where it must refuse");
        }
        Err(e) => {
            assert!(!e.starts_with("exit Some(0)"), "exit 0 on a refusal: {e}");
            e
        }
    }
}

/// Every file under `dir` and its bytes, except the serve lock's pid note.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.file_name().is_none_or(|n| n != "serve.lock"))
        .map(|p| {
            let b = std::fs::read(&p).expect("read");
            (p, b)
        })
        .collect()
}

#[test]
fn a_pkcs11_data_directory_serves_restarts_and_migrates_both_ways() {
    let hsm = Hsm::new();
    hsm.init();
    // recorded: module, token and key labels; the wrapped key beside the data, no key file
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(hsm.data.join("keys/provider.json")).expect("provider.json"),
    )
    .expect("json");
    assert_eq!(cfg["provider"], "pkcs11", "{cfg}");
    assert_eq!(cfg["token_label"], TOKEN);
    assert_eq!(cfg["key_label"], KEY);
    assert_eq!(cfg["module"], hsm.module.display().to_string());
    assert!(hsm.data.join("keys/master.pkcs11").is_file());
    assert!(!hsm.data.join("master.key").exists());
    assert!(
        !hsm.tmp.path().join("config/phivault").exists()
            || files_under(&hsm.tmp.path().join("config/phivault")).is_empty(),
        "no key file was written"
    );
    let o = hsm
        .cmd(&["keys", "status", "--data-dir"])
        .arg(&hsm.data)
        .output()
        .expect("keys status");
    let status = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{status}");
    for want in [
        "provider pkcs11",
        &format!("{KEY:?}"),
        &format!("{TOKEN:?}"),
        &hsm.module.display().to_string(),
    ] {
        assert!(status.contains(want), "keys status lacks {want}: {status}");
    }

    let mut s = hsm.serve();
    let creds = hsm.add_client(&s, "system/*.cruds");
    let token = s.token_for(&creds, "system/*.cruds");
    let r = s.post("Patient", &token, &patient());
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let first = s.get(&format!("Patient/{id}"), &token);
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["name"][0]["family"], "Quixotewright");

    // restart: the master key comes through the HSM again
    s.stop();
    let s = hsm.serve();
    let token = s.token_for(&creds, "system/*.cruds");
    let again = s.get(&format!("Patient/{id}"), &token);
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["name"], first.json()["name"]);
    drop(s);

    // pkcs11 -> passphrase: the wrapped key is shredded, the records open unchanged
    let pass = hsm.tmp.path().join("passphrase");
    private(&pass, "a long enough test passphrase\n");
    let o = hsm
        .cmd(&["keys", "migrate", "--to", "passphrase", "--data-dir"])
        .arg(&hsm.data)
        .arg("--pkcs11-pin-file")
        .arg(&hsm.pin)
        .arg("--new-passphrase-file")
        .arg(&pass)
        .output()
        .expect("migrate");
    assert!(
        o.status.success(),
        "migrate to passphrase: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!hsm.data.join("keys/master.pkcs11").exists());
    let mut c = hsm.cmd(&["serve", "--listen", "127.0.0.1:0", "--data-dir"]);
    c.arg(&hsm.data).arg("--passphrase-file").arg(&pass);
    let (child, origin, _err) = try_spawn_server(c).unwrap_or_else(|e| panic!("serve: {e}"));
    let mut child = scopeguard(child);
    let agent = agent_for(&std::fs::read(hsm.data.join("tls/ca.pem")).expect("ca"));
    let tok = {
        let s = Server {
            child: None,
            tmp: tempfile::tempdir().expect("tmp"),
            data: hsm.data.clone(),
            base: format!("{origin}/fhir"),
            origin: origin.clone(),
            stderr: Arc::new(Mutex::new(Vec::new())),
            agent: agent.clone(),
        };
        let t = s.token_for(&creds, "system/*.cruds");
        let r = s.get(&format!("Patient/{id}"), &t);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["name"], first.json()["name"]);
        t
    };
    drop(tok);
    child.stop();

    // passphrase -> pkcs11 (the same token key, found by its label)
    let o = hsm
        .cmd(&["keys", "migrate", "--to", "pkcs11", "--data-dir"])
        .arg(&hsm.data)
        .arg("--passphrase-file")
        .arg(&pass)
        .arg("--pkcs11-module")
        .arg(&hsm.module)
        .args(["--pkcs11-token", TOKEN, "--pkcs11-key", KEY])
        .arg("--pkcs11-pin-file")
        .arg(&hsm.pin)
        .output()
        .expect("migrate");
    assert!(
        o.status.success(),
        "migrate to pkcs11: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!hsm.data.join("keys/master.passphrase").exists());
    let s = hsm.serve();
    let token = s.token_for(&creds, "system/*.cruds");
    let back = s.get(&format!("Patient/{id}"), &token);
    assert_eq!(back.status, 200);
    assert_eq!(back.json()["name"], first.json()["name"]);
}

/// A child server stopped (SIGTERM) when dropped.
struct Guard(Option<Child>);
fn scopeguard(c: Child) -> Guard {
    Guard(Some(c))
}
impl Guard {
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}
impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_wrong_pin_a_missing_token_key_or_module_is_refused_at_start_by_name_writing_nothing() {
    let hsm = Hsm::new();
    // init refusals leave no data directory behind
    let bad_pin = hsm.tmp.path().join("bad-pin");
    private(&bad_pin, "11111111\n");
    let mut args = hsm.init_args();
    let at = args.len() - 1;
    args[at] = bad_pin.display().to_string();
    let o = hsm
        .cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .expect("init");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("user PIN") && err.contains("wrong") && err.contains(TOKEN),
        "{err}"
    );
    assert!(!hsm.data.exists(), "a refused init leaves nothing");
    let mut args = hsm.init_args();
    args[6] = "/nonexistent/libvendor-pkcs11.so".into();
    let o = hsm
        .cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .expect("init");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/nonexistent/libvendor-pkcs11.so"),
        "{err}"
    );
    assert!(!hsm.data.exists());
    let mut args = hsm.init_args();
    args[8] = "no-such-token".into();
    let o = hsm
        .cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .expect("init");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no PKCS#11 token labelled \"no-such-token\""),
        "{err}"
    );
    assert!(!hsm.data.exists());

    hsm.init();
    drop(hsm.serve()); // served once: its files are what a refused start must not change
    let before = snapshot(&hsm.data);

    // a wrong PIN
    let err = refused(hsm.serve_cmd(&hsm.data, &bad_pin, Some(&hsm.conf)));
    assert!(
        err.contains("refusing to start")
            && err.contains("user PIN of PKCS#11 token")
            && err.contains("wrong"),
        "{err}"
    );
    // the token is gone (another token directory: the HSM has other tokens only)
    let other = write_conf(hsm.tmp.path(), "other-tokens");
    init_token(&other, "someone-else");
    let err = refused(hsm.serve_cmd(&hsm.data, &hsm.pin, Some(&other)));
    assert!(
        err.contains(&format!("no PKCS#11 token labelled {TOKEN:?}"))
            && err.contains("\"someone-else\""),
        "{err}"
    );
    // a token of that label, without the key
    let impostor = write_conf(hsm.tmp.path(), "impostor-tokens");
    init_token(&impostor, TOKEN);
    let err = refused(hsm.serve_cmd(&hsm.data, &hsm.pin, Some(&impostor)));
    assert!(
        err.contains(&format!("no AES key labelled {KEY:?}")),
        "{err}"
    );
    // the module cannot be loaded (uninstalled, or no shared library)
    let cfg_path = hsm.data.join("keys/provider.json");
    let cfg = std::fs::read_to_string(&cfg_path).expect("provider.json");
    let junk = hsm.tmp.path().join("junk.so");
    std::fs::write(&junk, b"not a shared library").expect("junk");
    for (module, says) in [
        ("/nonexistent/libvendor-pkcs11.so", "does not exist"),
        (
            junk.to_str().expect("utf-8"),
            "cannot load the PKCS#11 module",
        ),
    ] {
        std::fs::write(
            &cfg_path,
            cfg.replace(&hsm.module.display().to_string(), module),
        )
        .expect("edit");
        let err = refused(hsm.serve_cmd(&hsm.data, &hsm.pin, Some(&hsm.conf)));
        assert!(err.contains(module) && err.contains(says), "{err}");
    }
    std::fs::write(&cfg_path, &cfg).expect("restore");
    assert!(
        snapshot(&hsm.data) == before,
        "a refused start wrote into the data directory"
    );
    // and with everything right it serves again
    drop(hsm.serve());
}

#[test]
fn a_copied_data_directory_without_the_hsm_opens_nothing_and_holds_no_phi() {
    let hsm = Hsm::new();
    hsm.init();
    let mut s = hsm.serve();
    let creds = hsm.add_client(&s, "system/*.cruds");
    let token = s.token_for(&creds, "system/*.cruds");
    let r = s.post("Patient", &token, &patient());
    assert_eq!(r.status, 201);
    s.stop();

    let elsewhere = tempfile::tempdir().expect("tmp");
    let copy = elsewhere.path().join("data");
    let o = Command::new("cp")
        .arg("-a")
        .arg(&hsm.data)
        .arg(&copy)
        .output()
        .expect("cp");
    assert!(o.status.success());
    // no HSM at all (no SoftHSM2 configuration), and an HSM without this token
    let err = refused(hsm.serve_cmd(&copy, &hsm.pin, None));
    assert!(
        err.contains("refusing to start") && err.contains("PKCS#11"),
        "{err}"
    );
    let empty = write_conf(elsewhere.path(), "empty-tokens");
    let err = refused(hsm.serve_cmd(&copy, &hsm.pin, Some(&empty)));
    assert!(err.contains("no PKCS#11 token labelled"), "{err}");
    // offline commands open nothing either
    let o = hsm
        .cmd(&["audit", "scan", "--data-dir"])
        .arg(&copy)
        .arg("--pkcs11-pin-file")
        .arg(&hsm.pin)
        .env("SOFTHSM2_CONF", &empty)
        .output()
        .expect("audit scan");
    assert!(!o.status.success());

    let needles: [&[u8]; 4] = [b"Quixotewright", b"Anastasia", b"MRN-771234", b"1971-02-03"];
    let files = files_under(&copy);
    assert!(files.iter().any(|f| f.ends_with("phivault.db")));
    for f in files {
        let bytes = std::fs::read(&f).expect("read");
        for n in needles {
            assert!(
                !contains(&bytes, n),
                "{} holds {:?}",
                f.display(),
                String::from_utf8_lossy(n)
            );
        }
    }
}

/// Runs `check_key_in_the_token` in a child of this test binary with SOFTHSM2_CONF set.
#[test]
fn the_tokens_key_is_not_extractable() {
    if let Some(conf) = std::env::var_os("PHIVAULT_PKCS11_CHILD_CONF") {
        return check_key_in_the_token(Path::new(&conf));
    }
    let hsm = Hsm::new();
    hsm.init();
    let o = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "the_tokens_key_is_not_extractable",
            "--exact",
            "--nocapture",
        ])
        .env("PHIVAULT_PKCS11_CHILD_CONF", &hsm.conf)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env("PHIVAULT_PKCS11_MODULE", &hsm.module)
        .output()
        .expect("child");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("1 passed"),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn check_key_in_the_token(conf: &Path) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error, RvError};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    assert_eq!(
        std::env::var_os("SOFTHSM2_CONF").as_deref(),
        Some(conf.as_os_str())
    );
    let ctx = Pkcs11::new(module()).expect("module");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("initialize");
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == TOKEN)
        })
        .expect("the test token");
    let session = ctx.open_rw_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::from(PIN)))
        .expect("login");
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(KEY.as_bytes().to_vec()),
        ])
        .expect("find");
    assert_eq!(keys.len(), 1, "one key under the label");
    let key = keys[0];
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Value,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::Token,
                AttributeType::KeyType,
            ],
        )
        .expect("attributes");
    // C_GetAttributeValue answers CKR_ATTRIBUTE_SENSITIVE for CKA_VALUE: no value comes back
    assert!(
        !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        "the key's value was readable: {attrs:?}"
    );
    for want in [
        Attribute::Extractable(false),
        Attribute::NeverExtractable(true),
        Attribute::Sensitive(true),
        Attribute::AlwaysSensitive(true),
        Attribute::Token(true),
        Attribute::KeyType(KeyType::AES),
    ] {
        assert!(attrs.contains(&want), "{want:?} not in {attrs:?}");
    }
    // C_WrapKey under a wrapping key of our own is refused: the key cannot leave wrapped
    let wrapper = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
            ],
        )
        .expect("wrapping key");
    for mech in [Mechanism::AesKeyWrapPad, Mechanism::AesKeyWrap] {
        match session.wrap_key(&mech, wrapper, key) {
            Err(Error::Pkcs11(RvError::KeyUnextractable, _)) => {}
            other => panic!("C_WrapKey with {mech:?} was not refused as unextractable: {other:?}"),
        }
    }
    // and the attributes cannot be weakened
    for weaker in [Attribute::Extractable(true), Attribute::Sensitive(false)] {
        assert!(
            session
                .update_attributes(key, std::slice::from_ref(&weaker))
                .is_err(),
            "{weaker:?} was accepted"
        );
    }
}
