//! Sign-ins in progress (SMART App Launch): the flows between the authorize, login and
//! consent pages, the per-source attempt budget, account write stripes, and the registered
//! apps. State only: the pages are `handlers::launch`.

use std::collections::HashMap;

use parking_lot::Mutex;
use phivault_auth::authorize::{AppRecord, AuthorizeRequest, Grant};

use phivault_records::registrations::app_meta_key;

use crate::state::App;

/// Sign-in attempts per source address per minute.
const ATTEMPTS_PER_MINUTE: u32 = 20;

pub(crate) enum Stage {
    Login { failures: u32 },
    Consent(Box<Grant>),
}

pub(crate) struct Flow {
    pub(crate) req: AuthorizeRequest,
    pub(crate) app_name: String,
    pub(crate) browser: String,
    pub(crate) csrf: String,
    pub(crate) stage: Stage,
    pub(crate) expires: u64,
}

/// Sign-ins in progress and the per-source attempt counters.
#[derive(Default)]
pub struct Flows {
    pub(crate) flows: Mutex<HashMap<String, Flow>>,
    attempts: Mutex<HashMap<String, (u64, u32)>>,
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
    /// Count an attempt from `source`; false when it is over the per-minute budget.
    pub(crate) fn admit(&self, source: &str, now: u64) -> bool {
        let mut a = self.attempts.lock();
        if a.len() > 100_000 {
            a.retain(|_, (minute, _)| *minute == now / 60);
        }
        let e = a.entry(source.to_owned()).or_insert((now / 60, 0));
        if e.0 != now / 60 {
            *e = (now / 60, 0);
        }
        e.1 += 1;
        e.1 <= ATTEMPTS_PER_MINUTE
    }
}
