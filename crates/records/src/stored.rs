//! The stored form of a resource version: its JSON without what the row already holds.
//!
//! `resourceType`, `id`, `meta.versionId` and `meta.lastUpdated` are columns of the
//! version's row and are bound into the record's AAD (format 2), so sealing them again
//! inside every record only cost space: a random UUID and a timestamp are the least
//! compressible ~60 bytes of a typical resource. The stored form leaves them out and
//! [`expand`] puts them back when the record is opened, so clients see the same resource:
//!
//! ```text
//! stored:   {["meta":{<other meta fields>}][,]<other fields in key order>}
//! returned: {"resourceType":T,"id":I,"meta":{"versionId":V,"lastUpdated":L[,<other meta>]}[,<other fields>]}
//! ```
//!
//! Records of format 1 (sealed before this form existed) hold the whole resource and are
//! returned as they are.

use serde_json::Value;

/// The stored form of `resource` (a JSON object; anything else is stored as is).
pub fn compact(resource: &Value) -> Result<Vec<u8>, serde_json::Error> {
    let Some(obj) = resource.as_object() else {
        return serde_json::to_vec(resource);
    };
    let mut out = Vec::with_capacity(1024);
    out.push(b'{');
    let mut first = true;
    if let Some(Value::Object(meta)) = obj.get("meta") {
        let rest: serde_json::Map<String, Value> = meta
            .iter()
            .filter(|(k, _)| *k != "versionId" && *k != "lastUpdated")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !rest.is_empty() {
            out.extend_from_slice(b"\"meta\":");
            serde_json::to_writer(&mut out, &rest)?;
            first = false;
        }
    }
    for (k, v) in obj {
        if matches!(k.as_str(), "resourceType" | "id" | "meta") {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut out, k)?;
        out.push(b':');
        serde_json::to_writer(&mut out, v)?;
    }
    out.push(b'}');
    Ok(out)
}

/// The resource of a stored form, with the row's fields put back. None if `stored` is not
/// a stored form (cannot happen for an authentic record).
pub fn expand(
    stored: &[u8],
    rtype: &str,
    id: &str,
    version: u64,
    last_updated: &str,
) -> Option<Vec<u8>> {
    let body = stored.strip_prefix(b"{")?;
    let mut out = Vec::with_capacity(stored.len() + 128);
    out.extend_from_slice(b"{\"resourceType\":");
    serde_json::to_writer(&mut out, rtype).ok()?;
    out.extend_from_slice(b",\"id\":");
    serde_json::to_writer(&mut out, id).ok()?;
    out.extend_from_slice(b",\"meta\":{\"versionId\":\"");
    out.extend_from_slice(version.to_string().as_bytes());
    out.extend_from_slice(b"\",\"lastUpdated\":");
    serde_json::to_writer(&mut out, last_updated).ok()?;
    let rest = match body.strip_prefix(b"\"meta\":{") {
        // the other meta fields continue the meta object
        Some(meta_rest) => meta_rest,
        None => {
            out.push(b'}');
            body
        }
    };
    if !rest.starts_with(b"}") {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn full(mut r: Value, id: &str, version: u64, at: &str) -> Value {
        let o = r.as_object_mut().unwrap();
        o.insert("id".into(), json!(id));
        let meta = o.entry("meta").or_insert_with(|| json!({}));
        meta["versionId"] = json!(version.to_string());
        meta["lastUpdated"] = json!(at);
        r
    }

    fn round_trip(r: Value) {
        let stored_from = full(r.clone(), "ignored", 9, "1999-01-01T00:00:00.000Z");
        let stored = compact(&stored_from).unwrap();
        let rtype = r["resourceType"].as_str().unwrap_or("Basic").to_owned();
        let out = expand(&stored, &rtype, "a-1", 3, "2026-12-02T15:00:00.123Z").unwrap();
        let parsed: Value = serde_json::from_slice(&out).expect("valid JSON");
        let mut want = full(r, "a-1", 3, "2026-12-02T15:00:00.123Z");
        want["resourceType"] = json!(rtype);
        assert_eq!(parsed, want);
        assert!(out.starts_with(b"{\"resourceType\":"));
    }

    #[test]
    fn leaves_out_what_the_row_holds() {
        let r = json!({"resourceType": "Patient", "id": "x", "meta": {"versionId": "1",
            "lastUpdated": "2026-01-01T00:00:00.000Z"}, "gender": "male"});
        assert_eq!(compact(&r).unwrap(), br#"{"gender":"male"}"#);
        let r = json!({"resourceType": "Patient", "meta": {"versionId": "1",
            "tag": [{"code": "t"}]}, "active": true});
        assert_eq!(
            compact(&r).unwrap(),
            br#"{"meta":{"tag":[{"code":"t"}]},"active":true}"#
        );
    }

    #[test]
    fn expands_every_shape() {
        round_trip(json!({"resourceType": "Patient", "gender": "male", "birthDate": "1970"}));
        round_trip(json!({"resourceType": "Patient"}));
        round_trip(json!({"resourceType": "Patient", "meta": {"profile": ["p"]}}));
        round_trip(
            json!({"resourceType": "Patient", "meta": {"security": [{"code": "R"}]},
            "name": [{"family": "O'Brien \"Jr\" \u{e9}"}]}),
        );
        round_trip(json!({"resourceType": "Observation", "meta": {}}));
    }

    #[test]
    fn not_a_stored_form_is_refused() {
        assert!(expand(b"", "Patient", "1", 1, "x").is_none());
        assert!(expand(b"[1]", "Patient", "1", 1, "x").is_none());
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            "\\PC{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_resource_round_trips(
            fields in prop::collection::btree_map("[a-zA-Z]{1,10}", json_value(), 0..6),
            meta in prop::option::of(prop::collection::btree_map("[a-zA-Z]{1,10}", json_value(), 0..3)),
        ) {
            let mut r: serde_json::Map<String, Value> = fields.into_iter().collect();
            r.insert("resourceType".into(), json!("Basic"));
            match meta {
                Some(m) => { r.insert("meta".into(), Value::Object(m.into_iter().collect())); }
                None => { r.remove("meta"); }
            }
            round_trip(Value::Object(r));
        }
    }
}
