//! `lanyard.v1.Ca`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{Authenticator, status};
use crate::issuance::{Issuance, IssueRequest, Issued};
use crate::pb::v1::{self as pb, ca_server::Ca};

/// The Ca service.
pub struct CaService {
    issuance: Arc<Issuance>,
    auth: Authenticator,
}

impl CaService {
    /// Wires the service.
    pub fn new(issuance: Arc<Issuance>, auth: Authenticator) -> Self {
        Self { issuance, auth }
    }
}

#[tonic::async_trait]
impl Ca for CaService {
    #[instrument(skip_all, fields(mode))]
    async fn issue(
        &self,
        req: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let body = req.get_ref();
        let ask = IssueRequest {
            csr: body.csr.clone(),
            ttl: (body.ttl_seconds > 0).then(|| Duration::from_secs(body.ttl_seconds.into())),
            roles: body.roles.clone(),
        };
        let issued = if body.join_token.is_empty() {
            tracing::Span::current().record("mode", "renew");
            let peer = match self.auth.peer(&req, true) {
                Ok(p) => p,
                Err(e) => {
                    let actor = req
                        .peer_certs()
                        .and_then(|c| c.first().cloned())
                        .and_then(|c| {
                            crate::ca::parse_svid(&c, self.issuance.authority().roles_oid()).ok()
                        })
                        .map_or_else(
                            || "unauthenticated".to_string(),
                            |s| s.spiffe_id.to_string(),
                        );
                    let status = status::auth(e);
                    self.issuance
                        .deny(
                            &actor,
                            &actor,
                            crate::issuance::IssueError::Unauthenticated(
                                status.message().to_string(),
                            ),
                        )
                        .await;
                    return Err(status);
                }
            };
            self.issuance.renew(&peer, ask).await
        } else {
            tracing::Span::current().record("mode", "token");
            self.issuance.with_token(&body.join_token, ask).await
        }
        .map_err(status::issue)?;
        Ok(Response::new(to_proto(issued)))
    }

    async fn get_trust_bundle(
        &self,
        _req: Request<pb::GetTrustBundleRequest>,
    ) -> Result<Response<pb::TrustBundle>, Status> {
        let a = self.issuance.authority();
        Ok(Response::new(pb::TrustBundle {
            trust_domain: a.trust_domain().to_string(),
            ca_certs: vec![a.root().to_vec()],
        }))
    }
}

fn to_proto(i: Issued) -> pb::IssueResponse {
    pb::IssueResponse {
        cert_chain: i.chain.iter().map(|c| c.to_vec()).collect(),
        trust_bundle: i.bundle.iter().map(|c| c.to_vec()).collect(),
        spiffe_id: i.svid.spiffe_id.to_string(),
        roles: i.svid.roles,
        serial: i.svid.serial.to_hex(),
        not_before: i.svid.not_before,
        not_after: i.svid.not_after,
    }
}
