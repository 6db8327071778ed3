//! Parsing untrusted bytes into a resource JSON object.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::{FhirError, MAX_DEPTH};

/// Parse untrusted bytes into a JSON object.
///
/// Rejects: nesting deeper than [`MAX_DEPTH`] (checked by a non-recursive scan *before*
/// parsing), invalid JSON, duplicate object keys at any depth, a non-object top level and a
/// missing or non-string `resourceType`. Whether the `resourceType` is known is checked by
/// [`crate::validate`].
pub fn parse_resource(bytes: &[u8]) -> Result<Value, FhirError> {
    if exceeds_depth(bytes, MAX_DEPTH) {
        return Err(FhirError::TooDeep { max: MAX_DEPTH });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue::deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v.0))
        .map_err(|e| match e.classify() {
            // Our visitor accepts every JSON type, so the only data error is a duplicate key.
            serde_json::error::Category::Data => FhirError::DuplicateKey {
                line: e.line(),
                column: e.column(),
            },
            _ => FhirError::InvalidJson {
                line: e.line(),
                column: e.column(),
            },
        })?;
    let Value::Object(map) = &value else {
        return Err(FhirError::NotAnObject);
    };
    match map.get("resourceType") {
        None => Err(FhirError::MissingResourceType),
        Some(Value::String(_)) => Ok(value),
        Some(_) => Err(FhirError::InvalidResourceType),
    }
}

/// True when `[`/`{` nesting (outside strings) goes deeper than `max`. Linear, no recursion;
/// exact for valid JSON, and for invalid JSON the parser rejects the input anyway.
pub(crate) fn exceeds_depth(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    false
}

/// A `serde_json::Value` that refuses duplicate object keys while deserializing.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            match out.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(v);
                }
                serde_json::map::Entry::Occupied(_) => {
                    return Err(de::Error::custom("duplicate key"));
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_resource() {
        let v = parse_resource(
            br#"{"resourceType":"Patient","id":"a","active":true,"x":[1,2.5,null]}"#,
        );
        assert!(v.is_ok());
    }

    #[test]
    fn rejects_non_objects_and_bad_resource_type() {
        assert_eq!(parse_resource(b"[]"), Err(FhirError::NotAnObject));
        assert_eq!(parse_resource(b"\"x\""), Err(FhirError::NotAnObject));
        assert_eq!(parse_resource(b"null"), Err(FhirError::NotAnObject));
        assert_eq!(parse_resource(b"{}"), Err(FhirError::MissingResourceType));
        assert_eq!(
            parse_resource(br#"{"resourceType":1}"#),
            Err(FhirError::InvalidResourceType)
        );
    }

    #[test]
    fn rejects_invalid_json() {
        assert!(matches!(
            parse_resource(b""),
            Err(FhirError::InvalidJson { .. })
        ));
        assert!(matches!(
            parse_resource(br#"{"resourceType":"Patient"} x"#),
            Err(FhirError::InvalidJson { .. })
        ));
        assert!(matches!(
            parse_resource(b"\xff\xfe"),
            Err(FhirError::InvalidJson { .. })
        ));
    }

    #[test]
    fn rejects_duplicate_keys() {
        assert!(matches!(
            parse_resource(br#"{"resourceType":"Patient","id":"a","id":"b"}"#),
            Err(FhirError::DuplicateKey { .. })
        ));
        assert!(matches!(
            parse_resource(br#"{"resourceType":"Patient","name":[{"family":"a","family":"b"}]}"#),
            Err(FhirError::DuplicateKey { .. })
        ));
    }

    #[test]
    fn rejects_deep_nesting_without_overflow() {
        let deep = format!(
            "{{\"resourceType\":\"Patient\",\"x\":{}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(
            parse_resource(deep.as_bytes()),
            Err(FhirError::TooDeep { max: MAX_DEPTH })
        );
        let very_deep = "[".repeat(1_000_000);
        assert_eq!(
            parse_resource(very_deep.as_bytes()),
            Err(FhirError::TooDeep { max: MAX_DEPTH })
        );
        // Brackets inside strings do not count.
        let s = format!(
            "{{\"resourceType\":\"Patient\",\"x\":\"{}\\\"{}\"}}",
            "[".repeat(200),
            "{".repeat(200)
        );
        assert!(parse_resource(s.as_bytes()).is_ok());
    }

    #[test]
    fn depth_boundary() {
        // Top-level object is depth 1; 63 more arrays reach exactly 64.
        let ok = format!(
            "{{\"resourceType\":\"P\",\"x\":{}{}}}",
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert!(parse_resource(ok.as_bytes()).is_ok());
        let bad = format!(
            "{{\"resourceType\":\"P\",\"x\":{}{}}}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert!(parse_resource(bad.as_bytes()).is_err());
    }

    #[test]
    fn errors_do_not_echo_input() {
        let e = parse_resource(br#"{"resourceType":"Patient","name":"SECRET-NAME","name":1}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.is_empty());
        assert!(!e.contains("SECRET"));
        let e = parse_resource(br#"{"resourceType":"Patient","SECRET":tru}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.contains("SECRET"), "{e}");
    }
}
