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
        let purge = {
            let mut last = self.last_purge.lock();
            if now - *last >= PURGE_EVERY_MS {
                *last = now;
                true
            } else {
                false
            }
        };
        self.pool.with(async |c| {
            if purge {
                c.execute("DELETE FROM once_seen WHERE until_ms < $1", &[&now])
                    .await?;
            }
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
