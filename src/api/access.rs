//! `lanyard.v1.Access`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{Authenticator, MessageStream, status, stream_latest};
use crate::access::{Access, ForeignGrants};
use crate::ca::SvidInfo;
use crate::pb::v1::{self as pb, access_server::Access as AccessRpc};
use crate::store::AccessRecord;

/// The Access service. Identities of federated trust domains may call it (to request access
/// for themselves, list and withdraw their requests); their roles are not honoured here.
pub struct AccessService {
    access: Arc<Access>,
    auth: Authenticator,
    /// Ends grant watch streams when the server stops.
    shutdown: watch::Receiver<bool>,
}

impl AccessService {
    /// Wires the service.
    pub fn new(access: Arc<Access>, auth: Authenticator, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            access,
            auth,
            shutdown,
        }
    }
}

type Decided<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<AccessRecord, crate::access::AccessError>>
            + Send
            + 'a,
    >,
>;

impl AccessService {
    /// Authenticates the caller, then runs one decision (approve, deny, revoke) on a request.
    async fn decide<F>(
        &self,
        req: Request<pb::AccessDecision>,
        op: F,
    ) -> Result<Response<pb::AccessRequest>, Status>
    where
        F: for<'a> FnOnce(&'a Access, &'a SvidInfo, &'a pb::AccessDecision) -> Decided<'a>,
    {
        let caller = self.auth.peer_any_domain(&req).map_err(status::auth)?;
        let decision = req.into_inner();
        let r = op(&self.access, &caller, &decision)
            .await
            .map_err(status::access)?;
        Ok(Response::new(to_proto(r)))
    }
}

/// Converts a stored record to its wire form.
pub fn to_proto(r: AccessRecord) -> pb::AccessRequest {
    pb::AccessRequest {
        id: r.id,
        spiffe_id: r.spiffe_id,
        roles: r.roles,
        duration_seconds: r.duration_secs.min(u64::from(u32::MAX)) as u32,
        reason: r.reason,
        requester: r.requester,
        created_at: r.created_at,
        state: r.state,
        approvals: r
            .approvals
            .into_iter()
            .map(|a| pb::Approval {
                approver: a.approver,
                comment: a.comment,
                at: a.at,
            })
            .collect(),
        approvals_needed: r.approvals_needed,
        expires_at: r.expires_at,
        granted_at: r.granted_at,
        closed_by: r.closed_by,
        close_reason: r.close_reason,
    }
}

#[tonic::async_trait]
impl AccessRpc for AccessService {
    async fn request(
        &self,
        req: Request<pb::AccessRequestCreate>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        let caller = self.auth.peer_any_domain(&req).map_err(status::auth)?;
        let b = req.into_inner();
        let r = self
            .access
            .request(
                &caller,
                &b.spiffe_id,
                &b.roles,
                Duration::from_secs(b.duration_seconds.into()),
                &b.reason,
            )
            .await
            .map_err(status::access)?;
        Ok(Response::new(to_proto(r)))
    }

    async fn list(
        &self,
        req: Request<pb::AccessListRequest>,
    ) -> Result<Response<pb::AccessListResponse>, Status> {
        let caller = self.auth.peer_any_domain(&req).map_err(status::auth)?;
        let b = req.into_inner();
        let requests = self
            .access
            .list(&caller, b.pending_only, &b.spiffe_id)
            .await
            .into_iter()
            .map(to_proto)
            .collect();
        Ok(Response::new(pb::AccessListResponse { requests }))
    }

    async fn approve(
        &self,
        req: Request<pb::AccessDecision>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        self.decide(req, |a, caller, d| {
            Box::pin(a.approve(caller, &d.id, &d.comment))
        })
        .await
    }

    async fn deny(
        &self,
        req: Request<pb::AccessDecision>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        self.decide(req, |a, caller, d| {
            Box::pin(a.deny(caller, &d.id, &d.comment))
        })
        .await
    }

    async fn revoke(
        &self,
        req: Request<pb::AccessDecision>,
    ) -> Result<Response<pb::AccessRequest>, Status> {
        self.decide(req, |a, caller, d| {
            Box::pin(a.revoke(caller, &d.id, &d.comment))
        })
        .await
    }

    type WatchGrantsStream = MessageStream<pb::GrantSnapshot>;

    async fn watch_grants(
        &self,
        req: Request<pb::WatchGrantsRequest>,
    ) -> Result<Response<Self::WatchGrantsStream>, Status> {
        // Local identities only: the feed tells this domain's services whom to admit.
        self.auth.peer(&req, false).map_err(status::auth)?;
        Ok(Response::new(stream_latest(
            self.access.foreign_grants(),
            self.shutdown.clone(),
            |g: &Arc<ForeignGrants>| grants_proto(g),
        )))
    }
}

/// The wire form of the foreign grants.
fn grants_proto(g: &ForeignGrants) -> pb::GrantSnapshot {
    pb::GrantSnapshot {
        grants: g
            .by_subject
            .iter()
            .flat_map(|(subject, gs)| {
                gs.iter().map(move |g| pb::ActiveGrant {
                    id: g.id.clone(),
                    spiffe_id: subject.clone(),
                    roles: g.roles.clone(),
                    ends_at: g.ends_at,
                })
            })
            .collect(),
        revision: g.revision,
    }
}
