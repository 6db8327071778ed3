//! Connections: where the database is, the password (from a file, never from a URL or
//! argv), a small runtime that drives every connection, a bounded pool with each
//! connection's prepared statements, and errors that name no value.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tokio_postgres::config::Host;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use crate::StoreError;

/// Connections a process opens at most for reads (the writer has its own).
pub(super) const MAX_READERS: usize = 16;

/// Where a PostgreSQL database is, as phivault records it: a `postgres://` URL without a
/// password, and where the password is (a file holding it, or a `PGPASSFILE`-format file).
#[derive(Clone)]
pub struct PgTarget {
    url: String,
    config: tokio_postgres::Config,
    password: PasswordSource,
    /// TLS with the server's certificate and name verified (required off loopback).
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Where the database password comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// A file holding the password (its first line).
    File(PathBuf),
    /// A `PGPASSFILE`-format file (`host:port:database:user:password` lines).
    PgPass(PathBuf),
    /// The standard place: the file `PGPASSFILE` names, else `~/.pgpass`; no password if
    /// neither has an entry (a Unix socket with peer authentication, for one).
    Standard,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Parse `url` (`postgres://USER@HOST:PORT/DB[?sslmode=…&sslrootcert=CA.pem]`). A
    /// password in the URL is refused: it would sit in the command line, the shell's
    /// history and the data directory. A host off this machine is reached over TLS only,
    /// verified like libpq's `verify-full` (`tls`); on loopback, when the URL asks. The
    /// password is read from `password_file` (its first line), else from the standard
    /// `PGPASSFILE` (or `~/.pgpass`) entry for the host, port, database and user.
    pub fn parse(url: &str, password: PasswordSource) -> Result<PgTarget, StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::Engine(
                "a database URL starts with postgres://".into(),
            ));
        }
        let (rest, ssl) = take_ssl_options(url)?;
        let config = tokio_postgres::Config::from_str(&rest)
            .map_err(|_| StoreError::Engine("the database URL does not parse".into()))?;
        if config.get_password().is_some() {
            return Err(StoreError::Engine(
                "the database URL holds a password: put it in a file (--database-password-file \
                 or PGPASSFILE), never in a URL or on a command line"
                    .into(),
            ));
        }
        if config.get_user().is_none() {
            return Err(StoreError::Engine(
                "the database URL names no user (postgres://USER@HOST:PORT/DB)".into(),
            ));
        }
        if config.get_dbname().is_none() {
            return Err(StoreError::Engine(
                "the database URL names no database (postgres://USER@HOST:PORT/DB)".into(),
            ));
        }
        // off this machine, only TLS with the certificate and the host name verified;
        // on loopback or a Unix socket, TLS when the URL asks for it
        let remote = config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, Host::Tcp(name) if !is_loopback(name)));
        let wants = match ssl.mode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => remote,
            Some("require" | "verify-ca" | "verify-full") => true,
            Some(_) => {
                return Err(StoreError::Engine(
                    "sslmode is disable, require, verify-ca or verify-full".into(),
                ));
            }
        };
        if remote && ssl.mode.as_deref() == Some("disable") {
            return Err(StoreError::Engine(
                "sslmode=disable to a host off this machine: records never cross a network in clear"
                    .into(),
            ));
        }
        let tls = if wants {
            Some(super::tls::client_config(ssl.root.as_deref())?)
        } else {
            None
        };
        Ok(PgTarget {
            url: url.to_owned(),
            config,
            password,
            tls,
        })
    }

    /// The URL as given (it holds no password).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the password comes from.
    pub fn password_source(&self) -> &PasswordSource {
        &self.password
    }

    /// The connection settings with the password filled in.
    fn resolved(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut c = self.config.clone();
        c.application_name("phivault");
        c.connect_timeout(std::time::Duration::from_secs(10));
        if let Some(pw) = self.password()? {
            c.password(pw);
        }
        Ok(c)
    }

    fn password(&self) -> Result<Option<String>, StoreError> {
        if let PasswordSource::File(p) = &self.password {
            use std::os::unix::fs::PermissionsExt as _;
            // (as libpq treats a password file others can read: not used)
            if let Ok(m) = std::fs::metadata(p)
                && m.permissions().mode() & 0o077 != 0
            {
                return Err(StoreError::Engine(format!(
                    "the database password file {} can be read by others: chmod 600 it",
                    p.display()
                )));
            }
            let text = std::fs::read_to_string(p).map_err(|e| {
                StoreError::Engine(format!(
                    "cannot read the database password file {}: {}",
                    p.display(),
                    e.kind()
                ))
            })?;
            let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
            return Ok(Some(line.to_owned()));
        }
        let file = match (&self.password, std::env::var_os("PGPASSFILE")) {
            (PasswordSource::PgPass(p), _) => p.clone(),
            (_, Some(f)) => PathBuf::from(f),
            (_, None) => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".pgpass"),
                None => return Ok(None),
            },
        };
        let Ok(text) = std::fs::read_to_string(&file) else {
            return Ok(None);
        };
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            _ => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        Ok(pgpass_lookup(
            &text,
            &host,
            port,
            self.config.get_dbname().unwrap_or(""),
            self.config.get_user().unwrap_or(""),
        ))
    }
}

/// The URL's TLS options as libpq spells them (`sslmode`, `sslrootcert`), taken out of it.
struct SslOptions {
    mode: Option<String>,
    root: Option<PathBuf>,
}

fn take_ssl_options(url: &str) -> Result<(String, SslOptions), StoreError> {
    let mut out = SslOptions {
        mode: None,
        root: None,
    };
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), out));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)
            .ok_or_else(|| StoreError::Engine("the database URL's options do not parse".into()))?;
        match k {
            "sslmode" => out.mode = Some(v),
            "sslrootcert" => out.root = Some(PathBuf::from(v)),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, out))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether `host` names this machine's loopback interface.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// The password of the first `PGPASSFILE` line matching (`*` matches anything; `\:` and
/// `\\` are escapes), as libpq reads it.
pub(super) fn pgpass_lookup(
    text: &str,
    host: &str,
    port: u16,
    db: &str,
    user: &str,
) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(ch) = chars.next() {
            match ch {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                _ => cur.push(ch),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let ok = |f: &str, v: &str| f == "*" || f == v;
        if ok(&fields[0], host)
            && ok(&fields[1], &port)
            && ok(&fields[2], db)
            && ok(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

/// Map a driver error to a [`StoreError`]: PostgreSQL's SQLSTATE and message (which name
/// constraints and columns; the values are in the DETAIL, which is left out).
pub(super) fn pg(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        return StoreError::Engine(format!("postgres {}: {}", db.code().code(), db.message()));
    }
    if e.is_closed() {
        return StoreError::Engine("the database connection closed".into());
    }
    // (the driver's own messages: I/O, TLS, protocol, conversion — none carries a value)
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    if msg.len() > 200 {
        msg.truncate(200);
    }
    StoreError::Engine(format!("postgres: {msg}"))
}

/// Run `fut` to completion on this thread. The futures of a [`Client`] only pass messages
/// to its connection, which the store's runtime drives, so a read can wait here from any
/// thread — a blocking pool's or a plain one — as a SQLite read waits on its file.
pub(super) fn block_on<F: Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Thread(std::thread::Thread);
    impl Wake for Thread {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Thread(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Open a connection from inside the store's runtime, which then drives it.
pub(super) async fn open(target: &PgTarget) -> Result<PgConn, StoreError> {
    let mut config = target.resolved()?;
    let client = match &target.tls {
        Some(tls) => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            let (client, connection) = config
                .connect(super::tls::Rustls(tls.clone()))
                .await
                .map_err(pg)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %pg(e), "a database connection ended");
                }
            });
            client
        }
        None => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(pg)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %pg(e), "a database connection ended");
                }
            });
            client
        }
    };
    Ok(PgConn {
        client,
        statements: HashMap::new(),
    })
}

/// One connection and the statements prepared on it.
pub(super) struct PgConn {
    pub(super) client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl PgConn {
    /// The prepared form of `sql` (prepared once per connection).
    pub(super) async fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await.map_err(pg)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    pub(super) async fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let st = self.statement(sql).await?;
        self.client.query(&st, params).await.map_err(pg)
    }

    pub(super) async fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let st = self.statement(sql).await?;
        self.client.query_opt(&st, params).await.map_err(pg)
    }

    pub(super) async fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let st = self.statement(sql).await?;
        self.client.execute(&st, params).await.map_err(pg)
    }

    /// Run statements without parameters (transaction control, DDL).
    pub(super) async fn batch(&self, sql: &str) -> Result<(), StoreError> {
        self.client.batch_execute(sql).await.map_err(pg)
    }
}

/// The runtime that drives every connection of a store, and its pool of read connections.
pub(super) struct Pool {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    target: PgTarget,
    idle: Mutex<Vec<PgConn>>,
    /// Read connections open (idle or in use).
    open: Mutex<usize>,
    freed: Condvar,
}

impl Pool {
    pub(super) fn new(target: PgTarget) -> Result<Arc<Pool>, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("phivault-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Engine(format!("cannot start the database runtime: {e}")))?;
        let handle = runtime.handle().clone();
        Ok(Arc::new(Pool {
            runtime: Mutex::new(Some(runtime)),
            handle,
            target,
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(0),
            freed: Condvar::new(),
        }))
    }

    /// Open a new connection (its I/O runs on the store's runtime).
    pub(super) fn connect(&self) -> Result<PgConn, StoreError> {
        let target = self.target.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(open(&target).await);
        });
        rx.recv()
            .map_err(|_| StoreError::Engine("the database runtime stopped".into()))?
    }

    /// Run `f` with a read connection (at most [`MAX_READERS`] at once; others wait).
    pub(super) fn with<T>(
        &self,
        f: impl AsyncFnOnce(&mut PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.take()?;
        let out = block_on(f(&mut conn));
        // a connection that failed or closed is not kept
        if out.is_ok() && !conn.client.is_closed() {
            self.idle.lock().push(conn);
        } else {
            *self.open.lock() -= 1;
        }
        self.freed.notify_one();
        out
    }

    /// From now on, every read of this pool runs on one connection in one read-only
    /// snapshot (a report reads a head and then the log it signs: both of one moment,
    /// while nodes go on writing).
    pub(super) fn pin_snapshot(&self) -> Result<(), StoreError> {
        let c = self.connect()?;
        block_on(c.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))?;
        *self.open.lock() = MAX_READERS;
        self.idle.lock().push(c);
        Ok(())
    }

    fn take(&self) -> Result<PgConn, StoreError> {
        loop {
            if let Some(c) = self.idle.lock().pop() {
                return Ok(c);
            }
            let mut open = self.open.lock();
            if *open < MAX_READERS {
                *open += 1;
                drop(open);
                return self.connect().inspect_err(|_| *self.open.lock() -= 1);
            }
            self.freed
                .wait_for(&mut open, std::time::Duration::from_millis(50));
        }
    }

    /// Stop the runtime (every connection closes) without waiting on this thread.
    pub(super) fn shut(&self) {
        self.idle.lock().clear();
        if let Some(rt) = self.runtime.lock().take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_lines_match_as_libpq_reads_them() {
        let text = "# comment\nother:5432:*:u:wrong\n127.0.0.1:5433:db:u:p\\:w\\\\d\n*:*:*:*:any\n";
        assert_eq!(
            pgpass_lookup(text, "127.0.0.1", 5433, "db", "u").as_deref(),
            Some("p:w\\d")
        );
        assert_eq!(
            pgpass_lookup(text, "127.0.0.1", 5434, "db", "u").as_deref(),
            Some("any")
        );
        assert_eq!(pgpass_lookup("h:1:d:u", "h", 1, "d", "u"), None);
    }

    #[test]
    fn urls_with_passwords_or_remote_hosts_are_refused() {
        let e = |u: &str| {
            PgTarget::parse(u, PasswordSource::Standard)
                .unwrap_err()
                .to_string()
        };
        assert!(e("postgres://u:secret@127.0.0.1:5432/db").contains("holds a password"));
        assert!(!e("postgres://u:secret@127.0.0.1:5432/db").contains("secret"));
        assert!(
            e("postgres://u@db.example.org:5432/db?sslmode=disable").contains("in clear"),
            "a remote host without TLS"
        );
        assert!(
            e("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent").contains("CA file")
        );
        assert!(e("postgres://u@h/db?sslmode=bogus").contains("sslmode is"));
        assert!(e("postgres://127.0.0.1:5432/db").contains("no user"));
        assert!(e("mysql://u@127.0.0.1/db").contains("postgres://"));
        assert!(
            PgTarget::parse("postgres://u@127.0.0.1:5432/db", PasswordSource::Standard).is_ok()
        );
        assert!(PgTarget::parse("postgres://u@[::1]:5432/db", PasswordSource::Standard).is_ok());
        assert!(PgTarget::parse("postgres://u@localhost/db", PasswordSource::Standard).is_ok());
    }
}
