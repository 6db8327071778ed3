//! Random numbers, hashing and comparison helpers.

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::CryptoError;

/// The shortest token [`random_token_b64url`] will make: 128 bits.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Fills `buf` from the operating system's CSPRNG (ring's `SystemRandom`).
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new().fill(buf).map_err(|_| CryptoError::Rng)
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    fill_random(&mut out)?;
    Ok(out)
}

/// A random token of `n_bytes` bytes, base64url-encoded without padding (for share links,
/// session ids, `jti` values, ...).
///
/// `n_bytes` below [`MIN_TOKEN_BYTES`] (128 bits) is refused with
/// [`CryptoError::InvalidArgument`]: a guessable token is a bug, not a choice.
pub fn random_token_b64url(n_bytes: usize) -> Result<String, CryptoError> {
    if n_bytes < MIN_TOKEN_BYTES {
        return Err(CryptoError::InvalidArgument(
            "random tokens must have at least 16 bytes (128 bits)",
        ));
    }
    let mut raw = Zeroizing::new(vec![0u8; n_bytes]);
    fill_random(&mut raw)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&*raw))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_differ() {
        let a: [u8; 32] = random_bytes().expect("rng");
        let b: [u8; 32] = random_bytes().expect("rng");
        assert_ne!(a, b);
    }

    #[test]
    fn token_length_and_alphabet() {
        let t = random_token_b64url(32).expect("rng");
        assert_eq!(t.len(), 43);
        assert!(
            t.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert!(matches!(
            random_token_b64url(8),
            Err(CryptoError::InvalidArgument(_))
        ));
    }

    #[test]
    fn sha256_known_answer() {
        let d = sha256(b"abc");
        assert_eq!(
            d[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "FIPS 180-2 test vector for \"abc\""
        );
    }
}
