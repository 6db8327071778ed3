//! Where people's accounts live: one sealed record per user in the store's `meta` table.
//!
//! The row key is `user:` and a keyed hash of the username (so the database file does not
//! list who works at, or is a patient of, the hospital); the value is the record's JSON
//! sealed with AES-256-GCM under the data directory's secret-sealing key, the row key
//! bound as associated data (a record moved to another user's row does not open). The
//! record holds the Argon2id hash and the TOTP secret, so a copy of the database gives
//! neither a password nor a second factor.

use std::fmt::Write as _;

use phivault_auth::UserRecord;
use phivault_crypto::KeyHierarchy;
use phivault_store::{Store, StoreError};

/// Label of the keyed hash that names user rows.
const USER_KEY_SCOPE: &str = "phivault.user.name";
/// Label prefix of the sealed records.
const USER_SEAL_LABEL: &str = "phivault user record v1\u{0}";

/// The row pointing from an account id to its record's row.
fn id_key(id: &str) -> String {
    format!("userid:{id}")
}

/// Why an account cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum UserStoreError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record does not open or is not valid: tampered or from another key.
    #[error("a stored user record failed its integrity check")]
    Integrity,
    /// Adding a user that exists.
    #[error("a user with that name exists")]
    Exists,
    /// Sealing failed.
    #[error("sealing the user record failed")]
    Seal,
}

/// The accounts of one data directory.
pub struct UserDirectory<'a> {
    keys: &'a KeyHierarchy,
    store: &'a dyn Store,
}

impl<'a> UserDirectory<'a> {
    /// The directory over `store`, sealed under `keys`.
    pub fn new(keys: &'a KeyHierarchy, store: &'a dyn Store) -> Self {
        UserDirectory { keys, store }
    }

    fn row_key(&self, username: &str) -> String {
        let token = self
            .keys
            .blind_index_key(USER_KEY_SCOPE)
            .token(username.as_bytes());
        let mut k = String::with_capacity(5 + 32);
        k.push_str("user:");
        for b in token {
            let _ = write!(k, "{b:02x}");
        }
        k
    }

    /// The account named `username` (already normalised), if any.
    pub fn get(&self, username: &str) -> Result<Option<UserRecord>, UserStoreError> {
        let rec = self.open_row(&self.row_key(username))?;
        if rec.as_ref().is_some_and(|r| r.username != username) {
            return Err(UserStoreError::Integrity);
        }
        Ok(rec)
    }

    /// The account whose opaque id is `id` (what tokens and audit events name), if any.
    pub fn get_by_id(&self, id: &str) -> Result<Option<UserRecord>, UserStoreError> {
        let Some(key) = self.store.meta(&id_key(id))? else {
            return Ok(None);
        };
        let key = String::from_utf8(key).map_err(|_| UserStoreError::Integrity)?;
        let rec = self.open_row(&key)?;
        if rec.as_ref().is_some_and(|r| r.id != id) {
            return Err(UserStoreError::Integrity);
        }
        Ok(rec)
    }

    fn open_row(&self, key: &str) -> Result<Option<UserRecord>, UserStoreError> {
        let Some(sealed) = self.store.meta(key)? else {
            return Ok(None);
        };
        let plain = self
            .keys
            .open_secret(&format!("{USER_SEAL_LABEL}{key}"), &sealed)
            .map_err(|_| UserStoreError::Integrity)?;
        let rec: UserRecord =
            serde_json::from_slice(plain.expose()).map_err(|_| UserStoreError::Integrity)?;
        if rec.validate().is_err() || self.row_key(&rec.username) != key {
            return Err(UserStoreError::Integrity);
        }
        Ok(Some(rec))
    }

    /// Store `rec`, replacing the account of its name.
    pub fn put(&self, rec: &UserRecord) -> Result<(), UserStoreError> {
        let key = self.row_key(&rec.username);
        let plain =
            zeroize::Zeroizing::new(serde_json::to_vec(rec).map_err(|_| UserStoreError::Seal)?);
        let sealed = self
            .keys
            .seal_secret(&format!("{USER_SEAL_LABEL}{key}"), &plain)
            .map_err(|_| UserStoreError::Seal)?;
        self.store.set_meta(&key, &sealed)?;
        // the id names the row (both are opaque); a forged pointer opens nothing, since the
        // record it leads to must carry the id
        self.store.set_meta(&id_key(&rec.id), key.as_bytes())?;
        Ok(())
    }

    /// Store a new account; refused when the name is taken.
    pub fn add(&self, rec: &UserRecord) -> Result<(), UserStoreError> {
        if self.store.meta(&self.row_key(&rec.username))?.is_some() {
            return Err(UserStoreError::Exists);
        }
        self.put(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phivault_auth::Role;
    use phivault_crypto::MasterKey;
    use phivault_store::sqlite::SqliteStore;

    fn record(name: &str) -> UserRecord {
        UserRecord::new(
            [name.len() as u8; 16],
            name,
            Role::Patient,
            None,
            Some("pat-1"),
            "tulip-gravel-orbit",
            &[3; 16],
            [4; 20],
            1_800_000_000,
        )
        .unwrap()
    }

    #[test]
    fn records_round_trip_sealed_and_a_moved_row_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = SqliteStore::open(&path, phivault_store::StoreKeys::for_tests()).unwrap();
        let keys = KeyHierarchy::new(&MasterKey::from_bytes(&[9; 32]));
        let users = UserDirectory::new(&keys, &store);
        assert!(users.get("maria.garcia").unwrap().is_none());
        users.add(&record("maria.garcia")).unwrap();
        users.add(&record("john.smith")).unwrap();
        assert!(matches!(
            users.add(&record("maria.garcia")),
            Err(UserStoreError::Exists)
        ));
        let got = users.get("maria.garcia").unwrap().unwrap();
        assert_eq!(got.username, "maria.garcia");
        assert_eq!(
            users.get_by_id(&got.id).unwrap().unwrap().username,
            "maria.garcia"
        );
        assert!(users.get_by_id("no-such-id").unwrap().is_none());
        // a pointer edited to lead to another account's row is refused
        let john = users.get("john.smith").unwrap().unwrap();
        let saved = store.meta(&id_key(&got.id)).unwrap().unwrap();
        store
            .set_meta(&id_key(&got.id), users.row_key("john.smith").as_bytes())
            .unwrap();
        assert!(matches!(
            users.get_by_id(&got.id),
            Err(UserStoreError::Integrity)
        ));
        store.set_meta(&id_key(&got.id), &saved).unwrap();
        assert_eq!(
            users.get_by_id(&john.id).unwrap().unwrap().username,
            "john.smith"
        );
        assert_eq!(got.patient.as_deref(), Some("pat-1"));
        // neither the name nor the secrets are in the stored row
        let (mk, mv) = (users.row_key("maria.garcia"), users.row_key("john.smith"));
        let sealed = store.meta(&mk).unwrap().unwrap();
        for needle in [&b"maria"[..], b"argon2", b"pat-1"] {
            assert!(!sealed.windows(needle.len()).any(|w| w == needle));
            assert!(!mk.as_bytes().windows(needle.len()).any(|w| w == needle));
        }
        // john's record copied into maria's row: refused, not returned as maria
        store
            .set_meta(&mk, &store.meta(&mv).unwrap().unwrap())
            .unwrap();
        assert!(matches!(
            users.get("maria.garcia"),
            Err(UserStoreError::Integrity)
        ));
        // another master key opens nothing
        let other = KeyHierarchy::new(&MasterKey::from_bytes(&[8; 32]));
        let foreign = UserDirectory::new(&other, &store);
        assert!(
            foreign.get("john.smith").unwrap().is_none(),
            "rows are named under the key"
        );
        store
            .set_meta(
                &foreign.row_key("john.smith"),
                &store.meta(&mv).unwrap().unwrap(),
            )
            .unwrap();
        assert!(matches!(
            foreign.get("john.smith"),
            Err(UserStoreError::Integrity)
        ));
        store.close();
    }
}
