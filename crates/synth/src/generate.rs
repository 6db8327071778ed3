//! Builds one Synthea-style transaction Bundle for a patient.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::pools::{
    CITIES, CONDITIONS, ENCOUNTER_TYPES, FAMILY, GIVEN_FEMALE, GIVEN_MALE, MEDS, NOTE_ADVERB,
    NOTE_ADVICE, NOTE_PLACE, NOTE_REPORT, NOTE_SUBJECT, NOTE_TIME, NOTE_VERB, OBSERVATIONS, PAYERS,
    PRACTITIONER_FAMILY, PRACTITIONER_GIVEN, STREET_SUFFIX, STREETS, unit_label,
};
use crate::rng::{Rng, SplitMix64};
use crate::time::{age_years, days_from_civil, fmt_date, fmt_datetime};

pub(crate) const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";
pub(crate) const NPI_SYSTEM: &str = "http://hl7.org/fhir/sid/us-npi";
pub(crate) const MRN_SYSTEM: &str = "urn:oid:2.16.840.1.113883.19.5.99999.1";
/// The system of the identifier every generated resource carries (see [`crate::SYNTH_SYSTEM`]).
pub(crate) const SYNTH_SYSTEM: &str = "urn:phivault:synth";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const SNOMED: &str = "http://snomed.info/sct";
const LOINC: &str = "http://loinc.org";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const UCUM: &str = "http://unitsofmeasure.org";
const CPT: &str = "http://www.ama-assn.org/go/cpt";

/// Golden-ratio constant used to separate per-index streams.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Domain-separated, seed-dependent 64-bit value.
fn derive(seed: u64, domain: u64) -> u64 {
    let mut sm = SplitMix64::new(seed ^ domain.wrapping_mul(GOLDEN));
    sm.next_u64();
    sm.next_u64()
}

/// An affine bijection on `0..modulus` (`mul` coprime to `modulus`), so that
/// distinct patient indices of one seed get distinct identifiers.
fn permute(index: u64, mul: u64, add: u64, modulus: u64) -> u64 {
    let v = (u128::from(index) * u128::from(mul) + u128::from(add)) % u128::from(modulus);
    // < modulus <= u64::MAX, so the narrowing is lossless.
    v as u64
}

/// NPI check digit for the 9 leading digits (Luhn over "80840" + digits).
pub(crate) fn npi_check_digit(d9: &[u8; 9]) -> u8 {
    // The constant 24 accounts for the "80840" prefix.
    let mut sum: u32 = 24;
    for (i, &d) in d9.iter().enumerate() {
        let d = u32::from(d);
        if i % 2 == 0 {
            let x = d * 2;
            sum += x / 10 + x % 10;
        } else {
            sum += d;
        }
    }
    // Always < 10.
    ((10 - sum % 10) % 10) as u8
}

/// Full Luhn check of a 10-digit NPI with the "80840" prefix.
#[cfg(test)]
pub(crate) fn npi_is_valid(npi: &str) -> bool {
    if npi.len() != 10 || !npi.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let full = format!("80840{npi}");
    let mut sum = 0u32;
    for (i, b) in full.bytes().rev().enumerate() {
        let d = u32::from(b - b'0');
        if i % 2 == 1 {
            let x = d * 2;
            sum += x / 10 + x % 10;
        } else {
            sum += d;
        }
    }
    let rem = sum % 10;
    rem == 0
}

fn ssn_for(seed: u64, index: u64) -> String {
    // 100 areas (900-999) x 99 groups x 9999 serials.
    const M: u64 = 100 * 99 * 9999;
    // 7*13*17*19*23: coprime to 2, 3, 5, 11 and 101 (the factors of M).
    let v = permute(index, 676_039, derive(seed, 1) % M, M);
    let serial = v % 9999 + 1;
    let group = (v / 9999) % 99 + 1;
    let area = v / (9999 * 99) + 900;
    format!("{area:03}-{group:02}-{serial:04}")
}

fn mrn_for(seed: u64, index: u64) -> String {
    const M: u64 = 100_000_000;
    // Odd and not a multiple of 5, hence coprime to 10^8.
    format!(
        "MRN{:08}",
        permute(index, 73_939_133, derive(seed, 2) % M, M)
    )
}

fn npi_for(seed: u64, index: u64) -> String {
    const M: u64 = 100_000_000;
    let v = permute(index, 48_271_147, derive(seed, 3) % M, M);
    let mut d9 = [0u8; 9];
    d9[0] = 1;
    let mut rest = v;
    for slot in d9[1..].iter_mut().rev() {
        // rest % 10 < 10.
        *slot = (rest % 10) as u8;
        rest /= 10;
    }
    let check = npi_check_digit(&d9);
    let mut s: String = d9.iter().map(|d| char::from(b'0' + d)).collect();
    s.push(char::from(b'0' + check));
    s
}

/// Quantity value with a fixed number of decimals.
fn scaled(n: i64, decimals: u32) -> Value {
    if decimals == 0 {
        json!(n)
    } else {
        // Exact IEEE division; serde_json prints the shortest round-trip form.
        json!(n as f64 / 10f64.powi(decimals as i32))
    }
}

fn money(cents: i64) -> Value {
    json!({ "value": scaled(cents, 2), "currency": "USD" })
}

fn reference(full_url: &str) -> Value {
    json!({ "reference": full_url })
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

fn concept(system: &str, code: &str, display: &str) -> Value {
    json!({ "coding": [coding(system, code, display)], "text": display })
}

fn article_for(age: i64) -> &'static str {
    if age == 8 || age == 11 || age == 18 || (80..90).contains(&age) {
        "an"
    } else {
        "a"
    }
}

/// The value of the synth identifier of a patient's `entry`th resource:
/// `{seed}-{index:06}-{entry:02}` (unique per seed, patient and position).
pub(crate) fn synth_identifier(seed: u64, index: u64, entry: usize) -> String {
    format!("{seed}-{index:06}-{entry:02}")
}

struct Builder {
    rng: Rng,
    entries: Vec<Value>,
    seed: u64,
    index: u64,
}

impl Builder {
    fn new_url(&mut self) -> String {
        format!("urn:uuid:{}", self.rng.uuid())
    }

    /// Adds the entry: the resource gets its synth identifier (appended to those it has)
    /// and the request creates it only if no resource carries that identifier yet.
    fn push(&mut self, full_url: &str, mut resource: Value) {
        let rtype = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let value = synth_identifier(self.seed, self.index, self.entries.len());
        let identifier = json!({ "system": SYNTH_SYSTEM, "value": value });
        match resource.get_mut("identifier").and_then(Value::as_array_mut) {
            Some(ids) => ids.push(identifier),
            None => resource["identifier"] = json!([identifier]),
        }
        self.entries.push(json!({
            "fullUrl": full_url,
            "resource": resource,
            "request": {
                "method": "POST",
                "url": rtype,
                "ifNoneExist": format!("identifier={SYNTH_SYSTEM}|{value}"),
            },
        }));
    }

    fn add(&mut self, resource: Value) -> String {
        let url = self.new_url();
        self.push(&url, resource);
        url
    }
}

struct Enc {
    url: String,
    start: i64,
    end: i64,
    kind: usize,
}

pub(crate) fn build(seed: u64, index: usize) -> Value {
    // usize -> u64 is lossless on every supported target.
    let idx = index as u64;
    let stream = derive(seed, 0) ^ idx.wrapping_mul(GOLDEN);
    let mut b = Builder {
        rng: Rng::from_seed(stream),
        entries: Vec::with_capacity(24),
        seed,
        index: idx,
    };

    // ---------------------------------------------------------------- Patient
    let gender = match b.rng.below(100) {
        0..=47 => "female",
        48..=95 => "male",
        96..=97 => "other",
        _ => "unknown",
    };
    let given_pool: Vec<&str> = match gender {
        "female" => GIVEN_FEMALE.to_vec(),
        "male" => GIVEN_MALE.to_vec(),
        _ => GIVEN_FEMALE.iter().chain(GIVEN_MALE).copied().collect(),
    };
    let family = *b.rng.pick(FAMILY);
    let n_given = if b.rng.chance(1, 2) { 2 } else { 1 };
    let given: Vec<&str> = b
        .rng
        .distinct(given_pool.len(), n_given)
        .into_iter()
        .map(|i| given_pool[i])
        .collect();
    let mut names = vec![json!({ "use": "official", "family": family, "given": given })];
    if b.rng.chance(2, 5) {
        if gender == "female" && b.rng.chance(2, 3) {
            let maiden = *b.rng.pick(FAMILY);
            names.push(json!({ "use": "maiden", "family": maiden, "given": [given[0]] }));
        } else {
            let nick = *b.rng.pick(&given_pool);
            names.push(json!({ "use": "usual", "family": family, "given": [nick] }));
        }
    }

    let birth = b
        .rng
        .range(days_from_civil(1930, 1, 1), days_from_civil(2023, 12, 31));
    let house = b.rng.range(1, 9999);
    let street = format!(
        "{house} {} {}",
        b.rng.pick(STREETS),
        b.rng.pick(STREET_SUFFIX)
    );
    let mut lines = vec![street];
    if b.rng.chance(1, 5) {
        lines.push(format!("Apt {}", b.rng.range(100, 999)));
    }
    let (city, state, zip3) = *b.rng.pick(CITIES);
    let zip = format!("{zip3}{:02}", b.rng.below(100));
    let phone = format!(
        "555-{}{:02}-{:04}",
        b.rng.range(2, 9),
        b.rng.below(100),
        b.rng.below(10_000)
    );
    let ssn = ssn_for(seed, idx);
    let mrn = mrn_for(seed, idx);
    let marital = *b.rng.pick(&[
        ("M", "Married"),
        ("S", "Never Married"),
        ("D", "Divorced"),
        ("W", "Widowed"),
    ]);

    let patient_url = b.new_url();
    let patient = json!({
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "usual",
                "type": concept(V2_0203, "MR", "Medical Record Number"),
                "system": MRN_SYSTEM,
                "value": mrn,
            },
            {
                "use": "official",
                "type": concept(V2_0203, "SS", "Social Security Number"),
                "system": SSN_SYSTEM,
                "value": ssn,
            }
        ],
        "active": true,
        "name": names,
        "telecom": [ { "system": "phone", "value": phone, "use": "home" } ],
        "gender": gender,
        "birthDate": fmt_date(birth),
        "address": [ {
            "use": "home",
            "type": "physical",
            "line": lines,
            "city": city,
            "state": state,
            "postalCode": zip,
            "country": "US",
        } ],
        "maritalStatus": concept(
            "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
            marital.0,
            marital.1,
        ),
    });
    b.push(&patient_url, patient);

    // ----------------------------------------------------------- Practitioner
    let pr_family = *b.rng.pick(PRACTITIONER_FAMILY);
    let pr_given = *b.rng.pick(PRACTITIONER_GIVEN);
    let practitioner_url = b.add(json!({
        "resourceType": "Practitioner",
        "identifier": [ { "system": NPI_SYSTEM, "value": npi_for(seed, idx) } ],
        "active": true,
        "name": [ { "use": "official", "family": pr_family, "given": [pr_given], "prefix": ["Dr."] } ],
    }));

    // ------------------------------------------------------------- Encounters
    let first_day = (birth + 1).max(days_from_civil(2015, 1, 1));
    let last_day = days_from_civil(2024, 12, 31);
    let n_enc = b.rng.range(1, 3) as usize;
    let mut days: Vec<i64> = (0..n_enc)
        .map(|_| b.rng.range(first_day, last_day))
        .collect();
    days.sort_unstable();
    let mut encs = Vec::with_capacity(n_enc);
    for day in days {
        let start = day * 86_400 + b.rng.range(8, 17) * 3600 + b.rng.range(0, 3) * 900;
        let end = start + b.rng.range(1, 4) * 900;
        let kind = b.rng.index(ENCOUNTER_TYPES.len());
        let (code, display, ..) = ENCOUNTER_TYPES[kind];
        let url = b.add(json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "AMB",
                "display": "ambulatory",
            },
            "type": [concept(SNOMED, code, display)],
            "subject": reference(&patient_url),
            "participant": [ { "individual": reference(&practitioner_url) } ],
            "period": { "start": fmt_datetime(start), "end": fmt_datetime(end) },
        }));
        encs.push(Enc {
            url,
            start,
            end,
            kind,
        });
    }

    // ------------------------------------------------------------- Conditions
    let n_cond = b.rng.range(1, 3) as usize;
    let cond_idx = b.rng.distinct(CONDITIONS.len(), n_cond);
    let mut conds = Vec::with_capacity(n_cond);
    for &ci in &cond_idx {
        let def = &CONDITIONS[ci];
        let e = &encs[b.rng.index(encs.len())];
        let enc_day = e.start.div_euclid(86_400);
        let onset_day = (enc_day - b.rng.range(0, 720)).max(birth);
        let onset = onset_day * 86_400 + b.rng.range(0, 86_399);
        let onset = onset.min(e.start);
        let url = b.add(json!({
            "resourceType": "Condition",
            "clinicalStatus": {
                "coding": [ {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                } ]
            },
            "verificationStatus": {
                "coding": [ {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": "confirmed",
                } ]
            },
            "category": [ {
                "coding": [ {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                    "code": "encounter-diagnosis",
                    "display": "Encounter Diagnosis",
                } ]
            } ],
            "code": concept(SNOMED, def.code, def.display),
            "subject": reference(&patient_url),
            "encounter": reference(&e.url),
            "onsetDateTime": fmt_datetime(onset),
            "recordedDate": fmt_datetime(e.start),
        }));
        conds.push((url, ci));
    }

    // ----------------------------------------------------------- Observations
    let n_obs = b.rng.range(3, 8) as usize;
    let obs_idx = b.rng.distinct(OBSERVATIONS.len(), n_obs);
    let mut first_obs: Option<(usize, Value)> = None;
    for &oi in &obs_idx {
        let def = &OBSERVATIONS[oi];
        let e = &encs[b.rng.index(encs.len())];
        let value = scaled(b.rng.range(def.lo, def.hi), def.decimals);
        let effective = e.start + b.rng.range(0, 2) * 300;
        let (cat_code, cat_display) = if def.vital {
            ("vital-signs", "Vital signs")
        } else {
            ("laboratory", "Laboratory")
        };
        b.add(json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [ {
                "coding": [ {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": cat_code,
                    "display": cat_display,
                } ]
            } ],
            "code": concept(LOINC, def.loinc, def.display),
            "subject": reference(&patient_url),
            "encounter": reference(&e.url),
            "effectiveDateTime": fmt_datetime(effective),
            "issued": fmt_datetime(effective + 3600),
            "valueQuantity": {
                "value": value,
                "unit": unit_label(def.ucum),
                "system": UCUM,
                "code": def.ucum,
            },
        }));
        if first_obs.is_none() {
            first_obs = Some((oi, value));
        }
    }

    // ------------------------------------------------------ MedicationRequests
    let n_med = b.rng.range(1, 2) as usize;
    let mut med_idx: Vec<usize> = Vec::with_capacity(n_med);
    for k in 0..n_med {
        let preferred = conds.get(k).map(|&(_, ci)| CONDITIONS[ci].med);
        let mi = match preferred {
            Some(m) if !med_idx.contains(&m) => m,
            _ => loop {
                let m = b.rng.index(MEDS.len());
                if !med_idx.contains(&m) {
                    break m;
                }
            },
        };
        med_idx.push(mi);
    }
    for (k, &mi) in med_idx.iter().enumerate() {
        let (code, display, _, dosage) = MEDS[mi];
        let e = &encs[b.rng.index(encs.len())];
        let reason = &conds[k.min(conds.len() - 1)].0;
        b.add(json!({
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": concept(RXNORM, code, display),
            "subject": reference(&patient_url),
            "encounter": reference(&e.url),
            "authoredOn": fmt_datetime(e.end),
            "requester": reference(&practitioner_url),
            "reasonReference": [reference(reason)],
            "dosageInstruction": [ { "sequence": 1, "text": dosage } ],
        }));
    }

    // ------------------------------------------------------------------ Claim
    let first = &encs[0];
    let last = &encs[encs.len() - 1];
    let mut total = 0i64;
    let items: Vec<Value> = encs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (_, _, cpt, cpt_display, lo, hi) = ENCOUNTER_TYPES[e.kind];
            let cents = b.rng.range(lo / 100, hi / 100) * 100 + b.rng.below(4) as i64 * 25;
            total += cents;
            json!({
                "sequence": i + 1,
                "diagnosisSequence": [1],
                "encounter": [reference(&e.url)],
                "productOrService": concept(CPT, cpt, cpt_display),
                "servicedDate": fmt_date(e.start.div_euclid(86_400)),
                "quantity": { "value": 1 },
                "unitPrice": money(cents),
                "net": money(cents),
            })
        })
        .collect();
    let diagnosis: Vec<Value> = conds
        .iter()
        .enumerate()
        .map(|(i, (url, _))| json!({ "sequence": i + 1, "diagnosisReference": reference(url) }))
        .collect();
    let age_at_last = age_years(birth, last.start.div_euclid(86_400));
    let payer = if age_at_last >= 65 {
        "Medicare"
    } else {
        *b.rng.pick(PAYERS)
    };
    let claim_type = if b.rng.chance(3, 4) {
        ("professional", "Professional")
    } else {
        ("institutional", "Institutional")
    };
    b.add(json!({
        "resourceType": "Claim",
        "status": "active",
        "type": {
            "coding": [ {
                "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                "code": claim_type.0,
                "display": claim_type.1,
            } ]
        },
        "use": "claim",
        "patient": reference(&patient_url),
        "billablePeriod": { "start": fmt_datetime(first.start), "end": fmt_datetime(last.end) },
        "created": fmt_datetime(last.end),
        "provider": reference(&practitioner_url),
        "priority": {
            "coding": [ {
                "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                "code": "normal",
            } ]
        },
        "diagnosis": diagnosis,
        "insurance": [ { "sequence": 1, "focal": true, "coverage": { "display": payer } } ],
        "item": items,
        "total": money(total),
    }));

    // ------------------------------------------------------- DocumentReference
    let age = age_years(birth, last.start.div_euclid(86_400));
    let who = match (gender, age >= 18) {
        ("female", true) => "woman",
        ("male", true) => "man",
        ("female", false) => "girl",
        ("male", false) => "boy",
        (_, true) => "patient",
        (_, false) => "child",
    };
    let age_phrase = if age == 0 {
        format!("an infant {who}")
    } else {
        format!("{} {age}-year-old {who}", article_for(age))
    };
    let main_cond = CONDITIONS[conds[0].1].phrase;
    let mut note = format!(
        "{} {family}, {age_phrase}, was seen on {} for follow-up of {main_cond}.",
        given[0],
        fmt_date(last.start.div_euclid(86_400)),
    );
    if let Some((oi, value)) = &first_obs
        && b.rng.chance(2, 3)
    {
        let def = &OBSERVATIONS[*oi];
        note.push_str(&format!(
            " Most recent {} was {} {}.",
            def.short,
            value,
            unit_label(def.ucum)
        ));
    }
    note.push_str(&format!(
        " The patient {} that {} {} {} {} {}.",
        b.rng.pick(NOTE_REPORT),
        b.rng.pick(NOTE_SUBJECT),
        b.rng.pick(NOTE_VERB),
        b.rng.pick(NOTE_ADVERB),
        b.rng.pick(NOTE_PLACE),
        b.rng.pick(NOTE_TIME),
    ));
    if b.rng.chance(1, 2) {
        note.push_str(&format!(
            " Plan: continue {}, {}, and return in {} weeks.",
            MEDS[med_idx[0]].2,
            b.rng.pick(NOTE_ADVICE),
            b.rng.range(2, 12)
        ));
    }
    b.add(json!({
        "resourceType": "DocumentReference",
        "status": "current",
        "type": concept(LOINC, "11506-3", "Progress note"),
        "category": [ {
            "coding": [ {
                "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                "code": "clinical-note",
                "display": "Clinical Note",
            } ]
        } ],
        "subject": reference(&patient_url),
        "date": fmt_datetime(last.end),
        "author": [reference(&practitioner_url)],
        "content": [ {
            "attachment": {
                "contentType": "text/plain",
                "data": B64.encode(note.as_bytes()),
                "title": "Progress note",
            }
        } ],
        "context": {
            "encounter": [reference(&last.url)],
            "period": { "start": fmt_datetime(last.start), "end": fmt_datetime(last.end) },
        },
    }));

    json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": b.entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npi_reference_example() {
        // CMS example NPI.
        assert!(npi_is_valid("1234567893"));
        assert!(!npi_is_valid("1234567890"));
        assert_eq!(npi_check_digit(&[1, 2, 3, 4, 5, 6, 7, 8, 9]), 3);
    }

    #[test]
    fn generated_identifiers_are_valid_and_unique() {
        let mut ssns = std::collections::HashSet::new();
        let mut mrns = std::collections::HashSet::new();
        let mut npis = std::collections::HashSet::new();
        for i in 0..5000 {
            let npi = npi_for(99, i);
            assert!(npi_is_valid(&npi), "{npi}");
            assert!(npis.insert(npi));
            let ssn = ssn_for(99, i);
            let area: u32 = ssn[..3].parse().expect("digits");
            assert!((900..=999).contains(&area), "{ssn}");
            assert_ne!(&ssn[4..6], "00");
            assert_ne!(&ssn[7..], "0000");
            assert!(ssns.insert(ssn));
            let mrn = mrn_for(99, i);
            assert_eq!(mrn.len(), 11);
            assert!(mrns.insert(mrn));
        }
    }

    #[test]
    fn articles() {
        assert_eq!(article_for(8), "an");
        assert_eq!(article_for(18), "an");
        assert_eq!(article_for(84), "an");
        assert_eq!(article_for(9), "a");
        assert_eq!(article_for(80 + 10), "a");
    }
}
