//! The audit log as people read it: an event as a FHIR AuditEvent, the filters of a search
//! or report, and the CSV report's lines (spreadsheet-safe).

use phivault_audit::{Action, AuditEvent};
use serde_json::{Value, json};

use crate::Error;
use crate::engine::{form_urlencoded_pairs, instant};

/// Largest page.
pub const MAX_COUNT: usize = 200;
/// Most events one page examines.
pub const MAX_EXAMINE: usize = 50_000;
/// The largest tree a proof is computed over.
pub const MAX_PROOF_TREE: u64 = 2_000_000;

fn action_code(a: Action) -> &'static str {
    match a {
        Action::C => "C",
        Action::R => "R",
        Action::U => "U",
        Action::D => "D",
        Action::E => "E",
    }
}

/// One event as a FHIR AuditEvent (identifiers only, as stored).
pub fn to_fhir(seq: u64, e: &AuditEvent) -> Value {
    let mut agents = vec![json!({
        "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110150", "display": "Application"}]},
        "who": {"identifier": {"system": "urn:phivault:client",
            "value": e.client_id.as_deref().unwrap_or("unauthenticated")}},
        "requestor": e.user.is_none(),
        "network": {"address": e.source, "type": "2"},
    })];
    if let Some(ua) = &e.detail.user_agent {
        agents[0]["name"] = json!(ua);
    }
    if let Some(u) = &e.user {
        agents.push(json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                "code": "PROV"}]},
            "who": {"identifier": {"system": "urn:phivault:user", "value": u}},
            "requestor": true,
        }));
    }
    let mut entities = vec![json!({
        "what": {"identifier": {"system": "urn:phivault:request-id", "value": e.request_id}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "4"},
    })];
    if let (Some(t), Some(id)) = (&e.resource_type, &e.resource_id) {
        let reference = match e.version {
            Some(v) => format!("{t}/{id}/_history/{v}"),
            None => format!("{t}/{id}"),
        };
        entities.push(json!({"what": {"reference": reference},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"}}));
    }
    if let Some(p) = &e.patient {
        entities.push(json!({"what": {"reference": format!("Patient/{p}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}}));
    }
    for x in &e.entities {
        entities.push(json!({"what": {"reference": format!("{}/{}", x.resource_type, x.resource_id)},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"}}));
    }
    if !e.detail.query.is_empty() {
        // the names of the search parameters only: their values are never recorded
        entities.push(json!({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24"},
            "detail": [{"type": "parameters", "valueString": e.detail.query.join(",")}]}));
    }
    let purpose: Vec<Value> = e
        .detail
        .purpose
        .iter()
        .map(|p| {
            json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}]})
        })
        .collect();
    if let (Some(p), Some(person)) = (purpose.first(), agents.get_mut(1)) {
        person["purposeOfUse"] = json!([p]);
    }
    let mut out = json!({
        "resourceType": "AuditEvent",
        "id": seq.to_string(),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "urn:phivault:interaction", "code": e.interaction}],
        "action": action_code(e.action),
        "recorded": instant(i64::try_from(e.time_ms).unwrap_or(i64::MAX)),
        "outcome": e.outcome.code.to_string(),
        "outcomeDesc": outcome_desc(e),
        "agent": agents,
        "source": {"observer": {"display": "phivault"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "4"}]},
        "entity": entities,
    });
    if !purpose.is_empty() {
        out["purposeOfEvent"] = json!(purpose);
    }
    out
}

/// `outcomeDesc`: the HTTP status, and the reason code of a refusal when the event has one
/// (`HTTP 401 assertion-expired`): a fixed code of the server's, never request content.
fn outcome_desc(e: &AuditEvent) -> String {
    match &e.detail.reason {
        Some(r) => format!("HTTP {} {r}", e.outcome.http_status),
        None => format!("HTTP {}", e.outcome.http_status),
    }
}

/// The filters of one search (or report): `patient`, `user`, `client`, `action`, `date`
/// (repeatable, with the FHIR prefixes `ge gt le lt` or none for the whole date or
/// instant given), `_count`, `_after`.
#[derive(Default)]
pub struct Filter {
    /// The patient whose events are wanted.
    pub patient: Option<String>,
    user: Option<String>,
    client: Option<String>,
    action: Option<Action>,
    /// AuditEvent outcome code: 0, 4, 8 or 12.
    outcome: Option<u8>,
    /// Inclusive lower bound of the event time (ms).
    from_ms: Option<i64>,
    /// Exclusive upper bound of the event time (ms).
    to_ms: Option<i64>,
    /// Page size.
    pub count: usize,
    /// Position after which events are wanted.
    pub after: u64,
}

impl Filter {
    /// Every event about `patient`.
    pub fn about(patient: &str) -> Filter {
        Filter {
            patient: Some(patient.to_owned()),
            ..Default::default()
        }
    }

    /// Parse a query string (400 on anything unknown or malformed).
    pub fn parse(query: Option<&str>) -> Result<Filter, Error> {
        let mut f = Filter {
            count: 50,
            ..Default::default()
        };
        for (k, v) in form_urlencoded_pairs(query.unwrap_or("")) {
            let dup = |slot: &Option<String>| {
                if slot.is_some() {
                    Err(Error::bad_request("a parameter is repeated"))
                } else {
                    Ok(Some(v.clone()))
                }
            };
            match k.as_str() {
                "patient" => f.patient = dup(&f.patient)?,
                "user" => f.user = dup(&f.user)?,
                "client" => f.client = dup(&f.client)?,
                "action" => {
                    f.action = Some(match v.as_str() {
                        "C" => Action::C,
                        "R" => Action::R,
                        "U" => Action::U,
                        "D" => Action::D,
                        "E" => Action::E,
                        _ => return Err(Error::bad_request("action is one of C R U D E")),
                    })
                }
                "outcome" => {
                    f.outcome = Some(match v.as_str() {
                        "0" => 0,
                        "4" => 4,
                        "8" => 8,
                        "12" => 12,
                        _ => return Err(Error::bad_request("outcome is one of 0 4 8 12")),
                    })
                }
                "date" => {
                    let (prefix, value) = match v.get(..2) {
                        Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &v[2..]),
                        _ => ("eq", v.as_str()),
                    };
                    let r = phivault_fhir::search::parse_date(value)
                        .ok_or_else(|| Error::bad_request("date is a FHIR date or instant"))?;
                    let (lo, hi) = match prefix {
                        "ge" => (Some(r.lo), None),
                        "gt" => (Some(r.hi), None),
                        "lt" => (None, Some(r.lo)),
                        "le" => (None, Some(r.hi)),
                        _ => (Some(r.lo), Some(r.hi)),
                    };
                    if let Some(lo) = lo {
                        f.from_ms = Some(f.from_ms.map_or(lo, |x| x.max(lo)));
                    }
                    if let Some(hi) = hi {
                        f.to_ms = Some(f.to_ms.map_or(hi, |x| x.min(hi)));
                    }
                }
                "_count" => {
                    f.count = v
                        .parse::<usize>()
                        .map_err(|_| Error::bad_request("_count must be a number"))?
                        .min(MAX_COUNT)
                }
                "_after" => {
                    f.after = v
                        .parse()
                        .map_err(|_| Error::bad_request("_after must be a number"))?
                }
                _ => {
                    return Err(Error::bad_request(
                        "supported: patient, user, client, action, outcome, date, _count, _after",
                    ));
                }
            }
        }
        if let Some(p) = f
            .patient
            .as_deref()
            .map(|p| p.strip_prefix("Patient/").unwrap_or(p))
        {
            f.patient = Some(p.to_owned());
        }
        Ok(f)
    }

    /// Whether event `e` passes.
    pub fn matches(&self, e: &AuditEvent) -> bool {
        let t = i64::try_from(e.time_ms).unwrap_or(i64::MAX);
        if self.from_ms.is_some_and(|f| t < f) || self.to_ms.is_some_and(|x| t >= x) {
            return false;
        }
        let patient_ok = self.patient.as_deref().is_none_or(|p| {
            e.patient.as_deref() == Some(p)
                || e.entities.iter().any(|x| x.patient.as_deref() == Some(p))
        });
        patient_ok
            && self
                .user
                .as_deref()
                .is_none_or(|u| e.user.as_deref() == Some(u))
            && self
                .client
                .as_deref()
                .is_none_or(|c| e.client_id.as_deref() == Some(c))
            && self.action.is_none_or(|a| e.action == a)
            && self.outcome.is_none_or(|o| e.outcome.code == o)
    }

    /// The filters as a query string (for the next page's link).
    pub fn query(&self) -> String {
        let mut q = Vec::new();
        for (k, v) in [
            ("patient", &self.patient),
            ("user", &self.user),
            ("client", &self.client),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", phivault_auth::percent_encode(v)));
            }
        }
        if let Some(a) = self.action {
            q.push(format!("action={}", action_code(a)));
        }
        if let Some(o) = self.outcome {
            q.push(format!("outcome={o}"));
        }
        if let Some(f) = self.from_ms {
            q.push(format!("date=ge{}", instant(f)));
        }
        if let Some(t) = self.to_ms {
            q.push(format!("date=lt{}", instant(t)));
        }
        q.push(format!("_count={}", self.count));
        q.join("&")
    }
}

/// The header of the CSV report (`phivault audit report`, `GET /audit/report`).
pub const CSV_HEADER: &str = "seq,recorded,action,interaction,resource,patient,client,user,http_status,source,request_id,purpose_of_use,user_agent,search_parameters";

/// Event `e` at position `seq` as a line of the CSV report.
pub fn csv_line(seq: u64, e: &AuditEvent) -> String {
    let resource = match (&e.resource_type, &e.resource_id) {
        (Some(t), Some(i)) => format!("{t}/{i}"),
        (Some(t), None) => t.clone(),
        _ => String::new(),
    };
    [
        seq.to_string(),
        instant(i64::try_from(e.time_ms).unwrap_or(i64::MAX)),
        action_code(e.action).to_owned(),
        e.interaction.clone(),
        resource,
        e.patient.clone().unwrap_or_default(),
        e.client_id.clone().unwrap_or_default(),
        e.user.clone().unwrap_or_default(),
        e.outcome.http_status.to_string(),
        e.source.clone(),
        e.request_id.clone(),
        e.detail.purpose.clone().unwrap_or_default(),
        e.detail.user_agent.clone().unwrap_or_default(),
        e.detail.query.join(" "),
    ]
    .iter()
    .map(|f| csv_field(f))
    .collect::<Vec<_>>()
    .join(",")
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break; a
/// leading `=`, `+`, `-` or `@` is prefixed with `'` so spreadsheets do not run it.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Label prefix of sealed audit notes (with the event's request id).
pub const NOTE_LABEL: &str = "phivault audit note v1\u{0}";

/// An event's sealed note ([`phivault_audit::Detail::note`]) opened: a share link
/// requester's recipient text. None without one, or when it does not open.
pub fn note_of(vault: &crate::Vault, e: &AuditEvent) -> Option<String> {
    let sealed = e.detail.note.as_ref()?;
    let plain = vault
        .engine
        .open_secret(&format!("{NOTE_LABEL}{}", e.request_id), sealed)?;
    String::from_utf8(plain).ok()
}

/// Whether `e` is a request against a share link (its holder is not staff: where it came
/// from is the patient's business).
fn by_link_holder(e: &AuditEvent) -> bool {
    e.interaction.starts_with("shl-") && e.client_id.is_none()
}

/// An event as shown: whole to auditors; to the patient it concerns without the network
/// address and the software the access came from (staff's workstations are not the
/// patient's business) — except for a share link's requests, whose address is. `note`:
/// the event's note opened ([`note_of`]), shown as the recipient a link's requester named.
pub fn shown(seq: u64, e: &AuditEvent, to_patient: bool, note: Option<&str>) -> Value {
    let mut v = to_fhir(seq, e);
    // a share link's every event (made, refreshed, revoked, fetched) names the link
    if e.interaction.starts_with("shl-")
        && e.resource_type.is_none()
        && let Some(id) = &e.resource_id
        && let Some(es) = v["entity"].as_array_mut()
    {
        es.push(json!({"what": {"identifier": {"system": "urn:phivault:share-link", "value": id}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"}}));
    }
    if by_link_holder(e) {
        if let (Some(n), Some(agents)) = (note, v["agent"].as_array_mut()) {
            agents.push(json!({"type": {"text": "share link recipient"},
                "who": {"display": n}, "requestor": true}));
        }
        return v;
    }
    if to_patient && let Some(agents) = v["agent"].as_array_mut() {
        for a in agents {
            if let Some(o) = a.as_object_mut() {
                o.remove("network");
                o.remove("name");
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use phivault_audit::{Entity, Outcome};

    fn event() -> AuditEvent {
        AuditEvent {
            time_ms: 1_750_000_000_000,
            request_id: "r-1".into(),
            client_id: Some("app".into()),
            user: Some("u-1".into()),
            action: Action::R,
            interaction: "read".into(),
            resource_type: Some("Observation".into()),
            resource_id: Some("o1".into()),
            version: Some(2),
            patient: Some("p1".into()),
            outcome: Outcome::from_http(200),
            source: "127.0.0.1".into(),
            entities: vec![Entity {
                action: Action::R,
                resource_type: "Condition".into(),
                resource_id: "c1".into(),
                version: None,
                patient: Some("p2".into()),
            }],
            detail: phivault_audit::Detail {
                purpose: Some("TREAT".into()),
                user_agent: Some("fhirclient/4.2".into()),
                query: vec!["family".into(), "birthdate".into()],
                reason: None,
                note: None,
            },
            writes: Vec::new(),
        }
    }

    #[test]
    fn events_read_as_fhir_audit_events() {
        let v = to_fhir(7, &event());
        assert_eq!(v["id"], "7");
        assert_eq!(v["action"], "R");
        assert_eq!(v["outcome"], "0");
        assert_eq!(v["outcomeDesc"], "HTTP 200");
        assert_eq!(v["recorded"], "2025-06-15T15:06:40.000Z");
        assert_eq!(
            v["entity"][1]["what"]["reference"],
            "Observation/o1/_history/2"
        );
        assert_eq!(v["entity"][2]["what"]["reference"], "Patient/p1");
        assert_eq!(v["agent"][1]["who"]["identifier"]["value"], "u-1");
        // IHE BALP context: purpose of use, the client software, the parameter names
        assert_eq!(v["purposeOfEvent"][0]["coding"][0]["code"], "TREAT");
        assert_eq!(
            v["agent"][1]["purposeOfUse"][0]["coding"][0]["code"],
            "TREAT"
        );
        assert_eq!(v["agent"][0]["name"], "fhirclient/4.2");
        assert_eq!(
            v["entity"][4]["detail"][0]["valueString"],
            "family,birthdate"
        );
        assert_eq!(v["entity"][4]["role"]["code"], "24");
        let mine = shown(7, &event(), true, None);
        assert!(mine["agent"][0].get("name").is_none());
        assert!(mine["agent"][0].get("network").is_none());
        let errors = phivault_fhir::validate(&v);
        assert!(errors.is_ok(), "{errors:?}");
    }

    /// A refusal's reason code is part of `outcomeDesc`.
    #[test]
    fn a_refusal_shows_its_reason() {
        let mut e = event();
        e.outcome = phivault_audit::Outcome::from_http(401);
        e.detail.refused_because("jti-replayed");
        let v = to_fhir(8, &e);
        assert_eq!(v["outcome"], "4");
        assert_eq!(v["outcomeDesc"], "HTTP 401 jti-replayed");
        let errors = phivault_fhir::validate(&v);
        assert!(errors.is_ok(), "{errors:?}");
    }

    #[test]
    fn filters_parse_strictly_and_match() {
        let f = Filter::parse(Some("patient=Patient/p2&action=R&_count=500")).unwrap();
        assert_eq!(f.count, MAX_COUNT);
        assert!(f.matches(&event()), "an entity's patient counts");
        assert!(!Filter::parse(Some("patient=p3")).unwrap().matches(&event()));
        assert!(!Filter::parse(Some("user=u-2")).unwrap().matches(&event()));
        assert!(Filter::parse(Some("client=app")).unwrap().matches(&event()));
        assert!(Filter::parse(Some("outcome=0")).unwrap().matches(&event()));
        assert!(!Filter::parse(Some("outcome=4")).unwrap().matches(&event()));
        // periods (the event is at 2025-06-15T15:06:40Z)
        for (q, hit) in [
            ("date=ge2025-06-15", true),
            ("date=lt2025-06-15", false),
            ("date=2025-06-15", true),
            ("date=2025-06", true),
            ("date=2025-06-16", false),
            ("date=ge2025-06-01&date=lt2025-07-01", true),
            ("date=ge2025-06-16&date=lt2025-07-01", false),
            ("date=le2025-06-15T15:06:40.000Z", true),
            ("date=gt2025-06-15T15:06:40.000Z", false),
        ] {
            assert_eq!(
                Filter::parse(Some(q)).unwrap().matches(&event()),
                hit,
                "{q}"
            );
        }
        for bad in [
            "date=yesterday",
            "date=ge2025-13-01",
            "name=x",
            "_count=x",
            "action=Q",
            "outcome=3",
            "patient=a&patient=b",
            "_after=-1",
        ] {
            assert!(Filter::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
