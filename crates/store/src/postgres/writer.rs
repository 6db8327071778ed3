//! Group commit on PostgreSQL, sequenced across nodes by the audit head's row lock.
//!
//! Each node has one writer task with one connection. It takes every command queued while
//! its previous commit was in flight and applies them in one transaction that begins by
//! locking the audit head (`SELECT … FOR UPDATE`): the head, the Merkle frontier and the
//! sealed state summary it reads are the newest, whichever node wrote them, and no other
//! node's group interleaves. A batch that writes rows runs in a savepoint (a failed
//! precondition undoes only it); an audit-only batch (every read's event) needs none.
//! The group's events are inserted in one statement, the head is signed with the new state
//! and frontier, and the transaction commits (`synchronous_commit` on: durable) before any
//! command is answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use phivault_audit::merkle::{self, Frontier};
use phivault_audit::{AuditEvent, ChainHead, Write};
use tokio::sync::{mpsc, oneshot};

use super::conn::PgConn;
use super::{head_mac, version_mac};
use crate::integrity::{Digests, Head, Integrity};
use crate::sqlite::{PutDigest, index_no, postings_of_entries};
use crate::{
    CommitError, Committed, Expect, Guard, HeadSigner, IndexEntry, Put, StoreError, WriteBatch,
};

type Reply = oneshot::Sender<Result<Committed, CommitError>>;

/// Commands taken into one group at most.
const MAX_GROUP: usize = 512;

pub(super) enum Command {
    Batch(WriteBatch, Vec<PutDigest>, Reply),
    SetMeta(
        String,
        crate::sqlite::MetaChange,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    Reindex(
        Vec<crate::Reindex>,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
    Keys(crate::KeyChange, oneshot::Sender<Result<u64, StoreError>>),
    Erase(
        crate::Erasure,
        oneshot::Sender<Result<crate::Erased, CommitError>>,
    ),
}

/// What the writer task owns.
pub(super) struct Writer {
    pub(super) conn: PgConn,
    /// What the node believes of the settings rows (`super::PgStore`): what it writes
    /// goes in once committed.
    pub(super) known: Arc<parking_lot::RwLock<super::trust::Settings>>,
    /// The largest audit head the node saw.
    pub(super) head_seen: Arc<AtomicU64>,
    /// The settings sum the node's beliefs add up to (`super::PgStore`).
    pub(super) known_sum: Arc<parking_lot::Mutex<Option<crate::integrity::Sum>>>,
    /// Settings an erasure wrote, believed once it commits, and the settings sums before
    /// and after it.
    pub(super) pending_settings: Vec<(String, [u8; 32])>,
    pub(super) pending_sums: (crate::integrity::Sum, crate::integrity::Sum),
    /// Where a new connection comes from when this one closes.
    pub(super) pool: Arc<super::conn::Pool>,
    pub(super) signer: HeadSigner,
    pub(super) integ: Arc<Integrity>,
    pub(super) audit_public: [u8; 32],
    /// When this node last wrote a checkpoint.
    pub(super) last_checkpoint: Option<std::time::Instant>,
    pub(super) checkpoint_ms: Arc<AtomicU64>,
}

/// The writer task: group commits until every sender is gone.
pub(super) async fn run(mut rx: mpsc::UnboundedReceiver<Command>, mut w: Writer) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        let (erasures, group): (Vec<_>, Vec<_>) = group
            .into_iter()
            .partition(|c| matches!(c, Command::Erase(..)));
        if !group.is_empty() {
            commit_group(&mut w, group).await;
        }
        for e in erasures {
            if let Command::Erase(er, reply) = e {
                let r = super::trust::erase(&mut w, &er).await;
                let _ = reply.send(r);
            }
        }
    }
}

/// The audit head as locked at the start of a transaction, and what the transaction
/// appends to it.
pub(super) struct Chain {
    pub(super) head: ChainHead,
    pub(super) frontier: Frontier,
    pub(super) digests: Digests,
    /// Settings rows written: (key, MAC), believed once committed.
    pub(super) settings: Vec<(String, [u8; 32])>,
    /// Events appended: (sequence number, bytes, chain hash).
    seqs: Vec<i64>,
    events: Vec<Vec<u8>>,
    hashes: Vec<Vec<u8>>,
    /// The state at the lock (a head re-signed only if it changed).
    pub(super) start: (u64, Digests),
}

impl Chain {
    /// Append `events`; the last one's sequence number.
    pub(super) fn append(&mut self, events: &[AuditEvent]) -> Committed {
        let mut last = None;
        for ev in events {
            let bytes = ev.encode();
            let hash = self.head.append(&bytes);
            self.frontier.push(merkle::leaf_hash(&bytes));
            self.seqs.push(self.head.size as i64);
            self.events.push(bytes);
            self.hashes.push(hash.to_vec());
            last = Some(self.head.size);
        }
        Committed {
            last_audit_seq: last,
        }
    }
}

/// Lock the audit head in the open transaction and check it: the audit key's signature
/// over the head and its sealed state, the state opening under the master key, and the
/// frontier matching the head.
pub(super) async fn lock_head(
    c: &mut PgConn,
    integ: &Integrity,
    public: &[u8; 32],
) -> Result<Chain, StoreError> {
    let row = c
        .query_opt(
            "SELECT size, hash, state, signature, frontier FROM audit_head WHERE one = 1 FOR UPDATE",
            &[],
        )
        .await?
        .ok_or_else(|| super::trust::tampered("the audit head row was removed"))?;
    let (head, digests) = super::trust::checked_head(
        integ,
        public,
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
    )?;
    let frontier = Frontier::from_bytes(row.get(4))
        .filter(|f| f.size() == head.size)
        .ok_or_else(|| super::trust::tampered("the audit head's Merkle frontier"))?;
    Ok(Chain {
        head,
        frontier,
        digests,
        settings: Vec::new(),
        seqs: Vec::new(),
        events: Vec::new(),
        hashes: Vec::new(),
        start: (head.size, digests),
    })
}

/// Insert the appended events, write a checkpoint if `checkpoint`, and sign the head with
/// the new state if anything changed; true if a checkpoint was written.
pub(super) async fn finish_chain(
    c: &mut PgConn,
    chain: &mut Chain,
    signer: &HeadSigner,
    integ: &Integrity,
    checkpoint: bool,
) -> Result<bool, StoreError> {
    if !chain.seqs.is_empty() {
        c.execute(
            "INSERT INTO audit_event (seq, event, hash) \
             SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[])",
            &[&chain.seqs, &chain.events, &chain.hashes],
        )
        .await?;
    }
    let mut wrote_checkpoint = false;
    if checkpoint && chain.head.size != chain.start.0 {
        let root = chain.frontier.root();
        let time = super::now_ms();
        let sig = signer(&merkle::Checkpoint::signing_message(
            chain.frontier.size(),
            &root,
            time,
        ));
        let size = chain.frontier.size() as i64;
        c.execute(
            "INSERT INTO audit_checkpoint (size, root, time_ms, signature) VALUES ($1, $2, $3, $4)",
            &[&size, &root.as_slice(), &(time as i64), &sig],
        )
        .await?;
        chain
            .digests
            .body
            .add(integ.checkpoint_element(size, &root, time as i64, &sig));
        wrote_checkpoint = true;
    }
    if chain.head.size != chain.start.0 || chain.digests != chain.start.1 {
        let state = integ.seal_state(&chain.head, &chain.digests);
        let signature = signer(&chain.head.signing_message_with(&state));
        c.execute(
            "UPDATE audit_head SET size = $1, hash = $2, state = $3, signature = $4, \
             frontier = $5 WHERE one = 1",
            &[
                &(chain.head.size as i64),
                &chain.head.hash.as_slice(),
                &state,
                &signature,
                &chain.frontier.to_bytes(),
            ],
        )
        .await?;
    }
    Ok(wrote_checkpoint)
}

async fn commit_group(w: &mut Writer, mut group: Vec<Command>) {
    let due = w.last_checkpoint.is_none_or(|t| {
        t.elapsed().as_millis() >= u128::from(w.checkpoint_ms.load(Ordering::Relaxed))
    });
    let out = async {
        w.conn.batch("BEGIN").await?;
        let mut chain = lock_head(&mut w.conn, &w.integ, &w.audit_public).await?;
        let results = apply_group(&mut w.conn, &w.integ, &w.known, &mut chain, &mut group).await?;
        let checkpointed = finish_chain(&mut w.conn, &mut chain, &w.signer, &w.integ, due).await?;
        w.conn.batch("COMMIT").await?;
        Ok::<_, StoreError>((
            results,
            checkpointed,
            std::mem::take(&mut chain.settings),
            chain.head.size,
            (chain.start.1.settings, chain.digests.settings),
        ))
    }
    .await;
    match out {
        Ok((results, checkpointed, settings, size, (before, after))) => {
            if checkpointed {
                w.last_checkpoint = Some(std::time::Instant::now());
            }
            believe(w, settings, before, after);
            w.head_seen.fetch_max(size, Ordering::AcqRel);
            for (cmd, res) in group.into_iter().zip(results) {
                reply(cmd, res);
            }
        }
        Err(e) => {
            let _ = w.conn.batch("ROLLBACK").await;
            if w.conn.client.is_closed() {
                // the next group gets a new connection
                match w.pool.connect() {
                    Ok(c) => w.conn = c,
                    Err(re) => tracing::error!(error = %re, "the writer cannot reconnect"),
                }
            }
            for cmd in group {
                reply(cmd, Err(CommitError::Store(e.clone())));
            }
        }
    }
}

/// The node believes the settings it just committed; its beliefs still add up to the
/// signed sum if they did before this transaction (else they are read again when next
/// needed).
pub(super) fn believe(
    w: &Writer,
    settings: Vec<(String, [u8; 32])>,
    before: crate::integrity::Sum,
    after: crate::integrity::Sum,
) {
    let mut sum = w.known_sum.lock();
    let current = *sum == Some(before);
    w.known.write().extend(settings);
    *sum = current.then_some(after);
}

fn reply(cmd: Command, res: Result<Committed, CommitError>) {
    match cmd {
        Command::Batch(_, _, tx) => {
            let _ = tx.send(res);
        }
        Command::SetMeta(_, _, tx) => {
            let _ = tx.send(res.map(|_| ()).map_err(CommitError::into_store_error));
        }
        Command::Reindex(_, tx) | Command::Keys(_, tx) => {
            // (the count travels in the audit sequence field until here)
            let _ = tx.send(
                res.map(|c| c.last_audit_seq.unwrap_or(0))
                    .map_err(CommitError::into_store_error),
            );
        }
        Command::Erase(_, tx) => {
            let _ = tx.send(Err(res.err().unwrap_or(CommitError::Store(
                StoreError::Engine("erasure inside a group".into()),
            ))));
        }
    }
}

/// Apply every command of a group inside the open transaction.
async fn apply_group(
    c: &mut PgConn,
    integ: &Integrity,
    known: &parking_lot::RwLock<super::trust::Settings>,
    chain: &mut Chain,
    group: &mut [Command],
) -> Result<Vec<Result<Committed, CommitError>>, StoreError> {
    let mut results = Vec::with_capacity(group.len());
    for cmd in group.iter_mut() {
        let res = match cmd {
            Command::Batch(batch, digests, _) => {
                if batch.puts.is_empty() && batch.new_keys.is_empty() && batch.guards.is_empty() {
                    // (an audit-only batch cannot fail on its own: no savepoint)
                    Ok(chain.append(&batch.audit))
                } else {
                    in_savepoint(c, chain, async |c, chain| {
                        apply_batch(c, integ, chain, batch, digests).await
                    })
                    .await?
                }
            }
            Command::SetMeta(k, change, _) => {
                in_savepoint(c, chain, async |c, chain| {
                    // the row read and checked once; an update decides on it
                    let stored = checked_setting(c, integ, &chain.digests, known, k).await?;
                    let v = match change {
                        crate::sqlite::MetaChange::Set(v) => v.clone(),
                        crate::sqlite::MetaChange::Update(f) => {
                            match f(stored.as_ref().map(|(v, _)| v.as_slice())) {
                                Some(v) => v,
                                None => {
                                    return Ok(Committed {
                                        last_audit_seq: None,
                                    });
                                }
                            }
                        }
                    };
                    let old = stored.map(|(_, m)| m);
                    let write = write_setting(c, integ, &mut chain.digests, k, old, &v).await?;
                    if let Write::Setting { key, mac } = &write {
                        chain.settings.push((key.clone(), *mac));
                    }
                    Ok(chain.append(&[super::trust::setting_event(vec![write])]))
                })
                .await?
            }
            Command::Reindex(changes, _) => {
                in_savepoint(c, chain, async |c, chain| {
                    let n = reindex(c, integ, &mut chain.digests, changes).await?;
                    if n > 0 {
                        chain.append(&[super::trust::store_event("reindex", Vec::new())]);
                    }
                    Ok(Committed {
                        last_audit_seq: Some(n),
                    })
                })
                .await?
            }
            Command::Keys(change, _) => {
                in_savepoint(c, chain, async |c, chain| {
                    let n = super::trust::change_keys(c, integ, &mut chain.digests, change).await?;
                    Ok(Committed {
                        last_audit_seq: Some(n),
                    })
                })
                .await?
            }
            Command::Erase(..) => Err(CommitError::Store(StoreError::Engine(
                "erasure inside a group".into(),
            ))),
        };
        results.push(res);
    }
    Ok(results)
}

/// Run `f` in a savepoint: on its failure the rows it wrote, the events it appended and
/// its changes of the state summary are undone, and the group goes on.
async fn in_savepoint(
    c: &mut PgConn,
    chain: &mut Chain,
    f: impl AsyncFnOnce(&mut PgConn, &mut Chain) -> Result<Committed, CommitError>,
) -> Result<Result<Committed, CommitError>, StoreError> {
    c.batch("SAVEPOINT b").await?;
    let saved = (
        chain.head,
        chain.frontier.clone(),
        chain.digests,
        chain.seqs.len(),
        chain.settings.len(),
    );
    let r = f(c, chain).await;
    match &r {
        Ok(_) => c.batch("RELEASE b").await?,
        // (PostgreSQL takes statements again after a rollback to the savepoint; if even
        // that fails, the connection is gone and the whole group with it)
        Err(_) => {
            c.batch("ROLLBACK TO b; RELEASE b").await?;
            (chain.head, chain.frontier, chain.digests) = (saved.0, saved.1, saved.2);
            chain.seqs.truncate(saved.3);
            chain.settings.truncate(saved.4);
            chain.events.truncate(saved.3);
            chain.hashes.truncate(saved.3);
        }
    }
    Ok(r)
}

fn store_err(e: StoreError) -> CommitError {
    CommitError::Store(e)
}

async fn apply_batch(
    c: &mut PgConn,
    integ: &Integrity,
    chain: &mut Chain,
    batch: &mut WriteBatch,
    digests: &[PutDigest],
) -> Result<Committed, CommitError> {
    for (key_id, wrapped) in &batch.new_keys {
        let existing = c
            .query_opt("SELECT wrapped FROM data_key WHERE pkey = $1", &[key_id])
            .await
            .map_err(store_err)?;
        match existing {
            Some(r) if r.get::<_, &[u8]>(0) == wrapped.as_slice() => {}
            Some(_) => return Err(CommitError::KeyConflict),
            None => {
                newest_generation(c, wrapped).await?;
                c.execute(
                    "INSERT INTO data_key (pkey, wrapped) VALUES ($1, $2)",
                    &[key_id, wrapped],
                )
                .await
                .map_err(store_err)?;
                chain.digests.body.add(integ.key_element(key_id, wrapped));
            }
        }
    }
    if !batch.guards.is_empty() {
        // (every guard of the batch in one statement: a Bundle of conditional creates
        // brings one a resource)
        let found = super::read::matching_each(&c.client, &batch.guards)
            .await
            .map_err(store_err)?;
        for (index, (guard, found)) in batch.guards.iter().zip(found).enumerate() {
            let Guard::NoMatch { except, .. } = guard;
            if found.iter().any(|id| !except.contains(id)) {
                return Err(CommitError::Guard { index });
            }
        }
    }
    if digests.len() != batch.puts.len() {
        return Err(CommitError::Store(StoreError::Engine(
            "a put without its digest".into(),
        )));
    }
    let writes = if batch.puts.is_empty() {
        Vec::new()
    } else {
        super::puts::apply_puts(c, integ, &mut chain.digests, &batch.puts, digests).await?
    };
    if !writes.is_empty() {
        match batch.audit.first_mut() {
            Some(ev) => ev.writes.extend(writes),
            None => batch.audit.push(super::trust::setting_event(writes)),
        }
    }
    Ok(chain.append(&batch.audit))
}

/// A new data key must be wrapped under the newest KEK generation stored: a node that
/// has not yet seen another node's rotation would otherwise store a key under a generation
/// that rotation is about to destroy (and the key, and every record sealed under it, would
/// be lost). Generation 0 wraps as format 1; generation g ≥ 1 as format 2 with g in the
/// next four bytes (`phivault_crypto::kek_generation_prefix`).
async fn newest_generation(c: &mut PgConn, wrapped: &[u8]) -> Result<(), CommitError> {
    let generation = match wrapped {
        [2, a, b, cc, d, ..] => i64::from(u32::from_be_bytes([*a, *b, *cc, *d])),
        _ => 0,
    };
    let newest: i64 = c
        .query_opt(
            "SELECT coalesce(max(generation), 0) FROM kek_generation",
            &[],
        )
        .await
        .map_err(store_err)?
        .map_or(0, |r| r.get(0));
    if generation < newest {
        return Err(CommitError::Store(StoreError::Engine(format!(
            "a new data key wrapped under KEK generation {generation}, older than the newest \
             ({newest}): this node had not seen the rotation (retry)"
        ))));
    }
    Ok(())
}

/// The head row of a resource as stored, checked against its MAC.
pub(super) async fn stored_head(
    c: &mut PgConn,
    integ: &Integrity,
    rtype: &str,
    id: &str,
) -> Result<Option<(String, Head)>, StoreError> {
    let rows = c
        .query(
            "SELECT pkey, rno, version, deleted, mac FROM resource_head WHERE rtype = $1 AND id = $2",
            &[&rtype, &id],
        )
        .await?;
    if rows.len() > 1 {
        return Err(super::trust::tampered(format!(
            "{rtype}/{id} has {} head rows (one was added outside phivault)",
            rows.len()
        )));
    }
    let Some(r) = rows.first() else {
        return Ok(None);
    };
    let pkey: String = r.get(0);
    let head = Head {
        rno: r.get(1),
        version: r.get::<_, i64>(2) as u64,
        deleted: r.get(3),
    };
    if head_mac(integ, rtype, id, &pkey, head).as_slice() != r.get::<_, &[u8]>(4) {
        return Err(super::trust::tampered(format!(
            "{rtype}/{id}: its head row is not the one phivault wrote"
        )));
    }
    Ok(Some((pkey, head)))
}

pub(super) async fn apply_put(
    c: &mut PgConn,
    integ: &Integrity,
    digests: &mut Digests,
    index: usize,
    put: &Put,
    digest: &PutDigest,
) -> Result<Write, CommitError> {
    let row = &put.row;
    let found = stored_head(c, integ, &row.rtype, &row.id)
        .await
        .map_err(store_err)?;
    let current = found.as_ref().map(|(_, h)| h.version);
    let ok = match put.expect {
        Expect::Absent => current.is_none(),
        Expect::Version(v) => current == Some(v),
    };
    if !ok || row.version != current.unwrap_or(0) + 1 {
        return Err(CommitError::Conflict { index, current });
    }
    let flags = c
        .query_opt(
            "SELECT EXISTS (SELECT 1 FROM data_key WHERE pkey = $1), \
                    EXISTS (SELECT 1 FROM meta WHERE k = $2)",
            &[&row.key_id, &crate::erased_marker_key(&row.key_id)],
        )
        .await
        .map_err(store_err)?;
    let (has_key, erased) = flags.map_or((false, false), |r| (r.get(0), r.get(1)));
    if erased {
        return Err(CommitError::KeyErased);
    }
    if !has_key {
        return Err(CommitError::Store(StoreError::Corrupt(
            "version sealed under a data key that is not stored",
        )));
    }
    let rno = match &found {
        Some((old_pkey, old)) => {
            digests
                .heads
                .sub(integ.head_element(old.rno, &row.rtype, &row.id, *old));
            c.execute(
                "DELETE FROM resource_head WHERE rtype = $1 AND id = $2 AND pkey = $3",
                &[&row.rtype, &row.id, old_pkey],
            )
            .await
            .map_err(store_err)?;
            if *old_pkey != row.key_id {
                // (the resource moved to another data key: its postings follow it)
                c.execute(
                    "UPDATE posting SET pkey = $3 WHERE pkey = $4 AND rtype = $1 AND id = $2",
                    &[&row.rtype, &row.id, &row.key_id, old_pkey],
                )
                .await
                .map_err(store_err)?;
            }
            old.rno
        }
        None => c
            .query_opt("SELECT nextval('resource_no')", &[])
            .await
            .map_err(store_err)?
            .map_or(0, |r| r.get(0)),
    };
    let head = Head {
        rno,
        version: row.version,
        deleted: row.deleted,
    };
    let version = row.version as i64;
    c.execute(
        "INSERT INTO resource_head (rtype, id, pkey, rno, version, deleted, mac) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &row.rtype,
            &row.id,
            &row.key_id,
            &rno,
            &version,
            &row.deleted,
            &head_mac(integ, &row.rtype, &row.id, &row.key_id, head).as_slice(),
        ],
    )
    .await
    .map_err(store_err)?;
    digests
        .heads
        .add(integ.head_element(rno, &row.rtype, &row.id, head));
    c.execute(
        "INSERT INTO resource_version (rtype, id, version, pkey, deleted, updated_ms, sealed, mac) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &row.rtype,
            &row.id,
            &version,
            &row.key_id,
            &row.deleted,
            &row.updated_ms,
            &row.sealed,
            &version_mac(integ, row, &digest.sealed).as_slice(),
        ],
    )
    .await
    .map_err(store_err)?;
    digests
        .body
        .add(integ.version_element(row, rno, &digest.sealed));
    digests.body.sub(digest.postings_old);
    digests.body.add(digest.postings_new);
    let none = Vec::new();
    let new = if row.deleted { &none } else { &put.index };
    change_postings(c, &row.rtype, &row.id, &row.key_id, &put.replaces, new)
        .await
        .map_err(store_err)?;
    Ok(Write::Version {
        resource_type: row.rtype.clone(),
        resource_id: row.id.clone(),
        version: row.version,
        deleted: row.deleted,
        sealed: digest.sealed,
    })
}

/// Remove the postings of `old` that `new` does not hold and add those of `new` that `old`
/// did not (an update that keeps a value keeps its posting).
async fn change_postings(
    c: &mut PgConn,
    rtype: &str,
    id: &str,
    pkey: &str,
    old: &[IndexEntry],
    new: &[IndexEntry],
) -> Result<(), StoreError> {
    let old = postings_of_entries(rtype, old);
    let new = postings_of_entries(rtype, new);
    let (rx, rt): (Vec<i64>, Vec<&[u8]>) = old
        .iter()
        .filter(|p| new.binary_search(p).is_err())
        .copied()
        .unzip();
    let (ax, at): (Vec<i64>, Vec<&[u8]>) = new
        .iter()
        .filter(|p| old.binary_search(p).is_err())
        .copied()
        .unzip();
    if !rx.is_empty() {
        c.execute(
            "DELETE FROM posting WHERE (ix, token, id) IN \
             (SELECT x, t, $1 FROM unnest($2::int8[], $3::bytea[]) AS u(x, t))",
            &[&id, &rx, &rt],
        )
        .await?;
    }
    if !ax.is_empty() {
        c.execute(
            "INSERT INTO posting (ix, token, id, pkey, rtype) \
             SELECT x, t, $1, $2, $3 FROM unnest($4::int8[], $5::bytea[]) AS u(x, t) \
             ON CONFLICT DO NOTHING",
            &[&id, &pkey, &rtype, &ax, &at],
        )
        .await?;
    }
    Ok(())
}

/// Settings row `key` as stored, read inside the group's transaction (which holds the
/// audit head's row lock: no other node writes meanwhile): its value and MAC, the MAC
/// valid, and — when it is not the row this node believes (another node's write, or an
/// older copy put back) — every settings row summing to the signed state (this group's own
/// changes counted) before anything is written over it.
async fn checked_setting(
    c: &mut PgConn,
    integ: &Integrity,
    digests: &Digests,
    known: &parking_lot::RwLock<super::trust::Settings>,
    key: &str,
) -> Result<Option<(Vec<u8>, [u8; 32])>, CommitError> {
    let stored = c
        .query_opt("SELECT v, mac FROM meta WHERE k = $1", &[&key])
        .await
        .map_err(store_err)?;
    let stored = match stored {
        Some(r) => {
            let (v, mac): (Vec<u8>, &[u8]) = (r.get(0), r.get(1));
            if !integ.setting_ok(key, &v, mac) {
                return Err(CommitError::Store(super::trust::tampered(format!(
                    "settings row {key} is not the one last written (changed outside phivault)"
                ))));
            }
            let mut m = [0u8; 32];
            m.copy_from_slice(mac);
            Some((v, m))
        }
        None => None,
    };
    let believed = known.read().get(key).copied();
    if stored.as_ref().map(|(_, m)| *m) != believed {
        let (_, sum) = super::trust::settings(c, integ).await?;
        if sum != digests.settings {
            return Err(CommitError::Store(super::trust::tampered(
                "the settings rows differ from the signed state: a row was restored from an older copy, removed or added",
            )));
        }
    }
    Ok(stored)
}

/// Write settings row `key` = `value` with its MAC after checking the stored row
/// ([`checked_setting`]); update the summary. The write the caller commits in the audit
/// log.
pub(super) async fn put_setting(
    c: &mut PgConn,
    integ: &Integrity,
    digests: &mut Digests,
    known: &parking_lot::RwLock<super::trust::Settings>,
    key: &str,
    value: &[u8],
) -> Result<Write, CommitError> {
    let stored = checked_setting(c, integ, digests, known, key).await?;
    write_setting(c, integ, digests, key, stored.map(|(_, m)| m), value).await
}

/// Write settings row `key` = `value` over the row whose MAC was `old` (checked by the
/// caller in this transaction); update the summary.
async fn write_setting(
    c: &mut PgConn,
    integ: &Integrity,
    digests: &mut Digests,
    key: &str,
    old: Option<[u8; 32]>,
    value: &[u8],
) -> Result<Write, CommitError> {
    if let Some(old) = old {
        digests.settings.sub(integ.setting_element(&old));
    }
    let mac = integ.setting_mac(key, value);
    digests.settings.add(integ.setting_element(&mac));
    c.execute(
        "INSERT INTO meta (k, v, mac) VALUES ($1, $2, $3) \
         ON CONFLICT (k) DO UPDATE SET v = excluded.v, mac = excluded.mac",
        &[&key, &value, &mac.as_slice()],
    )
    .await
    .map_err(store_err)?;
    Ok(Write::Setting {
        key: key.to_owned(),
        mac,
    })
}

/// Replace postings without new versions (a new index scheme): only for resources still
/// at the version named and not deleted.
async fn reindex(
    c: &mut PgConn,
    integ: &Integrity,
    digests: &mut Digests,
    changes: &[crate::Reindex],
) -> Result<u64, CommitError> {
    let mut n = 0u64;
    for ch in changes {
        let Some((pkey, head)) = stored_head(c, integ, &ch.rtype, &ch.id)
            .await
            .map_err(store_err)?
        else {
            continue;
        };
        if head.version != ch.version || head.deleted {
            continue;
        }
        let held: Vec<(i64, Vec<u8>)> = c
            .query(
                "SELECT ix, token FROM posting WHERE pkey = $3 AND rtype = $1 AND id = $2",
                &[&ch.rtype, &ch.id, &pkey],
            )
            .await
            .map_err(store_err)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let has = |e: &IndexEntry| {
            let ix = index_no(&ch.rtype, &e.param);
            held.iter().any(|(x, t)| *x == ix && *t == e.token)
        };
        for e in dedup(&ch.old) {
            if !ch.new.contains(e) && has(e) {
                let ix = index_no(&ch.rtype, &e.param);
                digests
                    .body
                    .sub(integ.posting_element(ix, &e.token, &ch.rtype, &ch.id));
            }
        }
        for e in dedup(&ch.new) {
            if !ch.old.contains(e) && !has(e) {
                let ix = index_no(&ch.rtype, &e.param);
                digests
                    .body
                    .add(integ.posting_element(ix, &e.token, &ch.rtype, &ch.id));
            }
        }
        change_postings(c, &ch.rtype, &ch.id, &pkey, &ch.old, &ch.new)
            .await
            .map_err(store_err)?;
        n += 1;
    }
    Ok(n)
}

fn dedup(entries: &[IndexEntry]) -> Vec<&IndexEntry> {
    let mut out: Vec<&IndexEntry> = Vec::with_capacity(entries.len());
    for e in entries {
        if !out.contains(&e) {
            out.push(e);
        }
    }
    out
}
