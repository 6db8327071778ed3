//! People's side of the SMART App Launch through the real server's pages: a browser-like
//! agent, the forms, the CLI, accounts with TOTP, and the sign-in walk to an app's code.

use std::io::Write;
use std::process::{Command, Stdio};

use super::{BIN, Server};

pub const PASSWORD: &str = "harbor-violet-compass-42";
pub const REDIRECT: &str = "https://app.example/cb";

/// An agent that does not follow redirects (the app's redirect URI is not a real host).
pub fn browser(server: &Server) -> ureq::Agent {
    let ca = std::fs::read(server.data.join("tls/ca.pem")).expect("ca");
    super::tls_agent(&ca, 0)
}

pub struct Page {
    pub status: u16,
    pub location: Option<String>,
    pub cookie: Option<String>,
    pub body: String,
    /// `x-request-id`: joins the response to its audit event.
    pub request_id: Option<String>,
}

pub fn get(agent: &ureq::Agent, url: &str) -> Page {
    page(agent.get(url).call().expect("get"))
}

pub fn post_form(
    agent: &ureq::Agent,
    url: &str,
    cookie: Option<&str>,
    form: &[(&str, &str)],
) -> Page {
    let headers: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
    post_form_with(agent, url, &headers, form)
}

pub fn post_form_with(
    agent: &ureq::Agent,
    url: &str,
    headers: &[(&str, &str)],
    form: &[(&str, &str)],
) -> Page {
    let body: Vec<String> = form
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    let mut req = agent
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    page(req.send(body.join("&")).expect("post"))
}

pub fn page(mut r: ureq::http::Response<ureq::Body>) -> Page {
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let location = h("location");
    let request_id = h("x-request-id");
    let cookie = h("set-cookie").map(|c| c.split(';').next().unwrap_or("").to_owned());
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap_or_default();
    Page {
        status,
        location,
        cookie,
        body,
        request_id,
    }
}

pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn hidden(body: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let at = body
        .find(&marker)
        .unwrap_or_else(|| panic!("{name} in {body}"))
        + marker.len();
    body[at..].split('"').next().expect("value").to_owned()
}

pub fn query_param(url: &str, name: &str) -> Option<String> {
    url.split_once('?')?.1.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.replace("%2F", "/").replace("%20", " "))
    })
}

pub fn cli(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // (a command refused before it reads its input closes it: a broken pipe is its answer)
    if let Err(e) = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
    {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "stdin: {e}");
    }
    child.wait_with_output().expect("wait")
}

pub fn base32_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => panic!("base32"),
        };
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Add a patient user linked to `patient`; their TOTP secret.
pub fn add_user(server: &Server, username: &str, patient: &str) -> Vec<u8> {
    add_person(server, username, "patient", patient)
}

/// Add a user in `role` linked to `link` (a Patient id for patients, a Practitioner id for
/// clinicians); their TOTP secret.
pub fn add_person(server: &Server, username: &str, role: &str, link: &str) -> Vec<u8> {
    let data = server.data.to_str().expect("path");
    let mut args = vec![
        "user",
        "add",
        "--data-dir",
        data,
        "--username",
        username,
        "--role",
        role,
    ];
    match role {
        "clinician" => args.extend(["--practitioner", link]),
        "patient" => args.extend(["--patient", link]),
        _ => {}
    }
    let o = cli(&args, &format!("{PASSWORD}\n"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let uri = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    base32_decode(&query_param(&uri, "secret").expect("secret"))
}

/// Walk the sign-in from `authorize_url` as `username` with `otp` and approve; the code
/// the app receives at [`REDIRECT`] (state `st-1`). `shown` must appear on the first page.
pub fn sign_in_at(
    server: &Server,
    agent: &ureq::Agent,
    authorize_url: &str,
    username: &str,
    otp: &str,
    shown: Option<&str>,
) -> String {
    let start = get(agent, authorize_url);
    assert_eq!(start.status, 200, "{}", start.body);
    if let Some(text) = shown {
        assert!(start.body.contains(text), "{text} on the first page");
    }
    let cookie = start.cookie.expect("flow cookie");
    assert!(cookie.starts_with("__Host-phivault-flow="));
    let (flow, csrf) = (hidden(&start.body, "flow"), hidden(&start.body, "csrf"));
    let login = post_form(
        agent,
        &format!("{}/auth/login", server.origin),
        Some(&cookie),
        &[
            ("flow", &flow),
            ("csrf", &csrf),
            ("username", username),
            ("password", PASSWORD),
            ("otp", otp),
        ],
    );
    assert_eq!(login.status, 200, "{}", login.body);
    assert!(login.body.contains(".rs") && login.body.contains("Allow"));
    let consent = post_form(
        agent,
        &format!("{}/auth/consent", server.origin),
        Some(&cookie),
        &[("flow", &flow), ("csrf", &csrf), ("decision", "approve")],
    );
    assert_eq!(consent.status, 303, "{}", consent.body);
    let to = consent.location.expect("redirect");
    assert!(to.starts_with(&format!("{REDIRECT}?code=")), "{to}");
    assert_eq!(query_param(&to, "state").as_deref(), Some("st-1"));
    query_param(&to, "code").expect("code")
}

/// A SMART app registered with `phivault app add` (bearer tokens allowed), and a browser
/// for its users' sign-ins.
pub struct App {
    pub client_id: String,
    pub name: String,
    verifier: String,
    challenge: String,
    pub agent: ureq::Agent,
}

impl App {
    /// Register `name` for `user/*.cruds openid fhirUser offline_access`.
    pub fn register(server: &Server, name: &str) -> App {
        App::register_for(server, name, "user/*.cruds openid fhirUser offline_access")
    }

    /// Register `name` (bearer tokens allowed) for `scope`.
    pub fn register_for(server: &Server, name: &str, scope: &str) -> App {
        let data = server.data.to_str().expect("path");
        let o = cli(
            &[
                "app",
                "add",
                "--data-dir",
                data,
                "--name",
                name,
                "--redirect-uri",
                REDIRECT,
                "--scope",
                scope,
                "--allow-bearer",
            ],
            "",
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let app: serde_json::Value = serde_json::from_slice(&o.stdout).expect("app json");
        let verifier =
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [9u8; 48]);
        let challenge = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref(),
        );
        App {
            client_id: app["client_id"].as_str().expect("client_id").to_owned(),
            name: name.to_owned(),
            verifier,
            challenge,
            agent: browser(server),
        }
    }

    /// `username` signs in on the pages with their authenticator's code at `at` and
    /// approves `scope`; the access token the app gets.
    pub fn token(
        &self,
        server: &Server,
        username: &str,
        secret: &[u8],
        at: u64,
        scope: &str,
    ) -> String {
        let q: Vec<String> = [
            ("response_type", "code"),
            ("client_id", self.client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", "st-1"),
            ("aud", server.base.as_str()),
            ("code_challenge", self.challenge.as_str()),
            ("code_challenge_method", "S256"),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
        let url = format!("{}/auth/authorize?{}", server.origin, q.join("&"));
        let otp = phivault_auth::totp::code_at(secret, at);
        let code = sign_in_at(server, &self.agent, &url, username, &otp, Some(&self.name));
        let p = post_form(
            &self.agent,
            &format!("{}/auth/token", server.origin),
            None,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("client_id", &self.client_id),
                ("code_verifier", &self.verifier),
            ],
        );
        assert_eq!(p.status, 200, "{}", p.body);
        let t: serde_json::Value = serde_json::from_str(&p.body).expect("token");
        t["access_token"].as_str().expect("access").to_owned()
    }
}

/// `phivault audit scan` with working hours set to the whole week (so the wall clock
/// cannot matter): its summary.
pub fn scan_all_week(data: &str) -> serde_json::Value {
    let o = cli(
        &[
            "audit",
            "scan",
            "--data-dir",
            data,
            "--start-hour",
            "0",
            "--end-hour",
            "24",
            "--weekends",
        ],
        "",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("summary")
}

/// `phivault audit alerts --status STATUS`: the alerts, one JSON object each.
pub fn alerts_listed(data: &str, status: &str) -> Vec<serde_json::Value> {
    let o = cli(
        &["audit", "alerts", "--data-dir", data, "--status", status],
        "",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}
