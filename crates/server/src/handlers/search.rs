//! HTTP routes of search: type search (`GET /fhir/{type}`, `POST /fhir/{type}/_search`),
//! paging (`?_cursor=`), compartment search (`GET /fhir/Patient/{id}/{type}`) and
//! `Patient/{id}/$everything` (streamed).
//!
//! Every search is audited as one event (action E) listing every resource disclosed; the
//! event is durable before the response leaves. Search values never appear in logs, in
//! audit events or in `next` links (a sealed cursor); the Bundle's `self` link hands the
//! client back its own query as the server applied it (see `records::search`).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use phivault_audit::Action;
use phivault_auth::{Authenticated, Interaction};
use phivault_fhir::IssueCode;

use crate::FHIR_JSON;
use crate::error::ApiError;
use crate::state::{App, Ctx, Peer, blocking, finish};
use phivault_records::engine::form_urlencoded_pairs;
use phivault_records::search::{self, Request};

fn lenient(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .any(|p| p.trim().eq_ignore_ascii_case("handling=lenient"))
}

/// `GET /fhir/{type}?…` (and `?_cursor=` for later pages).
pub async fn search_type(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::E, "search-type", &rtype, None);
    let pairs = form_urlencoded_pairs(query.as_deref().unwrap_or(""));
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        run(&app, &mut ctx, &headers, auth, rtype, None, pairs).await
    }
    .await;
    finish(&app, ctx, r).await
}

/// `POST /fhir/{type}/_search` with an `application/x-www-form-urlencoded` body.
pub async fn search_post(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(rtype): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::E, "search-type", &rtype, None);
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        let form = form_body(&headers, body)?;
        let mut pairs = form_urlencoded_pairs(query.as_deref().unwrap_or(""));
        pairs.extend(form_urlencoded_pairs(&form));
        run(&app, &mut ctx, &headers, auth, rtype.clone(), None, pairs).await
    }
    .await;
    finish(&app, ctx, r).await
}

fn form_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<String, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ct.split(';').next().map(str::trim) != Some("application/x-www-form-urlencoded") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IssueCode::NotSupported,
            "_search bodies must be application/x-www-form-urlencoded",
        ));
    }
    let body = body.map_err(|_| ApiError::bad_request("request body could not be read"))?;
    String::from_utf8(body.to_vec()).map_err(|_| ApiError::bad_request("form body is not UTF-8"))
}

/// `GET /fhir/{type}/{id}/{compartment type}` and `GET /fhir/Patient/{id}/$everything`.
pub async fn compartment(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((rtype, id, ctype)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if ctype == "$everything" {
        return everything(app, peer, rtype, id, headers).await;
    }
    let mut ctx = Ctx::on(peer, Action::E, "search-compartment", &ctype, None);
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        if rtype != "Patient" {
            return Err(ApiError::not_found(
                "only the Patient compartment is served",
            ));
        }
        crate::respond::check_id(&id).map_err(|_| ApiError::not_found("resource not found"))?;
        ctx.patient = Some(id.clone());
        let pairs = form_urlencoded_pairs(query.as_deref().unwrap_or(""));
        // the request's credentials were checked once, above (a DPoP proof is single-use)
        run(
            &app,
            &mut ctx,
            &headers,
            auth,
            ctype.clone(),
            Some(id.clone()),
            pairs,
        )
        .await
    }
    .await;
    finish(&app, ctx, r).await
}

/// The names of a search's parameters as its audit event records them (IHE BALP): known
/// parameters only, without modifiers or chains, each once, never a value.
fn param_names(rtype: &str, pairs: &[(String, String)]) -> Vec<String> {
    const CONTROL: [&str; 13] = [
        "_id",
        "_lastUpdated",
        "_count",
        "_sort",
        "_total",
        "_totalMethod",
        "_summary",
        "_elements",
        "_include",
        "_revinclude",
        "_has",
        "_format",
        "_cursor",
    ];
    let mut names: Vec<String> = Vec::new();
    for (k, _) in pairs {
        let base = k.split([':', '.']).next().unwrap_or("");
        let known =
            CONTROL.contains(&base) || phivault_fhir::search::search_param(rtype, base).is_some();
        if known && !names.iter().any(|n| n == base) {
            names.push(base.to_owned());
        }
    }
    names.truncate(phivault_audit::MAX_QUERY_NAMES);
    names
}

/// A search of an authenticated client (its credentials checked once, by the route).
async fn run(
    app: &Arc<App>,
    ctx: &mut Ctx,
    headers: &HeaderMap,
    auth: Authenticated,
    rtype: String,
    compartment: Option<String>,
    pairs: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let req = match pairs.iter().position(|(k, _)| k == "_cursor") {
        Some(i) => {
            let mut others = pairs;
            let (_, c) = others.remove(i);
            let r = Request::from_cursor(&app.vault, &c, auth.client_id())?;
            // a `next` link's cursor alone, or a continued page's `self` link: the cursor
            // beside exactly the parameters it was issued for, on its own route
            let route_differs = compartment.is_some() && compartment != r.compartment;
            if r.rtype != rtype || route_differs {
                return Err(ApiError::bad_request(
                    "the cursor belongs to another search",
                ));
            }
            if !others.is_empty() && !r.applies_exactly(&others)? {
                return Err(ApiError::bad_request(
                    "a paging cursor can be combined only with the parameters of its own search",
                ));
            }
            r
        }
        None => Request::new(&rtype, compartment, pairs, lenient(headers)),
    };
    ctx.rtype = Some(req.rtype.clone());
    let mut req = req;
    let access = app.vault.decide(&auth, &req.rtype, Interaction::Search)?;
    if let Some(r) = access.reach() {
        match &req.compartment {
            // a compartment the access does not reach: refused
            Some(p) if !r.patients.contains(p) => return Err(ApiError::forbidden()),
            // the URL's compartment is within reach and confines the search further
            Some(_) => {}
            // one patient's app: their compartment
            None => req.compartment = r.single().map(str::to_owned),
        }
    }
    if let Some(p) = &req.compartment {
        ctx.patient = Some(p.clone());
        if !access.is_confined() {
            app.vault
                .decide_unconfined(&auth, "Patient", Interaction::Read)
                .or_else(|_| {
                    app.vault
                        .decide_unconfined(&auth, "Patient", Interaction::Search)
                })?;
        }
    }
    // chains, `_has` and includes run under the client's own grant on their types,
    // within its reach (see `search::run`): they match, count and include only records it
    // may see
    let q = search::parse(&req)?;
    ctx.detail.query = param_names(&req.rtype, &req.pairs);
    let a = app.clone();
    let page = blocking(move || {
        let page = search::run(&a.vault, &auth, &access, &req, q)?;
        Ok((page, req))
    })
    .await;
    let (page, req) = page?;
    let entities = search::entities(&page);
    let mut patients: Vec<&str> = entities
        .iter()
        .filter_map(|e| e.patient.as_deref())
        .collect();
    patients.sort_unstable();
    patients.dedup();
    if ctx.patient.is_none() && patients.len() == 1 {
        ctx.patient = patients.first().map(|p| (*p).to_owned());
    }
    ctx.entities = entities;
    // where the search was answered: its `self` link adds the query as applied
    let path = match &req.compartment {
        Some(p) => format!("{}/Patient/{p}/{}", app.vault.base_url, req.rtype),
        None => format!("{}/{}", app.vault.base_url, req.rtype),
    };
    let body = search::bundle(&app.vault, page, &path)?;
    let mut resp = (StatusCode::OK, Bytes::from(body)).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    Ok(resp)
}

/// `Patient/{id}/$everything`: the patient and every resource of their compartment,
/// streamed as a searchset Bundle. The audit event (the patient's whole compartment
/// disclosed) is durable before the first byte is sent.
async fn everything(
    app: Arc<App>,
    peer: Peer,
    rtype: String,
    id: String,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::E, "everything", &rtype, Some(&id));
    let prepared = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        if rtype != "Patient" {
            return Err(ApiError::not_found("$everything is served on Patient only"));
        }
        crate::respond::check_id(&id).map_err(|_| ApiError::not_found("resource not found"))?;
        // a confined access (a patient's own app, a clinician's patients) gets the
        // patients it reaches only, checked before anything is read
        let patient = app.vault.decide(&auth, "Patient", Interaction::Read)?;
        if !patient.admits(Some(&id)) {
            return Err(ApiError::forbidden());
        }
        let (a, i) = (app.clone(), id.clone());
        let exists = blocking(move || Ok(search::load(&a.vault, &patient, &i)?)).await?;
        if exists.is_none() {
            return Err(ApiError::not_found("resource not found"));
        }
        ctx.patient = Some(id.clone());
        // only the compartment types this client may read, each under its grant
        let types: Vec<phivault_records::Access> = phivault_fhir::patient_compartment_types()
            .into_iter()
            .filter_map(|t| {
                app.vault
                    .decide(&auth, t, Interaction::Read)
                    .or_else(|_| app.vault.decide(&auth, t, Interaction::Search))
                    .ok()
            })
            .collect();
        Ok(types)
    }
    .await;
    let types = match prepared {
        Ok(t) => t,
        Err(e) => return finish(&app, ctx, Err(e)).await,
    };
    // Audit first (fail closed), then stream.
    let ok = finish(&app, ctx, Ok(StatusCode::OK.into_response())).await;
    if ok.status() != StatusCode::OK {
        return ok;
    }
    let request_id = ok.headers().get("x-request-id").cloned();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let a = app.clone();
    tokio::task::spawn_blocking(move || {
        let send = |b: Vec<u8>| tx.blocking_send(Ok(Bytes::from(b))).is_ok();
        let mut head = Vec::with_capacity(256);
        if search::write_head(&mut head).is_err() {
            return;
        }
        head.extend_from_slice(b",\"entry\":[");
        if !send(head) {
            return;
        }
        let mut first = true;
        let mut failed = false;
        for t in types {
            let r = search::stream_compartment(&a.vault, &t, &id, &mut |item| {
                let mut b = Vec::with_capacity(512);
                if !first {
                    b.push(b',');
                }
                first = false;
                match item {
                    search::Streamed::Record(l) => {
                        if search::write_entry(&mut b, &a.vault.base_url, l, "match", None).is_err()
                        {
                            return false;
                        }
                    }
                    search::Streamed::Damaged { rtype, id } => {
                        // in the record's place: an outcome naming it (ids only)
                        let entry = serde_json::json!({
                            "resource": {"resourceType": "OperationOutcome", "issue": [{
                                "severity": "error", "code": "exception",
                                "diagnostics": format!("{rtype}/{id} failed its integrity check; it was not returned and the incident was recorded"),
                            }]},
                            "search": {"mode": "outcome"},
                        });
                        if serde_json::to_writer(&mut b, &entry).is_err() {
                            return false;
                        }
                    }
                }
                send(b)
            });
            if !matches!(r, Ok(true)) {
                failed = true;
                break;
            }
        }
        if failed {
            // abort the body: the client sees a truncated response, never a false "complete"
            let _ = tx.blocking_send(Err(std::io::Error::other("search failed")));
            return;
        }
        let _ = send(b"]}".to_vec());
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    if let Some(r) = request_id {
        resp.headers_mut().insert("x-request-id", r);
    }
    resp
}
