//! Backups (issue 19): sealed objects on a target, a signed manifest, the write-ahead log
//! shipped continuously, and restores that trust only what the manifest names.
//!
//! - [`target`]: where objects go (`file://`, `s3://`).
//! - [`periods`]: the month keys kept with the key provider.
//! - [`objects`]: what is uploaded (kinds, names, sealing, digests).
//! - [`pages`]: the bodies — a batch of committed pages, a database snapshot in parts.
//! - [`manifest`]: the signed, hash-chained list of restore points and the erasure ledger.
//! - [`ship`]: the server's shipper (segments, snapshots, manifests, retention).
//! - [`restore`]: reading it back: the newest manifest, a point, the database rebuilt.
#![forbid(unsafe_code)]

use std::path::Path;

pub mod manifest;
pub mod objects;
pub mod pages;
pub mod periods;
pub mod restore;
pub mod retention;
pub mod ship;
pub mod target;

pub use target::TargetError;

/// A backup or restore failure, said plainly; no message carries key material, PHI or an
/// object's bytes.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Settings or local files unusable.
    #[error("{0}")]
    Config(String),
    /// What a restore refuses: a missing, changed, foreign or rolled-back object.
    #[error("{0}")]
    Refused(String),
    /// The store could not be read (a snapshot, the tap).
    #[error("store: {0}")]
    Store(String),
}

impl BackupError {
    pub(crate) fn io(path: &Path, e: &std::io::Error) -> Self {
        BackupError::Config(format!("{}: {e}", path.display()))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The month (`YYYY-MM`, UTC) of a time in ms since the epoch.
pub fn period_of(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

/// RFC 3339 (UTC, milliseconds: restore points are that fine) of a time in ms since the
/// epoch.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}
