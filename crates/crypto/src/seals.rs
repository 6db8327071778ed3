//! Seal counting: every key that seals with random 96-bit nonces stops at
//! [`SEAL_LIMIT`] messages (NIST SP 800-38D §8.3: with random nonces, at most 2³²
//! invocations per key keep the chance of a repeated nonce below 2⁻³²).
//!
//! Each counted key has a [`SealCounter`] named after its purpose (`secret`, `kek.<g>`,
//! `cursor.<day>`). Counts of long-lived keys are made durable coarsely: the owner of the
//! store installs a [`ReserveSeals`] hook, and a counter asks it to record "up to N seals
//! used" in blocks of [`SEAL_RESERVE_BLOCK`] *before* it hands out the first seal of a
//! block. A process that starts again resumes from the recorded number (the unused rest of
//! the last block counts as used), so a crash never gives the same count out twice.
//! Without a hook (offline tools before a store is open) counts are kept in memory only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::CryptoError;

/// Most messages one key seals with random nonces.
pub const SEAL_LIMIT: u64 = 1 << 32;
/// Seals reserved (made durable) at once.
pub const SEAL_RESERVE_BLOCK: u64 = 1 << 20;

/// Records durably that counter `name` has used up to `upto` seals; false if it could not.
pub type ReserveSeals = Arc<dyn Fn(&str, u64) -> bool + Send + Sync>;

/// The seals one key has made.
pub(crate) struct SealCounter {
    name: String,
    used: AtomicU64,
    /// Seals covered by the durable reservation (in memory: the same, unpersisted).
    reserved: AtomicU64,
    lock: Mutex<()>,
}

impl SealCounter {
    fn new(name: &str, start: u64) -> Self {
        SealCounter {
            name: name.to_owned(),
            used: AtomicU64::new(start),
            reserved: AtomicU64::new(start),
            lock: Mutex::new(()),
        }
    }

    /// Count one seal, reserving the next block first when this one is not yet covered.
    fn take(&self, hook: Option<&ReserveSeals>) -> Result<(), CryptoError> {
        let n = self.used.fetch_add(1, Ordering::Relaxed) + 1;
        if n > SEAL_LIMIT {
            return Err(CryptoError::SealLimit);
        }
        if n <= self.reserved.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.reserved.load(Ordering::Acquire);
        if n <= r {
            return Ok(());
        }
        let upto = (r.max(n - 1) + SEAL_RESERVE_BLOCK).min(SEAL_LIMIT);
        if let Some(reserve) = hook
            && !reserve(&self.name, upto)
        {
            // fail closed: this count was never made durable
            return Err(CryptoError::SealLimit);
        }
        self.reserved.store(upto, Ordering::Release);
        Ok(())
    }

    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed).min(SEAL_LIMIT)
    }
}

/// Every counter of one key hierarchy, and the hook that makes their counts durable.
#[derive(Default)]
pub(crate) struct SealBook {
    counters: RwLock<HashMap<String, Arc<SealCounter>>>,
    hook: RwLock<Option<ReserveSeals>>,
}

impl SealBook {
    fn counter(&self, name: &str) -> Arc<SealCounter> {
        if let Some(c) = self
            .counters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return c.clone();
        }
        let mut all = self.counters.write().unwrap_or_else(|e| e.into_inner());
        all.entry(name.to_owned())
            .or_insert_with(|| Arc::new(SealCounter::new(name, 0)))
            .clone()
    }

    /// Count one seal of the key `name` ([`CryptoError::SealLimit`] beyond the limit).
    pub(crate) fn take(&self, name: &str) -> Result<(), CryptoError> {
        let hook = self.hook.read().unwrap_or_else(|e| e.into_inner()).clone();
        self.counter(name).take(hook.as_ref())
    }

    /// Resume counters from durable reservations, and make further ones durable by `hook`.
    pub(crate) fn install(&self, stored: &[(String, u64)], hook: ReserveSeals) {
        let mut all = self.counters.write().unwrap_or_else(|e| e.into_inner());
        for (name, upto) in stored {
            let upto = (*upto).min(SEAL_LIMIT);
            let c = all
                .entry(name.clone())
                .or_insert_with(|| Arc::new(SealCounter::new(name, upto)));
            c.used.fetch_max(upto, Ordering::Relaxed);
            c.reserved.fetch_max(upto, Ordering::Relaxed);
        }
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Seals counted so far by `name`.
    pub(crate) fn used(&self, name: &str) -> u64 {
        self.counters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map_or(0, |c| c.used())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reserve_blocks_ahead_and_stop_at_the_limit() {
        let book = SealBook::default();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        book.install(
            &[],
            Arc::new(move |name: &str, upto| {
                seen.lock().unwrap().push((name.to_owned(), upto));
                true
            }),
        );
        for _ in 0..3 {
            book.take("secret").expect("seal");
        }
        assert_eq!(book.used("secret"), 3);
        // one reservation covers the first block
        assert_eq!(
            *calls.lock().unwrap(),
            vec![("secret".to_owned(), SEAL_RESERVE_BLOCK)]
        );

        // a restart resumes after the reserved block, never below it
        let again = SealBook::default();
        let seen2 = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen2.clone();
        again.install(
            &[("secret".to_owned(), SEAL_RESERVE_BLOCK)],
            Arc::new(move |_: &str, upto| {
                s2.lock().unwrap().push(upto);
                true
            }),
        );
        again.take("secret").expect("seal");
        assert_eq!(again.used("secret"), SEAL_RESERVE_BLOCK + 1);
        assert_eq!(*seen2.lock().unwrap(), vec![2 * SEAL_RESERVE_BLOCK]);

        // at the limit: refused, and stays refused
        let full = SealBook::default();
        full.install(
            &[("k".to_owned(), SEAL_LIMIT - 1)],
            Arc::new(|_: &str, _| true),
        );
        full.take("k").expect("the last seal");
        assert!(matches!(full.take("k"), Err(CryptoError::SealLimit)));
        assert!(matches!(full.take("k"), Err(CryptoError::SealLimit)));
        assert_eq!(full.used("k"), SEAL_LIMIT);
    }

    #[test]
    fn a_reservation_that_cannot_be_made_durable_refuses_the_seal() {
        let book = SealBook::default();
        book.install(&[], Arc::new(|_: &str, _| false));
        assert!(matches!(book.take("secret"), Err(CryptoError::SealLimit)));
        // without a hook: counted in memory
        let mem = SealBook::default();
        mem.take("x").expect("seal");
        assert_eq!(mem.used("x"), 1);
    }
}
