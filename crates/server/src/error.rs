//! One error type for every route, mapped to an OperationOutcome in one place.
//!
//! What the client sees is a fixed, value-free message; what is logged is the route
//! template, the request id and the error kind — never bodies, query strings or tokens.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use phivault_fhir::{Issue, IssueCode, Severity};

/// An error answered to the client as an OperationOutcome.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Issues reported (messages carry no input values).
    pub issues: Vec<Issue>,
    /// `WWW-Authenticate` challenge for 401s.
    pub challenge: Option<String>,
    /// `Retry-After` (seconds) for 429s and 503s.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with one issue.
    pub fn new(status: StatusCode, code: IssueCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            issues: vec![Issue {
                severity: Severity::Error,
                code,
                path: None,
                message: message.into(),
            }],
            challenge: None,
            retry_after: None,
        }
    }

    /// 400 with the given issues.
    pub fn invalid(issues: Vec<Issue>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            issues,
            challenge: None,
            retry_after: None,
        }
    }

    /// 400 bad request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, IssueCode::Invalid, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, IssueCode::NotFound, message)
    }

    /// 401 with a bearer challenge.
    pub fn unauthorized(challenge: String) -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            IssueCode::Login,
            "a valid bearer access token is required",
        );
        e.challenge = Some(challenge);
        e
    }

    /// 403.
    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            IssueCode::Forbidden,
            "the access token's scopes do not permit this interaction",
        )
    }

    /// 503 when the request cannot be made durable (audit or data).
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            IssueCode::Transient,
            "the request could not be recorded durably; nothing was done; retry later",
        )
    }

    /// 500 for an integrity failure of stored data (never returned as data).
    pub fn integrity() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueCode::Exception,
            "stored data failed its integrity check; it was not returned and the incident was recorded",
        )
    }

    /// 500 for an internal failure, with no internals.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueCode::Exception,
            "internal error",
        )
    }
}

/// The one place a records error becomes an HTTP status.
impl From<phivault_records::Error> for ApiError {
    fn from(e: phivault_records::Error) -> Self {
        use phivault_records::Kind;
        let status = match e.kind {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Gone => StatusCode::GONE,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            issues: e.issues,
            challenge: None,
            retry_after: None,
        }
    }
}

impl From<phivault_share::Error> for ApiError {
    fn from(e: phivault_share::Error) -> Self {
        match e {
            phivault_share::Error::Records(e) => e.into(),
            phivault_share::Error::TooSoon { retry_after_s, why } => {
                let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, IssueCode::Throttled, why);
                e.retry_after = Some(retry_after_s);
                e
            }
            phivault_share::Error::Passcode { .. } => ApiError::new(
                StatusCode::UNAUTHORIZED,
                IssueCode::Security,
                "the passcode was refused",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = phivault_fhir::operation_outcome(&self.issues);
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (self.status, bytes).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::FHIR_JSON),
        );
        if let Some(c) = self.challenge
            && let Ok(v) = HeaderValue::from_str(&c)
        {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
