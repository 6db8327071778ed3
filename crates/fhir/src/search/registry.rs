//! The search parameter registry, built once from the vendored official R4
//! SearchParameter bundle, and the FHIRPath subset its expressions need.

use std::collections::HashMap;
use std::io::Read;
use std::sync::LazyLock;

use serde_json::Value;

use super::datetime::{parse_date, parse_decimal};
use super::types::{DateRange, ParamType, SearchParamDef, SearchValue};
use crate::{MAX_DEPTH, is_known_resource_type, is_valid_id};

static SEARCH_PARAMS_GZ: &[u8] = include_bytes!("../../data/search-parameters.json.gz");

/// Common parameters (base `Resource`/`DomainResource`) that phivault serves.
const COMMON: &[&str] = &[
    "_id",
    "_lastUpdated",
    "_tag",
    "_profile",
    "_security",
    "_source",
];

/// One step of a compiled path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// An element; with `Some(type)` a choice element cast to that type
    /// (`value as Quantity` → `valueQuantity`); a bare choice name matches any type.
    Field(String, Option<String>),
    /// `.where(resolve() is T)`: references to type T only.
    Resolves(String),
    /// `.where(system='x')`.
    System(String),
    /// A choice element with its type, as its JSON key (`valueQuantity`).
    Key(String),
}

/// A compiled expression: a union of paths, or the deceased special case.
#[derive(Debug, Clone, PartialEq)]
enum Compiled {
    Paths(Vec<Vec<Step>>),
    /// `X.deceased.exists() and X.deceased != false`
    Deceased,
}

struct Registry {
    by_type: HashMap<String, Vec<SearchParamDef>>,
    /// base type → parameter code → compiled expression
    compiled: HashMap<String, HashMap<String, Compiled>>,
    /// base type → parameter code → the parameter whose index serves it
    owner: HashMap<String, HashMap<String, String>>,
    /// type → positions in `by_type` of the parameters that own an index
    indexed: HashMap<String, Vec<usize>>,
}

/// Whether union member `p` selects a subset of what member `q` selects, in terms of
/// index terms of type `t`.
fn part_covered(t: ParamType, p: &str, q: &str) -> bool {
    if p == q {
        return true;
    }
    let Some(rest) = p.strip_prefix(q) else {
        return false;
    };
    if rest.starts_with(".where(resolve() is ") && t == ParamType::Reference {
        return true;
    }
    if rest.starts_with(".where(system='") && t == ParamType::Token {
        return true;
    }
    // a part of a HumanName / Address (strings index every part of those)
    t == ParamType::String
        && rest.strip_prefix('.').is_some_and(|f| {
            matches!(
                f,
                "family"
                    | "given"
                    | "prefix"
                    | "suffix"
                    | "text"
                    | "line"
                    | "city"
                    | "district"
                    | "state"
                    | "postalCode"
                    | "country"
            )
        })
}

/// Parameters whose values are a subset of another parameter's (Observation `patient` of
/// `subject`, Patient `family` of `name`, `phonetic` = `name`, `combo-code` ⊇ `code`) share
/// that parameter's index instead of writing their own: fewer rows per resource, and the
/// exact semantics are restored by verification.
fn owners(defs: &[SearchParamDef]) -> HashMap<String, String> {
    let parts = |d: &SearchParamDef| -> Vec<String> {
        d.expression
            .as_deref()
            .map(|e| split_top(e).into_iter().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let covers = |q: &SearchParamDef, p: &SearchParamDef| {
        q.ptype == p.ptype
            && q.expression.is_some()
            && p.expression.is_some()
            && parts(p)
                .iter()
                .all(|pp| parts(q).iter().any(|qq| part_covered(p.ptype, pp, qq)))
    };
    let mut out = HashMap::new();
    for p in defs {
        if p.expression.is_none() {
            continue;
        }
        // the widest covering parameter; identical ones resolve to the smallest code
        let best = defs
            .iter()
            .filter(|q| covers(q, p))
            .filter(|q| !covers(p, q) || q.code <= p.code)
            .max_by(|a, b| {
                let (ca, cb) = (covers(a, b), covers(b, a));
                match (ca, cb) {
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    _ => parts(a)
                        .len()
                        .cmp(&parts(b).len())
                        .then_with(|| b.code.cmp(&a.code)),
                }
            });
        if let Some(q) = best {
            out.insert(p.code.clone(), q.code.clone());
        }
    }
    // follow chains to their root
    let snapshot = out.clone();
    for v in out.values_mut() {
        let mut seen = 0;
        while let Some(n) = snapshot.get(v.as_str()) {
            if n == v || seen > 8 {
                break;
            }
            *v = n.clone();
            seen += 1;
        }
    }
    out
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(build);

fn split_top(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in expr.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '|' if depth == 0 => {
                out.push(expr[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(expr[start..].trim());
    out
}

fn ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Compile one union member against `base`; None if outside the subset or another base.
fn compile_part(base: &str, part: &str) -> Option<Vec<Step>> {
    let part = part.trim();
    // `(Base.a.b as T)` with an optional `.x.y` tail
    if let Some(rest) = part.strip_prefix('(') {
        let close = rest.find(')')?;
        let (inner, tail) = (&rest[..close], &rest[close + 1..]);
        let (path, ty) = inner.split_once(" as ")?;
        let mut steps = compile_part(base, path.trim())?;
        match steps.last_mut() {
            Some(Step::Field(_, c @ None)) if ident(ty.trim()) => *c = Some(ty.trim().to_owned()),
            _ => return None,
        }
        if !tail.is_empty() {
            for seg in tail.strip_prefix('.')?.split('.') {
                if !ident(seg) {
                    return None;
                }
                steps.push(Step::Field(seg.to_owned(), None));
            }
        }
        return Some(steps);
    }
    let rest = part.strip_prefix(base)?.strip_prefix('.')?;
    let mut steps = Vec::new();
    let mut s = rest;
    while !s.is_empty() {
        if let Some(r) = s.strip_prefix("as(") {
            let close = r.find(')')?;
            let ty = &r[..close];
            match steps.last_mut() {
                Some(Step::Field(_, c @ None)) if ident(ty) => *c = Some(ty.to_owned()),
                _ => return None,
            }
            s = r[close + 1..].strip_prefix('.').unwrap_or(&r[close + 1..]);
            continue;
        }
        if let Some(r) = s.strip_prefix("where(resolve() is ") {
            let close = r.find(')')?;
            let ty = &r[..close];
            if !ident(ty) {
                return None;
            }
            steps.push(Step::Resolves(ty.to_owned()));
            s = r[close + 1..].strip_prefix('.').unwrap_or(&r[close + 1..]);
            continue;
        }
        if let Some(r) = s.strip_prefix("where(system='") {
            let close = r.find("')")?;
            steps.push(Step::System(r[..close].to_owned()));
            s = r[close + 2..].strip_prefix('.').unwrap_or(&r[close + 2..]);
            continue;
        }
        let end = s.find('.').unwrap_or(s.len());
        let seg = &s[..end];
        if !ident(seg) {
            return None;
        }
        steps.push(Step::Field(seg.to_owned(), None));
        s = s.get(end + 1..).unwrap_or("");
    }
    (!steps.is_empty()).then_some(steps)
}

fn compile(base: &str, expr: &str) -> Option<(Compiled, String)> {
    if expr == format!("{base}.deceased.exists() and {base}.deceased != false") {
        return Some((Compiled::Deceased, expr.to_owned()));
    }
    let mut paths = Vec::new();
    let mut kept = Vec::new();
    for part in split_top(expr) {
        let part = part
            .strip_prefix("Resource.")
            .map(|r| format!("{base}.{r}"))
            .unwrap_or_else(|| part.to_owned());
        let applies =
            part.starts_with(&format!("{base}.")) || part.starts_with(&format!("({base}."));
        if !applies {
            continue;
        }
        match compile_part(base, &part) {
            Some(p) => {
                let p = p
                    .into_iter()
                    .map(|st| match st {
                        Step::Field(n, Some(t)) => Step::Key(format!("{n}{}", upper_first(&t))),
                        other => other,
                    })
                    .collect();
                paths.push(p);
                kept.push(part);
            }
            None => return None,
        }
    }
    (!paths.is_empty()).then(|| (Compiled::Paths(paths), kept.join(" | ")))
}

fn ptype(s: &str) -> Option<ParamType> {
    Some(match s {
        "number" => ParamType::Number,
        "date" => ParamType::Date,
        "string" => ParamType::String,
        "token" => ParamType::Token,
        "reference" => ParamType::Reference,
        "quantity" => ParamType::Quantity,
        "uri" => ParamType::Uri,
        "composite" => ParamType::Composite,
        "special" => ParamType::Special,
        _ => return None,
    })
}

fn build() -> Registry {
    let mut reg = Registry {
        by_type: HashMap::new(),
        compiled: HashMap::new(),
        owner: HashMap::new(),
        indexed: HashMap::new(),
    };
    let mut text = Vec::new();
    if flate2::read::GzDecoder::new(SEARCH_PARAMS_GZ)
        .read_to_end(&mut text)
        .is_err()
    {
        return reg;
    }
    let Ok(bundle) = serde_json::from_slice::<Value>(&text) else {
        return reg;
    };
    let types: Vec<&'static str> = crate::resource_types().collect();
    for e in bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(r) = e.get("resource") else { continue };
        let (Some(code), Some(pt)) = (
            r.get("code").and_then(Value::as_str),
            r.get("type").and_then(Value::as_str).and_then(ptype),
        ) else {
            continue;
        };
        if matches!(pt, ParamType::Composite | ParamType::Special) {
            continue;
        }
        let expr = r.get("expression").and_then(Value::as_str).unwrap_or("");
        let targets: Vec<String> = r
            .get("target")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        let bases: Vec<&str> = r
            .get("base")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for b in bases {
            let concrete: Vec<&str> = if b == "Resource" || b == "DomainResource" {
                if !COMMON.contains(&code) {
                    continue;
                }
                types.clone()
            } else if types.contains(&b) {
                vec![b]
            } else {
                continue;
            };
            for base in concrete {
                let (expression, compiled) = if code == "_id" || code == "_lastUpdated" {
                    (None, None)
                } else {
                    match compile(base, expr) {
                        Some((c, kept)) => (Some(kept), Some(c)),
                        None => continue,
                    }
                };
                let list = reg.by_type.entry(base.to_owned()).or_default();
                if list.iter().any(|d| d.code == code) {
                    continue;
                }
                list.push(SearchParamDef {
                    base: base.to_owned(),
                    code: code.to_owned(),
                    ptype: pt,
                    expression,
                    targets: targets.clone(),
                });
                if let Some(c) = compiled {
                    reg.compiled
                        .entry(base.to_owned())
                        .or_default()
                        .insert(code.to_owned(), c);
                }
            }
        }
    }
    for (t, list) in reg.by_type.iter_mut() {
        list.sort_by(|a, b| a.code.cmp(&b.code));
        let owner = owners(list);
        let indexed = list
            .iter()
            .enumerate()
            .filter(|(_, d)| {
                d.expression.is_some() && owner.get(&d.code).is_none_or(|o| *o == d.code)
            })
            .map(|(i, _)| i)
            .collect();
        reg.owner.insert(t.clone(), owner);
        reg.indexed.insert(t.clone(), indexed);
    }
    reg
}

/// The parameters of `rtype` whose values are written to a blind index: those with an
/// expression that own their index (see [`index_owner`]).
pub fn indexed_params(rtype: &str) -> impl Iterator<Item = &'static SearchParamDef> {
    let list = search_params(rtype);
    REGISTRY
        .indexed
        .get(rtype)
        .into_iter()
        .flatten()
        .filter_map(move |i| list.get(*i))
}

/// The parameter whose blind index serves `def` (itself unless its values are a subset of
/// a wider parameter's). Only owners are written; lookups read the owner's index.
pub fn index_owner(def: &SearchParamDef) -> &'static str {
    REGISTRY
        .owner
        .get(def.base.as_str())
        .and_then(|m| m.get(def.code.as_str()))
        .map(String::as_str)
        .unwrap_or_else(|| search_param(&def.base, &def.code).map_or("", |d| d.code.as_str()))
}

/// The definition of parameter `code` on resource type `rtype`, if phivault serves it.
pub fn search_param(rtype: &str, code: &str) -> Option<&'static SearchParamDef> {
    let list = REGISTRY.by_type.get(rtype)?;
    list.binary_search_by(|d| d.code.as_str().cmp(code))
        .ok()
        .and_then(|i| list.get(i))
}

/// Every served parameter of `rtype` (empty for unknown types).
pub fn search_params(rtype: &str) -> &'static [SearchParamDef] {
    REGISTRY
        .by_type
        .get(rtype)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

fn push_flat<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(a) => out.extend(a.iter().filter(|x| !x.is_null())),
        Value::Null => {}
        other => out.push(other),
    }
}

fn eval<'a>(root: &'a Value, steps: &[Step], out: &mut Vec<&'a Value>) {
    // two buffers, swapped at every step (this runs for every path of every indexed
    // parameter of every resource written)
    let mut cur: Vec<&'a Value> = vec![root];
    let mut next: Vec<&'a Value> = Vec::new();
    for (depth, step) in steps.iter().enumerate() {
        if depth > MAX_DEPTH || cur.is_empty() {
            return;
        }
        next.clear();
        for &node in &cur {
            let Some(obj) = node.as_object() else {
                continue;
            };
            match step {
                Step::Key(key) => {
                    if let Some(v) = obj.get(key.as_str()) {
                        push_flat(v, &mut next);
                    }
                }
                Step::Field(name, Some(ty)) => {
                    if let Some(v) = obj.get(&format!("{name}{}", upper_first(ty))) {
                        push_flat(v, &mut next);
                    }
                }
                Step::Field(name, None) => match obj.get(name) {
                    Some(v) => push_flat(v, &mut next),
                    None => {
                        // a choice element named without its type: any `nameType` key.
                        // Keys come sorted, so those starting with `name` are together and
                        // the first key past `name` that does not is the end of them.
                        for (k, v) in obj {
                            match k.strip_prefix(name.as_str()) {
                                Some(sfx) if sfx.starts_with(|c: char| c.is_ascii_uppercase()) => {
                                    push_flat(v, &mut next)
                                }
                                Some(_) => {}
                                None if k.as_str() > name.as_str() => break,
                                None => {}
                            }
                        }
                    }
                },
                Step::Resolves(ty) => {
                    if let Some(r) = obj.get("reference").and_then(Value::as_str)
                        && reference_parts(r).is_some_and(|(t, _)| t == ty.as_str())
                    {
                        next.push(node);
                    }
                }
                Step::System(sys) => {
                    if obj.get("system").and_then(Value::as_str) == Some(sys.as_str()) {
                        next.push(node);
                    }
                }
            }
        }
        std::mem::swap(&mut cur, &mut next);
    }
    out.extend(cur);
}

/// `(type, id)` of a reference string: `Type/id`, `Type/id/_history/v`, or an absolute URL
/// ending in one of those.
pub(crate) fn parse_reference(r: &str) -> (Option<String>, Option<String>) {
    match reference_parts(r) {
        Some((t, i)) => (Some(t.to_owned()), Some(i.to_owned())),
        None => (None, None),
    }
}

/// [`parse_reference`] without copying: the type and id within `r`.
fn reference_parts(r: &str) -> Option<(&str, &str)> {
    if r.starts_with('#') || r.starts_with("urn:") {
        return None;
    }
    // the last four segments are all any form needs
    let mut last = r.rsplitn(5, '/');
    let (s1, s2) = (last.next()?, last.next()?);
    let (t, i) = if s2 == "_history" {
        // Type/id/_history/v (an id cannot be `_history`, so this is never a plain Type/id)
        let s3 = last.next()?;
        (last.next()?, s3)
    } else {
        (s2, s1)
    };
    (is_known_resource_type(t) && is_valid_id(i)).then_some((t, i))
}

fn decimal_of(v: &Value) -> Option<super::types::Decimal> {
    match v {
        Value::Number(n) => parse_decimal(&n.to_string()),
        _ => None,
    }
}

fn opt_str(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_owned)
}

const CONTACT_SYSTEMS: &[&str] = &["phone", "fax", "email", "pager", "url", "sms", "other"];

fn convert(ptype: ParamType, v: &Value, out: &mut Vec<SearchValue>) {
    match ptype {
        ParamType::Token => match v {
            Value::Bool(b) => out.push(SearchValue::Token {
                system: None,
                code: Some(b.to_string()),
                text: None,
            }),
            Value::String(s) => out.push(SearchValue::Token {
                system: None,
                code: Some(s.clone()),
                text: None,
            }),
            Value::Object(o) => {
                if let Some(codings) = o.get("coding").and_then(Value::as_array) {
                    let cc_text = opt_str(v, "text");
                    for c in codings {
                        out.push(SearchValue::Token {
                            system: opt_str(c, "system"),
                            code: opt_str(c, "code"),
                            text: opt_str(c, "display").or_else(|| cc_text.clone()),
                        });
                    }
                    if codings.is_empty() && cc_text.is_some() {
                        out.push(SearchValue::Token {
                            system: None,
                            code: None,
                            text: cc_text,
                        });
                    }
                } else if o.contains_key("value") {
                    let system = opt_str(v, "system");
                    let contact = system
                        .as_deref()
                        .is_some_and(|s| CONTACT_SYSTEMS.contains(&s))
                        && !o.contains_key("type");
                    out.push(SearchValue::Token {
                        system: if contact { None } else { system },
                        code: opt_str(v, "value"),
                        text: v
                            .get("type")
                            .and_then(|t| t.get("text"))
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                    });
                } else if o.contains_key("code") || o.contains_key("system") {
                    out.push(SearchValue::Token {
                        system: opt_str(v, "system"),
                        code: opt_str(v, "code"),
                        text: opt_str(v, "display"),
                    });
                } else if let Some(t) = opt_str(v, "text") {
                    out.push(SearchValue::Token {
                        system: None,
                        code: None,
                        text: Some(t),
                    });
                }
            }
            _ => {}
        },
        ParamType::String => match v {
            Value::String(s) => out.push(SearchValue::String(s.clone())),
            Value::Object(o) => {
                for k in [
                    "family",
                    "given",
                    "prefix",
                    "suffix",
                    "text",
                    "line",
                    "city",
                    "district",
                    "state",
                    "postalCode",
                    "country",
                ] {
                    match o.get(k) {
                        Some(Value::String(s)) => out.push(SearchValue::String(s.clone())),
                        Some(Value::Array(a)) => out.extend(
                            a.iter()
                                .filter_map(Value::as_str)
                                .map(|s| SearchValue::String(s.to_owned())),
                        ),
                        _ => {}
                    }
                }
            }
            _ => {}
        },
        ParamType::Date => match v {
            Value::String(s) => {
                if let Some(r) = parse_date(s) {
                    out.push(SearchValue::Date(r));
                }
            }
            Value::Object(o) => {
                if o.contains_key("start") || o.contains_key("end") {
                    let lo = match o.get("start").and_then(Value::as_str) {
                        Some(s) => parse_date(s).map(|r| r.lo),
                        None => Some(i64::MIN),
                    };
                    let hi = match o.get("end").and_then(Value::as_str) {
                        Some(s) => parse_date(s).map(|r| r.hi),
                        None => Some(i64::MAX),
                    };
                    if let (Some(lo), Some(hi)) = (lo, hi)
                        && hi > lo
                    {
                        out.push(SearchValue::Date(DateRange { lo, hi }));
                    }
                } else if let Some(ev) = o.get("event").and_then(Value::as_array) {
                    out.extend(
                        ev.iter()
                            .filter_map(Value::as_str)
                            .filter_map(parse_date)
                            .map(SearchValue::Date),
                    );
                }
            }
            _ => {}
        },
        ParamType::Reference => match v {
            Value::Object(o) => {
                if let Some(r) = o.get("reference").and_then(Value::as_str) {
                    if r.starts_with('#') {
                        return;
                    }
                    let (rtype, id) = parse_reference(r);
                    out.push(SearchValue::Reference {
                        rtype,
                        id,
                        url: r.to_owned(),
                    });
                }
            }
            Value::String(s) => {
                let (rtype, id) = parse_reference(s);
                out.push(SearchValue::Reference {
                    rtype,
                    id,
                    url: s.clone(),
                });
            }
            _ => {}
        },
        ParamType::Quantity => {
            if let Some(value) = v.get("value").and_then(decimal_of) {
                if let Some(cur) = opt_str(v, "currency") {
                    out.push(SearchValue::Quantity {
                        value,
                        system: Some("urn:iso:std:iso:4217".into()),
                        code: Some(cur),
                        unit: None,
                    });
                } else {
                    out.push(SearchValue::Quantity {
                        value,
                        system: opt_str(v, "system"),
                        code: opt_str(v, "code"),
                        unit: opt_str(v, "unit"),
                    });
                }
            }
        }
        ParamType::Number => {
            if let Some(d) = decimal_of(v) {
                out.push(SearchValue::Number(d));
            }
        }
        ParamType::Uri => {
            if let Some(s) = v.as_str() {
                out.push(SearchValue::Uri(s.to_owned()));
            }
        }
        ParamType::Composite | ParamType::Special => {}
    }
}

/// The values of parameter `def` in `resource`. Never panics on any JSON.
pub fn extract(def: &SearchParamDef, resource: &Value) -> Vec<SearchValue> {
    extractor(def)
        .map(|e| e.extract(resource))
        .unwrap_or_default()
}

/// The top-level fields of a resource that [`extract`] of `def` reads: `(name, choice)`,
/// where `choice` means any key `name` followed by a type name (`effective` →
/// `effectiveDateTime`, `effectivePeriod`, …). None when that cannot be said.
pub fn top_fields(def: &SearchParamDef) -> Option<Vec<(String, bool)>> {
    extractor(def)?.top_fields()
}

/// Whether a top-level `key` is one of `fields` (see [`top_fields`]).
pub fn field_selected(fields: &[(String, bool)], key: &str) -> bool {
    fields.iter().any(|(name, choice)| {
        key == name
            || (*choice
                && key
                    .strip_prefix(name.as_str())
                    .is_some_and(|sfx| sfx.starts_with(|c: char| c.is_ascii_uppercase())))
    })
}

/// Parse a resource keeping only the top-level `fields` (see [`top_fields`]); the others
/// are skipped without being built. Enough to evaluate the parameters the fields came
/// from, at a fraction of the cost of a whole parse.
pub fn parse_fields(bytes: &[u8], fields: &[(String, bool)]) -> Result<Value, serde_json::Error> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Top<'f>(&'f [(String, bool)]);
    impl<'de> Visitor<'de> for Top<'_> {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if field_selected(self.0, &key) {
                    out.insert(key.into_owned(), map.next_value::<Value>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Value::Object(out))
        }
    }
    impl<'de> DeserializeSeed<'de> for Top<'_> {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = Top(fields).deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// A parameter's compiled expression, looked up once: what [`extract`] does without the
/// two registry look-ups per call (callers that index every parameter of every resource
/// keep one per parameter).
#[derive(Debug, Clone, Copy)]
pub struct Extractor {
    ptype: ParamType,
    compiled: &'static Compiled,
}

/// The [`Extractor`] of `def`, if it has an expression.
pub fn extractor(def: &SearchParamDef) -> Option<Extractor> {
    REGISTRY
        .compiled
        .get(def.base.as_str())
        .and_then(|m| m.get(def.code.as_str()))
        .map(|compiled| Extractor {
            ptype: def.ptype,
            compiled,
        })
}

impl Extractor {
    /// See [`top_fields`]. Compiled paths start with a `Key` (an element with its type)
    /// or a bare `Field` (any type of a choice element).
    fn top_fields(&self) -> Option<Vec<(String, bool)>> {
        match self.compiled {
            Compiled::Deceased => Some(vec![
                ("deceasedBoolean".into(), false),
                ("deceasedDateTime".into(), false),
            ]),
            Compiled::Paths(paths) => paths
                .iter()
                .map(|p| match p.first() {
                    Some(Step::Key(k)) => Some((k.clone(), false)),
                    Some(Step::Field(name, None)) => Some((name.clone(), true)),
                    _ => None,
                })
                .collect(),
        }
    }

    /// The values of the parameter in `resource` (see [`extract`]).
    pub fn extract(&self, resource: &Value) -> Vec<SearchValue> {
        let mut out = Vec::new();
        match self.compiled {
            Compiled::Deceased => {
                let dead = resource
                    .get("deceasedBoolean")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                    || resource.get("deceasedDateTime").is_some();
                out.push(SearchValue::Token {
                    system: None,
                    code: Some(dead.to_string()),
                    text: None,
                });
            }
            Compiled::Paths(paths) => {
                let mut nodes = Vec::new();
                for p in paths {
                    eval(resource, p, &mut nodes);
                }
                for n in nodes {
                    convert(self.ptype, n, &mut out);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selected_fields_extract_like_the_whole_resource() {
        let resources = [
            json!({"resourceType": "Patient", "id": "p", "meta": {"lastUpdated": "2020-01-01T00:00:00Z"},
                "name": [{"family": "Okafor", "given": ["E"]}], "birthDate": "1968-11-02",
                "gender": "male", "deceasedBoolean": false, "address": [{"city": "Worcester"}],
                "identifier": [{"system": "s", "value": "v"}], "telecom": [{"system": "phone", "value": "1"}],
                "generalPractitioner": [{"reference": "Practitioner/x"}], "active": true}),
            json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "1-8"}]},
                "subject": {"reference": "Patient/p"}, "encounter": {"reference": "Encounter/e"},
                "effectivePeriod": {"start": "2020-01-01", "end": "2020-01-02"},
                "valueQuantity": {"value": 5.5, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"},
                "component": [{"code": {"coding": [{"code": "x"}]}, "valueString": "s"}],
                "category": [{"coding": [{"code": "laboratory"}]}], "performer": [{"reference": "Practitioner/x"}]}),
            json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
                "subject": {"reference": "Patient/p"}, "period": {"start": "2020-01-01T10:00:00Z"},
                "participant": [{"individual": {"reference": "Practitioner/x"}}],
                "reasonCode": [{"text": "cough"}], "serviceProvider": {"reference": "Organization/o"}}),
        ];
        let mut checked = 0;
        for r in &resources {
            let rtype = r["resourceType"].as_str().unwrap();
            let bytes = serde_json::to_vec(r).unwrap();
            for def in search_params(rtype) {
                let Some(fields) = top_fields(def) else {
                    continue;
                };
                let partial = parse_fields(&bytes, &fields).unwrap();
                assert_eq!(
                    format!("{:?}", extract(def, &partial)),
                    format!("{:?}", extract(def, r)),
                    "{rtype}.{}",
                    def.code
                );
                checked += 1;
            }
        }
        assert!(checked > 50, "{checked}");
        assert!(parse_fields(b"[1]", &[]).is_err());
        assert!(parse_fields(b"{\"a\":1} x", &[]).is_err());
        assert!(field_selected(&[("value".into(), true)], "valueQuantity"));
        assert!(!field_selected(&[("value".into(), true)], "valuex"));
        assert!(!field_selected(&[("status".into(), false)], "statusReason"));
    }

    const REQUIRED: &[&str] = &[
        "Patient",
        "Practitioner",
        "Organization",
        "Encounter",
        "Condition",
        "Observation",
        "Procedure",
        "MedicationRequest",
        "AllergyIntolerance",
        "Immunization",
        "DiagnosticReport",
        "DocumentReference",
        "Claim",
        "ExplanationOfBenefit",
        "CarePlan",
        "Coverage",
    ];

    #[test]
    fn every_parameter_of_the_required_types_is_served() {
        // every non-composite, non-special parameter in the definitions for these types
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(SEARCH_PARAMS_GZ)
            .read_to_end(&mut text)
            .unwrap();
        let b: Value = serde_json::from_slice(&text).unwrap();
        let mut missing = Vec::new();
        for e in b["entry"].as_array().unwrap() {
            let r = &e["resource"];
            let t = r["type"].as_str().unwrap();
            if t == "composite" || t == "special" {
                continue;
            }
            for base in r["base"].as_array().unwrap() {
                let base = base.as_str().unwrap();
                if REQUIRED.contains(&base) {
                    let code = r["code"].as_str().unwrap();
                    if search_param(base, code).is_none() {
                        missing.push(format!("{base}.{code}"));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "not served: {missing:?}");
        for t in REQUIRED {
            assert!(search_param(t, "_id").is_some());
            assert!(search_param(t, "_lastUpdated").is_some());
        }
    }

    fn def(t: &str, c: &str) -> &'static SearchParamDef {
        search_param(t, c).unwrap_or_else(|| panic!("{t}.{c}"))
    }

    #[test]
    fn patient_values() {
        let p = json!({
            "resourceType": "Patient",
            "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
            "birthDate": "1974-12-25",
            "gender": "male",
            "identifier": [{"system": "urn:oid:1", "value": "12345"}],
            "telecom": [{"system": "phone", "value": "555-0100"}, {"system": "email", "value": "p@x.org"}],
            "address": [{"line": ["534 Erewhon St"], "city": "PleasantVille"}],
            "deceasedDateTime": "2020-01-01"
        });
        assert_eq!(
            extract(def("Patient", "family"), &p),
            vec![SearchValue::String("Chalmers".into())]
        );
        assert_eq!(extract(def("Patient", "name"), &p).len(), 3);
        assert_eq!(extract(def("Patient", "address"), &p).len(), 2);
        assert_eq!(
            extract(def("Patient", "identifier"), &p),
            vec![SearchValue::Token {
                system: Some("urn:oid:1".into()),
                code: Some("12345".into()),
                text: None
            }]
        );
        assert_eq!(
            extract(def("Patient", "phone"), &p),
            vec![SearchValue::Token {
                system: None,
                code: Some("555-0100".into()),
                text: None
            }]
        );
        assert_eq!(extract(def("Patient", "telecom"), &p).len(), 2);
        assert!(matches!(
            extract(def("Patient", "birthdate"), &p)[..],
            [SearchValue::Date(_)]
        ));
        assert_eq!(
            extract(def("Patient", "deceased"), &p),
            vec![SearchValue::Token {
                system: None,
                code: Some("true".into()),
                text: None
            }]
        );
        assert_eq!(
            extract(def("Patient", "gender"), &p),
            vec![SearchValue::Token {
                system: None,
                code: Some("male".into()),
                text: None
            }]
        );
    }

    #[test]
    fn observation_values() {
        let o = json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
            "subject": {"reference": "Patient/abc"},
            "effectiveDateTime": "2020-03-15T10:30:00Z",
            "valueQuantity": {"value": 5.4, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}
        });
        assert_eq!(
            extract(def("Observation", "patient"), &o),
            vec![SearchValue::Reference {
                rtype: Some("Patient".into()),
                id: Some("abc".into()),
                url: "Patient/abc".into()
            }]
        );
        assert_eq!(extract(def("Observation", "subject"), &o).len(), 1);
        assert_eq!(extract(def("Observation", "code"), &o).len(), 1);
        assert!(matches!(
            extract(def("Observation", "date"), &o)[..],
            [SearchValue::Date(_)]
        ));
        match &extract(def("Observation", "value-quantity"), &o)[..] {
            [SearchValue::Quantity { value, code, .. }] => {
                assert!((value.value - 5.4).abs() < 1e-9);
                assert_eq!(code.as_deref(), Some("mmol/L"));
            }
            other => panic!("{other:?}"),
        }
        let g = json!({"resourceType": "Observation", "subject": {"reference": "Group/g1"}});
        assert!(extract(def("Observation", "patient"), &g).is_empty());
        let p = json!({"resourceType": "Observation", "effectivePeriod": {"start": "2020-01-01"}});
        match &extract(def("Observation", "date"), &p)[..] {
            [SearchValue::Date(r)] => assert_eq!(r.hi, i64::MAX),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_types() {
        let c = json!({"resourceType": "Condition", "onsetDateTime": "2019-05", "subject": {"reference": "Patient/p"}});
        assert_eq!(extract(def("Condition", "onset-date"), &c).len(), 1);
        let m = json!({"resourceType": "MedicationRequest", "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]}});
        assert_eq!(extract(def("MedicationRequest", "code"), &m).len(), 1);
        let e = json!({"resourceType": "Encounter", "period": {"start": "2020-01-01T10:00:00Z", "end": "2020-01-01T11:00:00Z"},
            "participant": [{"individual": {"reference": "Practitioner/d1"}}]});
        assert_eq!(extract(def("Encounter", "practitioner"), &e).len(), 1);
        assert_eq!(extract(def("Encounter", "date"), &e).len(), 1);
        let cl = json!({"resourceType": "Claim", "total": {"value": 12.5, "currency": "USD"}, "created": "2020-01-01"});
        assert_eq!(extract(def("Claim", "created"), &cl).len(), 1);
        assert_eq!(
            parse_reference("https://x.org/fhir/Patient/12/_history/3"),
            (Some("Patient".into()), Some("12".into()))
        );
        assert_eq!(parse_reference("urn:uuid:abc"), (None, None));
    }

    #[test]
    fn choice_elements_are_found_among_keys_written_in_any_order() {
        // the scan for `effective[x]` stops at the first key past `effective…`, which
        // relies on object keys coming sorted (serde_json without `preserve_order`)
        let text = r#"{"resourceType": "Observation", "zeta": 1, "status": "final",
            "effectiveDateTime": "2020-01-01", "abc": 2, "effectivf": 3, "effectiveX": 4}"#;
        let o: Value = serde_json::from_str(text).unwrap();
        let d = search_params("Observation")
            .iter()
            .find(|d| d.code == "date")
            .unwrap();
        assert_eq!(extract(d, &o).len(), 1, "{:?}", extract(d, &o));
    }

    /// The split-and-collect form `reference_parts` replaced, as the oracle.
    fn parts_by_split(r: &str) -> Option<(String, String)> {
        if r.starts_with('#') || r.starts_with("urn:") {
            return None;
        }
        let segs: Vec<&str> = r.split('/').collect();
        let n = segs.len();
        let pick = |t: &str, i: &str| {
            (is_known_resource_type(t) && is_valid_id(i)).then(|| (t.to_owned(), i.to_owned()))
        };
        if n >= 4 && segs[n - 2] == "_history" {
            pick(segs[n - 4], segs[n - 3])
        } else if n >= 2 {
            pick(segs[n - 2], segs[n - 1])
        } else {
            None
        }
    }

    proptest::proptest! {
        #[test]
        fn reference_parts_agree_with_splitting(
            segs in proptest::collection::vec(
                proptest::sample::select(vec!["Patient", "Observation", "_history", "12", "a.b", "", "x y", "https:", "#c", "urn:uuid:1", "3"]),
                0..7,
            )
        ) {
            let r = segs.join("/");
            let got = reference_parts(&r).map(|(t, i)| (t.to_owned(), i.to_owned()));
            proptest::prop_assert_eq!(got, parts_by_split(&r), "{:?}", r);
        }

        #[test]
        fn extraction_never_panics(v in proptest::arbitrary::any::<String>()) {
            let j: Value = serde_json::from_str(&v).unwrap_or(Value::String(v.clone()));
            for t in ["Patient", "Observation", "Encounter"] {
                for d in search_params(t) {
                    let _ = extract(d, &j);
                    let _ = extract(d, &json!({"name": [j.clone()], "code": j.clone(), "subject": j.clone(), "effectivePeriod": j.clone()}));
                }
            }
        }
    }
}

#[cfg(test)]
mod owner_tests {
    use super::*;

    #[test]
    fn narrower_parameters_share_the_wider_index() {
        let o = |t: &str, c: &str| index_owner(search_param(t, c).unwrap());
        assert_eq!(o("Observation", "patient"), "subject");
        assert_eq!(o("Observation", "subject"), "subject");
        assert_eq!(o("Observation", "code"), "combo-code");
        assert_eq!(o("Patient", "family"), "name");
        assert_eq!(o("Patient", "phonetic"), "name");
        assert_eq!(o("Patient", "name"), "name");
        assert_eq!(o("Patient", "address-city"), "address");
        assert_eq!(o("Patient", "phone"), "telecom");
        assert_eq!(o("Patient", "birthdate"), "birthdate");
        assert_eq!(o("Patient", "gender"), "gender");
    }
}
