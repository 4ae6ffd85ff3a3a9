//! Talking to the CA: credentials on disk, CSRs, and gRPC channels over SPIFFE-authenticated TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::ca::{RolesOid, SanNames, SvidInfo, parse_svid};
use crate::spiffe::SpiffeId;
use crate::tls::{Bundle, CertSlot, ServerTrust, ServerVerifier, TlsError, provider};

/// Errors on the client side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A credential file is missing or unreadable.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A credential file does not hold what it should.
    #[error("{0}: {1}")]
    BadCredential(PathBuf, String),
    /// The server address is malformed.
    #[error("invalid server address {0:?}: use host:port or https://host:port")]
    BadAddress(String),
    /// Building TLS failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server could not be reached.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// Key or CSR generation failed.
    #[error("key generation: {0}")]
    Keygen(String),
}

/// A credential directory: `cert.pem` (leaf + chain), `key.pem`, `bundle.pem`.
#[derive(Clone)]
pub struct Credential {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 private key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// CA certificates.
    pub bundle: Bundle,
    /// What the leaf says.
    pub svid: SvidInfo,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("spiffe_id", &self.svid.spiffe_id)
            .field("serial", &self.svid.serial)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Credential {
    /// Loads a credential directory. Its writer (the CA for the admin credential, the agent)
    /// replaces each file atomically but the three one after another, so a read in between can
    /// see a new key beside the old certificate: that is read again, briefly, before it counts
    /// as a broken credential.
    pub fn load(dir: &Path, oid: &RolesOid) -> Result<Self, ClientError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| ClientError::Io(p, e))
        };
        let mut attempts = 0;
        loop {
            let loaded = Self::from_pem(
                dir,
                &read("cert.pem")?,
                &read("key.pem")?,
                &read("bundle.pem")?,
                oid,
            );
            match loaded {
                Err(ClientError::BadCredential(..)) if attempts < 3 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Parses the contents of a credential directory's `cert.pem` (leaf first), `key.pem` and
    /// `bundle.pem` (`dir` only names them in errors), and checks that the key is the leaf's:
    /// the one parser behind every reader of credential directories (CLI, `lanyard::tls`, the
    /// agent).
    pub fn from_pem(
        dir: &Path,
        cert: &[u8],
        key: &[u8],
        bundle: &[u8],
        oid: &RolesOid,
    ) -> Result<Self, ClientError> {
        let bad = |name: &str, e: String| ClientError::BadCredential(dir.join(name), e);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("cert.pem", e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad("cert.pem", "no certificate".into()))?;
        let svid = parse_svid(leaf, oid).map_err(|e| bad("cert.pem", e.to_string()))?;
        let private =
            PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("key.pem", e.to_string()))?;
        crate::tls::check_key_matches(leaf, key).map_err(|e| bad("key.pem", e.to_string()))?;
        let bundle = Bundle::from_pem(bundle).map_err(|e| bad("bundle.pem", e.to_string()))?;
        Ok(Self {
            chain,
            key: Arc::new(private),
            bundle,
            svid,
        })
    }

    /// A cert slot holding this credential, for mTLS.
    pub fn slot(&self) -> Result<Arc<CertSlot>, TlsError> {
        let slot = CertSlot::new();
        slot.set(self.chain.clone(), self.key.clone_key())?;
        Ok(slot)
    }
}

/// Writes a credential directory: `cert.pem` (chain), `key.pem` (0600), `bundle.pem`, each
/// replaced atomically. The key is written first, so a reader that sees a new certificate also
/// finds its key (the agent relies on the same order).
pub fn write_credential(
    dir: &Path,
    chain: &[CertificateDer<'_>],
    bundle: &[CertificateDer<'_>],
    key_pem: &str,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    crate::fsutil::write_atomic(&dir.join("key.pem"), key_pem.as_bytes(), 0o600)?;
    crate::fsutil::write_atomic(
        &dir.join("cert.pem"),
        crate::ca::certs_to_pem(chain).as_bytes(),
        0o644,
    )?;
    crate::fsutil::write_atomic(
        &dir.join("bundle.pem"),
        crate::ca::certs_to_pem(bundle).as_bytes(),
        0o644,
    )
}

/// A fresh P-256 key and a CSR for `id` (one URI SAN, empty subject).
pub fn generate_csr(id: &SpiffeId) -> Result<(KeyPair, Vec<u8>), ClientError> {
    let key = KeyPair::generate().map_err(|e| ClientError::Keygen(e.to_string()))?;
    let csr = csr_for(id, &key)?;
    Ok((key, csr))
}

/// A CSR for `id` signed by `key`.
pub fn csr_for(id: &SpiffeId, key: &KeyPair) -> Result<Vec<u8>, ClientError> {
    csr_with_names(id, key, &SanNames::default())
}

/// A CSR for `id` that also asks for DNS and IP `names` (the CA issues them only where policy
/// allows every one).
pub fn csr_with_names(
    id: &SpiffeId,
    key: &KeyPair,
    names: &SanNames,
) -> Result<Vec<u8>, ClientError> {
    let bad = |e: rcgen::Error| ClientError::Keygen(e.to_string());
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        id.as_str().to_string().try_into().map_err(bad)?,
    )];
    for d in &names.dns {
        params
            .subject_alt_names
            .push(SanType::DnsName(d.as_str().try_into().map_err(bad)?));
    }
    for ip in &names.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let csr = params
        .serialize_request(key)
        .map_err(|e| ClientError::Keygen(e.to_string()))?;
    Ok(csr.der().to_vec())
}

/// Opens a gRPC channel to the CA at `server` (host:port, optionally with https://), verifying
/// that it presents `spiffe://<td>/lanyard/server` under `trust`, and presenting `identity` as
/// the client certificate when given.
pub async fn connect(
    server: &str,
    trust: ServerTrust,
    identity: Option<Arc<CertSlot>>,
    oid: RolesOid,
) -> Result<Channel, ClientError> {
    let verifier = ServerVerifier::for_path(trust, "/lanyard/server", oid);
    connect_with(server, verifier, identity).await
}

/// Opens a gRPC channel with an explicit server verifier.
pub async fn connect_with(
    server: &str,
    verifier: Arc<ServerVerifier>,
    identity: Option<Arc<CertSlot>>,
) -> Result<Channel, ClientError> {
    let hostport = server
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let uri: Uri = format!("http://{hostport}")
        .parse()
        .map_err(|_| ClientError::BadAddress(server.to_string()))?;
    let host = uri
        .host()
        .ok_or_else(|| ClientError::BadAddress(server.to_string()))?
        .to_string();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Credential(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(slot) => builder.with_client_cert_resolver(slot),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .map_err(|_| ClientError::BadAddress(server.to_string()))?;
    let endpoint = Endpoint::from(uri)
        .connect_timeout(std::time::Duration::from_secs(10))
        .tcp_nodelay(true);
    let target = hostport.clone();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let name = name.clone();
            let target = target.clone();
            async move {
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect(server.to_string(), error_chain(&e)))
}

/// Renders an error with its sources, for humans.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}
