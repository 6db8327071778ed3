//! A restore (issue 19): a new data directory from the target and the key provider alone
//! ([`restore_into`]). The provider's record comes from `deployment.json`, the master key
//! from the provider, the period keys from where they are kept; then the newest manifest
//! (never one older than this machine has seen), the point, the database rebuilt, and the
//! checks — the audit log verified, the whole store against the log and its signed state,
//! the store opened, the counts compared with the point's — and every erasure the
//! manifest's ledger records re-applied. Anything refused leaves no directory behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use phivault_backup::manifest::Deployment;
use phivault_backup::objects::{DEPLOYMENT, Sealer};
use phivault_backup::periods::PeriodStore;
use phivault_backup::restore::{self, Found, PointSpec};
use phivault_backup::target::Target;
use phivault_backup::{now_ms, rfc3339};
use phivault_crypto::KeyHierarchy;
use phivault_crypto::backup::BackupKeys;
use phivault_store::Store as _;

use crate::backup_args::{AtArgs, SourceArgs};
use crate::backup_serve::open_target;
use crate::datadir::{self, DataDir};

/// Records opened per type by a drill.
const SAMPLE_PER_TYPE: usize = 20;

/// Where a restore reads from, with its keys in hand.
pub(crate) struct Source {
    pub(crate) target: Arc<dyn Target>,
    pub(crate) sealer: Arc<Sealer>,
    pub(crate) deployment: Deployment,
    pub(crate) keys: KeyHierarchy,
    pub(crate) public: [u8; 32],
}

/// The newest manifest seen before, by this machine or the server that wrote it.
pub(crate) enum Seen {
    /// Recorded in this file (updated after a success).
    File(PathBuf),
    /// Known (a server's own newest manifest).
    Known(u64),
    None,
}

impl Seen {
    pub(crate) fn path(args: &SourceArgs) -> Option<PathBuf> {
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

    pub(crate) fn check(&self, target: &str, deployment: &str, found: &Found) -> Result<()> {
        match self {
            Seen::None => Ok(()),
            Seen::Known(seq) if found.manifest.seq < *seq => bail!(
                "the target's newest manifest is {}, older than manifest {seq} this server wrote: the target was rolled back or an old manifest replayed",
                found.manifest.seq
            ),
            Seen::Known(_) => Ok(()),
            Seen::File(path) => {
                let map = Self::read_map(path)?;
                // a target holds one deployment's backups: another's there is a swap
                if let Some(before) = map
                    .get(TARGETS)
                    .and_then(|t| t.get(target))
                    .and_then(|d| d.as_str())
                    && before != deployment
                {
                    bail!(
                        "{target} held the backups of deployment {before} when last seen here; it now holds {deployment}'s: refusing a swapped target (another --seen-file if this is meant)"
                    );
                }
                let Some(entry) = map.get(deployment) else {
                    return Ok(());
                };
                let seq = entry
                    .get("seq")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                let digest = entry.get("digest").and_then(|d| d.as_str()).unwrap_or("");
                Ok(restore::check_seen(
                    found,
                    Some((seq, digest)),
                    "seen here before",
                )?)
            }
        }
    }

    pub(crate) fn record(&self, target: &str, deployment: &str, found: &Found) -> Result<()> {
        let Seen::File(path) = self else {
            return Ok(());
        };
        let mut map = Self::read_map(path)?;
        map.insert(
            deployment.to_owned(),
            serde_json::json!({ "seq": found.manifest.seq, "digest": found.digest }),
        );
        let targets = map.entry(TARGETS).or_insert_with(|| serde_json::json!({}));
        if let Some(t) = targets.as_object_mut() {
            t.insert(target.to_owned(), serde_json::json!(deployment));
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let tmp = path.with_extension("tmp");
        phivault_crypto::write_private_file(&tmp, &serde_json::to_vec_pretty(&map)?)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// The seen file's map of target URL → deployment.
const TARGETS: &str = "_targets";

/// What a restore did and found.
pub(crate) struct Restored {
    pub(crate) point_ms: i64,
    pub(crate) epoch: u64,
    pub(crate) audit_size: u64,
    pub(crate) resources: u64,
    pub(crate) manifest: u64,
    pub(crate) fetched_bytes: u64,
    pub(crate) segments: u64,
    pub(crate) reapplied: Vec<String>,
    pub(crate) sample: phivault_records::drill::Sample,
    pub(crate) audit_summary: String,
    pub(crate) rto: Duration,
}

impl Restored {
    pub(crate) fn report(&self) -> serde_json::Value {
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

/// Remove what interrupted restores to `to` left (`.NAME.restoring-PID` of a process that
/// is gone).
fn remove_interrupted(to: &Path, name: &str) {
    let Some(parent) = to.parent() else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!(".{name}.restoring-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = file.strip_prefix(&prefix)
            && pid.parse::<u32>().is_ok()
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Restore `spec` into the new directory `to` (made here; removed again on failure).
pub(crate) fn restore_into(
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
    if let Some(local) = source.target.describe().strip_prefix("file://")
        && phivault_keys::is_inside(&std::path::absolute(to)?, Path::new(local))
    {
        bail!(
            "refusing to restore into {}: it is inside the backup target",
            to.display()
        );
    }
    // made under a temporary name beside it and renamed once complete: an interrupted
    // restore leaves no directory that looks like a data directory
    let name = to
        .file_name()
        .with_context(|| format!("{} names no directory", to.display()))?
        .to_string_lossy()
        .into_owned();
    let work = to.with_file_name(format!(".{name}.restoring-{}", std::process::id()));
    remove_interrupted(to, &name);
    let _ = std::fs::remove_dir_all(&work);
    datadir::mkdir_private(&work)?;
    let r = restore_steps(source, &work, spec, seen, show).and_then(|done| {
        std::fs::rename(&work, to)
            .with_context(|| format!("cannot move the restored directory to {}", to.display()))?;
        Ok(done)
    });
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&work);
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
    let url = target.describe();
    seen.check(&url, &source.deployment.deployment, &found)?;
    // the newest manifest the server recorded beside the period keys, wherever this runs
    let mark = sealer.periods().recorded_manifest(&target.describe())?;
    restore::check_seen(
        &found,
        mark.as_ref().map(|(s, d)| (*s, d.as_str())),
        "recorded with the period keys",
    )?;
    let point = restore::choose(target, sealer, &found, spec)?;
    let bar = crate::progress::restore(show);
    let rebuilt = restore::rebuild(target, sealer, &point, &d.db(), &mut |what, done, total| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(what.to_owned());
    })?;
    bar.finish_and_clear();
    datadir::write_dev_tls(&d)?;
    let (audit_summary, opened) = check_restored(source, to, &point)?;
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
    seen.record(&url, &source.deployment.deployment, &found)?;
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

/// A rebuilt directory checked: its audit log, the whole store against the log and its
/// signed state, the store opened as `serve` opens it, its counts against the point's.
fn check_restored(
    source: &Source,
    to: &Path,
    point: &restore::Point,
) -> Result<(String, datadir::Opened)> {
    let d = DataDir::new(to);
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
    let opened = datadir::open_under(d, source.keys.clone(), audit)?;
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
    Ok((audit_summary, opened))
}

/// Read `deployment.json`, unlock the master key through its provider (into `dir/keys`),
/// and open the period keys.
pub(crate) fn source_from(args: &SourceArgs, dir: &Path) -> Result<Source> {
    let t = &args.target;
    let target = open_target(&t.target, t.ca_file.as_deref())?;
    // (a versioned bucket keeps a deleted record's locked versions: the newest serves)
    let kept = match target.get(DEPLOYMENT)? {
        Some(b) => Some(b),
        None => target.versions(DEPLOYMENT)?.into_iter().next(),
    };
    let bytes = kept.with_context(|| {
        format!(
            "{} holds no phivault backups ({DEPLOYMENT} is missing)",
            target.describe()
        )
    })?;
    let mut deployment: Deployment = serde_json::from_slice(&bytes)
        .with_context(|| format!("{DEPLOYMENT} in {} is malformed", target.describe()))?;
    if deployment.format != 1 {
        bail!(
            "{DEPLOYMENT} in {} has format {}, which this version does not read",
            target.describe(),
            deployment.format
        );
    }
    write_key_files(dir, &deployment)?;
    if let Some(key_file) = &args.key_file {
        let mut cfg =
            phivault_keys::ProviderConfig::read(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        let key_file = std::path::absolute(key_file)
            .with_context(|| format!("--key-file {}", key_file.display()))?;
        match &mut cfg.provider {
            phivault_keys::Provider::File { key_file: k } => *k = key_file,
            other => bail!(
                "--key-file is for a `file` key provider; the source uses {}",
                other.name()
            ),
        }
        // (the record from the target is replaced by this one, naming the given file)
        let path = phivault_keys::ProviderConfig::path(dir);
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        let json = serde_json::to_vec_pretty(&cfg)?;
        phivault_crypto::write_private_file(&path, &json)?;
        // (and the restored directory records it too)
        let rel = phivault_keys::config::PROVIDER_JSON.trim_start_matches("keys/");
        for (name, b64) in &mut deployment.key_files {
            if name == rel {
                *b64 = base64::engine::general_purpose::STANDARD.encode(&json);
            }
        }
    }
    let cfg = phivault_keys::ProviderConfig::read(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    if cfg.data_dir_id != deployment.deployment {
        bail!("{DEPLOYMENT} is inconsistent: its provider record is another deployment's");
    }
    let dir_keys = match &t.backup_keys {
        Some(p) => p.clone(),
        None => PathBuf::from(&deployment.backup_keys),
    };
    // the target's record says where the keys are: never where whoever writes the target
    // could have put keys of their own
    if let Some(local) = t.target.strip_prefix("file://") {
        let mut places = vec![("the period keys directory", dir_keys.clone())];
        if let phivault_keys::Provider::File { key_file } = &cfg.provider {
            places.push(("the master key file", key_file.clone()));
        }
        for (what, place) in places {
            if phivault_keys::is_inside(&place, Path::new(local)) {
                bail!(
                    "refusing {what} {}: it is inside the backup target, where whoever writes the target could have put a key of their own",
                    place.display()
                );
            }
        }
    }
    let master = datadir::load_master(&DataDir::new(dir))?;
    let keys = KeyHierarchy::new(&master);
    drop(master);
    let public = datadir::audit_signer(&DataDir::new(dir), &keys)?.public_key();
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

pub(crate) fn parse_at(at: &AtArgs) -> Result<PointSpec> {
    if let Some(t) = &at.at {
        let when = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map_err(|_| {
            anyhow::anyhow!("--at {t:?} is not an RFC 3339 time (2026-12-06T10:00:00Z)")
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
pub(crate) fn scratch_dir(what: &str, parent: Option<&Path>) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut b = tempfile::Builder::new();
    let prefix = format!("phivault-{what}-");
    b.prefix(&prefix)
        .permissions(std::fs::Permissions::from_mode(0o700));
    match parent {
        Some(p) => b.tempdir_in(p),
        None => b.tempdir(),
    }
    .context("cannot make a scratch directory")
}
