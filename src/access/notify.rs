//! Telling approvers about new access requests: a shell command and/or an HTTP webhook, fired
//! in the background so a slow receiver never delays the request.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use crate::store::AccessRecord;

/// Where to announce new access requests.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    /// Shell command; the request is in `LANYARD_ACCESS_*` variables.
    pub cmd: Option<String>,
    /// `http://host:port/path` receiving a JSON POST.
    pub webhook: Option<String>,
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
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), post(&url, &body)).await {
                    Ok(Ok(status)) if (200..300).contains(&status) => {
                        debug!(%id, status, "access webhook delivered")
                    }
                    Ok(Ok(status)) => warn!(%id, status, "access webhook answered with an error"),
                    Ok(Err(e)) => warn!(%id, error = %e, "access webhook failed"),
                    Err(_) => warn!(%id, "access webhook timed out"),
                }
            });
        }
    }
}

/// A minimal HTTP/1.1 POST (plain http only); returns the status code.
async fn post(url: &str, body: &str) -> std::io::Result<u16> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("only http:// webhooks are supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = tokio::net::TcpStream::connect(hostport).await?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: lanyard\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).await?;
    let head = String::from_utf8_lossy(&resp[..resp.len().min(64)]).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))
}
