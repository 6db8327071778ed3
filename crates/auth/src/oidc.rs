//! Access tokens from a hospital's own OpenID Connect provider (external issuers).
//!
//! An [`ExternalIssuer`] is one configured provider: its issuer URL, the audience its
//! access tokens must name (this server's FHIR base URL, RFC 8707/9068), and the claim that
//! names the person (mapped to a local account, whose role and links decide access — the
//! provider vouches for who signed in, phivault for what they may see). Its signing keys
//! come from its JWKS (fetched by the server through discovery; [`ExternalIssuer::set_jwks`]),
//! and are re-fetched when a token names a `kid` not seen yet (key rotation).
//!
//! A token is accepted only when: it is a compact JWS of at most [`crate::MAX_JWS_LEN`]
//! bytes with `typ` `at+jwt` (RFC 9068: an id token is not an access token), `alg` one of
//! [`EXTERNAL_ALGS`] and a `kid` of the provider's key set; the signature verifies; `iss` is
//! the provider's exactly; `aud` contains the configured audience; `exp` is in the future
//! and at most [`MAX_EXTERNAL_LIFETIME`] ahead, `nbf`/`iat` not in the future (with
//! [`crate::access_token::CLOCK_SKEW`]); `client_id` and `sub` are present; the person claim
//! names an enabled local account. Its `scope` claim carries the SMART scopes granted.

use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::access_token::{Authenticated, CLOCK_SKEW, Person, TokenError};
use crate::claims;
use crate::jwk::PublicJwk;
use crate::jws::{Alg, Jws, JwsError};
use crate::scope::ScopeSet;

/// Signature algorithms accepted from external providers.
pub const EXTERNAL_ALGS: &[Alg] = &[Alg::RS256, Alg::ES256, Alg::ES384, Alg::RS384, Alg::EdDSA];
/// The longest accepted remaining lifetime of an external access token (seconds).
pub const MAX_EXTERNAL_LIFETIME: u64 = 3600;
/// Most keys kept from one provider's JWKS.
const MAX_KEYS: usize = 32;

/// How one provider is configured (stored by `phivault idp add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdpConfig {
    /// The issuer URL, exactly as its tokens' `iss` and its discovery document say.
    pub issuer: String,
    /// The audience its access tokens must carry for this server.
    pub audience: String,
    /// The claim naming the person, mapped to a local account's username.
    pub username_claim: String,
    /// PEM of the CA that issued the provider's TLS certificate, when not a public one.
    #[serde(default)]
    pub ca_pem: Option<String>,
}

impl IdpConfig {
    /// Refuse an issuer that is not an https URL (plain http only on a loopback address,
    /// for tests and a local provider), and empty fields.
    pub fn validate(&self) -> Result<(), &'static str> {
        let i = &self.issuer;
        let loopback = [
            "http://127.0.0.1:",
            "http://127.0.0.1/",
            "http://localhost:",
            "http://[::1]:",
        ];
        if !(i.starts_with("https://") || loopback.iter().any(|p| i.starts_with(p))) {
            return Err("the issuer must be an https URL (http only on a loopback address)");
        }
        if i.contains(['?', '#']) || i.len() > 512 {
            return Err("the issuer must be a plain URL");
        }
        if self.audience.is_empty() || self.username_claim.is_empty() {
            return Err("audience and username claim must not be empty");
        }
        Ok(())
    }
}

/// One configured provider and the keys last fetched from it.
#[derive(Debug)]
pub struct ExternalIssuer {
    config: IdpConfig,
    keys: RwLock<Vec<PublicJwk>>,
}

/// The `iss` of a token, read without verifying anything (to choose the verifier).
pub fn unverified_issuer(token: &str) -> Option<String> {
    let jws = Jws::parse(token).ok()?;
    claims::string(jws.unverified_claims(), "iss").map(str::to_owned)
}

/// The `kid` of a token's header, unverified.
pub fn unverified_kid(token: &str) -> Option<String> {
    Jws::parse(token).ok()?.kid().map(str::to_owned)
}

impl ExternalIssuer {
    /// A provider with no keys yet.
    pub fn new(config: IdpConfig) -> Self {
        ExternalIssuer {
            config,
            keys: RwLock::new(Vec::new()),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &IdpConfig {
        &self.config
    }

    /// Replace the keys with the signing keys of a JWKS document (keys for encryption,
    /// without `kid`, or of unsupported types are skipped). The number kept.
    pub fn set_jwks(&self, jwks: &Value) -> Result<usize, crate::AuthError> {
        let list = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(crate::AuthError::InvalidKey("JWKS has no keys array"))?;
        let keys: Vec<PublicJwk> = list
            .iter()
            .filter(|k| k.get("use").is_none_or(|u| u == "sig"))
            .filter_map(|k| PublicJwk::from_json(k).ok())
            .take(MAX_KEYS)
            .collect();
        let n = keys.len();
        *self.keys.write() = keys;
        Ok(n)
    }

    /// Whether a key with this `kid` is known.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.read().iter().any(|k| k.kid() == kid)
    }

    /// Verify `token` at `now`; `account` maps the person claim's value to the person it
    /// names (None: no such enabled account).
    pub fn verify(
        &self,
        token: &str,
        now: u64,
        account: &dyn Fn(&str) -> Option<Person>,
    ) -> Result<Authenticated, TokenError> {
        let jws = Jws::parse(token).map_err(|e| match e {
            JwsError::UnsupportedAlgorithm => TokenError::UnsupportedAlgorithm,
            _ => TokenError::Malformed,
        })?;
        if !EXTERNAL_ALGS.contains(&jws.alg())
            || !matches!(jws.typ(), Some("at+jwt" | "application/at+jwt"))
        {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        let kid = jws.kid().ok_or(TokenError::UnknownKey)?;
        let key: Arc<PublicJwk> = self
            .keys
            .read()
            .iter()
            .find(|k| k.kid() == kid)
            .cloned()
            .map(Arc::new)
            .ok_or(TokenError::UnknownKey)?;
        let c = jws.verify(&key, EXTERNAL_ALGS).map_err(|e| match e {
            JwsError::BadSignature => TokenError::BadSignature,
            _ => TokenError::UnsupportedAlgorithm,
        })?;
        if claims::string(c, "iss") != Some(self.config.issuer.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
        if !claims::audience_contains(c, &self.config.audience) {
            return Err(TokenError::WrongAudience);
        }
        let date = |k| claims::numeric_date(c, k).map_err(|()| TokenError::InvalidClaims);
        let exp = date("exp")?.ok_or(TokenError::InvalidClaims)?;
        if now >= exp.saturating_add(CLOCK_SKEW) {
            return Err(TokenError::Expired);
        }
        if exp > now.saturating_add(MAX_EXTERNAL_LIFETIME + CLOCK_SKEW) {
            return Err(TokenError::NotYetValid);
        }
        for k in ["nbf", "iat"] {
            if date(k)?.is_some_and(|t| t > now.saturating_add(CLOCK_SKEW)) {
                return Err(TokenError::NotYetValid);
            }
        }
        let client = claims::string(c, "client_id")
            .or_else(|| claims::string(c, "azp"))
            .filter(|s| !s.is_empty() && s.len() <= 128)
            .ok_or(TokenError::InvalidClaims)?;
        claims::string(c, "sub")
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::InvalidClaims)?;
        let name =
            claims::string(c, &self.config.username_claim).ok_or(TokenError::InvalidClaims)?;
        let person = account(name).ok_or(TokenError::InvalidClaims)?;
        let scope = match c.get("scope") {
            None => "",
            Some(Value::String(s)) => s,
            Some(_) => return Err(TokenError::InvalidClaims),
        };
        let scopes = ScopeSet::parse(scope).map_err(|_| TokenError::InvalidClaims)?;
        let jti = match claims::string(c, "jti") {
            Some(j) if !j.is_empty() && j.len() <= 128 => j.to_owned(),
            _ => crate::b64::encode(
                &ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref()[..16],
            ),
        };
        let jkt = match c.get("cnf") {
            None => None,
            Some(cnf) => Some(
                cnf.get("jkt")
                    .and_then(Value::as_str)
                    .filter(|j| j.len() == 43)
                    .ok_or(TokenError::InvalidClaims)?
                    .to_owned(),
            ),
        };
        Ok(Authenticated::external(
            format!("oidc:{client}"),
            person,
            scopes,
            jti,
            exp,
            jkt,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::NOW;
    use crate::users::Role;
    use serde_json::json;

    const ISS: &str = "https://idp.hospital.example";
    const AUD: &str = "https://fhir.hospital.example/fhir";

    fn provider() -> (ExternalIssuer, crate::dpop::ProofKey) {
        let key = crate::dpop::ProofKey::generate().unwrap();
        let mut jwk = key.jwk();
        jwk["kid"] = json!("k1");
        let p = ExternalIssuer::new(IdpConfig {
            issuer: ISS.into(),
            audience: AUD.into(),
            username_claim: "preferred_username".into(),
            ca_pem: None,
        });
        assert_eq!(
            p.set_jwks(&json!({"keys": [jwk, {"kty": "oct", "k": "x", "kid": "s"}]}))
                .unwrap(),
            1,
            "the symmetric key is not kept"
        );
        (p, key)
    }

    fn claims() -> Value {
        json!({"iss": ISS, "aud": AUD, "sub": "u-77", "client_id": "portal",
            "preferred_username": "dr.adams", "scope": "openid user/Patient.rs",
            "iat": NOW, "exp": NOW + 300, "jti": "t-1"})
    }

    fn sign(k: &crate::dpop::ProofKey, header: Value, c: &Value) -> String {
        k.sign(&header, c).unwrap()
    }

    fn header() -> Value {
        json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"})
    }

    fn account(name: &str) -> Option<Person> {
        (name == "dr.adams").then(|| Person {
            user_id: "acc-1".into(),
            role: Role::Clinician,
            generation: 4,
            fhir_user: Some("Practitioner/pr1".into()),
            patient: None,
        })
    }

    #[test]
    fn a_providers_token_maps_to_the_local_account() {
        let (p, k) = provider();
        let a = p
            .verify(&sign(&k, header(), &claims()), NOW, &account)
            .expect("valid");
        assert_eq!(a.client_id(), "oidc:portal");
        assert_eq!(a.person().map(|p| p.user_id.as_str()), Some("acc-1"));
        assert_eq!(a.scopes().to_string(), "user/Patient.rs openid");
        assert_eq!(a.token_id(), "t-1");
        assert_eq!(
            unverified_issuer(&sign(&k, header(), &claims())).as_deref(),
            Some(ISS)
        );
    }

    #[test]
    fn everything_else_is_refused() {
        let (p, k) = provider();
        let other = crate::dpop::ProofKey::generate().unwrap();
        let mut cases: Vec<(String, TokenError)> = Vec::new();
        for (field, v, e) in [
            (
                "iss",
                json!("https://evil.example"),
                TokenError::WrongIssuer,
            ),
            (
                "aud",
                json!("https://other.example/fhir"),
                TokenError::WrongAudience,
            ),
            ("exp", json!(NOW - 100), TokenError::Expired),
            ("exp", json!(NOW + 7200), TokenError::NotYetValid),
            ("iat", json!(NOW + 600), TokenError::NotYetValid),
            (
                "preferred_username",
                json!("nobody"),
                TokenError::InvalidClaims,
            ),
            ("scope", json!(7), TokenError::InvalidClaims),
        ] {
            let mut c = claims();
            c[field] = v;
            cases.push((sign(&k, header(), &c), e));
        }
        for field in ["exp", "sub", "client_id", "preferred_username"] {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(field);
            cases.push((sign(&k, header(), &c), TokenError::InvalidClaims));
        }
        // an id token (typ JWT) is not an access token; unknown kid; another signer
        cases.push((
            sign(
                &k,
                json!({"alg": "ES256", "kid": "k1", "typ": "JWT"}),
                &claims(),
            ),
            TokenError::UnsupportedAlgorithm,
        ));
        cases.push((
            sign(
                &k,
                json!({"alg": "ES256", "kid": "k9", "typ": "at+jwt"}),
                &claims(),
            ),
            TokenError::UnknownKey,
        ));
        cases.push((sign(&other, header(), &claims()), TokenError::BadSignature));
        cases.push((
            sign(
                &k,
                json!({"alg": "none", "kid": "k1", "typ": "at+jwt"}),
                &claims(),
            ),
            TokenError::UnsupportedAlgorithm,
        ));
        for (t, want) in cases {
            assert_eq!(p.verify(&t, NOW, &account).err(), Some(want));
        }
    }

    #[test]
    fn configs_must_name_a_secure_issuer() {
        let mut c = IdpConfig {
            issuer: ISS.into(),
            audience: AUD.into(),
            username_claim: "preferred_username".into(),
            ca_pem: None,
        };
        assert!(c.validate().is_ok());
        c.issuer = "http://127.0.0.1:9000".into();
        assert!(c.validate().is_ok());
        for bad in ["http://idp.example", "ftp://x", "https://idp.example/?a=1"] {
            c.issuer = bad.into();
            assert!(c.validate().is_err(), "{bad}");
        }
    }
}
