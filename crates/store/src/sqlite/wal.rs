//! The write-ahead log: passive checkpoints beside the writer, and restarts of the log by
//! the writer.
//!
//! Automatic checkpoints are off (one inside a commit would stall every request waiting on
//! that commit): a thread of its own checkpoints passively ([`checkpoint_loop`]), copying
//! committed frames into the database without blocking the writer or readers, so commits
//! stay fast.
//!
//! Passive checkpoints alone never make the WAL start again from its beginning while
//! readers come one after another (a reader in flight pins the log), so under a steady
//! read load — every read appends an audit event — the file would grow without bound
//! (480 MB in 20 s of `GET` at 16,000 req/s), every commit would extend it, and every page
//! a reader looks up would be searched for in a WAL index that keeps growing. So the
//! writer counts the log's frames through a WAL hook ([`note_wal_frames`]) and, after a
//! group, restarts a long log ([`WalRestarter`], [`restart_wal`]), backing off while a
//! long read holds it. A clean stop folds the log back into the database ([`checkpoint`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use rusqlite::{Connection, OpenFlags};

use super::{BUSY_TIMEOUT, configure, engine};
use crate::StoreError;

pub(super) type Stop = Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>;

/// How often the WAL is folded back into the database while the server runs.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Frames in the WAL past which the writer restarts it (see [`restart_wal`]): 2,048 pages
/// of 4 KiB, 8 MiB. (Under `GET` load, 512 and 2,048 served the same; 8,192 a little less.)
const WAL_RESTART_FRAMES: u64 = 2_048;

/// How long a WAL restart waits for readers still reading old frames; it gives up (and is
/// tried again later) rather than hold the writer longer.
const WAL_RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// After restarts that readers held off, the next try waits 5 ms, doubled after each one
/// that fails again up to this: a long read transaction (an export, a backup, an operator's
/// `sqlite3`) then costs the writer one wait every quarter of a second, not one per group.
const WAL_RESTART_RETRY_MAX: std::time::Duration = std::time::Duration::from_millis(250);

/// When the writer restarts the WAL, shared with the store (tests change and watch it).
#[derive(Debug)]
pub(super) struct WalRestart {
    /// Frames in the log past which the writer restarts it.
    pub(super) frames: AtomicU64,
    /// Restarts tried so far.
    pub(super) tries: AtomicU64,
}

impl WalRestart {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(WalRestart {
            frames: AtomicU64::new(WAL_RESTART_FRAMES),
            tries: AtomicU64::new(0),
        })
    }
}

/// The writer's side of WAL restarts: when the next one may be tried.
pub(super) struct WalRestarter {
    shared: Arc<WalRestart>,
    /// No restart is tried before this (set after one that readers held off).
    retry_at: Option<std::time::Instant>,
    /// Restarts held off in a row.
    held_off: u32,
}

impl WalRestarter {
    pub(super) fn new(shared: Arc<WalRestart>) -> Self {
        WalRestarter {
            shared,
            retry_at: None,
            held_off: 0,
        }
    }

    /// After a group is answered (the wait for readers delays the next group only): restart
    /// the WAL if it is long and no back-off holds the try.
    pub(super) fn after_group(&mut self, conn: &Connection) {
        let now = std::time::Instant::now();
        if WAL_FRAMES.with(std::cell::Cell::get) < self.shared.frames.load(Ordering::Relaxed)
            || self.retry_at.is_some_and(|t| now < t)
        {
            return;
        }
        self.shared.tries.fetch_add(1, Ordering::Relaxed);
        match restart_wal(conn) {
            Restart::Done => {
                WAL_FRAMES.with(|f| f.set(0));
                self.retry_at = None;
                self.held_off = 0;
            }
            // it gave up at once: again after the next group
            Restart::Checkpointing => {}
            Restart::HeldOff => {
                let wait = std::time::Duration::from_millis(5)
                    .saturating_mul(1 << self.held_off.min(16))
                    .min(WAL_RESTART_RETRY_MAX);
                self.held_off = self.held_off.saturating_add(1);
                self.retry_at = Some(std::time::Instant::now() + wait);
            }
        }
    }
}

/// A WAL file longer than this is cut back to it when the log restarts.
pub(super) const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Passive checkpoints beside the writer, every [`CHECKPOINT_EVERY`] until `stop` is set.
fn checkpoint_loop(conn: Connection, stop: Stop) {
    let (lock, cv) = &*stop;
    loop {
        {
            let Ok(guard) = lock.lock() else { return };
            let Ok((guard, _)) = cv.wait_timeout_while(guard, CHECKPOINT_EVERY, |s| !*s) else {
                return;
            };
            if *guard {
                return;
            }
        }
        let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    }
}

/// Start [`checkpoint_loop`] on a connection of its own to the database at `path`.
pub(super) fn spawn_checkpointer(
    path: &Path,
    stop: Stop,
) -> Result<thread::JoinHandle<()>, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(engine)?;
    configure(&conn)?;
    thread::Builder::new()
        .name("phivault-sqlite-checkpoint".into())
        .spawn(move || checkpoint_loop(conn, stop))
        .map_err(|e| StoreError::Engine(format!("cannot start checkpoint thread: {e}")))
}

thread_local! {
    /// Frames in the WAL after the last commit of the writer connection on this thread.
    static WAL_FRAMES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The writer connection's WAL hook: SQLite calls it after each commit with the number of
/// frames in the log.
pub(super) fn note_wal_frames(
    _: &rusqlite::hooks::Wal,
    frames: std::ffi::c_int,
) -> rusqlite::Result<()> {
    let frames = u64::try_from(frames).unwrap_or(0);
    WAL_FRAMES.with(|f| f.set(frames));
    super::tap::after_commit(frames);
    Ok(())
}

/// How a WAL restart went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// The log is checkpointed and no reader reads from it: the next commit starts it again.
    Done,
    /// The checkpoint thread was checkpointing (SQLite gives up at once then).
    Checkpointing,
    /// Readers on old frames did not finish in time.
    HeldOff,
}

/// Checkpoint the whole WAL and wait (briefly) until no reader still reads from it, so the
/// writer's next transaction writes the log from its beginning again. The passive
/// checkpoints have copied almost every frame already; what is left is waiting for the
/// readers in flight, which take well under a millisecond each.
fn restart_wal(conn: &Connection) -> Restart {
    let _ = conn.busy_timeout(WAL_RESTART_WAIT);
    // (busy, frames in the log, frames checkpointed); the frames are -1 when the
    // checkpoint lock was taken
    let r = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
    });
    let _ = conn.busy_timeout(BUSY_TIMEOUT);
    match r {
        Ok((0, _)) => Restart::Done,
        Ok((_, -1)) => Restart::Checkpointing,
        _ => Restart::HeldOff,
    }
}

/// Fold the WAL back into the database file on a clean stop.
pub(super) fn checkpoint(conn: &Connection) {
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}
