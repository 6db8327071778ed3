//! Blind-index rows that are committed but not yet merged into the B-tree of
//! `search_index`.
//!
//! Index tokens are keyed hashes, so new rows land on random pages of a token-ordered
//! B-tree; inserting them one commit at a time dirties (and writes to the WAL) a page per
//! row. Instead the writer appends new rows and deletion marks to the rowid-ordered
//! `search_log` table (a commit touches only its last pages), and keeps the net set here,
//! in memory, where lookups see it. Once the set is large, the writer merges it into
//! `search_index` in key order in one transaction and empties the log. On open, the log
//! is replayed into a fresh set, so nothing depends on this memory surviving a crash.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound;

/// A token, inline when short (every token the server makes is at most 16 bytes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
}

/// A logical id in its stored form: a UUID as its 16 bytes, any other id as text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Sid {
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl Sid {
    const MIN: Sid = Sid::Uuid([0; 16]);

    pub(crate) fn new(id: &str) -> Sid {
        match phivault_audit::uuid_bytes(id) {
            Some(b) => Sid::Uuid(b),
            None => Sid::Text(id.into()),
        }
    }

    pub(crate) fn to_value(&self) -> rusqlite::types::Value {
        match self {
            Sid::Uuid(b) => rusqlite::types::Value::Blob(b.to_vec()),
            Sid::Text(t) => rusqlite::types::Value::Text(t.to_string()),
        }
    }
}

impl rusqlite::ToSql for Sid {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Sid::Uuid(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Sid::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        })
    }
}

/// One index row: `(index number, token, id)`.
pub(crate) type Row = (i64, Tok, Sid);

/// The net rows of the log.
#[derive(Default, Debug)]
pub(crate) struct Pending {
    rows: BTreeSet<Row>,
    /// Index numbers that have (or once had) a row, here or in `search_index`: a lookup
    /// in any other index is answered without a query.
    indexes: HashSet<i64>,
}

impl Pending {
    /// Apply one log record (`live` = the row exists after it).
    pub(crate) fn apply(&mut self, row: Row, live: bool) {
        if live {
            self.indexes.insert(row.0);
            self.rows.insert(row);
        } else {
            self.rows.remove(&row);
        }
    }

    /// Record that `search_index` holds rows of index `ix`.
    pub(crate) fn note_index(&mut self, ix: i64) {
        self.indexes.insert(ix);
    }

    /// Whether index `ix` may hold rows (false: certainly none).
    pub(crate) fn may_have(&self, ix: i64) -> bool {
        self.indexes.contains(&ix)
    }

    pub(crate) fn contains(&self, row: &Row) -> bool {
        self.rows.contains(row)
    }

    /// The ids of one posting list.
    pub(crate) fn ids<'a>(&'a self, ix: i64, token: &'a Tok) -> impl Iterator<Item = &'a Sid> {
        self.rows
            .range((
                Bound::Included((ix, token.clone(), Sid::MIN)),
                Bound::Unbounded,
            ))
            .take_while(move |(i, t, _)| *i == ix && t == token)
            .map(|(_, _, id)| id)
    }

    /// Every row of index `ix`.
    pub(crate) fn rows_of(&self, ix: i64) -> impl Iterator<Item = &Row> {
        self.rows
            .range((
                Bound::Included((ix, Tok::Inline(0, [0; 16]), Sid::MIN)),
                Bound::Unbounded,
            ))
            .take_while(move |(i, _, _)| *i == ix)
    }

    /// Rows held.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Every row in key order.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter()
    }

    /// Forget the rows (merged into `search_index`; the index numbers stay known).
    pub(crate) fn clear(&mut self) {
        self.rows.clear();
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

    /// The state a staged record gives the row, if any.
    pub(crate) fn state(&mut self, row: &Row) -> Option<bool> {
        if self.log.is_empty() {
            return None;
        }
        self.catch_up();
        self.net.get(row).copied()
    }

    /// Ids staged live in one posting list.
    pub(crate) fn live_ids(&mut self, ix: i64, token: &Tok) -> Vec<Sid> {
        if self.log.is_empty() {
            return Vec::new();
        }
        self.catch_up();
        self.net
            .iter()
            .filter(|((i, t, _), live)| **live && *i == ix && t == token)
            .map(|((_, _, id), _)| id.clone())
            .collect()
    }

    pub(crate) fn mark(&self) -> usize {
        self.log.len()
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

    fn r(ix: i64, t: &[u8], id: &str) -> Row {
        (ix, Tok::new(t), Sid::new(id))
    }

    #[test]
    fn pending_applies_records_in_order() {
        let mut p = Pending::default();
        p.apply(r(1, b"a", "x"), true);
        p.apply(r(1, b"a", "y"), true);
        p.apply(r(1, b"a", "x"), true);
        p.apply(r(2, b"a", "x"), true);
        p.apply(r(1, b"ab", "z"), true);
        assert_eq!(p.len(), 4);
        p.apply(r(1, b"a", "x"), false);
        p.apply(r(1, b"b", "x"), false);
        assert_eq!(p.len(), 3);
        assert!(!p.contains(&r(1, b"a", "x")));
        let a = Tok::new(b"a");
        assert_eq!(p.ids(1, &a).collect::<Vec<_>>(), [&Sid::new("y")]);
        assert_eq!(p.rows_of(1).count(), 2);
        assert_eq!(p.rows_of(2).count(), 1);
        assert_eq!(p.all().count(), 3);
        p.clear();
        assert_eq!(p.len(), 0);
        assert!(p.may_have(1) && p.may_have(2) && !p.may_have(3));
    }

    #[test]
    fn ids_and_tokens_keep_their_stored_form() {
        let u = "018f0000-0000-7000-8000-000000000001";
        assert!(matches!(Sid::new(u), Sid::Uuid(_)));
        assert!(matches!(Sid::new("example-1"), Sid::Text(_)));
        assert_eq!(Tok::new(b"abc").bytes(), b"abc");
        let long = [7u8; 40];
        assert_eq!(Tok::new(&long).bytes(), &long[..]);
        assert_ne!(Tok::new(b"a"), Tok::new(b"a\0"));
    }

    #[test]
    fn staged_rolls_back_to_a_mark() {
        let mut s = Staged::default();
        s.push(r(1, b"t", "a"), true);
        assert_eq!(s.state(&r(1, b"t", "a")), Some(true));
        let m = s.mark();
        s.push(r(1, b"t", "a"), false);
        s.push(r(1, b"t", "b"), true);
        assert_eq!(s.state(&r(1, b"t", "a")), Some(false));
        s.rollback_to(m);
        assert_eq!(s.state(&r(1, b"t", "a")), Some(true));
        assert_eq!(s.state(&r(1, b"t", "b")), None);
        assert_eq!(s.live_ids(1, &Tok::new(b"t")), [Sid::new("a")]);
        assert_eq!(s.take().len(), 1);
        assert_eq!(s.state(&r(1, b"t", "a")), None);
    }
}
