//! What the nodes of one store share besides the records: replay records that each node
//! must see (a client assertion's or DPoP proof's `jti` used on one node is refused on
//! every other), and which node runs each periodic task (a session advisory lock, which
//! PostgreSQL releases when the holder's connection ends: a node that dies hands its
//! tasks over within one round of the others).

use std::collections::HashSet;

use parking_lot::Mutex;

use super::PgStore;
use super::conn::PgConn;
use crate::StoreError;

/// How often (at most) a node removes expired replay records.
const PURGE_EVERY_MS: i64 = 10_000;

/// The connection holding this node's task locks, and the tasks it holds.
#[derive(Default)]
pub(super) struct Leader {
    conn: Option<PgConn>,
    held: HashSet<i64>,
}

/// The advisory lock key of a periodic task.
fn task_key(task: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"phivault-task\0".iter().chain(task.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

impl PgStore {
    pub(super) fn claim(&self, ns: &str, key: &[u8], until_ms: i64) -> Result<bool, StoreError> {
        let now = crate::sqlite::now_ms() as i64;
        self.purge_now();
        self.pool.with(async |c| {
            // a record that expired is taken over; one that holds refuses the claim. The
            // commit need not wait for the disk: a database crash loses at most the last
            // few hundred milliseconds of records (PostgreSQL's WAL writer delay)
            let rows = c
                .query(
                    "WITH c AS (SELECT set_config('synchronous_commit', 'off', true)) \
                     INSERT INTO once_seen (ns, k, until_ms) SELECT $1, $2, $3 FROM c \
                     ON CONFLICT (ns, k) DO UPDATE SET until_ms = excluded.until_ms \
                     WHERE once_seen.until_ms < $4 RETURNING 1",
                    &[&ns, &key, &until_ms, &now],
                )
                .await?;
            Ok(!rows.is_empty())
        })
    }

    pub(super) fn update_record(
        &self,
        ns: &str,
        key: &[u8],
        now_ms: i64,
        f: &mut dyn FnMut(Option<&[u8]>) -> crate::SharedChange,
    ) -> Result<(), StoreError> {
        use crate::SharedChange as C;
        self.purge_now();
        self.pool.with(async |c| {
            c.batch("BEGIN").await?;
            let out = async {
                // a row to lock, also when there is none yet (two nodes creating one
                // record wait for each other on it)
                c.execute(
                    "INSERT INTO shared_state (ns, k, v, until_ms) VALUES ($1, $2, NULL, 0) \
                     ON CONFLICT DO NOTHING",
                    &[&ns, &key],
                )
                .await?;
                let row = c
                    .query_opt(
                        "SELECT v, until_ms FROM shared_state WHERE ns = $1 AND k = $2 FOR UPDATE",
                        &[&ns, &key],
                    )
                    .await?;
                let (v, until): (Option<Vec<u8>>, i64) =
                    row.map_or((None, 0), |r| (r.get(0), r.get(1)));
                let live = v.filter(|_| now_ms == 0 || until > now_ms);
                let placeholder = live.is_none();
                match f(live.as_deref()) {
                    C::Put { value, until_ms } => {
                        c.execute(
                            "UPDATE shared_state SET v = $3, until_ms = $4 WHERE ns = $1 AND k = $2",
                            &[&ns, &key, &value, &until_ms],
                        )
                        .await?;
                    }
                    C::Delete => {
                        c.execute(
                            "DELETE FROM shared_state WHERE ns = $1 AND k = $2",
                            &[&ns, &key],
                        )
                        .await?;
                    }
                    C::Keep if placeholder => {
                        c.execute(
                            "DELETE FROM shared_state WHERE ns = $1 AND k = $2 AND v IS NULL",
                            &[&ns, &key],
                        )
                        .await?;
                    }
                    C::Keep => {}
                }
                Ok::<_, StoreError>(())
            }
            .await;
            match out {
                Ok(()) => c.batch("COMMIT").await,
                Err(e) => {
                    let _ = c.batch("ROLLBACK").await;
                    Err(e)
                }
            }
        })
    }

    pub(super) fn scan_records(
        &self,
        ns: &str,
        now_ms: i64,
        visit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), StoreError> {
        let rows = self.pool.with(async |c| {
            c.query(
                "SELECT k, v FROM shared_state WHERE ns = $1 AND v IS NOT NULL \
                 AND ($2::int8 = 0 OR until_ms > $2::int8)",
                &[&ns, &now_ms],
            )
            .await
        })?;
        for r in &rows {
            visit(r.get(0), r.get(1));
        }
        Ok(())
    }

    /// Remove expired replay records and shared records, at most every
    /// [`PURGE_EVERY_MS`] a node.
    fn purge_now(&self) {
        let now = crate::sqlite::now_ms() as i64;
        {
            let mut last = self.last_purge.lock();
            if now - *last < PURGE_EVERY_MS {
                return;
            }
            *last = now;
        }
        let _ = self.pool.with(async |c| {
            c.execute("DELETE FROM once_seen WHERE until_ms < $1", &[&now])
                .await?;
            c.execute(
                "DELETE FROM shared_state WHERE until_ms < $1 AND v IS NOT NULL",
                &[&now],
            )
            .await
        });
    }

    pub(super) fn try_lead(&self, leader: &Mutex<Leader>, task: &str) -> bool {
        let key = task_key(task);
        let mut l = leader.lock();
        if l.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            l.held.clear();
            l.conn = match self.pool.connect() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "no connection for the periodic tasks' locks");
                    return false;
                }
            };
        }
        if l.held.contains(&key) {
            return true;
        }
        let Some(conn) = l.conn.as_mut() else {
            return false;
        };
        let got = super::conn::block_on(async {
            conn.query_opt("SELECT pg_try_advisory_lock($1)", &[&key])
                .await
        });
        match got {
            Ok(Some(r)) if r.get::<_, bool>(0) => {
                tracing::info!(task, "this node runs the periodic task now");
                l.held.insert(key);
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, task, "the periodic task's lock could not be asked for");
                l.conn = None;
                false
            }
        }
    }
}
