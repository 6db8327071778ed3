//! `phivault serve`: open (or create) the data directory, bind, and serve HTTPS until a signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::args::{TimingArgs, WatchArgs};
use crate::datadir;

pub(crate) fn serve(
    data_dir: &Path,
    listen: SocketAddr,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    public_url: Option<String>,
    watch: WatchArgs,
    timing: TimingArgs,
) -> Result<i32> {
    let watch = watch.check()?;
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
        datadir::init(data_dir, phivault_records::DEFAULT_INDEX_BITS)?;
        eprintln!("initialised new data directory {}", data_dir.display());
    }
    let opened = datadir::open(data_dir)?;
    opened.store.set_checkpoint_interval_ms(checkpoint_every_ms);
    let (cert_path, key_path) = match (tls_cert, tls_key) {
        (Some(c), Some(k)) => (c, k),
        _ => (opened.dir.server_cert(), opened.dir.server_key()),
    };
    let key_pem = phivault_crypto::read_private_file(&key_path, 1 << 20)
        .map_err(|e| anyhow::anyhow!("refusing to start: TLS private key: {e}"))?;
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
        let app = Arc::new(app);
        phivault_records::watch::spawn(app.vault.clone(), watch);
        let router = phivault_server::router(app);
        println!("listening on https://{local}");
        eprintln!(
            "FHIR base {origin}/fhir (TLS CA: {ca}).\nTo get a token: phivault client add --data-dir {dir} --name NAME --scope 'system/*.cruds' --token-url {origin}/auth/token --out creds.json\nthen POST a private_key_jwt client assertion to {origin}/auth/token (SMART Backend Services).",
            ca = opened.dir.ca_cert().display(),
            dir = opened.dir.root.display(),
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        phivault_server::serve_tls(listener, tls, router, shutdown_signal()).await;
        anyhow::Ok(())
    })?;
    db.close();
    Ok(0)
}

async fn shutdown_signal() {
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

/// The records of the data directory served at `origin`.
pub(crate) fn vault_at(opened: &datadir::Opened, origin: &str) -> Arc<phivault_records::Vault> {
    let engine = phivault_records::Engine::new(opened.store.clone(), opened.keys.clone());
    phivault_records::Vault::new(engine, origin)
}
