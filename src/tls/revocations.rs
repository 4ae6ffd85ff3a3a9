//! [`RevocationSet`]: revocations known to a workload, fed live from the CA's `Revocation.Watch`
//! stream by [`RevocationSet::follow`]; the mTLS verifiers consult it on every handshake.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{TlsSource, unix_now};
use crate::ca::SvidInfo;
use crate::pb::v1::{RevocationEntry, WatchRequest, revocation_client::RevocationClient};

/// Revoked serials and identity rules, with their expiry so the set stays small.
#[derive(Debug, Default)]
pub struct RevocationSet {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// serial (hex) → expires_at.
    serials: HashMap<String, (i64, String)>,
    /// spiffe_id → (before, expires_at, reason).
    identities: HashMap<String, (i64, i64, String)>,
    rev: u64,
}

impl RevocationSet {
    /// An empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds one entry from the CA.
    pub fn apply(&self, e: &RevocationEntry) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if e.identity_rule {
            g.identities.insert(
                e.spiffe_id.clone(),
                (e.before, e.expires_at, e.reason.clone()),
            );
        } else {
            g.serials
                .insert(e.serial.clone(), (e.expires_at, e.reason.clone()));
        }
        g.rev = g.rev.max(e.rev);
        let now = unix_now();
        if g.serials.len() % 1024 == 0 {
            g.serials.retain(|_, (exp, _)| *exp >= now);
            g.identities.retain(|_, (_, exp, _)| *exp >= now);
        }
    }

    /// Records that the CA reported `svid` itself as revoked (`reason` is its message).
    fn mark_revoked(&self, svid: &SvidInfo, reason: &str) {
        warn!(serial = %svid.serial, reason, "the CA reports our own certificate as revoked");
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.serials
            .insert(svid.serial.to_hex(), (svid.not_after, reason.to_string()));
    }

    /// Why `svid` is revoked, if it is.
    pub fn check(&self, svid: &SvidInfo) -> Option<String> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        if let Some((_, reason)) = g.serials.get(&svid.serial.to_hex()) {
            return Some(format!("certificate {} is revoked: {reason}", svid.serial));
        }
        match g.identities.get(svid.spiffe_id.as_str()) {
            Some((before, _, reason)) if svid.not_before < *before => {
                Some(format!("identity {} is revoked: {reason}", svid.spiffe_id))
            }
            _ => None,
        }
    }

    /// The highest revision seen (resume point for the watch).
    pub fn rev(&self) -> u64 {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).rev
    }

    /// Follows the CA's revocation stream at `server`, authenticating with `source`'s
    /// credential, reconnecting with backoff and resuming where it stopped. Runs until the
    /// returned task is aborted.
    pub fn follow(
        self: &Arc<Self>,
        server: String,
        source: Arc<TlsSource>,
    ) -> tokio::task::JoinHandle<()> {
        let set = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match set.watch_once(&server, &source).await {
                    Ok(()) => backoff = Duration::from_millis(200),
                    Err(e) => {
                        debug!(error = %e, "revocation watch interrupted");
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
                tokio::time::sleep(backoff).await;
            }
        })
    }

    async fn watch_once(&self, server: &str, source: &Arc<TlsSource>) -> Result<(), String> {
        let trust = super::ServerTrust::Bundle((*source.bundle()).clone());
        let channel =
            crate::client::connect(server, trust, Some(source.slot()), source.oid().clone())
                .await
                .map_err(|e| e.to_string())?;
        let mut stream = match RevocationClient::new(channel)
            .watch(WatchRequest { since: self.rev() })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => {
                // The CA refuses the watch because our own certificate (or identity) is revoked,
                // which happens when the revocation came while we were not watching (a restart,
                // a reconnect). That is news the holder must act on, not a retryable error.
                if s.code() == tonic::Code::FailedPrecondition
                    && s.message().contains("revoked")
                    && let Some(own) = source.svid()
                {
                    self.mark_revoked(&own, s.message());
                }
                return Err(s.message().to_string());
            }
        };
        info!(server, since = self.rev(), "following revocations");
        loop {
            match stream.message().await {
                Ok(Some(e)) => self.apply(&e),
                Ok(None) => return Ok(()),
                Err(s) => {
                    warn!(code = ?s.code(), message = s.message(), "revocation stream ended");
                    return Err(s.message().to_string());
                }
            }
        }
    }
}
