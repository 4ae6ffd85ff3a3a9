//! Relaying a federated domain's revocations: for each `[[federation]]` entry with a
//! `revocation_server`, one task follows that CA's `Revocation.Watch` and imports what it
//! publishes ([`Revocations::import`]), so this domain's workloads — which follow only their own
//! CA — refuse a foreign certificate its own CA revoked, within moments instead of at its expiry.
//!
//! The task authenticates as this CA's serving identity (`spiffe://<own td>/lanyard/server`,
//! the only foreign identity a Lanyard CA lets watch its revocations) and authenticates the
//! foreign CA by `spiffe://<td>/lanyard/server` against the bundle this CA holds for `td`, the
//! same trust the bundle refresher keeps current.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{BundleHub, FederatedDomain};
use crate::agent::Backoff;
use crate::ca::RolesOid;
use crate::pb::v1::{RevocationEntry, WatchRequest, revocation_client::RevocationClient};
use crate::revocation::Revocations;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::{RECORD_VERSION, RevocationRecord};
use crate::tls::{CertSlot, ServerTrust, ServerVerifier};

/// Most entries imported in one audit event.
const BATCH: usize = 256;

/// What a relay task needs from the server.
#[derive(Clone)]
pub struct RelayContext {
    /// The bundles, for the foreign CA's trust.
    pub bundles: Arc<BundleHub>,
    /// Where imported entries go.
    pub revocations: Arc<Revocations>,
    /// This CA's serving certificate, the client identity of the watch.
    pub identity: Arc<CertSlot>,
    /// Roles OID (to parse the foreign CA's certificate).
    pub oid: RolesOid,
}

/// Starts one relay per federated domain that names a `revocation_server`. Each stops when
/// `shutdown` turns true.
pub fn spawn_revocation_relays(
    ctx: RelayContext,
    domains: &[FederatedDomain],
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    domains
        .iter()
        .filter_map(|d| {
            let server = d.revocation_server.clone()?;
            let span = info_span!("revocation_relay", trust_domain = %d.trust_domain);
            Some(tokio::spawn(
                relay_loop(
                    ctx.clone(),
                    d.trust_domain.clone(),
                    server,
                    shutdown.clone(),
                )
                .instrument(span),
            ))
        })
        .collect()
}

async fn relay_loop(
    ctx: RelayContext,
    td: TrustDomain,
    server: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut since = 0;
    let mut last_error: Option<String> = None;
    loop {
        let result = tokio::select! {
            r = follow_once(&ctx, &td, &server, &mut since) => r,
            () = crate::server::stopped(&mut shutdown) => return,
        };
        match result {
            Ok(()) => backoff.reset(),
            Err(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    warn!(server, error = %e, "cannot follow the federated CA's revocations; retrying");
                } else {
                    debug!(server, error = %e, "revocation relay still failing");
                }
                last_error = Some(e);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_wait()) => {}
            () = crate::server::stopped(&mut shutdown) => return,
        }
    }
}

/// One connection: watch from `since`, import in batches, until the stream ends or breaks.
async fn follow_once(
    ctx: &RelayContext,
    td: &TrustDomain,
    server: &str,
    since: &mut u64,
) -> Result<(), String> {
    let bundle = ctx
        .bundles
        .current()
        .federated
        .get(td)
        .ok_or_else(|| format!("no bundle of {td} yet to authenticate its CA"))?
        .to_tls_bundle()
        .map_err(|e| e.to_string())?;
    let ca_id =
        SpiffeId::parse(&format!("spiffe://{td}/lanyard/server")).map_err(|e| e.to_string())?;
    let verifier = ServerVerifier::for_id(ServerTrust::Bundle(bundle), ca_id, ctx.oid.clone());
    let channel = crate::client::connect_with(server, verifier, Some(ctx.identity.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = RevocationClient::new(channel)
        .watch(WatchRequest { since: *since })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    info!(
        server,
        since = *since,
        "relaying the federated CA's revocations"
    );
    loop {
        let Some(first) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        else {
            return Ok(());
        };
        // Whatever else has already arrived goes in the same audit event.
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match stream.message().now_or_never() {
                Some(Ok(Some(e))) => batch.push(e),
                Some(Err(s)) => return Err(s.message().to_string()),
                Some(Ok(None)) | None => break,
            }
        }
        let top = batch.iter().map(|e| e.rev).max().unwrap_or(0);
        ctx.revocations
            .import(td, batch.into_iter().map(from_proto).collect())
            .await
            .map_err(|e| format!("importing: {e}"))?;
        *since = (*since).max(top);
    }
}

/// A published entry as a record to relay (`import` sets its origin and revision).
fn from_proto(e: RevocationEntry) -> RevocationRecord {
    RevocationRecord {
        v: RECORD_VERSION,
        rev: 0,
        serial: e.serial,
        spiffe_id: e.spiffe_id,
        identity_rule: e.identity_rule,
        before: e.before,
        reason: e.reason,
        revoked_at: e.revoked_at,
        expires_at: e.expires_at,
        blocked: e.blocked,
        renewable: false,
        origin: String::new(),
    }
}
