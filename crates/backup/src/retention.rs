//! Retention: which restore points are kept, and the rest removed — objects, manifest
//! entries and, once nothing of a month is left, the month's period key.
//!
//! Kept: every point of the last `pitr_days` (snapshots, and segments from the newest
//! snapshot before the window on), the newest snapshot of each of the last `daily` days and
//! of each of the last `monthly` months, and always the newest snapshot. An object is
//! removed only once its Object Lock retention (`lock_days`) has passed: before that the
//! target would refuse, and the manifest keeps naming it. Then a month none of whose
//! objects is named any more (and before the current one) loses its period key: every
//! copy of its objects, anywhere, is unopenable.

use std::collections::BTreeSet;

use crate::manifest::Manifest;
use crate::objects::Sealer;
use crate::target::Target;
use crate::{BackupError, period_of};

/// What is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Every point of this many days.
    pub pitr_days: u32,
    /// The newest snapshot of each of this many days.
    pub daily: u32,
    /// The newest snapshot of each of this many months.
    pub monthly: u32,
    /// Object Lock retention of what is put (nothing younger is removed).
    pub lock_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            pitr_days: 7,
            daily: 30,
            monthly: 12,
            lock_days: 30,
        }
    }
}

const DAY_MS: i64 = 86_400_000;
/// Manifests kept behind the newest, whatever their age.
const MANIFESTS_KEPT: u64 = 100;

fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// The snapshots kept: (epoch id, snapshot number).
fn kept_snapshots(m: &Manifest, now: i64, r: &Retention) -> BTreeSet<(u64, u64)> {
    let window = now - i64::from(r.pitr_days) * DAY_MS;
    let lock_cut = now - i64::from(r.lock_days) * DAY_MS;
    let all: Vec<(u64, &crate::manifest::Snapshot)> = m
        .epochs
        .iter()
        .flat_map(|e| e.snapshots.iter().map(move |s| (e.id, s)))
        .collect();
    let mut keep = BTreeSet::new();
    let newest_by = |key: &dyn Fn(i64) -> i64| {
        let mut best: std::collections::BTreeMap<i64, (i64, (u64, u64))> = Default::default();
        for (e, s) in &all {
            let k = key(s.time_ms);
            let entry = best.entry(k).or_insert((s.time_ms, (*e, s.no)));
            if s.time_ms >= entry.0 {
                *entry = (s.time_ms, (*e, s.no));
            }
        }
        best
    };
    let today = day_of(now);
    for (day, (_, id)) in newest_by(&day_of) {
        if today - day < i64::from(r.daily) {
            keep.insert(id);
        }
    }
    let month_no = |ms: i64| {
        let p = period_of(ms);
        let y: i64 = p[..4].parse().unwrap_or(0);
        let mo: i64 = p[5..].parse().unwrap_or(0);
        y * 12 + mo
    };
    let this_month = month_no(now);
    for (month, (_, id)) in newest_by(&month_no) {
        if this_month - month < i64::from(r.monthly) {
            keep.insert(id);
        }
    }
    for (e, s) in &all {
        if s.time_ms >= window || s.time_ms >= lock_cut {
            keep.insert((*e, s.no));
        }
    }
    if let Some((e, s)) = all.iter().max_by_key(|(_, s)| s.time_ms) {
        keep.insert((*e, s.no));
    }
    // the base of each epoch's points in the window: its newest snapshot before the window
    for e in &m.epochs {
        if let Some(base) = e
            .snapshots
            .iter()
            .filter(|s| s.time_ms < window)
            .max_by_key(|s| s.time_ms)
        {
            let has_points_after = e.tail.iter().any(|p| p.time_ms >= window)
                || e.indexes.iter().any(|i| i.last_ms >= window);
            if has_points_after {
                keep.insert((e.id, base.no));
            }
        }
    }
    keep
}

/// Apply retention to `m` (removing what is no longer kept from the target), destroy the
/// period keys of months with nothing left; returns whether the manifest changed.
pub fn sweep(
    m: &mut Manifest,
    now: i64,
    r: &Retention,
    target: &dyn Target,
    sealer: &Sealer,
) -> Result<bool, BackupError> {
    let window = now - i64::from(r.pitr_days) * DAY_MS;
    let lock_cut = now - i64::from(r.lock_days) * DAY_MS;
    let keep = kept_snapshots(m, now, r);
    let mut changed = false;
    for e in &mut m.epochs {
        // snapshots
        let mut kept = Vec::new();
        for s in std::mem::take(&mut e.snapshots) {
            if keep.contains(&(e.id, s.no)) || s.time_ms >= lock_cut {
                kept.push(s);
                continue;
            }
            if s.parts.iter().all(|p| target.delete(&p.name).is_ok()) {
                changed = true;
            } else {
                kept.push(s);
            }
        }
        e.snapshots = kept;
        // segments: an index whose segments all precede the epoch's oldest kept base,
        // and are out of the window and the lock, goes
        let base_commit = e.snapshots.iter().map(|s| s.commit).min();
        let mut remaining = Vec::new();
        for idx in std::mem::take(&mut e.indexes) {
            let before_base = base_commit.is_none_or(|c| idx.last_commit <= c);
            if before_base && idx.last_ms < window && idx.last_ms < lock_cut {
                let gone = (idx.first_seq..=idx.last_seq)
                    .all(|seq| target.delete(&sealer.segment_name(seq)).is_ok())
                    && target.delete(&idx.obj.name).is_ok();
                if gone {
                    e.kept_from = idx.last_seq + 1;
                    changed = true;
                    continue;
                }
            }
            remaining.push(idx);
        }
        e.indexes = remaining;
    }
    // epochs with nothing left
    let before = m.epochs.len();
    m.epochs.retain(|e| {
        !e.snapshots.is_empty() || !e.indexes.is_empty() || !e.tail.is_empty() || !e.ended
    });
    changed |= m.epochs.len() != before;
    changed |= sweep_manifests(m, lock_cut, target, sealer);
    destroy_periods(m, now, sealer)?;
    Ok(changed)
}

/// Remove manifests older than the lock and more than [`MANIFESTS_KEPT`] behind.
fn sweep_manifests(m: &mut Manifest, lock_cut: i64, target: &dyn Target, sealer: &Sealer) -> bool {
    let Some(&(upto, _)) = m.manifest_marks.iter().rev().find(|(_, t)| *t < lock_cut) else {
        return false;
    };
    let upto = upto.min(m.seq.saturating_sub(MANIFESTS_KEPT));
    let mut changed = false;
    while m.manifests_kept_from < upto {
        if target
            .delete(&sealer.manifest_name(m.manifests_kept_from))
            .is_err()
        {
            break;
        }
        m.manifests_kept_from += 1;
        changed = true;
    }
    m.manifest_marks.retain(|(seq, _)| *seq >= upto);
    changed
}

/// The months whose objects the manifest still names (and the current one).
fn periods_in_use(m: &Manifest, now: i64) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    used.insert(period_of(now));
    for e in &m.epochs {
        for s in &e.snapshots {
            used.extend(s.parts.iter().map(|p| p.period.clone()));
        }
        for i in &e.indexes {
            used.insert(i.obj.period.clone());
            used.extend(i.periods.iter().cloned());
        }
        used.extend(e.tail.iter().map(|p| p.obj.period.clone()));
    }
    // manifests still kept: every month since the oldest kept one's mark
    if let Some((_, t)) = m.manifest_marks.first() {
        let mut p = period_of(*t);
        let current = period_of(now);
        while p <= current {
            used.insert(p.clone());
            p = next_period(&p);
        }
    }
    used
}

fn next_period(p: &str) -> String {
    let y: u32 = p[..4].parse().unwrap_or(0);
    let mo: u32 = p[5..].parse().unwrap_or(1);
    if mo == 12 {
        format!("{:04}-01", y + 1)
    } else {
        format!("{y:04}-{:02}", mo + 1)
    }
}

/// Destroy the period keys of months before the current one that nothing kept uses.
fn destroy_periods(m: &Manifest, now: i64, sealer: &Sealer) -> Result<(), BackupError> {
    let used = periods_in_use(m, now);
    // the previous month's manifests may not have a mark: it is kept one month more
    let grace = {
        let t = now - 31 * DAY_MS;
        period_of(t)
    };
    for p in sealer.periods().periods()? {
        if !used.contains(&p) && p < grace {
            sealer.periods().destroy(&p)?;
            tracing::info!(period = %p, "backup: the period key of a month past its retention was destroyed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Epoch, ObjRef, Snapshot};

    fn snap(no: u64, time_ms: i64) -> Snapshot {
        Snapshot {
            no,
            parts: vec![ObjRef {
                name: format!("p{no}"),
                digest: String::new(),
                size: 1,
                period: period_of(time_ms),
            }],
            commit: no,
            time_ms,
            audit_size: 0,
            resources: 0,
            db_bytes: 0,
        }
    }

    #[test]
    fn daily_and_monthly_points_are_kept_and_the_rest_thinned() {
        let now = 1_800_000_000_000i64;
        let mut m = Manifest::genesis("00112233445566778899aabbccddeeff");
        let mut e = Epoch::new(1, 0, 1);
        // four snapshots a day for 400 days
        let mut no = 0;
        for day in 0..400 {
            for q in 0..4 {
                no += 1;
                e.snapshots
                    .push(snap(no, now - day * DAY_MS - q * 6 * 3_600_000 - 1));
            }
        }
        e.ended = true;
        m.epochs.push(e);
        let r = Retention {
            pitr_days: 2,
            daily: 30,
            monthly: 12,
            lock_days: 1,
        };
        let keep = kept_snapshots(&m, now, &r);
        // 2 days of every snapshot (8), then one a day to 30 days, then one a month
        assert!(
            keep.len() >= 8 + 28 && keep.len() <= 8 + 28 + 13,
            "{}",
            keep.len()
        );
        let oldest = m.epochs[0]
            .snapshots
            .iter()
            .filter(|s| keep.contains(&(1, s.no)))
            .map(|s| s.time_ms)
            .min()
            .expect("some");
        assert!(now - oldest < 13 * 31 * DAY_MS && now - oldest > 300 * DAY_MS);
    }

    /// A target, a sealer and a manifest with objects really put, at chosen times.
    struct World {
        _tmp: tempfile::TempDir,
        target: crate::target::file::FileTarget,
        sealer: Sealer,
        keys_dir: std::path::PathBuf,
    }

    fn world() -> World {
        use phivault_crypto::backup::BackupKeys;
        use phivault_crypto::{KeyHierarchy, MasterKey};
        use std::sync::Arc;
        let tmp = tempfile::tempdir().expect("tmp");
        let keys = Arc::new(BackupKeys::new(&KeyHierarchy::new(&MasterKey::from_bytes(
            &[5; 32],
        ))));
        let dep = "00112233445566778899aabbccddeeff";
        let keys_dir = tmp.path().join("period-keys");
        let periods = Arc::new(
            crate::periods::PeriodStore::open(&keys_dir, dep, keys.clone(), true).expect("periods"),
        );
        let target_dir = tmp.path().join("bk");
        let target = crate::target::file::FileTarget::open(target_dir.to_str().expect("utf8"))
            .expect("target");
        let sealer = Sealer::new(keys, periods, dep).expect("sealer");
        World {
            _tmp: tmp,
            target,
            sealer,
            keys_dir,
        }
    }

    fn put(w: &World, name: &str, at: i64) -> ObjRef {
        use crate::target::Target as _;
        let sealed = w
            .sealer
            .seal(crate::objects::KIND_SNAPSHOT, name, b"x", at)
            .expect("seal");
        w.target.put(name, &sealed.bytes, None).expect("put");
        ObjRef {
            name: name.into(),
            digest: sealed.digest,
            size: 1,
            period: sealed.period,
        }
    }

    #[test]
    fn a_sweep_removes_what_is_not_kept_and_destroys_the_empty_months_keys() {
        use crate::manifest::{IndexRef, SegPoint};
        use crate::target::Target as _;
        let w = world();
        let now = 1_800_000_000_000i64;
        let day = DAY_MS;
        let mut m = Manifest::genesis("00112233445566778899aabbccddeeff");
        // an old epoch: a snapshot 400 days ago, one 100 days ago, an index of segments
        // between them, and segments after the newer one
        let mut old = Epoch::new(1, now - 400 * day, 1);
        let mut s1 = snap(1, now - 400 * day);
        s1.parts = vec![put(&w, "p-old", now - 400 * day)];
        s1.commit = 10;
        let mut s2 = snap(2, now - 100 * day);
        s2.parts = vec![put(&w, "p-mid", now - 100 * day)];
        s2.commit = 50;
        old.snapshots = vec![s1, s2];
        let seg_time = now - 300 * day;
        for seq in 1..=3 {
            put(&w, &w.sealer.segment_name(seq), seg_time);
        }
        let idx = put(&w, &w.sealer.index_name(1, 0), seg_time);
        old.indexes = vec![IndexRef {
            periods: [idx.period.clone()].into(),
            obj: idx,
            first_seq: 1,
            last_seq: 3,
            first_ms: seg_time,
            last_ms: seg_time,
            last_commit: 30,
        }];
        old.ended = true;
        m.epochs.push(old);
        // the current epoch: a snapshot yesterday and a segment since
        let mut cur = Epoch::new(2, now - day, 4);
        let mut s3 = snap(3, now - day);
        s3.parts = vec![put(&w, "p-new", now - day)];
        cur.snapshots = vec![s3];
        cur.tail = vec![SegPoint {
            seq: 4,
            obj: put(&w, &w.sealer.segment_name(4), now - 1000),
            first_commit: 1,
            last_commit: 2,
            time_ms: now - 1000,
            audit_size: 1,
            resources: 1,
        }];
        m.epochs.push(cur);
        let old_period = period_of(now - 400 * day);
        let seg_period = period_of(seg_time);
        assert!(w.keys_dir.join(format!("{old_period}.key")).exists());
        let r = Retention {
            pitr_days: 7,
            daily: 30,
            monthly: 12,
            lock_days: 0,
        };
        assert!(sweep(&mut m, now, &r, &w.target, &w.sealer).expect("sweep"));
        let names: Vec<String> = w
            .target
            .list()
            .expect("list")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        // the 400-day snapshot is past every rule; the segments before the kept 100-day
        // snapshot and their index go; the monthly point and the current epoch stay
        assert!(!names.contains(&"p-old".to_owned()), "{names:?}");
        assert!(names.contains(&"p-mid".to_owned()) && names.contains(&"p-new".to_owned()));
        for seq in 1..=3 {
            assert!(!names.contains(&w.sealer.segment_name(seq)));
        }
        assert!(names.contains(&w.sealer.segment_name(4)));
        assert_eq!(m.epochs[0].snapshots.len(), 1);
        assert!(m.epochs[0].indexes.is_empty());
        assert_eq!(m.epochs[0].kept_from, 4);
        // nothing of those months is named any more: their keys are gone
        assert!(!w.keys_dir.join(format!("{old_period}.key")).exists());
        assert!(!w.keys_dir.join(format!("{seg_period}.key")).exists());
        assert!(
            w.keys_dir
                .join(format!("{}.key", period_of(now - 100 * day)))
                .exists()
        );
        // under a lock of 500 days nothing would have been removed
        let w2 = world();
        let mut m2 = Manifest::genesis("00112233445566778899aabbccddeeff");
        let mut e = Epoch::new(1, now - 400 * day, 1);
        let mut s = snap(1, now - 400 * day);
        s.parts = vec![put(&w2, "p-old", now - 400 * day)];
        e.snapshots = vec![s, snap(2, now - day)];
        e.ended = true;
        m2.epochs.push(e);
        let locked = Retention {
            lock_days: 500,
            ..r
        };
        sweep(&mut m2, now, &locked, &w2.target, &w2.sealer).expect("sweep");
        assert_eq!(
            m2.epochs[0].snapshots.len(),
            2,
            "a locked snapshot stays named"
        );
    }

    #[test]
    fn periods_follow_months() {
        assert_eq!(next_period("2026-12"), "2027-01");
        assert_eq!(next_period("2026-01"), "2026-02");
    }
}
