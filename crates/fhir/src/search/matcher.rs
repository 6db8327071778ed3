//! Exact matching of criteria against resources (stub: to be implemented).
use serde_json::Value;

use super::types::Criterion;

impl Criterion {
    /// Whether `resource` satisfies this criterion with the exact FHIR R4 semantics
    /// (string normalisation and prefix match, token system/code rules, date and number
    /// precision ranges and prefixes, `:missing`, `:not`, `:exact`, `:contains`, `:text`,
    /// reference forms). `Target::Chain` and `Target::Has` are resolved by the server
    /// before matching (it rewrites them into reference / `_id` criteria); here they
    /// return `true`.
    pub fn matches(&self, resource: &Value) -> bool {
        let _ = resource;
        todo!()
    }
}
