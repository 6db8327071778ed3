//! Audit-log filler for the `audit verify` benchmark (issue 5: 10 million events verified in
//! under a minute): appends N realistic events to the audit log of an initialised data
//! directory through the real store (chain hashes, Merkle frontier, signed heads and
//! checkpoints written by the store's own writer, signed with the data directory's audit
//! key), as the server would, only without HTTP in front.
//!
//! cargo run --release -p phivault --example audit_fill -- DATA_DIR EVENTS

use std::time::Instant;

use phivault_audit::{Action, AuditEvent, Entity, Outcome};
use phivault_store::{Store, WriteBatch};

const PER_BATCH: u64 = 5_000;
const IN_FLIGHT: usize = 8;

fn uuid(n: u64, salt: u64) -> String {
    let a = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
    let b = n.rotate_left(17) ^ salt.wrapping_mul(31);
    format!(
        "{:08x}-{:04x}-7{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b & 0xfff,
        b >> 16 & 0xffff_ffff_ffff
    )
}

/// The n-th event: reads, searches and writes of 10,000 patients' records by 50 clients
/// and 500 people.
fn event(n: u64) -> AuditEvent {
    let patient = uuid(n % 10_000, 1);
    let (action, interaction) = match n % 10 {
        0 => (Action::C, "create"),
        1 => (Action::U, "update"),
        2..=4 => (Action::E, "search-type"),
        _ => (Action::R, "read"),
    };
    let entities = if interaction == "search-type" {
        (0..3)
            .map(|i| Entity {
                action: Action::R,
                resource_type: "Observation".into(),
                resource_id: uuid(n * 3 + i, 2),
                version: Some(1),
                patient: Some(patient.clone()),
            })
            .collect()
    } else {
        Vec::new()
    };
    AuditEvent {
        time_ms: 1_796_000_000_000 + n * 3,
        request_id: format!("r{:x}-{n}", n % 7),
        client_id: Some(format!("client-{}", n % 50)),
        user: n.is_multiple_of(3).then(|| uuid(n % 500, 3)),
        action,
        interaction: interaction.into(),
        resource_type: Some("Observation".into()),
        resource_id: (interaction != "search-type").then(|| uuid(n, 4)),
        version: (interaction != "search-type").then_some(1 + n % 3),
        patient: Some(patient),
        outcome: Outcome::from_http(if n.is_multiple_of(97) { 404 } else { 200 }),
        source: format!("10.1.{}.{}", n % 200, n % 250),
        entities,
        detail: Default::default(),
        writes: Vec::new(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: audit_fill DATA_DIR EVENTS");
        std::process::exit(2);
    }
    let dir = std::path::PathBuf::from(&args[1]);
    let total: u64 = args[2].parse().expect("EVENTS");
    // the data directory's key file (the `file` provider keeps it outside the directory)
    let provider: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("keys/provider.json")).expect("keys/provider.json"),
    )
    .expect("provider json");
    let key_file = provider["key_file"].as_str().expect("a file key provider");
    let master =
        phivault_crypto::MasterKey::load_key_file(std::path::Path::new(key_file)).expect("key");
    let keys = phivault_crypto::KeyHierarchy::new(&master);
    let sealed = std::fs::read(dir.join("keys/audit-signing.sealed")).expect("audit key");
    let pkcs8 = keys
        .open_secret("audit-signing-v1", &sealed)
        .expect("open audit key");
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.expose()).expect("ed25519");
    let mut audit_public = [0u8; 32];
    audit_public.copy_from_slice(ring::signature::KeyPair::public_key(&pair).as_ref());
    // (the label `phivault`'s data directory derives the store's integrity secret under)
    let secret = keys.derive_subkey("store-integrity-v1");
    let store_keys = phivault_store::StoreKeys {
        signer: Box::new(move |m: &[u8]| pair.sign(m).as_ref().to_vec()),
        audit_public,
        integrity: phivault_store::integrity::Integrity::new(secret.expose()),
    };
    let store = phivault_store::sqlite::SqliteStore::open(&dir.join("phivault.db"), store_keys)
        .expect("open store");
    let start = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    let mut n = 0;
    while n < total {
        let end = (n + PER_BATCH).min(total);
        let rx = store.submit(WriteBatch {
            audit: (n..end).map(event).collect(),
            ..Default::default()
        });
        in_flight.push_back(rx);
        if in_flight.len() >= IN_FLIGHT
            && let Some(rx) = in_flight.pop_front()
        {
            rx.blocking_recv().expect("writer").expect("commit");
        }
        n = end;
    }
    for rx in in_flight {
        rx.blocking_recv().expect("writer").expect("commit");
    }
    store.close();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"events\": {total}, \"seconds\": {secs:.1}, \"events_per_s\": {:.0}}}",
        total as f64 / secs
    );
}
