//! The state summary recomputed from what the file holds (see [`crate::integrity`]): the
//! resources' heads at every open, and everything — every version, posting, data key and
//! KEK generation — for the background verifier, `phivault verify` and the adoption of an
//! older database.

use std::collections::HashMap;

use ring::digest;
use rusqlite::{Connection, params};

use super::index::{decode_segment, load_pending};
use super::lists::token_postings;
use super::{engine, read_id};
use crate::StoreError;
use crate::integrity::{Digests, Head, Integrity, Known, Sum};
use crate::pending::Pending;

/// SHA-256 of a version's sealed bytes (what the audit log commits to).
pub(crate) fn sealed_digest(sealed: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, sealed).as_ref());
    out
}

/// Every resource's head (`resource_no`): into `known`, and their sum.
pub(super) fn load_heads(
    c: &Connection,
    integ: &Integrity,
    known: &mut Known,
) -> Result<Sum, StoreError> {
    load_heads_naming(c, integ, known, None)
}

/// [`load_heads`], also naming every resource number's type and id into `names`.
fn load_heads_naming(
    c: &Connection,
    integ: &Integrity,
    known: &mut Known,
    names: Option<&mut HashMap<i64, (String, String)>>,
) -> Result<Sum, StoreError> {
    // (every start does this: rows are read once, with no allocation but the id of a
    // resource whose id is not a UUID, and hashed on two threads)
    let most: i64 = c
        .query_row("SELECT coalesce(max(rno), 0) FROM resource_no", [], |r| {
            r.get(0)
        })
        .map_err(engine)?;
    known.heads.reserve(usize::try_from(most).unwrap_or(0));
    let mut types: Vec<String> = Vec::new();
    let mut rows: Vec<HeadRow> = Vec::with_capacity(usize::try_from(most).unwrap_or(0));
    {
        let mut st = c
            .prepare("SELECT rno, rtype, id, version, deleted FROM resource_no")
            .map_err(engine)?;
        let mut q = st.query([]).map_err(engine)?;
        while let Some(r) = q.next().map_err(engine)? {
            let rno: i64 = r.get(0).map_err(engine)?;
            let refs = (
                r.get_ref(1).map_err(engine)?,
                r.get_ref(2).map_err(engine)?,
                r.get_ref(3).map_err(engine)?,
                r.get_ref(4).map_err(engine)?,
            );
            use rusqlite::types::ValueRef as V;
            let (V::Text(rtype), id, V::Integer(version @ 1..), V::Integer(deleted @ 0..=1)) = refs
            else {
                return Err(super::trust::tampered(format!(
                    "resource number {rno}: its head is not in the form phivault writes"
                )));
            };
            let rtype = std::str::from_utf8(rtype)
                .map_err(|_| super::trust::tampered(format!("resource number {rno}'s type")))?;
            let t = match types.iter().position(|x| x == rtype) {
                Some(i) => i,
                None => {
                    types.push(rtype.to_owned());
                    types.len() - 1
                }
            };
            let id = match id {
                V::Blob(b) => {
                    HeadId::Uuid(<[u8; 16]>::try_from(b).map_err(|_| {
                        super::trust::tampered(format!("resource number {rno}'s id"))
                    })?)
                }
                V::Text(t) => HeadId::Text(
                    std::str::from_utf8(t)
                        .map_err(|_| super::trust::tampered(format!("resource number {rno}'s id")))?
                        .to_owned(),
                ),
                _ => {
                    return Err(super::trust::tampered(format!(
                        "resource number {rno}'s id"
                    )));
                }
            };
            rows.push(HeadRow {
                rno,
                rtype: t,
                id,
                head: Head {
                    rno,
                    version: version as u64,
                    deleted: deleted == 1,
                },
            });
        }
    }
    if let Some(names) = names {
        let mut buf = [0u8; 36];
        for row in &rows {
            let id = match &row.id {
                HeadId::Uuid(b) => uuid_str(b, &mut buf).to_owned(),
                HeadId::Text(t) => t.clone(),
            };
            names.insert(row.rno, (types[row.rtype].clone(), id));
        }
    }
    let hash = |part: &[HeadRow]| -> (Sum, Vec<(u128, Head)>) {
        let mut sum = Sum::default();
        let mut keys = Vec::with_capacity(part.len());
        let mut buf = [0u8; 36];
        for row in part {
            let rtype = types[row.rtype].as_str();
            let id = match &row.id {
                HeadId::Uuid(b) => uuid_str(b, &mut buf),
                HeadId::Text(t) => t.as_str(),
            };
            sum.add(integ.head_element(row.rno, rtype, id, row.head));
            keys.push((known.key(rtype, id), row.head));
        }
        (sum, keys)
    };
    let (left, right) = rows.split_at(rows.len() / 2);
    let ((a, ka), (b, kb)) = std::thread::scope(|s| {
        let other = s.spawn(|| hash(right));
        let mine = hash(left);
        (mine, other.join().unwrap_or_default())
    });
    if ka.len() + kb.len() != rows.len() {
        return Err(StoreError::Engine("the heads could not be summed".into()));
    }
    let mut sum = a;
    sum.add(b);
    for (key, head) in ka.into_iter().chain(kb) {
        if known.heads.insert(key, head).is_some() {
            return Err(super::trust::tampered(format!(
                "resource number {} names a resource another number names",
                head.rno
            )));
        }
    }
    Ok(sum)
}

/// A head as read at start (the type an index into the types seen).
struct HeadRow {
    rno: i64,
    rtype: usize,
    id: HeadId,
    head: Head,
}

/// An id as stored: a canonical UUID's 16 bytes, or any other id's text.
enum HeadId {
    Uuid([u8; 16]),
    Text(String),
}

/// A UUID's canonical text (lower-case, hyphenated) in `buf`.
fn uuid_str<'a>(b: &[u8; 16], buf: &'a mut [u8; 36]) -> &'a str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut j = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            buf[j] = b'-';
            j += 1;
        }
        buf[j] = HEX[usize::from(byte >> 4)];
        buf[j + 1] = HEX[usize::from(byte & 0xf)];
        j += 2;
    }
    std::str::from_utf8(buf).unwrap_or_default()
}

/// Called every [`PACE_ROWS`] rows of a recomputation (the background verifier sleeps
/// there so it does not crowd out requests).
pub(super) const PACE_ROWS: usize = 2_000;

/// Every digest of what `c` holds, from scratch (one read transaction: the caller's).
pub(super) fn recompute(
    c: &Connection,
    integ: &Integrity,
    pace: &mut dyn FnMut(),
) -> Result<Digests, StoreError> {
    let mut d = Digests::default();
    let mut n = 0usize;
    let mut tick = || {
        n += 1;
        if n.is_multiple_of(PACE_ROWS) {
            pace();
        }
    };
    {
        let mut st = c.prepare("SELECT k, mac FROM meta").map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        while let Some(r) = rows.next().map_err(engine)? {
            let mac: Option<Vec<u8>> = r.get(1).map_err(engine)?;
            if let Some(mac) = mac.and_then(|m| <[u8; 32]>::try_from(m).ok()) {
                d.settings.add(integ.setting_element(&mac));
            }
            tick();
        }
    }
    let mut known = Known::default();
    // resource number → type and id: postings are summed by the resource they lead to
    let mut names: HashMap<i64, (String, String)> = Default::default();
    d.heads = load_heads_naming(c, integ, &mut known, Some(&mut names))?;
    {
        let mut st = c
            .prepare(
                "SELECT v.rtype, v.id, v.version, v.deleted, v.updated_ms, k.key_id, v.sealed, v.rno \
                 FROM resource_version v JOIN data_key k ON k.key_no = v.key_no",
            )
            .map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        while let Some(r) = rows.next().map_err(engine)? {
            let row = crate::VersionRow {
                rtype: r.get(0).map_err(engine)?,
                id: read_id(r, 1).map_err(engine)?,
                version: r.get::<_, i64>(2).map_err(engine)? as u64,
                deleted: super::flag(r, 3).map_err(engine)?,
                updated_ms: r.get(4).map_err(engine)?,
                key_id: r.get(5).map_err(engine)?,
                sealed: Vec::new(),
            };
            let sealed = r
                .get_ref(6)
                .and_then(|v| Ok(v.as_blob()?))
                .map_err(engine)?;
            let rno: i64 = r.get(7).map_err(engine)?;
            d.body
                .add(integ.version_element(&row, rno, &sealed_digest(sealed)));
            tick();
        }
    }
    d.body.add(postings_sum(c, integ, &names, &mut tick)?);
    {
        let mut st = c
            .prepare("SELECT key_id, wrapped FROM data_key")
            .map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        while let Some(r) = rows.next().map_err(engine)? {
            let key_id: String = r.get(0).map_err(engine)?;
            let wrapped: Vec<u8> = r.get(1).map_err(engine)?;
            d.body.add(integ.key_element(&key_id, &wrapped));
            tick();
        }
    }
    {
        let mut st = c
            .prepare("SELECT size, root, time_ms, signature FROM audit_checkpoint")
            .map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        while let Some(r) = rows.next().map_err(engine)? {
            let root: Vec<u8> = r.get(1).map_err(engine)?;
            let sig: Vec<u8> = r.get(3).map_err(engine)?;
            d.body.add(integ.checkpoint_element(
                r.get(0).map_err(engine)?,
                &root,
                r.get(2).map_err(engine)?,
                &sig,
            ));
        }
    }
    {
        let mut st = c
            .prepare("SELECT generation, wrapped, created_ms FROM kek_generation")
            .map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        while let Some(r) = rows.next().map_err(engine)? {
            let wrapped: Vec<u8> = r.get(1).map_err(engine)?;
            d.body.add(integ.kek_element(
                r.get(0).map_err(engine)?,
                &wrapped,
                r.get(2).map_err(engine)?,
            ));
        }
    }
    Ok(d)
}

/// The sum of every live posting: the segments', with the log's records applied.
fn postings_sum(
    c: &Connection,
    integ: &Integrity,
    names: &HashMap<i64, (String, String)>,
    tick: &mut dyn FnMut(),
) -> Result<Sum, StoreError> {
    // a posting leading to no resource is summed as leading to an empty name: it differs
    // from every posting the writer counted
    let element = |ix: i64, tok: &[u8], rno: i64| match names.get(&rno) {
        Some((rtype, id)) => integ.posting_element(ix, tok, rtype, id),
        None => integ.posting_element(ix, tok, "", &rno.to_string()),
    };
    let mut sum = Sum::default();
    {
        // lookups find a token's run by the segments' keys: each key must be its first
        // posting, postings sorted, and no segment reaching into the next one's (a
        // segment moved under another key hides its postings from every lookup)
        let mut st = c
            .prepare("SELECT ix, tok, lo, data FROM search_seg ORDER BY ix, tok, lo")
            .map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        let mut last: Option<(i64, crate::pending::Tok, i64)> = None;
        while let Some(r) = rows.next().map_err(engine)? {
            let ix: i64 = r.get(0).map_err(engine)?;
            let key_tok = r
                .get_ref(1)
                .and_then(|v| Ok(v.as_blob()?.to_vec()))
                .map_err(engine)?;
            let key_lo: i64 = r.get(2).map_err(engine)?;
            let pairs = r
                .get_ref(3)
                .and_then(|v| Ok(v.as_blob()?))
                .and_then(decode_segment)
                .map_err(engine)?;
            let misplaced = || {
                super::trust::tampered(format!(
                    "an index segment of index {ix} is not where phivault put it (its key, order or bounds were changed)"
                ))
            };
            match pairs.first() {
                Some((t, n)) if t.bytes() == key_tok.as_slice() && *n == key_lo => {}
                _ => return Err(misplaced()),
            }
            let mut prev: Option<(&crate::pending::Tok, i64)> = match &last {
                Some((i, t, n)) if *i == ix => Some((t, *n)),
                _ => None,
            };
            for (tok, rno) in &pairs {
                if prev.is_some_and(|(t, n)| (t, n) >= (tok, *rno)) {
                    return Err(misplaced());
                }
                prev = Some((tok, *rno));
                sum.add(element(ix, tok.bytes(), *rno));
            }
            last = pairs.last().map(|(t, n)| (ix, t.clone(), *n));
            tick();
        }
    }
    let pending = load_pending(c)?;
    let none = Pending::default();
    let mut last: Option<(i64, crate::pending::Tok, Vec<i64>)> = None;
    for ((ix, tok, rno), live) in pending.all() {
        // the segments' postings of this token, read once per token
        if last.as_ref().is_none_or(|(i, t, _)| *i != ix || *t != tok) {
            let merged = token_postings(c, ix, &tok, &none, None).map_err(engine)?;
            last = Some((ix, tok.clone(), merged));
        }
        let Some((_, _, merged)) = &last else {
            continue;
        };
        let in_segments = merged.binary_search(&rno).is_ok();
        let e = element(ix, tok.bytes(), rno);
        match (live, in_segments) {
            (true, false) => sum.add(e),
            (false, true) => sum.sub(e),
            _ => {}
        }
    }
    Ok(sum)
}

/// Give every resource number its head (type, current version, tombstone) from the
/// versions stored: a database written before heads were kept.
pub(super) fn fill_heads(c: &Connection) -> Result<(), StoreError> {
    c.execute(
        "UPDATE resource_no SET rtype = cur.rtype, version = cur.version, deleted = cur.deleted \
         FROM (SELECT v.rno, v.rtype, v.version, v.deleted FROM resource_version v \
               WHERE v.version = (SELECT max(x.version) FROM resource_version x \
                                  WHERE x.rtype = v.rtype AND x.id = v.id)) AS cur \
         WHERE resource_no.rno = cur.rno AND resource_no.rtype IS NULL",
        params![],
    )
    .map_err(engine)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuid_text_is_the_canonical_one() {
        let id = "0190a3e4-1111-7222-8333-444455556666";
        let b = phivault_audit::uuid_bytes(id).unwrap();
        let mut buf = [0u8; 36];
        assert_eq!(super::uuid_str(&b, &mut buf), id);
        assert_eq!(phivault_audit::uuid_text(&b), id);
    }
}
