//! One scan over a run of events: the rules, the state carried from scan to scan, and the
//! findings they raise.

use super::*;

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

pub(super) fn patients_of(e: &AuditEvent) -> BTreeSet<&str> {
    e.patient
        .iter()
        .map(String::as_str)
        .chain(e.entities.iter().filter_map(|x| x.patient.as_deref()))
        .collect()
}

/// An alert's id, derived from what it is about — the rule, the person, the patient and
/// the first request of its evidence — so that two scans over the same events (the
/// server's and an operator's) write the same alert, not two.
pub(super) fn alert_id(rule: &str, user: &str, patient: Option<&str>, first: &str) -> String {
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
    /// Per share link and day: its wrong passcodes and addresses (`links.rs`).
    #[serde(default)]
    pub links: BTreeMap<String, super::links::LinkDay>,
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
pub(super) type Key = (String, String, String, u64);

/// An open finding during a scan: its id, events so far, and where it is among this
/// scan's findings (None while this scan has added nothing to it).
pub(super) struct Entry {
    id: String,
    count: usize,
    index: Option<usize>,
}

/// What a scan finds, and the findings later events may add to.
pub(super) struct Sink {
    out: Vec<Finding>,
    open: BTreeMap<Key, Entry>,
}

impl Sink {
    fn push(&mut self, f: Finding) {
        self.out.push(f);
    }

    /// [`Sink::once`] for a finding `(rule, score)` about `user` (and `patient`) raised by
    /// event `e`, its evidence starting with `evidence` when new.
    pub(super) fn note_once(
        &mut self,
        key: Option<Key>,
        (rule, score): (&str, u8),
        (user, patient): (&str, Option<&str>),
        e: &AuditEvent,
        evidence: Vec<String>,
        detail: impl Fn(usize) -> String,
    ) {
        let new = Finding::new(
            (rule, score),
            user,
            patient,
            evidence,
            e.time_ms,
            String::new(),
        );
        self.once(key, new, &e.request_id, detail);
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
pub(super) fn key_of(
    rule: &str,
    user: &str,
    patient: &str,
    period: u64,
    current: u64,
) -> Option<Key> {
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
        super::links::note(e, today, &mut state.links, &mut sink);
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
pub(super) fn volume(
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
pub(super) fn settle(state: &mut State, open: BTreeMap<Key, Entry>, hours: Hours) {
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
    super::links::settle(&mut state.links, today);
}
