//! Telling approvers about new access requests: a shell command and/or an HTTP webhook, fired
//! in the background so a slow receiver never delays the request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use rustls_platform_verifier::BuilderVerifierExt;
use tracing::{debug, warn};

use crate::store::AccessRecord;

/// Where to announce new access requests.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    /// Shell command; the request is in `LANYARD_ACCESS_*` variables.
    pub cmd: Option<String>,
    /// `http(s)://host:port/path` receiving a JSON POST.
    pub webhook: Option<String>,
    /// PEM roots that authenticate an https webhook (None: the system's roots). Read at each
    /// delivery, so a renewed receiver CA needs no restart.
    pub webhook_ca_file: Option<PathBuf>,
}

impl Notifier {
    /// Announces `r` (fire and forget).
    pub fn notify(&self, r: &AccessRecord) {
        if let Some(cmd) = self.cmd.clone() {
            let r = r.clone();
            tokio::spawn(async move {
                let run = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&cmd)
                    .env("LANYARD_ACCESS_ID", &r.id)
                    .env("LANYARD_ACCESS_SUBJECT", &r.spiffe_id)
                    .env("LANYARD_ACCESS_ROLES", r.roles.join(","))
                    .env("LANYARD_ACCESS_DURATION", r.duration_secs.to_string())
                    .env("LANYARD_ACCESS_REASON", &r.reason)
                    .env("LANYARD_ACCESS_REQUESTER", &r.requester)
                    .kill_on_drop(true)
                    .status();
                match tokio::time::timeout(Duration::from_secs(30), run).await {
                    Ok(Ok(s)) if s.success() => debug!(id = %r.id, "access notify command ran"),
                    Ok(Ok(s)) => warn!(id = %r.id, status = %s, "access notify command failed"),
                    Ok(Err(e)) => {
                        warn!(id = %r.id, error = %e, "access notify command could not start")
                    }
                    Err(_) => warn!(id = %r.id, "access notify command timed out"),
                }
            });
        }
        if let Some(url) = self.webhook.clone() {
            let body = serde_json::json!({
                "event": "access_requested",
                "id": r.id,
                "spiffe_id": r.spiffe_id,
                "roles": r.roles,
                "duration_seconds": r.duration_secs,
                "reason": r.reason,
                "requester": r.requester,
                "approvals_needed": r.approvals_needed,
                "expires_at": r.expires_at,
            })
            .to_string();
            let id = r.id.clone();
            let roots = self.webhook_ca_file.clone();
            tokio::spawn(async move {
                let sent = post(&url, roots.as_deref(), body);
                match tokio::time::timeout(Duration::from_secs(10), sent).await {
                    Ok(Ok(status)) if (200..300).contains(&status) => {
                        debug!(%id, status, "access webhook delivered")
                    }
                    Ok(Ok(status)) => warn!(%id, status, "access webhook answered with an error"),
                    Ok(Err(e)) => warn!(%id, url, error = %e, "access webhook failed"),
                    Err(_) => warn!(%id, url, "access webhook timed out"),
                }
            });
        }
    }
}

/// POSTs the JSON `body` to `url` (http or https, through `HTTPS_PROXY`/`HTTP_PROXY` when
/// the environment names one); returns the status code.
async fn post(url: &str, roots: Option<&Path>, body: String) -> Result<u16, String> {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(roots)?)
        .user_agent("lanyard")
        .build()
        .map_err(|e| crate::client::error_chain(&e))?;
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| crate::client::error_chain(&e))?;
    Ok(resp.status().as_u16())
}

/// TLS for an https webhook: the roots in `roots`, or the platform's trust store.
fn tls_config(roots: Option<&Path>) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let Some(path) = roots else {
        return builder
            .with_platform_verifier()
            .map(|b| b.with_no_client_auth())
            .map_err(|e| format!("system trust store: {e}"));
    };
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("access_webhook_ca_file {shown}: {e}"))?;
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("access_webhook_ca_file {shown}: {e}"))?;
        store
            .add(cert)
            .map_err(|e| format!("access_webhook_ca_file {shown}: {e}"))?;
    }
    if store.is_empty() {
        return Err(format!("access_webhook_ca_file {shown}: no certificates"));
    }
    Ok(builder.with_root_certificates(store).with_no_client_auth())
}
