//! Handlers of the OAuth side: the token endpoint (client credentials; the App Launch
//! grants are `launch`'s), SMART configuration and the token signing keys.
//!
//! A refused token request is answered `{"error", "error_description"}` (RFC 6749 §5.2)
//! from its [`TokenFailure`], and the reason code goes into the request's audit event
//! (`Detail::reason`, shown as the AuditEvent's `outcomeDesc`). Both are fixed strings of
//! the auth crate's table: nothing of the request is echoed or logged.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use phivault_audit::Action;
use phivault_auth::{OAuthError, TokenFailure};
use serde_json::json;

use crate::error::ApiError;
use crate::respond::json_response;
use crate::state::{App, Ctx, Peer, blocking, finish};
use phivault_records::engine::now_ms;

pub(crate) async fn smart_configuration(State(app): State<Arc<App>>) -> Response {
    json_response(
        StatusCode::OK,
        app.smart_configuration.clone(),
        "application/json",
    )
}

pub(crate) async fn jwks(State(app): State<Arc<App>>) -> Response {
    json_response(StatusCode::OK, app.jwks.clone(), "application/json")
}

pub(crate) async fn token(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::E, "token");
    let r = token_inner(&app, &mut ctx, &headers, body).await;
    finish(&app, ctx, r).await
}

async fn token_inner(
    app: &Arc<App>,
    ctx: &mut Ctx,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Ok(bytes) = body else {
        return Ok(refuse(ctx, TokenFailure::BodyUnreadable.into()));
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Ok(refuse(ctx, TokenFailure::BodyUnreadable.into()));
    };
    // a token response: JSON, never cached (RFC 6749 §5.1)
    let issued = |body: Vec<u8>| {
        let mut r = json_response(StatusCode::OK, Bytes::from(body), "application/json");
        r.headers_mut()
            .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        r
    };
    let form = phivault_records::engine::form_urlencoded_pairs(text);
    if let Some(answer) = crate::handlers::launch::person_grant(app, &form, ctx, headers) {
        return Ok(match answer {
            Ok(body) => issued(body.to_string().into_bytes()),
            Err(e) => refuse(ctx, e),
        });
    }
    let a = app.clone();
    let result = blocking(move || {
        let now = (now_ms() / 1000) as u64;
        Ok(phivault_auth::handle_token_request(
            &form,
            &|id: &str| a.client(id),
            &a.token_url,
            &a.issuer,
            &a.replay,
            now,
        ))
    })
    .await?;
    match result {
        Ok(resp) => {
            ctx.client_id = Some(resp.client_id.clone());
            let body = serde_json::to_vec(&resp).map_err(|_| ApiError::internal())?;
            Ok(issued(body))
        }
        Err(e) => Ok(refuse(ctx, e)),
    }
}

/// The answer to a refused token request (RFC 6749 §5.2), its reason code kept for the
/// request's audit event.
fn refuse(ctx: &mut Ctx, e: OAuthError) -> Response {
    let f = e.failure();
    ctx.detail.refused_because(f.code());
    let body = json!({"error": f.error(), "error_description": f.description()});
    let mut r = (
        StatusCode::from_u16(f.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
        serde_json::to_vec(&body).unwrap_or_default(),
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `OAuthError` variant that carries a reason string.
    type MakeError = fn(&'static str) -> OAuthError;

    /// Every reason the launch handler gives as a string literal maps to a failure of its
    /// own in the auth crate's table (a reworded reason would otherwise fall back to the
    /// generic description of its kind unnoticed).
    #[test]
    fn every_reason_of_the_launch_grants_is_mapped() {
        let src = include_str!("launch.rs");
        let generic = [
            TokenFailure::RequestMalformed,
            TokenFailure::ClientAuthFailed,
            TokenFailure::GrantInvalid,
            TokenFailure::ScopeInvalid,
            TokenFailure::DpopProofInvalid,
            TokenFailure::ServerError,
        ];
        let kinds: [(&str, MakeError); 6] = [
            ("InvalidRequest", OAuthError::InvalidRequest),
            ("InvalidClient", OAuthError::InvalidClient),
            ("InvalidGrant", OAuthError::InvalidGrant),
            ("InvalidScope", OAuthError::InvalidScope),
            ("InvalidDpopProof", OAuthError::InvalidDpopProof),
            ("ServerError", OAuthError::ServerError),
        ];
        let mut seen = 0;
        for (kind, make) in kinds {
            let needle = format!("OAuthError::{kind}(");
            for (at, _) in src.match_indices(&needle) {
                // the literal may sit on the next line after rustfmt
                let rest = src[at + needle.len()..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else {
                    continue;
                };
                let Some(end) = rest.find('"') else { continue };
                let reason: &'static str = Box::leak(rest[..end].to_owned().into_boxed_str());
                // DPoP proof checks other than these two pass the dpop module's reasons on
                let e = make(reason);
                if kind == "InvalidDpopProof"
                    && matches!(reason, "not text" | "more than one proof")
                {
                    assert_eq!(e.failure(), TokenFailure::DpopProofInvalid);
                    continue;
                }
                assert!(
                    !generic.contains(&e.failure()),
                    "unmapped: {kind}({reason:?})"
                );
                assert_eq!(e.failure().error(), e.error_code());
                seen += 1;
            }
        }
        assert!(seen >= 12, "found {seen} reasons in launch.rs");
    }
}
