//! SMART App Launch (standalone) through the real binary: a patient signs in with password
//! and TOTP on the server's pages, approves, and the app exchanges the code with PKCE;
//! refresh tokens rotate; and the attacks on the flow are refused and audited.
mod common;
use common::flow::*;
use common::*;

use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

/// How often the test servers re-read a person's account (`--account-recheck-ms`).
const ACCOUNT_RECHECK_MS: u64 = 100;
/// How soon the test servers fetch a provider's keys again (`--idp-refetch-ms`).
const IDP_REFETCH_MS: u64 = 200;

struct Setup {
    server: Server,
    client_id: String,
    patient: String,
    /// Observations of `patient`
    own_obs: Vec<String>,
    /// Another patient and one of their observations
    other: (String, String),
    /// maria.p's TOTP secret
    secret: Vec<u8>,
    verifier: String,
    challenge: String,
}

/// The synthetic bundles loaded, each with its `fullUrl` → `Type/id` map.
type Loaded = Vec<(Value, std::collections::HashMap<String, String>)>;

fn setup() -> Setup {
    setup_with(2).0
}

/// The setup over `patients` synthetic patients, and what was loaded.
fn setup_with(patients: usize) -> (Setup, Loaded) {
    // accounts re-read every 100 ms and providers' keys fetched again after 200 ms (the
    // defaults are 2 s and 5 s): the tests wait for those intervals, so they are short here
    let server = Server::start_with_args(&[
        "--account-recheck-ms",
        &ACCOUNT_RECHECK_MS.to_string(),
        "--idp-refetch-ms",
        &IDP_REFETCH_MS.to_string(),
    ]);
    let token = server.token("system/*.cruds");
    let loaded = server.load_synth(&token, patients, 77);
    let of = |i: usize, rtype: &str| -> Vec<String> {
        let mut v: Vec<String> = loaded[i]
            .1
            .values()
            .filter_map(|t| t.strip_prefix(&format!("{rtype}/")))
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    };
    let patient = of(0, "Patient")[0].clone();
    let own_obs = of(0, "Observation");
    let other = (of(1, "Patient")[0].clone(), of(1, "Observation")[0].clone());
    assert!(!own_obs.is_empty());
    let data = server.data.to_str().expect("path").to_owned();
    let o = cli(
        &[
            "app",
            "add",
            "--data-dir",
            &data,
            "--name",
            "My <Health> App",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            "patient/*.rs user/*.cruds openid fhirUser launch/patient offline_access",
            "--allow-bearer",
        ],
        "",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let app: Value = serde_json::from_slice(&o.stdout).expect("app json");
    let client_id = app["client_id"].as_str().expect("client_id").to_owned();
    let secret = add_user(&server, "maria.p", &patient);
    let verifier = URL_SAFE_NO_PAD.encode([7u8; 48]);
    let challenge = URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
    let s = Setup {
        server,
        client_id,
        patient,
        own_obs,
        other,
        secret,
        verifier,
        challenge,
    };
    (s, loaded)
}

impl Setup {
    fn authorize_url(&self, extra: &[(&str, &str)]) -> String {
        let mut p: Vec<(&str, String)> = vec![
            ("response_type", "code".into()),
            ("client_id", self.client_id.clone()),
            ("redirect_uri", REDIRECT.into()),
            (
                "scope",
                "patient/Patient.rs patient/Observation.rs openid fhirUser launch/patient offline_access".into(),
            ),
            ("state", "st-1".into()),
            ("aud", self.server.base.clone()),
            ("code_challenge", self.challenge.clone()),
            ("code_challenge_method", "S256".into()),
        ];
        for (k, v) in extra {
            p.retain(|(n, _)| n != k);
            if !v.is_empty() {
                p.push((k, (*v).to_owned()));
            }
        }
        let q: Vec<String> = p.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
        format!("{}/auth/authorize?{}", self.server.origin, q.join("&"))
    }

    /// maria.p's authenticator code at `at`.
    fn code(&self, at: u64) -> String {
        phivault_auth::totp::code_at(&self.secret, at)
    }

    /// The app's exchange of an authorization `code` (PKCE verifier, registered redirect).
    fn exchange(&self, agent: &ureq::Agent, code: &str) -> (u16, Value) {
        self.token(
            agent,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("client_id", &self.client_id),
                ("code_verifier", &self.verifier),
            ],
        )
    }

    fn token(&self, agent: &ureq::Agent, form: &[(&str, &str)]) -> (u16, Value) {
        let p = post_form(
            agent,
            &format!("{}/auth/token", self.server.origin),
            None,
            form,
        );
        (
            p.status,
            serde_json::from_str(&p.body).unwrap_or(Value::Null),
        )
    }
}

/// Sign in as `username` on the pages with `otp` and approve; the code the app receives.
fn sign_in(s: &Setup, agent: &ureq::Agent, username: &str, otp: &str) -> String {
    sign_in_for(s, agent, username, otp, &[])
}

/// [`sign_in`] with other authorization request parameters (`("scope", …)`).
fn sign_in_for(
    s: &Setup,
    agent: &ureq::Agent,
    username: &str,
    otp: &str,
    extra: &[(&str, &str)],
) -> String {
    // the app's name, escaped, on the first page when it is our app asking
    let own_app = extra.iter().all(|(k, _)| *k != "client_id");
    sign_in_at(
        &s.server,
        agent,
        &s.authorize_url(extra),
        username,
        otp,
        own_app.then_some("My &lt;Health&gt; App"),
    )
}

#[test]
fn a_patient_signs_in_with_password_and_totp_and_the_app_gets_tokens() {
    let s = setup();
    let agent = browser(&s.server);
    let now = now();
    // codes of one step are accepted once, within one step of the server's clock: two
    // sign-ins per person (maria.p, then jon.p)
    let jon = add_user(&s.server, "jon.p", &s.patient);
    let jon_code = |at: u64| phivault_auth::totp::code_at(&jon, at);
    let code = sign_in(&s, &agent, "Maria.P", &s.code(now));
    let exchange = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("client_id", s.client_id.as_str()),
        ("code_verifier", s.verifier.as_str()),
    ];
    // a wrong verifier burns the code
    let mut wrong = exchange;
    let bad_verifier = URL_SAFE_NO_PAD.encode([8u8; 48]);
    wrong[4] = ("code_verifier", bad_verifier.as_str());
    assert_eq!(s.token(&agent, &wrong).1["error"], "invalid_grant");
    assert_eq!(s.token(&agent, &exchange).1["error"], "invalid_grant");

    // a fresh sign-in (the next TOTP step: the first code cannot be used twice)
    let code = sign_in(&s, &agent, "maria.p", &s.code(now + 30));
    let exchange = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("client_id", s.client_id.as_str()),
        ("code_verifier", s.verifier.as_str()),
    ];
    let (status, t) = s.token(&agent, &exchange);
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["patient"], s.patient.as_str());
    assert_eq!(
        t["scope"],
        "patient/Observation.rs patient/Patient.rs fhirUser launch/patient offline_access openid"
    );
    let access = t["access_token"].as_str().expect("access").to_owned();
    let refresh = t["refresh_token"].as_str().expect("refresh").to_owned();
    // the id token names the account and the Patient, for this app
    let id = t["id_token"].as_str().expect("id_token");
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(id.split('.').nth(1).expect("payload"))
            .expect("b64"),
    )
    .expect("claims");
    assert_eq!(claims["aud"], s.client_id.as_str());
    assert_eq!(
        claims["fhirUser"],
        format!("{}/Patient/{}", s.server.base, s.patient)
    );
    // the code is single-use, and its replay ends the session it started
    assert_eq!(s.token(&agent, &exchange).1["error"], "invalid_grant");
    let (status, _) = s.token(
        &agent,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", &s.client_id),
        ],
    );
    assert_eq!(status, 400, "the replayed code revoked the refresh token");
    compartment_is_all_a_patient_sees(&s, &access);

    // refresh tokens rotate; a retired one revokes the family; scope only narrows
    let code = sign_in(&s, &agent, "jon.p", &jon_code(now));
    let (_, t) = s.exchange(&agent, &code);
    let r1 = t["refresh_token"].as_str().expect("refresh").to_owned();
    let refresh_with = |tok: &str, scope: Option<&str>| {
        let mut f = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", tok),
            ("client_id", s.client_id.as_str()),
        ];
        if let Some(sc) = scope {
            f.push(("scope", sc));
        }
        s.token(&agent, &f)
    };
    let (st, e) = refresh_with(&r1, Some("patient/*.cruds"));
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_scope")));
    let (st, t2) = refresh_with(&r1, Some("patient/Observation.rs offline_access"));
    assert_eq!(st, 200, "{t2}");
    assert_eq!(t2["scope"], "patient/Observation.rs offline_access");
    let r2 = t2["refresh_token"].as_str().expect("rotated").to_owned();
    assert_ne!(r1, r2);
    assert_eq!(refresh_with(&r1, None).1["error"], "invalid_grant");
    assert_eq!(
        refresh_with(&r2, None).1["error"],
        "invalid_grant",
        "reuse of r1 revoked r2"
    );

    // introspection (a back-end client) and revocation
    let backend = s.server.token("system/*.rs");
    let intro = |tok: &str| -> Value {
        let r = s.server.send(
            "POST",
            &format!("{}/auth/introspect", s.server.origin),
            Some(&backend),
            Some((
                "application/x-www-form-urlencoded",
                format!("token={}", enc(tok)).into_bytes(),
            )),
            &[],
        );
        assert_eq!(r.status, 200);
        r.json()
    };
    assert_eq!(intro(&access)["active"], true);
    assert_eq!(intro(&access)["patient"], s.patient.as_str());
    assert_eq!(intro(&r2)["active"], false);
    assert_eq!(intro("not-a-token")["active"], false);
    let r = s.server.send(
        "POST",
        &format!("{}/auth/introspect", s.server.origin),
        Some(&access),
        Some(("application/x-www-form-urlencoded", b"token=x".to_vec())),
        &[],
    );
    assert_eq!(r.status, 403, "a person's token cannot introspect");

    // revocation ends the session
    let code = sign_in(&s, &agent, "jon.p", &jon_code(now + 30));
    let (_, t) = s.exchange(&agent, &code);
    let r3 = t["refresh_token"].as_str().expect("refresh").to_owned();
    assert_eq!(intro(&r3)["active"], true);
    let p = post_form(
        &agent,
        &format!("{}/auth/revoke", s.server.origin),
        None,
        &[("token", &r3), ("client_id", &s.client_id)],
    );
    assert_eq!(p.status, 200);
    assert_eq!(intro(&r3)["active"], false);

    // disabling an account, or changing its role, revokes its access tokens too
    let jon_access = t["access_token"].as_str().expect("access").to_owned();
    let own = format!("Patient/{}", s.patient);
    assert_eq!(s.server.get(&own, &jon_access).status, 200);
    assert_eq!(s.server.get(&own, &access).status, 200);
    let data = s.server.data.to_str().expect("path").to_owned();
    let o = cli(
        &[
            "user",
            "disable",
            "--data-dir",
            &data,
            "--username",
            "jon.p",
        ],
        "",
    );
    assert!(o.status.success());
    let o = cli(
        &[
            "user",
            "role",
            "--data-dir",
            &data,
            "--username",
            "maria.p",
            "--role",
            "auditor",
        ],
        "",
    );
    assert!(o.status.success());
    // the server re-reads an account at most every ACCOUNT_RECHECK_MS
    std::thread::sleep(Duration::from_millis(3 * ACCOUNT_RECHECK_MS));
    for tok in [&jon_access, &access] {
        let r = s.server.get(&own, tok);
        assert_eq!(r.status, 401);
        assert!(
            r.header("www-authenticate")
                .is_some_and(|w| w.contains("invalid_token"))
        );
    }

    let mut server = s.server;
    let (ok, out) = server.audit_verify();
    assert!(ok, "{out}");
    server.stop();
}

/// A patient's token reads and searches exactly their compartment; everything that would
/// reach outside it is refused or not found.
fn compartment_is_all_a_patient_sees(s: &Setup, access: &str) {
    let get = |path: &str| s.server.get(path, access);
    let own = &s.patient;
    let (other, other_obs) = &s.other;
    assert_eq!(get(&format!("Patient/{own}")).status, 200);
    assert_eq!(get(&format!("Observation/{}", s.own_obs[0])).status, 200);
    // another patient's records: not found (their ids reveal nothing)
    assert_eq!(get(&format!("Patient/{other}")).status, 404);
    assert_eq!(get(&format!("Observation/{other_obs}")).status, 404);
    assert_eq!(get("Observation/no-such-id").status, 404);
    // searches are confined to the compartment
    let b = get("Observation?_count=1000").json();
    let mut ids: Vec<String> = b["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["resource"]["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, s.own_obs, "exactly the patient's observations");
    let b = get("Patient").json();
    assert_eq!(b["entry"].as_array().map(Vec::len), Some(1));
    assert_eq!(b["entry"][0]["resource"]["id"], own.as_str());
    assert_eq!(get(&format!("Patient/{own}/Observation")).status, 200);
    // chains, _has, includes, instance history, $everything and batch reads work within
    // the compartment, and only there
    let all_genders = "subject:Patient.gender=male,female,other,unknown";
    assert_eq!(
        ids_of(&get(&format!("Observation?{all_genders}&_count=1000")).json()),
        s.own_obs
    );
    assert_eq!(
        ids_of(&get("Patient?_has:Observation:patient:status=final").json()),
        std::slice::from_ref(own)
    );
    let with = |path: &str| -> Vec<String> {
        let b = get(path).json();
        let mut v: Vec<String> = b["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                let r = &e["resource"];
                format!(
                    "{}/{}",
                    r["resourceType"].as_str().expect("type"),
                    r["id"].as_str().expect("id")
                )
            })
            .collect();
        v.sort();
        v
    };
    let mut expect: Vec<String> = s
        .own_obs
        .iter()
        .map(|o| format!("Observation/{o}"))
        .collect();
    expect.push(format!("Patient/{own}"));
    expect.sort();
    assert_eq!(
        with("Observation?_include=Observation:subject&_count=1000"),
        expect
    );
    assert_eq!(
        with("Patient?_revinclude=Observation:subject&_count=1000"),
        expect
    );
    assert_eq!(
        get(&format!("Observation/{}/_history", s.own_obs[0])).status,
        200
    );
    assert_eq!(
        get(&format!("Observation/{other_obs}/_history")).status,
        404
    );
    let everything = get(&format!("Patient/{own}/$everything"));
    assert_eq!(everything.status, 200);
    let everything = everything.json();
    assert!(
        everything["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .all(|e| {
                let r = &e["resource"];
                r["id"] == own.as_str()
                    || serde_json::to_string(r)
                        .expect("json")
                        .contains(&format!("Patient/{own}"))
            })
    );
    // refused: another compartment, type history, types outside the granted scopes
    for path in [
        format!("Patient/{other}/Observation"),
        format!("Patient/{other}/$everything"),
        "Observation/_history".to_owned(),
        "Condition".to_owned(),
    ] {
        let r = get(&path);
        assert!(
            r.status == 403 || r.status == 404,
            "{path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.is_outcome(), "{path}");
    }
    let obs = serde_json::json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": format!("Patient/{own}")}});
    assert_eq!(s.server.post("Observation", access, &obs).status, 403);
    let batch = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Patient/{other}")}},
        {"request": {"method": "GET", "url": format!("Patient/{own}")}},
        {"request": {"method": "DELETE", "url": format!("Patient/{own}")}}]});
    let r = s.server.post("", access, &batch);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let statuses: Vec<String> = r.json()["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(statuses[0].starts_with("404"), "{statuses:?}");
    assert!(statuses[1].starts_with("200"), "{statuses:?}");
    assert!(statuses[2].starts_with("403"), "{statuses:?}");
}

#[test]
fn attacks_on_the_flow_are_refused() {
    let s = setup();
    let agent = browser(&s.server);
    // an unregistered redirect URI gets an error page, never a redirect
    let p = get(
        &agent,
        &s.authorize_url(&[("redirect_uri", "https://evil.example/cb")]),
    );
    assert_eq!((p.status, p.location.is_none()), (400, true));
    // PKCE plain, or none: back to the app with an error
    for extra in [
        [("code_challenge_method", "plain"), ("code_challenge", "")],
        [("code_challenge_method", ""), ("code_challenge", "")],
    ] {
        let p = get(&agent, &s.authorize_url(&extra));
        assert_eq!(p.status, 303);
        let to = p.location.expect("redirect");
        assert_eq!(
            query_param(&to, "error").as_deref(),
            Some("invalid_request")
        );
        assert_eq!(query_param(&to, "state").as_deref(), Some("st-1"));
    }
    // system/ scopes are never granted to a person's app
    let p = get(&agent, &s.authorize_url(&[("scope", "system/*.cruds")]));
    assert_eq!(
        query_param(&p.location.expect("redirect"), "error").as_deref(),
        Some("invalid_scope")
    );

    // the login form without the browser cookie, or with another CSRF token: refused
    let start = get(&agent, &s.authorize_url(&[]));
    let cookie = start.cookie.clone().expect("cookie");
    let (flow, csrf) = (hidden(&start.body, "flow"), hidden(&start.body, "csrf"));
    let login_url = format!("{}/auth/login", s.server.origin);
    let good = s.code(now());
    let attempt = |cookie: Option<&str>, csrf: &str, password: &str, otp: &str| {
        post_form(
            &agent,
            &login_url,
            cookie,
            &[
                ("flow", &flow),
                ("csrf", csrf),
                ("username", "maria.p"),
                ("password", password),
                ("otp", otp),
            ],
        )
    };
    assert_eq!(attempt(None, &csrf, PASSWORD, &good).status, 400);
    assert_eq!(
        attempt(Some(&cookie), "forged", PASSWORD, &good).status,
        400
    );
    assert_eq!(
        attempt(Some("__Host-phivault-flow=stolen"), &csrf, PASSWORD, &good).status,
        400
    );
    // wrong password, wrong code: the same answer, which names neither
    let a = attempt(Some(&cookie), &csrf, "not-the-password-1", &good);
    let wrong_code = if good == "000000" { "111111" } else { "000000" };
    let b = attempt(Some(&cookie), &csrf, PASSWORD, wrong_code);
    assert_eq!((a.status, b.status), (401, 401));
    assert!(a.body.contains("Sign-in failed") && b.body.contains("Sign-in failed"));
    assert!(!a.body.contains("password is wrong") && !b.body.contains("code is wrong"));
    // an unknown user gets the same answer too
    let c = post_form(
        &agent,
        &login_url,
        Some(&cookie),
        &[
            ("flow", &flow),
            ("csrf", &csrf),
            ("username", "nobody.here"),
            ("password", PASSWORD),
            ("otp", &good),
        ],
    );
    assert_eq!(c.status, 401);
    // the page allows five failures, then ends
    assert_eq!(
        attempt(Some(&cookie), &csrf, "wrong-password-22", &good).status,
        401
    );
    let e = attempt(Some(&cookie), &csrf, "wrong-password-33", &good);
    assert_eq!(e.status, 401);
    assert!(e.body.contains("expired"), "{}", e.body);
    assert_eq!(
        attempt(Some(&cookie), &csrf, PASSWORD, &good).status,
        400,
        "flow ended"
    );
    // a fifth failure of the account locks it: then even the right credentials fail
    let start = get(&agent, &s.authorize_url(&[]));
    let cookie = start.cookie.expect("cookie");
    let (flow, csrf) = (hidden(&start.body, "flow"), hidden(&start.body, "csrf"));
    let fifth = post_form(
        &agent,
        &login_url,
        Some(&cookie),
        &[
            ("flow", &flow),
            ("csrf", &csrf),
            ("username", "maria.p"),
            ("password", "wrong-password-44"),
            ("otp", &good),
        ],
    );
    assert_eq!(fifth.status, 401);
    let locked = post_form(
        &agent,
        &login_url,
        Some(&cookie),
        &[
            ("flow", &flow),
            ("csrf", &csrf),
            ("username", "maria.p"),
            ("password", PASSWORD),
            ("otp", &s.code(now() + 30)),
        ],
    );
    assert_eq!(locked.status, 401, "locked: {}", locked.body);
    assert!(locked.body.contains("Sign-in failed"));

    // every attempt is in the audit log, naming the account (by id) where one was named,
    // and the log verifies
    let mut server = s.server;
    server.stop();
    let (ok, out) = server.audit_verify();
    assert!(ok, "{out}");
    let events = audit_events(&server);
    let count = |what: &str| events.iter().filter(|e| e.interaction == what).count();
    assert_eq!(
        count("authorize-refused"),
        3,
        "plain, missing PKCE and system scope"
    );
    assert_eq!(count("login-failed-password"), 4, "a, unknown user, 22, 33");
    assert_eq!(count("login-failed-second-factor"), 1);
    assert_eq!(
        count("login-locked"),
        2,
        "44 (the fifth failure locks) and then the right credentials"
    );
    let maria: Vec<_> = events
        .iter()
        .filter(|e| e.interaction.starts_with("login-") && e.user.is_some())
        .collect();
    assert_eq!(
        maria.len(),
        6,
        "every failure of the named account carries its id"
    );
    assert!(maria.windows(2).all(|w| w[0].user == w[1].user));
    let id = maria[0].user.as_deref().expect("id");
    assert_eq!(id.len(), 36, "an opaque UUID, not the login name");
    assert!(
        events
            .iter()
            .all(|e| e.outcome.http_status != 200 || !e.interaction.starts_with("login-failed"))
    );
}

/// The server ids of `rtype` records among what was loaded from bundles `which`.
fn loaded_ids(loaded: &Loaded, which: &[usize], rtype: &str) -> Vec<String> {
    let mut v: Vec<String> = which
        .iter()
        .flat_map(|&i| loaded[i].1.values())
        .filter_map(|t| t.strip_prefix(&format!("{rtype}/")))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

fn ids_of(bundle: &Value) -> Vec<String> {
    let mut ids: Vec<String> = bundle["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["resource"]["id"].as_str().expect("id").to_owned())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

#[test]
fn a_clinician_sees_exactly_their_patients_and_breaks_the_glass_for_one_more() {
    let (mut s, loaded) = setup_with(4);
    let system = s.server.token("system/*.cruds");
    // the synthetic data's own relationships, computed from the generated bundles: the
    // patients of the Encounters practitioner 0 takes part in
    let pr_url = loaded[0].0["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Practitioner")
        .and_then(|e| e["fullUrl"].as_str())
        .expect("practitioner")
        .to_owned();
    let pr = loaded[0].1[&pr_url]
        .strip_prefix("Practitioner/")
        .expect("id")
        .to_owned();
    let mut treated: Vec<usize> = Vec::new();
    for (i, (bundle, _)) in loaded.iter().enumerate() {
        for e in bundle["entry"].as_array().expect("entries") {
            let r = &e["resource"];
            let takes_part = r["participant"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["individual"]["reference"] == pr_url.as_str())
            });
            if r["resourceType"] == "Encounter" && takes_part && !treated.contains(&i) {
                treated.push(i);
            }
        }
    }
    assert_eq!(treated, [0], "one practitioner per synthetic patient");
    let patient = |i: usize| loaded_ids(&loaded, &[i], "Patient")[0].clone();
    // a CareTeam puts them in patient 1's care, an Appointment in patient 2's
    let team = serde_json::json!({"resourceType": "CareTeam", "status": "active",
        "subject": {"reference": format!("Patient/{}", patient(1))},
        "participant": [{"member": {"reference": format!("Practitioner/{pr}")}}]});
    assert_eq!(s.server.post("CareTeam", &system, &team).status, 201);
    let appt = serde_json::json!({"resourceType": "Appointment", "status": "booked",
        "participant": [
            {"actor": {"reference": format!("Patient/{}", patient(2))}, "status": "accepted"},
            {"actor": {"reference": format!("Practitioner/{pr}")}, "status": "accepted"}]});
    assert_eq!(s.server.post("Appointment", &system, &appt).status, 201);
    treated.extend([1, 2]);

    let secret = add_person(&s.server, "dr.adams", "clinician", &pr);
    let agent = browser(&s.server);
    let now = now();
    let code = sign_in_for(
        &s,
        &agent,
        "dr.adams",
        &phivault_auth::totp::code_at(&secret, now),
        &[(
            "scope",
            "user/Patient.rs user/Observation.cruds user/Encounter.cruds user/Practitioner.rs openid fhirUser",
        )],
    );
    let (status, t) = s.exchange(&agent, &code);
    assert_eq!(status, 200, "{t}");
    assert!(
        t.get("patient").is_none(),
        "no patient context for a clinician"
    );
    let access = t["access_token"].as_str().expect("access").to_owned();
    let get = |path: &str| s.server.get(path, &access);
    let sees = |which: &[usize]| {
        assert_eq!(
            ids_of(&get("Patient?_count=100").json()),
            loaded_ids(&loaded, which, "Patient"),
            "patients"
        );
        assert_eq!(
            ids_of(&get("Observation?_count=1000").json()),
            loaded_ids(&loaded, which, "Observation"),
            "observations"
        );
        for i in 0..loaded.len() {
            let status = if which.contains(&i) { 200 } else { 404 };
            assert_eq!(
                get(&format!("Patient/{}", patient(i))).status,
                status,
                "{i}"
            );
            let obs = &loaded_ids(&loaded, &[i], "Observation")[0];
            assert_eq!(get(&format!("Observation/{obs}")).status, status, "{i}");
            let compartment = get(&format!("Patient/{}/Observation", patient(i)));
            assert_eq!(compartment.status, if status == 200 { 200 } else { 403 });
        }
    };
    sees(&treated);
    // records outside any compartment are not patients' data
    assert_eq!(get(&format!("Practitioner/{pr}")).status, 200);
    // chains, includes, history and $everything stay within the reach
    let treated_obs = loaded_ids(&loaded, &treated, "Observation");
    let chain = "Observation?subject:Patient.gender=male,female,other,unknown&_count=1000";
    assert_eq!(ids_of(&get(chain).json()), treated_obs);
    let included = get("Observation?_include=Observation:subject&_count=1000").json();
    let mut inc_patients: Vec<String> = included["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Patient")
        .map(|e| e["resource"]["id"].as_str().expect("id").to_owned())
        .collect();
    inc_patients.sort();
    assert_eq!(inc_patients, loaded_ids(&loaded, &treated, "Patient"));
    assert_eq!(get(&format!("Patient/{}/_history", patient(0))).status, 200);
    assert_eq!(get(&format!("Patient/{}/_history", patient(3))).status, 404);
    assert_eq!(
        get(&format!("Patient/{}/$everything", patient(0))).status,
        200
    );
    assert_eq!(
        get(&format!("Patient/{}/$everything", patient(3))).status,
        403
    );
    // type history and scopes it does not have: refused
    for path in ["Observation/_history", "Condition"] {
        let r = get(path);
        assert!(r.status == 403 || r.status == 404, "{path}: {}", r.status);
    }
    // writes: within the reach only, never moving a record out of it, never creating by
    // update, no deletes, no relationship records (break-the-glass must not outlast its
    // window), no conditional creates (their search would reach further)
    let note = |i: usize, id: Option<&str>| {
        let mut o = serde_json::json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "blood pressure"},
            "subject": {"reference": format!("Patient/{}", patient(i))}});
        if let Some(id) = id {
            o["id"] = serde_json::json!(id);
        }
        o
    };
    let created = s.server.post("Observation", &access, &note(0, None));
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let new_id = created.json()["id"].as_str().expect("id").to_owned();
    let put = |path: &str, body: &Value| s.server.put(path, &access, body, &[]).status;
    assert_eq!(
        put(&format!("Observation/{new_id}"), &note(0, Some(&new_id))),
        200
    );
    assert_eq!(
        s.server.post("Observation", &access, &note(3, None)).status,
        403
    );
    assert_eq!(
        put(&format!("Observation/{new_id}"), &note(3, Some(&new_id))),
        403,
        "moved out"
    );
    let theirs = loaded_ids(&loaded, &[3], "Observation")[0].clone();
    assert_eq!(
        put(&format!("Observation/{theirs}"), &note(0, Some(&theirs))),
        403,
        "not theirs"
    );
    assert_eq!(
        put("Observation/no-such-obs", &note(0, Some("no-such-obs"))),
        403,
        "no create by update"
    );
    assert_eq!(
        s.server
            .delete(&format!("Observation/{new_id}"), &access)
            .status,
        403
    );
    let enc = serde_json::json!({"resourceType": "Encounter", "status": "finished",
        "class": {"code": "AMB"}, "subject": {"reference": format!("Patient/{}", patient(0))},
        "participant": [{"individual": {"reference": format!("Practitioner/{pr}")}}]});
    assert_eq!(s.server.post("Encounter", &access, &enc).status, 403);
    let cond = s.server.send(
        "POST",
        &format!("{}/Observation", s.server.base),
        Some(&access),
        Some((
            "application/fhir+json",
            serde_json::to_vec(&note(0, None)).expect("json"),
        )),
        &[("If-None-Exist", "code=x")],
    );
    assert_eq!(cond.status, 403);
    let system_view = s
        .server
        .get(&format!("Observation/{new_id}"), &system)
        .json();
    assert_eq!(system_view["meta"]["versionId"], "2");
    // (gone again, so that what the clinician sees stays what the bundles hold)
    assert_eq!(
        s.server
            .delete(&format!("Observation/{new_id}"), &system)
            .status,
        204
    );

    // break-the-glass for patient 3: a reason and a fresh second factor
    let btg = |form: &[(&str, &str)], token: &str| {
        post_form_with(
            &agent,
            &format!("{}/auth/break-glass", s.server.origin),
            &[("Authorization", &format!("Bearer {token}"))],
            form,
        )
    };
    let p3 = patient(3);
    let fresh = phivault_auth::totp::code_at(&secret, now + 30);
    let reason = "unconscious in the emergency department, chart needed";
    for (form, want) in [
        (
            vec![
                ("patient", p3.as_str()),
                ("reason", "because"),
                ("otp", &fresh),
            ],
            400,
        ),
        (
            vec![
                ("patient", p3.as_str()),
                ("reason", reason),
                ("otp", "000000"),
            ],
            403,
        ),
        (
            vec![
                ("patient", "no-such-patient"),
                ("reason", reason),
                ("otp", &fresh),
            ],
            404,
        ),
    ] {
        let r = btg(&form, &access);
        assert_eq!(r.status, want, "{}", r.body);
    }
    assert_eq!(
        btg(
            &[("patient", &p3), ("reason", reason), ("otp", &fresh)],
            "x"
        )
        .status,
        401
    );
    let patient_token = s.server.token("system/*.rs");
    assert_eq!(
        btg(
            &[("patient", &p3), ("reason", reason), ("otp", &fresh)],
            &patient_token
        )
        .status,
        403,
        "not for back-end clients"
    );
    sees(&treated);
    let r = btg(
        &[("patient", &p3), ("reason", reason), ("otp", &fresh)],
        &access,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let opened: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(opened["patient"], p3.as_str());
    let expires = opened["expires_at"].as_u64().expect("expiry");
    assert!(expires > now + 3500 && expires < now + 3700, "an hour");
    // the same code again is a replay
    assert_eq!(
        btg(
            &[("patient", &p3), ("reason", reason), ("otp", &fresh)],
            &access
        )
        .status,
        403
    );
    treated.push(3);
    sees(&treated);

    // an alert for review holds the reason; the audit event does not
    let data = s.server.data.to_str().expect("path");
    let o = cli(&["audit", "alerts", "--data-dir", data], "");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let alerts: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("alert json"))
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["rule"], "break-the-glass");
    assert_eq!(alerts[0]["patient"], p3.as_str());
    assert_eq!(alerts[0]["reason"], reason);
    assert_eq!(alerts[0]["username"], "dr.adams");
    assert_eq!(alerts[0]["status"], "open");
    assert_eq!(alerts[0]["id"], opened["alert"]);
    // an auditor reviews it, once
    let alert_id = alerts[0]["id"].as_str().expect("id").to_owned();
    let review = |status: &str| {
        cli(
            &[
                "audit",
                "review",
                "--data-dir",
                data,
                "--alert",
                &alert_id,
                "--status",
                status,
                "--reviewer",
                "K. Auditor",
                "--note",
                "admission confirmed by the ED record",
            ],
            "",
        )
    };
    assert!(!review("fine").status.success(), "justified or violation");
    let o = review("justified");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!review("violation").status.success(), "reviewed once");
    let listed = |status: &str| alerts_listed(data, status);
    assert!(listed("open").is_empty());
    let done = listed("justified");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["reviewer"], "K. Auditor");
    assert!(done[0]["reviewed_ms"].as_i64().is_some());
    // the snooping rules over the log: the clinician's whole-record pull is flagged (working
    // hours set to the whole week, so the wall clock cannot matter); a second scan finds
    // nothing new
    let scan = || scan_all_week(data);
    // patient 3's record becomes restricted, and the clinician opens it once more
    let mut p3_record = s.server.get(&format!("Patient/{p3}"), &system).json();
    p3_record["meta"] = serde_json::json!({"security": [{"code": "R",
        "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"}]});
    let put = s
        .server
        .put(&format!("Patient/{p3}"), &system, &p3_record, &[]);
    assert_eq!(put.status, 200, "{}", String::from_utf8_lossy(&put.body));
    assert_eq!(get(&format!("Patient/{p3}")).status, 200);
    // the family names the practitioner shares with patients they opened, from the bundles
    let family_of = |i: usize, rtype: &str| -> Vec<String> {
        loaded[i].0["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["resource"]["resourceType"] == rtype)
            .flat_map(|e| {
                e["resource"]["name"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|n| n["family"].as_str().map(str::to_lowercase))
            .collect()
    };
    let pr_families = family_of(0, "Practitioner");
    let kin = (0..4)
        .filter(|&i| {
            family_of(i, "Patient")
                .iter()
                .any(|f| pr_families.contains(f))
        })
        .count();
    let first = scan();
    assert_eq!(first["alerts"]["bulk-record"], 1, "{first}");
    assert_eq!(first["alerts"]["restricted-record"], 1, "{first}");
    assert_eq!(
        first["alerts"]
            .get("same-family-name")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        kin as u64,
        "{first}"
    );
    assert!(first["alerts"].get("after-hours").is_none(), "{first}");
    let open = listed("open");
    let bulk: Vec<&Value> = open.iter().filter(|a| a["rule"] == "bulk-record").collect();
    assert_eq!(bulk.len(), 1);
    assert_eq!(bulk[0]["username"], "dr.adams");
    assert_eq!(bulk[0]["patient"], patient(0).as_str());
    assert_eq!(bulk[0]["score"], 60);
    let restricted: Vec<&Value> = open
        .iter()
        .filter(|a| a["rule"] == "restricted-record")
        .collect();
    assert_eq!(restricted[0]["patient"], p3.as_str());
    assert!(
        restricted[0]["evidence"]
            .as_array()
            .expect("evidence")
            .len()
            >= 2
    );
    let again = scan();
    assert_eq!(again["events"], 0, "{again}");
    assert_eq!(again["alerts"], serde_json::json!({}));
    let events = audit_events(&s.server);
    let glass: Vec<_> = events
        .iter()
        .filter(|e| e.interaction == "break-the-glass")
        .collect();
    assert_eq!(glass.len(), 7, "every attempt is audited");
    let ok: Vec<_> = glass
        .iter()
        .filter(|e| e.outcome.http_status == 200)
        .collect();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].patient.as_deref(), Some(p3.as_str()));
    assert_eq!(
        ok[0].request_id,
        alerts[0]["request_id"].as_str().expect("rid")
    );
    assert!(ok[0].user.is_some());
    let raw = store_bytes(&s.server);
    assert!(
        !raw.windows(reason.len()).any(|w| w == reason.as_bytes()),
        "reason sealed"
    );
    s.server.stop();
}

#[test]
fn dpop_binds_an_apps_tokens_to_its_key() {
    use phivault_auth::dpop::ProofKey;
    let mut s = setup();
    let data = s.server.data.to_str().expect("path").to_owned();
    let o = cli(
        &[
            "app",
            "add",
            "--data-dir",
            &data,
            "--name",
            "Phone app",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            "patient/*.rs openid fhirUser launch/patient offline_access",
        ],
        "",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let app: Value = serde_json::from_slice(&o.stdout).expect("app json");
    assert_eq!(app["require_dpop"], true, "the default");
    let app_id = app["client_id"].as_str().expect("client_id").to_owned();
    let agent = browser(&s.server);
    let now = now();
    let key = ProofKey::generate().expect("key");
    let thief = ProofKey::generate().expect("key");
    let token_url = format!("{}/auth/token", s.server.origin);
    let code = sign_in_for(
        &s,
        &agent,
        "maria.p",
        &s.code(now),
        &[("client_id", &app_id)],
    );
    let exchange = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("client_id", app_id.as_str()),
        ("code_verifier", s.verifier.as_str()),
    ];
    let post = |headers: &[(&str, &str)], form: &[(&str, &str)]| {
        let p = post_form_with(&agent, &token_url, headers, form);
        (
            p.status,
            serde_json::from_str::<Value>(&p.body).unwrap_or(Value::Null),
        )
    };
    let proof = |k: &ProofKey, htm: &str, url: &str, tok: Option<&str>| {
        k.proof(htm, url, now, tok).expect("proof")
    };
    // this app gets no token without a proof, nor with a proof for another endpoint
    let (st, b) = post(&[], &exchange);
    assert_eq!((st, b["error"].as_str()), (400, Some("invalid_dpop_proof")));
    let wrong = proof(
        &key,
        "POST",
        &format!("{}/auth/revoke", s.server.origin),
        None,
    );
    let (st, b) = post(&[("DPoP", &wrong)], &exchange);
    assert_eq!((st, b["error"].as_str()), (400, Some("invalid_dpop_proof")));
    let (st, t) = post(
        &[("DPoP", &proof(&key, "POST", &token_url, None))],
        &exchange,
    );
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["token_type"], "DPoP");
    let access = t["access_token"].as_str().expect("access").to_owned();
    let refresh = t["refresh_token"].as_str().expect("refresh").to_owned();
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(access.split('.').nth(1).expect("payload"))
            .expect("b64"),
    )
    .expect("claims");
    assert_eq!(claims["cnf"]["jkt"], key.thumbprint());

    let url = format!("{}/Patient/{}", s.server.base, s.patient);
    let read = |scheme: &str, proof: Option<&str>| {
        let mut r = agent
            .get(&url)
            .header("Authorization", &format!("{scheme} {access}"));
        if let Some(p) = proof {
            r = r.header("DPoP", p);
        }
        page(r.call().expect("get")).status
    };
    let good = proof(&key, "GET", &url, Some(&access));
    let stolen_token_cases = [
        ("Bearer", None, "as a bearer token"),
        ("DPoP", None, "without a proof"),
        (
            "DPoP",
            Some(proof(&thief, "GET", &url, Some(&access))),
            "a proof by another key",
        ),
        (
            "DPoP",
            Some(proof(&key, "POST", &url, Some(&access))),
            "a proof for another method",
        ),
        (
            "DPoP",
            Some(proof(
                &key,
                "GET",
                &format!("{}/Patient", s.server.base),
                Some(&access),
            )),
            "a proof for another URI",
        ),
        (
            "DPoP",
            Some(proof(&key, "GET", &url, None)),
            "a proof without ath",
        ),
        (
            "DPoP",
            Some(proof(&key, "GET", &url, Some("another-token"))),
            "a proof for another token",
        ),
        (
            "DPoP",
            Some(
                key.proof("GET", &url, now - 600, Some(&access))
                    .expect("proof"),
            ),
            "an old proof",
        ),
    ];
    for (scheme, p, what) in &stolen_token_cases {
        assert_eq!(read(scheme, p.as_deref()), 401, "{what}");
    }
    assert_eq!(read("DPoP", Some(&good)), 200);
    assert_eq!(read("DPoP", Some(&good)), 401, "a replayed proof");
    assert_eq!(
        read("DPoP", Some(&proof(&key, "GET", &url, Some(&access)))),
        200
    );
    // an unbound token under the DPoP scheme is refused too
    let bearer = s.server.token("system/*.rs");
    let r = agent
        .get(&url)
        .header("Authorization", &format!("DPoP {bearer}"))
        .header("DPoP", &proof(&key, "GET", &url, Some(&bearer)));
    assert_eq!(page(r.call().expect("get")).status, 401);

    // the session is bound to the key as well
    let refresh_form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("client_id", app_id.as_str()),
    ];
    let (st, b) = post(&[], &refresh_form);
    assert_eq!((st, b["error"].as_str()), (400, Some("invalid_dpop_proof")));
    let (st, b) = post(
        &[("DPoP", &proof(&thief, "POST", &token_url, None))],
        &refresh_form,
    );
    assert_eq!((st, b["error"].as_str()), (400, Some("invalid_dpop_proof")));
    let same = proof(&key, "POST", &token_url, None);
    let (st, t) = post(&[("DPoP", &same)], &refresh_form);
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["token_type"], "DPoP");
    let next = t["refresh_token"].as_str().expect("refresh").to_owned();
    let (st, b) = post(
        &[("DPoP", &same)],
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &next),
            ("client_id", &app_id),
        ],
    );
    assert_eq!(
        (st, b["error"].as_str()),
        (400, Some("invalid_dpop_proof")),
        "replayed proof"
    );

    // each refusal is in the audit log
    let events = audit_events(&s.server);
    let refused_reads = events
        .iter()
        .filter(|e| {
            e.interaction == "read"
                && e.outcome.http_status == 401
                && e.client_id.as_deref() == Some(app_id.as_str())
        })
        .count();
    assert_eq!(refused_reads, stolen_token_cases.len() + 1);
    let refused_tokens = events
        .iter()
        .filter(|e| e.interaction == "token" && e.outcome.http_status == 400)
        .count();
    assert!(refused_tokens >= 5, "{refused_tokens}");
    s.server.stop();
}

#[test]
fn an_auditor_reads_the_audit_log_and_no_clinical_data() {
    let (mut s, loaded) = setup_with(2);
    let system = s.server.token("system/*.rs");
    let p0 = loaded_ids(&loaded, &[0], "Patient")[0].clone();
    // some access to patient 0's records, and to patient 1's
    for path in [
        format!("Patient/{p0}"),
        format!("Patient/{p0}/Observation"),
        format!("Patient/{}", s.other.0),
    ] {
        assert_eq!(s.server.get(&path, &system).status, 200);
    }
    let secret = add_person(&s.server, "audit.kim", "auditor", "");
    let agent = browser(&s.server);
    let code = sign_in_for(
        &s,
        &agent,
        "audit.kim",
        &phivault_auth::totp::code_at(&secret, now()),
        &[(
            "scope",
            "user/AuditEvent.rs user/Patient.rs openid fhirUser",
        )],
    );
    let (status, t) = s.exchange(&agent, &code);
    assert_eq!(status, 200, "{t}");
    let auditor = t["access_token"].as_str().expect("access").to_owned();
    // every event about patient 0, page by page
    let mut shown: Vec<String> = Vec::new();
    let mut next = Some(format!("AuditEvent?patient={p0}&_count=3"));
    let mut pages = 0;
    while let Some(path) = next.take() {
        let r = s.server.get(&path, &auditor);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let b = r.json();
        for e in b["entry"].as_array().expect("entries") {
            let ev = &e["resource"];
            assert_eq!(ev["resourceType"], "AuditEvent");
            let rid = ev["entity"][0]["what"]["identifier"]["value"]
                .as_str()
                .expect("rid");
            shown.push(rid.to_owned());
        }
        next = b["link"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["relation"] == "next"))
            .and_then(|x| x["url"].as_str())
            .map(|u| {
                u.strip_prefix(&format!("{}/", s.server.base))
                    .expect("base")
                    .to_owned()
            });
        pages += 1;
    }
    assert!(pages > 1, "paged");
    // expected: read independently from the database
    let expected: Vec<String> = audit_events(&s.server)
        .into_iter()
        .filter(|e| {
            e.patient.as_deref() == Some(p0.as_str())
                || e.entities
                    .iter()
                    .any(|x| x.patient.as_deref() == Some(p0.as_str()))
        })
        .map(|e| e.request_id)
        .collect();
    assert!(expected.len() >= 3);
    assert_eq!(shown, expected);
    // one event by its id
    let first = s
        .server
        .get(&format!("AuditEvent?patient={p0}&_count=1"), &auditor)
        .json();
    let id = first["entry"][0]["resource"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let one = s.server.get(&format!("AuditEvent/{id}"), &auditor);
    assert_eq!(one.status, 200);
    assert_eq!(one.json(), first["entry"][0]["resource"]);
    // proofs over the Merkle tree of the log, checked against the database independently
    let all = s.server.get("AuditEvent?_count=200", &auditor).json();
    let size: u64 = all["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            e["resource"]["id"]
                .as_str()
                .expect("id")
                .parse::<u64>()
                .expect("seq")
        })
        .max()
        .expect("events");
    let seq: u64 = id.parse().expect("seq");
    let param = |p: &Value, name: &str| -> Vec<[u8; 32]> {
        p["parameter"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter(|x| x["name"] == name)
            .map(|x| {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(x["valueBase64Binary"].as_str().expect("b64"))
                    .expect("base64");
                b.try_into().expect("32 bytes")
            })
            .collect()
    };
    let db_leaves: Vec<[u8; 32]> = {
        let mut leaves = Vec::new();
        read_only_store(&s.server.data)
            .scan_audit(&mut |e| {
                leaves.push(phivault_audit::merkle::leaf_hash(&e.event));
                e.seq < size
            })
            .expect("scan");
        leaves
    };
    let db_root = phivault_audit::merkle::root(&db_leaves);
    let p = s
        .server
        .get(&format!("AuditEvent/{seq}/$proof?size={size}"), &auditor);
    assert_eq!(p.status, 200, "{}", String::from_utf8_lossy(&p.body));
    let p = p.json();
    assert_eq!(param(&p, "leafHash"), [db_leaves[seq as usize - 1]]);
    assert_eq!(param(&p, "rootHash"), [db_root]);
    assert!(phivault_audit::merkle::verify_inclusion(
        seq - 1,
        size,
        &db_leaves[seq as usize - 1],
        &param(&p, "path"),
        &db_root
    ));
    let c = s.server.get(
        &format!("AuditEvent/$consistency?first={seq}&second={size}"),
        &auditor,
    );
    assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
    let c = c.json();
    let old_root = phivault_audit::merkle::root(&db_leaves[..seq as usize]);
    assert_eq!(param(&c, "firstRootHash"), [old_root]);
    assert!(phivault_audit::merkle::verify_consistency(
        seq,
        size,
        &old_root,
        &db_root,
        &param(&c, "path")
    ));
    for bad in [
        format!("AuditEvent/{seq}/$proof?size=0"),
        format!("AuditEvent/{seq}/$proof?size=999999999"),
        format!("AuditEvent/{seq}/$proof?bogus=1"),
        "AuditEvent/$consistency?first=5".to_owned(),
        "AuditEvent/$consistency?first=9&second=3".to_owned(),
    ] {
        assert_eq!(s.server.get(&bad, &auditor).status, 400, "{bad}");
    }
    assert_eq!(
        s.server
            .get(&format!("AuditEvent/{seq}/$proof?size={size}"), &system)
            .status,
        403
    );
    // no clinical data for the auditor, and nobody writes the log
    assert_eq!(s.server.get(&format!("Patient/{p0}"), &auditor).status, 403);
    assert_eq!(s.server.get("Observation", &auditor).status, 403);
    let ev = first["entry"][0]["resource"].clone();
    assert_eq!(s.server.post("AuditEvent", &auditor, &ev).status, 405);
    assert_eq!(
        s.server
            .put(&format!("AuditEvent/{id}"), &auditor, &ev, &[])
            .status,
        405
    );
    // and nobody else reads it
    let admin = s.server.token("system/*.cruds");
    assert_eq!(s.server.get("AuditEvent", &admin).status, 403);
    let clinician_or_patient = {
        let code = sign_in(&s, &agent, "maria.p", &s.code(now()));
        let (_, t) = s.exchange(&agent, &code);
        t["access_token"].as_str().expect("access").to_owned()
    };
    assert_eq!(
        s.server.get("AuditEvent", &clinician_or_patient).status,
        403
    );
    // with patient/AuditEvent, the patient reads who accessed their record, and only that
    let code = sign_in_for(
        &s,
        &agent,
        "maria.p",
        &s.code(now() + 30),
        &[(
            "scope",
            "patient/AuditEvent.rs patient/Patient.rs launch/patient",
        )],
    );
    let (_, t) = s.exchange(&agent, &code);
    let mine = t["access_token"].as_str().expect("access").to_owned();
    let r = s.server.get("AuditEvent?_count=200", &mine);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let own_rid = r.header("x-request-id").expect("rid").to_owned();
    let b = r.json();
    let mut seen: Vec<String> = Vec::new();
    for e in b["entry"].as_array().expect("entries") {
        let ev = &e["resource"];
        assert!(
            ev["agent"]
                .as_array()
                .expect("agents")
                .iter()
                .all(|a| a.get("network").is_none()),
            "no staff addresses"
        );
        seen.push(
            ev["entity"][0]["what"]["identifier"]["value"]
                .as_str()
                .expect("rid")
                .to_owned(),
        );
    }
    let about_p0: Vec<String> = audit_events(&s.server)
        .into_iter()
        .filter(|e| {
            e.patient.as_deref() == Some(p0.as_str())
                || e.entities
                    .iter()
                    .any(|x| x.patient.as_deref() == Some(p0.as_str()))
        })
        .map(|e| e.request_id)
        .filter(|rid| *rid != own_rid)
        .collect();
    assert_eq!(seen, about_p0, "exactly the accesses to their record");
    assert!(seen.len() >= 3);
    let other = &s.other.0;
    assert_eq!(
        s.server
            .get(&format!("AuditEvent?patient={other}"), &mine)
            .status,
        403
    );
    assert_eq!(
        s.server
            .get(&format!("AuditEvent/{seq}/$proof?size={size}"), &mine)
            .status,
        403
    );
    assert_eq!(s.server.get("AuditEvent?bogus=1", &auditor).status, 400);
    // the same accounting from the command line, as CSV and as JSON (AU4 reports)
    let data = s.server.data.to_str().expect("path").to_owned();
    let report = |extra: &[&str]| {
        let mut args = vec!["audit", "report", "--data-dir", data.as_str()];
        args.extend_from_slice(extra);
        let o = cli(&args, "");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).expect("utf8")
    };
    let csv = report(&["--patient", &p0]);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "seq,recorded,action,interaction,resource,patient,client,user,http_status,source,request_id,purpose_of_use,user_agent,search_parameters"
        )
    );
    let from_csv: Vec<String> = lines
        .map(|l| l.split(',').nth(10).expect("rid").to_owned())
        .collect();
    let expected: Vec<String> = audit_events(&s.server)
        .into_iter()
        .filter(|e| {
            e.patient.as_deref() == Some(p0.as_str())
                || e.entities
                    .iter()
                    .any(|x| x.patient.as_deref() == Some(p0.as_str()))
        })
        .map(|e| e.request_id)
        .collect();
    assert_eq!(from_csv, expected);
    let json = report(&["--patient", &p0, "--format", "json"]);
    assert_eq!(json.lines().count(), expected.len());
    for l in json.lines() {
        let v: Value = serde_json::from_str(l).expect("json");
        assert_eq!(v["resourceType"], "AuditEvent");
    }
    let tomorrow = report(&["--from", "2999-01-01"]);
    assert_eq!(tomorrow.lines().count(), 1, "the header only");
    let o = cli(
        &["audit", "report", "--data-dir", &data, "--from", "soon"],
        "",
    );
    assert!(!o.status.success());
    s.server.stop();
}

/// One attack of the suite: what was tried and what came back.
struct Attempt {
    what: String,
    page: Page,
}

/// Whether an attempt was denied: an error status, a redirect back to the app with an
/// error, or a 200 that discloses none of `secrets` (a search confined to what it may see).
fn denied(a: &Attempt, secrets: &[&str]) -> bool {
    match a.page.status {
        400..=499 => true,
        300..=399 => a
            .page
            .location
            .as_deref()
            .is_some_and(|l| l.contains("error=")),
        200 => {
            // a searchset's `self` link restates the caller's own query (which may name
            // the other patient's id they tried); everything else must hold no secret
            let body = match serde_json::from_str::<serde_json::Value>(&a.page.body) {
                Ok(mut v) => {
                    if let Some(links) = v["link"].as_array_mut() {
                        links.retain(|l| l["relation"] != "self");
                    }
                    v.to_string()
                }
                Err(_) => a.page.body.clone(),
            };
            !secrets.iter().any(|x| body.contains(x))
        }
        _ => false,
    }
}

#[test]
fn the_attack_suite_every_case_is_denied_and_audited() {
    use phivault_auth::dpop::ProofKey;
    let (mut s, loaded) = setup_with(3);
    let agent = browser(&s.server);
    let t0 = now();
    let base = s.server.base.clone();
    let origin = s.server.origin.clone();
    let own = s.patient.clone();
    let (other, other_obs) = s.other.clone();
    let other_obs_all = loaded_ids(&loaded, &[1], "Observation");
    let mut secrets: Vec<String> = vec![other.clone()];
    secrets.extend(other_obs_all.iter().cloned());
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let attempts: std::cell::RefCell<Vec<Attempt>> = Default::default();
    let call = |method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>| -> Page {
        let mut r = ureq::http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = match body {
            Some(b) => agent.run(r.body(b.to_owned()).expect("request")),
            None => agent.run(r.body(()).expect("request")),
        };
        page(resp.expect("response"))
    };
    let bearer = |t: &str| format!("Bearer {t}");
    let json_ct = ("Content-Type", "application/fhir+json");

    // a patient's app, signed in properly
    let code = sign_in(&s, &agent, "maria.p", &s.code(t0));
    let exchange = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("client_id", s.client_id.as_str()),
        ("code_verifier", s.verifier.as_str()),
    ];
    let (st, t) = s.token(&agent, &exchange);
    assert_eq!(st, 200, "{t}");
    let access = t["access_token"].as_str().expect("access").to_owned();
    let refresh = t["refresh_token"].as_str().expect("refresh").to_owned();
    let auth = bearer(&access);
    let fhir = |what: &str, method: &str, path: &str, body: Option<String>| {
        let url = format!("{base}/{path}");
        let mut h = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            h.push(json_ct);
        }
        let page = call(method, &url, &h, body.as_deref());
        attempts.borrow_mut().push(Attempt {
            what: what.to_owned(),
            page,
        });
    };
    // 1. another patient's records, every way in
    fhir(
        "their Patient by id",
        "GET",
        &format!("Patient/{other}"),
        None,
    );
    fhir(
        "their Observation by id",
        "GET",
        &format!("Observation/{other_obs}"),
        None,
    );
    fhir(
        "their Observation by version",
        "GET",
        &format!("Observation/{other_obs}/_history/1"),
        None,
    );
    fhir(
        "their Observation's history",
        "GET",
        &format!("Observation/{other_obs}/_history"),
        None,
    );
    fhir(
        "the history of a whole type",
        "GET",
        "Observation/_history",
        None,
    );
    fhir(
        "search by their id",
        "GET",
        &format!("Patient?_id={other}"),
        None,
    );
    fhir(
        "search by their reference",
        "GET",
        &format!("Observation?subject=Patient/{other}&_count=1000"),
        None,
    );
    fhir(
        "their compartment",
        "GET",
        &format!("Patient/{other}/Observation"),
        None,
    );
    fhir(
        "their $everything",
        "GET",
        &format!("Patient/{other}/$everything"),
        None,
    );
    fhir(
        "_include of subjects",
        "GET",
        "Observation?_include=Observation:subject&_count=1000",
        None,
    );
    fhir(
        "_revinclude from their records",
        "GET",
        &format!("Patient?_id={other}&_revinclude=Observation:subject"),
        None,
    );
    fhir(
        "a chain over every patient",
        "GET",
        "Observation?subject:Patient.gender=male,female,other,unknown&_count=1000",
        None,
    );
    fhir(
        "_has naming their record",
        "GET",
        &format!("Patient?_has:Observation:patient:_id={other_obs}"),
        None,
    );
    let form = format!("subject=Patient/{other}&_count=1000");
    let page = call(
        "POST",
        &format!("{base}/Observation/_search"),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        Some(&form),
    );
    attempts.borrow_mut().push(Attempt {
        what: "POST _search for their records".into(),
        page,
    });
    let batch = |kind: &str| {
        serde_json::json!({"resourceType": "Bundle", "type": kind, "entry": [
            {"request": {"method": "GET", "url": format!("Patient/{other}")}}]})
        .to_string()
    };
    fhir("a batch read of theirs", "POST", "", Some(batch("batch")));
    fhir(
        "a transaction read of theirs",
        "POST",
        "",
        Some(batch("transaction")),
    );
    let obs = serde_json::json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": format!("Patient/{own}")}});
    fhir(
        "a write to their own record",
        "POST",
        "Observation",
        Some(obs.to_string()),
    );
    let mut theirs = obs.clone();
    theirs["id"] = serde_json::json!(other_obs);
    fhir(
        "an overwrite of theirs",
        "PUT",
        &format!("Observation/{other_obs}"),
        Some(theirs.to_string()),
    );
    fhir(
        "a delete of their own",
        "DELETE",
        &format!("Observation/{}", s.own_obs[0]),
        None,
    );
    fhir("a type outside the scopes", "GET", "Condition", None);
    fhir(
        "a read outside the scopes",
        "GET",
        &format!("Condition/{other}"),
        None,
    );
    // a paging cursor made for another client
    let system = s.server.token("system/*.rs");
    let first = s.server.get("Observation?_count=1", &system).json();
    let next = first["link"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["relation"] == "next"))
        .and_then(|x| x["url"].as_str())
        .expect("next link")
        .to_owned();
    let cursor = next.split_once('?').expect("query").1.to_owned();
    fhir(
        "another client's paging cursor",
        "GET",
        &format!("Observation?{cursor}"),
        None,
    );

    // 2. broken, forged and stolen tokens
    let pkcs8 = signing_pkcs8(&s.server);
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(access.split('.').nth(1).expect("payload"))
            .expect("b64"),
    )
    .expect("claims");
    let header = serde_json::json!({"alg": "EdDSA", "kid": "phivault-token-1", "typ": "at+jwt"});
    let forge = |f: &dyn Fn(&mut Value)| {
        let mut c = claims.clone();
        f(&mut c);
        sign_ed25519(&pkcs8, &header, &c)
    };
    let mut sig_flipped = access.clone().into_bytes();
    let last = sig_flipped.len() - 3;
    sig_flipped[last] = if sig_flipped[last] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let (h, rest) = access.split_once('.').expect("jws");
    let (_, sig) = rest.rsplit_once('.').expect("jws");
    let mut other_patient = claims.clone();
    other_patient["phivault_person"]["patient"] = serde_json::json!(other);
    let patched = format!(
        "{h}.{}.{sig}",
        URL_SAFE_NO_PAD.encode(other_patient.to_string().as_bytes())
    );
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"at+jwt"}"#),
        access.split('.').nth(1).expect("payload")
    );
    let tokens: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("a malformed token", Some("Bearer not-a-token".into())),
        (
            "a flipped signature",
            Some(bearer(&String::from_utf8(sig_flipped).expect("utf8"))),
        ),
        ("another patient patched in", Some(bearer(&patched))),
        ("alg none", Some(bearer(&none))),
        (
            "a wrong audience",
            Some(bearer(&forge(&|c| {
                c["aud"] = serde_json::json!("https://other.example/fhir")
            }))),
        ),
        (
            "a wrong issuer",
            Some(bearer(&forge(&|c| {
                c["iss"] = serde_json::json!("https://evil.example")
            }))),
        ),
        (
            "an expired token",
            Some(bearer(&forge(&|c| c["exp"] = serde_json::json!(t0 - 120)))),
        ),
        (
            "an older account generation",
            Some(bearer(&forge(&|c| {
                c["phivault_person"]["gen"] = serde_json::json!(0)
            }))),
        ),
        (
            "a clinician role patched in",
            Some(bearer(&forge(&|c| {
                c["phivault_person"]["role"] = serde_json::json!("admin")
            }))),
        ),
    ];
    for (what, a) in &tokens {
        let h: Vec<(&str, &str)> = a.iter().map(|v| ("Authorization", v.as_str())).collect();
        let page = call("GET", &format!("{base}/Patient/{own}"), &h, None);
        attempts.borrow_mut().push(Attempt {
            what: (*what).to_owned(),
            page,
        });
    }

    // 3. the flow: PKCE, codes, refresh tokens, redirect URIs, scopes, brute force
    let token_url = format!("{origin}/auth/token");
    let post = |what: &str, url: &str, headers: &[(&str, &str)], form: &[(&str, &str)]| {
        let page = post_form_with(&agent, url, headers, form);
        attempts.borrow_mut().push(Attempt {
            what: what.to_owned(),
            page,
        });
    };
    let code2 = sign_in(&s, &agent, "maria.p", &s.code(t0 + 30));
    let mut wrong_verifier = exchange;
    wrong_verifier[1] = ("code", code2.as_str());
    let bad = URL_SAFE_NO_PAD.encode([9u8; 48]);
    wrong_verifier[4] = ("code_verifier", bad.as_str());
    post("a wrong PKCE verifier", &token_url, &[], &wrong_verifier);
    let refresh_form = |tok: &str, scope: Option<&str>| {
        let mut f = vec![
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", tok.to_owned()),
            ("client_id", s.client_id.clone()),
        ];
        if let Some(sc) = scope {
            f.push(("scope", sc.to_owned()));
        }
        f
    };
    let as_refs = |f: &[(&'static str, String)]| -> Vec<(&'static str, String)> { f.to_vec() };
    let wider = as_refs(&refresh_form(&refresh, Some("patient/*.rs")));
    let wider: Vec<(&str, &str)> = wider.iter().map(|(k, v)| (*k, v.as_str())).collect();
    post("scope escalation at refresh", &token_url, &[], &wider);
    let (st, t) = s.token(
        &agent,
        &refresh_form(&refresh, None)
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    assert_eq!(st, 200, "{t}");
    let rotated = t["refresh_token"].as_str().expect("refresh").to_owned();
    let reuse = refresh_form(&refresh, None);
    let reuse: Vec<(&str, &str)> = reuse.iter().map(|(k, v)| (*k, v.as_str())).collect();
    post(
        "a reused (rotated-out) refresh token",
        &token_url,
        &[],
        &reuse,
    );
    let after = refresh_form(&rotated, None);
    let after: Vec<(&str, &str)> = after.iter().map(|(k, v)| (*k, v.as_str())).collect();
    post("the family revoked by that reuse", &token_url, &[], &after);
    // replaying the first code: refused, and it ends the session it started
    post("a replayed code", &token_url, &[], &exchange);
    // a session revoked by its app (RFC 7009), and an account disabled: their tokens die
    let ann = add_user(&s.server, "ann.p", &own);
    let code_ann = sign_in(&s, &agent, "ann.p", &phivault_auth::totp::code_at(&ann, t0));
    let mut ex_ann = exchange;
    ex_ann[1] = ("code", code_ann.as_str());
    let (st, t) = s.token(&agent, &ex_ann);
    assert_eq!(st, 200, "{t}");
    let ann_access = t["access_token"].as_str().expect("access").to_owned();
    let ann_refresh = t["refresh_token"].as_str().expect("refresh").to_owned();
    let revoked = post_form_with(
        &agent,
        &format!("{origin}/auth/revoke"),
        &[],
        &[("token", &ann_refresh), ("client_id", &s.client_id)],
    );
    assert_eq!(revoked.status, 200);
    let again = refresh_form(&ann_refresh, None);
    let again: Vec<(&str, &str)> = again.iter().map(|(k, v)| (*k, v.as_str())).collect();
    post("a revoked refresh token", &token_url, &[], &again);
    let data = s.server.data.to_str().expect("path").to_owned();
    let o = cli(
        &[
            "user",
            "disable",
            "--data-dir",
            &data,
            "--username",
            "ann.p",
        ],
        "",
    );
    assert!(o.status.success());
    // the server re-reads an account at most every ACCOUNT_RECHECK_MS
    std::thread::sleep(Duration::from_millis(3 * ACCOUNT_RECHECK_MS));
    let page = call(
        "GET",
        &format!("{base}/Patient/{own}"),
        &[("Authorization", &bearer(&ann_access))],
        None,
    );
    attempts.borrow_mut().push(Attempt {
        what: "the access token of a disabled account".into(),
        page,
    });
    let get_page = |what: &str, url: String| {
        let page = get(&agent, &url);
        attempts.borrow_mut().push(Attempt {
            what: what.to_owned(),
            page,
        });
    };
    get_page(
        "PKCE plain",
        s.authorize_url(&[("code_challenge_method", "plain")]),
    );
    get_page(
        "no PKCE",
        s.authorize_url(&[("code_challenge_method", ""), ("code_challenge", "")]),
    );
    get_page(
        "an unregistered redirect URI",
        s.authorize_url(&[("redirect_uri", "https://evil.example/cb")]),
    );
    get_page(
        "system scopes for a person's app",
        s.authorize_url(&[("scope", "system/*.cruds")]),
    );
    get_page(
        "another audience",
        s.authorize_url(&[("aud", "https://evil.example/fhir")]),
    );
    // brute force: five wrong passwords lock the account, then the right ones fail too
    let start = get(&agent, &s.authorize_url(&[]));
    let cookie = start.cookie.clone().expect("cookie");
    let (flow, csrf) = (hidden(&start.body, "flow"), hidden(&start.body, "csrf"));
    let login = format!("{origin}/auth/login");
    for i in 0..4 {
        let wrong = format!("wrong-password-{i}-xyz");
        let f = [
            ("flow", flow.as_str()),
            ("csrf", csrf.as_str()),
            ("username", "maria.p"),
            ("password", wrong.as_str()),
            ("otp", "000000"),
        ];
        post(
            &format!("brute force {i}"),
            &login,
            &[("Cookie", &cookie)],
            &f,
        );
    }
    let start = get(&agent, &s.authorize_url(&[]));
    let cookie = start.cookie.clone().expect("cookie");
    let (flow, csrf) = (hidden(&start.body, "flow"), hidden(&start.body, "csrf"));
    let f = [
        ("flow", flow.as_str()),
        ("csrf", csrf.as_str()),
        ("username", "maria.p"),
        ("password", "wrong-password-last"),
        ("otp", "000000"),
    ];
    post(
        "brute force: the locking attempt",
        &login,
        &[("Cookie", &cookie)],
        &f,
    );
    let right = s.code(t0 + 60);
    let f = [
        ("flow", flow.as_str()),
        ("csrf", csrf.as_str()),
        ("username", "maria.p"),
        ("password", PASSWORD),
        ("otp", right.as_str()),
    ];
    post(
        "the right credentials while locked",
        &login,
        &[("Cookie", &cookie)],
        &f,
    );
    let f = [
        ("flow", flow.as_str()),
        ("csrf", "forged"),
        ("username", "maria.p"),
        ("password", PASSWORD),
        ("otp", right.as_str()),
    ];
    post("a forged CSRF token", &login, &[("Cookie", &cookie)], &f);

    // 4. DPoP: a bound token without its proof, with a replayed proof, another key's
    let o = cli(
        &[
            "app",
            "add",
            "--data-dir",
            &data,
            "--name",
            "Bound",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            "patient/*.rs launch/patient",
        ],
        "",
    );
    assert!(o.status.success());
    let bound_app: Value = serde_json::from_slice(&o.stdout).expect("json");
    let bound_app = bound_app["client_id"].as_str().expect("id").to_owned();
    let jon = add_user(&s.server, "jon.p", &own);
    let code3 = sign_in_for(
        &s,
        &agent,
        "jon.p",
        &phivault_auth::totp::code_at(&jon, t0),
        &[("client_id", &bound_app)],
    );
    let key = ProofKey::generate().expect("key");
    let thief = ProofKey::generate().expect("key");
    let ex = [
        ("grant_type", "authorization_code"),
        ("code", code3.as_str()),
        ("redirect_uri", REDIRECT),
        ("client_id", bound_app.as_str()),
        ("code_verifier", s.verifier.as_str()),
    ];
    post("a DPoP app's code without a proof", &token_url, &[], &ex);
    let p = key.proof("POST", &token_url, t0, None).expect("proof");
    let got = post_form_with(&agent, &token_url, &[("DPoP", &p)], &ex);
    assert_eq!(got.status, 200, "{}", got.body);
    let dpop_token = serde_json::from_str::<Value>(&got.body).expect("json")["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let url = format!("{base}/Patient/{own}");
    let dpop_auth = format!("DPoP {dpop_token}");
    let good = key
        .proof("GET", &url, t0, Some(&dpop_token))
        .expect("proof");
    assert_eq!(
        call(
            "GET",
            &url,
            &[("Authorization", &dpop_auth), ("DPoP", &good)],
            None
        )
        .status,
        200
    );
    let stolen = thief
        .proof("GET", &url, t0, Some(&dpop_token))
        .expect("proof");
    for (what, h) in [
        (
            "a DPoP-bound token as a bearer token",
            vec![("Authorization", bearer(&dpop_token))],
        ),
        (
            "a DPoP-bound token without its proof",
            vec![("Authorization", dpop_auth.clone())],
        ),
        (
            "a replayed DPoP proof",
            vec![("Authorization", dpop_auth.clone()), ("DPoP", good.clone())],
        ),
        (
            "a DPoP proof by another key",
            vec![("Authorization", dpop_auth.clone()), ("DPoP", stolen)],
        ),
    ] {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = call("GET", &url, &h, None);
        attempts.borrow_mut().push(Attempt {
            what: what.to_owned(),
            page,
        });
    }

    // 5. break-the-glass is not for patients' apps
    let page = post_form_with(
        &agent,
        &format!("{origin}/auth/break-glass"),
        &[("Authorization", &auth)],
        &[
            ("patient", &other),
            ("reason", "I would like to see it please"),
            ("otp", "123456"),
        ],
    );
    attempts.borrow_mut().push(Attempt {
        what: "break-the-glass by a patient".into(),
        page,
    });

    // every case denied, and its own request in the audit log with the status it got
    let attempts = attempts.into_inner();
    assert!(attempts.len() >= 40, "{} cases", attempts.len());
    let events = audit_events(&s.server);
    for a in &attempts {
        assert!(
            denied(a, &secrets),
            "{}: {} {:?} {}",
            a.what,
            a.page.status,
            a.page.location,
            a.page.body.chars().take(300).collect::<String>()
        );
        let rid = a
            .page
            .request_id
            .as_deref()
            .unwrap_or_else(|| panic!("{}: no request id", a.what));
        // (a batch's entries share its request id: one of the events is the request's)
        let mine: Vec<u16> = events
            .iter()
            .filter(|e| e.request_id == rid)
            .map(|e| e.outcome.http_status)
            .collect();
        assert!(
            mine.contains(&a.page.status),
            "{}: audited as {mine:?}",
            a.what
        );
    }
    let statuses: std::collections::BTreeMap<u16, usize> =
        attempts.iter().fold(Default::default(), |mut m, a| {
            *m.entry(a.page.status).or_default() += 1;
            m
        });
    eprintln!(
        "{} attack cases, each denied and audited: {statuses:?}",
        attempts.len()
    );
    s.server.stop();
}

/// An OpenID Connect provider (the `oidc-provider` npm package, `tests/oidc/provider.mjs`)
/// on 127.0.0.1, issuing RFC 9068 access tokens for `audience`, signed with the keys named
/// in `keys` (kept in `keys_dir`, so a restart on the same port keeps or rotates them).
struct Provider {
    child: std::process::Child,
    issuer: String,
}

impl Provider {
    fn start(port: u16, audience: &str, keys_dir: &std::path::Path, keys: &str) -> Provider {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/oidc");
        let mut child = Command::new("node")
            .arg("provider.mjs")
            .arg("serve")
            .current_dir(dir)
            .env("PORT", port.to_string())
            .env("AUDIENCE", audience)
            .env("KEYS_DIR", keys_dir)
            .env("KEYS", keys)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (run npm ci in tests/oidc first; scripts/test.sh does)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("provider output");
        let issuer = line
            .trim()
            .strip_prefix("issuer ")
            .unwrap_or_else(|| panic!("provider did not start: {line:?}"))
            .to_owned();
        Provider { child, issuer }
    }

    fn port(&self) -> u16 {
        self.issuer
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    /// An access token for `user`, through the provider's own sign-in pages.
    fn token(&self, user: &str, scope: &str, resource: &str) -> String {
        let o = Command::new("node")
            .args(["login.mjs", &self.issuer, user, scope, resource])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/oidc"))
            .output()
            .expect("node");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).expect("utf8").trim().to_owned()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_external_oidc_providers_tokens_grant_exactly_the_mapped_accounts_access() {
    let (mut s, loaded) = setup_with(3);
    let keys = tempfile::tempdir().expect("tmp");
    let idp = Provider::start(0, &s.server.base, keys.path(), "a");
    let data = s.server.data.to_str().expect("path").to_owned();
    let o = cli(
        &[
            "idp",
            "add",
            "--data-dir",
            &data,
            "--issuer",
            &idp.issuer,
            "--audience",
            &s.server.base,
        ],
        "",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // local accounts the provider's people map to: a clinician of patient 0, patient 1
    let pr = loaded_ids(&loaded, &[0], "Practitioner")[0].clone();
    add_person(&s.server, "dr.adams", "clinician", &pr);
    let p1 = loaded_ids(&loaded, &[1], "Patient")[0].clone();
    add_person(&s.server, "pat.jones", "patient", &p1);
    let ids = |token: &str, path: &str| {
        let r = s.server.get(path, token);
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        ids_of(&r.json())
    };
    let clinician = idp.token(
        "dr.adams",
        "openid user/Patient.rs user/Observation.rs",
        &s.server.base,
    );
    assert_eq!(
        ids(&clinician, "Patient?_count=100"),
        loaded_ids(&loaded, &[0], "Patient")
    );
    assert_eq!(
        ids(&clinician, "Observation?_count=1000"),
        loaded_ids(&loaded, &[0], "Observation")
    );
    assert_eq!(
        s.server.get(&format!("Patient/{p1}"), &clinician).status,
        404
    );
    assert_eq!(
        s.server.get("Condition", &clinician).status,
        403,
        "not in its scopes"
    );
    let obs = serde_json::json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p1}")}});
    assert_eq!(s.server.post("Observation", &clinician, &obs).status, 403);
    let patient = idp.token(
        "pat.jones",
        "openid patient/Patient.rs patient/Observation.rs",
        &s.server.base,
    );
    assert_eq!(ids(&patient, "Patient"), vec![p1.clone()]);
    assert_eq!(
        ids(&patient, "Observation?_count=1000"),
        loaded_ids(&loaded, &[1], "Observation")
    );

    // refused: a person without a local account, another audience, an unconfigured
    // issuer, a tampered token, a disabled account
    let nobody = idp.token("nobody", "openid user/Patient.rs", &s.server.base);
    let other_aud = Provider::start(0, "https://elsewhere.example/fhir", keys.path(), "a");
    let o = cli(
        &[
            "idp",
            "add",
            "--data-dir",
            &data,
            "--issuer",
            &other_aud.issuer,
            "--audience",
            &s.server.base,
        ],
        "",
    );
    assert!(o.status.success());
    let wrong_aud = other_aud.token(
        "dr.adams",
        "openid user/Patient.rs",
        "https://elsewhere.example/fhir",
    );
    let rogue = Provider::start(
        0,
        &s.server.base,
        tempfile::tempdir().expect("tmp").path(),
        "a",
    );
    let unconfigured = rogue.token(
        "dr.adams",
        "openid user/Patient.rs user/Observation.rs",
        &s.server.base,
    );
    let mut tampered = clinician.clone().into_bytes();
    let at = clinician.find('.').expect("dot") + 5;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("utf8");
    for (t, what) in [
        (&nobody, "no local account"),
        (&wrong_aud, "another audience"),
        (&unconfigured, "an unconfigured issuer"),
        (&tampered, "a tampered token"),
    ] {
        assert_eq!(s.server.get("Patient", t).status, 401, "{what}");
    }
    let o = cli(
        &[
            "user",
            "disable",
            "--data-dir",
            &data,
            "--username",
            "pat.jones",
        ],
        "",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        s.server.get("Patient", &patient).status,
        401,
        "disabled account"
    );

    // key rotation: the provider restarts signing with a new key; the server fetches its
    // key set again when a token names an unknown kid (at most every IDP_REFETCH_MS here)
    let port = idp.port();
    drop(idp);
    let idp = Provider::start(port, &s.server.base, keys.path(), "b,a");
    std::thread::sleep(Duration::from_millis(2 * IDP_REFETCH_MS));
    let rotated = idp.token("dr.adams", "openid user/Patient.rs", &s.server.base);
    let kid: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(rotated.split('.').next().expect("header"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(kid["kid"], "b");
    assert_eq!(
        ids(&rotated, "Patient"),
        loaded_ids(&loaded, &[0], "Patient")
    );
    assert_eq!(
        ids(&clinician, "Patient"),
        loaded_ids(&loaded, &[0], "Patient"),
        "old key kept"
    );

    let events = audit_events(&s.server);
    let refused = events
        .iter()
        .filter(|e| e.interaction == "search-type" && e.outcome.http_status == 401)
        .count();
    assert!(refused >= 5, "{refused}");
    let by_idp = events
        .iter()
        .filter(|e| e.client_id.as_deref() == Some("oidc:ehr-portal") && e.user.is_some())
        .count();
    assert!(by_idp >= 6, "{by_idp}");
    drop((other_aud, rogue));
    s.server.stop();
}

fn audit_events(server: &Server) -> Vec<phivault_audit::AuditEvent> {
    let store = read_only_store(&server.data);
    let mut out = Vec::new();
    store
        .scan_audit(&mut |e| {
            out.push(phivault_audit::AuditEvent::decode(&e.event).expect("decode"));
            true
        })
        .expect("scan the audit log");
    out
}
