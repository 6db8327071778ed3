//! A store indexed under an earlier blind-index scheme moved to this build's: the codes,
//! statuses, numbers and quantities of records in a patient's compartment are keyed per
//! patient ([`crate::engine::per_patient_index`]). Run once, before the server serves,
//! when the store's scheme ([`INDEX_SCHEME_META`]) is older: every current record of the
//! types concerned is opened, its postings under both schemes computed, and the old ones
//! replaced by the new through the store's writer (committed and counted in the signed
//! state like any write); then the scheme is recorded.

use phivault_store::Reindex;

use crate::engine::{Engine, INDEX_SCHEME, INDEX_SCHEME_META};
use crate::error::Error;

/// Records read and reindexed per store call.
const BATCH: usize = 500;

/// Move the store to this build's index scheme if it is not there yet; the records
/// reindexed.
pub fn upgrade(engine: &Engine) -> Result<u64, Error> {
    let store = engine.store();
    let want = INDEX_SCHEME.to_string();
    if store
        .meta(INDEX_SCHEME_META)
        .map_err(Error::from_store)?
        .as_deref()
        == Some(want.as_bytes())
    {
        return Ok(0);
    }
    let mut done = 0u64;
    let mut types = phivault_fhir::patient_compartment_types();
    types.push("Patient");
    types.sort_unstable();
    types.dedup();
    for rtype in types {
        // (an erased patient's records do not open, and have no postings left)
        engine.each_record(rtype, BATCH, &mut |records| {
            let mut changes = Vec::new();
            for (row, json) in records {
                let old = engine.index_entries_global(rtype, &json);
                let new = engine.index_entries(rtype, &json);
                if old != new {
                    changes.push(Reindex {
                        rtype: rtype.to_owned(),
                        id: row.id,
                        version: row.version,
                        old,
                        new,
                    });
                }
            }
            if !changes.is_empty() {
                done += store.reindex(changes).map_err(Error::from_store)?;
            }
            Ok(())
        })?;
    }
    store
        .set_meta(INDEX_SCHEME_META, want.as_bytes())
        .map_err(Error::from_store)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use phivault_crypto::{KeyHierarchy, MasterKey};
    use phivault_store::sqlite::SqliteStore;
    use serde_json::{Value, json};

    use super::*;
    use crate::erase::tests::write;

    #[test]
    fn a_store_indexed_globally_is_moved_to_per_patient_tokens_once() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Arc::new(
            SqliteStore::open(
                &dir.path().join("db"),
                phivault_store::StoreKeys::for_tests(),
            )
            .unwrap(),
        );
        let store: Arc<dyn phivault_store::Store> = sqlite.clone();
        let engine = Engine::new(
            store.clone(),
            KeyHierarchy::new(&MasterKey::from_bytes(&[7; 32])),
        );
        write(
            &engine,
            "Patient",
            "pa",
            json!({"resourceType": "Patient", "gender": "female"}),
        );
        let cond = json!({"resourceType": "Condition",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            "subject": {"reference": "Patient/pa"}});
        write(&engine, "Condition", "c1", cond.clone());
        // as an earlier build indexed them: every token global
        let global = |rtype: &str, id: &str, body: &Value| {
            let old = engine.index_entries(rtype, body);
            let new = engine.index_entries_global(rtype, body);
            assert_ne!(old, new, "{rtype} has per-patient tokens");
            store
                .reindex(vec![Reindex {
                    rtype: rtype.into(),
                    id: id.into(),
                    version: 1,
                    old,
                    new,
                }])
                .unwrap()
        };
        let mut pa = json!({"resourceType": "Patient", "gender": "female"});
        pa["id"] = json!("pa");
        let mut c1 = cond.clone();
        c1["id"] = json!("c1");
        // (ids and meta as stored: the entries do not depend on them)
        assert_eq!(global("Patient", "pa", &pa), 1);
        assert_eq!(global("Condition", "c1", &c1), 1);
        store.set_meta(INDEX_SCHEME_META, b"1").unwrap();
        let ix = SqliteStore::index_number("Condition", "code");
        let code_tokens = |s: &SqliteStore| -> Vec<Vec<u8>> {
            s.postings_of("Condition", "c1")
                .unwrap()
                .into_iter()
                .filter(|(i, _)| *i == ix)
                .map(|(_, t)| t)
                .collect()
        };
        let before = code_tokens(&sqlite);
        assert_eq!(upgrade(&engine).unwrap(), 2);
        let after = code_tokens(&sqlite);
        assert_eq!(before.len(), 1);
        assert_eq!(after.len(), 1);
        assert_ne!(before, after, "the code's token is now the patient's");
        // the state summary counted every posting changed, exactly
        assert_eq!(store.check_state(&mut || {}).unwrap(), Vec::<String>::new());
        // once only: the scheme is recorded, and a second run changes nothing
        assert_eq!(upgrade(&engine).unwrap(), 0);
        store.set_meta(INDEX_SCHEME_META, b"1").unwrap();
        assert_eq!(upgrade(&engine).unwrap(), 2, "replayed, as after a crash");
        assert_eq!(code_tokens(&sqlite), after);
        assert_eq!(store.check_state(&mut || {}).unwrap(), Vec::<String>::new());
    }
}
