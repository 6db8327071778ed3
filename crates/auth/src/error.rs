//! Crate-level error types, and [`TokenFailure`]: the one table of why a token request is
//! refused.
//!
//! The `&'static str` reasons carried by these errors are fixed strings written in this
//! crate: they are safe to log and never contain token, key or request content. So are the
//! codes and descriptions of [`TokenFailure`].

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

/// The description of every failure that must not tell an unknown client id from a
/// registered one: an unknown `kid`, a key that does not fit the `alg`, and a signature
/// that does not verify all read like an unknown client, since client ids and their `kid`s
/// (`{client_id}-1`) are not secret enough to make the difference harmless (see
/// [`TokenFailure::UnknownClient`]). The audit keeps the exact reason.
const NO_KEY: &str = "no registered key with the client assertion's iss and kid verifies it";

/// Why a token request was refused (RFC 6749 §5.2): for each reason, in one place, the
/// `error` code, the `error_description` the client reads and the short, stable reason
/// code the request's audit event keeps ([`TokenFailure::code`]).
///
/// Descriptions are fixed strings of this table: they never echo the request (no client
/// ids, no claims, no tokens), so they are safe to send and to log; they use only the
/// characters RFC 6749 §5.2 allows. Checks made before the client is looked up say exactly
/// what is wrong with the request; after the lookup, the descriptions are chosen so that
/// they do not tell whether a client id exists (see `client_assertion`'s module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenFailure {
    // --- invalid_request
    /// The body is not a UTF-8 form (or could not be read).
    BodyUnreadable,
    /// More parameters than the endpoint reads.
    TooManyParameters,
    /// A parameter appears twice.
    DuplicateParameter,
    /// No `grant_type`.
    GrantTypeMissing,
    /// `client_secret` beside a client assertion.
    MultipleClientAuth,
    /// `authorization_code` without `code`.
    CodeMissing,
    /// `authorization_code` without `redirect_uri`.
    RedirectUriMissing,
    /// `refresh_token` grant without the token.
    RefreshTokenMissing,
    /// Any other malformed request.
    RequestMalformed,
    // --- unsupported_grant_type
    /// A `grant_type` this server does not implement.
    GrantTypeUnsupported,
    // --- invalid_client: the client assertion, before the client is looked up
    /// No `client_assertion_type`.
    AssertionTypeMissing,
    /// A `client_assertion_type` other than JWT bearer.
    AssertionTypeUnsupported,
    /// No `client_assertion`.
    AssertionMissing,
    /// The assertion is longer than [`crate::MAX_JWS_LEN`].
    AssertionTooLong,
    /// Not a compact JWS with a JSON header and claim set.
    AssertionMalformed,
    /// `alg` is not ES384 or RS384 (`none`, `HS*`, RS256, EdDSA, …).
    AlgNotAllowed,
    /// A refused header parameter (`jku`, `x5u`, `jwk`, `crit`, …).
    HeaderForbidden,
    /// No `kid` in the header.
    KidMissing,
    /// `iss` missing, or not a possible client id.
    IssInvalid,
    /// The `client_id` parameter is not the assertion's `iss`.
    ClientIdMismatch,
    /// `sub` is not `iss`.
    IssSubMismatch,
    /// `aud` is not the token endpoint's URL.
    AudMismatch,
    /// No numeric `exp`.
    ExpMissing,
    /// `exp` is not in the future.
    AssertionExpired,
    /// `exp` more than five minutes (and the leeway) ahead.
    ExpTooFar,
    /// `iat` or `nbf` present but not a number.
    IatNbfInvalid,
    /// `iat` or `nbf` in the future (beyond the leeway).
    IatNbfInFuture,
    /// `jti` missing, empty or too long.
    JtiMissing,
    // --- invalid_client: after the lookup
    /// No client with the assertion's `iss`. Described exactly as [`Self::UnknownKid`].
    UnknownClient,
    /// The client has no key with the assertion's `kid`.
    UnknownKid,
    /// A disabled client, and the signature did not verify (or the key does not fit the
    /// `alg`): described as an unknown client, since nothing proves the caller is it.
    DisabledUnverified,
    /// The key named by `kid` is not of the `alg`'s type.
    AlgKeyMismatch,
    /// The signature does not verify with the key named by `kid`.
    SignatureInvalid,
    /// A disabled client whose assertion verified.
    ClientDisabled,
    /// The `jti` was seen before (checked only after the signature verified).
    JtiReplayed,
    /// The replay cache is full of unexpired entries (fails closed).
    ReplayCacheFull,
    // --- invalid_client: the App Launch grants (public apps)
    /// No `client_id`.
    ClientIdMissing,
    /// A public app sent a `client_secret` or `client_assertion`.
    PublicClientCredentials,
    /// `client_id` is not a registered, enabled app.
    UnknownApp,
    /// Any other client authentication failure.
    ClientAuthFailed,
    // --- invalid_grant
    /// `authorization_code` without `code_verifier`.
    CodeVerifierMissing,
    /// The code is not known.
    CodeUnknown,
    /// The code was already exchanged (its session is revoked).
    CodeReused,
    /// The code expired.
    CodeExpired,
    /// The code was issued to another client or redirect URI.
    CodeMismatch,
    /// The PKCE verifier does not match the challenge.
    PkceMismatch,
    /// The refresh token is not known.
    RefreshUnknown,
    /// A retired refresh token was presented (its session is revoked).
    RefreshReused,
    /// The session ended (revoked, expired or idle).
    SessionEnded,
    /// The refresh token belongs to another client.
    RefreshOtherClient,
    /// The person's account changed since sign-in.
    AccountChanged,
    /// Any other invalid grant.
    GrantInvalid,
    // --- unauthorized_client
    /// The client may not use this grant type.
    ClientUnauthorized,
    // --- invalid_scope
    /// No `scope`.
    ScopeMissing,
    /// `scope` is not a list of valid SMART scopes.
    ScopeMalformed,
    /// No requested scope is registered for the (authenticated) client.
    ScopeNotRegistered,
    /// A refresh asked for more than the session holds.
    ScopeWidened,
    /// Any other invalid scope.
    ScopeInvalid,
    // --- invalid_dpop_proof
    /// The app must send a DPoP proof and sent none.
    DpopRequired,
    /// The refresh token is bound to another DPoP key.
    DpopKeyMismatch,
    /// The DPoP proof is malformed, replayed or not for this request.
    DpopProofInvalid,
    // --- server_error
    /// Signing the access token failed.
    TokenIssuingFailed,
    /// Any other server-side failure.
    ServerError,
}

impl TokenFailure {
    /// Every failure (for tests and documentation).
    pub const ALL: &'static [TokenFailure] = {
        use TokenFailure::*;
        &[
            BodyUnreadable,
            TooManyParameters,
            DuplicateParameter,
            GrantTypeMissing,
            MultipleClientAuth,
            CodeMissing,
            RedirectUriMissing,
            RefreshTokenMissing,
            RequestMalformed,
            GrantTypeUnsupported,
            AssertionTypeMissing,
            AssertionTypeUnsupported,
            AssertionMissing,
            AssertionTooLong,
            AssertionMalformed,
            AlgNotAllowed,
            HeaderForbidden,
            KidMissing,
            IssInvalid,
            ClientIdMismatch,
            IssSubMismatch,
            AudMismatch,
            ExpMissing,
            AssertionExpired,
            ExpTooFar,
            IatNbfInvalid,
            IatNbfInFuture,
            JtiMissing,
            UnknownClient,
            UnknownKid,
            DisabledUnverified,
            AlgKeyMismatch,
            SignatureInvalid,
            ClientDisabled,
            JtiReplayed,
            ReplayCacheFull,
            ClientIdMissing,
            PublicClientCredentials,
            UnknownApp,
            ClientAuthFailed,
            CodeVerifierMissing,
            CodeUnknown,
            CodeReused,
            CodeExpired,
            CodeMismatch,
            PkceMismatch,
            RefreshUnknown,
            RefreshReused,
            SessionEnded,
            RefreshOtherClient,
            AccountChanged,
            GrantInvalid,
            ClientUnauthorized,
            ScopeMissing,
            ScopeMalformed,
            ScopeNotRegistered,
            ScopeWidened,
            ScopeInvalid,
            DpopRequired,
            DpopKeyMismatch,
            DpopProofInvalid,
            TokenIssuingFailed,
            ServerError,
        ]
    };

    /// The table: (`error`, reason code, `error_description`).
    fn row(self) -> (&'static str, &'static str, &'static str) {
        use TokenFailure::*;
        const REQ: &str = "invalid_request";
        const CLIENT: &str = "invalid_client";
        const GRANT: &str = "invalid_grant";
        const SCOPE: &str = "invalid_scope";
        const DPOP: &str = "invalid_dpop_proof";
        const SERVER: &str = "server_error";
        match self {
            BodyUnreadable => (
                REQ,
                "body-unreadable",
                "the request body is not an application/x-www-form-urlencoded form in UTF-8",
            ),
            TooManyParameters => (
                REQ,
                "too-many-parameters",
                "the request has too many parameters",
            ),
            DuplicateParameter => (
                REQ,
                "duplicate-parameter",
                "a request parameter appears more than once",
            ),
            GrantTypeMissing => (REQ, "grant-type-missing", "grant_type is missing"),
            MultipleClientAuth => (
                REQ,
                "multiple-client-auth",
                "the request uses more than one client authentication method",
            ),
            CodeMissing => (REQ, "code-missing", "code is missing"),
            RedirectUriMissing => (REQ, "redirect-uri-missing", "redirect_uri is missing"),
            RefreshTokenMissing => (REQ, "refresh-token-missing", "refresh_token is missing"),
            RequestMalformed => (REQ, "request-malformed", "the request is malformed"),
            GrantTypeUnsupported => (
                "unsupported_grant_type",
                "grant-type-unsupported",
                "grant_type is not client_credentials, authorization_code or refresh_token",
            ),
            AssertionTypeMissing => (
                CLIENT,
                "assertion-type-missing",
                "client_assertion_type is missing",
            ),
            AssertionTypeUnsupported => (
                CLIENT,
                "assertion-type-unsupported",
                "client_assertion_type is not urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            AssertionMissing => (CLIENT, "assertion-missing", "client_assertion is missing"),
            AssertionTooLong => (
                CLIENT,
                "assertion-too-long",
                "the client assertion is longer than 8192 bytes",
            ),
            AssertionMalformed => (
                CLIENT,
                "assertion-malformed",
                "the client assertion is not a compact JWS with a JSON header and claim set",
            ),
            AlgNotAllowed => (
                CLIENT,
                "alg-not-allowed",
                "the client assertion's alg is not ES384 or RS384",
            ),
            HeaderForbidden => (
                CLIENT,
                "header-forbidden",
                "the client assertion's header has a refused parameter (crit, jku, x5u, jwk, x5c, b64 or zip)",
            ),
            KidMissing => (
                CLIENT,
                "kid-missing",
                "the client assertion's header has no kid",
            ),
            IssInvalid => (
                CLIENT,
                "iss-invalid",
                "the client assertion's iss is missing or not a valid client id",
            ),
            ClientIdMismatch => (
                CLIENT,
                "client-id-mismatch",
                "the client_id parameter is not the client assertion's iss",
            ),
            IssSubMismatch => (
                CLIENT,
                "iss-sub-mismatch",
                "the client assertion's sub is not its iss",
            ),
            AudMismatch => (
                CLIENT,
                "aud-mismatch",
                "the client assertion's aud is not this token endpoint's URL",
            ),
            ExpMissing => (
                CLIENT,
                "exp-missing",
                "the client assertion has no numeric exp",
            ),
            AssertionExpired => (
                CLIENT,
                "assertion-expired",
                "the client assertion has expired",
            ),
            ExpTooFar => (
                CLIENT,
                "exp-too-far",
                "the client assertion's exp is more than five minutes ahead",
            ),
            IatNbfInvalid => (
                CLIENT,
                "iat-nbf-invalid",
                "the client assertion's iat or nbf is not a number",
            ),
            IatNbfInFuture => (
                CLIENT,
                "iat-nbf-in-future",
                "the client assertion's iat or nbf is in the future",
            ),
            JtiMissing => (
                CLIENT,
                "jti-missing",
                "the client assertion's jti is missing, empty or longer than 256 characters",
            ),
            UnknownClient => (CLIENT, "unknown-client", NO_KEY),
            UnknownKid => (CLIENT, "unknown-kid", NO_KEY),
            DisabledUnverified => (CLIENT, "client-disabled-unverified", NO_KEY),
            AlgKeyMismatch => (CLIENT, "alg-key-mismatch", NO_KEY),
            SignatureInvalid => (CLIENT, "signature-invalid", NO_KEY),
            ClientDisabled => (CLIENT, "client-disabled", "the client is disabled"),
            JtiReplayed => (
                CLIENT,
                "jti-replayed",
                "the client assertion's jti was used before",
            ),
            ReplayCacheFull => (
                CLIENT,
                "replay-cache-full",
                "the server accepts no more client assertions for now; retry in a few minutes",
            ),
            ClientIdMissing => (CLIENT, "client-id-missing", "client_id is missing"),
            PublicClientCredentials => (
                CLIENT,
                "public-client-credentials",
                "an app's authorization_code and refresh_token requests carry no client_secret or client_assertion",
            ),
            UnknownApp => (
                CLIENT,
                "unknown-app",
                "client_id is not a registered, enabled app",
            ),
            ClientAuthFailed => (CLIENT, "client-auth-failed", "client authentication failed"),
            CodeVerifierMissing => (GRANT, "code-verifier-missing", "code_verifier is missing"),
            CodeUnknown => (GRANT, "code-unknown", "the authorization code is not known"),
            CodeReused => (
                GRANT,
                "code-reused",
                "the authorization code was used before; the session it started is revoked",
            ),
            CodeExpired => (GRANT, "code-expired", "the authorization code has expired"),
            CodeMismatch => (
                GRANT,
                "code-mismatch",
                "the authorization code was issued for another client_id or redirect_uri",
            ),
            PkceMismatch => (
                GRANT,
                "pkce-mismatch",
                "code_verifier does not match the code_challenge",
            ),
            RefreshUnknown => (GRANT, "refresh-unknown", "the refresh token is not known"),
            RefreshReused => (
                GRANT,
                "refresh-reused",
                "the refresh token was used before; its session is revoked",
            ),
            SessionEnded => (
                GRANT,
                "session-ended",
                "the session has ended; sign in again",
            ),
            RefreshOtherClient => (
                GRANT,
                "refresh-other-client",
                "the refresh token was issued to another client_id",
            ),
            AccountChanged => (
                GRANT,
                "account-changed",
                "the account changed since sign-in; sign in again",
            ),
            GrantInvalid => (GRANT, "grant-invalid", "the grant is invalid"),
            ClientUnauthorized => (
                "unauthorized_client",
                "client-unauthorized",
                "the client may not use this grant type",
            ),
            ScopeMissing => (SCOPE, "scope-missing", "scope is missing"),
            ScopeMalformed => (
                SCOPE,
                "scope-malformed",
                "scope is not a space-separated list of valid SMART scopes",
            ),
            ScopeNotRegistered => (
                SCOPE,
                "scope-not-registered",
                "no requested scope is registered for the client",
            ),
            ScopeWidened => (
                SCOPE,
                "scope-widened",
                "a refresh cannot ask for scopes the session does not hold",
            ),
            ScopeInvalid => (SCOPE, "scope-invalid", "the requested scope is invalid"),
            DpopRequired => (DPOP, "dpop-required", "this app must send a DPoP proof"),
            DpopKeyMismatch => (
                DPOP,
                "dpop-key-mismatch",
                "the refresh token is bound to another DPoP key",
            ),
            DpopProofInvalid => (
                DPOP,
                "dpop-proof-invalid",
                "the DPoP proof is malformed, replayed or not for this request",
            ),
            TokenIssuingFailed => (
                SERVER,
                "token-issuing-failed",
                "the server could not issue a token",
            ),
            ServerError => (
                SERVER,
                "server-error",
                "the server could not complete the request",
            ),
        }
    }

    /// The RFC 6749 `error` code (`invalid_client`, `invalid_scope`, …).
    pub fn error(self) -> &'static str {
        self.row().0
    }

    /// The reason code kept in the audit event: short, stable, lower-case words joined by
    /// `-` (`assertion-expired`, `aud-mismatch`, `unknown-kid`, `scope-not-registered`, …).
    /// Unlike the description it tells an unknown client from an unknown `kid`: auditors
    /// may know which clients exist.
    pub fn code(self) -> &'static str {
        self.row().1
    }

    /// The `error_description` (RFC 6749 §5.2): which check failed, in words, for the
    /// client. A fixed string, safe for logs.
    pub fn description(self) -> &'static str {
        self.row().2
    }

    /// HTTP status: 401 for `invalid_client`, 500 for `server_error`, 400 otherwise.
    pub fn http_status(self) -> u16 {
        match self.error() {
            "invalid_client" => 401,
            "server_error" => 500,
            _ => 400,
        }
    }

    /// The failure an [`OAuthError`] stands for. The reasons the App Launch grants still
    /// give as strings (`authorize`, and the server's launch handler) are mapped here, in
    /// this one place; an unlisted reason falls back to the generic failure of its kind, so
    /// the `error` code never changes.
    pub fn of(e: &OAuthError) -> TokenFailure {
        use TokenFailure::*;
        let (fallback, reason) = match *e {
            OAuthError::Refused(f) => return f,
            OAuthError::UnsupportedGrantType => return GrantTypeUnsupported,
            OAuthError::InvalidRequest(r) => (RequestMalformed, r),
            OAuthError::InvalidClient(r) => (ClientAuthFailed, r),
            OAuthError::InvalidGrant(r) => (GrantInvalid, r),
            OAuthError::UnauthorizedClient(r) => (ClientUnauthorized, r),
            OAuthError::InvalidScope(r) => (ScopeInvalid, r),
            OAuthError::ServerError(r) => (ServerError, r),
            OAuthError::InvalidDpopProof(r) => (DpopProofInvalid, r),
        };
        let known = match reason {
            "too many parameters" => TooManyParameters,
            "duplicate parameter" => DuplicateParameter,
            "code missing" => CodeMissing,
            "redirect_uri missing" => RedirectUriMissing,
            "refresh_token missing" => RefreshTokenMissing,
            "client_id missing" => ClientIdMissing,
            "public clients do not authenticate" => PublicClientCredentials,
            "unknown client" => UnknownApp,
            "code_verifier missing" => CodeVerifierMissing,
            "unknown code" => CodeUnknown,
            "code already used" => CodeReused,
            "code expired" => CodeExpired,
            "code issued to another client or redirect" => CodeMismatch,
            "PKCE verifier does not match" => PkceMismatch,
            "unknown refresh token" => RefreshUnknown,
            "refresh token reused; session revoked" => RefreshReused,
            "session ended" => SessionEnded,
            "refresh token of another client" => RefreshOtherClient,
            "the account changed; sign in again" => AccountChanged,
            "scope malformed" => ScopeMalformed,
            "a refresh cannot widen the scope" => ScopeWidened,
            "this app must use DPoP" => DpopRequired,
            "refresh token bound to another key" => DpopKeyMismatch,
            "token issuing failed" => TokenIssuingFailed,
            _ => fallback,
        };
        if known.error() == fallback.error() {
            known
        } else {
            fallback
        }
    }
}

impl From<TokenFailure> for OAuthError {
    fn from(f: TokenFailure) -> OAuthError {
        OAuthError::Refused(f)
    }
}

/// OAuth 2.0 token endpoint errors (RFC 6749 §5.2).
///
/// The client credentials grant refuses with [`OAuthError::Refused`], naming the
/// [`TokenFailure`]; the other variants carry a fixed reason string (the App Launch grants
/// still build them) that [`TokenFailure::of`] maps. `Display` gives the `error` code and
/// the description; [`OAuthError::to_json`] is the HTTP body.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OAuthError {
    /// A refusal with its reason (every refusal of the client credentials grant).
    #[error("{}: {}", .0.error(), .0.description())]
    Refused(TokenFailure),
    /// `invalid_request`: malformed request (e.g. duplicate parameters).
    #[error("invalid_request: the request is malformed")]
    InvalidRequest(&'static str),
    /// `invalid_client`: client authentication failed.
    #[error("invalid_client: client authentication failed")]
    InvalidClient(&'static str),
    /// `invalid_grant`.
    #[error("invalid_grant: the grant is invalid")]
    InvalidGrant(&'static str),
    /// `unauthorized_client`.
    #[error("unauthorized_client: the client may not use this grant type")]
    UnauthorizedClient(&'static str),
    /// `unsupported_grant_type`.
    #[error("unsupported_grant_type: the grant type is not supported")]
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
    /// Why the request was refused ([`TokenFailure::of`]).
    pub fn failure(&self) -> TokenFailure {
        TokenFailure::of(self)
    }

    /// The RFC 6749 `error` code.
    pub fn error_code(&self) -> &'static str {
        self.failure().error()
    }

    /// HTTP status: 401 for `invalid_client`, 500 for `server_error`, 400 otherwise.
    pub fn http_status(&self) -> u16 {
        self.failure().http_status()
    }

    /// The client-safe `error_description`, naming the failed check.
    pub fn description(&self) -> &'static str {
        self.failure().description()
    }

    /// Precise reason for logs: the reason code of a [`OAuthError::Refused`], the fixed
    /// reason string otherwise.
    pub fn reason(&self) -> &'static str {
        match self {
            OAuthError::Refused(f) => f.code(),
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
        let f = self.failure();
        serde_json::json!({
            "error": f.error(),
            "error_description": f.description(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

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
        let e = OAuthError::from(TokenFailure::AssertionExpired);
        assert_eq!(e.error_code(), "invalid_client");
        assert_eq!(e.http_status(), 401);
        assert_eq!(e.reason(), "assertion-expired");
        assert_eq!(
            e.to_json(),
            serde_json::json!({"error": "invalid_client",
                "error_description": "the client assertion has expired"})
        );
        assert_eq!(
            e.to_string(),
            "invalid_client: the client assertion has expired"
        );
        assert_eq!(
            OAuthError::from(TokenFailure::ScopeNotRegistered).http_status(),
            400
        );
        assert_eq!(
            OAuthError::from(TokenFailure::TokenIssuingFailed).http_status(),
            500
        );
    }

    /// The table: every code unique and of the `a-z0-9-` form, every description unique
    /// except where sameness is the point, in RFC 6749 §5.2's character set, and every
    /// `error` one of RFC 6749's (or RFC 9449's) codes.
    #[test]
    fn the_reason_table_is_well_formed() {
        let mut codes = HashSet::new();
        let mut descriptions = HashSet::new();
        for f in TokenFailure::ALL {
            let code = f.code();
            assert!(codes.insert(code), "{code} twice");
            assert!(
                !code.is_empty()
                    && code.len() <= 32
                    && code
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !code.starts_with('-')
                    && !code.ends_with('-'),
                "{code}"
            );
            let d = f.description();
            assert!(
                !d.is_empty()
                    && d.bytes()
                        .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\'),
                "{code}: {d}"
            );
            if d != NO_KEY {
                assert!(descriptions.insert(d), "{code}: description shared");
            }
            assert!(
                [
                    "invalid_request",
                    "invalid_client",
                    "invalid_grant",
                    "unauthorized_client",
                    "unsupported_grant_type",
                    "invalid_scope",
                    "invalid_dpop_proof",
                    "server_error",
                ]
                .contains(&f.error()),
                "{code}"
            );
            assert_eq!(TokenFailure::of(&OAuthError::Refused(*f)), *f);
        }
        assert_eq!(codes.len(), TokenFailure::ALL.len());
    }

    /// An unknown client, an unknown kid of a registered client, a key that does not fit
    /// the alg, a bad signature and a disabled client whose assertion did not verify read
    /// the same to the caller; the audit tells them apart.
    #[test]
    fn unknown_client_and_unknown_kid_read_the_same() {
        let same = [
            TokenFailure::UnknownClient,
            TokenFailure::UnknownKid,
            TokenFailure::DisabledUnverified,
            TokenFailure::AlgKeyMismatch,
            TokenFailure::SignatureInvalid,
        ];
        for f in same {
            assert_eq!(
                OAuthError::from(f).to_json(),
                OAuthError::from(same[0]).to_json()
            );
            assert_eq!(f.description(), NO_KEY);
        }
        let codes: HashSet<_> = same.iter().map(|f| f.code()).collect();
        assert_eq!(codes.len(), same.len());
        // no other failure shares that description
        for f in TokenFailure::ALL.iter().filter(|f| !same.contains(f)) {
            assert_ne!(f.description(), NO_KEY, "{}", f.code());
        }
    }

    /// The reasons the App Launch grants give as strings map to their failures, keeping
    /// their `error`; an unknown reason falls back to the generic failure of its kind.
    #[test]
    fn string_reasons_map_without_changing_the_error() {
        for (e, want) in [
            (
                OAuthError::InvalidGrant("unknown code"),
                TokenFailure::CodeUnknown,
            ),
            (
                OAuthError::InvalidGrant("code already used"),
                TokenFailure::CodeReused,
            ),
            (
                OAuthError::InvalidGrant("refresh token of another client"),
                TokenFailure::RefreshOtherClient,
            ),
            (
                OAuthError::InvalidScope("a refresh cannot widen the scope"),
                TokenFailure::ScopeWidened,
            ),
            (
                OAuthError::InvalidClient("unknown client"),
                TokenFailure::UnknownApp,
            ),
            (
                OAuthError::InvalidDpopProof("this app must use DPoP"),
                TokenFailure::DpopRequired,
            ),
            (
                OAuthError::InvalidDpopProof("htu missing"),
                TokenFailure::DpopProofInvalid,
            ),
            (
                OAuthError::InvalidGrant("something new"),
                TokenFailure::GrantInvalid,
            ),
            // a known reason under another kind keeps the kind
            (
                OAuthError::InvalidGrant("unknown client"),
                TokenFailure::GrantInvalid,
            ),
            (
                OAuthError::UnsupportedGrantType,
                TokenFailure::GrantTypeUnsupported,
            ),
        ] {
            assert_eq!(e.failure(), want, "{e:?}");
            assert_eq!(e.failure().error(), e.error_code(), "{e:?}");
        }
        for e in [
            OAuthError::InvalidRequest("x"),
            OAuthError::InvalidClient("x"),
            OAuthError::InvalidGrant("x"),
            OAuthError::UnauthorizedClient("x"),
            OAuthError::InvalidScope("x"),
            OAuthError::ServerError("x"),
            OAuthError::InvalidDpopProof("x"),
        ] {
            let kind = e.to_string();
            assert!(kind.starts_with(e.error_code()), "{kind}");
        }
    }

    /// Every reason string `authorize` gives maps to a failure of its own (a reworded
    /// reason there would otherwise fall back to the generic description unnoticed).
    #[test]
    fn every_reason_of_the_authorization_server_is_mapped() {
        let src = concat!(include_str!("authorize.rs"), include_str!("grants.rs"));
        let mut seen = 0;
        for kind in [
            "InvalidRequest",
            "InvalidClient",
            "InvalidGrant",
            "InvalidScope",
        ] {
            let needle = format!("OAuthError::{kind}(\"");
            for (at, _) in src.match_indices(&needle) {
                let rest = &src[at + needle.len()..];
                let Some(end) = rest.find('"') else { continue };
                let reason: &'static str = Box::leak(rest[..end].to_owned().into_boxed_str());
                let e = match kind {
                    "InvalidRequest" => OAuthError::InvalidRequest(reason),
                    "InvalidClient" => OAuthError::InvalidClient(reason),
                    "InvalidGrant" => OAuthError::InvalidGrant(reason),
                    _ => OAuthError::InvalidScope(reason),
                };
                let fallback = [
                    TokenFailure::RequestMalformed,
                    TokenFailure::ClientAuthFailed,
                    TokenFailure::GrantInvalid,
                    TokenFailure::ScopeInvalid,
                ];
                assert!(!fallback.contains(&e.failure()), "unmapped: {reason}");
                seen += 1;
            }
        }
        assert!(seen >= 10, "found {seen} reasons in authorize.rs");
    }
}
