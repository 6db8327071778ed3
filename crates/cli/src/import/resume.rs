//! The resume file of `phivault import`: which inputs (and which NDJSON chunks) the server
//! acknowledged, so that a rerun after an interruption skips them.
//!
//! It is one JSON document, rewritten whole and atomically (a temporary file beside it,
//! fsynced, renamed over it, the directory fsynced), at most every [`FLUSH_EVERY`] while an
//! import runs and once at its end: a kill at any moment leaves the previous or the next
//! version, never a torn one. What the last flush missed is sent again on the rerun, which
//! adds nothing when the data is idempotent (`PUT Type/id`, conditional creates).
//!
//! An input is known by its canonical path, size and modification time: a file that
//! changed since is imported again whole. The records hold no resource content, only paths
//! and numbers.
//!
//! ```json
//! {"phivault_import": 1, "fhir_base": "https://…/fhir", "chunk_lines": 250,
//!  "chunk_bytes": 4194304,
//!  "inputs": {"/data/patient-00001.json": {"size": 13012, "mtime_ns": 17…, "done": true},
//!             "/data/Observation.ndjson": {"size": 9…, "mtime_ns": 17…, "chunks": [0, 1, 3]}}}
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// How often, at most, the file is rewritten while an import runs.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// A resume file is small; anything larger is not one.
const MAX_SIZE: u64 = 256 << 20;
const FORMAT: u64 = 1;

/// What identifies an input's content: a changed file is imported again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub size: u64,
    pub mtime_ns: u64,
}

impl Identity {
    pub fn of(path: &Path) -> Result<Identity> {
        let m =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mtime = m.modified()?.duration_since(UNIX_EPOCH).unwrap_or_default();
        Ok(Identity {
            size: m.len(),
            mtime_ns: u64::try_from(mtime.as_nanos()).unwrap_or(u64::MAX),
        })
    }
}

#[derive(Debug, Default, Clone)]
struct Input {
    id: Option<Identity>,
    done: bool,
    chunks: BTreeSet<u64>,
}

/// The resume file, in memory.
pub struct Resume {
    path: PathBuf,
    fhir_base: String,
    /// How NDJSON files are cut into chunks: chunk records hold only under the same cut.
    chunking: (u64, u64),
    inputs: BTreeMap<String, Input>,
    dirty: bool,
    last_flush: Option<Instant>,
}

impl Resume {
    /// Reads `path` if it exists. Records of another server (FHIR base) or another chunk
    /// size are not used; the second value says why, for the user.
    pub fn open(
        path: &Path,
        fhir_base: &str,
        chunking: (u64, u64),
    ) -> Result<(Resume, Option<String>)> {
        let mut r = Resume {
            path: path.to_owned(),
            fhir_base: fhir_base.to_owned(),
            chunking,
            inputs: BTreeMap::new(),
            dirty: false,
            last_flush: None,
        };
        let bytes = match std::fs::File::open(path) {
            Ok(f) => {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_SIZE), &mut buf)?;
                buf
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((r, None)),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let v: Value = serde_json::from_slice(&bytes).ok().filter(|v: &Value| {
            v["phivault_import"].as_u64() == Some(FORMAT)
        }).with_context(|| {
            format!("{} is not a resume file of phivault import; remove it or pass another --resume", path.display())
        })?;
        if v["fhir_base"].as_str() != Some(fhir_base) {
            return Ok((
                r,
                Some(format!(
                    "the resume file {} records an import into another server; starting afresh",
                    path.display()
                )),
            ));
        }
        let same_cut = (v["chunk_lines"].as_u64(), v["chunk_bytes"].as_u64())
            == (Some(chunking.0), Some(chunking.1));
        for (key, e) in v["inputs"].as_object().into_iter().flatten() {
            let id = match (e["size"].as_u64(), e["mtime_ns"].as_u64()) {
                (Some(size), Some(mtime_ns)) => Identity { size, mtime_ns },
                _ => continue,
            };
            let chunks = match (same_cut, e["chunks"].as_array()) {
                (true, Some(c)) => c.iter().filter_map(Value::as_u64).collect(),
                _ => BTreeSet::new(),
            };
            let done = e["done"].as_bool() == Some(true);
            r.inputs.insert(
                key.clone(),
                Input {
                    id: Some(id),
                    done,
                    chunks,
                },
            );
        }
        Ok((r, None))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn current(&self, key: &str, id: Identity) -> Option<&Input> {
        self.inputs.get(key).filter(|i| i.id == Some(id))
    }

    /// The input was acknowledged whole (and has not changed since).
    pub fn file_done(&self, key: &str, id: Identity) -> bool {
        self.current(key, id).is_some_and(|i| i.done)
    }

    /// The NDJSON chunks of the input acknowledged so far (none if it changed).
    pub fn chunks_done(&self, key: &str, id: Identity) -> BTreeSet<u64> {
        self.current(key, id)
            .map(|i| i.chunks.clone())
            .unwrap_or_default()
    }

    fn entry(&mut self, key: &str, id: Identity) -> &mut Input {
        let e = self.inputs.entry(key.to_owned()).or_default();
        if e.id != Some(id) {
            *e = Input {
                id: Some(id),
                ..Input::default()
            };
        }
        self.dirty = true;
        e
    }

    /// Record an input as acknowledged whole.
    pub fn record_file(&mut self, key: &str, id: Identity) {
        let e = self.entry(key, id);
        e.done = true;
        e.chunks.clear();
    }

    /// Record one NDJSON chunk as acknowledged; returns how many of the input's chunks are.
    pub fn record_chunk(&mut self, key: &str, id: Identity, chunk: u64) -> usize {
        let e = self.entry(key, id);
        e.chunks.insert(chunk);
        e.chunks.len()
    }

    /// Rewrite the file if something changed and the last write is [`FLUSH_EVERY`] old.
    pub fn maybe_flush(&mut self) -> Result<()> {
        if self.last_flush.is_some_and(|t| t.elapsed() < FLUSH_EVERY) {
            return Ok(());
        }
        self.flush()
    }

    /// Rewrite the file now (atomically) if something changed.
    pub fn flush(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let inputs: serde_json::Map<String, Value> = self
            .inputs
            .iter()
            .filter_map(|(k, i)| {
                let id = i.id?;
                let mut e = json!({"size": id.size, "mtime_ns": id.mtime_ns});
                if i.done {
                    e["done"] = json!(true);
                } else {
                    e["chunks"] = json!(i.chunks);
                }
                Some((k.clone(), e))
            })
            .collect();
        let doc = json!({
            "phivault_import": FORMAT,
            "fhir_base": self.fhir_base,
            "chunk_lines": self.chunking.0,
            "chunk_bytes": self.chunking.1,
            "inputs": inputs,
        });
        let mut bytes = serde_json::to_vec(&doc)?;
        bytes.push(b'\n');
        write_atomically(&self.path, &bytes)
            .with_context(|| format!("cannot write the resume file {}", self.path.display()))?;
        self.dirty = false;
        self.last_flush = Some(Instant::now());
        Ok(())
    }
}

/// Write `bytes` to `path` so that a crash leaves the old or the new content: a temporary
/// file in the same directory, fsynced, renamed over `path`, then the directory fsynced.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // a new file of our own: never through a planted symlink, never another's file
    // (create_new is O_EXCL, which also refuses a symlink at the name), private to the user
    let (tmp, mut f) = {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut tries = 0;
        loop {
            let nonce: [u8; 8] = phivault_crypto::random_bytes()
                .map_err(|_| std::io::Error::other("no randomness for a temporary name"))?;
            let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
            let tmp = dir.join(format!(".{name}.{nonce}.tmp"));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
            {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    };
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CUT: (u64, u64) = (250, 4 << 20);
    const BASE: &str = "https://127.0.0.1:8443/fhir";

    #[test]
    fn records_survive_a_rewrite_and_a_changed_file_is_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("progress.json");
        let a = Identity {
            size: 10,
            mtime_ns: 5,
        };
        let b = Identity {
            size: 99,
            mtime_ns: 7,
        };
        let (mut r, note) = Resume::open(&path, BASE, CUT).expect("open");
        assert!(note.is_none());
        r.record_file("/in/a.json", a);
        assert_eq!(r.record_chunk("/in/b.ndjson", b, 0), 1);
        assert_eq!(r.record_chunk("/in/b.ndjson", b, 2), 2);
        r.flush().expect("flush");
        // nothing but the file itself is left in the directory (the temporary is renamed)
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);

        let (r, note) = Resume::open(&path, BASE, CUT).expect("reopen");
        assert!(note.is_none());
        assert!(r.file_done("/in/a.json", a));
        assert!(!r.file_done("/in/b.ndjson", b));
        assert_eq!(r.chunks_done("/in/b.ndjson", b), BTreeSet::from([0, 2]));
        // the same path with another size or time is another content: nothing is done
        let touched = Identity { mtime_ns: 6, ..a };
        assert!(!r.file_done("/in/a.json", touched));
        assert!(
            r.chunks_done("/in/b.ndjson", Identity { size: 100, ..b })
                .is_empty()
        );
        assert!(!r.file_done("/in/unknown.json", a));
    }

    #[test]
    fn another_server_or_chunk_size_starts_afresh_and_garbage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("progress.json");
        let a = Identity {
            size: 1,
            mtime_ns: 1,
        };
        let (mut r, _) = Resume::open(&path, BASE, CUT).expect("open");
        r.record_file("/in/a.json", a);
        r.record_chunk("/in/b.ndjson", a, 0);
        r.flush().expect("flush");

        let (r, note) = Resume::open(&path, "https://elsewhere/fhir", CUT).expect("open");
        assert!(note.expect("a note").contains("another server"));
        assert!(!r.file_done("/in/a.json", a));

        let (r, note) = Resume::open(&path, BASE, (100, 4 << 20)).expect("open");
        assert!(note.is_none());
        assert!(
            r.file_done("/in/a.json", a),
            "whole files do not depend on the cut"
        );
        assert!(r.chunks_done("/in/b.ndjson", a).is_empty());

        std::fs::write(&path, b"{\"resourceType\": \"Bundle\"}").expect("write");
        assert!(Resume::open(&path, BASE, CUT).is_err());
    }

    #[test]
    fn flushes_are_coalesced_and_skipped_when_nothing_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("progress.json");
        let a = Identity {
            size: 1,
            mtime_ns: 1,
        };
        let (mut r, _) = Resume::open(&path, BASE, CUT).expect("open");
        r.maybe_flush().expect("flush");
        assert!(!path.exists(), "nothing recorded, nothing written");
        r.record_chunk("/in/b.ndjson", a, 0);
        r.maybe_flush().expect("flush");
        assert!(path.exists());
        r.record_chunk("/in/b.ndjson", a, 1);
        r.maybe_flush().expect("too soon: kept in memory");
        let (again, _) = Resume::open(&path, BASE, CUT).expect("open");
        assert_eq!(again.chunks_done("/in/b.ndjson", a).len(), 1);
        r.flush().expect("flush");
        let (again, _) = Resume::open(&path, BASE, CUT).expect("open");
        assert_eq!(again.chunks_done("/in/b.ndjson", a).len(), 2);
    }
}
