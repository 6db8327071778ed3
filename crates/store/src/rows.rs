//! The current version rows readers have read, as stored (sealed: ciphertext and the
//! identifiers the database holds in clear anyway), kept for the resource state they were
//! read in.
//!
//! Every commit makes SQLite drop a reader's page cache, and with every request audited
//! that is always: a search page's rows were each a B-tree descent through pages read
//! again from the file. The database counts resource states in `resource_epoch`, which
//! every commit that writes a version increments in the same transaction (whatever
//! process commits it). A reader reads that count in the snapshot it reads rows in, or
//! before the statement that reads the row, so a row kept under count `n` is the current
//! row of state `n` or of a later one — never of an earlier one; a reader whose snapshot
//! has a higher count first forgets every row (they may be stale), and one with a lower
//! count (an older snapshot) neither uses nor keeps rows.
//!
//! Bounded by the bytes of the rows kept ([`MAX_BYTES`]); emptied when full.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::VersionRow;

/// Most bytes of sealed rows kept.
pub(crate) const MAX_BYTES: usize = 64 << 20;

/// Bytes a kept row counts for besides its ciphertext (identifiers, map slots).
const ROW_OVERHEAD: usize = 160;

#[derive(Default)]
struct Kept {
    epoch: i64,
    /// Resource type → id → current row.
    rows: HashMap<String, HashMap<String, VersionRow>>,
    bytes: usize,
}

/// See the module documentation.
#[derive(Default)]
pub(crate) struct RowCache(Mutex<Kept>);

impl RowCache {
    /// The kept current rows of `rtype` for `ids` as of resource state `epoch`, in order
    /// (`None` where none is kept).
    pub(crate) fn get_many(
        &self,
        epoch: i64,
        rtype: &str,
        ids: &[String],
    ) -> Vec<Option<VersionRow>> {
        let mut kept = self.0.lock();
        if epoch > kept.epoch {
            *kept = Kept {
                epoch,
                ..Kept::default()
            };
        }
        let rows = (epoch == kept.epoch)
            .then(|| kept.rows.get(rtype))
            .flatten();
        ids.iter()
            .map(|id| rows.and_then(|r| r.get(id.as_str())).cloned())
            .collect()
    }

    /// Keep `rows`, current as of resource state `epoch`.
    pub(crate) fn keep<'a>(&self, epoch: i64, rows: impl IntoIterator<Item = &'a VersionRow>) {
        let mut kept = self.0.lock();
        if epoch != kept.epoch {
            // an older snapshot's rows may be stale; a newer one's come with its get_many
            return;
        }
        for row in rows {
            let size = row.sealed.len() + ROW_OVERHEAD;
            if kept.bytes + size > MAX_BYTES {
                kept.rows.clear();
                kept.bytes = 0;
            }
            let old = kept
                .rows
                .entry(row.rtype.clone())
                .or_default()
                .insert(row.id.clone(), row.clone());
            kept.bytes += size;
            if let Some(old) = old {
                kept.bytes -= old.sealed.len() + ROW_OVERHEAD;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, version: u64, len: usize) -> VersionRow {
        VersionRow {
            rtype: "Observation".into(),
            id: id.into(),
            version,
            key_id: "k".into(),
            deleted: false,
            updated_ms: 1,
            sealed: vec![7; len],
        }
    }

    #[test]
    fn rows_are_kept_for_their_state_only() {
        let c = RowCache::default();
        let ids = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(c.get_many(3, "Observation", &ids), vec![None, None]);
        c.keep(3, &[row("a", 1, 10)]);
        assert_eq!(
            c.get_many(3, "Observation", &ids),
            vec![Some(row("a", 1, 10)), None]
        );
        assert_eq!(c.get_many(3, "Patient", &ids), vec![None, None]);
        // an older snapshot neither sees nor keeps rows
        assert_eq!(c.get_many(2, "Observation", &ids), vec![None, None]);
        c.keep(2, &[row("b", 1, 10)]);
        assert_eq!(c.get_many(3, "Observation", &ids)[1], None);
        // a newer state forgets everything, and an older one cannot put it back
        assert_eq!(c.get_many(4, "Observation", &ids), vec![None, None]);
        c.keep(3, &[row("a", 1, 10)]);
        assert_eq!(c.get_many(4, "Observation", &ids), vec![None, None]);
        c.keep(4, &[row("a", 2, 10)]);
        assert_eq!(c.get_many(4, "Observation", &ids)[0], Some(row("a", 2, 10)));
    }

    #[test]
    fn memory_is_bounded() {
        let c = RowCache::default();
        let big = MAX_BYTES / 4;
        c.get_many(1, "Observation", &[]);
        for i in 0..10 {
            c.keep(1, &[row(&i.to_string(), 1, big)]);
            assert!(c.0.lock().bytes <= MAX_BYTES);
        }
        // the newest row is always kept
        assert!(c.get_many(1, "Observation", &["9".to_owned()])[0].is_some());
        // replacing a row does not count it twice
        c.keep(1, &[row("9", 2, big)]);
        let k = c.0.lock();
        let counted: usize = k
            .rows
            .values()
            .flat_map(HashMap::values)
            .map(|r| r.sealed.len() + ROW_OVERHEAD)
            .sum();
        assert_eq!(k.bytes, counted);
    }
}
