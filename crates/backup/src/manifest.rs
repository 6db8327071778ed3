//! The manifest: the signed, hash-chained list of what a restore may use.
//!
//! Each manifest names every object it relies on with its SHA-256: per **epoch** (one run
//! of the shipper over an unbroken stream of commits) the snapshots (their parts), the
//! segment indexes (each listing up to [`INDEX_SPAN`] segment points) and the newest
//! segment points not yet in an index; and the **erasure ledger** (HMACs of every key id
//! ever erased). It is signed with the data directory's audit key (Ed25519), carries the
//! previous manifest's digest (`prev`), and is numbered: a restore refuses a manifest older
//! than one it has seen. Segments shipped after the newest manifest are found by their
//! computed names and accepted only if they chain (`prev`) from the last one it names.

use std::collections::BTreeSet;

use phivault_crypto::SigningKey;
use serde::{Deserialize, Serialize};

use crate::BackupError;

/// Segment points per index object.
pub const INDEX_SPAN: usize = 256;
/// The manifest format.
pub const FORMAT: u32 = 1;

/// An object a manifest relies on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjRef {
    pub name: String,
    /// Hex SHA-256 of the sealed object.
    pub digest: String,
    pub size: u64,
    /// The month it was sealed in (`YYYY-MM`).
    pub period: String,
}

/// One segment: a restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegPoint {
    pub seq: u64,
    pub obj: ObjRef,
    pub first_commit: u64,
    pub last_commit: u64,
    pub time_ms: i64,
    pub audit_size: u64,
    pub resources: u64,
}

/// A database snapshot: a restore point, and the base of the epoch's later points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its number in the epoch.
    pub no: u64,
    pub parts: Vec<ObjRef>,
    /// The last commit it includes.
    pub commit: u64,
    pub time_ms: i64,
    pub audit_size: u64,
    pub resources: u64,
    /// The database file's size.
    pub db_bytes: u64,
}

/// An index object: a run of an epoch's segment points, with their range (so retention
/// and restores know what it covers without reading it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRef {
    pub obj: ObjRef,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ms: i64,
    pub last_ms: i64,
    pub last_commit: u64,
    /// The months its segments were sealed in.
    pub periods: BTreeSet<String>,
}

/// One unbroken stream of commits (one run of the shipper, until the tap could not vouch
/// for the stream): its segments form one chain, its snapshots are points of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    pub id: u64,
    pub started_ms: i64,
    /// Its first segment's number (segments are numbered across epochs).
    pub first_segment: u64,
    pub snapshots: Vec<Snapshot>,
    /// Index objects of its older segment points, in order.
    pub indexes: Vec<IndexRef>,
    /// Its newest segment points (fewer than [`INDEX_SPAN`]).
    pub tail: Vec<SegPoint>,
    /// Segments before this number were removed by retention (their points are gone).
    pub kept_from: u64,
    /// No segment will be added (another epoch followed).
    pub ended: bool,
}

impl Epoch {
    pub fn new(id: u64, started_ms: i64, first_segment: u64) -> Self {
        Epoch {
            id,
            started_ms,
            first_segment,
            snapshots: Vec::new(),
            indexes: Vec::new(),
            tail: Vec::new(),
            kept_from: first_segment,
            ended: false,
        }
    }
}

/// A manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub deployment: String,
    pub seq: u64,
    /// Hex SHA-256 of the previous manifest object.
    pub prev: Option<String>,
    pub written_ms: i64,
    /// The next segment's number.
    pub next_segment: u64,
    /// Manifests before this number were removed (retention).
    pub manifests_kept_from: u64,
    /// Every 1,000th manifest's number and time (retention finds which are old).
    pub manifest_marks: Vec<(u64, i64)>,
    pub epochs: Vec<Epoch>,
    /// HMACs of every key id erased (hex), see [`phivault_crypto::backup::BackupKeys::ledger_tag`].
    pub erased: BTreeSet<String>,
    /// The data directory that wrote it (its backup instance id): one writer a target.
    #[serde(default)]
    pub writer: String,
}

impl Manifest {
    /// The first manifest of a deployment.
    pub fn genesis(deployment: &str) -> Self {
        Manifest {
            format: FORMAT,
            deployment: deployment.to_owned(),
            seq: 0,
            prev: None,
            written_ms: 0,
            next_segment: 1,
            manifests_kept_from: 1,
            manifest_marks: Vec::new(),
            epochs: Vec::new(),
            erased: BTreeSet::new(),
            writer: String::new(),
        }
    }

    /// The signed body: `len (8) ‖ JSON ‖ Ed25519 signature (64)`.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, BackupError> {
        let json = serde_json::to_vec(self)
            .map_err(|e| BackupError::Config(format!("cannot encode the manifest: {e}")))?;
        let sig = key.sign(&signed_message(&json));
        let mut out = Vec::with_capacity(8 + json.len() + 64);
        out.extend_from_slice(&(json.len() as u64).to_be_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&sig);
        Ok(out)
    }

    /// Check the signature with the audit key's public half and decode.
    pub fn verify(body: &[u8], public: &[u8; 32], what: &str) -> Result<Manifest, BackupError> {
        let bad = |why: &str| BackupError::Refused(format!("the manifest {what} {why}"));
        if body.len() < 8 + 64 {
            return Err(bad("is truncated"));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&body[..8]);
        let len = usize::try_from(u64::from_be_bytes(len)).map_err(|_| bad("is malformed"))?;
        if body.len() != 8 + len + 64 {
            return Err(bad("is malformed"));
        }
        let json = &body[8..8 + len];
        if !phivault_crypto::verify_ed25519(public, &signed_message(json), &body[8 + len..]) {
            return Err(bad("is not signed by this deployment's audit key"));
        }
        let m: Manifest = serde_json::from_slice(json).map_err(|_| bad("is malformed"))?;
        if m.format != FORMAT {
            return Err(bad("has an unknown format"));
        }
        Ok(m)
    }
}

fn signed_message(json: &[u8]) -> Vec<u8> {
    [b"phivault-backup-manifest-v1\0".as_slice(), json].concat()
}

/// The head: which manifest is the newest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub digest: String,
}

/// `deployment.json`: what a restore needs before it holds any key.
#[derive(Clone, Serialize, Deserialize)]
pub struct Deployment {
    pub format: u32,
    /// The data directory id.
    pub deployment: String,
    /// The files of the data directory's `keys/` (relative name, base64): the provider's
    /// record, a wrapped master key where the provider keeps one, and the sealed signing
    /// keys — each designed to be safe in a stolen copy of the directory.
    pub key_files: Vec<(String, String)>,
    /// Where the period keys are kept (the default for `restore --backup-keys`).
    pub backup_keys: String,
    pub created_ms: i64,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("deployment", &self.deployment)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_verifies_only_unchanged_and_under_its_key() {
        let pkcs8 = SigningKey::generate_pkcs8().expect("key");
        let key = SigningKey::from_pkcs8(pkcs8.expose()).expect("key");
        let mut m = Manifest::genesis("00112233445566778899aabbccddeeff");
        m.erased.insert("ab".into());
        let body = m.sign(&key).expect("sign");
        assert_eq!(
            Manifest::verify(&body, &key.public_key(), "1").expect("verify"),
            m
        );
        let mut changed = body.clone();
        changed[20] ^= 1;
        assert!(Manifest::verify(&changed, &key.public_key(), "1").is_err());
        let other =
            SigningKey::from_pkcs8(SigningKey::generate_pkcs8().expect("k").expose()).expect("k");
        assert!(Manifest::verify(&body, &other.public_key(), "1").is_err());
    }
}
