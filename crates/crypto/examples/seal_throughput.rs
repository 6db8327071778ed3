//! Quick throughput check of record sealing (not a benchmark harness):
//! `cargo run --release -p phivault-crypto --example seal_throughput`.

use std::time::Instant;

use phivault_crypto::{KeyHierarchy, MasterKey, RecordAad};

fn main() {
    let h = KeyHierarchy::new(&MasterKey::generate().expect("rng"));
    let (key, _) = h.new_data_key("patient-1").expect("data key");
    let aad = RecordAad {
        resource_type: "Observation",
        id: "0b7d1e94-6c2a-4f3b-8e5d-9a1c7f40b2e6",
        version: 1,
        updated_ms: 0,
        key_id: "patient-1",
    };
    // ~1.5 KB of FHIR-like JSON with varying values.
    let doc = |i: u32| {
        format!(
            r#"{{"resourceType":"Observation","id":"obs-{i}","status":"final","category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory","display":"Laboratory"}}]}}],"code":{{"coding":[{{"system":"http://loinc.org","code":"2345-7","display":"Glucose [Mass/volume] in Serum or Plasma"}}],"text":"Glucose"}},"subject":{{"reference":"Patient/p-{}"}},"effectiveDateTime":"2025-01-{:02}T08:{:02}:00Z","valueQuantity":{{"value":{}.{},"unit":"mg/dL","system":"http://unitsofmeasure.org","code":"mg/dL"}},"referenceRange":[{{"low":{{"value":70}},"high":{{"value":99}},"text":"70-99 mg/dL"}}],"note":[{{"text":"Fasting sample drawn at clinic {}; patient reports {} hours since last meal. Repeat in {} weeks if elevated. Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua."}}]}}"#,
            i * 7919 % 100_000,
            i % 28 + 1,
            i % 60,
            70 + i % 90,
            i % 10,
            i % 17,
            i % 12 + 4,
            i % 8 + 1
        )
    };
    let docs: Vec<String> = (0..1000).map(doc).collect();
    let bytes: usize = docs.iter().map(String::len).sum();

    let rounds = 20;
    let t = Instant::now();
    let mut sealed = Vec::new();
    for _ in 0..rounds {
        sealed = docs
            .iter()
            .map(|d| key.seal(&aad, d.as_bytes()).expect("seal"))
            .collect::<Vec<_>>();
    }
    let seal_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        for (s, d) in sealed.iter().zip(&docs) {
            assert_eq!(key.open(&aad, s).expect("open").len(), d.len());
        }
    }
    let open_s = t.elapsed().as_secs_f64();
    let n = (docs.len() * rounds) as f64;
    let mb = (bytes * rounds) as f64 / 1e6;
    let sealed_bytes: usize = sealed.iter().map(Vec::len).sum();
    println!(
        "avg JSON {} B, avg sealed {} B (ratio {:.3})",
        bytes / docs.len(),
        sealed_bytes / docs.len(),
        sealed_bytes as f64 / bytes as f64
    );
    println!(
        "seal: {:.0} records/s, {:.1} MB/s of JSON; open: {:.0} records/s, {:.1} MB/s",
        n / seal_s,
        mb / seal_s,
        n / open_s,
        mb / open_s
    );

    // Large record: 1 MiB of JSON-ish text.
    let big: String = docs.iter().cycle().take(700).cloned().collect();
    let t = Instant::now();
    let s = key.seal(&aad, big.as_bytes()).expect("seal");
    let ts = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let o = key.open(&aad, &s).expect("open");
    let to = t.elapsed().as_secs_f64();
    assert_eq!(o.len(), big.len());
    println!(
        "{} KB record: seal {:.1} MB/s, open {:.1} MB/s, ratio {:.3}",
        big.len() / 1024,
        big.len() as f64 / 1e6 / ts,
        big.len() as f64 / 1e6 / to,
        s.len() as f64 / big.len() as f64
    );
}
