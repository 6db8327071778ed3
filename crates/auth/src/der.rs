//! A tiny, strict DER walker: just enough to pull the private scalar out of the PKCS#8
//! document ring produces for an ECDSA P-384 key.
//!
//! ```text
//! PrivateKeyInfo ::= SEQUENCE {
//!   version INTEGER (0 | 1),
//!   algorithm SEQUENCE { OID id-ecPublicKey, OID secp384r1 },
//!   privateKey OCTET STRING {           -- contains:
//!     ECPrivateKey ::= SEQUENCE {
//!       version INTEGER (1),
//!       privateKey OCTET STRING (48 bytes),
//!       parameters [0] OPTIONAL,
//!       publicKey [1] OPTIONAL } },
//!   ... }
//! ```
//!
//! Definite lengths only, minimal length encoding, no trailing bytes inside the parsed
//! structures.

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;

/// 1.2.840.10045.2.1
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// 1.3.132.0.34
const OID_SECP384R1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    /// Reads one TLV with the given tag and returns its contents.
    fn read(&mut self, tag: u8) -> Option<&'a [u8]> {
        let (&t, rest) = self.buf.split_first()?;
        if t != tag {
            return None;
        }
        let (&l0, mut rest) = rest.split_first()?;
        let len = if l0 < 0x80 {
            usize::from(l0)
        } else {
            let n = usize::from(l0 & 0x7f);
            if n == 0 || n > 2 {
                return None; // indefinite or absurdly long
            }
            let (lb, r) = rest.split_at_checked(n)?;
            rest = r;
            let mut len = 0usize;
            for &b in lb {
                len = (len << 8) | usize::from(b);
            }
            // minimal encoding
            if len < 0x80 || (n == 2 && len < 0x100) {
                return None;
            }
            len
        };
        let (content, rest) = rest.split_at_checked(len)?;
        self.buf = rest;
        Some(content)
    }

    fn read_small_uint(&mut self) -> Option<u8> {
        match self.read(INTEGER)? {
            [v] if *v < 0x80 => Some(*v),
            _ => None,
        }
    }
}

/// Extracts the 48-byte private scalar `d` from a P-384 ECDSA PKCS#8 (v1 or v2) document.
pub(crate) fn p384_private_scalar_from_pkcs8(pkcs8: &[u8]) -> Option<&[u8]> {
    let mut outer = Reader::new(pkcs8);
    let mut pki = Reader::new(outer.read(SEQUENCE)?);
    if !outer.is_empty() {
        return None;
    }
    if pki.read_small_uint()? > 1 {
        return None;
    }
    let mut alg = Reader::new(pki.read(SEQUENCE)?);
    if alg.read(OID)? != OID_EC_PUBLIC_KEY || alg.read(OID)? != OID_SECP384R1 || !alg.is_empty() {
        return None;
    }
    let mut wrapped = Reader::new(pki.read(OCTET_STRING)?);
    let mut ec = Reader::new(wrapped.read(SEQUENCE)?);
    if !wrapped.is_empty() {
        return None;
    }
    if ec.read_small_uint()? != 1 {
        return None;
    }
    let d = ec.read(OCTET_STRING)?;
    if d.len() != 48 {
        return None;
    }
    // Optional [0] parameters and [1] public key: must be well-formed, nothing else.
    if ec.peek_tag() == Some(0xa0) {
        ec.read(0xa0)?;
    }
    if ec.peek_tag() == Some(0xa1) {
        ec.read(0xa1)?;
    }
    if !ec.is_empty() {
        return None;
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    #[test]
    fn extracts_scalar_that_round_trips() {
        let rng = SystemRandom::new();
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).expect("generate");
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, doc.as_ref(), &rng)
            .expect("parse");
        let d = p384_private_scalar_from_pkcs8(doc.as_ref()).expect("scalar");
        let again = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P384_SHA384_FIXED_SIGNING,
            d,
            kp.public_key().as_ref(),
            &rng,
        )
        .expect("round trip");
        assert_eq!(again.public_key().as_ref(), kp.public_key().as_ref());
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        let rng = SystemRandom::new();
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).expect("generate");
        let bytes = doc.as_ref();
        for n in 0..bytes.len() {
            assert!(
                p384_private_scalar_from_pkcs8(&bytes[..n]).is_none(),
                "truncated at {n}"
            );
        }
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        assert!(p384_private_scalar_from_pkcs8(&trailing).is_none());
        assert!(p384_private_scalar_from_pkcs8(&[]).is_none());
        assert!(p384_private_scalar_from_pkcs8(&[0x30, 0x80, 0, 0]).is_none());
        // an Ed25519 PKCS#8 is not a P-384 key
        let ed = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("ed");
        assert!(p384_private_scalar_from_pkcs8(ed.as_ref()).is_none());
    }
}
