//! [`TlsSource`]: a workload's live credential (certificate, key, trust bundle), updated on
//! rotation. TLS configs built from it use the newest certificate and bundle on every new
//! handshake, with no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{Bundle, CertSlot, TlsError};
use crate::ca::{RolesOid, SvidInfo, parse_svid};

/// The live credential of one workload.
#[derive(Debug)]
pub struct TlsSource {
    slot: Arc<CertSlot>,
    bundle: RwLock<Arc<Bundle>>,
    svid: RwLock<Option<SvidInfo>>,
    oid: RolesOid,
    changed: watch::Sender<u64>,
}

impl TlsSource {
    /// An empty source; handshakes fail until [`TlsSource::update`] is called.
    pub fn empty(oid: RolesOid) -> Arc<Self> {
        Arc::new(Self {
            slot: CertSlot::new(),
            bundle: RwLock::new(Arc::new(Bundle::default())),
            svid: RwLock::new(None),
            oid,
            changed: watch::channel(0).0,
        })
    }

    /// Installs a new chain (leaf first), key and bundle.
    pub fn update(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Bundle,
    ) -> Result<SvidInfo, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoCertificate)?;
        let svid = parse_svid(leaf, &self.oid).map_err(|e| TlsError::Svid(e.to_string()))?;
        self.slot.set(chain, key)?;
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(bundle);
        *self.svid.write().unwrap_or_else(|p| p.into_inner()) = Some(svid.clone());
        self.changed.send_modify(|n| *n += 1);
        Ok(svid)
    }

    /// Replaces only the trust bundle (e.g. after a CA rotation).
    pub fn set_bundle(&self, bundle: Bundle) {
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(bundle);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Loads `dir/{cert,key,bundle}.pem` and keeps following the files (checked every
    /// `poll`): a rotation by the agent is picked up without a restart. A pair that does not match
    /// (read mid-rotation) is skipped until the next check.
    pub async fn from_dir(
        dir: impl Into<PathBuf>,
        oid: RolesOid,
        poll: Duration,
    ) -> Result<Arc<Self>, TlsError> {
        let dir = dir.into();
        let source = Self::empty(oid);
        let files = read_dir_files(&dir)?;
        source.load_files(&files)?;
        let weak = Arc::downgrade(&source);
        tokio::spawn(async move {
            let mut last = files;
            loop {
                tokio::time::sleep(poll).await;
                let Some(source) = weak.upgrade() else { return };
                match read_dir_files(&dir) {
                    Ok(now) if now != last => match source.load_files(&now) {
                        Ok(()) => {
                            debug!(dir = %dir.display(), "credential reloaded from files");
                            last = now;
                        }
                        Err(e) => debug!(error = %e, "credential files not consistent yet"),
                    },
                    Ok(_) => {}
                    Err(e) => {
                        warn!(dir = %dir.display(), error = %e, "cannot read credential files")
                    }
                }
            }
        });
        Ok(source)
    }

    fn load_files(&self, f: &Files) -> Result<(), TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&f.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Credential(format!("cert.pem: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&f.key)
            .map_err(|e| TlsError::Credential(format!("key.pem: {e}")))?;
        check_key_matches(chain.first().ok_or(TlsError::NoCertificate)?, &f.key)?;
        let bundle = Bundle::from_pem(&f.bundle)?;
        self.update(chain, key, bundle).map(|_| ())
    }

    /// The certificate slot (a rustls cert resolver for both sides).
    pub fn slot(&self) -> Arc<CertSlot> {
        self.slot.clone()
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What the current certificate says.
    pub fn svid(&self) -> Option<SvidInfo> {
        self.svid.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The roles OID certificates are parsed with.
    pub fn oid(&self) -> &RolesOid {
        &self.oid
    }

    /// A receiver that changes on every update.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
}

fn read_dir_files(dir: &Path) -> Result<Files, TlsError> {
    let read = |n: &str| {
        std::fs::read(dir.join(n))
            .map_err(|e| TlsError::Credential(format!("{}: {e}", dir.join(n).display())))
    };
    Ok(Files {
        cert: read("cert.pem")?,
        key: read("key.pem")?,
        bundle: read("bundle.pem")?,
    })
}

/// Fails unless `key_pem` is the private key of `leaf`.
pub fn check_key_matches(leaf: &CertificateDer<'_>, key_pem: &[u8]) -> Result<(), TlsError> {
    use rcgen::PublicKeyData;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let pem =
        std::str::from_utf8(key_pem).map_err(|_| TlsError::Credential("key is not PEM".into()))?;
    let key =
        rcgen::KeyPair::from_pem(pem).map_err(|e| TlsError::Credential(format!("key: {e}")))?;
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| TlsError::Credential(format!("cert: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() == key.der_bytes() {
        Ok(())
    } else {
        Err(TlsError::Credential(
            "key does not match certificate".into(),
        ))
    }
}
