//! [`BundleHub`]: every trust bundle the CA knows — its own (with `spiffe_sequence`) and each
//! federated domain's — persisted in the data directory, audited on every change, and followed
//! live by the bundle endpoint, `Ca.WatchBundles` and issuance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

use super::{FederationError, SpiffeBundle};
use crate::audit::{AuditLog, Event, Kind};
use crate::fsutil::{create_private_dir, write_atomic};
use crate::spiffe::TrustDomain;
use crate::store::Store;

/// Shared-store keys of federated bundles: `bundles/<trust domain>`.
const SHARED_PREFIX: &str = "bundles/";

/// Everything trusted at one moment.
#[derive(Debug, Clone)]
pub struct BundleSet {
    /// Increases on every change of any bundle's authorities (milliseconds-based, so it keeps
    /// increasing across restarts): agents keep the highest they have seen.
    pub revision: u64,
    /// Our own trust domain's bundle.
    pub own: SpiffeBundle,
    /// Federated domains' bundles.
    pub federated: BTreeMap<TrustDomain, SpiffeBundle>,
}

/// Where a federated bundle came from; decides what survives a configuration change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Fetched from the bundle endpoint of a `[[federation]]` entry, or its `initial_bundle`:
    /// dropped at start-up once the entry is gone from the configuration.
    Federation,
    /// Imported by an admin (`lanyard bundle import`): kept until removed
    /// (`lanyard bundle remove`) or replaced.
    Import,
}

/// Member added to persisted bundle documents to remember their [`Origin`] (bundle parsers
/// ignore members they do not know).
const ORIGIN_MEMBER: &str = "lanyard_origin";

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing new.
    Unchanged,
    /// Same authorities; the sequence or refresh hint moved (persisted, not audited).
    Metadata,
    /// The authorities changed (persisted, audited, pushed to agents).
    Authorities,
}

/// The bundles of the own and federated trust domains.
pub struct BundleHub {
    own_td: TrustDomain,
    dir: PathBuf,
    log: AuditLog,
    state: watch::Sender<Arc<BundleSet>>,
    /// Serializes read-modify-write-persist of the state.
    write: Mutex<()>,
    /// Replicas on a shared store: federated bundles are also kept there (`bundles/<td>`), so
    /// an import, removal or refresh on one replica reaches every other.
    shared: std::sync::OnceLock<Arc<dyn Store>>,
}

/// `local.json`: the own bundle's sequence and the authorities it was computed for.
#[derive(Debug, Serialize, Deserialize)]
struct LocalState {
    v: u32,
    sequence: u64,
    authorities: Vec<String>,
}

// === impl BundleSet ===

impl BundleSet {
    /// The bundle of `td` (own or federated).
    pub fn bundle_for(&self, td: &TrustDomain) -> Option<&SpiffeBundle> {
        if td == self.own.trust_domain() {
            Some(&self.own)
        } else {
            self.federated.get(td)
        }
    }

    /// Federated bundles as the Workload API keys them: `spiffe://<td>` → concatenated DER.
    pub fn federated_der(&self) -> std::collections::HashMap<String, Vec<u8>> {
        self.federated
            .iter()
            .map(|(td, b)| (td.id_string(), b.concatenated_der()))
            .collect()
    }
}

// === impl BundleHub ===

impl BundleHub {
    /// Opens the hub over `dir` (created 0700): loads the persisted own-bundle sequence (bumped,
    /// and audited, when `own_authorities` differ from what it was computed for) and the
    /// persisted federated bundles — those of `configured` domains and those an admin imported;
    /// a bundle fetched for a domain no longer configured is deleted (and audited).
    pub async fn open(
        dir: &Path,
        own_td: TrustDomain,
        own_authorities: Vec<CertificateDer<'static>>,
        refresh_hint: Duration,
        configured: &[TrustDomain],
        log: AuditLog,
    ) -> Result<Arc<Self>, FederationError> {
        create_private_dir(dir).map_err(|e| FederationError::Io(dir.to_path_buf(), e))?;
        create_private_dir(&dir.join("domains"))
            .map_err(|e| FederationError::Io(dir.join("domains"), e))?;
        let local_path = dir.join("local.json");
        let previous = match std::fs::read(&local_path) {
            Ok(b) => Some(
                serde_json::from_slice::<LocalState>(&b)
                    .map_err(|e| FederationError::Corrupt(local_path.clone(), e.to_string()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(FederationError::Io(local_path, e)),
        };
        let encoded: Vec<String> = own_authorities
            .iter()
            .map(|c| STANDARD.encode(c.as_ref()))
            .collect();
        let (sequence, changed) = match &previous {
            Some(p) if same_set(&p.authorities, &encoded) => (p.sequence, false),
            Some(p) => (p.sequence + 1, true),
            None => (1, true),
        };
        let own = SpiffeBundle::new(
            own_td.clone(),
            own_authorities,
            Some(sequence),
            Some(refresh_hint),
        )?;
        let (federated, dropped) = load_domains(&dir.join("domains"), &own_td, configured);
        let hub = Arc::new(Self {
            own_td,
            dir: dir.to_path_buf(),
            log,
            state: watch::channel(Arc::new(BundleSet {
                revision: next_revision(0),
                own,
                federated,
            }))
            .0,
            write: Mutex::new(()),
            shared: std::sync::OnceLock::new(),
        });
        for td in dropped {
            warn!(trust_domain = %td, "no longer federated: its bundle was dropped");
            hub.audit(
                Event::new(Kind::BundleUpdated, "lanyard")
                    .subject(td.id_string())
                    .reason("removed: the trust domain is no longer in [[federation]]"),
            )
            .await;
        }
        if changed {
            hub.persist_local(sequence, &encoded)?;
            if previous.is_some() {
                hub.audit(
                    Event::new(Kind::BundleUpdated, "lanyard")
                        .subject(hub.own_td.id_string())
                        .reason(format!(
                            "own bundle: {} authorities, sequence {sequence} (the CA changed since the last start)",
                            encoded.len()
                        )),
                )
                .await;
            }
        }
        Ok(hub)
    }

    /// The current bundles.
    pub fn current(&self) -> Arc<BundleSet> {
        self.state.borrow().clone()
    }

    /// Follows every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<BundleSet>> {
        self.state.subscribe()
    }

    /// The own trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.own_td
    }

    /// The own bundle as a SPIFFE bundle document (what the bundle endpoint serves).
    pub fn own_document(&self) -> Result<String, FederationError> {
        Ok(self.current().own.encode()?)
    }

    /// Replaces the own bundle's authorities (CA rotation): the sequence goes up by one and the
    /// change is persisted and audited. Returns whether anything changed.
    pub async fn set_own_authorities(
        &self,
        authorities: Vec<CertificateDer<'static>>,
        why: &str,
    ) -> Result<bool, FederationError> {
        let _guard = self.write.lock().await;
        let cur = self.current();
        let candidate = SpiffeBundle::new(
            self.own_td.clone(),
            authorities,
            cur.own.sequence(),
            cur.own.refresh_hint(),
        )?;
        if candidate.same_authorities(&cur.own) {
            return Ok(false);
        }
        let sequence = cur.own.sequence().unwrap_or(0) + 1;
        let own = candidate.with_sequence(Some(sequence));
        let encoded: Vec<String> = own
            .authorities()
            .iter()
            .map(|c| STANDARD.encode(c.as_ref()))
            .collect();
        self.persist_local(sequence, &encoded)?;
        let n = encoded.len();
        self.publish(|s| s.own = own);
        info!(sequence, authorities = n, why, "own trust bundle changed");
        self.audit(
            Event::new(Kind::BundleUpdated, "lanyard")
                .subject(self.own_td.id_string())
                .reason(format!(
                    "own bundle: {n} authorities, sequence {sequence} ({why})"
                )),
        )
        .await;
        Ok(true)
    }

    /// Installs a federated domain's bundle fetched from `source` (a URL, a file, or an admin
    /// import) on behalf of `actor`. Persisted before it is used; audited when the authorities
    /// change.
    pub async fn update_federated(
        &self,
        bundle: SpiffeBundle,
        origin: Origin,
        actor: &str,
        source: &str,
    ) -> Result<Change, FederationError> {
        let td = bundle.trust_domain().clone();
        if td == self.own_td {
            return Err(FederationError::OwnTrustDomain(td));
        }
        let _guard = self.write.lock().await;
        let cur = self.current();
        let before = cur.federated.get(&td);
        let change = match before {
            Some(b) if b.same_authorities(&bundle) => {
                if b.sequence() == bundle.sequence() && b.refresh_hint() == bundle.refresh_hint() {
                    return Ok(Change::Unchanged);
                }
                Change::Metadata
            }
            _ => Change::Authorities,
        };
        if let (Some(old), Some(new)) = (before.and_then(SpiffeBundle::sequence), bundle.sequence())
            && new < old
        {
            // Not refused: a foreign CA restored from a backup would otherwise be cut off for
            // good, and whoever can serve its endpoint can serve any sequence number anyway.
            warn!(trust_domain = %td, old, new, source, "federated bundle sequence went backwards");
        }
        let path = self.domain_path(&td);
        let doc = persisted_doc(&bundle, origin)?;
        write_atomic(&path, &doc, 0o644).map_err(|e| FederationError::Io(path.clone(), e))?;
        self.share_put(&td, Some(doc)).await;
        if change == Change::Metadata {
            self.publish_quiet(|s| {
                s.federated.insert(td.clone(), bundle.clone());
            });
            return Ok(change);
        }
        let reason = format!(
            "{} authorities, sequence {} from {source}; before: {}",
            bundle.authorities().len(),
            fmt_seq(bundle.sequence()),
            match before {
                Some(b) => format!(
                    "{} authorities, sequence {}",
                    b.authorities().len(),
                    fmt_seq(b.sequence())
                ),
                None => "none".into(),
            }
        );
        info!(trust_domain = %td, authorities = bundle.authorities().len(), sequence = bundle.sequence().unwrap_or(0), source, "federated bundle updated");
        self.publish(|s| {
            s.federated.insert(td.clone(), bundle);
        });
        self.audit(
            Event::new(Kind::BundleUpdated, actor)
                .subject(td.id_string())
                .reason(reason),
        )
        .await;
        Ok(change)
    }

    /// Stops trusting federated domain `td` (an admin's `lanyard bundle remove`); agents drop
    /// its bundle at once. Returns whether there was one. A `[[federation]]` entry for `td`
    /// fetches it again at its next refresh: remove the entry first.
    pub async fn remove_federated(
        &self,
        td: &TrustDomain,
        actor: &str,
    ) -> Result<bool, FederationError> {
        let _guard = self.write.lock().await;
        if !self.current().federated.contains_key(td) {
            return Ok(false);
        }
        let path = self.domain_path(td);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FederationError::Io(path, e)),
        }
        self.share_put(td, None).await;
        self.publish(|s| {
            s.federated.remove(td);
        });
        info!(trust_domain = %td, actor, "federated bundle removed");
        self.audit(
            Event::new(Kind::BundleUpdated, actor)
                .subject(td.id_string())
                .reason("removed by an admin; the trust domain is no longer trusted"),
        )
        .await;
        Ok(true)
    }

    /// Records that a bundle fetched for `td` from `source` was refused.
    pub async fn record_rejected(&self, td: &TrustDomain, source: &str, why: &str) {
        self.audit(
            Event::new(Kind::BundleRejected, "lanyard")
                .subject(td.id_string())
                .reason(format!(
                    "from {source}: {why}; keeping the last good bundle"
                )),
        )
        .await;
    }

    /// Keeps the federated bundles in `store` too and applies the ones other replicas change,
    /// until `shutdown`. The replica that changed a bundle audits it; the others apply it quietly
    /// (logged), so each change is on the shared chain once.
    pub fn share(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let _ = self.shared.set(store.clone());
        let me = Arc::downgrade(self);
        let mut changes = store.shared_changes();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            let list = |store: Arc<dyn Store>| async move {
                tokio::task::spawn_blocking(move || store.shared_list(SHARED_PREFIX))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default()
            };
            let mut pending: Vec<(String, Option<Vec<u8>>)> = list(store.clone())
                .await
                .into_iter()
                .map(|(k, v)| (k, Some(v.value)))
                .collect();
            loop {
                if let Some(hub) = me.upgrade() {
                    for (key, value) in pending.drain(..) {
                        hub.apply_shared(&key, value).await;
                    }
                }
                let got = tokio::select! {
                    r = changes.recv() => r,
                    () = crate::server::stopped(&mut shutdown) => return,
                };
                match got {
                    Ok(c) if c.key.starts_with(SHARED_PREFIX) => {
                        pending.push((c.key, c.value.map(|v| v.value)));
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => {
                        pending = list(store.clone())
                            .await
                            .into_iter()
                            .map(|(k, v)| (k, Some(v.value)))
                            .collect();
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        })
    }

    /// Writes (or deletes) `td`'s bundle in the shared store, if there is one. A failure is
    /// logged: the bundle is in force here, and the other replicas' own refreshers still fetch
    /// configured domains.
    async fn share_put(&self, td: &TrustDomain, doc: Option<Vec<u8>>) {
        let Some(store) = self.shared.get().cloned() else {
            return;
        };
        let key = format!("{SHARED_PREFIX}{td}");
        let k = key.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<(), crate::store::StoreError> {
            match doc {
                Some(doc) => {
                    // Last writer wins: a few tries ride out another replica writing the same key.
                    for _ in 0..5 {
                        let current = store.shared_get(&k)?;
                        if current.as_ref().is_some_and(|c| c.value == doc) {
                            return Ok(());
                        }
                        if store.shared_put(&k, &doc, current.map(|c| c.version))? {
                            return Ok(());
                        }
                    }
                    Err(crate::store::StoreError::Backend(
                        "bundle key kept changing".into(),
                    ))
                }
                None => store.shared_delete(&k, None).map(|_| ()),
            }
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(key, error = %e, "cannot share a federated bundle with the other replicas")
            }
            Err(e) => {
                warn!(key, error = %e, "cannot share a federated bundle with the other replicas")
            }
        }
    }

    /// Applies a shared bundle change made by another replica (ours come back unchanged).
    async fn apply_shared(&self, key: &str, doc: Option<Vec<u8>>) {
        let Some(td) = key
            .strip_prefix(SHARED_PREFIX)
            .and_then(|n| TrustDomain::new(n).ok())
        else {
            return;
        };
        if td == self.own_td {
            return;
        }
        let _guard = self.write.lock().await;
        let path = self.domain_path(&td);
        let Some(doc) = doc else {
            if self.current().federated.contains_key(&td) {
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    warn!(path = %path.display(), error = %e, "cannot delete a bundle another replica removed");
                }
                self.publish(|s| {
                    s.federated.remove(&td);
                });
                info!(trust_domain = %td, "federated bundle removed on another replica");
            }
            return;
        };
        let bundle = match SpiffeBundle::decode(td.clone(), &doc) {
            Ok(b) => b,
            Err(e) => {
                warn!(trust_domain = %td, error = %e, "ignoring an undecodable shared bundle");
                return;
            }
        };
        let cur = self.current();
        let before = cur.federated.get(&td);
        if before.is_some_and(|b| {
            b.same_authorities(&bundle)
                && b.sequence() == bundle.sequence()
                && b.refresh_hint() == bundle.refresh_hint()
        }) {
            return;
        }
        let metadata_only = before.is_some_and(|b| b.same_authorities(&bundle));
        if let Err(e) = write_atomic(&path, &doc, 0o644) {
            warn!(path = %path.display(), error = %e, "cannot persist a bundle another replica changed");
        }
        if metadata_only {
            self.publish_quiet(|s| {
                s.federated.insert(td.clone(), bundle);
            });
        } else {
            info!(trust_domain = %td, authorities = bundle.authorities().len(), "federated bundle changed on another replica");
            self.publish(|s| {
                s.federated.insert(td.clone(), bundle);
            });
        }
    }

    fn publish(&self, f: impl FnOnce(&mut BundleSet)) {
        self.state.send_modify(|s| {
            let mut next = (**s).clone();
            f(&mut next);
            next.revision = next_revision(s.revision);
            *s = Arc::new(next);
        });
    }

    /// Like `publish`, without a new revision (metadata only: agents need not hear of it).
    fn publish_quiet(&self, f: impl FnOnce(&mut BundleSet)) {
        self.state.send_if_modified(|s| {
            let mut next = (**s).clone();
            f(&mut next);
            *s = Arc::new(next);
            false
        });
    }

    fn persist_local(&self, sequence: u64, authorities: &[String]) -> Result<(), FederationError> {
        let path = self.dir.join("local.json");
        let state = LocalState {
            v: 1,
            sequence,
            authorities: authorities.to_vec(),
        };
        let json = serde_json::to_vec_pretty(&state)
            .map_err(|e| FederationError::Corrupt(path.clone(), e.to_string()))?;
        write_atomic(&path, &json, 0o644).map_err(|e| FederationError::Io(path, e))
    }

    fn domain_path(&self, td: &TrustDomain) -> PathBuf {
        // Trust domain names are [a-z0-9._-]: no separator can reach outside the directory.
        self.dir.join("domains").join(format!("{td}.json"))
    }

    async fn audit(&self, event: Event) {
        if let Err(e) = self.log.record(event, vec![]).await {
            warn!(error = %e, "cannot audit a bundle change");
        }
    }
}

/// The persisted form: the bundle document plus its origin.
fn persisted_doc(bundle: &SpiffeBundle, origin: Origin) -> Result<Vec<u8>, FederationError> {
    let mut v: serde_json::Value = serde_json::from_str(&bundle.encode()?)
        .map_err(|e| FederationError::Corrupt(PathBuf::new(), e.to_string()))?;
    if let (Some(obj), Origin::Import) = (v.as_object_mut(), origin) {
        obj.insert(ORIGIN_MEMBER.into(), "import".into());
    }
    serde_json::to_vec_pretty(&v)
        .map_err(|e| FederationError::Corrupt(PathBuf::new(), e.to_string()))
}

/// Loads every `<td>.json` in `dir` that is `configured` or was imported; unreadable files are
/// skipped with a warning (the refresher fetches a fresh copy). Fetched bundles of domains no
/// longer configured are deleted and returned second.
fn load_domains(
    dir: &Path,
    own: &TrustDomain,
    configured: &[TrustDomain],
) -> (BTreeMap<TrustDomain, SpiffeBundle>, Vec<TrustDomain>) {
    let mut out = BTreeMap::new();
    let mut dropped = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (out, dropped);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let Ok(td) = TrustDomain::new(name) else {
            continue;
        };
        if &td == own {
            continue;
        }
        let loaded = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                let imported = serde_json::from_slice::<serde_json::Value>(&b)
                    .ok()
                    .and_then(|v| v.get(ORIGIN_MEMBER).map(|o| o == "import"))
                    .unwrap_or(false);
                SpiffeBundle::decode(td.clone(), &b)
                    .map(|bundle| (bundle, imported))
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Ok((b, imported)) if imported || configured.contains(&td) => {
                out.insert(td, b);
            }
            Ok(_) => {
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(path = %path.display(), error = %e, "cannot delete a stale bundle");
                }
                dropped.push(td);
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring unreadable persisted bundle")
            }
        }
    }
    (out, dropped)
}

fn same_set(a: &[String], b: &[String]) -> bool {
    let mut a: Vec<&String> = a.iter().collect();
    let mut b: Vec<&String> = b.iter().collect();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

fn fmt_seq(s: Option<u64>) -> String {
    s.map_or_else(|| "-".into(), |s| s.to_string())
}

/// A revision above `prev`, based on the wall clock so it keeps increasing across restarts.
fn next_revision(prev: u64) -> u64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now_ms.max(prev + 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ca::{Authority, RolesOid};
    use crate::store::{SledStore, Store};

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn root(dir: &Path, name: &str) -> CertificateDer<'static> {
        Authority::load_or_create(&dir.join(name), &td("x.example"), RolesOid::default())
            .unwrap()
            .root()
            .clone()
    }

    async fn kinds(log: &AuditLog) -> Vec<&'static str> {
        log.store()
            .read_audit(1, 100)
            .unwrap()
            .into_iter()
            .map(|r| {
                crate::audit::Kind::ALL
                    .iter()
                    .find(|k| k.as_str() == r.kind)
                    .unwrap()
                    .as_str()
            })
            .collect()
    }

    #[tokio::test]
    async fn own_sequence_persists_and_moves_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let log = AuditLog::start(store).unwrap();
        let (a, b) = (root(dir.path(), "a"), root(dir.path(), "b"));
        let fed = dir.path().join("federation");
        let hint = Duration::from_secs(5);
        let open = |roots: Vec<CertificateDer<'static>>| {
            BundleHub::open(&fed, td("a.example"), roots, hint, &[], log.clone())
        };
        let hub = open(vec![a.clone()]).await.unwrap();
        assert_eq!(hub.current().own.sequence(), Some(1));
        drop(hub);
        let hub = open(vec![a.clone()]).await.unwrap();
        assert_eq!(
            hub.current().own.sequence(),
            Some(1),
            "same CA: same sequence"
        );
        let rev = hub.current().revision;
        assert!(
            hub.set_own_authorities(vec![a.clone(), b.clone()], "test")
                .await
                .unwrap()
        );
        assert_eq!(hub.current().own.sequence(), Some(2));
        assert!(hub.current().revision > rev);
        assert!(
            !hub.set_own_authorities(vec![b.clone(), a.clone()], "test")
                .await
                .unwrap()
        );
        drop(hub);
        let hub = open(vec![b.clone()]).await.unwrap();
        assert_eq!(hub.current().own.sequence(), Some(3), "changed while down");
        let doc = hub.own_document().unwrap();
        assert!(doc.contains("\"spiffe_sequence\": 3"), "{doc}");
        assert!(doc.contains("\"spiffe_refresh_hint\": 5"), "{doc}");
        assert_eq!(
            kinds(&log).await,
            vec!["bundle_updated", "bundle_updated"],
            "the rotation and the change across the restart"
        );
    }

    #[tokio::test]
    async fn federated_bundles_persist_and_changes_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let log = AuditLog::start(store).unwrap();
        let (a, b, c) = (
            root(dir.path(), "a"),
            root(dir.path(), "b"),
            root(dir.path(), "c"),
        );
        let fed = dir.path().join("federation");
        let hint = Duration::from_secs(5);
        let configured = [td("b.example")];
        let hub = BundleHub::open(
            &fed,
            td("a.example"),
            vec![a.clone()],
            hint,
            &configured,
            log.clone(),
        )
        .await
        .unwrap();
        let bundle = |certs: Vec<CertificateDer<'static>>, seq| {
            SpiffeBundle::new(td("b.example"), certs, Some(seq), None).unwrap()
        };
        let up = |bn| hub.update_federated(bn, Origin::Federation, "lanyard", "test");
        assert_eq!(
            up(bundle(vec![b.clone()], 1)).await.unwrap(),
            Change::Authorities
        );
        assert_eq!(
            up(bundle(vec![b.clone()], 1)).await.unwrap(),
            Change::Unchanged
        );
        assert_eq!(
            up(bundle(vec![b.clone()], 2)).await.unwrap(),
            Change::Metadata
        );
        assert_eq!(
            up(bundle(vec![b.clone(), c.clone()], 3)).await.unwrap(),
            Change::Authorities
        );
        assert!(matches!(
            hub.update_federated(
                SpiffeBundle::new(td("a.example"), vec![b.clone()], None, None).unwrap(),
                Origin::Import,
                "x",
                "y"
            )
            .await,
            Err(FederationError::OwnTrustDomain(_))
        ));
        // An imported bundle of a domain that is not configured.
        let d = SpiffeBundle::new(td("d.example"), vec![c.clone()], None, None).unwrap();
        hub.update_federated(d.clone(), Origin::Import, "admin", "import")
            .await
            .unwrap();
        let e = SpiffeBundle::new(td("e.example"), vec![c.clone()], None, None).unwrap();
        hub.update_federated(e, Origin::Federation, "lanyard", "https://e")
            .await
            .unwrap();
        assert!(
            hub.remove_federated(&td("e.example"), "admin")
                .await
                .unwrap()
        );
        assert!(
            !hub.remove_federated(&td("e.example"), "admin")
                .await
                .unwrap()
        );
        let der = hub.current().federated_der();
        assert_eq!(der.len(), 2);
        assert_eq!(
            der["spiffe://b.example"].len(),
            b.as_ref().len() + c.as_ref().len()
        );
        drop(hub);
        let hub = BundleHub::open(
            &fed,
            td("a.example"),
            vec![a.clone()],
            hint,
            &configured,
            log.clone(),
        )
        .await
        .unwrap();
        let set = hub.current();
        let got = set.federated.get(&td("b.example")).unwrap();
        assert_eq!(got.sequence(), Some(3));
        assert_eq!(got.authorities().len(), 2);
        assert_eq!(
            set.federated.get(&td("d.example")),
            Some(&d),
            "imported: kept"
        );
        assert_eq!(set.federated.len(), 2);
        // b.example leaves the configuration: its fetched bundle goes at the next start, the
        // imported one stays.
        drop(hub);
        let hub = BundleHub::open(&fed, td("a.example"), vec![a], hint, &[], log.clone())
            .await
            .unwrap();
        let set = hub.current();
        assert_eq!(
            set.federated.keys().collect::<Vec<_>>(),
            vec![&td("d.example")]
        );
        assert_eq!(
            kinds(&log).await,
            vec![
                "bundle_updated", // b: 1 authority
                "bundle_updated", // b: 2 authorities
                "bundle_updated", // d imported
                "bundle_updated", // e fetched
                "bundle_updated", // e removed
                "bundle_updated", // b no longer configured
            ]
        );
    }
}
