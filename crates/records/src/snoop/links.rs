//! Rules over share links (SMART Health Links, issue 21): a link's holder is no person, so
//! these watch the link, not a user (the finding's `user` is `link:<id>`).
//!
//! * `share-link-passcode` — [`PASSCODE_FAILURES`] or more wrong passcodes (or requests
//!   at the link once they locked it) on one link in a day: someone is guessing.
//! * `share-link-addresses` — one link fetched from [`ADDRESSES`] or more network addresses
//!   in a day: a link meant for one recipient is passed around.
//!
//! Each fires once per link and day; later events of that day add evidence. The counts
//! are carried in [`State::links`] (keyed `day:link`) from scan to scan (the days before yesterday dropped),
//! so findings do not depend on how the log is split into scans.

use super::scan::{Key, Sink, key_of};
use super::*;

/// Wrong passcodes in a day on one link that raise `share-link-passcode`.
pub const PASSCODE_FAILURES: u32 = 5;
/// Distinct addresses in a day that raise `share-link-addresses`.
pub const ADDRESSES: usize = 4;

/// One link's day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkDay {
    /// Wrong passcodes.
    pub failures: u32,
    /// Addresses it was fetched from.
    pub sources: BTreeSet<String>,
    /// The requests that count (the first from each address, each wrong passcode), at
    /// most [`EVIDENCE`]: a finding's evidence starts with them.
    #[serde(default)]
    pub requests: Vec<String>,
}

/// Most requests a link's day keeps as evidence before a finding is raised.
pub const EVIDENCE: usize = 32;

/// Whether `e` is a request against a share link, and its link id.
fn link_of(e: &AuditEvent) -> Option<&str> {
    matches!(
        e.interaction.as_str(),
        "shl-manifest" | "shl-file" | "shl-direct"
    )
    .then_some(e.resource_id.as_deref())
    .flatten()
}

/// Note `e` (any event; only link requests count) and raise what it crosses.
pub(super) fn note(
    e: &AuditEvent,
    today: u64,
    days: &mut BTreeMap<String, LinkDay>,
    sink: &mut Sink,
) {
    let Some(link) = link_of(e) else {
        return;
    };
    let day = e.time_ms / DAY_MS;
    let who = format!("link:{link}");
    let key = |rule: &str| -> Option<Key> { key_of(rule, &who, "", day, today) };
    let d = days.entry(format!("{day}:{link}")).or_default();
    let patient = e.patient.as_deref();
    let keep = |d: &mut LinkDay| {
        if d.requests.len() < EVIDENCE {
            d.requests.push(e.request_id.clone());
        }
    };
    // a wrong passcode, or any request at a link its wrong passcodes locked
    if matches!(
        e.detail.reason.as_deref(),
        Some("passcode-wrong" | "link-locked" | "passcode-busy")
    ) {
        d.failures += 1;
        keep(d);
        if d.failures >= PASSCODE_FAILURES {
            let n = d.failures;
            sink.note_once(
                key("share-link-passcode"),
                ("share-link-passcode", 70),
                (&who, patient),
                e,
                d.requests.clone(),
                move |_| format!("{n} wrong passcodes on one share link in a day"),
            );
        }
    } else if e.outcome.http_status < 400 {
        // (addresses counted up to a bound: rotating addresses cannot grow the state)
        if d.sources.len() < 4 * ADDRESSES && d.sources.insert(e.source.clone()) {
            keep(d);
        }
        if d.sources.len() >= ADDRESSES {
            let n = d.sources.len();
            sink.note_once(
                key("share-link-addresses"),
                ("share-link-addresses", 50),
                (&who, patient),
                e,
                d.requests.clone(),
                move |_| format!("one share link fetched from {n} addresses in a day"),
            );
        }
    }
}

/// Drop the days no later event can reach (before yesterday).
pub(super) fn settle(days: &mut BTreeMap<String, LinkDay>, today: u64) {
    days.retain(|k, _| {
        k.split(':')
            .next()
            .and_then(|d| d.parse::<u64>().ok())
            .is_some_and(|d| d + 1 >= today)
    });
}
