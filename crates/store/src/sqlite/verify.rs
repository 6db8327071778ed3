//! A database checked against its signed state and its audit log: by the background
//! verifier (the state summary recomputed in one snapshot) and by `phivault verify`
//! (offline: also every row replayed against the writes the log commits, naming each one
//! that differs — ids, keys and kinds, never values).

use std::path::Path;

use phivault_audit::ChainHead;
use rusqlite::{Connection, OpenFlags};

use super::{engine, read_id};
use crate::StoreError;
use crate::integrity::Integrity;
use crate::replay::{Checker, Log};

/// Every digest recomputed from `c` (inside a read transaction) against the state signed
/// with the head it holds: the kinds of rows that differ.
pub(super) fn against_signed_state(
    c: &Connection,
    integ: &Integrity,
    pace: &mut dyn FnMut(),
) -> Result<Vec<String>, StoreError> {
    let Some((size, hash, state, _)) = super::trust::head_row(c)? else {
        return Ok(if !super::holds_data(c).map_err(engine)? {
            Vec::new()
        } else {
            vec!["the store holds rows but has no signed audit head".to_owned()]
        });
    };
    let head = ChainHead {
        size: size as u64,
        hash: hash.try_into().unwrap_or([0u8; 32]),
    };
    let Some(signed) = integ.open_state(&head, &state) else {
        return Ok(vec![
            "the audit head's state summary does not open under this master key".to_owned(),
        ]);
    };
    let now = super::state::recompute(c, integ, pace)?;
    let mut out = Vec::new();
    if now.settings != signed.settings {
        out.push(
            "settings rows differ from the signed state (a row inserted, edited, removed or restored from an older copy)"
                .to_owned(),
        );
    }
    if now.heads != signed.heads {
        out.push(
            "the resources' current versions differ from the signed state (a record rolled back, removed, added or marked deleted)"
                .to_owned(),
        );
    }
    if now.body != signed.body {
        out.push(
            "stored versions, index postings, data keys or KEK generations differ from the signed state (a row edited, removed, added or restored)"
                .to_owned(),
        );
    }
    Ok(out)
}

pub use crate::replay::Report;

/// Check the database at `path` offline (read-only): the open-time checks, the state
/// summary recomputed against the signed one, and every row against the writes the log
/// commits.
pub fn verify_file(
    path: &Path,
    integ: &Integrity,
    audit_public: &[u8; 32],
) -> Result<Report, StoreError> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(engine)?;
    c.execute_batch("BEGIN").map_err(engine)?;
    let mut report = Report::default();
    if let Err(e) = super::trust::load(&c, integ, audit_public, false) {
        report.discrepancies.push(match e {
            StoreError::Tampered(why) => why,
            other => other.to_string(),
        });
    }
    // every part runs, and a part that cannot read what it needs says so
    let unreadable = |e: StoreError| match e {
        StoreError::Tampered(why) => why,
        other => format!("the store cannot be read as phivault wrote it ({other})"),
    };
    match against_signed_state(&c, integ, &mut || {}) {
        Ok(found) => report.discrepancies.extend(found),
        Err(e) => report.discrepancies.push(unreadable(e)),
    }
    match replay(&c) {
        Ok(log) => {
            let mut check = log.checker(integ, &mut report);
            let read = compare_settings(&c, &mut check)
                .and_then(|()| compare_versions(&c, &mut check))
                .map(|()| check.heads_done());
            if let Err(e) = read {
                report.discrepancies.push(unreadable(e));
            }
        }
        Err(e) => report.discrepancies.push(unreadable(e)),
    }
    let mut seen = std::collections::HashSet::new();
    report.discrepancies.retain(|d| seen.insert(d.clone()));
    Ok(report)
}

/// The settings and versions the log commits.
fn replay(c: &Connection) -> Result<Log, StoreError> {
    let mut log = Log::default();
    let mut st = c
        .prepare("SELECT event FROM audit_event ORDER BY seq")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let bytes = r
            .get_ref(0)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(engine)?;
        log.add(bytes);
    }
    Ok(log)
}

fn compare_settings(c: &Connection, check: &mut Checker<'_>) -> Result<(), StoreError> {
    let mut st = c
        .prepare("SELECT k, v, mac FROM meta ORDER BY k")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let k: String = r.get(0).map_err(engine)?;
        let v: Vec<u8> = r.get(1).map_err(engine)?;
        let mac: Option<Vec<u8>> = r.get(2).map_err(engine)?;
        check.setting(&k, &v, mac.as_deref());
    }
    check.settings_done();
    Ok(())
}

/// The versions, then the heads (`resource_no`), against the log.
fn compare_versions(c: &Connection, check: &mut Checker<'_>) -> Result<(), StoreError> {
    {
        let mut st = c
            .prepare("SELECT rtype, id, version, deleted, sealed FROM resource_version")
            .map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        while let Some(r) = rows.next().map_err(engine)? {
            let t: String = r.get(0).map_err(engine)?;
            let i = read_id(r, 1).map_err(engine)?;
            let v = r.get::<_, i64>(2).map_err(engine)? as u64;
            let d = super::flag(r, 3).map_err(engine)?;
            let sealed = r
                .get_ref(4)
                .and_then(|x| Ok(x.as_blob()?))
                .map_err(engine)?;
            check.version(&t, &i, v, d, super::state::sealed_digest(sealed));
        }
    }
    check.versions_done();
    let mut st = c
        .prepare("SELECT rtype, id, version, deleted FROM resource_no")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let t: Option<String> = r.get(0).map_err(engine)?;
        let i = read_id(r, 1).map_err(engine)?;
        let v: Option<i64> = r.get(2).map_err(engine)?;
        let d: Option<i64> = r.get(3).map_err(engine)?;
        let found = match (v, d) {
            (Some(v), Some(d @ 0..=1)) => Some((v as u64, d == 1)),
            _ => None,
        };
        check.head(&t.unwrap_or_default(), &i, found);
    }
    Ok(())
}
