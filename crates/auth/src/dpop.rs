//! DPoP proofs (RFC 9449): sender-constrained tokens for public clients.
//!
//! A DPoP proof is a JWS the client signs with a key it keeps, carrying that key's public
//! half in its header. [`verify_proof`] checks one strictly (§4.3):
//! * exactly one proof, a compact JWS of at most [`crate::MAX_JWS_LEN`] bytes;
//! * `typ` is `dpop+jwt`; `alg` is asymmetric and one of [`DPOP_ALGS`]; `jwk` is a public
//!   key (no private members) of the matching type, and the signature verifies with it;
//! * `jti` is present (≤ 128 bytes), `htm` is the request's method, `htu` the request's
//!   URI without query and fragment, `iat` within [`MAX_AGE_SECONDS`] in the past and
//!   [`MAX_FUTURE_SECONDS`] in the future;
//! * with an access token, `ath` is the base64url SHA-256 of it.
//!
//! The caller records (`jkt`, `jti`) until [`DpopProof::replay_until`] and refuses a proof
//! seen before, and compares `jkt` (the RFC 7638 thumbprint) with the token's `cnf.jkt`.

use subtle::ConstantTimeEq as _;

use crate::claims;
use crate::jwk::PublicJwk;
use crate::jws::{Alg, Jws, JwsError};

/// Algorithms accepted for proofs.
pub const DPOP_ALGS: &[Alg] = &[Alg::ES256, Alg::ES384, Alg::EdDSA];
/// Oldest accepted `iat`, seconds before now.
pub const MAX_AGE_SECONDS: u64 = 120;
/// Newest accepted `iat`, seconds after now (clock skew).
pub const MAX_FUTURE_SECONDS: u64 = 30;
const MAX_JTI_LEN: usize = 128;

/// Why a proof is refused (a fixed reason, for logs; the client sees
/// `invalid_dpop_proof`).
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error("invalid DPoP proof: {0}")]
pub struct DpopError(pub &'static str);

/// A verified proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpopProof {
    /// The proof key's JWK SHA-256 thumbprint (what `cnf.jkt` binds a token to).
    pub jkt: String,
    /// The proof's unique id.
    pub jti: String,
    /// Until when the proof would be accepted (replay records can go after that).
    pub replay_until: u64,
}

/// Proofs seen, until they could no longer be accepted: 24 bytes per proof (a 16-byte
/// digest of key thumbprint and `jti`, and the expiry), so a million fit in some 50 MB —
/// ~6,600 DPoP requests/s sustained over the acceptance window before it is full (and
/// fails closed).
pub struct ProofCache {
    inner: parking_lot::Mutex<ProofInner>,
    capacity: usize,
    /// Records shared with the other nodes (then nothing is kept in memory).
    shared: Option<std::sync::Arc<dyn crate::SharedSeen>>,
}

#[derive(Default)]
struct ProofInner {
    seen: std::collections::HashMap<[u8; 16], u64>,
    /// Insertion order with expiry (expiries rise with insertion, give or take the skew).
    order: std::collections::VecDeque<(u64, [u8; 16])>,
}

impl Default for ProofCache {
    fn default() -> Self {
        ProofCache::new(ProofCache::DEFAULT_CAPACITY)
    }
}

impl std::fmt::Debug for ProofCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl ProofCache {
    /// Default capacity: a million proofs.
    pub const DEFAULT_CAPACITY: usize = 1_000_000;

    /// A cache of at most `capacity` live proofs.
    pub fn new(capacity: usize) -> Self {
        ProofCache {
            inner: parking_lot::Mutex::new(ProofInner::default()),
            capacity: capacity.max(1),
            shared: None,
        }
    }

    /// A cache whose records all nodes of a deployment share.
    pub fn shared(records: std::sync::Arc<dyn crate::SharedSeen>) -> Self {
        ProofCache {
            shared: Some(records),
            ..ProofCache::default()
        }
    }

    /// Record `proof` at `now`; `Err` if it was seen before (a replay) or the cache is full.
    pub fn check_and_insert(&self, proof: &DpopProof, now: u64) -> Result<(), &'static str> {
        let mut c = ring::digest::Context::new(&ring::digest::SHA256);
        c.update(proof.jkt.as_bytes());
        c.update(&[0]);
        c.update(proof.jti.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&c.finish().as_ref()[..16]);
        if let Some(shared) = &self.shared {
            return match shared.first_time("dpop", &key, proof.replay_until.saturating_mul(1000)) {
                Ok(true) => Ok(()),
                Ok(false) => Err("DPoP proof replayed"),
                // (unreachable records refuse: fail closed; the store's side logs why)
                Err(_) => Err("DPoP replay records unavailable"),
            };
        }
        let mut g = self.inner.lock();
        while let Some(&(exp, k)) = g.order.front() {
            if exp > now {
                break;
            }
            g.order.pop_front();
            if g.seen.get(&k) == Some(&exp) {
                g.seen.remove(&k);
            }
        }
        if g.seen.contains_key(&key) {
            return Err("DPoP proof replayed");
        }
        if g.seen.len() >= self.capacity {
            return Err("DPoP replay cache full");
        }
        g.seen.insert(key, proof.replay_until);
        g.order.push_back((proof.replay_until, key));
        Ok(())
    }
}

/// The `ath` value for `access_token`: base64url SHA-256.
pub fn access_token_hash(access_token: &str) -> String {
    crate::b64::encode(
        ring::digest::digest(&ring::digest::SHA256, access_token.as_bytes()).as_ref(),
    )
}

/// `uri` without query and fragment, its scheme and host lower-cased (RFC 9449 §4.3
/// compares the target URI so).
fn normalise_htu(uri: &str) -> Option<String> {
    let end = uri.find(['?', '#']).unwrap_or(uri.len());
    let uri = &uri[..end];
    let (scheme, rest) = uri.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return None;
    }
    Some(format!(
        "{}://{}{}",
        scheme.to_ascii_lowercase(),
        authority.to_ascii_lowercase(),
        path
    ))
}

/// Verify the DPoP proof `proof` for a request `method` `uri` at Unix time `now`, bound to
/// `access_token` when one is presented with it.
pub fn verify_proof(
    proof: &str,
    method: &str,
    uri: &str,
    now: u64,
    access_token: Option<&str>,
) -> Result<DpopProof, DpopError> {
    let (jws, jwk) = Jws::parse_with_jwk(proof).map_err(|e| match e {
        JwsError::UnsupportedAlgorithm => DpopError("algorithm unsupported"),
        JwsError::ForbiddenHeader => DpopError("forbidden header parameter"),
        _ => DpopError("malformed"),
    })?;
    if jws.typ() != Some("dpop+jwt") {
        return Err(DpopError("typ is not dpop+jwt"));
    }
    if !DPOP_ALGS.contains(&jws.alg()) {
        return Err(DpopError("algorithm not allowed"));
    }
    let key = PublicJwk::from_embedded(&jwk).map_err(|_| DpopError("jwk invalid"))?;
    let c = jws
        .verify(&key, DPOP_ALGS)
        .map_err(|_| DpopError("signature does not verify with its jwk"))?;
    let jti = claims::string(c, "jti")
        .filter(|j| !j.is_empty() && j.len() <= MAX_JTI_LEN)
        .ok_or(DpopError("jti missing"))?;
    if claims::string(c, "htm") != Some(method) {
        return Err(DpopError("htm does not match the request"));
    }
    let htu = claims::string(c, "htu").ok_or(DpopError("htu missing"))?;
    match (normalise_htu(htu), normalise_htu(uri)) {
        (Some(a), Some(b)) if a == b => {}
        _ => return Err(DpopError("htu does not match the request")),
    }
    let iat = claims::numeric_date(c, "iat")
        .ok()
        .flatten()
        .ok_or(DpopError("iat missing"))?;
    if iat.saturating_add(MAX_AGE_SECONDS) < now || iat > now.saturating_add(MAX_FUTURE_SECONDS) {
        return Err(DpopError("iat outside the accepted window"));
    }
    match (access_token, claims::string(c, "ath")) {
        (Some(t), Some(ath)) if ath.as_bytes().ct_eq(access_token_hash(t).as_bytes()).into() => {}
        (Some(_), _) => return Err(DpopError("ath does not match the access token")),
        (None, _) => {}
    }
    Ok(DpopProof {
        jkt: key.thumbprint(),
        jti: jti.to_owned(),
        replay_until: iat.max(now) + MAX_AGE_SECONDS + MAX_FUTURE_SECONDS,
    })
}

/// A client's DPoP key (ECDSA P-256, `ES256`): what a public client keeps to make proofs.
/// Used by phivault's own tools and tests; `Debug` hides the key.
pub struct ProofKey {
    pair: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProofKey([redacted])")
    }
}

impl ProofKey {
    /// A fresh random key.
    pub fn generate() -> Result<ProofKey, crate::AuthError> {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING as ALG, EcdsaKeyPair};
        let rng = ring::rand::SystemRandom::new();
        let crypto = crate::AuthError::Crypto("P-256 key generation failed");
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ALG, &rng).map_err(|_| crypto.clone())?;
        let pair = EcdsaKeyPair::from_pkcs8(&ALG, pkcs8.as_ref(), &rng).map_err(|_| crypto)?;
        Ok(ProofKey { pair, rng })
    }

    /// The public JWK (what proofs carry in their header).
    pub fn jwk(&self) -> serde_json::Value {
        use ring::signature::KeyPair;
        let p = self.pair.public_key().as_ref();
        serde_json::json!({"kty": "EC", "crv": "P-256",
            "x": crate::b64::encode(&p[1..33]), "y": crate::b64::encode(&p[33..])})
    }

    /// The key's RFC 7638 thumbprint.
    pub fn thumbprint(&self) -> String {
        PublicJwk::from_embedded(&self.jwk())
            .map(|k| k.thumbprint())
            .unwrap_or_default()
    }

    /// Sign `claims` under `header` (tests build broken proofs with it).
    pub fn sign(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, crate::AuthError> {
        crate::jws::encode_compact::<crate::AuthError>(header, claims, |m| {
            let sig = self.pair.sign(&self.rng, m);
            Ok(sig
                .map_err(|_| crate::AuthError::Crypto("signing failed"))?
                .as_ref()
                .to_vec())
        })
    }

    /// A proof for `htm` `htu` at `iat`, for `access_token` (its `ath`) when given, with a
    /// random `jti`.
    pub fn proof(
        &self,
        htm: &str,
        htu: &str,
        iat: u64,
        access_token: Option<&str>,
    ) -> Result<String, crate::AuthError> {
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut jti)
            .map_err(|_| crate::AuthError::Crypto("random generation failed"))?;
        let mut c = serde_json::json!({"jti": crate::b64::encode(&jti), "htm": htm,
            "htu": htu, "iat": iat});
        if let Some(t) = access_token {
            c["ath"] = serde_json::json!(access_token_hash(t));
        }
        self.sign(
            &serde_json::json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk()}),
            &c,
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_support::NOW;
    use serde_json::{Value, json};

    struct Key(ProofKey);
    impl Key {
        fn new() -> Key {
            Key(ProofKey::generate().unwrap())
        }
        fn jwk(&self) -> Value {
            self.0.jwk()
        }
        fn sign(&self, h: &Value, c: &Value) -> String {
            self.0.sign(h, c).unwrap()
        }
        fn proof(&self, htm: &str, htu: &str, iat: u64, token: Option<&str>) -> String {
            self.0.proof(htm, htu, iat, token).unwrap()
        }
    }

    const URL: &str = "https://fhir.example.org/fhir/Patient/1";

    #[test]
    fn a_good_proof_verifies_and_names_its_key() {
        let k = Key::new();
        let p = verify_proof(
            &k.proof("GET", URL, NOW, Some("tok")),
            "GET",
            URL,
            NOW,
            Some("tok"),
        )
        .expect("valid");
        assert_eq!(p.jkt, k.0.thumbprint());
        assert_eq!(p.jkt.len(), 43);
        assert!(p.replay_until >= NOW + MAX_AGE_SECONDS);
        // query and fragment, scheme and host case do not matter; the path does
        let q = "HTTPS://FHIR.example.org/fhir/Patient/1?x=1";
        assert!(verify_proof(&k.proof("GET", URL, NOW, None), "GET", q, NOW, None).is_ok());
        let other = "https://fhir.example.org/fhir/Patient/2";
        assert!(verify_proof(&k.proof("GET", URL, NOW, None), "GET", other, NOW, None).is_err());
    }

    #[test]
    fn the_proof_cache_refuses_replays_and_forgets_expired_proofs() {
        let cache = ProofCache::new(2);
        let p = |jti: &str, until: u64| DpopProof {
            jkt: "k".repeat(43),
            jti: jti.into(),
            replay_until: until,
        };
        assert!(cache.check_and_insert(&p("a", 100), 10).is_ok());
        assert_eq!(
            cache.check_and_insert(&p("a", 100), 11),
            Err("DPoP proof replayed")
        );
        assert!(cache.check_and_insert(&p("b", 101), 12).is_ok());
        assert_eq!(
            cache.check_and_insert(&p("c", 102), 13),
            Err("DPoP replay cache full")
        );
        // once expired (at 100 and 101), entries go and make room; the same jti under
        // another key is another proof
        assert!(cache.check_and_insert(&p("c", 300), 101).is_ok());
        let other = DpopProof {
            jkt: "z".repeat(43),
            ..p("c", 300)
        };
        assert!(cache.check_and_insert(&other, 101).is_ok());
        assert_eq!(
            cache.check_and_insert(&p("c", 300), 102),
            Err("DPoP proof replayed")
        );
        assert_eq!(
            cache.check_and_insert(&p("d", 300), 102),
            Err("DPoP replay cache full")
        );
    }

    #[test]
    fn rfc_7638_thumbprint_example() {
        // RFC 7638 §3.1
        let jwk = json!({"kty": "RSA", "e": "AQAB", "kid": "2011-04-29",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        let k = PublicJwk::from_json(&jwk).unwrap();
        assert_eq!(
            k.thumbprint(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn every_broken_part_is_refused() {
        let k = Key::new();
        let now = NOW;
        let good = |c: Value| {
            k.sign(
                &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": k.jwk()}),
                &c,
            )
        };
        let base = json!({"jti": "a", "htm": "GET", "htu": URL, "iat": now, "ath": access_token_hash("tok")});
        let check = |p: &str| verify_proof(p, "GET", URL, now, Some("tok"));
        assert!(check(&good(base.clone())).is_ok());
        let mut cases: Vec<(String, &str)> = Vec::new();
        for (field, value) in [
            ("htm", json!("POST")),
            ("htu", json!("https://evil.example/fhir/Patient/1")),
            ("iat", json!(now - MAX_AGE_SECONDS - 1)),
            ("iat", json!(now + MAX_FUTURE_SECONDS + 1)),
            ("ath", json!(access_token_hash("another"))),
            ("jti", json!("")),
        ] {
            let mut c = base.clone();
            c[field] = value;
            cases.push((good(c), field));
        }
        for field in ["jti", "htm", "htu", "iat", "ath"] {
            let mut c = base.clone();
            c.as_object_mut().unwrap().remove(field);
            cases.push((good(c), field));
        }
        // header: wrong typ, no jwk, a private key, another key than the signer's
        let other = Key::new();
        cases.push((
            k.sign(
                &json!({"typ": "JWT", "alg": "ES256", "jwk": k.jwk()}),
                &base,
            ),
            "typ",
        ));
        cases.push((
            k.sign(&json!({"typ": "dpop+jwt", "alg": "ES256"}), &base),
            "no jwk",
        ));
        let mut private = k.jwk();
        private["d"] = json!("AAAA");
        cases.push((
            k.sign(
                &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": private}),
                &base,
            ),
            "private jwk",
        ));
        cases.push((
            k.sign(
                &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": other.jwk()}),
                &base,
            ),
            "other key",
        ));
        cases.push((
            k.sign(
                &json!({"typ": "dpop+jwt", "alg": "ES384", "jwk": k.jwk()}),
                &base,
            ),
            "alg mismatch",
        ));
        cases.push((
            k.sign(
                &json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": k.jwk()}),
                &base,
            ),
            "hmac",
        ));
        cases.push((
            k.sign(
                &json!({"typ": "dpop+jwt", "alg": "none", "jwk": k.jwk()}),
                &base,
            ),
            "none",
        ));
        let g = good(base.clone());
        let (h, rest) = g.split_once('.').unwrap();
        let (p, s) = rest.split_once('.').unwrap();
        let mut sig = crate::b64::decode(s).unwrap();
        sig[5] ^= 1;
        cases.push((format!("{h}.{p}.{}", crate::b64::encode(&sig)), "signature"));
        cases.push(("not a jws".into(), "garbage"));
        for (proof, what) in &cases {
            assert!(check(proof).is_err(), "{what} accepted");
        }
        // no access token presented: ath is not needed
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove("ath");
        assert!(verify_proof(&good(c), "GET", URL, now, None).is_ok());
    }
}
