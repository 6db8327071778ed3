//! A serving data directory's backups (issue 19): the shipper started with the server
//! ([`start`]) and a monitor beside it that publishes the state (`GET /admin/backup`,
//! `phivault backup status`), raises `backup-failing` alerts (lag, a failed drill) and
//! drills a restore of the newest point every `--drill-every`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use phivault_backup::manifest::Deployment;
use phivault_backup::objects::Sealer;
use phivault_backup::periods::PeriodStore;
use phivault_backup::restore::PointSpec;
use phivault_backup::ship::{ShipConfig, Shipper, Status};
use phivault_backup::target::Target;
use phivault_backup::{now_ms, rfc3339};
use phivault_crypto::KeyHierarchy;
use phivault_crypto::backup::BackupKeys;
use phivault_store::AnyStore;
use phivault_store::sqlite::SqliteStore;

use crate::backup_args::Shipping;
use crate::backup_restore::{Seen, Source, restore_into};
use crate::datadir::{self, DataDir};

/// The shipping state, relative to the data directory.
pub(crate) const STATUS_FILE: &str = "backup/status.json";
/// The rule of backup alerts.
const ALERT_RULE: &str = "backup-failing";

pub(crate) fn backup_dir(d: &DataDir) -> PathBuf {
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
pub(crate) struct Deploy {
    pub(crate) sealer: Arc<Sealer>,
    pub(crate) deployment: Deployment,
}

pub(crate) fn deploy_for(
    d: &DataDir,
    keys: &KeyHierarchy,
    backup_keys: Option<&Path>,
) -> Result<Deploy> {
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

pub(crate) fn open_target(url: &str, ca: Option<&Path>) -> Result<Arc<dyn Target>> {
    Ok(Arc::from(phivault_backup::target::open(url, ca)?))
}

/// This data directory's backup instance id (`DIR/backup/instance`, made at its first
/// shipment): a restored copy, which has none yet, is another instance.
pub(crate) fn instance(d: &DataDir) -> Result<String> {
    let path = backup_dir(d).join("instance");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() == 32 => return Ok(s.trim().to_owned()),
        Ok(_) => bail!("{} is not an instance id", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let id = phivault_keys::new_data_dir_id().map_err(|e| anyhow::anyhow!("{e}"))?;
    phivault_crypto::write_private_file(&path, id.as_bytes())?;
    Ok(id)
}

/// Refuse a `file://` target where backups would sit with what opens them or what they
/// back up: inside the data directory, the period keys directory, or the directory of the
/// master key file.
pub(crate) fn refuse_target_place(url: &str, d: &DataDir, backup_keys: &Path) -> Result<()> {
    let Some(path) = url.strip_prefix("file://") else {
        return Ok(());
    };
    let target = Path::new(path);
    let mut keep_apart = vec![
        ("the data directory", d.root.clone()),
        ("the period keys directory", backup_keys.to_path_buf()),
    ];
    if let Ok(cfg) = phivault_keys::ProviderConfig::read(&d.root)
        && let phivault_keys::Provider::File { key_file } = &cfg.provider
        && let Some(dir) = key_file.parent()
    {
        keep_apart.push(("the master key's directory", dir.to_path_buf()));
    }
    for (what, place) in keep_apart {
        if phivault_keys::is_inside(target, &place) || phivault_keys::is_inside(&place, target) {
            bail!(
                "refusing the backup target {}: it overlaps {what} ({}); backups go to another volume, apart from the keys and the data",
                target.display(),
                place.display()
            );
        }
    }
    Ok(())
}

/// Remove what a run that died left in the scratch directory: a snapshot's copy, a
/// drill's restored directory.
fn clear_scratch(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with("drill-") {
            let _ = std::fs::remove_dir_all(&path);
        } else if name.starts_with("snapshot-") && name.ends_with(".db") {
            let _ = std::fs::remove_file(&path);
        }
    }
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

/// The embedded engine, whose write-ahead log backups ship from; a PostgreSQL store is
/// refused with what to use instead.
pub(crate) fn sqlite_for_backups(store: &AnyStore) -> Result<Arc<SqliteStore>> {
    store.sqlite().cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "phivault's encrypted backups ship from the embedded SQLite engine's write-ahead log; a PostgreSQL store is backed up with PostgreSQL's own tools (pg_basebackup and WAL archiving to encrypted storage) — its rows are ciphertext and blind tokens only"
        )
    })
}

/// Start shipping the opened data directory's backups (and its monitor).
pub(crate) fn start(
    d: &DataDir,
    keys: &KeyHierarchy,
    store: Arc<AnyStore>,
    vault: Arc<phivault_records::Vault>,
    s: &Shipping,
) -> Result<Running> {
    let store = sqlite_for_backups(&store)?;
    let target = open_target(&s.target, s.ca_file.as_deref())?;
    let deploy = deploy_for(d, keys, s.backup_keys.as_deref())?;
    refuse_target_place(&s.target, d, deploy.sealer.periods().dir())?;
    let scratch = backup_dir(d);
    if !scratch.exists() {
        datadir::mkdir_private(&scratch)?;
    }
    clear_scratch(&scratch);
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
            instance: instance(d)?,
            take_over: s.take_over,
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
            if let Some(p) = &st.target_problem {
                findings.push(format!("backups: {p} ({})", st.target));
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
        // the period keys read afresh from their directory, as a restore reads them: a
        // drill must fail when a restore would
        let sealer = PeriodStore::open(
            self.sealer.periods().dir(),
            &self.deployment.deployment,
            Arc::new(BackupKeys::new(&self.keys)),
            false,
        )
        .and_then(|p| {
            Sealer::new(
                Arc::new(BackupKeys::new(&self.keys)),
                Arc::new(p),
                &self.deployment.deployment,
            )
        });
        let sealer = match sealer {
            Ok(s) => Arc::new(s),
            Err(e) => return serde_json::json!({ "ok": false, "error": e.to_string() }),
        };
        let source = Source {
            target: self.target.clone(),
            sealer,
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
            // the recovery point: how long commits wait to reach the target
            let rpo = st.lag_ms(now_ms()).max(st.ship_lag_ms);
            obj.insert("rpo_ms".into(), serde_json::json!(rpo));
        }
        tracing::info!(report = %report, "restore drill");
        report
    }
}
