//! The audit log as an RFC 9162 (Certificate Transparency 2.0) Merkle tree: leaf and
//! interior-node hashing with domain separation, the tree head of any prefix of the log,
//! inclusion proofs (an event is in the log at a position) and consistency proofs (a
//! later log extends an earlier one without rewriting it), and their verification
//! (RFC 9162 §2.1).
//!
//! * leaf hash `MTH({d}) = SHA-256(0x00 || d)`, node hash `SHA-256(0x01 || left || right)`;
//!   a tree of `n > 1` leaves splits at `k`, the largest power of two below `n`.
//! * [`Frontier`] appends leaves one at a time, keeping one hash per set bit of the size
//!   (at most 64), and gives the root of what it holds at any point: a verifier walks a
//!   log of millions of events in one pass and compares the root at each checkpoint.
//! * Proofs are computed from the leaf hashes ([`inclusion_proof`], [`consistency_proof`])
//!   and checked from nothing but the proof, the sizes and the roots.
//! * A [`Checkpoint`] is the tree head of the log at a time, signed with the audit key;
//!   one line of a witness file ([`Checkpoint::to_line`]).
//!
//! The store's writer keeps a [`Frontier`] of the log alongside the hash chain of
//! [`crate::chain_hash`] and signs a checkpoint at intervals; the server exports them to a
//! witness file and serves inclusion and consistency proofs to auditors; `audit verify`
//! ([`crate::verify`]) checks every stored and witnessed checkpoint against the log. The
//! hashing and the proofs are checked against the test vectors of an independent
//! implementation in `tests/rfc9162_vectors.rs`.

use ring::digest::{Context, SHA256};

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// The hash of an empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    finish(Context::new(&SHA256))
}

fn finish(c: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

/// `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut c = Context::new(&SHA256);
    c.update(&[0x00]);
    c.update(leaf);
    finish(c)
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut c = Context::new(&SHA256);
    c.update(&[0x01]);
    c.update(left);
    c.update(right);
    finish(c)
}

/// The largest power of two strictly below `n` (`n ≥ 2`).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root of the tree over `leaves` (leaf hashes), RFC 9162 §2.1.1.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `index` in the tree over `leaves` (RFC 9162 §2.1.3.1); None
/// when `index` is out of range.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    (index < leaves.len()).then(|| {
        let mut out = Vec::new();
        path(index, leaves, &mut out);
        out
    })
}

fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
    let n = d.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &d[..k], out);
        out.push(root(&d[k..]));
    } else {
        path(m - k, &d[k..], out);
        out.push(root(&d[..k]));
    }
}

/// Whether `proof` shows leaf hash `leaf` at `index` in the tree of `size` leaves whose
/// root is `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

/// The consistency proof between the tree of the first `old` leaves and the tree of all
/// `leaves` (RFC 9162 §2.1.4.1); None unless `0 < old ≤ leaves.len()`.
pub fn consistency_proof(old: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    (old > 0 && old <= leaves.len()).then(|| {
        let mut out = Vec::new();
        subproof(old, leaves, true, &mut out);
        out
    })
}

fn subproof(m: usize, d: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = d.len();
    if m == n {
        if !complete {
            out.push(root(d));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &d[..k], complete, out);
        out.push(root(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(root(&d[..k]));
    }
}

/// Whether `proof` shows that the tree of `new_size` leaves with root `new_root` extends
/// the tree of `old_size` leaves with root `old_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old_size == 0 || old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    // a complete old tree is its own first node
    let mut nodes: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        nodes.push(*old_root);
    }
    nodes.extend_from_slice(proof);
    let Some((first, rest)) = nodes.split_first() else {
        return false;
    };
    let (mut f_n, mut s_n) = (old_size - 1, new_size - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut f_r, mut s_r) = (*first, *first);
    for c in rest {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            f_r = node_hash(c, &f_r);
            s_r = node_hash(c, &s_r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            s_r = node_hash(&s_r, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && f_r == *old_root && s_r == *new_root
}

/// The right edge of a growing tree: one hash per complete subtree (a set bit of the
/// size), enough to append and to compute the root of everything appended so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// Roots of the complete subtrees, largest (leftmost) first.
    stack: Vec<Hash>,
}

impl Frontier {
    /// An empty tree.
    pub fn new() -> Self {
        Frontier::default()
    }

    /// Leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Append one leaf (its leaf hash).
    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        // each trailing set bit of the old size is a complete subtree of the new one's size
        while s & 1 == 1 {
            let left = self.stack.pop().unwrap_or_default();
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.stack.push(h);
        self.size += 1;
    }

    /// The root of the tree over every leaf appended.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        match it.next() {
            None => empty_root(),
            Some(last) => it.fold(*last, |acc, left| node_hash(left, &acc)),
        }
    }
}

impl Frontier {
    /// The stored form: the size (8 bytes, big-endian) and the subtree roots.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 32 * self.stack.len());
        b.extend_from_slice(&self.size.to_be_bytes());
        for h in &self.stack {
            b.extend_from_slice(h);
        }
        b
    }

    /// Read the stored form back; None unless it is well formed (one root per set bit of
    /// the size).
    pub fn from_bytes(b: &[u8]) -> Option<Frontier> {
        let (size, rest) = b.split_first_chunk::<8>()?;
        let size = u64::from_be_bytes(*size);
        if rest.len() % 32 != 0 || rest.len() / 32 != size.count_ones() as usize {
            return None;
        }
        let stack = rest
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Some(Frontier { size, stack })
    }
}

/// Domain separation of checkpoint signatures (distinct from the chain head's).
const CHECKPOINT_DOMAIN: &[u8] = b"phivault-audit-checkpoint-v1\n";

/// A signed checkpoint: the tree head (size, root) of the log at a time, signed with the
/// audit key. Exported to a witness, it pins the log: a later log must extend it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Events in the tree.
    pub size: u64,
    /// The tree's root.
    pub root: Hash,
    /// When it was made (ms since the epoch).
    pub time_ms: u64,
    /// Ed25519 signature of [`Checkpoint::signing_message`].
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// What is signed: the domain, the size, the root and the time.
    pub fn signing_message(size: u64, root: &Hash, time_ms: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
        m.extend_from_slice(CHECKPOINT_DOMAIN);
        m.extend_from_slice(&size.to_be_bytes());
        m.extend_from_slice(root);
        m.extend_from_slice(&time_ms.to_be_bytes());
        m
    }

    /// Whether the signature is the audit key's (`public_key`, Ed25519).
    pub fn signature_ok(&self, public_key: &[u8; 32]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
            .verify(
                &Self::signing_message(self.size, &self.root, self.time_ms),
                &self.signature,
            )
            .is_ok()
    }

    /// One line of a witness file naming the key the checkpoint verifies with:
    /// `size root-hex time-ms signature-hex ed25519:public-key-hex`.
    pub fn to_line_signed_by(&self, public_key: &[u8; 32]) -> String {
        let hex: String = public_key.iter().map(|x| format!("{x:02x}")).collect();
        format!("{} ed25519:{hex}", self.to_line())
    }

    /// One line of a witness file: `size root-hex time-ms signature-hex` (lines of earlier
    /// versions; [`Checkpoint::to_line_signed_by`] names the key too).
    pub fn to_line(&self) -> String {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        format!(
            "{} {} {} {}",
            self.size,
            hex(&self.root),
            self.time_ms,
            hex(&self.signature)
        )
    }

    /// Parse a witness-file line.
    pub fn from_line(line: &str) -> Option<Checkpoint> {
        Self::from_line_with_key(line).map(|(c, _)| c)
    }

    /// Parse a witness-file line, with the key it names (None for a line that names
    /// none).
    pub fn from_line_with_key(line: &str) -> Option<(Checkpoint, Option<[u8; 32]>)> {
        let unhex = |s: &str| -> Option<Vec<u8>> {
            if !s.len().is_multiple_of(2) {
                return None;
            }
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
                .collect()
        };
        let mut it = line.split_ascii_whitespace();
        let size = it.next()?.parse().ok()?;
        let root: Hash = unhex(it.next()?)?.try_into().ok()?;
        let time_ms = it.next()?.parse().ok()?;
        let signature = unhex(it.next()?)?;
        let key = match it.next() {
            None => None,
            Some(k) => Some(<[u8; 32]>::try_from(unhex(k.strip_prefix("ed25519:")?)?).ok()?),
        };
        if it.next().is_some() || signature.len() != 64 {
            return None;
        }
        Some((
            Checkpoint {
                size,
                root,
                time_ms,
                signature,
            },
            key,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&(i as u64).to_be_bytes()))
            .collect()
    }

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn known_roots() {
        // the RFC 6962/9162 test vectors: leaves are the byte strings below, roots of the
        // first n leaves (certificate-transparency-go merkle tests)
        let data: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let hashed: Vec<Hash> = data.iter().map(|d| leaf_hash(d)).collect();
        let mut f = Frontier::new();
        for (n, want) in roots.iter().enumerate() {
            assert_eq!(hex(&root(&hashed[..=n])), *want, "{}", n + 1);
            f.push(hashed[n]);
            assert_eq!(hex(&f.root()), *want, "frontier {}", n + 1);
        }
        assert_eq!(
            hex(&empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn every_inclusion_and_consistency_proof_of_small_trees_verifies() {
        for n in 1..=40usize {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..n {
                let p = inclusion_proof(i, &l).unwrap();
                assert!(
                    verify_inclusion(i as u64, n as u64, &l[i], &p, &r),
                    "{i} of {n}"
                );
                // another leaf, position, size or root does not verify
                assert!(!verify_inclusion(
                    i as u64,
                    n as u64,
                    &leaf_hash(b"forged"),
                    &p,
                    &r
                ));
                if n > 1 {
                    assert!(!verify_inclusion(
                        ((i + 1) % n) as u64,
                        n as u64,
                        &l[i],
                        &p,
                        &r
                    ));
                }
                if !p.is_empty() {
                    let short = &p[..p.len() - 1];
                    assert!(!verify_inclusion(i as u64, n as u64, &l[i], short, &r));
                }
                assert!(!verify_inclusion(
                    i as u64,
                    n as u64,
                    &l[i],
                    &p,
                    &leaf_hash(b"x")
                ));
            }
            assert!(inclusion_proof(n, &l).is_none());
            for m in 1..=n {
                let p = consistency_proof(m, &l).unwrap();
                let old = root(&l[..m]);
                assert!(
                    verify_consistency(m as u64, n as u64, &old, &r, &p),
                    "{m} → {n}"
                );
                // a rewritten old tree is not consistent with the new one
                let mut forged = l[..m].to_vec();
                forged[m - 1] = leaf_hash(b"rewritten");
                let bad_old = root(&forged);
                assert!(!verify_consistency(m as u64, n as u64, &bad_old, &r, &p));
            }
        }
    }

    #[test]
    fn frontiers_and_checkpoints_round_trip_and_signatures_bind_every_field() {
        let mut f = Frontier::new();
        for h in leaves(13) {
            f.push(h);
        }
        let g = Frontier::from_bytes(&f.to_bytes()).expect("round trip");
        assert_eq!(g, f);
        assert_eq!(g.root(), root(&leaves(13)));
        let mut bad = f.to_bytes();
        bad.truncate(bad.len() - 32);
        assert!(Frontier::from_bytes(&bad).is_none());
        assert!(Frontier::from_bytes(&[1, 2]).is_none());

        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public: [u8; 32] = ring::signature::KeyPair::public_key(&kp)
            .as_ref()
            .try_into()
            .unwrap();
        let r = f.root();
        let sig = kp
            .sign(&Checkpoint::signing_message(13, &r, 99))
            .as_ref()
            .to_vec();
        let cp = Checkpoint {
            size: 13,
            root: r,
            time_ms: 99,
            signature: sig,
        };
        assert!(cp.signature_ok(&public));
        assert_eq!(Checkpoint::from_line(&cp.to_line()), Some(cp.clone()));
        // a line naming its key gives the key back; a malformed key is not a line
        let key = [0x5a; 32];
        assert_eq!(
            Checkpoint::from_line_with_key(&cp.to_line_signed_by(&key)),
            Some((cp.clone(), Some(key)))
        );
        assert!(Checkpoint::from_line(&format!("{} ed25519:00", cp.to_line())).is_none());
        assert!(
            Checkpoint::from_line(&format!("{} rsa:{}", cp.to_line(), "00".repeat(32))).is_none()
        );
        for changed in [
            Checkpoint {
                size: 14,
                ..cp.clone()
            },
            Checkpoint {
                root: leaf_hash(b"x"),
                ..cp.clone()
            },
            Checkpoint {
                time_ms: 98,
                ..cp.clone()
            },
        ] {
            assert!(!changed.signature_ok(&public));
        }
        assert!(Checkpoint::from_line("1 00 2 00").is_none());
        assert!(Checkpoint::from_line("").is_none());
    }

    proptest! {
        #[test]
        fn tampering_with_any_event_changes_the_root_and_breaks_proofs(
            n in 1usize..300, at in any::<prop::sample::Index>(), byte in 1u8..,
        ) {
            let l = leaves(n);
            let r = root(&l);
            let i = at.index(n);
            let mut f = Frontier::new();
            for h in &l {
                f.push(*h);
            }
            prop_assert_eq!(f.root(), r);
            prop_assert_eq!(f.size(), n as u64);
            let p = inclusion_proof(i, &l).unwrap();
            prop_assert!(verify_inclusion(i as u64, n as u64, &l[i], &p, &r));
            // an edited event: another root, and its old proof no longer verifies it
            let mut edited = l.clone();
            let mut raw = (i as u64).to_be_bytes();
            raw[7] ^= byte;
            edited[i] = leaf_hash(&raw);
            prop_assert_ne!(root(&edited), r);
            prop_assert!(!verify_inclusion(i as u64, n as u64, &edited[i], &p, &r));
            // a deleted or reordered event: another root
            let mut deleted = l.clone();
            deleted.remove(i);
            prop_assert_ne!(root(&deleted), r);
            if n > 1 {
                let mut swapped = l.clone();
                swapped.swap(i, (i + 1) % n);
                prop_assert_ne!(root(&swapped), r);
            }
            // a log extended later is consistent with this one; a rewritten one is not
            let mut longer = l.clone();
            longer.extend(leaves(n + 7)[n..].iter().copied());
            let cp = consistency_proof(n, &longer).unwrap();
            prop_assert!(verify_consistency(n as u64, longer.len() as u64, &r, &root(&longer), &cp));
            let mut rewritten = longer.clone();
            rewritten[i] = edited[i];
            let cp2 = consistency_proof(n, &rewritten).unwrap();
            prop_assert!(!verify_consistency(n as u64, rewritten.len() as u64, &r, &root(&rewritten), &cp2));
        }
    }
}
