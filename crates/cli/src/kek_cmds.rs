//! `phivault keys rotate kek` (offline KEK rotation) and the KEK lines of `keys status`
//! (`phivault_records::kek`). The rotation holds the data directory's serve lock for its
//! whole run, so it is refused while a server uses the directory (rotate a running server
//! through `POST /admin/keys/rotate-kek` instead) and no server starts meanwhile. It is
//! audited: interaction `rotate-kek`, client [`OPERATOR`], source `local`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use phivault_audit::{Action, AuditEvent, Outcome};
use phivault_records::kek::{DEFAULT_REWRAP_BATCH, KeyAdmin, kek_status as read_status};

use crate::datadir;

/// The client id of the command line's audit events (as `patient erase` uses).
const OPERATOR: &str = "phivault-cli";

/// The KEK lines of `phivault keys status`: the generation and when it was made, and how
/// many data keys each generation wraps.
pub fn kek_status(data_dir: &Path) -> Result<String> {
    let store = datadir::read_only_store(data_dir)?;
    let s = read_status(&store).context("cannot read the KEK generations")?;
    let when = match s.rotated_ms {
        Some(ms) => format!("last rotated {}", phivault_records::engine::instant(ms)),
        None => "never rotated (derived from the master key)".to_owned(),
    };
    let per: Vec<String> = s
        .keys_by_generation
        .iter()
        .map(|(g, n)| format!("{n} under generation {g}"))
        .collect();
    let per = if per.is_empty() {
        "no data keys yet".to_owned()
    } else {
        per.join(", ")
    };
    Ok(format!(
        "KEK generation {}, {when}; data keys: {per}",
        s.generation
    ))
}

/// `phivault keys rotate kek --data-dir DIR`.
pub fn rotate_kek(data_dir: &Path, batch: Option<usize>) -> Result<i32> {
    let d = datadir::DataDir::new(data_dir);
    datadir::check_dir_private(data_dir)?;
    let _lock = datadir::lock_for_serving(&d).context(
        "cannot rotate offline while the data directory is in use (use POST /admin/keys/rotate-kek on the running server)",
    )?;
    let opened = datadir::open(data_dir)?;
    let store: Arc<dyn phivault_store::Store> = opened.store.clone();
    let engine = phivault_records::Engine::new(store, opened.keys.clone());
    let r = engine.rotate_kek(
        &KeyAdmin::local_operator(),
        batch.unwrap_or(DEFAULT_REWRAP_BATCH),
    );
    let status = if r.is_ok() { 200 } else { 500 };
    let event = AuditEvent {
        time_ms: u64::try_from(phivault_records::engine::now_ms()).unwrap_or(0),
        request_id: phivault_records::engine::new_id(),
        client_id: Some(OPERATOR.to_owned()),
        user: None,
        action: Action::E,
        interaction: "rotate-kek".to_owned(),
        resource_type: None,
        resource_id: None,
        version: None,
        patient: None,
        outcome: Outcome::from_http(status),
        source: "local".to_owned(),
        entities: Vec::new(),
        detail: phivault_audit::Detail {
            purpose: Some("HSYSADMIN".to_owned()),
            ..Default::default()
        },
        writes: Vec::new(),
    };
    let audited = engine.append_audit(vec![event]).blocking_recv();
    drop(engine);
    opened.store.close();
    let done = r.map_err(|e| anyhow::anyhow!("KEK rotation failed: {e}"))?;
    audited
        .context("the audit log is closed")?
        .context("the rotation's audit event could not be written")?;
    println!(
        "KEK generation {} is current: {} data keys rewrapped; destroyed generation(s) {:?}{}",
        done.generation,
        done.rewrapped,
        done.destroyed,
        if done.unreadable > 0 {
            format!(
                "; {} data keys open under no known generation",
                done.unreadable
            )
        } else {
            String::new()
        }
    );
    Ok(0)
}
