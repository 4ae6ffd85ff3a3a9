//! Where the managed CAs and the rotation state live: files under `<data_dir>/ca` on one node
//! (the layout of every earlier version), or the store's replica-shared key/value space when
//! several replicas serve one CA — the state under compare-and-set, each CA's key sealed under
//! the key-encryption key (see [`crate::ca::Kek`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::info;

use super::{FIRST, ROTATED_PREFIX, RotationError, STATE_FILE, State};
use crate::ca::{Authority, Kek, RolesOid};
use crate::fsutil::write_atomic;
use crate::spiffe::TrustDomain;
use crate::store::{SharedChange, Store, Versioned};

/// Shared key of the rotation state.
pub(crate) const STATE_KEY: &str = "ca/state";
/// Shared keys of the CAs: `ca/authority/<name>`.
const AUTHORITY_PREFIX: &str = "ca/authority/";
/// How old an unreferenced shared CA must be before a replica deletes it: younger ones may be a
/// rotation another replica is recording right now.
const ORPHAN_AGE_SECS: i64 = 600;
/// How long a replica waits for its store's mirror to show a value another replica wrote (a
/// compare-and-set it lost names that value).
pub(crate) const MIRROR_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the CAs and rotation state are kept.
pub(crate) enum CaStorage {
    /// `<data_dir>/ca`: `rotation.json` plus one directory per CA (`.` is the first).
    Files(PathBuf),
    /// The store's shared key/value space, for replicas on a shared store.
    Shared {
        store: Arc<dyn Store>,
        kek: Arc<Kek>,
    },
}

/// A CA as stored in the shared space: the certificate in the clear, the key sealed under the
/// KEK with the stored key name as associated data.
#[derive(Serialize, Deserialize)]
struct SharedAuthority {
    v: u32,
    cert_pem: String,
    /// base64 of [`Kek::seal`]'s output.
    sealed_key: String,
}

// === impl CaStorage ===

impl CaStorage {
    /// The rotation state and its version (`None` before the first write). Files carry no
    /// version: one process owns them.
    pub(crate) async fn read_state(&self) -> Result<Option<(State, Option<u64>)>, RotationError> {
        match self {
            CaStorage::Files(dir) => {
                let path = dir.join(STATE_FILE);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some((decode_state(&path, &b)?, None))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(RotationError::Io(path, e)),
                }
            }
            CaStorage::Shared { store, .. } => {
                let got = blocking(store, |s| s.shared_get(STATE_KEY)).await?;
                got.map(|v| decode_versioned(&v)).transpose()
            }
        }
    }

    /// Writes `state` if the stored one is still at `expect` (shared; `None`: absent). Returns
    /// whether it was written; files are always written.
    pub(crate) async fn write_state(
        &self,
        state: &State,
        expect: Option<u64>,
    ) -> Result<bool, RotationError> {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| RotationError::Corrupt(PathBuf::from(STATE_FILE), e.to_string()))?;
        match self {
            CaStorage::Files(dir) => {
                let path = dir.join(STATE_FILE);
                write_atomic(&path, &json, 0o600).map_err(|e| RotationError::Io(path, e))?;
                Ok(true)
            }
            CaStorage::Shared { store, .. } => {
                blocking(store, move |s| s.shared_put(STATE_KEY, &json, expect)).await
            }
        }
    }

    /// Loads the CA named `name` (a directory name of the state).
    pub(crate) async fn load_ca(
        &self,
        name: &str,
        first_is_created: bool,
        td: &TrustDomain,
        oid: &RolesOid,
    ) -> Result<Authority, RotationError> {
        match self {
            CaStorage::Files(dir) => {
                let d = ca_dir(dir, name);
                Ok(if name == FIRST && first_is_created {
                    Authority::load_or_create(&d, td, oid.clone())?
                } else {
                    Authority::load(&d.join("ca.pem"), &d.join("ca.key"), td, oid.clone())?
                })
            }
            CaStorage::Shared { store, kek } => {
                let key = shared_key(name);
                // Reads come from the store's local mirror, which may trail a write another
                // replica just made (the CA that beat ours, the state naming it): wait for it.
                let deadline = std::time::Instant::now() + MIRROR_WAIT;
                let v = loop {
                    let k = key.clone();
                    if let Some(v) = blocking(store, move |s| s.shared_get(&k)).await? {
                        break v;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(RotationError::Corrupt(
                            PathBuf::from(&key),
                            "the rotation state names a CA the shared store does not hold".into(),
                        ));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                };
                open_shared(kek, &key, &v.value, td, oid)
            }
        }
    }

    /// Creates a CA named `name`. Shared: if another replica stored one under that name first
    /// (two replicas creating the first CA at once), that one is loaded instead.
    pub(crate) async fn create_ca(
        &self,
        name: &str,
        common_name: &str,
        td: &TrustDomain,
        oid: &RolesOid,
    ) -> Result<Authority, RotationError> {
        match self {
            CaStorage::Files(dir) => Ok(Authority::create(
                &ca_dir(dir, name),
                td,
                oid.clone(),
                common_name,
            )?),
            CaStorage::Shared { store, kek } => {
                let key = shared_key(name);
                let (cert_pem, key_pem) = Authority::generate_pem(td, common_name)?;
                let sealed = kek
                    .seal(&key, key_pem.as_bytes())
                    .map_err(|e| RotationError::Corrupt(PathBuf::from(&key), e.to_string()))?;
                use base64::Engine;
                let blob = serde_json::to_vec(&SharedAuthority {
                    v: 1,
                    cert_pem,
                    sealed_key: base64::engine::general_purpose::STANDARD.encode(sealed),
                })
                .map_err(|e| RotationError::Corrupt(PathBuf::from(&key), e.to_string()))?;
                let k = key.clone();
                let won = blocking(store, move |s| s.shared_put(&k, &blob, None)).await?;
                if !won {
                    info!(ca = %key, "another replica created this CA first; loading it");
                }
                self.load_ca(name, false, td, oid).await
            }
        }
    }

    /// Deletes a retired CA's key and certificate.
    pub(crate) async fn delete_ca(&self, name: &str) -> Result<(), RotationError> {
        match self {
            CaStorage::Files(dir) => {
                let d = ca_dir(dir, name);
                let removed = if name == FIRST {
                    std::fs::remove_file(d.join("ca.key"))
                        .and_then(|()| std::fs::remove_file(d.join("ca.pem")))
                } else {
                    std::fs::remove_dir_all(&d)
                };
                removed.map_err(|e| RotationError::Io(d, e))
            }
            CaStorage::Shared { store, .. } => {
                let key = shared_key(name);
                blocking(store, move |s| s.shared_delete(&key, None)).await?;
                Ok(())
            }
        }
    }

    /// A name for a new CA no stored CA has.
    pub(crate) fn fresh_name(&self, now: i64) -> Result<String, RotationError> {
        match self {
            CaStorage::Files(dir) => (0..100)
                .map(|n| {
                    if n == 0 {
                        format!("{ROTATED_PREFIX}{now}")
                    } else {
                        format!("{ROTATED_PREFIX}{now}-{n}")
                    }
                })
                .find(|n| !dir.join(n).exists())
                .ok_or_else(|| {
                    RotationError::Io(
                        dir.clone(),
                        std::io::Error::other("no free directory name for the new CA"),
                    )
                }),
            // Replicas may rotate at once: a random suffix keeps their CAs apart until the
            // state's compare-and-set picks one.
            CaStorage::Shared { .. } => Ok(format!(
                "{ROTATED_PREFIX}{now}-{:08x}",
                rand::random::<u32>()
            )),
        }
    }

    /// Deletes CAs no state refers to (a rotation interrupted between creating the new CA and
    /// recording it). Shared: only those older than ten minutes, which no replica can still be
    /// about to record.
    pub(crate) async fn remove_orphans(&self, state: &State, now: i64) {
        let used = used_names(state);
        match self {
            CaStorage::Files(dir) => {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    return;
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if name.starts_with(ROTATED_PREFIX) && !used.contains(&name) {
                        info!(dir = %e.path().display(), "removing a CA directory no rotation refers to");
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            CaStorage::Shared { store, .. } => {
                let Ok(all) = blocking(store, |s| s.shared_list(AUTHORITY_PREFIX)).await else {
                    return;
                };
                for (key, v) in all {
                    let name = key.trim_start_matches(AUTHORITY_PREFIX);
                    let created = name
                        .strip_prefix(ROTATED_PREFIX)
                        .and_then(|r| r.split('-').next())
                        .and_then(|t| t.parse::<i64>().ok());
                    if created.is_some_and(|t| now - t > ORPHAN_AGE_SECS)
                        && !used.iter().any(|u| shared_key(u) == key)
                    {
                        info!(ca = %key, "removing a shared CA no rotation refers to");
                        let _ =
                            blocking(store, move |s| s.shared_delete(&key, Some(v.version))).await;
                    }
                }
            }
        }
    }

    /// Follows shared-state changes (shared storage only).
    pub(crate) fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<SharedChange>> {
        match self {
            CaStorage::Files(_) => None,
            CaStorage::Shared { store, .. } => Some(store.shared_changes()),
        }
    }

    /// The path or key errors name for the state.
    pub(crate) fn state_origin(&self) -> PathBuf {
        match self {
            CaStorage::Files(dir) => dir.join(STATE_FILE),
            CaStorage::Shared { .. } => PathBuf::from(STATE_KEY),
        }
    }
}

/// Runs a store call off the async threads (the etcd backend blocks on its client).
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, RotationError> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || f(s.as_ref()))
        .await
        .map_err(|e| RotationError::Store(e.to_string()))?
        .map_err(|e| RotationError::Store(e.to_string()))
}

fn decode_state(origin: &Path, bytes: &[u8]) -> Result<State, RotationError> {
    serde_json::from_slice::<State>(bytes)
        .map_err(|e| RotationError::Corrupt(origin.to_path_buf(), e.to_string()))
}

fn decode_versioned(v: &Versioned) -> Result<(State, Option<u64>), RotationError> {
    Ok((
        decode_state(Path::new(STATE_KEY), &v.value)?,
        Some(v.version),
    ))
}

fn open_shared(
    kek: &Kek,
    key: &str,
    blob: &[u8],
    td: &TrustDomain,
    oid: &RolesOid,
) -> Result<Authority, RotationError> {
    use base64::Engine;
    let corrupt = |m: String| RotationError::Corrupt(PathBuf::from(key), m);
    let a: SharedAuthority = serde_json::from_slice(blob).map_err(|e| corrupt(e.to_string()))?;
    if a.v != 1 {
        return Err(corrupt(format!("unknown record version {}", a.v)));
    }
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(a.sealed_key)
        .map_err(|e| corrupt(e.to_string()))?;
    let key_pem = kek.open(key, &sealed).map_err(|e| corrupt(e.to_string()))?;
    let key_pem = String::from_utf8(key_pem).map_err(|_| corrupt("key is not PEM".into()))?;
    Ok(Authority::from_pem(
        a.cert_pem.as_bytes(),
        &key_pem,
        Path::new(key),
        td,
        oid.clone(),
    )?)
}

/// The shared key of the CA named `name` (`.`, the first CA, is `first`).
pub(crate) fn shared_key(name: &str) -> String {
    if name == FIRST {
        format!("{AUTHORITY_PREFIX}first")
    } else {
        format!("{AUTHORITY_PREFIX}{name}")
    }
}

/// The directory of the CA named `name` (`.` is `dir` itself).
fn ca_dir(dir: &Path, name: &str) -> PathBuf {
    if name == FIRST {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

fn used_names(state: &State) -> Vec<String> {
    [Some(state.active.clone())]
        .into_iter()
        .chain([
            state.staged.as_ref().map(|s| s.dir.clone()),
            state.retiring.as_ref().map(|r| r.dir.clone()),
        ])
        .flatten()
        .collect()
}
