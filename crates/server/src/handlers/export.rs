//! FHIR Bulk Data export over HTTP (`phivault_share::export` holds the rules): the kick-off
//! (`GET [base]/$export`, `[base]/Patient/$export`, `[base]/Group/{id}/$export`, with
//! `Prefer: respond-async`) answers 202 and a status URL (`/bulk/{job}`): 202 with
//! `X-Progress` and `Retry-After` while it runs, 200 with the manifest (and `Expires`)
//! when done, `DELETE` to cancel; files at `/bulk/{job}/file/{n}` (and `error/{n}`), only
//! with the token of the client that asked, each fetch audited with the patients the file
//! holds.

use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use phivault_audit::Action;
use phivault_share::export::{self, Status, job::Level};

use crate::error::ApiError;
use crate::respond::json_response;
use crate::state::{App, Ctx, Peer, blocking, finish, run};

/// The kick-off parameters the spec defines, as recorded in the audit event (any other
/// name is recorded as `unknown`: request text is never written to the log).
fn param_name(k: &str) -> String {
    const KNOWN: [&str; 7] = [
        "_type",
        "_since",
        "_outputFormat",
        "_typeFilter",
        "_elements",
        "includeAssociatedData",
        "patient",
    ];
    KNOWN
        .iter()
        .find(|n| **n == k)
        .map_or_else(|| "unknown".to_owned(), |n| (*n).to_owned())
}

/// `GET [base]/$export`.
pub async fn system(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    kick_off(app, peer, headers, q, Level::System).await
}

/// `GET [base]/Patient/$export`.
pub async fn patients(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    kick_off(app, peer, headers, q, Level::Patient).await
}

/// `GET [base]/Group/{id}/$export`.
pub async fn group(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    kick_off(app, peer, headers, q, Level::Group(id)).await
}

/// Whether the kick-off's headers are the spec's: `Prefer: respond-async`, and an
/// `Accept` of `application/fhir+json` (or none).
fn check_headers(headers: &HeaderMap) -> Result<(), ApiError> {
    let prefer = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
        });
    if !prefer {
        return Err(ApiError::bad_request(
            "an export is asynchronous: send Prefer: respond-async",
        ));
    }
    let accept_ok = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|a| {
            a.split(',').any(|t| {
                let t = t.split(';').next().unwrap_or("").trim();
                matches!(t, "application/fhir+json" | "application/json" | "*/*")
            })
        });
    if !accept_ok {
        return Err(ApiError::bad_request(
            "Accept must be application/fhir+json",
        ));
    }
    Ok(())
}

async fn kick_off(
    app: Arc<App>,
    peer: Peer,
    headers: HeaderMap,
    q: Option<String>,
    level: Level,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::E, "export");
    if let Level::Group(id) = &level {
        ctx.rtype = Some("Group".into());
        ctx.id = Some(id.clone());
    }
    run(app, ctx, move |a, ctx| {
        let auth = a.authenticate(&headers, ctx)?;
        check_headers(&headers)?;
        let pairs = phivault_records::engine::form_urlencoded_pairs(q.as_deref().unwrap_or(""));
        ctx.detail.query = pairs.iter().map(|(k, _)| param_name(k)).take(32).collect();
        let e2e = match a.client(auth.client_id()).and_then(|c| c.export_key) {
            Some(jwk) => Some(export::encryption_key(&jwk).map_err(ApiError::from)?),
            None => None,
        };
        let path = match &level {
            Level::System => "$export".to_owned(),
            Level::Patient => "Patient/$export".to_owned(),
            Level::Group(id) => format!("Group/{id}/$export"),
        };
        let request = match q.as_deref() {
            Some(q) if !q.is_empty() => format!("{}/{path}?{q}", a.vault.base_url),
            _ => format!("{}/{path}", a.vault.base_url),
        };
        let asked = export::Asked {
            level,
            pairs: &pairs,
            request: &request,
            e2e,
            expiry_ms: a.export_expiry_ms,
        };
        let id =
            export::kick_off(&a.vault, a.exchange_area()?, &auth, asked).map_err(ApiError::from)?;
        let status = format!("{}/bulk/{id}", a.origin());
        let mut r = StatusCode::ACCEPTED.into_response();
        if let Ok(v) = HeaderValue::from_str(&status) {
            r.headers_mut().insert(header::CONTENT_LOCATION, v);
        }
        Ok(r)
    })
    .await
}

/// `GET /bulk/{job}`: the status.
pub async fn status(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ctx = Ctx::new(peer, Action::R, "export-status");
    run(app, ctx, move |a, ctx| {
        let auth = a.authenticate(&headers, ctx)?;
        let files_url = format!("{}/bulk/{job}", a.origin());
        match export::status(&a.vault, a.exchange_area()?, &auth, &job).map_err(ApiError::from)? {
            Status::Running(p) => {
                let mut r = StatusCode::ACCEPTED.into_response();
                if let Ok(v) = HeaderValue::from_str(&p) {
                    r.headers_mut().insert("x-progress", v);
                }
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(export::RETRY_AFTER_S),
                );
                Ok(r)
            }
            Status::Failed(m) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                phivault_fhir::IssueCode::Exception,
                if m.is_empty() {
                    "the export failed".to_owned()
                } else {
                    m
                },
            )),
            Status::Done(rec) => {
                let body = export::manifest(&rec, &files_url).to_string();
                let mut r = json_response(StatusCode::OK, Bytes::from(body), "application/json");
                let expires =
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(rec.expires_ms);
                if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(expires)) {
                    r.headers_mut().insert(header::EXPIRES, v);
                }
                Ok(r)
            }
        }
    })
    .await
}

/// `DELETE /bulk/{job}`: cancel; its files are removed.
pub async fn cancel(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ctx = Ctx::new(peer, Action::D, "export-cancel");
    run(app, ctx, move |a, ctx| {
        let auth = a.authenticate(&headers, ctx)?;
        export::cancel(&a.vault, a.exchange_area()?, &auth, &job).map_err(ApiError::from)?;
        Ok(StatusCode::ACCEPTED.into_response())
    })
    .await
}

/// `GET /bulk/{job}/{kind}/{n}` (`file` or `error`): the file, streamed as it is opened;
/// the audit event (with every patient the file holds) is durable before the first byte.
pub async fn file(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((job, kind, n)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = Ctx::new(peer, Action::R, "export-file");
    let a = app.clone();
    let opened = blocking(move || {
        let r = (|| {
            let auth = a.authenticate(&headers, &mut ctx)?;
            let error = match kind.as_str() {
                "file" => false,
                "error" => true,
                _ => return Err(ApiError::not_found("no such file")),
            };
            let n: usize = n.parse().map_err(|_| ApiError::not_found("no such file"))?;
            let d = export::open_file(&a.vault, a.exchange_area()?, &auth, &job, error, n)
                .map_err(ApiError::from)?;
            ctx.rtype = Some(d.rtype.clone());
            ctx.id = Some(job.clone());
            ctx.entities = phivault_audit::Entity::patients(&d.patients);
            Ok(d)
        })();
        Ok((ctx, r))
    })
    .await;
    let (ctx, d) = match opened {
        Ok((ctx, Ok(d))) => (ctx, d),
        Ok((ctx, Err(e))) => return finish(&app, ctx, Err(e)).await,
        Err(e) => return finish(&app, Ctx::new(peer, Action::R, "export-file"), Err(e)).await,
    };
    // audit first (fail closed), then stream
    let ok = finish(&app, ctx, Ok(StatusCode::OK.into_response())).await;
    if ok.status() != StatusCode::OK {
        return ok;
    }
    // each piece read off the async threads under the blocking permits (a slow reader
    // holds none while its bytes travel), a few pieces ahead of the client
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut body = Some(d.body);
        while let Some(mut b) = body.take() {
            let read = blocking(move || {
                let mut buf = vec![0u8; 256 << 10];
                let mut n = 0;
                while n < buf.len() {
                    match b.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) => return Ok((b, Err(e))),
                    }
                }
                buf.truncate(n);
                Ok((b, Ok(buf)))
            })
            .await;
            let piece = match read {
                Ok((_, Ok(buf))) if buf.is_empty() => return,
                Ok((b, Ok(buf))) => {
                    body = Some(b);
                    Ok(Bytes::from(buf))
                }
                Ok((_, Err(e))) => {
                    // a file that fails its check mid-way: the response is cut, never
                    // completed with what did not open
                    tracing::warn!("an export file failed its integrity check while served");
                    Err(e)
                }
                Err(_) => Err(std::io::Error::other("unavailable")),
            };
            if tx.send(piece).await.is_err() {
                return;
            }
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.headers_mut() = ok.headers().clone();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(d.content_type),
    );
    resp
}
