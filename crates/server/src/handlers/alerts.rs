//! Alert review through the API (AU5): auditors list the alerts that the snooping rules
//! (`phivault audit scan`) and break-the-glass raised, and record their review — the same
//! records and rules as `phivault audit alerts` and `phivault audit review`.
//!
//! * `GET /audit/alerts?status=open|justified|violation&_count=N` — oldest first, as JSON.
//! * `POST /audit/alerts/{id}` (form: `status` = `justified` | `violation`, `note`): the
//!   review names the auditor. An alert is reviewed once.
//!
//! Both for auditors only (`user/AuditEvent.rs` with the auditor role, as the audit log
//! itself; back-end clients do not read the log).
//!
//! Every call is audited like any other access.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use phivault_audit::Action;

use crate::error::ApiError;
use crate::handlers::audit::auditor;
use crate::respond::json_ok as json;
use crate::state::{App, Ctx, Peer, blocking, finish};
use phivault_records::care::AlertError;
use phivault_records::engine::{form_urlencoded_pairs, now_ms};

/// Most alerts one listing returns.
const MAX_COUNT: usize = 1000;

fn alert_error(e: AlertError) -> ApiError {
    match e {
        AlertError::Store(_) => ApiError::unavailable(),
        AlertError::Integrity => ApiError::integrity(),
        AlertError::Review("no such alert") => ApiError::not_found("no such alert"),
        AlertError::Review(msg) => ApiError::bad_request(msg),
    }
}

/// `GET /audit/alerts`
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::R, "alerts");
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        auditor(&app, &auth)?;
        let mut status: Option<String> = None;
        let mut count = 100;
        for (k, v) in form_urlencoded_pairs(query.as_deref().unwrap_or("")) {
            match k.as_str() {
                "status" if matches!(v.as_str(), "open" | "justified" | "violation") => {
                    status = Some(v)
                }
                "status" => {
                    return Err(ApiError::bad_request(
                        "status is open, justified or violation",
                    ));
                }
                "_count" => {
                    count = v
                        .parse::<usize>()
                        .map_err(|_| ApiError::bad_request("_count must be a number"))?
                        .min(MAX_COUNT)
                }
                _ => return Err(ApiError::bad_request("supported: status, _count")),
            }
        }
        let a = app.clone();
        let alerts = blocking(move || a.vault.alerts(usize::MAX).map_err(alert_error)).await?;
        let shown: Vec<_> = alerts
            .into_iter()
            .filter(|x| status.as_ref().is_none_or(|s| &x.status == s))
            .take(count)
            .collect();
        json(&serde_json::json!({ "alerts": shown }))
    }
    .await;
    finish(&app, ctx, r).await
}

/// `POST /audit/alerts/{id}`
pub async fn review(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::U, "alert-review");
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        auditor(&app, &auth)?;
        let Some(person) = auth.person() else {
            return Err(ApiError::forbidden());
        };
        crate::respond::check_id(&id).map_err(|_| ApiError::not_found("no such alert"))?;
        ctx.id = Some(id.clone());
        let form = crate::handlers::launch::form_of(body)
            .ok_or_else(|| ApiError::bad_request("malformed form"))?;
        let status = form.get("status").cloned().unwrap_or_default();
        let note = form.get("note").cloned().unwrap_or_default();
        if note.chars().count() > 2000 {
            return Err(ApiError::bad_request("the note is at most 2000 characters"));
        }
        let user = person.user_id.clone();
        let a = app.clone();
        let reviewed = blocking(move || {
            let reviewer = a
                .vault
                .engine
                .users()
                .get_by_id(&user)
                .map_err(|_| ApiError::unavailable())?
                .map(|u| u.username.clone())
                .ok_or_else(ApiError::forbidden)?;
            a.vault
                .review_alert(&id, &status, &reviewer, &note, now_ms())
                .map_err(alert_error)
        })
        .await?;
        if !reviewed.patient.is_empty() {
            ctx.patient = Some(reviewed.patient.clone());
        }
        json(&serde_json::json!({ "alert": reviewed }))
    }
    .await;
    finish(&app, ctx, r).await
}
