//! The snooping scenario through the real binary (issue 5, AU5): clinicians with known
//! treatment relationships sign in on the server's pages and work through the API — thousands
//! of ordinary accesses — with planted violations of each rule among them; `phivault audit
//! scan` must raise an alert for every planted violation and almost none for the rest.
//!
//! The two rules that depend on the wall clock — after hours, and volume against a person's
//! own baseline of earlier days — cannot be planted in a test that runs in a minute; they
//! are exercised over events with chosen timestamps in `snoop.rs`'s unit tests. Here the scan
//! runs with working hours set to the whole week, and volume is judged against peers.
mod common;
use common::flow::*;
use common::*;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

/// Clinicians: (family, given, birth date, address line).
const STAFF: [(&str, &str, &str, &str); 8] = [
    ("Adeyemi", "Ada", "1971-01-11", "11 Alder Way"),
    ("Bergstrom", "Bo", "1972-02-12", "12 Birch Way"),
    ("Castellano", "Cy", "1973-03-13", "13 Cedar Way"),
    ("Dubois", "Di", "1974-04-14", "14 Dogwood Way"),
    ("Eriksen", "Ed", "1975-05-15", "15 Elm Way"),
    ("Fontaine", "Fay", "1976-06-16", "16 Fir Way"),
    ("Gallagher", "Gus", "1977-07-17", "17 Gum Way"),
    ("Haddad", "Hal", "1978-08-18", "18 Hazel Way"),
];
/// Members of the workforce without an account here.
const WORKFORCE: [(&str, &str, &str, &str); 2] = [
    ("Ishikawa", "Ines", "1979-09-19", "19 Ivy Way"),
    ("Jovanovic", "Jan", "1980-10-20", "20 Juniper Way"),
];
/// Each clinician's ordinary patients.
const OWN: usize = 18;
/// Extra patients of the two clinicians whose volume is planted.
const SPIKE: usize = 75;
const SCOPE: &str = "user/Patient.rs user/Observation.cruds user/Encounter.cruds user/Practitioner.rs openid fhirUser";

fn person(rtype: &str, family: &str, given: &str, birth: &str, line: &str) -> Value {
    json!({"resourceType": rtype, "name": [{"family": family, "given": [given]}],
        "birthDate": birth, "gender": "unknown",
        "address": [{"line": [line], "city": "Springfield", "postalCode": "01234"}]})
}

/// An Encounter of `patient` with `practitioner`: ongoing since yesterday, or (`old`)
/// finished two years ago.
fn encounter(patient: &str, practitioner: &str, old: bool) -> Value {
    let period = if old {
        json!({"start": "2024-06-01T09:00:00Z", "end": "2024-06-01T10:00:00Z"})
    } else {
        let start = now() - 86_400;
        json!({"start": iso(start)})
    };
    json!({"resourceType": "Encounter", "status": if old {"finished"} else {"in-progress"},
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": format!("Patient/{patient}")},
        "participant": [{"individual": {"reference": format!("Practitioner/{practitioner}")}}],
        "period": period})
}

/// Seconds since the epoch as a FHIR instant.
fn iso(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    // civil date from days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn created(r: Resp) -> String {
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().expect("id").to_owned()
}

/// A request's id, which joins it to its audit event and to an alert's evidence.
fn rid(r: &Resp) -> String {
    r.header("x-request-id").expect("x-request-id").to_owned()
}

struct Clinician {
    practitioner: String,
    secret: Vec<u8>,
    token: String,
    /// Ordinary patients (ongoing encounters).
    own: Vec<String>,
}

#[test]
fn planted_violations_of_every_rule_raise_alerts_and_ordinary_work_does_not() {
    let mut server = Server::start();
    let system = server.token("system/*.cruds");
    let post = |rtype: &str, body: &Value| created(server.post(rtype, &system, body));
    let data = server.data.to_str().expect("path").to_owned();

    // the workforce: eight clinicians with accounts, two more without
    let mut staff: Vec<Clinician> = STAFF
        .iter()
        .map(|(f, g, b, l)| Clinician {
            practitioner: post("Practitioner", &person("Practitioner", f, g, b, l)),
            secret: Vec::new(),
            token: String::new(),
            own: Vec::new(),
        })
        .collect();
    for (f, g, b, l) in WORKFORCE {
        post("Practitioner", &person("Practitioner", f, g, b, l));
    }
    // ordinary patients: names, birth dates and addresses shared with no one on the staff
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut n = 0;
    for (i, c) in staff.iter_mut().enumerate() {
        let count = if i >= 6 { OWN + SPIKE } else { OWN };
        for _ in 0..count {
            n += 1;
            let family = format!("Patientson{n}");
            let body = person(
                "Patient",
                &family,
                "Pat",
                &format!("19{:02}-0{}-1{}", 30 + n % 60, 1 + n % 9, n % 10),
                &format!("{n} Main Street"),
            );
            let p = post("Patient", &body);
            post("Encounter", &encounter(&p, &c.practitioner, false));
            families.insert(p.clone(), family);
            c.own.push(p);
        }
    }
    // the planted patients, each reachable by the clinician who will open them
    let ongoing = |who: usize, body: Value| -> String {
        let p = post("Patient", &body);
        post("Encounter", &encounter(&p, &staff[who].practitioner, false));
        p
    };
    let long_ago = |who: usize, body: Value| -> String {
        let p = post("Patient", &body);
        post("Encounter", &encounter(&p, &staff[who].practitioner, true));
        p
    };
    let (f, g, b, _) = STAFF[0];
    let self0 = ongoing(0, person("Patient", f, g, b, "1 Other Road"));
    let (f, g, b, _) = STAFF[1];
    let self1 = ongoing(1, person("Patient", f, g, b, "2 Other Road"));
    let (f, g, b, _) = WORKFORCE[0];
    let cowork2 = ongoing(2, person("Patient", f, g, b, "3 Other Road"));
    let (f, g, b, _) = WORKFORCE[1];
    let cowork3 = ongoing(3, person("Patient", f, g, b, "4 Other Road"));
    let kin4 = ongoing(
        4,
        person("Patient", STAFF[4].0, "Kid", "2010-01-01", "5 Other Road"),
    );
    let kin5 = ongoing(
        5,
        person("Patient", STAFF[5].0, "Kid", "2011-01-01", "6 Other Road"),
    );
    let near6 = ongoing(
        6,
        person("Patient", "Neighbourly", "Nia", "1990-01-01", STAFF[6].3),
    );
    let near7 = ongoing(
        7,
        person("Patient", "Neighbourly", "Ned", "1991-01-01", STAFF[7].3),
    );
    let vip = |who: usize, family: &str| {
        let mut body = person("Patient", family, "Star", "1985-05-05", "7 Hill Road");
        body["meta"] = json!({"security": [{"code": "R",
            "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"}]});
        ongoing(who, body)
    };
    let vip0 = vip(0, "Famous");
    let vip1 = vip(1, "Renowned");
    let gone2 = long_ago(
        2,
        person("Patient", "Formerly", "Fred", "1960-01-01", "8 Past Lane"),
    );
    let gone3 = long_ago(
        3,
        person("Patient", "Formerly", "Flo", "1961-01-01", "9 Past Lane"),
    );
    let sought4 = long_ago(
        4,
        person(
            "Patient",
            "Lookedupson",
            "Lou",
            "1962-01-01",
            "10 Past Lane",
        ),
    );
    let sought5 = long_ago(
        5,
        person("Patient", "Searchwell", "Sue", "1963-01-01", "11 Past Lane"),
    );

    // the app and the clinicians' accounts; each signs in on the pages
    let app = App::register(&server, "Ward App");
    let agent = &app.agent;
    let at = now();
    let sign_in = |username: &str, secret: &[u8], scope: &str| -> String {
        app.token(&server, username, secret, at, scope)
    };
    for (i, c) in staff.iter_mut().enumerate() {
        let username = format!("clin{i}");
        c.secret = add_person(&server, &username, "clinician", &c.practitioner);
        c.token = sign_in(&username, &c.secret, SCOPE);
    }

    // ordinary work: every clinician opens each of their patients' charts several times,
    // lists their observations, and finds some of them by name first
    let mut legit = 0usize;
    for round in 0..6 {
        for c in &staff {
            for (k, p) in c.own.iter().take(OWN).enumerate() {
                if round == 0 && k % 3 == 0 {
                    // looked up by name first, then opened (below): their own patient
                    let family = &families[p];
                    let r = server.get(&format!("Patient?family={family}"), &c.token);
                    assert_eq!(r.status, 200);
                    assert_eq!(r.json()["entry"][0]["resource"]["id"], p.as_str());
                    legit += 1;
                }
                for path in [
                    format!("Patient/{p}"),
                    format!("Patient/{p}/Observation"),
                    format!("Encounter?patient={p}"),
                ] {
                    let r = server.get(&path, &c.token);
                    assert_eq!(r.status, 200, "{path}");
                    legit += 1;
                }
            }
        }
    }
    assert!(legit >= 2000, "{legit} ordinary accesses");

    // the planted violations, two of each rule: rule → the requests that must be evidence
    let mut planted: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut open = |rule: &'static str, who: usize, path: String| {
        let r = server.get(&path, &staff[who].token);
        assert_eq!(r.status, 200, "{rule} {path}");
        planted.entry(rule).or_default().push(rid(&r));
    };
    open("self-access", 0, format!("Patient/{self0}"));
    open("self-access", 1, format!("Patient/{self1}"));
    open("coworker", 2, format!("Patient/{cowork2}"));
    open("coworker", 3, format!("Patient/{cowork3}"));
    open("same-family-name", 4, format!("Patient/{kin4}"));
    open("same-family-name", 5, format!("Patient/{kin5}"));
    open("same-address", 6, format!("Patient/{near6}"));
    open("same-address", 7, format!("Patient/{near7}"));
    open("restricted-record", 0, format!("Patient/{vip0}"));
    open("restricted-record", 1, format!("Patient/{vip1}"));
    open("unexplained-access", 2, format!("Patient/{gone2}"));
    open("unexplained-access", 3, format!("Patient/{gone3}"));
    open(
        "bulk-record",
        6,
        format!("Patient/{}/$everything", staff[6].own[0]),
    );
    open(
        "bulk-record",
        7,
        format!("Patient/{}/$everything", staff[7].own[0]),
    );
    // looked up by name, then opened
    for (who, family, id) in [(4, "Lookedupson", &sought4), (5, "Searchwell", &sought5)] {
        let s = server.get(&format!("Patient?family={family}"), &staff[who].token);
        assert_eq!(s.status, 200);
        assert_eq!(s.json()["entry"][0]["resource"]["id"], id.as_str());
        let r = server.get(&format!("Patient/{id}"), &staff[who].token);
        assert_eq!(r.status, 200);
        planted
            .entry("name-search")
            .or_default()
            .extend([rid(&s), rid(&r)]);
        planted
            .entry("unexplained-access")
            .or_default()
            .push(rid(&r));
    }
    // break-the-glass into another clinician's patient, then the chart
    let mut glass_reads = Vec::new();
    for (who, other) in [(0usize, 5usize), (1, 4)] {
        let target = staff[other].own[1].clone();
        // a code of another time step than the sign-in's (the replay guard refuses reuse)
        let t = now();
        let t = if t / 30 == at / 30 { t + 30 } else { t };
        let otp = phivault_auth::totp::code_at(&staff[who].secret, t);
        let g = post_form_with(
            agent,
            &format!("{}/auth/break-glass", server.origin),
            &[("Authorization", &format!("Bearer {}", staff[who].token))],
            &[
                ("patient", target.as_str()),
                ("reason", "collapsed in the corridor, chart needed now"),
                ("otp", &otp),
            ],
        );
        assert_eq!(g.status, 200, "{}", g.body);
        planted
            .entry("break-the-glass")
            .or_default()
            .push(g.request_id.expect("request id"));
        let r = server.get(&format!("Patient/{target}"), &staff[who].token);
        assert_eq!(r.status, 200);
        glass_reads.push(rid(&r));
    }
    // two clinicians open far more charts today than their peers
    for who in [6usize, 7] {
        for p in staff[who].own.iter().skip(OWN) {
            let r = server.get(&format!("Patient/{p}"), &staff[who].token);
            assert_eq!(r.status, 200);
            planted.entry("volume").or_default().push(rid(&r));
        }
    }

    // the events record the purpose of use, the client software and the names (never the
    // values) of the search parameters (IHE BALP)
    let o = cli(
        &["audit", "report", "--data-dir", &data, "--format", "json"],
        "",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = String::from_utf8(o.stdout).expect("utf8");
    assert!(!report.contains("Lookedupson") && !report.contains("Patientson"));
    let by_request: BTreeMap<String, Value> = report
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .map(|v| {
            let r = v["entity"][0]["what"]["identifier"]["value"]
                .as_str()
                .expect("rid");
            (r.to_owned(), v)
        })
        .collect();
    let purpose = |r: &str| by_request[r]["purposeOfEvent"][0]["coding"][0]["code"].clone();
    for r in &glass_reads {
        assert_eq!(purpose(r), "ETREAT", "access through break-the-glass");
    }
    let ordinary_read = &planted["self-access"][0];
    assert_eq!(purpose(ordinary_read), "TREAT");
    assert!(
        by_request[ordinary_read]["agent"][0]["name"]
            .as_str()
            .is_some_and(|ua| ua.starts_with("ureq")),
        "user agent"
    );
    let search = &planted["name-search"][0];
    let params = by_request[search]["entity"]
        .as_array()
        .expect("entities")
        .iter()
        .find(|e| e["role"]["code"] == "24")
        .expect("query entity");
    assert_eq!(params["detail"][0]["valueString"], "family");

    // the scan (working hours: the whole week; see the module's note)
    let summary = scan_all_week(&data);
    let alerts = alerts_listed(&data, "open");
    let evidence = |a: &Value| -> BTreeSet<String> {
        let mut e: BTreeSet<String> = a["evidence"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        e.insert(a["request_id"].as_str().unwrap_or("").to_owned());
        e
    };
    // each rule fired exactly for its planted violations (the name searches' charts are
    // unexplained too); break-the-glass alerts are raised when the window opens
    let mut expected: BTreeMap<&str, u64> = [
        "bulk-record",
        "coworker",
        "name-search",
        "restricted-record",
        "same-address",
        "same-family-name",
        "self-access",
        "volume",
    ]
    .into_iter()
    .map(|r| (r, 2))
    .collect();
    expected.insert("unexplained-access", 4);
    assert_eq!(summary["alerts"], json!(expected), "{summary}");
    // every planted violation raised its rule's alert
    for (rule, requests) in &planted {
        let of_rule: Vec<&Value> = alerts.iter().filter(|a| a["rule"] == *rule).collect();
        assert!(of_rule.len() >= 2, "{rule}: {summary}");
        for r in requests {
            assert!(
                of_rule.iter().any(|a| evidence(a).contains(r)),
                "{rule}: planted request {r} raised no alert ({summary})"
            );
        }
    }
    assert!(
        alerts
            .iter()
            .all(|a| a["score"].as_u64().is_some_and(|s| s > 0)),
        "every alert is scored"
    );
    // false alerts: those whose evidence holds no planted request
    let all_planted: BTreeSet<&String> = planted.values().flatten().collect();
    let false_alerts: Vec<&Value> = alerts
        .iter()
        .filter(|a| !evidence(a).iter().any(|r| all_planted.contains(r)))
        .collect();
    assert!(
        false_alerts.len() * 100 < legit,
        "{} false alerts over {legit} ordinary accesses: {false_alerts:?}",
        false_alerts.len()
    );
    // an auditor reviews them through the API: the same alerts as the CLI lists
    let secret = add_person(&server, "aud0", "auditor", "");
    let auditor = sign_in("aud0", &secret, "user/AuditEvent.rs openid fhirUser");
    let call = |method: &str, path: &str, token: &str, form: Option<&str>| {
        server.send(
            method,
            &format!("{}/audit/{path}", server.origin),
            Some(token),
            form.map(|f| ("application/x-www-form-urlencoded", f.as_bytes().to_vec())),
            &[],
        )
    };
    let listed = call("GET", "alerts?status=open&_count=1000", &auditor, None);
    assert_eq!(
        listed.status,
        200,
        "{}",
        String::from_utf8_lossy(&listed.body)
    );
    let ids = |v: &[Value]| -> BTreeSet<String> {
        v.iter()
            .map(|a| a["id"].as_str().expect("id").to_owned())
            .collect()
    };
    let api_alerts = listed.json()["alerts"].as_array().cloned().expect("alerts");
    assert_eq!(ids(&api_alerts), ids(&alerts));
    assert_eq!(
        call("GET", "alerts", &staff[0].token, None).status,
        403,
        "clinicians do not read alerts"
    );
    assert_eq!(
        call("GET", "alerts?status=closed", &auditor, None).status,
        400
    );
    let target = alerts
        .iter()
        .find(|a| a["rule"] == "self-access")
        .and_then(|a| a["id"].as_str())
        .expect("self-access alert");
    let path = format!("alerts/{target}");
    let note = Some("status=violation&note=opened+own+chart%2C+reported+to+the+privacy+officer");
    assert_eq!(
        call("POST", &path, &staff[0].token, note).status,
        403,
        "no one reviews their own alert but an auditor"
    );
    let reviewed = call("POST", &path, &auditor, note);
    assert_eq!(
        reviewed.status,
        200,
        "{}",
        String::from_utf8_lossy(&reviewed.body)
    );
    assert_eq!(reviewed.json()["alert"]["reviewer"], "aud0");
    assert_eq!(
        call("POST", &path, &auditor, note).status,
        400,
        "reviewed once"
    );
    assert_eq!(
        call("POST", &path, &auditor, Some("status=fine")).status,
        400
    );
    assert_eq!(
        call("POST", "alerts/0123456789abcdef", &auditor, note).status,
        404
    );
    let violations = call("GET", "alerts?status=violation", &auditor, None).json();
    assert_eq!(
        ids(violations["alerts"].as_array().expect("alerts")),
        BTreeSet::from([target.to_owned()])
    );
    // the report as CSV through the API is the CLI's, page by page
    let o = cli(
        &["audit", "report", "--data-dir", &data, "--patient", &vip0],
        "",
    );
    assert!(o.status.success());
    let from_cli: Vec<String> = String::from_utf8(o.stdout)
        .expect("utf8")
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(from_cli.len() >= 3, "{from_cli:?}");
    let mut from_api: Vec<String> = Vec::new();
    let mut next = Some(format!("report?patient={vip0}&_count=2"));
    while let Some(path) = next.take() {
        let r = call("GET", &path, &auditor, None);
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("text/csv"))
        );
        let text = String::from_utf8(r.body.clone()).expect("utf8");
        let mut lines = text.lines();
        let header = lines.next().expect("header").to_owned();
        if from_api.is_empty() {
            from_api.push(header);
        }
        from_api.extend(lines.map(str::to_owned));
        next = r.header("link").map(|l| {
            let url = l.trim_start_matches('<').split('>').next().expect("url");
            url.split_once("/audit/").expect("path").1.to_owned()
        });
    }
    assert_eq!(from_api, from_cli);
    assert_eq!(call("GET", "report", &staff[0].token, None).status, 403);
    assert_eq!(call("GET", "report?name=x", &auditor, None).status, 400);
    // the review is itself audited
    let o = cli(&["audit", "report", "--data-dir", &data], "");
    let csv = String::from_utf8(o.stdout).expect("utf8");
    let review_rid = reviewed.header("x-request-id").expect("rid");
    assert!(
        csv.lines()
            .any(|l| l.contains(review_rid) && l.contains(",alert-review,"))
    );

    eprintln!(
        "snooping scenario: {legit} ordinary accesses, {} planted requests, {} alerts, {} false; {summary}",
        all_planted.len(),
        alerts.len(),
        false_alerts.len()
    );
    server.stop();
}

/// The server runs the rules by itself and sends each new alert to syslog (here a socket
/// the test listens on); an operator's scan afterwards raises nothing twice.
#[test]
fn the_server_scans_by_itself_and_sends_new_alerts_to_syslog() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock_path = tmp.path().join("log.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let sock_arg = sock_path.to_str().expect("path").to_owned();
    let mut server = Server::start_with_args(&[
        "--scan-every",
        "10",
        "--start-hour",
        "0",
        "--end-hour",
        "24",
        "--weekends",
        "--alert-syslog",
        &sock_arg,
    ]);
    let system = server.token("system/*.cruds");
    let post = |rtype: &str, body: &Value| created(server.post(rtype, &system, body));
    let (f, g, b, l) = STAFF[0];
    let pr = post("Practitioner", &person("Practitioner", f, g, b, l));
    let patient = post(
        "Patient",
        &person("Patient", "Quietly", "Quinn", "1950-05-05", "1 Calm Street"),
    );
    post("Encounter", &encounter(&patient, &pr, false));
    let app = App::register(&server, "Ward App");
    let secret = add_person(&server, "clin0", "clinician", &pr);
    let token = app.token(&server, "clin0", &secret, now(), SCOPE);
    let pulled = server.get(&format!("Patient/{patient}/$everything"), &token);
    assert_eq!(pulled.status, 200);
    // and breaks the glass for someone they do not treat
    let stranger = post(
        "Patient",
        &person("Patient", "Unrelated", "Una", "1951-06-06", "2 Calm Street"),
    );
    let t = now() + 30;
    let glass = post_form_with(
        &app.agent,
        &format!("{}/auth/break-glass", server.origin),
        &[("Authorization", &format!("Bearer {token}"))],
        &[
            ("patient", stranger.as_str()),
            ("reason", "collapsed in the corridor, chart needed now"),
            ("otp", &phivault_auth::totp::code_at(&secret, t)),
        ],
    );
    assert_eq!(glass.status, 200, "{}", glass.body);
    let mut messages: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 8192];
    while messages.len() < 2 {
        let n = sock
            .recv(&mut buf)
            .expect("syslog messages within a minute");
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        messages
            .iter()
            .any(|m| m.contains("rule=\"break-the-glass\"")
                && m.contains(&format!("patient=\"{stranger}\""))
                && !m.contains("corridor")),
        "break-the-glass, without its reason: {messages:?}"
    );
    let msg = messages
        .iter()
        .find(|m| m.contains("rule=\"bulk-record\""))
        .expect("bulk-record")
        .clone();
    assert!(
        msg.starts_with("<84>1 "),
        "authpriv.warning, RFC 5424: {msg}"
    );
    assert!(msg.contains("rule=\"bulk-record\""), "{msg}");
    assert!(msg.contains(&format!("patient=\"{patient}\"")), "{msg}");
    assert!(
        msg.contains(&format!("request=\"{}\"", rid(&pulled))),
        "{msg}"
    );
    assert!(
        !msg.contains("Quietly") && !msg.contains("Quinn"),
        "no PHI: {msg}"
    );
    let data = server.data.to_str().expect("path").to_owned();
    let alert = alerts_listed(&data, "open")
        .into_iter()
        .find(|a| a["rule"] == "bulk-record")
        .expect("the alert is stored");
    assert!(msg.contains(&format!("id=\"{}\"", alert["id"].as_str().expect("id"))));
    server.stop();
    let summary = scan_all_week(&data);
    assert_eq!(
        summary["alerts"],
        json!({}),
        "nothing raised twice: {summary}"
    );
}

/// A ward day scanned in rounds (issue 15): six clinicians open the same seven ward
/// patients round after round, one of them through a long shift, with `phivault audit scan`
/// after every round (as the server's scan every few minutes would); in the fourth round
/// a seventh opens 25 patients. The volume rule counts each person's distinct patients of
/// the day however the day is split into scans: the long shift raises nothing, and the
/// spike is alerted — with each request that opened one of the 25 as evidence. (Counting
/// each scan's patients again, as before, made the long shift "91 patients today" and
/// the peers' inflated counts hid the spike.)
#[test]
fn a_ward_day_scanned_in_rounds_alerts_the_spike_and_not_the_long_shift() {
    const WARD: usize = 7;
    const SPIKE_N: usize = 25;
    let started = std::time::Instant::now();
    let day = now() / 86_400;
    let mut server = Server::start();
    let system = server.token("system/*.cruds");
    let post = |rtype: &str, body: &Value| created(server.post(rtype, &system, body));
    let data = server.data.to_str().expect("path").to_owned();
    let staff: Vec<String> = STAFF[..7]
        .iter()
        .map(|(f, g, b, l)| post("Practitioner", &person("Practitioner", f, g, b, l)))
        .collect();
    // the ward's patients, each in an ongoing encounter with the whole team
    let since = iso(now() - 86_400);
    let in_care = |patient: &str, team: &[String]| {
        let participant: Vec<Value> = team
            .iter()
            .map(|pr| json!({"individual": {"reference": format!("Practitioner/{pr}")}}))
            .collect();
        post(
            "Encounter",
            &json!({"resourceType": "Encounter", "status": "in-progress",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
                "subject": {"reference": format!("Patient/{patient}")},
                "participant": participant, "period": {"start": since}}),
        );
    };
    let patient = |n: usize| {
        post(
            "Patient",
            &person(
                "Patient",
                &format!("Wardson{n}"),
                "Pat",
                &format!("19{:02}-0{}-1{}", 30 + n % 60, 1 + n % 9, n % 10),
                &format!("{n} Ward Street"),
            ),
        )
    };
    let ward: Vec<String> = (0..WARD).map(patient).collect();
    for p in &ward {
        in_care(p, &staff);
    }
    let others: Vec<String> = (0..SPIKE_N).map(|n| patient(100 + n)).collect();
    for p in &others {
        in_care(p, &staff[6..]);
    }
    let app = App::register(&server, "Ward App");
    let at = now();
    let tokens: Vec<String> = staff
        .iter()
        .enumerate()
        .map(|(i, pr)| {
            let username = format!("clin{i}");
            let secret = add_person(&server, &username, "clinician", pr);
            app.token(&server, &username, &secret, at, SCOPE)
        })
        .collect();
    let open = |who: usize, p: &str| -> String {
        let r = server.get(&format!("Patient/{p}"), &tokens[who]);
        assert_eq!(r.status, 200);
        rid(&r)
    };
    let mut volume_raised: Vec<Value> = Vec::new();
    let mut spike = Vec::new();
    for round in 1..=13 {
        // the team's rounds; clin0 stays on for a long shift
        let team = if round <= 4 { 0..6 } else { 0..1 };
        for who in team {
            for p in &ward {
                open(who, p);
            }
        }
        if round == 4 {
            spike = others.iter().map(|p| open(6, p)).collect();
        }
        let summary = scan_all_week(&data);
        if summary["alerts"]["volume"].as_u64().unwrap_or(0) > 0 {
            volume_raised.push(json!({"round": round, "summary": summary}));
        }
    }
    if now() / 86_400 != day {
        eprintln!("the ward day crossed midnight UTC, so it is two days of counts: not judged");
        return;
    }
    let volume: Vec<Value> = alerts_listed(&data, "open")
        .into_iter()
        .filter(|a| a["rule"] == "volume")
        .collect();
    let who: Vec<&str> = volume
        .iter()
        .map(|a| a["username"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(who, ["clin6"], "{volume:?}; raised in {volume_raised:?}");
    assert_eq!(volume_raised.len(), 1, "{volume_raised:?}");
    assert_eq!(volume_raised[0]["round"], 4);
    let evidence: BTreeSet<&str> = volume[0]["evidence"]
        .as_array()
        .expect("evidence")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for r in &spike {
        assert!(evidence.contains(r.as_str()), "{r} is evidence: {volume:?}");
    }
    assert!(
        volume[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("{SPIKE_N} patients in a day"))),
        "{volume:?}"
    );
    eprintln!(
        "ward day in 13 scans: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    server.stop();
}
