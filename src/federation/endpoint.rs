//! The bundle endpoint: serves the CA's own SPIFFE bundle over HTTPS (the https_spiffe profile:
//! TLS with the CA's serving SVID, `spiffe://<td>/lanyard/server`) to any path, GET only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use super::BundleHub;
use crate::tls::{CertSlot, provider};

/// How long a client gets for its handshake and request.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the bundle on `listener` until `shutdown` turns true. The TLS certificate is whatever
/// `slot` holds at each handshake, so the serving certificate's rotation (and a CA rotation) need
/// no restart.
pub async fn serve_bundle_endpoint(
    listener: TcpListener,
    slot: Arc<CertSlot>,
    hub: Arc<BundleHub>,
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
    loop {
        // Reap finished connections so the set stays small.
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "bundle endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = crate::server::stopped(&mut shutdown) => {
                conns.shutdown().await;
                return;
            }
        };
        let acceptor = acceptor.clone();
        let hub = hub.clone();
        conns.spawn(async move {
            let serve = async {
                let tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
                hyper::server::conn::http1::Builder::new()
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
