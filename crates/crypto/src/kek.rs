//! Generations of the key-encryption key, and the daily key of paging cursors (issue 17).
//!
//! ```text
//! PRK ─ HKDF-Expand(PRK, LABEL_KEK)          generation 0: the KEK of data directories
//!     │                                      written before generations (format-1 wraps)
//!     ├ HKDF-Expand(PRK, LABEL_KEK_WRAP)     KEK-wrapping key
//!     │     └ wraps generation g ≥ 1: 32 random bytes, AAD = [2] ‖ "phivault-kek-gen-v1" ‖ g
//!     │           └ wraps data keys: [2][g u32 BE][nonce 12][AES-256-GCM(KEK_g, dek) ‖ tag]
//!     │                               AAD = [2] ‖ "phivault-dek-v1" ‖ key_id ‖ g
//!     └ HKDF-Expand(PRK, LABEL_CURSOR_ROOT)  cursor root
//!           └ HKDF-Expand(root, "phivault-cursor-day-v1:" ‖ day)   the key of one UTC day
//! ```
//!
//! A wrapped data key names its generation, so reads work while a rotation rewraps keys
//! from one generation to the next; a generation is forgotten (and its wrapped row
//! destroyed by the store) once no data key names it. Generation 0 derives from the master
//! key, so it cannot be destroyed, only retired: after the first rotation it is no longer
//! derived. Each generation counts its wraps ([`crate::SEAL_LIMIT`]).

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use crate::keys::{
    DEK_AAD_LABEL, KeyHierarchy, NONCE_LEN, TAG_LEN, WRAPPED_DATA_KEY_LEN, aead_open, aead_seal,
    dek_aad, hkdf_expand, push_lp,
};
use crate::{CryptoError, DataKey, Secret, random_bytes};

/// HKDF info of the key that wraps KEK generations.
pub const LABEL_KEK_WRAP: &str = "phivault-kek-wrap-v1";
/// HKDF info of the root of the daily cursor keys.
pub const LABEL_CURSOR_ROOT: &str = "phivault-cursor-root-v1";
/// Prefix of the HKDF info of one day's cursor key (`prefix ‖ day u32 BE`, under the root).
pub const LABEL_CURSOR_DAY_PREFIX: &str = "phivault-cursor-day-v1:";
const KEK_AAD_LABEL: &str = "phivault-kek-gen-v1";
const CURSOR_AAD_LABEL: &str = "phivault-cursor-v1";
/// Format byte of data keys wrapped under a KEK generation ≥ 1, and of wrapped generations.
const WRAP_FORMAT_V2: u8 = 2;
/// Format byte of sealed paging cursors.
const CURSOR_FORMAT: u8 = 3;
/// Length of a data key wrapped under a generation ≥ 1: format, generation, nonce, key, tag.
pub const WRAPPED_DATA_KEY_V2_LEN: usize = 1 + 4 + NONCE_LEN + 32 + TAG_LEN;
const DAY_MS: i64 = 86_400_000;

/// The KEKs this process knows, by generation, and the one new wraps use.
pub(crate) struct KekRing {
    current: u32,
    keys: BTreeMap<u32, Zeroizing<[u8; 32]>>,
}

impl KekRing {
    /// Generation 0 only (the HKDF-derived KEK).
    pub(crate) fn derived(kek0: Zeroizing<[u8; 32]>) -> Self {
        KekRing {
            current: 0,
            keys: BTreeMap::from([(0, kek0)]),
        }
    }

    #[cfg(test)]
    pub(crate) fn keys_for_test(&self, generation: u32) -> &Zeroizing<[u8; 32]> {
        &self.keys[&generation]
    }
}

/// The generation a wrapped data key names (0 for the format-1 wraps of generation 0), or
/// None if it is not a wrapped data key.
pub fn data_key_generation(wrapped: &[u8]) -> Option<u32> {
    match wrapped.first() {
        Some(1) if wrapped.len() == WRAPPED_DATA_KEY_LEN => Some(0),
        Some(2) if wrapped.len() == WRAPPED_DATA_KEY_V2_LEN => {
            let g = u32::from_be_bytes(wrapped[1..5].try_into().ok()?);
            (g != 0).then_some(g)
        }
        _ => None,
    }
}

/// The leading bytes every data key wrapped under `generation` starts with.
pub fn kek_generation_prefix(generation: u32) -> Vec<u8> {
    if generation == 0 {
        vec![1]
    } else {
        let mut p = vec![WRAP_FORMAT_V2];
        p.extend_from_slice(&generation.to_be_bytes());
        p
    }
}

fn dek_aad_v2(key_id: &str, generation: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(1 + 8 + DEK_AAD_LABEL.len() + 8 + key_id.len() + 4);
    aad.push(WRAP_FORMAT_V2);
    push_lp(&mut aad, DEK_AAD_LABEL.as_bytes());
    push_lp(&mut aad, key_id.as_bytes());
    aad.extend_from_slice(&generation.to_be_bytes());
    aad
}

fn kek_aad(generation: u32) -> Vec<u8> {
    let mut aad = vec![WRAP_FORMAT_V2];
    push_lp(&mut aad, KEK_AAD_LABEL.as_bytes());
    aad.extend_from_slice(&generation.to_be_bytes());
    aad
}

fn cursor_aad(day: u32) -> Vec<u8> {
    let mut aad = vec![CURSOR_FORMAT];
    push_lp(&mut aad, CURSOR_AAD_LABEL.as_bytes());
    aad.extend_from_slice(&day.to_be_bytes());
    aad
}

/// `[format][4 bytes][nonce][ct ‖ tag]` from `[format][nonce][ct ‖ tag]`.
fn with_number(sealed: Vec<u8>, n: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(sealed.len() + 4);
    out.push(sealed[0]);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&sealed[1..]);
    out
}

/// `[format][nonce][ct ‖ tag]` and the number from `[format][4 bytes][nonce][ct ‖ tag]`.
fn without_number(sealed: &[u8]) -> Option<(u32, Vec<u8>)> {
    if sealed.len() < 5 {
        return None;
    }
    let n = u32::from_be_bytes(sealed[1..5].try_into().ok()?);
    let mut v = Vec::with_capacity(sealed.len() - 4);
    v.push(sealed[0]);
    v.extend_from_slice(&sealed[5..]);
    Some((n, v))
}

fn lock_err<T>(e: std::sync::PoisonError<T>) -> T {
    e.into_inner()
}

impl KeyHierarchy {
    /// The KEK generation new data keys are wrapped under.
    pub fn kek_generation(&self) -> u32 {
        self.keks.read().unwrap_or_else(lock_err).current
    }

    /// The generations this hierarchy can unwrap, ascending.
    pub fn kek_generations(&self) -> Vec<u32> {
        let ring = self.keks.read().unwrap_or_else(lock_err);
        ring.keys.keys().copied().collect()
    }

    /// A new random KEK for `generation` (≥ 1, not yet known), known from now on but not
    /// yet current; returns its wrapped form, to be stored before anything uses it.
    pub fn new_kek_generation(&self, generation: u32) -> Result<Vec<u8>, CryptoError> {
        if generation == 0
            || self
                .keks
                .read()
                .unwrap_or_else(lock_err)
                .keys
                .contains_key(&generation)
        {
            return Err(CryptoError::InvalidArgument("KEK generation exists"));
        }
        let kek = Zeroizing::new(random_bytes::<32>()?);
        self.seals.take("kek-wrap")?;
        let wrapped = aead_seal(
            &self.kek_wrap,
            WRAP_FORMAT_V2,
            &kek_aad(generation),
            &kek[..],
        )?;
        let mut ring = self.keks.write().unwrap_or_else(lock_err);
        ring.keys.insert(generation, kek);
        Ok(wrapped)
    }

    /// Learn generation `generation` from its stored wrapped form (or, for generation 0,
    /// derive it again: `wrapped` is then empty).
    pub fn install_kek_generation(
        &self,
        generation: u32,
        wrapped: &[u8],
    ) -> Result<(), CryptoError> {
        let kek = if generation == 0 {
            hkdf_expand(&self.prk, &[crate::LABEL_KEK.as_bytes()])
        } else {
            let plain = aead_open(
                &self.kek_wrap,
                WRAP_FORMAT_V2,
                &kek_aad(generation),
                wrapped,
            )?;
            let k: [u8; 32] = plain
                .as_slice()
                .try_into()
                .map_err(|_| CryptoError::Integrity)?;
            Zeroizing::new(k)
        };
        self.keks
            .write()
            .unwrap_or_else(lock_err)
            .keys
            .insert(generation, kek);
        Ok(())
    }

    /// Make `generation` (known) the one new data keys are wrapped under.
    pub fn set_kek_generation(&self, generation: u32) -> Result<(), CryptoError> {
        let mut ring = self.keks.write().unwrap_or_else(lock_err);
        if !ring.keys.contains_key(&generation) {
            return Err(CryptoError::InvalidArgument("unknown KEK generation"));
        }
        ring.current = generation;
        Ok(())
    }

    /// Forget a generation that is not current (its KEK is zeroized).
    pub fn forget_kek_generation(&self, generation: u32) -> Result<(), CryptoError> {
        let mut ring = self.keks.write().unwrap_or_else(lock_err);
        if ring.current == generation {
            return Err(CryptoError::InvalidArgument("the current KEK generation"));
        }
        ring.keys.remove(&generation);
        Ok(())
    }

    /// Wrap a data key under the current generation.
    pub(crate) fn wrap_current(&self, key_id: &str, dek: &DataKey) -> Result<Vec<u8>, CryptoError> {
        let (generation, kek) = {
            let ring = self.keks.read().unwrap_or_else(lock_err);
            let k = ring
                .keys
                .get(&ring.current)
                .ok_or(CryptoError::InvalidKey("KEK generation"))?;
            (ring.current, Zeroizing::new(**k))
        };
        self.seals.take(&format!("kek.{generation}"))?;
        if generation == 0 {
            return aead_seal(&kek, 1, &dek_aad(key_id), &dek.key);
        }
        let sealed = aead_seal(
            &kek,
            WRAP_FORMAT_V2,
            &dek_aad_v2(key_id, generation),
            &dek.key,
        )?;
        Ok(with_number(sealed, generation))
    }

    /// Unwrap a data key under whichever known generation it names.
    pub(crate) fn unwrap_any(&self, key_id: &str, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        let generation = data_key_generation(wrapped).ok_or(CryptoError::Integrity)?;
        let kek = {
            let ring = self.keks.read().unwrap_or_else(lock_err);
            Zeroizing::new(**ring.keys.get(&generation).ok_or(CryptoError::Integrity)?)
        };
        let plain = if generation == 0 {
            aead_open(&kek, 1, &dek_aad(key_id), wrapped)?
        } else {
            let (_, inner) = without_number(wrapped).ok_or(CryptoError::Integrity)?;
            aead_open(
                &kek,
                WRAP_FORMAT_V2,
                &dek_aad_v2(key_id, generation),
                &inner,
            )?
        };
        let key: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Integrity)?;
        Ok(DataKey { key })
    }

    /// The data key `wrapped` wrapped again under the current generation, or None if it
    /// already is (rotation: the records it seals stay as they are).
    pub fn rewrap_data_key(
        &self,
        key_id: &str,
        wrapped: &[u8],
    ) -> Result<Option<Vec<u8>>, CryptoError> {
        if data_key_generation(wrapped) == Some(self.kek_generation()) {
            return Ok(None);
        }
        let dek = self.unwrap_any(key_id, wrapped)?;
        self.wrap_current(key_id, &dek).map(Some)
    }

    /// Resume the seal counters from their durable reservations and make further
    /// reservations durable through `hook` (see [`crate::ReserveSeals`]).
    pub fn install_seal_counts(&self, stored: &[(String, u64)], hook: crate::ReserveSeals) {
        self.seals.install(stored, hook);
    }

    /// Seals counted so far for the key named `name` (`secret`, `kek.<g>`, `cursor.<day>`).
    pub fn seals_used(&self, name: &str) -> u64 {
        self.seals.used(name)
    }

    fn cursor_key(&self, day: u32) -> Zeroizing<[u8; 32]> {
        hkdf_expand(
            &self.cursor_root,
            &[LABEL_CURSOR_DAY_PREFIX.as_bytes(), &day.to_be_bytes()],
        )
    }

    /// Seal a paging cursor under the key of the UTC day of `now_ms`:
    /// `[3][day u32 BE][nonce 12][ciphertext ‖ tag 16]`, the day bound as associated data.
    pub fn seal_cursor(&self, plaintext: &[u8], now_ms: i64) -> Result<Vec<u8>, CryptoError> {
        if plaintext.len() > crate::MAX_PLAINTEXT_LEN {
            return Err(CryptoError::InvalidArgument("cursor too large"));
        }
        let day = u32::try_from(now_ms.div_euclid(DAY_MS))
            .map_err(|_| CryptoError::InvalidArgument("time"))?;
        self.seals.take(&format!("cursor.{day}"))?;
        let sealed = aead_seal(
            &self.cursor_key(day),
            CURSOR_FORMAT,
            &cursor_aad(day),
            plaintext,
        )?;
        Ok(with_number(sealed, day))
    }

    /// Open a cursor sealed today or yesterday (UTC, by `now_ms`); anything else,
    /// including a cursor of an older day, is [`CryptoError::Integrity`].
    pub fn open_cursor(&self, sealed: &[u8], now_ms: i64) -> Result<Secret<Vec<u8>>, CryptoError> {
        let today = now_ms.div_euclid(DAY_MS);
        let (day, inner) = without_number(sealed).ok_or(CryptoError::Integrity)?;
        if sealed[0] != CURSOR_FORMAT || !(today - 1..=today).contains(&i64::from(day)) {
            return Err(CryptoError::Integrity);
        }
        let mut plain = aead_open(
            &self.cursor_key(day),
            CURSOR_FORMAT,
            &cursor_aad(day),
            &inner,
        )?;
        Ok(Secret::new(std::mem::take(&mut *plain)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MasterKey;

    fn hierarchy(byte: u8) -> KeyHierarchy {
        KeyHierarchy::new(&MasterKey::from_bytes(&[byte; 32]))
    }

    #[test]
    fn generation_zero_is_the_format_one_wrap_of_before() {
        let h = hierarchy(1);
        assert_eq!(h.kek_generation(), 0);
        let (dek, w) = h.new_data_key("p:1").expect("key");
        assert_eq!(w.len(), WRAPPED_DATA_KEY_LEN);
        assert_eq!(w[0], 1);
        assert_eq!(data_key_generation(&w), Some(0));
        assert!(w.starts_with(&kek_generation_prefix(0)));
        assert_eq!(h.unwrap_data_key("p:1", &w).expect("unwrap").key, dek.key);
    }

    #[test]
    fn generations_wrap_rewrap_and_are_forgotten() {
        let h = hierarchy(1);
        let (dek, w0) = h.new_data_key("p:1").expect("key");
        let stored1 = h.new_kek_generation(1).expect("gen 1");
        assert!(
            h.new_kek_generation(1).is_err(),
            "a generation is made once"
        );
        // known but not current: new wraps stay on generation 0
        assert_eq!(
            data_key_generation(&h.new_data_key("p:2").expect("k").1),
            Some(0)
        );
        h.set_kek_generation(1).expect("switch");
        let w1 = h
            .rewrap_data_key("p:1", &w0)
            .expect("rewrap")
            .expect("changed");
        assert_eq!(w1.len(), WRAPPED_DATA_KEY_V2_LEN);
        assert_eq!(data_key_generation(&w1), Some(1));
        assert!(w1.starts_with(&kek_generation_prefix(1)));
        assert!(h.rewrap_data_key("p:1", &w1).expect("rewrap").is_none());
        // both generations open while both are known
        assert_eq!(h.unwrap_data_key("p:1", &w0).expect("old").key, dek.key);
        assert_eq!(h.unwrap_data_key("p:1", &w1).expect("new").key, dek.key);
        assert!(
            h.unwrap_data_key("p:2", &w1).is_err(),
            "bound to its key id"
        );
        // the generation number is authenticated
        let mut moved = w1.clone();
        moved[4] = 9;
        assert!(h.unwrap_data_key("p:1", &moved).is_err());
        for i in 0..w1.len() {
            let mut bad = w1.clone();
            bad[i] ^= 1;
            assert!(h.unwrap_data_key("p:1", &bad).is_err(), "flip at {i}");
        }
        assert!(h.forget_kek_generation(1).is_err(), "not the current one");
        h.forget_kek_generation(0).expect("retire 0");
        assert!(h.unwrap_data_key("p:1", &w0).is_err());
        assert_eq!(h.kek_generations(), vec![1]);

        // another process with the same master key learns generation 1 from its row
        let other = hierarchy(1);
        other.install_kek_generation(1, &stored1).expect("install");
        assert_eq!(
            other.unwrap_data_key("p:1", &w1).expect("open").key,
            dek.key
        );
        assert!(
            other.install_kek_generation(2, &stored1).is_err(),
            "bound to its number"
        );
        assert!(
            hierarchy(2).install_kek_generation(1, &stored1).is_err(),
            "another master"
        );
        assert_eq!(other.seals_used("kek.1"), 0);
        assert_eq!(h.seals_used("kek.1"), 1);
        assert_eq!(h.seals_used("kek.0"), 2);
    }

    #[test]
    fn cursors_open_today_and_yesterday_only() {
        let h = hierarchy(1);
        let day = 20_000 * DAY_MS;
        let c = h.seal_cursor(b"position", day + 5).expect("seal");
        assert_eq!(c[0], CURSOR_FORMAT);
        assert_eq!(
            h.open_cursor(&c, day + 10).expect("today").expose(),
            b"position"
        );
        assert_eq!(
            h.open_cursor(&c, day + DAY_MS + 1)
                .expect("tomorrow")
                .expose(),
            b"position"
        );
        assert!(h.open_cursor(&c, day + 2 * DAY_MS).is_err(), "two days on");
        assert!(h.open_cursor(&c, day - 1).is_err(), "before it was sealed");
        assert!(hierarchy(2).open_cursor(&c, day).is_err());
        let mut moved = c.clone();
        moved[4] ^= 1; // another day's number: another key and other associated data
        assert!(h.open_cursor(&moved, day + DAY_MS).is_err());
        // a cursor is not a sealed secret and the other way round
        assert!(h.open_secret("search-cursor-v1", &c).is_err());
        let s = h.seal_secret("x", b"y").expect("seal");
        assert!(h.open_cursor(&s, day).is_err());
        assert_eq!(h.seals_used(&format!("cursor.{}", 20_000)), 1);
        assert_eq!(h.seals_used("secret"), 1);
    }
}
