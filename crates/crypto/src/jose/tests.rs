use super::*;
use proptest::prelude::*;

const KEY: [u8; 32] = [7u8; 32];
const CTY: &str = "application/smart-health-card";

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

fn unb64(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).expect("base64url")
}

fn parts(compact: &str) -> Vec<String> {
    compact.split('.').map(str::to_owned).collect()
}

/// Flips one bit of the decoded part `i` and re-encodes it.
fn flip(compact: &str, i: usize) -> String {
    let mut p = parts(compact);
    let mut raw = unb64(&p[i]);
    raw[0] ^= 1;
    p[i] = b64(&raw);
    p.join(".")
}

#[test]
fn dir_round_trip_and_shape() {
    let msg = br#"{"resourceType":"Bundle"}"#;
    let jwe = encrypt_dir(&KEY, CTY, msg).expect("encrypt");
    let p = parts(&jwe);
    assert_eq!(p.len(), 5);
    assert_eq!(
        unb64(&p[0]),
        br#"{"alg":"dir","enc":"A256GCM","cty":"application/smart-health-card"}"#
    );
    assert_eq!(p[1], "");
    assert_eq!(unb64(&p[2]).len(), 12);
    assert_eq!(unb64(&p[3]).len(), msg.len());
    assert_eq!(unb64(&p[4]).len(), 16);
    assert!(!jwe.contains('='), "no padding");
    assert_eq!(decrypt_dir(&KEY, &jwe).expect("decrypt"), msg);

    let empty = encrypt_dir(&KEY, CTY, b"").expect("encrypt");
    assert_eq!(decrypt_dir(&KEY, &empty).expect("decrypt"), b"");
    assert_ne!(
        encrypt_dir(&KEY, CTY, msg).expect("encrypt"),
        jwe,
        "fresh IV"
    );
}

#[test]
fn dir_aad_is_the_base64url_header() {
    // Independent check of the AEAD inputs: open by hand with ring.
    let jwe = encrypt_dir(&KEY, CTY, b"hello").expect("encrypt");
    let p = parts(&jwe);
    let key = aead_key(&KEY).expect("key");
    let iv: [u8; 12] = unb64(&p[2]).try_into().expect("iv");
    let mut buf = unb64(&p[3]);
    buf.extend_from_slice(&unb64(&p[4]));
    let pt = key
        .open_in_place(
            Nonce::assume_unique_for_key(iv),
            Aad::from(p[0].as_bytes()),
            &mut buf,
        )
        .expect("open");
    assert_eq!(pt, b"hello");
}

#[test]
fn dir_tampering_fails() {
    let jwe = encrypt_dir(&KEY, CTY, b"some plaintext").expect("encrypt");
    for i in [2, 3, 4] {
        assert!(
            matches!(
                decrypt_dir(&KEY, &flip(&jwe, i)),
                Err(CryptoError::Integrity)
            ),
            "part {i}"
        );
    }
    // A header that still parses and still says dir/A256GCM, but is not the one sealed.
    let mut p = parts(&jwe);
    p[0] = b64(br#"{"alg":"dir","enc":"A256GCM","cty":"text/plain"}"#);
    assert!(matches!(
        decrypt_dir(&KEY, &p.join(".")),
        Err(CryptoError::Integrity)
    ));
    // Same header JSON with other whitespace: the AAD is the base64url, so it fails.
    p[0] = b64(br#"{"alg":"dir", "enc":"A256GCM","cty":"application/smart-health-card"}"#);
    assert!(matches!(
        decrypt_dir(&KEY, &p.join(".")),
        Err(CryptoError::Integrity)
    ));
    // Truncated ciphertext, dropped tag, a non-empty key part, wrong part counts,
    // padding, non-canonical base64url.
    let p = parts(&jwe);
    let bad = [
        format!("{}..{}.{}.{}", p[0], p[2], &p[3][..p[3].len() - 2], p[4]),
        format!("{}..{}.{}.", p[0], p[2], p[3]),
        format!("{}.{}.{}.{}.{}", p[0], b64(&[0u8; 32]), p[2], p[3], p[4]),
        format!("{}..{}.{}", p[0], p[2], p[3]),
        format!("{jwe}."),
        format!("{}..{}=.{}.{}", p[0], p[2], p[3], p[4]),
        format!("{}..{}.{}.{}", p[0], b64(&[0u8; 16]), p[3], p[4]),
        jwe.replace('.', "+"),
        String::new(),
    ];
    for (n, b) in bad.iter().enumerate() {
        assert!(
            matches!(decrypt_dir(&KEY, b), Err(CryptoError::Integrity)),
            "case {n}"
        );
    }
}

#[test]
fn dir_wrong_key_fails() {
    let jwe = encrypt_dir(&KEY, CTY, b"x").expect("encrypt");
    let mut other = KEY;
    other[31] ^= 0x80;
    assert!(matches!(
        decrypt_dir(&other, &jwe),
        Err(CryptoError::Integrity)
    ));
}

/// A correctly sealed JWE with an arbitrary header, to show that refusals come from the
/// header check and not from authentication.
fn sealed_with_header(header: &str) -> String {
    seal_compact(&KEY, header, b"payload").expect("seal")
}

#[test]
fn dir_refuses_other_headers() {
    let refused = [
        r#"{"alg":"dir","enc":"A256GCM","zip":"DEF"}"#,
        r#"{"alg":"dir","enc":"A256GCM","crit":["exp"],"exp":1}"#,
        r#"{"alg":"A256KW","enc":"A256GCM"}"#,
        r#"{"alg":"ECDH-ES","enc":"A256GCM"}"#,
        r#"{"alg":"none","enc":"A256GCM"}"#,
        r#"{"alg":"dir","enc":"A128GCM"}"#,
        r#"{"alg":"dir","enc":"A256CBC-HS512"}"#,
        r#"{"alg":"DIR","enc":"A256GCM"}"#,
        r#"{"alg":"dir"}"#,
        r#"{"enc":"A256GCM"}"#,
        r#"{"alg":["dir"],"enc":"A256GCM"}"#,
    ];
    for h in refused {
        assert!(
            matches!(
                decrypt_dir(&KEY, &sealed_with_header(h)),
                Err(CryptoError::InvalidArgument(_))
            ),
            "{h}"
        );
    }
    let malformed = [
        r#"{"alg":"dir","enc":"A256GCM","alg":"dir"}"#,
        r#"{"alg":"dir","enc":"A256GCM",}"#,
        r#"["alg","dir"]"#,
        r#"{"alg":"dir","enc":"A256GCM"} x"#,
        "{\"alg\":\"dir\",\"enc\":\"A256GCM\",\"cty\":\"a\u{1}\"}",
        r#"{"alg":"dir","enc":"A256GCM","x":01}"#,
        r#"{"alg":"dir","enc":"A256GCM","x":"\ud800"}"#,
    ];
    for h in malformed {
        assert!(
            matches!(
                decrypt_dir(&KEY, &sealed_with_header(h)),
                Err(CryptoError::Integrity)
            ),
            "{h}"
        );
    }
    // Members that are not understood are ignored (RFC 7516 §4), escapes are decoded.
    let accepted = [
        r#" { "alg" : "dir" , "enc" : "A256GCM" } "#,
        r#"{"enc":"A256GCM","alg":"dir","typ":"JWE","kid":"k1","x":[1,-2.5e3,true,null,{}]}"#,
        r#"{"alg":"\u0064ir","enc":"A256GCM","cty":"a\/b \ud83d\ude00"}"#,
    ];
    for h in accepted {
        assert_eq!(
            decrypt_dir(&KEY, &sealed_with_header(h)).expect(h),
            b"payload"
        );
    }
}

#[test]
fn cty_is_validated() {
    for cty in [
        "",
        "a\"b",
        "a\\b",
        "a\nb",
        "é",
        &"a".repeat(MAX_CTY_LEN + 1),
    ] {
        assert!(
            matches!(
                encrypt_dir(&KEY, cty, b"x"),
                Err(CryptoError::InvalidArgument(_))
            ),
            "{cty:?}"
        );
    }
    let jwe = encrypt_dir(&KEY, "application/fhir+json; fhirVersion=4.0", b"x").expect("ok");
    assert_eq!(decrypt_dir(&KEY, &jwe).expect("decrypt"), b"x");
}

#[test]
fn concat_kdf_rfc7518_appendix_c() {
    // RFC 7518 Appendix C: ECDH-ES with A128GCM, apu "Alice", apv "Bob".
    let z: [u8; 32] = [
        158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49, 110,
        163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
    ];
    let k = concat_kdf::<16>(&z, b"A128GCM", b"Alice", b"Bob");
    assert_eq!(b64(&k[..]), "VqqN6vgjbSBcIijNcacQGg");
}

#[test]
fn concat_kdf_multi_block_prefix() {
    let z = [1u8; 48];
    let long = concat_kdf::<64>(&z, b"X", b"", b"");
    let short = concat_kdf::<32>(&z, b"X", b"", b"");
    // keydatalen is part of OtherInfo, so a longer output is not an extension.
    assert_ne!(long[..32], short[..]);
    assert_ne!(long[..32], long[32..]);
}

/// The recipient's side, as a third-party library does it: ECDH with the header's
/// `epk`, the same KDF, AES-GCM open.
fn decrypt_ecdh_es_for_test(
    recipient: EphemeralPrivateKey,
    compact: &str,
) -> Result<Vec<u8>, CryptoError> {
    let jwe = Compact::parse(compact).expect("parse");
    assert!(jwe.encrypted_key.is_empty());
    let get = |members: &[(String, Json)], name: &str| -> String {
        match members.iter().find(|(n, _)| n == name) {
            Some((_, Json::Str(s))) => s.clone(),
            other => panic!("{name}: {other:?}"),
        }
    };
    assert_eq!(get(&jwe.header, "alg"), "ECDH-ES");
    assert_eq!(get(&jwe.header, "enc"), "A256GCM");
    let Some((_, Json::Obj(epk))) = jwe.header.iter().find(|(n, _)| n == "epk") else {
        panic!("epk");
    };
    assert_eq!(get(epk, "kty"), "EC");
    let key = EncryptionKey::from_jwk_parts(&get(epk, "crv"), &get(epk, "x"), &get(epk, "y"), None)
        .expect("epk is a valid key");
    let cek = agreement::agree_ephemeral(
        recipient,
        &UnparsedPublicKey::new(key.curve.agreement(), &key.point),
        |z| concat_kdf::<32>(z, b"A256GCM", b"", b""),
    )
    .expect("agree");
    jwe.open(&cek)
}

fn recipient(alg: &'static agreement::Algorithm) -> (EphemeralPrivateKey, String, String) {
    let private = EphemeralPrivateKey::generate(alg, &SystemRandom::new()).expect("rng");
    let public = private.compute_public_key().expect("public");
    let p = public.as_ref();
    let n = (p.len() - 1) / 2;
    (private, b64(&p[1..1 + n]), b64(&p[1 + n..]))
}

#[test]
fn ecdh_es_round_trip_both_curves() {
    for (crv, alg) in [
        ("P-256", &agreement::ECDH_P256),
        ("P-384", &agreement::ECDH_P384),
    ] {
        let (private, x, y) = recipient(alg);
        let to = EncryptionKey::from_jwk_parts(crv, &x, &y, Some("key-1")).expect("jwk");
        assert_eq!(to.curve(), crv);
        assert_eq!(to.kid(), Some("key-1"));
        let msg = b"bulk export ndjson\n".repeat(100);
        let jwe = encrypt_ecdh_es(&to, "application/fhir+ndjson", &msg).expect("encrypt");
        let header = String::from_utf8(unb64(&parts(&jwe)[0])).expect("utf-8");
        let prefix = format!(
            r#"{{"alg":"ECDH-ES","enc":"A256GCM","cty":"application/fhir+ndjson","kid":"key-1","epk":{{"kty":"EC","crv":"{crv}","x":""#
        );
        assert!(header.starts_with(&prefix), "{header}");
        assert_eq!(parts(&jwe)[1], "");
        assert_eq!(decrypt_ecdh_es_for_test(private, &jwe).expect("open"), msg);
        // Not a dir JWE.
        assert!(matches!(
            decrypt_dir(&KEY, &jwe),
            Err(CryptoError::InvalidArgument(_))
        ));
    }
    // Without kid, the member is absent.
    let (private, x, y) = recipient(&agreement::ECDH_P256);
    let to = EncryptionKey::from_jwk_parts("P-256", &x, &y, None).expect("jwk");
    let jwe = encrypt_ecdh_es(&to, CTY, b"hi").expect("encrypt");
    let header = String::from_utf8(unb64(&parts(&jwe)[0])).expect("utf-8");
    assert!(!header.contains("kid"), "{header}");
    assert_eq!(
        decrypt_ecdh_es_for_test(private, &jwe).expect("open"),
        b"hi"
    );
}

#[test]
fn ecdh_es_to_another_key_does_not_open() {
    let (_, x, y) = recipient(&agreement::ECDH_P256);
    let (other, _, _) = recipient(&agreement::ECDH_P256);
    let to = EncryptionKey::from_jwk_parts("P-256", &x, &y, None).expect("jwk");
    let jwe = encrypt_ecdh_es(&to, CTY, b"hi").expect("encrypt");
    assert!(matches!(
        decrypt_ecdh_es_for_test(other, &jwe),
        Err(CryptoError::Integrity)
    ));
}

#[test]
fn invalid_jwk_parts_refused() {
    let (_, x, y) = recipient(&agreement::ECDH_P256);
    let (_, x384, y384) = recipient(&agreement::ECDH_P384);
    let mut y_off = unb64(&y);
    y_off[31] ^= 1;
    let y_off = b64(&y_off);
    let cases: Vec<(&str, String, String, Option<&str>)> = vec![
        ("P-521", x.clone(), y.clone(), None),
        ("secp256k1", x.clone(), y.clone(), None),
        ("p-256", x.clone(), y.clone(), None),
        ("P-256", x384.clone(), y384.clone(), None),
        ("P-384", x.clone(), y.clone(), None),
        ("P-256", x[1..].to_owned(), y.clone(), None),
        ("P-256", b64(&[0u8; 31]), y.clone(), None),
        ("P-256", format!("{x}="), y.clone(), None),
        ("P-256", x.replace(|_c: char| true, "/"), y.clone(), None),
        ("P-256", x.clone(), y_off, None),
        ("P-256", b64(&[0u8; 32]), b64(&[0u8; 32]), None),
        ("P-256", b64(&[0xffu8; 32]), b64(&[0xffu8; 32]), None),
        ("P-256", x.clone(), y.clone(), Some("")),
        ("P-256", x.clone(), y.clone(), Some("a b")),
        ("P-256", x.clone(), y.clone(), Some("a\"b")),
    ];
    for (n, (crv, x, y, kid)) in cases.iter().enumerate() {
        assert!(
            matches!(
                EncryptionKey::from_jwk_parts(crv, x, y, *kid),
                Err(CryptoError::InvalidKey(_))
            ),
            "case {n}"
        );
    }
    let long_kid = "k".repeat(MAX_KID_LEN + 1);
    assert!(EncryptionKey::from_jwk_parts("P-256", &x, &y, Some(&long_kid)).is_err());
    let ok_kid = "Az09._~-".repeat(16);
    let key = EncryptionKey::from_jwk_parts("P-256", &x, &y, Some(&ok_kid)).expect("ok");
    assert_eq!(
        format!("{key:?}"),
        format!("EncryptionKey {{ crv: \"P-256\", kid: Some(\"{ok_kid}\"), .. }}")
    );
    assert!(EncryptionKey::from_jwk_parts("P-384", &x384, &y384, None).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn dir_round_trips(key in any::<[u8; 32]>(), msg in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let jwe = encrypt_dir(&key, CTY, &msg).expect("encrypt");
        prop_assert_eq!(decrypt_dir(&key, &jwe).expect("decrypt"), msg);
    }

    #[test]
    fn header_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse_json_object(&bytes);
    }
}
