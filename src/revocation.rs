//! Revocation: by serial and by identity, checked on every authenticated call, streamed to
//! watchers, and published as a signed CRL.
//!
//! Revoking an identity writes one identity rule ("every cert of X with notBefore < T") and, for
//! CRL users, one serial entry per live certificate of X. While the rule is *blocked* the CA
//! refuses every new certificate for X (renewal and join token alike) until an admin lifts it;
//! lifting keeps the old certificates revoked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::audit::{AuditError, AuditLog, Committed, Event, Kind};
use crate::ca::{Authority, CaError, CrlEntries, Serial, SvidInfo};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::{RECORD_VERSION, RevocationRecord, Store, StoreError, Write};
use crate::tls::unix_now;

/// Errors of revocation operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationError {
    /// The serial is not a certificate this CA has issued that is still alive.
    #[error("serial {0} is unknown to this CA or already expired")]
    UnknownSerial(String),
    /// `--lift` for an identity that is not blocked.
    #[error("{0} is not revoked")]
    NotRevoked(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Audit failure (nothing was revoked).
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// CRL signing failure.
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Revocation commits the feed holds for a watcher that fell behind; past that it resyncs.
const FEED_BUFFER: usize = 1024;

/// The revocation service.
pub struct Revocations {
    log: AuditLog,
    store: Arc<dyn Store>,
    /// How long past notAfter a certificate may still renew: revocations must outlive that.
    grace: Duration,
    /// Longest lifetime any certificate can have: bounds what an identity rule must cover.
    max_lifetime: Duration,
    /// Cached CRLs by the fingerprint of the CA that signed them.
    crl: Mutex<std::collections::HashMap<[u8; 32], CachedCrl>>,
    /// Revocation commits only, forwarded from the audit log's live feed by one task (started
    /// by the first watcher): thousands of `Revocation.Watch` streams wake on revocations, not
    /// on every issuance. `None` tells watchers to resync from the store (the forwarder lagged).
    feed: std::sync::OnceLock<broadcast::Sender<Option<Arc<Committed>>>>,
}

struct CachedCrl {
    /// The newest revocation it covers: a newer one in the store makes it stale.
    rev: u64,
    /// The earliest expiry among the entries it was built from: after that, pruning may have
    /// removed one (pruning does not raise `rev`), so it is rebuilt.
    earliest_expiry: i64,
    number: u64,
    this_update: i64,
    next_update: i64,
    der: Arc<Vec<u8>>,
}

impl Revocations {
    /// A service over `log`'s store.
    pub fn new(log: AuditLog, grace: Duration, max_lifetime: Duration) -> Self {
        Self {
            store: log.store().clone(),
            log,
            grace,
            max_lifetime,
            crl: Mutex::new(std::collections::HashMap::new()),
            feed: std::sync::OnceLock::new(),
        }
    }

    /// Follows revocation commits (see the `feed` field); `None` means "resync from the store".
    /// Subscribe before reading a snapshot, so nothing committed in between is missed.
    pub fn live(&self) -> broadcast::Receiver<Option<Arc<Committed>>> {
        self.feed
            .get_or_init(|| {
                let (tx, _) = broadcast::channel(FEED_BUFFER);
                let mut all = self.log.live();
                let feed = tx.clone();
                tokio::spawn(async move {
                    loop {
                        let item = match all.recv().await {
                            Ok(c) if c.revocations.is_empty() => continue,
                            Ok(c) => Some(c),
                            Err(broadcast::error::RecvError::Lagged(_)) => None,
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        // No watcher right now is fine: the next one starts from the store.
                        let _ = feed.send(item);
                    }
                });
                tx
            })
            .subscribe()
    }

    /// The revocation that covers `svid`, if any: its serial, or its identity's rule.
    /// When both apply, the stricter wins: a renewable serial entry (a revoked grant) never hides
    /// an identity revocation. A rule still blocking covers every certificate of the identity,
    /// whatever its notBefore: this CA issues none while it blocks, but another domain's CA does
    /// (a federated identity revoked here stays refused here until the rule is lifted).
    pub fn status(&self, svid: &SvidInfo) -> Result<Option<RevocationRecord>, StoreError> {
        // A relayed entry covers only the identity it names: serials of two CAs can collide.
        let serial = self
            .store
            .revoked_serial(&svid.serial.to_hex())?
            .filter(|r| r.origin.is_empty() || r.spiffe_id == svid.spiffe_id.as_str());
        if let Some(r) = serial.as_ref().filter(|r| !r.renewable) {
            return Ok(Some(r.clone()));
        }
        let rule = self
            .store
            .identity_rule(svid.spiffe_id.as_str())?
            .filter(|rule| rule.blocked || svid.not_before < rule.before);
        Ok(rule.or(serial))
    }

    /// The blocking identity rule for `id`, if new certificates for it are refused.
    pub fn blocked(&self, id: &SpiffeId) -> Result<Option<RevocationRecord>, StoreError> {
        Ok(self.store.identity_rule(id.as_str())?.filter(|r| r.blocked))
    }

    /// The earliest notBefore a new certificate for `id` may carry: the `before` of a lifted
    /// identity rule. Issuance backdates notBefore for clock skew, which would otherwise put a
    /// certificate issued just after the lift under the rule ("notBefore < before") and so revoke
    /// it at birth. A blocked rule gives no floor: nothing may be issued then.
    pub fn not_before_floor(&self, id: &SpiffeId) -> Result<Option<i64>, StoreError> {
        Ok(self
            .store
            .identity_rule(id.as_str())?
            .filter(|r| !r.blocked)
            .map(|r| r.before))
    }

    /// The entry for one serial.
    pub fn check(&self, serial: &Serial) -> Result<Option<RevocationRecord>, StoreError> {
        self.store.revoked_serial(&serial.to_hex())
    }

    /// For a certificate just committed: if a blocking rule of its identity covers it (the
    /// identity was revoked while the certificate was being issued, after `revoke_identity`
    /// listed the identity's certificates), lists its serial too, so serial lookups and the CRL
    /// see it as the identity rule already does. Returns the rule.
    pub async fn cover_if_revoked(
        &self,
        svid: &SvidInfo,
    ) -> Result<Option<RevocationRecord>, RevocationError> {
        let Some(rule) = self
            .blocked(&svid.spiffe_id)?
            .filter(|r| svid.not_before < r.before)
        else {
            return Ok(None);
        };
        if self.store.revoked_serial(&svid.serial.to_hex())?.is_none() {
            let reason = format!(
                "{} (the identity was revoked while this certificate was being issued)",
                rule.reason
            );
            self.revoke_serial("lanyard", &svid.serial, &reason).await?;
        }
        Ok(Some(rule))
    }

    /// Revokes one certificate.
    pub async fn revoke_serial(
        &self,
        actor: &str,
        serial: &Serial,
        reason: &str,
    ) -> Result<Vec<RevocationRecord>, RevocationError> {
        let hex = serial.to_hex();
        let issued = self
            .store
            .issued(&hex)?
            .ok_or_else(|| RevocationError::UnknownSerial(hex.clone()))?;
        let now = unix_now();
        let entry = RevocationRecord {
            v: RECORD_VERSION,
            rev: 0,
            serial: hex.clone(),
            spiffe_id: issued.spiffe_id.clone(),
            identity_rule: false,
            before: 0,
            reason: reason.to_string(),
            revoked_at: now,
            expires_at: issued.not_after + self.grace.as_secs() as i64,
            blocked: false,
            renewable: false,
            origin: String::new(),
        };
        let event = Event::new(Kind::Revoked, actor)
            .subject(&issued.spiffe_id)
            .serial(&hex)
            .roles(issued.roles.clone())
            .not_after(issued.not_after)
            .reason(reason);
        let rec = self
            .log
            .record(event, vec![Write::PutRevocation(entry.clone())])
            .await?;
        info!(serial = %hex, spiffe_id = %issued.spiffe_id, "certificate revoked");
        Ok(vec![RevocationRecord {
            rev: rec.seq,
            ..entry
        }])
    }

    /// Revokes every certificate of `id` issued up to now and blocks new ones until lifted.
    pub async fn revoke_identity(
        &self,
        actor: &str,
        id: &SpiffeId,
        reason: &str,
    ) -> Result<Vec<RevocationRecord>, RevocationError> {
        let now = unix_now();
        // Certificates are backdated for clock skew; the rule covers every notBefore up to now,
        // so a certificate signed in the same second is covered too.
        let before = now + 1;
        let mut entries = vec![RevocationRecord {
            v: RECORD_VERSION,
            rev: 0,
            serial: String::new(),
            spiffe_id: id.to_string(),
            identity_rule: true,
            before,
            reason: reason.to_string(),
            revoked_at: now,
            // Blocked rules stay until lifted.
            expires_at: i64::MAX,
            blocked: true,
            renewable: false,
            origin: String::new(),
        }];
        // One serial entry per live certificate, kept until it could no longer renew.
        let serial_entry = |cert: crate::store::IssuedRecord| RevocationRecord {
            v: RECORD_VERSION,
            rev: 0,
            serial: cert.serial,
            spiffe_id: id.to_string(),
            identity_rule: false,
            before: 0,
            reason: reason.to_string(),
            revoked_at: now,
            expires_at: cert.not_after + self.grace.as_secs() as i64,
            blocked: false,
            renewable: false,
            origin: String::new(),
        };
        entries.extend(
            self.store
                .issued_for(id.as_str())?
                .into_iter()
                .map(serial_entry),
        );
        let event = Event::new(Kind::Revoked, actor)
            .subject(id.as_str())
            .reason(format!(
                "{reason} (identity; {} live certificates)",
                entries.len() - 1
            ));
        let writes = entries.iter().cloned().map(Write::PutRevocation).collect();
        let rec = self.log.record(event, writes).await?;
        info!(spiffe_id = %id, certs = entries.len() - 1, "identity revoked");
        let mut out: Vec<RevocationRecord> = entries
            .into_iter()
            .map(|e| RevocationRecord { rev: rec.seq, ..e })
            .collect();
        // With several replicas, another one may have committed a certificate of `id` after
        // the list above was read and before the rule: now that the rule is committed (and the
        // store shows everything committed before it), list again so serial-based consumers
        // (CRLs) get those too. The rule itself already covers them by notBefore.
        let late: Vec<RevocationRecord> = self
            .store
            .issued_for(id.as_str())?
            .into_iter()
            .filter(|c| !out.iter().any(|e| e.serial == c.serial))
            .map(serial_entry)
            .collect();
        if !late.is_empty() {
            let event = Event::new(Kind::Revoked, actor)
                .subject(id.as_str())
                .reason(format!(
                    "{reason} (identity; {} certificates issued concurrently)",
                    late.len()
                ));
            let writes = late.iter().cloned().map(Write::PutRevocation).collect();
            let rec = self.log.record(event, writes).await?;
            out.extend(
                late.into_iter()
                    .map(|e| RevocationRecord { rev: rec.seq, ..e }),
            );
        }
        Ok(out)
    }

    /// Lifts the block on `id`: new certificates may be issued again; old ones stay revoked
    /// until they would have expired.
    pub async fn lift(
        &self,
        actor: &str,
        id: &SpiffeId,
        reason: &str,
    ) -> Result<Vec<RevocationRecord>, RevocationError> {
        let rule = self
            .blocked(id)?
            .ok_or_else(|| RevocationError::NotRevoked(id.to_string()))?;
        let lifted = RevocationRecord {
            blocked: false,
            expires_at: rule.before + (self.max_lifetime + self.grace).as_secs() as i64,
            ..rule
        };
        let event = Event::new(Kind::RevocationLifted, actor)
            .subject(id.as_str())
            .reason(reason);
        let rec = self
            .log
            .record(event, vec![Write::PutRevocation(lifted.clone())])
            .await?;
        info!(spiffe_id = %id, "identity revocation lifted");
        Ok(vec![RevocationRecord {
            rev: rec.seq,
            ..lifted
        }])
    }

    /// A CRL signed by `authority` listing every revoked serial still alive, valid for
    /// `validity`. Built once per revision: cached per signer until a revocation newer than the
    /// ones it covers is in the store (one indexed range read that is empty in the steady
    /// state, so a fleet's `GetCrl` calls cost no scan and no signature) or half its validity
    /// has passed, or the earliest entry it lists has expired (pruning removes entries without
    /// a new revision). Serials are random and unique across CAs, so one list
    /// serves every CA of a rotation: each CA's CRL lists the serials its certificates may carry.
    pub fn crl(
        &self,
        authority: &Authority,
        validity: Duration,
    ) -> Result<Arc<Vec<u8>>, RevocationError> {
        let now = unix_now();
        let fingerprint = authority.fingerprint();
        let cached = {
            let mut caches = self.crl.lock().unwrap_or_else(|p| p.into_inner());
            // Signers no longer asked for (a rotation completed) drop out once stale.
            caches.retain(|_, c| c.next_update > now);
            caches
                .get(&fingerprint)
                .filter(|c| now < c.this_update + (c.next_update - c.this_update) / 2)
                .filter(|c| now <= c.earliest_expiry)
                .map(|c| (c.rev, c.der.clone()))
        };
        if let Some((rev, der)) = cached
            && self.store.revocations_since(rev)?.is_empty()
        {
            return Ok(der);
        }
        // Streamed from the index into the CRL's own encoding: a million entries cost their
        // ~36 bytes of DER each, not a record and an rcgen structure each.
        let mut rev = 0;
        let mut earliest_expiry = i64::MAX;
        let mut listed = CrlEntries::new();
        let mut bad_time = None;
        self.store.for_each_revocation(&mut |e| {
            rev = rev.max(e.rev);
            earliest_expiry = earliest_expiry.min(e.expires_at);
            // Relayed entries are other CAs' certificates: not this CA's to list.
            if e.identity_rule || e.relayed || bad_time.is_some() {
                return;
            }
            if let Some(serial) = e.serial_bytes()
                && let Err(err) = listed.push(serial, e.revoked_at)
            {
                bad_time = Some(err);
            }
        })?;
        if let Some(err) = bad_time {
            return Err(err.into());
        }
        let mut caches = self.crl.lock().unwrap_or_else(|p| p.into_inner());
        let cache = caches.get(&fingerprint);
        // Built by a concurrent caller while this one read the store: once per revision.
        if let Some(c) = cache
            && c.rev == rev
            && c.earliest_expiry == earliest_expiry
            && now < c.this_update + (c.next_update - c.this_update) / 2
        {
            return Ok(c.der.clone());
        }
        let this_update = now - 60;
        let next_update = now + validity.as_secs() as i64;
        // CRL numbers must increase; seconds since the epoch do, unless two CRLs share a second.
        let crl_number = cache.map_or(0, |c| c.number + 1).max(now as u64);
        let der =
            Arc::new(authority.sign_crl_entries(listed, crl_number, this_update, next_update)?);
        caches.insert(
            authority.fingerprint(),
            CachedCrl {
                rev,
                earliest_expiry,
                number: crl_number,
                this_update,
                next_update,
                der: der.clone(),
            },
        );
        Ok(der)
    }

    /// Relays revocations published by the CA of federated trust domain `td` (read from its
    /// `Revocation.Watch`), so this domain's workloads refuse those certificates too. An entry
    /// must concern an identity of `td` (a CA speaks for its own domain only) and never replaces
    /// one of this CA's own entries; anything else is skipped with a warning. The new or changed
    /// ones are committed with one `revocation_imported` event; returns how many.
    pub async fn import(
        &self,
        td: &TrustDomain,
        entries: Vec<RevocationRecord>,
    ) -> Result<usize, RevocationError> {
        let mut writes = Vec::new();
        for mut e in entries {
            let id_ok =
                SpiffeId::parse(&e.spiffe_id).is_ok_and(|id| id.trust_domain_name() == td.as_str());
            let serial_ok = e.identity_rule || Serial::parse_hex(&e.serial).is_some();
            if !id_ok || !serial_ok {
                warn!(trust_domain = %td, spiffe_id = %e.spiffe_id, serial = %e.serial, "skipping a relayed revocation outside the publishing domain");
                continue;
            }
            let existing = if e.identity_rule {
                self.store.identity_rule(&e.spiffe_id)?
            } else {
                self.store.revoked_serial(&e.serial)?
            };
            e.origin = td.to_string();
            e.rev = 0;
            e.renewable = false;
            match existing {
                Some(old) if old.origin.is_empty() => continue,
                Some(old)
                    if RevocationRecord {
                        rev: 0,
                        ..old.clone()
                    } == e =>
                {
                    continue;
                }
                _ => writes.push(Write::PutRevocation(e)),
            }
        }
        let n = writes.len();
        if n == 0 {
            return Ok(0);
        }
        let event = Event::new(Kind::RevocationImported, "lanyard")
            .subject(td.id_string())
            .reason(format!("{n} revocations relayed from the CA of {td}"));
        self.log.record(event, writes).await?;
        info!(trust_domain = %td, entries = n, "federated revocations relayed");
        Ok(n)
    }

    /// Lifts the relayed blocking identity rules of domains this CA no longer relays (`relayed`
    /// are the ones it still does): their CA can no longer lift them here. Like a lift, it keeps
    /// the certificates issued before the rule revoked until they would have expired. Relayed
    /// serial entries need nothing: they expire with their certificates. Run at start-up.
    pub async fn retire_relayed(&self, relayed: &[TrustDomain]) -> Result<usize, RevocationError> {
        // Identity rules only: a start-up must not scan every revoked serial.
        let stale: Vec<RevocationRecord> = self
            .store
            .identity_rules()?
            .into_iter()
            .filter(|r| r.blocked && !r.origin.is_empty())
            .filter(|r| !relayed.iter().any(|td| td.as_str() == r.origin))
            .collect();
        for rule in &stale {
            let lifted = RevocationRecord {
                blocked: false,
                expires_at: rule.before + (self.max_lifetime + self.grace).as_secs() as i64,
                ..rule.clone()
            };
            let event = Event::new(Kind::RevocationLifted, "lanyard")
                .subject(&rule.spiffe_id)
                .reason(format!(
                    "revocations of {} are no longer relayed ([[federation]] revocation_server removed)",
                    rule.origin
                ));
            self.log
                .record(event, vec![Write::PutRevocation(lifted)])
                .await?;
            info!(spiffe_id = %rule.spiffe_id, origin = %rule.origin, "relayed identity revocation retired");
        }
        Ok(stale.len())
    }

    /// Every live entry with `rev > since`.
    pub fn since(&self, since: u64) -> Result<Vec<RevocationRecord>, StoreError> {
        self.store.revocations_since(since)
    }

    /// About `limit` live entries with `rev > since`, ending on a whole revision (see
    /// [`Store::revocations_page`]); empty when none is left.
    pub fn page(&self, since: u64, limit: usize) -> Result<Vec<RevocationRecord>, StoreError> {
        self.store.revocations_page(since, limit)
    }

    /// The audit log the revocations are committed through (for live watch feeds).
    pub fn log(&self) -> &AuditLog {
        &self.log
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::store::SledStore;

    fn svid(id: &str, not_before: i64) -> SvidInfo {
        SvidInfo {
            spiffe_id: SpiffeId::parse(id).unwrap(),
            roles: vec![],
            serial: Serial::from_bytes(&[7]),
            not_before,
            not_after: not_before + 60,
        }
    }

    /// Revocations over a fresh store (5 s grace, 60 s longest lifetime).
    pub(super) fn fixture() -> (tempfile::TempDir, Revocations) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let revocations = Revocations::new(
            AuditLog::start(store).unwrap(),
            Duration::from_secs(5),
            Duration::from_secs(60),
        );
        (dir, revocations)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_committed_after_its_identity_was_revoked_is_listed_by_serial() {
        let (_dir, revocations) = fixture();
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/api").unwrap();
        let rule = revocations
            .revoke_identity("admin", &id, "host compromised")
            .await
            .unwrap();
        // The certificate an issuance in flight commits only now.
        let cert = svid(id.as_str(), rule[0].before - 10);
        revocations
            .log()
            .record(
                Event::new(Kind::Issued, "test"),
                vec![Write::PutIssued(
                    crate::store::IssuedRecord {
                        v: RECORD_VERSION,
                        spiffe_id: id.to_string(),
                        serial: cert.serial.to_hex(),
                        roles: vec![],
                        not_after: cert.not_after,
                    },
                    cert.not_after + 5,
                )],
            )
            .await
            .unwrap();
        assert!(revocations.check(&cert.serial).unwrap().is_none());
        let covering = revocations.cover_if_revoked(&cert).await.unwrap();
        assert_eq!(covering.unwrap().reason, "host compromised");
        let listed = revocations.check(&cert.serial).unwrap().expect("listed");
        assert!(
            listed
                .reason
                .contains("while this certificate was being issued")
        );
        // After a lift, a new certificate is not covered.
        revocations.lift("admin", &id, "rebuilt").await.unwrap();
        let fresh = svid(id.as_str(), unix_now() + 5);
        assert!(
            revocations
                .cover_if_revoked(&fresh)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocking_rule_covers_every_certificate_until_lifted() {
        let (_dir, revocations) = fixture();
        // A federated identity: its own CA keeps issuing after the revocation here.
        let id = SpiffeId::parse("spiffe://b.example/ops/eve").unwrap();
        let entries = revocations
            .revoke_identity("spiffe://a.example/lanyard/admin", &id, "key leak")
            .await
            .unwrap();
        let before = entries[0].before;
        let old = svid(id.as_str(), before - 10);
        let newer = svid(id.as_str(), before + 100);
        assert!(revocations.status(&old).unwrap().is_some());
        assert!(
            revocations.status(&newer).unwrap().is_some(),
            "a certificate issued after the revocation is covered while the rule blocks"
        );
        revocations.lift("admin", &id, "fixed").await.unwrap();
        assert!(revocations.status(&old).unwrap().is_some());
        assert!(revocations.status(&newer).unwrap().is_none());
    }
}

#[cfg(test)]
mod import_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::tests::fixture;
    use super::*;

    fn entry(serial: &str, id: &str, identity_rule: bool) -> RevocationRecord {
        RevocationRecord {
            v: RECORD_VERSION,
            rev: 9,
            serial: serial.into(),
            spiffe_id: id.into(),
            identity_rule,
            before: unix_now(),
            reason: "key leak".into(),
            revoked_at: unix_now(),
            expires_at: unix_now() + 600,
            blocked: identity_rule,
            renewable: false,
            origin: String::new(),
        }
    }

    fn svid(id: &str, serial: &[u8]) -> SvidInfo {
        SvidInfo {
            spiffe_id: SpiffeId::parse(id).unwrap(),
            roles: vec![],
            serial: Serial::from_bytes(serial),
            not_before: unix_now() - 30,
            not_after: unix_now() + 60,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_federated_ca_speaks_only_for_its_own_domain() {
        let (_dir, revocations) = fixture();
        let b = TrustDomain::new("b.example").unwrap();
        let n = revocations
            .import(
                &b,
                vec![
                    entry("0a0b", "spiffe://b.example/db", false),
                    entry("", "spiffe://b.example/ops/eve", true),
                    // Not b.example's to revoke:
                    entry("0c0d", "spiffe://example.org/api", false),
                    entry("", "spiffe://example.org/web", true),
                ],
            )
            .await
            .unwrap();
        assert_eq!(n, 2);
        let db = revocations
            .status(&svid("spiffe://b.example/db", &[0x0a, 0x0b]))
            .unwrap()
            .expect("relayed");
        assert_eq!(db.origin, "b.example");
        assert!(
            revocations
                .status(&svid("spiffe://b.example/ops/eve", &[1]))
                .unwrap()
                .is_some()
        );
        assert!(
            revocations
                .status(&svid("spiffe://example.org/api", &[0x0c, 0x0d]))
                .unwrap()
                .is_none()
        );
        assert!(
            revocations
                .status(&svid("spiffe://example.org/web", &[2]))
                .unwrap()
                .is_none()
        );
        // A relayed serial covers only the identity it names: a colliding serial of another
        // identity is untouched.
        assert!(
            revocations
                .status(&svid("spiffe://b.example/other", &[0x0a, 0x0b]))
                .unwrap()
                .is_none()
        );
        // The same entries again change nothing; this CA's own rule is never replaced.
        let again = revocations
            .import(&b, vec![entry("0a0b", "spiffe://b.example/db", false)])
            .await
            .unwrap();
        assert_eq!(again, 0);
        let eve = SpiffeId::parse("spiffe://b.example/ops/eve").unwrap();
        revocations
            .revoke_identity("admin", &eve, "ours")
            .await
            .unwrap();
        revocations
            .import(&b, vec![entry("", "spiffe://b.example/ops/eve", true)])
            .await
            .unwrap();
        assert_eq!(revocations.blocked(&eve).unwrap().unwrap().reason, "ours");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relayed_blocks_are_lifted_once_their_domain_is_no_longer_relayed() {
        let (_dir, revocations) = fixture();
        let b = TrustDomain::new("b.example").unwrap();
        let c = TrustDomain::new("c.example").unwrap();
        revocations
            .import(&b, vec![entry("", "spiffe://b.example/ops/eve", true)])
            .await
            .unwrap();
        revocations
            .import(&c, vec![entry("", "spiffe://c.example/ops/mallory", true)])
            .await
            .unwrap();
        let local = SpiffeId::parse("spiffe://c.example/ops/local").unwrap();
        revocations
            .revoke_identity("admin", &local, "ours")
            .await
            .unwrap();
        // Still relaying b.example, no longer c.example.
        assert_eq!(
            revocations
                .retire_relayed(std::slice::from_ref(&b))
                .await
                .unwrap(),
            1
        );
        let blocked = |id: &str| {
            revocations
                .blocked(&SpiffeId::parse(id).unwrap())
                .unwrap()
                .is_some()
        };
        assert!(blocked("spiffe://b.example/ops/eve"));
        assert!(!blocked("spiffe://c.example/ops/mallory"));
        assert!(
            blocked("spiffe://c.example/ops/local"),
            "this CA's own rule stays"
        );
    }
}
