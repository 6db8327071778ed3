//! The `file` provider: the master key in a key file **outside** the data directory.
//!
//! The default place is the user's configuration directory (`$XDG_CONFIG_HOME/phivault/`,
//! else `~/.config/phivault/`, created 0700), named after the data directory's id, so a
//! copy of the data directory alone opens nothing. In production put it on another
//! volume than the data, and never in the same backup.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use phivault_crypto::MasterKey;

use crate::{KeyError, Provider, is_inside};

/// `$XDG_CONFIG_HOME/phivault/{id}.key`, else `$HOME/.config/phivault/{id}.key`; the
/// directory is created (0700) if missing.
pub fn default_key_file(data_dir_id: &str) -> Result<PathBuf, KeyError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".config"),
            None => {
                return Err(KeyError::refused(
                    "neither XDG_CONFIG_HOME nor HOME is set: give the key file's place with --key-file",
                ));
            }
        },
    };
    let dir = base.join("phivault");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| KeyError::io(&dir, e))?;
    Ok(dir.join(format!("{data_dir_id}.key")))
}

/// Refuse a key file inside the data directory tree.
fn refuse_inside(root: &Path, key_file: &Path) -> Result<(), KeyError> {
    if is_inside(key_file, root) {
        return Err(KeyError::refused(format!(
            "refusing a master key file inside the data directory ({} is under {}): whoever copies the directory would have the key; keep it on another volume, outside the data and its backups",
            key_file.display(),
            root.display()
        )));
    }
    Ok(())
}

/// Write a new key file for `master` at `key_file` (absolute; outside `root`).
pub fn create(root: &Path, key_file: &Path, master: &MasterKey) -> Result<Provider, KeyError> {
    let key_file = std::path::absolute(key_file).map_err(|e| KeyError::io(key_file, e))?;
    refuse_inside(root, &key_file)?;
    master.write_new_key_file(&key_file).map_err(|e| match e {
        phivault_crypto::CryptoError::KeyFileExists => KeyError::refused(format!(
            "{} already exists; refusing to overwrite a key file",
            key_file.display()
        )),
        other => KeyError::refused(format!("cannot write {}: {other}", key_file.display())),
    })?;
    Ok(Provider::File { key_file })
}

/// Load the master key from `key_file`, refusing one inside `root`.
pub fn load(root: &Path, key_file: &Path) -> Result<MasterKey, KeyError> {
    refuse_inside(root, key_file)?;
    MasterKey::load_key_file(key_file).map_err(|e| {
        KeyError::refused(format!(
            "cannot use the master key file {}: {e}",
            key_file.display()
        ))
    })
}

/// Overwrite a key file with zeros, fsync, and remove it (best effort against the file
/// system keeping old blocks; the point is that no copy of the directory made afterwards
/// holds it). Missing is fine.
pub fn shred(path: &Path) -> Result<(), KeyError> {
    let len = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            return Err(KeyError::refused(format!(
                "{} is not a file",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(KeyError::io(path, e)),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(0o400_000) // O_NOFOLLOW
        .open(path)
        .map_err(|e| KeyError::io(path, e))?;
    f.write_all(&vec![0u8; usize::try_from(len).unwrap_or(0)])
        .and_then(|()| f.sync_all())
        .map_err(|e| KeyError::io(path, e))?;
    drop(f);
    std::fs::remove_file(path).map_err(|e| KeyError::io(path, e))?;
    crate::config::sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_inside_the_data_directory_is_refused_both_ways() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("data");
        std::fs::create_dir_all(root.join("keys")).expect("mkdir");
        let m = MasterKey::generate().expect("key");
        for inside in [root.join("master.key"), root.join("keys/../x.key")] {
            assert!(create(&root, &inside, &m).is_err(), "{}", inside.display());
            assert!(!inside.exists());
        }
        // through a symlink to the data directory
        std::os::unix::fs::symlink(&root, tmp.path().join("alias")).expect("symlink");
        assert!(create(&root, &tmp.path().join("alias/k.key"), &m).is_err());
        // outside: fine, and loads back
        let outside = tmp.path().join("k.key");
        create(&root, &outside, &m).expect("outside");
        let loaded = load(&root, &outside).expect("load");
        assert_eq!(loaded.expose_to_provider(), m.expose_to_provider());
        // moved inside afterwards: refused at load
        std::fs::rename(&outside, root.join("moved.key")).expect("mv");
        assert!(load(&root, &root.join("moved.key")).is_err());
        shred(&root.join("moved.key")).expect("shred");
        assert!(!root.join("moved.key").exists());
    }
}
