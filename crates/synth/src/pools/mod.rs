//! Static vocabularies for the generator.
//!
//! Invariants (checked by tests): patient family names are ASCII letters and
//! at least 6 long, given names at least 5 long; family, given, practitioner,
//! street and city vocabularies share no word, so a patient-name needle never
//! matches non-PHI text produced by the generator.
//!
//! One module per kind of vocabulary: [`names`] (patients and practitioners),
//! [`places`] (streets and cities), [`clinical`] (code tables for conditions,
//! medications, observations, encounters and payers) and [`notes`] (words of
//! the free-text sentence in clinical notes). Everything is re-exported here.

mod clinical;
mod names;
mod notes;
mod places;

pub(crate) use clinical::{CONDITIONS, ENCOUNTER_TYPES, MEDS, OBSERVATIONS, PAYERS, unit_label};
pub(crate) use names::{FAMILY, GIVEN_FEMALE, GIVEN_MALE, PRACTITIONER_FAMILY, PRACTITIONER_GIVEN};
pub(crate) use notes::{
    NOTE_ADVERB, NOTE_ADVICE, NOTE_PLACE, NOTE_REPORT, NOTE_SUBJECT, NOTE_TIME, NOTE_VERB,
};
pub(crate) use places::{CITIES, STREET_SUFFIX, STREETS};
