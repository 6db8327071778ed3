//! Property tests for record sealing (DR1, invariant 4): round trip, and that no single-byte
//! change of the sealed blob and no change of any associated-data field ever opens.

use phivault_crypto::{CryptoError, DataKey, KeyHierarchy, MasterKey, RecordAad};
use proptest::prelude::*;

fn data_key() -> DataKey {
    let h = KeyHierarchy::new(&MasterKey::from_bytes(&[0x5a; 32]));
    match h.new_data_key("prop") {
        Ok((k, _)) => k,
        Err(e) => panic!("data key: {e}"),
    }
}

#[derive(Debug, Clone)]
struct Fields {
    resource_type: String,
    id: String,
    version: u64,
    key_id: String,
    updated_ms: i64,
}

impl Fields {
    fn aad(&self) -> RecordAad<'_> {
        RecordAad {
            resource_type: &self.resource_type,
            id: &self.id,
            version: self.version,
            key_id: &self.key_id,
            updated_ms: self.updated_ms,
        }
    }
}

fn fields() -> impl Strategy<Value = Fields> {
    (
        "[A-Za-z]{0,24}",
        "[A-Za-z0-9.-]{0,64}",
        any::<u64>(),
        "\\PC{0,32}",
        any::<i64>(),
    )
        .prop_map(|(resource_type, id, version, key_id, updated_ms)| Fields {
            resource_type,
            id,
            version,
            key_id,
            updated_ms,
        })
}

/// One change to one AAD field; the result always differs from the input.
#[derive(Debug, Clone)]
enum Mutation {
    ResourceType(String),
    Id(String),
    Version(u64),
    KeyId(String),
    UpdatedMs(i64),
    /// Move the last byte of the type into the front of the id (tests the length prefixes).
    ShiftTypeIntoId,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        "\\PC{0,8}".prop_map(Mutation::ResourceType),
        "\\PC{0,8}".prop_map(Mutation::Id),
        any::<u64>().prop_map(Mutation::Version),
        "\\PC{0,8}".prop_map(Mutation::KeyId),
        any::<i64>().prop_map(Mutation::UpdatedMs),
        Just(Mutation::ShiftTypeIntoId),
    ]
}

fn apply(f: &Fields, m: &Mutation) -> Fields {
    let mut g = f.clone();
    match m {
        // Appending keeps the change non-empty.
        Mutation::ResourceType(s) => g.resource_type = format!("{}{s}X", f.resource_type),
        Mutation::Id(s) => g.id = format!("X{s}{}", f.id),
        Mutation::Version(d) => g.version = f.version ^ d.max(&1),
        Mutation::UpdatedMs(d) => g.updated_ms = f.updated_ms ^ d.max(&1),
        Mutation::KeyId(s) => g.key_id = format!("{}{s}\u{e9}", f.key_id),
        Mutation::ShiftTypeIntoId => match g.resource_type.pop() {
            Some(c) => g.id.insert(0, c),
            None => g.resource_type.push('A'),
        },
    }
    g
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn open_seal_round_trips(plain in proptest::collection::vec(any::<u8>(), 0..4096), f in fields()) {
        let k = data_key();
        let sealed = k.seal(&f.aad(), &plain).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let opened = k.open(&f.aad(), &sealed).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(opened, plain);
    }

    #[test]
    fn single_byte_flip_fails(
        plain in proptest::collection::vec(any::<u8>(), 0..2048),
        f in fields(),
        pos in any::<proptest::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let k = data_key();
        let mut sealed = k.seal(&f.aad(), &plain).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let i = pos.index(sealed.len());
        sealed[i] ^= mask;
        prop_assert!(matches!(k.open(&f.aad(), &sealed), Err(CryptoError::Integrity)));
    }

    #[test]
    fn aad_mutation_fails(
        plain in proptest::collection::vec(any::<u8>(), 0..2048),
        f in fields(),
        m in mutation(),
    ) {
        let k = data_key();
        let sealed = k.seal(&f.aad(), &plain).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let g = apply(&f, &m);
        prop_assert!(g.aad() != f.aad());
        prop_assert!(matches!(k.open(&g.aad(), &sealed), Err(CryptoError::Integrity)));
    }

    #[test]
    fn truncation_fails(
        plain in proptest::collection::vec(any::<u8>(), 0..512),
        f in fields(),
        cut in any::<proptest::sample::Index>(),
    ) {
        let k = data_key();
        let sealed = k.seal(&f.aad(), &plain).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let len = cut.index(sealed.len());
        prop_assert!(matches!(k.open(&f.aad(), &sealed[..len]), Err(CryptoError::Integrity)));
    }
}
