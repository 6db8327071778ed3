//! FHIR REST semantics over HTTPS, and bad input: every malformed request is a 4xx with an
//! OperationOutcome, never a 5xx.
mod common;
use common::*;

use serde_json::{Value, json};

fn body(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body)
        .chars()
        .take(2000)
        .collect()
}

fn expect(r: &Resp, want: u16, what: &str) {
    assert_eq!(r.status, want, "{what}: got {} {}", r.status, body(r));
}

/// A 4xx with an OperationOutcome body.
fn expect_4xx(r: &Resp, what: &str) {
    assert!(
        (400..500).contains(&r.status),
        "{what}: expected 4xx, got {} {}",
        r.status,
        body(r)
    );
    assert!(r.is_outcome(), "{what}: body is not an OperationOutcome");
}

fn id_of(r: &Resp) -> String {
    r.json()["id"].as_str().expect("id").to_owned()
}

fn send_raw(s: &Server, method: &str, path: &str, token: &str, ct: &str, bytes: Vec<u8>) -> Resp {
    let url = if path.is_empty() {
        s.base.clone()
    } else {
        format!("{}/{path}", s.base)
    };
    s.send(method, &url, Some(token), Some((ct, bytes)), &[])
}

fn post_with(s: &Server, path: &str, token: &str, v: &Value, headers: &[(&str, &str)]) -> Resp {
    s.send(
        "POST",
        &format!("{}/{path}", s.base),
        Some(token),
        Some(("application/fhir+json", v.to_string().into_bytes())),
        headers,
    )
}

fn patient_with_identifier(value: &str) -> Value {
    let mut p = patient();
    p["identifier"] = json!([{"system": "urn:oid:1.2.3", "value": value}]);
    p
}

fn history_len(s: &Server, t: &str, rtype: &str) -> usize {
    let h = s.get(&format!("{rtype}/_history?_count=1000"), t);
    expect(&h, 200, "type history");
    h.json()["entry"].as_array().map(Vec::len).unwrap_or(0)
}

fn status_of(entry: &Value) -> String {
    entry["response"]["status"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn create_read_update_delete_history() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let t = t.as_str();

    // create: server-owned fields supplied by the client are ignored (API3)
    let mut p = patient();
    p["id"] = json!("client-chosen-id");
    p["meta"] = json!({"versionId": "7", "lastUpdated": "2001-01-01T00:00:00Z"});
    let r = s.post("Patient", t, &p);
    expect(&r, 201, "create");
    let created = r.json();
    let id = id_of(&r);
    assert_ne!(id, "client-chosen-id");
    assert_eq!(
        r.header("location"),
        Some(format!("{}/Patient/{id}/_history/1", s.base).as_str())
    );
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    let lm = r.header("last-modified").expect("Last-Modified");
    assert!(lm.ends_with("GMT"), "{lm}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/fhir+json")
    );
    assert_eq!(created["meta"]["versionId"], "1");
    let updated = created["meta"]["lastUpdated"]
        .as_str()
        .expect("lastUpdated");
    assert!(!updated.starts_with("2001"), "{updated}");
    assert_eq!(created["name"], patient()["name"]);
    assert_eq!(created["resourceType"], "Patient");

    // read
    let g = s.get(&format!("Patient/{id}"), t);
    expect(&g, 200, "read");
    assert_eq!(g.json(), created);
    assert_eq!(g.header("etag"), Some("W/\"1\""));
    assert_eq!(g.header("cache-control"), Some("no-store"));
    assert!(g.header("last-modified").is_some());
    // the client-chosen id does not exist
    expect(
        &s.get("Patient/client-chosen-id", t),
        404,
        "client id ignored",
    );

    // update
    let mut p2 = created.clone();
    p2["gender"] = json!("other");
    let u = s.put(&format!("Patient/{id}"), t, &p2, &[]);
    expect(&u, 200, "update");
    assert_eq!(u.header("etag"), Some("W/\"2\""));
    assert_eq!(u.json()["meta"]["versionId"], "2");
    assert_eq!(u.json()["gender"], "other");
    assert_eq!(
        u.header("location"),
        Some(format!("{}/Patient/{id}/_history/2", s.base).as_str())
    );
    // update with a body id that differs from the URL id, or none at all
    let mut wrong = p2.clone();
    wrong["id"] = json!("some-other-id");
    expect_4xx(
        &s.put(&format!("Patient/{id}"), t, &wrong, &[]),
        "id mismatch",
    );
    expect(
        &s.put(&format!("Patient/{id}"), t, &wrong, &[]),
        400,
        "id mismatch",
    );
    let mut no_id = p2.clone();
    no_id.as_object_mut().expect("obj").remove("id");
    expect(
        &s.put(&format!("Patient/{id}"), t, &no_id, &[]),
        400,
        "no id",
    );
    // If-Match
    let r = s.put(&format!("Patient/{id}"), t, &p2, &[("If-Match", "W/\"1\"")]);
    expect(&r, 412, "stale If-Match");
    assert!(r.is_outcome());
    let r = s.put(&format!("Patient/{id}"), t, &p2, &[("If-Match", "W/\"2\"")]);
    expect(&r, 200, "current If-Match");
    assert_eq!(r.header("etag"), Some("W/\"3\""));
    // vread of every version, and a missing one
    for v in 1..=3 {
        let r = s.get(&format!("Patient/{id}/_history/{v}"), t);
        expect(&r, 200, "vread");
        assert_eq!(r.json()["meta"]["versionId"], v.to_string());
        assert_eq!(r.header("etag"), Some(format!("W/\"{v}\"").as_str()));
    }
    expect(
        &s.get(&format!("Patient/{id}/_history/4"), t),
        404,
        "vread v4",
    );
    expect(
        &s.get(&format!("Patient/{id}/_history/0"), t),
        404,
        "vread v0",
    );

    // update-as-create on a new, valid id
    let new_id = format!("client-{}", rand_hex());
    let mut p3 = patient();
    p3["id"] = json!(new_id);
    let r = s.put(&format!("Patient/{new_id}"), t, &p3, &[]);
    expect(&r, 201, "update-as-create");
    assert_eq!(r.json()["id"], json!(new_id));
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    assert_eq!(
        r.header("location"),
        Some(format!("{}/Patient/{new_id}/_history/1", s.base).as_str())
    );

    // delete
    let r = s.delete(&format!("Patient/{id}"), t);
    expect(&r, 204, "delete");
    assert!(r.body.is_empty());
    let r = s.get(&format!("Patient/{id}"), t);
    expect(&r, 410, "read after delete");
    assert!(r.is_outcome());
    let r = s.get(&format!("Patient/{id}/_history/1"), t);
    expect(&r, 200, "vread v1 after delete");
    assert_eq!(r.json()["gender"], "female");
    // deleting again is idempotent; deleting something never created is 404
    let r = s.delete(&format!("Patient/{id}"), t);
    assert!(
        r.status == 204 || r.status == 200,
        "second delete: {}",
        r.status
    );
    expect(&s.delete("Patient/never-existed", t), 404, "delete unknown");

    // instance history: newest first, includes the delete
    let h = s.get(&format!("Patient/{id}/_history"), t);
    expect(&h, 200, "instance history");
    let hj = h.json();
    assert_eq!(hj["resourceType"], "Bundle");
    assert_eq!(hj["type"], "history");
    let entries = hj["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 4, "{hj}");
    assert_eq!(entries[0]["request"]["method"], "DELETE");
    assert!(entries[0].get("resource").is_none());
    let versions: Vec<String> = entries[1..]
        .iter()
        .map(|e| {
            e["resource"]["meta"]["versionId"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(versions, ["3", "2", "1"]);
    assert_eq!(entries[3]["request"]["method"], "POST");

    // type history with _count
    for _ in 0..3 {
        expect(&s.post("Patient", t, &patient()), 201, "create more");
    }
    let h = s.get("Patient/_history?_count=2", t);
    expect(&h, 200, "type history");
    let hj = h.json();
    assert_eq!(hj["type"], "history");
    assert_eq!(hj["entry"].as_array().map(Vec::len), Some(2), "{hj}");
    let all = s.get("Patient/_history", t).json();
    // v1, v2, v3 and the delete of `id`, the update-as-create, and three more creates
    assert_eq!(all["entry"].as_array().map(Vec::len), Some(8), "{all}");
    let h = s.get("Patient/_history?_count=0", t);
    assert!(h.status == 200 || h.status == 400, "_count=0: {}", h.status);

    // not found
    expect_4xx(&s.get("Patient/unknown-id", t), "read unknown");
    expect(&s.get("Patient/unknown-id", t), 404, "read unknown");
    expect(
        &s.get("Patient/unknown-id/_history", t),
        404,
        "history unknown",
    );
    expect(&s.get("Foo/1", t), 404, "unknown type");
    expect_4xx(&s.get("Foo/1", t), "unknown type");
    expect(
        &s.post("Foo", t, &json!({"resourceType": "Foo"})),
        404,
        "create unknown type",
    );

    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}

#[test]
fn conditional_create() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let t = t.as_str();
    let ident = format!("MRN-{}", rand_hex());
    let criteria = format!("identifier=urn:oid:1.2.3|{ident}");
    let p = patient_with_identifier(&ident);
    let r1 = post_with(&s, "Patient", t, &p, &[("If-None-Exist", &criteria)]);
    expect(&r1, 201, "first conditional create");
    let id = id_of(&r1);
    let before = history_len(&s, t, "Patient");
    let r2 = post_with(&s, "Patient", t, &p, &[("If-None-Exist", &criteria)]);
    expect(&r2, 200, "second conditional create");
    assert_eq!(
        r2.header("location"),
        Some(format!("{}/Patient/{id}/_history/1", s.base).as_str())
    );
    // without a system, and percent-encoded
    let r3 = post_with(
        &s,
        "Patient",
        t,
        &p,
        &[("If-None-Exist", &format!("identifier={ident}"))],
    );
    expect(&r3, 200, "value-only criterion");
    let r4 = post_with(
        &s,
        "Patient",
        t,
        &p,
        &[(
            "If-None-Exist",
            &format!("identifier=urn%3Aoid%3A1.2.3%7C{ident}"),
        )],
    );
    expect(&r4, 200, "percent-encoded criterion");
    assert_eq!(
        history_len(&s, t, "Patient"),
        before,
        "a resource was created"
    );

    // two resources match: 412, nothing created
    let dup = format!("DUP-{}", rand_hex());
    for _ in 0..2 {
        expect(
            &s.post("Patient", t, &patient_with_identifier(&dup)),
            201,
            "dup",
        );
    }
    let before = history_len(&s, t, "Patient");
    let r = post_with(
        &s,
        "Patient",
        t,
        &patient_with_identifier(&dup),
        &[("If-None-Exist", &format!("identifier=urn:oid:1.2.3|{dup}"))],
    );
    expect(&r, 412, "two matches");
    assert!(r.is_outcome());
    assert_eq!(history_len(&s, t, "Patient"), before);
    // any search parameter can be a criterion: the family name of the first patient
    let family = p["name"][0]["family"].as_str().expect("family").to_owned();
    let before = history_len(&s, t, "Patient");
    let r = post_with(
        &s,
        "Patient",
        t,
        &p,
        &[(
            "If-None-Exist",
            &format!("family={family}&birthdate=1971-02-03"),
        )],
    );
    assert!(
        r.status == 200 || r.status == 412,
        "matched by family and birth date: {}",
        r.status
    );
    assert_eq!(history_len(&s, t, "Patient"), before, "nothing created");
    // unknown / result parameters / empty criteria
    expect_4xx(
        &post_with(&s, "Patient", t, &p, &[("If-None-Exist", "nonsense=Smith")]),
        "unknown criterion",
    );
    expect_4xx(
        &post_with(
            &s,
            "Patient",
            t,
            &p,
            &[("If-None-Exist", "family=x&_count=1")],
        ),
        "result parameter",
    );
    expect_4xx(
        &post_with(&s, "Patient", t, &p, &[("If-None-Exist", "identifier=")]),
        "empty criterion",
    );
    expect_4xx(
        &post_with(&s, "Patient", t, &p, &[("If-None-Exist", "")]),
        "empty header",
    );
}

#[test]
fn bad_input_is_4xx_with_an_outcome() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let t = t.as_str();
    let fj = "application/fhir+json";
    let r = s.post("Patient", t, &patient());
    expect(&r, 201, "create");
    let id = id_of(&r);
    let before = history_len(&s, t, "Patient");

    let mut deep = String::from("{\"resourceType\":\"Patient\",\"extension\":");
    deep.push_str(&"[".repeat(10_000));
    deep.push_str(&"]".repeat(10_000));
    deep.push('}');
    let mut deep_obj = String::from("{\"resourceType\":\"Patient\",\"a\":");
    deep_obj.push_str(&"{\"a\":".repeat(10_000));
    deep_obj.push('1');
    deep_obj.push_str(&"}".repeat(10_001));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", Vec::new()),
        (
            "malformed JSON",
            b"{\"resourceType\": \"Patient\",".to_vec(),
        ),
        (
            "trailing garbage",
            b"{\"resourceType\": \"Patient\"} x".to_vec(),
        ),
        ("JSON array", b"[{\"resourceType\": \"Patient\"}]".to_vec()),
        ("JSON string", b"\"Patient\"".to_vec()),
        ("JSON null", b"null".to_vec()),
        ("missing resourceType", b"{\"gender\": \"male\"}".to_vec()),
        ("numeric resourceType", b"{\"resourceType\": 5}".to_vec()),
        (
            "resourceType mismatch",
            br#"{"resourceType": "Observation", "status": "final", "code": {"text": "x"}}"#
                .to_vec(),
        ),
        (
            "unknown property",
            br#"{"resourceType": "Patient", "favouriteColour": "blue"}"#.to_vec(),
        ),
        (
            "wrong type",
            br#"{"resourceType": "Patient", "birthDate": 5}"#.to_vec(),
        ),
        (
            "invalid date",
            br#"{"resourceType": "Patient", "birthDate": "1999-02-30"}"#.to_vec(),
        ),
        (
            "invalid code",
            br#"{"resourceType": "Patient", "gender": "banana"}"#.to_vec(),
        ),
        (
            "duplicate key",
            br#"{"resourceType": "Patient", "gender": "male", "gender": "female"}"#.to_vec(),
        ),
        (
            "null value",
            br#"{"resourceType": "Patient", "gender": null}"#.to_vec(),
        ),
        (
            "empty array",
            br#"{"resourceType": "Patient", "name": []}"#.to_vec(),
        ),
        (
            "invalid UTF-8",
            b"{\"resourceType\": \"Pat\xff\xfeient\"}".to_vec(),
        ),
        ("nesting 10,000 deep (arrays)", deep.into_bytes()),
        ("nesting 10,000 deep (objects)", deep_obj.into_bytes()),
    ];
    for (what, bytes) in &cases {
        let r = send_raw(&s, "POST", "Patient", t, fj, bytes.clone());
        expect_4xx(&r, &format!("create: {what}"));
        let r = send_raw(&s, "PUT", &format!("Patient/{id}"), t, fj, bytes.clone());
        expect_4xx(&r, &format!("update: {what}"));
    }

    // unsupported media types
    let good = patient().to_string().into_bytes();
    for ct in [
        "text/plain",
        "application/xml",
        "application/fhir+xml",
        "multipart/form-data",
    ] {
        let r = send_raw(&s, "POST", "Patient", t, ct, good.clone());
        expect(&r, 415, ct);
        assert!(r.is_outcome());
    }
    // application/json and a charset parameter are fine
    expect(
        &send_raw(&s, "POST", "Patient", t, "application/json", good.clone()),
        201,
        "application/json",
    );
    expect(
        &send_raw(
            &s,
            "POST",
            "Patient",
            t,
            "application/fhir+json; charset=utf-8",
            good.clone(),
        ),
        201,
        "charset",
    );

    // invalid ids in URLs
    let long = format!("Patient/{}", "a".repeat(65));
    for path in ["Patient/a$b", "Patient/a%24b", "Patient/a_b", long.as_str()] {
        let r = s.get(path, t);
        assert!(
            r.status == 400 || r.status == 404,
            "GET {path}: {}",
            r.status
        );
        assert!(r.is_outcome(), "GET {path}");
        let r = s.put(path, t, &patient(), &[]);
        assert!(
            r.status == 400 || r.status == 404,
            "PUT {path}: {}",
            r.status
        );
        assert!(r.is_outcome(), "PUT {path}");
        let r = s.delete(path, t);
        assert!(
            r.status == 400 || r.status == 404,
            "DELETE {path}: {}",
            r.status
        );
    }
    // history paths
    expect(
        &s.get(&format!("Patient/{id}/_history/abc"), t),
        404,
        "_history/abc",
    );
    expect(
        &s.get(&format!("Patient/{id}/_history/-1"), t),
        404,
        "_history/-1",
    );
    expect(
        &s.get(&format!("Patient/{id}/_history/99999999999999999999999"), t),
        404,
        "_history/huge",
    );
    let r = s.get(&format!("Patient/{id}/_history?foo=bar"), t);
    expect(&r, 400, "unsupported _history param");
    assert!(r.is_outcome());
    expect(
        &s.get("Patient/_history?foo=bar", t),
        400,
        "type _history param",
    );
    expect(&s.get("Patient/_history?_count=abc", t), 400, "_count=abc");
    expect(&s.get("Patient/_history?_count=-1", t), 400, "_count=-1");
    // a huge _count is capped, not an error
    expect(
        &s.get("Patient/_history?_count=100000000", t),
        200,
        "huge _count",
    );
    // invalid If-Match
    let mut p = patient();
    p["id"] = json!(id);
    for bad in ["abc", "W/\"x\"", "\"\"", "W/\"-1\""] {
        let r = s.put(&format!("Patient/{id}"), t, &p, &[("If-Match", bad)]);
        expect(&r, 400, &format!("If-Match {bad}"));
        assert!(r.is_outcome());
    }
    // nothing was written by any of the above (besides the two accepted creates)
    assert_eq!(history_len(&s, t, "Patient"), before + 2);
    let g = s.get(&format!("Patient/{id}"), t);
    expect(&g, 200, "still v1");
    assert_eq!(g.header("etag"), Some("W/\"1\""));
}

#[test]
fn body_over_the_limit_is_413() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    // A syntactically valid resource just over 16 MiB.
    let pad = "x".repeat(16 * 1024 * 1024 + 16);
    let big = format!(
        "{{\"resourceType\":\"Patient\",\"id\":\"a\",\"gender\":\"male\",\"language\":\"{pad}\"}}"
    );
    let r = send_raw(
        &s,
        "POST",
        "Patient",
        &t,
        "application/fhir+json",
        big.clone().into_bytes(),
    );
    expect(&r, 413, "oversized create");
    assert!(r.is_outcome());
    let r = send_raw(
        &s,
        "POST",
        "",
        &t,
        "application/fhir+json",
        big.into_bytes(),
    );
    expect(&r, 413, "oversized bundle");
    // still healthy
    expect(&s.post("Patient", &t, &patient()), 201, "after 413");
}

fn observation_for(reference: &str) -> Value {
    json!({
        "resourceType": "Observation", "status": "final",
        "code": {"text": "body weight"},
        "subject": {"reference": reference},
        "valueQuantity": {"value": 72.5, "unit": "kg"}
    })
}

fn encounter_for(reference: &str) -> Value {
    json!({
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": reference}
    })
}

fn tx(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

fn post_entry(full_url: Option<&str>, resource: Value) -> Value {
    let rtype = resource["resourceType"].as_str().expect("type").to_owned();
    let mut e = json!({"resource": resource, "request": {"method": "POST", "url": rtype}});
    if let Some(u) = full_url {
        e["fullUrl"] = json!(u);
    }
    e
}

/// A location like `{base}/Patient/{id}/_history/1` → (`Patient`, `id`).
fn split_location(s: &Server, loc: &str) -> (String, String) {
    let rest = loc
        .strip_prefix(&format!("{}/", s.base))
        .unwrap_or_else(|| panic!("location {loc} not under base"));
    let parts: Vec<&str> = rest.split('/').collect();
    assert_eq!(parts.len(), 4, "{loc}");
    assert_eq!(parts[2], "_history");
    (parts[0].to_owned(), parts[1].to_owned())
}

/// Builds the entries of a transaction around a fresh identifier.
type EntriesFor<'a> = Box<dyn Fn(&str) -> Vec<Value> + 'a>;

#[test]
fn transactions_are_atomic() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let t = t.as_str();
    let urn = "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a";

    let ident = format!("TX-{}", rand_hex());
    let bundle = tx(
        "transaction",
        vec![
            post_entry(Some(urn), patient_with_identifier(&ident)),
            post_entry(None, observation_for(urn)),
            post_entry(None, encounter_for(urn)),
        ],
    );
    let r = s.post("", t, &bundle);
    expect(&r, 200, "transaction");
    let j = r.json();
    assert_eq!(j["resourceType"], "Bundle");
    assert_eq!(j["type"], "transaction-response");
    let entries = j["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 3);
    let mut ids = Vec::new();
    for (e, want) in entries.iter().zip(["Patient", "Observation", "Encounter"]) {
        assert!(status_of(e).starts_with("201"), "{e}");
        let loc = e["response"]["location"].as_str().expect("location");
        let (rtype, id) = split_location(&s, loc);
        assert_eq!(rtype, want);
        ids.push(id);
    }
    let pid = &ids[0];
    let o = s.get(&format!("Observation/{}", ids[1]), t);
    expect(&o, 200, "read observation");
    assert_eq!(
        o.json()["subject"]["reference"],
        json!(format!("Patient/{pid}"))
    );
    let e = s.get(&format!("Encounter/{}", ids[2]), t);
    assert_eq!(
        e.json()["subject"]["reference"],
        json!(format!("Patient/{pid}"))
    );
    expect(&s.get(&format!("Patient/{pid}"), t), 200, "read patient");

    // A failing transaction stores nothing. Each variant creates a patient with a fresh
    // identifier; afterwards a conditional create on that identifier must create (201).
    let existing = s.post("Patient", t, &patient());
    expect(&existing, 201, "existing");
    let eid = id_of(&existing);
    let mut stale = patient();
    stale["id"] = json!(eid);
    let before_obs = history_len(&s, t, "Observation");
    let variants: Vec<(&str, EntriesFor<'_>)> = vec![
        (
            "stale ifMatch",
            Box::new(|ident: &str| {
                vec![
                    post_entry(Some(urn), patient_with_identifier(ident)),
                    post_entry(None, observation_for(urn)),
                    json!({"resource": stale, "request":
                        {"method": "PUT", "url": format!("Patient/{eid}"), "ifMatch": "W/\"7\""}}),
                ]
            }),
        ),
        (
            "entry with an unknown property",
            Box::new(|ident: &str| {
                let mut bad = observation_for(urn);
                bad["favouriteColour"] = json!("blue");
                vec![
                    post_entry(Some(urn), patient_with_identifier(ident)),
                    post_entry(None, bad),
                ]
            }),
        ),
        (
            "dangling urn:uuid reference",
            Box::new(|ident: &str| {
                vec![
                    post_entry(Some(urn), patient_with_identifier(ident)),
                    post_entry(
                        None,
                        observation_for("urn:uuid:00000000-0000-4000-8000-000000000000"),
                    ),
                ]
            }),
        ),
        (
            "same resource twice",
            Box::new(|ident: &str| {
                let mut a = patient();
                a["id"] = json!(eid);
                let mut b = a.clone();
                b["gender"] = json!("male");
                vec![
                    post_entry(Some(urn), patient_with_identifier(ident)),
                    json!({"resource": a, "request": {"method": "PUT", "url": format!("Patient/{eid}")}}),
                    json!({"resource": b, "request": {"method": "PUT", "url": format!("Patient/{eid}")}}),
                ]
            }),
        ),
        (
            "update then delete of the same resource",
            Box::new(|ident: &str| {
                vec![
                    post_entry(Some(urn), patient_with_identifier(ident)),
                    json!({"resource": stale, "request": {"method": "PUT", "url": format!("Patient/{eid}")}}),
                    json!({"request": {"method": "DELETE", "url": format!("Patient/{eid}")}}),
                ]
            }),
        ),
        (
            "duplicate fullUrl",
            Box::new(|ident: &str| {
                vec![
                    post_entry(Some(urn), patient_with_identifier(ident)),
                    post_entry(Some(urn), patient()),
                ]
            }),
        ),
        (
            "resourceType does not match the url",
            Box::new(|ident: &str| {
                vec![
                    post_entry(Some(urn), patient_with_identifier(ident)),
                    json!({"resource": observation_for(urn), "request": {"method": "POST", "url": "Encounter"}}),
                ]
            }),
        ),
        (
            "unknown resource type in url",
            Box::new(|ident: &str| {
                vec![
                    post_entry(Some(urn), patient_with_identifier(ident)),
                    json!({"request": {"method": "DELETE", "url": "Foo/1"}}),
                ]
            }),
        ),
    ];
    for (what, build) in &variants {
        let ident = format!("FAIL-{}", rand_hex());
        let r = s.post("", t, &tx("transaction", build(&ident)));
        expect_4xx(&r, what);
        if *what == "stale ifMatch" {
            expect(&r, 412, what);
        }
        if what.starts_with("dangling") || what.starts_with("same resource") {
            expect(&r, 400, what);
        }
        let c = post_with(
            &s,
            "Patient",
            t,
            &patient_with_identifier(&ident),
            &[(
                "If-None-Exist",
                &format!("identifier=urn:oid:1.2.3|{ident}"),
            )],
        );
        expect(
            &c,
            201,
            &format!("{what}: the patient of the failed transaction was stored"),
        );
    }
    assert_eq!(
        history_len(&s, t, "Observation"),
        before_obs,
        "an Observation was stored"
    );
    let g = s.get(&format!("Patient/{eid}"), t);
    assert_eq!(
        g.header("etag"),
        Some("W/\"1\""),
        "existing patient changed"
    );

    // conditional create inside a transaction resolves to the existing resource
    let r = s.post(
        "",
        t,
        &tx(
            "transaction",
            vec![
                json!({"fullUrl": urn, "resource": patient_with_identifier(&ident), "request":
                    {"method": "POST", "url": "Patient",
                     "ifNoneExist": format!("identifier=urn:oid:1.2.3|{ident}")}}),
                post_entry(None, observation_for(urn)),
            ],
        ),
    );
    expect(&r, 200, "conditional transaction");
    let j = r.json();
    assert!(status_of(&j["entry"][0]).starts_with("200"), "{j}");
    let loc = j["entry"][1]["response"]["location"].as_str().expect("loc");
    let (_, oid) = split_location(&s, loc);
    let o = s.get(&format!("Observation/{oid}"), t);
    assert_eq!(
        o.json()["subject"]["reference"],
        json!(format!("Patient/{pid}"))
    );

    // POST /fhir with something that is not a batch/transaction Bundle
    expect_4xx(&s.post("", t, &patient()), "non-Bundle");
    expect(&s.post("", t, &patient()), 400, "non-Bundle");
    expect_4xx(
        &s.post(
            "",
            t,
            &json!({"resourceType": "Bundle", "type": "collection"}),
        ),
        "collection Bundle",
    );
    expect_4xx(
        &s.post("", t, &json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": patient(), "request": {"method": "POST", "url": "https://evil.example/Patient"}}
        ]})),
        "absolute request url",
    );
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}

#[test]
fn batch_entries_are_independent() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let t = t.as_str();
    let r = s.post("Patient", t, &patient());
    let eid = id_of(&r);
    // A PUT whose resource has no id: an entry-level error (a *mismatched* id is refused by
    // Bundle parsing, which fails the whole batch).
    let no_id = patient();
    let mut with_id = patient();
    with_id["id"] = json!(eid);
    let ident = format!("BATCH-{}", rand_hex());
    let b = tx(
        "batch",
        vec![
            post_entry(None, patient_with_identifier(&ident)),
            json!({"resource": no_id, "request": {"method": "PUT", "url": format!("Patient/{eid}")}}),
            json!({"request": {"method": "GET", "url": "Patient/does-not-exist"}}),
            json!({"request": {"method": "GET", "url": format!("Patient/{eid}")}}),
            json!({"request": {"method": "DELETE", "url": "Patient/does-not-exist"}}),
            json!({"resource": with_id, "request": {"method": "PUT", "url": format!("Patient/{eid}"), "ifMatch": "W/\"9\""}}),
        ],
    );
    let r = s.post("", t, &b);
    expect(&r, 200, "batch");
    let j = r.json();
    assert_eq!(j["type"], "batch-response");
    let e = j["entry"].as_array().expect("entries");
    assert_eq!(e.len(), 6);
    assert!(status_of(&e[0]).starts_with("201"), "{}", e[0]);
    for i in [1usize, 2, 4, 5] {
        let st = status_of(&e[i]);
        assert!(st.starts_with('4'), "entry {i}: {st}");
        assert_eq!(
            e[i]["response"]["outcome"]["resourceType"], "OperationOutcome",
            "entry {i}: {}",
            e[i]
        );
    }
    assert!(status_of(&e[2]).starts_with("404"));
    assert!(status_of(&e[5]).starts_with("412"));
    assert!(status_of(&e[3]).starts_with("200"));
    assert_eq!(e[3]["resource"]["id"], json!(eid));
    // the good entry was stored, the bad ones did nothing
    let c = post_with(
        &s,
        "Patient",
        t,
        &patient_with_identifier(&ident),
        &[(
            "If-None-Exist",
            &format!("identifier=urn:oid:1.2.3|{ident}"),
        )],
    );
    expect(&c, 200, "batch create was stored");
    assert_eq!(
        s.get(&format!("Patient/{eid}"), t).header("etag"),
        Some("W/\"1\"")
    );
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}

/// xorshift64*: a fixed-seed generator so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn fuzzed_bodies_never_5xx() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let t = t.as_str();
    let fj = "application/fhir+json";
    let valid = serde_json::to_vec(&json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-1"}],
        "name": [{"family": "Quixotewright", "given": ["Anastasia", "B"]}],
        "gender": "female", "birthDate": "1971-02-03", "active": true,
        "telecom": [{"system": "phone", "value": "555-0100"}],
        "address": [{"line": ["1 Main St"], "city": "Springfield", "postalCode": "12345"}]
    }))
    .expect("json");
    expect(
        &send_raw(&s, "POST", "Patient", t, fj, valid.clone()),
        201,
        "valid",
    );
    let before = history_len(&s, t, "Patient");

    let mut variants: Vec<Vec<u8>> = (0..valid.len())
        .step_by(7)
        .map(|n| valid[..n].to_vec())
        .collect();
    // Replace structural bytes (which always breaks the document) from a fixed seed.
    let structural: Vec<usize> = valid
        .iter()
        .enumerate()
        .filter(|(_, b)| b"{}[]:,\"".contains(*b))
        .map(|(i, _)| i)
        .collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    while variants.len() < 50 {
        let mut v = valid.clone();
        let pos = structural[rng.below(structural.len())];
        let mut byte = (rng.next() & 0xff) as u8;
        while byte == v[pos] || byte.is_ascii_whitespace() {
            byte = (rng.next() & 0xff) as u8;
        }
        v[pos] = byte;
        variants.push(v);
    }
    assert!(variants.len() >= 50);
    for (i, v) in variants.iter().enumerate() {
        let r = send_raw(&s, "POST", "Patient", t, fj, v.clone());
        expect_4xx(&r, &format!("variant {i} ({} bytes)", v.len()));
    }
    // Arbitrary byte flips anywhere may still be valid documents: never a 5xx, and a 201
    // only for a body that is itself valid JSON.
    let mut created = 0;
    for i in 0..30 {
        let mut v = valid.clone();
        for _ in 0..=(i % 3) {
            let pos = rng.below(v.len());
            v[pos] ^= 1u8 << rng.below(8);
        }
        let r = send_raw(&s, "POST", "Patient", t, fj, v.clone());
        assert!(r.status < 500, "flip {i}: {} {}", r.status, body(&r));
        if r.status == 201 {
            assert!(serde_json::from_slice::<Value>(&v).is_ok());
            created += 1;
        } else {
            expect_4xx(&r, &format!("flip {i}"));
        }
    }
    // The same garbage inside a transaction.
    for v in variants.iter().take(10) {
        let mut b = b"{\"resourceType\":\"Bundle\",\"type\":\"transaction\",\"entry\":[{\"request\":{\"method\":\"POST\",\"url\":\"Patient\"},\"resource\":".to_vec();
        b.extend_from_slice(v);
        b.extend_from_slice(b"}]}");
        expect_4xx(&send_raw(&s, "POST", "", t, fj, b), "fuzzed transaction");
    }
    assert_eq!(history_len(&s, t, "Patient"), before + created);
    // still healthy
    let m = s.send("GET", &format!("{}/metadata", s.base), None, None, &[]);
    expect(&m, 200, "metadata");
    expect(
        &s.post("Patient", t, &patient()),
        201,
        "create after fuzzing",
    );
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
    let logs = String::from_utf8_lossy(&s.logs()).to_string();
    assert!(!logs.contains("panicked"), "server panicked: {logs}");
}

#[test]
fn batch_reads_are_audited_with_their_own_outcome() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let created = s.post("Patient", &t, &patient());
    assert_eq!(created.status, 201);
    let id = created.json()["id"].as_str().expect("id").to_owned();
    let missing = "0190f3a2-7b1c-7def-8abc-0123456789ab";
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": format!("Patient/{id}")}},
            {"request": {"method": "GET", "url": format!("Patient/{missing}")}}
        ]
    });
    let r = s.post("", &t, &bundle);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let entries = r.json()["entry"].as_array().expect("entries").clone();
    assert_eq!(entries[0]["response"]["status"], "200 OK");
    assert!(
        entries[1]["response"]["status"]
            .as_str()
            .expect("status")
            .starts_with("404")
    );
    let events = audit_events(&s);
    let read_of = |rid: &str| {
        events
            .iter()
            .find(|e| e["interaction"] == "read" && e["resource_id"] == rid)
            .unwrap_or_else(|| panic!("no read event for {rid}"))
            .clone()
    };
    let found = read_of(&id);
    assert_eq!(found["outcome"]["http_status"], 200);
    assert_eq!(found["version"], 1);
    assert_eq!(found["patient"], serde_json::json!(id));
    assert_eq!(read_of(missing)["outcome"]["http_status"], 404);
}
