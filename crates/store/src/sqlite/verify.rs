//! A database checked against its signed state and its audit log: by the background
//! verifier (the state summary recomputed in one snapshot) and by `phivault verify`
//! (offline: also every row replayed against the writes the log commits, naming each one
//! that differs — ids, keys and kinds, never values).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use phivault_audit::{AuditEvent, ChainHead, Write};
use rusqlite::{Connection, OpenFlags};

use super::{engine, read_id};
use crate::StoreError;
use crate::integrity::Integrity;

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

/// What [`verify_file`] found.
#[derive(Debug, Default)]
pub struct Report {
    /// Every discrepancy, one line each (ids, keys and kinds; never values).
    pub discrepancies: Vec<String>,
    /// Versions, settings rows and audit events read.
    pub versions: u64,
    /// Settings rows read.
    pub settings: u64,
    /// Audit events replayed.
    pub events: u64,
}

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
        Ok((settings, versions, events)) => {
            report.events = events;
            if let Err(e) = compare_settings(&c, integ, settings, &mut report) {
                report.discrepancies.push(unreadable(e));
            }
            if let Err(e) = compare_versions(&c, versions, &mut report) {
                report.discrepancies.push(unreadable(e));
            }
        }
        Err(e) => report.discrepancies.push(unreadable(e)),
    }
    let mut seen = std::collections::HashSet::new();
    report.discrepancies.retain(|d| seen.insert(d.clone()));
    Ok(report)
}

/// A version as committed: tombstone or not, SHA-256 of its sealed bytes.
type Committed = (bool, [u8; 32]);
/// Settings rows committed: key → MAC.
type Settings = HashMap<String, [u8; 32]>;
/// Versions committed, by type, id and version.
type Versions = BTreeMap<(String, String, u64), Committed>;

/// The settings and versions the log commits (the last write of each settings row).
fn replay(c: &Connection) -> Result<(Settings, Versions, u64), StoreError> {
    let mut settings = HashMap::new();
    let mut versions = BTreeMap::new();
    let mut events = 0u64;
    let mut st = c
        .prepare("SELECT event FROM audit_event ORDER BY seq")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        events += 1;
        let bytes = r
            .get_ref(0)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(engine)?;
        let Ok(ev) = AuditEvent::decode(bytes) else {
            continue;
        };
        for w in ev.writes {
            match w {
                Write::Setting { key, mac } => {
                    settings.insert(key, mac);
                }
                Write::Version {
                    resource_type,
                    resource_id,
                    version,
                    deleted,
                    sealed,
                } => {
                    versions.insert((resource_type, resource_id, version), (deleted, sealed));
                }
            }
        }
    }
    Ok((settings, versions, events))
}

fn compare_settings(
    c: &Connection,
    integ: &Integrity,
    mut expected: HashMap<String, [u8; 32]>,
    report: &mut Report,
) -> Result<(), StoreError> {
    let mut st = c
        .prepare("SELECT k, v, mac FROM meta ORDER BY k")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        report.settings += 1;
        let k: String = r.get(0).map_err(engine)?;
        let v: Vec<u8> = r.get(1).map_err(engine)?;
        let mac: Option<Vec<u8>> = r.get(2).map_err(engine)?;
        let valid = mac.as_ref().is_some_and(|m| integ.setting_ok(&k, &v, m));
        match (expected.remove(&k), valid) {
            (_, false) => report.discrepancies.push(format!(
                "settings row {k}: no valid MAC (inserted or edited outside phivault)"
            )),
            (None, true) => report.discrepancies.push(format!(
                "settings row {k}: never committed in the audit log"
            )),
            (Some(want), true) if mac.as_deref() != Some(&want[..]) => {
                report.discrepancies.push(format!(
                    "settings row {k}: not the value last committed (restored from an older copy)"
                ))
            }
            _ => {}
        }
    }
    let mut missing: Vec<String> = expected.into_keys().collect();
    missing.sort();
    for k in missing {
        report
            .discrepancies
            .push(format!("settings row {k}: committed but missing (removed)"));
    }
    Ok(())
}

fn compare_versions(
    c: &Connection,
    mut expected: Versions,
    report: &mut Report,
) -> Result<(), StoreError> {
    // the newest committed version of each resource, for the heads
    let mut newest: HashMap<(String, String), (u64, bool)> = HashMap::new();
    for ((t, i, v), (d, _)) in &expected {
        let e = newest.entry((t.clone(), i.clone())).or_insert((*v, *d));
        if *v >= e.0 {
            *e = (*v, *d);
        }
    }
    {
        let mut st = c
            .prepare("SELECT rtype, id, version, deleted, sealed FROM resource_version")
            .map_err(engine)?;
        let mut rows = st.query([]).map_err(engine)?;
        while let Some(r) = rows.next().map_err(engine)? {
            report.versions += 1;
            let t: String = r.get(0).map_err(engine)?;
            let i = read_id(r, 1).map_err(engine)?;
            let v = r.get::<_, i64>(2).map_err(engine)? as u64;
            let d = super::flag(r, 3).map_err(engine)?;
            let sealed = r
                .get_ref(4)
                .and_then(|x| Ok(x.as_blob()?))
                .map_err(engine)?;
            let digest = super::state::sealed_digest(sealed);
            match expected.remove(&(t.clone(), i.clone(), v)) {
                None => report.discrepancies.push(format!(
                    "{t}/{i} version {v}: stored but never committed (inserted or forged)"
                )),
                Some((want_d, want)) if want_d != d || want != digest => {
                    report.discrepancies.push(format!(
                        "{t}/{i} version {v}: not what was committed (edited, swapped or a forged tombstone)"
                    ))
                }
                _ => {}
            }
        }
    }
    for ((t, i, v), _) in expected {
        report.discrepancies.push(format!(
            "{t}/{i} version {v}: committed but missing (removed or rolled back)"
        ));
    }
    let mut st = c
        .prepare("SELECT rtype, id, version, deleted FROM resource_no")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let t: Option<String> = r.get(0).map_err(engine)?;
        let i = read_id(r, 1).map_err(engine)?;
        let v: Option<i64> = r.get(2).map_err(engine)?;
        let d: Option<i64> = r.get(3).map_err(engine)?;
        let t = t.unwrap_or_default();
        let found = match (v, d) {
            (Some(v), Some(d @ 0..=1)) => Some((v as u64, d == 1)),
            _ => None,
        };
        match (newest.remove(&(t.clone(), i.clone())), found) {
            (Some(want), Some(got)) if want == got => {}
            (want, got) => {
                let v = |x: Option<u64>| x.map_or_else(|| "none".to_owned(), |v| v.to_string());
                report.discrepancies.push(format!(
                    "{t}/{i}: its head says version {}, the log {}",
                    v(got.map(|g| g.0)),
                    v(want.map(|w| w.0))
                ))
            }
        }
    }
    let mut lost: Vec<(String, String)> = newest.into_keys().collect();
    lost.sort();
    for (t, i) in lost {
        report
            .discrepancies
            .push(format!("{t}/{i}: committed but has no head (removed)"));
    }
    Ok(())
}
