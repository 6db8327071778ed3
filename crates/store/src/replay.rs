//! Every stored row against the writes the audit log commits, whichever engine holds them
//! (`phivault verify`): each engine reads its rows and hands them here, which names every
//! one that differs — ids, keys and kinds, never values.

use std::collections::{BTreeMap, HashMap};

use phivault_audit::{AuditEvent, Write};

use crate::integrity::Integrity;

/// What a verification found.
#[derive(Debug, Default)]
pub struct Report {
    /// Every discrepancy, one line each (ids, keys and kinds; never values).
    pub discrepancies: Vec<String>,
    /// Versions read.
    pub versions: u64,
    /// Settings rows read.
    pub settings: u64,
    /// Audit events replayed.
    pub events: u64,
}

/// A version as committed: tombstone or not, SHA-256 of its sealed bytes.
type Committed = (bool, [u8; 32]);

/// What the log commits: the last write of each settings row, and every version.
#[derive(Default)]
pub(crate) struct Log {
    settings: HashMap<String, [u8; 32]>,
    versions: BTreeMap<(String, String, u64), Committed>,
    events: u64,
}

impl Log {
    /// Replay one stored event (one that does not decode commits nothing: the chain's
    /// verification names it).
    pub(crate) fn add(&mut self, event: &[u8]) {
        self.events += 1;
        let Ok(ev) = AuditEvent::decode(event) else {
            return;
        };
        for w in ev.writes {
            match w {
                Write::Setting { key, mac } => {
                    self.settings.insert(key, mac);
                }
                Write::Version {
                    resource_type,
                    resource_id,
                    version,
                    deleted,
                    sealed,
                } => {
                    self.versions
                        .insert((resource_type, resource_id, version), (deleted, sealed));
                }
            }
        }
    }

    /// Compare rows with it: settings rows first, then versions, then heads.
    pub(crate) fn checker<'a>(self, integ: &'a Integrity, report: &'a mut Report) -> Checker<'a> {
        report.events = self.events;
        // the newest committed version of each resource, for the heads
        let mut newest: HashMap<(String, String), (u64, bool)> = HashMap::new();
        for ((t, i, v), (d, _)) in &self.versions {
            let e = newest.entry((t.clone(), i.clone())).or_insert((*v, *d));
            if *v >= e.0 {
                *e = (*v, *d);
            }
        }
        Checker {
            integ,
            settings: self.settings,
            versions: self.versions,
            newest,
            report,
        }
    }
}

/// Rows compared with what the log commits, kind by kind.
pub(crate) struct Checker<'a> {
    integ: &'a Integrity,
    settings: HashMap<String, [u8; 32]>,
    versions: BTreeMap<(String, String, u64), Committed>,
    newest: HashMap<(String, String), (u64, bool)>,
    report: &'a mut Report,
}

impl Checker<'_> {
    fn say(&mut self, what: String) {
        self.report.discrepancies.push(what);
    }

    /// A settings row as stored.
    pub(crate) fn setting(&mut self, k: &str, v: &[u8], mac: Option<&[u8]>) {
        self.report.settings += 1;
        let valid = mac.is_some_and(|m| self.integ.setting_ok(k, v, m));
        match (self.settings.remove(k), valid) {
            (_, false) => self.say(format!(
                "settings row {k}: no valid MAC (inserted or edited outside phivault)"
            )),
            (None, true) => self.say(format!(
                "settings row {k}: never committed in the audit log"
            )),
            (Some(want), true) if mac != Some(&want[..]) => self.say(format!(
                "settings row {k}: not the value last committed (restored from an older copy)"
            )),
            _ => {}
        }
    }

    /// Every settings row was read: those committed but not stored.
    pub(crate) fn settings_done(&mut self) {
        let mut missing: Vec<String> = self.settings.drain().map(|(k, _)| k).collect();
        missing.sort();
        for k in missing {
            self.say(format!("settings row {k}: committed but missing (removed)"));
        }
    }

    /// A version as stored (its sealed bytes by their SHA-256).
    pub(crate) fn version(&mut self, t: &str, i: &str, v: u64, deleted: bool, digest: [u8; 32]) {
        self.report.versions += 1;
        match self.versions.remove(&(t.to_owned(), i.to_owned(), v)) {
            None => self.say(format!(
                "{t}/{i} version {v}: stored but never committed (inserted or forged)"
            )),
            Some((want_d, want)) if want_d != deleted || want != digest => self.say(format!(
                "{t}/{i} version {v}: not what was committed (edited, swapped or a forged tombstone)"
            )),
            _ => {}
        }
    }

    /// Every version was read: those committed but not stored.
    pub(crate) fn versions_done(&mut self) {
        let missing: Vec<(String, String, u64)> =
            std::mem::take(&mut self.versions).into_keys().collect();
        for (t, i, v) in missing {
            self.say(format!(
                "{t}/{i} version {v}: committed but missing (removed or rolled back)"
            ));
        }
    }

    /// A resource's head as stored: its current version and tombstone flag (None: not in
    /// the form phivault writes).
    pub(crate) fn head(&mut self, t: &str, i: &str, found: Option<(u64, bool)>) {
        match (self.newest.remove(&(t.to_owned(), i.to_owned())), found) {
            (Some(want), Some(got)) if want == got => {}
            (want, got) => {
                let v = |x: Option<u64>| x.map_or_else(|| "none".to_owned(), |v| v.to_string());
                let what = format!(
                    "{t}/{i}: its head says version {}, the log {}",
                    v(got.map(|g| g.0)),
                    v(want.map(|w| w.0))
                );
                self.say(what);
            }
        }
    }

    /// Every head was read: resources committed but without one.
    pub(crate) fn heads_done(mut self) {
        let mut lost: Vec<(String, String)> = self.newest.drain().map(|(k, _)| k).collect();
        lost.sort();
        for (t, i) in lost {
            self.say(format!("{t}/{i}: committed but has no head (removed)"));
        }
    }
}
