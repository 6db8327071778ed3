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
//! - `types.rs`       — shared value types.
//! - `datetime.rs`    — date/dateTime/instant and decimal text as intervals.
//! - `registry.rs`    — the parameter registry, the FHIRPath subset and value extraction.
//! - `request.rs`     — parsing of a search request into a [`SearchQuery`].
//! - `matching.rs`    — exact matching of a criterion against a resource.
//! - `index_terms.rs` — index terms of values and lookup terms of criteria.

mod datetime;
mod index_terms;
mod matching;
mod registry;
mod request;
mod types;

pub use datetime::{parse_date, parse_decimal};
pub use index_terms::{index_terms, is_coarse_date_term, is_span_term, lookup_terms, span_index};
pub use matching::normalize;
pub use registry::{
    Extractor, extract, extractor, field_selected, index_owner, indexed_params, parse_fields,
    search_param, search_params, top_fields,
};
pub use request::{DEFAULT_COUNT, MAX_COUNT, parse_search};
pub use types::*;
