//! The resources' heads loaded beside the rest of a start-up: a thread reads `resource_no`
//! in a snapshot of its own, sums it, and compares the sum with the state signed with that
//! snapshot's head (see [`crate::integrity`]). Everything that needs the heads — every
//! read of a resource, the writer's first group, the background check — waits for it
//! ([`HeadsGate::wait`]); `serve` waits before it listens ([`super::SqliteStore::ready`]),
//! so a store whose heads were rolled back still refuses to start, while the load runs
//! during the seconds' other work of a start instead of before it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use parking_lot::{Mutex, RwLock};
use phivault_audit::ChainHead;
use rusqlite::{Connection, OpenFlags};

use super::{configure, engine};
use crate::StoreError;
use crate::integrity::{Integrity, Known};

enum State {
    Loading(thread::JoinHandle<Result<Known, StoreError>>),
    Ready,
    Failed(String),
}

/// See the module documentation.
pub(super) struct HeadsGate {
    ready: AtomicBool,
    state: Mutex<State>,
    known: Arc<RwLock<Known>>,
}

impl HeadsGate {
    /// Heads already in `known` (a store adopted or created empty).
    pub(super) fn loaded(known: Arc<RwLock<Known>>) -> Arc<HeadsGate> {
        Arc::new(HeadsGate {
            ready: AtomicBool::new(true),
            state: Mutex::new(State::Ready),
            known,
        })
    }

    /// Load the heads of the database at `path` on a thread of its own.
    pub(super) fn spawn(
        path: &Path,
        integ: Arc<Integrity>,
        known: Arc<RwLock<Known>>,
    ) -> Result<Arc<HeadsGate>, StoreError> {
        let path: PathBuf = path.to_path_buf();
        let empty = known.read().like();
        let handle = thread::Builder::new()
            .name("phivault-heads".into())
            .spawn(move || load(&path, &integ, empty))
            .map_err(|e| StoreError::Engine(format!("cannot start the heads thread: {e}")))?;
        Ok(Arc::new(HeadsGate {
            ready: AtomicBool::new(false),
            state: Mutex::new(State::Loading(handle)),
            known,
        }))
    }

    /// Wait until the heads are loaded and checked; the refusal if they did not check.
    pub(super) fn wait(&self) -> Result<(), StoreError> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut state = self.state.lock();
        match std::mem::replace(&mut *state, State::Ready) {
            State::Ready => Ok(()),
            State::Failed(why) => {
                *state = State::Failed(why.clone());
                Err(StoreError::Tampered(why))
            }
            State::Loading(handle) => {
                let loaded = handle
                    .join()
                    .unwrap_or_else(|_| Err(StoreError::Engine("the heads thread stopped".into())));
                match loaded {
                    Ok(heads) => {
                        // nothing touched the heads meanwhile: everything waits here first
                        self.known.write().heads = heads.heads;
                        self.ready.store(true, Ordering::Release);
                        Ok(())
                    }
                    Err(e) => {
                        let why = match e {
                            StoreError::Tampered(why) => why,
                            other => format!("the resources' heads cannot be read ({other})"),
                        };
                        *state = State::Failed(why.clone());
                        Err(StoreError::Tampered(why))
                    }
                }
            }
        }
    }
}

/// The heads of the database at `path` in one snapshot, checked against the state
/// signed with that snapshot's head.
fn load(path: &Path, integ: &Integrity, mut known: Known) -> Result<Known, StoreError> {
    let started = std::time::Instant::now();
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(engine)?;
    configure(&c)?;
    c.execute_batch("BEGIN").map_err(engine)?;
    let Some((size, hash, state, _)) = super::trust::head_row(&c)? else {
        // (no head: nothing was ever written; `trust::load` refused any rows without one)
        return Ok(known);
    };
    let head = ChainHead {
        size: u64::try_from(size).map_err(|_| super::trust::tampered("the audit head's size"))?,
        hash: hash
            .try_into()
            .map_err(|_| super::trust::tampered("the audit head's hash is not 32 bytes"))?,
    };
    let signed = integ.open_state(&head, &state).ok_or_else(|| {
        super::trust::tampered("the audit head's state summary does not open under this master key")
    })?;
    let sum = super::state::load_heads(&c, integ, &mut known)?;
    let _ = c.execute_batch("COMMIT");
    if sum != signed.heads {
        return Err(super::trust::tampered(
            "the resources' current versions differ from the signed state: a record was rolled back, removed, added or marked deleted",
        ));
    }
    tracing::info!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        resources = known.heads.len(),
        "the resources' heads were checked against the signed state"
    );
    Ok(known)
}
