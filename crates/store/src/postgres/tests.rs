#![allow(clippy::unwrap_used)] // tests: a panic is how a check fails

use super::testdb::TestDb;
use super::*;
use crate::testsuite::{self, row};
use crate::{Expect, Put};

fn open(db: &TestDb) -> PgStore {
    PgStore::create(&db.target, StoreKeys::for_tests()).expect("open")
}

fn create(store: &dyn Store, id: &str, sealed: &[u8]) {
    store
        .submit(WriteBatch {
            new_keys: vec![("k1".into(), b"wrapped".to_vec())],
            puts: vec![Put {
                row: row("Patient", id, 1, sealed),
                expect: Expect::Absent,
                index: vec![],
                replaces: vec![],
            }],
            audit: vec![testsuite::event(1)],
            ..Default::default()
        })
        .blocking_recv()
        .unwrap()
        .expect("create");
}

/// Patient `id` to version 2 (from 1).
fn update(store: &dyn Store, id: &str) {
    store
        .submit(WriteBatch {
            puts: vec![Put {
                row: row("Patient", id, 2, b"v2"),
                expect: Expect::Version(1),
                index: vec![],
                replaces: vec![],
            }],
            ..Default::default()
        })
        .blocking_recv()
        .unwrap()
        .unwrap();
}

/// Settings row `key` as stored now (hex value and MAC), to put back later.
fn saved_setting(db: &TestDb, key: &str) -> (String, String) {
    let out = db.sql(&format!(
        "SELECT encode(v, 'hex') || ':' || encode(mac, 'hex') FROM meta WHERE k = '{key}'"
    ));
    let (v, mac) = out.trim().split_once(':').unwrap();
    (v.to_owned(), mac.to_owned())
}

/// Put settings row `key` back as [`saved_setting`] saw it (a storage writer's rollback).
fn put_back(db: &TestDb, key: &str, (v, mac): &(String, String)) {
    db.sql(&format!(
        "UPDATE meta SET v = decode('{v}', 'hex'), mac = decode('{mac}', 'hex') WHERE k = '{key}'"
    ));
}

/// Every event in the log chains to the signed head, and the state recomputed from every
/// row is the signed one.
fn assert_verifies(store: &PgStore) {
    let head = store.audit_head().unwrap().expect("a head");
    let mut rows = Vec::new();
    store
        .scan_audit(&mut |e| {
            rows.push(Ok::<_, StoreError>(e));
            true
        })
        .unwrap();
    let chained = phivault_audit::verify_chain(
        rows,
        Some(phivault_audit::ChainHead {
            size: head.size,
            hash: head.hash,
        }),
    )
    .expect("the chain verifies");
    assert_eq!(chained.size, head.size);
    assert!(phivault_audit::verify_head_signature(
        &chained,
        &head.state,
        &StoreKeys::for_tests().audit_public,
        &head.signature
    ));
    assert_eq!(store.check_state(&mut || {}).unwrap(), Vec::<String>::new());
}

#[test]
fn the_shared_engine_suite_passes() {
    let db = TestDb::new();
    let store = open(&db);
    testsuite::run_all(&store);
    assert_verifies(&store);
    // the store opens again over what it wrote, and the checks at open pass
    store.close();
    drop(store);
    let again = open(&db);
    assert!(again.current("Condition", "c7").unwrap().is_some());
    assert_verifies(&again);
}

#[test]
fn two_nodes_on_one_database_are_one_store_with_one_chain() {
    let db = TestDb::new();
    let a = Arc::new(open(&db));
    let b = Arc::new(open(&db));
    create(a.as_ref(), "from-a", b"one");
    // a write acknowledged by one node is read by the other at once
    assert_eq!(
        b.current("Patient", "from-a").unwrap().unwrap().sealed,
        b"one"
    );
    // both write at once: every write lands, each event once, in one chain
    let writers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(n, s)| {
            std::thread::spawn(move || {
                for i in 0..50 {
                    let rx = s.submit(WriteBatch {
                        audit: vec![testsuite::event(i)],
                        ..Default::default()
                    });
                    rx.blocking_recv().unwrap().unwrap();
                    if i % 10 == 0 {
                        create(s.as_ref(), &format!("n{n}-{i}"), b"x");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for s in [&a, &b] {
        for n in 0..2 {
            for i in (0..50).step_by(10) {
                assert!(
                    s.current("Patient", &format!("n{n}-{i}"))
                        .unwrap()
                        .is_some()
                );
            }
        }
    }
    assert_eq!(a.audit_head().unwrap(), b.audit_head().unwrap());
    assert_eq!(a.audit_head().unwrap().unwrap().size, 1 + 2 * (50 + 5));
    assert_verifies(&a);
}

#[test]
fn rows_changed_in_the_database_are_refused_as_read_and_at_open() {
    let db = TestDb::new();
    let store = open(&db);
    create(&store, "p1", b"sealed-one");
    store.set_meta("client:x", b"{}").unwrap();
    // an edited version is refused, not served
    db.sql("UPDATE resource_version SET sealed = '\\x00' WHERE id = 'p1'");
    let e = store.current("Patient", "p1").unwrap_err();
    assert!(matches!(e, StoreError::Tampered(_)), "{e}");
    assert!(!store.take_detections().is_empty());
    // an edited setting likewise
    db.sql("UPDATE meta SET v = '\\x7b7d20' WHERE k = 'client:x'");
    assert!(matches!(
        store.meta("client:x").unwrap_err(),
        StoreError::Tampered(_)
    ));
    // the background check names what differs
    assert!(!store.check_state(&mut || {}).unwrap().is_empty());
    store.close();
    drop(store);
    // a setting removed: the next open refuses, naming the kind of row
    db.sql("DELETE FROM meta WHERE k = 'client:x'");
    let e = PgStore::open(&db.target, StoreKeys::for_tests()).unwrap_err();
    assert!(e.to_string().contains("settings rows differ"), "{e}");
}

#[test]
fn a_column_changed_outside_phivault_is_refused_at_open() {
    let db = TestDb::new();
    let store = open(&db);
    create(&store, "p1", b"v1");
    store.close();
    drop(store);
    db.sql("ALTER TABLE resource_head ALTER COLUMN version TYPE text");
    let e = PgStore::open(&db.target, StoreKeys::for_tests()).unwrap_err();
    assert!(
        e.to_string()
            .contains("column resource_head.version is text"),
        "{e}"
    );
}

#[test]
fn a_rolled_back_record_or_cut_log_is_refused_at_open() {
    let db = TestDb::new();
    let store = open(&db);
    create(&store, "p1", b"v1");
    let saved_head = db.sql("SELECT encode(mac, 'hex') FROM resource_head WHERE id = 'p1'");
    update(&store, "p1");
    store.close();
    drop(store);
    // the storage writer puts version 1 back, with its valid MAC
    db.sql(&format!(
        "DELETE FROM resource_version WHERE id = 'p1' AND version = 2; \
         UPDATE resource_head SET version = 1, mac = decode('{}', 'hex') WHERE id = 'p1'",
        saved_head.trim()
    ));
    let e = PgStore::open(&db.target, StoreKeys::for_tests()).unwrap_err();
    assert!(e.to_string().contains("heads differ"), "{e}");
    // a log cut short is refused too
    let db = TestDb::new();
    let store = open(&db);
    testsuite::append_audit(&store, 5);
    store.close();
    drop(store);
    db.sql("DELETE FROM audit_event WHERE seq = 5");
    let e = PgStore::open(&db.target, StoreKeys::for_tests()).unwrap_err();
    assert!(e.to_string().contains("audit log ends at event 4"), "{e}");
}

#[test]
fn an_erased_key_leaves_no_wrapped_key_and_takes_no_more_writes() {
    let db = TestDb::new();
    let store = open(&db);
    store
        .submit(WriteBatch {
            new_keys: vec![("p:1".into(), b"wrapped-secret".to_vec())],
            puts: vec![Put {
                row: VersionRow {
                    key_id: "p:1".into(),
                    ..row("Patient", "1", 1, b"x")
                },
                expect: Expect::Absent,
                index: vec![crate::IndexEntry {
                    param: "name".into(),
                    token: b"tok".to_vec(),
                }],
                replaces: vec![],
            }],
            ..Default::default()
        })
        .blocking_recv()
        .unwrap()
        .unwrap();
    let erased = store
        .erase_key(crate::Erasure {
            key_id: "p:1".into(),
            marker: b"m".to_vec(),
            audit: vec![testsuite::event(9)],
        })
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert_eq!((erased.resources, erased.postings), (1, 1));
    assert_eq!(store.data_key("p:1").unwrap().unwrap(), b"");
    assert!(matches!(
        store
            .erase_key(crate::Erasure {
                key_id: "p:1".into(),
                marker: b"m".to_vec(),
                audit: vec![],
            })
            .blocking_recv()
            .unwrap(),
        Err(CommitError::KeyErased)
    ));
    let dump = db.sql("SELECT encode(wrapped, 'escape') FROM data_key");
    assert!(!dump.contains("wrapped-secret"));
    assert_verifies(&store);
}

#[test]
fn a_claim_on_one_node_is_a_replay_on_the_other_until_it_expires() {
    let db = TestDb::new();
    let (a, b) = (open(&db), open(&db));
    let later = crate::sqlite::now_ms() as i64 + 60_000;
    assert_eq!(a.claim_once("jti", b"one", later).unwrap(), Some(true));
    assert_eq!(b.claim_once("jti", b"one", later).unwrap(), Some(false));
    assert_eq!(a.claim_once("jti", b"one", later).unwrap(), Some(false));
    // another namespace is another record
    assert_eq!(b.claim_once("dpop", b"one", later).unwrap(), Some(true));
    // an expired record is taken over
    let past = crate::sqlite::now_ms() as i64 - 1;
    assert_eq!(a.claim_once("jti", b"two", past).unwrap(), Some(true));
    assert_eq!(b.claim_once("jti", b"two", later).unwrap(), Some(true));
    // a hundred claims of one key at once from both nodes: exactly one wins
    let (a, b) = (Arc::new(a), Arc::new(b));
    let wins: usize = (0..100)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || s.claim_once("jti", b"raced", later).unwrap() == Some(true))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| usize::from(h.join().unwrap()))
        .sum();
    assert_eq!(wins, 1);
}

#[test]
fn one_node_leads_each_periodic_task_and_another_takes_over_when_it_stops() {
    let db = TestDb::new();
    let (a, b) = (open(&db), open(&db));
    assert!(a.lead("snooping"));
    assert!(a.lead("snooping"), "a leader stays the leader");
    assert!(!b.lead("snooping"));
    assert!(b.lead("store-check"), "each task has its own leader");
    assert!(!a.lead("store-check"));
    // the leader's connection ends (its process died): the other takes over
    a.close();
    drop(a);
    let mut took = false;
    for _ in 0..50 {
        if b.lead("snooping") {
            took = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(took, "the task was taken over");
}

#[test]
fn an_embedded_store_moves_to_postgres_row_for_row_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phivault.db");
    let sqlite = crate::sqlite::SqliteStore::open(&path, StoreKeys::for_tests()).unwrap();
    testsuite::run_all(&sqlite);
    // keep some postings in the index log (not merged into segments)
    sqlite.set_idle_merge_ms(u64::MAX);
    create(&sqlite, "late", b"late");
    let head = sqlite.audit_head().unwrap().unwrap();
    let query = crate::Candidates::Tokens {
        param: "code".into(),
        tokens: vec![b"even".to_vec(), b"odd".to_vec(), b"first".to_vec()],
    };
    let before: Vec<_> = ["Procedure", "Condition"]
        .iter()
        .map(|t| sqlite.candidates(t, &query, None, 1000).unwrap())
        .collect();
    assert!(!before[0].is_empty());
    sqlite.close();
    drop(sqlite);

    let db = TestDb::new();
    let mut stages = Vec::new();
    let m = migrate::from_sqlite(&path, &db.target, StoreKeys::for_tests(), &mut |s, _| {
        stages.push(s.to_owned())
    })
    .expect("migrate");
    assert!(
        m.versions > 200 && m.postings > 10 && m.events == head.size,
        "{m:?}"
    );
    let pg = open(&db);
    assert_verifies(&pg);
    // the signed head came along: the log is the embedded one's, then the move's event
    assert_eq!(pg.audit_head().unwrap().unwrap().size, head.size + 1);
    let sqlite = crate::sqlite::SqliteStore::open_read_only(&path).unwrap();
    for (t, ids) in ["Procedure", "Condition"].iter().zip(&before) {
        assert_eq!(&pg.candidates(t, &query, None, 1000).unwrap(), ids);
        for id in ids {
            assert_eq!(pg.current(t, id).unwrap(), sqlite.current(t, id).unwrap());
            assert_eq!(
                pg.history(t, Some(id), 10).unwrap(),
                sqlite.history(t, Some(id), 10).unwrap()
            );
        }
    }
    assert_eq!(
        pg.current("Patient", "late").unwrap().unwrap().sealed,
        b"late"
    );
    assert_eq!(
        pg.meta_prefix("alert:", 10).unwrap(),
        sqlite.meta_prefix("alert:", 10).unwrap()
    );
    // a second move into the same database is refused
    let e = migrate::from_sqlite(&path, &db.target, StoreKeys::for_tests(), &mut |_, _| {})
        .unwrap_err();
    assert!(e.to_string().contains("already holds"), "{e}");
}

#[test]
fn a_database_reached_over_tls_is_verified_by_its_certificate_and_its_name() {
    use super::testdb::{Cluster, make_certs};
    let (cluster, ca) = Cluster::start_tls(&["localhost"]);
    let port = cluster
        .admin_url()
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let target = |host: &str, ca: &std::path::Path| {
        PgTarget::parse(
            &format!(
                "postgres://phivault@{host}:{port}/postgres?sslmode=verify-full&sslrootcert={}",
                ca.display()
            ),
            PasswordSource::PgPass(cluster.passfile.clone()),
        )
        .unwrap()
    };
    let store =
        PgStore::create(&target("localhost", &ca), StoreKeys::for_tests()).expect("open over TLS");
    let ssl = store
        .pool
        .with(async |c| {
            c.query_opt(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
        })
        .unwrap()
        .unwrap();
    assert!(ssl.get::<_, bool>(0), "the session is encrypted");
    create(&store, "over-tls", b"x");
    store.close();
    // a certificate from another CA is refused
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path(), &["localhost"]);
    let e = PgStore::open(
        &target("localhost", &other.path().join("ca.pem")),
        StoreKeys::for_tests(),
    )
    .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // a name the certificate does not hold is refused (127.0.0.1 is not in it)
    let e = PgStore::open(&target("127.0.0.1", &ca), StoreKeys::for_tests()).unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}

#[test]
fn kek_generations_and_rewraps_are_counted_in_the_signed_state() {
    use crate::{KekRow, KeyChange, Rewrap};
    let db = TestDb::new();
    let store = open(&db);
    create(&store, "p1", b"x");
    assert_eq!(
        store
            .change_keys(KeyChange::AddKek(KekRow {
                generation: 1,
                wrapped: b"kek-1".to_vec(),
                created_ms: 5,
            }))
            .unwrap(),
        1
    );
    assert_eq!(store.kek_generations().unwrap().len(), 1);
    let rewrap = |old: &[u8], new: &[u8]| {
        store
            .change_keys(KeyChange::Rewrap(vec![Rewrap {
                key_id: "k1".into(),
                old: old.to_vec(),
                new: new.to_vec(),
            }]))
            .unwrap()
    };
    assert_eq!(rewrap(b"wrapped", b"\x01wrapped-under-1"), 1);
    assert_eq!(
        rewrap(b"wrapped", b"\x01again"),
        0,
        "only if still the old form"
    );
    assert_eq!(
        store.data_key("k1").unwrap().unwrap(),
        b"\x01wrapped-under-1"
    );
    // a generation with keys still wrapped under it is not destroyed
    let destroy = |g: u32, prefix: &[u8]| {
        store
            .change_keys(KeyChange::DestroyKek {
                generation: g,
                prefix: prefix.to_vec(),
            })
            .unwrap()
    };
    assert_eq!(destroy(1, b"\x01"), 0);
    assert_eq!(destroy(1, b"\x02"), 1);
    assert!(store.kek_generations().unwrap().is_empty());
    let keys = store.data_keys_after(0, 10).unwrap();
    assert_eq!(keys.len(), 1);
    assert_verifies(&store);
    store.close();
    drop(store);
    assert_verifies(&open(&db));
}

#[test]
fn a_settings_row_put_back_from_an_older_copy_is_refused_while_running() {
    let db = TestDb::new();
    let (a, b) = (open(&db), open(&db));
    a.set_meta("client:c2", b"{\"disabled\":false}").unwrap();
    let old = saved_setting(&db, "client:c2");
    a.set_meta("client:c2", b"{\"disabled\":true}").unwrap();
    // the other node reads what this one wrote (its settings read again and summed)
    assert_eq!(
        b.meta("client:c2").unwrap().unwrap(),
        b"{\"disabled\":true}"
    );
    assert_eq!(b.meta_prefix("client:", 10).unwrap().len(), 1);
    // the older row put back, with its valid MAC: refused on both nodes
    put_back(&db, "client:c2", &old);
    for s in [&a, &b] {
        assert!(matches!(s.meta("client:c2"), Err(StoreError::Tampered(_))));
        assert!(matches!(
            s.meta_prefix("client:", 10),
            Err(StoreError::Tampered(_))
        ));
    }
    // nor is anything written over it, by either node
    for (s, new) in [(&a, "client:new-a"), (&b, "client:new-b")] {
        assert!(matches!(
            s.set_meta("client:c2", b"{\"disabled\":false}"),
            Err(StoreError::Tampered(_))
        ));
        // (a row no node wrote before is still written)
        assert!(matches!(s.set_meta(new, b"x"), Ok(())));
    }
    // the whole-store check makes a node believe no settings row until they sum again
    assert!(!b.check_state(&mut || {}).unwrap().is_empty());
    assert!(matches!(
        b.meta("client:new-b"),
        Err(StoreError::Tampered(_))
    ));
    // a row removed is refused too
    db.sql("DELETE FROM meta WHERE k = 'client:c2'");
    assert!(matches!(a.meta("client:c2"), Err(StoreError::Tampered(_))));
}

#[test]
fn a_removed_middle_event_or_version_is_found_and_an_emptied_database_refused() {
    let db = TestDb::new();
    let store = open(&db);
    create(&store, "p1", b"v1");
    update(&store, "p1");
    testsuite::append_audit(&store, 6);
    db.sql("DELETE FROM audit_event WHERE seq = 3");
    let found = store.check_state(&mut || {}).unwrap();
    assert!(
        found.iter().any(|f| f.contains("audit log holds")),
        "{found:?}"
    );
    db.sql("DELETE FROM resource_version WHERE id = 'p1' AND version = 1");
    assert!(matches!(
        store.version("Patient", "p1", 1),
        Err(StoreError::Tampered(_))
    ));
    assert!(
        store.version("Patient", "p1", 3).unwrap().is_none(),
        "a version never written"
    );
    store.close();
    drop(store);
    db.sql(
        "TRUNCATE audit_checkpoint, audit_event, audit_head, data_key, kek_generation, meta, \
         once_seen, posting, resource_head, resource_version, shared_state",
    );
    let e = PgStore::open(&db.target, StoreKeys::for_tests()).unwrap_err();
    assert!(e.to_string().contains("no signed audit head"), "{e}");
    db.sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public");
    let e = PgStore::open(&db.target, StoreKeys::for_tests()).unwrap_err();
    assert!(e.to_string().contains("holds no phivault store"), "{e}");
    db.sql("CREATE TABLE unrelated (x int)");
    let e = PgStore::create(&db.target, StoreKeys::for_tests()).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
}

#[test]
fn verify_names_every_row_that_differs_from_the_log() {
    let db = TestDb::new();
    let store = open(&db);
    create(&store, "p1", b"v1");
    update(&store, "p1");
    store.set_meta("client:c2", b"one").unwrap();
    let old = saved_setting(&db, "client:c2");
    store.set_meta("client:c2", b"two").unwrap();
    store.close();
    drop(store);
    let clean = verify::verify(&db.target, StoreKeys::for_tests()).unwrap();
    assert!(clean.discrepancies.is_empty(), "{:?}", clean.discrepancies);
    assert_eq!((clean.versions, clean.settings), (2, 1));
    // a middle version removed: named by type, id and version
    db.sql("DELETE FROM resource_version WHERE id = 'p1' AND version = 1");
    let found = verify::verify(&db.target, StoreKeys::for_tests()).unwrap();
    assert!(
        found
            .discrepancies
            .iter()
            .any(|d| d == "Patient/p1 version 1: committed but missing (removed or rolled back)"),
        "{:?}",
        found.discrepancies
    );
    // an older settings row put back: refused at open, named as such
    put_back(&db, "client:c2", &old);
    let found = verify::verify(&db.target, StoreKeys::for_tests()).unwrap();
    assert!(
        found
            .discrepancies
            .iter()
            .any(|d| d.contains("settings rows differ")),
        "{:?}",
        found.discrepancies
    );
}

#[test]
fn a_row_a_node_believed_changed_elsewhere_and_put_back_is_refused_by_that_node() {
    let db = TestDb::new();
    let (a, b) = (open(&db), open(&db));
    // b writes the account row (a sign-in on b) and so believes it
    b.set_meta("user:bob", b"{\"disabled\":false}").unwrap();
    assert_eq!(
        b.meta("user:bob").unwrap().unwrap(),
        b"{\"disabled\":false}"
    );
    let old = saved_setting(&db, "user:bob");
    // disabled through another node, which b does not look at
    a.set_meta("user:bob", b"{\"disabled\":true}").unwrap();
    // the row b believes is put back
    put_back(&db, "user:bob", &old);
    assert!(matches!(b.meta("user:bob"), Err(StoreError::Tampered(_))));
    assert!(matches!(a.meta("user:bob"), Err(StoreError::Tampered(_))));
}

#[test]
fn settings_and_versions_read_while_nodes_write_are_never_taken_for_tampering() {
    let db = TestDb::new();
    let (a, b) = (Arc::new(open(&db)), Arc::new(open(&db)));
    a.set_meta("client:x", b"0").unwrap();
    create(a.as_ref(), "p0", b"v");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..6)
        .map(|n| {
            let (s, stop) = (if n % 2 == 0 { a.clone() } else { b.clone() }, stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    s.meta("client:x").expect("a settings read");
                    for i in 0..5 {
                        s.version("Patient", &format!("p{i}"), 1)
                            .expect("a version read");
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for i in 1..40 {
        let w = if i % 2 == 0 { &a } else { &b };
        w.set_meta("client:x", i.to_string().as_bytes()).unwrap();
        if i < 5 {
            create(w.as_ref(), &format!("p{i}"), b"v");
        }
        testsuite::append_audit(w.as_ref(), 3);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert!(a.take_detections().is_empty() && b.take_detections().is_empty());
}
