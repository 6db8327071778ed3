//! FHIRPath-subset evaluation of search parameter expressions (stub: to be implemented).
use serde_json::Value;

use super::types::{SearchParamDef, SearchValue};

/// The values of parameter `def` in `resource` (a parsed, valid resource of type
/// `def.base`). Never panics on any JSON.
pub fn extract(def: &SearchParamDef, resource: &Value) -> Vec<SearchValue> {
    let _ = (def, resource);
    todo!()
}
