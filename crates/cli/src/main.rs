#![forbid(unsafe_code)]
//! `phivault`: the server binary and its administration commands.

mod args;
mod audit_cmds;
mod backup_args;
mod backup_cmds;
mod backup_restore;
mod backup_serve;
mod control;
mod datadir;
mod export_cmd;
mod fhir_client;
mod import;
mod kek_cmds;
mod keys_cmds;
mod migrate_cmd;
mod patient_cmds;
mod progress;
mod registry;
mod sealed;
mod serve;
mod verify_cmd;

/// mimalloc: the request path (JSON trees, sealing buffers) is allocation-heavy; glibc malloc
/// showed up as ~20% of server CPU in import profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write as _;

use anyhow::Result;
use clap::Parser;

use phivault_store::Store as _;

use args::{AppCmd, AuditCmd, Cli, ClientCmd, Cmd, IdpCmd, IndexCmd, KeysCmd};

fn main() {
    use std::io::IsTerminal as _;
    let cli = Cli::parse();
    // colour codes only for a person at a terminal, never into a log file or journal
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let code = match run(cli) {
        Ok(code) => code,
        // `phivault audit report … | head`: the reader has what it wanted
        Err(e) if reader_went_away(&e) => 0,
        Err(e) => {
            eprintln!("phivault: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

/// Whether the command failed only because its standard output was closed (EPIPE).
fn reader_went_away(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<i32> {
    let unlock = phivault_keys::Unlock {
        passphrase: match (&cli.unlock.passphrase_file, cli.unlock.passphrase_fd) {
            (Some(f), _) => phivault_keys::PassphraseSource::File(f.clone()),
            (None, Some(fd)) => phivault_keys::PassphraseSource::Fd(fd),
            (None, None) => phivault_keys::PassphraseSource::Default,
        },
        pkcs11_pin: cli.unlock.pkcs11_pin_file.clone(),
        share_file: cli.unlock.share_file.clone(),
    };
    datadir::set_unlock(unlock.clone());
    match cli.cmd {
        Cmd::Init {
            data_dir,
            index_bits,
            key,
            database,
            database_password_file,
        } => {
            let spec = keys_cmds::create_spec(&key, &unlock)?;
            let db = database.map(|url| datadir::DatabaseConfig {
                url,
                password_file: database_password_file.map(|p| std::path::absolute(&p).unwrap_or(p)),
            });
            let cfg = datadir::init(&data_dir, index_bits, &spec, db.as_ref())?;
            println!("initialised {}", data_dir.display());
            if let Some(db) = &db {
                println!("the store is in the PostgreSQL database {}", db.url);
            }
            eprintln!("{}", keys_cmds::describe(&cfg));
            keys_cmds::print_new_shares(&cfg)?;
            Ok(0)
        }
        Cmd::Keys {
            cmd: KeysCmd::Status { data_dir },
        } => keys_cmds::status(&data_dir),
        Cmd::Keys {
            cmd:
                KeysCmd::Rotate {
                    what: args::RotateWhat::Kek,
                    data_dir,
                    batch,
                },
        } => kek_cmds::rotate_kek(&data_dir, batch),
        Cmd::Keys {
            cmd:
                KeysCmd::Migrate {
                    data_dir,
                    to,
                    key_file,
                    new_passphrase_file,
                    pkcs11,
                    kms,
                },
        } => keys_cmds::migrate(
            &data_dir,
            &to,
            key_file.as_deref(),
            new_passphrase_file.as_deref(),
            &kms,
            &pkcs11,
            &unlock,
        ),
        Cmd::Export {
            data_dir,
            out,
            recipient_key,
            types,
            since,
            patients_only,
        } => export_cmd::export(&export_cmd::ExportArgs {
            data_dir: &data_dir,
            out: &out,
            recipient_key: &recipient_key,
            types: types.as_deref(),
            since: since.as_deref(),
            patients_only,
        }),
        Cmd::Serve {
            data_dir,
            listen,
            tls_cert,
            tls_key,
            public_url,
            watch,
            timing,
            backup,
            sharing,
            database,
            database_password_file,
        } => serve::serve(
            &data_dir,
            serve::Options {
                listen,
                tls_cert,
                tls_key,
                public_url,
                watch,
                timing,
                backup,
                sharing,
                database: database.map(|url| datadir::DatabaseConfig {
                    url,
                    password_file: database_password_file
                        .map(|p| std::path::absolute(&p).unwrap_or(p)),
                }),
            },
        ),
        Cmd::Client {
            cmd:
                ClientCmd::Add {
                    data_dir,
                    name,
                    scope,
                    out,
                    token_url,
                    export_key,
                },
        } => registry::client_add(
            &data_dir,
            &name,
            &scope,
            out.as_deref(),
            &token_url,
            export_key.as_deref(),
        ),
        Cmd::Client {
            cmd:
                ClientCmd::Disable {
                    data_dir,
                    client_id,
                },
        } => registry::client_disable(&data_dir, &client_id),
        Cmd::Unseal { data_dir } => control::unseal(&data_dir, cli.unlock.share_file.as_deref()),
        Cmd::Seal { data_dir } => control::seal(&data_dir),
        Cmd::User { cmd } => registry::user_cmd(cmd),
        Cmd::Idp {
            cmd:
                IdpCmd::Add {
                    data_dir,
                    issuer,
                    audience,
                    username_claim,
                    ca_file,
                },
        } => registry::idp_add(
            &data_dir,
            issuer,
            audience,
            username_claim,
            ca_file.as_deref(),
        ),
        Cmd::App {
            cmd:
                AppCmd::Add {
                    data_dir,
                    name,
                    redirect_uris,
                    scope,
                    allow_bearer,
                },
        } => registry::app_add(&data_dir, &name, redirect_uris, &scope, !allow_bearer),
        Cmd::Token {
            client,
            scope,
            ca_file,
        } => {
            let creds = fhir_client::Credentials::load(&client)?;
            let mut c = fhir_client::Client::new(creds, scope.as_deref(), ca_file.as_deref())?;
            println!("{}", c.token()?.expose());
            Ok(0)
        }
        Cmd::Synth {
            patients,
            seed,
            out,
        } => {
            let bar = progress::synth(patients as u64);
            let files = phivault_synth::write_bundles_with(
                &phivault_synth::SynthConfig { patients, seed },
                &out,
                |n| bar.set_position(n as u64),
            )?;
            bar.finish_and_clear();
            println!("wrote {} bundles to {}", files.len(), out.display());
            Ok(0)
        }
        Cmd::Import {
            client,
            ca_file,
            jobs,
            resume,
            paths,
        } => import::run(import::Options {
            client,
            ca_file,
            jobs,
            resume,
            paths,
        }),
        Cmd::Verify { data_dir, witness } => verify_cmd::verify(&data_dir, witness.as_deref()),
        Cmd::Migrate {
            from,
            to,
            database_password_file,
        } => migrate_cmd::migrate(
            &from,
            &to,
            database_password_file.map(|p| std::path::absolute(&p).unwrap_or(p)),
        ),
        Cmd::Backup { cmd } => backup_cmds::backup_cmd(cmd),
        Cmd::Restore { source, to, at } => backup_cmds::restore_cmd(&source, &to, &at),
        Cmd::Audit {
            cmd: AuditCmd::Verify { data_dir, witness },
        } => audit_cmds::audit_verify(&data_dir, witness.as_deref()),
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
        } => audit_cmds::audit_report(
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
            // each line names the key it verifies with
            let d = datadir::DataDir::new(&data_dir);
            let public = datadir::load_keys(&d)?.1.public_key();
            let store = datadir::read_only_store(&data_dir)?;
            let mut out = std::io::stdout().lock();
            for cp in store.audit_checkpoints(after, usize::MAX)? {
                writeln!(out, "{}", cp.to_line_signed_by(&public))?;
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
            let mut out = std::io::stdout().lock();
            for a in alerts?
                .iter()
                .filter(|a| status.as_ref().is_none_or(|s| &a.status == s))
            {
                writeln!(out, "{}", serde_json::to_string(a)?)?;
            }
            Ok(0)
        }
        Cmd::Audit {
            cmd: AuditCmd::Scan { data_dir, hours },
        } => {
            let hours = hours.check()?;
            let opened = datadir::open(&data_dir)?;
            let r = audit_cmds::audit_scan(&opened, hours);
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
        } => audit_cmds::index_check(&data_dir, min_resources),
        Cmd::Patient {
            cmd:
                args::PatientCmd::Erase {
                    data_dir,
                    patient,
                    reason,
                },
        } => patient_cmds::erase(&data_dir, &patient, &reason),
    }
}
