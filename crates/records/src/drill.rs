//! What a restore asks of the records (issue 19): a sample of current records opened with
//! the restored keys, and the erasures a restored store lacks.

use phivault_auth::Interaction;
use phivault_store::Candidates;

use crate::Error;
use crate::access::Access;
use crate::engine::{Engine, key_patient};

/// Records opened by [`Engine::sample_records`].
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// Opened.
    pub opened: u64,
    /// Not opened because their patient was erased.
    pub erased: u64,
    /// Neither: `Type/id` of each (no content).
    pub failed: Vec<String>,
}

impl Engine {
    /// Open up to `per_type` current records of every type; a record that does not open,
    /// unless erased, is a failure.
    pub fn sample_records(&self, per_type: usize) -> Result<Sample, Error> {
        let mut s = Sample::default();
        let store = self.store();
        for rtype in phivault_fhir::resource_types() {
            let ids = store
                .candidates(rtype, &Candidates::All, None, per_type)
                .map_err(Error::from_store)?;
            if ids.is_empty() {
                continue;
            }
            let access = Access::internal(rtype, Interaction::Read);
            for row in store
                .current_many(rtype, &ids)
                .map_err(Error::from_store)?
                .into_iter()
                .flatten()
            {
                if row.deleted {
                    continue;
                }
                match self.open(&access, &row) {
                    Ok(_) => s.opened += 1,
                    Err(e) if e.is_erased() => s.erased += 1,
                    Err(_) => s.failed.push(format!("{}/{}", row.rtype, row.id)),
                }
            }
        }
        Ok(s)
    }

    /// The patients whose data key is still here though `erased_elsewhere` says it was
    /// erased (a store restored from before their erasure).
    pub fn missing_erasures(
        &self,
        erased_elsewhere: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<String>, Error> {
        let store = self.store();
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .data_keys_after(after, 1000)
                .map_err(Error::from_store)?;
            let Some(last) = page.last().map(|(n, _, _)| *n) else {
                return Ok(out);
            };
            for (_, key_id, wrapped) in page {
                if wrapped.is_empty() || !erased_elsewhere(&key_id) || self.is_erased(&key_id)? {
                    continue;
                }
                if let Some(patient) = key_patient(&key_id) {
                    out.push(patient.to_owned());
                }
            }
            after = last;
        }
    }
}
