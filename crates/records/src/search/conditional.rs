//! Conditional create (`If-None-Exist`): the criteria run as a search, and a store guard
//! when they are a conjunction of single tokens.

use phivault_auth::Interaction;
use phivault_fhir::IssueCode;
use phivault_fhir::search::{self, Criterion, Lookup, Target};
use phivault_store::{Guard, IndexEntry, VersionRow};

use super::{CANDIDATE_BATCH, Loaded, MAX_FULL_EXAMINE, Plan, too_costly};
use crate::access::Access;
use crate::{Error, Kind, Vault};

/// A parsed `If-None-Exist` condition.
pub struct Conditional {
    rtype: String,
    criteria: Vec<Criterion>,
    /// A flat conjunction of single tokens, usable as a store guard.
    guard_tokens: Option<Vec<IndexEntry>>,
}

/// What a conditional create found.
pub enum CondMatch {
    /// Exactly one match.
    One(VersionRow),
    /// None: write with this guard (if the criteria allow one).
    None(Option<Guard>),
}

impl Conditional {
    /// Parse `If-None-Exist` criteria (`identifier=…&…`; result parameters are refused).
    pub fn parse(app: &Vault, rtype: &str, query: &str) -> Result<Conditional, Error> {
        let query = query.split_once('?').map(|(_, q)| q).unwrap_or(query);
        let pairs = crate::engine::form_urlencoded_pairs(query);
        if pairs.is_empty() {
            return Err(Error::bad_request("empty conditional create criteria"));
        }
        if pairs.iter().any(|(k, _)| k.starts_with('_') && k != "_id") {
            return Err(Error::new(
                Kind::BadRequest,
                IssueCode::NotSupported,
                "conditional create criteria take search parameters only",
            ));
        }
        let q = search::parse_search(rtype, &pairs, false).map_err(Error::invalid)?;
        let lookup = search::lookup_terms(&q.criteria);
        let mut guard_tokens = Vec::new();
        let flat = match &lookup {
            Lookup::Terms { .. } => std::slice::from_ref(&lookup),
            Lookup::And(parts) => parts.as_slice(),
            _ => &[],
        };
        let plain = q
            .criteria
            .iter()
            .all(|c| matches!(c.target, Target::Param(_)));
        for part in flat {
            // (a per-patient index has no token a guard could name for every patient)
            if let Lookup::Terms { param, terms } = part
                && terms.len() == 1
                && !app.engine.is_per_patient(rtype, param)
            {
                guard_tokens.push(IndexEntry {
                    param: param.clone(),
                    token: app.engine.term_token(rtype, param, &terms[0]),
                });
            }
        }
        let guard_tokens = (plain && !guard_tokens.is_empty() && guard_tokens.len() == flat.len())
            .then_some(guard_tokens);
        Ok(Conditional {
            rtype: rtype.to_owned(),
            criteria: q.criteria,
            guard_tokens,
        })
    }

    /// A key for the in-process lock that serialises identical conditional creates.
    pub fn lock_key(&self) -> String {
        format!("{:?}", self.criteria)
    }

    /// Find the match (blocking). Several matches → 412.
    pub fn find(&self, app: &Vault) -> Result<CondMatch, Error> {
        // the server's own look-up: conditional creates are refused to confined writers
        let access = Access::internal(&self.rtype, Interaction::Search);
        let plan = Plan::new(app, None, &access, None, &self.criteria)?;
        let mut found: Vec<Loaded> = Vec::new();
        let mut except = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let batch = plan.next_candidates(app, after.as_deref(), CANDIDATE_BATCH)?;
            let Some(last) = batch.last().cloned() else {
                break;
            };
            for id in &batch {
                match plan.verify(app, id)? {
                    Some(l) => found.push(l),
                    None => except.push(id.clone()),
                }
                if found.len() > 1 {
                    return Err(Error::new(
                        Kind::PreconditionFailed,
                        IssueCode::Duplicate,
                        "If-None-Exist criteria match more than one resource",
                    ));
                }
                if except.len() > MAX_FULL_EXAMINE {
                    return Err(too_costly("If-None-Exist criteria are not selective"));
                }
            }
            after = Some(last);
        }
        if let Some(l) = found.pop() {
            return Ok(CondMatch::One(l.row));
        }
        Ok(CondMatch::None(self.guard_tokens.as_ref().map(|t| {
            Guard::NoMatch {
                rtype: self.rtype.clone(),
                tokens: t.clone(),
                except,
            }
        })))
    }
}
