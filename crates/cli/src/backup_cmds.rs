//! Backups from the command line and the server (issue 19): a serving data directory
//! ships to its target ([`start`]), watched by a monitor that publishes the state, raises
//! alerts and runs restore drills; `backup now|verify|list|status` and `restore`.
//!
//! A restore ([`restore_into`]) makes a new data directory from the target alone and the
//! key provider: the provider's record comes from `deployment.json`, the master key from
//! the provider, the period keys from where they are kept; then the newest manifest (never
//! one older than this machine has seen), the point, the database rebuilt, and checks — the
//! audit log verified, the whole store against the log and its signed state, the store
//! opened, the counts compared with the point's — and every erasure the manifest's ledger
//! records re-applied. Anything refused leaves no directory behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use phivault_backup::manifest::Deployment;
use phivault_backup::objects::{DEPLOYMENT, Sealer};
use phivault_backup::periods::PeriodStore;
use phivault_backup::restore::{self, Found, PointSpec};
use phivault_backup::ship::{ShipConfig, Shipper, Status};
use phivault_backup::target::Target;
use phivault_backup::{now_ms, rfc3339};
use phivault_crypto::KeyHierarchy;
use phivault_crypto::backup::BackupKeys;
use phivault_store::Store as _;
use phivault_store::sqlite::SqliteStore;

use crate::backup_args::{AtArgs, BackupCmd, Shipping, SourceArgs, TargetArgs};
use crate::datadir::{self, DataDir};

/// The shipping state, relative to the data directory.
const STATUS_FILE: &str = "backup/status.json";
/// Records opened per type by a drill.
const SAMPLE_PER_TYPE: usize = 20;
/// The rule of backup alerts.
const ALERT_RULE: &str = "backup-failing";

fn backup_dir(d: &DataDir) -> PathBuf {
    d.root.join("backup")
}

/// Where the period keys are kept by default: beside the master key file (`file`), else
/// in the configuration directory of the user (`$XDG_CONFIG_HOME/phivault`).
fn default_backup_keys(cfg: &phivault_keys::ProviderConfig) -> Result<PathBuf> {
    let name = format!("{}.backup-keys", cfg.data_dir_id);
    if let phivault_keys::Provider::File { key_file } = &cfg.provider
        && let Some(dir) = key_file.parent()
    {
        return Ok(dir.join(name));
    }
    let key_file = phivault_keys::file::default_key_file(&cfg.data_dir_id)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(key_file.with_file_name(name))
}

/// The data directory's `keys/` files, for `deployment.json` (each is safe in a stolen
/// copy of the directory: invariant 15).
fn key_files(d: &DataDir) -> Result<Vec<(String, String)>> {
    let dir = d.root.join("keys");
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
    {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path())?;
        out.push((
            name,
            base64::engine::general_purpose::STANDARD.encode(bytes),
        ));
    }
    out.sort();
    Ok(out)
}

/// What ships one data directory's backups: its sealer and deployment record.
struct Deploy {
    sealer: Arc<Sealer>,
    deployment: Deployment,
}

fn deploy_for(d: &DataDir, keys: &KeyHierarchy, backup_keys: Option<&Path>) -> Result<Deploy> {
    let cfg = phivault_keys::ProviderConfig::read(&d.root).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = match backup_keys {
        Some(p) => p.to_path_buf(),
        None => default_backup_keys(&cfg)?,
    };
    if phivault_keys::is_inside(&dir, &d.root) {
        bail!(
            "refusing the backup keys directory {}: it is inside the data directory (keys are never kept with the data)",
            dir.display()
        );
    }
    let bkeys = Arc::new(BackupKeys::new(keys));
    let periods = Arc::new(PeriodStore::open(
        &dir,
        &cfg.data_dir_id,
        bkeys.clone(),
        true,
    )?);
    let sealer = Arc::new(Sealer::new(bkeys, periods, &cfg.data_dir_id)?);
    Ok(Deploy {
        sealer,
        deployment: Deployment {
            format: 1,
            deployment: cfg.data_dir_id.clone(),
            key_files: key_files(d)?,
            backup_keys: dir.display().to_string(),
            created_ms: now_ms(),
        },
    })
}

fn open_target(url: &str, ca: Option<&Path>) -> Result<Arc<dyn Target>> {
    Ok(Arc::from(phivault_backup::target::open(url, ca)?))
}

/// A server's shipping: the shipper and its monitor.
pub(crate) struct Running {
    shipper: Option<Shipper>,
    stop: Arc<AtomicBool>,
    monitor: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Ship what is left and stop.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        if let Some(s) = self.shipper.take() {
            s.stop();
        }
    }
}

/// Start shipping the opened data directory's backups (and its monitor).
pub(crate) fn start(
    d: &DataDir,
    keys: &KeyHierarchy,
    store: Arc<SqliteStore>,
    vault: Arc<phivault_records::Vault>,
    s: &Shipping,
) -> Result<Running> {
    let target = open_target(&s.target, s.ca_file.as_deref())?;
    let deploy = deploy_for(d, keys, s.backup_keys.as_deref())?;
    let scratch = backup_dir(d);
    if !scratch.exists() {
        datadir::mkdir_private(&scratch)?;
    }
    let signer = Arc::new(datadir::audit_signer(d, keys)?);
    let public = signer.public_key();
    let shipper = Shipper::start(
        store,
        ShipConfig {
            target: target.clone(),
            sealer: deploy.sealer.clone(),
            signer,
            deployment: deploy.deployment.clone(),
            scratch: scratch.clone(),
            snapshot_every: s.snapshot_every,
            retention: s.retention,
            status_path: d.root.join(STATUS_FILE),
            progress: None,
        },
    )
    .map_err(|e| anyhow::anyhow!("refusing to start: backups: {e}"))?;
    eprintln!(
        "shipping backups to {} (period keys in {})",
        target.describe(),
        deploy.sealer.periods().dir().display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let watch = Monitor {
        status_path: d.root.join(STATUS_FILE),
        target,
        sealer: deploy.sealer,
        deployment: deploy.deployment,
        keys: keys.clone(),
        public,
        scratch,
        drill_every: s.drill_every,
        max_lag: s.max_lag,
        vault,
    };
    let flag = stop.clone();
    let status = shipper.status_handle();
    let monitor = std::thread::Builder::new()
        .name("phivault-backup-monitor".into())
        .spawn(move || watch.run(&flag, &status))?;
    Ok(Running {
        shipper: Some(shipper),
        stop,
        monitor: Some(monitor),
    })
}

/// Publishes the shipping state, raises alerts, runs drills.
struct Monitor {
    status_path: PathBuf,
    target: Arc<dyn Target>,
    sealer: Arc<Sealer>,
    deployment: Deployment,
    keys: KeyHierarchy,
    public: [u8; 32],
    scratch: PathBuf,
    drill_every: Option<Duration>,
    max_lag: Duration,
    vault: Arc<phivault_records::Vault>,
}

/// How often the monitor looks.
const MONITOR_EVERY: Duration = Duration::from_secs(2);

impl Monitor {
    fn run(&self, stop: &AtomicBool, status: &parking_lot::Mutex<Status>) {
        let started = Instant::now();
        let mut last_drill: Option<Instant> = None;
        let mut drill: Option<serde_json::Value> = Status::read(&self.status_path)
            .ok()
            .flatten()
            .and_then(|s| s.last_drill);
        while !stop.load(Ordering::SeqCst) {
            let mut st = status.lock().clone();
            let mut findings = Vec::new();
            let lag = st.lag_ms(now_ms());
            // (one open alert per kind of finding: the text names no changing figure)
            if lag > self.max_lag.as_millis() as u64 {
                findings.push(format!(
                    "backups are behind: commits wait more than {} s to be shipped to {} (see `phivault backup status`)",
                    self.max_lag.as_secs(),
                    st.target,
                ));
            }
            // the first drill once a snapshot exists, then every drill_every
            if let Some(every) = self.drill_every
                && st.last_snapshot_ms.is_some()
                && !st.snapshot_running
                && last_drill.map_or(started.elapsed() >= Duration::from_secs(5), |t| {
                    t.elapsed() >= every
                })
            {
                last_drill = Some(Instant::now());
                let report = self.drill(&st);
                if report.get("ok") != Some(&serde_json::Value::Bool(true)) {
                    findings.push(format!(
                        "the restore drill failed: {}",
                        report
                            .get("error")
                            .and_then(|e| e.as_str())
                            .unwrap_or("see the backup status")
                    ));
                }
                drill = Some(report);
                // (kept with the shipper's state: the status file has it too)
                status.lock().last_drill = drill.clone();
            }
            st.last_drill = drill.clone();
            if let Ok(v) = serde_json::to_value(&st) {
                self.vault.set_backup_status(v);
            }
            if let Err(e) =
                phivault_records::store_check::raise_findings(&self.vault, ALERT_RULE, &findings)
            {
                tracing::warn!(error = %e, "cannot raise a backup alert");
            }
            for f in &findings {
                tracing::error!(finding = %f, "backup");
            }
            let until = Instant::now() + MONITOR_EVERY;
            while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Restore the newest point into a scratch directory and check it.
    fn drill(&self, st: &Status) -> serde_json::Value {
        let dir = self.scratch.join(format!("drill-{}", now_ms()));
        let source = Source {
            target: self.target.clone(),
            sealer: self.sealer.clone(),
            deployment: self.deployment.clone(),
            // the restored copy's KEK generations and seal counts are its own
            keys: self.keys.detached(),
            public: self.public,
        };
        // this server wrote the manifests: none older than its newest may be used
        let seen = Seen::Known(st.manifest_seq);
        let r = restore_into(&source, &dir, PointSpec::Latest, &seen, false);
        let _ = std::fs::remove_dir_all(&dir);
        let mut report = match r {
            Ok(done) => done.report(),
            Err(e) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
        };
        if let Some(obj) = report.as_object_mut() {
            obj.insert("at".into(), serde_json::Value::String(rfc3339(now_ms())));
            obj.insert("rpo_lag_ms".into(), serde_json::json!(st.lag_ms(now_ms())));
        }
        tracing::info!(report = %report, "restore drill");
        report
    }
}

/// Where a restore reads from, with its keys in hand.
struct Source {
    target: Arc<dyn Target>,
    sealer: Arc<Sealer>,
    deployment: Deployment,
    keys: KeyHierarchy,
    public: [u8; 32],
}

/// The newest manifest seen before, by this machine or the server that wrote it.
enum Seen {
    /// Recorded in this file (updated after a success).
    File(PathBuf),
    /// Known (a server's own newest manifest).
    Known(u64),
    None,
}

impl Seen {
    fn path(args: &SourceArgs) -> Option<PathBuf> {
        if let Some(p) = &args.seen_file {
            return Some(p.clone());
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".local/state"))
            })?;
        Some(base.join("phivault/backup-seen.json"))
    }

    fn read_map(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
        match std::fs::read(path) {
            Ok(b) => Ok(serde_json::from_slice(&b)
                .with_context(|| format!("{} is not a seen-manifests file", path.display()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn check(&self, deployment: &str, found: &Found) -> Result<()> {
        match self {
            Seen::None => Ok(()),
            Seen::Known(seq) if found.manifest.seq < *seq => bail!(
                "the target's newest manifest is {}, older than manifest {seq} this server wrote: the target was rolled back or an old manifest replayed",
                found.manifest.seq
            ),
            Seen::Known(_) => Ok(()),
            Seen::File(path) => {
                let map = Self::read_map(path)?;
                let Some(entry) = map.get(deployment) else {
                    return Ok(());
                };
                let seq = entry
                    .get("seq")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                let digest = entry.get("digest").and_then(|d| d.as_str()).unwrap_or("");
                Ok(restore::check_seen(found, Some((seq, digest)))?)
            }
        }
    }

    fn record(&self, deployment: &str, found: &Found) -> Result<()> {
        let Seen::File(path) = self else {
            return Ok(());
        };
        let mut map = Self::read_map(path)?;
        map.insert(
            deployment.to_owned(),
            serde_json::json!({ "seq": found.manifest.seq, "digest": found.digest }),
        );
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let tmp = path.with_extension("tmp");
        phivault_crypto::write_private_file(&tmp, &serde_json::to_vec_pretty(&map)?)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// What a restore did and found.
struct Restored {
    point_ms: i64,
    epoch: u64,
    audit_size: u64,
    resources: u64,
    manifest: u64,
    fetched_bytes: u64,
    segments: u64,
    reapplied: Vec<String>,
    sample: phivault_records::drill::Sample,
    audit_summary: String,
    rto: Duration,
}

impl Restored {
    fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.sample.failed.is_empty(),
            "point": rfc3339(self.point_ms),
            "point_ms": self.point_ms,
            "epoch": self.epoch,
            "manifest": self.manifest,
            "audit_events": self.audit_size,
            "resources": self.resources,
            "segments_applied": self.segments,
            "bytes_fetched": self.fetched_bytes,
            "erasures_reapplied": self.reapplied.len(),
            "records_opened": self.sample.opened,
            "records_erased": self.sample.erased,
            "records_failed": self.sample.failed,
            "rto_seconds": self.rto.as_secs_f64(),
            "age_seconds": (now_ms() - self.point_ms) / 1000,
        })
    }
}

/// Write the deployment record's key files into `dir/keys`.
fn write_key_files(dir: &Path, deployment: &Deployment) -> Result<()> {
    let keys = dir.join("keys");
    if !keys.exists() {
        datadir::mkdir_private(&keys)?;
    }
    for (name, b64) in &deployment.key_files {
        if name.contains('/') || name.starts_with('.') || name.is_empty() {
            bail!(
                "deployment.json names a key file {name:?} that is not a plain file name: refusing it"
            );
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .context("deployment.json holds a key file that is not base64")?;
        phivault_crypto::write_private_file(&keys.join(name), &bytes)?;
    }
    Ok(())
}

/// Restore `spec` into the new directory `to` (made here; removed again on failure).
fn restore_into(
    source: &Source,
    to: &Path,
    spec: PointSpec,
    seen: &Seen,
    show: bool,
) -> Result<Restored> {
    if to.exists() {
        bail!(
            "{} already exists: a restore makes a new data directory",
            to.display()
        );
    }
    if let Some(parent) = to.parent()
        && !parent.as_os_str().is_empty()
        && !parent.is_dir()
    {
        bail!("{} does not exist (a mistyped path?)", parent.display());
    }
    datadir::mkdir_private(to)?;
    let r = restore_steps(source, to, spec, seen, show);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(to);
    }
    r
}

fn restore_steps(
    source: &Source,
    to: &Path,
    spec: PointSpec,
    seen: &Seen,
    show: bool,
) -> Result<Restored> {
    let started = Instant::now();
    let d = DataDir::new(to);
    write_key_files(to, &source.deployment)?;
    datadir::mkdir_private(&to.join("tls"))?;
    let target = &*source.target;
    let sealer = &*source.sealer;
    let found = restore::newest_manifest(target, sealer, &source.public)?
        .context("the target holds no manifest: no backup was ever completed there")?;
    seen.check(&source.deployment.deployment, &found)?;
    let point = restore::choose(target, sealer, &found, spec)?;
    let bar = crate::progress::restore(show);
    let rebuilt = restore::rebuild(target, sealer, &point, &d.db(), &mut |what, done, total| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(what.to_owned());
    })?;
    bar.finish_and_clear();
    datadir::write_dev_tls(&d)?;
    // the audit log, then the whole store against the log and its signed state
    let audit_summary = match crate::audit_cmds::check_audit_log(to, None, &source.public)? {
        Ok(s) => s,
        Err(f) => bail!("the restored audit log does not verify: {f}"),
    };
    let integrity =
        datadir::store_keys(&source.keys, datadir::audit_signer(&d, &source.keys)?).integrity;
    let report = phivault_store::sqlite::verify::verify_file(&d.db(), &integrity, &source.public)
        .map_err(|e| anyhow::anyhow!("the restored store cannot be verified: {e}"))?;
    if let Some(first) = report.discrepancies.first() {
        bail!(
            "the restored store does not verify ({} discrepancies), first: {first}",
            report.discrepancies.len()
        );
    }
    let audit = datadir::audit_signer(&d, &source.keys)?;
    let opened = datadir::open_under(DataDir::new(to), source.keys.clone(), audit)?;
    opened.store.ready().map_err(datadir::refusal)?;
    let events = opened.store.audit_head()?.map_or(0, |h| h.size);
    let resources = opened.store.resource_heads()?;
    if events != point.audit_size || resources != point.resources {
        opened.store.close();
        bail!(
            "the restored store differs from the source at that point: {events} audit events and {resources} resources, where the source had {} and {}",
            point.audit_size,
            point.resources
        );
    }
    let store: Arc<dyn phivault_store::Store> = opened.store.clone();
    let engine = phivault_records::Engine::new(store, source.keys.clone());
    let ledger = &found.manifest.erased;
    let missing = engine
        .missing_erasures(&|kid| ledger.contains(&sealer.keys().ledger_tag(kid)))
        .map_err(|e| anyhow::anyhow!("the erasure ledger cannot be applied: {e}"))?;
    for patient in &missing {
        crate::patient_cmds::erase_with(
            &engine,
            patient,
            "re-applied at restore: erased after this backup point",
        )
        .map_err(|e| anyhow::anyhow!("an erasure could not be re-applied: {e}"))?;
    }
    let sample = engine
        .sample_records(SAMPLE_PER_TYPE)
        .map_err(|e| anyhow::anyhow!("the restored records cannot be read: {e}"))?;
    drop(engine);
    opened.store.close();
    seen.record(&source.deployment.deployment, &found)?;
    Ok(Restored {
        point_ms: point.time_ms,
        epoch: point.epoch,
        audit_size: point.audit_size,
        resources: point.resources,
        manifest: found.manifest.seq,
        fetched_bytes: rebuilt.fetched_bytes,
        segments: rebuilt.segments,
        reapplied: missing,
        sample,
        audit_summary,
        rto: started.elapsed(),
    })
}

/// Read `deployment.json`, unlock the master key through its provider (into `dir/keys`),
/// and open the period keys.
fn source_from(args: &SourceArgs, dir: &Path) -> Result<Source> {
    let t = &args.target;
    let target = open_target(&t.target, t.ca_file.as_deref())?;
    let bytes = target.get(DEPLOYMENT)?.with_context(|| {
        format!(
            "{} holds no phivault backups ({DEPLOYMENT} is missing)",
            target.describe()
        )
    })?;
    let deployment: Deployment = serde_json::from_slice(&bytes)
        .with_context(|| format!("{DEPLOYMENT} in {} is malformed", target.describe()))?;
    write_key_files(dir, &deployment)?;
    if let Some(key_file) = &args.key_file {
        let mut cfg =
            phivault_keys::ProviderConfig::read(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        match &mut cfg.provider {
            phivault_keys::Provider::File { key_file: k } => *k = key_file.clone(),
            other => bail!(
                "--key-file is for a `file` key provider; the source uses {}",
                other.name()
            ),
        }
        phivault_crypto::write_private_file(
            &phivault_keys::ProviderConfig::path(dir),
            &serde_json::to_vec_pretty(&cfg)?,
        )?;
    }
    let cfg = phivault_keys::ProviderConfig::read(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    if cfg.data_dir_id != deployment.deployment {
        bail!("{DEPLOYMENT} is inconsistent: its provider record is another deployment's");
    }
    let master = datadir::load_master(&DataDir::new(dir))?;
    let keys = KeyHierarchy::new(&master);
    drop(master);
    let public = datadir::audit_signer(&DataDir::new(dir), &keys)?.public_key();
    let dir_keys = match &t.backup_keys {
        Some(p) => p.clone(),
        None => PathBuf::from(&deployment.backup_keys),
    };
    let bkeys = Arc::new(BackupKeys::new(&keys));
    let periods = Arc::new(PeriodStore::open(
        &dir_keys,
        &deployment.deployment,
        bkeys.clone(),
        false,
    )?);
    let sealer = Arc::new(Sealer::new(bkeys, periods, &deployment.deployment)?);
    Ok(Source {
        target,
        sealer,
        deployment,
        keys,
        public,
    })
}

fn parse_at(at: &AtArgs) -> Result<PointSpec> {
    if let Some(t) = &at.at {
        let when = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .with_context(|| {
            format!("--at {t:?} is not an RFC 3339 time (2026-12-06T10:00:00Z)")
        })?;
        let ms = i64::try_from(when.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        return Ok(PointSpec::AtTime(ms));
    }
    if let Some(n) = at.at_audit_seq {
        return Ok(PointSpec::AtAuditSize(n));
    }
    Ok(PointSpec::Latest)
}

/// A private scratch directory (0700, removed when dropped), under `parent` or the
/// system's temporary directory.
fn scratch_dir(what: &str, parent: Option<&Path>) -> Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    let prefix = format!("phivault-{what}-");
    b.prefix(&prefix);
    match parent {
        Some(p) => b.tempdir_in(p),
        None => b.tempdir(),
    }
    .context("cannot make a scratch directory")
}

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
        "restored {} as of {} (manifest {}, epoch {}): {} audit events, {} resources; {} segments applied, {} bytes fetched in {:.1} s",
        to.display(),
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
    seen.check(&source.deployment.deployment, &found)?;
    seen.record(&source.deployment.deployment, &found)?;
    println!(
        "deployment {} — manifest {} of {}; {} erasures in the ledger",
        source.deployment.deployment,
        found.manifest.seq,
        rfc3339(found.manifest.written_ms),
        found.manifest.erased.len()
    );
    for e in restore::summarize(target, &source.sealer, &found)? {
        for (t, audit, resources) in &e.snapshots {
            println!(
                "epoch {:>4}  snapshot  {}  audit events {audit:>9}  resources {resources}",
                e.id,
                rfc3339(*t)
            );
        }
        if let Some((n, first, last, audit)) = e.segments {
            println!(
                "epoch {:>4}  {n} points from {} to {} (every shipment; newest: audit events {audit})",
                e.id,
                rfc3339(first),
                rfc3339(last)
            );
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
    println!("target:          {}", st.target);
    println!(
        "object lock:     {}",
        if st.object_lock { "yes" } else { "no" }
    );
    println!(
        "newest point:    {}",
        st.last_point_ms.map_or("none yet".to_owned(), |t| format!(
            "{} ({} s ago), audit events {}",
            rfc3339(t),
            (now - t) / 1000,
            st.last_point_audit_size
        ))
    );
    println!("lag:             {} ms", st.lag_ms(now));
    println!(
        "newest snapshot: {}",
        st.last_snapshot_ms.map_or("none yet".to_owned(), rfc3339)
    );
    println!(
        "shipped:         {} segments, {} bytes",
        st.segments_shipped, st.bytes_shipped
    );
    if let Some(e) = &st.last_error {
        println!(
            "last error:      {e} ({})",
            st.last_error_ms.map_or(String::new(), rfc3339)
        );
    }
    match &st.last_drill {
        Some(d) => println!("last drill:      {d}"),
        None => println!("last drill:      none yet"),
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
    let scratch = backup_dir(&d);
    if !scratch.exists() {
        datadir::mkdir_private(&scratch)?;
    }
    let bar = crate::progress::snapshot();
    let pb = bar.clone();
    let started = now_ms();
    let shipper = Shipper::start(
        opened.store.clone(),
        ShipConfig {
            target: target.clone(),
            sealer: deploy.sealer.clone(),
            signer: Arc::new(datadir::audit_signer(&d, &keys)?),
            deployment: deploy.deployment,
            scratch,
            snapshot_every: Duration::from_secs(604_800),
            retention: phivault_backup::retention::Retention::default(),
            status_path: d.root.join(STATUS_FILE),
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
