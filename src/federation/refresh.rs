//! Keeping federated bundles fresh: one task per `[[federation]]` entry fetches the foreign
//! bundle at its `spiffe_refresh_hint` (clamped), keeps the last good bundle when a fetch fails
//! and retries with backoff.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::fetch::{EndpointTrust, FetchError, fetch};
use super::{BundleHub, EndpointProfile, FederatedDomain, Origin, SpiffeBundle};
use crate::agent::Backoff;
use crate::ca::RolesOid;

/// Shortest interval between two fetches of one endpoint, whatever its hint says.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest interval between two fetches of one endpoint, whatever its hint says.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Interval when the bundle names no hint.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// When to fetch again after a success: the bundle's hint clamped to
/// [`MIN_REFRESH`]..=[`MAX_REFRESH`], or [`DEFAULT_REFRESH`].
pub fn refresh_after(hint: Option<Duration>) -> Duration {
    hint.unwrap_or(DEFAULT_REFRESH)
        .clamp(MIN_REFRESH, MAX_REFRESH)
}

/// Why one refresh attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum AttemptError {
    /// Could not get the document (network, TLS, HTTP).
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// Got a document, but it is not an acceptable bundle.
    #[error("{0}")]
    Content(String),
    /// Our side failed: the bundle held for the endpoint's domain is unusable, or the new bundle
    /// could not be stored.
    #[error("{0}")]
    Local(String),
}

/// Starts one refresher per federated domain. Each stops when `shutdown` turns true.
pub fn spawn_refreshers(
    hub: Arc<BundleHub>,
    domains: Vec<FederatedDomain>,
    oid: RolesOid,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    domains
        .into_iter()
        .map(|d| {
            crate::metrics::ca().federation_configured(&d.trust_domain);
            let span = info_span!("federation", trust_domain = %d.trust_domain);
            tokio::spawn(
                refresh_loop(hub.clone(), d, oid.clone(), shutdown.clone()).instrument(span),
            )
        })
        .collect()
}

async fn refresh_loop(
    hub: Arc<BundleHub>,
    domain: FederatedDomain,
    oid: RolesOid,
    mut shutdown: watch::Receiver<bool>,
) {
    let url = domain.url.to_string();
    let mut backoff = Backoff::new(MIN_REFRESH, Duration::from_secs(60));
    let mut last_error: Option<String> = None;
    let mut last_rejection: Option<String> = None;
    let mut changes = hub.subscribe();
    loop {
        seed_initial(&hub, &domain).await;
        changes.borrow_and_update();
        let result = tokio::select! {
            r = attempt(&hub, &domain, &oid) => r,
            () = crate::server::stopped(&mut shutdown) => return,
        };
        // Without a bundle to authenticate the endpoint, an import (or any bundle change) is what
        // unblocks us: try again as soon as one happens.
        let wake_on_change = matches!(result, Err(AttemptError::Fetch(FetchError::NoTrust(_))));
        let wait = match result {
            Ok(bundle) => {
                crate::metrics::ca().federation_refresh(&domain.trust_domain, true);
                if last_error.take().is_some() {
                    info!(url, "bundle endpoint reachable again");
                }
                last_rejection = None;
                backoff.reset();
                refresh_after(bundle.refresh_hint())
            }
            Err(e) => {
                crate::metrics::ca().federation_refresh(&domain.trust_domain, false);
                let msg = e.to_string();
                let held = hub.current().federated.contains_key(&domain.trust_domain);
                if last_error.as_deref() != Some(msg.as_str()) {
                    if held {
                        warn!(url, error = %msg, "federated bundle refresh failed; keeping the last good bundle");
                    } else {
                        warn!(url, error = %msg, "federated bundle refresh failed; no bundle for the domain yet");
                    }
                } else {
                    debug!(url, error = %msg, "federated bundle refresh failed again");
                }
                if matches!(e, AttemptError::Content(_))
                    && last_rejection.as_deref() != Some(msg.as_str())
                {
                    hub.record_rejected(&domain.trust_domain, &url, &msg).await;
                    last_rejection = Some(msg.clone());
                }
                last_error = Some(msg);
                // Back off, but never wait longer than the hint.
                let hint = hub
                    .current()
                    .federated
                    .get(&domain.trust_domain)
                    .and_then(SpiffeBundle::refresh_hint);
                backoff.next_wait().min(refresh_after(hint))
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            Ok(()) = changes.changed(), if wake_on_change => {}
            () = crate::server::stopped(&mut shutdown) => return,
        }
    }
}

/// One fetch, decode and install.
async fn attempt(
    hub: &BundleHub,
    domain: &FederatedDomain,
    oid: &RolesOid,
) -> Result<SpiffeBundle, AttemptError> {
    let trust = match &domain.profile {
        EndpointProfile::HttpsSpiffe { endpoint_id, .. } => {
            let td = endpoint_id.trust_domain();
            let current = hub.current();
            let bundle = current
                .bundle_for(&td)
                .ok_or_else(|| FetchError::NoTrust(td.to_string()))?
                .to_tls_bundle()
                .map_err(|e| AttemptError::Local(format!("the bundle of {td}: {e}")))?;
            EndpointTrust::Spiffe {
                id: endpoint_id.clone(),
                bundle,
                oid: oid.clone(),
            }
        }
        EndpointProfile::HttpsWeb { ca_file } => EndpointTrust::web_from_file(ca_file)?,
    };
    let doc = fetch(&domain.url, &trust).await?;
    let bundle = SpiffeBundle::decode(domain.trust_domain.clone(), &doc)
        .map_err(|e| AttemptError::Content(e.to_string()))?;
    hub.update_federated(
        bundle.clone(),
        Origin::Federation,
        "lanyard",
        &domain.url.to_string(),
    )
    .await
    .map_err(|e| {
        error!(error = %e, "cannot store the federated bundle");
        AttemptError::Local(format!("storing the bundle: {e}"))
    })?;
    Ok(bundle)
}

/// Installs `initial_bundle` when no bundle of the domain is known yet (first start).
async fn seed_initial(hub: &BundleHub, domain: &FederatedDomain) {
    let EndpointProfile::HttpsSpiffe {
        initial_bundle: Some(path),
        ..
    } = &domain.profile
    else {
        return;
    };
    if hub.current().federated.contains_key(&domain.trust_domain) {
        return;
    }
    let source = format!("initial_bundle {}", path.display());
    let loaded = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| {
            SpiffeBundle::decode_any(domain.trust_domain.clone(), &b).map_err(|e| e.to_string())
        });
    match loaded {
        Ok(b) => {
            if let Err(e) = hub
                .update_federated(b, Origin::Federation, "lanyard", &source)
                .await
            {
                error!(error = %e, "cannot store the initial bundle");
            }
        }
        Err(e) => error!(path = %path.display(), error = %e, "initial_bundle unusable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_hint_is_clamped() {
        let s = Duration::from_secs;
        assert_eq!(refresh_after(None), DEFAULT_REFRESH);
        assert_eq!(refresh_after(Some(s(0))), MIN_REFRESH);
        assert_eq!(refresh_after(Some(s(2))), s(2));
        assert_eq!(refresh_after(Some(s(86_400))), MAX_REFRESH);
    }
}
