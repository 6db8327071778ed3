//! Exact matching of criteria against resources, with the FHIR R4 search semantics.

use serde_json::Value;

use super::datetime::parse_date;
use super::registry::extract;
use super::types::{
    Criterion, DateRange, Decimal, Modifier, Prefix, QueryValue, SearchValue, Target,
};

/// Fold a Latin letter with a diacritic to its base letter (lower case).
fn fold(c: char) -> Option<char> {
    Some(match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => 'a',
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => 'c',
        'ď' | 'đ' => 'd',
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => 'e',
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => 'g',
        'ĥ' | 'ħ' => 'h',
        'ì' | 'í' | 'î' | 'ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' => 'i',
        'ĵ' => 'j',
        'ķ' => 'k',
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => 'l',
        'ñ' | 'ń' | 'ņ' | 'ň' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ŏ' | 'ő' => 'o',
        'ŕ' | 'ŗ' | 'ř' => 'r',
        'ś' | 'ŝ' | 'ş' | 'š' => 's',
        'ţ' | 'ť' | 'ŧ' => 't',
        'ù' | 'ú' | 'û' | 'ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => 'u',
        'ŵ' => 'w',
        'ý' | 'ÿ' | 'ŷ' => 'y',
        'ź' | 'ż' | 'ž' => 'z',
        _ => return None,
    })
}

/// FHIR string normalisation for matching and indexing: case- and accent-insensitive,
/// combining marks removed, runs of whitespace and punctuation collapsed to one space,
/// trimmed. `ß` becomes `ss`, `æ` `ae`, `œ` `oe`.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for ch in s.chars() {
        if ('\u{300}'..='\u{36f}').contains(&ch) {
            continue; // combining diacritical marks
        }
        for c in ch.to_lowercase() {
            if c.is_alphanumeric() {
                if space && !out.is_empty() {
                    out.push(' ');
                }
                space = false;
                match c {
                    'ß' => out.push_str("ss"),
                    'æ' => out.push_str("ae"),
                    'œ' => out.push_str("oe"),
                    c => out.push(fold(c).unwrap_or(c)),
                }
            } else {
                space = true;
            }
        }
    }
    out
}

fn date_matches(p: Prefix, v: DateRange, q: DateRange) -> bool {
    match p {
        Prefix::Eq => q.lo <= v.lo && v.hi <= q.hi,
        Prefix::Ne => !(q.lo <= v.lo && v.hi <= q.hi),
        Prefix::Gt => v.hi > q.hi,
        Prefix::Lt => v.lo < q.lo,
        Prefix::Ge => v.hi > q.lo,
        Prefix::Le => v.lo < q.hi,
        Prefix::Sa => v.lo >= q.hi,
        Prefix::Eb => v.hi <= q.lo,
        Prefix::Ap => {
            // the search range widened by 10 % of its distance from now, on each side
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let gap = ((now - q.lo).unsigned_abs() / 10).min(i64::MAX as u64 / 4) as i64;
            let (lo, hi) = (q.lo.saturating_sub(gap), q.hi.saturating_add(gap));
            v.lo < hi && v.hi > lo
        }
    }
}

fn number_matches(p: Prefix, v: f64, q: Decimal) -> bool {
    let (lo, hi) = (q.value - q.half_ulp, q.value + q.half_ulp);
    match p {
        Prefix::Eq => lo <= v && v < hi,
        Prefix::Ne => !(lo <= v && v < hi),
        Prefix::Gt | Prefix::Sa => v > q.value,
        Prefix::Lt | Prefix::Eb => v < q.value,
        Prefix::Ge => v >= q.value,
        Prefix::Le => v <= q.value,
        Prefix::Ap => (v - q.value).abs() <= (q.value * 0.1).abs().max(q.half_ulp),
    }
}

fn value_matches(m: &Modifier, sv: &SearchValue, qv: &QueryValue) -> bool {
    match (sv, qv) {
        (SearchValue::String(s), QueryValue::Text(q)) => match m {
            Modifier::Exact => s == q,
            Modifier::Contains => normalize(s).contains(&normalize(q)),
            _ => normalize(s).starts_with(&normalize(q)),
        },
        (SearchValue::Token { text, .. }, QueryValue::Text(q)) => text
            .as_deref()
            .is_some_and(|t| normalize(t).starts_with(&normalize(q))),
        (
            SearchValue::Token { system, code, .. },
            QueryValue::Token {
                system: qs,
                code: qc,
            },
        ) => {
            let code_ok = match qc {
                Some(c) => code.as_deref() == Some(c.as_str()),
                None => true,
            };
            let sys_ok = match qs {
                None => true,
                Some(None) => system.is_none(),
                Some(Some(s)) => system.as_deref() == Some(s.as_str()),
            };
            code_ok && sys_ok && (qc.is_some() || code.is_some())
        }
        (SearchValue::Date(v), QueryValue::Date(p, q)) => date_matches(*p, *v, *q),
        (SearchValue::Number(v), QueryValue::Number(p, q)) => number_matches(*p, v.value, *q),
        (
            SearchValue::Quantity {
                value,
                system,
                code,
                unit,
            },
            QueryValue::Quantity {
                prefix,
                value: q,
                system: qs,
                code: qc,
            },
        ) => {
            let sys_ok = qs.as_ref().is_none_or(|s| system.as_ref() == Some(s));
            let code_ok = qc.as_ref().is_none_or(|c| {
                code.as_ref() == Some(c)
                    || (code.is_none() && unit.as_ref() == Some(c))
                    || (qs.is_none() && unit.as_ref() == Some(c))
            });
            sys_ok && code_ok && number_matches(*prefix, value.value, *q)
        }
        (
            SearchValue::Reference { rtype, id, url },
            QueryValue::Reference {
                rtype: qt,
                id: qid,
                is_url,
            },
        ) => {
            if *is_url {
                if url == qid {
                    return true;
                }
                let (t, i) = super::registry::parse_reference(qid);
                return t.is_some() && t == *rtype && i == *id;
            }
            id.as_deref() == Some(qid.as_str())
                && qt.as_ref().is_none_or(|t| rtype.as_ref() == Some(t))
        }
        (SearchValue::Uri(u), QueryValue::Uri(q)) => match m {
            Modifier::Below => u.starts_with(q.as_str()),
            Modifier::Above => q.starts_with(u.as_str()),
            _ => u == q,
        },
        (SearchValue::Reference { url, .. }, QueryValue::Uri(q)) => url == q,
        _ => false,
    }
}

impl Criterion {
    /// The top-level fields [`Criterion::matches`] reads (see `top_fields`); None when
    /// that cannot be said.
    pub fn top_fields(&self) -> Option<Vec<(String, bool)>> {
        match &self.target {
            Target::Chain { .. } | Target::Has { .. } => Some(Vec::new()),
            Target::Id => Some(vec![("id".into(), false)]),
            Target::LastUpdated => Some(vec![("meta".into(), false)]),
            Target::Param(def) => super::registry::top_fields(def),
        }
    }

    /// Whether `resource` satisfies this criterion with the exact FHIR R4 semantics.
    /// `Target::Chain` and `Target::Has` are resolved by the server before matching (it
    /// rewrites them into reference / `_id` criteria); here they return `true`.
    pub fn matches(&self, resource: &Value) -> bool {
        match &self.target {
            Target::Chain { .. } | Target::Has { .. } => true,
            Target::Id => {
                let id = resource.get("id").and_then(Value::as_str);
                self.values.iter().any(|v| match v {
                    QueryValue::Token { code: Some(c), .. } => id == Some(c.as_str()),
                    _ => false,
                })
            }
            Target::LastUpdated => {
                let Some(lu) = resource
                    .get("meta")
                    .and_then(|m| m.get("lastUpdated"))
                    .and_then(Value::as_str)
                    .and_then(parse_date)
                else {
                    return false;
                };
                self.values.iter().any(|v| match v {
                    QueryValue::Date(p, q) => date_matches(*p, lu, *q),
                    _ => false,
                })
            }
            Target::Param(def) => {
                let values = extract(def, resource);
                if let [QueryValue::Missing(missing)] = self.values.as_slice() {
                    return values.is_empty() == *missing;
                }
                match self.modifier {
                    Modifier::Not => !values.iter().any(|sv| {
                        self.values
                            .iter()
                            .any(|qv| value_matches(&Modifier::None, sv, qv))
                    }),
                    Modifier::Text => values.iter().any(|sv| {
                        self.values
                            .iter()
                            .any(|qv| value_matches(&self.modifier, sv, qv))
                    }),
                    _ => values.iter().any(|sv| {
                        self.values
                            .iter()
                            .any(|qv| value_matches(&self.modifier, sv, qv))
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        assert_eq!(normalize("  Zoë  O'Brien-Smith "), "zoe o brien smith");
        assert_eq!(normalize("MÜLLER"), "muller");
        assert_eq!(normalize("Straße"), "strasse");
        assert_eq!(normalize("e\u{301}lise"), "elise");
        assert_eq!(normalize(""), "");
    }

    #[test]
    fn date_prefixes() {
        let d = |s| parse_date(s).unwrap();
        let v = d("2020-03-15");
        assert!(date_matches(Prefix::Eq, v, d("2020")));
        assert!(date_matches(Prefix::Eq, v, d("2020-03")));
        assert!(!date_matches(Prefix::Eq, v, d("2020-03-16")));
        assert!(date_matches(Prefix::Ge, v, d("2020-03-15")));
        assert!(!date_matches(Prefix::Gt, v, d("2020-03-15")));
        assert!(date_matches(Prefix::Lt, v, d("2020-03-16")));
        assert!(!date_matches(Prefix::Lt, v, d("2020-03-15")));
        assert!(date_matches(Prefix::Le, v, d("2020-03-15")));
        assert!(date_matches(Prefix::Sa, v, d("2020-03-14")));
        assert!(!date_matches(Prefix::Sa, v, d("2020-03-15")));
        assert!(date_matches(Prefix::Eb, v, d("2020-03-16")));
        assert!(date_matches(Prefix::Ne, v, d("2020-03-16")));
        // a dateTime inside the day
        let t = d("2020-03-15T10:30:00Z");
        assert!(date_matches(Prefix::Eq, t, d("2020-03-15")));
        assert!(date_matches(Prefix::Ge, t, d("2020-03-15T10:00")));
        assert!(!date_matches(Prefix::Ge, t, d("2020-03-15T11:00")));
    }

    #[test]
    fn numbers() {
        let q = super::super::datetime::parse_decimal("5.4").unwrap();
        assert!(number_matches(Prefix::Eq, 5.4, q));
        assert!(number_matches(Prefix::Eq, 5.44, q));
        assert!(!number_matches(Prefix::Eq, 5.46, q));
        assert!(number_matches(Prefix::Gt, 5.41, q));
        assert!(number_matches(Prefix::Ap, 5.0, q));
        assert!(!number_matches(Prefix::Ap, 4.0, q));
    }
}
