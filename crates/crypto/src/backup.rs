//! The keys of backups (issue 19).
//!
//! Everything uploaded is sealed with AES-256-GCM under an object key that needs two
//! secrets: the backup root, derived from the master key (`HKDF(master, "backup-root-v1")`),
//! and the *period key* of the month the object was written in — 32 random bytes kept with
//! the key provider, never in the target, destroyed once every backup of that month has
//! passed its retention. So a thief of the bucket holds ciphertext; a holder of the master
//! key and an old bucket opens nothing of a month whose period key is gone.
//!
//! Object names are HMACs of what they are (an opaque name says nothing of its content or
//! time), and the erasure ledger holds HMACs of erased key ids, never ids.
//!
//! Sealed object: `"PVBK" ‖ 1 ‖ kind ‖ deployment (16 bytes) ‖ period ("YYYY-MM") ‖ nonce
//! (12) ‖ ciphertext ‖ tag`; the associated data is everything before the nonce and the
//! object's name, so an object moved to another name, kind, period or deployment does not
//! open. The clear header lets a restore say *why* an object is refused (another
//! deployment's, a destroyed period's) before it tries the key.

use zeroize::Zeroizing;

use crate::keys::{aead_open, aead_seal, hkdf_expand};
use crate::{CryptoError, KeyHierarchy, Secret};

const LABEL_ROOT: &str = "backup-root-v1";
const LABEL_PERIOD_WRAP: &str = "backup-period-wrap-v1";
const MAGIC: &[u8; 4] = b"PVBK";
const VERSION: u8 = 1;
/// The clear header's length.
pub const HEADER_LEN: usize = 4 + 1 + 1 + 16 + 7;
/// The AEAD format byte inside a sealed object (after the header).
const AEAD_FORMAT: u8 = 1;

/// A sealed object's clear header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHeader {
    /// What the object is (the backup crate's numbering).
    pub kind: u8,
    /// The deployment (data directory id), 16 bytes.
    pub deployment: [u8; 16],
    /// `YYYY-MM`.
    pub period: String,
}

impl ObjectHeader {
    fn encode(&self) -> Result<Vec<u8>, CryptoError> {
        if !valid_period(&self.period) {
            return Err(CryptoError::InvalidKey("backup period"));
        }
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        h.push(VERSION);
        h.push(self.kind);
        h.extend_from_slice(&self.deployment);
        h.extend_from_slice(self.period.as_bytes());
        Ok(h)
    }

    /// The header of a sealed object (`None`: not a phivault backup object).
    pub fn parse(sealed: &[u8]) -> Option<ObjectHeader> {
        if sealed.len() < HEADER_LEN || &sealed[..4] != MAGIC || sealed[4] != VERSION {
            return None;
        }
        let mut deployment = [0u8; 16];
        deployment.copy_from_slice(&sealed[6..22]);
        let period = std::str::from_utf8(&sealed[22..29]).ok()?.to_owned();
        valid_period(&period).then_some(ObjectHeader {
            kind: sealed[5],
            deployment,
            period,
        })
    }
}

/// `YYYY-MM`.
pub fn valid_period(p: &str) -> bool {
    let b = p.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[5..].iter().all(u8::is_ascii_digit)
        && matches!(
            &p[5..],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        )
}

/// The backup keys derived from the master key. `Debug` shows nothing.
pub struct BackupKeys {
    root: Secret<[u8; 32]>,
    period_wrap: Secret<[u8; 32]>,
}

impl std::fmt::Debug for BackupKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKeys([redacted])")
    }
}

impl BackupKeys {
    /// The backup keys of the master key behind `keys`.
    pub fn new(keys: &KeyHierarchy) -> Self {
        BackupKeys {
            root: keys.derive_subkey(LABEL_ROOT),
            period_wrap: keys.derive_subkey(LABEL_PERIOD_WRAP),
        }
    }

    fn prf(&self, parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
        hkdf_expand(self.root.expose(), parts)
    }

    /// An object's opaque name: 32 hex digits of `HMAC(root, "name" ‖ what)`.
    pub fn object_name(&self, what: &str) -> String {
        let tag = self.prf(&[b"name\0", what.as_bytes()]);
        tag[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The tag of the newest-manifest mark kept with the period keys (hex): whoever has no
    /// master key cannot make one.
    pub fn mark_tag(&self, deployment: &str, seq: u64, digest: &str) -> String {
        let tag = self.prf(&[
            b"mark\0",
            deployment.as_bytes(),
            b"\0",
            &seq.to_be_bytes(),
            digest.as_bytes(),
        ]);
        tag.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The erasure ledger's entry for a key id (hex).
    pub fn ledger_tag(&self, key_id: &str) -> String {
        let tag = self.prf(&[b"erased\0", key_id.as_bytes()]);
        tag.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn object_key(&self, period: &str, period_key: &PeriodKey) -> Zeroizing<[u8; 32]> {
        self.prf(&[b"object\0", period.as_bytes(), b"\0", period_key.0.expose()])
    }

    /// Seal `plaintext` as the object `name`.
    pub fn seal(
        &self,
        header: &ObjectHeader,
        period_key: &PeriodKey,
        name: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut out = header.encode()?;
        let aad = [out.as_slice(), name.as_bytes()].concat();
        let key = self.object_key(&header.period, period_key);
        out.extend_from_slice(&aead_seal(&key, AEAD_FORMAT, &aad, plaintext)?);
        Ok(out)
    }

    /// Open the object `name` (its header already checked by the caller); anything but
    /// what [`BackupKeys::seal`] made for that name is [`CryptoError::Integrity`].
    pub fn open(
        &self,
        period_key: &PeriodKey,
        name: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let header = ObjectHeader::parse(sealed).ok_or(CryptoError::Integrity)?;
        let aad = [&sealed[..HEADER_LEN], name.as_bytes()].concat();
        let key = self.object_key(&header.period, period_key);
        aead_open(&key, AEAD_FORMAT, &aad, &sealed[HEADER_LEN..])
    }

    /// A new period key, and its wrapped form for the period-key store.
    pub fn new_period_key(
        &self,
        deployment: &str,
        period: &str,
    ) -> Result<(PeriodKey, Vec<u8>), CryptoError> {
        let raw: [u8; 32] = crate::random_bytes()?;
        let key = PeriodKey(Secret::new(raw));
        let wrapped = aead_seal(
            self.period_wrap.expose(),
            AEAD_FORMAT,
            &period_aad(deployment, period),
            key.0.expose(),
        )?;
        Ok((key, wrapped))
    }

    /// Unwrap a stored period key.
    pub fn open_period_key(
        &self,
        deployment: &str,
        period: &str,
        wrapped: &[u8],
    ) -> Result<PeriodKey, CryptoError> {
        let plain = aead_open(
            self.period_wrap.expose(),
            AEAD_FORMAT,
            &period_aad(deployment, period),
            wrapped,
        )?;
        let raw: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Integrity)?;
        Ok(PeriodKey(Secret::new(raw)))
    }
}

fn period_aad(deployment: &str, period: &str) -> Vec<u8> {
    [
        b"phivault-backup-period-v1\0",
        deployment.as_bytes(),
        b"\0",
        period.as_bytes(),
    ]
    .concat()
}

/// One month's backup key. `Debug` shows nothing; wiped on drop.
pub struct PeriodKey(Secret<[u8; 32]>);

impl std::fmt::Debug for PeriodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeriodKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MasterKey;

    fn keys() -> BackupKeys {
        BackupKeys::new(&KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32])))
    }

    fn header(period: &str) -> ObjectHeader {
        ObjectHeader {
            kind: 2,
            deployment: [1; 16],
            period: period.into(),
        }
    }

    #[test]
    fn an_object_opens_only_under_its_name_period_key_and_header() {
        let k = keys();
        let (pk, wrapped) = k.new_period_key("dep", "2026-12").expect("period key");
        let sealed = k
            .seal(&header("2026-12"), &pk, "abc", b"pages")
            .expect("seal");
        assert_eq!(&*k.open(&pk, "abc", &sealed).expect("open"), b"pages");
        assert!(k.open(&pk, "abd", &sealed).is_err(), "another name");
        let (other, _) = k.new_period_key("dep", "2026-12").expect("period key");
        assert!(
            k.open(&other, "abc", &sealed).is_err(),
            "another period key"
        );
        let mut moved = sealed.clone();
        moved[5] = 3;
        assert!(k.open(&pk, "abc", &moved).is_err(), "another kind");
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(k.open(&pk, "abc", &flipped).is_err(), "a flipped bit");
        let again = k
            .open_period_key("dep", "2026-12", &wrapped)
            .expect("unwrap");
        assert_eq!(&*k.open(&again, "abc", &sealed).expect("open"), b"pages");
        assert!(k.open_period_key("dep", "2026-11", &wrapped).is_err());
        assert!(k.open_period_key("other", "2026-12", &wrapped).is_err());
        let other_master = BackupKeys::new(&KeyHierarchy::new(&MasterKey::from_bytes(&[8; 32])));
        assert!(
            other_master.open(&pk, "abc", &sealed).is_err(),
            "another master key"
        );
        assert_eq!(ObjectHeader::parse(&sealed), Some(header("2026-12")));
    }

    #[test]
    fn names_and_ledger_tags_are_opaque_and_stable() {
        let k = keys();
        assert_eq!(k.object_name("s/1"), k.object_name("s/1"));
        assert_ne!(k.object_name("s/1"), k.object_name("s/2"));
        assert_eq!(k.object_name("s/1").len(), 32);
        assert!(!k.ledger_tag("p:123").contains("123"));
        assert!(valid_period("2026-01") && !valid_period("2026-13") && !valid_period("2026-1x"));
    }
}
