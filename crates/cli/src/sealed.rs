//! `serve` of a `shamir` data directory: it starts **sealed**. It listens (TLS: the TLS
//! key is not under the master key) behind a [`phivault_server::Gate`] that answers only
//! the metadata and `/health`, and opens the control socket ([`crate::control`]). Shares
//! come in one by one (checked, held in memory wiped on drop); at the threshold they are
//! combined, the key is checked against the database's key check value, and only then
//! are the store, the `App` and the watchers built. `seal` drops all of it again.
//!
//! Where the master key's bytes go: the shares are combined, the data directory opened
//! and the `App` built on a short-lived thread of its own, whose stack is overwritten
//! before it ends; the combined key lives in a `Zeroizing` buffer and a `MasterKey`
//! (wiped on drop), and is dropped as soon as the derived keys exist: an unsealed server
//! holds the derived keys (wiped on drop when sealed), never the master key.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use phivault_crypto::{KeyHierarchy, MasterKey};
use phivault_keys::shamir::{Pending, Progress};
use phivault_store::AnyStore;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use zeroize::{Zeroize as _, Zeroizing};

use crate::control::{MAX_LINE, socket_path};
use crate::datadir::{self, DataDir};

/// Stack of the unseal thread, and how much of it is overwritten before the thread ends.
const UNSEAL_STACK: usize = 4 << 20;
const SCRUB: usize = 1 << 20;
/// How long `seal` waits for requests in flight to let go of the keys.
const SEAL_WAIT: Duration = Duration::from_secs(30);

/// What `serve` of a shamir data directory needs.
pub(crate) struct Settings {
    pub data_dir: PathBuf,
    pub key: phivault_keys::ProviderConfig,
    pub listen: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub public_url: Option<String>,
    pub watch: phivault_records::watch::Watch,
    pub freshness: phivault_server::Freshness,
    pub checkpoint_every_ms: u64,
    pub backup: Option<crate::backup_args::Shipping>,
}

/// The sealed server's state, shared by the control connections.
struct Control {
    data_dir: PathBuf,
    origin: String,
    watch: phivault_records::watch::Watch,
    freshness: phivault_server::Freshness,
    checkpoint_every_ms: u64,
    backup: Option<crate::backup_args::Shipping>,
    gate: phivault_server::Gate,
    pending: Mutex<Pending>,
    /// The unsealed server (None: sealed). Held across a whole unseal or seal.
    running: tokio::sync::Mutex<Option<Running>>,
}

/// What an unsealed server runs.
struct Running {
    store: Arc<AnyStore>,
    watcher: phivault_records::watch::Watcher,
    shipping: Option<crate::backup_serve::Running>,
    app: Weak<phivault_server::App>,
    vault: Weak<phivault_records::Vault>,
}

/// What the unseal thread built.
struct Unsealed {
    app: Arc<phivault_server::App>,
    store: Arc<AnyStore>,
    shipping: Option<crate::backup_serve::Running>,
    audit_key: [u8; 32],
}

enum Outcome {
    Held { have: u8, need: u8 },
    Refused(String),
    Open(Box<Unsealed>),
}

/// `serve` on a shamir data directory: sealed until shares come.
pub(crate) fn serve(s: Settings) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(s))
}

async fn run(s: Settings) -> Result<i32> {
    let d = DataDir::new(&s.data_dir);
    let (cert_path, key_path) = match (&s.tls_cert, &s.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (d.server_cert(), d.server_key()),
    };
    let key_pem = phivault_crypto::read_private_file(&key_path, 1 << 20).map_err(|e| {
        anyhow::anyhow!(
            "refusing to start: TLS private key {}: {e}",
            key_path.display()
        )
    })?;
    let cert_pem = std::fs::read(&cert_path)
        .with_context(|| format!("cannot read TLS certificate {}", cert_path.display()))?;
    let tls = phivault_server::tls_config(&cert_pem, key_pem.expose())?;
    drop(key_pem);
    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .with_context(|| format!("cannot listen on {}", s.listen))?;
    let local = listener.local_addr()?;
    let origin = s
        .public_url
        .clone()
        .unwrap_or_else(|| format!("https://{local}"));
    let origin = origin.trim_end_matches('/').to_owned();
    let (shares, threshold) = match s.key.provider {
        phivault_keys::Provider::Shamir { shares, threshold } => (shares, threshold),
        _ => bail!("not a shamir data directory"),
    };
    let (control, owner) = bind_control(&s.data_dir)?;
    let _remove = RemoveOnDrop(socket_path(&s.data_dir));
    let gate = phivault_server::Gate::new(&origin);
    let ctl = Arc::new(Control {
        pending: Mutex::new(Pending::new(&s.key.data_dir_id, shares, threshold)),
        data_dir: s.data_dir,
        origin: origin.clone(),
        watch: s.watch,
        freshness: s.freshness,
        checkpoint_every_ms: s.checkpoint_every_ms,
        backup: s.backup,
        gate: gate.clone(),
        running: tokio::sync::Mutex::new(None),
    });
    let accept = tokio::spawn(accept_loop(control, ctl.clone(), owner));
    println!("listening on https://{local}");
    eprintln!(
        "SEALED: this server answers only {origin}/fhir/metadata and {origin}/health until {threshold} of the {shares} shares unseal it:\n  phivault unseal --data-dir {}",
        ctl.data_dir.display()
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    phivault_server::serve_tls(
        listener,
        tls,
        gate.router(),
        crate::serve::shutdown_signal(),
    )
    .await;
    accept.abort();
    seal(&ctl).await;
    Ok(0)
}

/// Removes the control socket when the server ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Make the control socket (mode 0600) in the data directory; returns it and its owner's
/// uid. A socket or symlink left there by a server that died goes (the serve lock says no
/// other server runs); anything else there is refused.
fn bind_control(data_dir: &Path) -> Result<(UnixListener, u32)> {
    let path = socket_path(data_dir);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() || m.file_type().is_symlink() => {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove the stale {}", path.display()))?;
        }
        Ok(_) => bail!(
            "refusing to start: {} exists and is not a socket",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let l = UnixListener::bind(&path).with_context(|| {
        format!(
            "cannot make the control socket {} (a path of more than 107 bytes?)",
            path.display()
        )
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::symlink_metadata(&path)?.uid();
    Ok((l, owner))
}

async fn accept_loop(l: UnixListener, ctl: Arc<Control>, owner: u32) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // only the data directory's owner (or root) talks to it
        match stream.peer_cred() {
            Ok(c) if c.uid() == owner || c.uid() == 0 => {}
            _ => continue,
        }
        tokio::spawn(connection(stream, ctl.clone()));
    }
}

/// One client: lines in (into memory wiped after each), JSON replies out.
async fn connection(mut stream: UnixStream, ctl: Arc<Control>) {
    let mut line: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::with_capacity(MAX_LINE));
    let mut buf: Zeroizing<[u8; 256]> = Zeroizing::new([0u8; 256]);
    loop {
        let n =
            match tokio::time::timeout(Duration::from_secs(600), stream.read(&mut buf[..])).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return,
            };
        for i in 0..n {
            let b = buf[i];
            if b != b'\n' {
                if line.len() >= MAX_LINE {
                    let _ = stream
                        .write_all(&reply(&ctl, false, "request too long").await)
                        .await;
                    return;
                }
                line.push(b);
                continue;
            }
            let answer = handle(&ctl, &line).await;
            line.zeroize();
            if stream.write_all(&answer).await.is_err() {
                return;
            }
        }
        buf.zeroize();
    }
}

async fn handle(ctl: &Arc<Control>, line: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(line).unwrap_or("").trim();
    match text {
        "status" => reply(ctl, true, "").await,
        "seal" => {
            let msg = seal(ctl).await;
            reply(ctl, true, &msg).await
        }
        _ => match text.strip_prefix("share ") {
            Some(share) => submit(ctl, share).await,
            None => reply(ctl, false, "unknown request: status, share TEXT or seal").await,
        },
    }
}

/// A reply line: the state, the shares held, whether the request was accepted, a message.
async fn reply(ctl: &Control, accepted: bool, message: &str) -> Vec<u8> {
    let (have, need) = ctl
        .pending
        .lock()
        .map(|p| (p.held(), p.threshold()))
        .unwrap_or((0, 0));
    let state = if ctl.gate.is_sealed() {
        "sealed"
    } else {
        "unsealed"
    };
    let mut v = serde_json::to_vec(&json!({
        "state": state, "have": have, "need": need, "accepted": accepted, "message": message,
    }))
    .unwrap_or_default();
    v.push(b'\n');
    v
}

/// Take one share; at the threshold, unseal.
async fn submit(ctl: &Arc<Control>, share: &str) -> Vec<u8> {
    let mut running = ctl.running.lock().await;
    if running.is_some() {
        return reply(ctl, false, "the server is already unsealed").await;
    }
    let text = Zeroizing::new(share.to_owned());
    let c = ctl.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("unseal".into())
        .stack_size(UNSEAL_STACK)
        .spawn(move || {
            let outcome = take_share(&c, &text);
            drop(text);
            scrub_stack();
            let _ = tx.send(outcome);
        });
    if spawned.is_err() {
        return reply(ctl, false, "the server could not start the unseal").await;
    }
    match rx.await {
        Ok(Outcome::Held { have, need }) => {
            let msg = format!("share accepted: {have} of {need}; still sealed");
            reply(ctl, true, &msg).await
        }
        Ok(Outcome::Refused(why)) => reply(ctl, false, &why).await,
        Ok(Outcome::Open(u)) => {
            *running = Some(start(ctl, *u));
            tracing::info!("unsealed");
            reply(ctl, true, "unsealed: the server serves requests").await
        }
        Err(_) => reply(ctl, false, "the unseal failed").await,
    }
}

/// On the unseal thread: check and hold a share; at the threshold combine, check and open.
#[inline(never)]
fn take_share(ctl: &Control, text: &str) -> Outcome {
    let progress = match ctl.pending.lock() {
        Ok(mut p) => p.submit(text),
        Err(_) => return Outcome::Refused("the unseal state is broken".into()),
    };
    let master = match progress {
        Err(e) => return Outcome::Refused(e.to_string()),
        Ok(Progress::Held { have, need }) => return Outcome::Held { have, need },
        Ok(Progress::Complete(m)) => m,
    };
    let opened = open_app(ctl, &master);
    drop(master);
    match opened {
        Ok(u) => Outcome::Open(Box::new(u)),
        Err(why) => Outcome::Refused(why),
    }
}

/// Check the combined key against the database, then open everything under it.
fn open_app(ctl: &Control, master: &MasterKey) -> Result<Unsealed, String> {
    let d = DataDir::new(&ctl.data_dir);
    let keys = KeyHierarchy::new(master);
    if let Err(e) = datadir::check_key(&d, &keys) {
        return Err(if format!("{e}").contains("does not match") {
            "refused: these shares do not combine to this data directory's master key (one of them is wrong); every pending share was discarded: start again".to_owned()
        } else {
            format!(
                "the shares could not be checked against the database: {e:#}; every pending share was discarded"
            )
        });
    }
    drop(keys);
    let opened = datadir::open_with(&ctl.data_dir, master)
        .map_err(|e| format!("the shares are right but the data directory did not open: {e:#}"))?;
    if let Some(w) = &ctl.watch.witness_file {
        opened.check_witness(w).map_err(|e| format!("{e:#}"))?;
    }
    opened
        .store
        .ready()
        .map_err(|e| format!("{:#}", datadir::refusal(e)))?;
    opened
        .store
        .set_checkpoint_interval_ms(ctl.checkpoint_every_ms);
    let mut app = crate::serve::app_at(&opened, &ctl.origin).map_err(|e| format!("{e:#}"))?;
    crate::serve::upgrade_index(&app.vault.engine).map_err(|e| format!("{e:#}"))?;
    app.freshness = ctl.freshness.clone();
    let store = opened.store.clone();
    let audit_key = opened.audit_public;
    let shipping = match &ctl.backup {
        Some(b) => Some(
            crate::backup_serve::start(
                &opened.dir,
                &opened.keys,
                store.clone(),
                app.vault.clone(),
                b,
            )
            .map_err(|e| format!("{e:#}"))?,
        ),
        None => None,
    };
    drop(opened);
    Ok(Unsealed {
        app: Arc::new(app),
        store,
        shipping,
        audit_key,
    })
}

/// Overwrite the stack below this frame (where the unseal's frames were): moves of keys
/// leave copies there that nothing else wipes, and thread stacks are reused.
#[inline(never)]
fn scrub_stack() {
    let mut pad = [0u8; SCRUB];
    pad.zeroize();
    std::hint::black_box(&pad);
}

/// Serve the unsealed app and start its watchers.
fn start(ctl: &Control, u: Unsealed) -> Running {
    let mut watch = ctl.watch.clone();
    watch.audit_key = Some(u.audit_key);
    let watcher = phivault_records::watch::spawn(u.app.vault.clone(), watch);
    let running = Running {
        store: u.store,
        watcher,
        shipping: u.shipping,
        app: Arc::downgrade(&u.app),
        vault: Arc::downgrade(&u.app.vault),
    };
    ctl.gate.unseal(phivault_server::router(u.app));
    running
}

/// Seal: answer sealed from now on, stop the watchers, wait for requests in flight, close
/// the store; every key the app held is wiped as it is dropped. Pending shares go too.
async fn seal(ctl: &Control) -> String {
    let mut running = ctl.running.lock().await;
    if let Ok(mut p) = ctl.pending.lock() {
        p.clear();
    }
    let Some(r) = running.take() else {
        return "sealed (it was)".to_owned();
    };
    drop(ctl.gate.seal());
    r.watcher.stop().await;
    if let Some(s) = r.shipping {
        let _ = tokio::task::spawn_blocking(move || s.stop()).await;
    }
    let deadline = Instant::now() + SEAL_WAIT;
    while (r.app.strong_count() > 0 || r.vault.strong_count() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lingering = r.app.strong_count() + r.vault.strong_count();
    let store = r.store;
    let _ = tokio::task::spawn_blocking(move || {
        store.close();
        drop(store);
    })
    .await;
    tracing::info!("sealed");
    if lingering > 0 {
        format!("sealed; {lingering} holders of the keys were still busy after {SEAL_WAIT:?}")
    } else {
        "sealed: the keys, the store and the watchers are gone".to_owned()
    }
}
