//! Walking `reference` strings.

use serde_json::Value;

/// Visit every `reference` string — any object key `"reference"` whose value is a string, at
/// any depth, including contained resources and Bundle entries — mutably.
///
/// Iterative (explicit stack), so arbitrarily deep values cannot overflow the call stack.
pub fn for_each_reference_mut(resource: &mut Value, f: &mut dyn FnMut(&mut String)) {
    let mut stack: Vec<&mut Value> = vec![resource];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    match child {
                        Value::String(s) if k == "reference" => f(s),
                        Value::Object(_) | Value::Array(_) => stack.push(child),
                        _ => {}
                    }
                }
            }
            Value::Array(items) => {
                for child in items.iter_mut() {
                    if matches!(child, Value::Object(_) | Value::Array(_)) {
                        stack.push(child);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rewrites_all_references() {
        let mut v = json!({
            "resourceType": "Observation",
            "subject": {"reference": "urn:uuid:1"},
            "performer": [{"reference": "urn:uuid:2"}, {"display": "x"}],
            "contained": [{"resourceType": "Provenance", "target": [{"reference": "urn:uuid:1"}]}],
            "note": [{"text": "reference"}],
            "extension": [{"url": "u", "valueReference": {"reference": "Patient/9"}}],
            "reference": 5
        });
        let mut seen = 0;
        for_each_reference_mut(&mut v, &mut |s| {
            seen += 1;
            if s == "urn:uuid:1" {
                *s = "Patient/abc".into();
            }
        });
        assert_eq!(seen, 4);
        assert_eq!(v["subject"]["reference"], "Patient/abc");
        assert_eq!(v["contained"][0]["target"][0]["reference"], "Patient/abc");
        assert_eq!(v["performer"][0]["reference"], "urn:uuid:2");
        assert_eq!(v["reference"], 5);
    }

    #[test]
    fn deep_value_no_overflow() {
        let mut v = json!({"reference": "a"});
        for _ in 0..2_000 {
            v = Value::Array(vec![v]);
        }
        let mut n = 0;
        for_each_reference_mut(&mut v, &mut |_| n += 1);
        assert_eq!(n, 1);
        // Drop a deep value iteratively-ish: serde_json's drop is recursive, so unwind manually.
        while let Value::Array(mut a) = v {
            v = a.pop().unwrap_or(Value::Null);
        }
    }
}
