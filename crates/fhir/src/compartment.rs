//! The Patient compartment, derived from the official CompartmentDefinition and the
//! SearchParameter expressions it names.

use std::collections::HashMap;
use std::io::Read;
use std::sync::LazyLock;

use serde_json::Value;

use crate::is_valid_id;

static COMPARTMENT_JSON: &[u8] = include_bytes!("../data/compartmentdefinition-patient.json");
static SEARCH_PARAMS_GZ: &[u8] = include_bytes!("../data/search-parameters.json.gz");

/// Resource type -> element paths (JSON keys, without the resource type), in the order of the
/// CompartmentDefinition's `param` list.
type Paths = HashMap<String, Vec<Vec<String>>>;

static PATHS: LazyLock<Result<Paths, String>> = LazyLock::new(load);

static PARAMS: LazyLock<HashMap<String, Vec<String>>> = LazyLock::new(|| {
    let mut out = HashMap::new();
    let Ok(comp) = serde_json::from_slice::<Value>(COMPARTMENT_JSON) else {
        return out;
    };
    for r in comp
        .get("resource")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(rt) = r.get("code").and_then(Value::as_str) else {
            continue;
        };
        let params: Vec<String> = r
            .get("param")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect();
        if !params.is_empty() {
            out.insert(rt.to_owned(), params);
        }
    }
    out
});

/// The search parameters that put a resource of `rtype` into a patient's compartment
/// (from the official Patient CompartmentDefinition; `{def}` for `Patient` itself is the
/// resource's own id). Empty for types outside the compartment.
pub fn patient_compartment_params(rtype: &str) -> &'static [String] {
    PARAMS.get(rtype).map(Vec::as_slice).unwrap_or(&[])
}

/// Resource types that can be in a patient's compartment.
pub fn patient_compartment_types() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = PARAMS.keys().map(String::as_str).collect();
    v.sort_unstable();
    v
}

fn load() -> Result<Paths, String> {
    let comp: Value =
        serde_json::from_slice(COMPARTMENT_JSON).map_err(|e| format!("compartment: {e}"))?;
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(SEARCH_PARAMS_GZ)
        .read_to_end(&mut text)
        .map_err(|e| format!("search params: {e}"))?;
    let sp: Value = serde_json::from_slice(&text).map_err(|e| format!("search params: {e}"))?;
    // (base, code) -> expression
    let mut expr: HashMap<(&str, &str), &str> = HashMap::new();
    for e in sp
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(r) = e.get("resource") else { continue };
        let (Some(code), Some(x)) = (
            r.get("code").and_then(Value::as_str),
            r.get("expression").and_then(Value::as_str),
        ) else {
            continue;
        };
        for base in r
            .get("base")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(b) = base.as_str() {
                expr.insert((b, code), x);
            }
        }
    }
    let mut out = Paths::new();
    for r in comp
        .get("resource")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(rt) = r.get("code").and_then(Value::as_str) else {
            continue;
        };
        let mut paths = Vec::new();
        for param in r
            .get("param")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(param) = param.as_str() else {
                continue;
            };
            let Some(x) = expr.get(&(rt, param)) else {
                continue;
            };
            for part in x.split('|') {
                paths.extend(parse_expression(rt, part.trim()));
            }
        }
        if !paths.is_empty() {
            out.insert(rt.to_owned(), paths);
        }
    }
    Ok(out)
}

/// Parse the simple FHIRPath forms used by compartment search parameters into JSON key paths:
/// `T.a.b`, `T.a.where(resolve() is Patient)`, `(T.a as Reference)`, `T.a.as(Reference)`.
/// Returns nothing for other forms or for other resource types.
fn parse_expression(rt: &str, part: &str) -> Vec<Vec<String>> {
    let mut s = part;
    if let Some(inner) = s.strip_prefix('(').and_then(|x| x.strip_suffix(')')) {
        s = inner.trim();
    }
    let mut as_type = None;
    if let Some((left, ty)) = s.split_once(" as ") {
        s = left.trim();
        as_type = Some(ty.trim());
    } else if let Some(left) = s.strip_suffix(".as(Reference)") {
        s = left;
        as_type = Some("Reference");
    }
    if let Some(left) = s.strip_suffix(".where(resolve() is Patient)") {
        s = left;
    }
    let Some(rest) = s.strip_prefix(rt).and_then(|x| x.strip_prefix('.')) else {
        return Vec::new();
    };
    let segs: Vec<String> = rest.split('.').map(str::to_owned).collect();
    let ok = segs.iter().all(|seg| {
        seg.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && seg.chars().all(|c| c.is_ascii_alphanumeric())
    });
    if !ok {
        return Vec::new();
    }
    let mut out = vec![segs.clone()];
    if let Some(ty) = as_type.filter(|t| t.chars().all(|c| c.is_ascii_alphanumeric())) {
        // Choice element: `value as Reference` is `valueReference` in JSON.
        let mut choice = segs;
        if let Some(last) = choice.last_mut() {
            last.push_str(ty);
        }
        out.push(choice);
    }
    out
}

/// `Patient/{id}` (optionally `/_history/{vid}`) -> id. Absolute URLs and other forms are not
/// treated as compartment owners.
fn patient_id(reference: &str) -> Option<&str> {
    let rest = reference.strip_prefix("Patient/")?;
    let (id, tail) = match rest.split_once('/') {
        Some((id, tail)) => (id, Some(tail)),
        None => (rest, None),
    };
    if !is_valid_id(id) {
        return None;
    }
    match tail {
        None => Some(id),
        Some(t) => t
            .strip_prefix("_history/")
            .filter(|v| is_valid_id(v))
            .map(|_| id),
    }
}

/// The patient that owns this resource per the official Patient CompartmentDefinition: for a
/// Patient, its own `id`; otherwise the first `Patient/{id}` reference found in the elements
/// of the compartment's search parameters, in the definition's order (e.g. Observation:
/// `subject`, then `performer`). `None` for resources outside the Patient compartment
/// (Practitioner, Organization, ...), for a Patient without an id, and when no such
/// reference is present.
///
/// Only relative references `Patient/{id}` (optionally versioned) count; absolute URLs,
/// `urn:uuid:` and contained (`#x`) references do not — rewrite transaction references first.
pub fn patient_compartment(resource: &Value) -> Option<String> {
    patient_compartments(resource).into_iter().next()
}

/// Every patient whose compartment holds `resource` (each Patient reference at any of its
/// type's compartment paths; a Patient's own id), distinct, in path order. Per-patient
/// blind-index tokens are made for each of them.
pub fn patient_compartments(resource: &Value) -> Vec<String> {
    let Some(rt) = resource.get("resourceType").and_then(Value::as_str) else {
        return Vec::new();
    };
    if rt == "Patient" {
        return resource
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| is_valid_id(id))
            .map(str::to_owned)
            .into_iter()
            .collect();
    }
    let Some(paths) = PATHS.as_ref().ok().and_then(|p| p.get(rt)) else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for path in paths {
        let mut current: Vec<&Value> = vec![resource];
        for seg in path {
            let mut next = Vec::new();
            for v in current {
                match v.get(seg.as_str()) {
                    Some(Value::Array(items)) => next.extend(items.iter()),
                    Some(x) => next.push(x),
                    None => {}
                }
            }
            current = next;
        }
        for v in current {
            if let Some(id) = v
                .get("reference")
                .and_then(Value::as_str)
                .and_then(patient_id)
                && !out.iter().any(|o| o == id)
            {
                out.push(id.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn subj(rt: &str, key: &str, r: &str) -> Value {
        json!({"resourceType": rt, key: {"reference": r}})
    }

    #[test]
    fn loads() {
        let p = PATHS.as_ref();
        assert!(p.is_ok(), "{:?}", p.err());
        let p = p.ok().cloned().unwrap_or_default();
        assert!(p.len() > 60, "{}", p.len());
        assert_eq!(
            p.get("Claim").and_then(|v| v.first()),
            Some(&vec!["patient".to_string()])
        );
    }

    #[test]
    fn common_resources() {
        assert_eq!(
            patient_compartment(&json!({"resourceType": "Patient", "id": "p1"})),
            Some("p1".into())
        );
        assert_eq!(
            patient_compartment(&json!({"resourceType": "Patient"})),
            None
        );
        assert_eq!(
            patient_compartment(&json!({"resourceType": "Patient", "id": "bad id"})),
            None
        );
        for (rt, key) in [
            ("Observation", "subject"),
            ("Encounter", "subject"),
            ("MedicationRequest", "subject"),
            ("DocumentReference", "subject"),
            ("Condition", "subject"),
            ("Claim", "patient"),
            ("AllergyIntolerance", "patient"),
            ("Immunization", "patient"),
            ("DiagnosticReport", "subject"),
            ("Procedure", "subject"),
            ("Coverage", "beneficiary"),
            ("ExplanationOfBenefit", "patient"),
            ("CarePlan", "subject"),
            ("ServiceRequest", "subject"),
            ("Consent", "patient"),
            ("Task", "for"),
        ] {
            assert_eq!(
                patient_compartment(&subj(rt, key, "Patient/p-9")),
                Some("p-9".into()),
                "{rt}.{key}"
            );
        }
        assert_eq!(
            patient_compartment(&subj("Observation", "subject", "Patient/p9/_history/3")),
            Some("p9".into())
        );
    }

    #[test]
    fn order_and_non_patient_refs() {
        let o = json!({"resourceType": "Observation",
            "performer": [{"reference": "Practitioner/d"}, {"reference": "Patient/perf"}],
            "subject": {"reference": "Patient/subj"}});
        assert_eq!(patient_compartment(&o), Some("subj".into()));
        let o = json!({"resourceType": "Observation",
            "performer": [{"reference": "Practitioner/d"}, {"reference": "Patient/perf"}],
            "subject": {"reference": "Group/g"}});
        assert_eq!(patient_compartment(&o), Some("perf".into()));
        // Nested arrays: Procedure.performer.actor, Appointment.participant.actor
        let a = json!({"resourceType": "Appointment", "participant": [
            {"actor": {"reference": "Practitioner/x"}}, {"actor": {"reference": "Patient/a1"}}]});
        assert_eq!(patient_compartment(&a), Some("a1".into()));
        for r in [
            "Group/1",
            "http://other.example/fhir/Patient/1",
            "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
            "#p",
            "Patient/",
            "Patient/a b",
            "Patient/1/2",
        ] {
            assert_eq!(
                patient_compartment(&subj("Observation", "subject", r)),
                None,
                "{r}"
            );
        }
        assert_eq!(
            patient_compartment(&json!({"resourceType": "Observation"})),
            None
        );
        assert_eq!(
            patient_compartment(&json!({"subject": {"reference": "Patient/1"}})),
            None
        );
    }

    #[test]
    fn outside_compartment() {
        for rt in [
            "Practitioner",
            "Organization",
            "Location",
            "Medication",
            "Bundle",
        ] {
            let v = json!({"resourceType": rt, "id": "x",
                "subject": {"reference": "Patient/1"}, "patient": {"reference": "Patient/1"}});
            assert_eq!(patient_compartment(&v), None, "{rt}");
        }
    }

    #[test]
    fn expression_forms() {
        assert_eq!(parse_expression("A", "A.b.c"), vec![vec!["b", "c"]]);
        assert_eq!(
            parse_expression("A", "A.b.where(resolve() is Patient)"),
            vec![vec!["b"]]
        );
        assert_eq!(
            parse_expression("A", "(A.value as Reference)"),
            vec![vec!["value"], vec!["valueReference"]]
        );
        assert!(parse_expression("A", "B.b").is_empty());
        assert!(parse_expression("A", "A.b.where(resolve() is Practitioner)").is_empty());
        assert!(parse_expression("A", "A.extension('x')").is_empty());
    }
}
