//! `phivault verify` of a PostgreSQL store: the checks every open makes, the state summed
//! afresh against the signed one, and every settings row, version and head against the
//! writes the audit log commits (`crate::replay`), each discrepancy named.

use super::{PgStore, PgTarget};
use crate::replay::{Log, Report};
use crate::{Store, StoreError, StoreKeys};

/// Rows read per query.
const PAGE: i64 = 5_000;

/// Verify the store at `target` (it is opened as `serve` opens it: a store that fails
/// those checks is reported with the reason, and nothing else is read).
pub fn verify(target: &PgTarget, keys: StoreKeys) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let reason = |e: StoreError| match e {
        StoreError::Tampered(why) => why,
        other => format!("the store cannot be read as phivault wrote it ({other})"),
    };
    let store = match PgStore::open(target, keys) {
        Ok(s) => s,
        Err(e @ StoreError::Tampered(_)) => {
            report.discrepancies.push(reason(e));
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let out = rows_against_log(&store, &mut report);
    store.close();
    if let Err(e) = out {
        report.discrepancies.push(reason(e));
    }
    let mut seen = std::collections::HashSet::new();
    report.discrepancies.retain(|d| seen.insert(d.clone()));
    Ok(report)
}

fn rows_against_log(store: &PgStore, report: &mut Report) -> Result<(), StoreError> {
    report.discrepancies.extend(store.check_state(&mut || {})?);
    let mut log = Log::default();
    store.scan_audit(&mut |e| {
        log.add(&e.event);
        true
    })?;
    let integ = store
        .integ
        .clone()
        .ok_or_else(|| StoreError::Engine("a store opened without its keys".into()))?;
    let mut check = log.checker(&integ, report);
    let settings = store
        .pool
        .with(async |c| c.query("SELECT k, v, mac FROM meta ORDER BY k", &[]).await)?;
    for r in &settings {
        check.setting(r.get(0), r.get(1), Some(r.get(2)));
    }
    check.settings_done();
    let mut after = (String::new(), String::new(), -1i64);
    loop {
        let page = store.pool.with(async |c| {
            c.query(
                "SELECT rtype, id, version, deleted, sha256(sealed) FROM resource_version \
                 WHERE (rtype, id, version) > ($1, $2, $3) ORDER BY rtype, id, version LIMIT $4",
                &[&after.0, &after.1, &after.2, &PAGE],
            )
            .await
        })?;
        for r in &page {
            let digest: Vec<u8> = r.get(4);
            let digest: [u8; 32] = digest
                .try_into()
                .map_err(|_| StoreError::Corrupt("a SHA-256 digest"))?;
            let (t, i, v): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
            check.version(&t, &i, v as u64, r.get(3), digest);
            after = (t, i, v);
        }
        if page.len() < PAGE as usize {
            break;
        }
    }
    check.versions_done();
    let heads = store.pool.with(async |c| {
        c.query("SELECT rtype, id, version, deleted FROM resource_head", &[])
            .await
    })?;
    for r in &heads {
        let (t, i): (&str, &str) = (r.get(0), r.get(1));
        check.head(t, i, Some((r.get::<_, i64>(2) as u64, r.get(3))));
    }
    check.heads_done();
    Ok(())
}
