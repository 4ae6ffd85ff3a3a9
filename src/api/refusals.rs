//! [`RefusalLayer`]: every gRPC call runs under its source's refusal budget, and every refused
//! call leaves a `denied` audit event.
//!
//! One layer around the whole server instead of code in each handler, so no call can be added
//! that forgets either half. Per call:
//! 1. take one unit of the source's [`DenialLimiter`] budget before the call is processed; with
//!    none left, answer `RESOURCE_EXHAUSTED` at once (counted, summarised once a second);
//! 2. run the call;
//! 3. on a refusal (`UNAUTHENTICATED`, `PERMISSION_DENIED`, `INVALID_ARGUMENT`,
//!    `FAILED_PRECONDITION`), keep the unit spent and, unless the call audits its own refusals
//!    (`Ca.Issue`, whose denial shares the issuance's group commit), record a `denied` event
//!    before the answer goes out: the actor is the identity the caller's certificate *proves*
//!    (revoked or not; on a connection a renewal rebound, the certificate bound to it), else
//!    `unauthenticated` with the identity the certificate merely claims in the separate
//!    `claimed` field; the reason names the call;
//! 4. on anything else, give the unit back.
//!
//! A refusal reaches the layer in the response head (gRPC "trailers-only"), which is how tonic
//! answers every error returned by a handler before its first message, so the layer never
//! touches a response body.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::CertificateDer;
use tonic::codegen::http;
use tonic::{Code, Status};
use tracing::warn;

use super::Authenticator;
use super::auth::ConnAuth;
use super::limit::DenialLimiter;
use crate::audit::{AuditLog, Event, Kind, UNAUTHENTICATED};
use crate::tls::unix_now;

/// Calls that write their own `denied` event (the layer still keeps their budget).
const SELF_AUDITED: &[&str] = &["/lanyard.v1.Ca/Issue"];

/// Wraps the gRPC server with the refusal budget and the audit of refusals.
#[derive(Clone)]
pub struct RefusalLayer {
    shared: Arc<Shared>,
}

struct Shared {
    limiter: Arc<DenialLimiter>,
    log: AuditLog,
    auth: Authenticator,
}

/// The service [`RefusalLayer`] builds.
#[derive(Clone)]
pub struct RefusalService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl RefusalLayer {
    /// Budgets every source with `limiter`, audits refusals to `log`, names actors with `auth`.
    pub fn new(limiter: Arc<DenialLimiter>, log: AuditLog, auth: Authenticator) -> Self {
        Self {
            shared: Arc::new(Shared { limiter, log, auth }),
        }
    }
}

impl<S> tower::Layer<S> for RefusalLayer {
    type Service = RefusalService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RefusalService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Whether `code` means the caller was refused (as opposed to a missing object or a fault).
pub fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::FailedPrecondition
    )
}

/// What a request's caller presented: the handshake's chain and the connection's
/// authentication state, which holds the newer certificate a renewal bound to the connection
/// (decision 65). Kept as they come; the chain is chosen only for a refusal's event.
struct Presented {
    handshake: Option<Arc<Vec<CertificateDer<'static>>>>,
    conn: Option<Arc<ConnAuth>>,
}

/// The source address and what the caller presented, from tonic's connection info and the
/// listener's per-connection state.
fn caller_of<B>(req: http::Request<B>) -> (http::Request<B>, Option<IpAddr>, Presented) {
    let (mut parts, body) = req.into_parts();
    let probe = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::new(),
        std::mem::take(&mut parts.extensions),
        (),
    );
    let ip = probe.remote_addr().map(|a| a.ip());
    let presented = Presented {
        handshake: probe.peer_certs(),
        conn: probe.extensions().get::<Arc<ConnAuth>>().cloned(),
    };
    let (_, extensions, ()) = probe.into_parts();
    parts.extensions = extensions;
    (http::Request::from_parts(parts, body), ip, presented)
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RefusalService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let path = req.uri().path().to_string();
        let (req, ip, presented) = caller_of(req);
        let reservation = match ip {
            Some(ip) => match shared.limiter.reserve(ip) {
                Some(r) => Some(r),
                None => {
                    crate::metrics::ca().refused_call(Code::ResourceExhausted);
                    let status = Status::resource_exhausted(format!(
                        "too many refused requests from {}; slow down and retry in a second",
                        super::limit::Source::of(ip)
                    ));
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
            // Not a network connection (no address to budget).
            None => None,
        };
        Box::pin(async move {
            let resp = inner.call(req).await?;
            let refused = Status::from_header_map(resp.headers()).filter(|s| is_refusal(s.code()));
            match (refused, reservation) {
                (Some(status), _) => {
                    crate::metrics::ca().refused_call(status.code());
                    if !SELF_AUDITED.contains(&path.as_str()) {
                        shared.record(&path, &presented, &status).await;
                    }
                }
                (None, Some(r)) => r.release(),
                (None, None) => {}
            }
            Ok(resp)
        })
    }
}

impl Shared {
    /// Writes the `denied` event of a refused call; durable before the answer goes out.
    /// The actor is whom the connection's calls speak for: the certificate a renewal bound to
    /// it if any (the handshake's may have expired long ago on a kept connection), else the
    /// handshake's.
    async fn record(&self, path: &str, presented: &Presented, status: &Status) {
        let bound = presented.conn.as_ref().and_then(|c| c.bound_chain());
        let certs = match (&bound, &presented.handshake) {
            (Some(chain), _) => &chain[..],
            (None, Some(chain)) => chain.as_slice(),
            (None, None) => &[],
        };
        let event = match self.auth.identify(certs, unix_now()) {
            Ok(svid) => Event::new(Kind::Denied, svid.spiffe_id.as_str()),
            Err(claimed) => Event::new(Kind::Denied, UNAUTHENTICATED).claimed(claimed),
        };
        let call = path.trim_start_matches('/');
        let event = event.reason(format!("{call}: {}", status.message()));
        warn!(actor = %event.actor, call, code = ?status.code(), "call refused");
        if let Err(e) = self.log.record(event, vec![]).await {
            warn!(error = %e, "cannot record a refused call");
        }
    }
}
