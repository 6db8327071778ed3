//! Access tokens of external identity providers arrive as bearer tokens from anyone:
//! choosing the issuer and verifying never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use phivault_auth::oidc::{ExternalIssuer, IdpConfig, unverified_issuer, unverified_kid};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = unverified_issuer(s);
    let _ = unverified_kid(s);
    let idp = ExternalIssuer::new(IdpConfig {
        issuer: "https://idp.example".into(),
        audience: "https://fhir.example/fhir".into(),
        username_claim: "preferred_username".into(),
        ca_pem: None,
    });
    // a key set from the same bytes, then the token against it
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(s) {
        let _ = idp.set_jwks(&v);
    }
    let _ = idp.verify(s, 1_750_000_000, &|_| None);
});
