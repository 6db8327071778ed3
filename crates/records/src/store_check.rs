//! The store checked while the server runs (issue 18): what readers refused as changed
//! outside phivault, and — every `verify_every` — the whole state summed afresh against
//! the signed one, paced so requests go first. Each distinct finding raises one open
//! alert (rule [`RULE`], score 100, the finding — ids, keys and kinds, never PHI — as its
//! text), delivered to syslog with the others.

use std::time::{Duration, Instant};

use crate::Vault;
use crate::care::{Alert, raise_alert};

/// The rule of the alerts raised here.
pub const RULE: &str = "storage-tampered";

/// What one round found and raised.
#[derive(Debug, Default)]
pub struct Round {
    /// Findings (readers' refusals and the full check's), distinct.
    pub findings: Vec<String>,
    /// Alerts newly raised for them.
    pub raised: usize,
    /// Whether the whole store was checked, and how long it took.
    pub full: Option<Duration>,
}

/// One round: take the readers' refusals and, when `full`, check the whole store.
pub fn run(app: &Vault, full: bool) -> Result<Round, crate::care::AlertError> {
    let store = app.engine.store();
    let mut round = Round::default();
    if full {
        let started = Instant::now();
        // pace: after each stretch of rows, rest as long as it took (at most 20 ms), so
        // the check gets at most half a core while requests wait on nothing
        let mut stretch = Instant::now();
        let mut pace = || {
            let rest = stretch.elapsed().min(Duration::from_millis(20));
            std::thread::sleep(rest);
            stretch = Instant::now();
        };
        match store.check_state(&mut pace) {
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "the store check could not run"),
        }
        round.full = Some(started.elapsed());
    }
    for f in store.take_detections() {
        if !round.findings.contains(&f) {
            round.findings.push(f);
        }
    }
    for f in &round.findings {
        tracing::error!(finding = %f, "storage was changed outside phivault");
    }
    round.raised = raise_findings(app, RULE, &round.findings)?;
    Ok(round)
}

/// Raise one open alert of `rule` (score 100, the finding as its text: never PHI) for
/// each finding that has none open yet; returns how many were raised. (Operational
/// findings: storage changed, backups failing.)
pub fn raise_findings(
    app: &Vault,
    rule: &str,
    findings: &[String],
) -> Result<usize, crate::care::AlertError> {
    if findings.is_empty() {
        return Ok(0);
    }
    let store = app.engine.store();
    let keys = app.engine.keys();
    let open: Vec<Alert> = crate::care::alerts(keys, &**store, usize::MAX)?
        .into_iter()
        .filter(|a| a.rule == rule && a.status == "open")
        .collect();
    let now = crate::engine::now_ms();
    let mut raised = 0;
    for (n, f) in findings.iter().enumerate() {
        if open.iter().any(|a| &a.reason == f) {
            continue;
        }
        let alert = Alert {
            id: format!("{rule}-{now}-{n}"),
            rule: rule.into(),
            user: String::new(),
            username: String::new(),
            patient: String::new(),
            reason: f.clone(),
            at_ms: now,
            until_ms: now,
            request_id: String::new(),
            status: "open".into(),
            reviewer: None,
            review_note: None,
            reviewed_ms: None,
            evidence: Vec::new(),
            score: 100,
        };
        raise_alert(keys, &**store, &alert)?;
        raised += 1;
    }
    Ok(raised)
}

/// How often a round runs (readers' refusals are raised within it).
pub const ROUND: Duration = Duration::from_secs(1);

/// Whether the whole store is due for a check: first soon after start, then every
/// `every`.
pub fn due(last: Option<Instant>, started: Instant, every: Duration) -> bool {
    match last {
        None => started.elapsed() >= Duration::from_secs(2).min(every),
        Some(t) => t.elapsed() >= every,
    }
}
