//! What a storage writer cannot forge: MACs of settings rows and a state summary signed
//! with every audit head.
//!
//! A storage writer (an insider with the database file, ransomware, a backup host) can
//! write any row but holds neither the master key nor the audit key. So:
//!
//! - every settings row (`meta`) carries `HMAC(k_mac, key ‖ value)` under a key derived
//!   from the master key: a row it inserts or edits has no valid MAC;
//! - a row it puts back from an older copy does have one, so the store also keeps a
//!   **state summary**: a multiset hash (the sum modulo 2²⁵⁶ of a keyed hash of each row's
//!   MAC, so adding or replacing a row costs two HMACs) that every commit updates and that
//!   is sealed into the audit head the audit key signs. A restored, removed or added row
//!   changes the sum; the signed head says what it must be;
//! - the summary is stored masked (`XOR HMAC(k_mask, salt)`, a fresh salt per head) and
//!   authenticated (`HMAC(k_tag, head ‖ salt ‖ masked)`), so successive heads reveal
//!   nothing about which rows changed, and a process holding the master key can check a
//!   head another process wrote without the audit key.
//!
//! Every change of a settings row is also committed in the audit log
//! ([`phivault_audit::Write::Setting`]: its key and MAC), so replaying the log names the
//! row a storage writer changed.

use std::collections::HashMap;

use phivault_audit::ChainHead;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Keys derived from the store's integrity secret (itself derived from the master key).
pub struct Integrity {
    mac: hmac::Key,
    /// SHA-256 with a secret 64-byte block absorbed: an element is this state's hash of
    /// the row's prefix-free encoding (one compression a row, where HMAC takes two; the
    /// elements are never seen, only their masked sum, so nothing extends them).
    element: ring::digest::Context,
    mask: hmac::Key,
    tag: hmac::Key,
    /// MACs of rows an engine checks as it reads them (PostgreSQL's heads and versions).
    row: hmac::Key,
}

impl std::fmt::Debug for Integrity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Integrity([redacted])")
    }
}

/// Format byte of a sealed state summary.
const STATE_FORMAT: u8 = 1;
const SALT_LEN: usize = 16;
const DIGESTS_LEN: usize = 96;
const TAG_LEN: usize = 32;
/// Bytes of a sealed state summary.
pub const STATE_LEN: usize = 1 + SALT_LEN + DIGESTS_LEN + TAG_LEN;

impl Integrity {
    /// Keys for `secret` (32 bytes from the master key's hierarchy; the caller keeps
    /// the secret itself zeroized).
    pub fn new(secret: &[u8; 32]) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let sub =
            |label: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&root, label).as_ref());
        let mut element = ring::digest::Context::new(&ring::digest::SHA256);
        element.update(hmac::sign(&root, b"phivault-state-element-v1/a").as_ref());
        element.update(hmac::sign(&root, b"phivault-state-element-v1/b").as_ref());
        Integrity {
            mac: sub(b"phivault-settings-mac-v1"),
            element,
            mask: sub(b"phivault-state-mask-v1"),
            tag: sub(b"phivault-state-tag-v1"),
            row: sub(b"phivault-row-mac-v1"),
        }
    }

    /// The MAC of settings row `key` holding `value`.
    pub fn setting_mac(&self, key: &str, value: &[u8]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.mac);
        ctx.update(&(key.len() as u64).to_be_bytes());
        ctx.update(key.as_bytes());
        ctx.update(value);
        to32(ctx.sign().as_ref())
    }

    /// Whether `mac` is the MAC of settings row `key` holding `value` (constant time).
    pub fn setting_ok(&self, key: &str, value: &[u8], mac: &[u8]) -> bool {
        let mut m = Vec::with_capacity(8 + key.len() + value.len());
        m.extend_from_slice(&(key.len() as u64).to_be_bytes());
        m.extend_from_slice(key.as_bytes());
        m.extend_from_slice(value);
        hmac::verify(&self.mac, &m, mac).is_ok()
    }

    /// The MAC of a stored row of kind `kind` made of `parts` (each length-prefixed, so
    /// the encoding is unambiguous).
    pub(crate) fn row_mac(&self, kind: u8, parts: &[&[u8]]) -> [u8; 32] {
        to32(hmac::sign(&self.row, &row_message(kind, parts)).as_ref())
    }

    /// Whether `mac` is [`Integrity::row_mac`] of the row (constant time).
    pub(crate) fn row_mac_ok(&self, kind: u8, parts: &[&[u8]], mac: &[u8]) -> bool {
        hmac::verify(&self.row, &row_message(kind, parts), mac).is_ok()
    }

    /// A settings row's contribution to the summary: a keyed hash of its MAC (the MACs
    /// themselves are stored, so their plain sum could be steered by chosen rows).
    pub(crate) fn setting_element(&self, mac: &[u8; 32]) -> Sum {
        self.element(b'm', &[mac])
    }

    fn element(&self, kind: u8, parts: &[&[u8]]) -> Sum {
        // the encoding (kind, then each part's length and bytes) is prefix-free
        let mut m = [0u8; 160];
        let mut n = 0;
        let put = |bytes: &[u8], m: &mut [u8; 160], n: &mut usize| {
            if *n + bytes.len() <= m.len() {
                m[*n..*n + bytes.len()].copy_from_slice(bytes);
            }
            *n += bytes.len();
        };
        put(&[kind], &mut m, &mut n);
        for p in parts {
            put(&(p.len() as u64).to_be_bytes(), &mut m, &mut n);
            put(p, &mut m, &mut n);
        }
        let mut ctx = self.element.clone();
        if n <= m.len() {
            ctx.update(&m[..n]);
        } else {
            // (a long row: hashed part by part, the same bytes)
            ctx.update(&[kind]);
            for p in parts {
                ctx.update(&(p.len() as u64).to_be_bytes());
                ctx.update(p);
            }
        }
        Sum::from_bytes(ctx.finish().as_ref())
    }

    /// A resource's head (`resource_no`): its number, type, id, current version and
    /// whether that is a tombstone.
    pub(crate) fn head_element(&self, rno: i64, rtype: &str, id: &str, head: Head) -> Sum {
        self.element(
            b'h',
            &[
                &rno.to_be_bytes(),
                rtype.as_bytes(),
                id.as_bytes(),
                &head.version.to_be_bytes(),
                &[u8::from(head.deleted)],
            ],
        )
    }

    /// A stored version: identifiers in clear (its resource's number among them), and the
    /// SHA-256 of its sealed bytes.
    pub(crate) fn version_element(
        &self,
        row: &crate::VersionRow,
        rno: i64,
        sealed: &[u8; 32],
    ) -> Sum {
        self.element(
            b'v',
            &[
                &rno.to_be_bytes(),
                row.rtype.as_bytes(),
                row.id.as_bytes(),
                &row.version.to_be_bytes(),
                &[u8::from(row.deleted)],
                &row.updated_ms.to_be_bytes(),
                row.key_id.as_bytes(),
                sealed,
            ],
        )
    }

    /// A blind-index posting: index number, token, and the resource it leads to by type
    /// and id (so a write's postings are summed before the writer numbers a new resource,
    /// on the caller's thread; the number → id map is in the resources' heads).
    pub(crate) fn posting_element(&self, ix: i64, token: &[u8], rtype: &str, id: &str) -> Sum {
        self.element(
            b'p',
            &[&ix.to_be_bytes(), token, rtype.as_bytes(), id.as_bytes()],
        )
    }

    /// A data key row: its id and wrapped form (empty once erased).
    pub(crate) fn key_element(&self, key_id: &str, wrapped: &[u8]) -> Sum {
        self.element(b'k', &[key_id.as_bytes(), wrapped])
    }

    /// A signed checkpoint of the audit log (its stored tree, which only the newest keeps,
    /// is not counted).
    pub(crate) fn checkpoint_element(
        &self,
        size: i64,
        root: &[u8],
        time_ms: i64,
        signature: &[u8],
    ) -> Sum {
        self.element(
            b'c',
            &[&size.to_be_bytes(), root, &time_ms.to_be_bytes(), signature],
        )
    }

    /// A KEK generation row.
    pub(crate) fn kek_element(&self, generation: i64, wrapped: &[u8], created_ms: i64) -> Sum {
        self.element(
            b'g',
            &[
                &generation.to_be_bytes(),
                wrapped,
                &created_ms.to_be_bytes(),
            ],
        )
    }

    /// The sealed summary of `digests` to store and sign with `head`.
    pub fn seal_state(&self, head: &ChainHead, digests: &Digests) -> Vec<u8> {
        let mut salt = [0u8; SALT_LEN];
        // (the system's random source does not fail once the process has started; a
        // zero salt would still be correct, only linkable)
        let _ = SystemRandom::new().fill(&mut salt);
        let mut out = Vec::with_capacity(STATE_LEN);
        out.push(STATE_FORMAT);
        out.extend_from_slice(&salt);
        let mask = self.mask_for(&salt);
        let plain = digests.to_bytes();
        out.extend(plain.iter().zip(mask).map(|(a, b)| a ^ b));
        let tag = self.state_tag(head, &out);
        out.extend_from_slice(&tag);
        out
    }

    /// The summary sealed with `head` by [`Integrity::seal_state`]; `None` if it was not
    /// sealed under these keys for this head.
    pub fn open_state(&self, head: &ChainHead, sealed: &[u8]) -> Option<Digests> {
        if sealed.len() != STATE_LEN || sealed[0] != STATE_FORMAT {
            return None;
        }
        let (body, tag) = sealed.split_at(STATE_LEN - TAG_LEN);
        let mut m = Vec::with_capacity(48 + body.len());
        state_tag_message(&mut m, head, body);
        hmac::verify(&self.tag, &m, tag).ok()?;
        let salt = &body[1..1 + SALT_LEN];
        let mask = self.mask_for(salt);
        let plain: Vec<u8> = body[1 + SALT_LEN..]
            .iter()
            .zip(mask)
            .map(|(a, b)| a ^ b)
            .collect();
        Some(Digests::from_bytes(&plain))
    }

    /// The one-time mask of a sealed summary: `HMAC(k_mask, salt ‖ i)` for blocks i = 0, 1, 2.
    fn mask_for(&self, salt: &[u8]) -> [u8; DIGESTS_LEN] {
        let mut out = [0u8; DIGESTS_LEN];
        for (i, block) in out.chunks_mut(32).enumerate() {
            let mut ctx = hmac::Context::with_key(&self.mask);
            ctx.update(salt);
            ctx.update(&[i as u8]);
            block.copy_from_slice(ctx.sign().as_ref());
        }
        out
    }

    fn state_tag(&self, head: &ChainHead, body: &[u8]) -> [u8; 32] {
        let mut m = Vec::with_capacity(48 + body.len());
        state_tag_message(&mut m, head, body);
        to32(hmac::sign(&self.tag, &m).as_ref())
    }
}

fn state_tag_message(m: &mut Vec<u8>, head: &ChainHead, body: &[u8]) {
    m.extend_from_slice(b"phivault-state-v1\0");
    m.extend_from_slice(&head.size.to_be_bytes());
    m.extend_from_slice(&head.hash);
    m.extend_from_slice(body);
}

fn row_message(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Vec::with_capacity(1 + parts.iter().map(|p| 8 + p.len()).sum::<usize>());
    m.push(kind);
    for p in parts {
        m.extend_from_slice(&(p.len() as u64).to_be_bytes());
        m.extend_from_slice(p);
    }
    m
}

fn to32(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&b[..32]);
    out
}

/// An element of a multiset hash: a 256-bit number; the hash of a multiset is the sum of
/// its elements modulo 2²⁵⁶.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sum([u64; 4]);

impl Sum {
    fn from_bytes(b: &[u8]) -> Sum {
        let mut limbs = [0u64; 4];
        for (i, l) in limbs.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            *l = u64::from_le_bytes(w);
        }
        Sum(limbs)
    }

    fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, l) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&l.to_le_bytes());
        }
        out
    }

    /// Add an element (a row joins the multiset).
    pub fn add(&mut self, e: Sum) {
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(e.0) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
    }

    /// Remove an element (a row leaves the multiset).
    pub fn sub(&mut self, e: Sum) {
        let mut borrow = false;
        for (a, b) in self.0.iter_mut().zip(e.0) {
            let (s1, c1) = a.overflowing_sub(b);
            let (s2, c2) = s1.overflowing_sub(u64::from(borrow));
            *a = s2;
            borrow = c1 || c2;
        }
    }
}

/// The state summary signed with each audit head: three multiset hashes, each over rows
/// of one kind. The first two are small enough to check at every open; the third covers
/// the bulk and is checked by the background verifier and `phivault verify`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// The settings rows (their MACs).
    pub settings: Sum,
    /// The resources' heads: number, type, id, current version, tombstone or not.
    pub heads: Sum,
    /// Every stored version (with the SHA-256 of its sealed bytes), every live index
    /// posting, every data key row and every KEK generation row.
    pub body: Sum,
}

impl Digests {
    fn to_bytes(self) -> [u8; DIGESTS_LEN] {
        let mut out = [0u8; DIGESTS_LEN];
        out[..32].copy_from_slice(&self.settings.to_bytes());
        out[32..64].copy_from_slice(&self.heads.to_bytes());
        out[64..].copy_from_slice(&self.body.to_bytes());
        out
    }

    fn from_bytes(b: &[u8]) -> Digests {
        Digests {
            settings: Sum::from_bytes(&b[..32]),
            heads: Sum::from_bytes(&b[32..64]),
            body: Sum::from_bytes(&b[64..96]),
        }
    }
}

/// A resource's current version as this process knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    /// The resource number.
    pub(crate) rno: i64,
    /// The current version.
    pub(crate) version: u64,
    /// Whether it is a tombstone.
    pub(crate) deleted: bool,
}

/// What the store wrote, as this process knows it: the MAC of every settings row. A
/// row read from storage must be the one written (same MAC); one that differs is a
/// storage writer's doing, or another process's write not yet seen (the store then
/// catches up with the log and looks again).
#[derive(Debug, Default)]
pub(crate) struct Known {
    pub(crate) settings: HashMap<String, [u8; 32]>,
    /// Every resource's head, keyed by [`Known::key`] of its type and id (16 bytes a
    /// resource instead of its names: about 40 bytes a resource in all).
    pub(crate) heads: HashMap<u128, Head>,
    hashers: (std::hash::RandomState, std::hash::RandomState),
}

impl Known {
    /// An empty `Known` whose keys are this one's (the heads thread fills it).
    pub(crate) fn like(&self) -> Known {
        Known {
            settings: HashMap::new(),
            heads: HashMap::new(),
            hashers: self.hashers.clone(),
        }
    }

    /// The map key of a resource: 128 bits of two keyed SipHashes (keys random per
    /// process, so ids chosen to collide cannot be computed ahead).
    pub(crate) fn key(&self, rtype: &str, id: &str) -> u128 {
        use std::hash::BuildHasher as _;
        let a = self.hashers.0.hash_one((rtype, id));
        let b = self.hashers.1.hash_one((rtype, id));
        (u128::from(a) << 64) | u128::from(b)
    }

    /// The head this process knows for a resource.
    pub(crate) fn head(&self, rtype: &str, id: &str) -> Option<Head> {
        self.heads.get(&self.key(rtype, id)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k() -> Integrity {
        Integrity::new(&[5u8; 32])
    }

    #[test]
    fn sums_are_order_free_and_invertible() {
        let i = k();
        let a = i.setting_element(&[1; 32]);
        let b = i.setting_element(&[2; 32]);
        let mut x = Sum::default();
        x.add(a);
        x.add(b);
        let mut y = Sum::default();
        y.add(b);
        y.add(a);
        assert_eq!(x, y);
        y.sub(a);
        assert_eq!(y, {
            let mut z = Sum::default();
            z.add(b);
            z
        });
        // carries: max + 1 wraps to zero, and back
        let mut m = Sum([u64::MAX; 4]);
        m.add(Sum([1, 0, 0, 0]));
        assert_eq!(m, Sum::default());
        m.sub(Sum([1, 0, 0, 0]));
        assert_eq!(m, Sum([u64::MAX; 4]));
    }

    #[test]
    fn macs_bind_key_and_value() {
        let i = k();
        let mac = i.setting_mac("client:a", b"{}");
        assert!(i.setting_ok("client:a", b"{}", &mac));
        assert!(!i.setting_ok("client:b", b"{}", &mac));
        assert!(!i.setting_ok("client:a", b"{ }", &mac));
        // the key and value boundary is unambiguous
        assert_ne!(i.setting_mac("ab", b"c"), i.setting_mac("a", b"bc"));
        assert!(!Integrity::new(&[6u8; 32]).setting_ok("client:a", b"{}", &mac));
    }

    #[test]
    fn state_opens_for_its_head_and_keys_only() {
        let i = k();
        let head = ChainHead {
            size: 7,
            hash: [3; 32],
        };
        let mut d = Digests::default();
        d.settings.add(i.setting_element(&[9; 32]));
        let s1 = i.seal_state(&head, &d);
        let s2 = i.seal_state(&head, &d);
        assert_ne!(s1, s2, "a fresh salt per head");
        assert_eq!(i.open_state(&head, &s1), Some(d));
        let other = ChainHead { size: 8, ..head };
        assert_eq!(i.open_state(&other, &s1), None);
        assert_eq!(Integrity::new(&[6u8; 32]).open_state(&head, &s1), None);
        for pos in 0..s1.len() {
            let mut bad = s1.clone();
            bad[pos] ^= 1;
            assert_eq!(i.open_state(&head, &bad), None, "byte {pos}");
        }
        assert!(format!("{i:?}").contains("redacted"));
    }
}
