//! `POST /auth/break-glass`: a clinician opens one more patient for a while, with a stated
//! reason and a fresh authenticator code (AC5; the rules are `care`'s).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use phivault_audit::Action;
use phivault_auth::{Interaction, Reach as Grant};

use crate::error::ApiError;
use crate::respond::{check_id, json_response};
use crate::state::{App, Ctx, Peer, blocking, finish};

/// `POST /auth/break-glass` (form: `patient`, `reason`, `otp`) with a clinician's bearer
/// token.
pub async fn break_glass(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::E, "break-the-glass", "Patient", None);
    let a = app.clone();
    // store reads and writes block: off the async threads
    let done = blocking(move || {
        let r = break_glass_inner(&a, &mut ctx, &headers, body);
        Ok((ctx, r))
    })
    .await;
    match done {
        Ok((ctx, r)) => finish(&app, ctx, r).await,
        Err(e) => {
            let ctx = Ctx::on(peer, Action::E, "break-the-glass", "Patient", None);
            finish(&app, ctx, Err(e)).await
        }
    }
}

fn break_glass_inner(
    app: &App,
    ctx: &mut Ctx,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let auth = app.authenticate(headers, ctx)?;
    let form = crate::handlers::launch::form_of(body)
        .ok_or_else(|| ApiError::bad_request("malformed form"))?;
    let field = |k: &str| form.get(k).map_or("", |v| v.as_str());
    let patient = field("patient");
    check_id(patient).map_err(|_| ApiError::bad_request("patient must be a resource id"))?;
    ctx.id = Some(patient.to_owned());
    ctx.patient = Some(patient.to_owned());
    // only a clinician linked to a practitioner, through a token that may read patients
    let user = match phivault_auth::authorize(&auth, "Patient", Interaction::Read)
        .map(|g| g.reach().clone())
    {
        Ok(Grant::TreatedBy { user, .. }) => user,
        _ => {
            return Err(
                phivault_records::care::forbidden("break-the-glass is for clinicians").into(),
            );
        }
    };
    let opened = app.vault.open_glass(
        &user,
        patient,
        field("reason"),
        field("otp"),
        &ctx.request_id,
    )?;
    let body = serde_json::json!({
        "patient": patient,
        "expires_at": opened.until_ms / 1000,
        "alert": opened.alert,
    });
    let body = serde_json::to_vec(&body).map_err(|_| ApiError::internal())?;
    Ok(json_response(
        StatusCode::OK,
        Bytes::from(body),
        "application/json",
    ))
}
