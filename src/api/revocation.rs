//! `lanyard.v1.Revocation`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};

use super::auth::ConnAuth;
use super::{Authenticator, status};
use crate::ca::{CaHandle, Serial};
use crate::pb::v1::{self as pb, revocation_server::Revocation, revoke_request::Target};
use crate::policy::ROLE_ADMIN;
use crate::revocation::Revocations;
use crate::spiffe::SpiffeId;
use crate::store::RevocationRecord;

/// The Revocation service.
pub struct RevocationService {
    revocations: Arc<Revocations>,
    /// The CAs in force: CRLs are signed by the active one.
    authority: CaHandle,
    auth: Authenticator,
    crl_validity: Duration,
    /// Ends watch streams when the server stops, so graceful shutdown does not wait forever.
    shutdown: watch::Receiver<bool>,
}

impl RevocationService {
    /// Wires the service.
    pub fn new(
        revocations: Arc<Revocations>,
        authority: CaHandle,
        auth: Authenticator,
        crl_validity: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            revocations,
            authority,
            auth,
            crl_validity,
            shutdown,
        }
    }
}

/// Converts a stored entry to its wire form.
pub fn to_proto(r: RevocationRecord) -> pb::RevocationEntry {
    pb::RevocationEntry {
        rev: r.rev,
        serial: r.serial,
        spiffe_id: r.spiffe_id,
        identity_rule: r.identity_rule,
        before: r.before,
        reason: r.reason,
        revoked_at: r.revoked_at,
        expires_at: r.expires_at,
        blocked: r.blocked,
        trust_domain: r.origin,
    }
}

#[tonic::async_trait]
impl Revocation for RevocationService {
    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let admin = self
            .auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let b = req.into_inner();
        let actor = admin.spiffe_id.as_str();
        let reason = b.reason.trim();
        if reason.is_empty() {
            return Err(Status::invalid_argument("a reason is required (--reason)"));
        }
        if reason.len() > 1024 {
            return Err(Status::invalid_argument("reason is longer than 1024 bytes"));
        }
        let entries = match b.target {
            Some(Target::Serial(s)) => {
                if b.lift {
                    return Err(Status::invalid_argument(
                        "--lift applies to --spiffe-id, not --serial",
                    ));
                }
                let serial = Serial::parse_hex(&s).ok_or_else(|| {
                    Status::invalid_argument(format!("{s:?} is not a hex serial number"))
                })?;
                self.revocations.revoke_serial(actor, &serial, reason).await
            }
            Some(Target::SpiffeId(id)) => {
                let id =
                    SpiffeId::parse(&id).map_err(|e| Status::invalid_argument(e.to_string()))?;
                if b.lift {
                    self.revocations.lift(actor, &id, reason).await
                } else {
                    if crate::policy::is_reserved(&id)
                        && id.is_in(self.authority.active().trust_domain())
                    {
                        return Err(Status::invalid_argument(format!(
                            "{id} is reserved for the CA itself and cannot be revoked by identity: that would lock the CA out of its own admin API or serving identity for good. Revoke a leaked certificate by --serial instead (and if an identity rule on a reserved ID exists from an older version, stop the CA and run `lanyard admin recover`)"
                        )));
                    }
                    self.revocations.revoke_identity(actor, &id, reason).await
                }
            }
            None => {
                return Err(Status::invalid_argument(
                    "name a --serial or a --spiffe-id to revoke",
                ));
            }
        }
        .map_err(status::revocation)?;
        Ok(Response::new(pb::RevokeResponse {
            entries: entries.into_iter().map(to_proto).collect(),
        }))
    }

    async fn check(
        &self,
        req: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        self.auth.peer(&req, false).map_err(status::auth)?;
        let s = &req.get_ref().serial;
        let serial = Serial::parse_hex(s)
            .ok_or_else(|| Status::invalid_argument(format!("{s:?} is not a hex serial number")))?;
        let entry = self.revocations.check(&serial).map_err(status::store)?;
        Ok(Response::new(pb::CheckResponse {
            revoked: entry.is_some(),
            entry: entry.map(to_proto),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationEntry, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Any identity of this domain; and the CA of a federated domain (its serving identity,
        // `/lanyard/server`), which relays this CA's own revocations to its workloads.
        let caller = self.auth.peer_any_domain(&req).map_err(status::auth)?;
        let conn = req.extensions().get::<Arc<ConnAuth>>().cloned();
        let td = self.authority.active().trust_domain().to_string();
        let foreign = caller.spiffe_id.trust_domain_name() != td;
        if foreign && caller.spiffe_id.path() != "/lanyard/server" {
            return Err(Status::permission_denied(format!(
                "{} may not watch the revocations of {td}: of a federated domain, only its CA (spiffe://<td>/lanyard/server) may",
                caller.spiffe_id
            )));
        }
        // A federated CA gets this CA's own entries only: trust is not transitive.
        let relay = move |r: &RevocationRecord| !foreign || r.origin.is_empty();
        let since = req.get_ref().since;
        // Subscribe before the snapshot so nothing committed in between is missed.
        // Revocation commits only: watchers do not wake for every issuance.
        let live = self.revocations.live();
        // No task and no channel per stream: the stream itself reads the feed, so an idle
        // watcher (one per connected agent) costs the CA only its receiver.
        let state = WatchState {
            revocations: self.revocations.clone(),
            live,
            shutdown: self.shutdown.clone(),
            caller,
            conn,
            relay: Box::new(relay),
            sent: since,
            resync: true,
            pending: std::collections::VecDeque::new(),
            done: false,
        };
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            state,
            |mut st| async move {
                let item = st.next().await?;
                Some((item, st))
            },
        ))))
    }

    async fn get_crl(&self, _req: Request<pb::GetCrlRequest>) -> Result<Response<pb::Crl>, Status> {
        let cas = self.authority.current();
        let der = self
            .revocations
            .crl(cas.active(), self.crl_validity)
            .map_err(status::revocation)?;
        let retiring = match cas.retiring() {
            Some(old) => vec![
                self.revocations
                    .crl(old, self.crl_validity)
                    .map_err(status::revocation)?
                    .to_vec(),
            ],
            None => Vec::new(),
        };
        Ok(Response::new(pb::Crl {
            der: der.to_vec(),
            retiring,
        }))
    }
}

/// Whether entry `r` (this CA's own, not relayed) revokes `svid`.
fn covers(r: &RevocationRecord, svid: &crate::ca::SvidInfo) -> bool {
    if !r.origin.is_empty() {
        return false;
    }
    if r.identity_rule {
        r.spiffe_id == svid.spiffe_id.as_str() && (r.blocked || svid.not_before < r.before)
    } else {
        r.serial.eq_ignore_ascii_case(&svid.serial.to_hex())
    }
}

/// Entries a `Revocation.Watch` reads from the store at once while catching up.
const WATCH_PAGE: usize = 1024;

/// One `Revocation.Watch` stream: a snapshot from the store, then the revocation feed.
struct WatchState {
    revocations: Arc<Revocations>,
    live: broadcast::Receiver<Option<Arc<crate::audit::Committed>>>,
    shutdown: watch::Receiver<bool>,
    /// The certificate that authenticated the caller when the stream opened.
    caller: crate::ca::SvidInfo,
    /// The connection's authentication state: a renewal on the connection since the stream
    /// opened makes the certificate it issued the one that counts (decision 65).
    conn: Option<Arc<ConnAuth>>,
    /// Whether an entry goes to this caller (a federated CA gets this CA's own only).
    relay: Box<dyn Fn(&RevocationRecord) -> bool + Send + Sync>,
    /// The highest revision sent.
    sent: u64,
    /// Read the store from `sent` before following the feed (at start, and after lagging).
    resync: bool,
    pending: std::collections::VecDeque<Result<pb::RevocationEntry, Status>>,
    done: bool,
}

impl WatchState {
    /// The next message, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Result<pb::RevocationEntry, Status>> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Some(m);
            }
            if self.done {
                return None;
            }
            if self.resync {
                self.resync = false;
                // A page at a time, each sent before the next is read: a watcher from 0 over a
                // million entries holds a page, not the whole store, and a slow reader holds
                // nothing more than its page.
                match self.revocations.page(self.sent, WATCH_PAGE) {
                    Ok(page) if page.is_empty() => {}
                    Ok(page) => {
                        self.resync = true;
                        for r in page {
                            self.sent = self.sent.max(r.rev);
                            if (self.relay)(&r) {
                                self.pending.push_back(Ok(to_proto(r)));
                            }
                        }
                    }
                    Err(e) => {
                        self.done = true;
                        self.pending.push_back(Err(status::store(e)));
                    }
                }
                continue;
            }
            let c = tokio::select! {
                c = self.live.recv() => c,
                () = crate::server::stopped(&mut self.shutdown) => return None,
            };
            match c {
                Ok(None) | Err(broadcast::error::RecvError::Lagged(_)) => self.resync = true,
                Err(broadcast::error::RecvError::Closed) => return None,
                Ok(Some(c)) => {
                    if c.record.seq <= self.sent {
                        continue;
                    }
                    for r in c.revocations.iter().filter(|r| (self.relay)(r)) {
                        self.pending.push_back(Ok(to_proto(r.clone())));
                    }
                    if !c.revocations.is_empty() {
                        self.sent = c.record.seq;
                    }
                    // The certificate that authenticates this connection now (the newest one a
                    // renewal bound to it, else the one it opened with) is revoked (by serial
                    // or identity): after the entries that say so, the stream ends, as every
                    // later call on the connection is refused, so a revoked credential cannot
                    // keep listening.
                    // Judged from the entries in hand, not the store: 10,000 watchers must not
                    // cost 10,000 store reads per revocation.
                    if c.revocations.is_empty() {
                        continue;
                    }
                    let current = self.conn.as_ref().and_then(|c| c.bound_svid());
                    let current = current.as_ref().unwrap_or(&self.caller);
                    if let Some(r) = c.revocations.iter().find(|r| covers(r, current)) {
                        self.done = true;
                        self.pending
                            .push_back(Err(Status::failed_precondition(format!(
                                "certificate {} is revoked: {}",
                                current.serial, r.reason
                            ))));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::audit::{AuditLog, Event, Kind};
    use crate::store::{RECORD_VERSION, SledStore, Store, Write};
    use crate::tls::unix_now;

    fn entry(serial: String) -> RevocationRecord {
        RevocationRecord {
            v: RECORD_VERSION,
            rev: 0,
            serial,
            spiffe_id: "spiffe://example.org/ns/a".into(),
            identity_rule: false,
            before: 0,
            reason: "key leak".into(),
            revoked_at: unix_now(),
            expires_at: unix_now() + 600,
            blocked: false,
            renewable: false,
            origin: String::new(),
        }
    }

    /// A watcher from 0 over more entries than a page gets every one once, in rev order, and
    /// then follows the live feed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_from_zero_streams_every_page_then_follows_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let revocations = Arc::new(Revocations::new(
            AuditLog::start(store).unwrap(),
            Duration::from_secs(5),
            Duration::from_secs(60),
        ));
        // Commits of 700 entries: pages of 1024 end on whole commits, so they hold 1400.
        let mut expected = Vec::new();
        for c in 0..4u32 {
            let writes: Vec<Write> = (0..700u32)
                .map(|i| Write::PutRevocation(entry(format!("{:08x}", c * 1000 + i + 1))))
                .collect();
            expected.extend((0..700u32).map(|i| format!("{:08x}", c * 1000 + i + 1)));
            revocations
                .log()
                .record(Event::new(Kind::Revoked, "test"), writes)
                .await
                .unwrap();
        }
        let (_stop, shutdown) = watch::channel(false);
        let mut st = WatchState {
            revocations: revocations.clone(),
            live: revocations.live(),
            shutdown,
            caller: crate::ca::SvidInfo {
                spiffe_id: SpiffeId::parse("spiffe://example.org/ns/watcher").unwrap(),
                roles: vec![],
                serial: Serial::from_bytes(&[0x77]),
                not_before: unix_now() - 10,
                not_after: unix_now() + 60,
            },
            conn: None,
            relay: Box::new(|_| true),
            sent: 0,
            resync: true,
            pending: std::collections::VecDeque::new(),
            done: false,
        };
        let mut got = Vec::new();
        let mut last_rev = 0;
        while got.len() < expected.len() {
            let e = st.next().await.unwrap().unwrap();
            assert!(e.rev >= last_rev);
            last_rev = e.rev;
            got.push(e.serial);
            // Never more than a page (here: two commits) read ahead of what was sent.
            assert!(st.pending.len() <= 1400);
        }
        assert_eq!(got, expected);
        // The live feed after the store: a new revocation arrives, nothing is repeated.
        revocations
            .log()
            .record(
                Event::new(Kind::Revoked, "test"),
                vec![Write::PutRevocation(entry("0000ffff".into()))],
            )
            .await
            .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), st.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(next.serial, "0000ffff");
    }
}
