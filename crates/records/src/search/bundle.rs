//! The searchset Bundle of a page, written out from the matches' stored bytes (no
//! re-serialisation), with `_elements` subsets, the `self` link (the query as the server
//! applied it) and the `next` link's sealed cursor.

use serde_json::{Value, json};

use super::{Loaded, Page};
use crate::Error;
use crate::Vault;
use crate::engine::{instant, now_ms};

/// Keep only the `_elements` asked for (plus the mandatory ones) and mark the resource
/// SUBSETTED.
pub(super) fn subset(mut v: Value, elements: &[String]) -> Value {
    if let Some(obj) = v.as_object_mut() {
        obj.retain(|k, _| {
            k == "resourceType" || k == "id" || k == "meta" || elements.iter().any(|e| e == k)
        });
        let meta = obj.entry("meta").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            let tags = m.entry("tag").or_insert_with(|| json!([]));
            if let Some(t) = tags.as_array_mut() {
                t.push(json!({
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                    "code": "SUBSETTED"
                }));
            }
        }
    }
    v
}

/// The `self` link of a page searched at `path` (`{base}/{Type}` or
/// `{base}/Patient/{id}/{Type}`): the parameters the search applied
/// ([`phivault_fhir::search::SearchQuery::applied`], percent-encoded), so that following
/// it repeats the search, whether it came as a GET, a POST `_search` or a cursor. A
/// continued page adds the sealed `_cursor` it was asked for with: the link names that
/// page, and the server accepts a cursor beside the very parameters it was issued for.
/// The values are the client's own search values, sent back to it only in this response
/// (which is never stored: `Cache-Control: no-store`); the cursor's contents stay sealed.
fn self_link(path: &str, page: &Page) -> String {
    let mut url = format!("{path}?{}", page.query.self_query());
    if let Some(c) = &page.cursor {
        if !url.ends_with('?') {
            url.push('&');
        }
        url.push_str("_cursor=");
        url.push_str(c);
    }
    if url.ends_with('?') {
        url.pop();
    }
    url
}

/// The searchset Bundle of a page searched at `path` (its `self` link: `self_link`).
pub fn bundle(app: &Vault, page: Page, path: &str) -> Result<Vec<u8>, Error> {
    let size: usize = page
        .matches
        .iter()
        .chain(&page.included)
        .map(|l| l.body.len() + 128)
        .sum();
    let mut out = Vec::with_capacity(size + 512);
    write_head(&mut out)?;
    out.extend_from_slice(br#","link":"#);
    let mut links = vec![json!({"relation": "self", "url": self_link(path, &page)})];
    if let Some(n) = &page.next {
        links.push(json!({
            "relation": "next",
            "url": format!("{}/{}?_cursor={n}", app.base_url, page.query.rtype),
        }));
    }
    write_json(&mut out, &Value::Array(links))?;
    if let Some(t) = page.total {
        out.extend_from_slice(br#","total":"#);
        out.extend_from_slice(t.to_string().as_bytes());
    }
    if page.warnings.is_empty() && page.matches.is_empty() && page.included.is_empty() {
        // no entries (a count, an empty page): FHIR JSON has no empty arrays
        out.push(b'}');
        return Ok(out);
    }
    out.extend_from_slice(br#","entry":["#);
    let mut first = true;
    if !page.warnings.is_empty() {
        first = false;
        write_json(
            &mut out,
            &json!({
                "resource": phivault_fhir::operation_outcome(&page.warnings),
                "search": {"mode": "outcome"},
            }),
        )?;
    }
    let elements = page.query.elements.as_deref();
    for (l, mode) in page
        .matches
        .into_iter()
        .map(|l| (l, "match"))
        .chain(page.included.into_iter().map(|l| (l, "include")))
    {
        if !first {
            out.push(b',');
        }
        first = false;
        let subset_of = elements.filter(|_| mode == "match");
        write_entry(&mut out, &app.base_url, l, mode, subset_of)?;
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

pub(super) fn write_json(out: &mut Vec<u8>, v: &Value) -> Result<(), Error> {
    serde_json::to_writer(out, v).map_err(|_| Error::internal())
}

/// The opening of a searchset Bundle, up to (not including) its `link` or `entry`: the
/// object is left open.
pub fn write_head(out: &mut Vec<u8>) -> Result<(), Error> {
    out.extend_from_slice(br#"{"resourceType":"Bundle","id":"#);
    write_json(out, &Value::String(crate::engine::new_id()))?;
    out.extend_from_slice(br#","meta":"#);
    write_json(out, &json!({"lastUpdated": instant(now_ms())}))?;
    out.extend_from_slice(br#","type":"searchset""#);
    Ok(())
}

/// One searchset entry of `l` with search mode `mode`: the stored JSON as a read returns
/// it (no re-serialisation), or its `_elements` subset.
pub fn write_entry(
    out: &mut Vec<u8>,
    base_url: &str,
    l: Loaded,
    mode: &str,
    elements: Option<&[String]>,
) -> Result<(), Error> {
    out.extend_from_slice(br#"{"fullUrl":"#);
    write_json(
        out,
        &Value::String(format!("{base_url}/{}/{}", l.row.rtype, l.row.id)),
    )?;
    out.extend_from_slice(br#","resource":"#);
    match elements {
        Some(e) => write_json(out, &subset(l.json, e))?,
        None => out.extend_from_slice(&l.body),
    }
    out.extend_from_slice(br#","search":{"mode":""#);
    out.extend_from_slice(mode.as_bytes());
    out.extend_from_slice(br#""}}"#);
    Ok(())
}
