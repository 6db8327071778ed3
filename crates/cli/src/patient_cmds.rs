//! `phivault patient erase`: erasure of a patient's records by crypto-shredding, offline
//! (`phivault_records::erase`). It holds the data directory's serve lock for its whole run,
//! so it is refused while a server uses the directory (naming the holder), and no server
//! starts meanwhile. The erasure's audit event names no person: the client is
//! [`OPERATOR`], the source `local`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use phivault_audit::{Action, AuditEvent, Outcome};

use crate::datadir;

/// The client id of erasures made with the command line.
pub const OPERATOR: &str = "phivault-cli";

/// `phivault patient erase --data-dir DIR --patient ID --reason TEXT`.
pub fn erase(data_dir: &Path, patient: &str, reason: &str) -> Result<i32> {
    let d = datadir::DataDir::new(data_dir);
    datadir::check_dir_private(data_dir)?;
    let _lock =
        datadir::lock_for_serving(&d).context("cannot erase while the data directory is in use")?;
    let opened = datadir::open(data_dir)?;
    let store: Arc<dyn phivault_store::Store> = opened.store.clone();
    let engine = phivault_records::Engine::new(store, opened.keys.clone());
    let r = erase_with(&engine, patient, reason);
    drop(engine);
    opened.store.close();
    match r {
        Ok(done) => {
            println!(
                "erased patient {patient}: their data key was destroyed; {} resources can no longer be opened, {} index postings removed",
                done.resources, done.postings
            );
            if !done.wal_truncated {
                eprintln!(
                    "warning: the write-ahead log could not be emptied; it is when the store is next closed"
                );
            }
            Ok(0)
        }
        Err(e) => bail!("patient {patient} was not erased: {}", message(&e)),
    }
}

/// Erase `patient` through `engine` as the operator (an audited erasure with
/// [`OPERATOR`] as its client, from `local`).
pub fn erase_with(
    engine: &phivault_records::Engine,
    patient: &str,
    reason: &str,
) -> Result<phivault_records::erase::Erased, phivault_records::Error> {
    let request_id = phivault_records::engine::new_id();
    let event = AuditEvent {
        time_ms: u64::try_from(phivault_records::engine::now_ms()).unwrap_or(0),
        request_id: request_id.clone(),
        client_id: Some(OPERATOR.to_owned()),
        user: None,
        action: Action::D,
        interaction: "erase".to_owned(),
        resource_type: Some("Patient".to_owned()),
        resource_id: Some(patient.to_owned()),
        version: None,
        patient: Some(patient.to_owned()),
        outcome: Outcome::from_http(200),
        source: "local".to_owned(),
        entities: Vec::new(),
        detail: Default::default(),
        writes: Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|_| phivault_records::Error::unavailable())?;
    rt.block_on(engine.erase_patient(patient, reason, &request_id, vec![event]))
}

/// The first issue's message (value-free).
fn message(e: &phivault_records::Error) -> String {
    e.issues
        .first()
        .map_or_else(|| e.to_string(), |i| i.message.clone())
}
