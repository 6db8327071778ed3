//! FHIR R4 search: parameter definitions (from the vendored official SearchParameter
//! bundle), value extraction from resources, query parsing, exact matching, and the
//! *index terms* from which the server derives keyed blind-index tokens.
//!
//! This module knows nothing of keys or storage. It defines, for every searchable value,
//! the byte strings ("terms") that identify it; the server turns each term into a keyed,
//! truncated HMAC token. A query is answered in two steps: the index yields *candidates*
//! (a superset of the matches: tokens are truncated, dates are bucketed, string prefixes
//! are bounded), and every candidate is then decrypted and checked with [`Criterion::matches`]
//! — the exact FHIR semantics. So terms only have to be *complete* (every true match is
//! found by at least one term of the query), never exact.
//!
//! Files:
//! - `types.rs`   — shared value types (this contract; owned by the integrator).
//! - `defs.rs`    — the parameter registry.
//! - `extract.rs` — FHIRPath-subset evaluation of parameter expressions into [`SearchValue`]s.
//! - `query.rs`   — parsing of a search request into a [`SearchQuery`].
//! - `matcher.rs` — exact matching of a criterion against a resource.
//! - `terms.rs`   — index terms of values and lookup terms of criteria.

mod defs;
mod extract;
mod matcher;
mod query;
mod terms;
mod types;

pub use defs::{search_param, search_params};
pub use extract::extract;
pub use query::{MAX_COUNT, DEFAULT_COUNT, parse_search};
pub use terms::{index_terms, lookup_terms, presence_term};
pub use types::*;
