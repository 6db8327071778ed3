//! The single writer thread and its group commit.
//!
//! One writer thread owns the only read-write connection and group-commits: it takes
//! every batch queued while the previous commit was being made durable (at most
//! [`MAX_GROUP`]), applies each in its own savepoint (so one failing batch does not affect
//! the others), commits once with `synchronous=FULL`, and only then answers every batch.
//! The same transaction logs the group's index postings in one `index_log` record,
//! appends its audit events, signs the new audit head and, at most every
//! [`CHECKPOINT_INTERVAL_MS`], a checkpoint of the audit log's Merkle tree. Between groups
//! the writer merges pending index rows ([`super::index`]) and restarts a long WAL
//! ([`super::wal`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

use parking_lot::RwLock;
use phivault_audit::merkle::{self, Frontier};
use phivault_audit::{AuditEvent, ChainHead};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::index::{encode_log_record, index_no, merge_or_warn};
use super::lists::matching_ids;
use super::tap::SnapshotPoint;
use super::trust::{SettingChange, catch_up, put_setting, setting_event};
use super::wal::{WalRestarter, checkpoint, note_wal_frames};
use super::{DbId, SqliteStore, engine};
use crate::integrity::{Digests, Head, Integrity, Known};
use crate::pending::{self, Pending, Staged, Tok};
use crate::{
    CommitError, Committed, Expect, Guard, HeadSigner, IndexEntry, Put, StoreError, WriteBatch,
};
use phivault_audit::Write;
use std::collections::HashMap;

/// Most batches one group commit takes.
const MAX_GROUP: usize = 1024;

/// A writer that has written no index rows for this long (ms) merges whatever is pending.
pub(super) const IDLE_MERGE_MS: u64 = 1_000;

/// Pending index rows merged into the segments at once (about 100 bytes of memory
/// each). Larger merges cost fewer passes over the main index.
pub(super) const DEFAULT_MERGE_ROWS: usize = 200_000;

type Reply = oneshot::Sender<Result<Committed, CommitError>>;

/// What a put adds to the state summary apart from its resource number: the SHA-256 of
/// its sealed bytes, and the sums of the postings it adds and of those it replaces.
#[derive(Default)]
pub(crate) struct PutDigest {
    pub(crate) sealed: [u8; 32],
    pub(crate) postings_new: crate::integrity::Sum,
    pub(crate) postings_old: crate::integrity::Sum,
}

impl PutDigest {
    pub(crate) fn of(put: &Put, integ: Option<&Integrity>) -> PutDigest {
        let row = &put.row;
        let mut d = PutDigest {
            sealed: super::state::sealed_digest(&row.sealed),
            ..PutDigest::default()
        };
        if let Some(integ) = integ {
            let sum = |entries: &[IndexEntry]| {
                let mut s = crate::integrity::Sum::default();
                for (ix, token) in postings_of_entries(&row.rtype, entries) {
                    s.add(integ.posting_element(ix, token, &row.rtype, &row.id));
                }
                s
            };
            if !row.deleted {
                d.postings_new = sum(&put.index);
            }
            d.postings_old = sum(&put.replaces);
        }
        d
    }
}

/// What a settings write does: set a value, or decide it from the stored one.
pub(crate) enum MetaChange {
    Set(Vec<u8>),
    Update(crate::MetaUpdate),
}

pub(super) enum Command {
    /// A batch, with what each put adds to the state summary that does not depend on
    /// the writer (hashed on the caller's thread, not the writer's).
    Batch(WriteBatch, Vec<PutDigest>, Reply),
    SetMeta(String, MetaChange, oneshot::Sender<Result<(), StoreError>>),
    /// Catch up with heads another process wrote (a reader found a row it did not know).
    /// (a std channel: readers may wait on it from inside an async runtime, rarely)
    Sync(mpsc::Sender<Result<(), StoreError>>),
    /// Blind-index postings replaced without new versions (a new index scheme).
    Reindex(
        Vec<crate::Reindex>,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
    /// A change of the KEK generations, in the group like a batch (`super::kek`).
    Keys(crate::KeyChange, oneshot::Sender<Result<u64, StoreError>>),
    /// Run in a transaction of its own after the group's batches (`super::erase`).
    Erase(
        crate::Erasure,
        oneshot::Sender<Result<crate::Erased, CommitError>>,
    ),
    /// Install a WAL tap on the writer's connection (`super::tap`).
    Tap(Arc<super::tap::WalTap>, mpsc::Sender<()>),
    /// Begin a read transaction on this connection between two commits and hand it back
    /// with where it is in the tap's stream (a snapshot's start).
    Pin(
        Connection,
        mpsc::Sender<(Connection, Result<SnapshotPoint, StoreError>)>,
    ),
}

/// The writes of [`crate::Store`]: commands queued for the writer.
impl SqliteStore {
    pub(super) fn send(&self, cmd: Command) -> bool {
        match self.tx.lock().as_ref() {
            Some(tx) => tx.send(cmd).is_ok(),
            None => false,
        }
    }

    pub(super) fn submit_meta(&self, key: &str, change: MetaChange) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::SetMeta(key.to_owned(), change, tx)) {
            return Err(StoreError::Closed);
        }
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    pub(super) fn submit_batch(
        &self,
        batch: WriteBatch,
    ) -> oneshot::Receiver<Result<Committed, CommitError>> {
        let (tx, rx) = oneshot::channel();
        let sealed = batch
            .puts
            .iter()
            .map(|p| PutDigest::of(p, self.integ.as_deref()))
            .collect();
        let sender = self.tx.lock();
        let closed = match sender.as_ref() {
            Some(s) => match s.send(Command::Batch(batch, sealed, tx)) {
                Ok(()) => None,
                Err(mpsc::SendError(Command::Batch(_, _, tx))) => Some(tx),
                Err(_) => None,
            },
            None => Some(tx),
        };
        if let Some(tx) = closed {
            let _ = tx.send(Err(CommitError::Store(StoreError::Closed)));
        }
        rx
    }
}

/// How often (at most) a signed checkpoint of the audit tree is written while events come.
pub const CHECKPOINT_INTERVAL_MS: u64 = 2_000;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the writer thread owns besides its connection.
pub(super) struct Writer {
    pub(super) head: ChainHead,
    /// The audit log's Merkle tree, as far as `head`.
    pub(super) frontier: Frontier,
    /// When the last checkpoint was written by this process.
    pub(super) last_checkpoint: Option<std::time::Instant>,
    pub(super) signer: HeadSigner,
    pub(super) pending: Arc<RwLock<Pending>>,
    pub(super) merge_rows: Arc<AtomicUsize>,
    pub(super) idle_merge_ms: Arc<AtomicU64>,
    /// Shortest time between two audit checkpoints (ms).
    pub(super) checkpoint_ms: Arc<AtomicU64>,
    pub(super) wal: WalRestarter,
    /// The integrity keys (see [`crate::integrity`]).
    pub(super) integ: Arc<Integrity>,
    /// The state summary as of `head`.
    pub(super) digests: Digests,
    /// What this process knows it wrote; readers check rows against it.
    pub(super) known: Arc<RwLock<Known>>,
    /// Size of the newest checkpoint written.
    pub(super) checkpointed: u64,
    /// SQLite's `data_version` when this writer last caught up with other processes.
    pub(super) data_version: Option<i64>,
    /// The resources' heads, loading at start: every group waits for them.
    pub(super) heads: Arc<super::heads::HeadsGate>,
}

/// The writer thread: group commits until every sender is gone, then a clean stop.
pub(super) fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Command>, mut w: Writer) {
    let mut staged = Staged::default();
    let mut last_index_write = std::time::Instant::now();
    // (after open: `wal_autocheckpoint` would replace it)
    conn.wal_hook(Some(note_wal_frames));
    loop {
        // no index rows written for a while (audit-only groups do not count): fold the
        // pending rows in, so reads use the B-tree alone
        let idle = std::time::Duration::from_millis(w.idle_merge_ms.load(Ordering::Relaxed));
        if last_index_write.elapsed() >= idle && w.pending.read().len() > 0 {
            merge_or_warn(&mut conn, &w.pending);
            last_index_write = std::time::Instant::now();
            // (the merge is a commit of its own: the tap has it now)
            publish(&w);
        }
        let first = match rx.recv_timeout(idle.min(std::time::Duration::from_secs(1))) {
            Ok(c) => c,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        // erasures run alone, after the batches that queued with them; the tap's
        // commands after both
        let (taps, group): (Vec<_>, Vec<_>) = group
            .into_iter()
            .partition(|c| matches!(c, Command::Tap(..) | Command::Pin(..)));
        let (erasures, group): (Vec<_>, Vec<_>) = group
            .into_iter()
            .partition(|c| matches!(c, Command::Erase(..)));
        if !group.is_empty() {
            commit_group(&mut conn, group, &mut w, &mut staged, &mut last_index_write);
        }
        for e in erasures {
            super::erase::run(&mut conn, e, &mut w);
        }
        publish(&w);
        for t in taps {
            tap_command(t, &w);
        }
    }
    // a clean stop is the longest idle: merge, so the next open has no log to replay
    if w.idle_merge_ms.load(Ordering::Relaxed) != u64::MAX && w.pending.read().len() > 0 {
        merge_or_warn(&mut conn, &w.pending);
    }
    // a clean stop leaves a checkpoint of everything written (a witness gets it at the
    // next start's export, and the next open verifies only what follows it)
    if w.head.size > w.checkpointed
        && let Err(e) = checkpoint_at_stop(&mut conn, &mut w)
    {
        tracing::warn!(error = %e, "no audit checkpoint at stop");
    }
    // free pages (a merged log's, mostly) go back to the filesystem; a database created
    // before auto_vacuum was set ignores this
    incremental_vacuum(&conn);
    publish(&w);
    checkpoint(&conn);
}

/// Publish the commits the tap read (if one is installed) with the audit log's size.
fn publish(w: &Writer) {
    if super::tap::installed().is_some() {
        let resources = w.known.read().heads.len() as u64;
        super::tap::note_head(w.head.size, resources);
    }
}

/// Install a tap, or pin a snapshot's read transaction between two commits.
fn tap_command(cmd: Command, w: &Writer) {
    match cmd {
        Command::Tap(tap, reply) => {
            // the frames in the log now are read at the next commit (from its start)
            super::tap::install(tap);
            publish(w);
            let _ = reply.send(());
        }
        Command::Pin(snap, reply) => {
            let point = match super::tap::installed() {
                None => Err(StoreError::Engine("no WAL tap is installed".into())),
                Some(tap) => snap
                    // a read of the schema starts the read transaction here
                    .execute_batch("BEGIN; SELECT count(*) FROM sqlite_master;")
                    .map(|()| tap.point())
                    .map_err(engine),
            };
            let _ = reply.send((snap, point));
        }
        other => reply(
            other,
            Err(CommitError::Store(StoreError::Engine(
                "not a tap command".into(),
            ))),
        ),
    }
}

/// A checkpoint of the whole log, in a transaction of its own (a clean stop).
fn checkpoint_at_stop(conn: &mut Connection, w: &mut Writer) -> Result<(), StoreError> {
    w.heads.wait()?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(engine)?;
    // another process may have written since: its events are in the tree too
    if let Some(caught) = catch_up(&tx, &w.integ, &mut w.head, &mut w.frontier, &mut w.digests)? {
        apply_caught_up(&w.known, caught);
    }
    let held: i64 = tx
        .query_row(
            "SELECT count(*) FROM audit_checkpoint WHERE size = ?1",
            params![w.head.size as i64],
            |r| r.get(0),
        )
        .map_err(engine)?;
    if held == 0 {
        write_checkpoint(&tx, &w.frontier, &w.signer, &w.integ, &mut w.digests)?;
        // the same head, signed again with the state that counts the checkpoint
        sign_head(
            &tx,
            &w.head,
            &w.integ.seal_state(&w.head, &w.digests),
            &w.signer,
        )?;
    }
    tx.commit().map_err(engine)?;
    w.checkpointed = w.head.size;
    Ok(())
}

/// Record what another process committed in what this process knows.
pub(super) fn apply_caught_up(known: &RwLock<Known>, caught: super::trust::CaughtUp) {
    apply_settings(known, caught.settings);
    if caught.heads.is_empty() {
        return;
    }
    let mut k = known.write();
    for (rtype, id, head) in caught.heads {
        let key = k.key(&rtype, &id);
        k.heads.insert(key, head);
    }
}

/// Record committed settings changes in what this process knows.
pub(super) fn apply_settings(known: &RwLock<Known>, changes: Vec<SettingChange>) {
    if changes.is_empty() {
        return;
    }
    let mut k = known.write();
    for c in changes {
        k.settings.insert(c.key, c.mac);
    }
}

/// Apply and commit one group, then answer its batches; merge the pending index rows once
/// there are enough of them, and restart the WAL once it is long.
fn commit_group(
    conn: &mut Connection,
    mut group: Vec<Command>,
    w: &mut Writer,
    staged: &mut Staged,
    last_index_write: &mut std::time::Instant,
) {
    // nothing is written before the heads are known (and checked)
    if let Err(e) = w.heads.wait() {
        for cmd in group {
            reply(cmd, Err(CommitError::Store(e.clone())));
        }
        return;
    }
    let before = w.head;
    let frontier_before = w.frontier.clone();
    let digests_before = w.digests;
    let mut settings = Vec::new();
    let mut heads = HashMap::new();
    let mut others_wrote = false;
    let checkpoint_due = w.last_checkpoint.is_none_or(|t| {
        t.elapsed().as_millis() >= u128::from(w.checkpoint_ms.load(Ordering::Relaxed))
    });
    let results = {
        // the writer is the only one to change `pending`: reading it here is stable
        let pending = w.pending.read();
        apply_group(
            conn,
            &mut group,
            Audit {
                head: &mut w.head,
                frontier: &mut w.frontier,
                signer: &w.signer,
                checkpoint_due,
                integ: &w.integ,
                digests: &mut w.digests,
                known: &w.known,
                settings: &mut settings,
                heads: &mut heads,
                others_wrote: &mut others_wrote,
                data_version: &mut w.data_version,
            },
            &pending,
            staged,
        )
    };
    if others_wrote {
        // postings another process logged: read the log again
        match super::index::load_pending(conn) {
            Ok(p) => *w.pending.write() = p,
            Err(e) => tracing::error!(error = %e, "the index log could not be read again"),
        }
    }
    if checkpoint_due && w.head.size != before.size && results.is_ok() {
        w.last_checkpoint = Some(std::time::Instant::now());
        w.checkpointed = w.head.size;
    }
    match results {
        Ok(results) => {
            // committed: readers check rows against the new settings and heads before
            // any answer
            apply_settings(&w.known, settings);
            if !heads.is_empty() {
                w.known.write().heads.extend(heads);
            }
            // committed: lookups see the new rows before any batch is acknowledged
            if staged.mark() > 0 {
                *last_index_write = std::time::Instant::now();
                let mut pending = w.pending.write();
                for (row, live) in staged.take() {
                    pending.apply(row, live);
                }
            }
            // a destroyed KEK generation leaves the WAL before it is reported destroyed
            super::kek::after_commit(conn, &group, &results);
            for (cmd, res) in group.into_iter().zip(results) {
                reply(cmd, res);
            }
            if w.pending.read().len() >= w.merge_rows.load(Ordering::Relaxed) {
                merge_or_warn(conn, &w.pending);
            }
            w.wal.after_group(conn);
        }
        Err(e) => {
            staged.take();
            w.head = before;
            w.frontier = frontier_before;
            w.digests = digests_before;
            let msg = e.to_string();
            for cmd in group {
                reply(
                    cmd,
                    Err(CommitError::Store(StoreError::Engine(msg.clone()))),
                );
            }
        }
    }
}

/// Return every free page to the filesystem (each step of the pragma frees one).
fn incremental_vacuum(conn: &Connection) {
    let Ok(mut st) = conn.prepare("PRAGMA incremental_vacuum") else {
        return;
    };
    let Ok(mut rows) = st.query([]) else { return };
    while let Ok(Some(_)) = rows.next() {}
}

fn reply(cmd: Command, res: Result<Committed, CommitError>) {
    match cmd {
        Command::Batch(_, _, tx) => {
            let _ = tx.send(res);
        }
        Command::SetMeta(_, _, tx) => {
            let _ = tx.send(res.map(|_| ()).map_err(CommitError::into_store_error));
        }
        Command::Sync(tx) => {
            let _ = tx.send(res.map(|_| ()).map_err(CommitError::into_store_error));
        }
        Command::Reindex(_, tx) => {
            let _ = tx.send(
                res.map(|c| c.last_audit_seq.unwrap_or(0))
                    .map_err(CommitError::into_store_error),
            );
        }
        Command::Keys(_, tx) => {
            let _ = tx.send(
                res.map(|c| c.last_audit_seq.unwrap_or(0))
                    .map_err(CommitError::into_store_error),
            );
        }
        // (never in a group: the writer loop runs erasures on their own)
        Command::Erase(_, tx) => {
            let _ = tx.send(Err(res.err().unwrap_or(CommitError::Store(
                StoreError::Engine("erasure inside a group".into()),
            ))));
        }
        // (never in a group either: answered by `tap_command`; dropping the reply
        // tells the caller)
        Command::Tap(..) | Command::Pin(..) => {}
    }
}

/// The audit state a group appends to.
struct Audit<'a> {
    head: &'a mut ChainHead,
    frontier: &'a mut Frontier,
    signer: &'a HeadSigner,
    /// Write a signed checkpoint of the tree if the group appends events.
    checkpoint_due: bool,
    integ: &'a Integrity,
    digests: &'a mut Digests,
    known: &'a RwLock<Known>,
    /// Settings rows the group changed, applied to `known` once it commits.
    settings: &'a mut Vec<SettingChange>,
    /// Resources' heads the group changed, likewise.
    heads: &'a mut HashMap<u128, Head>,
    /// Set when another process wrote resources since this writer's last group (their
    /// index postings are then read again from the log).
    others_wrote: &'a mut bool,
    /// SQLite's `data_version` when this writer last caught up.
    data_version: &'a mut Option<i64>,
}

/// Apply a group in one transaction; per-command results, or an error that failed them all.
fn apply_group(
    conn: &mut Connection,
    group: &mut [Command],
    audit: Audit<'_>,
    pending: &Pending,
    staged: &mut Staged,
) -> Result<Vec<Result<Committed, CommitError>>, StoreError> {
    let Audit {
        head,
        frontier,
        signer,
        checkpoint_due,
        integ,
        digests,
        known,
        settings,
        heads: heads_out,
        others_wrote,
        data_version,
    } = audit;
    // immediate: the head read below is still the newest when this group appends to it
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(engine)?;
    // another connection committed since this one last looked (SQLite's data_version
    // moves only for others' commits; reading it costs no I/O): catch up with its heads
    let version: i64 = tx
        .prepare_cached("PRAGMA data_version")
        .and_then(|mut st| st.query_row([], |r| r.get(0)))
        .map_err(engine)?;
    if *data_version != Some(version) {
        if data_version.is_some() {
            super::tap::note_foreign_commit();
        }
        if let Some(caught) = catch_up(&tx, integ, head, frontier, digests)? {
            *others_wrote |= !caught.heads.is_empty();
            apply_caught_up(known, caught);
        }
        *data_version = Some(version);
    }
    let known = known.read();
    let mut gs = GroupState {
        integ,
        digests,
        known: &known,
        heads: HashMap::new(),
        undo: Vec::new(),
    };
    let start_size = head.size;
    let start_digests = *gs.digests;
    let mut versions_written = false;
    let mut leaves = Vec::new();
    let group_mark = staged.mark();
    let mut results = Vec::with_capacity(group.len());
    for cmd in group.iter_mut() {
        let res = match cmd {
            Command::Batch(batch, sealed, _) => {
                let saved = *head;
                let mark = staged.mark();
                let state_mark = gs.mark();
                leaves.clear();
                run_cached(&tx, "SAVEPOINT b")?;
                let applied = apply_batch(
                    &tx,
                    (batch, sealed),
                    head,
                    &mut leaves,
                    (pending, staged),
                    &mut gs,
                );
                match applied {
                    Ok(c) => {
                        run_cached(&tx, "RELEASE b")?;
                        versions_written |= !batch.puts.is_empty();
                        // the batch's events join the tree once they are in
                        for l in &leaves {
                            frontier.push(*l);
                        }
                        Ok(c)
                    }
                    Err(e) => {
                        *head = saved;
                        staged.rollback_to(mark);
                        gs.rollback(state_mark);
                        run_cached(&tx, "ROLLBACK TO b")?;
                        run_cached(&tx, "RELEASE b")?;
                        Err(e)
                    }
                }
            }
            Command::SetMeta(k, v, _) => {
                let saved = (*head, *gs.digests);
                run_cached(&tx, "SAVEPOINT b")?;
                leaves.clear();
                let value = match v {
                    MetaChange::Set(v) => Ok(Some(v.clone())),
                    MetaChange::Update(f) => {
                        super::trust::stored_setting(&tx, integ, gs.known, settings, k)
                            .map(|cur| f(cur.as_deref()))
                    }
                };
                let r = value
                    .and_then(|value| match value {
                        Some(v) => {
                            put_setting(&tx, integ, gs.known, settings, gs.digests, k, &v).map(Some)
                        }
                        None => Ok(None),
                    })
                    .map_err(CommitError::Store)
                    .and_then(|put| {
                        let Some((change, write)) = put else {
                            return Ok(Committed {
                                last_audit_seq: None,
                            });
                        };
                        let c = append_audit_events(
                            &tx,
                            &[setting_event(vec![write])],
                            head,
                            &mut leaves,
                        )?;
                        settings.push(change);
                        Ok(c)
                    });
                if r.is_ok() {
                    run_cached(&tx, "RELEASE b")?;
                    for l in &leaves {
                        frontier.push(*l);
                    }
                } else {
                    (*head, *gs.digests) = saved;
                    run_cached(&tx, "ROLLBACK TO b")?;
                    run_cached(&tx, "RELEASE b")?;
                }
                r
            }
            Command::Sync(_) => Ok(Committed {
                last_audit_seq: None,
            }),
            Command::Reindex(changes, _) => {
                let mark = staged.mark();
                let state_mark = gs.mark();
                let mut n = 0u64;
                for c in changes.iter() {
                    let key = gs.known.key(&c.rtype, &c.id);
                    let Some(h) = gs.head(key) else { continue };
                    if h.version != c.version || h.deleted {
                        continue;
                    }
                    stage_reindex(&tx, h.rno, c, (pending, staged), &mut gs)?;
                    n += 1;
                }
                if n == 0 {
                    staged.rollback_to(mark);
                    gs.rollback(state_mark);
                    Ok(Committed {
                        last_audit_seq: Some(0),
                    })
                } else {
                    // an event of its own: the head is signed again with the new state
                    leaves.clear();
                    let ev = super::trust::store_event("reindex", Vec::new());
                    append_audit_events(&tx, &[ev], head, &mut leaves).map(|_| {
                        for l in &leaves {
                            frontier.push(*l);
                        }
                        // (the count travels in the audit sequence field until the reply)
                        Committed {
                            last_audit_seq: Some(n),
                        }
                    })
                }
            }
            Command::Keys(change, _) => {
                run_cached(&tx, "SAVEPOINT b")?;
                let saved = *gs.digests;
                let r = super::kek::apply(&tx, change, integ, gs.digests);
                if r.is_err() {
                    *gs.digests = saved;
                }
                run_cached(
                    &tx,
                    if r.is_ok() {
                        "RELEASE b"
                    } else {
                        "ROLLBACK TO b"
                    },
                )?;
                if r.is_err() {
                    run_cached(&tx, "RELEASE b")?;
                }
                // (the count travels in the audit sequence field until the reply)
                r.map(|n| Committed {
                    last_audit_seq: Some(n),
                })
                .map_err(CommitError::Store)
            }
            // (the writer loop runs erasures on their own: never part of a group)
            Command::Erase(..) => Err(CommitError::Store(StoreError::Engine(
                "erasure inside a group".into(),
            ))),
            Command::Tap(..) | Command::Pin(..) => Err(CommitError::Store(StoreError::Engine(
                "a tap command inside a group".into(),
            ))),
        };
        results.push(res);
    }
    if versions_written {
        // a new resource state: rows readers kept for the old one are stale (crate::rows)
        run_cached(&tx, "UPDATE resource_epoch SET n = n + 1")?;
    }
    let logged = staged.since(group_mark);
    if !logged.is_empty() {
        log_postings(&tx, logged)?;
    }
    let GroupState {
        heads: new_heads,
        digests,
        ..
    } = gs;
    *heads_out = new_heads;
    if head.size != start_size {
        if checkpoint_due {
            write_checkpoint(&tx, frontier, signer, integ, digests)?;
        }
        sign_head(&tx, head, &integ.seal_state(head, digests), signer)?;
    } else if *digests != start_digests && head.size > 0 {
        // rows changed without an event (a KEK generation, rewrapped keys): the same head,
        // signed again with the state that counts them
        sign_head(&tx, head, &integ.seal_state(head, digests), signer)?;
    }
    tx.commit().map_err(engine)?;
    Ok(results)
}

/// One `index_log` record of the postings a group staged (see [`super::index`]).
fn log_postings(
    tx: &rusqlite::Transaction<'_>,
    logged: &[(pending::Row, bool)],
) -> Result<(), StoreError> {
    let mut data = Vec::with_capacity(logged.len() * 18);
    for ((ix, token, rno), live) in logged {
        encode_log_record(&mut data, *ix, *rno, token.bytes(), *live);
    }
    tx.prepare_cached("INSERT INTO index_log (data) VALUES (?1)")
        .and_then(|mut st| st.execute(params![data]))
        .map_err(engine)?;
    Ok(())
}

/// Store the new audit head with the sealed state summary, signed together.
pub(super) fn sign_head(
    tx: &rusqlite::Transaction<'_>,
    head: &ChainHead,
    state: &[u8],
    signer: &HeadSigner,
) -> Result<(), StoreError> {
    let signature = signer(&head.signing_message_with(state));
    tx.prepare_cached(
        "INSERT INTO audit_head (one, size, hash, state, signature) VALUES (1, ?1, ?2, ?3, ?4) \
         ON CONFLICT (one) DO UPDATE SET size = excluded.size, hash = excluded.hash, \
         state = excluded.state, signature = excluded.signature",
    )
    .and_then(|mut st| {
        st.execute(params![
            head.size as i64,
            head.hash.as_slice(),
            state,
            signature
        ])
    })
    .map_err(engine)?;
    Ok(())
}

/// Store a signed checkpoint of the audit log's Merkle tree.
/// Store a signed checkpoint of the audit log's Merkle tree, counted in the state summary
/// (its size, root, time and signature; a checkpoint removed or edited later changes it).
pub(super) fn write_checkpoint(
    tx: &rusqlite::Transaction<'_>,
    frontier: &Frontier,
    signer: &HeadSigner,
    integ: &Integrity,
    digests: &mut Digests,
) -> Result<(), StoreError> {
    // only the newest checkpoint keeps its frontier (what a restart resumes from)
    tx.execute(
        "UPDATE audit_checkpoint SET frontier = x'' \
         WHERE size = (SELECT max(size) FROM audit_checkpoint)",
        [],
    )
    .map_err(engine)?;
    let root = frontier.root();
    let time = now_ms();
    let sig = signer(&merkle::Checkpoint::signing_message(
        frontier.size(),
        &root,
        time,
    ));
    tx.prepare_cached(
        "INSERT INTO audit_checkpoint (size, root, time_ms, signature, frontier) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut st| {
        st.execute(params![
            frontier.size() as i64,
            root.as_slice(),
            time as i64,
            sig,
            frontier.to_bytes()
        ])
    })
    .map_err(engine)?;
    digests
        .body
        .add(integ.checkpoint_element(frontier.size() as i64, &root, time as i64, &sig));
    Ok(())
}

/// Run a statement without results through the statement cache: the savepoint around
/// every batch of a group (one per request, reads' audit events included) was parsed
/// anew each time, on the writer that every request waits for.
fn run_cached(tx: &rusqlite::Transaction<'_>, sql: &str) -> Result<(), StoreError> {
    tx.prepare_cached(sql)
        .and_then(|mut st| st.execute([]))
        .map(|_| ())
        .map_err(engine)
}

/// A group's changes of the state summary and the resources' heads (see
/// [`crate::integrity`]): heads written in the group overlay the ones known, and a batch
/// that rolls back undoes its own.
pub(super) struct GroupState<'a> {
    pub(super) integ: &'a Integrity,
    pub(super) digests: &'a mut Digests,
    pub(super) known: &'a Known,
    /// Heads written in this group (applied to `known` once it commits).
    pub(super) heads: HashMap<u128, Head>,
    undo: Vec<(u128, Option<Head>)>,
}

impl GroupState<'_> {
    fn head(&self, key: u128) -> Option<Head> {
        self.heads
            .get(&key)
            .or_else(|| self.known.heads.get(&key))
            .copied()
    }

    fn set_head(&mut self, key: u128, head: Head) {
        let old = self.heads.insert(key, head);
        self.undo.push((key, old));
    }

    fn mark(&self) -> (usize, Digests) {
        (self.undo.len(), *self.digests)
    }

    fn rollback(&mut self, (len, digests): (usize, Digests)) {
        while self.undo.len() > len {
            if let Some((key, old)) = self.undo.pop() {
                match old {
                    Some(h) => self.heads.insert(key, h),
                    None => self.heads.remove(&key),
                };
            }
        }
        *self.digests = digests;
    }
}

/// Apply one batch in its savepoint: its new data keys, its guards, its versions (with
/// their index changes staged) and its audit events, the first of which commits what
/// the batch stored (a companion event does when the batch brings none).
fn apply_batch(
    tx: &rusqlite::Transaction<'_>,
    (batch, sealed): (&mut WriteBatch, &[PutDigest]),
    head: &mut ChainHead,
    leaves: &mut Vec<merkle::Hash>,
    (pending, staged): (&Pending, &mut Staged),
    gs: &mut GroupState<'_>,
) -> Result<Committed, CommitError> {
    store_new_keys(tx, &batch.new_keys, gs)?;
    check_guards(tx, &batch.guards, pending, staged)?;
    let mut writes = Vec::with_capacity(batch.puts.len());
    for (index, put) in batch.puts.iter().enumerate() {
        let digest = sealed
            .get(index)
            .ok_or(CommitError::Store(StoreError::Engine(
                "a put without its digest".into(),
            )))?;
        writes.push(apply_put(tx, index, put, digest, staged, gs)?);
    }
    if !writes.is_empty() {
        match batch.audit.first_mut() {
            Some(ev) => ev.writes.extend(writes),
            None => batch.audit.push(setting_event(writes)),
        }
    }
    append_audit_events(tx, &batch.audit, head, leaves)
}

/// Store the data keys a batch brings; one stored already must be wrapped the same.
fn store_new_keys(
    tx: &rusqlite::Transaction<'_>,
    keys: &[(String, Vec<u8>)],
    gs: &mut GroupState<'_>,
) -> Result<(), CommitError> {
    let e = |e: rusqlite::Error| CommitError::Store(engine(e));
    for (key_id, wrapped) in keys {
        let existing: Option<Vec<u8>> = tx
            .prepare_cached("SELECT wrapped FROM data_key WHERE key_id = ?1")
            .map_err(e)?
            .query_row(params![key_id], |r| r.get(0))
            .optional()
            .map_err(e)?;
        match existing {
            Some(w) if &w == wrapped => {}
            Some(_) => return Err(CommitError::KeyConflict),
            None => {
                tx.prepare_cached("INSERT INTO data_key (key_id, wrapped) VALUES (?1, ?2)")
                    .map_err(e)?
                    .execute(params![key_id, wrapped])
                    .map_err(e)?;
                gs.digests.body.add(gs.integ.key_element(key_id, wrapped));
            }
        }
    }
    Ok(())
}

/// Refuse the batch if a guard matches.
fn check_guards(
    tx: &rusqlite::Transaction<'_>,
    guards: &[Guard],
    pending: &Pending,
    staged: &mut Staged,
) -> Result<(), CommitError> {
    let e = |e: rusqlite::Error| CommitError::Store(engine(e));
    for (index, guard) in guards.iter().enumerate() {
        match guard {
            Guard::NoMatch {
                rtype,
                tokens,
                except,
            } => {
                let found = matching_ids(tx, rtype, tokens, except.len() + 1, pending, staged)
                    .map_err(e)?;
                if found.iter().any(|id| !except.contains(id)) {
                    return Err(CommitError::Guard { index });
                }
            }
        }
    }
    Ok(())
}

/// Store the version `put` (the `index`th of its batch) if it is the one after the
/// version it expects — and the one before is what this process knows it wrote — stage
/// its index changes, update the state summary and the resource's head; what it stored.
fn apply_put(
    tx: &rusqlite::Transaction<'_>,
    index: usize,
    put: &Put,
    digest: &PutDigest,
    staged: &mut Staged,
    gs: &mut GroupState<'_>,
) -> Result<Write, CommitError> {
    let sealed = &digest.sealed;
    let e = |e: rusqlite::Error| CommitError::Store(engine(e));
    let row = &put.row;
    let found: Option<(i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT version, rno, deleted FROM resource_version WHERE rtype = ?1 AND id = ?2 \
             ORDER BY version DESC LIMIT 1",
        )
        .map_err(e)?
        .query_row(params![row.rtype, DbId(&row.id)], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()
        .map_err(e)?;
    let key = gs.known.key(&row.rtype, &row.id);
    let known = gs.head(key);
    let found = found.map(|(v, rno, d): (i64, i64, i64)| Head {
        rno,
        version: v as u64,
        // (a flag phivault never writes makes it differ from every head known)
        deleted: if d == 0 || d == 1 {
            d == 1
        } else {
            !known.is_some_and(|k| k.deleted)
        },
    });
    if found != known {
        return Err(CommitError::Store(super::trust::tampered(format!(
            "{}/{} is not at the version phivault last wrote (stored {:?}, written {:?})",
            row.rtype,
            row.id,
            found.map(|h| h.version),
            known.map(|h| h.version)
        ))));
    }
    let current = known.map(|h| h.version);
    let ok = match put.expect {
        Expect::Absent => current.is_none(),
        Expect::Version(v) => current == Some(v),
    };
    if !ok || row.version != current.unwrap_or(0) + 1 {
        return Err(CommitError::Conflict { index, current });
    }
    // an erased key's marker wins over whatever `data_key` holds (`super::erase`)
    if super::erase::is_erased(gs.known, &row.key_id) {
        return Err(CommitError::KeyErased);
    }
    let new_head = |rno| Head {
        rno,
        version: row.version,
        deleted: row.deleted,
    };
    // a new resource gets the next resource number (rolled back with its batch)
    let rno = match known {
        None => {
            tx.prepare_cached(
                "INSERT INTO resource_no (id, rtype, version, deleted) VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(e)?
            .execute(params![
                DbId(&row.id),
                row.rtype,
                row.version as i64,
                row.deleted as i64
            ])
            .map_err(e)?;
            tx.last_insert_rowid()
        }
        Some(old) => {
            gs.digests
                .heads
                .sub(gs.integ.head_element(old.rno, &row.rtype, &row.id, old));
            let n = tx
                .prepare_cached("UPDATE resource_no SET version = ?2, deleted = ?3 WHERE rno = ?1")
                .map_err(e)?
                .execute(params![old.rno, row.version as i64, row.deleted as i64])
                .map_err(e)?;
            if n != 1 {
                return Err(CommitError::Store(super::trust::tampered(format!(
                    "{}/{}: its head (resource number {}) was removed",
                    row.rtype, row.id, old.rno
                ))));
            }
            old.rno
        }
    };
    gs.digests.heads.add(
        gs.integ
            .head_element(rno, &row.rtype, &row.id, new_head(rno)),
    );
    gs.set_head(key, new_head(rno));
    let key_no: i64 = tx
        .prepare_cached("SELECT key_no FROM data_key WHERE key_id = ?1")
        .map_err(e)?
        .query_row(params![row.key_id], |r| r.get(0))
        .optional()
        .map_err(e)?
        .ok_or(CommitError::Store(StoreError::Corrupt(
            "version sealed under a data key that is not stored",
        )))?;
    tx.prepare_cached(
        "INSERT INTO resource_version (rtype, id, version, key_no, deleted, updated_ms, sealed, rno) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(e)?
    .execute(params![
        row.rtype,
        DbId(&row.id),
        row.version as i64,
        key_no,
        row.deleted as i64,
        row.updated_ms,
        row.sealed,
        rno
    ])
    .map_err(e)?;
    gs.digests
        .body
        .add(gs.integ.version_element(row, rno, sealed));
    // (the postings it replaces go, its own come: common ones cancel in the sum)
    gs.digests.body.sub(digest.postings_old);
    gs.digests.body.add(digest.postings_new);
    let none = Vec::new();
    let new = if row.deleted { &none } else { &put.index };
    stage_index_changes(rno, &row.rtype, (&put.replaces, new), staged);
    Ok(Write::Version {
        resource_type: row.rtype.clone(),
        resource_id: row.id.clone(),
        version: row.version,
        deleted: row.deleted,
        sealed: *sealed,
    })
}

/// Stage the postings a write of resource number `rno` of `rtype` removes (`old`'s) and
/// adds (`new`'s) (the state summary counts them from the put's [`PutDigest`]).
fn stage_index_changes(
    rno: i64,
    rtype: &str,
    (old, new): (&[IndexEntry], &[IndexEntry]),
    staged: &mut Staged,
) {
    let old = postings_of_entries(rtype, old);
    let new = postings_of_entries(rtype, new);
    // only what changes is logged: an update that keeps a value keeps its posting
    let removed: Vec<(i64, &[u8])> = old
        .iter()
        .filter(|p| new.binary_search(p).is_err())
        .copied()
        .collect();
    let added: Vec<(i64, &[u8])> = new
        .iter()
        .filter(|p| old.binary_search(p).is_err())
        .copied()
        .collect();
    log_index(rno, &removed, &added, staged);
}

/// Stage a reindex of resource number `rno`: each of its old postings that is there goes,
/// each new one that is not comes (so a reindex run again after a crash changes nothing
/// twice), counted in the state summary.
fn stage_reindex(
    tx: &rusqlite::Transaction<'_>,
    rno: i64,
    c: &crate::Reindex,
    (pending, staged): (&Pending, &mut Staged),
    gs: &mut GroupState<'_>,
) -> Result<(), StoreError> {
    let old = postings_of_entries(&c.rtype, &c.old);
    let new = postings_of_entries(&c.rtype, &c.new);
    for (ix, token) in old.iter().filter(|p| new.binary_search(p).is_err()) {
        let tok = Tok::new(token);
        let held = super::lists::token_postings(tx, *ix, &tok, pending, Some(staged))
            .map_err(engine)?
            .binary_search(&rno)
            .is_ok();
        if held {
            gs.digests
                .body
                .sub(gs.integ.posting_element(*ix, token, &c.rtype, &c.id));
            staged.push((*ix, tok, rno), false);
        }
    }
    for (ix, token) in new.iter().filter(|p| old.binary_search(p).is_err()) {
        let tok = Tok::new(token);
        let held = super::lists::token_postings(tx, *ix, &tok, pending, Some(staged))
            .map_err(engine)?
            .binary_search(&rno)
            .is_ok();
        if !held {
            gs.digests
                .body
                .add(gs.integ.posting_element(*ix, token, &c.rtype, &c.id));
            staged.push((*ix, tok, rno), true);
        }
    }
    Ok(())
}

/// Append a batch's audit events to the chain and their leaves to `leaves`.
pub(super) fn append_audit_events(
    tx: &rusqlite::Transaction<'_>,
    events: &[AuditEvent],
    head: &mut ChainHead,
    leaves: &mut Vec<merkle::Hash>,
) -> Result<Committed, CommitError> {
    let e = |e: rusqlite::Error| CommitError::Store(engine(e));
    let mut last_audit_seq = None;
    for ev in events {
        let bytes = ev.encode();
        let hash = head.append(&bytes);
        leaves.push(merkle::leaf_hash(&bytes));
        tx.prepare_cached("INSERT INTO audit_event (seq, event, hash) VALUES (?1, ?2, ?3)")
            .map_err(e)?
            .execute(params![head.size as i64, bytes, hash.as_slice()])
            .map_err(e)?;
        last_audit_seq = Some(head.size);
    }
    Ok(Committed { last_audit_seq })
}

/// The `(index number, token)` pairs of index entries of `rtype`, sorted and distinct.
pub(crate) fn postings_of_entries<'a>(
    rtype: &str,
    entries: &'a [IndexEntry],
) -> Vec<(i64, &'a [u8])> {
    let mut v: Vec<(i64, &[u8])> = entries
        .iter()
        .map(|en| (index_no(rtype, &en.param), en.token.as_slice()))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Stage the postings of resource number `rno` that a write removes and adds (in that
/// order); [`apply_group`] logs what its batches staged in one record.
fn log_index(rno: i64, removed: &[(i64, &[u8])], added: &[(i64, &[u8])], staged: &mut Staged) {
    for (rows, live) in [(removed, false), (added, true)] {
        for (ix, token) in rows {
            staged.push((*ix, Tok::new(token), rno), live);
        }
    }
}
