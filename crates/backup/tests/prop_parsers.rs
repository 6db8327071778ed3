//! Property tests of what a restore parses from a target it does not trust: any bytes
//! given to the object header, segment, manifest and head parsers are refused or read,
//! never a panic; what the shipper writes reads back unchanged.

use std::collections::BTreeMap;

use phivault_backup::manifest::Manifest;
use phivault_backup::pages::{SegmentHeader, decode_segment, encode_segment};
use phivault_crypto::SigningKey;
use phivault_crypto::backup::ObjectHeader;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_are_refused_or_read_by_every_parser(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = ObjectHeader::parse(&bytes);
        let _ = decode_segment(&bytes);
        let key = SigningKey::from_pkcs8(SigningKey::generate_pkcs8().expect("key").expose()).expect("key");
        prop_assert!(Manifest::verify(&bytes, &key.public_key(), "x").is_err());
        let _ = serde_json::from_slice::<phivault_backup::manifest::Head>(&bytes);
        let _ = serde_json::from_slice::<phivault_backup::manifest::Deployment>(&bytes);
    }

    #[test]
    fn a_compressed_segment_cut_or_flipped_is_refused_or_read_never_a_panic(
        pages in proptest::collection::btree_map(1u32..64, any::<u8>(), 0..12),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let pages: BTreeMap<u32, Vec<u8>> = pages.into_iter().map(|(k, b)| (k, vec![b; 512])).collect();
        let h = SegmentHeader {
            epoch: 1, seq: 2, prev: [3; 32], first_commit: 4, last_commit: 5, time_ms: 6,
            audit_size: 7, resources: 8, page_size: 512, db_pages: 64,
        };
        let enc = encode_segment(&h, &pages).expect("encode");
        let dec = decode_segment(&enc).expect("decode");
        prop_assert_eq!(&dec.header, &h);
        prop_assert_eq!(&dec.pages, &pages);
        let _ = decode_segment(&enc[..cut.index(enc.len())]);
        let mut flipped = enc.clone();
        let i = flip.index(flipped.len());
        flipped[i] ^= 0x5a;
        let _ = decode_segment(&flipped);
    }
}
