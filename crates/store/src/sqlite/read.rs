//! Reads: a pool of read-only connections, which WAL lets run concurrently with the
//! writer, and the queries of versions, data keys, metadata and the audit log.
//!
//! A read of several statements runs in one read transaction ([`SqliteStore::with_snapshot`]).
//! What never changes once committed (resource numbers' ids, data key numbers' key ids)
//! is remembered across reads ([`Remembered`]), and current rows are kept for the resource
//! state they were read in ([`crate::rows`]).

use std::collections::HashMap;

use parking_lot::RwLock;
use phivault_audit::StoredEvent;
use phivault_audit::merkle;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{DbId, SqliteStore, configure, engine, read_id};
use crate::rows::RowCache;
use crate::{SignedHead, StoreError, VersionRow};

/// Read connections kept open.
pub(super) const MAX_IDLE_READERS: usize = 16;

/// What readers have read of rows that never change once committed (`resource_no`,
/// `data_key`'s number → id): only ever inserted, never updated or deleted, and a reader
/// sees committed rows only (a number handed out in a transaction that rolled back is
/// never seen, even if it is handed out again), so what a reader read once holds for
/// good. Every commit makes SQLite drop a reader's page cache, and with every request
/// audited that is always, so each look-up kept here saves a B-tree descent through pages
/// read again from the file. The writer, which sees its own uncommitted rows, must not
/// use these. At most [`REMEMBERED_MAX`] entries (~100 bytes each); emptied when full.
#[derive(Default)]
pub(super) struct Remembered(RwLock<HashMap<i64, String>>);

/// See [`Remembered`].
const REMEMBERED_MAX: usize = 1 << 18;

impl Remembered {
    fn get_or_read(
        &self,
        key: i64,
        read: impl FnOnce() -> Result<String, rusqlite::Error>,
    ) -> Result<String, rusqlite::Error> {
        if let Some(v) = self.0.read().get(&key) {
            return Ok(v.clone());
        }
        let v = read()?;
        let mut known = self.0.write();
        if known.len() >= REMEMBERED_MAX {
            known.clear();
        }
        known.insert(key, v.clone());
        Ok(v)
    }
}

impl SqliteStore {
    /// The id of resource number `rno` (search pages turn every candidate number into
    /// an id), remembered (see [`Remembered`]). Readers only.
    pub(super) fn id_of_number(&self, c: &Connection, rno: i64) -> Result<String, rusqlite::Error> {
        self.ids_by_number.get_or_read(rno, || {
            c.prepare_cached("SELECT id FROM resource_no WHERE rno = ?1")?
                .query_row(params![rno], |r| read_id(r, 0))
        })
    }

    /// The key id of data key number `key_no` (every version row read names one),
    /// remembered (see [`Remembered`]). Readers only.
    fn key_id_of(&self, c: &Connection, key_no: i64) -> Result<String, rusqlite::Error> {
        self.key_ids.get_or_read(key_no, || {
            c.prepare_cached("SELECT key_id FROM data_key WHERE key_no = ?1")?
                .query_row(params![key_no], |r| r.get(0))
        })
    }

    /// The kept rows and the resource state `c` reads (see [`crate::rows`]).
    fn kept(&self, c: &Connection) -> Result<Option<(&RowCache, i64)>, rusqlite::Error> {
        let Some(cache) = &self.rows else {
            return Ok(None);
        };
        let epoch = c
            .prepare_cached("SELECT n FROM resource_epoch")?
            .query_row([], |r| r.get(0))?;
        Ok(Some((cache, epoch)))
    }

    /// A version row as read by [`raw_version`], with its key id.
    fn named(
        &self,
        c: &Connection,
        (key_no, mut row): (i64, VersionRow),
    ) -> Result<VersionRow, rusqlite::Error> {
        row.key_id = self.key_id_of(c, key_no)?;
        Ok(row)
    }

    pub(super) fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        self.with_connection(false, f)
    }

    /// [`Self::with_reader`] for reads of several statements: all in one read transaction.
    pub(super) fn with_snapshot<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        self.with_connection(true, f)
    }

    fn with_connection<T>(
        &self,
        snapshot: bool,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.lock().pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(engine)?;
                configure(&c)?;
                c
            }
        };
        let out = if snapshot {
            // One read transaction for every statement of `f`: SQLite drops a
            // connection's page cache at the start of a read transaction whenever the
            // WAL has changed (audited requests commit all the time), so per-statement
            // transactions re-read the same pages; and the statements see one state.
            conn.prepare_cached("BEGIN")
                .and_then(|mut s| s.execute([]))
                .and_then(|_| {
                    let out = f(&conn);
                    let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
                    conn.prepare_cached(end)?.execute([])?;
                    out
                })
                .map_err(engine)
        } else {
            f(&conn).map_err(engine)
        };
        let mut pool = self.readers.lock();
        // a connection left inside a transaction (its COMMIT or ROLLBACK failed) is dropped
        if pool.len() < MAX_IDLE_READERS && conn.is_autocommit() {
            pool.push(conn);
        }
        out
    }
}

/// A row of [`select_version!`]: its data key number, and the row without its key id
/// (see [`SqliteStore::named`]).
fn raw_version(r: &rusqlite::Row<'_>) -> Result<(i64, VersionRow), rusqlite::Error> {
    Ok((
        r.get(3)?,
        VersionRow {
            rtype: r.get(0)?,
            id: read_id(r, 1)?,
            version: r.get::<_, i64>(2)? as u64,
            key_id: String::new(),
            deleted: super::flag(r, 4)?,
            updated_ms: r.get(5)?,
            sealed: r.get(6)?,
        },
    ))
}

macro_rules! select_version {
    () => {
        "SELECT v.rtype, v.id, v.version, v.key_no, v.deleted, v.updated_ms, v.sealed \
         FROM resource_version v"
    };
}

const SELECT_VERSION: &str = select_version!();

const SELECT_CURRENT: &str = concat!(
    select_version!(),
    " WHERE v.rtype = ?1 AND v.id = ?2 ORDER BY v.version DESC LIMIT 1"
);

/// An audit head row as read: size, hash, signature, state.
type HeadRow = (i64, Vec<u8>, Vec<u8>, Vec<u8>);

/// The plain reads of [`crate::Store`].
impl SqliteStore {
    /// The current row of a resource, checked against what this process knows (see
    /// `fresh`).
    pub(super) fn read_current(
        &self,
        rtype: &str,
        id: &str,
    ) -> Result<Option<VersionRow>, StoreError> {
        self.heads.wait()?;
        let row = self.read_current_raw(rtype, id, true)?;
        if self.current_fresh(rtype, id, row.as_ref()) {
            return Ok(row);
        }
        self.catch_up()?;
        let row = self.read_current_raw(rtype, id, false)?;
        if self.current_fresh(rtype, id, row.as_ref()) {
            return Ok(row);
        }
        Err(self.resource_tampered(
            rtype,
            id,
            "the stored current version is not the one written",
        ))
    }

    fn read_current_raw(
        &self,
        rtype: &str,
        id: &str,
        cached: bool,
    ) -> Result<Option<VersionRow>, StoreError> {
        // two statements without a common snapshot: the row read after the count is at
        // least as new as the state counted, so never stale for it (crate::rows)
        self.with_reader(|c| {
            let kept = self.kept(c)?;
            let ids = [id.to_owned()];
            if cached
                && let Some((cache, epoch)) = kept
                && let Some(row) = cache.get_many(epoch, rtype, &ids).pop().flatten()
            {
                return Ok(Some(row));
            }
            let row = c
                .prepare_cached(SELECT_CURRENT)?
                .query_row(params![rtype, DbId(id)], raw_version)
                .optional()?
                .map(|raw| self.named(c, raw))
                .transpose()?;
            if let Some((cache, epoch)) = kept {
                cache.keep(epoch, &row);
            }
            Ok(row)
        })
    }

    /// [`Self::read_current`] of several resources.
    pub(super) fn read_current_many(
        &self,
        rtype: &str,
        ids: &[String],
    ) -> Result<Vec<Option<VersionRow>>, StoreError> {
        self.heads.wait()?;
        let mut rows = self.read_current_many_raw(rtype, ids)?;
        let stale: Vec<usize> = (0..ids.len())
            .filter(|&i| !self.current_fresh(rtype, &ids[i], rows[i].as_ref()))
            .collect();
        if stale.is_empty() {
            return Ok(rows);
        }
        self.catch_up()?;
        for i in stale {
            let row = self.read_current_raw(rtype, &ids[i], false)?;
            if !self.current_fresh(rtype, &ids[i], row.as_ref()) {
                return Err(self.resource_tampered(
                    rtype,
                    &ids[i],
                    "the stored current version is not the one written",
                ));
            }
            rows[i] = row;
        }
        Ok(rows)
    }

    fn read_current_many_raw(
        &self,
        rtype: &str,
        ids: &[String],
    ) -> Result<Vec<Option<VersionRow>>, StoreError> {
        // one connection, one snapshot and one prepared statement for the lot; rows kept
        // for this snapshot's resource state are not read again
        self.with_snapshot(|c| {
            let kept = self.kept(c)?;
            let mut out = match kept {
                Some((cache, epoch)) => cache.get_many(epoch, rtype, ids),
                None => vec![None; ids.len()],
            };
            let mut st = c.prepare_cached(SELECT_CURRENT)?;
            let mut read = Vec::new();
            for (slot, id) in out.iter_mut().zip(ids) {
                if slot.is_none() {
                    *slot = st
                        .query_row(params![rtype, DbId(id)], raw_version)
                        .optional()?
                        .map(|raw| self.named(c, raw))
                        .transpose()?;
                    read.extend(slot.as_ref());
                }
            }
            if let Some((cache, epoch)) = kept {
                cache.keep(epoch, read);
            }
            Ok(out)
        })
    }

    pub(super) fn read_version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<VersionRow>, StoreError> {
        self.heads.wait()?;
        let v = i64::try_from(version).unwrap_or(i64::MAX);
        let read = || {
            self.with_reader(|c| {
                c.prepare_cached(&format!(
                    "{SELECT_VERSION} WHERE v.rtype = ?1 AND v.id = ?2 AND v.version = ?3"
                ))?
                .query_row(params![rtype, DbId(id), v], raw_version)
                .optional()?
                .map(|raw| self.named(c, raw))
                .transpose()
            })
        };
        let row = read()?;
        if self.version_fresh(rtype, id, version, row.as_ref()) {
            return Ok(row);
        }
        self.catch_up()?;
        let row = read()?;
        if self.version_fresh(rtype, id, version, row.as_ref()) {
            return Ok(row);
        }
        Err(self.resource_tampered(
            rtype,
            id,
            "a stored version is missing or was never written",
        ))
    }

    pub(super) fn read_history(
        &self,
        rtype: &str,
        id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError> {
        self.heads.wait()?;
        let rows = self.read_history_raw(rtype, id, limit)?;
        if self.history_fresh(rtype, id, limit, &rows) {
            return Ok(rows);
        }
        self.catch_up()?;
        let rows = self.read_history_raw(rtype, id, limit)?;
        if self.history_fresh(rtype, id, limit, &rows) {
            return Ok(rows);
        }
        Err(self.resource_tampered(
            rtype,
            id.unwrap_or("*"),
            "the stored history is not the one written (a version missing or added)",
        ))
    }

    fn read_history_raw(
        &self,
        rtype: &str,
        id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(|c| match id {
            Some(id) => c
                .prepare_cached(&format!(
                    "{SELECT_VERSION} WHERE v.rtype = ?1 AND v.id = ?2 ORDER BY v.version DESC LIMIT ?3"
                ))?
                .query_map(params![rtype, DbId(id), limit], raw_version)?
                .map(|raw| self.named(c, raw?))
                .collect(),
            None => c
                .prepare_cached(&format!(
                    "{SELECT_VERSION} WHERE v.rtype = ?1 ORDER BY v.updated_ms DESC, v.id DESC, v.version DESC LIMIT ?2"
                ))?
                .query_map(params![rtype, limit], raw_version)?
                .map(|raw| self.named(c, raw?))
                .collect(),
        })
    }

    pub(super) fn read_data_key(&self, key_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_reader(|c| {
            c.prepare_cached("SELECT wrapped FROM data_key WHERE key_id = ?1")?
                .query_row(params![key_id], |r| r.get(0))
                .optional()
        })
    }

    pub(super) fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = || {
            self.with_reader(|c| {
                c.prepare_cached(&format!(
                    "SELECT v, {} FROM meta WHERE k = ?1",
                    self.mac_column()
                ))?
                .query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
            })
        };
        let row: Option<(Vec<u8>, Option<Vec<u8>>)> = read()?;
        if self.setting_fresh(key, row.as_ref().map(|(v, m)| (v.as_slice(), m.as_deref()))) {
            return Ok(row.map(|(v, _)| v));
        }
        // another process holding the keys may have written it: catch up, look again
        self.catch_up()?;
        let row = read()?;
        if self.setting_fresh(key, row.as_ref().map(|(v, m)| (v.as_slice(), m.as_deref()))) {
            return Ok(row.map(|(v, _)| v));
        }
        Err(self.setting_tampered(key))
    }

    pub(super) fn read_meta_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // keys are ASCII: the range [prefix, prefix + U+10FFFF) holds exactly the keys
        // that start with it
        let end = format!("{prefix}\u{10FFFF}");
        let n = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT k, v, {} FROM meta WHERE k >= ?1 AND k < ?2 ORDER BY k LIMIT ?3",
            self.mac_column()
        );
        let read = || -> Result<Vec<super::fresh::SettingRow>, StoreError> {
            self.with_reader(|c| {
                c.prepare_cached(&sql)?
                    .query_map(params![prefix, end, n], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect()
            })
        };
        let mut rows = read()?;
        if self.settings_fresh(prefix, limit, &rows).is_err() {
            self.catch_up()?;
            rows = read()?;
            self.settings_fresh(prefix, limit, &rows)?;
        }
        Ok(rows.into_iter().map(|(k, v, _)| (k, v)).collect())
    }

    pub(super) fn read_audit_head(&self) -> Result<Option<SignedHead>, StoreError> {
        // (a database written before heads carried a state has no such column)
        let with_state = self.with_reader(|c| {
            c.query_row(
                "SELECT count(*) FROM pragma_table_info('audit_head') WHERE name = 'state'",
                [],
                |r| r.get::<_, i64>(0),
            )
        })? > 0;
        let sql = if with_state {
            "SELECT size, hash, signature, coalesce(state, x'') FROM audit_head WHERE one = 1"
        } else {
            "SELECT size, hash, signature, x'' FROM audit_head WHERE one = 1"
        };
        let row: Option<HeadRow> = self.with_reader(|c| {
            c.query_row(sql, [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
        })?;
        row.map(|(size, hash, signature, state)| {
            Ok(SignedHead {
                size: size as u64,
                hash: hash
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("audit head hash length"))?,
                state,
                signature,
            })
        })
        .transpose()
    }

    pub(super) fn read_audit_checkpoints(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<merkle::Checkpoint>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            c.prepare_cached(
                "SELECT size, root, time_ms, signature FROM audit_checkpoint \
                 WHERE size > ?1 ORDER BY size LIMIT ?2",
            )?
            .query_map(params![after, limit], |r| {
                let root: Vec<u8> = r.get(1)?;
                Ok(merkle::Checkpoint {
                    size: r.get::<_, i64>(0)? as u64,
                    // a root of the wrong length cannot match any tree: zeros
                    root: root.try_into().unwrap_or([0u8; 32]),
                    time_ms: r.get::<_, i64>(2)? as u64,
                    signature: r.get(3)?,
                })
            })?
            .collect()
        })
    }

    pub(super) fn read_audit_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            c.prepare_cached(
                "SELECT seq, event, hash FROM audit_event WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?
            .query_map(params![after, limit], |r| {
                Ok(StoredEvent {
                    seq: r.get::<_, i64>(0)? as u64,
                    event: r.get(1)?,
                    hash: r.get(2)?,
                })
            })?
            .collect()
        })
    }

    pub(super) fn read_scan_audit(
        &self,
        visit: &mut dyn FnMut(StoredEvent) -> bool,
    ) -> Result<(), StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare("SELECT seq, event, hash FROM audit_event ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let ev = StoredEvent {
                    seq: r.get::<_, i64>(0)? as u64,
                    event: r.get(1)?,
                    hash: r.get(2)?,
                };
                if !visit(ev) {
                    break;
                }
            }
            Ok(())
        })
    }
}
