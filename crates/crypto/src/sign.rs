//! Ed25519 signing (token signing, audit checkpoints) with ring.

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

use crate::{CryptoError, Secret};

/// An Ed25519 key pair. `Debug` prints `[redacted]`.
///
/// Keep the private key as PKCS#8 sealed with [`crate::KeyHierarchy::seal_secret`]; load it
/// with [`SigningKey::from_pkcs8`]. ring's key pair does not zeroize its memory on drop.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

impl SigningKey {
    /// A new key pair as a PKCS#8 v2 document (it includes the public key).
    pub fn generate_pkcs8() -> Result<Secret<Vec<u8>>, CryptoError> {
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| CryptoError::Rng)?;
        Ok(Secret::new(doc.as_ref().to_vec()))
    }

    /// Loads a PKCS#8 v2 Ed25519 key (as made by [`SigningKey::generate_pkcs8`]); the
    /// embedded public key must match the private key. PKCS#8 v1 (no public key) is refused.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CryptoError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(|pair| Self { pair })
            .map_err(|_| CryptoError::InvalidKey("not a valid PKCS#8 v2 Ed25519 key"))
    }

    /// Signs `msg` (Ed25519 is deterministic).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let sig = self.pair.sign(msg);
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        out
    }

    /// The 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }
}

/// Verifies an Ed25519 signature. Any malformed input gives `false`.
pub fn verify_ed25519(public_key: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(msg, sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify() {
        let pkcs8 = SigningKey::generate_pkcs8().expect("rng");
        let k = SigningKey::from_pkcs8(pkcs8.expose()).expect("load");
        let sig = k.sign(b"checkpoint 42");
        let pk = k.public_key();
        assert!(verify_ed25519(&pk, b"checkpoint 42", &sig));
        assert!(!verify_ed25519(&pk, b"checkpoint 43", &sig));
        let mut bad = sig;
        bad[10] ^= 1;
        assert!(!verify_ed25519(&pk, b"checkpoint 42", &bad));
        assert!(!verify_ed25519(&pk, b"checkpoint 42", &sig[..63]));
        let other = SigningKey::from_pkcs8(SigningKey::generate_pkcs8().expect("rng").expose())
            .expect("load");
        assert!(!verify_ed25519(&other.public_key(), b"checkpoint 42", &sig));
        // Reloading gives the same key.
        let again = SigningKey::from_pkcs8(pkcs8.expose()).expect("load");
        assert_eq!(again.public_key(), pk);
        assert_eq!(again.sign(b"m"), k.sign(b"m"));
    }

    #[test]
    fn garbage_pkcs8_is_invalid_key() {
        assert!(matches!(
            SigningKey::from_pkcs8(b"garbage"),
            Err(CryptoError::InvalidKey(_))
        ));
    }

    #[test]
    fn debug_is_redacted() {
        let k = SigningKey::from_pkcs8(SigningKey::generate_pkcs8().expect("rng").expose())
            .expect("load");
        assert_eq!(format!("{k:?}"), "SigningKey([redacted])");
    }
}
