//! Trusted sharing (issue 21), knowing no HTTP: SMART Health Links (`links`: a patient's
//! records handed to a new doctor as a `shlink:/` whose files are JWE under a key the
//! server forgets once the link is made) and Bulk Data export (`export`: NDJSON for payers
//! and researchers, never in plaintext at rest), their sealed files (`area`), and QR codes
//! of links for paper or screen (`qr`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod area;
pub mod export;
pub mod links;
pub mod qr;
pub mod rows;
pub mod sweep;

/// Why a sharing request failed.
#[derive(Debug, Clone)]
pub enum Error {
    /// A records failure (its kind maps to the HTTP status).
    Records(phivault_records::Error),
    /// A wrong or missing passcode: how many attempts the link has left.
    Passcode {
        /// Attempts left over the link's life.
        remaining: u32,
    },
    /// A long-term link polled again too soon.
    TooSoon {
        /// Seconds to wait.
        retry_after_s: u64,
        /// Why (a fixed text).
        why: &'static str,
    },
}

impl From<phivault_records::Error> for Error {
    fn from(e: phivault_records::Error) -> Self {
        Error::Records(e)
    }
}

impl Error {
    /// An internal failure (nothing of the request's content named).
    pub fn internal() -> Self {
        Error::Records(phivault_records::Error::internal())
    }
    /// Stored data failed its integrity check.
    pub fn integrity() -> Self {
        Error::Records(phivault_records::Error::integrity())
    }
    /// Nothing there (or nothing the caller may know is there).
    pub fn not_found(message: &str) -> Self {
        Error::Records(phivault_records::Error::not_found(message))
    }
    /// The request is malformed.
    pub fn bad_request(message: &str) -> Self {
        Error::Records(phivault_records::Error::bad_request(message))
    }
    /// Not permitted.
    pub fn forbidden() -> Self {
        Error::Records(phivault_records::Error::forbidden())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Records(e) => e.fmt(f),
            Error::Passcode { remaining } => write!(f, "passcode refused ({remaining} left)"),
            Error::TooSoon { retry_after_s, why } => {
                write!(f, "{why} (retry in {retry_after_s} s)")
            }
        }
    }
}

impl std::error::Error for Error {}

/// A file of the exchange area that could not be read: gone (swept or revoked meanwhile)
/// is 404; one that does not open is an integrity error.
pub(crate) fn unread(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::not_found("no such file")
    } else {
        Error::integrity()
    }
}

/// Whether `s` has only characters shown as they are: no control characters, and none of
/// the invisible or direction-changing format characters (zero-width spaces and joiners,
/// bidirectional embeddings, overrides and isolates, the byte-order mark).
pub fn printable(s: &str) -> bool {
    s.chars().any(|c| !c.is_whitespace() && !invisible(c)) && !s.chars().any(invisible)
}

/// Characters that show nothing, change how the rest shows, or mean nothing agreed:
/// controls, format characters (zero-width, joiners, bidirectional embeddings, overrides
/// and isolates, the byte-order mark, tags, interlinear annotation), blank fillers
/// (Hangul, braille), variation selectors, line and paragraph separators, private use.
fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
            | '\u{2800}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}' | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}'
            | '\u{E000}'..='\u{F8FF}' | '\u{F0000}'..='\u{10FFFF}')
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(phivault_records::engine::now_ms()).unwrap_or(0)
}

/// base64url without padding.
pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Decode base64url without padding.
pub(crate) fn unb64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}
