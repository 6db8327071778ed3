//! SMART Health Links over HTTP (`phivault_share::links` holds the rules):
//! `POST /shl/links` (make, with a token), `GET /shl/links` (the caller's), `DELETE
//! /shl/links/{id}` (revoke); and, without a token — the link is the credential —
//! `POST /shl/m/{secret}` (manifest), `GET /shl/m/{secret}` (a `U` link's file) and `GET
//! /shl/f/{ticket}` (a manifest's file location). Every request is audited with the link
//! and its patient (so it shows in the patient's access view); a requester's `recipient`
//! text is recorded sealed ([`phivault_audit::Detail::note`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use phivault_audit::Action;
use phivault_share::links::{self, ManifestRequest, Seen};
use serde_json::json;

use crate::error::ApiError;
use crate::respond::json_response;
use crate::state::{App, Ctx, Peer, run};

/// A sharing failure as a response: records failures as OperationOutcomes; a refused
/// passcode as the spec's `{"remainingAttempts": n}`; polling too soon as 429.
fn respond(e: phivault_share::Error) -> Result<Response, ApiError> {
    match e {
        phivault_share::Error::Passcode { remaining } => Ok(json_response(
            StatusCode::UNAUTHORIZED,
            Bytes::from(json!({"remainingAttempts": remaining}).to_string()),
            "application/json",
        )),
        e => Err(e.into()),
    }
}

/// Largest manifest request body (a recipient, a passcode, a number).
const MAX_MANIFEST_REQUEST: usize = 16 << 10;

/// Links are fetched by viewers on other origins: no credentials, so any origin may read.
fn cors(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("retry-after, x-request-id"),
    );
    r
}

/// `OPTIONS` on a link's URLs: the CORS preflight of a viewer's `POST` (no audit: nothing
/// is read).
pub async fn preflight() -> Response {
    let mut r = cors(StatusCode::NO_CONTENT.into_response());
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

/// `POST /shl/links`: make a link (JSON [`links::NewLink`]); 201 with the `shlink:/`, its
/// QR code (PNG and SVG) and the link's listing. The content is audited as disclosed.
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let ctx = Ctx::new(peer, Action::C, "shl-create");
    run(app, ctx, move |app, ctx| {
        let auth = app.authenticate(&headers, ctx)?;
        let body = crate::respond::body_bytes(&headers, body)?;
        let req: links::NewLink = serde_json::from_slice(&body)
            .map_err(|_| ApiError::bad_request("the body is not a share link request"))?;
        let made = match links::create(&app.vault, app.exchange_area()?, &auth, &req, app.origin())
        {
            Ok(m) => m,
            Err(e) => return respond(e),
        };
        ctx.id = Some(made.id.clone());
        ctx.patient = Some(made.record.patient.clone());
        ctx.entities = disclosed(&made.disclosed, &made.record.patient);
        let text = made.viewer_url.as_deref().unwrap_or(&made.shlink);
        let png = phivault_share::qr::png(text).map_err(|_| ApiError::internal())?;
        let svg = phivault_share::qr::svg(text).map_err(|_| ApiError::internal())?;
        let mut v = links::manage::listed(&made.record, phivault_share::now_ms(), false);
        v["shlink"] = json!(made.shlink);
        if let Some(u) = &made.viewer_url {
            v["viewerUrl"] = json!(u);
        }
        v["qr"] = json!({
            "png": format!("data:image/png;base64,{}", b64_std(&png)),
            "svg": svg,
        });
        Ok(json_response(
            StatusCode::CREATED,
            Bytes::from(v.to_string()),
            "application/json",
        ))
    })
    .await
}

fn b64_std(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `GET /shl/links`: the links the caller made (or, a patient's sign-in, about them).
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let ctx = Ctx::new(peer, Action::R, "shl-list");
    run(app, ctx, move |app, ctx| {
        let auth = app.authenticate(&headers, ctx)?;
        let items = links::list(&app.vault, &auth).or_else(|e| respond(e).map(|_| Vec::new()))?;
        Ok(json_response(
            StatusCode::OK,
            Bytes::from(json!({"links": items}).to_string()),
            "application/json",
        ))
    })
    .await
}

/// `DELETE /shl/links/{id}`: revoke (the creator or the patient).
pub async fn revoke(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ctx = Ctx::new(peer, Action::D, "shl-revoke");
    run(app, ctx, move |app, ctx| {
        let auth = app.authenticate(&headers, ctx)?;
        match links::revoke(&app.vault, app.exchange_area()?, &auth, &id) {
            Ok(patient) => {
                ctx.id = Some(id);
                ctx.patient = Some(patient);
                Ok(StatusCode::NO_CONTENT.into_response())
            }
            Err(e) => respond(e),
        }
    })
    .await
}

/// `POST /shl/links/{id}/content` (JSON `{"key": "<the link's key>"}`): a long-term link's
/// content built again under the caller's grant (the creator's app or the patient's, which
/// hold the key the server forgot). Audited as a new disclosure.
pub async fn refresh(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let ctx = Ctx::new(peer, Action::U, "shl-refresh");
    run(app, ctx, move |app, ctx| {
        let auth = app.authenticate(&headers, ctx)?;
        let key = body
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["key"].as_str().map(str::to_owned))
            .ok_or_else(|| ApiError::bad_request("the body is {\"key\": \"<the link's key>\"}"))?;
        let key = zeroize::Zeroizing::new(key);
        let done = match links::refresh(&app.vault, app.exchange_area()?, &auth, &id, &key) {
            Ok(d) => d,
            Err(e) => return respond(e),
        };
        ctx.id = Some(id);
        ctx.patient = Some(done.patient.clone());
        ctx.entities = disclosed(&done.disclosed, &done.patient);
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// The audit entities of what a link shares.
fn disclosed(list: &[(String, String)], patient: &str) -> Vec<phivault_audit::Entity> {
    list.iter()
        .map(|(t, id)| phivault_audit::Entity::disclosed(t, id, patient))
        .collect()
}

/// What every link request's audit event carries: the link, its patient, why refused,
/// and the recipient's text sealed.
fn note_seen(app: &App, ctx: &mut Ctx, seen: Seen, recipient: Option<&str>) {
    if let Some((id, patient)) = seen.link {
        ctx.id = Some(id);
        ctx.patient = Some(patient);
    }
    if let Some(r) = seen.reason {
        ctx.detail.refused_because(r);
    }
    if let Some(text) = recipient.and_then(|r| links::fetch::recipient(Some(r)).ok()) {
        ctx.detail.note = app.vault.engine.seal_secret(
            &format!("{}{}", phivault_records::report::NOTE_LABEL, ctx.request_id),
            text.as_bytes(),
        );
    }
}

/// `POST /shl/m/{secret}`: the manifest (JSON `{recipient, passcode?, embeddedLengthMax?}`).
pub async fn manifest(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(secret): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let ctx = Ctx::new(peer, Action::R, "shl-manifest");
    let r = run(app, ctx, move |app, ctx| {
        ctx.detail.user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| phivault_audit::Detail::clean_agent(v.as_bytes()));
        let body = crate::respond::body_bytes(&headers, body)?;
        if body.len() > MAX_MANIFEST_REQUEST {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                phivault_fhir::IssueCode::TooCostly,
                "a manifest request is at most 16 KiB",
            ));
        }
        let req: Option<ManifestRequest> = serde_json::from_slice(&body).ok();
        let mut seen = Seen::default();
        let out = match &req {
            Some(req) => links::manifest(
                &app.vault,
                app.exchange_area()?,
                &secret,
                req,
                app.origin(),
                &mut seen,
            ),
            None => Err(phivault_share::Error::bad_request(
                "the body is a JSON manifest request with a recipient",
            )),
        };
        note_seen(
            app,
            ctx,
            seen,
            req.as_ref().and_then(|r| r.recipient.as_deref()),
        );
        let m = match out {
            Ok(m) => m,
            Err(e) => return respond(e),
        };
        let mut r = json_response(
            StatusCode::OK,
            Bytes::from(m.body.to_string()),
            "application/json",
        );
        if let Some(s) = m.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        Ok(r)
    })
    .await;
    cors(r)
}

fn jose(bytes: Vec<u8>) -> Response {
    json_response(StatusCode::OK, Bytes::from(bytes), "application/jose")
}

/// `HEAD` on a link's file URLs: refused without reading anything (a preview bot or a
/// mail scanner must not spend a single-use file, nor be audited as having read it).
fn head_refused(method: &Method) -> Option<Response> {
    (method == Method::HEAD).then(|| {
        cors(
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                phivault_fhir::IssueCode::NotSupported,
                "fetch the file with GET",
            )
            .into_response(),
        )
    })
}

/// `GET /shl/m/{secret}?recipient=…`: a `U` link's one file.
pub async fn direct(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    method: Method,
    Path(secret): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(r) = head_refused(&method) {
        return r;
    }
    let ctx = Ctx::new(peer, Action::R, "shl-direct");
    let r = run(app, ctx, move |app, ctx| {
        let recipient = query.as_deref().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "recipient")
                .map(|(_, v)| v.into_owned())
        });
        let mut seen = Seen::default();
        let out = links::direct(
            &app.vault,
            app.exchange_area()?,
            &secret,
            recipient.as_deref(),
            &mut seen,
        );
        note_seen(app, ctx, seen, recipient.as_deref());
        out.map(jose).or_else(respond)
    })
    .await;
    cors(r)
}

/// `GET /shl/f/{ticket}`: a file a manifest named (its event carries the recipient the
/// manifest request gave, sealed in the ticket).
pub async fn file(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    method: Method,
    Path(ticket): Path<String>,
) -> Response {
    if let Some(r) = head_refused(&method) {
        return r;
    }
    let ctx = Ctx::new(peer, Action::R, "shl-file");
    let r = run(app, ctx, move |app, ctx| {
        let mut seen = Seen::default();
        let out = links::file(&app.vault, app.exchange_area()?, &ticket, &mut seen);
        let recipient = seen.recipient.take();
        note_seen(app, ctx, seen, recipient.as_deref());
        out.map(jose).or_else(respond)
    })
    .await;
    cors(r)
}
