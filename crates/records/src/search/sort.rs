//! `_sort`: the sort key of a record and the order of keys (missing values last in both
//! directions; ties broken by id).

use serde::{Deserialize, Serialize};

use super::{Loaded, id_order};
use phivault_fhir::search::{self, SearchValue, SortKey};

/// One component of a sort key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) enum KeyVal {
    /// No value: sorts last in both directions.
    Missing,
    /// A number (dates as milliseconds).
    Num(f64),
    /// A string.
    Str(String),
}

fn cmp_val(a: &KeyVal, b: &KeyVal, descending: bool) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    let o = match (a, b) {
        (KeyVal::Missing, KeyVal::Missing) => return Equal,
        (KeyVal::Missing, _) => return Greater,
        (_, KeyVal::Missing) => return Less,
        (KeyVal::Num(x), KeyVal::Num(y)) => x.total_cmp(y),
        (KeyVal::Str(x), KeyVal::Str(y)) => x.cmp(y),
        (KeyVal::Num(_), KeyVal::Str(_)) => Less,
        (KeyVal::Str(_), KeyVal::Num(_)) => Greater,
    };
    if descending { o.reverse() } else { o }
}

pub(super) fn sort_key(keys: &[SortKey], l: &Loaded) -> Vec<KeyVal> {
    keys.iter()
        .map(|k| {
            if k.last_updated {
                return KeyVal::Num(l.row.updated_ms as f64);
            }
            let Some(def) = k.param else {
                return KeyVal::Str(l.row.id.clone());
            };
            let vals = search::extract(def, &l.json);
            let nums = vals.iter().filter_map(|v| match v {
                SearchValue::Date(r) => Some(if k.descending { r.hi } else { r.lo } as f64),
                SearchValue::Number(d) => Some(d.value),
                SearchValue::Quantity { value, .. } => Some(value.value),
                _ => None,
            });
            let num = if k.descending {
                nums.fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
            } else {
                nums.fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))))
            };
            if let Some(n) = num {
                return KeyVal::Num(n);
            }
            let strs = vals.iter().filter_map(|v| match v {
                SearchValue::String(s) | SearchValue::Uri(s) => Some(s.to_lowercase()),
                SearchValue::Token { code: Some(c), .. } => Some(c.clone()),
                _ => None,
            });
            let s = if k.descending { strs.max() } else { strs.min() };
            s.map_or(KeyVal::Missing, KeyVal::Str)
        })
        .collect()
}

pub(super) fn cmp_keys(
    keys: &[SortKey],
    a: (&[KeyVal], &str),
    b: (&[KeyVal], &str),
) -> std::cmp::Ordering {
    for (i, k) in keys.iter().enumerate() {
        let (Some(x), Some(y)) = (a.0.get(i), b.0.get(i)) else {
            break;
        };
        let o = cmp_val(x, y, k.descending);
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    id_order(a.1).cmp(&id_order(b.1))
}
