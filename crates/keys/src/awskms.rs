//! The `aws-kms` provider: envelope encryption. The master key exists at rest only wrapped
//! by an AWS KMS key: at `init` KMS `GenerateDataKey` (AES_256) returns a new key and its
//! ciphertext blob; the key becomes the master key, the blob is kept in
//! `DIR/keys/master.kms`. At start `Decrypt` opens the blob. Both calls carry the
//! encryption context `{"phivault-data-dir": ID}`, so a blob moved to another data
//! directory (or a provider record edited to another id) does not open. `keys migrate
//! --to aws-kms` wraps an existing master key with `Encrypt` instead.
//!
//! The requests are a few JSON calls (`TrentService.*`, `application/x-amz-json-1.1`) made
//! with ureq (rustls, ring) and signed by [`crate::sigv4`]: no AWS SDK. https only, with
//! Mozilla's roots or `--kms-ca-file`; plain http only to a loopback endpoint (a test
//! server). Credentials come the AWS way: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`
//! (`AWS_SESSION_TOKEN`), else the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`,
//! else `~/.aws/credentials`; profile `AWS_PROFILE`, else `default`). No message carries a
//! secret, a credential or key material.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use phivault_crypto::MasterKey;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

use crate::sigv4::{self, Credentials};
use crate::{KeyError, Provider};

/// The encryption context's one key.
pub const CONTEXT_KEY: &str = "phivault-data-dir";
/// Largest KMS answer read.
const MAX_ANSWER: u64 = 64 * 1024;
/// Largest shared credentials file read.
const MAX_CREDENTIALS_FILE: u64 = 256 * 1024;

/// What `init --key-provider aws-kms` (or `keys migrate --to aws-kms`) asks for.
#[derive(Debug, Clone, Default)]
pub struct KmsSpec {
    /// Key id, key ARN, alias name or alias ARN.
    pub key_id: String,
    /// Default: `AWS_REGION`, `AWS_DEFAULT_REGION`, else the key ARN's region.
    pub region: Option<String>,
    /// Default: `https://kms.REGION.amazonaws.com`.
    pub endpoint: Option<String>,
    /// A PEM file of the CA certificates to trust for the endpoint (a private CA).
    pub ca_file: Option<PathBuf>,
}

/// The wrapped key, relative to the data directory.
pub fn wrapped_path(root: &Path) -> PathBuf {
    root.join("keys/master.kms")
}

#[derive(Serialize, Deserialize)]
struct Wrapped {
    v: u32,
    /// The KMS key's ARN as KMS named it when wrapping (informative).
    key_arn: String,
    /// KMS's ciphertext blob, base64.
    blob: String,
}

/// A KMS endpoint ready to call.
struct Kms {
    key_id: String,
    region: String,
    endpoint: String,
    host: String,
    agent: ureq::Agent,
    creds: Credentials,
}

fn context(data_dir_id: &str) -> serde_json::Value {
    serde_json::json!({ CONTEXT_KEY: data_dir_id })
}

/// `https://host[:port]` (or `http://` for loopback), the default port left out so the
/// signed `host` is what the client sends. Returns (endpoint, host).
pub fn check_endpoint(endpoint: &str) -> Result<(String, String), KeyError> {
    check_endpoint_for("--kms-endpoint", endpoint)
}

/// [`check_endpoint`] for another service; refusals name `option` (where the endpoint was
/// given, e.g. `endpoint=`).
pub fn check_endpoint_for(option: &str, endpoint: &str) -> Result<(String, String), KeyError> {
    let bad = |why: &str| KeyError::refused(format!("{option} {endpoint:?}: {why}"));
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| bad("not a URL (https://host[:port])"))?;
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority.contains(['/', '?', '#', '@'])
        || !authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    {
        return Err(bad(
            "give scheme, host and port only (no path, query or user)",
        ));
    }
    let authority = authority.to_ascii_lowercase();
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (h.to_owned(), after.strip_prefix(':').map(str::to_owned))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p.to_owned())),
            None => (authority.clone(), None),
        },
    };
    if let Some(p) = &port
        && p.parse::<u16>().map_or(true, |n| n == 0)
    {
        return Err(bad("bad port"));
    }
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let default_port = match scheme.as_str() {
        "https" => "443",
        "http" if loopback => "80",
        "http" => {
            return Err(bad(
                "plain http is accepted only for a loopback test server; use https",
            ));
        }
        _ => return Err(bad("the scheme must be https")),
    };
    let host_header = match &port {
        Some(p) if p != default_port => {
            if authority.starts_with('[') {
                format!("[{host}]:{p}")
            } else {
                format!("{host}:{p}")
            }
        }
        _ if authority.starts_with('[') => format!("[{host}]"),
        _ => host.clone(),
    };
    Ok((format!("{scheme}://{host_header}"), host_header))
}

/// A plausible AWS region name (`eu-central-1`).
pub fn check_region(region: &str) -> Result<(), KeyError> {
    if region.is_empty()
        || region.len() > 32
        || !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(KeyError::refused(format!(
            "{region:?} is not an AWS region name (e.g. eu-central-1)"
        )));
    }
    Ok(())
}

fn check_key_id(key_id: &str) -> Result<(), KeyError> {
    if key_id.is_empty() || key_id.len() > 2048 || !key_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(KeyError::refused(
            "--kms-key-id must name a KMS key (key id, key ARN, alias/NAME or alias ARN)",
        ));
    }
    Ok(())
}

/// The recorded provider for `spec`: region and endpoint resolved, the CA file absolute.
pub fn resolve(spec: &KmsSpec) -> Result<Provider, KeyError> {
    check_key_id(&spec.key_id)?;
    let from_arn = || {
        // arn:aws:kms:REGION:ACCOUNT:key/ID
        let parts: Vec<&str> = spec.key_id.split(':').collect();
        (parts.len() >= 6 && parts[0] == "arn" && parts[2] == "kms").then(|| parts[3].to_owned())
    };
    let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    let region = spec
        .region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(from_arn)
        .ok_or_else(|| {
            KeyError::refused(
                "which AWS region? give --kms-region (or set AWS_REGION, or name the key by its ARN)",
            )
        })?;
    check_region(&region)?;
    let endpoint = match &spec.endpoint {
        Some(e) => e.clone(),
        None => format!("https://kms.{region}.amazonaws.com"),
    };
    let (endpoint, _) = check_endpoint(&endpoint)?;
    let ca_file = match &spec.ca_file {
        Some(p) => Some(std::path::absolute(p).map_err(|e| KeyError::io(p, e))?),
        None => None,
    };
    Ok(Provider::AwsKms {
        key_id: spec.key_id.clone(),
        region,
        endpoint,
        ca_file,
    })
}

/// AWS credentials from the environment, else the shared credentials file.
pub fn credentials() -> Result<Credentials, KeyError> {
    let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Credentials {
            access_key_id: id,
            secret_access_key: Zeroizing::new(secret),
            session_token: env("AWS_SESSION_TOKEN").map(Zeroizing::new),
        });
    }
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_owned());
    let path = match env("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => PathBuf::from(p),
        None => match env("HOME") {
            Some(h) => PathBuf::from(h).join(".aws/credentials"),
            None => PathBuf::from("~/.aws/credentials"),
        },
    };
    let none = || {
        KeyError::refused(format!(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones), or give profile [{profile}] in {} (AWS_PROFILE chooses another)",
            path.display()
        ))
    };
    let mut text = Zeroizing::new(String::new());
    match std::fs::File::open(&path) {
        Ok(f) => {
            f.take(MAX_CREDENTIALS_FILE)
                .read_to_string(&mut text)
                .map_err(|e| KeyError::io(&path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(none()),
        Err(e) => return Err(KeyError::io(&path, e)),
    }
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut in_profile = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            match k.trim() {
                "aws_access_key_id" => id = Some(v.to_owned()),
                "aws_secret_access_key" => secret = Some(Zeroizing::new(v.to_owned())),
                "aws_session_token" => token = Some(Zeroizing::new(v.to_owned())),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            session_token: token,
        }),
        _ => Err(none()),
    }
}

/// An HTTP agent for AWS calls (ureq, rustls with ring): Mozilla's roots, or only the CA
/// certificates of the PEM file `ca_file` (a private CA); connect timeout 5 s, `timeout`
/// for the whole request, no redirects, HTTP error statuses returned as answers.
pub fn agent(ca_file: Option<&Path>, timeout: Duration) -> Result<ureq::Agent, KeyError> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| KeyError::io(path, e))?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|i| match i {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(KeyError::refused(format!(
                "{} holds no PEM certificate (the CA file)",
                path.display()
            )));
        }
        tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
    }
    Ok(ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls.build())
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .build(),
    ))
}

/// The AWS error classes, by what the operator must fix.
fn explain(kms: &Kms, status: u16, kind: &str, message: &str) -> KeyError {
    let short: String = message.chars().take(300).collect();
    let detail = if short.is_empty() {
        format!("{kind}, HTTP {status}")
    } else {
        format!("{kind}, HTTP {status}: {short}")
    };
    let why = match kind {
        "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredTokenException" => format!(
            "the AWS KMS at {} refused the credentials (access key {}): wrong or expired AWS credentials",
            kms.endpoint, kms.creds.access_key_id
        ),
        "NotFoundException"
        | "DisabledException"
        | "KMSInvalidStateException"
        | "IncorrectKeyException"
        | "InvalidKeyUsageException" => format!(
            "the AWS KMS at {} cannot use the key {:?} in {} (wrong key id or region, or the key is disabled or pending deletion)",
            kms.endpoint, kms.key_id, kms.region
        ),
        "AccessDeniedException" | "AccessDenied" => format!(
            "the AWS KMS at {} denied the use of the key {:?}: the credentials (access key {}) may not use it, or keys/master.kms was wrapped by another key",
            kms.endpoint, kms.key_id, kms.creds.access_key_id
        ),
        "InvalidCiphertextException" => format!(
            "the AWS KMS key {:?} does not open keys/master.kms for this data directory: a wrong encryption context (keys/provider.json's data_dir_id changed, or master.kms comes from another data directory) or a damaged keys/master.kms",
            kms.key_id
        ),
        _ => format!("the AWS KMS at {} refused the request", kms.endpoint),
    };
    KeyError::refused(format!("{why} ({detail})"))
}

impl Kms {
    fn new(provider: &Provider) -> Result<Kms, KeyError> {
        let Provider::AwsKms {
            key_id,
            region,
            endpoint,
            ca_file,
        } = provider
        else {
            return Err(KeyError::refused("not an aws-kms provider"));
        };
        check_key_id(key_id)?;
        check_region(region)?;
        let (endpoint, host) = check_endpoint(endpoint)?;
        let agent = agent(ca_file.as_deref(), Duration::from_secs(15))?;
        Ok(Kms {
            key_id: key_id.clone(),
            region: region.clone(),
            endpoint,
            host,
            agent,
            creds: credentials()?,
        })
    }

    /// One signed `TrentService.{action}` call; the answer's body (wiped on drop).
    fn call(&self, action: &str, body: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let date = sigv4::amz_date(now);
        let target = format!("TrentService.{action}");
        let ctype = "application/x-amz-json-1.1";
        let mut headers: Vec<(&str, &str)> = vec![
            ("content-type", ctype),
            ("host", &self.host),
            ("x-amz-date", &date),
            ("x-amz-target", &target),
        ];
        if let Some(t) = &self.creds.session_token {
            headers.push(("x-amz-security-token", t.as_str()));
        }
        let signed = sigv4::sign(
            &self.creds,
            &self.region,
            "kms",
            &date,
            &sigv4::Request {
                method: "POST",
                path: "/",
                query: "",
                headers: &headers,
                payload: body,
            },
        );
        let mut req = self
            .agent
            .post(format!("{}/", self.endpoint))
            .header("Authorization", &signed.authorization);
        for (n, v) in headers.iter().filter(|(n, _)| *n != "host") {
            req = req.header(*n, *v);
        }
        let mut resp = req.send(body).map_err(|e| {
            let tls = matches!(e, ureq::Error::Tls(_) | ureq::Error::Rustls(_));
            KeyError::refused(if tls {
                format!(
                    "the AWS KMS at {} is unreachable: TLS failed ({e}); for a private CA give --kms-ca-file",
                    self.endpoint
                )
            } else {
                format!("the AWS KMS at {} is unreachable ({e})", self.endpoint)
            })
        })?;
        let status = resp.status().as_u16();
        let answer = Zeroizing::new(
            resp.body_mut()
                .with_config()
                .limit(MAX_ANSWER)
                .read_to_vec()
                .map_err(|e| {
                    KeyError::refused(format!(
                        "the AWS KMS at {} answered unreadably ({e})",
                        self.endpoint
                    ))
                })?,
        );
        if status == 200 {
            return Ok(answer);
        }
        // JSON errors (`__type`), or the XML ones of the authentication layer (`<Code>`)
        let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        let text = String::from_utf8_lossy(&answer);
        let xml = |tag: &str| {
            let open = format!("<{tag}>");
            let start = text.find(&open)? + open.len();
            let len = text[start..].find('<')?;
            Some(text[start..start + len].to_owned())
        };
        let kind = v["__type"]
            .as_str()
            .or_else(|| v["code"].as_str())
            .map(str::to_owned)
            .or_else(|| xml("Code"))
            .unwrap_or_else(|| "unknown error".to_owned());
        let kind = kind.rsplit('#').next().unwrap_or(&kind);
        let message = v["message"]
            .as_str()
            .or_else(|| v["Message"].as_str())
            .map(str::to_owned)
            .or_else(|| xml("Message"))
            .unwrap_or_default();
        Err(explain(self, status, kind, &message))
    }

    fn json_body(v: &impl Serialize) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        serde_json::to_vec(v)
            .map(Zeroizing::new)
            .map_err(|_| KeyError::refused("cannot encode a KMS request"))
    }

    /// `GenerateDataKey` (AES_256): (new key, ciphertext blob, key ARN).
    fn generate(&self, id: &str) -> Result<(MasterKey, Vec<u8>, String), KeyError> {
        let body = Self::json_body(&serde_json::json!({
            "KeyId": self.key_id,
            "KeySpec": "AES_256",
            "EncryptionContext": context(id),
        }))?;
        let answer = self.call("GenerateDataKey", &body)?;
        #[derive(Deserialize)]
        struct Out {
            #[serde(rename = "Plaintext")]
            plaintext: String,
            #[serde(rename = "CiphertextBlob")]
            blob: String,
            #[serde(rename = "KeyId", default)]
            key_arn: String,
        }
        let mut out: Out = serde_json::from_slice(&answer).map_err(|_| self.garbled())?;
        let master = self.key_from(&out.plaintext);
        out.plaintext.zeroize();
        let blob = b64()
            .decode(&out.blob)
            .map_err(|_| self.garbled())
            .and_then(|b| {
                if b.is_empty() {
                    Err(self.garbled())
                } else {
                    Ok(b)
                }
            })?;
        Ok((master?, blob, out.key_arn))
    }

    /// `Encrypt` an existing master key: (ciphertext blob, key ARN).
    fn encrypt(&self, id: &str, master: &MasterKey) -> Result<(Vec<u8>, String), KeyError> {
        let plain = Zeroizing::new(b64().encode(master.expose_to_provider()));
        let body = Self::json_body(&serde_json::json!({
            "KeyId": self.key_id,
            "Plaintext": plain.as_str(),
            "EncryptionContext": context(id),
        }))?;
        let answer = self.call("Encrypt", &body)?;
        #[derive(Deserialize)]
        struct Out {
            #[serde(rename = "CiphertextBlob")]
            blob: String,
            #[serde(rename = "KeyId", default)]
            key_arn: String,
        }
        let out: Out = serde_json::from_slice(&answer).map_err(|_| self.garbled())?;
        let blob = b64().decode(&out.blob).map_err(|_| self.garbled())?;
        Ok((blob, out.key_arn))
    }

    /// `Decrypt` a blob under this directory's encryption context, pinned to the key.
    fn decrypt(&self, id: &str, blob: &[u8]) -> Result<MasterKey, KeyError> {
        let body = Self::json_body(&serde_json::json!({
            "KeyId": self.key_id,
            "CiphertextBlob": b64().encode(blob),
            "EncryptionContext": context(id),
        }))?;
        let answer = self.call("Decrypt", &body)?;
        #[derive(Deserialize)]
        struct Out {
            #[serde(rename = "Plaintext")]
            plaintext: String,
        }
        let mut out: Out = serde_json::from_slice(&answer).map_err(|_| self.garbled())?;
        let master = self.key_from(&out.plaintext);
        out.plaintext.zeroize();
        master
    }

    fn key_from(&self, b64_plain: &str) -> Result<MasterKey, KeyError> {
        let bytes = Zeroizing::new(b64().decode(b64_plain).map_err(|_| self.garbled())?);
        let key: &[u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            KeyError::refused(format!(
                "the AWS KMS at {} returned a key that is not 256 bits",
                self.endpoint
            ))
        })?;
        Ok(MasterKey::from_bytes(key))
    }

    fn garbled(&self) -> KeyError {
        KeyError::refused(format!(
            "the AWS KMS at {} answered something that is not a KMS answer",
            self.endpoint
        ))
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn write_wrapped(root: &Path, blob: &[u8], key_arn: String) -> Result<(), KeyError> {
    let w = Wrapped {
        v: 1,
        key_arn,
        blob: b64().encode(blob),
    };
    let mut bytes = serde_json::to_vec_pretty(&w)
        .map_err(|_| KeyError::refused("cannot encode the wrapped key"))?;
    bytes.push(b'\n');
    let path = wrapped_path(root);
    let tmp = path.with_extension("kms.new");
    let _ = std::fs::remove_file(&tmp);
    phivault_crypto::write_private_file(&tmp, &bytes)
        .map_err(|e| KeyError::refused(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(|e| KeyError::io(&path, e))?;
    crate::config::sync_dir(&path)
}

fn read_wrapped(root: &Path) -> Result<Vec<u8>, KeyError> {
    let path = wrapped_path(root);
    let bytes = phivault_crypto::read_private_file(&path, 64 * 1024)
        .map_err(|e| KeyError::refused(format!("cannot use {}: {e}", path.display())))?;
    let bad = || KeyError::refused(format!("{} is damaged", path.display()));
    let w: Wrapped = serde_json::from_slice(bytes.expose()).map_err(|_| bad())?;
    if w.v != 1 {
        return Err(bad());
    }
    b64().decode(&w.blob).map_err(|_| bad())
}

/// A new master key from KMS `GenerateDataKey` for the data directory `id`; the blob is
/// written to `keys/master.kms` after a `Decrypt` proved it opens.
pub fn create(root: &Path, id: &str, spec: &KmsSpec) -> Result<(MasterKey, Provider), KeyError> {
    let provider = resolve(spec)?;
    let kms = Kms::new(&provider)?;
    let (master, blob, key_arn) = kms.generate(id)?;
    check_round_trip(&kms, id, &blob, &master)?;
    write_wrapped(root, &blob, key_arn)?;
    Ok((master, provider))
}

/// Wrap an existing `master` (migration) under the KMS key of `spec` with `Encrypt`.
pub fn create_from(
    root: &Path,
    id: &str,
    spec: &KmsSpec,
    master: &MasterKey,
) -> Result<Provider, KeyError> {
    let provider = resolve(spec)?;
    let kms = Kms::new(&provider)?;
    let (blob, key_arn) = kms.encrypt(id, master)?;
    check_round_trip(&kms, id, &blob, master)?;
    write_wrapped(root, &blob, key_arn)?;
    Ok(provider)
}

fn check_round_trip(kms: &Kms, id: &str, blob: &[u8], master: &MasterKey) -> Result<(), KeyError> {
    let back = kms.decrypt(id, blob)?;
    // compared by digest: no early exit on the keys' own bytes
    let d = |m: &MasterKey| ring::digest::digest(&ring::digest::SHA256, m.expose_to_provider());
    let same = d(&back).as_ref() == d(master).as_ref();
    if !same {
        return Err(KeyError::refused(format!(
            "the AWS KMS at {} does not give back the key it wrapped; nothing was written",
            kms.endpoint
        )));
    }
    Ok(())
}

/// The master key of `root`: `keys/master.kms` opened by KMS `Decrypt`.
pub fn load(root: &Path, id: &str, provider: &Provider) -> Result<MasterKey, KeyError> {
    let blob = read_wrapped(root)?;
    let kms = Kms::new(provider)?;
    kms.decrypt(id, &blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_https_or_loopback_http_with_the_default_port_left_out() {
        let ok = |e: &str| check_endpoint(e).expect(e);
        assert_eq!(
            ok("https://kms.eu-central-1.amazonaws.com/"),
            (
                "https://kms.eu-central-1.amazonaws.com".into(),
                "kms.eu-central-1.amazonaws.com".into()
            )
        );
        assert_eq!(
            ok("https://KMS.example:443"),
            ("https://kms.example".into(), "kms.example".into())
        );
        assert_eq!(
            ok("http://127.0.0.1:5000"),
            ("http://127.0.0.1:5000".into(), "127.0.0.1:5000".into())
        );
        assert_eq!(ok("http://[::1]:8080").1, "[::1]:8080");
        assert_eq!(ok("http://localhost:80").0, "http://localhost");
        for bad in [
            "http://kms.example.com",
            "http://10.0.0.1:5000",
            "ftp://127.0.0.1",
            "https://kms.example/path",
            "https://user@kms.example",
            "https://kms.example:0",
            "https://kms.example:99999",
            "kms.example",
            "https://",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_region_comes_from_the_flag_or_the_key_arn() {
        let spec = KmsSpec {
            key_id: "arn:aws:kms:eu-west-3:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                .into(),
            region: Some("eu-west-3".into()),
            ..KmsSpec::default()
        };
        let Provider::AwsKms {
            region, endpoint, ..
        } = resolve(&spec).expect("resolve")
        else {
            panic!("aws-kms");
        };
        assert_eq!(region, "eu-west-3");
        assert_eq!(endpoint, "https://kms.eu-west-3.amazonaws.com");
        let bad = KmsSpec {
            region: Some("EU WEST".into()),
            ..spec.clone()
        };
        assert!(resolve(&bad).is_err());
        let no_key = KmsSpec {
            key_id: "has space".into(),
            ..spec
        };
        assert!(resolve(&no_key).is_err());
    }
}
