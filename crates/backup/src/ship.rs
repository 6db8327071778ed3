//! The server's shipper: the write-ahead log's pages to the target within the second,
//! snapshots beside the writer, the signed manifest, and retention.
//!
//! One thread ticks every [`TICK`]: it takes what the WAL tap published
//! ([`phivault_store::sqlite::tap`]), seals it as the next segment of the epoch (chained to
//! the previous one) and puts it; a failed put keeps the pages and merges the next ones
//! into them (page images: the newest wins), so nothing committed is dropped while the
//! target is away. A snapshot runs on a thread of its own (SQLite's backup API under a read
//! transaction pinned between two commits: the writer never waits), at the start of each
//! epoch and then every `snapshot_every`. The manifest is written when a snapshot or an
//! erasure lands, when an epoch starts, and otherwise at most every [`MANIFEST_EVERY`]
//! while segments are shipped (segments after it are found by a restore through their
//! chain). An epoch ends when the tap cannot vouch for the stream (another process wrote):
//! the next starts from a new snapshot.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use phivault_crypto::SigningKey;
use phivault_store::Store as _;
use phivault_store::sqlite::SqliteStore;
use phivault_store::sqlite::tap::{Changes, WalTap};
use serde::{Deserialize, Serialize};

use crate::manifest::{
    Deployment, Epoch, Head, INDEX_SPAN, IndexRef, Manifest, ObjRef, SegPoint, Snapshot,
};
use crate::objects::{
    DEPLOYMENT, HEAD, KIND_HEAD, KIND_INDEX, KIND_MANIFEST, KIND_SEGMENT, KIND_SNAPSHOT, Sealer,
};
use crate::pages::{SegmentHeader, encode_segment, snapshot_parts};
use crate::retention::{Retention, sweep};
use crate::target::Target;
use crate::{BackupError, TargetError, now_ms};

/// How often the shipper looks for new commits.
pub const TICK: Duration = Duration::from_millis(400);
/// Longest time between two manifests while segments are shipped.
pub const MANIFEST_EVERY: Duration = Duration::from_secs(5);
/// Snapshot parts' size (compressed).
const PART_BYTES: usize = 32 << 20;
/// Pages held while the target is away before the epoch is given up (a new snapshot
/// follows when it is back).
const MAX_UNSHIPPED: usize = 512 << 20;
/// How long a failed snapshot waits before the next try.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(60);
/// How often retention runs.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// What the shipper needs.
pub struct ShipConfig {
    pub target: Arc<dyn Target>,
    pub sealer: Arc<Sealer>,
    /// The audit key (signs manifests).
    pub signer: Arc<SigningKey>,
    /// Written to the target if it holds none.
    pub deployment: Deployment,
    /// A private directory for the snapshot's temporary copy (in the data directory).
    pub scratch: PathBuf,
    pub snapshot_every: Duration,
    /// What is kept, and the Object Lock retention of what is put (when the bucket has
    /// Object Lock).
    pub retention: Retention,
    /// Where the status is kept between runs (and read by `phivault backup status`).
    pub status_path: PathBuf,
    /// Told how a snapshot goes: (pages copied, pages in all).
    pub progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>>,
    /// This data directory's backup instance (a restored copy gets its own): a target's
    /// manifests have one writer.
    pub instance: String,
    /// Continue a target another instance wrote (the original is gone: a restored copy
    /// takes its place).
    pub take_over: bool,
}

/// The shipper's state as an administrator sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub target: String,
    pub object_lock: bool,
    pub deployment: String,
    pub epoch: u64,
    pub manifest_seq: u64,
    pub next_segment: u64,
    /// The newest restore point shipped: its time and audit log size.
    pub last_point_ms: Option<i64>,
    pub last_point_audit_size: u64,
    /// Since when commits wait to be shipped (`None`: nothing waits).
    pub waiting_since_ms: Option<i64>,
    pub last_snapshot_ms: Option<i64>,
    /// The current epoch's newest snapshot (its points need one).
    #[serde(default)]
    pub epoch_snapshot_ms: Option<i64>,
    pub snapshot_running: bool,
    pub segments_shipped: u64,
    pub bytes_shipped: u64,
    /// How long the oldest commit of the newest shipment waited to reach the target (ms):
    /// the recovery point of a crash at that moment.
    #[serde(default)]
    pub ship_lag_ms: u64,
    /// The most any shipment's oldest commit waited since the server started (ms).
    #[serde(default)]
    pub max_ship_lag_ms: u64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    /// The last restore drill (written by the drill).
    #[serde(default)]
    pub last_drill: Option<serde_json::Value>,
    /// The target no longer holds what this server wrote, or another server writes to it.
    #[serde(default)]
    pub target_problem: Option<String>,
}

impl Status {
    /// How long the oldest commit not yet shipped has waited (ms).
    pub fn lag_ms(&self, now: i64) -> u64 {
        self.waiting_since_ms
            .map_or(0, |t| u64::try_from(now - t).unwrap_or(0))
    }

    /// Read a status file (`None` when there is none).
    pub fn read(path: &std::path::Path) -> Result<Option<Status>, BackupError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| BackupError::Config(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BackupError::io(path, &e)),
        }
    }

    /// Write it atomically (0600; not synced: it is a report, rewritten every tick).
    pub fn write(&self, path: &std::path::Path) -> Result<(), BackupError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| BackupError::Config(format!("status: {e}")))?;
        let tmp = path.with_extension("tmp");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&json))
            .map_err(|e| BackupError::io(&tmp, &e))?;
        std::fs::rename(&tmp, path).map_err(|e| BackupError::io(path, &e))
    }
}

/// The running shipper.
pub struct Shipper {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    status: Arc<Mutex<Status>>,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper").finish_non_exhaustive()
    }
}

impl Shipper {
    /// Check the target (refused: another deployment's, credentials refused), read where
    /// it stands, install the tap and start shipping. A target that cannot be reached is
    /// not fatal: the shipper keeps trying and the status says so.
    pub fn start(store: Arc<SqliteStore>, cfg: ShipConfig) -> Result<Shipper, BackupError> {
        let previous = Status::read(&cfg.status_path)?.unwrap_or_default();
        let status = Arc::new(Mutex::new(Status {
            target: cfg.target.describe(),
            deployment: cfg.sealer.deployment().to_owned(),
            last_drill: previous.last_drill.clone(),
            ..Status::default()
        }));
        let (standing, error) = match open_target(&cfg, &previous) {
            Ok(st) => (Some(st), None),
            Err(BackupError::Target(TargetError::Unavailable(e))) => (None, Some(e)),
            Err(e) => return Err(e),
        };
        let tap = store
            .start_tap()
            .map_err(|e| BackupError::Store(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ship = Ship::new(store, cfg, tap, status.clone(), standing, &previous);
        if let Some(e) = error {
            ship.failed(&format!("backup target unavailable: {e}"));
        }
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("phivault-backup-ship".into())
            .spawn(move || ship.run(&flag))
            .map_err(|e| BackupError::Config(format!("cannot start the shipper: {e}")))?;
        Ok(Shipper {
            stop,
            handle: Some(handle),
            status,
        })
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// The status as it changes (for a monitor that outlives a borrow).
    pub fn status_handle(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    /// Ship what is left, write the manifest and stop.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Check the target's deployment record (writing it on a new target) and find the newest
/// manifest; returns it and whether the target keeps objects under Object Lock.
/// Where a target stands for a shipper that starts on it.
struct Standing {
    /// The manifest to extend (the newest found, or a new deployment's first).
    manifest: Manifest,
    /// That manifest's number and digest when it is the target's newest as found: the next
    /// one chains to it (`prev`) and the shipper checks it is still there.
    last: Option<(u64, String)>,
    object_lock: bool,
}

fn open_target(cfg: &ShipConfig, previous: &Status) -> Result<Standing, BackupError> {
    let target = &*cfg.target;
    let object_lock = target.object_lock()?;
    if let Some(bytes) = target.get(DEPLOYMENT)? {
        let d: Deployment = serde_json::from_slice(&bytes).map_err(|_| {
            BackupError::Config(format!(
                "{} holds a {DEPLOYMENT} phivault cannot read: refusing to ship into it",
                target.describe()
            ))
        })?;
        if d.deployment != cfg.sealer.deployment() {
            return Err(BackupError::Config(format!(
                "{} holds the backups of another deployment ({}): give each data directory a target of its own",
                target.describe(),
                d.deployment
            )));
        }
    }
    // the record as this server has it (a provider migrated since shows), locked from now
    put_deployment(cfg, object_lock)?;
    let found = crate::restore::newest_manifest(target, &cfg.sealer, &cfg.signer.public_key())?;
    let recorded = cfg
        .sealer
        .periods()
        .recorded_manifest(&target.describe())?
        .map_or(0, |(seq, _)| seq);
    let mut last = found.as_ref().map(|f| (f.manifest.seq, f.digest.clone()));
    let mut m = found.clone().map_or_else(
        || Manifest::genesis(cfg.sealer.deployment()),
        |f| f.manifest,
    );
    // segments the last run shipped after its last manifest (a crash) are points of its
    // epoch: name them, and never reuse their numbers
    if let Some(last) = m.epochs.last() {
        let (points, _) = crate::restore::epoch_points(target, &cfg.sealer, &m, last)?;
        let after: Vec<SegPoint> = points
            .into_iter()
            .filter(|p| p.seq >= m.next_segment)
            .collect();
        if let Some(newest) = after.last() {
            m.next_segment = newest.seq + 1;
        }
        if let Some(last) = m.epochs.last_mut() {
            last.tail.extend(after);
        }
    }
    if let Some(f) = &found
        && !f.manifest.writer.is_empty()
        && f.manifest.writer != cfg.instance
        && !cfg.take_over
    {
        return Err(BackupError::Config(format!(
            "{} holds the backups another copy of this deployment writes (instance {}; this data directory is {}): a restored copy ships to a target of its own, or takes this one over with --backup-take-over once the original is gone",
            target.describe(),
            f.manifest.writer,
            cfg.instance
        )));
    }
    // the newest manifest this deployment recorded with its keys: a target holding an
    // older one was rolled back (its numbers are not used again)
    if recorded > 0 && found.as_ref().is_none_or(|f| f.manifest.seq < recorded) {
        tracing::error!(
            recorded,
            "the backup target's newest manifest is older than the one recorded with the period keys: it was rolled back"
        );
    }
    // never reuse a number this server already used (a target rolled back, or a manifest
    // not yet written before a crash): names are computed from them
    let previous_seq = previous.manifest_seq.max(recorded);
    if previous_seq > m.seq || previous.next_segment > m.next_segment {
        tracing::warn!(
            found = m.seq,
            known = previous.manifest_seq,
            "the backup target's newest manifest is older than the last one this server wrote"
        );
        if previous_seq > m.seq {
            // (what follows does not chain to the manifest found)
            last = None;
        }
        m.seq = m.seq.max(previous_seq);
        m.next_segment = m.next_segment.max(previous.next_segment);
    }
    Ok(Standing {
        manifest: m,
        last,
        object_lock,
    })
}

/// Put `deployment.json` (a restore cannot start without it: under Object Lock it is
/// locked like every object, and put again at each retention round so that a lock always
/// runs).
fn put_deployment(cfg: &ShipConfig, object_lock: bool) -> Result<(), BackupError> {
    let json = serde_json::to_vec_pretty(&cfg.deployment)
        .map_err(|e| BackupError::Config(format!("deployment record: {e}")))?;
    cfg.target
        .put(DEPLOYMENT, &json, retain_until(object_lock, &cfg.retention))?;
    Ok(())
}

/// When an object put now may be removed (`None`: the target has no Object Lock).
fn retain_until(object_lock: bool, r: &Retention) -> Option<u64> {
    object_lock
        .then(|| u64::try_from(now_ms() / 1000).unwrap_or(0) + u64::from(r.lock_days) * 86_400)
}

/// A snapshot in progress: the epoch it belongs to and its thread.
struct Running {
    epoch: u64,
    handle: JoinHandle<Result<Snapshot, BackupError>>,
}

struct Ship {
    store: Arc<SqliteStore>,
    cfg: ShipConfig,
    tap: Arc<WalTap>,
    status: Arc<Mutex<Status>>,
    /// `None` until the target could be read.
    manifest: Option<Manifest>,
    object_lock: bool,
    /// The digest of the current epoch's newest segment.
    last_digest: [u8; 32],
    /// Pages taken but not yet shipped.
    unshipped: Option<Changes>,
    manifest_due: bool,
    manifest_urgent: bool,
    last_manifest: Instant,
    /// The newest manifest in the target this server extends: (number, digest).
    last_written: Option<(u64, String)>,
    snapshot: Option<Running>,
    next_snapshot: Instant,
    /// The commit of the newest snapshot (none are taken while no commit followed it).
    snapshot_commit: u64,
    last_commit: u64,
    /// Erasure markers counted at the last look (`None`: not looked yet).
    erased_seen: Option<usize>,
    last_sweep: Instant,
}

impl Ship {
    fn new(
        store: Arc<SqliteStore>,
        cfg: ShipConfig,
        tap: Arc<WalTap>,
        status: Arc<Mutex<Status>>,
        standing: Option<Standing>,
        previous: &Status,
    ) -> Self {
        let mut s = Ship {
            store,
            cfg,
            tap,
            status,
            manifest: None,
            object_lock: false,
            last_digest: [0; 32],
            unshipped: None,
            manifest_due: false,
            manifest_urgent: false,
            last_manifest: Instant::now(),
            last_written: None,
            snapshot: None,
            next_snapshot: Instant::now(),
            snapshot_commit: 0,
            last_commit: 0,
            erased_seen: None,
            last_sweep: Instant::now(),
        };
        s.status.lock().last_snapshot_ms = previous.last_snapshot_ms;
        if let Some(st) = standing {
            s.adopt(st);
        }
        s
    }

    /// Start from the target's newest manifest: a new epoch begins.
    fn adopt(&mut self, st: Standing) {
        self.manifest = Some(st.manifest);
        self.last_written = st.last;
        self.object_lock = st.object_lock;
        self.status.lock().object_lock = self.object_lock;
        self.new_epoch();
    }

    fn retain_until(&self) -> Option<u64> {
        retain_until(self.object_lock, &self.cfg.retention)
    }

    fn failed(&self, why: &str) {
        tracing::warn!(error = why, "backup");
        let mut st = self.status.lock();
        st.last_error = Some(why.to_owned());
        st.last_error_ms = Some(now_ms());
    }

    fn run(mut self, stop: &AtomicBool) {
        loop {
            let stopping = stop.load(Ordering::SeqCst);
            self.tick(stopping);
            if stopping {
                break;
            }
            std::thread::sleep(TICK);
        }
    }

    fn tick(&mut self, stopping: bool) {
        if self.manifest.is_none() {
            // the target was away at start
            let previous = self.status.lock().clone();
            match open_target(&self.cfg, &previous) {
                Ok(st) => {
                    self.adopt(st);
                    // what the tap published meanwhile is in the new epoch's snapshot
                    let _ = self.tap.take();
                }
                Err(e) => {
                    self.failed(&e.to_string());
                    self.note_waiting();
                    return;
                }
            }
        }
        let committed = self.ship_changes();
        self.collect_snapshot();
        if !stopping {
            self.maybe_snapshot();
        }
        // an erasure is a commit: the markers are read again only when commits came
        if committed || self.erased_seen.is_none() {
            self.note_erasures();
        }
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            self.sweep();
        }
        if self.manifest_due
            && (self.manifest_urgent || stopping || self.last_manifest.elapsed() >= MANIFEST_EVERY)
        {
            self.write_manifest();
        }
        self.write_status();
    }

    fn manifest(&mut self) -> &mut Manifest {
        self.manifest.get_or_insert_with(|| Manifest::genesis(""))
    }

    fn epoch(&mut self) -> &mut Epoch {
        let m = self.manifest();
        if m.epochs.is_empty() {
            let next = m.next_segment;
            m.epochs.push(Epoch::new(1, now_ms(), next));
        }
        let last = m.epochs.len() - 1;
        &mut m.epochs[last]
    }

    fn note_waiting(&self) {
        let mut st = self.status.lock();
        if st.waiting_since_ms.is_none() && self.unshipped.is_some() {
            st.waiting_since_ms = Some(now_ms());
        }
    }

    /// Take the tap's pages (merged into any not yet shipped) and ship them.
    /// Whether the tap had commits.
    fn ship_changes(&mut self) -> bool {
        let taken = self.tap.take();
        let committed = taken.is_some();
        if let Some(c) = taken {
            let merged = match self.unshipped.take() {
                None => c,
                Some(mut old) => {
                    old.pages.extend(c.pages);
                    if c.last_commit != 0 {
                        if old.first_commit == 0 {
                            old.first_commit = c.first_commit;
                        }
                        old.last_commit = c.last_commit;
                        old.db_pages = c.db_pages;
                    }
                    if old.first_commit_ms == 0 {
                        old.first_commit_ms = c.first_commit_ms;
                    }
                    old.audit_size = c.audit_size;
                    old.resources = c.resources;
                    old.page_size = c.page_size;
                    old.broken = old.broken.or(c.broken);
                    old
                }
            };
            if merged.last_commit != 0 || merged.broken.is_some() {
                let since = if merged.first_commit_ms > 0 {
                    merged.first_commit_ms
                } else {
                    now_ms()
                };
                self.status.lock().waiting_since_ms.get_or_insert(since);
                self.unshipped = Some(merged);
            }
        }
        let Some(changes) = self.unshipped.take() else {
            return committed;
        };
        if let Some(why) = &changes.broken {
            tracing::info!(reason = %why, "backup: a new epoch starts from a new snapshot");
            self.new_epoch();
            self.status.lock().waiting_since_ms = Some(now_ms());
            return committed;
        }
        if changes.bytes() > MAX_UNSHIPPED {
            self.failed(
                "the backup target was away too long: a new epoch starts from a new snapshot",
            );
            self.new_epoch();
            return committed;
        }
        match self.put_segment(&changes) {
            Ok(()) => {
                self.last_commit = changes.last_commit;
                let waited = u64::try_from(now_ms() - changes.first_commit_ms).unwrap_or(0);
                let mut st = self.status.lock();
                st.waiting_since_ms = None;
                if changes.first_commit_ms > 0 {
                    st.ship_lag_ms = waited;
                    st.max_ship_lag_ms = st.max_ship_lag_ms.max(waited);
                }
            }
            Err(e) => {
                self.failed(&e.to_string());
                self.unshipped = Some(changes);
            }
        }
        committed
    }

    fn new_epoch(&mut self) {
        let m = self.manifest();
        for e in &mut m.epochs {
            e.ended = true;
        }
        let id = m.epochs.iter().map(|e| e.id).max().unwrap_or(0) + 1;
        let next = m.next_segment;
        m.epochs.push(Epoch::new(id, now_ms(), next));
        self.last_digest = [0; 32];
        self.manifest_due = true;
        self.manifest_urgent = true;
        self.next_snapshot = Instant::now();
        self.snapshot_commit = 0;
        let mut st = self.status.lock();
        st.epoch = id;
        st.epoch_snapshot_ms = None;
    }

    fn put_segment(&mut self, c: &Changes) -> Result<(), BackupError> {
        let now = now_ms();
        let seq = self.manifest().next_segment;
        let epoch = self.epoch().id;
        let header = SegmentHeader {
            epoch,
            seq,
            prev: self.last_digest,
            first_commit: c.first_commit,
            last_commit: c.last_commit,
            time_ms: now,
            audit_size: c.audit_size,
            resources: c.resources,
            page_size: c.page_size,
            db_pages: c.db_pages,
        };
        let body = encode_segment(&header, &c.pages)?;
        let name = self.cfg.sealer.segment_name(seq);
        let sealed = self.cfg.sealer.seal(KIND_SEGMENT, &name, &body, now)?;
        self.cfg
            .target
            .put(&name, &sealed.bytes, self.retain_until())?;
        let point = SegPoint {
            seq,
            obj: ObjRef {
                name,
                digest: sealed.digest.clone(),
                size: sealed.bytes.len() as u64,
                period: sealed.period,
            },
            first_commit: c.first_commit,
            last_commit: c.last_commit,
            time_ms: now,
            audit_size: c.audit_size,
            resources: c.resources,
        };
        self.last_digest = phivault_crypto::sha256(&sealed.bytes);
        self.manifest().next_segment = seq + 1;
        self.epoch().tail.push(point);
        self.manifest_due = true;
        {
            let mut st = self.status.lock();
            st.last_point_ms = Some(now);
            st.last_point_audit_size = c.audit_size;
            st.segments_shipped += 1;
            st.bytes_shipped += sealed.bytes.len() as u64;
            st.next_segment = seq + 1;
        }
        if self.epoch().tail.len() >= INDEX_SPAN
            && let Err(e) = self.put_index()
        {
            // the tail stays in the manifest until an index can be written
            self.failed(&e.to_string());
        }
        Ok(())
    }

    /// Move the epoch's tail into an index object.
    fn put_index(&mut self) -> Result<(), BackupError> {
        let now = now_ms();
        let (epoch_id, k, body) = {
            let e = self.epoch();
            let body = serde_json::to_vec(&e.tail)
                .map_err(|err| BackupError::Config(format!("segment index: {err}")))?;
            (e.id, e.indexes.len() as u64, body)
        };
        let name = self.cfg.sealer.index_name(epoch_id, k);
        let sealed = self.cfg.sealer.seal(KIND_INDEX, &name, &body, now)?;
        self.cfg
            .target
            .put(&name, &sealed.bytes, self.retain_until())?;
        let e = self.epoch();
        let (Some(first), Some(last)) = (e.tail.first(), e.tail.last()) else {
            return Ok(());
        };
        let index = IndexRef {
            obj: ObjRef {
                name,
                digest: sealed.digest,
                size: sealed.bytes.len() as u64,
                period: sealed.period,
            },
            first_seq: first.seq,
            last_seq: last.seq,
            first_ms: first.time_ms,
            last_ms: last.time_ms,
            last_commit: last.last_commit,
            periods: e.tail.iter().map(|p| p.obj.period.clone()).collect(),
        };
        e.indexes.push(index);
        e.tail.clear();
        Ok(())
    }

    fn maybe_snapshot(&mut self) {
        if self.snapshot.is_some() || Instant::now() < self.next_snapshot {
            return;
        }
        let has_base = !self.epoch().snapshots.is_empty();
        // an idle store needs no second snapshot of the same commit
        if has_base && self.last_commit <= self.snapshot_commit {
            self.next_snapshot = Instant::now() + self.cfg.snapshot_every;
            return;
        }
        let epoch = self.epoch().id;
        let no = self
            .epoch()
            .snapshots
            .iter()
            .map(|s| s.no)
            .max()
            .unwrap_or(0)
            + 1;
        let store = self.store.clone();
        let target = self.cfg.target.clone();
        let sealer = self.cfg.sealer.clone();
        let scratch = self.cfg.scratch.clone();
        let retain = self.retain_until();
        let progress = self.cfg.progress.clone();
        self.status.lock().snapshot_running = true;
        let handle = std::thread::Builder::new()
            .name("phivault-backup-snapshot".into())
            .spawn(move || {
                let at = Place {
                    scratch: &scratch,
                    epoch,
                    no,
                    retain_until: retain,
                };
                take_snapshot(&store, &*target, &sealer, &at, progress.as_deref())
            });
        match handle {
            Ok(handle) => self.snapshot = Some(Running { epoch, handle }),
            Err(e) => {
                self.status.lock().snapshot_running = false;
                self.failed(&format!("cannot start a snapshot: {e}"));
                self.next_snapshot = Instant::now() + SNAPSHOT_RETRY;
            }
        }
    }

    fn collect_snapshot(&mut self) {
        if !self
            .snapshot
            .as_ref()
            .is_some_and(|r| r.handle.is_finished())
        {
            return;
        }
        let Some(running) = self.snapshot.take() else {
            return;
        };
        self.status.lock().snapshot_running = false;
        match running.handle.join() {
            Ok(Ok(snap)) => {
                let current = self.epoch().id;
                let m = self.manifest();
                if let Some(e) = m.epochs.iter_mut().find(|e| e.id == running.epoch) {
                    let (time, commit, snap_audit) = (snap.time_ms, snap.commit, snap.audit_size);
                    let bytes: u64 = snap.parts.iter().map(|p| p.size).sum();
                    e.snapshots.push(snap);
                    let mut st = self.status.lock();
                    st.last_snapshot_ms = Some(time);
                    st.bytes_shipped += bytes;
                    if running.epoch == current {
                        self.snapshot_commit = self.snapshot_commit.max(commit);
                        // a point of its own; what waited since the epoch began is in it
                        st.epoch_snapshot_ms = Some(time);
                        if st.last_point_ms.is_none_or(|t| t < time) {
                            st.last_point_ms = Some(time);
                            st.last_point_audit_size = snap_audit;
                        }
                        if self.unshipped.is_none() {
                            st.waiting_since_ms = None;
                        }
                    }
                    drop(st);
                    self.manifest_due = true;
                    self.manifest_urgent = true;
                }
                // an epoch begun while an older one's snapshot ran needs its own at once
                if running.epoch == current {
                    self.next_snapshot = Instant::now() + self.cfg.snapshot_every;
                }
            }
            Ok(Err(e)) => {
                self.failed(&format!("snapshot failed: {e}"));
                self.next_snapshot = Instant::now() + SNAPSHOT_RETRY;
            }
            Err(_) => {
                self.failed("snapshot failed: its thread panicked");
                self.next_snapshot = Instant::now() + SNAPSHOT_RETRY;
            }
        }
    }

    /// New erasure markers join the ledger (and the manifest goes out at once).
    fn note_erasures(&mut self) {
        let markers = match self.store.meta_prefix("erased:", 1_000_000) {
            Ok(m) => m,
            Err(e) => {
                self.failed(&format!("cannot read erasure markers: {e}"));
                return;
            }
        };
        if Some(markers.len()) == self.erased_seen {
            return;
        }
        self.erased_seen = Some(markers.len());
        let tags: Vec<String> = markers
            .iter()
            .filter_map(|(k, _)| k.strip_prefix("erased:"))
            .map(|id| self.cfg.sealer.keys().ledger_tag(id))
            .collect();
        let m = self.manifest();
        let before = m.erased.len();
        m.erased.extend(tags);
        if m.erased.len() != before {
            self.manifest_due = true;
            self.manifest_urgent = true;
        }
    }

    fn sweep(&mut self) {
        let now = now_ms();
        let mut retention = self.cfg.retention;
        if !self.object_lock {
            // nothing is locked: nothing waits for a lock to end
            retention.lock_days = 0;
        }
        let Some(m) = self.manifest.as_mut() else {
            return;
        };
        match sweep(m, now, &retention, &*self.cfg.target, &self.cfg.sealer) {
            Ok(changed) => self.manifest_due |= changed,
            Err(e) => self.failed(&format!("retention: {e}")),
        }
        if self.object_lock
            && let Err(e) = put_deployment(&self.cfg, true)
        {
            self.failed(&format!("deployment record: {e}"));
        }
    }

    /// Whether the target still holds this server's last manifest and no one else's after
    /// it; the problem, said, otherwise.
    fn target_holds_ours(&self, next: u64) -> Result<(), String> {
        let s = &self.cfg.sealer;
        let t = &*self.cfg.target;
        if let Some((seq, digest)) = &self.last_written {
            match t.get(&s.manifest_name(*seq)) {
                Ok(Some(b)) if crate::objects::digest_hex(&b) == *digest => {}
                Ok(_) => {
                    return Err(format!(
                        "the target no longer holds manifest {seq} this server wrote: it was rolled back, replaced or emptied"
                    ));
                }
                Err(e) => return Err(format!("the target cannot be read: {e}")),
            }
        }
        match t.get(&s.manifest_name(next)) {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(format!(
                "manifest {next} is already in the target: another server writes to it"
            )),
            Err(e) => Err(format!("the target cannot be read: {e}")),
        }
    }

    fn write_manifest(&mut self) {
        let now = now_ms();
        let next = self.manifest.as_ref().map_or(1, |m| m.seq + 1);
        if let Err(problem) = self.target_holds_ours(next) {
            self.failed(&problem);
            self.status.lock().target_problem = Some(problem);
            return;
        }
        let prev = self.last_written.as_ref().map(|(_, d)| d.clone());
        let instance = self.cfg.instance.clone();
        let m = self.manifest();
        m.writer = instance;
        m.seq += 1;
        m.written_ms = now;
        if m.seq.is_multiple_of(1000) {
            let seq = m.seq;
            m.manifest_marks.push((seq, now));
        }
        m.prev = prev;
        let snapshot = m.clone();
        let res = (|| -> Result<String, BackupError> {
            let body = snapshot.sign(&self.cfg.signer)?;
            let name = self.cfg.sealer.manifest_name(snapshot.seq);
            let sealed = self.cfg.sealer.seal(KIND_MANIFEST, &name, &body, now)?;
            self.cfg
                .target
                .put(&name, &sealed.bytes, self.retain_until())?;
            let head = serde_json::to_vec(&Head {
                seq: snapshot.seq,
                digest: sealed.digest.clone(),
            })
            .map_err(|e| BackupError::Config(format!("head: {e}")))?;
            let sealed_head = self.cfg.sealer.seal(KIND_HEAD, HEAD, &head, now)?;
            // the head is overwritten: it is never locked (a restore does not rely on it)
            self.cfg.target.put(HEAD, &sealed_head.bytes, None)?;
            Ok(sealed.digest)
        })();
        match res {
            Ok(digest) => {
                if let Err(e) = self.cfg.sealer.periods().record_manifest(
                    &self.cfg.target.describe(),
                    snapshot.seq,
                    &digest,
                ) {
                    self.failed(&format!("cannot record the manifest with the keys: {e}"));
                }
                self.last_written = Some((snapshot.seq, digest));
                self.status.lock().target_problem = None;
                self.manifest_due = false;
                self.manifest_urgent = false;
                self.last_manifest = Instant::now();
                let mut st = self.status.lock();
                st.manifest_seq = snapshot.seq;
                st.next_segment = snapshot.next_segment;
            }
            Err(e) => {
                // the number is used: the next try takes the next one
                self.failed(&format!("manifest: {e}"));
            }
        }
    }

    fn write_status(&self) {
        let st = self.status.lock().clone();
        if let Err(e) = st.write(&self.cfg.status_path) {
            tracing::warn!(error = %e, "cannot write the backup status");
        }
    }
}

/// Where a snapshot goes: its scratch directory, epoch and number, and its lock.
struct Place<'a> {
    scratch: &'a std::path::Path,
    epoch: u64,
    no: u64,
    retain_until: Option<u64>,
}

/// Copy the database at a pinned commit, compress, seal and put it in parts.
fn take_snapshot(
    store: &SqliteStore,
    target: &dyn Target,
    sealer: &Sealer,
    at: &Place<'_>,
    progress: Option<&(dyn Fn(u64, u64) + Send + Sync)>,
) -> Result<Snapshot, BackupError> {
    let (epoch, no, retain_until) = (at.epoch, at.no, at.retain_until);
    let tmp = at.scratch.join(format!("snapshot-{epoch}-{no}.db"));
    let _ = std::fs::remove_file(&tmp);
    // the pin comes right after: the snapshot holds every commit before this time
    let pinned_ms = now_ms();
    let point = store
        .snapshot_to(&tmp, &mut |done, total| {
            if let Some(p) = progress {
                p(done, total);
            }
        })
        .map_err(|e| BackupError::Store(e.to_string()))?;
    let now = now_ms();
    let mut parts = Vec::new();
    let res = snapshot_parts(&tmp, PART_BYTES, &mut |body| {
        let name = sealer.part_name(epoch, no, parts.len() as u64);
        let sealed = sealer.seal(KIND_SNAPSHOT, &name, &body, now)?;
        target.put(&name, &sealed.bytes, retain_until)?;
        parts.push(ObjRef {
            name,
            digest: sealed.digest,
            size: sealed.bytes.len() as u64,
            period: sealed.period,
        });
        Ok(())
    });
    let _ = std::fs::remove_file(&tmp);
    let db_bytes = res?;
    Ok(Snapshot {
        no,
        parts,
        commit: point.commit,
        time_ms: pinned_ms,
        audit_size: point.audit_size,
        resources: point.resources,
        db_bytes,
    })
}
