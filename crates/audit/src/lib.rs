#![forbid(unsafe_code)]
//! Append-only audit events and their tamper-evident hash chain.
//!
//! Every access to PHI produces an [`AuditEvent`]. Events are encoded canonically
//! ([`AuditEvent::encode`]) and chained: the hash of event *n* covers the hash of
//! event *n-1*, its sequence number and its bytes, with a domain-separation prefix
//! so a chain hash can never be confused with any other hash the system computes.
//! The head of the chain (size and hash) is signed by the server's audit key, so
//! truncating the log is detected as well as editing, deleting, inserting or
//! reordering events ([`verify_chain`]).
//!
//! This crate knows nothing of HTTP or storage engines: the store persists the
//! bytes and the hashes this crate computes; `phivault audit verify` feeds them back.

use ring::digest;
use serde::{Deserialize, Serialize};

/// Domain-separation label of chain hashes.
const CHAIN_DOMAIN: &[u8] = b"phivault-audit-chain-v1\0";
/// Domain-separation label of signed heads.
const HEAD_DOMAIN: &[u8] = b"phivault-audit-head-v1\0";

/// The hash that precedes the first event.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// What was done (FHIR AuditEvent.action).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// create
    C,
    /// read / vread / history / search
    R,
    /// update
    U,
    /// delete
    D,
    /// execute (batch, transaction, token issuance, other operations)
    E,
}

/// How it ended (FHIR AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure, 12 major failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// AuditEvent outcome code.
    pub code: u8,
    /// HTTP status the client received.
    pub http_status: u16,
}

impl Outcome {
    /// Outcome for an HTTP status.
    pub fn from_http(status: u16) -> Self {
        let code = match status {
            200..=399 => 0,
            400..=499 => 4,
            _ => 8,
        };
        Outcome {
            code,
            http_status: status,
        }
    }
}

/// One audit record: who, what, which patient, when, from where, how it ended.
///
/// Holds identifiers only (server-assigned resource ids, client ids, addresses) — never
/// resource content, names or query strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Request id (also returned to the client as `X-Request-Id`).
    pub request_id: String,
    /// Authenticated client id, or `None` for requests that failed authentication.
    pub client_id: Option<String>,
    /// Action category.
    pub action: Action,
    /// FHIR interaction name (read, vread, create, update, delete, history-instance, history-type, batch, transaction, token, ...).
    pub interaction: String,
    /// Resource type touched, if any.
    pub resource_type: Option<String>,
    /// Resource id touched, if any.
    pub resource_id: Option<String>,
    /// Resource version touched, if any.
    pub version: Option<u64>,
    /// Patient whose compartment holds the resource, if any.
    pub patient: Option<String>,
    /// Outcome.
    pub outcome: Outcome,
    /// Source network address of the client.
    pub source: String,
}

impl AuditEvent {
    /// Canonical encoding: compact JSON with the struct's fixed field order.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of plain fields to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decode stored bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, AuditError> {
        serde_json::from_slice(bytes).map_err(|_| AuditError::Malformed)
    }
}

/// Errors of this crate.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    /// Stored event bytes do not decode.
    #[error("audit event is malformed")]
    Malformed,
}

/// The chain hash of event `seq` (1-based) with canonical bytes `event`, following `prev`.
pub fn chain_hash(prev: &[u8; 32], seq: u64, event: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(CHAIN_DOMAIN);
    ctx.update(prev);
    ctx.update(&seq.to_be_bytes());
    ctx.update(&(event.len() as u64).to_be_bytes());
    ctx.update(event);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The head of the chain: how many events, and the hash of the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// Number of events.
    pub size: u64,
    /// Chain hash of the last event ([`GENESIS`] when empty).
    pub hash: [u8; 32],
}

impl ChainHead {
    /// The empty chain.
    pub const EMPTY: ChainHead = ChainHead {
        size: 0,
        hash: GENESIS,
    };

    /// Extend the head by one event, returning the new event's hash.
    pub fn append(&mut self, event: &[u8]) -> [u8; 32] {
        self.size += 1;
        self.hash = chain_hash(&self.hash, self.size, event);
        self.hash
    }

    /// The message the audit key signs for this head.
    pub fn signing_message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(HEAD_DOMAIN.len() + 40);
        m.extend_from_slice(HEAD_DOMAIN);
        m.extend_from_slice(&self.size.to_be_bytes());
        m.extend_from_slice(&self.hash);
        m
    }
}

/// One stored audit row as read back for verification.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Sequence number as stored.
    pub seq: u64,
    /// Event bytes as stored.
    pub event: Vec<u8>,
    /// Chain hash as stored.
    pub hash: Vec<u8>,
}

/// Why verification failed, and where.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The row at this position does not carry the expected sequence number (a row was deleted or inserted).
    #[error(
        "audit event at position {position}: sequence number {found} where {position} was expected (event deleted or inserted)"
    )]
    Sequence {
        /// 1-based position in the log.
        position: u64,
        /// Sequence number found there.
        found: u64,
    },
    /// The row's hash does not match its content and predecessor (edited, inserted or reordered).
    #[error(
        "audit event at position {position}: hash mismatch (event edited, inserted or reordered)"
    )]
    Hash {
        /// 1-based position.
        position: u64,
    },
    /// The event bytes do not decode.
    #[error("audit event at position {position}: malformed event")]
    Malformed {
        /// 1-based position.
        position: u64,
    },
    /// The log ends before or after the signed head.
    #[error(
        "audit log has {found} events but the signed head covers {signed} (events removed from or appended to the end)"
    )]
    Length {
        /// Size in the signed head.
        signed: u64,
        /// Size found.
        found: u64,
    },
    /// The last hash differs from the signed head.
    #[error("audit event at position {position}: does not match the signed head")]
    Head {
        /// Position of the signed head.
        position: u64,
    },
    /// The head's signature is invalid.
    #[error("the signed audit head has an invalid signature")]
    Signature,
    /// Reading the log failed.
    #[error("reading the audit log failed at position {position}")]
    Read {
        /// Position at which reading failed.
        position: u64,
    },
}

/// Incremental verifier: feed rows in sequence order, then [`ChainVerifier::finish`].
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    head: ChainHead,
    signed: Option<ChainHead>,
}

impl ChainVerifier {
    /// Start verifying against `signed_head`, whose signature the caller already checked
    /// (see [`verify_head_signature`]).
    pub fn new(signed_head: Option<ChainHead>) -> Self {
        ChainVerifier {
            head: ChainHead::EMPTY,
            signed: signed_head,
        }
    }

    /// Check the next row.
    pub fn push(&mut self, row: &StoredEvent) -> Result<(), VerifyError> {
        let position = self.head.size + 1;
        if row.seq != position {
            return Err(VerifyError::Sequence {
                position,
                found: row.seq,
            });
        }
        if AuditEvent::decode(&row.event).is_err() {
            return Err(VerifyError::Malformed { position });
        }
        let expected = self.head.append(&row.event);
        if row.hash.as_slice() != expected.as_slice() {
            return Err(VerifyError::Hash { position });
        }
        if let Some(signed) = self.signed
            && signed.size == position
            && signed.hash != expected
        {
            return Err(VerifyError::Head { position });
        }
        Ok(())
    }

    /// Events verified so far.
    pub fn size(&self) -> u64 {
        self.head.size
    }

    /// Finish: the log must end exactly at the signed head.
    pub fn finish(self) -> Result<ChainHead, VerifyError> {
        if let Some(signed) = self.signed
            && signed.size != self.head.size
        {
            return Err(VerifyError::Length {
                signed: signed.size,
                found: self.head.size,
            });
        }
        Ok(self.head)
    }
}

/// Verify a whole log read in sequence order against a signed head.
///
/// `signed_head` is the (size, hash) whose signature the caller already checked
/// (see [`verify_head_signature`]). Returns the recomputed head.
pub fn verify_chain<E>(
    rows: impl IntoIterator<Item = Result<StoredEvent, E>>,
    signed_head: Option<ChainHead>,
) -> Result<ChainHead, VerifyError> {
    let mut v = ChainVerifier::new(signed_head);
    for row in rows {
        let row = row.map_err(|_| VerifyError::Read {
            position: v.size() + 1,
        })?;
        v.push(&row)?;
    }
    v.finish()
}

/// Check an Ed25519 signature over a head.
pub fn verify_head_signature(head: &ChainHead, public_key: &[u8; 32], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(&head.signing_message(), signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            time_ms: 1_700_000_000_000 + i,
            request_id: format!("req-{i}"),
            client_id: Some("client-a".into()),
            action: Action::R,
            interaction: "read".into(),
            resource_type: Some("Patient".into()),
            resource_id: Some(format!("id-{i}")),
            version: Some(1),
            patient: Some(format!("id-{i}")),
            outcome: Outcome::from_http(200),
            source: "127.0.0.1".into(),
        }
    }

    fn log(n: u64) -> (Vec<StoredEvent>, ChainHead) {
        let mut head = ChainHead::EMPTY;
        let rows = (1..=n)
            .map(|i| {
                let bytes = event(i).encode();
                let hash = head.append(&bytes);
                StoredEvent {
                    seq: i,
                    event: bytes,
                    hash: hash.to_vec(),
                }
            })
            .collect();
        (rows, head)
    }

    fn check(rows: Vec<StoredEvent>, head: ChainHead) -> Result<ChainHead, VerifyError> {
        verify_chain(rows.into_iter().map(Ok::<_, ()>), Some(head))
    }

    #[test]
    fn intact_log_verifies() {
        let (rows, head) = log(10);
        assert_eq!(check(rows, head), Ok(head));
    }

    #[test]
    fn edit_is_found_at_its_position() {
        let (mut rows, head) = log(10);
        let mut e = AuditEvent::decode(&rows[4].event).unwrap();
        e.outcome = Outcome::from_http(403);
        rows[4].event = e.encode();
        assert_eq!(check(rows, head), Err(VerifyError::Hash { position: 5 }));
    }

    #[test]
    fn deletion_is_found() {
        let (mut rows, head) = log(10);
        rows.remove(3);
        assert_eq!(
            check(rows, head),
            Err(VerifyError::Sequence {
                position: 4,
                found: 5
            })
        );
    }

    #[test]
    fn deletion_with_renumbering_is_found() {
        let (mut rows, head) = log(10);
        rows.remove(3);
        for (i, r) in rows.iter_mut().enumerate() {
            r.seq = i as u64 + 1;
        }
        assert_eq!(check(rows, head), Err(VerifyError::Hash { position: 4 }));
    }

    #[test]
    fn reorder_is_found() {
        let (mut rows, head) = log(10);
        rows.swap(2, 3);
        let (a, b) = (rows[2].seq, rows[3].seq);
        rows[2].seq = b;
        rows[3].seq = a;
        assert_eq!(check(rows, head), Err(VerifyError::Hash { position: 3 }));
    }

    #[test]
    fn insertion_is_found() {
        let (mut rows, head) = log(10);
        let forged = event(99).encode();
        rows.insert(
            6,
            StoredEvent {
                seq: 7,
                event: forged,
                hash: vec![0; 32],
            },
        );
        for (i, r) in rows.iter_mut().enumerate() {
            r.seq = i as u64 + 1;
        }
        assert_eq!(check(rows, head), Err(VerifyError::Hash { position: 7 }));
    }

    #[test]
    fn truncation_is_found() {
        let (mut rows, head) = log(10);
        rows.truncate(8);
        assert_eq!(
            check(rows, head),
            Err(VerifyError::Length {
                signed: 10,
                found: 8
            })
        );
    }

    #[test]
    fn head_signature() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use ring::signature::KeyPair;
        let mut pk = [0u8; 32];
        pk.copy_from_slice(kp.public_key().as_ref());
        let (_, head) = log(3);
        let sig = kp.sign(&head.signing_message());
        assert!(verify_head_signature(&head, &pk, sig.as_ref()));
        let other = ChainHead {
            size: 2,
            hash: head.hash,
        };
        assert!(!verify_head_signature(&other, &pk, sig.as_ref()));
    }
}
