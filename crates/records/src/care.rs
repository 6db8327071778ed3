//! Whose records a clinician may see (AC1, AC5): treatment relationships and
//! break-the-glass.
//!
//! A clinician's token reaches the patients their practitioner record has a treatment
//! relationship with — the patient of an Encounter the practitioner participates in, of a
//! CareTeam they are a member of, or of an Appointment they are an actor of — plus the
//! patients they opened by break-the-glass while that window lasts, plus records outside
//! any patient compartment. "The patient of" a record is the compartment its version is
//! sealed under, the same key that decides what a patient's own app sees.
//!
//! The set is worked out by search over the blind indexes (each match decrypted and
//! verified), cached per account, and dropped whenever a relationship record is written
//! or a window opens (and at least every `MAX_AGE_MS`).
//!
//! Break-the-glass: `POST /auth/break-glass` with the clinician's bearer token, the patient,
//! a stated reason and a fresh code from their authenticator opens that one patient for
//! [`WINDOW_MINUTES`]. It is audited (interaction `break-the-glass`) and writes an alert
//! record for review; the reason, which may itself hold PHI, lives only in the sealed alert.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Kind;
use phivault_auth::{LoginFailure, Reach as Grant};
use phivault_fhir::IssueCode;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::Vault;
use crate::engine::{new_id, now_ms};

/// The record types whose participants have a treatment relationship with the patient,
/// and the reference search parameter naming them.
pub const RELATIONSHIPS: [(&str, &str); 3] = [
    ("Encounter", "participant"),
    ("CareTeam", "participant"),
    ("Appointment", "actor"),
];

/// How long break-the-glass opens a patient.
pub const WINDOW_MINUTES: i64 = 60;
/// The longest a cached set is used.
const MAX_AGE_MS: i64 = 5_000;
/// Shortest and longest accepted reason.
const REASON_CHARS: std::ops::RangeInclusive<usize> = 10..=500;

const GRANTS_LABEL: &str = "phivault break-the-glass grants v1\u{0}";
const ALERT_LABEL: &str = "phivault alert v1\u{0}";
/// Metadata key prefix of alert records.
pub const ALERT_PREFIX: &str = "alert:";

fn grants_key(user: &str) -> String {
    format!("btg:{user}")
}

/// Which patients' records an access reaches (anything but "all").
#[derive(Debug, Clone)]
pub struct Reach {
    /// The patients whose compartments are reached.
    pub patients: Arc<BTreeSet<String>>,
    /// Whether records outside any patient compartment are reached too.
    pub shared: bool,
}

impl Reach {
    /// One patient's compartment only.
    pub fn patient(id: &str) -> Self {
        Reach {
            patients: Arc::new(BTreeSet::from([id.to_owned()])),
            shared: false,
        }
    }

    /// The one patient, when that is all it reaches.
    pub fn single(&self) -> Option<&str> {
        match (self.shared, self.patients.len()) {
            (false, 1) => self.patients.first().map(String::as_str),
            _ => None,
        }
    }
}

/// One break-the-glass window.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Window {
    patient: String,
    from_ms: i64,
    until_ms: i64,
}

/// An alert for review.
#[derive(Clone, Serialize, Deserialize)]
pub struct Alert {
    /// Alert id.
    pub id: String,
    /// The rule that raised it.
    pub rule: String,
    /// Account id of the person.
    pub user: String,
    /// Their username.
    pub username: String,
    /// The patient concerned.
    pub patient: String,
    /// The reason the person gave.
    pub reason: String,
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// Until when access was opened (ms since the epoch).
    pub until_ms: i64,
    /// The request that raised it (joins the audit event).
    pub request_id: String,
    /// Review state: `open`, `justified` or `violation`.
    pub status: String,
    /// Who reviewed it.
    #[serde(default)]
    pub reviewer: Option<String>,
    /// The reviewer's note.
    #[serde(default)]
    pub review_note: Option<String>,
    /// When it was reviewed (ms since the epoch).
    #[serde(default)]
    pub reviewed_ms: Option<i64>,
    /// The requests that are the evidence (rules over the audit log).
    #[serde(default)]
    pub evidence: Vec<String>,
    /// 0 – 100: how strongly it suggests snooping (rules over the audit log).
    #[serde(default)]
    pub score: u8,
}

impl Alert {
    /// The metadata key of its row: time-ordered.
    fn row_key(&self) -> String {
        format!("{ALERT_PREFIX}{:013}-{}", self.at_ms, self.id)
    }
}

/// Store an alert record (new or reviewed), sealed with its row key bound.
pub fn raise_alert(
    keys: &phivault_crypto::KeyHierarchy,
    store: &dyn phivault_store::Store,
    alert: &Alert,
) -> Result<(), AlertError> {
    let key = alert.row_key();
    let plain =
        zeroize::Zeroizing::new(serde_json::to_vec(alert).map_err(|_| AlertError::Integrity)?);
    let sealed = keys
        .seal_secret(&format!("{ALERT_LABEL}{key}"), &plain)
        .map_err(|_| AlertError::Integrity)?;
    Ok(store.set_meta(&key, &sealed)?)
}

impl std::fmt::Debug for Alert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alert")
            .field("id", &self.id)
            .field("rule", &self.rule)
            .field("status", &self.status)
            .field("reason", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// Cached reach of clinicians' accounts.
#[derive(Default)]
pub struct Care {
    /// Moves whenever a relationship record or a window is written.
    generation: AtomicU64,
    cache: parking_lot::Mutex<HashMap<String, Cached>>,
}

struct Cached {
    reach: Reach,
    /// The patients in reach only through a break-the-glass window.
    glass: BTreeSet<String>,
    generation: u64,
    until_ms: i64,
}

impl Care {
    /// Drop every cached set (a relationship changed).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a batch writing `rtypes` changes relationships.
    pub fn touches<'a>(mut rtypes: impl Iterator<Item = &'a str>) -> bool {
        rtypes.any(|t| RELATIONSHIPS.iter().any(|(r, _)| *r == t))
    }
}

impl Vault {
    /// What a grant reaches; None for everything (a back-end client's `system/` access).
    pub fn reach(&self, grant: &Grant) -> Result<Option<Reach>, Error> {
        match grant {
            Grant::Patient(p) => Ok(Some(Reach::patient(p))),
            Grant::TreatedBy { practitioner, user } => self.treated(practitioner, user).map(Some),
            _ => Ok(None),
        }
    }

    /// The patients `practitioner` (account `user`) treats or opened by break-the-glass.
    fn treated(&self, practitioner: &str, user: &str) -> Result<Reach, Error> {
        let now = now_ms();
        let generation = self.care.generation.load(Ordering::SeqCst);
        if let Some(c) = self.care.cache.lock().get(user)
            && c.generation == generation
            && c.until_ms > now
        {
            return Ok(c.reach.clone());
        }
        let mut patients = BTreeSet::new();
        for (rtype, param) in RELATIONSHIPS {
            patients.extend(crate::search::patients_referencing(
                self,
                rtype,
                param,
                "Practitioner",
                practitioner,
            )?);
        }
        let mut until_ms = now + MAX_AGE_MS;
        let mut glass = BTreeSet::new();
        for w in self.windows(user)? {
            if w.from_ms <= now && now < w.until_ms {
                if !patients.contains(&w.patient) {
                    glass.insert(w.patient.clone());
                }
                patients.insert(w.patient);
                until_ms = until_ms.min(w.until_ms);
            }
        }
        let reach = Reach {
            patients: Arc::new(patients),
            shared: true,
        };
        let mut cache = self.care.cache.lock();
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(
            user.to_owned(),
            Cached {
                reach: reach.clone(),
                glass,
                generation,
                until_ms,
            },
        );
        Ok(reach)
    }

    /// A clinician's events about a patient they reach only through a break-the-glass
    /// window get the purpose of use `ETREAT` instead of `TREAT`.
    pub fn mark_glass(&self, events: &mut [phivault_audit::AuditEvent]) {
        for e in events {
            if e.detail.purpose.as_deref() == Some("TREAT")
                && let (Some(user), Some(patient)) = (&e.user, &e.patient)
                && self.by_glass(user, patient)
            {
                e.detail.purpose = Some("ETREAT".into());
            }
        }
    }

    fn by_glass(&self, user: &str, patient: &str) -> bool {
        let now = now_ms();
        let generation = self.care.generation.load(Ordering::SeqCst);
        if let Some(c) = self.care.cache.lock().get(user)
            && c.generation == generation
            && c.until_ms > now
        {
            return c.glass.contains(patient);
        }
        self.windows(user).is_ok_and(|ws| {
            ws.iter()
                .any(|w| w.patient == patient && w.from_ms <= now && now < w.until_ms)
        })
    }

    fn windows(&self, user: &str) -> Result<Vec<Window>, Error> {
        let key = grants_key(user);
        let Some(sealed) = self.engine.store().meta(&key).map_err(Error::from_store)? else {
            return Ok(Vec::new());
        };
        let plain = self
            .engine
            .open_secret(&format!("{GRANTS_LABEL}{key}"), &sealed)
            .ok_or_else(Error::integrity)?;
        serde_json::from_slice(&plain).map_err(|_| Error::integrity())
    }

    fn put_sealed<T: Serialize>(&self, label: &str, key: &str, v: &T) -> Result<(), Error> {
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(v).map_err(|_| Error::internal())?);
        let sealed = self
            .engine
            .seal_secret(&format!("{label}{key}"), &plain)
            .ok_or_else(Error::internal)?;
        self.engine
            .store()
            .set_meta(key, &sealed)
            .map_err(Error::from_store)
    }
}

/// The alert records, oldest first (at most `limit`); a record that does not open is an
/// integrity error.
pub fn alerts(
    keys: &phivault_crypto::KeyHierarchy,
    store: &dyn phivault_store::Store,
    limit: usize,
) -> Result<Vec<Alert>, AlertError> {
    Ok(alert_rows(keys, store, limit)?
        .into_iter()
        .map(|(_, a)| a)
        .collect())
}

fn alert_rows(
    keys: &phivault_crypto::KeyHierarchy,
    store: &dyn phivault_store::Store,
    limit: usize,
) -> Result<Vec<(String, Alert)>, AlertError> {
    store
        .meta_prefix(ALERT_PREFIX, limit)?
        .into_iter()
        .map(|(k, sealed)| {
            let plain = keys
                .open_secret(&format!("{ALERT_LABEL}{k}"), &sealed)
                .map_err(|_| AlertError::Integrity)?;
            let a: Alert =
                serde_json::from_slice(plain.expose()).map_err(|_| AlertError::Integrity)?;
            Ok((k, a))
        })
        .collect()
}

/// Record the review of alert `id`: `justified` or `violation`, by `reviewer`, with a
/// note (sealed with the alert). An alert is reviewed once.
pub fn review_alert(
    keys: &phivault_crypto::KeyHierarchy,
    store: &dyn phivault_store::Store,
    id: &str,
    status: &str,
    reviewer: &str,
    note: &str,
    now_ms: i64,
) -> Result<Alert, AlertError> {
    if !matches!(status, "justified" | "violation") {
        return Err(AlertError::Review("the status is justified or violation"));
    }
    if reviewer.trim().is_empty() {
        return Err(AlertError::Review("name the reviewer"));
    }
    let (key, mut alert) = alert_rows(keys, store, usize::MAX)?
        .into_iter()
        .find(|(_, a)| a.id == id)
        .ok_or(AlertError::Review("no such alert"))?;
    if alert.status != "open" {
        return Err(AlertError::Review("the alert was reviewed already"));
    }
    alert.status = status.to_owned();
    alert.reviewer = Some(reviewer.trim().to_owned());
    alert.review_note = Some(note.to_owned());
    alert.reviewed_ms = Some(now_ms);
    if key != alert.row_key() {
        return Err(AlertError::Integrity);
    }
    raise_alert(keys, store, &alert)?;
    Ok(alert)
}

/// Why alerts cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] phivault_store::StoreError),
    /// A stored alert does not open: tampered, moved or from another key.
    #[error("a stored alert failed its integrity check")]
    Integrity,
    /// A review that cannot be recorded.
    #[error("{0}")]
    Review(&'static str),
}

pub fn forbidden(msg: &str) -> Error {
    Error::new(Kind::Forbidden, IssueCode::Forbidden, msg)
}

impl Vault {
    /// The alert records, oldest first (at most `limit`).
    pub fn alerts(&self, limit: usize) -> Result<Vec<Alert>, AlertError> {
        alerts(self.engine.keys(), &**self.engine.store(), limit)
    }

    /// Record the review of alert `id` (see [`review_alert`]).
    pub fn review_alert(
        &self,
        id: &str,
        status: &str,
        reviewer: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<Alert, AlertError> {
        review_alert(
            self.engine.keys(),
            &**self.engine.store(),
            id,
            status,
            reviewer,
            note,
            now_ms,
        )
    }
}

/// A break-the-glass window just opened.
pub struct Opened {
    /// When it closes (ms since epoch).
    pub until_ms: i64,
    /// The alert raised for review.
    pub alert: String,
}

impl Vault {
    /// Open `patient` to clinician account `user` for [`WINDOW_MINUTES`]: the reason
    /// stated, a fresh authenticator code under the account's replay guard and lockout;
    /// the alert is written before the window.
    pub fn open_glass(
        &self,
        user: &str,
        patient: &str,
        reason: &str,
        otp: &str,
        request_id: &str,
    ) -> Result<Opened, Error> {
        let reason = reason.trim();
        if !REASON_CHARS.contains(&reason.chars().count()) {
            return Err(Error::bad_request(
                "state the reason for access (10 to 500 characters)",
            ));
        }
        let exists = self
            .engine
            .store()
            .current("Patient", patient)
            .map_err(Error::from_store)?
            .is_some_and(|r| !r.deleted);
        if !exists {
            return Err(Error::not_found("resource not found"));
        }
        // the second factor again, under the account's replay guard and lockout
        let users = self.engine.users();
        let now = now_ms();
        let mut rec = users
            .get_by_id(user)
            .ok()
            .flatten()
            .ok_or_else(|| forbidden("break-the-glass is for clinicians"))?;
        let _guard = self.account_stripe(&rec.username).lock();
        let checked = rec.confirm_second_factor(otp, (now / 1000) as u64);
        users.put(&rec).map_err(|_| Error::unavailable())?;
        match checked {
            Ok(()) => {}
            Err(LoginFailure::Locked(_)) => return Err(forbidden("the account is locked")),
            Err(_) => return Err(forbidden("the authenticator code was not accepted")),
        }
        let until_ms = now + WINDOW_MINUTES * 60_000;
        let mut windows: Vec<Window> = self
            .windows(user)?
            .into_iter()
            .filter(|w| w.until_ms > now)
            .collect();
        windows.push(Window {
            patient: patient.to_owned(),
            from_ms: now,
            until_ms,
        });
        let alert = Alert {
            id: new_id(),
            rule: "break-the-glass".into(),
            user: user.to_owned(),
            username: rec.username.clone(),
            patient: patient.to_owned(),
            reason: reason.to_owned(),
            at_ms: now,
            until_ms,
            request_id: request_id.to_owned(),
            status: "open".into(),
            reviewer: None,
            review_note: None,
            reviewed_ms: None,
            evidence: vec![request_id.to_owned()],
            score: 40,
        };
        // the alert first: a window never opens without its alert
        self.put_sealed(ALERT_LABEL, &alert.row_key(), &alert)?;
        self.put_sealed(GRANTS_LABEL, &grants_key(user), &windows)?;
        self.care.invalidate();
        Ok(Opened {
            until_ms,
            alert: alert.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_names_its_one_patient_only_when_that_is_all() {
        let one = Reach::patient("p1");
        assert_eq!(one.single(), Some("p1"));
        let many = Reach {
            patients: Arc::new(BTreeSet::from(["a".to_owned(), "b".to_owned()])),
            shared: true,
        };
        assert_eq!(many.single(), None);
    }

    #[test]
    fn relationship_types_are_known_and_searchable_by_reference() {
        for (rtype, param) in RELATIONSHIPS {
            let def = phivault_fhir::search::search_param(rtype, param).expect(param);
            assert_eq!(def.ptype, phivault_fhir::search::ParamType::Reference);
            assert!(Care::touches([rtype].into_iter()));
        }
        assert!(!Care::touches(["Observation", "Patient"].into_iter()));
    }

    #[test]
    fn alert_debug_hides_the_reason() {
        let a = Alert {
            id: "x".into(),
            rule: "break-the-glass".into(),
            user: "u".into(),
            username: "dr.who".into(),
            patient: "p".into(),
            reason: "unconscious in the emergency room".into(),
            at_ms: 0,
            until_ms: 0,
            request_id: "r".into(),
            status: "open".into(),
            reviewer: None,
            review_note: None,
            reviewed_ms: None,
            evidence: Vec::new(),
            score: 0,
        };
        assert!(!format!("{a:?}").contains("unconscious"));
    }
}
