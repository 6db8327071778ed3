//! SMART on FHIR scopes (SM1).
//!
//! Grammar (SMART App Launch v2): `(patient|user|system)/(Type|*).[c][r][u][d][s]`, the
//! permission letters in exactly that order, at least one and none repeated, optionally
//! followed by `?param=value(&param=value)*`. The v1 suffixes are mapped: `.read` → `rs`,
//! `.write` → `cud`, `.*` → `cruds`. The non-resource scopes `openid`, `fhirUser`,
//! `launch`, `launch/patient`, `launch/encounter`, `offline_access` and `online_access`
//! are kept as they are. Anything else is rejected, naming the scope's position (never
//! echoing the input).
//!
//! The resource type is checked for syntax only (`[A-Z][A-Za-z]{0,63}`); whether it is a
//! known FHIR type is the server's business.
//!
//! **Scopes with a `?query` restriction grant nothing in [`ScopeSet::allows`].** They are
//! parsed, kept, intersected and printed, but enforcing them needs the search machinery,
//! so until the server does that they fail closed.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Maximum length of a space-separated scope string.
pub const MAX_SCOPE_STRING_LEN: usize = 8 * 1024;
/// Maximum number of scopes in one string.
pub const MAX_SCOPES: usize = 256;
/// Maximum number of `param=value` pairs in one scope's query.
pub const MAX_QUERY_PARAMS: usize = 16;

const OTHER_SCOPES: &[&str] = &[
    "openid",
    "fhirUser",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
];

/// The scope of erasing a patient's records by crypto-shredding (`POST
/// Patient/{id}/$erase`): outside SMART's grammar on purpose, so no `system/*.cruds` or
/// `system/Patient.d` grant implies it; a back-end client must be registered with it and
/// ask for it by name.
pub const ERASE_SCOPE: &str = "system/Patient.$erase";

/// Scopes of operations (not SMART resource scopes) that back-end clients may hold.
const SYSTEM_OPERATION_SCOPES: &[&str] = &[ERASE_SCOPE];

/// The context a scope applies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Context {
    /// `patient/`: confined to one patient's compartment.
    Patient,
    /// `user/`: whatever the signed-in user may access.
    User,
    /// `system/`: backend services, no user.
    System,
}

impl Context {
    /// The scope prefix (without the `/`).
    pub fn as_str(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }

    fn parse(s: &str) -> Option<Context> {
        match s {
            "patient" => Some(Context::Patient),
            "user" => Some(Context::User),
            "system" => Some(Context::System),
            _ => None,
        }
    }
}

/// A FHIR interaction class as named by SMART v2 permission letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interaction {
    /// `c`
    Create,
    /// `r`
    Read,
    /// `u`
    Update,
    /// `d`
    Delete,
    /// `s`
    Search,
}

impl Interaction {
    /// All interactions in canonical letter order.
    pub const ALL: [Interaction; 5] = [
        Interaction::Create,
        Interaction::Read,
        Interaction::Update,
        Interaction::Delete,
        Interaction::Search,
    ];

    /// The SMART v2 permission letter.
    pub fn letter(self) -> char {
        match self {
            Interaction::Create => 'c',
            Interaction::Read => 'r',
            Interaction::Update => 'u',
            Interaction::Delete => 'd',
            Interaction::Search => 's',
        }
    }

    fn bit(self) -> u8 {
        match self {
            Interaction::Create => 1,
            Interaction::Read => 2,
            Interaction::Update => 4,
            Interaction::Delete => 8,
            Interaction::Search => 16,
        }
    }
}

/// A set of permitted interactions (`cruds`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// `cruds`.
    pub const ALL: Perms = Perms(31);

    /// The set containing exactly `i`.
    pub fn only(i: Interaction) -> Perms {
        Perms(i.bit())
    }
    /// This set plus `i`.
    pub fn with(self, i: Interaction) -> Perms {
        Perms(self.0 | i.bit())
    }
    /// Whether `i` is permitted.
    pub fn contains(self, i: Interaction) -> bool {
        self.0 & i.bit() != 0
    }
    /// Set intersection.
    pub fn intersection(self, other: Perms) -> Perms {
        Perms(self.0 & other.0)
    }
    /// Set union.
    pub fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }
    /// Whether no interaction is permitted.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn parse_suffix(s: &str) -> Result<Perms, &'static str> {
        match s {
            "read" => return Ok(Perms::only(Interaction::Read).with(Interaction::Search)),
            "write" => {
                return Ok(Perms::only(Interaction::Create)
                    .with(Interaction::Update)
                    .with(Interaction::Delete));
            }
            "*" => return Ok(Perms::ALL),
            "" => return Err("missing permissions after '.'"),
            _ => {}
        }
        let mut perms = Perms::NONE;
        let mut next = 0usize;
        for ch in s.chars() {
            let pos = Interaction::ALL[next..]
                .iter()
                .position(|i| i.letter() == ch)
                .ok_or(
                    "permissions must be letters from 'cruds', in that order, without repeats",
                )?;
            let i = Interaction::ALL[next + pos];
            perms = perms.with(i);
            next += pos + 1;
        }
        Ok(perms)
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in Interaction::ALL {
            if self.contains(i) {
                write!(f, "{}", i.letter())?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perms({self})")
    }
}

/// One SMART resource scope.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    /// `patient`, `user` or `system`.
    pub context: Context,
    /// The resource type; `None` means `*`.
    pub resource: Option<String>,
    /// Permitted interactions (never empty in a parsed scope).
    pub perms: Perms,
    /// Optional `?param=value&...` restriction, in the order given.
    pub query: Option<Vec<(String, String)>>,
}

impl Scope {
    /// Whether this scope, on its own, grants `i` on `resource_type` in `ctx`.
    /// Scopes with a query restriction never do (see the module documentation).
    pub fn covers(&self, ctx: Context, resource_type: &str, i: Interaction) -> bool {
        self.context == ctx
            && self.query.is_none()
            && self.perms.contains(i)
            && self.resource.as_deref().is_none_or(|r| r == resource_type)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}.{}",
            self.context.as_str(),
            self.resource.as_deref().unwrap_or("*"),
            self.perms
        )?;
        if let Some(q) = &self.query {
            for (n, (k, v)) in q.iter().enumerate() {
                let sep = if n == 0 { '?' } else { '&' };
                write!(f, "{sep}{k}={v}")?;
            }
        }
        Ok(())
    }
}

/// Scope parse errors. They name the position of the offending scope, never its text.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScopeError {
    /// The whole string is longer than [`MAX_SCOPE_STRING_LEN`].
    #[error("scope string longer than {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// More than [`MAX_SCOPES`] scopes.
    #[error("more than {max} scopes")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// One scope is malformed.
    #[error("scope #{index} (at byte {offset}) is malformed: {reason}")]
    Malformed {
        /// 1-based position of the scope in the list.
        index: usize,
        /// Byte offset of the scope in the input.
        offset: usize,
        /// Fixed description of the problem.
        reason: &'static str,
    },
}

/// A set of granted or requested scopes, kept in canonical form: resource scopes with the
/// same (context, type, query) are merged, and both resource and other scopes are sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet {
    scopes: BTreeSet<Scope>,
    other: BTreeSet<String>,
}

fn valid_resource_type(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_uppercase()
        && b[1..].iter().all(u8::is_ascii_alphabetic)
}

/// Public syntax check for a resource type name (`[A-Z][A-Za-z]{0,63}`).
pub fn is_valid_resource_type_syntax(s: &str) -> bool {
    valid_resource_type(s)
}

fn valid_param_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b':'))
}

fn valid_param_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes().all(|c| {
            (0x21..=0x7e).contains(&c) && !matches!(c, b'&' | b'=' | b'?' | b'#' | b'"' | b'\\')
        })
}

fn parse_query(q: &str) -> Result<Vec<(String, String)>, &'static str> {
    if q.is_empty() {
        return Err("empty query after '?'");
    }
    let mut out = Vec::new();
    for pair in q.split('&') {
        if out.len() >= MAX_QUERY_PARAMS {
            return Err("too many query parameters");
        }
        let (k, v) = pair.split_once('=').ok_or("query parameter without '='")?;
        if !valid_param_name(k) {
            return Err("invalid query parameter name");
        }
        if !valid_param_value(v) {
            return Err("invalid query parameter value");
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

enum Parsed {
    Resource(Scope),
    Other(String),
}

fn parse_one(tok: &str) -> Result<Parsed, &'static str> {
    if OTHER_SCOPES.contains(&tok) || SYSTEM_OPERATION_SCOPES.contains(&tok) {
        return Ok(Parsed::Other(tok.to_owned()));
    }
    let (ctx, rest) = tok.split_once('/').ok_or("unknown scope")?;
    let context = Context::parse(ctx).ok_or("unknown scope context")?;
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(parse_query(q)?)),
        None => (rest, None),
    };
    let (res, perms) = main.split_once('.').ok_or("missing '.' and permissions")?;
    let resource = if res == "*" {
        None
    } else if valid_resource_type(res) {
        Some(res.to_owned())
    } else {
        return Err("invalid resource type");
    };
    let perms = Perms::parse_suffix(perms)?;
    Ok(Parsed::Resource(Scope {
        context,
        resource,
        perms,
        query,
    }))
}

type ScopeKey = (Context, Option<String>, Option<Vec<(String, String)>>);

impl ScopeSet {
    /// The empty set.
    pub fn new() -> ScopeSet {
        ScopeSet::default()
    }

    /// Parses a space-separated scope list (RFC 6749 §3.3). Repeated spaces are tolerated;
    /// any other whitespace makes the scope malformed.
    pub fn parse(space_separated: &str) -> Result<ScopeSet, ScopeError> {
        if space_separated.len() > MAX_SCOPE_STRING_LEN {
            return Err(ScopeError::TooLong {
                max: MAX_SCOPE_STRING_LEN,
            });
        }
        let mut resource = Vec::new();
        let mut other = BTreeSet::new();
        let mut index = 0usize;
        let mut offset = 0usize;
        for tok in space_separated.split(' ') {
            let start = offset;
            offset += tok.len() + 1;
            if tok.is_empty() {
                continue;
            }
            index += 1;
            if index > MAX_SCOPES {
                return Err(ScopeError::TooMany { max: MAX_SCOPES });
            }
            match parse_one(tok) {
                Ok(Parsed::Resource(s)) => resource.push(s),
                Ok(Parsed::Other(s)) => {
                    other.insert(s);
                }
                Err(reason) => {
                    return Err(ScopeError::Malformed {
                        index,
                        offset: start,
                        reason,
                    });
                }
            }
        }
        Ok(ScopeSet::normalized(resource, other))
    }

    fn normalized(resource: Vec<Scope>, other: BTreeSet<String>) -> ScopeSet {
        let mut merged: BTreeMap<ScopeKey, Perms> = BTreeMap::new();
        for s in resource {
            if s.perms.is_empty() {
                continue;
            }
            let p = merged.entry((s.context, s.resource, s.query)).or_default();
            *p = p.union(s.perms);
        }
        let scopes = merged
            .into_iter()
            .map(|((context, resource, query), perms)| Scope {
                context,
                resource,
                perms,
                query,
            })
            .collect();
        ScopeSet { scopes, other }
    }

    /// Whether some unrestricted scope grants `i` on `resource_type` in `ctx`.
    pub fn allows(&self, ctx: Context, resource_type: &str, i: Interaction) -> bool {
        self.scopes.iter().any(|s| s.covers(ctx, resource_type, i))
    }

    /// The effective grant `self ∩ other`: for every pair of resource scopes in the same
    /// context whose types overlap (`*` covers every specific type), the more specific
    /// type with the intersection of the permissions; query restrictions of both sides
    /// are combined (both apply). Other scopes are intersected as plain sets.
    ///
    /// For unrestricted scopes, `a.intersect(b).allows(x)` ⇔ `a.allows(x) && b.allows(x)`.
    pub fn intersect(&self, other: &ScopeSet) -> ScopeSet {
        let mut out = Vec::new();
        for a in &self.scopes {
            for b in &other.scopes {
                if a.context != b.context {
                    continue;
                }
                let resource = match (&a.resource, &b.resource) {
                    (None, r) | (r, None) => r.clone(),
                    (Some(x), Some(y)) if x == y => Some(x.clone()),
                    _ => continue,
                };
                let perms = a.perms.intersection(b.perms);
                if perms.is_empty() {
                    continue;
                }
                let query = match (&a.query, &b.query) {
                    (None, q) | (q, None) => q.clone(),
                    (Some(x), Some(y)) => {
                        // both restrictions apply; sorted so that ∩ is commutative
                        let mut q: Vec<(String, String)> = x.iter().chain(y).cloned().collect();
                        q.sort();
                        q.dedup();
                        Some(q)
                    }
                };
                out.push(Scope {
                    context: a.context,
                    resource,
                    perms,
                    query,
                });
            }
        }
        let other_set = self.other.intersection(&other.other).cloned().collect();
        ScopeSet::normalized(out, other_set)
    }

    /// The set without its resource scopes of context `ctx`.
    pub fn without_context(&self, ctx: Context) -> ScopeSet {
        ScopeSet {
            scopes: self
                .scopes
                .iter()
                .filter(|s| s.context != ctx)
                .cloned()
                .collect(),
            other: self.other.clone(),
        }
    }

    /// What a back-end client (SMART Backend Services, `client_credentials`) may hold:
    /// the `system/` resource scopes only. It acts for a system, with no user and no
    /// patient in context, so `patient/` and `user/` scopes would grant it nothing, and no
    /// identity (`openid`, `fhirUser`), launch or refresh scope applies to it.
    pub fn system_only(&self) -> ScopeSet {
        ScopeSet {
            scopes: self
                .scopes
                .iter()
                .filter(|s| s.context == Context::System)
                .cloned()
                .collect(),
            other: self
                .other
                .iter()
                .filter(|o| SYSTEM_OPERATION_SCOPES.contains(&o.as_str()))
                .cloned()
                .collect(),
        }
    }

    /// The scopes a back-end client cannot hold (see [`ScopeSet::system_only`]), in
    /// canonical form: empty when the set is fit for one.
    pub fn not_system(&self) -> Vec<String> {
        self.scopes
            .iter()
            .filter(|s| s.context != Context::System)
            .map(ToString::to_string)
            .chain(
                self.other
                    .iter()
                    .filter(|o| !SYSTEM_OPERATION_SCOPES.contains(&o.as_str()))
                    .cloned(),
            )
            .collect()
    }

    /// Whether the set holds no scope at all.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty() && self.other.is_empty()
    }

    /// The resource scopes, in canonical order.
    pub fn resource_scopes(&self) -> impl Iterator<Item = &Scope> {
        self.scopes.iter()
    }

    /// The non-resource scopes (`openid`, `launch/patient`, …), sorted.
    pub fn other_scopes(&self) -> impl Iterator<Item = &str> {
        self.other.iter().map(String::as_str)
    }

    /// Whether the non-resource scope `name` is present.
    pub fn has_other(&self, name: &str) -> bool {
        self.other.contains(name)
    }
}

impl fmt::Display for ScopeSet {
    /// Canonical v2 form: resource scopes then other scopes, single spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.scopes {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{s}")?;
        }
        for s in &self.other {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            f.write_str(s)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ScopeSet {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScopeSet::parse(s)
    }
}

impl Serialize for ScopeSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ScopeSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ScopeSet::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Context::*;
    use Interaction::*;

    fn p(s: &str) -> ScopeSet {
        match ScopeSet::parse(s) {
            Ok(v) => v,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn v2_grammar() {
        let s = p("system/Patient.rs");
        assert!(s.allows(System, "Patient", Read));
        assert!(s.allows(System, "Patient", Search));
        assert!(!s.allows(System, "Patient", Create));
        assert!(!s.allows(System, "Observation", Read));
        assert!(!s.allows(User, "Patient", Read));
        assert_eq!(s.to_string(), "system/Patient.rs");

        let s = p("system/*.cruds");
        for i in Interaction::ALL {
            assert!(s.allows(System, "Anything", i));
        }
        assert_eq!(
            p("patient/Observation.c").to_string(),
            "patient/Observation.c"
        );
        assert_eq!(p("user/Encounter.ud").to_string(), "user/Encounter.ud");
    }

    #[test]
    fn v1_mapping() {
        assert_eq!(p("system/Patient.read").to_string(), "system/Patient.rs");
        assert_eq!(p("system/Patient.write").to_string(), "system/Patient.cud");
        assert_eq!(p("system/*.*").to_string(), "system/*.cruds");
        assert_eq!(p("patient/*.read").to_string(), "patient/*.rs");
        // merged with a v2 scope on the same type
        assert_eq!(
            p("system/Patient.read system/Patient.write").to_string(),
            "system/Patient.cruds"
        );
    }

    #[test]
    fn other_scopes_kept() {
        let s = p("openid fhirUser launch launch/patient offline_access online_access");
        assert!(s.has_other("openid"));
        assert!(s.has_other("launch/patient"));
        assert!(!s.allows(System, "Patient", Read));
        assert_eq!(p(&s.to_string()), s);
    }

    #[test]
    fn queries() {
        let s = p(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        );
        let q = s.resource_scopes().next().and_then(|s| s.query.clone());
        assert_eq!(q.map(|q| q.len()), Some(1));
        // restricted scopes fail closed
        assert!(!s.allows(Patient, "Observation", Read));
        assert_eq!(p(&s.to_string()), s);
        assert_eq!(
            p("system/Observation.r?a=1&b=2").to_string(),
            "system/Observation.r?a=1&b=2"
        );
    }

    #[test]
    fn malformed() {
        let bad = [
            "system/Patient.rr",
            "system/Patient.rc",
            "system/Patient.sr",
            "system/Patient.",
            "system/Patient",
            "system/patient.r",
            "system/Pat1ent.r",
            "admin/Patient.r",
            "system/Patient.x",
            "system/Patient.readwrite",
            "system/Patient.r?",
            "system/Patient.r?a",
            "system/Patient.r?=1",
            "system/Patient.r?a=",
            "system/Patient.r?a=1&",
            "system/Patient.r?a=1=2",
            "system/.r",
            "system/**.r",
            "openid2",
            "launch/other",
            "system/Patient.r\tsystem/Observation.r",
            "system/Pätient.r",
            "/Patient.r",
        ];
        for b in bad {
            assert!(ScopeSet::parse(b).is_err(), "{b:?} should be rejected");
        }
        let long_type = format!("system/A{}.r", "a".repeat(64));
        assert!(ScopeSet::parse(&long_type).is_err());
        let ok_type = format!("system/A{}.r", "a".repeat(63));
        assert!(ScopeSet::parse(&ok_type).is_ok());
    }

    #[test]
    fn error_names_position_not_input() {
        let secret = "system/Patient.r system/SECRETSECRET.zz";
        let e = ScopeSet::parse(secret).err();
        assert_eq!(
            e,
            Some(ScopeError::Malformed {
                index: 2,
                offset: 17,
                reason: "permissions must be letters from 'cruds', in that order, without repeats"
            })
        );
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(!msg.contains("SECRET"));
        assert!(matches!(
            ScopeSet::parse(&"x".repeat(MAX_SCOPE_STRING_LEN + 1)),
            Err(ScopeError::TooLong { .. })
        ));
        assert!(matches!(
            ScopeSet::parse(&"openid ".repeat(MAX_SCOPES + 1)),
            Err(ScopeError::TooMany { .. })
        ));
    }

    #[test]
    fn empty_and_spaces() {
        assert!(p("").is_empty());
        assert!(p("   ").is_empty());
        assert_eq!(
            p("  system/Patient.r   openid ").to_string(),
            "system/Patient.r openid"
        );
    }

    #[test]
    fn intersect_cases() {
        // specific ∩ specific
        let a = p("system/Patient.rs system/Observation.cruds");
        let b = p("system/Patient.r system/Observation.rs");
        assert_eq!(
            a.intersect(&b).to_string(),
            "system/Observation.rs system/Patient.r"
        );
        // wildcard covers specific types on the other side
        let reg = p("system/*.rs");
        let req = p("system/Patient.cruds system/Observation.r");
        assert_eq!(
            req.intersect(&reg).to_string(),
            "system/Observation.r system/Patient.rs"
        );
        assert_eq!(reg.intersect(&req), req.intersect(&reg));
        // different contexts do not meet
        assert!(p("patient/*.rs").intersect(&p("system/*.rs")).is_empty());
        // disjoint permissions vanish
        assert!(
            p("system/Patient.c")
                .intersect(&p("system/Patient.rs"))
                .is_empty()
        );
        // different types vanish
        assert!(
            p("system/Patient.rs")
                .intersect(&p("system/Observation.rs"))
                .is_empty()
        );
        // other scopes as sets
        assert_eq!(
            p("openid fhirUser system/*.r")
                .intersect(&p("openid system/Patient.rs"))
                .to_string(),
            "system/Patient.r openid"
        );
        // wildcard ∩ wildcard
        assert_eq!(
            p("system/*.cruds").intersect(&p("system/*.rs")).to_string(),
            "system/*.rs"
        );
        // query restrictions are kept (and combined)
        let q = p("system/Observation.rs?a=1").intersect(&p("system/*.r?b=2"));
        assert_eq!(q.to_string(), "system/Observation.r?a=1&b=2");
    }

    #[test]
    fn serde_as_string() {
        let s = p("system/Patient.read openid");
        let j = serde_json::to_string(&s).unwrap_or_default();
        assert_eq!(j, "\"system/Patient.rs openid\"");
        let back: Result<ScopeSet, _> = serde_json::from_str(&j);
        assert_eq!(back.ok(), Some(s));
        assert!(serde_json::from_str::<ScopeSet>("\"system/Patient.q\"").is_err());
    }

    #[test]
    fn back_end_clients_hold_system_scopes_only() {
        let s = p("system/Patient.rs patient/*.read user/Observation.rs openid fhirUser");
        assert_eq!(s.system_only().to_string(), "system/Patient.rs");
        assert_eq!(
            s.not_system(),
            ["patient/*.rs", "user/Observation.rs", "fhirUser", "openid"]
        );
        assert!(
            p("system/*.cruds system/Observation.rs")
                .not_system()
                .is_empty()
        );
        assert!(p("launch/patient").system_only().is_empty());
    }
}
