//! Tests of the SQLite engine: the shared suite, and what only this engine has (the index
//! log and its segments, WAL restarts, snapshot reads, kept rows, migrations, audit
//! checkpoints).

use std::collections::{BTreeMap, BTreeSet};

use phivault_audit::ChainHead;
use rusqlite::params;

use super::index::{decode_log_record, encode_log_record, index_no};
use super::read::MAX_IDLE_READERS;
use super::*;
use crate::{Expect, Put};

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(&dir.join("db.sqlite"), crate::StoreKeys::for_tests()).unwrap()
}

/// Rows of `table` in the database under `dir`, read through a connection of its own.
fn rows(dir: &Path, table: &str) -> i64 {
    Connection::open(dir.join("db.sqlite"))
        .unwrap()
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

#[test]
fn log_records_round_trip_and_malformed_ones_are_refused() {
    let mut d = Vec::new();
    encode_log_record(&mut d, 0x7fff_fffe, 7, b"ab", false);
    encode_log_record(&mut d, 1, 1 << 40, b"", true);
    assert_eq!(
        decode_log_record(&d).unwrap(),
        [
            (0x7fff_fffe, 7, &b"ab"[..], false),
            (1, 1 << 40, &b""[..], true)
        ]
    );
    assert!(decode_log_record(&d[..d.len() - 1]).is_none());
    assert!(decode_log_record(&[2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0]).is_none());
    assert!(decode_log_record(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 3, b'a']).is_none());
}

#[test]
fn shared_suite_passes_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    crate::testsuite::run_all(&store);
}

#[test]
fn shared_suite_passes_with_frequent_index_merges() {
    // pending rows move to the segments every few batches, so lookups, guards,
    // deletes and candidate queries see rows in both places
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.set_merge_rows(7);
    crate::testsuite::run_all(&store);
    assert!(rows(dir.path(), "search_seg") > 0, "merges happened");
}

#[test]
fn pending_index_rows_survive_a_restart_and_read_only_opens() {
    use crate::Candidates as C;
    let dir = tempfile::tempdir().unwrap();
    let even = C::Tokens {
        param: "code".into(),
        tokens: vec![b"even".to_vec()],
    };
    let store = open(dir.path());
    store.set_idle_merge_ms(u64::MAX);
    crate::testsuite::run_all(&store);
    let want = store.candidates("Condition", &even, None, 1000).unwrap();
    let stats = store.index_stats("Condition", "code").unwrap();
    assert!(!want.is_empty() && stats.rows > 0);
    store.close();
    let (logged, merged) = (
        rows(dir.path(), "index_log"),
        rows(dir.path(), "search_seg"),
    );
    assert!(logged > 0 && merged == 0, "rows are still pending");
    let ro = SqliteStore::open_read_only(&dir.path().join("db.sqlite")).unwrap();
    assert_eq!(ro.candidates("Condition", &even, None, 1000).unwrap(), want);
    assert_eq!(ro.index_stats("Condition", "code").unwrap(), stats);
    drop(ro);
    let store = open(dir.path());
    assert_eq!(
        store.candidates("Condition", &even, None, 1000).unwrap(),
        want
    );
    // a merge moves them without changing any answer
    store.set_merge_rows(1);
    crate::testsuite::append_audit(&store, 1);
    let b = WriteBatch {
        puts: vec![put_of("Condition", "late", 1, false, &[b"even"], &[])],
        ..Default::default()
    };
    store.submit(b).blocking_recv().unwrap().unwrap();
    // the writer merges after answering; its next batch is answered after the merge
    crate::testsuite::append_audit(&store, 1);
    let mut after = store.candidates("Condition", &even, None, 1000).unwrap();
    after.retain(|id| id != "late");
    assert_eq!(after, want);
    assert_eq!(store.pending.read().len(), 0);
}

#[test]
fn pending_rows_merge_once_index_writes_pause() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.set_idle_merge_ms(50);
    crate::testsuite::run_all(&store);
    // audit-only batches keep coming; they do not hold the merge back
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.pending.read().len() > 0 {
        assert!(std::time::Instant::now() < deadline, "no merge");
        crate::testsuite::append_audit(&store, 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(rows(dir.path(), "index_log"), 0);
}

/// The checkpoint sequence number in the WAL's header: SQLite adds one each time the
/// log starts again from its beginning.
fn wal_restarts(dir: &Path) -> u32 {
    let head = std::fs::read(dir.join("db.sqlite-wal")).unwrap_or_default();
    head.get(12..16)
        .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()))
}

#[test]
fn the_wal_starts_again_while_readers_never_stop() {
    // readers that overlap, so at every moment one of them reads from the log: a
    // passive checkpoint alone would let it grow for as long as they go on
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.set_wal_restart_frames(64);
    crate::testsuite::append_audit(&store, 1);
    let first = wal_restarts(dir.path());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let (store, stop) = (&store, &stop);
            s.spawn(move || {
                // out of step with each other: 3, 4, 5 and 6 ms each, from 0, 1, 2 and 3 ms
                std::thread::sleep(std::time::Duration::from_millis(i));
                while !stop.load(Ordering::Relaxed) {
                    store
                        .with_snapshot(|c| {
                            let n: i64 =
                                c.query_row("SELECT count(*) FROM audit_event", [], |r| r.get(0))?;
                            std::thread::sleep(std::time::Duration::from_millis(3 + i));
                            Ok(n)
                        })
                        .unwrap();
                }
            });
        }
        // each commit adds two frames or more: 8,000 in all, 31 MiB, without restarts
        crate::testsuite::append_audit(&store, 4_000);
        stop.store(true, Ordering::Relaxed);
    });
    let restarts = wal_restarts(dir.path()) - first;
    let size = std::fs::metadata(dir.path().join("db.sqlite-wal"))
        .unwrap()
        .len();
    eprintln!("WAL restarts {restarts}, file {size} B");
    assert!(restarts >= 10, "the log started again {restarts} times");
    // the file keeps its longest length: the restart frames, a group's and slack for
    // readers that held restarts off (on a loaded machine the back-off can let the log run
    // past the restart length for a while: 13.8 MB seen with the other core busy); without
    // restarts it reaches 31 MiB
    assert!(
        size <= 2 * 2048 * (4096 + 24) + 32,
        "the log grew to {size} B"
    );
}

#[test]
fn a_reader_that_holds_the_wal_delays_no_group_after_the_first_try() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.set_wal_restart_frames(8);
    crate::testsuite::append_audit(&store, 1);
    // a long read transaction (an export, an operator's sqlite3) pins the log (or, begun
    // when every frame was checkpointed, the database file: then no checkpoint can copy
    // frames into it and restarts are held off all the same)
    let reader = Connection::open(dir.path().join("db.sqlite")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM audit_event", [], |r| r.get(0))
        .unwrap();
    let t = std::time::Instant::now();
    crate::testsuite::append_audit(&store, 300);
    let ms = u64::try_from(t.elapsed().as_millis()).unwrap();
    let tries = store.wal_restart.tries.load(Ordering::Relaxed);
    // past the threshold after a few commits; then tries further and further apart
    // (5, 10, 20 … 250 ms), not one (and its wait) after every group
    assert!(tries >= 1, "no restart was tried");
    assert!(tries <= 8 + ms / 250, "{tries} tries in {ms} ms");
    // once it is gone, the log starts again
    let held = wal_restarts(dir.path());
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while wal_restarts(dir.path()) == held {
        assert!(
            std::time::Instant::now() < deadline,
            "the log never started again"
        );
        crate::testsuite::append_audit(&store, 10);
    }
}

#[test]
fn a_snapshot_read_sees_one_state_and_a_failed_one_leaves_no_transaction_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let write = |b: WriteBatch| store.submit(b).blocking_recv().unwrap().unwrap();
    write(WriteBatch {
        new_keys: vec![("k1".into(), b"w".to_vec())],
        puts: vec![put("a", 1, false, &[], &[])],
        ..Default::default()
    });
    let count = |c: &Connection| -> Result<i64, rusqlite::Error> {
        c.query_row("SELECT count(*) FROM resource_version", [], |r| r.get(0))
    };
    // a write committed between two statements of one snapshot is seen by neither
    let (before, after) = store
        .with_snapshot(|c| {
            let before = count(c)?;
            write(WriteBatch {
                puts: vec![put("b", 1, false, &[], &[])],
                ..Default::default()
            });
            Ok((before, count(c)?))
        })
        .unwrap();
    assert_eq!((before, after), (1, 1));
    // plain reads see each commit as it lands
    assert_eq!(store.with_reader(count).unwrap(), 2);
    // a failing snapshot is rolled back; its connection goes back to the pool usable
    assert!(
        store
            .with_snapshot(|c| c.query_row("SELECT * FROM no_such_table", [], |_| Ok(())))
            .is_err()
    );
    for _ in 0..MAX_IDLE_READERS + 1 {
        assert_eq!(store.with_snapshot(count).unwrap(), 2);
    }
    assert!(store.readers.lock().iter().all(Connection::is_autocommit));
}

fn put(id: &str, version: u64, deleted: bool, index: &[&[u8]], replaces: &[&[u8]]) -> Put {
    put_of("Observation", id, version, deleted, index, replaces)
}

fn put_of(
    rtype: &str,
    id: &str,
    version: u64,
    deleted: bool,
    index: &[&[u8]],
    replaces: &[&[u8]],
) -> Put {
    let entries = |ts: &[&[u8]]| -> Vec<IndexEntry> {
        ts.iter()
            .map(|t| IndexEntry {
                param: "code".into(),
                token: t.to_vec(),
            })
            .collect()
    };
    Put {
        row: VersionRow {
            rtype: rtype.into(),
            id: id.into(),
            version,
            key_id: "k1".into(),
            deleted,
            updated_ms: 1,
            sealed: if deleted { vec![] } else { b"x".to_vec() },
        },
        expect: if version == 1 {
            Expect::Absent
        } else {
            Expect::Version(version - 1)
        },
        index: entries(index),
        replaces: entries(replaces),
    }
}

#[test]
fn kept_rows_never_outlive_a_write_even_from_another_process() {
    // two stores on one file stand for the server and a command-line tool
    let dir = tempfile::tempdir().unwrap();
    let (server, tool) = (open(dir.path()), open(dir.path()));
    let write = |s: &SqliteStore, b: WriteBatch| s.submit(b).blocking_recv().unwrap().unwrap();
    let versions = |s: &SqliteStore| -> Vec<Option<(u64, bool)>> {
        let ids = ["a".to_owned(), "b".to_owned()];
        let many = s.current_many("Observation", &ids).unwrap();
        for (id, row) in ids.iter().zip(&many) {
            assert_eq!(&s.current("Observation", id).unwrap(), row);
        }
        many.into_iter()
            .map(|r| r.map(|r| (r.version, r.deleted)))
            .collect()
    };
    write(
        &server,
        WriteBatch {
            new_keys: vec![("k1".into(), b"w".to_vec())],
            puts: vec![put_of("Observation", "a", 1, false, &[], &[])],
            ..Default::default()
        },
    );
    assert_eq!(versions(&server), vec![Some((1, false)), None]);
    for (store, put, want) in [
        (
            &server,
            put_of("Observation", "a", 2, false, &[], &[]),
            [Some((2, false)), None],
        ),
        (
            &tool,
            put_of("Observation", "a", 3, false, &[], &[]),
            [Some((3, false)), None],
        ),
        (
            &tool,
            put_of("Observation", "b", 1, false, &[], &[]),
            [Some((3, false)), Some((1, false))],
        ),
        (
            &server,
            put_of("Observation", "a", 4, true, &[], &[]),
            [Some((4, true)), Some((1, false))],
        ),
    ] {
        // read twice (the second from what the first kept), then write
        assert_eq!(versions(&server), versions(&server));
        write(
            store,
            WriteBatch {
                puts: vec![put],
                ..Default::default()
            },
        );
        assert_eq!(versions(&server), want.to_vec());
        assert_eq!(versions(&tool), want.to_vec());
    }
    // audit-only commits keep the kept rows
    crate::testsuite::append_audit(&server, 3);
    let epoch = |s: &SqliteStore| {
        s.with_reader(|c| c.query_row("SELECT n FROM resource_epoch", [], |r| r.get::<_, i64>(0)))
            .unwrap()
    };
    assert_eq!(epoch(&server), 5);
    assert_eq!(epoch(&tool), 5);
}

#[test]
fn segments_stay_exact_through_updates_deletes_and_merges() {
    // 600 resources, each with two of 40 tokens, updated and deleted at random, with
    // merges every few hundred records: segments are cut, split, emptied and
    // rewritten, and every answer must match a model.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.set_idle_merge_ms(u64::MAX);
    store.set_merge_rows(300);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let tokens: Vec<Vec<u8>> = (0..40u8).map(|i| vec![b't', i]).collect();
    let mut model = Model::new();
    store
        .submit(WriteBatch {
            new_keys: vec![("k1".into(), b"w".to_vec())],
            ..Default::default()
        })
        .blocking_recv()
        .unwrap()
        .unwrap();
    for step in 0..3000 {
        let id = format!("r{}", rnd(600));
        let (version, old) = model.get(&id).cloned().unwrap_or((0, None));
        let old_toks: Vec<&[u8]> = old
            .iter()
            .flatten()
            .map(|i| tokens[*i].as_slice())
            .collect();
        let p = if version > 0 && old.is_some() && rnd(5) == 0 {
            model.insert(id.clone(), (version + 1, None));
            put(&id, version + 1, true, &[], &old_toks)
        } else {
            let new = vec![rnd(40) as usize, rnd(40) as usize];
            let new_toks: Vec<&[u8]> = new.iter().map(|i| tokens[*i].as_slice()).collect();
            model.insert(id.clone(), (version + 1, Some(new.clone())));
            put(&id, version + 1, false, &new_toks, &old_toks)
        };
        store
            .submit(WriteBatch {
                puts: vec![p],
                ..Default::default()
            })
            .blocking_recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
        if step % 500 == 499 {
            assert_candidates_match(&store, &tokens, &model, step);
        }
    }
    assert!(rows(dir.path(), "search_seg") > 1, "the index was cut");
    // paging through a large answer in resource-number order loses nothing
    let all = Candidates::Or(
        tokens
            .iter()
            .map(|t| Candidates::Tokens {
                param: "code".into(),
                tokens: vec![t.clone()],
            })
            .collect(),
    );
    let everything = store
        .candidates("Observation", &all, None, usize::MAX)
        .unwrap();
    assert_eq!(paged_candidates(&store, &all, 37), everything);
    let live = model.values().filter(|(_, t)| t.is_some()).count();
    assert_eq!(everything.len(), live);
}

/// Resource id → (version, token numbers or `None` once deleted).
type Model = BTreeMap<String, (u64, Option<Vec<usize>>)>;

/// Every token's candidates are the resources the model gives it.
fn assert_candidates_match(store: &SqliteStore, tokens: &[Vec<u8>], model: &Model, step: usize) {
    for (i, t) in tokens.iter().enumerate() {
        let q = Candidates::Tokens {
            param: "code".into(),
            tokens: vec![t.clone()],
        };
        let got: BTreeSet<String> = store
            .candidates("Observation", &q, None, usize::MAX)
            .unwrap()
            .into_iter()
            .collect();
        let want: BTreeSet<String> = model
            .iter()
            .filter(|(_, (_, ts))| ts.as_ref().is_some_and(|ts| ts.contains(&i)))
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(got, want, "token {i} after step {step}");
    }
}

/// Every candidate of `q`, read `size` at a time.
fn paged_candidates(store: &SqliteStore, q: &Candidates, size: usize) -> Vec<String> {
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .candidates("Observation", q, after.as_deref(), size)
            .unwrap();
        let Some(last) = page.last().cloned() else {
            break;
        };
        paged.extend(page);
        after = Some(last);
    }
    paged
}

/// A database at `path` in the earlier index form: a, b (updated, its update's posting still
/// in the log) and c (deleted).
fn write_earlier_form(path: &Path) {
    // the schema of the earlier form: no resource numbers, one index row per posting
    let c = Connection::open(path).unwrap();
    c.execute_batch(
        "CREATE TABLE data_key (key_no INTEGER PRIMARY KEY, key_id TEXT NOT NULL UNIQUE, wrapped BLOB NOT NULL);
         CREATE TABLE resource_version (rtype TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
             key_no INTEGER NOT NULL, deleted INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
             sealed BLOB NOT NULL, PRIMARY KEY (rtype, id, version)) WITHOUT ROWID;
         CREATE TABLE search_index (ix INTEGER NOT NULL, token BLOB NOT NULL, id BLOB NOT NULL,
             PRIMARY KEY (ix, token, id)) WITHOUT ROWID;
         CREATE TABLE search_log (seq INTEGER PRIMARY KEY, ix INTEGER NOT NULL, token BLOB NOT NULL,
             id BLOB NOT NULL, live INTEGER NOT NULL);
         INSERT INTO data_key (key_id, wrapped) VALUES ('k1', x'00');",
    )
    .unwrap();
    let ix = index_no("Observation", "code");
    for (id, v, tok, deleted) in [
        ("a", 1, &b"t1"[..], 0),
        ("b", 1, b"t1", 0),
        ("b", 2, b"t2", 0),
        ("c", 1, b"t1", 0),
        ("c", 2, b"", 1),
    ] {
        c.execute(
            "INSERT INTO resource_version VALUES ('Observation', ?1, ?2, 1, ?3, 1, x'01')",
            params![id, v, deleted],
        )
        .unwrap();
        if !(tok.is_empty() || (id == "b" && v == 1)) {
            // a and c merged, b's update still in the log
            let table = if id == "b" {
                "search_log (ix, token, id, live) VALUES (?1, ?2, ?3, 1)"
            } else {
                "search_index VALUES (?1, ?2, ?3)"
            };
            c.execute(&format!("INSERT INTO {table}"), params![ix, tok, id])
                .unwrap();
        }
    }
    // c was deleted: its posting was removed from the index
    c.execute("DELETE FROM search_index WHERE id = 'c'", [])
        .unwrap();
    // its log, with a head signed in the first form (no state summary)
    let event = crate::testsuite::event(1).encode();
    let mut head = ChainHead::EMPTY;
    let hash = head.append(&event);
    c.execute_batch(
        "CREATE TABLE audit_event (seq INTEGER PRIMARY KEY, event BLOB NOT NULL, hash BLOB NOT NULL);
         CREATE TABLE audit_head (one INTEGER PRIMARY KEY CHECK (one = 1), size INTEGER NOT NULL,
             hash BLOB NOT NULL, signature BLOB NOT NULL);",
    )
    .unwrap();
    c.execute(
        "INSERT INTO audit_event VALUES (1, ?1, ?2)",
        params![event, hash.as_slice()],
    )
    .unwrap();
    let signature = (crate::StoreKeys::for_tests().signer)(&head.signing_message());
    c.execute(
        "INSERT INTO audit_head VALUES (1, 1, ?1, ?2)",
        params![hash.as_slice(), signature],
    )
    .unwrap();
}

#[test]
fn databases_of_the_earlier_index_form_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    write_earlier_form(&path);
    let store = open(dir.path());
    let q = |t: &[u8]| Candidates::Tokens {
        param: "code".into(),
        tokens: vec![t.to_vec()],
    };
    assert_eq!(
        store
            .candidates("Observation", &q(b"t1"), None, 10)
            .unwrap(),
        ["a"]
    );
    assert_eq!(
        store
            .candidates("Observation", &q(b"t2"), None, 10)
            .unwrap(),
        ["b"]
    );
    // new writes continue the numbering
    store
        .submit(WriteBatch {
            puts: vec![put("d", 1, false, &[b"t2"], &[])],
            ..Default::default()
        })
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .candidates("Observation", &q(b"t2"), None, 10)
            .unwrap(),
        ["b", "d"]
    );
    assert_eq!(
        store.current("Observation", "b").unwrap().unwrap().version,
        2
    );
    store.close();
    for old in ["search_index", "search_log"] {
        let c = Connection::open(&path).unwrap();
        assert!(!table_exists(&c, old).unwrap(), "{old} dropped");
    }
}

#[test]
fn checkpoints_sign_the_merkle_tree_of_the_log_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        crate::testsuite::append_audit(&store, 3);
        store.close();
    }
    let store = open(dir.path());
    crate::testsuite::append_audit(&store, 2);
    let mut leaves = Vec::new();
    store
        .scan_audit(&mut |e| {
            leaves.push(merkle::leaf_hash(&e.event));
            true
        })
        .unwrap();
    assert_eq!(leaves.len(), 5);
    let cps = store.audit_checkpoints(0, 100).unwrap();
    // the first group of each process writes one (then at most every interval)
    assert!(cps.len() >= 2, "{cps:?}");
    let mut last = 0;
    for cp in &cps {
        assert!(cp.size > last);
        last = cp.size;
        let n = usize::try_from(cp.size).unwrap();
        assert_eq!(cp.root, merkle::root(&leaves[..n]), "size {n}");
        assert!(cp.signature_ok(&crate::StoreKeys::for_tests().audit_public));
    }
    assert!(cps.iter().any(|c| c.size > 3), "the reopened tree went on");
    assert!(store.audit_checkpoints(last, 10).unwrap().is_empty());
}

#[test]
fn audit_chain_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        crate::testsuite::append_audit(&store, 3);
        store.close();
    }
    let store = open(dir.path());
    crate::testsuite::append_audit(&store, 2);
    let mut rows = Vec::new();
    store
        .scan_audit(&mut |e| {
            rows.push(e);
            true
        })
        .unwrap();
    assert_eq!(rows.len(), 5);
    let head = store.audit_head().unwrap().unwrap();
    let verified = phivault_audit::verify_chain(
        rows.into_iter().map(Ok::<_, ()>),
        Some(ChainHead {
            size: head.size,
            hash: head.hash,
        }),
    )
    .unwrap();
    assert_eq!(verified.size, 5);
}
