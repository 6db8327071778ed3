#![forbid(unsafe_code)]
//! Append-only audit events and their tamper-evident hash chain.
//!
//! Every access to PHI produces an [`AuditEvent`]. Events are encoded canonically
//! ([`AuditEvent::encode`]) and chained: the hash of event *n* covers the hash of
//! event *n-1*, its sequence number and its bytes, with a domain-separation prefix
//! so a chain hash can never be confused with any other hash the system computes.
//! The head of the chain (size and hash) is signed by the server's audit key, so
//! truncating the log is detected as well as editing, deleting, inserting or
//! reordering events ([`verify_chain`]).
//!
//! The log is also an RFC 9162 Merkle tree ([`merkle`]) whose signed checkpoints a
//! witness keeps; [`verify::verify_log`] checks a whole log, its checkpoints and a
//! witness file offline (`phivault audit verify`).
//!
//! This crate knows nothing of HTTP or storage engines: the store persists the
//! bytes and the hashes this crate computes, and hands them back through
//! [`verify::Source`].
//!
//! # Design
//!
//! Every request that touches a resource route — reads, writes, searches, denied (401/403) and
//! failed attempts, and token issuance — produces an event: who (client), what (action,
//! interaction, resource type/id/version), which patient, outcome, when, from where, request
//! id, and — when a client acts for a person or a person signs in — the person's account id
//! (an opaque UUID, never a login name, so the audit table names nobody). A transaction is one
//! event listing each entry as an entity. Events are encoded canonically (binary,
//! `AuditEvent::encode`; format byte 1, or 2 for events that carry a person) and chained:
//! `h_n = SHA-256("phivault-audit-chain-v1" ‖ h_{n-1} ‖ n ‖ len ‖ event)`. After every group
//! commit the head (size, hash) is signed with the audit key and stored in the same
//! transaction. `phivault audit verify` recomputes the chain offline, checks the head
//! signature with the key opened from the data directory, and names the first failing
//! position; deletion, insertion, reordering, editing and truncation are all detected.
//!
//! Auditors read the log through `GET /fhir/AuditEvent` (`server's `handlers/audit.rs``): each
//! event shown as a FHIR AuditEvent, filtered by patient, user, client or action, paged by
//! position. The events are also the leaves of an RFC 9162 Merkle tree (`audit/src/merkle.rs`:
//! `SHA-256(0x00 ‖ event)` leaves, `SHA-256(0x01 ‖ l ‖ r)` nodes; tree heads, an append-only
//! frontier, inclusion and consistency proofs). The writer keeps the tree's frontier and, at
//! most every 2 s while events come, writes a checkpoint in the group's transaction:
//! `audit_checkpoint(size, root, time_ms, signature, frontier)`, signed with the audit key over
//! a domain-separated message; only the newest row keeps its frontier, from which a restart
//! resumes (replaying the events after it). `audit verify` recomputes the tree in the same pass
//! as the chain and checks every checkpoint, stored or from a `--witness` file exported with
//! `audit checkpoints`; a witness kept off the server catches a whole-log rewrite re-signed
//! with the real keys and a rollback. Auditors get inclusion proofs
//! (`GET /fhir/AuditEvent/{seq}/$proof?size=N`) and consistency proofs
//! (`GET /fhir/AuditEvent/$consistency?first=M&second=N`) as Parameters resources; they are
//! computed from the events (no interior nodes are stored), so bounded to trees of 2,000,000
//! events until stored subtree roots make them logarithmic.
//!
//! Snooping rules over these events, their alerts and the watcher that runs them are
//! `phivault_records::snoop` and `phivault_records::watch`.
//!
//! Audit events carry a `Detail` (IHE BALP; event format bytes 3 and 4): the purpose of use
//! from the person's role (`ETREAT` when the patient is reached only by a break-the-glass
//! window), the `User-Agent`, and the names of a search's known parameters — not their values,
//! which may be names or birth dates. A refused request's detail may also carry a reason code
//! chosen by the server (`assertion-expired`, `unknown-kid`, `scope-not-registered`, … for the
//! token endpoint; shown as the AuditEvent's `outcomeDesc`): format bytes 5 and 6, which are 3
//! and 4 with the reason after the detail. Events without a reason keep their old encoding.

pub mod merkle;
pub mod verify;

use ring::digest;
use serde::{Deserialize, Serialize};

/// Domain-separation label of chain hashes.
const CHAIN_DOMAIN: &[u8] = b"phivault-audit-chain-v1\0";
/// Domain-separation label of signed heads.
const HEAD_DOMAIN: &[u8] = b"phivault-audit-head-v1\0";
/// Domain-separation label of signed heads that carry the store's state (see
/// [`ChainHead::signing_message_with`]).
const HEAD_STATE_DOMAIN: &[u8] = b"phivault-audit-head-v2\0";

/// The hash that precedes the first event.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// What was done (FHIR AuditEvent.action).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// create
    C,
    /// read / vread / history / search
    R,
    /// update
    U,
    /// delete
    D,
    /// execute (batch, transaction, token issuance, other operations)
    E,
}

/// How it ended (FHIR AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure, 12 major failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// AuditEvent outcome code.
    pub code: u8,
    /// HTTP status the client received.
    pub http_status: u16,
}

impl Outcome {
    /// Outcome for an HTTP status.
    pub fn from_http(status: u16) -> Self {
        let code = match status {
            200..=399 => 0,
            400..=499 => 4,
            _ => 8,
        };
        Outcome {
            code,
            http_status: status,
        }
    }
}

/// One audit record: who, what, which patient, when, from where, how it ended.
///
/// Holds identifiers only (server-assigned resource ids, client ids, addresses) — never
/// resource content, names or query strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Request id (also returned to the client as `X-Request-Id`).
    pub request_id: String,
    /// Authenticated client id, or `None` for requests that failed authentication.
    pub client_id: Option<String>,
    /// The person's account id (a UUID, never a name) when the client acts for one or a
    /// person signs in; `None` for back-end clients.
    pub user: Option<String>,
    /// Action category.
    pub action: Action,
    /// FHIR interaction name (read, vread, create, update, delete, history-instance, history-type, batch, transaction, token, ...).
    pub interaction: String,
    /// Resource type touched, if any.
    pub resource_type: Option<String>,
    /// Resource id touched, if any.
    pub resource_id: Option<String>,
    /// Resource version touched, if any.
    pub version: Option<u64>,
    /// Patient whose compartment holds the resource, if any.
    pub patient: Option<String>,
    /// Outcome.
    pub outcome: Outcome,
    /// Source network address of the client.
    pub source: String,
    /// Further resources the request touched (e.g. the entries of a transaction),
    /// each with its own action.
    pub entities: Vec<Entity>,
    /// Context of the access (IHE BALP): purpose of use, user agent, search parameters.
    pub detail: Detail,
    /// What the request stored, as the store committed it: every version written and
    /// every settings row changed (set by the store when it commits the event; see
    /// [`Write`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writes: Vec<Write>,
}

/// One thing a write stored, committed in the audit log so that the log, signed and
/// witnessed, says exactly what the store must hold: a storage writer who deletes, rolls
/// back, forges or restores a row is found by replaying these against the store.
/// Identifiers and digests only, never content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Write {
    /// A resource version (a delete's tombstone when `deleted`).
    Version {
        /// Resource type.
        resource_type: String,
        /// Resource id.
        resource_id: String,
        /// Version number.
        version: u64,
        /// Whether it is a tombstone.
        deleted: bool,
        /// SHA-256 of the sealed bytes as stored (empty for a tombstone).
        sealed: [u8; 32],
    },
    /// A settings row set to a new value; `mac` is the row's MAC (key and value, under a
    /// key derived from the master key), so the value itself is not recorded.
    Setting {
        /// The row's key.
        key: String,
        /// The row's MAC.
        mac: [u8; 32],
    },
}

/// Most writes one event may commit.
pub const MAX_WRITES: usize = 100_000;

/// The context of an access that IHE BALP records beyond who, what and where: the purpose
/// of use, the client software and the names (never the values) of the search parameters;
/// for a refused request, the machine-readable reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detail {
    /// Purpose of use, a v3 ActReason code: `TREAT`, `ETREAT` (break-the-glass),
    /// `PATRQT` (the patient's own request), `HSYSADMIN` (audit review).
    pub purpose: Option<String>,
    /// The client's `User-Agent`, printable ASCII only, at most [`MAX_AGENT`] bytes.
    pub user_agent: Option<String>,
    /// The names of the search parameters of a search (`family`, `birthdate`, …), at most
    /// [`MAX_QUERY_NAMES`]; their values are never recorded.
    pub query: Vec<String>,
    /// Why the request was refused, as a short, stable code chosen by the server (lower-case
    /// words joined by `-`, e.g. `assertion-expired`, `jti-replayed`): never caller input, so
    /// never PHI. Set with [`Detail::refused_because`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the server must record but may not show in the clear — the text a SMART Health
    /// Link's requester gave as `recipient` — sealed by the server (opaque here, at most
    /// [`MAX_NOTE`] bytes); it opens only with the data directory's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<Vec<u8>>,
}

/// Most bytes of a sealed [`Detail::note`].
pub const MAX_NOTE: usize = 2048;

impl Detail {
    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.purpose.is_none()
            && self.user_agent.is_none()
            && self.query.is_empty()
            && self.reason.is_none()
    }

    /// Records why the request was refused: `code` is one of the server's own fixed codes
    /// (a `&'static str`, so not something a request carried).
    pub fn refused_because(&mut self, code: &'static str) {
        self.reason = Some(code.to_owned());
    }

    /// A `User-Agent` value as recorded: printable ASCII, at most [`MAX_AGENT`] bytes.
    pub fn clean_agent(raw: &[u8]) -> Option<String> {
        let s: String = raw
            .iter()
            .filter(|b| (0x20..0x7f).contains(*b))
            .take(MAX_AGENT)
            .map(|b| char::from(*b))
            .collect();
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_owned())
    }
}

/// Longest user agent recorded.
pub const MAX_AGENT: usize = 200;
/// Most search parameter names recorded.
pub const MAX_QUERY_NAMES: usize = 32;

/// One more resource touched by a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    /// What was done to it.
    pub action: Action,
    /// Resource type.
    pub resource_type: String,
    /// Resource id.
    pub resource_id: String,
    /// Version written or read.
    pub version: Option<u64>,
    /// Patient whose compartment holds it.
    pub patient: Option<String>,
}

impl Entity {
    /// A resource of `patient`'s read (disclosed): what a share link or an export file
    /// hands out, one entity each.
    pub fn disclosed(resource_type: &str, resource_id: &str, patient: &str) -> Entity {
        Entity {
            action: Action::R,
            resource_type: resource_type.to_owned(),
            resource_id: resource_id.to_owned(),
            version: None,
            patient: Some(patient.to_owned()),
        }
    }

    /// Patients whose records were disclosed, one entity each (at most [`MAX_ENTITIES`]).
    pub fn patients<'a>(ids: impl IntoIterator<Item = &'a String>) -> Vec<Entity> {
        ids.into_iter()
            .take(MAX_ENTITIES)
            .map(|p| Entity::disclosed("Patient", p, p))
            .collect()
    }
}

/// Format byte of the binary event encoding (events without a user).
const FORMAT_V1: u8 = 1;
/// Format byte of events that name a user (the user follows the client id).
const FORMAT_V2: u8 = 2;
/// Format byte 1 with a [`Detail`] after the entities.
const FORMAT_V3: u8 = 3;
/// Format byte 2 with a [`Detail`] after the entities.
const FORMAT_V4: u8 = 4;
/// Format byte 3 with a reason ([`Detail::reason`]) after the detail.
const FORMAT_V5: u8 = 5;
/// Format byte 4 with a reason ([`Detail::reason`]) after the detail.
const FORMAT_V6: u8 = 6;
/// An event that commits writes ([`AuditEvent::writes`]): a flags byte (bit 0: a user,
/// bit 1: a [`Detail`], bit 2: a reason) and the fields as in formats 1 to 6, then the
/// writes. Events without writes keep formats 1 to 6.
const FORMAT_V7: u8 = 7;
/// Format 8: an event with a sealed note ([`Detail::note`]): a flags byte (bit 0: a user,
/// bit 1: a [`Detail`], bit 2: a reason, bit 3: writes), the fields as in format 7, the
/// writes when flagged, then the note.
const FORMAT_V8: u8 = 8;
/// Most entities one event may carry.
pub const MAX_ENTITIES: usize = 100_000;

impl AuditEvent {
    /// Canonical, compact binary encoding (format byte 1, or 2 when the event names a
    /// user; 3 and 4 likewise when it has a [`Detail`], which follows the entities; 5 and
    /// 6 when that detail has a reason, which follows it): fixed field order, varint
    /// lengths, UUID-shaped identifiers packed into 16 bytes. Every event has exactly one
    /// encoding, so the chain hash is well defined.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(96 + self.entities.len() * 40 + self.writes.len() * 80);
        if self.detail.note.is_some() {
            w.push(FORMAT_V8);
            let has_detail = !self.detail.is_empty();
            w.push(
                u8::from(self.user.is_some())
                    | u8::from(has_detail) << 1
                    | u8::from(has_detail && self.detail.reason.is_some()) << 2
                    | u8::from(!self.writes.is_empty()) << 3,
            );
        } else if self.writes.is_empty() {
            w.push(
                match (
                    self.user.is_some(),
                    self.detail.is_empty(),
                    self.detail.reason.is_some(),
                ) {
                    (false, true, _) => FORMAT_V1,
                    (true, true, _) => FORMAT_V2,
                    (false, false, false) => FORMAT_V3,
                    (true, false, false) => FORMAT_V4,
                    (false, false, true) => FORMAT_V5,
                    (true, false, true) => FORMAT_V6,
                },
            );
        } else {
            w.push(FORMAT_V7);
            let has_detail = !self.detail.is_empty();
            w.push(
                u8::from(self.user.is_some())
                    | u8::from(has_detail) << 1
                    | u8::from(has_detail && self.detail.reason.is_some()) << 2,
            );
        }
        w.extend_from_slice(&self.time_ms.to_be_bytes());
        put_ident(&mut w, &self.request_id);
        put_opt_ident(&mut w, self.client_id.as_deref());
        if let Some(u) = &self.user {
            put_ident(&mut w, u);
        }
        w.push(self.action.code());
        put_str(&mut w, &self.interaction);
        put_opt_str(&mut w, self.resource_type.as_deref());
        put_opt_ident(&mut w, self.resource_id.as_deref());
        put_opt_u64(&mut w, self.version);
        put_opt_ident(&mut w, self.patient.as_deref());
        w.push(self.outcome.code);
        w.extend_from_slice(&self.outcome.http_status.to_be_bytes());
        put_str(&mut w, &self.source);
        put_varint(&mut w, self.entities.len() as u64);
        let mut last_patient: Option<&str> = self.patient.as_deref();
        for e in &self.entities {
            w.push(e.action.code());
            put_str(&mut w, &e.resource_type);
            put_ident(&mut w, &e.resource_id);
            put_opt_u64(&mut w, e.version);
            // patient: 0 none, 1 same as the previous one, 2 explicit
            match e.patient.as_deref() {
                None => w.push(0),
                Some(p) if Some(p) == last_patient => w.push(1),
                Some(p) => {
                    w.push(2);
                    put_ident(&mut w, p);
                }
            }
            if e.patient.is_some() {
                last_patient = e.patient.as_deref();
            }
        }
        if !self.detail.is_empty() {
            put_opt_str(&mut w, self.detail.purpose.as_deref());
            put_opt_str(&mut w, self.detail.user_agent.as_deref());
            put_varint(&mut w, self.detail.query.len() as u64);
            for q in &self.detail.query {
                put_str(&mut w, q);
            }
            if let Some(r) = &self.detail.reason {
                put_str(&mut w, r);
            }
        }
        if !self.writes.is_empty() {
            put_varint(&mut w, self.writes.len() as u64);
            for wr in &self.writes {
                wr.encode(&mut w);
            }
        }
        if let Some(n) = &self.detail.note {
            put_varint(&mut w, n.len() as u64);
            w.extend_from_slice(n);
        }
        w
    }

    /// Decode stored bytes; rejects anything that is not exactly a canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, AuditError> {
        let mut r = Reader { b: bytes, pos: 0 };
        let format = r.u8()?;
        // (has a user, has a detail, has a reason, has writes)
        let mut has_note = false;
        let (has_user, has_detail, has_reason, has_writes) = match format {
            FORMAT_V1..=FORMAT_V6 => (
                matches!(format, FORMAT_V2 | FORMAT_V4 | FORMAT_V6),
                format >= FORMAT_V3,
                format >= FORMAT_V5,
                false,
            ),
            FORMAT_V7 => {
                let flags = r.u8()?;
                if flags & !7 != 0 {
                    return Err(AuditError::Malformed);
                }
                (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0, true)
            }
            FORMAT_V8 => {
                let flags = r.u8()?;
                if flags & !15 != 0 {
                    return Err(AuditError::Malformed);
                }
                has_note = true;
                (
                    flags & 1 != 0,
                    flags & 2 != 0,
                    flags & 4 != 0,
                    flags & 8 != 0,
                )
            }
            _ => return Err(AuditError::Malformed),
        };
        let time_ms = u64::from_be_bytes(r.array::<8>()?);
        let request_id = r.ident()?;
        let client_id = r.opt(|r| r.ident())?;
        let user = if has_user { Some(r.ident()?) } else { None };
        let action = Action::from_code(r.u8()?)?;
        let interaction = r.string()?;
        let resource_type = r.opt(|r| r.string())?;
        let resource_id = r.opt(|r| r.ident())?;
        let version = r.opt(|r| r.varint())?;
        let patient = r.opt(|r| r.ident())?;
        let code = r.u8()?;
        let http_status = u16::from_be_bytes(r.array::<2>()?);
        let source = r.string()?;
        let n = r.varint()?;
        if n > MAX_ENTITIES as u64 {
            return Err(AuditError::Malformed);
        }
        let mut entities = Vec::with_capacity(n as usize);
        let mut last_patient = patient.clone();
        for _ in 0..n {
            let action = Action::from_code(r.u8()?)?;
            let resource_type = r.string()?;
            let resource_id = r.ident()?;
            let version = r.opt(|r| r.varint())?;
            let p = match r.u8()? {
                0 => None,
                1 => Some(last_patient.clone().ok_or(AuditError::Malformed)?),
                2 => Some(r.ident()?),
                _ => return Err(AuditError::Malformed),
            };
            if p.is_some() {
                last_patient = p.clone();
            }
            entities.push(Entity {
                action,
                resource_type,
                resource_id,
                version,
                patient: p,
            });
        }
        let mut detail = Detail::default();
        if has_detail {
            detail.purpose = r.opt(|r| r.string())?;
            detail.user_agent = r.opt(|r| r.string())?;
            let n = r.varint()?;
            if n > MAX_QUERY_NAMES as u64 {
                return Err(AuditError::Malformed);
            }
            for _ in 0..n {
                detail.query.push(r.string()?);
            }
            if has_reason {
                detail.reason = Some(r.string()?);
            }
        }
        let mut writes = Vec::new();
        if has_writes {
            let n = r.varint()?;
            if n == 0 || n > MAX_WRITES as u64 {
                return Err(AuditError::Malformed);
            }
            for _ in 0..n {
                writes.push(Write::decode(&mut r)?);
            }
        }
        if has_note {
            let n = usize::try_from(r.varint()?).map_err(|_| AuditError::Malformed)?;
            if n > MAX_NOTE {
                return Err(AuditError::Malformed);
            }
            let end = r.pos.checked_add(n).ok_or(AuditError::Malformed)?;
            detail.note = Some(r.b.get(r.pos..end).ok_or(AuditError::Malformed)?.to_vec());
            r.pos = end;
        }
        if r.pos != bytes.len() {
            return Err(AuditError::Malformed);
        }
        let ev = AuditEvent {
            time_ms,
            request_id,
            client_id,
            user,
            action,
            interaction,
            resource_type,
            resource_id,
            version,
            patient,
            outcome: Outcome { code, http_status },
            source,
            entities,
            detail,
            writes,
        };
        // canonical: re-encoding must give the same bytes
        if ev.encode() != bytes {
            return Err(AuditError::Malformed);
        }
        Ok(ev)
    }
}

impl Write {
    fn encode(&self, w: &mut Vec<u8>) {
        match self {
            Write::Version {
                resource_type,
                resource_id,
                version,
                deleted,
                sealed,
            } => {
                w.push(if *deleted { b'D' } else { b'V' });
                put_str(w, resource_type);
                put_ident(w, resource_id);
                put_varint(w, *version);
                w.extend_from_slice(sealed);
            }
            Write::Setting { key, mac } => {
                w.push(b'S');
                put_str(w, key);
                w.extend_from_slice(mac);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, AuditError> {
        Ok(match r.u8()? {
            kind @ (b'V' | b'D') => Write::Version {
                resource_type: r.string()?,
                resource_id: r.ident()?,
                version: r.varint()?,
                deleted: kind == b'D',
                sealed: r.array::<32>()?,
            },
            b'S' => Write::Setting {
                key: r.string()?,
                mac: r.array::<32>()?,
            },
            _ => return Err(AuditError::Malformed),
        })
    }
}

impl Action {
    fn code(self) -> u8 {
        match self {
            Action::C => b'C',
            Action::R => b'R',
            Action::U => b'U',
            Action::D => b'D',
            Action::E => b'E',
        }
    }

    fn from_code(c: u8) -> Result<Self, AuditError> {
        Ok(match c {
            b'C' => Action::C,
            b'R' => Action::R,
            b'U' => Action::U,
            b'D' => Action::D,
            b'E' => Action::E,
            _ => return Err(AuditError::Malformed),
        })
    }
}

fn put_varint(w: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            w.push(b);
            return;
        }
        w.push(b | 0x80);
    }
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    put_varint(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

fn put_opt_str(w: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => w.push(0),
        Some(s) => {
            w.push(1);
            put_str(w, s);
        }
    }
}

fn put_opt_u64(w: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => w.push(0),
        Some(v) => {
            w.push(1);
            put_varint(w, v);
        }
    }
}

/// Lower-case hyphenated UUID text, as 16 bytes (None for any other text, so the
/// mapping is a bijection between canonical UUID strings and 16-byte values).
pub fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut i = 0;
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        let hex = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[n] = hex(b[i])? << 4 | hex(b[i + 1])?;
        n += 1;
        i += 2;
    }
    Some(out)
}

/// The canonical text of a 16-byte UUID.
pub fn uuid_text(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(HEX[usize::from(x >> 4)]));
        s.push(char::from(HEX[usize::from(x & 0xf)]));
    }
    s
}

/// An identifier: tag 0 + string, or tag 1 + 16 bytes for a canonical UUID.
fn put_ident(w: &mut Vec<u8>, s: &str) {
    match uuid_bytes(s) {
        Some(u) => {
            w.push(1);
            w.extend_from_slice(&u);
        }
        None => {
            w.push(0);
            put_str(w, s);
        }
    }
}

fn put_opt_ident(w: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => w.push(0),
        Some(s) => {
            w.push(1);
            put_ident(w, s);
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, AuditError> {
        let v = *self.b.get(self.pos).ok_or(AuditError::Malformed)?;
        self.pos += 1;
        Ok(v)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], AuditError> {
        let end = self.pos.checked_add(N).ok_or(AuditError::Malformed)?;
        let s = self.b.get(self.pos..end).ok_or(AuditError::Malformed)?;
        self.pos = end;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }
    fn varint(&mut self) -> Result<u64, AuditError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(AuditError::Malformed)
    }
    fn string(&mut self) -> Result<String, AuditError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| AuditError::Malformed)?;
        let end = self.pos.checked_add(n).ok_or(AuditError::Malformed)?;
        let s = self.b.get(self.pos..end).ok_or(AuditError::Malformed)?;
        self.pos = end;
        String::from_utf8(s.to_vec()).map_err(|_| AuditError::Malformed)
    }
    fn ident(&mut self) -> Result<String, AuditError> {
        match self.u8()? {
            0 => self.string(),
            1 => Ok(uuid_text(&self.array::<16>()?)),
            _ => Err(AuditError::Malformed),
        }
    }
    fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, AuditError>,
    ) -> Result<Option<T>, AuditError> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            _ => Err(AuditError::Malformed),
        }
    }
}

/// Errors of this crate.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    /// Stored event bytes do not decode.
    #[error("audit event is malformed")]
    Malformed,
}

/// The chain hash of event `seq` (1-based) with canonical bytes `event`, following `prev`.
pub fn chain_hash(prev: &[u8; 32], seq: u64, event: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(CHAIN_DOMAIN);
    ctx.update(prev);
    ctx.update(&seq.to_be_bytes());
    ctx.update(&(event.len() as u64).to_be_bytes());
    ctx.update(event);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The head of the chain: how many events, and the hash of the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// Number of events.
    pub size: u64,
    /// Chain hash of the last event ([`GENESIS`] when empty).
    pub hash: [u8; 32],
}

impl ChainHead {
    /// The empty chain.
    pub const EMPTY: ChainHead = ChainHead {
        size: 0,
        hash: GENESIS,
    };

    /// Extend the head by one event, returning the new event's hash.
    pub fn append(&mut self, event: &[u8]) -> [u8; 32] {
        self.size += 1;
        self.hash = chain_hash(&self.hash, self.size, event);
        self.hash
    }

    /// The message the audit key signs for this head.
    pub fn signing_message(&self) -> Vec<u8> {
        self.signing_message_with(&[])
    }

    /// The message the audit key signs for this head together with `state`, the store's
    /// sealed state summary (opaque here; empty for heads written before stores had one,
    /// which keep their first message).
    pub fn signing_message_with(&self, state: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(HEAD_STATE_DOMAIN.len() + 48 + state.len());
        m.extend_from_slice(if state.is_empty() {
            HEAD_DOMAIN
        } else {
            HEAD_STATE_DOMAIN
        });
        m.extend_from_slice(&self.size.to_be_bytes());
        m.extend_from_slice(&self.hash);
        if !state.is_empty() {
            m.extend_from_slice(&(state.len() as u64).to_be_bytes());
            m.extend_from_slice(state);
        }
        m
    }
}

/// One stored audit row as read back for verification.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Sequence number as stored.
    pub seq: u64,
    /// Event bytes as stored.
    pub event: Vec<u8>,
    /// Chain hash as stored.
    pub hash: Vec<u8>,
}

/// Why verification failed, and where.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The row at this position does not carry the expected sequence number (a row was deleted or inserted).
    #[error(
        "audit event at position {position}: sequence number {found} where {position} was expected (event deleted or inserted)"
    )]
    Sequence {
        /// 1-based position in the log.
        position: u64,
        /// Sequence number found there.
        found: u64,
    },
    /// The row's hash does not match its content and predecessor (edited, inserted or reordered).
    #[error(
        "audit event at position {position}: hash mismatch (event edited, inserted or reordered)"
    )]
    Hash {
        /// 1-based position.
        position: u64,
    },
    /// The event bytes do not decode.
    #[error("audit event at position {position}: malformed event")]
    Malformed {
        /// 1-based position.
        position: u64,
    },
    /// The log ends before or after the signed head.
    #[error(
        "audit log has {found} events but the signed head covers {signed} (events removed from or appended to the end)"
    )]
    Length {
        /// Size in the signed head.
        signed: u64,
        /// Size found.
        found: u64,
    },
    /// The last hash differs from the signed head.
    #[error("audit event at position {position}: does not match the signed head")]
    Head {
        /// Position of the signed head.
        position: u64,
    },
    /// The head's signature is invalid.
    #[error("the signed audit head has an invalid signature")]
    Signature,
    /// Reading the log failed.
    #[error("reading the audit log failed at position {position}")]
    Read {
        /// Position at which reading failed.
        position: u64,
    },
}

/// Incremental verifier: feed rows in sequence order, then [`ChainVerifier::finish`].
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    head: ChainHead,
    signed: Option<ChainHead>,
}

impl ChainVerifier {
    /// Start verifying against `signed_head`, whose signature the caller already checked
    /// (see [`verify_head_signature`]).
    pub fn new(signed_head: Option<ChainHead>) -> Self {
        ChainVerifier {
            head: ChainHead::EMPTY,
            signed: signed_head,
        }
    }

    /// Check the next row.
    pub fn push(&mut self, row: &StoredEvent) -> Result<(), VerifyError> {
        let position = self.head.size + 1;
        if row.seq != position {
            return Err(VerifyError::Sequence {
                position,
                found: row.seq,
            });
        }
        if AuditEvent::decode(&row.event).is_err() {
            return Err(VerifyError::Malformed { position });
        }
        let expected = self.head.append(&row.event);
        if row.hash.as_slice() != expected.as_slice() {
            return Err(VerifyError::Hash { position });
        }
        if let Some(signed) = self.signed
            && signed.size == position
            && signed.hash != expected
        {
            return Err(VerifyError::Head { position });
        }
        Ok(())
    }

    /// Events verified so far.
    pub fn size(&self) -> u64 {
        self.head.size
    }

    /// Finish: the log must end exactly at the signed head.
    pub fn finish(self) -> Result<ChainHead, VerifyError> {
        if let Some(signed) = self.signed
            && signed.size != self.head.size
        {
            return Err(VerifyError::Length {
                signed: signed.size,
                found: self.head.size,
            });
        }
        Ok(self.head)
    }
}

/// Verify a whole log read in sequence order against a signed head.
///
/// `signed_head` is the (size, hash) whose signature the caller already checked
/// (see [`verify_head_signature`]). Returns the recomputed head.
pub fn verify_chain<E>(
    rows: impl IntoIterator<Item = Result<StoredEvent, E>>,
    signed_head: Option<ChainHead>,
) -> Result<ChainHead, VerifyError> {
    let mut v = ChainVerifier::new(signed_head);
    for row in rows {
        let row = row.map_err(|_| VerifyError::Read {
            position: v.size() + 1,
        })?;
        v.push(&row)?;
    }
    v.finish()
}

/// Check an Ed25519 signature over a head and the store state signed with it (empty for
/// a head signed without one).
pub fn verify_head_signature(
    head: &ChainHead,
    state: &[u8],
    public_key: &[u8; 32],
    signature: &[u8],
) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(&head.signing_message_with(state), signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_round_trip_and_are_canonical() {
        let mut ev = event(3);
        ev.writes = vec![
            Write::Version {
                resource_type: "Observation".into(),
                resource_id: "0190a3e4-1111-7222-8333-444455556666".into(),
                version: 2,
                deleted: false,
                sealed: [7; 32],
            },
            Write::Version {
                resource_type: "Patient".into(),
                resource_id: "p-1".into(),
                version: 3,
                deleted: true,
                sealed: [0; 32],
            },
            Write::Setting {
                key: "client:abc".into(),
                mac: [9; 32],
            },
        ];
        for user in [
            None,
            Some("0190a3e4-1111-7222-8333-444455556666".to_owned()),
        ] {
            for reason in [None, Some("x-y".to_owned())] {
                let mut e = ev.clone();
                e.user = user.clone();
                e.detail.reason = reason.clone();
                let bytes = e.encode();
                assert_eq!(bytes[0], FORMAT_V7);
                assert_eq!(AuditEvent::decode(&bytes).unwrap(), e);
                // an unknown flag, or a write kind, is refused
                let mut bad = bytes.clone();
                bad[1] |= 8;
                assert!(AuditEvent::decode(&bad).is_err());
            }
        }
        // an event without writes keeps its old format
        let mut e = ev.clone();
        e.writes.clear();
        assert!(e.encode()[0] <= FORMAT_V6);
        // a sealed note: format 8, with and without writes, detail and user
        for (writes, reason, user) in [
            (ev.writes.clone(), Some("passcode-wrong"), Some("u")),
            (Vec::new(), None, None),
            (Vec::new(), Some("x"), None),
        ] {
            let mut e = ev.clone();
            e.writes = writes;
            e.detail = Detail::default();
            e.detail.reason = reason.map(str::to_owned);
            e.user = user.map(str::to_owned);
            e.detail.note = Some(vec![0xA5; 70]);
            let bytes = e.encode();
            assert_eq!(bytes[0], FORMAT_V8);
            assert_eq!(AuditEvent::decode(&bytes).unwrap(), e);
            let mut bad = bytes.clone();
            bad[1] |= 16;
            assert!(AuditEvent::decode(&bad).is_err());
            // cut or lengthened notes are refused
            assert!(AuditEvent::decode(&bytes[..bytes.len() - 1]).is_err());
            let mut long = bytes.clone();
            long.push(0);
            assert!(AuditEvent::decode(&long).is_err());
        }
    }

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            time_ms: 1_700_000_000_000 + i,
            request_id: format!("req-{i}"),
            client_id: Some("client-a".into()),
            user: (i % 2 == 1).then(|| format!("6d30932c-501a-49d4-a421-d44ff1175d{:02}", i % 100)),
            action: Action::R,
            interaction: "read".into(),
            resource_type: Some("Patient".into()),
            resource_id: Some(format!("id-{i}")),
            version: Some(1),
            patient: Some(format!("id-{i}")),
            outcome: Outcome::from_http(200),
            source: "127.0.0.1".into(),
            entities: vec![],
            detail: Default::default(),
            writes: Vec::new(),
        }
    }

    #[test]
    fn the_balp_detail_round_trips_and_has_one_encoding() {
        let mut e = event(1);
        e.detail = Detail {
            purpose: Some("ETREAT".into()),
            user_agent: Detail::clean_agent(b"fhirclient/4.2\r\nX-Injected: 1"),
            query: vec!["family".into(), "birthdate".into()],
            reason: None,
            note: None,
        };
        assert_eq!(
            e.detail.user_agent.as_deref(),
            Some("fhirclient/4.2X-Injected: 1"),
            "control characters dropped"
        );
        let bytes = e.encode();
        assert_eq!(bytes[0], FORMAT_V4);
        assert_eq!(AuditEvent::decode(&bytes).unwrap(), e);
        let mut no_user = e.clone();
        no_user.user = None;
        assert_eq!(no_user.encode()[0], FORMAT_V3);
        assert_eq!(AuditEvent::decode(&no_user.encode()).unwrap(), no_user);
        // an empty detail written out is not canonical: the format byte says it is there
        let mut plain = event(1);
        let mut padded = plain.encode();
        padded[0] = FORMAT_V4;
        padded.extend_from_slice(&[0, 0, 0]);
        assert!(AuditEvent::decode(&padded).is_err());
        // too many parameter names
        plain.detail.query = (0..=MAX_QUERY_NAMES).map(|i| format!("p{i}")).collect();
        assert!(AuditEvent::decode(&plain.encode()).is_err());
        assert_eq!(Detail::clean_agent(b"\x01\x02  "), None);
        assert_eq!(
            Detail::clean_agent(&[b'a'; 500]).map(|s| s.len()),
            Some(MAX_AGENT)
        );
    }

    /// A refusal's reason round-trips under format bytes 5 and 6, alone or beside the
    /// rest of the detail; events without one keep the encodings of before.
    #[test]
    fn a_reason_round_trips_and_leaves_other_encodings_alone() {
        let plain = event(2);
        let before = plain.encode();
        let mut e = plain.clone();
        e.detail.refused_because("assertion-expired");
        assert!(!e.detail.is_empty());
        let bytes = e.encode();
        assert_eq!(bytes[0], FORMAT_V5);
        assert_eq!(&bytes[1..before.len()], &before[1..]);
        let back = AuditEvent::decode(&bytes).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.detail.reason.as_deref(), Some("assertion-expired"));
        let mut with_user = e.clone();
        with_user.user = Some("6d30932c-501a-49d4-a421-d44ff1175c86".into());
        with_user.detail.user_agent = Some("curl/8".into());
        assert_eq!(with_user.encode()[0], FORMAT_V6);
        assert_eq!(AuditEvent::decode(&with_user.encode()).unwrap(), with_user);
        // without a reason, format 3 and 4 as before
        let mut no_reason = with_user.clone();
        no_reason.detail.reason = None;
        assert_eq!(no_reason.encode()[0], FORMAT_V4);
        // a reason byte string under a format byte that does not announce it is refused
        let mut relabelled = bytes.clone();
        relabelled[0] = FORMAT_V3;
        assert!(AuditEvent::decode(&relabelled).is_err());
        // and format 5 without the reason is truncated
        let mut short = e.clone();
        short.detail.reason = None;
        short.detail.purpose = Some("TREAT".into());
        let mut cut = short.encode();
        cut[0] = FORMAT_V5;
        assert!(AuditEvent::decode(&cut).is_err());
        // JSON without the field reads as no reason (and none is written)
        let j = serde_json::to_value(&plain).unwrap();
        assert!(j["detail"].get("reason").is_none());
        let mut old = serde_json::to_value(&e).unwrap();
        old["detail"].as_object_mut().unwrap().remove("reason");
        let read: AuditEvent = serde_json::from_value(old).unwrap();
        assert_eq!(read.detail.reason, None);
    }

    #[test]
    fn encoding_round_trips_and_is_compact() {
        let mut e = event(1);
        e.request_id = "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into();
        e.resource_id = Some("6d30932c-501a-49d4-a421-d44ff1175c86".into());
        e.patient = e.resource_id.clone();
        e.entities = (0..15)
            .map(|i| Entity {
                action: Action::C,
                resource_type: "Observation".into(),
                resource_id: format!("6d30932c-501a-49d4-a421-d44ff1175c{i:02}"),
                version: Some(1),
                patient: e.patient.clone(),
            })
            .collect();
        let bytes = e.encode();
        assert_eq!(AuditEvent::decode(&bytes).unwrap(), e);
        // a user costs 17 bytes (a UUID packed) and format byte 2
        assert!(bytes.len() < 117 + 15 * 35, "{} bytes", bytes.len());
        assert_eq!(bytes[0], FORMAT_V2);
        let mut plain = e.clone();
        plain.user = None;
        let plain_bytes = plain.encode();
        assert_eq!(plain_bytes[0], FORMAT_V1);
        assert_eq!(plain_bytes.len() + 17, bytes.len());
        assert_eq!(AuditEvent::decode(&plain_bytes).unwrap(), plain);
        // the format byte cannot be swapped to drop or invent the user
        let mut swapped = bytes.clone();
        swapped[0] = FORMAT_V1;
        assert!(AuditEvent::decode(&swapped).is_err());
        let mut swapped = plain_bytes.clone();
        swapped[0] = FORMAT_V2;
        assert!(AuditEvent::decode(&swapped).is_err());
        // non-canonical or truncated encodings are rejected
        for cut in 0..bytes.len() {
            assert!(AuditEvent::decode(&bytes[..cut]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(AuditEvent::decode(&longer).is_err());
        // an upper-case UUID is stored as a string and round-trips exactly
        let mut u = event(2);
        u.resource_id = Some("6D30932C-501A-49D4-A421-D44FF1175C86".into());
        assert_eq!(AuditEvent::decode(&u.encode()).unwrap(), u);
    }

    fn log(n: u64) -> (Vec<StoredEvent>, ChainHead) {
        let mut head = ChainHead::EMPTY;
        let rows = (1..=n)
            .map(|i| {
                let bytes = event(i).encode();
                let hash = head.append(&bytes);
                StoredEvent {
                    seq: i,
                    event: bytes,
                    hash: hash.to_vec(),
                }
            })
            .collect();
        (rows, head)
    }

    fn check(rows: Vec<StoredEvent>, head: ChainHead) -> Result<ChainHead, VerifyError> {
        verify_chain(rows.into_iter().map(Ok::<_, ()>), Some(head))
    }

    #[test]
    fn intact_log_verifies() {
        let (rows, head) = log(10);
        assert_eq!(check(rows, head), Ok(head));
    }

    #[test]
    fn edit_is_found_at_its_position() {
        let (mut rows, head) = log(10);
        let mut e = AuditEvent::decode(&rows[4].event).unwrap();
        e.outcome = Outcome::from_http(403);
        rows[4].event = e.encode();
        assert_eq!(check(rows, head), Err(VerifyError::Hash { position: 5 }));
    }

    #[test]
    fn deletion_is_found() {
        let (mut rows, head) = log(10);
        rows.remove(3);
        assert_eq!(
            check(rows, head),
            Err(VerifyError::Sequence {
                position: 4,
                found: 5
            })
        );
    }

    #[test]
    fn deletion_with_renumbering_is_found() {
        let (mut rows, head) = log(10);
        rows.remove(3);
        for (i, r) in rows.iter_mut().enumerate() {
            r.seq = i as u64 + 1;
        }
        assert_eq!(check(rows, head), Err(VerifyError::Hash { position: 4 }));
    }

    #[test]
    fn reorder_is_found() {
        let (mut rows, head) = log(10);
        rows.swap(2, 3);
        let (a, b) = (rows[2].seq, rows[3].seq);
        rows[2].seq = b;
        rows[3].seq = a;
        assert_eq!(check(rows, head), Err(VerifyError::Hash { position: 3 }));
    }

    #[test]
    fn insertion_is_found() {
        let (mut rows, head) = log(10);
        let forged = event(99).encode();
        rows.insert(
            6,
            StoredEvent {
                seq: 7,
                event: forged,
                hash: vec![0; 32],
            },
        );
        for (i, r) in rows.iter_mut().enumerate() {
            r.seq = i as u64 + 1;
        }
        assert_eq!(check(rows, head), Err(VerifyError::Hash { position: 7 }));
    }

    #[test]
    fn truncation_is_found() {
        let (mut rows, head) = log(10);
        rows.truncate(8);
        assert_eq!(
            check(rows, head),
            Err(VerifyError::Length {
                signed: 10,
                found: 8
            })
        );
    }

    #[test]
    fn head_signature() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use ring::signature::KeyPair;
        let mut pk = [0u8; 32];
        pk.copy_from_slice(kp.public_key().as_ref());
        let (_, head) = log(3);
        let sig = kp.sign(&head.signing_message());
        assert!(verify_head_signature(&head, &[], &pk, sig.as_ref()));
        let other = ChainHead {
            size: 2,
            hash: head.hash,
        };
        assert!(!verify_head_signature(&other, &[], &pk, sig.as_ref()));
    }
}
