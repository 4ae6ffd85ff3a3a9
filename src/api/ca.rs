//! `lanyard.v1.Ca`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{Authenticator, MessageStream, status, stream_latest};
use crate::federation::{BundleHub, BundleSet};
use crate::issuance::{Issuance, IssueError, IssueRequest, Issued};
use crate::pb::v1::{self as pb, ca_server::Ca};
use crate::spiffe::TrustDomain;
use crate::tls::unix_now;

/// The Ca service.
pub struct CaService {
    issuance: Arc<Issuance>,
    auth: Authenticator,
    bundles: Arc<BundleHub>,
    /// Ends bundle watch streams when the server stops.
    shutdown: watch::Receiver<bool>,
}

impl CaService {
    /// Wires the service.
    pub fn new(
        issuance: Arc<Issuance>,
        auth: Authenticator,
        bundles: Arc<BundleHub>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            issuance,
            auth,
            bundles,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl Ca for CaService {
    /// Issuance or renewal. The source's refusal budget is kept by
    /// [`super::refusals::RefusalLayer`]; refusals are audited here, with the issuance.
    ///
    /// No tracing span per call: on the hot path a span costs an allocation in the subscriber's
    /// registry and an enter/exit per poll, and every event the issuance logs already names the
    /// actor (`token:<id>`, `attestor:<name>` or the renewing SPIFFE ID) and the event kind.
    async fn issue(
        &self,
        mut req: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        // The request is consumed here: move its fields out instead of copying them.
        let body = req.get_mut();
        let ask = IssueRequest {
            csr: std::mem::take(&mut body.csr),
            ttl: (body.ttl_seconds > 0).then(|| Duration::from_secs(body.ttl_seconds.into())),
            roles: std::mem::take(&mut body.roles),
        };
        let (jwt, join_token) = (
            std::mem::take(&mut body.jwt),
            std::mem::take(&mut body.join_token),
        );
        if !jwt.is_empty() && !join_token.is_empty() {
            return Err(Status::invalid_argument("set join_token or jwt, not both"));
        }
        // The renewing caller, whose connection the new certificate is bound to.
        let mut renewed_by = None;
        let issued = if !jwt.is_empty() {
            self.issuance.with_jwt(&jwt, ask).await
        } else if join_token.is_empty() {
            let peer = match self.auth.peer(&req, true) {
                Ok(p) => p,
                Err(e) => {
                    let status = status::auth(e);
                    let certs = req.peer_certs();
                    let chain = certs.as_deref().map(Vec::as_slice).unwrap_or_default();
                    let why = IssueError::Unauthenticated(status.message().to_string());
                    // The actor is who the chain proves (a revoked caller still proves who it
                    // is); a chain that does not verify proves nothing, so its claim is only
                    // noted, never made the actor.
                    match self.auth.identify(chain, unix_now()) {
                        Ok(svid) => {
                            let id = svid.spiffe_id.as_str();
                            self.issuance.deny(id, id, why).await
                        }
                        Err(claimed) => self.issuance.deny_unverified(&claimed, why).await,
                    };
                    return Err(status);
                }
            };
            let issued = self.issuance.renew(&peer, ask).await;
            renewed_by = Some(peer);
            issued
        } else {
            self.issuance.with_token(&join_token, ask).await
        }
        .map_err(status::issue)?;
        let cas = self.issuance.cas().current();
        let signer = cas.active().root();
        self.auth
            .remember_issued(&issued.chain, &issued.svid, signer);
        let bound = renewed_by.is_some_and(|by| {
            self.auth
                .bind_to_connection(&req, &by, &issued.chain, &issued.svid, signer)
        });
        let serial = issued.svid.serial.to_hex();
        let mut resp = Response::new(to_proto(issued, &self.bundles.current()));
        if bound && let Ok(v) = serial.parse() {
            resp.metadata_mut().insert(super::auth::CONNECTION_BOUND, v);
        }
        Ok(resp)
    }

    async fn get_trust_bundle(
        &self,
        _req: Request<pb::GetTrustBundleRequest>,
    ) -> Result<Response<pb::TrustBundle>, Status> {
        // Every CA in force: during a rotation, the old and the new.
        let cas = self.issuance.cas().current();
        Ok(Response::new(pb::TrustBundle {
            trust_domain: cas.active().trust_domain().to_string(),
            ca_certs: cas.roots().iter().map(|c| c.to_vec()).collect(),
        }))
    }

    async fn get_spiffe_bundle(
        &self,
        req: Request<pb::GetSpiffeBundleRequest>,
    ) -> Result<Response<pb::SpiffeBundle>, Status> {
        let set = self.bundles.current();
        let name = req.get_ref().trust_domain.trim();
        let td = if name.is_empty() {
            self.bundles.trust_domain().clone()
        } else {
            TrustDomain::new(name).map_err(|e| Status::invalid_argument(e.to_string()))?
        };
        let bundle = set.bundle_for(&td).ok_or_else(|| {
            Status::not_found(format!(
                "no bundle for trust domain {td}: this CA does not federate with it"
            ))
        })?;
        let jwks = bundle.encode().map_err(|e| status::federation(e.into()))?;
        Ok(Response::new(pb::SpiffeBundle {
            trust_domain: td.to_string(),
            jwks,
            sequence: bundle.sequence().unwrap_or(0),
        }))
    }

    type WatchBundlesStream = MessageStream<pb::BundleSet>;

    async fn watch_bundles(
        &self,
        req: Request<pb::WatchBundlesRequest>,
    ) -> Result<Response<Self::WatchBundlesStream>, Status> {
        self.auth.peer(&req, false).map_err(status::auth)?;
        Ok(Response::new(stream_latest(
            self.bundles.subscribe(),
            self.shutdown.clone(),
            |set: &Arc<BundleSet>| bundle_set_proto(set),
        )))
    }
}

/// The wire form of a bundle set.
pub fn bundle_set_proto(set: &BundleSet) -> pb::BundleSet {
    pb::BundleSet {
        revision: set.revision,
        trust_domain: set.own.trust_domain().to_string(),
        trust_bundle: set.own.authorities().iter().map(|c| c.to_vec()).collect(),
        federated_bundles: set.federated_der(),
        sequence: set.own.sequence().unwrap_or(0),
    }
}

fn to_proto(i: Issued, bundles: &BundleSet) -> pb::IssueResponse {
    pb::IssueResponse {
        cert_chain: i.chain.iter().map(|c| c.to_vec()).collect(),
        trust_bundle: i.bundle.iter().map(|c| c.to_vec()).collect(),
        spiffe_id: i.svid.spiffe_id.to_string(),
        roles: i.svid.roles,
        serial: i.svid.serial.to_hex(),
        not_before: i.svid.not_before,
        not_after: i.svid.not_after,
        federated_bundles: bundles.federated_der(),
        bundle_revision: bundles.revision,
    }
}
