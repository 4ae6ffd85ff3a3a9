//! CA rotation, driven by time: `lanyard ca rotate` stages a new CA and publishes it next to the
//! active one; after `ca_rotation_overlap` signing switches to it (the old CA keeps verifying
//! and cross-signs the new one); once the old CA's last certificate has expired
//! (`max_cert_lifetime` + `renewal_grace` after the switch) it leaves the bundle and its key is
//! deleted.
//!
//! The state lives in `<data_dir>/ca/rotation.json` (which CA directory is active, staged,
//! retiring, and when each step is due), written atomically before each step takes effect, so
//! a restart resumes exactly where the rotation was. Each step is an audit event.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, watch};
use tracing::{debug, error, info, warn};

use crate::audit::{AuditLog, Event, Kind};
use crate::ca::{Authority, CaError, CaHandle, CaSet, Kek, RolesOid};
use crate::encoding::hex;
use crate::issuance::fmt_time;
use crate::spiffe::TrustDomain;
use crate::store::Store;
use crate::tls::unix_now;

mod storage;

use storage::{CaStorage, STATE_KEY};

const STATE_FILE: &str = "rotation.json";
/// The directory (relative to `<data_dir>/ca`) of the CA created on first start.
const FIRST: &str = ".";
const ROTATED_PREFIX: &str = "rotated-";
/// How often a replica re-reads the shared rotation state even without a change notice (a
/// missed notice then costs at most this long).
const SHARED_RESYNC: Duration = Duration::from_secs(5);

/// Why a rotation request or step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    /// A rotation is already under way; the message says which phase and until when.
    #[error("{0}")]
    InProgress(String),
    /// The CA comes from `ca_cert`/`ca_key`: the operator's PKI rotates it, not Lanyard.
    #[error(
        "this CA comes from ca_cert/ca_key; rotate it by installing a new certificate and key and restarting"
    )]
    Unmanaged,
    /// Creating or loading a CA failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Reading or writing the rotation state failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The rotation state (file or shared key) does not decode or names a missing CA.
    #[error("{0} is corrupt: {1}")]
    Corrupt(PathBuf, String),
    /// The shared store failed (replicas on etcd).
    #[error("shared store: {0}")]
    Store(String),
}

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No rotation in progress.
    Idle,
    /// A new CA is published; the old one still signs.
    Staged,
    /// The new CA signs; the old one is still trusted.
    Switched,
}

/// A snapshot of the CA and its rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The phase.
    pub phase: Phase,
    /// SHA-256 of the signing CA's certificate.
    pub active: [u8; 32],
    /// SHA-256 of the staged CA.
    pub staged: Option<[u8; 32]>,
    /// SHA-256 of the retiring CA.
    pub retiring: Option<[u8; 32]>,
    /// When signing switches (staged), seconds since the epoch.
    pub switch_at: Option<i64>,
    /// When the old CA leaves the bundle (switched; estimated while staged).
    pub drop_at: Option<i64>,
}

/// Timing of a rotation.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// From staging to the signing switch.
    pub overlap: Duration,
    /// From the switch until the old CA's last certificate has expired.
    pub retire_after: Duration,
}

/// Drives CA rotations for one server (or, on a shared store, for every replica: each follows
/// the shared state, and a step is taken by whichever replica wins its compare-and-set).
pub struct Rotation {
    cas: CaHandle,
    storage: CaStorage,
    trust_domain: TrustDomain,
    roles_oid: RolesOid,
    timing: Timing,
    managed: bool,
    log: AuditLog,
    state: Mutex<Held>,
    wake: Notify,
}

/// The state as this replica last read or wrote it, with its shared version.
struct Held {
    state: State,
    version: Option<u64>,
}

/// `rotation.json` (or the shared `ca/state` value).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct State {
    v: u32,
    active: String,
    #[serde(default)]
    staged: Option<Staged>,
    #[serde(default)]
    retiring: Option<Retiring>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Staged {
    dir: String,
    switch_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Retiring {
    dir: String,
    drop_at: i64,
}

// === impl Phase ===

impl Phase {
    /// `idle`, `staged` or `switched`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Staged => "staged",
            Phase::Switched => "switched",
        }
    }
}

// === impl State ===

impl State {
    fn initial() -> Self {
        Self {
            v: 1,
            active: FIRST.into(),
            staged: None,
            retiring: None,
        }
    }

    fn names(&self) -> impl Iterator<Item = &String> {
        [Some(&self.active), self.staged.as_ref().map(|s| &s.dir)]
            .into_iter()
            .chain([self.retiring.as_ref().map(|r| &r.dir)])
            .flatten()
    }
}

// === impl Rotation ===

impl Rotation {
    /// Loads the CA(s) of a generated CA under `dir` (`<data_dir>/ca`): the first CA is created
    /// there on first start; a rotation in progress is resumed from `rotation.json`.
    pub async fn load(
        dir: &Path,
        trust_domain: &TrustDomain,
        roles_oid: RolesOid,
        timing: Timing,
        log: AuditLog,
    ) -> Result<Arc<Self>, RotationError> {
        let storage = CaStorage::Files(dir.to_path_buf());
        let state = storage.read_state().await?;
        let (state, version) = state.unwrap_or((State::initial(), None));
        Self::from_state(
            storage,
            state,
            version,
            trust_domain,
            roles_oid,
            timing,
            log,
        )
        .await
    }

    /// Loads the CAs every replica of a shared store signs with: the first replica to start
    /// creates the first CA (compare-and-set on an absent key; the others load it), and a
    /// rotation in progress is resumed from the shared state. Keys are sealed under `kek`.
    pub async fn load_shared(
        store: Arc<dyn Store>,
        kek: Arc<Kek>,
        trust_domain: &TrustDomain,
        roles_oid: RolesOid,
        timing: Timing,
        log: AuditLog,
    ) -> Result<Arc<Self>, RotationError> {
        let storage = CaStorage::Shared { store, kek };
        let (state, version) = 'found: loop {
            if let Some(found) = storage.read_state().await? {
                break found;
            }
            let first = storage
                .create_ca(
                    FIRST,
                    &format!("Lanyard CA {trust_domain}"),
                    trust_domain,
                    &roles_oid,
                )
                .await?;
            if storage.write_state(&State::initial(), None).await? {
                info!(ca = %hex(&first.fingerprint()), "created the shared CA");
                continue;
            }
            // Another replica wrote the state first; this store's mirror shows it shortly.
            let deadline = std::time::Instant::now() + storage::MIRROR_WAIT;
            while std::time::Instant::now() < deadline {
                if let Some(found) = storage.read_state().await? {
                    break 'found found;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        Self::from_state(
            storage,
            state,
            version,
            trust_domain,
            roles_oid,
            timing,
            log,
        )
        .await
    }

    async fn from_state(
        storage: CaStorage,
        state: State,
        version: Option<u64>,
        trust_domain: &TrustDomain,
        roles_oid: RolesOid,
        timing: Timing,
        log: AuditLog,
    ) -> Result<Arc<Self>, RotationError> {
        let set = load_set(&storage, &state, trust_domain, &roles_oid).await?;
        storage.remove_orphans(&state, unix_now()).await;
        Ok(Arc::new(Self {
            cas: CaHandle::new(set),
            storage,
            trust_domain: trust_domain.clone(),
            roles_oid,
            timing,
            managed: true,
            log,
            state: Mutex::new(Held { state, version }),
            wake: Notify::new(),
        }))
    }

    /// An operator-supplied CA (`ca_cert`/`ca_key`): served as is, never rotated by Lanyard.
    pub fn unmanaged(authority: Authority, timing: Timing, log: AuditLog) -> Arc<Self> {
        let trust_domain = authority.trust_domain().clone();
        let roles_oid = authority.roles_oid().clone();
        Arc::new(Self {
            cas: CaHandle::new(CaSet::single(Arc::new(authority))),
            storage: CaStorage::Files(PathBuf::new()),
            trust_domain,
            roles_oid,
            timing,
            managed: false,
            log,
            state: Mutex::new(Held {
                state: State::initial(),
                version: None,
            }),
            wake: Notify::new(),
        })
    }

    /// The CAs in force, swapped by every rotation step.
    pub fn cas(&self) -> &CaHandle {
        &self.cas
    }

    /// Where the rotation stands.
    pub async fn status(&self) -> Status {
        let held = self.state.lock().await;
        self.status_of(&held.state)
    }

    fn status_of(&self, state: &State) -> Status {
        let set = self.cas.current();
        let phase = if state.staged.is_some() {
            Phase::Staged
        } else if state.retiring.is_some() {
            Phase::Switched
        } else {
            Phase::Idle
        };
        let retire = self.timing.retire_after.as_secs() as i64;
        Status {
            phase,
            active: set.active().fingerprint(),
            staged: set.staged().map(|a| a.fingerprint()),
            retiring: set.retiring().map(|a| a.fingerprint()),
            switch_at: state.staged.as_ref().map(|s| s.switch_at),
            drop_at: state
                .retiring
                .as_ref()
                .map(|r| r.drop_at)
                .or_else(|| state.staged.as_ref().map(|s| s.switch_at + retire)),
        }
    }

    /// Starts a rotation: creates a new CA, publishes it next to the active one at once, and
    /// schedules the switch after the overlap. `actor` is who asked (for the audit log).
    pub async fn rotate(&self, actor: &str) -> Result<Status, RotationError> {
        if !self.managed {
            return Err(RotationError::Unmanaged);
        }
        let mut held = self.state.lock().await;
        // Another replica may have rotated since this one last looked.
        self.resync_locked(&mut held).await?;
        if let Some(s) = &held.state.staged {
            return Err(RotationError::InProgress(format!(
                "a rotation is in progress: the new CA is staged and signing switches at {}",
                fmt_time(s.switch_at)
            )));
        }
        if let Some(r) = &held.state.retiring {
            return Err(RotationError::InProgress(format!(
                "a rotation is in progress: the previous CA is trusted until {}; rotate again after that",
                fmt_time(r.drop_at)
            )));
        }
        let now = unix_now();
        let name = self.storage.fresh_name(now)?;
        let common_name = format!("Lanyard CA {} {}", self.trust_domain, fmt_time(now));
        let new = Arc::new(
            self.storage
                .create_ca(&name, &common_name, &self.trust_domain, &self.roles_oid)
                .await?,
        );
        let switch_at = now + self.timing.overlap.as_secs().max(1) as i64;
        // A root created before roots allowed one intermediate: its cross-signature still serves
        // Lanyard's own verifier, but OpenSSL and Go refuse it, so their clients need the new
        // bundle before the switch.
        let strict_clients_note = (self.cas.active().root_path_len() == Some(0)).then(|| {
            warn!(
                old_ca = %hex(&self.cas.active().fingerprint()),
                switch_at = %fmt_time(switch_at),
                "the current CA root has pathLenConstraint 0: OpenSSL and Go clients that trust only it will refuse the new CA's certificates even with the cross-signed certificate; make sure they fetch the new bundle before the switch"
            );
            format!(
                "; the old root has pathLenConstraint 0, so OpenSSL and Go clients need the new bundle before {}",
                fmt_time(switch_at)
            )
        });
        let mut next = held.state.clone();
        next.staged = Some(Staged {
            dir: name.clone(),
            switch_at,
        });
        if !self.persist(&mut held, next).await? {
            // Another replica rotated in between: its CA is the one staged; drop ours.
            let _ = self.storage.delete_ca(&name).await;
            return Err(RotationError::InProgress(
                "another replica started a rotation at the same moment; see lanyard ca status"
                    .into(),
            ));
        }
        let active = self.cas.active();
        self.cas.replace(build_set(active, Some(new.clone()), None));
        info!(new_ca = %hex(&new.fingerprint()), switch_at = %fmt_time(switch_at), "CA rotation staged");
        self.audit(
            Event::new(Kind::CaRotationStaged, actor)
                .subject(self.trust_domain.id_string())
                .reason(format!(
                    "new CA {} ({common_name}) published next to {}; signing switches at {}{}",
                    hex(&new.fingerprint()),
                    hex(&self.cas.active().fingerprint()),
                    fmt_time(switch_at),
                    strict_clients_note.unwrap_or_default()
                )),
        )
        .await;
        self.wake.notify_one();
        Ok(self.status_of(&held.state))
    }

    /// Runs the due steps until `shutdown`; on a shared store also follows the other replicas'
    /// changes of the rotation state.
    pub fn spawn(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let mut changes = this.storage.changes();
        tokio::spawn(async move {
            loop {
                let wait = match this.step(unix_now()).await {
                    Ok(Some(at)) => Duration::from_secs((at - unix_now()).max(0) as u64),
                    Ok(None) => Duration::from_secs(3600),
                    Err(e) => {
                        error!(error = %e, "CA rotation step failed; retrying in 5s");
                        Duration::from_secs(5)
                    }
                };
                let wait = if changes.is_some() {
                    wait.min(SHARED_RESYNC)
                } else {
                    wait
                };
                let changed = async {
                    match changes.as_mut() {
                        Some(rx) => loop {
                            match rx.recv().await {
                                Ok(c) if c.key != STATE_KEY => continue,
                                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                    std::future::pending::<()>().await
                                }
                                _ => return,
                            }
                        },
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = this.wake.notified() => {}
                    () = changed => {}
                    () = crate::server::stopped(&mut shutdown) => return,
                }
            }
        })
    }

    /// Adopts the shared state if another replica changed it; performs every step due at
    /// `now`; returns when the next one is due.
    async fn step(&self, now: i64) -> Result<Option<i64>, RotationError> {
        if !self.managed {
            return Ok(None);
        }
        let mut held = self.state.lock().await;
        self.resync_locked(&mut held).await?;
        if let Some(s) = held.state.staged.clone()
            && s.switch_at <= now
        {
            self.switch(&mut held, &s, now).await?;
        }
        if let Some(r) = held.state.retiring.clone()
            && r.drop_at <= now
        {
            self.complete(&mut held, &r).await?;
        }
        Ok(held
            .state
            .staged
            .as_ref()
            .map(|s| s.switch_at)
            .or_else(|| held.state.retiring.as_ref().map(|r| r.drop_at)))
    }

    /// Shared storage: re-reads the state and, if another replica changed it, loads its CAs and
    /// swaps the set. Files: nothing (this process is the only writer).
    async fn resync_locked(&self, held: &mut Held) -> Result<(), RotationError> {
        if matches!(self.storage, CaStorage::Files(_)) {
            return Ok(());
        }
        let Some((state, version)) = self.storage.read_state().await? else {
            return Err(RotationError::Corrupt(
                self.storage.state_origin(),
                "the shared rotation state disappeared".into(),
            ));
        };
        if version == held.version {
            return Ok(());
        }
        let set = load_set(&self.storage, &state, &self.trust_domain, &self.roles_oid).await?;
        let before = fingerprints(&self.cas.current());
        if fingerprints(&set) != before {
            info!(ca_set = %set, "CA set changed by another replica");
            self.cas.replace(set);
        } else {
            debug!("shared rotation state re-read; CA set unchanged");
        }
        *held = Held { state, version };
        Ok(())
    }

    async fn switch(
        &self,
        held: &mut Held,
        staged: &Staged,
        now: i64,
    ) -> Result<(), RotationError> {
        let set = self.cas.current();
        let (Some(new), old) = (set.staged().cloned(), set.active().clone()) else {
            return Err(RotationError::Corrupt(
                self.storage.state_origin(),
                "staged CA not loaded".into(),
            ));
        };
        let drop_at = now + self.timing.retire_after.as_secs() as i64;
        let next = State {
            v: 1,
            active: staged.dir.clone(),
            staged: None,
            retiring: Some(Retiring {
                dir: held.state.active.clone(),
                drop_at,
            }),
        };
        if !self.persist(held, next).await? {
            // Another replica switched first; the state it wrote is adopted now.
            return self.resync_locked(held).await;
        }
        self.cas
            .replace(build_set(new.clone(), None, Some(old.clone())));
        info!(active = %hex(&new.fingerprint()), retiring = %hex(&old.fingerprint()), drop_at = %fmt_time(drop_at), "CA rotation: signing switched");
        self.audit(
            Event::new(Kind::CaRotationSwitched, "lanyard")
                .subject(self.trust_domain.id_string())
                .reason(format!(
                    "CA {} signs now; {} stays trusted until {}",
                    hex(&new.fingerprint()),
                    hex(&old.fingerprint()),
                    fmt_time(drop_at)
                )),
        )
        .await;
        Ok(())
    }

    async fn complete(&self, held: &mut Held, retiring: &Retiring) -> Result<(), RotationError> {
        let set = self.cas.current();
        let old = set.retiring().map(|a| hex(&a.fingerprint()));
        let mut next = held.state.clone();
        next.retiring = None;
        if !self.persist(held, next).await? {
            return self.resync_locked(held).await;
        }
        self.cas.replace(CaSet::single(set.active().clone()));
        // The old key can sign nothing anyone trusts any more: delete it.
        if let Err(e) = self.storage.delete_ca(&retiring.dir).await {
            warn!(ca = %retiring.dir, error = %e, "cannot delete the retired CA");
        }
        info!(
            retired = old.as_deref().unwrap_or("none"),
            "CA rotation complete"
        );
        self.audit(
            Event::new(Kind::CaRotationCompleted, "lanyard")
                .subject(self.trust_domain.id_string())
                .reason(format!(
                    "CA {} left the bundle (its last certificate has expired); its key was deleted",
                    old.unwrap_or_default()
                )),
        )
        .await;
        Ok(())
    }

    /// Writes `next` over the held state (compare-and-set on a shared store). `false`: another
    /// replica wrote first and nothing was written.
    async fn persist(&self, held: &mut Held, next: State) -> Result<bool, RotationError> {
        if !self.storage.write_state(&next, held.version).await? {
            return Ok(false);
        }
        held.version = match self.storage.read_state().await? {
            // Shared: learn the new version. If yet another replica wrote after us, the next
            // resync adopts its state, so keep ours only if it is what is stored.
            Some((stored, version)) if stored == next => version,
            Some(_) => None,
            None => None,
        };
        held.state = next;
        Ok(true)
    }

    async fn audit(&self, event: Event) {
        if let Err(e) = self.log.record(event, vec![]).await {
            warn!(error = %e, "cannot audit a CA rotation step");
        }
    }
}

/// Loads every CA the state names and builds the set.
async fn load_set(
    storage: &CaStorage,
    state: &State,
    td: &TrustDomain,
    oid: &RolesOid,
) -> Result<CaSet, RotationError> {
    for name in state.names() {
        if !valid_dir_name(name) {
            return Err(RotationError::Corrupt(
                storage.state_origin(),
                format!("bad CA directory {name:?}"),
            ));
        }
    }
    let first_is_created = state.active == FIRST;
    let active = Arc::new(
        storage
            .load_ca(&state.active, first_is_created, td, oid)
            .await?,
    );
    let mut others = Vec::new();
    for name in [
        state.staged.as_ref().map(|s| &s.dir),
        state.retiring.as_ref().map(|r| &r.dir),
    ] {
        others.push(match name {
            Some(n) => Some(Arc::new(storage.load_ca(n, false, td, oid).await?)),
            None => None,
        });
    }
    let retiring = others.pop().flatten();
    let staged = others.pop().flatten();
    Ok(build_set(active, staged, retiring))
}

fn fingerprints(set: &CaSet) -> [Option<[u8; 32]>; 3] {
    [
        Some(set.active().fingerprint()),
        set.staged().map(|a| a.fingerprint()),
        set.retiring().map(|a| a.fingerprint()),
    ]
}

/// A set with the active CA cross-signed by the retiring one, when there is one.
fn build_set(
    active: Arc<Authority>,
    staged: Option<Arc<Authority>>,
    retiring: Option<Arc<Authority>>,
) -> CaSet {
    let cross = retiring.as_ref().and_then(|old| match old.cross_sign(&active) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "cannot cross-sign the new CA with the old one; clients that trust only the old CA must wait for the new bundle");
            None
        }
    });
    CaSet::new(active, staged, retiring, cross)
}

fn valid_dir_name(name: &str) -> bool {
    name == FIRST
        || (name.starts_with(ROTATED_PREFIX)
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::store::{SledStore, Store};

    fn kinds(log: &AuditLog) -> Vec<String> {
        log.store()
            .read_audit(1, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.kind)
            .collect()
    }

    /// Roots written before they allowed one intermediate (pathLenConstraint 0) cannot change
    /// (clients hold them): rotating one says that OpenSSL and Go clients need the new bundle.
    #[tokio::test]
    async fn rotating_a_pathlen_zero_root_warns_about_strict_clients() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let log = AuditLog::start(store).unwrap();
        let td = TrustDomain::new("a.example").unwrap();
        let ca_dir = dir.path().join("ca");
        std::fs::create_dir(&ca_dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Lanyard CA a.example");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        std::fs::write(ca_dir.join("ca.pem"), p.self_signed(&key).unwrap().pem()).unwrap();
        std::fs::write(ca_dir.join("ca.key"), key.serialize_pem()).unwrap();
        std::fs::set_permissions(
            ca_dir.join("ca.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let timing = Timing {
            overlap: Duration::from_secs(10),
            retire_after: Duration::from_secs(100),
        };
        let r = Rotation::load(&ca_dir, &td, RolesOid::default(), timing, log.clone())
            .await
            .unwrap();
        assert_eq!(r.cas().active().root_path_len(), Some(0));
        let st = r.rotate("admin").await.unwrap();
        let reasons = |log: &AuditLog| -> Vec<String> {
            log.store()
                .read_audit(1, 100)
                .unwrap()
                .into_iter()
                .map(|r| r.reason)
                .collect()
        };
        assert!(
            reasons(&log)[0]
                .contains("pathLenConstraint 0, so OpenSSL and Go clients need the new bundle"),
            "{:?}",
            reasons(&log)
        );
        // The new root allows the one cross-signed intermediate: its own rotation says nothing.
        assert_eq!(r.cas().current().staged().unwrap().root_path_len(), Some(1));
        r.step(st.switch_at.unwrap()).await.unwrap();
        r.step(r.status().await.drop_at.unwrap()).await.unwrap();
        r.rotate("admin").await.unwrap();
        let all = reasons(&log);
        assert!(
            !all.last().unwrap().contains("pathLenConstraint"),
            "{all:?}"
        );
    }

    #[tokio::test]
    async fn rotation_steps_persist_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let log = AuditLog::start(store).unwrap();
        let td = TrustDomain::new("a.example").unwrap();
        let ca_dir = dir.path().join("ca");
        let timing = Timing {
            overlap: Duration::from_secs(10),
            retire_after: Duration::from_secs(100),
        };
        let load = || Rotation::load(&ca_dir, &td, RolesOid::default(), timing, log.clone());
        let r = load().await.unwrap();
        let first = r.cas().active().fingerprint();
        assert_eq!(r.status().await.phase, Phase::Idle);
        assert_eq!(r.cas().current().roots().len(), 1);

        let st = r.rotate("admin").await.unwrap();
        assert_eq!(st.phase, Phase::Staged);
        assert_eq!(st.active, first, "the old CA still signs");
        let staged = st.staged.unwrap();
        assert_eq!(r.cas().current().roots().len(), 2, "both published");
        assert!(matches!(
            r.rotate("admin").await,
            Err(RotationError::InProgress(_))
        ));

        // A restart resumes the staged phase.
        drop(r);
        let r = load().await.unwrap();
        assert_eq!(r.status().await.staged, Some(staged));
        let now = unix_now();
        assert_eq!(r.step(now).await.unwrap(), st.switch_at);
        // Due: switch.
        let next = r.step(st.switch_at.unwrap()).await.unwrap().unwrap();
        let st = r.status().await;
        assert_eq!(st.phase, Phase::Switched);
        assert_eq!(st.active, staged);
        assert_eq!(st.retiring, Some(first));
        assert_eq!(Some(next), st.drop_at);
        assert!(
            r.cas().current().serving_extras().len() == 3,
            "cross-signed certificate plus both roots"
        );

        // A restart resumes the switched phase.
        drop(r);
        let r = load().await.unwrap();
        assert_eq!(r.status().await.phase, Phase::Switched);
        assert_eq!(r.cas().active().fingerprint(), staged);
        // Due: the old CA leaves; its key (the first CA's, in ca/ itself) is deleted.
        assert_eq!(r.step(next).await.unwrap(), None);
        assert_eq!(r.status().await.phase, Phase::Idle);
        assert_eq!(r.cas().current().roots().len(), 1);
        assert!(!ca_dir.join("ca.key").exists());
        drop(r);
        let r = load().await.unwrap();
        assert_eq!(r.cas().active().fingerprint(), staged);
        assert_eq!(
            kinds(&log),
            vec![
                "ca_rotation_staged",
                "ca_rotation_switched",
                "ca_rotation_completed"
            ]
        );
        // And a second rotation deletes the first rotated directory when it completes.
        let st = r.rotate("admin").await.unwrap();
        r.step(st.switch_at.unwrap()).await.unwrap();
        let drop_at = r.status().await.drop_at.unwrap();
        r.step(drop_at).await.unwrap();
        let dirs: Vec<_> = std::fs::read_dir(&ca_dir)
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().to_string();
                n.starts_with(ROTATED_PREFIX).then_some(n)
            })
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
    }

    /// Replicas on one shared store sign with one CA: the first creates it, the others load it;
    /// a rotation started on one is followed by the others, each step taken by one replica.
    #[tokio::test]
    async fn replicas_on_a_shared_store_follow_one_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let shared: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let td = TrustDomain::new("a.example").unwrap();
        let timing = Timing {
            overlap: Duration::from_secs(10),
            retire_after: Duration::from_secs(100),
        };
        let kek = Arc::new(Kek::from_bytes(&[3u8; 32]).unwrap());
        let mut logs = Vec::new();
        let mut replicas = Vec::new();
        for i in 0..2 {
            let own: Arc<dyn Store> =
                Arc::new(SledStore::open(&dir.path().join(format!("log{i}"))).unwrap());
            let log = AuditLog::start(own).unwrap();
            let r = Rotation::load_shared(
                shared.clone(),
                kek.clone(),
                &td,
                RolesOid::default(),
                timing,
                log.clone(),
            )
            .await
            .unwrap();
            logs.push(log);
            replicas.push(r);
        }
        let (a, b) = (&replicas[0], &replicas[1]);
        let first = a.cas().active().fingerprint();
        assert_eq!(b.cas().active().fingerprint(), first, "one CA for both");
        // The key is sealed: its PEM is nowhere in the shared value.
        let blob = shared
            .shared_get(&storage::shared_key(FIRST))
            .unwrap()
            .unwrap();
        assert!(!String::from_utf8_lossy(&blob.value).contains("PRIVATE KEY"));

        let st = a.rotate("admin").await.unwrap();
        assert!(matches!(
            b.rotate("admin").await,
            Err(RotationError::InProgress(_))
        ));
        b.step(unix_now()).await.unwrap();
        assert_eq!(b.status().await.staged, st.staged, "B follows A's staging");
        let switch_at = st.switch_at.unwrap();
        a.step(switch_at).await.unwrap();
        b.step(switch_at).await.unwrap();
        for r in [a, b] {
            assert_eq!(r.cas().active().fingerprint(), st.staged.unwrap());
            assert_eq!(r.status().await.retiring, Some(first));
        }
        let drop_at = a.status().await.drop_at.unwrap();
        b.step(drop_at).await.unwrap();
        a.step(drop_at).await.unwrap();
        for r in [a, b] {
            assert_eq!(r.status().await.phase, Phase::Idle);
        }
        assert!(
            shared
                .shared_get(&storage::shared_key(FIRST))
                .unwrap()
                .is_none(),
            "the retired CA's sealed key is deleted"
        );
        // Each step is audited once, by the replica that took it.
        let mut all: Vec<String> = logs.iter().flat_map(kinds).collect();
        all.sort();
        assert_eq!(
            all,
            vec![
                "ca_rotation_completed",
                "ca_rotation_staged",
                "ca_rotation_switched"
            ]
        );

        // Another KEK cannot open the CA.
        let wrong = Arc::new(Kek::from_bytes(&[4u8; 32]).unwrap());
        let e = Rotation::load_shared(
            shared.clone(),
            wrong,
            &td,
            RolesOid::default(),
            timing,
            logs[0].clone(),
        )
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("does not open"), "{e}");

        // A sealed blob copied under another CA's name does not open either.
        let active = a.status().await;
        let state = shared.shared_get(STATE_KEY).unwrap().unwrap();
        let stored: State = serde_json::from_slice(&state.value).unwrap();
        let name = stored.active.clone();
        let blob = shared
            .shared_get(&storage::shared_key(&name))
            .unwrap()
            .unwrap();
        let evil = storage::shared_key("rotated-1-evil");
        shared.shared_put(&evil, &blob.value, None).unwrap();
        let mut forged = stored.clone();
        forged.active = "rotated-1-evil".into();
        let json = serde_json::to_vec(&forged).unwrap();
        assert!(
            shared
                .shared_put(STATE_KEY, &json, Some(state.version))
                .unwrap()
        );
        let e = Rotation::load_shared(
            shared.clone(),
            kek.clone(),
            &td,
            RolesOid::default(),
            timing,
            logs[0].clone(),
        )
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("does not open"), "{e}");
        assert_eq!(active.phase, Phase::Idle);
    }
}
