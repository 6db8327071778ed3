//! Counts and `self` links as real clients use them (issue 16), through the real binary:
//! `_count=0` (fhirpy's `count()` sends `_count=0&_totalMethod=count`) answers with the
//! exact `total` and no entries, counting only what the caller may see (a back-end client,
//! a patient's app, a clinician); `_totalMethod` is understood, unknown parameters stay
//! 400s; a searchset's `self` link carries the query the server applied, URL-encoded, for
//! type, compartment, POST `_search` and continued pages, and following it gives the same
//! results.
mod common;
use common::flow::*;
use common::*;

use std::collections::BTreeSet;

use serde_json::{Value, json};

fn created(r: Resp) -> String {
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().expect("id").to_owned()
}

fn obs(code: &str, patient: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": format!("Patient/{patient}")}})
}

/// `Type/id` of the entries of `mode` (match, include).
fn listed(b: &Value, mode: &str) -> BTreeSet<String> {
    b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == mode)
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap_or(""),
                e["resource"]["id"].as_str().unwrap_or("")
            )
        })
        .collect()
}

fn link(b: &Value, rel: &str) -> Option<String> {
    b["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == rel)
        .and_then(|l| l["url"].as_str().map(str::to_owned))
}

struct World {
    server: Server,
    system: String,
    /// A's app (patient/ scopes)
    pat_a: String,
    /// the clinician who treats A and C (not B)
    clinician: String,
    a: String,
    b: String,
    c: String,
}

/// Patients A, B and C: A has 3 Observations of code 1111-1 and 1 of 2222-2, B has 2 of
/// 1111-1, C has 1 of 1111-1. A clinician treats A and C (CareTeams).
fn world() -> World {
    let server = Server::start();
    let system = server.token("system/*.cruds");
    let mut p = patient();
    p["name"] = json!([{"family": "Dubois-Lefèvre", "given": ["Zoë Ann"]}]);
    p["identifier"] = json!([{"system": "urn:oid:1.2.3", "value": "MRN 7&8|9"}]);
    let a = created(server.post("Patient", &system, &p));
    let b = created(server.post("Patient", &system, &patient()));
    let c = created(server.post("Patient", &system, &patient()));
    for (who, code) in [
        (&a, "1111-1"),
        (&a, "1111-1"),
        (&a, "1111-1"),
        (&a, "2222-2"),
        (&b, "1111-1"),
        (&b, "1111-1"),
        (&c, "1111-1"),
    ] {
        created(server.post("Observation", &system, &obs(code, who)));
    }
    let pr = created(server.post(
        "Practitioner",
        &system,
        &json!({"resourceType": "Practitioner", "name": [{"family": "Adams"}]}),
    ));
    for who in [&a, &c] {
        let team = json!({"resourceType": "CareTeam", "status": "active",
            "subject": {"reference": format!("Patient/{who}")},
            "participant": [{"member": {"reference": format!("Practitioner/{pr}")}}]});
        created(server.post("CareTeam", &system, &team));
    }
    let app = App::register_for(
        &server,
        "Count test",
        "patient/*.rs user/*.cruds openid fhirUser launch/patient offline_access",
    );
    let now = now();
    let secret = add_person(&server, "dr.adams", "clinician", &pr);
    let clinician = app.token(
        &server,
        "dr.adams",
        &secret,
        now,
        "user/Patient.rs user/Observation.rs openid fhirUser",
    );
    let secret = add_user(&server, "pat.a", &a);
    let pat_a = app.token(
        &server,
        "pat.a",
        &secret,
        now,
        "patient/Patient.rs patient/Observation.rs openid fhirUser launch/patient",
    );
    World {
        server,
        system,
        pat_a,
        clinician,
        a,
        b,
        c,
    }
}

/// The total of a count-only search, checking it is one: a searchset with `total`, no
/// entries and no `next` link.
fn total(s: &Server, path: &str, token: &str) -> u64 {
    let r = s.get(path, token);
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    let b = r.json();
    assert_eq!(b["type"], "searchset", "{path}");
    assert!(
        b["entry"].as_array().is_none_or(Vec::is_empty),
        "{path}: {b}"
    );
    assert_eq!(link(&b, "next"), None, "{path}");
    b["total"]
        .as_u64()
        .unwrap_or_else(|| panic!("{path}: no total in {b}"))
}

#[test]
fn count_zero_answers_the_exact_total_of_what_the_caller_may_see() {
    let w = world();
    let s = &w.server;
    let (a, b, c) = (&w.a, &w.b, &w.c);
    // a back-end client with system/ scopes sees every record
    for q in [
        "_count=0",
        "_count=0&_totalMethod=count",
        "_count=0&_totalMethod=accurate",
        "_count=0&_totalMethod=estimate",
        // `_count=0` asks for the total whatever else says none
        "_count=0&_totalMethod=none",
        "_count=0&_total=none",
        "_count=0&_total=accurate",
        "_summary=count",
        "_summary=count&_totalMethod=count",
        "_count=0&_sort=-_lastUpdated",
    ] {
        assert_eq!(total(s, &format!("Observation?{q}"), &w.system), 7, "{q}");
        assert_eq!(
            total(s, &format!("Observation?code=1111-1&{q}"), &w.system),
            6,
            "{q}"
        );
    }
    assert_eq!(total(s, "Patient?_count=0", &w.system), 3);
    assert_eq!(
        total(s, &format!("Patient/{a}/Observation?_count=0"), &w.system),
        4
    );
    assert_eq!(
        total(
            s,
            &format!("Observation?subject=Patient/{b}&_count=0&_totalMethod=count"),
            &w.system
        ),
        2
    );
    // POST _search, as a form
    let r = s.send(
        "POST",
        &format!("{}/Observation/_search", s.base),
        Some(&w.system),
        Some((
            "application/x-www-form-urlencoded",
            b"code=1111-1&_count=0&_totalMethod=count".to_vec(),
        )),
        &[],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["total"], 6);
    // a page with a total: `_totalMethod=count` beside a page size
    let r = s.get(
        "Observation?code=1111-1&_count=2&_totalMethod=count",
        &w.system,
    );
    let page = r.json();
    assert_eq!(page["total"], 6);
    assert_eq!(listed(&page, "match").len(), 2);
    assert!(link(&page, "next").is_some());
    let r = s.get(
        "Observation?code=1111-1&_count=2&_totalMethod=none",
        &w.system,
    );
    assert!(r.json().get("total").is_none());
    // lenient handling: the unknown parameter is a warning, the count is still given
    let r = s.send(
        "GET",
        &format!("{}/Observation?_count=0&nonsense=1", s.base),
        Some(&w.system),
        None,
        &[("Prefer", "handling=lenient")],
    );
    assert_eq!(r.status, 200);
    let bundle = r.json();
    assert_eq!(bundle["total"], 7);
    assert!(listed(&bundle, "match").is_empty());
    // strict handling: unknown parameters and values stay 400s
    for q in [
        "_count=0&nonsense=1",
        "_count=0&_bogus=1",
        "_count=0&_totalMethod=sometimes",
        "_count=zero",
    ] {
        let r = s.get(&format!("Observation?{q}"), &w.system);
        assert_eq!(r.status, 400, "{q}");
        assert!(r.is_outcome(), "{q}");
    }

    // A's app counts A's records only, whichever route or parameter asks
    for q in [
        "Observation?_count=0",
        "Observation?_count=0&_totalMethod=count",
        "Observation?_summary=count",
        &format!("Patient/{a}/Observation?_count=0&_totalMethod=count"),
    ] {
        assert_eq!(total(s, q, &w.pat_a), 4, "{q}");
    }
    assert_eq!(
        total(
            s,
            "Observation?code=1111-1&_count=0&_totalMethod=count",
            &w.pat_a
        ),
        3
    );
    assert_eq!(total(s, "Patient?_count=0", &w.pat_a), 1);
    // a search naming another patient counts nothing of theirs
    assert_eq!(
        total(
            s,
            &format!("Observation?subject=Patient/{b}&_count=0"),
            &w.pat_a
        ),
        0
    );
    assert_eq!(
        s.get(&format!("Patient/{b}/Observation?_count=0"), &w.pat_a)
            .status,
        403
    );

    // the clinician counts the records of the patients they treat (A and C), not B's
    assert_eq!(total(s, "Observation?_count=0", &w.clinician), 5);
    assert_eq!(
        total(
            s,
            "Observation?code=1111-1&_count=0&_totalMethod=count",
            &w.clinician
        ),
        4
    );
    assert_eq!(total(s, "Patient?_count=0", &w.clinician), 2);
    assert_eq!(
        total(
            s,
            &format!("Observation?subject=Patient/{b}&_count=0"),
            &w.clinician
        ),
        0
    );
    assert_eq!(
        total(
            s,
            &format!("Patient/{c}/Observation?_count=0"),
            &w.clinician
        ),
        1
    );
    // and a page's total agrees with its entries
    let r = s.get("Observation?_count=50&_totalMethod=count", &w.clinician);
    let page = r.json();
    assert_eq!(page["total"], 5);
    assert_eq!(listed(&page, "match").len(), 5);
}

#[test]
fn self_links_carry_the_applied_query_and_lead_back_to_the_same_results() {
    let w = world();
    let s = &w.server;
    let base = &s.base;
    let a = &w.a;
    let follow = |url: &str, token: &str| {
        let r = s.send("GET", url, Some(token), None, &[]);
        assert_eq!(r.status, 200, "{url}: {}", String::from_utf8_lossy(&r.body));
        r.json()
    };
    // values are percent-encoded (UTF-8, spaces as %20, `|` and `&` escaped), parameters
    // sorted by name, the page size as applied
    let first = s.get(
        "Patient?identifier=urn%3Aoid%3A1.2.3%7CMRN%207%268%5C%7C9&family=dubois-lef%C3%A8vre&_count=5000",
        &w.system,
    );
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let first = first.json();
    assert_eq!(
        listed(&first, "match"),
        BTreeSet::from([format!("Patient/{a}")])
    );
    let own = link(&first, "self").expect("self");
    assert_eq!(
        own,
        format!(
            "{base}/Patient?_count=1000&family=dubois-lef%C3%A8vre\
             &identifier=urn:oid:1.2.3%7CMRN%207%268%5C%7C9"
        )
    );
    let again = follow(&own, &w.system);
    assert_eq!(listed(&again, "match"), listed(&first, "match"));
    assert_eq!(link(&again, "self").as_deref(), Some(own.as_str()));

    // ignored parameters (lenient) are not in it; includes and totals are
    let r = s.send(
        "GET",
        &format!(
            "{base}/Observation?nonsense=1&code=1111-1&_include=Observation:subject&_totalMethod=count&_pretty=true"
        ),
        Some(&w.system),
        None,
        &[("Prefer", "handling=lenient")],
    );
    let b = r.json();
    let own = link(&b, "self").expect("self");
    assert_eq!(
        own,
        format!("{base}/Observation?_include=Observation:subject&_total=accurate&code=1111-1")
    );
    let again = follow(&own, &w.system);
    assert_eq!(listed(&again, "match"), listed(&b, "match"));
    assert_eq!(listed(&again, "include"), listed(&b, "include"));
    assert_eq!(listed(&b, "include").len(), 3);
    assert_eq!(again["total"], 6);

    // a count's self link counts again
    let b = follow(
        &format!("{base}/Observation?_count=0&_totalMethod=count"),
        &w.system,
    );
    let own = link(&b, "self").expect("self");
    assert_eq!(own, format!("{base}/Observation?_count=0&_total=accurate"));
    assert_eq!(follow(&own, &w.system)["total"], 7);

    // paging: the first page's self has no cursor; a continued page's self is its query
    // and the cursor it was asked with, and repeats that page
    let p1 = follow(
        &format!("{base}/Observation?code=1111-1&_count=2"),
        &w.system,
    );
    let own1 = link(&p1, "self").expect("self");
    assert_eq!(own1, format!("{base}/Observation?_count=2&code=1111-1"));
    let next = link(&p1, "next").expect("next");
    let (_, cursor) = next.split_once("_cursor=").expect("cursor");
    assert!(!next.contains("1111-1"), "next links stay opaque");
    let p2 = follow(&next, &w.system);
    let own2 = link(&p2, "self").expect("self");
    assert_eq!(own2, format!("{own1}&_cursor={cursor}"));
    let again = follow(&own2, &w.system);
    assert_eq!(listed(&again, "match"), listed(&p2, "match"));
    assert_eq!(listed(&p2, "match").len(), 2);
    assert!(listed(&p1, "match").is_disjoint(&listed(&p2, "match")));
    // the parameters may come in any order; different ones are refused
    let swapped = follow(
        &format!("{base}/Observation?code=1111-1&_cursor={cursor}&_count=2"),
        &w.system,
    );
    assert_eq!(listed(&swapped, "match"), listed(&p2, "match"));
    for bad in [
        format!("{base}/Observation?_count=2&code=2222-2&_cursor={cursor}"),
        format!("{base}/Observation?_count=3&code=1111-1&_cursor={cursor}"),
        format!("{base}/Observation?code=1111-1&_cursor={cursor}"),
        format!("{base}/Patient?_count=2&code=1111-1&_cursor={cursor}"),
        format!("{base}/Patient/{a}/Observation?_count=2&code=1111-1&_cursor={cursor}"),
        format!("{base}/Observation?_count=2&code=1111-1&_cursor={cursor}&_cursor={cursor}"),
    ] {
        let r = s.send("GET", &bad, Some(&w.system), None, &[]);
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.is_outcome(), "{bad}");
    }
    // the self link of a continued page is the cursor's client's only, like the cursor
    let other = s.token("system/*.cruds");
    assert_eq!(s.send("GET", &own2, Some(&other), None, &[]).status, 400);

    // compartment search
    let b = follow(
        &format!("{base}/Patient/{a}/Observation?code=1111-1"),
        &w.system,
    );
    let own = link(&b, "self").expect("self");
    assert_eq!(own, format!("{base}/Patient/{a}/Observation?code=1111-1"));
    assert_eq!(
        listed(&follow(&own, &w.system), "match"),
        listed(&b, "match")
    );
    assert_eq!(listed(&b, "match").len(), 3);
    // ... paged: its continued page's self keeps the compartment route
    let p1 = follow(
        &format!("{base}/Patient/{a}/Observation?_count=3"),
        &w.system,
    );
    let p2 = follow(&link(&p1, "next").expect("next"), &w.system);
    let own2 = link(&p2, "self").expect("self");
    assert!(
        own2.starts_with(&format!("{base}/Patient/{a}/Observation?_count=3&_cursor=")),
        "{own2}"
    );
    assert_eq!(
        listed(&follow(&own2, &w.system), "match"),
        listed(&p2, "match")
    );

    // POST _search: the self link is its GET form
    let r = s.send(
        "POST",
        &format!("{base}/Observation/_search"),
        Some(&w.system),
        Some((
            "application/x-www-form-urlencoded",
            format!("subject=Patient%2F{a}&code=1111-1,2222-2").into_bytes(),
        )),
        &[],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let b = r.json();
    let own = link(&b, "self").expect("self");
    assert_eq!(
        own,
        format!("{base}/Observation?code=1111-1,2222-2&subject=Patient/{a}")
    );
    assert_eq!(
        listed(&follow(&own, &w.system), "match"),
        listed(&b, "match")
    );
    assert_eq!(listed(&b, "match").len(), 4);

    // a patient's app is confined to its compartment: the self link says so, and works
    let b = follow(&format!("{base}/Observation?code=1111-1"), &w.pat_a);
    let own = link(&b, "self").expect("self");
    assert_eq!(own, format!("{base}/Patient/{a}/Observation?code=1111-1"));
    assert_eq!(
        listed(&follow(&own, &w.pat_a), "match"),
        listed(&b, "match")
    );
    assert_eq!(listed(&b, "match").len(), 3);
    // the clinician's self link, and it repeats the search
    let b = follow(
        &format!("{base}/Observation?code=1111-1&_count=2"),
        &w.clinician,
    );
    let own = link(&b, "self").expect("self");
    assert_eq!(own, format!("{base}/Observation?_count=2&code=1111-1"));
    assert_eq!(
        listed(&follow(&own, &w.clinician), "match"),
        listed(&b, "match")
    );
}
