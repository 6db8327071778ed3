//! Crate-level error types.
//!
//! The `&'static str` reasons carried by these errors are fixed strings written in this
//! crate: they are safe to log and never contain token, key or request content.

/// Errors from key handling and token issuing (operator-facing, not client-facing).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// A key could not be parsed or was rejected by the crypto provider.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// The crypto provider failed (random generation, signing).
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
    /// Serialization of a header or claim set failed.
    #[error("serialization failed: {0}")]
    Serialization(&'static str),
    /// A configuration value was refused.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
}

/// OAuth 2.0 token endpoint errors (RFC 6749 §5.2).
///
/// `Display` and [`OAuthError::description`] give only a generic description suitable for
/// the HTTP body; [`OAuthError::reason`] gives the precise internal reason for logs.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OAuthError {
    /// `invalid_request`: malformed request (e.g. duplicate parameters).
    #[error("invalid_request: the request is malformed")]
    InvalidRequest(&'static str),
    /// `invalid_client`: client authentication failed (every assertion failure).
    #[error("invalid_client: client authentication failed")]
    InvalidClient(&'static str),
    /// `invalid_grant`.
    #[error("invalid_grant: the grant is invalid")]
    InvalidGrant(&'static str),
    /// `unauthorized_client`.
    #[error("unauthorized_client: the client may not use this grant type")]
    UnauthorizedClient(&'static str),
    /// `unsupported_grant_type`.
    #[error("unsupported_grant_type: only client_credentials is supported")]
    UnsupportedGrantType,
    /// `invalid_scope`: malformed scope, or nothing left after intersecting with the
    /// client's registered scopes.
    #[error("invalid_scope: the requested scope is invalid")]
    InvalidScope(&'static str),
    /// `server_error`: token issuing failed on the server side.
    #[error("server_error: the server could not issue a token")]
    ServerError(&'static str),
    /// `invalid_dpop_proof` (RFC 9449 §5): missing, malformed, replayed or for another
    /// key or request.
    #[error("invalid_dpop_proof: the DPoP proof is invalid")]
    InvalidDpopProof(&'static str),
}

impl OAuthError {
    /// The RFC 6749 `error` code.
    pub fn error_code(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(_) => "invalid_request",
            OAuthError::InvalidClient(_) => "invalid_client",
            OAuthError::InvalidGrant(_) => "invalid_grant",
            OAuthError::UnauthorizedClient(_) => "unauthorized_client",
            OAuthError::UnsupportedGrantType => "unsupported_grant_type",
            OAuthError::InvalidScope(_) => "invalid_scope",
            OAuthError::ServerError(_) => "server_error",
            OAuthError::InvalidDpopProof(_) => "invalid_dpop_proof",
        }
    }

    /// HTTP status: 401 for `invalid_client`, 500 for `server_error`, 400 otherwise.
    pub fn http_status(&self) -> u16 {
        match self {
            OAuthError::InvalidClient(_) => 401,
            OAuthError::ServerError(_) => 500,
            _ => 400,
        }
    }

    /// Generic, client-safe `error_description`.
    pub fn description(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(_) => "The request is malformed.",
            OAuthError::InvalidClient(_) => "Client authentication failed.",
            OAuthError::InvalidGrant(_) => "The grant is invalid.",
            OAuthError::UnauthorizedClient(_) => "The client may not use this grant type.",
            OAuthError::UnsupportedGrantType => "Only client_credentials is supported.",
            OAuthError::InvalidScope(_) => "The requested scope is invalid or not granted.",
            OAuthError::ServerError(_) => "The server could not issue a token.",
            OAuthError::InvalidDpopProof(_) => "The DPoP proof is missing or invalid.",
        }
    }

    /// Precise internal reason, for logs only (never for the HTTP body).
    pub fn reason(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(r)
            | OAuthError::InvalidClient(r)
            | OAuthError::InvalidGrant(r)
            | OAuthError::UnauthorizedClient(r)
            | OAuthError::InvalidScope(r)
            | OAuthError::ServerError(r)
            | OAuthError::InvalidDpopProof(r) => r,
            OAuthError::UnsupportedGrantType => "unsupported grant_type",
        }
    }

    /// JSON body `{"error": ..., "error_description": ...}` (RFC 6749 §5.2).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": self.error_code(),
            "error_description": self.description(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses() {
        let e = OAuthError::InvalidClient("kid unknown");
        assert_eq!(e.error_code(), "invalid_client");
        assert_eq!(e.http_status(), 401);
        assert_eq!(e.reason(), "kid unknown");
        assert!(!e.to_string().contains("kid unknown"));
        assert!(!e.to_json().to_string().contains("kid unknown"));
        assert_eq!(OAuthError::InvalidScope("x").http_status(), 400);
        assert_eq!(
            OAuthError::UnsupportedGrantType.error_code(),
            "unsupported_grant_type"
        );
    }
}
