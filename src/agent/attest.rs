//! Bootstrap by attestation (`--jwt-file`): the agent reads the JWT file afresh at every
//! bootstrap (the kubelet rotates projected service-account tokens in place), sends it with a
//! CSR that carries no URI SAN (the CA assigns the ID from the token's claims, or checks the one
//! `--spiffe-id` names), and retries only while the CA is unreachable.

use std::path::Path;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tonic::Code;
use tracing::warn;

use super::timing::Backoff;
use super::{AgentConfig, AgentError};
use crate::client::connect;
use crate::pb::v1::{self as pb, ca_client::CaClient};
use crate::spiffe::SpiffeId;
use crate::tls::{Bundle, ServerTrust};

/// Largest JWT file read, in bytes (the CA refuses tokens over 16 KiB anyway).
const MAX_JWT_FILE_BYTES: u64 = 64 * 1024;

/// Reads the JWT file: one token, surrounding whitespace ignored.
pub(super) fn read_jwt(path: &Path) -> Result<String, AgentError> {
    let shown = path.display();
    let meta = std::fs::metadata(path)
        .map_err(|e| AgentError::Bootstrap(format!("--jwt-file {shown}: {e}")))?;
    if meta.len() > MAX_JWT_FILE_BYTES {
        return Err(AgentError::Bootstrap(format!(
            "--jwt-file {shown}: {} bytes is not a JWT",
            meta.len()
        )));
    }
    let raw = std::fs::read_to_string(path)
        .map_err(|e| AgentError::Bootstrap(format!("--jwt-file {shown}: {e}")))?;
    let jwt = raw.trim().to_string();
    if jwt.is_empty() {
        return Err(AgentError::Bootstrap(format!(
            "--jwt-file {shown} is empty"
        )));
    }
    Ok(jwt)
}

/// A CSR with no SAN (the CA sets the ID), or with `id`.
fn csr(id: Option<&SpiffeId>, key: &KeyPair) -> Result<Vec<u8>, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = id {
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| e.to_string())?,
        )];
    }
    Ok(params
        .serialize_request(key)
        .map_err(|e| e.to_string())?
        .der()
        .to_vec())
}

/// Obtains a certificate with the JWT in `path`; returns the CA's answer and the key it certifies.
pub(super) async fn issue_with_jwt(
    cfg: &AgentConfig,
    path: &Path,
    ttl_seconds: u32,
) -> Result<(pb::IssueResponse, KeyPair), AgentError> {
    let bundle_path = cfg.bundle.as_ref().ok_or_else(|| {
        AgentError::Bootstrap("--jwt-file needs --bundle: the CA's bundle to verify it by".into())
    })?;
    let pem = std::fs::read(bundle_path)
        .map_err(|e| AgentError::Io(format!("{}: {e}", bundle_path.display())))?;
    let trust = ServerTrust::Bundle(
        Bundle::from_pem(&pem).map_err(|e| AgentError::Bootstrap(e.to_string()))?,
    );
    let id = match &cfg.spiffe_id {
        Some(s) => Some(SpiffeId::parse(s).map_err(|e| AgentError::Bootstrap(e.to_string()))?),
        None => None,
    };
    let mut backoff = Backoff::new(Duration::from_secs(1), cfg.max_backoff);
    loop {
        // Re-read on every attempt: the token may have been rotated while the CA was down.
        let jwt = read_jwt(path)?;
        let key = KeyPair::generate().map_err(|e| AgentError::Bootstrap(e.to_string()))?;
        let attempt = async {
            let csr = csr(id.as_ref(), &key).map_err(tonic::Status::internal)?;
            let channel = connect(&cfg.server, trust.clone(), None, cfg.roles_oid.clone())
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            CaClient::new(channel)
                .issue(pb::IssueRequest {
                    csr,
                    jwt,
                    ttl_seconds,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        };
        match attempt.await {
            Ok(resp) => return Ok((resp, key)),
            Err(e)
                if matches!(
                    e.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown
                ) =>
            {
                let wait = backoff.next_wait();
                warn!(
                    error = e.message(),
                    retry_in_s = wait.as_secs(),
                    "CA unreachable during attestation"
                );
                tokio::time::sleep(wait).await;
            }
            // A refused token stays refused; the kubelet's next rotation needs a restart to help.
            Err(e) => {
                return Err(AgentError::Bootstrap(format!(
                    "{:?}: {}",
                    e.code(),
                    e.message()
                )));
            }
        }
    }
}
