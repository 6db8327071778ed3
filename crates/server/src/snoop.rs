//! Insider-snooping detection over the audit log (AU5), first rules: a scan of the events
//! since the last scan (`phivault audit scan`) that raises alert records for review, each
//! naming its rule, the evidence (request ids) and a score.
//!
//! Rules (people only: back-end clients act for systems and are watched by other means):
//! * `after-hours` — a person opens patient data outside working hours (default 07:00 –
//!   19:00 UTC, Monday to Friday); one alert per person and night.
//! * `bulk-record` — a person pulls a whole record (`$everything`).
//! * `volume` — a person touches more distinct patients in a day than [`VOLUME_FLOOR`] and
//!   than three times their own median of earlier days (with three days of history or
//!   more) — or, without such a history, three times their peers' median that day.
//!
//! * `self-access` — the patient is the person themselves (same family name, given name
//!   and birth date as their Practitioner record).
//! * `coworker` — the patient is a member of the workforce (a Practitioner record with the
//!   same identity).
//! * `same-family-name` / `same-address` — the patient shares a family name or an address
//!   with the person.
//! * `restricted-record` — the patient's record is restricted (`meta.security` R or V) or
//!   tagged VIP.
//!
//! * `unexplained-access` — a clinician opens a patient's chart (a request about that one
//!   patient, not a list) and no treatment relationship explains it at that time: no
//!   Encounter, CareTeam or Appointment naming their Practitioner whose period, widened by
//!   [`BEFORE_MS`] before and [`AFTER_MS`] after, covers the access (see [`span_of`]).
//!   Access under break-the-glass (`ETREAT`) has its own alert and is not counted here.
//! * `name-search` — a clinician searches patients by name and, within
//!   [`NAME_SEARCH_MS`], opens the chart of a patient it found whom no relationship
//!   explains: looking someone up rather than treating them.
//!
//! The relationship rules need the records: a [`Records`] gives the [`Facts`] of patients,
//! of staff and of the workforce (the scanner decrypts them; no fact leaves it, alerts name
//! ids only). Each fires once per person, patient and day. Break-the-glass alerts are
//! raised when the window opens (`care.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use phivault_audit::AuditEvent;
use serde::{Deserialize, Serialize};

/// Below this many distinct patients a day, volume is never unusual.
pub const VOLUME_FLOOR: usize = 20;
const DAY_MS: u64 = 86_400_000;

/// Working hours (UTC): `[start_hour, end_hour)`, Monday to Friday unless `weekends`.
#[derive(Debug, Clone, Copy)]
pub struct Hours {
    /// First working hour.
    pub start: u64,
    /// First hour after work.
    pub end: u64,
    /// Saturdays and Sundays are working days.
    pub weekends: bool,
}

impl Default for Hours {
    fn default() -> Self {
        Hours {
            start: 7,
            end: 19,
            weekends: false,
        }
    }
}

impl Hours {
    fn outside(&self, time_ms: u64) -> bool {
        let hour = (time_ms / 3_600_000) % 24;
        // 1970-01-01 was a Thursday: day 0 → weekday 3 (Monday = 0)
        let weekday = (time_ms / DAY_MS + 3) % 7;
        (weekday >= 5 && !self.weekends) || hour < self.start || hour >= self.end
    }
}

/// What the relationship rules compare of a person or a patient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// Family names, lower-cased.
    pub families: Vec<String>,
    /// Addresses: lines and postal code, lower-cased, spaces collapsed.
    pub addresses: Vec<String>,
    /// `family|given|birth date`, lower-cased, when the birth date is known.
    pub identity: Option<String>,
    /// Restricted (`meta.security` R or V) or tagged VIP.
    pub restricted: bool,
}

fn norm(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

impl Facts {
    /// The facts of a Patient or Practitioner resource.
    pub fn of(r: &serde_json::Value) -> Facts {
        let names = r["name"].as_array().cloned().unwrap_or_default();
        let families: Vec<String> = names
            .iter()
            .filter_map(|n| n["family"].as_str())
            .map(norm)
            .filter(|f| !f.is_empty())
            .collect();
        let given = names.first().and_then(|n| n["given"][0].as_str()).map(norm);
        let identity = match (families.first(), given, r["birthDate"].as_str()) {
            (Some(f), Some(g), Some(b)) => Some(format!("{f}|{g}|{b}")),
            _ => None,
        };
        let addresses = r["address"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|ad| {
                        let lines: Vec<&str> = ad["line"]
                            .as_array()?
                            .iter()
                            .filter_map(|l| l.as_str())
                            .collect();
                        let postal = ad["postalCode"].as_str().unwrap_or("");
                        (!lines.is_empty())
                            .then(|| norm(&format!("{} | {postal}", lines.join(" "))))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let codes = |k: &str| -> Vec<String> {
            r["meta"][k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c["code"].as_str())
                        .map(str::to_uppercase)
                        .collect()
                })
                .unwrap_or_default()
        };
        let restricted = codes("security").iter().any(|c| c == "R" || c == "V")
            || codes("tag").iter().any(|c| c == "VIP");
        Facts {
            families,
            addresses,
            identity,
            restricted,
        }
    }
}

/// How long before a relationship's period starts it explains access (pre-visit review).
pub const BEFORE_MS: i64 = 7 * DAY_MS as i64;
/// How long after a relationship's period ends it explains access (results, follow-up).
pub const AFTER_MS: i64 = 30 * DAY_MS as i64;
/// How long after a name search opening a patient it found counts as following it.
pub const NAME_SEARCH_MS: u64 = 30 * 60_000;

/// A treatment relationship: a patient and when it explains access (ms since the epoch,
/// inclusive; `i64::MIN`/`i64::MAX` when open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The patient.
    pub patient: String,
    /// From when.
    pub from_ms: i64,
    /// Until when.
    pub until_ms: i64,
}

/// When a relationship record (`Encounter`, `CareTeam` or `Appointment`) explains access:
/// its period widened by [`BEFORE_MS`] and [`AFTER_MS`]; open where the record leaves it
/// open; None when it explains nothing (cancelled, entered in error, a no-show, an inactive
/// team without a period).
pub fn span_of(rtype: &str, r: &serde_json::Value) -> Option<(i64, i64)> {
    let at = |v: &serde_json::Value, end: bool| -> Option<i64> {
        let d = phivault_fhir::search::parse_date(v.as_str()?)?;
        Some(if end { d.hi } else { d.lo })
    };
    let status = r["status"].as_str().unwrap_or("");
    if matches!(status, "cancelled" | "entered-in-error" | "noshow") {
        return None;
    }
    let (start, end) = match rtype {
        "Appointment" => (
            at(&r["start"], false),
            at(&r["end"], true).or(at(&r["start"], true)),
        ),
        _ => (
            at(&r["period"]["start"], false),
            at(&r["period"]["end"], true),
        ),
    };
    if rtype == "CareTeam" && status == "inactive" && end.is_none() {
        return None;
    }
    let end = match (end, rtype, status) {
        (Some(e), ..) => Some(e),
        // a finished encounter without an end: as if it ended when it started
        (None, "Encounter", "finished") => start,
        _ => None,
    };
    Some((
        start.map_or(i64::MIN, |s| s.saturating_sub(BEFORE_MS)),
        end.map_or(i64::MAX, |e| e.saturating_add(AFTER_MS)),
    ))
}

/// Where the relationship rules look things up.
pub trait Records {
    /// The facts of patient `id`.
    fn patient(&mut self, id: &str) -> Option<Facts>;
    /// The facts of the person behind account `user` (their Practitioner record).
    fn staff(&mut self, user: &str) -> Option<Facts>;
    /// Whether a member of the workforce (a Practitioner record) has this identity.
    fn is_workforce(&mut self, identity: &str) -> bool;
    /// The treatment relationships of the person behind account `user`; None when the
    /// account is not a Practitioner's (no relationship can explain its accesses).
    fn relations(&mut self, user: &str) -> Option<Vec<Relation>>;
}

/// No records: only the rules over events run.
pub struct NoRecords;

impl Records for NoRecords {
    fn patient(&mut self, _: &str) -> Option<Facts> {
        None
    }
    fn staff(&mut self, _: &str) -> Option<Facts> {
        None
    }
    fn is_workforce(&mut self, _: &str) -> bool {
        false
    }
    fn relations(&mut self, _: &str) -> Option<Vec<Relation>> {
        None
    }
}

/// [`Records`] read from the store (each record decrypted once per scan).
pub struct EngineRecords<'a> {
    app: &'a crate::App,
    engine: &'a crate::engine::Engine,
    patients: HashMap<String, Option<Facts>>,
    staff: HashMap<String, Option<Facts>>,
    workforce: Option<BTreeSet<String>>,
    relations: HashMap<String, Option<Vec<Relation>>>,
}

impl<'a> EngineRecords<'a> {
    /// Over `app`'s store.
    pub fn new(app: &'a crate::App) -> Self {
        EngineRecords {
            app,
            engine: &app.engine,
            patients: HashMap::new(),
            staff: HashMap::new(),
            workforce: None,
            relations: HashMap::new(),
        }
    }

    fn practitioner(&self, user: &str) -> Option<String> {
        self.engine
            .users()
            .get_by_id(user)
            .ok()
            .flatten()
            .and_then(|u| u.practitioner.clone())
    }

    fn facts(&self, row: Option<phivault_store::VersionRow>) -> Option<Facts> {
        let row = row.filter(|r| !r.deleted)?;
        let body = self.engine.open(&row).ok()?;
        let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
        Some(Facts::of(&json))
    }

    fn load(&self, rtype: &str, id: &str) -> Option<Facts> {
        self.facts(self.engine.store.current(rtype, id).ok()?)
    }
}

impl Records for EngineRecords<'_> {
    fn patient(&mut self, id: &str) -> Option<Facts> {
        if let Some(f) = self.patients.get(id) {
            return f.clone();
        }
        let f = self.load("Patient", id);
        self.patients.insert(id.to_owned(), f.clone());
        f
    }

    fn staff(&mut self, user: &str) -> Option<Facts> {
        if let Some(f) = self.staff.get(user) {
            return f.clone();
        }
        let f = self
            .practitioner(user)
            .and_then(|p| self.load("Practitioner", &p));
        self.staff.insert(user.to_owned(), f.clone());
        f
    }

    fn is_workforce(&mut self, identity: &str) -> bool {
        if self.workforce.is_none() {
            let mut set = BTreeSet::new();
            let mut after: Option<String> = None;
            loop {
                let ids = self
                    .engine
                    .store
                    .candidates(
                        "Practitioner",
                        &phivault_store::Candidates::All,
                        after.as_deref(),
                        1000,
                    )
                    .unwrap_or_default();
                let Some(last) = ids.last().cloned() else {
                    break;
                };
                let rows = self
                    .engine
                    .store
                    .current_many("Practitioner", &ids)
                    .unwrap_or_default();
                for row in rows {
                    if let Some(i) = self.facts(row).and_then(|f| f.identity) {
                        set.insert(i);
                    }
                }
                after = Some(last);
            }
            self.workforce = Some(set);
        }
        self.workforce
            .as_ref()
            .is_some_and(|w| w.contains(identity))
    }

    fn relations(&mut self, user: &str) -> Option<Vec<Relation>> {
        if let Some(r) = self.relations.get(user) {
            return r.clone();
        }
        let found = self.practitioner(user).map(|pr| {
            let mut out = Vec::new();
            for (rtype, param) in crate::care::RELATIONSHIPS {
                let rows = crate::search::referencing(self.app, rtype, param, "Practitioner", &pr)
                    .unwrap_or_default();
                for l in rows {
                    let Some(patient) = crate::engine::key_patient(&l.row.key_id) else {
                        continue;
                    };
                    if let Some((from_ms, until_ms)) = span_of(rtype, &l.json) {
                        out.push(Relation {
                            patient: patient.to_owned(),
                            from_ms,
                            until_ms,
                        });
                    }
                }
            }
            out
        });
        self.relations.insert(user.to_owned(), found.clone());
        found
    }
}

/// The relationship rules for one access by `staff` to `patient`: (rule, score, detail).
fn relationship(
    staff: Option<&Facts>,
    patient: &Facts,
    workforce: bool,
) -> Vec<(&'static str, u8, &'static str)> {
    let mut out = Vec::new();
    let same_person = staff
        .and_then(|s| s.identity.as_ref())
        .is_some_and(|i| patient.identity.as_ref() == Some(i));
    if same_person {
        out.push(("self-access", 90, "the patient is the person themselves"));
    } else if workforce {
        out.push(("coworker", 60, "the patient is a member of the workforce"));
    }
    if let Some(s) = staff
        && !same_person
    {
        if s.families.iter().any(|f| patient.families.contains(f)) {
            out.push((
                "same-family-name",
                40,
                "the patient shares the person's family name",
            ));
        }
        if s.addresses.iter().any(|a| patient.addresses.contains(a)) {
            out.push((
                "same-address",
                50,
                "the patient shares the person's address",
            ));
        }
    }
    if patient.restricted {
        out.push(("restricted-record", 70, "the record is restricted or VIP"));
    }
    out
}

/// A finding of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The rule.
    pub rule: String,
    /// The person's account id.
    pub user: String,
    /// The patient concerned, if one.
    pub patient: Option<String>,
    /// The requests that are the evidence.
    pub evidence: Vec<String>,
    /// 0 – 100: how strongly it suggests snooping.
    pub score: u8,
    /// When (ms since the epoch) of the first evidence.
    pub at_ms: u64,
    /// Context for the reviewer (no PHI: counts and ids).
    pub detail: String,
}

fn patients_of(e: &AuditEvent) -> BTreeSet<&str> {
    e.patient
        .iter()
        .map(String::as_str)
        .chain(e.entities.iter().filter_map(|x| x.patient.as_deref()))
        .collect()
}

/// Findings so far, and where each (rule, person, patient, day) is among them.
type Found<'a> = (
    &'a mut Vec<Finding>,
    &'a mut HashMap<(&'static str, String, String, u64), usize>,
);

/// Record `rule`'s finding about event `e`'s person and `patient` once a day (with
/// `evidence`); a later event the same day adds its request to the first one's evidence.
fn once_a_day(
    (out, seen): Found<'_>,
    e: &AuditEvent,
    patient: &str,
    (rule, score, detail): (&'static str, u8, &'static str),
    evidence: Vec<String>,
) {
    let user = e.user.clone().unwrap_or_default();
    let key = (rule, user.clone(), patient.to_owned(), e.time_ms / DAY_MS);
    match seen.get(&key) {
        Some(&i) => out[i].evidence.push(e.request_id.clone()),
        None => {
            seen.insert(key, out.len());
            out.push(Finding {
                rule: rule.into(),
                user,
                patient: Some(patient.to_owned()),
                evidence,
                score,
                at_ms: e.time_ms,
                detail: detail.into(),
            });
        }
    }
}

/// Run the rules over `events` (in log order) and return what they find. `history` is the
/// per-person count of distinct patients of each earlier day (updated in place, so a
/// scheduled scan keeps baselines across runs).
pub fn scan(
    events: &[AuditEvent],
    hours: Hours,
    history: &mut BTreeMap<String, BTreeMap<u64, usize>>,
    records: &mut dyn Records,
) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    // relationship findings: once per rule, person, patient and day
    let mut seen: HashMap<(&'static str, String, String, u64), usize> = HashMap::new();
    // after-hours: one alert per person and night
    let mut nights: HashMap<(String, u64), usize> = HashMap::new();
    // volume: distinct patients per person per day
    let mut daily: BTreeMap<(u64, String), (BTreeSet<String>, Vec<String>)> = BTreeMap::new();
    // name searches per person: (time, request, patients found), the recent ones
    let mut searches: HashMap<String, Vec<(u64, String, BTreeSet<String>)>> = HashMap::new();
    for e in events {
        let Some(user) = &e.user else { continue };
        if e.outcome.http_status >= 400 {
            continue;
        }
        let patients = patients_of(e);
        if patients.is_empty() {
            continue;
        }
        if e.interaction == "search-type"
            && e.resource_type.as_deref() == Some("Patient")
            && e.detail
                .query
                .iter()
                .any(|q| matches!(q.as_str(), "name" | "family" | "given" | "phonetic"))
        {
            let found = e
                .entities
                .iter()
                .filter(|x| x.resource_type == "Patient")
                .map(|x| x.resource_id.clone())
                .collect();
            let list = searches.entry(user.clone()).or_default();
            list.retain(|(t, ..)| t + NAME_SEARCH_MS >= e.time_ms);
            list.push((e.time_ms, e.request_id.clone(), found));
        }
        // opening one patient's chart (not a list), not under or breaking the glass (which
        // has its own alert)
        let chart = e.patient.as_deref().filter(|_| {
            e.detail.purpose.as_deref() != Some("ETREAT")
                && e.interaction != "break-the-glass"
                && !(e.interaction == "search-type"
                    && e.resource_type.as_deref() == Some("Patient"))
        });
        if let Some(p) = chart
            && let Some(relations) = records.relations(user)
        {
            let t = i64::try_from(e.time_ms).unwrap_or(i64::MAX);
            let explained = relations
                .iter()
                .any(|r| r.patient == p && r.from_ms <= t && t <= r.until_ms);
            if !explained {
                once_a_day(
                    (&mut out, &mut seen),
                    e,
                    p,
                    (
                        "unexplained-access",
                        50,
                        "no treatment relationship explains the access",
                    ),
                    vec![e.request_id.clone()],
                );
                let looked_up = searches.get(user).and_then(|list| {
                    list.iter()
                        .rev()
                        .find(|(t, _, found)| t + NAME_SEARCH_MS >= e.time_ms && found.contains(p))
                });
                if let Some((_, search, _)) = looked_up {
                    once_a_day(
                        (&mut out, &mut seen),
                        e,
                        p,
                        (
                            "name-search",
                            60,
                            "a name search, then the chart of a patient it found, unexplained",
                        ),
                        vec![search.clone(), e.request_id.clone()],
                    );
                }
            }
        }
        for p in &patients {
            let Some(pf) = records.patient(p) else {
                continue;
            };
            let sf = records.staff(user);
            let workforce = pf
                .identity
                .as_deref()
                .is_some_and(|i| records.is_workforce(i));
            for rule in relationship(sf.as_ref(), &pf, workforce) {
                once_a_day(
                    (&mut out, &mut seen),
                    e,
                    p,
                    rule,
                    vec![e.request_id.clone()],
                );
            }
        }
        if e.interaction == "everything" {
            out.push(Finding {
                rule: "bulk-record".into(),
                user: user.clone(),
                patient: patients.first().map(|p| (*p).to_owned()),
                evidence: vec![e.request_id.clone()],
                score: 60,
                at_ms: e.time_ms,
                detail: "a whole record was pulled ($everything)".into(),
            });
        }
        if hours.outside(e.time_ms) {
            // the night an access belongs to: shifted so that one night is one key
            let night = (e.time_ms + 24u64.saturating_sub(hours.end) * 3_600_000) / DAY_MS;
            match nights.get(&(user.clone(), night)) {
                Some(&i) => {
                    let f: &mut Finding = &mut out[i];
                    f.evidence.push(e.request_id.clone());
                    f.detail = format!("{} accesses outside working hours", f.evidence.len());
                }
                None => {
                    nights.insert((user.clone(), night), out.len());
                    out.push(Finding {
                        rule: "after-hours".into(),
                        user: user.clone(),
                        patient: patients.first().map(|p| (*p).to_owned()),
                        evidence: vec![e.request_id.clone()],
                        score: 30,
                        at_ms: e.time_ms,
                        detail: "1 access outside working hours".into(),
                    });
                }
            }
        }
        let d = daily.entry((e.time_ms / DAY_MS, user.clone())).or_default();
        d.0.extend(patients.iter().map(|p| (*p).to_owned()));
        d.1.push(e.request_id.clone());
    }
    // volume against the person's own baseline, day by day; a day's count goes on from
    // what earlier scans of the same day counted, and the alert is raised by the scan in
    // which the count becomes unusual (once a day)
    let so_far = |history: &BTreeMap<String, BTreeMap<u64, usize>>, user: &str, day: u64| {
        history
            .get(user)
            .and_then(|h| h.get(&day))
            .copied()
            .unwrap_or(0)
    };
    // everyone's count of each day in this scan: earlier scans' and this one's
    let mut by_day: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    let days: BTreeSet<u64> = daily.keys().map(|(d, _)| *d).collect();
    for &day in &days {
        let counts = by_day.entry(day).or_default();
        for (user, h) in history.iter() {
            if let Some(c) = h.get(&day)
                && !daily.contains_key(&(day, user.clone()))
            {
                counts.push(*c);
            }
        }
    }
    for ((day, user), (p, _)) in &daily {
        by_day
            .entry(*day)
            .or_default()
            .push(so_far(history, user, *day) + p.len());
    }
    for ((day, user), (patients, requests)) in daily {
        let before = so_far(history, &user, day);
        let n = before + patients.len();
        let past = history.entry(user.clone()).or_default();
        let mut earlier: Vec<usize> = past.range(..day).map(|(_, c)| *c).collect();
        earlier.sort_unstable();
        // against their own baseline (three days of history or more), or, for someone
        // without one, against their peers' that day (five peers or more)
        let own = (earlier.len() >= 3).then(|| earlier[earlier.len() / 2]);
        let mut peers = by_day.get(&day).cloned().unwrap_or_default();
        peers.sort_unstable();
        let peer_median = (peers.len() >= 5).then(|| peers[peers.len() / 2]);
        let unusual = |n: usize| {
            n > VOLUME_FLOOR
                && match (own, peer_median) {
                    (Some(m), _) => n > 3 * m.max(1),
                    (None, Some(pm)) => n > 3 * pm.max(1),
                    (None, None) => false,
                }
        };
        if unusual(n) && !unusual(before) {
            let fmt = |m: Option<usize>| m.map_or("none".to_owned(), |m| m.to_string());
            out.push(Finding {
                rule: "volume".into(),
                user: user.clone(),
                patient: None,
                evidence: requests,
                score: 50,
                at_ms: day * DAY_MS,
                detail: format!(
                    "{n} patients in a day; own median {}, peers' median {}",
                    fmt(own),
                    fmt(peer_median)
                ),
            });
        }
        *past.entry(day).or_default() = n;
    }
    out
}

/// Where the scanner keeps its position in the log.
const POSITION: &str = "snoop:position";
/// The per-person daily counts (the volume baselines), sealed.
const HISTORY: &str = "snoop:history";
const HISTORY_LABEL: &str = "phivault snooping baselines v1\u{0}snoop:history";
/// Days of counts kept for the volume baselines.
const BASELINE_DAYS: u64 = 90;
/// Most events one scan reads; the next scan goes on from there.
const MAX_EVENTS: usize = 2_000_000;

/// What one [`run`] read and raised.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Events read.
    pub events: usize,
    /// The log position scanned up to.
    pub position: u64,
    /// New alerts by rule.
    pub alerts: BTreeMap<String, usize>,
    /// The new alerts.
    #[serde(skip)]
    pub raised: Vec<crate::care::Alert>,
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] phivault_store::StoreError),
    /// A stored event or baseline does not open or decode.
    #[error("{0}; run phivault audit verify")]
    Integrity(String),
    /// An alert could not be written.
    #[error(transparent)]
    Alert(#[from] crate::care::AlertError),
}

/// An alert's id, derived from what it is about, so that two scans over the same events
/// (the server's and an operator's) write the same alert, not two.
fn alert_id(f: &Finding) -> String {
    let mut buf = Vec::new();
    for part in [
        f.rule.as_str(),
        f.user.as_str(),
        f.patient.as_deref().unwrap_or(""),
        f.evidence.first().map_or("", String::as_str),
    ] {
        buf.extend_from_slice(&(part.len() as u64).to_be_bytes());
        buf.extend_from_slice(part.as_bytes());
    }
    phivault_crypto::sha256(&buf)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Run the rules over the events after the last scanned position and raise an open alert
/// for each finding (one already raised is left as it is, reviewed or not). The position
/// and the baselines are kept in the store; the records the relationship rules read are
/// decrypted in memory only.
pub fn run(app: &crate::App, hours: Hours) -> Result<Summary, ScanError> {
    use crate::care::{Alert, raise_alert};
    let store = &*app.engine.store;
    let keys = app.engine.keys();
    let position: u64 = store
        .meta(POSITION)?
        .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0);
    let mut history: BTreeMap<String, BTreeMap<u64, usize>> = match store.meta(HISTORY)? {
        Some(sealed) => {
            let plain = keys.open_secret(HISTORY_LABEL, &sealed).map_err(|_| {
                ScanError::Integrity("the stored baselines failed their integrity check".into())
            })?;
            serde_json::from_slice(plain.expose())
                .map_err(|_| ScanError::Integrity("the stored baselines do not decode".into()))?
        }
        None => Default::default(),
    };
    let mut events = Vec::new();
    let mut last = position;
    while events.len() < MAX_EVENTS {
        let batch = store.audit_after(last, 10_000)?;
        let Some(end) = batch.last().map(|s| s.seq) else {
            break;
        };
        for s in batch {
            events.push(
                AuditEvent::decode(&s.event).map_err(|_| {
                    ScanError::Integrity(format!("event {} does not decode", s.seq))
                })?,
            );
        }
        last = end;
    }
    let mut records = EngineRecords::new(app);
    let findings = scan(&events, hours, &mut history, &mut records);
    let users = app.engine.users();
    let existing: BTreeSet<String> = crate::care::alerts(keys, store, usize::MAX)?
        .into_iter()
        .map(|a| a.id)
        .collect();
    let mut summary = Summary {
        events: events.len(),
        position: last,
        ..Default::default()
    };
    for f in &findings {
        let id = alert_id(f);
        if existing.contains(&id) {
            continue;
        }
        let username = users
            .get_by_id(&f.user)
            .ok()
            .flatten()
            .map(|u| u.username.clone())
            .unwrap_or_default();
        let at_ms = i64::try_from(f.at_ms).unwrap_or(i64::MAX);
        let alert = Alert {
            id,
            rule: f.rule.clone(),
            user: f.user.clone(),
            username,
            patient: f.patient.clone().unwrap_or_default(),
            reason: f.detail.clone(),
            at_ms,
            until_ms: at_ms,
            request_id: f.evidence.first().cloned().unwrap_or_default(),
            status: "open".into(),
            reviewer: None,
            review_note: None,
            reviewed_ms: None,
            evidence: f.evidence.clone(),
            score: f.score,
        };
        raise_alert(keys, store, &alert)?;
        *summary.alerts.entry(f.rule.clone()).or_default() += 1;
        summary.raised.push(alert);
    }
    // baselines of the last [`BASELINE_DAYS`] days are enough; older days are dropped
    if let Some(newest) = events.last().map(|e| e.time_ms / DAY_MS) {
        let oldest = newest.saturating_sub(BASELINE_DAYS);
        for days in history.values_mut() {
            days.retain(|d, _| *d >= oldest);
        }
        history.retain(|_, days| !days.is_empty());
    }
    let plain = zeroize::Zeroizing::new(
        serde_json::to_vec(&history)
            .map_err(|_| ScanError::Integrity("baselines do not encode".into()))?,
    );
    let sealed = keys
        .seal_secret(HISTORY_LABEL, &plain)
        .map_err(|_| ScanError::Integrity("sealing the baselines failed".into()))?;
    store.set_meta(HISTORY, &sealed)?;
    store.set_meta(POSITION, last.to_string().as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use phivault_audit::{Action, Outcome};

    /// Monday 2026-11-30 00:00 UTC.
    const MONDAY: u64 = 1_795_996_800_000;
    const HOUR: u64 = 3_600_000;

    fn ev(n: u64, t: u64, user: &str, patient: &str, interaction: &str) -> AuditEvent {
        AuditEvent {
            time_ms: t,
            request_id: format!("r{n}"),
            client_id: Some("app".into()),
            user: Some(user.into()),
            action: Action::R,
            interaction: interaction.into(),
            resource_type: Some("Patient".into()),
            resource_id: Some(patient.into()),
            version: None,
            patient: Some(patient.into()),
            outcome: Outcome::from_http(200),
            source: "10.0.0.1".into(),
            entities: Vec::new(),
            detail: Default::default(),
        }
    }

    #[derive(Default)]
    struct Mem {
        patients: HashMap<String, Facts>,
        staff: HashMap<String, Facts>,
        workforce: BTreeSet<String>,
        relations: HashMap<String, Vec<Relation>>,
    }

    impl Records for Mem {
        fn patient(&mut self, id: &str) -> Option<Facts> {
            self.patients.get(id).cloned()
        }
        fn staff(&mut self, user: &str) -> Option<Facts> {
            self.staff.get(user).cloned()
        }
        fn is_workforce(&mut self, identity: &str) -> bool {
            self.workforce.contains(identity)
        }
        fn relations(&mut self, user: &str) -> Option<Vec<Relation>> {
            self.relations.get(user).cloned()
        }
    }

    #[test]
    fn relationship_records_explain_access_for_their_period() {
        use serde_json::json;
        let day = DAY_MS as i64;
        let t = |s: &str| phivault_fhir::search::parse_date(s).expect("date").lo;
        let enc = json!({"status": "finished",
            "period": {"start": "2026-03-01T10:00:00Z", "end": "2026-03-01T11:00:00Z"}});
        let (from, until) = span_of("Encounter", &enc).expect("span");
        assert_eq!(from, t("2026-03-01T10:00:00Z") - 7 * day);
        assert_eq!(until, t("2026-03-01T11:00:00Z") + 1000 + 30 * day);
        let ongoing = json!({"status": "in-progress", "period": {"start": "2026-03-01"}});
        assert_eq!(span_of("Encounter", &ongoing).map(|s| s.1), Some(i64::MAX));
        let no_end = json!({"status": "finished", "period": {"start": "2026-03-01"}});
        assert!(span_of("Encounter", &no_end).expect("span").1 < t("2026-04-02"));
        assert_eq!(span_of("Encounter", &json!({"status": "cancelled"})), None);
        assert_eq!(
            span_of("Encounter", &json!({"status": "planned"})),
            Some((i64::MIN, i64::MAX))
        );
        assert_eq!(
            span_of("CareTeam", &json!({"status": "active"})),
            Some((i64::MIN, i64::MAX))
        );
        assert_eq!(span_of("CareTeam", &json!({"status": "inactive"})), None);
        let appt = json!({"status": "booked", "start": "2026-05-10T09:00:00Z"});
        let (from, until) = span_of("Appointment", &appt).expect("span");
        assert_eq!(from, t("2026-05-10T09:00:00Z") - 7 * day);
        assert!(until > t("2026-06-08") && until < t("2026-06-10"));
        assert_eq!(
            span_of(
                "Appointment",
                &json!({"status": "noshow", "start": "2026-05-10"})
            ),
            None
        );
    }

    /// A clinician opens charts their relationships explain, one whose relationship ended
    /// long ago, one they looked up by name, and one under break-the-glass.
    #[test]
    fn unexplained_access_and_name_search_are_found() {
        let t0 = MONDAY + 10 * HOUR;
        let mut m = Mem::default();
        for p in ["current", "old", "found", "glass", "other"] {
            m.patients.insert(p.into(), Facts::default());
        }
        let span = |p: &str, from: u64, until: u64| Relation {
            patient: p.into(),
            from_ms: from as i64,
            until_ms: until as i64,
        };
        m.relations.insert(
            "u1".into(),
            vec![
                span("current", t0 - DAY_MS, t0 + DAY_MS),
                span("old", t0 - 900 * DAY_MS, t0 - 800 * DAY_MS),
                span("found", t0 - 900 * DAY_MS, t0 - 800 * DAY_MS),
            ],
        );
        let mut events = vec![
            ev(1, t0, "u1", "current", "read"),
            ev(2, t0 + 60_000, "u1", "old", "read"),
        ];
        // a name search that lists "current" and "found", then both charts opened
        let mut search = ev(3, t0 + 120_000, "u1", "x", "search-type");
        search.patient = None;
        search.resource_id = None;
        search.detail.query = vec!["family".into(), "birthdate".into()];
        search.entities = ["current", "found"]
            .iter()
            .map(|p| phivault_audit::Entity {
                action: Action::R,
                resource_type: "Patient".into(),
                resource_id: (*p).into(),
                version: None,
                patient: Some((*p).into()),
            })
            .collect();
        events.push(search);
        events.push(ev(4, t0 + 180_000, "u1", "current", "read"));
        events.push(ev(5, t0 + 240_000, "u1", "found", "read"));
        // break-the-glass access has its own alert; a patient's own access is no one's
        let mut glass = ev(6, t0 + 300_000, "u1", "glass", "read");
        glass.detail.purpose = Some("ETREAT".into());
        events.push(glass);
        events.push(ev(7, t0 + 360_000, "patient-user", "other", "read"));
        // the same lookup more than half an hour after the search is not "following" it
        let mut late = ev(8, t0 + 400_000, "u2", "x", "search-type");
        late.patient = None;
        late.detail.query = vec!["name".into()];
        late.entities = events[2].entities.clone();
        events.push(late);
        events.push(ev(
            9,
            t0 + 400_000 + NAME_SEARCH_MS + 1,
            "u2",
            "found",
            "read",
        ));
        m.relations.insert("u2".into(), Vec::new());
        let found = scan(&events, Hours::default(), &mut BTreeMap::new(), &mut m);
        let got: BTreeSet<(&str, &str, &str)> = found
            .iter()
            .map(|f| {
                (
                    f.rule.as_str(),
                    f.user.as_str(),
                    f.patient.as_deref().unwrap_or(""),
                )
            })
            .collect();
        let want = BTreeSet::from([
            ("unexplained-access", "u1", "old"),
            ("unexplained-access", "u1", "found"),
            ("name-search", "u1", "found"),
            ("unexplained-access", "u2", "found"),
        ]);
        assert_eq!(got, want, "{found:?}");
        let lookup = found
            .iter()
            .find(|f| f.rule == "name-search")
            .expect("lookup");
        assert_eq!(lookup.evidence, ["r3", "r5"]);
    }

    #[test]
    fn facts_come_from_the_fhir_record() {
        let f = Facts::of(&serde_json::json!({"resourceType": "Patient",
            "name": [{"family": " Okafor ", "given": ["Ada", "N"]}], "birthDate": "1980-01-01",
            "address": [{"line": ["1  Elm St", "Apt 2"], "postalCode": "02134"}],
            "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}}));
        assert_eq!(f.families, ["okafor"]);
        assert_eq!(f.identity.as_deref(), Some("okafor|ada|1980-01-01"));
        assert_eq!(f.addresses, ["1 elm st apt 2 | 02134"]);
        assert!(f.restricted);
        let plain =
            Facts::of(&serde_json::json!({"resourceType": "Patient", "name": [{"family": "X"}]}));
        assert_eq!(plain.identity, None);
        assert!(!plain.restricted);
        let vip = Facts::of(&serde_json::json!({"meta": {"tag": [{"code": "vip"}]}}));
        assert!(vip.restricted);
    }

    /// A clinician's day: a thousand ordinary patients and one of each relationship.
    #[test]
    fn relationship_rules_find_self_coworker_family_address_and_restricted_records() {
        let facts = |family: &str, given: &str, birth: Option<&str>, address: &str| Facts {
            families: vec![family.into()],
            addresses: vec![address.into()],
            identity: birth.map(|b| format!("{family}|{given}|{b}")),
            restricted: false,
        };
        let mut m = Mem::default();
        m.staff.insert(
            "u1".into(),
            facts("okafor", "ada", Some("1980-01-01"), "1 elm st | 02134"),
        );
        m.workforce.insert("smith|jo|1975-05-05".into());
        m.patients.insert(
            "self".into(),
            facts("okafor", "ada", Some("1980-01-01"), "9 oak rd | 02100"),
        );
        m.patients.insert(
            "coworker".into(),
            facts("smith", "jo", Some("1975-05-05"), "3 pine | 02111"),
        );
        m.patients.insert(
            "kin".into(),
            facts("okafor", "ben", Some("2001-02-03"), "5 birch | 02122"),
        );
        m.patients.insert(
            "neighbour".into(),
            facts("lee", "kim", None, "1 elm st | 02134"),
        );
        let mut vip = facts("star", "sam", Some("1990-09-09"), "7 hill | 02199");
        vip.restricted = true;
        m.patients.insert("vip".into(), vip);
        for i in 0..1000 {
            m.patients.insert(
                format!("p{i}"),
                facts(
                    &format!("family{i}"),
                    "x",
                    Some("1950-01-01"),
                    &format!("{i} main st | 0{i}"),
                ),
            );
        }
        let mut events = Vec::new();
        let t0 = MONDAY + 9 * HOUR;
        for (n, p) in ["self", "self", "coworker", "kin", "neighbour", "vip"]
            .iter()
            .enumerate()
        {
            events.push(ev(n as u64, t0 + n as u64 * 60_000, "u1", p, "read"));
        }
        for i in 0..1000u64 {
            events.push(ev(
                100 + i,
                t0 + HOUR + i * 1000,
                "u1",
                &format!("p{i}"),
                "read",
            ));
        }
        let found = scan(&events, Hours::default(), &mut BTreeMap::new(), &mut m);
        let got: BTreeSet<(&str, &str)> = found
            .iter()
            .map(|f| (f.rule.as_str(), f.patient.as_deref().unwrap_or("")))
            .collect();
        let want = BTreeSet::from([
            ("self-access", "self"),
            ("coworker", "coworker"),
            ("same-family-name", "kin"),
            ("same-address", "neighbour"),
            ("restricted-record", "vip"),
        ]);
        assert_eq!(got, want, "{found:?}");
        let me = found
            .iter()
            .find(|f| f.rule == "self-access")
            .expect("self");
        assert_eq!(
            me.evidence,
            ["r0", "r1"],
            "one finding a day, with every access"
        );
        assert_eq!(me.score, 90);
    }

    /// Scans that run while the day goes on (the server's, every few minutes) find a
    /// volume spike once, however the day's events are split between them.
    #[test]
    fn a_spike_split_between_scans_is_found_once() {
        let t0 = MONDAY + 9 * HOUR;
        let mut events = Vec::new();
        let mut n = 0;
        for k in 0..80u64 {
            for c in 0..6u64 {
                if k < 15 {
                    n += 1;
                    events.push(ev(
                        n,
                        t0 + k * 60_000 + c,
                        &format!("u{c}"),
                        &format!("p{c}-{k}"),
                        "read",
                    ));
                }
            }
            n += 1;
            events.push(ev(
                n,
                t0 + k * 60_000 + 9,
                "spiker",
                &format!("q{k}"),
                "read",
            ));
        }
        for chunk in [1000, 97, 40, 7] {
            let mut history = BTreeMap::new();
            let mut found = Vec::new();
            for part in events.chunks(chunk) {
                found.extend(scan(part, Hours::default(), &mut history, &mut NoRecords));
            }
            let volume: Vec<&Finding> = found.iter().filter(|f| f.rule == "volume").collect();
            assert_eq!(volume.len(), 1, "chunks of {chunk}: {volume:?}");
            assert_eq!(volume[0].user, "spiker");
            assert_eq!(history["spiker"].values().sum::<usize>(), 80);
        }
    }

    #[test]
    fn monday_is_a_monday() {
        let h = Hours::default();
        assert!(!h.outside(MONDAY + 9 * HOUR));
        assert!(h.outside(MONDAY + 6 * HOUR));
        assert!(h.outside(MONDAY + 19 * HOUR));
        assert!(h.outside(MONDAY + 5 * 24 * HOUR + 10 * HOUR), "Saturday");
    }

    /// Thousands of ordinary accesses by 40 clinicians over four weeks, with planted
    /// violations of each rule: every planted one is found, and findings on the
    /// ordinary accesses stay under 1 %.
    #[test]
    fn planted_violations_are_found_and_ordinary_work_is_not_flagged() {
        let mut events = Vec::new();
        let mut n = 0;
        let mut push = |events: &mut Vec<AuditEvent>, t, u: &str, p: &str, i: &str| {
            n += 1;
            events.push(ev(n, t, u, p, i));
        };
        let weekdays: Vec<u64> = (0..28).filter(|d| d % 7 < 5).collect();
        for &d in &weekdays {
            for c in 0..40u64 {
                // 8 – 14 patients a day each, 3 accesses per patient, in working hours
                for k in 0..(8 + (c + d) % 7) {
                    let p = format!("p{}", (c * 31 + k * 7 + d) % 2000);
                    for j in 0..3 {
                        let t = MONDAY + d * 24 * HOUR + (8 + (k + j) % 10) * HOUR + c * 60_000;
                        push(&mut events, t, &format!("u{c}"), &p, "read");
                    }
                }
            }
        }
        let ordinary = events.len();
        // planted: two nights of after-hours access, two $everything pulls, one volume
        // spike (day 25: 120 patients)
        let planted_at = events.len();
        push(
            &mut events,
            MONDAY + 2 * 24 * HOUR + 23 * HOUR,
            "u3",
            "p77",
            "read",
        );
        push(
            &mut events,
            MONDAY + 3 * 24 * HOUR + 2 * HOUR,
            "u3",
            "p78",
            "read",
        );
        push(
            &mut events,
            MONDAY + 9 * 24 * HOUR + 22 * HOUR,
            "u7",
            "p90",
            "read",
        );
        push(
            &mut events,
            MONDAY + 10 * 24 * HOUR + 10 * HOUR,
            "u9",
            "p91",
            "everything",
        );
        push(
            &mut events,
            MONDAY + 11 * 24 * HOUR + 11 * HOUR,
            "u11",
            "p92",
            "everything",
        );
        for k in 0..120 {
            let t = MONDAY + 25 * 24 * HOUR + 9 * HOUR + k * 60_000;
            push(&mut events, t, "u5", &format!("q{k}"), "read");
        }
        // someone new, with no history, pulls 80 patients on their first day
        for k in 0..80 {
            let t = MONDAY + 15 * 24 * HOUR + 10 * HOUR + k * 60_000;
            push(&mut events, t, "newcomer", &format!("n{k}"), "read");
        }
        events.sort_by_key(|e| e.time_ms);
        let mut history = BTreeMap::new();
        let found = scan(&events, Hours::default(), &mut history, &mut NoRecords);
        let rule = |r: &str| found.iter().filter(|f| f.rule == r).collect::<Vec<_>>();
        let after = rule("after-hours");
        let users: BTreeSet<&str> = after.iter().map(|f| f.user.as_str()).collect();
        assert_eq!(users, BTreeSet::from(["u3", "u7"]), "{after:?}");
        assert_eq!(after.len(), 2, "u3's two accesses are one night: {after:?}");
        assert_eq!(rule("bulk-record").len(), 2);
        let volume = rule("volume");
        let spiking: BTreeSet<&str> = volume.iter().map(|f| f.user.as_str()).collect();
        assert_eq!(spiking, BTreeSet::from(["u5", "newcomer"]), "{volume:?}");
        // false findings: anything that is not about the planted events
        let planted: BTreeSet<String> = (planted_at + 1..=n as usize)
            .map(|i| format!("r{i}"))
            .collect();
        let false_findings = found
            .iter()
            .filter(|f| !f.evidence.iter().any(|r| planted.contains(r)))
            .count();
        assert!(
            false_findings * 100 < ordinary,
            "{false_findings} of {ordinary}"
        );
        assert_eq!(false_findings, 0);
    }
}
