//! `cargo +nightly fuzz run parse_resource` (from crates/fhir).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = phivault_fhir::parse_resource(data) {
        if let Err(issues) = phivault_fhir::validate(&v) {
            let _ = phivault_fhir::operation_outcome(&issues);
        }
        let _ = phivault_fhir::patient_compartment(&v);
        let mut v = v;
        phivault_fhir::for_each_reference_mut(&mut v, &mut |s| s.push('x'));
    }
});
