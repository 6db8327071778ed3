//! A SMART Backend Services client of a phivault server, for the commands that talk to a
//! running server (`token`, `import --client`): it reads a credentials file written by
//! `client add`, signs a client assertion with its key, obtains access tokens over TLS
//! (trusting the CA in the file, a `--ca-file`, or the system's roots) and renews them
//! before they expire.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use phivault_auth::PrivateJwk;
use phivault_crypto::Secret;
use serde_json::{Value, json};

/// Credentials files are small JSON documents; anything larger is not one.
const CREDENTIALS_MAX: usize = 64 * 1024;
/// Lifetime of a client assertion (the server accepts at most 5 minutes).
const ASSERTION_SECS: u64 = 120;
/// Renew a token this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(30);

/// A credentials file (`phivault client add --out FILE`).
pub struct Credentials {
    pub client_id: String,
    /// The scopes the client was registered with (what `token` asks for by default).
    pub scope: String,
    pub token_url: String,
    /// The FHIR base URL next to the token endpoint (`…/fhir`).
    pub fhir_base: String,
    /// PEM of the CA that issued the server's certificate, when `client add` knew it.
    ca_pem: Option<String>,
    key: PrivateJwk,
}

impl Credentials {
    /// Reads and checks a credentials file; it holds a private key, so it must be private
    /// to its owner like every key file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = phivault_crypto::read_private_file(path, CREDENTIALS_MAX)
            .map_err(|e| anyhow!("cannot use the credentials file {}: {e}", path.display()))?;
        let v: Value = serde_json::from_slice(bytes.expose()).map_err(|_| {
            anyhow!(
                "{} is not a credentials file (JSON from phivault client add)",
                path.display()
            )
        })?;
        let field = |name: &str| {
            v[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("the credentials file {} has no {name}", path.display()))
        };
        let token_url = field("token_url")?;
        // the assertion and the token must never cross the network in clear
        if !token_url.starts_with("https://") {
            bail!(
                "the token_url in {} is not an https:// URL; phivault speaks TLS only",
                path.display()
            );
        }
        let fhir_base = match v["fhir_base_url"].as_str() {
            Some(b) => b.trim_end_matches('/').to_owned(),
            None => fhir_base_next_to(&token_url)?,
        };
        let key = PrivateJwk::from_json_str(&v["private_jwk"].to_string()).map_err(|_| {
            anyhow!(
                "the credentials file {} has no usable private_jwk",
                path.display()
            )
        })?;
        Ok(Credentials {
            client_id: field("client_id")?,
            scope: field("scope")?,
            token_url,
            fhir_base,
            ca_pem: v["tls_ca_pem"].as_str().map(str::to_owned),
            key,
        })
    }

    /// A client assertion (RFC 7523) for the token endpoint, valid for two minutes.
    fn assertion(&self) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let jti: [u8; 16] = phivault_crypto::random_bytes()?;
        let jti: String = jti.iter().map(|b| format!("{b:02x}")).collect();
        self.key
            .sign_jws(&json!({
                "iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                "iat": now, "exp": now + ASSERTION_SECS, "jti": jti,
            }))
            .map_err(|e| anyhow!("cannot sign the client assertion: {e}"))
    }
}

/// `https://host:port/auth/token` → `https://host:port/fhir` (phivault's layout).
fn fhir_base_next_to(token_url: &str) -> Result<String> {
    match token_url.strip_suffix("/auth/token") {
        Some(origin) if origin.starts_with("https://") => Ok(format!("{origin}/fhir")),
        _ => bail!("the token_url in the credentials file is not https://…/auth/token"),
    }
}

/// An access token and when to renew it.
struct Token {
    value: Secret<String>,
    renew_at: Instant,
}

/// A connection to one server under one client's credentials. Clones share the
/// connection pool and the access token (one token request however many workers).
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    creds: Arc<Credentials>,
    scope: Arc<str>,
    token: Arc<Mutex<Option<Token>>>,
}

/// The server could not be reached (connection, TLS or timeout): nothing about the
/// request's outcome is known. `anyhow::Error::downcast_ref` finds it.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// A response: status and JSON body (`Value::Null` when the body is not JSON).
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Client {
    /// A client trusting `ca_file` if given, else the CA recorded in the credentials, else
    /// the system's roots.
    pub fn new(creds: Credentials, scope: Option<&str>, ca_file: Option<&Path>) -> Result<Self> {
        let ca_pem = match ca_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read the CA file {}", f.display()))?,
            ),
            None => creds.ca_pem.clone(),
        };
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(pem) = ca_pem {
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem.as_bytes())
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                bail!("the CA (from --ca-file or the credentials file) holds no PEM certificate");
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .tls_config(tls.build())
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(300)))
                .max_redirects(0)
                .build(),
        );
        let scope: Arc<str> = scope.unwrap_or(&creds.scope).into();
        Ok(Client {
            agent,
            creds: Arc::new(creds),
            scope,
            token: Arc::new(Mutex::new(None)),
        })
    }

    pub fn fhir_base(&self) -> &str {
        &self.creds.fhir_base
    }

    /// A valid access token: the current one, or a new one from the token endpoint (asked
    /// once for all clones: the others wait for it).
    pub fn token(&mut self) -> Result<Secret<String>> {
        let mut held = self.token.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = held.as_ref().is_some_and(|t| Instant::now() < t.renew_at);
        if !fresh {
            *held = Some(self.request_token()?);
        }
        match &*held {
            Some(t) => Ok(Secret::new(t.value.expose().clone())),
            None => bail!("no token"),
        }
    }

    /// Forget the token if it is still `used` (the server refused it: revoked, or its
    /// clock differs), so that the next request asks for a new one.
    fn drop_token(&self, used: &Secret<String>) {
        let mut held = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if held
            .as_ref()
            .is_some_and(|t| t.value.expose() == used.expose())
        {
            *held = None;
        }
    }

    fn request_token(&self) -> Result<Token> {
        let assertion = self.creds.assertion()?;
        let asked = Instant::now();
        let mut r = self
            .agent
            .post(&self.creds.token_url)
            .send_form([
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
                ("scope", &*self.scope),
            ])
            .map_err(|e| anyhow!(unreachable_server(&self.creds.token_url, &e)))?;
        let status = r.status().as_u16();
        let body: Value = r
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_json()
            .unwrap_or(Value::Null);
        if status != 200 {
            match (body["error"].as_str(), body["error_description"].as_str()) {
                (Some(error), why) => bail!(
                    "the token endpoint refused the request ({status}, {error}): {}",
                    why.unwrap_or("no description")
                ),
                (None, _) => bail!(
                    "the token endpoint answered {status} without an OAuth error; the server's log says why"
                ),
            }
        }
        let value = body["access_token"]
            .as_str()
            .ok_or_else(|| anyhow!("the token endpoint's answer has no access_token"))?;
        let lifetime = Duration::from_secs(body["expires_in"].as_u64().unwrap_or(60));
        Ok(Token {
            value: Secret::new(value.to_owned()),
            renew_at: asked + lifetime.saturating_sub(RENEW_BEFORE),
        })
    }

    /// POST a JSON body to `{fhir base}/{path}` (`path` empty for the base itself). A 401
    /// (the token was revoked or expired early) is retried once with a new token; a
    /// transport failure is an [`Unreachable`] error.
    pub fn post_json(
        &mut self,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        self.send_json(false, path, body, headers)
    }

    /// PUT a JSON body to `{fhir base}/{path}`, like [`Client::post_json`].
    pub fn put_json(&mut self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Result<Reply> {
        self.send_json(true, path, body, headers)
    }

    fn send_json(
        &mut self,
        put: bool,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let url = if path.is_empty() {
            self.creds.fhir_base.clone()
        } else {
            format!("{}/{path}", self.creds.fhir_base)
        };
        let mut attempt = 0;
        loop {
            let token = self.token()?;
            let reply = self.send_once(put, &url, &token, body, headers)?;
            if reply.status != 401 || attempt == 1 {
                return Ok(reply);
            }
            self.drop_token(&token);
            attempt += 1;
        }
    }

    fn send_once(
        &self,
        put: bool,
        url: &str,
        token: &Secret<String>,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let auth = format!("Bearer {}", token.expose());
        let req = if put {
            self.agent.put(url)
        } else {
            self.agent.post(url)
        };
        let mut req = req
            .header("Authorization", &auth)
            .header("Content-Type", "application/fhir+json")
            .header("Accept", "application/fhir+json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut r = req
            .send(body)
            .map_err(|e| anyhow!(unreachable_server(&self.creds.fhir_base, &e)))?;
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_json()
            .unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }
}

/// A transport failure, named without the request's content.
fn unreachable_server(url: &str, e: &ureq::Error) -> Unreachable {
    Unreachable(format!(
        "cannot reach {url}: {e} (is `phivault serve` running there, and is its CA trusted?)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fhir_base_sits_next_to_the_token_endpoint() {
        assert_eq!(
            fhir_base_next_to("https://127.0.0.1:8443/auth/token").expect("base"),
            "https://127.0.0.1:8443/fhir"
        );
        assert!(fhir_base_next_to("http://127.0.0.1:8443/auth/token").is_err());
        assert!(fhir_base_next_to("https://127.0.0.1:8443/token").is_err());
    }
}
