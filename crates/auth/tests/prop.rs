//! Property tests: parsers of untrusted input never panic; scopes round-trip.

use phivault_auth::{
    AccessTokenIssuer, Context, Interaction, Jws, ReplayCache, ScopeSet, generate_ed25519_pkcs8,
    generate_es384_jwk, verify_client_assertion,
};
use proptest::prelude::*;

const NOW: u64 = 1_750_000_000;

fn scope_token() -> impl Strategy<Value = String> {
    let ctx = prop_oneof![Just("patient"), Just("user"), Just("system")];
    let res = prop_oneof![Just("*".to_owned()), "[A-Z][A-Za-z]{0,8}"];
    let perms = prop_oneof![
        "c?r?u?d?s?".prop_filter("non-empty", |s| !s.is_empty()),
        Just("read".to_owned()),
        Just("write".to_owned()),
        Just("*".to_owned()),
    ];
    let query = prop::option::of(prop::collection::vec(
        ("[a-z_]{1,6}", "[A-Za-z0-9|:/.]{1,8}"),
        1..3,
    ));
    let resource = (ctx, res, perms, query).prop_map(|(c, r, p, q)| {
        let mut s = format!("{c}/{r}.{p}");
        if let Some(q) = q {
            let qs: Vec<String> = q.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push('?');
            s.push_str(&qs.join("&"));
        }
        s
    });
    prop_oneof![
        4 => resource,
        1 => prop_oneof![Just("openid".to_owned()), Just("fhirUser".to_owned()), Just("launch/patient".to_owned()), Just("offline_access".to_owned())],
    ]
}

fn scope_string() -> impl Strategy<Value = String> {
    prop::collection::vec(scope_token(), 0..6).prop_map(|v| v.join(" "))
}

fn interaction() -> impl Strategy<Value = Interaction> {
    prop::sample::select(Interaction::ALL.to_vec())
}

proptest! {
    #[test]
    fn scope_round_trip(s in scope_string()) {
        let parsed = ScopeSet::parse(&s).expect("generated scopes are valid");
        let again = ScopeSet::parse(&parsed.to_string()).expect("canonical form parses");
        prop_assert_eq!(&again, &parsed);
        prop_assert_eq!(again.to_string(), parsed.to_string());
    }

    #[test]
    fn intersect_is_meet(a in scope_string(), b in scope_string(), ty in "[A-Z][a-z]{0,3}", i in interaction()) {
        let a = ScopeSet::parse(&a).expect("a");
        let b = ScopeSet::parse(&b).expect("b");
        let m = a.intersect(&b);
        for ctx in [Context::Patient, Context::User, Context::System] {
            prop_assert_eq!(m.allows(ctx, &ty, i), a.allows(ctx, &ty, i) && b.allows(ctx, &ty, i));
        }
        prop_assert_eq!(m.to_string(), b.intersect(&a).to_string());
        prop_assert_eq!(ScopeSet::parse(&m.to_string()).expect("meet parses"), m);
    }

    #[test]
    fn scope_parse_never_panics(s in ".{0,300}") {
        let _ = ScopeSet::parse(&s);
    }

    #[test]
    fn scope_parse_never_panics_near_grammar(s in "[a-z/A-Z*.?=&| cruds]{0,80}") {
        if let Ok(v) = ScopeSet::parse(&s) {
            prop_assert_eq!(ScopeSet::parse(&v.to_string()).expect("reparse"), v);
        }
    }

    #[test]
    fn jws_parse_never_panics(s in ".{0,600}") {
        let _ = Jws::parse(&s);
    }

    #[test]
    fn jws_parse_never_panics_b64ish(a in "[A-Za-z0-9_-]{0,200}", b in "[A-Za-z0-9_-]{0,200}", c in "[A-Za-z0-9_=.-]{0,200}") {
        let _ = Jws::parse(&format!("{a}.{b}.{c}"));
        let _ = Jws::parse(&format!("eyJhbGciOiJFUzM4NCJ9.{b}.{c}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn verifiers_never_panic(s in ".{0,400}", mutate in 0usize..400, byte in any::<u8>()) {
        let pk = generate_ed25519_pkcs8().expect("key");
        let issuer = AccessTokenIssuer::from_pkcs8(&pk, "https://a/auth".into(), "https://a/fhir".into(), "k".into()).expect("issuer");
        let verifier = issuer.verifier();
        prop_assert!(verifier.verify(&s, NOW).is_err());

        // bit-flip a real token: never panics, never verifies unless unchanged
        let token = issuer.issue("c", &ScopeSet::parse("system/*.rs").expect("s"), NOW).expect("t").into_token();
        let mut bytes = token.clone().into_bytes();
        let idx = mutate % bytes.len();
        bytes[idx] ^= byte;
        if let Ok(t) = String::from_utf8(bytes) {
            let r = verifier.verify(&t, NOW);
            if t != token {
                prop_assert!(r.is_err());
            }
        }

        let (_, pubk) = generate_es384_jwk("k").expect("es");
        let rec = phivault_auth::ClientRecord {
            client_id: "c".into(),
            name: "n".into(),
            jwks: vec![pubk],
            scopes: ScopeSet::parse("system/*.rs").expect("s"),
            disabled: false,
            export_key: None,
        };
        let lookup = |id: &str| (id == "c").then(|| rec.clone());
        let replay = ReplayCache::new(16);
        prop_assert!(verify_client_assertion(&s, None, &lookup, "https://a/token", NOW, &replay).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// DPoP proofs come from anyone: random text and bit-flipped real proofs never panic,
    /// and a changed proof never verifies (a flip in base64url padding bits aside, which
    /// decodes to the same bytes).
    #[test]
    fn dpop_proofs_never_panic_and_altered_ones_fail(s in ".{0,600}", mutate in 0usize..2000, byte in 1u8..) {
        use phivault_auth::dpop::{ProofKey, verify_proof};
        let url = "https://a.example/fhir/Patient/1";
        prop_assert!(verify_proof(&s, "GET", url, NOW, Some("t")).is_err());
        let key = ProofKey::generate().expect("key");
        let proof = key.proof("GET", url, NOW, Some("t")).expect("proof");
        prop_assert!(verify_proof(&proof, "GET", url, NOW, Some("t")).is_ok());
        let mut bytes = proof.clone().into_bytes();
        let idx = mutate % bytes.len();
        bytes[idx] ^= byte;
        if let Ok(t) = String::from_utf8(bytes)
            && let Ok(p) = verify_proof(&t, "GET", url, NOW, Some("t"))
        {
            // only an equivalent encoding of the same proof can pass
            prop_assert_eq!(p.jkt, key.thumbprint());
        }
    }
}
