//! SMART Backend Services client authentication: `private_key_jwt` (SM3).
//!
//! Every failure is `invalid_client`, naming its [`TokenFailure`]: the `error_description`
//! the client reads and the reason code the audit keeps come from that one table.
//!
//! # The order of the checks, and what a refusal tells
//!
//! An unauthenticated caller must not learn from a refusal whether a client id is
//! registered. So the checks fall in two groups:
//!
//! 1. **What the request says about itself**, before any client is looked up, each with its
//!    exact reason: strict JWS parse (length, structure, refused header parameters); `alg`
//!    ∈ {ES384, RS384}; `kid` present; `iss` a possible client id and equal to the
//!    `client_id` parameter when one is sent; `sub` = `iss`; `aud` is the token URL; `exp`
//!    present, in the future and at most five minutes (plus [`EXP_LEEWAY`]) ahead;
//!    `iat`/`nbf`, if present, not more than [`CLOCK_LEEWAY`] in the future; `jti` present.
//!    These read the claims before the signature is checked, which is sound: the verified
//!    claims are these very bytes, and a claim check can only refuse, never admit. Saying
//!    exactly why reveals nothing the caller did not send, except the server's clock and
//!    token URL, which are public.
//! 2. **What the server holds**, after the lookup. An unknown client id, an unknown `kid`
//!    of a registered client, a key of another type than `alg`, and a signature that does
//!    not verify all get the same description ("no registered key with the client
//!    assertion's iss and kid verifies it"), so a caller probing client ids learns nothing:
//!    `kid`s are predictable (`{client_id}-1`), so naming a bad signature would confirm
//!    that a guessed or leaked client id is registered. A disabled client reads the same
//!    unless its signature verifies: only someone holding its key learns "the client is
//!    disabled". Last, the `jti` replay cache, consulted only after the signature has
//!    verified, so nobody can fill it with forged assertions or learn which `jti`s were used.
//!
//! The audit keeps the precise reason code (`unknown-client`, `unknown-kid`,
//! `client-disabled-unverified`, …): auditors may know which clients exist. The times the
//! checks take are not equalised: a refusal after a signature check takes longer than one
//! before it.

use crate::claims;
use crate::error::{AuthError, OAuthError, TokenFailure};
use crate::jwk::PublicJwk;
use crate::jws::{Alg, Jws, JwsError};
use crate::scope::ScopeSet;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Algorithms accepted for client assertions.
pub const CLIENT_ASSERTION_ALGS: &[Alg] = &[Alg::ES384, Alg::RS384];
/// Maximum assertion lifetime (`exp - now`), SM3.
pub const MAX_ASSERTION_LIFETIME: u64 = 300;
/// Tolerance on the five-minute `exp` limit for clock skew.
pub const EXP_LEEWAY: u64 = 30;
/// Tolerance for `iat`/`nbf` in the future.
pub const CLOCK_LEEWAY: u64 = 60;
/// Maximum length of a client id or `jti`.
pub const MAX_ID_LEN: usize = 256;

/// A registered backend client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The client id (`iss`/`sub` of its assertions).
    pub client_id: String,
    /// Human-readable name.
    pub name: String,
    /// Its public keys (JWK JSON), each with a distinct `kid`.
    pub jwks: Vec<PublicJwk>,
    /// The scopes it may be granted (the most any token of it can carry).
    pub scopes: ScopeSet,
    /// Disabled clients cannot authenticate.
    pub disabled: bool,
    /// A public EC key (JWK, P-256 or P-384) its bulk exports are encrypted to end to end
    /// (JWE `ECDH-ES` + `A256GCM`); never used to check its assertions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_key: Option<serde_json::Value>,
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

impl ClientRecord {
    /// Registration-time checks: printable client id, at least one key, unique `kid`s, and
    /// every key usable for ES384 or RS384. Call before storing a record.
    pub fn validate(&self) -> Result<(), AuthError> {
        if !valid_id(&self.client_id) {
            return Err(AuthError::Config(
                "client_id must be 1-256 printable ASCII characters",
            ));
        }
        if self.jwks.is_empty() {
            return Err(AuthError::Config("client has no keys"));
        }
        let mut kids = HashSet::new();
        for k in &self.jwks {
            if !kids.insert(k.kid()) {
                return Err(AuthError::Config("duplicate kid in client keys"));
            }
            if !CLIENT_ASSERTION_ALGS.iter().any(|a| k.permits(*a)) {
                return Err(AuthError::Config("client keys must be EC P-384 or RSA"));
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct ReplayInner {
    seen: HashMap<(String, String), u64>,
    by_exp: BTreeSet<(u64, String, String)>,
}

impl ReplayInner {
    fn purge(&mut self, now: u64) {
        while let Some(first) = self.by_exp.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, c, j)) = self.by_exp.pop_first() {
                self.seen.remove(&(c, j));
            }
        }
    }
}

/// Bounded replay cache for assertion `jti`s, keyed by (client id, jti), each kept until
/// its assertion's `exp`. When full of unexpired entries it refuses new ones (fail
/// closed) rather than forgetting one that could then be replayed.
pub struct ReplayCache {
    inner: Mutex<ReplayInner>,
    capacity: usize,
    /// Records shared with the other nodes (then nothing is kept in memory).
    shared: Option<std::sync::Arc<dyn crate::SharedSeen>>,
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Default for ReplayCache {
    fn default() -> Self {
        ReplayCache::new(ReplayCache::DEFAULT_CAPACITY)
    }
}

impl ReplayCache {
    /// Default capacity: 100 000 entries (≈ 330 assertions/s sustained over 5 minutes).
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// A cache holding at most `capacity` unexpired entries.
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            inner: Mutex::new(ReplayInner::default()),
            capacity: capacity.max(1),
            shared: None,
        }
    }

    /// A cache whose records all nodes of a deployment share.
    pub fn shared(records: std::sync::Arc<dyn crate::SharedSeen>) -> ReplayCache {
        ReplayCache {
            shared: Some(records),
            ..ReplayCache::default()
        }
    }

    /// Records (client_id, jti) until `expires_at`. `Err` if it was already seen
    /// ([`TokenFailure::JtiReplayed`]) or the cache is full
    /// ([`TokenFailure::ReplayCacheFull`]).
    pub fn check_and_insert(
        &self,
        client_id: &str,
        jti: &str,
        expires_at: u64,
        now: u64,
    ) -> Result<(), TokenFailure> {
        if let Some(shared) = &self.shared {
            let mut c = ring::digest::Context::new(&ring::digest::SHA256);
            c.update(client_id.as_bytes());
            c.update(&[0]);
            c.update(jti.as_bytes());
            let key = c.finish();
            return match shared.first_time(
                "assertion",
                key.as_ref(),
                expires_at.saturating_mul(1000),
            ) {
                Ok(true) => Ok(()),
                Ok(false) => Err(TokenFailure::JtiReplayed),
                // (unreachable records refuse: fail closed; the store's side logs why)
                Err(_) => Err(TokenFailure::ReplayCacheFull),
            };
        }
        let mut g = self.inner.lock();
        g.purge(now);
        let key = (client_id.to_owned(), jti.to_owned());
        if g.seen.contains_key(&key) {
            return Err(TokenFailure::JtiReplayed);
        }
        if g.seen.len() >= self.capacity {
            return Err(TokenFailure::ReplayCacheFull);
        }
        g.by_exp.insert((expires_at, key.0.clone(), key.1.clone()));
        g.seen.insert(key, expires_at);
        Ok(())
    }

    /// Number of entries held (including any not yet purged).
    pub fn len(&self) -> usize {
        self.inner.lock().seen.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Verifies a client assertion (RFC 7523 `private_key_jwt`, SMART Backend Services) and
/// returns the authenticated client's record. See the module documentation for the checks
/// and their order; every error is an [`OAuthError::Refused`] with `invalid_client`.
pub fn verify_client_assertion(
    assertion: &str,
    expected_client_id: Option<&str>,
    lookup: &dyn Fn(&str) -> Option<ClientRecord>,
    token_url: &str,
    now: u64,
    replay: &ReplayCache,
) -> Result<ClientRecord, OAuthError> {
    use TokenFailure as F;
    // 1. what the request says about itself: exact reasons
    let jws = Jws::parse(assertion).map_err(|e| match e {
        JwsError::TooLong => F::AssertionTooLong,
        JwsError::UnsupportedAlgorithm => F::AlgNotAllowed,
        JwsError::ForbiddenHeader => F::HeaderForbidden,
        _ => F::AssertionMalformed,
    })?;
    if !CLIENT_ASSERTION_ALGS.contains(&jws.alg()) {
        return Err(F::AlgNotAllowed.into());
    }
    let kid = jws.kid().ok_or(F::KidMissing)?;
    let claims = jws.unverified_claims();
    let client_id = claims::string(claims, "iss")
        .filter(|iss| valid_id(iss))
        .ok_or(F::IssInvalid)?;
    if expected_client_id.is_some_and(|e| e != client_id) {
        return Err(F::ClientIdMismatch.into());
    }
    if claims::string(claims, "sub") != Some(client_id) {
        return Err(F::IssSubMismatch.into());
    }
    if !claims::audience_contains(claims, token_url) {
        return Err(F::AudMismatch.into());
    }
    let exp = claims::numeric_date(claims, "exp")
        .ok()
        .flatten()
        .ok_or(F::ExpMissing)?;
    if exp <= now {
        return Err(F::AssertionExpired.into());
    }
    if exp > now.saturating_add(MAX_ASSERTION_LIFETIME + EXP_LEEWAY) {
        return Err(F::ExpTooFar.into());
    }
    for k in ["iat", "nbf"] {
        let v = claims::numeric_date(claims, k).map_err(|()| F::IatNbfInvalid)?;
        if v.is_some_and(|t| t > now.saturating_add(CLOCK_LEEWAY)) {
            return Err(F::IatNbfInFuture.into());
        }
    }
    let jti = claims::string(claims, "jti")
        .filter(|j| !j.is_empty() && j.len() <= MAX_ID_LEN)
        .ok_or(F::JtiMissing)?;

    // 2. what the server holds: an unknown client, an unknown kid, a key that does not fit,
    // a bad signature and a disabled client whose signature does not verify all read the
    // same (the codes differ, for the audit only)
    let record = lookup(client_id)
        .filter(|r| r.client_id == client_id)
        .ok_or(F::UnknownClient)?;
    let key = record
        .jwks
        .iter()
        .find(|k| k.kid() == kid)
        .ok_or(F::UnknownKid)?;
    match jws.verify(key, CLIENT_ASSERTION_ALGS) {
        Ok(_) => {}
        Err(_) if record.disabled => return Err(F::DisabledUnverified.into()),
        Err(JwsError::BadSignature) => return Err(F::SignatureInvalid.into()),
        Err(JwsError::KeyMismatch) => return Err(F::AlgKeyMismatch.into()),
        Err(_) => return Err(F::AlgNotAllowed.into()),
    }
    // the caller holds the client's key from here on
    if record.disabled {
        return Err(F::ClientDisabled.into());
    }
    replay.check_and_insert(client_id, jti, exp, now)?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;
    use serde_json::json;

    fn verify(
        t: &TestClient,
        assertion: &str,
        replay: &ReplayCache,
    ) -> Result<ClientRecord, OAuthError> {
        verify_client_assertion(assertion, None, &|id| t.lookup(id), TOKEN_URL, NOW, replay)
    }

    /// The reason code of a refusal ("accepted" when there is none).
    fn reason(r: Result<ClientRecord, OAuthError>) -> &'static str {
        match r {
            Ok(_) => "accepted",
            Err(OAuthError::Refused(f)) if f.error() == "invalid_client" => f.code(),
            Err(_) => "wrong error kind",
        }
    }

    #[test]
    fn es384_and_rs384_accepted() {
        let t = TestClient::new();
        let replay = ReplayCache::default();
        let rec = verify(&t, &t.es384(&t.claims()), &replay).expect("es384");
        assert_eq!(rec.client_id, CLIENT_ID);
        let rec = verify(&t, &t.rs384(&t.claims()), &replay).expect("rs384");
        assert_eq!(rec.client_id, CLIENT_ID);
        // explicit client_id form parameter
        let a = t.es384(&t.claims());
        verify_client_assertion(
            &a,
            Some(CLIENT_ID),
            &|id| t.lookup(id),
            TOKEN_URL,
            NOW,
            &replay,
        )
        .expect("with client_id");
        // aud as an array
        let mut c = t.claims();
        c["aud"] = json!(["https://other", TOKEN_URL]);
        verify(&t, &t.es384(&c), &replay).expect("aud array");
    }

    #[test]
    fn alg_none_and_unsupported_rejected() {
        let t = TestClient::new();
        let r = ReplayCache::default();
        let c = t.claims();
        // alg none with an empty signature: malformed; with any signature: unsupported
        assert_eq!(
            reason(verify(
                &t,
                &unsigned(&json!({"alg": "none", "kid": ES_KID}), &c),
                &r
            )),
            "assertion-malformed"
        );
        let none_sig = format!(
            "{}AAAA",
            unsigned(&json!({"alg": "none", "kid": ES_KID}), &c)
        );
        assert_eq!(reason(verify(&t, &none_sig, &r)), "alg-not-allowed");
        assert_eq!(
            reason(verify(&t, &t.hs256_with_public_key(&c), &r)),
            "alg-not-allowed"
        );
        // RS256 and EdDSA are supported by the JWS layer (identity providers, our own
        // tokens) but not allowed for client assertions (SM3: ES384 and RS384)
        assert_eq!(reason(verify(&t, &t.rs256(&c), &r)), "alg-not-allowed");
        assert_eq!(reason(verify(&t, &t.eddsa(&c), &r)), "alg-not-allowed");
    }

    #[test]
    fn kid_rules() {
        let t = TestClient::new();
        let r = ReplayCache::default();
        let c = t.claims();
        assert_eq!(
            reason(verify(
                &t,
                &t.es384_header(&json!({"alg": "ES384"}), &c),
                &r
            )),
            "kid-missing"
        );
        assert_eq!(
            reason(verify(
                &t,
                &t.es384_header(&json!({"alg": "ES384", "kid": "nope"}), &c),
                &r
            )),
            "unknown-kid"
        );
        // ES384 signature presented under the RSA key's kid
        assert_eq!(
            reason(verify(
                &t,
                &t.es384_header(&json!({"alg": "ES384", "kid": RS_KID}), &c),
                &r
            )),
            "alg-key-mismatch"
        );
    }

    #[test]
    fn issuer_subject_audience() {
        let t = TestClient::new();
        let r = ReplayCache::default();
        let mut c = t.claims();
        c["iss"] = json!("someone-else");
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "iss-sub-mismatch");
        c["sub"] = json!("someone-else");
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "unknown-client");
        let mut c = t.claims();
        c.as_object_mut().map(|m| m.remove("iss"));
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "iss-invalid");
        let mut c = t.claims();
        c["iss"] = json!("two words");
        c["sub"] = json!("two words");
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "iss-invalid");
        let mut c = t.claims();
        c["sub"] = json!("someone-else");
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "iss-sub-mismatch");
        let mut c = t.claims();
        c.as_object_mut().map(|m| m.remove("sub"));
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "iss-sub-mismatch");
        let mut c = t.claims();
        c["aud"] = json!("https://evil.example/token");
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "aud-mismatch");
        // client_id form parameter disagrees with iss
        let a = t.es384(&t.claims());
        let res =
            verify_client_assertion(&a, Some("other"), &|id| t.lookup(id), TOKEN_URL, NOW, &r);
        assert_eq!(reason(res), "client-id-mismatch");
        // disabled client: named only to whoever holds its key
        let mut d = TestClient::new();
        d.record.disabled = true;
        assert_eq!(
            reason(verify(&d, &d.es384(&d.claims()), &r)),
            "client-disabled"
        );
        assert_eq!(
            reason(verify(&d, &tamper_signature(&d.es384(&d.claims())), &r)),
            "client-disabled-unverified"
        );
        assert_eq!(
            reason(verify(
                &d,
                &d.es384_header(&json!({"alg": "ES384", "kid": RS_KID}), &d.claims()),
                &r
            )),
            "client-disabled-unverified"
        );
        assert_eq!(
            reason(verify(
                &d,
                &d.es384_header(&json!({"alg": "ES384", "kid": "nope"}), &d.claims()),
                &r
            )),
            "unknown-kid"
        );
    }

    #[test]
    fn times() {
        let t = TestClient::new();
        let r = ReplayCache::default();
        let mut c = t.claims();
        c["exp"] = json!(NOW - 1);
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "assertion-expired");
        c["exp"] = json!(NOW);
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "assertion-expired");
        c["exp"] = json!(NOW + 400);
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "exp-too-far");
        c["exp"] = json!(NOW + MAX_ASSERTION_LIFETIME + EXP_LEEWAY + 1);
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "exp-too-far");
        c["exp"] = json!("soon");
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "exp-missing");
        c.as_object_mut().map(|m| m.remove("exp"));
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "exp-missing");
        let mut c = t.claims();
        c["iat"] = json!(NOW + CLOCK_LEEWAY + 1);
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "iat-nbf-in-future");
        let mut c = t.claims();
        c["nbf"] = json!(NOW + 3600);
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "iat-nbf-in-future");
        let mut c = t.claims();
        c["nbf"] = json!("now");
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "iat-nbf-invalid");
        let mut c = t.claims();
        c["iat"] = json!(NOW + 30);
        verify(&t, &t.es384(&c), &r).expect("small skew accepted");
    }

    #[test]
    fn replay_rejected_after_signature() {
        let t = TestClient::new();
        let r = ReplayCache::default();
        let a = t.es384(&t.claims());
        verify(&t, &a, &r).expect("first");
        assert_eq!(reason(verify(&t, &a, &r)), "jti-replayed");
        // a forged assertion reusing a fresh jti does not burn it
        let c = t.claims();
        let forged = tamper_signature(&t.es384(&c));
        assert_eq!(reason(verify(&t, &forged, &r)), "signature-invalid");
        verify(&t, &t.es384(&c), &r).expect("jti still fresh");
        // jti missing
        let mut c = t.claims();
        c.as_object_mut().map(|m| m.remove("jti"));
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "jti-missing");
    }

    #[test]
    fn tampering_and_malformed() {
        let t = TestClient::new();
        let r = ReplayCache::default();
        let a = t.es384(&t.claims());
        assert_eq!(
            reason(verify(&t, &tamper_payload(&a), &r)),
            "signature-invalid"
        );
        assert_eq!(
            reason(verify(&t, &tamper_signature(&a), &r)),
            "signature-invalid"
        );
        let rs = t.rs384(&t.claims());
        assert_eq!(
            reason(verify(&t, &tamper_payload(&rs), &r)),
            "signature-invalid"
        );
        assert_eq!(
            reason(verify(&t, &tamper_signature(&rs), &r)),
            "signature-invalid"
        );
        assert_eq!(
            reason(verify(&t, "not!base64.x.y", &r)),
            "assertion-malformed"
        );
        assert_eq!(
            reason(verify(&t, &format!("{a}.extra"), &r)),
            "assertion-malformed"
        );
        assert_eq!(reason(verify(&t, "", &r)), "assertion-malformed");
        let mut c = t.claims();
        c["pad"] = json!("x".repeat(9000));
        assert_eq!(reason(verify(&t, &t.es384(&c), &r)), "assertion-too-long");
        let h = json!({"alg": "ES384", "kid": ES_KID, "jku": "https://evil/jwks"});
        assert_eq!(
            reason(verify(&t, &t.es384_header(&h, &t.claims()), &r)),
            "header-forbidden"
        );
    }

    /// The body names the check but echoes nothing of the request.
    #[test]
    fn errors_name_the_check_and_echo_nothing() {
        let t = TestClient::new();
        let r = ReplayCache::default();
        let a = t.es384(&t.claims());
        let e = verify(&t, &tamper_signature(&a), &r).expect_err("error");
        let shown = format!("{e} {}", e.to_json());
        assert_eq!(
            e.to_json()["error_description"],
            "no registered key with the client assertion's iss and kid verifies it"
        );
        assert!(!shown.contains(&a[..30]));
        assert!(!shown.contains(CLIENT_ID));
        assert!(!shown.contains(ES_KID));
        assert_eq!(e.http_status(), 401);
    }

    /// An unknown client id and an unknown kid of a registered client get the same body;
    /// checks on the request itself come first and say exactly why, whoever the iss.
    #[test]
    fn client_existence_does_not_show() {
        let t = TestClient::new();
        let r = ReplayCache::default();
        let mut c = t.claims();
        c["iss"] = json!("no-such-client");
        c["sub"] = json!("no-such-client");
        let unknown_client = verify(&t, &t.es384(&c), &r).expect_err("unknown client");
        let unknown_kid = verify(
            &t,
            &t.es384_header(&json!({"alg": "ES384", "kid": "nope"}), &t.claims()),
            &r,
        )
        .expect_err("unknown kid");
        assert_eq!(unknown_client.to_json(), unknown_kid.to_json());
        assert_eq!(unknown_client.to_string(), unknown_kid.to_string());
        assert_ne!(unknown_client.reason(), unknown_kid.reason());
        // before the lookup: the same reason for a registered and an unknown iss
        for (claim, value, want) in [
            ("exp", json!(NOW - 1), "assertion-expired"),
            ("aud", json!("https://other.example/token"), "aud-mismatch"),
            ("iat", json!(NOW + 3600), "iat-nbf-in-future"),
            ("exp", json!(NOW + 3600), "exp-too-far"),
        ] {
            for iss in [CLIENT_ID, "no-such-client"] {
                let mut c = t.claims();
                c["iss"] = json!(iss);
                c["sub"] = json!(iss);
                c[claim] = value.clone();
                assert_eq!(reason(verify(&t, &t.es384(&c), &r)), want, "{claim} {iss}");
            }
        }
    }

    #[test]
    fn replay_cache_bounds() {
        let c = ReplayCache::new(2);
        assert!(c.check_and_insert("a", "1", 10, 0).is_ok());
        assert!(c.check_and_insert("a", "1", 10, 0).is_err());
        assert!(
            c.check_and_insert("b", "1", 10, 0).is_ok(),
            "keyed per client"
        );
        assert_eq!(
            c.check_and_insert("a", "2", 10, 0),
            Err(TokenFailure::ReplayCacheFull)
        );
        // after expiry entries are evicted
        assert!(c.check_and_insert("a", "2", 20, 10).is_ok());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn client_record_serde_and_validate() {
        let t = TestClient::new();
        // the fixture also registers an Ed25519 key, which registration refuses
        assert!(t.record.validate().is_err());
        let mut ok = t.record.clone();
        ok.jwks.retain(|k| k.kty() != "OKP");
        ok.validate().expect("valid");
        let j = serde_json::to_string(&t.record).expect("ser");
        let back: ClientRecord = serde_json::from_str(&j).expect("de");
        assert_eq!(back, t.record);
        let mut dup = t.record.clone();
        dup.jwks.push(dup.jwks[0].clone());
        assert!(dup.validate().is_err());
        let mut none = t.record.clone();
        none.jwks.clear();
        assert!(none.validate().is_err());
    }
}
