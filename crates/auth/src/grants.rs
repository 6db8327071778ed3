//! The App Launch authorization server's state — codes and refresh-token families — kept
//! in a [`SharedState`]: this process's memory, or a store every node of a deployment
//! shares (a code issued by one node is exchanged at another; a refresh token retired on
//! one revokes its family on all).
//!
//! Three kinds of record, each changed atomically on its own:
//! - `code`/SHA-256(code): the grant, redirect URI, PKCE challenge, expiry, whether used
//!   and the family it started (kept after use, so a replay revokes that family);
//! - `family`/id: the grant, expiry, last use, revocation, the DPoP key, and the SHA-256
//!   of its one current refresh token;
//! - `refresh`/SHA-256(token): the family a refresh token belongs to (every token of a
//!   family, retired ones too: a retired token presented revokes the family).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::authorize::{
    AuthorizeRequest, CODE_TTL_SECONDS, Grant, IDLE_TIMEOUT_SECONDS, MAX_CODES, MAX_REFRESH,
    OneTimeSecret, REFRESH_TTL_SECONDS, hash, pkce_matches,
};
use crate::b64;
use crate::error::OAuthError;
use crate::scope::ScopeSet;

/// What an update does with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Leave it as it is.
    Keep,
    /// Store this value until `until_ms` (ms since the Unix epoch; gone after).
    Put {
        /// The record.
        value: Vec<u8>,
        /// When it expires.
        until_ms: u64,
    },
    /// Remove it.
    Delete,
}

/// Records of short-lived sign-in state, each read and changed atomically (across every
/// node that shares them). The caller of the store knows how to keep them: sealed, in a
/// table every node reaches; this crate knows no storage engine.
pub trait SharedState: Send + Sync {
    /// Read record `ns`/`key` (None: absent, or expired at `now_ms`), let `f` decide,
    /// apply its [`Change`] — all while no other update of that record runs. `Err` if the
    /// records cannot be reached (the caller refuses: fail closed). (Expiry is for
    /// clearing records away; what a record's own times allow is the caller's to check.)
    fn update(
        &self,
        ns: &str,
        key: &[u8],
        now_ms: u64,
        f: &mut dyn FnMut(Option<&[u8]>) -> Change,
    ) -> Result<(), String>;

    /// Visit every record of `ns` not expired at `now_ms` (revoking a person's sessions).
    fn scan(
        &self,
        ns: &str,
        now_ms: u64,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), String>;
}

/// Records by (namespace, key): (value, expiry in ms).
type Records = HashMap<(String, Vec<u8>), (Vec<u8>, u64)>;

/// Records in this process's memory (one node): at most `cap` live ones.
pub struct MemoryState {
    map: Mutex<Records>,
    cap: usize,
}

impl MemoryState {
    /// At most `cap` live records (new ones are refused beyond: fail closed).
    pub fn new(cap: usize) -> Self {
        MemoryState {
            map: Mutex::new(HashMap::new()),
            cap,
        }
    }
}

impl SharedState for MemoryState {
    fn update(
        &self,
        ns: &str,
        key: &[u8],
        now: u64,
        f: &mut dyn FnMut(Option<&[u8]>) -> Change,
    ) -> Result<(), String> {
        let mut map = self.map.lock();
        let k = (ns.to_owned(), key.to_vec());
        let live = map.get(&k).filter(|(_, until)| *until > now);
        match f(live.map(|(v, _)| v.as_slice())) {
            Change::Keep => {}
            Change::Delete => {
                map.remove(&k);
            }
            Change::Put { value, until_ms } => {
                if !map.contains_key(&k) && map.len() >= self.cap {
                    map.retain(|_, (_, until)| *until > now);
                    if map.len() >= self.cap {
                        return Err("too many sign-in records".into());
                    }
                }
                map.insert(k, (value, until_ms));
            }
        }
        Ok(())
    }

    fn scan(&self, ns: &str, now: u64, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), String> {
        for ((n, k), (v, until)) in self.map.lock().iter() {
            if n == ns && *until > now {
                visit(k, v);
            }
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct CodeRecord {
    grant: Grant,
    redirect_uri: String,
    code_challenge: String,
    expires: u64,
    /// The family its exchange started (revoked if the code is replayed).
    family: Option<String>,
    used: bool,
}

#[derive(Serialize, Deserialize)]
struct FamilyRecord {
    grant: Grant,
    expires: u64,
    /// Unix time of the last exchange or refresh (idle timeout).
    last_used: u64,
    revoked: bool,
    /// The DPoP key (RFC 7638 thumbprint) the session is bound to.
    jkt: Option<String>,
    /// SHA-256 of the family's current refresh token (base64url).
    current: String,
}

impl FamilyRecord {
    fn live(&self, now: u64) -> bool {
        !self.revoked && self.expires > now && self.last_used + IDLE_TIMEOUT_SECONDS > now
    }
}

/// Codes and refresh tokens: in this process's memory (a restart signs everyone out,
/// which fails safe), or in state several nodes share.
pub struct AuthorizationServer {
    rng: SystemRandom,
    state: Arc<dyn SharedState>,
}

impl Default for AuthorizationServer {
    fn default() -> Self {
        Self::new()
    }
}

fn unavailable(_: String) -> OAuthError {
    OAuthError::ServerError("the sign-in records cannot be reached")
}

fn until(secs: u64) -> u64 {
    secs.saturating_mul(1000)
}

impl AuthorizationServer {
    /// A server keeping its records in memory.
    pub fn new() -> Self {
        Self::with_state(Arc::new(MemoryState::new(MAX_CODES + 2 * MAX_REFRESH)))
    }

    /// A server keeping its records in `state` (shared by the nodes of a deployment).
    pub fn with_state(state: Arc<dyn SharedState>) -> Self {
        AuthorizationServer {
            rng: SystemRandom::new(),
            state,
        }
    }

    fn secret(&self) -> Result<String, OAuthError> {
        let mut b = [0u8; 32];
        self.rng
            .fill(&mut b)
            .map_err(|_| OAuthError::ServerError("random generation failed"))?;
        Ok(b64::encode(&b))
    }

    /// Read, change and write back one record as `T` (absent or unreadable: `None`).
    /// (`now`: the caller's Unix time; 0 when it has none: nothing is expired then.)
    fn update<T: Serialize + for<'de> Deserialize<'de>>(
        &self,
        ns: &str,
        key: &[u8],
        now: u64,
        mut f: impl FnMut(Option<T>) -> Option<(T, u64)>,
    ) -> Result<(), OAuthError> {
        self.state
            .update(ns, key, until(now), &mut |old| {
                let old = old.and_then(|b| serde_json::from_slice(b).ok());
                match f(old) {
                    Some((rec, until_ms)) => match serde_json::to_vec(&rec) {
                        Ok(value) => Change::Put { value, until_ms },
                        Err(_) => Change::Keep,
                    },
                    None => Change::Keep,
                }
            })
            .map_err(unavailable)
    }

    /// The family of refresh token `token`, if it is one of a family's.
    fn family_of(&self, token: &str, now: u64) -> Result<Option<String>, OAuthError> {
        let mut out = None;
        self.update::<String>("refresh", &hash(token), now, |f| {
            out = f;
            None
        })?;
        Ok(out)
    }

    /// A code for `grant`, after the person signed in and approved `req`.
    pub fn issue_code(
        &self,
        req: &AuthorizeRequest,
        grant: Grant,
        now: u64,
    ) -> Result<OneTimeSecret, OAuthError> {
        let code = self.secret()?;
        let expires = now + CODE_TTL_SECONDS;
        let mut rec = Some(CodeRecord {
            grant,
            redirect_uri: req.redirect_uri.clone(),
            code_challenge: req.code_challenge.clone(),
            expires,
            family: None,
            used: false,
        });
        // kept past its expiry while the session it starts could still be revoked by a replay
        self.update::<CodeRecord>("code", &hash(&code), now, |_| {
            rec.take()
                .map(|r| (r, until(expires + REFRESH_TTL_SECONDS)))
        })
        .map_err(|_| OAuthError::ServerError("too many pending authorizations"))?;
        Ok(OneTimeSecret(code))
    }

    /// `grant_type=authorization_code`: the grant and the first refresh token of a new
    /// family, or `invalid_grant` for anything wrong (unknown, expired or used code, other
    /// client or redirect URI, wrong verifier).
    pub fn exchange_code(
        &self,
        client_id: &str,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
        now: u64,
    ) -> Result<(Grant, OneTimeSecret), OAuthError> {
        let refresh = self.secret()?;
        let family = self.secret()?;
        let mut outcome: Result<Grant, OAuthError> = Err(OAuthError::InvalidGrant("unknown code"));
        let mut replayed_family = None;
        self.update::<CodeRecord>("code", &hash(code), now, |rec| {
            let mut rec = rec?;
            if rec.used {
                // replay: whoever holds the first exchange's tokens loses them too
                replayed_family = rec.family.clone();
                outcome = Err(OAuthError::InvalidGrant("code already used"));
                return None;
            }
            if rec.expires <= now {
                outcome = Err(OAuthError::InvalidGrant("code expired"));
                return None;
            }
            // a failed attempt burns the code too: the verifier cannot be guessed online
            rec.used = true;
            outcome = if rec.grant.client_id != client_id || rec.redirect_uri != redirect_uri {
                Err(OAuthError::InvalidGrant(
                    "code issued to another client or redirect",
                ))
            } else if !pkce_matches(verifier, &rec.code_challenge) {
                Err(OAuthError::InvalidGrant("PKCE verifier does not match"))
            } else {
                rec.family = Some(family.clone());
                Ok(rec.grant.clone())
            };
            let keep = until(rec.expires + REFRESH_TTL_SECONDS);
            Some((rec, keep))
        })?;
        if let Some(f) = replayed_family {
            self.revoke_family(&f, now)?;
        }
        let grant = outcome?;
        let expires = now + REFRESH_TTL_SECONDS;
        let mut rec = Some(FamilyRecord {
            grant: grant.clone(),
            expires,
            last_used: now,
            revoked: false,
            jkt: None,
            current: b64::encode(&hash(&refresh)),
        });
        self.update::<FamilyRecord>("family", family.as_bytes(), now, |_| {
            rec.take().map(|r| (r, until(expires)))
        })
        .map_err(|_| OAuthError::ServerError("too many sessions"))?;
        self.link(&refresh, &family, now, expires)?;
        Ok((grant, OneTimeSecret(refresh)))
    }

    /// Record that refresh token `token` is of `family` (until the family expires).
    fn link(&self, token: &str, family: &str, now: u64, expires: u64) -> Result<(), OAuthError> {
        let mut f = Some(family.to_owned());
        self.update::<String>("refresh", &hash(token), now, |_| {
            f.take().map(|f| (f, until(expires)))
        })
        .map_err(|_| OAuthError::ServerError("too many sessions"))
    }

    fn revoke_family(&self, family: &str, now: u64) -> Result<(), OAuthError> {
        self.update::<FamilyRecord>("family", family.as_bytes(), now, |rec| {
            let mut rec = rec?;
            rec.revoked = true;
            let keep = until(rec.expires);
            Some((rec, keep))
        })
    }

    /// `grant_type=refresh_token`: the grant (its scope narrowed to `scope` when given)
    /// and the family's next refresh token. A retired token revokes the family.
    pub fn refresh(
        &self,
        client_id: &str,
        token: &str,
        scope: Option<&ScopeSet>,
        now: u64,
    ) -> Result<(Grant, OneTimeSecret), OAuthError> {
        let next = self.secret()?;
        let Some(family) = self.family_of(token, now)? else {
            return Err(OAuthError::InvalidGrant("unknown refresh token"));
        };
        let presented = b64::encode(&hash(token));
        let mut outcome: Result<(Grant, u64), OAuthError> =
            Err(OAuthError::InvalidGrant("unknown refresh token"));
        self.update::<FamilyRecord>("family", family.as_bytes(), now, |rec| {
            let mut rec = rec?;
            let keep = until(rec.expires);
            if rec.current != presented {
                rec.revoked = true;
                outcome = Err(OAuthError::InvalidGrant(
                    "refresh token reused; session revoked",
                ));
                return Some((rec, keep));
            }
            if !rec.live(now) {
                rec.revoked = true;
                outcome = Err(OAuthError::InvalidGrant("session ended"));
                return Some((rec, keep));
            }
            if rec.grant.client_id != client_id {
                outcome = Err(OAuthError::InvalidGrant("refresh token of another client"));
                return None;
            }
            if let Some(s) = scope {
                if &s.intersect(&rec.grant.scope) != s {
                    outcome = Err(OAuthError::InvalidScope("a refresh cannot widen the scope"));
                    return None;
                }
                rec.grant.scope = s.clone();
            }
            rec.current = b64::encode(&hash(&next));
            rec.last_used = now;
            outcome = Ok((rec.grant.clone(), rec.expires));
            Some((rec, keep))
        })?;
        let (grant, expires) = outcome?;
        self.link(&next, &family, now, expires)?;
        Ok((grant, OneTimeSecret(next)))
    }

    /// Bind the session of refresh token `token` to the DPoP key `jkt` (RFC 9449 §5: a
    /// public client's refresh tokens are bound to its key). Once bound, it stays bound.
    pub fn bind_dpop(&self, token: &str, jkt: &str) {
        let Ok(Some(family)) = self.family_of(token, 0) else {
            return;
        };
        let _ = self.update::<FamilyRecord>("family", family.as_bytes(), 0, |rec| {
            let mut rec = rec?;
            if rec.jkt.is_some() {
                return None;
            }
            rec.jkt = Some(jkt.to_owned());
            let keep = until(rec.expires);
            Some((rec, keep))
        });
    }

    /// The family record of refresh token `token`, read.
    fn read_family(&self, token: &str) -> Option<FamilyRecord> {
        let family = self.family_of(token, 0).ok()??;
        let mut out = None;
        let _ = self.update::<FamilyRecord>("family", family.as_bytes(), 0, |rec| {
            out = rec;
            None
        });
        out
    }

    /// The DPoP key the session of refresh token `token` is bound to, if any.
    pub fn dpop_key_of(&self, token: &str) -> Option<String> {
        self.read_family(token)?.jkt
    }

    /// RFC 7009 revocation of a refresh token: its whole family ends. Unknown tokens are
    /// ignored (the endpoint answers 200 either way).
    pub fn revoke(&self, client_id: &str, token: &str) {
        let Ok(Some(family)) = self.family_of(token, 0) else {
            return;
        };
        let _ = self.update::<FamilyRecord>("family", family.as_bytes(), 0, |rec| {
            let mut rec = rec?;
            if rec.grant.client_id != client_id {
                return None;
            }
            rec.revoked = true;
            let keep = until(rec.expires);
            Some((rec, keep))
        });
    }

    /// End every session of account `user_id` (disabled or role changed).
    pub fn revoke_user(&self, user_id: &str) {
        let mut families = Vec::new();
        let _ = self.state.scan("family", 0, &mut |k, v| {
            if let Ok(rec) = serde_json::from_slice::<FamilyRecord>(v)
                && rec.grant.user_id == user_id
                && !rec.revoked
            {
                families.push(k.to_vec());
            }
        });
        for f in families {
            if let Ok(f) = String::from_utf8(f) {
                let _ = self.revoke_family(&f, 0);
            }
        }
    }

    /// RFC 7662 introspection of a refresh token: the grant while its family is live.
    pub fn introspect_refresh(&self, token: &str, now: u64) -> Option<Grant> {
        let rec = self.read_family(token)?;
        (rec.current == b64::encode(&hash(token)) && rec.live(now)).then_some(rec.grant)
    }
}
