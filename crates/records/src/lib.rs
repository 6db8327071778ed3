#![forbid(unsafe_code)]
//! phivault's records, knowing no HTTP: the [`Engine`] that seals, opens and indexes
//! resource versions, the one authorization decision ([`Access`], `access`), search over
//! the blind indexes (`search`), clinicians' treatment relationships and break-the-glass
//! (`care`), the snooping rules and their scans (`snoop`) and the background watcher
//! (`watch`), people's sealed accounts (`users`) and the stored form of records (`stored`).
//! Everything here returns [`Error`]; the HTTP crate maps it to responses in one place.

use std::sync::Arc;

pub mod access;
pub mod bulk;
pub mod care;
pub mod drill;
pub mod engine;
pub mod erase;
mod error;
pub mod kek;
pub mod nodes;
pub mod registrations;
pub mod reindex;
pub mod report;
pub mod search;
pub mod snoop;
pub mod store_check;
pub mod stored;
pub mod users;
pub mod watch;

pub use access::Access;
pub use engine::{DEFAULT_INDEX_BITS, Engine, INDEX_BITS_META};
pub use error::{Error, Kind};
pub use users::{UserDirectory, UserStoreError};

/// The records of one data directory, as every request and job shares them.
pub struct Vault {
    /// Sealing, opening, indexing; the store behind it.
    pub engine: Engine,
    /// FHIR base URL (`https://host:port/fhir`).
    pub base_url: String,
    /// Clinicians' treatment relationships and break-the-glass windows.
    pub care: care::Care,
    /// Striped locks serializing read-modify-write of one account's record.
    stripes: [parking_lot::Mutex<()>; 16],
    /// The backups' state as the binary's shipper last reported it (`None`: no backups).
    backup_status: parking_lot::RwLock<Option<serde_json::Value>>,
}

impl Vault {
    /// The records under `engine`, served at `origin` (`https://host:port`): references
    /// to `{origin}/fhir` are local.
    pub fn new(mut engine: Engine, origin: &str) -> Arc<Vault> {
        let base_url = format!("{origin}/fhir");
        engine.set_base_url(&base_url);
        Arc::new(Vault {
            engine,
            base_url,
            care: Default::default(),
            stripes: Default::default(),
            backup_status: Default::default(),
        })
    }

    /// Record the backups' state (the shipper's, with the last drill).
    pub fn set_backup_status(&self, status: serde_json::Value) {
        *self.backup_status.write() = Some(status);
    }

    /// The backups' state, if this server ships backups.
    pub fn backup_status(&self) -> Option<serde_json::Value> {
        self.backup_status.read().clone()
    }

    /// The lock serializing read-modify-write of `username`'s account record.
    pub fn account_stripe(&self, username: &str) -> &parking_lot::Mutex<()> {
        let h = username.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        &self.stripes[h % self.stripes.len()]
    }
}
