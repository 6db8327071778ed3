//! The `shamir` key provider through the real binary: `init` splits the master key into
//! 5 shares (threshold 3) printed once; `serve` starts sealed (metadata and health only,
//! 503 OperationOutcome to the rest); `unseal` refuses mistyped, foreign, duplicate and
//! wrong shares, unseals with 3 good ones; `seal` drops everything again, and the server's
//! memory then holds the master key's 32 bytes nowhere.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

/// `init --key-provider shamir --shares 5 --threshold 3` in `tmp/name`; its shares.
fn init_shamir(tmp: &Path, name: &str) -> (PathBuf, Vec<String>) {
    let data = tmp.join(name);
    let mut c = Command::new(BIN);
    c.args(["init", "--data-dir"]).arg(&data).args([
        "--key-provider",
        "shamir",
        "--shares",
        "5",
        "--threshold",
        "3",
    ]);
    key_home(&mut c, &data);
    let o = c.output().expect("init");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "init: {err}");
    let out = String::from_utf8(o.stdout).expect("utf-8");
    let shares: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("pvs1-"))
        .map(str::to_owned)
        .collect();
    assert_eq!(shares.len(), 5, "{out}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("keys/provider.json")).expect("cfg"))
            .expect("json");
    assert_eq!(cfg["provider"], "shamir");
    assert_eq!(
        (cfg["shares"].as_u64(), cfg["threshold"].as_u64()),
        (Some(5), Some(3))
    );
    (data, shares)
}

/// A 0600 file of shares, one a line.
fn share_file(dir: &Path, name: &str, shares: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    phivault_crypto::write_private_file(&p, format!("{}\n", shares.join("\n")).as_bytes())
        .expect("share file");
    p
}

/// `phivault unseal --share-file F`: exit code and everything it said.
fn unseal(data: &Path, file: &Path) -> (i32, String) {
    let o = Command::new(BIN)
        .args(["unseal", "--data-dir"])
        .arg(data)
        .arg("--share-file")
        .arg(file)
        .output()
        .expect("unseal");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), said)
}

fn health(s: &Server) -> String {
    let r = s.send("GET", &format!("{}/health", s.origin), None, None, &[]);
    assert_eq!(r.status, 200);
    r.json()["status"].as_str().unwrap_or("").to_owned()
}

/// The share `text` with one byte of its body changed and its checksum made right again:
/// a well-formed share that combines to a wrong key.
fn forged(text: &str) -> String {
    let parts: Vec<&str> = text.split('-').collect();
    let index: u8 = parts[1].parse().expect("index");
    let mut body: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&parts[3][2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    body[7] ^= 0x5a;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"phivault-share-v1");
    ctx.update(&[index]);
    ctx.update(parts[2].as_bytes());
    ctx.update(&body);
    let sum = ctx.finish();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "pvs1-{index}-{}-{}-{}",
        parts[2],
        hex(&body),
        hex(&sum.as_ref()[..4])
    )
}

/// The master key rebuilt from three printed shares, checked against the database's key
/// check value (so the memory test looks for the right bytes).
fn master_key(data: &Path, shares: &[String]) -> [u8; 32] {
    let parsed: Vec<_> = shares[..3]
        .iter()
        .map(|s| phivault_keys::shamir::parse(s).expect("share"))
        .collect();
    let master = phivault_keys::shamir::combine(&parsed).expect("combine");
    let conn = rusqlite::Connection::open_with_flags(
        data.join("phivault.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("db");
    let kcv: Vec<u8> = conn
        .query_row("SELECT v FROM meta WHERE k = 'key_check_value'", [], |r| {
            r.get(0)
        })
        .expect("kcv");
    assert!(phivault_crypto::KeyHierarchy::new(&master).verify_key_check_value(&kcv));
    *master.expose_to_provider()
}

/// Whether any readable mapping of process `pid` holds `needle` (through
/// /proc/PID/maps and /proc/PID/mem; the test runs as the server's user).
fn memory_holds(pid: u32, needle: &[u8]) -> bool {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut scanned = 0u64;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').expect("range");
        let (a, b) = (
            u64::from_str_radix(a, 16).expect("hex"),
            u64::from_str_radix(b, 16).expect("hex"),
        );
        let mut buf = vec![0u8; usize::try_from(b - a).expect("size")];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        scanned += b - a;
        if contains(&buf, needle) {
            return true;
        }
    }
    assert!(
        scanned > 1 << 20,
        "the scan read almost nothing ({scanned} bytes)"
    );
    false
}

/// The server on `data`, sealed: metadata answers, health says sealed, a read 503s.
fn start_sealed(tmp: &Path, data: &Path) -> Server {
    let (child, origin, stderr) = launch(data);
    let agent = agent_for(&std::fs::read(data.join("tls/ca.pem")).expect("ca"));
    let s = Server {
        child: Some(child),
        tmp: tempfile::tempdir_in(tmp).expect("tmp"),
        data: data.to_path_buf(),
        base: format!("{origin}/fhir"),
        origin,
        stderr,
        agent,
    };
    let meta = s.send("GET", &format!("{}/metadata", s.base), None, None, &[]);
    assert_eq!(meta.status, 200);
    assert_eq!(meta.json()["resourceType"], "CapabilityStatement");
    assert_eq!(health(&s), "sealed");
    assert_sealed(&s);
    s
}

fn assert_sealed(s: &Server) {
    let fake = "eyJhbGciOiJFZERTQSIsInR5cCI6ImF0K2p3dCJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    for path in ["Patient/abc", "Patient?name=x"] {
        let r = s.get(path, fake);
        assert_eq!(r.status, 503, "{path}");
        assert!(r.is_outcome());
        assert!(String::from_utf8_lossy(&r.body).contains("sealed"));
    }
    let t = s.token_request("x.y.z", "system/*.rs");
    assert_eq!(t.status, 503, "the token endpoint is closed too");
    assert!(!s.data.join("control.sock").is_symlink());
}

/// Mistyped, foreign, duplicate and wrong shares are refused; two good ones keep it sealed.
fn refusals(s: &Server, dir: &Path, shares: &[String], foreign: &str) {
    let two = share_file(dir, "two", &[&shares[0], &shares[1]]);
    let (code, said) = unseal(&s.data, &two);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("2 of 3"), "{said}");
    assert_eq!(health(s), "sealed");
    let mut typo = shares[2].clone().into_bytes();
    typo[20] = if typo[20] == b'0' { b'1' } else { b'0' };
    let typo = String::from_utf8(typo).expect("ascii");
    let (code, said) = unseal(&s.data, &share_file(dir, "typo", &[&typo]));
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("mistyped"), "{said}");
    let (code, said) = unseal(&s.data, &share_file(dir, "foreign", &[foreign]));
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("another data directory"), "{said}");
    let (code, said) = unseal(&s.data, &share_file(dir, "dup", &[&shares[1]]));
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("already held"), "{said}");
    // a well-formed share that does not belong: refused at the key check, none named
    let (code, said) = unseal(&s.data, &share_file(dir, "forged", &[&forged(&shares[3])]));
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("do not combine"), "{said}");
    assert!(
        !said.contains("share 4"),
        "the wrong share is not named: {said}"
    );
    assert!(
        said.contains("0 of 3"),
        "pending shares were discarded: {said}"
    );
    assert_eq!(health(s), "sealed");
    assert_sealed(s);
}

#[test]
fn a_shamir_server_starts_sealed_unseals_with_three_shares_and_seals_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (data, shares) = init_shamir(tmp.path(), "data");
    let (_, foreign) = init_shamir(tmp.path(), "other");
    let master = master_key(&data, &shares);
    let s = start_sealed(tmp.path(), &data);
    refusals(&s, tmp.path(), &shares, &foreign[0]);

    let good = share_file(tmp.path(), "good", &[&shares[4], &shares[0], &shares[2]]);
    let (code, said) = unseal(&s.data, &good);
    assert_eq!(code, 0, "{said}");
    assert_eq!(health(&s), "unsealed");
    // an offline command takes the shares from --share-file
    let out = tmp.path().join("creds.json");
    let o = Command::new(BIN)
        .arg("--share-file")
        .arg(&good)
        .args(["client", "add", "--data-dir"])
        .arg(&data)
        .args([
            "--name",
            "shamir test",
            "--scope",
            "system/*.cruds",
            "--token-url",
        ])
        .arg(s.token_url())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("client add");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("creds")).expect("json");
    let creds = Creds {
        client_id: v["client_id"].as_str().expect("id").to_owned(),
        private_jwk: v["private_jwk"].to_string(),
    };
    let token = s.token_for(&creds, "system/*.cruds");
    let created = s.post("Patient", &token, &patient());
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let id = created.json()["id"].as_str().expect("id").to_owned();
    assert_eq!(s.get(&format!("Patient/{id}"), &token).status, 200);

    sealed_again(&s, &master, &token);

    let (code, said) = unseal(&s.data, &good);
    assert_eq!(code, 0, "{said}");
    let back = s.get(&format!("Patient/{id}"), &token);
    assert_eq!(back.status, 200);
    assert_eq!(
        back.json()["name"],
        json!([{"family": "Quixotewright", "given": ["Anastasia"]}])
    );

    // a whole copy of the data directory opens nothing: no PHI, no spelling of the key in
    // any file, and a server on the copy stays sealed (nothing there rebuilds the key)
    let mut s = s;
    s.stop();
    let copy = tmp.path().join("copy");
    let o = Command::new("cp")
        .arg("-a")
        .arg(&data)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(o.success());
    let _ = std::fs::remove_file(copy.join("control.sock"));
    for f in files_under(&copy) {
        let bytes = std::fs::read(&f).expect("read");
        for phi in [&b"Quixotewright"[..], b"Anastasia"] {
            assert!(!contains(&bytes, phi), "PHI in {}", f.display());
        }
        for sp in key_spellings(&master) {
            assert!(!contains(&bytes, &sp), "the master key in {}", f.display());
        }
    }
    let thief = start_sealed(tmp.path(), &copy);
    assert_eq!(health(&thief), "sealed");
    assert_sealed(&thief);
}

/// `phivault seal`: 503 again, and the master key is nowhere in the server's memory.
fn sealed_again(s: &Server, master: &[u8; 32], token: &str) {
    let o = Command::new(BIN)
        .args(["seal", "--data-dir"])
        .arg(&s.data)
        .output()
        .expect("seal");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("are gone"));
    assert_eq!(health(s), "sealed");
    let r = s.get("Patient?_count=1", token);
    assert_eq!(r.status, 503);
    assert!(r.is_outcome());
    // the scan itself works: the origin the server printed is in its memory
    assert!(memory_holds(s.pid(), s.origin.as_bytes()));
    assert!(
        !memory_holds(s.pid(), master),
        "the master key's bytes survive in the sealed server's memory"
    );
}

#[test]
fn init_refuses_impossible_splits() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (n, k) in [("5", "1"), ("3", "4"), ("17", "3"), ("1", "1")] {
        let o = Command::new(BIN)
            .args(["init", "--data-dir"])
            .arg(tmp.path().join(format!("d{n}{k}")))
            .args(["--key-provider", "shamir", "--shares", n, "--threshold", k])
            .output()
            .expect("init");
        assert!(!o.status.success(), "{n} {k}");
        assert!(!tmp.path().join(format!("d{n}{k}")).exists());
    }
    let o = Command::new(BIN)
        .args(["init", "--data-dir"])
        .arg(tmp.path().join("x"))
        .args(["--shares", "3", "--threshold", "2"])
        .output()
        .expect("init");
    assert!(!o.status.success(), "--shares is for the shamir provider");
}
