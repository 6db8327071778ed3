#![forbid(unsafe_code)]
//! Where a data directory's master key comes from: its **key provider**, chosen at `init`
//! and recorded, non-secret, in `DIR/keys/provider.json`. No provider keeps the key next
//! to the data it opens: what leaks most often — a copy of the whole directory, a disk
//! image, a snapshot — must not carry its own key.
//!
//! - [`file`]: a key file **outside** the data directory (mode 0600; refused when others
//!   may read it or when it lies inside the data directory tree). The default, in the
//!   user's configuration directory, named after the data directory's id.
//! - [`passphrase`]: the master key wrapped (AES-256-GCM) under Argon2id(passphrase); the
//!   wrapped key lives in the data directory, the passphrase comes from a terminal, a
//!   credential file or a file descriptor — never from argv or the environment.
//! - [`pkcs11`]: the master key encrypted by a non-extractable AES-256 key inside an HSM
//!   (PKCS#11); the encrypted key lives in the data directory, the user PIN comes from a
//!   file or the terminal.
//! - [`awskms`]: envelope encryption: the master key comes from AWS KMS `GenerateDataKey`
//!   and exists at rest only wrapped by the KMS key (`keys/master.kms`), opened by
//!   `Decrypt` at start; requests signed by [`sigv4`] (no AWS SDK).
//! - [`shamir`]: the master key split into N Shamir shares, any K of which rebuild it;
//!   nothing of the key is stored (a server starts sealed and is unsealed with the shares).
//!
//! A provider only produces the master key; that it is *this* database's key is checked
//! by the caller against the database's key check value.

pub mod awskms;
pub mod config;
pub mod file;
pub mod passphrase;
pub mod pkcs11;
pub mod shamir;
pub mod sigv4;

use std::path::{Path, PathBuf};

pub use config::{Provider, ProviderConfig};
use phivault_crypto::MasterKey;

/// Why a key could not be created or loaded. Messages name paths and checks, never key
/// material or passphrases.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A refusal with its reason (an insecure or misplaced key, a wrong passphrase, …).
    #[error("{0}")]
    Refused(String),
    /// An I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Crypto(#[from] phivault_crypto::CryptoError),
}

impl KeyError {
    pub(crate) fn refused(why: impl Into<String>) -> Self {
        KeyError::Refused(why.into())
    }
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        KeyError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Where a passphrase comes from when one is needed (the `passphrase` provider).
#[derive(Debug, Clone, Default)]
pub enum PassphraseSource {
    /// A file holding it (its first line), private to its owner — a systemd credential.
    File(PathBuf),
    /// An open file descriptor (read through `/proc/self/fd/N`).
    Fd(u32),
    /// `$CREDENTIALS_DIRECTORY/phivault-passphrase` if present, else the terminal.
    #[default]
    Default,
}

/// What a command may use to unlock the master key.
#[derive(Debug, Clone, Default)]
pub struct Unlock {
    pub passphrase: PassphraseSource,
    /// The user PIN of a `pkcs11` token: this file (0600), else
    /// `$CREDENTIALS_DIRECTORY/phivault-pkcs11-pin`, else the terminal.
    pub pkcs11_pin: Option<PathBuf>,
    /// The shares of a `shamir` provider: this file (0600, one a line), else the terminal.
    pub share_file: Option<PathBuf>,
}

/// How to create a new master key's home at `init`.
#[derive(Debug, Clone)]
pub enum Create {
    /// A key file (default: [`file::default_key_file`]).
    File { key_file: Option<PathBuf> },
    /// A passphrase-wrapped key; the passphrase is asked twice on a terminal.
    Passphrase { source: PassphraseSource },
    /// The key encrypted by a non-extractable AES key in an HSM (generated if the token
    /// has no key of that label); the user PIN from `pin` (see [`Unlock::pkcs11_pin`]).
    Pkcs11 {
        hsm: pkcs11::Hsm,
        pin: Option<PathBuf>,
    },
    /// The key wrapped by an AWS KMS key (envelope encryption).
    AwsKms(awskms::KmsSpec),
    /// The key split into `shares` Shamir shares, any `threshold` of which rebuild it
    /// (printed once: [`shamir::take_new_shares`]).
    Shamir { shares: u8, threshold: u8 },
}

/// A new data directory's id: 16 random bytes, hex.
pub fn new_data_dir_id() -> Result<String, KeyError> {
    let b: [u8; 16] = phivault_crypto::random_bytes()?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Create the master key's home for the data directory `root` (which exists and is
/// empty of keys) and record the provider; returns the new master key.
pub fn create(root: &Path, spec: &Create) -> Result<(MasterKey, ProviderConfig), KeyError> {
    let id = new_data_dir_id()?;
    if let Create::AwsKms(kms) = spec {
        // KMS makes the key (GenerateDataKey): it never exists unwrapped at rest
        let (master, provider) = awskms::create(root, &id, kms)?;
        let cfg = ProviderConfig::new(id, provider);
        cfg.write_new(root)?;
        return Ok((master, cfg));
    }
    let master = MasterKey::generate()?;
    let provider = keep(root, &id, spec, &master)?;
    let cfg = ProviderConfig::new(id, provider);
    cfg.write_new(root)?;
    Ok((master, cfg))
}

/// Put `master` in the care of the provider `spec` asks for, for the data directory `id`.
fn keep(root: &Path, id: &str, spec: &Create, master: &MasterKey) -> Result<Provider, KeyError> {
    Ok(match spec {
        Create::File { key_file } => {
            let path = match key_file {
                Some(p) => p.clone(),
                None => file::default_key_file(id)?,
            };
            file::create(root, &path, master)?
        }
        Create::Passphrase { source } => passphrase::create(root, id, source, master)?,
        Create::Pkcs11 { hsm, pin } => pkcs11::create(root, id, hsm, pin.as_deref(), master)?,
        Create::AwsKms(kms) => awskms::create_from(root, id, kms, master)?,
        Create::Shamir { shares, threshold } => shamir::create(id, master, *shares, *threshold)?,
    })
}

/// The file a provider keeps its key (or its wrapped key) in, if any.
fn kept_in(root: &Path, provider: &Provider) -> Option<PathBuf> {
    match provider {
        Provider::File { key_file } => Some(key_file.clone()),
        Provider::Passphrase { .. } => Some(passphrase::wrapped_path(root)),
        Provider::Pkcs11 { .. } => Some(pkcs11::wrapped_path(root)),
        Provider::AwsKms { .. } => Some(awskms::wrapped_path(root)),
        Provider::Shamir { .. } => None,
    }
}

/// Load the master key of the data directory `root` through its recorded provider.
pub fn load(root: &Path, unlock: &Unlock) -> Result<(MasterKey, ProviderConfig), KeyError> {
    let cfg = ProviderConfig::read(root)?;
    let master = match &cfg.provider {
        Provider::File { key_file } => file::load(root, key_file)?,
        Provider::Passphrase { .. } => {
            passphrase::load(root, &cfg.data_dir_id, &unlock.passphrase)?
        }
        Provider::Pkcs11 {
            module,
            token_label,
            key_label,
        } => pkcs11::load(
            root,
            &cfg.data_dir_id,
            &pkcs11::Hsm {
                module: module.clone(),
                token: token_label.clone(),
                key: key_label.clone(),
            },
            unlock.pkcs11_pin.as_deref(),
        )?,
        p @ Provider::AwsKms { .. } => awskms::load(root, &cfg.data_dir_id, p)?,
        Provider::Shamir { shares, threshold } => shamir::load(
            &cfg.data_dir_id,
            *shares,
            *threshold,
            unlock.share_file.as_ref(),
        )?,
    };
    Ok((master, cfg))
}

/// Record `master` under a new provider for `root` (the master key itself is unchanged,
/// so no record is touched), then remove what the old provider kept (a key file inside
/// or outside the directory is overwritten and deleted). Returns the new configuration.
pub fn migrate(
    root: &Path,
    master: &MasterKey,
    old: Option<&ProviderConfig>,
    to: &Create,
) -> Result<ProviderConfig, KeyError> {
    let id = match old {
        Some(c) => c.data_dir_id.clone(),
        None => new_data_dir_id()?,
    };
    let provider = keep(root, &id, to, master)?;
    let cfg = ProviderConfig::new(id, provider);
    cfg.replace(root)?;
    // what the old provider kept goes, unless the new one keeps its key in the same place
    if let Some(old_file) = old.and_then(|c| kept_in(root, &c.provider))
        && kept_in(root, &cfg.provider).as_ref() != Some(&old_file)
    {
        file::shred(&old_file)?;
    }
    Ok(cfg)
}

/// Whether `inner` is `outer` or lies below it, comparing canonical paths (symlinks
/// resolved; a path that does not exist yet is judged by its existing parent).
pub fn is_inside(inner: &Path, outer: &Path) -> bool {
    let canon = |p: &Path| -> Option<PathBuf> {
        if let Ok(c) = p.canonicalize() {
            return Some(c);
        }
        let parent = p.parent().filter(|q| !q.as_os_str().is_empty())?;
        let parent = parent.canonicalize().ok()?;
        Some(parent.join(p.file_name()?))
    };
    match (canon(inner), canon(outer)) {
        (Some(i), Some(o)) => i.starts_with(o),
        // unresolvable: judge the absolute spellings, and fail closed when equal-prefixed
        _ => {
            let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            abs(inner).starts_with(abs(outer))
        }
    }
}
