//! Harness for integration tests: starts the real `phivault` binary over HTTPS on
//! 127.0.0.1 with port 0 and talks to it as a client would.
#![allow(dead_code)]

pub mod backup;
pub mod flow;
pub mod moto_s3;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_phivault");

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A running server.
pub struct Server {
    pub child: Option<Child>,
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub origin: String,
    pub base: String,
    pub stderr: Arc<Mutex<Vec<u8>>>,
    pub agent: ureq::Agent,
}

/// A response as a client sees it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn is_outcome(&self) -> bool {
        self.json()["resourceType"] == "OperationOutcome"
    }
}

/// Client credentials as written by `phivault client add`.
#[derive(Clone, Debug)]
pub struct Creds {
    pub client_id: String,
    pub private_jwk: String,
}

pub fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run phivault")
}

impl Server {
    /// Start on a fresh data directory.
    pub fn start() -> Server {
        Server::start_with_args(&[])
    }

    /// Start on a fresh data directory with more `serve` arguments.
    pub fn start_with_args(args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        if postgres_mode() {
            // (serve's first run makes an embedded store: this engine's is made by init)
            init_data_dir(&data, &[]);
        }
        let launched = launch_with(&data, args);
        Server::running(tmp, data, launched)
    }

    /// The server `launched` on `data` (its CA trusted), `tmp` kept with it.
    pub fn running(tmp: tempfile::TempDir, data: PathBuf, launched: Launched) -> Server {
        let (child, origin, stderr) = launched;
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

    /// Start on a data directory created by `phivault init` with extra arguments.
    pub fn start_with_init(init_args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        init_data_dir(&data, init_args);
        let launched = launch(&data);
        Server::running(tmp, data, launched)
    }

    /// Load synthetic patients (`phivault synth`) as transactions; returns the bundles
    /// sent and, per bundle, the map from `urn:uuid:` fullUrl to `Type/id`.
    pub fn load_synth(
        &self,
        token: &str,
        patients: usize,
        seed: u64,
    ) -> Vec<(Value, std::collections::HashMap<String, String>)> {
        let mut out = Vec::new();
        for i in 0..patients {
            let bundle = phivault_synth::patient_bundle(seed, i);
            let r = self.post("", token, &bundle);
            assert_eq!(
                r.status,
                200,
                "transaction: {}",
                String::from_utf8_lossy(&r.body)
            );
            let resp = r.json();
            let mut map = std::collections::HashMap::new();
            for (e, g) in bundle["entry"]
                .as_array()
                .expect("entries")
                .iter()
                .zip(resp["entry"].as_array().expect("response entries"))
            {
                let loc = g["response"]["location"].as_str().expect("location");
                let rel = loc.strip_prefix(&format!("{}/", self.base)).unwrap_or(loc);
                let target = rel.split("/_history/").next().unwrap_or(rel).to_owned();
                if let Some(u) = e["fullUrl"].as_str() {
                    map.insert(u.to_owned(), target);
                }
            }
            out.push((bundle, map));
        }
        out
    }

    /// Start again on the same data directory with more `serve` arguments.
    pub fn restart_with(&mut self, args: &[&str]) {
        self.stop();
        let launched = launch_with(&self.data, args);
        self.adopt(launched);
    }

    /// Start again on the same data directory (after stop or kill9).
    pub fn restart(&mut self) {
        self.stop();
        let launched = launch(&self.data);
        self.adopt(launched);
    }

    /// Start again on the same data directory with files limited to `kib` KiB (as if the
    /// disk were full past that: writes beyond it fail).
    pub fn restart_with_file_limit(&mut self, kib: u64) {
        self.stop();
        let mut c = Command::new("bash");
        // SIGXFSZ ignored: a write past the limit fails with EFBIG instead of killing
        c.arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -S -f {kib}; exec \"$0\" serve --data-dir \"$1\" --listen 127.0.0.1:0"
            ))
            .arg(BIN)
            .arg(&self.data);
        let launched = spawn_server(c);
        self.adopt(launched);
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn adopt(&mut self, (child, origin, stderr): (Child, String, Arc<Mutex<Vec<u8>>>)) {
        self.child = Some(child);
        self.base = format!("{origin}/fhir");
        self.origin = origin;
        self.stderr = stderr;
    }
}

/// Whether the tests' new stores are PostgreSQL databases (`PHIVAULT_TEST_ENGINE=postgres`,
/// with the cluster `scripts/test.sh` starts: `PHIVAULT_TEST_PG`, and `PGPASSFILE`) rather
/// than the embedded default: `scripts/test.sh` runs the tests that matter per engine
/// again so.
pub fn postgres_mode() -> bool {
    std::env::var("PHIVAULT_TEST_ENGINE").as_deref() == Ok("postgres")
}

/// `phivault init` of a new data directory with `init_args`, its key file beside it; in
/// [`postgres_mode`] its store is a fresh database of the test cluster.
pub fn init_data_dir(data: &Path, init_args: &[&str]) {
    let mut c = Command::new(BIN);
    c.args(["init", "--data-dir"]).arg(data).args(init_args);
    if postgres_mode() {
        let db = phivault_store::postgres::testdb::TestDb::new();
        c.args(["--database", db.target.url()]);
        // (the database outlives the test's handle: the cluster goes at the run's end)
        std::mem::forget(db);
    }
    key_home(&mut c, data);
    let o = c.output().expect("init");
    assert!(
        o.status.success(),
        "init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The password of test database `db` in a file of its own under `dir` (what
/// `--database-password-file` takes: the first line is the password).
pub fn database_password_file(
    db: &phivault_store::postgres::testdb::TestDb,
    dir: &Path,
) -> PathBuf {
    let pgpass = std::fs::read_to_string(&db.passfile).expect("passfile");
    let password = pgpass
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .expect("a pgpass line");
    let file = dir.join("db-password");
    std::fs::write(&file, password).expect("password file");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    file
}

/// Start the server on `s`'s data directory again and expect it to refuse, naming `why`.
pub fn assert_start_refused(s: &mut Server, why: &str) {
    s.stop();
    let mut c = Command::new(BIN);
    c.args(["serve", "--data-dir"])
        .arg(&s.data)
        .args(["--listen", "127.0.0.1:0"]);
    key_home(&mut c, &s.data);
    match try_spawn_server(c) {
        Ok(_) => panic!("the server started on a tampered store (expected: {why})"),
        Err(e) => {
            assert!(e.contains("storage was changed outside phivault"), "{e}");
            assert!(e.contains(why), "refusal does not say {why:?}: {e}");
        }
    }
}

/// Start `phivault serve` on `data`; returns the child, its origin and its captured stderr.
pub fn launch(data: &Path) -> (Child, String, Arc<Mutex<Vec<u8>>>) {
    launch_with(data, &[])
}

/// [`launch`] with more `serve` arguments.
pub fn launch_with(data: &Path, args: &[&str]) -> (Child, String, Arc<Mutex<Vec<u8>>>) {
    let mut c = Command::new(BIN);
    c.args(["serve", "--data-dir"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(args);
    key_home(&mut c, data);
    spawn_server(c)
}

/// [`spawn_server`] for a test's own command line (a shell redirect, an environment).
pub fn spawn_command(c: Command) -> Launched {
    spawn_server(c)
}

/// A started server: the child, its origin and its captured standard error.
pub type Launched = (Child, String, Arc<Mutex<Vec<u8>>>);

/// Spawn a command that runs `phivault serve` and wait for its `listening on` line.
fn spawn_server(c: Command) -> Launched {
    try_spawn_server(c).unwrap_or_else(|e| panic!("server did not start: {e}"))
}

/// Spawn a command that runs `phivault serve`: Ok once it says `listening on`, else
/// Err("exit CODE: its standard error") when it ends first (a refused start).
pub fn try_spawn_server(mut c: Command) -> Result<Launched, String> {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn phivault serve");
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let mut err = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        })
    };
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    match lines.next() {
        Some(Ok(line)) if line.starts_with("listening on ") => {
            std::thread::spawn(move || for _ in lines {});
            let origin = line["listening on ".len()..].trim().to_owned();
            Ok((child, origin, stderr))
        }
        _ => {
            let status = child.wait().expect("wait");
            let _ = reader.join();
            let err = String::from_utf8_lossy(&stderr.lock().expect("lock")).into_owned();
            Err(format!("exit {:?}: {err}", status.code()))
        }
    }
}

impl Server {
    /// Stop with SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Kill with SIGKILL (crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> Vec<u8> {
        self.stderr.lock().expect("lock").clone()
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.origin)
    }

    /// Register a client with `phivault client add`.
    pub fn add_client(&self, scope: &str) -> Creds {
        let mut c = Command::new(BIN);
        c.args(unlock_args(&self.data));
        self.add_client_via(c, scope)
    }

    /// Register a client with `phivault client add` run as `c` (a command prepared with
    /// the environment or unlock options its key provider needs).
    pub fn add_client_via(&self, mut c: Command, scope: &str) -> Creds {
        let out = self.tmp.path().join(format!("creds-{}.json", rand_hex()));
        let o = c
            .args(["client", "add", "--data-dir"])
            .arg(&self.data)
            .args(["--name", "test client", "--scope", scope, "--token-url"])
            .arg(self.token_url())
            .arg("--out")
            .arg(&out)
            .output()
            .expect("client add");
        assert!(
            o.status.success(),
            "client add failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&std::fs::read(&out).expect("creds")).expect("json");
        Creds {
            client_id: v["client_id"].as_str().expect("client_id").to_owned(),
            private_jwk: v["private_jwk"].to_string(),
        }
    }

    pub fn assertion(&self, creds: &Creds, aud: &str, jti: &str) -> String {
        let key = phivault_auth::PrivateJwk::from_json_str(&creds.private_jwk).expect("jwk");
        key.sign_jws(&json!({
            "iss": creds.client_id, "sub": creds.client_id, "aud": aud,
            "exp": now() + 240, "iat": now(), "jti": jti,
        }))
        .expect("sign")
    }

    /// POST the token endpoint with a client assertion.
    pub fn token_request(&self, assertion: &str, scope: &str) -> Resp {
        let form = format!(
            "grant_type=client_credentials&client_assertion_type={}&client_assertion={}&scope={}",
            "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer",
            assertion,
            scope
                .replace('/', "%2F")
                .replace('*', "%2A")
                .replace(' ', "+")
        );
        self.send(
            "POST",
            &self.token_url(),
            None,
            Some(("application/x-www-form-urlencoded", form.into_bytes())),
            &[],
        )
    }

    /// A fresh access token for a new client with `scope`.
    pub fn token(&self, scope: &str) -> String {
        let creds = self.add_client(scope);
        self.token_for(&creds, scope)
    }

    pub fn token_for(&self, creds: &Creds, scope: &str) -> String {
        let a = self.assertion(creds, &self.token_url(), &rand_hex());
        let r = self.token_request(&a, scope);
        assert_eq!(r.status, 200, "token: {}", String::from_utf8_lossy(&r.body));
        r.json()["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    pub fn send(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
        headers: &[(&str, &str)],
    ) -> Resp {
        try_send(&self.agent, method, url, token, body, headers).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn get(&self, path: &str, token: &str) -> Resp {
        self.send(
            "GET",
            &format!("{}/{path}", self.base),
            Some(token),
            None,
            &[],
        )
    }

    pub fn post(&self, path: &str, token: &str, body: &Value) -> Resp {
        let url = if path.is_empty() {
            self.base.clone()
        } else {
            format!("{}/{path}", self.base)
        };
        self.send(
            "POST",
            &url,
            Some(token),
            Some(("application/fhir+json", body.to_string().into_bytes())),
            &[],
        )
    }

    pub fn put(&self, path: &str, token: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
        self.send(
            "PUT",
            &format!("{}/{path}", self.base),
            Some(token),
            Some(("application/fhir+json", body.to_string().into_bytes())),
            headers,
        )
    }

    pub fn delete(&self, path: &str, token: &str) -> Resp {
        self.send(
            "DELETE",
            &format!("{}/{path}", self.base),
            Some(token),
            None,
            &[],
        )
    }

    /// Run `phivault audit verify` on the data directory.
    pub fn audit_verify(&self) -> (bool, String) {
        let o = Command::new(BIN)
            .args(["audit", "verify", "--data-dir"])
            .arg(&self.data)
            .output()
            .expect("audit verify");
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }

    pub fn db_path(&self) -> PathBuf {
        self.data.join("phivault.db")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn agent_for(ca_pem: &[u8]) -> ureq::Agent {
    tls_agent(ca_pem, 10)
}

/// An agent trusting only `ca_pem`, following at most `redirects` redirects.
pub fn tls_agent(ca_pem: &[u8], redirects: u32) -> ureq::Agent {
    let cert = ureq::tls::Certificate::from_pem(ca_pem).expect("ca pem");
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert])))
        .build();
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(redirects)
            .timeout_global(Some(Duration::from_secs(120)))
            .build(),
    )
}

pub fn rand_hex() -> String {
    let mut b = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("rng");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// All files under a directory, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Occurrences of `needle` in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

pub fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "name": [{"family": "Quixotewright", "given": ["Anastasia"]}],
        "gender": "female",
        "birthDate": "1971-02-03",
        "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-771234"}]
    })
}

/// Like [`Server::send`] but through any agent and without panicking on transport errors
/// (connection refused or reset, e.g. after `kill9`): returns `Err(message)` instead.
pub fn try_send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
    headers: &[(&str, &str)],
) -> Result<Resp, String> {
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        b = b.header("Authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let res = match body {
        Some((ct, bytes)) => {
            let req = b
                .header("Content-Type", ct)
                .body(bytes)
                .map_err(|e| e.to_string())?;
            agent.run(req)
        }
        None => {
            let req = b.body(()).map_err(|e| e.to_string())?;
            agent.run(req)
        }
    };
    let mut res = res.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = res.status().as_u16();
    let headers = res
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = res
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_vec()
        .map_err(|e| format!("{method} {url}: reading body: {e}"))?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

impl Server {
    /// [`Server::send`] without panicking on transport errors.
    pub fn try_send(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
        headers: &[(&str, &str)],
    ) -> Result<Resp, String> {
        try_send(&self.agent, method, url, token, body, headers)
    }
}

/// The data directory's store opened read-only, whichever engine holds it (as an
/// administrator's report would read it).
pub fn read_only_store(data: &Path) -> Box<dyn phivault_store::Store> {
    match std::fs::read(data.join("database.json")) {
        Ok(json) => {
            let cfg: Value = serde_json::from_slice(&json).expect("database.json");
            let source = match cfg["password_file"].as_str() {
                Some(f) => phivault_store::postgres::PasswordSource::File(f.into()),
                None => phivault_store::postgres::PasswordSource::Standard,
            };
            let target = phivault_store::postgres::PgTarget::parse(
                cfg["url"].as_str().expect("url"),
                source,
            )
            .expect("the database URL");
            Box::new(
                phivault_store::postgres::PgStore::open_read_only(&target)
                    .expect("open the database read-only"),
            )
        }
        Err(_) => Box::new(
            phivault_store::sqlite::SqliteStore::open_read_only(&data.join("phivault.db"))
                .expect("open db read-only"),
        ),
    }
}

/// What the store holds as a thief with the database would read it: the SQLite file (and
/// its write-ahead log), or `pg_dump`'s output of the PostgreSQL database.
pub fn store_bytes(s: &Server) -> Vec<u8> {
    match std::fs::read(s.data.join("database.json")) {
        Ok(json) => {
            let cfg: Value = serde_json::from_slice(&json).expect("database.json");
            let mut c = Command::new("pg_dump");
            c.args(["-d", cfg["url"].as_str().expect("url")]);
            if let Some(f) = cfg["password_file"].as_str() {
                let pw = std::fs::read_to_string(f).expect("password file");
                c.env("PGPASSWORD", pw.trim_end());
            }
            let o = c.output().expect("pg_dump runs");
            assert!(
                o.status.success(),
                "pg_dump: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            o.stdout
        }
        Err(_) => {
            let mut out = std::fs::read(s.db_path()).expect("db");
            out.extend(std::fs::read(s.data.join("phivault.db-wal")).unwrap_or_default());
            out
        }
    }
}

/// Audit events as stored, read with a read-only connection.
pub fn audit_events(s: &Server) -> Vec<Value> {
    let store = read_only_store(&s.data);
    let mut out = Vec::new();
    store
        .scan_audit(&mut |e| {
            let ev = phivault_audit::AuditEvent::decode(&e.event).expect("decode event");
            out.push(serde_json::to_value(&ev).expect("event json"));
            true
        })
        .expect("scan the audit log");
    out
}

/// A master key in every spelling a copy might hold it: raw, base64, base64url, hex.
pub fn key_spellings(key: &[u8; 32]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::STANDARD;
    let u = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        key.to_vec(),
        e.encode(key).into_bytes(),
        u.encode(key).into_bytes(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
    ]
}

/// Where the `file` provider put a data directory's master key (outside it).
pub fn master_key_file(data: &Path) -> PathBuf {
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(data.join("keys/provider.json")).expect("provider"))
            .expect("json");
    PathBuf::from(cfg["key_file"].as_str().expect("a file provider"))
}

/// A data directory's master key (tests that play an insider holding it).
pub fn master_key_of(data: &Path) -> phivault_crypto::MasterKey {
    phivault_crypto::MasterKey::load_key_file(&master_key_file(data)).expect("master key")
}

/// How a test's commands unlock a data directory whose provider needs a secret: a
/// `passphrase` file kept beside the data directory by the test that made it.
pub fn unlock_args(data: &Path) -> Vec<String> {
    let pass = data
        .parent()
        .unwrap_or(Path::new("/tmp"))
        .join("passphrase");
    if pass.exists() {
        vec!["--passphrase-file".to_owned(), pass.display().to_string()]
    } else {
        Vec::new()
    }
}

/// Where a test's new data directory puts its key file: beside it, never in the user's
/// configuration directory.
pub fn key_home(c: &mut Command, data: &Path) {
    c.env(
        "XDG_CONFIG_HOME",
        data.parent().unwrap_or(Path::new("/tmp")).join("config"),
    );
}

/// The server's real token-signing key (Ed25519 PKCS#8), opened from the data directory
/// (for forging tokens the server must refuse).
pub fn signing_pkcs8(s: &Server) -> Vec<u8> {
    let master = master_key_of(&s.data);
    let keys = phivault_crypto::KeyHierarchy::new(&master);
    let sealed = std::fs::read(s.data.join("keys/token-signing.sealed")).expect("sealed key");
    keys.open_secret("token-signing-v1", &sealed)
        .expect("open token key")
        .expose()
        .clone()
}

/// A compact JWS over `header` and `claims`, signed with Ed25519 `pkcs8`.
pub fn sign_ed25519(pkcs8: &[u8], header: &Value, claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8).expect("ed25519 key");
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = kp.sign(input.as_bytes());
    format!("{input}.{}", b64(sig.as_ref()))
}
