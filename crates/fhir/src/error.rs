//! The crate's error type.

use crate::issue::{Issue, IssueCode, Severity};

/// Errors from parsing resources and Bundles.
///
/// No variant carries a value taken from the input: positions, limits, entry indices and fixed
/// reasons only, so `Display` output is safe to log and to return to a client.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirError {
    /// The body is not syntactically valid JSON (or is truncated).
    #[error("body is not valid JSON (line {line}, column {column})")]
    InvalidJson { line: usize, column: usize },
    /// A JSON object has the same key twice.
    #[error("JSON object has a duplicate key (line {line}, column {column})")]
    DuplicateKey { line: usize, column: usize },
    /// Objects/arrays are nested deeper than [`crate::MAX_DEPTH`].
    #[error("JSON nesting exceeds the maximum depth of {max}")]
    TooDeep { max: usize },
    /// The top-level JSON value is not an object.
    #[error("resource must be a JSON object")]
    NotAnObject,
    /// `resourceType` is absent.
    #[error("resourceType is missing")]
    MissingResourceType,
    /// `resourceType` is present but not a string.
    #[error("resourceType must be a string")]
    InvalidResourceType,
    /// A Bundle was expected.
    #[error("expected a Bundle resource")]
    NotABundle,
    /// `Bundle.type` is missing or not `batch`/`transaction`.
    #[error("Bundle.type must be batch or transaction")]
    UnsupportedBundleType,
    /// The Bundle has more entries than allowed.
    #[error("Bundle has more than {max} entries")]
    TooManyEntries { max: usize },
    /// A Bundle entry is malformed.
    #[error("Bundle.entry[{index}]: {reason}")]
    Entry { index: usize, reason: &'static str },
    /// A Bundle entry uses an HTTP method this server does not support (e.g. PATCH).
    #[error("Bundle.entry[{index}]: method {method} is not supported")]
    UnsupportedMethod { index: usize, method: &'static str },
    /// The vendored FHIR definitions could not be loaded (a build defect, never input-driven).
    #[error("FHIR definitions are unavailable")]
    Definitions,
}

impl FhirError {
    /// The OperationOutcome issue code that fits this error.
    pub fn issue_code(&self) -> IssueCode {
        match self {
            FhirError::InvalidJson { .. }
            | FhirError::DuplicateKey { .. }
            | FhirError::NotAnObject
            | FhirError::InvalidResourceType
            | FhirError::NotABundle => IssueCode::Structure,
            FhirError::TooDeep { .. } | FhirError::TooManyEntries { .. } => IssueCode::TooCostly,
            FhirError::MissingResourceType => IssueCode::Required,
            FhirError::UnsupportedBundleType | FhirError::UnsupportedMethod { .. } => {
                IssueCode::NotSupported
            }
            FhirError::Entry { .. } => IssueCode::Invalid,
            FhirError::Definitions => IssueCode::Exception,
        }
    }

    /// This error as a single error-severity [`Issue`] (message = `Display`, no input values).
    pub fn to_issue(&self) -> Issue {
        let path = match self {
            FhirError::Entry { index, .. } | FhirError::UnsupportedMethod { index, .. } => {
                Some(format!("Bundle.entry[{index}]"))
            }
            _ => None,
        };
        Issue {
            severity: Severity::Error,
            code: self.issue_code(),
            path,
            message: self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_issue_has_path_for_entries() {
        let e = FhirError::Entry {
            index: 3,
            reason: "x",
        };
        let i = e.to_issue();
        assert_eq!(i.path.as_deref(), Some("Bundle.entry[3]"));
        assert_eq!(i.code, IssueCode::Invalid);
        assert_eq!(i.message, "Bundle.entry[3]: x");
        assert_eq!(
            FhirError::TooDeep { max: 64 }.issue_code(),
            IssueCode::TooCostly
        );
    }
}
