//! A scan of the stored audit log: where the last one stopped, its sealed state, and the
//! alerts it raises.

use super::*;

/// Where the scanner keeps its position in the log.
pub(super) const POSITION: &str = "snoop:position";
/// What the rules carry between scans ([`State`]), sealed.
pub(super) const STATE: &str = "snoop:state";
pub(super) const STATE_LABEL: &str = "phivault snooping state v2\u{0}snoop:state";
/// The per-person daily counts of earlier versions, which counted a patient again in
/// every scan of the day: not carried over (an inflated baseline hides a real spike; the
/// volume rule judges against peers until three days of exact counts are kept), emptied.
pub(super) const OLD_HISTORY: &str = "snoop:history";
/// Days of counts kept for the volume baselines.
pub(super) const BASELINE_DAYS: u64 = 90;
/// Most events one scan reads; the next scan goes on from there.
pub(super) const MAX_EVENTS: usize = 2_000_000;

/// What one [`run`] read and raised.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Events read.
    pub events: usize,
    /// The log position scanned up to.
    pub position: u64,
    /// New alerts by rule.
    pub alerts: BTreeMap<String, usize>,
    /// Open alerts of earlier scans that got more evidence.
    #[serde(default)]
    pub extended: usize,
    /// The new alerts.
    #[serde(skip)]
    pub raised: Vec<crate::care::Alert>,
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] phivault_store::StoreError),
    /// A stored event or baseline does not open or decode.
    #[error("{0}; run phivault audit verify")]
    Integrity(String),
    /// An alert could not be written.
    #[error(transparent)]
    Alert(#[from] crate::care::AlertError),
}

impl State {
    /// The state as stored (before sealing).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The state from [`State::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Option<State> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Run the rules over the events after the last scanned position and raise an open alert
/// for each finding. A finding with the id of an alert already raised adds its new
/// requests to that alert's evidence while the alert is open; once it is reviewed, they
/// raise an alert of their own (a review does not cover what came after it). The position
/// and the rules' [`State`] are kept in the store (the state sealed); the records the
/// relationship rules read are decrypted in memory only.
pub fn run(app: &crate::Vault, hours: Hours) -> Result<Summary, ScanError> {
    use crate::care::{Alert, raise_alert};
    let store = &**app.engine.store();
    let keys = app.engine.keys();
    let position: u64 = store
        .meta(POSITION)?
        .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0);
    let mut state = match store.meta(STATE)? {
        Some(sealed) => {
            let plain = keys.open_secret(STATE_LABEL, &sealed).map_err(|_| {
                ScanError::Integrity("the stored scan state failed its integrity check".into())
            })?;
            State::from_bytes(plain.expose()).ok_or_else(|| {
                ScanError::Integrity("the stored scan state does not decode".into())
            })?
        }
        None => State::default(),
    };
    let mut events = Vec::new();
    let mut last = position;
    while events.len() < MAX_EVENTS {
        let batch = store.audit_after(last, 10_000)?;
        let Some(end) = batch.last().map(|s| s.seq) else {
            break;
        };
        for s in batch {
            let ev = AuditEvent::decode(&s.event)
                .map_err(|_| ScanError::Integrity(format!("event {} does not decode", s.seq)))?;
            // the store's own events (settings rows it changed, this scan's position
            // among them) are no one's access
            if ev.client_id.is_some() || !matches!(ev.interaction.as_str(), "setting" | "reindex") {
                events.push(ev);
            }
        }
        last = end;
    }
    let mut records = EngineRecords::new(app);
    let findings = scan(&events, hours, &mut state, &mut records);
    let users = app.engine.users();
    let mut existing: HashMap<String, Alert> = crate::care::alerts(keys, store, usize::MAX)?
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    let mut summary = Summary {
        events: events.len(),
        position: last,
        ..Default::default()
    };
    'findings: for mut f in findings {
        // the alert it belongs to: its own, or, once that is reviewed, the one that follows
        // it (one per reviewed alert, so that what came after a review is reviewed again)
        while let Some(a) = existing.get_mut(&f.id) {
            f.evidence.retain(|r| !a.evidence.contains(r));
            if f.evidence.is_empty() {
                continue 'findings; // scanned before (an operator's scan beside the server's)
            }
            if a.status == "open" {
                a.evidence.append(&mut f.evidence);
                a.reason.clone_from(&f.detail);
                raise_alert(keys, store, a)?;
                summary.extended += 1;
                continue 'findings;
            }
            f.id = alert_id(
                &f.rule,
                &f.user,
                f.patient.as_deref(),
                &format!("after the review of {}", a.id),
            );
        }
        let username = users
            .get_by_id(&f.user)
            .ok()
            .flatten()
            .map(|u| u.username.clone())
            .unwrap_or_default();
        let at_ms = i64::try_from(f.at_ms).unwrap_or(i64::MAX);
        let alert = Alert {
            id: f.id.clone(),
            rule: f.rule.clone(),
            user: f.user.clone(),
            username,
            patient: f.patient.clone().unwrap_or_default(),
            reason: f.detail.clone(),
            at_ms,
            until_ms: at_ms,
            request_id: f.evidence.first().cloned().unwrap_or_default(),
            status: "open".into(),
            reviewer: None,
            review_note: None,
            reviewed_ms: None,
            evidence: f.evidence.clone(),
            score: f.score,
        };
        raise_alert(keys, store, &alert)?;
        *summary.alerts.entry(f.rule.clone()).or_default() += 1;
        existing.insert(alert.id.clone(), alert.clone());
        summary.raised.push(alert);
    }
    let plain = zeroize::Zeroizing::new(state.to_bytes());
    let sealed = keys
        .seal_secret(STATE_LABEL, &plain)
        .map_err(|_| ScanError::Integrity("sealing the scan state failed".into()))?;
    store.set_meta(STATE, &sealed)?;
    if store.meta(OLD_HISTORY)?.is_some_and(|v| !v.is_empty()) {
        store.set_meta(OLD_HISTORY, &[])?;
    }
    store.set_meta(POSITION, last.to_string().as_bytes())?;
    Ok(summary)
}
