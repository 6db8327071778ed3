//! The control socket of a server of a `shamir` data directory (`DIR/control.sock`, mode
//! 0600, made by the server, removed when it exits): `phivault unseal` sends it shares,
//! `phivault seal` seals it. One request a line, one JSON reply a line:
//!
//! ```text
//! status              → {"state":"sealed","have":1,"need":3,"accepted":true,"message":"…"}
//! share pvs1-…        → the same, after the share was checked (and held, or refused)
//! seal                → {"state":"sealed",…}
//! ```
//!
//! Only the data directory's owner reaches it (the directory is 0700, the socket 0600, and
//! the server checks the peer's uid); the client refuses a socket path that is a symlink,
//! not a socket, or not private to the directory's owner.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::datadir;

/// The socket, relative to the data directory.
pub(crate) const SOCKET: &str = "control.sock";
/// Longest request line.
pub(crate) const MAX_LINE: usize = 1024;

/// The control socket's path in `data_dir`.
pub(crate) fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Connect to the server of `data_dir`, refusing anything but a private socket of the
/// data directory's owner.
fn connect(data_dir: &Path) -> Result<UnixStream> {
    datadir::check_dir_private(data_dir)?;
    let path = socket_path(data_dir);
    let m = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no server of a shamir data directory is running on {} (no {})",
            data_dir.display(),
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if m.file_type().is_symlink() || !m.file_type().is_socket() {
        bail!(
            "refusing {}: it is not a socket (a symlink or a planted file?)",
            path.display()
        );
    }
    let owner = std::fs::metadata(data_dir)?.uid();
    if m.uid() != owner || m.mode() & 0o077 != 0 {
        bail!(
            "refusing {}: it must be owned by the data directory's owner and private to it (mode 0600)",
            path.display()
        );
    }
    let s = UnixStream::connect(&path)
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    Ok(s)
}

/// Send one request line and read the reply.
fn ask(s: &mut UnixStream, request: &[u8]) -> Result<Value> {
    let mut line = Zeroizing::new(Vec::with_capacity(request.len() + 1));
    line.extend_from_slice(request);
    line.push(b'\n');
    s.write_all(&line)
        .context("the server closed the control socket")?;
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while reply.len() < 64 * 1024 {
        if s.read(&mut b)? == 0 {
            bail!("the server closed the control socket without answering");
        }
        if b[0] == b'\n' {
            return serde_json::from_slice(&reply).context("the server's reply is not JSON");
        }
        reply.push(b[0]);
    }
    bail!("the server's reply is too long")
}

fn state_line(r: &Value) -> String {
    match r["state"].as_str() {
        Some("unsealed") => "unsealed".to_owned(),
        _ => format!(
            "sealed: {} of {} shares held",
            r["have"].as_u64().unwrap_or(0),
            r["need"].as_u64().unwrap_or(0)
        ),
    }
}

/// Send one share; say what became of it.
fn send_share(s: &mut UnixStream, text: &str) -> Result<Value> {
    let mut req = Zeroizing::new(Vec::with_capacity(text.len() + 6));
    req.extend_from_slice(b"share ");
    req.extend_from_slice(text.trim().as_bytes());
    let r = ask(s, &req)?;
    if let Some(m) = r["message"].as_str() {
        eprintln!("{m}");
    }
    Ok(r)
}

/// `phivault unseal`: exit 0 unsealed, 1 still sealed, 2 a share was refused.
pub(crate) fn unseal(data_dir: &Path, share_file: Option<&Path>) -> Result<i32> {
    let mut s = connect(data_dir)?;
    let status = ask(&mut s, b"status")?;
    if status["state"] == "unsealed" {
        println!("unsealed (already)");
        return Ok(0);
    }
    let mut refused = false;
    match share_file {
        Some(f) => {
            for text in phivault_keys::shamir::read_share_file(f)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .iter()
            {
                let r = send_share(&mut s, text)?;
                refused |= r["accepted"] != true;
                if r["state"] == "unsealed" {
                    println!("unsealed");
                    return Ok(0);
                }
            }
        }
        None => loop {
            let r = ask(&mut s, b"status")?;
            let prompt = format!(
                "Share ({} of {} held; empty to stop): ",
                r["have"].as_u64().unwrap_or(0),
                r["need"].as_u64().unwrap_or(0)
            );
            let typed =
                phivault_keys::shamir::prompt_share(&prompt).map_err(|e| anyhow::anyhow!("{e}"))?;
            if typed.trim().is_empty() {
                break;
            }
            let r = send_share(&mut s, &typed)?;
            refused |= r["accepted"] != true;
            if r["state"] == "unsealed" {
                println!("unsealed");
                return Ok(0);
            }
        },
    }
    let r = ask(&mut s, b"status")?;
    println!("{}", state_line(&r));
    Ok(if refused { 2 } else { 1 })
}

/// `phivault seal`.
pub(crate) fn seal(data_dir: &Path) -> Result<i32> {
    let mut s = connect(data_dir)?;
    let r = ask(&mut s, b"seal")?;
    if let Some(m) = r["message"].as_str() {
        eprintln!("{m}");
    }
    println!("{}", state_line(&r));
    Ok(0)
}
