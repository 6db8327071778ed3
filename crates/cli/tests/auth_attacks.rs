//! Attacks on authentication and authorization (SM2, SM3, SM6, API2): broken, forged and
//! replayed credentials must never get in, and every denial is audited.
mod common;
use common::*;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

const TOKEN_KID: &str = "phivault-token-1";

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    B64.decode(s).expect("base64url")
}

/// A compact JWS with `alg: HS256`, HMAC-SHA256 keyed with `key`.
fn sign_hs256(key: &[u8], header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

/// The header of a genuine access token.
fn good_header() -> Value {
    json!({"alg": "EdDSA", "kid": TOKEN_KID, "typ": "at+jwt"})
}

/// Claims of a genuine access token for `client_id` with `scope`.
fn good_claims(s: &Server, client_id: &str, scope: &str) -> Value {
    let n = now();
    json!({
        "iss": s.origin, "aud": s.base, "sub": client_id, "client_id": client_id,
        "scope": scope, "iat": n, "nbf": n, "exp": n + 240, "jti": rand_hex(),
    })
}

/// The decoded claims of a compact JWS.
fn payload(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("payload part");
    serde_json::from_slice(&unb64(part)).expect("payload json")
}

fn get_with_auth(s: &Server, path: &str, authorization: Option<&str>) -> Resp {
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    s.send("GET", &format!("{}/{path}", s.base), None, None, &headers)
}

fn assert_401(r: &Resp, what: &str) {
    assert_eq!(
        r.status,
        401,
        "{what}: expected 401, got {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let challenge = r.header("www-authenticate").unwrap_or("");
    assert!(
        challenge.starts_with("Bearer"),
        "{what}: WWW-Authenticate is {challenge:?}"
    );
    assert!(r.is_outcome(), "{what}: body is not an OperationOutcome");
}

fn assert_status(r: &Resp, want: u16, what: &str) {
    assert_eq!(
        r.status,
        want,
        "{what}: expected {want}, got {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
}

fn audited_with_status(events: &[Value], status: u16) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["outcome"]["http_status"] == json!(status))
        .collect()
}

#[test]
fn broken_and_forged_access_tokens_get_401() {
    let s = Server::start();
    let creds = s.add_client("system/Patient.rs");
    let valid = s.token_for(&creds, "system/Patient.rs");
    let pkcs8 = signing_pkcs8(&s);
    let cid = creds.client_id.as_str();

    // Baseline: the real token and a token forged with the real key and correct claims work,
    // so every 401 below is due to the one thing that was changed.
    let r = s.get("Patient/does-not-exist", &valid);
    assert_status(&r, 404, "valid token");
    let forged_ok = sign_ed25519(
        &pkcs8,
        &good_header(),
        &good_claims(&s, cid, "system/Patient.rs"),
    );
    assert_status(
        &s.get("Patient/does-not-exist", &forged_ok),
        404,
        "well-formed token signed with the real key",
    );

    // No Authorization header at all.
    let r = get_with_auth(&s, "Patient/x", None);
    assert_401(&r, "missing Authorization");
    // Other schemes, empty and garbage tokens.
    assert_401(
        &get_with_auth(&s, "Patient/x", Some("Basic dXNlcjpwYXNz")),
        "Basic",
    );
    assert_401(
        &get_with_auth(&s, "Patient/x", Some(&format!("Basic {valid}"))),
        "valid token under Basic scheme",
    );
    assert_401(
        &get_with_auth(&s, "Patient/x", Some("Bearer")),
        "Bearer, no token",
    );
    assert_401(
        &get_with_auth(&s, "Patient/x", Some("Bearer ")),
        "Bearer, empty token",
    );
    assert_401(&s.get("Patient/x", "garbage"), "garbage");
    assert_401(&s.get("Patient/x", "a.b.c"), "three garbage segments");
    assert_401(
        &s.get("Patient/x", &format!("{valid}.x")),
        "valid token with an extra segment",
    );
    let huge = "A".repeat(9000);
    assert_401(&s.get("Patient/x", &huge), "9000-byte token");

    // Real key, wrong claims.
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut c = good_claims(&s, cid, "system/Patient.rs");
        f(&mut c);
        c
    };
    let n = now();
    let cases: Vec<(&str, Value, Value)> = vec![
        (
            "expired",
            good_header(),
            claims(&|c| {
                c["iat"] = json!(n - 1000);
                c["nbf"] = json!(n - 1000);
                c["exp"] = json!(n - 700);
            }),
        ),
        (
            "expired just beyond the skew",
            good_header(),
            claims(&|c| {
                c["iat"] = json!(n - 400);
                c["nbf"] = json!(n - 400);
                c["exp"] = json!(n - 100);
            }),
        ),
        (
            "not yet valid",
            good_header(),
            claims(&|c| {
                c["iat"] = json!(n + 1000);
                c["nbf"] = json!(n + 1000);
                c["exp"] = json!(n + 1200);
            }),
        ),
        (
            "lifetime far too long",
            good_header(),
            claims(&|c| c["exp"] = json!(n + 86_400)),
        ),
        (
            "no exp",
            good_header(),
            claims(&|c| {
                c.as_object_mut().expect("obj").remove("exp");
            }),
        ),
        (
            "wrong aud",
            good_header(),
            claims(&|c| c["aud"] = json!("https://other.example.org/fhir")),
        ),
        (
            "aud = token url",
            good_header(),
            claims(&|c| c["aud"] = json!(s.token_url())),
        ),
        (
            "no aud",
            good_header(),
            claims(&|c| {
                c.as_object_mut().expect("obj").remove("aud");
            }),
        ),
        (
            "wrong iss",
            good_header(),
            claims(&|c| c["iss"] = json!("https://evil.example.org")),
        ),
        (
            "no iss",
            good_header(),
            claims(&|c| {
                c.as_object_mut().expect("obj").remove("iss");
            }),
        ),
        (
            "sub differs from client_id",
            good_header(),
            claims(&|c| c["sub"] = json!("someone-else")),
        ),
        (
            "malformed scope",
            good_header(),
            claims(&|c| c["scope"] = json!("system/Patient.xyz")),
        ),
        (
            "wrong kid",
            json!({"alg": "EdDSA", "kid": "phivault-token-2", "typ": "at+jwt"}),
            claims(&|_| {}),
        ),
        (
            "no kid",
            json!({"alg": "EdDSA", "typ": "at+jwt"}),
            claims(&|_| {}),
        ),
        (
            "wrong typ",
            json!({"alg": "EdDSA", "kid": TOKEN_KID, "typ": "JWT"}),
            claims(&|_| {}),
        ),
        (
            "unexpected crit header",
            json!({"alg": "EdDSA", "kid": TOKEN_KID, "typ": "at+jwt", "crit": ["exp"]}),
            claims(&|_| {}),
        ),
    ];
    for (what, header, c) in &cases {
        let t = sign_ed25519(&pkcs8, header, c);
        assert_401(&s.get("Patient/x", &t), what);
    }

    // A key that is not the server's, with perfect claims.
    let other = phivault_auth::generate_ed25519_pkcs8().expect("key");
    let t = sign_ed25519(
        &other,
        &good_header(),
        &good_claims(&s, cid, "system/*.cruds"),
    );
    assert_401(&s.get("Patient/x", &t), "signed by a foreign Ed25519 key");

    // alg: none with an empty signature (and with the original signature kept).
    let parts: Vec<&str> = valid.split('.').collect();
    let none_header = b64(json!({"alg": "none", "typ": "at+jwt", "kid": TOKEN_KID})
        .to_string()
        .as_bytes());
    let t = format!("{none_header}.{}.", parts[1]);
    assert_401(&s.get("Patient/x", &t), "alg none, empty signature");
    let t = format!("{none_header}.{}.{}", parts[1], parts[2]);
    assert_401(&s.get("Patient/x", &t), "alg none, original signature");
    let none_lower = b64(json!({"alg": "None", "typ": "at+jwt", "kid": TOKEN_KID})
        .to_string()
        .as_bytes());
    assert_401(
        &s.get("Patient/x", &format!("{none_lower}.{}.", parts[1])),
        "alg None",
    );

    // HS256 keyed with the server's public key: raw 32 bytes, and the JWK JSON text.
    let jwks = s.send(
        "GET",
        &format!("{}/.well-known/jwks.json", s.origin),
        None,
        None,
        &[],
    );
    assert_status(&jwks, 200, "jwks");
    let jwk = jwks.json()["keys"][0].clone();
    assert_eq!(jwk["kid"], TOKEN_KID);
    let raw_pub = unb64(jwk["x"].as_str().expect("x"));
    assert_eq!(raw_pub.len(), 32);
    let hs_header = json!({"alg": "HS256", "kid": TOKEN_KID, "typ": "at+jwt"});
    let body = good_claims(&s, cid, "system/*.cruds");
    let body_text = String::from_utf8(jwks.body.clone()).expect("utf8");
    let jwk_text = jwk.to_string();
    for (what, key) in [
        ("HS256 keyed with raw public key", raw_pub.as_slice()),
        (
            "HS256 keyed with the x value",
            jwk["x"].as_str().unwrap_or("").as_bytes(),
        ),
        ("HS256 keyed with the JWK JSON", jwk_text.as_bytes()),
        ("HS256 keyed with the JWKS document", body_text.as_bytes()),
    ] {
        let t = sign_hs256(key, &hs_header, &body);
        assert_401(&s.get("Patient/x", &t), what);
        // and with the EdDSA header kept but an HMAC in the signature slot
        let t = sign_hs256(key, &good_header(), &body);
        assert_401(&s.get("Patient/x", &t), what);
    }

    // Tampered payload: widen the scope, keep the signature.
    let mut c = payload(&valid);
    assert_eq!(c["scope"], "system/Patient.rs");
    c["scope"] = json!("system/*.cruds");
    let t = format!(
        "{}.{}.{}",
        parts[0],
        b64(c.to_string().as_bytes()),
        parts[2]
    );
    assert_401(&s.get("Patient/x", &t), "tampered scope");
    let r = s.post("Patient", &t, &patient());
    assert_401(&r, "tampered scope used for a create");
    // Tampered signature: flip one bit of each signature byte position tried.
    let sig = unb64(parts[2]);
    for i in [0usize, 31, 63] {
        let mut bad = sig.clone();
        bad[i] ^= 0x01;
        let t = format!("{}.{}.{}", parts[0], parts[1], b64(&bad));
        assert_401(&s.get("Patient/x", &t), "tampered signature");
    }
    let t = format!("{}.{}.{}", parts[0], parts[1], b64(&sig[..32]));
    assert_401(&s.get("Patient/x", &t), "truncated signature");

    // The genuine token still works after all that (nothing poisoned the cache).
    assert_status(&s.get("Patient/does-not-exist", &valid), 404, "valid again");

    // Every denial was audited, and the chain verifies.
    let events = audit_events(&s);
    let denied = audited_with_status(&events, 401);
    assert!(
        denied.len() >= cases.len() + 10,
        "only {} 401 audit events",
        denied.len()
    );
    assert!(
        denied.iter().all(|e| e["client_id"].is_null()),
        "an unauthenticated request was attributed to a client"
    );
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}

#[test]
fn scopes_that_do_not_cover_the_interaction_get_403() {
    let s = Server::start();
    let admin = s.token("system/*.cruds");
    let r = s.post("Patient", &admin, &patient());
    assert_status(&r, 201, "admin create");
    let pid = r.json()["id"].as_str().expect("id").to_owned();
    let obs = json!({
        "resourceType": "Observation", "status": "final", "code": {"text": "weight"},
        "subject": {"reference": format!("Patient/{pid}")}
    });
    let r = s.post("Observation", &admin, &obs);
    assert_status(&r, 201, "admin create observation");
    let oid = r.json()["id"].as_str().expect("id").to_owned();
    let count = |rtype: &str| {
        let h = s.get(&format!("{rtype}/_history?_count=1000"), &admin);
        assert_status(&h, 200, "history");
        h.json()["entry"].as_array().map(Vec::len).unwrap_or(0)
    };
    let (patients, observations) = (count("Patient"), count("Observation"));

    let read_patients = s.token("system/Patient.rs");
    let t = read_patients.as_str();
    assert_status(
        &s.post("Observation", t, &obs),
        403,
        "Patient.rs POST Observation",
    );
    let r = s.post("Patient", t, &patient());
    assert_status(&r, 403, "Patient.rs POST Patient");
    assert!(r.is_outcome());
    assert_status(&s.get(&format!("Patient/{pid}"), t), 200, "Patient.rs read");
    assert_status(&s.get("Patient/nope", t), 404, "Patient.rs read missing");
    assert_status(&s.get("Patient/_history", t), 200, "Patient.rs history");
    let mut p = patient();
    p["id"] = json!(pid);
    assert_status(
        &s.put(&format!("Patient/{pid}"), t, &p, &[]),
        403,
        "Patient.rs update",
    );
    assert_status(
        &s.put(
            "Patient/brand-new-id",
            t,
            &{
                let mut p = patient();
                p["id"] = json!("brand-new-id");
                p
            },
            &[],
        ),
        403,
        "Patient.rs update-as-create",
    );
    assert_status(
        &s.delete(&format!("Patient/{pid}"), t),
        403,
        "Patient.rs delete",
    );
    assert_status(
        &s.get(&format!("Observation/{oid}"), t),
        403,
        "Patient.rs read Observation",
    );
    assert_status(
        &s.get(&format!("Observation/{oid}/_history/1"), t),
        403,
        "Patient.rs vread Observation",
    );
    assert_status(
        &s.get("Observation/_history", t),
        403,
        "Patient.rs Observation history",
    );
    // A transaction containing one entry outside the scope is refused as a whole.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": format!("Patient/{pid}")}},
        {"resource": obs, "request": {"method": "POST", "url": "Observation"}}
    ]});
    assert_status(&s.post("", t, &tx), 403, "transaction with a denied entry");
    // A batch authorizes each entry on its own.
    let mut b = tx.clone();
    b["type"] = json!("batch");
    let r = s.post("", t, &b);
    assert_status(&r, 200, "batch with a denied entry");
    let j = r.json();
    assert!(
        j["entry"][0]["response"]["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("200"),
        "{j}"
    );
    assert!(
        j["entry"][1]["response"]["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("403"),
        "{j}"
    );

    let obs_all = s.token("system/Observation.cruds");
    let t = obs_all.as_str();
    assert_status(
        &s.get(&format!("Patient/{pid}"), t),
        403,
        "Observation.cruds read Patient",
    );
    assert_status(
        &s.get("Patient/nope", t),
        403,
        "403 does not reveal existence",
    );
    assert_status(
        &s.post("Patient", t, &patient()),
        403,
        "Observation.cruds create Patient",
    );
    assert_status(
        &s.get(&format!("Observation/{oid}"), t),
        200,
        "Observation read",
    );

    // A read-only scope on everything cannot write.
    let read_all = s.token("system/*.rs");
    assert_status(
        &s.post("Patient", &read_all, &patient()),
        403,
        "*.rs create",
    );
    assert_status(
        &s.delete(&format!("Observation/{oid}"), &read_all),
        403,
        "*.rs delete",
    );

    // Nothing was written by any denied request.
    assert_eq!(count("Patient"), patients);
    assert_eq!(count("Observation"), observations);
    assert_status(
        &s.get(&format!("Patient/{pid}"), &admin),
        200,
        "still there",
    );

    let events = audit_events(&s);
    let forbidden = audited_with_status(&events, 403);
    assert!(forbidden.len() >= 14, "only {} 403 events", forbidden.len());
    assert!(
        forbidden.iter().all(|e| e["client_id"].is_string()),
        "a 403 audit event does not name the client"
    );
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}

fn oauth_error(r: &Resp) -> String {
    r.json()["error"].as_str().unwrap_or("").to_owned()
}

fn assert_invalid_client(r: &Resp, what: &str) {
    assert!(
        (r.status == 401 || r.status == 400) && oauth_error(r) == "invalid_client",
        "{what}: expected invalid_client, got {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        r.json().get("access_token").is_none(),
        "{what}: a token was issued"
    );
}

#[test]
fn token_endpoint_attacks() {
    let s = Server::start();
    let c1 = s.add_client("system/Patient.rs");
    let c2 = s.add_client("system/*.cruds");
    let url = s.token_url();
    let key1 = phivault_auth::PrivateJwk::from_json_str(&c1.private_jwk).expect("jwk");
    let key2 = phivault_auth::PrivateJwk::from_json_str(&c2.private_jwk).expect("jwk");
    let claims = |iss: &str, sub: &str, aud: &str, exp: u64, jti: &str| json!({"iss": iss, "sub": sub, "aud": aud, "exp": exp, "iat": now(), "jti": jti});
    let id1 = c1.client_id.as_str();

    // Replay: the very same assertion twice.
    let a = s.assertion(&c1, &url, &rand_hex());
    assert_status(&s.token_request(&a, "system/Patient.rs"), 200, "first use");
    assert_invalid_client(
        &s.token_request(&a, "system/Patient.rs"),
        "replayed assertion",
    );
    // Replay of a jti in a freshly signed assertion.
    let jti = rand_hex();
    let a = s.assertion(&c1, &url, &jti);
    assert_status(&s.token_request(&a, "system/Patient.rs"), 200, "fresh jti");
    let a = key1
        .sign_jws(&claims(id1, id1, &url, now() + 200, &jti))
        .expect("sign");
    assert_invalid_client(&s.token_request(&a, "system/Patient.rs"), "reused jti");

    let n = now();
    let bad: Vec<(&str, String)> = vec![
        (
            "aud = FHIR base",
            key1.sign_jws(&claims(id1, id1, &s.base, n + 200, &rand_hex()))
                .expect("sign"),
        ),
        (
            "aud = other server",
            key1.sign_jws(&claims(
                id1,
                id1,
                "https://other.example.org/auth/token",
                n + 200,
                &rand_hex(),
            ))
            .expect("sign"),
        ),
        (
            "iss != sub",
            key1.sign_jws(&claims(id1, &c2.client_id, &url, n + 200, &rand_hex()))
                .expect("sign"),
        ),
        (
            "expired",
            key1.sign_jws(&json!({"iss": id1, "sub": id1, "aud": url, "exp": n - 60,
                "iat": n - 200, "jti": rand_hex()}))
                .expect("sign"),
        ),
        (
            "exp too far ahead",
            key1.sign_jws(&claims(id1, id1, &url, n + 3600, &rand_hex()))
                .expect("sign"),
        ),
        (
            "no jti",
            key1.sign_jws(&json!({"iss": id1, "sub": id1, "aud": url, "exp": n + 200}))
                .expect("sign"),
        ),
        (
            "signed by another client's key (its own kid)",
            key2.sign_jws(&claims(id1, id1, &url, n + 200, &rand_hex()))
                .expect("sign"),
        ),
        (
            "unknown client",
            key1.sign_jws(&claims(
                "no-such-client",
                "no-such-client",
                &url,
                n + 200,
                &rand_hex(),
            ))
            .expect("sign"),
        ),
        ("garbage assertion", "not.a.jwt".to_owned()),
    ];
    for (what, a) in &bad {
        assert_invalid_client(&s.token_request(a, "system/Patient.rs"), what);
    }

    // Another client's key presented under this client's kid: the signature must fail.
    let mut k2: Value = serde_json::from_str(&c2.private_jwk).expect("json");
    let k1: Value = serde_json::from_str(&c1.private_jwk).expect("json");
    k2["kid"] = k1["kid"].clone();
    let impostor = phivault_auth::PrivateJwk::from_json_str(&k2.to_string()).expect("jwk");
    let a = impostor
        .sign_jws(&claims(id1, id1, &url, now() + 200, &rand_hex()))
        .expect("sign");
    assert_invalid_client(
        &s.token_request(&a, "system/Patient.rs"),
        "another client's key under this client's kid",
    );

    // alg: none assertion built from a genuine one.
    let genuine = s.assertion(&c1, &url, &rand_hex());
    let p: Vec<&str> = genuine.split('.').collect();
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "kid": k1["kid"], "typ": "JWT"})
            .to_string()
            .as_bytes()),
        p[1]
    );
    assert_invalid_client(&s.token_request(&none, "system/Patient.rs"), "alg none");
    // Tampered assertion signature.
    let mut sig = unb64(p[2]);
    sig[10] ^= 0x80;
    let t = format!("{}.{}.{}", p[0], p[1], b64(&sig));
    assert_invalid_client(
        &s.token_request(&t, "system/Patient.rs"),
        "tampered signature",
    );
    // The genuine assertion was never consumed by the failures above.
    assert_status(
        &s.token_request(&genuine, "system/Patient.rs"),
        200,
        "genuine",
    );

    // Unsupported grant type.
    let form = format!(
        "grant_type=password&client_assertion_type={}&client_assertion={}&scope=system%2FPatient.rs",
        "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer",
        s.assertion(&c1, &url, &rand_hex())
    );
    let r = s.send(
        "POST",
        &url,
        None,
        Some(("application/x-www-form-urlencoded", form.into_bytes())),
        &[],
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(oauth_error(&r), "unsupported_grant_type");

    // Asking for more than registered: narrowed to what is registered, never broader.
    let a = s.assertion(&c1, &url, &rand_hex());
    let r = s.token_request(&a, "system/*.cruds");
    match r.status {
        200 => {
            let j = r.json();
            assert_eq!(j["scope"], "system/Patient.rs", "{j}");
            let tok = j["access_token"].as_str().expect("token");
            assert_eq!(payload(tok)["scope"], "system/Patient.rs");
            assert_eq!(payload(tok)["client_id"], id1);
            assert!(payload(tok)["exp"].as_u64().expect("exp") <= now() + 300);
            assert_status(&s.post("Patient", tok, &patient()), 403, "narrowed token");
        }
        400 => assert_eq!(oauth_error(&r), "invalid_scope"),
        other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
    }
    let a = s.assertion(&c1, &url, &rand_hex());
    let r = s.token_request(&a, "system/Observation.rs");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(oauth_error(&r), "invalid_scope");
    let a = s.assertion(&c1, &url, &rand_hex());
    let r = s.token_request(&a, "patient/Patient.rs");
    assert_eq!(
        oauth_error(&r),
        "invalid_scope",
        "patient/ scope for a system client"
    );
    // No refresh token is ever issued; the lifetime is at most 5 minutes.
    let a = s.assertion(&c1, &url, &rand_hex());
    let r = s.token_request(&a, "system/Patient.rs");
    assert_status(&r, 200, "token");
    let j = r.json();
    assert!(j.get("refresh_token").is_none(), "{j}");
    assert!(j["expires_in"].as_u64().expect("expires_in") <= 300);
    assert_eq!(r.header("cache-control"), Some("no-store"));

    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}

#[test]
fn public_routes_are_open_everything_else_needs_a_token() {
    let s = Server::start();
    for path in [
        "/fhir/metadata",
        "/.well-known/smart-configuration",
        "/.well-known/jwks.json",
    ] {
        let r = s.send("GET", &format!("{}{path}", s.origin), None, None, &[]);
        assert_status(&r, 200, path);
        assert!(r.json().is_object(), "{path}: not JSON");
    }
    let cases: &[(&str, &str)] = &[
        ("GET", "/fhir/Patient/1"),
        ("GET", "/fhir/Patient/1/_history"),
        ("GET", "/fhir/Patient/1/_history/1"),
        ("GET", "/fhir/Patient/_history"),
        ("PUT", "/fhir/Patient/1"),
        ("DELETE", "/fhir/Patient/1"),
        ("POST", "/fhir/Patient"),
        ("POST", "/fhir"),
        ("GET", "/fhir/Foo/1"),
        ("POST", "/fhir/Foo"),
        ("GET", "/admin"),
        ("GET", "/"),
        ("GET", "/fhir/Patient/1/_history/1/extra"),
        ("GET", "/auth/introspect"),
        // sharing: making, listing, revoking links and every export route need a token
        // (a link's own URLs are its credential: `sharing.rs`)
        ("POST", "/shl/links"),
        ("GET", "/shl/links"),
        ("DELETE", "/shl/links/0123456789abcdef0123456789abcdef"),
        (
            "POST",
            "/shl/links/0123456789abcdef0123456789abcdef/content",
        ),
        ("GET", "/fhir/$export"),
        ("GET", "/fhir/Patient/$export"),
        ("GET", "/fhir/Group/1/$export"),
        ("GET", "/bulk/0123456789abcdef0123456789abcdef"),
        ("DELETE", "/bulk/0123456789abcdef0123456789abcdef"),
        ("GET", "/bulk/0123456789abcdef0123456789abcdef/file/0"),
    ];
    for (method, path) in cases {
        let body = match *method {
            "PUT" | "POST" => Some(("application/fhir+json", patient().to_string().into_bytes())),
            _ => None,
        };
        let r = s.send(method, &format!("{}{path}", s.origin), None, body, &[]);
        assert_401(&r, &format!("{method} {path}"));
    }
    let events = audit_events(&s);
    assert!(audited_with_status(&events, 401).len() >= cases.len());
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}

#[test]
fn wrong_method_on_a_protected_route_needs_a_token_first() {
    // Route existence must not be revealed to callers without a token: a method the route
    // does not serve is still answered 401 when no token is presented (and audited).
    let s = Server::start();
    let mut wrong = Vec::new();
    for (method, path) in [
        ("GET", "/fhir"),
        ("GET", "/fhir/Patient"),
        ("PATCH", "/fhir/Patient/1"),
        ("DELETE", "/fhir/Patient"),
        ("POST", "/fhir/Patient/1"),
    ] {
        let r = s.send(method, &format!("{}{path}", s.origin), None, None, &[]);
        if r.status != 401 {
            wrong.push(format!("{method} {path} -> {}", r.status));
        }
    }
    assert!(
        wrong.is_empty(),
        "answered without authentication: {wrong:?}"
    );
}

/// A back-end client (SMART Backend Services) acts with system/ scopes only: `client add`
/// refuses patient/, user/ and identity scopes, naming the scope, and a client whose
/// record holds them from before (written here straight into the store) gets a token with
/// its system/ scopes only.
#[test]
fn back_end_clients_are_registered_and_granted_system_scopes_only() {
    let s = Server::start();
    let add = |scope: &str| {
        let out = s.tmp.path().join(format!("creds-{}.json", rand_hex()));
        let o = std::process::Command::new(BIN)
            .args(["client", "add", "--data-dir"])
            .arg(&s.data)
            .args(["--name", "backend", "--scope", scope, "--out"])
            .arg(&out)
            .output()
            .expect("client add");
        (o, out)
    };
    for (scope, named) in [
        ("patient/*.rs", "patient/*.rs"),
        ("user/Observation.rs", "user/Observation.rs"),
        (
            "system/*.rs patient/Observation.read",
            "patient/Observation.rs",
        ),
        ("system/*.rs openid", "openid"),
    ] {
        let (o, out) = add(scope);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{scope}: accepted");
        assert!(
            err.contains(&format!("refusing --scope {named}")),
            "{scope}: {err}"
        );
        assert!(err.contains("system/ scopes only"), "{scope}: {err}");
        assert!(!out.exists(), "{scope}: no credentials written");
    }
    let creds = s.add_client("system/*.rs");
    let tok = s.token_for(&creds, "system/*.rs");
    assert_eq!(payload(&tok)["scope"], "system/*.rs");

    // a record edited in the database (patient/, user/ and openid scopes beside system/)
    // carries no valid MAC: the client is refused as unknown, whatever scopes it asks for
    // (records from before the refusal were adopted with MACs on upgrade; their scopes are
    // cut to system/ ones: `phivault_auth`'s unit tests)
    let db = rusqlite::Connection::open(s.db_path()).expect("db");
    db.busy_timeout(std::time::Duration::from_secs(10))
        .expect("busy timeout");
    let key = format!("client:{}", creds.client_id);
    let raw: Vec<u8> = db
        .query_row("SELECT v FROM meta WHERE k = ?1", [&key], |r| r.get(0))
        .expect("client record");
    let mut record: Value = serde_json::from_slice(&raw).expect("record json");
    record["scopes"] = json!("system/*.rs patient/*.rs user/Observation.rs openid");
    db.execute(
        "UPDATE meta SET v = ?1 WHERE k = ?2",
        rusqlite::params![serde_json::to_vec(&record).expect("json"), key],
    )
    .expect("update");
    drop(db);
    let url = s.token_url();
    for scope in [
        "system/*.rs",
        "system/*.rs patient/*.rs user/Observation.rs openid",
    ] {
        let a = s.assertion(&creds, &url, &rand_hex());
        let r = s.token_request(&a, scope);
        assert_eq!(
            r.status,
            401,
            "{scope}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(oauth_error(&r), "invalid_client", "{scope}");
    }
}
