//! The audit log for auditors: `GET /fhir/AuditEvent` (search) and
//! `GET /fhir/AuditEvent/{seq}` (read), each event shown as a FHIR R4 AuditEvent.
//!
//! A person with the auditor role is granted this through `user/AuditEvent` scopes, and a
//! patient, through `patient/AuditEvent` scopes, the events about their own record (who
//! accessed it, when, how; without the staff's network addresses) — see
//! `phivault_auth::policy`. Proofs are for auditors. Nobody writes AuditEvents through the
//! API (the routes answer 405 to anything but GET). Events are served oldest first; `patient`, `user`,
//! `client` and `action` filter, `_count` (≤ [`MAX_COUNT`]) sizes a page and the `next`
//! link continues after the last sequence number examined (a position in the log, not a
//! secret). A page examines at most [`MAX_EXAMINE`] events. Reading the log is audited too.
//!
//! Proofs over the log's RFC 9162 Merkle tree: `GET /fhir/AuditEvent/{seq}/$proof?size=N`
//! (that event is leaf `seq - 1` of the tree of the first N events; N defaults to the
//! newest signed checkpoint) and `GET /fhir/AuditEvent/$consistency?first=M&second=N`
//! (the tree of M events is a prefix of the tree of N), each a Parameters resource with the
//! hashes and, when N is a checkpoint's size, that checkpoint's signature — an auditor checks
//! them with `phivault_audit::merkle::verify_inclusion` / `verify_consistency` against the
//! roots a witness holds. Proofs are computed from the events (no interior nodes are
//! stored), so trees are bounded to [`MAX_PROOF_TREE`] events.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use phivault_audit::{Action, AuditEvent, merkle};
use phivault_auth::Interaction;
use phivault_auth::policy::AUDIT_EVENT;
use serde_json::{Value, json};

use crate::FHIR_JSON;
use crate::error::ApiError;
use crate::state::{App, Ctx, Peer, blocking, finish};
use phivault_records::engine::form_urlencoded_pairs;
use phivault_records::report::{CSV_HEADER, Filter, MAX_EXAMINE, MAX_PROOF_TREE, csv_line, shown};

fn fhir_json(body: Vec<u8>) -> Response {
    crate::respond::json_response(StatusCode::OK, Bytes::from(body), FHIR_JSON)
}

/// Events with their positions, and where to go on from.
type Page = (Vec<(u64, AuditEvent)>, Option<u64>);

/// One page of the events `f` passes, from `f.after` on: at most `f.count` of them, after
/// examining at most `examine`; and the position to go on from when there may be more.
fn page(app: &App, f: &Filter, examine: usize) -> Result<Page, ApiError> {
    let mut out = Vec::new();
    let mut after = f.after;
    let mut examined = 0;
    loop {
        let batch = app
            .vault
            .engine
            .audit_log()
            .after(after, 1000)
            .map_err(|_| ApiError::unavailable())?;
        if batch.is_empty() {
            return Ok((out, None));
        }
        for s in batch {
            if out.len() == f.count || examined == examine {
                return Ok((out, Some(after)));
            }
            examined += 1;
            after = s.seq;
            let e = AuditEvent::decode(&s.event).map_err(|_| ApiError::integrity())?;
            if f.matches(&e) {
                out.push((s.seq, e));
            }
        }
    }
}

/// Most rows of one CSV report response (`_count`); `Link: <…>; rel="next"` goes on.
const MAX_REPORT_ROWS: usize = 10_000;

/// `GET /audit/report?…` — the audit report (AU4) as CSV for auditors: the filters of
/// `GET /fhir/AuditEvent` (`patient` for an accounting of disclosures, `user`, `client`,
/// `action`, `outcome`, `date`), `_count` rows (≤ 10,000, default 10,000) from `_after`.
pub async fn report(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::R, "audit-report");
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        auditor(&app, &auth)?;
        // `_count` is the report's own (larger) page size; the rest are the log's filters
        let mut count = MAX_REPORT_ROWS;
        let mut rest = Vec::new();
        for (k, v) in form_urlencoded_pairs(query.as_deref().unwrap_or("")) {
            if k == "_count" {
                count = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request("_count must be a number"))?
                    .clamp(1, MAX_REPORT_ROWS);
            } else {
                rest.push(format!("{k}={}", phivault_auth::percent_encode(&v)));
            }
        }
        let mut f = Filter::parse(Some(&rest.join("&")))?;
        f.count = count;
        let a = app.clone();
        let (rows, next) = blocking(move || {
            let (found, next) = page(&a, &f, MAX_EXAMINE * 20)?;
            let mut body = String::with_capacity(64 + found.len() * 160);
            body.push_str(CSV_HEADER);
            body.push_str("\r\n");
            for (seq, e) in &found {
                body.push_str(&csv_line(*seq, e));
                body.push_str("\r\n");
            }
            Ok((
                body,
                next.map(|after| format!("{}&_after={after}", f.query())),
            ))
        })
        .await?;
        let mut resp = crate::respond::json_response(
            StatusCode::OK,
            Bytes::from(rows),
            "text/csv; charset=utf-8",
        );
        if let Some(q) = next
            && let Ok(v) = axum::http::HeaderValue::from_str(&format!(
                "<{}/audit/report?{q}>; rel=\"next\"",
                app.origin()
            ))
        {
            resp.headers_mut().insert(axum::http::header::LINK, v);
        }
        Ok(resp)
    }
    .await;
    finish(&app, ctx, r).await
}

/// `GET /fhir/AuditEvent?…`
pub async fn search(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::E, "search-type", AUDIT_EVENT, None);
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        let own = own_record(&app, &auth)?;
        let mut f = Filter::parse(query.as_deref())?;
        if let Some(p) = &own {
            // a patient's own accounting of access: their record only, nothing else
            if f.patient.as_ref().is_some_and(|x| x != p) {
                return Err(ApiError::forbidden());
            }
            f.patient = Some(p.clone());
            ctx.patient = Some(p.clone());
        }
        let a = app.clone();
        let (events, last) = blocking(move || {
            let (found, next) = page(&a, &f, MAX_EXAMINE)?;
            let out: Vec<Value> = found
                .iter()
                .map(|(seq, e)| {
                    let note = phivault_records::report::note_of(&a.vault, e);
                    shown(*seq, e, own.is_some(), note.as_deref())
                })
                .collect();
            Ok((out, next.map(|after| (after, f))))
        })
        .await?;
        let mut links = vec![json!({"relation": "self", "url": format!("{}/AuditEvent", app.vault.base_url)})];
        if let Some((after, f)) = last {
            links.push(json!({"relation": "next",
                "url": format!("{}/AuditEvent?{}&_after={after}", app.vault.base_url, f.query())}));
        }
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": events.into_iter().map(|r| json!({
                "fullUrl": format!("{}/AuditEvent/{}", app.vault.base_url, r["id"].as_str().unwrap_or("")),
                "resource": r,
                "search": {"mode": "match"},
            })).collect::<Vec<_>>(),
        });
        Ok(fhir_json(
            serde_json::to_vec(&bundle).map_err(|_| ApiError::internal())?,
        ))
    }
    .await;
    finish(&app, ctx, r).await
}

/// The leaf hashes of the first `size` events (bounded by [`MAX_PROOF_TREE`]).
fn leaves(app: &App, size: u64) -> Result<Vec<merkle::Hash>, ApiError> {
    let head = app
        .vault
        .engine
        .audit_log()
        .head()
        .map_err(|_| ApiError::unavailable())?
        .map_or(0, |h| h.size);
    if size == 0 || size > head {
        return Err(ApiError::bad_request(
            "the tree size must be between 1 and the log's size",
        ));
    }
    if size > MAX_PROOF_TREE {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            phivault_fhir::IssueCode::TooCostly,
            "proofs are computed over at most 2,000,000 events",
        ));
    }
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    while (out.len() as u64) < size {
        let want = usize::try_from(size - out.len() as u64)
            .unwrap_or(usize::MAX)
            .min(10_000);
        let batch = app
            .vault
            .engine
            .audit_log()
            .after(out.len() as u64, want)
            .map_err(|_| ApiError::unavailable())?;
        if batch.is_empty() {
            return Err(ApiError::integrity());
        }
        for s in batch {
            if s.seq != out.len() as u64 + 1 {
                return Err(ApiError::integrity());
            }
            out.push(merkle::leaf_hash(&s.event));
        }
    }
    Ok(out)
}

fn b64(h: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(h)
}

/// The checkpoint of exactly `size` events, if one was signed.
fn checkpoint_of(app: &App, size: u64) -> Result<Option<merkle::Checkpoint>, ApiError> {
    Ok(app
        .vault
        .engine
        .audit_log()
        .checkpoints(size.saturating_sub(1), 1)
        .map_err(|_| ApiError::unavailable())?
        .into_iter()
        .find(|c| c.size == size))
}

fn proof_parameters(
    mut params: Vec<Value>,
    size: u64,
    root: &merkle::Hash,
    path: &[merkle::Hash],
    checkpoint: Option<merkle::Checkpoint>,
) -> Value {
    params.push(json!({"name": "treeSize", "valueInteger": size}));
    params.push(json!({"name": "rootHash", "valueBase64Binary": b64(root)}));
    for h in path {
        params.push(json!({"name": "path", "valueBase64Binary": b64(h)}));
    }
    if let Some(c) = checkpoint {
        params.push(json!({"name": "checkpointTime", "valueInteger": c.time_ms / 1000}));
        params.push(json!({"name": "checkpointSignature", "valueBase64Binary": b64(&c.signature)}));
    }
    json!({"resourceType": "Parameters", "parameter": params})
}

fn query_u64(query: Option<&str>, name: &str) -> Result<Option<u64>, ApiError> {
    let mut v = None;
    for (k, val) in form_urlencoded_pairs(query.unwrap_or("")) {
        if k != name {
            return Err(ApiError::bad_request("unknown parameter"));
        }
        v = Some(
            val.parse()
                .map_err(|_| ApiError::bad_request("sizes are whole numbers"))?,
        );
    }
    Ok(v)
}

/// Alerts and reports are for whoever reads the whole audit log: an auditor.
pub(crate) fn auditor(app: &App, auth: &phivault_auth::Authenticated) -> Result<(), ApiError> {
    let whole_log = app
        .vault
        .decide(auth, AUDIT_EVENT, Interaction::Search)?
        .reach()
        .is_none();
    match auth.person() {
        Some(p) if whole_log && p.role == phivault_auth::Role::Auditor => Ok(()),
        _ => Err(ApiError::forbidden()),
    }
}

/// Who may search the log: an auditor (None) or a patient, for their own record
/// (`Some(patient id)`).
fn own_record(app: &App, auth: &phivault_auth::Authenticated) -> Result<Option<String>, ApiError> {
    match app
        .vault
        .decide(auth, AUDIT_EVENT, Interaction::Search)?
        .reach()
    {
        None => Ok(None),
        Some(r) => r
            .single()
            .map(|p| Some(p.to_owned()))
            .ok_or_else(ApiError::forbidden),
    }
}

/// `GET /fhir/AuditEvent/{seq}/$proof?size=N`
pub async fn proof(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((id, op)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(
        peer,
        Action::E,
        "audit-inclusion-proof",
        AUDIT_EVENT,
        Some(&id),
    );
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        app.vault
            .decide_unconfined(&auth, AUDIT_EVENT, Interaction::Read)?;
        if op != "$proof" {
            return Err(ApiError::not_found("unknown operation"));
        }
        let seq: u64 = id
            .parse()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| ApiError::not_found("resource not found"))?;
        let size = query_u64(query.as_deref(), "size")?;
        let a = app.clone();
        let body = blocking(move || {
            let size = match size {
                Some(n) => n,
                None => a
                    .vault
                    .engine
                    .audit_log()
                    .checkpoints(seq - 1, usize::MAX)
                    .map_err(|_| ApiError::unavailable())?
                    .last()
                    .map(|c| c.size)
                    .ok_or_else(|| {
                        ApiError::bad_request("no checkpoint covers this event yet; name a size")
                    })?,
            };
            if seq > size {
                return Err(ApiError::bad_request(
                    "the event is not in a tree of that size",
                ));
            }
            let l = leaves(&a, size)?;
            let index = usize::try_from(seq - 1).map_err(|_| ApiError::internal())?;
            let path = merkle::inclusion_proof(index, &l).ok_or_else(ApiError::internal)?;
            let root = merkle::root(&l);
            let params = vec![
                json!({"name": "leafIndex", "valueInteger": seq - 1}),
                json!({"name": "leafHash", "valueBase64Binary": b64(&l[index])}),
            ];
            let body = proof_parameters(params, size, &root, &path, checkpoint_of(&a, size)?);
            serde_json::to_vec(&body).map_err(|_| ApiError::internal())
        })
        .await?;
        Ok(fhir_json(body))
    }
    .await;
    finish(&app, ctx, r).await
}

/// `GET /fhir/AuditEvent/$consistency?first=M&second=N`
async fn consistency(
    app: Arc<App>,
    mut ctx: Ctx,
    query: Option<String>,
    headers: HeaderMap,
) -> Response {
    ctx.interaction = "audit-consistency-proof";
    ctx.action = Action::E;
    ctx.id = None;
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        app.vault.decide_unconfined(&auth, AUDIT_EVENT, Interaction::Read)?;
        let mut first = None;
        let mut second = None;
        for (k, v) in form_urlencoded_pairs(query.as_deref().unwrap_or("")) {
            let n: u64 = v
                .parse()
                .map_err(|_| ApiError::bad_request("sizes are whole numbers"))?;
            match k.as_str() {
                "first" => first = Some(n),
                "second" => second = Some(n),
                _ => return Err(ApiError::bad_request("supported: first, second")),
            }
        }
        let (Some(m), Some(n)) = (first, second) else {
            return Err(ApiError::bad_request("first and second are required"));
        };
        if m == 0 || m > n {
            return Err(ApiError::bad_request("0 < first ≤ second"));
        }
        let a = app.clone();
        let body = blocking(move || {
            let l = leaves(&a, n)?;
            let m_us = usize::try_from(m).map_err(|_| ApiError::internal())?;
            let path = merkle::consistency_proof(m_us, &l).ok_or_else(ApiError::internal)?;
            let params = vec![
                json!({"name": "firstSize", "valueInteger": m}),
                json!({"name": "firstRootHash", "valueBase64Binary": b64(&merkle::root(&l[..m_us]))}),
            ];
            let body = proof_parameters(params, n, &merkle::root(&l), &path, checkpoint_of(&a, n)?);
            serde_json::to_vec(&body).map_err(|_| ApiError::internal())
        })
        .await?;
        Ok(fhir_json(body))
    }
    .await;
    finish(&app, ctx, r).await
}

/// `GET /fhir/AuditEvent/{seq}` (and `$consistency`)
pub async fn read(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::R, "read", AUDIT_EVENT, Some(&id));
    if id == "$consistency" {
        return consistency(app, ctx, query, headers).await;
    }
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        let own = own_record(&app, &auth)?;
        let seq: u64 = id
            .parse()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| ApiError::not_found("resource not found"))?;
        let a = app.clone();
        let found = blocking(move || {
            a.vault
                .engine
                .audit_log()
                .after(seq - 1, 1)
                .map_err(|_| ApiError::unavailable())
        })
        .await?;
        let s = found
            .into_iter()
            .find(|s| s.seq == seq)
            .ok_or_else(|| ApiError::not_found("resource not found"))?;
        let e = AuditEvent::decode(&s.event).map_err(|_| ApiError::integrity())?;
        if let Some(p) = &own {
            // a patient reads only the events about their record
            let about = Filter::about(p);
            if !about.matches(&e) {
                return Err(ApiError::not_found("resource not found"));
            }
        }
        Ok(fhir_json(
            serde_json::to_vec(&shown(
                seq,
                &e,
                own.is_some(),
                phivault_records::report::note_of(&app.vault, &e).as_deref(),
            ))
            .map_err(|_| ApiError::internal())?,
        ))
    }
    .await;
    finish(&app, ctx, r).await
}
