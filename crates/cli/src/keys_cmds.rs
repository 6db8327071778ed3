//! `phivault keys`: where a data directory's master key comes from, and moving it.

use std::path::Path;

use anyhow::{Result, bail};

use crate::args::{KeyArgs, KmsArgs, Pkcs11Args};
use crate::datadir;

/// What `--key-provider` and `--key-file` ask for at `init` or a first `serve`.
pub(crate) fn create_spec(
    key: &KeyArgs,
    unlock: &phivault_keys::Unlock,
) -> Result<phivault_keys::Create> {
    if key.key_provider != "pkcs11" && pkcs11_given(&key.pkcs11) {
        bail!("--pkcs11-module, --pkcs11-token and --pkcs11-key are for the pkcs11 provider");
    }
    if key.key_provider != "aws-kms" && kms_given(&key.kms) {
        bail!(
            "--kms-key-id, --kms-region, --kms-endpoint and --kms-ca-file are for the aws-kms provider"
        );
    }
    if key.key_provider != "shamir" && (key.shares.is_some() || key.threshold.is_some()) {
        bail!("--shares and --threshold are for the shamir provider");
    }
    match key.key_provider.as_str() {
        "shamir" => shamir_spec(key),
        "aws-kms" if key.key_file.is_none() => kms_spec(&key.kms),
        "aws-kms" => bail!("--key-file is for the file provider"),
        "pkcs11" if key.key_file.is_none() => pkcs11_spec(&key.pkcs11, unlock),
        "pkcs11" => bail!("--key-file is for the file provider"),
        "file" => Ok(phivault_keys::Create::File {
            key_file: key.key_file.clone(),
        }),
        "passphrase" if key.key_file.is_none() => Ok(phivault_keys::Create::Passphrase {
            source: unlock.passphrase.clone(),
        }),
        "passphrase" => bail!("--key-file is for the file provider"),
        other => bail!("unknown --key-provider {other:?}: file, passphrase, pkcs11 or aws-kms"),
    }
}

fn kms_given(a: &KmsArgs) -> bool {
    a.kms_key_id.is_some()
        || a.kms_region.is_some()
        || a.kms_endpoint.is_some()
        || a.kms_ca_file.is_some()
}

/// The `aws-kms` provider's key (region and endpoint may default).
fn kms_spec(a: &KmsArgs) -> Result<phivault_keys::Create> {
    let Some(key_id) = &a.kms_key_id else {
        bail!(
            "the aws-kms provider needs --kms-key-id KEY (id, ARN or alias), and --kms-region unless AWS_REGION is set or the ARN names it"
        );
    };
    Ok(phivault_keys::Create::AwsKms(
        phivault_keys::awskms::KmsSpec {
            key_id: key_id.clone(),
            region: a.kms_region.clone(),
            endpoint: a.kms_endpoint.clone(),
            ca_file: a.kms_ca_file.clone(),
        },
    ))
}

fn pkcs11_given(a: &Pkcs11Args) -> bool {
    a.pkcs11_module.is_some() || a.pkcs11_token.is_some() || a.pkcs11_key.is_some()
}

/// The `pkcs11` provider's place: all three of module, token and key are needed.
fn pkcs11_spec(a: &Pkcs11Args, unlock: &phivault_keys::Unlock) -> Result<phivault_keys::Create> {
    let (Some(module), Some(token), Some(key)) = (&a.pkcs11_module, &a.pkcs11_token, &a.pkcs11_key)
    else {
        bail!(
            "the pkcs11 provider needs --pkcs11-module PATH, --pkcs11-token LABEL and --pkcs11-key LABEL (the PIN from --pkcs11-pin-file or the terminal)"
        );
    };
    Ok(phivault_keys::Create::Pkcs11 {
        hsm: phivault_keys::pkcs11::Hsm {
            module: module.clone(),
            token: token.clone(),
            key: key.clone(),
        },
        pin: unlock.pkcs11_pin.clone(),
    })
}

/// The `shamir` provider's split: --shares N --threshold K, 2 <= K <= N <= 16.
fn shamir_spec(key: &KeyArgs) -> Result<phivault_keys::Create> {
    if key.key_file.is_some() {
        bail!("--key-file is for the file provider");
    }
    let (Some(shares), Some(threshold)) = (key.shares, key.threshold) else {
        bail!("the shamir provider needs --shares N and --threshold K (2 <= K <= N <= 16)");
    };
    let max = phivault_keys::shamir::MAX_SHARES;
    if !(2..=max).contains(&shares) || !(2..=shares).contains(&threshold) {
        bail!("--shares N and --threshold K need 2 <= K <= N <= {max}");
    }
    Ok(phivault_keys::Create::Shamir { shares, threshold })
}

/// Print the shares a shamir `init` made, once, on standard output (one a line); the
/// rest goes to standard error.
pub(crate) fn print_new_shares(cfg: &phivault_keys::ProviderConfig) -> Result<()> {
    use std::io::Write as _;
    let phivault_keys::Provider::Shamir { threshold, .. } = cfg.provider else {
        return Ok(());
    };
    let Some(shares) = phivault_keys::shamir::take_new_shares() else {
        return Ok(());
    };
    let mut out = std::io::stdout().lock();
    for s in shares.iter() {
        out.write_all(s.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    eprintln!(
        "These {} shares are printed once and stored nowhere: give each to a different custodian. Any {threshold} of them unseal the server (phivault unseal) and open the data directory offline (--share-file); fewer open nothing, and losing more than {} loses the data.",
        shares.len(),
        shares.len() - usize::from(threshold)
    );
    Ok(())
}

/// A line about where a new data directory's master key went.
pub(crate) fn describe(cfg: &phivault_keys::ProviderConfig) -> String {
    match &cfg.provider {
        phivault_keys::Provider::File { key_file } => format!(
            "master key file {} (outside the data directory: keep it apart from backups and copies of the data)",
            key_file.display()
        ),
        phivault_keys::Provider::Shamir { shares, threshold } => format!(
            "master key split into {shares} Shamir shares, any {threshold} of which rebuild it; nothing of it is stored: a server starts sealed until {threshold} shares unseal it"
        ),
        phivault_keys::Provider::Passphrase {} => {
            "master key wrapped under your passphrase (Argon2id); without the passphrase the data directory opens nothing".to_owned()
        }
        phivault_keys::Provider::Pkcs11 {
            module,
            token_label,
            key_label,
        } => format!(
            "master key wrapped (CKM_AES_GCM) by the non-extractable AES-256 key {key_label:?} in PKCS#11 token {token_label:?}, module {}; without the HSM and its PIN the data directory opens nothing",
            module.display()
        ),
        phivault_keys::Provider::AwsKms {
            key_id,
            region,
            endpoint,
            ca_file,
        } => format!(
            "master key wrapped by AWS KMS key {key_id:?} (region {region}, endpoint {endpoint}{}) in keys/master.kms, opened by KMS Decrypt at start; without access to that key the data directory opens nothing",
            ca_file
                .as_ref()
                .map(|f| format!(", CA {}", f.display()))
                .unwrap_or_default()
        ),
    }
}

/// `phivault keys status`.
pub(crate) fn status(data_dir: &Path) -> Result<i32> {
    let cfg = phivault_keys::ProviderConfig::read(data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "data directory {} (id {})",
        data_dir.display(),
        cfg.data_dir_id
    );
    println!(
        "provider {} since {}",
        cfg.provider.name(),
        since(cfg.since)
    );
    println!("{}", describe(&cfg));
    println!("{}", crate::kek_cmds::kek_status(data_dir)?);
    Ok(0)
}

fn since(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// `phivault keys migrate`: the same master key under another provider; a legacy
/// `master.key` inside the directory moves out and is shredded.
pub(crate) fn migrate(
    data_dir: &Path,
    to: &str,
    key_file: Option<&Path>,
    new_passphrase_file: Option<&Path>,
    kms: &KmsArgs,
    pkcs11: &Pkcs11Args,
    unlock: &phivault_keys::Unlock,
) -> Result<i32> {
    if to != "aws-kms" && kms_given(kms) {
        bail!("--kms-key-id, --kms-region, --kms-endpoint and --kms-ca-file are for --to aws-kms");
    }
    if to != "pkcs11" && pkcs11_given(pkcs11) {
        bail!("--pkcs11-module, --pkcs11-token and --pkcs11-key are for --to pkcs11");
    }
    let d = datadir::DataDir::new(data_dir);
    datadir::check_dir_private(data_dir)?;
    let _lock = datadir::lock_for_serving(&d)?;
    let old = phivault_keys::ProviderConfig::read(data_dir).ok();
    let master = match &old {
        Some(_) => datadir::load_master(&d)?,
        None => phivault_crypto::MasterKey::load_key_file(&d.legacy_master_key()).map_err(|e| {
            anyhow::anyhow!(
                "cannot use the master key file {}: {e}",
                d.legacy_master_key().display()
            )
        })?,
    };
    // the key must be this database's before anything is rewritten
    datadir::check_key(&d, &phivault_crypto::KeyHierarchy::new(&master))?;
    let spec = match to {
        "file" => phivault_keys::Create::File {
            key_file: key_file.map(Path::to_path_buf),
        },
        "passphrase" => phivault_keys::Create::Passphrase {
            source: match new_passphrase_file {
                Some(f) => phivault_keys::PassphraseSource::File(f.to_path_buf()),
                None => phivault_keys::PassphraseSource::Default,
            },
        },
        "pkcs11" => pkcs11_spec(pkcs11, unlock)?,
        "aws-kms" => kms_spec(kms)?,
        other => bail!("unknown --to {other:?}: file, passphrase, pkcs11 or aws-kms"),
    };
    let cfg = phivault_keys::migrate(data_dir, &master, old.as_ref(), &spec)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if old.is_none() {
        phivault_keys::file::shred(&d.legacy_master_key()).map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!(
            "moved the master key out of the data directory; {} was overwritten and removed",
            d.legacy_master_key().display()
        );
    }
    eprintln!(
        "key provider is now {}: {}",
        cfg.provider.name(),
        describe(&cfg)
    );
    Ok(0)
}
