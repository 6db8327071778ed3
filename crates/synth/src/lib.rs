#![forbid(unsafe_code)]
//! Deterministic synthetic FHIR R4 data for phivault.
//!
//! Every patient is emitted as a Synthea-style FHIR R4 *transaction* Bundle
//! whose entries carry `urn:uuid:` fullUrls, no resource ids, and
//! `request: {method: POST, url: <Type>, ifNoneExist: identifier=…}`; all
//! intra-bundle references use those `urn:uuid:` URLs.
//!
//! Every resource carries one more identifier, system [`SYNTH_SYSTEM`] and value
//! `{seed}-{patient index:06}-{entry:02}`, and its entry creates it only if none
//! exists with that identifier (conditional create). Loading a bundle twice —
//! an import resumed after an interruption — therefore adds nothing the second
//! time: the server matches every entry and resolves the `urn:uuid:` references
//! to the resources already there.
//!
//! Output depends only on `(seed, index)`: randomness comes from a built-in
//! SplitMix64-seeded xoshiro256** generator (no RNG crate), all arithmetic is
//! integer or exact, and JSON object keys serialize in a fixed order, so the
//! bytes are reproducible across platforms and releases.
//!
//! Identifiers (SSN in the never-issued 900–999 area, `MRN` + 8 digits, and
//! the practitioner NPI with a valid Luhn check digit) are derived from the
//! patient index through a seed-keyed bijection, so they are unique across the
//! patients of one seed (up to ~99 million patients).

mod generate;
mod pools;
mod rng;
mod time;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

/// The system of the identifier that makes every generated resource's create
/// idempotent (`request.ifNoneExist`).
pub const SYNTH_SYSTEM: &str = generate::SYNTH_SYSTEM;

/// How many patients to generate and from which seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SynthConfig {
    pub patients: usize,
    pub seed: u64,
}

/// One transaction Bundle per patient, deterministic for (seed, index).
///
/// Contents: 1 Patient, 1 Practitioner, 1–3 Encounter, 1–3 Condition,
/// 3–8 Observation, 1–2 MedicationRequest, 1 Claim, 1 DocumentReference.
pub fn patient_bundle(seed: u64, index: usize) -> Value {
    generate::build(seed, index)
}

/// File name used by [`write_bundles`] for the patient at `index` (0-based):
/// `patient-00001.json`, `patient-00002.json`, ...
pub fn bundle_file_name(index: usize) -> String {
    format!("patient-{:05}.json", index + 1)
}

/// Writes DIR/patient-00001.json ... (compact JSON, trailing newline) and
/// returns the file paths in patient order. Creates DIR if missing.
pub fn write_bundles(cfg: &SynthConfig, out: &Path) -> std::io::Result<Vec<PathBuf>> {
    write_bundles_with(cfg, out, |_| {})
}

/// [`write_bundles`], calling `progress(n)` after the `n`th file is written
/// (a progress bar's hook).
pub fn write_bundles_with(
    cfg: &SynthConfig,
    out: &Path,
    mut progress: impl FnMut(usize),
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let mut paths = Vec::with_capacity(cfg.patients);
    for index in 0..cfg.patients {
        let bundle = patient_bundle(cfg.seed, index);
        let mut bytes = serde_json::to_vec(&bundle).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        let path = out.join(bundle_file_name(index));
        std::fs::write(&path, &bytes)?;
        paths.push(path);
        progress(paths.len());
    }
    Ok(paths)
}

/// The PHI strings of a patient bundle that must never appear in plaintext at
/// rest (for leak tests), computed by reading the bundle JSON.
///
/// Collected, in bundle order and de-duplicated: every Patient `name.family`
/// and `name.given`, `identifier.value`, `telecom.value`, `address.line`,
/// `birthDate` as written, and for every DocumentReference attachment the
/// base64 `data` as written plus its decoded text (when it is UTF-8).
///
/// Strings shorter than 4 bytes are skipped: they would match random
/// ciphertext by chance. Bundles from [`patient_bundle`] never contain such
/// values (family names are >= 6 letters, given names >= 5).
pub fn phi_needles(bundle: &Value) -> Vec<String> {
    const MIN_LEN: usize = 4;
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        if s.len() >= MIN_LEN && !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    };
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for resource in entries.iter().filter_map(|e| e.get("resource")) {
        match resource.get("resourceType").and_then(Value::as_str) {
            Some("Patient") => {
                for name in array(resource, "name") {
                    if let Some(f) = name.get("family").and_then(Value::as_str) {
                        push(f);
                    }
                    for g in array(name, "given").iter().filter_map(Value::as_str) {
                        push(g);
                    }
                }
                for id in array(resource, "identifier") {
                    if let Some(v) = id.get("value").and_then(Value::as_str) {
                        push(v);
                    }
                }
                for t in array(resource, "telecom") {
                    if let Some(v) = t.get("value").and_then(Value::as_str) {
                        push(v);
                    }
                }
                for a in array(resource, "address") {
                    for l in array(a, "line").iter().filter_map(Value::as_str) {
                        push(l);
                    }
                }
                if let Some(d) = resource.get("birthDate").and_then(Value::as_str) {
                    push(d);
                }
            }
            Some("DocumentReference") => {
                for c in array(resource, "content") {
                    let data = c
                        .get("attachment")
                        .and_then(|a| a.get("data"))
                        .and_then(Value::as_str);
                    if let Some(data) = data {
                        if let Some(text) = B64
                            .decode(data)
                            .ok()
                            .and_then(|raw| String::from_utf8(raw).ok())
                        {
                            push(&text);
                        }
                        push(data);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
