//! Every row of a stopped store as stored — ciphertext, blind tokens and identifiers,
//! nothing opened — for a move to another engine (`crate::postgres::migrate`). One read
//! transaction: a consistent copy.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{engine, flag, read_id};
use crate::{StoreError, VersionRow};

/// A resource's head as stored: (number, type, id, current version, tombstone).
pub(crate) type HeadRow = (i64, String, String, u64, bool);

/// The signed audit head: (size, hash, state, signature).
pub(crate) type SignedHeadRow = (i64, Vec<u8>, Vec<u8>, Vec<u8>);

/// A settings row: (key, value, MAC).
pub(crate) type SettingRow = (String, Vec<u8>, Vec<u8>);

/// An audit event: (sequence number, bytes, chain hash).
pub(crate) type EventRow = (i64, Vec<u8>, Vec<u8>);

/// A signed checkpoint: (size, root, time, signature).
pub(crate) type CheckpointRow = (i64, Vec<u8>, i64, Vec<u8>);

/// A store's file open for export, inside one read transaction.
pub(crate) struct Export {
    conn: Connection,
    key_ids: HashMap<i64, String>,
}

impl Export {
    pub(crate) fn open(path: &Path) -> Result<Export, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(engine)?;
        conn.execute_batch("BEGIN").map_err(engine)?;
        let mut key_ids = HashMap::new();
        {
            let mut st = conn
                .prepare("SELECT key_no, key_id FROM data_key")
                .map_err(engine)?;
            let mut rows = st.query([]).map_err(engine)?;
            while let Some(r) = rows.next().map_err(engine)? {
                key_ids.insert(r.get(0).map_err(engine)?, r.get(1).map_err(engine)?);
            }
        }
        Ok(Export { conn, key_ids })
    }

    /// Data keys: (key id, wrapped; empty once erased).
    pub(crate) fn keys(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.all(
            "SELECT key_id, wrapped FROM data_key ORDER BY key_no",
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// Every resource's head.
    pub(crate) fn heads(&self) -> Result<Vec<HeadRow>, StoreError> {
        self.all(
            "SELECT rno, rtype, id, version, deleted FROM resource_no ORDER BY rno",
            |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    read_id(r, 2)?,
                    r.get::<_, i64>(3)? as u64,
                    flag(r, 4)?,
                ))
            },
        )
    }

    /// Visit every stored version with its resource's number, in pages of `page`.
    pub(crate) fn versions(
        &self,
        page: usize,
        visit: &mut dyn FnMut(Vec<(i64, VersionRow)>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT rtype, id, version, key_no, deleted, updated_ms, sealed, rno \
                 FROM resource_version",
            )
            .map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        let mut batch = Vec::with_capacity(page);
        while let Some(r) = rows.next().map_err(engine)? {
            let key_no: i64 = r.get(3).map_err(engine)?;
            let key_id = self
                .key_ids
                .get(&key_no)
                .cloned()
                .ok_or(StoreError::Corrupt("a version sealed under no stored key"))?;
            let row = VersionRow {
                rtype: r.get(0).map_err(engine)?,
                id: read_id(r, 1).map_err(engine)?,
                version: r.get::<_, i64>(2).map_err(engine)? as u64,
                key_id,
                deleted: flag(r, 4).map_err(engine)?,
                updated_ms: r.get(5).map_err(engine)?,
                sealed: r.get(6).map_err(engine)?,
            };
            batch.push((r.get(7).map_err(engine)?, row));
            if batch.len() == page {
                visit(std::mem::take(&mut batch))?;
            }
        }
        if !batch.is_empty() {
            visit(batch)?;
        }
        Ok(())
    }

    /// Every live blind-index posting: (index number, token, resource number), the
    /// merged segments with the log's records applied.
    pub(crate) fn postings(&self) -> Result<BTreeSet<(i64, Vec<u8>, i64)>, StoreError> {
        let mut out = BTreeSet::new();
        {
            let mut st = self
                .conn
                .prepare("SELECT ix, data FROM search_seg")
                .map_err(engine)?;
            let mut rows = st.query([]).map_err(engine)?;
            while let Some(r) = rows.next().map_err(engine)? {
                let ix: i64 = r.get(0).map_err(engine)?;
                let data = r
                    .get_ref(1)
                    .map_err(engine)?
                    .as_blob()
                    .map_err(|_| StoreError::Corrupt("an index segment is not a blob"))?;
                for (tok, n) in super::index::decode_segment(data).map_err(engine)? {
                    out.insert((ix, tok.bytes().to_vec(), n));
                }
            }
        }
        let pending = super::index::load_pending(&self.conn)?;
        for ((ix, tok, n), live) in pending.all() {
            let p = (ix, tok.bytes().to_vec(), n);
            if live {
                out.insert(p);
            } else {
                out.remove(&p);
            }
        }
        Ok(out)
    }

    /// Settings rows: (key, value, MAC).
    pub(crate) fn settings(&self) -> Result<Vec<SettingRow>, StoreError> {
        self.all(
            "SELECT k, v, coalesce(mac, x'') FROM meta ORDER BY k",
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }

    /// KEK generations: (generation, wrapped, created).
    pub(crate) fn keks(&self) -> Result<Vec<(i64, Vec<u8>, i64)>, StoreError> {
        self.all(
            "SELECT generation, wrapped, created_ms FROM kek_generation ORDER BY generation",
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }

    /// Audit events after `after`, at most `limit`: (seq, event, hash).
    pub(crate) fn events(&self, after: i64, limit: i64) -> Result<Vec<EventRow>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT seq, event, hash FROM audit_event WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(engine)?;
        st.query_map([after, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(engine)?
            .collect::<Result<_, _>>()
            .map_err(engine)
    }

    /// Signed checkpoints: (size, root, time, signature).
    pub(crate) fn checkpoints(&self) -> Result<Vec<CheckpointRow>, StoreError> {
        self.all(
            "SELECT size, root, time_ms, signature FROM audit_checkpoint ORDER BY size",
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
    }

    /// The signed audit head, if any.
    pub(crate) fn head(&self) -> Result<Option<SignedHeadRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT size, hash, coalesce(state, x''), signature FROM audit_head WHERE one = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(engine)
    }

    fn all<T>(
        &self,
        sql: &str,
        f: impl FnMut(&rusqlite::Row<'_>) -> Result<T, rusqlite::Error>,
    ) -> Result<Vec<T>, StoreError> {
        let mut st = self.conn.prepare(sql).map_err(engine)?;
        st.query_map([], f)
            .map_err(engine)?
            .collect::<Result<_, _>>()
            .map_err(engine)
    }
}
