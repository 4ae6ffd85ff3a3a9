//! An attestor's verification keys: a static JWKS file, or OIDC discovery
//! (`<issuer>/.well-known/openid-configuration` → `jwks_uri`) over HTTPS with the attestor's
//! `ca_file` roots (the system's when absent). Refreshed every `refresh`, and at most once per
//! [`UNKNOWN_KID_INTERVAL`] when a token names a kid the set does not have, so a caller spraying
//! random kids cannot make the CA hammer the issuer. A failed refresh keeps the keys in force.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use rustls_platform_verifier::BuilderVerifierExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::jwt::{Jwk, MAX_JWKS_BYTES, parse_jwks};

/// Shortest time between two refreshes caused by unknown kids.
pub const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(30);
/// Deadline of one discovery + JWKS fetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delay after a failed scheduled refresh (capped by `refresh`).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Where keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A JWKS file, re-read at every refresh.
    File(std::path::PathBuf),
    /// OIDC discovery under the issuer URL; `roots` authenticate it (`None`: system roots).
    Discovery {
        /// The issuer URL (`https://...`).
        issuer: String,
        /// PEM roots from `ca_file`.
        roots: Option<Vec<CertificateDer<'static>>>,
    },
}

/// The live key set of one attestor.
pub struct KeySet {
    source: KeySource,
    refresh: Duration,
    keys: RwLock<Arc<Vec<Jwk>>>,
    /// Serializes fetches; holds when the last unknown-kid refetch started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
}

impl KeySet {
    /// A key set with nothing loaded yet.
    pub fn new(source: KeySource, refresh: Duration) -> Self {
        Self {
            source,
            refresh,
            keys: RwLock::new(Arc::new(Vec::new())),
            fetching: tokio::sync::Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    /// The keys in force.
    pub fn current(&self) -> Arc<Vec<Jwk>> {
        self.keys
            .read()
            .map(|k| k.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Why the last fetch failed, if it did (for refusal messages).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Fetches now (scheduled refresh or start-up).
    pub async fn refresh(&self) -> Result<(), String> {
        // Scheduled fetches do not count against the unknown-kid budget: a key published just
        // after one must still be fetchable at once.
        let _serialized = self.fetching.lock().await;
        self.fetch_and_swap().await
    }

    /// A token named `kid`, unknown to the current set: refetches unless another refetch ran
    /// within [`UNKNOWN_KID_INTERVAL`]. Returns whether the set may have changed.
    pub async fn refresh_for_unknown_kid(&self, kid: &str) -> bool {
        let mut last = self.fetching.lock().await;
        // Someone else's fetch (while we waited for the lock) may have brought it.
        if self.current().iter().any(|k| k.kid.as_deref() == Some(kid)) {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_INTERVAL) {
            debug!(kid, "unknown kid; refetch rate-limited");
            return false;
        }
        *last = Some(Instant::now());
        info!(kid, "unknown kid; refetching the issuer's keys");
        self.fetch_and_swap().await.is_ok()
    }

    async fn fetch_and_swap(&self) -> Result<(), String> {
        let fetched = match &self.source {
            KeySource::File(p) => read_file(p),
            KeySource::Discovery { issuer, roots } => {
                tokio::time::timeout(FETCH_TIMEOUT, discover(issuer, roots.as_deref()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!("timed out after {}s", FETCH_TIMEOUT.as_secs()))
                    })
            }
        };
        let result = match fetched {
            Ok(keys) => {
                debug!(keys = keys.len(), "issuer keys loaded");
                if let Ok(mut k) = self.keys.write() {
                    *k = Arc::new(keys);
                }
                None
            }
            Err(e) => {
                warn!(error = %e, "cannot fetch the issuer's keys; keeping the current ones");
                Some(e)
            }
        };
        if let Ok(mut l) = self.last_error.lock() {
            l.clone_from(&result);
        }
        result.map_or(Ok(()), Err)
    }

    /// Refreshes every `refresh` until dropped (aborted); sooner after a failure.
    pub async fn run(self: Arc<Self>) {
        loop {
            let wait = match self.refresh().await {
                Ok(()) => self.refresh,
                Err(_) => self.refresh.min(RETRY_AFTER_FAILURE),
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Reads and parses a JWKS file.
pub fn read_file(path: &Path) -> Result<Vec<Jwk>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("jwks_file {}: {e}", path.display()))?;
    parse_jwks(&raw).map_err(|e| format!("jwks_file {}: {e}", path.display()))
}

/// Reads PEM roots for discovery.
pub fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("ca_file {shown}: {e}"))?;
    let roots: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("ca_file {shown}: {e}"))?;
    if roots.is_empty() {
        return Err(format!("ca_file {shown}: no certificates"));
    }
    Ok(roots)
}

fn tls(roots: Option<&[CertificateDer<'static>]>) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut cfg = match roots {
        None => builder
            .with_platform_verifier()
            .map_err(|e| format!("system trust store: {e}"))?
            .with_no_client_auth(),
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for r in roots {
                store
                    .add(r.clone())
                    .map_err(|e| format!("bad root in ca_file: {e}"))?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Discovery, then the JWKS it names. The discovery document's `issuer` must be the configured
/// one (OpenID Connect Discovery §4.3) and `jwks_uri` must be https.
async fn discover(
    issuer: &str,
    roots: Option<&[CertificateDer<'static>]>,
) -> Result<Vec<Jwk>, String> {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls(roots)?)
        .https_only(true)
        // The issuer is named by the operator; it does not get to send us elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("lanyard")
        .build()
        .map_err(|e| crate::client::error_chain(&e))?;
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let doc: serde_json::Value = serde_json::from_slice(&get(&client, &url).await?)
        .map_err(|e| format!("{url}: not JSON: {e}"))?;
    let said = doc
        .get("issuer")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if said != issuer {
        return Err(format!(
            "{url}: the discovery document names issuer {said:?}, not {issuer:?}"
        ));
    }
    let jwks_uri = doc
        .get("jwks_uri")
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("{url}: no jwks_uri"))?;
    if !jwks_uri.starts_with("https://") {
        return Err(format!("{url}: jwks_uri {jwks_uri:?} is not https"));
    }
    parse_jwks(&get(&client, jwks_uri).await?).map_err(|e| format!("{jwks_uri}: {e}"))
}

async fn get(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut resp = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("{url}: {}", crate::client::error_chain(&e)))?;
    if resp.status() != reqwest::StatusCode::OK {
        return Err(format!("{url}: HTTP {}", resp.status().as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("{url}: {}", crate::client::error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("{url}: larger than {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
