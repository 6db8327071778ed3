//! What the backup tests share (`backup.rs` on a file target, `backup_s3.rs` on moto): the
//! shipping state as the server writes it, waiting for it, command outputs, and a server on
//! a restored data directory.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Server, launch};

/// The server's shipping state (`DIR/backup/status.json`), `Null` before the first.
pub fn status(data: &Path) -> Value {
    std::fs::read(data.join("backup/status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    i64::try_from(t.expect("clock").as_millis()).expect("ms")
}

/// Wait until everything committed is shipped, the current epoch has its snapshot (a
/// registration from the command line starts a new epoch) and the newest point is not
/// older than `since_ms`.
pub fn wait_shipped(s: &Server, since_ms: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(&s.data);
        if st["epoch_snapshot_ms"].as_i64().is_some()
            && st["last_point_ms"].as_i64().unwrap_or(0) >= since_ms
            && st["snapshot_running"] == false
            && st["waiting_since_ms"].is_null()
        {
            assert!(st["last_error"].is_null(), "shipping met an error: {st}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backups did not catch up: {st}\nserver log:\n{}",
            String::from_utf8_lossy(&s.logs())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A command's standard output and error, together.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The output of a command that must succeed.
pub fn ok(o: &Output) -> String {
    let out = text(o);
    assert!(o.status.success(), "{out}");
    out
}

/// A command that must be refused, saying `why`.
pub fn refused(o: &Output, why: &str) {
    let out = text(o);
    assert!(!o.status.success(), "expected a refusal ({why}): {out}");
    assert!(out.contains(why), "expected {why:?} in: {out}");
}

/// A server on a restored data directory.
pub fn serve_restored(dir: &Path) -> Server {
    let tmp = tempfile::tempdir().expect("tmp");
    Server::running(tmp, dir.to_path_buf(), launch(dir))
}
