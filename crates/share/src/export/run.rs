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
                Item::Damaged(row) => {
                    files.damaged(&row.rtype, &row.id);
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

/// Run job `id` (its record written, `Running`) on a thread of its own: its files, then
/// its record `Done` (expiring `expiry_ms` after) or `Failed`.
pub fn start(vault: Arc<Vault>, id: String, plan: Plan, mut files: Files, expiry_ms: u64) {
    let progress = Arc::new(Progress::default());
    RUNNING.lock().insert(id.clone(), progress.clone());
    let job = id.clone();
    let spawned = std::thread::Builder::new()
        .name("export".into())
        .spawn(move || {
            let _slot = SLOT.lock();
            let mut last_beat = crate::now_ms();
            let mut beat = |_: u64| {
                let now = crate::now_ms();
                if now >= last_beat + 30_000 {
                    last_beat = now;
                    return heartbeat(&vault, &job, now);
                }
                true
            };
            let r = write(&vault, &plan, &mut files, &progress, &mut beat);
            let (out, errors) = files.into_parts();
            let now = crate::now_ms();
            let _ = crate::rows::update::<JobRecord, ()>(&vault, &job, move |cur| {
                let Some(mut rec) = cur else {
                    return Ok((None, ()));
                };
                if rec.state != State::Running {
                    return Ok((None, ()));
                }
                match &r {
                    Ok(true) => {
                        rec.state = State::Done;
                        rec.files = out.clone();
                        rec.errors = errors.clone();
                        // whole seconds, as the Expires header says it
                        rec.expires_ms = (now + expiry_ms).div_ceil(1000) * 1000;
                    }
                    Ok(false) => rec.state = State::Cancelled,
                    Err(e) => {
                        tracing::warn!(error = %e, "an export failed");
                        rec.state = State::Failed;
                        rec.message = Some("the export could not be written".into());
                    }
                }
                rec.heartbeat_ms = now;
                Ok((Some(rec), ()))
            });
            RUNNING.lock().remove(&job);
        });
    if spawned.is_err() {
        RUNNING.lock().remove(&id);
        tracing::error!("an export thread could not start");
    }
}

/// Record that the job lives; false when it was cancelled (by any node).
fn heartbeat(vault: &Arc<Vault>, id: &str, now: u64) -> bool {
    crate::rows::update::<JobRecord, bool>(vault, id, move |cur| match cur {
        Some(mut rec) if rec.state == State::Running => {
            rec.heartbeat_ms = now;
            Ok((Some(rec), true))
        }
        _ => Ok((None, false)),
    })
    .unwrap_or(false)
}
