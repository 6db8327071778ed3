//! Random tampering of an audit log is always detected.
use phivault_audit::{Action, AuditEvent, ChainHead, Outcome, StoredEvent, verify_chain};
use proptest::prelude::*;

fn build(n: u64) -> (Vec<StoredEvent>, ChainHead) {
    let mut head = ChainHead::EMPTY;
    let rows = (1..=n)
        .map(|i| {
            let ev = AuditEvent {
                time_ms: i,
                request_id: format!("r{i}"),
                client_id: Some(format!("c{}", i % 3)),
                user: (i % 4 == 0).then(|| format!("u{i}")),
                action: Action::R,
                interaction: "read".into(),
                resource_type: Some("Observation".into()),
                resource_id: Some(format!("o{i}")),
                version: Some(i),
                patient: None,
                outcome: Outcome::from_http(200),
                source: "127.0.0.1".into(),
                entities: vec![],
                detail: Default::default(),
                writes: Vec::new(),
            };
            let bytes = ev.encode();
            let hash = head.append(&bytes);
            StoredEvent {
                seq: i,
                event: bytes,
                hash: hash.to_vec(),
            }
        })
        .collect();
    (rows, head)
}

#[derive(Debug, Clone)]
enum Tamper {
    FlipByte { row: usize, byte: usize, bit: u8 },
    Delete { row: usize },
    Swap { a: usize, b: usize },
    Duplicate { row: usize },
    Truncate { keep: usize },
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        (any::<usize>(), any::<usize>(), 0u8..8).prop_map(|(row, byte, bit)| Tamper::FlipByte {
            row,
            byte,
            bit
        }),
        any::<usize>().prop_map(|row| Tamper::Delete { row }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Tamper::Swap { a, b }),
        any::<usize>().prop_map(|row| Tamper::Duplicate { row }),
        any::<usize>().prop_map(|keep| Tamper::Truncate { keep }),
    ]
}

proptest! {
    #[test]
    fn any_tampering_is_detected(n in 2u64..40, t in tamper(), renumber in any::<bool>()) {
        let (mut rows, head) = build(n);
        let len = rows.len();
        match t {
            Tamper::FlipByte { row, byte, bit } => {
                let r = &mut rows[row % len];
                let total = r.event.len() + r.hash.len();
                let pos = byte % total;
                if pos < r.event.len() { r.event[pos] ^= 1 << bit } else { r.hash[pos - r.event.len()] ^= 1 << bit }
            }
            Tamper::Delete { row } => { rows.remove(row % len); }
            Tamper::Swap { a, b } => {
                let (a, b) = (a % len, b % len);
                prop_assume!(a != b);
                rows.swap(a, b);
            }
            Tamper::Duplicate { row } => { let r = rows[row % len].clone(); rows.insert(row % len, r); }
            Tamper::Truncate { keep } => { rows.truncate(keep % len); }
        }
        if renumber {
            for (i, r) in rows.iter_mut().enumerate() { r.seq = i as u64 + 1; }
        }
        prop_assert!(verify_chain(rows.into_iter().map(Ok::<_, ()>), Some(head)).is_err());
    }
}
