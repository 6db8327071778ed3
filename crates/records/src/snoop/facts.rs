//! What the relationship rules know of people: the facts of patients, staff and the
//! workforce, and the treatment relationships that explain an access.

use super::*;

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

pub(super) fn norm(s: &str) -> String {
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
pub(super) fn relationship(
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
