//! Making a link: the content built under the creator's grant (the one door: a patient's
//! own compartment, a clinician's treated patient, a back-end service's `system/` read),
//! encrypted as JWE (`dir`, `A256GCM`) under a fresh key, sealed into the exchange area,
//! the record written — and the key handed back inside the `shlink:/` only, never stored.

use std::sync::Arc;

use phivault_auth::{Authenticated, Interaction};
use phivault_records::Vault;
use phivault_records::search::{self, Streamed};
use serde_json::json;
use zeroize::Zeroizing;

use super::record::{self, Creator, FileMeta, LinkRecord, Terms};
use crate::area::Area;
use crate::{Error, b64};

/// Longest a link may live.
pub const MAX_LIFETIME_S: u64 = 366 * 86_400;
/// A link's life when none is asked for: a week (long-term links: 90 days).
pub const DEFAULT_LIFETIME_S: u64 = 7 * 86_400;
/// Longest passcode (characters).
pub const MAX_PASSCODE: usize = 128;
/// Default lifetime cap of wrong passcodes.
pub const DEFAULT_CAP: u32 = 10;
/// Most resources one link may carry.
pub const MAX_RESOURCES: usize = 10_000;
/// Most bytes of one link's content.
pub const MAX_CONTENT: usize = 64 << 20;

/// What a creator asks for.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewLink {
    /// `Patient/{id}` or `{id}`: whose records.
    pub patient: String,
    /// Shown to recipients (≤ 80 characters).
    pub label: Option<String>,
    /// Seconds until it expires.
    pub expires_in: Option<u64>,
    /// A passcode the recipient must give (`P`), 4 – 128 characters.
    pub passcode: Option<String>,
    /// Most wrong passcodes over the link's life (1 – 1000; default 10).
    pub passcode_attempts: Option<u32>,
    /// `L`: the manifest may be polled over time.
    #[serde(default)]
    pub long_term: bool,
    /// `U`: the link's URL answers the one file itself (no passcode allowed).
    #[serde(default)]
    pub direct: bool,
    /// One manifest request, each of its files fetched once.
    #[serde(default)]
    pub single_use: bool,
    /// Only these (`Type/id`, the patient's own) instead of everything the creator may read.
    pub resources: Option<Vec<String>>,
    /// A viewer's `https://` URL the link is appended to after `#`.
    pub viewer: Option<String>,
}

/// A link made.
pub struct Made {
    /// The link's id (for listing and revoking).
    pub id: String,
    /// `shlink:/…`: holds the key; shown once.
    pub shlink: String,
    /// The viewer URL (`viewer#shlink:/…`) when a viewer was given.
    pub viewer_url: Option<String>,
    /// The record as stored.
    pub record: LinkRecord,
    /// What was shared (`(type, id)`), for the audit event.
    pub disclosed: Vec<(String, String)>,
}

impl std::fmt::Debug for Made {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Made")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Checked terms of a request.
fn terms(req: &NewLink, now_ms: u64) -> Result<Terms, Error> {
    if req.direct && req.passcode.is_some() {
        return Err(Error::bad_request(
            "a direct (U) link cannot have a passcode",
        ));
    }
    if req.single_use && req.long_term {
        return Err(Error::bad_request(
            "a long-term (L) link cannot be single-use",
        ));
    }
    if req
        .label
        .as_ref()
        .is_some_and(|l| l.chars().count() > 80 || !crate::printable(l))
    {
        return Err(Error::bad_request(
            "the label is at most 80 printable characters",
        ));
    }
    if req
        .passcode
        .as_ref()
        .is_some_and(|p| !(4..=MAX_PASSCODE).contains(&p.chars().count()))
    {
        return Err(Error::bad_request("a passcode has 4 to 128 characters"));
    }
    if req.passcode_attempts.is_some() && req.passcode.is_none() {
        return Err(Error::bad_request(
            "passcodeAttempts is for a link with a passcode",
        ));
    }
    let cap = req.passcode_attempts.unwrap_or(DEFAULT_CAP);
    if !(1..=1000).contains(&cap) {
        return Err(Error::bad_request("passcodeAttempts is 1 to 1000"));
    }
    let default = if req.long_term {
        90 * 86_400
    } else {
        DEFAULT_LIFETIME_S
    };
    let life = req.expires_in.unwrap_or(default);
    if life == 0 || life > MAX_LIFETIME_S {
        return Err(Error::bad_request("expiresIn is 1 second to 366 days"));
    }
    if let Some(v) = &req.viewer
        && (!v.starts_with("https://")
            || v.contains('#')
            || v.len() > 200
            || v.chars().any(char::is_whitespace))
    {
        return Err(Error::bad_request(
            "the viewer is an https URL without a fragment",
        ));
    }
    Ok(Terms {
        long_term: req.long_term,
        direct: req.direct,
        single_use: req.single_use,
        expires_ms: now_ms + life * 1000,
        cap,
    })
}

/// The patient id of `Patient/{id}` or `{id}`.
fn patient_id(s: &str) -> Result<&str, Error> {
    let id = s.strip_prefix("Patient/").unwrap_or(s);
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(Error::bad_request("patient is Patient/{id}"));
    }
    Ok(id)
}

/// Make a link for `auth` (its grant decides what may be shared) served from `origin`.
pub fn create(
    vault: &Arc<Vault>,
    area: &Area,
    auth: &Authenticated,
    req: &NewLink,
    origin: &str,
) -> Result<Made, Error> {
    let now = crate::now_ms();
    let terms = terms(req, now)?;
    let patient = patient_id(&req.patient)?.to_owned();
    // the one door: the creator must reach the patient
    let pa = vault.decide(auth, "Patient", Interaction::Read)?;
    if !pa.admits(Some(&patient)) {
        return Err(Error::forbidden());
    }
    if search::load(vault, &pa, &patient)?.is_none() {
        return Err(Error::not_found("no such patient"));
    }
    let (bundle, disclosed) = content(vault, auth, &patient, req.resources.as_deref())?;
    // the key exists only here and in the link handed back
    let key = Zeroizing::new(phivault_crypto::random_bytes::<32>().map_err(|_| Error::internal())?);
    let jwe = phivault_crypto::jose::encrypt_dir(&key, "application/fhir+json", &bundle)
        .map_err(|_| Error::internal())?;
    drop(bundle);
    let secret = phivault_crypto::random_bytes::<32>().map_err(|_| Error::internal())?;
    let id = record::id_of(vault, &secret);
    let area_key =
        Zeroizing::new(phivault_crypto::random_bytes::<32>().map_err(|_| Error::internal())?);
    area.put(&record::file_name(&id, 0), &area_key, jwe.as_bytes())
        .map_err(|_| Error::Records(phivault_records::Error::unavailable()))?;
    let passcode = match &req.passcode {
        Some(p) => {
            let salt = phivault_crypto::random_bytes::<16>().map_err(|_| Error::internal())?;
            Some(phivault_auth::password::hash_password(p, &salt).map_err(|_| Error::internal())?)
        }
        None => None,
    };
    let rec = LinkRecord {
        id: id.clone(),
        patient,
        creator: Creator {
            client: auth.client_id().to_owned(),
            user: auth.person().map(|p| p.user_id.clone()),
        },
        label: req.label.clone(),
        created_ms: now,
        terms,
        passcode,
        attempts: 0,
        last_attempt_ms: 0,
        pending: 0,
        uses: 0,
        last_use_ms: 0,
        updated_ms: now,
        chosen: req.resources.clone(),
        fetched: Vec::new(),
        revoked: false,
        files: vec![FileMeta {
            content_type: "application/fhir+json".to_owned(),
            len: jwe.len() as u64,
        }],
        area_key: Some(record::hex(&area_key[..])),
    };
    let stored = rec.clone();
    let written = record::update(vault, &id, move |cur| {
        if cur.is_some() {
            return Ok((None, false));
        }
        Ok((Some(stored.clone()), true))
    });
    if !matches!(written, Ok(true)) {
        let _ = area.remove(&record::file_name(&id, 0));
        return Err(written.err().unwrap_or_else(Error::internal));
    }
    let shlink = payload(&rec, &secret, &key, origin);
    let viewer_url = req.viewer.as_ref().map(|v| format!("{v}#{shlink}"));
    Ok(Made {
        id,
        shlink,
        viewer_url,
        record: rec,
        disclosed,
    })
}

/// `shlink:/` + base64url of the payload JSON.
fn payload(rec: &LinkRecord, secret: &[u8; 32], key: &[u8; 32], origin: &str) -> String {
    let mut p = json!({
        "url": format!("{origin}/shl/m/{}", b64(secret)),
        "key": b64(key),
        "exp": rec.terms.expires_ms / 1000,
        "v": 1,
    });
    let flag = rec.flag();
    if !flag.is_empty() {
        p["flag"] = json!(flag);
    }
    if let Some(l) = &rec.label {
        p["label"] = json!(l);
    }
    let text = Zeroizing::new(p.to_string());
    format!("shlink:/{}", b64(text.as_bytes()))
}

/// A Bundle (`collection`) being written entry by entry (nothing kept but its bytes).
struct BundleOut {
    out: Zeroizing<Vec<u8>>,
    disclosed: Vec<(String, String)>,
    base: String,
}

impl BundleOut {
    fn new(base: &str) -> Self {
        let mut out = Zeroizing::new(Vec::with_capacity(4096));
        let stamp = phivault_records::engine::instant(phivault_records::engine::now_ms());
        out.extend_from_slice(
            format!(
                r#"{{"resourceType":"Bundle","type":"collection","timestamp":"{stamp}","entry":["#
            )
            .as_bytes(),
        );
        BundleOut {
            out,
            disclosed: Vec::new(),
            base: base.to_owned(),
        }
    }

    /// One record as stored; refused past [`MAX_RESOURCES`] or [`MAX_CONTENT`].
    fn push(&mut self, l: search::Loaded) -> Result<(), Error> {
        if self.disclosed.len() >= MAX_RESOURCES {
            return Err(Error::bad_request(
                "the content is over 10000 resources: choose resources",
            ));
        }
        if !self.disclosed.is_empty() {
            self.out.push(b',');
        }
        let full = format!("{}/{}/{}", self.base, l.row.rtype, l.row.id);
        self.out.extend_from_slice(br#"{"fullUrl":"#);
        self.out
            .extend_from_slice(json!(full).to_string().as_bytes());
        self.out.extend_from_slice(br#","resource":"#);
        self.out.extend_from_slice(&l.body);
        self.out.push(b'}');
        self.disclosed.push((l.row.rtype, l.row.id));
        if self.out.len() > MAX_CONTENT {
            return Err(Error::bad_request("the shared content is over 64 MiB"));
        }
        Ok(())
    }

    fn finish(mut self) -> (Zeroizing<Vec<u8>>, Vec<(String, String)>) {
        self.out.extend_from_slice(b"]}");
        (self.out, self.disclosed)
    }
}

/// The Bundle (`collection`) shared, and the `(type, id)` of each entry.
#[allow(clippy::type_complexity)]
pub(crate) fn content(
    vault: &Vault,
    auth: &Authenticated,
    patient: &str,
    chosen: Option<&[String]>,
) -> Result<(Zeroizing<Vec<u8>>, Vec<(String, String)>), Error> {
    let mut b = BundleOut::new(&vault.base_url);
    match chosen {
        Some(list) => {
            if list.is_empty() || list.len() > MAX_RESOURCES {
                return Err(Error::bad_request("resources lists 1 to 10000 Type/id"));
            }
            for r in list {
                b.push(chosen_one(vault, auth, patient, r)?)?;
            }
        }
        None => everything(vault, auth, patient, &mut b)?,
    }
    Ok(b.finish())
}

/// One chosen resource: the creator may read it and it is the patient's.
fn chosen_one(
    vault: &Vault,
    auth: &Authenticated,
    patient: &str,
    r: &str,
) -> Result<search::Loaded, Error> {
    let (t, id) = r
        .split_once('/')
        .ok_or_else(|| Error::bad_request("resources are Type/id"))?;
    let access = vault.decide(auth, t, Interaction::Read)?;
    let l = search::load(vault, &access, id)?
        .ok_or_else(|| Error::not_found("a chosen resource was not found"))?;
    if phivault_records::engine::key_patient(&l.row.key_id) != Some(patient) {
        return Err(Error::bad_request("a chosen resource is not the patient's"));
    }
    Ok(l)
}

/// The patient's whole compartment, every type the creator may read.
fn everything(
    vault: &Vault,
    auth: &Authenticated,
    patient: &str,
    b: &mut BundleOut,
) -> Result<(), Error> {
    for t in phivault_fhir::patient_compartment_types() {
        let Ok(access) = vault.decide(auth, t, Interaction::Read) else {
            continue;
        };
        let mut failed = None;
        search::stream_compartment(vault, &access, patient, &mut |item| {
            let r = match item {
                Streamed::Record(l) => b.push(l),
                Streamed::Damaged { .. } => Err(Error::integrity()),
            };
            r.map_err(|e| failed = Some(e)).is_ok()
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(())
}

/// What a refresh did: the link's patient and what it now shares.
pub struct Refreshed {
    /// The patient.
    pub patient: String,
    /// What was shared (`(type, id)`), for the audit event.
    pub disclosed: Vec<(String, String)>,
}

/// A long-term link's content built again under its manager's grant and encrypted under
/// the link's key — which the server does not keep: the manager's app gives it back
/// (`key`, base64url), and it is checked by opening the current file with it.
pub fn refresh(
    vault: &Arc<Vault>,
    area: &Area,
    auth: &Authenticated,
    id: &str,
    key_b64: &str,
) -> Result<Refreshed, Error> {
    let rec = record::load(vault, id)?.ok_or_else(|| Error::not_found("no such link"))?;
    if !super::manage::manages(auth, &rec) {
        return Err(Error::not_found("no such link"));
    }
    if record::patient_erased(vault, &rec)? {
        return Err(Error::Records(phivault_records::Error::erased()));
    }
    if rec.ended(crate::now_ms()).is_some() || !rec.terms.long_term {
        return Err(Error::bad_request(
            "only an active long-term (L) link's content is refreshed",
        ));
    }
    let key: Zeroizing<[u8; 32]> = Zeroizing::new(
        crate::unb64(key_b64)
            .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
            .ok_or_else(|| Error::bad_request("key is the link's 32-byte key, base64url"))?,
    );
    let area_key = rec
        .area_key()
        .ok_or_else(|| Error::not_found("no such link"))?;
    let name = rec.file_name(0);
    let current = area.get(&name, &area_key).map_err(crate::unread)?;
    let current = String::from_utf8(current).map_err(|_| Error::integrity())?;
    if phivault_crypto::jose::decrypt_dir(&key, &current).is_err() {
        return Err(Error::bad_request("the key is not this link's"));
    }
    let (bundle, disclosed) = content(vault, auth, &rec.patient, rec.chosen.as_deref())?;
    let jwe = phivault_crypto::jose::encrypt_dir(&key, "application/fhir+json", &bundle)
        .map_err(|_| Error::internal())?;
    drop(bundle);
    area.put(&name, &area_key, jwe.as_bytes())
        .map_err(|_| Error::Records(phivault_records::Error::unavailable()))?;
    let (len, now) = (jwe.len() as u64, crate::now_ms());
    let live = record::update(vault, id, move |cur| match cur {
        Some(mut r) if !r.revoked && r.area_key.is_some() => {
            if let Some(f) = r.files.first_mut() {
                f.len = len;
            }
            r.updated_ms = now;
            Ok((Some(r), true))
        }
        _ => Ok((None, false)),
    })?;
    if !live {
        // revoked meanwhile: what was just written goes too
        let _ = area.remove(&name);
        return Err(Error::not_found("no such link"));
    }
    Ok(Refreshed {
        patient: rec.patient.clone(),
        disclosed,
    })
}
