//! Application state, the router and the single-resource handlers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use phivault_audit::{Action, AuditEvent, Outcome};
use phivault_auth::{
    AccessTokenIssuer, AccessTokenVerifier, Authenticated, ClientRecord, Interaction, ReplayCache,
    TokenError,
};
use phivault_fhir::IssueCode;
use phivault_store::{CommitError, Expect, WriteBatch};
use serde_json::{Value, json};

use crate::access::Access;
use crate::engine::{Engine, Written, instant, key_patient, now_ms};
use crate::error::ApiError;
use crate::{FHIR_JSON, bundle};

/// Remote address of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Limits on what one request may ask for (API4).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Most entries in a batch or transaction Bundle.
    pub max_bundle_entries: usize,
    /// Largest `_count` of a history page.
    pub max_count: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 16 * 1024 * 1024,
            max_bundle_entries: 10_000,
            max_count: 1000,
        }
    }
}

/// Everything the routes share.
pub struct App {
    /// Resource operations.
    pub engine: Engine,
    /// FHIR base URL (`https://host:port/fhir`), the audience of access tokens.
    pub base_url: String,
    /// Token endpoint URL, the audience of client assertions.
    pub token_url: String,
    /// Issues access tokens.
    pub issuer: AccessTokenIssuer,
    /// Verifies access tokens.
    pub verifier: AccessTokenVerifier,
    /// Client-assertion `jti` replay cache.
    pub replay: ReplayCache,
    /// DPoP proof (`jkt`, `jti`) replay cache.
    pub dpop_replay: phivault_auth::dpop::ProofCache,
    /// Request limits.
    pub limits: Limits,
    /// SMART App Launch codes and refresh tokens.
    pub authz: phivault_auth::authorize::AuthorizationServer,
    /// Sign-ins in progress.
    pub(crate) flows: crate::launch::Flows,
    /// Accounts of persons' tokens as last read: (generation, usable, unix time read).
    accounts: parking_lot::Mutex<std::collections::HashMap<String, (u64, bool, u64)>>,
    /// Clinicians' treatment relationships and break-the-glass windows.
    pub(crate) care: crate::care::Care,
    /// External OpenID Connect providers.
    pub(crate) idps: crate::idp::Idps,
    capability: Bytes,
    smart_configuration: Bytes,
    jwks: Bytes,
}

/// How long a person's account state is trusted before it is read again.
const ACCOUNT_RECHECK_SECONDS: u64 = 2;

/// Store key under which a client record is kept.
pub fn client_meta_key(client_id: &str) -> String {
    format!("client:{client_id}")
}

impl App {
    /// Assemble the state.
    pub fn new(
        engine: Engine,
        origin: &str,
        issuer: AccessTokenIssuer,
        verifier: AccessTokenVerifier,
        limits: Limits,
    ) -> Self {
        let mut engine = engine;
        let base_url = format!("{origin}/fhir");
        engine.set_base_url(&base_url);
        let token_url = format!("{origin}/auth/token");
        let capability = crate::capability::capability_statement(&base_url, &token_url);
        let smart = crate::capability::smart_configuration(origin, &token_url);
        let jwks = issuer.jwks();
        App {
            engine,
            base_url,
            token_url,
            issuer,
            verifier,
            replay: ReplayCache::default(),
            dpop_replay: Default::default(),
            limits,
            authz: phivault_auth::authorize::AuthorizationServer::new(),
            flows: crate::launch::Flows::default(),
            accounts: Default::default(),
            care: Default::default(),
            idps: Default::default(),
            capability: Bytes::from(serde_json::to_vec(&capability).unwrap_or_default()),
            smart_configuration: Bytes::from(serde_json::to_vec(&smart).unwrap_or_default()),
            jwks: Bytes::from(serde_json::to_vec(&jwks).unwrap_or_default()),
        }
    }

    /// Look a registered client up.
    pub fn client(&self, client_id: &str) -> Option<ClientRecord> {
        let bytes = self
            .engine
            .store()
            .meta(&client_meta_key(client_id))
            .ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
        ctx: &mut Ctx,
    ) -> Result<Authenticated, ApiError> {
        let challenge = "Bearer realm=\"phivault\"".to_string();
        ctx.detail.user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| phivault_audit::Detail::clean_agent(v.as_bytes()));
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(challenge));
        };
        let (dpop, token) = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                if scheme.eq_ignore_ascii_case("bearer") {
                    Some((false, rest.trim()))
                } else if scheme.eq_ignore_ascii_case("dpop") {
                    Some((true, rest.trim()))
                } else {
                    None
                }
            })
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "Bearer realm=\"phivault\", error=\"invalid_request\"".to_string(),
                )
            })?;
        let now = (now_ms() / 1000) as u64;
        let verified = match self.verifier.verify(token, now) {
            // not one of ours: a configured identity provider's, or refused as it is
            Err(
                e @ (TokenError::UnsupportedAlgorithm
                | TokenError::UnknownKey
                | TokenError::WrongIssuer),
            ) => self.verify_external(token, now).unwrap_or(Err(e)),
            v => v,
        };
        match verified {
            Ok(auth) => {
                ctx.client_id = Some(auth.client_id().to_owned());
                ctx.user = auth.person().map(|p| p.user_id.clone());
                ctx.detail.purpose = auth.person().map(|p| purpose_of(p.role).to_owned());
                self.check_sender(&auth, dpop, token, headers, now)?;
                if let Some(p) = auth.person()
                    && !self.account_live(&p.user_id, p.generation, now)
                {
                    return Err(ApiError::unauthorized(
                        "Bearer realm=\"phivault\", error=\"invalid_token\"".to_string(),
                    ));
                }
                Ok(auth)
            }
            Err(e) => Err(ApiError::unauthorized(e.www_authenticate())),
        }
    }

    /// RFC 9449 §7: a token bound to a DPoP key (`cnf.jkt`) is accepted only under the
    /// `DPoP` scheme with exactly one fresh, unreplayed proof made with that key for this
    /// method and URI and this token (`ath`); an unbound token only as a bearer token.
    fn check_sender(
        &self,
        auth: &Authenticated,
        dpop_scheme: bool,
        token: &str,
        headers: &HeaderMap,
        now: u64,
    ) -> Result<(), ApiError> {
        let refuse = |error: &str| {
            ApiError::unauthorized(format!(
                "DPoP algs=\"ES256 ES384 EdDSA\", error=\"{error}\""
            ))
        };
        let Some(jkt) = auth.dpop_jkt() else {
            return if dpop_scheme {
                Err(refuse("invalid_token"))
            } else {
                Ok(())
            };
        };
        if !dpop_scheme {
            return Err(refuse("invalid_token"));
        }
        let mut proofs = headers.get_all("dpop").iter();
        let (Some(proof), None) = (proofs.next(), proofs.next()) else {
            return Err(refuse("invalid_dpop_proof"));
        };
        let target = headers
            .get(REQUEST_TARGET)
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.split_once(' '));
        let (Some(proof), Some((method, path))) = (proof.to_str().ok(), target) else {
            return Err(refuse("invalid_dpop_proof"));
        };
        let uri = format!("{}{path}", self.origin());
        let p = phivault_auth::dpop::verify_proof(proof, method, &uri, now, Some(token))
            .map_err(|_| refuse("invalid_dpop_proof"))?;
        if p.jkt != jkt {
            return Err(refuse("invalid_dpop_proof"));
        }
        self.dpop_replay
            .check_and_insert(&p, now)
            .map_err(|_| refuse("invalid_dpop_proof"))
    }

    /// `https://host:port`, the origin the server is reached at.
    pub(crate) fn origin(&self) -> &str {
        self.base_url
            .strip_suffix("/fhir")
            .unwrap_or(&self.base_url)
    }

    /// Whether the account a person's token was issued for is still as it was: enabled,
    /// same generation (disabling it or changing its role revokes its tokens). Read from
    /// the store at most every [`ACCOUNT_RECHECK_SECONDS`] per account (the CLI changes
    /// accounts from another process, so the server polls).
    fn account_live(&self, user_id: &str, generation: u64, now: u64) -> bool {
        if let Some(&(g, ok, at)) = self.accounts.lock().get(user_id)
            && at + ACCOUNT_RECHECK_SECONDS > now
        {
            return ok && g == generation;
        }
        let (g, ok) = match self.engine.users().get_by_id(user_id) {
            Ok(Some(r)) => (r.generation, !r.disabled),
            _ => (0, false),
        };
        let mut cache = self.accounts.lock();
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(user_id.to_owned(), (g, ok, now));
        ok && g == generation
    }

    /// Make audit events durable; fail closed.
    pub async fn audit(&self, mut events: Vec<AuditEvent>) -> Result<(), ApiError> {
        self.mark_glass(&mut events);
        let rx = self.engine.store().submit(WriteBatch {
            audit: events,
            ..Default::default()
        });
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ApiError::unavailable()),
        }
    }
}

/// A request id: a random per-process prefix and a counter. Unique without a random-number
/// syscall per request; request ids need to be unique, not secret.
fn next_request_id() -> String {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: LazyLock<u64> = LazyLock::new(|| {
        let b = uuid::Uuid::new_v4();
        let (hi, _) = b.as_u64_pair();
        hi
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:016x}{:016x}",
        *PREFIX,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The purpose of use (v3 ActReason) a person's access is recorded under; a clinician's
/// access to a patient opened by break-the-glass becomes `ETREAT` when it is audited.
pub fn purpose_of(role: phivault_auth::Role) -> &'static str {
    match role {
        phivault_auth::Role::Clinician => "TREAT",
        phivault_auth::Role::Patient => "PATRQT",
        phivault_auth::Role::Auditor | phivault_auth::Role::Admin => "HSYSADMIN",
    }
}

/// What one request is doing, for its audit event.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Request id.
    pub request_id: String,
    /// Client address.
    pub source: String,
    /// Authenticated client.
    pub client_id: Option<String>,
    /// The person's account id, when the client acts for one (or one signs in).
    pub user: Option<String>,
    /// Action.
    pub action: Action,
    /// Interaction name.
    pub interaction: &'static str,
    /// Resource type.
    pub rtype: Option<String>,
    /// Resource id.
    pub id: Option<String>,
    /// Version.
    pub version: Option<u64>,
    /// Patient compartment.
    pub patient: Option<String>,
    /// True once the request's audit event is durable.
    pub audited: bool,
    /// Further events (one per patient touched by a multi-resource read).
    pub extra: Vec<AuditEvent>,
    /// Resources disclosed by a search (recorded in the request's event).
    pub entities: Vec<phivault_audit::Entity>,
    /// Purpose of use, user agent and search parameter names (IHE BALP).
    pub detail: phivault_audit::Detail,
}

impl Ctx {
    /// A context for a request from `peer`.
    pub fn new(peer: Peer, action: Action, interaction: &'static str) -> Self {
        Ctx {
            request_id: next_request_id(),
            source: peer.0.ip().to_string(),
            client_id: None,
            user: None,
            action,
            interaction,
            rtype: None,
            id: None,
            version: None,
            patient: None,
            audited: false,
            extra: Vec::new(),
            entities: Vec::new(),
            detail: Default::default(),
        }
    }

    /// A context for a request on a resource type (and id).
    pub fn on(
        peer: Peer,
        action: Action,
        interaction: &'static str,
        rtype: &str,
        id: Option<&str>,
    ) -> Self {
        let mut c = Ctx::new(peer, action, interaction);
        c.rtype = Some(rtype.to_owned());
        c.id = id.map(str::to_owned);
        c
    }

    /// The audit event of this request with outcome `status`.
    pub fn event(&self, status: u16) -> AuditEvent {
        AuditEvent {
            time_ms: now_ms() as u64,
            request_id: self.request_id.clone(),
            client_id: self.client_id.clone(),
            user: self.user.clone(),
            action: self.action,
            interaction: self.interaction.to_owned(),
            resource_type: self.rtype.clone(),
            resource_id: self.id.clone(),
            version: self.version,
            patient: self.patient.clone(),
            outcome: Outcome::from_http(status),
            source: self.source.clone(),
            entities: Vec::new(),
            detail: self.detail.clone(),
        }
    }

    /// An event for a written resource.
    pub fn event_for(
        &self,
        w: &Written,
        action: Action,
        interaction: &str,
        status: u16,
    ) -> AuditEvent {
        AuditEvent {
            action,
            interaction: interaction.to_owned(),
            resource_type: Some(w.rtype.clone()),
            resource_id: Some(w.id.clone()),
            version: Some(w.version),
            patient: w.patient.clone(),
            ..self.event(status)
        }
    }
}

/// Audit (unless already durable) and answer. If the audit event cannot be made durable,
/// the response is withheld and the request fails (AU2).
pub(crate) async fn finish(
    app: &App,
    mut ctx: Ctx,
    result: Result<Response, ApiError>,
) -> Response {
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(request_id = %ctx.request_id, interaction = ctx.interaction, status = e.status.as_u16(), "request failed");
            }
            e.into_response()
        }
    };
    if !ctx.audited {
        let status = resp.status().as_u16();
        let mut event = ctx.event(status);
        event.entities = std::mem::take(&mut ctx.entities);
        let mut events = vec![event];
        events.append(&mut ctx.extra);
        if app.audit(events).await.is_err() {
            tracing::error!(request_id = %ctx.request_id, "audit event could not be made durable; response withheld");
            resp = ApiError::unavailable().into_response();
        }
    }
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    resp
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{version}\""))
        .unwrap_or(HeaderValue::from_static("W/\"0\""))
}

fn last_modified(ms: i64) -> HeaderValue {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    HeaderValue::from_str(&httpdate::fmt_http_date(t)).unwrap_or(HeaderValue::from_static(""))
}

/// Which version a response carries.
pub struct VersionRef<'a> {
    /// Resource type.
    pub rtype: &'a str,
    /// Logical id.
    pub id: &'a str,
    /// Version.
    pub version: u64,
    /// Write time (ms since epoch).
    pub updated_ms: i64,
}

/// A response carrying one resource version.
pub fn resource_response(
    app: &App,
    status: StatusCode,
    v: VersionRef<'_>,
    body: Vec<u8>,
    location: bool,
) -> Response {
    let VersionRef {
        rtype,
        id,
        version,
        updated_ms,
    } = v;
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    h.insert(header::ETAG, etag(version));
    h.insert(header::LAST_MODIFIED, last_modified(updated_ms));
    if location
        && let Ok(v) =
            HeaderValue::from_str(&format!("{}/{rtype}/{id}/_history/{version}", app.base_url))
    {
        h.insert(header::LOCATION, v);
    }
    resp
}

pub(crate) fn json_response(
    status: StatusCode,
    body: Bytes,
    content_type: &'static str,
) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Read a request body within the limit, as JSON.
pub fn body_bytes(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let mime = ct.split(';').next().unwrap_or("").trim();
        if mime != "application/fhir+json" && mime != "application/json" {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                IssueCode::NotSupported,
                "request bodies must be application/fhir+json",
            ));
        }
    }
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                IssueCode::TooCostly,
                "request body exceeds the size limit",
            )
        } else {
            ApiError::bad_request("request body could not be read")
        }
    })
}

/// Parse and validate a resource body of type `rtype`.
pub fn parse_valid(bytes: &[u8], rtype: &str) -> Result<Value, ApiError> {
    let v = phivault_fhir::parse_resource(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, IssueCode::Structure, e.to_string()))?;
    if v.get("resourceType").and_then(Value::as_str) != Some(rtype) {
        return Err(ApiError::bad_request(
            "resourceType of the body does not match the URL",
        ));
    }
    phivault_fhir::validate(&v).map_err(ApiError::invalid)?;
    Ok(v)
}

/// The version an ETag (`W/"3"`, `"3"` or `3`) names.
pub fn parse_etag(s: &str) -> Option<u64> {
    let s = s.trim();
    s.strip_prefix("W/")
        .unwrap_or(s)
        .trim_matches('"')
        .parse()
        .ok()
}

fn parse_if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    parse_etag(v.to_str().unwrap_or(""))
        .map(Some)
        .ok_or_else(|| ApiError::bad_request("If-Match must be an ETag like W/\"3\""))
}

pub(crate) fn check_id(id: &str) -> Result<(), ApiError> {
    if phivault_fhir::is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request("invalid resource id"))
    }
}

/// Run a blocking store call off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    // CPU-bound work (decrypting, parsing, searching) on more threads than cores only
    // adds context switches and tail latency; the rest wait here, without a thread
    let _permit = BLOCKING
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable())?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::internal())?
}

/// Blocking tasks run at once: twice the cores (some of their time is I/O wait).
static BLOCKING: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    tokio::sync::Semaphore::new((2 * cores).max(4))
});

/// Outcome of committing a prepared batch.
pub enum Commit {
    /// Durable.
    Done,
    /// A precondition failed; retry or report.
    Conflict(CommitError),
}

/// Submit a batch and classify the outcome.
pub async fn commit(app: &App, batch: WriteBatch) -> Result<Commit, ApiError> {
    // a write of a treatment relationship drops the cached reach of clinicians: before
    // (nothing computed from now on is kept past the write) and after it lands
    let relations = crate::care::Care::touches(batch.puts.iter().map(|p| p.row.rtype.as_str()));
    if relations {
        app.care.invalidate();
    }
    let r = app.engine.store().submit(batch).await;
    if relations {
        app.care.invalidate();
    }
    match r {
        Ok(Ok(_)) => Ok(Commit::Done),
        Ok(Err(CommitError::Store(_))) | Err(_) => Err(ApiError::unavailable()),
        Ok(Err(e)) => Ok(Commit::Conflict(e)),
    }
}

/// How many times an optimistic write is retried after losing a race.
pub const MAX_RETRIES: usize = 16;

pub(crate) fn conflict_exhausted() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        IssueCode::Conflict,
        "the resource changed concurrently too often; retry",
    )
}

async fn create(
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

/// Result of a (conditional) create.
pub enum Created {
    /// A new resource.
    New(Written),
    /// If-None-Exist matched this resource; nothing was written.
    Existing(phivault_store::VersionRow),
}

/// Create a resource (already parsed and validated), honouring If-None-Exist criteria.
pub async fn do_create(
    app: &Arc<App>,
    ctx: &mut Ctx,
    access: &Access,
    mut resource: Value,
    if_none_exist: Option<&str>,
) -> Result<Created, ApiError> {
    let rtype = access.rtype();
    let cond = match if_none_exist {
        Some(q) => Some(Arc::new(crate::search::Conditional::parse(app, rtype, q)?)),
        None => None,
    };
    // identical conditional creates queue here (the store guard covers the common
    // identifier case across processes too)
    let lock_key = cond.as_ref().map(|c| c.lock_key()).unwrap_or_default();
    let _cond_lock = match &cond {
        Some(_) => Some(
            app.engine
                .lock_resources([("If-None-Exist", lock_key.as_str())])
                .await,
        ),
        None => None,
    };
    for _ in 0..MAX_RETRIES {
        let mut guards = Vec::new();
        if let Some(c) = &cond {
            let (a, c) = (app.clone(), c.clone());
            match blocking(move || c.find(&a)).await? {
                crate::search::CondMatch::None(guard) => guards.extend(guard),
                crate::search::CondMatch::One(cur) => {
                    ctx.id = Some(cur.id.clone());
                    ctx.version = Some(cur.version);
                    ctx.patient = key_patient(&cur.key_id).map(str::to_owned);
                    return Ok(Created::Existing(cur));
                }
            }
        }
        let id = crate::engine::new_id();
        let mut ring = app.engine.key_ring();
        let (put, written) = app.engine.prepare(
            access,
            &mut ring,
            rtype,
            &id,
            1,
            Expect::Absent,
            Some(&mut resource),
            now_ms(),
            None,
        )?;
        let mut event = ctx.event_for(&written, Action::C, ctx.interaction, 201);
        app.mark_glass(std::slice::from_mut(&mut event));
        let batch = WriteBatch {
            new_keys: ring.new_keys(),
            guards,
            puts: vec![put],
            audit: vec![event],
        };
        match commit(app, batch).await? {
            Commit::Done => {
                ring.committed();
                ctx.audited = true;
                ctx.id = Some(id.clone());
                ctx.version = Some(1);
                ctx.patient = written.patient.clone();
                return Ok(Created::New(written));
            }
            Commit::Conflict(CommitError::KeyConflict) => forget_keys(app, &written),
            Commit::Conflict(_) => {}
        }
    }
    Err(conflict_exhausted())
}

/// Drop cached keys a lost key race may have made stale.
pub fn forget_keys(app: &App, w: &Written) {
    match &w.patient {
        Some(p) => app.engine.forget_key(&crate::engine::patient_key_id(p)),
        None => app.engine.forget_key(crate::engine::SHARED_KEY_ID),
    }
}

async fn update(
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

/// Authorize a create or update; a confined writer (a clinician) gets its reach, and may
/// not write the records that make treatment relationships (Encounter, CareTeam,
/// Appointment): otherwise a break-the-glass window could be turned into lasting access.
fn writer(
    app: &App,
    auth: &Authenticated,
    rtype: &str,
    i: Interaction,
) -> Result<Access, ApiError> {
    let access = app.decide(auth, rtype, i)?;
    if access.is_confined() && crate::care::Care::touches(std::iter::once(rtype)) {
        return Err(ApiError::forbidden());
    }
    Ok(access)
}

/// Write a new version (or tombstone) of an existing-or-new resource, retrying lost races
/// unless the client pinned the version with If-Match. A confined writer updates only a
/// current version of a patient it reaches and never creates by update (a 403 either way,
/// so an id tells nothing about records it does not reach); the engine checks the record
/// it seals.
pub async fn update_or_delete(
    app: &Arc<App>,
    ctx: &mut Ctx,
    access: &Access,
    id: &str,
    mut resource: Option<Value>,
    if_match: Option<u64>,
) -> Result<Written, ApiError> {
    let rtype = access.rtype();
    let deleting = resource.is_none();
    let _locks = app.engine.lock_resources([(rtype, id)]).await;
    for _ in 0..MAX_RETRIES {
        let (a, t, i) = (app.clone(), rtype.to_owned(), id.to_owned());
        let cur = blocking(move || {
            a.engine
                .store()
                .current(&t, &i)
                .map_err(|_| ApiError::unavailable())
        })
        .await?;
        if access.is_confined()
            && !cur
                .as_ref()
                .is_some_and(|c| !c.deleted && access.admits_row(c))
        {
            return Err(ApiError::forbidden());
        }
        if let Some(expected) = if_match
            && cur.as_ref().map(|c| c.version) != Some(expected)
        {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                IssueCode::Conflict,
                "If-Match does not match the current version",
            ));
        }
        if deleting {
            match &cur {
                None => return Err(ApiError::not_found("resource not found")),
                Some(c) if c.deleted => {
                    let w = Written::from_row(c);
                    ctx.version = Some(w.version);
                    ctx.patient = w.patient.clone();
                    return Ok(w);
                }
                Some(_) => {}
            }
        }
        let (expect, version) = match &cur {
            Some(c) => (Expect::Version(c.version), c.version + 1),
            None => (Expect::Absent, 1),
        };
        let mut ring = app.engine.key_ring();
        let (put, written) = app.engine.prepare(
            access,
            &mut ring,
            rtype,
            id,
            version,
            expect,
            resource.as_mut(),
            now_ms(),
            cur.as_ref(),
        )?;
        let (action, name, status) = if deleting {
            (Action::D, "delete", 204)
        } else if version == 1 {
            (Action::C, "update-create", 201)
        } else {
            (Action::U, "update", 200)
        };
        let mut event = ctx.event_for(&written, action, name, status);
        app.mark_glass(std::slice::from_mut(&mut event));
        let batch = WriteBatch {
            new_keys: ring.new_keys(),
            guards: Vec::new(),
            puts: vec![put],
            audit: vec![event],
        };
        match commit(app, batch).await? {
            Commit::Done => {
                ring.committed();
                ctx.audited = true;
                ctx.version = Some(version);
                ctx.patient = written.patient.clone();
                return Ok(written);
            }
            Commit::Conflict(CommitError::KeyConflict) => forget_keys(app, &written),
            Commit::Conflict(_) if if_match.is_some() => {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    IssueCode::Conflict,
                    "If-Match does not match the current version",
                ));
            }
            Commit::Conflict(_) => {}
        }
    }
    Err(conflict_exhausted())
}

async fn delete(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::D, "delete", &rtype, Some(&id));
    let r = async {
        let auth = app.authenticate(&headers, &mut ctx)?;
        let access = app.decide_unconfined(&auth, &rtype, Interaction::Delete)?;
        check_id(&id)?;
        let if_match = parse_if_match(&headers)?;
        update_or_delete(&app, &mut ctx, &access, &id, None, if_match).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    finish(&app, ctx, r).await
}

async fn read(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::on(peer, Action::R, "read", &rtype, Some(&id));
    let r = read_inner(&app, &mut ctx, &rtype, &id, None, &headers).await;
    finish(&app, ctx, r).await
}

async fn vread(
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

/// Read the current or a given version of a record `access` reaches: 404 when absent,
/// 410 when deleted. A version of a patient it does not reach is "not found" (before
/// deletion is told or anything is decrypted), so ids of other patients' records reveal
/// nothing.
pub async fn do_read(
    app: &Arc<App>,
    ctx: &mut Ctx,
    access: &Access,
    id: &str,
    version: Option<u64>,
) -> Result<(phivault_store::VersionRow, Vec<u8>), ApiError> {
    let rtype = access.rtype();
    check_id(id).map_err(|_| ApiError::not_found("resource not found"))?;
    // A point read by primary key takes microseconds on the page cache: done inline rather
    // than paying a thread hand-off per request.
    let (row, body) = {
        let row = match version {
            None => app.engine.store().current(rtype, id),
            Some(v) => app.engine.store().version(rtype, id, v),
        }
        .map_err(|_| ApiError::unavailable())?;
        let row = row.filter(|r| access.admits_row(r));
        match row {
            None => (None, Vec::new()),
            Some(row) if row.deleted => (Some(row), Vec::new()),
            Some(row) => {
                let body = app.engine.open(access, &row)?;
                (Some(row), body)
            }
        }
    };
    let Some(row) = row else {
        return Err(ApiError::not_found("resource not found"));
    };
    ctx.version = Some(row.version);
    ctx.patient = key_patient(&row.key_id).map(str::to_owned);
    if row.deleted {
        return Err(ApiError::new(
            StatusCode::GONE,
            IssueCode::Deleted,
            "the resource was deleted",
        ));
    }
    Ok((row, body))
}

fn parse_count(query: Option<&str>, max: usize) -> Result<usize, ApiError> {
    let mut count = 50.min(max);
    for (k, v) in crate::engine::form_urlencoded_pairs(query.unwrap_or("")) {
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

async fn history_instance(
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

async fn history_type(
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
    let (a, t, i) = (app.clone(), rtype.to_owned(), id.clone());
    let rows = blocking(move || {
        let rows = a
            .engine
            .store()
            .history(&t, i.as_deref(), count)
            .map_err(|_| ApiError::unavailable())?;
        // a confined access sees the versions sealed for patients it reaches (a record
        // moved between patients shows each only its own versions); nothing else is opened
        rows.into_iter()
            .filter(|r| access.admits_row(r))
            .map(|r| {
                let body = if r.deleted {
                    Vec::new()
                } else {
                    a.engine.open(&access, &r)?
                };
                Ok((r, body))
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await?;
    if id.is_some() && rows.is_empty() {
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
        let full_url = format!("{}/{}/{}", app.base_url, row.rtype, row.id);
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
        "id": crate::engine::new_id(),
        "meta": {"lastUpdated": instant(now_ms())},
        "type": "history",
        "total": entries.len(),
        "link": [{"relation": "self", "url": match &id {
            Some(id) => format!("{}/{rtype}/{id}/_history", app.base_url),
            None => format!("{}/{rtype}/_history", app.base_url),
        }}],
        "entry": entries,
    });
    let body = serde_json::to_vec(&bundle).map_err(|_| ApiError::internal())?;
    Ok(json_response(StatusCode::OK, Bytes::from(body), FHIR_JSON))
}

async fn metadata(State(app): State<Arc<App>>) -> Response {
    json_response(StatusCode::OK, app.capability.clone(), FHIR_JSON)
}

async fn smart_configuration(State(app): State<Arc<App>>) -> Response {
    json_response(
        StatusCode::OK,
        app.smart_configuration.clone(),
        "application/json",
    )
}

async fn jwks(State(app): State<Arc<App>>) -> Response {
    json_response(StatusCode::OK, app.jwks.clone(), "application/json")
}

async fn token(
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
    let form = crate::engine::form_urlencoded_pairs(text);
    if let Some(answer) = crate::launch::person_grant(app, &form, ctx, headers) {
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

async fn not_found(
    Extension(peer): Extension<Peer>,
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Response {
    // Unknown routes still need authentication, so probing reveals nothing to strangers.
    let mut ctx = Ctx::new(peer, Action::R, "unknown-route");
    let r = match app.authenticate(&headers, &mut ctx) {
        Ok(_) => Err(ApiError::not_found("no such route")),
        Err(e) => Err(e),
    };
    finish(&app, ctx, r).await
}

async fn method_not_allowed(
    Extension(peer): Extension<Peer>,
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Response {
    // Authenticate first: strangers learn nothing about which routes exist.
    let mut ctx = Ctx::new(peer, Action::E, "unsupported-method");
    let r = match app.authenticate(&headers, &mut ctx) {
        Ok(_) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            IssueCode::NotSupported,
            "this interaction is not supported on this route",
        )),
        Err(e) => Err(e),
    };
    finish(&app, ctx, r).await
}

/// Security headers on every response.
/// An internal request header: `METHOD path` of the request, set by the server for DPoP
/// proof checks (whatever a client sends under this name is removed first).
pub(crate) const REQUEST_TARGET: &str = "x-phivault-request-target";

async fn security_headers(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    req.headers_mut().remove(REQUEST_TARGET);
    if req.headers().contains_key("dpop") {
        let target = format!("{} {}", req.method(), req.uri().path());
        if let Ok(v) = HeaderValue::from_str(&target) {
            req.headers_mut().insert(REQUEST_TARGET, v);
        }
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=63072000; includeSubDomains"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The router (state applied).
pub fn router(app: Arc<App>) -> Router {
    let max_body = app.limits.max_body;
    Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/.well-known/smart-configuration", get(smart_configuration))
        .route(
            "/fhir/.well-known/smart-configuration",
            get(smart_configuration),
        )
        .route("/.well-known/jwks.json", get(jwks))
        .route("/auth/token", post(token))
        .route("/auth/authorize", get(crate::launch::authorize))
        .route("/auth/login", post(crate::launch::login))
        .route("/auth/consent", post(crate::launch::consent))
        .route("/auth/revoke", post(crate::launch::revoke))
        .route("/auth/introspect", post(crate::launch::introspect))
        .route("/auth/break-glass", post(crate::care::break_glass))
        .route("/audit/alerts", get(crate::alerts_http::list))
        .route("/audit/report", get(crate::audit_http::report))
        .route("/audit/alerts/{id}", post(crate::alerts_http::review))
        .route("/fhir/AuditEvent", get(crate::audit_http::search))
        .route("/fhir/AuditEvent/{id}", get(crate::audit_http::read))
        .route("/fhir/AuditEvent/{id}/{op}", get(crate::audit_http::proof))
        .route("/fhir", post(bundle::handle))
        .route("/fhir/", post(bundle::handle))
        .route(
            "/fhir/{rtype}",
            post(create).get(crate::search_http::search_type),
        )
        .route(
            "/fhir/{rtype}/_search",
            post(crate::search_http::search_post),
        )
        .route(
            "/fhir/{rtype}/{id}/{ctype}",
            get(crate::search_http::compartment),
        )
        .route("/fhir/{rtype}/_history", get(history_type))
        .route("/fhir/{rtype}/{id}", get(read).put(update).delete(delete))
        .route("/fhir/{rtype}/{id}/_history", get(history_instance))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(vread))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(app)
}
