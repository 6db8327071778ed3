//! Helpers for reading registered JWT claims (RFC 7519 §4.1) from a verified claim set.

use serde_json::{Map, Value};

/// A NumericDate claim: `Ok(None)` when absent, `Err(())` when present but not a
/// non-negative finite number. Fractions are truncated.
pub(crate) fn numeric_date(m: &Map<String, Value>, k: &str) -> Result<Option<u64>, ()> {
    match m.get(k) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else {
                match n.as_f64() {
                    // u64::MAX as f64 rounds up; stay well inside the range.
                    Some(f) if f.is_finite() && (0.0..1.0e18).contains(&f) => Ok(Some(f as u64)),
                    _ => Err(()),
                }
            }
        }
        Some(_) => Err(()),
    }
}

/// A string claim, if present and a string.
pub(crate) fn string<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// Whether `aud` is `expected`, or an array of strings that contains it.
pub(crate) fn audience_contains(m: &Map<String, Value>, expected: &str) -> bool {
    match m.get("aud") {
        Some(Value::String(s)) => s == expected,
        Some(Value::Array(a)) => {
            a.iter().all(Value::is_string) && a.iter().any(|v| v.as_str() == Some(expected))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn dates() {
        assert_eq!(numeric_date(&obj(json!({"exp": 5})), "exp"), Ok(Some(5)));
        assert_eq!(numeric_date(&obj(json!({"exp": 5.9})), "exp"), Ok(Some(5)));
        assert_eq!(numeric_date(&obj(json!({})), "exp"), Ok(None));
        assert!(numeric_date(&obj(json!({"exp": -1})), "exp").is_err());
        assert!(numeric_date(&obj(json!({"exp": "5"})), "exp").is_err());
        assert!(numeric_date(&obj(json!({"exp": 1e300})), "exp").is_err());
    }

    #[test]
    fn audiences() {
        assert!(audience_contains(&obj(json!({"aud": "a"})), "a"));
        assert!(audience_contains(&obj(json!({"aud": ["b", "a"]})), "a"));
        assert!(!audience_contains(&obj(json!({"aud": ["b", 1, "a"]})), "a"));
        assert!(!audience_contains(&obj(json!({"aud": "b"})), "a"));
        assert!(!audience_contains(&obj(json!({})), "a"));
    }
}
