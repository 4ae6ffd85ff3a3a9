//! `lanyard.v1.Audit`.

use std::pin::Pin;

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::{Authenticator, status};
use crate::audit::{AuditLog, Event, Kind};
use crate::pb::v1::{self as pb, audit_server::Audit};
use crate::policy::{ROLE_ADMIN, ROLE_AUDITOR};
use crate::store::AuditRecord;

/// The Audit service.
pub struct AuditService {
    log: AuditLog,
    auth: Authenticator,
    /// Ends follow streams when the server stops, so graceful shutdown does not wait forever.
    shutdown: watch::Receiver<bool>,
}

impl AuditService {
    /// Wires the service.
    pub fn new(log: AuditLog, auth: Authenticator, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            log,
            auth,
            shutdown,
        }
    }
}

/// Converts a stored record to its wire form.
pub fn to_proto(r: AuditRecord) -> pb::AuditEvent {
    pb::AuditEvent {
        seq: r.seq,
        time_ms: r.time_ms,
        kind: r.kind,
        actor: r.actor,
        subject: r.subject,
        serial: r.serial,
        roles: r.roles,
        not_after: r.not_after,
        reason: r.reason,
        claimed: r.claimed,
        prev_hash: r.prev_hash.to_vec(),
        hash: r.hash.to_vec(),
    }
}

/// Converts a wire event back to a record (for chain verification on the client).
pub fn from_proto(e: pb::AuditEvent) -> Option<AuditRecord> {
    Some(AuditRecord {
        v: crate::store::RECORD_VERSION,
        seq: e.seq,
        time_ms: e.time_ms,
        kind: e.kind,
        actor: e.actor,
        subject: e.subject,
        serial: e.serial,
        roles: e.roles,
        not_after: e.not_after,
        reason: e.reason,
        claimed: e.claimed,
        prev_hash: e.prev_hash.try_into().ok()?,
        hash: e.hash.try_into().ok()?,
    })
}

#[tonic::async_trait]
impl Audit for AuditService {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let who = self
            .auth
            .require_role(&req, &[ROLE_AUDITOR, ROLE_ADMIN])
            .map_err(status::auth)?;
        let b = req.into_inner();
        let mut sub = self.log.subscribe(b.from_seq);
        let (tx, rx) = mpsc::channel(256);
        let kinds = b.kinds;
        let id = b.spiffe_id;
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    r = sub.next(b.follow) => r,
                    () = tx.closed() => break,
                    () = crate::server::stopped(&mut shutdown) => break,
                };
                match next {
                    Ok(Some(r)) => {
                        if (!kinds.is_empty() && !kinds.contains(&r.kind))
                            || (!id.is_empty() && r.subject != id && r.actor != id)
                        {
                            continue;
                        }
                        // A full channel applies backpressure to this subscriber only: the
                        // writer never waits for it, and it resumes from the store.
                        if tx.send(Ok(to_proto(r))).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(status::audit(e))).await;
                        break;
                    }
                }
            }
            debug!(subscriber = %who.spiffe_id, "audit subscription ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn prune(
        &self,
        req: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        let who = self
            .auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let actor = who.spiffe_id.to_string();
        let b = req.into_inner();
        let hash: [u8; 32] = b.hash.as_slice().try_into().map_err(|_| {
            Status::invalid_argument(format!(
                "hash must be 32 bytes (the archive's last event hash), got {}",
                b.hash.len()
            ))
        })?;
        if b.through_seq == 0 {
            return Err(Status::invalid_argument(
                "through_seq must be the last archived event's seq (1 or more)",
            ));
        }
        let store = self.log.store().clone();
        let through = b.through_seq;
        // Check before recording, so a wrong archive is refused (and audited as such) without
        // an `audit_archived` event that did not happen.
        let (at, checkpoint) = tokio::task::spawn_blocking({
            let store = store.clone();
            move || {
                Ok::<_, crate::store::StoreError>((
                    store.read_audit(through, 1),
                    store.audit_checkpoint()?,
                ))
            }
        })
        .await
        .map_err(|_| status::internal_error("prune check task failed"))?
        .map_err(status::store)?;
        let refusal = match (&at, checkpoint) {
            (_, Some((c, _))) if through <= c => {
                Some(format!("events up to #{c} are already archived"))
            }
            (Ok(recs), _) => match recs.first() {
                Some(r) if r.seq == through && r.hash == hash => None,
                Some(r) if r.seq == through => Some(format!(
                    "the archive's last hash differs from the log's event #{through}: the archive is not of this log"
                )),
                _ => Some(format!("event #{through} is not in the log")),
            },
            (Err(e), _) => Some(e.to_string()),
        };
        if let Some(why) = refusal {
            let event =
                Event::new(Kind::Denied, &actor).reason(format!("audit prune refused: {why}"));
            self.log
                .record(event, vec![])
                .await
                .map_err(status::audit)?;
            return Err(Status::failed_precondition(format!(
                "cannot prune the audit log: {why}"
            )));
        }
        let event = Event::new(Kind::AuditArchived, &actor).reason(format!(
            "events up to #{through} archived (last hash {}); deleting them from the store",
            crate::encoding::hex(&hash)
        ));
        self.log
            .record(event, vec![])
            .await
            .map_err(status::audit)?;
        let deleted = tokio::task::spawn_blocking(move || store.truncate_audit(through, hash))
            .await
            .map_err(|_| status::internal_error("prune task failed"))?
            .map_err(status::store)?;
        info!(actor = %actor, through_seq = through, deleted, "archived audit events pruned");
        Ok(Response::new(pb::PruneResponse {
            deleted: deleted as u64,
            checkpoint_seq: through,
        }))
    }
}
