//! Criterion benches of the per-resource hot paths: parse + validate, seal, open, blind
//! index entries, audit encode + chain. Run: `cargo bench -p phivault --bench hot_paths`.
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use phivault_audit::{Action, AuditEvent, ChainHead, Outcome};
use phivault_crypto::{KeyHierarchy, MasterKey, RecordAad};

fn resources() -> Vec<Vec<u8>> {
    let bundle = phivault_synth::patient_bundle(7, 0);
    bundle["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| serde_json::to_vec(&e["resource"]).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let res = resources();
    let bytes: u64 = res.iter().map(|r| r.len() as u64).sum();
    let mut g = c.benchmark_group("per-bundle");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("parse+validate", |b| {
        b.iter(|| {
            for r in &res {
                let v = phivault_fhir::parse_resource(r).expect("parse");
                phivault_fhir::validate(&v).expect("valid");
            }
        })
    });
    let keys = KeyHierarchy::new(&MasterKey::generate().expect("rng"));
    let (dek, _) = keys.new_data_key("p:bench").expect("dek");
    let aad = |i: usize| RecordAad {
        resource_type: "Observation",
        id: "0190f3a2-7b1c-7def-8abc-0123456789ab",
        version: i as u64 + 1,
        updated_ms: 0,
        key_id: "p:bench",
    };
    g.bench_function("seal", |b| {
        b.iter(|| {
            for (i, r) in res.iter().enumerate() {
                dek.seal(&aad(i), r).expect("seal");
            }
        })
    });
    let sealed: Vec<Vec<u8>> = res
        .iter()
        .enumerate()
        .map(|(i, r)| dek.seal(&aad(i), r).expect("seal"))
        .collect();
    g.bench_function("open", |b| {
        b.iter(|| {
            for (i, s) in sealed.iter().enumerate() {
                dek.open(&aad(i), s).expect("open");
            }
        })
    });
    let parsed: Vec<serde_json::Value> = res
        .iter()
        .map(|r| serde_json::from_slice(r).expect("json"))
        .collect();
    let index_keys = |rtype: &str| -> Vec<_> {
        phivault_fhir::search::indexed_params(rtype)
            .map(|d| {
                let scope = format!("{rtype}.{}", d.code);
                (
                    phivault_fhir::search::extractor(d),
                    keys.blind_index_key(&scope).truncating(16),
                )
            })
            .collect()
    };
    let per_type: Vec<_> = parsed
        .iter()
        .map(|v| index_keys(v["resourceType"].as_str().unwrap_or("")))
        .collect();
    g.bench_function("index entries (extract, terms, tokens)", |b| {
        b.iter(|| {
            let mut n = 0;
            for (v, params) in parsed.iter().zip(&per_type) {
                for (extractor, key) in params {
                    let Some(extractor) = extractor else { continue };
                    let mut terms = Vec::new();
                    for value in extractor.extract(v) {
                        phivault_fhir::search::index_terms(&value, &mut terms);
                    }
                    n += terms.iter().map(|t| key.token(t).len()).sum::<usize>();
                }
            }
            n
        })
    });
    g.finish();
    let ev = AuditEvent {
        time_ms: 1_800_000_000_000,
        request_id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
        client_id: Some("2ad92417c8d9eadae75d9c64b0cc083c".into()),
        user: None,
        action: Action::R,
        interaction: "read".into(),
        resource_type: Some("Observation".into()),
        resource_id: Some("0190f3a2-7b1c-7def-8abc-0123456789ab".into()),
        version: Some(1),
        patient: Some("0190f3a2-7b1c-7def-8abc-0123456789ac".into()),
        outcome: Outcome::from_http(200),
        source: "127.0.0.1".into(),
        entities: vec![],
        detail: Default::default(),
        writes: Vec::new(),
    };
    let mut head = ChainHead::EMPTY;
    c.bench_function("audit encode+chain (one read event)", |b| {
        b.iter(|| head.append(&ev.encode()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
