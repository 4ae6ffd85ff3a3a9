//! Lanyard: a certificate authority for minute-scale machine identities.
//!
//! # Layout
//! - [`spiffe`]: SPIFFE IDs, patterns and role names.
//! - [`ca`]: CSR checks, leaf and CRL signing, SVID parsing (pure, no I/O).
//! - [`policy`]: which identity may hold which roles, for how long (pure).
//! - [`store`]: durable state behind a domain trait; sled backend.
//! - [`audit`]: the hash-chained audit log with group commit and subscriptions.
//! - [`revocation`]: revocation by serial and identity, CRLs.
//! - [`issuance`]: token bootstrap, renewal, local credentials, token minting.
//! - [`rotation`]: CA rotation (staged, switched, completed), persisted and audited; on a
//!   shared store, followed by every replica, with CA keys sealed under the KEK.
//! - [`replicas`]: the replica registry of a shared store (heartbeats, policy fingerprints).
//! - [`tls`]: rustls pieces for SPIFFE mTLS.
//! - [`federation`]: SPIFFE bundles, the bundle endpoint, federated trust domains.
//! - [`api`]: tonic services (the only place errors become `tonic::Status`).
//! - [`net`]: connection admission: open-file budget, connection caps, preface and idle
//!   timeouts, accept backoff.
//! - [`metrics`]: Prometheus metrics, health and readiness on a separate HTTP listener.
//! - [`server`]: `lanyard serve` wiring.
//! - [`client`]: connecting to the CA.
//! - [`config`], [`telemetry`], [`fsutil`], [`tokens`].
#![forbid(unsafe_code)]

pub mod access;
pub mod agent;
pub mod api;
pub mod attest;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod encoding;
pub mod federation;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod issuance;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod replicas;
pub mod revocation;
pub mod rotation;
pub mod server;
pub mod spiffe;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokens;

/// Generated protobuf and gRPC code.
pub mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    /// `lanyard.v1`.
    pub mod v1 {
        tonic::include_proto!("lanyard.v1");
    }
    /// The SPIFFE Workload API (no proto package).
    pub mod workload {
        tonic::include_proto!("_");
    }
    /// Encoded file descriptors of the CA's services (`lanyard.v1`), for the CA's gRPC
    /// reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("lanyard_descriptor");
    /// Encoded file descriptors of the SPIFFE Workload API, which only the agent serves.
    pub const WORKLOAD_FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("workload_descriptor");
}
