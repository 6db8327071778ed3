//! SMART App Launch v2 (standalone) authorization server core, framework-free: the
//! authorization request, PKCE, single-use authorization codes and rotating refresh
//! tokens (SM2, SM4, SM5). The server renders the pages, signs people in
//! ([`crate::users`]) and issues the access tokens; this module decides what is valid.
//!
//! Rules (RFC 6749, RFC 7636, OAuth 2.0 Security BCP RFC 9700, SMART App Launch 2.x):
//! - `response_type=code` only; `redirect_uri` must equal one registered for the app, and
//!   until it has been checked nothing is redirected (an error page is shown instead);
//! - PKCE with `S256` only: `plain`, a missing challenge or a malformed one is refused;
//! - `state` is required and returned; `aud` must be this server's FHIR base URL;
//! - codes are 256-bit random, kept only as their SHA-256, live 60 s and are single-use:
//!   a second use is refused *and* revokes every refresh token issued from the first;
//! - refresh tokens rotate: each use returns a new one and retires the old; presenting a
//!   retired one revokes its whole family (a stolen token and its owner cannot both keep
//!   using it); a refresh may narrow the scope, never widen it.

use std::fmt;

use ring::digest;
use subtle::ConstantTimeEq as _;

use crate::b64;
use crate::scope::{Context, ScopeSet};
use crate::users::Role;

/// Lifetime of an authorization code.
pub const CODE_TTL_SECONDS: u64 = 60;
/// Lifetime of a refresh token family (re-authentication after this).
pub const REFRESH_TTL_SECONDS: u64 = 8 * 3600;
/// A session unused for this long ends (AC4 idle timeout): its next refresh is refused.
pub const IDLE_TIMEOUT_SECONDS: u64 = 15 * 60;
/// Most codes outstanding at once (a flood is refused, not buffered).
pub const MAX_CODES: usize = 10_000;
/// Most refresh tokens kept at once.
pub const MAX_REFRESH: usize = 100_000;

/// A registered SMART app (public client: PKCE, no secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppRecord {
    /// Client id.
    pub client_id: String,
    /// Display name for the consent page.
    pub name: String,
    /// Exact redirect URIs (https, or http on a loopback address for native apps).
    pub redirect_uris: Vec<String>,
    /// Scopes the app may ever be granted.
    pub scopes: ScopeSet,
    /// Disabled apps cannot start or continue a sign-in.
    pub disabled: bool,
    /// Tokens only with a DPoP proof (RFC 9449): access tokens are bound to the app's
    /// key, and so is its session of refresh tokens. The default, also for records
    /// stored without the field; `phivault app add --allow-bearer` turns it off.
    #[serde(default = "yes")]
    pub require_dpop: bool,
}

fn yes() -> bool {
    true
}

impl AppRecord {
    /// Refuse redirect URIs that are not absolute https (or loopback http) URLs without a
    /// fragment, and an empty scope.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.redirect_uris.is_empty() {
            return Err("at least one redirect URI");
        }
        for u in &self.redirect_uris {
            let ok_scheme = u.starts_with("https://")
                || u.starts_with("http://127.0.0.1:")
                || u.starts_with("http://127.0.0.1/")
                || u.starts_with("http://[::1]")
                || u.starts_with("http://localhost:")
                || u.starts_with("http://localhost/");
            if !ok_scheme || u.contains('#') || u.len() > 2048 || u.chars().any(char::is_whitespace)
            {
                return Err(
                    "redirect URIs must be absolute https (or loopback http) without a fragment",
                );
            }
        }
        if self.scopes.is_empty() {
            return Err("at least one scope");
        }
        Ok(())
    }
}

/// A validated authorization request, waiting for sign-in and consent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuthorizeRequest {
    /// The app.
    pub client_id: String,
    /// Where the code goes (registered, exact).
    pub redirect_uri: String,
    /// What the app asked for, ∩ what it is registered for.
    pub scope: ScopeSet,
    /// Opaque value returned to the app.
    pub state: String,
    /// PKCE S256 challenge (base64url of 32 bytes).
    pub code_challenge: String,
    /// OpenID Connect nonce, echoed into the id token.
    pub nonce: Option<String>,
}

/// A failed authorization request: shown on the server's page when the redirect URI is not
/// (yet) trusted, otherwise sent back to the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeError {
    /// Do not redirect: unknown app, or a redirect URI that is not registered.
    Page(&'static str),
    /// Redirect to `redirect_uri` with `error`, `error_description` and `state`.
    Redirect {
        /// The registered redirect URI.
        redirect_uri: String,
        /// RFC 6749 §4.1.2.1 code.
        error: &'static str,
        /// A fixed description.
        description: &'static str,
        /// The app's state, if it sent one.
        state: Option<String>,
    },
}

/// A parameter given more than once (RFC 6749 §3.1 forbids it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepeatedParameter;

/// The value of parameter `name` in a decoded form or query; [`RepeatedParameter`] when
/// it is given more than once.
pub fn single_param<'a>(
    params: &'a [(String, String)],
    name: &str,
) -> Result<Option<&'a str>, RepeatedParameter> {
    let mut it = params.iter().filter(|(k, _)| k == name);
    let first = it.next().map(|(_, v)| v.as_str());
    if it.next().is_some() {
        return Err(RepeatedParameter);
    }
    Ok(first)
}

fn is_pkce_value(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Validate an authorization request's query parameters for this server (`fhir_base` is
/// the required `aud`).
pub fn parse_authorize_request(
    params: &[(String, String)],
    lookup: &dyn Fn(&str) -> Option<AppRecord>,
    fhir_base: &str,
) -> Result<AuthorizeRequest, AuthorizeError> {
    if params.len() > 32 {
        return Err(AuthorizeError::Page("too many parameters"));
    }
    let get = |n: &str| {
        single_param(params, n).map_err(|_| AuthorizeError::Page("a parameter is repeated"))
    };
    let client_id = get("client_id")?.ok_or(AuthorizeError::Page("client_id missing"))?;
    let app = lookup(client_id)
        .filter(|a| !a.disabled)
        .ok_or(AuthorizeError::Page("unknown client"))?;
    let redirect_uri = get("redirect_uri")?.ok_or(AuthorizeError::Page("redirect_uri missing"))?;
    if !app.redirect_uris.iter().any(|u| u == redirect_uri) {
        return Err(AuthorizeError::Page(
            "redirect_uri is not registered for this client",
        ));
    }
    // from here on, errors go back to the app
    let state = get("state")?.map(str::to_owned);
    let fail = |error: &'static str, description: &'static str| AuthorizeError::Redirect {
        redirect_uri: redirect_uri.to_owned(),
        error,
        description,
        state: state.clone(),
    };
    match get("response_type")? {
        Some("code") => {}
        Some(_) => return Err(fail("unsupported_response_type", "only response_type=code")),
        None => return Err(fail("invalid_request", "response_type missing")),
    }
    let Some(st) = state.as_deref() else {
        return Err(fail("invalid_request", "state missing"));
    };
    if st.is_empty() || st.len() > 512 {
        return Err(fail("invalid_request", "state malformed"));
    }
    if get("aud")? != Some(fhir_base) {
        return Err(fail(
            "invalid_request",
            "aud must be this server's FHIR base URL",
        ));
    }
    match get("code_challenge_method")? {
        Some("S256") => {}
        Some(_) => return Err(fail("invalid_request", "only code_challenge_method=S256")),
        None => return Err(fail("invalid_request", "PKCE is required (S256)")),
    }
    let challenge = get("code_challenge")?.unwrap_or_default();
    if challenge.len() != 43 || b64::decode(challenge).is_none_or(|d| d.len() != 32) {
        return Err(fail("invalid_request", "code_challenge malformed"));
    }
    let requested = get("scope")?.ok_or_else(|| fail("invalid_scope", "scope missing"))?;
    let requested =
        ScopeSet::parse(requested).map_err(|_| fail("invalid_scope", "scope malformed"))?;
    // a person's app gets patient/ and user/ scopes, never system/ ones
    let scope = requested
        .intersect(&app.scopes)
        .without_context(Context::System);
    if scope.resource_scopes().next().is_none() {
        return Err(fail(
            "invalid_scope",
            "no requested resource scope is allowed for this app",
        ));
    }
    let nonce = get("nonce")?.map(str::to_owned);
    if nonce.as_ref().is_some_and(|n| n.len() > 512) {
        return Err(fail("invalid_request", "nonce malformed"));
    }
    Ok(AuthorizeRequest {
        client_id: client_id.to_owned(),
        redirect_uri: redirect_uri.to_owned(),
        scope,
        state: st.to_owned(),
        code_challenge: challenge.to_owned(),
        nonce,
    })
}

/// What a person granted an app: the outcome of sign-in and consent, carried by a code
/// and then by the refresh tokens of one family.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// The app.
    pub client_id: String,
    /// The person (their account's opaque id).
    pub user_id: String,
    /// Their login name (to re-check the account at each refresh; sealed wherever the
    /// records are kept outside memory).
    pub username: String,
    /// Their role when they signed in.
    pub role: Role,
    /// Their account generation when they signed in (tokens of an older one are refused).
    pub generation: u64,
    /// `Practitioner/…` or `Patient/…` (the `fhirUser` claim).
    pub fhir_user: Option<String>,
    /// The patient in context (`launch/patient`).
    pub patient: Option<String>,
    /// The scopes granted.
    pub scope: ScopeSet,
    /// OpenID Connect nonce.
    pub nonce: Option<String>,
    /// Unix time of the sign-in (re-authentication bound).
    pub auth_time: u64,
}

pub use crate::grants::{AuthorizationServer, Change, MemoryState, SharedState};

#[derive(Clone, PartialEq, Eq)]
pub struct OneTimeSecret(pub String);

impl fmt::Debug for OneTimeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

pub(crate) fn hash(secret: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Whether `verifier` is the PKCE verifier of S256 `challenge` (RFC 7636 §4.6).
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    if !is_pkce_value(verifier) {
        return false;
    }
    let d = digest::digest(&digest::SHA256, verifier.as_bytes());
    b64::encode(d.as_ref())
        .as_bytes()
        .ct_eq(challenge.as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::OAuthError;

    const BASE: &str = "https://127.0.0.1:8443/fhir";
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    fn app() -> AppRecord {
        AppRecord {
            client_id: "app1".into(),
            name: "Chart viewer".into(),
            redirect_uris: vec!["https://app.example/cb".into()],
            scopes: ScopeSet::parse(
                "patient/*.rs user/*.rs openid fhirUser launch/patient offline_access",
            )
            .unwrap(),
            disabled: false,
            require_dpop: false,
        }
    }

    fn params(extra: &[(&str, &str)], drop: &[&str]) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = [
            ("response_type", "code"),
            ("client_id", "app1"),
            ("redirect_uri", "https://app.example/cb"),
            (
                "scope",
                "patient/Observation.rs openid fhirUser launch/patient system/*.cruds",
            ),
            ("state", "xyz"),
            ("aud", BASE),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
        ]
        .iter()
        .filter(|(k, _)| !drop.contains(k) && !extra.iter().any(|(e, _)| e == k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        p.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        p
    }

    fn parse(p: &[(String, String)]) -> Result<AuthorizeRequest, AuthorizeError> {
        parse_authorize_request(p, &|id| (id == "app1").then(app), BASE)
    }

    fn redirect_error(r: Result<AuthorizeRequest, AuthorizeError>) -> &'static str {
        match r {
            Err(AuthorizeError::Redirect { error, state, .. }) => {
                assert_eq!(state.as_deref(), Some("xyz"));
                error
            }
            other => panic!("expected a redirect error, got {other:?}"),
        }
    }

    fn grant(scope: &str) -> Grant {
        Grant {
            client_id: "app1".into(),
            user_id: "u-maria".into(),
            username: "maria".into(),
            role: Role::Patient,
            generation: 1,
            fhir_user: Some("Patient/p1".into()),
            patient: Some("p1".into()),
            scope: ScopeSet::parse(scope).unwrap(),
            nonce: None,
            auth_time: 100,
        }
    }

    #[test]
    fn rfc7636_appendix_b_vector() {
        assert!(pkce_matches(VERIFIER, CHALLENGE));
        assert!(!pkce_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXK",
            CHALLENGE
        ));
        assert!(!pkce_matches(CHALLENGE, CHALLENGE), "plain is not S256");
        assert!(!pkce_matches("short", CHALLENGE));
    }

    #[test]
    fn a_good_request_is_narrowed_to_the_app_registration() {
        let r = parse(&params(&[], &[])).unwrap();
        assert_eq!(r.redirect_uri, "https://app.example/cb");
        assert_eq!(r.state, "xyz");
        // system/ scopes are never granted to a person's app, even one registered for them
        let mut sys = app();
        sys.scopes = ScopeSet::parse("system/*.cruds patient/*.rs").unwrap();
        let r2 = parse_authorize_request(&params(&[], &[]), &|_| Some(sys.clone()), BASE).unwrap();
        assert_eq!(r2.scope.to_string(), "patient/Observation.rs");
        // the request is narrowed to what the app is registered for
        assert_eq!(
            r.scope.to_string(),
            "patient/Observation.rs fhirUser launch/patient openid"
        );
    }

    #[test]
    fn untrusted_redirects_get_a_page_and_the_rest_go_back_to_the_app() {
        assert!(matches!(
            parse(&params(&[("client_id", "nope")], &[])),
            Err(AuthorizeError::Page(_))
        ));
        assert!(matches!(
            parse(&params(&[], &["client_id"])),
            Err(AuthorizeError::Page(_))
        ));
        assert!(matches!(
            parse(&params(&[("redirect_uri", "https://evil.example/cb")], &[])),
            Err(AuthorizeError::Page(_))
        ));
        assert!(matches!(
            parse(&params(&[("redirect_uri", "https://app.example/cb/")], &[])),
            Err(AuthorizeError::Page(_))
        ));
        let mut twice = params(&[], &[]);
        twice.push(("redirect_uri".into(), "https://evil.example/cb".into()));
        assert!(matches!(parse(&twice), Err(AuthorizeError::Page(_))));

        assert_eq!(
            redirect_error(parse(&params(&[("code_challenge_method", "plain")], &[]))),
            "invalid_request"
        );
        assert_eq!(
            redirect_error(parse(&params(&[], &["code_challenge_method"]))),
            "invalid_request"
        );
        assert_eq!(
            redirect_error(parse(&params(&[], &["code_challenge"]))),
            "invalid_request"
        );
        assert_eq!(
            redirect_error(parse(&params(
                &[(
                    "code_challenge",
                    "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw+cM"
                )],
                &[]
            ))),
            "invalid_request"
        );
        assert_eq!(
            redirect_error(parse(&params(&[("response_type", "token")], &[]))),
            "unsupported_response_type"
        );
        assert_eq!(
            redirect_error(parse(&params(&[("aud", "https://other/fhir")], &[]))),
            "invalid_request"
        );
        assert_eq!(
            redirect_error(parse(&params(&[("scope", "system/*.cruds")], &[]))),
            "invalid_scope"
        );
        assert_eq!(
            redirect_error(parse(&params(
                &[("scope", "patient/Observation.rs\tx")],
                &[]
            ))),
            "invalid_scope"
        );
        assert!(matches!(
            parse(&params(&[], &["state"])),
            Err(AuthorizeError::Redirect {
                error: "invalid_request",
                state: None,
                ..
            })
        ));
        let mut disabled = app();
        disabled.disabled = true;
        assert!(matches!(
            parse_authorize_request(&params(&[], &[]), &|_| Some(disabled.clone()), BASE),
            Err(AuthorizeError::Page(_))
        ));
    }

    #[test]
    fn codes_are_single_use_bound_and_short_lived() {
        let s = AuthorizationServer::new();
        let req = parse(&params(&[], &[])).unwrap();
        let g = grant("patient/Observation.rs openid");
        let cb = "https://app.example/cb";
        // wrong verifier burns the code
        let c = s.issue_code(&req, g.clone(), 1000).unwrap();
        assert!(
            s.exchange_code("app1", &c.0, cb, &"a".repeat(43), 1001)
                .is_err()
        );
        assert!(s.exchange_code("app1", &c.0, cb, VERIFIER, 1001).is_err());
        // other client, other redirect
        let c = s.issue_code(&req, g.clone(), 1000).unwrap();
        assert!(s.exchange_code("app2", &c.0, cb, VERIFIER, 1001).is_err());
        let c = s.issue_code(&req, g.clone(), 1000).unwrap();
        assert!(
            s.exchange_code("app1", &c.0, "https://app.example/other", VERIFIER, 1001)
                .is_err()
        );
        // expired
        let c = s.issue_code(&req, g.clone(), 1000).unwrap();
        assert!(
            s.exchange_code("app1", &c.0, cb, VERIFIER, 1000 + CODE_TTL_SECONDS)
                .is_err()
        );
        // good, then replayed: the replay also ends the first exchange's session
        let c = s.issue_code(&req, g.clone(), 1000).unwrap();
        let (got, refresh) = s.exchange_code("app1", &c.0, cb, VERIFIER, 1001).unwrap();
        assert_eq!(got, g);
        assert!(s.introspect_refresh(&refresh.0, 1002).is_some());
        assert_eq!(
            s.exchange_code("app1", &c.0, cb, VERIFIER, 1002)
                .unwrap_err(),
            OAuthError::InvalidGrant("code already used")
        );
        assert!(s.introspect_refresh(&refresh.0, 1003).is_none());
        assert!(s.refresh("app1", &refresh.0, None, 1003).is_err());
        assert!(
            s.exchange_code("app1", "made-up", cb, VERIFIER, 1001)
                .is_err()
        );
    }

    #[test]
    fn refresh_tokens_rotate_narrow_and_a_reuse_revokes_the_family() {
        let s = AuthorizationServer::new();
        let req = parse(&params(&[], &[])).unwrap();
        let cb = "https://app.example/cb";
        let c = s
            .issue_code(&req, grant("patient/Observation.rs patient/Patient.rs"), 0)
            .unwrap();
        let (_, r1) = s.exchange_code("app1", &c.0, cb, VERIFIER, 1).unwrap();
        // escalation refused, and does not consume the token
        let wider = ScopeSet::parse("patient/*.cruds").unwrap();
        assert_eq!(
            s.refresh("app1", &r1.0, Some(&wider), 2).unwrap_err(),
            OAuthError::InvalidScope("a refresh cannot widen the scope")
        );
        assert!(s.refresh("app2", &r1.0, None, 2).is_err(), "another client");
        let narrow = ScopeSet::parse("patient/Observation.rs").unwrap();
        let (g2, r2) = s.refresh("app1", &r1.0, Some(&narrow), 3).unwrap();
        assert_eq!(g2.scope, narrow);
        assert_ne!(r1, r2);
        let (g3, r3) = s.refresh("app1", &r2.0, None, 4).unwrap();
        assert_eq!(g3.scope, narrow, "narrowing sticks");
        // r1 again (stolen copy): refused and the family, r3 included, is revoked
        assert!(s.refresh("app1", &r1.0, None, 5).is_err());
        assert!(s.refresh("app1", &r3.0, None, 6).is_err());
        // revocation and user revocation
        let c = s
            .issue_code(&req, grant("patient/Observation.rs"), 10)
            .unwrap();
        let (_, r) = s.exchange_code("app1", &c.0, cb, VERIFIER, 11).unwrap();
        s.revoke("app2", &r.0);
        assert!(
            s.introspect_refresh(&r.0, 12).is_some(),
            "only the owning client revokes"
        );
        s.revoke("app1", &r.0);
        assert!(s.refresh("app1", &r.0, None, 13).is_err());
        let c = s
            .issue_code(&req, grant("patient/Observation.rs"), 20)
            .unwrap();
        let (_, r) = s.exchange_code("app1", &c.0, cb, VERIFIER, 21).unwrap();
        s.revoke_user("u-maria");
        assert!(s.refresh("app1", &r.0, None, 22).is_err());
        // sessions end: after their lifetime, however busy
        let c = s
            .issue_code(&req, grant("patient/Observation.rs"), 30)
            .unwrap();
        let (_, mut r) = s.exchange_code("app1", &c.0, cb, VERIFIER, 31).unwrap();
        let mut t = 31;
        while t + IDLE_TIMEOUT_SECONDS / 2 < 31 + REFRESH_TTL_SECONDS {
            t += IDLE_TIMEOUT_SECONDS / 2;
            r = s
                .refresh("app1", &r.0, None, t)
                .expect("in use, not idle")
                .1;
        }
        assert!(
            s.refresh("app1", &r.0, None, 31 + REFRESH_TTL_SECONDS)
                .is_err()
        );
        // and after the idle timeout, however young
        let c = s
            .issue_code(&req, grant("patient/Observation.rs"), 40)
            .unwrap();
        let (_, r) = s.exchange_code("app1", &c.0, cb, VERIFIER, 41).unwrap();
        let (_, r) = s
            .refresh("app1", &r.0, None, 41 + IDLE_TIMEOUT_SECONDS - 1)
            .unwrap();
        assert!(
            s.introspect_refresh(&r.0, 41 + 2 * IDLE_TIMEOUT_SECONDS - 2)
                .is_some()
        );
        assert!(
            s.introspect_refresh(&r.0, 41 + 2 * IDLE_TIMEOUT_SECONDS - 1)
                .is_none()
        );
        assert!(
            s.refresh("app1", &r.0, None, 41 + 2 * IDLE_TIMEOUT_SECONDS - 1)
                .is_err()
        );
    }

    #[test]
    fn app_records_need_safe_redirects() {
        let mut a = app();
        assert!(a.validate().is_ok());
        for bad in [
            "http://app.example/cb",
            "https://app.example/cb#x",
            "app://cb",
            "https://a b",
        ] {
            a.redirect_uris = vec![bad.into()];
            assert!(a.validate().is_err(), "{bad}");
        }
        a.redirect_uris = vec!["http://127.0.0.1:9000/cb".into()];
        assert!(a.validate().is_ok());
    }
}
