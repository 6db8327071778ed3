//! An export's output files as they are written: NDJSON cut at [`MAX_LINES`] lines or
//! [`MAX_BYTES`], each either streamed sealed into the exchange area, or — encrypted end to
//! end to the client's key — held in memory, encrypted as one JWE (`ECDH-ES`, `A256GCM`)
//! and then stored. Plaintext never reaches a disk: the area seals as it writes.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;

use phivault_crypto::jose::EncryptionKey;
use zeroize::Zeroizing;

use super::job::OutFile;
use crate::Error;
use crate::area::{Area, AreaWriter};

/// Most resources per file.
pub const MAX_LINES: u64 = 100_000;
/// Most bytes per file (end-to-end files are held whole in memory before encryption).
pub const MAX_BYTES: usize = 64 << 20;
/// The content type inside end-to-end encrypted files.
pub const NDJSON: &str = "application/fhir+ndjson";

/// Where finished files go.
pub enum Target {
    /// The exchange area, sealed under the job's key; files named `exp-<job>-<n>`.
    Area {
        /// The area.
        area: Area,
        /// The job's area key.
        key: Zeroizing<[u8; 32]>,
        /// The job id.
        job: String,
    },
    /// A directory (`phivault export`): `<n>-<Type>.ndjson.jwe`, end to end only.
    Dir(PathBuf),
}

enum Body {
    Stream(AreaWriter),
    Held(Zeroizing<Vec<u8>>),
}

struct Open {
    rtype: String,
    name: String,
    body: Body,
    lines: u64,
    bytes: usize,
    patients: BTreeSet<String>,
}

/// The files of one export being written.
pub struct Files {
    target: Target,
    e2e: Option<EncryptionKey>,
    open: Option<Open>,
    /// Finished output files.
    pub files: Vec<OutFile>,
    /// OperationOutcome lines of records that failed their integrity check.
    damaged: Vec<String>,
    /// Finished error files.
    pub errors: Vec<OutFile>,
    /// Every patient whose records were written.
    pub patients: BTreeSet<String>,
}

fn io(_: std::io::Error) -> Error {
    Error::Records(phivault_records::Error::unavailable())
}

impl Files {
    /// Files for `target`, encrypted end to end to `e2e` when given (required for a
    /// directory).
    pub fn new(target: Target, e2e: Option<EncryptionKey>) -> Result<Files, Error> {
        if matches!(target, Target::Dir(_)) && e2e.is_none() {
            return Err(Error::bad_request(
                "an export to a directory is encrypted to a recipient key",
            ));
        }
        Ok(Files {
            target,
            e2e,
            open: None,
            files: Vec::new(),
            damaged: Vec::new(),
            errors: Vec::new(),
            patients: BTreeSet::new(),
        })
    }

    fn name(&self, n: usize, rtype: &str) -> String {
        match &self.target {
            Target::Area { job, .. } => crate::area::Owner::EXPORT.file(job, n),
            Target::Dir(_) => format!("{n:04}-{rtype}.ndjson.jwe"),
        }
    }

    fn start(&mut self, rtype: &str) -> Result<Open, Error> {
        let n = self.files.len() + self.errors.len();
        let name = self.name(n, rtype);
        let body = match (&self.target, &self.e2e) {
            (Target::Area { area, key, .. }, None) => {
                Body::Stream(area.create(&name, key).map_err(io)?)
            }
            _ => Body::Held(Zeroizing::new(Vec::with_capacity(1 << 20))),
        };
        Ok(Open {
            rtype: rtype.to_owned(),
            name,
            body,
            lines: 0,
            bytes: 0,
            patients: BTreeSet::new(),
        })
    }

    /// One resource of `rtype` (its JSON as stored, one line), belonging to `patient`.
    pub fn line(&mut self, rtype: &str, patient: Option<&str>, json: &[u8]) -> Result<(), Error> {
        let full = self.open.as_ref().is_some_and(|o| {
            o.rtype != rtype || o.lines >= MAX_LINES || o.bytes + json.len() + 1 > MAX_BYTES
        });
        if full {
            self.finish_file()?;
        }
        if self.open.is_none() {
            self.open = Some(self.start(rtype)?);
        }
        let Some(o) = self.open.as_mut() else {
            return Err(Error::internal());
        };
        match &mut o.body {
            Body::Stream(w) => {
                w.write_all(json).map_err(io)?;
                w.write_all(b"\n").map_err(io)?;
            }
            Body::Held(b) => {
                b.extend_from_slice(json);
                b.push(b'\n');
            }
        }
        o.lines += 1;
        o.bytes += json.len() + 1;
        if let Some(p) = patient
            && !o.patients.contains(p)
        {
            o.patients.insert(p.to_owned());
            if !self.patients.contains(p) {
                self.patients.insert(p.to_owned());
            }
        }
        Ok(())
    }

    /// A record that failed its integrity check: named in an error file, never exported.
    pub fn damaged(&mut self, rtype: &str, id: &str) {
        self.damaged.push(
            serde_json::json!({"resourceType": "OperationOutcome", "issue": [{
                "severity": "error", "code": "exception",
                "diagnostics": format!("{rtype}/{id} failed its integrity check; it was not exported and the incident was recorded"),
            }]})
            .to_string(),
        );
    }

    /// Finish the file being written.
    pub fn finish_file(&mut self) -> Result<(), Error> {
        let Some(o) = self.open.take() else {
            return Ok(());
        };
        match o.body {
            Body::Stream(w) => {
                w.finish().map_err(io)?;
            }
            Body::Held(plain) => {
                let e2e = self.e2e.as_ref().ok_or_else(Error::internal)?;
                let jwe = phivault_crypto::jose::encrypt_ecdh_es(e2e, NDJSON, &plain)
                    .map_err(|_| Error::internal())?;
                drop(plain);
                self.store(&o.name, jwe.as_bytes())?;
            }
        }
        self.store_patients(&o.name, &o.patients)?;
        self.files.push(OutFile {
            rtype: o.rtype,
            count: o.lines,
            name: o.name,
        });
        Ok(())
    }

    fn store(&self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        match &self.target {
            Target::Area { area, key, .. } => area.put(name, key, bytes).map_err(io),
            Target::Dir(d) => {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(d.join(name))
                    .map_err(io)?;
                f.write_all(bytes).map_err(io)?;
                f.sync_all().map_err(io)
            }
        }
    }

    /// The patients a file holds, beside it (sealed), for the audit event of its fetch.
    fn store_patients(&self, name: &str, patients: &BTreeSet<String>) -> Result<(), Error> {
        let Target::Area { area, key, .. } = &self.target else {
            return Ok(());
        };
        let mut list = Vec::with_capacity(patients.len() * 40);
        for p in patients {
            list.extend_from_slice(p.as_bytes());
            list.push(b'\n');
        }
        area.put(&format!("{name}-p"), key, &list).map_err(io)
    }

    /// Finish everything: the last file, and an error file when records were damaged.
    pub fn finish(&mut self) -> Result<(), Error> {
        self.finish_file()?;
        if self.damaged.is_empty() {
            return Ok(());
        }
        let lines = std::mem::take(&mut self.damaged);
        let outputs = self.files.len();
        for l in &lines {
            self.line("OperationOutcome", None, l.as_bytes())?;
        }
        self.finish_file()?;
        // (every file written from here is an error file)
        let errors: Vec<OutFile> = self.files.drain(outputs..).collect();
        self.errors.extend(errors);
        Ok(())
    }

    /// What was written, once finished: (output files, error files).
    pub fn into_parts(mut self) -> (Vec<OutFile>, Vec<OutFile>) {
        (
            std::mem::take(&mut self.files),
            std::mem::take(&mut self.errors),
        )
    }
}

/// The patients file `name` holds (written beside it); an error when the list is missing
/// or does not open (fail closed: a file served is audited with every patient it holds).
pub fn patients_of(area: &Area, key: &[u8; 32], name: &str) -> Result<Vec<String>, Error> {
    let b = area
        .get(&format!("{name}-p"), key)
        .map_err(|_| Error::integrity())?;
    Ok(String::from_utf8_lossy(&b)
        .lines()
        .map(str::to_owned)
        .collect())
}
