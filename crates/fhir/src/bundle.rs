//! Batch/transaction Bundle parsing.

use std::collections::HashSet;

use serde_json::Value;

use crate::{FhirError, is_known_resource_type, is_valid_id};

/// `Bundle.type` values this server processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleType {
    Batch,
    Transaction,
}

/// `Bundle.entry.request.method` values this server processes (PATCH/HEAD are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

/// One parsed `Bundle.entry`.
///
/// URL forms, by method:
/// - GET `Type` (search; `query` holds the raw query string), `Type/id` (read),
///   `Type/id/_history/vid` (vread)
/// - POST `Type` (create; `if_none_exist` for conditional create)
/// - PUT `Type/id` (update) or `Type?query` (conditional update)
/// - DELETE `Type/id` or `Type?query` (conditional delete)
///
/// `resource` is `Some` exactly for POST and PUT, and then its `resourceType` equals
/// `resource_type`. `Debug` redacts the resource and the query strings (they hold PHI).
#[derive(Clone, PartialEq)]
pub struct EntryRequest {
    pub index: usize,
    pub full_url: Option<String>,
    pub method: Method,
    pub resource_type: String,
    pub id: Option<String>,
    pub vid: Option<String>,
    pub query: Option<String>,
    pub if_none_exist: Option<String>,
    pub if_match: Option<String>,
    pub resource: Option<Value>,
}

impl std::fmt::Debug for EntryRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "[redacted]");
        f.debug_struct("EntryRequest")
            .field("index", &self.index)
            .field("full_url", &redact(&self.full_url))
            .field("method", &self.method)
            .field("resource_type", &self.resource_type)
            .field("id", &self.id)
            .field("vid", &self.vid)
            .field("query", &redact(&self.query))
            .field("if_none_exist", &redact(&self.if_none_exist))
            .field("if_match", &self.if_match)
            .field("resource", &self.resource.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

fn entry_err(index: usize, reason: &'static str) -> FhirError {
    FhirError::Entry { index, reason }
}

/// Parse a batch/transaction Bundle (already parsed JSON; validate it with
/// [`crate::validate`] as well).
///
/// Checks: `resourceType` is `Bundle`; `type` is `batch` or `transaction`; at most
/// `max_entries` entries; each entry has `request.method` (GET/POST/PUT/DELETE; PATCH and HEAD
/// are refused as not supported) and a relative `request.url` naming a known resource type
/// (absolute URLs, `..`, fragments, empty segments and invalid ids are refused); POST and PUT
/// carry a resource of the URL's type; a PUT's URL id equals `resource.id` when present;
/// `fullUrl`s are unique within a transaction. Errors name the entry index.
pub fn parse_bundle(
    bundle: &Value,
    max_entries: usize,
) -> Result<(BundleType, Vec<EntryRequest>), FhirError> {
    parse_bundle_impl(bundle, max_entries, true)
}

/// [`parse_bundle`] consuming the Bundle: entry resources are moved, not copied.
pub fn parse_bundle_owned(
    mut bundle: Value,
    max_entries: usize,
) -> Result<(BundleType, Vec<EntryRequest>), FhirError> {
    let (kind, mut entries) = parse_bundle_impl(&bundle, max_entries, false)?;
    if let Some(Value::Array(raw)) = bundle.get_mut("entry") {
        for e in &mut entries {
            if matches!(e.method, Method::Post | Method::Put)
                && let Some(r) = raw.get_mut(e.index).and_then(|x| x.get_mut("resource"))
            {
                e.resource = Some(r.take());
            }
        }
    }
    Ok((kind, entries))
}

fn parse_bundle_impl(
    bundle: &Value,
    max_entries: usize,
    copy_resources: bool,
) -> Result<(BundleType, Vec<EntryRequest>), FhirError> {
    let obj = bundle.as_object().ok_or(FhirError::NotAnObject)?;
    if obj.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(FhirError::NotABundle);
    }
    let kind = match obj.get("type").and_then(Value::as_str) {
        Some("batch") => BundleType::Batch,
        Some("transaction") => BundleType::Transaction,
        _ => return Err(FhirError::UnsupportedBundleType),
    };
    let entries: &[Value] = match obj.get("entry") {
        None => &[],
        Some(Value::Array(a)) => a,
        Some(_) => return Err(FhirError::NotABundle),
    };
    if entries.len() > max_entries {
        return Err(FhirError::TooManyEntries { max: max_entries });
    }
    let mut out = Vec::with_capacity(entries.len());
    let mut full_urls = HashSet::new();
    for (index, entry) in entries.iter().enumerate() {
        let e = parse_entry(index, entry, copy_resources)?;
        if kind == BundleType::Transaction
            && let Some(u) = &e.full_url
            && !full_urls.insert(u.clone())
        {
            return Err(entry_err(index, "duplicate fullUrl"));
        }
        out.push(e);
    }
    Ok((kind, out))
}

fn opt_string(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    index: usize,
    reason: &'static str,
) -> Result<Option<String>, FhirError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(entry_err(index, reason)),
    }
}

struct Url {
    resource_type: String,
    id: Option<String>,
    vid: Option<String>,
    query: Option<String>,
}

fn parse_url(index: usize, url: &str) -> Result<Url, FhirError> {
    let bad = |reason| entry_err(index, reason);
    if url.is_empty() {
        return Err(bad("request.url is empty"));
    }
    if url.contains("://") || url.starts_with("//") || url.starts_with("urn:") {
        return Err(bad("request.url must be relative to this server"));
    }
    if url
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'\\' || b == b'#')
    {
        return Err(bad("request.url contains forbidden characters"));
    }
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, (!q.is_empty()).then(|| q.to_owned())),
        None => (url, None),
    };
    let path = path.strip_prefix('/').unwrap_or(path);
    let segs: Vec<&str> = path.split('/').collect();
    if segs.iter().any(|s| *s == ".." || *s == ".") {
        return Err(bad("request.url must not contain dot segments"));
    }
    let (rt, id, vid) = match segs.as_slice() {
        [rt] => (*rt, None, None),
        [rt, id] => (*rt, Some(*id), None),
        [rt, id, "_history", vid] => (*rt, Some(*id), Some(*vid)),
        _ => return Err(bad("request.url has an unsupported form")),
    };
    if rt.is_empty() {
        return Err(bad("request.url is missing the resource type"));
    }
    if !is_known_resource_type(rt) {
        return Err(bad("request.url names an unknown resource type"));
    }
    if id.is_some_and(|i| !is_valid_id(i)) {
        return Err(bad("request.url has an invalid id"));
    }
    if vid.is_some_and(|v| !is_valid_id(v)) {
        return Err(bad("request.url has an invalid version id"));
    }
    Ok(Url {
        resource_type: rt.to_owned(),
        id: id.map(str::to_owned),
        vid: vid.map(str::to_owned),
        query,
    })
}

fn parse_entry(index: usize, entry: &Value, copy: bool) -> Result<EntryRequest, FhirError> {
    let bad = |reason| entry_err(index, reason);
    let entry = entry.as_object().ok_or(bad("entry must be an object"))?;
    let request = entry
        .get("request")
        .and_then(Value::as_object)
        .ok_or(bad("request is missing"))?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some("PATCH") => {
            return Err(FhirError::UnsupportedMethod {
                index,
                method: "PATCH",
            });
        }
        Some("HEAD") => {
            return Err(FhirError::UnsupportedMethod {
                index,
                method: "HEAD",
            });
        }
        Some(_) => return Err(bad("request.method is not a valid HTTP method")),
        None => return Err(bad("request.method is missing")),
    };
    let url = match request.get("url") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(bad("request.url is missing")),
    };
    let url = parse_url(index, url)?;
    let full_url = opt_string(
        entry,
        "fullUrl",
        index,
        "fullUrl must be a non-empty string",
    )?;
    let if_none_exist = opt_string(
        request,
        "ifNoneExist",
        index,
        "request.ifNoneExist must be a non-empty string",
    )?;
    let if_match = opt_string(
        request,
        "ifMatch",
        index,
        "request.ifMatch must be a non-empty string",
    )?;

    match method {
        Method::Get => {}
        Method::Post => {
            if url.id.is_some() {
                return Err(bad("POST url must be a resource type only"));
            }
            if url.query.is_some() {
                return Err(bad("POST url must not have a query; use ifNoneExist"));
            }
        }
        Method::Put | Method::Delete => {
            if url.vid.is_some() {
                return Err(bad("url with _history is only allowed for GET"));
            }
            if url.id.is_none() && url.query.is_none() {
                return Err(bad("url needs an id or a conditional query"));
            }
            if url.id.is_some() && url.query.is_some() {
                return Err(bad("url must not have both an id and a query"));
            }
        }
    }
    if method != Method::Get && url.vid.is_some() {
        return Err(bad("url with _history is only allowed for GET"));
    }
    if method == Method::Get && url.vid.is_some() && url.query.is_some() {
        return Err(bad("vread url must not have a query"));
    }

    let resource = match method {
        Method::Post | Method::Put => {
            let r = entry
                .get("resource")
                .ok_or(bad("resource is required for POST and PUT"))?;
            let ro = r.as_object().ok_or(bad("resource must be an object"))?;
            match ro.get("resourceType").and_then(Value::as_str) {
                Some(t) if t == url.resource_type => {}
                Some(_) => return Err(bad("resource.resourceType does not match request.url")),
                None => return Err(bad("resource.resourceType is missing")),
            }
            if method == Method::Put
                && let (Some(url_id), Some(rid)) = (&url.id, ro.get("id"))
                && rid.as_str() != Some(url_id.as_str())
            {
                return Err(bad("resource.id does not match the id in request.url"));
            }
            copy.then(|| r.clone())
        }
        Method::Get | Method::Delete => None,
    };

    Ok(EntryRequest {
        index,
        full_url,
        method,
        resource_type: url.resource_type,
        id: url.id,
        vid: url.vid,
        query: url.query,
        if_none_exist,
        if_match,
        resource,
    })
}

/// FHIR transaction processing order: DELETE, then POST, then PUT, then GET; stable within a
/// method. Returns positions into `entries` (for [`parse_bundle`]'s output these equal
/// [`EntryRequest::index`]).
pub fn transaction_order(entries: &[EntryRequest]) -> Vec<usize> {
    let rank = |m: Method| match m {
        Method::Delete => 0u8,
        Method::Post => 1,
        Method::Put => 2,
        Method::Get => 3,
    };
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries.get(i).map_or(u8::MAX, |e| rank(e.method)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bundle(kind: &str, entries: Value) -> Value {
        json!({"resourceType": "Bundle", "type": kind, "entry": entries})
    }

    fn one(entry: Value) -> Result<EntryRequest, FhirError> {
        parse_bundle(&bundle("batch", json!([entry])), 10)
            .map(|(_, mut v)| v.pop())
            .and_then(|e| e.ok_or(FhirError::NotABundle))
    }

    fn reason(r: Result<EntryRequest, FhirError>) -> &'static str {
        match r {
            Err(FhirError::Entry { reason, .. }) => reason,
            other => panic!("expected entry error, got {other:?}"),
        }
    }

    #[test]
    fn parses_all_forms() {
        let b = bundle(
            "transaction",
            json!([
                {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                 "resource": {"resourceType": "Patient"},
                 "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=a|b"}},
                {"resource": {"resourceType": "Patient", "id": "p1"},
                 "request": {"method": "PUT", "url": "Patient/p1", "ifMatch": "W/\"2\""}},
                {"resource": {"resourceType": "Patient"},
                 "request": {"method": "PUT", "url": "Patient?identifier=x|y"}},
                {"request": {"method": "DELETE", "url": "Observation/o1"}},
                {"request": {"method": "DELETE", "url": "Observation?code=1"}},
                {"request": {"method": "GET", "url": "Patient?name=x&_count=5"}},
                {"request": {"method": "GET", "url": "Patient/p1"}},
                {"request": {"method": "GET", "url": "/Patient/p1/_history/2"}},
                {"request": {"method": "GET", "url": "Patient"}}
            ]),
        );
        let (kind, e) = parse_bundle(&b, 100).unwrap_or((BundleType::Batch, vec![]));
        assert_eq!(kind, BundleType::Transaction);
        assert_eq!(e.len(), 9);
        assert_eq!(e[0].method, Method::Post);
        assert_eq!(e[0].if_none_exist.as_deref(), Some("identifier=a|b"));
        assert!(e[0].full_url.is_some() && e[0].resource.is_some() && e[0].id.is_none());
        assert_eq!(e[1].id.as_deref(), Some("p1"));
        assert_eq!(e[1].if_match.as_deref(), Some("W/\"2\""));
        assert_eq!(e[2].query.as_deref(), Some("identifier=x|y"));
        assert_eq!(e[2].id, None);
        assert_eq!(
            (e[3].method, e[3].id.as_deref()),
            (Method::Delete, Some("o1"))
        );
        assert_eq!(e[3].resource, None);
        assert_eq!(e[4].query.as_deref(), Some("code=1"));
        assert_eq!(e[5].query.as_deref(), Some("name=x&_count=5"));
        assert_eq!(e[6].id.as_deref(), Some("p1"));
        assert_eq!(e[7].vid.as_deref(), Some("2"));
        assert_eq!(e[8].resource_type, "Patient");
        assert!(e.iter().enumerate().all(|(i, x)| x.index == i));
        let dbg = format!("{:?}", e[5]);
        assert!(!dbg.contains("name=x"), "{dbg}");

        let empty = json!({"resourceType": "Bundle", "type": "batch"});
        assert_eq!(
            parse_bundle(&empty, 10).map(|(k, v)| (k, v.len())),
            Ok((BundleType::Batch, 0))
        );
    }

    #[test]
    fn bundle_level_errors() {
        assert_eq!(
            parse_bundle(&json!([]), 10).err(),
            Some(FhirError::NotAnObject)
        );
        assert_eq!(
            parse_bundle(&json!({"resourceType": "Patient"}), 10).err(),
            Some(FhirError::NotABundle)
        );
        for t in ["searchset", "collection", "document", "history"] {
            assert_eq!(
                parse_bundle(&bundle(t, json!([])), 10).err(),
                Some(FhirError::UnsupportedBundleType)
            );
        }
        assert_eq!(
            parse_bundle(&json!({"resourceType": "Bundle"}), 10).err(),
            Some(FhirError::UnsupportedBundleType)
        );
        let many = bundle(
            "batch",
            Value::Array(vec![
                json!({"request": {"method": "GET", "url": "Patient"}});
                3
            ]),
        );
        assert_eq!(
            parse_bundle(&many, 2).err(),
            Some(FhirError::TooManyEntries { max: 2 })
        );
        assert!(parse_bundle(&many, 3).is_ok());
        let dup = bundle(
            "transaction",
            json!([
                {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
                {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}
            ]),
        );
        assert_eq!(
            parse_bundle(&dup, 10).err(),
            Some(FhirError::Entry {
                index: 1,
                reason: "duplicate fullUrl"
            })
        );
    }

    #[test]
    fn entry_errors() {
        let get = |url: &str| json!({"request": {"method": "GET", "url": url}});
        for url in [
            "",
            "https://evil.example/fhir/Patient/1",
            "http://localhost/Patient",
            "//evil.example/Patient",
            "Patient/../Observation/1",
            "../Patient",
            "Patient/./1",
            "Patient/a b",
            "Patient/1#frag",
            "Nope/1",
            "patient/1",
            "Patient/1/_history",
            "Patient/1/_history/2/x",
            "Patient//1",
            "Patient/$everything",
            "/",
            "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
        ] {
            assert!(
                matches!(one(get(url)), Err(FhirError::Entry { index: 0, .. })),
                "{url:?} accepted"
            );
        }
        assert_eq!(
            one(json!({"request": {"method": "PATCH", "url": "Patient/1"}})),
            Err(FhirError::UnsupportedMethod {
                index: 0,
                method: "PATCH"
            })
        );
        assert_eq!(
            reason(one(
                json!({"request": {"method": "FROB", "url": "Patient"}})
            )),
            "request.method is not a valid HTTP method"
        );
        assert_eq!(
            reason(one(json!({"request": {"url": "Patient"}}))),
            "request.method is missing"
        );
        assert_eq!(
            reason(one(json!({"request": {"method": "GET"}}))),
            "request.url is missing"
        );
        assert_eq!(
            reason(one(json!({"resource": {"resourceType": "Patient"}}))),
            "request is missing"
        );
        assert_eq!(reason(one(json!(5))), "entry must be an object");
        assert_eq!(
            reason(one(
                json!({"request": {"method": "POST", "url": "Patient"}})
            )),
            "resource is required for POST and PUT"
        );
        assert_eq!(
            reason(one(
                json!({"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Patient"}})
            )),
            "resource.resourceType does not match request.url"
        );
        assert_eq!(
            reason(one(
                json!({"resource": {"resourceType": "Patient", "id": "b"}, "request": {"method": "PUT", "url": "Patient/a"}})
            )),
            "resource.id does not match the id in request.url"
        );
        assert_eq!(
            reason(one(
                json!({"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": "Patient"}})
            )),
            "url needs an id or a conditional query"
        );
        assert_eq!(
            reason(one(
                json!({"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient/1"}})
            )),
            "POST url must be a resource type only"
        );
        assert_eq!(
            reason(one(
                json!({"request": {"method": "DELETE", "url": "Patient/1/_history/1"}})
            )),
            "url with _history is only allowed for GET"
        );
        assert_eq!(
            reason(one(
                json!({"request": {"method": "DELETE", "url": "Patient"}})
            )),
            "url needs an id or a conditional query"
        );
        assert_eq!(
            reason(one(
                json!({"fullUrl": 5, "request": {"method": "GET", "url": "Patient"}})
            )),
            "fullUrl must be a non-empty string"
        );
        // The entry index is reported.
        let b = bundle(
            "batch",
            json!([{"request": {"method": "GET", "url": "Patient"}}, {"request": {"method": "GET", "url": "x/../y"}}]),
        );
        assert!(matches!(
            parse_bundle(&b, 10),
            Err(FhirError::Entry { index: 1, .. })
        ));
        // PUT with id matching, or resource without id, is fine.
        assert!(one(json!({"resource": {"resourceType": "Patient", "id": "a"}, "request": {"method": "PUT", "url": "Patient/a"}})).is_ok());
        assert!(one(json!({"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": "Patient/a"}})).is_ok());
    }

    #[test]
    fn errors_do_not_echo_input() {
        let e = one(json!({"request": {"method": "GET", "url": "SECRET/../x"}}));
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.starts_with("Bundle.entry[0]: "), "{msg}");
        assert!(!msg.contains("SECRET"));
    }

    #[test]
    fn order() {
        let mk = |i: usize, m: Method| EntryRequest {
            index: i,
            full_url: None,
            method: m,
            resource_type: "Patient".into(),
            id: None,
            vid: None,
            query: None,
            if_none_exist: None,
            if_match: None,
            resource: None,
        };
        let e = vec![
            mk(0, Method::Get),
            mk(1, Method::Put),
            mk(2, Method::Post),
            mk(3, Method::Delete),
            mk(4, Method::Post),
            mk(5, Method::Get),
            mk(6, Method::Delete),
            mk(7, Method::Put),
        ];
        assert_eq!(transaction_order(&e), vec![3, 6, 2, 4, 1, 7, 0, 5]);
        assert!(transaction_order(&[]).is_empty());
    }
}
