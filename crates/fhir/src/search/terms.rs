//! Index terms (stub: to be implemented).
use super::types::{Criterion, Lookup, SearchParamDef, SearchValue};

/// The term recorded once for every parameter that has at least one value in a resource
/// (answers `:missing=false`).
pub fn presence_term() -> &'static [u8] {
    b"\x00present"
}

/// The terms under which `value` of parameter `def` is indexed (appended to `out`).
pub fn index_terms(def: &SearchParamDef, value: &SearchValue, out: &mut Vec<Vec<u8>>) {
    let _ = (def, value, out);
    todo!()
}

/// How the index narrows the AND of `criteria` (all on the same searched type; chain and
/// `_has` criteria yield [`Lookup::All`] here — the server resolves those itself).
pub fn lookup_terms(criteria: &[Criterion]) -> Lookup {
    let _ = criteria;
    todo!()
}
