//! The token endpoint (`POST /auth/token`), framework-free: the server hands over the
//! decoded form and maps the result to a response.
//!
//! Only `grant_type=client_credentials` with `private_key_jwt` client authentication
//! (SMART Backend Services, SM3). No refresh tokens are issued. The granted scope is the
//! requested scope intersected with the client's registered `system/` scopes (a back-end
//! client holds no other: [`ScopeSet::system_only`]); an empty intersection is
//! `invalid_scope`.
//!
//! Order of checks: duplicate parameters (`invalid_request`), `grant_type`
//! (`unsupported_grant_type`), client authentication (`invalid_client`), scope
//! (`invalid_scope`). Every refusal names its [`TokenFailure`]: the `error_description`
//! the client reads and the reason code the audit keeps. Scope is checked only once the
//! client has authenticated, so `scope-not-registered` tells nothing to a stranger.

use crate::access_token::AccessTokenIssuer;
use crate::client_assertion::{ClientRecord, ReplayCache, verify_client_assertion};
use crate::error::{OAuthError, TokenFailure};
use crate::scope::ScopeSet;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;

/// The only accepted `client_assertion_type`.
pub const JWT_BEARER_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Maximum number of form parameters.
pub const MAX_FORM_PARAMS: usize = 32;

/// Successful token response (RFC 6749 §5.1). `Debug` hides the token.
#[derive(Clone, Serialize)]
pub struct TokenResponse {
    /// The access token (compact JWS).
    pub access_token: String,
    /// Always `"bearer"`.
    pub token_type: &'static str,
    /// Lifetime in seconds (≤ 300).
    pub expires_in: u64,
    /// The granted scope, canonical form.
    pub scope: String,
    /// The authenticated client (for the audit record; not part of the JSON body).
    #[serde(skip)]
    pub client_id: String,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Handles a token request given the decoded `application/x-www-form-urlencoded` body.
/// `token_url` is this endpoint's absolute URL (the required assertion `aud`).
pub fn handle_token_request(
    form: &[(String, String)],
    lookup: &dyn Fn(&str) -> Option<ClientRecord>,
    token_url: &str,
    issuer: &AccessTokenIssuer,
    replay: &ReplayCache,
    now: u64,
) -> Result<TokenResponse, OAuthError> {
    use TokenFailure as F;
    if form.len() > MAX_FORM_PARAMS {
        return Err(F::TooManyParameters.into());
    }
    let mut params: HashMap<&str, &str> = HashMap::with_capacity(form.len());
    for (k, v) in form {
        if params.insert(k.as_str(), v.as_str()).is_some() {
            return Err(F::DuplicateParameter.into());
        }
    }
    match params.get("grant_type") {
        None => return Err(F::GrantTypeMissing.into()),
        Some(&"client_credentials") => {}
        Some(_) => return Err(F::GrantTypeUnsupported.into()),
    }
    if params.contains_key("client_secret") {
        return Err(F::MultipleClientAuth.into());
    }
    match params.get("client_assertion_type") {
        Some(&JWT_BEARER_ASSERTION_TYPE) => {}
        Some(_) => return Err(F::AssertionTypeUnsupported.into()),
        None => return Err(F::AssertionTypeMissing.into()),
    }
    let assertion = params.get("client_assertion").ok_or(F::AssertionMissing)?;
    let expected_client_id = params.get("client_id").copied();
    let client = verify_client_assertion(
        assertion,
        expected_client_id,
        lookup,
        token_url,
        now,
        replay,
    )?;

    let requested = params.get("scope").ok_or(F::ScopeMissing)?;
    let requested = ScopeSet::parse(requested).map_err(|_| F::ScopeMalformed)?;
    // A back-end client acts with system/ scopes only: patient/, user/ and non-resource
    // scopes of its record (registered before `client add` refused them) are dropped, not
    // granted — a token carrying them would grant nothing and claim what it cannot do.
    // Asking for only those is `invalid_scope`, as for any scope not registered.
    let granted = requested.intersect(&client.scopes.system_only());
    if granted.is_empty() {
        return Err(F::ScopeNotRegistered.into());
    }
    let issued = issuer
        .issue(&client.client_id, &granted, now)
        .map_err(|_| F::TokenIssuingFailed)?;
    Ok(TokenResponse {
        expires_in: issued.expires_in(),
        access_token: issued.into_token(),
        token_type: "bearer",
        scope: granted.to_string(),
        client_id: client.client_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_token::tests::issuer;
    use crate::test_support::*;

    fn form(t: &TestClient, scope: &str) -> Vec<(String, String)> {
        vec![
            ("grant_type".into(), "client_credentials".into()),
            (
                "client_assertion_type".into(),
                JWT_BEARER_ASSERTION_TYPE.into(),
            ),
            ("client_assertion".into(), t.es384(&t.claims())),
            ("scope".into(), scope.into()),
        ]
    }

    fn run(
        t: &TestClient,
        f: &[(String, String)],
        i: &AccessTokenIssuer,
        r: &ReplayCache,
    ) -> Result<TokenResponse, OAuthError> {
        handle_token_request(f, &|id| t.lookup(id), TOKEN_URL, i, r, NOW)
    }

    #[test]
    fn happy_path() {
        let t = TestClient::new();
        let i = issuer();
        let r = ReplayCache::default();
        let resp = run(
            &t,
            &form(
                &t,
                "system/Patient.read system/Observation.rs system/Encounter.r",
            ),
            &i,
            &r,
        )
        .expect("token");
        assert_eq!(resp.token_type, "bearer");
        assert!(resp.expires_in <= 300);
        assert_eq!(resp.scope, "system/Observation.rs system/Patient.rs");
        let a = i
            .verifier()
            .verify(&resp.access_token, NOW)
            .expect("verify");
        assert_eq!(a.client_id(), CLIENT_ID);
        assert_eq!(a.scopes().to_string(), resp.scope);
        let j = serde_json::to_value(&resp).expect("json");
        assert_eq!(j["token_type"], "bearer");
        assert!(!format!("{resp:?}").contains(&resp.access_token));
    }

    #[test]
    fn wildcard_request_is_narrowed() {
        let t = TestClient::new();
        let resp = run(
            &t,
            &form(&t, "system/*.cruds"),
            &issuer(),
            &ReplayCache::default(),
        )
        .expect("token");
        assert_eq!(resp.scope, "system/Observation.cruds system/Patient.rs");
    }

    #[test]
    fn errors() {
        let t = TestClient::new();
        let i = issuer();
        let r = ReplayCache::default();
        let failure = |f: Vec<(String, String)>| run(&t, &f, &i, &r).err().map(|e| e.failure());
        use TokenFailure as F;

        let mut f = form(&t, "system/Patient.rs");
        f.push(("scope".into(), "system/Observation.rs".into()));
        assert_eq!(failure(f), Some(F::DuplicateParameter));

        let mut f = form(&t, "system/Patient.rs");
        f[0].1 = "authorization_code".into();
        assert_eq!(failure(f), Some(F::GrantTypeUnsupported));

        let mut f = form(&t, "system/Patient.rs");
        f.remove(0);
        assert_eq!(failure(f), Some(F::GrantTypeMissing));

        let mut f = form(&t, "system/Patient.rs");
        f[1].1 = "urn:ietf:params:oauth:client-assertion-type:saml2-bearer".into();
        assert_eq!(failure(f), Some(F::AssertionTypeUnsupported));

        let mut f = form(&t, "system/Patient.rs");
        f.remove(1);
        assert_eq!(failure(f), Some(F::AssertionTypeMissing));

        let mut f = form(&t, "system/Patient.rs");
        f.remove(2);
        assert_eq!(failure(f), Some(F::AssertionMissing));

        let mut f = form(&t, "system/Patient.rs");
        f.push(("client_secret".into(), "hunter2".into()));
        assert_eq!(failure(f), Some(F::MultipleClientAuth));

        let mut f = form(&t, "system/Patient.rs");
        f[2].1 = tamper_signature(&f[2].1);
        assert_eq!(failure(f), Some(F::SignatureInvalid));

        let mut f = form(&t, "system/Patient.rs");
        f.push(("client_id".into(), "someone-else".into()));
        assert_eq!(failure(f), Some(F::ClientIdMismatch));

        let mut f = form(&t, "system/Patient.rs");
        f.remove(3);
        assert_eq!(failure(f), Some(F::ScopeMissing));

        let f: Vec<(String, String)> = (0..=MAX_FORM_PARAMS)
            .map(|n| (format!("p{n}"), String::new()))
            .collect();
        assert_eq!(failure(f), Some(F::TooManyParameters));

        assert_eq!(
            failure(form(&t, "system/Patient.rx")),
            Some(F::ScopeMalformed)
        );
        assert_eq!(
            failure(form(&t, "system/Encounter.rs")),
            Some(F::ScopeNotRegistered)
        );
        assert_eq!(
            failure(form(&t, "patient/Patient.rs")),
            Some(F::ScopeNotRegistered)
        );
        assert_eq!(failure(form(&t, "")), Some(F::ScopeNotRegistered));

        // replay of a whole request
        let f = form(&t, "system/Patient.rs");
        assert!(run(&t, &f, &i, &r).is_ok());
        let e = run(&t, &f, &i, &r).expect_err("replay");
        assert_eq!(e.failure(), F::JtiReplayed);
        assert_eq!(e.error_code(), "invalid_client");
        assert_eq!(e.http_status(), 401);
        assert_eq!(
            e.to_json()["error_description"],
            "the client assertion's jti was used before"
        );
    }

    /// A client registered with patient/, user/ or identity scopes (before `client add`
    /// refused them) gets none of them in a token: only its system/ scopes are granted.
    #[test]
    fn a_back_end_client_is_granted_system_scopes_only() {
        let mut t = TestClient::new();
        t.record.scopes = ScopeSet::parse(
            "system/Patient.rs patient/*.cruds user/Observation.rs openid fhirUser launch",
        )
        .expect("scopes");
        let i = issuer();
        let r = ReplayCache::default();
        let resp = run(
            &t,
            &form(
                &t,
                "system/Patient.rs patient/*.rs user/Observation.rs openid",
            ),
            &i,
            &r,
        )
        .expect("token");
        assert_eq!(resp.scope, "system/Patient.rs");
        let a = i
            .verifier()
            .verify(&resp.access_token, NOW)
            .expect("verify");
        assert_eq!(a.scopes().to_string(), "system/Patient.rs");
        for scope in [
            "patient/Patient.rs",
            "user/Observation.rs",
            "openid fhirUser",
        ] {
            let e = run(&t, &form(&t, scope), &i, &r).expect_err(scope);
            assert_eq!(e.error_code(), "invalid_scope", "{scope}");
        }
    }
}
