//! What the store trusts of its own file (see [`crate::integrity`]): the checks at open,
//! the MAC'd writes of settings rows, and catching up with heads another process holding
//! the keys wrote.
//!
//! At open the store refuses, naming the reason: a signed head whose signature or state
//! summary does not verify; a log that does not end at its signed head, or whose events
//! since the newest checkpoint do not chain to it; a checkpoint whose stored tree does not
//! have its signed root; events without a head, a head without events, and records or
//! settings without any log; a settings row without a valid MAC; settings rows whose sum
//! differs from the signed one (a row restored from an older copy, removed or added).
//! A database written before stores had MACs is adopted once: only when its head is a
//! valid first-form signature of the audit key over the log's end, or it has no head and
//! holds nothing but the key check value and the index width (what `init` writes).

use phivault_audit::merkle::{self, Frontier};
use phivault_audit::{Action, AuditEvent, ChainHead, Detail, Outcome, Write};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::engine;
use crate::StoreError;
use crate::integrity::{Digests, Head, Integrity, Known};

/// A refusal at open or on a read: what storage holds is not what the store wrote.
pub(crate) fn tampered(what: impl Into<String>) -> StoreError {
    StoreError::Tampered(what.into())
}

/// Settings rows `init` writes before any log exists (adopted from older databases).
const INIT_ROWS: [&str; 2] = ["key_check_value", "search.index_bits"];

/// What [`load`] found and checked.
pub(super) struct Loaded {
    pub(super) head: ChainHead,
    pub(super) frontier: Frontier,
    pub(super) digests: Digests,
    pub(super) known: Known,
    /// Settings rows of an older database to adopt (MAC and commit) before serving.
    pub(super) adopt: Vec<(String, Vec<u8>)>,
}

/// A checkpoint row: size, root, time, signature, stored tree.
type CheckpointRow = (i64, Vec<u8>, i64, Vec<u8>, Vec<u8>);

/// Settings rows to adopt: key, value.
type Adopt = Vec<(String, Vec<u8>)>;

/// The stored head row: size, hash, state, signature.
type HeadRow = (i64, Vec<u8>, Vec<u8>, Vec<u8>);

pub(super) fn head_row(c: &Connection) -> Result<Option<HeadRow>, StoreError> {
    c.query_row(
        "SELECT size, hash, coalesce(state, x''), signature FROM audit_head WHERE one = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )
    .optional()
    .map_err(engine)
}

fn count(c: &Connection, sql: &str) -> Result<i64, StoreError> {
    c.query_row(sql, [], |r| r.get(0)).map_err(engine)
}

/// Check the file at open (see the module docs). `legacy`: the MAC column was only just
/// added, so the database predates them.
pub(super) fn load(
    c: &Connection,
    integ: &Integrity,
    public: &[u8; 32],
    legacy: bool,
) -> Result<Loaded, StoreError> {
    // (whether there are any: a count would read the whole log at every start)
    let events = count(c, "SELECT EXISTS (SELECT 1 FROM audit_event)")?;
    let (head, digests, adopting) = match head_row(c)? {
        None => {
            if events > 0 {
                return Err(tampered(
                    "the audit log has events but no signed head (the head was removed)",
                ));
            }
            if count(c, "SELECT EXISTS (SELECT 1 FROM resource_version)")? > 0 {
                return Err(tampered(
                    "the store holds records but no audit log (the log was emptied)",
                ));
            }
            let foreign = count(
                c,
                &format!(
                    "SELECT count(*) FROM meta WHERE k NOT IN ('{}', '{}')",
                    INIT_ROWS[0], INIT_ROWS[1]
                ),
            )?;
            let settings = count(c, "SELECT count(*) FROM meta")?;
            if settings > 0 && (!legacy || foreign > 0) {
                return Err(tampered(
                    "the store holds settings rows but no audit log (the log was emptied)",
                ));
            }
            (ChainHead::EMPTY, None, legacy)
        }
        Some((size, hash, state, signature)) => {
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
            if head.size == 0 || events == 0 {
                return Err(tampered(format!(
                    "the signed audit head names {} events but the log has none",
                    head.size
                )));
            }
            if state.is_empty() {
                if !legacy {
                    return Err(tampered("the signed audit head carries no state summary"));
                }
                (head, None, true)
            } else {
                let d = integ.open_state(&head, &state).ok_or_else(|| {
                    tampered("the audit head's state summary does not open under this master key")
                })?;
                (head, Some(d), false)
            }
        }
    };
    check_log_end(c, &head)?;
    let started = std::time::Instant::now();
    let frontier = checked_frontier(c, &head, public)?;
    let log_ms = started.elapsed().as_secs_f64() * 1e3;
    let (known, sum, adopt) = load_settings(c, integ, adopting)?;
    let digests = match digests {
        Some(d) => {
            if d.settings != sum.settings {
                return Err(tampered(
                    "the settings rows differ from the signed state: a row was restored from an older copy, removed or added",
                ));
            }
            // (the heads are checked beside the rest of the start: `super::heads`)
            tracing::debug!(
                log_ms,
                settings = known.settings.len(),
                "the log and settings were checked"
            );
            d
        }
        // (adopted: everything is summed afresh, see `adopt`)
        None => sum,
    };
    Ok(Loaded {
        head,
        frontier,
        digests,
        known,
        adopt,
    })
}

/// The log's last event must be the signed head's.
fn check_log_end(c: &Connection, head: &ChainHead) -> Result<(), StoreError> {
    let last: Option<(i64, Vec<u8>)> = c
        .query_row(
            "SELECT seq, hash FROM audit_event ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(engine)?;
    match last {
        None if head.size == 0 => Ok(()),
        Some((seq, hash)) if seq as u64 == head.size && hash == head.hash => Ok(()),
        Some((seq, _)) => Err(tampered(format!(
            "the audit log ends at event {seq} but its signed head is at event {} (events removed, added or edited)",
            head.size
        ))),
        None => Err(tampered("the audit log is empty but its head is signed")),
    }
}

/// The Merkle tree of the log up to `head`, from the newest checkpoint: the checkpoint
/// is the audit key's, its stored tree has its root, and the events after it chain from
/// the checkpoint's event to the signed head.
fn checked_frontier(
    c: &Connection,
    head: &ChainHead,
    public: &[u8; 32],
) -> Result<Frontier, StoreError> {
    let newest: Option<CheckpointRow> = c
        .query_row(
            "SELECT size, root, time_ms, signature, frontier FROM audit_checkpoint \
             ORDER BY size DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()
        .map_err(engine)?;
    let (mut f, mut chain) = match newest {
        None => (Frontier::new(), ChainHead::EMPTY),
        Some((size, root, time_ms, signature, stored)) => {
            let cp = merkle::Checkpoint {
                size: size as u64,
                root: root.try_into().unwrap_or([0u8; 32]),
                time_ms: time_ms as u64,
                signature,
            };
            if !cp.signature_ok(public) {
                return Err(tampered(format!(
                    "audit checkpoint at {size} is not signed by the audit key"
                )));
            }
            if cp.size > head.size {
                return Err(tampered(format!(
                    "audit checkpoint at {size} is beyond the signed head at {} (the log was cut)",
                    head.size
                )));
            }
            let f = Frontier::from_bytes(&stored)
                .filter(|f| f.size() == cp.size && f.root() == cp.root)
                .ok_or_else(|| {
                    tampered(format!(
                        "the stored tree of audit checkpoint {size} does not have its signed root"
                    ))
                })?;
            let hash: Vec<u8> = c
                .query_row(
                    "SELECT hash FROM audit_event WHERE seq = ?1",
                    params![size],
                    |r| r.get(0),
                )
                .optional()
                .map_err(engine)?
                .ok_or_else(|| tampered(format!("audit event {size} is missing")))?;
            let hash = hash
                .try_into()
                .map_err(|_| tampered(format!("audit event {size}'s hash")))?;
            (
                f,
                ChainHead {
                    size: cp.size,
                    hash,
                },
            )
        }
    };
    extend_chain(
        c,
        &mut chain,
        &mut f,
        "does not chain to the signed head (edited, inserted or removed)",
        |_, _| Ok(()),
    )?;
    if chain != *head {
        return Err(tampered("the audit log does not chain to its signed head"));
    }
    Ok(f)
}

/// Every settings row: its MAC checked (or, adopting an older database, made), the rows
/// known, and their sum.
fn load_settings(
    c: &Connection,
    integ: &Integrity,
    adopting: bool,
) -> Result<(Known, Digests, Adopt), StoreError> {
    let mut known = Known::default();
    let mut d = Digests::default();
    let mut adopt = Vec::new();
    let mut st = c
        .prepare("SELECT k, v, mac FROM meta ORDER BY k")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let k: String = r.get(0).map_err(engine)?;
        let v: Vec<u8> = r.get(1).map_err(engine)?;
        let mac: Option<Vec<u8>> = r.get(2).map_err(engine)?;
        if adopting && mac.is_none() {
            adopt.push((k, v));
            continue;
        }
        let mac = mac
            .filter(|m| integ.setting_ok(&k, &v, m))
            .and_then(|m| <[u8; 32]>::try_from(m).ok())
            .ok_or_else(|| {
                tampered(format!(
                    "settings row {k} has no valid MAC (written outside phivault)"
                ))
            })?;
        d.settings.add(integ.setting_element(&mac));
        known.settings.insert(k, mac);
    }
    if !adopt.is_empty() {
        tracing::warn!(
            rows = adopt.len(),
            "adopting the settings rows of a database written before settings were authenticated"
        );
    }
    Ok((known, d, adopt))
}

/// An audit event of the store's own: settings rows changed outside any request.
pub(crate) fn setting_event(writes: Vec<Write>) -> AuditEvent {
    store_event("setting", writes)
}

/// An audit event of the store's own work (`interaction`: `setting`, `reindex`).
pub(crate) fn store_event(interaction: &str, writes: Vec<Write>) -> AuditEvent {
    let time_ms = super::writer::now_ms();
    AuditEvent {
        time_ms,
        request_id: format!("{interaction}-{time_ms}"),
        client_id: None,
        user: None,
        action: Action::U,
        interaction: interaction.into(),
        resource_type: None,
        resource_id: None,
        version: None,
        patient: None,
        outcome: Outcome::from_http(200),
        source: "phivault".into(),
        entities: Vec::new(),
        detail: Detail::default(),
        writes,
    }
}

/// A settings row's change inside a writer transaction, not yet applied to [`Known`].
pub(super) struct SettingChange {
    pub(super) key: String,
    pub(super) mac: [u8; 32],
}

/// The MAC this process wrote last for settings row `key` (this group's changes first).
fn expected_mac(known: &Known, staged: &[SettingChange], key: &str) -> Option<[u8; 32]> {
    staged
        .iter()
        .rev()
        .find(|s| s.key == key)
        .map(|s| s.mac)
        .or_else(|| known.settings.get(key).copied())
}

/// Settings row `key` as stored, inside the writer's transaction: its MAC must be valid and
/// the one this process wrote last (else the row was changed outside phivault).
pub(super) fn stored_setting(
    tx: &Transaction<'_>,
    integ: &Integrity,
    known: &Known,
    staged: &[SettingChange],
    key: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    let row: Option<(Vec<u8>, Option<Vec<u8>>)> = tx
        .prepare_cached("SELECT v, mac FROM meta WHERE k = ?1")
        .and_then(|mut s| {
            s.query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(engine)?;
    let expected = expected_mac(known, staged, key);
    match row {
        None if expected.is_none() => Ok(None),
        Some((v, Some(mac)))
            if Some(&mac[..]) == expected.as_ref().map(|m| &m[..])
                && integ.setting_ok(key, &v, &mac) =>
        {
            Ok(Some(v))
        }
        _ => Err(tampered(format!(
            "settings row {key} is not the one last written (changed outside phivault)"
        ))),
    }
}

/// Write settings row `key` = `value` with its MAC, after checking the stored row is the
/// one this process knows; update `digests`. The caller commits the returned write in the
/// audit log and applies the change to [`Known`] once committed.
pub(super) fn put_setting(
    tx: &Transaction<'_>,
    integ: &Integrity,
    known: &Known,
    staged: &[SettingChange],
    digests: &mut Digests,
    key: &str,
    value: &[u8],
) -> Result<(SettingChange, Write), StoreError> {
    let stored: Option<Option<Vec<u8>>> = tx
        .prepare_cached("SELECT mac FROM meta WHERE k = ?1")
        .and_then(|mut s| s.query_row(params![key], |r| r.get(0)).optional())
        .map_err(engine)?;
    let expected = expected_mac(known, staged, key);
    let stored = stored.map(|m| m.unwrap_or_default());
    if stored.as_deref() != expected.as_ref().map(|m| &m[..]) {
        return Err(tampered(format!(
            "settings row {key} is not the one last written (changed outside phivault)"
        )));
    }
    if let Some(old) = expected {
        digests.settings.sub(integ.setting_element(&old));
    }
    let mac = integ.setting_mac(key, value);
    digests.settings.add(integ.setting_element(&mac));
    tx.prepare_cached(
        "INSERT INTO meta (k, v, mac) VALUES (?1, ?2, ?3) \
         ON CONFLICT (k) DO UPDATE SET v = excluded.v, mac = excluded.mac",
    )
    .and_then(|mut s| s.execute(params![key, value, mac.as_slice()]))
    .map_err(engine)?;
    Ok((
        SettingChange {
            key: key.to_owned(),
            mac,
        },
        Write::Setting {
            key: key.to_owned(),
            mac,
        },
    ))
}

/// What another process wrote, as its events commit it.
#[derive(Default)]
pub(super) struct CaughtUp {
    pub(super) settings: Vec<SettingChange>,
    /// (type, id, head) of each resource written.
    pub(super) heads: Vec<(String, String, Head)>,
}

/// Another process holding the keys (an administrator's command while the server runs)
/// may have appended to the log since this writer's `head`: take its events — chained from
/// `head`, ending at a head whose state opens under the keys — and what they commit.
/// `None` if nothing changed.
pub(super) fn catch_up(
    c: &Connection,
    integ: &Integrity,
    head: &mut ChainHead,
    frontier: &mut Frontier,
    digests: &mut Digests,
) -> Result<Option<CaughtUp>, StoreError> {
    let Some((size, hash, state, _)) = head_row(c)? else {
        return if head.size == 0 {
            Ok(None)
        } else {
            Err(tampered("the signed audit head was removed"))
        };
    };
    if size as u64 == head.size && hash == head.hash {
        // the same head signed again by another process, with a state that counts what it
        // wrote without events (a checkpoint at its clean stop): that state is the one to
        // extend (it opens only under the integrity key)
        if let Some(d) = integ.open_state(head, &state) {
            *digests = d;
        }
        return Ok(None);
    }
    let mut chain = *head;
    let mut f = frontier.clone();
    let mut out = CaughtUp::default();
    extend_chain(
        c,
        &mut chain,
        &mut f,
        "does not chain to this process's last head",
        |seq, event| {
            let ev = AuditEvent::decode(event)
                .map_err(|_| tampered(format!("audit event {seq} is malformed")))?;
            take_writes(c, seq, ev, &mut out)
        },
    )?;
    if chain.size != size as u64 || chain.hash != hash.as_slice() {
        return Err(tampered("the audit log does not end at its signed head"));
    }
    let d = integ
        .open_state(&chain, &state)
        .ok_or_else(|| tampered("a new audit head's state does not open under this master key"))?;
    *head = chain;
    *frontier = f;
    *digests = d;
    Ok(Some(out))
}

/// The writes event `seq` commits, into `out`: settings changes, and the heads of the
/// versions it wrote (their resource numbers read from the stored versions).
fn take_writes(
    c: &Connection,
    seq: i64,
    ev: AuditEvent,
    out: &mut CaughtUp,
) -> Result<(), StoreError> {
    for w in ev.writes {
        match w {
            Write::Setting { key, mac } => out.settings.push(SettingChange { key, mac }),
            Write::Version {
                resource_type,
                resource_id,
                version,
                deleted,
                ..
            } => {
                let rno: i64 = c
                    .prepare_cached(
                        "SELECT rno FROM resource_version WHERE rtype = ?1 AND id = ?2 AND version = ?3",
                    )
                    .and_then(|mut s| {
                        s.query_row(
                            params![resource_type, super::DbId(&resource_id), version as i64],
                            |r| r.get(0),
                        )
                    })
                    .map_err(|_| {
                        tampered(format!(
                            "{resource_type}/{resource_id} version {version}, committed in event {seq}, is not stored"
                        ))
                    })?;
                out.heads.push((
                    resource_type,
                    resource_id,
                    Head {
                        rno,
                        version,
                        deleted,
                    },
                ));
            }
        }
    }
    Ok(())
}

/// Extend `chain` and `f` over the stored events after `chain`, each checked to chain to
/// the one before (`what` says against what, in the refusal); `visit` sees each.
fn extend_chain(
    c: &Connection,
    chain: &mut ChainHead,
    f: &mut Frontier,
    what: &str,
    mut visit: impl FnMut(i64, &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut st = c
        .prepare_cached("SELECT seq, event, hash FROM audit_event WHERE seq > ?1 ORDER BY seq")
        .map_err(engine)?;
    let mut rows = st.query(params![chain.size as i64]).map_err(engine)?;
    while let Some(r) = rows.next().map_err(engine)? {
        let seq: i64 = r.get(0).map_err(engine)?;
        let event: Vec<u8> = r.get(1).map_err(engine)?;
        let stored: Vec<u8> = r.get(2).map_err(engine)?;
        if seq as u64 != chain.size + 1 || chain.append(&event) != stored.as_slice() {
            return Err(tampered(format!("audit event {seq} {what}")));
        }
        f.push(merkle::leaf_hash(&event));
        visit(seq, &event)?;
    }
    Ok(())
}

/// Finish an open: adopt an older database — give its resources heads, MAC its settings
/// rows, commit every settings row and version in audit events of the store's own, sum
/// everything afresh, sign the head with that state and checkpoint it — or take what
/// [`load`] checked as it is.
pub(super) fn adopt(
    conn: &mut Connection,
    integ: &Integrity,
    signer: &crate::HeadSigner,
    loaded: Loaded,
    legacy: bool,
) -> Result<(ChainHead, Frontier, Digests, Known, bool), StoreError> {
    let Loaded {
        mut head,
        mut frontier,
        digests,
        mut known,
        adopt,
    } = loaded;
    let versions = count(conn, "SELECT EXISTS (SELECT 1 FROM resource_version)")?;
    if !legacy || (adopt.is_empty() && head.size == 0 && versions == 0) {
        return Ok((head, frontier, digests, known, false));
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(engine)?;
    super::state::fill_heads(&tx)?;
    let mut writes = Vec::new();
    for (k, v) in &adopt {
        let mac = integ.setting_mac(k, v);
        tx.execute(
            "UPDATE meta SET mac = ?2 WHERE k = ?1",
            params![k, mac.as_slice()],
        )
        .map_err(engine)?;
        writes.push(Write::Setting {
            key: k.clone(),
            mac,
        });
        known.settings.insert(k.clone(), mac);
    }
    writes.extend(version_writes(&tx)?);
    tracing::warn!(
        settings = adopt.len(),
        rows = writes.len(),
        "adopting a database written before stores were authenticated: its rows are committed in the audit log as found"
    );
    let digests = super::state::recompute(&tx, integ, &mut || {})?;
    known.heads.clear();
    super::state::load_heads(&tx, integ, &mut known)?;
    let mut leaves = Vec::new();
    let events: Vec<AuditEvent> = writes
        .chunks(ADOPT_CHUNK)
        .map(|w| setting_event(w.to_vec()))
        .collect();
    super::writer::append_audit_events(&tx, &events, &mut head, &mut leaves)
        .map_err(crate::CommitError::into_store_error)?;
    for l in leaves {
        frontier.push(l);
    }
    if head.size > 0 {
        let mut digests = digests;
        super::writer::write_checkpoint(&tx, &frontier, signer, integ, &mut digests)?;
        super::writer::sign_head(&tx, &head, &integ.seal_state(&head, &digests), signer)?;
        tx.commit().map_err(engine)?;
        return Ok((head, frontier, digests, known, true));
    }
    tx.commit().map_err(engine)?;
    Ok((head, frontier, digests, known, true))
}

/// Writes one adoption event commits at most.
const ADOPT_CHUNK: usize = 10_000;

/// A commitment of every stored version (adopting an older database).
fn version_writes(c: &Connection) -> Result<Vec<Write>, StoreError> {
    let mut st = c
        .prepare("SELECT rtype, id, version, deleted, sealed FROM resource_version ORDER BY rtype, id, version")
        .map_err(engine)?;
    let mut rows = st.query([]).map_err(engine)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(engine)? {
        let sealed = r
            .get_ref(4)
            .and_then(|v| Ok(v.as_blob()?))
            .map_err(engine)?;
        out.push(Write::Version {
            resource_type: r.get(0).map_err(engine)?,
            resource_id: super::read_id(r, 1).map_err(engine)?,
            version: r.get::<_, i64>(2).map_err(engine)? as u64,
            deleted: super::flag(r, 3).map_err(engine)?,
            sealed: super::state::sealed_digest(sealed),
        });
    }
    Ok(out)
}
