//! Candidate queries evaluated over posting lists.
//!
//! A token's posting list is the sorted resource numbers its segment rows hold, with the
//! pending records (and, inside a write, the transaction's staged ones) applied
//! ([`token_postings`]). `Tokens` unites the lists of its tokens, `And` intersects its
//! parts and `Or` unites them ([`evaluate`]); a page of candidates is the numbers after
//! the last one shown, turned into ids. A query that narrows nothing (`All`) scans the
//! type instead.

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension, params};

use super::index::{corrupt_segment, decode_segment, index_no};
use super::{DbId, SqliteStore, read_id};
use crate::pending::{Pending, Staged, Tok};
use crate::segments;
use crate::{Candidates, IndexEntry, IndexStats, StoreError};

/// The candidate reads of [`crate::Store`].
impl SqliteStore {
    pub(super) fn read_lookup(
        &self,
        rtype: &str,
        tokens: &[IndexEntry],
    ) -> Result<Vec<String>, StoreError> {
        let pending = self.pending.read();
        self.with_reader(|c| {
            matching_ids(
                c,
                rtype,
                tokens,
                usize::MAX,
                &pending,
                &mut Staged::default(),
            )
        })
    }

    pub(super) fn read_candidates(
        &self,
        rtype: &str,
        query: &Candidates,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.heads.wait()?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let q = simplify(query);
        if q == Candidates::All {
            // Current versions of the type in id order; the bare columns of a max()
            // aggregate come from the row holding the maximum (SQLite guarantees this).
            return self.with_reader(|c| {
                let sql = if after.is_some() {
                    "SELECT id, deleted, max(version) FROM resource_version \
                     WHERE rtype = ?1 AND id > ?2 GROUP BY id ORDER BY id"
                } else {
                    "SELECT id, deleted, max(version) FROM resource_version \
                     WHERE rtype = ?1 AND ?2 IS NULL GROUP BY id ORDER BY id"
                };
                let mut st = c.prepare_cached(sql)?;
                let mut rows = st.query(params![rtype, after.map(DbId)])?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    if r.get::<_, i64>(1)? == 0 {
                        out.push(read_id(r, 0)?);
                        if out.len() as i64 >= limit {
                            break;
                        }
                    }
                }
                Ok(out)
            });
        }
        // held until the segments have been read: a merge cannot move postings between
        // the two places while this reader looks at both
        let pending = self.pending.read();
        self.with_snapshot(|c| {
            let mut bound = 0;
            let numbers = evaluate(c, rtype, &q, &pending, &mut bound)?;
            let after = match after {
                None => 0,
                // the number this process knows (a stored copy may have been edited)
                Some(a) if self.integ.is_some() => {
                    self.known.read().head(rtype, a).map_or(i64::MAX, |h| h.rno)
                }
                Some(a) => c
                    .prepare_cached(
                        "SELECT rno FROM resource_version WHERE rtype = ?1 AND id = ?2 LIMIT 1",
                    )?
                    .query_row(params![rtype, DbId(a)], |r| r.get(0))
                    .optional()?
                    .unwrap_or(i64::MAX),
            };
            let start = numbers.partition_point(|n| *n <= after);
            numbers[start..]
                .iter()
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .map(|&n| Ok((n, self.id_of_number(c, n)?)))
                .collect::<Result<Vec<(i64, String)>, rusqlite::Error>>()
        })
        .and_then(|found| {
            // a number must lead to the resource this process numbered so (an edited
            // `resource_no` would hide one resource behind another)
            let stale = |(n, id): &(i64, String)| {
                self.integ.is_some() && self.known.read().head(rtype, id).map(|h| h.rno) != Some(*n)
            };
            if found.iter().any(stale) {
                self.catch_up()?;
                if let Some((n, id)) = found.iter().find(|f| stale(f)) {
                    return Err(self.resource_tampered(
                        rtype,
                        id,
                        &format!("resource number {n} does not lead to it"),
                    ));
                }
            }
            Ok(found.into_iter().map(|(_, id)| id).collect())
        })
    }

    pub(super) fn read_index_stats(
        &self,
        rtype: &str,
        param: &str,
    ) -> Result<IndexStats, StoreError> {
        let ix = index_no(rtype, param);
        let pending = self.pending.read();
        self.with_snapshot(|c| {
            let mut postings: HashSet<(Tok, i64)> = HashSet::new();
            let mut st = c.prepare_cached("SELECT data FROM search_seg WHERE ix = ?1")?;
            let mut rows = st.query(params![ix])?;
            while let Some(r) = rows.next()? {
                postings.extend(decode_segment(r.get_ref(0)?.as_blob()?)?);
            }
            for ((_, token, n), live) in pending.rows_of(ix) {
                if live {
                    postings.insert((token, n));
                } else {
                    postings.remove(&(token, n));
                }
            }
            let mut per_token: HashMap<Tok, u64> = HashMap::new();
            let mut resources: HashSet<i64> = HashSet::new();
            for (t, n) in postings {
                *per_token.entry(t).or_default() += 1;
                resources.insert(n);
            }
            Ok(IndexStats {
                resources: resources.len() as u64,
                rows: per_token.values().sum(),
                distinct_tokens: per_token.len() as u64,
                max_rows_per_token: per_token.values().copied().max().unwrap_or(0),
            })
        })
    }
}

/// The resource numbers holding `tok` in index `ix`: the segments, with the pending and
/// (inside a transaction) staged records applied. Sorted.
pub(super) fn token_postings(
    c: &Connection,
    ix: i64,
    tok: &Tok,
    pending: &Pending,
    staged: Option<&mut Staged>,
) -> Result<Vec<i64>, rusqlite::Error> {
    let mut st = c.prepare_cached(
        "SELECT data FROM (SELECT data FROM search_seg WHERE ix = ?1 AND tok < ?2 \
         ORDER BY tok DESC, lo DESC LIMIT 1) \
         UNION ALL SELECT data FROM search_seg WHERE ix = ?1 AND tok = ?2",
    )?;
    let mut rows = st.query(params![ix, tok.bytes()])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.extend(
            segments::postings_of(r.get_ref(0)?.as_blob()?, tok).ok_or_else(corrupt_segment)?,
        );
    }
    out.sort_unstable();
    out.dedup();
    let mut overlay: Vec<(i64, bool)> = pending.list(ix, tok).collect();
    if let Some(s) = staged {
        // staged records come after the pending ones
        overlay.extend(s.list(ix, tok));
    }
    if overlay.is_empty() {
        return Ok(out);
    }
    let mut set: std::collections::BTreeSet<i64> = out.into_iter().collect();
    for (n, live) in overlay {
        if live {
            set.insert(n);
        } else {
            set.remove(&n);
        }
    }
    Ok(set.into_iter().collect())
}

/// Ids of resources of `rtype` carrying all `tokens` (at most `limit`), in the segments,
/// `pending` or the current transaction's `staged` records. The blind index only holds
/// postings of current, non-deleted versions.
pub(super) fn matching_ids(
    c: &Connection,
    rtype: &str,
    tokens: &[IndexEntry],
    limit: usize,
    pending: &Pending,
    staged: &mut Staged,
) -> Result<Vec<String>, rusqlite::Error> {
    let mut numbers: Option<Vec<i64>> = None;
    for t in tokens {
        let ix = index_no(rtype, &t.param);
        let list = token_postings(c, ix, &Tok::new(&t.token), pending, Some(staged))?;
        numbers = Some(match numbers {
            None => list,
            Some(prev) => intersect(&prev, &list),
        });
    }
    let mut st = c.prepare_cached("SELECT id FROM resource_no WHERE rno = ?1")?;
    numbers
        .unwrap_or_default()
        .iter()
        .take(limit)
        .map(|n| st.query_row(params![n], |r| read_id(r, 0)))
        .collect()
}

fn intersect(a: &[i64], b: &[i64]) -> Vec<i64> {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    small
        .iter()
        .filter(|n| large.binary_search(n).is_ok())
        .copied()
        .collect()
}

fn union(a: &[i64], b: &[i64]) -> Vec<i64> {
    let mut v = Vec::with_capacity(a.len() + b.len());
    v.extend_from_slice(a);
    v.extend_from_slice(b);
    v.sort_unstable();
    v.dedup();
    v
}

/// Largest number of tokens one candidate query looks up.
const MAX_BOUND_TOKENS: usize = 30_000;

/// The resource numbers a candidate query selects, sorted. `All` never reaches here (the
/// caller scans the type instead).
fn evaluate(
    c: &Connection,
    rtype: &str,
    q: &Candidates,
    pending: &Pending,
    bound: &mut usize,
) -> Result<Vec<i64>, rusqlite::Error> {
    let unexpected = || {
        rusqlite::Error::InvalidParameterName("unexpected full scan in a candidate query".into())
    };
    match q {
        Candidates::Tokens { param, tokens } => {
            *bound += tokens.len();
            if *bound > MAX_BOUND_TOKENS {
                return Err(rusqlite::Error::InvalidParameterName(
                    "too many tokens in one query".into(),
                ));
            }
            let ix = index_no(rtype, param);
            if !pending.may_have(ix) {
                return Ok(Vec::new());
            }
            let mut out = Vec::new();
            for t in tokens {
                let list = token_postings(c, ix, &Tok::new(t), pending, None)?;
                out = if out.is_empty() {
                    list
                } else {
                    union(&out, &list)
                };
            }
            Ok(out)
        }
        Candidates::And(parts) => {
            let mut acc: Option<Vec<i64>> = None;
            for p in parts.iter().filter(|p| !matches!(p, Candidates::All)) {
                let v = evaluate(c, rtype, p, pending, bound)?;
                acc = Some(match acc {
                    None => v,
                    Some(prev) => intersect(&prev, &v),
                });
                if acc.as_ref().is_some_and(Vec::is_empty) {
                    break;
                }
            }
            acc.ok_or_else(unexpected)
        }
        Candidates::Or(parts) => {
            let mut acc = Vec::new();
            for p in parts {
                if matches!(p, Candidates::All) {
                    return Err(unexpected());
                }
                let v = evaluate(c, rtype, p, pending, bound)?;
                acc = union(&acc, &v);
            }
            Ok(acc)
        }
        Candidates::All => Err(unexpected()),
    }
}

/// Normalise a candidate expression: `All` inside `And` is dropped (it narrows nothing),
/// an `Or` containing `All` is `All`.
fn simplify(q: &Candidates) -> Candidates {
    match q {
        Candidates::And(parts) => {
            let mut v: Vec<Candidates> = parts
                .iter()
                .map(simplify)
                .filter(|p| *p != Candidates::All)
                .collect();
            match v.len() {
                0 => Candidates::All,
                1 => v.remove(0),
                _ => Candidates::And(v),
            }
        }
        Candidates::Or(parts) => {
            let mut v: Vec<Candidates> = parts.iter().map(simplify).collect();
            if v.is_empty() || v.contains(&Candidates::All) {
                return Candidates::All;
            }
            if v.len() == 1 {
                return v.remove(0);
            }
            Candidates::Or(v)
        }
        other => other.clone(),
    }
}
