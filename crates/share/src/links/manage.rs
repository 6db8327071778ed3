//! The creator's (and the patient's) view of their links: list, revoke; and the sweep
//! that drops the files of links that have ended (their area key removed from the record
//! first, then the files unlinked).

use std::sync::Arc;

use phivault_auth::Authenticated;
use phivault_records::Vault;
use serde_json::{Value, json};

use super::fetch::LOCATION_LIFETIME_MS;
use super::record::{self, Ended, LinkRecord};
use crate::Error;
use crate::area::Area;

/// How long after its last counted attempt a link at its cap is swept as locked.
pub const LOCK_SETTLE_MS: u64 = 10_000;

/// Whether `auth` manages `rec`: it made it (the same client, for the same person), or it
/// is the patient's own sign-in (`fhirUser` is the patient).
pub fn manages(auth: &Authenticated, rec: &LinkRecord) -> bool {
    let user = auth.person().map(|p| p.user_id.as_str());
    let made = rec.creator.client == auth.client_id() && rec.creator.user.as_deref() == user;
    let own = auth
        .person()
        .and_then(|p| p.fhir_user.as_deref())
        .is_some_and(|f| f.strip_prefix("Patient/") == Some(rec.patient.as_str()));
    made || own
}

/// A link as listed (never the URL or key: the server has neither); `erased`: its patient
/// was erased.
pub fn listed(rec: &LinkRecord, now_ms: u64, erased: bool) -> Value {
    let status = match rec.ended(now_ms) {
        _ if erased => "erased",
        None => "active",
        Some(Ended::Revoked) => "revoked",
        Some(Ended::Expired) => "expired",
        Some(Ended::Used) => "used",
        Some(Ended::Locked) => "locked",
    };
    let mut v = json!({
        "id": rec.id,
        "patient": format!("Patient/{}", rec.patient),
        "status": status,
        "flag": rec.flag(),
        "singleUse": rec.terms.single_use,
        "created": phivault_records::engine::instant(rec.created_ms as i64),
        "expires": phivault_records::engine::instant(rec.terms.expires_ms as i64),
        "uses": rec.uses,
    });
    if let Some(l) = &rec.label {
        v["label"] = json!(l);
    }
    if rec.passcode.is_some() {
        v["passcodeAttemptsLeft"] = json!(rec.terms.cap.saturating_sub(rec.attempts));
    }
    v
}

/// The links `auth` manages, newest first.
pub fn list(vault: &Vault, auth: &Authenticated) -> Result<Vec<Value>, Error> {
    let now = crate::now_ms();
    let mut mine: Vec<LinkRecord> = record::all(vault)?
        .into_iter()
        .filter(|r| manages(auth, r))
        .collect();
    mine.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
    mine.iter()
        .map(|r| Ok(listed(r, now, record::patient_erased(vault, r)?)))
        .collect()
}

/// Revoke link `id` for `auth`: the record keeps no area key, the files are removed.
/// The link's patient, for the audit event.
pub fn revoke(
    vault: &Arc<Vault>,
    area: &Area,
    auth: &Authenticated,
    id: &str,
) -> Result<String, Error> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::not_found("no such link"));
    }
    let rec = record::load(vault, id)?.ok_or_else(|| Error::not_found("no such link"))?;
    if !manages(auth, &rec) {
        // whether someone else's link exists is not the caller's to learn
        return Err(Error::not_found("no such link"));
    }
    drop_files(vault, area, id, true)?;
    Ok(rec.patient.clone())
}

/// Take link `id`'s area key from its record (revoking it too when `revoke`), then remove
/// its files — every one, and any a writer left half-written.
fn drop_files(vault: &Arc<Vault>, area: &Area, id: &str, revoke: bool) -> Result<(), Error> {
    record::update(vault, id, move |cur| {
        Ok((
            cur.map(|mut r| {
                r.revoked |= revoke;
                r.area_key = None;
                r
            }),
            (),
        ))
    })?;
    if let Err(e) = area.remove_prefix(&crate::area::Owner::LINK.files_of(id)) {
        tracing::warn!(error = %e, "a share link's files could not be removed");
    }
    Ok(())
}

/// Drop the files of every link that has ended or whose patient was erased (a single-use
/// link's once each file was fetched or its locations expired; a locked one's once no
/// attempt is still being checked). The number of links swept.
pub fn sweep(vault: &Arc<Vault>, area: &Area) -> Result<usize, Error> {
    let now = crate::now_ms();
    let mut n = 0;
    for rec in record::all(vault)? {
        if rec.area_key.is_none() {
            continue;
        }
        let done = match rec.ended(now) {
            None => record::patient_erased(vault, &rec)?,
            // a single use's files go once each was fetched, or when its locations expire
            Some(Ended::Used) => {
                rec.fetched.len() >= rec.files.len()
                    || now >= rec.last_use_ms + LOCATION_LIFETIME_MS
            }
            // (an attempt counted is given back when the passcode was right: at the cap,
            // the link is locked once no attempt is in flight)
            Some(Ended::Locked) => rec.pending == 0 || now >= rec.last_attempt_ms + LOCK_SETTLE_MS,
            Some(_) => true,
        };
        if !done {
            continue;
        }
        drop_files(vault, area, &rec.id, false)?;
        n += 1;
    }
    Ok(n)
}
