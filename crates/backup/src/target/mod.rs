//! Where backups go: a target named by a URL (`file:///ABS/PATH`,
//! `s3://BUCKET/PREFIX?endpoint=https://HOST:PORT&region=REGION`). Objects are opaque
//! bytes under names relative to the target's root; everything put is already sealed.

use std::path::Path;

pub mod file;
pub mod s3;

/// A target's failure. No message carries a credential, a signature or object bytes.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL or its options are unusable (refused before any request).
    #[error("backup target: {0}")]
    Config(String),
    /// The target could not be reached or answered with a server error (try again later).
    #[error("backup target unavailable: {0}")]
    Unavailable(String),
    /// The target refused the request (credentials, permissions, a missing bucket).
    #[error("backup target refused: {0}")]
    Refused(String),
    /// The object is under an Object Lock retention that has not expired.
    #[error("backup object {0} is locked")]
    Locked(String),
}

/// A place objects are put, read, listed and removed. Names are ASCII `[a-z0-9._/-]`,
/// at most 200 bytes, never starting with `/` nor containing `..`.
pub trait Target: Send + Sync {
    /// Store `body` under `name`, durably once this returns. With `retain_until` (seconds
    /// since the epoch) the object is put under Object Lock retention in compliance mode
    /// until then (S3 with a lock-enabled bucket; the file target ignores it).
    fn put(&self, name: &str, body: &[u8], retain_until: Option<u64>) -> Result<(), TargetError>;
    /// The object's bytes (its current version), or `None` when there is no such object.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, TargetError>;
    /// Every object under the target's root: (name, size), sorted by name.
    fn list(&self) -> Result<Vec<(String, u64)>, TargetError>;
    /// Remove the object (on a versioned bucket: a delete marker; the lock keeps the
    /// version until its retention ends and the bucket's lifecycle rule removes it).
    /// Removing an absent object succeeds.
    fn delete(&self, name: &str) -> Result<(), TargetError>;
    /// Whether the target keeps objects under Object Lock (an S3 bucket with it enabled).
    fn object_lock(&self) -> Result<bool, TargetError>;
    /// Every version the target still keeps of the object, newest first, the current one
    /// included (a versioned bucket keeps locked versions behind a delete marker or an
    /// overwrite). A target without versions answers the current object only.
    fn versions(&self, name: &str) -> Result<Vec<Vec<u8>>, TargetError> {
        Ok(self.get(name)?.into_iter().collect())
    }
    /// The target's URL without credentials, for messages.
    fn describe(&self) -> String;
}

/// Open the target a URL names; `ca_file` is a PEM file of CA certificates to trust for an
/// S3 endpoint (a private CA).
pub fn open(url: &str, ca_file: Option<&Path>) -> Result<Box<dyn Target>, TargetError> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Ok(Box::new(file::FileTarget::open(rest)?));
    }
    if url.starts_with("s3://") {
        return Ok(Box::new(s3::S3Target::open(url, ca_file)?));
    }
    Err(TargetError::Config(
        "a backup target is file:///ABSOLUTE/PATH or s3://BUCKET/PREFIX?endpoint=…&region=…".into(),
    ))
}

/// Whether `name` is an object name a target accepts.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('/')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b))
}

/// [`valid_name`], and no empty or `.` segment (`a//b`, `./a` would alias `a/b`, `a` in a
/// directory): the name check of both targets, as a [`TargetError::Config`].
pub(crate) fn check_name(name: &str) -> Result<(), TargetError> {
    if valid_name(name) && name.split('/').all(|s| !s.is_empty() && s != ".") {
        Ok(())
    } else {
        Err(TargetError::Config(format!(
            "{name:?} is not a backup object name ([a-z0-9._-] segments joined by /)"
        )))
    }
}
