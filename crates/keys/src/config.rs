//! `DIR/keys/provider.json`: which provider holds the master key, and where — nothing
//! secret. Written once at `init` (`O_EXCL`), replaced atomically by `keys migrate`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::KeyError;

/// The file, relative to the data directory.
pub const PROVIDER_JSON: &str = "keys/provider.json";
/// Largest provider file read.
const MAX_LEN: u64 = 64 * 1024;

/// One data directory's key provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "kebab-case")]
pub enum Provider {
    /// A key file outside the data directory (absolute path).
    File { key_file: PathBuf },
    /// The master key wrapped under Argon2id(passphrase), in `keys/master.passphrase`.
    Passphrase {},
    /// The master key encrypted by a non-extractable AES key in an HSM, in
    /// `keys/master.pkcs11`: the PKCS#11 module (absolute path), token and key labels.
    Pkcs11 {
        module: PathBuf,
        token_label: String,
        key_label: String,
    },
    /// The master key wrapped by an AWS KMS key (envelope encryption), in
    /// `keys/master.kms`: the key id or ARN, the region, the endpoint and an optional CA
    /// file (absolute) to trust for it. Nothing secret.
    AwsKms {
        key_id: String,
        region: String,
        endpoint: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<PathBuf>,
    },
    /// The master key split into `shares` Shamir shares, any `threshold` of which rebuild
    /// it; nothing of the key is stored.
    Shamir { shares: u8, threshold: u8 },
}

impl Provider {
    /// The provider's name as `init --key-provider` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::File { .. } => "file",
            Provider::Passphrase { .. } => "passphrase",
            Provider::Pkcs11 { .. } => "pkcs11",
            Provider::AwsKms { .. } => "aws-kms",
            Provider::Shamir { .. } => "shamir",
        }
    }
}

/// The recorded configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderConfig {
    /// Format version (1).
    pub version: u32,
    /// The data directory's id (names its default key file; binds wrapped keys to it).
    pub data_dir_id: String,
    #[serde(flatten)]
    pub provider: Provider,
    /// When the provider was recorded (seconds since the epoch).
    pub since: u64,
}

impl ProviderConfig {
    pub fn new(data_dir_id: String, provider: Provider) -> Self {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        ProviderConfig {
            version: 1,
            data_dir_id,
            provider,
            since,
        }
    }

    pub fn path(root: &Path) -> PathBuf {
        root.join(PROVIDER_JSON)
    }

    /// Read and check the recorded configuration.
    pub fn read(root: &Path) -> Result<Self, KeyError> {
        use std::io::Read as _;
        let path = Self::path(root);
        let f = std::fs::File::open(&path).map_err(|e| KeyError::io(&path, e))?;
        let mut text = String::new();
        f.take(MAX_LEN)
            .read_to_string(&mut text)
            .map_err(|e| KeyError::io(&path, e))?;
        let cfg: ProviderConfig = serde_json::from_str(&text).map_err(|_| {
            KeyError::refused(format!(
                "{} is not a key provider record this phivault understands",
                path.display()
            ))
        })?;
        if cfg.version != 1
            || cfg.data_dir_id.len() != 32
            || !cfg.data_dir_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(KeyError::refused(format!(
                "{} is not a valid key provider record",
                path.display()
            )));
        }
        Ok(cfg)
    }

    fn json(&self) -> Result<Vec<u8>, KeyError> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|_| KeyError::refused("cannot write the key provider record"))?;
        v.push(b'\n');
        Ok(v)
    }

    /// Write the record of a new data directory (never over an existing one).
    pub fn write_new(&self, root: &Path) -> Result<(), KeyError> {
        let path = Self::path(root);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| KeyError::io(&path, e))?;
        f.write_all(&self.json()?)
            .and_then(|()| f.sync_all())
            .map_err(|e| KeyError::io(&path, e))?;
        sync_dir(&path)
    }

    /// Replace the record atomically (temporary file, fsync, rename, directory fsync).
    pub fn replace(&self, root: &Path) -> Result<(), KeyError> {
        let path = Self::path(root);
        let tmp = path.with_extension("json.new");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| KeyError::io(&tmp, e))?;
        f.write_all(&self.json()?)
            .and_then(|()| f.sync_all())
            .map_err(|e| KeyError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| KeyError::io(&path, e))?;
        sync_dir(&path)
    }
}

/// Make a directory entry durable.
pub(crate) fn sync_dir(path: &Path) -> Result<(), KeyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| KeyError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_refuses_what_it_does_not_know() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("keys")).expect("mkdir");
        let cfg = ProviderConfig::new(
            "00112233445566778899aabbccddeeff".into(),
            Provider::File {
                key_file: "/etc/phivault/x.key".into(),
            },
        );
        cfg.write_new(dir.path()).expect("write");
        assert!(cfg.write_new(dir.path()).is_err(), "never overwritten");
        assert_eq!(ProviderConfig::read(dir.path()).expect("read"), cfg);
        let moved = ProviderConfig::new(cfg.data_dir_id.clone(), Provider::Passphrase {});
        moved.replace(dir.path()).expect("replace");
        assert_eq!(ProviderConfig::read(dir.path()).expect("read"), moved);
        for bad in [
            r#"{"version":1,"data_dir_id":"00112233445566778899aabbccddeeff","provider":"magic","since":0}"#,
            r#"{"version":2,"data_dir_id":"00112233445566778899aabbccddeeff","provider":"passphrase","since":0}"#,
            r#"{"version":1,"data_dir_id":"../../x","provider":"passphrase","since":0}"#,
            "not json",
        ] {
            std::fs::write(ProviderConfig::path(dir.path()), bad).expect("write");
            assert!(ProviderConfig::read(dir.path()).is_err(), "{bad}");
        }
    }
}
