//! Records of trusted sharing kept as settings rows (`shl:<id>` links, `export:<id>`
//! jobs): JSON sealed under the data directory's secret-sealing key with the row key bound
//! (a record moved to another row does not open). Settings rows are MAC'd and summed into
//! the signed state, so a storage writer who resets a failure count, un-revokes a link or
//! brings back an expired export's key is caught; updates are atomic
//! (`Engine::update_sharing_row`).

use std::sync::Arc;

use phivault_records::Vault;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;

/// Rows read per query; a range holding more is read as its 16 sub-ranges (ids are hex).
const PAGE: usize = 4096;

/// A kind of sharing record: its row prefix, its sealing label and its id.
pub trait Row: Serialize + DeserializeOwned + Send + 'static {
    /// `shl:` or `export:`.
    const PREFIX: &'static str;
    /// Label prefix of the sealed records.
    const LABEL: &'static str;
    /// The record's id (the row is `PREFIX` + id).
    fn id(&self) -> &str;
}

fn label<T: Row>(id: &str) -> String {
    format!("{}{}{id}", T::LABEL, T::PREFIX)
}

/// Seal a record for its row.
pub fn seal<T: Row>(vault: &Vault, rec: &T) -> Result<Vec<u8>, Error> {
    let plain = zeroize::Zeroizing::new(serde_json::to_vec(rec).map_err(|_| Error::internal())?);
    vault
        .engine
        .seal_secret(&label::<T>(rec.id()), &plain)
        .ok_or_else(Error::internal)
}

/// Open a row's value as record `id` (an integrity error when it does not open or is not
/// that record).
pub fn open<T: Row>(vault: &Vault, id: &str, sealed: &[u8]) -> Result<T, Error> {
    let plain = zeroize::Zeroizing::new(
        vault
            .engine
            .open_secret(&label::<T>(id), sealed)
            .ok_or_else(Error::integrity)?,
    );
    let rec: T = serde_json::from_slice(&plain).map_err(|_| Error::integrity())?;
    if rec.id() != id {
        return Err(Error::integrity());
    }
    Ok(rec)
}

/// Record `id`, if there is one.
pub fn load<T: Row>(vault: &Vault, id: &str) -> Result<Option<T>, Error> {
    match vault.engine.meta(&format!("{}{id}", T::PREFIX))? {
        Some(v) => open(vault, id, &v).map(Some),
        None => Ok(None),
    }
}

/// Visit every record of the kind (none left out however many there are: a range of ids
/// that fills a page is read again as its sixteen sub-ranges).
pub fn each<T: Row>(vault: &Vault, visit: &mut dyn FnMut(T)) -> Result<(), Error> {
    each_under(vault, T::PREFIX, visit)
}

fn each_under<T: Row>(vault: &Vault, prefix: &str, visit: &mut dyn FnMut(T)) -> Result<(), Error> {
    let rows = vault.engine.meta_prefix(prefix, PAGE)?;
    if rows.len() < PAGE || prefix.len() >= T::PREFIX.len() + 32 {
        for (k, v) in rows {
            visit(open(vault, &k[T::PREFIX.len()..], &v)?);
        }
        return Ok(());
    }
    for d in "0123456789abcdef".chars() {
        each_under(vault, &format!("{prefix}{d}"), visit)?;
    }
    Ok(())
}

/// Every record of the kind.
pub fn all<T: Row>(vault: &Vault) -> Result<Vec<T>, Error> {
    let mut out = Vec::new();
    each(vault, &mut |r| out.push(r))?;
    Ok(out)
}

/// Change record `id` atomically: `f` gets the stored record (None: absent) and answers
/// the record to write (None: leave it) and what the caller learns; the answer of the
/// call whose decision was written is returned.
///
/// Compare and swap: the record is read, decided and sealed here — never inside the
/// store's writer, which must not wait on anything that may itself write (sealing can
/// reserve seal counts through the writer) — and the writer puts the new value only if the
/// row still holds the bytes that were read (sealed values never repeat: random nonces);
/// when another request or node changed it meanwhile, `f` decides again on the new value.
pub fn update<T: Row, A: Send + 'static>(
    vault: &Arc<Vault>,
    id: &str,
    mut f: impl FnMut(Option<T>) -> Result<(Option<T>, A), Error>,
) -> Result<A, Error> {
    let key = format!("{}{id}", T::PREFIX);
    for _ in 0..MAX_ROUNDS {
        let read = vault.engine.meta(&key)?;
        let current = read.as_ref().map(|v| open::<T>(vault, id, v)).transpose()?;
        let (write, answer) = f(current)?;
        let Some(new) = write else {
            return Ok(answer);
        };
        let sealed = seal(vault, &new)?;
        let swapped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = swapped.clone();
        vault.engine.update_sharing_row(
            &key,
            Box::new(move |stored| {
                let same = stored == read.as_deref();
                s.store(same, std::sync::atomic::Ordering::SeqCst);
                same.then(|| sealed.clone())
            }),
        )?;
        if swapped.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(answer);
        }
    }
    // (only under a storm of writes to one row: the request fails rather than waits on)
    Err(Error::Records(phivault_records::Error::unavailable()))
}

/// Most rounds of [`update`] before it gives up.
const MAX_ROUNDS: usize = 1_000;
