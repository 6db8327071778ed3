//! moto's S3 server for tests: `moto_server` (`PHIVAULT_MOTO_SERVER`, else the test
//! virtualenv's `target/pyenv/bin/moto_server`, made by tests/python/venv.sh) on a free
//! 127.0.0.1 port, one per test, killed on drop. Region `us-east-1`, path-style URLs.
//!
//! [`MotoS3::start`] accepts any credentials (moto checks no signature);
//! [`MotoS3::start_with_auth`] makes an IAM user allowed `s3:*` and then switches moto's
//! authentication on, so every request's SigV4 signature is recomputed by moto (botocore's
//! signer) and its access key looked up. Either way [`MotoS3::env`] gives the credentials
//! as the AWS environment variables a `phivault` command (or a child test process) reads,
//! and [`MotoS3::s3`] makes signed requests of its own (set-up and checks that do not go
//! through phivault's code).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use phivault_keys::sigv4;
use zeroize::Zeroizing;

/// The region every URL and signature uses.
pub const REGION: &str = "us-east-1";

/// The AWS variables [`MotoS3::apply_env`] clears before setting its own.
pub const AWS_VARS: [&str; 7] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
];

/// A running moto server.
pub struct MotoS3 {
    child: Option<Child>,
    endpoint: String,
    host: String,
    agent: ureq::Agent,
    access_key_id: String,
    secret_access_key: String,
}

/// A raw answer of [`MotoS3::s3`].
#[derive(Debug)]
pub struct S3Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body as text (empty when it is not UTF-8: see `bytes`).
    pub body: String,
    /// The body's bytes (an object's ciphertext).
    pub bytes: Vec<u8>,
}

impl S3Answer {
    /// A header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The text of the first `<tag>` of the body.
    pub fn xml(&self, tag: &str) -> Option<String> {
        between(&self.body, tag)
    }
}

/// moto's server binary.
pub fn moto_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PHIVAULT_MOTO_SERVER").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv/bin/moto_server");
    assert!(
        p.exists(),
        "moto's server is not installed ({} is missing): run tests/python/venv.sh (it installs moto[server] into target/pyenv), or set PHIVAULT_MOTO_SERVER to a moto_server",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A signed IAM query call to moto at `endpoint` (`host` as signed), as `creds`; the XML
/// answer (set-up calls of the S3 and KMS tests).
pub fn iam_request(
    agent: &ureq::Agent,
    endpoint: &str,
    host: &str,
    creds: &sigv4::Credentials,
    form: &str,
) -> String {
    let body = format!("{form}&Version=2010-05-08");
    let date = sigv4::amz_date(super::now());
    let ctype = "application/x-www-form-urlencoded; charset=utf-8";
    let headers = [
        ("content-type", ctype),
        ("host", host),
        ("x-amz-date", date.as_str()),
    ];
    let s = sigv4::sign(
        creds,
        REGION,
        "iam",
        &date,
        &sigv4::Request {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            payload: body.as_bytes(),
        },
    );
    let mut r = agent
        .post(format!("{endpoint}/"))
        .header("authorization", &s.authorization)
        .header("content-type", ctype)
        .header("x-amz-date", &date)
        .send(body.as_bytes())
        .expect("iam call");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().expect("iam answer");
    assert_eq!(status, 200, "{form}: {text}");
    text
}

/// The text of the first `<tag>…</tag>` in `xml`.
pub fn between(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find('<')?;
    Some(xml[start..start + len].to_owned())
}

impl MotoS3 {
    /// moto with authentication off: any credentials pass (these are test values).
    pub fn start() -> MotoS3 {
        let mut last = String::new();
        // a port taken between the probe and moto's bind: try another
        for _ in 0..3 {
            match Self::spawn() {
                Ok(m) => return m,
                Err(e) => last = e,
            }
        }
        panic!("moto_server did not start: {last}");
    }

    fn spawn() -> Result<MotoS3, String> {
        let port = free_port();
        let child = Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn moto_server: {e}"))?;
        let host = format!("127.0.0.1:{port}");
        let mut m = MotoS3 {
            child: Some(child),
            endpoint: format!("http://{host}"),
            host,
            agent: ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build(),
            ),
            access_key_id: "AKIAMOTOS3TEST000000".into(),
            secret_access_key: "moto-s3-test-secret-not-checked".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if m.agent
                .get(format!("{}/moto-api/", m.endpoint))
                .call()
                .is_ok()
            {
                return Ok(m);
            }
            if let Some(Ok(Some(st))) = m.child.as_mut().map(Child::try_wait) {
                m.child = None;
                return Err(format!("moto_server exited: {st}"));
            }
            if Instant::now() > deadline {
                return Err("moto_server did not answer within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// moto with an IAM user allowed `s3:*` whose keys [`MotoS3::env`] then gives, and
    /// authentication on: wrong credentials are refused as AWS refuses them.
    pub fn start_with_auth() -> MotoS3 {
        let mut m = MotoS3::start();
        m.iam("Action=CreateUser&UserName=phivault-backup");
        let made = m.iam("Action=CreateAccessKey&UserName=phivault-backup");
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#;
        m.iam(&format!(
            "Action=PutUserPolicy&UserName=phivault-backup&PolicyName=s3&PolicyDocument={}",
            sigv4::uri_encode(policy, true)
        ));
        m.access_key_id = between(&made, "AccessKeyId").expect("AccessKeyId");
        m.secret_access_key = between(&made, "SecretAccessKey").expect("SecretAccessKey");
        let r = m
            .agent
            .post(format!("{}/moto-api/reset-auth", m.endpoint))
            .send("0")
            .expect("reset-auth");
        assert_eq!(r.status(), 200, "reset-auth");
        m
    }

    /// A signed IAM query call (set-up, before authentication is on); the XML answer.
    fn iam(&self, form: &str) -> String {
        iam_request(
            &self.agent,
            &self.endpoint,
            &self.host,
            &self.credentials(),
            form,
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The target URL of `bucket` and `prefix` (may be empty) on this server, with more
    /// `&options` if `extra` is not empty.
    pub fn url(&self, bucket: &str, prefix: &str, extra: &str) -> String {
        let mut u = format!(
            "s3://{bucket}/{prefix}?endpoint={}&region={REGION}",
            self.endpoint
        );
        if !extra.is_empty() {
            u.push('&');
            u.push_str(extra);
        }
        u
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    pub fn credentials(&self) -> sigv4::Credentials {
        sigv4::Credentials {
            access_key_id: self.access_key_id.clone(),
            secret_access_key: Zeroizing::new(self.secret_access_key.clone()),
            session_token: None,
        }
    }

    /// The credentials (and region) as AWS environment variables.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_REGION", REGION.to_owned()),
        ]
    }

    /// Give `cmd` exactly `env` as its AWS environment: the other AWS variables removed,
    /// HOME set to `home` (no ~/.aws of the developer's).
    pub fn apply_env(cmd: &mut Command, home: &Path, env: &[(&str, String)]) {
        for v in AWS_VARS {
            cmd.env_remove(v);
        }
        cmd.env("HOME", home);
        for (k, v) in env {
            cmd.env(k, v);
        }
    }

    /// A signed S3 request with these credentials: `path` is `/BUCKET[/KEY]` (already
    /// URI-encoded), `query` `name=value` pairs (encoded), `headers` more signed headers.
    pub fn s3(
        &self,
        method: &str,
        path: &str,
        query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> S3Answer {
        let date = sigv4::amz_date(super::now());
        let hash = sigv4::sha256_hex(body);
        let mut signed: Vec<(&str, &str)> = vec![
            ("host", self.host.as_str()),
            ("x-amz-content-sha256", hash.as_str()),
            ("x-amz-date", date.as_str()),
        ];
        signed.extend_from_slice(headers);
        let s = sigv4::sign(
            &self.credentials(),
            REGION,
            "s3",
            &date,
            &sigv4::Request {
                method,
                path,
                query,
                headers: &signed,
                payload: body,
            },
        );
        let uri = if query.is_empty() {
            format!("{}{path}", self.endpoint)
        } else {
            format!("{}{path}?{query}", self.endpoint)
        };
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", &s.authorization);
        for (n, v) in signed.iter().filter(|(n, _)| *n != "host") {
            req = req.header(*n, *v);
        }
        let sent = if method == "PUT" || method == "POST" {
            self.agent.run(req.body(body).expect("request"))
        } else {
            self.agent.run(req.body(()).expect("request"))
        };
        let mut r = sent.expect("s3 call");
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let bytes = r
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap_or_default();
        S3Answer {
            status: r.status().as_u16(),
            headers,
            body: String::from_utf8(bytes.clone()).unwrap_or_default(),
            bytes,
        }
    }

    /// Make `bucket` (with Object Lock when `object_lock`), by moto directly.
    pub fn create_bucket(&self, bucket: &str, object_lock: bool) {
        let lock = [("x-amz-bucket-object-lock-enabled", "true")];
        let headers: &[(&str, &str)] = if object_lock { &lock } else { &[] };
        let a = self.s3("PUT", &format!("/{bucket}"), "", headers, b"");
        assert_eq!(a.status, 200, "CreateBucket {bucket}: {}", a.body);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for MotoS3 {
    fn drop(&mut self) {
        self.stop();
    }
}
