//! Passwords of people (AC2): Argon2id hashes in PHC string form, and the password policy.
//!
//! Parameters follow the OWASP password storage recommendation for Argon2id (m = 19 MiB,
//! t = 2, p = 1): one verification costs tens of milliseconds of one core, so an attacker
//! with a stolen database gets a few dozen guesses per second per core, and the server's
//! login endpoint bounds what an online attacker gets long before that matters (lockout,
//! `crate::users`). The parameters are stored in every hash, so raising them later only
//! affects new hashes ([`needs_rehash`] tells when to re-hash on the next successful login).
//!
//! The policy follows NIST SP 800-63B §5.1.1.2: length matters (12–128 characters), no
//! composition rules, and passwords that are the username or common are refused.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Memory cost in KiB.
const M_COST_KIB: u32 = 19 * 1024;
/// Passes.
const T_COST: u32 = 2;
/// Lanes.
const P_COST: u32 = 1;
/// Shortest password accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted, in characters (bounds the hashing work per attempt).
pub const MAX_PASSWORD_CHARS: usize = 128;

/// Passwords refused whatever their length: the commonest long ones in breach corpora
/// and phivault's own name (a small list; an operator can enforce a larger one upstream).
const COMMON: &[&str] = &[
    "123456789012",
    "1234567890123",
    "12345678910111213",
    "aaaaaaaaaaaa",
    "qwertyuiopasdfghjkl",
    "qwertyuiop123",
    "password1234",
    "password12345",
    "passwordpassword",
    "iloveyou1234",
    "letmein12345",
    "administrator",
    "welcome12345",
    "changeme1234",
    "phivault1234",
    "phivaultphivault",
];

/// Why a password is refused (never carries the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// Shorter than [`MIN_PASSWORD_CHARS`].
    #[error("password too short: at least {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    /// Longer than [`MAX_PASSWORD_CHARS`].
    #[error("password too long: at most {MAX_PASSWORD_CHARS} characters")]
    TooLong,
    /// Equal to (or containing) the username, or common.
    #[error(
        "password too easy to guess (the username, a common password or one repeated character)"
    )]
    Guessable,
    /// Hashing failed (parameters or output: not the caller's input).
    #[error("password hashing failed")]
    Hash,
}

fn argon2() -> Argon2<'static> {
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None)
        .expect("the Argon2id parameters are constants within range");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Check `password` against the policy for user `username`.
pub fn check_policy(username: &str, password: &str) -> Result<(), PasswordError> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_CHARS {
        return Err(PasswordError::TooShort);
    }
    if n > MAX_PASSWORD_CHARS {
        return Err(PasswordError::TooLong);
    }
    let lower = password.to_lowercase();
    let user = username.to_lowercase();
    let mut chars = password.chars();
    let first = chars.next();
    if (!user.is_empty() && lower.contains(&user))
        || COMMON.contains(&lower.as_str())
        || chars.all(|c| Some(c) == first)
    {
        return Err(PasswordError::Guessable);
    }
    Ok(())
}

/// Argon2id hash of `password` with a fresh 16-byte salt, as a PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`).
pub fn hash_password(password: &str, salt: &[u8; 16]) -> Result<String, PasswordError> {
    let salt = SaltString::encode_b64(salt).map_err(|_| PasswordError::Hash)?;
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| PasswordError::Hash)
}

/// Whether `password` matches the PHC string `phc` (constant-time comparison inside
/// argon2). A malformed or non-Argon2id hash never matches.
pub fn verify_password(password: &str, phc: &str) -> bool {
    if password.chars().count() > MAX_PASSWORD_CHARS {
        return false;
    }
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    if parsed.algorithm != argon2::ARGON2ID_IDENT {
        return false;
    }
    // verify with the parameters stored in the hash
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// Whether `phc` was made with weaker parameters than today's (re-hash after a login).
pub fn needs_rehash(phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return true;
    };
    let Ok(p) = Params::try_from(&parsed) else {
        return true;
    };
    parsed.algorithm != argon2::ARGON2ID_IDENT
        || p.m_cost() < M_COST_KIB
        || p.t_cost() < T_COST
        || p.p_cost() < P_COST
}

/// A hash that no password matches, verified for unknown usernames so that a login
/// for a name that does not exist costs the same time as one that does.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("\u{0}not a password\u{0}", &[0x5a; 16]).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_are_argon2id_with_our_parameters() {
        let h = hash_password("correct horse battery", &[7; 16]).unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("", &h));
        assert!(!needs_rehash(&h));
        // salts differ, so hashes differ
        let h2 = hash_password("correct horse battery", &[8; 16]).unwrap();
        assert_ne!(h, h2);
        assert!(verify_password("correct horse battery", &h2));
    }

    #[test]
    fn weaker_or_foreign_hashes_are_flagged_or_refused() {
        let weak = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(1024, 1, 1, None).unwrap(),
        )
        .hash_password(
            b"correct horse battery",
            &SaltString::encode_b64(&[1; 16]).unwrap(),
        )
        .unwrap()
        .to_string();
        assert!(verify_password("correct horse battery", &weak));
        assert!(needs_rehash(&weak));
        let argon2i = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x13,
            Params::new(M_COST_KIB, T_COST, P_COST, None).unwrap(),
        )
        .hash_password(
            b"correct horse battery",
            &SaltString::encode_b64(&[1; 16]).unwrap(),
        )
        .unwrap()
        .to_string();
        assert!(!verify_password("correct horse battery", &argon2i));
        assert!(!verify_password("correct horse battery", "not a hash"));
        assert!(!verify_password("correct horse battery", ""));
        assert!(!verify_password("x", dummy_hash()));
    }

    #[test]
    fn policy_refuses_short_long_and_guessable_passwords() {
        assert_eq!(check_policy("alice", "short"), Err(PasswordError::TooShort));
        assert_eq!(
            check_policy("alice", &"x1".repeat(65)),
            Err(PasswordError::TooLong)
        );
        assert_eq!(
            check_policy("alice", "ALICE-is-my-name"),
            Err(PasswordError::Guessable)
        );
        assert_eq!(
            check_policy("bob", "Password1234"),
            Err(PasswordError::Guessable)
        );
        assert_eq!(
            check_policy("bob", "zzzzzzzzzzzzzz"),
            Err(PasswordError::Guessable)
        );
        assert_eq!(check_policy("bob", "tulip-gravel-orbit"), Ok(()));
        // characters, not bytes
        assert_eq!(check_policy("bob", "ééééééàààààà"), Ok(()));
        assert_eq!(
            check_policy("bob", "éééééàààààà"),
            Err(PasswordError::TooShort)
        );
    }
}
