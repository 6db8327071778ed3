//! People who sign in (AC1, AC2): their role, the FHIR resource they are, their password
//! hash and second factor, and the lockout that bounds online guessing.
//!
//! Every person is named (no default or shared accounts: generic names are refused), has
//! an Argon2id password hash ([`crate::password`]) and a TOTP secret ([`crate::totp`])
//! that they must prove before their first token. After [`MAX_FAILURES`] consecutive failed
//! logins the account locks for [`LOCKOUT_SECONDS`]; while locked, even the right password
//! and code are refused, so guessing through the lockout gains nothing. `generation` grows
//! whenever the account is disabled or its role changes: tokens carry the generation they
//! were issued under, and one from an older generation is refused (revocation).
//!
//! Storage is the caller's: a record serializes to JSON (with the secret in it) and must
//! be sealed before it is stored; `Debug` never prints the hash or the secret.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroize;

use crate::password::{self, PasswordError};
use crate::totp;

/// Consecutive failed logins that lock an account.
pub const MAX_FAILURES: u32 = 5;
/// How long a lockout lasts.
pub const LOCKOUT_SECONDS: u64 = 15 * 60;

/// Names that would make a default or shared account.
const GENERIC_NAMES: &[&str] = &[
    "admin",
    "administrator",
    "root",
    "system",
    "test",
    "guest",
    "demo",
    "shared",
    "user",
    "default",
    "phivault",
    "support",
    "nurse",
    "doctor",
    "clinician",
    "auditor",
    "patient",
];

/// What a person is, and so what they may be granted (the policy decides the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads and writes clinical data of patients they treat (a Practitioner).
    Clinician,
    /// Reads audit data, never clinical data.
    Auditor,
    /// Manages users and clients, never clinical data.
    Admin,
    /// Reads their own compartment (a Patient).
    Patient,
}

impl Role {
    /// Parse `clinician|auditor|admin|patient`.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "clinician" => Role::Clinician,
            "auditor" => Role::Auditor,
            "admin" => Role::Admin,
            "patient" => Role::Patient,
            _ => return None,
        })
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Clinician => "clinician",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
            Role::Patient => "patient",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a user record cannot be made or changed (never carries a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// Username outside `[a-z0-9._@-]{3,64}` starting with a letter or digit.
    #[error(
        "invalid username: 3-64 characters of a-z 0-9 . _ @ -, starting with a letter or digit"
    )]
    BadUsername,
    /// A generic name (default or shared account).
    #[error("refused: a generic username makes a shared account; name the person")]
    GenericUsername,
    /// Clinicians need `--practitioner`, patients `--patient`, others neither.
    #[error("{0}")]
    BadLink(&'static str),
    /// Not a FHIR id.
    #[error("invalid FHIR id (1-64 characters of A-Z a-z 0-9 - .)")]
    BadId,
    /// Password policy.
    #[error(transparent)]
    Password(#[from] PasswordError),
}

/// Why a login failed. The client is told only "invalid credentials" or "locked"; the
/// distinction between the other cases is for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    /// Wrong password.
    Password,
    /// Right password, wrong, replayed or missing second factor.
    SecondFactor,
    /// The account is locked until this Unix time.
    Locked(u64),
    /// The account is disabled.
    Disabled,
}

/// One person's account.
#[derive(Clone, Serialize, Deserialize)]
pub struct UserRecord {
    /// Opaque account id (a UUID): what tokens and audit events name, never the login name.
    pub id: String,
    /// Login name (lowercase).
    pub username: String,
    /// Role.
    pub role: Role,
    /// The Practitioner this clinician is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practitioner: Option<String>,
    /// The Patient this patient user is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Argon2id PHC string.
    password: String,
    /// TOTP secret, base64.
    #[serde(with = "secret_b64")]
    totp_secret: Vec<u8>,
    /// Whether a code has been proven (required before the first token).
    pub totp_enrolled: bool,
    /// Step of the last accepted code (replay guard).
    #[serde(default)]
    pub totp_last_step: Option<u64>,
    /// Disabled accounts cannot sign in; their tokens are refused.
    pub disabled: bool,
    /// Consecutive failed logins.
    pub failed_logins: u32,
    /// Unix time until which the account is locked (0: not locked).
    pub locked_until: u64,
    /// Grows on disable and role change; tokens of an older generation are refused.
    pub generation: u64,
    /// Unix time of creation.
    pub created: u64,
}

mod secret_b64 {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD_NO_PAD.encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD_NO_PAD
            .decode(s.as_bytes())
            .map_err(|_| serde::de::Error::custom("invalid secret"))
    }
}

impl Drop for UserRecord {
    fn drop(&mut self) {
        self.totp_secret.zeroize();
        self.password.zeroize();
    }
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("role", &self.role)
            .field("practitioner", &self.practitioner)
            .field("patient", &self.patient)
            .field("password", &"[redacted]")
            .field("totp_secret", &"[redacted]")
            .field("totp_enrolled", &self.totp_enrolled)
            .field("disabled", &self.disabled)
            .field("failed_logins", &self.failed_logins)
            .field("locked_until", &self.locked_until)
            .field("generation", &self.generation)
            .finish()
    }
}

/// Normalise and check a username.
pub fn normalize_username(username: &str) -> Result<String, UserError> {
    let u = username.trim().to_lowercase();
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_@".contains(c);
    if !(3..=64).contains(&u.len())
        || !u.chars().all(ok_char)
        || !u.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(UserError::BadUsername);
    }
    if GENERIC_NAMES.contains(&u.as_str()) {
        return Err(UserError::GenericUsername);
    }
    Ok(u)
}

/// A version-4 UUID in its canonical text form, from 16 random bytes.
fn uuid_text(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn check_fhir_id(id: &str) -> Result<(), UserError> {
    if (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        Ok(())
    } else {
        Err(UserError::BadId)
    }
}

fn check_links(
    role: Role,
    practitioner: Option<&str>,
    patient: Option<&str>,
) -> Result<(), UserError> {
    match (role, practitioner, patient) {
        (Role::Clinician, Some(p), None) => check_fhir_id(p),
        (Role::Clinician, _, _) => Err(UserError::BadLink(
            "a clinician needs --practitioner ID (and no --patient)",
        )),
        (Role::Patient, None, Some(p)) => check_fhir_id(p),
        (Role::Patient, _, _) => Err(UserError::BadLink(
            "a patient user needs --patient ID (and no --practitioner)",
        )),
        (_, None, None) => Ok(()),
        _ => Err(UserError::BadLink(
            "auditors and admins are not linked to a Practitioner or Patient",
        )),
    }
}

impl UserRecord {
    /// A new, not yet enrolled account. `id`, `salt` and `totp_secret` must be fresh random
    /// bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: [u8; 16],
        username: &str,
        role: Role,
        practitioner: Option<&str>,
        patient: Option<&str>,
        password: &str,
        salt: &[u8; 16],
        totp_secret: [u8; totp::SECRET_LEN],
        now: u64,
    ) -> Result<UserRecord, UserError> {
        let username = normalize_username(username)?;
        check_links(role, practitioner, patient)?;
        password::check_policy(&username, password)?;
        Ok(UserRecord {
            id: uuid_text(id),
            password: password::hash_password(password, salt)?,
            username,
            role,
            practitioner: practitioner.map(str::to_owned),
            patient: patient.map(str::to_owned),
            totp_secret: totp_secret.to_vec(),
            totp_enrolled: false,
            totp_last_step: None,
            disabled: false,
            failed_logins: 0,
            locked_until: 0,
            generation: 1,
            created: now,
        })
    }

    /// Check a record read back from storage (a record that fails is treated as absent).
    pub fn validate(&self) -> Result<(), UserError> {
        if normalize_username(&self.username)? != self.username {
            return Err(UserError::BadUsername);
        }
        if self.id.len() != 36 || !self.id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(UserError::BadId);
        }
        check_links(
            self.role,
            self.practitioner.as_deref(),
            self.patient.as_deref(),
        )
    }

    /// The `otpauth://` enrolment URI (shown once, when the account is made).
    pub fn enrolment_uri(&self) -> String {
        totp::otpauth_uri("phivault", &self.username, &self.totp_secret)
    }

    /// One login attempt with `password` and TOTP `code` at Unix time `now`. Updates the
    /// counters, the lockout, the replay guard and enrolment; the caller stores the record
    /// whatever the outcome.
    pub fn login(&mut self, password: &str, code: &str, now: u64) -> Result<(), LoginFailure> {
        if self.disabled {
            return Err(LoginFailure::Disabled);
        }
        if self.locked_until > now {
            return Err(LoginFailure::Locked(self.locked_until));
        }
        let failure = if !password::verify_password(password, &self.password) {
            Some(LoginFailure::Password)
        } else {
            match totp::verify(&self.totp_secret, code, now, self.totp_last_step) {
                Some(step) => {
                    self.totp_last_step = Some(step);
                    None
                }
                None => Some(LoginFailure::SecondFactor),
            }
        };
        self.count(failure, now)
    }

    /// Re-entry of the second factor by a signed-in person (break-the-glass): the TOTP
    /// `code` at `now`, under the same replay guard and the same failure count and lockout
    /// as a login.
    pub fn confirm_second_factor(&mut self, code: &str, now: u64) -> Result<(), LoginFailure> {
        if self.disabled {
            return Err(LoginFailure::Disabled);
        }
        if self.locked_until > now {
            return Err(LoginFailure::Locked(self.locked_until));
        }
        let failure = match totp::verify(&self.totp_secret, code, now, self.totp_last_step) {
            Some(step) => {
                self.totp_last_step = Some(step);
                None
            }
            None => Some(LoginFailure::SecondFactor),
        };
        self.count(failure, now)
    }

    /// Count an attempt: a success clears the failures, the fifth failure locks.
    fn count(&mut self, failure: Option<LoginFailure>, now: u64) -> Result<(), LoginFailure> {
        match failure {
            None => {
                self.totp_enrolled = true;
                self.failed_logins = 0;
                self.locked_until = 0;
                Ok(())
            }
            Some(f) => {
                self.failed_logins = self.failed_logins.saturating_add(1);
                if self.failed_logins >= MAX_FAILURES {
                    self.failed_logins = 0;
                    self.locked_until = now + LOCKOUT_SECONDS;
                    return Err(LoginFailure::Locked(self.locked_until));
                }
                Err(f)
            }
        }
    }

    /// The `fhirUser` of the account: its Practitioner (clinicians) or Patient (patients).
    pub fn fhir_user(&self) -> Option<String> {
        match (self.role, &self.practitioner, &self.patient) {
            (Role::Clinician, Some(p), _) => Some(format!("Practitioner/{p}")),
            (Role::Patient, _, Some(p)) => Some(format!("Patient/{p}")),
            _ => None,
        }
    }

    /// Whether the account may be issued a token now: enrolled, enabled, not locked.
    pub fn may_get_token(&self, now: u64) -> bool {
        self.totp_enrolled && !self.disabled && self.locked_until <= now
    }

    /// Disable the account (its tokens stop working).
    pub fn disable(&mut self) {
        self.disabled = true;
        self.generation += 1;
    }

    /// Change the role and its link (its tokens stop working).
    pub fn set_role(
        &mut self,
        role: Role,
        practitioner: Option<&str>,
        patient: Option<&str>,
    ) -> Result<(), UserError> {
        check_links(role, practitioner, patient)?;
        self.role = role;
        self.practitioner = practitioner.map(str::to_owned);
        self.patient = patient.map(str::to_owned);
        self.generation += 1;
        Ok(())
    }

    /// The TOTP secret (tests compute codes with it).
    #[cfg(test)]
    fn secret_for_test(&self) -> &[u8] {
        &self.totp_secret
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "tulip-gravel-orbit";
    const T0: u64 = 1_800_000_000;

    fn alice() -> UserRecord {
        UserRecord::new(
            [5; 16],
            "Alice.Jones",
            Role::Clinician,
            Some("prac-1"),
            None,
            PW,
            &[1; 16],
            [2; totp::SECRET_LEN],
            T0,
        )
        .unwrap()
    }

    #[test]
    fn accounts_are_named_people_with_the_right_link() {
        let a = alice();
        assert_eq!(a.username, "alice.jones");
        assert_eq!(a.id, "05050505-0505-4505-8505-050505050505");
        assert!(!a.may_get_token(T0), "not enrolled yet");
        for bad in ["ab", "-x-", "a b", "ädam", &"a".repeat(65)] {
            assert_eq!(
                normalize_username(bad),
                Err(UserError::BadUsername),
                "{bad}"
            );
        }
        for generic in ["admin", "Root", "shared", "TEST"] {
            assert_eq!(normalize_username(generic), Err(UserError::GenericUsername));
        }
        let mk = |role, pr: Option<&str>, pa: Option<&str>| {
            UserRecord::new([6; 16], "bob", role, pr, pa, PW, &[1; 16], [2; 20], T0).map(|_| ())
        };
        assert!(matches!(
            mk(Role::Clinician, None, None),
            Err(UserError::BadLink(_))
        ));
        assert!(matches!(
            mk(Role::Patient, Some("p"), None),
            Err(UserError::BadLink(_))
        ));
        assert!(matches!(
            mk(Role::Auditor, Some("p"), None),
            Err(UserError::BadLink(_))
        ));
        assert_eq!(
            mk(Role::Patient, None, Some("bad id!")),
            Err(UserError::BadId)
        );
        assert_eq!(mk(Role::Patient, None, Some("pat-7")), Ok(()));
        assert_eq!(mk(Role::Admin, None, None), Ok(()));
        assert!(matches!(
            UserRecord::new(
                [6; 16],
                "bob",
                Role::Admin,
                None,
                None,
                "bob-bob-bob-bob",
                &[1; 16],
                [2; 20],
                T0
            ),
            Err(UserError::Password(PasswordError::Guessable))
        ));
    }

    #[test]
    fn login_needs_password_and_a_fresh_code_and_enrols() {
        let mut a = alice();
        let code = totp::code_at(a.secret_for_test(), T0);
        assert_eq!(
            a.login("wrong-password-x", &code, T0),
            Err(LoginFailure::Password)
        );
        let wrong = if code == "000000" { "111111" } else { "000000" };
        assert_eq!(a.login(PW, wrong, T0), Err(LoginFailure::SecondFactor));
        assert_eq!(a.failed_logins, 2);
        assert_eq!(a.login(PW, &code, T0), Ok(()));
        assert!(a.totp_enrolled && a.may_get_token(T0));
        assert_eq!(a.failed_logins, 0, "success resets the count");
        // the same code again is a replay
        assert_eq!(a.login(PW, &code, T0 + 1), Err(LoginFailure::SecondFactor));
        let next = totp::code_at(a.secret_for_test(), T0 + 30);
        assert_eq!(a.login(PW, &next, T0 + 30), Ok(()));
    }

    #[test]
    fn five_failures_lock_the_account_even_against_the_right_credentials() {
        let mut a = alice();
        for i in 1..MAX_FAILURES {
            assert_eq!(
                a.login("wrong-password-x", "123456", T0 + u64::from(i)),
                Err(LoginFailure::Password)
            );
        }
        let until = T0 + 100 + LOCKOUT_SECONDS;
        assert_eq!(
            a.login("wrong-password-x", "123456", T0 + 100),
            Err(LoginFailure::Locked(until))
        );
        let t = T0 + 200;
        let code = totp::code_at(a.secret_for_test(), t);
        assert_eq!(a.login(PW, &code, t), Err(LoginFailure::Locked(until)));
        assert!(!a.may_get_token(t));
        // after the lockout the right credentials work again
        let t = until + 1;
        let code = totp::code_at(a.secret_for_test(), t);
        assert_eq!(a.login(PW, &code, t), Ok(()));
    }

    #[test]
    fn reentering_the_second_factor_is_guarded_like_a_login() {
        let mut a = alice();
        let code = totp::code_at(a.secret_for_test(), T0);
        assert_eq!(a.login(PW, &code, T0), Ok(()));
        // the code of the login cannot be used again
        assert_eq!(
            a.confirm_second_factor(&code, T0 + 5),
            Err(LoginFailure::SecondFactor)
        );
        let next = totp::code_at(a.secret_for_test(), T0 + 30);
        assert_eq!(a.confirm_second_factor(&next, T0 + 30), Ok(()));
        assert_eq!(a.failed_logins, 0);
        for i in 1..MAX_FAILURES {
            assert_eq!(
                a.confirm_second_factor("no-code", T0 + 60 + u64::from(i)),
                Err(LoginFailure::SecondFactor)
            );
        }
        assert!(matches!(
            a.confirm_second_factor("no-code", T0 + 70),
            Err(LoginFailure::Locked(_))
        ));
        let t = T0 + 120;
        let code = totp::code_at(a.secret_for_test(), t);
        assert!(matches!(
            a.confirm_second_factor(&code, t),
            Err(LoginFailure::Locked(_))
        ));
        a.disable();
        assert_eq!(
            a.confirm_second_factor(&code, T0 + 10_000),
            Err(LoginFailure::Disabled)
        );
    }

    #[test]
    fn disabling_or_changing_the_role_moves_the_generation() {
        let mut a = alice();
        let g = a.generation;
        a.set_role(Role::Auditor, None, None).unwrap();
        assert_eq!(a.generation, g + 1);
        assert!(a.set_role(Role::Clinician, None, None).is_err());
        assert_eq!(a.generation, g + 1, "a refused change changes nothing");
        a.disable();
        assert_eq!(a.generation, g + 2);
        let code = totp::code_at(a.secret_for_test(), T0);
        assert_eq!(a.login(PW, &code, T0), Err(LoginFailure::Disabled));
    }

    #[test]
    fn the_stored_form_round_trips_and_debug_hides_secrets() {
        let a = alice();
        let json = serde_json::to_string(&a).unwrap();
        let b: UserRecord = serde_json::from_str(&json).unwrap();
        b.validate().unwrap();
        assert_eq!(b.secret_for_test(), a.secret_for_test());
        assert_eq!(b.enrolment_uri(), a.enrolment_uri());
        let dbg = format!("{a:?}");
        assert!(
            !dbg.contains("argon2") && !dbg.contains(&totp::base32(&[2; 20])),
            "{dbg}"
        );
        assert!(dbg.contains("[redacted]"));
        // a record edited into an invalid one is refused
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["practitioner"] = serde_json::Value::Null;
        let c: UserRecord = serde_json::from_value(v).unwrap();
        assert!(c.validate().is_err());
    }
}
