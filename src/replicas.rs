//! The replicas of one CA on a shared store. Each publishes, under `replicas/<id>`, where it
//! listens, the fingerprint of its policy (policy files stay per replica) and a heartbeat
//! refreshed every [`HEARTBEAT`]; `lanyard status` lists them, and a replica whose policy differs
//! from another live one's logs a warning (once per change).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::policy::PolicyHandle;
use crate::store::{Store, StoreError};
use crate::tls::unix_now;

/// How often a replica refreshes its entry.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica whose heartbeat is older than this is shown as down and left out of the policy
/// comparison.
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// An entry silent for this long is deleted by whichever replica sees it (a replica removed for
/// good, or a renamed one).
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Where the registry's entries live among the store's shared values.
pub const PREFIX: &str = "replicas/";

/// One replica's published entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// Its name (`replica_id`).
    pub id: String,
    /// Where it is reached (`advertise_address`).
    pub address: String,
    /// [`crate::policy::Policy::fingerprint`] of its policy now.
    pub policy_sha256: String,
    /// Its last heartbeat, seconds since the epoch.
    pub heartbeat: i64,
    /// When it started, seconds since the epoch.
    pub started_at: i64,
    /// Its Lanyard version.
    pub version: String,
    /// Whether it reads audit, revocation and issued records in the compact binary layout on a shared
    /// store (absent, so false, in entries of replicas from before decision 124): a shared
    /// store writes that layout only while every registered replica says so.
    #[serde(default)]
    pub binary_records: bool,
}

/// Publishes this replica's entry and watches the others' policies.
pub struct Replicas {
    store: Arc<dyn Store>,
    me: ReplicaInfo,
    policy: PolicyHandle,
}

// === impl ReplicaInfo ===

impl ReplicaInfo {
    /// Whether its heartbeat is recent at `now`.
    pub fn is_live(&self, now: i64) -> bool {
        now - self.heartbeat <= STALE_AFTER.as_secs() as i64
    }
}

// === impl Replicas ===

impl Replicas {
    /// This replica, named `id` and reached at `address`.
    pub fn new(store: Arc<dyn Store>, id: &str, address: &str, policy: PolicyHandle) -> Self {
        let now = unix_now();
        Self {
            store,
            me: ReplicaInfo {
                id: id.to_string(),
                address: address.to_string(),
                policy_sha256: policy.current().fingerprint(),
                heartbeat: now,
                started_at: now,
                version: env!("CARGO_PKG_VERSION").to_string(),
                binary_records: true,
            },
            policy,
        }
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.me.id
    }

    /// This replica's entry as it is now.
    pub fn me(&self) -> ReplicaInfo {
        let mut me = self.me.clone();
        me.heartbeat = unix_now();
        me.policy_sha256 = self.policy.current().fingerprint();
        me
    }

    /// `etcd` for a shared store, `sled` otherwise.
    pub fn store_kind(&self) -> &'static str {
        if crate::server::is_shared(self.store.as_ref()) {
            "etcd"
        } else {
            "sled"
        }
    }

    /// The store's health as status shows it (etcd: members, leader, term, alarms, size; sled:
    /// path and size), or why it could not be read.
    pub async fn store_health(&self) -> Option<crate::pb::v1::StoreHealth> {
        let store = self.store.clone();
        let health = tokio::task::spawn_blocking(move || store.health())
            .await
            .map_err(|e| e.to_string())
            .and_then(|h| h.map_err(|e| e.to_string()));
        Some(match health {
            Ok(h) => crate::pb::v1::StoreHealth {
                members: h
                    .members
                    .into_iter()
                    .map(|m| crate::pb::v1::StoreMember {
                        id: m.id,
                        name: m.name,
                        client_urls: m.client_urls,
                    })
                    .collect(),
                leader: h.leader,
                db_size: h.size_bytes.min(i64::MAX as u64) as i64,
                error: String::new(),
                raft_term: h.raft_term,
                alarms: h.alarms,
                location: h.location,
                binary_records: h.binary_records,
            },
            Err(error) => crate::pb::v1::StoreHealth {
                error,
                ..Default::default()
            },
        })
    }

    /// Every replica in the registry; on a store that is not shared, just this one.
    pub async fn all(&self) -> Result<Vec<ReplicaInfo>, StoreError> {
        if !crate::server::is_shared(self.store.as_ref()) {
            return Ok(vec![self.me()]);
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || list(store.as_ref()))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?
    }

    /// Publishes the entry now (so `status` lists this replica as soon as it serves), then
    /// every [`HEARTBEAT`] until `shutdown`, when it deletes the entry.
    pub fn spawn(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let this = this.as_ref();
            let mut warned: Option<BTreeMap<String, String>> = None;
            loop {
                let me = this.me();
                let store = this.store.clone();
                let published = me.clone();
                let beat = tokio::task::spawn_blocking(move || {
                    publish(store.as_ref(), &published)?;
                    list(store.as_ref())
                })
                .await;
                match beat {
                    Ok(Ok(all)) => warned = check_policies(&me, &all, warned),
                    Ok(Err(e)) => debug!(error = %e, "replica heartbeat failed"),
                    Err(e) => debug!(error = %e, "replica heartbeat task failed"),
                }
                tokio::select! {
                    () = tokio::time::sleep(HEARTBEAT) => {}
                    () = crate::server::stopped(&mut shutdown) => break,
                }
            }
            let store = this.store.clone();
            let key = format!("{PREFIX}{}", this.me.id);
            let _ = tokio::task::spawn_blocking(move || store.shared_delete(&key, None)).await;
            info!(replica = %this.me.id, "replica entry removed");
        })
    }
}

/// Every replica entry, in id order; entries silent for [`FORGET_AFTER`] are deleted.
pub fn list(store: &dyn Store) -> Result<Vec<ReplicaInfo>, StoreError> {
    let now = unix_now();
    let mut out = Vec::new();
    for (key, v) in store.shared_list(PREFIX)? {
        match serde_json::from_slice::<ReplicaInfo>(&v.value) {
            Ok(r) if now - r.heartbeat > FORGET_AFTER.as_secs() as i64 => {
                info!(replica = %r.id, "forgetting a replica silent for a day");
                store.shared_delete(&key, Some(v.version))?;
            }
            Ok(r) => out.push(r),
            Err(e) => warn!(%key, error = %e, "undecodable replica entry"),
        }
    }
    Ok(out)
}

fn publish(store: &dyn Store, me: &ReplicaInfo) -> Result<(), StoreError> {
    let key = format!("{PREFIX}{}", me.id);
    let value = serde_json::to_vec(me).map_err(|e| StoreError::Decode {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    // Only this replica writes its key: a failed compare means a concurrent delete (another
    // replica forgetting it) or a second process with the same id, which the next beat sorts out.
    let current = store.shared_get(&key)?.map(|v| v.version);
    if !store.shared_put(&key, &value, current)? {
        warn!(replica = %me.id, "replica entry changed under this replica: is another replica running with the same replica_id?");
    }
    Ok(())
}

/// Warns when a live replica's policy differs from this one's; returns the differing set so
/// the same difference is not logged every beat.
fn check_policies(
    me: &ReplicaInfo,
    all: &[ReplicaInfo],
    warned: Option<BTreeMap<String, String>>,
) -> Option<BTreeMap<String, String>> {
    let now = unix_now();
    let differing: BTreeMap<String, String> = all
        .iter()
        .filter(|r| r.id != me.id && r.is_live(now) && r.policy_sha256 != me.policy_sha256)
        .map(|r| (r.id.clone(), r.policy_sha256.clone()))
        .collect();
    if warned.as_ref() != Some(&differing) {
        if differing.is_empty() {
            if warned.is_some() {
                info!("every live replica has the same policy again");
            }
        } else {
            warn!(
                replica = %me.id,
                policy_sha256 = %me.policy_sha256,
                others = ?differing,
                "replicas have different policies: identities may get different roles depending on the replica they reach; deploy the same policy file to every replica"
            );
        }
    }
    Some(differing)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::FileConfig;
    use crate::policy::Policy;
    use crate::spiffe::TrustDomain;
    use crate::store::SledStore;

    fn policy(toml_text: &str) -> PolicyHandle {
        let file: FileConfig = toml::from_str(toml_text).unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        PolicyHandle::new(
            Policy::from_specs(
                &file.policy,
                &td,
                Duration::from_secs(60),
                Duration::from_secs(3600),
            )
            .unwrap(),
        )
    }

    /// The registry lists every replica; a live one whose policy differs is told apart, and
    /// formatting alone does not count as a difference.
    #[test]
    fn the_registry_tells_policies_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let a = policy("[[policy]]\nspiffe_id = \"spiffe://example.org/a/*\"\nroles = [\"x\"]\n");
        let same = policy(
            "# the same rule, laid out differently\n[[policy]]\nroles = [ \"x\" ]\nspiffe_id = \"spiffe://example.org/a/*\"\n",
        );
        let other =
            policy("[[policy]]\nspiffe_id = \"spiffe://example.org/a/*\"\nroles = [\"y\"]\n");
        let rs = [
            Replicas::new(store.clone(), "r0", "127.0.0.1:1", a),
            Replicas::new(store.clone(), "r1", "127.0.0.1:2", same),
            Replicas::new(store.clone(), "r2", "127.0.0.1:3", other),
        ];
        for r in &rs {
            publish(store.as_ref(), &r.me()).unwrap();
        }
        let all = list(store.as_ref()).unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["r0", "r1", "r2"]
        );
        // This release reads binary records on a shared store, and says so (decision 124).
        assert!(all.iter().all(|r| r.binary_records));
        assert_eq!(all[0].policy_sha256, all[1].policy_sha256);
        assert_ne!(all[0].policy_sha256, all[2].policy_sha256);
        let differing = check_policies(&rs[0].me(), &all, None).unwrap();
        assert_eq!(differing.keys().collect::<Vec<_>>(), ["r2"]);
        // A replica silent past STALE_AFTER is down and no longer compared.
        let mut stale = rs[2].me();
        stale.heartbeat -= STALE_AFTER.as_secs() as i64 + 1;
        publish(store.as_ref(), &stale).unwrap();
        let all = list(store.as_ref()).unwrap();
        assert!(!all[2].is_live(unix_now()));
        assert!(check_policies(&rs[0].me(), &all, None).unwrap().is_empty());
    }
}
