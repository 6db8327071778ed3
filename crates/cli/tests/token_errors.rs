//! Token errors that say why (issue 16): every refusal of `POST /auth/token` carries an
//! `error_description` (RFC 6749 §5.2) naming the failed check, with the right `error` and
//! HTTP status; an unknown client id and an unknown `kid` of a registered client read the
//! same; and the refused request's audit event keeps a reason code, read back with
//! `phivault audit report --format json` — all through the real binary over HTTPS.
mod common;
use common::flow::App;
use common::*;

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

/// What every unknown client, unknown kid and unproven disabled client reads.
const NO_KEY: &str = "no registered key with the client assertion's iss and kid verifies it";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A compact JWS over `header` and `claims` with a signature of junk: enough for every
/// check made before a key is looked up.
fn junk_signed(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(&[7u8; 96])
    )
}

/// The signature of `jws` with one bit flipped.
fn tampered(jws: &str) -> String {
    let p: Vec<&str> = jws.split('.').collect();
    let mut sig = B64.decode(p[2]).expect("b64");
    sig[10] ^= 0x80;
    format!("{}.{}.{}", p[0], p[1], b64(&sig))
}

/// POST the token endpoint with these form parameters.
fn token_form(s: &Server, pairs: &[(&str, &str)]) -> Resp {
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                phivault_auth::percent_encode(k),
                phivault_auth::percent_encode(v)
            )
        })
        .collect();
    s.send(
        "POST",
        &s.token_url(),
        None,
        Some((
            "application/x-www-form-urlencoded",
            body.join("&").into_bytes(),
        )),
        &[],
    )
}

/// A client credentials request with `assertion` for `scope`.
fn with_assertion(s: &Server, assertion: &str, scope: &str) -> Resp {
    token_form(
        s,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
            ("scope", scope),
        ],
    )
}

/// One refusal and what it must read.
struct Want {
    what: &'static str,
    status: u16,
    error: &'static str,
    description: &'static str,
    code: &'static str,
}

const fn want(
    what: &'static str,
    status: u16,
    error: &'static str,
    description: &'static str,
    code: &'static str,
) -> Want {
    Want {
        what,
        status,
        error,
        description,
        code,
    }
}

/// Checks `r` is the refusal `w` (status, body, headers); its request id.
fn refused(r: &Resp, w: &Want) -> String {
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, w.status, "{}: {body}", w.what);
    assert_eq!(
        r.json(),
        json!({"error": w.error, "error_description": w.description}),
        "{}",
        w.what
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{}",
        w.what
    );
    assert_eq!(r.header("cache-control"), Some("no-store"), "{}", w.what);
    r.header("x-request-id")
        .unwrap_or_else(|| panic!("{}: no request id", w.what))
        .to_owned()
}

/// The audit log as `phivault audit report --format json` prints it, by request id.
fn report_by_request(s: &Server) -> (String, BTreeMap<String, Value>) {
    let o = run(&[
        "audit",
        "report",
        "--data-dir",
        s.data.to_str().expect("path"),
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).expect("utf8");
    let by_request = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json line"))
        .map(|v| {
            let id = v["entity"][0]["what"]["identifier"]["value"]
                .as_str()
                .expect("request id")
                .to_owned();
            (id, v)
        })
        .collect();
    (text, by_request)
}

/// Marks a registered back-end client disabled in the store (there is no `client disable`
/// command yet); the server reads client records on every request.
fn disable_client(s: &Server, client_id: &str) {
    let out = std::process::Command::new(BIN)
        .args(unlock_args(&s.data))
        .args(["client", "disable", "--data-dir"])
        .arg(&s.data)
        .args(["--client-id", client_id])
        .output()
        .expect("run client disable");
    assert!(
        out.status.success(),
        "client disable: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_refusal_says_why_and_is_audited_with_its_reason() {
    let s = Server::start();
    let c1 = s.add_client("system/Patient.rs");
    let c3 = s.add_client("system/Patient.rs");
    let url = s.token_url();
    let key1 = phivault_auth::PrivateJwk::from_json_str(&c1.private_jwk).expect("jwk");
    let key3 = phivault_auth::PrivateJwk::from_json_str(&c3.private_jwk).expect("jwk");
    let kid1: Value = serde_json::from_str::<Value>(&c1.private_jwk).expect("json")["kid"].clone();
    let id1 = c1.client_id.as_str();
    let n = now();
    let claims = |iss: &str, sub: &str, aud: &str, exp: u64| json!({"iss": iss, "sub": sub, "aud": aud, "exp": exp, "iat": n, "jti": rand_hex()});
    let good = || claims(id1, id1, &url, n + 240);
    let sign = |c: &Value| key1.sign_jws(c).expect("sign");
    let without = |k: &str| {
        let mut c = good();
        c.as_object_mut().expect("object").remove(k);
        c
    };
    let with = |k: &str, v: Value| {
        let mut c = good();
        c[k] = v;
        c
    };

    // the first use of an assertion works; its replay is refused
    let replayed = sign(&good());
    let ok = with_assertion(&s, &replayed, "system/Patient.rs");
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let ok_request = ok.header("x-request-id").expect("request id").to_owned();

    // an unknown kid: the client's own key under another kid
    let mut other_kid: Value = serde_json::from_str(&c1.private_jwk).expect("json");
    other_kid["kid"] = json!("no-such-kid");
    let other_kid = phivault_auth::PrivateJwk::from_json_str(&other_kid.to_string()).expect("jwk");

    const CLIENT: &str = "invalid_client";
    let mut long = good();
    long["pad"] = json!("x".repeat(9000));
    let cases: Vec<(Want, Resp)> = vec![
        (
            want(
                "expired",
                401,
                CLIENT,
                "the client assertion has expired",
                "assertion-expired",
            ),
            with_assertion(
                &s,
                &sign(&json!({"iss": id1, "sub": id1, "aud": url, "exp": n - 60,
                    "iat": n - 200, "jti": rand_hex()})),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "exp an hour ahead",
                401,
                CLIENT,
                "the client assertion's exp is more than five minutes ahead",
                "exp-too-far",
            ),
            with_assertion(
                &s,
                &sign(&claims(id1, id1, &url, n + 3600)),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "no exp",
                401,
                CLIENT,
                "the client assertion has no numeric exp",
                "exp-missing",
            ),
            with_assertion(&s, &sign(&without("exp")), "system/Patient.rs"),
        ),
        (
            want(
                "iat in the future",
                401,
                CLIENT,
                "the client assertion's iat or nbf is in the future",
                "iat-nbf-in-future",
            ),
            with_assertion(
                &s,
                &sign(&with("iat", json!(n + 3600))),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "nbf in the future",
                401,
                CLIENT,
                "the client assertion's iat or nbf is in the future",
                "iat-nbf-in-future",
            ),
            with_assertion(
                &s,
                &sign(&with("nbf", json!(n + 3600))),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "aud = the FHIR base",
                401,
                CLIENT,
                "the client assertion's aud is not this token endpoint's URL",
                "aud-mismatch",
            ),
            with_assertion(
                &s,
                &sign(&claims(id1, id1, &s.base, n + 240)),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "iss != sub",
                401,
                CLIENT,
                "the client assertion's sub is not its iss",
                "iss-sub-mismatch",
            ),
            with_assertion(
                &s,
                &sign(&claims(id1, &c3.client_id, &url, n + 240)),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "no iss",
                401,
                CLIENT,
                "the client assertion's iss is missing or not a valid client id",
                "iss-invalid",
            ),
            with_assertion(&s, &sign(&without("iss")), "system/Patient.rs"),
        ),
        (
            want(
                "no jti",
                401,
                CLIENT,
                "the client assertion's jti is missing, empty or longer than 256 characters",
                "jti-missing",
            ),
            with_assertion(&s, &sign(&without("jti")), "system/Patient.rs"),
        ),
        (
            want(
                "replayed jti",
                401,
                CLIENT,
                "the client assertion's jti was used before",
                "jti-replayed",
            ),
            with_assertion(&s, &replayed, "system/Patient.rs"),
        ),
        (
            want("unknown kid", 401, CLIENT, NO_KEY, "unknown-kid"),
            with_assertion(
                &s,
                &other_kid.sign_jws(&good()).expect("sign"),
                "system/Patient.rs",
            ),
        ),
        (
            want("unknown client", 401, CLIENT, NO_KEY, "unknown-client"),
            with_assertion(
                &s,
                &sign(&claims("no-such-client", "no-such-client", &url, n + 240)),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "signed by another client's key under this client's kid",
                401,
                CLIENT,
                NO_KEY,
                "signature-invalid",
            ),
            with_assertion(
                &s,
                &{
                    let mut k: Value = serde_json::from_str(&c3.private_jwk).expect("json");
                    k["kid"] = kid1.clone();
                    phivault_auth::PrivateJwk::from_json_str(&k.to_string())
                        .expect("jwk")
                        .sign_jws(&good())
                        .expect("sign")
                },
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "tampered signature",
                401,
                CLIENT,
                NO_KEY,
                "signature-invalid",
            ),
            with_assertion(&s, &tampered(&sign(&good())), "system/Patient.rs"),
        ),
        (
            want(
                "alg none",
                401,
                CLIENT,
                "the client assertion's alg is not ES384 or RS384",
                "alg-not-allowed",
            ),
            with_assertion(
                &s,
                &junk_signed(&json!({"alg": "none", "kid": kid1}), &good()),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "alg HS256",
                401,
                CLIENT,
                "the client assertion's alg is not ES384 or RS384",
                "alg-not-allowed",
            ),
            with_assertion(
                &s,
                &junk_signed(&json!({"alg": "HS256", "kid": kid1}), &good()),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "alg RS256",
                401,
                CLIENT,
                "the client assertion's alg is not ES384 or RS384",
                "alg-not-allowed",
            ),
            with_assertion(
                &s,
                &junk_signed(&json!({"alg": "RS256", "kid": kid1}), &good()),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "no kid",
                401,
                CLIENT,
                "the client assertion's header has no kid",
                "kid-missing",
            ),
            with_assertion(
                &s,
                &junk_signed(&json!({"alg": "ES384"}), &good()),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "jku header",
                401,
                CLIENT,
                "the client assertion's header has a refused parameter (crit, jku, x5u, jwk, x5c, b64 or zip)",
                "header-forbidden",
            ),
            with_assertion(
                &s,
                &junk_signed(
                    &json!({"alg": "ES384", "kid": kid1, "jku": "https://evil.example/jwks"}),
                    &good(),
                ),
                "system/Patient.rs",
            ),
        ),
        (
            want(
                "garbage assertion",
                401,
                CLIENT,
                "the client assertion is not a compact JWS with a JSON header and claim set",
                "assertion-malformed",
            ),
            with_assertion(&s, "not.a.jwt", "system/Patient.rs"),
        ),
        (
            want(
                "assertion over 8 KiB",
                401,
                CLIENT,
                "the client assertion is longer than 8192 bytes",
                "assertion-too-long",
            ),
            with_assertion(&s, &sign(&long), "system/Patient.rs"),
        ),
        (
            want(
                "wrong client_assertion_type",
                401,
                CLIENT,
                "client_assertion_type is not urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "assertion-type-unsupported",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "client_credentials"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
                    ),
                    ("client_assertion", &sign(&good())),
                    ("scope", "system/Patient.rs"),
                ],
            ),
        ),
        (
            want(
                "no client_assertion_type",
                401,
                CLIENT,
                "client_assertion_type is missing",
                "assertion-type-missing",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_assertion", &sign(&good())),
                    ("scope", "system/Patient.rs"),
                ],
            ),
        ),
        (
            want(
                "no client_assertion",
                401,
                CLIENT,
                "client_assertion is missing",
                "assertion-missing",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", JWT_BEARER),
                    ("scope", "system/Patient.rs"),
                ],
            ),
        ),
        (
            want(
                "client_id is not iss",
                401,
                CLIENT,
                "the client_id parameter is not the client assertion's iss",
                "client-id-mismatch",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", &c3.client_id),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &sign(&good())),
                    ("scope", "system/Patient.rs"),
                ],
            ),
        ),
        (
            want(
                "client_secret as well",
                400,
                "invalid_request",
                "the request uses more than one client authentication method",
                "multiple-client-auth",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_secret", "hunter2"),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &sign(&good())),
                    ("scope", "system/Patient.rs"),
                ],
            ),
        ),
        (
            want(
                "scope twice",
                400,
                "invalid_request",
                "a request parameter appears more than once",
                "duplicate-parameter",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &sign(&good())),
                    ("scope", "system/Patient.rs"),
                    ("scope", "system/Observation.rs"),
                ],
            ),
        ),
        (
            want(
                "no grant_type",
                400,
                "invalid_request",
                "grant_type is missing",
                "grant-type-missing",
            ),
            token_form(
                &s,
                &[
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &sign(&good())),
                    ("scope", "system/Patient.rs"),
                ],
            ),
        ),
        (
            want(
                "grant_type password",
                400,
                "unsupported_grant_type",
                "grant_type is not client_credentials, authorization_code or refresh_token",
                "grant-type-unsupported",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "password"),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &sign(&good())),
                    ("scope", "system/Patient.rs"),
                ],
            ),
        ),
        (
            want(
                "body not UTF-8",
                400,
                "invalid_request",
                "the request body is not an application/x-www-form-urlencoded form in UTF-8",
                "body-unreadable",
            ),
            s.send(
                "POST",
                &url,
                None,
                Some(("application/x-www-form-urlencoded", vec![b'a', 0xff, 0xfe])),
                &[],
            ),
        ),
        (
            want(
                "scope not registered",
                400,
                "invalid_scope",
                "no requested scope is registered for the client",
                "scope-not-registered",
            ),
            with_assertion(&s, &sign(&good()), "system/Observation.rs"),
        ),
        (
            want(
                "patient/ scope for a back-end client",
                400,
                "invalid_scope",
                "no requested scope is registered for the client",
                "scope-not-registered",
            ),
            with_assertion(&s, &sign(&good()), "patient/Patient.rs"),
        ),
        (
            want(
                "scope malformed",
                400,
                "invalid_scope",
                "scope is not a space-separated list of valid SMART scopes",
                "scope-malformed",
            ),
            with_assertion(&s, &sign(&good()), "system/Patient.rx"),
        ),
        (
            want(
                "no scope",
                400,
                "invalid_scope",
                "scope is missing",
                "scope-missing",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &sign(&good())),
                ],
            ),
        ),
    ];

    // a disabled client: named only to whoever holds its key
    disable_client(&s, &c3.client_id);
    let id3 = c3.client_id.as_str();
    let c3_claims =
        || json!({"iss": id3, "sub": id3, "aud": url, "exp": n + 240, "iat": n, "jti": rand_hex()});
    let mut cases = cases;
    cases.push((
        want(
            "disabled client, signed with its key",
            401,
            CLIENT,
            "the client is disabled",
            "client-disabled",
        ),
        with_assertion(
            &s,
            &key3.sign_jws(&c3_claims()).expect("sign"),
            "system/Patient.rs",
        ),
    ));
    cases.push((
        want(
            "disabled client, signature not verified",
            401,
            CLIENT,
            NO_KEY,
            "client-disabled-unverified",
        ),
        with_assertion(
            &s,
            &tampered(&key3.sign_jws(&c3_claims()).expect("sign")),
            "system/Patient.rs",
        ),
    ));

    let mut expected: Vec<(String, &Want)> = Vec::new();
    for (w, r) in &cases {
        assert!(r.json().get("access_token").is_none(), "{}", w.what);
        expected.push((refused(r, w), w));
    }

    // the audit log keeps each refusal's reason code (and the accepted request none),
    // and nothing of what was sent
    let (text, by_request) = report_by_request(&s);
    for (request, w) in &expected {
        let e = by_request
            .get(request)
            .unwrap_or_else(|| panic!("{}: no audit event", w.what));
        assert_eq!(e["subtype"][0]["code"], "token", "{}", w.what);
        assert_eq!(e["outcome"], "4", "{}", w.what);
        assert_eq!(
            e["outcomeDesc"],
            format!("HTTP {} {}", w.status, w.code),
            "{}",
            w.what
        );
    }
    assert_eq!(by_request[&ok_request]["outcomeDesc"], "HTTP 200");
    for secret in [
        replayed.as_str(),
        "no-such-client",
        "no-such-kid",
        "hunter2",
        "evil.example",
    ] {
        assert!(!text.contains(secret), "the audit report holds {secret}");
    }
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}

/// An unknown client id, an unknown kid of a registered client, a registered client's kid
/// under someone else's key (and a disabled client whose assertion does not verify) get
/// byte-identical answers.
#[test]
fn an_unknown_client_and_an_unknown_kid_read_the_same() {
    let s = Server::start();
    let c = s.add_client("system/Patient.rs");
    let d = s.add_client("system/Patient.rs");
    let url = s.token_url();
    let key = phivault_auth::PrivateJwk::from_json_str(&c.private_jwk).expect("jwk");
    let dkey = phivault_auth::PrivateJwk::from_json_str(&d.private_jwk).expect("jwk");
    let claims = |iss: &str| {
        json!({"iss": iss, "sub": iss, "aud": url, "exp": now() + 240, "iat": now(),
            "jti": rand_hex()})
    };
    let mut renamed: Value = serde_json::from_str(&c.private_jwk).expect("json");
    renamed["kid"] = json!("not-a-kid-of-this-client");
    let renamed = phivault_auth::PrivateJwk::from_json_str(&renamed.to_string()).expect("jwk");
    disable_client(&s, &d.client_id);

    let answers = [
        (
            "unknown client",
            with_assertion(
                &s,
                &key.sign_jws(&claims("never-registered")).expect("sign"),
                "system/Patient.rs",
            ),
        ),
        (
            "unknown kid",
            with_assertion(
                &s,
                &renamed.sign_jws(&claims(&c.client_id)).expect("sign"),
                "system/Patient.rs",
            ),
        ),
        (
            // kids are predictable ({client_id}-1): a bad signature under a registered
            // client's real kid must not confirm that the client exists
            "registered client, its real kid, a stranger's key",
            with_assertion(
                &s,
                &{
                    let (stranger, _) = phivault_auth::generate_es384_jwk(key.kid()).expect("key");
                    stranger.sign_jws(&claims(&c.client_id)).expect("sign")
                },
                "system/Patient.rs",
            ),
        ),
        (
            "disabled client, bad signature",
            with_assertion(
                &s,
                &tampered(&dkey.sign_jws(&claims(&d.client_id)).expect("sign")),
                "system/Patient.rs",
            ),
        ),
    ];
    let (_, first) = &answers[0];
    assert_eq!(first.status, 401);
    assert_eq!(
        first.json(),
        json!({"error": "invalid_client", "error_description": NO_KEY})
    );
    let shown = |r: &Resp| {
        let mut h: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(k, _)| !["date", "x-request-id"].contains(&k.to_ascii_lowercase().as_str()))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        h.sort();
        (r.status, h, r.body.clone())
    };
    for (what, r) in &answers[1..] {
        assert_eq!(
            shown(r),
            shown(first),
            "{what} differs from an unknown client"
        );
    }
}

/// The App Launch grants say what they already tell apart.
#[test]
fn the_app_launch_grants_say_why() {
    let s = Server::start();
    let app = App::register(&s, "Errors app");
    let cases = [
        (
            want(
                "authorization_code without client_id",
                401,
                "invalid_client",
                "client_id is missing",
                "client-id-missing",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", "x"),
                    ("redirect_uri", "https://app.example/cb"),
                    ("code_verifier", "v"),
                ],
            ),
        ),
        (
            want(
                "authorization_code for no registered app",
                401,
                "invalid_client",
                "client_id is not a registered, enabled app",
                "unknown-app",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "authorization_code"),
                    ("client_id", "no-such-app"),
                    ("code", "x"),
                    ("redirect_uri", "https://app.example/cb"),
                    ("code_verifier", "v"),
                ],
            ),
        ),
        (
            want(
                "an app sending a client assertion",
                401,
                "invalid_client",
                "an app's authorization_code and refresh_token requests carry no client_secret or client_assertion",
                "public-client-credentials",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "authorization_code"),
                    ("client_id", &app.client_id),
                    ("client_assertion", "x.y.z"),
                ],
            ),
        ),
        (
            want(
                "authorization_code without code_verifier",
                400,
                "invalid_grant",
                "code_verifier is missing",
                "code-verifier-missing",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "authorization_code"),
                    ("client_id", &app.client_id),
                    ("code", "x"),
                    ("redirect_uri", "https://app.example/cb"),
                ],
            ),
        ),
        (
            want(
                "an unknown code",
                400,
                "invalid_grant",
                "the authorization code is not known",
                "code-unknown",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "authorization_code"),
                    ("client_id", &app.client_id),
                    ("code", &rand_hex()),
                    ("redirect_uri", "https://app.example/cb"),
                    ("code_verifier", &"v".repeat(43)),
                ],
            ),
        ),
        (
            want(
                "an unknown refresh token",
                400,
                "invalid_grant",
                "the refresh token is not known",
                "refresh-unknown",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", &app.client_id),
                    ("refresh_token", &rand_hex()),
                ],
            ),
        ),
        (
            want(
                "refresh_token grant without the token",
                400,
                "invalid_request",
                "refresh_token is missing",
                "refresh-token-missing",
            ),
            token_form(
                &s,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", &app.client_id),
                ],
            ),
        ),
    ];
    let requests: Vec<(String, &Want)> = cases.iter().map(|(w, r)| (refused(r, w), w)).collect();
    let (_, by_request) = report_by_request(&s);
    for (request, w) in requests {
        assert_eq!(
            by_request[&request]["outcomeDesc"],
            format!("HTTP {} {}", w.status, w.code),
            "{}",
            w.what
        );
    }
}
