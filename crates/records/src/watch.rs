//! What the server does besides answering requests, so that the audit log is read and
//! anchored while it runs (AU3, AU5):
//!
//! * the snooping rules ([`crate::snoop::run`]) over the new events at a fixed interval,
//!   each new alert optionally sent to syslog (RFC 5424 over a Unix datagram socket such
//!   as `/dev/log`, facility authpriv, severity warning; ids, rule and score only — no
//!   PHI, no reasons);
//! * every signed checkpoint appended to a witness file as soon as it is written (the
//!   `phivault audit checkpoints` line format, fsync'd), for `phivault audit verify
//!   --witness`: put it on another volume, append-only (`chattr +a`), or ship it off the
//!   host, so that a rewrite of the whole database is caught;
//! * the store check ([`crate::store_check`]): readers' refusals of rows changed outside
//!   phivault raised as alerts within a second, and the whole store checked against the
//!   signed state soon after start and then every `verify_every`.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use phivault_audit::merkle::Checkpoint;

use crate::Vault;
use crate::care::Alert;
use crate::snoop::Hours;

/// How the server watches its audit log.
#[derive(Debug, Clone)]
pub struct Watch {
    /// How often the snooping rules run.
    pub scan_every: Duration,
    /// Working hours of the after-hours rule.
    pub hours: Hours,
    /// Where checkpoints are appended.
    pub witness_file: Option<PathBuf>,
    /// The syslog socket new alerts go to.
    pub alert_syslog: Option<PathBuf>,
    /// How often the whole store is checked against the signed state.
    pub verify_every: Duration,
    /// The audit key's public half, named on each witness line (None: lines name none).
    pub audit_key: Option<[u8; 32]>,
}

/// The running watchers: [`Watcher::stop`] ends them (a sealed server drops its `Vault`).
pub struct Watcher {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Watcher {
    /// Stop every watcher task and wait until they are gone (with the `Vault` they held).
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Start the watchers on the current runtime.
pub fn spawn(app: Arc<Vault>, watch: Watch) -> Watcher {
    let scanner = app.clone();
    let w = watch.clone();
    let mut tasks = Vec::with_capacity(2);
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(w.scan_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // the alerts there are at start have been delivered (or predate delivery)
        let mut known: Option<HashSet<String>> = None;
        let mut first = true;
        loop {
            // (with several nodes on one store, one of them scans; another takes over)
            let lead = {
                let a = scanner.clone();
                tokio::task::spawn_blocking(move || a.engine.lead("snooping-scan"))
                    .await
                    .unwrap_or(false)
            };
            if !first && lead {
                let a = scanner.clone();
                let hours = w.hours;
                let done = tokio::task::spawn_blocking(move || crate::snoop::run(&a, hours)).await;
                match done {
                    Ok(Ok(summary)) if !summary.raised.is_empty() => {
                        tracing::warn!(events = summary.events, alerts = ?summary.alerts, "snooping rules raised alerts for review");
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "the snooping scan failed"),
                    Err(_) => tracing::error!("the snooping scan stopped"),
                }
            }
            first = false;
            // every new alert — the rules' and break-the-glass — to syslog
            if let Some(path) = &w.alert_syslog {
                let a = scanner.clone();
                let all = tokio::task::spawn_blocking(move || {
                    crate::care::alerts(a.engine.keys(), &**a.engine.store(), usize::MAX)
                })
                .await;
                match (all, known.as_mut()) {
                    (Ok(Ok(all)), None) => known = Some(all.into_iter().map(|x| x.id).collect()),
                    (Ok(Ok(all)), Some(seen)) => {
                        for alert in all {
                            if seen.contains(&alert.id) {
                                continue;
                            }
                            match send_syslog(path, &alert) {
                                Ok(()) => {
                                    seen.insert(alert.id);
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "an alert could not be sent to syslog; retried at the next scan")
                                }
                            }
                        }
                    }
                    _ => tracing::error!("the alerts could not be read for delivery"),
                }
            }
            tick.tick().await;
        }
    }));
    let checker = app.clone();
    let every = watch.verify_every;
    tasks.push(tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut last_full: Option<std::time::Instant> = None;
        loop {
            tokio::time::sleep(crate::store_check::ROUND).await;
            let full = crate::store_check::due(last_full, started, every);
            let a = checker.clone();
            let done = tokio::task::spawn_blocking(move || {
                // (every node raises what its own readers refused; one node at a time
                // checks the whole of a store several nodes share)
                let full = full && a.engine.lead("store-check");
                crate::store_check::run(&a, full)
            })
            .await;
            match done {
                Ok(Ok(round)) => {
                    if let Some(took) = round.full {
                        last_full = Some(std::time::Instant::now());
                        tracing::info!(
                            ms = took.as_millis() as u64,
                            findings = round.findings.len(),
                            "the store was checked against the signed state"
                        );
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "a store check's alert could not be raised")
                }
                Err(_) => tracing::error!("the store check stopped"),
            }
        }
    }));
    let key = watch.audit_key;
    if let Some(path) = watch.witness_file {
        tasks.push(tokio::spawn(async move {
            let mut last = match last_witnessed(&path) {
                Ok(size) => size,
                Err(e) => {
                    tracing::error!(error = %e, "the witness file cannot be read; checkpoints are not exported");
                    return;
                }
            };
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let a = app.clone();
                let p = path.clone();
                let done = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
                    let cps = a
                        .engine
                        .store()
                        .audit_checkpoints(last, 1000)
                        .map_err(std::io::Error::other)?;
                    append_checkpoints(&p, &cps, key.as_ref())?;
                    Ok(cps.last().map_or(last, |c| c.size))
                })
                .await;
                match done {
                    Ok(Ok(size)) => last = size,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "checkpoints could not be appended to the witness file")
                    }
                    Err(_) => tracing::error!("the witness export stopped"),
                }
            }
        }));
    }
    Watcher { tasks }
}

/// The size of the last checkpoint in the witness file (0 when it is new).
fn last_witnessed(path: &std::path::Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .rev()
            .find_map(Checkpoint::from_line)
            .map_or(0, |c| c.size)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Append checkpoints to the witness file (each line naming `key`, the audit key's public
/// half, when given) and make them durable.
pub fn append_checkpoints(
    path: &std::path::Path,
    cps: &[Checkpoint],
    key: Option<&[u8; 32]>,
) -> std::io::Result<()> {
    if cps.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for c in cps {
        text.push_str(&match key {
            Some(k) => c.to_line_signed_by(k),
            None => c.to_line(),
        });
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// An alert as an RFC 5424 syslog message: facility authpriv (10), severity warning (4).
/// Structured data carries ids, the rule and the score; nothing about the patient beyond
/// the record id, and never the reason a person gave.
pub fn syslog_message(alert: &Alert, host: &str) -> String {
    let escape = |s: &str| -> String {
        s.chars()
            .filter(|c| !c.is_control())
            .flat_map(|c| match c {
                '"' | '\\' | ']' => vec!['\\', c],
                c => vec![c],
            })
            .collect()
    };
    let ts = crate::engine::instant(alert.at_ms);
    format!(
        "<{}>1 {ts} {host} phivault - alert [phivault@32473 id=\"{}\" rule=\"{}\" score=\"{}\" user=\"{}\" patient=\"{}\" request=\"{}\"] {}",
        10 * 8 + 4,
        escape(&alert.id),
        escape(&alert.rule),
        alert.score,
        escape(&alert.user),
        escape(&alert.patient),
        escape(&alert.request_id),
        if alert.rule == crate::store_check::RULE {
            "storage changed outside phivault"
        } else {
            "snooping alert for review"
        },
    )
}

fn send_syslog(path: &std::path::Path, alert: &Alert) -> std::io::Result<()> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "-".to_owned());
    sock.send_to(syslog_message(alert, &host).as_bytes(), path)?;
    Ok(())
}
