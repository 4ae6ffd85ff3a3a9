//! `lanyard.v1.Admin`.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::{Authenticator, status};
use crate::encoding::hex;
use crate::federation::{BundleHub, Change, Origin, SpiffeBundle};
use crate::issuance::{Issuance, TokenSpec};
use crate::pb::v1::{self as pb, admin_server::Admin};
use crate::policy::ROLE_ADMIN;
use crate::replicas::Replicas;
use crate::rotation::{Rotation, RotationError, Status as RotationStatus};
use crate::spiffe::TrustDomain;
use crate::store::TokenRecord;

/// The Admin service.
pub struct AdminService {
    issuance: Arc<Issuance>,
    auth: Authenticator,
    bundles: Arc<BundleHub>,
    rotation: Arc<Rotation>,
    replicas: Arc<Replicas>,
}

impl AdminService {
    /// Wires the service.
    pub fn new(
        issuance: Arc<Issuance>,
        auth: Authenticator,
        bundles: Arc<BundleHub>,
        rotation: Arc<Rotation>,
        replicas: Arc<Replicas>,
    ) -> Self {
        Self {
            issuance,
            auth,
            bundles,
            rotation,
            replicas,
        }
    }

    fn ca_status(&self, s: RotationStatus) -> pb::CaStatus {
        pb::CaStatus {
            phase: s.phase.as_str().into(),
            active_fingerprint: hex(&s.active),
            staged_fingerprint: s.staged.map(|f| hex(&f)).unwrap_or_default(),
            retiring_fingerprint: s.retiring.map(|f| hex(&f)).unwrap_or_default(),
            switch_at: s.switch_at.unwrap_or(0),
            drop_at: s.drop_at.unwrap_or(0),
            sequence: self.bundles.current().own.sequence().unwrap_or(0),
        }
    }
}

/// What an admin sees of a token: everything but the secret's hash.
fn token_info(t: &TokenRecord) -> pb::JoinTokenInfo {
    pb::JoinTokenInfo {
        token_id: t.id.clone(),
        spiffe_id: t.spiffe_id.clone(),
        roles: t.roles.clone(),
        max_ttl_seconds: t.max_ttl,
        expires_at: t.expires_at,
        uses_left: t.uses_left,
        created_by: t.created_by.clone(),
        revoked_by: t.revoked.as_ref().map(|r| r.by.clone()).unwrap_or_default(),
        revoked_at: t.revoked.as_ref().map_or(0, |r| r.at),
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

    async fn list_join_tokens(
        &self,
        req: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        let admin = self
            .auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let tokens = self
            .issuance
            .list_tokens(admin.spiffe_id.as_str())
            .await
            .map_err(status::issue)?;
        Ok(Response::new(pb::ListJoinTokensResponse {
            tokens: tokens.iter().map(token_info).collect(),
        }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::JoinTokenInfo>, Status> {
        let admin = self
            .auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let record = self
            .issuance
            .revoke_token(admin.spiffe_id.as_str(), &req.get_ref().token_id)
            .await
            .map_err(status::issue)?;
        Ok(Response::new(token_info(&record)))
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
        let bundle =
            SpiffeBundle::decode_any(td, &b.bundle).map_err(|e| status::federation(e.into()))?;
        let (authorities, sequence) = (bundle.authorities().len(), bundle.sequence());
        let change = self
            .bundles
            .update_federated(
                bundle,
                Origin::Import,
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

    async fn remove_bundle(
        &self,
        req: Request<pb::RemoveBundleRequest>,
    ) -> Result<Response<pb::RemoveBundleResponse>, Status> {
        let admin = self
            .auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let td = TrustDomain::new(req.get_ref().trust_domain.trim())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self
            .bundles
            .remove_federated(&td, admin.spiffe_id.as_str())
            .await
            .map_err(status::federation)?
        {
            Ok(Response::new(pb::RemoveBundleResponse {}))
        } else {
            Err(Status::not_found(format!("no federated bundle for {td}")))
        }
    }

    async fn rotate_ca(
        &self,
        req: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        let admin = self
            .auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let s = self
            .rotation
            .rotate(admin.spiffe_id.as_str())
            .await
            .map_err(|e| match e {
                RotationError::InProgress(_) | RotationError::Unmanaged => {
                    Status::failed_precondition(e.to_string())
                }
                other => status::internal_error(&other.to_string()),
            })?;
        // The bundle's sequence moves as the CA change is applied; report it once it has.
        let published = |set: &crate::federation::BundleSet| {
            set.own
                .authorities()
                .iter()
                .any(|c| s.staged == Some(Sha256::digest(c).into()))
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut rx = self.bundles.subscribe();
            while !published(&rx.borrow_and_update()) {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        Ok(Response::new(self.ca_status(s)))
    }

    async fn get_ca_status(
        &self,
        req: Request<pb::GetCaStatusRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        Ok(Response::new(self.ca_status(self.rotation.status().await)))
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ServerStatus>, Status> {
        self.auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let me = self.replicas.me();
        let now = crate::tls::unix_now();
        let replicas = self
            .replicas
            .all()
            .await
            .map_err(|e| status::internal_error(&e.to_string()))?
            .into_iter()
            .map(|r| pb::ReplicaStatus {
                live: r.is_live(now),
                policy_matches: r.policy_sha256 == me.policy_sha256,
                id: r.id,
                address: r.address,
                policy_sha256: r.policy_sha256,
                heartbeat: r.heartbeat,
                started_at: r.started_at,
                version: r.version,
                binary_records: r.binary_records,
            })
            .collect();
        Ok(Response::new(pb::ServerStatus {
            store: self.replicas.store_kind().into(),
            replica_id: me.id,
            replicas,
            store_health: self.replicas.store_health().await,
            ca: Some(self.ca_status(self.rotation.status().await)),
        }))
    }
}
