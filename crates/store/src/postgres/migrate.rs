//! An embedded store moved to PostgreSQL without opening a record: every row is copied
//! as stored (ciphertext, blind tokens, wrapped keys, MACs, the audit log), the rows
//! PostgreSQL checks as read get their MACs, and the signed head comes along unchanged —
//! the state it signs is the one the copy must sum to. The copy is one transaction into
//! an empty database; then the store is opened as `serve` opens it (its checks), summed
//! in full against the signed state, and the move is recorded in the audit log.

use std::collections::HashMap;
use std::path::Path;

use phivault_audit::merkle::{self, Frontier};

use super::conn::{PgConn, Pool, block_on};
use super::{PgStore, PgTarget, head_mac, version_mac};
use crate::integrity::{Head, Integrity};
use crate::sqlite::export::Export;
use crate::{Store, StoreError, StoreKeys, WriteBatch};

/// Rows written per statement.
const PAGE: usize = 2_000;

/// What a move copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrated {
    /// Data keys (erased ones included, empty).
    pub keys: u64,
    /// Resources (their heads).
    pub resources: u64,
    /// Stored versions.
    pub versions: u64,
    /// Blind-index postings.
    pub postings: u64,
    /// Settings rows.
    pub settings: u64,
    /// Audit events.
    pub events: u64,
}

/// Move the embedded store at `sqlite` (stopped; opened and checked by the caller) into
/// the empty database `target`. `progress` is told each stage and the rows done.
pub fn from_sqlite(
    sqlite: &Path,
    target: &PgTarget,
    keys: StoreKeys,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<Migrated, StoreError> {
    let export = Export::open(sqlite)?;
    let (size, hash, state, signature) = export
        .head()?
        .ok_or_else(|| StoreError::Engine("the store has no signed audit head".into()))?;
    // the head must be this store's: signed by its audit key, its state under its keys
    super::trust::checked_head(
        &keys.integrity,
        &keys.audit_public,
        size,
        hash.clone(),
        state.clone(),
        signature.clone(),
    )?;
    let pool = Pool::new(target.clone())?;
    let copied = (|| {
        let mut c = pool.connect()?;
        block_on(async {
            super::schema::migrate(&mut c).await?;
            let held = c
                .query_opt(
                    "SELECT 1 FROM audit_head UNION ALL SELECT 1 FROM meta \
                     UNION ALL SELECT 1 FROM resource_version LIMIT 1",
                    &[],
                )
                .await?;
            if held.is_some() {
                return Err(StoreError::Engine(
                    "the database already holds a phivault store: migrate into an empty database"
                        .into(),
                ));
            }
            c.batch("BEGIN").await?;
            let out = copy(
                &mut c,
                &export,
                &keys.integrity,
                (size, hash, state, signature),
                progress,
            )
            .await;
            match out {
                Ok(m) => {
                    c.batch("COMMIT").await?;
                    Ok(m)
                }
                Err(e) => {
                    let _ = c.batch("ROLLBACK").await;
                    Err(e)
                }
            }
        })
    })();
    pool.shut();
    let migrated = copied?;
    drop(export);
    // opened as a server opens it: the head, the log's end, every setting and head summed
    progress("checking", 0);
    let store = PgStore::open(target, keys)?;
    let differ = store.check_state(&mut || {})?;
    if !differ.is_empty() {
        store.close();
        return Err(StoreError::Tampered(format!(
            "the copy does not sum to the signed state: {}",
            differ.join("; ")
        )));
    }
    let rx = store.submit(WriteBatch {
        audit: vec![super::trust::store_event("migrate", Vec::new())],
        ..Default::default()
    });
    let done = rx.blocking_recv().map_err(|_| StoreError::Closed)?;
    store.close();
    done.map_err(crate::CommitError::into_store_error)?;
    Ok(migrated)
}

async fn copy(
    c: &mut PgConn,
    export: &Export,
    integ: &Integrity,
    (size, hash, state, signature): (i64, Vec<u8>, Vec<u8>, Vec<u8>),
    progress: &mut dyn FnMut(&str, u64),
) -> Result<Migrated, StoreError> {
    let mut m = Migrated::default();
    for page in export.keys()?.chunks(PAGE) {
        let (ids, wrapped): (Vec<&str>, Vec<&[u8]>) =
            page.iter().map(|(k, w)| (k.as_str(), w.as_slice())).unzip();
        c.execute(
            "INSERT INTO data_key (pkey, wrapped) SELECT * FROM unnest($1::text[], $2::bytea[])",
            &[&ids, &wrapped],
        )
        .await?;
        m.keys += page.len() as u64;
    }
    let heads = export.heads()?;
    let current: HashMap<i64, u64> = heads.iter().map(|h| (h.0, h.3)).collect();
    // the key each resource's current version is sealed under: its head's `pkey`
    let mut pkeys: HashMap<i64, String> = HashMap::with_capacity(heads.len());
    m.versions = copy_versions(c, export, integ, &current, &mut pkeys, progress)?;
    for page in heads.chunks(PAGE) {
        let mut cols = HeadColumns::default();
        for (rno, rtype, id, version, deleted) in page {
            let pkey = pkeys.get(rno).cloned().ok_or(StoreError::Corrupt(
                "a resource whose current version is not stored",
            ))?;
            let head = Head {
                rno: *rno,
                version: *version,
                deleted: *deleted,
            };
            cols.mac
                .push(head_mac(integ, rtype, id, &pkey, head).to_vec());
            cols.rtype.push(rtype.as_str());
            cols.id.push(id.as_str());
            cols.pkey.push(pkey);
            cols.rno.push(*rno);
            cols.version.push(*version as i64);
            cols.deleted.push(*deleted);
        }
        c.execute(
            "INSERT INTO resource_head (rtype, id, pkey, rno, version, deleted, mac) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], \
                                  $6::bool[], $7::bytea[])",
            &[
                &cols.rtype,
                &cols.id,
                &cols.pkey,
                &cols.rno,
                &cols.version,
                &cols.deleted,
                &cols.mac,
            ],
        )
        .await?;
        m.resources += page.len() as u64;
        progress("resources", m.resources);
    }
    let max_rno = heads.iter().map(|h| h.0).max().unwrap_or(0);
    if max_rno > 0 {
        c.execute("SELECT setval('resource_no', $1)", &[&max_rno])
            .await?;
    }
    let by_rno: HashMap<i64, (&str, &str)> = heads
        .iter()
        .map(|h| (h.0, (h.1.as_str(), h.2.as_str())))
        .collect();
    let postings: Vec<_> = export.postings()?.into_iter().collect();
    for page in postings.chunks(PAGE) {
        let mut ix = Vec::with_capacity(page.len());
        let mut token = Vec::with_capacity(page.len());
        let mut id = Vec::with_capacity(page.len());
        let mut pkey = Vec::with_capacity(page.len());
        let mut rtype = Vec::with_capacity(page.len());
        for (x, t, rno) in page {
            let (rt, i) = by_rno
                .get(rno)
                .ok_or(StoreError::Corrupt("a posting of no resource"))?;
            ix.push(*x);
            token.push(t.as_slice());
            id.push(*i);
            pkey.push(pkeys.get(rno).map_or("", String::as_str));
            rtype.push(*rt);
        }
        c.execute(
            "INSERT INTO posting (ix, token, id, pkey, rtype) \
             SELECT * FROM unnest($1::int8[], $2::bytea[], $3::text[], $4::text[], $5::text[])",
            &[&ix, &token, &id, &pkey, &rtype],
        )
        .await?;
        m.postings += page.len() as u64;
        progress("postings", m.postings);
    }
    let settings = export.settings()?;
    if settings.iter().any(|(_, _, mac)| mac.len() != 32) {
        return Err(StoreError::Engine(
            "a settings row has no MAC: open the store with `phivault serve` once first".into(),
        ));
    }
    for page in settings.chunks(PAGE) {
        let k: Vec<&str> = page.iter().map(|r| r.0.as_str()).collect();
        let v: Vec<&[u8]> = page.iter().map(|r| r.1.as_slice()).collect();
        let mac: Vec<&[u8]> = page.iter().map(|r| r.2.as_slice()).collect();
        c.execute(
            "INSERT INTO meta (k, v, mac) SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[])",
            &[&k, &v, &mac],
        )
        .await?;
        m.settings += page.len() as u64;
    }
    for (g, wrapped, created) in export.keks()? {
        c.execute(
            "INSERT INTO kek_generation (generation, wrapped, created_ms) VALUES ($1, $2, $3)",
            &[&g, &wrapped, &created],
        )
        .await?;
    }
    let mut frontier = Frontier::new();
    let mut after = 0i64;
    loop {
        let page = export.events(after, PAGE as i64)?;
        let Some(last) = page.last() else { break };
        after = last.0;
        let mut seq = Vec::with_capacity(page.len());
        let mut event = Vec::with_capacity(page.len());
        let mut h = Vec::with_capacity(page.len());
        for (s, e, hh) in &page {
            frontier.push(merkle::leaf_hash(e));
            seq.push(*s);
            event.push(e.as_slice());
            h.push(hh.as_slice());
        }
        c.execute(
            "INSERT INTO audit_event (seq, event, hash) \
             SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[])",
            &[&seq, &event, &h],
        )
        .await?;
        m.events += page.len() as u64;
        progress("audit events", m.events);
    }
    if frontier.size() != size as u64 {
        return Err(StoreError::Tampered(format!(
            "the audit log holds {} events but the signed head names {size}",
            frontier.size()
        )));
    }
    for (s, root, time, sig) in export.checkpoints()? {
        c.execute(
            "INSERT INTO audit_checkpoint (size, root, time_ms, signature) VALUES ($1, $2, $3, $4)",
            &[&s, &root, &time, &sig],
        )
        .await?;
    }
    c.execute(
        "INSERT INTO audit_head (one, size, hash, state, signature, frontier) \
         VALUES (1, $1, $2, $3, $4, $5)",
        &[&size, &hash, &state, &signature, &frontier.to_bytes()],
    )
    .await?;
    Ok(m)
}

#[derive(Default)]
struct HeadColumns<'a> {
    rtype: Vec<&'a str>,
    id: Vec<&'a str>,
    pkey: Vec<String>,
    rno: Vec<i64>,
    version: Vec<i64>,
    deleted: Vec<bool>,
    mac: Vec<Vec<u8>>,
}

/// Copy every version, a page at a time as the export reads them, each with its MAC;
/// note the key of each resource's current version. The versions copied. (Called inside
/// the copy's `block_on`: each page's insert waits on this thread too.)
fn copy_versions(
    c: &mut PgConn,
    export: &Export,
    integ: &Integrity,
    current: &HashMap<i64, u64>,
    pkeys: &mut HashMap<i64, String>,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<u64, StoreError> {
    let mut n = 0u64;
    export.versions(PAGE, &mut |page| {
        let mut rtype = Vec::with_capacity(page.len());
        let mut id = Vec::with_capacity(page.len());
        let mut version = Vec::with_capacity(page.len());
        let mut pkey = Vec::with_capacity(page.len());
        let mut deleted = Vec::with_capacity(page.len());
        let mut updated = Vec::with_capacity(page.len());
        let mut sealed = Vec::with_capacity(page.len());
        let mut mac = Vec::with_capacity(page.len());
        for (rno, row) in &page {
            if current.get(rno) == Some(&row.version) {
                pkeys.insert(*rno, row.key_id.clone());
            }
            let digest = crate::sqlite::sealed_digest(&row.sealed);
            mac.push(version_mac(integ, row, &digest).to_vec());
            rtype.push(row.rtype.as_str());
            id.push(row.id.as_str());
            version.push(row.version as i64);
            pkey.push(row.key_id.as_str());
            deleted.push(row.deleted);
            updated.push(row.updated_ms);
            sealed.push(row.sealed.as_slice());
        }
        block_on(c.execute(
            "INSERT INTO resource_version (rtype, id, version, pkey, deleted, updated_ms, sealed, mac) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::bool[], \
                                  $6::int8[], $7::bytea[], $8::bytea[])",
            &[&rtype, &id, &version, &pkey, &deleted, &updated, &sealed, &mac],
        ))?;
        n += page.len() as u64;
        progress("versions", n);
        Ok(())
    })?;
    Ok(n)
}
