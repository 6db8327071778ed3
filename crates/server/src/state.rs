//! The server's state and the life of one request: [`App`] (what every route shares),
//! authentication (bearer and DPoP, each request's credentials checked once), [`Ctx`] (what
//! a request does, for its audit event) and [`finish`] (audit durably, then answer). Imports
//! no handler module: the routes module names handlers.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use phivault_audit::{Action, AuditEvent, Outcome};
use phivault_auth::{
    AccessTokenIssuer, AccessTokenVerifier, Authenticated, ClientRecord, ReplayCache, TokenError,
};

use std::sync::Arc;

use crate::error::ApiError;
use phivault_auth::Interaction;
use phivault_records::engine::{Written, now_ms};
use phivault_records::registrations::client_meta_key;
use phivault_records::{Access, Vault};

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
    /// The records and their rules (sealing, the one authorization decision, search,
    /// care relationships).
    pub vault: Arc<Vault>,
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
    /// How long what was read is trusted.
    pub freshness: Freshness,
    /// SMART App Launch codes and refresh tokens.
    pub authz: phivault_auth::authorize::AuthorizationServer,
    /// Sign-ins in progress.
    pub(crate) flows: crate::signin::Flows,
    /// Accounts of persons' tokens as last read: (generation, usable, unix time read, ms).
    accounts: parking_lot::Mutex<std::collections::HashMap<String, (u64, bool, u64)>>,
    /// External OpenID Connect providers.
    pub(crate) idps: crate::idp::Idps,
    pub(crate) capability: Bytes,
    pub(crate) smart_configuration: Bytes,
    pub(crate) jwks: Bytes,
    /// The exchange area of trusted sharing (share links' files, exports); None: sharing
    /// is not served (503).
    pub exchange: Option<phivault_share::area::Area>,
    /// How long a finished export's files are served (ms).
    pub export_expiry_ms: u64,
}

/// How long the server trusts what it read from the store or a provider before it reads
/// again. The defaults are for production; tests shorten them instead of waiting.
#[derive(Debug, Clone)]
pub struct Freshness {
    /// A person's account state (disabled, role changed: their tokens are refused within
    /// this; the CLI changes accounts from another process, so the server polls).
    pub account_recheck_ms: u64,
    /// The list of configured identity providers, when a token names an unknown issuer.
    pub idp_reload_ms: u64,
    /// A provider's key set, when a token names an unknown `kid` (key rotation).
    pub idp_refetch_ms: u64,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness {
            account_recheck_ms: 2_000,
            idp_reload_ms: 10_000,
            idp_refetch_ms: 5_000,
        }
    }
}

impl App {
    /// Assemble the state.
    pub fn new(
        vault: Arc<Vault>,
        origin: &str,
        issuer: AccessTokenIssuer,
        verifier: AccessTokenVerifier,
        limits: Limits,
    ) -> Self {
        let token_url = format!("{origin}/auth/token");
        let capability = crate::capability::capability_statement(&vault.base_url, &token_url);
        let smart = crate::capability::smart_configuration(origin, &token_url);
        let jwks = issuer.jwks();
        // several nodes on one store share their replay records: a proof used on one is
        // refused on every other
        let (replay, dpop_replay) = match vault.engine.shared_seen() {
            Some(shared) => (
                ReplayCache::shared(shared.clone()),
                phivault_auth::dpop::ProofCache::shared(shared),
            ),
            None => (ReplayCache::default(), Default::default()),
        };
        // several nodes: a code issued by one is exchanged at another, a refresh token
        // retired on one revokes its family on all
        // (and sign-ins in progress and their attempt budget)
        let (authz, flows) = match vault.engine.shared_state() {
            Some(state) => (
                phivault_auth::authorize::AuthorizationServer::with_state(state.clone()),
                crate::signin::Flows::shared(state),
            ),
            None => (
                phivault_auth::authorize::AuthorizationServer::new(),
                crate::signin::Flows::default(),
            ),
        };
        App {
            vault,
            token_url,
            issuer,
            verifier,
            replay,
            dpop_replay,
            limits,
            freshness: Freshness::default(),
            authz,
            flows,
            accounts: Default::default(),
            idps: Default::default(),
            capability: Bytes::from(serde_json::to_vec(&capability).unwrap_or_default()),
            smart_configuration: Bytes::from(serde_json::to_vec(&smart).unwrap_or_default()),
            jwks: Bytes::from(serde_json::to_vec(&jwks).unwrap_or_default()),
            exchange: None,
            export_expiry_ms: 3_600_000,
        }
    }

    /// The exchange area of trusted sharing (503 when this server has none).
    pub(crate) fn exchange_area(&self) -> Result<&phivault_share::area::Area, ApiError> {
        self.exchange.as_ref().ok_or_else(ApiError::unavailable)
    }

    /// Look a registered client up.
    pub fn client(&self, client_id: &str) -> Option<ClientRecord> {
        let bytes = self.vault.engine.meta(&client_meta_key(client_id)).ok()??;
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
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = match (values.next(), values.next()) {
            (None, _) => return Err(ApiError::unauthorized(challenge)),
            (Some(v), None) => v,
            // more than one set of credentials: refused, never resolved by order (RFC 6750
            // §3.1 invalid_request)
            (Some(_), Some(_)) => {
                return Err(ApiError::unauthorized(
                    "Bearer realm=\"phivault\", error=\"invalid_request\"".to_string(),
                ));
            }
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
                    && !self.account_live(&p.user_id, p.generation, now_ms() as u64)
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
        self.vault
            .base_url
            .strip_suffix("/fhir")
            .unwrap_or(&self.vault.base_url)
    }

    /// Whether the account a person's token was issued for is still as it was: enabled,
    /// same generation (disabling it or changing its role revokes its tokens). Read from
    /// the store at most every `freshness.account_recheck_ms` per account (the CLI changes
    /// accounts from another process, so the server polls). `now_ms`: milliseconds.
    fn account_live(&self, user_id: &str, generation: u64, now_ms: u64) -> bool {
        if let Some(&(g, ok, at)) = self.accounts.lock().get(user_id)
            && at + self.freshness.account_recheck_ms > now_ms
        {
            return ok && g == generation;
        }
        let (g, ok) = match self.vault.engine.users().get_by_id(user_id) {
            Ok(Some(r)) => (r.generation, !r.disabled),
            _ => (0, false),
        };
        let mut cache = self.accounts.lock();
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(user_id.to_owned(), (g, ok, now_ms));
        ok && g == generation
    }

    /// Authenticate a request (its credentials checked exactly once) and decide one
    /// interaction on a resource type.
    pub(crate) fn access(
        &self,
        headers: &HeaderMap,
        ctx: &mut Ctx,
        rtype: &str,
        interaction: Interaction,
    ) -> Result<(Authenticated, Access), ApiError> {
        let auth = self.authenticate(headers, ctx)?;
        let access = self.vault.decide(&auth, rtype, interaction)?;
        Ok((auth, access))
    }

    /// Make audit events durable; fail closed.
    pub async fn audit(&self, mut events: Vec<AuditEvent>) -> Result<(), ApiError> {
        self.vault.mark_glass(&mut events);
        let rx = self.vault.engine.append_audit(events);
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
            writes: Vec::new(),
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

/// Run `f` off the async threads with the request's context; audit; answer.
pub(crate) async fn run(
    app: Arc<App>,
    ctx: Ctx,
    f: impl FnOnce(&App, &mut Ctx) -> Result<Response, ApiError> + Send + 'static,
) -> Response {
    let a = app.clone();
    let fallback = (
        ctx.request_id.clone(),
        ctx.source.clone(),
        ctx.interaction,
        ctx.action,
    );
    let done = blocking(move || {
        let mut ctx = ctx;
        let r = f(&a, &mut ctx);
        Ok((ctx, r))
    })
    .await;
    match done {
        Ok((ctx, r)) => finish(&app, ctx, r).await,
        Err(e) => {
            let mut ctx = Ctx::new(Peer(([0, 0, 0, 0], 0).into()), fallback.3, fallback.2);
            ctx.request_id = fallback.0;
            ctx.source = fallback.1;
            finish(&app, ctx, Err(e)).await
        }
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

/// An internal request header: `METHOD path` of the request, set by the routes' security
/// layer for DPoP proof checks (whatever a client sends under this name is removed first).
pub(crate) const REQUEST_TARGET: &str = "x-phivault-request-target";
