//! The `file:///ABS/PATH` target: a directory of the server's user only (mode 0700, made
//! if missing, refused when others may read or write it), one file per object (mode 0600;
//! a `/` in a name is a subdirectory, 0700). A put writes a temporary file beside the
//! object, syncs it, renames it over the object and syncs the directory: an object is
//! whole or absent. Object Lock does not exist here (`retain_until` is ignored).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Target, TargetError, check_name};

/// Largest object read back (as the S3 target's).
const MAX_OBJECT: u64 = 1 << 30;

/// Temporary files are named `.tmp~PID~N`: `~` is never in an object name.
const TMP_PREFIX: &str = ".tmp~";

/// A directory holding objects as files.
#[derive(Debug)]
pub struct FileTarget {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> TargetError {
    let msg = format!("{what} {}: {e}", path.display());
    match e.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => TargetError::Refused(msg),
        _ => TargetError::Unavailable(msg),
    }
}

fn sync_dir(dir: &Path) -> Result<(), TargetError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot sync the directory", dir, &e))
}

impl FileTarget {
    /// Open (or make) the directory `path` (what follows `file://`: an absolute path).
    /// A missing directory is made with mode 0700 (its parent must exist); an existing
    /// one that others may read, write or enter is refused.
    pub fn open(path: &str) -> Result<Self, TargetError> {
        let root = PathBuf::from(path);
        if path.is_empty() || !root.is_absolute() {
            return Err(TargetError::Config(format!(
                "file://{path}: a file target is file:///ABSOLUTE/PATH"
            )));
        }
        match DirBuilder::new().mode(0o700).create(&root) {
            Ok(()) => {
                if let Some(parent) = root.parent() {
                    sync_dir(parent)?;
                }
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(TargetError::Config(format!(
                    "cannot make the backup directory {}: its parent does not exist",
                    root.display()
                )));
            }
            Err(e) => return Err(io_error("cannot make the backup directory", &root, &e)),
        }
        let meta =
            fs::metadata(&root).map_err(|e| io_error("cannot use the directory", &root, &e))?;
        if !meta.is_dir() {
            return Err(TargetError::Config(format!(
                "the backup target {} is not a directory",
                root.display()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TargetError::Config(format!(
                "the backup directory {} is open to other users (mode {mode:03o}): chmod 700 {}",
                root.display(),
                root.display()
            )));
        }
        Ok(FileTarget { root })
    }

    /// The directory of the objects.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Make the directories between the root and `dir` (0700), syncing each parent of
    /// one made.
    fn make_dirs(&self, dir: &Path) -> Result<(), TargetError> {
        let Ok(rel) = dir.strip_prefix(&self.root) else {
            return Ok(());
        };
        let mut at = self.root.clone();
        for part in rel.components() {
            let parent = at.clone();
            at.push(part);
            match DirBuilder::new().mode(0o700).create(&at) {
                Ok(()) => sync_dir(&parent)?,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("cannot make the directory", &at, &e)),
            }
        }
        Ok(())
    }

    fn walk(&self, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<(), TargetError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            // removed meanwhile
            Err(e) if e.kind() == ErrorKind::NotFound && dir != self.root => return Ok(()),
            Err(e) => return Err(io_error("cannot list", dir, &e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_error("cannot list", dir, &e))?;
            let path = entry.path();
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("cannot list", &path, &e)),
            };
            if meta.is_dir() {
                self.walk(&path, out)?;
            } else if meta.is_file() {
                let Some(name) = path
                    .strip_prefix(&self.root)
                    .ok()
                    .and_then(Path::to_str)
                    .map(str::to_owned)
                else {
                    continue;
                };
                // temporary files and anything else that is not an object name
                if check_name(&name).is_ok() {
                    out.push((name, meta.len()));
                }
            }
        }
        Ok(())
    }
}

impl Target for FileTarget {
    fn put(&self, name: &str, body: &[u8], _retain_until: Option<u64>) -> Result<(), TargetError> {
        check_name(name)?;
        let path = self.root.join(name);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.make_dirs(&dir)?;
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{}~{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(body)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_error("cannot write", &tmp, &e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_error("cannot rename into", &path, &e));
        }
        sync_dir(&dir)
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, TargetError> {
        check_name(name)?;
        let path = self.root.join(name);
        // only a regular file is an object (a FIFO put in its place would block the read
        // for ever; a symlink could lead anywhere): opened without following a link and
        // without blocking, then checked
        use std::os::unix::fs::OpenOptionsExt as _;
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                return Ok(None);
            }
            Err(e) => return Err(io_error("cannot read", &path, &e)),
        };
        let meta = f
            .metadata()
            .map_err(|e| io_error("cannot read", &path, &e))?;
        if meta.is_dir() {
            return Ok(None);
        }
        if !meta.is_file() {
            return Err(TargetError::Refused(format!(
                "{} is not a regular file: not an object phivault wrote",
                path.display()
            )));
        }
        if meta.len() > MAX_OBJECT {
            return Err(TargetError::Refused(format!(
                "{} is larger than {MAX_OBJECT} bytes",
                path.display()
            )));
        }
        let mut body = Vec::new();
        f.take(MAX_OBJECT + 1)
            .read_to_end(&mut body)
            .map_err(|e| io_error("cannot read", &path, &e))?;
        if body.len() as u64 > MAX_OBJECT {
            return Err(TargetError::Refused(format!(
                "{} is larger than {MAX_OBJECT} bytes",
                path.display()
            )));
        }
        Ok(Some(body))
    }

    fn list(&self) -> Result<Vec<(String, u64)>, TargetError> {
        let mut out = Vec::new();
        self.walk(&self.root, &mut out)?;
        out.sort();
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), TargetError> {
        check_name(name)?;
        let path = self.root.join(name);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(&self.root)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => Ok(()),
            Err(e) => Err(io_error("cannot remove", &path, &e)),
        }
    }

    fn object_lock(&self) -> Result<bool, TargetError> {
        Ok(false)
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("metadata").mode() & 0o777
    }

    #[test]
    fn objects_round_trip_privately_and_list_sorted_without_temporaries() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("backups");
        let t = FileTarget::open(root.to_str().expect("utf-8")).expect("open");
        assert_eq!(mode(&root), 0o700);
        assert_eq!(t.list().expect("list"), vec![]);
        t.put("wal/0001.seg", b"one", None).expect("put");
        t.put("base/b.obj", b"", Some(1)).expect("put empty");
        t.put("a.obj", b"first", None).expect("put");
        t.put("a.obj", b"second", None).expect("overwrite");
        assert_eq!(t.get("a.obj").expect("get"), Some(b"second".to_vec()));
        assert_eq!(t.get("base/b.obj").expect("get"), Some(vec![]));
        assert_eq!(t.get("missing").expect("get"), None);
        assert_eq!(t.get("wal").expect("a directory"), None);
        assert_eq!(t.get("a.obj/x").expect("under a file"), None);
        assert_eq!(mode(&root.join("wal")), 0o700);
        assert_eq!(mode(&root.join("wal/0001.seg")), 0o600);
        // a crashed put's leftover is no object
        fs::write(root.join("wal/.tmp~1~2"), b"partial").expect("write");
        assert_eq!(
            t.list().expect("list"),
            vec![
                ("a.obj".to_owned(), 6),
                ("base/b.obj".to_owned(), 0),
                ("wal/0001.seg".to_owned(), 3)
            ]
        );
        t.delete("a.obj").expect("delete");
        t.delete("a.obj").expect("delete again");
        t.delete("nowhere/x")
            .expect("delete under a missing directory");
        assert_eq!(t.get("a.obj").expect("get"), None);
        assert!(!t.object_lock().expect("lock"));
        assert_eq!(t.describe(), format!("file://{}", root.display()));
    }

    #[test]
    fn bad_names_are_refused_before_touching_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let t = FileTarget::open(tmp.path().join("t").to_str().expect("utf-8")).expect("open");
        for bad in [
            "",
            "/abs",
            "../up",
            "a/../b",
            "Upper",
            "a//b",
            "./a",
            "a/./b",
            "a/",
            "sp ace",
            "tmp~1",
            &"x".repeat(201),
        ] {
            assert!(
                matches!(t.put(bad, b"x", None), Err(TargetError::Config(_))),
                "{bad:?}"
            );
            assert!(matches!(t.get(bad), Err(TargetError::Config(_))), "{bad:?}");
            assert!(
                matches!(t.delete(bad), Err(TargetError::Config(_))),
                "{bad:?}"
            );
        }
        assert_eq!(t.list().expect("list"), vec![]);
    }

    #[test]
    fn the_directory_must_be_absolute_private_and_have_a_parent() {
        let tmp = tempfile::tempdir().expect("tmp");
        for rel in ["", "relative/dir", "./x"] {
            assert!(
                matches!(FileTarget::open(rel), Err(TargetError::Config(_))),
                "{rel:?}"
            );
        }
        let deep = tmp.path().join("no/such/parent");
        let err = FileTarget::open(deep.to_str().expect("utf-8")).expect_err("no parent");
        assert!(err.to_string().contains("parent does not exist"), "{err}");
        let open = tmp.path().join("open");
        fs::create_dir(&open).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o750)).expect("chmod");
        let err = FileTarget::open(open.to_str().expect("utf-8")).expect_err("group-readable");
        let msg = err.to_string();
        assert!(
            msg.contains(&open.display().to_string()) && msg.contains("750"),
            "{msg}"
        );
        fs::set_permissions(&open, fs::Permissions::from_mode(0o700)).expect("chmod");
        FileTarget::open(open.to_str().expect("utf-8")).expect("private now");
        let file = tmp.path().join("file");
        fs::write(&file, b"x").expect("write");
        assert!(matches!(
            FileTarget::open(file.to_str().expect("utf-8")),
            Err(TargetError::Config(_))
        ));
        // through the URL
        let url = format!("file://{}", tmp.path().join("via-url").display());
        let t = super::super::open(&url, None).expect("open url");
        t.put("x", b"1", None).expect("put");
        assert_eq!(t.list().expect("list"), vec![("x".to_owned(), 1)]);
        assert!(super::super::open("file://relative", None).is_err());
    }
}
