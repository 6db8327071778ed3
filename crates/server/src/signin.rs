//! Sign-ins in progress (SMART App Launch): the flows between the authorize, login and
//! consent pages, the per-source attempt budget, and the registered apps. State only: the
//! pages are `handlers::launch`.
//!
//! Flows and attempt counts are records of a [`SharedState`]: this process's memory, or —
//! with several nodes on one store — sealed records every node reads and changes
//! atomically, so a browser's next step may land on any node and the attempt budget is
//! the deployment's, not each node's.

use std::sync::Arc;

use phivault_auth::authorize::{
    AppRecord, AuthorizeRequest, Change, Grant, MemoryState, SharedState,
};
use serde::{Deserialize, Serialize};

use phivault_records::registrations::app_meta_key;

use crate::state::App;

const ATTEMPTS_PER_MINUTE: u32 = 20;

/// Flows kept at most in one process's memory.
const MAX_FLOWS: usize = 10_000;

/// Sources counted at most in one process's memory.
const MAX_SOURCES: usize = 100_000;

#[derive(Serialize, Deserialize)]
pub(crate) enum Stage {
    Login { failures: u32 },
    Consent(Box<Grant>),
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Flow {
    pub(crate) req: AuthorizeRequest,
    pub(crate) app_name: String,
    pub(crate) browser: String,
    pub(crate) csrf: String,
    pub(crate) stage: Stage,
    pub(crate) expires: u64,
}

/// What becomes of a flow after a step.
pub(crate) enum Then {
    /// Left as it was.
    Keep,
    /// Stored as changed.
    Save,
    /// Ended.
    Remove,
}

pub struct Flows {
    flows: Arc<dyn SharedState>,
    attempts: Arc<dyn SharedState>,
}

impl Default for Flows {
    fn default() -> Self {
        Flows {
            flows: Arc::new(MemoryState::new(MAX_FLOWS)),
            attempts: Arc::new(MemoryState::new(MAX_SOURCES)),
        }
    }
}

impl App {
    /// Look a registered SMART app up.
    pub fn launch_app(&self, client_id: &str) -> Option<AppRecord> {
        let bytes = self.vault.engine.meta(&app_meta_key(client_id)).ok()??;
        let a: AppRecord = serde_json::from_slice(&bytes).ok()?;
        a.validate().is_ok().then_some(a)
    }
}

impl Flows {
    /// Flows and counts in `state`, which every node of a deployment shares.
    pub fn shared(state: Arc<dyn SharedState>) -> Self {
        Flows {
            flows: state.clone(),
            attempts: state,
        }
    }

    /// Store a new flow; false when there is no room (or the records cannot be reached).
    pub(crate) fn insert(&self, id: &str, flow: &Flow, now: u64) -> bool {
        let Ok(value) = serde_json::to_vec(flow) else {
            return false;
        };
        let mut value = Some(value);
        self.flows
            .update("flow", id.as_bytes(), now * 1000, &mut |_| Change::Put {
                value: value.take().unwrap_or_default(),
                until_ms: flow.expires * 1000,
            })
            .is_ok()
    }

    /// Run `f` on flow `id` (None when there is none, or it expired), then keep, store or
    /// remove it as `f` says; what `f` returned (None when the records cannot be reached).
    pub(crate) fn update<R>(
        &self,
        id: &str,
        now: u64,
        f: impl FnOnce(Option<&mut Flow>) -> (Then, R),
    ) -> Option<R> {
        let mut f = Some(f);
        let mut out = None;
        self.flows
            .update("flow", id.as_bytes(), now * 1000, &mut |old| {
                let Some(f) = f.take() else {
                    return Change::Keep;
                };
                let mut flow: Option<Flow> = old
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .filter(|fl: &Flow| fl.expires > now);
                let (then, r) = f(flow.as_mut());
                out = Some(r);
                match (then, flow) {
                    (Then::Save, Some(fl)) => match serde_json::to_vec(&fl) {
                        Ok(value) => Change::Put {
                            value,
                            until_ms: fl.expires * 1000,
                        },
                        Err(_) => Change::Delete,
                    },
                    (Then::Remove, _) => Change::Delete,
                    _ => Change::Keep,
                }
            })
            .ok()?;
        out
    }

    /// Count an attempt from `source`; false when it is over the per-minute budget (or
    /// the counts cannot be reached: fail closed).
    pub(crate) fn admit(&self, source: &str, now: u64) -> bool {
        let minute = now / 60;
        let key = format!("{source}\0{minute}");
        let mut admitted = false;
        let counted = self
            .attempts
            .update("attempt", key.as_bytes(), now * 1000, &mut |old| {
                let seen: u32 = old
                    .and_then(|b| std::str::from_utf8(b).ok()?.parse().ok())
                    .unwrap_or(0);
                let n = seen.saturating_add(1);
                admitted = n <= ATTEMPTS_PER_MINUTE;
                Change::Put {
                    value: n.to_string().into_bytes(),
                    until_ms: (minute + 1) * 60_000,
                }
            });
        counted.is_ok() && admitted
    }
}
