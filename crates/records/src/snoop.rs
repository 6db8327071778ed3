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
//!   more) — or, without such a history, three times their peers' median that day. Judged
//!   as each event comes, on the day so far; one alert per person and day, to which every
//!   further new patient that day adds its request.
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
//! What the rules find does not depend on how the log is split into scans (the server's
//! every few minutes, an operator's by hand, a scan cut short at its most events): each scan goes
//! on from the [`State`] the last one left — the distinct patients of each person's day,
//! the findings later events add evidence to, the recent name searches — so that one scan
//! over a day and a scan every minute raise the same alerts with the same evidence.
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
    app: &'a crate::Vault,
    engine: &'a crate::engine::Engine,
    patients: HashMap<String, Option<Facts>>,
    staff: HashMap<String, Option<Facts>>,
    workforce: Option<BTreeSet<String>>,
    relations: HashMap<String, Option<Vec<Relation>>>,
}

impl<'a> EngineRecords<'a> {
    /// Over `app`'s store.
    pub fn new(app: &'a crate::Vault) -> Self {
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
        let body = self
            .engine
            .open(
                &crate::access::Access::internal(&row.rtype, phivault_auth::Interaction::Read),
                &row,
            )
            .ok()?;
        let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
        Some(Facts::of(&json))
    }

    fn load(&self, rtype: &str, id: &str) -> Option<Facts> {
        self.facts(self.engine.store().current(rtype, id).ok()?)
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
                    .store()
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
                    .store()
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
    /// Its id and its alert's, derived from what it is about; a finding that adds evidence
    /// to an earlier scan's has that one's id.
    pub id: String,
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

/// An alert's id, derived from what it is about — the rule, the person, the patient and
/// the first request of its evidence — so that two scans over the same events (the
/// server's and an operator's) write the same alert, not two.
fn alert_id(rule: &str, user: &str, patient: Option<&str>, first: &str) -> String {
    let mut buf = Vec::new();
    for part in [rule, user, patient.unwrap_or(""), first] {
        buf.extend_from_slice(&(part.len() as u64).to_be_bytes());
        buf.extend_from_slice(part.as_bytes());
    }
    phivault_crypto::sha256(&buf)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Finding {
    fn new(
        (rule, score): (&str, u8),
        user: &str,
        patient: Option<&str>,
        evidence: Vec<String>,
        at_ms: u64,
        detail: String,
    ) -> Finding {
        Finding {
            id: alert_id(
                rule,
                user,
                patient,
                evidence.first().map_or("", String::as_str),
            ),
            rule: rule.into(),
            user: user.into(),
            patient: patient.map(str::to_owned),
            evidence,
            score,
            at_ms,
            detail,
        }
    }

    /// Fold `more` — a later finding with the same id — into this one, as [`run`] folds it
    /// into the stored alert: its new requests join the evidence and its detail (counts so
    /// far) replaces this one's. Whether anything changed.
    pub fn absorb(&mut self, more: &Finding) -> bool {
        let new: Vec<String> = more
            .evidence
            .iter()
            .filter(|r| !self.evidence.contains(r))
            .cloned()
            .collect();
        if new.is_empty() {
            return false;
        }
        self.evidence.extend(new);
        self.detail.clone_from(&more.detail);
        true
    }
}

/// What the rules carry from one scan to the next, so that what they find does not depend
/// on how the log is split into scans: scanning events in one go, or in any number of
/// pieces with the state carried between them, finds the same (see the property test
/// `findings_do_not_depend_on_how_the_log_is_split_into_scans`). [`run`] keeps it in the
/// store, sealed: it names patients.
///
/// The scanner's clock is the newest event time seen. An event of a day (or, for
/// `after-hours`, a night) before the clock's previous one is *late*: it raises a finding
/// of its own instead of joining the day's, and it does not count towards a day's volume.
/// (The server stamps events when it handles them, so only a request that took a day, or
/// a clock stepped back by one, is late.) This is what lets a scan drop everything the
/// clock has left behind: no later event can reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The newest event time seen (ms since the epoch).
    pub clock_ms: u64,
    /// Per person, per day: the distinct patients they touched.
    pub days: BTreeMap<String, BTreeMap<u64, Day>>,
    /// Findings that later events of the same day (night) add evidence to.
    pub open: Vec<OpenFinding>,
    /// Per person, their name searches of the last [`NAME_SEARCH_MS`].
    pub searches: BTreeMap<String, Vec<NameSearch>>,
}

/// One person's day, for the volume rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Day {
    /// A day events may still come for (the clock's day and the one before): the distinct
    /// patients, and in order each request that first touched one of them.
    Open {
        /// The patients.
        patients: BTreeSet<String>,
        /// The requests that touched a patient for the first time that day.
        requests: Vec<String>,
    },
    /// An earlier day: its count of distinct patients (a baseline).
    Closed(usize),
}

impl Day {
    /// Distinct patients that day.
    pub fn count(&self) -> usize {
        match self {
            Day::Open { patients, .. } => patients.len(),
            Day::Closed(n) => *n,
        }
    }
}

/// A finding raised once per rule, person, patient and day (night): later events add their
/// requests to its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFinding {
    /// The rule.
    pub rule: String,
    /// The person's account id.
    pub user: String,
    /// The patient (empty when the finding is about no single patient).
    pub patient: String,
    /// The day (the night, for `after-hours`) since the epoch.
    pub period: u64,
    /// The finding's (and its alert's) id.
    pub id: String,
    /// Events noted so far.
    pub count: usize,
}

/// A name search: when, its request and the patients it found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameSearch {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// Its request.
    pub request: String,
    /// The patients it found.
    pub found: BTreeSet<String>,
}

/// (rule, person, patient, period) of a once-per-period finding.
type Key = (String, String, String, u64);

/// An open finding during a scan: its id, events so far, and where it is among this
/// scan's findings (None while this scan has added nothing to it).
struct Entry {
    id: String,
    count: usize,
    index: Option<usize>,
}

/// What a scan finds, and the findings later events may add to.
struct Sink {
    out: Vec<Finding>,
    open: BTreeMap<Key, Entry>,
}

impl Sink {
    fn push(&mut self, f: Finding) {
        self.out.push(f);
    }

    /// Note `new`'s rule for `key` once: the first event raises `new`; a later one adds
    /// `request` to its evidence (in this scan's finding, or in a finding with the same
    /// id that [`run`] folds into the stored alert). `detail` words the finding after
    /// `n` events. A late event (`key` None) raises a finding of its own.
    fn once(
        &mut self,
        key: Option<Key>,
        mut new: Finding,
        request: &str,
        detail: impl Fn(usize) -> String,
    ) {
        let Some(key) = key else {
            new.detail = detail(1);
            return self.push(new);
        };
        match self.open.get_mut(&key) {
            Some(entry) => {
                entry.count += 1;
                let text = detail(entry.count);
                match entry.index {
                    Some(i) => {
                        let f = &mut self.out[i];
                        f.evidence.push(request.to_owned());
                        f.detail = text;
                    }
                    None => {
                        entry.index = Some(self.out.len());
                        self.out.push(Finding {
                            id: entry.id.clone(),
                            evidence: vec![request.to_owned()],
                            detail: text,
                            ..new
                        });
                    }
                }
            }
            None => {
                new.detail = detail(1);
                self.open.insert(
                    key,
                    Entry {
                        id: new.id.clone(),
                        count: 1,
                        index: Some(self.out.len()),
                    },
                );
                self.out.push(new);
            }
        }
    }
}

impl Hours {
    /// The night an access belongs to: shifted so that one night is one key.
    fn night(&self, time_ms: u64) -> u64 {
        (time_ms + 24u64.saturating_sub(self.end) * 3_600_000) / DAY_MS
    }
}

/// The key of a once-per-`period` finding, or None when the event is late (its period is
/// before the one before the clock's).
fn key_of(rule: &str, user: &str, patient: &str, period: u64, current: u64) -> Option<Key> {
    (period + 1 >= current).then(|| (rule.to_owned(), user.to_owned(), patient.to_owned(), period))
}

/// Run the rules over `events` (in log order) and return what they find. `state` is what
/// earlier scans carried over (see [`State`]); it is updated in place, so a scheduled scan
/// goes on from where the last one stopped and finds what one scan over all the events
/// would. A finding whose id an earlier scan's finding had adds to it ([`Finding::absorb`]).
pub fn scan(
    events: &[AuditEvent],
    hours: Hours,
    state: &mut State,
    records: &mut dyn Records,
) -> Vec<Finding> {
    let mut sink = Sink {
        out: Vec::new(),
        open: std::mem::take(&mut state.open)
            .into_iter()
            .map(|o| {
                (
                    (o.rule, o.user, o.patient, o.period),
                    Entry {
                        id: o.id,
                        count: o.count,
                        index: None,
                    },
                )
            })
            .collect(),
    };
    for e in events {
        state.clock_ms = state.clock_ms.max(e.time_ms);
        let clock = state.clock_ms;
        let today = clock / DAY_MS;
        let Some(user) = &e.user else { continue };
        if e.outcome.http_status >= 400 {
            continue;
        }
        let patients = patients_of(e);
        if patients.is_empty() {
            continue;
        }
        let day_key =
            |rule: &str, patient: &str| key_of(rule, user, patient, e.time_ms / DAY_MS, today);
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
            let list = state.searches.entry(user.clone()).or_default();
            list.retain(|s| s.at_ms + NAME_SEARCH_MS >= clock);
            list.push(NameSearch {
                at_ms: e.time_ms,
                request: e.request_id.clone(),
                found,
            });
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
                let rule = (
                    "unexplained-access",
                    50,
                    "no treatment relationship explains the access",
                );
                sink.once(
                    day_key(rule.0, p),
                    Finding::new(
                        (rule.0, rule.1),
                        user,
                        Some(p),
                        vec![e.request_id.clone()],
                        e.time_ms,
                        String::new(),
                    ),
                    &e.request_id,
                    |_| rule.2.to_owned(),
                );
                // a search within the window (by the clock, so that the searches a scan
                // drops are those no later event can follow)
                let looked_up = state.searches.get(user).and_then(|list| {
                    list.iter()
                        .rev()
                        .find(|s| s.at_ms + NAME_SEARCH_MS >= clock && s.found.contains(p))
                });
                if let Some(search) = looked_up {
                    sink.once(
                        day_key("name-search", p),
                        Finding::new(
                            ("name-search", 60),
                            user,
                            Some(p),
                            vec![search.request.clone(), e.request_id.clone()],
                            e.time_ms,
                            String::new(),
                        ),
                        &e.request_id,
                        |_| {
                            "a name search, then the chart of a patient it found, unexplained"
                                .to_owned()
                        },
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
            for (rule, score, detail) in relationship(sf.as_ref(), &pf, workforce) {
                sink.once(
                    day_key(rule, p),
                    Finding::new(
                        (rule, score),
                        user,
                        Some(p),
                        vec![e.request_id.clone()],
                        e.time_ms,
                        String::new(),
                    ),
                    &e.request_id,
                    |_| detail.to_owned(),
                );
            }
        }
        let first = patients.first().copied();
        if e.interaction == "everything" {
            sink.push(Finding::new(
                ("bulk-record", 60),
                user,
                first,
                vec![e.request_id.clone()],
                e.time_ms,
                "a whole record was pulled ($everything)".into(),
            ));
        }
        if hours.outside(e.time_ms) {
            sink.once(
                key_of(
                    "after-hours",
                    user,
                    "",
                    hours.night(e.time_ms),
                    hours.night(clock),
                ),
                Finding::new(
                    ("after-hours", 30),
                    user,
                    first,
                    vec![e.request_id.clone()],
                    e.time_ms,
                    String::new(),
                ),
                &e.request_id,
                |n| {
                    if n == 1 {
                        "1 access outside working hours".to_owned()
                    } else {
                        format!("{n} accesses outside working hours")
                    }
                },
            );
        }
        volume(state, &mut sink, e, user, &patients, today);
    }
    settle(state, sink.open, hours);
    sink.out
}

/// The volume rule for event `e` by `user`: count its patients into the day's, and when
/// the count becomes unusual, raise the day's alert (once; later new patients that day
/// add to its evidence). Judged on what the log holds so far, so that a scan every few
/// minutes raises the alert as soon as the count is unusual.
fn volume(
    state: &mut State,
    sink: &mut Sink,
    e: &AuditEvent,
    user: &str,
    patients: &BTreeSet<&str>,
    today: u64,
) {
    let day = e.time_ms / DAY_MS;
    if day + 1 < today {
        return; // late: earlier days are closed
    }
    let days = state.days.entry(user.to_owned()).or_default();
    let Day::Open {
        patients: seen,
        requests,
    } = days.entry(day).or_insert_with(|| Day::Open {
        patients: BTreeSet::new(),
        requests: Vec::new(),
    })
    else {
        return;
    };
    let before = seen.len();
    seen.extend(patients.iter().map(|p| (*p).to_owned()));
    let n = seen.len();
    if n == before {
        return;
    }
    requests.push(e.request_id.clone());
    if n <= VOLUME_FLOOR {
        return;
    }
    let evidence = requests.clone();
    // against their own baseline (three days of history or more), or, for someone without
    // one, against their peers' that day (five peers or more)
    let mut earlier: Vec<usize> = days
        .range(day.saturating_sub(BASELINE_DAYS)..day)
        .map(|(_, d)| d.count())
        .collect();
    earlier.sort_unstable();
    let own = (earlier.len() >= 3).then(|| earlier[earlier.len() / 2]);
    let mut peers: Vec<usize> = state
        .days
        .values()
        .filter_map(|d| d.get(&day).map(Day::count))
        .collect();
    peers.sort_unstable();
    let peer_median = (peers.len() >= 5).then(|| peers[peers.len() / 2]);
    let unusual = match (own, peer_median) {
        (Some(m), _) => n > 3 * m.max(1),
        (None, Some(pm)) => n > 3 * pm.max(1),
        (None, None) => false,
    };
    let key = ("volume".to_owned(), user.to_owned(), String::new(), day);
    if !unusual && !sink.open.contains_key(&key) {
        return;
    }
    let fmt = |m: Option<usize>| m.map_or("none".to_owned(), |m| m.to_string());
    let detail = format!(
        "{n} patients in a day; own median {}, peers' median {}",
        fmt(own),
        fmt(peer_median)
    );
    sink.once(
        Some(key),
        Finding::new(
            ("volume", 50),
            user,
            None,
            evidence,
            day * DAY_MS,
            String::new(),
        ),
        &e.request_id,
        |_| detail.clone(),
    );
}

/// At the end of a scan: keep the open findings the clock has not left behind, close the
/// days before yesterday (their counts stay, as baselines, for [`BASELINE_DAYS`]) and drop
/// the name searches no later event can follow.
fn settle(state: &mut State, open: BTreeMap<Key, Entry>, hours: Hours) {
    let clock = state.clock_ms;
    let today = clock / DAY_MS;
    state.open = open
        .into_iter()
        .filter(|((rule, _, _, period), _)| {
            let current = if rule == "after-hours" {
                hours.night(clock)
            } else {
                today
            };
            period + 1 >= current
        })
        .map(|((rule, user, patient, period), e)| OpenFinding {
            rule,
            user,
            patient,
            period,
            id: e.id,
            count: e.count,
        })
        .collect();
    // a day's baseline reaches BASELINE_DAYS back from an open day
    let oldest = today.saturating_sub(1 + BASELINE_DAYS);
    for days in state.days.values_mut() {
        days.retain(|d, _| *d >= oldest);
        for (d, day) in days.iter_mut() {
            if d + 1 < today
                && let Day::Open { patients, .. } = day
            {
                *day = Day::Closed(patients.len());
            }
        }
    }
    state.days.retain(|_, days| !days.is_empty());
    for list in state.searches.values_mut() {
        list.retain(|s| s.at_ms + NAME_SEARCH_MS >= clock);
    }
    state.searches.retain(|_, list| !list.is_empty());
}

/// Where the scanner keeps its position in the log.
const POSITION: &str = "snoop:position";
/// What the rules carry between scans ([`State`]), sealed.
const STATE: &str = "snoop:state";
const STATE_LABEL: &str = "phivault snooping state v2\u{0}snoop:state";
/// The per-person daily counts of earlier versions, which counted a patient again in
/// every scan of the day: not carried over (an inflated baseline hides a real spike; the
/// volume rule judges against peers until three days of exact counts are kept), emptied.
const OLD_HISTORY: &str = "snoop:history";
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
    /// Open alerts of earlier scans that got more evidence.
    #[serde(default)]
    pub extended: usize,
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

impl State {
    /// The state as stored (before sealing).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The state from [`State::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Option<State> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Run the rules over the events after the last scanned position and raise an open alert
/// for each finding. A finding with the id of an alert already raised adds its new
/// requests to that alert's evidence while the alert is open; once it is reviewed, they
/// raise an alert of their own (a review does not cover what came after it). The position
/// and the rules' [`State`] are kept in the store (the state sealed); the records the
/// relationship rules read are decrypted in memory only.
pub fn run(app: &crate::Vault, hours: Hours) -> Result<Summary, ScanError> {
    use crate::care::{Alert, raise_alert};
    let store = &**app.engine.store();
    let keys = app.engine.keys();
    let position: u64 = store
        .meta(POSITION)?
        .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0);
    let mut state = match store.meta(STATE)? {
        Some(sealed) => {
            let plain = keys.open_secret(STATE_LABEL, &sealed).map_err(|_| {
                ScanError::Integrity("the stored scan state failed its integrity check".into())
            })?;
            State::from_bytes(plain.expose()).ok_or_else(|| {
                ScanError::Integrity("the stored scan state does not decode".into())
            })?
        }
        None => State::default(),
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
    let findings = scan(&events, hours, &mut state, &mut records);
    let users = app.engine.users();
    let mut existing: HashMap<String, Alert> = crate::care::alerts(keys, store, usize::MAX)?
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    let mut summary = Summary {
        events: events.len(),
        position: last,
        ..Default::default()
    };
    'findings: for mut f in findings {
        // the alert it belongs to: its own, or, once that is reviewed, the one that follows
        // it (one per reviewed alert, so that what came after a review is reviewed again)
        while let Some(a) = existing.get_mut(&f.id) {
            f.evidence.retain(|r| !a.evidence.contains(r));
            if f.evidence.is_empty() {
                continue 'findings; // scanned before (an operator's scan beside the server's)
            }
            if a.status == "open" {
                a.evidence.append(&mut f.evidence);
                a.reason.clone_from(&f.detail);
                raise_alert(keys, store, a)?;
                summary.extended += 1;
                continue 'findings;
            }
            f.id = alert_id(
                &f.rule,
                &f.user,
                f.patient.as_deref(),
                &format!("after the review of {}", a.id),
            );
        }
        let username = users
            .get_by_id(&f.user)
            .ok()
            .flatten()
            .map(|u| u.username.clone())
            .unwrap_or_default();
        let at_ms = i64::try_from(f.at_ms).unwrap_or(i64::MAX);
        let alert = Alert {
            id: f.id.clone(),
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
        existing.insert(alert.id.clone(), alert.clone());
        summary.raised.push(alert);
    }
    let plain = zeroize::Zeroizing::new(state.to_bytes());
    let sealed = keys
        .seal_secret(STATE_LABEL, &plain)
        .map_err(|_| ScanError::Integrity("sealing the scan state failed".into()))?;
    store.set_meta(STATE, &sealed)?;
    if store.meta(OLD_HISTORY)?.is_some_and(|v| !v.is_empty()) {
        store.set_meta(OLD_HISTORY, &[])?;
    }
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

    /// Findings as [`run`] files them: one per id, later ones folded into the first.
    fn fold(found: Vec<Finding>) -> BTreeMap<String, Finding> {
        let mut out: BTreeMap<String, Finding> = BTreeMap::new();
        for f in found {
            match out.get_mut(&f.id) {
                Some(first) => {
                    first.absorb(&f);
                }
                None => {
                    out.insert(f.id.clone(), f);
                }
            }
        }
        out
    }

    /// What a proptest case generates of one event.
    #[derive(Debug, Clone)]
    enum Kind {
        Read,
        Everything,
        /// A name search finding these patients, and after how long (ms) the first of them
        /// is opened.
        NameSearch(Vec<u64>, Option<u64>),
        /// A search that is not by name, listing these patients.
        List(Vec<u64>),
        Glass,
        Failed,
    }

    fn kind() -> impl proptest::strategy::Strategy<Value = Kind> {
        use proptest::prelude::*;
        let found = proptest::collection::vec(0..40u64, 1..4);
        prop_oneof![
            12 => Just(Kind::Read),
            1 => Just(Kind::Everything),
            2 => (found.clone(), proptest::option::of(0..2 * NAME_SEARCH_MS))
                .prop_map(|(f, then)| Kind::NameSearch(f, then)),
            1 => found.prop_map(Kind::List),
            1 => Just(Kind::Glass),
            1 => Just(Kind::Failed),
        ]
    }

    /// Records for the proptest: relationships that explain some accesses (u0 always, u1
    /// for two days, u2 never; u3 – u5 are no Practitioners), and patients who are u0
    /// themselves, share u0's family name, are restricted or a coworker.
    fn proptest_records() -> Mem {
        let mut m = Mem::default();
        for i in 0..40 {
            m.patients.insert(format!("p{i}"), Facts::default());
        }
        let person = |family: &str, identity: &str| Facts {
            families: vec![family.into()],
            addresses: Vec::new(),
            identity: Some(identity.into()),
            restricted: false,
        };
        m.staff
            .insert("u0".into(), person("okafor", "okafor|ada|1980"));
        m.patients
            .insert("p5".into(), person("okafor", "okafor|ada|1980"));
        m.patients
            .insert("p6".into(), person("okafor", "okafor|ben|2001"));
        m.patients
            .insert("p8".into(), person("smith", "smith|jo|1975"));
        m.workforce.insert("smith|jo|1975".into());
        m.patients.get_mut("p7").expect("p7").restricted = true;
        let span = |p: u64, from: u64, until: u64| Relation {
            patient: format!("p{p}"),
            from_ms: from as i64,
            until_ms: until as i64,
        };
        m.relations.insert(
            "u0".into(),
            (0..10).map(|p| span(p, 0, u64::MAX / 2)).collect(),
        );
        m.relations.insert(
            "u1".into(),
            (10..20)
                .map(|p| span(p, MONDAY, MONDAY + 2 * DAY_MS))
                .collect(),
        );
        m.relations.insert("u2".into(), Vec::new());
        m
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The same events scanned in one go and in random pieces — the state carried
        /// between the pieces through its stored form, the findings filed by id as `run`
        /// files them — give the same alerts and leave the same state. Events are mostly in
        /// time order, with some out of order and some late by days.
        #[test]
        fn findings_do_not_depend_on_how_the_log_is_split_into_scans(
            raw in proptest::collection::vec(
                (0..6u64, 0..DAY_MS, 0..6u64, 0..40u64, kind()), 1..250),
            spike in proptest::option::of((0..6u64, 0..5u64, 21..60u64)),
            swaps in proptest::collection::vec((0..1000usize, 0..1000usize), 0..6),
            cuts in proptest::collection::vec(0..1000usize, 0..12),
        ) {
            let mut raw = raw;
            // some name searches are followed by opening a patient they found
            let follow: Vec<_> = raw
                .iter()
                .filter_map(|(day, at, user, _, kind)| match kind {
                    Kind::NameSearch(found, Some(then)) => {
                        Some((*day, at + then, *user, found[0], Kind::Read))
                    }
                    _ => None,
                })
                .collect();
            raw.extend(follow);
            // a spike: one person opens many distinct patients in an hour of one day
            if let Some((user, day, count)) = spike {
                for k in 0..count {
                    raw.push((day, 9 * HOUR + k * 60_000, user, 100 + k, Kind::Read));
                }
            }
            raw.sort_by_key(|r| (r.0, r.1));
            let len = raw.len();
            for (a, b) in swaps {
                raw.swap(a % len, b % len);
            }
            let events: Vec<AuditEvent> = raw
                .iter()
                .enumerate()
                .map(|(n, (day, at, user, patient, kind))| {
                    let t = MONDAY + day * DAY_MS + at;
                    let user = format!("u{user}");
                    let p = format!("p{patient}");
                    let n = n as u64;
                    let listing = |found: &[u64], query: &str| {
                        let mut e = ev(n, t, &user, "x", "search-type");
                        e.patient = None;
                        e.resource_id = None;
                        e.detail.query = vec![query.into()];
                        e.entities = found
                            .iter()
                            .map(|f| phivault_audit::Entity {
                                action: Action::R,
                                resource_type: "Patient".into(),
                                resource_id: format!("p{f}"),
                                version: None,
                                patient: Some(format!("p{f}")),
                            })
                            .collect();
                        e
                    };
                    match kind {
                        Kind::Read => ev(n, t, &user, &p, "read"),
                        Kind::Everything => ev(n, t, &user, &p, "everything"),
                        Kind::NameSearch(found, _) => listing(found, "family"),
                        Kind::List(found) => listing(found, "birthdate"),
                        Kind::Glass => {
                            let mut e = ev(n, t, &user, &p, "read");
                            e.detail.purpose = Some("ETREAT".into());
                            e
                        }
                        Kind::Failed => {
                            let mut e = ev(n, t, &user, &p, "read");
                            e.outcome = Outcome::from_http(403);
                            e
                        }
                    }
                })
                .collect();
            let hours = Hours::default();
            let mut whole = State::default();
            let at_once = fold(scan(&events, hours, &mut whole, &mut proptest_records()));
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (events.len() + 1)).collect();
            bounds.push(0);
            bounds.push(events.len());
            bounds.sort_unstable();
            bounds.dedup();
            let mut stored = State::default().to_bytes();
            let mut found = Vec::new();
            for w in bounds.windows(2) {
                let mut state = State::from_bytes(&stored).expect("state decodes");
                found.extend(scan(&events[w[0]..w[1]], hours, &mut state, &mut proptest_records()));
                stored = state.to_bytes();
            }
            let in_pieces = fold(found);
            proptest::prop_assert_eq!(&at_once, &in_pieces);
            proptest::prop_assert_eq!(&whole, &State::from_bytes(&stored).expect("state"));
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
        let found = scan(&events, Hours::default(), &mut State::default(), &mut m);
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
        let found = scan(&events, Hours::default(), &mut State::default(), &mut m);
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
            let mut state = State::default();
            let mut found = Vec::new();
            for part in events.chunks(chunk) {
                found.extend(scan(part, Hours::default(), &mut state, &mut NoRecords));
            }
            let found = fold(found);
            let volume: Vec<&Finding> = found.values().filter(|f| f.rule == "volume").collect();
            assert_eq!(volume.len(), 1, "chunks of {chunk}: {volume:?}");
            assert_eq!(volume[0].user, "spiker");
            assert_eq!(
                volume[0].evidence.len(),
                80,
                "every new patient is evidence"
            );
            assert!(volume[0].detail.starts_with("80 patients"), "{volume:?}");
            assert_eq!(state.days["spiker"][&(t0 / DAY_MS)].count(), 80);
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
        let found = scan(
            &events,
            Hours::default(),
            &mut State::default(),
            &mut NoRecords,
        );
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
