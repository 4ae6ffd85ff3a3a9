//! [`CaSet`]: the CAs of one trust domain at one moment — the one that signs, plus, during a
//! rotation, the staged successor or the retiring predecessor — and [`CaHandle`], which swaps
//! the whole set atomically at runtime.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use super::Authority;
use crate::encoding::hex;

/// The CAs in force.
pub struct CaSet {
    active: Arc<Authority>,
    staged: Option<Arc<Authority>>,
    retiring: Option<Arc<Authority>>,
    /// The active CA's certificate cross-signed by the retiring CA (while there is one).
    cross: Option<CertificateDer<'static>>,
}

/// The current [`CaSet`], replaceable while the server runs. Cheap to clone.
#[derive(Clone)]
pub struct CaHandle(Arc<watch::Sender<Arc<CaSet>>>);

// === impl CaSet ===

impl CaSet {
    /// One CA, no rotation in progress.
    pub fn single(active: Arc<Authority>) -> Self {
        Self {
            active,
            staged: None,
            retiring: None,
            cross: None,
        }
    }

    /// A set with a staged successor and/or a retiring predecessor, and the active CA's
    /// certificate cross-signed by the retiring one.
    pub fn new(
        active: Arc<Authority>,
        staged: Option<Arc<Authority>>,
        retiring: Option<Arc<Authority>>,
        cross: Option<CertificateDer<'static>>,
    ) -> Self {
        Self {
            active,
            staged,
            retiring,
            cross,
        }
    }

    /// The CA that signs.
    pub fn active(&self) -> &Arc<Authority> {
        &self.active
    }

    /// The successor, published but not signing yet.
    pub fn staged(&self) -> Option<&Arc<Authority>> {
        self.staged.as_ref()
    }

    /// The predecessor, no longer signing but still trusted.
    pub fn retiring(&self) -> Option<&Arc<Authority>> {
        self.retiring.as_ref()
    }

    /// Every trust anchor to publish: the active CA's, then the staged and retiring ones.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        let mut out: Vec<CertificateDer<'static>> = Vec::with_capacity(3);
        for a in std::iter::once(&self.active)
            .chain(self.staged.as_ref())
            .chain(self.retiring.as_ref())
        {
            if !out.contains(a.root()) {
                out.push(a.root().clone());
            }
        }
        out
    }

    /// Certificates the CA's own serving chain carries after the active CA's intermediates:
    /// the cross-signed certificate, if any, then every root (a client holding only a CA
    /// fingerprint finds its CA there).
    pub fn serving_extras(&self) -> Vec<CertificateDer<'static>> {
        self.cross.iter().cloned().chain(self.roots()).collect()
    }
}

// === impl CaHandle ===

impl CaHandle {
    /// A handle over `set`.
    pub fn new(set: CaSet) -> Self {
        Self(Arc::new(watch::channel(Arc::new(set)).0))
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<CaSet> {
        self.0.borrow().clone()
    }

    /// The signing CA now.
    pub fn active(&self) -> Arc<Authority> {
        self.0.borrow().active.clone()
    }

    /// Replaces the set; followers see the change.
    pub fn replace(&self, set: CaSet) {
        self.0.send_replace(Arc::new(set));
    }

    /// Follows every replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CaSet>> {
        self.0.subscribe()
    }
}

/// For logs: `active <fingerprint>, staged <fingerprint>, retiring <fingerprint>`, naming only
/// the CAs there are.
impl std::fmt::Display for CaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "active {}", hex(&self.active.fingerprint()))?;
        if let Some(s) = &self.staged {
            write!(f, ", staged {}", hex(&s.fingerprint()))?;
        }
        if let Some(r) = &self.retiring {
            write!(f, ", retiring {}", hex(&r.fingerprint()))?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for CaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fp = |a: &Authority| hex(&a.fingerprint()[..8]);
        f.debug_struct("CaSet")
            .field("active", &fp(&self.active))
            .field("staged", &self.staged.as_deref().map(fp))
            .field("retiring", &self.retiring.as_deref().map(fp))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ca::{LeafParams, RolesOid};
    use crate::spiffe::{SpiffeId, TrustDomain};
    use crate::tls::{Bundle, unix_now, unix_time, verify_svid};

    #[test]
    fn a_cross_signed_successor_chains_to_the_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("a.example").unwrap();
        let old = Arc::new(
            Authority::load_or_create(&dir.path().join("old"), &td, RolesOid::default()).unwrap(),
        );
        let new = Arc::new(
            Authority::create(
                &dir.path().join("new"),
                &td,
                RolesOid::default(),
                "Lanyard CA a.example 2",
            )
            .unwrap(),
        );
        let cross = old.cross_sign(&new).unwrap();
        // Roots allow the one cross-signed intermediate (OpenSSL and Go check the anchor's
        // constraint); the cross-signed certificate allows none below it.
        assert_eq!(old.root_path_len(), Some(1));
        assert_eq!(new.root_path_len(), Some(1));
        let (_, parsed) = x509_parser::parse_x509_certificate(&cross).unwrap();
        let bc = parsed.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let set = CaSet::new(new.clone(), None, Some(old.clone()), Some(cross.clone()));
        assert_eq!(set.roots(), vec![new.root().clone(), old.root().clone()]);
        let now = unix_now();
        let leaf = new
            .sign_leaf(
                &rcgen::KeyPair::generate().unwrap(),
                &LeafParams {
                    names: Default::default(),
                    spiffe_id: SpiffeId::parse("spiffe://a.example/lanyard/server").unwrap(),
                    roles: vec![],
                    not_before: now - 30,
                    not_after: now + 60,
                },
            )
            .unwrap()
            .der;
        let usage = webpki::KeyUsage::server_auth();
        let only_old = Bundle::new(vec![old.root().clone()]).unwrap();
        let mut chain = vec![leaf.clone()];
        // Without the cross-signed certificate, the old CA alone does not verify the new leaf ...
        assert!(
            verify_svid(
                &chain,
                &only_old,
                unix_time(now),
                usage,
                &RolesOid::default()
            )
            .is_err()
        );
        // ... with it (as the serving chain carries it), it does.
        chain.extend(set.serving_extras());
        verify_svid(
            &chain,
            &only_old,
            unix_time(now),
            usage,
            &RolesOid::default(),
        )
        .unwrap();
        let only_new = Bundle::new(vec![new.root().clone()]).unwrap();
        verify_svid(
            &chain,
            &only_new,
            unix_time(now),
            usage,
            &RolesOid::default(),
        )
        .unwrap();
    }
}
