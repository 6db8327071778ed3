//! The HTTP handlers, by area. Each translates a request to calls of the state, the record
//! operations and the search, and the result back; `routes` names them.

pub(crate) mod admin;
pub(crate) mod alerts;
pub(crate) mod audit;
pub(crate) mod auth;
pub(crate) mod bundle;
pub(crate) mod erase;
pub(crate) mod export;
pub(crate) mod fhir;
pub(crate) mod glass;
pub(crate) mod launch;
pub(crate) mod search;
pub(crate) mod share;
