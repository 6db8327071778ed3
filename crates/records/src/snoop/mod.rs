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
//! * `share-link-passcode` / `share-link-addresses` — a share link guessed at, or
//!   passed around (`links.rs`).
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

mod facts;
pub mod links;
mod run;
mod scan;
#[cfg(test)]
mod tests;

pub use facts::*;
pub use run::*;
pub use scan::*;

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
