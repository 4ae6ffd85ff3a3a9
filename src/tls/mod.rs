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
pub(crate) use revocations::serial_hash;
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

/// The key-exchange groups Lanyard offers and accepts, in order of preference. Explicit, not the
/// provider's default: a client offers a key share for the first group only, and the server
/// takes the client's first choice, so this order decides what every handshake costs. X25519 is
/// the cheapest; a dependency bump that reordered the default once made handshakes negotiate
/// P-384 at twice the CPU, unnoticed (`tests/resumption.rs` checks the negotiated group).
pub const KX_GROUPS: [rustls::NamedGroup; 3] = [
    rustls::NamedGroup::X25519,
    rustls::NamedGroup::secp256r1,
    rustls::NamedGroup::secp384r1,
];

/// The TLS 1.3 cipher suites Lanyard offers and accepts, in order of preference. Explicit, like
/// [`KX_GROUPS`]: the suite's hash runs the whole key schedule (transcript, HKDF, Finished, the
/// ticket's PSK), and ring hashes SHA-256 with the CPU's SHA extensions where it has them but
/// SHA-384 in portable code on many x86-64 CPUs (AMD among them), where it took ~17 µs of a
/// handshake on each side (docs/performance.md, docs/design.md decision 90). AES-128 matches
/// the 128-bit strength of X25519 and P-256; the other two suites stay accepted. The CA applies
/// this order even to clients that prefer another ([`configure_ca_server`]).
pub const TLS13_SUITES: [rustls::CipherSuite; 3] = [
    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
    rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// The rustls crypto provider Lanyard uses everywhere (ring), with the key-exchange groups in
/// the order of [`KX_GROUPS`] and the TLS 1.3 suites in the order of [`TLS13_SUITES`] (TLS 1.2
/// suites, where a config allows TLS 1.2, follow in ring's order). Built once: every TLS config
/// and verifier shares it.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::{cipher_suite, kx_group};
            let mut p = rustls::crypto::ring::default_provider();
            p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
            debug_assert!(p.kx_groups.iter().map(|g| g.name()).eq(KX_GROUPS));
            let tls12: Vec<_> = p
                .cipher_suites
                .iter()
                .filter(|s| s.tls13().is_none())
                .copied()
                .collect();
            p.cipher_suites = vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ];
            debug_assert!(p.cipher_suites.iter().map(|s| s.suite()).eq(TLS13_SUITES));
            p.cipher_suites.extend(tls12);
            Arc::new(p)
        })
        .clone()
}

/// Settles what the CA's gRPC server config does beyond its certificate and client verifier:
/// the cipher suite order and session resumption.
///
/// - The CA picks the suite in its own order ([`TLS13_SUITES`]) rather than the client's: a
///   client built on ring's default order asks for AES-256-GCM-SHA384, whose SHA-384 key
///   schedule costs both sides more than SHA-256 (ring has no SHA-384 in hardware here).
/// - Resumption as [`enable_ca_resumption`] describes.
pub fn configure_ca_server(cfg: &mut rustls::ServerConfig) -> Result<(), TlsError> {
    cfg.ignore_client_order = true;
    enable_ca_resumption(cfg)
}

/// The RFC 9149 ticket request a Lanyard client sends the CA: one ticket per new connection and
/// one per resumed one (a connection uses one ticket and gets the next on it). The CA sends
/// tickets only to clients that ask ([`enable_ca_resumption`]).
pub const CA_TICKET_REQUEST: rustls::client::TicketRequest = rustls::client::TicketRequest {
    new_session_count: 1,
    resumption_count: 1,
};

/// Makes the CA's server config resume TLS 1.3 sessions from tickets, so a client that connects
/// again (an agent after a broken connection, a CLI call) skips the handshake's two signatures
/// and the certificate exchange.
///
/// This is safe only because the CA never authenticates a client in the handshake: the request
/// handler verifies the client's chain on every call ([`DeferredClientVerifier`], `api::auth`).
/// A resumed session restores the chain of the full handshake it descends from, which the handler
/// then judges like any other: against the current bundle, at the current time, and against the
/// revocation store (docs/design.md, decision on resumption). Tickets are sealed with a key this
/// process draws at start (rotated by rustls), so a client cannot forge or alter the chain in
/// one, and a restarted or another replica's CA simply does a full handshake. 0-RTT stays off: early
/// data can be replayed. Do not use this for a config whose client verifier does the peer checks
/// ([`server_config`] keeps resumption off for that reason).
///
/// Tickets go only to clients that ask for them with RFC 9149's `ticket_request` extension
/// (Lanyard's own client sends [`CA_TICKET_REQUEST`]), at most one per connection: a client
/// that never resumes (one-shot tools, load generators with resumption off) would otherwise
/// cost the CA a ticket's encoding, sealing and record per connection, and itself the record's
/// decryption and a PSK derivation, for nothing. A client that asks for none gets none.
pub fn enable_ca_resumption(cfg: &mut rustls::ServerConfig) -> Result<(), TlsError> {
    cfg.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Credential(e.to_string()))?;
    // Stateless tickets only: no session cache on the server, whatever the fleet's size.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    // None unasked; a client asking gets what it asks for, up to one (it uses one ticket per
    // connection and gets the next on it).
    cfg.send_tls13_tickets = 0;
    cfg.max_tls13_tickets = 1;
    cfg.max_early_data_size = 0;
    Ok(())
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
    let provider = provider();
    let algs = provider.signature_verification_algorithms.all;
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
///
/// For the client side of CA connections it also keeps the TLS config last built for its
/// current certificate, with that config's resumable sessions (see [`crate::client::connect`]):
/// a session resumes only while the slot still holds the certificate the session was
/// authenticated with, so the CA always judges the certificate the client holds now.
#[derive(Default)]
pub struct CertSlot {
    current: RwLock<Option<Current>>,
    /// The client config for the current certificate (its generation is in it).
    pub(crate) client: std::sync::Mutex<Option<SlotClientConfig>>,
    stats: HandshakeCounters,
}

/// The slot's certificate, its key and its generation.
struct Current {
    key: Arc<CertifiedKey>,
    /// SHA-256 of the private key's DER: the same key installed again (a renewal that kept its
    /// key) is not parsed again, which for ECDSA costs a scalar multiplication.
    key_digest: [u8; 32],
    generation: u64,
}

/// A client TLS config bound to one certificate of a [`CertSlot`] (see `client::connect`).
#[derive(Debug)]
pub(crate) struct SlotClientConfig {
    /// The slot generation (certificate) the config presents.
    pub(crate) generation: u64,
    /// The server verifier; rustls resumes a session only with the verifier that created it.
    pub(crate) verifier: Arc<ServerVerifier>,
    /// The config, with its session store.
    pub(crate) config: Arc<rustls::ClientConfig>,
}

/// Handshakes made with a slot's certificate by `client::connect`.
#[derive(Debug, Default)]
struct HandshakeCounters {
    full: std::sync::atomic::AtomicU64,
    resumed: std::sync::atomic::AtomicU64,
    /// The last negotiated key-exchange group (`NamedGroup` as u16; 0: none yet).
    group: std::sync::atomic::AtomicU32,
    /// The last negotiated cipher suite (`CipherSuite` as u16; 0: none yet).
    suite: std::sync::atomic::AtomicU32,
}

/// What the client handshakes of a [`CertSlot`] did: for metrics, logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandshakeStats {
    /// Full handshakes (certificates exchanged and verified, both sides signed).
    pub full: u64,
    /// Resumed handshakes (a session ticket of an earlier full handshake).
    pub resumed: u64,
    /// The key-exchange group of the last handshake.
    pub last_group: Option<rustls::NamedGroup>,
    /// The cipher suite of the last handshake.
    pub last_suite: Option<rustls::CipherSuite>,
}

impl std::fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSlot")
            .field("generation", &self.generation())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl CertSlot {
    /// An empty slot.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs a chain (leaf first) and its PKCS#8 key. Installing the chain already held
    /// changes nothing (its resumable sessions stay usable).
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        use sha2::Digest;
        let key_digest: [u8; 32] = sha2::Sha256::digest(key.secret_der()).into();
        let held = self.read_current();
        let signing = match held {
            Some((ck, digest, _)) if digest == key_digest => {
                if ck.cert == chain {
                    return Ok(());
                }
                ck.key.clone()
            }
            _ => provider()
                .key_provider
                .load_private_key(key)
                .map_err(|e| TlsError::Credential(e.to_string()))?,
        };
        let mut g = self.current.write().unwrap_or_else(|p| p.into_inner());
        let generation = g.as_ref().map_or(0, |c| c.generation) + 1;
        *g = Some(Current {
            key: Arc::new(CertifiedKey::new(chain, signing)),
            key_digest,
            generation,
        });
        Ok(())
    }

    fn read_current(&self) -> Option<(Arc<CertifiedKey>, [u8; 32], u64)> {
        let g = self.current.read().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .map(|c| (c.key.clone(), c.key_digest, c.generation))
    }

    /// The current certificate and key.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.read_current().map(|(ck, _, _)| ck)
    }

    /// The current certificate and key with the slot's generation (0 while empty; every new
    /// certificate increments it).
    pub(crate) fn current_with_generation(&self) -> (Option<Arc<CertifiedKey>>, u64) {
        match self.read_current() {
            Some((ck, _, generation)) => (Some(ck), generation),
            None => (None, 0),
        }
    }

    /// How many certificates the slot has held.
    pub fn generation(&self) -> u64 {
        self.current_with_generation().1
    }

    /// Forgets the client config and its resumable sessions: the next connection makes a full
    /// handshake.
    pub fn forget_sessions(&self) {
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Counts a client handshake made with this slot's certificate.
    pub(crate) fn note_handshake(
        &self,
        resumed: bool,
        group: Option<rustls::NamedGroup>,
        suite: Option<rustls::CipherSuite>,
    ) {
        use std::sync::atomic::Ordering;
        let counter = if resumed {
            &self.stats.resumed
        } else {
            &self.stats.full
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.stats
            .group
            .store(group.map_or(0, u16::from).into(), Ordering::Relaxed);
        self.stats
            .suite
            .store(suite.map_or(0, u16::from).into(), Ordering::Relaxed);
    }

    /// What the client handshakes with this slot's certificates did so far.
    pub fn stats(&self) -> HandshakeStats {
        use std::sync::atomic::Ordering;
        let code = |v: &std::sync::atomic::AtomicU32| {
            u16::try_from(v.load(Ordering::Relaxed))
                .ok()
                .filter(|c| *c != 0)
        };
        HandshakeStats {
            full: self.stats.full.load(Ordering::Relaxed),
            resumed: self.stats.resumed.load(Ordering::Relaxed),
            last_group: code(&self.stats.group).map(rustls::NamedGroup::from),
            last_suite: code(&self.stats.suite).map(rustls::CipherSuite::from),
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

/// Presents one fixed certificate: the client config of a [`CertSlot`] generation, so the
/// sessions of that config can only ever speak for that certificate.
#[derive(Debug)]
pub(crate) struct FixedClientCert(pub(crate) Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
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
