//! `cargo +nightly fuzz run parse_bundle` (from crates/fhir).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = phivault_fhir::parse_resource(data) {
        let _ = phivault_fhir::validate(&v);
        if let Ok((_, entries)) = phivault_fhir::parse_bundle(&v, 1000) {
            let order = phivault_fhir::transaction_order(&entries);
            assert_eq!(order.len(), entries.len());
        }
    }
});
