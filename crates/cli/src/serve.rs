//! `phivault serve`: open (or create) the data directory, bind, and serve HTTPS until a signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::args::{TimingArgs, WatchArgs};
use crate::datadir;

/// What `serve` is asked for.
pub(crate) struct Options {
    pub listen: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub public_url: Option<String>,
    pub watch: WatchArgs,
    pub timing: TimingArgs,
    pub backup: crate::backup_args::ServeBackupArgs,
    pub sharing: crate::args::SharingArgs,
    /// On a first run, keep the new store in this PostgreSQL database.
    pub database: Option<datadir::DatabaseConfig>,
}

pub(crate) fn serve(data_dir: &Path, o: Options) -> Result<i32> {
    let Options {
        listen,
        tls_cert,
        tls_key,
        public_url,
        watch,
        timing,
        backup,
        sharing,
        database,
    } = o;
    let watch = watch.check()?;
    let backup = backup.check(data_dir)?;
    let checkpoint_every_ms = timing.checkpoint_every_ms;
    let freshness = timing.check()?;
    // Refuse insecure configurations before touching anything (TR1).
    if !listen.ip().is_loopback() && tls_cert.is_none() {
        bail!(
            "refusing to start: listening on the non-loopback address {} needs an operator-supplied certificate (--tls-cert, --tls-key); the development certificate is for loopback only",
            listen.ip()
        );
    }
    if let Some(url) = &public_url
        && !url.starts_with("https://")
    {
        bail!("refusing to start: --public-url must be an https:// URL");
    }
    if !data_dir.exists() {
        let spec = phivault_keys::Create::File { key_file: None };
        let cfg = datadir::init(
            data_dir,
            phivault_records::DEFAULT_INDEX_BITS,
            &spec,
            database.as_ref(),
        )?;
        announce_new_store(&datadir::DataDir::new(data_dir), &cfg);
    } else if let Some(db) = &database {
        // (the directory records its database: the option only chooses a new one's)
        let recorded = datadir::DataDir::new(data_dir).database()?;
        if recorded.as_ref().map(|t| t.url()) != Some(db.url.as_str()) {
            bail!(
                "refusing to start: {} already exists and keeps its store {}; --database chooses the database of a new data directory only",
                data_dir.display(),
                recorded.map_or("in its embedded SQLite file".to_owned(), |t| format!(
                    "in {}",
                    t.url()
                ))
            );
        }
    }
    let mut lock = datadir::lock_for_serving(&datadir::DataDir::new(data_dir))?;
    if let Ok(key) = phivault_keys::ProviderConfig::read(data_dir)
        && matches!(key.provider, phivault_keys::Provider::Shamir { .. })
    {
        // starts sealed: nothing under the master key is opened before the shares come
        datadir::check_dir_private(data_dir)?;
        lock.record_pid()?;
        return crate::sealed::serve(crate::sealed::Settings {
            data_dir: data_dir.to_path_buf(),
            key,
            listen,
            tls_cert,
            tls_key,
            public_url,
            watch,
            freshness,
            checkpoint_every_ms,
            backup,
        });
    }
    let opened = datadir::open(data_dir)?;
    if let Some(w) = &watch.witness_file {
        opened.check_witness(w)?;
    }
    lock.record_pid()?;
    opened.store.set_checkpoint_interval_ms(checkpoint_every_ms);
    let (cert_path, key_path) = match (tls_cert, tls_key) {
        (Some(c), Some(k)) => (c, k),
        _ => (opened.dir.server_cert(), opened.dir.server_key()),
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

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let db = opened.store.clone();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let local = listener.local_addr()?;
        let origin = public_url.unwrap_or_else(|| format!("https://{local}"));
        let origin = origin.trim_end_matches('/').to_owned();
        let mut app = app_at(&opened, &origin)?;
        app.freshness = freshness;
        let exchange = sharing
            .exchange_dir
            .clone()
            .unwrap_or_else(|| opened.dir.root.join("exchange"));
        app.export_expiry_ms = sharing.export_expiry_s.saturating_mul(1000);
        app.exchange = Some(phivault_share::area::Area::open(&exchange).map_err(|e| {
            anyhow::anyhow!(
                "refusing to start: exchange directory {}: {e}",
                exchange.display()
            )
        })?);
        let app = Arc::new(app);
        // the resources' heads were checked beside all this: a store changed outside
        // phivault is refused before anything is served
        opened.store.ready().map_err(datadir::refusal)?;
        // (with the app's own engine, off the runtime: the store's writer is waited for)
        let vault = app.vault.clone();
        tokio::task::spawn_blocking(move || upgrade_index(&vault.engine))
            .await
            .map_err(|_| anyhow::anyhow!("refusing to start: the index upgrade stopped"))??;
        let mut watch = watch;
        watch.audit_key = Some(opened.audit_public);
        phivault_records::watch::spawn(app.vault.clone(), watch);
        if let Some(area) = app.exchange.clone() {
            phivault_share::sweep::spawn(app.vault.clone(), area);
        }
        // backups ship from here on (the shipper's first snapshot starts at once)
        let shipping = match backup {
            Some(s) => {
                let (root, keys) = (opened.dir.root.clone(), opened.keys.clone());
                let (store, vault) = (opened.store.clone(), app.vault.clone());
                Some(
                    tokio::task::spawn_blocking(move || {
                        crate::backup_serve::start(
                            &datadir::DataDir::new(&root),
                            &keys,
                            store,
                            vault,
                            &s,
                        )
                    })
                    .await??,
                )
            }
            None => None,
        };
        let router = phivault_server::router(app);
        println!("listening on https://{local}");
        eprintln!("{}", first_steps(&opened.dir, &origin));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        phivault_server::serve_tls(listener, tls, router, shutdown_signal()).await;
        if let Some(s) = shipping {
            tokio::task::spawn_blocking(move || s.stop()).await?;
        }
        anyhow::Ok(())
    })?;
    db.close();
    Ok(0)
}

/// Say loudly that a new, empty store was made, where, and where its key is: a mistyped
/// `--data-dir` must not pass for the real store unnoticed.
fn announce_new_store(d: &datadir::DataDir, key: &phivault_keys::ProviderConfig) {
    let root = std::path::absolute(&d.root).unwrap_or_else(|_| d.root.clone());
    eprintln!(
        "\n*** Created a NEW, EMPTY data directory: {root} ***\n    (nothing was there; if you meant an existing store, stop this server and check --data-dir)\n    Its {key}.\n    Whoever holds the key and a copy of the data reads every record.\n",
        root = root.display(),
        key = crate::keys_cmds::describe(key),
    );
}

/// How a newcomer gets from here to a first search: commands that work from where the
/// server was started (through `cargo run` when that is how it runs).
fn first_steps(d: &datadir::DataDir, origin: &str) -> String {
    let me = invocation();
    let token_url = if origin == "https://127.0.0.1:8443" {
        String::new()
    } else {
        format!(" --token-url {origin}/auth/token")
    };
    format!(
        "FHIR base {origin}/fhir (TLS CA: {ca})\n\
         To get a token and search (in another terminal):\n  \
         {me} client add --data-dir {dir} --name my-app --scope 'system/*.cruds'{token_url} --out my-app.json\n  \
         curl --cacert {ca} -H \"Authorization: Bearer $({me} token --client my-app.json)\" '{origin}/fhir/Patient?_count=10'",
        ca = d.ca_cert().display(),
        dir = d.root.display(),
    )
}

/// The command that runs this binary from the current directory: `cargo run --release
/// -q --` under cargo, `phivault` when it is on PATH, else its path.
fn invocation() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "phivault".to_owned();
    };
    // `cargo run` sets CARGO and CARGO_MANIFEST_DIR (crates/cli): under cargo, from inside
    // the workspace, `cargo run` is what works
    let workspace = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .and_then(|m| m.parent().and_then(Path::parent).map(Path::to_path_buf));
    let in_workspace = std::env::current_dir()
        .ok()
        .zip(workspace)
        .is_some_and(|(cwd, ws)| cwd.starts_with(ws));
    if std::env::var_os("CARGO").is_some() && in_workspace {
        let release = exe.parent().is_some_and(|p| p.ends_with("release"));
        return if release {
            "cargo run --release -q --".to_owned()
        } else {
            "cargo run -q --".to_owned()
        };
    }
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join("phivault") == exe));
    if on_path {
        return "phivault".to_owned();
    }
    match std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(Path::to_path_buf))
    {
        Some(rel) => format!("./{}", rel.display()),
        None => exe.display().to_string(),
    }
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// The server's state for `origin`: resource operations over the opened store and the
/// token issuer and verifier under the data directory's signing key.
pub(crate) fn app_at(opened: &datadir::Opened, origin: &str) -> Result<phivault_server::App> {
    let issuer = phivault_auth::AccessTokenIssuer::from_pkcs8(
        opened.token_pkcs8.expose(),
        origin.to_owned(),
        format!("{origin}/fhir"),
        "phivault-token-1".to_owned(),
    )
    .map_err(|e| anyhow::anyhow!("token signing key: {e}"))?;
    let verifier = issuer.verifier();
    Ok(phivault_server::App::new(
        vault_at(opened, origin),
        origin,
        issuer,
        verifier,
        phivault_server::Limits::default(),
    ))
}

/// Move a store indexed by an earlier build to this build's blind-index scheme (once,
/// before serving; see `phivault_records::reindex`).
pub(crate) fn upgrade_index(engine: &phivault_records::Engine) -> Result<()> {
    let n = phivault_records::reindex::upgrade(engine).map_err(|e| {
        anyhow::anyhow!(
            "refusing to start: the blind index could not be moved to per-patient tokens: {e}"
        )
    })?;
    if n > 0 {
        eprintln!("moved the blind index to per-patient tokens: {n} records reindexed");
    }
    Ok(())
}

/// The records of the data directory served at `origin`.
pub(crate) fn vault_at(opened: &datadir::Opened, origin: &str) -> Arc<phivault_records::Vault> {
    let engine = phivault_records::Engine::new(opened.store.clone(), opened.keys.clone());
    phivault_records::Vault::new(engine, origin)
}
