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
        writes: Vec::new(),
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

/// A request against share link `link`: a wrong passcode, or a fetch from `source`.
fn link_ev(n: u64, t: u64, link: &str, wrong: bool, source: &str) -> AuditEvent {
    let mut e = ev(
        n,
        t,
        "",
        "p1",
        if n.is_multiple_of(2) {
            "shl-manifest"
        } else {
            "shl-file"
        },
    );
    e.user = None;
    e.client_id = None;
    e.resource_type = None;
    e.resource_id = Some(link.into());
    e.source = source.into();
    if wrong {
        e.outcome = Outcome::from_http(401);
        e.detail.refused_because("passcode-wrong");
    }
    e
}

#[test]
fn share_link_rules_fire_on_guessing_and_passing_around_and_not_on_ordinary_use() {
    let t = MONDAY + 10 * HOUR;
    let mut events = Vec::new();
    // ordinary: one typo, three fetches from one address, on link a
    events.push(link_ev(0, t, "a", true, "10.0.0.1"));
    for i in 1..4 {
        events.push(link_ev(i, t + i * 1000, "a", false, "10.0.0.1"));
    }
    // guessing on link b: six wrong passcodes
    for i in 10..16 {
        events.push(link_ev(i, t + i * 1000, "b", true, "10.0.0.9"));
    }
    // guessing at link d past its cap of three: three wrong, then two at the locked link
    for i in 30..33 {
        events.push(link_ev(i, t + i * 1000, "d", true, "10.0.0.8"));
    }
    for i in 33..35 {
        let mut e = link_ev(i, t + i * 1000, "d", false, "10.0.0.8");
        e.outcome = Outcome::from_http(404);
        e.detail.refused_because("link-locked");
        events.push(e);
    }
    // passed around: link c fetched from five addresses
    for i in 20..25 {
        events.push(link_ev(i, t + i * 1000, "c", false, &format!("10.0.1.{i}")));
    }
    let all = fold(scan(
        &events,
        Hours::default(),
        &mut State::default(),
        &mut Mem::default(),
    ));
    let rules: Vec<(&str, &str, usize)> = all
        .values()
        .map(|f| (f.rule.as_str(), f.user.as_str(), f.evidence.len()))
        .collect();
    assert_eq!(rules.len(), 3, "{rules:?}");
    assert!(
        rules.contains(&("share-link-passcode", "link:d", 5)),
        "{rules:?}"
    );
    assert!(
        rules.contains(&("share-link-passcode", "link:b", 6)),
        "{rules:?}"
    );
    assert!(
        rules.contains(&("share-link-addresses", "link:c", 5)),
        "{rules:?}"
    );
    // the same, scanned in pieces with the state carried
    let mut state = State::default();
    let mut pieces = Vec::new();
    for chunk in events.chunks(3) {
        pieces.extend(scan(
            chunk,
            Hours::default(),
            &mut state,
            &mut Mem::default(),
        ));
    }
    assert_eq!(fold(pieces), all);
}
