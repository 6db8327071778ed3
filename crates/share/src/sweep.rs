//! The sweeper: every [`SWEEP_EVERY`], the files of share links that have ended and of
//! exports past their expiry are dropped (their keys first, then the bytes) — on one node
//! at a time when several serve one store.

use std::sync::Arc;
use std::time::Duration;

use phivault_records::Vault;

use crate::area::Area;

/// How often the sweeper runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(20);

/// One round: what was swept (links, exports).
pub fn round(vault: &Arc<Vault>, area: &Area) -> (usize, usize) {
    if !vault.engine.lead("sharing-sweep") {
        return (0, 0);
    }
    let links = crate::links::sweep(vault, area).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the share link sweep failed");
        0
    });
    let exports = crate::export::sweep(vault, area).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the export sweep failed");
        0
    });
    (links, exports)
}

/// Run the sweeper on a thread of its own for the life of the process.
pub fn spawn(vault: Arc<Vault>, area: Area) {
    let spawned = std::thread::Builder::new()
        .name("sharing-sweep".into())
        .spawn(move || {
            loop {
                round(&vault, &area);
                std::thread::sleep(SWEEP_EVERY);
            }
        });
    if spawned.is_err() {
        tracing::error!("the sharing sweeper could not start");
    }
}
