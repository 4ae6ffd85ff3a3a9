//! `lanyard.v1.Admin`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Authenticator, status};
use crate::issuance::{Issuance, TokenSpec};
use crate::pb::v1::{self as pb, admin_server::Admin};
use crate::policy::ROLE_ADMIN;

/// The Admin service.
pub struct AdminService {
    issuance: Arc<Issuance>,
    auth: Authenticator,
}

impl AdminService {
    /// Wires the service.
    pub fn new(issuance: Arc<Issuance>, auth: Authenticator) -> Self {
        Self { issuance, auth }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let admin = self
            .auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let b = req.into_inner();
        let secs = |s: u32| (s > 0).then(|| Duration::from_secs(s.into()));
        let (token, record) = self
            .issuance
            .create_token(
                admin.spiffe_id.as_str(),
                TokenSpec {
                    spiffe_id: b.spiffe_id,
                    roles: b.roles,
                    max_ttl: secs(b.max_ttl_seconds),
                    expires_in: secs(b.expires_in_seconds),
                    uses: b.uses.max(1),
                },
            )
            .await
            .map_err(status::issue)?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            token_id: record.id,
            expires_at: record.expires_at,
        }))
    }
}
