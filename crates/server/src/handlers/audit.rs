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
use crate::engine::{form_urlencoded_pairs, instant};
use crate::error::ApiError;
use crate::state::{App, Ctx, Peer, blocking, finish};

/// Largest page.
pub const MAX_COUNT: usize = 200;
/// Most events one page examines.
pub const MAX_EXAMINE: usize = 50_000;
/// The largest tree a proof is computed over.
pub const MAX_PROOF_TREE: u64 = 2_000_000;

fn action_code(a: Action) -> &'static str {
    match a {
        Action::C => "C",
        Action::R => "R",
        Action::U => "U",
        Action::D => "D",
        Action::E => "E",
    }
}

/// One event as a FHIR AuditEvent (identifiers only, as stored).
pub fn to_fhir(seq: u64, e: &AuditEvent) -> Value {
    let mut agents = vec![json!({
        "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110150", "display": "Application"}]},
        "who": {"identifier": {"system": "urn:phivault:client",
            "value": e.client_id.as_deref().unwrap_or("unauthenticated")}},
        "requestor": e.user.is_none(),
        "network": {"address": e.source, "type": "2"},
    })];
    if let Some(ua) = &e.detail.user_agent {
        agents[0]["name"] = json!(ua);
    }
    if let Some(u) = &e.user {
        agents.push(json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                "code": "PROV"}]},
            "who": {"identifier": {"system": "urn:phivault:user", "value": u}},
            "requestor": true,
        }));
    }
    let mut entities = vec![json!({
        "what": {"identifier": {"system": "urn:phivault:request-id", "value": e.request_id}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "4"},
    })];
    if let (Some(t), Some(id)) = (&e.resource_type, &e.resource_id) {
        let reference = match e.version {
            Some(v) => format!("{t}/{id}/_history/{v}"),
            None => format!("{t}/{id}"),
        };
        entities.push(json!({"what": {"reference": reference},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"}}));
    }
    if let Some(p) = &e.patient {
        entities.push(json!({"what": {"reference": format!("Patient/{p}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}}));
    }
    for x in &e.entities {
        entities.push(json!({"what": {"reference": format!("{}/{}", x.resource_type, x.resource_id)},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"}}));
    }
    if !e.detail.query.is_empty() {
        // the names of the search parameters only: their values are never recorded
        entities.push(json!({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24"},
            "detail": [{"type": "parameters", "valueString": e.detail.query.join(",")}]}));
    }
    let purpose: Vec<Value> = e
        .detail
        .purpose
        .iter()
        .map(|p| {
            json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}]})
        })
        .collect();
    if let (Some(p), Some(person)) = (purpose.first(), agents.get_mut(1)) {
        person["purposeOfUse"] = json!([p]);
    }
    let mut out = json!({
        "resourceType": "AuditEvent",
        "id": seq.to_string(),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "urn:phivault:interaction", "code": e.interaction}],
        "action": action_code(e.action),
        "recorded": instant(i64::try_from(e.time_ms).unwrap_or(i64::MAX)),
        "outcome": e.outcome.code.to_string(),
        "outcomeDesc": format!("HTTP {}", e.outcome.http_status),
        "agent": agents,
        "source": {"observer": {"display": "phivault"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "4"}]},
        "entity": entities,
    });
    if !purpose.is_empty() {
        out["purposeOfEvent"] = json!(purpose);
    }
    out
}

/// The filters of one search (or report): `patient`, `user`, `client`, `action`, `date`
/// (repeatable, with the FHIR prefixes `ge gt le lt` or none for the whole date or
/// instant given), `_count`, `_after`.
#[derive(Default)]
pub struct Filter {
    patient: Option<String>,
    user: Option<String>,
    client: Option<String>,
    action: Option<Action>,
    /// AuditEvent outcome code: 0, 4, 8 or 12.
    outcome: Option<u8>,
    /// Inclusive lower bound of the event time (ms).
    from_ms: Option<i64>,
    /// Exclusive upper bound of the event time (ms).
    to_ms: Option<i64>,
    count: usize,
    after: u64,
}

impl Filter {
    /// Parse a query string (400 on anything unknown or malformed).
    pub fn parse(query: Option<&str>) -> Result<Filter, ApiError> {
        let mut f = Filter {
            count: 50,
            ..Default::default()
        };
        for (k, v) in form_urlencoded_pairs(query.unwrap_or("")) {
            let dup = |slot: &Option<String>| {
                if slot.is_some() {
                    Err(ApiError::bad_request("a parameter is repeated"))
                } else {
                    Ok(Some(v.clone()))
                }
            };
            match k.as_str() {
                "patient" => f.patient = dup(&f.patient)?,
                "user" => f.user = dup(&f.user)?,
                "client" => f.client = dup(&f.client)?,
                "action" => {
                    f.action = Some(match v.as_str() {
                        "C" => Action::C,
                        "R" => Action::R,
                        "U" => Action::U,
                        "D" => Action::D,
                        "E" => Action::E,
                        _ => return Err(ApiError::bad_request("action is one of C R U D E")),
                    })
                }
                "outcome" => {
                    f.outcome = Some(match v.as_str() {
                        "0" => 0,
                        "4" => 4,
                        "8" => 8,
                        "12" => 12,
                        _ => return Err(ApiError::bad_request("outcome is one of 0 4 8 12")),
                    })
                }
                "date" => {
                    let (prefix, value) = match v.get(..2) {
                        Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &v[2..]),
                        _ => ("eq", v.as_str()),
                    };
                    let r = phivault_fhir::search::parse_date(value)
                        .ok_or_else(|| ApiError::bad_request("date is a FHIR date or instant"))?;
                    let (lo, hi) = match prefix {
                        "ge" => (Some(r.lo), None),
                        "gt" => (Some(r.hi), None),
                        "lt" => (None, Some(r.lo)),
                        "le" => (None, Some(r.hi)),
                        _ => (Some(r.lo), Some(r.hi)),
                    };
                    if let Some(lo) = lo {
                        f.from_ms = Some(f.from_ms.map_or(lo, |x| x.max(lo)));
                    }
                    if let Some(hi) = hi {
                        f.to_ms = Some(f.to_ms.map_or(hi, |x| x.min(hi)));
                    }
                }
                "_count" => {
                    f.count = v
                        .parse::<usize>()
                        .map_err(|_| ApiError::bad_request("_count must be a number"))?
                        .min(MAX_COUNT)
                }
                "_after" => {
                    f.after = v
                        .parse()
                        .map_err(|_| ApiError::bad_request("_after must be a number"))?
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "supported: patient, user, client, action, outcome, date, _count, _after",
                    ));
                }
            }
        }
        if let Some(p) = f
            .patient
            .as_deref()
            .map(|p| p.strip_prefix("Patient/").unwrap_or(p))
        {
            f.patient = Some(p.to_owned());
        }
        Ok(f)
    }

    /// Whether event `e` passes.
    pub fn matches(&self, e: &AuditEvent) -> bool {
        let t = i64::try_from(e.time_ms).unwrap_or(i64::MAX);
        if self.from_ms.is_some_and(|f| t < f) || self.to_ms.is_some_and(|x| t >= x) {
            return false;
        }
        let patient_ok = self.patient.as_deref().is_none_or(|p| {
            e.patient.as_deref() == Some(p)
                || e.entities.iter().any(|x| x.patient.as_deref() == Some(p))
        });
        patient_ok
            && self
                .user
                .as_deref()
                .is_none_or(|u| e.user.as_deref() == Some(u))
            && self
                .client
                .as_deref()
                .is_none_or(|c| e.client_id.as_deref() == Some(c))
            && self.action.is_none_or(|a| e.action == a)
            && self.outcome.is_none_or(|o| e.outcome.code == o)
    }

    fn query(&self) -> String {
        let mut q = Vec::new();
        for (k, v) in [
            ("patient", &self.patient),
            ("user", &self.user),
            ("client", &self.client),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", phivault_auth::percent_encode(v)));
            }
        }
        if let Some(a) = self.action {
            q.push(format!("action={}", action_code(a)));
        }
        if let Some(o) = self.outcome {
            q.push(format!("outcome={o}"));
        }
        if let Some(f) = self.from_ms {
            q.push(format!("date=ge{}", instant(f)));
        }
        if let Some(t) = self.to_ms {
            q.push(format!("date=lt{}", instant(t)));
        }
        q.push(format!("_count={}", self.count));
        q.join("&")
    }
}

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
            .engine
            .store()
            .audit_after(after, 1000)
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

/// The header of the CSV report (`phivault audit report`, `GET /audit/report`).
pub const CSV_HEADER: &str = "seq,recorded,action,interaction,resource,patient,client,user,http_status,source,request_id,purpose_of_use,user_agent,search_parameters";

/// Event `e` at position `seq` as a line of the CSV report.
pub fn csv_line(seq: u64, e: &AuditEvent) -> String {
    let resource = match (&e.resource_type, &e.resource_id) {
        (Some(t), Some(i)) => format!("{t}/{i}"),
        (Some(t), None) => t.clone(),
        _ => String::new(),
    };
    [
        seq.to_string(),
        instant(i64::try_from(e.time_ms).unwrap_or(i64::MAX)),
        action_code(e.action).to_owned(),
        e.interaction.clone(),
        resource,
        e.patient.clone().unwrap_or_default(),
        e.client_id.clone().unwrap_or_default(),
        e.user.clone().unwrap_or_default(),
        e.outcome.http_status.to_string(),
        e.source.clone(),
        e.request_id.clone(),
        e.detail.purpose.clone().unwrap_or_default(),
        e.detail.user_agent.clone().unwrap_or_default(),
        e.detail.query.join(" "),
    ]
    .iter()
    .map(|f| csv_field(f))
    .collect::<Vec<_>>()
    .join(",")
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break; a
/// leading `=`, `+`, `-` or `@` is prefixed with `'` so spreadsheets do not run it.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
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
                app.base_url.trim_end_matches("/fhir")
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
                .map(|(seq, e)| shown(*seq, e, own.is_some()))
                .collect();
            Ok((out, next.map(|after| (after, f))))
        })
        .await?;
        let mut links = vec![json!({"relation": "self", "url": format!("{}/AuditEvent", app.base_url)})];
        if let Some((after, f)) = last {
            links.push(json!({"relation": "next",
                "url": format!("{}/AuditEvent?{}&_after={after}", app.base_url, f.query())}));
        }
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": events.into_iter().map(|r| json!({
                "fullUrl": format!("{}/AuditEvent/{}", app.base_url, r["id"].as_str().unwrap_or("")),
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
        .engine
        .store()
        .audit_head()
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
            .engine
            .store()
            .audit_after(out.len() as u64, want)
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
        .engine
        .store()
        .audit_checkpoints(size.saturating_sub(1), 1)
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
    match app.decide(auth, AUDIT_EVENT, Interaction::Search)?.reach() {
        None => Ok(None),
        Some(r) => r
            .single()
            .map(|p| Some(p.to_owned()))
            .ok_or_else(ApiError::forbidden),
    }
}

/// An event as shown: whole to auditors; to the patient it concerns without the network
/// address and the software the access came from (staff's workstations are not the
/// patient's business).
fn shown(seq: u64, e: &AuditEvent, to_patient: bool) -> Value {
    let mut v = to_fhir(seq, e);
    if to_patient && let Some(agents) = v["agent"].as_array_mut() {
        for a in agents {
            if let Some(o) = a.as_object_mut() {
                o.remove("network");
                o.remove("name");
            }
        }
    }
    v
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
        app.decide_unconfined(&auth, AUDIT_EVENT, Interaction::Read)?;
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
                    .engine
                    .store()
                    .audit_checkpoints(seq - 1, usize::MAX)
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
        app.decide_unconfined(&auth, AUDIT_EVENT, Interaction::Read)?;
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
            a.engine
                .store()
                .audit_after(seq - 1, 1)
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
            let about = Filter {
                patient: Some(p.clone()),
                ..Default::default()
            };
            if !about.matches(&e) {
                return Err(ApiError::not_found("resource not found"));
            }
        }
        Ok(fhir_json(
            serde_json::to_vec(&shown(seq, &e, own.is_some())).map_err(|_| ApiError::internal())?,
        ))
    }
    .await;
    finish(&app, ctx, r).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use phivault_audit::{Entity, Outcome};

    fn event() -> AuditEvent {
        AuditEvent {
            time_ms: 1_750_000_000_000,
            request_id: "r-1".into(),
            client_id: Some("app".into()),
            user: Some("u-1".into()),
            action: Action::R,
            interaction: "read".into(),
            resource_type: Some("Observation".into()),
            resource_id: Some("o1".into()),
            version: Some(2),
            patient: Some("p1".into()),
            outcome: Outcome::from_http(200),
            source: "127.0.0.1".into(),
            entities: vec![Entity {
                action: Action::R,
                resource_type: "Condition".into(),
                resource_id: "c1".into(),
                version: None,
                patient: Some("p2".into()),
            }],
            detail: phivault_audit::Detail {
                purpose: Some("TREAT".into()),
                user_agent: Some("fhirclient/4.2".into()),
                query: vec!["family".into(), "birthdate".into()],
            },
        }
    }

    #[test]
    fn events_read_as_fhir_audit_events() {
        let v = to_fhir(7, &event());
        assert_eq!(v["id"], "7");
        assert_eq!(v["action"], "R");
        assert_eq!(v["outcome"], "0");
        assert_eq!(v["recorded"], "2025-06-15T15:06:40.000Z");
        assert_eq!(
            v["entity"][1]["what"]["reference"],
            "Observation/o1/_history/2"
        );
        assert_eq!(v["entity"][2]["what"]["reference"], "Patient/p1");
        assert_eq!(v["agent"][1]["who"]["identifier"]["value"], "u-1");
        // IHE BALP context: purpose of use, the client software, the parameter names
        assert_eq!(v["purposeOfEvent"][0]["coding"][0]["code"], "TREAT");
        assert_eq!(
            v["agent"][1]["purposeOfUse"][0]["coding"][0]["code"],
            "TREAT"
        );
        assert_eq!(v["agent"][0]["name"], "fhirclient/4.2");
        assert_eq!(
            v["entity"][4]["detail"][0]["valueString"],
            "family,birthdate"
        );
        assert_eq!(v["entity"][4]["role"]["code"], "24");
        let mine = shown(7, &event(), true);
        assert!(mine["agent"][0].get("name").is_none());
        assert!(mine["agent"][0].get("network").is_none());
        let errors = phivault_fhir::validate(&v);
        assert!(errors.is_ok(), "{errors:?}");
    }

    #[test]
    fn filters_parse_strictly_and_match() {
        let f = Filter::parse(Some("patient=Patient/p2&action=R&_count=500")).unwrap();
        assert_eq!(f.count, MAX_COUNT);
        assert!(f.matches(&event()), "an entity's patient counts");
        assert!(!Filter::parse(Some("patient=p3")).unwrap().matches(&event()));
        assert!(!Filter::parse(Some("user=u-2")).unwrap().matches(&event()));
        assert!(Filter::parse(Some("client=app")).unwrap().matches(&event()));
        assert!(Filter::parse(Some("outcome=0")).unwrap().matches(&event()));
        assert!(!Filter::parse(Some("outcome=4")).unwrap().matches(&event()));
        // periods (the event is at 2025-06-15T15:06:40Z)
        for (q, hit) in [
            ("date=ge2025-06-15", true),
            ("date=lt2025-06-15", false),
            ("date=2025-06-15", true),
            ("date=2025-06", true),
            ("date=2025-06-16", false),
            ("date=ge2025-06-01&date=lt2025-07-01", true),
            ("date=ge2025-06-16&date=lt2025-07-01", false),
            ("date=le2025-06-15T15:06:40.000Z", true),
            ("date=gt2025-06-15T15:06:40.000Z", false),
        ] {
            assert_eq!(
                Filter::parse(Some(q)).unwrap().matches(&event()),
                hit,
                "{q}"
            );
        }
        for bad in [
            "date=yesterday",
            "date=ge2025-13-01",
            "name=x",
            "_count=x",
            "action=Q",
            "outcome=3",
            "patient=a&patient=b",
            "_after=-1",
        ] {
            assert!(Filter::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
