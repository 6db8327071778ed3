//! The records as a bulk export reads them (FHIR Bulk Data `$export`): every current
//! record of a type that an [`Access`] reaches, in store order, as stored — the one door
//! still decides (`Access::admits_row` before anything is decrypted), erased patients'
//! rows are skipped, a record that fails its integrity check is reported, never returned.

use phivault_store::{Candidates, VersionRow};

use crate::access::Access;
use crate::{Error, Vault};

/// Records read per store query.
const BATCH: usize = 512;

/// One record read for an export.
pub enum Item<'a> {
    /// A current record: its row (without the ciphertext's use) and its JSON as stored.
    Record(&'a VersionRow, Vec<u8>),
    /// A record that failed its integrity check (its type and id only).
    Damaged {
        /// Its type.
        rtype: &'a str,
        /// Its id.
        id: &'a str,
    },
}

/// Visit every current record of `access`'s type that it reaches, written after
/// `since_ms` when given; `visit` answers false to stop. Ok(false) when stopped.
pub fn each_current(
    vault: &Vault,
    access: &Access,
    since_ms: Option<i64>,
    visit: &mut dyn FnMut(Item<'_>) -> bool,
) -> Result<bool, Error> {
    let store = vault.engine.store();
    let mut after: Option<String> = None;
    loop {
        let ids = store
            .candidates(access.rtype(), &Candidates::All, after.as_deref(), BATCH)
            .map_err(Error::from_store)?;
        let Some(last) = ids.last().cloned() else {
            return Ok(true);
        };
        let rows = store
            .current_many(access.rtype(), &ids)
            .map_err(Error::from_store)?;
        for row in rows.into_iter().flatten() {
            if row.deleted
                || since_ms.is_some_and(|s| row.updated_ms <= s)
                || !access.admits_row(&row)
            {
                continue;
            }
            let item = match vault.engine.open(access, &row) {
                Ok(body) => Item::Record(&row, body),
                Err(e) if e.is_erased() => continue,
                Err(e) if e.is_integrity() => {
                    if vault.engine.is_erased(&row.key_id)? {
                        continue;
                    }
                    Item::Damaged {
                        rtype: &row.rtype,
                        id: &row.id,
                    }
                }
                Err(e) => return Err(e),
            };
            if !visit(item) {
                return Ok(false);
            }
        }
        after = Some(last);
    }
}

/// Every current record of `access`'s type belonging to `patient` (a Group's member),
/// written after `since_ms` when given.
pub fn each_of_patient(
    vault: &Vault,
    access: &Access,
    patient: &str,
    since_ms: Option<i64>,
    visit: &mut dyn FnMut(Item<'_>) -> bool,
) -> Result<bool, Error> {
    let mut stopped = false;
    let r = crate::search::stream_compartment(vault, access, patient, &mut |s| match s {
        crate::search::Streamed::Record(l) => {
            if since_ms.is_some_and(|t| l.row.updated_ms <= t) {
                return true;
            }
            let go = visit(Item::Record(&l.row, l.body));
            stopped = !go;
            go
        }
        crate::search::Streamed::Damaged { rtype, id } => {
            let go = visit(Item::Damaged {
                rtype: &rtype,
                id: &id,
            });
            stopped = !go;
            go
        }
    })?;
    Ok(r && !stopped)
}
