//! [`TlsSource`]: a workload's live credential (certificate, key, trust bundle, federated
//! bundles), updated on rotation. TLS configs built from it use the newest certificate and
//! bundles on every new handshake, with no restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{Bundle, CertSlot, TlsError};
use crate::ca::{RolesOid, SvidInfo, parse_svid};

/// Bundles of federated trust domains, keyed by trust domain name (`b.example`).
pub type FederatedBundles = BTreeMap<String, Arc<Bundle>>;

/// The live credential of one workload.
#[derive(Debug)]
pub struct TlsSource {
    slot: Arc<CertSlot>,
    bundle: RwLock<Arc<Bundle>>,
    federated: RwLock<Arc<FederatedBundles>>,
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
            federated: RwLock::new(Arc::new(FederatedBundles::new())),
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

    /// Replaces the bundles of federated trust domains. Keys are trust domain names
    /// (`b.example`; a `spiffe://` prefix is stripped). A peer of a federated domain is verified
    /// against that domain's bundle only, and accepted only when an authorization rule names
    /// the domain.
    pub fn set_federated(&self, bundles: impl IntoIterator<Item = (String, Bundle)>) {
        let map: FederatedBundles = bundles
            .into_iter()
            .map(|(td, b)| {
                let td = td.strip_prefix("spiffe://").unwrap_or(&td).to_string();
                (td, Arc::new(b))
            })
            .collect();
        *self.federated.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The bundles of federated trust domains.
    pub fn federated(&self) -> Arc<FederatedBundles> {
        self.federated
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The bundle of federated trust domain `td`, if there is one.
    pub fn federated_bundle(&self, td: &str) -> Option<Arc<Bundle>> {
        self.federated().get(td).cloned()
    }

    /// The trust domain of the current certificate.
    pub fn trust_domain(&self) -> Option<String> {
        self.svid()
            .map(|s| s.spiffe_id.trust_domain_name().to_string())
    }

    /// Loads `dir/{cert,key,bundle}.pem` and the federated bundles `dir/federated/<td>.pem` (as
    /// the agent writes them), and keeps following the files (checked every `poll`): a rotation
    /// or a bundle change is picked up without a restart. A pair that does not match (read
    /// mid-rotation) is skipped until the next check; an unreadable federated bundle is skipped
    /// with a warning.
    pub async fn from_dir(
        dir: impl Into<PathBuf>,
        oid: RolesOid,
        poll: Duration,
    ) -> Result<Arc<Self>, TlsError> {
        let dir = dir.into();
        let source = Self::empty(oid);
        let files = read_dir_files(&dir)?;
        source.load_files(&dir, &files)?;
        let weak = Arc::downgrade(&source);
        tokio::spawn(async move {
            let mut last = files;
            loop {
                tokio::time::sleep(poll).await;
                let Some(source) = weak.upgrade() else { return };
                match read_dir_files(&dir) {
                    Ok(now) if now != last => match source.load_files(&dir, &now) {
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

    fn load_files(&self, dir: &Path, f: &Files) -> Result<(), TlsError> {
        let cred = crate::client::Credential::from_pem(dir, &f.cert, &f.key, &f.bundle, &self.oid)
            .map_err(|e| TlsError::Credential(e.to_string()))?;
        let key = cred.key.clone_key();
        let mut federated = Vec::with_capacity(f.federated.len());
        for (td, pem) in &f.federated {
            match Bundle::from_pem(pem) {
                Ok(b) => federated.push((td.clone(), b)),
                Err(e) => {
                    warn!(trust_domain = %td, error = %e, "skipping unreadable federated bundle")
                }
            }
        }
        self.update(cred.chain, key, cred.bundle)?;
        self.set_federated(federated);
        Ok(())
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

    /// A gRPC channel to this domain's CA at `server`: the CA must present
    /// `spiffe://<td>/lanyard/server` under the current bundle, and the current certificate
    /// authenticates us (it is read at every handshake, so it follows rotation).
    pub async fn connect_ca(
        &self,
        server: &str,
    ) -> Result<tonic::transport::Channel, crate::client::ClientError> {
        let trust = super::ServerTrust::Bundle((*self.bundle()).clone());
        crate::client::connect(server, trust, Some(self.slot()), self.oid.clone()).await
    }
}

/// Hands every message of `stream` to `apply` until the stream ends (`Ok`) or breaks (`Err`,
/// logged as `what`).
pub(crate) async fn drain<M>(
    what: &'static str,
    stream: &mut tonic::Streaming<M>,
    mut apply: impl FnMut(M),
) -> Result<(), String> {
    loop {
        match stream.message().await {
            Ok(Some(m)) => apply(m),
            Ok(None) => return Ok(()),
            Err(s) => {
                tracing::warn!(stream = what, code = ?s.code(), message = s.message(), "CA stream ended");
                return Err(s.message().to_string());
            }
        }
    }
}

/// Runs `once` (one connection to a CA stream, until it ends) again and again, with backoff from
/// 200 ms doubling to 10 s after failures, until the task is aborted.
pub(crate) fn spawn_follow<F, Fut>(what: &'static str, mut once: F) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        let mut backoff = std::time::Duration::from_millis(200);
        loop {
            match once().await {
                Ok(()) => backoff = std::time::Duration::from_millis(200),
                Err(e) => {
                    tracing::debug!(stream = what, error = %e, "CA stream interrupted");
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                }
            }
            tokio::time::sleep(backoff).await;
        }
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
    /// trust domain → PEM, from `federated/<td>.pem`.
    federated: BTreeMap<String, Vec<u8>>,
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
        federated: read_federated(&dir.join("federated")),
    })
}

/// `<td>.pem` files of a `federated/` directory (absent: none).
fn read_federated(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(td) = name.to_str().and_then(|n| n.strip_suffix(".pem")) else {
            continue;
        };
        if td.is_empty() || td.starts_with('.') {
            continue;
        }
        if let Ok(pem) = std::fs::read(entry.path()) {
            out.insert(td.to_string(), pem);
        }
    }
    out
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
