//! A batch's versions written with a handful of statements whatever their number (a
//! transaction Bundle of a patient's records is one batch): the heads read in one query
//! and checked, the keys and erasure markers in another, new resource numbers in a third,
//! then every head, version and posting written with one `unnest` statement each. A batch
//! naming one resource twice is written put by put (`writer::apply_put`), in order.

use std::collections::{HashMap, HashSet};

use phivault_audit::Write;

use super::conn::PgConn;
use super::head_mac;
use super::version_mac;
use crate::integrity::{Digests, Head, Integrity};
use crate::sqlite::{PutDigest, postings_of_entries};
use crate::{CommitError, Expect, Put, StoreError};

fn store_err(e: StoreError) -> CommitError {
    CommitError::Store(e)
}

/// The columns of the rows one batch writes.
#[derive(Default)]
struct Rows<'a> {
    gone_rtype: Vec<&'a str>,
    gone_id: Vec<&'a str>,
    gone_pkey: Vec<String>,
    head_rtype: Vec<&'a str>,
    head_id: Vec<&'a str>,
    head_pkey: Vec<&'a str>,
    head_rno: Vec<i64>,
    head_version: Vec<i64>,
    head_deleted: Vec<bool>,
    head_mac: Vec<Vec<u8>>,
    ver_sealed: Vec<&'a [u8]>,
    ver_updated: Vec<i64>,
    ver_mac: Vec<Vec<u8>>,
    /// (type, id, new key, old key) of resources moved to another data key.
    moved: Vec<(&'a str, &'a str, &'a str, String)>,
    del_ix: Vec<i64>,
    del_token: Vec<&'a [u8]>,
    del_id: Vec<&'a str>,
    add_ix: Vec<i64>,
    add_token: Vec<&'a [u8]>,
    add_id: Vec<&'a str>,
    add_pkey: Vec<&'a str>,
    add_rtype: Vec<&'a str>,
}

/// Write `puts` (each after checking its precondition against the stored head, which must
/// carry its MAC); the writes the batch's audit event commits.
pub(super) async fn apply_puts(
    c: &mut PgConn,
    integ: &Integrity,
    digests: &mut Digests,
    puts: &[Put],
    sealed: &[PutDigest],
) -> Result<Vec<Write>, CommitError> {
    let mut distinct = HashSet::with_capacity(puts.len());
    if !puts
        .iter()
        .all(|p| distinct.insert((p.row.rtype.as_str(), p.row.id.as_str())))
    {
        let mut writes = Vec::with_capacity(puts.len());
        for (index, (put, digest)) in puts.iter().zip(sealed).enumerate() {
            writes.push(super::writer::apply_put(c, integ, digests, index, put, digest).await?);
        }
        return Ok(writes);
    }
    let found = stored_heads(c, integ, puts).await.map_err(store_err)?;
    for (index, put) in puts.iter().enumerate() {
        let current = found
            .get(&(put.row.rtype.as_str(), put.row.id.as_str()))
            .map(|(_, h)| h.version);
        let ok = match put.expect {
            Expect::Absent => current.is_none(),
            Expect::Version(v) => current == Some(v),
        };
        if !ok || put.row.version != current.unwrap_or(0) + 1 {
            return Err(CommitError::Conflict { index, current });
        }
    }
    check_keys(c, puts).await?;
    let new = puts.len() - found.len();
    let mut numbers = if new > 0 {
        c.query(
            "SELECT nextval('resource_no') FROM generate_series(1, $1::int8)",
            &[&(new as i64)],
        )
        .await
        .map_err(store_err)?
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .rev() // (popped: handed out in the order of the puts)
        .collect::<Vec<_>>()
    } else {
        Vec::new()
    };
    let mut rows = Rows::default();
    let mut writes = Vec::with_capacity(puts.len());
    for (put, digest) in puts.iter().zip(sealed) {
        let row = &put.row;
        let old = found.get(&(row.rtype.as_str(), row.id.as_str()));
        let rno = match old {
            Some((old_pkey, h)) => {
                digests
                    .heads
                    .sub(integ.head_element(h.rno, &row.rtype, &row.id, *h));
                rows.gone_rtype.push(&row.rtype);
                rows.gone_id.push(&row.id);
                rows.gone_pkey.push(old_pkey.clone());
                if *old_pkey != row.key_id {
                    rows.moved
                        .push((&row.rtype, &row.id, &row.key_id, old_pkey.clone()));
                }
                h.rno
            }
            None => numbers.pop().ok_or(CommitError::Store(StoreError::Engine(
                "no resource number was given out".into(),
            )))?,
        };
        let head = Head {
            rno,
            version: row.version,
            deleted: row.deleted,
        };
        digests
            .heads
            .add(integ.head_element(rno, &row.rtype, &row.id, head));
        rows.head_rtype.push(&row.rtype);
        rows.head_id.push(&row.id);
        rows.head_pkey.push(&row.key_id);
        rows.head_rno.push(rno);
        rows.head_version.push(row.version as i64);
        rows.head_deleted.push(row.deleted);
        rows.head_mac
            .push(head_mac(integ, &row.rtype, &row.id, &row.key_id, head).to_vec());
        rows.ver_sealed.push(&row.sealed);
        rows.ver_updated.push(row.updated_ms);
        rows.ver_mac
            .push(version_mac(integ, row, &digest.sealed).to_vec());
        digests
            .body
            .add(integ.version_element(row, rno, &digest.sealed));
        digests.body.sub(digest.postings_old);
        digests.body.add(digest.postings_new);
        let new_entries: &[crate::IndexEntry] = if row.deleted { &[] } else { &put.index };
        let old_p = postings_of_entries(&row.rtype, &put.replaces);
        let new_p = postings_of_entries(&row.rtype, new_entries);
        for (ix, token) in old_p.iter().filter(|p| new_p.binary_search(p).is_err()) {
            rows.del_ix.push(*ix);
            rows.del_token.push(token);
            rows.del_id.push(&row.id);
        }
        for (ix, token) in new_p.iter().filter(|p| old_p.binary_search(p).is_err()) {
            rows.add_ix.push(*ix);
            rows.add_token.push(token);
            rows.add_id.push(&row.id);
            rows.add_pkey.push(&row.key_id);
            rows.add_rtype.push(&row.rtype);
        }
        writes.push(Write::Version {
            resource_type: row.rtype.clone(),
            resource_id: row.id.clone(),
            version: row.version,
            deleted: row.deleted,
            sealed: digest.sealed,
        });
    }
    write_rows(c, &rows).await.map_err(store_err)?;
    Ok(writes)
}

/// The stored heads of the batch's resources, each checked against its MAC.
async fn stored_heads<'a>(
    c: &mut PgConn,
    integ: &Integrity,
    puts: &'a [Put],
) -> Result<HashMap<(&'a str, &'a str), (String, Head)>, StoreError> {
    let (rtypes, ids): (Vec<&str>, Vec<&str>) = puts
        .iter()
        .map(|p| (p.row.rtype.as_str(), p.row.id.as_str()))
        .unzip();
    let rows = c
        .query(
            "SELECT rtype, id, pkey, rno, version, deleted, mac FROM resource_head \
             WHERE (rtype, id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            &[&rtypes, &ids],
        )
        .await?;
    let by_name: HashMap<(&str, &str), &'a Put> = puts
        .iter()
        .map(|p| ((p.row.rtype.as_str(), p.row.id.as_str()), p))
        .collect();
    let mut out = HashMap::with_capacity(rows.len());
    for r in &rows {
        let (rtype, id, pkey): (&str, &str, String) = (r.get(0), r.get(1), r.get(2));
        let Some(put) = by_name.get(&(rtype, id)) else {
            continue;
        };
        let head = Head {
            rno: r.get(3),
            version: r.get::<_, i64>(4) as u64,
            deleted: r.get(5),
        };
        if head_mac(integ, rtype, id, &pkey, head).as_slice() != r.get::<_, &[u8]>(6) {
            return Err(super::trust::tampered(format!(
                "{rtype}/{id}: its head row is not the one phivault wrote"
            )));
        }
        let key = (put.row.rtype.as_str(), put.row.id.as_str());
        if out.insert(key, (pkey, head)).is_some() {
            return Err(super::trust::tampered(format!(
                "{rtype}/{id} has more than one head row (one was added outside phivault)"
            )));
        }
    }
    Ok(out)
}

/// Every put's data key must be stored and not erased.
async fn check_keys(c: &mut PgConn, puts: &[Put]) -> Result<(), CommitError> {
    let mut keys: Vec<&str> = puts.iter().map(|p| p.row.key_id.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let markers: Vec<String> = keys.iter().map(|k| crate::erased_marker_key(k)).collect();
    let rows = c
        .query(
            "SELECT 'k'::text, pkey FROM data_key WHERE pkey = ANY($1) \
             UNION ALL SELECT 'e'::text, k FROM meta WHERE k = ANY($2)",
            &[&keys, &markers],
        )
        .await
        .map_err(store_err)?;
    let mut stored = HashSet::new();
    let mut erased = HashSet::new();
    for r in &rows {
        let (kind, k): (&str, String) = (r.get(0), r.get(1));
        if kind == "k" {
            stored.insert(k);
        } else {
            erased.insert(k);
        }
    }
    for key in &keys {
        if erased.contains(&crate::erased_marker_key(key)) {
            return Err(CommitError::KeyErased);
        }
        if !stored.contains(*key) {
            return Err(CommitError::Store(StoreError::Corrupt(
                "version sealed under a data key that is not stored",
            )));
        }
    }
    Ok(())
}

async fn write_rows(c: &mut PgConn, r: &Rows<'_>) -> Result<(), StoreError> {
    if !r.gone_rtype.is_empty() {
        c.execute(
            "DELETE FROM resource_head WHERE (rtype, id, pkey) IN \
             (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
            &[&r.gone_rtype, &r.gone_id, &r.gone_pkey],
        )
        .await?;
    }
    c.execute(
        "INSERT INTO resource_head (rtype, id, pkey, rno, version, deleted, mac) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], \
                              $6::bool[], $7::bytea[])",
        &[
            &r.head_rtype,
            &r.head_id,
            &r.head_pkey,
            &r.head_rno,
            &r.head_version,
            &r.head_deleted,
            &r.head_mac,
        ],
    )
    .await?;
    c.execute(
        "INSERT INTO resource_version (rtype, id, version, pkey, deleted, updated_ms, sealed, mac) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::bool[], \
                              $6::int8[], $7::bytea[], $8::bytea[])",
        &[
            &r.head_rtype,
            &r.head_id,
            &r.head_version,
            &r.head_pkey,
            &r.head_deleted,
            &r.ver_updated,
            &r.ver_sealed,
            &r.ver_mac,
        ],
    )
    .await?;
    for (rtype, id, new, old) in &r.moved {
        // (the resource moved to another data key: its postings follow it)
        c.execute(
            "UPDATE posting SET pkey = $3 WHERE pkey = $4 AND rtype = $1 AND id = $2",
            &[rtype, id, new, old],
        )
        .await?;
    }
    if !r.del_ix.is_empty() {
        c.execute(
            "DELETE FROM posting WHERE (ix, token, id) IN \
             (SELECT * FROM unnest($1::int8[], $2::bytea[], $3::text[]))",
            &[&r.del_ix, &r.del_token, &r.del_id],
        )
        .await?;
    }
    if !r.add_ix.is_empty() {
        c.execute(
            "INSERT INTO posting (ix, token, id, pkey, rtype) \
             SELECT * FROM unnest($1::int8[], $2::bytea[], $3::text[], $4::text[], $5::text[]) \
             ON CONFLICT DO NOTHING",
            &[
                &r.add_ix,
                &r.add_token,
                &r.add_id,
                &r.add_pkey,
                &r.add_rtype,
            ],
        )
        .await?;
    }
    Ok(())
}
