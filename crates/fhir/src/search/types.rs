//! Shared types of the search module (the contract between its files and the server).

use crate::Issue;

/// Search parameter type (R4 `SearchParamType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    /// `number`
    Number,
    /// `date`
    Date,
    /// `string`
    String,
    /// `token`
    Token,
    /// `reference`
    Reference,
    /// `composite` (not searchable in phivault; rejected as unsupported)
    Composite,
    /// `quantity`
    Quantity,
    /// `uri`
    Uri,
    /// `special` (not supported; rejected)
    Special,
}

/// One search parameter of one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchParamDef {
    /// The resource type this definition is registered for (a concrete type, never
    /// `Resource`/`DomainResource`: those are expanded per type).
    pub base: String,
    /// The parameter code used in URLs (`family`, `_lastUpdated`, ...).
    pub code: String,
    /// Parameter type.
    pub ptype: ParamType,
    /// The FHIRPath expression restricted to this base type: only the `|`-separated parts
    /// that start with `base` (or `Resource`/`DomainResource`), joined with ` | `.
    /// None for parameters served without an expression (`_id`, `_lastUpdated`).
    pub expression: Option<String>,
    /// For reference parameters: the allowed target resource types.
    pub targets: Vec<String>,
}

/// A date/time interval in milliseconds since the Unix epoch (UTC), half-open
/// `[lo, hi)`. A value's interval follows its precision: `2020` is the whole year
/// 2020, `2020-03-15` that day, `2020-03-15T10:30:00Z` that second. Values without a
/// time zone are taken as UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DateRange {
    /// Inclusive lower bound.
    pub lo: i64,
    /// Exclusive upper bound (`hi > lo`). An open-ended Period end is `i64::MAX`;
    /// an open start is `i64::MIN`.
    pub hi: i64,
}

/// A decimal as written, with its implicit precision range: `5.4` means `[5.35, 5.45)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decimal {
    /// The value.
    pub value: f64,
    /// Half-width of the precision interval (0.05 for `5.4`, 0.5 for `100`, 0.0005 for
    /// `1.000`; `5e2` → 50).
    pub half_ulp: f64,
}

/// One searchable value extracted from a resource for one parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchValue {
    /// `token` from Coding/CodeableConcept (each coding), Identifier (system, value),
    /// ContactPoint (system=None, code=value), code/boolean/string/id primitives
    /// (system=None). `text` holds CodeableConcept.text / Coding.display /
    /// Identifier.type.text for the `:text` modifier.
    Token {
        /// Code system URI, if any.
        system: Option<String>,
        /// The code / identifier value (`true`/`false` for booleans).
        code: Option<String>,
        /// Display text for `:text`.
        text: Option<String>,
    },
    /// `string`: each string part separately (for HumanName: each `given`, `family`,
    /// `prefix`, `suffix` and `text`; for Address: each `line`, `city`, `district`,
    /// `state`, `postalCode`, `country` and `text`).
    String(String),
    /// `date`: the interval of a date, dateTime, instant, or Period (missing start →
    /// `i64::MIN`, missing end → `i64::MAX`), Timing.event each.
    Date(DateRange),
    /// `reference`: a Reference.reference (or canonical / uri used as reference).
    /// `rtype`/`id` are filled for relative `Type/id` (and for absolute URLs ending in
    /// `Type/id[/_history/v]`); `url` is the reference as written.
    Reference {
        /// Target resource type, when the reference names one.
        rtype: Option<String>,
        /// Target logical id, when the reference names one.
        id: Option<String>,
        /// The reference string as written.
        url: String,
    },
    /// `quantity`: Quantity (and Age, Duration, Money as value+currency code).
    Quantity {
        /// The numeric value.
        value: Decimal,
        /// Unit system.
        system: Option<String>,
        /// Unit code.
        code: Option<String>,
        /// Human unit.
        unit: Option<String>,
    },
    /// `number`: integer / decimal.
    Number(Decimal),
    /// `uri`: uri / url / canonical / oid / uuid.
    Uri(String),
}

/// Comparison prefix of number, date and quantity values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefix {
    /// `eq` (default)
    Eq,
    /// `ne`
    Ne,
    /// `gt`
    Gt,
    /// `lt`
    Lt,
    /// `ge`
    Ge,
    /// `le`
    Le,
    /// `sa` (starts after)
    Sa,
    /// `eb` (ends before)
    Eb,
    /// `ap` (approximately: ±10 %)
    Ap,
}

/// Search modifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Modifier {
    /// No modifier.
    None,
    /// `:exact` (string)
    Exact,
    /// `:contains` (string)
    Contains,
    /// `:missing` (any type; the value is `true`/`false`)
    Missing,
    /// `:not` (token)
    Not,
    /// `:text` (token)
    Text,
    /// `:identifier` (reference: match Reference.identifier) — parsed but unsupported →
    /// rejected by the parser.
    Identifier,
    /// `:[type]` on a reference (`subject:Patient=123`).
    Type(String),
    /// `:below` / `:above` on uri.
    Below,
    /// `:above` on uri.
    Above,
}

/// One value of a criterion (values of one parameter occurrence are OR-ed).
#[derive(Debug, Clone, PartialEq)]
pub enum QueryValue {
    /// Token: `[system]|[code]`, `code`, `system|`, `|code`.
    Token {
        /// Some(Some(s)) = `s|code`, Some(None) = `|code` (no system), None = any system.
        system: Option<Option<String>>,
        /// None for `system|` (any code in the system).
        code: Option<String>,
    },
    /// Token `:text` or string search text (already percent-decoded, not normalised).
    Text(String),
    /// Date with prefix.
    Date(Prefix, DateRange),
    /// Number with prefix.
    Number(Prefix, Decimal),
    /// Quantity `[prefix][number]|[system]|[code]`.
    Quantity {
        /// Comparison prefix.
        prefix: Prefix,
        /// The number.
        value: Decimal,
        /// Unit system (None = any).
        system: Option<String>,
        /// Unit code or unit (None = any).
        code: Option<String>,
    },
    /// Reference: `Type/id`, `id` (type from the modifier or the single target), or an
    /// absolute URL.
    Reference {
        /// Target type if known.
        rtype: Option<String>,
        /// Logical id, or the full URL when `url` is true.
        id: String,
        /// The value was an absolute URL.
        is_url: bool,
    },
    /// uri value.
    Uri(String),
    /// The boolean of `:missing`.
    Missing(bool),
}

/// What one criterion tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A parameter of the searched type, evaluated on the resource itself.
    Param(&'static SearchParamDef),
    /// `_id`: values are logical ids (`QueryValue::Token { system: None, code: Some(id) }`).
    Id,
    /// `_lastUpdated`: values are `QueryValue::Date`; evaluated on `meta.lastUpdated`.
    LastUpdated,
    /// Chained: `ref_param:[target_type].inner` — the resource's reference parameter
    /// `reference` points to a resource of `target_type` that matches `inner`.
    Chain {
        /// The reference parameter of the searched type.
        reference: &'static SearchParamDef,
        /// The target type (from the `:Type` modifier or the parameter's single target).
        target_type: String,
        /// The criterion on the target (never itself a chain: one level only).
        inner: Box<Criterion>,
    },
    /// Reverse chain `_has:Type:refParam:inner`: some resource of `rtype` whose reference
    /// parameter `reference` points to this resource matches `inner`.
    Has {
        /// The referring resource type.
        rtype: String,
        /// Its reference parameter.
        reference: &'static SearchParamDef,
        /// The criterion on the referring resource (may itself be a `_has`, bounded depth 2).
        inner: Box<Criterion>,
    },
}

/// One criterion: one occurrence of a parameter in the query. Criteria are AND-ed; the
/// values within one criterion are OR-ed.
#[derive(Debug, Clone, PartialEq)]
pub struct Criterion {
    /// What is tested.
    pub target: Target,
    /// The modifier.
    pub modifier: Modifier,
    /// The values (OR). Never empty.
    pub values: Vec<QueryValue>,
}

/// `_include` / `_revinclude` directive: `source_type:param[:target_type]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Include {
    /// The resource type holding the reference.
    pub source_type: String,
    /// The reference parameter (`*` is not supported and rejected).
    pub param: &'static SearchParamDef,
    /// Restrict the target type.
    pub target_type: Option<String>,
    /// `:iterate` (bounded by the server).
    pub iterate: bool,
}

/// Sort key: a parameter (date, string, token, number, quantity types, or
/// `_lastUpdated`/`_id`) and a direction.
#[derive(Debug, Clone, PartialEq)]
pub struct SortKey {
    /// `None` for `_lastUpdated`; `_id` sorting is the default order.
    pub param: Option<&'static SearchParamDef>,
    /// True for `_lastUpdated`.
    pub last_updated: bool,
    /// Descending (`-param`).
    pub descending: bool,
}

/// `_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Total {
    /// `none` (default: phivault reports a total only when asked).
    #[default]
    None,
    /// `estimate` (served as accurate).
    Estimate,
    /// `accurate`.
    Accurate,
}

/// `_summary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Summary {
    /// Full resources.
    #[default]
    False,
    /// `count`: only `total`, no entries.
    Count,
}

/// A parsed search request.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    /// The searched resource type.
    pub rtype: String,
    /// AND-ed criteria.
    pub criteria: Vec<Criterion>,
    /// `_include`.
    pub include: Vec<Include>,
    /// `_revinclude`.
    pub revinclude: Vec<Include>,
    /// `_count` (already capped to [`super::MAX_COUNT`]; default
    /// [`super::DEFAULT_COUNT`]).
    pub count: usize,
    /// `_sort` keys, in order.
    pub sort: Vec<SortKey>,
    /// `_total`.
    pub total: Total,
    /// `_summary`.
    pub summary: Summary,
    /// `_elements` (top-level element names), if given.
    pub elements: Option<Vec<String>>,
    /// Problems ignored under `Prefer: handling=lenient` (reported as warnings in the
    /// Bundle's OperationOutcome). Empty in strict mode (problems are errors there).
    pub warnings: Vec<Issue>,
    /// The parameters as the server understood them, decoded, sorted by name (repeated
    /// parameters keep their order): every criterion and include that was applied, each
    /// with its value as given; `_count` when given (capped), `_sort`, `_elements`,
    /// `_format` as given; `_total` when a total is asked for (`_totalMethod` spelled as
    /// `_total`); `_summary=count`. Parameters ignored under lenient handling, `_pretty`
    /// and defaults asked for explicitly (`_total=none`, `_summary=false`) are left out.
    /// [`SearchQuery::self_query`] writes it as the `self` link's query. Holds search
    /// values: the server never logs it.
    pub applied: Vec<(String, String)>,
}

/// How the index narrows one query: an expression over *terms* (each term is looked up as
/// the keyed token of `(resource type, parameter, term)`). The result is a candidate set
/// that contains every match; candidates are verified by decrypting them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Resources having at least one of these terms for `param` (an OR-set).
    Terms {
        /// The parameter code whose index is read.
        param: String,
        /// The terms (never empty).
        terms: Vec<Vec<u8>>,
    },
    /// Every sub-lookup holds.
    And(Vec<Lookup>),
    /// Some sub-lookup holds.
    Or(Vec<Lookup>),
    /// The index cannot narrow this criterion: every resource of the type is a candidate
    /// (the criterion is then only applied by verification, page by page).
    All,
}
