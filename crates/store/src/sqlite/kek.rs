//! Generations of the key-encryption key ([`crate::Store::change_keys`]): the wrapped
//! KEKs (`kek_generation`), rewrapping data keys, and destroying a generation.
//!
//! Every change is an ordinary command of the writer, group-committed with the requests'
//! batches (a rotation slows the server down by the rewraps' share of the commits, no
//! more). A rewrap replaces a data key's wrapped form only if it is still the one the
//! rotation read (a compare-and-set: an erasure in between wins). Destroying a generation
//! deletes its row — with `secure_delete` on, its bytes are overwritten — only if no data
//! key is wrapped under it any more, and then, before the destroy is answered, the writer
//! checkpoints the write-ahead log with `TRUNCATE` (retried while readers hold the log), so
//! the wrapped KEK is in none of the database's files.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::oneshot;

use super::writer::Command;
use super::{SqliteStore, engine, schema::table_exists};
use crate::integrity::{Digests, Integrity};
use crate::{KekRow, KeyChange, StoreError};

/// Attempts at truncating the write-ahead log after a generation is destroyed.
const TRUNCATE_TRIES: u32 = 100;
/// How long one attempt waits for readers.
const TRUNCATE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

impl SqliteStore {
    pub(super) fn submit_key_change(&self, change: KeyChange) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Keys(change, tx)) {
            return Err(StoreError::Closed);
        }
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    pub(super) fn read_kek_generations(&self) -> Result<Vec<KekRow>, StoreError> {
        self.with_reader(|c| {
            // a database opened read-only may predate the table
            if !table_exists(c, "kek_generation").unwrap_or(false) {
                return Ok(Vec::new());
            }
            c.prepare_cached(
                "SELECT generation, wrapped, created_ms FROM kek_generation ORDER BY generation",
            )?
            .query_map([], |r| {
                Ok(KekRow {
                    generation: r.get(0)?,
                    wrapped: r.get(1)?,
                    created_ms: r.get(2)?,
                })
            })?
            .collect()
        })
    }

    pub(super) fn read_data_keys_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            c.prepare_cached(
                "SELECT key_no, key_id, wrapped FROM data_key WHERE key_no > ?1 \
                 ORDER BY key_no LIMIT ?2",
            )?
            .query_map(params![after, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect()
        })
    }
}

/// After a group's commit, before its replies: when it destroyed a generation, checkpoint
/// the WAL with `TRUNCATE` on the writer's own connection (another connection holding the
/// checkpoint would make the writer's next transaction fail busy), retried while readers
/// hold the log; writes wait meanwhile (readers take well under a millisecond).
pub(super) fn after_commit(
    conn: &Connection,
    group: &[Command],
    results: &[Result<crate::Committed, crate::CommitError>],
) {
    let destroyed = group.iter().zip(results).any(|(c, r)| {
        matches!(c, Command::Keys(KeyChange::DestroyKek { .. }, _))
            && matches!(r, Ok(crate::Committed { last_audit_seq: Some(n) }) if *n > 0)
    });
    if !destroyed {
        return;
    }
    let _ = conn.busy_timeout(TRUNCATE_WAIT);
    let done = (0..TRUNCATE_TRIES).any(|_| {
        let r = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        });
        let ok = matches!(r, Ok(0));
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        ok
    });
    let _ = conn.busy_timeout(super::BUSY_TIMEOUT);
    if !done {
        tracing::warn!(
            "the write-ahead log could not be truncated after a KEK generation was destroyed; it is at its next restart"
        );
    }
}

/// Apply one change inside the writer's group transaction; the rows it changed.
/// Each row it adds, changes or removes is counted in the state summary (`digests.body`).
pub(super) fn apply(
    tx: &Transaction<'_>,
    change: &KeyChange,
    integ: &Integrity,
    digests: &mut Digests,
) -> Result<u64, StoreError> {
    let e = engine;
    match change {
        KeyChange::AddKek(row) => {
            let n = tx
                .prepare_cached(
                    "INSERT INTO kek_generation (generation, wrapped, created_ms) VALUES (?1, ?2, ?3)",
                )
                .and_then(|mut st| {
                    st.execute(params![row.generation, row.wrapped, row.created_ms])
                })
                .map_err(e)?;
            digests.body.add(integ.kek_element(
                i64::from(row.generation),
                &row.wrapped,
                row.created_ms,
            ));
            Ok(n as u64)
        }
        KeyChange::Rewrap(all) => {
            let mut st = tx
                .prepare_cached(
                    "UPDATE data_key SET wrapped = ?3 WHERE key_id = ?1 AND wrapped = ?2",
                )
                .map_err(e)?;
            let mut n = 0u64;
            for r in all {
                if st.execute(params![r.key_id, r.old, r.new]).map_err(e)? > 0 {
                    digests.body.sub(integ.key_element(&r.key_id, &r.old));
                    digests.body.add(integ.key_element(&r.key_id, &r.new));
                    n += 1;
                }
            }
            Ok(n)
        }
        KeyChange::DestroyKek { generation, prefix } => {
            let left: i64 = tx
                .query_row(
                    "SELECT count(*) FROM data_key WHERE substr(wrapped, 1, ?1) = ?2",
                    params![prefix.len() as i64, prefix],
                    |r| r.get(0),
                )
                .map_err(e)?;
            if left > 0 {
                return Ok(0);
            }
            let row: Option<(Vec<u8>, i64)> = tx
                .query_row(
                    "SELECT wrapped, created_ms FROM kek_generation WHERE generation = ?1",
                    params![generation],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(e)?;
            if let Some((wrapped, created_ms)) = row {
                digests
                    .body
                    .sub(integ.kek_element(i64::from(*generation), &wrapped, created_ms));
            }
            tx.execute(
                "DELETE FROM kek_generation WHERE generation = ?1",
                params![generation],
            )
            .map(|n| n as u64)
            .map_err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Rewrap, Store, WriteBatch};

    #[test]
    fn generations_rewrap_and_destroy() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.sqlite");
        let s = SqliteStore::open(&path, crate::StoreKeys::for_tests()).expect("open");
        let keys: Vec<(String, Vec<u8>)> = (0..5)
            .map(|i| (format!("p:{i}"), vec![1, i as u8, 7]))
            .collect();
        s.submit(WriteBatch {
            new_keys: keys,
            // (an event: the store has a signed head, whose state the check compares)
            audit: vec![crate::testsuite::event(1)],
            ..Default::default()
        })
        .blocking_recv()
        .expect("reply")
        .expect("commit");
        let secret = b"WRAPPED-GENERATION-ONE-0123456789".to_vec();
        for (g, w) in [(0u32, Vec::new()), (1, secret.clone())] {
            let row = KekRow {
                generation: g,
                wrapped: w,
                created_ms: 5,
            };
            assert_eq!(s.change_keys(KeyChange::AddKek(row)).expect("add"), 1);
        }
        let dup = KekRow {
            generation: 1,
            wrapped: vec![],
            created_ms: 0,
        };
        assert!(
            s.change_keys(KeyChange::AddKek(dup)).is_err(),
            "a generation is added once"
        );
        let gens: Vec<u32> = s
            .kek_generations()
            .expect("list")
            .iter()
            .map(|r| r.generation)
            .collect();
        assert_eq!(gens, vec![0, 1]);

        let page = s.data_keys_after(0, 3).expect("page");
        assert_eq!(page.len(), 3);
        let rest = s.data_keys_after(page[2].0, 10).expect("rest");
        assert_eq!(rest.len(), 2);
        // generation 0 still has keys: not destroyed
        let d0 = KeyChange::DestroyKek {
            generation: 0,
            prefix: vec![1],
        };
        assert_eq!(s.change_keys(d0).expect("guarded"), 0);
        let mut rewraps: Vec<Rewrap> = page
            .iter()
            .chain(&rest)
            .map(|(_, id, w)| Rewrap {
                key_id: id.clone(),
                old: w.clone(),
                new: vec![2, 0, 0, 0, 1],
            })
            .collect();
        rewraps[0].old = vec![9]; // stale: left alone
        assert_eq!(
            s.change_keys(KeyChange::Rewrap(rewraps)).expect("rewrap"),
            4
        );
        assert_eq!(s.data_key("p:0").expect("read"), Some(vec![1, 0, 7]));
        let again = vec![Rewrap {
            key_id: "p:0".into(),
            old: vec![1, 0, 7],
            new: vec![2, 0, 0, 0, 1],
        }];
        assert_eq!(s.change_keys(KeyChange::Rewrap(again)).expect("rewrap"), 1);
        let d0 = KeyChange::DestroyKek {
            generation: 0,
            prefix: vec![1],
        };
        assert_eq!(s.change_keys(d0).expect("destroy"), 1);
        // generation 1 is in use
        let d1 = KeyChange::DestroyKek {
            generation: 1,
            prefix: vec![2, 0, 0, 0, 1],
        };
        assert_eq!(s.change_keys(d1).expect("guarded"), 0);
        s.close();
        let s = SqliteStore::open(&path, crate::StoreKeys::for_tests()).expect("reopen");
        assert_eq!(s.kek_generations().expect("list").len(), 1);
        // destroy 1 after moving its keys on, and find its bytes in no file
        let all = s.data_keys_after(0, 10).expect("all");
        let moved = all
            .iter()
            .map(|(_, id, w)| Rewrap {
                key_id: id.clone(),
                old: w.clone(),
                new: vec![2, 0, 0, 0, 2],
            })
            .collect();
        assert_eq!(s.change_keys(KeyChange::Rewrap(moved)).expect("rewrap"), 5);
        let d1 = KeyChange::DestroyKek {
            generation: 1,
            prefix: vec![2, 0, 0, 0, 1],
        };
        assert_eq!(s.change_keys(d1).expect("destroy"), 1);
        for f in ["db.sqlite", "db.sqlite-wal", "db.sqlite-shm"] {
            let bytes = std::fs::read(dir.path().join(f)).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "{f} still holds the destroyed generation"
            );
        }
        s.close();
        // every row the rotation added, changed and removed is counted in the signed state
        assert_eq!(s.check_state(&mut || {}).unwrap(), Vec::<String>::new());
    }
}
