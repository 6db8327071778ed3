//! An export job as stored (settings row `export:<id>`, sealed: `crate::rows`) and the
//! kick-off request checked into one: the level (system, `Patient`, `Group/{id}`), the
//! types — each decided for the client by the one door, unconfined (`system/` read) — and
//! `_since`.

use phivault_auth::{Authenticated, Interaction};
use phivault_records::{Access, Vault};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::Error;

/// Label prefix of sealed job records.
const SEAL_LABEL: &str = "phivault export job v1\u{0}";

/// What is exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    /// `[base]/$export`: every record of the types.
    System,
    /// `[base]/Patient/$export`: every patient's compartment.
    Patient,
    /// `[base]/Group/{id}/$export`: the compartments of the group's patients.
    Group(String),
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Being written.
    Running,
    /// Files ready until `expires_ms`.
    Done,
    /// Stopped by a failure (`message` says which).
    Failed,
    /// Cancelled by its client (files removed).
    Cancelled,
    /// Past its expiry (files removed).
    Expired,
    /// A patient it held was erased (files removed).
    Erased,
}

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutFile {
    /// Resource type of its lines (`OperationOutcome` for error files).
    pub rtype: String,
    /// Resources in it.
    pub count: u64,
    /// Its name in the exchange area.
    pub name: String,
}

/// One job.
#[derive(Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Random id (hex).
    pub id: String,
    /// The back-end client that asked (only it may poll, fetch, cancel).
    pub client: String,
    /// The kick-off request (`$export?...`), echoed in the manifest.
    pub request: String,
    /// The level.
    pub level: Level,
    /// The types exported.
    pub types: Vec<String>,
    /// `_since` (ms).
    pub since_ms: Option<i64>,
    /// When asked (ms); the manifest's `transactionTime`.
    pub created_ms: u64,
    /// Where it is.
    pub state: State,
    /// The last sign of life of the node writing it (ms).
    pub heartbeat_ms: u64,
    /// Output files, in order.
    pub files: Vec<OutFile>,
    /// Error files (OperationOutcome per record that failed its integrity check).
    pub errors: Vec<OutFile>,
    /// When the files go (ms), once done.
    pub expires_ms: u64,
    /// The exchange-area key of its files (hex); dropped when the job ends.
    pub area_key: Option<String>,
    /// The client's key the files are encrypted to end to end (`kid`, curve), if any.
    pub e2e: Option<(Option<String>, String)>,
    /// A failure's fixed code.
    pub message: Option<String>,
}

impl Drop for JobRecord {
    fn drop(&mut self) {
        if let Some(k) = self.area_key.as_mut() {
            k.zeroize();
        }
    }
}

impl std::fmt::Debug for JobRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRecord")
            .field("id", &self.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl crate::rows::Row for JobRecord {
    const PREFIX: &'static str = "export:";
    const LABEL: &'static str = SEAL_LABEL;
    fn id(&self) -> &str {
        &self.id
    }
}

impl JobRecord {
    /// The area key, while the job has files.
    pub fn area_key(&self) -> Option<[u8; 32]> {
        crate::links::record::unhex32(self.area_key.as_deref()?)
    }
}

/// A kick-off checked: what to export, under which accesses.
pub struct KickOff {
    /// The level.
    pub level: Level,
    /// Each type with the client's access to it.
    pub types: Vec<Access>,
    /// `_since` (ms).
    pub since_ms: Option<i64>,
}

fn unsupported(name: &str) -> Error {
    Error::bad_request(match name {
        "_typeFilter" => "_typeFilter is not supported",
        "_elements" => "_elements is not supported",
        "includeAssociatedData" => "includeAssociatedData is not supported",
        _ => "an unknown parameter was given",
    })
}

/// Check a kick-off's parameters (`pairs` of its query) for `auth` at `level`.
pub fn kick_off(
    vault: &Vault,
    auth: &Authenticated,
    level: Level,
    pairs: &[(String, String)],
) -> Result<KickOff, Error> {
    let mut named: Option<Vec<String>> = None;
    let mut since_ms = None;
    for (k, v) in pairs {
        match k.as_str() {
            "_type" => {
                let list = named.get_or_insert_with(Vec::new);
                for t in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if !phivault_fhir::is_known_resource_type(t) {
                        return Err(Error::bad_request("_type names an unknown resource type"));
                    }
                    if !list.iter().any(|x| x == t) {
                        list.push(t.to_owned());
                    }
                }
            }
            "_since" if since_ms.is_some() => {
                return Err(Error::bad_request("_since is given once"));
            }
            "_since" => since_ms = Some(instant_ms(v)?),
            "_outputFormat" => {
                if !matches!(
                    v.as_str(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ) {
                    return Err(Error::bad_request(
                        "_outputFormat must be application/fhir+ndjson",
                    ));
                }
            }
            other => return Err(unsupported(other)),
        }
    }
    let compartment_only = level != Level::System;
    let wanted: Vec<String> = match named {
        Some(t) if t.is_empty() => return Err(Error::bad_request("_type names no type")),
        Some(t) => t,
        None => phivault_fhir::resource_types()
            .filter(|t| !compartment_only || phivault_records::access::in_compartment(t))
            .filter(|t| vault.decide_unconfined(auth, t, Interaction::Read).is_ok())
            .map(str::to_owned)
            .collect(),
    };
    let mut types = Vec::with_capacity(wanted.len());
    for t in &wanted {
        if compartment_only && !phivault_records::access::in_compartment(t) {
            return Err(Error::bad_request(
                "a patient or group export holds compartment types only",
            ));
        }
        // only back-end clients' system/ read scopes, and within them
        types.push(vault.decide_unconfined(auth, t, Interaction::Read)?);
    }
    if types.is_empty() {
        return Err(Error::forbidden());
    }
    Ok(KickOff {
        level,
        types,
        since_ms,
    })
}

/// A FHIR instant (or date) as ms since the epoch.
fn instant_ms(v: &str) -> Result<i64, Error> {
    use time::format_description::well_known::Rfc3339;
    let bad = || {
        Error::bad_request("_since must be a FHIR instant, with a time zone (2026-01-31T12:00:00Z)")
    };
    let t = time::OffsetDateTime::parse(v, &Rfc3339).map_err(|_| bad())?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad())
}
