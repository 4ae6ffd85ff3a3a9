//! `lanyard::tls`: rustls building blocks for SPIFFE mTLS with Lanyard certificates.
//!
//! - [`Bundle`]: the CA certificates to trust, as webpki trust anchors.
//! - [`verify_svid`]: chain verification plus SVID parsing, the one place a peer chain is checked.
//! - [`CertSlot`]: the current certificate and key, swapped on rotation without a restart.
//! - [`ServerVerifier`]: for clients, authenticates a server by SPIFFE ID instead of DNS name.
//! - [`DeferredClientVerifier`]: for the CA, lets a handler authenticate the client itself.
//! - [`TlsSource`], [`Authorizer`], [`RevocationSet`], [`server_config`], [`client_config`]:
//!   workload-to-workload mTLS that follows rotation and revocation live, across federated trust
//!   domains too: a peer is verified against its own domain's bundle, and a foreign peer is
//!   accepted only when a rule names its domain (`td:b.example`,
//!   `spiffe://b.example/ns/prod/* role=x`). Roles written by a foreign CA are ignored: a foreign
//!   peer holds only the roles this domain granted it, which a [`GrantSet`] learns from the CA.
//!
//! A service does mTLS in a few lines:
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use lanyard::tls::{Authorizer, TlsSource, server_config};
//! let source = TlsSource::from_dir("/run/lanyard/svid", Default::default(), std::time::Duration::from_secs(1)).await?;
//! let authz = Authorizer::parse(&["spiffe://example.org/ns/prod/* role=db-read"])?;
//! let config = server_config(&source, authz, None)?; // hand to tokio-rustls / hyper / tonic
//! # let _ = config; Ok(()) }
//! ```

/// Implements the handshake-signature half of a rustls verifier (`verify_tls12_signature`,
/// `verify_tls13_signature`, `supported_verify_schemes`) with the verifier's `provider` field:
/// every Lanyard verifier checks chains its own way but handshake signatures the same way.
macro_rules! delegate_handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

mod authz;
mod grants;
mod mtls;
mod revocations;
mod source;
mod verifiers;

use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

pub use authz::{Authorizer, PeerRule};
pub use grants::GrantSet;
pub use mtls::{PeerVerifier, client_config, peer_svid, server_config};
pub use revocations::RevocationSet;
pub use source::{FederatedBundles, TlsSource, check_key_matches};
pub use verifiers::{DeferredClientVerifier, ServerTrust, ServerVerifier};

use crate::ca::{RolesOid, SvidInfo, parse_svid};

/// Why a peer certificate chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The peer sent no certificate.
    #[error("no client certificate presented")]
    NoCertificate,
    /// The chain does not lead to a trusted CA, is expired, or has the wrong key usage.
    #[error("certificate chain rejected: {0}")]
    Chain(String),
    /// The certificate is not a valid SVID.
    #[error("{0}")]
    Svid(String),
    /// The key or certificate could not be loaded.
    #[error("credential unusable: {0}")]
    Credential(String),
}

/// The rustls crypto provider Lanyard uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// CA certificates to trust, parsed once into webpki trust anchors.
#[derive(Debug, Clone, Default)]
pub struct Bundle {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
}

impl Bundle {
    /// Builds a bundle; every certificate must parse as a trust anchor.
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::Credential(format!("bad CA certificate in bundle: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { certs, anchors })
    }

    /// Reads a PEM bundle.
    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        use rustls_pki_types::pem::PemObject;
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Credential(format!("bundle PEM: {e}")))?;
        if certs.is_empty() {
            return Err(TlsError::Credential("bundle has no certificates".into()));
        }
        Self::new(certs)
    }

    /// The CA certificates.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Whether the bundle is empty.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// Verifies `chain` (leaf first) against `bundle` at time `at` for `usage`, then parses the leaf
/// as an SVID. Signature algorithms are the provider's.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundle: &Bundle,
    at: UnixTime,
    usage: KeyUsage,
    oid: &RolesOid,
) -> Result<SvidInfo, TlsError> {
    let (leaf, intermediates) = chain.split_first().ok_or(TlsError::NoCertificate)?;
    let ee = EndEntityCert::try_from(leaf).map_err(|e| TlsError::Chain(e.to_string()))?;
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    ee.verify_for_usage(algs, &bundle.anchors, intermediates, at, usage, None, None)
        .map_err(|e| TlsError::Chain(describe_webpki(&e)))?;
    parse_svid(leaf, oid).map_err(|e| TlsError::Svid(e.to_string()))
}

fn describe_webpki(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => "not issued by a trusted CA (unknown issuer)".into(),
        // A CA with the same name but another key (another Lanyard install, a rotated-away CA).
        webpki::Error::InvalidSignatureForPublicKey => {
            "not issued by a trusted CA (the issuer name matches, but the signature does not verify with the trusted CA key)".into()
        }
        webpki::Error::CertExpired { .. } => "certificate expired".into(),
        webpki::Error::CertNotValidYet { .. } => "certificate not valid yet".into(),
        other => format!("{other:?}"),
    }
}

/// The current certificate and key of a workload or server, swapped atomically on rotation:
/// handshakes after [`CertSlot::set`] use the new one.
#[derive(Debug, Default)]
pub struct CertSlot(RwLock<Option<Arc<CertifiedKey>>>);

impl CertSlot {
    /// An empty slot.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs a chain (leaf first) and its PKCS#8 key.
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Credential(e.to_string()))?;
        let ck = CertifiedKey::new(chain, signing);
        match self.0.write() {
            Ok(mut g) => *g = Some(Arc::new(ck)),
            Err(p) => *p.into_inner() = Some(Arc::new(ck)),
        }
        Ok(())
    }

    /// The current certificate and key.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `UnixTime` for seconds since the epoch (clamped at 0).
pub fn unix_time(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs.max(0) as u64))
}
