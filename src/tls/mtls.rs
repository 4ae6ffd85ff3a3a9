//! mTLS between workloads: rustls configs that present the live SVID, verify the peer's chain
//! against the live bundle of the peer's trust domain, authorize its SPIFFE ID and roles, and
//! refuse revoked peers.
//!
//! Which bundle verifies a peer is decided by the trust domain its leaf names, read before
//! anything is verified:
//! - the own trust domain: the own bundle, only;
//! - a federated trust domain (one the [`TlsSource`] has a federated bundle for): that
//!   domain's bundle, only, and only when an authorization rule names the domain — foreign
//!   identities are never implicitly trusted;
//! - any other domain: the own bundle (a `bundle.pem` to which an operator appended another
//!   domain's CA by hand), and the authorization rules must still name the domain.
//!
//! A peer of another domain is judged without the roles in its certificate (its own CA wrote
//! them, and they mean nothing here); rules that require roles are met only by roles this
//! domain's CA granted it, through the authorizer's [`GrantSet`](super::GrantSet).

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DistinguishedName, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::KeyUsage;

use super::{Authorizer, Bundle, RevocationSet, TlsError, TlsSource, provider, verify_svid};
use crate::ca::{SvidInfo, parse_svid};

/// Verifies a peer (either side): chain → authorization → revocation.
#[derive(Debug)]
pub struct PeerVerifier {
    source: Arc<TlsSource>,
    authz: Authorizer,
    revocations: Option<Arc<RevocationSet>>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    /// A verifier trusting `source`'s live bundle, accepting peers `authz` allows, refusing peers
    /// in `revocations`.
    pub fn new(
        source: Arc<TlsSource>,
        authz: Authorizer,
        revocations: Option<Arc<RevocationSet>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            source,
            authz,
            revocations,
            provider: provider(),
        })
    }

    /// Checks a presented chain for `usage` at `now`.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SvidInfo, TlsError> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let bundle = self.bundle_for(end_entity)?;
        let mut svid = verify_svid(&chain, &bundle, now, usage, self.source.oid())?;
        // Roles are this domain's to give: a foreign CA could write any role. A foreign peer
        // holds only what this domain granted it (the authorizer's GrantSet).
        drop_foreign_roles(&mut svid, &self.source);
        self.authz.check(&svid).map_err(TlsError::Svid)?;
        if let Some(why) = self.revocations.as_ref().and_then(|r| r.check(&svid)) {
            return Err(TlsError::Svid(why));
        }
        Ok(svid)
    }

    /// The bundle that may verify `leaf`, chosen by the trust domain it claims (unverified:
    /// used only to pick the bundle, or to refuse).
    fn bundle_for(&self, leaf: &CertificateDer<'_>) -> Result<Arc<Bundle>, TlsError> {
        let claimed =
            parse_svid(leaf, self.source.oid()).map_err(|e| TlsError::Svid(e.to_string()))?;
        let td = claimed.spiffe_id.trust_domain_name();
        if self.source.trust_domain().as_deref() == Some(td) {
            return Ok(self.source.bundle());
        }
        match self.source.federated_bundle(td) {
            Some(_) if !self.authz.names_trust_domain(td) => Err(TlsError::Svid(format!(
                "peer {} is in federated trust domain {td}, which no authorization rule names (foreign identities are never implicitly trusted)",
                claimed.spiffe_id
            ))),
            Some(b) => Ok(b),
            None => Ok(self.source.bundle()),
        }
    }

    fn err(e: TlsError) -> rustls::Error {
        tracing::warn!(error = %e, "peer rejected");
        rustls::Error::General(e.to_string())
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, KeyUsage::client_auth())
            .map(|_| ClientCertVerified::assertion())
            .map_err(Self::err)
    }

    delegate_handshake_signatures!();
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, KeyUsage::server_auth())
            .map(|_| ServerCertVerified::assertion())
            .map_err(Self::err)
    }

    delegate_handshake_signatures!();
}

/// A server config: presents `source`'s SVID, requires a client certificate that `authz`
/// accepts and `revocations` does not list. Set `alpn_protocols` on the result as needed.
///
/// Session resumption is off: a resumed session skips certificate verification, so it would
/// keep admitting a client after its certificate was revoked or rotated away.
pub fn server_config(
    source: &Arc<TlsSource>,
    authz: Authorizer,
    revocations: Option<Arc<RevocationSet>>,
) -> Result<ServerConfig, TlsError> {
    let verifier = PeerVerifier::new(source.clone(), authz, revocations);
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Credential(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(source.slot());
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A client config: presents `source`'s SVID and accepts a server that `authz` allows (DNS
/// names are ignored; the SPIFFE ID is what counts).
///
/// Session resumption is off, for the same reason as in [`server_config`]: every handshake
/// verifies the server's current certificate against the live bundle and revocations.
pub fn client_config(
    source: &Arc<TlsSource>,
    authz: Authorizer,
    revocations: Option<Arc<RevocationSet>>,
) -> Result<ClientConfig, TlsError> {
    let verifier = PeerVerifier::new(source.clone(), authz, revocations);
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Credential(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(source.slot());
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The SVID of the peer on an established connection (verified during the handshake). The
/// roles of a peer from another trust domain are dropped, as [`PeerVerifier`] drops them.
pub fn peer_svid(certs: Option<&[CertificateDer<'_>]>, source: &TlsSource) -> Option<SvidInfo> {
    let mut svid = certs
        .and_then(|c| c.first())
        .and_then(|leaf| crate::ca::parse_svid(leaf, source.oid()).ok())?;
    drop_foreign_roles(&mut svid, source);
    Some(svid)
}

/// Clears the roles of an SVID from a trust domain other than `source`'s.
fn drop_foreign_roles(svid: &mut SvidInfo, source: &TlsSource) {
    if let Some(own) = source.trust_domain()
        && svid.spiffe_id.trust_domain_name() != own
    {
        svid.roles.clear();
    }
}
