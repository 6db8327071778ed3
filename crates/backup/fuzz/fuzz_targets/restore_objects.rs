//! What a restore reads from a target anyone with write access may have changed: object
//! headers, segments, manifests, the head and `deployment.json` are refused or read,
//! never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = phivault_crypto::backup::ObjectHeader::parse(data);
    let _ = phivault_backup::pages::decode_segment(data);
    let _ = phivault_backup::manifest::Manifest::verify(data, &[7; 32], "fuzz");
    let _ = serde_json::from_slice::<phivault_backup::manifest::Head>(data);
    let _ = serde_json::from_slice::<phivault_backup::manifest::Deployment>(data);
});
