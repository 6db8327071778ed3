//! A share link as stored: one settings row `shl:<id>` per link, its JSON sealed under the
//! data directory's secret-sealing key with the row key bound (a record moved to another
//! row does not open). The id is a keyed hash of the manifest URL's secret, so the database
//! holds neither the URL nor the key of the files (the server never keeps that key). Rows
//! are settings: MAC'd and summed into the signed state, so a storage writer who resets a
//! failure count or un-revokes a link is caught.

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use phivault_records::Vault;

use crate::Error;

/// Label prefix of sealed link records.
const SEAL_LABEL: &str = "phivault share link v1\u{0}";
/// Scope of the keyed hash naming link rows.
const ID_SCOPE: &str = "phivault.shl.id";

/// Who made a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creator {
    /// The client (app or back-end service) that made it.
    pub client: String,
    /// The person the client acted for, if any.
    pub user: Option<String>,
}

/// The flags and limits a link was made with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    /// `L`: long-term; the manifest may be polled.
    pub long_term: bool,
    /// `U`: the URL answers the one file directly (GET), no manifest.
    pub direct: bool,
    /// One successful manifest request, each file fetched once from it.
    pub single_use: bool,
    /// Expiry (ms since the epoch).
    pub expires_ms: u64,
    /// Most wrong passcodes over the link's life.
    pub cap: u32,
}

/// One link.
#[derive(Clone, Serialize, Deserialize)]
pub struct LinkRecord {
    /// The row id (keyed hash of the manifest secret, hex).
    pub id: String,
    /// Whose records it shares.
    pub patient: String,
    /// Who made it.
    pub creator: Creator,
    /// The label shown to recipients (≤ 80 characters).
    pub label: Option<String>,
    /// When it was made (ms).
    pub created_ms: u64,
    /// Flags and limits.
    pub terms: Terms,
    /// The passcode's Argon2id hash (PHC string), when it has one (`P`).
    pub passcode: Option<String>,
    /// Passcode attempts counted against the cap (each counted before it is checked, given
    /// back when right: the cap holds under parallel guesses).
    pub attempts: u32,
    /// When the last attempt was counted (ms): a link at its cap is taken for locked by
    /// the sweep only a while after (a right passcode's attempt is given back after it is
    /// checked).
    #[serde(default)]
    pub last_attempt_ms: u64,
    /// Attempts counted whose passcode is still being checked.
    #[serde(default)]
    pub pending: u32,
    /// Successful manifest requests (or direct fetches).
    pub uses: u32,
    /// The last successful manifest request (ms), for polling.
    pub last_use_ms: u64,
    /// When its content was last built (ms): at creation, and at each refresh of a
    /// long-term link.
    #[serde(default)]
    pub updated_ms: u64,
    /// The resources chosen (`Type/id`); None: everything the creator could read.
    #[serde(default)]
    pub chosen: Option<Vec<String>>,
    /// Files fetched from a single-use link's manifest (their numbers).
    pub fetched: Vec<u32>,
    /// Revoked by its creator or the patient.
    pub revoked: bool,
    /// The files, by number.
    pub files: Vec<FileMeta>,
    /// The exchange-area key the files are sealed under (hex); dropped when the link ends,
    /// which makes the files' bytes unreadable wherever copies went.
    pub area_key: Option<String>,
}

impl Drop for LinkRecord {
    fn drop(&mut self) {
        if let Some(k) = self.area_key.as_mut() {
            k.zeroize();
        }
    }
}

impl std::fmt::Debug for LinkRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkRecord")
            .field("id", &self.id)
            .field("uses", &self.uses)
            .field("attempts", &self.attempts)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

/// One file of a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// What the JWE holds (`application/fhir+json`).
    pub content_type: String,
    /// The JWE's length (compact serialization, bytes).
    pub len: u64,
}

/// Why a link answers nothing now (each answers 404, and is audited by its code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Revoked.
    Revoked,
    /// Past its expiry.
    Expired,
    /// A single-use link already used.
    Used,
    /// The passcode failure cap was reached.
    Locked,
}

impl Ended {
    /// The audit reason code.
    pub fn code(self) -> &'static str {
        match self {
            Ended::Revoked => "link-revoked",
            Ended::Expired => "link-expired",
            Ended::Used => "link-used",
            Ended::Locked => "link-locked",
        }
    }
}

impl LinkRecord {
    /// Why the link answers nothing at `now_ms`, if it does not.
    pub fn ended(&self, now_ms: u64) -> Option<Ended> {
        if self.revoked {
            Some(Ended::Revoked)
        } else if now_ms >= self.terms.expires_ms {
            Some(Ended::Expired)
        } else if self.passcode.is_some() && self.attempts >= self.terms.cap {
            Some(Ended::Locked)
        } else if self.terms.single_use && self.uses > 0 {
            Some(Ended::Used)
        } else {
            None
        }
    }

    /// The flags as the payload spells them (alphabetical).
    pub fn flag(&self) -> String {
        let mut f = String::new();
        if self.terms.long_term {
            f.push('L');
        }
        if self.passcode.is_some() {
            f.push('P');
        }
        if self.terms.direct {
            f.push('U');
        }
        f
    }

    /// The area key, when the link still has its files.
    pub fn area_key(&self) -> Option<[u8; 32]> {
        unhex32(self.area_key.as_deref()?)
    }

    /// The name of file `n` in the exchange area.
    pub fn file_name(&self, n: u32) -> String {
        file_name(&self.id, n)
    }
}

/// Whether the link's patient was erased (their data key destroyed).
pub fn patient_erased(vault: &Vault, rec: &LinkRecord) -> Result<bool, Error> {
    Ok(vault
        .engine
        .is_erased(&phivault_records::engine::patient_key_id(&rec.patient))?)
}

/// The area name of file `n` of link `id`.
pub fn file_name(id: &str, n: u32) -> String {
    crate::area::Owner::LINK.file(id, n as usize)
}

/// 32 bytes from 64 hex digits.
pub fn unhex32(hex: &str) -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The row id of the link whose manifest secret is `secret`.
pub fn id_of(vault: &Vault, secret: &[u8]) -> String {
    hex(&vault.engine.keys().blind_index_key(ID_SCOPE).token(secret))
}

impl crate::rows::Row for LinkRecord {
    const PREFIX: &'static str = "shl:";
    const LABEL: &'static str = SEAL_LABEL;
    fn id(&self) -> &str {
        &self.id
    }
}

/// Link `id`, if there is one.
pub fn load(vault: &Vault, id: &str) -> Result<Option<LinkRecord>, Error> {
    crate::rows::load(vault, id)
}

/// Every link (for listings and the sweep).
pub fn all(vault: &Vault) -> Result<Vec<LinkRecord>, Error> {
    crate::rows::all(vault)
}

/// Change link `id` atomically ([`crate::rows::update`]).
pub fn update<T: Send + 'static>(
    vault: &std::sync::Arc<Vault>,
    id: &str,
    f: impl FnMut(Option<LinkRecord>) -> Result<(Option<LinkRecord>, T), Error> + Send + 'static,
) -> Result<T, Error> {
    crate::rows::update(vault, id, f)
}
