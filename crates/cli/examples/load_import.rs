//! Import load generator: POSTs transaction Bundles (e.g. from `phivault synth`) to a running
//! server with N concurrent clients and reports resources/s and latency.
//!
//! cargo run --release -p phivault --example load_import -- ORIGIN CA_PEM CREDS_JSON BUNDLE_DIR [CONCURRENCY]
//! Prints one JSON line with the figures; also prints an access token to TOKEN_OUT if set.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: load_import ORIGIN CA_PEM CREDS_JSON BUNDLE_DIR [CONCURRENCY]");
        std::process::exit(2);
    }
    let origin = args[1].trim_end_matches('/').to_owned();
    let ca = std::fs::read(&args[2]).expect("read CA");
    let creds: Value =
        serde_json::from_slice(&std::fs::read(&args[3]).expect("read creds")).expect("creds json");
    let dir = std::path::PathBuf::from(&args[4]);
    let concurrency: usize = args.get(5).and_then(|c| c.parse().ok()).unwrap_or(8);

    let agent = agent(&ca);
    let token = token(&agent, &origin, &creds);
    if let Ok(p) = std::env::var("TOKEN_OUT") {
        std::fs::write(p, &token).expect("write token");
    }
    if args[4] == "-" {
        return; // token only
    }
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("bundle dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let bodies: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).expect("read bundle"))
        .collect();
    let json_bytes: usize = bodies.iter().map(Vec::len).sum();
    let resources: usize = bodies
        .iter()
        .map(|b| {
            serde_json::from_slice::<Value>(b)
                .ok()
                .and_then(|v| v["entry"].as_array().map(Vec::len))
                .unwrap_or(0)
        })
        .sum();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..concurrency)
        .map(|_| {
            let (bodies, next, agent, token, url) = (
                bodies.clone(),
                next.clone(),
                agent.clone(),
                token.clone(),
                format!("{origin}/fhir"),
            );
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let t = Instant::now();
                    let mut r = agent
                        .post(&url)
                        .header("Authorization", &format!("Bearer {token}"))
                        .header("Content-Type", "application/fhir+json")
                        .send(&body[..])
                        .expect("POST bundle");
                    let status = r.status().as_u16();
                    let _ = r.body_mut().read_to_vec();
                    assert_eq!(status, 200, "bundle {i} failed with {status}");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "{}",
        json!({
            "bundles": bodies.len(), "resources": resources, "json_bytes": json_bytes,
            "seconds": elapsed, "resources_per_s": resources as f64 / elapsed,
            "bundles_per_s": bodies.len() as f64 / elapsed,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "concurrency": concurrency,
        })
    );
}

fn agent(ca: &[u8]) -> ureq::Agent {
    let cert = ureq::tls::Certificate::from_pem(ca).expect("CA pem");
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert])))
        .build();
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .build(),
    )
}

fn token(agent: &ureq::Agent, origin: &str, creds: &Value) -> String {
    let client_id = creds["client_id"].as_str().expect("client_id");
    let key =
        phivault_auth::PrivateJwk::from_json_str(&creds["private_jwk"].to_string()).expect("jwk");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let token_url = format!("{origin}/auth/token");
    // (behind one public URL, several nodes expect it as the assertion's audience)
    let aud = std::env::var("TOKEN_AUD").unwrap_or_else(|_| token_url.clone());
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti).expect("rng");
    let jti: String = jti.iter().map(|b| format!("{b:02x}")).collect();
    let assertion = key
        .sign_jws(&json!({"iss": client_id, "sub": client_id, "aud": aud, "exp": now + 240, "iat": now, "jti": jti}))
        .expect("sign");
    let mut r = agent
        .post(&token_url)
        .send_form([
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
            ("scope", "system/*.cruds"),
        ])
        .expect("token request");
    let v: Value = serde_json::from_slice(&r.body_mut().read_to_vec().expect("token body"))
        .expect("token json");
    v["access_token"].as_str().expect("access_token").to_owned()
}
