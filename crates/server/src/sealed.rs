//! The gate of a server that starts **sealed** (the `shamir` key provider): it listens and
//! answers `GET /fhir/metadata` and `GET /health`, and 503 with an OperationOutcome to
//! everything else, until an operator unseals it; then every request goes to the full
//! router ([`crate::router`]), built only at unseal. Sealing again takes the full router
//! out: the caller drops the `App` behind it.
//!
//! `/health` answers `{"status":"sealed"}` or `{"status":"unsealed"}` in both states;
//! it says nothing else.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use phivault_fhir::IssueCode;
use tower::ServiceExt as _;

use crate::error::ApiError;

/// The gate: sealed until [`Gate::unseal`] gives it the full router.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    unsealed: parking_lot::RwLock<Option<Router>>,
    capability: Bytes,
}

impl Gate {
    /// A sealed gate for the server at `origin` (its capability statement is the unsealed
    /// server's: what the server can do does not depend on its keys).
    pub fn new(origin: &str) -> Self {
        let capability = crate::capability::capability_statement(
            &format!("{origin}/fhir"),
            &format!("{origin}/auth/token"),
        );
        Gate {
            inner: Arc::new(Inner {
                unsealed: parking_lot::RwLock::new(None),
                capability: Bytes::from(serde_json::to_vec(&capability).unwrap_or_default()),
            }),
        }
    }

    /// Serve `full` (the router of the unsealed `App`) from now on.
    pub fn unseal(&self, full: Router) {
        *self.inner.unsealed.write() = Some(full);
    }

    /// Seal: requests from now on are answered sealed; returns the full router taken out
    /// (requests in flight finish on their own clones of it).
    pub fn seal(&self) -> Option<Router> {
        self.inner.unsealed.write().take()
    }

    /// Whether the server is sealed.
    pub fn is_sealed(&self) -> bool {
        self.inner.unsealed.read().is_none()
    }

    /// The router to serve (`serve_tls`): `/health`, then the full router or the sealed answers.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/health", get(health))
            .fallback(dispatch)
            .with_state(self.clone())
    }
}

async fn health(State(gate): State<Gate>) -> Response {
    let body: &'static [u8] = if gate.is_sealed() {
        br#"{"status":"sealed"}"#
    } else {
        br#"{"status":"unsealed"}"#
    };
    harden(json(
        StatusCode::OK,
        Bytes::from_static(body),
        "application/json",
    ))
}

async fn dispatch(State(gate): State<Gate>, req: Request) -> Response {
    let full = gate.inner.unsealed.read().clone();
    if let Some(full) = full {
        return match full.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
    }
    if req.uri().path() == "/fhir/metadata" && matches!(*req.method(), Method::GET | Method::HEAD) {
        return harden(json(
            StatusCode::OK,
            gate.inner.capability.clone(),
            crate::FHIR_JSON,
        ));
    }
    let mut resp = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        IssueCode::Transient,
        "the server is sealed: an operator must unseal it before it serves anything but its metadata",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
    harden(resp)
}

fn json(status: StatusCode, body: Bytes, content_type: &'static str) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The security headers the full router sets on every response.
fn harden(mut resp: Response) -> Response {
    crate::routes::harden(resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    async fn call(r: &Router, method: &str, path: &str) -> (StatusCode, serde_json::Value) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", "Bearer eyJhbGciOiJFZERTQSJ9.e30.c2ln")
            .body(Body::empty())
            .expect("request");
        let resp = r.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        if status != StatusCode::IM_A_TEAPOT {
            assert_eq!(
                resp.headers()
                    .get(header::CACHE_CONTROL)
                    .map(|v| v.as_bytes()),
                Some(&b"no-store"[..])
            );
        }
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_sealed_gate_answers_metadata_and_health_and_503_to_the_rest() {
        let gate = Gate::new("https://127.0.0.1:8443");
        let r = gate.router();
        let (s, body) = call(&r, "GET", "/fhir/metadata").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["resourceType"], "CapabilityStatement");
        assert_eq!(call(&r, "GET", "/health").await.1["status"], "sealed");
        for (m, p) in [
            ("GET", "/fhir/Patient/x"),
            ("POST", "/auth/token"),
            ("GET", "/.well-known/smart-configuration"),
            ("POST", "/fhir/metadata"),
            ("GET", "/nowhere"),
        ] {
            let (s, body) = call(&r, m, p).await;
            assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{m} {p}");
            assert_eq!(body["resourceType"], "OperationOutcome");
            let text = body["issue"][0]["diagnostics"].to_string() + &body.to_string();
            assert!(text.contains("sealed"), "{text}");
        }
        // unsealed: everything but /health goes to the full router
        let full = Router::new().fallback(|| async { (StatusCode::IM_A_TEAPOT, "{}") });
        gate.unseal(full);
        assert_eq!(call(&r, "GET", "/health").await.1["status"], "unsealed");
        let (s, _) = call(&r, "GET", "/fhir/Patient/x").await;
        assert_eq!(s, StatusCode::IM_A_TEAPOT);
        assert!(gate.seal().is_some());
        assert!(gate.is_sealed());
        let (s, _) = call(&r, "GET", "/fhir/Patient/x").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    }
}
