//! Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP), the second factor every
//! person enrols before their first token (AC2).
//!
//! HMAC-SHA1, 6 digits, 30-second steps: what every authenticator app implements (the
//! `otpauth://` URI states them). SHA-1 here is used as a PRF inside HMAC, where its
//! collision weakness does not apply (RFC 6238 §5.1 and NIST SP 800-63B §5.1.4.1 allow it).
//! A code is accepted within one step of the server's clock, and never twice: the step of
//! the last accepted code is kept, and codes of that step or earlier are refused.

use ring::hmac;
use subtle::ConstantTimeEq as _;

/// Seconds per step.
pub const STEP_SECONDS: u64 = 30;
/// Digits per code.
pub const DIGITS: u32 = 6;
/// Secret length in bytes (160 bits, RFC 4226 §4's recommendation).
pub const SECRET_LEN: usize = 20;
/// Steps of clock drift tolerated either side.
const WINDOW: u64 = 1;

/// HOTP (RFC 4226 §5.3) of `counter` under `secret`, `digits` long.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    hotp_with(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret, counter, digits)
}

fn hotp_with(alg: hmac::Algorithm, secret: &[u8], counter: u64, digits: u32) -> u32 {
    let key = hmac::Key::new(alg, secret);
    let tag = hmac::sign(&key, &counter.to_be_bytes());
    let t = tag.as_ref();
    let off = usize::from(t[t.len() - 1] & 0x0f);
    let bin = u32::from_be_bytes([t[off] & 0x7f, t[off + 1], t[off + 2], t[off + 3]]);
    bin % 10u32.pow(digits)
}

/// The step of Unix time `unix_seconds`.
pub fn step_of(unix_seconds: u64) -> u64 {
    unix_seconds / STEP_SECONDS
}

/// The code of `secret` at Unix time `unix_seconds` (what an authenticator app shows).
pub fn code_at(secret: &[u8], unix_seconds: u64) -> String {
    format!(
        "{:0width$}",
        hotp(secret, step_of(unix_seconds), DIGITS),
        width = DIGITS as usize
    )
}

/// Check `code` against `secret` at `unix_seconds`: on success, the step it belongs to,
/// which must be stored as the new `last_step`. Codes of `last_step` or earlier (a replay,
/// or an older code after a newer one) are refused; so is anything not exactly 6 digits.
pub fn verify(secret: &[u8], code: &str, unix_seconds: u64, last_step: Option<u64>) -> Option<u64> {
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let given: u32 = code.parse().ok()?;
    let now = step_of(unix_seconds);
    let mut found = None;
    // every candidate is computed, so timing does not tell which step matched
    for step in now.saturating_sub(WINDOW)..=now + WINDOW {
        let ok: bool = hotp(secret, step, DIGITS)
            .to_be_bytes()
            .as_slice()
            .ct_eq(given.to_be_bytes().as_slice())
            .into();
        if ok && last_step.is_none_or(|l| step > l) && found.is_none() {
            found = Some(step);
        }
    }
    found
}

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32 without padding (the form authenticator apps take).
pub fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(B32[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(B32[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The `otpauth://` URI an authenticator app enrols from (Key Uri Format).
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let enc = crate::percent_encode;
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}",
        enc(issuer),
        enc(account),
        base32(secret),
        enc(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4226_appendix_d_vectors() {
        let secret = b"12345678901234567890";
        let want = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (i, w) in want.iter().enumerate() {
            assert_eq!(hotp(secret, i as u64, 6), *w, "counter {i}");
        }
    }

    #[test]
    fn rfc6238_appendix_b_sha1_vectors() {
        let secret = b"12345678901234567890";
        for (t, want) in [
            (59u64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(hotp(secret, step_of(t), 8), want, "time {t}");
        }
        assert_eq!(code_at(secret, 59), "287082");
    }

    #[test]
    fn codes_are_accepted_within_one_step_and_never_twice() {
        let s = [9u8; SECRET_LEN];
        let t = 1_800_000_000;
        let code = code_at(&s, t);
        let step = verify(&s, &code, t, None).expect("current code");
        assert_eq!(step, step_of(t));
        assert_eq!(verify(&s, &code, t, Some(step)), None, "replay");
        assert_eq!(verify(&s, &code, t + 5, Some(step)), None, "replay later");
        // clock drift of one step either way
        assert!(verify(&s, &code_at(&s, t - 30), t, None).is_some());
        assert!(verify(&s, &code_at(&s, t + 30), t, None).is_some());
        assert_eq!(verify(&s, &code_at(&s, t - 90), t, None), None);
        assert_eq!(verify(&s, &code_at(&s, t + 90), t, None), None);
        // an older code after a newer one was used
        let newer = verify(&s, &code_at(&s, t + 30), t, None).unwrap();
        assert_eq!(verify(&s, &code_at(&s, t), t, Some(newer)), None);
        // malformed
        for bad in ["", "12345", "1234567", "12345a", " 12345", "+12345"] {
            assert_eq!(verify(&s, bad, t, None), None, "{bad:?}");
        }
        // another secret's code (checked over many steps: a 1-in-10^6 chance each)
        let other = [8u8; SECRET_LEN];
        let wrong = (0..50)
            .filter(|i| verify(&s, &code_at(&other, t + i * 30), t + i * 30, None).is_some())
            .count();
        assert_eq!(wrong, 0);
    }

    #[test]
    fn base32_matches_rfc4648_and_the_uri_names_the_parameters() {
        for (raw, want) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32(raw.as_bytes()), want);
        }
        let uri = otpauth_uri("phivault", "dr house", b"12345678901234567890");
        assert_eq!(
            uri,
            "otpauth://totp/phivault:dr%20house?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=phivault&algorithm=SHA1&digits=6&period=30"
        );
    }
}
