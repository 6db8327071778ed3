//! The key hierarchy (DR2):
//!
//! ```text
//! master key (32 random bytes, key file 0600)
//!   └─ HKDF-Extract(salt = HKDF_SALT)  = PRK
//!        ├─ HKDF-Expand(PRK, LABEL_KEK)            KEK generation 0 (AES-256-GCM)
//!        │     └─ wraps per-patient data keys (DataKey), AAD = "phivault-dek-v1" ‖ key_id
//!        ├─ HKDF-Expand(PRK, LABEL_KEK_WRAP)       wraps random KEK generations ≥ 1 (`kek.rs`)
//!        ├─ HKDF-Expand(PRK, LABEL_CURSOR_ROOT)    root of the daily cursor keys (`kek.rs`)
//!        ├─ HKDF-Expand(PRK, LABEL_BLIND_ROOT)     blind-index root
//!        │     └─ HKDF-Expand(root, LABEL_BLIND_SCOPE_PREFIX ‖ scope)   per-field BlindIndexKey
//!        ├─ HKDF-Expand(PRK, LABEL_KCV)            key-check key → key check value
//!        ├─ HKDF-Expand(PRK, LABEL_SEALED_SECRET)  key for small secrets kept on disk
//!        └─ HKDF-Expand(PRK, LABEL_SUBKEY_PREFIX ‖ label)  other server-internal keys
//! ```
//!
//! Every output is 32 bytes, i.e. exactly one HKDF-Expand block (`T(1) = HMAC(PRK, info ‖
//! 0x01)`, RFC 5869 §2.3), computed with ring's HMAC-SHA256; a test checks it against
//! ring's own `hkdf` module. Labels are fixed ASCII strings; the two families that take a
//! caller-supplied suffix have a prefix that no other label starts with, so distinct inputs
//! always give distinct `info` strings.
//!
//! All key bytes held here are zeroized on drop. ring's own key objects (`LessSafeKey`,
//! `hmac::Key`) do not zeroize, so they are built per operation and dropped at once,
//! which keeps their copies short-lived.

use std::fmt;
use std::sync::{Arc, RwLock};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hmac;
use subtle::ConstantTimeEq as _;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::kek::KekRing;
use crate::seals::SealBook;
use crate::util::fill_random;
use crate::{CryptoError, Secret, random_bytes};

/// Salt for HKDF-Extract over the master key (fixed; the master key is uniformly random).
pub const HKDF_SALT: &[u8] = b"phivault-hkdf-salt-v1";
/// HKDF info of the key-encryption key that wraps data keys.
pub const LABEL_KEK: &str = "phivault-kek-v1";
/// HKDF info of the blind-index root key.
pub const LABEL_BLIND_ROOT: &str = "phivault-blind-root-v1";
/// Prefix of the HKDF info of a per-field blind-index key (`prefix ‖ scope`, under the root).
pub const LABEL_BLIND_SCOPE_PREFIX: &str = "phivault-blind-v1";
/// HKDF info of the key that computes the key check value.
pub const LABEL_KCV: &str = "phivault-kcv-v1";
/// The message MACed to form the key check value.
pub const KCV_MESSAGE: &[u8] = b"phivault key check value v1";
/// HKDF info of the key that seals small secrets stored in the data directory.
pub const LABEL_SEALED_SECRET: &str = "phivault-sealed-secret-v1";
/// Prefix of the HKDF info of [`KeyHierarchy::derive_subkey`] (`prefix ‖ label`).
pub const LABEL_SUBKEY_PREFIX: &str = "phivault-subkey-v1:";
/// Domain label in the associated data of a wrapped data key.
pub const DEK_AAD_LABEL: &str = "phivault-dek-v1";

/// Format byte of wrapped data keys and sealed secrets.
const WRAP_FORMAT_V1: u8 = 1;
/// Bytes of an AES-GCM nonce.
pub(crate) const NONCE_LEN: usize = 12;
/// Bytes of an AES-GCM tag.
pub(crate) const TAG_LEN: usize = 16;
/// Length of a wrapped data key: format byte, nonce, 32-byte key, tag.
pub const WRAPPED_DATA_KEY_LEN: usize = 1 + NONCE_LEN + 32 + TAG_LEN;

const MASTER_KEY_FILE_PREFIX: &str = "phivault-master-key-v1:";
/// Upper bound on the size of a master key file (it is ~68 bytes).
const MASTER_KEY_FILE_MAX: usize = 256;

// ---------------------------------------------------------------------------------------
// Master key

/// The root of the key hierarchy: 32 bytes from the OS CSPRNG.
///
/// Zeroized on drop; `Debug` prints `[redacted]`; there is deliberately no accessor for
/// the bytes and no `Clone`. (Key types here implement `ZeroizeOnDrop` but not a public
/// `Zeroize`: a key zeroized in place would silently become the all-zero key.)
#[derive(ZeroizeOnDrop)]
pub struct MasterKey {
    bytes: [u8; 32],
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

impl MasterKey {
    /// A fresh random master key (ring `SystemRandom`).
    pub fn generate() -> Result<Self, CryptoError> {
        Ok(Self {
            bytes: random_bytes()?,
        })
    }

    /// A master key from raw bytes (for other key providers — passphrase KDF, HSM — and
    /// for tests). The caller should zeroize its own copy.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self { bytes: *bytes }
    }

    /// The key's bytes, for key providers only (`phivault-keys`: wrapping under a
    /// passphrase, an HSM or a KMS key, splitting into Shamir shares). Never log, print or
    /// store them; copy them only into zeroizing buffers.
    pub fn expose_to_provider(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Writes a new key file: `phivault-master-key-v1:<base64 of 32 bytes>\n`, created with
    /// `O_EXCL` and mode 0600, fsynced. An existing file is never overwritten
    /// ([`CryptoError::KeyFileExists`]).
    pub fn write_new_key_file(&self, path: &std::path::Path) -> Result<(), CryptoError> {
        use base64::Engine as _;
        let mut line = Zeroizing::new(String::with_capacity(MASTER_KEY_FILE_PREFIX.len() + 45));
        line.push_str(MASTER_KEY_FILE_PREFIX);
        base64::engine::general_purpose::STANDARD.encode_string(self.bytes, &mut line);
        line.push('\n');
        crate::write_private_file(path, line.as_bytes())
    }

    /// Loads a key file written by [`MasterKey::write_new_key_file`].
    ///
    /// Refuses symlinks and non-regular files ([`CryptoError::NotRegularFile`]), files with
    /// any group/other permission bit ([`CryptoError::InsecureKeyFile`]), and anything
    /// that is not exactly the versioned line (a missing final newline is tolerated;
    /// CR, spaces, other versions or a key of another length are not).
    pub fn load_key_file(path: &std::path::Path) -> Result<Self, CryptoError> {
        let content = crate::read_private_file(path, MASTER_KEY_FILE_MAX)?;
        Self::parse_key_file(content.expose())
    }

    fn parse_key_file(content: &[u8]) -> Result<Self, CryptoError> {
        use base64::Engine as _;
        const BAD: CryptoError = CryptoError::InvalidKey(
            "master key file is not a `phivault-master-key-v1:<base64>` line",
        );
        let line = content.strip_suffix(b"\n").unwrap_or(content);
        let b64 = line
            .strip_prefix(MASTER_KEY_FILE_PREFIX.as_bytes())
            .ok_or(BAD)?;
        // 32 bytes = 43 base64 characters + one '=' of padding.
        if b64.len() != 44 || b64[43] != b'=' || b64[42] == b'=' {
            return Err(BAD);
        }
        let mut buf = Zeroizing::new([0u8; 48]);
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(b64, &mut buf[..])
            .map_err(|_| BAD)?;
        if n != 32 {
            return Err(BAD);
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&buf[..32]);
        let key = Self { bytes };
        bytes.zeroize();
        Ok(key)
    }
}

// ---------------------------------------------------------------------------------------
// HKDF / HMAC / AEAD helpers

/// HKDF-Extract(salt, ikm) = HMAC-SHA256(salt, ikm).
pub(crate) fn hkdf_extract(salt: &[u8], ikm: &[u8]) -> Zeroizing<[u8; 32]> {
    hmac_sha256(salt, &[ikm])
}

/// HKDF-Expand(prk, info, 32) = T(1) = HMAC-SHA256(prk, info ‖ 0x01).
pub(crate) fn hkdf_expand(prk: &[u8; 32], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(info.len() + 1);
    parts.extend_from_slice(info);
    parts.push(&[0x01]);
    hmac_sha256(prk, &parts)
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    let tag = ctx.sign();
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(tag.as_ref());
    out
}

pub(crate) fn aead_key(bytes: &[u8; 32]) -> Result<LessSafeKey, CryptoError> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| CryptoError::InvalidKey("AES-256-GCM key"))
}

/// Appends `u64 BE length ‖ bytes` — the canonical, unambiguous encoding of one AAD field.
pub(crate) fn push_lp(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_be_bytes());
    out.extend_from_slice(field);
}

/// `[format][nonce][ciphertext ‖ tag]` with a fresh random nonce.
pub(crate) fn aead_seal(
    key: &[u8; 32],
    format: u8,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let key = aead_key(key)?;
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
    out.push(format);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[1 + NONCE_LEN..],
        )
        .map_err(|_| CryptoError::Integrity)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens `[format][nonce][ciphertext ‖ tag]`. Callers put the format byte into `aad`, so it
/// is authenticated. The plaintext is returned in a zeroizing buffer.
pub(crate) fn aead_open(
    key: &[u8; 32],
    expected_format: u8,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if sealed.len() < 1 + NONCE_LEN + TAG_LEN || sealed[0] != expected_format {
        return Err(CryptoError::Integrity);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
    let key = aead_key(key).map_err(|_| CryptoError::Integrity)?;
    let mut buf = Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf[..],
        )
        .map_err(|_| CryptoError::Integrity)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

// ---------------------------------------------------------------------------------------
// Key hierarchy

/// Keys derived from the master key. Cheap to clone (a few 32-byte arrays, each zeroized
/// on drop); share it behind an `Arc` in the server.
///
/// Clones share the KEK generations and the seal counters (`kek.rs`, `seals.rs`): a
/// rotation seen by one clone is seen by all.
#[derive(Clone, ZeroizeOnDrop)]
pub struct KeyHierarchy {
    pub(crate) prk: [u8; 32],
    #[zeroize(skip)]
    pub(crate) keks: Arc<RwLock<KekRing>>,
    pub(crate) kek_wrap: [u8; 32],
    pub(crate) cursor_root: [u8; 32],
    blind_root: [u8; 32],
    secret_key: [u8; 32],
    kcv: [u8; 32],
    #[zeroize(skip)]
    pub(crate) seals: Arc<SealBook>,
}

impl fmt::Debug for KeyHierarchy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHierarchy([redacted])")
    }
}

impl KeyHierarchy {
    /// Derives every key from the master key.
    pub fn new(master: &MasterKey) -> Self {
        let prk = hkdf_extract(HKDF_SALT, &master.bytes);
        let kek = hkdf_expand(&prk, &[LABEL_KEK.as_bytes()]);
        let kek_wrap = hkdf_expand(&prk, &[crate::kek::LABEL_KEK_WRAP.as_bytes()]);
        let cursor_root = hkdf_expand(&prk, &[crate::kek::LABEL_CURSOR_ROOT.as_bytes()]);
        let blind_root = hkdf_expand(&prk, &[LABEL_BLIND_ROOT.as_bytes()]);
        let secret_key = hkdf_expand(&prk, &[LABEL_SEALED_SECRET.as_bytes()]);
        let kcv_key = hkdf_expand(&prk, &[LABEL_KCV.as_bytes()]);
        let kcv = hmac_sha256(&kcv_key[..], &[KCV_MESSAGE]);
        Self {
            prk: *prk,
            keks: Arc::new(RwLock::new(KekRing::derived(kek))),
            kek_wrap: *kek_wrap,
            cursor_root: *cursor_root,
            blind_root: *blind_root,
            secret_key: *secret_key,
            kcv: *kcv,
            seals: Arc::default(),
        }
    }

    /// The same master key's hierarchy sharing nothing with this one: generation 0 of the
    /// KEK derived afresh and seal counters of its own — for another copy of the store
    /// opened beside this one's (a restore drill), whose generations and seals must not
    /// become this one's.
    pub fn detached(&self) -> Self {
        let kek = hkdf_expand(&self.prk, &[LABEL_KEK.as_bytes()]);
        Self {
            prk: self.prk,
            keks: Arc::new(RwLock::new(KekRing::derived(kek))),
            kek_wrap: self.kek_wrap,
            cursor_root: self.cursor_root,
            blind_root: self.blind_root,
            secret_key: self.secret_key,
            kcv: self.kcv,
            seals: Arc::default(),
        }
    }

    /// `HMAC-SHA256(HKDF(master, LABEL_KCV), KCV_MESSAGE)`: stored by the database when it
    /// is created and compared at start-up ([`KeyHierarchy::verify_key_check_value`]) so
    /// that a wrong master key is reported as such instead of as a sea of integrity errors.
    /// It reveals nothing about the master key (HMAC is a PRF).
    pub fn key_check_value(&self) -> [u8; 32] {
        self.kcv
    }

    /// Constant-time comparison of a stored key check value with this hierarchy's.
    pub fn verify_key_check_value(&self, stored: &[u8]) -> bool {
        self.kcv.as_slice().ct_eq(stored).into()
    }

    /// A fresh random 256-bit data key and its wrapped form under the current KEK
    /// generation (generation 0: `[1][nonce 12][AES-256-GCM(KEK, dek) 32 ‖ tag 16]`,
    /// [`WRAPPED_DATA_KEY_LEN`] bytes; later ones: `[2][generation 4][nonce][..]`) to store next to the records it seals. Destroying every copy of the wrapped form
    /// crypto-shreds the records (DR4).
    pub fn new_data_key(&self, key_id: &str) -> Result<(DataKey, Vec<u8>), CryptoError> {
        let dek = DataKey {
            key: random_bytes()?,
        };
        let wrapped = self.wrap_data_key(key_id, &dek)?;
        Ok((dek, wrapped))
    }

    /// Wraps an existing data key under this hierarchy's KEK (used for rotation: unwrap
    /// with the old hierarchy, wrap with the new one, records stay as they are).
    pub fn wrap_data_key(&self, key_id: &str, dek: &DataKey) -> Result<Vec<u8>, CryptoError> {
        self.wrap_current(key_id, dek)
    }

    /// Unwraps a data key. A wrong `key_id`, a different master key or any changed byte
    /// gives [`CryptoError::Integrity`].
    pub fn unwrap_data_key(&self, key_id: &str, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        self.unwrap_any(key_id, wrapped)
    }

    /// The blind-index key of one search field, e.g. scope `"Patient.identifier"`:
    /// `HKDF-Expand(blind_root, LABEL_BLIND_SCOPE_PREFIX ‖ scope)`. Tokens of different
    /// scopes are unrelated, so equal values in different fields cannot be linked.
    pub fn blind_index_key(&self, scope: &str) -> BlindIndexKey {
        let key = hkdf_expand(
            &self.blind_root,
            &[LABEL_BLIND_SCOPE_PREFIX.as_bytes(), scope.as_bytes()],
        );
        BlindIndexKey { key: *key }
    }

    /// A 256-bit key for another server-internal purpose (cursor MACs, CSRF tokens, ...):
    /// `HKDF-Expand(PRK, LABEL_SUBKEY_PREFIX ‖ label)`. Use a distinct, versioned label per
    /// purpose, e.g. `"search-cursor-mac-v1"`.
    pub fn derive_subkey(&self, label: &str) -> Secret<[u8; 32]> {
        let key = hkdf_expand(
            &self.prk,
            &[LABEL_SUBKEY_PREFIX.as_bytes(), label.as_bytes()],
        );
        Secret::new(*key)
    }

    /// Seals a small secret (e.g. a PKCS#8 signing key) for storage in the data directory:
    /// AES-256-GCM under `HKDF(master, LABEL_SEALED_SECRET)`, the label bound as associated
    /// data. Output `[1][nonce 12][ciphertext ‖ tag 16]`. Counted (`secret`): at most
    /// [`crate::SEAL_LIMIT`] seals ([`CryptoError::SealLimit`] beyond).
    pub fn seal_secret(&self, label: &str, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if plaintext.len() > crate::MAX_PLAINTEXT_LEN {
            return Err(CryptoError::TooLarge {
                len: plaintext.len(),
                max: crate::MAX_PLAINTEXT_LEN,
            });
        }
        self.seals.take("secret")?;
        aead_seal(
            &self.secret_key,
            WRAP_FORMAT_V1,
            &secret_aad(label),
            plaintext,
        )
    }

    /// Opens what [`KeyHierarchy::seal_secret`] sealed under the same label; anything else
    /// is [`CryptoError::Integrity`].
    pub fn open_secret(&self, label: &str, sealed: &[u8]) -> Result<Secret<Vec<u8>>, CryptoError> {
        let mut plain = aead_open(&self.secret_key, WRAP_FORMAT_V1, &secret_aad(label), sealed)?;
        Ok(Secret::new(std::mem::take(&mut *plain)))
    }
}

pub(crate) fn dek_aad(key_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(1 + 8 + DEK_AAD_LABEL.len() + 8 + key_id.len());
    aad.push(WRAP_FORMAT_V1);
    push_lp(&mut aad, DEK_AAD_LABEL.as_bytes());
    push_lp(&mut aad, key_id.as_bytes());
    aad
}

fn secret_aad(label: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(1 + 8 + LABEL_SEALED_SECRET.len() + 8 + label.len());
    aad.push(WRAP_FORMAT_V1);
    push_lp(&mut aad, LABEL_SEALED_SECRET.as_bytes());
    push_lp(&mut aad, label.as_bytes());
    aad
}

// ---------------------------------------------------------------------------------------
// Data keys and blind-index keys

/// A per-patient data key (AES-256-GCM). `Clone` copies 32 bytes; every copy is zeroized
/// on drop. `Debug` prints `[redacted]`. See [`DataKey::seal`] and [`DataKey::open`].
#[derive(Clone, ZeroizeOnDrop)]
pub struct DataKey {
    pub(crate) key: [u8; 32],
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

/// The key of one blind index (DR3).
#[derive(Clone, ZeroizeOnDrop)]
pub struct BlindIndexKey {
    key: [u8; 32],
}

impl fmt::Debug for BlindIndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlindIndexKey([redacted])")
    }
}

impl BlindIndexKey {
    /// The blind-index token of an already normalized value:
    /// `HMAC-SHA256(key, value)` truncated to its first 128 bits.
    ///
    /// Why 128 bits: truncating HMAC is sound (RFC 2104 §5, NIST SP 800-107r1 §5.3.3); 128
    /// bits keep accidental collisions negligible (about 2⁻⁶⁴ even after 2³² distinct values
    /// in one field) and offline guessing of the key infeasible, while halving index size.
    /// Tokens are deterministic by design, so they reveal equality (and frequency) of values
    /// within one field — that is what the coincidence-count check of DR3 watches.
    /// Normalization (case folding, trimming, date bucketing) is the caller's job and must be
    /// identical at write and search time.
    pub fn token(&self, normalized_value: &[u8]) -> [u8; 16] {
        let tag = hmac_sha256(&self.key, &[normalized_value]);
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag[..16]);
        out
    }

    /// A prepared form of this key for many tokens (the HMAC key schedule computed once).
    pub fn truncating(&self, bits: u32) -> TruncatedIndexKey {
        TruncatedIndexKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, &self.key),
            bits: bits.clamp(1, 128),
        }
    }
}

/// A blind-index key that emits tokens truncated to a fixed number of bits, so that
/// distinct values deliberately share tokens (the *coincidence* of DR3): an attacker who
/// sees two rows with one token cannot tell whether their values are equal. Searches
/// treat a token hit as a candidate and confirm it on the decrypted record.
pub struct TruncatedIndexKey {
    key: hmac::Key,
    bits: u32,
}

impl fmt::Debug for TruncatedIndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TruncatedIndexKey([redacted], {} bits)", self.bits)
    }
}

impl TruncatedIndexKey {
    /// Token width in bits.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// `HMAC-SHA256(key, term)` truncated to [`Self::bits`] bits, as `ceil(bits / 8)` bytes
    /// with the unused low bits of the last byte cleared.
    pub fn token(&self, term: &[u8]) -> Vec<u8> {
        let tag = hmac::sign(&self.key, term);
        let n = self.bits.div_ceil(8) as usize;
        let mut out = tag.as_ref()[..n].to_vec();
        let spare = (n as u32) * 8 - self.bits;
        if let Some(last) = out.last_mut() {
            *last &= 0xffu8 << spare;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hierarchy(byte: u8) -> KeyHierarchy {
        KeyHierarchy::new(&MasterKey::from_bytes(&[byte; 32]))
    }

    #[test]
    fn hkdf_matches_ring_hkdf() {
        let ikm = [0x0b_u8; 22];
        let salt = [0x05_u8; 13];
        let info = b"some info";
        let ours = hkdf_expand(&hkdf_extract(&salt, &ikm), &[&info[..5], &info[5..]]);
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &salt).extract(&ikm);
        let info_parts = [&info[..]];
        let okm = prk
            .expand(&info_parts, ring::hkdf::HKDF_SHA256)
            .expect("32 bytes is a valid HKDF length");
        let mut theirs = [0u8; 32];
        okm.fill(&mut theirs).expect("fill");
        assert_eq!(*ours, theirs);
    }

    #[test]
    fn hkdf_rfc5869_case_1() {
        // RFC 5869 A.1: first 32 of the 42 OKM bytes.
        let ikm = [0x0b_u8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let okm = hkdf_expand(&hkdf_extract(&salt, &ikm), &[&info]);
        let expected = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf";
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }

    #[test]
    fn derived_keys_are_distinct() {
        let h = hierarchy(1);
        let keys = [
            h.prk,
            **h.keks.read().expect("ring").keys_for_test(0),
            h.kek_wrap,
            h.cursor_root,
            h.blind_root,
            h.secret_key,
            h.kcv,
            h.blind_index_key("Patient.identifier").key,
            *h.derive_subkey("x").expose(),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn key_check_value_detects_wrong_master() {
        let a = hierarchy(1);
        let b = hierarchy(2);
        assert_eq!(a.key_check_value(), hierarchy(1).key_check_value());
        assert_ne!(a.key_check_value(), b.key_check_value());
        assert!(a.verify_key_check_value(&a.key_check_value()));
        assert!(!b.verify_key_check_value(&a.key_check_value()));
        assert!(!a.verify_key_check_value(&a.key_check_value()[..31]));
    }

    #[test]
    fn wrap_unwrap_round_trip_and_failures() {
        let h = hierarchy(1);
        let (dek, wrapped) = h.new_data_key("patient-123").expect("new key");
        assert_eq!(wrapped.len(), WRAPPED_DATA_KEY_LEN);
        let back = h.unwrap_data_key("patient-123", &wrapped).expect("unwrap");
        assert_eq!(back.key, dek.key);

        assert!(matches!(
            h.unwrap_data_key("patient-124", &wrapped),
            Err(CryptoError::Integrity)
        ));
        assert!(matches!(
            hierarchy(2).unwrap_data_key("patient-123", &wrapped),
            Err(CryptoError::Integrity)
        ));
        for i in 0..wrapped.len() {
            let mut w = wrapped.clone();
            w[i] ^= 0x01;
            assert!(
                matches!(
                    h.unwrap_data_key("patient-123", &w),
                    Err(CryptoError::Integrity)
                ),
                "flip at {i}"
            );
        }
        assert!(matches!(
            h.unwrap_data_key("patient-123", &wrapped[..wrapped.len() - 1]),
            Err(CryptoError::Integrity)
        ));
        assert!(matches!(
            h.unwrap_data_key("patient-123", &[]),
            Err(CryptoError::Integrity)
        ));
    }

    #[test]
    fn rewrap_under_new_master() {
        let old = hierarchy(1);
        let new = hierarchy(2);
        let (dek, wrapped) = old.new_data_key("p").expect("new key");
        let unwrapped = old.unwrap_data_key("p", &wrapped).expect("unwrap");
        let rewrapped = new.wrap_data_key("p", &unwrapped).expect("wrap");
        assert_eq!(
            new.unwrap_data_key("p", &rewrapped).expect("unwrap").key,
            dek.key
        );
        assert!(old.unwrap_data_key("p", &rewrapped).is_err());
    }

    #[test]
    fn fresh_data_keys_differ() {
        let h = hierarchy(1);
        let (a, wa) = h.new_data_key("p").expect("key");
        let (b, wb) = h.new_data_key("p").expect("key");
        assert_ne!(a.key, b.key);
        assert_ne!(wa, wb);
    }

    #[test]
    fn truncated_tokens() {
        let h = hierarchy(3);
        let k = h.blind_index_key("Patient.family");
        let t12 = k.truncating(12);
        let a = t12.token(b"=smith");
        assert_eq!(a.len(), 2);
        assert_eq!(a[1] & 0x0f, 0, "unused bits cleared");
        assert_eq!(
            &a[..1],
            &k.token(b"=smith")[..1],
            "a prefix of the full token"
        );
        assert_eq!(t12.token(b"=smith"), a);
        assert_eq!(k.truncating(16).token(b"=smith").len(), 2);
        assert_eq!(k.truncating(17).token(b"=smith").len(), 3);
        // with 4 bits, 200 distinct values fall into at most 16 tokens
        let t4 = k.truncating(4);
        let set: std::collections::HashSet<Vec<u8>> = (0..200)
            .map(|i| t4.token(format!("v{i}").as_bytes()))
            .collect();
        assert!(set.len() <= 16);
        assert!(format!("{t4:?}").contains("redacted"));
    }

    #[test]
    fn blind_index_properties() {
        let h1 = hierarchy(1);
        let h2 = hierarchy(2);
        let k = h1.blind_index_key("Patient.identifier");
        let t = k.token(b"urn:oid:2.16.840.1.113883.4.1|123456789");
        assert_eq!(
            t,
            h1.blind_index_key("Patient.identifier")
                .token(b"urn:oid:2.16.840.1.113883.4.1|123456789"),
            "deterministic per key"
        );
        assert_ne!(t, k.token(b"urn:oid:2.16.840.1.113883.4.1|123456788"));
        assert_ne!(
            t,
            h1.blind_index_key("Patient.telecom")
                .token(b"urn:oid:2.16.840.1.113883.4.1|123456789"),
            "differs across scopes"
        );
        assert_ne!(
            t,
            h2.blind_index_key("Patient.identifier")
                .token(b"urn:oid:2.16.840.1.113883.4.1|123456789"),
            "differs across master keys"
        );
        // Scope concatenation is unambiguous because the prefix is fixed.
        assert_ne!(h1.blind_index_key("ab").key, h1.blind_index_key("a").key);
    }

    #[test]
    fn subkeys_and_sealed_secrets() {
        let h = hierarchy(1);
        assert_eq!(
            h.derive_subkey("cursor").expose(),
            h.derive_subkey("cursor").expose()
        );
        assert_ne!(
            h.derive_subkey("cursor").expose(),
            h.derive_subkey("cursor2").expose()
        );
        assert_ne!(
            h.derive_subkey("cursor").expose(),
            hierarchy(2).derive_subkey("cursor").expose()
        );

        let sealed = h
            .seal_secret("token-signing-key", b"pkcs8 bytes")
            .expect("seal");
        assert_eq!(
            h.open_secret("token-signing-key", &sealed)
                .expect("open")
                .expose(),
            b"pkcs8 bytes"
        );
        assert!(matches!(
            h.open_secret("audit-signing-key", &sealed),
            Err(CryptoError::Integrity)
        ));
        assert!(matches!(
            hierarchy(2).open_secret("token-signing-key", &sealed),
            Err(CryptoError::Integrity)
        ));
        let mut bad = sealed.clone();
        bad[0] = 2;
        assert!(matches!(
            h.open_secret("token-signing-key", &bad),
            Err(CryptoError::Integrity)
        ));
    }

    #[test]
    fn debug_is_redacted() {
        let m = MasterKey::from_bytes(&[0x41; 32]);
        let h = KeyHierarchy::new(&m);
        let (dek, _) = h.new_data_key("p").expect("key");
        for s in [
            format!("{m:?}"),
            format!("{h:?}"),
            format!("{dek:?}"),
            format!("{:?}", h.blind_index_key("x")),
            format!("{:?}", h.derive_subkey("x")),
        ] {
            assert!(s.contains("[redacted]"), "{s}");
            assert!(
                !s.contains("65") && !s.contains("0x41") && !s.contains("AAAA"),
                "{s}"
            );
        }
    }

    #[test]
    fn key_file_round_trip_and_policy() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("master.key");
        let m = MasterKey::generate().expect("rng");
        m.write_new_key_file(&path).expect("write");

        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("phivault-master-key-v1:"));
        assert!(text.ends_with('\n'));
        assert_eq!(text.len(), "phivault-master-key-v1:".len() + 44 + 1);

        let loaded = MasterKey::load_key_file(&path).expect("0600 accepted");
        assert_eq!(loaded.bytes, m.bytes);

        // Existing file not overwritten.
        let other = MasterKey::generate().expect("rng");
        assert!(matches!(
            other.write_new_key_file(&path),
            Err(CryptoError::KeyFileExists)
        ));
        assert_eq!(
            MasterKey::load_key_file(&path).expect("load").bytes,
            m.bytes
        );

        // 0644 refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        match MasterKey::load_key_file(&path) {
            Err(CryptoError::InsecureKeyFile { mode, path: p }) => {
                assert_eq!(mode, 0o644);
                assert_eq!(p, path);
            }
            other => panic!("expected InsecureKeyFile, got {other:?}"),
        }
    }

    #[test]
    fn key_file_strict_format() {
        let good = {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("k");
            MasterKey::from_bytes(&[7; 32])
                .write_new_key_file(&path)
                .expect("write");
            std::fs::read(&path).expect("read")
        };
        assert_eq!(MasterKey::parse_key_file(&good).expect("ok").bytes, [7; 32]);
        let no_newline = &good[..good.len() - 1];
        assert_eq!(
            MasterKey::parse_key_file(no_newline).expect("ok").bytes,
            [7; 32]
        );

        let mut crlf = no_newline.to_vec();
        crlf.extend_from_slice(b"\r\n");
        let mut two_newlines = good.clone();
        two_newlines.push(b'\n');
        let mut leading_space = b" ".to_vec();
        leading_space.extend_from_slice(&good);
        let v2 = String::from_utf8(good.clone())
            .expect("ascii")
            .replace("-v1:", "-v2:");
        let short = format!("phivault-master-key-v1:{}\n", "A".repeat(40) + "AA==");
        let long = format!("phivault-master-key-v1:{}\n", "A".repeat(48));
        let bad_char = format!("phivault-master-key-v1:{}=\n", "A".repeat(42) + "*");
        // Non-canonical trailing bits in the last character.
        let noncanon = format!("phivault-master-key-v1:{}=\n", "A".repeat(42) + "B");
        for bad in [
            &crlf[..],
            &two_newlines[..],
            &leading_space[..],
            v2.as_bytes(),
            short.as_bytes(),
            long.as_bytes(),
            bad_char.as_bytes(),
            noncanon.as_bytes(),
            b"",
            b"\n",
        ] {
            assert!(
                matches!(
                    MasterKey::parse_key_file(bad),
                    Err(CryptoError::InvalidKey(_))
                ),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn load_missing_file_is_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            MasterKey::load_key_file(&dir.path().join("absent")),
            Err(CryptoError::Io(_))
        ));
    }
}
