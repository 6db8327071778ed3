//! Where registrations live in the store: back-end clients (`client:`), SMART apps
//! (`app:`) and external identity providers (`idp:`, sealed).

use phivault_auth::oidc::IdpConfig;

/// Store key under which a client record is kept.
pub fn client_meta_key(client_id: &str) -> String {
    format!("client:{client_id}")
}

/// Store key of a registered SMART app.
pub fn app_meta_key(client_id: &str) -> String {
    format!("app:{client_id}")
}

/// Metadata key prefix of provider configurations.
pub const IDP_PREFIX: &str = "idp:";

/// The metadata key of the provider `issuer`.
pub fn idp_meta_key(issuer: &str) -> String {
    format!("{IDP_PREFIX}{issuer}")
}

/// Label prefix of sealed configurations.
pub const IDP_SEAL_LABEL: &str = "phivault identity provider v1\u{0}";

/// Store `cfg`, sealed under the data directory's secret-sealing key with its row key as
/// associated data: whoever can write the database but not read the master key cannot add
/// a provider (and so mint tokens) or move one to another row.
pub fn store_config(
    keys: &phivault_crypto::KeyHierarchy,
    store: &dyn phivault_store::Store,
    cfg: &IdpConfig,
) -> Result<(), IdpStoreError> {
    let key = idp_meta_key(&cfg.issuer);
    let plain = serde_json::to_vec(cfg).map_err(|_| IdpStoreError::Seal)?;
    let sealed = keys
        .seal_secret(&format!("{IDP_SEAL_LABEL}{key}"), &plain)
        .map_err(|_| IdpStoreError::Seal)?;
    Ok(store.set_meta(&key, &sealed)?)
}

/// Why a provider configuration cannot be stored.
#[derive(Debug, thiserror::Error)]
pub enum IdpStoreError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] phivault_store::StoreError),
    /// Sealing failed.
    #[error("sealing the identity provider configuration failed")]
    Seal,
}
