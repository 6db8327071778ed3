//! Offline verification of a whole log (`verify::verify_log`, what `phivault audit verify`
//! runs) over random logs, random signed checkpoints and a witness file holding some of
//! them: the untampered log verifies, and each tampering gives exactly the verdict it
//! must.
//!
//! Two attackers. An outsider edits the store but has no audit key: every change is found
//! in the store alone. An insider holds the key and re-signs the head and the stored
//! checkpoints after the change: the store is consistent with itself, and the change is
//! found exactly when the witness holds a checkpoint that covers it.

use phivault_audit::merkle::{self, Checkpoint, Hash};
use phivault_audit::verify::{
    Failure, Origin, Report, SignedHead, Snapshot, parse_witness, verify_log,
};
use phivault_audit::{Action, AuditEvent, ChainHead, Outcome, StoredEvent, VerifyError};
use proptest::prelude::*;
use ring::signature::{Ed25519KeyPair, KeyPair};

fn key(seed: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("seed")
}

fn public(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().expect("32 bytes")
}

fn event(i: u64, status: u16, source: &str) -> AuditEvent {
    AuditEvent {
        time_ms: 1_700_000_000_000 + i,
        request_id: format!("req-{i}"),
        client_id: Some(format!("client-{}", i % 3)),
        user: i.is_multiple_of(4).then(|| format!("user-{i}")),
        action: if i.is_multiple_of(5) {
            Action::C
        } else {
            Action::R
        },
        interaction: "read".into(),
        resource_type: Some("Observation".into()),
        resource_id: Some(format!("obs-{i}")),
        version: Some(1),
        patient: Some(format!("pat-{}", i % 7)),
        outcome: Outcome::from_http(status),
        source: source.into(),
        entities: vec![],
        detail: Default::default(),
        writes: Vec::new(),
    }
}

/// Sequence numbers and chain hashes recomputed for `bytes`, and the head.
fn chain(bytes: &[Vec<u8>]) -> (Vec<StoredEvent>, ChainHead) {
    let mut head = ChainHead::EMPTY;
    let rows = bytes
        .iter()
        .map(|b| {
            let hash = head.append(b);
            StoredEvent {
                seq: head.size,
                event: b.clone(),
                hash: hash.to_vec(),
            }
        })
        .collect();
    (rows, head)
}

fn sign_head(k: &Ed25519KeyPair, h: &ChainHead) -> SignedHead {
    SignedHead {
        size: h.size,
        hash: h.hash,
        state: Vec::new(),
        signature: k.sign(&h.signing_message()).as_ref().to_vec(),
    }
}

fn leaves(rows: &[StoredEvent]) -> Vec<Hash> {
    rows.iter().map(|r| merkle::leaf_hash(&r.event)).collect()
}

/// A checkpoint of the first `size` of `rows`, signed by `k`.
fn checkpoint(k: &Ed25519KeyPair, rows: &[StoredEvent], size: u64, time_ms: u64) -> Checkpoint {
    let root = merkle::root(&leaves(rows)[..size as usize]);
    Checkpoint {
        size,
        root,
        time_ms,
        signature: k
            .sign(&Checkpoint::signing_message(size, &root, time_ms))
            .as_ref()
            .to_vec(),
    }
}

fn verdict(s: &Snapshot, pk: &[u8; 32]) -> Result<Report, Failure> {
    match verify_log(&mut s.clone(), pk) {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

/// A random log: events, which sizes have a stored checkpoint, which of those the witness
/// holds, and blank lines in the witness file.
#[derive(Debug, Clone)]
struct Log {
    events: Vec<(u16, String)>,
    /// Per size 1..=n: stored checkpoint?, also witnessed?, its time.
    marks: Vec<(bool, bool, u64)>,
    has_witness: bool,
    blank_after: Vec<bool>,
}

fn log() -> impl Strategy<Value = Log> {
    (
        prop::collection::vec((100u16..600, "[a-z0-9.]{0,12}"), 0..40),
        prop::collection::vec((any::<bool>(), any::<bool>(), any::<u64>()), 40),
        any::<bool>(),
        prop::collection::vec(prop::bool::weighted(0.1), 40),
    )
        .prop_map(|(events, marks, has_witness, blank_after)| Log {
            events,
            marks,
            has_witness,
            blank_after,
        })
}

/// The log built: its snapshot, the witness's checkpoints, the stored and witnessed sizes.
struct Built {
    snapshot: Snapshot,
    bytes: Vec<Vec<u8>>,
    stored: Vec<u64>,
    witnessed: Vec<u64>,
}

fn build(l: &Log, k: &Ed25519KeyPair) -> Built {
    let bytes: Vec<Vec<u8>> = l
        .events
        .iter()
        .enumerate()
        .map(|(i, (status, source))| event(i as u64 + 1, *status, source).encode())
        .collect();
    let (rows, head) = chain(&bytes);
    let n = rows.len() as u64;
    let mut stored = Vec::new();
    let mut witnessed = Vec::new();
    let mut checkpoints = Vec::new();
    let mut witness = String::new();
    for size in 1..=n {
        let (s, w, time) = l.marks[size as usize - 1];
        if !s {
            continue;
        }
        let c = checkpoint(k, &rows, size, time);
        stored.push(size);
        if w && l.has_witness {
            witnessed.push(size);
            witness.push_str(&c.to_line());
            witness.push('\n');
            if l.blank_after[size as usize - 1] {
                witness.push_str("  \n");
            }
        }
        checkpoints.push(c);
    }
    Built {
        snapshot: Snapshot {
            head: (n > 0).then(|| sign_head(k, &head)),
            checkpoints,
            events: rows,
            witness: l.has_witness.then_some(witness),
        },
        bytes,
        stored,
        witnessed,
    }
}

#[derive(Debug, Clone)]
enum Tamper {
    /// Nothing changed.
    None,
    /// The witness file's lines in another order (and its blank lines moved).
    ReorderWitness { seed: u64 },
    /// The last `k` events removed.
    DropTail { k: usize },
    /// The same, the head and the stored checkpoints re-signed for the shorter log.
    DropTailResigned { k: usize },
    /// One event edited, the chain left as it was.
    Edit { at: usize },
    /// One event edited and the chain recomputed, without the key.
    EditRechained { at: usize },
    /// One event edited, the chain recomputed, head and stored checkpoints re-signed.
    EditResigned { at: usize },
    /// One event edited, the chain recomputed, the head re-signed and the stored
    /// checkpoints that cover the edit removed.
    EditRemovingCheckpoints { at: usize },
    /// One bit of the witness file's text flipped.
    FlipWitnessBit { at: usize, bit: u8 },
    /// A witness line made of one checkpoint's size and time and another's root and
    /// signature.
    SpliceWitness { a: usize, b: usize },
    /// A checkpoint signed by another key added to the witness.
    ForeignWitness { size: usize },
    /// A stored checkpoint removed alone (nothing edited).
    RemoveStoredCheckpoint { at: usize },
}

fn tamper() -> impl Strategy<Value = Tamper> {
    let i = || any::<usize>();
    prop_oneof![
        Just(Tamper::None),
        any::<u64>().prop_map(|seed| Tamper::ReorderWitness { seed }),
        (1usize..6).prop_map(|k| Tamper::DropTail { k }),
        (1usize..6).prop_map(|k| Tamper::DropTailResigned { k }),
        i().prop_map(|at| Tamper::Edit { at }),
        i().prop_map(|at| Tamper::EditRechained { at }),
        i().prop_map(|at| Tamper::EditResigned { at }),
        i().prop_map(|at| Tamper::EditRemovingCheckpoints { at }),
        (i(), 0u8..7).prop_map(|(at, bit)| Tamper::FlipWitnessBit { at, bit }),
        (i(), i()).prop_map(|(a, b)| Tamper::SpliceWitness { a, b }),
        i().prop_map(|size| Tamper::ForeignWitness { size }),
        i().prop_map(|at| Tamper::RemoveStoredCheckpoint { at }),
    ]
}

/// Edit event `at` (0-based) so that it still decodes but is another event.
fn edited(bytes: &[Vec<u8>], at: usize) -> Vec<Vec<u8>> {
    let mut out = bytes.to_vec();
    let mut e = AuditEvent::decode(&out[at]).expect("decodes");
    e.outcome = Outcome::from_http(if e.outcome.http_status == 403 {
        200
    } else {
        403
    });
    e.source.push('x');
    out[at] = e.encode();
    out
}

/// The first checkpoint (by size, stored before witnessed) of a size at least `p`.
fn first_covering(stored: &[u64], witnessed: &[u64], p: u64) -> Option<(Origin, u64)> {
    let s = stored.iter().copied().filter(|&s| s >= p).min();
    let w = witnessed.iter().copied().filter(|&s| s >= p).min();
    match (s, w) {
        (Some(s), Some(w)) if w < s => Some((Origin::Witnessed, w)),
        (Some(s), _) => Some((Origin::Stored, s)),
        (None, Some(w)) => Some((Origin::Witnessed, w)),
        (None, None) => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_tampering_gets_its_verdict(l in log(), t in tamper()) {
        let k = key(7);
        let pk = public(&k);
        let b = build(&l, &k);
        let n = b.bytes.len();
        let ok = Ok(Report {
            events: n as u64,
            checkpoints: b.stored.len() + b.witnessed.len(),
        });
        prop_assert_eq!(verdict(&b.snapshot, &pk), ok.clone(), "untampered");
        let mut s = b.snapshot.clone();
        let witness_text = s.witness.clone().unwrap_or_default();
        let expected: Result<Report, Failure> = match t {
            Tamper::None => ok,
            Tamper::ReorderWitness { seed } => {
                let mut lines: Vec<&str> = witness_text.lines().collect();
                let mut x = seed | 1;
                for i in (1..lines.len()).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    lines.swap(i, (x % (i as u64 + 1)) as usize);
                }
                s.witness = s.witness.as_ref().map(|_| lines.join("\n"));
                // a witness attests a set of checkpoints: their order carries nothing
                ok
            }
            Tamper::DropTail { k: drop } => {
                prop_assume!(n >= 1);
                let keep = n.saturating_sub(drop);
                s.events.truncate(keep);
                Err(Failure::Chain(VerifyError::Length { signed: n as u64, found: keep as u64 }))
            }
            Tamper::DropTailResigned { k: drop } => {
                prop_assume!(n >= 1);
                let keep = n.saturating_sub(drop);
                let (rows, head) = chain(&b.bytes[..keep]);
                s.head = Some(sign_head(&k, &head));
                s.checkpoints.retain(|c| c.size <= keep as u64);
                let stored = b.stored.iter().filter(|&&x| x <= keep as u64).count();
                s.events = rows;
                match b.witnessed.iter().copied().filter(|&w| w > keep as u64).min() {
                    Some(size) => Err(Failure::CheckpointBeyondLog {
                        origin: Origin::Witnessed,
                        size,
                        events: keep as u64,
                    }),
                    None => Ok(Report {
                        events: keep as u64,
                        checkpoints: stored + b.witnessed.len(),
                    }),
                }
            }
            Tamper::Edit { at } => {
                prop_assume!(n >= 1);
                let at = at % n;
                s.events[at].event = edited(&b.bytes, at)[at].clone();
                Err(Failure::Chain(VerifyError::Hash { position: at as u64 + 1 }))
            }
            Tamper::EditRechained { at } => {
                prop_assume!(n >= 1);
                let at = at % n;
                s.events = chain(&edited(&b.bytes, at)).0;
                // the first checkpoint that covers the edit, or the signed head at the end,
                // whichever comes first (at the last event the head is checked first)
                match first_covering(&b.stored, &b.witnessed, at as u64 + 1) {
                    Some((origin, size)) if size < n as u64 => {
                        Err(Failure::CheckpointMismatch { origin, size })
                    }
                    _ => Err(Failure::Chain(VerifyError::Head { position: n as u64 })),
                }
            }
            Tamper::EditResigned { at } | Tamper::EditRemovingCheckpoints { at } => {
                prop_assume!(n >= 1);
                let at = at % n;
                let (rows, head) = chain(&edited(&b.bytes, at));
                s.head = Some(sign_head(&k, &head));
                let p = at as u64 + 1;
                let stored = if matches!(t, Tamper::EditResigned { .. }) {
                    s.checkpoints = s
                        .checkpoints
                        .iter()
                        .map(|c| checkpoint(&k, &rows, c.size, c.time_ms))
                        .collect();
                    b.stored.len()
                } else {
                    s.checkpoints.retain(|c| c.size < p);
                    b.stored.iter().filter(|&&x| x < p).count()
                };
                s.events = rows;
                // the store alone is fooled: only the witness can tell
                match first_covering(&[], &b.witnessed, p) {
                    Some((origin, size)) => Err(Failure::CheckpointMismatch { origin, size }),
                    None => Ok(Report {
                        events: n as u64,
                        checkpoints: stored + b.witnessed.len(),
                    }),
                }
            }
            Tamper::FlipWitnessBit { at, bit } => {
                prop_assume!(!witness_text.is_empty());
                let mut raw = witness_text.clone().into_bytes();
                let at = at % raw.len();
                raw[at] ^= 1 << bit;
                let text = String::from_utf8(raw).expect("ASCII stays ASCII");
                let same = parse_witness(&text) == parse_witness(&witness_text);
                s.witness = Some(text);
                if same {
                    // e.g. a hex digit's case: the same checkpoints, still verified
                    ok
                } else {
                    let v = verdict(&s, &pk);
                    prop_assert!(
                        matches!(
                            v,
                            Err(Failure::WitnessLine { .. })
                                | Err(Failure::CheckpointSignature { origin: Origin::Witnessed, .. })
                        ),
                        "{:?}",
                        v
                    );
                    return Ok(());
                }
            }
            Tamper::SpliceWitness { a, b: other } => {
                prop_assume!(s.checkpoints.len() >= 2 && s.witness.is_some());
                let a = &s.checkpoints[a % s.checkpoints.len()];
                let o = &s.checkpoints[other % s.checkpoints.len()];
                prop_assume!(a.size != o.size);
                let forged = Checkpoint {
                    size: a.size,
                    time_ms: a.time_ms,
                    root: o.root,
                    signature: o.signature.clone(),
                };
                let size = forged.size;
                s.witness = Some(format!("{}{}\n", witness_text, forged.to_line()));
                Err(Failure::CheckpointSignature { origin: Origin::Witnessed, size })
            }
            Tamper::ForeignWitness { size } => {
                prop_assume!(n >= 1 && s.witness.is_some());
                let size = (size % n) as u64 + 1;
                let c = checkpoint(&key(8), &s.events, size, 1);
                s.witness = Some(format!("{}\n{}", c.to_line(), witness_text));
                Err(Failure::CheckpointSignature { origin: Origin::Witnessed, size })
            }
            Tamper::RemoveStoredCheckpoint { at } => {
                prop_assume!(!s.checkpoints.is_empty());
                let at = at % s.checkpoints.len();
                s.checkpoints.remove(at);
                // fewer checkpoints attest less, but nothing false
                Ok(Report {
                    events: n as u64,
                    checkpoints: b.stored.len() - 1 + b.witnessed.len(),
                })
            }
        };
        prop_assert_eq!(verdict(&s, &pk), expected, "{:?}", t);
    }

    #[test]
    fn the_head_and_every_checkpoint_are_the_audit_keys(l in log(), which in any::<usize>()) {
        let k = key(7);
        let pk = public(&k);
        let b = build(&l, &k);
        prop_assume!(!b.bytes.is_empty());
        // no signed head: a log with events is refused before anything else
        let mut s = b.snapshot.clone();
        s.head = None;
        prop_assert_eq!(verdict(&s, &pk), Err(Failure::NoSignedHead));
        // the head re-signed by another key
        let mut s = b.snapshot.clone();
        let h = s.head.clone().expect("head");
        s.head = Some(sign_head(&key(8), &ChainHead { size: h.size, hash: h.hash }));
        prop_assert_eq!(verdict(&s, &pk), Err(Failure::HeadSignature { size: h.size }));
        // a stored checkpoint signed by another key
        prop_assume!(!b.stored.is_empty());
        let mut s = b.snapshot.clone();
        let i = which % s.checkpoints.len();
        let c = s.checkpoints[i].clone();
        s.checkpoints[i] = checkpoint(&key(8), &s.events, c.size, c.time_ms);
        prop_assert_eq!(
            verdict(&s, &pk),
            Err(Failure::CheckpointSignature { origin: Origin::Stored, size: c.size })
        );
    }
}

#[test]
fn an_empty_log_verifies_with_or_without_a_head() {
    let k = key(7);
    let pk = public(&k);
    let none = Snapshot::default();
    assert_eq!(
        verdict(&none, &pk),
        Ok(Report {
            events: 0,
            checkpoints: 0
        })
    );
    let signed = Snapshot {
        head: Some(sign_head(&k, &ChainHead::EMPTY)),
        witness: Some("\n \n".into()),
        ..Snapshot::default()
    };
    assert_eq!(
        verdict(&signed, &pk),
        Ok(Report {
            events: 0,
            checkpoints: 0
        })
    );
    // a witness line that is not a checkpoint is named by its line number, blanks counted
    let bad = Snapshot {
        witness: Some("\n\nnot a checkpoint\n".into()),
        ..Snapshot::default()
    };
    assert_eq!(verdict(&bad, &pk), Err(Failure::WitnessLine { line: 3 }));
}
