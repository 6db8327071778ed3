//! The command line of backups: `serve --backup-target …`, `backup now|verify|list|status`
//! and `restore`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, ensure};
use clap::Subcommand;
use phivault_backup::retention::Retention;

/// Where backups go and the keys that open them (every backup command).
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX?endpoint=https://HOST:PORT&region=REGION
    /// (credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, else ~/.aws/credentials).
    #[arg(long = "target")]
    pub target: String,
    /// PEM CA certificates to trust for the S3 endpoint (a private CA).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The directory of the period keys (kept with the key provider, never with the data
    /// or the backups). Default: as recorded in the target.
    #[arg(long)]
    pub backup_keys: Option<PathBuf>,
}

/// Restore and drill options: which key file, what this machine has seen.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The master key file (a `file` provider) if not where the source kept it.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The newest manifest this machine has seen, per deployment (a restore refuses an
    /// older one). Default: $XDG_STATE_HOME/phivault/backup-seen.json (else
    /// ~/.local/state/phivault/backup-seen.json).
    #[arg(long)]
    pub seen_file: Option<PathBuf>,
}

/// `phivault backup …`
#[derive(Subcommand)]
pub enum BackupCmd {
    /// Take a snapshot of a stopped data directory to the target now (a running server
    /// ships continuously instead).
    Now {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Restore drill: restore the newest point into a scratch directory, verify it, open a
    /// sample of records, compare the counts with the source's, report RTO and RPO; exit 1
    /// if anything failed.
    Verify {
        #[command(flatten)]
        source: SourceArgs,
        /// The scratch directory's parent (default: the system's temporary directory).
        #[arg(long)]
        scratch: Option<PathBuf>,
    },
    /// List the restore points.
    List {
        #[command(flatten)]
        source: SourceArgs,
    },
    /// The running (or last) server's shipping state: newest point, lag, last drill.
    Status {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// How a server ships backups (`serve --backup-target`).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeBackupArgs {
    /// Ship backups continuously to this target (file:///ABS/PATH or
    /// s3://BUCKET/PREFIX?endpoint=…&region=…).
    #[arg(long)]
    pub backup_target: Option<String>,
    /// PEM CA certificates to trust for the S3 endpoint.
    #[arg(long)]
    pub backup_ca_file: Option<PathBuf>,
    /// The directory of the period keys (outside the data directory; default: beside the
    /// master key file, else $XDG_CONFIG_HOME/phivault/ID.backup-keys).
    #[arg(long)]
    pub backup_keys: Option<PathBuf>,
    /// A snapshot every this many seconds (60 – 604800).
    #[arg(long, default_value_t = 21_600)]
    pub snapshot_every: u64,
    /// A restore drill every this many seconds (0: none; else 60 – 2592000).
    #[arg(long, default_value_t = 86_400)]
    pub drill_every: u64,
    /// Alert when commits wait longer than this many seconds to be shipped (1 – 86400).
    #[arg(long, default_value_t = 60)]
    pub backup_max_lag: u64,
    /// Keep every restore point of this many days (1 – 3650).
    #[arg(long, default_value_t = 7)]
    pub backup_pitr_days: u32,
    /// Keep the newest point of each of this many days.
    #[arg(long, default_value_t = 30)]
    pub backup_keep_daily: u32,
    /// Keep the newest point of each of this many months.
    #[arg(long, default_value_t = 12)]
    pub backup_keep_monthly: u32,
    /// Object Lock retention (compliance mode) of every object, in days, when the bucket
    /// has Object Lock (1 – 3650).
    #[arg(long, default_value_t = 30)]
    pub backup_lock_days: u32,
    /// Continue a target whose manifests another copy of this deployment wrote (a restored
    /// copy taking the place of an original that is gone).
    #[arg(long)]
    pub backup_take_over: bool,
}

/// Checked shipping settings.
#[derive(Debug, Clone)]
pub struct Shipping {
    pub target: String,
    pub ca_file: Option<PathBuf>,
    pub backup_keys: Option<PathBuf>,
    pub snapshot_every: Duration,
    pub drill_every: Option<Duration>,
    pub max_lag: Duration,
    pub retention: Retention,
    pub take_over: bool,
}

impl ServeBackupArgs {
    /// Checked for serving `data_dir` (before anything is made there).
    pub fn check(self, data_dir: &std::path::Path) -> Result<Option<Shipping>> {
        let Some(target) = self.backup_target else {
            return Ok(None);
        };
        // a file target apart from the data and from where keys are kept by default
        // (checked again, with the actual key places, once the directory is open)
        if let Some(path) = target.strip_prefix("file://") {
            let target_path = std::path::absolute(path)?;
            let data = std::path::absolute(data_dir)?;
            let mut apart = vec![("the data directory", data)];
            if let Some(base) = std::env::var_os("XDG_CONFIG_HOME")
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .filter(|v| !v.is_empty())
                        .map(|h| std::path::PathBuf::from(h).join(".config"))
                })
            {
                apart.push(("the directory of the keys", base.join("phivault")));
            }
            for (what, place) in apart {
                if phivault_keys::is_inside(&target_path, &place)
                    || phivault_keys::is_inside(&place, &target_path)
                {
                    anyhow::bail!(
                        "refusing to start: the backup target {} overlaps {what} ({}); backups go to another volume, apart from the keys and the data",
                        target_path.display(),
                        place.display()
                    );
                }
            }
        }
        // a target that cannot even be opened is refused before anything is made
        phivault_backup::target::open(&target, self.backup_ca_file.as_deref())
            .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
        ensure!(
            (60..=604_800).contains(&self.snapshot_every),
            "refusing to start: --snapshot-every is 60 to 604800 seconds"
        );
        ensure!(
            self.drill_every == 0 || (60..=2_592_000).contains(&self.drill_every),
            "refusing to start: --drill-every is 0 or 60 to 2592000 seconds"
        );
        ensure!(
            (1..=86_400).contains(&self.backup_max_lag),
            "refusing to start: --backup-max-lag is 1 to 86400 seconds"
        );
        ensure!(
            (1..=3650).contains(&self.backup_pitr_days)
                && (1..=3650).contains(&self.backup_lock_days),
            "refusing to start: --backup-pitr-days and --backup-lock-days are 1 to 3650"
        );
        Ok(Some(Shipping {
            target,
            ca_file: self.backup_ca_file,
            backup_keys: self.backup_keys,
            snapshot_every: Duration::from_secs(self.snapshot_every),
            drill_every: (self.drill_every > 0).then(|| Duration::from_secs(self.drill_every)),
            max_lag: Duration::from_secs(self.backup_max_lag),
            retention: Retention {
                pitr_days: self.backup_pitr_days,
                daily: self.backup_keep_daily,
                monthly: self.backup_keep_monthly,
                lock_days: self.backup_lock_days,
            },
            take_over: self.backup_take_over,
        }))
    }
}

/// `phivault restore` — which point.
#[derive(clap::Args, Debug, Clone)]
#[group(required = false, multiple = false)]
pub struct AtArgs {
    /// The newest point at or before this time (RFC 3339, e.g. 2026-12-06T10:00:00Z).
    #[arg(long)]
    pub at: Option<String>,
    /// The newest point whose audit log ends at or before this event (its sequence
    /// number, as `audit report` shows).
    #[arg(long)]
    pub at_audit_seq: Option<u64>,
}
