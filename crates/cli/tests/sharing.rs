//! SMART Health Links through the real binary (issue 21): a patient's app makes a link;
//! the manifest answers with the passcode only, and the cap on wrong passcodes holds under
//! 100 parallel guesses, counted exactly; single use, expiry, revocation, long-term polling
//! and direct (`U`) links; the files open with the key from the link and with nothing the
//! server kept — no byte the server wrote holds the key; every fetch is in the patient's
//! access view with the recipient's name; the link-misuse rule fires on guessing and stays
//! quiet on ordinary use.
mod common;
use common::flow::*;
use common::*;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

struct World {
    server: Server,
    system: String,
    patient: String,
    obs: String,
    other: String,
    /// the patient's own app's token
    app: String,
}

fn created(r: Resp) -> String {
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().expect("id").to_owned()
}

fn world() -> World {
    let server = Server::start();
    let system = server.token("system/*.cruds");
    let other = created(server.post("Patient", &system, &common::patient()));
    let patient = created(server.post("Patient", &system, &common::patient()));
    let obs = created(server.post(
        "Observation",
        &system,
        &json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "blood glucose"}, "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
            "subject": {"reference": format!("Patient/{patient}")}}),
    ));
    let secret = add_user(&server, "maria.p", &patient);
    let app = App::register_for(
        &server,
        "phr",
        "patient/*.rs openid fhirUser launch/patient",
    );
    let token = app.token(
        &server,
        "maria.p",
        &secret,
        now(),
        "patient/*.rs openid fhirUser launch/patient",
    );
    World {
        server,
        system,
        patient,
        obs,
        other,
        app: token,
    }
}

/// `POST /shl/links` with `body`.
fn make(w: &World, token: &str, body: Value) -> Resp {
    w.server.send(
        "POST",
        &format!("{}/shl/links", w.server.origin),
        Some(token),
        Some(("application/json", body.to_string().into_bytes())),
        &[],
    )
}

/// The payload inside a `shlink:/`.
fn payload(shlink: &str) -> Value {
    let b64 = shlink.strip_prefix("shlink:/").expect("shlink:/");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(b64).expect("base64url")).expect("json")
}

fn key_of(p: &Value) -> [u8; 32] {
    URL_SAFE_NO_PAD
        .decode(p["key"].as_str().expect("key"))
        .expect("b64")
        .try_into()
        .expect("32 bytes")
}

fn manifest(w: &World, url: &str, body: Value) -> Resp {
    w.server.send(
        "POST",
        url,
        None,
        Some(("application/json", body.to_string().into_bytes())),
        &[],
    )
}

fn fetch(w: &World, location: &str) -> Resp {
    w.server.send("GET", location, None, None, &[])
}

/// The Bundle in a JWE, opened with the key from the link.
fn open(jwe: &[u8], key: &[u8; 32]) -> Value {
    let plain = phivault_crypto::jose::decrypt_dir(key, std::str::from_utf8(jwe).expect("ascii"))
        .expect("the JWE opens with the link's key");
    serde_json::from_slice(&plain).expect("json")
}

fn ids_in(bundle: &Value) -> Vec<String> {
    let mut v: Vec<String> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap_or(""),
                e["resource"]["id"].as_str().unwrap_or("")
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_patient_shares_a_link_that_opens_with_its_passcode_and_the_cap_holds_under_100_guesses() {
    let w = world();
    // the patient shares their own record; not another's
    let refused = make(
        &w,
        &w.app,
        json!({"patient": format!("Patient/{}", w.other)}),
    );
    assert_eq!(
        refused.status,
        403,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    let r = make(
        &w,
        &w.app,
        json!({"patient": format!("Patient/{}", w.patient), "label": "For Dr. Lee",
            "passcode": "blue-heron-7", "passcodeAttempts": 20}),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let made = r.json();
    let shlink = made["shlink"].as_str().expect("shlink");
    let p = payload(shlink);
    assert_eq!(p["flag"], "P");
    assert_eq!(p["label"], "For Dr. Lee");
    assert_eq!(p["v"], 1);
    assert!(p["exp"].as_u64().expect("exp") > now());
    let url = p["url"].as_str().expect("url").to_owned();
    assert!(
        url.len() <= 128 && url.starts_with(&w.server.origin),
        "{url}"
    );
    let key = key_of(&p);
    assert!(
        made["qr"]["png"]
            .as_str()
            .expect("png")
            .starts_with("data:image/png;base64,")
    );
    assert!(made["qr"]["svg"].as_str().expect("svg").contains("<svg"));
    // no passcode: 401 with the attempts left, nothing counted
    let r = manifest(&w, &url, json!({"recipient": "Dr. Lee, Riverside Clinic"}));
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["remainingAttempts"], 20);
    // the right passcode: the manifest, the file at its location, the Bundle inside
    let r = manifest(
        &w,
        &url,
        json!({"recipient": "Dr. Lee, Riverside Clinic", "passcode": "blue-heron-7"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let m = r.json();
    assert_eq!(m["status"], "finalized");
    assert_eq!(m["files"][0]["contentType"], "application/fhir+json");
    let loc = m["files"][0]["location"].as_str().expect("location");
    let f = fetch(&w, loc);
    assert_eq!(f.status, 200);
    assert_eq!(f.header("content-type"), Some("application/jose"));
    let bundle = open(&f.body, &key);
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(
        ids_in(&bundle),
        vec![
            format!("Observation/{}", w.obs),
            format!("Patient/{}", w.patient)
        ]
    );
    // embedded when short enough
    let r = manifest(
        &w,
        &url,
        json!({"recipient": "Dr. Lee", "passcode": "blue-heron-7", "embeddedLengthMax": 10_000_000}),
    );
    let jwe = r.json()["files"][0]["embedded"]
        .as_str()
        .expect("embedded")
        .to_owned();
    assert_eq!(open(jwe.as_bytes(), &key), bundle);
    // 100 parallel wrong guesses: exactly 20 are checked, each told a distinct number left
    let left: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..100)
            .map(|i| {
                let (w, url) = (&w, &url);
                s.spawn(move || {
                    let r = manifest(
                        w,
                        url,
                        json!({"recipient": "x", "passcode": format!("guess-{i}")}),
                    );
                    (r.status, r.json())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut counted: Vec<u64> = left
        .iter()
        .filter(|(s, _)| *s == 401)
        .map(|(_, v)| v["remainingAttempts"].as_u64().expect("remainingAttempts"))
        .collect();
    counted.sort_unstable();
    assert_eq!(
        counted,
        (0..20).collect::<Vec<u64>>(),
        "each of the 20 counted once"
    );
    // the rest refused uncounted: 404 once the link is locked, 429 while counted attempts
    // are still being checked (a right one would be given back)
    assert_eq!(
        left.iter().filter(|(s, _)| *s == 404 || *s == 429).count(),
        80,
        "the rest refused uncounted"
    );
    // locked for good: the right passcode too
    let r = manifest(
        &w,
        &url,
        json!({"recipient": "Dr. Lee", "passcode": "blue-heron-7"}),
    );
    assert_eq!(r.status, 404);
    let listed = w.server.send(
        "GET",
        &format!("{}/shl/links", w.server.origin),
        Some(&w.app),
        None,
        &[],
    );
    assert_eq!(listed.status, 200);
    let links = listed.json()["links"].as_array().expect("links").clone();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0]["status"], "locked");
    assert_eq!(links[0]["passcodeAttemptsLeft"], 0);
    assert!(
        links[0].get("shlink").is_none(),
        "the server cannot list what it forgot"
    );
}

#[test]
fn single_use_expiry_revocation_long_term_polling_and_direct_links() {
    let w = world();
    let pat = format!("Patient/{}", w.patient);
    // single use: one manifest, its file once
    let r = make(&w, &w.app, json!({"patient": pat, "singleUse": true}));
    let p = payload(r.json()["shlink"].as_str().expect("shlink"));
    let url = p["url"].as_str().expect("url").to_owned();
    let m = manifest(&w, &url, json!({"recipient": "Urgent care"}));
    assert_eq!(m.status, 200, "{}", String::from_utf8_lossy(&m.body));
    assert_eq!(
        manifest(&w, &url, json!({"recipient": "Urgent care"})).status,
        404
    );
    let loc = m.json()["files"][0]["location"]
        .as_str()
        .expect("location")
        .to_owned();
    // a HEAD (a link preview, a mail scanner) spends nothing and reads nothing
    let head = w.server.send("HEAD", &loc, None, None, &[]);
    assert_eq!(head.status, 405);
    assert_eq!(fetch(&w, &loc).status, 200);
    assert_eq!(
        fetch(&w, &loc).status,
        404,
        "a single-use file is fetched once"
    );
    // expiry
    let r = make(&w, &w.app, json!({"patient": pat, "expiresIn": 2}));
    let url2 = payload(r.json()["shlink"].as_str().expect("shlink"))["url"]
        .as_str()
        .expect("url")
        .to_owned();
    assert_eq!(manifest(&w, &url2, json!({"recipient": "a"})).status, 200);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(manifest(&w, &url2, json!({"recipient": "a"})).status, 404);
    // revocation: by the patient, not by a stranger
    let r = make(
        &w,
        &w.system,
        json!({"patient": pat, "label": "to the insurer"}),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let made = r.json();
    let id = made["id"].as_str().expect("id").to_owned();
    let url3 = payload(made["shlink"].as_str().expect("shlink"))["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let m3 = manifest(&w, &url3, json!({"recipient": "insurer"}));
    let loc3 = m3.json()["files"][0]["location"]
        .as_str()
        .expect("location")
        .to_owned();
    let stranger = w.server.token("system/Patient.rs");
    let del = |t: &str| {
        w.server.send(
            "DELETE",
            &format!("{}/shl/links/{id}", w.server.origin),
            Some(t),
            None,
            &[],
        )
    };
    assert_eq!(del(&stranger).status, 404, "not its link");
    assert_eq!(
        del(&w.app).status,
        204,
        "the patient revokes a link about them"
    );
    assert_eq!(
        manifest(&w, &url3, json!({"recipient": "insurer"})).status,
        404
    );
    assert_eq!(
        fetch(&w, &loc3).status,
        404,
        "a revoked link's locations die with it"
    );
    // long-term: polled, with Retry-After; too soon is 429
    let r = make(&w, &w.app, json!({"patient": pat, "longTerm": true}));
    let p4 = payload(r.json()["shlink"].as_str().expect("shlink"));
    assert_eq!(p4["flag"], "L");
    let url4 = p4["url"].as_str().expect("url").to_owned();
    let first = manifest(&w, &url4, json!({"recipient": "GP"}));
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["status"], "can-change");
    let wait: u64 = first
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("secs");
    let soon = manifest(&w, &url4, json!({"recipient": "GP"}));
    assert_eq!(soon.status, 429);
    assert!(soon.header("retry-after").is_some());
    // the content of a long-term link changes when its holder refreshes it with the key
    // the server does not keep: a new Observation appears at the next poll
    let id4 = r.json()["id"].as_str().expect("id").to_owned();
    let later = created(w.server.post(
        "Observation",
        &w.system,
        &json!({"resourceType": "Observation", "status": "final", "code": {"text": "HbA1c"},
            "subject": {"reference": pat}}),
    ));
    let refresh = |t: &str, key: &str| {
        w.server.send(
            "POST",
            &format!("{}/shl/links/{id4}/content", w.server.origin),
            Some(t),
            Some((
                "application/json",
                json!({"key": key}).to_string().into_bytes(),
            )),
            &[],
        )
    };
    let key4 = p4["key"].as_str().expect("key");
    assert_eq!(
        refresh(&w.app, &URL_SAFE_NO_PAD.encode([7u8; 32])).status,
        400,
        "not its key"
    );
    assert_eq!(
        refresh(&w.server.token("system/*.rs"), key4).status,
        404,
        "not theirs"
    );
    // refreshes at once are each done (one after another), none refused
    let all: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|_| sc.spawn(|| refresh(&w.app, key4).status))
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert!(all.iter().all(|s| *s == 204), "{all:?}");
    std::thread::sleep(std::time::Duration::from_secs(wait));
    let again = manifest(
        &w,
        &url4,
        json!({"recipient": "GP", "embeddedLengthMax": 10_000_000}),
    );
    assert_eq!(again.status, 200, "polled again");
    let b4 = open(
        again.json()["files"][0]["embedded"]
            .as_str()
            .expect("embedded")
            .as_bytes(),
        &key_of(&p4),
    );
    assert!(
        ids_in(&b4).contains(&format!("Observation/{later}")),
        "the new record is shared"
    );
    // direct (U): the URL answers the file; a passcode with U is refused
    assert_eq!(
        make(
            &w,
            &w.app,
            json!({"patient": pat, "direct": true, "passcode": "abcd"})
        )
        .status,
        400
    );
    let r = make(&w, &w.app, json!({"patient": pat, "direct": true}));
    let p5 = payload(r.json()["shlink"].as_str().expect("shlink"));
    assert_eq!(p5["flag"], "U");
    let url5 = p5["url"].as_str().expect("url");
    assert_eq!(fetch(&w, url5).status, 400, "a recipient is required");
    let f = fetch(&w, &format!("{url5}?recipient=School%20nurse"));
    assert_eq!(f.status, 200);
    assert_eq!(open(&f.body, &key_of(&p5))["resourceType"], "Bundle");
    // chosen resources only
    let r = make(
        &w,
        &w.app,
        json!({"patient": pat, "resources": [format!("Observation/{}", w.obs)]}),
    );
    let p6 = payload(r.json()["shlink"].as_str().expect("shlink"));
    let m6 = manifest(
        &w,
        p6["url"].as_str().expect("url"),
        json!({"recipient": "x", "embeddedLengthMax": 1_000_000}),
    );
    let b6 = open(
        m6.json()["files"][0]["embedded"]
            .as_str()
            .expect("embedded")
            .as_bytes(),
        &key_of(&p6),
    );
    assert_eq!(ids_in(&b6), vec![format!("Observation/{}", w.obs)]);
    // bad input is a 4xx, never a 500
    for bad in [
        json!({"patient": pat, "expiresIn": 0}),
        json!({"patient": pat, "label": "x".repeat(81)}),
        json!({"patient": pat, "passcode": "abc"}),
        json!({"patient": pat, "longTerm": true, "singleUse": true}),
        json!({"patient": pat, "resources": [format!("Patient/{}", w.other)]}),
        json!({"patient": pat, "viewer": "http://viewer.example/"}),
        json!({"patient": "Patient/../x"}),
        json!({"nonsense": 1}),
    ] {
        let r = make(&w, &w.app, bad.clone());
        assert!((400..500).contains(&r.status), "{bad}: {}", r.status);
    }
    for (url, body) in [
        (url4.as_str(), "not json"),
        (
            format!("{}/shl/m/AAAA", w.server.origin).as_str(),
            "{\"recipient\":\"x\"}",
        ),
    ] {
        let r = w.server.send(
            "POST",
            url,
            None,
            Some(("application/json", body.as_bytes().to_vec())),
            &[],
        );
        assert!((400..500).contains(&r.status), "{url}: {}", r.status);
    }
    assert_eq!(
        fetch(&w, &format!("{}/shl/f/garbage", w.server.origin)).status,
        404
    );
    // what the patient reads is what was sent: no invisible or direction-changing text
    for spoof in [
        "a\u{202E}lanoisseforp",
        "Dr.\u{200B}Lee",
        "x\u{2066}y",
        "\u{3164}",
        "Dr. Lee\u{E0041}",
        "\u{2800}",
    ] {
        let r = manifest(&w, &url4, json!({"recipient": spoof}));
        assert_eq!(r.status, 400, "{spoof:?}");
    }
}

#[test]
fn no_byte_the_server_wrote_holds_a_share_key_and_the_access_view_shows_every_fetch() {
    let w = world();
    let r = make(
        &w,
        &w.app,
        json!({"patient": format!("Patient/{}", w.patient), "passcode": "river-stone-42"}),
    );
    let p = payload(r.json()["shlink"].as_str().expect("shlink"));
    let key = key_of(&p);
    let url = p["url"].as_str().expect("url").to_owned();
    for who in ["Dr. Okafor, Lakeside Cardiology", "Lakeside front desk"] {
        let m = manifest(
            &w,
            &url,
            json!({"recipient": who, "passcode": "river-stone-42"}),
        );
        assert_eq!(m.status, 200);
        let loc = m.json()["files"][0]["location"]
            .as_str()
            .expect("location")
            .to_owned();
        assert_eq!(fetch(&w, &loc).status, 200);
    }
    assert_eq!(
        manifest(&w, &url, json!({"recipient": "guess", "passcode": "nope"})).status,
        401
    );
    // the patient's access view: every link request, with its recipient and address
    let view = w.server.get("AuditEvent?_count=1000", &w.app);
    assert_eq!(view.status, 200, "{}", String::from_utf8_lossy(&view.body));
    let events: Vec<Value> = view.json()["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["resource"].clone())
        .collect();
    let of = |kind: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["subtype"][0]["code"] == kind)
            .collect()
    };
    assert_eq!(of("shl-manifest").len(), 3, "two opened, one refused");
    assert_eq!(of("shl-file").len(), 2);
    // the link's making names it, like every fetch: the patient tells which link was used
    let link_of = |e: &Value| -> Option<String> {
        e["entity"].as_array()?.iter().find_map(|x| {
            (x["what"]["identifier"]["system"] == "urn:phivault:share-link")
                .then(|| x["what"]["identifier"]["value"].as_str().map(str::to_owned))
                .flatten()
        })
    };
    let made_id = link_of(of("shl-create")[0]).expect("the creation names its link");
    assert!(
        of("shl-manifest")
            .iter()
            .all(|e| link_of(e).as_deref() == Some(made_id.as_str()))
    );
    // a file's fetch names the recipient its manifest request gave
    assert!(of("shl-file").iter().all(|e| {
        e["agent"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["type"]["text"] == "share link recipient")
        })
    }));
    let recipients: Vec<&str> = of("shl-manifest")
        .iter()
        .filter_map(|e| {
            e["agent"]
                .as_array()?
                .iter()
                .find(|a| a["type"]["text"] == "share link recipient")?["who"]["display"]
                .as_str()
        })
        .collect();
    assert!(
        recipients.contains(&"Dr. Okafor, Lakeside Cardiology"),
        "{recipients:?}"
    );
    assert!(recipients.contains(&"guess"));
    assert!(of("shl-file")[0]["agent"][0]["network"]["address"].is_string());
    // the key is in no byte the server wrote: database, WAL, exchange files, logs
    let spellings = key_spellings(&key);
    let mut hay = store_bytes(&w.server);
    for f in files_under(&w.server.data) {
        hay.extend(std::fs::read(&f).unwrap_or_default());
    }
    hay.extend(w.server.logs());
    for s in &spellings {
        assert!(!contains(&hay, s), "a share key's bytes were found at rest");
    }
    // and the recipients' names are sealed too
    assert!(
        !contains(&hay, b"Okafor"),
        "a recipient's name was found at rest"
    );
    assert!(
        !contains(&hay, b"river-stone-42"),
        "a passcode was found at rest"
    );
}

#[test]
fn guessing_at_a_link_raises_an_alert_and_ordinary_use_does_not() {
    let w = world();
    let pat = format!("Patient/{}", w.patient);
    let url_of = |r: Resp| -> String {
        payload(r.json()["shlink"].as_str().expect("shlink"))["url"]
            .as_str()
            .expect("url")
            .to_owned()
    };
    // ordinary: a couple of fetches and one typo
    let quiet = url_of(make(
        &w,
        &w.app,
        json!({"patient": pat, "passcode": "tulip-9-meadow"}),
    ));
    assert_eq!(
        manifest(
            &w,
            &quiet,
            json!({"recipient": "GP", "passcode": "tulip-9-meadw"})
        )
        .status,
        401
    );
    for _ in 0..2 {
        assert_eq!(
            manifest(
                &w,
                &quiet,
                json!({"recipient": "GP", "passcode": "tulip-9-meadow"})
            )
            .status,
            200
        );
    }
    let data = w.server.data.to_str().expect("path");
    scan_all_week(data);
    let quiet_alerts: Vec<Value> = alerts_listed(data, "open")
        .into_iter()
        .filter(|a| {
            a["rule"]
                .as_str()
                .is_some_and(|r| r.starts_with("share-link"))
        })
        .collect();
    assert!(quiet_alerts.is_empty(), "{quiet_alerts:?}");
    // planted: someone guesses
    let planted = url_of(make(
        &w,
        &w.app,
        json!({"patient": pat, "passcode": "orchid-4-valley", "passcodeAttempts": 50}),
    ));
    for i in 0..8 {
        assert_eq!(
            manifest(
                &w,
                &planted,
                json!({"recipient": "?", "passcode": format!("pin{i}")})
            )
            .status,
            401
        );
    }
    scan_all_week(data);
    let alerts: Vec<Value> = alerts_listed(data, "open")
        .into_iter()
        .filter(|a| a["rule"] == "share-link-passcode")
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["patient"], w.patient.as_str());
    assert!(alerts[0]["evidence"].as_array().expect("evidence").len() >= 4);
}

#[test]
fn an_erased_patients_links_and_exports_answer_nothing() {
    let w = world();
    let pat = format!("Patient/{}", w.patient);
    let r = make(&w, &w.app, json!({"patient": pat, "longTerm": true}));
    let url = payload(r.json()["shlink"].as_str().expect("shlink"))["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let m = manifest(&w, &url, json!({"recipient": "GP"}));
    assert_eq!(m.status, 200);
    let loc = m.json()["files"][0]["location"]
        .as_str()
        .expect("location")
        .to_owned();
    // an export holding the patient, finished before the erasure
    let status = w.server.send(
        "GET",
        &format!("{}/$export?_type=Patient", w.server.base),
        Some(&w.system),
        None,
        &[("prefer", "respond-async")],
    );
    assert_eq!(
        status.status,
        202,
        "{}",
        String::from_utf8_lossy(&status.body)
    );
    let st = status
        .header("content-location")
        .expect("status")
        .to_owned();
    let manifest_of = loop {
        let r = w.server.send("GET", &st, Some(&w.system), None, &[]);
        if r.status == 200 {
            break r.json();
        }
        assert_eq!(r.status, 202);
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let file = manifest_of["output"][0]["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let erase = w.server.post(
        &format!("Patient/{}/$erase", w.patient),
        &w.server.token("system/Patient.$erase"),
        &json!({"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "the patient asked"}]}),
    );
    assert_eq!(
        erase.status,
        200,
        "{}",
        String::from_utf8_lossy(&erase.body)
    );
    assert_eq!(manifest(&w, &url, json!({"recipient": "GP"})).status, 410);
    assert_eq!(fetch(&w, &loc).status, 410);
    assert_eq!(
        w.server
            .send("GET", &file, Some(&w.system), None, &[])
            .status,
        410
    );
}

#[test]
fn a_clinician_shares_a_treated_patient_and_no_other() {
    let w = world();
    let pr = created(w.server.post(
        "Practitioner",
        &w.system,
        &json!({"resourceType": "Practitioner", "name": [{"family": "Lee"}]}),
    ));
    created(w.server.post(
        "CareTeam",
        &w.system,
        &json!({"resourceType": "CareTeam", "status": "active",
            "subject": {"reference": format!("Patient/{}", w.patient)},
            "participant": [{"member": {"reference": format!("Practitioner/{pr}")}}]}),
    ));
    let secret = add_person(&w.server, "dr.lee", "clinician", &pr);
    let app = App::register_for(&w.server, "ehr", "user/*.rs openid fhirUser");
    let token = app.token(
        &w.server,
        "dr.lee",
        &secret,
        now(),
        "user/*.rs openid fhirUser",
    );
    let r = make(
        &w,
        &token,
        json!({"patient": format!("Patient/{}", w.other)}),
    );
    assert_eq!(
        r.status,
        403,
        "an untreated patient: {}",
        String::from_utf8_lossy(&r.body)
    );
    let r = make(
        &w,
        &token,
        json!({"patient": format!("Patient/{}", w.patient), "label": "referral"}),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let p = payload(r.json()["shlink"].as_str().expect("shlink"));
    let m = manifest(
        &w,
        p["url"].as_str().expect("url"),
        json!({"recipient": "Cardiology", "embeddedLengthMax": 10_000_000}),
    );
    let b = open(
        m.json()["files"][0]["embedded"]
            .as_str()
            .expect("embedded")
            .as_bytes(),
        &key_of(&p),
    );
    assert!(ids_in(&b).contains(&format!("Observation/{}", w.obs)));
    // the clinician lists their own link; the patient sees it too (it is about them)
    let list = |t: &str| {
        w.server
            .send(
                "GET",
                &format!("{}/shl/links", w.server.origin),
                Some(t),
                None,
                &[],
            )
            .json()["links"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(list(&token), 1);
    assert_eq!(list(&w.app), 1);
    assert_eq!(list(&w.system), 0, "another client's links are not listed");
}
