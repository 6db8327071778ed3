//! What a link's holder can do: ask for the manifest (`POST`, with `recipient` and the
//! passcode when the link has one), fetch a file from a `location` the manifest gave (which
//! lives at most an hour), or — a `U` link — `GET` the one file directly. Every answer
//! names the link and its patient for the audit event, refusals included.
//!
//! The passcode cap holds under any number of parallel guesses: an attempt is counted in
//! the link's row (atomically, `record::update`) *before* the passcode is checked, and
//! given back only when it was right — so at most `cap` guesses are ever checked.

use std::sync::Arc;

use phivault_records::Vault;
use serde_json::{Value, json};

use super::record::{self, Ended, LinkRecord};
use crate::area::Area;
use crate::{Error, b64, unb64};

/// How long a manifest's `location` URLs live (the spec's most: one hour).
pub const LOCATION_LIFETIME_MS: u64 = 3_600_000;
/// How often a long-term link's manifest may be polled.
pub const POLL_INTERVAL_MS: u64 = 5_000;
/// Largest file embedded in a manifest (larger ones are fetched from their location).
pub const MAX_EMBEDDED: u64 = 4 << 20;
/// Longest `recipient` text kept.
pub const MAX_RECIPIENT: usize = 200;
/// Label of sealed location tickets.
const TICKET_LABEL: &str = "phivault share link location v1";

/// A manifest request.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestRequest {
    /// Who is asking (shown to the patient in their access view).
    pub recipient: Option<String>,
    /// The passcode, for a `P` link.
    pub passcode: Option<String>,
    /// Files at most this long come embedded in the manifest.
    pub embedded_length_max: Option<u64>,
}

/// What a request against a link was about and how it ended, for its audit event.
#[derive(Debug, Default)]
pub struct Seen {
    /// The link's id and patient, once known.
    pub link: Option<(String, String)>,
    /// Why it was refused (a fixed code).
    pub reason: Option<&'static str>,
    /// The recipient the manifest request named (a file's ticket carries it).
    pub recipient: Option<String>,
}

/// A manifest as answered.
#[derive(Debug)]
pub struct Manifest {
    /// The JSON body.
    pub body: Value,
    /// `Retry-After` for a long-term link's next poll (seconds).
    pub retry_after_s: Option<u64>,
}

/// The recipient text, checked: printable — no control characters and no invisible or
/// direction-changing format characters (what the patient reads is what was sent).
pub fn recipient(r: Option<&str>) -> Result<String, Error> {
    match r.map(str::trim) {
        Some(t) if !t.is_empty() && t.chars().count() <= MAX_RECIPIENT && crate::printable(t) => {
            Ok(t.to_owned())
        }
        _ => Err(Error::bad_request(
            "recipient is required: 1 to 200 printable characters",
        )),
    }
}

/// The link whose manifest URL carries `secret` (43 base64url characters).
fn find(vault: &Vault, secret: &str, seen: &mut Seen) -> Result<LinkRecord, Error> {
    let bytes = unb64(secret).filter(|b| b.len() == 32 && secret.len() == 43);
    let Some(bytes) = bytes else {
        seen.reason = Some("link-unknown");
        return Err(Error::not_found("no such link"));
    };
    let id = record::id_of(vault, &bytes);
    let Some(rec) = record::load(vault, &id)? else {
        seen.reason = Some("link-unknown");
        return Err(Error::not_found("no such link"));
    };
    seen.link = Some((rec.id.clone(), rec.patient.clone()));
    refuse_erased(vault, &rec, seen)?;
    Ok(rec)
}

/// An erased patient's links answer nothing (their files go at the next sweep).
fn refuse_erased(vault: &Vault, rec: &LinkRecord, seen: &mut Seen) -> Result<(), Error> {
    if super::record::patient_erased(vault, rec)? {
        seen.reason = Some("patient-erased");
        return Err(Error::Records(phivault_records::Error::erased()));
    }
    Ok(())
}

fn ended(seen: &mut Seen, e: Ended) -> Error {
    seen.reason = Some(e.code());
    Error::not_found("this link is no longer active")
}

/// Why a link refuses a manifest request now: ended (404), or — at its cap while
/// attempts counted a moment ago are still being checked (a right one is given back) —
/// busy for a second (429).
fn refusal(rec: &LinkRecord, now: u64, seen: &mut Seen) -> Option<Error> {
    match rec.ended(now)? {
        Ended::Locked
            if rec.pending > 0 && now < rec.last_attempt_ms + super::manage::LOCK_SETTLE_MS =>
        {
            seen.reason = Some("passcode-busy");
            Some(Error::TooSoon {
                retry_after_s: 1,
                why: "passcodes given for this link are being checked",
            })
        }
        e => Some(ended(seen, e)),
    }
}

/// `POST` the manifest URL.
pub fn manifest(
    vault: &Arc<Vault>,
    area: &Area,
    secret: &str,
    req: &ManifestRequest,
    origin: &str,
    seen: &mut Seen,
) -> Result<Manifest, Error> {
    let now = crate::now_ms();
    let rec = find(vault, secret, seen)?;
    if let Some(e) = refusal(&rec, now, seen) {
        return Err(e);
    }
    let who = recipient(req.recipient.as_deref())
        .inspect_err(|_| seen.reason = Some("recipient-missing"))?;
    if req
        .passcode
        .as_ref()
        .is_some_and(|p| p.chars().count() > super::create::MAX_PASSCODE)
    {
        seen.reason = Some("passcode-too-long");
        return Err(Error::bad_request("a passcode has at most 128 characters"));
    }
    if rec.terms.long_term && now < rec.last_use_ms + POLL_INTERVAL_MS {
        seen.reason = Some("polled-too-soon");
        return Err(Error::TooSoon {
            retry_after_s: (rec.last_use_ms + POLL_INTERVAL_MS - now).div_ceil(1000),
            why: "this long-term link was polled too soon",
        });
    }
    let reserved = match &rec.passcode {
        None => false,
        Some(phc) => {
            check_passcode(vault, &rec.id, phc, req.passcode.as_deref(), seen)?;
            true
        }
    };
    let rec = take_use(vault, &rec.id, (reserved, None), now, seen)?;
    let mut files = Vec::with_capacity(rec.files.len());
    for (n, f) in rec.files.iter().enumerate() {
        let n = n as u32;
        let mut entry = json!({
            "contentType": f.content_type,
            "lastUpdated": phivault_records::engine::instant(rec.updated_ms.max(rec.created_ms) as i64),
        });
        if req
            .embedded_length_max
            .is_some_and(|m| f.len <= m.min(MAX_EMBEDDED))
        {
            let jwe = read_file(area, &rec, n, seen)?;
            entry["embedded"] = json!(String::from_utf8(jwe).map_err(|_| Error::integrity())?);
        } else {
            let exp = (now + LOCATION_LIFETIME_MS).min(rec.terms.expires_ms);
            let t = ticket(vault, (&rec.id, n), exp, rec.uses, &who)?;
            entry["location"] = json!(format!("{origin}/shl/f/{t}"));
        }
        files.push(entry);
    }
    let status = if rec.terms.long_term {
        "can-change"
    } else {
        "finalized"
    };
    Ok(Manifest {
        body: json!({"status": status, "files": files}),
        retry_after_s: rec.terms.long_term.then(|| POLL_INTERVAL_MS.div_ceil(1000)),
    })
}

/// Count one attempt, then check the passcode; a right one's attempt is given back by
/// [`take_use`]. A missing passcode is refused without counting.
fn check_passcode(
    vault: &Arc<Vault>,
    id: &str,
    phc: &str,
    given: Option<&str>,
    seen: &mut Seen,
) -> Result<(), Error> {
    let Some(given) = given else {
        seen.reason = Some("passcode-missing");
        let rec = record::load(vault, id)?.ok_or_else(|| Error::not_found("no such link"))?;
        return Err(Error::Passcode {
            remaining: rec.terms.cap.saturating_sub(rec.attempts),
        });
    };
    let now = crate::now_ms();
    let left = record::update(vault, id, move |cur| {
        let Some(mut rec) = cur else {
            return Ok((None, Err(None)));
        };
        if rec.ended(now).is_some() {
            return Ok((None, Err(Some(Box::new(rec)))));
        }
        rec.attempts += 1;
        rec.pending += 1;
        rec.last_attempt_ms = now;
        let left = rec.terms.cap - rec.attempts;
        Ok((Some(rec), Ok(left)))
    })?;
    let left = match left {
        Ok(n) => n,
        Err(Some(rec)) => {
            return Err(refusal(&rec, now, seen).unwrap_or_else(|| ended(seen, Ended::Revoked)));
        }
        Err(None) => return Err(ended(seen, Ended::Revoked)),
    };
    if phivault_auth::password::verify_password(given, phc) {
        return Ok(());
    }
    seen.reason = Some("passcode-wrong");
    // checked: no longer pending (the attempt stays counted)
    record::update(vault, id, |cur| {
        Ok((
            cur.filter(|r| r.pending > 0).map(|mut r| {
                r.pending -= 1;
                r
            }),
            (),
        ))
    })?;
    Err(Error::Passcode { remaining: left })
}

/// One use of the link taken (and a right passcode's attempt given back; a direct link's
/// file `fetched`, marked on a single-use link), atomically: the record as it is after.
fn take_use(
    vault: &Arc<Vault>,
    id: &str,
    (reserved, fetched): (bool, Option<u32>),
    now: u64,
    seen: &mut Seen,
) -> Result<LinkRecord, Error> {
    let r = record::update(vault, id, move |cur| {
        let Some(mut rec) = cur else {
            return Ok((None, Err(Ended::Revoked)));
        };
        if reserved {
            rec.attempts = rec.attempts.saturating_sub(1);
            rec.pending = rec.pending.saturating_sub(1);
        }
        if let Some(e) = rec.ended(now) {
            return Ok((reserved.then_some(rec), Err(e)));
        }
        rec.uses += 1;
        rec.last_use_ms = now;
        if let Some(n) = fetched.filter(|_| rec.terms.single_use) {
            rec.fetched.push(n);
        }
        Ok((Some(rec.clone()), Ok(rec)))
    })?;
    r.map_err(|e| ended(seen, e))
}

/// A sealed `location` ticket: link, file, expiry, and the use it was issued for.
fn ticket(
    vault: &Vault,
    (id, n): (&str, u32),
    exp_ms: u64,
    use_no: u32,
    recipient: &str,
) -> Result<String, Error> {
    let mut b = Vec::with_capacity(64 + recipient.len());
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(&n.to_be_bytes());
    b.extend_from_slice(&exp_ms.to_be_bytes());
    b.extend_from_slice(&use_no.to_be_bytes());
    b.extend_from_slice(recipient.as_bytes());
    let sealed = vault
        .engine
        .seal_secret(TICKET_LABEL, &b)
        .ok_or_else(Error::internal)?;
    Ok(b64(&sealed))
}

/// What a ticket names.
struct Ticket {
    id: String,
    n: u32,
    exp: u64,
    use_no: u32,
    recipient: String,
}

/// Open a ticket (sealed: a forged or altered one opens as nothing).
fn open_ticket(vault: &Vault, t: &str) -> Option<Ticket> {
    let sealed = unb64(t).filter(|_| t.len() <= 2048)?;
    let b = vault.engine.open_secret(TICKET_LABEL, &sealed)?;
    if b.len() < 48 {
        return None;
    }
    Some(Ticket {
        id: String::from_utf8(b[..32].to_vec()).ok()?,
        n: u32::from_be_bytes(b[32..36].try_into().ok()?),
        exp: u64::from_be_bytes(b[36..44].try_into().ok()?),
        use_no: u32::from_be_bytes(b[44..48].try_into().ok()?),
        recipient: String::from_utf8(b[48..].to_vec()).ok()?,
    })
}

/// `GET` a `location`: the JWE.
pub fn file(vault: &Arc<Vault>, area: &Area, t: &str, seen: &mut Seen) -> Result<Vec<u8>, Error> {
    let now = crate::now_ms();
    let Some(Ticket {
        id,
        n,
        exp,
        use_no,
        recipient,
    }) = open_ticket(vault, t)
    else {
        seen.reason = Some("location-unknown");
        return Err(Error::not_found("no such file"));
    };
    seen.recipient = Some(recipient);
    let rec = record::load(vault, &id)?.ok_or_else(|| Error::not_found("no such file"))?;
    seen.link = Some((rec.id.clone(), rec.patient.clone()));
    refuse_erased(vault, &rec, seen)?;
    if now >= exp {
        seen.reason = Some("location-expired");
        return Err(Error::not_found("this file location has expired"));
    }
    match rec.ended(now) {
        None => {}
        // a single-use link's files are fetched after its one manifest, once each
        Some(Ended::Used) => {}
        Some(e) => return Err(ended(seen, e)),
    }
    if rec.terms.single_use {
        let taken = record::update(vault, &id, move |cur| {
            let Some(mut rec) = cur else {
                return Ok((None, false));
            };
            if rec.uses != use_no || rec.fetched.contains(&n) || rec.revoked {
                return Ok((None, false));
            }
            rec.fetched.push(n);
            Ok((Some(rec), true))
        })?;
        if !taken {
            return Err(ended(seen, Ended::Used));
        }
    }
    read_file(area, &rec, n, seen)
}

fn read_file(area: &Area, rec: &LinkRecord, n: u32, seen: &mut Seen) -> Result<Vec<u8>, Error> {
    let key = rec.area_key().ok_or_else(|| ended(seen, Ended::Expired))?;
    if n as usize >= rec.files.len() {
        return Err(Error::not_found("no such file"));
    }
    area.get(&rec.file_name(n), &key).map_err(crate::unread)
}

/// `GET` a `U` link's URL (`?recipient=`): its one file.
pub fn direct(
    vault: &Arc<Vault>,
    area: &Area,
    secret: &str,
    recipient_text: Option<&str>,
    seen: &mut Seen,
) -> Result<Vec<u8>, Error> {
    let now = crate::now_ms();
    let rec = find(vault, secret, seen)?;
    if let Some(e) = rec.ended(now) {
        return Err(ended(seen, e));
    }
    if !rec.terms.direct {
        seen.reason = Some("not-direct");
        return Err(Error::bad_request(
            "this link is resolved by POSTing a manifest request",
        ));
    }
    recipient(recipient_text).inspect_err(|_| seen.reason = Some("recipient-missing"))?;
    let rec = take_use(vault, &rec.id, (false, Some(0)), now, seen)?;
    read_file(area, &rec, 0, seen)
}
