//! Several phivault nodes on one PostgreSQL database are one service: a write on one is
//! read on the other at once, a client assertion used on one is refused on the other, the
//! audit log stays one chain, and when a node is killed under load no acknowledged write
//! is lost while the other keeps serving and takes over the periodic work.
//!
//! Real components: the `phivault` binary twice, a PostgreSQL cluster (the test run's, or
//! one of this test's own), behind one public URL as a load balancer would put them.
mod common;

use std::path::{Path, PathBuf};

use common::flow::{
    PASSWORD, REDIRECT, add_user, browser, cli, enc, get, hidden, post_form, query_param,
};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use phivault_store::postgres::testdb::TestDb;
use serde_json::{Value, json};

/// The one public origin of both nodes (a load balancer's).
const PUBLIC: &str = "https://phivault.test";

/// A node's arguments: the shared public URL, scans and whole-store checks often.
const SERVE: &[&str] = &[
    "--public-url",
    PUBLIC,
    "--scan-every",
    "10",
    "--verify-every",
    "2",
];

/// Node A's data directory made by `init --database`, and node B's: a copy of A's (which
/// holds no key: the key file is outside it).
fn two_data_dirs(tmp: &Path, db: &TestDb) -> (PathBuf, PathBuf) {
    let pwfile = database_password_file(db, tmp);
    let a = tmp.join("node-a");
    let mut c = Command::new(BIN);
    c.args(["init", "--data-dir"])
        .arg(&a)
        .args(["--database", db.target.url(), "--database-password-file"])
        .arg(&pwfile);
    key_home(&mut c, &a);
    let o = c.output().expect("init");
    assert!(
        o.status.success(),
        "init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let b = tmp.join("node-b");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&a)
        .arg(&b)
        .status()
        .expect("cp");
    assert!(st.success());
    // (the copy holds no key: the provider's key file is outside the data directory)
    assert!(!master_key_file(&b).starts_with(&b));
    (a, b)
}

fn start(tmp: &Path, data: &Path) -> Server {
    let launched = launch_with(data, SERVE);
    let copy = tempfile::tempdir_in(tmp).expect("tempdir");
    Server::running(copy, data.to_path_buf(), launched)
}

fn token_on(s: &Server, creds: &Creds, scope: &str) -> String {
    let a = s.assertion(creds, &format!("{PUBLIC}/auth/token"), &rand_hex());
    let r = s.token_request(&a, scope);
    assert_eq!(r.status, 200, "token: {}", String::from_utf8_lossy(&r.body));
    r.json()["access_token"].as_str().expect("token").to_owned()
}

fn create(s: &Server, token: &str, family: &str) -> Result<String, String> {
    let body = json!({"resourceType": "Patient", "name": [{"family": family}]});
    let r = s
        .try_send(
            "POST",
            &format!("{}/Patient", s.base),
            Some(token),
            Some(("application/fhir+json", body.to_string().into_bytes())),
            &[],
        )
        .map_err(|e| e.to_string())?;
    if r.status != 201 {
        return Err(format!("status {}", r.status));
    }
    Ok(r.json()["id"].as_str().expect("id").to_owned())
}

#[test]
fn two_nodes_on_one_database_are_one_service() {
    let db = TestDb::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (da, dbb) = two_data_dirs(tmp.path(), &db);
    let mut a = start(tmp.path(), &da);
    let b = start(tmp.path(), &dbb);
    let scope = "system/*.cruds";
    let creds = a.add_client(scope);
    let token = token_on(&a, &creds, scope);

    // a write acknowledged by one node is read by the other at once
    let id = create(&a, &token, "Nodeson").expect("create on A");
    let r = b.get(&format!("Patient/{id}"), &token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["name"][0]["family"], "Nodeson");
    let id_b = create(&b, &token, "Otherson").expect("create on B");
    assert_eq!(a.get(&format!("Patient/{id_b}"), &token).status, 200);

    // a client assertion used on one node is refused on the other
    let assertion = a.assertion(&creds, &format!("{PUBLIC}/auth/token"), &rand_hex());
    assert_eq!(a.token_request(&assertion, scope).status, 200);
    let replayed = b.token_request(&assertion, scope);
    assert_eq!(
        replayed.status,
        401,
        "{}",
        String::from_utf8_lossy(&replayed.body)
    );
    assert_eq!(replayed.json()["error"], "invalid_client");
    assert_eq!(a.token_request(&assertion, scope).status, 401);

    // both nodes write at once, then one is killed under load: every write acknowledged
    // (by either) is there, read through the survivor
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop_at = Instant::now() + Duration::from_secs(4);
    let writers: Vec<_> = [
        (a.base.clone(), a.agent.clone()),
        (b.base.clone(), b.agent.clone()),
    ]
    .into_iter()
    .flat_map(|node| std::iter::repeat_n(node, 3))
    .enumerate()
    .map(|(n, (base, agent))| {
        let (acked, token) = (acked.clone(), token.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while Instant::now() < stop_at {
                i += 1;
                let body =
                    json!({"resourceType": "Patient", "name": [{"family": format!("W{n}x{i}")}]});
                let r = try_send(
                    &agent,
                    "POST",
                    &format!("{base}/Patient"),
                    Some(&token),
                    Some(("application/fhir+json", body.to_string().into_bytes())),
                    &[],
                );
                if let Ok(r) = r
                    && r.status == 201
                {
                    let id = r.json()["id"].as_str().expect("id").to_owned();
                    acked.lock().expect("lock").push(id);
                }
            }
        })
    })
    .collect();
    std::thread::sleep(Duration::from_secs(2));
    let a_log_before_kill = String::from_utf8_lossy(&a.logs()).into_owned();
    a.kill9();
    for w in writers {
        w.join().expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() > 50,
        "writes were acknowledged under load: {}",
        acked.len()
    );
    let mut missing = Vec::new();
    for id in &acked {
        if b.get(&format!("Patient/{id}"), &token).status != 200 {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost",
        missing.len(),
        acked.len()
    );
    // the survivor keeps serving writes
    create(&b, &token, "Aftermath").expect("B writes after A died");

    // the periodic work: A ran it at first (it started first); B takes it over
    assert!(
        a_log_before_kill.contains("this node runs the periodic task now"),
        "A led: {a_log_before_kill}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let took_over = loop {
        let log = String::from_utf8_lossy(&b.logs()).into_owned();
        if log.contains("task=\"snooping-scan\"") || log.contains("task=snooping-scan") {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        took_over,
        "B took over the snooping scan: {}",
        String::from_utf8_lossy(&b.logs())
    );

    // one audit chain for both nodes, which `audit verify` and `verify` accept
    let (ok, out) = b.audit_verify();
    assert!(ok, "audit verify: {out}");
    let o = Command::new(BIN)
        .args(["verify", "--data-dir"])
        .arg(&b.data)
        .output()
        .expect("verify");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "verify: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let events: Value = json!(audit_events(&b).len());
    assert!(events.as_u64().unwrap_or(0) > acked.len() as u64);
}

/// A person's browser and app hop between the nodes at every step: the sign-in started on
/// one continues on the other, the code issued by one is exchanged at the other, and a
/// refresh token retired on one ends the session on both.
#[test]
fn a_sign_in_and_its_session_work_across_the_nodes() {
    let db = TestDb::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (da, dbb) = two_data_dirs(tmp.path(), &db);
    let a = start(tmp.path(), &da);
    let b = start(tmp.path(), &dbb);
    let scope = "system/*.cruds";
    let creds = a.add_client(scope);
    let token = token_on(&a, &creds, scope);
    let patient = create(&a, &token, "Hopperson").expect("a patient");
    let secret = add_user(&a, "hopper", &patient);
    let data = a.data.to_str().expect("path");
    let o = cli(
        &[
            "app",
            "add",
            "--data-dir",
            data,
            "--name",
            "Hop app",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            "patient/*.rs openid fhirUser launch/patient offline_access",
            "--allow-bearer",
        ],
        "",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let app: Value = serde_json::from_slice(&o.stdout).expect("app json");
    let client_id = app["client_id"].as_str().expect("client_id").to_owned();
    let verifier = "hop-verifier-0123456789-0123456789-0123456789-abc";
    let challenge = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref(),
    );
    let agent = browser(&a);
    let q: Vec<String> = [
        ("response_type", "code"),
        ("client_id", client_id.as_str()),
        ("redirect_uri", REDIRECT),
        (
            "scope",
            "patient/*.rs openid fhirUser launch/patient offline_access",
        ),
        ("state", "st-1"),
        ("aud", &format!("{PUBLIC}/fhir")),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", enc(v)))
    .collect();
    // the authorize page from A, the login form to B, the consent to A
    let start_page = get(
        &agent,
        &format!("{}/auth/authorize?{}", a.origin, q.join("&")),
    );
    assert_eq!(start_page.status, 200, "{}", start_page.body);
    let cookie = start_page.cookie.expect("flow cookie");
    let (flow, csrf) = (
        hidden(&start_page.body, "flow"),
        hidden(&start_page.body, "csrf"),
    );
    let otp = phivault_auth::totp::code_at(&secret, now());
    let login = post_form(
        &agent,
        &format!("{}/auth/login", b.origin),
        Some(&cookie),
        &[
            ("flow", &flow),
            ("csrf", &csrf),
            ("username", "hopper"),
            ("password", PASSWORD),
            ("otp", &otp),
        ],
    );
    assert_eq!(login.status, 200, "{}", login.body);
    let consent = post_form(
        &agent,
        &format!("{}/auth/consent", a.origin),
        Some(&cookie),
        &[("flow", &flow), ("csrf", &csrf), ("decision", "approve")],
    );
    assert_eq!(consent.status, 303, "{}", consent.body);
    let code = query_param(&consent.location.expect("redirect"), "code").expect("code");
    // the code exchanged at B, refreshed at A; the retired token at B ends it everywhere
    let exchange = |node: &Server, form: &[(&str, &str)]| {
        let p = post_form(&agent, &format!("{}/auth/token", node.origin), None, form);
        (
            p.status,
            serde_json::from_str::<Value>(&p.body).unwrap_or(Value::Null),
        )
    };
    let (st, t) = exchange(
        &b,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", &client_id),
            ("code_verifier", verifier),
        ],
    );
    assert_eq!(st, 200, "{t}");
    let access = t["access_token"].as_str().expect("access").to_owned();
    let r1 = t["refresh_token"].as_str().expect("refresh").to_owned();
    for node in [&a, &b] {
        assert_eq!(node.get(&format!("Patient/{patient}"), &access).status, 200);
    }
    let refresh = |node: &Server, token: &str| {
        exchange(
            node,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", token),
                ("client_id", &client_id),
            ],
        )
    };
    let (st, t2) = refresh(&a, &r1);
    assert_eq!(st, 200, "{t2}");
    let r2 = t2["refresh_token"].as_str().expect("refresh").to_owned();
    let (st, reused) = refresh(&b, &r1);
    assert_eq!(
        (st, reused["error"].as_str()),
        (400, Some("invalid_grant")),
        "{reused}"
    );
    let (st, ended) = refresh(&a, &r2);
    assert_eq!(
        (st, ended["error"].as_str()),
        (400, Some("invalid_grant")),
        "{ended}"
    );
    // the code once more, at A: refused
    let (st, _) = exchange(
        &a,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", &client_id),
            ("code_verifier", verifier),
        ],
    );
    assert_eq!(st, 400);
}

/// The README's one command: `serve --database URL` on a first run makes the data
/// directory with its store in PostgreSQL; later runs read it from `database.json`, and a
/// different `--database` for an existing directory is refused.
#[test]
fn the_first_run_of_serve_puts_its_store_in_the_database_named() {
    let db = TestDb::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pwfile = database_password_file(&db, tmp.path());
    let data = tmp.path().join("data");
    let pwarg = pwfile.to_str().expect("path").to_owned();
    let first = [
        "--database",
        db.target.url(),
        "--database-password-file",
        pwarg.as_str(),
    ];
    let launched = launch_with(&data, &first);
    let mut s = Server::running(
        tempfile::tempdir().expect("tempdir"),
        data.clone(),
        launched,
    );
    assert!(data.join("database.json").exists());
    assert!(!data.join("phivault.db").exists(), "no embedded store");
    let t = s.token("system/*.cruds");
    let id = create(&s, &t, "Firstrun").expect("create");
    s.restart();
    // (a new port: a new origin, a new audience)
    let t = s.token("system/*.cruds");
    assert_eq!(s.get(&format!("Patient/{id}"), &t).status, 200);
    s.stop();
    let mut c = Command::new(BIN);
    c.args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--database"])
        .arg(db.admin_url.as_str());
    key_home(&mut c, &data);
    let e = try_spawn_server(c).expect_err("refused");
    assert!(e.contains("already exists and keeps its store"), "{e}");
}

/// A share link made on one node is fetched through the other (one exchange area, as on
/// a shared filesystem), and its passcode cap holds exactly under guesses spread over
/// both nodes at once (each attempt counted in the database's row, under its lock).
#[test]
fn a_share_links_cap_holds_across_the_nodes() {
    let db = TestDb::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (da, dbb) = two_data_dirs(tmp.path(), &db);
    let exchange = tmp.path().join("exchange");
    let ex = exchange.to_str().expect("path");
    let mut args: Vec<&str> = SERVE.to_vec();
    args.extend(["--exchange-dir", ex]);
    let start_with = |data: &Path| {
        let launched = launch_with(data, &args);
        let copy = tempfile::tempdir_in(tmp.path()).expect("tempdir");
        Server::running(copy, data.to_path_buf(), launched)
    };
    let a = start_with(&da);
    let b = start_with(&dbb);
    let scope = "system/*.cruds";
    let creds = a.add_client(scope);
    let token = token_on(&a, &creds, scope);
    let patient = create(&a, &token, "Linkson").expect("patient");
    let made = a.send(
        "POST",
        &format!("{}/shl/links", a.origin),
        Some(&token),
        Some((
            "application/json",
            json!({"patient": format!("Patient/{patient}"), "passcode": "kestrel-55",
                "passcodeAttempts": 20})
            .to_string()
            .into_bytes(),
        )),
        &[],
    );
    assert_eq!(made.status, 201, "{}", String::from_utf8_lossy(&made.body));
    let shlink = made.json()["shlink"].as_str().expect("shlink").to_owned();
    let payload: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            shlink.trim_start_matches("shlink:/"),
        )
        .expect("b64"),
    )
    .expect("json");
    let url = payload["url"].as_str().expect("url").to_owned();
    assert!(url.starts_with(PUBLIC), "{url}");
    let on = |s: &Server, u: &str| u.replacen(PUBLIC, &s.origin, 1);
    let ask = |s: &Server, pass: &str| {
        s.send(
            "POST",
            &on(s, &url),
            None,
            Some((
                "application/json",
                json!({"recipient": "GP", "passcode": pass})
                    .to_string()
                    .into_bytes(),
            )),
            &[],
        )
    };
    // made on A, opened through B, its file fetched through either
    let m = ask(&b, "kestrel-55");
    assert_eq!(m.status, 200, "{}", String::from_utf8_lossy(&m.body));
    let loc = m.json()["files"][0]["location"]
        .as_str()
        .expect("location")
        .to_owned();
    assert_eq!(b.send("GET", &on(&b, &loc), None, None, &[]).status, 200);
    assert_eq!(a.send("GET", &on(&a, &loc), None, None, &[]).status, 200);
    // 100 guesses over both nodes at once: exactly 20 counted, each told a distinct number
    let answers: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..100)
            .map(|i| {
                let node = if i % 2 == 0 { &a } else { &b };
                let ask = &ask;
                sc.spawn(move || {
                    let r = ask(node, &format!("guess-{i}"));
                    (r.status, r.json())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut left: Vec<u64> = answers
        .iter()
        .filter(|(s, _)| *s == 401)
        .map(|(_, v)| v["remainingAttempts"].as_u64().expect("remaining"))
        .collect();
    left.sort_unstable();
    assert_eq!(left, (0..20).collect::<Vec<u64>>());
    assert_eq!(
        answers
            .iter()
            .filter(|(s, _)| *s == 404 || *s == 429)
            .count(),
        80
    );
    assert_eq!(ask(&a, "kestrel-55").status, 404, "locked on every node");
    assert_eq!(ask(&b, "kestrel-55").status, 404);
    let (ok, msg) = a.audit_verify();
    assert!(ok, "{msg}");
}
