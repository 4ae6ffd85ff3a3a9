//! The bundle endpoint: serves the CA's own SPIFFE bundle over HTTPS (the https_spiffe profile:
//! TLS with the CA's serving SVID, `spiffe://<td>/lanyard/server`) to any path, GET only.
//!
//! Each connection is admitted by [`Admission`] (total and per-source caps, checked before the
//! TLS handshake), gets `tls_handshake_timeout` for the handshake, `request_start_timeout` for
//! the request head, and 30 s (`CONNECTION_TIMEOUT`) for everything; keep-alive is off, so a
//! connection ends with its one response.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info};

use super::BundleHub;
use crate::config::Transport;
use crate::net::{AcceptBackoff, Admission};
use crate::tls::{CertSlot, provider};

/// How long one connection may last in all (handshake, request, response): the bound for a
/// client that reads the response slowly.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the bundle on `listener` until `shutdown` turns true. The TLS certificate is whatever
/// `slot` holds at each handshake, so the serving certificate's rotation (and a CA rotation) need
/// no restart. Connections are admitted by `admission` and timed by `transport`.
pub async fn serve_bundle_endpoint(
    listener: TcpListener,
    slot: Arc<CertSlot>,
    hub: Arc<BundleHub>,
    admission: Arc<Admission>,
    transport: Transport,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tls = match rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_no_client_auth().with_cert_resolver(slot),
        Err(e) => {
            error!(error = %e, "bundle endpoint: TLS set-up failed");
            return;
        }
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving the SPIFFE bundle endpoint");
    }
    let mut conns = tokio::task::JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    loop {
        // Reap finished connections so the set stays small.
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => {
                    backoff.succeeded("bundle_endpoint");
                    c
                }
                Err(e) => {
                    let wait = backoff.failed("bundle_endpoint", &e);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = crate::server::stopped(&mut shutdown) => {
                            conns.shutdown().await;
                            return;
                        }
                    }
                    continue;
                }
            },
            () = crate::server::stopped(&mut shutdown) => {
                conns.shutdown().await;
                return;
            }
        };
        // Dropping the socket is the whole refusal: no handshake, no work.
        let Ok(permit) = admission.try_admit(peer.ip()) else {
            continue;
        };
        let acceptor = acceptor.clone();
        let hub = hub.clone();
        conns.spawn(async move {
            let _permit = permit;
            let serve = async {
                let tls = match tokio::time::timeout(
                    transport.tls_handshake_timeout,
                    acceptor.accept(tcp),
                )
                .await
                {
                    Ok(r) => r.map_err(|e| e.to_string())?,
                    Err(_) => return Err("tls handshake timed out".to_string()),
                };
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(transport.request_start_timeout)
                    .keep_alive(false)
                    .serve_connection(
                        TokioIo::new(tls),
                        hyper::service::service_fn(move |req| answer(req, hub.clone(), peer)),
                    )
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(CONNECTION_TIMEOUT, serve).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "bundle endpoint connection failed"),
                Err(_) => debug!(%peer, "bundle endpoint connection timed out"),
            }
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    hub: Arc<BundleHub>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET"));
        return Ok(r);
    }
    match hub.own_document() {
        Ok(doc) => {
            debug!(%peer, path = req.uri().path(), "bundle served");
            let mut r = reply(StatusCode::OK, doc);
            let h = r.headers_mut();
            h.insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            h.insert(
                CACHE_CONTROL,
                hyper::header::HeaderValue::from_static("no-store"),
            );
            Ok(r)
        }
        Err(e) => {
            error!(error = %e, "cannot encode the own bundle");
            Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error\n".into(),
            ))
        }
    }
}
