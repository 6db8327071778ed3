//! Search over encrypted records.
//!
//! A query is answered in two steps. The blind index yields *candidates*: the resources
//! whose keyed, truncated tokens match the query's terms — a superset of the matches
//! (tokens deliberately coincide, dates are bucketed, string prefixes are bounded). Each
//! candidate is then opened and checked with the exact FHIR semantics. Candidates come in
//! the store's id order, so a page needs only as many decryptions as it has candidates
//! before it is full, and a page never decrypts more than [`MAX_EXAMINE`] records: the
//! table is never decrypted to answer a query.
//!
//! Paging cursors are sealed (AEAD under a key derived from the master key) and hold the
//! query, the client it was issued to, an expiry and the position (the last id returned,
//! or the last sort key): `next` links reveal nothing and survive concurrent writes
//! (positions are keys, not offsets).
//!
//! # Design
//!
//! Search is driven by the official R4 SearchParameter definitions (`crates/fhir/data/
//! search-parameters.json.gz`): every `number`, `date`, `string`, `token`, `reference`,
//! `quantity` and `uri` parameter of every resource type whose FHIRPath expression falls in the
//! supported subset (paths, `|`, `as`/`.as()`, `.where(resolve() is T)`, `.where(system=…)`)
//! is indexed on every write; `_id` and `_lastUpdated` use the row itself.
//!
//! **Terms.** `phivault-fhir::search` turns each extracted value into *terms* (byte strings).
//! Every term costs an index row on every write and tells a database thief something, so a
//! value gets as few as keep look-ups selective, and everything else is verified on the
//! decrypted candidates:
//!
//! | type | terms of a value | a query is looked up by |
//! |---|---|---|
//! | string | its first 3 characters, normalised (case, accents and punctuation folded) | default (starts-with) and `:exact`: that prefix of the query; `:contains` and queries shorter than 3 characters: no index (below) |
//! | token | `code` | `code`, `|code` and `system|code` → the code (the system is verified); `system|`, `:text`, `:not`: no index |
//! | reference | `Type/id` (or the URL) | the same, for every allowed target when the type is not given |
//! | date | a value within one UTC day: its day, month and year buckets (*point* terms); a longer one: century, decade, year, month and day buckets of its start and of its end (*span* terms, in a separate index `param~span`, so that the open ranges looked up on them do not collide with the many point tokens); before 1800 / from 2200 one bucket each | the minimal set of aligned buckets covering the range the prefix needs; a `ge`/`lt` pair on one parameter is looked up as one bounded range |
//! | number, quantity | the integer floor | `eq` over the precision interval (units verified); other prefixes: no index |
//! | uri | the value | `:below`/`:above`: no index |
//!
//! Parameters whose values are a subset of a wider parameter's (Observation `patient` ⊂
//! `subject`, `code` ⊂ `combo-code`, Patient `family`/`given` ⊂ `name`, …; derived from the
//! FHIRPath expressions) write nothing and look up the wider index. `:missing` has no presence
//! rows. A criterion without an index look-up narrows nothing: the query's other criteria
//! supply the candidates, or, when none can, the type is scanned in id order a page at a time
//! (at most 5,000 decryptions per page; the next link continues the scan). That is the price
//! of `:contains` without trigrams: an index of every trigram of every name would cost about
//! 20 rows per patient and would hand a thief the length and letter statistics of each name.
//!
//! **Tokens.** The server turns each term into `HMAC-SHA256(K_{Type.param}, term)` truncated
//! to the data directory's token width (`phivault init --index-bits`, default 16; stored in
//! `meta`), with `K_{Type.param}` derived by HKDF from the master key. Truncation makes
//! distinct values share tokens on purpose (DR3's *coincidence*): a token names a set of
//! values, not a value. Each per-parameter key keeps the tokens of the *coarse date terms* it
//! has hashed (year, month, decade, century, the far buckets, open ends; at most 4,096 per key)
//! — a month-window search hashes about thirty of them, the same few hundred over and over —
//! and hashes every other term (a day, a name prefix, a code, an identifier) each time, keeping
//! nothing of it (`search::is_coarse_date_term`, `BlindKey` in `engine.rs`).
//!
//! **Answering.** A query becomes an AND/OR expression over token sets (`Candidates`), which the
//! store evaluates over the segments and pending postings as sorted resource-number lists (see
//! Index segments), after the cursor position, a batch at a time; a look-up in an index that
//! has never held a posting costs no query. A page asks for about as many candidates as it
//! needs (`count + 1`, at least 16, four times more per further batch): each candidate id is a
//! `resource_no` look-up, which readers remember (`Remembered` in the SQLite store, in
//! memory, bounded to 2¹⁸ entries: a committed `resource_no` row is never changed or deleted
//! and a reader sees committed rows only, so a number read once names its id for good; the
//! writer, which sees its own uncommitted rows, does not use it; version rows name their data
//! key by number and readers remember number → key id the same way, so no read joins
//! `data_key`). When the page writes its matches' stored bytes (no includes, sort or
//! `_elements`), a candidate is parsed only as far as its criteria read: the top-level fields
//! their compiled expressions start from (`search::top_fields`, `search::parse_fields`); the
//! rest of the JSON is skipped, not built. Each candidate is opened and checked with the exact FHIR
//! rules (`Criterion::matches`), so truncation, buckets and prefixes only cost decryptions,
//! never wrong answers (`tests/search.rs` runs with 2-bit tokens). One page decrypts at most
//! 5,000 candidates; `_sort`, `_total` and the count alone (`_summary=count`, `_count=0`,
//! with `_total` or `_totalMethod` or without) examine at most 50,000 and refuse wider
//! queries with `too-costly`. A count is exact and counts only what a page would list: the
//! candidates the `Access` admits, verified, none kept. Chains (one level) and `_has` run
//! their inner search first (at most 1,000 matches) and become reference / `_id` criteria;
//! `_include`/`_revinclude` (`:iterate` at most 3 rounds, 1,000 resources) are limited to
//! types the client may read; compartment search adds the CompartmentDefinition's
//! reference parameters as an OR.
//!
//! **Paging.** `next` links carry one opaque `_cursor`: the query, the client it was issued to,
//! an expiry (1 h) and the position (the last id returned, or the last sort key and id), sealed
//! with AES-256-GCM under a key derived from the master key. Another client's cursor, an
//! edited or an expired one is a 400. Positions are keys, not offsets, so pages stay stable
//! under concurrent writes: nothing is repeated, and nothing that existed when the search
//! started and still matches is skipped.
//!
//! **`self` links** list the query as the server applied it
//! (`{base}/{Type}?{SearchQuery::applied}`, or `{base}/Patient/{id}/{Type}?…` when the search
//! was confined to one patient's compartment, by the route or by the access): parameters
//! ignored under lenient handling are not in it, and a POST `_search` gets its GET form. A
//! continued page's `self` is the same query plus the `_cursor` it was asked for: a cursor
//! is accepted beside exactly the parameters it was issued for (in any order), so following
//! `self` repeats that page. Nothing in it is new to the client: its own values, and a
//! cursor sealed for it.
//!
//! **`$everything`** streams the patient's compartment as a searchset Bundle; its audit event
//! (the whole compartment disclosed to that client) is durable before the first byte.
//!
//! **Coincidence check.** `phivault index check --data-dir DIR` reports for every index R (the
//! resources with a value), the coincidence count C = R / 2^bits and the band 2 ≤ C ≤ √R
//! (CipherSweet's planning rule: below 2 a shared token probably means an equal value; above
//! √R the index barely narrows), and exits 1 if an index of at least 64 resources is outside
//! it. Plan the width for the expected population: 16 bits suits 131 thousand to 4 billion
//! resources per index; a development directory with a few hundred patients is *below* the
//! band and says so.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::Kind;
use phivault_auth::{Authenticated, Interaction};
use phivault_fhir::IssueCode;
use phivault_fhir::search::{
    self, Criterion, Lookup, Modifier, ParamType, QueryValue, SearchQuery, SearchValue, Target,
    Total,
};
use phivault_store::{Candidates, VersionRow};
use serde_json::Value;

use crate::Error;
use crate::Vault;
use crate::access::Access;
use crate::engine::key_patient;

mod bundle;
mod conditional;
mod cursor;
mod includes;
mod sort;

pub use bundle::{bundle, write_entry, write_head};
pub use conditional::{CondMatch, Conditional};
pub use cursor::Request;
use cursor::seal_cursor;
use includes::includes;
use sort::{KeyVal, cmp_keys, sort_key};

/// Most records decrypted to fill one page; a page that reaches it is returned partial,
/// with a `next` link that continues after the last record examined.
pub const MAX_EXAMINE: usize = 5_000;
/// Most records examined to count (`_total`, `_summary=count`, `_count=0`) or sort one
/// query.
pub const MAX_FULL_EXAMINE: usize = 50_000;
/// Most matches of the inner query of a chain or `_has`.
pub const MAX_CHAIN_IDS: usize = 1_000;
/// Most resources added to one page by `_include` / `_revinclude`.
pub const MAX_INCLUDED: usize = 1_000;
/// Most rounds of `:iterate`.
pub const MAX_ITERATE: usize = 3;
/// Candidates fetched from the index per round trip.
const CANDIDATE_BATCH: usize = 256;

/// One opened current resource.
#[derive(Clone)]
pub struct Loaded {
    /// Its stored row (without the ciphertext).
    pub row: VersionRow,
    /// Its JSON.
    pub json: Value,
    /// The same JSON as stored (what a read returns), written out as is.
    pub body: Vec<u8>,
}

/// A query ready to run on one type: chains and `_has` resolved into reference and `_id`
/// criteria, the index lookup computed.
struct Plan {
    rtype: String,
    /// The proof every candidate is checked against before it is opened.
    access: Access,
    /// The one patient whose records a compartment search (or `$everything`) lists.
    compartment: Option<String>,
    criteria: Vec<Criterion>,
    /// Explicit ids (from `_id` and `_has`), sorted in store order; None = unrestricted.
    ids: Option<Vec<String>>,
    /// Patient compartment membership of the patients reached: candidates have one of
    /// these (the patient a record belongs to is named in its compartment elements).
    any_of: Vec<Criterion>,
    candidates: Candidates,
    /// The query can match nothing (an empty chain, an empty `_id` intersection).
    empty: bool,
    /// The top-level fields verification reads (None: all): a page that needs nothing
    /// else from its matches parses only these.
    fields: Option<Vec<(String, bool)>>,
}

/// Store order of ids: non-UUID ids (stored as text) before UUIDs (stored as 16 bytes),
/// each in byte order (canonical lower-case UUID text sorts like its bytes).
/// The patients a search names so that every match is in one of their compartments: the
/// values of a plain criterion on one of `rtype`'s Patient-compartment reference
/// parameters when all of them are Patient references (`patient=…`,
/// `subject=Patient/…`), or, searching Patient, the `_id`s. None when no criterion does.
fn pinned_patients(
    rtype: &str,
    criteria: &[Criterion],
    ids: Option<&[String]>,
) -> Option<Vec<String>> {
    if rtype == "Patient" {
        return ids.map(<[String]>::to_vec);
    }
    let compartment = phivault_fhir::patient_compartment_params(rtype);
    criteria.iter().find_map(|c| {
        let Target::Param(def) = &c.target else {
            return None;
        };
        // (a parameter whose values are a subset of a compartment parameter's, such as
        // Observation `patient` of `subject`, names compartment patients too)
        let owner = search::index_owner(def);
        if c.modifier != Modifier::None
            || def.ptype != ParamType::Reference
            || !(compartment.contains(&def.code) || compartment.iter().any(|p| p == owner))
        {
            return None;
        }
        let only_patient = def.targets.len() == 1 && def.targets[0] == "Patient";
        c.values
            .iter()
            .map(|v| match v {
                QueryValue::Reference {
                    rtype: t,
                    id,
                    is_url: false,
                } if t.as_deref() == Some("Patient") || (t.is_none() && only_patient) => {
                    Some(id.clone())
                }
                _ => None,
            })
            .collect::<Option<Vec<String>>>()
    })
}

fn id_order(id: &str) -> (bool, &str) {
    (phivault_audit::uuid_bytes(id).is_some(), id)
}

fn too_costly(msg: &str) -> Error {
    Error::new(Kind::BadRequest, IssueCode::TooCostly, msg)
}

fn unavailable(e: phivault_store::StoreError) -> Error {
    Error::from_store(e)
}

/// Open the current version of a record `access` reaches; None if absent, deleted or
/// not reached.
pub fn load(app: &Vault, access: &Access, id: &str) -> Result<Option<Loaded>, Error> {
    let row = app
        .engine
        .store()
        .current(access.rtype(), id)
        .map_err(unavailable)?;
    open_row(app, access, row)
}

/// Open a current version read earlier; None if absent, deleted or not reached.
fn open_row(
    app: &Vault,
    access: &Access,
    row: Option<VersionRow>,
) -> Result<Option<Loaded>, Error> {
    open_row_fields(app, access, row, None)
}

/// [`open_row`], parsing only the top-level `fields` when given (see `Plan::fields`).
fn open_row_fields(
    app: &Vault,
    access: &Access,
    row: Option<VersionRow>,
    fields: Option<&[(String, bool)]>,
) -> Result<Option<Loaded>, Error> {
    let Some(mut row) = row else {
        return Ok(None);
    };
    if row.deleted || !access.admits_row(&row) {
        return Ok(None);
    }
    // an erased patient's records are in no search, count, include or `$everything`
    let body = match app.engine.open(access, &row) {
        Err(e) if e.is_erased() => return Ok(None),
        r => r?,
    };
    row.sealed = Vec::new();
    let json: Value = match fields {
        Some(f) => search::parse_fields(&body, f),
        None => serde_json::from_slice(&body),
    }
    .map_err(|_| Error::integrity())?;
    Ok(Some(Loaded { row, json, body }))
}

fn reference_criterion(
    def: &'static search::SearchParamDef,
    rtype: &str,
    ids: &[String],
) -> Criterion {
    Criterion {
        target: Target::Param(def),
        modifier: Modifier::None,
        values: ids
            .iter()
            .map(|id| QueryValue::Reference {
                rtype: Some(rtype.to_owned()),
                id: id.clone(),
                is_url: false,
            })
            .collect(),
    }
}

impl Plan {
    /// A plan of `criteria` on `access`'s type, listing only records `access` reaches and,
    /// with `compartment`, only that patient's. `auth` (None for the server's own jobs)
    /// decides the types a chain or `_has` searches.
    fn new(
        app: &Vault,
        auth: Option<&Authenticated>,
        access: &Access,
        compartment: Option<&str>,
        criteria: &[Criterion],
    ) -> Result<Plan, Error> {
        let rtype = access.rtype();
        let mut plan = Plan {
            rtype: rtype.to_owned(),
            access: access.clone(),
            compartment: compartment.map(str::to_owned),
            criteria: Vec::with_capacity(criteria.len()),
            ids: None,
            any_of: Vec::new(),
            candidates: Candidates::All,
            empty: false,
            fields: None,
        };
        let restrict = |plan: &mut Plan, ids: Vec<String>| {
            let set: BTreeSet<String> = ids.into_iter().collect();
            plan.ids = Some(match plan.ids.take() {
                None => set.into_iter().collect(),
                Some(prev) => prev.into_iter().filter(|i| set.contains(i)).collect(),
            });
        };
        for c in criteria {
            match &c.target {
                Target::Chain {
                    reference,
                    target_type,
                    inner,
                } => {
                    // the chained search runs under the client's own grant on its type,
                    // within its reach: its matches, counts and bounds tell nothing about
                    // anyone else
                    let inner_access =
                        access.for_type(app, auth, target_type, Interaction::Search)?;
                    let ids = match_ids(app, auth, &inner_access, std::slice::from_ref(inner))?;
                    if ids.is_empty() {
                        plan.empty = true;
                    }
                    plan.criteria
                        .push(reference_criterion(reference, target_type, &ids));
                }
                Target::Has {
                    rtype: source,
                    reference,
                    inner,
                } => {
                    let source_access = access.for_type(app, auth, source, Interaction::Search)?;
                    let sources =
                        match_all(app, auth, &source_access, std::slice::from_ref(inner))?;
                    let mut ids = Vec::new();
                    for s in &sources {
                        for v in search::extract(reference, &s.json) {
                            if let SearchValue::Reference {
                                rtype: Some(t),
                                id: Some(id),
                                ..
                            } = v
                                && t == rtype
                            {
                                ids.push(id);
                            }
                        }
                    }
                    restrict(&mut plan, ids);
                }
                Target::Id => {
                    let ids = c
                        .values
                        .iter()
                        .filter_map(|v| match v {
                            QueryValue::Token { code: Some(id), .. } => Some(id.clone()),
                            _ => None,
                        })
                        .collect();
                    restrict(&mut plan, ids);
                }
                _ => plan.criteria.push(c.clone()),
            }
        }
        // the patients whose records are listed: a compartment search's (or
        // `$everything`'s) one, else those the access reaches (a patient's own app, a
        // clinician's patients); candidates are narrowed to records naming them, and each
        // is checked by the patient it belongs to before it is opened
        let (patients, shared) = match compartment {
            Some(p) => (Some(vec![p.to_owned()]), false),
            None => match access.reach() {
                Some(r) => (Some(r.patients.iter().cloned().collect()), r.shared),
                None => (None, false),
            },
        };
        // the patients whose per-patient tokens are looked up: those a criterion names,
        // else those the search is confined to
        let pinned = pinned_patients(rtype, &plan.criteria, plan.ids.as_deref())
            .or_else(|| patients.clone());
        if let Some(patients) = patients {
            if rtype == "Patient" {
                restrict(&mut plan, patients.clone());
            }
            for p in phivault_fhir::patient_compartment_params(rtype) {
                if let Some(def) = search::search_param(rtype, p)
                    && def.ptype == ParamType::Reference
                {
                    plan.any_of
                        .push(reference_criterion(def, "Patient", &patients));
                }
            }
            if patients.is_empty() {
                plan.empty = true;
            }
            if rtype != "Patient" && plan.any_of.is_empty() {
                if shared {
                    // not a compartment type: records outside any compartment are reached
                } else {
                    return Err(Error::new(
                        Kind::BadRequest,
                        IssueCode::NotSupported,
                        "this resource type is not in the Patient compartment",
                    ));
                }
            }
        }
        let mut lookup = search::lookup_terms(&plan.criteria);
        if !plan.any_of.is_empty() && rtype != "Patient" {
            let any = Lookup::Or(
                plan.any_of
                    .iter()
                    .map(|c| search::lookup_terms(std::slice::from_ref(c)))
                    .collect(),
            );
            lookup = Lookup::And(vec![lookup, any]);
        }
        plan.candidates = app.engine.candidates(rtype, &lookup, pinned.as_deref());
        plan.fields = plan
            .criteria
            .iter()
            .map(Criterion::top_fields)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        if let Some(ids) = &mut plan.ids {
            ids.sort_by(|a, b| id_order(a).cmp(&id_order(b)));
            if ids.is_empty() {
                plan.empty = true;
            }
        }
        Ok(plan)
    }

    /// The next candidate ids after `after`, at most `n`.
    fn next_candidates(
        &self,
        app: &Vault,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<String>, Error> {
        if self.empty {
            return Ok(Vec::new());
        }
        match &self.ids {
            Some(ids) => Ok(ids
                .iter()
                .filter(|i| after.is_none_or(|a| id_order(i) > id_order(a)))
                .take(n)
                .cloned()
                .collect()),
            None => app
                .engine
                .store()
                .candidates(&self.rtype, &self.candidates, after, n)
                .map_err(unavailable),
        }
    }

    /// Open a candidate and check it exactly.
    fn verify(&self, app: &Vault, id: &str) -> Result<Option<Loaded>, Error> {
        let row = app
            .engine
            .store()
            .current(&self.rtype, id)
            .map_err(unavailable)?;
        self.verify_row(app, row)
    }

    /// [`Plan::verify`] of a current version read earlier.
    fn verify_row(&self, app: &Vault, row: Option<VersionRow>) -> Result<Option<Loaded>, Error> {
        self.verify_row_fields(app, row, false)
    }

    /// [`Plan::verify_row`]; with `partial`, the match's JSON holds only the fields
    /// verification read (for pages that use nothing else of it).
    fn verify_row_fields(
        &self,
        app: &Vault,
        row: Option<VersionRow>,
        partial: bool,
    ) -> Result<Option<Loaded>, Error> {
        let fields = if partial {
            self.fields.as_deref()
        } else {
            None
        };
        // the patient a record belongs to decides, before it is opened (the one rule)
        let row = row.filter(|r| {
            self.compartment
                .as_deref()
                .is_none_or(|p| key_patient(&r.key_id) == Some(p))
        });
        let Some(l) = open_row_fields(app, &self.access, row, fields)? else {
            return Ok(None);
        };
        let ok = self.criteria.iter().all(|c| c.matches(&l.json));
        Ok(ok.then_some(l))
    }

    /// Every match (bounded by [`MAX_FULL_EXAMINE`] records examined and `max` matches).
    fn all(&self, app: &Vault, max: usize) -> Result<Vec<Loaded>, Error> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        let mut examined = 0;
        loop {
            let batch = self.next_candidates(app, after.as_deref(), CANDIDATE_BATCH)?;
            let Some(last) = batch.last().cloned() else {
                return Ok(out);
            };
            for id in &batch {
                examined += 1;
                if let Some(l) = self.verify(app, id)? {
                    out.push(l);
                    if out.len() > max {
                        return Err(too_costly(
                            "the search matches too many resources for this operation; narrow it",
                        ));
                    }
                }
            }
            if examined >= MAX_FULL_EXAMINE {
                return Err(too_costly(
                    "the search examines too many resources for this operation; narrow it",
                ));
            }
            after = Some(last);
        }
    }

    /// The number of matches, examining at most [`MAX_FULL_EXAMINE`] candidates: each is
    /// checked as a page's are (the one rule on its row before it is opened, then the
    /// exact criteria, on the fields they read), and none is kept.
    fn count(&self, app: &Vault) -> Result<usize, Error> {
        let mut n = 0;
        let mut examined = 0;
        let mut after: Option<String> = None;
        loop {
            let batch = self.next_candidates(app, after.as_deref(), CANDIDATE_BATCH)?;
            let Some(last) = batch.last().cloned() else {
                return Ok(n);
            };
            examined += batch.len();
            if examined > MAX_FULL_EXAMINE {
                return Err(too_costly(
                    "the search examines too many resources for this operation; narrow it",
                ));
            }
            let rows = app
                .engine
                .store()
                .current_many(&self.rtype, &batch)
                .map_err(unavailable)?;
            for row in rows {
                if self.verify_row_fields(app, row, true)?.is_some() {
                    n += 1;
                }
            }
            after = Some(last);
        }
    }
}

/// Every match of `criteria` that `access` reaches (bounded by [`MAX_CHAIN_IDS`]).
fn match_all(
    app: &Vault,
    auth: Option<&Authenticated>,
    access: &Access,
    criteria: &[Criterion],
) -> Result<Vec<Loaded>, Error> {
    Plan::new(app, auth, access, None, criteria)?.all(app, MAX_CHAIN_IDS)
}

/// The patients (the compartments their records are sealed under) of the `rtype` records
/// whose reference parameter `param` names `target_type/target_id`, each match decrypted
/// and verified (at most [`MAX_FULL_EXAMINE`] examined).
pub fn patients_referencing(
    app: &Vault,
    rtype: &str,
    param: &str,
    target_type: &str,
    target_id: &str,
) -> Result<BTreeSet<String>, Error> {
    Ok(referencing(app, rtype, param, target_type, target_id)?
        .iter()
        .filter_map(|l| key_patient(&l.row.key_id).map(str::to_owned))
        .collect())
}

/// The `rtype` records whose reference parameter `param` names the local resource
/// `target_type/target_id`, decrypted and verified (at most [`MAX_FULL_EXAMINE`] examined).
///
/// Local means written relative (`Type/id`, optionally versioned), as every reference to
/// this server is stored (writes make references to its own base relative): reference
/// search compares type and id whatever the base, so a record naming another server's
/// `…/Practitioner/{id}` would match too, and must not count as naming ours.
pub fn referencing(
    app: &Vault,
    rtype: &str,
    param: &str,
    target_type: &str,
    target_id: &str,
) -> Result<Vec<Loaded>, Error> {
    let def = search::search_param(rtype, param)
        .filter(|d| d.ptype == ParamType::Reference)
        .ok_or_else(Error::internal)?;
    let crit = reference_criterion(def, target_type, &[target_id.to_owned()]);
    // the server's own look-up (treatment relationships)
    let access = Access::internal(rtype, Interaction::Search);
    let local = format!("{target_type}/{target_id}");
    let names_local = |l: &Loaded| {
        search::extract(def, &l.json).iter().any(|v| match v {
            SearchValue::Reference { url, .. } => {
                url == &local
                    || url
                        .strip_prefix(local.as_str())
                        .is_some_and(|rest| rest.starts_with("/_history/"))
            }
            _ => false,
        })
    };
    let mut found = Plan::new(app, None, &access, None, &[crit])?.all(app, MAX_FULL_EXAMINE)?;
    found.retain(names_local);
    Ok(found)
}

fn match_ids(
    app: &Vault,
    auth: Option<&Authenticated>,
    access: &Access,
    criteria: &[Criterion],
) -> Result<Vec<String>, Error> {
    Ok(match_all(app, auth, access, criteria)?
        .into_iter()
        .map(|l| l.row.id)
        .collect())
}

/// One page of results.
pub struct Page {
    /// Matches.
    pub matches: Vec<Loaded>,
    /// Resources added by `_include` / `_revinclude`.
    pub included: Vec<Loaded>,
    /// Total matches, when asked for.
    pub total: Option<usize>,
    /// Sealed cursor of the next page.
    pub next: Option<String>,
    /// Warnings (lenient handling).
    pub warnings: Vec<phivault_fhir::Issue>,
    /// The parsed query.
    pub query: SearchQuery,
    /// The sealed cursor this page continued from (for its `self` link).
    pub cursor: Option<String>,
}

/// Parse a request's query (400 on any problem in strict mode).
pub fn parse(req: &Request) -> Result<SearchQuery, Error> {
    if !phivault_fhir::is_known_resource_type(&req.rtype) {
        return Err(Error::not_found("unknown resource type"));
    }
    search::parse_search(&req.rtype, &req.pairs, req.lenient).map_err(Error::invalid)
}

/// Run one page of a search (blocking: call from a blocking thread): only records
/// `access` reaches (and of the URL's compartment patient, when there is one).
pub fn run(
    app: &Vault,
    auth: &Authenticated,
    access: &Access,
    req: &Request,
    q: SearchQuery,
) -> Result<Page, Error> {
    if access.rtype() != req.rtype {
        return Err(Error::forbidden());
    }
    let plan = Plan::new(
        app,
        Some(auth),
        access,
        req.compartment.as_deref(),
        &q.criteria,
    )?;
    let count = q.count;
    // `_summary=count` and `_count=0` ask for the total alone
    let count_only = q.count_only();
    let want_total = count_only || q.total != Total::None;
    let mut total = None;
    let mut matches = Vec::new();
    let mut next_pos: Option<(Option<String>, Option<Vec<KeyVal>>)> = None;
    if count_only {
        total = Some(plan.count(app)?);
    } else if !q.sort.is_empty() {
        let mut all = plan.all(app, MAX_FULL_EXAMINE)?;
        let mut keyed: Vec<(Vec<KeyVal>, Loaded)> =
            all.drain(..).map(|l| (sort_key(&q.sort, &l), l)).collect();
        keyed.sort_by(|a, b| cmp_keys(&q.sort, (&a.0, &a.1.row.id), (&b.0, &b.1.row.id)));
        if want_total {
            total = Some(keyed.len());
        }
        let start = match (&req.after_key, &req.after) {
            (Some(k), Some(id)) => keyed.partition_point(|(kk, l)| {
                cmp_keys(&q.sort, (kk, &l.row.id), (k, id)) != std::cmp::Ordering::Greater
            }),
            _ => 0,
        };
        let start = start.min(keyed.len());
        let end = (start + count).min(keyed.len());
        let has_more = end < keyed.len();
        let page: Vec<(Vec<KeyVal>, Loaded)> = keyed.drain(start..end).collect();
        if has_more && let Some((k, l)) = page.last() {
            next_pos = Some((Some(l.row.id.clone()), Some(k.clone())));
        }
        matches = page.into_iter().map(|(_, l)| l).collect();
    } else {
        if want_total {
            total = Some(plan.count(app)?);
        }
        let mut after = req.after.clone();
        let mut examined = 0;
        // candidates come as ids, each one a look-up for the store: ask for about
        // what the page needs first (most candidates match), more if they do not
        let mut want = (count + 1).clamp(16, CANDIDATE_BATCH);
        // the page writes its matches' stored bytes: unless includes, sorting or
        // `_elements` read them, a match's JSON only serves verification
        let partial = q.include.is_empty()
            && q.revinclude.is_empty()
            && q.sort.is_empty()
            && q.elements.is_none();
        'page: loop {
            let batch = plan.next_candidates(app, after.as_deref(), want)?;
            want = (want * 4).min(CANDIDATE_BATCH);
            if batch.is_empty() {
                break;
            }
            // rows are read a few at a time: as many as the page still needs
            let mut rest = batch.as_slice();
            while !rest.is_empty() {
                if matches.len() == count {
                    // full, and candidates are left unverified: a next page, which
                    // may turn out empty (cheaper than decrypting one more per page)
                    let last = matches.last().map(|m: &Loaded| m.row.id.clone());
                    next_pos = Some((last, None));
                    break 'page;
                }
                let take = (count - matches.len())
                    .min(MAX_EXAMINE - examined)
                    .clamp(1, rest.len());
                let (ids, tail) = rest.split_at(take);
                rest = tail;
                let rows = app
                    .engine
                    .store()
                    .current_many(&plan.rtype, ids)
                    .map_err(unavailable)?;
                for row in rows {
                    examined += 1;
                    if let Some(l) = plan.verify_row_fields(app, row, partial)? {
                        matches.push(l);
                    }
                }
                if examined >= MAX_EXAMINE {
                    // a partial page: continue after the last record examined
                    next_pos = ids.last().map(|id| (Some(id.clone()), None));
                    break 'page;
                }
            }
            after = batch.last().cloned();
        }
    }
    let included = if count_only {
        Vec::new()
    } else {
        includes(app, auth, access, &matches, &q)?
    };
    let next = match next_pos {
        Some((a, k)) => Some(seal_cursor(app, auth, req, a, k)?),
        None => None,
    };
    let warnings = q.warnings.clone();
    Ok(Page {
        matches,
        included,
        total,
        next,
        warnings,
        query: q,
        cursor: req.cursor.clone(),
    })
}

/// Audit entities of a page: every resource disclosed.
pub fn entities(page: &Page) -> Vec<phivault_audit::Entity> {
    page.matches
        .iter()
        .chain(page.included.iter())
        .map(|l| phivault_audit::Entity {
            action: phivault_audit::Action::R,
            resource_type: l.row.rtype.clone(),
            resource_id: l.row.id.clone(),
            version: Some(l.row.version),
            patient: key_patient(&l.row.key_id).map(str::to_owned),
        })
        .collect()
}

/// Visit every record of `access`'s type that belongs to `patient` and `access` reaches
/// (for `$everything`). Ok(false) when `visit` stopped it (the receiver went away).
pub fn stream_compartment(
    app: &Vault,
    access: &Access,
    patient: &str,
    visit: &mut dyn FnMut(Streamed) -> bool,
) -> Result<bool, Error> {
    let plan = Plan::new(app, None, access, Some(patient), &[])?;
    let mut after: Option<String> = None;
    loop {
        let batch = plan.next_candidates(app, after.as_deref(), CANDIDATE_BATCH)?;
        let Some(last) = batch.last().cloned() else {
            return Ok(true);
        };
        for id in &batch {
            let item = match plan.verify(app, id) {
                Ok(Some(l)) => Streamed::Record(l),
                Ok(None) => continue,
                // a damaged record is reported in its place; the rest is still listed
                Err(e) if e.is_integrity() => Streamed::Damaged {
                    rtype: access.rtype().to_owned(),
                    id: id.clone(),
                },
                Err(e) => return Err(e),
            };
            if !visit(item) {
                return Ok(false);
            }
        }
        after = Some(last);
    }
}

/// One entry of a streamed compartment.
pub enum Streamed {
    /// A record of the compartment.
    Record(Loaded),
    /// A record that failed its integrity check: reported, never returned.
    Damaged {
        /// Its type.
        rtype: String,
        /// Its id.
        id: String,
    },
}

/// Shared pointer for blocking sections.
pub type AppRef = Arc<Vault>;
