//! The WAL tap and the page format against a real SQLite store: a snapshot taken while
//! the engine suite writes, plus every batch of pages the tap published, rebuilds a
//! database that the store opens — and opening checks every settings row, every resource
//! head and the audit chain against the signed state, so a single page missing or stale
//! would be refused.

use std::sync::Arc;

use phivault_backup::pages::{
    Segment, SegmentHeader, apply_segment, decode_segment, encode_segment,
};
use phivault_store::sqlite::SqliteStore;
use phivault_store::sqlite::tap::Changes;
use phivault_store::{Store as _, StoreKeys, testsuite};

fn segment(c: &Changes, seq: u64) -> Segment {
    let h = SegmentHeader {
        epoch: 1,
        seq,
        prev: [0; 32],
        first_commit: c.first_commit,
        last_commit: c.last_commit,
        time_ms: 0,
        audit_size: c.audit_size,
        resources: c.resources,
        page_size: c.page_size,
        db_pages: c.db_pages,
    };
    // through the wire format
    decode_segment(&encode_segment(&h, &c.pages).expect("encode")).expect("decode")
}

fn rebuild(snapshot: &std::path::Path, segs: &[Segment], out: &std::path::Path) {
    std::fs::copy(snapshot, out).expect("copy snapshot");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(out)
        .expect("open rebuilt");
    for s in segs {
        apply_segment(&f, s).expect("apply");
    }
    f.sync_all().expect("sync");
}

#[test]
fn a_snapshot_and_the_taps_pages_rebuild_the_store_exactly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = tmp.path().join("phivault.db");
    let store = Arc::new(SqliteStore::open(&db, StoreKeys::for_tests()).expect("open"));
    store.ready().expect("ready");
    testsuite::append_audit(&*store, 5);
    let tap = store.start_tap().expect("tap");
    // a snapshot while a writer thread runs the engine suite
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || testsuite::run_all(&*store))
    };
    std::thread::sleep(std::time::Duration::from_millis(30));
    let snap = tmp.path().join("snap.db");
    let point = store.snapshot_to(&snap, &mut |_, _| {}).expect("snapshot");
    let mut segs = Vec::new();
    let mut seq = 0;
    while !writer.is_finished() {
        if let Some(c) = tap.take() {
            assert!(c.broken.is_none(), "{:?}", c.broken);
            seq += 1;
            segs.push(segment(&c, seq));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    writer.join().expect("suite");
    testsuite::append_audit(&*store, 3);
    let events = store.audit_head().expect("head").expect("a head").size;
    // a commit is answered before the writer publishes it to the tap: take until the
    // last one is there
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while segs.last().map(|s| s.header.audit_size) != Some(events) {
        assert!(
            std::time::Instant::now() < deadline,
            "the last commits never reached the tap"
        );
        if let Some(c) = tap.take() {
            seq += 1;
            segs.push(segment(&c, seq));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // the segments a restore applies on this snapshot: those ending after its commit
    let after: Vec<Segment> = segs
        .into_iter()
        .filter(|s| s.header.last_commit > point.commit)
        .collect();
    assert!(!after.is_empty());
    store.close();

    let out = tmp.path().join("rebuilt.db");
    rebuild(&snap, &after, &out);
    let rebuilt = SqliteStore::open(&out, StoreKeys::for_tests()).expect("the rebuilt store opens");
    rebuilt.ready().expect("its heads check");
    assert_eq!(
        rebuilt.audit_head().expect("head").expect("a head").size,
        events
    );
    rebuilt.close();

    // the snapshot alone is its own point too
    let alone = tmp.path().join("alone.db");
    rebuild(&snap, &[], &alone);
    let s = SqliteStore::open(&alone, StoreKeys::for_tests()).expect("the snapshot opens");
    s.ready().expect("ready");
    assert_eq!(
        s.audit_head().expect("head").expect("a head").size,
        point.audit_size
    );
    s.close();

    // an earlier point: every segment but the last gives the store as of that segment
    let earlier = &after[..after.len() - 1];
    if let Some(prev) = earlier.last() {
        let out = tmp.path().join("earlier.db");
        rebuild(&snap, earlier, &out);
        let s = SqliteStore::open(&out, StoreKeys::for_tests()).expect("the earlier point opens");
        s.ready().expect("ready");
        assert_eq!(
            s.audit_head().expect("head").expect("a head").size,
            prev.header.audit_size
        );
        assert!(prev.header.audit_size < events);
        s.close();
    }
}
