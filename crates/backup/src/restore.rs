//! Reading backups back: the newest manifest, the restore points, and a database rebuilt
//! at one of them from objects the manifest vouches for.
//!
//! Trust runs one way: the manifest is signed by the audit key; it names every snapshot
//! part, index and recent segment with its SHA-256; an index names its segments the same
//! way; segments shipped after the newest manifest are taken only if each chains (`prev`)
//! from the last one named. An object that is missing, whose digest differs, that does not
//! open under this deployment's keys, that belongs to another deployment or that sits at
//! another object's name is refused, and so the whole restore, saying which and why.

use std::collections::HashMap;
use std::path::Path;

use crate::manifest::{Epoch, Head, Manifest, SegPoint, Snapshot};
use crate::objects::{
    HEAD, KIND_HEAD, KIND_INDEX, KIND_MANIFEST, KIND_SEGMENT, KIND_SNAPSHOT, Sealer, digest_hex,
};
use crate::pages::{Segment, apply_segment, decode_segment, write_snapshot};
use crate::target::Target;
use crate::{BackupError, rfc3339};

/// Segments fetched at once (by [`FETCH_THREADS`] threads).
const FETCH_WINDOW: usize = 128;
const FETCH_THREADS: usize = 4;

/// The newest manifest and its object's digest.
#[derive(Debug, Clone)]
pub struct Found {
    pub manifest: Manifest,
    pub digest: String,
}

/// Manifest `seq`: its current version, else (a versioned bucket) the newest kept version
/// that opens and verifies. `None`: the target keeps no version of it.
fn fetch_manifest(
    target: &dyn Target,
    sealer: &Sealer,
    public: &[u8; 32],
    seq: u64,
) -> Result<Option<Found>, BackupError> {
    let name = sealer.manifest_name(seq);
    let read = |bytes: &[u8]| -> Result<Found, BackupError> {
        let body = sealer.open(KIND_MANIFEST, &name, bytes)?;
        let manifest = Manifest::verify(&body, public, &seq.to_string())?;
        if manifest.seq != seq || manifest.deployment != sealer.deployment() {
            return Err(BackupError::Refused(format!(
                "the manifest at {name} is not manifest {seq} of this deployment: it was moved"
            )));
        }
        Ok(Found {
            manifest,
            digest: digest_hex(bytes),
        })
    };
    let first = match target.get(&name)? {
        Some(bytes) => match read(&bytes) {
            Ok(found) => return Ok(Some(found)),
            Err(e) => Some(e),
        },
        None => None,
    };
    for bytes in target.versions(&name)? {
        if let Ok(found) = read(&bytes) {
            eprintln!(
                "warning: manifest {seq} was deleted or replaced in the target; a version of it still kept there was used"
            );
            return Ok(Some(found));
        }
    }
    first.map_or(Ok(None), Err)
}

/// The newest manifest: from the head (or, without a usable head, the highest manifest
/// number found among the target's objects), then forward while the next one exists and
/// follows its predecessor. `None`: the target holds no manifest.
pub fn newest_manifest(
    target: &dyn Target,
    sealer: &Sealer,
    public: &[u8; 32],
) -> Result<Option<Found>, BackupError> {
    let from_head = match target.get(HEAD)? {
        Some(bytes) => sealer
            .open(KIND_HEAD, HEAD, &bytes)
            .ok()
            .and_then(|body| serde_json::from_slice::<Head>(&body).ok())
            .map(|h| h.seq),
        None => None,
    };
    let found = match from_head {
        Some(seq) => fetch_manifest(target, sealer, public, seq)?,
        None => None,
    };
    let mut found = match found {
        Some(f) => f,
        // no head, a head that does not open, or its manifest gone: look for one
        None => match scan_for_manifest(target, sealer)? {
            Some(seq) => fetch_manifest(target, sealer, public, seq)?.ok_or_else(|| {
                BackupError::Refused(format!("manifest {seq} vanished from the target"))
            })?,
            None => return Ok(None),
        },
    };
    while let Some(next) = fetch_manifest(target, sealer, public, found.manifest.seq + 1)? {
        if next
            .manifest
            .prev
            .as_deref()
            .is_some_and(|p| p != found.digest)
        {
            return Err(BackupError::Refused(format!(
                "manifest {} does not follow manifest {}: the manifests were replaced",
                next.manifest.seq, found.manifest.seq
            )));
        }
        found = next;
    }
    Ok(Some(found))
}

/// Manifest numbers looked through when no head leads to one.
const SCAN_LIMIT: u64 = 20_000_000;
/// Numbers past the last manifest found that end the scan.
const SCAN_GAP: u64 = 100_000;
/// The scan's stride: retention always keeps more manifests than this in a row.
const SCAN_STRIDE: u64 = 64;

/// The highest manifest number whose name is among the target's objects. Names are
/// computed, not read: the scan steps through numbers (retention removes the oldest, so
/// the first kept may be far from 1, but at least [`SCAN_STRIDE`] newest are always kept
/// in a row), then looks one by one past the last it found.
fn scan_for_manifest(target: &dyn Target, sealer: &Sealer) -> Result<Option<u64>, BackupError> {
    let names: std::collections::HashSet<String> =
        target.list()?.into_iter().map(|(n, _)| n).collect();
    let has = |seq: u64| names.contains(&sealer.manifest_name(seq));
    if names
        .iter()
        .all(|n| n == HEAD || n == crate::objects::DEPLOYMENT)
    {
        return Ok(None);
    }
    let mut hit = (1..SCAN_STRIDE).filter(|&s| has(s)).max();
    let mut seq = SCAN_STRIDE;
    while seq <= SCAN_LIMIT && hit.is_none_or(|h| seq - h <= SCAN_GAP) {
        if has(seq) {
            hit = Some(seq);
        }
        seq += SCAN_STRIDE;
    }
    let Some(mut best) = hit else {
        return Ok(None);
    };
    while has(best + 1) {
        best += 1;
    }
    Ok(Some(best))
}

/// Refuse a manifest older than one already seen (`seen`: its number and digest; `whence`:
/// where it was seen, for the message).
pub fn check_seen(
    found: &Found,
    seen: Option<(u64, &str)>,
    whence: &str,
) -> Result<(), BackupError> {
    let Some((seq, digest)) = seen else {
        return Ok(());
    };
    let m = found.manifest.seq;
    if m < seq {
        return Err(BackupError::Refused(format!(
            "the target's newest manifest is {m}, older than manifest {seq} {whence}: the target was rolled back, its newest objects deleted, or an old manifest replayed"
        )));
    }
    if m == seq && found.digest != digest {
        return Err(BackupError::Refused(format!(
            "manifest {m} differs from the manifest {seq} {whence}: it was replaced"
        )));
    }
    Ok(())
}

/// Which point to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointSpec {
    /// The newest.
    Latest,
    /// The newest at or before this time (ms since the epoch).
    AtTime(i64),
    /// The newest whose audit log holds at most this many events.
    AtAuditSize(u64),
}

/// A segment to apply: its point, and its bytes when they were already fetched.
#[derive(Debug, Clone)]
pub struct SegToApply {
    pub point: SegPoint,
    /// `None`: the digest is known from the manifest or an index.
    pub fetched: Option<Vec<u8>>,
}

/// A chosen restore point: a snapshot and the segments after it.
#[derive(Debug, Clone)]
pub struct Point {
    pub epoch: u64,
    pub base: Snapshot,
    pub segments: Vec<SegToApply>,
    /// The digest the first segment must chain from (`None`: not checked, its
    /// predecessor is not kept).
    pub chain_from: Option<[u8; 32]>,
    pub time_ms: i64,
    pub audit_size: u64,
    pub resources: u64,
}

/// An epoch's segment points, and the bytes of those found past the manifest (fetched to
/// check their chain), by number.
pub type EpochPoints = (Vec<SegPoint>, HashMap<u64, Vec<u8>>);

/// Every segment point of an epoch, in order: its indexes read, its tail, and — for the
/// epoch the manifest ends with — the segments shipped after it.
pub fn epoch_points(
    target: &dyn Target,
    sealer: &Sealer,
    m: &Manifest,
    e: &Epoch,
) -> Result<EpochPoints, BackupError> {
    let mut points = Vec::new();
    for idx in &e.indexes {
        let bytes = fetch_checked(
            target,
            sealer,
            &idx.obj.name,
            &idx.obj.digest,
            "segment index",
        )?;
        let body = sealer.open(KIND_INDEX, &idx.obj.name, &bytes)?;
        let list: Vec<SegPoint> = serde_json::from_slice(&body).map_err(|_| {
            BackupError::Refused(format!("the segment index {} is malformed", idx.obj.name))
        })?;
        points.extend(list);
    }
    points.extend(e.tail.iter().cloned());
    let mut fetched = HashMap::new();
    let is_last = m.epochs.last().is_some_and(|l| l.id == e.id);
    if is_last {
        let mut prev = match points.last() {
            Some(p) => Some(hex_digest(&p.obj.digest)?),
            None => None,
        };
        let mut seq = m.next_segment;
        loop {
            let name = sealer.segment_name(seq);
            let Some(bytes) = target.get(&name)? else {
                break;
            };
            let seg = open_segment(sealer, &name, &bytes)?;
            let h = &seg.header;
            if h.epoch != e.id || h.seq != seq || prev.is_some_and(|p| p != h.prev) {
                // a later epoch's, or not this chain's continuation: not a point of this one
                break;
            }
            let digest = digest_hex(&bytes);
            prev = Some(phivault_crypto::sha256(&bytes));
            points.push(SegPoint {
                seq,
                obj: crate::manifest::ObjRef {
                    name,
                    digest,
                    size: bytes.len() as u64,
                    period: crate::period_of(h.time_ms),
                },
                first_commit: h.first_commit,
                last_commit: h.last_commit,
                time_ms: h.time_ms,
                audit_size: h.audit_size,
                resources: h.resources,
            });
            fetched.insert(seq, bytes);
            seq += 1;
        }
    }
    Ok((points, fetched))
}

fn hex_digest(hex: &str) -> Result<[u8; 32], BackupError> {
    let bad = || BackupError::Refused("a digest in the manifest is malformed".into());
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

fn open_segment(sealer: &Sealer, name: &str, bytes: &[u8]) -> Result<Segment, BackupError> {
    let body = sealer.open(KIND_SEGMENT, name, bytes)?;
    decode_segment(&body)
}

fn fetch_checked(
    target: &dyn Target,
    sealer: &Sealer,
    name: &str,
    digest: &str,
    what: &str,
) -> Result<Vec<u8>, BackupError> {
    let current = target.get(name)?;
    if current.as_ref().is_some_and(|b| digest_hex(b) == digest) {
        return Ok(current.unwrap_or_default());
    }
    // the current version was deleted or replaced: a versioned bucket may still keep the
    // one the manifest names (Object Lock keeps it through its retention)
    if let Some(kept) = target
        .versions(name)?
        .into_iter()
        .find(|b| digest_hex(b) == digest)
    {
        tracing::warn!(
            object = name,
            "the current version of a backup object was deleted or replaced; the version the manifest names was used"
        );
        eprintln!(
            "warning: the {what} {name} was deleted or replaced in the target; its version the manifest names is still kept there and was used"
        );
        return Ok(kept);
    }
    let Some(bytes) = current else {
        return Err(BackupError::Refused(format!(
            "the {what} {name} named by the manifest is missing from the target: it was deleted"
        )));
    };
    // say what it is instead, when its clear header tells
    if let Some(foreign) = sealer.foreign(name, &bytes) {
        return Err(BackupError::Refused(foreign));
    }
    Err(BackupError::Refused(format!(
        "the {what} {name} is not the object the manifest names (its SHA-256 differs): it was changed or replaced"
    )))
}

fn better(spec: PointSpec, cand: (i64, u64), best: Option<(i64, u64)>) -> bool {
    let ok = match spec {
        PointSpec::Latest => true,
        PointSpec::AtTime(t) => cand.0 <= t,
        PointSpec::AtAuditSize(n) => cand.1 <= n,
    };
    ok && best.is_none_or(|b| cand.0 > b.0 || (cand.0 == b.0 && cand.1 > b.1))
}

/// Choose the point `spec` asks for.
pub fn choose(
    target: &dyn Target,
    sealer: &Sealer,
    found: &Found,
    spec: PointSpec,
) -> Result<Point, BackupError> {
    let m = &found.manifest;
    let mut best: Option<Point> = None;
    let key = |p: &Option<Point>| p.as_ref().map(|p| (p.time_ms, p.audit_size));
    for e in m.epochs.iter().rev() {
        if e.snapshots.is_empty() {
            continue;
        }
        // snapshots alone
        for s in &e.snapshots {
            if better(spec, (s.time_ms, s.audit_size), key(&best)) {
                best = Some(Point {
                    epoch: e.id,
                    base: s.clone(),
                    segments: Vec::new(),
                    chain_from: None,
                    time_ms: s.time_ms,
                    audit_size: s.audit_size,
                    resources: s.resources,
                });
            }
        }
        // segments on the newest snapshot before them
        let (points, mut fetched) = epoch_points(target, sealer, m, e)?;
        let mut chosen: Option<usize> = None;
        for (i, p) in points.iter().enumerate() {
            let has_base = e.snapshots.iter().any(|s| s.commit <= p.last_commit);
            let bar = match (
                key(&best),
                chosen.map(|c| (points[c].time_ms, points[c].audit_size)),
            ) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            if has_base && p.seq >= e.kept_from && better(spec, (p.time_ms, p.audit_size), bar) {
                chosen = Some(i);
            }
        }
        let Some(i) = chosen else {
            continue;
        };
        let p = &points[i];
        let Some(base) = e
            .snapshots
            .iter()
            .filter(|s| s.commit <= p.last_commit)
            .max_by_key(|s| s.commit)
        else {
            continue;
        };
        // every segment after the snapshot's commit, up to the point (none when the
        // point is the snapshot's own commit)
        let start = points
            .iter()
            .position(|q| q.last_commit > base.commit)
            .unwrap_or(points.len());
        let chain_from = match start.checked_sub(1).and_then(|j| points.get(j)) {
            Some(q) => Some(hex_digest(&q.obj.digest)?),
            None => None,
        };
        let segments = points
            .get(start..=i)
            .unwrap_or_default()
            .iter()
            .map(|q| SegToApply {
                point: q.clone(),
                fetched: fetched.remove(&q.seq),
            })
            .collect();
        best = Some(Point {
            epoch: e.id,
            base: base.clone(),
            segments,
            chain_from,
            time_ms: p.time_ms,
            audit_size: p.audit_size,
            resources: p.resources,
        });
    }
    best.ok_or_else(|| match spec {
        PointSpec::Latest => BackupError::Refused("the target holds no restore point".into()),
        PointSpec::AtTime(t) => BackupError::Refused(format!(
            "the target holds no restore point at or before {}",
            rfc3339(t)
        )),
        PointSpec::AtAuditSize(n) => BackupError::Refused(format!(
            "the target holds no restore point whose audit log ends at or before event {n}"
        )),
    })
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rebuilt {
    pub snapshot_bytes: u64,
    pub segments: u64,
    pub fetched_bytes: u64,
}

/// Progress of a rebuild: (what, done, total).
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

/// Write the database of `point` into the new file `db`.
pub fn rebuild(
    target: &dyn Target,
    sealer: &Sealer,
    point: &Point,
    db: &Path,
    progress: Progress<'_>,
) -> Result<Rebuilt, BackupError> {
    let mut stats = Rebuilt::default();
    let mut parts = Vec::with_capacity(point.base.parts.len());
    let total_parts = point.base.parts.len() as u64;
    for (i, p) in point.base.parts.iter().enumerate() {
        let bytes = fetch_checked(target, sealer, &p.name, &p.digest, "snapshot part")?;
        stats.fetched_bytes += bytes.len() as u64;
        let body = sealer.open(KIND_SNAPSHOT, &p.name, &bytes)?;
        parts.push(body.to_vec());
        progress("snapshot", i as u64 + 1, total_parts);
    }
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(db)
        .map_err(|e| BackupError::io(db, &e))?;
    stats.snapshot_bytes = write_snapshot(&parts, &mut file)?;
    drop(parts);
    let total = point.segments.len() as u64;
    let mut prev = point.chain_from;
    for window in point.segments.chunks(FETCH_WINDOW) {
        let bytes = fetch_window(target, sealer, window)?;
        for (s, bytes) in window.iter().zip(bytes) {
            stats.fetched_bytes += bytes.len() as u64;
            let seg = open_segment(sealer, &s.point.obj.name, &bytes)?;
            let h = &seg.header;
            if h.epoch != point.epoch || h.seq != s.point.seq {
                return Err(BackupError::Refused(format!(
                    "the segment {} is not segment {} of this epoch: it was moved",
                    s.point.obj.name, s.point.seq
                )));
            }
            if prev.is_some_and(|p| p != h.prev) {
                return Err(BackupError::Refused(format!(
                    "segment {} does not follow the segment before it: the chain was broken",
                    s.point.seq
                )));
            }
            prev = Some(phivault_crypto::sha256(&bytes));
            apply_segment(&file, &seg)?;
            stats.segments += 1;
            progress("segments", stats.segments, total);
        }
    }
    file.sync_all().map_err(|e| BackupError::io(db, &e))?;
    Ok(stats)
}

/// Fetch a window of segments (checked against their digests) on a few threads.
fn fetch_window(
    target: &dyn Target,
    sealer: &Sealer,
    window: &[SegToApply],
) -> Result<Vec<Vec<u8>>, BackupError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Slot = parking_lot::Mutex<Option<Result<Vec<u8>, BackupError>>>;
    let results: Vec<Slot> = window
        .iter()
        .map(|_| parking_lot::Mutex::new(None))
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..FETCH_THREADS.min(window.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(s) = window.get(i) else { break };
                    let r = match &s.fetched {
                        Some(b) => Ok(b.clone()),
                        None => {
                            let (name, digest) = (&s.point.obj.name, &s.point.obj.digest);
                            fetch_checked(target, sealer, name, digest, "segment")
                        }
                    };
                    *results[i].lock() = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|| Err(BackupError::Refused("a segment was not fetched".into())))
        })
        .collect()
}

/// A summary of the restore points, for `phivault backup list`.
#[derive(Debug, Clone)]
pub struct EpochSummary {
    pub id: u64,
    /// Snapshots: (time, audit size, resources).
    pub snapshots: Vec<(i64, u64, u64)>,
    /// The segment points after the first snapshot: (count, first time, last time, last
    /// audit size).
    pub segments: Option<(u64, i64, i64, u64)>,
}

/// Summarize every epoch's points.
pub fn summarize(
    target: &dyn Target,
    sealer: &Sealer,
    found: &Found,
) -> Result<Vec<EpochSummary>, BackupError> {
    let m = &found.manifest;
    let mut out = Vec::new();
    for e in &m.epochs {
        let (points, _) = epoch_points(target, sealer, m, e)?;
        let first_base = e.snapshots.iter().map(|s| s.commit).min();
        let usable: Vec<&SegPoint> = points
            .iter()
            .filter(|p| p.seq >= e.kept_from && first_base.is_some_and(|c| p.last_commit >= c))
            .collect();
        out.push(EpochSummary {
            id: e.id,
            snapshots: e
                .snapshots
                .iter()
                .map(|s| (s.time_ms, s.audit_size, s.resources))
                .collect(),
            segments: match (usable.first(), usable.last()) {
                (Some(a), Some(b)) => {
                    Some((usable.len() as u64, a.time_ms, b.time_ms, b.audit_size))
                }
                _ => None,
            },
        });
    }
    Ok(out)
}
