//! [`GrantSet`]: temporary roles this domain's CA granted to identities of *federated* trust
//! domains, fed live from `Access.WatchGrants` by [`GrantSet::follow`]. An [`Authorizer`] given
//! one ([`Authorizer::with_grants`]) adds a foreign peer's granted roles to the roles it judges.
//!
//! A local identity's grant travels in its certificate; a foreign identity's cannot (another CA
//! signs its certificates, and the roles its CA wrote are ignored here), so this feed is how a
//! foreign peer holds a role in this domain at all.
//!
//! [`Authorizer`]: super::Authorizer
//! [`Authorizer::with_grants`]: super::Authorizer::with_grants

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tracing::info;

use super::TlsSource;
use crate::pb::v1::{ActiveGrant, GrantSnapshot, WatchGrantsRequest, access_client::AccessClient};
use crate::spiffe::SpiffeId;

/// The live grants of foreign identities, as last reported by the CA.
#[derive(Debug, Default)]
pub struct GrantSet {
    /// spiffe_id → its grants.
    grants: RwLock<HashMap<String, Vec<ActiveGrant>>>,
    /// Snapshots installed so far (0: never heard from the CA).
    snapshots: AtomicU64,
}

impl GrantSet {
    /// An empty set: no foreign identity holds any role until the CA says so.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the whole set with `snapshot` (each snapshot is complete).
    pub fn replace(&self, snapshot: &GrantSnapshot) {
        let mut grants: HashMap<String, Vec<ActiveGrant>> = HashMap::new();
        for g in &snapshot.grants {
            grants
                .entry(g.spiffe_id.clone())
                .or_default()
                .push(g.clone());
        }
        *self.grants.write().unwrap_or_else(|p| p.into_inner()) = grants;
        self.snapshots.fetch_add(1, Ordering::Release);
    }

    /// Roles `id` holds through grants still running at `now` (seconds since the epoch). A
    /// grant stops counting at its end even if the CA is unreachable by then.
    pub fn roles_for(&self, id: &SpiffeId, now: i64) -> Vec<String> {
        let g = self.grants.read().unwrap_or_else(|p| p.into_inner());
        let mut roles: Vec<String> = g
            .get(id.as_str())
            .into_iter()
            .flatten()
            .filter(|g| g.ends_at > now)
            .flat_map(|g| g.roles.iter().cloned())
            .collect();
        roles.sort_unstable();
        roles.dedup();
        roles
    }

    /// How many snapshots the CA has sent (0 until the first arrives).
    pub fn snapshots(&self) -> u64 {
        self.snapshots.load(Ordering::Acquire)
    }

    /// Follows the CA's grant stream at `server`, authenticating with `source`'s credential,
    /// reconnecting with backoff. While disconnected the last snapshot stays in force (its
    /// grants still end on time). Runs until the returned task is aborted.
    pub fn follow(
        self: &Arc<Self>,
        server: String,
        source: Arc<TlsSource>,
    ) -> tokio::task::JoinHandle<()> {
        let set = self.clone();
        super::source::spawn_follow("grants", move || {
            let (set, server, source) = (set.clone(), server.clone(), source.clone());
            async move { set.watch_once(&server, &source).await }
        })
    }

    async fn watch_once(&self, server: &str, source: &TlsSource) -> Result<(), String> {
        let channel = source.connect_ca(server).await.map_err(|e| e.to_string())?;
        let mut stream = AccessClient::new(channel)
            .watch_grants(WatchGrantsRequest {})
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        info!(server, "following grants of federated identities");
        super::source::drain("grants", &mut stream, |snapshot| self.replace(&snapshot)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_replace_and_grants_end_on_time() {
        let set = GrantSet::new();
        let alice = SpiffeId::parse("spiffe://b.example/ops/alice").unwrap();
        assert!(set.roles_for(&alice, 100).is_empty());
        let grant = |id: &str, roles: &[&str], ends_at| ActiveGrant {
            id: id.into(),
            spiffe_id: alice.to_string(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            ends_at,
        };
        set.replace(&GrantSnapshot {
            grants: vec![
                grant("g1", &["db-admin"], 200),
                grant("g2", &["deploy", "db-admin"], 300),
            ],
            revision: 1,
        });
        assert_eq!(set.roles_for(&alice, 100), vec!["db-admin", "deploy"]);
        assert_eq!(set.roles_for(&alice, 250), vec!["db-admin", "deploy"]);
        assert_eq!(set.roles_for(&alice, 300), Vec::<String>::new());
        set.replace(&GrantSnapshot {
            grants: vec![grant("g1", &["db-admin"], 200)],
            revision: 2,
        });
        assert_eq!(set.roles_for(&alice, 100), vec!["db-admin"]);
        assert_eq!(set.snapshots(), 2);
    }
}
