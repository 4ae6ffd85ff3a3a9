//! Following the CA's trust bundles: `Ca.WatchBundles` pushes the own bundle and every federated
//! bundle at once and on every change, so a CA rotation or a federated refresh reaches workloads
//! within a second instead of at their next renewal. The stream shares the agent's one connection
//! to the CA ([`super::link`]) and is resumed with backoff; a CA that predates the RPC
//! (`Unimplemented`) is left alone and bundles then travel with renewals.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::warn;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::link::CaLink;
use crate::pb::v1::{self as pb, ca_client::CaClient};

/// Bundles as the agent holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundles {
    /// The CA's revision of this set; newer sets replace older ones, never the reverse.
    pub revision: u64,
    /// The own trust domain's CA certificates.
    pub own: Vec<CertificateDer<'static>>,
    /// Federated trust domain name (`b.example`) → its CA certificates.
    pub federated: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

// === impl Bundles ===

impl Bundles {
    /// Decodes a `BundleSet` message; `None` (logged) if any bundle is malformed.
    pub fn from_proto(m: pb::BundleSet) -> Option<Self> {
        let own = m
            .trust_bundle
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let federated = decode_federated(m.federated_bundles)?;
        Some(Self {
            revision: m.revision,
            own,
            federated,
        })
    }
}

/// Decodes `spiffe://<td>` → concatenated DER into trust domain name → certificates.
pub(crate) fn decode_federated(
    map: std::collections::HashMap<String, Vec<u8>>,
) -> Option<BTreeMap<String, Vec<CertificateDer<'static>>>> {
    let mut out = BTreeMap::new();
    for (key, der) in map {
        let td = key.strip_prefix("spiffe://").unwrap_or(&key);
        if crate::spiffe::TrustDomain::new(td).is_err() {
            warn!(
                key,
                "ignoring a federated bundle with a malformed trust domain"
            );
            continue;
        }
        match split_der(&der) {
            Some(certs) if !certs.is_empty() => {
                out.insert(td.to_string(), certs);
            }
            _ => {
                warn!(
                    trust_domain = td,
                    "federated bundle from the CA does not parse"
                );
                return None;
            }
        }
    }
    Some(out)
}

/// Splits concatenated DER certificates.
pub fn split_der(mut der: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der).ok()?;
        let len = der.len() - rest.len();
        out.push(CertificateDer::from(der[..len].to_vec()));
        der = rest;
    }
    Some(out)
}

/// Follows `Ca.WatchBundles` over the agent's link to the CA; the latest set is in the returned
/// receiver. Runs until the returned task is aborted.
pub(crate) fn follow_bundles(
    link: Arc<CaLink>,
) -> (
    tokio::task::JoinHandle<()>,
    watch::Receiver<Option<Bundles>>,
) {
    let (tx, rx) = watch::channel(None);
    let tx = Arc::new(tx);
    let task = super::link::follow(link, "bundles", move |channel| {
        let tx = tx.clone();
        async move { watch_once(channel, &tx).await }
    });
    (task, rx)
}

async fn watch_once(
    channel: tonic::transport::Channel,
    tx: &watch::Sender<Option<Bundles>>,
) -> Result<(), tonic::Status> {
    let mut stream = CaClient::new(channel)
        .watch_bundles(pb::WatchBundlesRequest {})
        .await?
        .into_inner();
    while let Some(m) = stream.message().await? {
        if let Some(b) = Bundles::from_proto(m) {
            tx.send_if_modified(|cur| {
                let newer = cur.as_ref().is_none_or(|c| b.revision > c.revision);
                if newer {
                    *cur = Some(b);
                }
                newer
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn concatenated_der_splits_back() {
        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe::TrustDomain::new("b.example").unwrap();
        let roots: Vec<CertificateDer<'static>> = ["x", "y"]
            .iter()
            .map(|n| {
                crate::ca::Authority::load_or_create(
                    &dir.path().join(n),
                    &td,
                    crate::ca::RolesOid::default(),
                )
                .unwrap()
                .root()
                .clone()
            })
            .collect();
        let concat: Vec<u8> = roots.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(split_der(&concat).unwrap(), roots);
        assert!(split_der(&concat[..concat.len() - 1]).is_none());
        let mut map = std::collections::HashMap::new();
        map.insert("spiffe://b.example".to_string(), concat);
        let fed = decode_federated(map).unwrap();
        assert_eq!(fed["b.example"].len(), 2);
    }
}
