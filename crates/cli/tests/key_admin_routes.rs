//! The key-management routes issue 17 added, as people's tokens see them: a patient's app
//! and a clinician's reach neither erasure nor KEK rotation, and a stranger without a token
//! reaches neither (erasure is a back-end client's, named by its own scope; the admin
//! person's path to rotation is covered by `auth::policy`'s unit tests, since an admin signs
//! in to no clinical scope an app could hold).
mod common;
use common::flow::*;
use common::*;
use serde_json::json;

#[test]
fn patients_clinicians_and_strangers_reach_neither_erasure_nor_rotation() {
    let server = Server::start();
    let system = server.token("system/*.cruds");
    let patient = server.post(
        "Patient",
        &system,
        &json!({"resourceType": "Patient", "gender": "other"}),
    );
    assert_eq!(patient.status, 201);
    let pid = patient.json()["id"].as_str().expect("id").to_owned();
    let pr = server.post(
        "Practitioner",
        &system,
        &json!({"resourceType": "Practitioner"}),
    );
    let pr = pr.json()["id"].as_str().expect("id").to_owned();
    // the clinician treats the patient
    let enc = server.post(
        "Encounter",
        &system,
        &json!({"resourceType": "Encounter", "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": format!("Patient/{pid}")},
            "participant": [{"individual": {"reference": format!("Practitioner/{pr}")}}]}),
    );
    assert_eq!(enc.status, 201, "{}", String::from_utf8_lossy(&enc.body));

    let app = App::register_for(
        &server,
        "Key routes test",
        "patient/*.rs user/*.cruds openid fhirUser launch/patient offline_access",
    );
    let now = now();
    let secret = add_user(&server, "pat.k", &pid);
    let pat = app.token(
        &server,
        "pat.k",
        &secret,
        now,
        "patient/Patient.rs openid fhirUser launch/patient",
    );
    let secret = add_person(&server, "dr.k", "clinician", &pr);
    let clin = app.token(
        &server,
        "dr.k",
        &secret,
        now,
        "user/Patient.rs openid fhirUser",
    );

    let erase = |tok: Option<&str>| {
        let body = json!({"resourceType": "Parameters",
            "parameter": [{"name": "reason", "valueString": "key routes test"}]});
        server.send(
            "POST",
            &format!("{}/Patient/{pid}/$erase", server.base),
            tok,
            Some(("application/fhir+json", body.to_string().into_bytes())),
            &[],
        )
    };
    let rotate = |tok: Option<&str>| {
        server.send(
            "POST",
            &format!("{}/admin/keys/rotate-kek", server.origin),
            tok,
            None,
            &[],
        )
    };
    // a stranger: no token, no door
    assert_eq!(erase(None).status, 401);
    assert_eq!(rotate(None).status, 401);
    for (who, tok) in [("patient", &pat), ("clinician", &clin)] {
        let r = erase(Some(tok));
        assert_eq!(
            r.status,
            403,
            "{who} erased: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.is_outcome(), "{who}");
    }
    for (who, tok) in [("patient", &pat), ("clinician", &clin)] {
        let r = rotate(Some(tok));
        assert_eq!(
            r.status,
            403,
            "{who} rotated: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.is_outcome(), "{who}");
    }
    // the patient's record is still there and still theirs
    assert_eq!(server.get(&format!("Patient/{pid}"), &pat).status, 200);
    assert_eq!(server.get(&format!("Patient/{pid}"), &clin).status, 200);
}
