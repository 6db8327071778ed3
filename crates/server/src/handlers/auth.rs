//! Handlers of the OAuth side: the token endpoint (client credentials; the App Launch
//! grants are `launch`'s), SMART configuration and the token signing keys.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use phivault_audit::Action;
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
    let oauth_error = |code: &str, status: StatusCode| {
        let mut r = (
            status,
            serde_json::to_vec(&json!({"error": code})).unwrap_or_default(),
        )
            .into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    let Ok(bytes) = body else {
        return Ok(oauth_error("invalid_request", StatusCode::BAD_REQUEST));
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Ok(oauth_error("invalid_request", StatusCode::BAD_REQUEST));
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
            Err(e) => oauth_error(
                e.error_code(),
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            ),
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
        Err(e) => Ok(oauth_error(
            e.error_code(),
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
        )),
    }
}
