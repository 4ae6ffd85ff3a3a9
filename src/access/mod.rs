//! Temporary elevated access: requests with a reason, approval by other identities, grants that
//! expire by themselves, all on the audit record.
//!
//! One [`Access`] service owns every access record. Mutations are serialized by one async lock
//! (read, decide, commit through the audit log, then update the in-memory index), so two
//! approvers acting at once are counted correctly. Issuance asks [`Access::active_grants`], a
//! synchronous lookup in that index, on its hot path.
//!
//! The subject may belong to a federated trust domain. Such a grant cannot travel in a
//! certificate (another CA signs those), so the live foreign grants are published on a watch
//! channel ([`Access::foreign_grants`]) that `Access.WatchGrants` streams to this domain's
//! services, whose `lanyard::tls` authorizers add them to the foreign peer's roles.

mod notify;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

pub use notify::Notifier;

use crate::audit::{AuditError, AuditLog, Event, Kind};
use crate::ca::SvidInfo;
use crate::policy::{PolicyHandle, ROLE_ADMIN, ROLE_APPROVER, ROLE_AUDITOR};
use crate::revocation::Revocations;
use crate::spiffe::{SpiffeId, TrustDomain, normalize_roles};
use crate::store::{
    AccessRecord, ApprovalRecord, Guard, RECORD_VERSION, RevocationRecord, Store, StoreError, Write,
};
use crate::tls::unix_now;

/// How long finished records stay in the store (the audit log keeps them for good).
const KEEP_FINISHED: i64 = 7 * 24 * 3600;
/// Longest free-text reason or comment.
const MAX_TEXT: usize = 1024;

/// Request states.
pub mod state {
    /// Waiting for approvals.
    pub const PENDING: &str = "pending";
    /// Approved: the roles are granted until `expires_at`.
    pub const GRANTED: &str = "granted";
    /// Denied or withdrawn.
    pub const DENIED: &str = "denied";
    /// Nobody acted in time.
    pub const EXPIRED: &str = "expired";
    /// The grant ran out.
    pub const ENDED: &str = "ended";
    /// The grant was ended early.
    pub const REVOKED: &str = "revoked";
}

/// Why an access operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// Malformed input (roles, duration, empty reason): `InvalidArgument`.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do this (self-approval, not an approver, roles not requestable):
    /// `PermissionDenied`.
    #[error("{0}")]
    Forbidden(String),
    /// No such request: `NotFound`.
    #[error("no access request {0}")]
    NotFound(String),
    /// The request is not in a state that allows this (already decided, subject revoked):
    /// `FailedPrecondition`.
    #[error("{0}")]
    Conflict(String),
    /// Another replica changed the request between this replica's read and its commit;
    /// nothing was written: `Aborted` (list and retry).
    #[error("{0}")]
    Raced(String),
    /// Store or audit failure: `Internal`.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A live grant, as issuance (and the foreign-grant feed) needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Grant (request) id.
    pub id: String,
    /// Roles granted.
    pub roles: Vec<String>,
    /// End of the grant, seconds since the Unix epoch.
    pub ends_at: i64,
}

/// The live grants of foreign identities, by subject, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForeignGrants {
    /// Subject SPIFFE ID → its grants.
    pub by_subject: BTreeMap<String, Vec<Grant>>,
    /// Bumped on every change.
    pub revision: u64,
}

/// Settings of the access service.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    /// How long a request stays pending.
    pub request_ttl: Duration,
    /// How long past notAfter a certificate may renew (revocations must outlive that).
    pub renewal_grace: Duration,
    /// This CA's trust domain: grants of identities outside it are foreign grants.
    pub trust_domain: TrustDomain,
}

/// The access service.
pub struct Access {
    log: AuditLog,
    store: Arc<dyn Store>,
    policy: PolicyHandle,
    revocations: Arc<Revocations>,
    settings: AccessSettings,
    notifier: Notifier,
    /// Every kept record by id; the lock also serializes mutations.
    records: Mutex<HashMap<String, AccessRecord>>,
    /// Live grants by subject, for issuance.
    grants: RwLock<HashMap<String, Vec<Grant>>>,
    /// Live grants of foreign subjects, for `Access.WatchGrants`.
    foreign: watch::Sender<Arc<ForeignGrants>>,
    /// Audit seq of the newest commit applied to each record (only touched under `records`'
    /// lock), so a late copy from the replica feed never replaces a newer record.
    applied: std::sync::Mutex<HashMap<String, u64>>,
}

impl Access {
    /// Loads the kept records from the store.
    pub fn load(
        log: AuditLog,
        policy: PolicyHandle,
        revocations: Arc<Revocations>,
        settings: AccessSettings,
        notifier: Notifier,
    ) -> Result<Arc<Self>, StoreError> {
        let store = log.store().clone();
        let records: HashMap<String, AccessRecord> = store
            .access_all()?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let index = grant_index(&records);
        let foreign = ForeignGrants {
            by_subject: foreign_only(&index, &settings.trust_domain),
            revision: 1,
        };
        let access = Arc::new(Self {
            log,
            store,
            policy,
            revocations,
            settings,
            notifier,
            grants: RwLock::new(index),
            foreign: watch::channel(Arc::new(foreign)).0,
            records: Mutex::new(records),
            applied: std::sync::Mutex::new(HashMap::new()),
        });
        Ok(access)
    }

    /// Roles `subject` holds through live grants at `now`.
    pub fn active_grants(&self, subject: &str, now: i64) -> Vec<Grant> {
        self.grants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(subject)
            .map(|gs| gs.iter().filter(|g| g.ends_at > now).cloned().collect())
            .unwrap_or_default()
    }

    /// (pending requests, grants in force now), for metrics.
    pub async fn counts(&self) -> (usize, usize) {
        let pending = self
            .records
            .lock()
            .await
            .values()
            .filter(|r| r.state == state::PENDING)
            .count();
        let now = unix_now();
        let grants = self
            .grants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flatten()
            .filter(|g| g.ends_at > now)
            .count();
        (pending, grants)
    }

    /// Creates a pending request. `caller` must be the subject or an admin.
    pub async fn request(
        &self,
        caller: &SvidInfo,
        subject: &str,
        roles: &[String],
        duration: Duration,
        reason: &str,
    ) -> Result<AccessRecord, AccessError> {
        let subject = SpiffeId::parse(subject).map_err(|e| AccessError::Invalid(e.to_string()))?;
        let is_admin = has_role(caller, ROLE_ADMIN);
        if caller.spiffe_id != subject && !is_admin {
            return Err(AccessError::Forbidden(format!(
                "{} may only request access for itself (or hold {ROLE_ADMIN})",
                caller.spiffe_id
            )));
        }
        let reason = text(
            reason,
            "a reason is required (--reason), e.g. an incident or ticket",
        )?;
        let roles = normalize_roles(roles).map_err(|e| AccessError::Invalid(e.to_string()))?;
        if roles.is_empty() {
            return Err(AccessError::Invalid(
                "name at least one role (--roles)".into(),
            ));
        }
        if duration.is_zero() {
            return Err(AccessError::Invalid(
                "duration must be positive (--duration)".into(),
            ));
        }
        let policy = self.policy.current();
        let rule = policy.lookup_access(&subject).ok_or_else(|| {
            AccessError::Forbidden(format!("no [[access]] rule lets {subject} request roles"))
        })?;
        if let Some(r) = roles.iter().find(|r| !rule.roles.contains(r)) {
            return Err(AccessError::Forbidden(format!(
                "role {r:?} is not requestable for {subject} (requestable: {})",
                if rule.roles.is_empty() {
                    "none".into()
                } else {
                    rule.roles.join(",")
                }
            )));
        }
        if duration > rule.max_duration {
            return Err(AccessError::Forbidden(format!(
                "duration {}s is above the maximum of {}s for {subject}",
                duration.as_secs(),
                rule.max_duration.as_secs()
            )));
        }
        if let Some(block) = self.revocations.blocked(&subject).map_err(internal)? {
            return Err(AccessError::Conflict(format!(
                "{subject} is revoked ({}); lift the revocation first",
                block.reason
            )));
        }
        let now = unix_now();
        let expires_at = now + self.settings.request_ttl.as_secs() as i64;
        let id: [u8; 8] = rand::random();
        let record = AccessRecord {
            v: RECORD_VERSION,
            id: crate::encoding::hex(&id),
            spiffe_id: subject.to_string(),
            roles: roles.clone(),
            duration_secs: duration.as_secs(),
            reason: reason.to_string(),
            requester: caller.spiffe_id.to_string(),
            created_at: now,
            state: state::PENDING.into(),
            approvals: Vec::new(),
            approvals_needed: rule.approvals,
            expires_at,
            granted_at: 0,
            closed_by: String::new(),
            close_reason: String::new(),
            prune_at: expires_at + KEEP_FINISHED,
        };
        let event = Event::new(Kind::AccessRequested, caller.spiffe_id.as_str())
            .subject(subject.as_str())
            .roles(roles)
            .reason(format!(
                "request {} for {}s ({} approvals needed): {reason}",
                record.id, record.duration_secs, record.approvals_needed
            ));
        let mut records = self.records.lock().await;
        self.commit(&mut records, record.clone(), event, vec![])
            .await?;
        drop(records);
        info!(id = %record.id, spiffe_id = %record.spiffe_id, roles = %record.roles.join(","), "access requested");
        self.notifier.notify(&record);
        Ok(record)
    }

    /// Adds `caller`'s approval; starts the grant when enough approvals are in.
    pub async fn approve(
        &self,
        caller: &SvidInfo,
        id: &str,
        comment: &str,
    ) -> Result<AccessRecord, AccessError> {
        if !has_role(caller, ROLE_APPROVER) {
            return Err(AccessError::Forbidden(format!(
                "{} lacks {ROLE_APPROVER}{}",
                caller.spiffe_id,
                self.foreign_note(caller)
            )));
        }
        let comment = text(comment, "")?.to_string();
        let mut records = self.records.lock().await;
        let mut r = pending(&records, id)?;
        let who = caller.spiffe_id.as_str();
        if who == r.requester || who == r.spiffe_id {
            return Err(AccessError::Forbidden(format!(
                "{who} cannot approve request {id}: the requester and the subject never approve their own access"
            )));
        }
        if r.approvals.iter().any(|a| a.approver == who) {
            return Err(AccessError::Conflict(format!(
                "{who} already approved request {id}"
            )));
        }
        let now = unix_now();
        r.approvals.push(ApprovalRecord {
            approver: who.to_string(),
            comment: comment.clone(),
            at: now,
        });
        let granted = r.approvals.len() as u32 >= r.approvals_needed;
        let approved = Event::new(Kind::AccessApproved, who)
            .subject(&r.spiffe_id)
            .roles(r.roles.clone())
            .reason(format!(
                "request {id}: approval {}/{}{}",
                r.approvals.len(),
                r.approvals_needed,
                if comment.is_empty() {
                    String::new()
                } else {
                    format!(": {comment}")
                }
            ));
        // The approval is committed with the record as it stands (still pending); when it
        // completes the grant, the grant is a second event committed with the granted record, so
        // a crash between them leaves a pending request with the approval on record, never a
        // grant without its event.
        self.commit(&mut records, r.clone(), approved, vec![])
            .await?;
        if granted {
            r.state = state::GRANTED.into();
            r.granted_at = now;
            r.expires_at = now + r.duration_secs as i64;
            r.prune_at = r.expires_at + KEEP_FINISHED;
            let grant = Event::new(Kind::AccessGranted, who)
                .subject(&r.spiffe_id)
                .roles(r.roles.clone())
                .not_after(r.expires_at)
                .reason(format!(
                    "grant {id} until {} after {} approvals ({}): {}",
                    crate::issuance::fmt_time(r.expires_at),
                    r.approvals.len(),
                    r.approvals
                        .iter()
                        .map(|a| a.approver.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.reason
                ));
            self.commit(&mut records, r.clone(), grant, vec![]).await?;
        }
        info!(%id, approver = who, granted, "access approved");
        Ok(r)
    }

    /// Denies a pending request (an approver), or withdraws it (its requester).
    pub async fn deny(
        &self,
        caller: &SvidInfo,
        id: &str,
        reason: &str,
    ) -> Result<AccessRecord, AccessError> {
        let reason = text(reason, "a reason is required (--reason)")?.to_string();
        let mut records = self.records.lock().await;
        let mut r = pending(&records, id)?;
        let who = caller.spiffe_id.as_str();
        if !has_role(caller, ROLE_APPROVER) && who != r.requester {
            return Err(AccessError::Forbidden(format!(
                "{who} lacks {ROLE_APPROVER} and did not make request {id}{}",
                self.foreign_note(caller)
            )));
        }
        r.state = state::DENIED.into();
        r.closed_by = who.to_string();
        r.close_reason = reason.clone();
        r.prune_at = unix_now() + KEEP_FINISHED;
        let event = Event::new(Kind::AccessDenied, who)
            .subject(&r.spiffe_id)
            .roles(r.roles.clone())
            .reason(format!("request {id}: {reason}"));
        self.commit(&mut records, r.clone(), event, vec![]).await?;
        info!(%id, by = who, "access denied");
        Ok(r)
    }

    /// Ends a grant early and revokes every live certificate of the subject that carries one of
    /// its roles. Those revocations are *renewable*: the holder may renew at once (and gets a
    /// certificate without the roles), while peers refuse the old certificate.
    pub async fn revoke(
        &self,
        caller: &SvidInfo,
        id: &str,
        reason: &str,
    ) -> Result<AccessRecord, AccessError> {
        if !has_role(caller, ROLE_APPROVER) && !has_role(caller, ROLE_ADMIN) {
            return Err(AccessError::Forbidden(format!(
                "{} lacks {ROLE_APPROVER} or {ROLE_ADMIN}{}",
                caller.spiffe_id,
                self.foreign_note(caller)
            )));
        }
        let reason = text(reason, "a reason is required (--reason)")?.to_string();
        let mut records = self.records.lock().await;
        let mut r = records
            .get(id)
            .cloned()
            .ok_or_else(|| AccessError::NotFound(id.to_string()))?;
        let now = unix_now();
        if r.state != state::GRANTED || r.expires_at <= now {
            return Err(AccessError::Conflict(format!(
                "grant {id} is not active (state {})",
                r.state
            )));
        }
        let who = caller.spiffe_id.as_str();
        // Stop issuing the roles first: from here on no issuance adds them. Certificates that
        // carry them are looked for only afterwards, so one signed while the revocation commits
        // is not missed.
        if let Some(gs) = self
            .grants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&r.spiffe_id)
        {
            gs.retain(|g| g.id != id);
        }
        let rev_reason = format!("grant {id} revoked: {reason}");
        let writes = match self.revocations_for(&r, now, &rev_reason) {
            Ok(w) => w,
            Err(e) => {
                self.reindex(&records);
                return Err(e);
            }
        };
        let n = writes.len();
        r.state = state::REVOKED.into();
        r.closed_by = who.to_string();
        r.close_reason = reason.clone();
        r.expires_at = now;
        r.prune_at = now + KEEP_FINISHED;
        let event = Event::new(Kind::AccessRevoked, who)
            .subject(&r.spiffe_id)
            .roles(r.roles.clone())
            .reason(format!("grant {id}: {reason} ({n} certificates revoked)"));
        if let Err(e) = self.commit(&mut records, r.clone(), event, writes).await {
            self.reindex(&records);
            return Err(e);
        }
        // An issuance that read the grant before it left the index may have been committing
        // meanwhile. The audit log commits in order, so any such certificate is in the store
        // now: revoke it too.
        let late = self.revocations_for(&r, now, &rev_reason)?;
        let m = late.len();
        if m > 0 {
            let event = Event::new(Kind::Revoked, who)
                .subject(&r.spiffe_id)
                .roles(r.roles.clone())
                .reason(format!(
                    "{rev_reason} ({m} certificates issued while the grant was being revoked)"
                ));
            self.log.record(event, late).await.map_err(internal)?;
        }
        info!(%id, by = who, certs = n + m, "grant revoked");
        Ok(r)
    }

    /// Closes the race between an issuance and [`Access::revoke`]: an issuance that read a grant
    /// before `revoke` took it out of the index, but committed its certificate only after
    /// `revoke`'s second look at the store, would hand out the revoked roles. Issuance calls this
    /// after its commit with the grants the certificate used: one that left the index before its
    /// end was revoked, and the certificate gets the renewable revocation `revoke` gives the
    /// others (peers refuse it; the holder renews at once, without the roles). Whichever of the
    /// two runs last sees the other's work, so no certificate escapes. Returns whether it revoked.
    pub async fn recheck(&self, svid: &SvidInfo, used: &[Grant]) -> Result<bool, AccessError> {
        let now = unix_now();
        let live = self.active_grants(svid.spiffe_id.as_str(), now);
        let Some(gone) = used
            .iter()
            .find(|g| g.ends_at > now && !live.iter().any(|l| l.id == g.id))
        else {
            return Ok(false);
        };
        let reason = format!(
            "grant {} was revoked while this certificate was being issued",
            gone.id
        );
        let record = RevocationRecord {
            v: RECORD_VERSION,
            rev: 0,
            serial: svid.serial.to_hex(),
            spiffe_id: svid.spiffe_id.to_string(),
            identity_rule: false,
            before: 0,
            reason: reason.clone(),
            revoked_at: now,
            expires_at: svid.not_after + self.settings.renewal_grace.as_secs() as i64,
            blocked: false,
            renewable: true,
            origin: String::new(),
        };
        let event = Event::new(Kind::Revoked, "lanyard")
            .subject(svid.spiffe_id.as_str())
            .serial(svid.serial.to_hex())
            .roles(svid.roles.clone())
            .reason(reason);
        self.log
            .record(event, vec![Write::PutRevocation(record)])
            .await
            .map_err(internal)?;
        warn!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, grant = %gone.id, "certificate issued during a grant revocation revoked");
        Ok(true)
    }

    /// Renewable revocations for the subject's live certificates that carry one of `r`'s roles
    /// and are not revoked yet. A certificate already revoked (by serial, by its identity, by an
    /// earlier grant) keeps that entry: replacing it with a renewable one would let a
    /// certificate revoked for good (a leaked key) renew again.
    fn revocations_for(
        &self,
        r: &AccessRecord,
        now: i64,
        reason: &str,
    ) -> Result<Vec<Write>, AccessError> {
        let grace = self.settings.renewal_grace.as_secs() as i64;
        let mut writes = Vec::new();
        for c in self.store.issued_for(&r.spiffe_id).map_err(internal)? {
            if c.not_after + grace < now || !c.roles.iter().any(|role| r.roles.contains(role)) {
                continue;
            }
            if self
                .store
                .revoked_serial(&c.serial)
                .map_err(internal)?
                .is_some()
            {
                continue;
            }
            writes.push(Write::PutRevocation(RevocationRecord {
                v: RECORD_VERSION,
                rev: 0,
                serial: c.serial,
                spiffe_id: c.spiffe_id,
                identity_rule: false,
                before: 0,
                reason: reason.to_string(),
                revoked_at: now,
                expires_at: c.not_after + grace,
                blocked: false,
                renewable: true,
                origin: String::new(),
            }));
        }
        Ok(writes)
    }

    /// Requests visible to `caller`, newest first.
    pub async fn list(
        &self,
        caller: &SvidInfo,
        pending_only: bool,
        subject: &str,
    ) -> Vec<AccessRecord> {
        let sees_all = [ROLE_APPROVER, ROLE_ADMIN, ROLE_AUDITOR]
            .iter()
            .any(|r| has_role(caller, r));
        let me = caller.spiffe_id.as_str();
        let records = self.records.lock().await;
        let mut out: Vec<AccessRecord> = records
            .values()
            .filter(|r| sees_all || r.spiffe_id == me || r.requester == me)
            .filter(|r| !pending_only || r.state == state::PENDING)
            .filter(|r| subject.is_empty() || r.spiffe_id == subject)
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        out
    }

    /// Expires pending requests nobody acted on and ends grants that ran out (each audited).
    pub async fn sweep(&self) -> Result<usize, AccessError> {
        let now = unix_now();
        let mut records = self.records.lock().await;
        let due: Vec<AccessRecord> = records
            .values()
            .filter(|r| {
                (r.state == state::PENDING || r.state == state::GRANTED) && r.expires_at <= now
            })
            .cloned()
            .collect();
        for mut r in due.iter().cloned() {
            let (kind, reason) = if r.state == state::PENDING {
                r.state = state::EXPIRED.into();
                (
                    Kind::AccessExpired,
                    format!("request {}: no decision in time", r.id),
                )
            } else {
                r.state = state::ENDED.into();
                (Kind::AccessEnded, format!("grant {} ran out", r.id))
            };
            let event = Event::new(kind, "lanyard")
                .subject(&r.spiffe_id)
                .roles(r.roles.clone())
                .reason(reason);
            match self.commit(&mut records, r, event, vec![]).await {
                // Another replica expired or ended it first: its commit is the record.
                Ok(()) | Err(AccessError::Raced(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(due.len())
    }

    /// Runs [`Access::sweep`] every `every` until the task is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(access) = me.upgrade() else { return };
                if let Err(e) = access.sweep().await {
                    warn!(error = %e, "access sweep failed");
                }
            }
        })
    }

    async fn commit(
        &self,
        records: &mut HashMap<String, AccessRecord>,
        record: AccessRecord,
        event: Event,
        mut writes: Vec<Write>,
    ) -> Result<(), AccessError> {
        // Replicas on a shared store: the commit holds only if the record is still what this
        // replica read (two approvers on two replicas: exactly one wins).
        writes.push(Write::Guard(Guard::Access {
            id: record.id.clone(),
            expect: records.get(&record.id).cloned().map(Box::new),
        }));
        writes.push(Write::PutAccess(record.clone()));
        let committed = match self.log.record(event, writes).await {
            Ok(c) => c,
            Err(AuditError::Conflict) => {
                self.reload(records)?;
                return Err(AccessError::Raced(format!(
                    "access request {} changed concurrently on another replica; list it and retry",
                    record.id
                )));
            }
            Err(e) => return Err(internal(e)),
        };
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.id.clone(), committed.seq);
        records.insert(record.id.clone(), record);
        self.reindex(records);
        Ok(())
    }

    /// Re-reads every record from the store (after a lost race, or a lagged replica feed).
    fn reload(&self, records: &mut HashMap<String, AccessRecord>) -> Result<(), AccessError> {
        *records = self
            .store
            .access_all()
            .map_err(internal)?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        self.reindex(records);
        Ok(())
    }

    /// Applies the access records other replicas commit (read from the audit log's live feed,
    /// which on a shared store carries every replica's commits), so grants and requests made on
    /// one replica hold on every other within the feed's delay.
    pub fn spawn_follower(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        let mut live = self.log.live();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let got = tokio::select! {
                    r = live.recv() => r,
                    () = crate::server::stopped(&mut shutdown) => return,
                };
                let Some(access) = me.upgrade() else { return };
                match got {
                    Ok(c) if c.access.is_empty() => {}
                    Ok(c) => {
                        let mut records = access.records.lock().await;
                        let mut applied = access.applied.lock().unwrap_or_else(|p| p.into_inner());
                        for r in &c.access {
                            let newer = applied.get(&r.id).is_none_or(|&s| s < c.record.seq);
                            if newer {
                                applied.insert(r.id.clone(), c.record.seq);
                                records.insert(r.id.clone(), r.clone());
                            }
                        }
                        drop(applied);
                        access.reindex(&records);
                    }
                    Err(RecvError::Lagged(n)) => {
                        warn!(
                            missed = n,
                            "access follower lagged; re-reading every record"
                        );
                        let mut records = access.records.lock().await;
                        if let Err(e) = access.reload(&mut records) {
                            warn!(error = %e, "cannot re-read access records");
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        })
    }

    /// Why a foreign caller holds no roles here, for refusals.
    fn foreign_note(&self, caller: &SvidInfo) -> String {
        let td = caller.spiffe_id.trust_domain_name();
        if td == self.settings.trust_domain.as_str() {
            return String::new();
        }
        format!(
            " (an identity of trust domain {td} holds no roles in {}: roles its own CA wrote are not honoured here)",
            self.settings.trust_domain
        )
    }

    fn reindex(&self, records: &HashMap<String, AccessRecord>) {
        let index = grant_index(records);
        let by_subject = foreign_only(&index, &self.settings.trust_domain);
        *self.grants.write().unwrap_or_else(|p| p.into_inner()) = index;
        self.foreign.send_if_modified(|cur| {
            if cur.by_subject == by_subject {
                return false;
            }
            *cur = Arc::new(ForeignGrants {
                by_subject,
                revision: cur.revision + 1,
            });
            true
        });
    }

    /// The live grants of foreign identities, now and on every change.
    pub fn foreign_grants(&self) -> watch::Receiver<Arc<ForeignGrants>> {
        self.foreign.subscribe()
    }
}

/// Live grants by subject.
fn grant_index(records: &HashMap<String, AccessRecord>) -> HashMap<String, Vec<Grant>> {
    let mut grants: HashMap<String, Vec<Grant>> = HashMap::new();
    for r in records.values().filter(|r| r.state == state::GRANTED) {
        grants.entry(r.spiffe_id.clone()).or_default().push(Grant {
            id: r.id.clone(),
            roles: r.roles.clone(),
            ends_at: r.expires_at,
        });
    }
    grants
}

/// The grants of subjects outside trust domain `td`, each subject's sorted by id.
fn foreign_only(
    index: &HashMap<String, Vec<Grant>>,
    td: &TrustDomain,
) -> BTreeMap<String, Vec<Grant>> {
    index
        .iter()
        .filter(|(id, _)| SpiffeId::parse(id).is_ok_and(|id| id.trust_domain_name() != td.as_str()))
        .map(|(id, gs)| {
            let mut gs = gs.clone();
            gs.sort_by(|a, b| a.id.cmp(&b.id));
            (id.clone(), gs)
        })
        .collect()
}

fn pending(records: &HashMap<String, AccessRecord>, id: &str) -> Result<AccessRecord, AccessError> {
    let r = records
        .get(id)
        .cloned()
        .ok_or_else(|| AccessError::NotFound(id.to_string()))?;
    if r.state != state::PENDING {
        return Err(AccessError::Conflict(format!(
            "request {id} is {}, not pending",
            r.state
        )));
    }
    if r.expires_at <= unix_now() {
        return Err(AccessError::Conflict(format!("request {id} has expired")));
    }
    Ok(r)
}

fn has_role(svid: &SvidInfo, role: &str) -> bool {
    svid.roles.iter().any(|r| r == role)
}

fn text<'a>(s: &'a str, required: &str) -> Result<&'a str, AccessError> {
    let t = s.trim();
    if t.is_empty() && !required.is_empty() {
        return Err(AccessError::Invalid(required.to_string()));
    }
    if t.len() > MAX_TEXT {
        return Err(AccessError::Invalid(format!(
            "text longer than {MAX_TEXT} bytes"
        )));
    }
    Ok(t)
}

fn internal(e: impl std::fmt::Display) -> AccessError {
    AccessError::Internal(e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ca::Serial;
    use crate::store::SledStore;

    const SUBJECT: &str = "spiffe://example.org/ns/prod/api";

    fn svid(id: &str, roles: &[&str], serial: u8) -> SvidInfo {
        SvidInfo {
            spiffe_id: SpiffeId::parse(id).unwrap(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            serial: Serial::from_bytes(&[serial]),
            not_before: unix_now() - 30,
            not_after: unix_now() + 60,
        }
    }

    /// An Access service over a fresh store holding one live grant of db-write to `subject`.
    async fn with_grant(
        subject: &str,
    ) -> (tempfile::TempDir, Arc<Access>, Arc<Revocations>, String) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let log = AuditLog::start(store).unwrap();
        let now = unix_now();
        let grant = AccessRecord {
            v: RECORD_VERSION,
            id: "g1".into(),
            spiffe_id: subject.into(),
            roles: vec!["db-write".into()],
            duration_secs: 3600,
            reason: "INC-1".into(),
            requester: subject.into(),
            created_at: now,
            state: state::GRANTED.into(),
            approvals: vec![],
            approvals_needed: 1,
            expires_at: now + 3600,
            granted_at: now,
            closed_by: String::new(),
            close_reason: String::new(),
            prune_at: now + 7200,
        };
        log.record(
            Event::new(Kind::AccessGranted, "test"),
            vec![Write::PutAccess(grant)],
        )
        .await
        .unwrap();
        let grace = Duration::from_secs(5);
        let revocations = Arc::new(Revocations::new(
            log.clone(),
            grace,
            Duration::from_secs(3600),
        ));
        let access = Access::load(
            log,
            PolicyHandle::default(),
            revocations.clone(),
            AccessSettings {
                request_ttl: Duration::from_secs(60),
                renewal_grace: grace,
                trust_domain: TrustDomain::new("example.org").unwrap(),
            },
            Notifier::default(),
        )
        .unwrap();
        (dir, access, revocations, "g1".into())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_committed_after_its_grant_was_revoked_is_revoked_renewably() {
        let (_dir, access, revocations, id) = with_grant(SUBJECT).await;
        // What an issuance read before the revocation.
        let used = access.active_grants(SUBJECT, unix_now());
        assert_eq!(used.len(), 1);
        let cert = svid(SUBJECT, &["db-write"], 1);
        assert!(!access.recheck(&cert, &used).await.unwrap(), "grant live");
        assert!(revocations.status(&cert).unwrap().is_none());

        let approver = svid("spiffe://example.org/ops/bob", &[ROLE_APPROVER], 2);
        access.revoke(&approver, &id, "done").await.unwrap();
        // The issuance commits only now: the revocation's scans could not see its certificate.
        assert!(access.recheck(&cert, &used).await.unwrap());
        let r = revocations.status(&cert).unwrap().expect("revoked");
        assert!(r.renewable && !r.identity_rule, "{r:?}");
        assert!(r.reason.contains("grant g1"), "{}", r.reason);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn foreign_grants_are_published_until_revoked_and_local_ones_never() {
        let (_dir, access, _revocations, _) = with_grant(SUBJECT).await;
        assert!(access.foreign_grants().borrow().by_subject.is_empty());

        let foreign = "spiffe://b.example/ops/alice";
        let (_dir, access, _revocations, id) = with_grant(foreign).await;
        let rx = access.foreign_grants();
        let first = rx.borrow().clone();
        assert_eq!(first.by_subject[foreign][0].roles, vec!["db-write"]);
        let approver = svid("spiffe://example.org/ops/bob", &[ROLE_APPROVER], 2);
        access.revoke(&approver, &id, "done").await.unwrap();
        let after = rx.borrow().clone();
        assert!(after.by_subject.is_empty());
        assert!(after.revision > first.revision);
    }
}
