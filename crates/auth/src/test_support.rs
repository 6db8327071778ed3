//! Shared fixtures for unit tests.

use crate::b64;
use crate::client_assertion::ClientRecord;
use crate::jwk::{PrivateJwk, PublicJwk, generate_es384_jwk};
use crate::scope::ScopeSet;
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) const NOW: u64 = 1_750_000_000;
pub(crate) const TOKEN_URL: &str = "https://fhir.example.org/auth/token";
pub(crate) const CLIENT_ID: &str = "backend-app";
pub(crate) const ES_KID: &str = "es-key-1";
pub(crate) const RS_KID: &str = "rs-key-1";
pub(crate) const ED_KID: &str = "ed-key-1";
pub(crate) const RSA_PKCS8: &[u8] = include_bytes!("../tests/fixtures/rsa2048.pk8.der");

static JTI: AtomicU64 = AtomicU64::new(0);

pub(crate) struct TestClient {
    pub(crate) es: PrivateJwk,
    pub(crate) rsa: signature::RsaKeyPair,
    pub(crate) ed: signature::Ed25519KeyPair,
    pub(crate) record: ClientRecord,
}

fn seg(v: &Value) -> String {
    b64::encode(&serde_json::to_vec(v).expect("json"))
}

pub(crate) fn unsigned(header: &Value, claims: &Value) -> String {
    format!("{}.{}.", seg(header), seg(claims))
}

pub(crate) fn tamper_payload(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&b64::decode(parts[1]).expect("b64")).expect("json");
    claims["scope"] = json!("system/*.cruds");
    format!("{}.{}.{}", parts[0], seg(&claims), parts[2])
}

pub(crate) fn tamper_signature(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut sig = b64::decode(parts[2]).expect("b64");
    sig[10] ^= 1;
    format!("{}.{}.{}", parts[0], parts[1], b64::encode(&sig))
}

impl TestClient {
    pub(crate) fn new() -> TestClient {
        let (es, es_pub) = generate_es384_jwk(ES_KID).expect("es key");
        let rsa = signature::RsaKeyPair::from_pkcs8(RSA_PKCS8).expect("rsa fixture");
        let c: signature::RsaPublicKeyComponents<Vec<u8>> = rsa.public().into();
        let rs_pub = PublicJwk::from_json(
            &json!({"kty": "RSA", "kid": RS_KID, "n": b64::encode(&c.n), "e": b64::encode(&c.e)}),
        )
        .expect("rsa jwk");
        let rng = SystemRandom::new();
        let ed_doc = signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("ed");
        let ed = signature::Ed25519KeyPair::from_pkcs8(ed_doc.as_ref()).expect("ed");
        let ed_pub = PublicJwk::from_ed25519(ED_KID, ed.public_key().as_ref()).expect("ed jwk");
        let record = ClientRecord {
            client_id: CLIENT_ID.to_owned(),
            name: "Test backend".to_owned(),
            jwks: vec![es_pub, rs_pub, ed_pub],
            scopes: ScopeSet::parse("system/Patient.rs system/Observation.cruds").expect("scopes"),
            disabled: false,
            export_key: None,
        };
        TestClient {
            es,
            rsa,
            ed,
            record,
        }
    }

    pub(crate) fn lookup(&self, id: &str) -> Option<ClientRecord> {
        (id == self.record.client_id).then(|| self.record.clone())
    }

    pub(crate) fn claims(&self) -> Value {
        let n = JTI.fetch_add(1, Ordering::Relaxed);
        json!({
            "iss": CLIENT_ID,
            "sub": CLIENT_ID,
            "aud": TOKEN_URL,
            "exp": NOW + 240,
            "iat": NOW,
            "jti": format!("jti-{n}"),
        })
    }

    pub(crate) fn es384(&self, claims: &Value) -> String {
        self.es.sign_jws(claims).expect("sign")
    }

    pub(crate) fn es384_header(&self, header: &Value, claims: &Value) -> String {
        self.es.sign_with_header(header, claims).expect("sign")
    }

    fn rsa_sign(
        &self,
        alg: &str,
        pad: &'static dyn signature::RsaEncoding,
        claims: &Value,
    ) -> String {
        let header = json!({"alg": alg, "kid": RS_KID, "typ": "JWT"});
        let input = format!("{}.{}", seg(&header), seg(claims));
        let mut sig = vec![0u8; self.rsa.public().modulus_len()];
        self.rsa
            .sign(pad, &SystemRandom::new(), input.as_bytes(), &mut sig)
            .expect("rsa sign");
        format!("{input}.{}", b64::encode(&sig))
    }

    pub(crate) fn rs384(&self, claims: &Value) -> String {
        self.rsa_sign("RS384", &signature::RSA_PKCS1_SHA384, claims)
    }

    pub(crate) fn rs256(&self, claims: &Value) -> String {
        self.rsa_sign("RS256", &signature::RSA_PKCS1_SHA256, claims)
    }

    pub(crate) fn eddsa(&self, claims: &Value) -> String {
        let header = json!({"alg": "EdDSA", "kid": ED_KID});
        let input = format!("{}.{}", seg(&header), seg(claims));
        let sig = self.ed.sign(input.as_bytes());
        format!("{input}.{}", b64::encode(sig.as_ref()))
    }

    /// The classic key-confusion attack: HS256 keyed with the public key's bytes.
    pub(crate) fn hs256_with_public_key(&self, claims: &Value) -> String {
        let header = json!({"alg": "HS256", "kid": ES_KID});
        let input = format!("{}.{}", seg(&header), seg(claims));
        let key_bytes = serde_json::to_vec(&self.es.public().to_json()).expect("json");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key_bytes);
        let tag = ring::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", b64::encode(tag.as_ref()))
    }
}
