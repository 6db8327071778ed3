//! The one door to every record: the authorization decision as a proof value.
//!
//! [`Access`] is the only way into a sealed record. [`Vault::decide`] (for a request's
//! token) is the one decision point that makes one for a client: it combines the token's grant
//! ([`phivault_auth::authorize()`], SMART scopes ∩ role) with whose records the grant reaches
//! (a patient's own, a clinician's treated patients). The engine's `open`, `prepare` (every
//! write) and the search functions take an `&Access`, and its fields are private to this
//! module, so a path that skips the decision does not compile:
//!
//! ```compile_fail,E0451
//! // outside this crate an Access cannot be made up
//! let a = phivault_records::Access { rtype: "Observation".into(), reach: None };
//! ```
//!
//! ```compile_fail,E0624
//! // the store is not reachable past the engine: rows come only through proof-taking calls
//! fn read(vault: &phivault_records::Vault) {
//!     let _ = vault.engine.store().current("Observation", "1");
//! }
//! ```
//!
//! ```compile_fail,E0423
//! // a version reaches a commit only as sealed by `Engine::prepare` under an `Access`
//! fn forge(put: phivault_store::Put) -> phivault_records::engine::Sealed {
//!     phivault_records::engine::Sealed(put)
//! }
//! ```
//!
//! The calls that do exist take the proof, and compile:
//!
//! ```
//! fn read(
//!     vault: &phivault_records::Vault,
//!     access: &phivault_records::Access,
//! ) -> Result<Option<phivault_store::VersionRow>, phivault_records::Error> {
//!     vault.engine.current(access, "1")
//! }
//! ```
//!
//! **The one rule.** A record belongs, for access, to the one patient whose data key seals
//! it: the patient it is about (a Patient's own id; otherwise the first `Patient/{id}` of
//! its compartment elements in the CompartmentDefinition's order, subject/patient first).
//! Being named as performer, author, recipient or another participant does not open a
//! record for that patient or for those who treat them — this narrows FHIR's Patient
//! compartment on purpose (SECURITY.md). A record of a Patient-compartment type that names
//! no patient reaches only unconfined (`system/`) access; records of types outside the
//! compartment (Practitioner, Organization, …) reach clinicians too. Read, vread, history,
//! every search (matches, counts, chains, `_has`, includes, paging), `$everything`,
//! compartment routes, batch entries and the reach check of writes all ask [`Access::admits`].

use phivault_auth::{Authenticated, Authorized, Interaction};
use phivault_store::VersionRow;

use crate::Error;
use crate::Vault;
use crate::care::Reach;
use crate::engine::key_patient;

/// Proof that a client may perform one interaction on one resource type, carrying the
/// reach that grant has. Only [`Vault::decide`] (a client's token) and `Access::internal`
/// (the server's own jobs) make one.
#[derive(Clone)]
pub struct Access {
    rtype: String,
    interaction: Interaction,
    /// None: every record of the type (a back-end client's `system/` grant, or the server).
    reach: Option<Reach>,
    /// The token's grant the decision rests on; None for the server's own jobs.
    grant: Option<Authorized>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("rtype", &self.rtype)
            .field("interaction", &self.interaction)
            .field("confined", &self.reach.is_some())
            .finish()
    }
}

/// Whether `rtype` is in the Patient compartment (its records belong to a patient).
pub fn in_compartment(rtype: &str) -> bool {
    rtype == "Patient" || !phivault_fhir::patient_compartment_params(rtype).is_empty()
}

impl Access {
    /// The server's own access for its internal jobs (treatment relationships, conditional
    /// create's look-up, snooping rules): unconfined, never handed to a request's path.
    pub(crate) fn internal(rtype: &str, interaction: Interaction) -> Access {
        Access {
            rtype: rtype.to_owned(),
            interaction,
            reach: None,
            grant: None,
        }
    }

    /// The access of the data directory's operator for an offline command (`phivault
    /// export`): unconfined, like the server's own jobs. Asking for it takes the key
    /// hierarchy — whoever holds it opens every record anyway; the server never calls this
    /// (`the_server_never_takes_the_operators_access`, `cli/tests/bulk_export.rs`).
    pub fn operator(keys: &phivault_crypto::KeyHierarchy, rtype: &str) -> Access {
        let _ = keys;
        Access::internal(rtype, Interaction::Read)
    }

    /// The resource type this access is for.
    pub fn rtype(&self) -> &str {
        &self.rtype
    }

    /// The interaction granted.
    pub fn interaction(&self) -> Interaction {
        self.interaction
    }

    /// Whose records it reaches: None for every record of the type.
    pub fn reach(&self) -> Option<&Reach> {
        self.reach.as_ref()
    }

    /// Whether it is confined to some patients (a patient's app, a clinician).
    pub fn is_confined(&self) -> bool {
        self.reach.is_some()
    }

    /// Whether a record of this access's type that belongs to `owner` (the patient whose
    /// key seals it; None: no patient) is reached. The one rule of the module docs.
    pub fn admits(&self, owner: Option<&str>) -> bool {
        admits(self.reach.as_ref(), &self.rtype, owner)
    }

    /// [`Access::admits`] for a stored version: its type must be this access's type and its
    /// sealing key a patient's it reaches (decided before anything is decrypted).
    pub fn admits_row(&self, row: &VersionRow) -> bool {
        row.rtype == self.rtype && self.admits(key_patient(&row.key_id))
    }

    /// The same grant for another resource type (an `_include`, a chain's inner search),
    /// decided again for that type: scopes are per type.
    /// The server's own access stays the server's; a client's needs its token (`auth`).
    pub(crate) fn for_type(
        &self,
        app: &Vault,
        auth: Option<&Authenticated>,
        rtype: &str,
        interaction: Interaction,
    ) -> Result<Access, Error> {
        match (&self.grant, auth) {
            (None, _) => Ok(Access::internal(rtype, interaction)),
            (Some(_), Some(auth)) => app.decide(auth, rtype, interaction),
            (Some(_), None) => Err(Error::forbidden()),
        }
    }
}

/// The one rule (see the module docs) for a reach on `rtype`.
pub(crate) fn admits(reach: Option<&Reach>, rtype: &str, owner: Option<&str>) -> bool {
    let Some(r) = reach else {
        return true;
    };
    match owner {
        Some(p) => r.patients.contains(p),
        // no patient: shared records (Practitioner, Organization, …) for those who reach
        // them; a compartment type's record that names no patient only unconfined
        None => r.shared && !in_compartment(rtype),
    }
}

impl Vault {
    /// The one decision point: may `auth` perform `interaction` on `rtype`, and whose
    /// records does that reach? 404 for an unknown type, 403 when no scope grants it.
    pub fn decide(
        &self,
        auth: &Authenticated,
        rtype: &str,
        interaction: Interaction,
    ) -> Result<Access, Error> {
        if !phivault_fhir::is_known_resource_type(rtype) {
            return Err(Error::not_found("unknown resource type"));
        }
        let grant =
            phivault_auth::authorize(auth, rtype, interaction).map_err(|_| Error::forbidden())?;
        let reach = self.reach(grant.reach())?;
        Ok(Access {
            rtype: rtype.to_owned(),
            interaction,
            reach,
            grant: Some(grant),
        })
    }

    /// [`Vault::decide`] for paths that serve whatever the type holds (deletes, transaction
    /// entries, the audit log's own routes): a grant confined to some patients is refused
    /// here (fail closed).
    pub fn decide_unconfined(
        &self,
        auth: &Authenticated,
        rtype: &str,
        interaction: Interaction,
    ) -> Result<Access, Error> {
        let a = self.decide(auth, rtype, interaction)?;
        if a.is_confined() {
            return Err(Error::forbidden());
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    fn reach(patients: &[&str], shared: bool) -> Reach {
        Reach {
            patients: Arc::new(
                patients
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect::<BTreeSet<_>>(),
            ),
            shared,
        }
    }

    #[test]
    fn the_owner_decides_and_unowned_compartment_records_need_unconfined_access() {
        let clin = reach(&["a"], true);
        let pat = reach(&["a"], false);
        assert!(admits(Some(&clin), "Observation", Some("a")));
        assert!(!admits(Some(&clin), "Observation", Some("b")));
        assert!(!admits(Some(&clin), "Observation", None));
        assert!(admits(Some(&clin), "Practitioner", None));
        assert!(!admits(Some(&pat), "Practitioner", None));
        assert!(admits(Some(&pat), "Patient", Some("a")));
        assert!(!admits(Some(&pat), "Patient", Some("b")));
        assert!(admits(None, "Observation", None));
        assert!(admits(None, "Observation", Some("b")));
    }
}
