//! Registrations kept in the data directory: back-end clients, SMART apps, people's accounts.

use std::path::Path;

use anyhow::{Context, Result};

use crate::args::UserCmd;
use crate::datadir;
use phivault_store::Store as _;

pub(crate) fn client_add(
    data_dir: &Path,
    name: &str,
    scope: &str,
    out: Option<&Path>,
    token_url: &str,
    export_key: Option<&Path>,
) -> Result<i32> {
    let scopes = phivault_auth::ScopeSet::parse(scope)
        .map_err(|e| anyhow::anyhow!("invalid --scope: {e}"))?;
    // a back-end client acts for a system: its tokens carry system/ scopes only (the token
    // endpoint grants no other), so a patient/, user/ or identity scope is a mistake
    let refused = scopes.not_system();
    if !refused.is_empty() {
        anyhow::bail!(
            "refusing --scope {}: a back-end client (SMART Backend Services) takes system/ scopes only, e.g. 'system/*.rs'; patient/ and user/ scopes are for apps a person signs in to (phivault app add)",
            refused.join(" ")
        );
    }
    if !token_url.starts_with("https://") {
        anyhow::bail!("--token-url must be an https:// URL: phivault speaks TLS only");
    }
    if let Some(p) = out
        && std::fs::symlink_metadata(p).is_ok()
    {
        anyhow::bail!(
            "{} already exists; refusing to overwrite a credentials file (choose another --out)",
            p.display()
        );
    }
    let export_key = match export_key {
        Some(p) => {
            let jwk: serde_json::Value = serde_json::from_slice(
                &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
            )
            .map_err(|_| anyhow::anyhow!("--export-key: {} is not a JWK (JSON)", p.display()))?;
            phivault_share::export::encryption_key(&jwk)
                .map_err(|e| anyhow::anyhow!("--export-key: {e}"))?;
            Some(jwk)
        }
        None => None,
    };
    let opened = datadir::open(data_dir)?;
    let client_id = uuid_like()?;
    let kid = format!("{client_id}-1");
    let (private, public) = phivault_auth::generate_es384_jwk(&kid)
        .map_err(|e| anyhow::anyhow!("key generation failed: {e}"))?;
    let record = phivault_auth::ClientRecord {
        client_id: client_id.clone(),
        name: name.to_owned(),
        jwks: vec![public],
        scopes: scopes.clone(),
        disabled: false,
        export_key,
    };
    record
        .validate()
        .map_err(|e| anyhow::anyhow!("client record invalid: {e}"))?;
    opened.store.set_meta(
        &phivault_records::registrations::client_meta_key(&client_id),
        &serde_json::to_vec(&record)?,
    )?;
    let private_json: serde_json::Value = serde_json::from_str(
        &private
            .to_json_string()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    )?;
    let mut creds = serde_json::json!({
        "client_id": client_id,
        "name": name,
        "scope": scopes.to_string(),
        "token_url": token_url,
        "private_jwk": private_json,
    });
    if let Some(origin) = token_url.strip_suffix("/auth/token") {
        creds["fhir_base_url"] = format!("{origin}/fhir").into();
    }
    // The development certificate serves loopback only: a client of a loopback server
    // trusts this data directory's CA (public; `phivault token` uses it)
    if is_loopback_https(token_url)
        && let Ok(pem) = std::fs::read_to_string(opened.dir.ca_cert())
    {
        creds["tls_ca_pem"] = pem.into();
    }
    opened.store.close();
    let text = serde_json::to_string_pretty(&creds)?;
    match out {
        Some(p) => {
            phivault_crypto::write_private_file(p, text.as_bytes())?;
            eprintln!(
                "client {client_id} registered; credentials written to {}",
                p.display()
            );
        }
        None => println!("{text}"),
    }
    Ok(0)
}

pub(crate) fn client_disable(data_dir: &Path, client_id: &str) -> Result<i32> {
    let key = phivault_records::registrations::client_meta_key(client_id);
    let opened = datadir::open(data_dir)?;
    let r = (|| -> Result<()> {
        let raw = opened
            .store
            .meta(&key)?
            .ok_or_else(|| anyhow::anyhow!("no client {client_id} is registered"))?;
        let mut record: phivault_auth::ClientRecord =
            serde_json::from_slice(&raw).context("the client record does not parse")?;
        record.disabled = true;
        opened.store.set_meta(&key, &serde_json::to_vec(&record)?)?;
        Ok(())
    })();
    opened.store.close();
    r?;
    eprintln!("client {client_id} disabled");
    Ok(0)
}

pub(crate) fn app_add(
    data_dir: &Path,
    name: &str,
    redirect_uris: Vec<String>,
    scope: &str,
    require_dpop: bool,
) -> Result<i32> {
    let scopes = phivault_auth::ScopeSet::parse(scope)
        .map_err(|e| anyhow::anyhow!("invalid --scope: {e}"))?;
    let record = phivault_auth::authorize::AppRecord {
        client_id: uuid_like()?,
        name: name.to_owned(),
        redirect_uris,
        scopes,
        disabled: false,
        require_dpop,
    };
    record
        .validate()
        .map_err(|e| anyhow::anyhow!("app refused: {e}"))?;
    let opened = datadir::open(data_dir)?;
    let r = opened.store.set_meta(
        &phivault_records::registrations::app_meta_key(&record.client_id),
        &serde_json::to_vec(&record)?,
    );
    opened.store.close();
    r?;
    println!(
        "{}",
        serde_json::json!({"client_id": record.client_id, "name": record.name,
            "scope": record.scopes.to_string(), "require_dpop": record.require_dpop})
    );
    Ok(0)
}

fn parse_role(role: &str) -> Result<phivault_auth::Role> {
    phivault_auth::Role::parse(role)
        .ok_or_else(|| anyhow::anyhow!("invalid --role: clinician, auditor, admin or patient"))
}

/// Refuse a link to a Practitioner or Patient that does not exist (or is deleted).
fn check_link_exists(
    store: &dyn phivault_store::Store,
    practitioner: Option<&str>,
    patient: Option<&str>,
) -> Result<()> {
    for (rtype, id) in [("Practitioner", practitioner), ("Patient", patient)] {
        if let Some(id) = id {
            match store.current(rtype, id)? {
                Some(row) if !row.deleted => {}
                _ => anyhow::bail!("there is no {rtype} with that id in this data directory"),
            }
        }
    }
    Ok(())
}

pub(crate) fn user_cmd(cmd: UserCmd) -> Result<i32> {
    use phivault_auth::{UserRecord, users::normalize_username};
    use phivault_records::UserDirectory;
    match cmd {
        UserCmd::Add {
            data_dir,
            username,
            role,
            practitioner,
            patient,
        } => {
            let role = parse_role(&role)?;
            let mut line = zeroize::Zeroizing::new(String::new());
            std::io::stdin()
                .read_line(&mut line)
                .context("cannot read the password from standard input")?;
            let password = line.trim_end_matches(['\n', '\r']);
            let opened = datadir::open(&data_dir)?;
            let result = (|| {
                check_link_exists(&*opened.store, practitioner.as_deref(), patient.as_deref())?;
                let rec = UserRecord::new(
                    phivault_crypto::random_bytes()?,
                    &username,
                    role,
                    practitioner.as_deref(),
                    patient.as_deref(),
                    password,
                    &phivault_crypto::random_bytes()?,
                    phivault_crypto::random_bytes()?,
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_secs(),
                )?;
                UserDirectory::new(&opened.keys, &*opened.store).add(&rec)?;
                Ok::<_, anyhow::Error>(rec)
            })();
            opened.store.close();
            let rec = result?;
            let link = match (&rec.practitioner, &rec.patient) {
                (Some(p), _) => format!(", Practitioner/{p}"),
                (_, Some(p)) => format!(", Patient/{p}"),
                _ => String::new(),
            };
            eprintln!(
                "user {} added ({}{link}). Enrol the second factor in an authenticator app now: \
                 the secret below is shown once, and the first sign-in must prove a code from it.",
                rec.username, rec.role
            );
            println!("{}", rec.enrolment_uri());
            Ok(0)
        }
        UserCmd::Disable { data_dir, username } => {
            let username = normalize_username(&username)?;
            let opened = datadir::open(&data_dir)?;
            let users = UserDirectory::new(&opened.keys, &*opened.store);
            let result = (|| {
                let mut rec = users
                    .get(&username)?
                    .ok_or_else(|| anyhow::anyhow!("no such user"))?;
                rec.disable();
                users.put(&rec)?;
                Ok::<_, anyhow::Error>(())
            })();
            opened.store.close();
            result?;
            eprintln!("user {username} disabled");
            Ok(0)
        }
        UserCmd::Role {
            data_dir,
            username,
            role,
            practitioner,
            patient,
        } => {
            let username = normalize_username(&username)?;
            let role = parse_role(&role)?;
            let opened = datadir::open(&data_dir)?;
            let users = UserDirectory::new(&opened.keys, &*opened.store);
            let result = (|| {
                check_link_exists(&*opened.store, practitioner.as_deref(), patient.as_deref())?;
                let mut rec = users
                    .get(&username)?
                    .ok_or_else(|| anyhow::anyhow!("no such user"))?;
                rec.set_role(role, practitioner.as_deref(), patient.as_deref())?;
                users.put(&rec)?;
                Ok::<_, anyhow::Error>(())
            })();
            opened.store.close();
            result?;
            eprintln!("user {username} is now {role}");
            Ok(0)
        }
    }
}

fn uuid_like() -> Result<String> {
    let b: [u8; 16] = phivault_crypto::random_bytes()?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `phivault idp add`: trust a hospital's OpenID Connect provider for people's tokens.
pub(crate) fn idp_add(
    data_dir: &Path,
    issuer: String,
    audience: String,
    username_claim: String,
    ca_file: Option<&Path>,
) -> Result<i32> {
    let ca_pem = match ca_file {
        Some(f) => Some(
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        ),
        None => None,
    };
    let cfg = phivault_auth::oidc::IdpConfig {
        issuer,
        audience,
        username_claim,
        ca_pem,
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("identity provider refused: {e}"))?;
    let opened = datadir::open(data_dir)?;
    let r = phivault_records::registrations::store_config(&opened.keys, &*opened.store, &cfg);
    opened.store.close();
    r?;
    println!("identity provider {} trusted", cfg.issuer);
    Ok(0)
}

/// Whether `url` is https on a loopback host (`localhost`, `127.x.y.z`, `[::1]`).
fn is_loopback_https(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_https;

    #[test]
    fn only_https_loopback_hosts_get_the_development_ca() {
        for yes in [
            "https://127.0.0.1:8443/auth/token",
            "https://localhost/auth/token",
            "https://[::1]:8443/auth/token",
            "https://127.0.0.2:1/auth/token",
        ] {
            assert!(is_loopback_https(yes), "{yes}");
        }
        for no in [
            "http://127.0.0.1:8443/auth/token",
            "https://fhir.example.org/auth/token",
            "https://127.0.0.1.example.org/auth/token",
            "https://user@127.0.0.1/auth/token",
            "https://10.0.0.1:8443/auth/token",
        ] {
            assert!(!is_loopback_https(no), "{no}");
        }
    }
}
