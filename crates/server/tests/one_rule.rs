//! Property: every path that lists or opens records follows the one rule (a record belongs,
//! for access, to the patient whose key seals it), and read and search agree.
//!
//! The real router, engine and SQLite store in process (no TLS: the HTTP translation is
//! the same code); real signed access tokens for back-end clients, patients and clinicians
//! whose treatment relationships are random CareTeams. Records are random Observations
//! whose compartment fields (subject, performer) name patients relatively, by this server's
//! absolute base, by another server's base, or name no patient at all.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use phivault_auth::{AccessTokenIssuer, Person, Role, ScopeSet, UserRecord};
use phivault_crypto::{KeyHierarchy, MasterKey};
use phivault_records::{Engine, Vault};
use phivault_server::{App, Limits, Peer, router};
use phivault_store::sqlite::SqliteStore;
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt;

const ORIGIN: &str = "https://localhost:8443";

struct World {
    app: Arc<App>,
    issuer: AccessTokenIssuer,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(
            &dir.path().join("db"),
            phivault_store::StoreKeys::for_tests(),
        )
        .expect("store");
        let keys = KeyHierarchy::new(&MasterKey::from_bytes(&[5; 32]));
        let pkcs8 = phivault_auth::generate_ed25519_pkcs8().expect("key");
        let issuer = || {
            AccessTokenIssuer::from_pkcs8(
                &pkcs8,
                ORIGIN.to_owned(),
                format!("{ORIGIN}/fhir"),
                "k1".to_owned(),
            )
            .expect("issuer")
        };
        let engine = Engine::new(Arc::new(store), keys);
        let app = App::new(
            Vault::new(engine, ORIGIN),
            ORIGIN,
            issuer(),
            issuer().verifier(),
            Limits::default(),
        );
        World {
            app: Arc::new(app),
            issuer: issuer(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            _dir: dir,
        }
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One request through the router: status and JSON body.
fn call(method: &str, path: &str, token: &str, body: Option<&Value>) -> (u16, Value) {
    let w = world();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("/fhir/{path}"))
        .header("authorization", format!("Bearer {token}"));
    if body.is_some() {
        req = req.header("content-type", "application/fhir+json");
    }
    let mut req = req
        .body(match body {
            Some(b) => Body::from(b.to_string()),
            None => Body::empty(),
        })
        .expect("request");
    req.extensions_mut()
        .insert(Peer("127.0.0.1:9".parse().expect("addr")));
    w.rt.block_on(async {
        let resp = router(w.app.clone())
            .oneshot(req)
            .await
            .expect("infallible");
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    })
}

fn token(person: Option<&Person>, scope: &str) -> String {
    let scopes = ScopeSet::parse(scope).expect("scope");
    world()
        .issuer
        .issue_for("prop-client", person, &scopes, now())
        .expect("token")
        .into_token()
}

fn create(t: &str, resource: &Value) -> String {
    let rtype = resource["resourceType"].as_str().expect("type");
    let (status, body) = call("POST", rtype, t, Some(resource));
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

/// How a compartment field names someone.
#[derive(Debug, Clone)]
enum Name {
    Relative(usize),
    OwnBase(usize),
    OtherServer(usize),
    Group,
    Absent,
}

fn name() -> impl Strategy<Value = Name> {
    prop_oneof![
        (0..3usize).prop_map(Name::Relative),
        (0..3usize).prop_map(Name::OwnBase),
        (0..3usize).prop_map(Name::OtherServer),
        Just(Name::Group),
        Just(Name::Absent),
    ]
}

impl Name {
    fn reference(&self, patients: &[String]) -> Option<String> {
        match self {
            Name::Relative(i) => Some(format!("Patient/{}", patients[*i])),
            Name::OwnBase(i) => Some(format!("{ORIGIN}/fhir/Patient/{}", patients[*i])),
            Name::OtherServer(i) => Some(format!(
                "https://other.example/fhir/Patient/{}",
                patients[*i]
            )),
            Name::Group => Some("Group/ward-7".to_owned()),
            Name::Absent => None,
        }
    }
    /// The local patient named, if any.
    fn local(&self) -> Option<usize> {
        match self {
            Name::Relative(i) | Name::OwnBase(i) => Some(*i),
            _ => None,
        }
    }
    /// The patient a reference search by `Patient/{id}` matches: reference search compares
    /// type and id, whatever the base (search semantics; access is decided by the owner).
    fn searched_as(&self) -> Option<usize> {
        match self {
            Name::Relative(i) | Name::OwnBase(i) | Name::OtherServer(i) => Some(*i),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
enum Who {
    System,
    Patient(usize),
    /// A clinician treating these patients.
    Clinician(BTreeSet<usize>),
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![
        Just(Who::System),
        (0..3usize).prop_map(Who::Patient),
        proptest::collection::btree_set(0..3usize, 0..3).prop_map(Who::Clinician),
    ]
}

/// A resource type and its two Patient-compartment fields, in the CompartmentDefinition's
/// order: (type, first field, second field, whether the second is a list, the search
/// parameter of the second).
const KINDS: [(&str, &str, &str, bool, &str); 3] = [
    ("Observation", "subject", "performer", true, "performer"),
    ("Condition", "subject", "asserter", false, "asserter"),
    ("DocumentReference", "subject", "author", true, "author"),
];

/// A record of kind `k` naming `first` and `second` in its two compartment fields.
fn record(k: usize, first: &Name, second: &Name, patients: &[String]) -> Value {
    let (rtype, f1, f2, list, _) = KINDS[k];
    let mut r = match rtype {
        "Observation" => json!({"resourceType": rtype, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}),
        "Condition" => json!({"resourceType": rtype,
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}}),
        _ => json!({"resourceType": rtype, "status": "current",
            "content": [{"attachment": {"contentType": "text/plain", "data": "aGk="}}]}),
    };
    if let Some(x) = first.reference(patients) {
        r[f1] = json!({"reference": x});
    }
    if let Some(x) = second.reference(patients) {
        r[f2] = if list {
            json!([{"reference": x}])
        } else {
            json!({"reference": x})
        };
    }
    r
}

/// The model: whom a record (first, second compartment field) belongs to, and whether
/// `who` reaches it.
fn owner(first: &Name, second: &Name) -> Option<usize> {
    first.local().or(second.local())
}

fn reaches(who: &Who, owner: Option<usize>) -> bool {
    match (who, owner) {
        (Who::System, _) => true,
        (Who::Patient(p), Some(o)) => *p == o,
        (Who::Clinician(ps), Some(o)) => ps.contains(&o),
        (_, None) => false,
    }
}

fn ids_of(bundle: &Value, rtype: &str, among: &BTreeSet<String>) -> BTreeSet<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["resource"]["resourceType"] == rtype)
        .filter_map(|e| e["resource"]["id"].as_str())
        .filter(|id| among.contains(*id))
        .map(str::to_owned)
        .collect()
}

fn person_token(who: &Who, patients: &[String], tag: &str) -> String {
    let w = world();
    let system = token(None, "system/*.cruds");
    let (role, practitioner, patient, scope) = match who {
        Who::System => return token(None, "system/*.rs"),
        Who::Patient(i) => (
            Role::Patient,
            None,
            Some(patients[*i].clone()),
            "patient/*.rs",
        ),
        Who::Clinician(treats) => {
            let pr = create(
                &system,
                &json!({"resourceType": "Practitioner", "name": [{"family": "Adams"}]}),
            );
            for i in treats {
                create(
                    &system,
                    &json!({"resourceType": "CareTeam", "status": "active",
                        "subject": {"reference": format!("Patient/{}", patients[*i])},
                        "participant": [{"member": {"reference": format!("Practitioner/{pr}")}}]}),
                );
            }
            (Role::Clinician, Some(pr), None, "user/*.rs")
        }
    };
    let id: [u8; 16] = *uuid::Uuid::new_v4().as_bytes();
    let rec = UserRecord::new(
        id,
        &format!("user-{tag}-{}", uuid::Uuid::new_v4().simple()),
        role,
        practitioner.as_deref(),
        patient.as_deref(),
        "tulip-gravel-orbit-55",
        &[3; 16],
        [4; 20],
        now(),
    )
    .expect("record");
    w.app.vault.engine.users().add(&rec).expect("add user");
    let person = Person {
        user_id: rec.id.clone(),
        role,
        generation: rec.generation,
        fhir_user: practitioner
            .map(|p| format!("Practitioner/{p}"))
            .or(patient.as_ref().map(|p| format!("Patient/{p}"))),
        patient,
    };
    token(Some(&person), scope)
}

/// The records of one kind: id -> (the patient it belongs to, the patient a search by its
/// second field matches).
type Made = BTreeMap<String, (Option<usize>, Option<usize>)>;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_path_returns_exactly_what_the_one_rule_allows(
        records in proptest::collection::vec((0..KINDS.len(), name(), name()), 1..8),
        who in who(),
    ) {
        let system = token(None, "system/*.cruds");
        let patients: Vec<String> = (0..3)
            .map(|i| create(&system, &json!({"resourceType": "Patient",
                "name": [{"family": format!("Prop{i}")}]})))
            .collect();
        // per kind: id -> (owner, the patient a search by the second field matches)
        let mut made: Vec<Made> = vec![BTreeMap::new(); KINDS.len()];
        for (k, first, second) in &records {
            // Condition.subject is required: no subject names a group instead
            let first = match (KINDS[*k].0, first) {
                ("Condition", Name::Absent) => &Name::Group,
                _ => first,
            };
            let id = create(&system, &record(*k, first, second, &patients));
            made[*k].insert(id, (owner(first, second), second.searched_as()));
        }
        let t = person_token(&who, &patients, "p");
        for (k, made) in made.iter().enumerate() {
            let (rtype, _, _, _, second_param) = KINDS[k];
            let all: BTreeSet<String> = made.keys().cloned().collect();
            let allowed: BTreeSet<String> = made
                .iter()
                .filter(|(_, (o, _))| reaches(&who, *o))
                .map(|(id, _)| id.clone())
                .collect();
            // read: exactly the allowed ones open
            for id in &all {
                let (status, _) = call("GET", &format!("{rtype}/{id}"), &t, None);
                prop_assert_eq!(status == 200, allowed.contains(id), "read {} {} -> {}", rtype, id, status);
                if status != 200 {
                    prop_assert_eq!(status, 404);
                }
            }
            if all.is_empty() {
                continue;
            }
            // type search and its count agree with read
            let ids = all.iter().cloned().collect::<Vec<_>>().join(",");
            let (status, b) = call("GET", &format!("{rtype}?_id={ids}&_count=100"), &t, None);
            prop_assert_eq!(status, 200, "{}", b);
            prop_assert_eq!(&ids_of(&b, rtype, &all), &allowed, "search {}", rtype);
            let (_, b) = call("GET", &format!("{rtype}?_id={ids}&_summary=count"), &t, None);
            prop_assert_eq!(b["total"].as_u64(), Some(allowed.len() as u64), "count {}", rtype);
            // per patient: the compartment route, $everything and _revinclude by the
            // second field
            for (i, p) in patients.iter().enumerate() {
                let reached = reaches(&who, Some(i));
                let mine: BTreeSet<String> = made
                    .iter()
                    .filter(|(id, (o, _))| *o == Some(i) && allowed.contains(*id))
                    .map(|(id, _)| id.clone())
                    .collect();
                let (status, b) = call("GET", &format!("Patient/{p}/{rtype}?_count=100"), &t, None);
                if reached {
                    prop_assert_eq!(status, 200, "{}", b);
                    prop_assert_eq!(&ids_of(&b, rtype, &all), &mine, "compartment {} {}", rtype, i);
                } else {
                    prop_assert_eq!(status, 403, "compartment of an unreached patient");
                }
                let (status, b) = call("GET", &format!("Patient/{p}/$everything"), &t, None);
                if reached {
                    prop_assert_eq!(status, 200);
                    prop_assert_eq!(&ids_of(&b, rtype, &all), &mine, "$everything {} {}", rtype, i);
                } else {
                    prop_assert_ne!(status, 200);
                }
                let named: BTreeSet<String> = made
                    .iter()
                    .filter(|(id, (_, by))| reached && *by == Some(i) && allowed.contains(*id))
                    .map(|(id, _)| id.clone())
                    .collect();
                let (status, b) = call(
                    "GET",
                    &format!("Patient?_id={p}&_revinclude={rtype}:{second_param}"),
                    &t,
                    None,
                );
                prop_assert_eq!(status, 200, "{}", b);
                prop_assert_eq!(&ids_of(&b, rtype, &all), &named, "_revinclude {} {}", rtype, i);
            }
        }
    }
}
