//! The `aws-kms` key provider against a real KMS API: moto's server (`moto[server]`, from
//! the test virtualenv of tests/python/venv.sh) on 127.0.0.1, one per test. The test signs
//! its own set-up calls (CreateKey, an IAM user with a key and a `kms:*` policy) with
//! phivault's SigV4 module, then switches moto's authentication on, so every call phivault
//! makes afterwards has its signature checked by moto (botocore's signer) and its access
//! key looked up: wrong credentials are refused as AWS would refuse them.
mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use phivault_keys::sigv4;
use serde_json::{Value, json};
use zeroize::Zeroizing;

fn creds(id: &str, secret: &str) -> sigv4::Credentials {
    sigv4::Credentials {
        access_key_id: id.into(),
        secret_access_key: Zeroizing::new(secret.into()),
        session_token: None,
    }
}

/// Set-up credentials (moto accepts anything until authentication is switched on).
fn setup_creds() -> sigv4::Credentials {
    creds("AKIAMOTOSETUP0000000", "setup-secret-not-checked")
}

/// A moto server on a free loopback port, killed on drop.
struct Moto {
    child: Option<Child>,
    endpoint: String,
    host: String,
    agent: ureq::Agent,
    /// The IAM user's credentials allowed `kms:*` (after [`Moto::start`]).
    id: String,
    secret: String,
    /// The KMS key made at start (key id and ARN).
    key_id: String,
    key_arn: String,
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn between(text: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = text
        .find(&open)
        .unwrap_or_else(|| panic!("no {tag} in {text}"))
        + open.len();
    let len = text[start..].find('<').expect("closing tag");
    text[start..start + len].to_owned()
}

impl Moto {
    /// Start moto, make a KMS key and an IAM user allowed to use it, then switch moto's
    /// authentication on.
    fn start() -> Moto {
        let port = moto_s3::free_port();
        let child = Command::new(moto_s3::moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto_server");
        let host = format!("127.0.0.1:{port}");
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(20)))
                .build(),
        );
        let mut m = Moto {
            child: Some(child),
            endpoint: format!("http://{host}"),
            host,
            agent,
            id: String::new(),
            secret: String::new(),
            key_id: String::new(),
            key_arn: String::new(),
        };
        // wait until it answers
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if m.agent
                .get(format!("{}/moto-api/", m.endpoint))
                .call()
                .is_ok()
            {
                break;
            }
            if let Some(Ok(Some(st))) = m.child.as_mut().map(Child::try_wait) {
                panic!("moto_server exited: {st}");
            }
            assert!(Instant::now() < deadline, "moto_server did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (k, v) = m.kms(
            &setup_creds(),
            "CreateKey",
            &json!({"Description": "phivault test"}),
        );
        assert_eq!(k, 200, "CreateKey: {v}");
        m.key_id = v["KeyMetadata"]["KeyId"].as_str().expect("KeyId").into();
        m.key_arn = v["KeyMetadata"]["Arn"].as_str().expect("Arn").into();
        m.iam("Action=CreateUser&UserName=phivault");
        let made = m.iam("Action=CreateAccessKey&UserName=phivault");
        m.id = between(&made, "AccessKeyId");
        m.secret = between(&made, "SecretAccessKey");
        let policy = json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]})
        .to_string();
        m.iam(&format!(
            "Action=PutUserPolicy&UserName=phivault&PolicyName=kms&PolicyDocument={}",
            percent(&policy)
        ));
        // from now on every request's signature and access key are checked
        let r = m
            .agent
            .post(format!("{}/moto-api/reset-auth", m.endpoint))
            .send("0")
            .expect("reset-auth");
        assert_eq!(r.status(), 200);
        m
    }

    /// A signed KMS JSON call.
    fn kms(&self, c: &sigv4::Credentials, action: &str, body: &Value) -> (u16, Value) {
        let body = body.to_string();
        let date = sigv4::amz_date(now());
        let target = format!("TrentService.{action}");
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("host", self.host.as_str()),
            ("x-amz-date", date.as_str()),
            ("x-amz-target", target.as_str()),
        ];
        let s = sigv4::sign(
            c,
            "us-east-1",
            "kms",
            &date,
            &sigv4::Request {
                method: "POST",
                path: "/",
                query: "",
                headers: &headers,
                payload: body.as_bytes(),
            },
        );
        let mut r = self
            .agent
            .post(format!("{}/", self.endpoint))
            .header("authorization", &s.authorization)
            .header("content-type", headers[0].1)
            .header("x-amz-date", &date)
            .header("x-amz-target", &target)
            .send(body.as_bytes())
            .expect("kms call");
        let status = r.status().as_u16();
        let v = r.body_mut().read_json::<Value>().unwrap_or(Value::Null);
        (status, v)
    }

    /// A signed IAM query call (set-up only); the XML answer.
    fn iam(&self, form: &str) -> String {
        moto_s3::iam_request(
            &self.agent,
            &self.endpoint,
            &self.host,
            &setup_creds(),
            form,
        )
    }

    /// The user's credentials, as phivault's environment.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
        ]
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `phivault` command with a clean AWS environment: `env` only, HOME with no
/// ~/.aws, test keys beside the data.
fn phivault(data: &Path, env: &[(&str, String)]) -> Command {
    let mut c = Command::new(BIN);
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_SHARED_CREDENTIALS_FILE",
    ] {
        c.env_remove(v);
    }
    let home = data.parent().unwrap_or(Path::new("/tmp")).join("home");
    let _ = std::fs::create_dir_all(&home);
    c.env("HOME", &home);
    key_home(&mut c, data);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn init(moto: &Moto, data: &Path, key: &str) -> std::process::Output {
    phivault(data, &moto.env())
        .args(["init", "--data-dir"])
        .arg(data)
        .args([
            "--key-provider",
            "aws-kms",
            "--kms-key-id",
            key,
            "--kms-region",
            "us-east-1",
            "--kms-endpoint",
            &moto.endpoint,
        ])
        .output()
        .expect("init")
}

/// `serve` on `data` with `env`: a running server, or Err(its standard error) when it
/// refused to start.
fn serve(data: &Path, env: &[(&str, String)]) -> Result<Server, String> {
    let mut c = phivault(data, env);
    c.args(["serve", "--data-dir"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null());
    let (child, origin, stderr) = match try_spawn_server(c) {
        Ok(l) => l,
        Err(err) => {
            assert!(
                !err.starts_with("exit Some(0)"),
                "serve exited 0 without listening: {err}"
            );
            return Err(err);
        }
    };
    let ca = std::fs::read(data.join("tls/ca.pem")).expect("ca.pem");
    Ok(Server {
        child: Some(child),
        tmp: tempfile::tempdir().expect("tmp"),
        base: format!("{origin}/fhir"),
        origin,
        data: data.to_path_buf(),
        stderr,
        agent: agent_for(&ca),
    })
}

/// A token for a new client registered with `env` (the CLI needs the KMS too).
fn token(s: &Server, env: &[(&str, String)], scope: &str) -> String {
    let c = s.add_client_via(phivault(&s.data, env), scope);
    s.token_for(&c, scope)
}

fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn provider(data: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(data.join("keys/provider.json")).expect("provider"))
        .expect("json")
}

/// Every file under `dir` but the serve lock (which names the last pid), with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = files_under(dir)
        .into_iter()
        .filter(|f| !f.ends_with("serve.lock"))
        .map(|f| {
            let b = std::fs::read(&f).expect("read");
            (f, b)
        })
        .collect();
    v.sort();
    v
}

fn assert_refused(data: &Path, env: &[(&str, String)], expect: &str, secret: &str) {
    let before = snapshot(data);
    let err = match serve(data, env) {
        Ok(mut s) => {
            s.stop();
            panic!("served although {expect:?} was expected");
        }
        Err(e) => e,
    };
    assert!(err.contains("refusing to start"), "{err}");
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    assert!(!err.contains(secret), "a secret in the refusal: {err}");
    assert!(snapshot(data) == before, "a refused start changed files");
}

#[test]
fn an_aws_kms_data_directory_serves_restarts_and_migrates_both_ways() {
    let moto = Moto::start();
    let env = moto.env();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let o = init(&moto, &data, &moto.key_id);
    let said = ok(&o, "init");
    assert!(said.contains("AWS KMS"), "{said}");
    assert!(!said.contains(&moto.secret));
    let p = provider(&data);
    assert_eq!(p["provider"], "aws-kms");
    assert_eq!(p["key_id"], moto.key_id.as_str());
    assert_eq!(p["region"], "us-east-1");
    assert_eq!(p["endpoint"], moto.endpoint.as_str());
    assert!(data.join("keys/master.kms").is_file());
    let status = ok(
        &phivault(&data, &[])
            .args(["keys", "status", "--data-dir"])
            .arg(&data)
            .output()
            .expect("status"),
        "keys status",
    );
    for want in ["aws-kms", moto.key_id.as_str(), "us-east-1", &moto.endpoint] {
        assert!(status.contains(want), "{want} not in: {status}");
    }

    let mut s = serve(&data, &env).expect("serve");
    let t = token(&s, &env, "system/*.cruds");
    let made = s.post(
        "Patient",
        &t,
        &json!({"resourceType": "Patient", "gender": "other"}),
    );
    assert_eq!(made.status, 201, "{}", String::from_utf8_lossy(&made.body));
    let id = made.json()["id"].as_str().expect("id").to_owned();
    assert_eq!(s.get(&format!("Patient/{id}"), &t).status, 200);
    s.stop();
    // a new port, so a new token (its audience is the base URL)
    let mut s = serve(&data, &env).expect("serve again");
    let t = token(&s, &env, "system/Patient.rs");
    assert_eq!(s.get(&format!("Patient/{id}"), &t).status, 200);
    s.stop();

    // to a key file and back to the KMS: the same master key, the same records
    let o = phivault(&data, &env)
        .args(["keys", "migrate", "--data-dir"])
        .arg(&data)
        .args(["--to", "file"])
        .output()
        .expect("migrate");
    ok(&o, "migrate --to file");
    assert!(!data.join("keys/master.kms").exists(), "master.kms removed");
    let mut s = serve(&data, &[]).expect("serve on the key file");
    let t = token(&s, &[], "system/Patient.rs");
    assert_eq!(s.get(&format!("Patient/{id}"), &t).status, 200);
    s.stop();
    let key_file = PathBuf::from(provider(&data)["key_file"].as_str().expect("key_file"));
    assert!(key_file.exists());
    let o = phivault(&data, &env)
        .args(["keys", "migrate", "--data-dir"])
        .arg(&data)
        .args(["--to", "aws-kms", "--kms-key-id", &moto.key_arn])
        .args([
            "--kms-region",
            "us-east-1",
            "--kms-endpoint",
            &moto.endpoint,
        ])
        .output()
        .expect("migrate");
    ok(&o, "migrate --to aws-kms");
    assert!(!key_file.exists(), "the key file was shredded");
    assert_eq!(provider(&data)["key_id"], moto.key_arn.as_str());
    let mut s = serve(&data, &env).expect("serve on the KMS again");
    let t = token(&s, &env, "system/Patient.rs");
    assert_eq!(s.get(&format!("Patient/{id}"), &t).status, 200);
    s.stop();
}

#[test]
fn kms_faults_are_refused_at_start_naming_which_and_change_nothing() {
    let mut moto = Moto::start();
    let env = moto.env();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    ok(&init(&moto, &data, &moto.key_id), "init");
    let mut s = serve(&data, &env).expect("serve");
    s.stop();
    let secret = moto.secret.clone();

    // no credentials anywhere
    assert_refused(&data, &[], "no AWS credentials", &secret);
    // an access key KMS does not know, and the right key with a wrong secret
    let unknown = vec![
        ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN000000000".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", secret.clone()),
    ];
    assert_refused(&data, &unknown, "refused the credentials", &secret);
    let wrong_secret = vec![
        ("AWS_ACCESS_KEY_ID", moto.id.clone()),
        ("AWS_SECRET_ACCESS_KEY", format!("{secret}x")),
    ];
    assert_refused(&data, &wrong_secret, "refused the credentials", &secret);
    // the same credentials from the shared credentials file work (profile chosen)
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join(".aws")).expect("mkdir");
    std::fs::write(
        home.join(".aws/credentials"),
        format!(
            "[default]\naws_access_key_id = AKIAUNKNOWN000000000\naws_secret_access_key = nope\n\n[phivault]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n",
            moto.id
        ),
    )
    .expect("credentials");
    let mut s =
        serve(&data, &[("AWS_PROFILE", "phivault".to_owned())]).expect("serve with the profile");
    s.stop();
    std::fs::remove_file(home.join(".aws/credentials")).expect("rm");

    // a wrong key: the provider record edited to another KMS key
    let original = std::fs::read(data.join("keys/provider.json")).expect("provider");
    let (st, other) = moto.kms(
        &creds(&moto.id, &secret),
        "CreateKey",
        &json!({"Description": "another"}),
    );
    assert_eq!(st, 200, "{other}");
    let mut p = provider(&data);
    p["key_id"] = other["KeyMetadata"]["KeyId"].clone();
    std::fs::write(data.join("keys/provider.json"), p.to_string()).expect("edit");
    assert_refused(&data, &env, "key", &secret);
    let err = serve(&data, &env).err().expect("refused");
    assert!(
        err.contains("denied the use of the key") || err.contains("cannot use the key"),
        "{err}"
    );
    // a key that does not exist
    p["key_id"] = json!("11111111-2222-3333-4444-555555555555");
    std::fs::write(data.join("keys/provider.json"), p.to_string()).expect("edit");
    let err = serve(&data, &env).err().expect("refused");
    assert!(
        err.contains("denied the use of the key") || err.contains("cannot use the key"),
        "{err}"
    );
    // a wrong encryption context: the record names another data directory
    let mut p = provider(&data);
    p["key_id"] = json!(moto.key_id);
    p["data_dir_id"] = json!("00112233445566778899aabbccddeeff");
    std::fs::write(data.join("keys/provider.json"), p.to_string()).expect("edit");
    assert_refused(&data, &env, "wrong encryption context", &secret);
    std::fs::write(data.join("keys/provider.json"), &original).expect("restore");
    let mut s = serve(&data, &env).expect("serves again once restored");
    s.stop();

    // the KMS unreachable
    moto.stop();
    assert_refused(&data, &env, "unreachable", &secret);
    // and an init against it writes nothing
    let fresh = tmp.path().join("fresh");
    let o = init(&moto, &fresh, "whatever");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unreachable"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!fresh.exists(), "a failed init leaves no directory");
}

/// A master key in every spelling a copy might hold it.
fn spellings(key: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        key.to_vec(),
        base64::engine::general_purpose::STANDARD
            .encode(key)
            .into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(key)
            .into_bytes(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
    ]
}

#[test]
fn a_whole_copy_without_kms_access_opens_nothing_and_holds_no_phi() {
    use base64::Engine as _;
    let mut moto = Moto::start();
    let env = moto.env();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    ok(&init(&moto, &data, &moto.key_id), "init");
    let mut s = serve(&data, &env).expect("serve");
    let t = token(&s, &env, "system/*.cruds");
    let loaded = s.load_synth(&t, 3, 1717);
    let needles: Vec<String> = loaded
        .iter()
        .flat_map(|(b, _)| phivault_synth::phi_needles(b))
        .collect();
    assert!(needles.len() > 10);
    s.stop();

    // the master key, as whoever holds KMS access would get it (the test's own Decrypt)
    let wrapped: Value =
        serde_json::from_slice(&std::fs::read(data.join("keys/master.kms")).expect("kms"))
            .expect("json");
    let id = provider(&data)["data_dir_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (st, v) = moto.kms(
        &creds(&moto.id, &moto.secret),
        "Decrypt",
        &json!({"CiphertextBlob": wrapped["blob"], "KeyId": moto.key_id,
                "EncryptionContext": {"phivault-data-dir": id}}),
    );
    assert_eq!(st, 200, "{v}");
    let key = base64::engine::general_purpose::STANDARD
        .decode(v["Plaintext"].as_str().expect("plaintext"))
        .expect("b64");
    assert_eq!(key.len(), 32);

    // what leaks: the whole directory, and no KMS access (moto gone)
    moto.stop();
    let scratch = tempfile::tempdir().expect("scratch");
    let copy = scratch.path().join("copy");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&data)
            .arg(&copy)
            .status()
            .expect("cp")
            .success()
    );
    let files = files_under(&copy);
    assert!(files.iter().any(|f| f.ends_with("phivault.db")));
    let db = rusqlite::Connection::open_with_flags(
        copy.join("phivault.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("db");
    let kcv: Vec<u8> = db
        .query_row("SELECT v FROM meta WHERE k = 'key_check_value'", [], |r| {
            r.get(0)
        })
        .expect("kcv");
    drop(db);
    for f in &files {
        let bytes = std::fs::read(f).expect("read");
        for n in &needles {
            assert!(!contains(&bytes, n.as_bytes()), "PHI in {}", f.display());
        }
        for sp in spellings(&key) {
            assert!(!contains(&bytes, &sp), "the master key in {}", f.display());
        }
        if bytes.len() <= 64 * 1024 {
            for w in bytes.windows(32) {
                let candidate = phivault_crypto::MasterKey::from_bytes(w.try_into().expect("32"));
                assert!(
                    !phivault_crypto::KeyHierarchy::new(&candidate).verify_key_check_value(&kcv),
                    "a key that opens the data in {}",
                    f.display()
                );
            }
        }
    }
    let err = serve(&copy, &env).err().expect("the copy does not start");
    assert!(err.contains("refusing to start"), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    let err = serve(&copy, &[]).err().expect("nor without credentials");
    assert!(err.contains("no AWS credentials"), "{err}");
}
