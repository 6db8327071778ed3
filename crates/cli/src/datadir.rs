//! The data directory: its layout, `init`, and opening it safely.
//!
//! ```text
//! DIR/                      mode 0700
//!   keys/provider.json      where the master key comes from (phivault-keys): never from here
//!   keys/master.passphrase  (passphrase provider) the master key wrapped under Argon2id
//!   serve.lock              the pid of the one `serve` of this directory (which holds a flock on DIR)
//!   phivault.db (+ -wal)    SQLite: sealed versions, blind indexes, wrapped data keys, audit chain
//!   database.json           (PostgreSQL instead) the database's URL and where its password is:
//!                           never the password itself; several nodes' directories name one database
//!   keys/token-signing.sealed   Ed25519 PKCS#8, sealed under the master key
//!   keys/audit-signing.sealed   Ed25519 PKCS#8, sealed under the master key
//!   tls/ca.pem              development CA certificate (its private key is discarded)
//!   tls/server.pem          server certificate chain for localhost, 127.0.0.1, ::1
//!   tls/server-key.pem      server private key (0600)
//! ```

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use phivault_crypto::{KeyHierarchy, MasterKey, SigningKey};
use phivault_store::postgres::{PasswordSource, PgStore, PgTarget};
use phivault_store::sqlite::SqliteStore;
use phivault_store::{AnyStore, Store};

const TOKEN_KEY_LABEL: &str = "token-signing-v1";
const AUDIT_KEY_LABEL: &str = "audit-signing-v1";
const META_KCV: &str = "key_check_value";

/// Paths inside a data directory.
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        DataDir {
            root: root.to_path_buf(),
        }
    }
    /// Where versions before key providers kept the master key: refused now.
    pub fn legacy_master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("phivault.db")
    }
    pub fn token_key(&self) -> PathBuf {
        self.root.join("keys/token-signing.sealed")
    }
    pub fn audit_key(&self) -> PathBuf {
        self.root.join("keys/audit-signing.sealed")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("tls/ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("tls/server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("tls/server-key.pem")
    }
    pub fn serve_lock(&self) -> PathBuf {
        self.root.join("serve.lock")
    }
    pub fn database_json(&self) -> PathBuf {
        self.root.join("database.json")
    }

    /// The PostgreSQL database this directory's store is in, if it names one
    /// (`database.json`); none: the embedded SQLite file.
    pub fn database(&self) -> Result<Option<PgTarget>> {
        let path = self.database_json();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let cfg: DatabaseConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} does not parse", path.display()))?;
        Ok(Some(cfg.target()?))
    }
}

/// `database.json`: where the PostgreSQL database is (the URL holds no password).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://USER@HOST:PORT/DB`.
    pub url: String,
    /// A file holding the password; none: `PGPASSFILE` or `~/.pgpass`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl DatabaseConfig {
    pub fn target(&self) -> Result<PgTarget> {
        let source = match &self.password_file {
            Some(p) => PasswordSource::File(p.clone()),
            None => PasswordSource::Standard,
        };
        Ok(PgTarget::parse(&self.url, source)?)
    }
}

/// The exclusive claim of one `serve` on a data directory: two servers over one store
/// would each believe they hold the audit chain's head. The lock is a `flock` on the data
/// directory itself (deleting a file cannot release it), held until the process exits (the
/// kernel drops it with the last descriptor, so a crash leaves no stale lock); `serve.lock`
/// only tells a refused second server the holder's pid.
pub struct ServeLock {
    _dir: std::fs::File,
    pid: std::fs::File,
}

/// Take the data directory's serve lock, or say which process holds it.
pub fn lock_for_serving(d: &DataDir) -> Result<ServeLock> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = std::fs::File::open(&d.root)
        .with_context(|| format!("cannot open the data directory {}", d.root.display()))?;
    let path = d.serve_lock();
    let mut pid = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(0o400_000) // O_NOFOLLOW: never write through a planted symlink
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match dir.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = pid.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if !holder.is_empty() && holder.bytes().all(|b| b.is_ascii_digit()) {
                format!("process {holder}")
            } else {
                "another process".to_owned()
            };
            bail!(
                "refusing to start: the data directory {} is in use by {who} (another phivault serve); one server per data directory — stop it first, or serve another --data-dir",
                d.root.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", d.root.display()));
        }
    }
    Ok(ServeLock { _dir: dir, pid })
}

impl ServeLock {
    /// Write this process's id for a refused second server to name (once the data
    /// directory opened: a refused start writes nothing).
    pub fn record_pid(&mut self) -> Result<()> {
        use std::io::{Seek as _, Write as _};
        self.pid.set_len(0)?;
        self.pid.rewind()?;
        writeln!(self.pid, "{}", std::process::id())?;
        self.pid.sync_all()?;
        Ok(())
    }
}

/// A new development CA and server certificate for loopback (`tls/`).
pub(crate) fn write_dev_tls(d: &DataDir) -> Result<()> {
    let pki = phivault_crypto::generate_dev_pki()?;
    std::fs::write(d.ca_cert(), &pki.ca_cert_pem)?;
    std::fs::write(
        d.server_cert(),
        format!("{}{}", pki.server_cert_pem, pki.ca_cert_pem),
    )?;
    phivault_crypto::write_private_file(&d.server_key(), pki.server_key_pem.expose().as_bytes())?;
    Ok(())
}

pub(crate) fn mkdir_private(p: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(p)
        .with_context(|| format!("cannot create directory {}", p.display()))
}

/// What unlocks master keys in this process (set once by `main` from the command line).
static UNLOCK: std::sync::OnceLock<phivault_keys::Unlock> = std::sync::OnceLock::new();

/// Record how this process unlocks master keys.
pub fn set_unlock(unlock: phivault_keys::Unlock) {
    let _ = UNLOCK.set(unlock);
}

fn unlock() -> phivault_keys::Unlock {
    UNLOCK.get().cloned().unwrap_or_default()
}

/// `phivault init`: create a new data directory; refuses to touch an existing one.
/// Returns where its master key went.
pub fn init(
    root: &Path,
    index_bits: u32,
    key: &phivault_keys::Create,
    database: Option<&DatabaseConfig>,
) -> Result<phivault_keys::ProviderConfig> {
    if !(1..=64).contains(&index_bits) {
        bail!("--index-bits must be between 1 and 64");
    }
    // a URL that will not do is refused before anything is made
    let target = database.map(DatabaseConfig::target).transpose()?;
    if root.exists() {
        bail!(
            "{} already exists; refusing to overwrite a data directory",
            root.display()
        );
    }
    // a new store only where its parent already is: a mistyped path must not grow a tree
    if let Some(parent) = root.parent()
        && !parent.as_os_str().is_empty()
        && !parent.is_dir()
    {
        bail!(
            "{} does not exist, so no data directory is created under it (a mistyped path?); create the parent first if a new store is meant",
            parent.display()
        );
    }
    mkdir_private(root)?;
    let d = DataDir::new(root);
    mkdir_private(&root.join("keys"))?;
    mkdir_private(&root.join("tls"))?;
    let (master, provider) = match phivault_keys::create(root, key) {
        Ok(k) => k,
        Err(e) => {
            // nothing of a half-made directory stays behind
            let _ = std::fs::remove_dir_all(root);
            bail!("{e}");
        }
    };
    let keys = KeyHierarchy::new(&master);
    drop(master);
    let mut audit = None;
    for (label, path) in [
        (TOKEN_KEY_LABEL, d.token_key()),
        (AUDIT_KEY_LABEL, d.audit_key()),
    ] {
        let pkcs8 = SigningKey::generate_pkcs8()?;
        let sealed = keys.seal_secret(label, pkcs8.expose())?;
        phivault_crypto::write_private_file(&path, &sealed)?;
        if label == AUDIT_KEY_LABEL {
            audit = Some(SigningKey::from_pkcs8(pkcs8.expose())?);
        }
    }
    let audit = audit.context("no audit key was made")?;
    write_dev_tls(&d)?;
    let store = match (&target, database) {
        (Some(target), Some(cfg)) => match new_postgres_store(&d, target, cfg, &keys, audit) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(root);
                return Err(e);
            }
        },
        _ => {
            // Create the database file private: SQLite gives its -wal and -shm files the
            // same mode.
            {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(d.db())
                    .context("cannot create the database file")?;
            }
            AnyStore::Sqlite(Arc::new(SqliteStore::open(
                &d.db(),
                store_keys(&keys, audit),
            )?))
        }
    };
    store.set_meta(META_KCV, &keys.key_check_value())?;
    store.set_meta(
        phivault_records::INDEX_BITS_META,
        index_bits.to_string().as_bytes(),
    )?;
    store.set_meta(
        phivault_records::engine::INDEX_SCHEME_META,
        phivault_records::engine::INDEX_SCHEME
            .to_string()
            .as_bytes(),
    )?;
    store.close();
    Ok(provider)
}

/// A new store in an empty PostgreSQL database: `database.json` written, the schema made.
/// A database that already holds a store (another deployment's, or this one's) is refused:
/// a new node joins with a copy of an existing node's data directory instead.
fn new_postgres_store(
    d: &DataDir,
    target: &PgTarget,
    cfg: &DatabaseConfig,
    keys: &KeyHierarchy,
    audit: SigningKey,
) -> Result<AnyStore> {
    if let Ok(Some(_)) = PgStore::open_read_only(target).map(|s| {
        let head = s.audit_head().ok().flatten();
        s.close();
        head
    }) {
        bail!(
            "the database {} already holds a phivault store: a new node joins with a copy of an existing node's data directory (which holds no key), not with init",
            target.url()
        );
    }
    phivault_crypto::write_private_file(&d.database_json(), &serde_json::to_vec_pretty(cfg)?)?;
    let store = PgStore::create(target, store_keys(keys, audit))
        .with_context(|| format!("cannot open the database {}", target.url()))?;
    if store.holds_data()? {
        store.close();
        bail!(
            "the database {} already holds a phivault store: a new node joins with a copy of an existing node's data directory (which holds no key), not with init",
            target.url()
        );
    }
    Ok(AnyStore::Postgres(Arc::new(store)))
}

/// The store of a data directory, opened with its keys: the database `database.json`
/// names, or the embedded file.
fn open_store(d: &DataDir, keys: phivault_store::StoreKeys) -> Result<AnyStore> {
    Ok(match d.database()? {
        Some(target) => {
            AnyStore::Postgres(Arc::new(PgStore::open(&target, keys).map_err(refusal)?))
        }
        None => AnyStore::Sqlite(Arc::new(SqliteStore::open(&d.db(), keys).map_err(refusal)?)),
    })
}

/// The label of the store's integrity secret under the master key.
const STORE_INTEGRITY_LABEL: &str = "store-integrity-v1";

/// What the store needs of the keys: the audit key (signer and public half) and the
/// integrity keys (settings MACs, the state summary) derived from the master key.
pub fn store_keys(keys: &KeyHierarchy, audit: SigningKey) -> phivault_store::StoreKeys {
    let secret = keys.derive_subkey(STORE_INTEGRITY_LABEL);
    phivault_store::StoreKeys {
        audit_public: audit.public_key(),
        integrity: phivault_store::integrity::Integrity::new(secret.expose()),
        signer: Box::new(move |m: &[u8]| audit.sign(m).to_vec()),
    }
}

/// A store that was changed outside phivault is refused with the reason, as such.
pub(crate) fn refusal(e: phivault_store::StoreError) -> anyhow::Error {
    let why = match e {
        phivault_store::StoreError::Tampered(why) => why,
        // stored data not in the shape phivault writes: changed outside it (or a disk
        // that corrupts), refused the same way
        phivault_store::StoreError::Corrupt(why) => why.to_owned(),
        other => return other.into(),
    };
    anyhow::anyhow!(
        "refusing to open the database: storage was changed outside phivault: {why}. Run `phivault verify` and restore from a backup"
    )
}

/// An opened data directory: keys loaded and checked, store open.
pub struct Opened {
    pub dir: DataDir,
    pub keys: KeyHierarchy,
    pub store: Arc<AnyStore>,
    pub token_pkcs8: phivault_crypto::Secret<Vec<u8>>,
    /// The audit key's public half.
    pub audit_public: [u8; 32],
}

impl Opened {
    /// Refuse a store whose log does not hold the newest checkpoint the witness file kept
    /// (a missing file is a new witness): the database was rolled back or replaced.
    pub fn check_witness(&self, witness: &Path) -> Result<()> {
        let text = match std::fs::read_to_string(witness) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot read the witness file {}", witness.display())
                });
            }
        };
        let Some(newest) = text
            .lines()
            .rev()
            .find_map(phivault_audit::merkle::Checkpoint::from_line)
        else {
            return Ok(());
        };
        if !newest.signature_ok(&self.audit_public) {
            bail!(
                "refusing to start: the newest checkpoint in the witness file {} is not signed by this data directory's audit key",
                witness.display()
            );
        }
        let held = self
            .store
            .audit_checkpoints(newest.size.saturating_sub(1), 1)?
            .into_iter()
            .any(|c| c.size == newest.size && c.root == newest.root);
        if !held {
            bail!(
                "refusing to start: the audit log does not hold the witness's newest checkpoint (event {}): the database was rolled back or replaced. Run `phivault verify --witness {}` and restore from a backup",
                newest.size,
                witness.display()
            );
        }
        Ok(())
    }
}

/// Refuse a data directory others can read or write.
pub fn check_dir_private(root: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(root)
        .with_context(|| format!("cannot read data directory {}", root.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "refusing to start: data directory {} has mode {:o}; it must be private to the server's user (chmod 700)",
            root.display(),
            mode
        );
    }
    Ok(())
}

/// The master key through the data directory's recorded provider; a directory of an older
/// version, with `master.key` inside it, is refused with the way out.
pub fn load_master(d: &DataDir) -> Result<MasterKey> {
    if !phivault_keys::ProviderConfig::path(&d.root).exists() {
        if d.legacy_master_key().exists() {
            bail!(
                "refusing to start: the master key is inside the data directory ({}): whoever copies the directory has the key. Move it out with `phivault keys migrate --data-dir {} --to file` (or `--to passphrase`)",
                d.legacy_master_key().display(),
                d.root.display()
            );
        }
        bail!(
            "{} is not a phivault data directory (no {})",
            d.root.display(),
            phivault_keys::config::PROVIDER_JSON
        );
    }
    let (master, _) = phivault_keys::load(&d.root, &unlock())
        .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
    Ok(master)
}

/// Load the master key, the derived keys and the audit signing key of a data directory.
pub fn load_keys(d: &DataDir) -> Result<(KeyHierarchy, SigningKey)> {
    check_dir_private(&d.root)?;
    let master = load_master(d)?;
    keys_under(d, &master)
}

/// The derived keys and the audit signing key of a data directory under `master`.
pub fn keys_under(d: &DataDir, master: &MasterKey) -> Result<(KeyHierarchy, SigningKey)> {
    let keys = KeyHierarchy::new(master);
    let audit = audit_signer(d, &keys).context("refusing to start")?;
    Ok((keys, audit))
}

/// The audit signing key of a data directory, opened under `keys`.
pub fn audit_signer(d: &DataDir, keys: &KeyHierarchy) -> Result<SigningKey> {
    let sealed = std::fs::read(d.audit_key()).with_context(|| {
        format!(
            "cannot read the audit signing key {}",
            d.audit_key().display()
        )
    })?;
    let pkcs8 = keys
        .open_secret(AUDIT_KEY_LABEL, &sealed)
        .context("the audit signing key does not open under this master key (a master key from another deployment?)")?;
    Ok(SigningKey::from_pkcs8(pkcs8.expose())?)
}

/// Refuse `keys` that are not this database's (its key check value).
pub fn check_key(d: &DataDir, keys: &KeyHierarchy) -> Result<()> {
    let store = read_only_store(&d.root)?;
    match store.meta(META_KCV)? {
        Some(kcv) if keys.verify_key_check_value(&kcv) => Ok(()),
        Some(_) => bail!("the master key does not match this database"),
        None => bail!("the database has no key check value (not initialised by phivault init)"),
    }
}

/// The data directory's database, read-only (offline reports), or an error naming the path.
pub fn read_only_store(root: &Path) -> Result<AnyStore> {
    let d = DataDir::new(root);
    if let Some(target) = d.database()? {
        let s = PgStore::open_read_only(&target)
            .with_context(|| format!("cannot open the database {}", target.url()))?;
        return Ok(AnyStore::Postgres(Arc::new(s)));
    }
    let db = d.db();
    if !db.is_file() {
        bail!(
            "{} is not a phivault data directory (no {})",
            root.display(),
            db.display()
        );
    }
    let s = SqliteStore::open_read_only(&db)
        .with_context(|| format!("cannot open {}", db.display()))?;
    Ok(AnyStore::Sqlite(Arc::new(s)))
}

/// Open a data directory for serving or administration.
pub fn open(root: &Path) -> Result<Opened> {
    let d = DataDir::new(root);
    let (keys, audit) = load_keys(&d)?;
    open_under(d, keys, audit)
}

/// Open a data directory with its master key already in hand (a sealed server's shares).
pub fn open_with(root: &Path, master: &MasterKey) -> Result<Opened> {
    check_dir_private(root)?;
    let d = DataDir::new(root);
    let (keys, audit) = keys_under(&d, master)?;
    open_under(d, keys, audit)
}

pub(crate) fn open_under(d: DataDir, keys: KeyHierarchy, audit: SigningKey) -> Result<Opened> {
    let sealed = std::fs::read(d.token_key()).with_context(|| {
        format!(
            "cannot read the token signing key {}",
            d.token_key().display()
        )
    })?;
    let token_pkcs8 = keys
        .open_secret(TOKEN_KEY_LABEL, &sealed)
        .context("refusing to start: the token signing key does not open under this master key")?;
    let audit_public = audit.public_key();
    let store = open_store(&d, store_keys(&keys, audit))?;
    match store.meta(META_KCV)? {
        Some(kcv) if keys.verify_key_check_value(&kcv) => {}
        Some(_) => bail!("refusing to start: the master key does not match this database"),
        None => bail!(
            "refusing to start: the database has no key check value (not initialised by phivault init)"
        ),
    }
    Ok(Opened {
        dir: d,
        keys,
        store: Arc::new(store),
        token_pkcs8,
        audit_public,
    })
}
