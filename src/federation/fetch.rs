//! Fetching a bundle document from a bundle endpoint: one HTTPS GET (reqwest, HTTP/1.1), with
//! the TLS server authenticated per the endpoint's profile by our own rustls configuration.

use std::time::Duration;

use hyper::Uri;
use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::debug;

use super::bundle::MAX_BUNDLE_BYTES;
use crate::ca::RolesOid;
use crate::spiffe::SpiffeId;
use crate::tls::{Bundle, ServerTrust, ServerVerifier, provider};

/// The whole fetch (connect, handshake, request, body) must finish within this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a fetch failed. None of these touch the bundle in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No bundle is known to authenticate an https_spiffe endpoint.
    #[error(
        "no bundle for trust domain {0} to authenticate the endpoint; set initial_bundle or run `lanyard bundle import --trust-domain {0} FILE`"
    )]
    NoTrust(String),
    /// The web PKI roots file cannot be read.
    #[error("ca_file {0}: {1}")]
    CaFile(String, String),
    /// TCP connect failed or timed out.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// The TLS handshake failed (the endpoint did not authenticate).
    #[error("TLS with {0}: {1}")]
    Tls(String, String),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The endpoint answered with a status other than 200.
    #[error("the endpoint answered HTTP {0}")]
    Status(u16),
    /// The body exceeds the size limit.
    #[error("the response is larger than {MAX_BUNDLE_BYTES} bytes")]
    TooLarge,
    /// Everything took longer than [`FETCH_TIMEOUT`].
    #[error("timed out after {}s", FETCH_TIMEOUT.as_secs())]
    Timeout,
}

/// How the endpoint's TLS certificate is checked.
#[derive(Debug, Clone)]
pub enum EndpointTrust {
    /// https_spiffe: an SVID with exactly this ID, chaining to `bundle`.
    Spiffe {
        /// The ID the endpoint must present.
        id: SpiffeId,
        /// The current bundle of the ID's trust domain.
        bundle: Bundle,
        /// Roles OID, to parse the SVID.
        oid: RolesOid,
    },
    /// https_web: a certificate for the URL's host name chaining to these roots.
    Web {
        /// PEM roots.
        roots: Vec<CertificateDer<'static>>,
    },
}

// === impl EndpointTrust ===

impl EndpointTrust {
    /// Web PKI roots read from a PEM file.
    pub fn web_from_file(path: &std::path::Path) -> Result<Self, FetchError> {
        let shown = path.display().to_string();
        let pem =
            std::fs::read(path).map_err(|e| FetchError::CaFile(shown.clone(), e.to_string()))?;
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| FetchError::CaFile(shown.clone(), e.to_string()))?;
        if roots.is_empty() {
            return Err(FetchError::CaFile(shown, "no certificates found".into()));
        }
        Ok(Self::Web { roots })
    }

    fn client_config(&self, url: &str) -> Result<ClientConfig, FetchError> {
        let tls = |e: String| FetchError::Tls(url.to_string(), e);
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(e.to_string()))?;
        let mut cfg = match self {
            Self::Spiffe { id, bundle, oid } => builder
                .dangerous()
                .with_custom_certificate_verifier(ServerVerifier::for_id(
                    ServerTrust::Bundle(bundle.clone()),
                    id.clone(),
                    oid.clone(),
                ))
                .with_no_client_auth(),
            Self::Web { roots } => {
                let mut store = rustls::RootCertStore::empty();
                for r in roots {
                    store
                        .add(r.clone())
                        .map_err(|e| tls(format!("bad root in ca_file: {e}")))?;
                }
                builder.with_root_certificates(store).with_no_client_auth()
            }
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        // A bundle fetch is one request every few minutes: nothing to resume.
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(cfg)
    }
}

/// GETs `url` and returns the body of a 200 answer (at most [`MAX_BUNDLE_BYTES`]). Goes
/// through the proxy that `HTTPS_PROXY` / `NO_PROXY` name, if any: the TLS session (and so the
/// endpoint's authentication) runs end to end through the proxy's tunnel.
pub async fn fetch(url: &Uri, trust: &EndpointTrust) -> Result<Vec<u8>, FetchError> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(url, trust))
        .await
        .map_err(|_| FetchError::Timeout)?
}

async fn fetch_inner(url: &Uri, trust: &EndpointTrust) -> Result<Vec<u8>, FetchError> {
    let shown = url.to_string();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(trust.client_config(&shown)?)
        .https_only(true)
        // An endpoint is named by its operator; it does not get to send us elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("lanyard")
        .build()
        .map_err(|e| FetchError::Http(crate::client::error_chain(&e)))?;
    let mut resp = client
        .get(shown.as_str())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| classify(&shown, &e))?;
    if resp.status() != reqwest::StatusCode::OK {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_BUNDLE_BYTES as u64)
    {
        return Err(FetchError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Http(crate::client::error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_BUNDLE_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    debug!(url = %shown, bytes = body.len(), "bundle fetched");
    Ok(body)
}

/// Names what failed: reaching the endpoint (or its proxy), or authenticating it.
fn classify(url: &str, e: &reqwest::Error) -> FetchError {
    let chain = crate::client::error_chain(e);
    let tls = std::iter::successors(std::error::Error::source(e), |s| s.source())
        .any(|s| s.is::<rustls::Error>() || s.to_string().contains("certificate"));
    if tls {
        FetchError::Tls(url.to_string(), chain)
    } else if e.is_connect() {
        FetchError::Connect(url.to_string(), chain)
    } else {
        FetchError::Http(chain)
    }
}
