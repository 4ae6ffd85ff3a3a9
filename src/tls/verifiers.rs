//! rustls verifier implementations.

use std::sync::{Arc, Mutex};

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
    /// Server chains this verifier accepted in a full handshake, for [`Self::check_resumed`].
    verified: Mutex<Vec<VerifiedChain>>,
}

/// A server chain that passed [`ServerVerifier::check`]: its digest and the time window in which
/// every certificate of it is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VerifiedChain {
    digest: [u8; 32],
    not_before: i64,
    not_after: i64,
}

/// How many verified server chains a verifier remembers (one per CA replica it met, and the
/// CA's previous certificate across its renewal).
const VERIFIED_CHAINS: usize = 8;

impl ServerTrust {
    /// Whether both trust the same CAs the same way.
    fn same_as(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Bundle(a), Self::Bundle(b)) => a.certs() == b.certs(),
            (Self::Fingerprint(a), Self::Fingerprint(b)) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
            verified: Mutex::default(),
        })
    }

    /// Expects any ID with this path (for a CA whose trust domain the client does not know yet).
    pub fn for_path(trust: ServerTrust, path: &str, oid: RolesOid) -> Arc<Self> {
        Arc::new(Self {
            trust,
            expect: Expect::Path(path.to_string()),
            oid,
            provider: provider(),
            verified: Mutex::default(),
        })
    }

    /// Whether `other` accepts exactly the servers this one does (same trust, same expected
    /// identity, same roles OID): then a session this verifier accepted may be resumed under
    /// `other`'s policy.
    pub fn same_policy(&self, other: &Self) -> bool {
        self.trust.same_as(&other.trust) && self.expect == other.expect && self.oid == other.oid
    }

    /// Checks the server chain of a resumed session at `now`. rustls does not call the verifier
    /// when it resumes (the chain comes from the session), so the client calls this after every
    /// resumed handshake, before the connection carries a request. The rule is that of a full
    /// handshake ([`Self::check_remembered`]).
    pub fn check_resumed(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), TlsError> {
        let (end_entity, intermediates) = chain.split_first().ok_or(TlsError::NoCertificate)?;
        self.check_remembered(end_entity, intermediates, now)
    }

    /// Checks a server chain at `now`, full handshake or resumed. A chain this verifier accepted
    /// before is not verified again while `now` is inside every certificate's validity: trust
    /// and expected identity are fixed for the verifier's life, so only time can change the
    /// outcome (the CA's own rule for client chains, `api::auth`). The CA presents the same
    /// chain on every connection, so a client that keeps its verifier (`client::connect` does,
    /// per certificate slot) pays the chain's signature verification once, not per connection;
    /// the handshake signature, which proves the server holds the key, is still verified on
    /// every full handshake. Any other chain, or the same one outside that window, is verified in
    /// full.
    fn check_remembered(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), TlsError> {
        let digest = chain_digest(end_entity, intermediates);
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|v| v.digest == digest && v.not_before <= secs && secs <= v.not_after);
        if known {
            return Ok(());
        }
        self.check(end_entity, intermediates, now)
    }

    /// Remembers a chain [`Self::check`] accepted.
    fn remember(&self, chain: &[CertificateDer<'_>], leaf: &crate::ca::SvidInfo) {
        let mut not_before = leaf.not_before;
        let mut not_after = leaf.not_after;
        for cert in &chain[1..] {
            use x509_parser::prelude::{FromDer, X509Certificate};
            let Ok((_, c)) = X509Certificate::from_der(cert) else {
                return;
            };
            not_before = not_before.max(c.validity().not_before.timestamp());
            not_after = not_after.min(c.validity().not_after.timestamp());
        }
        let entry = VerifiedChain {
            digest: chain_digest(&chain[0], &chain[1..]),
            not_before,
            not_after,
        };
        let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if v.contains(&entry) {
            return;
        }
        if v.len() >= VERIFIED_CHAINS {
            v.remove(0);
        }
        v.push(entry);
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
            self.remember(&chain, &svid);
            Ok(())
        } else {
            Err(TlsError::Svid(format!(
                "server presented {}, expected {:?}",
                svid.spiffe_id, self.expect
            )))
        }
    }
}

/// SHA-256 over a chain's certificates (leaf first), each prefixed with its length.
fn chain_digest(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut h = Sha256::new();
    for c in std::iter::once(end_entity).chain(intermediates) {
        h.update((c.len() as u64).to_be_bytes());
        h.update(c.as_ref());
    }
    h.finalize().into()
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
        self.check_remembered(end_entity, intermediates, now)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use rustls_pki_types::ServerName;

    use super::*;
    use crate::ca::{Authority, LeafParams};
    use crate::spiffe::TrustDomain;

    /// A CA and a server leaf valid over [now - 10, now + 100].
    fn ca_and_leaf(now: i64) -> (Bundle, CertificateDer<'static>) {
        let td = TrustDomain::new("example.org").unwrap();
        let (pem, key) = Authority::generate_pem(&td, "test CA").unwrap();
        let ca = Authority::from_pem(
            pem.as_bytes(),
            &key,
            Path::new("mem"),
            &td,
            RolesOid::default(),
        )
        .unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = ca
            .sign_leaf(
                &leaf_key,
                &LeafParams {
                    spiffe_id: SpiffeId::parse("spiffe://example.org/lanyard/server").unwrap(),
                    roles: vec![],
                    not_before: now - 10,
                    not_after: now + 100,
                    names: Default::default(),
                },
            )
            .unwrap();
        (Bundle::new(vec![ca.root().clone()]).unwrap(), leaf.der)
    }

    #[test]
    fn a_resumed_server_chain_is_judged_at_the_current_time_under_the_verifiers_own_policy() {
        let now = crate::tls::unix_now();
        let (bundle, leaf) = ca_and_leaf(now);
        let at = crate::tls::unix_time;
        let v = ServerVerifier::for_path(
            ServerTrust::Bundle(bundle.clone()),
            "/lanyard/server",
            RolesOid::default(),
        );
        let name = ServerName::try_from("ca.example").unwrap();
        v.verify_server_cert(&leaf, &[], &name, &[], at(now))
            .unwrap();
        let chain = [leaf.clone()];
        v.check_resumed(&chain, at(now + 50)).unwrap();
        // Past the leaf's notAfter the memo does not help: the full check runs and refuses.
        let expired = v.check_resumed(&chain, at(now + 200)).unwrap_err();
        assert!(expired.to_string().contains("expired"), "{expired}");
        // The same for a full handshake presenting the remembered chain.
        assert!(
            v.verify_server_cert(&leaf, &[], &name, &[], at(now + 200))
                .is_err()
        );
        v.verify_server_cert(&leaf, &[], &name, &[], at(now + 60))
            .unwrap();
        // A chain the verifier never accepted is verified in full: another CA's is refused.
        let (_, foreign) = ca_and_leaf(now);
        assert!(v.check_resumed(&[foreign], at(now)).is_err());
        // Verifiers of other policies are not the same policy (their sessions are never shared).
        let (other_bundle, _) = ca_and_leaf(now);
        let others = [
            ServerVerifier::for_path(
                ServerTrust::Bundle(other_bundle),
                "/lanyard/server",
                RolesOid::default(),
            ),
            ServerVerifier::for_path(
                ServerTrust::Bundle(bundle.clone()),
                "/other",
                RolesOid::default(),
            ),
            ServerVerifier::for_path(
                ServerTrust::Fingerprint([0; 32]),
                "/lanyard/server",
                RolesOid::default(),
            ),
        ];
        for o in &others {
            assert!(!v.same_policy(o));
            assert!(o.check_resumed(&chain, at(now)).is_err());
        }
        let same = ServerVerifier::for_path(
            ServerTrust::Bundle(bundle),
            "/lanyard/server",
            RolesOid::default(),
        );
        assert!(v.same_policy(&same));
    }
}
