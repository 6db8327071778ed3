//! Strict base64url (no padding, canonical trailing bits) helpers.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub(crate) fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding; rejects padding, non-alphabet characters and
/// non-canonical trailing bits.
pub(crate) fn decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict() {
        assert_eq!(decode("AQ"), Some(vec![1]));
        assert_eq!(decode("AQ=="), None);
        assert_eq!(decode("AR"), None, "non-canonical trailing bits");
        assert_eq!(decode("A+"), None, "standard alphabet rejected");
        assert_eq!(decode("A"), None);
        assert_eq!(encode(&[0xfb, 0xff]), "-_8");
    }
}
