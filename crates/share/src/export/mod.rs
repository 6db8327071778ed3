//! FHIR Bulk Data export (`$export` at system, `Patient` and `Group/{id}` level), knowing
//! no HTTP: a kick-off checked under the client's `system/` read grants (`job`), written
//! on a thread of its own (`run`) into files that never sit in plaintext (`files`: sealed
//! in the exchange area as they are written, or encrypted end to end to the client's
//! registered key), served only to the client that asked, and swept at expiry.
//!
//! The spec calls the file server "a particularly attractive target" and prescribes no
//! protection: here a file is sealed under a key that lives only in its job's record (a
//! MAC'd settings row), dropped at expiry — after which the bytes, wherever copies went,
//! open for no one.

pub mod files;
pub mod job;
pub mod run;

use std::io::Read;
use std::sync::Arc;

use phivault_auth::{Authenticated, Interaction};
use phivault_crypto::jose::EncryptionKey;
use phivault_records::Vault;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::area::{Area, Owner};
use crate::{Error, rows};
use files::{Files, Target};
use job::{JobRecord, Level, State};

/// How long after its last sign of life a running job is taken for dead (its node
/// stopped).
pub const STALE_MS: u64 = 120_000;
/// The client's poll interval we suggest (`Retry-After`, seconds).
pub const RETRY_AFTER_S: u64 = 2;

/// A client's registered export key (a public EC JWK, P-256 or P-384, `use` "enc" if
/// given); a private key is refused (its holder keeps it).
pub fn encryption_key(jwk: &Value) -> Result<EncryptionKey, Error> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    if jwk.get("d").is_some() {
        return Err(Error::bad_request(
            "the export key is a private key: register its public half",
        ));
    }
    if s("kty") != Some("EC") || s("use").is_some_and(|u| u != "enc") {
        return Err(Error::bad_request(
            "the export key is an EC public JWK for encryption",
        ));
    }
    EncryptionKey::from_jwk_parts(
        s("crv").unwrap_or(""),
        s("x").unwrap_or(""),
        s("y").unwrap_or(""),
        s("kid"),
    )
    .map_err(|_| Error::bad_request("the export key is not a valid P-256 or P-384 public key"))
}

/// The members of group `id` (`Patient/` references of `member.entity`).
fn members(vault: &Vault, auth: &Authenticated, id: &str) -> Result<Vec<String>, Error> {
    let access = vault.decide_unconfined(auth, "Group", Interaction::Read)?;
    let g = phivault_records::search::load(vault, &access, id)?
        .ok_or_else(|| Error::not_found("no such group"))?;
    let mut out: Vec<String> = g.json["member"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| x["entity"]["reference"].as_str())
                .filter_map(|r| r.strip_prefix("Patient/"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    Ok(out)
}

/// A kick-off as asked.
pub struct Asked<'a> {
    /// The level.
    pub level: Level,
    /// Its query's parameters.
    pub pairs: &'a [(String, String)],
    /// The kick-off URL, echoed in the manifest.
    pub request: &'a str,
    /// The client's registered encryption key, if it has one.
    pub e2e: Option<EncryptionKey>,
    /// How long the finished files are served (ms).
    pub expiry_ms: u64,
}

/// Start an export for `auth`: the job's id. A place on this node is taken before the
/// job's row is written (429 when there is none: at most [`run::MAX_QUEUED`] jobs a node,
/// [`run::MAX_PER_CLIENT`] a client).
pub fn kick_off(
    vault: &Arc<Vault>,
    area: &Area,
    auth: &Authenticated,
    asked: Asked<'_>,
) -> Result<String, Error> {
    let k = job::kick_off(vault, auth, asked.level.clone(), asked.pairs)?;
    let members = match &k.level {
        Level::Group(id) => members(vault, auth, id)?,
        _ => Vec::new(),
    };
    let id = crate::links::record::hex(
        &phivault_crypto::random_bytes::<16>().map_err(|_| Error::internal())?,
    );
    let Some(progress) = run::reserve(&id, auth.client_id()) else {
        return Err(Error::TooSoon {
            retry_after_s: 30,
            why: "too many exports are running",
        });
    };
    let plan = run::Plan {
        level: k.level,
        types: k.types,
        since_ms: k.since_ms,
        members,
        client: auth.client_id().to_owned(),
    };
    match start_job(vault, area, (&id, progress), plan, asked) {
        Ok(()) => Ok(id),
        Err(e) => {
            run::release(&id);
            Err(e)
        }
    }
}

/// Write job `id`'s row and start it (its place on this node taken).
fn start_job(
    vault: &Arc<Vault>,
    area: &Area,
    (id, progress): (&str, Arc<run::Progress>),
    plan: run::Plan,
    asked: Asked<'_>,
) -> Result<(), Error> {
    let key = Zeroizing::new(phivault_crypto::random_bytes::<32>().map_err(|_| Error::internal())?);
    let now = crate::now_ms();
    let rec = JobRecord {
        id: id.to_owned(),
        client: plan.client.clone(),
        request: asked.request.to_owned(),
        level: plan.level.clone(),
        types: plan.types.iter().map(|a| a.rtype().to_owned()).collect(),
        since_ms: plan.since_ms,
        created_ms: now,
        state: State::Running,
        heartbeat_ms: now,
        files: Vec::new(),
        errors: Vec::new(),
        expires_ms: 0,
        area_key: Some(crate::links::record::hex(&key[..])),
        e2e: asked
            .e2e
            .as_ref()
            .map(|k| (k.kid().map(str::to_owned), k.curve().to_owned())),
        message: None,
    };
    let written = rows::update::<JobRecord, bool>(vault, id, move |cur| {
        Ok(if cur.is_some() {
            (None, false)
        } else {
            (Some(rec.clone()), true)
        })
    })?;
    if !written {
        return Err(Error::internal());
    }
    let files = Files::new(
        Target::Area {
            area: area.clone(),
            key,
            job: id.to_owned(),
        },
        asked.e2e,
    )?;
    run::start(
        (vault.clone(), area.clone()),
        (id.to_owned(), progress),
        plan,
        files,
        asked.expiry_ms,
    );
    Ok(())
}

/// Where a job is, as its client sees it.
pub enum Status {
    /// Still writing: `X-Progress`.
    Running(String),
    /// Done: the record (files, expiry).
    Done(Box<JobRecord>),
    /// Failed: why (a fixed text).
    Failed(String),
}

/// Job `id` if it is `auth`'s and not gone (404 otherwise: another client's jobs are not
/// its to know of).
fn own(vault: &Vault, auth: &Authenticated, id: &str) -> Result<JobRecord, Error> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::not_found("no such export"));
    }
    match rows::load::<JobRecord>(vault, id)? {
        Some(r) if r.client == auth.client_id() && auth.person().is_none() => Ok(r),
        _ => Err(Error::not_found("no such export")),
    }
}

/// The status of job `id`.
pub fn status(vault: &Vault, area: &Area, auth: &Authenticated, id: &str) -> Result<Status, Error> {
    let rec = own(vault, auth, id)?;
    let now = crate::now_ms();
    match rec.state {
        State::Running => Ok(Status::Running(
            run::progress(id).map_or_else(|| "in progress".to_owned(), |p| p.text()),
        )),
        State::Done if now < rec.expires_ms => {
            // a patient erased since: gone at once, not at the next sweep
            if holds_erased(vault, area, &rec)? {
                return Err(Error::Records(phivault_records::Error::erased()));
            }
            Ok(Status::Done(Box::new(rec)))
        }
        State::Failed => Ok(Status::Failed(rec.message.clone().unwrap_or_default())),
        State::Erased => Err(Error::Records(phivault_records::Error::erased())),
        _ => Err(Error::not_found("this export has expired or was cancelled")),
    }
}

/// The completion manifest of a finished job whose files are served under `files_url`
/// (`{files_url}/file/{n}`, `{files_url}/error/{n}`).
pub fn manifest(rec: &JobRecord, files_url: &str) -> Value {
    let ext = rec.e2e.as_ref().map(|(kid, crv)| {
        json!({"encryption": {"alg": "ECDH-ES", "enc": "A256GCM", "kid": kid, "crv": crv,
            "contentType": "application/jose", "cty": files::NDJSON}})
    });
    let list = |v: &[job::OutFile], kind: &str| -> Vec<Value> {
        v.iter()
            .enumerate()
            .map(|(n, f)| {
                let mut o = json!({"type": f.rtype, "url": format!("{files_url}/{kind}/{n}"), "count": f.count});
                if let Some(e) = &ext {
                    o["extension"] = e.clone();
                }
                o
            })
            .collect()
    };
    let mut m = json!({
        "transactionTime": phivault_records::engine::instant(rec.created_ms as i64),
        "request": rec.request,
        "requiresAccessToken": true,
        "output": list(&rec.files, "file"),
        "error": list(&rec.errors, "error"),
    });
    if let Some(e) = ext {
        m["extension"] = e;
    }
    m
}

/// Cancel job `id` (running or done): its key dropped, its files removed.
pub fn cancel(
    vault: &Arc<Vault>,
    area: &Area,
    auth: &Authenticated,
    id: &str,
) -> Result<(), Error> {
    let rec = own(vault, auth, id)?;
    if !matches!(rec.state, State::Running | State::Done | State::Failed) {
        return Err(Error::not_found("no such export"));
    }
    if let Some(p) = run::progress(id) {
        p.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    end(vault, area, id, State::Cancelled, |r| {
        matches!(r.state, State::Running | State::Done | State::Failed)
    })?;
    Ok(())
}

/// End job `id` (state `to`, its key dropped) if `still` holds of it as stored, and remove
/// its files; whether it was ended.
fn end(
    vault: &Arc<Vault>,
    area: &Area,
    id: &str,
    to: State,
    still: impl Fn(&JobRecord) -> bool + Send + 'static,
) -> Result<bool, Error> {
    let ended = rows::update::<JobRecord, bool>(vault, id, move |cur| match cur {
        Some(mut r) if still(&r) => {
            r.state = to;
            r.area_key = None;
            Ok((Some(r), true))
        }
        _ => Ok((None, false)),
    })?;
    if ended {
        area.remove_prefix(&Owner::EXPORT.files_of(id))
            .map_err(|_| Error::Records(phivault_records::Error::unavailable()))?;
    }
    Ok(ended)
}

/// A file being served.
pub struct Download {
    /// Its bytes, opened as read.
    pub body: Box<dyn Read + Send>,
    /// `application/fhir+ndjson`, or `application/jose` end to end.
    pub content_type: &'static str,
    /// The type of its resources.
    pub rtype: String,
    /// The patients it holds (for the audit event).
    pub patients: Vec<String>,
}

/// File `n` (`error`: of the error files) of job `id`, for `auth`.
pub fn open_file(
    vault: &Vault,
    area: &Area,
    auth: &Authenticated,
    id: &str,
    error: bool,
    n: usize,
) -> Result<Download, Error> {
    let rec = match status(vault, area, auth, id)? {
        Status::Done(r) => r,
        _ => return Err(Error::not_found("this export has no files now")),
    };
    let list = if error { &rec.errors } else { &rec.files };
    let f = list
        .get(n)
        .ok_or_else(|| Error::not_found("no such file"))?;
    let key = rec
        .area_key()
        .ok_or_else(|| Error::not_found("no such file"))?;
    if !error {
        // the grant as it is now (a client whose scopes were narrowed since gets no more)
        vault.decide_unconfined(auth, &f.rtype, Interaction::Read)?;
    }
    let body = area.reader(&f.name, &key).map_err(crate::unread)?;
    let patients = files::patients_of(area, &key, &f.name)?;
    if any_erased(vault, &patients)? {
        return Err(Error::Records(phivault_records::Error::erased()));
    }
    Ok(Download {
        body: Box::new(body),
        content_type: if rec.e2e.is_some() {
            "application/jose"
        } else {
            "application/fhir+ndjson"
        },
        rtype: f.rtype.clone(),
        patients,
    })
}

/// Whether any of `patients` was erased.
fn any_erased(vault: &Vault, patients: &[String]) -> Result<bool, Error> {
    // the erasure markers read once (erasures are few; a file names thousands of patients)
    let erased = vault.engine.meta_prefix(ERASED_PATIENTS, usize::MAX)?;
    if erased.is_empty() {
        return Ok(false);
    }
    let erased: std::collections::HashSet<&str> = erased
        .iter()
        .map(|(k, _)| &k[ERASED_PATIENTS.len()..])
        .collect();
    Ok(patients.iter().any(|p| erased.contains(p.as_str())))
}

/// The prefix of the erasure markers of patients' data keys.
const ERASED_PATIENTS: &str = "erased:p:";

/// Whether a finished job's files hold a patient erased since (then it ends: an erased
/// patient's records leave in no export).
fn holds_erased(vault: &Vault, area: &Area, rec: &JobRecord) -> Result<bool, Error> {
    let Some(key) = rec.area_key() else {
        return Ok(false);
    };
    for f in rec.files.iter().chain(&rec.errors) {
        // (a list that cannot be read counts as holding one: the job ends)
        match files::patients_of(area, &key, &f.name) {
            Ok(list) if !any_erased(vault, &list)? => {}
            _ => return Ok(true),
        }
    }
    Ok(false)
}

/// A condition a job's row must still meet when it is ended.
type Still = Box<dyn Fn(&JobRecord) -> bool + Send>;

/// Drop what has ended: finished jobs past their expiry or holding a patient erased since,
/// running ones whose node stopped (no beat for [`STALE_MS`]), any other that still has a
/// key; and files no live job names that are older than [`STALE_MS`] (an export cut
/// short). Each decision is checked again against the row as it is when it is made. The
/// jobs swept.
pub fn sweep(vault: &Arc<Vault>, area: &Area) -> Result<usize, Error> {
    let now = crate::now_ms();
    let mut n = 0;
    let mut live = std::collections::HashSet::new();
    let mut jobs = Vec::new();
    rows::each::<JobRecord>(vault, &mut |r| jobs.push(r))?;
    for rec in &jobs {
        // (one node: a running job this process does not run is dead — it stopped)
        let alone = !vault.engine.shared_by_nodes();
        let stale = move |r: &JobRecord| {
            r.state == State::Running
                && (alone || crate::now_ms() >= r.heartbeat_ms + STALE_MS)
                && run::progress(&r.id).is_none()
        };
        let (to, still): (State, Still) = match rec.state {
            State::Done if now >= rec.expires_ms => (
                State::Expired,
                Box::new(|r: &JobRecord| r.state == State::Done && crate::now_ms() >= r.expires_ms),
            ),
            State::Done if holds_erased(vault, area, rec)? => (
                State::Erased,
                Box::new(|r: &JobRecord| r.state == State::Done),
            ),
            State::Running if stale(rec) => (State::Failed, Box::new(stale)),
            s @ (State::Failed | State::Cancelled | State::Expired | State::Erased)
                if rec.area_key.is_some() =>
            {
                (s, Box::new(move |r: &JobRecord| r.state == s))
            }
            _ => {
                if rec.area_key.is_some() {
                    live.insert(rec.id.clone());
                }
                continue;
            }
        };
        if end(vault, area, &rec.id, to, still)? {
            n += 1;
        } else {
            live.insert(rec.id.clone());
        }
    }
    sweep_orphans(vault, area, &live);
    Ok(n)
}

/// Remove area files of no live job, older than [`STALE_MS`] (a job kicked off after the
/// rows were read has fresh files, and its row is read again before anything goes).
fn sweep_orphans(vault: &Vault, area: &Area, live: &std::collections::HashSet<String>) {
    for name in area.names(Owner::EXPORT.all()).unwrap_or_default() {
        let id = Owner::EXPORT.id_of(&name).unwrap_or("");
        if live.contains(id) || run::progress(id).is_some() {
            continue;
        }
        let old = std::fs::metadata(area.dir().join(&name))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_millis() as u64 >= STALE_MS);
        let keyed = rows::load::<JobRecord>(vault, id)
            .ok()
            .flatten()
            .is_some_and(|r| r.area_key.is_some());
        if old && !keyed {
            let _ = area.remove(&name);
        }
    }
}
