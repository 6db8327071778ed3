//! The `passphrase` provider: the master key wrapped by AES-256-GCM under a key derived
//! from a passphrase with Argon2id ([`M_KIB`] KiB, [`T_COST`] passes, [`P_COST`] lane),
//! bound to the data directory's id. The wrapped key (`DIR/keys/master.passphrase`) may
//! sit with the data: without the passphrase it opens nothing.
//!
//! The passphrase comes from a file (a systemd credential: `--passphrase-file`, or
//! `$CREDENTIALS_DIRECTORY/phivault-passphrase`), an inherited file descriptor
//! (`--passphrase-fd N`), or the terminal (asked without echo) — never from argv or the
//! environment, which other users and crash reports can see.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use phivault_crypto::MasterKey;
use ring::aead;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{KeyError, PassphraseSource, Provider};

/// Argon2id memory (KiB): 64 MiB.
pub const M_KIB: u32 = 64 * 1024;
/// Argon2id passes.
pub const T_COST: u32 = 3;
/// Argon2id lanes.
pub const P_COST: u32 = 1;
/// Shortest passphrase accepted at creation.
const MIN_LEN: usize = 12;
/// Longest passphrase read.
const MAX_LEN: usize = 4096;
const AAD_PREFIX: &str = "phivault-master-passphrase-v1:";

/// The wrapped key, relative to the data directory.
pub fn wrapped_path(root: &Path) -> PathBuf {
    root.join("keys/master.passphrase")
}

#[derive(Serialize, Deserialize)]
struct Wrapped {
    v: u32,
    kdf: String,
    m_kib: u32,
    t: u32,
    p: u32,
    salt: String,
    nonce: String,
    sealed: String,
}

fn kek(
    passphrase: &[u8],
    salt: &[u8],
    m: u32,
    t: u32,
    p: u32,
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let params = argon2::Params::new(m, t, p, Some(32))
        .map_err(|_| KeyError::refused("unusable Argon2id parameters"))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(passphrase, salt, &mut out[..])
        .map_err(|_| KeyError::refused("the passphrase could not be stretched"))?;
    Ok(out)
}

fn aead_key(k: &[u8; 32]) -> Result<aead::LessSafeKey, KeyError> {
    aead::UnboundKey::new(&aead::AES_256_GCM, k)
        .map(aead::LessSafeKey::new)
        .map_err(|_| KeyError::refused("AES-256-GCM key refused"))
}

/// Wrap `master` under `passphrase` for the data directory `id`.
fn wrap(master: &MasterKey, id: &str, passphrase: &[u8]) -> Result<Vec<u8>, KeyError> {
    let salt: [u8; 16] = phivault_crypto::random_bytes()?;
    let nonce: [u8; 12] = phivault_crypto::random_bytes()?;
    let k = kek(passphrase, &salt, M_KIB, T_COST, P_COST)?;
    let mut buf = Zeroizing::new(master.expose_to_provider().to_vec());
    aead_key(&k)?
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(format!("{AAD_PREFIX}{id}").as_bytes()),
            &mut *buf,
        )
        .map_err(|_| KeyError::refused("sealing the master key failed"))?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let w = Wrapped {
        v: 1,
        kdf: "argon2id".into(),
        m_kib: M_KIB,
        t: T_COST,
        p: P_COST,
        salt: b64(&salt),
        nonce: b64(&nonce),
        sealed: b64(&buf),
    };
    serde_json::to_vec_pretty(&w).map_err(|_| KeyError::refused("cannot encode the wrapped key"))
}

/// Open a wrapped key with `passphrase`; a wrong passphrase and a damaged file read the same.
fn unwrap(bytes: &[u8], id: &str, passphrase: &[u8]) -> Result<MasterKey, KeyError> {
    let bad = || {
        KeyError::refused(
            "the passphrase does not open this data directory's master key (wrong passphrase, or a damaged keys/master.passphrase)",
        )
    };
    let w: Wrapped = serde_json::from_slice(bytes).map_err(|_| bad())?;
    // bounded parameters: a planted file must not make the server allocate without limit
    if w.v != 1
        || w.kdf != "argon2id"
        || !(8 * 1024..=1024 * 1024).contains(&w.m_kib)
        || !(1..=16).contains(&w.t)
        || !(1..=8).contains(&w.p)
    {
        return Err(bad());
    }
    let d = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| bad())
    };
    let (salt, nonce, sealed) = (d(&w.salt)?, d(&w.nonce)?, d(&w.sealed)?);
    let nonce: [u8; 12] = nonce.try_into().map_err(|_| bad())?;
    let k = kek(passphrase, &salt, w.m_kib, w.t, w.p)?;
    let mut buf = Zeroizing::new(sealed);
    let plain = aead_key(&k)?
        .open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(format!("{AAD_PREFIX}{id}").as_bytes()),
            &mut buf,
        )
        .map_err(|_| bad())?;
    let bytes: &[u8; 32] = (&*plain).try_into().map_err(|_| bad())?;
    Ok(MasterKey::from_bytes(bytes))
}

/// Read the passphrase from `source` (the terminal asks `prompt`).
pub fn read(source: &PassphraseSource, prompt: &str) -> Result<Zeroizing<String>, KeyError> {
    let from_file = |path: &Path| -> Result<Zeroizing<String>, KeyError> {
        let bytes = phivault_crypto::read_private_file(path, MAX_LEN).map_err(|e| {
            KeyError::refused(format!(
                "cannot use the passphrase file {}: {e}",
                path.display()
            ))
        })?;
        first_line(bytes.expose())
    };
    match source {
        PassphraseSource::File(p) => from_file(p),
        PassphraseSource::Fd(n) => {
            let path = PathBuf::from(format!("/proc/self/fd/{n}"));
            let mut f = std::fs::File::open(&path).map_err(|e| KeyError::io(&path, e))?;
            let mut buf = Zeroizing::new(Vec::new());
            f.by_ref()
                .take(MAX_LEN as u64 + 1)
                .read_to_end(&mut buf)
                .map_err(|e| KeyError::io(&path, e))?;
            first_line(&buf)
        }
        PassphraseSource::Default => {
            if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
                let p = PathBuf::from(dir).join("phivault-passphrase");
                if p.exists() {
                    return from_file(&p);
                }
            }
            let typed = rpassword::prompt_password(prompt).map_err(|_| {
                KeyError::refused(
                    "this data directory's master key needs its passphrase: run on a terminal, or give --passphrase-file FILE or --passphrase-fd N (never argv or the environment)",
                )
            })?;
            Ok(Zeroizing::new(typed))
        }
    }
}

fn first_line(bytes: &[u8]) -> Result<Zeroizing<String>, KeyError> {
    if bytes.len() > MAX_LEN {
        return Err(KeyError::refused(
            "the passphrase is longer than 4096 bytes",
        ));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| KeyError::refused("the passphrase is not UTF-8"))?;
    let line = text.split('\n').next().unwrap_or("").trim_end_matches('\r');
    Ok(Zeroizing::new(line.to_owned()))
}

/// A new wrapped key for `master` under a passphrase from `source` (asked twice on a
/// terminal).
pub fn create(
    root: &Path,
    id: &str,
    source: &PassphraseSource,
    master: &MasterKey,
) -> Result<Provider, KeyError> {
    let pass = read(source, "New passphrase for the master key: ")?;
    if matches!(source, PassphraseSource::Default)
        && std::env::var_os("CREDENTIALS_DIRECTORY").is_none()
    {
        let again = read(source, "The same passphrase again: ")?;
        if *again != *pass {
            return Err(KeyError::refused(
                "the two passphrases differ; nothing was written",
            ));
        }
    }
    if pass.chars().count() < MIN_LEN {
        return Err(KeyError::refused(format!(
            "a passphrase needs at least {MIN_LEN} characters"
        )));
    }
    let blob = wrap(master, id, pass.as_bytes())?;
    let path = wrapped_path(root);
    let _ = std::fs::remove_file(&path);
    phivault_crypto::write_private_file(&path, &blob)
        .map_err(|e| KeyError::refused(format!("cannot write {}: {e}", path.display())))?;
    Ok(Provider::Passphrase {})
}

/// The master key of `root`, unwrapped with the passphrase from `source`.
pub fn load(root: &Path, id: &str, source: &PassphraseSource) -> Result<MasterKey, KeyError> {
    let path = wrapped_path(root);
    let blob = phivault_crypto::read_private_file(&path, 64 * 1024)
        .map_err(|e| KeyError::refused(format!("cannot use {}: {e}", path.display())))?;
    let pass = read(source, "Passphrase of the master key: ")?;
    unwrap(blob.expose(), id, pass.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_key_opens_with_its_passphrase_and_directory_only() {
        let m = MasterKey::generate().expect("key");
        let blob = wrap(&m, "dir-a", b"correct horse battery").expect("wrap");
        let back = unwrap(&blob, "dir-a", b"correct horse battery").expect("unwrap");
        assert_eq!(back.expose_to_provider(), m.expose_to_provider());
        assert!(unwrap(&blob, "dir-a", b"correct horse batterz").is_err());
        assert!(
            unwrap(&blob, "dir-b", b"correct horse battery").is_err(),
            "bound to the directory"
        );
        let text = String::from_utf8(blob.clone()).expect("json");
        assert!(text.contains("\"m_kib\": 65536"), "{text}");
        // a planted file asking for unbounded memory is refused before any work
        let mut v: serde_json::Value = serde_json::from_slice(&blob).expect("json");
        v["m_kib"] = 4_000_000.into();
        assert!(unwrap(v.to_string().as_bytes(), "dir-a", b"correct horse battery").is_err());
    }

    #[test]
    fn a_passphrase_file_must_be_private_and_its_first_line_counts() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("pass");
        phivault_crypto::write_private_file(&p, b"line one is it\nignored\n").expect("write");
        let got = read(&PassphraseSource::File(p.clone()), "").expect("read");
        assert_eq!(got.as_str(), "line one is it");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(read(&PassphraseSource::File(p), "").is_err());
    }
}
