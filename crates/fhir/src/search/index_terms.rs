//! Index terms: the byte strings under which values are indexed, and the lookup of a
//! query over them. Lookups are *complete* (every true match carries at least one term
//! of the lookup), not exact: candidates are verified by decryption.
//!
//! Encoding (one kind byte, then the payload):
//! - string: `^` the first 3 characters of the normalised value (nothing else: `:exact`
//!   looks up the prefix of its normalised value, `:contains` has no index and is
//!   answered by verifying the other criteria's candidates or a bounded scan);
//! - token: `c` code (a `system|code` query looks up the code and verifies the system);
//! - reference: `r` `Type/id`, `u` URL; uri: `u` value;
//! - number/quantity: `n` integer floor (units are verified);
//! - date: `p` (a value within one UTC day) + a bucket: `Y` year, `M` month, `d` day,
//!   `F<`/`F>` before 1800 / from 2200; a longer value has `s` (start) and `e` (end)
//!   buckets, which add `C` century and `D` decade, in an index of their own
//!   ([`span_index`]); `s-` an open start, `e+` an open end. (One-day values have no
//!   decade level: a half-open range costs at most a few hundred year terms at query time,
//!   which is cheaper than two more rows for every date.)
//!
//! Every row costs import time and tells a database thief something (equality and
//! frequency of what it hashes); one row per value, on the coarsest term that keeps
//! lookups selective, is the trade-off (see ARCHITECTURE.md).

use super::datetime::{civil_from_days, days_from_civil};
use super::matching::normalize;
use super::registry::{index_owner, parse_reference};
use super::types::{
    Criterion, DateRange, Lookup, Modifier, ParamType, Prefix, QueryValue, SearchParamDef,
    SearchValue, Target,
};

const DAY_MS: i64 = 86_400_000;
/// Most terms one criterion may look up before the index is not worth it.
const MAX_TERMS: usize = 1024;
/// Prefix length of the string prefix term.
const PREFIX_CHARS: usize = 3;

/// The index that holds the *span* terms (`s…`, `e…`: dates that do not fall within one
/// day) of date parameter `param`. Spans have an index of their own: the open ranges a
/// `ge`/`lt` query looks up on them cover centuries of buckets, which in a shared index
/// would collide (tokens are truncated) with the far more numerous one-day values.
pub fn span_index(param: &str) -> String {
    format!("{param}~span")
}

/// Whether `term` is a span term (see [`span_index`]).
pub fn is_span_term(term: &[u8]) -> bool {
    term.first().is_some_and(|k| is_span_kind(*k))
}

/// Span starts and ends (`s`, `e`): they carry century and decade buckets too (spans are
/// few, and the open ranges of `ge`/`lt` queries on them would otherwise cost hundreds of
/// year terms); one-day values do not (they are most rows).
fn is_span_kind(kind: u8) -> bool {
    matches!(kind, b's' | b'e')
}

fn term(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(payload.len() + 1);
    t.push(kind);
    t.extend_from_slice(payload);
    t
}

fn first_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn low_day() -> i64 {
    days_from_civil(1800, 1, 1)
}

fn high_day() -> i64 {
    days_from_civil(2200, 1, 1)
}

/// A date bucket, written after a term's kind byte (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bucket {
    /// Before 1800 (`F<`).
    Before,
    /// From 2200 (`F>`).
    After,
    Century(i64),
    Decade(i64),
    Year(i64),
    Month(i64, i64),
    Day(i64, i64, i64),
}

/// `v` in decimal (as `format!("{v}")` writes it).
fn push_int(t: &mut Vec<u8>, v: i64) {
    if v < 0 {
        t.push(b'-');
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = v.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    t.extend_from_slice(&digits[i..]);
}

impl Bucket {
    /// The term of this bucket for `kind` (`p`, `s` or `e`).
    fn term(self, kind: u8) -> Vec<u8> {
        let (tag, values, n): (&[u8], [i64; 3], usize) = match self {
            Bucket::Before => (b"F<", [0; 3], 0),
            Bucket::After => (b"F>", [0; 3], 0),
            Bucket::Century(c) => (b"C", [c, 0, 0], 1),
            Bucket::Decade(d) => (b"D", [d, 0, 0], 1),
            Bucket::Year(y) => (b"Y", [y, 0, 0], 1),
            Bucket::Month(y, m) => (b"M", [y, m, 0], 2),
            Bucket::Day(y, m, d) => (b"d", [y, m, d], 3),
        };
        let mut t = Vec::with_capacity(16);
        t.push(kind);
        t.extend_from_slice(tag);
        for (i, v) in values[..n].iter().enumerate() {
            if i > 0 {
                t.push(b'-');
            }
            push_int(&mut t, *v);
        }
        t
    }
}

/// Whether index term `term` is a date term no finer than a month: one that names no
/// day (what a memory of tokens may hold; see the server's blind-index keys).
pub fn is_coarse_date_term(term: &[u8]) -> bool {
    match term {
        [b's', b'-'] | [b'e', b'+'] => true,
        [b'p' | b's' | b'e', tag, ..] => matches!(tag, b'C' | b'D' | b'Y' | b'M' | b'F'),
        _ => false,
    }
}

/// The buckets of one day: year, month, day (or the far bucket).
fn day_buckets(day: i64, kind: u8, out: &mut Vec<Vec<u8>>) {
    if day < low_day() {
        out.push(Bucket::Before.term(kind));
        return;
    }
    if day >= high_day() {
        out.push(Bucket::After.term(kind));
        return;
    }
    let (y, m, d) = civil_from_days(day);
    if is_span_kind(kind) {
        out.push(Bucket::Century(y / 100).term(kind));
        out.push(Bucket::Decade(y / 10).term(kind));
    }
    out.push(Bucket::Year(y).term(kind));
    out.push(Bucket::Month(y, m).term(kind));
    out.push(Bucket::Day(y, m, d).term(kind));
}

fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// Aligned buckets exactly covering the days `[a, b)` (both within the bucketed years).
fn cover(a: i64, b: i64, coarse: bool, out: &mut Vec<Bucket>) {
    let mut cur = a;
    while cur < b {
        let (y, m, d) = civil_from_days(cur);
        if coarse && m == 1 && d == 1 {
            let mut done = false;
            for (width, bucket) in [
                (100, Bucket::Century as fn(i64) -> Bucket),
                (10, Bucket::Decade),
            ] {
                let end = days_from_civil(y + width, 1, 1);
                if y % width == 0 && end <= b {
                    out.push(bucket(y / width));
                    cur = end;
                    done = true;
                    break;
                }
            }
            if done {
                continue;
            }
        }
        if m == 1 && d == 1 {
            let end = days_from_civil(y + 1, 1, 1);
            if end <= b {
                out.push(Bucket::Year(y));
                cur = end;
                continue;
            }
        }
        if d == 1 {
            let end = if m == 12 {
                days_from_civil(y + 1, 1, 1)
            } else {
                days_from_civil(y, m + 1, 1)
            };
            if end <= b {
                out.push(Bucket::Month(y, m));
                cur = end;
                continue;
            }
        }
        out.push(Bucket::Day(y, m, d));
        cur += 1;
    }
}

/// A day range, `None` bounds open.
#[derive(Debug, Clone, Copy)]
struct Days {
    lo: Option<i64>,
    hi: Option<i64>,
}

impl Days {
    const ALL: Days = Days { lo: None, hi: None };
    fn is_all(&self) -> bool {
        self.lo.is_none() && self.hi.is_none()
    }
    fn intersect(self, o: Days) -> Days {
        Days {
            lo: match (self.lo, o.lo) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            hi: match (self.hi, o.hi) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
    fn is_empty(&self) -> bool {
        matches!((self.lo, self.hi), (Some(a), Some(b)) if a >= b)
    }
}

/// Terms of kinds `kinds` for the days in `r`, plus `open` when `r` is unbounded on the
/// side that open values (`s-` / `e+`) fall on.
fn day_terms(r: Days, kinds: &[u8], open: Option<(&[u8], bool)>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if r.is_empty() {
        return out;
    }
    let (lo, hi) = (r.lo.unwrap_or(i64::MIN), r.hi.unwrap_or(i64::MAX));
    let mut buckets = Vec::new();
    if lo < low_day() {
        buckets.push(Bucket::Before);
    }
    if hi > high_day() {
        buckets.push(Bucket::After);
    }
    cover(
        lo.max(low_day()),
        hi.min(high_day()),
        kinds.iter().all(|k| is_span_kind(*k)),
        &mut buckets,
    );
    for k in kinds {
        for b in &buckets {
            out.push(b.term(*k));
        }
    }
    if let Some((t, low_side)) = open
        && ((low_side && r.lo.is_none()) || (!low_side && r.hi.is_none()))
    {
        out.push(t.to_vec());
    }
    out
}

/// The terms under which `value` of parameter `def` is indexed (appended to `out`).
pub fn index_terms(value: &SearchValue, out: &mut Vec<Vec<u8>>) {
    match value {
        SearchValue::String(s) => {
            let n = normalize(s);
            if !n.is_empty() {
                out.push(term(b'^', first_chars(&n, PREFIX_CHARS).as_bytes()));
            }
        }
        SearchValue::Token { code, .. } => {
            if let Some(c) = code {
                out.push(term(b'c', c.as_bytes()));
            }
        }
        SearchValue::Reference { rtype, id, url } => match (rtype, id) {
            (Some(t), Some(i)) => out.push(term(b'r', format!("{t}/{i}").as_bytes())),
            _ => out.push(term(b'u', url.as_bytes())),
        },
        SearchValue::Uri(u) => out.push(term(b'u', u.as_bytes())),
        SearchValue::Number(d) => {
            if d.value.abs() < 1e15 {
                out.push(term(b'n', format!("{}", d.value.floor() as i64).as_bytes()));
            }
        }
        SearchValue::Quantity { value, .. } => {
            if value.value.abs() < 1e15 {
                out.push(term(
                    b'n',
                    format!("{}", value.value.floor() as i64).as_bytes(),
                ));
            }
        }
        SearchValue::Date(DateRange { lo, hi }) => {
            let open_lo = *lo == i64::MIN;
            let open_hi = *hi == i64::MAX;
            if !open_lo && !open_hi && day_of(*lo) == day_of(hi - 1) {
                day_buckets(day_of(*lo), b'p', out);
                return;
            }
            if open_lo {
                out.push(b"s-".to_vec());
            } else {
                day_buckets(day_of(*lo), b's', out);
            }
            if open_hi {
                out.push(b"e+".to_vec());
            } else {
                day_buckets(day_of(hi - 1), b'e', out);
            }
        }
    }
}

/// Conditions a date prefix puts on a value's start day and end day.
fn date_condition(p: Prefix, q: DateRange) -> Option<(Days, Days)> {
    let first = day_of(q.lo);
    let last = day_of(q.hi - 1);
    Some(match p {
        Prefix::Eq => (
            Days {
                lo: Some(first),
                hi: Some(last + 1),
            },
            Days::ALL,
        ),
        Prefix::Lt => (
            Days {
                lo: None,
                hi: Some(day_of(q.lo - 1) + 1),
            },
            Days::ALL,
        ),
        Prefix::Le => (
            Days {
                lo: None,
                hi: Some(last + 1),
            },
            Days::ALL,
        ),
        Prefix::Sa => (
            Days {
                lo: Some(day_of(q.hi)),
                hi: None,
            },
            Days::ALL,
        ),
        Prefix::Gt => (
            Days::ALL,
            Days {
                lo: Some(day_of(q.hi)),
                hi: None,
            },
        ),
        Prefix::Ge => (
            Days::ALL,
            Days {
                lo: Some(first),
                hi: None,
            },
        ),
        Prefix::Eb => (
            Days::ALL,
            Days {
                lo: None,
                hi: Some(day_of(q.lo - 1) + 1),
            },
        ),
        Prefix::Ne | Prefix::Ap => return None,
    })
}

fn terms(param: &str, t: Vec<Vec<u8>>) -> Lookup {
    if t.len() > MAX_TERMS {
        return Lookup::All;
    }
    Lookup::Terms {
        param: param.to_owned(),
        terms: t,
    }
}

/// The lookup of one date condition pair (start days S, end days E).
fn date_lookup(param: &str, s: Days, e: Days) -> Lookup {
    if s.is_all() && e.is_all() {
        return Lookup::All;
    }
    // values within one day: their day must satisfy both
    let points = day_terms(s.intersect(e), b"p", None);
    // spans: start in S and end in E
    let sp = span_index(param);
    let mut span = Vec::new();
    if !s.is_all() {
        span.push(terms(&sp, day_terms(s, b"s", Some((b"s-", true)))));
    }
    if !e.is_all() {
        span.push(terms(&sp, day_terms(e, b"e", Some((b"e+", false)))));
    }
    let span = match span.len() {
        1 => span.remove(0),
        _ => Lookup::And(span),
    };
    if points.is_empty() {
        return simplify(span);
    }
    simplify(Lookup::Or(vec![terms(param, points), span]))
}

fn simplify(l: Lookup) -> Lookup {
    match l {
        Lookup::And(parts) => {
            let mut v: Vec<Lookup> = parts
                .into_iter()
                .map(simplify)
                .filter(|p| *p != Lookup::All)
                .collect();
            match v.len() {
                0 => Lookup::All,
                1 => v.remove(0),
                _ => Lookup::And(v),
            }
        }
        Lookup::Or(parts) => {
            let v: Vec<Lookup> = parts.into_iter().map(simplify).collect();
            if v.is_empty() || v.contains(&Lookup::All) {
                return Lookup::All;
            }
            // merge term sets of one parameter
            let mut merged: Vec<Lookup> = Vec::new();
            for p in v {
                if let Lookup::Terms { param, terms: t } = &p
                    && let Some(Lookup::Terms {
                        param: mp,
                        terms: mt,
                    }) = merged
                        .iter_mut()
                        .find(|m| matches!(m, Lookup::Terms { param: x, .. } if x == param))
                {
                    let _ = mp;
                    mt.extend(t.iter().cloned());
                    continue;
                }
                merged.push(p);
            }
            for m in &mut merged {
                if let Lookup::Terms { terms: t, .. } = m {
                    t.sort();
                    t.dedup();
                    if t.len() > MAX_TERMS {
                        return Lookup::All;
                    }
                }
            }
            if merged.len() == 1 {
                merged.remove(0)
            } else {
                Lookup::Or(merged)
            }
        }
        other => other,
    }
}

fn value_lookup(def: &SearchParamDef, m: &Modifier, v: &QueryValue) -> Lookup {
    let p = index_owner(def);
    let one = |kind: u8, payload: &[u8]| terms(p, vec![term(kind, payload)]);
    match v {
        // `:missing` is answered by verification (no presence rows: they would cost one
        // index row per parameter per resource for a rarely used modifier)
        QueryValue::Missing(_) => Lookup::All,
        QueryValue::Text(t) => match (def.ptype, m) {
            (ParamType::String, Modifier::Contains) => Lookup::All,
            (ParamType::String, _) => {
                // the default match is a prefix of the normalised value; `:exact` values
                // normalise to the query's normalised text, so share its prefix
                let n = normalize(t);
                if n.is_empty() || (*m != Modifier::Exact && n.chars().count() < PREFIX_CHARS) {
                    Lookup::All
                } else {
                    one(b'^', first_chars(&n, PREFIX_CHARS).as_bytes())
                }
            }
            _ => Lookup::All,
        },
        QueryValue::Token { code, .. } => match code {
            Some(c) => one(b'c', c.as_bytes()),
            None => Lookup::All,
        },
        QueryValue::Reference { rtype, id, is_url } => {
            if *is_url {
                let mut t = vec![term(b'u', id.as_bytes())];
                if let (Some(rt), Some(i)) = parse_reference(id) {
                    t.push(term(b'r', format!("{rt}/{i}").as_bytes()));
                }
                return terms(p, t);
            }
            match rtype {
                Some(rt) => one(b'r', format!("{rt}/{id}").as_bytes()),
                None => terms(
                    p,
                    def.targets
                        .iter()
                        .map(|t| term(b'r', format!("{t}/{id}").as_bytes()))
                        .collect(),
                ),
            }
        }
        QueryValue::Uri(u) => match m {
            Modifier::Below | Modifier::Above => Lookup::All,
            _ => one(b'u', u.as_bytes()),
        },
        QueryValue::Number(prefix, d) => floors(p, *prefix, d.value, d.half_ulp),
        QueryValue::Quantity { prefix, value, .. } => {
            floors(p, *prefix, value.value, value.half_ulp)
        }
        QueryValue::Date(prefix, q) => match date_condition(*prefix, *q) {
            Some((s, e)) => date_lookup(p, s, e),
            None => Lookup::All,
        },
    }
}

fn floors(param: &str, prefix: Prefix, v: f64, h: f64) -> Lookup {
    if prefix != Prefix::Eq || !(v - h).is_finite() || (v + h).abs() >= 1e15 {
        return Lookup::All;
    }
    let (a, b) = ((v - h).floor() as i64, (v + h).floor() as i64);
    if b - a > 64 {
        return Lookup::All;
    }
    terms(
        param,
        (a..=b)
            .map(|f| term(b'n', f.to_string().as_bytes()))
            .collect(),
    )
}

fn criterion_lookup(c: &Criterion) -> Lookup {
    let Target::Param(def) = &c.target else {
        return Lookup::All;
    };
    if matches!(c.modifier, Modifier::Not | Modifier::Text) {
        return Lookup::All;
    }
    simplify(Lookup::Or(
        c.values
            .iter()
            .map(|v| value_lookup(def, &c.modifier, v))
            .collect(),
    ))
}

/// How the index narrows the AND of `criteria`. Chain, `_has`, `_id` and `_lastUpdated`
/// criteria yield nothing here (the server resolves them itself). Single-valued date
/// bounds on one parameter (`date=ge…&date=lt…`) are combined into one bounded range.
pub fn lookup_terms(criteria: &[Criterion]) -> Lookup {
    let mut parts = Vec::new();
    let mut dates: Vec<(&'static SearchParamDef, Days, Days)> = Vec::new();
    for c in criteria {
        if let Target::Param(def) = &c.target
            && def.ptype == ParamType::Date
            && c.modifier == Modifier::None
            && let [QueryValue::Date(p, q)] = c.values.as_slice()
            && let Some((s, e)) = date_condition(*p, *q)
        {
            match dates.iter_mut().find(|(d, _, _)| d.code == def.code) {
                Some((_, ds, de)) => {
                    *ds = ds.intersect(s);
                    *de = de.intersect(e);
                }
                None => dates.push((def, s, e)),
            }
            continue;
        }
        parts.push(criterion_lookup(c));
    }
    for (def, s, e) in dates {
        parts.push(date_lookup(index_owner(def), s, e));
    }
    simplify(Lookup::And(parts))
}

#[cfg(test)]
mod tests {
    use super::super::datetime::{parse_date, parse_decimal};
    use super::super::registry::search_param;
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn span_terms_are_looked_up_in_their_own_index() {
        fn walk(l: &Lookup, out: &mut Vec<(String, Vec<u8>)>) {
            match l {
                Lookup::Terms { param, terms } => {
                    out.extend(terms.iter().map(|t| (param.clone(), t.clone())))
                }
                Lookup::And(p) | Lookup::Or(p) => p.iter().for_each(|x| walk(x, out)),
                Lookup::All => {}
            }
        }
        let def = search_param("Encounter", "date").unwrap();
        let q = |s: &str| {
            let (p, r) = match s.split_at(2) {
                ("ge", r) => (Prefix::Ge, r),
                ("lt", r) => (Prefix::Lt, r),
                _ => unreachable!(),
            };
            crit(
                def,
                Modifier::None,
                QueryValue::Date(p, parse_date(r).unwrap()),
            )
        };
        let mut got = Vec::new();
        walk(
            &lookup_terms(&[q("ge2020-03-01"), q("lt2020-04-01")]),
            &mut got,
        );
        assert!(got.iter().any(|(p, _)| p == "date"));
        assert!(got.iter().any(|(p, _)| p == "date~span"));
        for (p, t) in &got {
            assert_eq!(is_span_term(t), p == "date~span", "{p} {t:?}");
        }
    }

    fn holds(l: &Lookup, have: &HashSet<Vec<u8>>) -> bool {
        match l {
            Lookup::Terms { terms, .. } => terms.iter().any(|t| have.contains(t)),
            Lookup::And(p) => p.iter().all(|x| holds(x, have)),
            Lookup::Or(p) => p.iter().any(|x| holds(x, have)),
            Lookup::All => true,
        }
    }

    fn crit(def: &'static SearchParamDef, m: Modifier, v: QueryValue) -> Criterion {
        Criterion {
            target: Target::Param(def),
            modifier: m,
            values: vec![v],
        }
    }

    fn complete(values: &[SearchValue], criteria: &[Criterion]) -> bool {
        let mut have = HashSet::new();
        let mut t = Vec::new();
        for v in values {
            index_terms(v, &mut t);
        }
        have.extend(t);
        holds(&lookup_terms(criteria), &have)
    }

    fn date_str(day: i64, with_time: Option<i64>) -> String {
        let (y, m, d) = civil_from_days(day);
        match with_time {
            None => format!("{y:04}-{m:02}-{d:02}"),
            Some(min) => format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:00Z", min / 60, min % 60),
        }
    }

    fn prefix() -> impl Strategy<Value = Prefix> {
        prop_oneof![
            Just(Prefix::Eq),
            Just(Prefix::Gt),
            Just(Prefix::Lt),
            Just(Prefix::Ge),
            Just(Prefix::Le),
            Just(Prefix::Sa),
            Just(Prefix::Eb),
            Just(Prefix::Ne),
            Just(Prefix::Ap),
        ]
    }

    /// Exact date semantics, restated here independently of the matcher.
    fn date_true(p: Prefix, v: DateRange, q: DateRange) -> Option<bool> {
        Some(match p {
            Prefix::Eq => q.lo <= v.lo && v.hi <= q.hi,
            Prefix::Gt => v.hi > q.hi,
            Prefix::Lt => v.lo < q.lo,
            Prefix::Ge => v.hi > q.lo,
            Prefix::Le => v.lo < q.hi,
            Prefix::Sa => v.lo >= q.hi,
            Prefix::Eb => v.hi <= q.lo,
            _ => return None,
        })
    }

    proptest! {
        #[test]
        fn date_lookups_are_complete(
            vday in -100_000i64..121_000, vlen in 0i64..800, vtime in proptest::option::of(0i64..1440),
            open in 0u8..4,
            q1 in (prefix(), -4000i64..4000, 0u8..4),
            q2 in proptest::option::of((prefix(), -4000i64..4000, 0u8..4)),
        ) {
            let def = search_param("Encounter", "date").unwrap();
            let start = parse_date(&date_str(vday, vtime)).unwrap();
            let end = parse_date(&date_str(vday + vlen, vtime)).unwrap();
            let v = match open {
                0 => start,
                1 => DateRange { lo: start.lo, hi: end.hi },
                2 => DateRange { lo: i64::MIN, hi: end.hi },
                _ => DateRange { lo: start.lo, hi: i64::MAX },
            };
            let mk = |(p, off, prec): (Prefix, i64, u8)| {
                let (y, m, d) = civil_from_days(vday + off);
                let s = match prec {
                    0 => format!("{y:04}"),
                    1 => format!("{y:04}-{m:02}"),
                    2 => format!("{y:04}-{m:02}-{d:02}"),
                    _ => format!("{y:04}-{m:02}-{d:02}T12:30"),
                };
                (p, parse_date(&s).unwrap())
            };
            let mut qs = vec![mk(q1)];
            if let Some(q) = q2 { qs.push(mk(q)); }
            let truth = qs.iter().map(|(p, q)| date_true(*p, v, *q)).collect::<Option<Vec<bool>>>();
            let criteria: Vec<Criterion> = qs.iter().map(|(p, q)| crit(def, Modifier::None, QueryValue::Date(*p, *q))).collect();
            if let Some(t) = truth && t.iter().all(|b| *b) {
                prop_assert!(complete(&[SearchValue::Date(v)], &criteria), "{v:?} {qs:?}");
            }
        }

        #[test]
        fn string_lookups_are_complete(value in "[A-Za-zÀ-ÿ' -]{0,12}", start in 0usize..12, len in 1usize..8, m in 0u8..3) {
            let def = search_param("Patient", "family").unwrap();
            let chars: Vec<char> = value.chars().collect();
            let s = start.min(chars.len());
            let e = (s + len).min(chars.len());
            let query: String = chars[s..e].iter().collect();
            prop_assume!(!query.is_empty());
            let modifier = match m { 0 => Modifier::None, 1 => Modifier::Contains, _ => Modifier::Exact };
            let c = crit(def, modifier.clone(), QueryValue::Text(query.clone()));
            let resource = serde_json::json!({"resourceType": "Patient", "name": [{"family": value}]});
            if c.matches(&resource) {
                prop_assert!(complete(&[SearchValue::String(value.clone())], &[c]));
            }
        }

        #[test]
        fn quantity_lookups_are_complete(v in -1000.0f64..1000.0, q in "[0-9]{1,3}(\\.[0-9]{1,3})?", unit in 0u8..2) {
            let def = search_param("Observation", "value-quantity").unwrap();
            let qd = parse_decimal(&q).unwrap();
            let value = SearchValue::Quantity { value: parse_decimal(&format!("{v}")).unwrap(), system: None, code: Some("mg".into()), unit: None };
            let qv = QueryValue::Quantity { prefix: Prefix::Eq, value: qd, system: None, code: (unit == 1).then(|| "mg".to_string()) };
            let c = crit(def, Modifier::None, qv);
            let resource = serde_json::json!({"resourceType": "Observation", "valueQuantity": {"value": v, "code": "mg"}});
            if c.matches(&resource) {
                prop_assert!(complete(&[value], &[c]));
            }
        }
    }

    #[test]
    fn tokens_and_references() {
        let code = search_param("Observation", "code").unwrap();
        let v = SearchValue::Token {
            system: Some("http://loinc.org".into()),
            code: Some("2339-0".into()),
            text: None,
        };
        for qv in [
            QueryValue::Token {
                system: None,
                code: Some("2339-0".into()),
            },
            QueryValue::Token {
                system: Some(Some("http://loinc.org".into())),
                code: Some("2339-0".into()),
            },
        ] {
            assert!(complete(
                std::slice::from_ref(&v),
                &[crit(code, Modifier::None, qv)]
            ));
        }
        assert!(!complete(
            std::slice::from_ref(&v),
            &[crit(
                code,
                Modifier::None,
                QueryValue::Token {
                    system: None,
                    code: Some("x".into())
                }
            )]
        ));
        let subj = search_param("Observation", "subject").unwrap();
        let r = SearchValue::Reference {
            rtype: Some("Patient".into()),
            id: Some("p1".into()),
            url: "Patient/p1".into(),
        };
        for qv in [
            QueryValue::Reference {
                rtype: Some("Patient".into()),
                id: "p1".into(),
                is_url: false,
            },
            QueryValue::Reference {
                rtype: None,
                id: "p1".into(),
                is_url: false,
            },
            QueryValue::Reference {
                rtype: None,
                id: "https://x/fhir/Patient/p1".into(),
                is_url: true,
            },
        ] {
            assert!(complete(
                std::slice::from_ref(&r),
                &[crit(subj, Modifier::None, qv)]
            ));
        }
    }

    proptest! {
        #[test]
        fn bucket_terms_are_the_formatted_ones(
            day in days_from_civil(1700, 1, 1)..days_from_civil(2300, 1, 1),
            kind in prop::sample::select(vec![b'p', b's', b'e']),
            n in any::<i64>(),
        ) {
            // stored tokens are keyed hashes of these bytes: they must never change
            let (y, m, d) = civil_from_days(day);
            let formatted = |payload: String| [vec![kind], payload.into_bytes()].concat();
            for (b, want) in [
                (Bucket::Before, "F<".to_owned()),
                (Bucket::After, "F>".to_owned()),
                (Bucket::Century(y / 100), format!("C{}", y / 100)),
                (Bucket::Decade(y / 10), format!("D{}", y / 10)),
                (Bucket::Year(y), format!("Y{y}")),
                (Bucket::Month(y, m), format!("M{y}-{m}")),
                (Bucket::Day(y, m, d), format!("d{y}-{m}-{d}")),
            ] {
                let t = b.term(kind);
                prop_assert_eq!(&t, &formatted(want));
                prop_assert_eq!(is_coarse_date_term(&t), !matches!(b, Bucket::Day(..)));
            }
            let mut t = Vec::new();
            push_int(&mut t, n);
            prop_assert_eq!(t, n.to_string().into_bytes());
        }
    }

    #[test]
    fn coarse_date_terms_name_no_day() {
        for t in [&b"s-"[..], b"e+", b"pY2016", b"sM2016-1", b"eC20", b"pF<"] {
            assert!(is_coarse_date_term(t), "{t:?}");
        }
        for t in [
            &b"pd2016-1-15"[..],
            b"sd1-1-1",
            b"^smi",
            b"cY2016",
            b"p",
            b"rPatient/1",
        ] {
            assert!(!is_coarse_date_term(t), "{t:?}");
        }
    }

    #[test]
    fn a_month_window_is_one_bounded_lookup() {
        let def = search_param("Observation", "date").unwrap();
        let c = |p, s| {
            crit(
                def,
                Modifier::None,
                QueryValue::Date(p, parse_date(s).unwrap()),
            )
        };
        let l = lookup_terms(&[c(Prefix::Ge, "2020-03-01"), c(Prefix::Lt, "2020-04-01")]);
        let Lookup::Or(parts) = &l else {
            panic!("{l:?}")
        };
        let Lookup::Terms { terms, .. } = &parts[0] else {
            panic!("{l:?}")
        };
        assert_eq!(
            terms,
            &vec![b"pM2020-3".to_vec()],
            "points: one month bucket"
        );
    }
}
