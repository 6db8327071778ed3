//! `phivault-auth`: authentication and authorization for phivault.
//!
//! What lives here (and nowhere else):
//!
//! * SMART on FHIR v2 scopes — parsing, canonical form, intersection ([`scope`], SM1).
//! * Compact JWS / JWK handling on top of `ring`, the project's one crypto provider
//!   ([`jws`], [`jwk`]). The algorithm allow-list is explicit for every use; `none` and
//!   every `HS*` algorithm are never accepted (SM6).
//! * SMART Backend Services client authentication with `private_key_jwt`
//!   ([`client_assertion`], SM3) and the `client_credentials` token endpoint logic
//!   ([`token_endpoint`]).
//! * Access tokens issued by phivault itself (EdDSA / Ed25519) and their verification on
//!   the resource server with a small verified-token cache ([`access_token`], SM3/SM6).
//! * People: Argon2id password hashes ([`password`]), TOTP second factors ([`totp`]) and
//!   accounts with roles and lockout ([`users`]) (AC1, AC2).
//! * The authorization decision as a proof type ([`policy::Authorized`]) that only this
//!   crate can construct, so a handler that skipped the check does not compile.
//!
//! Nothing here knows about HTTP frameworks or storage engines: the server maps the
//! errors (`OAuthError::http_status`, `TokenError::www_authenticate`, …) to responses; why a
//! token request was refused is one table, [`TokenFailure`] (the `error`, the
//! `error_description` and the audit reason code of each).
//!
//! Secrets (private keys, access tokens, assertions) never appear in `Debug`/`Display`
//! output or in error messages; they print as `[redacted]`.
#![forbid(unsafe_code)]

mod b64;
mod claims;
mod der;
mod error;
mod grants;
mod strict_json;
#[cfg(test)]
mod test_support;

pub mod access_token;
pub mod authorize;
pub mod client_assertion;
pub mod dpop;
pub mod jwk;
pub mod jws;
pub mod oidc;
pub mod password;
pub mod policy;
pub mod scope;
pub mod token_endpoint;
pub mod totp;
pub mod users;

pub use access_token::{
    AccessTokenIssuer, AccessTokenVerifier, Authenticated, IssuedToken, Person, TokenError,
};
pub use client_assertion::{ClientRecord, ReplayCache, verify_client_assertion};
pub use error::{AuthError, OAuthError, TokenFailure};
pub use jwk::{PrivateJwk, PublicJwk, generate_ed25519_pkcs8, generate_es384_jwk};
pub use jws::{Alg, Jws, JwsError};
pub use policy::{Authorized, Denied, Reach, authorize, authorize_erasure};
pub use scope::{Context, ERASE_SCOPE, Interaction, Perms, Scope, ScopeError, ScopeSet};
pub use token_endpoint::{TokenResponse, handle_token_request};
pub use users::{LoginFailure, Role, UserError, UserRecord};

/// Replay records several processes share (nodes of one deployment): a key recorded by one
/// is a replay on every other until it expires. Implemented over the store by the caller
/// (this crate knows no storage engine); without it the caches keep records in memory.
pub trait SharedSeen: Send + Sync {
    /// Record `key` of kind `ns` until `until_ms` (ms since the Unix epoch): `Ok(true)` the
    /// first time, `Ok(false)` if it is recorded and not expired; `Err` if the records
    /// cannot be reached (the caller refuses: fail closed).
    fn first_time(&self, ns: &str, key: &[u8], until_ms: u64) -> Result<bool, String>;
}

/// Percent-encoding of a URL query component or path segment (RFC 3986: everything but the
/// unreserved characters).
pub fn percent_encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                o.push(char::from(b));
            }
            _ => o.push_str(&format!("%{b:02X}")),
        }
    }
    o
}

/// Maximum size of any compact JWS accepted from untrusted input (client assertions,
/// access tokens): 8 KiB.
pub const MAX_JWS_LEN: usize = 8 * 1024;
