//! The RFC 9162 Merkle tree of `phivault_audit::merkle` checked against test vectors from
//! an independent implementation, not against this crate's own proof generator.
//!
//! Source: <https://github.com/transparency-dev/merkle> (Apache-2.0), commit
//! 417fb0c314750d94e53942e9f92e79b6d35915db:
//! * `testonly/constants.go`: the eight leaf inputs, the hashes of every complete subtree
//!   over them (`NodeHashes`) and the root of every prefix (`RootHashes`);
//! * `testonly/reference_test.go` (`TestRefInclusionProof`, `TestRefConsistencyProof`) and
//!   `proof/verify_test.go` before commit bcba819 (the `inclusionProofs` and
//!   `consistencyProofs` tables, which add the 6 → 7 consistency proof): expected proofs;
//! * `testdata/inclusion/**` and `testdata/consistency/**`: the golden probes its verifier
//!   must accept or reject (happy paths, and each one corrupted: wrong leaf, index or size,
//!   bits flipped in the proof, components added or removed, roots swapped…), copied to
//!   `tests/vectors/transparency-dev-merkle-probes.json` with the hashes as hex.
//!
//! Only the data is copied. Its hashing is RFC 6962/9162's, the one this crate implements:
//! leaf `SHA-256(0x00 || d)`, node `SHA-256(0x01 || left || right)`, empty tree
//! `SHA-256()`. The one difference is in the interface: this crate's verifiers take hashes
//! as `[u8; 32]`, so a probe with a hash of another length cannot be expressed here. The Go
//! verifier rejects all of them but one, which it accepts because it compares the two
//! roots of a proof between equal sizes without looking at their length
//! (`consistency/additional/sizes-are-equal-one-and-proof-is-empty.json`, roots of 12
//! bytes); the tests below skip those probes and name the one.

use phivault_audit::merkle::{
    Frontier, Hash, consistency_proof, empty_root, inclusion_proof, leaf_hash, root,
    verify_consistency, verify_inclusion,
};

/// `testonly.LeafInputs()`.
const LEAVES: [&[u8]; 8] = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
];

/// `testonly.NodeHashes()`: level 0 is the leaf hashes, level `l` the roots of the complete
/// subtrees of `2^l` leaves, left to right.
const NODE_HASHES: [&[&str]; 4] = [
    &[
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    &[
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    &[
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    &["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
];

/// `testonly.RootHashes()`: the root of the first `n` leaves, `n` = 0..=8.
const ROOTS: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// (0-based leaf index, tree size, audit path): `TestRefInclusionProof`, which holds every
/// row of the older `inclusionProofs` table (1-based there) and two more.
const INCLUSION_PROOFS: &[(u64, u64, &[&str])] = &[
    (0, 1, &[]),
    (
        0,
        2,
        &["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"],
    ),
    (
        1,
        2,
        &["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"],
    ),
    (
        2,
        3,
        &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    ),
    (
        1,
        5,
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        0,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        &[
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
];

/// (old size, new size, consistency proof): `TestRefConsistencyProof` and the older
/// `consistencyProofs` table (which adds 6 → 7).
const CONSISTENCY_PROOFS: &[(u64, u64, &[&str])] = &[
    (1, 1, &[]),
    (
        1,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        2,
        5,
        &[
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        8,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        6,
        7,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
];

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hash(s: &str) -> Hash {
    unhex(s).try_into().expect("32 bytes")
}

fn hashes(v: &[&str]) -> Vec<Hash> {
    v.iter().map(|s| hash(s)).collect()
}

fn leaf_hashes() -> Vec<Hash> {
    LEAVES.iter().map(|d| leaf_hash(d)).collect()
}

#[test]
fn leaf_node_and_root_hashes_match_the_reference() {
    let l = leaf_hashes();
    assert_eq!(l, hashes(NODE_HASHES[0]), "leaf hashes");
    for (level, row) in NODE_HASHES.iter().enumerate() {
        let width = 1 << level;
        for (i, want) in row.iter().enumerate() {
            assert_eq!(
                root(&l[i * width..(i + 1) * width]),
                hash(want),
                "node {i} of level {level}"
            );
        }
    }
    assert_eq!(empty_root(), hash(ROOTS[0]));
    let mut f = Frontier::new();
    assert_eq!(f.root(), hash(ROOTS[0]));
    for n in 1..=8 {
        assert_eq!(root(&l[..n]), hash(ROOTS[n]), "root of {n}");
        f.push(l[n - 1]);
        assert_eq!(f.root(), hash(ROOTS[n]), "frontier root of {n}");
    }
}

#[test]
fn inclusion_proofs_match_the_reference_and_verify() {
    let l = leaf_hashes();
    for &(index, size, want) in INCLUSION_PROOFS {
        let (i, n) = (index as usize, size as usize);
        let want = hashes(want);
        assert_eq!(
            inclusion_proof(i, &l[..n]).as_deref(),
            Some(want.as_slice()),
            "proof of leaf {index} in {size}"
        );
        let r = hash(ROOTS[n]);
        assert!(
            verify_inclusion(index, size, &l[i], &want, &r),
            "{index} in {size}"
        );
        // and not for another leaf, index or tree
        assert!(!verify_inclusion(index, size, &leaf_hash(b"x"), &want, &r));
        assert!(!verify_inclusion(index + 1, size, &l[i], &want, &r));
        if n > 1 {
            assert!(!verify_inclusion(
                index,
                size,
                &l[i],
                &want,
                &hash(ROOTS[n - 1])
            ));
        }
    }
}

#[test]
fn consistency_proofs_match_the_reference_and_verify() {
    let l = leaf_hashes();
    for &(old, new, want) in CONSISTENCY_PROOFS {
        let want = hashes(want);
        assert_eq!(
            consistency_proof(old as usize, &l[..new as usize]).as_deref(),
            Some(want.as_slice()),
            "proof {old} → {new}"
        );
        let (r1, r2) = (hash(ROOTS[old as usize]), hash(ROOTS[new as usize]));
        assert!(
            verify_consistency(old, new, &r1, &r2, &want),
            "{old} → {new}"
        );
        if old != new {
            assert!(!verify_consistency(old, new, &r2, &r1, &want), "swapped");
        }
    }
}

/// The golden probes: a verifier must accept exactly the ones not marked `wantErr`.
mod probes {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Inclusion {
        file: String,
        want_err: bool,
        leaf_idx: u64,
        tree_size: u64,
        leaf_hash: Option<String>,
        root: Option<String>,
        proof: Vec<String>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Consistency {
        file: String,
        want_err: bool,
        size1: u64,
        size2: u64,
        root1: Option<String>,
        root2: Option<String>,
        proof: Vec<String>,
    }

    #[derive(Deserialize)]
    struct Probes {
        commit: String,
        inclusion: Vec<Inclusion>,
        consistency: Vec<Consistency>,
    }

    fn probes() -> Probes {
        serde_json::from_str(include_str!("vectors/transparency-dev-merkle-probes.json"))
            .expect("probes")
    }

    /// A 32-byte hash, or None for any other length (absent, empty, garbage appended).
    fn h32(s: Option<&str>) -> Option<Hash> {
        unhex(s.unwrap_or("")).try_into().ok()
    }

    fn all32(v: &[String]) -> Option<Vec<Hash>> {
        v.iter().map(|s| h32(Some(s))).collect()
    }

    #[test]
    fn inclusion_probes() {
        let p = probes();
        assert!(p.commit.starts_with("417fb0c"));
        assert_eq!(p.inclusion.len(), 98);
        let (mut accepted, mut rejected) = (0, 0);
        for t in &p.inclusion {
            let ok = match (
                h32(t.leaf_hash.as_deref()),
                h32(t.root.as_deref()),
                all32(&t.proof),
            ) {
                (Some(leaf), Some(r), Some(proof)) => {
                    verify_inclusion(t.leaf_idx, t.tree_size, &leaf, &proof, &r)
                }
                _ => {
                    assert!(t.want_err, "{}: not expressible", t.file);
                    continue;
                }
            };
            assert_eq!(ok, !t.want_err, "{}", t.file);
            if ok { accepted += 1 } else { rejected += 1 }
        }
        // every happy path accepted, every corruption of a 32-byte hash rejected
        assert_eq!((accepted, rejected), (6, 66));
    }

    #[test]
    fn consistency_probes() {
        let p = probes();
        assert_eq!(p.consistency.len(), 98);
        let (mut accepted, mut rejected) = (0, 0);
        let mut inexpressible_accepted = Vec::new();
        for t in &p.consistency {
            let ok = match (
                h32(t.root1.as_deref()),
                h32(t.root2.as_deref()),
                all32(&t.proof),
            ) {
                (Some(r1), Some(r2), Some(proof)) => {
                    verify_consistency(t.size1, t.size2, &r1, &r2, &proof)
                }
                _ => {
                    if !t.want_err {
                        inexpressible_accepted.push(t.file.as_str());
                    }
                    continue;
                }
            };
            assert_eq!(ok, !t.want_err, "{}", t.file);
            if ok { accepted += 1 } else { rejected += 1 }
        }
        assert_eq!((accepted, rejected), (5, 66));
        assert_eq!(
            inexpressible_accepted,
            ["consistency/additional/sizes-are-equal-one-and-proof-is-empty.json"]
        );
    }
}
