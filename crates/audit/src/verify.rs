//! Offline verification of a whole audit log, as `phivault audit verify` runs it.
//!
//! [`verify_log`] reads everything from a [`Source`] (the store's signed head, its
//! checkpoints and its events, and the text of a witness file) and checks, in this order:
//!
//! 1. the signed head's signature (the audit key's), and that a log with events has one;
//! 2. every witness line is a checkpoint, and every checkpoint, stored or witnessed, is
//!    signed by the audit key;
//! 3. in one pass over the events: the hash chain up to the signed head
//!    ([`crate::ChainVerifier`]), and, with a [`merkle::Frontier`], that the Merkle root
//!    of the first `size` events is each checkpoint's root. Equal roots on one log also
//!    make the checkpoints consistent with each other;
//! 4. no checkpoint is beyond the end of the log (a rollback).
//!
//! The first failure is the verdict ([`Failure`]); a source that cannot be read is not a
//! verdict but the source's own error, passed through untouched. The data comes through a
//! small trait rather than a store type, so this crate stays free of storage engines;
//! [`Snapshot`] is the in-memory source.

use crate::merkle::{self, Checkpoint};
use crate::{ChainHead, ChainVerifier, StoredEvent, VerifyError, verify_head_signature};
use std::fmt;

/// The chain head as stored, with the audit key's signature over
/// [`ChainHead::signing_message_with`] its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// Number of events.
    pub size: u64,
    /// Chain hash of the last event.
    pub hash: [u8; 32],
    /// The store's sealed state summary signed with the head (opaque; empty for heads
    /// signed without one).
    pub state: Vec<u8>,
    /// Ed25519 signature.
    pub signature: Vec<u8>,
}

/// What the verification reads, in the order it reads it.
pub trait Source {
    /// Why the source cannot be read (not a verdict: the caller reports it as it likes).
    type Error;
    /// The signed head of the chain; `None` for a log that was never written.
    fn signed_head(&mut self) -> Result<Option<SignedHead>, Self::Error>;
    /// The checkpoints the log keeps, in any order.
    fn stored_checkpoints(&mut self) -> Result<Vec<Checkpoint>, Self::Error>;
    /// The text of a witness file (one [`Checkpoint::to_line`] per line), if one is given.
    fn witness(&mut self) -> Result<Option<String>, Self::Error>;
    /// Visit the events in sequence order until `visit` returns false.
    fn scan(&mut self, visit: &mut dyn FnMut(StoredEvent) -> bool) -> Result<(), Self::Error>;
}

/// A log held in memory: the plain-data [`Source`].
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The signed head.
    pub head: Option<SignedHead>,
    /// The stored checkpoints.
    pub checkpoints: Vec<Checkpoint>,
    /// The events, in the order they are read.
    pub events: Vec<StoredEvent>,
    /// The witness file's text.
    pub witness: Option<String>,
}

impl Source for Snapshot {
    type Error = std::convert::Infallible;
    fn signed_head(&mut self) -> Result<Option<SignedHead>, Self::Error> {
        Ok(self.head.clone())
    }
    fn stored_checkpoints(&mut self) -> Result<Vec<Checkpoint>, Self::Error> {
        Ok(self.checkpoints.clone())
    }
    fn witness(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(self.witness.clone())
    }
    fn scan(&mut self, visit: &mut dyn FnMut(StoredEvent) -> bool) -> Result<(), Self::Error> {
        for e in &self.events {
            if !visit(e.clone()) {
                break;
            }
        }
        Ok(())
    }
}

/// Where a checkpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Kept by the log itself.
    Stored,
    /// Read from the witness file.
    Witnessed,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Stored => "stored",
            Origin::Witnessed => "witnessed",
        })
    }
}

/// Why a log does not verify: the first failure found.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The signed head's signature is not the audit key's.
    #[error("the signed head (size {size}) has an invalid signature")]
    HeadSignature {
        /// The size the head claims.
        size: u64,
    },
    /// Events exist but no head was ever signed.
    #[error("events exist but there is no signed head")]
    NoSignedHead,
    /// A non-blank line of the witness file is not a checkpoint.
    #[error("witness line {line} is not a checkpoint")]
    WitnessLine {
        /// 1-based line number.
        line: usize,
    },
    /// A witness line names a key other than this log's audit key.
    #[error("witness line {line} names another key than this log's audit key")]
    WitnessKey {
        /// 1-based line number.
        line: usize,
    },
    /// A checkpoint's signature is not the audit key's.
    #[error("the {origin} checkpoint at size {size} has an invalid signature")]
    CheckpointSignature {
        /// Stored or witnessed.
        origin: Origin,
        /// Its size.
        size: u64,
    },
    /// The root of the log's first `size` events is not the checkpoint's.
    #[error(
        "the {origin} checkpoint at size {size} does not match the log: an event at or \
         before position {size} was changed, removed, inserted or reordered (or the log \
         was rewritten)"
    )]
    CheckpointMismatch {
        /// Stored or witnessed.
        origin: Origin,
        /// Its size.
        size: u64,
    },
    /// A checkpoint covers more events than the log holds.
    #[error(
        "the {origin} checkpoint at size {size} is beyond the log ({events} events): events \
         were removed (a rollback or truncation)"
    )]
    CheckpointBeyondLog {
        /// Stored or witnessed.
        origin: Origin,
        /// Its size.
        size: u64,
        /// Events in the log.
        events: u64,
    },
    /// The hash chain or the signed head does not hold.
    #[error(transparent)]
    Chain(#[from] VerifyError),
}

/// What a log that verifies holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Events verified (the signed head's size).
    pub events: u64,
    /// Checkpoints verified, stored and witnessed.
    pub checkpoints: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} events, chain and signed head intact; {} checkpoints (signatures, Merkle \
             roots, each consistent with the next) verified",
            self.events, self.checkpoints
        )
    }
}

/// The checkpoints of a witness file, one per non-blank line; the 1-based number of the
/// first line that is not one.
pub fn parse_witness(text: &str) -> Result<Vec<Checkpoint>, Failure> {
    Ok(parse_witness_keys(text)?
        .into_iter()
        .map(|(_, c, _)| c)
        .collect())
}

/// A witness line as read: its 1-based number, its checkpoint, the key it names.
pub type WitnessLine = (usize, Checkpoint, Option<[u8; 32]>);

/// [`parse_witness`] with each line's number and the key it names (if it names one).
pub fn parse_witness_keys(text: &str) -> Result<Vec<WitnessLine>, Failure> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            Checkpoint::from_line_with_key(l)
                .map(|(c, k)| (n + 1, c, k))
                .ok_or(Failure::WitnessLine { line: n + 1 })
        })
        .collect()
}

/// Verify the log `source` holds against the audit key `public_key` (see the module
/// documentation). The outer error is the source's; the inner result is the verdict.
pub fn verify_log<S: Source + ?Sized>(
    source: &mut S,
    public_key: &[u8; 32],
) -> Result<Result<Report, Failure>, S::Error> {
    let signed = match source.signed_head()? {
        Some(h) => {
            let head = ChainHead {
                size: h.size,
                hash: h.hash,
            };
            if !verify_head_signature(&head, &h.state, public_key, &h.signature) {
                return Ok(Err(Failure::HeadSignature { size: h.size }));
            }
            Some(head)
        }
        None => None,
    };
    if signed.is_none() {
        let mut any = false;
        source.scan(&mut |_| {
            any = true;
            false
        })?;
        if any {
            return Ok(Err(Failure::NoSignedHead));
        }
    }
    let mut checkpoints: Vec<(Checkpoint, Origin)> = source
        .stored_checkpoints()?
        .into_iter()
        .map(|c| (c, Origin::Stored))
        .collect();
    if let Some(text) = source.witness()? {
        match parse_witness_keys(&text) {
            Ok(w) => {
                // a line naming another key is another deployment's (or a forger's)
                if let Some((line, _, _)) = w
                    .iter()
                    .find(|(_, _, k)| k.is_some_and(|k| &k != public_key))
                {
                    return Ok(Err(Failure::WitnessKey { line: *line }));
                }
                checkpoints.extend(w.into_iter().map(|(_, c, _)| (c, Origin::Witnessed)));
            }
            Err(f) => return Ok(Err(f)),
        }
    }
    for (c, origin) in &checkpoints {
        if !c.signature_ok(public_key) {
            return Ok(Err(Failure::CheckpointSignature {
                origin: *origin,
                size: c.size,
            }));
        }
    }
    // stable: of two checkpoints of one size, the stored one is compared first
    checkpoints.sort_by_key(|(c, _)| c.size);
    let mut verifier = ChainVerifier::new(signed);
    let mut frontier = merkle::Frontier::new();
    let mut next = 0;
    let mut failure = None;
    source.scan(&mut |ev| {
        if let Err(e) = verifier.push(&ev) {
            failure = Some(Failure::Chain(e));
            return false;
        }
        frontier.push(merkle::leaf_hash(&ev.event));
        while let Some((c, origin)) = checkpoints.get(next)
            && c.size <= frontier.size()
        {
            if c.size < frontier.size() || c.root != frontier.root() {
                failure = Some(Failure::CheckpointMismatch {
                    origin: *origin,
                    size: c.size,
                });
                return false;
            }
            next += 1;
        }
        true
    })?;
    if let Some(f) = failure {
        return Ok(Err(f));
    }
    let head = match verifier.finish() {
        Ok(h) => h,
        Err(e) => return Ok(Err(Failure::Chain(e))),
    };
    if let Some((c, origin)) = checkpoints.get(next) {
        return Ok(Err(Failure::CheckpointBeyondLog {
            origin: *origin,
            size: c.size,
            events: frontier.size(),
        }));
    }
    Ok(Ok(Report {
        events: head.size,
        checkpoints: checkpoints.len(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words `phivault audit verify` prints after `OK: ` / `FAILED: `, as they were
    /// when the verification lived in the CLI (its tests and operators' scripts read them).
    #[test]
    fn verdicts_read_as_the_cli_always_printed_them() {
        let o = Origin::Witnessed;
        let cases: [(Failure, &str); 8] = [
            (
                Failure::HeadSignature { size: 7 },
                "the signed head (size 7) has an invalid signature",
            ),
            (
                Failure::NoSignedHead,
                "events exist but there is no signed head",
            ),
            (
                Failure::WitnessLine { line: 3 },
                "witness line 3 is not a checkpoint",
            ),
            (
                Failure::CheckpointSignature {
                    origin: Origin::Stored,
                    size: 5,
                },
                "the stored checkpoint at size 5 has an invalid signature",
            ),
            (
                Failure::CheckpointMismatch { origin: o, size: 5 },
                "the witnessed checkpoint at size 5 does not match the log: an event at or \
                 before position 5 was changed, removed, inserted or reordered (or the log was \
                 rewritten)",
            ),
            (
                Failure::CheckpointBeyondLog {
                    origin: o,
                    size: 9,
                    events: 4,
                },
                "the witnessed checkpoint at size 9 is beyond the log (4 events): events were \
                 removed (a rollback or truncation)",
            ),
            (
                Failure::Chain(VerifyError::Hash { position: 2 }),
                "audit event at position 2: hash mismatch (event edited, inserted or reordered)",
            ),
            (
                Failure::Chain(VerifyError::Length {
                    signed: 3,
                    found: 2,
                }),
                "audit log has 2 events but the signed head covers 3 (events removed from or \
                 appended to the end)",
            ),
        ];
        for (f, want) in cases {
            assert_eq!(f.to_string(), want);
        }
        assert_eq!(
            Report {
                events: 12,
                checkpoints: 3
            }
            .to_string(),
            "12 events, chain and signed head intact; 3 checkpoints (signatures, Merkle roots, \
             each consistent with the next) verified"
        );
    }
}
