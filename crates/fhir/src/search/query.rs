//! Parsing of search requests (stub: to be implemented).
use super::types::SearchQuery;
use crate::Issue;

/// Default page size.
pub const DEFAULT_COUNT: usize = 20;
/// Largest page size served; larger `_count` values are capped.
pub const MAX_COUNT: usize = 1000;

/// Parse the decoded `(name, value)` pairs of a search on `rtype`. In strict mode
/// (`lenient == false`) any unknown parameter, unsupported modifier or malformed value is
/// an error (`Err` with `invalid`/`not-supported` issues naming the parameter, never the
/// value); in lenient mode they are skipped and reported in `SearchQuery::warnings`.
pub fn parse_search(
    rtype: &str,
    pairs: &[(String, String)],
    lenient: bool,
) -> Result<SearchQuery, Vec<Issue>> {
    let _ = (rtype, pairs, lenient);
    todo!()
}
