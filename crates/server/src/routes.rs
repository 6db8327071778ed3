//! The router: every route and the handler serving it (the only module that names
//! handlers), the fallbacks (unknown routes and methods need authentication too) and the
//! security headers of every response.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{delete, get, post};
use phivault_audit::Action;
use phivault_fhir::IssueCode;

use crate::error::ApiError;
use crate::handlers::{
    admin, alerts, audit, auth, bundle, erase, export, fhir, glass, launch, search, share,
};
use crate::state::{App, Ctx, Peer, REQUEST_TARGET, finish};

async fn not_found(
    Extension(peer): Extension<Peer>,
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Response {
    // Unknown routes still need authentication, so probing reveals nothing to strangers.
    let mut ctx = Ctx::new(peer, Action::R, "unknown-route");
    let r = match app.authenticate(&headers, &mut ctx) {
        Ok(_) => Err(ApiError::not_found("no such route")),
        Err(e) => Err(e),
    };
    finish(&app, ctx, r).await
}

async fn method_not_allowed(
    Extension(peer): Extension<Peer>,
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Response {
    // Authenticate first: strangers learn nothing about which routes exist.
    let mut ctx = Ctx::new(peer, Action::E, "unsupported-method");
    let r = match app.authenticate(&headers, &mut ctx) {
        Ok(_) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            IssueCode::NotSupported,
            "this interaction is not supported on this route",
        )),
        Err(e) => Err(e),
    };
    finish(&app, ctx, r).await
}

async fn security_headers(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    req.headers_mut().remove(REQUEST_TARGET);
    if req.headers().contains_key("dpop") {
        let target = format!("{} {}", req.method(), req.uri().path());
        if let Ok(v) = HeaderValue::from_str(&target) {
            req.headers_mut().insert(REQUEST_TARGET, v);
        }
    }
    let mut resp = next.run(req).await;
    harden(resp.headers_mut());
    resp
}

/// The security headers every response carries, sealed or not.
pub(crate) fn harden(h: &mut axum::http::HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=63072000; includeSubDomains"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The router (state applied).
pub fn router(app: Arc<App>) -> Router {
    let max_body = app.limits.max_body;
    Router::new()
        .route("/fhir/metadata", get(fhir::metadata))
        .route(
            "/.well-known/smart-configuration",
            get(auth::smart_configuration),
        )
        .route(
            "/fhir/.well-known/smart-configuration",
            get(auth::smart_configuration),
        )
        .route("/.well-known/jwks.json", get(auth::jwks))
        .route("/auth/token", post(auth::token))
        .route("/auth/authorize", get(launch::authorize))
        .route("/auth/login", post(launch::login))
        .route("/auth/consent", post(launch::consent))
        .route("/auth/revoke", post(launch::revoke))
        .route("/auth/introspect", post(launch::introspect))
        .route("/auth/break-glass", post(glass::break_glass))
        .route("/audit/alerts", get(alerts::list))
        .route("/audit/report", get(audit::report))
        .route("/audit/alerts/{id}", post(alerts::review))
        .route("/fhir/$export", get(export::system))
        .route("/fhir/Patient/$export", get(export::patients))
        .route("/fhir/Group/{id}/$export", get(export::group))
        .route("/bulk/{job}", get(export::status).delete(export::cancel))
        .route("/bulk/{job}/{kind}/{n}", get(export::file))
        .route("/shl/links", post(share::create).get(share::list))
        .route("/shl/links/{id}", delete(share::revoke))
        .route("/shl/links/{id}/content", post(share::refresh))
        .route(
            "/shl/m/{secret}",
            post(share::manifest)
                .get(share::direct)
                .options(share::preflight),
        )
        .route(
            "/shl/f/{ticket}",
            get(share::file).options(share::preflight),
        )
        .route("/admin/keys/rotate-kek", post(admin::rotate_kek))
        .route("/admin/backup", get(admin::backup_status))
        .route("/fhir/AuditEvent", get(audit::search))
        .route("/fhir/AuditEvent/{id}", get(audit::read))
        .route("/fhir/AuditEvent/{id}/{op}", get(audit::proof))
        .route("/fhir", post(bundle::handle))
        .route("/fhir/", post(bundle::handle))
        .route("/fhir/{rtype}", post(fhir::create).get(search::search_type))
        .route("/fhir/{rtype}/_search", post(search::search_post))
        .route(
            "/fhir/{rtype}/{id}/{ctype}",
            get(search::compartment).post(erase::erase),
        )
        .route("/fhir/{rtype}/_history", get(fhir::history_type))
        .route(
            "/fhir/{rtype}/{id}",
            get(fhir::read).put(fhir::update).delete(fhir::delete),
        )
        .route("/fhir/{rtype}/{id}/_history", get(fhir::history_instance))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(fhir::vread))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(app)
}
