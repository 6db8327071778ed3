//! DPoP proofs arrive in a request header from anyone: verification never panics and
//! accepts nothing but a well-formed proof signed by the key it carries.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let url = "https://fhir.example/fhir/Patient/1";
        let _ = phivault_auth::dpop::verify_proof(s, "GET", url, 1_750_000_000, Some("t"));
        let _ = phivault_auth::dpop::verify_proof(s, "POST", url, 1_750_000_000, None);
    }
});
