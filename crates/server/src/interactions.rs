//! Record operations of a request, under its [`Access`] proof and audited in its [`Ctx`]:
//! create (with If-None-Exist), update or delete with optimistic retries, read a version.
//! Used by the single-resource handlers and by batch/transaction entries.

use std::sync::Arc;

use axum::http::StatusCode;
use phivault_audit::Action;
use phivault_auth::{Authenticated, Interaction};
use phivault_fhir::IssueCode;
use phivault_records::engine::Batch;
use phivault_store::{CommitError, Expect};
use serde_json::Value;

use crate::error::ApiError;
use crate::respond::check_id;
use crate::state::{App, Ctx, blocking};
use phivault_records::Access;
use phivault_records::engine::{Written, key_patient, now_ms};

/// Outcome of committing a prepared batch.
pub enum Commit {
    /// Durable.
    Done,
    /// A precondition failed; retry or report.
    Conflict(CommitError),
}

/// Submit a batch and classify the outcome.
pub async fn commit(app: &App, batch: Batch) -> Result<Commit, ApiError> {
    // a write of a treatment relationship drops the cached reach of clinicians: before
    // (nothing computed from now on is kept past the write) and after it lands
    let relations = phivault_records::care::Care::touches(batch.puts.iter().map(|p| p.rtype()));
    if relations {
        app.vault.care.invalidate();
    }
    let r = app.vault.engine.submit(batch).await;
    if relations {
        app.vault.care.invalidate();
    }
    match r {
        Ok(Ok(_)) => Ok(Commit::Done),
        Ok(Err(CommitError::Store(_))) | Err(_) => Err(ApiError::unavailable()),
        Ok(Err(e)) => Ok(Commit::Conflict(e)),
    }
}

/// How many times an optimistic write is retried after losing a race.
pub const MAX_RETRIES: usize = 16;

pub(crate) fn conflict_exhausted() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        IssueCode::Conflict,
        "the resource changed concurrently too often; retry",
    )
}

/// Result of a (conditional) create.
pub enum Created {
    /// A new resource.
    New(Written),
    /// If-None-Exist matched this resource; nothing was written.
    Existing(phivault_store::VersionRow),
}

/// Create a resource (already parsed and validated), honouring If-None-Exist criteria.
pub async fn do_create(
    app: &Arc<App>,
    ctx: &mut Ctx,
    access: &Access,
    mut resource: Value,
    if_none_exist: Option<&str>,
) -> Result<Created, ApiError> {
    let rtype = access.rtype();
    let cond = match if_none_exist {
        Some(q) => Some(Arc::new(phivault_records::search::Conditional::parse(
            &app.vault, rtype, q,
        )?)),
        None => None,
    };
    // identical conditional creates queue here (the store guard covers the common
    // identifier case across processes too)
    let lock_key = cond.as_ref().map(|c| c.lock_key()).unwrap_or_default();
    let _cond_lock = match &cond {
        Some(_) => Some(
            app.vault
                .engine
                .lock_resources([("If-None-Exist", lock_key.as_str())])
                .await,
        ),
        None => None,
    };
    for _ in 0..MAX_RETRIES {
        let mut guards = Vec::new();
        if let Some(c) = &cond {
            let (a, c) = (app.clone(), c.clone());
            match blocking(move || Ok(c.find(&a.vault)?)).await? {
                phivault_records::search::CondMatch::None(guard) => guards.extend(guard),
                phivault_records::search::CondMatch::One(cur) => {
                    ctx.id = Some(cur.id.clone());
                    ctx.version = Some(cur.version);
                    ctx.patient = key_patient(&cur.key_id).map(str::to_owned);
                    return Ok(Created::Existing(cur));
                }
            }
        }
        let id = phivault_records::engine::new_id();
        let mut ring = app.vault.engine.key_ring();
        let (put, written) = app.vault.engine.prepare(
            access,
            &mut ring,
            rtype,
            &id,
            1,
            Expect::Absent,
            Some(&mut resource),
            now_ms(),
            None,
        )?;
        let mut event = ctx.event_for(&written, Action::C, ctx.interaction, 201);
        app.vault.mark_glass(std::slice::from_mut(&mut event));
        let batch = Batch {
            new_keys: ring.new_keys(),
            guards,
            puts: vec![put],
            audit: vec![event],
        };
        match commit(app, batch).await? {
            Commit::Done => {
                ring.committed();
                ctx.audited = true;
                ctx.id = Some(id.clone());
                ctx.version = Some(1);
                ctx.patient = written.patient.clone();
                return Ok(Created::New(written));
            }
            Commit::Conflict(CommitError::KeyConflict) => forget_keys(app, &written),
            Commit::Conflict(_) => {}
        }
    }
    Err(conflict_exhausted())
}

/// Drop cached keys a lost key race may have made stale.
pub fn forget_keys(app: &App, w: &Written) {
    match &w.patient {
        Some(p) => app
            .vault
            .engine
            .forget_key(&phivault_records::engine::patient_key_id(p)),
        None => app
            .vault
            .engine
            .forget_key(phivault_records::engine::SHARED_KEY_ID),
    }
}

/// Authorize a create or update; a confined writer (a clinician) gets its reach, and may
/// not write the records that make treatment relationships (Encounter, CareTeam,
/// Appointment): otherwise a break-the-glass window could be turned into lasting access.
pub(crate) fn writer(
    app: &App,
    auth: &Authenticated,
    rtype: &str,
    i: Interaction,
) -> Result<Access, ApiError> {
    let access = app.vault.decide(auth, rtype, i)?;
    if access.is_confined() && phivault_records::care::Care::touches(std::iter::once(rtype)) {
        return Err(ApiError::forbidden());
    }
    Ok(access)
}

/// Write a new version (or tombstone) of an existing-or-new resource, retrying lost races
/// unless the client pinned the version with If-Match. A confined writer updates only a
/// current version of a patient it reaches and never creates by update (a 403 either way,
/// so an id tells nothing about records it does not reach); the engine checks the record
/// it seals.
pub async fn update_or_delete(
    app: &Arc<App>,
    ctx: &mut Ctx,
    access: &Access,
    id: &str,
    mut resource: Option<Value>,
    if_match: Option<u64>,
) -> Result<Written, ApiError> {
    let rtype = access.rtype();
    let deleting = resource.is_none();
    let _locks = app.vault.engine.lock_resources([(rtype, id)]).await;
    for _ in 0..MAX_RETRIES {
        let (a, acc, i) = (app.clone(), access.clone(), id.to_owned());
        // a version the access does not reach comes back as absent
        let cur = blocking(move || Ok(a.vault.engine.current(&acc, &i)?)).await?;
        if access.is_confined() && cur.as_ref().is_none_or(|c| c.deleted) {
            return Err(ApiError::forbidden());
        }
        if let Some(expected) = if_match
            && cur.as_ref().map(|c| c.version) != Some(expected)
        {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                IssueCode::Conflict,
                "If-Match does not match the current version",
            ));
        }
        if deleting {
            match &cur {
                None => return Err(ApiError::not_found("resource not found")),
                Some(c) if c.deleted => {
                    let w = Written::from_row(c);
                    ctx.version = Some(w.version);
                    ctx.patient = w.patient.clone();
                    return Ok(w);
                }
                Some(_) => {}
            }
        }
        let (expect, version) = match &cur {
            Some(c) => (Expect::Version(c.version), c.version + 1),
            None => (Expect::Absent, 1),
        };
        let mut ring = app.vault.engine.key_ring();
        let (put, written) = app.vault.engine.prepare(
            access,
            &mut ring,
            rtype,
            id,
            version,
            expect,
            resource.as_mut(),
            now_ms(),
            cur.as_ref(),
        )?;
        let (action, name, status) = if deleting {
            (Action::D, "delete", 204)
        } else if version == 1 {
            (Action::C, "update-create", 201)
        } else {
            (Action::U, "update", 200)
        };
        let mut event = ctx.event_for(&written, action, name, status);
        app.vault.mark_glass(std::slice::from_mut(&mut event));
        let batch = Batch {
            new_keys: ring.new_keys(),
            guards: Vec::new(),
            puts: vec![put],
            audit: vec![event],
        };
        match commit(app, batch).await? {
            Commit::Done => {
                ring.committed();
                ctx.audited = true;
                ctx.version = Some(version);
                ctx.patient = written.patient.clone();
                return Ok(written);
            }
            Commit::Conflict(CommitError::KeyConflict) => forget_keys(app, &written),
            Commit::Conflict(_) if if_match.is_some() => {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    IssueCode::Conflict,
                    "If-Match does not match the current version",
                ));
            }
            Commit::Conflict(_) => {}
        }
    }
    Err(conflict_exhausted())
}

/// Read the current or a given version of a record `access` reaches: 404 when absent,
/// 410 when deleted. A version of a patient it does not reach is "not found" (before
/// deletion is told or anything is decrypted), so ids of other patients' records reveal
/// nothing.
pub async fn do_read(
    app: &Arc<App>,
    ctx: &mut Ctx,
    access: &Access,
    id: &str,
    version: Option<u64>,
) -> Result<(phivault_store::VersionRow, Vec<u8>), ApiError> {
    check_id(id).map_err(|_| ApiError::not_found("resource not found"))?;
    // A point read by primary key takes microseconds on the page cache: done inline rather
    // than paying a thread hand-off per request.
    let (row, body) = {
        let row = match version {
            None => app.vault.engine.current(access, id)?,
            Some(v) => app.vault.engine.version(access, id, v)?,
        };
        match row {
            None => (None, Vec::new()),
            Some(row) if row.deleted => (Some(row), Vec::new()),
            Some(row) => {
                let body = app.vault.engine.open(access, &row)?;
                (Some(row), body)
            }
        }
    };
    let Some(row) = row else {
        return Err(ApiError::not_found("resource not found"));
    };
    ctx.version = Some(row.version);
    ctx.patient = key_patient(&row.key_id).map(str::to_owned);
    if row.deleted {
        return Err(ApiError::new(
            StatusCode::GONE,
            IssueCode::Deleted,
            "the resource was deleted",
        ));
    }
    Ok((row, body))
}
