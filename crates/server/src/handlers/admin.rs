//! Key administration through the API (issue 17).
//!
//! * `POST /admin/keys/rotate-kek` — make a new generation of the key-encryption key,
//!   rewrap every patient's data key under it while requests go on, and destroy the older
//!   generations (`phivault_records::kek`). Answers once done:
//!   `{"generation": g, "rewrapped": n, "destroyed": [..], "unreadable": 0}`. `?batch=N`
//!   (1–10,000, default 256) sets how many data keys one write rewraps.
//!
//! Allowed to a person with the admin role, or a back-end client holding
//! `system/PhivaultKeys.u` by name (`phivault_auth::policy::may_rotate_keys`); audited
//! like any other request (interaction `rotate-kek`), refusals included.

use std::sync::Arc;

use axum::extract::{Extension, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use phivault_audit::Action;
use phivault_records::engine::form_urlencoded_pairs;
use phivault_records::kek::DEFAULT_REWRAP_BATCH;

use crate::error::ApiError;
use crate::state::{App, Ctx, Peer, blocking, finish};

/// `POST /admin/keys/rotate-kek`
pub async fn rotate_kek(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::E, "rotate-kek");
    ctx.detail.purpose = Some("HSYSADMIN".to_owned());
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        let admin = app.vault.decide_key_admin(&auth)?;
        let mut batch = DEFAULT_REWRAP_BATCH;
        for (k, v) in form_urlencoded_pairs(query.as_deref().unwrap_or("")) {
            match (k.as_str(), v.parse::<usize>()) {
                ("batch", Ok(n)) if (1..=10_000).contains(&n) => batch = n,
                _ => return Err(ApiError::bad_request("supported: batch (1 to 10000)")),
            }
        }
        let a = app.clone();
        let done = blocking(move || {
            a.vault
                .engine
                .rotate_kek(&admin, batch)
                .map_err(ApiError::from)
        })
        .await?;
        let body = serde_json::json!({
            "generation": done.generation,
            "rewrapped": done.rewrapped,
            "destroyed": done.destroyed,
            "unreadable": done.unreadable,
        });
        crate::respond::json_ok(&body)
    }
    .await;
    finish(&app, ctx, r).await
}

/// `GET /admin/backup`: the backups' state — the newest restore point, how long commits
/// wait to be shipped, the newest snapshot, the last drill (RTO, RPO, counts) and the last
/// error — as JSON. For whoever may administer keys (the same decision as rotation);
/// audited (interaction `backup-status`). 404 when this server ships no backups.
pub async fn backup_status(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::R, "backup-status");
    ctx.detail.purpose = Some("HSYSADMIN".to_owned());
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        app.vault.decide_key_admin(&auth)?;
        let status = app
            .vault
            .backup_status()
            .ok_or_else(|| ApiError::not_found("this server ships no backups (--backup-target)"))?;
        crate::respond::json_ok(&status)
    }
    .await;
    finish(&app, ctx, r).await
}
