//! The blind index on disk: token-ordered segments (`search_seg`, see [`crate::segments`])
//! and the `index_log` records of postings not yet merged into them.
//!
//! Every group commit appends one `index_log` record of the postings it adds and removes;
//! the writer keeps their net state in memory ([`crate::pending`]) and, once it is large or
//! index writes pause, merges it into the segments and empties the log in one transaction
//! ([`merge_pending`]). Each open replays the log ([`load_pending`]). Readers hold the
//! pending set's read lock across their SQL query and a merge holds its write lock across
//! the commit, so every lookup sees each committed posting in exactly one of the two places.

use parking_lot::RwLock;
use rusqlite::{Connection, OptionalExtension, params};

use super::engine;
use crate::StoreError;
use crate::pending::{self, Pending, Tok};
use crate::segments;

/// The number naming the index of `(rtype, param)` in `search_seg` and `index_log`: a stable 31-bit
/// FNV-1a hash (no registry to keep in step; stored in 4 bytes per row; a collision among
/// the few thousand R4 parameters is unlikely and would only add candidates, which the
/// server's verification removes).
pub(crate) fn index_no(rtype: &str, param: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rtype.bytes().chain([0u8]).chain(param.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((h ^ (h >> 32)) & 0x7fff_ffff) as i64
}

/// Replay `index_log` into the set of pending postings, and note which indexes the
/// segments hold (one seek per index).
pub(super) fn load_pending(conn: &Connection) -> Result<Pending, StoreError> {
    let mut p = Pending::default();
    let mut st = conn
        .prepare(
            "WITH RECURSIVE t(ix) AS (SELECT min(ix) FROM search_seg \
             UNION ALL SELECT (SELECT min(ix) FROM search_seg WHERE ix > t.ix) FROM t \
             WHERE t.ix IS NOT NULL) SELECT ix FROM t WHERE ix IS NOT NULL",
        )
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        p.note_index(r.get(0).map_err(engine)?);
    }
    drop(rows);
    drop(st);
    let mut st = conn
        .prepare("SELECT data FROM index_log ORDER BY seq")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let data = r
            .get_ref(0)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(engine)?;
        for (ix, rno, token, live) in
            decode_log_record(data).ok_or(StoreError::Corrupt("index log record"))?
        {
            p.apply((ix, Tok::new(token), rno), live);
        }
    }
    Ok(p)
}

/// One `index_log` record: every posting one group commit adds or removes, in order, as
/// `live u8 ‖ ix u32 BE ‖ resource number u64 BE ‖ token_len u8 ‖ token` each (one row
/// per commit instead of one per posting or per write: the writer is serial, and rows
/// are what it pays for).
pub(super) fn encode_log_record(out: &mut Vec<u8>, ix: i64, rno: i64, token: &[u8], live: bool) {
    out.push(u8::from(live));
    out.extend_from_slice(&(ix as u32).to_be_bytes());
    out.extend_from_slice(&(rno as u64).to_be_bytes());
    out.push(token.len() as u8);
    out.extend_from_slice(token);
}

pub(super) type LogEntry<'a> = (i64, i64, &'a [u8], bool);

pub(super) fn decode_log_record(mut data: &[u8]) -> Option<Vec<LogEntry<'_>>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let live = match data.first()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let ix = i64::from(u32::from_be_bytes(data.get(1..5)?.try_into().ok()?));
        let rno = i64::try_from(u64::from_be_bytes(data.get(5..13)?.try_into().ok()?)).ok()?;
        let len = usize::from(*data.get(13)?);
        let token = data.get(14..14 + len)?;
        out.push((ix, rno, token, live));
        data = &data[14 + len..];
    }
    Some(out)
}

/// [`merge_pending`]; a failed merge changes nothing and is retried later.
pub(super) fn merge_or_warn(conn: &mut Connection, pending: &RwLock<Pending>) {
    if let Err(e) = merge_pending(conn, pending) {
        tracing::warn!(error = %e, "index merge failed; retried later");
    }
}

/// Merge every pending posting into the segments and empty `index_log`, in one
/// transaction.
fn merge_pending(conn: &mut Connection, pending: &RwLock<Pending>) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let p = pending.read();
        let rows: Vec<(pending::Row, bool)> = p.all().collect();
        merge_into_segments(&tx, &rows)?;
    }
    tx.execute("DELETE FROM index_log", [])?;
    // readers hold the read lock across their queries: none sees the postings in neither
    // place (committed here, cleared from memory) nor in both
    let mut p = pending.write();
    tx.commit()?;
    p.clear();
    Ok(())
}

pub(super) fn corrupt_segment() -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, "search_seg.data".into(), rusqlite::types::Type::Blob)
}

pub(super) fn decode_segment(data: &[u8]) -> Result<Vec<segments::Pair>, rusqlite::Error> {
    segments::decode(data).ok_or_else(corrupt_segment)
}

/// Apply log records (in key order: `live` = the posting exists after it) to the
/// segments. Only the segments the records fall into are rewritten (re-cut when they
/// grow); records below an index's first segment go into it, an index without segments
/// gets new ones.
pub(super) fn merge_into_segments(
    c: &Connection,
    rows: &[(pending::Row, bool)],
) -> Result<(), rusqlite::Error> {
    let mut at_or_before = c.prepare_cached(
        "SELECT tok, lo, data FROM search_seg WHERE ix = ?1 AND (tok, lo) <= (?2, ?3) \
         ORDER BY tok DESC, lo DESC LIMIT 1",
    )?;
    let mut first = c.prepare_cached(
        "SELECT tok, lo, data FROM search_seg WHERE ix = ?1 ORDER BY tok, lo LIMIT 1",
    )?;
    let mut next_key = c.prepare_cached(
        "SELECT tok, lo FROM search_seg WHERE ix = ?1 AND (tok, lo) > (?2, ?3) \
         ORDER BY tok, lo LIMIT 1",
    )?;
    let mut delete =
        c.prepare_cached("DELETE FROM search_seg WHERE ix = ?1 AND tok = ?2 AND lo = ?3")?;
    let mut insert =
        c.prepare_cached("INSERT INTO search_seg (ix, tok, lo, data) VALUES (?1, ?2, ?3, ?4)")?;
    type Seg = (Vec<u8>, i64, Vec<u8>);
    let seg_row = |r: &rusqlite::Row<'_>| -> Result<Seg, rusqlite::Error> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    };
    let mut i = 0;
    while i < rows.len() {
        let ((ix, tok, n), _) = &rows[i];
        let ix = *ix;
        let seg = match at_or_before
            .query_row(params![ix, tok.bytes(), n], seg_row)
            .optional()?
        {
            Some(s) => Some(s),
            None => first.query_row(params![ix], seg_row).optional()?,
        };
        let upper: Option<(Tok, i64)> = match &seg {
            Some((t, lo, _)) => next_key
                .query_row(params![ix, t, lo], |r| {
                    Ok((Tok::new(&r.get::<_, Vec<u8>>(0)?), r.get(1)?))
                })
                .optional()?,
            None => None,
        };
        let mut j = i;
        while j < rows.len() {
            let ((jx, jt, jn), _) = &rows[j];
            let below = upper.as_ref().is_none_or(|(ut, un)| (jt, *jn) < (ut, *un));
            if *jx != ix || !below {
                break;
            }
            j += 1;
        }
        let old = match &seg {
            Some((_, _, data)) => decode_segment(data)?,
            None => Vec::new(),
        };
        let merged = apply_records(old, &rows[i..j]);
        if let Some((t, lo, _)) = &seg {
            delete.execute(params![ix, t, lo])?;
        }
        for ((t, lo), data) in segments::cut(&merged) {
            insert.execute(params![ix, t.bytes(), lo, data])?;
        }
        i = j;
    }
    Ok(())
}

/// Sorted postings `old` with sorted log records applied.
fn apply_records(
    old: Vec<segments::Pair>,
    records: &[(pending::Row, bool)],
) -> Vec<segments::Pair> {
    let mut out = Vec::with_capacity(old.len() + records.len());
    let mut old = old.into_iter().peekable();
    for ((_, t, n), live) in records {
        while let Some(p) = old.next_if(|(ot, on)| (ot, *on) < (t, *n)) {
            out.push(p);
        }
        // the record decides whether this posting exists
        old.next_if(|(ot, on)| ot == t && on == n);
        if *live {
            out.push((t.clone(), *n));
        }
    }
    out.extend(old);
    out
}
