//! `POST /fhir/Patient/{id}/$erase`: erasure of a patient's records by crypto-shredding
//! (`phivault_records::erase`), for a back-end client holding `system/Patient.$erase`
//! (`phivault_auth::authorize_erasure`). The body is a Parameters resource with a
//! `reason` (valueString); the reason is sealed and kept with the erasure, never in the
//! audit log in clear. The audit event (`erase`, the patient's id, the client) is written
//! in the erasure's own transaction. Other POSTs to `{type}/{id}/{name}` are 405.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use phivault_audit::Action;
use phivault_fhir::{Issue, IssueCode, Severity};
use serde_json::Value;

use crate::FHIR_JSON;
use crate::error::ApiError;
use crate::respond::{body_bytes, check_id, json_response, parse_valid};
use crate::state::{App, Ctx, Peer, finish};

pub(crate) async fn erase(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((rtype, id, op)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::D, "erase", &rtype, Some(&id));
    let r = erase_inner(&app, &mut ctx, (&rtype, &id, &op), &headers, body).await;
    finish(&app, ctx, r).await
}

async fn erase_inner(
    app: &Arc<App>,
    ctx: &mut Ctx,
    (rtype, id, op): (&str, &str, &str),
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let auth = app.authenticate(headers, ctx)?;
    if rtype != "Patient" || op != "$erase" {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            IssueCode::NotSupported,
            "this interaction is not supported on this route",
        ));
    }
    phivault_auth::authorize_erasure(&auth).map_err(|_| ApiError::forbidden())?;
    check_id(id).map_err(|_| ApiError::not_found("patient not found"))?;
    let params = parse_valid(&body_bytes(headers, body)?, "Parameters")?;
    let reason = reason_of(&params).ok_or_else(|| {
        ApiError::bad_request("$erase needs a Parameters body with a reason (valueString)")
    })?;
    ctx.patient = Some(id.to_owned());
    let event = ctx.event(200);
    let done = app
        .vault
        .engine
        .erase_patient(id, &reason, &ctx.request_id, vec![event])
        .await?;
    ctx.audited = true;
    // reaches computed before (clinicians' treated patients) may name the patient
    app.vault.care.invalidate();
    let message = format!(
        "the patient's records were erased: their data key was destroyed; {} resources can no longer be opened",
        done.resources
    );
    let outcome = phivault_fhir::operation_outcome(&[Issue {
        severity: Severity::Information,
        code: IssueCode::Informational,
        path: None,
        message,
    }]);
    let body = serde_json::to_vec(&outcome).map_err(|_| ApiError::internal())?;
    Ok(json_response(StatusCode::OK, Bytes::from(body), FHIR_JSON))
}

/// The `reason` parameter's string.
fn reason_of(params: &Value) -> Option<String> {
    params["parameter"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "reason")?
        .get("valueString")?
        .as_str()
        .map(str::to_owned)
}
