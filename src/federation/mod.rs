//! Federation: trust across SPIFFE trust domains.
//!
//! - [`bundle`]: the SPIFFE bundle format (JWKS with `spiffe_sequence`, `spiffe_refresh_hint`).
//! - [`BundleHub`]: the own and federated bundles, persisted under `<data_dir>/federation/`,
//!   audited on change, followed live by the bundle endpoint, `Ca.WatchBundles` and issuance.
//! - [`serve_bundle_endpoint`]: the CA's bundle endpoint (https_spiffe profile).
//! - [`spawn_refreshers`]: fetches each `[[federation]]` domain's bundle at its refresh hint.
//! - [`spawn_revocation_relays`]: relays each federated CA's revocations to this domain.
//! - [`FederatedDomain`]: a validated `[[federation]]` entry.

pub mod bundle;
mod config;
mod endpoint;
mod fetch;
mod hub;
mod refresh;
mod revocations;

use std::path::PathBuf;

pub use bundle::{BundleError, SpiffeBundle};
pub use config::{
    EndpointProfile, FederatedDomain, FederationConfigError, FederationSpec, parse_https_url,
    resolve_all,
};
pub use endpoint::serve_bundle_endpoint;
pub use fetch::{EndpointTrust, FETCH_TIMEOUT, FetchError, fetch};
pub use hub::{BundleHub, BundleSet, Change, Origin};
pub use refresh::{DEFAULT_REFRESH, MAX_REFRESH, MIN_REFRESH, refresh_after, spawn_refreshers};
pub use revocations::{RelayContext, spawn_revocation_relays};

use crate::spiffe::TrustDomain;

/// Errors of the federation layer (state on disk, bundle contents).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// A bundle is malformed or unusable.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Reading or writing federation state in the data directory failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A state file in the data directory does not decode.
    #[error("{0} is corrupt: {1}")]
    Corrupt(PathBuf, String),
    /// A federated bundle was offered for the CA's own trust domain.
    #[error("{0} is this CA's own trust domain; its bundle comes from the CA itself")]
    OwnTrustDomain(TrustDomain),
}
