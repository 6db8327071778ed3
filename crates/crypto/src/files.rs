//! Key and secret files: creating them owner-only, refusing to read them when they are not.
//!
//! Rules (DR2, invariant 5 "never start insecure"):
//! * files are created with `O_CREAT|O_EXCL` (never overwrite, never follow a symlink)
//!   and mode `0600` set at creation, so there is no window in which they are readable
//!   by others; the data and the directory entry are fsynced;
//! * before a secret file is read it must be a regular file (no symlink, FIFO, device)
//!   with no group/other permission bits; the checks are made on the opened handle and
//!   the handle is compared (device, inode) with the path's `lstat`, so swapping the file
//!   between the check and the read is detected.
//!
//! Ownership (`st_uid == geteuid()`) is not checked: std offers no way to read the
//! effective uid without `libc`/unsafe, and a file owned by someone else with mode 0600 is
//! unreadable to us anyway.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use crate::{CryptoError, Secret};

/// Permission bits that must be clear on a secret file.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Creates `path` with mode `0600` (at creation, not afterwards) and writes `bytes` to it,
/// then fsyncs the file and its directory.
///
/// Refuses to overwrite anything that exists at `path` (including a dangling symlink) with
/// [`CryptoError::KeyFileExists`]. If writing fails after the file was created, the
/// partial file is removed.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), CryptoError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CryptoError::KeyFileExists
            } else {
                CryptoError::Io(e)
            }
        })?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        // Best effort: a half-written key file would only confuse the next start.
        let _ = std::fs::remove_file(path);
        return Err(CryptoError::Io(e));
    }
    drop(file);
    sync_parent_dir(path)?;
    Ok(())
}

/// Makes the new directory entry durable.
fn sync_parent_dir(path: &Path) -> Result<(), CryptoError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()?;
    Ok(())
}

/// Checks that `path` is a regular file (not a symlink) that only its owner can access.
///
/// Errors: [`CryptoError::NotRegularFile`], [`CryptoError::InsecureKeyFile`] (the message
/// tells the operator to `chmod 600`), [`CryptoError::Io`] (e.g. the file does not exist).
pub fn check_private_file(path: &Path) -> Result<(), CryptoError> {
    let meta = std::fs::symlink_metadata(path)?;
    check_metadata(path, &meta)
}

fn check_metadata(path: &Path, meta: &std::fs::Metadata) -> Result<(), CryptoError> {
    if !meta.file_type().is_file() {
        return Err(CryptoError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(CryptoError::InsecureKeyFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Reads a secret file after [`check_private_file`]'s checks, made race-free: the checks
/// are repeated on the opened handle, and the handle must be the same inode as the path.
///
/// Files larger than `max_len` bytes are refused with [`CryptoError::InvalidKey`].
pub fn read_private_file(path: &Path, max_len: usize) -> Result<Secret<Vec<u8>>, CryptoError> {
    let before = std::fs::symlink_metadata(path)?;
    check_metadata(path, &before)?;
    let file = File::open(path)?;
    let meta = file.metadata()?;
    check_metadata(path, &meta)?;
    if meta.dev() != before.dev() || meta.ino() != before.ino() {
        return Err(CryptoError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    let mut buf = Secret::new(Vec::with_capacity(max_len.saturating_add(1).min(1 << 20)));
    let limit = u64::try_from(max_len).unwrap_or(u64::MAX).saturating_add(1);
    file.take(limit).read_to_end(buf.expose_mut())?;
    if buf.expose().len() > max_len {
        return Err(CryptoError::InvalidKey(
            "secret file is larger than expected",
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn write_creates_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k");
        write_private_file(&p, b"one").expect("write");
        let mode = std::fs::metadata(&p).expect("stat").mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        assert!(matches!(
            write_private_file(&p, b"two"),
            Err(CryptoError::KeyFileExists)
        ));
        assert_eq!(read_private_file(&p, 16).expect("read").expose(), b"one");
    }

    #[test]
    fn refuses_group_or_world_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k");
        write_private_file(&p, b"x").expect("write");
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            set_mode(&p, mode);
            match check_private_file(&p) {
                Err(CryptoError::InsecureKeyFile { mode: m, .. }) => assert_eq!(m, mode),
                other => panic!("mode {mode:o}: {other:?}"),
            }
            assert!(read_private_file(&p, 16).is_err());
        }
        set_mode(&p, 0o400);
        check_private_file(&p).expect("0400 is fine");
        set_mode(&p, 0o600);
        check_private_file(&p).expect("0600 is fine");
    }

    #[test]
    fn message_tells_operator_to_chmod() {
        let e = CryptoError::InsecureKeyFile {
            path: "/d/master.key".into(),
            mode: 0o644,
        };
        let msg = e.to_string();
        assert!(msg.contains("chmod 600 /d/master.key"), "{msg}");
        assert!(msg.contains("0o644"), "{msg}");
    }

    #[test]
    fn refuses_symlink_dir_and_dangling_symlink_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        write_private_file(&real, b"x").expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert!(matches!(
            check_private_file(&link),
            Err(CryptoError::NotRegularFile { .. })
        ));
        assert!(matches!(
            read_private_file(&link, 16),
            Err(CryptoError::NotRegularFile { .. })
        ));
        assert!(matches!(
            check_private_file(dir.path()),
            Err(CryptoError::NotRegularFile { .. })
        ));
        // Creating through a dangling symlink must not write to its target.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).expect("symlink");
        assert!(matches!(
            write_private_file(&dangling, b"x"),
            Err(CryptoError::KeyFileExists)
        ));
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn refuses_oversized() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k");
        write_private_file(&p, &[7u8; 100]).expect("write");
        assert!(matches!(
            read_private_file(&p, 99),
            Err(CryptoError::InvalidKey(_))
        ));
        assert_eq!(
            read_private_file(&p, 100).expect("read").expose().len(),
            100
        );
    }
}
