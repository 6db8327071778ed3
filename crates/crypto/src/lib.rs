//! Cryptography for phivault: everything that makes a leaked database, disk or backup
//! worthless without the master key.
//!
//! * [`MasterKey`] — 32 random bytes in a 0600 key file; the root of
//! * [`KeyHierarchy`] — HKDF-SHA256 derivations: the key-encryption key that wraps
//!   per-patient [`DataKey`]s (DR2), per-field [`BlindIndexKey`]s (DR3), a key check value
//!   (so a wrong master key is caught at start-up, DR5), sealed small secrets and subkeys;
//!   generations of the KEK and the daily cursor key (`kek.rs`), and seal counting for
//!   every key that seals with random nonces (`seals.rs`).
//! * [`DataKey::seal`] / [`DataKey::open`] — zstd + AES-256-GCM for every resource version,
//!   bound to ([`RecordAad`]) type, id, version and key id (DR1, invariant 4).
//! * [`SigningKey`] — Ed25519 for tokens and audit checkpoints; [`generate_dev_pki`] for
//!   `phivault init`.
//! * File helpers that create secret files owner-only and refuse to read them otherwise.
//! * [`jose`] — compact JWE (`dir` and `ECDH-ES`, `A256GCM`) for SMART Health Links and
//!   Bulk Data export files; [`stream`] — files sealed and opened in 64 KiB chunks.
//!
//! ring is the only cryptographic provider. Key material lives in types that zeroize on
//! drop and print `[redacted]`; ring's own key objects do not zeroize, so they are built
//! per operation and dropped immediately.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backup;
mod error;
mod files;
pub mod jose;
mod kek;
mod keys;
mod pki;
mod record;
mod seals;
mod secret;
mod sign;
pub mod stream;
mod util;

pub use error::CryptoError;
pub use files::{check_private_file, read_private_file, write_private_file};
pub use kek::{
    LABEL_CURSOR_DAY_PREFIX, LABEL_CURSOR_ROOT, LABEL_KEK_WRAP, WRAPPED_DATA_KEY_V2_LEN,
    data_key_generation, kek_generation_prefix,
};
pub use keys::{
    BlindIndexKey, DEK_AAD_LABEL, DataKey, HKDF_SALT, KCV_MESSAGE, KeyHierarchy, LABEL_BLIND_ROOT,
    LABEL_BLIND_SCOPE_PREFIX, LABEL_KCV, LABEL_KEK, LABEL_SEALED_SECRET, LABEL_SUBKEY_PREFIX,
    MasterKey, TruncatedIndexKey, WRAPPED_DATA_KEY_LEN,
};
pub use pki::{DEV_CA_VALIDITY_DAYS, DEV_SERVER_VALIDITY_DAYS, DevPki, generate_dev_pki};
pub use record::{
    MAX_PLAINTEXT_LEN, RECORD_AAD_LABEL, RECORD_FORMAT_V1, RECORD_FORMAT_V2, RecordAad, ZSTD_LEVEL,
};
pub use seals::{ReserveSeals, SEAL_LIMIT, SEAL_RESERVE_BLOCK};
pub use secret::Secret;
pub use sign::{SigningKey, verify_ed25519};
pub use stream::{SealedReader, SealedWriter};
pub use util::{MIN_TOKEN_BYTES, random_bytes, random_token_b64url, sha256};
