//! The write-ahead log's tap (issue 19): every page the writer commits, handed to a
//! backup shipper, and snapshots of the database at a known point of that stream.
//!
//! SQLite calls the writer connection's WAL hook after each commit with the number of
//! frames now in the log. The hook ([`after_commit`]) reads the frames added since it last
//! looked straight from the `-wal` file (they are in the page cache: a commit of a few
//! pages costs microseconds) and keeps the newest image of each page: a restore point is
//! the end of a shipped batch, so the images in between never matter. Reading at once,
//! on the writer thread, is what makes the stream complete: the log can start again from
//! its beginning (the writer's restarts, an erasure's truncation) only in a later
//! transaction of this same thread, after every frame of this one was read.
//!
//! Commits are numbered as the hook sees them. The writer then *publishes* them with the
//! audit log's size and the number of resources ([`note_head`]), so a batch the shipper
//! takes ([`WalTap::take`]) ends at a commit whose audit position is known.
//!
//! What the tap cannot see, it reports instead of guessing: another process's commit (the
//! writer notices through `data_version`), a frame overwritten before it was read, a read
//! error. Then [`Changes::broken`] says why, and the shipper must start again from a new
//! snapshot.
//!
//! A snapshot ([`crate::sqlite::SqliteStore::snapshot_to`]) pins a read transaction on
//! the writer thread between two commits, so it is exactly at a numbered commit, and
//! copies the pages with SQLite's backup API on the caller's thread (the writer goes on).
//! A snapshot at commit `c` followed by every batch ending after `c`, applied in order
//! (page images written at their offsets, the file cut to the last commit's size), is the
//! database as of that batch's end: each page ends as its newest image, and a page last
//! written at or before `c` has in the snapshot the image it had then.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

/// The WAL file header's size.
const WAL_HEADER: u64 = 32;
/// A frame header's size.
const FRAME_HEADER: u64 = 24;

/// Pages committed and published since the shipper last took them.
#[derive(Debug, Default)]
pub struct Changes {
    /// The database's page size.
    pub page_size: u32,
    /// The database's size in pages after the last commit.
    pub db_pages: u32,
    /// The newest image of every page written, by page number (from 1).
    pub pages: BTreeMap<u32, Vec<u8>>,
    /// The first and last commit taken (numbered from 1 since the tap was installed).
    pub first_commit: u64,
    pub last_commit: u64,
    /// When the first of them committed (ms since the epoch): how long they waited.
    pub first_commit_ms: i64,
    /// The audit log's size and the number of resources after the last commit.
    pub audit_size: u64,
    pub resources: u64,
    /// Why the stream is not complete since the last take (another process wrote, a
    /// frame was lost): the shipper starts again from a snapshot.
    pub broken: Option<String>,
}

impl Changes {
    /// Bytes of page images held.
    pub fn bytes(&self) -> usize {
        self.pages.len() * self.page_size as usize
    }
}

/// Where a snapshot is in the tap's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPoint {
    /// The last commit the snapshot includes.
    pub commit: u64,
    /// The audit log's size and the number of resources there.
    pub audit_size: u64,
    pub resources: u64,
}

/// Pages committed and not yet taken: the newest image of each. An image already held is
/// overwritten in place, so a page the writer changes in commit after commit costs one copy
/// each time and no allocation.
#[derive(Debug, Default)]
struct Frames {
    newest: HashMap<u32, Vec<u8>>,
    db_pages: u32,
    first_commit: u64,
    last_commit: u64,
    first_commit_ms: i64,
    broken: Option<String>,
}

impl Frames {
    fn into_changes(self, page_size: u32) -> Changes {
        Changes {
            page_size,
            db_pages: self.db_pages,
            pages: self.newest.into_iter().collect(),
            first_commit: self.first_commit,
            last_commit: self.last_commit,
            first_commit_ms: self.first_commit_ms,
            audit_size: 0,
            resources: 0,
            broken: self.broken,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// The open `-wal` file (opened on the first commit).
    file: Option<File>,
    /// The log's salt when it was last read; `None` before the first read.
    salt: Option<[u8; 8]>,
    /// Frames of the current log already read.
    read_frames: u64,
    page_size: u32,
    /// Commits hooked so far.
    commits: u64,
    /// The read buffer, kept between commits (it only grows).
    buf: Vec<u8>,
    /// Pages of the commits read and not yet taken; `last_commit` is the last published.
    staged: Frames,
    /// A commit was read but not yet published (its audit size is not known yet): a take
    /// waits for the publication, so that a batch never holds half-described commits.
    unpublished: Option<u64>,
    /// The size and resources noted with the last publication.
    audit_size: u64,
    resources: u64,
}

/// The tap shared by the writer thread (which fills it) and a shipper (which takes).
#[derive(Debug)]
pub struct WalTap {
    wal_path: PathBuf,
    state: Mutex<State>,
}

impl WalTap {
    pub(super) fn new(db_path: &Path) -> Arc<Self> {
        let mut wal = db_path.as_os_str().to_owned();
        wal.push("-wal");
        Arc::new(WalTap {
            wal_path: PathBuf::from(wal),
            state: Mutex::new(State::default()),
        })
    }

    /// Take every published commit (`None` when there is none and nothing broke).
    pub fn take(&self) -> Option<Changes> {
        let mut tries = 0;
        let (ready, page_size, audit_size, resources) = loop {
            let mut s = self.state.lock();
            if s.unpublished.is_some() {
                // (the writer publishes right after its group: microseconds)
                drop(s);
                tries += 1;
                if tries > 200 {
                    return None;
                }
                std::thread::sleep(std::time::Duration::from_micros(500));
                continue;
            }
            if s.staged.last_commit == 0 && s.staged.broken.is_none() {
                return None;
            }
            break (
                std::mem::take(&mut s.staged),
                s.page_size,
                s.audit_size,
                s.resources,
            );
        };
        // (the pages are cut out here, on the caller's thread: the writer does not wait)
        let mut c = ready.into_changes(page_size);
        c.audit_size = audit_size;
        c.resources = resources;
        Some(c)
    }

    /// The stream is broken (the shipper starts again from a snapshot).
    fn break_stream(s: &mut State, why: &str) {
        if s.staged.broken.is_none() {
            s.staged.broken = Some(why.to_owned());
        }
        // the next read starts from whatever log is there
        s.salt = None;
        s.read_frames = 0;
    }

    /// The writer committed: read the frames added to the log.
    fn after_commit(&self, frames: u64) {
        let mut s = self.state.lock();
        s.commits += 1;
        let commit = s.commits;
        if let Err(why) = self.read_frames(&mut s, frames) {
            Self::break_stream(&mut s, &why);
        }
        if s.staged.first_commit == 0 {
            s.staged.first_commit = commit;
            s.staged.first_commit_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        }
        s.unpublished = Some(commit);
    }

    fn read_frames(&self, s: &mut State, frames: u64) -> Result<(), String> {
        if s.file.is_none() {
            s.file =
                Some(File::open(&self.wal_path).map_err(|e| format!("cannot open the WAL: {e}"))?);
        }
        let Some(file) = s.file.as_ref() else {
            return Ok(());
        };
        let mut header = [0u8; WAL_HEADER as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| format!("cannot read the WAL header: {e}"))?;
        let page_size = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        // (65,536 is stored as 1)
        let page_size = if page_size == 1 { 65_536 } else { page_size };
        if !(512..=65_536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err("the WAL header names no valid page size".into());
        }
        let mut salt = [0u8; 8];
        salt.copy_from_slice(&header[16..24]);
        let from = if s.salt == Some(salt) {
            if frames < s.read_frames {
                return Err("the WAL shrank without starting again".into());
            }
            s.read_frames
        } else {
            // the log started again (this transaction was its first)
            0
        };
        s.salt = Some(salt);
        s.page_size = page_size;
        let frame_len = FRAME_HEADER + u64::from(page_size);
        let count = frames - from;
        if count == 0 {
            return Ok(());
        }
        let len = usize::try_from(count * frame_len).map_err(|_| "WAL range too large")?;
        let State { buf, staged, .. } = s;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let buf = &mut buf[..len];
        file.read_exact_at(buf, WAL_HEADER + from * frame_len)
            .map_err(|e| format!("cannot read WAL frames: {e}"))?;
        // (every frame checked before any is kept: a refused read leaves nothing behind)
        let step = usize::try_from(frame_len).unwrap_or(usize::MAX);
        let mut db_pages = None;
        for frame in buf.chunks_exact(step) {
            if frame[8..16] != salt {
                return Err("a WAL frame was overwritten before it was read".into());
            }
            if frame[..4] == [0, 0, 0, 0] {
                return Err("a WAL frame names page 0".into());
            }
            let commit_size = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
            if commit_size != 0 {
                db_pages = Some(commit_size);
            }
        }
        for frame in buf.chunks_exact(step) {
            let pgno = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
            let image = &frame[FRAME_HEADER as usize..];
            match staged.newest.get_mut(&pgno) {
                Some(held) if held.len() == image.len() => held.copy_from_slice(image),
                _ => {
                    staged.newest.insert(pgno, image.to_vec());
                }
            }
        }
        if let Some(n) = db_pages {
            staged.db_pages = n;
        }
        s.read_frames = frames;
        Ok(())
    }

    /// The writer's commits so far are published with the audit log's size.
    fn publish(&self, audit_size: u64, resources: u64) {
        let mut s = self.state.lock();
        s.audit_size = audit_size;
        s.resources = resources;
        if let Some(commit) = s.unpublished.take() {
            s.staged.last_commit = commit;
        }
    }

    /// The stream misses a commit of another process.
    pub(super) fn foreign_commit(&self) {
        let mut s = self.state.lock();
        Self::break_stream(&mut s, "another process wrote to the database");
    }

    /// Where the stream stands now (on the writer thread, between commits).
    pub(super) fn point(&self) -> SnapshotPoint {
        let s = self.state.lock();
        SnapshotPoint {
            commit: s.commits,
            audit_size: s.audit_size,
            resources: s.resources,
        }
    }
}

thread_local! {
    /// The tap of the writer connection on this thread, if a shipper installed one.
    static TAP: RefCell<Option<Arc<WalTap>>> = const { RefCell::new(None) };
}

/// Install `tap` on the writer thread (the calling thread).
pub(super) fn install(tap: Arc<WalTap>) {
    TAP.with(|t| *t.borrow_mut() = Some(tap));
}

/// The tap installed on this thread, if any.
pub(super) fn installed() -> Option<Arc<WalTap>> {
    TAP.with(|t| t.borrow().clone())
}

/// From the writer connection's WAL hook: a commit left `frames` frames in the log.
pub(super) fn after_commit(frames: u64) {
    TAP.with(|t| {
        if let Some(tap) = t.borrow().as_ref() {
            tap.after_commit(frames);
        }
    });
}

/// From the writer, after its commits: they are published with the audit log's size and
/// the number of resources.
pub(super) fn note_head(audit_size: u64, resources: u64) {
    TAP.with(|t| {
        if let Some(tap) = t.borrow().as_ref() {
            tap.publish(audit_size, resources);
        }
    });
}

/// From the writer: another process committed since it last looked.
pub(super) fn note_foreign_commit() {
    TAP.with(|t| {
        if let Some(tap) = t.borrow().as_ref() {
            tap.foreign_commit();
        }
    });
}

impl super::SqliteStore {
    /// Install a WAL tap on the writer: from now on every commit's pages reach it.
    pub fn start_tap(&self) -> Result<Arc<WalTap>, crate::StoreError> {
        let tap = WalTap::new(&self.path);
        // (a std channel: the caller may be inside an async runtime)
        let (tx, rx) = std::sync::mpsc::channel();
        if !self.send(super::writer::Command::Tap(tap.clone(), tx)) || rx.recv().is_err() {
            return Err(crate::StoreError::Engine("the store is closed".into()));
        }
        Ok(tap)
    }

    /// Copy the database into a new file `dest` at a point of the tap's stream (a tap must
    /// be installed), without stopping the writer; `progress` is told (pages copied,
    /// pages in all) as it goes.
    pub fn snapshot_to(
        &self,
        dest: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SnapshotPoint, crate::StoreError> {
        use rusqlite::{Connection, OpenFlags};
        let src = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(super::engine)?;
        super::configure(&src)?;
        let (tx, rx) = std::sync::mpsc::channel();
        if !self.send(super::writer::Command::Pin(src, tx)) {
            return Err(crate::StoreError::Engine("the store is closed".into()));
        }
        let (src, point) = rx
            .recv()
            .map_err(|_| crate::StoreError::Engine("the store is closed".into()))?;
        let point = point?;
        let mut dst = Connection::open(dest).map_err(super::engine)?;
        {
            let backup = rusqlite::backup::Backup::new(&src, &mut dst).map_err(super::engine)?;
            loop {
                let step = backup.step(1024).map_err(super::engine)?;
                let p = backup.progress();
                let total = u64::try_from(p.pagecount).unwrap_or(0);
                let left = u64::try_from(p.remaining).unwrap_or(0);
                progress(total - left.min(total), total);
                if step == rusqlite::backup::StepResult::Done {
                    break;
                }
            }
        }
        let _ = src.execute_batch("COMMIT");
        dst.close().map_err(|(_, e)| super::engine(e))?;
        Ok(point)
    }
}
