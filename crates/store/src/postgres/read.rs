//! Reads: versions (each head and version row checked against its MAC), blind-index
//! queries evaluated in SQL over the postings, keys, settings (checked against their
//! MACs) and the audit log.

use phivault_audit::StoredEvent;
use phivault_audit::merkle;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::PgStore;
use super::conn::pg;
use crate::integrity::Head;
use crate::{Candidates, IndexEntry, IndexStats, KekRow, SignedHead, StoreError, VersionRow};

/// A query of version rows: the columns [`version_row`] reads, then `$tail`.
macro_rules! select_version {
    ($tail:literal) => {
        concat!(
            "SELECT v.rtype, v.id, v.version, v.pkey, v.deleted, v.updated_ms, v.sealed, v.mac",
            $tail
        )
    };
}

/// Times a settings read reads every row again while other nodes keep writing.
const REFRESH_ROUNDS: usize = 8;

/// A settings row as read: (value, MAC).
type SettingValue = (Vec<u8>, Vec<u8>);

fn version_row(r: &Row, at: usize) -> (VersionRow, Vec<u8>) {
    (
        VersionRow {
            rtype: r.get(at),
            id: r.get(at + 1),
            version: r.get::<_, i64>(at + 2) as u64,
            key_id: r.get(at + 3),
            deleted: r.get(at + 4),
            updated_ms: r.get(at + 5),
            sealed: r.get(at + 6),
        },
        r.get(at + 7),
    )
}

/// Ids of current, non-deleted resources of `rtype` having every one of `tokens`, in id
/// order (at most `limit`). Runs on any connection: the writer's sees its own
/// transaction's postings (a guard), a reader's what is committed.
pub(super) async fn matching(
    c: &tokio_postgres::Client,
    rtype: &str,
    tokens: &[IndexEntry],
    limit: Option<usize>,
) -> Result<Vec<String>, StoreError> {
    let (ixs, toks): (Vec<i64>, Vec<&[u8]>) = crate::sqlite::postings_of_entries(rtype, tokens)
        .into_iter()
        .unzip();
    if ixs.is_empty() {
        return Ok(Vec::new());
    }
    let n = ixs.len() as i64;
    let limit = limit.map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX));
    let rows = c
        .query(
            "SELECT id FROM posting WHERE (ix, token) IN \
             (SELECT x, t FROM unnest($1::int8[], $2::bytea[]) AS u(x, t)) \
             GROUP BY id HAVING count(*) = $3 ORDER BY id LIMIT $4",
            &[&ixs, &toks, &n, &limit],
        )
        .await
        .map_err(pg)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// [`matching`] of every guard at once (one statement): per guard, at most one id more
/// than it excepts.
pub(super) async fn matching_each(
    c: &tokio_postgres::Client,
    guards: &[crate::Guard],
) -> Result<Vec<Vec<String>>, StoreError> {
    let mut sql = String::from("SELECT g, id FROM (");
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut parts = 0;
    for (g, guard) in guards.iter().enumerate() {
        let crate::Guard::NoMatch {
            rtype,
            tokens,
            except,
        } = guard;
        let (ixs, toks): (Vec<i64>, Vec<Vec<u8>>) =
            crate::sqlite::postings_of_entries(rtype, tokens)
                .into_iter()
                .map(|(ix, t)| (ix, t.to_vec()))
                .unzip();
        if ixs.is_empty() {
            continue;
        }
        let n = ixs.len() as i64;
        let p = params.len();
        params.push(Box::new(ixs));
        params.push(Box::new(toks));
        params.push(Box::new(n));
        params.push(Box::new((except.len() + 1) as i64));
        if parts > 0 {
            sql.push_str(" UNION ALL ");
        }
        sql.push_str(&format!(
            "(SELECT {g}::int8 AS g, id FROM posting WHERE (ix, token) IN \
             (SELECT * FROM unnest(${}::int8[], ${}::bytea[])) \
             GROUP BY id HAVING count(*) = ${} ORDER BY id LIMIT ${})",
            p + 1,
            p + 2,
            p + 3,
            p + 4
        ));
        parts += 1;
    }
    let mut out = vec![Vec::new(); guards.len()];
    if parts == 0 {
        return Ok(out);
    }
    sql.push_str(") AS m");
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    for r in c.query(&sql, &refs).await.map_err(pg)? {
        let g = usize::try_from(r.get::<_, i64>(0)).unwrap_or(usize::MAX);
        if let Some(slot) = out.get_mut(g) {
            slot.push(r.get(1));
        }
    }
    Ok(out)
}

/// A candidate query of `rtype` as SQL over `posting` and `resource_head`, its parameters
/// pushed on `params`.
fn candidates_sql(
    rtype: &str,
    q: &Candidates,
    sql: &mut String,
    params: &mut Vec<Box<dyn ToSql + Sync + Send>>,
) {
    match q {
        Candidates::Tokens { param, tokens } => {
            // (the index number names the type and the parameter)
            let ix = crate::sqlite::index_no(rtype, param);
            params.push(Box::new(tokens.clone()));
            let t = params.len();
            sql.push_str(&format!(
                "SELECT id FROM posting WHERE ix = {ix} AND token = ANY(${t})"
            ));
        }
        Candidates::All => {
            params.push(Box::new(rtype.to_owned()));
            let r = params.len();
            sql.push_str(&format!(
                "SELECT id FROM resource_head WHERE rtype = ${r} AND NOT deleted"
            ));
        }
        Candidates::And(parts) | Candidates::Or(parts) if parts.is_empty() => {
            if matches!(q, Candidates::And(_)) {
                candidates_sql(rtype, &Candidates::All, sql, params);
            } else {
                sql.push_str("SELECT id FROM resource_head WHERE false");
            }
        }
        Candidates::And(parts) | Candidates::Or(parts) => {
            let op = if matches!(q, Candidates::And(_)) {
                " INTERSECT "
            } else {
                " UNION "
            };
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    sql.push_str(op);
                }
                sql.push('(');
                candidates_sql(rtype, part, sql, params);
                sql.push(')');
            }
        }
    }
}

impl PgStore {
    pub(super) fn read_current_many(
        &self,
        rtype: &str,
        ids: &[String],
    ) -> Result<Vec<Option<VersionRow>>, StoreError> {
        let rows = self.pool.with(async |c| {
            c.query(
                "SELECT h.id, h.pkey, h.rno, h.version, h.deleted, h.mac, \
                 v.rtype, v.id, v.version, v.pkey, v.deleted, v.updated_ms, v.sealed, v.mac \
                 FROM resource_head h LEFT JOIN resource_version v \
                 ON v.rtype = h.rtype AND v.id = h.id AND v.version = h.version \
                 WHERE h.rtype = $1 AND h.id = ANY($2)",
                &[&rtype, &ids],
            )
            .await
        })?;
        let mut out: Vec<Option<VersionRow>> = vec![None; ids.len()];
        for r in &rows {
            let id: String = r.get(0);
            let pkey: String = r.get(1);
            let head = Head {
                rno: r.get(2),
                version: r.get::<_, i64>(3) as u64,
                deleted: r.get(4),
            };
            if !self.head_ok(rtype, &id, &pkey, head, r.get(5)) {
                return Err(self.tampered(format!(
                    "{rtype}/{id}: its head row is not the one phivault wrote"
                )));
            }
            if r.get::<_, Option<String>>(6).is_none() {
                return Err(self.tampered(format!(
                    "{rtype}/{id}: its current version {} was removed",
                    head.version
                )));
            }
            let (row, mac) = version_row(r, 6);
            if !self.version_ok(&row, &mac) || row.deleted != head.deleted || row.key_id != pkey {
                return Err(self.tampered(format!(
                    "{rtype}/{id}: version {} is not the one phivault wrote",
                    head.version
                )));
            }
            for (slot, want) in out.iter_mut().zip(ids) {
                if *want == id {
                    if slot.is_some() {
                        return Err(self
                            .tampered(format!("{rtype}/{id} has more than one current version")));
                    }
                    *slot = Some(row.clone());
                }
            }
        }
        Ok(out)
    }

    /// Version rows as read, each checked against its MAC.
    fn checked_versions(&self, rows: &[Row]) -> Result<Vec<VersionRow>, StoreError> {
        rows.iter()
            .map(|r| {
                let (row, mac) = version_row(r, 0);
                if self.version_ok(&row, &mac) {
                    Ok(row)
                } else {
                    Err(self.tampered(format!(
                        "{}/{}: version {} is not the one phivault wrote",
                        row.rtype, row.id, row.version
                    )))
                }
            })
            .collect()
    }

    pub(super) fn read_version(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<VersionRow>, StoreError> {
        let v = i64::try_from(version).unwrap_or(i64::MAX);
        let read = || {
            self.pool.with(async |c| {
                c.query(
                    select_version!(
                        " FROM resource_version v WHERE v.rtype = $1 AND v.id = $2 AND v.version = $3"
                    ),
                    &[&rtype, &id, &v],
                )
                .await
            })
        };
        let mut rows = self.checked_versions(&read()?)?;
        if rows.is_empty() && version >= 1 && self.integ.is_some() {
            // a version at or below the current one was written: missing is a removal. (The
            // current version is read after the miss, and the version read again after
            // that: a version committed meanwhile — with its head, in one transaction — is
            // there by then; only a removed one is still missing.)
            let current = self.read_current_many(rtype, &[id.to_owned()])?;
            if current
                .first()
                .and_then(Option::as_ref)
                .is_some_and(|c| c.version >= version)
            {
                rows = self.checked_versions(&read()?)?;
                if rows.is_empty() {
                    return Err(
                        self.tampered(format!("{rtype}/{id}: version {version} was removed"))
                    );
                }
            }
        }
        if rows.len() > 1 {
            return Err(self.tampered(format!("{rtype}/{id}: version {version} is stored twice")));
        }
        Ok(rows.pop())
    }

    pub(super) fn read_history(
        &self,
        rtype: &str,
        id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VersionRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.pool.with(async |c| match id {
            Some(id) => {
                c.query(
                    select_version!(
                        " FROM resource_version v WHERE v.rtype = $1 AND v.id = $2 \
                         ORDER BY v.version DESC LIMIT $3"
                    ),
                    &[&rtype, &id, &limit],
                )
                .await
            }
            None => {
                c.query(
                    select_version!(
                        " FROM resource_version v WHERE v.rtype = $1 \
                         ORDER BY v.updated_ms DESC, v.id DESC, v.version DESC LIMIT $2"
                    ),
                    &[&rtype, &limit],
                )
                .await
            }
        })?;
        let rows = self.checked_versions(&rows)?;
        if let Some(id) = id {
            // one resource's versions follow each other without a gap
            for pair in rows.windows(2) {
                if pair[1].version + 1 != pair[0].version {
                    return Err(self.tampered(format!(
                        "{rtype}/{id}: its history misses a version below {}",
                        pair[0].version
                    )));
                }
            }
        }
        Ok(rows)
    }

    pub(super) fn read_candidates(
        &self,
        rtype: &str,
        query: &Candidates,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut inner = String::new();
        candidates_sql(rtype, query, &mut inner, &mut params);
        params.push(Box::new(after.unwrap_or("").to_owned()));
        let a = params.len();
        params.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
        let l = params.len();
        let sql = format!("SELECT id FROM ({inner}) AS c WHERE id > ${a} ORDER BY id LIMIT ${l}");
        self.pool.with(async |c| {
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let rows = c.client.query(&sql, &refs).await.map_err(pg)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    pub(super) fn read_index_stats(
        &self,
        rtype: &str,
        param: &str,
    ) -> Result<IndexStats, StoreError> {
        let ix = crate::sqlite::index_no(rtype, param);
        self.pool.with(async |c| {
            let r = c
                .query_opt(
                    "SELECT count(DISTINCT id), count(*), count(DISTINCT token), \
                     coalesce((SELECT max(n) FROM (SELECT count(*) AS n FROM posting \
                               WHERE ix = $1 GROUP BY token) t), 0) \
                     FROM posting WHERE ix = $1",
                    &[&ix],
                )
                .await?;
            let n = |i: usize| r.as_ref().map_or(0, |r| r.get::<_, i64>(i).max(0) as u64);
            Ok(IndexStats {
                resources: n(0),
                rows: n(1),
                distinct_tokens: n(2),
                max_rows_per_token: n(3),
            })
        })
    }

    pub(super) fn read_data_key(&self, key_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.pool.with(async |c| {
            let r = c
                .query_opt("SELECT wrapped FROM data_key WHERE pkey = $1", &[&key_id])
                .await?;
            Ok(r.map(|r| r.get(0)))
        })
    }

    /// A settings row as read: its MAC valid and the one this node believes is newest.
    fn setting_fresh(&self, key: &str, row: Option<&SettingValue>) -> bool {
        match row {
            Some((v, mac)) => self.setting_ok(key, v, mac),
            None => !self.setting_known(key) || self.integ.is_none(),
        }
    }

    fn setting_tampered(&self, key: &str) -> StoreError {
        self.tampered(format!(
            "settings row {key} is not the one last written (changed outside phivault)"
        ))
    }

    pub(super) fn read_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.settings_current()?;
        let read = || -> Result<Option<SettingValue>, StoreError> {
            let row = self.pool.with(async |c| {
                c.query_opt("SELECT v, mac FROM meta WHERE k = $1", &[&key])
                    .await
            })?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        };
        let mut row = read()?;
        // another node may have written it: read every row again against the signed state
        // (a refresh that sums is believed; a row still newer was written after it — nodes
        // writing on, so a few rounds; a row put back never sums and is refused there)
        for _ in 0..REFRESH_ROUNDS {
            if self.setting_fresh(key, row.as_ref()) {
                return Ok(row.map(|(v, _)| v));
            }
            self.refresh_settings()?;
            row = read()?;
        }
        if self.setting_fresh(key, row.as_ref()) {
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
        // that start with it (byte order: the column's collation is "C")
        self.settings_current()?;
        let end = format!("{prefix}\u{10FFFF}");
        let n = i64::try_from(limit).unwrap_or(i64::MAX);
        let read = || -> Result<Vec<(String, SettingValue)>, StoreError> {
            let rows = self.pool.with(async |c| {
                c.query(
                    "SELECT k, v, mac FROM meta WHERE k >= $1 AND k < $2 ORDER BY k LIMIT $3",
                    &[&prefix, &end, &n],
                )
                .await
            })?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect())
        };
        // every row the one believed newest, and no row believed there missing
        let fresh = |rows: &[(String, SettingValue)]| -> Result<(), String> {
            for (k, row) in rows {
                if !self.setting_fresh(k, Some(row)) {
                    return Err(k.clone());
                }
            }
            if let Some(known) = self.known_with_prefix(prefix, limit) {
                let got: Vec<&String> = rows.iter().map(|(k, _)| k).collect();
                if let Some(k) = known.iter().find(|k| !got.contains(k)) {
                    return Err(k.clone());
                }
            }
            Ok(())
        };
        let mut rows = read()?;
        for _ in 0..REFRESH_ROUNDS {
            if fresh(&rows).is_ok() {
                break;
            }
            self.refresh_settings()?;
            rows = read()?;
        }
        if let Err(k) = fresh(&rows) {
            return Err(self.setting_tampered(&k));
        }
        Ok(rows.into_iter().map(|(k, (v, _))| (k, v)).collect())
    }

    pub(super) fn read_kek_generations(&self) -> Result<Vec<KekRow>, StoreError> {
        let rows = self.pool.with(async |c| {
            c.query(
                "SELECT generation, wrapped, created_ms FROM kek_generation ORDER BY generation",
                &[],
            )
            .await
        })?;
        rows.iter()
            .map(|r| {
                Ok(KekRow {
                    generation: u32::try_from(r.get::<_, i64>(0))
                        .map_err(|_| StoreError::Corrupt("KEK generation number"))?,
                    wrapped: r.get(1),
                    created_ms: r.get(2),
                })
            })
            .collect()
    }

    pub(super) fn read_data_keys_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
        let n = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.pool.with(async |c| {
            c.query(
                "SELECT key_no, pkey, wrapped FROM data_key WHERE key_no > $1 \
                 ORDER BY key_no LIMIT $2",
                &[&after, &n],
            )
            .await
        })?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub(super) fn read_audit_head(&self) -> Result<Option<SignedHead>, StoreError> {
        let row = self.pool.with(async |c| {
            c.query_opt(
                "SELECT size, hash, state, signature FROM audit_head WHERE one = 1",
                &[],
            )
            .await
        })?;
        let Some(r) = row else { return Ok(None) };
        let size: i64 = r.get(0);
        if size == 0 {
            return Ok(None);
        }
        Ok(Some(SignedHead {
            size: size as u64,
            hash: r
                .get::<_, Vec<u8>>(1)
                .try_into()
                .map_err(|_| StoreError::Corrupt("audit head hash length"))?,
            state: r.get(2),
            signature: r.get(3),
        }))
    }

    pub(super) fn read_audit_checkpoints(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<merkle::Checkpoint>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let n = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.pool.with(async |c| {
            c.query(
                "SELECT size, root, time_ms, signature FROM audit_checkpoint \
                 WHERE size > $1 ORDER BY size LIMIT $2",
                &[&after, &n],
            )
            .await
        })?;
        Ok(rows
            .iter()
            .map(|r| merkle::Checkpoint {
                size: r.get::<_, i64>(0) as u64,
                // a root of the wrong length cannot match any tree: zeros
                root: r.get::<_, Vec<u8>>(1).try_into().unwrap_or([0u8; 32]),
                time_ms: r.get::<_, i64>(2) as u64,
                signature: r.get(3),
            })
            .collect())
    }

    pub(super) fn read_audit_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let n = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.pool.with(async |c| {
            c.query(
                "SELECT seq, event, hash FROM audit_event WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &n],
            )
            .await
        })?;
        Ok(rows.iter().map(stored_event).collect())
    }

    pub(super) fn read_scan_audit(
        &self,
        visit: &mut dyn FnMut(StoredEvent) -> bool,
    ) -> Result<(), StoreError> {
        // pages in sequence order (a cursor would hold one snapshot open for a long scan)
        let mut after = 0u64;
        loop {
            let page = self.read_audit_after(after, 4096)?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = last.seq;
            for ev in page {
                if !visit(ev) {
                    return Ok(());
                }
            }
        }
    }
}

fn stored_event(r: &Row) -> StoredEvent {
    StoredEvent {
        seq: r.get::<_, i64>(0) as u64,
        event: r.get(1),
        hash: r.get(2),
    }
}
