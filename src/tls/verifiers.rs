//! rustls verifier implementations.

use std::sync::Arc;

use rustls::DistinguishedName;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use webpki::KeyUsage;

use super::{Bundle, TlsError, provider, verify_svid};
use crate::ca::RolesOid;
use crate::spiffe::SpiffeId;

/// How a client decides which CA to trust for the server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// A bundle of CA certificates.
    Bundle(Bundle),
    /// The SHA-256 of the CA certificate (from a join token): the server must send that CA
    /// certificate in its chain, and the leaf must chain to it.
    Fingerprint([u8; 32]),
}

/// Authenticates a server by its SVID: chain to the trusted CA, then the SPIFFE ID must satisfy
/// `expect` (DNS names are not used).
#[derive(Debug)]
pub struct ServerVerifier {
    trust: ServerTrust,
    expect: Expect,
    oid: RolesOid,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug, Clone)]
enum Expect {
    Id(SpiffeId),
    Path(String),
}

/// Accepts any client certificate during the handshake (still checking the handshake signature,
/// so the client proves it holds the key) and leaves chain verification to the request handler.
///
/// The CA needs this: a join-token caller has no certificate, a renewing caller may present one
/// that expired within the renewal grace, and both deserve a gRPC status that says what is wrong
/// rather than a TLS alert. Handlers must authenticate through `api::auth`, which verifies the
/// chain with [`verify_svid`].
#[derive(Debug)]
pub struct DeferredClientVerifier {
    provider: Arc<CryptoProvider>,
}

impl ServerVerifier {
    /// Expects exactly `id`.
    pub fn for_id(trust: ServerTrust, id: SpiffeId, oid: RolesOid) -> Arc<Self> {
        Arc::new(Self {
            trust,
            expect: Expect::Id(id),
            oid,
            provider: provider(),
        })
    }

    /// Expects any ID with this path (for a CA whose trust domain the client does not know yet).
    pub fn for_path(trust: ServerTrust, path: &str, oid: RolesOid) -> Arc<Self> {
        Arc::new(Self {
            trust,
            expect: Expect::Path(path.to_string()),
            oid,
            provider: provider(),
        })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), TlsError> {
        let pinned;
        let bundle = match &self.trust {
            ServerTrust::Bundle(b) => b,
            ServerTrust::Fingerprint(fp) => {
                let ca = intermediates
                    .iter()
                    .find(|c| Sha256::digest(c.as_ref()).as_slice() == fp)
                    .ok_or_else(|| {
                        TlsError::Chain(
                            "the server's CA does not match the fingerprint in the join token"
                                .into(),
                        )
                    })?;
                pinned = Bundle::new(vec![ca.clone().into_owned()])?;
                &pinned
            }
        };
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let svid = verify_svid(&chain, bundle, now, KeyUsage::server_auth(), &self.oid)?;
        let ok = match &self.expect {
            Expect::Id(id) => &svid.spiffe_id == id,
            Expect::Path(p) => svid.spiffe_id.path() == p,
        };
        if ok {
            Ok(())
        } else {
            Err(TlsError::Svid(format!(
                "server presented {}, expected {:?}",
                svid.spiffe_id, self.expect
            )))
        }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    delegate_handshake_signatures!();
}

impl DeferredClientVerifier {
    /// A verifier using Lanyard's provider.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            provider: provider(),
        })
    }
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    delegate_handshake_signatures!();
}
