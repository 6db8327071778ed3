//! Property tests: untrusted input through every entry point never panics.

use phivault_fhir::{
    MAX_DEPTH, for_each_reference_mut, operation_outcome, parse_bundle, parse_resource,
    patient_compartment, transaction_order, validate,
};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// Keys drawn mostly from real FHIR element names so generated trees reach deep into the
/// schema, plus arbitrary strings.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "resourceType", "id", "meta", "text", "div", "status", "contained", "extension",
            "url", "valueString", "valueReference", "name", "given", "_given", "family",
            "birthDate", "_birthDate", "subject", "reference", "entry", "resource", "request",
            "method", "type", "fullUrl", "code", "coding", "system", "valueQuantity", "value",
            "component", "identifier", "telecom", "rank", "patient", "performer", "issue",
        ]).prop_map(str::to_owned),
        1 => ".{0,12}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            "Patient",
            "Observation",
            "Bundle",
            "Claim",
            "transaction",
            "batch",
            "POST",
            "PUT",
            "GET",
            "DELETE",
            "PATCH",
            "Patient/1",
            "Patient/1/_history/2",
            "Patient?x=y",
            "urn:uuid:1",
            "2020-02-30",
            "final",
            "",
            "../x",
            "https://e.x/Patient/1",
        ])
        .prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
    ]
}

fn tree() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(24, 256, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A resource-shaped object: a plausible resourceType plus an arbitrary body.
fn resource() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec![
            "Patient",
            "Observation",
            "Bundle",
            "Claim",
            "Encounter",
            "X",
        ]),
        prop::sample::select(vec!["batch", "transaction", "searchset"]),
        prop::collection::vec((key(), tree()), 0..8),
    )
        .prop_map(|(rt, bt, kv)| {
            let mut m: Map<String, Value> = kv.into_iter().collect();
            m.insert("resourceType".into(), Value::from(rt));
            if rt == "Bundle" {
                m.insert("type".into(), Value::from(bt));
            }
            Value::Object(m)
        })
}

fn exercise(v: &Value) {
    let _ = validate(v);
    let _ = patient_compartment(v);
    if let Ok((_, entries)) = parse_bundle(v, 50) {
        let order = transaction_order(&entries);
        assert_eq!(order.len(), entries.len());
    }
    if let Err(issues) = validate(v) {
        let oo = operation_outcome(&issues);
        assert!(
            validate(&oo).is_ok(),
            "OperationOutcome must itself be valid"
        );
    }
    let mut copy = v.clone();
    for_each_reference_mut(&mut copy, &mut |s| s.push('x'));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(v) = parse_resource(&bytes) {
            exercise(&v);
        }
    }

    #[test]
    fn arbitrary_trees(v in tree()) {
        exercise(&v);
        let bytes = serde_json::to_vec(&v).unwrap_or_default();
        if let Ok(parsed) = parse_resource(&bytes) {
            exercise(&parsed);
        }
    }

    #[test]
    fn resource_shaped_trees(v in resource()) {
        exercise(&v);
        let bytes = serde_json::to_vec(&v).unwrap_or_default();
        match parse_resource(&bytes) {
            Ok(parsed) => {
                // Same shape (floats may differ in the last bit: serde_json's default parser).
                prop_assert_eq!(parsed.get("resourceType"), v.get("resourceType"));
                prop_assert_eq!(parsed.as_object().map(|m| m.len()), v.as_object().map(|m| m.len()));
                exercise(&parsed);
            }
            Err(e) => {
                let too_deep = matches!(e, phivault_fhir::FhirError::TooDeep { .. });
                prop_assert!(too_deep);
            }
        }
    }

    #[test]
    fn deep_nesting(depth in 0usize..400, obj in any::<bool>(), tail in ".{0,8}") {
        let (open, close) = if obj { ("{\"a\":", "}") } else { ("[", "]") };
        let text = format!(
            "{{\"resourceType\":\"Patient\",\"extension\":{}{}{}}}",
            open.repeat(depth),
            serde_json::to_string(&tail).unwrap_or_default(),
            close.repeat(depth)
        );
        let r = parse_resource(text.as_bytes());
        if depth + 1 > MAX_DEPTH {
            prop_assert!(r.is_err());
        } else if let Ok(v) = r {
            exercise(&v);
        }
    }

    #[test]
    fn bundles(entries in prop::collection::vec(
        (
            prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "X"]),
            prop::sample::select(vec![
                "Patient", "Patient/1", "Patient/1/_history/2", "Patient?a=b", "Nope",
                "Patient/../x", "", "/Patient/2", "http://x/Patient/1", "Observation/o.1",
            ]),
            prop::option::of(resource()),
        ),
        0..12,
    )) {
        let entry: Vec<Value> = entries
            .into_iter()
            .map(|(m, u, r)| {
                let mut e = Map::new();
                e.insert("request".into(), serde_json::json!({"method": m, "url": u}));
                if let Some(r) = r {
                    e.insert("resource".into(), r);
                }
                Value::Object(e)
            })
            .collect();
        let b = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entry});
        exercise(&b);
    }
}
