//! The client side of `hello_server`: calls it over SPIFFE mTLS with lanyard::tls, checking the
//! server's SPIFFE ID (not a DNS name), and keeps calling so rotations on either side show up.
//!
//! ```text
//! cargo run --example hello_client -- --svid-dir ./api-svid --server 127.0.0.1:9443 \
//!     --expect spiffe://example.org/ns/prod/db --count 5 --interval 2s
//! ```
#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, reason = "an example prints what it gets")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use lanyard::tls::{Authorizer, TlsSource, client_config};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Parser)]
struct Args {
    /// Credential directory written by `lanyard agent --out`.
    #[arg(long)]
    svid_dir: PathBuf,
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:9443")]
    server: String,
    /// The server's expected SPIFFE ID (or a rule such as 'spiffe://example.org/ns/prod/*').
    #[arg(long)]
    expect: String,
    /// Number of calls.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Pause between calls.
    #[arg(long, value_parser = lanyard::config::parse_duration, default_value = "1s")]
    interval: Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut failures = 0;
    let source =
        match TlsSource::from_dir(&args.svid_dir, Default::default(), Duration::from_secs(1)).await
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot load {}: {e}", args.svid_dir.display());
                return std::process::ExitCode::FAILURE;
            }
        };
    for i in 0..args.count {
        if i > 0 {
            tokio::time::sleep(args.interval).await;
        }
        match call(&args, &source).await {
            Ok(body) => print!("{body}"),
            Err(e) => {
                failures += 1;
                println!("call failed: {}", lanyard::client::error_chain(e.as_ref()));
            }
        }
    }
    if failures == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

async fn call(args: &Args, source: &Arc<TlsSource>) -> Result<String, Box<dyn std::error::Error>> {
    let mut config = client_config(source, Authorizer::parse(&[&args.expect])?, None)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(&args.server).await?;
    // The name is only used for SNI; the server is authenticated by its SPIFFE ID.
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("/")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())?,
        )
        .await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(format!("HTTP {status}").into());
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}
