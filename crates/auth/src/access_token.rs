//! Access tokens issued by phivault (SM3) and their verification on the resource server
//! (SM6).
//!
//! Tokens are compact JWS, header `{"alg":"EdDSA","kid":…,"typ":"at+jwt"}` (RFC 9068
//! `typ`), claims `iss`, `aud` (the FHIR base URL), `sub` and `client_id` (the client),
//! `scope`, `iat`, `nbf`, `exp` (at most [`MAX_ACCESS_TOKEN_LIFETIME`] after `iat`) and a
//! random 128-bit `jti`. No refresh tokens exist.
//!
//! The verifier accepts exactly EdDSA with the configured `kid`, then checks `typ`, the
//! signature, `iss`, `aud`, `exp`/`nbf` with at most [`CLOCK_SKEW`] tolerance, and that
//! `exp` is not further ahead than a token's maximum lifetime. Verified tokens are cached
//! under the SHA-256 of the token string until they expire, so the hot path costs one
//! hash and one map lookup; a cache hit still enforces `exp` and `nbf`.

use crate::claims;
use crate::error::AuthError;
use crate::jwk::PublicJwk;
use crate::jws::{Alg, Jws, JwsError, encode_compact};
use crate::scope::ScopeSet;
use crate::{MAX_JWS_LEN, b64};
use parking_lot::Mutex;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

/// Maximum (and default) access-token lifetime in seconds (SM3).
pub const MAX_ACCESS_TOKEN_LIFETIME: u64 = 300;
/// Clock-skew tolerance applied to `exp` and `nbf`.
pub const CLOCK_SKEW: u64 = 30;
/// The `typ` header of phivault access tokens (RFC 9068).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// Default number of verified tokens cached.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;

/// Issues access tokens signed with an Ed25519 key.
pub struct AccessTokenIssuer {
    key: Ed25519KeyPair,
    issuer_url: String,
    audience: String,
    kid: String,
    public: PublicJwk,
    lifetime: u64,
    rng: SystemRandom,
}

impl fmt::Debug for AccessTokenIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokenIssuer")
            .field("issuer_url", &self.issuer_url)
            .field("audience", &self.audience)
            .field("kid", &self.kid)
            .field("lifetime", &self.lifetime)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// A freshly issued token. `Debug` hides the token.
#[derive(Clone)]
pub struct IssuedToken {
    token: String,
    token_id: String,
    expires_at: u64,
    expires_in: u64,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &"[redacted]")
            .field("token_id", &self.token_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl IssuedToken {
    /// The compact JWS.
    pub fn token(&self) -> &str {
        &self.token
    }
    /// Consumes into the compact JWS.
    pub fn into_token(self) -> String {
        self.token
    }
    /// The `jti`.
    pub fn token_id(&self) -> &str {
        &self.token_id
    }
    /// `exp`.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }
    /// `exp - iat`.
    pub fn expires_in(&self) -> u64 {
        self.expires_in
    }
}

fn check_url(s: &str) -> Result<(), AuthError> {
    if s.is_empty() || s.len() > 2048 || s.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(AuthError::Config(
            "issuer/audience must be a non-empty printable URL",
        ));
    }
    Ok(())
}

impl AccessTokenIssuer {
    /// Builds an issuer from an Ed25519 PKCS#8 v2 document (as made by
    /// [`crate::generate_ed25519_pkcs8`]). `issuer_url` becomes `iss`, `audience` (the
    /// FHIR base URL) becomes `aud`, `kid` names the key in the JWKS.
    pub fn from_pkcs8(
        pkcs8: &[u8],
        issuer_url: String,
        audience: String,
        kid: String,
    ) -> Result<AccessTokenIssuer, AuthError> {
        let key = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|_| AuthError::InvalidKey("not an Ed25519 PKCS#8 v2 key"))?;
        check_url(&issuer_url)?;
        check_url(&audience)?;
        // also validates the kid syntax
        let public = PublicJwk::from_ed25519(&kid, key.public_key().as_ref())?;
        Ok(AccessTokenIssuer {
            key,
            issuer_url,
            audience,
            kid,
            public,
            lifetime: MAX_ACCESS_TOKEN_LIFETIME,
            rng: SystemRandom::new(),
        })
    }

    /// Sets a shorter token lifetime (1..=300 s).
    pub fn with_lifetime(mut self, seconds: u64) -> Result<AccessTokenIssuer, AuthError> {
        if !(1..=MAX_ACCESS_TOKEN_LIFETIME).contains(&seconds) {
            return Err(AuthError::Config(
                "access token lifetime must be 1-300 seconds",
            ));
        }
        self.lifetime = seconds;
        Ok(self)
    }

    /// Token lifetime in seconds.
    pub fn lifetime(&self) -> u64 {
        self.lifetime
    }

    /// `iss` of issued tokens.
    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    /// `aud` of issued tokens.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The signing key's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Issues a token for `client_id` carrying `scopes`.
    pub fn issue(
        &self,
        client_id: &str,
        scopes: &ScopeSet,
        now: u64,
    ) -> Result<IssuedToken, AuthError> {
        self.issue_for(client_id, None, scopes, now)
    }

    /// Issues a token for `client_id` acting for `person` (SMART App Launch) when given:
    /// `sub` is then `user:USER-ID`, and the person's role, account generation,
    /// `fhirUser` and patient context travel in the token.
    pub fn issue_for(
        &self,
        client_id: &str,
        person: Option<&Person>,
        scopes: &ScopeSet,
        now: u64,
    ) -> Result<IssuedToken, AuthError> {
        self.issue_bound(client_id, person, scopes, now, None)
    }

    /// [`AccessTokenIssuer::issue_for`], bound to the DPoP key whose RFC 7638 thumbprint
    /// is `jkt` when given (`cnf.jkt`, RFC 9449 §6): the token is then only accepted with
    /// a proof of possession of that key.
    pub fn issue_bound(
        &self,
        client_id: &str,
        person: Option<&Person>,
        scopes: &ScopeSet,
        now: u64,
        jkt: Option<&str>,
    ) -> Result<IssuedToken, AuthError> {
        let mut id = [0u8; 16];
        self.rng
            .fill(&mut id)
            .map_err(|_| AuthError::Crypto("random generation failed"))?;
        let jti = b64::encode(&id);
        let exp = now.saturating_add(self.lifetime);
        let header = json!({"alg": "EdDSA", "kid": self.kid, "typ": ACCESS_TOKEN_TYP});
        let mut claims = json!({
            "iss": self.issuer_url,
            "aud": self.audience,
            "sub": client_id,
            "client_id": client_id,
            "scope": scopes.to_string(),
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": jti,
        });
        if let Some(p) = person {
            claims["sub"] = json!(format!("{USER_SUB_PREFIX}{}", p.user_id));
            claims[PERSON_CLAIM] = json!({
                "role": p.role.as_str(),
                "gen": p.generation,
                "fhirUser": p.fhir_user,
                "patient": p.patient,
            });
        }
        if let Some(j) = jkt {
            claims["cnf"] = json!({ "jkt": j });
        }
        let token = encode_compact::<AuthError>(&header, &claims, |msg| {
            Ok(self.key.sign(msg).as_ref().to_vec())
        })?;
        if token.len() > MAX_JWS_LEN {
            return Err(AuthError::Config(
                "access token would exceed 8 KiB (too many scopes)",
            ));
        }
        Ok(IssuedToken {
            token,
            token_id: jti,
            expires_at: exp,
            expires_in: self.lifetime,
        })
    }

    /// An OpenID Connect id token (SMART `openid fhirUser`) for `client_id` about account
    /// `user_id`: `aud` is the client, `fhirUser` the absolute URL of the person's FHIR
    /// resource, signed with the access-token key (EdDSA, RFC 8037; in the JWKS).
    pub fn id_token(
        &self,
        client_id: &str,
        user_id: &str,
        fhir_user: Option<&str>,
        nonce: Option<&str>,
        auth_time: u64,
        now: u64,
    ) -> Result<String, AuthError> {
        let header = json!({"alg": "EdDSA", "kid": self.kid, "typ": "JWT"});
        let mut claims = json!({
            "iss": self.issuer_url,
            "sub": user_id,
            "aud": client_id,
            "iat": now,
            "exp": now.saturating_add(self.lifetime),
            "auth_time": auth_time,
        });
        if let Some(f) = fhir_user {
            claims["fhirUser"] = json!(format!("{}/{f}", self.audience));
        }
        if let Some(n) = nonce {
            claims["nonce"] = json!(n);
        }
        encode_compact::<AuthError>(&header, &claims, |msg| {
            Ok(self.key.sign(msg).as_ref().to_vec())
        })
    }

    /// The public key as a JWK (`OKP`/`Ed25519`).
    pub fn public_jwk(&self) -> PublicJwk {
        self.public.clone()
    }

    /// `{"keys":[…]}` for the JWKS endpoint.
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.public_jwk().to_json()]})
    }

    /// A verifier for this issuer's tokens.
    pub fn verifier(&self) -> AccessTokenVerifier {
        AccessTokenVerifier {
            key: self.public_jwk(),
            issuer: self.issuer_url.clone(),
            audience: self.audience.clone(),
            cache: Mutex::new(TokenCache::default()),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
        }
    }
}

/// Why a bearer token was refused. All map to HTTP 401.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// No bearer token was presented.
    #[error("no access token")]
    Missing,
    /// Not a well-formed token.
    #[error("malformed access token")]
    Malformed,
    /// `alg` is not EdDSA (or `typ` is wrong).
    #[error("access token algorithm or type not accepted")]
    UnsupportedAlgorithm,
    /// `kid` missing or not ours.
    #[error("access token key unknown")]
    UnknownKey,
    /// Signature does not verify.
    #[error("access token signature invalid")]
    BadSignature,
    /// `iss` is not the expected issuer.
    #[error("access token issuer wrong")]
    WrongIssuer,
    /// `aud` does not contain the expected audience.
    #[error("access token audience wrong")]
    WrongAudience,
    /// `exp` passed.
    #[error("access token expired")]
    Expired,
    /// `nbf` in the future, or `exp` implausibly far ahead.
    #[error("access token not valid yet")]
    NotYetValid,
    /// A required claim is missing or malformed.
    #[error("access token claims invalid")]
    InvalidClaims,
}

impl TokenError {
    /// Always 401.
    pub fn http_status(&self) -> u16 {
        401
    }

    /// The `WWW-Authenticate` header value (RFC 6750 §3). Never contains token content.
    pub fn www_authenticate(&self) -> String {
        match self {
            TokenError::Missing => "Bearer".to_owned(),
            _ => "Bearer error=\"invalid_token\"".to_owned(),
        }
    }
}

struct AuthInner {
    client_id: String,
    person: Option<Person>,
    scopes: ScopeSet,
    token_id: String,
    expires_at: u64,
    jkt: Option<String>,
}

/// `sub` prefix of tokens issued for a person.
const USER_SUB_PREFIX: &str = "user:";
/// The private claim carrying the person's role, generation and FHIR links.
const PERSON_CLAIM: &str = "phivault_person";

/// The person a token acts for (SMART App Launch), as signed into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// The account's opaque id (never the login name: tokens and audit events carry no
    /// names).
    pub user_id: String,
    /// Role at sign-in.
    pub role: crate::users::Role,
    /// Account generation at sign-in (an older one than the account's is revoked).
    pub generation: u64,
    /// `Practitioner/…` or `Patient/…`.
    pub fhir_user: Option<String>,
    /// Patient in context (`launch/patient`).
    pub patient: Option<String>,
}

fn person_of(c: &serde_json::Map<String, serde_json::Value>) -> Result<Option<Person>, TokenError> {
    let sub = claims::string(c, "sub").ok_or(TokenError::InvalidClaims)?;
    let Some(v) = c.get(PERSON_CLAIM) else {
        return Ok(None);
    };
    let user_id = sub
        .strip_prefix(USER_SUB_PREFIX)
        .filter(|u| !u.is_empty())
        .ok_or(TokenError::InvalidClaims)?;
    let opt = |k: &str| -> Result<Option<String>, TokenError> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(TokenError::InvalidClaims),
        }
    };
    Ok(Some(Person {
        user_id: user_id.to_owned(),
        role: v
            .get("role")
            .and_then(|r| r.as_str())
            .and_then(crate::users::Role::parse)
            .ok_or(TokenError::InvalidClaims)?,
        generation: v
            .get("gen")
            .and_then(|g| g.as_u64())
            .ok_or(TokenError::InvalidClaims)?,
        fhir_user: opt("fhirUser")?,
        patient: opt("patient")?,
    }))
}

/// Proof that a bearer token was verified. Only this crate can construct it. Cheap to
/// clone.
#[derive(Clone)]
pub struct Authenticated(Arc<AuthInner>);

impl fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticated")
            .field("client_id", &self.0.client_id)
            .field("scopes", &self.0.scopes.to_string())
            .field("token_id", &self.0.token_id)
            .field("expires_at", &self.0.expires_at)
            .finish()
    }
}

impl Authenticated {
    /// A token verified by another issuer's rules (an external identity provider).
    pub(crate) fn external(
        client_id: String,
        person: Person,
        scopes: ScopeSet,
        token_id: String,
        expires_at: u64,
        jkt: Option<String>,
    ) -> Authenticated {
        Authenticated(Arc::new(AuthInner {
            client_id,
            person: Some(person),
            scopes,
            token_id,
            expires_at,
            jkt,
        }))
    }

    /// The client the token was issued to.
    pub fn client_id(&self) -> &str {
        &self.0.client_id
    }
    /// The person the client acts for (None: a back-end client on its own behalf).
    pub fn person(&self) -> Option<&Person> {
        self.0.person.as_ref()
    }
    /// The granted scopes.
    pub fn scopes(&self) -> &ScopeSet {
        &self.0.scopes
    }
    /// The token's `jti` (for audit and, later, revocation).
    pub fn token_id(&self) -> &str {
        &self.0.token_id
    }
    /// The token's `exp`.
    pub fn expires_at(&self) -> u64 {
        self.0.expires_at
    }
    /// The DPoP key the token is bound to (`cnf.jkt`), if any: the token is then only
    /// valid with a proof made with that key.
    pub fn dpop_jkt(&self) -> Option<&str> {
        self.0.jkt.as_deref()
    }
}

struct CacheEntry {
    auth: Authenticated,
    nbf: u64,
}

#[derive(Default)]
struct TokenCache {
    map: HashMap<[u8; 32], CacheEntry>,
    by_exp: BTreeSet<(u64, [u8; 32])>,
}

impl TokenCache {
    fn remove(&mut self, key: &[u8; 32]) {
        if let Some(e) = self.map.remove(key) {
            self.by_exp.remove(&(e.auth.expires_at(), *key));
        }
    }

    fn insert(&mut self, key: [u8; 32], entry: CacheEntry, now: u64, capacity: usize) {
        // drop everything expired, then the soonest-expiring entries if still full
        while let Some(&(exp, k)) = self.by_exp.first() {
            let expired = exp.saturating_add(CLOCK_SKEW) <= now;
            if !expired && self.map.len() < capacity {
                break;
            }
            self.by_exp.pop_first();
            self.map.remove(&k);
        }
        self.by_exp.insert((entry.auth.expires_at(), key));
        self.map.insert(key, entry);
    }
}

/// Verifies phivault access tokens on the resource server.
pub struct AccessTokenVerifier {
    key: PublicJwk,
    issuer: String,
    audience: String,
    cache: Mutex<TokenCache>,
    cache_capacity: usize,
}

impl fmt::Debug for AccessTokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessTokenVerifier")
            .field("kid", &self.key.kid())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

fn time_ok(exp: u64, nbf: u64, now: u64) -> Result<(), TokenError> {
    if now >= exp.saturating_add(CLOCK_SKEW) {
        return Err(TokenError::Expired);
    }
    if nbf > now.saturating_add(CLOCK_SKEW) {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

impl AccessTokenVerifier {
    /// A verifier for tokens signed by `key` (must be an Ed25519 key), with the expected
    /// `iss` and `aud`.
    pub fn new(
        key: PublicJwk,
        issuer: String,
        audience: String,
    ) -> Result<AccessTokenVerifier, AuthError> {
        if !key.permits(Alg::EdDSA) {
            return Err(AuthError::InvalidKey("access token key must be Ed25519"));
        }
        check_url(&issuer)?;
        check_url(&audience)?;
        Ok(AccessTokenVerifier {
            key,
            issuer,
            audience,
            cache: Mutex::new(TokenCache::default()),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
        })
    }

    /// Changes the verified-token cache size (0 disables caching).
    pub fn with_cache_capacity(mut self, capacity: usize) -> AccessTokenVerifier {
        self.cache_capacity = capacity;
        self
    }

    /// Number of cached verified tokens.
    pub fn cached_len(&self) -> usize {
        self.cache.lock().map.len()
    }

    /// Verifies a bearer token at time `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Authenticated, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_JWS_LEN {
            return Err(TokenError::Malformed);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        {
            let mut cache = self.cache.lock();
            if let Some(e) = cache.map.get(&key) {
                let checked = time_ok(e.auth.expires_at(), e.nbf, now);
                match checked {
                    Ok(()) => return Ok(e.auth.clone()),
                    Err(err) => {
                        if err == TokenError::Expired {
                            cache.remove(&key);
                        }
                        return Err(err);
                    }
                }
            }
        }
        let (auth, nbf) = self.verify_uncached(token, now)?;
        if self.cache_capacity > 0 {
            self.cache.lock().insert(
                key,
                CacheEntry {
                    auth: auth.clone(),
                    nbf,
                },
                now,
                self.cache_capacity,
            );
        }
        Ok(auth)
    }

    fn verify_uncached(&self, token: &str, now: u64) -> Result<(Authenticated, u64), TokenError> {
        let jws = Jws::parse(token).map_err(|e| match e {
            JwsError::UnsupportedAlgorithm => TokenError::UnsupportedAlgorithm,
            _ => TokenError::Malformed,
        })?;
        if jws.alg() != Alg::EdDSA || jws.typ() != Some(ACCESS_TOKEN_TYP) {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        if jws.kid() != Some(self.key.kid()) {
            return Err(TokenError::UnknownKey);
        }
        let c = jws.verify(&self.key, &[Alg::EdDSA]).map_err(|e| match e {
            JwsError::BadSignature => TokenError::BadSignature,
            _ => TokenError::UnsupportedAlgorithm,
        })?;
        if claims::string(c, "iss") != Some(self.issuer.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
        if !claims::audience_contains(c, &self.audience) {
            return Err(TokenError::WrongAudience);
        }
        let exp = claims::numeric_date(c, "exp")
            .ok()
            .flatten()
            .ok_or(TokenError::InvalidClaims)?;
        let nbf = claims::numeric_date(c, "nbf")
            .map_err(|()| TokenError::InvalidClaims)?
            .unwrap_or(0);
        time_ok(exp, nbf, now)?;
        if exp > now.saturating_add(MAX_ACCESS_TOKEN_LIFETIME + CLOCK_SKEW) {
            return Err(TokenError::NotYetValid);
        }
        let client_id = claims::string(c, "client_id").ok_or(TokenError::InvalidClaims)?;
        let person = person_of(c)?;
        if client_id.is_empty() || (person.is_none() && claims::string(c, "sub") != Some(client_id))
        {
            return Err(TokenError::InvalidClaims);
        }
        let scopes = claims::string(c, "scope")
            .and_then(|s| ScopeSet::parse(s).ok())
            .ok_or(TokenError::InvalidClaims)?;
        let jti = claims::string(c, "jti")
            .filter(|j| !j.is_empty())
            .ok_or(TokenError::InvalidClaims)?;
        let jkt = match c.get("cnf") {
            None => None,
            Some(cnf) => Some(
                cnf.get("jkt")
                    .and_then(|j| j.as_str())
                    .filter(|j| j.len() == 43)
                    .ok_or(TokenError::InvalidClaims)?
                    .to_owned(),
            ),
        };
        let auth = Authenticated(Arc::new(AuthInner {
            client_id: client_id.to_owned(),
            person,
            scopes,
            token_id: jti.to_owned(),
            expires_at: exp,
            jkt,
        }));
        Ok((auth, nbf))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::jwk::generate_ed25519_pkcs8;
    use crate::test_support::{NOW, tamper_payload, tamper_signature};

    pub(crate) const ISS: &str = "https://fhir.example.org/auth";
    pub(crate) const AUD: &str = "https://fhir.example.org/fhir";

    pub(crate) fn issuer() -> AccessTokenIssuer {
        let pk = generate_ed25519_pkcs8().expect("key");
        AccessTokenIssuer::from_pkcs8(&pk, ISS.into(), AUD.into(), "at-1".into()).expect("issuer")
    }

    fn scopes() -> ScopeSet {
        ScopeSet::parse("system/Patient.rs").expect("scopes")
    }

    #[test]
    fn issue_then_verify() {
        let i = issuer();
        let t = i.issue("backend-app", &scopes(), NOW).expect("issue");
        assert_eq!(t.expires_in(), 300);
        assert_eq!(t.expires_at(), NOW + 300);
        assert_eq!(b64::decode(t.token_id()).map(|v| v.len()), Some(16));
        let v = i.verifier();
        let a = v.verify(t.token(), NOW).expect("verify");
        assert_eq!(a.client_id(), "backend-app");
        assert_eq!(a.scopes(), &scopes());
        assert_eq!(a.token_id(), t.token_id());
        assert_eq!(a.expires_at(), NOW + 300);
        assert_eq!(v.cached_len(), 1);
        // cache hit
        let b = v.verify(t.token(), NOW + 10).expect("cached");
        assert_eq!(b.token_id(), a.token_id());
        // fresh jti per token
        let t2 = i.issue("backend-app", &scopes(), NOW).expect("issue");
        assert_ne!(t2.token_id(), t.token_id());
        // Debug hides the token
        assert!(!format!("{t:?}").contains(t.token()));
        assert!(!format!("{i:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_bound_token_carries_its_key_thumbprint() {
        let i = issuer();
        let jkt = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";
        let t = i
            .issue_bound("app", None, &scopes(), NOW, Some(jkt))
            .expect("issue");
        let a = i.verifier().verify(t.token(), NOW).expect("verify");
        assert_eq!(a.dpop_jkt(), Some(jkt));
        let plain = i.issue("app", &scopes(), NOW).expect("issue");
        assert_eq!(
            i.verifier().verify(plain.token(), NOW).unwrap().dpop_jkt(),
            None
        );
    }

    #[test]
    fn tokens_for_a_person_carry_who_and_in_what_role() {
        let i = issuer();
        let p = Person {
            user_id: "0b6f3a52-4c1e-4a8e-9d0e-3f1f6c2a9b11".into(),
            role: crate::users::Role::Patient,
            generation: 3,
            fhir_user: Some("Patient/p1".into()),
            patient: Some("p1".into()),
        };
        let t = i
            .issue_for(
                "app1",
                Some(&p),
                &ScopeSet::parse("patient/*.rs").unwrap(),
                NOW,
            )
            .expect("issue");
        let a = i.verifier().verify(t.token(), NOW).expect("verify");
        assert_eq!(a.client_id(), "app1");
        assert_eq!(a.person(), Some(&p));
        let b = i.issue("backend", &scopes(), NOW).expect("issue");
        assert_eq!(i.verifier().verify(b.token(), NOW).unwrap().person(), None);
        // an id token is not an access token
        let id = i
            .id_token(
                "app1",
                &p.user_id,
                Some("Patient/p1"),
                Some("n-1"),
                NOW - 5,
                NOW,
            )
            .expect("id token");
        assert!(i.verifier().verify(&id, NOW).is_err());
        let jws = Jws::parse(&id).expect("parse");
        let c = jws
            .verify(&i.public_jwk(), &[Alg::EdDSA])
            .expect("signature");
        assert_eq!(c["aud"], "app1");
        assert_eq!(c["sub"], p.user_id.as_str());
        assert_eq!(c["nonce"], "n-1");
        assert_eq!(c["fhirUser"], format!("{AUD}/Patient/p1"));
    }

    #[test]
    fn jwks_and_external_verifier() {
        let i = issuer();
        let jwks = i.jwks();
        let k = &jwks["keys"][0];
        assert_eq!(k["kty"], "OKP");
        assert_eq!(k["crv"], "Ed25519");
        assert_eq!(k["kid"], "at-1");
        assert!(k.get("d").is_none());
        let key = PublicJwk::from_json(k).expect("jwk");
        let v = AccessTokenVerifier::new(key, ISS.into(), AUD.into()).expect("verifier");
        let t = i.issue("c", &scopes(), NOW).expect("issue");
        v.verify(t.token(), NOW).expect("verify");
    }

    #[test]
    fn expiry_even_when_cached() {
        let i = issuer();
        let v = i.verifier();
        let t = i.issue("c", &scopes(), NOW).expect("issue");
        v.verify(t.token(), NOW).expect("verify");
        assert_eq!(v.cached_len(), 1);
        v.verify(t.token(), NOW + 300 + CLOCK_SKEW - 1)
            .expect("within skew");
        assert_eq!(
            v.verify(t.token(), NOW + 300 + CLOCK_SKEW).err(),
            Some(TokenError::Expired)
        );
        assert_eq!(v.cached_len(), 0);
        // and uncached
        assert_eq!(
            v.verify(t.token(), NOW + 3600).err(),
            Some(TokenError::Expired)
        );
        let uncached = i.verifier().with_cache_capacity(0);
        assert_eq!(
            uncached.verify(t.token(), NOW + 3600).err(),
            Some(TokenError::Expired)
        );
        assert_eq!(uncached.cached_len(), 0);
    }

    #[test]
    fn not_yet_valid() {
        let i = issuer();
        let t = i.issue("c", &scopes(), NOW + 100).expect("issue");
        assert_eq!(
            i.verifier().verify(t.token(), NOW).err(),
            Some(TokenError::NotYetValid)
        );
    }

    #[test]
    fn wrong_issuer_audience_key() {
        let i = issuer();
        let t = i.issue("c", &scopes(), NOW).expect("issue");
        let v = AccessTokenVerifier::new(i.public_jwk(), "https://other/auth".into(), AUD.into())
            .expect("v");
        assert_eq!(
            v.verify(t.token(), NOW).err(),
            Some(TokenError::WrongIssuer)
        );
        let v = AccessTokenVerifier::new(i.public_jwk(), ISS.into(), "https://other/fhir".into())
            .expect("v");
        assert_eq!(
            v.verify(t.token(), NOW).err(),
            Some(TokenError::WrongAudience)
        );
        // same kid, different key
        let other = issuer();
        assert_eq!(
            other.verifier().verify(t.token(), NOW).err(),
            Some(TokenError::BadSignature)
        );
        // different kid
        let pk = generate_ed25519_pkcs8().expect("key");
        let k2 =
            AccessTokenIssuer::from_pkcs8(&pk, ISS.into(), AUD.into(), "at-2".into()).expect("i");
        assert_eq!(
            k2.verifier().verify(t.token(), NOW).err(),
            Some(TokenError::UnknownKey)
        );
        // verifier refuses a non-Ed25519 key
        let (_, es) = crate::jwk::generate_es384_jwk("x").expect("es");
        assert!(AccessTokenVerifier::new(es, ISS.into(), AUD.into()).is_err());
    }

    #[test]
    fn tampering_and_other_algs() {
        let i = issuer();
        let v = i.verifier();
        let t = i.issue("c", &scopes(), NOW).expect("issue");
        assert_eq!(
            v.verify(&tamper_payload(t.token()), NOW).err(),
            Some(TokenError::BadSignature)
        );
        assert_eq!(
            v.verify(&tamper_signature(t.token()), NOW).err(),
            Some(TokenError::BadSignature)
        );
        assert_eq!(v.verify("", NOW).err(), Some(TokenError::Missing));
        assert_eq!(v.verify("a.b.c", NOW).err(), Some(TokenError::Malformed));
        assert_eq!(
            v.verify(&"a".repeat(MAX_JWS_LEN + 1), NOW).err(),
            Some(TokenError::Malformed)
        );
        // a client-assertion-style ES384 JWT is refused outright
        let (sk, _) = crate::jwk::generate_es384_jwk("at-1").expect("es");
        let es = sk.sign_jws(&json!({"iss": ISS, "aud": AUD})).expect("sign");
        assert_eq!(
            v.verify(&es, NOW).err(),
            Some(TokenError::UnsupportedAlgorithm)
        );
        // HS256 keyed with the public key
        let parts: Vec<&str> = t.token().split('.').collect();
        let h = b64::encode(br#"{"alg":"HS256","kid":"at-1","typ":"at+jwt"}"#);
        let input = format!("{h}.{}", parts[1]);
        let pubkey = i.public_jwk().to_json().to_string();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, pubkey.as_bytes());
        let tag = ring::hmac::sign(&key, input.as_bytes());
        let hs = format!("{input}.{}", b64::encode(tag.as_ref()));
        assert_eq!(
            v.verify(&hs, NOW).err(),
            Some(TokenError::UnsupportedAlgorithm)
        );
        // failures are not cached
        assert_eq!(v.cached_len(), 0);
    }

    #[test]
    fn www_authenticate() {
        assert_eq!(
            TokenError::Expired.www_authenticate(),
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(TokenError::Missing.www_authenticate(), "Bearer");
        assert_eq!(TokenError::BadSignature.http_status(), 401);
    }

    #[test]
    fn cache_is_bounded() {
        let i = issuer();
        let v = i.verifier().with_cache_capacity(3);
        for n in 0..10 {
            let t = i.issue("c", &scopes(), NOW + n).expect("issue");
            v.verify(t.token(), NOW + n).expect("verify");
            assert!(v.cached_len() <= 3);
        }
    }

    #[test]
    fn lifetime_config() {
        assert!(issuer().with_lifetime(301).is_err());
        assert!(issuer().with_lifetime(0).is_err());
        let i = issuer().with_lifetime(60).expect("60");
        assert_eq!(i.issue("c", &scopes(), NOW).expect("t").expires_in(), 60);
        assert!(
            AccessTokenIssuer::from_pkcs8(b"junk", ISS.into(), AUD.into(), "k".into()).is_err()
        );
        let pk = generate_ed25519_pkcs8().expect("key");
        assert!(AccessTokenIssuer::from_pkcs8(&pk, "".into(), AUD.into(), "k".into()).is_err());
        assert!(AccessTokenIssuer::from_pkcs8(&pk, ISS.into(), AUD.into(), "".into()).is_err());
    }
}
