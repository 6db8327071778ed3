//! The `pkcs11` provider: the master key encrypted (CKM_AES_GCM, 96-bit IV, 128-bit tag,
//! the data directory's id as additional authenticated data) by a **non-extractable**
//! AES-256 key that never leaves an HSM, reached through its PKCS#11 module (`cryptoki`).
//! The encrypted master key (`DIR/keys/master.pkcs11`) may sit with the data: without the
//! HSM — the token, its key and the user PIN — it opens nothing.
//!
//! The token key is made at `init` (or an existing one of the label is used) with
//! `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, `CKA_ENCRYPT`, `CKA_DECRYPT` true and
//! `CKA_EXTRACTABLE`, `CKA_WRAP`, `CKA_UNWRAP` false, and checked for exactly that every
//! time it is used: a weaker key under the same label is refused. The HSM is used once, at
//! start (`C_Initialize` … `C_Finalize`): the unwrapped master key is then held in memory
//! like with the other providers, so an HSM outage while serving changes nothing.
//!
//! The user PIN comes from a file (`--pkcs11-pin-file`, mode 0600, a systemd credential;
//! default `$CREDENTIALS_DIRECTORY/phivault-pkcs11-pin`) or the terminal — never argv or
//! the environment. Nothing of the module path, token label or key label is secret; they
//! are recorded in `keys/provider.json`.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use phivault_crypto::MasterKey;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{KeyError, Provider};

/// The systemd credential holding the PIN when no `--pkcs11-pin-file` is given.
pub const PIN_CREDENTIAL: &str = "phivault-pkcs11-pin";
/// Longest PIN read.
const MAX_PIN: usize = 4096;
const AAD_PREFIX: &str = "phivault-master-pkcs11-v1:";
const MECHANISM: &str = "CKM_AES_GCM";

/// Where the HSM key is: the module, the token's label and the key's label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hsm {
    pub module: PathBuf,
    pub token: String,
    pub key: String,
}

/// The encrypted master key, relative to the data directory.
pub fn wrapped_path(root: &Path) -> PathBuf {
    root.join("keys/master.pkcs11")
}

#[derive(Serialize, Deserialize)]
struct Wrapped {
    v: u32,
    mechanism: String,
    iv: String,
    sealed: String,
}

/// The user PIN from `file`, else `$CREDENTIALS_DIRECTORY/phivault-pkcs11-pin`, else the
/// terminal.
pub fn read_pin(file: Option<&Path>, token: &str) -> Result<Zeroizing<String>, KeyError> {
    let from_file = |path: &Path| -> Result<Zeroizing<String>, KeyError> {
        let bytes = phivault_crypto::read_private_file(path, MAX_PIN).map_err(|e| {
            KeyError::refused(format!(
                "cannot use the PKCS#11 PIN file {}: {e}",
                path.display()
            ))
        })?;
        let text = std::str::from_utf8(bytes.expose())
            .map_err(|_| KeyError::refused("the PKCS#11 PIN is not UTF-8"))?;
        let line = text.split('\n').next().unwrap_or("").trim_end_matches('\r');
        Ok(Zeroizing::new(line.to_owned()))
    };
    if let Some(p) = file {
        return from_file(p);
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let p = PathBuf::from(dir).join(PIN_CREDENTIAL);
        if p.exists() {
            return from_file(&p);
        }
    }
    let typed = rpassword::prompt_password(format!("User PIN of PKCS#11 token {token:?}: "))
        .map_err(|_| {
            KeyError::refused(format!(
                "the master key needs the user PIN of PKCS#11 token {token:?}: run on a terminal, or give --pkcs11-pin-file FILE (mode 0600; never argv or the environment)"
            ))
        })?;
    Ok(Zeroizing::new(typed))
}

/// A logged-in session with the token of `hsm` (and the library, finalized on drop).
struct Connected {
    session: Option<Session>,
    ctx: Option<Pkcs11>,
}

impl Drop for Connected {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.logout();
            drop(s);
        }
        if let Some(c) = self.ctx.take() {
            let _ = c.finalize();
        }
    }
}

impl Connected {
    fn session(&self) -> &Session {
        // set in `connect`, taken only in `drop`
        self.session.as_ref().unwrap_or_else(|| unreachable!())
    }
}

/// A PKCS#11 failure, short: the function and its return value's name.
fn ck(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{f} returned {rv:?}"),
        other => other.to_string(),
    }
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Load the module, find the token by label, log in with the PIN from `pin`.
fn connect(hsm: &Hsm, pin: Option<&Path>, rw: bool) -> Result<Connected, KeyError> {
    let module = hsm.module.display();
    if !hsm.module.is_file() {
        return Err(KeyError::refused(format!(
            "the PKCS#11 module {module} does not exist: install the HSM's PKCS#11 library (for testing, Debian's softhsm2: /usr/lib/softhsm/libsofthsm2.so), or give its path with --pkcs11-module"
        )));
    }
    let ctx = Pkcs11::new(&hsm.module)
        .map_err(|e| KeyError::refused(format!("cannot load the PKCS#11 module {module}: {e}")))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| {
            KeyError::refused(format!(
                "the PKCS#11 module {module} did not initialise ({}); is the HSM reachable and its configuration readable (SoftHSM2: SOFTHSM2_CONF)?",
                ck(&e)
            ))
        })?;
    let mut conn = Connected {
        session: None,
        ctx: Some(ctx),
    };
    let ctx = conn.ctx.as_ref().unwrap_or_else(|| unreachable!());
    let slots = ctx.get_slots_with_token().map_err(|e| {
        KeyError::refused(format!(
            "the PKCS#11 module {module} cannot list its tokens: {}",
            ck(&e)
        ))
    })?;
    let mut seen = Vec::new();
    let mut found = None;
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        let label = info.label().trim_end().to_owned();
        if label == hsm.token && info.token_initialized() {
            found = Some(slot);
            break;
        }
        seen.push(format!("{label:?}"));
    }
    let Some(slot) = found else {
        let present = if seen.is_empty() {
            "no initialised token is present".to_owned()
        } else {
            format!("tokens present: {}", seen.join(", "))
        };
        return Err(KeyError::refused(format!(
            "no PKCS#11 token labelled {:?} in the module {module} ({present})",
            hsm.token
        )));
    };
    let session = if rw {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .map_err(|e| {
        KeyError::refused(format!(
            "cannot open a session with PKCS#11 token {:?}: {}",
            hsm.token,
            ck(&e)
        ))
    })?;
    let pin = read_pin(pin, &hsm.token)?;
    let auth = AuthPin::from(pin.as_str());
    match session.login(UserType::User, Some(&auth)) {
        Ok(()) => {}
        Err(e) => {
            let why = match rv(&e) {
                Some(RvError::PinIncorrect | RvError::PinLenRange | RvError::PinInvalid) => {
                    format!("the user PIN of PKCS#11 token {:?} is wrong", hsm.token)
                }
                Some(RvError::PinLocked) => format!(
                    "the user PIN of PKCS#11 token {:?} is locked (too many wrong PINs)",
                    hsm.token
                ),
                Some(RvError::UserPinNotInitialized) => format!(
                    "PKCS#11 token {:?} has no user PIN yet (initialise it first)",
                    hsm.token
                ),
                _ => format!("cannot log in to PKCS#11 token {:?}: {}", hsm.token, ck(&e)),
            };
            return Err(KeyError::refused(why));
        }
    }
    conn.session = Some(session);
    Ok(conn)
}

/// The AES secret keys labelled `label` in the token.
fn find_keys(s: &Session, label: &str) -> Result<Vec<ObjectHandle>, KeyError> {
    s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
    .map_err(|e| {
        KeyError::refused(format!(
            "cannot search the PKCS#11 token for keys: {}",
            ck(&e)
        ))
    })
}

/// The one key labelled `hsm.key`, checked to be a sensitive, non-extractable AES-256
/// token key usable for encryption and decryption.
fn the_key(s: &Session, hsm: &Hsm) -> Result<Option<ObjectHandle>, KeyError> {
    let keys = find_keys(s, &hsm.key)?;
    let key = match keys.as_slice() {
        [] => return Ok(None),
        [k] => *k,
        _ => {
            return Err(KeyError::refused(format!(
                "{} AES keys are labelled {:?} in PKCS#11 token {:?}: refusing to guess which one holds the master key",
                keys.len(),
                hsm.key,
                hsm.token
            )));
        }
    };
    let attrs = s
        .get_attributes(
            key,
            &[
                AttributeType::Token,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::ValueLen,
            ],
        )
        .map_err(|e| KeyError::refused(format!("cannot read the key's attributes: {}", ck(&e))))?;
    let mut ok = [false; 6];
    for a in &attrs {
        match a {
            Attribute::Token(true) => ok[0] = true,
            Attribute::Sensitive(true) => ok[1] = true,
            Attribute::Extractable(false) => ok[2] = true,
            Attribute::Encrypt(true) => ok[3] = true,
            Attribute::Decrypt(true) => ok[4] = true,
            Attribute::ValueLen(n) if usize::from(*n) == 32 => ok[5] = true,
            _ => {}
        }
    }
    let names = [
        "CKA_TOKEN=true",
        "CKA_SENSITIVE=true",
        "CKA_EXTRACTABLE=false",
        "CKA_ENCRYPT=true",
        "CKA_DECRYPT=true",
        "a 256-bit value",
    ];
    let missing: Vec<&str> = names
        .iter()
        .zip(ok)
        .filter(|(_, o)| !o)
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(KeyError::refused(format!(
            "the key {:?} in PKCS#11 token {:?} is not one phivault keeps a master key under: it lacks {}",
            hsm.key,
            hsm.token,
            missing.join(", ")
        )));
    }
    Ok(Some(key))
}

/// Generate the token key: AES-256, never extractable, for encryption and decryption only.
fn generate(s: &Session, hsm: &Hsm) -> Result<ObjectHandle, KeyError> {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Label(hsm.key.as_bytes().to_vec()),
        ],
    )
    .map_err(|e| {
        KeyError::refused(format!(
            "cannot generate the AES-256 key {:?} in PKCS#11 token {:?}: {}",
            hsm.key,
            hsm.token,
            ck(&e)
        ))
    })
}

fn aad(id: &str) -> Vec<u8> {
    format!("{AAD_PREFIX}{id}").into_bytes()
}

fn encrypt(
    s: &Session,
    key: ObjectHandle,
    id: &str,
    master: &MasterKey,
) -> Result<Vec<u8>, KeyError> {
    let mut iv: [u8; 12] = phivault_crypto::random_bytes()?;
    let aad = aad(id);
    let sealed = {
        let params = GcmParams::new(&mut iv, &aad, 128.into())
            .map_err(|e| KeyError::refused(format!("AES-GCM parameters: {e}")))?;
        s.encrypt(&Mechanism::AesGcm(params), key, master.expose_to_provider())
            .map_err(|e| {
                KeyError::refused(format!(
                    "the PKCS#11 token refused to encrypt with {MECHANISM}: {}",
                    ck(&e)
                ))
            })?
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let w = Wrapped {
        v: 1,
        mechanism: MECHANISM.into(),
        iv: b64(&iv),
        sealed: b64(&sealed),
    };
    serde_json::to_vec_pretty(&w).map_err(|_| KeyError::refused("cannot encode the wrapped key"))
}

fn decrypt(
    s: &Session,
    key: ObjectHandle,
    hsm: &Hsm,
    id: &str,
    blob: &[u8],
) -> Result<MasterKey, KeyError> {
    let bad = || {
        KeyError::refused(format!(
            "the key {:?} in PKCS#11 token {:?} does not open this data directory's master key (another key under that label, or a damaged keys/master.pkcs11)",
            hsm.key, hsm.token
        ))
    };
    let w = parse(blob).ok_or_else(bad)?;
    let (mut iv, sealed) = w;
    let aad = aad(id);
    let params = GcmParams::new(&mut iv, &aad, 128.into()).map_err(|_| bad())?;
    let plain = Zeroizing::new(
        s.decrypt(&Mechanism::AesGcm(params), key, &sealed)
            .map_err(|_| bad())?,
    );
    let bytes: &[u8; 32] = plain.as_slice().try_into().map_err(|_| bad())?;
    Ok(MasterKey::from_bytes(bytes))
}

/// The IV and sealed bytes of a `master.pkcs11` file, if it is one.
fn parse(blob: &[u8]) -> Option<([u8; 12], Vec<u8>)> {
    let w: Wrapped = serde_json::from_slice(blob).ok()?;
    if w.v != 1 || w.mechanism != MECHANISM {
        return None;
    }
    let d = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).ok();
    let iv: [u8; 12] = d(&w.iv)?.try_into().ok()?;
    let sealed = d(&w.sealed)?;
    (sealed.len() == 32 + 16).then_some((iv, sealed))
}

/// Encrypt `master` under the token key `hsm.key` (generated if the token has none of that
/// label), check that it decrypts back, and write `keys/master.pkcs11`.
pub fn create(
    root: &Path,
    id: &str,
    hsm: &Hsm,
    pin: Option<&Path>,
    master: &MasterKey,
) -> Result<Provider, KeyError> {
    let module = std::path::absolute(&hsm.module).map_err(|e| KeyError::io(&hsm.module, e))?;
    let hsm = Hsm {
        module,
        ..hsm.clone()
    };
    if hsm.token.is_empty() || hsm.key.is_empty() {
        return Err(KeyError::refused(
            "the pkcs11 provider needs a token label and a key label",
        ));
    }
    let conn = connect(&hsm, pin, true)?;
    let s = conn.session();
    let key = match the_key(s, &hsm)? {
        Some(k) => k,
        None => generate(s, &hsm)?,
    };
    let blob = encrypt(s, key, id, master)?;
    let back = decrypt(s, key, &hsm, id, &blob)?;
    if back.expose_to_provider() != master.expose_to_provider() {
        return Err(KeyError::refused(
            "the PKCS#11 token did not decrypt what it encrypted; nothing was written",
        ));
    }
    drop(conn);
    // a new file beside, then renamed over: a migration between two tokens never leaves
    // the directory without a wrapped key
    let path = wrapped_path(root);
    let tmp = path.with_extension("pkcs11.new");
    let _ = std::fs::remove_file(&tmp);
    phivault_crypto::write_private_file(&tmp, &blob)
        .map_err(|e| KeyError::refused(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(|e| KeyError::io(&path, e))?;
    crate::config::sync_dir(&path)?;
    Ok(Provider::Pkcs11 {
        module: hsm.module,
        token_label: hsm.token,
        key_label: hsm.key,
    })
}

/// The master key of `root`, decrypted in the HSM.
pub fn load(root: &Path, id: &str, hsm: &Hsm, pin: Option<&Path>) -> Result<MasterKey, KeyError> {
    let path = wrapped_path(root);
    let blob = phivault_crypto::read_private_file(&path, 64 * 1024)
        .map_err(|e| KeyError::refused(format!("cannot use {}: {e}", path.display())))?;
    let conn = connect(hsm, pin, false)?;
    let s = conn.session();
    let key = the_key(s, hsm)?.ok_or_else(|| {
        KeyError::refused(format!(
            "no AES key labelled {:?} in PKCS#11 token {:?}: the key that wraps this data directory's master key is gone from the token (restore the token from its backup)",
            hsm.key, hsm.token
        ))
    })?;
    decrypt(s, key, hsm, id, blob.expose())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_file_is_parsed_strictly() {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let good = serde_json::json!({"v":1,"mechanism":"CKM_AES_GCM","iv":b64(&[7;12]),"sealed":b64(&[1;48])});
        assert!(parse(good.to_string().as_bytes()).is_some());
        for bad in [
            serde_json::json!({"v":2,"mechanism":"CKM_AES_GCM","iv":b64(&[7;12]),"sealed":b64(&[1;48])}),
            serde_json::json!({"v":1,"mechanism":"CKM_AES_CBC","iv":b64(&[7;12]),"sealed":b64(&[1;48])}),
            serde_json::json!({"v":1,"mechanism":"CKM_AES_GCM","iv":b64(&[7;16]),"sealed":b64(&[1;48])}),
            serde_json::json!({"v":1,"mechanism":"CKM_AES_GCM","iv":b64(&[7;12]),"sealed":b64(&[1;32])}),
        ] {
            assert!(parse(bad.to_string().as_bytes()).is_none(), "{bad}");
        }
        assert!(parse(b"not json").is_none());
    }

    /// SoftHSM2's module (scripts/test.sh installs Debian's softhsm2 and exports it).
    fn module() -> PathBuf {
        let m = std::env::var_os("PHIVAULT_PKCS11_MODULE").map_or_else(
            || PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
            PathBuf::from,
        );
        assert!(
            m.is_file(),
            "the pkcs11 tests need SoftHSM2: install Debian's softhsm2 (apt-get install softhsm2) or set PHIVAULT_PKCS11_MODULE; {} is missing",
            m.display()
        );
        m
    }

    /// SoftHSM2 reads its token directory from SOFTHSM2_CONF when it is initialised, so the
    /// test runs again in a child process with it set (this process's environment stays
    /// untouched); the parent makes the token.
    #[test]
    fn the_hsm_opens_what_it_wrapped_and_refuses_by_name() {
        let name = "pkcs11::tests::the_hsm_opens_what_it_wrapped_and_refuses_by_name";
        if let Some(dir) = std::env::var_os("PHIVAULT_PKCS11_TEST_DIR") {
            return in_child(Path::new(&dir));
        }
        let module = module();
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(tmp.path().join("tokens")).expect("mkdir");
        let conf = tmp.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\n",
                tmp.path().join("tokens").display()
            ),
        )
        .expect("conf");
        let o = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                "unit",
                "--pin",
                "123456",
                "--so-pin",
                "654321",
            ])
            .output()
            .expect("softhsm2-util (install Debian's softhsm2)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        phivault_crypto::write_private_file(&tmp.path().join("pin"), b"123456\n").expect("pin");
        phivault_crypto::write_private_file(&tmp.path().join("bad-pin"), b"1234567\n")
            .expect("pin");
        let o = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env("SOFTHSM2_CONF", &conf)
            .env("PHIVAULT_PKCS11_TEST_DIR", tmp.path())
            .env("PHIVAULT_PKCS11_MODULE", &module)
            .output()
            .expect("child");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains("1 passed"),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn in_child(dir: &Path) {
        let root = dir.join("data");
        std::fs::create_dir_all(root.join("keys")).expect("mkdir");
        let hsm = Hsm {
            module: module(),
            token: "unit".into(),
            key: "master-wrap".into(),
        };
        let pin = dir.join("pin");
        let m = MasterKey::generate().expect("key");
        let id = "00112233445566778899aabbccddeeff";
        let p = create(&root, id, &hsm, Some(&pin), &m).expect("create");
        assert_eq!(p.name(), "pkcs11");
        let back = load(&root, id, &hsm, Some(&pin)).expect("load");
        assert_eq!(back.expose_to_provider(), m.expose_to_provider());
        // the blob holds no key bytes and is bound to its directory
        let blob = std::fs::read(wrapped_path(&root)).expect("blob");
        assert!(!blob.windows(32).any(|w| w == m.expose_to_provider()));
        let e = load(&root, "ffeeddccbbaa99887766554433221100", &hsm, Some(&pin))
            .map(drop)
            .expect_err("other id")
            .to_string();
        assert!(e.contains("does not open"), "{e}");
        // refusals name what is wrong
        let e = load(&root, id, &hsm, Some(&dir.join("bad-pin")))
            .map(drop)
            .expect_err("bad pin")
            .to_string();
        assert!(
            e.contains("PIN") && e.contains("wrong") && e.contains("\"unit\""),
            "{e}"
        );
        let other = Hsm {
            token: "absent".into(),
            ..hsm.clone()
        };
        let e = load(&root, id, &other, Some(&pin))
            .map(drop)
            .expect_err("token")
            .to_string();
        assert!(
            e.contains("no PKCS#11 token labelled \"absent\"") && e.contains("\"unit\""),
            "{e}"
        );
        let other = Hsm {
            key: "absent".into(),
            ..hsm.clone()
        };
        let e = load(&root, id, &other, Some(&pin))
            .map(drop)
            .expect_err("key")
            .to_string();
        assert!(e.contains("no AES key labelled \"absent\""), "{e}");
        // a second create with the same label uses the same key (and still opens)
        let m2 = MasterKey::generate().expect("key");
        let root2 = dir.join("data2");
        std::fs::create_dir_all(root2.join("keys")).expect("mkdir");
        create(&root2, id, &hsm, Some(&pin), &m2).expect("reuse");
        let back = load(&root2, id, &hsm, Some(&pin)).expect("load 2");
        assert_eq!(back.expose_to_provider(), m2.expose_to_provider());
    }

    #[test]
    fn a_missing_module_is_named_before_any_pin_is_asked() {
        let hsm = Hsm {
            module: "/nonexistent/libnothing.so".into(),
            token: "t".into(),
            key: "k".into(),
        };
        let e = connect(&hsm, Some(Path::new("/nonexistent/pin")), false)
            .map(drop)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("/nonexistent/libnothing.so") && e.contains("does not exist"),
            "{e}"
        );
        // a file that is no shared library: named, not a crash
        let tmp = tempfile::tempdir().expect("tmp");
        let fake = tmp.path().join("lib.so");
        std::fs::write(&fake, b"not an ELF file").expect("write");
        let hsm = Hsm {
            module: fake.clone(),
            ..hsm
        };
        let e = connect(&hsm, None, false)
            .map(drop)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("cannot load the PKCS#11 module") && e.contains(&fake.display().to_string()),
            "{e}"
        );
    }
}
