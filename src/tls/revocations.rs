//! [`RevocationSet`]: revocations known to a workload, fed live from the CA's `Revocation.Watch`
//! stream by [`RevocationSet::follow`]; the mTLS verifiers consult it on every handshake.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{TlsSource, unix_now};
use crate::ca::SvidInfo;
use crate::pb::v1::{RevocationEntry, WatchRequest, revocation_client::RevocationClient};

/// Revoked serials and identity rules, with their expiry so the set stays small.
#[derive(Debug)]
pub struct RevocationSet {
    inner: RwLock<Inner>,
    /// The revision, published on every change: followers wake on news instead of polling.
    changed: watch::Sender<u64>,
}

impl Default for RevocationSet {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            changed: watch::channel(0).0,
        }
    }
}

#[derive(Debug)]
struct SerialEntry {
    expires_at: i64,
    reason: String,
    /// Set for an entry relayed from a federated domain's CA: it covers only a certificate of
    /// this identity (serials of two CAs can collide).
    relayed_for: Option<String>,
}

#[derive(Debug)]
struct IdentityRule {
    /// Certificates with an earlier notBefore are revoked.
    before: i64,
    /// Still blocking: every certificate of the identity is revoked (its own CA issues none
    /// meanwhile, but a federated identity's CA does).
    blocked: bool,
    expires_at: i64,
    reason: String,
}

#[derive(Debug, Default)]
struct Inner {
    /// serial (hex) → entry.
    serials: HashMap<String, SerialEntry>,
    /// spiffe_id → rule.
    identities: HashMap<String, IdentityRule>,
    rev: u64,
    /// Expired entries are swept once `serials` holds this many: twice what the last sweep left
    /// (at least [`SWEEP_MIN`]), so catching up on a million entries sweeps ~20 times, not once
    /// per 1,024 inserts (which made it quadratic), and expired entries at most double the set.
    sweep_at: usize,
}

/// The smallest set size that triggers a sweep of expired entries.
const SWEEP_MIN: usize = 1024;

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
                IdentityRule {
                    before: e.before,
                    blocked: e.blocked,
                    expires_at: e.expires_at,
                    reason: e.reason.clone(),
                },
            );
        } else {
            g.serials.insert(
                e.serial.clone(),
                SerialEntry {
                    expires_at: e.expires_at,
                    reason: e.reason.clone(),
                    relayed_for: (!e.trust_domain.is_empty()).then(|| e.spiffe_id.clone()),
                },
            );
        }
        g.rev = g.rev.max(e.rev);
        let now = unix_now();
        if g.serials.len() >= g.sweep_at.max(SWEEP_MIN) {
            g.serials.retain(|_, e| e.expires_at >= now);
            g.identities.retain(|_, r| r.expires_at >= now);
            g.sweep_at = (2 * g.serials.len()).max(SWEEP_MIN);
        }
        let rev = g.rev;
        drop(g);
        self.changed.send_replace(rev);
    }

    /// A receiver marked changed whenever an entry is applied (its value is the revision).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Records that the CA reported `svid` itself as revoked (`reason` is its message).
    pub(crate) fn mark_revoked(&self, svid: &SvidInfo, reason: &str) {
        warn!(serial = %svid.serial, reason, "the CA reports our own certificate as revoked");
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.serials.insert(
            svid.serial.to_hex(),
            SerialEntry {
                expires_at: svid.not_after,
                reason: reason.to_string(),
                relayed_for: None,
            },
        );
        let rev = g.rev;
        drop(g);
        self.changed.send_replace(rev);
    }

    /// Why `svid` is revoked, if it is.
    pub fn check(&self, svid: &SvidInfo) -> Option<String> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g.serials.get(&svid.serial.to_hex())
            && e.relayed_for
                .as_ref()
                .is_none_or(|id| id == svid.spiffe_id.as_str())
        {
            return Some(format!(
                "certificate {} is revoked: {}",
                svid.serial, e.reason
            ));
        }
        match g.identities.get(svid.spiffe_id.as_str()) {
            Some(r) if r.blocked || svid.not_before < r.before => Some(format!(
                "identity {} is revoked: {}",
                svid.spiffe_id, r.reason
            )),
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
        super::source::spawn_follow("revocations", move || {
            let (set, server, source) = (set.clone(), server.clone(), source.clone());
            async move { set.watch_once(&server, &source).await }
        })
    }

    async fn watch_once(&self, server: &str, source: &Arc<TlsSource>) -> Result<(), String> {
        let channel = source.connect_ca(server).await.map_err(|e| e.to_string())?;
        let mut stream = self.open_watch(channel, source).await?;
        info!(server, since = self.rev(), "following revocations");
        super::source::drain("revocations", &mut stream, |e| self.apply(&e)).await
    }

    /// Starts `Revocation.Watch` on `channel` from the revision in hand. A refusal because
    /// `source`'s own certificate is revoked marks it revoked here before it is returned.
    pub(crate) async fn open_watch(
        &self,
        channel: tonic::transport::Channel,
        source: &TlsSource,
    ) -> Result<tonic::Streaming<RevocationEntry>, String> {
        let stream = match RevocationClient::new(channel)
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
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Serial;
    use crate::spiffe::SpiffeId;

    fn svid(not_before: i64) -> SvidInfo {
        SvidInfo {
            spiffe_id: SpiffeId::parse("spiffe://b.example/ops/eve").unwrap(),
            roles: vec![],
            serial: Serial::from_bytes(&[7]),
            not_before,
            not_after: not_before + 60,
        }
    }

    fn rule(blocked: bool, rev: u64) -> RevocationEntry {
        RevocationEntry {
            spiffe_id: "spiffe://b.example/ops/eve".into(),
            identity_rule: true,
            before: 1000,
            blocked,
            expires_at: i64::MAX,
            reason: "key leak".into(),
            rev,
            ..Default::default()
        }
    }

    #[test]
    fn a_blocking_identity_rule_covers_later_certificates_until_lifted() {
        let set = RevocationSet::new();
        set.apply(&rule(true, 1));
        assert!(set.check(&svid(900)).is_some());
        assert!(set.check(&svid(2000)).is_some(), "blocked: any notBefore");
        set.apply(&rule(false, 2));
        assert!(set.check(&svid(900)).is_some());
        assert!(set.check(&svid(2000)).is_none(), "lifted: only older ones");
        assert_eq!(set.rev(), 2);
    }

    fn serial_entry(i: u64, expires_at: i64) -> RevocationEntry {
        RevocationEntry {
            serial: format!("{i:x}"),
            expires_at,
            reason: "test".into(),
            rev: i,
            ..Default::default()
        }
    }

    /// Expired entries are swept once the set doubles since the last sweep: they never make
    /// it more than twice its live size (beyond the minimum), and live ones always stay.
    #[test]
    fn expired_entries_are_swept_as_the_set_doubles() {
        let set = RevocationSet::new();
        let live = i64::MAX;
        for i in 1..=3000 {
            // Every other entry has already expired.
            set.apply(&serial_entry(i, if i % 2 == 0 { 0 } else { live }));
            let g = set.inner.read().unwrap();
            let alive = i.div_ceil(2) as usize;
            assert!(
                g.serials.len() <= (2 * alive + 1).max(SWEEP_MIN),
                "{} entries held for {alive} live ones",
                g.serials.len()
            );
        }
        let g = set.inner.read().unwrap();
        assert!(g.serials.len() < 3000, "a sweep ran");
        for i in (1..=3000u64).step_by(2) {
            assert!(g.serials.contains_key(&format!("{i:x}")), "live {i} kept");
        }
    }
}
