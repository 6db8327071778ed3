//! `_include` and `_revinclude`.

use std::collections::HashSet;

use phivault_auth::{Authenticated, Interaction};
use phivault_fhir::search::{Include, SearchQuery};

use super::*;
use crate::access::Access;
use crate::{Error, Vault};

/// `_include` and `_revinclude` (with bounded `:iterate`), limited to types the client may
/// read and to the records its grant on each type reaches (a record of a patient it does
/// not reach is not included, and not decrypted either).
pub(super) fn includes(
    app: &Vault,
    auth: &Authenticated,
    access: &Access,
    matches: &[Loaded],
    q: &SearchQuery,
) -> Result<Vec<Loaded>, Error> {
    if q.include.is_empty() && q.revinclude.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen: HashSet<(String, String)> = matches
        .iter()
        .map(|m| (m.row.rtype.clone(), m.row.id.clone()))
        .collect();
    // the client's grant on each included type, decided once per type
    let mut grants: std::collections::HashMap<String, Option<Access>> = Default::default();
    let mut readable = |t: &str| -> Option<Access> {
        grants
            .entry(t.to_owned())
            .or_insert_with(|| {
                access
                    .for_type(app, Some(auth), t, Interaction::Read)
                    .or_else(|_| access.for_type(app, Some(auth), t, Interaction::Search))
                    .ok()
            })
            .clone()
    };
    let mut out: Vec<Loaded> = Vec::new();
    let mut frontier: Vec<Loaded> = matches.to_vec();
    for round in 0..=MAX_ITERATE {
        let active = |i: &&Include| if round == 0 { true } else { i.iterate };
        let incs: Vec<&Include> = q.include.iter().filter(active).collect();
        let revs: Vec<&Include> = q.revinclude.iter().filter(active).collect();
        if incs.is_empty() && revs.is_empty() {
            break;
        }
        let mut added = Vec::new();
        for m in &frontier {
            for inc in incs.iter().filter(|i| i.source_type == m.row.rtype) {
                for v in search::extract(inc.param, &m.json) {
                    let SearchValue::Reference {
                        rtype: Some(t),
                        id: Some(id),
                        ..
                    } = v
                    else {
                        continue;
                    };
                    if inc.target_type.as_ref().is_some_and(|tt| *tt != t)
                        || seen.contains(&(t.clone(), id.clone()))
                    {
                        continue;
                    }
                    let Some(target) = readable(&t) else {
                        continue;
                    };
                    let row = app.engine.store().current(&t, &id).map_err(unavailable)?;
                    if let Some(l) = open_row(app, &target, row)? {
                        seen.insert((t, id));
                        added.push(l);
                    }
                }
            }
            for rev in &revs {
                if rev
                    .target_type
                    .as_ref()
                    .is_some_and(|tt| *tt != m.row.rtype)
                {
                    continue;
                }
                let Some(source) = readable(&rev.source_type) else {
                    continue;
                };
                let crit =
                    reference_criterion(rev.param, &m.row.rtype, std::slice::from_ref(&m.row.id));
                let plan = Plan::new(app, Some(auth), &source, None, &[crit])?;
                for l in plan.all(app, MAX_INCLUDED)? {
                    if seen.insert((l.row.rtype.clone(), l.row.id.clone())) {
                        added.push(l);
                    }
                }
            }
            if out.len() + added.len() > MAX_INCLUDED {
                return Err(too_costly(
                    "_include/_revinclude would add too many resources; narrow the search",
                ));
            }
        }
        if added.is_empty() {
            break;
        }
        out.extend(added.iter().cloned());
        frontier = added;
    }
    Ok(out)
}
