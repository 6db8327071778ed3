//! `phivault export`: the operator's offline bulk export — every record of the types asked
//! (or every patient's compartment), written as NDJSON files each encrypted end to end to
//! a recipient's public key (JWE `ECDH-ES` + `A256GCM`: only the holder of the private half
//! opens them; nothing is written in plaintext), with a progress bar on a terminal, a
//! `manifest.json` of types and counts, and one audit event naming every patient exported.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use phivault_audit::{Action, AuditEvent, Outcome};
use phivault_records::Access;
use phivault_share::export::files::{Files, Target};
use phivault_share::export::job::Level;
use phivault_share::export::run::{self, Plan, Progress};

use crate::datadir;

/// What `phivault export` is asked for.
pub(crate) struct ExportArgs<'a> {
    pub data_dir: &'a Path,
    pub out: &'a Path,
    pub recipient_key: &'a Path,
    pub types: Option<&'a str>,
    pub since: Option<&'a str>,
    pub patients_only: bool,
}

/// The client id of exports made with the command line.
const OPERATOR: &str = "phivault-cli";

pub(crate) fn export(a: &ExportArgs<'_>) -> Result<i32> {
    let jwk: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.recipient_key)
            .with_context(|| format!("cannot read {}", a.recipient_key.display()))?,
    )
    .map_err(|_| anyhow::anyhow!("--recipient-key: not a JWK (JSON)"))?;
    let key = phivault_share::export::encryption_key(&jwk)
        .map_err(|e| anyhow::anyhow!("--recipient-key: {e}"))?;
    if std::fs::symlink_metadata(a.out).is_ok() {
        bail!(
            "{} exists; refusing to write an export over it (choose a new --out)",
            a.out.display()
        );
    }
    let opened = datadir::open(a.data_dir)?;
    let vault = crate::serve::vault_at(&opened, "https://localhost");
    // (the arguments checked before anything is made)
    let plan = plan(&opened.keys, a)?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(a.out)
            .with_context(|| format!("cannot create {}", a.out.display()))?;
    }

    let mut files = Files::new(Target::Dir(a.out.to_path_buf()), Some(key))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let progress = Progress::default();
    let bar = crate::progress::export();
    let started = std::time::Instant::now();
    let r = run::write(&vault, &plan, &mut files, &progress, &mut |n| {
        bar.set_position(n);
        bar.set_message(format!(
            "{}/{} types",
            progress.types_done.load(Ordering::Relaxed),
            plan.types.len()
        ));
        true
    });
    bar.finish_and_clear();
    let written = progress.resources.load(Ordering::Relaxed);
    let audited = audit(&vault, &files, r.is_ok(), a);
    opened.store.close();
    if r.is_err() || audited.is_err() {
        // files not recorded in the audit log (or half written) do not stay
        let _ = std::fs::remove_dir_all(a.out);
    }
    r.map_err(|e| anyhow::anyhow!("the export failed: {e}"))?;
    audited?;
    let patients = files.patients.len();
    let (out, errors) = files.into_parts();
    let manifest = serde_json::json!({
        "output": out.iter().map(|f| serde_json::json!({"type": f.rtype, "count": f.count, "file": f.name})).collect::<Vec<_>>(),
        "error": errors.iter().map(|f| serde_json::json!({"type": f.rtype, "count": f.count, "file": f.name})).collect::<Vec<_>>(),
        "encryption": {"alg": "ECDH-ES", "enc": "A256GCM", "cty": "application/fhir+ndjson"},
    });
    std::fs::write(
        a.out.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    let secs = started.elapsed().as_secs_f64().max(0.001);
    println!(
        "exported {written} resources of {patients} patients in {} files to {} in {secs:.1} s ({:.0} resources/s), each encrypted to the recipient's key",
        out.len(),
        a.out.display(),
        written as f64 / secs
    );
    if !errors.is_empty() {
        eprintln!(
            "warning: some records failed their integrity check and were not exported; see the error files"
        );
    }
    Ok(0)
}

/// The types (every one, or those named) and the level.
fn plan(keys: &phivault_crypto::KeyHierarchy, a: &ExportArgs<'_>) -> Result<Plan> {
    let named: Option<Vec<&str>> = a.types.map(|t| {
        t.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect()
    });
    let types: Vec<&str> = match named {
        Some(list) => {
            for t in &list {
                if !phivault_fhir::is_known_resource_type(t) {
                    bail!("--type: {t} is not a FHIR R4 resource type");
                }
            }
            list
        }
        None => phivault_fhir::resource_types()
            .filter(|t| !a.patients_only || phivault_records::access::in_compartment(t))
            .collect(),
    };
    let since_ms = match a.since {
        Some(s) => Some(
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    anyhow::anyhow!("--since must be an instant, e.g. 2026-01-31T00:00:00Z")
                })?
                .unix_timestamp()
                * 1000,
        ),
        None => None,
    };
    Ok(Plan {
        level: if a.patients_only {
            Level::Patient
        } else {
            Level::System
        },
        types: types.iter().map(|t| Access::operator(keys, t)).collect(),
        since_ms,
        members: Vec::new(),
        client: String::new(),
    })
}

/// The audit events: the operator exported these patients' records (one event per
/// [`phivault_audit::MAX_ENTITIES`] patients, so every one is named).
fn audit(
    vault: &Arc<phivault_records::Vault>,
    files: &Files,
    ok: bool,
    a: &ExportArgs<'_>,
) -> Result<()> {
    let mut query = vec!["recipient-key".to_owned()];
    if a.types.is_some() {
        query.push("_type".into());
    }
    if a.since.is_some() {
        query.push("_since".into());
    }
    let patients: Vec<&String> = files.patients.iter().collect();
    let request_id = phivault_records::engine::new_id();
    let events: Vec<AuditEvent> = patients
        .chunks(phivault_audit::MAX_ENTITIES)
        .map(|part| part.iter().copied())
        .map(phivault_audit::Entity::patients)
        .chain(patients.is_empty().then(Vec::new))
        .enumerate()
        .map(|(i, entities)| AuditEvent {
            time_ms: u64::try_from(phivault_records::engine::now_ms()).unwrap_or(0),
            request_id: if i == 0 {
                request_id.clone()
            } else {
                format!("{request_id}-{i}")
            },
            client_id: Some(OPERATOR.to_owned()),
            user: None,
            action: Action::E,
            interaction: "export".to_owned(),
            resource_type: None,
            resource_id: None,
            version: None,
            patient: None,
            outcome: Outcome::from_http(if ok { 200 } else { 500 }),
            source: "local".to_owned(),
            entities,
            detail: phivault_audit::Detail {
                purpose: Some("HSYSADMIN".to_owned()),
                query: query.clone(),
                ..Default::default()
            },
            writes: Vec::new(),
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(vault.engine.append_audit(events))
        .map_err(|_| anyhow::anyhow!("the export's audit event could not be written"))?
        .map_err(|e| anyhow::anyhow!("the export's audit event could not be written: {e}"))?;
    Ok(())
}
