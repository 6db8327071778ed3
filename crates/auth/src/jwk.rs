//! JSON Web Keys (RFC 7517/7518/8037) for the three supported algorithms, parsed strictly
//! from untrusted JSON, and ES384 key generation for clients.
//!
//! Public keys accepted: `{"kty":"EC","crv":"P-384","x","y"}` (the point is checked to be
//! on the curve when the key is parsed), `{"kty":"RSA","n","e"}` with a 2048–8192-bit
//! modulus, and `{"kty":"OKP","crv":"Ed25519","x"}`. A `kid` is required. A JWK that
//! carries private material (`d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`, `k`) is refused as a
//! public key: registering a private key is always a mistake.

use crate::b64;
use crate::error::AuthError;
use crate::jws::{Alg, MAX_KID_LEN, encode_compact};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value, json};
use std::fmt;
use zeroize::Zeroizing;

const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
const P384_COORD_LEN: usize = 48;
const P256_COORD_LEN: usize = 32;
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

#[derive(Clone, PartialEq, Eq)]
enum KeyMaterial {
    /// Uncompressed SEC1 point `0x04 || x || y`.
    EcP384(Vec<u8>),
    /// Uncompressed SEC1 point `0x04 || x || y` (DPoP proof keys).
    EcP256(Vec<u8>),
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ed25519(Vec<u8>),
}

/// A public signing key with its `kid`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicJwk {
    kid: String,
    alg: Option<Alg>,
    key: KeyMaterial,
}

impl fmt::Debug for PublicJwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicJwk")
            .field("kid", &self.kid)
            .field("kty", &self.kty())
            .field("alg", &self.alg)
            .finish()
    }
}

fn valid_kid(kid: &str) -> bool {
    !kid.is_empty() && kid.len() <= MAX_KID_LEN && kid.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

fn get_str<'a>(m: &'a Map<String, Value>, k: &'static str) -> Result<Option<&'a str>, AuthError> {
    match m.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(AuthError::InvalidKey("JWK member is not a string")),
    }
}

fn req_b64(m: &Map<String, Value>, k: &'static str) -> Result<Vec<u8>, AuthError> {
    let s = get_str(m, k)?.ok_or(AuthError::InvalidKey("JWK member missing"))?;
    b64::decode(s).ok_or(AuthError::InvalidKey("JWK member is not base64url"))
}

fn bit_len(be: &[u8]) -> usize {
    match be.first() {
        None => 0,
        Some(&b) => (be.len() - 1) * 8 + (8 - b.leading_zeros() as usize),
    }
}

/// Checks that `point` is a valid P-384 public key by running an ephemeral ECDH with it
/// (ring validates the peer point; ring has no other public point-validation API).
fn point_is_valid(curve: &'static ring::agreement::Algorithm, point: &[u8]) -> bool {
    use ring::agreement;
    let rng = SystemRandom::new();
    let Ok(eph) = agreement::EphemeralPrivateKey::generate(curve, &rng) else {
        return false;
    };
    let peer = agreement::UnparsedPublicKey::new(curve, point);
    agreement::agree_ephemeral(eph, &peer, |_| ()).is_ok()
}

/// `0x04 || x || y` from a JWK's `x` and `y` of `len` bytes each, checked to be on `curve`.
fn ec_point(
    m: &Map<String, Value>,
    len: usize,
    curve: &'static ring::agreement::Algorithm,
) -> Result<Vec<u8>, AuthError> {
    let x = req_b64(m, "x")?;
    let y = req_b64(m, "y")?;
    if x.len() != len || y.len() != len {
        return Err(AuthError::InvalidKey(
            "EC JWK coordinates have the wrong length",
        ));
    }
    let mut point = Vec::with_capacity(1 + 2 * len);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    if !point_is_valid(curve, &point) {
        return Err(AuthError::InvalidKey("EC JWK point is not on its curve"));
    }
    Ok(point)
}

impl PublicJwk {
    /// Parses a public JWK from JSON.
    pub fn from_json(v: &Value) -> Result<PublicJwk, AuthError> {
        let m = v
            .as_object()
            .ok_or(AuthError::InvalidKey("JWK is not a JSON object"))?;
        if PRIVATE_MEMBERS.iter().any(|k| m.contains_key(*k)) {
            return Err(AuthError::InvalidKey("JWK contains private key material"));
        }
        let kid = get_str(m, "kid")?.ok_or(AuthError::InvalidKey("JWK kid missing"))?;
        if !valid_kid(kid) {
            return Err(AuthError::InvalidKey("JWK kid invalid"));
        }
        if let Some(u) = get_str(m, "use")?
            && u != "sig"
        {
            return Err(AuthError::InvalidKey("JWK use is not sig"));
        }
        let alg = match get_str(m, "alg")? {
            None => None,
            Some(a) => Some(Alg::from_name(a).ok_or(AuthError::InvalidKey("JWK alg unsupported"))?),
        };
        let key = match get_str(m, "kty")? {
            Some("EC") => match get_str(m, "crv")? {
                Some("P-384") => {
                    KeyMaterial::EcP384(ec_point(m, P384_COORD_LEN, &ring::agreement::ECDH_P384)?)
                }
                Some("P-256") => {
                    KeyMaterial::EcP256(ec_point(m, P256_COORD_LEN, &ring::agreement::ECDH_P256)?)
                }
                _ => {
                    return Err(AuthError::InvalidKey("EC JWK curve must be P-384 or P-256"));
                }
            },
            Some("RSA") => {
                let n = req_b64(m, "n")?;
                let e = req_b64(m, "e")?;
                if n.first() == Some(&0) || e.first() == Some(&0) {
                    return Err(AuthError::InvalidKey("RSA JWK integer has leading zeros"));
                }
                let bits = bit_len(&n);
                if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                    return Err(AuthError::InvalidKey("RSA modulus must be 2048-8192 bits"));
                }
                if e.is_empty() || e.len() > 4 || e.last().is_none_or(|b| b & 1 == 0) || e == [1] {
                    return Err(AuthError::InvalidKey("RSA exponent invalid"));
                }
                KeyMaterial::Rsa { n, e }
            }
            Some("OKP") => {
                if get_str(m, "crv")? != Some("Ed25519") {
                    return Err(AuthError::InvalidKey("OKP JWK curve must be Ed25519"));
                }
                let x = req_b64(m, "x")?;
                if x.len() != 32 {
                    return Err(AuthError::InvalidKey("Ed25519 JWK x must be 32 bytes"));
                }
                KeyMaterial::Ed25519(x)
            }
            _ => return Err(AuthError::InvalidKey("JWK kty unsupported")),
        };
        let jwk = PublicJwk {
            kid: kid.to_owned(),
            alg,
            key,
        };
        if let Some(a) = alg
            && !jwk.kty_matches(a)
        {
            return Err(AuthError::InvalidKey("JWK alg does not match kty"));
        }
        Ok(jwk)
    }

    /// An Ed25519 public key from its 32 raw bytes.
    pub fn from_ed25519(kid: &str, public_key: &[u8]) -> Result<PublicJwk, AuthError> {
        if !valid_kid(kid) {
            return Err(AuthError::InvalidKey("kid invalid"));
        }
        if public_key.len() != 32 {
            return Err(AuthError::InvalidKey("Ed25519 public key must be 32 bytes"));
        }
        Ok(PublicJwk {
            kid: kid.to_owned(),
            alg: Some(Alg::EdDSA),
            key: KeyMaterial::Ed25519(public_key.to_vec()),
        })
    }

    /// A public key embedded in a JWS header (a DPoP proof's `jwk`), which has no `kid`
    /// of its own: parsed as strictly as [`PublicJwk::from_json`].
    pub fn from_embedded(v: &Value) -> Result<PublicJwk, AuthError> {
        let mut v = v.clone();
        match v.as_object_mut() {
            Some(m) if !m.contains_key("kid") => {
                m.insert("kid".into(), json!("embedded"));
            }
            Some(_) => {}
            None => return Err(AuthError::InvalidKey("JWK is not a JSON object")),
        }
        PublicJwk::from_json(&v)
    }

    /// The RFC 7638 JWK SHA-256 thumbprint, base64url: the required members only, in
    /// lexicographic order, without white space.
    pub fn thumbprint(&self) -> String {
        let canonical = match &self.key {
            KeyMaterial::EcP384(p) | KeyMaterial::EcP256(p) => {
                let crv = if matches!(self.key, KeyMaterial::EcP384(_)) {
                    "P-384"
                } else {
                    "P-256"
                };
                let (x, y) = p[1..].split_at((p.len() - 1) / 2);
                format!(
                    r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
                    b64::encode(x),
                    b64::encode(y)
                )
            }
            KeyMaterial::Rsa { n, e } => format!(
                r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                b64::encode(e),
                b64::encode(n)
            ),
            KeyMaterial::Ed25519(x) => {
                format!(
                    r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                    b64::encode(x)
                )
            }
        };
        b64::encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    }

    /// The JWK JSON (public members only).
    pub fn to_json(&self) -> Value {
        let mut v = match &self.key {
            KeyMaterial::EcP384(p) => {
                let (x, y) = p[1..].split_at(P384_COORD_LEN);
                json!({"kty": "EC", "crv": "P-384", "x": b64::encode(x), "y": b64::encode(y)})
            }
            KeyMaterial::EcP256(p) => {
                let (x, y) = p[1..].split_at(P256_COORD_LEN);
                json!({"kty": "EC", "crv": "P-256", "x": b64::encode(x), "y": b64::encode(y)})
            }
            KeyMaterial::Rsa { n, e } => {
                json!({"kty": "RSA", "n": b64::encode(n), "e": b64::encode(e)})
            }
            KeyMaterial::Ed25519(x) => json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(x)}),
        };
        v["kid"] = json!(self.kid);
        v["use"] = json!("sig");
        if let Some(a) = self.alg {
            v["alg"] = json!(a.as_str());
        }
        v
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `EC`, `RSA` or `OKP`.
    pub fn kty(&self) -> &'static str {
        match self.key {
            KeyMaterial::EcP384(_) | KeyMaterial::EcP256(_) => "EC",
            KeyMaterial::Rsa { .. } => "RSA",
            KeyMaterial::Ed25519(_) => "OKP",
        }
    }

    /// The declared `alg`, if the JWK had one.
    pub fn alg(&self) -> Option<Alg> {
        self.alg
    }

    fn kty_matches(&self, alg: Alg) -> bool {
        matches!(
            (&self.key, alg),
            (KeyMaterial::EcP384(_), Alg::ES384)
                | (KeyMaterial::EcP256(_), Alg::ES256)
                | (KeyMaterial::Rsa { .. }, Alg::RS384 | Alg::RS256)
                | (KeyMaterial::Ed25519(_), Alg::EdDSA)
        )
    }

    /// Whether this key may verify signatures made with `alg`: the key type must match and
    /// a declared `alg` must be the same.
    pub fn permits(&self, alg: Alg) -> bool {
        self.kty_matches(alg) && self.alg.is_none_or(|a| a == alg)
    }

    pub(crate) fn verify_signature(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        if !self.permits(alg) {
            return false;
        }
        match &self.key {
            KeyMaterial::EcP384(point) => {
                sig.len() == 2 * P384_COORD_LEN
                    && signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                        .verify(msg, sig)
                        .is_ok()
            }
            KeyMaterial::EcP256(point) => {
                sig.len() == 2 * P256_COORD_LEN
                    && signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                        .verify(msg, sig)
                        .is_ok()
            }
            KeyMaterial::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(
                    if alg == Alg::RS256 {
                        &signature::RSA_PKCS1_2048_8192_SHA256
                    } else {
                        &signature::RSA_PKCS1_2048_8192_SHA384
                    },
                    msg,
                    sig,
                )
                .is_ok(),
            KeyMaterial::Ed25519(x) => {
                sig.len() == 64
                    && signature::UnparsedPublicKey::new(&signature::ED25519, x)
                        .verify(msg, sig)
                        .is_ok()
            }
        }
    }
}

impl Serialize for PublicJwk {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PublicJwk {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        PublicJwk::from_json(&v).map_err(serde::de::Error::custom)
    }
}

/// An ES384 private key in JWK form, for clients (generated by `phivault client`, used to
/// sign client assertions). `Debug` never shows key material; `d` is zeroized on drop.
#[derive(Clone)]
pub struct PrivateJwk {
    kid: String,
    /// `0x04 || x || y`
    point: Vec<u8>,
    d: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for PrivateJwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateJwk")
            .field("kid", &self.kid)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl PrivateJwk {
    fn key_pair(&self, rng: &SystemRandom) -> Result<EcdsaKeyPair, AuthError> {
        EcdsaKeyPair::from_private_key_and_public_key(
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            &self.d,
            &self.point,
            rng,
        )
        .map_err(|_| AuthError::InvalidKey("private key does not match public key"))
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The matching public key.
    pub fn public(&self) -> PublicJwk {
        PublicJwk {
            kid: self.kid.clone(),
            alg: Some(Alg::ES384),
            key: KeyMaterial::EcP384(self.point.clone()),
        }
    }

    /// The private JWK JSON as a string that is zeroized on drop.
    pub fn to_json_string(&self) -> Result<Zeroizing<String>, AuthError> {
        serde_json::to_string(self)
            .map(Zeroizing::new)
            .map_err(|_| AuthError::Serialization("private JWK"))
    }

    /// Parses a private ES384 JWK (as written by [`PrivateJwk::to_json_string`]) and checks
    /// that `d` matches `x`/`y`.
    pub fn from_json_str(s: &str) -> Result<PrivateJwk, AuthError> {
        let v: Zeroizing<String> = Zeroizing::new(s.to_owned());
        let m: Map<String, Value> = serde_json::from_str(&v)
            .map_err(|_| AuthError::InvalidKey("private JWK is not JSON"))?;
        if get_str(&m, "kty")? != Some("EC") || get_str(&m, "crv")? != Some("P-384") {
            return Err(AuthError::InvalidKey("private JWK must be EC P-384"));
        }
        if let Some(a) = get_str(&m, "alg")?
            && a != "ES384"
        {
            return Err(AuthError::InvalidKey("private JWK alg must be ES384"));
        }
        let kid = get_str(&m, "kid")?.ok_or(AuthError::InvalidKey("JWK kid missing"))?;
        if !valid_kid(kid) {
            return Err(AuthError::InvalidKey("JWK kid invalid"));
        }
        let x = req_b64(&m, "x")?;
        let y = req_b64(&m, "y")?;
        let d = Zeroizing::new(req_b64(&m, "d")?);
        if x.len() != P384_COORD_LEN || y.len() != P384_COORD_LEN || d.len() != P384_COORD_LEN {
            return Err(AuthError::InvalidKey("EC JWK members must be 48 bytes"));
        }
        let mut point = vec![0x04];
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        let k = PrivateJwk {
            kid: kid.to_owned(),
            point,
            d,
        };
        k.key_pair(&SystemRandom::new())?;
        Ok(k)
    }

    /// Signs `claims` as a compact JWS with header `{"alg":"ES384","kid":…,"typ":"JWT"}`.
    pub fn sign_jws(&self, claims: &Value) -> Result<String, AuthError> {
        let header = json!({"alg": "ES384", "kid": self.kid, "typ": "JWT"});
        self.sign_with_header(&header, claims)
    }

    /// Signs with an arbitrary header (tests build malformed headers with this).
    pub(crate) fn sign_with_header(
        &self,
        header: &Value,
        claims: &Value,
    ) -> Result<String, AuthError> {
        let rng = SystemRandom::new();
        let kp = self.key_pair(&rng)?;
        encode_compact(header, claims, |msg| {
            kp.sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| AuthError::Crypto("ECDSA signing failed"))
        })
    }
}

impl Serialize for PrivateJwk {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (x, y) = self.point[1..].split_at(P384_COORD_LEN);
        let d = Zeroizing::new(b64::encode(&self.d));
        let mut m = s.serialize_map(Some(8))?;
        m.serialize_entry("kty", "EC")?;
        m.serialize_entry("crv", "P-384")?;
        m.serialize_entry("x", &b64::encode(x))?;
        m.serialize_entry("y", &b64::encode(y))?;
        m.serialize_entry("d", d.as_str())?;
        m.serialize_entry("kid", &self.kid)?;
        m.serialize_entry("alg", "ES384")?;
        m.serialize_entry("use", "sig")?;
        m.end()
    }
}

/// Generates an ES384 key pair for a client. The private scalar is taken out of ring's
/// PKCS#8 document with a strict DER walker and the pair is checked by re-importing it.
pub fn generate_es384_jwk(kid: &str) -> Result<(PrivateJwk, PublicJwk), AuthError> {
    if !valid_kid(kid) {
        return Err(AuthError::InvalidKey("kid invalid"));
    }
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
        .map_err(|_| AuthError::Crypto("key generation failed"))?;
    let kp = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        doc.as_ref(),
        &rng,
    )
    .map_err(|_| AuthError::Crypto("generated key rejected"))?;
    let d = crate::der::p384_private_scalar_from_pkcs8(doc.as_ref())
        .ok_or(AuthError::Crypto("unexpected PKCS#8 layout"))?;
    let private = PrivateJwk {
        kid: kid.to_owned(),
        point: kp.public_key().as_ref().to_vec(),
        d: Zeroizing::new(d.to_vec()),
    };
    private.key_pair(&rng)?;
    let public = private.public();
    Ok((private, public))
}

/// Generates an Ed25519 PKCS#8 (v2) document for the access-token issuer key.
pub fn generate_ed25519_pkcs8() -> Result<Zeroizing<Vec<u8>>, AuthError> {
    let rng = SystemRandom::new();
    signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map(|d| Zeroizing::new(d.as_ref().to_vec()))
        .map_err(|_| AuthError::Crypto("key generation failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const RSA_PKCS8: &[u8] = include_bytes!("../tests/fixtures/rsa2048.pk8.der");

    fn rsa_public(kid: &str) -> Value {
        let kp = signature::RsaKeyPair::from_pkcs8(RSA_PKCS8).expect("rsa fixture");
        let c: signature::RsaPublicKeyComponents<Vec<u8>> = kp.public().into();
        json!({"kty": "RSA", "kid": kid, "n": b64::encode(&c.n), "e": b64::encode(&c.e)})
    }

    #[test]
    fn generated_key_round_trips() {
        let (sk, pk) = generate_es384_jwk("client-key-1").expect("gen");
        assert_eq!(pk.kid(), "client-key-1");
        let s = sk.to_json_string().expect("json");
        let v: Value = serde_json::from_str(&s).expect("json");
        for k in ["kty", "crv", "x", "y", "d", "kid", "alg", "use"] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["alg"], "ES384");
        assert_eq!(v["use"], "sig");
        let back = PrivateJwk::from_json_str(&s).expect("parse private");
        assert_eq!(back.public(), pk);
        // The public JWK parses from its own JSON and refuses the private JSON.
        assert_eq!(PublicJwk::from_json(&pk.to_json()).expect("pub"), pk);
        assert!(PublicJwk::from_json(&v).is_err());
        // Debug hides the key.
        let dbg = format!("{sk:?}");
        assert!(dbg.contains("[redacted]"));
        assert!(!dbg.contains(v["d"].as_str().unwrap_or("?")));
    }

    #[test]
    fn mismatched_private_key_rejected() {
        let (a, _) = generate_es384_jwk("a").expect("gen");
        let (b, _) = generate_es384_jwk("a").expect("gen");
        let mut va: Value = serde_json::from_str(&a.to_json_string().expect("j")).expect("j");
        let vb: Value = serde_json::from_str(&b.to_json_string().expect("j")).expect("j");
        va["d"] = vb["d"].clone();
        assert!(PrivateJwk::from_json_str(&va.to_string()).is_err());
    }

    #[test]
    fn public_jwk_rules() {
        let (_, pk) = generate_es384_jwk("k").expect("gen");
        let good = pk.to_json();
        let mut v = good.clone();
        v["crv"] = json!("P-256");
        assert!(PublicJwk::from_json(&v).is_err());
        let mut v = good.clone();
        v.as_object_mut().map(|m| m.remove("kid"));
        assert!(PublicJwk::from_json(&v).is_err());
        let mut v = good.clone();
        v["alg"] = json!("RS384");
        assert!(PublicJwk::from_json(&v).is_err());
        let mut v = good.clone();
        v["alg"] = json!("HS256");
        assert!(PublicJwk::from_json(&v).is_err());
        let mut v = good.clone();
        v["use"] = json!("enc");
        assert!(PublicJwk::from_json(&v).is_err());
        // point not on the curve
        let mut v = good.clone();
        v["y"] = json!(b64::encode(&[7u8; 48]));
        assert!(PublicJwk::from_json(&v).is_err());
        // short coordinate
        let mut v = good.clone();
        v["x"] = json!(b64::encode(&[7u8; 47]));
        assert!(PublicJwk::from_json(&v).is_err());
        assert!(PublicJwk::from_json(&json!({"kty": "oct", "k": "AAAA", "kid": "x"})).is_err());
        assert!(PublicJwk::from_json(&json!("str")).is_err());

        // RSA
        let rsa = PublicJwk::from_json(&rsa_public("r")).expect("rsa");
        assert_eq!(rsa.kty(), "RSA");
        assert!(rsa.permits(Alg::RS384) && !rsa.permits(Alg::ES384));
        let mut small = rsa_public("r");
        small["n"] = json!(b64::encode(&[0xffu8; 255])); // 2040 bits
        assert!(PublicJwk::from_json(&small).is_err());
        let mut lead = rsa_public("r");
        let mut n = vec![0u8];
        n.extend_from_slice(&[0xffu8; 256]);
        lead["n"] = json!(b64::encode(&n));
        assert!(PublicJwk::from_json(&lead).is_err());
        let mut even = rsa_public("r");
        even["e"] = json!(b64::encode(&[2]));
        assert!(PublicJwk::from_json(&even).is_err());

        // OKP
        let ed = PublicJwk::from_json(
            &json!({"kty": "OKP", "crv": "Ed25519", "kid": "e", "x": b64::encode(&[1u8; 32])}),
        )
        .expect("okp");
        assert!(ed.permits(Alg::EdDSA) && !ed.permits(Alg::ES384));
    }

    #[test]
    fn serde_round_trip() {
        let (_, pk) = generate_es384_jwk("k").expect("gen");
        let s = serde_json::to_string(&pk).expect("ser");
        let back: PublicJwk = serde_json::from_str(&s).expect("de");
        assert_eq!(back, pk);
    }
}
