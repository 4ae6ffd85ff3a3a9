//! Authentication of callers by their Lanyard client certificate, and role checks.
//!
//! Verifying a client chain costs an ECDSA verify (~60 µs, as much as the CSR check of an
//! issuance). A caller that keeps its connection presents the same chain on every call, so the
//! [`Authenticator`] remembers chains that verified (see [`ChainCache`]) and skips the signature
//! check while the current time is inside every certificate's validity window. Revocation is
//! still looked up on every call, and expiry and the renewal grace are still judged at the
//! current time.
//!
//! Each connection also carries a [`ConnAuth`] (put in every request by `net::TrackRequests`):
//! the last verification of the chain that authenticates it, so a kept connection's calls skip
//! even the chain hash, and the newest certificate this CA issued over it by a renewal the
//! connection authenticated. From then on that certificate, not the one the handshake
//! presented, authenticates the connection (design decision 65, docs/security.md): a rotation
//! is one renewal call on the kept connection, no new handshake. Every check still applies to
//! it on every call: chain against the current bundle, expiry and grace, revocation of its
//! serial and identity.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tonic::Request;
use webpki::KeyUsage;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{RolesOid, SvidInfo, parse_svid};
use crate::federation::BundleSet;
use crate::issuance::fmt_time;
use crate::revocation::Revocations;
use crate::spiffe::TrustDomain;
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

/// Response metadata of a renewal whose certificate now authenticates the connection it came
/// over (value: the new certificate's serial, hex): the agent then keeps the connection instead
/// of opening a new one before the old certificate expires. A CA without it never says so.
pub const CONNECTION_BOUND: &str = "lanyard-connection-bound";

/// How many verified chains an [`Authenticator`] remembers by default (~300 bytes each).
pub const CHAIN_CACHE_CAPACITY: usize = 16 * 1024;

/// Verifies client certificates against the CA bundle and the revocation store.
#[derive(Clone)]
pub struct Authenticator {
    /// The bundle and its generation (bumped by every [`Authenticator::set_bundle`]).
    bundle: Arc<RwLock<(Arc<Bundle>, u64)>>,
    oid: RolesOid,
    grace: Duration,
    revocations: Arc<Revocations>,
    verified: Arc<ChainCache>,
    /// Federated bundles, for the few calls a foreign identity may make.
    federation: Option<watch::Receiver<Arc<BundleSet>>>,
}

impl Authenticator {
    /// An authenticator trusting `bundle`.
    pub fn new(
        bundle: Bundle,
        oid: RolesOid,
        grace: Duration,
        revocations: Arc<Revocations>,
    ) -> Self {
        Self::with_cache_capacity(bundle, oid, grace, revocations, CHAIN_CACHE_CAPACITY)
    }

    /// An authenticator remembering at most `capacity` verified chains (0 disables the cache).
    pub fn with_cache_capacity(
        bundle: Bundle,
        oid: RolesOid,
        grace: Duration,
        revocations: Arc<Revocations>,
        capacity: usize,
    ) -> Self {
        Self {
            bundle: Arc::new(RwLock::new((Arc::new(bundle), 0))),
            oid,
            grace,
            revocations,
            verified: Arc::new(ChainCache::new(capacity)),
            federation: None,
        }
    }

    /// Also authenticates identities of the trust domains federated in `bundles`, for the calls
    /// that use [`Authenticator::peer_any_domain`].
    pub fn with_federation(mut self, bundles: watch::Receiver<Arc<BundleSet>>) -> Self {
        self.federation = Some(bundles);
        self
    }

    /// Trusts `bundle` from now on (a CA rotation: both CAs during the overlap, then only the
    /// new one). Chains verified against the previous bundle are forgotten.
    pub fn set_bundle(&self, bundle: Bundle) {
        let mut g = self.bundle.write().unwrap_or_else(|p| p.into_inner());
        g.0 = Arc::new(bundle);
        g.1 += 1;
        // Under the bundle lock, so no verification against the old bundle can be cached after.
        self.verified.clear(g.1);
    }

    fn current_bundle(&self) -> (Arc<Bundle>, u64) {
        let g = self.bundle.read().unwrap_or_else(|p| p.into_inner());
        (g.0.clone(), g.1)
    }

    /// Remembers a chain this CA has just issued as verified, so the holder's first call with it
    /// skips the chain's signature check. That call is nearly always the next renewal, made on a
    /// new connection with this very certificate, so without this every renewal would pay a full
    /// verify (~60-120 µs). Only when `signer` (the root the chain was signed under) is in the
    /// trusted bundle: a CA rotation in between makes it a plain cache miss.
    pub fn remember_issued(
        &self,
        chain: &[CertificateDer<'_>],
        svid: &SvidInfo,
        signer: &CertificateDer<'_>,
    ) {
        let (bundle, generation) = self.current_bundle();
        if !bundle.certs().iter().any(|c| c.as_ref() == signer.as_ref()) {
            return;
        }
        if let Some((from, until)) = validity_window(chain, svid) {
            self.verified.insert(
                ChainCache::key(chain),
                svid.clone(),
                from,
                until,
                generation,
            );
        }
    }

    /// Hits, misses and size of the verified-chain cache.
    pub fn cache_stats(&self) -> CacheStats {
        self.verified.stats()
    }

    /// Makes `chain` (just issued by a renewal that `renewed_by` authenticated on `req`'s
    /// connection) the certificate that authenticates that connection from now on (see the
    /// module docs). Returns whether it did: not for a request without connection state, nor
    /// for another identity than the caller's (a renewal never changes it; checked anyway).
    /// `signer` is the root `chain` was signed under; when it is in the trusted bundle the
    /// connection's next call skips the chain's signature check.
    pub fn bind_to_connection<T>(
        &self,
        req: &Request<T>,
        renewed_by: &SvidInfo,
        chain: &[CertificateDer<'_>],
        svid: &SvidInfo,
        signer: &CertificateDer<'_>,
    ) -> bool {
        let Some(conn) = req.extensions().get::<Arc<ConnAuth>>() else {
            return false;
        };
        if renewed_by.spiffe_id != svid.spiffe_id || chain.is_empty() {
            return false;
        }
        let (bundle, generation) = self.current_bundle();
        let verified = bundle
            .certs()
            .iter()
            .any(|c| c.as_ref() == signer.as_ref())
            .then(|| validity_window(chain, svid))
            .flatten()
            .map(|(from, until)| ConnVerified {
                svid: svid.clone(),
                from,
                until,
                generation,
            });
        let chain: Arc<[CertificateDer<'static>]> =
            chain.iter().map(|c| c.clone().into_owned()).collect();
        conn.bind(chain, svid.clone(), verified);
        true
    }

    /// The caller's verified, unrevoked SVID. With `allow_grace`, a certificate that expired less
    /// than the renewal grace ago is accepted (renewal only); the handshake already proved the
    /// caller holds its key. On a connection a renewal bound a newer certificate to, that
    /// certificate is the caller's (see the module docs).
    pub fn peer<T>(&self, req: &Request<T>, allow_grace: bool) -> Result<SvidInfo, AuthError> {
        let now = unix_now();
        let svid = match req.extensions().get::<Arc<ConnAuth>>() {
            Some(conn) => self.verify_connection(conn, req, now, allow_grace)?,
            None => {
                let chain = req.peer_certs().ok_or(AuthError::NoCertificate)?;
                if chain.is_empty() {
                    return Err(AuthError::NoCertificate);
                }
                self.verify_chain(&chain, now, allow_grace)?
            }
        };
        self.check_revocation(svid, allow_grace)
    }

    /// The chain that authenticates `conn` (the bound certificate's, else the handshake's),
    /// verified through the connection's own cache, then the shared one. The connection's
    /// cache answers only for the bundle generation it was verified against and inside the
    /// chain's validity window; anything else takes [`Authenticator::verify_chain`].
    fn verify_connection<T>(
        &self,
        conn: &ConnAuth,
        req: &Request<T>,
        now: i64,
        allow_grace: bool,
    ) -> Result<SvidInfo, AuthError> {
        // Read before verifying: a bundle change meanwhile leaves the cached entry stale.
        let generation = self.current_bundle().1;
        let (bound, epoch) = match conn.cached(now, generation) {
            ConnLookup::Hit(svid) => return Ok(svid),
            ConnLookup::Miss { bound, epoch } => (bound, epoch),
        };
        let presented;
        let chain: &[CertificateDer<'_>] = match &bound {
            Some(c) => &c[..],
            None => {
                presented = req.peer_certs().ok_or(AuthError::NoCertificate)?;
                presented.as_slice()
            }
        };
        if chain.is_empty() {
            return Err(AuthError::NoCertificate);
        }
        let svid = self.verify_chain(chain, now, allow_grace)?;
        if svid.not_before <= now
            && now <= svid.not_after
            && let Some((from, until)) = validity_window(chain, &svid)
        {
            conn.remember(
                epoch,
                ConnVerified {
                    svid: svid.clone(),
                    from,
                    until,
                    generation,
                },
            );
        }
        Ok(svid)
    }

    /// The caller's SVID, where the caller may also be an identity of a federated trust domain
    /// (the Access calls, and `Revocation.Watch` for a federated CA; issuance, admin and audit
    /// calls use [`Authenticator::peer`]). A local caller is authenticated as by `peer`. A foreign one is
    /// verified against the bundle this CA holds for its own domain, checked against this CA's
    /// revocations (an admin here may revoke a foreign identity), and stripped of the roles its
    /// CA wrote: roles are this domain's to give, so a foreign `lanyard:approver` counts for
    /// nothing here.
    pub fn peer_any_domain<T>(&self, req: &Request<T>) -> Result<SvidInfo, AuthError> {
        // Only this CA binds certificates to connections, and only its own domain's: a bound
        // connection is a local caller.
        if let Some(conn) = req.extensions().get::<Arc<ConnAuth>>()
            && conn.is_bound()
        {
            return self.peer(req, false);
        }
        let chain = req.peer_certs().ok_or(AuthError::NoCertificate)?;
        self.authenticate_any_domain(&chain, unix_now())
    }

    /// [`Authenticator::peer_any_domain`] for a presented chain (leaf first) at `now` (seconds).
    pub fn authenticate_any_domain(
        &self,
        chain: &[CertificateDer<'_>],
        now: i64,
    ) -> Result<SvidInfo, AuthError> {
        let svid = self.verify_any_domain(chain, now, false)?;
        self.check_revocation(svid, false)
    }

    /// Who presented `chain`, for the record of a refused call: `Ok` with the SVID its chain
    /// proves, in this trust domain or a federated one, whether or not it is revoked (an expired
    /// certificate still counts within the renewal grace); else `Err` with the SPIFFE ID the leaf
    /// merely claims (empty when it claims none), for the `claimed` field and nothing else.
    pub fn identify(&self, chain: &[CertificateDer<'_>], now: i64) -> Result<SvidInfo, String> {
        self.verify_any_domain(chain, now, true).map_err(|_| {
            chain
                .first()
                .and_then(|leaf| parse_svid(leaf, &self.oid).ok())
                .map(|s| s.spiffe_id.to_string())
                .unwrap_or_default()
        })
    }

    /// Chain verification against the bundle of the leaf's own trust domain (this one, or a
    /// federated one, whose roles are then dropped); no revocation check.
    fn verify_any_domain(
        &self,
        chain: &[CertificateDer<'_>],
        now: i64,
        allow_grace: bool,
    ) -> Result<SvidInfo, AuthError> {
        let (Some(leaf), Some(federation)) = (chain.first(), &self.federation) else {
            if chain.is_empty() {
                return Err(AuthError::NoCertificate);
            }
            return self.verify_chain(chain, now, allow_grace);
        };
        // Unverified: only picks the bundle that must verify the chain.
        let claimed = parse_svid(leaf, &self.oid).map_err(|e| AuthError::Chain(e.to_string()))?;
        let set = federation.borrow().clone();
        let td = claimed.spiffe_id.trust_domain_name();
        if td == set.own.trust_domain().as_str() {
            return self.verify_chain(chain, now, allow_grace);
        }
        let foreign = TrustDomain::new(td)
            .ok()
            .and_then(|t| set.federated.get(&t))
            .ok_or_else(|| {
                AuthError::Chain(format!(
                    "{} is in trust domain {td}, which this CA does not federate with",
                    claimed.spiffe_id
                ))
            })?;
        let bundle = foreign
            .to_tls_bundle()
            .map_err(|e| AuthError::Internal(format!("bundle of {td}: {e}")))?;
        let mut svid = verify_svid(
            chain,
            &bundle,
            unix_time(now),
            KeyUsage::client_auth(),
            &self.oid,
        )
        .map_err(|e| {
            AuthError::Chain(format!(
                "{e} (verified against the bundle of federated trust domain {td})"
            ))
        })?;
        svid.roles.clear();
        Ok(svid)
    }

    /// [`Authenticator::peer`] for a presented chain (leaf first) at time `now` (seconds).
    pub fn authenticate(
        &self,
        chain: &[CertificateDer<'_>],
        now: i64,
        allow_grace: bool,
    ) -> Result<SvidInfo, AuthError> {
        if chain.is_empty() {
            return Err(AuthError::NoCertificate);
        }
        let svid = self.verify_chain(chain, now, allow_grace)?;
        self.check_revocation(svid, allow_grace)
    }

    /// Chain verification, through the cache. A cached entry stands for "`verify_svid` succeeded
    /// on exactly these bytes against this (immutable) bundle", and is used only while `now` lies
    /// inside every presented certificate's validity window, where that verification gives the
    /// same answer at any time. Anything else (expired, not yet valid, grace) takes the full path.
    fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: i64,
        allow_grace: bool,
    ) -> Result<SvidInfo, AuthError> {
        let key = ChainCache::key(chain);
        if let Some(svid) = self.verified.get(&key, now) {
            return Ok(svid);
        }
        let (bundle, generation) = self.current_bundle();
        let svid = match verify_svid(
            chain,
            &bundle,
            unix_time(now),
            KeyUsage::client_auth(),
            &self.oid,
        ) {
            Ok(s) => {
                if let Some((from, until)) = validity_window(chain, &s) {
                    self.verified
                        .insert(key, s.clone(), from, until, generation);
                }
                s
            }
            Err(TlsError::Chain(m)) => {
                let leaf =
                    parse_svid(&chain[0], &self.oid).map_err(|_| AuthError::Chain(m.clone()))?;
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
                verify_svid(
                    chain,
                    &bundle,
                    unix_time(leaf.not_after - 1),
                    KeyUsage::client_auth(),
                    &self.oid,
                )
                .map_err(|e| AuthError::Chain(e.to_string()))?
            }
            Err(e) => return Err(AuthError::Chain(e.to_string())),
        };
        Ok(svid)
    }

    /// Revocation is never cached: a certificate or identity revoked a moment ago is refused on
    /// its very next call. A *renewable* serial revocation (a revoked grant) still lets the
    /// holder renew (`renewal`), and nothing else.
    fn check_revocation(&self, svid: SvidInfo, renewal: bool) -> Result<SvidInfo, AuthError> {
        if let Some(r) = self
            .revocations
            .status(&svid)
            .map_err(|e| AuthError::Internal(e.to_string()))?
        {
            if renewal && r.renewable && !r.identity_rule {
                return Ok(svid);
            }
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
        if roles
            .iter()
            .any(|r| svid.roles.iter().any(|have| have == r))
        {
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

/// Counters of the verified-chain cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Calls answered without a signature check.
    pub hits: u64,
    /// Calls that verified the chain.
    pub misses: u64,
    /// Chains remembered now.
    pub entries: usize,
}

/// Authentication state of one connection (see the module docs): created per connection by
/// the listener (`net::Conn`) and found in every request's extensions as `Arc<ConnAuth>`.
#[derive(Debug, Default)]
pub struct ConnAuth {
    inner: Mutex<ConnState>,
}

#[derive(Debug, Default)]
struct ConnState {
    /// The newest certificate this CA issued over the connection; `None`: the handshake's
    /// chain authenticates it.
    bound: Option<Bound>,
    /// Bumped by every binding, so a verification of the previous chain that finishes after
    /// a binding is not remembered as the new one's.
    epoch: u64,
    /// The last verification of the connection's chain.
    verified: Option<ConnVerified>,
}

/// A certificate bound to a connection: its chain (leaf first), and what it says of itself as
/// issued, for judging revocations against it without parsing it again
/// ([`ConnAuth::bound_svid`]).
#[derive(Debug)]
struct Bound {
    chain: Arc<[CertificateDer<'static>]>,
    svid: SvidInfo,
}

/// A verification of a connection's chain: "`verify_svid` succeeded on this chain against
/// bundle `generation`", usable while the time is inside `[from, until]`.
#[derive(Debug)]
struct ConnVerified {
    svid: SvidInfo,
    from: i64,
    until: i64,
    generation: u64,
}

enum ConnLookup {
    Hit(SvidInfo),
    Miss {
        bound: Option<Arc<[CertificateDer<'static>]>>,
        epoch: u64,
    },
}

// === impl ConnAuth ===

impl ConnAuth {
    /// A connection authenticated by its handshake only.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a certificate issued over this connection authenticates it.
    pub fn is_bound(&self) -> bool {
        self.lock().bound.is_some()
    }

    fn cached(&self, now: i64, generation: u64) -> ConnLookup {
        let st = self.lock();
        match &st.verified {
            Some(v) if v.generation == generation && v.from <= now && now <= v.until => {
                ConnLookup::Hit(v.svid.clone())
            }
            _ => ConnLookup::Miss {
                bound: st.bound.as_ref().map(|b| b.chain.clone()),
                epoch: st.epoch,
            },
        }
    }

    fn remember(&self, epoch: u64, verified: ConnVerified) {
        let mut st = self.lock();
        if st.epoch == epoch {
            st.verified = Some(verified);
        }
    }

    /// The chain of the newest certificate this CA issued over the connection, if any.
    pub fn bound_chain(&self) -> Option<Arc<[CertificateDer<'static>]>> {
        self.lock().bound.as_ref().map(|b| b.chain.clone())
    }

    /// The newest certificate this CA issued over the connection, if any: the one that
    /// authenticates its calls, so the one a revocation must end its open streams for.
    pub fn bound_svid(&self) -> Option<SvidInfo> {
        self.lock().bound.as_ref().map(|b| b.svid.clone())
    }

    fn bind(
        &self,
        chain: Arc<[CertificateDer<'static>]>,
        svid: SvidInfo,
        verified: Option<ConnVerified>,
    ) {
        let mut st = self.lock();
        st.bound = Some(Bound { chain, svid });
        st.epoch += 1;
        st.verified = verified;
    }
}

/// Client chains that verified, keyed by SHA-256 over the presented DER (each certificate
/// length-prefixed, so no two chains share a preimage). Bounded: once `capacity` chains are held,
/// the oldest insertion is dropped (FIFO; entries whose window has closed simply stop matching and
/// age out the same way). One short mutex section per call; nothing slow runs under it.
struct ChainCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<[u8; 32], Verified>,
    /// Keys in insertion order; always exactly the keys of `map`.
    order: VecDeque<[u8; 32]>,
    hits: u64,
    misses: u64,
    /// Generation of the bundle the cached chains were verified against.
    generation: u64,
}

struct Verified {
    svid: SvidInfo,
    /// Latest notBefore of the chain's certificates.
    from: i64,
    /// Earliest notAfter of the chain's certificates.
    until: i64,
}

impl ChainCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn key(chain: &[CertificateDer<'_>]) -> [u8; 32] {
        let mut h = Sha256::new();
        for c in chain {
            h.update((c.len() as u64).to_be_bytes());
            h.update(c.as_ref());
        }
        h.finalize().into()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The SVID of a chain that verified before, if `now` is inside its validity window.
    fn get(&self, key: &[u8; 32], now: i64) -> Option<SvidInfo> {
        if self.capacity == 0 {
            return None;
        }
        let mut inner = self.lock();
        match inner.map.get(key) {
            Some(v) if v.from <= now && now <= v.until => {
                let svid = v.svid.clone();
                inner.hits += 1;
                Some(svid)
            }
            _ => {
                inner.misses += 1;
                None
            }
        }
    }

    /// Remembers a chain verified against bundle generation `generation` (dropped if the
    /// bundle has changed since).
    fn insert(&self, key: [u8; 32], svid: SvidInfo, from: i64, until: i64, generation: u64) {
        if self.capacity == 0 {
            return;
        }
        let entry = Verified { svid, from, until };
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if let Some(e) = inner.map.get_mut(&key) {
            *e = entry;
            return;
        }
        while inner.map.len() >= self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.map.remove(&oldest);
        }
        inner.map.insert(key, entry);
        inner.order.push_back(key);
    }

    /// Forgets every chain; only chains verified against bundle `generation` may be added.
    fn clear(&self, generation: u64) {
        let mut inner = self.lock();
        inner.map.clear();
        inner.order.clear();
        inner.generation = generation;
    }

    fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats {
            hits: inner.hits,
            misses: inner.misses,
            entries: inner.map.len(),
        }
    }
}

/// The window in which every certificate of `chain` is within its validity period: webpki checks
/// `notBefore <= t <= notAfter` for each certificate on the path, and nothing else it checks
/// depends on time. `None` if an intermediate does not parse (then the chain is not cached).
fn validity_window(chain: &[CertificateDer<'_>], leaf: &SvidInfo) -> Option<(i64, i64)> {
    let (mut from, mut until) = (leaf.not_before, leaf.not_after);
    for c in chain.iter().skip(1) {
        let (_, cert) = X509Certificate::from_der(c).ok()?;
        from = from.max(cert.validity().not_before.timestamp());
        until = until.min(cert.validity().not_after.timestamp());
    }
    Some((from, until))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::audit::{AuditLog, Event, Kind};
    use crate::ca::{Authority, LeafParams};
    use crate::spiffe::{SpiffeId, TrustDomain};
    use crate::store::{RECORD_VERSION, RevocationRecord, SledStore, Store, Write};

    struct Fixture {
        _dir: tempfile::TempDir,
        authority: Authority,
        auth: Authenticator,
        log: AuditLog,
    }

    fn fixture(capacity: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let authority =
            Authority::load_or_create(&dir.path().join("ca"), &td, RolesOid::default()).unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
        let log = AuditLog::start(store).unwrap();
        let grace = Duration::from_secs(3600);
        let revocations = Arc::new(Revocations::new(
            log.clone(),
            grace,
            Duration::from_secs(86400),
        ));
        let bundle = Bundle::new(vec![authority.root().clone()]).unwrap();
        let auth = Authenticator::with_cache_capacity(
            bundle,
            RolesOid::default(),
            grace,
            revocations,
            capacity,
        );
        Fixture {
            _dir: dir,
            authority,
            auth,
            log,
        }
    }

    fn leaf(
        authority: &Authority,
        path: &str,
        not_before: i64,
        not_after: i64,
    ) -> Vec<CertificateDer<'static>> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = LeafParams {
            names: Default::default(),
            spiffe_id: SpiffeId::parse(&format!("spiffe://example.org{path}")).unwrap(),
            roles: vec!["db-read".into()],
            not_before,
            not_after,
        };
        vec![authority.sign_leaf(&key, &params).unwrap().der]
    }

    fn stats(f: &Fixture) -> (u64, u64, usize) {
        let s = f.auth.cache_stats();
        (s.hits, s.misses, s.entries)
    }

    #[tokio::test]
    async fn a_chain_this_ca_issued_is_remembered_for_its_first_call() {
        let f = fixture(16);
        let now = unix_now();
        let chain = leaf(&f.authority, "/a", now - 30, now + 60);
        let svid = parse_svid(&chain[0], &RolesOid::default()).unwrap();
        f.auth.remember_issued(&chain, &svid, f.authority.root());
        assert_eq!(f.auth.authenticate(&chain, now, false).unwrap(), svid);
        assert_eq!(stats(&f), (1, 0, 1), "the first call is a hit");
        // Not under a trusted root (here: the leaf itself as "signer"): not remembered.
        let other = leaf(&f.authority, "/b", now - 30, now + 60);
        let svid_b = parse_svid(&other[0], &RolesOid::default()).unwrap();
        f.auth.remember_issued(&other, &svid_b, &other[0]);
        f.auth.authenticate(&other, now, false).unwrap();
        assert_eq!(stats(&f), (1, 1, 2));
    }

    #[tokio::test]
    async fn cached_chain_is_used_only_inside_its_validity_window() {
        let f = fixture(16);
        let now = unix_now();
        let chain = leaf(&f.authority, "/a", now - 30, now + 60);
        let first = f.auth.authenticate(&chain, now, false).unwrap();
        assert_eq!(stats(&f), (0, 1, 1));
        assert_eq!(f.auth.authenticate(&chain, now + 60, false).unwrap(), first);
        assert_eq!(stats(&f), (1, 1, 1));
        // Past notAfter the cache does not answer: plain calls are refused as expired ...
        assert!(matches!(
            f.auth.authenticate(&chain, now + 61, false),
            Err(AuthError::Expired(_))
        ));
        // ... renewal goes through the grace rules (and the full verification) ...
        assert_eq!(f.auth.authenticate(&chain, now + 61, true).unwrap(), first);
        // ... and beyond the grace it is refused too.
        assert!(matches!(
            f.auth.authenticate(&chain, now + 60 + 3601, true),
            Err(AuthError::Expired(_))
        ));
        // Before notBefore (a clock that went back) the cache does not answer either.
        assert!(matches!(
            f.auth.authenticate(&chain, now - 31, false),
            Err(AuthError::Chain(_))
        ));
        assert_eq!(stats(&f), (1, 5, 1));
    }

    #[tokio::test]
    async fn cache_is_bounded_and_evicts_oldest() {
        let f = fixture(3);
        let now = unix_now();
        let chains: Vec<_> = (0..5)
            .map(|i| leaf(&f.authority, &format!("/c{i}"), now - 30, now + 60))
            .collect();
        for c in &chains {
            f.auth.authenticate(c, now, false).unwrap();
        }
        assert_eq!(stats(&f), (0, 5, 3));
        // The newest is still there; the oldest was evicted and costs a verification again.
        f.auth.authenticate(&chains[4], now, false).unwrap();
        assert_eq!(stats(&f), (1, 5, 3));
        f.auth.authenticate(&chains[0], now, false).unwrap();
        assert_eq!(stats(&f), (1, 6, 3));
    }

    #[tokio::test]
    async fn zero_capacity_disables_the_cache() {
        let f = fixture(0);
        let now = unix_now();
        let chain = leaf(&f.authority, "/a", now - 30, now + 60);
        f.auth.authenticate(&chain, now, false).unwrap();
        f.auth.authenticate(&chain, now, false).unwrap();
        assert_eq!(stats(&f), (0, 0, 0));
    }

    #[tokio::test]
    async fn revocation_is_checked_on_every_call_even_when_cached() {
        let f = fixture(16);
        let now = unix_now();
        let by_serial = leaf(&f.authority, "/s", now - 30, now + 60);
        let by_identity = leaf(&f.authority, "/i", now - 30, now + 60);
        let s = f.auth.authenticate(&by_serial, now, false).unwrap();
        let i = f.auth.authenticate(&by_identity, now, true).unwrap();
        let record = |serial: String, id: &SpiffeId, identity_rule: bool| RevocationRecord {
            v: RECORD_VERSION,
            rev: 0,
            serial,
            spiffe_id: id.to_string(),
            identity_rule,
            before: if identity_rule { now + 1 } else { 0 },
            reason: "test".into(),
            revoked_at: now,
            expires_at: now + 3600,
            blocked: identity_rule,
            renewable: false,
            origin: String::new(),
        };
        f.log
            .record(
                Event::new(Kind::Revoked, "test"),
                vec![
                    Write::PutRevocation(record(s.serial.to_hex(), &s.spiffe_id, false)),
                    Write::PutRevocation(record(String::new(), &i.spiffe_id, true)),
                ],
            )
            .await
            .unwrap();
        assert!(matches!(
            f.auth.authenticate(&by_serial, now, false),
            Err(AuthError::Revoked(_))
        ));
        assert!(matches!(
            f.auth.authenticate(&by_identity, now, true),
            Err(AuthError::Revoked(_))
        ));
        // Both answers came from cached chains: the refusal is the revocation check's.
        assert_eq!(stats(&f).0, 2);
    }

    #[tokio::test]
    async fn a_tampered_chain_never_matches_a_cached_one() {
        let f = fixture(16);
        let now = unix_now();
        let chain = leaf(&f.authority, "/a", now - 30, now + 60);
        f.auth.authenticate(&chain, now, false).unwrap();
        let mut der = chain[0].to_vec();
        let last = der.len() - 1;
        der[last] ^= 1; // inside the signature
        let forged = vec![CertificateDer::from(der)];
        assert!(matches!(
            f.auth.authenticate(&forged, now, false),
            Err(AuthError::Chain(_))
        ));
        let other_td = tempfile::tempdir().unwrap();
        let foreign = Authority::load_or_create(
            other_td.path(),
            &TrustDomain::new("example.org").unwrap(),
            RolesOid::default(),
        )
        .unwrap();
        let foreign_chain = leaf(&foreign, "/a", now - 30, now + 60);
        assert!(matches!(
            f.auth.authenticate(&foreign_chain, now, false),
            Err(AuthError::Chain(_))
        ));
        assert_eq!(stats(&f), (0, 3, 1));
    }

    #[tokio::test]
    async fn a_bound_certificate_authenticates_its_connection_through_the_connection_cache() {
        let f = fixture(16);
        let now = unix_now();
        let conn = Arc::new(ConnAuth::new());
        let mut req = Request::new(());
        req.extensions_mut().insert(conn.clone());
        // Not bound and no handshake certificate (no TLS connect info here): nobody.
        assert!(matches!(
            f.auth.peer(&req, false),
            Err(AuthError::NoCertificate)
        ));
        let chain = leaf(&f.authority, "/a", now - 30, now + 60);
        let svid = parse_svid(&chain[0], &RolesOid::default()).unwrap();
        let other = leaf(&f.authority, "/b", now - 30, now + 60);
        let other_svid = parse_svid(&other[0], &RolesOid::default()).unwrap();
        // A renewal never changes the identity; a binding that would is refused.
        assert!(
            !f.auth
                .bind_to_connection(&req, &other_svid, &chain, &svid, f.authority.root())
        );
        assert!(
            f.auth
                .bind_to_connection(&req, &svid, &chain, &svid, f.authority.root())
        );
        assert_eq!(f.auth.peer(&req, false).unwrap(), svid);
        assert_eq!(
            stats(&f),
            (0, 0, 0),
            "answered by the connection's own cache"
        );
        // A verification of the previous chain that finishes after the binding is not
        // remembered as the bound one's.
        let ConnLookup::Miss { epoch, .. } = conn.cached(now, u64::MAX) else {
            panic!("no entry for another generation");
        };
        assert!(f.auth.bind_to_connection(
            &req,
            &other_svid,
            &other,
            &other_svid,
            f.authority.root()
        ));
        conn.remember(
            epoch,
            ConnVerified {
                svid: svid.clone(),
                from: now - 30,
                until: now + 60,
                generation: 0,
            },
        );
        assert_eq!(f.auth.peer(&req, false).unwrap(), other_svid);
        // A new bundle (a CA rotation): the bound chain is verified again against it.
        f.auth
            .set_bundle(Bundle::new(vec![f.authority.root().clone()]).unwrap());
        assert_eq!(f.auth.peer(&req, false).unwrap(), other_svid);
        assert_eq!(stats(&f), (0, 1, 1));
        // Revocation of the bound serial is checked on every call.
        let r = RevocationRecord {
            v: RECORD_VERSION,
            rev: 0,
            serial: other_svid.serial.to_hex(),
            spiffe_id: other_svid.spiffe_id.to_string(),
            identity_rule: false,
            before: 0,
            reason: "test".into(),
            revoked_at: now,
            expires_at: now + 3600,
            blocked: false,
            renewable: false,
            origin: String::new(),
        };
        f.log
            .record(
                Event::new(Kind::Revoked, "test"),
                vec![Write::PutRevocation(r)],
            )
            .await
            .unwrap();
        assert!(matches!(
            f.auth.peer(&req, false),
            Err(AuthError::Revoked(_))
        ));
    }
}
