//! Blind-index rows that are committed but not yet merged into the index segments.
//!
//! Index tokens are keyed hashes, so new postings land all over a token-ordered index;
//! rewriting segments one commit at a time would rewrite a page or more per row. Instead
//! the writer appends new postings and removal marks to the rowid-ordered `index_log`
//! table (a commit touches only its last pages), and keeps the net state here, in memory,
//! where lookups see it: a posting marked live is in the index whatever the segments say,
//! one marked dead is not. Once the set is large (or the writer is idle), the writer
//! merges it into the segments ([`crate::segments`]) in one transaction and empties the
//! log. On open, the log is replayed into a fresh set, so nothing depends on this memory
//! surviving a crash.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;

/// A token, inline when short (every token the server makes is at most 16 bytes).
/// Ordered by its bytes, as SQLite orders blobs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Tok {
    Inline(u8, [u8; 16]),
    Heap(Box<[u8]>),
}

impl Tok {
    pub(crate) fn new(t: &[u8]) -> Tok {
        if t.len() <= 16 {
            let mut b = [0u8; 16];
            b[..t.len()].copy_from_slice(t);
            Tok::Inline(t.len() as u8, b)
        } else {
            Tok::Heap(t.into())
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Tok::Inline(n, b) => &b[..usize::from(*n)],
            Tok::Heap(b) => b,
        }
    }

    const MIN: Tok = Tok::Inline(0, [0; 16]);
}

impl Ord for Tok {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.bytes().cmp(other.bytes())
    }
}

impl PartialOrd for Tok {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One posting: `(index number, token, resource number)`.
pub(crate) type Row = (i64, Tok, i64);

/// The net state of the log: for each posting it names, whether it is live. Postings
/// are grouped by `(index number, token)`, each group sorted by resource number: one
/// tree entry per token rather than per posting keeps the writer's inserts cheap.
#[derive(Default, Debug)]
pub(crate) struct Pending {
    lists: BTreeMap<(i64, Tok), Vec<(i64, bool)>>,
    len: usize,
    /// Index numbers that have (or once had) a posting, here or in the segments: a lookup
    /// in any other index is answered without a query.
    indexes: HashSet<i64>,
}

impl Pending {
    /// Apply one log record (`live` = the posting exists after it).
    pub(crate) fn apply(&mut self, (ix, tok, n): Row, live: bool) {
        if live {
            self.indexes.insert(ix);
        }
        let list = self.lists.entry((ix, tok)).or_default();
        // new resources have the highest numbers: almost always an append
        match list.last() {
            Some((last, _)) if *last < n => list.push((n, live)),
            None => list.push((n, live)),
            _ => match list.binary_search_by_key(&n, |(m, _)| *m) {
                Ok(i) => {
                    list[i].1 = live;
                    return;
                }
                Err(i) => list.insert(i, (n, live)),
            },
        }
        self.len += 1;
    }

    /// Record that the segments hold postings of index `ix`.
    pub(crate) fn note_index(&mut self, ix: i64) {
        self.indexes.insert(ix);
    }

    /// Whether index `ix` may hold postings (false: certainly none).
    pub(crate) fn may_have(&self, ix: i64) -> bool {
        self.indexes.contains(&ix)
    }

    /// The postings of one token the log names, with their state, in number order.
    pub(crate) fn list<'a>(
        &'a self,
        ix: i64,
        token: &Tok,
    ) -> impl Iterator<Item = (i64, bool)> + 'a {
        self.lists
            .get(&(ix, token.clone()))
            .into_iter()
            .flatten()
            .copied()
    }

    /// Every record of index `ix`.
    pub(crate) fn rows_of(&self, ix: i64) -> impl Iterator<Item = (Row, bool)> + '_ {
        self.lists
            .range((Bound::Included((ix, Tok::MIN)), Bound::Unbounded))
            .take_while(move |((i, _), _)| *i == ix)
            .flat_map(|((i, t), l)| l.iter().map(move |(n, live)| ((*i, t.clone(), *n), *live)))
    }

    /// Records held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every record in key order.
    pub(crate) fn all(&self) -> impl Iterator<Item = (Row, bool)> + '_ {
        self.lists
            .iter()
            .flat_map(|((i, t), l)| l.iter().map(move |(n, live)| ((*i, t.clone(), *n), *live)))
    }

    /// Forget the records (merged into the segments; the index numbers stay known).
    pub(crate) fn clear(&mut self) {
        self.lists.clear();
        self.len = 0;
    }
}

/// The log records of the transaction in progress, applied to [`Pending`] only once it
/// has committed. Lookups inside the transaction (conditional-create guards) see them.
#[derive(Default, Debug)]
pub(crate) struct Staged {
    log: Vec<(Row, bool)>,
    /// Net state of the first `net_upto` records, built only when a lookup asks.
    net: HashMap<Row, bool>,
    net_upto: usize,
}

impl Staged {
    pub(crate) fn push(&mut self, row: Row, live: bool) {
        self.log.push((row, live));
    }

    fn catch_up(&mut self) {
        for (row, live) in &self.log[self.net_upto..] {
            self.net.insert(row.clone(), *live);
        }
        self.net_upto = self.log.len();
    }

    /// The staged postings of one token, with their state.
    pub(crate) fn list(&mut self, ix: i64, token: &Tok) -> Vec<(i64, bool)> {
        if self.log.is_empty() {
            return Vec::new();
        }
        self.catch_up();
        self.net
            .iter()
            .filter(|((i, t, _), _)| *i == ix && t == token)
            .map(|((_, _, n), live)| (*n, *live))
            .collect()
    }

    pub(crate) fn mark(&self) -> usize {
        self.log.len()
    }

    /// The records staged after `mark`, in order.
    pub(crate) fn since(&self, mark: usize) -> &[(Row, bool)] {
        self.log.get(mark..).unwrap_or(&[])
    }

    /// Forget the records after `mark` (a batch rolled back to its savepoint).
    pub(crate) fn rollback_to(&mut self, mark: usize) {
        if mark >= self.log.len() {
            return;
        }
        self.log.truncate(mark);
        if self.net_upto > mark {
            self.net.clear();
            self.net_upto = 0;
        }
    }

    pub(crate) fn take(&mut self) -> Vec<(Row, bool)> {
        self.net.clear();
        self.net_upto = 0;
        std::mem::take(&mut self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(ix: i64, t: &[u8], n: i64) -> Row {
        (ix, Tok::new(t), n)
    }

    #[test]
    fn pending_applies_records_in_order() {
        let mut p = Pending::default();
        p.apply(r(1, b"a", 1), true);
        p.apply(r(1, b"a", 2), true);
        p.apply(r(1, b"a", 1), true);
        p.apply(r(2, b"a", 1), true);
        p.apply(r(1, b"ab", 3), true);
        assert_eq!(p.len(), 4);
        p.apply(r(1, b"a", 1), false);
        p.apply(r(1, b"b", 1), false);
        assert_eq!(
            p.len(),
            5,
            "removal marks are kept: the segments may hold the posting"
        );
        let a = Tok::new(b"a");
        assert_eq!(p.list(1, &a).collect::<Vec<_>>(), [(1, false), (2, true)]);
        assert_eq!(p.rows_of(1).count(), 4);
        assert_eq!(p.rows_of(2).count(), 1);
        assert_eq!(p.all().count(), 5);
        p.clear();
        assert_eq!(p.len(), 0);
        assert!(p.may_have(1) && p.may_have(2) && !p.may_have(3));
    }

    #[test]
    fn tokens_order_by_their_bytes() {
        assert!(Tok::new(b"b") > Tok::new(b"ab"));
        assert!(Tok::new(b"a") < Tok::new(b"a\0"));
        assert!(Tok::MIN <= Tok::new(b""));
    }

    #[test]
    fn tokens_keep_their_bytes() {
        assert_eq!(Tok::new(b"abc").bytes(), b"abc");
        let long = [7u8; 40];
        assert_eq!(Tok::new(&long).bytes(), &long[..]);
        assert_ne!(Tok::new(b"a"), Tok::new(b"a\0"));
    }

    #[test]
    fn staged_rolls_back_to_a_mark() {
        let mut s = Staged::default();
        let t = Tok::new(b"t");
        s.push(r(1, b"t", 1), true);
        assert_eq!(s.list(1, &t), [(1, true)]);
        let m = s.mark();
        s.push(r(1, b"t", 1), false);
        s.push(r(1, b"t", 2), true);
        let mut l = s.list(1, &t);
        l.sort();
        assert_eq!(l, [(1, false), (2, true)]);
        s.rollback_to(m);
        assert_eq!(s.list(1, &t), [(1, true)]);
        assert_eq!(s.take().len(), 1);
        assert!(s.list(1, &t).is_empty());
    }
}
