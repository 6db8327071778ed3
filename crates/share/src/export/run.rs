//! Writing an export: every type of the kick-off, level by level (system: every record the
//! access reaches; `Patient`: those belonging to a patient; `Group`: each member's
//! compartment), into [`Files`]; and the server's jobs — one at a time per node, on a
//! thread of their own, their progress in memory for `X-Progress`, cancellable.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use phivault_records::bulk::{self, Item};
use phivault_records::engine::key_patient;
use phivault_records::{Access, Vault};

use super::files::Files;
use super::job::{JobRecord, Level, State};
use crate::Error;
use crate::area::Area;

/// A job's progress as this node sees it.
#[derive(Default)]
pub struct Progress {
    /// Resources written so far.
    pub resources: AtomicU64,
    /// Types finished.
    pub types_done: AtomicU64,
    /// Types in all.
    pub types: AtomicU64,
    /// Set to stop the job.
    pub cancel: AtomicBool,
    /// Set once the job has ended (its beat stops).
    pub finished: AtomicBool,
    /// The client that asked.
    pub client: String,
}

impl Progress {
    /// `X-Progress`: how far, in words.
    pub fn text(&self) -> String {
        format!(
            "{} of {} types, {} resources",
            self.types_done.load(Ordering::Relaxed),
            self.types.load(Ordering::Relaxed),
            self.resources.load(Ordering::Relaxed)
        )
    }
}

/// Jobs running on this node.
static RUNNING: std::sync::LazyLock<parking_lot::Mutex<HashMap<String, Arc<Progress>>>> =
    std::sync::LazyLock::new(Default::default);
/// One export writes at a time on a node (the rest wait their turn).
static SLOT: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// The progress of job `id` if it runs on this node.
pub fn progress(id: &str) -> Option<Arc<Progress>> {
    RUNNING.lock().get(id).cloned()
}

/// What to write.
pub struct Plan {
    /// Level.
    pub level: Level,
    /// Each type with its access.
    pub types: Vec<Access>,
    /// `_since` (ms).
    pub since_ms: Option<i64>,
    /// A group's patients.
    pub members: Vec<String>,
    /// The client that asked (empty offline).
    pub client: String,
}

/// Write every record of `plan` into `files`; `tick` is told the total so far every 1,000
/// resources and answers whether to go on.
pub fn write(
    vault: &Vault,
    plan: &Plan,
    files: &mut Files,
    progress: &Progress,
    tick: &mut dyn FnMut(u64) -> bool,
) -> Result<bool, Error> {
    progress
        .types
        .store(plan.types.len() as u64, Ordering::Relaxed);
    let mut failed: Option<Error> = None;
    for access in &plan.types {
        let rtype = access.rtype().to_owned();
        let mut visit = |item: Item<'_>| -> bool {
            let r = match item {
                Item::Record(row, body) => {
                    let owner = key_patient(&row.key_id);
                    if plan.level == Level::Patient && owner.is_none() {
                        return true;
                    }
                    files.line(&rtype, owner, &body)
                }
                Item::Damaged { rtype, id } => {
                    files.damaged(rtype, id);
                    Ok(())
                }
            };
            if let Err(e) = r {
                failed = Some(e);
                return false;
            }
            let n = progress.resources.fetch_add(1, Ordering::Relaxed) + 1;
            !n.is_multiple_of(1000) || (tick(n) && !progress.cancel.load(Ordering::Relaxed))
        };
        let went_on = match &plan.level {
            Level::System | Level::Patient => {
                bulk::each_current(vault, access, plan.since_ms, &mut visit)?
            }
            Level::Group(_) => {
                let mut all = true;
                for p in &plan.members {
                    if !bulk::each_of_patient(vault, access, p, plan.since_ms, &mut visit)? {
                        all = false;
                        break;
                    }
                }
                all
            }
        };
        if let Some(e) = failed {
            return Err(e);
        }
        if !went_on {
            return Ok(false);
        }
        files.finish_file()?;
        progress.types_done.fetch_add(1, Ordering::Relaxed);
    }
    files.finish()?;
    Ok(true)
}

/// Jobs running or waiting on this node, at most (a kick-off beyond is answered 429).
pub const MAX_QUEUED: usize = 8;
/// Of those, at most this many of one client.
pub const MAX_PER_CLIENT: usize = 2;
/// How often a running job's row is stamped as alive.
const BEAT_MS: u64 = 15_000;

/// Take a place on this node for job `id` of `client` (None: no room now). Taken before
/// the job's row is written, so a sweep never sees a job of this node it does not know.
pub fn reserve(id: &str, client: &str) -> Option<Arc<Progress>> {
    let mut running = RUNNING.lock();
    let room = running.len() < MAX_QUEUED
        && running.values().filter(|p| p.client == client).count() < MAX_PER_CLIENT;
    room.then(|| {
        let p = Arc::new(Progress {
            client: client.to_owned(),
            ..Progress::default()
        });
        running.insert(id.to_owned(), p.clone());
        p
    })
}

/// Give a place back (a kick-off that failed before its job started).
pub fn release(id: &str) {
    RUNNING.lock().remove(id);
}

/// Run job `id` (its record written, `Running`) on a thread of its own: its files, then
/// its record `Done` (expiring `expiry_ms` after), or `Failed`/`Cancelled` with its key
/// dropped and its files removed. While it runs (or waits its turn) a second thread stamps
/// its row every [`BEAT_MS`] and stops it when another node cancelled it.
pub fn start(
    (vault, area): (Arc<Vault>, Area),
    (id, progress): (String, Arc<Progress>),
    plan: Plan,
    mut files: Files,
    expiry_ms: u64,
) {
    let (job, beat_vault, beat_job, beat_progress) =
        (id.clone(), vault.clone(), id.clone(), progress.clone());
    let beating = std::thread::Builder::new()
        .name("export-beat".into())
        .spawn(move || {
            let mut last = crate::now_ms();
            while !beat_progress.finished.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(250));
                let now = crate::now_ms();
                if now >= last + BEAT_MS {
                    last = now;
                    if heartbeat(&beat_vault, &beat_job, now) == Some(false) {
                        beat_progress.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        });
    let spawned = std::thread::Builder::new()
        .name("export".into())
        .spawn(move || {
            let _slot = SLOT.lock();
            let r = if progress.cancel.load(Ordering::Relaxed) {
                Ok(false)
            } else {
                write(&vault, &plan, &mut files, &progress, &mut |_| true)
            };
            let (out, errors) = files.into_parts();
            finish(&vault, &area, &job, r, out, errors, expiry_ms);
            progress.finished.store(true, Ordering::Relaxed);
            RUNNING.lock().remove(&job);
        });
    if beating.is_err() || spawned.is_err() {
        if let Some(p) = RUNNING.lock().remove(&id) {
            p.cancel.store(true, Ordering::Relaxed);
            p.finished.store(true, Ordering::Relaxed);
        }
        tracing::error!("an export thread could not start");
    }
}

/// Record how job `id` ended; one that did not finish loses its key and its files.
fn finish(
    vault: &Arc<Vault>,
    area: &Area,
    job: &str,
    r: Result<bool, Error>,
    out: Vec<super::job::OutFile>,
    errors: Vec<super::job::OutFile>,
    expiry_ms: u64,
) {
    let now = crate::now_ms();
    if let Err(e) = &r {
        tracing::warn!(error = %e, "an export failed");
    }
    let done = crate::rows::update::<JobRecord, bool>(vault, job, move |cur| {
        let Some(mut rec) = cur else {
            return Ok((None, false));
        };
        if rec.state != State::Running {
            // cancelled (or failed by a sweep) meanwhile: what was written goes
            return Ok((None, false));
        }
        match &r {
            Ok(true) => {
                rec.state = State::Done;
                rec.files = out.clone();
                rec.errors = errors.clone();
                // whole seconds, as the Expires header says it
                rec.expires_ms = (now + expiry_ms).div_ceil(1000) * 1000;
            }
            Ok(false) => {
                rec.state = State::Cancelled;
                rec.area_key = None;
            }
            Err(_) => {
                rec.state = State::Failed;
                rec.message = Some("the export could not be written".into());
                rec.area_key = None;
            }
        }
        rec.heartbeat_ms = now;
        let done = rec.state == State::Done;
        Ok((Some(rec), done))
    })
    .unwrap_or(false);
    if !done {
        let _ = area.remove_prefix(&crate::area::Owner::EXPORT.files_of(job));
    }
}

/// Stamp job `id` as alive: Some(false) when it no longer runs (cancelled, by any node);
/// None when the store could not be reached (tried again at the next beat).
fn heartbeat(vault: &Arc<Vault>, id: &str, now: u64) -> Option<bool> {
    crate::rows::update::<JobRecord, bool>(vault, id, move |cur| match cur {
        Some(mut rec) if rec.state == State::Running => {
            rec.heartbeat_ms = now;
            Ok((Some(rec), true))
        }
        _ => Ok((None, false)),
    })
    .ok()
}
