//! `phivault verify`: a data directory checked offline — the audit log with the audit
//! key's public half (and a witness file), then the whole store against the log and the
//! state signed with it, with the integrity keys from the master key.

use std::path::Path;

use anyhow::Result;

use crate::{audit_cmds, datadir};

pub(crate) fn verify(data_dir: &Path, witness: Option<&Path>) -> Result<i32> {
    let d = datadir::DataDir::new(data_dir);
    let (keys, audit) = datadir::load_keys(&d)?;
    let public = audit.public_key();
    let mut failed = false;
    // (a part that cannot even read its rows is a failure of that part, not of the command)
    match audit_cmds::check_audit_log(data_dir, witness, &public) {
        Ok(Ok(summary)) => println!("audit log: OK: {summary}"),
        Ok(Err(failure)) => {
            failed = true;
            println!("audit log: FAILED: {failure}");
        }
        Err(e) => {
            failed = true;
            println!("audit log: FAILED: it cannot be read ({e:#})");
        }
    }
    let store_keys = datadir::store_keys(&keys, audit);
    if let Some(target) = d.database()? {
        failed |= !verify_postgres(&target, store_keys);
        println!("verify: {}", if failed { "FAILED" } else { "OK" });
        return Ok(i32::from(failed));
    }
    let report = match phivault_store::sqlite::verify::verify_file(
        &d.db(),
        &store_keys.integrity,
        &public,
    ) {
        Ok(r) => r,
        Err(e) => {
            println!("store: FAILED: it cannot be read ({e})");
            println!("verify: FAILED");
            return Ok(1);
        }
    };
    failed |= !print_store_report(&report);
    println!("verify: {}", if failed { "FAILED" } else { "OK" });
    Ok(i32::from(failed))
}

/// The PostgreSQL store: the checks every open makes, the state summed against the signed
/// one, and every row against the writes the log commits; whether it held.
fn verify_postgres(
    target: &phivault_store::postgres::PgTarget,
    keys: phivault_store::StoreKeys,
) -> bool {
    match phivault_store::postgres::verify::verify(target, keys) {
        Ok(report) => print_store_report(&report),
        Err(e) => {
            println!("store: FAILED: it cannot be read ({e})");
            false
        }
    }
}

/// Print what the store's verification found; whether it held.
fn print_store_report(report: &phivault_store::replay::Report) -> bool {
    if report.discrepancies.is_empty() {
        println!(
            "store: OK: {} versions and {} settings rows match the {} audit events that commit them and the signed state",
            report.versions, report.settings, report.events
        );
        return true;
    }
    println!(
        "store: FAILED: {} discrepancies ({} versions, {} settings rows, {} audit events read):",
        report.discrepancies.len(),
        report.versions,
        report.settings,
        report.events
    );
    for line in &report.discrepancies {
        println!("  {line}");
    }
    false
}
