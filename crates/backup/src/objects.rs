//! What is uploaded: object kinds, their opaque names, sealing and opening.
//!
//! Every object but two is sealed ([`phivault_crypto::backup`]) and named by an HMAC of
//! what it is (`s/SEQ` for a segment, `m/SEQ` for a manifest, …), so a name tells nothing
//! of content or time, and a restore computes the name of what it looks for. The two clear
//! objects are `deployment.json` (the key provider's record: what a restore needs to ask
//! the provider for the master key, nothing that opens anything by itself) and `head` is
//! sealed too, under a fixed name, pointing at the newest manifest.

use std::sync::Arc;

use phivault_crypto::backup::{BackupKeys, ObjectHeader};
use zeroize::Zeroizing;

use crate::periods::PeriodStore;
use crate::{BackupError, period_of};

/// A batch of committed pages.
pub const KIND_SEGMENT: u8 = 1;
/// A part of a database snapshot.
pub const KIND_SNAPSHOT: u8 = 2;
/// A list of segment points (an epoch's older segments).
pub const KIND_INDEX: u8 = 3;
/// A signed manifest.
pub const KIND_MANIFEST: u8 = 4;
/// The pointer to the newest manifest.
pub const KIND_HEAD: u8 = 5;

/// The head's fixed name.
pub const HEAD: &str = "head";
/// The clear record of the deployment's key provider.
pub const DEPLOYMENT: &str = "deployment.json";

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_SEGMENT => "segment",
        KIND_SNAPSHOT => "snapshot part",
        KIND_INDEX => "segment index",
        KIND_MANIFEST => "manifest",
        KIND_HEAD => "head",
        _ => "unknown kind",
    }
}

/// Hex SHA-256.
pub fn digest_hex(bytes: &[u8]) -> String {
    phivault_crypto::sha256(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A sealed object ready to upload.
pub struct Sealed {
    pub bytes: Vec<u8>,
    pub period: String,
    pub digest: String,
}

/// Seals and opens one deployment's objects.
pub struct Sealer {
    keys: Arc<BackupKeys>,
    periods: Arc<PeriodStore>,
    deployment: String,
    deployment_bytes: [u8; 16],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("deployment", &self.deployment)
            .finish_non_exhaustive()
    }
}

/// A data directory id (32 hex digits) as 16 bytes.
pub fn deployment_bytes(id: &str) -> Result<[u8; 16], BackupError> {
    let bad = || BackupError::Config(format!("{id:?} is not a data directory id"));
    if id.len() != 32 {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o =
            u8::from_str_radix(id.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Sealer {
    pub fn new(
        keys: Arc<BackupKeys>,
        periods: Arc<PeriodStore>,
        deployment: &str,
    ) -> Result<Self, BackupError> {
        Ok(Sealer {
            keys,
            periods,
            deployment: deployment.to_owned(),
            deployment_bytes: deployment_bytes(deployment)?,
        })
    }

    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    pub fn keys(&self) -> &BackupKeys {
        &self.keys
    }

    pub fn periods(&self) -> &PeriodStore {
        &self.periods
    }

    pub fn segment_name(&self, seq: u64) -> String {
        self.keys.object_name(&format!("s/{seq}"))
    }

    pub fn manifest_name(&self, seq: u64) -> String {
        self.keys.object_name(&format!("m/{seq}"))
    }

    pub fn index_name(&self, epoch: u64, k: u64) -> String {
        self.keys.object_name(&format!("i/{epoch}/{k}"))
    }

    pub fn part_name(&self, epoch: u64, snapshot: u64, part: u64) -> String {
        self.keys
            .object_name(&format!("p/{epoch}/{snapshot}/{part}"))
    }

    /// Seal `plaintext` as the object `name` of `kind`, in the month of `now_ms`.
    pub fn seal(
        &self,
        kind: u8,
        name: &str,
        plaintext: &[u8],
        now_ms: i64,
    ) -> Result<Sealed, BackupError> {
        let period = period_of(now_ms);
        let pk = self.periods.get_or_create(&period)?;
        let header = ObjectHeader {
            kind,
            deployment: self.deployment_bytes,
            period: period.clone(),
        };
        let bytes = self
            .keys
            .seal(&header, &pk, name, plaintext)
            .map_err(|e| BackupError::Config(format!("cannot seal a backup object: {e}")))?;
        let digest = digest_hex(&bytes);
        Ok(Sealed {
            bytes,
            period,
            digest,
        })
    }

    /// Why `bytes` cannot be this deployment's object `name`, when its clear header
    /// says so (another deployment's, not a backup object at all).
    pub fn foreign(&self, name: &str, bytes: &[u8]) -> Option<String> {
        match ObjectHeader::parse(bytes) {
            None => Some(format!(
                "the object {name} is not a phivault backup object: it was replaced or damaged"
            )),
            Some(h) if h.deployment != self.deployment_bytes => Some(format!(
                "the object {name} belongs to another deployment ({}), not to {}: an object from another deployment's backups",
                hex(&h.deployment),
                self.deployment
            )),
            Some(_) => None,
        }
    }

    /// Open the object `name`, which must be of `kind`; every refusal says why.
    pub fn open(
        &self,
        kind: u8,
        name: &str,
        bytes: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, BackupError> {
        let what = kind_name(kind);
        let Some(h) = ObjectHeader::parse(bytes) else {
            return Err(BackupError::Refused(format!(
                "the {what} {name} is not a phivault backup object: it was replaced or damaged"
            )));
        };
        if h.deployment != self.deployment_bytes {
            return Err(BackupError::Refused(format!(
                "the {what} {name} belongs to another deployment ({}), not to {}: an object from another deployment's backups",
                hex(&h.deployment),
                self.deployment
            )));
        }
        if h.kind != kind {
            return Err(BackupError::Refused(format!(
                "the object {name} is of another kind ({}) where a {what} belongs: it was replaced",
                kind_name(h.kind)
            )));
        }
        let Some(pk) = self.periods.get(&h.period)? else {
            return Err(BackupError::Refused(format!(
                "the {what} {name} was sealed in {}, whose period key is not in {} (destroyed at the end of its retention, or the wrong --backup-keys)",
                h.period,
                self.periods.dir().display()
            )));
        };
        self.keys.open(&pk, name, bytes).map_err(|_| {
            BackupError::Refused(format!(
                "the {what} {name} does not open under this deployment's keys: it was changed"
            ))
        })
    }
}
