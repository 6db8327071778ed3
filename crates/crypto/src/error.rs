//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `phivault-crypto`.
///
/// Messages never contain key material or plaintext. Callers that show errors to
/// remote clients must still map them to a generic message: [`CryptoError::Integrity`]
/// in particular is deliberately uninformative (it does not say *which* check failed),
/// so it cannot be used as an oracle.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// Authentication of a sealed blob (record, wrapped key or sealed secret) failed,
    /// or its framing, version or compressed payload is malformed. Any of: wrong key,
    /// wrong associated data, tampering, truncation, unknown format version.
    #[error("ciphertext failed authentication")]
    Integrity,

    /// A key or secret file is readable or writable by group or others.
    #[error(
        "insecure permissions {mode:#o} on secret file {path}: it must be readable by its owner only; run `chmod 600 {path}`",
        path = path.display()
    )]
    InsecureKeyFile {
        /// The offending file.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },

    /// A key or secret file is a symlink, directory, device or anything but a regular file.
    #[error("secret file {path} is not a regular file (symlinks are refused)", path = path.display())]
    NotRegularFile {
        /// The offending path.
        path: PathBuf,
    },

    /// Refused to overwrite an existing key or secret file.
    #[error("the key file already exists; refusing to overwrite it")]
    KeyFileExists,

    /// An I/O error while reading or writing a key or secret file.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),

    /// Key material (or a key file) is malformed; the string says what is wrong,
    /// never what the bytes were.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),

    /// An argument is outside what this crate accepts (for example a token that is too short).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),

    /// A plaintext is larger than [`crate::MAX_PLAINTEXT_LEN`] and could never be opened again.
    #[error("plaintext of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the rejected plaintext.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Rng,

    /// zstd failed while compressing (decompression failures are [`CryptoError::Integrity`]).
    #[error("compression failed")]
    Compression,

    /// A key reached the most messages it may seal with random nonces
    /// ([`crate::SEAL_LIMIT`]), or the reservation of further seals could not be made
    /// durable: rotate the key (or wait for the next day's cursor key).
    #[error("the key has sealed as many messages as it may; rotate it")]
    SealLimit,

    /// Generating a certificate or its key failed.
    #[error("certificate generation failed: {0}")]
    Pki(String),
}
