//! `phivault backup now|verify|list|status` and `phivault restore` (issue 19); the
//! server's side is `backup_serve`, a restore's steps `backup_restore`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use phivault_backup::restore::{self, PointSpec};
use phivault_backup::ship::{ShipConfig, Shipper, Status};
use phivault_backup::{now_ms, rfc3339};

use crate::backup_args::{AtArgs, BackupCmd, SourceArgs, TargetArgs};
use crate::backup_restore::{Seen, parse_at, restore_into, scratch_dir, source_from};
use crate::backup_serve::{STATUS_FILE, backup_dir, deploy_for, open_target};
use crate::datadir::{self, DataDir};

/// `phivault restore`.
pub(crate) fn restore_cmd(args: &SourceArgs, to: &Path, at: &AtArgs) -> Result<i32> {
    let spec = parse_at(at)?;
    // the key files are unlocked in a private scratch place first: `to` is made only once
    // the source is known to open
    let scratch = scratch_dir("restore", None)?;
    let source = source_from(args, scratch.path())?;
    let seen = Seen::path(args).map_or(Seen::None, Seen::File);
    let done = restore_into(&source, to, spec, &seen, true)?;
    println!(
        "restored {} (deployment {}) as of {} (manifest {}, epoch {}): {} audit events, {} resources; {} segments applied, {} bytes fetched in {:.1} s",
        to.display(),
        source.deployment.deployment,
        rfc3339(done.point_ms),
        done.manifest,
        done.epoch,
        done.audit_size,
        done.resources,
        done.segments,
        done.fetched_bytes,
        done.rto.as_secs_f64()
    );
    println!("audit log: OK: {}", done.audit_summary);
    println!("store: OK: verified against the audit log and its signed state");
    if !done.reapplied.is_empty() {
        println!(
            "erasures re-applied (made after this point): {}",
            done.reapplied.len()
        );
    }
    println!(
        "records: {} opened, {} erased{}",
        done.sample.opened,
        done.sample.erased,
        if done.sample.failed.is_empty() {
            String::new()
        } else {
            format!(
                ", {} FAILED to open: {}",
                done.sample.failed.len(),
                done.sample.failed.join(", ")
            )
        }
    );
    println!("serve it with: phivault serve --data-dir {}", to.display());
    Ok(i32::from(!done.sample.failed.is_empty()))
}

/// `phivault backup …`
pub(crate) fn backup_cmd(cmd: BackupCmd) -> Result<i32> {
    match cmd {
        BackupCmd::Now { data_dir, target } => backup_now(&data_dir, &target),
        BackupCmd::Verify { source, scratch } => drill_cmd(&source, scratch.as_deref()),
        BackupCmd::List { source } => list_cmd(&source),
        BackupCmd::Status { data_dir } => status_cmd(&data_dir),
    }
}

fn drill_cmd(args: &SourceArgs, scratch: Option<&Path>) -> Result<i32> {
    let parent = scratch_dir("drill", scratch)?;
    let source = source_from(args, parent.path())?;
    let seen = Seen::path(args).map_or(Seen::None, Seen::File);
    let to = parent.path().join("restored");
    match restore_into(&source, &to, PointSpec::Latest, &seen, true) {
        Ok(done) => {
            let report = done.report();
            println!("{}", serde_json::to_string_pretty(&report)?);
            let ok = done.sample.failed.is_empty();
            println!(
                "backup verify: {}: restored the point of {} ({} s old) in {:.1} s (RTO); {} audit events and {} resources match the source; {} records opened",
                if ok { "OK" } else { "FAILED" },
                rfc3339(done.point_ms),
                (now_ms() - done.point_ms) / 1000,
                done.rto.as_secs_f64(),
                done.audit_size,
                done.resources,
                done.sample.opened
            );
            Ok(i32::from(!ok))
        }
        Err(e) => {
            println!("backup verify: FAILED: {e:#}");
            Ok(1)
        }
    }
}

fn list_cmd(args: &SourceArgs) -> Result<i32> {
    let scratch = scratch_dir("list", None)?;
    let source = source_from(args, scratch.path())?;
    let target = &*source.target;
    let found = restore::newest_manifest(target, &source.sealer, &source.public)?
        .context("the target holds no manifest: no backup was ever completed there")?;
    let seen = Seen::path(args).map_or(Seen::None, Seen::File);
    let url = target.describe();
    seen.check(&url, &source.deployment.deployment, &found)?;
    seen.record(&url, &source.deployment.deployment, &found)?;
    // (written, not printed: a reader that goes away ends the listing quietly)
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "deployment {} — manifest {} of {}; {} erasures in the ledger",
        source.deployment.deployment,
        found.manifest.seq,
        rfc3339(found.manifest.written_ms),
        found.manifest.erased.len()
    )?;
    for e in restore::summarize(target, &source.sealer, &found)? {
        for (t, audit, resources) in &e.snapshots {
            writeln!(
                out,
                "epoch {:>4}  snapshot  {}  audit events {audit:>9}  resources {resources}",
                e.id,
                rfc3339(*t)
            )?;
        }
        if let Some((n, first, last, audit)) = e.segments {
            writeln!(
                out,
                "epoch {:>4}  {n} points from {} to {} (every shipment; newest: audit events {audit})",
                e.id,
                rfc3339(first),
                rfc3339(last)
            )?;
        }
    }
    Ok(0)
}

fn status_cmd(data_dir: &Path) -> Result<i32> {
    let path = data_dir.join(STATUS_FILE);
    let Some(st) = Status::read(&path)? else {
        println!(
            "no backups: {} has no shipping state (serve --backup-target)",
            data_dir.display()
        );
        return Ok(1);
    };
    let now = now_ms();
    // (written, not printed: a reader that goes away ends it quietly)
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "target:          {}", st.target)?;
    writeln!(
        out,
        "object lock:     {}",
        if st.object_lock { "yes" } else { "no" }
    )?;
    writeln!(
        out,
        "newest point:    {}",
        st.last_point_ms.map_or("none yet".to_owned(), |t| format!(
            "{} ({} s ago), audit events {}",
            rfc3339(t),
            (now - t) / 1000,
            st.last_point_audit_size
        ))
    )?;
    writeln!(
        out,
        "lag:             {} ms waiting now; the newest shipment's oldest commit waited {} ms (at most {} ms since start)",
        st.lag_ms(now),
        st.ship_lag_ms,
        st.max_ship_lag_ms
    )?;
    if let Some(p) = &st.target_problem {
        writeln!(out, "PROBLEM:         {p}")?;
    }
    writeln!(
        out,
        "newest snapshot: {}",
        st.last_snapshot_ms.map_or("none yet".to_owned(), rfc3339)
    )?;
    writeln!(
        out,
        "shipped:         {} segments, {} bytes",
        st.segments_shipped, st.bytes_shipped
    )?;
    if let Some(e) = &st.last_error {
        writeln!(
            out,
            "last error:      {e} ({})",
            st.last_error_ms.map_or(String::new(), rfc3339)
        )?;
    }
    match &st.last_drill {
        Some(d) => writeln!(out, "last drill:      {d}")?,
        None => writeln!(out, "last drill:      none yet")?,
    }
    Ok(0)
}

/// `phivault backup now`: a snapshot of a stopped data directory.
fn backup_now(data_dir: &Path, t: &TargetArgs) -> Result<i32> {
    let d = DataDir::new(data_dir);
    datadir::check_dir_private(data_dir)?;
    let _lock = datadir::lock_for_serving(&d)
        .context("a running server ships its backups continuously; `backup now` is for a stopped data directory")?;
    let (keys, audit) = datadir::load_keys(&d)?;
    let opened = datadir::open_under(DataDir::new(data_dir), keys.clone(), audit)?;
    opened.store.ready().map_err(datadir::refusal)?;
    let target = open_target(&t.target, t.ca_file.as_deref())?;
    let deploy = deploy_for(&d, &keys, t.backup_keys.as_deref())?;
    crate::backup_serve::refuse_target_place(&t.target, &d, deploy.sealer.periods().dir())?;
    let scratch = backup_dir(&d);
    if !scratch.exists() {
        datadir::mkdir_private(&scratch)?;
    }
    let bar = crate::progress::snapshot();
    let pb = bar.clone();
    let started = now_ms();
    let shipper = Shipper::start(
        crate::backup_serve::sqlite_for_backups(&opened.store)?,
        ShipConfig {
            target: target.clone(),
            sealer: deploy.sealer.clone(),
            signer: Arc::new(datadir::audit_signer(&d, &keys)?),
            deployment: deploy.deployment,
            scratch,
            snapshot_every: Duration::from_secs(604_800),
            retention: phivault_backup::retention::Retention::default(),
            status_path: d.root.join(STATUS_FILE),
            instance: crate::backup_serve::instance(&d)?,
            take_over: false,
            progress: Some(Arc::new(move |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })),
        },
    )?;
    let status = shipper.status_handle();
    let outcome = loop {
        std::thread::sleep(Duration::from_millis(50));
        let st = status.lock().clone();
        if st.last_snapshot_ms.is_some_and(|t| t >= started) && !st.snapshot_running {
            break Ok(());
        }
        if let (Some(e), Some(t)) = (&st.last_error, st.last_error_ms)
            && t >= started
        {
            break Err(anyhow::anyhow!("{e}"));
        }
    };
    shipper.stop();
    bar.finish_and_clear();
    opened.store.close();
    outcome?;
    let st = Status::read(&d.root.join(STATUS_FILE))?.unwrap_or_default();
    println!(
        "backed up {} to {}: manifest {}, {} bytes",
        data_dir.display(),
        target.describe(),
        st.manifest_seq,
        st.bytes_shipped
    );
    Ok(0)
}
