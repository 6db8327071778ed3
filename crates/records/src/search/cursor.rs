//! Paging: a search request (first page or continued), and the sealed cursor that carries
//! a search's position to the next page, bound to the client it was issued to.

use phivault_auth::Authenticated;
use phivault_fhir::IssueCode;
use serde::{Deserialize, Serialize};

use super::parse;
use super::sort::KeyVal;
use crate::engine::now_ms;
use crate::{Error, Kind, Vault};

/// How long a paging cursor stays valid.
const CURSOR_TTL_MS: i64 = 60 * 60 * 1000;

/// The sealed content of a paging cursor.
#[derive(Serialize, Deserialize)]
struct Cursor {
    /// Format.
    v: u8,
    /// Client it was issued to.
    c: String,
    /// Expiry (ms since epoch).
    x: i64,
    /// Searched type.
    t: String,
    /// Compartment patient.
    p: Option<String>,
    /// The query's parameters.
    q: Vec<(String, String)>,
    /// Lenient handling.
    l: bool,
    /// Position: the last id returned (or examined).
    a: Option<String>,
    /// Position in sorted order: the sort key of the last entry returned.
    k: Option<Vec<KeyVal>>,
}

/// A search request, from a query string, a form body or a cursor.
pub struct Request {
    /// Searched type.
    pub rtype: String,
    /// Compartment patient (`Patient/{id}/{type}`).
    pub compartment: Option<String>,
    /// The decoded parameters.
    pub pairs: Vec<(String, String)>,
    /// `Prefer: handling=lenient`.
    pub lenient: bool,
    /// The sealed cursor this request continues, as the client sent it.
    pub(super) cursor: Option<String>,
    pub(super) after: Option<String>,
    pub(super) after_key: Option<Vec<KeyVal>>,
}

impl Request {
    /// A new search (first page).
    pub fn new(
        rtype: &str,
        compartment: Option<String>,
        pairs: Vec<(String, String)>,
        lenient: bool,
    ) -> Self {
        Request {
            rtype: rtype.to_owned(),
            compartment,
            pairs,
            lenient,
            cursor: None,
            after: None,
            after_key: None,
        }
    }

    /// Resume from a sealed cursor issued to `client`.
    pub fn from_cursor(app: &Vault, token: &str, client: &str) -> Result<Request, Error> {
        use base64::Engine as _;
        let bad = || {
            Error::new(
                Kind::BadRequest,
                IssueCode::Invalid,
                "invalid or expired paging cursor; repeat the search",
            )
        };
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| bad())?;
        // under the cursor key of today or yesterday (`crate::kek`): a cursor outlives its
        // one-hour TTL across midnight, never longer
        let plain = app.engine.open_cursor(&sealed).ok_or_else(bad)?;
        let c: Cursor = serde_json::from_slice(&plain).map_err(|_| bad())?;
        if c.v != 1 || c.c != client || c.x < now_ms() {
            return Err(bad());
        }
        Ok(Request {
            rtype: c.t,
            compartment: c.p,
            pairs: c.q,
            lenient: c.l,
            cursor: Some(token.to_owned()),
            after: c.a,
            after_key: c.k,
        })
    }

    /// Whether `given` are the parameters this request's search applied (in any order):
    /// what the `self` link of a continued page lists beside its `_cursor`, so that link
    /// can be followed back to the same page.
    pub fn applies_exactly(&self, given: &[(String, String)]) -> Result<bool, Error> {
        let mut applied = parse(self)?.applied;
        let mut given = given.to_vec();
        applied.sort();
        given.sort();
        Ok(applied == given)
    }
}

pub(super) fn seal_cursor(
    app: &Vault,
    auth: &Authenticated,
    req: &Request,
    after: Option<String>,
    after_key: Option<Vec<KeyVal>>,
) -> Result<String, Error> {
    use base64::Engine as _;
    let c = Cursor {
        v: 1,
        c: auth.client_id().to_owned(),
        x: now_ms() + CURSOR_TTL_MS,
        t: req.rtype.clone(),
        p: req.compartment.clone(),
        q: req.pairs.clone(),
        l: req.lenient,
        a: after,
        k: after_key,
    };
    let plain = serde_json::to_vec(&c).map_err(|_| Error::internal())?;
    let sealed = app.engine.seal_cursor(&plain).ok_or_else(Error::internal)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed))
}
