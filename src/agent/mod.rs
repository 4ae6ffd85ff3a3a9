//! The sidecar agent: bootstraps with a join token, renews over mTLS at about half of each
//! certificate's lifetime, writes the credential to files atomically, serves the SPIFFE Workload
//! API, keeps the CA's CRLs fresh (`crl.pem` and the Workload API's `crl`), and stops when its
//! identity is revoked.

mod attest;
mod bundles;
mod crl;
mod files;
mod keys;
mod link;
mod run;
mod timing;
pub(crate) mod uds;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use bundles::{Bundles, split_der};
pub use crl::Crls;
pub use files::{read_consistent, read_federated, write_credential_dir, write_svid_dir};
pub use run::{Agent, SvidState};
pub use timing::{Backoff, refresh_in};
pub use workload::{
    DEFAULT_MAX_CONNECTIONS, MAX_RESPONSE, SocketAccess, WorkloadApi, serve_workload_api,
};

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// CA address, host:port; several comma-separated for failover (see
    /// [`crate::client::connect_with`]).
    pub server: String,
    /// Join token for the first certificate (not needed when `out_dir` already holds a
    /// credential that can still renew).
    pub token: Option<String>,
    /// A JWT file (e.g. a projected service-account token) to attest with instead of a join
    /// token; re-read at every bootstrap.
    pub jwt_file: Option<PathBuf>,
    /// SPIFFE ID to ask for when the token is for a `/prefix/*`.
    pub spiffe_id: Option<String>,
    /// Trust this bundle for the first call instead of the token's CA fingerprint.
    pub bundle: Option<PathBuf>,
    /// Where to write cert.pem, key.pem, bundle.pem (optional: the key can stay in memory).
    pub out_dir: Option<PathBuf>,
    /// Where to keep what the agent can rebuild from the CA (a large revocation table, in a
    /// file without a name); `out_dir` when `None`. Meant for a disk when `out_dir` is tmpfs.
    pub cache_dir: Option<PathBuf>,
    /// Unix socket for the SPIFFE Workload API.
    pub workload_socket: Option<PathBuf>,
    /// Shell command run after every rotation and every bundle change (and every CRL change
    /// when `on_crl_change` is not set).
    pub on_rotate: Option<String>,
    /// Shell command run after every CRL change (`crl.pem` and the Workload API's `crl`).
    pub on_crl_change: Option<String>,
    /// Requested certificate lifetime.
    pub ttl: Option<Duration>,
    /// Fraction of the lifetime after which to renew (0.5 by default).
    pub renew_fraction: f64,
    /// Longest wait between retries while the CA is unreachable.
    pub max_backoff: Duration,
    /// OID of the roles extension.
    pub roles_oid: crate::ca::RolesOid,
    /// DNS and IP names to ask for in every certificate (policy must allow each).
    pub names: crate::ca::SanNames,
}

impl AgentConfig {
    /// Defaults for everything but the server.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            token: None,
            jwt_file: None,
            spiffe_id: None,
            bundle: None,
            out_dir: None,
            cache_dir: None,
            workload_socket: None,
            on_rotate: None,
            on_crl_change: None,
            ttl: None,
            renew_fraction: 0.5,
            max_backoff: Duration::from_secs(30),
            roles_oid: crate::ca::RolesOid::default(),
            names: crate::ca::SanNames::default(),
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The agent's certificate or identity was revoked: it must not keep serving it.
    #[error("revoked: {0}")]
    Revoked(String),
    /// No usable credential and no way to get one (no token, token refused, expired beyond
    /// grace).
    #[error("cannot obtain a certificate: {0}")]
    Bootstrap(String),
    /// The certificate expired and the CA refuses to renew it.
    #[error("certificate expired and cannot be renewed: {0}")]
    Expired(String),
    /// Local I/O (files, socket).
    #[error("{0}")]
    Io(String),
}

impl AgentError {
    /// Process exit status for this error: 3 revoked, 4 expired, 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Revoked(_) => 3,
            AgentError::Expired(_) => 4,
            _ => 2,
        }
    }
}

/// Shared handle to the latest SVID, for the Workload API and examples.
pub type SvidWatch = tokio::sync::watch::Receiver<Option<Arc<SvidState>>>;
