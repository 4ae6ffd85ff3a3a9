//! The certificate authority core: CSR checks, leaf and CRL signing, and SVID parsing.
//!
//! Pure CPU work: no I/O but reading and writing the CA's own key files, no tonic, no sled.

mod authority;
mod csr;
mod names;
mod seal;
mod set;
mod svid;

pub use authority::{Authority, CrlEntries, LeafParams, SignedLeaf, certs_to_pem, pem_encode};
pub use csr::{CsrKey, MAX_CSR_BYTES, ValidCsr, parse_csr, parse_csr_assigned};
pub use names::{
    MAX_NAMES, NameError, SanNames, ip_from_bytes, normalize_dns, parse_ip, san_names,
};
pub use seal::{KEK_LEN, Kek, SealError};
pub use set::{CaHandle, CaSet};
pub(crate) use svid::decode_roles;
pub use svid::{RolesOid, Serial, SvidInfo, encode_roles, parse_svid};

use crate::spiffe::IdError;

/// Errors of the CA core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CSR is rejected; the message says why in terms the requester can act on.
    #[error("{0}")]
    InvalidCsr(String),
    /// The CSR asks for another ID than the one the CA assigns (attestation).
    #[error("{0}")]
    IdMismatch(String),
    /// A certificate could not be parsed as a Lanyard X.509-SVID.
    #[error("not a valid Lanyard certificate: {0}")]
    InvalidCertificate(String),
    /// The roles OID is malformed or has an arc of 2^28 or more (Go rejects those).
    #[error("invalid roles OID {0:?}: dotted decimal with at least two arcs, each below 2^28")]
    InvalidOid(String),
    /// A SPIFFE ID or role name is malformed.
    #[error(transparent)]
    Id(#[from] IdError),
    /// rcgen failed to build or sign a certificate or CRL.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    /// Reading or writing the CA's key material failed.
    #[error("CA key material at {path}: {source}")]
    Io {
        /// The file involved.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The CA files exist but do not hold a usable CA.
    #[error("CA files at {0} are not a usable CA: {1}")]
    BadCaFiles(std::path::PathBuf, String),
}
