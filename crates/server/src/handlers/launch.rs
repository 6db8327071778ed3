//! SMART App Launch (standalone) over HTTP: the sign-in and consent pages, and the
//! `authorization_code` and `refresh_token` grants of the token endpoint, plus token
//! revocation (RFC 7009) and introspection (RFC 7662). What is valid is decided in
//! `phivault_auth::authorize` and `phivault_auth::users`; this module renders, binds the
//! browser to its sign-in, and audits.
//!
//! A sign-in ("flow") lives 10 minutes on the server and is bound to the browser that
//! started it by a `__Host-` cookie (Secure, HttpOnly, SameSite=Strict) and to its pages by
//! a CSRF token; both are compared in constant time. Pages are plain server-rendered HTML
//! with no scripts, styles or external assets (the CSP forbids them). Each attempt — page
//! errors, failed and successful sign-ins, consent, every token issued — is audited; the
//! person is named by their account id only.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use phivault_audit::Action;
use phivault_auth::authorize::{
    AuthorizeError, AuthorizeRequest, Grant, parse_authorize_request, single_param,
};
use phivault_auth::users::{LoginFailure, Role, normalize_username};
use phivault_auth::{Context, OAuthError, Person, ScopeSet, password};
use serde_json::json;

use crate::error::ApiError;
use crate::respond::json_response;
use crate::signin::{Flow, Stage, Then};
use crate::state::{App, Ctx, Peer, blocking, finish};
use phivault_records::engine::{form_urlencoded_pairs, now_ms};

/// How long a sign-in may take.
const FLOW_TTL_SECONDS: u64 = 600;
/// Failed attempts one sign-in page allows before it must be restarted.
const MAX_FLOW_FAILURES: u32 = 5;
/// The browser-binding cookie.
const FLOW_COOKIE: &str = "__Host-phivault-flow";

fn now_s() -> u64 {
    (now_ms() / 1000) as u64
}

fn random_b64() -> Result<String, ApiError> {
    use base64::Engine as _;
    let b: [u8; 32] = phivault_crypto::random_bytes().map_err(|_| ApiError::internal())?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{t} · phivault</title>\
         </head><body><main><h1>{t}</h1>{body}</main></body></html>",
        t = escape(title)
    );
    let mut r = (status, html).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn login_page(status: StatusCode, flow_id: &str, f: &Flow, message: Option<&str>) -> Response {
    let msg = message
        .map(|m| format!("<p role=\"alert\">{}</p>", escape(m)))
        .unwrap_or_default();
    page(
        status,
        "Sign in",
        &format!(
            "<p>{app} asks to access health records on your behalf.</p>{msg}\
             <form method=\"post\" action=\"/auth/login\">\
             <input type=\"hidden\" name=\"flow\" value=\"{flow}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <p><label>Username <input name=\"username\" autocomplete=\"username\" required></label></p>\
             <p><label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label></p>\
             <p><label>Authenticator code <input name=\"otp\" inputmode=\"numeric\" autocomplete=\"one-time-code\" pattern=\"[0-9]{{6}}\" required></label></p>\
             <p><button type=\"submit\">Sign in</button></p></form>",
            app = escape(&f.app_name),
            flow = escape(flow_id),
            csrf = escape(&f.csrf),
        ),
    )
}

fn consent_page(flow_id: &str, f: &Flow, grant: &Grant) -> Response {
    let items: String = grant
        .scope
        .to_string()
        .split(' ')
        .map(|s| format!("<li><code>{}</code></li>", escape(s)))
        .collect();
    page(
        StatusCode::OK,
        "Allow access?",
        &format!(
            "<p>{app} asks for:</p><ul>{items}</ul>\
             <form method=\"post\" action=\"/auth/consent\">\
             <input type=\"hidden\" name=\"flow\" value=\"{flow}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <p><button type=\"submit\" name=\"decision\" value=\"approve\">Allow</button> \
             <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></p></form>",
            app = escape(&f.app_name),
            flow = escape(flow_id),
            csrf = escape(&f.csrf),
        ),
    )
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn redirect_with(uri: &str, params: &[(&str, &str)]) -> Response {
    let q: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", phivault_auth::percent_encode(v)))
        .collect();
    let sep = if uri.contains('?') { '&' } else { '?' };
    redirect(&format!("{uri}{sep}{}", q.join("&")))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

pub(crate) fn form_of(body: Result<Bytes, BytesRejection>) -> Option<HashMap<String, String>> {
    let bytes = body.ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let pairs = form_urlencoded_pairs(text);
    if pairs.len() > 16 {
        return None;
    }
    let mut m = HashMap::new();
    for (k, v) in pairs {
        if m.insert(k, v).is_some() {
            return None;
        }
    }
    Some(m)
}

/// `GET /auth/authorize`: check the request, start a sign-in.
pub async fn authorize(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    RawQuery(q): RawQuery,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::E, "authorize");
    let params = form_urlencoded_pairs(q.as_deref().unwrap_or(""));
    let a = app.clone();
    let parsed = blocking(move || {
        Ok(parse_authorize_request(
            &params,
            &|id| a.launch_app(id),
            &a.vault.base_url,
        ))
    })
    .await;
    let r = match parsed {
        Err(e) => Err(e),
        Ok(Err(AuthorizeError::Page(reason))) => Ok(page(
            StatusCode::BAD_REQUEST,
            "This sign-in link is not valid",
            &format!("<p>{}.</p>", escape(reason)),
        )),
        Ok(Err(AuthorizeError::Redirect {
            redirect_uri,
            error,
            description,
            state,
        })) => {
            let mut p = vec![("error", error), ("error_description", description)];
            if let Some(s) = state.as_deref() {
                p.push(("state", s));
            }
            ctx.interaction = "authorize-refused";
            Ok(redirect_with(&redirect_uri, &p))
        }
        Ok(Ok(req)) => start_flow(&app, &mut ctx, req),
    };
    finish(&app, ctx, r).await
}

fn start_flow(app: &App, ctx: &mut Ctx, req: AuthorizeRequest) -> Result<Response, ApiError> {
    ctx.client_id = Some(req.client_id.clone());
    let now = now_s();
    let app_name = app
        .launch_app(&req.client_id)
        .map(|a| a.name)
        .unwrap_or_default();
    let (id, browser, csrf) = (random_b64()?, random_b64()?, random_b64()?);
    let flow = Flow {
        req,
        app_name,
        browser: browser.clone(),
        csrf,
        stage: Stage::Login { failures: 0 },
        expires: now + FLOW_TTL_SECONDS,
    };
    let mut resp = login_page(StatusCode::OK, &id, &flow, None);
    if !app.flows.insert(&id, &flow, now) {
        return Err(ApiError::unavailable());
    }
    let c = format!(
        "{FLOW_COOKIE}={browser}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={FLOW_TTL_SECONDS}"
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// Whether `f` is the flow of this browser and form (its cookie and CSRF token), and
/// unexpired.
fn belongs(f: &Flow, form: &HashMap<String, String>, headers: &HeaderMap, now: u64) -> bool {
    let Some(browser) = cookie(headers, FLOW_COOKIE) else {
        return false;
    };
    f.expires > now
        && same(&f.browser, &browser)
        && same(&f.csrf, form.get("csrf").map_or("", String::as_str))
}

fn expired_page() -> Response {
    page(
        StatusCode::BAD_REQUEST,
        "This sign-in has expired",
        "<p>Start again from the app.</p>",
    )
}

/// What a person in `role` may be granted of `requested` (SMART contexts by role), and the
/// patient in context.
fn scope_for_role(
    requested: &ScopeSet,
    rec: &phivault_auth::UserRecord,
) -> (ScopeSet, Option<String>) {
    match rec.role {
        // a patient: their own compartment
        Role::Patient => (
            requested.without_context(Context::User),
            rec.patient.clone(),
        ),
        // a clinician: user/ scopes (a patient picker for patient/ scopes is not built)
        Role::Clinician => (requested.without_context(Context::Patient), None),
        // auditors: user/ scopes, of which the policy grants the audit log only
        Role::Auditor => (requested.without_context(Context::Patient), None),
        // admins read no clinical data through apps
        Role::Admin => (
            requested
                .without_context(Context::Patient)
                .without_context(Context::User),
            None,
        ),
    }
}

/// `POST /auth/login`: password and second factor.
pub async fn login(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::E, "login");
    let a = app.clone();
    let source = ctx.source.clone();
    let form = form_of(body);
    let r = blocking(move || Ok(login_inner(&a, &source, form, &headers))).await;
    let r = r.map(|(resp, client, user, what)| {
        ctx.client_id = client;
        ctx.user = user;
        if let Some(w) = what {
            ctx.interaction = w;
        }
        resp
    });
    finish(&app, ctx, r).await
}

/// The page, the app, the account (if one was named) and what happened, for the audit
/// event (the page itself never tells which check failed).
type LoginResult = (
    Response,
    Option<String>,
    Option<String>,
    Option<&'static str>,
);

fn failure_name(f: LoginFailure) -> &'static str {
    match f {
        LoginFailure::Password => "login-failed-password",
        LoginFailure::SecondFactor => "login-failed-second-factor",
        LoginFailure::Locked(_) => "login-locked",
        LoginFailure::Disabled => "login-disabled",
    }
}
fn login_inner(
    app: &App,
    source: &str,
    form: Option<HashMap<String, String>>,
    headers: &HeaderMap,
) -> LoginResult {
    let now = now_s();
    let Some(form) = form else {
        return (expired_page(), None, None, None);
    };
    if !app.flows.admit(source, now) {
        let p = page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts",
            "<p>Wait a minute and try again.</p>",
        );
        return (p, None, None, None);
    }
    // the flow is checked (not consumed) first
    let Some(flow_id) = form.get("flow").cloned() else {
        return (expired_page(), None, None, None);
    };
    let checked = app.flows.update(&flow_id, now, |f| match f {
        Some(f) if belongs(f, &form, headers, now) && matches!(f.stage, Stage::Login { .. }) => (
            Then::Keep,
            Some((f.req.client_id.clone(), f.req.scope.clone())),
        ),
        _ => (Then::Keep, None),
    });
    let Some((client_id, requested)) = checked.flatten() else {
        return (expired_page(), None, None, None);
    };
    let field = |k: &str| form.get(k).map_or("", String::as_str);
    let username = normalize_username(field("username")).ok();
    let users = app.vault.engine.users();
    let outcome = match &username {
        None => {
            // same cost as a real check
            let _ = password::verify_password(field("password"), password::dummy_hash());
            Err((None, LoginFailure::Password))
        }
        Some(u) => {
            let _guard = app.vault.account_stripe(u).lock();
            match users.get(u) {
                Ok(Some(mut rec)) => {
                    let res = rec.login(field("password"), field("otp"), now);
                    let stored = users.put(&rec);
                    match (res, stored) {
                        (Ok(()), Ok(())) => Ok(rec),
                        (Ok(()), Err(_)) => Err((Some(rec.id.clone()), LoginFailure::Disabled)),
                        (Err(f), _) => Err((Some(rec.id.clone()), f)),
                    }
                }
                _ => {
                    let _ = password::verify_password(field("password"), password::dummy_hash());
                    Err((None, LoginFailure::Password))
                }
            }
        }
    };
    let stepped = app.flows.update(&flow_id, now, |f| {
        let Some(f) = f else {
            return (Then::Keep, None);
        };
        let (then, result) = login_step(f, &flow_id, outcome, &requested, &client_id, now);
        (then, Some(result))
    });
    stepped
        .flatten()
        .unwrap_or_else(|| (expired_page(), Some(client_id), None, None))
}

/// The login form's outcome applied to its flow: another try, the end of the flow, or
/// the consent page.
fn login_step(
    f: &mut Flow,
    flow_id: &str,
    outcome: Result<phivault_auth::UserRecord, (Option<String>, LoginFailure)>,
    requested: &ScopeSet,
    client_id: &str,
    now: u64,
) -> (Then, LoginResult) {
    let client_id = client_id.to_owned();
    match outcome {
        Err((user, failure)) => {
            let failures = match &mut f.stage {
                Stage::Login { failures } => {
                    *failures += 1;
                    *failures
                }
                Stage::Consent(_) => MAX_FLOW_FAILURES,
            };
            let what = Some(failure_name(failure));
            if failures >= MAX_FLOW_FAILURES {
                let mut p = expired_page();
                *p.status_mut() = StatusCode::UNAUTHORIZED;
                return (Then::Remove, (p, Some(client_id), user, what));
            }
            let p = login_page(
                StatusCode::UNAUTHORIZED,
                flow_id,
                f,
                Some(
                    "Sign-in failed. Check the username, password and authenticator code; \
                     repeated failures lock the account for 15 minutes.",
                ),
            );
            (Then::Save, (p, Some(client_id), user, what))
        }
        Ok(rec) => {
            let (scope, patient) = scope_for_role(requested, &rec);
            let user = Some(rec.id.clone());
            if scope.resource_scopes().next().is_none() {
                let r = &f.req;
                let resp = redirect_with(
                    &r.redirect_uri,
                    &[
                        ("error", "access_denied"),
                        (
                            "error_description",
                            "nothing requested is open to this account",
                        ),
                        ("state", &r.state),
                    ],
                );
                return (
                    Then::Remove,
                    (resp, Some(client_id), user, Some("login-nothing-to-grant")),
                );
            }
            let fhir_user = rec.fhir_user();
            let grant = Grant {
                client_id: client_id.clone(),
                user_id: rec.id.clone(),
                username: rec.username.clone(),
                role: rec.role,
                generation: rec.generation,
                fhir_user,
                patient: patient.filter(|_| scope.has_other("launch/patient")),
                scope,
                nonce: f.req.nonce.clone(),
                auth_time: now,
            };
            let p = consent_page(flow_id, f, &grant);
            f.stage = Stage::Consent(Box::new(grant));
            (Then::Save, (p, Some(client_id), user, None))
        }
    }
}

/// `POST /auth/consent`: approve (a code goes to the app) or deny.
pub async fn consent(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::E, "consent");
    let now = now_s();
    let form = form_of(body);
    let taken = form.as_ref().and_then(|form| {
        let id = form.get("flow")?;
        app.flows
            .update(id, now, |f| match f {
                Some(f) if belongs(f, form, &headers, now) => match &f.stage {
                    Stage::Consent(grant) => (Then::Remove, Some((f.req.clone(), grant.clone()))),
                    Stage::Login { .. } => (Then::Keep, None),
                },
                _ => (Then::Keep, None),
            })
            .flatten()
    });
    let r = match (taken, form) {
        (Some((req, grant)), Some(form)) => {
            ctx.client_id = Some(grant.client_id.clone());
            ctx.user = Some(grant.user_id.clone());
            if form.get("decision").map(String::as_str) == Some("approve") {
                match app.authz.issue_code(&req, *grant, now) {
                    Ok(code) => Ok(redirect_with(
                        &req.redirect_uri,
                        &[("code", &code.0), ("state", &req.state)],
                    )),
                    Err(_) => Err(ApiError::unavailable()),
                }
            } else {
                ctx.interaction = "consent-declined";
                Ok(redirect_with(
                    &req.redirect_uri,
                    &[
                        ("error", "access_denied"),
                        ("error_description", "the person declined"),
                        ("state", &req.state),
                    ],
                ))
            }
        }
        _ => Ok(expired_page()),
    };
    finish(&app, ctx, r).await
}

/// The token endpoint's person grants: `Some` when `form` is an `authorization_code` or
/// `refresh_token` request (the answer), `None` to leave it to the client-credentials path.
pub(crate) fn person_grant(
    app: &App,
    form: &[(String, String)],
    ctx: &mut Ctx,
    headers: &HeaderMap,
) -> Option<Result<serde_json::Value, OAuthError>> {
    let get = |k: &str| -> Result<Option<&str>, OAuthError> {
        single_param(form, k).map_err(|_| OAuthError::InvalidRequest("duplicate parameter"))
    };
    let grant_type = match get("grant_type") {
        Ok(Some(g @ ("authorization_code" | "refresh_token"))) => g,
        Ok(_) => return None,
        Err(e) => return Some(Err(e)),
    };
    Some((|| {
        if form.len() > 16 {
            return Err(OAuthError::InvalidRequest("too many parameters"));
        }
        let client_id = get("client_id")?.ok_or(OAuthError::InvalidClient("client_id missing"))?;
        if get("client_secret")?.is_some() || get("client_assertion")?.is_some() {
            return Err(OAuthError::InvalidClient(
                "public clients do not authenticate",
            ));
        }
        let registered = app
            .launch_app(client_id)
            .filter(|a| !a.disabled)
            .ok_or(OAuthError::InvalidClient("unknown client"))?;
        ctx.client_id = Some(registered.client_id.clone());
        let now = now_s();
        // RFC 9449 §5: a DPoP proof for this request binds what is issued to its key
        let proof = dpop_proof(app, headers, now)?;
        if registered.require_dpop && proof.is_none() {
            return Err(OAuthError::InvalidDpopProof("this app must use DPoP"));
        }
        let jkt = proof.as_ref().map(|p| p.jkt.as_str());
        let (grant, refresh) = if grant_type == "authorization_code" {
            app.authz.exchange_code(
                client_id,
                get("code")?.ok_or(OAuthError::InvalidRequest("code missing"))?,
                get("redirect_uri")?.ok_or(OAuthError::InvalidRequest("redirect_uri missing"))?,
                get("code_verifier")?.ok_or(OAuthError::InvalidGrant("code_verifier missing"))?,
                now,
            )?
        } else {
            let scope = match get("scope")? {
                Some(s) => Some(
                    ScopeSet::parse(s).map_err(|_| OAuthError::InvalidScope("scope malformed"))?,
                ),
                None => None,
            };
            let token =
                get("refresh_token")?.ok_or(OAuthError::InvalidRequest("refresh_token missing"))?;
            // a session bound to a key refreshes only with a proof made with that key
            if let Some(bound) = app.authz.dpop_key_of(token)
                && jkt != Some(bound.as_str())
            {
                return Err(OAuthError::InvalidDpopProof(
                    "refresh token bound to another key",
                ));
            }
            app.authz.refresh(client_id, token, scope.as_ref(), now)?
        };
        if let Some(j) = jkt {
            app.authz.bind_dpop(&refresh.0, j);
        }
        ctx.user = Some(grant.user_id.clone());
        // the account must still be what it was at sign-in
        let current = app
            .vault
            .engine
            .users()
            .get(&grant.username)
            .ok()
            .flatten()
            .filter(|r| r.id == grant.user_id && r.generation == grant.generation && !r.disabled);
        if current.is_none() {
            app.authz.revoke_user(&grant.user_id);
            return Err(OAuthError::InvalidGrant(
                "the account changed; sign in again",
            ));
        }
        let person = Person {
            user_id: grant.user_id.clone(),
            role: grant.role,
            generation: grant.generation,
            fhir_user: grant.fhir_user.clone(),
            patient: grant.patient.clone(),
        };
        let issued = app
            .issuer
            .issue_bound(client_id, Some(&person), &grant.scope, now, jkt)
            .map_err(|_| OAuthError::ServerError("token issuing failed"))?;
        let mut body = json!({
            "access_token": issued.token(),
            "token_type": if jkt.is_some() { "DPoP" } else { "Bearer" },
            "expires_in": issued.expires_in(),
            "scope": grant.scope.to_string(),
        });
        if grant.scope.has_other("offline_access") || grant.scope.has_other("online_access") {
            body["refresh_token"] = json!(refresh.0);
        } else {
            app.authz.revoke(client_id, &refresh.0);
        }
        if let Some(p) = &grant.patient {
            body["patient"] = json!(p);
        }
        if grant.scope.has_other("openid") && grant.scope.has_other("fhirUser") {
            let id_token = app
                .issuer
                .id_token(
                    client_id,
                    &grant.user_id,
                    grant.fhir_user.as_deref(),
                    grant.nonce.as_deref(),
                    grant.auth_time,
                    now,
                )
                .map_err(|_| OAuthError::ServerError("token issuing failed"))?;
            body["id_token"] = json!(id_token);
        }
        Ok(body)
    })())
}

/// The token request's DPoP proof, verified for `POST` to the token endpoint and not seen
/// before; None when the request has none.
fn dpop_proof(
    app: &App,
    headers: &HeaderMap,
    now: u64,
) -> Result<Option<phivault_auth::dpop::DpopProof>, OAuthError> {
    let mut all = headers.get_all("dpop").iter();
    let proof = match (all.next(), all.next()) {
        (None, _) => return Ok(None),
        (Some(p), None) => p
            .to_str()
            .map_err(|_| OAuthError::InvalidDpopProof("not text"))?,
        (Some(_), Some(_)) => return Err(OAuthError::InvalidDpopProof("more than one proof")),
    };
    let p = phivault_auth::dpop::verify_proof(proof, "POST", &app.token_url, now, None)
        .map_err(|e| OAuthError::InvalidDpopProof(e.0))?;
    app.dpop_replay
        .check_and_insert(&p, now)
        .map_err(OAuthError::InvalidDpopProof)?;
    Ok(Some(p))
}

/// `POST /auth/revoke` (RFC 7009): ends the session of a refresh token; 200 whatever the
/// token was.
pub async fn revoke(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::E, "revoke");
    let r = match form_of(body) {
        Some(form) => {
            let client = form.get("client_id").cloned().unwrap_or_default();
            if let Some(t) = form.get("token") {
                app.authz.revoke(&client, t);
            }
            ctx.client_id = app.launch_app(&client).map(|a| a.client_id);
            Ok(StatusCode::OK.into_response())
        }
        None => Err(ApiError::bad_request("malformed form")),
    };
    finish(&app, ctx, r).await
}

/// `POST /auth/introspect` (RFC 7662), for back-end clients (a bearer token of their own).
pub async fn introspect(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::E, "introspect");
    let r = (|| {
        let caller = app.authenticate(&headers, &mut ctx)?;
        if caller.person().is_some() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                phivault_fhir::IssueCode::Forbidden,
                "introspection is for back-end clients",
            ));
        }
        let form = form_of(body).ok_or_else(|| ApiError::bad_request("malformed form"))?;
        let token = form.get("token").map_or("", String::as_str);
        let now = now_s();
        let answer = if let Ok(a) = app.verifier.verify(token, now) {
            let mut v = json!({
                "active": true,
                "client_id": a.client_id(),
                "scope": a.scopes().to_string(),
                "exp": a.expires_at(),
                "token_type": "Bearer",
            });
            if let Some(p) = a.person() {
                v["sub"] = json!(format!("user:{}", p.user_id));
                if let Some(pt) = &p.patient {
                    v["patient"] = json!(pt);
                }
            }
            v
        } else if let Some(g) = app.authz.introspect_refresh(token, now) {
            json!({
                "active": true,
                "client_id": g.client_id,
                "scope": g.scope.to_string(),
                "sub": format!("user:{}", g.user_id),
                "token_type": "refresh_token",
            })
        } else {
            json!({"active": false})
        };
        Ok(json_response(
            StatusCode::OK,
            Bytes::from(answer.to_string()),
            "application/json",
        ))
    })();
    finish(&app, ctx, r).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_cookies() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(
            phivault_auth::percent_encode("a b&c=d/é"),
            "a%20b%26c%3Dd%2F%C3%A9"
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; __Host-phivault-flow=abc; y=2"),
        );
        assert_eq!(cookie(&h, FLOW_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "z"), None);
        let r = redirect_with("https://app/cb?x=1", &[("code", "a/b"), ("state", "s s")]);
        assert_eq!(
            r.headers().get(header::LOCATION).unwrap(),
            "https://app/cb?x=1&code=a%2Fb&state=s%20s"
        );
    }
}
