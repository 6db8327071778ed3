//! `phivault migrate --from DIR --to postgres://…`: a stopped embedded store moved to an
//! empty PostgreSQL database, row for row, without opening a record
//! (`phivault_store::postgres::migrate`); the data directory then names the database and
//! serves from it. The embedded file stays beside it, renamed, until the operator has
//! checked the new store.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::datadir::{self, DataDir, DatabaseConfig};

/// The suffix the embedded files get once moved.
const MOVED: &str = ".migrated";

pub(crate) fn migrate(from: &Path, to: &str, password_file: Option<PathBuf>) -> Result<i32> {
    let d = DataDir::new(from);
    datadir::check_dir_private(from)?;
    if d.database()?.is_some() {
        bail!("{} already keeps its store in PostgreSQL", from.display());
    }
    if !d.db().is_file() {
        bail!(
            "{} holds no embedded store ({})",
            from.display(),
            d.db().display()
        );
    }
    let _lock = datadir::lock_for_serving(&d).context(
        "stop the server of this data directory first: a store moves while nothing writes it",
    )?;
    let cfg = DatabaseConfig {
        url: to.to_owned(),
        password_file,
    };
    let target = cfg.target()?;
    let (keys, audit) = datadir::load_keys(&d)?;
    // the embedded store opened as `serve` opens it (its checks), then verified whole: a
    // store changed outside phivault is not moved
    {
        let opened = datadir::open_under(DataDir::new(from), keys.clone(), audit)?;
        opened.store.ready().map_err(datadir::refusal)?;
        opened.store.close();
    }
    let audit = datadir::audit_signer(&d, &keys)?;
    let public = audit.public_key();
    let store_keys = datadir::store_keys(&keys, audit);
    let report =
        phivault_store::sqlite::verify::verify_file(&d.db(), &store_keys.integrity, &public)
            .map_err(datadir::refusal)?;
    if !report.discrepancies.is_empty() {
        bail!(
            "refusing to move a store that does not verify ({} discrepancies): run `phivault verify --data-dir {}`",
            report.discrepancies.len(),
            from.display()
        );
    }
    let bar = crate::progress::restore(true);
    let started = std::time::Instant::now();
    let moved = phivault_store::postgres::migrate::from_sqlite(
        &d.db(),
        &target,
        store_keys,
        &mut |what, n| {
            bar.set_position(n);
            bar.set_message(what.to_owned());
        },
    )
    .with_context(|| format!("the store was not moved to {}", target.url()))?;
    bar.finish_and_clear();
    // from now on the data directory serves from the database
    phivault_crypto::write_private_file(&d.database_json(), &serde_json::to_vec_pretty(&cfg)?)?;
    for suffix in ["", "-wal", "-shm"] {
        let f = PathBuf::from(format!("{}{suffix}", d.db().display()));
        if f.exists() {
            let to = PathBuf::from(format!("{}{MOVED}{suffix}", d.db().display()));
            std::fs::rename(&f, &to).with_context(|| format!("cannot rename {}", f.display()))?;
        }
    }
    println!(
        "moved to {}: {} resources, {} versions, {} index postings, {} settings rows, {} data keys, {} audit events in {:.1} s; the signed audit head came along and the copy sums to it",
        target.url(),
        moved.resources,
        moved.versions,
        moved.postings,
        moved.settings,
        moved.keys,
        moved.events,
        started.elapsed().as_secs_f64()
    );
    println!(
        "{} now serves from the database; the embedded file is kept as {}{MOVED} (ciphertext only) until you remove it",
        from.display(),
        d.db().display()
    );
    Ok(0)
}
