//! Validation issues and OperationOutcome construction.

use serde_json::{Map, Value, json};

/// OperationOutcome.issue.severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    /// The FHIR code (`fatal`, `error`, `warning`, `information`).
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// OperationOutcome.issue.code (the R4 `issue-type` value set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IssueCode {
    Invalid,
    Structure,
    Required,
    Value,
    Invariant,
    Security,
    Login,
    Unknown,
    Expired,
    Forbidden,
    Suppressed,
    Processing,
    NotSupported,
    Duplicate,
    MultipleMatches,
    NotFound,
    Deleted,
    TooLong,
    CodeInvalid,
    Extension,
    TooCostly,
    BusinessRule,
    Conflict,
    Transient,
    LockError,
    NoStore,
    Exception,
    Timeout,
    Incomplete,
    Throttled,
    Informational,
}

impl IssueCode {
    /// The FHIR code, e.g. `too-costly`.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::Invariant => "invariant",
            IssueCode::Security => "security",
            IssueCode::Login => "login",
            IssueCode::Unknown => "unknown",
            IssueCode::Expired => "expired",
            IssueCode::Forbidden => "forbidden",
            IssueCode::Suppressed => "suppressed",
            IssueCode::Processing => "processing",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Duplicate => "duplicate",
            IssueCode::MultipleMatches => "multiple-matches",
            IssueCode::NotFound => "not-found",
            IssueCode::Deleted => "deleted",
            IssueCode::TooLong => "too-long",
            IssueCode::CodeInvalid => "code-invalid",
            IssueCode::Extension => "extension",
            IssueCode::TooCostly => "too-costly",
            IssueCode::BusinessRule => "business-rule",
            IssueCode::Conflict => "conflict",
            IssueCode::Transient => "transient",
            IssueCode::LockError => "lock-error",
            IssueCode::NoStore => "no-store",
            IssueCode::Exception => "exception",
            IssueCode::Timeout => "timeout",
            IssueCode::Incomplete => "incomplete",
            IssueCode::Throttled => "throttled",
            IssueCode::Informational => "informational",
        }
    }
}

impl std::fmt::Display for IssueCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem found in a resource.
///
/// `path` is FHIRPath-like (`Patient.name[0].given[1]`); `message` never contains values taken
/// from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueCode,
    pub path: Option<String>,
    pub message: String,
}

impl Issue {
    /// An error-severity issue.
    pub fn error(code: IssueCode, path: Option<String>, message: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Error,
            code,
            path,
            message: message.into(),
        }
    }
}

/// OperationOutcome JSON for `issues`. An empty slice yields one `information` issue, because
/// an OperationOutcome must contain at least one issue.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    let list: Vec<Value> = if issues.is_empty() {
        vec![json!({
            "severity": "information",
            "code": "informational",
            "diagnostics": "no issues",
        })]
    } else {
        issues
            .iter()
            .map(|i| {
                let mut m = Map::new();
                m.insert("severity".into(), Value::from(i.severity.as_str()));
                m.insert("code".into(), Value::from(i.code.as_str()));
                if !i.message.is_empty() {
                    m.insert("diagnostics".into(), Value::from(i.message.as_str()));
                }
                if let Some(p) = &i.path {
                    m.insert("expression".into(), json!([p]));
                }
                Value::Object(m)
            })
            .collect()
    };
    json!({ "resourceType": "OperationOutcome", "issue": list })
}

/// OperationOutcome with a single error issue.
pub fn outcome_error(code: IssueCode, message: &str) -> Value {
    operation_outcome(&[Issue::error(code, None, message)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_shape() {
        let v = operation_outcome(&[Issue::error(
            IssueCode::Value,
            Some("Patient.birthDate".into()),
            "invalid date",
        )]);
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["severity"], "error");
        assert_eq!(v["issue"][0]["code"], "value");
        assert_eq!(v["issue"][0]["diagnostics"], "invalid date");
        assert_eq!(v["issue"][0]["expression"][0], "Patient.birthDate");
        assert!(crate::validate(&v).is_ok(), "{:?}", crate::validate(&v));

        let e = outcome_error(IssueCode::NotFound, "no such resource");
        assert_eq!(e["issue"][0]["code"], "not-found");
        assert!(e["issue"][0].get("expression").is_none());
        assert!(crate::validate(&e).is_ok());

        let empty = operation_outcome(&[]);
        assert_eq!(empty["issue"][0]["severity"], "information");
        assert!(crate::validate(&empty).is_ok());
        assert_eq!(IssueCode::TooCostly.to_string(), "too-costly");
    }
}
