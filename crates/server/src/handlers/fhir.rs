//! Handlers of single resources: create, read, vread, update, delete, instance and type
//! history, and the CapabilityStatement.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phivault_audit::Action;
use phivault_auth::Interaction;
use phivault_fhir::IssueCode;
use serde_json::{Value, json};

use crate::FHIR_JSON;
use crate::error::ApiError;
use crate::interactions::{Created, do_create, do_read, update_or_delete, writer};
use crate::respond::{
    VersionRef, body_bytes, check_id, json_response, parse_if_match, parse_valid, resource_response,
};
use crate::state::{App, Ctx, Peer, blocking, finish};
use phivault_records::engine::{instant, key_patient, now_ms};

pub(crate) async fn create(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(rtype): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::C, "create", &rtype, None);
    let r = create_inner(&app, &mut ctx, &rtype, &headers, body).await;
    finish(&app, ctx, r).await
}

async fn create_inner(
    app: &Arc<App>,
    ctx: &mut Ctx,
    rtype: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let auth = app.authenticate(headers, ctx)?;
    let access = writer(app, &auth, rtype, Interaction::Create)?;
    let bytes = body_bytes(headers, body)?;
    let resource = parse_valid(&bytes, rtype)?;
    // a confined writer (a clinician) writes only records of patients it reaches (the
    // engine checks the record it seals); a conditional create would search beyond them
    if access.is_confined() && headers.contains_key("if-none-exist") {
        return Err(ApiError::forbidden());
    }
    let criteria = match headers.get("if-none-exist") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad_request("If-None-Exist is not valid text"))?
                .to_owned(),
        ),
        None => None,
    };
    Ok(
        match do_create(app, ctx, &access, resource, criteria.as_deref()).await? {
            Created::New(w) => resource_response(
                app,
                StatusCode::CREATED,
                VersionRef {
                    rtype,
                    id: &w.id,
                    version: w.version,
                    updated_ms: w.updated_ms,
                },
                w.body()?,
                true,
            ),
            Created::Existing(row) => resource_response(
                app,
                StatusCode::OK,
                VersionRef {
                    rtype,
                    id: &row.id,
                    version: row.version,
                    updated_ms: row.updated_ms,
                },
                Vec::new(),
                true,
            ),
        },
    )
}

pub(crate) async fn update(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::U, "update", &rtype, Some(&id));
    let r = update_inner(&app, &mut ctx, &rtype, &id, &headers, body).await;
    finish(&app, ctx, r).await
}

async fn update_inner(
    app: &Arc<App>,
    ctx: &mut Ctx,
    rtype: &str,
    id: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let auth = app.authenticate(headers, ctx)?;
    let access = writer(app, &auth, rtype, Interaction::Update)?;
    check_id(id)?;
    let bytes = body_bytes(headers, body)?;
    let resource = parse_valid(&bytes, rtype)?;
    if resource.get("id").and_then(Value::as_str) != Some(id) {
        return Err(ApiError::bad_request(
            "the resource id in the body must equal the id in the URL",
        ));
    }
    let if_match = parse_if_match(headers)?;
    let w = update_or_delete(app, ctx, &access, id, Some(resource), if_match).await?;
    let status = if w.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(resource_response(
        app,
        status,
        VersionRef {
            rtype,
            id,
            version: w.version,
            updated_ms: w.updated_ms,
        },
        w.body()?,
        true,
    ))
}

pub(crate) async fn delete(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::D, "delete", &rtype, Some(&id));
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        let access = app
            .vault
            .decide_unconfined(&auth, &rtype, Interaction::Delete)?;
        check_id(&id)?;
        let if_match = parse_if_match(&headers)?;
        update_or_delete(&app, &mut ctx, &access, &id, None, if_match).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    finish(&app, ctx, r).await
}

pub(crate) async fn read(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::R, "read", &rtype, Some(&id));
    let r = read_inner(&app, &mut ctx, &rtype, &id, None, &headers).await;
    finish(&app, ctx, r).await
}

pub(crate) async fn vread(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::R, "vread", &rtype, Some(&id));
    let r = async {
        let v = vid
            .parse::<u64>()
            .map_err(|_| ApiError::not_found("version not found"));
        match v {
            Ok(v) => read_inner(&app, &mut ctx, &rtype, &id, Some(v), &headers).await,
            Err(e) => {
                app.access(&headers, &mut ctx, &rtype, Interaction::Read)?;
                Err(e)
            }
        }
    }
    .await;
    finish(&app, ctx, r).await
}

async fn read_inner(
    app: &Arc<App>,
    ctx: &mut Ctx,
    rtype: &str,
    id: &str,
    version: Option<u64>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (_, access) = app.access(headers, ctx, rtype, Interaction::Read)?;
    let (row, body) = do_read(app, ctx, &access, id, version).await?;
    Ok(resource_response(
        app,
        StatusCode::OK,
        VersionRef {
            rtype,
            id,
            version: row.version,
            updated_ms: row.updated_ms,
        },
        body,
        false,
    ))
}

fn parse_count(query: Option<&str>, max: usize) -> Result<usize, ApiError> {
    let mut count = 50.min(max);
    for (k, v) in phivault_records::engine::form_urlencoded_pairs(query.unwrap_or("")) {
        match k.as_str() {
            "_count" => {
                count = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request("_count must be a non-negative integer"))?
                    .min(max);
            }
            "_format" | "_pretty" => {}
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    IssueCode::NotSupported,
                    "unsupported parameter for _history",
                ));
            }
        }
    }
    Ok(count)
}

pub(crate) async fn history_instance(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::R, "history-instance", &rtype, Some(&id));
    let r = history_inner(&app, &mut ctx, &rtype, Some(id.clone()), query, &headers).await;
    finish(&app, ctx, r).await
}

pub(crate) async fn history_type(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::R, "history-type", &rtype, None);
    let r = history_inner(&app, &mut ctx, &rtype, None, query, &headers).await;
    finish(&app, ctx, r).await
}

async fn history_inner(
    app: &Arc<App>,
    ctx: &mut Ctx,
    rtype: &str,
    id: Option<String>,
    query: Option<String>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (_, access) = app.access(headers, ctx, rtype, Interaction::Read)?;
    if access.is_confined() && id.is_none() {
        // the latest versions of a whole type, filtered, would still tell how much was
        // written for others: not for confined access
        return Err(ApiError::forbidden());
    }
    if let Some(id) = &id {
        check_id(id).map_err(|_| ApiError::not_found("resource not found"))?;
    }
    let count = parse_count(query.as_deref(), app.limits.max_count)?;
    let (a, i) = (app.clone(), id.clone());
    let (rows, erased) = blocking(move || {
        // a confined access sees the versions sealed for patients it reaches (a record
        // moved between patients shows each only its own versions); nothing else is opened
        let rows = a.vault.engine.history(&access, i.as_deref(), count)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut erased = false;
        for r in rows {
            // an erased patient's versions are left out (all of a record's: 410 below)
            if a.vault.engine.is_erased(&r.key_id)? {
                erased = true;
                continue;
            }
            let body = if r.deleted {
                Vec::new()
            } else {
                a.vault.engine.open(&access, &r)?
            };
            out.push((r, body));
        }
        Ok((out, erased))
    })
    .await?;
    if id.is_some() && rows.is_empty() {
        if erased {
            return Err(phivault_records::Error::erased().into());
        }
        return Err(ApiError::not_found("resource not found"));
    }
    let mut patients: Vec<String> = rows
        .iter()
        .filter_map(|(r, _)| key_patient(&r.key_id).map(str::to_owned))
        .collect();
    patients.sort();
    patients.dedup();
    if id.is_some() {
        ctx.patient = patients.first().cloned();
    } else {
        // one audit event per patient whose records were disclosed
        for p in &patients {
            let mut e = ctx.event(200);
            e.patient = Some(p.clone());
            ctx.extra.push(e);
        }
    }
    let mut entries = Vec::with_capacity(rows.len());
    for (row, body) in rows {
        let full_url = format!("{}/{}/{}", app.vault.base_url, row.rtype, row.id);
        let (method, url) = if row.deleted {
            ("DELETE", format!("{}/{}", row.rtype, row.id))
        } else if row.version == 1 {
            ("POST", row.rtype.clone())
        } else {
            ("PUT", format!("{}/{}", row.rtype, row.id))
        };
        let mut entry = json!({
            "fullUrl": full_url,
            "request": {"method": method, "url": url},
            "response": {
                "status": if row.deleted { "204" } else if row.version == 1 { "201" } else { "200" },
                "etag": format!("W/\"{}\"", row.version),
                "lastModified": instant(row.updated_ms),
            }
        });
        if !row.deleted {
            let v: Value = serde_json::from_slice(&body).map_err(|_| ApiError::integrity())?;
            entry["resource"] = v;
        }
        entries.push(entry);
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "id": phivault_records::engine::new_id(),
        "meta": {"lastUpdated": instant(now_ms())},
        "type": "history",
        "total": entries.len(),
        "link": [{"relation": "self", "url": match &id {
            Some(id) => format!("{}/{rtype}/{id}/_history", app.vault.base_url),
            None => format!("{}/{rtype}/_history", app.vault.base_url),
        }}],
        "entry": entries,
    });
    let body = serde_json::to_vec(&bundle).map_err(|_| ApiError::internal())?;
    Ok(json_response(StatusCode::OK, Bytes::from(body), FHIR_JSON))
}

pub(crate) async fn metadata(State(app): State<Arc<App>>) -> Response {
    json_response(StatusCode::OK, app.capability.clone(), FHIR_JSON)
}
