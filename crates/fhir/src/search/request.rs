//! Parsing of search requests. Issues name parameters, never values (values are PHI).

use super::datetime::{parse_date, parse_decimal};
use super::registry::search_param;
use super::types::{
    Criterion, Include, Modifier, ParamType, Prefix, QueryValue, SearchParamDef, SearchQuery,
    SortKey, Summary, Target, Total,
};
use crate::{Issue, IssueCode, is_known_resource_type, is_valid_id};

/// Default page size.
pub const DEFAULT_COUNT: usize = 20;
/// Largest page size served; larger `_count` values are capped.
pub const MAX_COUNT: usize = 1000;

const MAX_PAIRS: usize = 256;
const MAX_CRITERIA: usize = 64;
const MAX_VALUES: usize = 100;
const MAX_INCLUDES: usize = 10;
const MAX_VALUE_LEN: usize = 1024;

type Problem = (IssueCode, String);

fn invalid(msg: String) -> Problem {
    (IssueCode::Invalid, msg)
}

fn unsupported(msg: String) -> Problem {
    (IssueCode::NotSupported, msg)
}

/// Split on unescaped `sep`, keeping every escape as written (the parts may be split
/// again: a value's `\|` must survive the split of a list on `,`).
fn split_raw(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(last) = out.last_mut() {
                last.push('\\');
                if let Some(n) = chars.next() {
                    last.push(n);
                }
            }
        } else if c == sep {
            out.push(String::new());
        } else if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
}

/// `\,` `\|` `\$` `\\` as the character escaped; any other backslash is kept.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(n) if n == ',' || n == '|' || n == '$' || n == '\\' => out.push(n),
            Some(n) => {
                out.push('\\');
                out.push(n);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Split on unescaped `sep`; `\,` `\|` `\$` `\\` are literal.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    split_raw(s, sep).iter().map(|p| unescape(p)).collect()
}

fn prefix_of(v: &str) -> (Prefix, &str) {
    let b = v.as_bytes();
    if b.len() > 2 && (b[2].is_ascii_digit() || b[2] == b'-' || b[2] == b'+') {
        let p = match &v[..2] {
            "eq" => Some(Prefix::Eq),
            "ne" => Some(Prefix::Ne),
            "gt" => Some(Prefix::Gt),
            "lt" => Some(Prefix::Lt),
            "ge" => Some(Prefix::Ge),
            "le" => Some(Prefix::Le),
            "sa" => Some(Prefix::Sa),
            "eb" => Some(Prefix::Eb),
            "ap" => Some(Prefix::Ap),
            _ => None,
        };
        if let Some(p) = p {
            return (p, &v[2..]);
        }
    }
    (Prefix::Eq, v)
}

fn parse_modifier(def: &SearchParamDef, m: Option<&str>) -> Result<Modifier, Problem> {
    let name = &def.code;
    let Some(m) = m else {
        return Ok(Modifier::None);
    };
    let bad = || unsupported(format!("modifier ':{m}' is not supported on '{name}'"));
    Ok(match (def.ptype, m) {
        (_, "missing") => Modifier::Missing,
        (ParamType::String, "exact") => Modifier::Exact,
        (ParamType::String, "contains") => Modifier::Contains,
        (ParamType::Token, "not") => Modifier::Not,
        (ParamType::Token, "text") => Modifier::Text,
        (ParamType::Uri, "below") => Modifier::Below,
        (ParamType::Uri, "above") => Modifier::Above,
        (ParamType::Reference, t) if is_known_resource_type(t) => {
            if !def.targets.iter().any(|x| x == t) {
                return Err(invalid(format!(
                    "'{name}' cannot refer to the type named in its modifier"
                )));
            }
            Modifier::Type(t.to_owned())
        }
        _ => return Err(bad()),
    })
}

/// One value of an OR list, escapes as written (split on `|` first where the type has
/// parts, then unescaped).
fn parse_value(def: &SearchParamDef, m: &Modifier, raw: &str) -> Result<QueryValue, Problem> {
    let name = &def.code;
    let unescaped = unescape(raw);
    let v = unescaped.as_str();
    let bad = || invalid(format!("malformed value for '{name}'"));
    if *m == Modifier::Missing {
        return match v {
            "true" => Ok(QueryValue::Missing(true)),
            "false" => Ok(QueryValue::Missing(false)),
            _ => Err(bad()),
        };
    }
    Ok(match def.ptype {
        ParamType::String => QueryValue::Text(v.to_owned()),
        ParamType::Token => {
            if *m == Modifier::Text {
                return Ok(QueryValue::Text(v.to_owned()));
            }
            let parts = split_escaped(raw, '|');
            match parts.as_slice() {
                [code] => QueryValue::Token {
                    system: None,
                    code: Some(code.clone()),
                },
                [sys, code] if sys.is_empty() && !code.is_empty() => QueryValue::Token {
                    system: Some(None),
                    code: Some(code.clone()),
                },
                [sys, code] if !sys.is_empty() => QueryValue::Token {
                    system: Some(Some(sys.clone())),
                    code: (!code.is_empty()).then(|| code.clone()),
                },
                _ => return Err(bad()),
            }
        }
        ParamType::Date => {
            let (p, rest) = prefix_of(v);
            QueryValue::Date(p, parse_date(rest).ok_or_else(bad)?)
        }
        ParamType::Number => {
            let (p, rest) = prefix_of(v);
            QueryValue::Number(p, parse_decimal(rest).ok_or_else(bad)?)
        }
        ParamType::Quantity => {
            let (p, rest) = prefix_of(raw);
            let parts = split_escaped(rest, '|');
            let (num, system, code) = match parts.as_slice() {
                [n] => (n.clone(), None, None),
                [n, s, c] => (
                    n.clone(),
                    (!s.is_empty()).then(|| s.clone()),
                    (!c.is_empty()).then(|| c.clone()),
                ),
                _ => return Err(bad()),
            };
            QueryValue::Quantity {
                prefix: p,
                value: parse_decimal(&num).ok_or_else(bad)?,
                system,
                code,
            }
        }
        ParamType::Uri => QueryValue::Uri(v.to_owned()),
        ParamType::Reference => {
            if v.contains("://") {
                return Ok(QueryValue::Reference {
                    rtype: None,
                    id: v.to_owned(),
                    is_url: true,
                });
            }
            let (rtype, id) = match v.split_once('/') {
                Some((t, id)) => {
                    if !is_known_resource_type(t) || !def.targets.iter().any(|x| x == t) {
                        return Err(bad());
                    }
                    if let Modifier::Type(mt) = m
                        && mt != t
                    {
                        return Err(bad());
                    }
                    (Some(t.to_owned()), id)
                }
                None => match m {
                    Modifier::Type(t) => (Some(t.clone()), v),
                    _ if def.targets.len() == 1 => (def.targets.first().cloned(), v),
                    _ => (None, v),
                },
            };
            if !is_valid_id(id) {
                return Err(bad());
            }
            QueryValue::Reference {
                rtype,
                id: id.to_owned(),
                is_url: false,
            }
        }
        ParamType::Composite | ParamType::Special => {
            return Err(unsupported(format!("'{name}' is not supported")));
        }
    })
}

/// Parse `name[:modifier]` with a value into a criterion on `rtype` (no chains here).
fn simple_criterion(rtype: &str, name: &str, value: &str) -> Result<Criterion, Problem> {
    let (code, modifier) = match name.split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (name, None),
    };
    let values = split_raw(value, ',');
    if values.len() > MAX_VALUES {
        return Err((
            IssueCode::TooCostly,
            format!("too many values for '{code}'"),
        ));
    }
    if values.iter().any(String::is_empty) {
        return Err(invalid(format!("empty value for '{code}'")));
    }
    match code {
        "_id" => {
            if modifier.is_some() {
                return Err(unsupported("modifiers are not supported on '_id'".into()));
            }
            let mut vs = Vec::new();
            for v in values.iter().map(|v| unescape(v)) {
                if !is_valid_id(&v) {
                    return Err(invalid("malformed value for '_id'".into()));
                }
                vs.push(QueryValue::Token {
                    system: None,
                    code: Some(v),
                });
            }
            return Ok(Criterion {
                target: Target::Id,
                modifier: Modifier::None,
                values: vs,
            });
        }
        "_lastUpdated" => {
            if modifier.is_some() {
                return Err(unsupported(
                    "modifiers are not supported on '_lastUpdated'".into(),
                ));
            }
            let mut vs = Vec::new();
            for v in values {
                let (p, rest) = prefix_of(&v);
                let d = parse_date(rest)
                    .ok_or_else(|| invalid("malformed value for '_lastUpdated'".into()))?;
                vs.push(QueryValue::Date(p, d));
            }
            return Ok(Criterion {
                target: Target::LastUpdated,
                modifier: Modifier::None,
                values: vs,
            });
        }
        _ => {}
    }
    let def = search_param(rtype, code)
        .ok_or_else(|| invalid(format!("unknown search parameter '{code}' for {rtype}")))?;
    let modifier = parse_modifier(def, modifier)?;
    if modifier == Modifier::Missing && values.len() != 1 {
        return Err(invalid(format!("':missing' on '{code}' takes one value")));
    }
    let vs = values
        .iter()
        .map(|v| parse_value(def, &modifier, v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Criterion {
        target: Target::Param(def),
        modifier,
        values: vs,
    })
}

fn reference_param(rtype: &str, code: &str) -> Result<&'static SearchParamDef, Problem> {
    let def = search_param(rtype, code)
        .ok_or_else(|| invalid(format!("unknown search parameter '{code}' for {rtype}")))?;
    if def.ptype != ParamType::Reference {
        return Err(invalid(format!("'{code}' is not a reference parameter")));
    }
    Ok(def)
}

/// `_has:Type:ref:rest` (rest may be another `_has`, at most two levels).
fn has_criterion(rtype: &str, name: &str, value: &str, depth: usize) -> Result<Criterion, Problem> {
    if depth > 2 {
        return Err((IssueCode::TooCostly, "_has nests too deeply".into()));
    }
    let mut it = name.splitn(4, ':');
    let (Some("_has"), Some(src), Some(refp), Some(rest)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(invalid("malformed '_has' parameter".into()));
    };
    if !is_known_resource_type(src) {
        return Err(invalid("unknown resource type in '_has'".into()));
    }
    let reference = reference_param(src, refp)?;
    if !reference.targets.iter().any(|t| t == rtype) {
        return Err(invalid(
            "the '_has' reference cannot point to this type".into(),
        ));
    }
    let inner = if rest.starts_with("_has:") {
        has_criterion(src, rest, value, depth + 1)?
    } else {
        if rest.contains('.') {
            return Err(unsupported("chains inside '_has' are not supported".into()));
        }
        simple_criterion(src, rest, value)?
    };
    Ok(Criterion {
        target: Target::Has {
            rtype: src.to_owned(),
            reference,
            inner: Box::new(inner),
        },
        modifier: Modifier::None,
        values: vec![QueryValue::Missing(false)],
    })
}

fn chain_criterion(rtype: &str, name: &str, value: &str) -> Result<Criterion, Problem> {
    let (head, rest) = name
        .split_once('.')
        .ok_or_else(|| invalid("malformed chain".into()))?;
    if rest.contains('.') {
        return Err(unsupported(
            "chains of more than one level are not supported".into(),
        ));
    }
    let (code, ty) = match head.split_once(':') {
        Some((c, t)) => (c, Some(t)),
        None => (head, None),
    };
    let reference = reference_param(rtype, code)?;
    let target_type = match ty {
        Some(t) => {
            if !reference.targets.iter().any(|x| x == t) {
                return Err(invalid(format!(
                    "'{code}' cannot refer to the chained type"
                )));
            }
            t.to_owned()
        }
        None => match reference.targets.as_slice() {
            [t] => t.clone(),
            _ => {
                return Err(invalid(format!(
                    "ambiguous chain on '{code}': give the type ('{code}:Type.param')"
                )));
            }
        },
    };
    let inner = simple_criterion(&target_type, rest, value)?;
    Ok(Criterion {
        target: Target::Chain {
            reference,
            target_type,
            inner: Box::new(inner),
        },
        modifier: Modifier::None,
        values: vec![QueryValue::Missing(false)],
    })
}

fn include(
    rtype: &str,
    rev: bool,
    modifier: Option<&str>,
    value: &str,
) -> Result<Include, Problem> {
    let iterate = match modifier {
        None => false,
        Some("iterate") | Some("recurse") => true,
        Some(_) => return Err(unsupported("unsupported modifier on '_include'".into())),
    };
    if value == "*" || value.ends_with(":*") {
        return Err(unsupported("'_include=*' is not supported".into()));
    }
    let parts: Vec<&str> = value.split(':').collect();
    let (src, code, target) = match parts.as_slice() {
        [s, c] => (*s, *c, None),
        [s, c, t] => (*s, *c, Some(*t)),
        _ => return Err(invalid("malformed '_include' value".into())),
    };
    if !is_known_resource_type(src) {
        return Err(invalid("unknown resource type in '_include'".into()));
    }
    if !rev && !iterate && src != rtype {
        return Err(invalid("'_include' must name the searched type".into()));
    }
    let param = reference_param(src, code)?;
    if let Some(t) = target
        && (!is_known_resource_type(t) || !param.targets.iter().any(|x| x == t))
    {
        return Err(invalid("invalid target type in '_include'".into()));
    }
    if rev && !iterate && !param.targets.iter().any(|x| x == rtype) {
        return Err(invalid(
            "'_revinclude' parameter cannot refer to the searched type".into(),
        ));
    }
    Ok(Include {
        source_type: src.to_owned(),
        param,
        target_type: target.map(str::to_owned),
        iterate,
    })
}

fn sort_keys(rtype: &str, v: &str) -> Result<Vec<SortKey>, Problem> {
    let mut out = Vec::new();
    for part in v.split(',') {
        let (desc, name) = match part.strip_prefix('-') {
            Some(n) => (true, n),
            None => (false, part),
        };
        match name {
            "_lastUpdated" => out.push(SortKey {
                param: None,
                last_updated: true,
                descending: desc,
            }),
            "_id" => out.push(SortKey {
                param: None,
                last_updated: false,
                descending: desc,
            }),
            _ => {
                let def = search_param(rtype, name)
                    .ok_or_else(|| invalid("unknown parameter in '_sort'".into()))?;
                if matches!(def.ptype, ParamType::Reference) {
                    return Err(unsupported(
                        "sorting by a reference is not supported".into(),
                    ));
                }
                out.push(SortKey {
                    param: Some(def),
                    last_updated: false,
                    descending: desc,
                });
            }
        }
    }
    Ok(out)
}

/// Result parameters that take one value.
const SINGLE_VALUED: [&str; 6] = [
    "_count",
    "_sort",
    "_total",
    "_totalMethod",
    "_summary",
    "_elements",
];

/// Parse the decoded `(name, value)` pairs of a search on `rtype`. In strict mode any
/// unknown parameter, unsupported modifier or malformed value is an error (issues name
/// the parameter, never the value); in lenient mode they are skipped and reported in
/// `SearchQuery::warnings`.
pub fn parse_search(
    rtype: &str,
    pairs: &[(String, String)],
    lenient: bool,
) -> Result<SearchQuery, Vec<Issue>> {
    let mut q = SearchQuery {
        rtype: rtype.to_owned(),
        criteria: Vec::new(),
        include: Vec::new(),
        revinclude: Vec::new(),
        count: DEFAULT_COUNT,
        sort: Vec::new(),
        total: Total::None,
        summary: Summary::False,
        elements: None,
        warnings: Vec::new(),
        applied: Vec::new(),
    };
    if pairs.len() > MAX_PAIRS {
        return Err(vec![Issue::error(
            IssueCode::TooCostly,
            None,
            "too many search parameters",
        )]);
    }
    let mut errors = Vec::new();
    // criteria and includes applied, as given; the result parameters are written from
    // what they set, at the end
    let mut applied: Vec<(String, String)> = Vec::new();
    let mut count_given = false;
    let mut single_seen: std::collections::HashSet<&str> = Default::default();
    let mut format: Option<&str> = None;
    for (name, value) in pairs {
        if value.len() > MAX_VALUE_LEN || name.len() > 256 {
            errors.push((IssueCode::TooCostly, "search value too long".to_owned()));
            continue;
        }
        let (base, modifier) = match name.split_once(':') {
            Some((b, m)) if !name.starts_with("_has:") => (b, Some(m)),
            _ => (name.as_str(), None),
        };
        // a result parameter takes one value: a second one is a mistake, not "the last wins"
        if SINGLE_VALUED.contains(&base) && !single_seen.insert(base) {
            errors.push((
                IssueCode::Invalid,
                format!("'{base}' is given more than once"),
            ));
            continue;
        }
        // Ok(true): a criterion or include, listed as given among the applied parameters
        let r: Result<bool, Problem> = (|| {
            match base {
                "_count" => {
                    let n: usize = value
                        .parse()
                        .map_err(|_| invalid("'_count' must be a non-negative integer".into()))?;
                    q.count = n.min(MAX_COUNT);
                    count_given = true;
                }
                "_sort" => q.sort = sort_keys(rtype, value)?,
                "_total" => {
                    q.total = match value.as_str() {
                        "none" => Total::None,
                        "estimate" => Total::Estimate,
                        "accurate" => Total::Accurate,
                        _ => return Err(invalid("invalid '_total'".into())),
                    }
                }
                // the same question as some clients ask it (fhirpy's `count()` sends
                // `_count=0&_totalMethod=count`)
                "_totalMethod" => {
                    q.total = match value.as_str() {
                        "none" => Total::None,
                        "estimate" => Total::Estimate,
                        "count" | "accurate" => Total::Accurate,
                        _ => return Err(invalid("invalid '_totalMethod'".into())),
                    }
                }
                "_summary" => {
                    q.summary = match value.as_str() {
                        "count" => Summary::Count,
                        "false" => Summary::False,
                        _ => {
                            return Err(unsupported(
                                "only '_summary=count' and 'false' are supported".into(),
                            ));
                        }
                    }
                }
                "_elements" => {
                    let els: Vec<String> = value.split(',').map(str::to_owned).collect();
                    if els.iter().any(|e| {
                        !e.starts_with(|c: char| c.is_ascii_alphabetic())
                            || !e.bytes().all(|b| b.is_ascii_alphanumeric())
                    }) {
                        return Err(invalid("invalid '_elements'".into()));
                    }
                    q.elements = Some(els);
                }
                "_include" | "_revinclude" => {
                    let rev = base == "_revinclude";
                    let inc = include(rtype, rev, modifier, value)?;
                    if q.include.len() + q.revinclude.len() >= MAX_INCLUDES {
                        return Err((IssueCode::TooCostly, "too many includes".into()));
                    }
                    if rev {
                        q.revinclude.push(inc);
                    } else {
                        q.include.push(inc);
                    }
                    return Ok(true);
                }
                "_format" => {
                    if !matches!(
                        value.as_str(),
                        "json" | "application/fhir+json" | "application/json"
                    ) {
                        return Err(unsupported("only JSON is served".into()));
                    }
                    format = Some(value.as_str());
                }
                "_pretty" => {}
                _ if name.starts_with("_has:") => {
                    q.criteria.push(has_criterion(rtype, name, value, 1)?);
                    return Ok(true);
                }
                _ if base.contains('.') || modifier.is_some_and(|m| m.contains('.')) => {
                    q.criteria.push(chain_criterion(rtype, name, value)?);
                    return Ok(true);
                }
                "_id" | "_lastUpdated" => {
                    q.criteria.push(simple_criterion(rtype, name, value)?);
                    return Ok(true);
                }
                _ if base.starts_with('_') => {
                    return Err(unsupported(format!("parameter '{base}' is not supported")));
                }
                _ => {
                    q.criteria.push(simple_criterion(rtype, name, value)?);
                    return Ok(true);
                }
            }
            Ok(false)
        })();
        match r {
            Ok(true) => applied.push((name.clone(), value.clone())),
            Ok(false) => {}
            Err(p) => errors.push(p),
        }
    }
    if q.criteria.len() > MAX_CRITERIA {
        errors.push((IssueCode::TooCostly, "too many search criteria".into()));
    }
    if !errors.is_empty() {
        if lenient && errors.iter().all(|(c, _)| *c != IssueCode::TooCostly) {
            q.warnings = errors
                .into_iter()
                .map(|(c, m)| Issue {
                    severity: crate::Severity::Warning,
                    ..Issue::error(c, None, m)
                })
                .collect();
        } else {
            return Err(errors
                .into_iter()
                .map(|(c, m)| Issue::error(c, None, m))
                .collect());
        }
    }
    if count_given {
        applied.push(("_count".into(), q.count.to_string()));
    }
    if !q.sort.is_empty() {
        let keys: Vec<String> = q
            .sort
            .iter()
            .map(|k| {
                let name = match k.param {
                    Some(def) => def.code.as_str(),
                    None if k.last_updated => "_lastUpdated",
                    None => "_id",
                };
                format!("{}{name}", if k.descending { "-" } else { "" })
            })
            .collect();
        applied.push(("_sort".into(), keys.join(",")));
    }
    match q.total {
        Total::None => {}
        Total::Estimate => applied.push(("_total".into(), "estimate".into())),
        Total::Accurate => applied.push(("_total".into(), "accurate".into())),
    }
    if q.summary == Summary::Count {
        applied.push(("_summary".into(), "count".into()));
    }
    if let Some(els) = &q.elements {
        applied.push(("_elements".into(), els.join(",")));
    }
    if let Some(f) = format {
        applied.push(("_format".into(), f.to_owned()));
    }
    // stable: repeated parameters keep their order
    applied.sort_by(|a, b| a.0.cmp(&b.0));
    q.applied = applied;
    Ok(q)
}

impl SearchQuery {
    /// Only the number of matches is asked for (`_summary=count` or `_count=0`): the
    /// answer is `total` and no entries.
    pub fn count_only(&self) -> bool {
        self.summary == Summary::Count || self.count == 0
    }

    /// [`SearchQuery::applied`] as a URL query (`name=value&…`, without `?`): names and
    /// values percent-encoded (UTF-8; every byte but unreserved characters and `:` `/`
    /// `,`, which a query may carry as they are, so `%20` for a space, never `+`).
    pub fn self_query(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.applied {
            if !out.is_empty() {
                out.push('&');
            }
            percent_encode(&mut out, k);
            out.push('=');
            percent_encode(&mut out, v);
        }
        out
    }
}

/// Append `s` percent-encoded for a URL query component.
fn percent_encode(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/,".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn parses_the_common_forms() {
        let q = parse_search(
            "Observation",
            &p(&[
                ("code", "http://loinc.org|2339-0,1234-5"),
                ("date", "ge2020-01-01"),
                ("date", "lt2021"),
                ("subject:Patient.family", "smith"),
                ("_count", "5000"),
                ("_sort", "-date"),
                ("_include", "Observation:subject"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(q.criteria.len(), 4);
        assert_eq!(q.count, MAX_COUNT);
        assert_eq!(q.criteria[0].values.len(), 2);
        assert!(matches!(q.criteria[3].target, Target::Chain { .. }));
        assert_eq!(q.include.len(), 1);
        assert!(q.sort[0].descending);
        let q = parse_search(
            "Patient",
            &p(&[("_has:Observation:patient:code", "1234")]),
            false,
        )
        .unwrap();
        assert!(matches!(q.criteria[0].target, Target::Has { .. }));
    }

    #[test]
    fn problems_name_the_parameter_not_the_value() {
        let e = parse_search("Patient", &p(&[("birthdate", "secret-1999-99")]), false).unwrap_err();
        let msg = format!("{e:?}");
        assert!(msg.contains("birthdate") && !msg.contains("secret"));
        assert!(parse_search("Patient", &p(&[("nonsense", "1")]), false).is_err());
        assert!(parse_search("Patient", &p(&[("family:below", "x")]), false).is_err());
        assert!(parse_search("Patient", &p(&[("_include", "*")]), false).is_err());
        assert!(parse_search("Observation", &p(&[("subject.name.family", "x")]), false).is_err());
        let q = parse_search("Patient", &p(&[("nonsense", "1"), ("family", "x")]), true).unwrap();
        assert_eq!(q.warnings.len(), 1);
        assert_eq!(q.criteria.len(), 1);
    }

    #[test]
    fn count_questions_are_understood() {
        let q = parse_search(
            "Patient",
            &p(&[("_count", "0"), ("_totalMethod", "count")]),
            false,
        )
        .unwrap();
        assert!(q.count_only());
        assert_eq!(q.total, Total::Accurate);
        for (v, t) in [
            ("accurate", Total::Accurate),
            ("estimate", Total::Estimate),
            ("none", Total::None),
        ] {
            let q = parse_search("Patient", &p(&[("_totalMethod", v)]), false).unwrap();
            assert_eq!(q.total, t);
            assert!(!q.count_only());
        }
        assert!(parse_search("Patient", &p(&[("_totalMethod", "maybe")]), false).is_err());
        for twice in ["_count", "_sort", "_total", "_summary", "_elements"] {
            let v = match twice {
                "_count" => "1",
                "_sort" => "birthdate",
                "_total" => "accurate",
                "_summary" => "count",
                _ => "name",
            };
            assert!(
                parse_search("Patient", &p(&[(twice, v), (twice, v)]), false).is_err(),
                "{twice} twice"
            );
        }
        let q = parse_search("Patient", &p(&[("_summary", "count")]), false).unwrap();
        assert!(q.count_only());
        // genuinely unknown parameters stay errors
        assert!(parse_search("Patient", &p(&[("_count", "0"), ("_bogus", "1")]), false).is_err());
    }

    #[test]
    fn the_applied_parameters_are_listed_normalised_and_encoded() {
        let q = parse_search(
            "Observation",
            &p(&[
                ("code", "http://loinc.org|2339-0,1234-5"),
                ("_count", "5000"),
                ("subject:Patient.family", "o'Brien née"),
                ("_totalMethod", "count"),
                ("date", "ge2020-01-01"),
                ("_sort", "-date,_lastUpdated"),
                ("_summary", "false"),
                ("_pretty", "true"),
                ("nonsense", "1"),
                ("_include", "Observation:subject"),
                ("date", "lt2021"),
                ("code:text", "a&b=c+d%"),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(q.warnings.len(), 1);
        let names: Vec<&str> = q.applied.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "_count",
                "_include",
                "_sort",
                "_total",
                "code",
                "code:text",
                "date",
                "date",
                "subject:Patient.family"
            ]
        );
        assert_eq!(
            q.self_query(),
            "_count=1000&_include=Observation:subject&_sort=-date,_lastUpdated&_total=accurate\
             &code=http://loinc.org%7C2339-0,1234-5&code:text=a%26b%3Dc%2Bd%25\
             &date=ge2020-01-01&date=lt2021\
             &subject:Patient.family=o%27Brien%20n%C3%A9e"
        );
        // nothing but defaults: an empty query
        let q = parse_search(
            "Patient",
            &p(&[("_total", "none"), ("_summary", "false"), ("_pretty", "1")]),
            false,
        )
        .unwrap();
        assert_eq!(q.self_query(), "");
        let q = parse_search(
            "Patient",
            &p(&[("_summary", "count"), ("_format", "json")]),
            false,
        )
        .unwrap();
        assert_eq!(q.self_query(), "_format=json&_summary=count");
    }

    #[test]
    fn escapes() {
        assert_eq!(split_escaped(r"a\,b,c", ','), vec!["a,b", "c"]);
        assert_eq!(split_escaped(r"s\|x|c", '|'), vec!["s|x", "c"]);
        assert_eq!(split_raw(r"s\|x|c\,d,e", ','), vec![r"s\|x|c\,d", "e"]);
        assert_eq!(unescape(r"a\,b\|c\$d\\e\xf\"), r"a,b|c$d\e\xf\");
        // an escaped `|` in a token's code survives the split of the OR list
        let q = parse_search(
            "Patient",
            &p(&[
                ("identifier", r"urn:x|MRN 7\|9,urn:y|a\,b"),
                ("family", r"o\,b"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(
            q.criteria[0].values,
            vec![
                QueryValue::Token {
                    system: Some(Some("urn:x".into())),
                    code: Some("MRN 7|9".into())
                },
                QueryValue::Token {
                    system: Some(Some("urn:y".into())),
                    code: Some("a,b".into())
                }
            ]
        );
        assert_eq!(q.criteria[1].values, vec![QueryValue::Text("o,b".into())]);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(pairs in proptest::collection::vec((".{0,30}", ".{0,30}"), 0..8)) {
            for t in ["Patient", "Observation", "Encounter"] {
                let _ = parse_search(t, &pairs, false);
                let _ = parse_search(t, &pairs, true);
            }
        }

        #[test]
        fn the_self_query_decodes_to_the_applied_parameters(v in "\\PC{1,20}", w in "[ -~]{1,20}") {
            let pairs = p(&[("family", v.as_str()), ("name:contains", w.as_str())]);
            // lenient: a malformed value (an empty OR branch) is left out, not listed
            let q = parse_search("Patient", &pairs, true).unwrap();
            let text = q.self_query();
            proptest::prop_assert!(text.bytes().all(|b| b.is_ascii_graphic() && !b"+#?[]".contains(&b)));
            let decode = |s: &str| {
                let mut out = Vec::new();
                let b = s.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'%' {
                        out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                        i += 3;
                    } else {
                        out.push(b[i]);
                        i += 1;
                    }
                }
                String::from_utf8(out).unwrap()
            };
            let back: Vec<(String, String)> = text
                .split('&')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (decode(k), decode(v))
                })
                .collect();
            proptest::prop_assert_eq!(back, q.applied);
        }

        #[test]
        fn never_panics_on_known_names(v in ".{0,30}", m in "(|:exact|:contains|:missing|:not|:text|:Patient|:iterate)") {
            for (t, n) in [("Patient", "family"), ("Patient", "birthdate"), ("Observation", "code"), ("Observation", "subject"),
                           ("Observation", "value-quantity"), ("Patient", "_include"), ("Patient", "_has:Observation:patient:code"),
                           ("Observation", "subject:Patient.name"), ("Patient", "_sort"), ("Patient", "_lastUpdated")] {
                let _ = parse_search(t, &[(format!("{n}{m}"), v.clone())], false);
            }
        }
    }
}
