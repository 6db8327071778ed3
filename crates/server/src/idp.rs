//! External OpenID Connect providers (`phivault idp add`): their configuration, discovery
//! and key sets, and the verification of their access tokens (see `phivault_auth::oidc`).
//!
//! Configurations live in the store's `meta` table (`idp:<issuer>`), read when a token
//! names an issuer not loaded yet (at most every `Freshness::idp_reload_ms`). A provider's keys
//! come from its discovery document (`/.well-known/openid-configuration`, whose `issuer`
//! must be the configured one) and `jwks_uri`, fetched over https (plain http only for a
//! loopback provider) with a 5-second timeout and a 1 MiB limit, again whenever a token
//! names a `kid` not in the set (key rotation), at most every `Freshness::idp_refetch_ms`.

use std::sync::Arc;
use std::time::Duration;

use phivault_auth::Authenticated;
use phivault_auth::access_token::{Person, TokenError};
use phivault_auth::oidc::{ExternalIssuer, IdpConfig, unverified_issuer, unverified_kid};
use serde_json::Value;

use phivault_records::registrations::{IDP_PREFIX, IDP_SEAL_LABEL, idp_meta_key};

use crate::state::App;

const MAX_DOCUMENT: u64 = 1 << 20;

struct Provider {
    issuer: ExternalIssuer,
    /// Unix time keys were last fetched (0: never).
    fetched: parking_lot::Mutex<u64>,
}

/// The configured providers.
#[derive(Default)]
pub struct Idps {
    list: parking_lot::RwLock<Vec<Arc<Provider>>>,
    /// Unix time of the last configuration read (0: never).
    loaded: parking_lot::Mutex<u64>,
}

fn agent(cfg: &IdpConfig) -> Option<ureq::Agent> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(pem) = &cfg.ca_pem {
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem.as_bytes())
            .filter_map(|i| match i {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return None;
        }
        tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
    }
    Some(ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls.build())
            .timeout_global(Some(Duration::from_secs(5)))
            .max_redirects(0)
            .build(),
    ))
}

fn get_json(agent: &ureq::Agent, url: &str) -> Option<Value> {
    let mut r = agent.get(url).call().ok()?;
    if r.status() != 200 {
        return None;
    }
    r.body_mut()
        .with_config()
        .limit(MAX_DOCUMENT)
        .read_json()
        .ok()
}

/// Whether `url` may be fetched for a provider whose issuer is `issuer`: https, or plain
/// http under a loopback issuer's own origin.
fn fetchable(issuer: &str, url: &str) -> bool {
    url.starts_with("https://")
        || (issuer.starts_with("http://")
            && url.starts_with(&format!("{}/", issuer.trim_end_matches('/'))))
}

impl Provider {
    /// Discovery, then the key set. False when anything is off (logged without detail).
    fn fetch_keys(&self) -> bool {
        let cfg = self.issuer.config();
        let Some(agent) = agent(cfg) else {
            tracing::warn!("identity provider CA certificate unusable");
            return false;
        };
        let discovery = format!(
            "{}/.well-known/openid-configuration",
            cfg.issuer.trim_end_matches('/')
        );
        let doc = get_json(&agent, &discovery);
        let jwks_uri = doc
            .as_ref()
            .filter(|d| d.get("issuer").and_then(Value::as_str) == Some(cfg.issuer.as_str()))
            .and_then(|d| d.get("jwks_uri").and_then(Value::as_str))
            .filter(|u| fetchable(&cfg.issuer, u))
            .map(str::to_owned);
        let Some(jwks_uri) = jwks_uri else {
            tracing::warn!("identity provider discovery failed or named another issuer");
            return false;
        };
        match get_json(&agent, &jwks_uri).map(|j| self.issuer.set_jwks(&j)) {
            Some(Ok(n)) => {
                tracing::info!(keys = n, "identity provider keys fetched");
                true
            }
            _ => {
                tracing::warn!("identity provider key set could not be fetched");
                false
            }
        }
    }
}

/// Run blocking network I/O from a request: on a multi-threaded runtime the worker hands
/// its other tasks off first.
fn blocking_io<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl App {
    fn idp_for(&self, issuer: &str, now_ms: u64) -> Option<Arc<Provider>> {
        let find = || {
            self.idps
                .list
                .read()
                .iter()
                .find(|p| p.issuer.config().issuer == issuer)
                .cloned()
        };
        if let Some(p) = find() {
            return Some(p);
        }
        {
            let mut loaded = self.idps.loaded.lock();
            if *loaded + self.freshness.idp_reload_ms > now_ms {
                return None;
            }
            *loaded = now_ms;
        }
        let rows = self
            .vault
            .engine
            .meta_prefix(IDP_PREFIX, 1000)
            .unwrap_or_default();
        let list: Vec<Arc<Provider>> = rows
            .iter()
            .filter_map(|(k, v)| {
                let plain = self
                    .vault
                    .engine
                    .open_secret(&format!("{IDP_SEAL_LABEL}{k}"), v);
                if plain.is_none() {
                    tracing::warn!("an identity provider configuration failed its integrity check");
                }
                serde_json::from_slice::<IdpConfig>(&plain?)
                    .ok()
                    .filter(|c| idp_meta_key(&c.issuer) == *k && c.validate().is_ok())
            })
            .map(|c| {
                // keep a provider already loaded (and its keys)
                self.idps
                    .list
                    .read()
                    .iter()
                    .find(|p| p.issuer.config() == &c)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Provider {
                            issuer: ExternalIssuer::new(c),
                            fetched: parking_lot::Mutex::new(0),
                        })
                    })
            })
            .collect();
        *self.idps.list.write() = list;
        find()
    }

    /// Verify a token that is not one of ours: by the configured provider its `iss` names.
    /// None when no provider is configured for that issuer.
    pub(crate) fn verify_external(
        &self,
        token: &str,
        now: u64,
    ) -> Option<Result<Authenticated, TokenError>> {
        let issuer = unverified_issuer(token)?;
        let now_ms = phivault_records::engine::now_ms() as u64;
        let p = self.idp_for(&issuer, now_ms)?;
        let kid = unverified_kid(token);
        if kid.as_deref().is_some_and(|k| !p.issuer.has_kid(k)) {
            let due = {
                let mut f = p.fetched.lock();
                let due = *f == 0 || *f + self.freshness.idp_refetch_ms <= now_ms;
                if due {
                    *f = now_ms;
                }
                due
            };
            if due {
                blocking_io(|| p.fetch_keys());
            }
        }
        let users = self.vault.engine.users();
        let account = |name: &str| -> Option<Person> {
            let name = phivault_auth::users::normalize_username(name).ok()?;
            let rec = users.get(&name).ok()??;
            if rec.disabled {
                return None;
            }
            Some(Person {
                user_id: rec.id.clone(),
                role: rec.role,
                generation: rec.generation,
                fhir_user: rec.fhir_user(),
                patient: rec.patient.clone(),
            })
        };
        Some(p.issuer.verify(token, now, &account))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_the_loopback_issuers_own_origin_is_fetched() {
        assert!(fetchable(
            "https://idp.example",
            "https://keys.example/jwks"
        ));
        assert!(fetchable(
            "http://127.0.0.1:9000",
            "http://127.0.0.1:9000/jwks"
        ));
        assert!(!fetchable("https://idp.example", "http://idp.example/jwks"));
        assert!(!fetchable("http://127.0.0.1:9000", "http://10.0.0.1/jwks"));
        assert!(!fetchable(
            "http://127.0.0.1:9000",
            "http://127.0.0.1:90001/jwks"
        ));
        assert_eq!(idp_meta_key("https://i"), "idp:https://i");
    }
}
