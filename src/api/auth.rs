//! Authentication of callers by their Lanyard client certificate, and role checks.

use std::sync::Arc;
use std::time::Duration;

use tonic::Request;
use webpki::KeyUsage;

use crate::ca::{RolesOid, SvidInfo, parse_svid};
use crate::issuance::fmt_time;
use crate::revocation::Revocations;
use crate::tls::{Bundle, TlsError, unix_now, unix_time, verify_svid};

/// Why a caller was not authenticated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No client certificate on the connection.
    #[error("this call needs a Lanyard client certificate (mTLS); none was presented")]
    NoCertificate,
    /// The chain does not verify against this CA.
    #[error("client certificate rejected: {0}")]
    Chain(String),
    /// Expired, and beyond the renewal grace (or grace does not apply to this call).
    #[error("{0}")]
    Expired(String),
    /// The certificate or its identity is revoked.
    #[error("{0}")]
    Revoked(String),
    /// The certificate lacks a role the call needs.
    #[error("{0}")]
    MissingRole(String),
    /// Store failure while checking revocation.
    #[error("{0}")]
    Internal(String),
}

/// Verifies client certificates against the CA bundle and the revocation store.
#[derive(Clone)]
pub struct Authenticator {
    bundle: Arc<Bundle>,
    oid: RolesOid,
    grace: Duration,
    revocations: Arc<Revocations>,
}

impl Authenticator {
    /// An authenticator trusting `bundle`.
    pub fn new(bundle: Bundle, oid: RolesOid, grace: Duration, revocations: Arc<Revocations>) -> Self {
        Self {
            bundle: Arc::new(bundle),
            oid,
            grace,
            revocations,
        }
    }

    /// The caller's verified, unrevoked SVID. With `allow_grace`, a certificate that expired less
    /// than the renewal grace ago is accepted (renewal only); the handshake already proved the
    /// caller holds its key.
    pub fn peer<T>(&self, req: &Request<T>, allow_grace: bool) -> Result<SvidInfo, AuthError> {
        let chain = req.peer_certs().ok_or(AuthError::NoCertificate)?;
        if chain.is_empty() {
            return Err(AuthError::NoCertificate);
        }
        let now = unix_now();
        let svid = match verify_svid(&chain, &self.bundle, unix_time(now), KeyUsage::client_auth(), &self.oid) {
            Ok(s) => s,
            Err(TlsError::Chain(m)) => {
                let leaf = parse_svid(&chain[0], &self.oid).map_err(|_| AuthError::Chain(m.clone()))?;
                if leaf.not_after >= now {
                    return Err(AuthError::Chain(m));
                }
                let since = now - leaf.not_after;
                if !allow_grace || since as u64 > self.grace.as_secs() {
                    let why = if allow_grace {
                        format!(
                            "client certificate expired at {} ({since}s ago), beyond the renewal grace of {}s; bootstrap again with a join token",
                            fmt_time(leaf.not_after),
                            self.grace.as_secs()
                        )
                    } else {
                        format!("client certificate expired at {}", fmt_time(leaf.not_after))
                    };
                    return Err(AuthError::Expired(why));
                }
                // Within grace: the chain must still be valid at the moment the leaf expired.
                verify_svid(&chain, &self.bundle, unix_time(leaf.not_after - 1), KeyUsage::client_auth(), &self.oid)
                    .map_err(|e| AuthError::Chain(e.to_string()))?
            }
            Err(e) => return Err(AuthError::Chain(e.to_string())),
        };
        if let Some(r) = self
            .revocations
            .status(&svid)
            .map_err(|e| AuthError::Internal(e.to_string()))?
        {
            let what = if r.identity_rule {
                format!("identity {} was revoked", svid.spiffe_id)
            } else {
                format!("certificate {} was revoked", svid.serial)
            };
            return Err(AuthError::Revoked(format!(
                "{what} at {}: {}",
                fmt_time(r.revoked_at),
                r.reason
            )));
        }
        Ok(svid)
    }

    /// The caller's SVID, if it holds at least one of `roles`.
    pub fn require_role<T>(&self, req: &Request<T>, roles: &[&str]) -> Result<SvidInfo, AuthError> {
        let svid = self.peer(req, false)?;
        if roles.iter().any(|r| svid.roles.iter().any(|have| have == r)) {
            Ok(svid)
        } else {
            Err(AuthError::MissingRole(format!(
                "{} lacks the role this call needs (one of: {})",
                svid.spiffe_id,
                roles.join(", ")
            )))
        }
    }
}
