//! Real PostgreSQL for tests: a fresh database on the cluster that `scripts/test.sh`
//! starts (`PHIVAULT_TEST_PG`: `postgres://USER@127.0.0.1:PORT/postgres`, and
//! `PHIVAULT_TEST_PG_PASSFILE`, a `PGPASSFILE`-format file), or, without it, a cluster of
//! the test's own made with Debian's `initdb` in a temporary directory (as `nobody`, through
//! `setpriv`, when the tests run as root: PostgreSQL refuses to run as root), stopped when dropped.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{PasswordSource, PgTarget};

/// A database made for one test, and the cluster it is on when the test made that too.
pub struct TestDb {
    /// Where the database is.
    pub target: PgTarget,
    /// The administrator's URL of the cluster (database `postgres`).
    pub admin_url: String,
    /// The password file for both.
    pub passfile: PathBuf,
    /// The database's name.
    pub name: String,
    _own: Option<Cluster>,
}

impl TestDb {
    /// A new empty database.
    pub fn new() -> TestDb {
        let (admin_url, passfile, own) = match (
            std::env::var("PHIVAULT_TEST_PG"),
            std::env::var("PHIVAULT_TEST_PG_PASSFILE"),
        ) {
            (Ok(url), Ok(pass)) => (url, PathBuf::from(pass), None),
            _ => {
                let c = Cluster::start();
                (c.admin_url(), c.passfile.clone(), Some(c))
            }
        };
        let name = format!("pv_{}", uuid_like());
        psql(&admin_url, &passfile, &format!("CREATE DATABASE {name}"));
        let url = admin_url.replace("/postgres", &format!("/{name}"));
        let target = PgTarget::parse(&url, PasswordSource::PgPass(passfile.clone()))
            .expect("a test database URL");
        TestDb {
            target,
            admin_url,
            passfile,
            name,
            _own: own,
        }
    }

    /// Run SQL on this database as its owner, as a storage writer would (no phivault in
    /// between); what `psql` printed.
    pub fn sql(&self, sql: &str) -> String {
        psql(self.target.url(), &self.passfile, sql)
    }
}

impl Default for TestDb {
    fn default() -> Self {
        TestDb::new()
    }
}

fn uuid_like() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Run `sql` with `psql` (Debian's client) and return what it printed; panics on failure.
pub fn psql(url: &str, passfile: &Path, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env("PGPASSFILE", passfile)
        .output()
        .expect("psql runs (apt-get install postgresql-client)");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The directory of Debian's PostgreSQL server programs (the newest installed).
pub fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect(
        "PostgreSQL's server is installed (apt-get install postgresql; scripts/test.sh does)",
    )
}

/// A CA (`DIR/ca.pem`) and a server certificate for `names` signed by it, made with
/// Debian's `openssl`; the certificate's and key's paths (the key 0600).
pub fn make_certs(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(st.success(), "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca_args = [
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=phivault test CA",
    ];
    openssl(&[&["req", "-x509", "-days", "2"][..], &ec, &ca_args].concat());
    let csr_args = [
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=db",
    ];
    openssl(&[&["req"][..], &ec, &csr_args].concat());
    let san: Vec<String> = names
        .iter()
        .map(|n| {
            if n.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{n}")
            } else {
                format!("DNS:{n}")
            }
        })
        .collect();
    std::fs::write(
        dir.join("san.ext"),
        format!("subjectAltName={}\n", san.join(",")),
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    use std::os::unix::fs::PermissionsExt as _;
    let key = dir.join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir.join("server.pem"), key)
}

/// Whether this process runs as root (the owner of a file it makes is 0).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    tempfile::tempfile()
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.uid() == 0)
}

/// A cluster of a test's own on 127.0.0.1, SCRAM passwords, stopped when dropped.
pub struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    /// `PGPASSFILE`-format file with the administrator's password.
    pub passfile: PathBuf,
}

impl Cluster {
    /// initdb, then start on a free port.
    pub fn start() -> Cluster {
        Cluster::start_with(None)
    }

    /// [`Cluster::start`] with TLS on: a server certificate for `names` (DNS names and IP
    /// addresses) from a new CA; the CA's PEM file.
    pub fn start_tls(names: &[&str]) -> (Cluster, PathBuf) {
        let c = Cluster::start_with(Some(names));
        let ca = c.dir.path().join("ca.pem");
        (c, ca)
    }

    fn start_with(tls: Option<&[&str]>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let bin = server_bin();
        let root = is_root();
        let password = uuid_like();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, &password).unwrap();
        let ssl = tls.map(|names| make_certs(dir.path(), names));
        if root {
            Command::new("chown")
                .args(["-R", "nobody"])
                .arg(dir.path())
                .status()
                .unwrap();
        }
        let data = dir.path().join("data");
        let as_owner = |prog: &str| -> Command {
            if root {
                let mut c = Command::new("setpriv");
                c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                    .arg(bin.join(prog));
                c
            } else {
                Command::new(bin.join(prog))
            }
        };
        let st = as_owner("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "phivault",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .arg(format!("--pwfile={}", pw.display()))
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "initdb failed");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={} \
             -c max_connections=200 -c fsync=on",
            dir.path().display()
        );
        if let Some((cert, key)) = &ssl {
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
        }
        let st = as_owner("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(dir.path().join("log"))
            .args(["-w", "start"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "pg_ctl start failed");
        let passfile = dir.path().join("pgpass");
        std::fs::write(
            &passfile,
            format!(
                "127.0.0.1:{port}:*:phivault:{password}\nlocalhost:{port}:*:phivault:{password}\n"
            ),
        )
        .unwrap();
        // (libpq ignores a password file others can read)
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
        Cluster {
            dir,
            port,
            passfile,
        }
    }

    /// The administrator's URL.
    pub fn admin_url(&self) -> String {
        format!("postgres://phivault@127.0.0.1:{}/postgres", self.port)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let bin = server_bin();
        let mut c = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(bin.join("pg_ctl"));
            c
        } else {
            Command::new(bin.join("pg_ctl"))
        };
        let _ = c
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
    }
}
