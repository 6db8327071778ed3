//! The search parameter registry (stub: to be implemented).
use super::types::SearchParamDef;

/// The definition of parameter `code` on resource type `rtype` (including the common
/// `Resource` parameters `_id` and `_lastUpdated`), if phivault serves it.
pub fn search_param(rtype: &str, code: &str) -> Option<&'static SearchParamDef> {
    let _ = (rtype, code);
    todo!()
}

/// Every served parameter of `rtype` (empty for unknown types).
pub fn search_params(rtype: &str) -> &'static [SearchParamDef] {
    let _ = rtype;
    todo!()
}
