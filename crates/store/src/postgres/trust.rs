//! What is checked against the signed head: at open (the head's signature and state, the
//! log's end, every settings row and every resource head summed and compared), in the
//! background (`check_state`: everything summed again), and the writes outside a group
//! that change what the summary counts (KEK generations, erasure).

use phivault_audit::ChainHead;
use phivault_audit::merkle::Frontier;

use super::conn::PgConn;
use super::writer::{Chain, Writer, finish_chain, lock_head, put_setting};
use super::{head_mac, version_mac_ok};
use crate::integrity::{Digests, Head, Integrity};
use crate::{CommitError, Erased, Erasure, HeadSigner, KeyChange, StoreError, VersionRow};

pub(super) use crate::sqlite::{setting_event, store_event, tampered};

/// The head as stored, checked: the audit key's signature over it and its sealed state,
/// and the state opening under the master key.
pub(super) fn checked_head(
    integ: &Integrity,
    public: &[u8; 32],
    size: i64,
    hash: Vec<u8>,
    state: Vec<u8>,
    signature: Vec<u8>,
) -> Result<(ChainHead, Digests), StoreError> {
    let head = ChainHead {
        size: u64::try_from(size).map_err(|_| tampered("the audit head's size"))?,
        hash: hash
            .try_into()
            .map_err(|_| tampered("the audit head's hash is not 32 bytes"))?,
    };
    if !phivault_audit::verify_head_signature(&head, &state, public, &signature) {
        return Err(tampered(
            "the signed audit head's signature is not the audit key's",
        ));
    }
    let digests = integ.open_state(&head, &state).ok_or_else(|| {
        tampered("the audit head's state summary does not open under this master key")
    })?;
    Ok((head, digests))
}

/// At open: a new database gets its first head (signed, empty); any other is checked.
/// At open: a new store (`create`) gets its first head (signed, empty); any other is
/// checked. What the node believes of the settings rows, and the log's size, as checked.
pub(super) async fn start(
    c: &mut PgConn,
    integ: &Integrity,
    public: &[u8; 32],
    signer: &HeadSigner,
    create: bool,
) -> Result<(Settings, u64, crate::integrity::Sum), StoreError> {
    c.batch("BEGIN").await?;
    let out = async {
        let row = c
            .query_opt("SELECT 1 FROM audit_head WHERE one = 1 FOR UPDATE", &[])
            .await?;
        if row.is_none() {
            if !create {
                return Err(tampered(
                    "the database has no signed audit head: it was emptied or replaced (only init makes a new store)",
                ));
            }
            first_head(c, integ, signer).await?;
        }
        Ok::<_, StoreError>(())
    }
    .await;
    c.batch(if out.is_ok() { "COMMIT" } else { "ROLLBACK" })
        .await?;
    out?;
    // the checks read one snapshot and lock nothing: other nodes go on writing
    c.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let out = check_at_open(c, integ, public).await;
    c.batch("COMMIT").await?;
    out
}

async fn first_head(
    c: &mut PgConn,
    integ: &Integrity,
    signer: &HeadSigner,
) -> Result<(), StoreError> {
    let held = c
        .query_opt(
            "SELECT 1 FROM resource_version UNION ALL SELECT 1 FROM meta \
             UNION ALL SELECT 1 FROM audit_event UNION ALL SELECT 1 FROM data_key LIMIT 1",
            &[],
        )
        .await?;
    if held.is_some() {
        return Err(tampered(
            "the database holds records, settings or events but no signed audit head (the head was removed)",
        ));
    }
    let head = ChainHead::EMPTY;
    let state = integ.seal_state(&head, &Digests::default());
    let signature = signer(&head.signing_message_with(&state));
    c.execute(
        "INSERT INTO audit_head (one, size, hash, state, signature, frontier) \
         VALUES (1, 0, $1, $2, $3, $4)",
        &[
            &head.hash.as_slice(),
            &state,
            &signature,
            &Frontier::new().to_bytes(),
        ],
    )
    .await?;
    Ok(())
}

async fn check_at_open(
    c: &mut PgConn,
    integ: &Integrity,
    public: &[u8; 32],
) -> Result<(Settings, u64, crate::integrity::Sum), StoreError> {
    let (head, digests) = head_in_snapshot(c, integ, public).await?;
    let last = c
        .query_opt(
            "SELECT seq, hash FROM audit_event ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await?;
    match last {
        None if head.size == 0 => {}
        None => {
            return Err(tampered(format!(
                "the signed audit head names {} events but the log has none",
                head.size
            )));
        }
        Some(r) => {
            let (seq, hash): (i64, &[u8]) = (r.get(0), r.get(1));
            if seq as u64 != head.size || hash != head.hash.as_slice() {
                return Err(tampered(format!(
                    "the audit log ends at event {seq}, not at the signed head's {}",
                    head.size
                )));
            }
        }
    }
    let (found, known) = sums(c, integ, false, &mut || {}).await?;
    if found.settings != digests.settings {
        return Err(tampered(
            "the settings rows differ from the signed state: a row was restored from an older copy, removed or added",
        ));
    }
    if found.heads != digests.heads {
        return Err(tampered(
            "the resources' heads differ from the signed state: a record was rolled back, removed or added",
        ));
    }
    Ok((known, head.size, found.settings))
}

/// The signed head as stored now, checked: its size and the settings sum it signs.
pub(super) async fn signed_head_now(
    c: &mut PgConn,
    integ: &Integrity,
    public: &[u8; 32],
) -> Result<(u64, crate::integrity::Sum), StoreError> {
    let (head, digests) = head_in_snapshot(c, integ, public).await?;
    Ok((head.size, digests.settings))
}

async fn head_in_snapshot(
    c: &mut PgConn,
    integ: &Integrity,
    public: &[u8; 32],
) -> Result<(ChainHead, Digests), StoreError> {
    let r = c
        .query_opt(
            "SELECT size, hash, state, signature FROM audit_head WHERE one = 1",
            &[],
        )
        .await?
        .ok_or_else(|| tampered("the audit head row was removed"))?;
    checked_head(integ, public, r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Sum what the database holds: the settings rows and the heads (each checked against its
/// MAC), and with `body` every version, posting, data key, KEK generation and checkpoint.
/// Every settings row's MAC (each checked), and their sum.
pub(super) async fn settings(
    c: &mut PgConn,
    integ: &Integrity,
) -> Result<(Settings, crate::integrity::Sum), StoreError> {
    let mut known = Settings::new();
    let mut sum = crate::integrity::Sum::default();
    for r in c.query("SELECT k, v, mac FROM meta", &[]).await? {
        let (k, v, mac): (&str, &[u8], &[u8]) = (r.get(0), r.get(1), r.get(2));
        if !integ.setting_ok(k, v, mac) {
            return Err(tampered(format!(
                "settings row {k} is not the one last written (changed outside phivault)"
            )));
        }
        let mut m = [0u8; 32];
        m.copy_from_slice(mac);
        sum.add(integ.setting_element(&m));
        known.insert(k.to_owned(), m);
    }
    Ok((known, sum))
}

/// Settings rows by key: their MACs.
pub(super) type Settings = std::collections::HashMap<String, [u8; 32]>;

/// The settings as a snapshot holds them, checked against the state signed with its head
/// (what a node believes of the settings rows, and how far the log reached).
pub(super) async fn signed_settings(
    c: &mut PgConn,
    integ: &Integrity,
    public: &[u8; 32],
) -> Result<(Settings, u64, crate::integrity::Sum), StoreError> {
    c.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let out = async {
        let (head, signed) = head_in_snapshot(c, integ, public).await?;
        let (known, sum) = settings(c, integ).await?;
        if sum != signed.settings {
            return Err(tampered(
                "the settings rows differ from the signed state: a row was restored from an older copy, removed or added",
            ));
        }
        Ok((known, head.size, sum))
    }
    .await;
    let _ = c.batch("COMMIT").await;
    out
}

/// (and the settings rows' MACs, read on the way)
async fn sums(
    c: &mut PgConn,
    integ: &Integrity,
    body: bool,
    pace: &mut dyn FnMut(),
) -> Result<(Digests, Settings), StoreError> {
    let (known, settings_sum) = settings(c, integ).await?;
    let mut d = Digests {
        settings: settings_sum,
        ..Digests::default()
    };
    for (n, r) in c
        .query(
            "SELECT rtype, id, pkey, rno, version, deleted, mac FROM resource_head",
            &[],
        )
        .await?
        .iter()
        .enumerate()
    {
        let (rtype, id, pkey): (&str, &str, &str) = (r.get(0), r.get(1), r.get(2));
        let head = Head {
            rno: r.get(3),
            version: r.get::<_, i64>(4) as u64,
            deleted: r.get(5),
        };
        if head_mac(integ, rtype, id, pkey, head).as_slice() != r.get::<_, &[u8]>(6) {
            return Err(tampered(format!(
                "{rtype}/{id}: its head row is not the one phivault wrote"
            )));
        }
        d.heads.add(integ.head_element(head.rno, rtype, id, head));
        if n % 4096 == 4095 {
            pace();
        }
    }
    if body {
        sum_body(c, integ, &mut d, pace).await?;
    }
    Ok((d, known))
}

async fn sum_body(
    c: &mut PgConn,
    integ: &Integrity,
    d: &mut Digests,
    pace: &mut dyn FnMut(),
) -> Result<(), StoreError> {
    let rows = c
        .query(
            "SELECT v.rtype, v.id, v.version, v.pkey, v.deleted, v.updated_ms, v.sealed, v.mac, \
             coalesce((SELECT h.rno FROM resource_head h WHERE h.rtype = v.rtype AND h.id = v.id \
                       LIMIT 1), -1) \
             FROM resource_version v",
            &[],
        )
        .await?;
    for (n, r) in rows.iter().enumerate() {
        let row = VersionRow {
            rtype: r.get(0),
            id: r.get(1),
            version: r.get::<_, i64>(2) as u64,
            key_id: r.get(3),
            deleted: r.get(4),
            updated_ms: r.get(5),
            sealed: r.get(6),
        };
        if !version_mac_ok(integ, &row, r.get(7)) {
            return Err(tampered(format!(
                "{}/{}: version {} is not the one phivault wrote",
                row.rtype, row.id, row.version
            )));
        }
        let sealed = crate::sqlite::sealed_digest(&row.sealed);
        d.body.add(integ.version_element(&row, r.get(8), &sealed));
        if n % 4096 == 4095 {
            pace();
        }
    }
    drop(rows);
    for r in c
        .query("SELECT rtype, ix, token, id FROM posting", &[])
        .await?
    {
        let (rtype, ix, token, id): (&str, i64, &[u8], &str) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        d.body.add(integ.posting_element(ix, token, rtype, id));
    }
    for r in c.query("SELECT pkey, wrapped FROM data_key", &[]).await? {
        d.body.add(integ.key_element(r.get(0), r.get(1)));
    }
    for r in c
        .query(
            "SELECT generation, wrapped, created_ms FROM kek_generation",
            &[],
        )
        .await?
    {
        d.body.add(integ.kek_element(r.get(0), r.get(1), r.get(2)));
    }
    for r in c
        .query(
            "SELECT size, root, time_ms, signature FROM audit_checkpoint",
            &[],
        )
        .await?
    {
        d.body
            .add(integ.checkpoint_element(r.get(0), r.get(1), r.get(2), r.get(3)));
    }
    Ok(())
}

/// Recompute the whole summary in one snapshot and compare it with the signed one: the
/// kinds of rows that differ.
pub(super) async fn check_state(
    c: &mut PgConn,
    integ: &Integrity,
    public: &[u8; 32],
    pace: &mut dyn FnMut(),
) -> Result<Vec<String>, StoreError> {
    c.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let out = async {
        let (head, signed) = head_in_snapshot(c, integ, public).await?;
        let (found, _) = sums(c, integ, true, pace).await?;
        let mut differ = Vec::new();
        // the log's events numbered 1 to the head's size, none missing or added
        let counted = c
            .query_opt(
                "SELECT count(*), coalesce(max(seq), 0), coalesce(min(seq), 1) FROM audit_event",
                &[],
            )
            .await?;
        if let Some(r) = counted {
            let (n, max, min): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            if n as u64 != head.size || max as u64 != head.size || min != 1 {
                differ.push(format!(
                    "the audit log holds {n} events numbered {min} to {max}, where the signed head counts {} (events removed or added)",
                    head.size
                ));
            }
        }
        if found.settings != signed.settings {
            differ.push("settings rows differ from the signed state".to_owned());
        }
        if found.heads != signed.heads {
            differ.push("resource heads differ from the signed state".to_owned());
        }
        if found.body != signed.body {
            differ.push(
                "stored versions, index postings, data keys, KEK generations or checkpoints differ from the signed state"
                    .to_owned(),
            );
        }
        Ok(differ)
    }
    .await;
    let _ = c.batch("COMMIT").await;
    match out {
        Err(StoreError::Tampered(what)) => Ok(vec![what]),
        other => other,
    }
}

/// Apply a change of the KEK generations inside the group's transaction, counted in the
/// summary; the rows it changed.
pub(super) async fn change_keys(
    c: &mut PgConn,
    integ: &Integrity,
    d: &mut Digests,
    change: &KeyChange,
) -> Result<u64, CommitError> {
    let e = CommitError::Store;
    match change {
        KeyChange::AddKek(row) => {
            let g = i64::from(row.generation);
            let n = c
                .execute(
                    "INSERT INTO kek_generation (generation, wrapped, created_ms) VALUES ($1, $2, $3)",
                    &[&g, &row.wrapped, &row.created_ms],
                )
                .await
                .map_err(e)?;
            d.body
                .add(integ.kek_element(g, &row.wrapped, row.created_ms));
            Ok(n)
        }
        KeyChange::Rewrap(all) => {
            let mut n = 0;
            for r in all {
                let changed = c
                    .execute(
                        "UPDATE data_key SET wrapped = $3 WHERE pkey = $1 AND wrapped = $2",
                        &[&r.key_id, &r.old, &r.new],
                    )
                    .await
                    .map_err(e)?;
                if changed > 0 {
                    d.body.sub(integ.key_element(&r.key_id, &r.old));
                    d.body.add(integ.key_element(&r.key_id, &r.new));
                    n += 1;
                }
            }
            Ok(n)
        }
        KeyChange::DestroyKek { generation, prefix } => {
            let left = c
                .query_opt(
                    "SELECT count(*) FROM data_key WHERE substr(wrapped, 1, $1) = $2",
                    &[&(prefix.len() as i32), prefix],
                )
                .await
                .map_err(e)?
                .map_or(0, |r| r.get::<_, i64>(0));
            if left > 0 {
                return Ok(0);
            }
            let g = i64::from(*generation);
            let row = c
                .query_opt(
                    "DELETE FROM kek_generation WHERE generation = $1 RETURNING wrapped, created_ms",
                    &[&g],
                )
                .await
                .map_err(e)?;
            Ok(match row {
                Some(r) => {
                    d.body.sub(integ.kek_element(g, r.get(0), r.get(1)));
                    1
                }
                None => 0,
            })
        }
    }
}

/// Destroy a data key in a transaction of its own (see [`crate::Erasure`]).
pub(super) async fn erase(w: &mut Writer, er: &Erasure) -> Result<Erased, CommitError> {
    w.conn.batch("BEGIN").await?;
    let out = erase_in(w, er).await;
    match out {
        Ok(done) => {
            w.conn.batch("COMMIT").await?;
            w.last_checkpoint = Some(std::time::Instant::now());
            let settings = std::mem::take(&mut w.pending_settings);
            let (before, after) = w.pending_sums;
            super::writer::believe(w, settings, before, after);
            // old row versions keep the wrapped key until a vacuum reclaims them
            if let Err(e) = w.conn.batch("VACUUM data_key").await {
                tracing::warn!(error = %e, "no vacuum of data_key after an erasure");
            }
            Ok(done)
        }
        Err(e) => {
            let _ = w.conn.batch("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn erase_in(w: &mut Writer, er: &Erasure) -> Result<Erased, CommitError> {
    let c = &mut w.conn;
    let mut chain: Chain = lock_head(c, &w.integ, &w.audit_public).await?;
    let marker = crate::erased_marker_key(&er.key_id);
    if c.query_opt("SELECT 1 FROM meta WHERE k = $1", &[&marker])
        .await?
        .is_some()
    {
        return Err(CommitError::KeyErased);
    }
    let wrapped: Vec<u8> = c
        .query_opt(
            "SELECT wrapped FROM data_key WHERE pkey = $1",
            &[&er.key_id],
        )
        .await?
        .ok_or(CommitError::NoKey)?
        .get(0);
    let resources = c
        .query_opt(
            "SELECT count(*) FROM resource_head WHERE pkey = $1 AND NOT deleted",
            &[&er.key_id],
        )
        .await?
        .map_or(0, |r| r.get::<_, i64>(0)) as u64;
    let removed = c
        .query(
            "DELETE FROM posting WHERE pkey = $1 RETURNING rtype, ix, token, id",
            &[&er.key_id],
        )
        .await?;
    for r in &removed {
        let (rtype, ix, token, id): (&str, i64, &[u8], &str) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        chain
            .digests
            .body
            .sub(w.integ.posting_element(ix, token, rtype, id));
    }
    c.execute(
        "UPDATE data_key SET wrapped = '\\x'::bytea WHERE pkey = $1",
        &[&er.key_id],
    )
    .await?;
    chain
        .digests
        .body
        .sub(w.integ.key_element(&er.key_id, &wrapped));
    chain.digests.body.add(w.integ.key_element(&er.key_id, &[]));
    let write = put_setting(
        c,
        &w.integ,
        &mut chain.digests,
        &w.known,
        &marker,
        &er.marker,
    )
    .await?;
    if let phivault_audit::Write::Setting { key, mac } = &write {
        chain.settings.push((key.clone(), *mac));
    }
    // (the other nodes forget the key they may hold: `Store::erasures_after`)
    c.execute(
        "INSERT INTO erasure_feed (key_id) VALUES ($1)",
        &[&er.key_id],
    )
    .await?;
    let mut audit = er.audit.clone();
    match audit.first_mut() {
        Some(ev) => ev.writes.push(write),
        None => audit.push(setting_event(vec![write])),
    }
    let committed = chain.append(&audit);
    finish_chain(c, &mut chain, &w.signer, &w.integ, true).await?;
    w.pending_settings = std::mem::take(&mut chain.settings);
    w.pending_sums = (chain.start.1.settings, chain.digests.settings);
    Ok(Erased {
        resources,
        postings: removed.len() as u64,
        wal_truncated: false,
        last_audit_seq: committed.last_audit_seq,
    })
}
