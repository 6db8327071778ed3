//! `cargo +nightly fuzz run parse_search` (from crates/fhir).
//! Input: `Type?name=value&name=value…` (bytes after the first `?` split on `&` and `=`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (rtype, query) = s.split_once('?').unwrap_or(("Observation", s));
    let pairs: Vec<(String, String)> = query
        .split('&')
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    for lenient in [false, true] {
        if let Ok(q) = phivault_fhir::search::parse_search(rtype, &pairs, lenient) {
            assert!(q.count <= phivault_fhir::search::MAX_COUNT);
            // the index lookup of any accepted query is computable
            let _ = phivault_fhir::search::lookup_terms(&q.criteria);
        }
    }
});
