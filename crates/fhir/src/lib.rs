//! FHIR R4 resource handling for phivault: parsing untrusted JSON, validation against the
//! official HL7 R4 JSON schema, the Patient compartment, Bundle (batch/transaction) parsing and
//! OperationOutcome construction.
//!
//! The R4 definitions are vendored under `data/` (see `data/README.md`) and compiled once, lazily,
//! into an internal representation; nothing is fetched at run time.
//!
//! Errors and issues never echo values from the input (they may hold element paths, resource
//! types and bundle entry indices), so they can be logged and returned to clients without
//! leaking PHI.
#![forbid(unsafe_code)]

mod bundle;
mod compartment;
mod error;
mod formats;
mod issue;
mod parse;
mod reference;
mod schema;
pub mod search;

pub use bundle::{
    BundleType, EntryRequest, Method, parse_bundle, parse_bundle_owned, transaction_order,
};
pub use compartment::{
    patient_compartment, patient_compartment_params, patient_compartment_types,
    patient_compartments,
};
pub use error::FhirError;
pub use issue::{Issue, IssueCode, Severity, operation_outcome, outcome_error};
pub use parse::parse_resource;
pub use reference::{LocalBase, UnresolvableLocal, for_each_reference_mut, localize_references};
pub use schema::{is_known_resource_type, resource_types, validate};

/// Maximum nesting depth (objects and arrays) accepted in a resource.
///
/// Real FHIR resources rarely exceed ~12 levels; a Bundle holding resources with deep
/// extensions stays well under 64. The limit bounds recursion in every walker of this crate.
pub const MAX_DEPTH: usize = 64;

/// Maximum number of issues reported by [`validate`]; further problems are summarised in one
/// final `too-costly` issue.
pub const MAX_ISSUES: usize = 100;

/// FHIR id rule: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("123-abc.DEF"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a_b"));
        assert!(!is_valid_id("é"));
    }
}
