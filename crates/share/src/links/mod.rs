//! SMART Health Links (HL7 "SMART Health Cards and Links" IG, STU1): `create` (the content
//! built under the creator's grant, JWE under a key the server forgets), `fetch` (the
//! manifest, files, direct `U` links; the passcode cap), `manage` (list, revoke, sweep),
//! `record` (a link as stored).

pub mod create;
pub mod fetch;
pub mod manage;
pub mod record;

pub use create::{Made, NewLink, Refreshed, create, refresh};
pub use fetch::{Manifest, ManifestRequest, Seen, direct, file, manifest};
pub use manage::{list, revoke, sweep};
pub use record::LinkRecord;
