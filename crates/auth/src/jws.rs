//! Compact JWS (RFC 7515) parsing and verification with `ring`.
//!
//! Only three algorithms exist here: ES384, RS384 and EdDSA (Ed25519). `none`, every
//! `HS*` and everything else are rejected while parsing, before any key is looked at, so
//! a public key can never be used as an HMAC secret (SM6). On top of that each use passes
//! its own allow-list to [`Jws::verify`], and the key type must match the algorithm.
//!
//! Parsing is strict: at most [`crate::MAX_JWS_LEN`] bytes, exactly three base64url parts
//! without padding, header and payload JSON objects without duplicate member names, and
//! the header parameters `crit`, `jku`, `x5u`, `jwk`, `x5c`, `b64` and `zip` are refused
//! (we never fetch keys from URLs, trust embedded keys, or process extensions).

use crate::jwk::PublicJwk;
use crate::{MAX_JWS_LEN, b64, strict_json};
use serde_json::{Map, Value};
use std::fmt;

/// Maximum length of a `kid`.
pub const MAX_KID_LEN: usize = 256;

/// Header parameters that are always refused.
const FORBIDDEN_HEADER_PARAMS: &[&str] = &["crit", "jku", "x5u", "jwk", "x5c", "b64", "zip"];

/// A JWS algorithm phivault can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Alg {
    /// ECDSA P-256 with SHA-256; signature is `r || s`, 64 bytes (DPoP proofs).
    ES256,
    /// ECDSA P-384 with SHA-384; signature is `r || s`, 96 bytes.
    ES384,
    /// RSASSA-PKCS1-v1_5 with SHA-384, 2048–8192-bit keys.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048–8192-bit keys (external identity providers).
    RS256,
    /// Ed25519.
    EdDSA,
}

impl Alg {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::RS384 => "RS384",
            Alg::RS256 => "RS256",
            Alg::EdDSA => "EdDSA",
        }
    }

    /// Parses a JOSE name; `None` for anything not supported (including `none`, `HS*`).
    pub fn from_name(s: &str) -> Option<Alg> {
        match s {
            "ES256" => Some(Alg::ES256),
            "ES384" => Some(Alg::ES384),
            "RS384" => Some(Alg::RS384),
            "RS256" => Some(Alg::RS256),
            "EdDSA" => Some(Alg::EdDSA),
            _ => None,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// JWS parse/verify failures. Messages are fixed strings; no token content.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwsError {
    /// Longer than [`crate::MAX_JWS_LEN`].
    #[error("JWS too long")]
    TooLong,
    /// Structure, base64url or JSON problem.
    #[error("malformed JWS: {0}")]
    Malformed(&'static str),
    /// `alg` is not one phivault supports (`none`, `HS*`, …).
    #[error("unsupported JWS algorithm")]
    UnsupportedAlgorithm,
    /// A refused header parameter (`crit`, `jku`, `x5u`, `jwk`, …) is present.
    #[error("forbidden JWS header parameter")]
    ForbiddenHeader,
    /// The algorithm is supported but not allowed for this use.
    #[error("JWS algorithm not allowed here")]
    AlgorithmNotAllowed,
    /// The key's type (or declared `alg`) does not match the JWS algorithm.
    #[error("key does not match the JWS algorithm")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("bad JWS signature")]
    BadSignature,
}

/// A parsed, **not yet verified** compact JWS.
pub struct Jws {
    alg: Alg,
    kid: Option<String>,
    typ: Option<String>,
    signing_input: String,
    claims: Map<String, Value>,
    signature: Vec<u8>,
}

impl fmt::Debug for Jws {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jws")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("content", &"[redacted]")
            .finish()
    }
}

impl Jws {
    /// Parses a compact JWS from untrusted input. Does not verify anything cryptographic.
    pub fn parse(token: &str) -> Result<Jws, JwsError> {
        Self::parse_inner(token, false).map(|(j, _)| j)
    }

    /// [`Jws::parse`] for a DPoP proof (RFC 9449), whose header must carry its public key
    /// as `jwk`: the JWS and that JWK's JSON (to be parsed strictly by the caller).
    pub fn parse_with_jwk(token: &str) -> Result<(Jws, Value), JwsError> {
        let (j, jwk) = Self::parse_inner(token, true)?;
        Ok((j, jwk.ok_or(JwsError::Malformed("jwk missing"))?))
    }

    fn parse_inner(token: &str, embedded_key: bool) -> Result<(Jws, Option<Value>), JwsError> {
        if token.len() > MAX_JWS_LEN {
            return Err(JwsError::TooLong);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwsError::Malformed("expected exactly three parts"));
        };
        if h.is_empty() || p.is_empty() || s.is_empty() {
            return Err(JwsError::Malformed("empty part"));
        }
        let header_bytes = b64::decode(h).ok_or(JwsError::Malformed("header is not base64url"))?;
        let payload = b64::decode(p).ok_or(JwsError::Malformed("payload is not base64url"))?;
        let signature = b64::decode(s).ok_or(JwsError::Malformed("signature is not base64url"))?;
        let header = strict_json::parse_object(&header_bytes)
            .ok_or(JwsError::Malformed("header is not a JSON object"))?;
        if FORBIDDEN_HEADER_PARAMS
            .iter()
            .any(|k| header.contains_key(*k) && !(embedded_key && *k == "jwk"))
        {
            return Err(JwsError::ForbiddenHeader);
        }
        let jwk = header.get("jwk").cloned();
        let alg = match header.get("alg") {
            Some(Value::String(a)) => Alg::from_name(a).ok_or(JwsError::UnsupportedAlgorithm)?,
            _ => return Err(JwsError::Malformed("alg missing or not a string")),
        };
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KID_LEN => Some(k.clone()),
            Some(_) => return Err(JwsError::Malformed("kid is not a valid string")),
        };
        let typ = match header.get("typ") {
            None => None,
            Some(Value::String(t)) if t.len() <= 64 => Some(t.clone()),
            Some(_) => return Err(JwsError::Malformed("typ is not a valid string")),
        };
        let claims = strict_json::parse_object(&payload)
            .ok_or(JwsError::Malformed("payload is not a JSON object"))?;
        let signing_input = token[..h.len() + 1 + p.len()].to_owned();
        Ok((
            Jws {
                alg,
                kid,
                typ,
                signing_input,
                claims,
                signature,
            },
            jwk,
        ))
    }

    /// The header's algorithm.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The header's `kid`, if any.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The header's `typ`, if any.
    pub fn typ(&self) -> Option<&str> {
        self.typ.as_deref()
    }

    /// Claims before verification: only for choosing which key to verify with.
    pub(crate) fn unverified_claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// Verifies the signature with `key`, provided the algorithm is in `allowed` and
    /// matches the key; returns the claim set on success.
    pub fn verify(
        &self,
        key: &PublicJwk,
        allowed: &[Alg],
    ) -> Result<&Map<String, Value>, JwsError> {
        if !allowed.contains(&self.alg) {
            return Err(JwsError::AlgorithmNotAllowed);
        }
        if !key.permits(self.alg) {
            return Err(JwsError::KeyMismatch);
        }
        if key.verify_signature(self.alg, self.signing_input.as_bytes(), &self.signature) {
            Ok(&self.claims)
        } else {
            Err(JwsError::BadSignature)
        }
    }
}

/// Builds `b64(header).b64(claims).b64(sign(signing_input))`.
pub(crate) fn encode_compact<E>(
    header: &Value,
    claims: &Value,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E>
where
    E: From<crate::AuthError>,
{
    let h =
        serde_json::to_vec(header).map_err(|_| crate::AuthError::Serialization("JWS header"))?;
    let c =
        serde_json::to_vec(claims).map_err(|_| crate::AuthError::Serialization("JWS claims"))?;
    let mut out = b64::encode(&h);
    out.push('.');
    out.push_str(&b64::encode(&c));
    let sig = sign(out.as_bytes())?;
    out.push('.');
    out.push_str(&b64::encode(&sig));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwk::generate_es384_jwk;
    use serde_json::json;

    fn seg(v: &Value) -> String {
        b64::encode(&serde_json::to_vec(v).expect("json"))
    }

    fn token(header: &Value, claims: &Value, sig: &[u8]) -> String {
        format!("{}.{}.{}", seg(header), seg(claims), b64::encode(sig))
    }

    #[test]
    fn es384_round_trip_and_tamper() {
        let (sk, pk) = generate_es384_jwk("k1").expect("gen");
        let t = sk.sign_jws(&json!({"sub": "a"})).expect("sign");
        let jws = Jws::parse(&t).expect("parse");
        assert_eq!(jws.alg(), Alg::ES384);
        assert_eq!(jws.kid(), Some("k1"));
        assert_eq!(jws.typ(), Some("JWT"));
        let claims = jws.verify(&pk, &[Alg::ES384]).expect("verify");
        assert_eq!(claims.get("sub"), Some(&json!("a")));
        // not in the allow-list
        assert_eq!(
            jws.verify(&pk, &[Alg::RS384]).err(),
            Some(JwsError::AlgorithmNotAllowed)
        );
        // another key
        let (_, other) = generate_es384_jwk("k1").expect("gen");
        assert_eq!(
            jws.verify(&other, &[Alg::ES384]).err(),
            Some(JwsError::BadSignature)
        );
        // tampered payload
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], seg(&json!({"sub": "b"})), parts[2]);
        let jws = Jws::parse(&forged).expect("parse");
        assert_eq!(
            jws.verify(&pk, &[Alg::ES384]).err(),
            Some(JwsError::BadSignature)
        );
    }

    #[test]
    fn header_rules() {
        let c = json!({"a": 1});
        let sig = [1u8; 96];
        for alg in ["none", "HS256", "HS384", "HS512", "PS384", "", "es384"] {
            let t = token(&json!({"alg": alg}), &c, &sig);
            assert_eq!(
                Jws::parse(&t).err(),
                Some(JwsError::UnsupportedAlgorithm),
                "{alg}"
            );
        }
        // ES256 parses (DPoP proofs) but is not allowed where the caller does not list it
        let t = token(&json!({"alg": "ES256"}), &c, &[1u8; 64]);
        let es256 = Jws::parse(&t).expect("parses");
        let (p384, _) = crate::jwk::generate_es384_jwk("k").expect("key");
        assert_eq!(
            es256.verify(&p384.public(), &[Alg::ES384]).err(),
            Some(JwsError::AlgorithmNotAllowed)
        );
        // an embedded jwk only where asked for
        let h = json!({"alg": "ES256", "jwk": {"kty": "EC"}});
        assert_eq!(
            Jws::parse(&token(&h, &c, &sig)).err(),
            Some(JwsError::ForbiddenHeader)
        );
        assert!(Jws::parse_with_jwk(&token(&h, &c, &sig)).is_ok());
        assert!(Jws::parse_with_jwk(&t).is_err(), "no jwk");
        for p in FORBIDDEN_HEADER_PARAMS {
            let mut h = json!({"alg": "ES384"});
            h[*p] = json!("x");
            assert_eq!(
                Jws::parse(&token(&h, &c, &sig)).err(),
                Some(JwsError::ForbiddenHeader)
            );
        }
        assert!(Jws::parse(&token(&json!({"alg": 5}), &c, &sig)).is_err());
        assert!(Jws::parse(&token(&json!({}), &c, &sig)).is_err());
        assert!(Jws::parse(&token(&json!({"alg": "ES384", "kid": 1}), &c, &sig)).is_err());
        assert!(Jws::parse(&token(&json!({"alg": "ES384", "kid": ""}), &c, &sig)).is_err());
        assert!(Jws::parse(&token(&json!({"alg": "ES384", "typ": 1}), &c, &sig)).is_err());
        assert!(Jws::parse(&token(&json!({"alg": "ES384"}), &json!([1]), &sig)).is_err());
        assert!(Jws::parse(&token(&json!({"alg": "ES384"}), &c, &sig)).is_ok());
        // duplicate header member
        let dup = format!(
            "{}.{}.{}",
            b64::encode(br#"{"alg":"ES384","alg":"none"}"#),
            seg(&c),
            b64::encode(&sig)
        );
        assert!(matches!(Jws::parse(&dup), Err(JwsError::Malformed(_))));
    }

    #[test]
    fn structure_rules() {
        let good = token(&json!({"alg": "ES384"}), &json!({}), &[1u8; 96]);
        assert!(Jws::parse(&good).is_ok());
        assert!(matches!(
            Jws::parse(&format!("{good}.x")),
            Err(JwsError::Malformed(_))
        ));
        assert!(matches!(Jws::parse("a.b"), Err(JwsError::Malformed(_))));
        assert!(matches!(Jws::parse(""), Err(JwsError::Malformed(_))));
        let parts: Vec<&str> = good.split('.').collect();
        assert!(Jws::parse(&format!("{}.{}.", parts[0], parts[1])).is_err());
        assert!(Jws::parse(&format!("{}=.{}.{}", parts[0], parts[1], parts[2])).is_err());
        assert!(Jws::parse(&format!("{}.{}!.{}", parts[0], parts[1], parts[2])).is_err());
        assert!(Jws::parse(&format!("{}.{}.{}+", parts[0], parts[1], parts[2])).is_err());
        let big = token(
            &json!({"alg": "ES384"}),
            &json!({"pad": "x".repeat(MAX_JWS_LEN)}),
            &[1u8; 96],
        );
        assert_eq!(Jws::parse(&big).err(), Some(JwsError::TooLong));
    }

    #[test]
    fn debug_redacts() {
        let (sk, _) = generate_es384_jwk("k1").expect("gen");
        let t = sk.sign_jws(&json!({"secret": "PHI"})).expect("sign");
        let jws = Jws::parse(&t).expect("parse");
        let d = format!("{jws:?}");
        assert!(!d.contains("PHI") && !d.contains(&t[..20]));
    }
}
