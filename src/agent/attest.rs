//! Bootstrap by attestation (`--jwt-file`): the agent reads the JWT file afresh at every
//! bootstrap (the kubelet rotates projected service-account tokens in place), sends it with a
//! CSR that carries no URI SAN (the CA assigns the ID from the token's claims, or checks the one
//! `--spiffe-id` names), and retries only while the CA is unreachable or busy.

use std::path::Path;

use rcgen::KeyPair;

use super::run::bootstrap_issue;
use super::{AgentConfig, AgentError};
use crate::client::csr_request;
use crate::pb::v1 as pb;
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
    bootstrap_issue(cfg, &trust, "attestation", |key| {
        // Re-read on every attempt: the token may have been rotated while the CA was down.
        let jwt = read_jwt(path)?;
        Ok(pb::IssueRequest {
            csr: csr_request(id.as_ref(), key, &cfg.names)
                .map_err(|e| AgentError::Bootstrap(e.to_string()))?,
            jwt,
            ttl_seconds,
            ..Default::default()
        })
    })
    .await
}
