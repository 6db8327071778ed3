#![allow(clippy::unwrap_used)] // test support for every engine: a panic is how a check reports failure
//! The behaviour every engine must show. Each engine's tests call [`run_all`] on a
//! fresh, empty store.

use phivault_audit::{Action, AuditEvent, Outcome};

use crate::{CommitError, Expect, Guard, IndexEntry, Put, Store, VersionRow, WriteBatch};

/// A version row sealed (for the suite) under key `k1`.
pub fn row(rtype: &str, id: &str, version: u64, sealed: &[u8]) -> VersionRow {
    VersionRow {
        rtype: rtype.into(),
        id: id.into(),
        version,
        key_id: "k1".into(),
        deleted: false,
        updated_ms: 1_700_000_000_000 + version as i64,
        sealed: sealed.to_vec(),
    }
}

pub fn event(n: u64) -> AuditEvent {
    AuditEvent {
        time_ms: n,
        request_id: format!("r{n}"),
        client_id: Some("c".into()),
        user: None,
        action: Action::C,
        interaction: "create".into(),
        resource_type: Some("Patient".into()),
        resource_id: None,
        version: None,
        patient: None,
        outcome: Outcome::from_http(201),
        source: "127.0.0.1".into(),
        entities: vec![],
        detail: Default::default(),
        writes: Vec::new(),
    }
}

fn commit(store: &dyn Store, batch: WriteBatch) -> Result<crate::Committed, CommitError> {
    store
        .submit(batch)
        .blocking_recv()
        .map_err(|_| CommitError::Store(crate::StoreError::Closed))?
}

/// Append `n` audit-only batches.
pub fn append_audit(store: &dyn Store, n: u64) {
    for i in 0..n {
        let b = WriteBatch {
            audit: vec![event(i)],
            ..Default::default()
        };
        commit(store, b).expect("audit append");
    }
}

/// The current row of `rtype/id`, read one at a time and as part of a page (which an
/// engine may answer from rows it kept): both must give the latest committed version.
fn current(store: &dyn Store, rtype: &str, id: &str) -> Option<VersionRow> {
    let one = store.current(rtype, id).unwrap();
    let ids = [id.to_owned(), "never-written".to_owned()];
    for _ in 0..2 {
        let many = store.current_many(rtype, &ids).unwrap();
        assert_eq!(many, vec![one.clone(), None]);
    }
    one
}

fn tok(param: &str, t: &[u8]) -> IndexEntry {
    IndexEntry {
        param: param.into(),
        token: t.to_vec(),
    }
}

/// Run every check.
pub fn run_all(store: &dyn Store) {
    create_read_update_history(store);
    conflicts_are_detected(store);
    failed_batch_writes_nothing(store);
    guards_and_lookup(store);
    candidate_queries(store);
    numbers_of_failed_batches_name_nothing(store);
    key_conflict(store);
    uuid_and_text_ids(store);
    meta_roundtrip(store);
    concurrent_batches_all_land(store);
    meta_updates_are_atomic(store);
}

fn create_read_update_history(store: &dyn Store) {
    let b = WriteBatch {
        new_keys: vec![("k1".into(), b"wrapped".to_vec())],
        puts: vec![Put {
            row: row("Patient", "a", 1, b"v1"),
            expect: Expect::Absent,
            index: vec![tok("identifier", b"t1")],
            replaces: vec![],
        }],
        audit: vec![event(1)],
        ..Default::default()
    };
    let c = commit(store, b).expect("create");
    assert!(c.last_audit_seq.is_some());
    let cur = current(store, "Patient", "a").unwrap();
    assert_eq!(cur.version, 1);
    assert_eq!(cur.sealed, b"v1");
    assert_eq!(store.data_key("k1").unwrap().unwrap(), b"wrapped");
    let b = WriteBatch {
        puts: vec![Put {
            row: row("Patient", "a", 2, b"v2"),
            expect: Expect::Version(1),
            index: vec![tok("identifier", b"t2")],
            replaces: vec![tok("identifier", b"t1")],
        }],
        ..Default::default()
    };
    commit(store, b).expect("update");
    assert_eq!(current(store, "Patient", "a").unwrap().sealed, b"v2");
    assert_eq!(
        store.version("Patient", "a", 1).unwrap().unwrap().sealed,
        b"v1"
    );
    assert!(store.version("Patient", "a", 3).unwrap().is_none());
    let h = store.history("Patient", Some("a"), 10).unwrap();
    assert_eq!(h.iter().map(|r| r.version).collect::<Vec<_>>(), vec![2, 1]);
    // old index entries are replaced
    assert!(
        store
            .lookup("Patient", &[tok("identifier", b"t1")])
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .lookup("Patient", &[tok("identifier", b"t2")])
            .unwrap(),
        vec!["a".to_string()]
    );
    // delete = tombstone version; deleted resources are not found by lookup
    let mut tomb = row("Patient", "a", 3, b"");
    tomb.deleted = true;
    commit(
        store,
        WriteBatch {
            puts: vec![Put {
                row: tomb,
                expect: Expect::Version(2),
                index: vec![],
                replaces: vec![tok("identifier", b"t2")],
            }],
            ..Default::default()
        },
    )
    .expect("delete");
    assert!(current(store, "Patient", "a").unwrap().deleted);
    assert!(
        store
            .lookup("Patient", &[tok("identifier", b"t2")])
            .unwrap()
            .is_empty()
    );
}

fn conflicts_are_detected(store: &dyn Store) {
    commit(
        store,
        WriteBatch {
            new_keys: vec![("k1".into(), b"wrapped".to_vec())],
            ..Default::default()
        },
    )
    .expect("key");
    let put = |v: u64, expect| WriteBatch {
        puts: vec![Put {
            row: row("Observation", "o", v, b"x"),
            expect,
            index: vec![],
            replaces: vec![],
        }],
        ..Default::default()
    };
    commit(store, put(1, Expect::Absent)).expect("first");
    assert!(matches!(
        commit(store, put(1, Expect::Absent)),
        Err(CommitError::Conflict {
            index: 0,
            current: Some(1)
        })
    ));
    assert!(matches!(
        commit(store, put(2, Expect::Version(5))),
        Err(CommitError::Conflict { .. })
    ));
    // version must be current + 1
    assert!(matches!(
        commit(store, put(7, Expect::Version(1))),
        Err(CommitError::Conflict { .. })
    ));
    commit(store, put(2, Expect::Version(1))).expect("second");
}

fn failed_batch_writes_nothing(store: &dyn Store) {
    let before = store.audit_head().unwrap().map(|h| h.size).unwrap_or(0);
    let b = WriteBatch {
        puts: vec![
            Put {
                row: row("Encounter", "e1", 1, b"x"),
                expect: Expect::Absent,
                index: vec![],
                replaces: vec![],
            },
            Put {
                row: row("Observation", "o", 9, b"x"),
                expect: Expect::Version(8),
                index: vec![],
                replaces: vec![],
            },
        ],
        audit: vec![event(50)],
        ..Default::default()
    };
    assert!(matches!(
        commit(store, b),
        Err(CommitError::Conflict { index: 1, .. })
    ));
    assert!(store.current("Encounter", "e1").unwrap().is_none());
    let after = store.audit_head().unwrap().map(|h| h.size).unwrap_or(0);
    assert_eq!(before, after, "a rejected batch leaves no audit event");
}

fn guards_and_lookup(store: &dyn Store) {
    let mk = |id: &str, toks: Vec<IndexEntry>, guard: Option<Vec<IndexEntry>>| WriteBatch {
        guards: guard
            .map(|t| {
                vec![Guard::NoMatch {
                    rtype: "Practitioner".into(),
                    tokens: t,
                    except: vec![],
                }]
            })
            .unwrap_or_default(),
        puts: vec![Put {
            row: row("Practitioner", id, 1, b"x"),
            expect: Expect::Absent,
            index: toks,
            replaces: vec![],
        }],
        ..Default::default()
    };
    let both = vec![tok("identifier", b"npi"), tok("name", b"smith")];
    commit(store, mk("p1", both.clone(), Some(both.clone()))).expect("p1");
    assert!(matches!(
        commit(store, mk("p2", both.clone(), Some(both.clone()))),
        Err(CommitError::Guard { index: 0 })
    ));
    // a partial match does not trip the guard
    let other = vec![tok("identifier", b"npi"), tok("name", b"jones")];
    commit(store, mk("p3", other.clone(), Some(other))).expect("p3");
    assert_eq!(
        store.lookup("Practitioner", &both).unwrap(),
        vec!["p1".to_string()]
    );
    let mut ids = store
        .lookup("Practitioner", &[tok("identifier", b"npi")])
        .unwrap();
    ids.sort();
    assert_eq!(ids, vec!["p1".to_string(), "p3".to_string()]);
    assert!(store.lookup("Patient", &both).unwrap().is_empty());
    // a guard that names the known non-matching holders of the tokens passes
    let b = WriteBatch {
        guards: vec![Guard::NoMatch {
            rtype: "Practitioner".into(),
            tokens: both.clone(),
            except: vec!["p1".into()],
        }],
        puts: vec![Put {
            row: row("Practitioner", "p4", 1, b"x"),
            expect: Expect::Absent,
            index: both.clone(),
            replaces: vec![],
        }],
        ..Default::default()
    };
    commit(store, b).expect("guard with except");
}

fn candidate_queries(store: &dyn Store) {
    use crate::Candidates as C;
    let ids: Vec<String> = (0..40)
        .map(|i| format!("018f0000-0000-7000-8000-{i:012x}"))
        .collect();
    let puts = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut index = vec![tok("code", if i % 2 == 0 { b"even" } else { b"odd" })];
            if i % 3 == 0 {
                index.push(tok("flag", b"three"));
            }
            Put {
                row: row("Condition", id, 1, b"x"),
                expect: Expect::Absent,
                index,
                replaces: vec![],
            }
        })
        .collect();
    commit(
        store,
        WriteBatch {
            puts,
            ..Default::default()
        },
    )
    .expect("conditions");
    // a deleted one leaves every candidate set and the type scan
    let del = WriteBatch {
        puts: vec![Put {
            row: VersionRow {
                deleted: true,
                sealed: vec![],
                ..row("Condition", &ids[0], 2, b"")
            },
            expect: Expect::Version(1),
            index: vec![],
            replaces: vec![tok("code", b"even"), tok("flag", b"three")],
        }],
        ..Default::default()
    };
    commit(store, del).expect("delete");
    let t = |p: &str, v: &[&[u8]]| C::Tokens {
        param: p.into(),
        tokens: v.iter().map(|x| x.to_vec()).collect(),
    };
    let even = t("code", &[b"even"]);
    let three = t("flag", &[b"three"]);
    let q = C::And(vec![even.clone(), three.clone()]);
    let got = store.candidates("Condition", &q, None, 100).unwrap();
    let want: Vec<String> = (0..40)
        .filter(|i| i % 6 == 0 && *i != 0)
        .map(|i| ids[i].clone())
        .collect();
    assert_eq!(got, want, "AND of two token sets, in id order");
    let got = store
        .candidates("Condition", &C::Or(vec![even, three]), None, 100)
        .unwrap();
    assert_eq!(
        got.len(),
        19 + 7,
        "OR: 19 even (one deleted) + 7 odd multiples of 3"
    );
    // paging: after + limit walk the same order without gaps or repeats
    let all = store.candidates("Condition", &C::All, None, 1000).unwrap();
    assert_eq!(all.len(), 39);
    assert!(!all.contains(&ids[0]));
    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .candidates("Condition", &C::All, after.as_deref(), 7)
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        walked.extend(page);
    }
    assert_eq!(walked, all);
    let odd = t("code", &[b"odd", b"nothing"]);
    let page1 = store.candidates("Condition", &odd, None, 5).unwrap();
    let page2 = store
        .candidates("Condition", &odd, page1.last().map(String::as_str), 100)
        .unwrap();
    assert_eq!(page1.len() + page2.len(), 20);
    assert!(page1.last() < page2.first());
    // All inside And narrows nothing
    let q = C::And(vec![C::All, t("flag", &[b"three"])]);
    assert_eq!(
        store.candidates("Condition", &q, None, 100).unwrap().len(),
        13
    );
    let st = store.index_stats("Condition", "code").unwrap();
    assert_eq!(st.rows, 39);
    assert_eq!(st.resources, 39);
    assert_eq!(st.distinct_tokens, 2);
    assert_eq!(st.max_rows_per_token, 20);
    assert_eq!(
        store.index_stats("Condition", "flag").unwrap().resources,
        13
    );
}

/// A resource created in a batch that fails leaves no trace in the candidates, and the
/// resource created next (which an engine may give the same internal number) is found
/// under its own id, before and after earlier look-ups.
fn numbers_of_failed_batches_name_nothing(store: &dyn Store) {
    use crate::Candidates as C;
    let put = |id: &str, code: &[u8]| Put {
        row: row("Procedure", id, 1, b"x"),
        expect: Expect::Absent,
        index: vec![tok("code", code)],
        replaces: vec![],
    };
    let find = |code: &[u8]| {
        let q = C::Tokens {
            param: "code".into(),
            tokens: vec![code.to_vec()],
        };
        store.candidates("Procedure", &q, None, 10).unwrap()
    };
    let a = "018f0000-0000-7000-8000-00000000000a";
    let (b, c) = (
        "018f0000-0000-7000-8000-00000000000b",
        "018f0000-0000-7000-8000-00000000000c",
    );
    let create = |id: &str, code: &[u8]| {
        let batch = WriteBatch {
            puts: vec![put(id, code)],
            ..Default::default()
        };
        commit(store, batch).unwrap();
    };
    create(a, b"first");
    assert_eq!(find(b"first"), vec![a.to_owned()]);
    for _ in 0..2 {
        let failing = WriteBatch {
            puts: vec![
                put(b, b"second"),
                Put {
                    row: row("Procedure", "missing", 9, b"x"),
                    expect: Expect::Version(8),
                    index: vec![],
                    replaces: vec![],
                },
            ],
            ..Default::default()
        };
        assert!(commit(store, failing).is_err());
        assert!(find(b"second").is_empty());
    }
    create(c, b"second");
    assert_eq!(find(b"second"), vec![c.to_owned()]);
    assert_eq!(find(b"first"), vec![a.to_owned()]);
    assert!(store.current("Procedure", b).unwrap().is_none());
}

fn key_conflict(store: &dyn Store) {
    let b = |w: &[u8]| WriteBatch {
        new_keys: vec![("k2".into(), w.to_vec())],
        ..Default::default()
    };
    commit(store, b(b"one")).expect("k2");
    commit(store, b(b"one")).expect("same key again is fine");
    assert!(matches!(
        commit(store, b(b"two")),
        Err(CommitError::KeyConflict)
    ));
    assert_eq!(store.data_key("k2").unwrap().unwrap(), b"one");
}

fn uuid_and_text_ids(store: &dyn Store) {
    for id in [
        "0190f3a2-7b1c-7def-8abc-0123456789ab",
        "0190F3A2-7B1C-7DEF-8ABC-0123456789AB",
        "plain-text.id",
    ] {
        commit(
            store,
            WriteBatch {
                puts: vec![Put {
                    row: row("Device", id, 1, id.as_bytes()),
                    expect: Expect::Absent,
                    index: vec![tok("identifier", id.as_bytes())],
                    replaces: vec![],
                }],
                ..Default::default()
            },
        )
        .expect("put");
    }
    for id in [
        "0190f3a2-7b1c-7def-8abc-0123456789ab",
        "0190F3A2-7B1C-7DEF-8ABC-0123456789AB",
        "plain-text.id",
    ] {
        let r = store.current("Device", id).unwrap().unwrap();
        assert_eq!(r.id, id);
        assert_eq!(r.sealed, id.as_bytes());
        assert_eq!(
            store
                .lookup("Device", &[tok("identifier", id.as_bytes())])
                .unwrap(),
            vec![id.to_string()]
        );
    }
    // several at once: in the order asked, missing ones as None
    let ids: Vec<String> = [
        "plain-text.id",
        "missing",
        "0190f3a2-7b1c-7def-8abc-0123456789ab",
        "0190F3A2-7B1C-7DEF-8ABC-0123456789AB",
    ]
    .map(String::from)
    .to_vec();
    let many = store.current_many("Device", &ids).unwrap();
    assert_eq!(many.len(), ids.len());
    for (id, got) in ids.iter().zip(&many) {
        assert_eq!(got.as_ref(), store.current("Device", id).unwrap().as_ref());
    }
    assert!(many[1].is_none() && many[0].is_some());
}

fn meta_roundtrip(store: &dyn Store) {
    assert!(store.meta("x").unwrap().is_none());
    store.set_meta("x", b"1").unwrap();
    store.set_meta("x", b"2").unwrap();
    assert_eq!(store.meta("x").unwrap().unwrap(), b"2");
    for k in [
        "alert:b", "alert:a", "alerts", "alert;", "alert:c", "alers:z",
    ] {
        store.set_meta(k, k.as_bytes()).unwrap();
    }
    let keys = |limit| -> Vec<String> {
        store
            .meta_prefix("alert:", limit)
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                assert_eq!(k.as_bytes(), v.as_slice());
                k
            })
            .collect()
    };
    assert_eq!(keys(10), ["alert:a", "alert:b", "alert:c"]);
    assert_eq!(keys(2), ["alert:a", "alert:b"]);
    assert!(store.meta_prefix("nothing:", 10).unwrap().is_empty());
}

fn concurrent_batches_all_land(store: &dyn Store) {
    let receivers: Vec<_> = (0..200)
        .map(|i| {
            store.submit(WriteBatch {
                puts: vec![Put {
                    row: row("Condition", &format!("c{i}"), 1, b"x"),
                    expect: Expect::Absent,
                    index: vec![],
                    replaces: vec![],
                }],
                audit: vec![event(i)],
                ..Default::default()
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for r in receivers {
        let c = r.blocking_recv().unwrap().expect("commit");
        seqs.push(c.last_audit_seq.unwrap());
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        200,
        "each batch got its own audit sequence number"
    );
    for i in 0..200 {
        assert!(
            store
                .current("Condition", &format!("c{i}"))
                .unwrap()
                .is_some()
        );
    }
    // read back in pages by sequence number: every event once, in order
    let (first, last) = (seqs[0], seqs[199]);
    let mut after = first - 1;
    let mut seen = Vec::new();
    loop {
        let page = store.audit_after(after, 64).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 64);
        after = page.last().unwrap().seq;
        seen.extend(page.iter().map(|e| e.seq));
    }
    assert_eq!(seen, seqs);
    assert!(store.audit_after(last, 10).unwrap().is_empty());
}

/// A counter in a settings row, updated from 16 threads × 25 times with a cap of 300:
/// every increment counted once, the cap holding, answers not changing the row leaving it.
fn meta_updates_are_atomic(store: &dyn Store) {
    let count = |v: Option<&[u8]>| -> u64 {
        v.map_or(0, |b| std::str::from_utf8(b).unwrap().parse().unwrap())
    };
    let granted = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                for _ in 0..25 {
                    let won = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let w = won.clone();
                    store
                        .update_meta(
                            "counter",
                            Box::new(move |v| {
                                let n = count(v);
                                w.store(n < 300, std::sync::atomic::Ordering::SeqCst);
                                (n < 300).then(|| (n + 1).to_string().into_bytes())
                            }),
                        )
                        .unwrap();
                    if won.load(std::sync::atomic::Ordering::SeqCst) {
                        granted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(granted.into_inner(), 300, "exactly the cap was granted");
    assert_eq!(count(store.meta("counter").unwrap().as_deref()), 300);
    store.update_meta("counter", Box::new(|_| None)).unwrap();
    assert_eq!(count(store.meta("counter").unwrap().as_deref()), 300);
    store
        .update_meta(
            "absent-row",
            Box::new(|v| {
                assert!(v.is_none());
                None
            }),
        )
        .unwrap();
    assert!(store.meta("absent-row").unwrap().is_none());
}
