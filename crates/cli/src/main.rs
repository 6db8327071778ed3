#![forbid(unsafe_code)]
//! `phivault`: the server binary and its administration commands.

mod datadir;

/// mimalloc: the request path (JSON trees, sealing buffers) is allocation-heavy; glibc malloc
/// showed up as ~20% of server CPU in import profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use phivault_store::Store;

#[derive(Parser)]
#[command(
    name = "phivault",
    version,
    about = "A FHIR R4 health-records server that stays safe when its storage leaks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a data directory: master key, development CA and server certificate, signing keys, empty database.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// Width in bits of blind-index tokens. Plan it for the expected number of
        /// resources R per type: the coincidence band 2 <= R/2^bits <= sqrt(R) of DR3
        /// (16 bits suits 131 thousand to 4 billion resources); see `index check`.
        #[arg(long, default_value_t = phivault_records::DEFAULT_INDEX_BITS)]
        index_bits: u32,
    },
    /// Serve FHIR over HTTPS (initialises the data directory on first run).
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// PEM certificate chain (required for non-loopback addresses).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key, mode 0600 (required for non-loopback addresses).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Public origin clients use (default https://LISTEN-ADDRESS); the token audience derives from it.
        #[arg(long)]
        public_url: Option<String>,
        #[command(flatten)]
        watch: WatchArgs,
        #[command(flatten)]
        timing: TimingArgs,
    },
    /// Manage SMART Backend Services clients.
    Client {
        #[command(subcommand)]
        cmd: ClientCmd,
    },
    /// Register SMART apps (public clients that sign people in with App Launch).
    App {
        #[command(subcommand)]
        cmd: AppCmd,
    },
    /// Manage the accounts of people (clinicians, auditors, admins, patients).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Trust a hospital's own OpenID Connect provider for people's access tokens.
    Idp {
        #[command(subcommand)]
        cmd: IdpCmd,
    },
    /// Write deterministic synthetic patients as FHIR transaction Bundles.
    Synth {
        #[arg(long)]
        patients: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Blind-index tools.
    Index {
        #[command(subcommand)]
        cmd: IndexCmd,
    },
}

#[derive(Subcommand)]
enum IndexCmd {
    /// Check every blind index's coincidence count C = R / 2^bits against the safe band
    /// 2 <= C <= sqrt(R) (DR3), offline. Exit 0 when every index with at least
    /// --min-resources resources is in the band, 1 otherwise.
    Check {
        #[arg(long)]
        data_dir: PathBuf,
        /// Indexes of fewer resources are listed but not judged (the band is degenerate).
        #[arg(long, default_value_t = 64)]
        min_resources: u64,
    },
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Register a client; writes its credentials (with a private ES384 JWK) as JSON.
    Add {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Scopes the client may be granted: system/ scopes only, e.g. "system/*.cruds".
        #[arg(long)]
        scope: String,
        /// Credentials file to create (mode 0600); stdout when absent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Token endpoint URL written into the credentials.
        #[arg(long, default_value = "https://127.0.0.1:8443/auth/token")]
        token_url: String,
    },
}

#[derive(Subcommand)]
enum AppCmd {
    /// Register a public SMART app (authorization code + PKCE S256); prints its client_id.
    Add {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
        /// An exact redirect URI (https, or http on a loopback address); repeatable.
        #[arg(long = "redirect-uri", required = true)]
        redirect_uris: Vec<String>,
        /// Scopes the app may ever be granted, e.g. "patient/*.rs openid fhirUser launch/patient offline_access".
        #[arg(long)]
        scope: String,
        /// Also issue plain bearer tokens to it (apps that cannot keep a key). By default
        /// a public app gets tokens only with a DPoP proof (RFC 9449): its access and
        /// refresh tokens are bound to its key, useless to whoever steals them.
        #[arg(long)]
        allow_bearer: bool,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a person. The password is read from the first line of standard input; the
    /// second factor's enrolment secret is printed once, and must be proven at the first
    /// sign-in before any token is issued.
    Add {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        username: String,
        /// clinician | auditor | admin | patient
        #[arg(long)]
        role: String,
        /// The Practitioner a clinician is (its id; must exist).
        #[arg(long, conflicts_with = "patient")]
        practitioner: Option<String>,
        /// The Patient a patient user is (its id; must exist).
        #[arg(long)]
        patient: Option<String>,
    },
    /// Disable a person's account; their tokens stop working.
    Disable {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        username: String,
    },
    /// Change a person's role (and link); their tokens stop working.
    Role {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        username: String,
        #[arg(long)]
        role: String,
        #[arg(long, conflicts_with = "patient")]
        practitioner: Option<String>,
        #[arg(long)]
        patient: Option<String>,
    },
}

#[derive(Subcommand)]
enum IdpCmd {
    /// Accept access tokens (RFC 9068 JWTs) from this provider: its keys come from its
    /// discovery document; the person claim names a local account, whose role and links
    /// decide what the token reaches.
    Add {
        #[arg(long)]
        data_dir: PathBuf,
        /// The issuer URL, exactly as in its tokens (https; http only on a loopback address).
        #[arg(long)]
        issuer: String,
        /// The audience its tokens must carry for this server (its FHIR base URL).
        #[arg(long)]
        audience: String,
        /// The claim naming the person; its value is a local username.
        #[arg(long, default_value = "preferred_username")]
        username_claim: String,
        /// PEM file of the CA of the provider's TLS certificate (a private PKI).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verify the audit log offline: the hash chain and its signed head, and the Merkle
    /// tree against every signed checkpoint (stored, and those a witness kept). Exit 0
    /// when intact.
    Verify {
        #[arg(long)]
        data_dir: PathBuf,
        /// A witness file of checkpoints exported earlier (`audit checkpoints`), kept where
        /// the server cannot rewrite it: a rewritten or rolled-back log fails against it.
        #[arg(long)]
        witness: Option<PathBuf>,
    },
    /// A report of the audit log (AU4): the events of a period, a user, a client or a
    /// patient, as CSV or as FHIR AuditEvent JSON lines.
    Report {
        #[arg(long)]
        data_dir: PathBuf,
        /// From this date or instant (inclusive), e.g. 2026-12-01.
        #[arg(long)]
        from: Option<String>,
        /// Until this date or instant (exclusive).
        #[arg(long)]
        to: Option<String>,
        /// Only this person's account id.
        #[arg(long)]
        user: Option<String>,
        /// Only this client.
        #[arg(long)]
        client: Option<String>,
        /// Only events about this patient (an accounting of disclosures).
        #[arg(long)]
        patient: Option<String>,
        /// csv or json.
        #[arg(long, default_value = "csv")]
        format: String,
    },
    /// Print the signed checkpoints of the audit tree, one per line (`size root time
    /// signature`), to append to a witness file on another volume.
    Checkpoints {
        #[arg(long)]
        data_dir: PathBuf,
        /// Only checkpoints of more events than this.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Print the alert records for review (break-the-glass), oldest first, as JSON lines.
    Alerts {
        #[arg(long)]
        data_dir: PathBuf,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Only those in this state: open, justified or violation.
        #[arg(long)]
        status: Option<String>,
    },
    /// Run the snooping rules over the audit events since the last scan and raise alerts
    /// (the server does this by itself too, every --scan-every seconds).
    Scan {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        hours: HoursArgs,
    },
    /// Record the review of an alert: justified or violation.
    Review {
        #[arg(long)]
        data_dir: PathBuf,
        /// The alert's id.
        #[arg(long)]
        alert: String,
        /// justified or violation.
        #[arg(long)]
        status: String,
        /// Who reviewed it.
        #[arg(long)]
        reviewer: String,
        /// The finding.
        #[arg(long, default_value = "")]
        note: String,
    },
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("phivault: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Init {
            data_dir,
            index_bits,
        } => {
            datadir::init(&data_dir, index_bits)?;
            println!("initialised {}", data_dir.display());
            Ok(0)
        }
        Cmd::Serve {
            data_dir,
            listen,
            tls_cert,
            tls_key,
            public_url,
            watch,
            timing,
        } => serve(
            &data_dir, listen, tls_cert, tls_key, public_url, watch, timing,
        ),
        Cmd::Client {
            cmd:
                ClientCmd::Add {
                    data_dir,
                    name,
                    scope,
                    out,
                    token_url,
                },
        } => client_add(&data_dir, &name, &scope, out.as_deref(), &token_url),
        Cmd::User { cmd } => user_cmd(cmd),
        Cmd::Idp {
            cmd:
                IdpCmd::Add {
                    data_dir,
                    issuer,
                    audience,
                    username_claim,
                    ca_file,
                },
        } => {
            let ca_pem = match ca_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("cannot read {}", f.display()))?,
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
            let opened = datadir::open(&data_dir)?;
            let r =
                phivault_records::registrations::store_config(&opened.keys, &*opened.store, &cfg);
            opened.store.close();
            r?;
            println!("identity provider {} trusted", cfg.issuer);
            Ok(0)
        }
        Cmd::App {
            cmd:
                AppCmd::Add {
                    data_dir,
                    name,
                    redirect_uris,
                    scope,
                    allow_bearer,
                },
        } => app_add(&data_dir, &name, redirect_uris, &scope, !allow_bearer),
        Cmd::Synth {
            patients,
            seed,
            out,
        } => {
            let files = phivault_synth::write_bundles(
                &phivault_synth::SynthConfig { patients, seed },
                &out,
            )?;
            println!("wrote {} bundles to {}", files.len(), out.display());
            Ok(0)
        }
        Cmd::Audit {
            cmd: AuditCmd::Verify { data_dir, witness },
        } => audit_verify(&data_dir, witness.as_deref()),
        Cmd::Audit {
            cmd:
                AuditCmd::Report {
                    data_dir,
                    from,
                    to,
                    user,
                    client,
                    patient,
                    format,
                },
        } => audit_report(
            &data_dir,
            [
                ("date", from.map(|f| format!("ge{f}"))),
                ("date", to.map(|t| format!("lt{t}"))),
                ("user", user),
                ("client", client),
                ("patient", patient),
            ],
            &format,
        ),
        Cmd::Audit {
            cmd: AuditCmd::Checkpoints { data_dir, after },
        } => {
            let d = datadir::DataDir::new(&data_dir);
            let store = phivault_store::sqlite::SqliteStore::open_read_only(&d.db())?;
            for cp in store.audit_checkpoints(after, usize::MAX)? {
                println!("{}", cp.to_line());
            }
            Ok(0)
        }
        Cmd::Audit {
            cmd:
                AuditCmd::Alerts {
                    data_dir,
                    limit,
                    status,
                },
        } => {
            let opened = datadir::open(&data_dir)?;
            let alerts = phivault_records::care::alerts(&opened.keys, &*opened.store, limit);
            opened.store.close();
            for a in alerts?
                .iter()
                .filter(|a| status.as_ref().is_none_or(|s| &a.status == s))
            {
                println!("{}", serde_json::to_string(a)?);
            }
            Ok(0)
        }
        Cmd::Audit {
            cmd: AuditCmd::Scan { data_dir, hours },
        } => {
            let hours = hours.check()?;
            let opened = datadir::open(&data_dir)?;
            let r = audit_scan(&opened, hours);
            opened.store.close();
            r
        }
        Cmd::Audit {
            cmd:
                AuditCmd::Review {
                    data_dir,
                    alert,
                    status,
                    reviewer,
                    note,
                },
        } => {
            let opened = datadir::open(&data_dir)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis();
            let r = phivault_records::care::review_alert(
                &opened.keys,
                &*opened.store,
                &alert,
                &status,
                &reviewer,
                &note,
                i64::try_from(now).unwrap_or(i64::MAX),
            );
            opened.store.close();
            let a = r?;
            eprintln!("alert {} reviewed: {}", a.id, a.status);
            Ok(0)
        }
        Cmd::Index {
            cmd:
                IndexCmd::Check {
                    data_dir,
                    min_resources,
                },
        } => index_check(&data_dir, min_resources),
    }
}

fn index_check(data_dir: &Path, min_resources: u64) -> Result<i32> {
    use phivault_fhir::search;
    use phivault_store::Store as _;
    let opened = datadir::open(data_dir)?;
    let engine = phivault_records::Engine::new(opened.store.clone(), opened.keys.clone());
    let bits = engine.index_bits();
    let space = 2f64.powi(bits as i32);
    println!("token width {bits} bits; band 2 <= C = R/2^{bits} <= sqrt(R)");
    println!("index\tR\tC\tband\tdistinct tokens\tmax rows/token\tverdict");
    let mut out_of_band = 0;
    for rtype in phivault_fhir::resource_types() {
        let indexes = search::indexed_params(rtype).flat_map(|def| {
            let span =
                (def.ptype == search::ParamType::Date).then(|| search::span_index(&def.code));
            std::iter::once(def.code.clone()).chain(span)
        });
        for code in indexes {
            let st = opened.store.index_stats(rtype, &code)?;
            if st.resources == 0 {
                continue;
            }
            let r = st.resources as f64;
            let c = r / space;
            let hi = r.sqrt();
            let verdict = if st.resources < min_resources {
                "too few to judge"
            } else if c < 2.0 {
                out_of_band += 1;
                "BELOW band: tokens nearly unique, equal tokens likely mean equal values"
            } else if c > hi {
                out_of_band += 1;
                "ABOVE band: tokens too coarse, searches decrypt many false candidates"
            } else if st.max_rows_per_token * 2 > st.resources {
                // DR3's band bounds coincidence among distinct values; a field with few
                // values (status, gender) still shows its value distribution
                "in band (low-cardinality: token frequencies show the value distribution)"
            } else {
                "in band"
            };
            println!(
                "{rtype}.{code}\t{}\t{c:.2}\t[2, {hi:.1}]\t{}\t{}\t{verdict}",
                st.resources, st.distinct_tokens, st.max_rows_per_token
            );
        }
    }
    opened.store.close();
    if out_of_band > 0 {
        println!(
            "index check: {out_of_band} index(es) outside the band for {bits}-bit tokens (plan --index-bits for the expected population)"
        );
        return Ok(1);
    }
    println!("index check: OK");
    Ok(0)
}

/// Working hours (UTC) of the after-hours rule.
#[derive(clap::Args, Debug)]
struct HoursArgs {
    /// First working hour (UTC).
    #[arg(long, default_value_t = 7)]
    start_hour: u64,
    /// First hour after work (UTC).
    #[arg(long, default_value_t = 19)]
    end_hour: u64,
    /// Saturdays and Sundays are working days.
    #[arg(long)]
    weekends: bool,
}

impl HoursArgs {
    fn check(&self) -> Result<phivault_records::snoop::Hours> {
        anyhow::ensure!(
            self.start_hour < self.end_hour && self.end_hour <= 24,
            "working hours: 0 ≤ start < end ≤ 24"
        );
        Ok(phivault_records::snoop::Hours {
            start: self.start_hour,
            end: self.end_hour,
            weekends: self.weekends,
        })
    }
}

/// How a running server watches its audit log (see `phivault_records::watch`).
#[derive(clap::Args, Debug)]
struct WatchArgs {
    /// Run the snooping rules over new audit events every this many seconds (10 – 86400).
    #[arg(long, default_value_t = 300)]
    scan_every: u64,
    #[command(flatten)]
    hours: HoursArgs,
    /// Append every signed audit checkpoint to this file (another volume, append-only) for
    /// `audit verify --witness`.
    #[arg(long)]
    witness_file: Option<PathBuf>,
    /// Send new alerts to this syslog socket (RFC 5424 datagrams, e.g. /dev/log).
    #[arg(long)]
    alert_syslog: Option<PathBuf>,
}

impl WatchArgs {
    fn check(self) -> Result<phivault_records::watch::Watch> {
        anyhow::ensure!(
            (10..=86_400).contains(&self.scan_every),
            "refusing to start: --scan-every is 10 to 86400 seconds"
        );
        Ok(phivault_records::watch::Watch {
            scan_every: std::time::Duration::from_secs(self.scan_every),
            hours: self
                .hours
                .check()
                .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?,
            witness_file: self.witness_file,
            alert_syslog: self.alert_syslog,
        })
    }
}

/// How often the server writes audit checkpoints and how long it trusts what it read
/// (defaults for production; tests shorten them instead of waiting).
#[derive(clap::Args, Debug)]
struct TimingArgs {
    /// Write a signed audit checkpoint at most every this many milliseconds while events
    /// come (50 – 3600000).
    #[arg(long, default_value_t = phivault_store::sqlite::CHECKPOINT_INTERVAL_MS)]
    checkpoint_every_ms: u64,
    /// Re-read a person's account (disabled, role changed) at most every this many
    /// milliseconds: their tokens are refused within it (0 – 60000).
    #[arg(long, default_value_t = 2_000)]
    account_recheck_ms: u64,
    /// Fetch an identity provider's key set again for an unknown `kid` at most every this
    /// many milliseconds (100 – 3600000).
    #[arg(long, default_value_t = 5_000)]
    idp_refetch_ms: u64,
}

impl TimingArgs {
    fn check(self) -> Result<phivault_server::Freshness> {
        anyhow::ensure!(
            (50..=3_600_000).contains(&self.checkpoint_every_ms),
            "refusing to start: --checkpoint-every-ms is 50 to 3600000"
        );
        anyhow::ensure!(
            self.account_recheck_ms <= 60_000,
            "refusing to start: --account-recheck-ms is 0 to 60000"
        );
        anyhow::ensure!(
            (100..=3_600_000).contains(&self.idp_refetch_ms),
            "refusing to start: --idp-refetch-ms is 100 to 3600000"
        );
        Ok(phivault_server::Freshness {
            account_recheck_ms: self.account_recheck_ms,
            idp_refetch_ms: self.idp_refetch_ms,
            ..Default::default()
        })
    }
}

fn serve(
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

fn client_add(
    data_dir: &Path,
    name: &str,
    scope: &str,
    out: Option<&Path>,
    token_url: &str,
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
    };
    record
        .validate()
        .map_err(|e| anyhow::anyhow!("client record invalid: {e}"))?;
    opened.store.set_meta(
        &phivault_records::registrations::client_meta_key(&client_id),
        &serde_json::to_vec(&record)?,
    )?;
    opened.store.close();
    let private_json: serde_json::Value = serde_json::from_str(
        &private
            .to_json_string()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    )?;
    let creds = serde_json::json!({
        "client_id": client_id,
        "name": name,
        "scope": scopes.to_string(),
        "token_url": token_url,
        "private_jwk": private_json,
    });
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

fn app_add(
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

fn user_cmd(cmd: UserCmd) -> Result<i32> {
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

/// The server's state for `origin`: resource operations over the opened store and the
/// token issuer and verifier under the data directory's signing key.
fn app_at(opened: &datadir::Opened, origin: &str) -> Result<phivault_server::App> {
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
fn vault_at(opened: &datadir::Opened, origin: &str) -> Arc<phivault_records::Vault> {
    let engine = phivault_records::Engine::new(opened.store.clone(), opened.keys.clone());
    phivault_records::Vault::new(engine, origin)
}

/// `phivault audit scan`: the rules over the events after the last scanned position
/// (see `phivault_records::snoop::run`); prints what it raised.
fn audit_scan(opened: &datadir::Opened, hours: phivault_records::snoop::Hours) -> Result<i32> {
    // no listener: nothing is issued to the placeholder origin
    let vault = vault_at(opened, "https://localhost");
    let summary = phivault_records::snoop::run(&vault, hours)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(0)
}

/// `phivault audit report`: the events the filters pass, in log order.
fn audit_report(
    data_dir: &Path,
    filters: [(&str, Option<String>); 5],
    format: &str,
) -> Result<i32> {
    use phivault_records::report::{CSV_HEADER, Filter, csv_line, to_fhir};
    use std::io::Write as _;
    let query: Vec<String> = filters
        .iter()
        .filter_map(|(k, v)| {
            v.as_ref()
                .map(|v| format!("{k}={}", phivault_auth::percent_encode(v)))
        })
        .collect();
    let filter = Filter::parse(Some(&query.join("&"))).map_err(|e| {
        let why: Vec<&str> = e.issues.iter().map(|i| i.message.as_str()).collect();
        anyhow::anyhow!("invalid filter: {}", why.join("; "))
    })?;
    if format != "csv" && format != "json" {
        anyhow::bail!("--format is csv or json");
    }
    let d = datadir::DataDir::new(data_dir);
    let store = phivault_store::sqlite::SqliteStore::open_read_only(&d.db())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if format == "csv" {
        writeln!(out, "{CSV_HEADER}")?;
    }
    let mut failed = None;
    store.scan_audit(&mut |s| {
        let e = match phivault_audit::AuditEvent::decode(&s.event) {
            Ok(e) => e,
            Err(_) => {
                failed = Some(s.seq);
                return false;
            }
        };
        if !filter.matches(&e) {
            return true;
        }
        let line = if format == "json" {
            to_fhir(s.seq, &e).to_string()
        } else {
            csv_line(s.seq, &e)
        };
        writeln!(out, "{line}").is_ok()
    })?;
    out.flush()?;
    if let Some(seq) = failed {
        eprintln!("phivault: the audit event at position {seq} does not decode; run audit verify");
        return Ok(1);
    }
    Ok(0)
}

fn audit_verify(data_dir: &Path, witness: Option<&Path>) -> Result<i32> {
    use phivault_audit::{StoredEvent, merkle::Checkpoint, verify};
    /// The data directory's store and the witness file, read as the verification asks.
    struct Files<'a> {
        store: phivault_store::sqlite::SqliteStore,
        witness: Option<&'a Path>,
    }
    impl verify::Source for Files<'_> {
        type Error = anyhow::Error;
        fn signed_head(&mut self) -> Result<Option<verify::SignedHead>> {
            Ok(self.store.audit_head()?.map(|h| verify::SignedHead {
                size: h.size,
                hash: h.hash,
                signature: h.signature,
            }))
        }
        fn stored_checkpoints(&mut self) -> Result<Vec<Checkpoint>> {
            Ok(self.store.audit_checkpoints(0, usize::MAX)?)
        }
        fn witness(&mut self) -> Result<Option<String>> {
            self.witness
                .map(|w| {
                    std::fs::read_to_string(w)
                        .with_context(|| format!("cannot read the witness file {}", w.display()))
                })
                .transpose()
        }
        fn scan(&mut self, visit: &mut dyn FnMut(StoredEvent) -> bool) -> Result<()> {
            Ok(self.store.scan_audit(visit)?)
        }
    }
    let d = datadir::DataDir::new(data_dir);
    let public = datadir::load_keys(&d)?.1.public_key();
    let store = phivault_store::sqlite::SqliteStore::open_read_only(&d.db())?;
    match verify::verify_log(&mut Files { store, witness }, &public)? {
        Ok(report) => {
            println!("audit verify: OK: {report}");
            Ok(0)
        }
        Err(failure) => {
            println!("audit verify: FAILED: {failure}");
            Ok(1)
        }
    }
}
