//! One door to every record, through the real binary (issue 15): a record belongs, for
//! access, to the one patient whose key seals it. Being named as performer (or any other
//! participant) opens nothing — on read, search, counts, `_has`, includes, compartment
//! routes, `$everything`, history and batch entries, for a patient's app and for a
//! clinician; a reference spelled as this server's own absolute URL is local; a DPoP-bound
//! app can use the compartment route.
mod common;
use common::flow::*;
use common::*;

use serde_json::{Value, json};

/// The ids of a searchset's resources of `rtype`.
fn ids(bundle: &Value, rtype: &str) -> Vec<String> {
    let mut v: Vec<String> = bundle["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["resource"]["resourceType"] == rtype)
                .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn created(r: Resp) -> String {
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().expect("id").to_owned()
}

fn obs(code: &str, subject: &str, performer: Option<&str>) -> Value {
    let mut o = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject}});
    if let Some(p) = performer {
        o["performer"] = json!([{"reference": p}]);
    }
    o
}

struct World {
    server: Server,
    system: String,
    a: String,
    b: String,
    /// subject B, performer Patient/A
    b_names_a: String,
    /// subject A, performer Patient/B (written by A's clinician)
    a_names_b: String,
    /// subject B spelled as this server's absolute URL
    b_absolute: String,
    /// an Observation about no patient
    nobody: String,
    /// the Practitioner A's clinician is
    pr: String,
    /// A's clinician's token
    clinician: String,
    /// A's and B's apps' tokens
    pat_a: String,
    pat_b: String,
}

fn world() -> World {
    let server = Server::start();
    let system = server.token("system/*.cruds");
    let a = created(server.post("Patient", &system, &patient()));
    let b = created(server.post("Patient", &system, &patient()));
    let pr = created(server.post(
        "Practitioner",
        &system,
        &json!({"resourceType": "Practitioner", "name": [{"family": "Adams"}]}),
    ));
    let team = json!({"resourceType": "CareTeam", "status": "active",
        "subject": {"reference": format!("Patient/{a}")},
        "participant": [{"member": {"reference": format!("Practitioner/{pr}")}}]});
    created(server.post("CareTeam", &system, &team));
    let b_names_a = created(server.post(
        "Observation",
        &system,
        &obs(
            "1111-1",
            &format!("Patient/{b}"),
            Some(&format!("Patient/{a}")),
        ),
    ));
    let b_absolute = created(server.post(
        "Observation",
        &system,
        &obs("3333-3", &format!("{}/Patient/{b}", server.base), None),
    ));
    let nobody = created(server.post("Observation", &system, &obs("4444-4", "Group/ward-7", None)));
    let app = App::register_for(
        &server,
        "Door test",
        "patient/*.rs user/*.cruds openid fhirUser launch/patient offline_access",
    );
    let now = now();
    let secret = add_person(&server, "dr.adams", "clinician", &pr);
    let clinician = app.token(
        &server,
        "dr.adams",
        &secret,
        now,
        "user/Patient.rs user/Observation.cruds user/Practitioner.rs openid fhirUser",
    );
    let patient_scope = "patient/Patient.rs patient/Observation.rs openid fhirUser launch/patient";
    let secret = add_user(&server, "pat.a", &a);
    let pat_a = app.token(&server, "pat.a", &secret, now, patient_scope);
    let secret = add_user(&server, "pat.b", &b);
    let pat_b = app.token(&server, "pat.b", &secret, now, patient_scope);
    // A's clinician writes a record about A that names B as performer: it is A's record
    let a_names_b = created(server.post(
        "Observation",
        &clinician,
        &obs(
            "2222-2",
            &format!("Patient/{a}"),
            Some(&format!("Patient/{b}")),
        ),
    ));
    World {
        server,
        system,
        a,
        b,
        b_names_a,
        a_names_b,
        b_absolute,
        nobody,
        pr,
        clinician,
        pat_a,
        pat_b,
    }
}

/// Every path a token can list or open Observations by gives exactly `expect` among the
/// world's observations (and never any of `hidden`).
fn paths_agree(w: &World, token: &str, patient: &str, expect: &[&str], hidden: &[&str]) {
    let s = &w.server;
    let mut expect: Vec<String> = expect.iter().map(|e| (*e).to_owned()).collect();
    expect.sort();
    let listed = |path: &str, rtype: &str| {
        let r = s.get(path, token);
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        ids(&r.json(), rtype)
            .into_iter()
            .filter(|i| expect.contains(i) || hidden.contains(&i.as_str()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed("Observation?_count=100", "Observation"),
        expect,
        "type search"
    );
    assert_eq!(
        listed(&format!("Patient/{patient}/Observation"), "Observation"),
        expect,
        "compartment route"
    );
    assert_eq!(
        listed(&format!("Patient/{patient}/$everything"), "Observation"),
        expect,
        "$everything"
    );
    assert_eq!(
        listed(
            &format!(
                "Patient?_id={patient}&_revinclude=Observation:performer&_revinclude=Observation:subject"
            ),
            "Observation"
        ),
        expect,
        "_revinclude"
    );
    for h in hidden {
        assert_eq!(
            s.get(&format!("Observation/{h}"), token).status,
            404,
            "read {h}"
        );
        assert_eq!(
            s.get(&format!("Observation/{h}/_history/1"), token).status,
            404,
            "vread {h}"
        );
        assert_eq!(
            s.get(&format!("Observation/{h}/_history"), token).status,
            404,
            "history {h}"
        );
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": format!("Observation/{h}")}}]});
        let r = s.post("", token, &batch);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json()["entry"][0]["response"]["status"]
                .as_str()
                .map(|t| t.starts_with("404")),
            Some(true),
            "batch read {h}: {}",
            r.json()
        );
        let r = s.get(&format!("Observation?_id={h}&_summary=count"), token);
        assert_eq!(r.json()["total"], 0, "count of {h}");
        let r = s.get(&format!("Observation?_id={h}&_total=accurate"), token);
        assert_eq!(r.json()["total"], 0, "total of {h}");
    }
    for e in &expect {
        assert_eq!(
            s.get(&format!("Observation/{e}"), token).status,
            200,
            "read {e}"
        );
    }
}

#[test]
fn a_record_belongs_to_the_patient_it_is_about_on_every_path() {
    let w = world();
    let s = &w.server;
    // A's app: A's own record (naming B) only; not B's record naming A as performer
    paths_agree(&w, &w.pat_a, &w.a, &[&w.a_names_b], &[&w.b_names_a]);
    // B's app: B's own record; not A's record naming B
    paths_agree(&w, &w.pat_b, &w.b, &[&w.b_names_a], &[&w.a_names_b]);
    // A's clinician: A's record; not B's, however it names A
    paths_agree(&w, &w.clinician, &w.a, &[&w.a_names_b], &[&w.b_names_a]);
    // searches by the naming field itself, counts and `_has` tell nothing either
    for (token, me) in [(&w.pat_a, &w.a), (&w.clinician, &w.a)] {
        let r = s.get(&format!("Observation?performer=Patient/{me}"), token);
        assert_eq!(ids(&r.json(), "Observation"), Vec::<String>::new());
        let r = s.get("Observation?code=1111-1&_summary=count", token);
        assert_eq!(r.json()["total"], 0);
        let r = s.get("Patient?_has:Observation:performer:code=1111-1", token);
        assert_eq!(ids(&r.json(), "Patient"), Vec::<String>::new(), "_has");
        let r = s.get(
            "Observation?subject:Patient.name=Quixotewright&code=1111-1",
            token,
        );
        assert_eq!(ids(&r.json(), "Observation"), Vec::<String>::new(), "chain");
    }
    // a system client still sees everything
    let r = s.get("Observation?_count=100", &w.system);
    assert_eq!(ids(&r.json(), "Observation").len(), 4);
}

#[test]
fn a_reference_to_this_servers_own_base_is_local_and_unowned_records_stay_closed() {
    let w = world();
    let s = &w.server;
    // the absolute own-base reference was stored as the local one it names
    let stored = s
        .get(&format!("Observation/{}", w.b_absolute), &w.system)
        .json();
    assert_eq!(stored["subject"]["reference"], format!("Patient/{}", w.b));
    // in a transaction too, for a patient the transaction itself writes
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "door-tx-1"},
         "request": {"method": "PUT", "url": "Patient/door-tx-1"}},
        {"resource": obs("7777-1", &format!("{}/Patient/door-tx-1", s.base), None),
         "request": {"method": "POST", "url": "Observation"}}]});
    let r = s.post("", &w.system, &tx);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let made = s.get("Observation?code=7777-1", &w.system).json();
    assert_eq!(
        made["entry"][0]["resource"]["subject"]["reference"],
        "Patient/door-tx-1"
    );
    paths_agree(
        &w,
        &w.pat_b,
        &w.b,
        &[&w.b_names_a, &w.b_absolute],
        &[&w.nobody],
    );
    paths_agree(
        &w,
        &w.clinician,
        &w.a,
        &[&w.a_names_b],
        &[&w.b_absolute, &w.nobody],
    );
    paths_agree(
        &w,
        &w.pat_a,
        &w.a,
        &[&w.a_names_b],
        &[&w.b_absolute, &w.nobody],
    );
}

#[test]
fn writes_reach_only_the_patient_the_record_is_about() {
    let w = world();
    let s = &w.server;
    let other = |subject: String| obs("5555-5", &subject, Some(&format!("Patient/{}", w.a)));
    // B's record, however spelled, is not A's clinician's to write
    for subject in [
        format!("Patient/{}", w.b),
        format!("{}/Patient/{}", s.base, w.b),
        format!("{}/Patient/{}/_history/1", s.base.to_uppercase(), w.b)
            .replacen("/FHIR/", "/fhir/", 1),
    ] {
        let r = s.post("Observation", &w.clinician, &other(subject.clone()));
        assert_eq!(
            r.status,
            403,
            "{subject}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.is_outcome());
    }
    // nor a record about no patient
    let r = s.post("Observation", &w.clinician, &obs("5555-5", "Group/g", None));
    assert_eq!(r.status, 403);
    // nor moving A's record to B by update
    let mut moved = s
        .get(&format!("Observation/{}", w.a_names_b), &w.system)
        .json();
    moved["subject"]["reference"] = json!(format!("Patient/{}", w.b));
    let r = s.put(
        &format!("Observation/{}", w.a_names_b),
        &w.clinician,
        &moved,
        &[],
    );
    assert_eq!(r.status, 403);
    // a reference on this server that names no resource cannot be resolved safely: refused
    for bad in [
        format!("{}/Patient/{}?x=1", s.base, w.b),
        format!("{}//Patient/{}", s.base, w.b),
        format!("{}/../fhir/Patient/{}", s.base, w.b),
        format!("{}/metadata", s.origin),
    ] {
        let r = s.post("Observation", &w.system, &obs("6666-6", &bad, None));
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.is_outcome());
    }
    // another server's reference stays external (in no compartment)
    let r = s.post(
        "Observation",
        &w.system,
        &obs(
            "7777-7",
            &format!("https://elsewhere.example/fhir/Patient/{}", w.b),
            None,
        ),
    );
    let ext = created(r);
    assert_eq!(s.get(&format!("Observation/{ext}"), &w.pat_b).status, 404);
    assert_eq!(
        s.get(&format!("Observation/{ext}"), &w.clinician).status,
        404
    );
}

#[test]
fn a_dpop_bound_app_uses_the_compartment_route() {
    use phivault_auth::dpop::ProofKey;
    let server = Server::start();
    let system = server.token("system/*.cruds");
    let a = created(server.post("Patient", &system, &patient()));
    let o = created(server.post(
        "Observation",
        &system,
        &obs("1111-1", &format!("Patient/{a}"), None),
    ));
    let data = server.data.to_str().expect("path").to_owned();
    let out = cli(
        &[
            "app",
            "add",
            "--data-dir",
            &data,
            "--name",
            "Phone app",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            "patient/*.rs openid fhirUser launch/patient",
        ],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let app: Value = serde_json::from_slice(&out.stdout).expect("app json");
    let client_id = app["client_id"].as_str().expect("client_id").to_owned();
    let secret = add_user(&server, "pat.a", &a);
    let now = now();
    let verifier = "v".repeat(64);
    let challenge = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref(),
    );
    let q: Vec<String> = [
        ("response_type", "code"),
        ("client_id", client_id.as_str()),
        ("redirect_uri", REDIRECT),
        ("scope", "patient/*.rs openid fhirUser launch/patient"),
        ("state", "st-1"),
        ("aud", server.base.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", enc(v)))
    .collect();
    let agent = browser(&server);
    let url = format!("{}/auth/authorize?{}", server.origin, q.join("&"));
    let otp = phivault_auth::totp::code_at(&secret, now);
    let code = sign_in_at(&server, &agent, &url, "pat.a", &otp, None);
    let key = ProofKey::generate().expect("key");
    let token_url = format!("{}/auth/token", server.origin);
    let p = post_form_with(
        &agent,
        &token_url,
        &[(
            "DPoP",
            &key.proof("POST", &token_url, now, None).expect("proof"),
        )],
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", &client_id),
            ("code_verifier", &verifier),
        ],
    );
    assert_eq!(p.status, 200, "{}", p.body);
    let t: Value = serde_json::from_str(&p.body).expect("token");
    assert_eq!(t["token_type"], "DPoP");
    let access = t["access_token"].as_str().expect("access").to_owned();
    for path in [
        format!("Patient/{a}/Observation"),
        format!("Patient/{a}/$everything"),
        "Observation".to_owned(),
        format!("Patient/{a}"),
    ] {
        let url = format!("{}/{path}", server.base);
        let proof = key.proof("GET", &url, now, Some(&access)).expect("proof");
        let r = server.send(
            "GET",
            &url,
            None,
            None,
            &[
                ("Authorization", &format!("DPoP {access}")),
                ("DPoP", &proof),
            ],
        );
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if path.contains("Observation") || path.contains("everything") {
            assert!(ids(&r.json(), "Observation").contains(&o), "{path}");
        }
    }
}

#[test]
fn another_servers_practitioner_makes_no_treatment_relationship() {
    let w = world();
    let s = &w.server;
    let c = created(s.post("Patient", &w.system, &patient()));
    let foreign = format!("https://elsewhere.example/fhir/Practitioner/{}", w.pr);
    // relationships that name "the same" practitioner on another server
    created(s.post(
        "CareTeam",
        &w.system,
        &json!({"resourceType": "CareTeam", "status": "active",
            "subject": {"reference": format!("Patient/{c}")},
            "participant": [{"member": {"reference": foreign}}]}),
    ));
    created(s.post(
        "Encounter",
        &w.system,
        &json!({"resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": format!("Patient/{c}")},
            "participant": [{"individual": {"reference": foreign}}]}),
    ));
    assert_eq!(s.get(&format!("Patient/{c}"), &w.clinician).status, 404);
    // the same relationship naming ours does
    created(s.post(
        "CareTeam",
        &w.system,
        &json!({"resourceType": "CareTeam", "status": "active",
            "subject": {"reference": format!("Patient/{c}")},
            "participant": [{"member": {"reference": format!("Practitioner/{}", w.pr)}}]}),
    ));
    assert_eq!(s.get(&format!("Patient/{c}"), &w.clinician).status, 200);
}

#[test]
fn two_sets_of_credentials_are_refused_whatever_their_order() {
    let w = world();
    let s = &w.server;
    let url = format!("{}/Observation/{}", s.base, w.b_names_a);
    for (first, second) in [(&w.pat_a, &w.system), (&w.system, &w.pat_a)] {
        let r = s.send(
            "GET",
            &url,
            Some(first),
            None,
            &[("Authorization", &format!("Bearer {second}"))],
        );
        assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            r.header("www-authenticate")
                .is_some_and(|h| h.contains("invalid_request"))
        );
    }
}
