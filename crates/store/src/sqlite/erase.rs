//! Crypto-shredding: destroying one data key ([`crate::Store::erase_key`]).
//!
//! One transaction of its own, on the writer, with `secure_delete` on: the key's
//! `data_key` row is overwritten with zeros and deleted; a row with the same number and
//! key id and an empty wrapped key takes its place (the versions sealed under it keep
//! their key number, and foreign keys are checked at commit); the pending index postings
//! are merged into the segments and every posting of a resource whose current version is
//! sealed under the key is removed (a pass over every segment: the index keeps no reverse
//! map from resources to tokens); the erasure's marker (`meta`, [`erased_marker_key`]) and
//! its audit events are written; the resource state moves on (readers drop the rows they
//! kept). After the commit the write-ahead log is checkpointed with `TRUNCATE`, so the old
//! wrapped key's bytes are in none of the database's files.
//!
//! The marker wins over the key table: a put sealed under an erased key is refused
//! ([`CommitError::KeyErased`], checked in the writer's `apply_put`), and the records'
//! engine asks for the marker before it unwraps a key, so a wrapped key written back into
//! `data_key` by someone who can write the file is never used again.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::index::{decode_segment, merge_into_segments};
use super::trust::{catch_up, put_setting, setting_event};
use super::writer::{
    Command, Writer, append_audit_events, apply_caught_up, apply_settings, sign_head,
    write_checkpoint,
};
use super::{SqliteStore, engine};
use crate::integrity::Known;
use crate::{CommitError, Erased, Erasure, erased_marker_key, segments};

/// How many times the write-ahead log's truncation is tried while readers hold it.
const TRUNCATE_TRIES: u32 = 100;

/// Whether `key_id` carries an erasure marker, as this process knows the settings rows
/// (a marker removed from storage still counts: see [`crate::integrity`]).
pub(super) fn is_erased(known: &Known, key_id: &str) -> bool {
    known.settings.contains_key(&erased_marker_key(key_id))
}

impl SqliteStore {
    pub(super) fn submit_erasure(
        &self,
        erasure: Erasure,
    ) -> oneshot::Receiver<Result<Erased, CommitError>> {
        let (tx, rx) = oneshot::channel();
        // a closed store drops the reply: the receiver reports it
        self.send(Command::Erase(erasure, tx));
        rx
    }
}

/// Run one erasure command on the writer and answer it.
pub(super) fn run(conn: &mut Connection, cmd: Command, w: &mut Writer) {
    let Command::Erase(erasure, reply) = cmd else {
        return;
    };
    let (head, frontier, digests) = (w.head, w.frontier.clone(), w.digests);
    if let Err(e) = w.heads.wait() {
        let _ = reply.send(Err(CommitError::Store(e)));
        return;
    }
    let res = match erase(conn, &erasure, w) {
        Ok(mut done) => {
            done.wal_truncated = truncate_wal(conn);
            Ok(done)
        }
        Err(e) => {
            w.head = head;
            w.frontier = frontier;
            w.digests = digests;
            Err(e)
        }
    };
    let _ = reply.send(res);
}

/// The erasure's transaction (see the module docs).
fn erase(conn: &mut Connection, er: &Erasure, w: &mut Writer) -> Result<Erased, CommitError> {
    let e = |e: rusqlite::Error| CommitError::Store(engine(e));
    conn.pragma_update(None, "secure_delete", "ON").map_err(e)?;
    // pending postings are merged here: lookups wait until the commit (as for a merge)
    let mut pending = w.pending.write();
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(e)?;
    // another process may have appended since this writer's last group (as every group
    // does first): the erasure's events go after theirs
    if let Some(caught) = catch_up(&tx, &w.integ, &mut w.head, &mut w.frontier, &mut w.digests)? {
        apply_caught_up(&w.known, caught);
    }
    if is_erased(&w.known.read(), &er.key_id) {
        return Err(CommitError::KeyErased);
    }
    let key_no: i64 = tx
        .query_row(
            "SELECT key_no FROM data_key WHERE key_id = ?1",
            params![er.key_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(e)?
        .ok_or(CommitError::NoKey)?;
    let numbers = numbers_sealed_under(&tx, key_no, &w.known.read())?;
    let rows: Vec<_> = pending.all().collect();
    merge_into_segments(&tx, &rows).map_err(e)?;
    tx.execute("DELETE FROM index_log", []).map_err(e)?;
    let (integ, digests) = (&w.integ, &mut w.digests);
    let postings = purge_postings(&tx, &numbers, &mut |ix, tok, n| {
        if let Some((rtype, id)) = numbers.get(&n) {
            digests.body.sub(integ.posting_element(ix, tok, rtype, id));
        }
    })
    .map_err(e)?;
    let wrapped = destroy_key(&tx, key_no, &er.key_id).map_err(e)?;
    digests.body.sub(integ.key_element(&er.key_id, &wrapped));
    digests.body.add(integ.key_element(&er.key_id, &[]));
    let (change, write) = put_setting(
        &tx,
        &w.integ,
        &w.known.read(),
        &[],
        &mut w.digests,
        &erased_marker_key(&er.key_id),
        &er.marker,
    )?;
    tx.execute("UPDATE resource_epoch SET n = n + 1", [])
        .map_err(e)?;
    let mut leaves = Vec::new();
    // the marker's commitment travels in the erasure's own event
    let mut audit = er.audit.clone();
    match audit.first_mut() {
        Some(ev) => ev.writes.push(write),
        None => audit.push(setting_event(vec![write])),
    }
    let committed = append_audit_events(&tx, &audit, &mut w.head, &mut leaves)?;
    for l in &leaves {
        w.frontier.push(*l);
    }
    if !leaves.is_empty() {
        write_checkpoint(&tx, &w.frontier, &w.signer, &w.integ, &mut w.digests)?;
        sign_head(
            &tx,
            &w.head,
            &w.integ.seal_state(&w.head, &w.digests),
            &w.signer,
        )?;
    }
    tx.commit().map_err(e)?;
    apply_settings(&w.known, vec![change]);
    w.checkpointed = w.head.size;
    pending.clear();
    if !leaves.is_empty() {
        w.last_checkpoint = Some(std::time::Instant::now());
    }
    Ok(Erased {
        resources: numbers.len() as u64,
        postings,
        wal_truncated: false,
        last_audit_seq: committed.last_audit_seq,
    })
}

/// The resource numbers of the resources whose current version is sealed under `key_no`
/// (a resource moved to another patient since keeps its postings: they are that patient's).
fn numbers_sealed_under(
    c: &Connection,
    key_no: i64,
    known: &Known,
) -> Result<HashMap<i64, (String, String)>, CommitError> {
    let rows: Vec<(String, String, i64)> = c
        .prepare(
            "SELECT v.rtype, v.id, v.rno FROM resource_version v WHERE v.key_no = ?1 AND v.version = \
             (SELECT max(x.version) FROM resource_version x WHERE x.rtype = v.rtype AND x.id = v.id)",
        )
        .and_then(|mut st| {
            st.query_map(params![key_no], |r| {
                Ok((r.get(0)?, super::read_id(r, 1)?, r.get(2)?))
            })?
            .collect()
        })
        .map_err(|e| CommitError::Store(engine(e)))?;
    let mut out = HashMap::new();
    for (rtype, id, rno) in rows {
        // the number this process gave it: an edited copy must not aim the purge at
        // another resource's postings
        if known.head(&rtype, &id).map(|h| h.rno) != Some(rno) {
            return Err(CommitError::Store(super::trust::tampered(format!(
                "{rtype}/{id}: its stored resource number is not the one phivault gave it"
            ))));
        }
        out.insert(rno, (rtype, id));
    }
    Ok(out)
}

/// Remove every posting of the resources `numbers` from the segments (pending postings
/// merged first); the segments they were in are re-cut. Returns the postings removed.
fn purge_postings(
    c: &Connection,
    numbers: &HashMap<i64, (String, String)>,
    removed_one: &mut dyn FnMut(i64, &[u8], i64),
) -> rusqlite::Result<u64> {
    if numbers.is_empty() {
        return Ok(0);
    }
    type Hit = (i64, Vec<u8>, i64, Vec<segments::Pair>);
    let mut hits: Vec<Hit> = Vec::new();
    {
        let mut st = c.prepare("SELECT ix, tok, lo, data FROM search_seg")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let pairs = decode_segment(r.get_ref(3).and_then(|v| Ok(v.as_blob()?))?)?;
            if pairs.iter().any(|(_, n)| numbers.contains_key(n)) {
                hits.push((r.get(0)?, r.get(1)?, r.get(2)?, pairs));
            }
        }
    }
    let mut removed = 0u64;
    let mut delete =
        c.prepare_cached("DELETE FROM search_seg WHERE ix = ?1 AND tok = ?2 AND lo = ?3")?;
    let mut insert =
        c.prepare_cached("INSERT INTO search_seg (ix, tok, lo, data) VALUES (?1, ?2, ?3, ?4)")?;
    for (ix, tok, lo, pairs) in hits {
        delete.execute(params![ix, tok, lo])?;
        let before = pairs.len();
        let kept: Vec<segments::Pair> = pairs
            .into_iter()
            .filter(|(t, n)| {
                let purged = numbers.contains_key(n);
                if purged {
                    removed_one(ix, t.bytes(), *n);
                }
                !purged
            })
            .collect();
        removed += (before - kept.len()) as u64;
        // the kept pairs sort between this segment's key and the next one's: new keys
        // collide with no other segment
        for ((t, first), data) in segments::cut(&kept) {
            insert.execute(params![ix, t.bytes(), first, data])?;
        }
    }
    Ok(removed)
}

/// Overwrite and delete the wrapped key; an empty row keeps its number and key id for the
/// versions sealed under it (checked at commit: foreign keys are deferred here). Returns
/// the wrapped form it destroyed.
fn destroy_key(c: &Connection, key_no: i64, key_id: &str) -> rusqlite::Result<Vec<u8>> {
    let wrapped: Vec<u8> = c.query_row(
        "SELECT wrapped FROM data_key WHERE key_no = ?1",
        params![key_no],
        |r| r.get(0),
    )?;
    c.pragma_update(None, "defer_foreign_keys", "ON")?;
    c.execute(
        "UPDATE data_key SET wrapped = zeroblob(length(wrapped)) WHERE key_no = ?1",
        params![key_no],
    )?;
    c.execute("DELETE FROM data_key WHERE key_no = ?1", params![key_no])?;
    c.execute(
        "INSERT INTO data_key (key_no, key_id, wrapped) VALUES (?1, ?2, x'')",
        params![key_no, key_id],
    )?;
    Ok(wrapped)
}

/// Checkpoint the whole log into the database and truncate it to nothing, waiting for
/// readers still on old frames (each try waits up to the busy timeout); false if they
/// kept it.
fn truncate_wal(conn: &Connection) -> bool {
    for _ in 0..TRUNCATE_TRIES {
        let busy = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap_or(1);
        if busy == 0 {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::warn!("the write-ahead log could not be truncated after an erasure");
    false
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{Candidates, Expect, IndexEntry, Put, Store, StoreError, VersionRow, WriteBatch};

    fn open(dir: &Path) -> SqliteStore {
        SqliteStore::open(&dir.join("db.sqlite"), crate::StoreKeys::for_tests()).unwrap()
    }

    fn put(id: &str, key_id: &str, token: &[u8]) -> Put {
        Put {
            row: VersionRow {
                rtype: "Observation".into(),
                id: id.into(),
                version: 1,
                key_id: key_id.into(),
                deleted: false,
                updated_ms: 1,
                sealed: b"sealed".to_vec(),
            },
            expect: Expect::Absent,
            index: vec![IndexEntry {
                param: "code".into(),
                token: token.to_vec(),
            }],
            replaces: vec![],
        }
    }

    fn erasure(key_id: &str) -> Erasure {
        Erasure {
            key_id: key_id.into(),
            marker: b"marker".to_vec(),
            audit: vec![],
        }
    }

    fn ids(store: &SqliteStore, token: &[u8]) -> Vec<String> {
        let q = Candidates::Tokens {
            param: "code".into(),
            tokens: vec![token.to_vec()],
        };
        store.candidates("Observation", &q, None, 1000).unwrap()
    }

    fn every_file_under(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            all.extend(std::fs::read(e.unwrap().path()).unwrap_or_default());
        }
        all
    }

    #[test]
    fn an_erased_key_leaves_no_bytes_no_postings_and_takes_no_more_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_idle_merge_ms(u64::MAX);
        let wrapped = b"WRAPPED-KEY-OF-PATIENT-A-0123456789".to_vec();
        let mut batch = WriteBatch {
            new_keys: vec![
                ("p:a".into(), wrapped.clone()),
                ("p:b".into(), b"w-b".to_vec()),
            ],
            puts: vec![put("o1", "p:a", b"tt"), put("o2", "p:b", b"tt")],
            ..Default::default()
        };
        // many postings, some merged into segments and some still pending
        for i in 0..300 {
            batch.puts.push(put(&format!("m{i}"), "p:a", b"tt"));
        }
        store.submit(batch).blocking_recv().unwrap().unwrap();
        store.set_merge_rows(1);
        let b = WriteBatch {
            puts: vec![put("late", "p:a", b"tt")],
            ..Default::default()
        };
        store.submit(b).blocking_recv().unwrap().unwrap();
        assert_eq!(ids(&store, b"tt").len(), 303);
        let done = store
            .erase_key(erasure("p:a"))
            .blocking_recv()
            .unwrap()
            .unwrap();
        assert_eq!((done.resources, done.postings), (302, 302));
        assert!(done.wal_truncated);
        assert_eq!(ids(&store, b"tt"), ["o2"]);
        assert_eq!(store.data_key("p:a").unwrap().unwrap(), b"");
        assert_eq!(store.data_key("p:b").unwrap().unwrap(), b"w-b");
        assert_eq!(store.meta("erased:p:a").unwrap().unwrap(), b"marker");
        // rows remain, sealed under a key that is gone
        assert_eq!(
            store.current("Observation", "o1").unwrap().unwrap().key_id,
            "p:a"
        );
        let files = every_file_under(dir.path());
        assert!(
            !files
                .windows(wrapped.len())
                .any(|w| w == wrapped.as_slice())
        );
        // twice, unknown, and writes under the erased key: refused
        let again = store.erase_key(erasure("p:a")).blocking_recv().unwrap();
        assert!(matches!(again, Err(CommitError::KeyErased)));
        let none = store.erase_key(erasure("p:zz")).blocking_recv().unwrap();
        assert!(matches!(none, Err(CommitError::NoKey)));
        let b = WriteBatch {
            puts: vec![put("o3", "p:a", b"tt")],
            ..Default::default()
        };
        let r = store.submit(b).blocking_recv().unwrap();
        assert!(matches!(r, Err(CommitError::KeyErased)), "{r:?}");
        // the old wrapped key written back by someone who can write the file: the marker
        // the signed state counted what the erasure removed
        assert_eq!(store.check_state(&mut || {}).unwrap(), Vec::<String>::new());
        // still refuses writes
        let c = Connection::open(dir.path().join("db.sqlite")).unwrap();
        c.execute(
            "UPDATE data_key SET wrapped = ?1 WHERE key_id = 'p:a'",
            params![wrapped],
        )
        .unwrap();
        // and the key put back is a finding of the store check
        assert_eq!(store.check_state(&mut || {}).unwrap().len(), 1);
        let b = WriteBatch {
            puts: vec![put("o4", "p:a", b"tt")],
            ..Default::default()
        };
        let r = store.submit(b).blocking_recv().unwrap();
        assert!(matches!(r, Err(CommitError::KeyErased)), "{r:?}");
        // a reopened store still finds what is left
        drop(c);
        store.close();
        let store = open(dir.path());
        assert_eq!(ids(&store, b"tt"), ["o2"]);
        assert!(!matches!(
            store.current("Observation", "m1"),
            Err(StoreError::Corrupt(_))
        ));
    }
}
