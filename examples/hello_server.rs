//! An HTTPS service that does SPIFFE mTLS with lanyard::tls.
//!
//! It follows the agent's credential directory (new handshakes use the newest certificate, no
//! restart), accepts only clients the `--allow` rules name, refuses revoked clients within a
//! second when `--ca` is given (it follows the CA's revocation stream, and the grants of
//! federated identities: a foreign client holds a role here only while a grant says so), and
//! answers each call with who called.
//!
//! ```text
//! cargo run --example hello_server -- --svid-dir ./db-svid --listen 127.0.0.1:9443 \
//!     --allow 'spiffe://example.org/ns/prod/* role=db-read' --ca 127.0.0.1:8443
//! ```
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lanyard::tls::{Authorizer, GrantSet, RevocationSet, TlsSource, peer_svid, server_config};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Parser)]
struct Args {
    /// Credential directory written by `lanyard agent --out`.
    #[arg(long)]
    svid_dir: PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: String,
    /// Who may call, e.g. 'spiffe://example.org/ns/prod/* role=db-read' (repeatable).
    #[arg(long, required = true)]
    allow: Vec<String>,
    /// CA address: follow its revocations (revoked clients are refused at once) and the grants
    /// of federated identities.
    #[arg(long)]
    ca: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let source =
        TlsSource::from_dir(&args.svid_dir, Default::default(), Duration::from_secs(1)).await?;
    let mut authz = Authorizer::parse(&args.allow)?;
    let mut grants = None;
    let revocations = args.ca.map(|ca| {
        let g = GrantSet::new();
        g.follow(ca.clone(), source.clone());
        authz = authz.clone().with_grants(g.clone());
        grants = Some(g);
        let set = RevocationSet::new();
        set.follow(ca, source.clone());
        set
    });
    let mut config = server_config(&source, authz, revocations)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(&args.listen).await?;
    eprintln!(
        "hello_server listening on {} as {:?}",
        listener.local_addr()?,
        source.svid().map(|s| s.spiffe_id.to_string())
    );
    loop {
        let (tcp, addr) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let source = source.clone();
        let grants = grants.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("refused {addr}: {e}");
                    return;
                }
            };
            let mut peer = peer_svid(tls.get_ref().1.peer_certificates(), &source);
            // A peer of a federated domain holds only what this domain's CA granted it.
            if let (Some(p), Some(g)) = (peer.as_mut(), &grants) {
                p.roles
                    .extend(g.roles_for(&p.spiffe_id, lanyard::tls::unix_now()));
                p.roles.sort_unstable();
                p.roles.dedup();
            }
            let me = source.svid();
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = format!(
                    "hello {}, roles [{}]; this is {} (serial {})\n",
                    peer.as_ref()
                        .map_or("?".into(), |p| p.spiffe_id.to_string()),
                    peer.as_ref().map_or(String::new(), |p| p.roles.join(",")),
                    me.as_ref().map_or("?".into(), |m| m.spiffe_id.to_string()),
                    me.as_ref().map_or("?".into(), |m| m.serial.to_hex()),
                );
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                eprintln!("connection from {addr}: {e}");
            }
        });
    }
}
