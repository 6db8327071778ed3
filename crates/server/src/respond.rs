//! Translating one resource version to and from HTTP: bodies in (content type, size
//! limit, parse and validate), responses out (ETag, Last-Modified, Location), ids and
//! ETags.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use phivault_fhir::IssueCode;
use serde_json::Value;

use crate::FHIR_JSON;
use crate::error::ApiError;
use crate::state::App;

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
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{}/{rtype}/{id}/_history/{version}",
            app.vault.base_url
        ))
    {
        h.insert(header::LOCATION, v);
    }
    resp
}

/// `200` with `value` as `application/json` (the operational endpoints: alerts, key
/// rotation, backups).
pub(crate) fn json_ok(value: &serde_json::Value) -> Result<Response, crate::error::ApiError> {
    let body = serde_json::to_vec(value).map_err(|_| crate::error::ApiError::internal())?;
    Ok(json_response(
        StatusCode::OK,
        Bytes::from(body),
        "application/json",
    ))
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

pub(crate) fn parse_if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
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
