//! The exchange area: the files trusted sharing hands out (share links' JWE files, bulk
//! export NDJSON), each sealed under a key kept only in its link's or job's record
//! (`phivault_crypto::stream`, the file's name bound as associated data), written to a
//! temporary name, fsynced and renamed, so a half-written file is never served. Names are
//! opaque (`shl-<keyed hash>-<n>`, `exp-<job>-<n>`): a listing of the directory names no
//! patient. Deleting a file is unlinking it — its key goes with its record (crypto-shredding:
//! a copy of the disk or a backup keeps only ciphertext whose key is gone).
//!
//! On several nodes, every node must see the same area: `serve --exchange-dir` on a shared
//! filesystem (README "Sharing records").

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use phivault_crypto::stream::{SealedReader, SealedWriter};

/// Whose files: a link's (`shl-<id>-<n>`) or an export job's (`exp-<id>-<n>`).
#[derive(Debug, Clone, Copy)]
pub struct Owner(&'static str);

impl Owner {
    /// Share links' files.
    pub const LINK: Owner = Owner("shl-");
    /// Export jobs' files.
    pub const EXPORT: Owner = Owner("exp-");

    /// The name of file `n` of `id`.
    pub fn file(self, id: &str, n: usize) -> String {
        format!("{}{id}-{n}", self.0)
    }

    /// What every file of `id` is named with first (with its half-written ones).
    pub fn files_of(self, id: &str) -> String {
        format!("{}{id}-", self.0)
    }

    /// What names every file of this kind.
    pub fn all(self) -> &'static str {
        self.0
    }

    /// The id a file of this kind belongs to.
    pub fn id_of(self, name: &str) -> Option<&str> {
        name.strip_prefix(self.0)?.split('-').next()
    }
}

/// The directory of sealed exchange files.
#[derive(Debug, Clone)]
pub struct Area {
    dir: PathBuf,
}

/// A file being written: sealed on the way, visible under its name only once finished.
pub struct AreaWriter {
    inner: SealedWriter<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    written: u64,
}

impl Write for AreaWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl AreaWriter {
    /// Seal the last chunk, fsync, rename into place; the plaintext bytes written.
    pub fn finish(self) -> io::Result<u64> {
        let file = self
            .inner
            .finish()?
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, &self.path)?;
        // the new name durable too (a file a client was told of survives a crash)
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(self.written)
    }
}

/// Whether `name` is a name this area gives (lower-case letters, digits, `-`).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A removal's outcome: absent already is fine.
fn gone(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn bad_name() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "not an exchange file name")
}

impl Area {
    /// The area at `dir`, made owner-only when created; refused when others can read it.
    pub fn open(dir: &Path) -> io::Result<Area> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let mode = fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the exchange directory is open to other users (chmod 700 it)",
            ));
        }
        Ok(Area {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the area is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Start writing file `name` sealed under `key`.
    pub fn create(&self, name: &str, key: &[u8; 32]) -> io::Result<AreaWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        if !valid_name(name) {
            return Err(bad_name());
        }
        let path = self.dir.join(name);
        // a temporary name of this writer's own (two writers of one name never share it)
        let salt =
            phivault_crypto::random_bytes::<6>().map_err(|_| io::Error::other("no randomness"))?;
        let tmp = self.dir.join(format!(
            "{name}.{}.tmp",
            salt.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let inner = SealedWriter::new(
            key,
            name.as_bytes(),
            BufWriter::with_capacity(256 << 10, file),
        )?;
        Ok(AreaWriter {
            inner,
            tmp,
            path,
            written: 0,
        })
    }

    /// Write file `name` at once.
    pub fn put(&self, name: &str, key: &[u8; 32], bytes: &[u8]) -> io::Result<()> {
        let mut w = self.create(name, key)?;
        w.write_all(bytes)?;
        w.finish().map(|_| ())
    }

    /// Read file `name` (its plaintext, checked chunk by chunk as read).
    pub fn reader(&self, name: &str, key: &[u8; 32]) -> io::Result<SealedReader<BufReader<File>>> {
        if !valid_name(name) {
            return Err(bad_name());
        }
        let f = File::open(self.dir.join(name))?;
        SealedReader::new(key, name.as_bytes(), BufReader::with_capacity(256 << 10, f))
    }

    /// The whole of file `name`.
    pub fn get(&self, name: &str, key: &[u8; 32]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        io::Read::read_to_end(&mut self.reader(name, key)?, &mut out)?;
        Ok(out)
    }

    /// Remove file `name` (absent is fine).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name());
        }
        gone(fs::remove_file(self.dir.join(name)))
    }

    /// Every file whose name starts with `prefix` (finished or not).
    pub fn names(&self, prefix: &str) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Remove every file (and unfinished file) whose name starts with `prefix`.
    pub fn remove_prefix(&self, prefix: &str) -> io::Result<usize> {
        let mut n = 0;
        for name in self.names(prefix)? {
            // (one a writer renamed or removed meanwhile is gone all the same)
            gone(fs::remove_file(self.dir.join(&name)))?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_sealed_and_bound_to_their_names() {
        let tmp = tempfile::tempdir().unwrap();
        let area = Area::open(&tmp.path().join("x")).unwrap();
        let key = [7u8; 32];
        area.put("shl-ab-0", &key, b"{\"resourceType\":\"Bundle\"}")
            .unwrap();
        assert_eq!(
            area.get("shl-ab-0", &key).unwrap(),
            b"{\"resourceType\":\"Bundle\"}"
        );
        let raw = fs::read(area.dir().join("shl-ab-0")).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"Bundle"), "sealed on disk");
        // a file moved to another name does not open; nor under another key
        fs::copy(area.dir().join("shl-ab-0"), area.dir().join("shl-cd-0")).unwrap();
        assert!(area.get("shl-cd-0", &key).is_err());
        assert!(area.get("shl-ab-0", &[8u8; 32]).is_err());
        assert!(area.create("../etc", &key).is_err());
        assert_eq!(area.remove_prefix("shl-").unwrap(), 2);
        assert!(area.names("").unwrap().is_empty());
    }

    #[test]
    fn an_area_open_to_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("open");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(Area::open(&d).is_err());
    }
}
