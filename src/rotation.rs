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
use tracing::{error, info, warn};

use crate::audit::{AuditLog, Event, Kind};
use crate::ca::{Authority, CaError, CaHandle, CaSet, RolesOid};
use crate::encoding::hex;
use crate::fsutil::write_atomic;
use crate::issuance::fmt_time;
use crate::spiffe::TrustDomain;
use crate::tls::unix_now;

const STATE_FILE: &str = "rotation.json";
/// The directory (relative to `<data_dir>/ca`) of the CA created on first start.
const FIRST: &str = ".";
const ROTATED_PREFIX: &str = "rotated-";

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
    /// The rotation state file does not decode or names a missing CA.
    #[error("{0} is corrupt: {1}")]
    Corrupt(PathBuf, String),
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

/// Drives CA rotations for one server.
pub struct Rotation {
    cas: CaHandle,
    dir: PathBuf,
    trust_domain: TrustDomain,
    roles_oid: RolesOid,
    timing: Timing,
    managed: bool,
    log: AuditLog,
    state: Mutex<State>,
    wake: Notify,
}

/// `rotation.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct State {
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

// === impl Rotation ===

impl Rotation {
    /// Loads the CA(s) of a generated CA under `dir` (`<data_dir>/ca`): the first CA is created
    /// there on first start; a rotation in progress is resumed from `rotation.json`.
    pub fn load(
        dir: &Path,
        trust_domain: &TrustDomain,
        roles_oid: RolesOid,
        timing: Timing,
        log: AuditLog,
    ) -> Result<Arc<Self>, RotationError> {
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<State>(&b)
                .map_err(|e| RotationError::Corrupt(path.clone(), e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                v: 1,
                active: FIRST.into(),
                staged: None,
                retiring: None,
            },
            Err(e) => return Err(RotationError::Io(path, e)),
        };
        for name in [Some(&state.active), state.staged.as_ref().map(|s| &s.dir)]
            .into_iter()
            .chain([state.retiring.as_ref().map(|r| &r.dir)])
            .flatten()
        {
            if !valid_dir_name(name) {
                return Err(RotationError::Corrupt(
                    path.clone(),
                    format!("bad CA directory {name:?}"),
                ));
            }
        }
        let load = |name: &str| -> Result<Arc<Authority>, RotationError> {
            let d = ca_dir(dir, name);
            Ok(Arc::new(if name == FIRST && state.active == FIRST {
                Authority::load_or_create(&d, trust_domain, roles_oid.clone())?
            } else {
                Authority::load(
                    &d.join("ca.pem"),
                    &d.join("ca.key"),
                    trust_domain,
                    roles_oid.clone(),
                )?
            }))
        };
        let active = load(&state.active)?;
        let staged = state.staged.as_ref().map(|s| load(&s.dir)).transpose()?;
        let retiring = state.retiring.as_ref().map(|r| load(&r.dir)).transpose()?;
        remove_orphans(dir, &state);
        let set = build_set(active, staged, retiring);
        Ok(Arc::new(Self {
            cas: CaHandle::new(set),
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.clone(),
            roles_oid,
            timing,
            managed: true,
            log,
            state: Mutex::new(state),
            wake: Notify::new(),
        }))
    }

    /// An operator-supplied CA (`ca_cert`/`ca_key`): served as is, never rotated by Lanyard.
    pub fn unmanaged(authority: Authority, timing: Timing, log: AuditLog) -> Arc<Self> {
        let trust_domain = authority.trust_domain().clone();
        let roles_oid = authority.roles_oid().clone();
        Arc::new(Self {
            cas: CaHandle::new(CaSet::single(Arc::new(authority))),
            dir: PathBuf::new(),
            trust_domain,
            roles_oid,
            timing,
            managed: false,
            log,
            state: Mutex::new(State {
                v: 1,
                active: FIRST.into(),
                staged: None,
                retiring: None,
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
        let state = self.state.lock().await;
        self.status_of(&state)
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
        let mut state = self.state.lock().await;
        if let Some(s) = &state.staged {
            return Err(RotationError::InProgress(format!(
                "a rotation is in progress: the new CA is staged and signing switches at {}",
                fmt_time(s.switch_at)
            )));
        }
        if let Some(r) = &state.retiring {
            return Err(RotationError::InProgress(format!(
                "a rotation is in progress: the previous CA is trusted until {}; rotate again after that",
                fmt_time(r.drop_at)
            )));
        }
        let now = unix_now();
        let name = (0..100)
            .map(|n| {
                if n == 0 {
                    format!("{ROTATED_PREFIX}{now}")
                } else {
                    format!("{ROTATED_PREFIX}{now}-{n}")
                }
            })
            .find(|n| !self.dir.join(n).exists())
            .ok_or_else(|| {
                RotationError::Io(
                    self.dir.clone(),
                    std::io::Error::other("no free directory name for the new CA"),
                )
            })?;
        let common_name = format!("Lanyard CA {} {}", self.trust_domain, fmt_time(now));
        let new = Arc::new(Authority::create(
            &self.dir.join(&name),
            &self.trust_domain,
            self.roles_oid.clone(),
            &common_name,
        )?);
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
        let mut next = state.clone();
        next.staged = Some(Staged {
            dir: name.clone(),
            switch_at,
        });
        self.persist(&next)?;
        *state = next;
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
        Ok(self.status_of(&state))
    }

    /// Runs the due steps until `shutdown`.
    pub fn spawn(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
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
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = this.wake.notified() => {}
                    () = crate::server::stopped(&mut shutdown) => return,
                }
            }
        })
    }

    /// Performs every step due at `now`; returns when the next one is due.
    async fn step(&self, now: i64) -> Result<Option<i64>, RotationError> {
        if !self.managed {
            return Ok(None);
        }
        let mut state = self.state.lock().await;
        if let Some(s) = state.staged.clone()
            && s.switch_at <= now
        {
            self.switch(&mut state, &s, now).await?;
        }
        if let Some(r) = state.retiring.clone()
            && r.drop_at <= now
        {
            self.complete(&mut state, &r).await?;
        }
        Ok(state
            .staged
            .as_ref()
            .map(|s| s.switch_at)
            .or_else(|| state.retiring.as_ref().map(|r| r.drop_at)))
    }

    async fn switch(
        &self,
        state: &mut State,
        staged: &Staged,
        now: i64,
    ) -> Result<(), RotationError> {
        let set = self.cas.current();
        let (Some(new), old) = (set.staged().cloned(), set.active().clone()) else {
            return Err(RotationError::Corrupt(
                self.dir.join(STATE_FILE),
                "staged CA not loaded".into(),
            ));
        };
        let drop_at = now + self.timing.retire_after.as_secs() as i64;
        let next = State {
            v: 1,
            active: staged.dir.clone(),
            staged: None,
            retiring: Some(Retiring {
                dir: state.active.clone(),
                drop_at,
            }),
        };
        self.persist(&next)?;
        *state = next;
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

    async fn complete(&self, state: &mut State, retiring: &Retiring) -> Result<(), RotationError> {
        let set = self.cas.current();
        let old = set.retiring().map(|a| hex(&a.fingerprint()));
        let mut next = state.clone();
        next.retiring = None;
        self.persist(&next)?;
        *state = next;
        self.cas.replace(CaSet::single(set.active().clone()));
        // The old key can sign nothing anyone trusts any more: delete it.
        let d = ca_dir(&self.dir, &retiring.dir);
        let removed = if retiring.dir == FIRST {
            std::fs::remove_file(d.join("ca.key"))
                .and_then(|()| std::fs::remove_file(d.join("ca.pem")))
        } else {
            std::fs::remove_dir_all(&d)
        };
        if let Err(e) = removed {
            warn!(dir = %d.display(), error = %e, "cannot delete the retired CA");
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

    fn persist(&self, state: &State) -> Result<(), RotationError> {
        let path = self.dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| RotationError::Corrupt(path.clone(), e.to_string()))?;
        write_atomic(&path, &json, 0o600).map_err(|e| RotationError::Io(path, e))
    }

    async fn audit(&self, event: Event) {
        if let Err(e) = self.log.record(event, vec![]).await {
            warn!(error = %e, "cannot audit a CA rotation step");
        }
    }
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

/// The directory of the CA named `name` (`.` is `dir` itself).
fn ca_dir(dir: &Path, name: &str) -> PathBuf {
    if name == FIRST {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

fn valid_dir_name(name: &str) -> bool {
    name == FIRST
        || (name.starts_with(ROTATED_PREFIX)
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Deletes `rotated-*` directories no state refers to (a rotation interrupted between creating
/// the new CA and recording it).
fn remove_orphans(dir: &Path, state: &State) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let used: Vec<&str> = [Some(state.active.as_str())]
        .into_iter()
        .chain([
            state.staged.as_ref().map(|s| s.dir.as_str()),
            state.retiring.as_ref().map(|r| r.dir.as_str()),
        ])
        .flatten()
        .collect();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(ROTATED_PREFIX) && !used.contains(&name.as_str()) {
            info!(dir = %e.path().display(), "removing a CA directory no rotation refers to");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
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
        let r = Rotation::load(&ca_dir, &td, RolesOid::default(), timing, log.clone()).unwrap();
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
        let r = load().unwrap();
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
        let r = load().unwrap();
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
        let r = load().unwrap();
        assert_eq!(r.status().await.phase, Phase::Switched);
        assert_eq!(r.cas().active().fingerprint(), staged);
        // Due: the old CA leaves; its key (the first CA's, in ca/ itself) is deleted.
        assert_eq!(r.step(next).await.unwrap(), None);
        assert_eq!(r.status().await.phase, Phase::Idle);
        assert_eq!(r.cas().current().roots().len(), 1);
        assert!(!ca_dir.join("ca.key").exists());
        drop(r);
        let r = load().unwrap();
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
}
