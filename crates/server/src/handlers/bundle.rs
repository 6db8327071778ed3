//! `POST /fhir` with batch and transaction Bundles.
//!
//! A transaction is one atomic write: every entry is authorized on its own (SM2), `urn:uuid:`
//! references are rewritten to the ids the server assigns, every version is sealed, and the
//! whole set — with one audit event that lists every entry — is committed in
//! a single store batch. A lost race (another writer changed a resource in between) retries
//! the whole transaction; an `ifMatch` that no longer holds fails it with 412.
//! A batch runs its entries independently, each with its own outcome and audit event.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use phivault_audit::{Action, AuditEvent};
use phivault_auth::{Authenticated, Interaction};
use phivault_fhir::{BundleType, EntryRequest, IssueCode, Method};
use phivault_records::engine::Batch;
use phivault_store::{CommitError, Expect};
use serde_json::{Value, json};

use crate::FHIR_JSON;
use crate::error::ApiError;
use crate::interactions::{
    Commit, Created, MAX_RETRIES, commit, conflict_exhausted, do_create, do_read, forget_keys,
    update_or_delete,
};
use crate::respond::{body_bytes, parse_etag};
use crate::state::{App, Ctx, Peer, blocking, finish};
use phivault_records::Access;
use phivault_records::engine::{Written, instant, now_ms};

/// Handler of `POST /fhir`.
pub async fn handle(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::E, "batch-or-transaction");
    let r = handle_inner(&app, &mut ctx, &headers, body).await;
    finish(&app, ctx, r).await
}

async fn handle_inner(
    app: &Arc<App>,
    ctx: &mut Ctx,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let auth = app.authenticate(headers, ctx)?;
    let bytes = body_bytes(headers, body)?;
    let bundle =
        phivault_fhir::parse_resource(&bytes).map_err(|e| ApiError::invalid(vec![e.to_issue()]))?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::bad_request(
            "POST to the base URL takes a batch or transaction Bundle",
        ));
    }
    phivault_fhir::validate(&bundle).map_err(ApiError::invalid)?;
    let (kind, entries) = phivault_fhir::parse_bundle_owned(bundle, app.limits.max_bundle_entries)
        .map_err(|e| ApiError::invalid(vec![e.to_issue()]))?;
    let response = match kind {
        BundleType::Transaction => {
            ctx.interaction = "transaction";
            transaction(app, ctx, &auth, entries).await?
        }
        BundleType::Batch => {
            ctx.interaction = "batch";
            batch(app, ctx, &auth, entries).await?
        }
    };
    let body = serde_json::to_vec(&response).map_err(|_| ApiError::internal())?;
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(FHIR_JSON),
    );
    Ok(resp)
}

fn interaction_of(m: &Method) -> Interaction {
    match m {
        Method::Get => Interaction::Read,
        Method::Post => Interaction::Create,
        Method::Put => Interaction::Update,
        Method::Delete => Interaction::Delete,
    }
}

fn entry_error(index: usize, e: ApiError) -> ApiError {
    let mut e = e;
    for issue in &mut e.issues {
        issue.message = format!("entry {index}: {}", issue.message);
    }
    e
}

fn response_entry(status: &str, w: Option<&Written>, base: &str) -> Value {
    let mut r = json!({ "status": status });
    if let Some(w) = w {
        if !w.deleted {
            r["location"] = json!(format!(
                "{base}/{}/{}/_history/{}",
                w.rtype, w.id, w.version
            ));
        }
        r["etag"] = json!(format!("W/\"{}\"", w.version));
        r["lastModified"] = json!(instant(w.updated_ms));
    }
    json!({ "response": r })
}

/// What a transaction entry will do once the references are known.
enum Plan {
    Create { id: String },
    Existing(phivault_store::VersionRow),
    Put { id: String },
    Delete { id: String },
    Read { id: String, vid: Option<u64> },
}

async fn transaction(
    app: &Arc<App>,
    ctx: &mut Ctx,
    auth: &Authenticated,
    mut entries: Vec<EntryRequest>,
) -> Result<Value, ApiError> {
    // 1. Authorize every entry before anything happens (SM2); reject what we do not do.
    let mut accesses = Vec::with_capacity(entries.len());
    for e in &entries {
        accesses.push(
            app.vault
                .decide_unconfined(auth, &e.resource_type, interaction_of(&e.method))
                .map_err(|err| entry_error(e.index, err.into()))?,
        );
        if let Some(r) = &e.resource
            && r.get("resourceType").and_then(Value::as_str) != Some(e.resource_type.as_str())
        {
            return Err(entry_error(
                e.index,
                ApiError::bad_request("resourceType does not match request.url"),
            ));
        }
        let conditional = e.id.is_none() && matches!(e.method, Method::Put | Method::Delete);
        if conditional || (matches!(e.method, Method::Get) && e.id.is_none()) {
            return Err(entry_error(
                e.index,
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    IssueCode::NotSupported,
                    "conditional update/delete and searches are not supported in transactions",
                ),
            ));
        }
    }
    let _locks = app
        .vault
        .engine
        .lock_resources(entries.iter().filter_map(|e| match e.method {
            Method::Put | Method::Delete => Some((e.resource_type.as_str(), e.id.as_deref()?)),
            _ => None,
        }))
        .await;
    // The entries' resources, moved out once: an attempt rewrites their references in place
    // and a retry first puts the original references back (`undo`), so no resource is
    // copied however many attempts a conflict takes.
    let mut resources: Vec<Option<Value>> = entries.iter_mut().map(|e| e.resource.take()).collect();
    let mut undo: Vec<Vec<(usize, String)>> = vec![Vec::new(); entries.len()];
    for _ in 0..MAX_RETRIES {
        for (r, u) in resources.iter_mut().zip(undo.iter_mut()) {
            if let Some(r) = r
                && !u.is_empty()
            {
                restore_references(r, u);
            }
        }
        // 2. Resolve ids: new ids for creates, existing ones for matched conditional creates.
        let mut map: HashMap<String, String> = HashMap::new();
        let mut plans: Vec<Plan> = Vec::with_capacity(entries.len());
        let mut guards = Vec::new();
        let mut touched = HashSet::new();
        for e in &entries {
            let plan = match e.method {
                Method::Post => {
                    let mut existing = None;
                    if let Some(q) = &e.if_none_exist {
                        let cond = Arc::new(
                            phivault_records::search::Conditional::parse(
                                &app.vault,
                                &e.resource_type,
                                q,
                            )
                            .map_err(|err| entry_error(e.index, err.into()))?,
                        );
                        let a = app.clone();
                        match blocking(move || Ok(cond.find(&a.vault)?))
                            .await
                            .map_err(|err| entry_error(e.index, err))?
                        {
                            phivault_records::search::CondMatch::One(row) => existing = Some(row),
                            phivault_records::search::CondMatch::None(guard) => {
                                guards.extend(guard)
                            }
                        }
                    }
                    match existing {
                        Some(row) => Plan::Existing(row),
                        None => Plan::Create {
                            id: phivault_records::engine::new_id(),
                        },
                    }
                }
                Method::Put => Plan::Put {
                    id: e.id.clone().unwrap_or_default(),
                },
                Method::Delete => Plan::Delete {
                    id: e.id.clone().unwrap_or_default(),
                },
                Method::Get => Plan::Read {
                    id: e.id.clone().unwrap_or_default(),
                    vid: match &e.vid {
                        Some(v) => Some(v.parse::<u64>().map_err(|_| {
                            entry_error(e.index, ApiError::bad_request("invalid version id"))
                        })?),
                        None => None,
                    },
                },
            };
            let id = match &plan {
                Plan::Create { id, .. }
                | Plan::Existing(phivault_store::VersionRow { id, .. })
                | Plan::Put { id, .. }
                | Plan::Delete { id } => Some(id.clone()),
                Plan::Read { .. } => None,
            };
            if let Some(id) = id {
                if !touched.insert((e.resource_type.clone(), id.clone())) {
                    return Err(entry_error(
                        e.index,
                        ApiError::bad_request("a transaction may change each resource only once"),
                    ));
                }
                let target = format!("{}/{}", e.resource_type, id);
                // (an absolute URL on this server's base needs no entry: every write makes
                // those relative, `Engine::prepare`)
                if let Some(full) = &e.full_url {
                    map.insert(full.clone(), target);
                }
            }
            plans.push(plan);
        }
        // 3. Rewrite references to the assigned ids; an unresolvable urn reference is an error.
        for (((e, plan), resource), undo) in entries
            .iter()
            .zip(plans.iter())
            .zip(resources.iter_mut())
            .zip(undo.iter_mut())
        {
            if let (Plan::Create { .. } | Plan::Put { .. }, Some(resource)) = (plan, resource)
                && rewrite_references(resource, &map, undo)
            {
                return Err(entry_error(
                    e.index,
                    ApiError::bad_request(
                        "a urn: reference does not resolve to an entry of the transaction",
                    ),
                ));
            }
        }
        // 4. Seal every write into one batch.
        let now = now_ms();
        let mut ring = app.vault.engine.key_ring();
        let mut batch = Batch::default();
        let mut results: Vec<Option<(String, Option<Written>)>> = vec![None; entries.len()];
        let mut pinned = false;
        let mut entities = Vec::new();
        for &i in &phivault_fhir::transaction_order(&entries) {
            let (Some(e), Some(plan), Some(access)) =
                (entries.get(i), plans.get_mut(i), accesses.get(i))
            else {
                continue;
            };
            let rtype = e.resource_type.as_str();
            let resource = resources.get_mut(i).and_then(Option::as_mut);
            let (id, resource, expect_new) = match (plan, resource) {
                (Plan::Create { id }, Some(r)) => (id, Some(r), true),
                (Plan::Put { id }, Some(r)) => (id, Some(r), false),
                (Plan::Create { .. } | Plan::Put { .. }, None) => {
                    return Err(entry_error(
                        e.index,
                        ApiError::bad_request("resource is required for POST and PUT"),
                    ));
                }
                (Plan::Delete { id }, _) => (id, None, false),
                (Plan::Existing(row), _) => {
                    let w = Written::from_row(row);
                    entities.push(entity(&w, Action::R));
                    results[i] = Some(("200 OK".into(), Some(w)));
                    continue;
                }
                (Plan::Read { .. }, _) => continue,
            };
            let cur = if expect_new {
                None
            } else {
                let (a, acc, id2) = (app.clone(), access.clone(), id.clone());
                blocking(move || Ok(a.vault.engine.current(&acc, &id2)?)).await?
            };
            if let Some(m) = &e.if_match {
                pinned = true;
                let want = parse_etag(m);
                if want.is_none() || cur.as_ref().map(|c| c.version) != want {
                    return Err(entry_error(
                        e.index,
                        ApiError::new(
                            StatusCode::PRECONDITION_FAILED,
                            IssueCode::Conflict,
                            "ifMatch does not match the current version",
                        ),
                    ));
                }
            }
            if resource.is_none() && cur.as_ref().is_none_or(|c| c.deleted) {
                results[i] = Some(("204 No Content".into(), None));
                continue;
            }
            let (expect, version) = match &cur {
                Some(c) => (Expect::Version(c.version), c.version + 1),
                None => (Expect::Absent, 1),
            };
            let (put, written) = app
                .vault
                .engine
                .prepare(
                    access,
                    &mut ring,
                    rtype,
                    id,
                    version,
                    expect,
                    resource,
                    now,
                    cur.as_ref(),
                )
                .map_err(|err| entry_error(e.index, err.into()))?;
            let (action, status) = match e.method {
                Method::Delete => (Action::D, "204 No Content"),
                _ if version == 1 => (Action::C, "201 Created"),
                _ => (Action::U, "200 OK"),
            };
            entities.push(entity(&written, action));
            batch.puts.push(put);
            results[i] = Some((status.to_owned(), Some(written)));
        }
        batch.new_keys = ring.new_keys();
        batch.guards = guards;
        let mut event = ctx.event(200);
        event.entities = entities;
        batch.audit.push(event);
        match commit(app, batch).await? {
            Commit::Done => {
                ring.committed();
                ctx.audited = true;
            }
            Commit::Conflict(CommitError::KeyConflict) => {
                for w in results.iter().flatten().filter_map(|(_, w)| w.as_ref()) {
                    forget_keys(app, w);
                }
                continue;
            }
            Commit::Conflict(CommitError::Conflict { .. }) if pinned => {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    IssueCode::Conflict,
                    "ifMatch does not match the current version",
                ));
            }
            Commit::Conflict(_) => continue,
        }
        // 5. Reads run last, after the writes, each audited.
        let mut out = Vec::with_capacity(entries.len());
        let mut read_events = Vec::new();
        for (i, (plan, access)) in plans.iter().zip(&accesses).enumerate() {
            if let Plan::Read { id, vid } = plan {
                let (entry, ev) = read_entry(app, ctx, access, id, *vid).await;
                read_events.extend(ev);
                out.push(entry);
            } else {
                let (status, w) = results[i].take().unwrap_or(("200 OK".into(), None));
                out.push(response_entry(&status, w.as_ref(), &app.vault.base_url));
            }
        }
        if !read_events.is_empty() {
            app.audit(read_events).await?;
        }
        return Ok(json!({
            "resourceType": "Bundle",
            "id": phivault_records::engine::new_id(),
            "type": "transaction-response",
            "entry": out,
        }));
    }
    Err(conflict_exhausted())
}

/// Rewrite `resource`'s references that `map` names (fullUrl or absolute URL → `Type/id`),
/// recording each original in `undo` for [`restore_references`]; true when a `urn:`
/// reference names no entry of the transaction.
fn rewrite_references(
    resource: &mut Value,
    map: &HashMap<String, String>,
    undo: &mut Vec<(usize, String)>,
) -> bool {
    let mut dangling = false;
    let mut n = 0;
    phivault_fhir::for_each_reference_mut(resource, &mut |r: &mut String| {
        if let Some(t) = map.get(r.as_str()) {
            undo.push((n, std::mem::replace(r, t.clone())));
        } else if r.starts_with("urn:uuid:") || r.starts_with("urn:oid:") {
            dangling = true;
        }
        n += 1;
    });
    dangling
}

/// Put back the reference strings a transaction attempt rewrote: `undo` holds, in visiting
/// order, each rewritten reference's position among the resource's references and its
/// original text (the walk's order does not depend on the strings' contents).
fn restore_references(resource: &mut Value, undo: &mut Vec<(usize, String)>) {
    let mut pending = undo.drain(..).peekable();
    let mut n = 0;
    phivault_fhir::for_each_reference_mut(resource, &mut |r: &mut String| {
        if let Some((_, original)) = pending.next_if(|(at, _)| *at == n) {
            *r = original;
        }
        n += 1;
    });
}

fn entity(w: &Written, action: Action) -> phivault_audit::Entity {
    phivault_audit::Entity {
        action,
        resource_type: w.rtype.clone(),
        resource_id: w.id.clone(),
        version: Some(w.version),
        patient: w.patient.clone(),
    }
}

/// A read inside a bundle: its response entry and its (not yet durable) audit event.
async fn read_entry(
    app: &Arc<App>,
    parent: &Ctx,
    access: &Access,
    id: &str,
    vid: Option<u64>,
) -> (Value, Option<AuditEvent>) {
    let rtype = access.rtype();
    let mut ctx = parent.clone();
    ctx.action = Action::R;
    ctx.interaction = if vid.is_some() { "vread" } else { "read" };
    ctx.rtype = Some(rtype.to_owned());
    ctx.id = Some(id.to_owned());
    ctx.audited = false;
    match do_read(app, &mut ctx, access, id, vid).await {
        Ok((row, body)) => (read_response_entry(&row, &body), Some(ctx.event(200))),
        Err(e) => outcome_entry(e, &ctx),
    }
}

/// The response entry of a successful read.
fn read_response_entry(row: &phivault_store::VersionRow, body: &[u8]) -> Value {
    let resource: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    json!({
        "resource": resource,
        "response": {
            "status": "200 OK",
            "etag": format!("W/\"{}\"", row.version),
            "lastModified": instant(row.updated_ms),
        }
    })
}

fn outcome_entry(e: ApiError, ctx: &Ctx) -> (Value, Option<AuditEvent>) {
    let status = e.status;
    let entry = json!({
        "response": {
            "status": format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")),
            "outcome": phivault_fhir::operation_outcome(&e.issues),
        }
    });
    let ev = (!ctx.audited).then(|| ctx.event(status.as_u16()));
    (entry, ev)
}

async fn batch(
    app: &Arc<App>,
    ctx: &mut Ctx,
    auth: &Authenticated,
    entries: Vec<EntryRequest>,
) -> Result<Value, ApiError> {
    let mut tasks = tokio::task::JoinSet::new();
    let n = entries.len();
    for e in entries {
        let app = app.clone();
        let mut ectx = ctx.clone();
        ectx.audited = false;
        ectx.rtype = Some(e.resource_type.clone());
        ectx.id = e.id.clone();
        // a read entry may be confined (a patient's or clinician's app): served within
        // its reach; every other entry needs unconfined access
        let allowed = match e.method {
            Method::Get => app.vault.decide(auth, &e.resource_type, Interaction::Read),
            _ => app
                .vault
                .decide_unconfined(auth, &e.resource_type, interaction_of(&e.method)),
        };
        tasks.spawn(async move {
            let index = e.index;
            let r = match allowed {
                Ok(access) => batch_entry(&app, &mut ectx, e, &access).await,
                Err(err) => Err(err.into()),
            };
            let out = match r {
                Ok(v) => (v, (!ectx.audited).then(|| ectx.event(200))),
                Err(err) => outcome_entry(err, &ectx),
            };
            (index, out)
        });
    }
    let mut out: Vec<Value> = vec![Value::Null; n];
    let mut events = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (index, (entry, ev)) = done.map_err(|_| ApiError::internal())?;
        if let Some(slot) = out.get_mut(index) {
            *slot = entry;
        }
        events.extend(ev);
    }
    events.push(ctx.event(200));
    app.audit(events).await?;
    ctx.audited = true;
    Ok(json!({
        "resourceType": "Bundle",
        "id": phivault_records::engine::new_id(),
        "type": "batch-response",
        "entry": out,
    }))
}

async fn batch_entry(
    app: &Arc<App>,
    ctx: &mut Ctx,
    e: EntryRequest,
    access: &Access,
) -> Result<Value, ApiError> {
    let rtype = e.resource_type.as_str();
    if let Some(r) = &e.resource
        && r.get("resourceType").and_then(Value::as_str) != Some(rtype)
    {
        return Err(ApiError::bad_request(
            "resourceType does not match request.url",
        ));
    }
    match e.method {
        Method::Get => {
            ctx.action = Action::R;
            let (Some(id), None) = (&e.id, &e.query) else {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    IssueCode::NotSupported,
                    "searches are not supported in batches",
                ));
            };
            let vid = match &e.vid {
                Some(v) => Some(
                    v.parse::<u64>()
                        .map_err(|_| ApiError::not_found("version not found"))?,
                ),
                None => None,
            };
            ctx.interaction = if vid.is_some() { "vread" } else { "read" };
            // The entry's own context carries the version and patient read, and the
            // error path (404, 410, ...) is audited with its real status by `batch`.
            let (row, body) = do_read(app, ctx, access, id, vid).await?;
            Ok(read_response_entry(&row, &body))
        }
        Method::Post => {
            ctx.action = Action::C;
            ctx.interaction = "create";
            let resource = e.resource.unwrap_or(Value::Null);
            Ok(
                match do_create(app, ctx, access, resource, e.if_none_exist.as_deref()).await? {
                    Created::New(w) => response_entry("201 Created", Some(&w), &app.vault.base_url),
                    Created::Existing(row) => response_entry(
                        "200 OK",
                        Some(&Written::from_row(&row)),
                        &app.vault.base_url,
                    ),
                },
            )
        }
        Method::Put | Method::Delete => {
            let Some(id) = e.id.clone() else {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    IssueCode::NotSupported,
                    "conditional update/delete is not supported",
                ));
            };
            crate::respond::check_id(&id)?;
            let if_match = match &e.if_match {
                Some(m) => Some(parse_etag(m).ok_or_else(|| {
                    ApiError::bad_request("ifMatch must be an ETag like W/\"3\"")
                })?),
                None => None,
            };
            let deleting = matches!(e.method, Method::Delete);
            ctx.action = if deleting { Action::D } else { Action::U };
            ctx.interaction = if deleting { "delete" } else { "update" };
            if let Some(r) = &e.resource
                && r.get("id").and_then(Value::as_str) != Some(id.as_str())
            {
                return Err(ApiError::bad_request(
                    "resource.id must equal the id in request.url",
                ));
            }
            let w = update_or_delete(app, ctx, access, &id, e.resource, if_match).await?;
            let status = if deleting {
                "204 No Content"
            } else if w.created {
                "201 Created"
            } else {
                "200 OK"
            };
            Ok(response_entry(status, Some(&w), &app.vault.base_url))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retried_attempt_starts_from_the_original_references() {
        let original = json!({
            "resourceType": "Observation",
            "subject": {"reference": "urn:uuid:p"},
            "performer": [{"reference": "Practitioner/kept"}, {"reference": "urn:uuid:q"}],
            "contained": [{"resourceType": "Provenance", "target": [{"reference": "urn:uuid:p"}]}],
            "note": [{"text": "reference"}]
        });
        let mut r = original.clone();
        let mut dangling =
            json!({"resourceType": "Observation", "subject": {"reference": "urn:uuid:zz"}});
        let map: HashMap<String, String> = [
            ("urn:uuid:p", "Patient/1"),
            ("urn:uuid:q", "Practitioner/2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for attempt in 0..3 {
            let mut undo = Vec::new();
            assert!(!rewrite_references(&mut r, &map, &mut undo));
            assert!(rewrite_references(&mut dangling, &map, &mut Vec::new()));
            assert_eq!(undo.len(), 3, "attempt {attempt}");
            assert_eq!(r["subject"]["reference"], "Patient/1");
            assert_eq!(r["performer"][0]["reference"], "Practitioner/kept");
            assert_eq!(r["contained"][0]["target"][0]["reference"], "Patient/1");
            // server fields set in between do not move the references
            r["id"] = json!("x");
            r["meta"] = json!({"versionId": "1"});
            restore_references(&mut r, &mut undo);
            assert!(undo.is_empty());
            r.as_object_mut()
                .map(|o| (o.remove("id"), o.remove("meta")));
            assert_eq!(r, original, "attempt {attempt}");
        }
    }
}
