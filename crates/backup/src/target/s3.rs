//! The `s3://BUCKET/PREFIX?endpoint=https://HOST:PORT&region=REGION` target: objects
//! `PREFIX/NAME` in an S3 bucket, path-style (`ENDPOINT/BUCKET/PREFIX/NAME`), every request
//! signed with SigV4 ([`phivault_keys::sigv4`]) over ureq (rustls, ring): no AWS SDK.
//!
//! - Options: `endpoint` (default `https://s3.REGION.amazonaws.com`; plain http only to a
//!   loopback test server), `region` (default `AWS_REGION`, else `AWS_DEFAULT_REGION`),
//!   `max-keys` (a listing's page size, 1–1000, default 1000). Credentials come the AWS
//!   way ([`phivault_keys::awskms::credentials`]).
//! - A put carries `x-amz-checksum-sha256` (S3 checks it) and, with `retain_until`,
//!   `x-amz-object-lock-mode: COMPLIANCE` with its retain-until date.
//! - Timeouts: connect 5 s, a whole request 60 s (a large body must move within it).
//!   Answers are read up to 1 GiB.
//! - Errors: unreachable endpoint, 5xx and S3's throttling codes are
//!   [`TargetError::Unavailable`]; other refusals are [`TargetError::Refused`] with S3's
//!   error code and the operation; a DELETE answered `AccessDenied` for a version whose
//!   retention has not ended (or under a legal hold; HEAD object's lock headers) is
//!   [`TargetError::Locked`].
//! - Delete on a lock bucket (versioned), as moto 5.2 does it (tested) and AWS documents:
//!   a plain DELETE succeeds and adds a delete marker (the object no longer gets or lists;
//!   the locked version stays, see [`S3Target::version_ids`]); a DELETE of that version
//!   ([`S3Target::delete_version`]) is refused `AccessDenied` (HTTP 403) until the
//!   retention ends, and the object stays readable by its version.
//! - The XML answers (ListObjectsV2, ListObjectVersions, errors) are read by a small
//!   scanner of the few flat elements needed (no CDATA, no nesting of a tag in itself, as
//!   S3 writes them); the five XML entities and numeric references are unescaped. A full
//!   XML parser (quick-xml) would add a dependency for five tag names.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use phivault_keys::awskms;
use phivault_keys::sigv4::{self, Credentials};

use super::{Target, TargetError, check_name};

/// Largest answer read (an object).
const MAX_BODY: u64 = 1 << 30;
/// A whole request's timeout.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The URL's parts, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Location {
    bucket: String,
    /// Empty, or ending with `/`.
    prefix: String,
    region: String,
    /// `scheme://host[:port]`.
    endpoint: String,
    /// The `host` header.
    host: String,
    max_keys: u32,
}

/// An S3 bucket (and key prefix) holding objects.
pub struct S3Target {
    loc: Location,
    agent: ureq::Agent,
    creds: Credentials,
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Target")
            .field("target", &self.describe())
            .field("access_key_id", &self.creds.access_key_id)
            .finish_non_exhaustive()
    }
}

/// An answer: status, headers and body.
struct Answer {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
    /// S3's error code (`<Error><Code>`), if the body carries one.
    fn code(&self) -> Option<String> {
        first(&self.text(), "Code").and_then(unescape)
    }
}

fn config(why: impl Into<String>) -> TargetError {
    TargetError::Config(why.into())
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn check_bucket(bucket: &str) -> Result<(), TargetError> {
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && edge(bucket.as_bytes().first())
        && edge(bucket.as_bytes().last())
        && !bucket.contains("..")
    {
        Ok(())
    } else {
        Err(config(format!(
            "{bucket:?} is not an S3 bucket name (3 to 63 of a-z 0-9 . -)"
        )))
    }
}

/// Parse an `s3://` URL; `env_region` is the region of the environment (the default).
fn parse_url(url: &str, env_region: Option<String>) -> Result<Location, TargetError> {
    let usage = "an S3 target is s3://BUCKET/PREFIX?endpoint=https://HOST:PORT&region=REGION";
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| config(usage.to_owned()))?;
    if rest.contains('#') {
        return Err(config(format!("{url:?}: no #fragment in {usage}")));
    }
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    check_bucket(bucket)?;
    let prefix = prefix.trim_end_matches('/');
    if !prefix.is_empty() && check_name(prefix).is_err() {
        return Err(config(format!(
            "{prefix:?} is not a key prefix ([a-z0-9._-] segments joined by /)"
        )));
    }
    let (mut endpoint, mut region, mut max_keys) = (None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)
            .ok_or_else(|| config(format!("{url:?}: the value of {k} is badly %-encoded")))?;
        let slot = match k {
            "endpoint" => &mut endpoint,
            "region" => &mut region,
            "max-keys" => &mut max_keys,
            _ => {
                return Err(config(format!(
                    "{url:?}: unknown option {k:?} (endpoint, region, max-keys)"
                )));
            }
        };
        if slot.replace(v).is_some() {
            return Err(config(format!("{url:?}: {k} is given twice")));
        }
    }
    let region = region
        .or(env_region)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            config(format!(
                "{url:?}: which AWS region? add region=REGION to the URL (or set AWS_REGION)"
            ))
        })?;
    awskms::check_region(&region).map_err(|e| config(e.to_string()))?;
    let endpoint = endpoint.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let (endpoint, host) =
        awskms::check_endpoint_for("endpoint=", &endpoint).map_err(|e| config(e.to_string()))?;
    let max_keys = match max_keys {
        None => 1000,
        Some(m) => m
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| config(format!("{url:?}: max-keys must be 1 to 1000")))?,
    };
    Ok(Location {
        bucket: bucket.to_owned(),
        prefix: if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        },
        region,
        endpoint,
        host,
        max_keys,
    })
}

/// The contents of each `<tag>…</tag>` (or `<tag/>`) in `xml`, in order.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(gt) = after.find('>') else { break };
        let attrs = &after[..gt];
        if !(attrs.is_empty() || attrs == "/" || attrs.starts_with(|c: char| c.is_whitespace())) {
            // another tag that starts alike (`<KeyCount>` for `<Key>`)
            rest = after;
            continue;
        }
        let inner = &after[gt + 1..];
        if attrs.ends_with('/') {
            out.push("");
            rest = inner;
            continue;
        }
        let Some(end) = inner.find(&close) else { break };
        out.push(&inner[..end]);
        rest = &inner[end + close.len()..];
    }
    out
}

fn first<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    elements(xml, tag).into_iter().next()
}

/// Text with the five XML entities and numeric character references replaced; `None`
/// for a malformed or unknown reference.
fn unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let semi = after.find(';')?;
        let c = match &after[..semi] {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            ent => {
                let n = if let Some(h) = ent.strip_prefix("#x").or(ent.strip_prefix("#X")) {
                    u32::from_str_radix(h, 16).ok()?
                } else {
                    ent.strip_prefix('#')?.parse::<u32>().ok()?
                };
                char::from_u32(n)?
            }
        };
        out.push(c);
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// One page of ListObjectsV2: (key, size) and the continuation token when truncated.
pub type Page = (Vec<(String, u64)>, Option<String>);

/// Read one ListObjectsV2 answer (`None`: not one). Public for the fuzz target: the
/// answer comes from a server phivault does not trust.
pub fn parse_list(xml: &str) -> Option<Page> {
    if !xml.contains("<ListBucketResult") {
        return None;
    }
    let mut items = Vec::new();
    for c in elements(xml, "Contents") {
        let key = unescape(first(c, "Key")?)?;
        let size = first(c, "Size")?.trim().parse::<u64>().ok()?;
        items.push((key, size));
    }
    let next = match first(xml, "IsTruncated").map(str::trim) {
        Some("true") => {
            let token = unescape(first(xml, "NextContinuationToken")?)?;
            if token.is_empty() {
                return None;
            }
            Some(token)
        }
        Some("false") | None => None,
        Some(_) => return None,
    };
    Some((items, next))
}

/// One page of ListObjectVersions for `key`: its versions' ids (not delete markers), and
/// the (key, version id) markers of the next page when truncated.
type VersionPage = (Vec<String>, Option<(String, String)>);

fn parse_versions(xml: &str, key: &str) -> Option<VersionPage> {
    if !xml.contains("<ListVersionsResult") {
        return None;
    }
    let mut ids = Vec::new();
    for v in elements(xml, "Version") {
        if unescape(first(v, "Key")?)? == key {
            ids.push(unescape(first(v, "VersionId")?)?);
        }
    }
    let next = match first(xml, "IsTruncated").map(str::trim) {
        Some("true") => Some((
            unescape(first(xml, "NextKeyMarker")?)?,
            unescape(first(xml, "NextVersionIdMarker")?)?,
        )),
        _ => None,
    };
    Some((ids, next))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Seconds since the epoch as `2026-12-06T10:00:00Z`.
fn rfc3339(unix_secs: u64) -> Result<String, TargetError> {
    let bad = || config(format!("retain-until {unix_secs} is not a date"));
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix_secs).map_err(|_| bad())?)
        .map_err(|_| bad())?;
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .map_err(|_| bad())
}

impl S3Target {
    /// Open the target of an `s3://` URL (nothing is sent yet): the URL checked, the
    /// credentials found, an HTTPS agent trusting `ca_file`'s CAs if given (else Mozilla's).
    pub fn open(url: &str, ca_file: Option<&Path>) -> Result<Self, TargetError> {
        let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let loc = parse_url(url, env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")))?;
        let creds = awskms::credentials().map_err(|e| config(format!("{url}: {e}")))?;
        let agent = awskms::agent(ca_file, TIMEOUT).map_err(|e| config(e.to_string()))?;
        Ok(S3Target { loc, agent, creds })
    }

    fn key(&self, name: &str) -> Result<String, TargetError> {
        check_name(name)?;
        Ok(format!("{}{name}", self.loc.prefix))
    }

    /// One signed request to the bucket (`key` None) or an object; any HTTP status is
    /// an answer, a transport failure an error.
    fn call(
        &self,
        what: &str,
        method: &str,
        key: Option<&str>,
        query: &[(&str, &str)],
        extra: &[(&str, String)],
        body: &[u8],
    ) -> Result<Answer, TargetError> {
        let mut path = format!("/{}", self.loc.bucket);
        if let Some(k) = key {
            path.push('/');
            path.push_str(&sigv4::uri_encode(k, false));
        }
        let mut pairs: Vec<String> = query
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    sigv4::uri_encode(k, true),
                    sigv4::uri_encode(v, true)
                )
            })
            .collect();
        pairs.sort();
        let query = pairs.join("&");
        let payload_hash = sigv4::sha256_hex(body);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let date = sigv4::amz_date(now);
        let mut headers: Vec<(&str, &str)> = vec![
            ("host", &self.loc.host),
            ("x-amz-content-sha256", &payload_hash),
            ("x-amz-date", &date),
        ];
        if let Some(t) = &self.creds.session_token {
            headers.push(("x-amz-security-token", t.as_str()));
        }
        headers.extend(extra.iter().map(|(n, v)| (*n, v.as_str())));
        let signed = sigv4::sign_with_payload_hash(
            &self.creds,
            &self.loc.region,
            "s3",
            &date,
            &sigv4::Request {
                method,
                path: &path,
                query: &query,
                headers: &headers,
                payload: b"",
            },
            &payload_hash,
        );
        let mut uri = format!("{}{path}", self.loc.endpoint);
        if !query.is_empty() {
            uri.push('?');
            uri.push_str(&query);
        }
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("authorization", &signed.authorization);
        for (n, v) in headers.iter().filter(|(n, _)| *n != "host") {
            req = req.header(*n, *v);
        }
        let bad_request = |e: ureq::http::Error| config(format!("{what}: cannot build ({e})"));
        let sent = if method == "PUT" {
            self.agent.run(req.body(body).map_err(bad_request)?)
        } else {
            self.agent.run(req.body(()).map_err(bad_request)?)
        };
        let mut resp = sent.map_err(|e| self.unreachable(what, &e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => TargetError::Refused(format!(
                    "{what} on {}: the answer is larger than {MAX_BODY} bytes",
                    self.describe()
                )),
                e => self.unreachable(what, &e),
            })?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    fn unreachable(&self, what: &str, e: &ureq::Error) -> TargetError {
        if matches!(e, ureq::Error::Tls(_) | ureq::Error::Rustls(_)) {
            TargetError::Refused(format!(
                "{what}: TLS with {} failed ({e}); for a private CA give its CA file",
                self.loc.endpoint
            ))
        } else {
            TargetError::Unavailable(format!(
                "{what}: the S3 endpoint {} is unreachable ({e})",
                self.loc.endpoint
            ))
        }
    }

    /// The error for an answer that is not a success: S3's code and message, the
    /// operation, and what the operator may fix.
    fn failure(&self, what: &str, a: &Answer) -> TargetError {
        let code = a.code().unwrap_or_else(|| "no error code".to_owned());
        let message: String = first(&a.text(), "Message")
            .and_then(unescape)
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        let mut detail = format!("{what} on {}: {code} (HTTP {})", self.describe(), a.status);
        if !message.is_empty() {
            detail.push_str(&format!(": {message}"));
        }
        let hint = match code.as_str() {
            "SignatureDoesNotMatch"
            | "InvalidAccessKeyId"
            | "InvalidToken"
            | "ExpiredToken"
            | "TokenRefreshRequired" => format!(
                "; wrong or expired AWS credentials (access key {})",
                self.creds.access_key_id
            ),
            "AccessDenied" => format!(
                "; the credentials (access key {}) may not do this",
                self.creds.access_key_id
            ),
            "NoSuchBucket" => format!("; there is no bucket {:?}", self.loc.bucket),
            _ => String::new(),
        };
        let transient = matches!(
            code.as_str(),
            "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable"
        );
        if a.status >= 500 || a.status == 429 || transient {
            TargetError::Unavailable(detail)
        } else {
            TargetError::Refused(format!("{detail}{hint}"))
        }
    }

    /// Whether the object's version (the current one when `version` is None) is under a
    /// retention that has not ended or a legal hold: the lock headers of HEAD object
    /// (moto 5.2 has no GetObjectRetention; HEAD shows them on S3 as well).
    fn retained(&self, key: &str, version: Option<&str>) -> bool {
        let q: Vec<(&str, &str)> = version.map(|v| ("versionId", v)).into_iter().collect();
        let Ok(a) = self.call("HEAD object", "HEAD", Some(key), &q, &[], b"") else {
            return false;
        };
        if a.status != 200 {
            return false;
        }
        if a.header("x-amz-object-lock-legal-hold") == Some("ON") {
            return true;
        }
        let Some(until) = a.header("x-amz-object-lock-retain-until-date") else {
            return false;
        };
        match time::OffsetDateTime::parse(
            until.trim(),
            &time::format_description::well_known::Rfc3339,
        ) {
            Ok(t) => t > time::OffsetDateTime::now_utc(),
            // an unreadable date: S3 refused the delete, so count it as running
            Err(_) => true,
        }
    }

    fn delete_key(&self, name: &str, version: Option<&str>) -> Result<(), TargetError> {
        let key = self.key(name)?;
        let q: Vec<(&str, &str)> = version.map(|v| ("versionId", v)).into_iter().collect();
        let what = format!("DELETE object {name}");
        let a = self.call(&what, "DELETE", Some(&key), &q, &[], b"")?;
        match a.status {
            200 | 204 => Ok(()),
            404 if a.code().as_deref() == Some("NoSuchKey") => Ok(()),
            403 if a.code().as_deref() == Some("AccessDenied") && self.retained(&key, version) => {
                Err(TargetError::Locked(name.to_owned()))
            }
            _ => Err(self.failure(&what, &a)),
        }
    }

    /// Remove one version of an object (for an operator pruning by hand after retention);
    /// [`TargetError::Locked`] while its retention runs.
    pub fn delete_version(&self, name: &str, version_id: &str) -> Result<(), TargetError> {
        if version_id.is_empty() {
            return Err(config("an empty version id"));
        }
        self.delete_key(name, Some(version_id))
    }

    /// The ids of the object's versions (delete markers left out), newest first
    /// (ListObjectVersions).
    pub fn version_ids(&self, name: &str) -> Result<Vec<String>, TargetError> {
        let key = self.key(name)?;
        let what = format!("ListObjectVersions {name}");
        let max_keys = self.loc.max_keys.to_string();
        let mut ids = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut q = vec![
                ("versions", ""),
                ("prefix", key.as_str()),
                ("max-keys", max_keys.as_str()),
            ];
            if let Some((k, v)) = &marker {
                q.push(("key-marker", k));
                q.push(("version-id-marker", v));
            }
            let a = self.call(&what, "GET", None, &q, &[], b"")?;
            if a.status != 200 {
                return Err(self.failure(&what, &a));
            }
            let (page, next) =
                parse_versions(&a.text(), &key).ok_or_else(|| self.garbled(&what))?;
            ids.extend(page);
            if next.is_none() {
                break;
            }
            if next == marker {
                return Err(self.garbled(&what));
            }
            marker = next;
        }
        Ok(ids)
    }

    /// Make the bucket (in the URL's region), with Object Lock enabled (and so
    /// versioning) when `object_lock`: for operators' set-up and tests.
    pub fn create_bucket(&self, object_lock: bool) -> Result<(), TargetError> {
        let what = format!("CreateBucket {}", self.loc.bucket);
        let mut extra = Vec::new();
        if object_lock {
            extra.push(("x-amz-bucket-object-lock-enabled", "true".to_owned()));
        }
        let body = if self.loc.region == "us-east-1" {
            String::new()
        } else {
            format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                self.loc.region
            )
        };
        let a = self.call(&what, "PUT", None, &[], &extra, body.as_bytes())?;
        if a.status == 200 {
            Ok(())
        } else {
            Err(self.failure(&what, &a))
        }
    }

    fn garbled(&self, what: &str) -> TargetError {
        TargetError::Refused(format!(
            "{what} on {}: the answer is not S3's XML",
            self.describe()
        ))
    }
}

impl Target for S3Target {
    fn put(&self, name: &str, body: &[u8], retain_until: Option<u64>) -> Result<(), TargetError> {
        let key = self.key(name)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, body);
        let mut extra = vec![
            ("x-amz-checksum-sha256", b64().encode(digest.as_ref())),
            ("x-amz-sdk-checksum-algorithm", "SHA256".to_owned()),
        ];
        if let Some(until) = retain_until {
            extra.push(("x-amz-object-lock-mode", "COMPLIANCE".to_owned()));
            extra.push(("x-amz-object-lock-retain-until-date", rfc3339(until)?));
        }
        let what = format!("PUT object {name}");
        let a = self.call(&what, "PUT", Some(&key), &[], &extra, body)?;
        if a.status == 200 {
            Ok(())
        } else {
            Err(self.failure(&what, &a))
        }
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, TargetError> {
        let key = self.key(name)?;
        let what = format!("GET object {name}");
        let a = self.call(&what, "GET", Some(&key), &[], &[], b"")?;
        match a.status {
            200 => Ok(Some(a.body)),
            404 if a.code().as_deref() == Some("NoSuchKey") => Ok(None),
            _ => Err(self.failure(&what, &a)),
        }
    }

    fn versions(&self, name: &str) -> Result<Vec<Vec<u8>>, TargetError> {
        let key = self.key(name)?;
        let mut out = Vec::new();
        for id in self.version_ids(name)? {
            let what = format!("GET object {name} version");
            let q = [("versionId", id.as_str())];
            let a = self.call(&what, "GET", Some(&key), &q, &[], b"")?;
            match a.status {
                200 => out.push(a.body),
                404 => {}
                _ => return Err(self.failure(&what, &a)),
            }
        }
        Ok(out)
    }

    fn list(&self) -> Result<Vec<(String, u64)>, TargetError> {
        let what = "ListObjectsV2";
        let max_keys = self.loc.max_keys.to_string();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = vec![
                ("list-type", "2"),
                ("prefix", self.loc.prefix.as_str()),
                ("max-keys", max_keys.as_str()),
            ];
            if let Some(t) = &token {
                q.push(("continuation-token", t));
            }
            let a = self.call(what, "GET", None, &q, &[], b"")?;
            if a.status != 200 {
                return Err(self.failure(what, &a));
            }
            let (items, next) = parse_list(&a.text()).ok_or_else(|| self.garbled(what))?;
            for (key, size) in items {
                // keys under the prefix that are no object name are not ours
                if let Some(name) = key.strip_prefix(&self.loc.prefix)
                    && self.key(name).is_ok()
                {
                    out.push((name.to_owned(), size));
                }
            }
            if next.is_none() {
                break;
            }
            if next == token {
                return Err(self.garbled(what));
            }
            token = next;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), TargetError> {
        self.delete_key(name, None)
    }

    fn object_lock(&self) -> Result<bool, TargetError> {
        let what = "GetObjectLockConfiguration";
        let a = self.call(what, "GET", None, &[("object-lock", "")], &[], b"")?;
        match a.status {
            200 => Ok(first(&a.text(), "ObjectLockEnabled").map(str::trim) == Some("Enabled")),
            404 if a.code().as_deref() == Some("ObjectLockConfigurationNotFoundError") => Ok(false),
            _ => Err(self.failure(what, &a)),
        }
    }

    fn describe(&self) -> String {
        format!(
            "s3://{}/{}?endpoint={}&region={}",
            self.loc.bucket,
            self.loc.prefix.trim_end_matches('/'),
            self.loc.endpoint,
            self.loc.region
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Location, TargetError> {
        parse_url(url, None)
    }

    #[test]
    fn urls_name_bucket_prefix_endpoint_and_region() {
        let l = parse("s3://phi-backups/site-a/daily/?endpoint=https://minio.example:9000&region=eu-central-1")
            .expect("parse");
        assert_eq!(
            l,
            Location {
                bucket: "phi-backups".into(),
                prefix: "site-a/daily/".into(),
                region: "eu-central-1".into(),
                endpoint: "https://minio.example:9000".into(),
                host: "minio.example:9000".into(),
                max_keys: 1000,
            }
        );
        let l = parse("s3://bkt?region=us-east-1").expect("no prefix");
        assert_eq!(l.prefix, "");
        assert_eq!(l.endpoint, "https://s3.us-east-1.amazonaws.com");
        assert_eq!(l.host, "s3.us-east-1.amazonaws.com");
        assert_eq!(
            parse("s3://bkt/?region=us-east-1").expect("slash").prefix,
            ""
        );
        // the region of the environment, unless the URL names one
        let l = parse_url("s3://bkt/p", Some("eu-west-3".into())).expect("env region");
        assert_eq!((l.region.as_str(), l.prefix.as_str()), ("eu-west-3", "p/"));
        let l = parse_url("s3://bkt/p?region=eu-north-1", Some("eu-west-3".into())).expect("url");
        assert_eq!(l.region, "eu-north-1");
        let err = parse("s3://bkt/p").expect_err("no region");
        assert!(err.to_string().contains("region="), "{err}");
        // loopback http for test servers, %-encoded values, the page size
        let l =
            parse("s3://bkt/p?endpoint=http%3A%2F%2F127.0.0.1%3A5000&region=us-east-1&max-keys=2")
                .expect("loopback");
        assert_eq!(
            (l.endpoint.as_str(), l.host.as_str(), l.max_keys),
            ("http://127.0.0.1:5000", "127.0.0.1:5000", 2)
        );
        for ok in [
            "s3://bkt?region=us-east-1&endpoint=http://localhost:9000",
            "s3://bkt?region=us-east-1&endpoint=http://[::1]:9000",
            "s3://bkt?region=us-east-1&endpoint=http://127.8.9.10",
        ] {
            parse(ok).expect(ok);
        }
    }

    #[test]
    fn bad_urls_are_refused_before_any_request() {
        for bad in [
            "s3://bkt?region=us-east-1&endpoint=http://s3.example.com",
            "s3://bkt?region=us-east-1&endpoint=http://10.0.0.5:9000",
            "s3://bkt?region=us-east-1&endpoint=http://[2001:db8::1]:9000",
            "s3://bkt?region=us-east-1&endpoint=ftp://127.0.0.1",
            "s3://bkt?region=us-east-1&endpoint=https://host/path",
            "s3://bkt?region=us-east-1&endpoint=https://user@host",
            "s3://bkt?region=EU&endpoint=https://host",
            "s3://bkt?region=us-east-1&region=us-east-2",
            "s3://bkt?region=us-east-1&color=blue",
            "s3://bkt?region=us-east-1&max-keys=0",
            "s3://bkt?region=us-east-1&max-keys=1001",
            "s3://bkt?region=us-east-1&endpoint=%zz",
            "s3://Bucket?region=us-east-1",
            "s3://b?region=us-east-1",
            "s3://-bkt?region=us-east-1",
            "s3://bkt-?region=us-east-1",
            "s3://b..kt?region=us-east-1",
            "s3://bkt_x?region=us-east-1",
            "s3://?region=us-east-1",
            "s3://bkt/UPPER?region=us-east-1",
            "s3://bkt/a/../b?region=us-east-1",
            "s3://bkt/a//b?region=us-east-1",
            "s3://bkt//a?region=us-east-1",
            "s3://bkt/p#frag?region=us-east-1",
            "s4://bkt?region=us-east-1",
        ] {
            assert!(
                matches!(parse(bad), Err(TargetError::Config(_))),
                "{bad}: {:?}",
                parse(bad)
            );
        }
        let err = parse("s3://bkt?region=us-east-1&endpoint=http://10.0.0.5:9000")
            .expect_err("plain http");
        assert!(
            err.to_string().contains("endpoint=") && err.to_string().contains("loopback"),
            "{err}"
        );
        // through the trait's door too, before credentials are looked for
        assert!(matches!(
            super::super::open(
                "s3://bkt?region=us-east-1&endpoint=http://192.168.1.1",
                None
            ),
            Err(TargetError::Config(_))
        ));
    }

    #[test]
    fn list_pages_are_read_with_truncation_and_entities() {
        let page = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>bkt</Name><Prefix>p/</Prefix><KeyCount>3</KeyCount><MaxKeys>3</MaxKeys><IsTruncated>true</IsTruncated>
<Contents><Key>p/a.obj</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>&quot;0cc1&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>
<Contents><Key>p/b&amp;c&lt;&gt;&apos;&quot;&#33;&#x41;</Key><Size>0</Size></Contents>
<Contents><Key>p/big</Key><Size>300000000</Size><Owner><ID>x</ID></Owner></Contents>
<NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=&amp;</NextContinuationToken></ListBucketResult>"#;
        let (items, next) = parse_list(page).expect("page");
        assert_eq!(
            items,
            vec![
                ("p/a.obj".to_owned(), 12),
                ("p/b&c<>'\"!A".to_owned(), 0),
                ("p/big".to_owned(), 300_000_000)
            ]
        );
        assert_eq!(
            next.as_deref(),
            Some("1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=&")
        );
        let last = "<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>x</Key><Size>1</Size></Contents></ListBucketResult>";
        assert_eq!(parse_list(last), Some((vec![("x".to_owned(), 1)], None)));
        let empty = "<ListBucketResult><Name>b</Name><Prefix/><KeyCount>0</KeyCount><IsTruncated>false</IsTruncated></ListBucketResult>";
        assert_eq!(parse_list(empty), Some((vec![], None)));
        for bad in [
            "<Error><Code>NoSuchBucket</Code></Error>",
            // truncated without a token
            "<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>",
            "<ListBucketResult><Contents><Key>x</Key><Size>-1</Size></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>x</Key></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>a&bogus;</Key><Size>1</Size></Contents></ListBucketResult>",
            "<ListBucketResult><Contents><Key>a&amp</Key><Size>1</Size></Contents></ListBucketResult>",
        ] {
            assert_eq!(parse_list(bad), None, "{bad}");
        }
    }

    #[test]
    fn versions_errors_and_dates_are_read() {
        let xml = "<ListVersionsResult><IsTruncated>true</IsTruncated><NextKeyMarker>p/a</NextKeyMarker><NextVersionIdMarker>v1</NextVersionIdMarker>\
<DeleteMarker><Key>p/a</Key><VersionId>dm</VersionId></DeleteMarker>\
<Version><Key>p/a</Key><VersionId>v2</VersionId><IsLatest>false</IsLatest></Version>\
<Version><Key>p/a.x</Key><VersionId>other</VersionId></Version>\
<Version><Key>p/a</Key><VersionId>v1</VersionId></Version></ListVersionsResult>";
        assert_eq!(
            parse_versions(xml, "p/a"),
            Some((
                vec!["v2".to_owned(), "v1".to_owned()],
                Some(("p/a".to_owned(), "v1".to_owned()))
            ))
        );
        let err = Answer {
            status: 403,
            headers: ureq::http::HeaderMap::new(),
            body: b"<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature &amp; more</Message><RequestId>1</RequestId></Error>".to_vec(),
        };
        assert_eq!(err.code().as_deref(), Some("SignatureDoesNotMatch"));
        assert_eq!(
            elements("<a>1</a><ab>2</ab><a x=\"y\">3</a><a/>", "a"),
            vec!["1", "3", ""]
        );
        assert_eq!(
            rfc3339(1_796_551_200).expect("date"),
            "2026-12-06T10:00:00Z"
        );
        assert_eq!(rfc3339(0).expect("epoch"), "1970-01-01T00:00:00Z");
        assert_eq!(unescape("plain"), Some("plain".to_owned()));
        assert_eq!(unescape("&#0;x").map(|s| s.len()), Some(2));
        assert_eq!(unescape("&#xD800;"), None);
    }
}
