//! `lanyard.v1.Admin`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Authenticator, status};
use crate::federation::{BundleHub, Change, SpiffeBundle};
use crate::issuance::{Issuance, TokenSpec};
use crate::pb::v1::{self as pb, admin_server::Admin};
use crate::policy::ROLE_ADMIN;
use crate::spiffe::TrustDomain;

/// The Admin service.
pub struct AdminService {
    issuance: Arc<Issuance>,
    auth: Authenticator,
    bundles: Arc<BundleHub>,
}

impl AdminService {
    /// Wires the service.
    pub fn new(issuance: Arc<Issuance>, auth: Authenticator, bundles: Arc<BundleHub>) -> Self {
        Self {
            issuance,
            auth,
            bundles,
        }
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

    async fn import_bundle(
        &self,
        req: Request<pb::ImportBundleRequest>,
    ) -> Result<Response<pb::ImportBundleResponse>, Status> {
        let admin = self
            .auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let b = req.into_inner();
        let td = TrustDomain::new(b.trust_domain.trim())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let bundle = SpiffeBundle::decode_any(td, &b.bundle)
            .map_err(|e| status::federation(e.into()))?;
        let (authorities, sequence) = (bundle.authorities().len(), bundle.sequence());
        let change = self
            .bundles
            .update_federated(
                bundle,
                admin.spiffe_id.as_str(),
                &format!("import by {}", admin.spiffe_id),
            )
            .await
            .map_err(status::federation)?;
        Ok(Response::new(pb::ImportBundleResponse {
            authorities: authorities as u32,
            sequence: sequence.unwrap_or(0),
            changed: change == Change::Authorities,
        }))
    }

    async fn rotate_ca(
        &self,
        req: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        Err(Status::unimplemented("CA rotation is not available yet"))
    }

    async fn get_ca_status(
        &self,
        req: Request<pb::GetCaStatusRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        Err(Status::unimplemented("CA rotation is not available yet"))
    }
}
