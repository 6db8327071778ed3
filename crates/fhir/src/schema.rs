//! Validation against the official R4 JSON schema (`data/fhir.schema.json.gz`).
//!
//! The schema is decompressed and compiled once (lazily) into [`Schema`]: one [`TypeDef`] per
//! complex definition (property name -> [`Prop`]), primitives mapped to native checks (or a
//! pre-compiled regex), and a map from resource type to definition. Validation then walks the
//! resource once, never the raw schema JSON.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read;
use std::sync::LazyLock;

use regex_lite::Regex;
use serde_json::{Map, Value};

use crate::issue::{Issue, IssueCode};
use crate::{MAX_DEPTH, MAX_ISSUES};

static SCHEMA_GZ: &[u8] = include_bytes!("../data/fhir.schema.json.gz");

/// Resource types that Medplum adds to its copy of the schema; not R4, never accepted.
const MEDPLUM_RESOURCES: &[&str] = &[
    "Project",
    "ProjectMembership",
    "ClientApplication",
    "User",
    "Login",
    "PasswordChangeRequest",
    "JsonWebKey",
    "Bot",
    "AccessPolicy",
    "UserConfiguration",
    "BulkDataExport",
    "SmartAppLaunch",
    "DomainConfiguration",
    "AsyncJob",
    "Agent",
    "IdentityProvider",
    "UserSecurityRequest",
    "ViewDefinition",
    "ProjectSetting",
    "ProjectSite",
    "ProjectLink",
    "ProjectDefaultProfile",
    "ProjectMembershipAccessParameter",
    "ProjectMembershipAccess",
    "AccessPolicyResource",
    "AccessPolicyIpAccessRule",
    "UserConfigurationMenuLink",
    "UserConfigurationMenu",
    "UserConfigurationSearch",
    "UserConfigurationOption",
    "BulkDataExportOutput",
    "BulkDataExportDeleted",
    "BulkDataExportError",
    "AgentSetting",
    "AgentChannel",
    "ViewDefinitionConstant",
    "ViewDefinitionSelectColumnTag",
    "ViewDefinitionSelectColumn",
    "ViewDefinitionSelect",
    "ViewDefinitionWhere",
    "ClientApplicationSignInForm",
];

/// Properties that Medplum adds to R4 definitions: (definition, property). Removed at compile
/// time together with their `_` siblings.
const MEDPLUM_PROPERTIES: &[(&str, &str)] = &[
    ("Meta", "project"),
    ("Meta", "author"),
    ("Meta", "account"),
    ("Meta", "accounts"),
    ("Meta", "compartment"),
    ("Meta", "onBehalfOf"),
    ("Reference", "resource"),
    ("OperationOutcome", "status"),
    ("OperationOutcome", "resource"),
];

/// Native check for a primitive value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prim {
    /// string, markdown: non-empty, no control characters other than TAB/CR/LF.
    String,
    /// code: non-empty, no leading/trailing whitespace, single internal whitespace.
    Code,
    /// id: `[A-Za-z0-9\-\.]{1,64}`.
    Id,
    /// uri, url, canonical: non-empty, no whitespace.
    Uri,
    /// base64Binary: base64 alphabet and whitespace.
    Base64,
    /// xhtml: a non-empty string (the XHTML itself is not checked).
    Xhtml,
    Boolean,
    Decimal,
    /// integer: 32-bit signed.
    Integer,
    /// positiveInt: 1..=2^31-1.
    PositiveInt,
    /// unsignedInt: 0..=2^31-1.
    UnsignedInt,
    /// String checked with a pre-compiled regex (index into `Schema::regexes`); `calendar`
    /// additionally checks that a leading YYYY-MM-DD is a real date.
    Pattern {
        regex: usize,
        calendar: bool,
    },
    /// One of the R4 date/time patterns, matched by hand (`crate::formats`); `calendar` as
    /// for `Pattern`.
    Format {
        format: crate::formats::Format,
        calendar: bool,
    },
    /// Number checked with nothing beyond being a number (unknown numeric primitive).
    Number,
}

impl Prim {
    fn name(self) -> &'static str {
        match self {
            Prim::String => "string",
            Prim::Code => "code",
            Prim::Id => "id",
            Prim::Uri => "uri",
            Prim::Base64 => "base64Binary",
            Prim::Xhtml => "xhtml",
            Prim::Boolean => "boolean",
            Prim::Decimal | Prim::Number => "decimal",
            Prim::Integer => "integer",
            Prim::PositiveInt => "positiveInt",
            Prim::UnsignedInt => "unsignedInt",
            Prim::Pattern { .. } | Prim::Format { .. } => "formatted string",
        }
    }
}

#[derive(Debug)]
enum Ty {
    Prim(Prim),
    Complex(usize),
    /// ResourceList: dispatch on the nested `resourceType`.
    Resource,
    Enum(Box<[Box<str>]>),
    Const(Box<str>),
}

#[derive(Debug)]
struct Prop {
    array: bool,
    ty: Ty,
}

#[derive(Debug, Default)]
struct TypeDef {
    props: HashMap<Box<str>, Prop>,
    /// Required property names, each paired with its `_name` sibling (either satisfies it).
    required: Vec<(Box<str>, Box<str>)>,
}

pub(crate) struct Schema {
    defs: Vec<TypeDef>,
    resources: HashMap<Box<str>, usize>,
    resource_names: Vec<String>,
    regexes: Vec<Regex>,
}

static SCHEMA: LazyLock<Result<Schema, String>> = LazyLock::new(load);

pub(crate) fn schema() -> Option<&'static Schema> {
    SCHEMA.as_ref().ok()
}

fn load() -> Result<Schema, String> {
    compile(&raw_schema()?)
}

/// The shipped R4 JSON schema, as JSON.
fn raw_schema() -> Result<Value, String> {
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(SCHEMA_GZ)
        .read_to_end(&mut text)
        .map_err(|e| format!("decompress: {e}"))?;
    serde_json::from_slice(&text).map_err(|e| format!("parse: {e}"))
}

fn ref_name(v: &Value) -> Option<&str> {
    v.get("$ref")?.as_str()?.strip_prefix("#/definitions/")
}

struct Compiler<'a> {
    raw_defs: &'a Map<String, Value>,
    complex: HashMap<&'a str, usize>,
    prims: HashMap<&'a str, Prim>,
    /// (json type, pattern) of primitive definitions -> their check, for inline patterns.
    by_pattern: HashMap<(&'a str, &'a str), Prim>,
    regexes: Vec<Regex>,
}

impl<'a> Compiler<'a> {
    fn regex(&mut self, pattern: &str) -> Result<usize, String> {
        let re = Regex::new(pattern).map_err(|e| format!("regex {pattern}: {e}"))?;
        self.regexes.push(re);
        Ok(self.regexes.len() - 1)
    }

    /// The check of a string pattern: by hand for the date/time patterns, else a regex.
    fn pattern(&mut self, pattern: &str, calendar: bool) -> Result<Prim, String> {
        Ok(match crate::formats::Format::of_pattern(pattern) {
            Some(format) => Prim::Format { format, calendar },
            None => Prim::Pattern {
                regex: self.regex(pattern)?,
                calendar,
            },
        })
    }

    fn primitive(&mut self, name: &str, def: &'a Value) -> Result<Prim, String> {
        let json_type = def.get("type").and_then(Value::as_str);
        let pattern = def.get("pattern").and_then(Value::as_str);
        Ok(match name {
            "string" | "markdown" => Prim::String,
            "code" => Prim::Code,
            "id" => Prim::Id,
            "uri" | "url" | "canonical" => Prim::Uri,
            "base64Binary" => Prim::Base64,
            "xhtml" => Prim::Xhtml,
            "boolean" => Prim::Boolean,
            "decimal" => Prim::Decimal,
            "integer" => Prim::Integer,
            "positiveInt" => Prim::PositiveInt,
            "unsignedInt" => Prim::UnsignedInt,
            _ => match (json_type, pattern) {
                (Some("string"), Some(p)) => {
                    self.pattern(p, matches!(name, "date" | "dateTime" | "instant"))?
                }
                (Some("string"), None) => Prim::String,
                (Some("number"), _) => Prim::Number,
                (Some("boolean"), _) => Prim::Boolean,
                _ => return Err(format!("unsupported primitive {name}")),
            },
        })
    }

    fn ty(&mut self, v: &'a Value) -> Result<Ty, String> {
        if let Some(name) = ref_name(v) {
            if name == "ResourceList" {
                return Ok(Ty::Resource);
            }
            if let Some(&i) = self.complex.get(name) {
                return Ok(Ty::Complex(i));
            }
            if let Some(&p) = self.prims.get(name) {
                return Ok(Ty::Prim(p));
            }
            return Err(format!("unknown $ref {name}"));
        }
        if let Some(list) = v.get("enum").and_then(Value::as_array) {
            let vals = list
                .iter()
                .map(|x| x.as_str().map(Box::from).ok_or("non-string enum"))
                .collect::<Result<Box<[_]>, _>>()?;
            return Ok(Ty::Enum(vals));
        }
        if let Some(c) = v.get("const") {
            let c = c.as_str().ok_or("non-string const")?;
            return Ok(Ty::Const(c.into()));
        }
        let json_type = v.get("type").and_then(Value::as_str).unwrap_or("");
        if let Some(p) = v.get("pattern").and_then(Value::as_str) {
            if let Some(&prim) = self.by_pattern.get(&(json_type, p)) {
                return Ok(Ty::Prim(prim));
            }
            if p.starts_with("^(\\s*([0-9a-zA-Z\\+/=]){4}\\s*)+$") {
                return Ok(Ty::Prim(Prim::Base64));
            }
            return match json_type {
                "string" => Ok(Ty::Prim(self.pattern(p, false)?)),
                "number" => Ok(Ty::Prim(Prim::Number)),
                "boolean" => Ok(Ty::Prim(Prim::Boolean)),
                _ => Err(format!("unsupported inline type {json_type}")),
            };
        }
        Err("unsupported property schema".into())
    }

    fn prop(&mut self, v: &'a Value) -> Result<Prop, String> {
        if v.get("type").and_then(Value::as_str) == Some("array") {
            let items = v.get("items").ok_or("array without items")?;
            Ok(Prop {
                array: true,
                ty: self.ty(items)?,
            })
        } else {
            Ok(Prop {
                array: false,
                ty: self.ty(v)?,
            })
        }
    }
}

fn compile(raw: &Value) -> Result<Schema, String> {
    let raw_defs = raw
        .get("definitions")
        .and_then(Value::as_object)
        .ok_or("no definitions")?;
    let mut c = Compiler {
        raw_defs,
        complex: HashMap::new(),
        prims: HashMap::new(),
        by_pattern: HashMap::new(),
        regexes: Vec::new(),
    };
    // Pass 1: number the complex definitions, compile the primitives.
    let mut order = Vec::new();
    for (name, def) in c.raw_defs {
        if def.get("properties").is_some() {
            c.complex.insert(name.as_str(), order.len());
            order.push((name.as_str(), def));
        } else if def.get("oneOf").is_none() {
            let prim = c.primitive(name, def)?;
            c.prims.insert(name.as_str(), prim);
            if let (Some(t), Some(p)) = (
                def.get("type").and_then(Value::as_str),
                def.get("pattern").and_then(Value::as_str),
            ) {
                c.by_pattern.entry((t, p)).or_insert(prim);
            }
        }
    }
    // Pass 2: compile properties.
    let mut defs = Vec::with_capacity(order.len());
    for (name, def) in &order {
        let mut td = TypeDef::default();
        let owner = name.split('_').next().unwrap_or(name);
        if MEDPLUM_RESOURCES.contains(&owner) {
            // Never reachable: not in the resource map and not referenced by R4 definitions.
            defs.push(td);
            continue;
        }
        if let Some(props) = def.get("properties").and_then(Value::as_object) {
            for (pname, pdef) in props {
                let base = pname.strip_prefix('_').unwrap_or(pname);
                if MEDPLUM_PROPERTIES.contains(&(name, base)) {
                    continue;
                }
                let p = c.prop(pdef).map_err(|e| format!("{name}.{pname}: {e}"))?;
                td.props.insert(pname.as_str().into(), p);
            }
        }
        if let Some(req) = def.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if r != "resourceType" {
                    td.required.push((r.into(), format!("_{r}").into()));
                }
            }
        }
        defs.push(td);
    }
    let mut resources = HashMap::new();
    let mut resource_names = Vec::new();
    let list = raw
        .get("definitions")
        .and_then(|d| d.get("ResourceList"))
        .and_then(|r| r.get("oneOf"))
        .and_then(Value::as_array)
        .ok_or("no ResourceList")?;
    for r in list {
        let name = ref_name(r).ok_or("bad ResourceList entry")?;
        if MEDPLUM_RESOURCES.contains(&name) {
            continue;
        }
        let idx = *c.complex.get(name).ok_or("unknown resource")?;
        resources.insert(Box::from(name), idx);
        resource_names.push(name.to_owned());
    }
    Ok(Schema {
        defs,
        resources,
        resource_names,
        regexes: c.regexes,
    })
}

/// True for the 146 R4 resource types.
pub fn is_known_resource_type(t: &str) -> bool {
    schema().is_some_and(|s| s.resources.contains_key(t))
}

/// The R4 resource types, in the schema's (alphabetical) order.
pub fn resource_types() -> impl Iterator<Item = &'static str> {
    schema()
        .map(|s| s.resource_names.as_slice())
        .unwrap_or(&[])
        .iter()
        .map(String::as_str)
}

/// Validate a resource against the R4 JSON schema.
///
/// Checked: known `resourceType` (top level, `contained`, `Bundle.entry.resource`,
/// `Parameters.parameter.resource`, `Bundle.entry.response.outcome`); every property defined;
/// JSON types; primitive formats (id, date/dateTime/instant with real calendar dates, time,
/// code, uri, oid, uuid, base64Binary, string control characters); integer kinds integral and
/// in range; `enum`; `const`; `required` (satisfied by `x` or its `_x` extension sibling);
/// `_x` primitive-extension siblings; no empty arrays; no `null` except inside primitive arrays;
/// nesting depth. All issues are returned, capped at [`MAX_ISSUES`].
///
/// Not checked: FHIRPath invariants (e.g. `ele-1`, `obs-6`), choice-type exclusivity (two
/// `value[x]` at once), cardinality maxima of non-array elements beyond JSON shape,
/// terminology bindings, profiles, reference targets, and the XHTML narrative's content.
pub fn validate(resource: &Value) -> Result<(), Vec<Issue>> {
    let Some(schema) = schema() else {
        return Err(vec![Issue::error(
            IssueCode::Exception,
            None,
            "FHIR definitions are unavailable",
        )]);
    };
    let mut cx = Cx {
        schema,
        path: String::with_capacity(64),
        issues: Vec::new(),
        truncated: false,
    };
    let Some(obj) = resource.as_object() else {
        return Err(vec![Issue::error(
            IssueCode::Structure,
            None,
            "resource must be a JSON object",
        )]);
    };
    cx.resource(obj, 1, true);
    if cx.truncated {
        cx.issues.push(Issue::error(
            IssueCode::TooCostly,
            None,
            format!("more than {MAX_ISSUES} issues; the rest are not reported"),
        ));
    }
    if cx.issues.is_empty() {
        Ok(())
    } else {
        Err(cx.issues)
    }
}

struct Cx<'s> {
    schema: &'s Schema,
    path: String,
    issues: Vec<Issue>,
    truncated: bool,
}

/// Element names are safe to echo in paths; anything else (possibly data) is masked.
fn is_element_name(k: &str) -> bool {
    let k = k.strip_prefix('_').unwrap_or(k);
    let mut chars = k.chars();
    k.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Cx<'_> {
    fn full(&self) -> bool {
        self.truncated
    }

    fn issue(&mut self, code: IssueCode, message: impl Into<String>) {
        if self.issues.len() >= MAX_ISSUES {
            self.truncated = true;
            return;
        }
        let path = if self.path.is_empty() {
            None
        } else {
            Some(self.path.clone())
        };
        self.issues.push(Issue::error(code, path, message));
    }

    /// Validate a resource object: dispatch on its `resourceType`.
    fn resource(&mut self, obj: &Map<String, Value>, depth: usize, top: bool) {
        let rt = match obj.get("resourceType") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                self.issue(IssueCode::Structure, "resourceType must be a string");
                return;
            }
            None => {
                self.issue(IssueCode::Required, "resourceType is missing");
                return;
            }
        };
        let Some(&def) = self.schema.resources.get(rt) else {
            self.issue(IssueCode::NotSupported, "unknown resource type");
            return;
        };
        let mark = self.path.len();
        if top {
            self.path.push_str(rt);
        }
        self.object(obj, def, depth);
        self.path.truncate(mark);
    }

    fn push_key(&mut self, k: &str) {
        if !self.path.is_empty() {
            self.path.push('.');
        }
        if is_element_name(k) {
            self.path.push_str(k);
        } else {
            self.path.push_str("<invalid-name>");
        }
    }

    fn object(&mut self, obj: &Map<String, Value>, def: usize, depth: usize) {
        if self.full() {
            return;
        }
        if depth > MAX_DEPTH {
            self.issue(IssueCode::TooCostly, "nesting too deep");
            return;
        }
        let Some(td) = self.schema.defs.get(def) else {
            return;
        };
        if obj.is_empty() {
            self.issue(IssueCode::Structure, "empty objects are not allowed");
            return;
        }
        for (k, v) in obj {
            let mark = self.path.len();
            self.push_key(k);
            match td.props.get(k.as_str()) {
                Some(p) => self.prop(p, v, depth, k.starts_with('_')),
                None => self.issue(IssueCode::Structure, "unknown property"),
            }
            self.path.truncate(mark);
            if self.full() {
                return;
            }
        }
        for (name, ext) in &td.required {
            if !obj.contains_key(&**name) && !obj.contains_key(&**ext) {
                let mark = self.path.len();
                self.push_key(name);
                self.issue(IssueCode::Required, "required element is missing");
                self.path.truncate(mark);
            }
        }
    }

    fn prop(&mut self, p: &Prop, v: &Value, depth: usize, extension_sibling: bool) {
        if !p.array {
            if v.is_null() {
                self.issue(IssueCode::Structure, "null is not allowed here");
            } else {
                self.single(&p.ty, v, depth);
            }
            return;
        }
        let Value::Array(items) = v else {
            self.issue(IssueCode::Structure, "expected an array");
            return;
        };
        if items.is_empty() {
            self.issue(IssueCode::Structure, "empty arrays are not allowed");
            return;
        }
        if depth + 1 > MAX_DEPTH {
            self.issue(IssueCode::TooCostly, "nesting too deep");
            return;
        }
        // Arrays of primitives and their `_x` siblings may hold nulls to keep positions aligned.
        let nulls_ok = extension_sibling || matches!(p.ty, Ty::Prim(_));
        for (i, item) in items.iter().enumerate() {
            let mark = self.path.len();
            let _ = write!(self.path, "[{i}]");
            if item.is_null() {
                if !nulls_ok {
                    self.issue(IssueCode::Structure, "null is not allowed here");
                }
            } else {
                self.single(&p.ty, item, depth + 1);
            }
            self.path.truncate(mark);
            if self.full() {
                return;
            }
        }
    }

    fn single(&mut self, ty: &Ty, v: &Value, depth: usize) {
        match ty {
            Ty::Prim(p) => self.primitive(*p, v),
            Ty::Complex(i) => match v {
                Value::Object(o) => self.object(o, *i, depth + 1),
                _ => self.issue(IssueCode::Structure, "expected an object"),
            },
            Ty::Resource => match v {
                Value::Object(o) => self.resource(o, depth + 1, false),
                _ => self.issue(IssueCode::Structure, "expected a resource object"),
            },
            Ty::Enum(vals) => match v {
                Value::String(s) if vals.iter().any(|x| **x == **s) => {}
                Value::String(_) => self.issue(IssueCode::Value, "value is not in the allowed set"),
                _ => self.issue(IssueCode::Structure, "expected a string (code)"),
            },
            Ty::Const(c) => match v {
                Value::String(s) if **c == **s => {}
                _ => self.issue(
                    IssueCode::Value,
                    "value does not match the required constant",
                ),
            },
        }
    }

    fn primitive(&mut self, p: Prim, v: &Value) {
        let ok = match (p, v) {
            (Prim::Boolean, Value::Bool(_)) => true,
            (Prim::Decimal | Prim::Number, Value::Number(_)) => true,
            (Prim::Integer, Value::Number(n)) => {
                int_in(n, i64::from(i32::MIN), i64::from(i32::MAX))
            }
            (Prim::PositiveInt, Value::Number(n)) => int_in(n, 1, i64::from(i32::MAX)),
            (Prim::UnsignedInt, Value::Number(n)) => int_in(n, 0, i64::from(i32::MAX)),
            (Prim::String, Value::String(s)) => check_string(s),
            (Prim::Code, Value::String(s)) => check_code(s),
            (Prim::Id, Value::String(s)) => crate::is_valid_id(s),
            (Prim::Uri, Value::String(s)) => {
                !s.is_empty() && !s.bytes().any(|b| b.is_ascii_whitespace() || b == 0x0b)
            }
            (Prim::Base64, Value::String(s)) => check_base64(s),
            (Prim::Xhtml, Value::String(s)) => !s.is_empty(),
            (Prim::Pattern { regex, calendar }, Value::String(s)) => {
                self.schema
                    .regexes
                    .get(regex)
                    .is_some_and(|re| re.is_match(s))
                    && (!calendar || check_calendar(s))
            }
            (Prim::Format { format, calendar }, Value::String(s)) => {
                format.matches(s) && (!calendar || check_calendar(s))
            }
            _ => {
                let expected = match p {
                    Prim::Boolean => "expected a boolean",
                    Prim::Decimal
                    | Prim::Number
                    | Prim::Integer
                    | Prim::PositiveInt
                    | Prim::UnsignedInt => "expected a number",
                    _ => "expected a string",
                };
                self.issue(IssueCode::Structure, expected);
                return;
            }
        };
        if !ok {
            self.issue(IssueCode::Value, format!("invalid {} value", p.name()));
        }
    }
}

fn int_in(n: &serde_json::Number, min: i64, max: i64) -> bool {
    n.as_i64().is_some_and(|i| (min..=max).contains(&i))
}

fn check_string(s: &str) -> bool {
    !s.is_empty()
        && !s
            .bytes()
            .any(|b| b < 0x20 && b != b'\t' && b != b'\r' && b != b'\n' || b == 0x7f)
}

fn check_code(s: &str) -> bool {
    // ^[^\s]+(\s[^\s]+)*$ with \s = ASCII whitespace incl. VT.
    let ws = |b: u8| b.is_ascii_whitespace() || b == 0x0b;
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&f), Some(&l)) if !ws(f) && !ws(l) => {}
        _ => return false,
    }
    !bytes
        .windows(2)
        .any(|w| matches!(w, [a, b] if ws(*a) && ws(*b)))
}

fn check_base64(s: &str) -> bool {
    let mut n = 0usize;
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=' {
            n += 1;
        } else if !b.is_ascii_whitespace() {
            return false;
        }
    }
    n.is_multiple_of(4)
}

/// For strings already matching the date/dateTime/instant pattern: the day exists in the month.
fn check_calendar(s: &str) -> bool {
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<u32>().ok());
    let (Some(year), Some(month), Some(day)) = (num(0..4), num(5..7), num(8..10)) else {
        return true; // year or year-month only
    };
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    let max = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    day >= 1 && day <= max
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errs(v: &Value) -> Vec<Issue> {
        validate(v).err().unwrap_or_default()
    }

    fn paths(v: &Value) -> Vec<String> {
        errs(v).into_iter().filter_map(|i| i.path).collect()
    }

    pub(crate) fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "pat-1",
            "meta": {"versionId": "1", "lastUpdated": "2024-01-02T03:04:05.123Z"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
            "identifier": [{"system": "http://hospital.example/mrn", "value": "12345"}],
            "active": true,
            "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
            "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work", "rank": 1}],
            "gender": "male",
            "birthDate": "1974-12-25",
            "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
            "deceasedBoolean": false,
            "address": [{"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille", "postalCode": "3999", "period": {"start": "1974-12-25"}}],
            "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}], "name": {"family": "du Marché"}}],
            "managingOrganization": {"reference": "Organization/1"}
        })
    }

    pub(crate) fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "f001",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "15074-8", "display": "Glucose [Moles/volume] in Blood"}]},
            "subject": {"reference": "Patient/f001", "display": "P. van de Heuvel"},
            "effectivePeriod": {"start": "2013-04-02T09:30:10+01:00"},
            "issued": "2013-04-03T15:30:10.000+01:00",
            "performer": [{"reference": "Practitioner/f005"}],
            "valueQuantity": {"value": 6.3, "unit": "mmol/l", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
            "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "H"}]}],
            "referenceRange": [{"low": {"value": 3.1, "unit": "mmol/l"}, "high": {"value": 6.2, "unit": "mmol/l"}}],
            "component": [{"code": {"text": "x"}, "valueInteger": 3}]
        })
    }

    #[test]
    fn schema_loads_with_r4_resources_only() {
        assert!(schema().is_some(), "{:?}", SCHEMA.as_ref().err());
        assert_eq!(resource_types().count(), 146);
        assert!(is_known_resource_type("Patient"));
        assert!(is_known_resource_type("VisionPrescription"));
        assert!(!is_known_resource_type("Project"));
        assert!(!is_known_resource_type("User"));
        assert!(!is_known_resource_type("patient"));
        assert!(!is_known_resource_type("Resource"));
        assert!(!is_known_resource_type("ResourceList"));
    }

    #[test]
    fn valid_resources_pass() {
        assert_eq!(validate(&patient()), Ok(()));
        assert_eq!(validate(&observation()), Ok(()));
        let mut p = patient();
        p["contained"] = json!([{"resourceType": "Organization", "id": "o1", "name": "Acme"}]);
        p["managingOrganization"] = json!({"reference": "#o1"});
        assert_eq!(validate(&p), Ok(()));
    }

    #[test]
    fn valid_bundle_passes() {
        let b = json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                 "resource": patient(),
                 "request": {"method": "POST", "url": "Patient"}},
                {"resource": observation(), "request": {"method": "PUT", "url": "Observation/f001"}},
                {"request": {"method": "DELETE", "url": "Observation/x"}}
            ]
        });
        assert_eq!(validate(&b), Ok(()));
    }

    #[test]
    fn unknown_property() {
        let mut p = patient();
        p["favouriteColour"] = json!("blue");
        p["name"][0]["nickname"] = json!("Pete");
        let ps = paths(&p);
        assert!(
            ps.contains(&"Patient.favouriteColour".to_string()),
            "{ps:?}"
        );
        assert!(
            ps.contains(&"Patient.name[0].nickname".to_string()),
            "{ps:?}"
        );
        // Medplum-only additions are rejected as in R4.
        let mut p = patient();
        p["meta"]["project"] = json!("x");
        assert_eq!(paths(&p), vec!["Patient.meta.project"]);
    }

    #[test]
    fn wrong_types() {
        let mut p = patient();
        p["active"] = json!("yes");
        p["name"] = json!({"family": "x"});
        p["name2"] = json!(1);
        p["telecom"][0]["rank"] = json!(0);
        p["address"][0]["line"][0] = json!(5);
        let e = errs(&p);
        let ps: Vec<_> = e.iter().filter_map(|i| i.path.clone()).collect();
        for want in [
            "Patient.active",
            "Patient.name",
            "Patient.name2",
            "Patient.telecom[0].rank",
            "Patient.address[0].line[0]",
        ] {
            assert!(ps.contains(&want.to_string()), "{want} missing from {ps:?}");
        }
    }

    #[test]
    fn the_shipped_date_time_patterns_are_matched_by_hand() {
        let raw = raw_schema().unwrap();
        for name in ["date", "dateTime", "instant", "time"] {
            let p = raw["definitions"][name]["pattern"].as_str().unwrap();
            assert!(crate::formats::Format::of_pattern(p).is_some(), "{name}");
        }
        // and no regex is left for them: every compiled regex is some other pattern
        let schema = SCHEMA.as_ref().unwrap();
        for re in &schema.regexes {
            assert!(crate::formats::Format::of_pattern(re.as_str()).is_none());
        }
    }

    #[test]
    fn primitive_formats() {
        for (field, bad) in [
            ("birthDate", json!("1974-13-01")),
            ("birthDate", json!("1974-02-30")),
            ("birthDate", json!("25/12/1974")),
            ("birthDate", json!("")),
            ("id", json!("bad id")),
            ("id", json!("x".repeat(65))),
            ("gender", json!("robot")),
            ("deceasedDateTime", json!("2020-01-01T10:00")),
            ("implicitRules", json!("has space")),
            ("language", json!(" en")),
        ] {
            let mut p = patient();
            p[field] = bad;
            assert!(!paths(&p).is_empty(), "{field} accepted");
        }
        let mut p = patient();
        p["birthDate"] = json!("2000-02-29");
        p["deceasedDateTime"] = json!("2020");
        assert_eq!(validate(&p), Ok(()));
        let mut o = observation();
        o["component"][0]["valueInteger"] = json!(2.5);
        assert!(validate(&o).is_err());
        o["component"][0]["valueInteger"] = json!(3_000_000_000u64);
        assert!(validate(&o).is_err());
        o["component"][0]["valueInteger"] = json!(-5);
        assert_eq!(validate(&o), Ok(()));
        o["issued"] = json!("2013-04-03");
        assert!(validate(&o).is_err());
    }

    #[test]
    fn resource_type_problems() {
        assert!(validate(&json!({"resourceType": "Nope"})).is_err());
        assert!(validate(&json!({"resourceType": "Project", "name": "x"})).is_err());
        assert!(validate(&json!({"id": "x"})).is_err());
        assert!(validate(&json!({"resourceType": 5})).is_err());
        assert!(validate(&json!([1])).is_err());
        assert!(validate(&json!("Patient")).is_err());
        let mut p = patient();
        p["contained"] = json!([{"id": "o1"}]);
        assert_eq!(paths(&p), vec!["Patient.contained[0]"]);
        p["contained"] = json!([{"resourceType": "Organization", "bogus": 1}]);
        assert_eq!(paths(&p), vec!["Patient.contained[0].bogus"]);
        // The top-level resourceType mismatched with const is impossible by dispatch, but a
        // Bundle entry with an invalid nested resource is reported with its path.
        let b = json!({"resourceType": "Bundle", "type": "batch",
            "entry": [{"resource": {"resourceType": "Patient", "birthDate": "x"}}]});
        assert_eq!(paths(&b), vec!["Bundle.entry[0].resource.birthDate"]);
    }

    #[test]
    fn required_elements() {
        // The R4 JSON schema lists only complex-typed mandatory elements in `required`
        // (primitives may be present as `_x` alone), e.g. Observation.code, Claim.patient.
        let mut o = observation();
        if let Some(m) = o.as_object_mut() {
            m.remove("code");
        }
        let e = errs(&o);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].code, IssueCode::Required);
        assert_eq!(e[0].path.as_deref(), Some("Observation.code"));
        let n = json!({"resourceType": "Patient", "text": {"status": "generated"}});
        assert_eq!(paths(&n), vec!["Patient.text.div"]);
        // A primitive may be present only as its extension sibling.
        let mut o = observation();
        if let Some(m) = o.as_object_mut() {
            m.remove("status");
        }
        o["_status"] = json!({"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]});
        assert_eq!(validate(&o), Ok(()));
    }

    #[test]
    fn nulls_empties_and_extension_arrays() {
        let mut p = patient();
        p["name"][0]["given"] = json!(["Peter", null]);
        p["name"][0]["_given"] =
            json!([null, {"extension": [{"url": "http://x", "valueString": "y"}]}]);
        assert_eq!(validate(&p), Ok(()));
        p["telecom"] = json!([]);
        p["meta"] = json!({});
        p["gender"] = Value::Null;
        p["identifier"] = json!([null]);
        assert_eq!(errs(&p).len(), 4, "{:?}", errs(&p));
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let mut v = json!("x");
        for _ in 0..200 {
            v = Value::Array(vec![v]);
        }
        let p = json!({"resourceType": "Patient", "name": v});
        assert!(validate(&p).is_err());
        // Deep through a recursive schema type (Extension.extension...).
        let mut ext = json!({"url": "http://x", "valueString": "y"});
        for _ in 0..200 {
            ext = json!({"url": "http://x", "extension": [ext]});
        }
        let p = json!({"resourceType": "Patient", "extension": [ext]});
        let e = errs(&p);
        assert!(e.iter().any(|i| i.code == IssueCode::TooCostly), "{e:?}");
        // A moderately nested (legal) extension tree is fine.
        let mut ext = json!({"url": "http://x", "valueString": "y"});
        for _ in 0..20 {
            ext = json!({"url": "http://x", "extension": [ext]});
        }
        assert_eq!(
            validate(&json!({"resourceType": "Patient", "extension": [ext]})),
            Ok(())
        );
    }

    #[test]
    fn issues_are_capped_and_free_of_values() {
        let mut m = Map::new();
        m.insert("resourceType".into(), json!("Patient"));
        for i in 0..500 {
            m.insert(format!("bad{i}"), json!("SECRET"));
        }
        m.insert("SECRET VALUE KEY".into(), json!(1));
        m.insert("birthDate".into(), json!("SECRET"));
        let e = errs(&Value::Object(m));
        assert_eq!(e.len(), MAX_ISSUES + 1);
        assert_eq!(e.last().map(|i| i.code), Some(IssueCode::TooCostly));
        for i in &e {
            assert!(!i.message.contains("SECRET"));
            assert!(!i.path.as_deref().unwrap_or("").contains("SECRET"));
        }
        let mut p = patient();
        p["SECRET VALUE"] = json!(1);
        p["birthDate"] = json!("SECRET");
        for i in errs(&p) {
            assert!(!i.message.contains("SECRET"), "{i:?}");
            assert!(!i.path.as_deref().unwrap_or("").contains("SECRET"), "{i:?}");
        }
    }

    #[test]
    fn helpers() {
        assert!(check_code("a b"));
        assert!(!check_code("a  b"));
        assert!(!check_code("a "));
        assert!(!check_code(""));
        assert!(check_string("a\tb\nc"));
        assert!(!check_string("a\u{0}b"));
        assert!(check_base64("aGVsbG8="));
        assert!(!check_base64("aGVsbG8"));
        assert!(!check_base64("aGVs*G8="));
        assert!(check_calendar("2024-02-29T00:00:00Z"));
        assert!(!check_calendar("2023-02-29"));
        assert!(!check_calendar("1900-02-29"));
        assert!(check_calendar("2000-02-29"));
        assert!(check_calendar("2023-04"));
    }

    /// Criterion-free throughput smoke test: typical resources validate quickly.
    #[test]
    fn micro_throughput() {
        let p = patient();
        let o = observation();
        assert_eq!(validate(&p), Ok(()));
        let n = 2_000;
        let start = std::time::Instant::now();
        for _ in 0..n {
            assert!(validate(&p).is_ok());
            assert!(validate(&o).is_ok());
        }
        let per_sec = (2 * n) as f64 / start.elapsed().as_secs_f64();
        eprintln!("validate: {per_sec:.0} resources/s (debug build unless --release)");
        // Very loose floor so shared CI machines and debug builds pass.
        assert!(per_sec > 1_000.0, "{per_sec}");
    }
}
