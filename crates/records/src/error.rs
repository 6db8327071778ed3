//! The records' one error type: what went wrong, as a kind and issues whose messages carry
//! no input values. The HTTP crate maps each kind to a status in one place.

use phivault_fhir::{Issue, IssueCode, Severity};

/// What kind of failure (each maps to one HTTP status in the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// The request is malformed, unsupported or too costly.
    BadRequest,
    /// Nothing there (or nothing the caller may know is there).
    NotFound,
    /// It was there and was deleted.
    Gone,
    /// The access does not permit it.
    Forbidden,
    /// Lost too many races.
    Conflict,
    /// A version precondition failed.
    PreconditionFailed,
    /// Could not be made durable; nothing was done.
    Unavailable,
    /// Stored data failed its integrity check, or an internal failure.
    Internal,
}

/// The message of [`Error::erased`].
const INTEGRITY: &str =
    "stored data failed its integrity check; it was not returned and the incident was recorded";
const ERASED: &str =
    "the resource was erased: the data key of the patient it belongs to was destroyed";

/// A failure of a records operation.
#[derive(Debug, Clone)]
pub struct Error {
    /// Its kind.
    pub kind: Kind,
    /// Issues reported (messages carry no input values).
    pub issues: Vec<Issue>,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.issues.first() {
            Some(i) => write!(f, "{:?}: {}", self.kind, i.message),
            None => write!(f, "{:?}", self.kind),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// An error with one issue.
    pub fn new(kind: Kind, code: IssueCode, message: impl Into<String>) -> Self {
        Error {
            kind,
            issues: vec![Issue {
                severity: Severity::Error,
                code,
                path: None,
                message: message.into(),
            }],
        }
    }

    /// Invalid input with the given issues.
    pub fn invalid(issues: Vec<Issue>) -> Self {
        Error {
            kind: Kind::BadRequest,
            issues,
        }
    }

    /// Invalid input.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Kind::BadRequest, IssueCode::Invalid, message)
    }

    /// Too costly to answer.
    pub fn too_costly(message: impl Into<String>) -> Self {
        Self::new(Kind::BadRequest, IssueCode::TooCostly, message)
    }

    /// Not supported.
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(Kind::BadRequest, IssueCode::NotSupported, message)
    }

    /// Not found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, IssueCode::NotFound, message)
    }

    /// Not permitted by the access.
    pub fn forbidden() -> Self {
        Self::new(
            Kind::Forbidden,
            IssueCode::Forbidden,
            "the access token's scopes do not permit this interaction",
        )
    }

    /// Could not be made durable (audit or data).
    pub fn unavailable() -> Self {
        Self::new(
            Kind::Unavailable,
            IssueCode::Transient,
            "the request could not be recorded durably; nothing was done; retry later",
        )
    }

    /// Stored data failed its integrity check (never returned as data).
    pub fn integrity() -> Self {
        Self::new(Kind::Internal, IssueCode::Exception, INTEGRITY)
    }

    /// Whether this is [`Error::integrity`]: a damaged record, which fails its own read
    /// and nothing else.
    pub fn is_integrity(&self) -> bool {
        self.kind == Kind::Internal && self.issues.first().is_some_and(|i| i.message == INTEGRITY)
    }

    /// A storage failure: storage changed outside phivault is an integrity failure (the
    /// row is not served), anything else leaves the request undone.
    pub fn from_store(e: phivault_store::StoreError) -> Self {
        match e {
            phivault_store::StoreError::Tampered(_) => Self::integrity(),
            _ => Self::unavailable(),
        }
    }

    /// The record's patient was erased (its data key destroyed): 410, with no PHI.
    pub fn erased() -> Self {
        Self::new(Kind::Gone, IssueCode::Deleted, ERASED)
    }

    /// Whether this is [`Error::erased`] (searches leave such records out).
    pub fn is_erased(&self) -> bool {
        self.kind == Kind::Gone && self.issues.first().is_some_and(|i| i.message == ERASED)
    }

    /// An internal failure, with no internals.
    pub fn internal() -> Self {
        Self::new(Kind::Internal, IssueCode::Exception, "internal error")
    }
}
