//! The period keys' store: one file a month (`YYYY-MM.key`, the key wrapped under the
//! master key's period-wrap key), in a directory kept with the key provider — never in the
//! data directory, never in the target. Destroying a month's file (overwritten, synced,
//! unlinked) makes every object sealed in that month unopenable, whoever holds the master
//! key and a copy of the bucket.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use phivault_crypto::backup::{BackupKeys, PeriodKey, valid_period};

use crate::BackupError;

/// The period keys of one deployment.
pub struct PeriodStore {
    dir: PathBuf,
    deployment: String,
    keys: Arc<BackupKeys>,
    cache: Mutex<HashMap<String, Arc<PeriodKey>>>,
    /// Held while a month's key is made (the shipper and a snapshot may ask at once).
    making: Mutex<()>,
}

/// The newest-manifest mark's file of a target (by its URL, as the server names it).
fn mark_path(dir: &Path, target: &str) -> PathBuf {
    let h: String = phivault_crypto::sha256(target.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dir.join(format!("manifest-{h}.mark"))
}

impl std::fmt::Debug for PeriodStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeriodStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl PeriodStore {
    /// The store in `dir`; with `create`, the directory is made (0700) when missing.
    /// A directory others can read or write is refused.
    pub fn open(
        dir: &Path,
        deployment: &str,
        keys: Arc<BackupKeys>,
        create: bool,
    ) -> Result<Self, BackupError> {
        if !dir.is_absolute() {
            return Err(BackupError::Config(format!(
                "the backup keys directory must be an absolute path (got {})",
                dir.display()
            )));
        }
        if create && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| BackupError::io(dir, &e))?;
        }
        let meta = std::fs::metadata(dir).map_err(|e| {
            BackupError::Config(format!(
                "the backup keys directory {} cannot be read ({e}): a restore needs the period keys kept with the key provider (--backup-keys)",
                dir.display()
            ))
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(BackupError::Config(format!(
                "refusing the backup keys directory {}: others can read or write it (chmod 700)",
                dir.display()
            )));
        }
        Ok(PeriodStore {
            dir: dir.to_path_buf(),
            deployment: deployment.to_owned(),
            keys,
            cache: Mutex::new(HashMap::new()),
            making: Mutex::new(()),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, period: &str) -> PathBuf {
        self.dir.join(format!("{period}.key"))
    }

    /// The month's key, made and stored first if there is none yet.
    pub fn get_or_create(&self, period: &str) -> Result<Arc<PeriodKey>, BackupError> {
        if let Some(k) = self.get(period)? {
            return Ok(k);
        }
        let _making = self.making.lock();
        if let Some(k) = self.get(period)? {
            return Ok(k);
        }
        let (key, wrapped) = self
            .keys
            .new_period_key(&self.deployment, period)
            .map_err(|e| BackupError::Config(format!("cannot make a period key: {e}")))?;
        let path = self.path(period);
        // written whole under another name, then renamed: a reader on another thread finds
        // no key or the whole key, never half of one
        let tmp = path.with_extension("key.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| BackupError::io(&tmp, &e))?;
        f.write_all(&wrapped)
            .and_then(|()| f.sync_all())
            .map_err(|e| BackupError::io(&tmp, &e))?;
        if path.exists() {
            // (made meanwhile by another process: its key stands)
            let _ = std::fs::remove_file(&tmp);
            drop(_making);
            return self
                .get(period)?
                .ok_or_else(|| BackupError::Config(format!("{} vanished", path.display())));
        }
        std::fs::rename(&tmp, &path).map_err(|e| BackupError::io(&path, &e))?;
        sync_dir(&self.dir)?;
        let key = Arc::new(key);
        self.cache.lock().insert(period.to_owned(), key.clone());
        Ok(key)
    }

    /// The month's key, or `None` when it was never made or was destroyed.
    pub fn get(&self, period: &str) -> Result<Option<Arc<PeriodKey>>, BackupError> {
        if !valid_period(period) {
            return Err(BackupError::Config(format!("{period:?} is not a period")));
        }
        if let Some(k) = self.cache.lock().get(period) {
            return Ok(Some(k.clone()));
        }
        let path = self.path(period);
        let wrapped = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BackupError::io(&path, &e)),
        };
        let key = self
            .keys
            .open_period_key(&self.deployment, period, &wrapped)
            .map_err(|_| {
                BackupError::Config(format!(
                    "the period key {} does not open under this master key (another deployment's, or changed)",
                    path.display()
                ))
            })?;
        let key = Arc::new(key);
        self.cache.lock().insert(period.to_owned(), key.clone());
        Ok(Some(key))
    }

    /// The months that have a key, oldest first.
    pub fn periods(&self) -> Result<Vec<String>, BackupError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| BackupError::io(&self.dir, &e))? {
            let entry = entry.map_err(|e| BackupError::io(&self.dir, &e))?;
            let name = entry.file_name();
            if let Some(p) = name.to_str().and_then(|n| n.strip_suffix(".key"))
                && valid_period(p)
            {
                out.push(p.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Keep the number and digest of the newest manifest written, beside the keys: a
    /// restore refuses a target whose newest manifest is older (rolled back, or its newest
    /// objects deleted), wherever it runs — the directory is out of a storage writer's
    /// reach and every restore needs it.
    pub fn record_manifest(&self, target: &str, seq: u64, digest: &str) -> Result<(), BackupError> {
        let mark = serde_json::json!({
            "seq": seq,
            "digest": digest,
            "tag": self.keys.mark_tag(&self.deployment, seq, digest),
        });
        let path = mark_path(&self.dir, target);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| BackupError::io(&tmp, &e))?;
        f.write_all(mark.to_string().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| BackupError::io(&tmp, &e))?;
        std::fs::rename(&tmp, &path).map_err(|e| BackupError::io(&path, &e))
    }

    /// The newest manifest recorded (`None`: none yet); a mark that does not verify is
    /// refused.
    pub fn recorded_manifest(&self, target: &str) -> Result<Option<(u64, String)>, BackupError> {
        let path = mark_path(&self.dir, target);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BackupError::io(&path, &e)),
        };
        let bad = || {
            BackupError::Refused(format!(
                "{} is not a manifest mark this deployment's keys wrote",
                path.display()
            ))
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        let (Some(seq), Some(digest), Some(tag)) =
            (v["seq"].as_u64(), v["digest"].as_str(), v["tag"].as_str())
        else {
            return Err(bad());
        };
        if tag != self.keys.mark_tag(&self.deployment, seq, digest) {
            return Err(bad());
        }
        Ok(Some((seq, digest.to_owned())))
    }

    /// Destroy the month's key: the file is overwritten with zeros, synced and removed.
    pub fn destroy(&self, period: &str) -> Result<(), BackupError> {
        self.cache.lock().remove(period);
        let path = self.path(period);
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(BackupError::io(&path, &e)),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| BackupError::io(&path, &e))?;
        f.write_all(&vec![0u8; usize::try_from(len).unwrap_or(0)])
            .and_then(|()| f.sync_all())
            .map_err(|e| BackupError::io(&path, &e))?;
        std::fs::remove_file(&path).map_err(|e| BackupError::io(&path, &e))?;
        sync_dir(&self.dir)
    }
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackupError::io(dir, &e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use phivault_crypto::{KeyHierarchy, MasterKey};

    #[test]
    fn period_keys_are_kept_found_again_and_destroyed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("bk");
        let keys = Arc::new(BackupKeys::new(&KeyHierarchy::new(&MasterKey::from_bytes(
            &[3; 32],
        ))));
        let store = PeriodStore::open(&dir, "dep", keys.clone(), true).expect("open");
        assert!(store.get("2026-11").expect("get").is_none());
        store.get_or_create("2026-11").expect("create");
        store.get_or_create("2026-12").expect("create");
        assert_eq!(store.periods().expect("list"), vec!["2026-11", "2026-12"]);
        // a fresh store (another process) finds them
        let again = PeriodStore::open(&dir, "dep", keys.clone(), false).expect("open");
        assert!(again.get("2026-11").expect("get").is_some());
        again.destroy("2026-11").expect("destroy");
        assert!(!dir.join("2026-11.key").exists());
        let third = PeriodStore::open(&dir, "dep", keys, false).expect("open");
        assert!(third.get("2026-11").expect("get").is_none());
        // another deployment's store does not open these keys
        let other = Arc::new(BackupKeys::new(&KeyHierarchy::new(&MasterKey::from_bytes(
            &[4; 32],
        ))));
        let foreign = PeriodStore::open(&dir, "dep", other, false).expect("open");
        assert!(foreign.get("2026-12").is_err());
    }
}
