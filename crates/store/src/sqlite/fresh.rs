//! The readers' side of [`crate::integrity`]: every row a reader returns is the one this
//! process knows it wrote — a settings row with its MAC, a resource at its current version
//! (neither rolled back, nor removed, nor added, nor marked deleted), a history without
//! gaps. A row that differs is looked at again once the writer has caught up with heads
//! another process wrote; if it still differs the read fails with
//! [`StoreError::Tampered`], naming the row (ids and kinds only) — the request that read
//! it fails, nothing is served from it.

use super::trust::tampered;
use crate::{StoreError, VersionRow};

/// A settings row as read: key, value, MAC.
pub(super) type SettingRow = (String, Vec<u8>, Option<Vec<u8>>);

impl super::SqliteStore {
    /// The column holding settings rows' MACs (a read-only open of an older database has
    /// none).
    pub(super) fn mac_column(&self) -> &'static str {
        if self.has_mac { "mac" } else { "NULL" }
    }

    /// Whether the row read for `key` (value, MAC) is the one last written: its MAC is
    /// valid and is the one this process knows (absent where it knows none). A read-only
    /// open (offline tools without the keys) checks nothing.
    pub(super) fn setting_fresh(&self, key: &str, row: Option<(&[u8], Option<&[u8]>)>) -> bool {
        let Some(integ) = &self.integ else {
            return true;
        };
        let known = self.known.read();
        match (row, known.settings.get(key)) {
            (None, None) => true,
            (Some((v, Some(mac))), Some(k)) => mac == k.as_slice() && integ.setting_ok(key, v, mac),
            _ => false,
        }
    }

    /// [`Self::setting_fresh`] for a prefix read: every row returned, and every row known
    /// in the range the read covered (all of the prefix unless `limit` cut it).
    pub(super) fn settings_fresh(
        &self,
        prefix: &str,
        limit: usize,
        rows: &[SettingRow],
    ) -> Result<(), StoreError> {
        if self.integ.is_none() {
            return Ok(());
        }
        for (k, v, mac) in rows {
            if !self.setting_fresh(k, Some((v, mac.as_deref()))) {
                return Err(self.setting_tampered(k));
            }
        }
        let last = if rows.len() >= limit {
            rows.last().map(|r| r.0.as_str())
        } else {
            None
        };
        let known = self.known.read();
        let missing = known.settings.keys().find(|k| {
            k.starts_with(prefix)
                && last.is_none_or(|l| k.as_str() <= l)
                && rows
                    .binary_search_by(|r| r.0.as_str().cmp(k.as_str()))
                    .is_err()
        });
        match missing {
            Some(k) => Err(self.setting_tampered(k)),
            None => Ok(()),
        }
    }

    pub(super) fn setting_tampered(&self, key: &str) -> StoreError {
        let what = format!(
            "settings row {key} is not the one phivault last wrote (inserted, edited, removed or restored from an older copy)"
        );
        tracing::error!(row = key, "refused a settings row changed outside phivault");
        self.detected(&what);
        tampered(what)
    }

    /// Keep a refusal for the watcher's alert (see [`crate::Store::take_detections`]).
    pub(super) fn detected(&self, what: &str) {
        let mut d = self.detections.lock();
        if d.len() < super::MAX_DETECTIONS && !d.iter().any(|x| x == what) {
            d.push(what.to_owned());
        }
    }

    /// Have the writer catch up with heads another process wrote (see [`catch_up`]).
    pub(super) fn catch_up(&self) -> Result<(), StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        if !self.send(super::writer::Command::Sync(tx)) {
            return Ok(());
        }
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    /// Whether `row` (`None`: no row) is the current version this process knows for
    /// `rtype`/`id`.
    pub(super) fn current_fresh(&self, rtype: &str, id: &str, row: Option<&VersionRow>) -> bool {
        if self.integ.is_none() {
            return true;
        }
        let known = self.known.read();
        match (known.head(rtype, id), row) {
            (None, None) => true,
            (Some(h), Some(r)) => h.version == r.version && h.deleted == r.deleted,
            _ => false,
        }
    }

    pub(super) fn resource_tampered(&self, rtype: &str, id: &str, what: &str) -> StoreError {
        tracing::error!(
            rtype,
            id,
            what,
            "refused a resource changed outside phivault"
        );
        let what = format!(
            "{rtype}/{id}: {what} (changed outside phivault: rolled back, removed, added or marked deleted)"
        );
        self.detected(&what);
        tampered(what)
    }

    /// The background check: everything summed afresh in one snapshot, against the state
    /// signed with the head of that snapshot.
    pub(super) fn check_state_now(
        &self,
        pace: &mut dyn FnMut(),
    ) -> Result<Vec<String>, StoreError> {
        let Some(integ) = self.integ.clone() else {
            return Ok(Vec::new());
        };
        self.heads.wait()?;
        let out = match self
            .with_snapshot(|c| Ok(super::verify::against_signed_state(c, &integ, pace)))
            .and_then(|r| r)
        {
            Ok(out) => out,
            // rows the check cannot even read are a finding, not a reason to stop checking
            Err(StoreError::Tampered(why)) => vec![why],
            Err(StoreError::Closed) => return Err(StoreError::Closed),
            Err(e) => vec![format!(
                "the store cannot be read as phivault wrote it ({e})"
            )],
        };
        for what in &out {
            self.detected(what);
        }
        Ok(out)
    }

    /// Whether `row`, read as version `version` of `rtype`/`id` (`None`: none), is one this
    /// process knows: a version up to the current one exists, none beyond it does, and the
    /// current one is a tombstone exactly when it knows it is.
    pub(super) fn version_fresh(
        &self,
        rtype: &str,
        id: &str,
        version: u64,
        row: Option<&VersionRow>,
    ) -> bool {
        if self.integ.is_none() {
            return true;
        }
        let head = self.known.read().head(rtype, id);
        match (head, row) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(h), None) => version == 0 || version > h.version,
            (Some(h), Some(r)) => {
                r.version <= h.version && (r.version < h.version || r.deleted == h.deleted)
            }
        }
    }

    /// Whether `rows`, a resource's history newest first (at most `limit`), has exactly the
    /// versions from the current one down, without a gap; or, for a type's history (no
    /// `id`), no version beyond its resource's current one.
    pub(super) fn history_fresh(
        &self,
        rtype: &str,
        id: Option<&str>,
        limit: usize,
        rows: &[VersionRow],
    ) -> bool {
        if self.integ.is_none() {
            return true;
        }
        let known = self.known.read();
        match id {
            Some(id) => {
                let top = known.head(rtype, id).map_or(0, |h| h.version);
                let want = usize::try_from(top).unwrap_or(usize::MAX).min(limit);
                rows.len() == want
                    && rows
                        .iter()
                        .zip((0..top).rev())
                        .all(|(r, below)| r.version == below + 1)
                    && rows.first().is_none_or(|r| {
                        known
                            .head(rtype, id)
                            .is_some_and(|h| h.deleted == r.deleted)
                    })
            }
            None => rows.iter().all(|r| {
                known
                    .head(rtype, &r.id)
                    .is_some_and(|h| r.version <= h.version)
            }),
        }
    }
}
