//! The command line: every command and its arguments (clap), and the checks of the
//! serve options that need no data directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "phivault",
    version,
    about = "A FHIR R4 health-records server that stays safe when its storage leaks"
)]
pub struct Cli {
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// How a command unlocks a data directory's master key when its provider needs a secret
/// (never from argv or the environment).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct UnlockArgs {
    /// The passphrase of a `passphrase` key provider: the first line of this file (mode
    /// 0600, e.g. a systemd credential). Default: $CREDENTIALS_DIRECTORY/phivault-passphrase,
    /// else asked on the terminal.
    #[arg(long, global = true, conflicts_with = "passphrase_fd")]
    pub passphrase_file: Option<PathBuf>,
    /// The passphrase from this inherited file descriptor.
    #[arg(long, global = true)]
    pub passphrase_fd: Option<u32>,
    /// The user PIN of a `pkcs11` key provider's token: the first line of this file (mode
    /// 0600, e.g. a systemd credential). Default: $CREDENTIALS_DIRECTORY/phivault-pkcs11-pin,
    /// else asked on the terminal.
    #[arg(long, global = true)]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// The shares of a `shamir` key provider: this file (mode 0600), one share a line
    /// (`unseal`, and offline commands on a shamir data directory). Default: asked on the
    /// terminal.
    #[arg(long, global = true)]
    pub share_file: Option<PathBuf>,
}

/// Where the `pkcs11` provider's key is: the HSM's module, the token and the key (labels).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Pkcs11Args {
    /// The HSM vendor's PKCS#11 module (a shared library), e.g.
    /// /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long)]
    pub pkcs11_module: Option<PathBuf>,
    /// The token's label.
    #[arg(long)]
    pub pkcs11_token: Option<String>,
    /// The label of the AES-256 key in the token that wraps the master key (generated,
    /// non-extractable, if the token has none of that label).
    #[arg(long)]
    pub pkcs11_key: Option<String>,
}

/// Which AWS KMS key wraps the `aws-kms` provider's master key. Credentials come the AWS
/// way: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), else
/// ~/.aws/credentials (profile AWS_PROFILE, else default).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KmsArgs {
    /// The KMS key: key id, key ARN, alias/NAME or alias ARN.
    #[arg(long)]
    pub kms_key_id: Option<String>,
    /// The key's region. Default: AWS_REGION, AWS_DEFAULT_REGION, else the key ARN's.
    #[arg(long)]
    pub kms_region: Option<String>,
    /// The KMS endpoint (https://host[:port]; plain http only on loopback, for tests).
    /// Default: https://kms.REGION.amazonaws.com.
    #[arg(long)]
    pub kms_endpoint: Option<String>,
    /// PEM CA certificates to trust for the endpoint (a private CA) instead of the
    /// public roots.
    #[arg(long)]
    pub kms_ca_file: Option<PathBuf>,
}

/// Where `init` (or a first `serve`) puts a new master key.
#[derive(clap::Args, Debug, Clone)]
pub struct KeyArgs {
    /// file (a key file outside the data directory), passphrase (the key wrapped under
    /// Argon2id of a passphrase), pkcs11 (the key wrapped by a non-extractable AES key in an
    /// HSM) or aws-kms (the key wrapped by an AWS KMS key).
    #[arg(long, default_value = "file")]
    pub key_provider: String,
    /// The key file of the `file` provider (outside the data directory). Default:
    /// $XDG_CONFIG_HOME/phivault/ID.key (else ~/.config/phivault/ID.key).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// shamir: split the master key into this many shares (2 – 16), printed once.
    #[arg(long)]
    pub shares: Option<u8>,
    /// shamir: how many shares rebuild the key (2 – --shares).
    #[arg(long)]
    pub threshold: Option<u8>,
    /// pkcs11: the master key wrapped by a non-extractable AES key in an HSM.
    #[command(flatten)]
    pub pkcs11: Pkcs11Args,
    /// aws-kms: the master key wrapped by an AWS KMS key (envelope encryption).
    #[command(flatten)]
    pub kms: KmsArgs,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Create a data directory: master key, development CA and server certificate, signing keys, empty database.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// Width in bits of blind-index tokens. Plan it for the expected number of
        /// resources R per type: the coincidence band 2 <= R/2^bits <= sqrt(R) of DR3
        /// (16 bits suits 131 thousand to 4 billion resources); see `index check`.
        #[arg(long, default_value_t = phivault_records::DEFAULT_INDEX_BITS)]
        index_bits: u32,
        #[command(flatten)]
        key: KeyArgs,
        /// Keep the store in this PostgreSQL database (`postgres://USER@HOST:PORT/DB`, an
        /// empty database; loopback or a Unix socket) instead of the embedded SQLite file.
        /// The URL is recorded in DIR/database.json; several nodes use copies of DIR.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// A file holding the database password (default: PGPASSFILE or ~/.pgpass). A
        /// password is never taken from the URL or the command line.
        #[arg(long, requires = "database", value_name = "FILE")]
        database_password_file: Option<PathBuf>,
    },
    /// Key providers and key management.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Export records offline as NDJSON files, each encrypted end to end to a recipient's
    /// public key (JWE ECDH-ES + A256GCM), with a progress bar on a terminal. Audited.
    Export {
        #[arg(long)]
        data_dir: PathBuf,
        /// A new directory for the files (made owner-only).
        #[arg(long)]
        out: PathBuf,
        /// The recipient's public EC JWK (P-256 or P-384): only its private half opens the files.
        #[arg(long, value_name = "FILE")]
        recipient_key: PathBuf,
        /// Only these types (comma-separated).
        #[arg(long = "type", value_name = "TYPES")]
        types: Option<String>,
        /// Only what was written after this instant (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only records that belong to a patient (every patient's compartment).
        #[arg(long)]
        patients_only: bool,
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
        #[command(flatten)]
        backup: crate::backup_args::ServeBackupArgs,
        #[command(flatten)]
        sharing: SharingArgs,
        /// On the first run (a new data directory), keep its store in this PostgreSQL
        /// database (`postgres://USER@HOST:PORT/DB`, empty) instead of the embedded file;
        /// as `init --database`. Later runs read it from DIR/database.json.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// A file holding the database password (default: PGPASSFILE or ~/.pgpass).
        #[arg(long, requires = "database", value_name = "FILE")]
        database_password_file: Option<PathBuf>,
    },
    /// Unseal a running server of a `shamir` data directory: send it shares (from
    /// --share-file, else asked on the terminal) over its control socket DIR/control.sock.
    /// Exit 0 unsealed, 1 still sealed (more shares needed), 2 a share was refused.
    Unseal {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Seal a running server of a `shamir` data directory: it drops its keys and store and
    /// answers 503 until unsealed again.
    Seal {
        #[arg(long)]
        data_dir: PathBuf,
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
    /// Print an access token for a back-end client: signs a client assertion with the key
    /// in its credentials file (`client add --out`) and asks the server's token endpoint
    /// over TLS. Use it as `curl -H "Authorization: Bearer $(phivault token --client F)"`.
    Token {
        /// The credentials file written by `client add --out`.
        #[arg(long)]
        client: PathBuf,
        /// Scopes to ask for (default: all the client was registered with).
        #[arg(long)]
        scope: Option<String>,
        /// PEM file of the CA of the server's certificate (default: the CA recorded in the
        /// credentials file for a loopback server, else the system's roots).
        #[arg(long)]
        ca_file: Option<PathBuf>,
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
    /// Load files into a running server through its FHIR API: transaction or batch Bundles
    /// (.json) and NDJSON (.ndjson, one resource a line: `PUT Type/id`), several at a time,
    /// resumable: a rerun of the same command skips what the server acknowledged.
    Import {
        /// The credentials file written by `client add --out`.
        #[arg(long)]
        client: PathBuf,
        /// PEM file of the CA of the server's certificate (default: the CA recorded in the
        /// credentials file, else the system's roots).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Files sent at the same time (1 – 64).
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// The resume file (default: NAME.phivault-import.json beside the first input NAME).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Files, or directories whose *.json and *.ndjson files are imported in name order.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Check a data directory offline: the audit log against its signed head, its
    /// checkpoints and a witness file, and the whole store against the log and the state
    /// signed with it — every current row, version, tombstone, index posting and settings
    /// row. Names every discrepancy (ids, keys and kinds, never PHI). Exit 0 when all
    /// holds, 1 when not.
    Verify {
        #[arg(long)]
        data_dir: PathBuf,
        /// A witness file of checkpoints (`serve --witness-file`, `audit checkpoints`),
        /// kept where the server cannot rewrite it.
        #[arg(long)]
        witness: Option<PathBuf>,
    },
    /// Move a stopped data directory's embedded store into an empty PostgreSQL database,
    /// row for row, without opening a record; the directory then serves from the database
    /// (`DIR/database.json`), its SQLite file kept beside it renamed `.migrated`.
    Migrate {
        /// The data directory (its server stopped).
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// The database: `postgres://USER@HOST:PORT/DB` (loopback or a Unix socket).
        #[arg(long, value_name = "URL")]
        to: String,
        /// A file holding the database password (default: PGPASSFILE or ~/.pgpass).
        #[arg(long, value_name = "FILE")]
        database_password_file: Option<PathBuf>,
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
    /// Patient record tools.
    Patient {
        #[command(subcommand)]
        cmd: PatientCmd,
    },
    /// Encrypted backups: take one now, drill a restore, list restore points, show the
    /// shipping state.
    Backup {
        #[command(subcommand)]
        cmd: crate::backup_args::BackupCmd,
    },
    /// Restore a backup into a new data directory (point in time: --at or --at-audit-seq),
    /// verify it, and re-apply every erasure made since the point.
    Restore {
        #[command(flatten)]
        source: crate::backup_args::SourceArgs,
        /// The new data directory (its parent must exist; it must not).
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        at: crate::backup_args::AtArgs,
    },
}

#[derive(Subcommand)]
pub enum PatientCmd {
    /// Erase a patient's records by crypto-shredding: their data key is destroyed, so every
    /// version sealed under it opens no more (410 Gone), their index postings are removed
    /// and the erasure is audited (the reason sealed). Offline: refused while a server
    /// holds the data directory.
    Erase {
        #[arg(long)]
        data_dir: PathBuf,
        /// The patient's id.
        #[arg(long)]
        patient: String,
        /// Why (kept sealed with the erasure, never in the audit log in clear).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Where the master key comes from (provider, place, since when).
    Status {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Move the master key to another provider (rewraps the master key only; records are
    /// untouched). Also moves a `master.key` kept inside the data directory (older
    /// versions) out of it. Run while no server uses the directory.
    Migrate {
        #[arg(long)]
        data_dir: PathBuf,
        /// file, passphrase, pkcs11 or aws-kms.
        #[arg(long = "to")]
        to: String,
        /// The new key file (the `file` provider; outside the data directory).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The new passphrase (the `passphrase` provider): first line of this file.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
        // the new HSM key (`--to pkcs11`; its PIN from --pkcs11-pin-file), boxed: the
        // other commands need not be this large
        #[command(flatten)]
        pkcs11: Box<Pkcs11Args>,
        // the new AWS KMS key (`--to aws-kms`)
        #[command(flatten)]
        kms: KmsArgs,
    },
    /// Rotate a key while no server uses the directory: `kek` makes a new generation of the
    /// key-encryption key, rewraps every data key under it and destroys the older ones
    /// (a running server: `POST /admin/keys/rotate-kek`). Audited.
    Rotate {
        /// What to rotate: kek.
        #[arg(value_enum)]
        what: RotateWhat,
        #[arg(long)]
        data_dir: PathBuf,
        /// Data keys rewrapped per write (default 256).
        #[arg(long)]
        batch: Option<usize>,
    },
}

/// What `keys rotate` rotates.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RotateWhat {
    /// The key-encryption key that wraps every patient's data key.
    Kek,
}

#[derive(Subcommand)]
pub enum IndexCmd {
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
pub enum ClientCmd {
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
        /// A public EC JWK (P-256 or P-384) of the client's: its bulk exports are then
        /// encrypted end to end to it (JWE ECDH-ES + A256GCM; only its private half opens them).
        #[arg(long, value_name = "FILE")]
        export_key: Option<PathBuf>,
    },
    /// Disable a client: it gets no new tokens from its next request on (a running server,
    /// every node, sees it at once); tokens already issued live until they expire (≤ 5
    /// minutes).
    Disable {
        #[arg(long)]
        data_dir: PathBuf,
        /// The client's id (as `client add` printed it).
        #[arg(long)]
        client_id: String,
    },
}

#[derive(Subcommand)]
pub enum AppCmd {
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
pub enum UserCmd {
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
pub enum IdpCmd {
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
pub enum AuditCmd {
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

/// Working hours (UTC) of the after-hours rule.
#[derive(clap::Args, Debug)]
pub struct HoursArgs {
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
    pub fn check(&self) -> Result<phivault_records::snoop::Hours> {
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
pub struct WatchArgs {
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
    /// Check the whole store against the signed state every this many seconds, paced
    /// beside requests (the first check a few seconds after start; 1 – 86400).
    #[arg(long, default_value_t = 3600)]
    verify_every: u64,
}

impl WatchArgs {
    pub fn check(self) -> Result<phivault_records::watch::Watch> {
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
            verify_every: {
                anyhow::ensure!(
                    (1..=86_400).contains(&self.verify_every),
                    "refusing to start: --verify-every is 1 to 86400 seconds"
                );
                std::time::Duration::from_secs(self.verify_every)
            },
            // (set once the keys are open: `serve`)
            audit_key: None,
        })
    }
}

/// How often the server writes audit checkpoints and how long it trusts what it read
/// (defaults for production; tests shorten them instead of waiting).
#[derive(clap::Args, Debug)]
pub struct TimingArgs {
    /// Write a signed audit checkpoint at most every this many milliseconds while events
    /// come (50 – 3600000).
    #[arg(long, default_value_t = phivault_store::sqlite::CHECKPOINT_INTERVAL_MS)]
    pub checkpoint_every_ms: u64,
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
    pub fn check(self) -> Result<phivault_server::Freshness> {
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

/// Trusted sharing: share links and bulk exports.
#[derive(Debug, Clone, clap::Args)]
pub struct SharingArgs {
    /// Where share links' files and export files are kept, sealed (default DIR/exchange;
    /// several nodes must share one, e.g. on a shared filesystem).
    #[arg(long, value_name = "DIR")]
    pub exchange_dir: Option<PathBuf>,
    /// How long a finished export's files may be fetched (seconds).
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    pub export_expiry_s: u64,
}
