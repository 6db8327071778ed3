//! The authorization decision (SM2, API1/API5 groundwork).
//!
//! [`authorize`] turns an [`Authenticated`] token and a (resource type, interaction) pair
//! into an [`Authorized`] proof or a [`Denied`]. Handlers that touch resources should take
//! an `Authorized` argument, so skipping the check does not compile.
//!
//! **Phase 2 policy:** a back-end client's token is granted by its `system/` scopes. A
//! token issued for a person ([`crate::Person`]) is never granted anything by `system/`
//! scopes; a *patient's* token is granted read and search by its `patient/` scopes,
//! confined to the patient in its context ([`Reach::Patient`]) — the server confines
//! what it serves to that compartment, or refuses. A *clinician's* token is granted read
//! search, create and update by its `user/` scopes, confined to the patients the
//! practitioner has a treatment relationship with ([`Reach::TreatedBy`]; the server works
//! out who they are, adds patients opened by break-the-glass, and checks a write's record
//! before and after). Deletes by persons, patients' writes and scopes with a `?query`
//! restriction grant nothing yet (see [`crate::scope`]). Auditors read the audit log and no
//! clinical data; administrators get none either. Deny by default (AC1).

use crate::access_token::Authenticated;
use crate::scope::{Context, Interaction, is_valid_resource_type_syntax};
use crate::users::Role;
use std::fmt;

/// Whose records a grant reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reach {
    /// Whatever the scopes cover (a back-end client's `system/` access).
    All,
    /// One patient's compartment (a patient's own app).
    Patient(String),
    /// The patient compartments of the patients practitioner `practitioner` (a clinician,
    /// account `user`) has a treatment relationship with or opened by break-the-glass, and
    /// records outside any patient compartment.
    TreatedBy {
        /// The practitioner's resource id.
        practitioner: String,
        /// The clinician's account id.
        user: String,
    },
}

/// The resource type under which the audit log is served.
pub const AUDIT_EVENT: &str = "AuditEvent";

/// Proof that `client_id` may perform `interaction` on `resource_type`. Only this crate
/// can construct it.
#[derive(Clone)]
pub struct Authorized {
    client_id: String,
    token_id: String,
    resource_type: String,
    interaction: Interaction,
    reach: Reach,
}

impl fmt::Debug for Authorized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorized")
            .field("client_id", &self.client_id)
            .field("resource_type", &self.resource_type)
            .field("interaction", &self.interaction)
            .finish()
    }
}

impl Authorized {
    /// The client acting.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
    /// The `jti` of the token the decision was based on (for audit).
    pub fn token_id(&self) -> &str {
        &self.token_id
    }
    /// The resource type authorized.
    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }
    /// The interaction authorized.
    pub fn interaction(&self) -> Interaction {
        self.interaction
    }
    /// Whose records the access reaches. A caller that cannot confine what it serves to
    /// anything but [`Reach::All`] must refuse.
    pub fn reach(&self) -> &Reach {
        &self.reach
    }
    /// The one patient compartment the access is confined to (a patient's own app).
    pub fn patient(&self) -> Option<&str> {
        match &self.reach {
            Reach::Patient(p) => Some(p),
            _ => None,
        }
    }
}

/// Access refused. HTTP 403 with `WWW-Authenticate: Bearer error="insufficient_scope"`.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denied {
    /// No granted scope covers the request.
    #[error("insufficient scope")]
    InsufficientScope,
    /// The resource type name is not syntactically valid.
    #[error("invalid resource type")]
    InvalidResourceType,
}

impl Denied {
    /// 403 for insufficient scope; 400 for an invalid resource type name.
    pub fn http_status(&self) -> u16 {
        match self {
            Denied::InsufficientScope => 403,
            Denied::InvalidResourceType => 400,
        }
    }

    /// The `WWW-Authenticate` value (RFC 6750 §3.1).
    pub fn www_authenticate(&self) -> String {
        "Bearer error=\"insufficient_scope\"".to_owned()
    }
}

/// The resource name of the key-administration scope ([`KEY_ROTATION_SCOPE`]).
pub const KEY_ADMIN_RESOURCE: &str = "PhivaultKeys";
/// The scope a back-end client needs to rotate the server's keys
/// (`POST /admin/keys/rotate-kek`). It must be held by name: `system/*` grants it not.
pub const KEY_ROTATION_SCOPE: &str = "system/PhivaultKeys.u";

/// Whether `auth` may rotate the server's keys: a person with the admin role, or a
/// back-end client holding [`KEY_ROTATION_SCOPE`] by name (never through a wildcard).
/// Rotating opens no record: it grants no clinical access, and none implies it.
pub fn may_rotate_keys(auth: &Authenticated) -> bool {
    match auth.person() {
        Some(p) => p.role == Role::Admin,
        None => auth.scopes().resource_scopes().any(|s| {
            s.context == Context::System
                && s.resource.as_deref() == Some(KEY_ADMIN_RESOURCE)
                && s.query.is_none()
                && s.perms.contains(Interaction::Update)
        }),
    }
}

/// Decides whether `auth` may perform `i` on `resource_type` (phase 1: `system/` scopes
/// only; see the module documentation).
pub fn authorize(
    auth: &Authenticated,
    resource_type: &str,
    i: Interaction,
) -> Result<Authorized, Denied> {
    if !is_valid_resource_type_syntax(resource_type) {
        return Err(Denied::InvalidResourceType);
    }
    let reads = matches!(i, Interaction::Read | Interaction::Search);
    // the audit log is read by auditors, through `user/AuditEvent` scopes, and a patient
    // reads who accessed their own record, through `patient/AuditEvent` scopes; nobody
    // writes it through the API
    if resource_type == AUDIT_EVENT {
        let reach = match auth.person() {
            Some(p)
                if p.role == Role::Auditor
                    && reads
                    && auth.scopes().allows(Context::User, resource_type, i) =>
            {
                Reach::All
            }
            Some(p)
                if p.role == Role::Patient
                    && reads
                    && auth.scopes().allows(Context::Patient, resource_type, i) =>
            {
                match &p.patient {
                    Some(pid) => Reach::Patient(pid.clone()),
                    None => return Err(Denied::InsufficientScope),
                }
            }
            _ => return Err(Denied::InsufficientScope),
        };
        return Ok(Authorized {
            client_id: auth.client_id().to_owned(),
            token_id: auth.token_id().to_owned(),
            resource_type: resource_type.to_owned(),
            interaction: i,
            reach,
        });
    }
    let reach = match auth.person() {
        // a person's token never acts with system/ scopes, whatever it carries; persons
        // read and search (their writes are not granted yet)
        Some(p) => match p.role {
            Role::Patient => match &p.patient {
                Some(pid) if reads && auth.scopes().allows(Context::Patient, resource_type, i) => {
                    Reach::Patient(pid.clone())
                }
                _ => return Err(Denied::InsufficientScope),
            },
            Role::Clinician => {
                let practitioner = p
                    .fhir_user
                    .as_deref()
                    .and_then(|u| u.strip_prefix("Practitioner/"))
                    .filter(|id| !id.is_empty());
                // clinicians write too (within their reach), but do not delete
                let clinical = reads || matches!(i, Interaction::Create | Interaction::Update);
                match practitioner {
                    Some(pr)
                        if clinical && auth.scopes().allows(Context::User, resource_type, i) =>
                    {
                        Reach::TreatedBy {
                            practitioner: pr.to_owned(),
                            user: p.user_id.clone(),
                        }
                    }
                    _ => return Err(Denied::InsufficientScope),
                }
            }
            // auditors (the audit log aside) and administrators: no clinical data
            Role::Auditor | Role::Admin => return Err(Denied::InsufficientScope),
        },
        None if auth.scopes().allows(Context::System, resource_type, i) => Reach::All,
        None => return Err(Denied::InsufficientScope),
    };
    Ok(Authorized {
        client_id: auth.client_id().to_owned(),
        token_id: auth.token_id().to_owned(),
        resource_type: resource_type.to_owned(),
        interaction: i,
        reach,
    })
}

/// Decides whether `auth` may erase a patient's records (crypto-shredding, `POST
/// Patient/{id}/$erase`): only a back-end client whose token carries
/// [`crate::scope::ERASE_SCOPE`] (`system/Patient.$erase`), which no SMART resource scope
/// implies. A person's token is never granted it — administrators included: the grant is
/// a registered client's, made by whoever holds the data directory (`client add`), and the
/// offline `phivault patient erase` is the operator's own.
pub fn authorize_erasure(auth: &Authenticated) -> Result<Authorized, Denied> {
    if auth.person().is_some() || !auth.scopes().has_other(crate::scope::ERASE_SCOPE) {
        return Err(Denied::InsufficientScope);
    }
    Ok(Authorized {
        client_id: auth.client_id().to_owned(),
        token_id: auth.token_id().to_owned(),
        resource_type: "Patient".to_owned(),
        interaction: Interaction::Delete,
        reach: Reach::All,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_token::tests::issuer;
    use crate::scope::ScopeSet;
    use crate::test_support::NOW;

    fn auth(scopes: &str) -> Authenticated {
        let i = issuer();
        let t = i
            .issue("c1", &ScopeSet::parse(scopes).expect("scopes"), NOW)
            .expect("issue");
        i.verifier().verify(t.token(), NOW).expect("verify")
    }

    #[test]
    fn system_scopes_grant() {
        let a = auth("system/Patient.rs system/*.r");
        let z = authorize(&a, "Patient", Interaction::Search).expect("allowed");
        assert_eq!(z.client_id(), "c1");
        assert_eq!(z.resource_type(), "Patient");
        assert_eq!(z.interaction(), Interaction::Search);
        assert!(authorize(&a, "Observation", Interaction::Read).is_ok());
        assert_eq!(
            authorize(&a, "Observation", Interaction::Search).err(),
            Some(Denied::InsufficientScope)
        );
        assert_eq!(
            authorize(&a, "Patient", Interaction::Delete).err(),
            Some(Denied::InsufficientScope)
        );
        assert_eq!(
            authorize(&a, "patient", Interaction::Read).err(),
            Some(Denied::InvalidResourceType)
        );
    }

    #[test]
    fn patient_and_user_scopes_of_a_client_without_a_person_grant_nothing() {
        let a = auth("patient/*.cruds user/*.cruds");
        for i in Interaction::ALL {
            assert_eq!(
                authorize(&a, "Patient", i).err(),
                Some(Denied::InsufficientScope)
            );
        }
        let q = auth("system/Observation.rs?category=laboratory");
        assert!(authorize(&q, "Observation", Interaction::Read).is_err());
    }

    #[test]
    fn key_rotation_needs_the_admin_role_or_the_named_scope() {
        assert!(may_rotate_keys(&auth(KEY_ROTATION_SCOPE)));
        assert!(may_rotate_keys(&auth(
            "system/Patient.r system/PhivaultKeys.cu"
        )));
        for s in [
            "system/*.cruds",
            "system/PhivaultKeys.r",
            "system/PhivaultKeys.u?x=y",
        ] {
            assert!(!may_rotate_keys(&auth(s)), "{s}");
        }
        // and it grants nothing else
        let a = auth(KEY_ROTATION_SCOPE);
        assert!(authorize(&a, "Patient", Interaction::Read).is_err());
        let i = issuer();
        for (role, yes) in [
            (Role::Admin, true),
            (Role::Auditor, false),
            (Role::Clinician, false),
            (Role::Patient, false),
        ] {
            let p = crate::access_token::Person {
                user_id: "u-1".into(),
                role,
                generation: 1,
                fhir_user: None,
                patient: None,
            };
            let t = i
                .issue_for(
                    "app",
                    Some(&p),
                    &ScopeSet::parse(KEY_ROTATION_SCOPE).unwrap(),
                    NOW,
                )
                .expect("issue");
            let a = i.verifier().verify(t.token(), NOW).expect("verify");
            assert_eq!(may_rotate_keys(&a), yes, "{role:?}");
        }
    }

    #[test]
    fn system_scopes_grant_nothing_to_a_person() {
        let i = issuer();
        let p = crate::access_token::Person {
            user_id: "u-1".into(),
            role: crate::users::Role::Clinician,
            generation: 1,
            fhir_user: Some("Practitioner/x".into()),
            patient: None,
        };
        let t = i
            .issue_for(
                "app",
                Some(&p),
                &ScopeSet::parse("system/*.cruds").unwrap(),
                NOW,
            )
            .expect("issue");
        let a = i.verifier().verify(t.token(), NOW).expect("verify");
        for it in Interaction::ALL {
            assert_eq!(
                authorize(&a, "Patient", it).err(),
                Some(Denied::InsufficientScope)
            );
        }
    }

    #[test]
    fn a_patient_reads_and_searches_only_their_compartment() {
        let i = issuer();
        let person = |role, patient: Option<&str>| crate::access_token::Person {
            user_id: "u-1".into(),
            role,
            generation: 1,
            fhir_user: None,
            patient: patient.map(str::to_owned),
        };
        let tok = |p: &crate::access_token::Person, s: &str| {
            let t = i
                .issue_for("app", Some(p), &ScopeSet::parse(s).unwrap(), NOW)
                .expect("issue");
            i.verifier().verify(t.token(), NOW).expect("verify")
        };
        let pat = person(Role::Patient, Some("p1"));
        let a = tok(&pat, "patient/*.cruds");
        let z = authorize(&a, "Observation", Interaction::Search).expect("search");
        assert_eq!(z.patient(), Some("p1"));
        assert_eq!(
            authorize(&a, "Patient", Interaction::Read)
                .unwrap()
                .patient(),
            Some("p1")
        );
        for w in [
            Interaction::Create,
            Interaction::Update,
            Interaction::Delete,
        ] {
            assert!(authorize(&a, "Observation", w).is_err(), "{w:?}");
        }
        // scopes still bound it
        let narrow = tok(&pat, "patient/Observation.r");
        assert!(authorize(&narrow, "Observation", Interaction::Read).is_ok());
        assert!(authorize(&narrow, "Observation", Interaction::Search).is_err());
        assert!(authorize(&narrow, "Condition", Interaction::Read).is_err());
        // no patient in context, another role, or user/ scopes: nothing
        assert!(
            authorize(
                &tok(&person(Role::Patient, None), "patient/*.rs"),
                "Observation",
                Interaction::Read
            )
            .is_err()
        );
        assert!(
            authorize(
                &tok(&person(Role::Clinician, Some("p1")), "patient/*.rs"),
                "Observation",
                Interaction::Read
            )
            .is_err()
        );
        assert!(authorize(&tok(&pat, "user/*.rs"), "Observation", Interaction::Read).is_err());
        // back-end tokens are never confined
        let sys = auth("system/*.rs");
        assert_eq!(
            authorize(&sys, "Observation", Interaction::Read)
                .unwrap()
                .patient(),
            None
        );
    }

    #[test]
    fn a_clinician_reads_and_searches_their_patients_only_auditors_and_admins_nothing() {
        let i = issuer();
        let tok = |role, fhir_user: Option<&str>, s: &str| {
            let p = crate::access_token::Person {
                user_id: "u-7".into(),
                role,
                generation: 1,
                fhir_user: fhir_user.map(str::to_owned),
                patient: None,
            };
            let t = i
                .issue_for("app", Some(&p), &ScopeSet::parse(s).unwrap(), NOW)
                .expect("issue");
            i.verifier().verify(t.token(), NOW).expect("verify")
        };
        let c = tok(Role::Clinician, Some("Practitioner/pr1"), "user/*.rs");
        let z = authorize(&c, "Observation", Interaction::Search).expect("search");
        assert_eq!(
            z.reach(),
            &Reach::TreatedBy {
                practitioner: "pr1".into(),
                user: "u-7".into()
            }
        );
        assert_eq!(z.patient(), None);
        assert!(authorize(&c, "Patient", Interaction::Read).is_ok());
        // writes need write scopes, and are confined the same way; deletes are not granted
        for w in [
            Interaction::Create,
            Interaction::Update,
            Interaction::Delete,
        ] {
            assert!(authorize(&c, "Observation", w).is_err(), "{w:?}");
        }
        let writer = tok(
            Role::Clinician,
            Some("Practitioner/pr1"),
            "user/Observation.cruds",
        );
        for w in [Interaction::Create, Interaction::Update] {
            let z = authorize(&writer, "Observation", w).expect("clinician writes");
            assert!(matches!(z.reach(), Reach::TreatedBy { .. }));
        }
        assert!(authorize(&writer, "Observation", Interaction::Delete).is_err());
        // the scopes bound it; patient/ and system/ scopes give a clinician nothing
        let narrow = tok(
            Role::Clinician,
            Some("Practitioner/pr1"),
            "user/Condition.r",
        );
        assert!(authorize(&narrow, "Condition", Interaction::Read).is_ok());
        assert!(authorize(&narrow, "Observation", Interaction::Read).is_err());
        for s in ["patient/*.rs", "system/*.rs"] {
            let t = tok(Role::Clinician, Some("Practitioner/pr1"), s);
            assert!(
                authorize(&t, "Observation", Interaction::Read).is_err(),
                "{s}"
            );
        }
        // a clinician not linked to a practitioner: nothing
        for fu in [None, Some("Patient/p1"), Some("Practitioner/")] {
            let t = tok(Role::Clinician, fu, "user/*.rs");
            assert!(
                authorize(&t, "Observation", Interaction::Read).is_err(),
                "{fu:?}"
            );
        }
        // auditors and administrators read no clinical data, whatever the scopes; the
        // audit log is for auditors only, read-only
        for role in [Role::Auditor, Role::Admin] {
            let t = tok(role, None, "user/*.cruds patient/*.cruds system/*.cruds");
            for it in Interaction::ALL {
                assert!(authorize(&t, "Patient", it).is_err(), "{role:?} {it:?}");
            }
        }
        let auditor = tok(Role::Auditor, None, "user/AuditEvent.rs");
        for it in [Interaction::Read, Interaction::Search] {
            let z = authorize(&auditor, "AuditEvent", it).expect("auditor reads the log");
            assert_eq!(z.reach(), &Reach::All);
        }
        // a patient reads the events about their own record
        let p = crate::access_token::Person {
            user_id: "u-9".into(),
            role: Role::Patient,
            generation: 1,
            fhir_user: None,
            patient: Some("p1".into()),
        };
        let t = i
            .issue_for(
                "app",
                Some(&p),
                &ScopeSet::parse("patient/AuditEvent.rs").unwrap(),
                NOW,
            )
            .unwrap();
        let own = i.verifier().verify(t.token(), NOW).unwrap();
        let z = authorize(&own, "AuditEvent", Interaction::Search).expect("own accounting");
        assert_eq!(z.reach(), &Reach::Patient("p1".into()));
        let writer = tok(Role::Auditor, None, "user/AuditEvent.cruds");
        for it in [
            Interaction::Create,
            Interaction::Update,
            Interaction::Delete,
        ] {
            assert!(authorize(&writer, "AuditEvent", it).is_err(), "{it:?}");
        }
        for t in [
            tok(Role::Admin, None, "user/*.cruds"),
            tok(Role::Clinician, Some("Practitioner/pr1"), "user/*.rs"),
            auth("system/*.cruds"),
        ] {
            for it in Interaction::ALL {
                assert!(authorize(&t, "AuditEvent", it).is_err(), "{it:?}");
            }
        }
        assert_eq!(
            authorize(&auth("system/*.rs"), "Observation", Interaction::Read)
                .unwrap()
                .reach(),
            &Reach::All
        );
    }

    #[test]
    fn only_a_back_end_client_with_the_erase_scope_erases() {
        let ok = auth("system/Patient.$erase");
        let z = authorize_erasure(&ok).expect("erase");
        assert_eq!(z.interaction(), Interaction::Delete);
        assert_eq!(z.reach(), &Reach::All);
        // nothing else implies it, and it grants nothing else
        for s in ["system/*.cruds", "system/Patient.d", "user/*.cruds"] {
            assert!(authorize_erasure(&auth(s)).is_err(), "{s}");
        }
        for it in Interaction::ALL {
            assert!(authorize(&ok, "Patient", it).is_err());
        }
        // a person's token never, whatever it carries (administrators included)
        let i = issuer();
        let admin = crate::access_token::Person {
            user_id: "u-1".into(),
            role: Role::Admin,
            generation: 1,
            fhir_user: None,
            patient: None,
        };
        let scopes = ScopeSet::parse("system/Patient.$erase user/*.cruds").unwrap();
        let t = i.issue_for("app", Some(&admin), &scopes, NOW).unwrap();
        let a = i.verifier().verify(t.token(), NOW).unwrap();
        assert!(authorize_erasure(&a).is_err());
        // a back-end client may be registered with it (system-only sets keep it)
        assert!(scopes.system_only().has_other(crate::scope::ERASE_SCOPE));
        assert!(
            ScopeSet::parse("system/Patient.$erase")
                .unwrap()
                .not_system()
                .is_empty()
        );
        assert!(ScopeSet::parse("system/Observation.$erase").is_err());
    }

    #[test]
    fn statuses() {
        assert_eq!(Denied::InsufficientScope.http_status(), 403);
        assert!(
            Denied::InsufficientScope
                .www_authenticate()
                .contains("insufficient_scope")
        );
    }
}
