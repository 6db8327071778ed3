//! Erasure by crypto-shredding (issue 17): a patient's data key is destroyed, so every
//! version sealed under it — whatever copies of the rows remain — opens no more.
//!
//! [`Engine::erase_patient`] seals the reason (under a key derived for the patient's key
//! id: the reason may name the patient, so it is never in the audit log in clear), keeps it
//! with the erasure's marker, and asks the store to destroy the key in one transaction with
//! the audit events recording it ([`phivault_store::Store::erase_key`]: the wrapped key
//! overwritten and deleted with `secure_delete`, the index postings of the patient's
//! records removed, the write-ahead log truncated). From then on the marker wins: the key
//! id is never unwrapped nor sealed under again, a read, vread or history of one of the
//! patient's records answers 410 (an OperationOutcome saying it was erased, no PHI), and
//! searches, counts, includes and `$everything` leave them out ([`Error::is_erased`]).
//!
//! Who may erase is the server's decision (`phivault_auth::authorize_erasure`: a back-end
//! client holding `system/Patient.$erase`) or the operator's (`phivault patient erase`,
//! offline, with the data directory's keys).

use base64::Engine as _;
use phivault_audit::AuditEvent;
use phivault_store::{CommitError, Erasure};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::engine::{Engine, now_ms, patient_key_id};

/// Longest reason accepted (bytes).
pub const MAX_REASON: usize = 2_000;

/// What is kept with an erasure's marker: when, the request that did it (its audit event
/// has the same request id), and the reason, sealed.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErasureRecord {
    /// When (ms since the Unix epoch).
    pub time_ms: i64,
    /// The request id of the erasure's audit event.
    pub request_id: String,
    /// The reason, sealed (base64).
    pub reason: String,
}

/// What an erasure did, in counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erased {
    /// Resources whose current version was sealed under the patient's key.
    pub resources: u64,
    /// Index postings removed.
    pub postings: u64,
    /// Whether the write-ahead log was emptied afterwards.
    pub wal_truncated: bool,
}

/// The label a reason is sealed under: bound to the key id, so a sealed reason moved to
/// another erasure does not open.
fn reason_label(key_id: &str) -> String {
    format!("erasure-reason:{key_id}")
}

/// The answer to erasing a patient a second time.
pub fn already_erased() -> Error {
    Error::new(
        crate::Kind::Gone,
        phivault_fhir::IssueCode::Deleted,
        "this patient's records were already erased",
    )
}

impl Engine {
    /// Erase patient `patient` (see the module docs): `audit` is written in the erasure's
    /// transaction, `request_id` names it in the kept record. 400 without a reason, 404
    /// for an unknown patient, 410 if already erased.
    pub async fn erase_patient(
        &self,
        patient: &str,
        reason: &str,
        request_id: &str,
        audit: Vec<AuditEvent>,
    ) -> Result<Erased, Error> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > MAX_REASON {
            return Err(Error::bad_request(
                "an erasure needs a reason of 1 to 2,000 bytes",
            ));
        }
        let key_id = patient_key_id(patient);
        if self.is_erased(&key_id)? {
            return Err(already_erased());
        }
        // a patient that was ever written (a deleted one too: its records may remain)
        let known = self
            .store()
            .version("Patient", patient, 1)
            .map_err(Error::from_store)?
            .is_some();
        if !known {
            return Err(Error::not_found("patient not found"));
        }
        let sealed = self
            .seal_secret(&reason_label(&key_id), reason.as_bytes())
            .ok_or_else(Error::internal)?;
        let record = ErasureRecord {
            time_ms: now_ms(),
            request_id: request_id.to_owned(),
            reason: base64::engine::general_purpose::STANDARD.encode(sealed),
        };
        let marker = serde_json::to_vec(&record).map_err(|_| Error::internal())?;
        // from here on nothing unwraps or caches the key in this process; undone below if
        // the erasure does not happen
        self.mark_erased(&key_id);
        let rx = self.store().erase_key(Erasure {
            key_id: key_id.clone(),
            marker,
            audit,
        });
        match rx.await {
            Ok(Ok(done)) => Ok(Erased {
                resources: done.resources,
                postings: done.postings,
                wal_truncated: done.wal_truncated,
            }),
            Ok(Err(CommitError::KeyErased)) => Err(already_erased()),
            Ok(Err(CommitError::NoKey)) => {
                self.unmark_erased(&key_id);
                Err(Error::not_found("patient not found"))
            }
            _ => {
                self.unmark_erased(&key_id);
                Err(Error::unavailable())
            }
        }
    }

    /// The kept record of patient `patient`'s erasure and its reason, opened (for the
    /// operator's tools); None if not erased.
    pub fn erasure(&self, patient: &str) -> Result<Option<(ErasureRecord, String)>, Error> {
        let key_id = patient_key_id(patient);
        let Some(v) = self
            .store()
            .meta(&phivault_store::erased_marker_key(&key_id))
            .map_err(Error::from_store)?
        else {
            return Ok(None);
        };
        let record: ErasureRecord = serde_json::from_slice(&v).map_err(|_| Error::integrity())?;
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(&record.reason)
            .map_err(|_| Error::integrity())?;
        let reason = self
            .open_secret(&reason_label(&key_id), &sealed)
            .and_then(|r| String::from_utf8(r).ok())
            .ok_or_else(Error::integrity)?;
        Ok(Some((record, reason)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use phivault_auth::Interaction;
    use phivault_crypto::{KeyHierarchy, MasterKey};
    use phivault_store::Expect;
    use phivault_store::sqlite::SqliteStore;
    use serde_json::json;

    use super::*;
    use crate::access::Access;

    /// Create `rtype/id` with `body` through the engine (version 1).
    pub(crate) fn write(engine: &Engine, rtype: &str, id: &str, mut body: serde_json::Value) {
        let access = Access::internal(rtype, Interaction::Create);
        let mut ring = engine.key_ring();
        let (sealed, _) = engine
            .prepare(
                &access,
                &mut ring,
                rtype,
                id,
                1,
                Expect::Absent,
                Some(&mut body),
                now_ms(),
                None,
            )
            .unwrap();
        let batch = crate::engine::Batch {
            new_keys: ring.new_keys(),
            puts: vec![sealed],
            ..Default::default()
        };
        engine.submit(batch).blocking_recv().unwrap().unwrap();
        ring.committed();
    }

    #[test]
    fn an_erased_patients_records_answer_gone_and_the_reason_stays_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("db"),
            phivault_store::StoreKeys::for_tests(),
        );
        let store: Arc<dyn phivault_store::Store> = Arc::new(store.unwrap());
        let engine = Engine::new(
            store.clone(),
            KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32])),
        );
        write(&engine, "Patient", "pa", json!({"resourceType": "Patient"}));
        let obs = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "x"}, "subject": {"reference": "Patient/pa"}});
        write(&engine, "Observation", "o1", obs);
        write(&engine, "Patient", "pb", json!({"resourceType": "Patient"}));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let erase =
            |p: &str, reason: &str| rt.block_on(engine.erase_patient(p, reason, "req-1", vec![]));
        assert_eq!(erase("pa", "  ").unwrap_err().kind, crate::Kind::BadRequest);
        assert_eq!(
            erase("nobody", "asked").unwrap_err().kind,
            crate::Kind::NotFound
        );
        let done = erase("pa", "the patient's request, ticket 42").unwrap();
        assert_eq!(done.resources, 2);
        let again = erase("pa", "again").unwrap_err();
        assert_eq!(again.kind, crate::Kind::Gone);
        assert!(
            !again.is_erased(),
            "a clear 'already erased', not a record's 410"
        );
        let read = Access::internal("Observation", Interaction::Read);
        let row = engine.current(&read, "o1").unwrap().unwrap();
        assert!(engine.open(&read, &row).unwrap_err().is_erased());
        // a fresh engine (a restart) knows it from the store's marker alone
        let fresh = Engine::new(
            store.clone(),
            KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32])),
        );
        assert!(fresh.open(&read, &row).unwrap_err().is_erased());
        let other = Access::internal("Patient", Interaction::Read);
        let pb = fresh.current(&other, "pb").unwrap().unwrap();
        assert!(fresh.open(&other, &pb).is_ok());
        // the reason is kept sealed, and opens with the keys
        let marker = store
            .meta(&phivault_store::erased_marker_key("p:pa"))
            .unwrap()
            .unwrap();
        assert!(!String::from_utf8_lossy(&marker).contains("ticket 42"));
        let (record, reason) = fresh.erasure("pa").unwrap().unwrap();
        assert_eq!(
            (record.request_id.as_str(), reason.as_str()),
            ("req-1", "the patient's request, ticket 42")
        );
        // writes for the erased patient are refused
        let mut ring = fresh.key_ring();
        assert!(ring.key("p:pa").unwrap_err().is_erased());
    }
}
