//! The SPIFFE Workload API on a unix socket: `FetchX509SVID` and `FetchX509Bundles` stream the
//! full state at once and again on every rotation or bundle change. Federated bundles travel in
//! `federated_bundles` (FetchX509SVID) and next to the own bundle in `bundles`
//! (FetchX509Bundles), keyed `spiffe://<td>`. JWT-SVIDs are not supported. The CA's CRLs go in
//! `crl` only while the whole response stays within [`MAX_RESPONSE`] (gRPC's default 4 MiB):
//! past ~110,000 revocations a client would refuse the response, SVID and all.
//!
//! Any local process that can open the socket reaches this server, before the security header is
//! checked, so it is bounded: at most `max_connections` connections at once (one more is closed
//! at accept), each behind the relay's limits (see `uds`), with small HTTP/2 windows, few
//! streams and small request messages.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use prost::Message;

use super::SvidState;
use super::crl::{Crls, RevokedSerials};
use super::uds::{MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE};
use crate::pb::workload::{
    self as wl,
    spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer},
};

/// How many Workload API connections are served at once unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// HTTP/2 receive windows (connection and stream) and the largest request message: Workload API
/// requests are a few hundred octets, and these bound what a client can make the server buffer.
const WINDOW: u32 = 64 * 1024;
/// Concurrent streams per connection (a SPIFFE client opens one per watch, so a handful).
const MAX_STREAMS: u32 = 32;
/// Least time between two warnings about refused connections (repeats are logged at debug).
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(60);
/// The largest response message the Workload API sends: gRPC's default receive limit (4 MiB in
/// grpc-go, so go-spiffe; grpc core, so py-spiffe; tonic). A client refuses a larger message
/// whole, SVID and all, so the CRLs (optional in the SPIFFE Workload API) are left out of a
/// response they would push past it: a CA with over ~110,000 live revocations.
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// The Workload API service over the agent's current SVID.
pub struct WorkloadApi {
    state: watch::Receiver<Option<Arc<SvidState>>>,
    budget: CrlBudget,
}

/// Whether the CRLs go into a response: only when the whole response stays within `limit`.
/// Leaving them out is warned about once per set of revoked serials, not once per client or
/// per routine refresh of the same list.
#[derive(Debug, Clone)]
struct CrlBudget {
    limit: usize,
    /// The CRLs last warned about: their serials and size.
    warned: Arc<Mutex<Option<(RevokedSerials, usize)>>>,
}

// === impl CrlBudget ===

impl CrlBudget {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            warned: Arc::default(),
        }
    }

    /// The CRLs for a response whose other fields encode to `rest` octets and whose `crl` field
    /// has number `field`: all of `crls`, or none when they do not fit.
    fn crls_for(&self, rest: usize, field: u32, crls: &Crls) -> Vec<Vec<u8>> {
        if crls.is_empty() {
            return Vec::new();
        }
        // CRLs over MAX_RESPONSE are not held in memory once written (`Crls::release_if_over`).
        if rest.saturating_add(crls.encoded_len(field)) <= self.limit
            && let Some(ders) = crls.ders()
        {
            return ders.iter().map(|d| d.to_vec()).collect();
        }
        let key = (crls.serials(), crls.size());
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if *warned != Some(key) {
            *warned = Some(key);
            warn!(
                crl_bytes = crls.size(),
                revoked = crls.serials().len(),
                limit = self.limit,
                "the CA's CRLs are too large for a Workload API response (gRPC clients refuse \
                 messages over 4 MiB by default): SVIDs and bundles are sent without them; \
                 read crl.pem (--out) or ask Lanyard's Revocation API (Check, Watch) instead"
            );
        } else {
            debug!(
                crl_bytes = crls.size(),
                "Workload API response sent without the CRLs (too large)"
            );
        }
        Vec::new()
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl WorkloadApi {
    /// A service following `state`, whose responses stay within [`MAX_RESPONSE`].
    pub fn new(state: watch::Receiver<Option<Arc<SvidState>>>) -> Self {
        Self {
            state,
            budget: CrlBudget::new(MAX_RESPONSE),
        }
    }

    /// Streams `make(state)` now and after every change.
    fn follow<T: Send + 'static>(&self, make: fn(&SvidState, &CrlBudget) -> T) -> Stream_<T> {
        let mut rx = self.state.clone();
        let budget = self.budget.clone();
        let (tx, out) = mpsc::channel(4);
        let open = crate::metrics::agent().workload_stream();
        tokio::spawn(async move {
            let _open = open;
            loop {
                let current = rx.borrow_and_update().clone();
                if let Some(s) = current
                    && tx.send(Ok(make(&s, &budget))).await.is_err()
                {
                    return;
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Box::pin(ReceiverStream::new(out))
    }
}

/// Rejects calls without the `workload.spiffe.io: true` header, as the SPIFFE spec requires
/// (it keeps browsers and proxies from reaching the API by accident).
fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req
        .metadata()
        .get("workload.spiffe.io")
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

fn concat(certs: &[rustls_pki_types::CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

fn td_key(s: &SvidState) -> String {
    format!("spiffe://{}", s.svid.spiffe_id.trust_domain_name())
}

fn svid_response(s: &SvidState, budget: &CrlBudget) -> wl::X509svidResponse {
    let mut r = wl::X509svidResponse {
        svids: vec![wl::X509svid {
            spiffe_id: s.svid.spiffe_id.to_string(),
            x509_svid: concat(&s.chain),
            x509_svid_key: s.key_der.clone(),
            bundle: concat(&s.bundle),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: federated(s).collect(),
    };
    // `crl` is field 2 of X509SVIDResponse.
    r.crl = budget.crls_for(r.encoded_len(), 2, &s.crls);
    r
}

fn federated(s: &SvidState) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    s.federated
        .iter()
        .map(|(td, certs)| (format!("spiffe://{td}"), concat(certs)))
}

fn bundles_response(s: &SvidState, budget: &CrlBudget) -> wl::X509BundlesResponse {
    let mut r = wl::X509BundlesResponse {
        crl: Vec::new(),
        bundles: federated(s)
            .chain(std::iter::once((td_key(s), concat(&s.bundle))))
            .collect(),
    };
    // `crl` is field 1 of X509BundlesResponse.
    r.crl = budget.crls_for(r.encoded_len(), 1, &s.crls);
    r
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    async fn fetch_jwtsvid(
        &self,
        req: Request<wl::JwtsvidRequest>,
    ) -> Result<Response<wl::JwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented("lanyard issues X.509-SVIDs only"))
    }

    type FetchJWTBundlesStream = Stream_<wl::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<wl::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented("lanyard issues X.509-SVIDs only"))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<wl::ValidateJwtsvidRequest>,
    ) -> Result<Response<wl::ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented("lanyard issues X.509-SVIDs only"))
    }

    type FetchX509SVIDStream = Stream_<wl::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<wl::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        Ok(Response::new(self.follow(svid_response)))
    }

    type FetchX509BundlesStream = Stream_<wl::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<wl::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        Ok(Response::new(self.follow(bundles_response)))
    }
}

/// Who may open the Workload API socket. The agent hands its SVID to any process that connects
/// (it does not attest callers), so the socket's mode and group are the access control.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits, e.g. `0o660`; `None` keeps what the umask gives.
    pub mode: Option<u32>,
    /// Group that owns the socket; the agent must belong to it (or hold `CAP_CHOWN`).
    pub gid: Option<u32>,
}

// === impl SocketAccess ===

impl SocketAccess {
    fn apply(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(gid) = self.gid {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give the socket to group {gid} (is the agent a member of it?): {e}"
                    ),
                )
            })?;
        }
        if let Some(mode) = self.mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

/// Serves the Workload API on `path` (a stale socket file is replaced) until `shutdown`, to at
/// most `max_connections` clients at once. The socket is bound under a temporary name and
/// renamed into place once `access` is applied, so no client ever sees it with the umask's mode.
pub async fn serve_workload_api(
    path: &Path,
    access: SocketAccess,
    state: watch::Receiver<Option<Arc<SvidState>>>,
    mut shutdown: watch::Receiver<bool>,
    max_connections: u32,
) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut staging = path.as_os_str().to_owned();
    staging.push(".new");
    let staging = std::path::PathBuf::from(staging);
    for stale in [&staging, &path.to_path_buf()] {
        match std::fs::remove_file(stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let listener = UnixListener::bind(&staging)?;
    if let Err(e) = access
        .apply(&staging)
        .and_then(|()| std::fs::rename(&staging, path))
    {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    info!(socket = %path.display(), max_connections, mode = ?access.mode.map(|m| format!("{m:o}")),
          gid = ?access.gid, "serving the SPIFFE Workload API");
    // u32 always fits usize on the targets tokio supports; saturate rather than assume.
    let slots = Arc::new(Semaphore::new(
        usize::try_from(max_connections)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS),
    ));
    crate::metrics::agent().workload_slots(slots.clone(), slots.available_permits());
    let mut refusals = Refusals::default();
    let incoming = UnixListenerStream::new(listener).filter_map(move |conn| {
        let conn = match conn {
            Ok(stream) => match slots.clone().try_acquire_owned() {
                Ok(slot) => Some(Ok(super::uds::relay(stream, slot))),
                // Dropping the stream closes it before the server says a word.
                Err(_) => {
                    refusals.note(max_connections);
                    None
                }
            },
            Err(e) => Some(Err(e)),
        };
        std::future::ready(conn)
    });
    let service = SpiffeWorkloadApiServer::new(WorkloadApi::new(state))
        .max_decoding_message_size(WINDOW as usize);
    // The relay enforces the frame and header list sizes the server advertises: set them here
    // rather than trusting hyper's defaults to stay what the relay assumes.
    tonic::transport::Server::builder()
        .max_frame_size(MAX_FRAME_SIZE)
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_connection_window_size(WINDOW)
        .initial_stream_window_size(WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
        .map_err(std::io::Error::other)
}

/// Connections refused for want of a slot: warns on the first and then at most once every
/// [`REFUSAL_WARN_EVERY`] (with the count since), so a client hammering the socket cannot flood
/// the log.
#[derive(Debug, Default)]
struct Refusals {
    last_warning: Option<Instant>,
    since: u64,
}

// === impl Refusals ===

impl Refusals {
    fn note(&mut self, max_connections: u32) {
        self.since += 1;
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_WARN_EVERY)
        {
            warn!(
                max_connections,
                refused = self.since,
                "workload API connection refused: all connection slots are taken"
            );
            self.last_warning = Some(now);
            self.since = 0;
        } else {
            debug!(
                max_connections,
                "workload API connection refused: all connection slots are taken"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The CRLs go in exactly while the whole encoded response fits the limit, and leaving them
    /// out is warned about once per CRL content.
    #[test]
    fn crls_go_in_while_the_whole_response_fits() {
        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe::TrustDomain::new("example.org").unwrap();
        let ca = crate::ca::Authority::load_or_create(dir.path(), &td, Default::default()).unwrap();
        let entries: Vec<_> = (0..200u32)
            .map(|i| (crate::ca::Serial::from_bytes(&i.to_be_bytes()), 1_000))
            .collect();
        let der = ca.sign_crl(&entries, 1, 1_000, 5_000).unwrap();
        let crls = Crls::new(vec![der.clone().into(), der.into()]).unwrap();
        let rest = wl::X509svidResponse {
            svids: vec![wl::X509svid {
                spiffe_id: "spiffe://example.org/w".into(),
                x509_svid: vec![1; 700],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut full = rest.clone();
        full.crl = crls.ders().unwrap().iter().map(|d| d.to_vec()).collect();
        let whole = full.encoded_len();
        assert!(whole > rest.encoded_len() + crls.size());

        let fits = CrlBudget::new(whole);
        assert_eq!(fits.crls_for(rest.encoded_len(), 2, &crls), full.crl);
        assert!(fits.warned.lock().unwrap().is_none());
        let short = CrlBudget::new(whole - 1);
        assert!(short.crls_for(rest.encoded_len(), 2, &crls).is_empty());
        let warned = *short.warned.lock().unwrap();
        assert_eq!(warned, Some((crls.serials(), crls.size())));
        // No CRLs: nothing to warn about, whatever the size of the rest.
        let none = CrlBudget::new(10);
        assert!(none.crls_for(whole, 2, &Crls::default()).is_empty());
        assert!(none.warned.lock().unwrap().is_none());
    }
}
