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
use crate::tls::{
    Bundle, CertSlot, FixedClientCert, ServerTrust, ServerVerifier, SlotClientConfig, TlsError,
    provider,
};

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
    csr_request(Some(id), key, names)
}

/// A CSR for `key` with `names`, and with `id` as its URI SAN or, for attestation (the CA
/// assigns the ID from the token's claims), none.
pub fn csr_request(
    id: Option<&SpiffeId>,
    key: &KeyPair,
    names: &SanNames,
) -> Result<Vec<u8>, ClientError> {
    let bad = |e: rcgen::Error| ClientError::Keygen(e.to_string());
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = id {
        params.subject_alt_names = vec![SanType::URI(
            id.as_str().to_string().try_into().map_err(bad)?,
        )];
    }
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

/// How long one connection attempt to one CA address may take (TCP and TLS), before the next
/// address is tried.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// HTTP/2 PING interval on client connections: a CA that vanished without a FIN (host down,
/// network cut) is noticed within interval + timeout, so a client moves to the next address.
/// Mostly idle streams need nothing more frequent; the CA pings its side as well.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(45);
/// How long a PING may go unanswered before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// HTTP/2 receive windows of client connections: most CA answers are a few KB (a certificate,
/// a bundle). hyper's BDP probing (`http2_adaptive_window`, below) starts them at the HTTP/2
/// default (64 KiB) and grows them only on a connection that moves bulk data.
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// Connection-level receive window (several streams share it).
pub const CONNECTION_WINDOW: u32 = 256 * 1024;

/// A `Revocation` client that takes a CRL of any size the CA may hold
/// ([`crate::codec::MAX_CRL_RESPONSE`]; tonic's default 4 MiB refused the CRL of a CA with more
/// than ~110,000 revocations). Every `GetCrl` caller (the agent, `lanyard crl`) uses it.
pub fn crl_client(channel: Channel) -> crate::pb::v1::revocation_client::RevocationClient<Channel> {
    crate::pb::v1::revocation_client::RevocationClient::new(channel)
        .max_decoding_message_size(crate::codec::MAX_CRL_RESPONSE)
}

/// The CA addresses a client may use, in order of preference: `host:port` entries from one or
/// more comma-separated lists (`https://` prefixes allowed). A name that resolves to several
/// addresses contributes each of them.
pub fn parse_servers(servers: &str) -> Result<Vec<String>, ClientError> {
    let list: Vec<String> = servers
        .split(',')
        .map(|s| {
            s.trim()
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .collect();
    if list.is_empty() {
        return Err(ClientError::BadAddress(servers.to_string()));
    }
    for hostport in &list {
        let uri: Uri = format!("http://{hostport}")
            .parse()
            .map_err(|_| ClientError::BadAddress(hostport.clone()))?;
        if uri.host().is_none() || uri.port_u16().is_none() {
            return Err(ClientError::BadAddress(hostport.clone()));
        }
    }
    Ok(list)
}

/// How many resumable sessions a client config keeps per CA address (a CA sends one ticket per
/// connection, and a connection uses one).
const SESSIONS_PER_CONFIG: usize = 32;

/// Opens a gRPC channel with an explicit server verifier. `server` may list several CA
/// addresses (comma-separated; a name may resolve to several): each connection, the first and
/// any reconnect after the last one broke, tries them in turn starting with the one that worked
/// last, so a client moves to a live CA replica when its own goes away.
///
/// With an `identity`, every connection presents the slot's certificate of the moment and may
/// resume a TLS session (docs/design.md, decision on resumption): a session of an earlier
/// connection is offered only when that connection presented the very certificate the slot holds
/// now (a renewed certificate makes a full handshake), and trusted the server under the same
/// policy (bundle or fingerprint, expected identity). The server's chain of a resumed session is
/// checked again at the current time before the connection is used; the CA in turn judges the
/// client's chain on every call, resumed or not. Without an identity (a join-token bootstrap) no
/// session is kept.
pub async fn connect_with(
    server: &str,
    verifier: Arc<ServerVerifier>,
    identity: Option<Arc<CertSlot>>,
) -> Result<Channel, ClientError> {
    let targets = Arc::new(parse_servers(server)?);
    let uri: Uri = format!("http://{}", targets[0])
        .parse()
        .map_err(|_| ClientError::BadAddress(server.to_string()))?;
    let tls = Arc::new(match identity {
        Some(slot) => ClientTls::Resumable { slot, verifier },
        None => ClientTls::Anonymous(tokio_rustls::TlsConnector::from(anonymous_config(
            verifier,
        )?)),
    });
    let endpoint = Endpoint::from(uri)
        // Each address gets `CONNECT_TIMEOUT` inside the connector; this bounds the whole walk.
        .connect_timeout(CONNECT_TIMEOUT * (targets.len() as u32 + 1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Bulk answers (a watch from 0 over a million revocations, 101 MiB; a 36 MB CRL) are
        // held to one window per round trip: 64 KiB over a 10 ms link is ~4 MiB/s, 25 s for the
        // watch and past the agent's 5 s GetCrl deadline. BDP probing grows the windows of a
        // connection that moves data fast (hyper caps them at 16 MiB) and leaves idle ones at
        // their start; what a window lets in is buffered only if the reader falls behind.
        .http2_adaptive_window(true);
    let preferred = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (tls, targets, preferred) = (tls.clone(), targets.clone(), preferred.clone());
            async move { connect_any(&tls, &targets, &preferred).await }
        }))
        .await
        .map_err(|e| ClientError::Connect(server.to_string(), error_chain(&e)))
}

/// How a channel's connections do TLS.
enum ClientTls {
    /// No client certificate, no resumption.
    Anonymous(tokio_rustls::TlsConnector),
    /// The slot's current certificate, with the slot's resumable sessions for it.
    Resumable {
        slot: Arc<CertSlot>,
        verifier: Arc<ServerVerifier>,
    },
}

/// The TLS 1.3 config every CA connection starts from (h2 over TLS 1.3, Lanyard's provider and
/// key-exchange order).
fn base_config(
    verifier: Arc<ServerVerifier>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError>
{
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Credential(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

/// A config without a client certificate, and without resumption (it asks the CA for no
/// tickets, so the CA sends none).
fn anonymous_config(verifier: Arc<ServerVerifier>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut cfg = base_config(verifier)?.with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The config for the next connection with `slot`'s current certificate, and the verifier in it:
/// the slot's cached one when it was built for this very certificate and for a verifier with
/// `verifier`'s policy (then its sessions may be resumed), else a new one, which replaces it.
///
/// rustls itself resumes a session only under the verifier and the certificate resolver that
/// created it; a config per certificate with a resolver that presents only that certificate makes
/// the binding of sessions to certificates explicit.
fn slot_config(
    slot: &CertSlot,
    verifier: &Arc<ServerVerifier>,
) -> Result<(Arc<rustls::ClientConfig>, Arc<ServerVerifier>), TlsError> {
    let (current, generation) = slot.current_with_generation();
    let mut cached = slot.client.lock().unwrap_or_else(|p| p.into_inner());
    // The verifier outlives certificates (a new certificate needs a new config, not a new
    // verifier): it remembers the CA chains it verified (`ServerVerifier::check_remembered`).
    let verifier = match cached.as_ref() {
        Some(c) if c.verifier.same_policy(verifier) => {
            if c.generation == generation {
                return Ok((c.config.clone(), c.verifier.clone()));
            }
            c.verifier.clone()
        }
        _ => verifier.clone(),
    };
    let builder = base_config(verifier.clone())?;
    let mut cfg = match current {
        Some(ck) => builder.with_client_cert_resolver(Arc::new(FixedClientCert(ck))),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::store(Arc::new(
        rustls::client::ClientSessionMemoryCache::new(SESSIONS_PER_CONFIG),
    ))
    .tls12_resumption(rustls::client::Tls12Resumption::Disabled);
    // The CA sends tickets only to a client that asks (`tls::enable_ca_resumption`).
    cfg.send_ticket_request = Some(crate::tls::CA_TICKET_REQUEST);
    let cfg = Arc::new(cfg);
    *cached = Some(SlotClientConfig {
        generation,
        verifier: verifier.clone(),
        config: cfg.clone(),
    });
    Ok((cfg, verifier))
}

/// Connects to the first of `targets` (starting at `preferred`, wrapping around) whose every
/// step works: name resolution, TCP, the TLS handshake with the server's SPIFFE ID verified.
async fn connect_any(
    tls: &ClientTls,
    targets: &[String],
    preferred: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    use std::sync::atomic::Ordering;
    let start = preferred.load(Ordering::Relaxed);
    let mut last_error = None;
    for i in 0..targets.len() {
        let at = (start + i) % targets.len();
        let target = &targets[at];
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect_target(tls, target)).await {
            Ok(Ok(tls)) => {
                if at != start {
                    tracing::info!(server = %target, "connected to another CA address");
                }
                preferred.store(at, Ordering::Relaxed);
                return Ok(tls);
            }
            Ok(Err(e)) => {
                tracing::debug!(server = %target, error = %e, "CA address unusable; trying the next");
                last_error = Some(std::io::Error::new(e.kind(), format!("{target}: {e}")));
            }
            Err(_) => {
                tracing::debug!(server = %target, "CA address timed out; trying the next");
                last_error = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{target}: timed out"),
                ));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("no CA address")))
}

/// One `host:port`: every address the name resolves to, in turn.
async fn connect_target(
    tls: &ClientTls,
    target: &str,
) -> std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let host = target
        .rsplit_once(':')
        .map_or(target, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = ServerName::try_from(host)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut last_error = None;
    for addr in tokio::net::lookup_host(target).await? {
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake(tls, addr, &name)).await {
            Ok(Ok(tls)) => return Ok(TokioIo::new(tls)),
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {
                last_error = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{addr}: timed out"),
                ))
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the name resolves to no address",
        )
    }))
}

/// TCP and TLS to one address. A resumed session whose server chain no longer passes the
/// verifier (expired meanwhile) is dropped with the slot's sessions, and the connection is made
/// again with a full handshake, which verifies whatever the server presents now.
async fn handshake(
    tls: &ClientTls,
    addr: std::net::SocketAddr,
    name: &ServerName<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp_tls = |connector: tokio_rustls::TlsConnector| async move {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        connector.connect(name.clone(), tcp).await
    };
    let (slot, verifier) = match tls {
        ClientTls::Anonymous(connector) => return tcp_tls(connector.clone()).await,
        ClientTls::Resumable { slot, verifier } => (slot, verifier),
    };
    let io_err = |e: TlsError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    for _ in 0..2 {
        let (config, used) = slot_config(slot, verifier).map_err(io_err)?;
        let stream = tcp_tls(tokio_rustls::TlsConnector::from(config)).await?;
        let conn = stream.get_ref().1;
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let group = conn.negotiated_key_exchange_group().map(|g| g.name());
        let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
        if resumed {
            let now = rustls_pki_types::UnixTime::now();
            let chain = conn.peer_certificates().unwrap_or_default();
            if let Err(e) = used.check_resumed(chain, now) {
                tracing::info!(server = %addr, error = %e, "resumed TLS session refused; connecting again with a full handshake");
                slot.forget_sessions();
                continue;
            }
        }
        slot.note_handshake(resumed, group, suite);
        return Ok(stream);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the server's certificate was refused",
    ))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn server_lists_split_on_commas_and_every_entry_needs_a_host_and_port() {
        assert_eq!(
            parse_servers(" https://ca1.example:8443/, ca2.example:8443,,[::1]:9443").unwrap(),
            vec!["ca1.example:8443", "ca2.example:8443", "[::1]:9443"]
        );
        for bad in [
            "",
            " , ",
            "ca.example",
            "ca.example:8443,ca2",
            "ca:notaport",
        ] {
            assert!(
                matches!(parse_servers(bad), Err(ClientError::BadAddress(_))),
                "{bad:?}"
            );
        }
    }
}
