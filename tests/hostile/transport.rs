//! Hostile inputs: transport. Connections that complete the TLS handshake and then send
//! nothing (or only the HTTP/2 preface) must not exhaust the CA's file descriptors: the caps
//! refuse what one source (or everyone together) holds beyond its share before the handshake,
//! silent connections are closed after `request_start_timeout`, idle ones after `idle_timeout`,
//! and a long-lived watch that carries nothing is never cut. Other sources on 127.0.0.0/8 stand
//! in for other hosts.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use lanyard::ca::RolesOid;
use lanyard::pb::v1::{self as pb, ca_client::CaClient, revocation_client::RevocationClient};
use lanyard::tls::{Bundle, ServerTrust, ServerVerifier, provider};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use crate::common::{ChildGuard, LANYARD_ENV_VARS, POLICY, TestCa, lanyard_bin, poll_until};

const SOURCE_1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const SOURCE_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const SOURCE_3: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const SOURCE_4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
/// The HTTP/2 client preface and an empty SETTINGS frame: what a real client sends first.
const H2_START: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
/// Longer than any close this suite expects; a connection still open then was never closed.
const PATIENCE: Duration = Duration::from_secs(6);

/// A TLS 1.3 client config trusting `ca` for `spiffe://example.org/lanyard/server`.
fn client_tls(ca: &TestCa, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    client_tls_for(ca.bundle(), alpn)
}

/// A TLS 1.3 client config trusting `bundle` for `spiffe://example.org/lanyard/server`.
fn client_tls_for(bundle: Bundle, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let verifier = ServerVerifier::for_path(
        ServerTrust::Bundle(bundle),
        "/lanyard/server",
        RolesOid::default(),
    );
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

/// A TCP connection from `source` to `to`.
async fn tcp_from(source: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// A completed TLS handshake from `source`; an error when the server closed the connection.
/// Panics if the server neither finishes nor refuses within `PATIENCE`.
async fn tls_from(
    source: IpAddr,
    to: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let attempt = async {
        let tcp = tcp_from(source, to).await?;
        tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("lanyard").unwrap(), tcp)
            .await
    };
    tokio::time::timeout(PATIENCE, attempt)
        .await
        .expect("the server neither finished nor refused the handshake")
}

/// Opens `n` TLS connections from `source` one after another; returns those the server kept
/// and how many it closed during the handshake.
async fn open_many(
    n: usize,
    source: IpAddr,
    to: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> (Vec<TlsStream<TcpStream>>, usize) {
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        match tls_from(source, to, cfg.clone()).await {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    (held, refused)
}

/// Reads (discarding whatever the server sends) until the server closes the connection;
/// returns when, or None if it was still open after `PATIENCE`.
async fn closed_after(mut conn: TlsStream<TcpStream>, since: Instant) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let deadline = since + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A gRPC channel to `to` whose connections come from `source`.
async fn channel_from(to: SocketAddr, cfg: Arc<rustls::ClientConfig>, source: IpAddr) -> Channel {
    Endpoint::from_shared(format!("http://{to}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let cfg = cfg.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(tls_from(source, to, cfg).await?)) }
        }))
        .await
        .expect("connect")
}

/// Whether a `GetTrustBundle` from `source` is answered (within 5 s).
async fn served_from(ca: &TestCa, source: IpAddr) -> bool {
    grpc_served(ca.addr, client_tls(ca, b"h2"), source).await
}

/// Whether a `GetTrustBundle` to `to` from `source` is answered (within 5 s).
async fn grpc_served(to: SocketAddr, cfg: Arc<rustls::ClientConfig>, source: IpAddr) -> bool {
    let call = async {
        CaClient::new(channel_from(to, cfg, source).await)
            .get_trust_bundle(pb::GetTrustBundleRequest {})
            .await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), call).await,
        Ok(Ok(r)) if !r.get_ref().ca_certs.is_empty()
    )
}

#[tokio::test]
async fn one_source_cannot_hold_more_than_its_share_and_silent_connections_are_closed() {
    let ca = TestCa::start_with(
        "max_connections = 32\nmax_connections_per_source = 16\n\
         request_start_timeout = \"1s\"\nidle_timeout = \"2s\"\n",
        POLICY,
    )
    .await;
    let cfg = client_tls(&ca, b"h2");
    // Eight that send nothing after the handshake, eight that send the HTTP/2 preface and then
    // nothing; four more are over the per-source cap.
    let (mut silent, refused_a) = open_many(8, SOURCE_1, ca.addr, &cfg).await;
    let (mut idle, refused_b) = open_many(8, SOURCE_1, ca.addr, &cfg).await;
    let opened = Instant::now();
    for c in &mut idle {
        c.write_all(H2_START).await.unwrap();
    }
    let (extra, refused) = open_many(4, SOURCE_1, ca.addr, &cfg).await;
    assert_eq!(
        (refused_a, refused_b, extra.len(), refused),
        (0, 0, 0, 4),
        "connections beyond max_connections_per_source are closed before the handshake"
    );
    assert!(
        served_from(&ca, SOURCE_2).await,
        "another source is served while 127.0.0.1 holds its cap"
    );

    let silent_closed =
        futures_util::future::join_all(silent.drain(..).map(|c| closed_after(c, opened))).await;
    for at in &silent_closed {
        let at = at.expect("a connection that never sent the HTTP/2 preface is closed");
        assert!(at < Duration::from_secs(3), "closed after {at:?}");
    }
    let idle_closed =
        futures_util::future::join_all(idle.drain(..).map(|c| closed_after(c, opened))).await;
    for at in &idle_closed {
        let at = at.expect("an idle HTTP/2 connection is closed after idle_timeout");
        assert!(at >= Duration::from_millis(1500), "closed after {at:?}");
    }
    assert!(
        served_from(&ca, SOURCE_1).await,
        "127.0.0.1 is served again once its connections are gone"
    );
}

#[tokio::test]
async fn all_sources_together_cannot_exceed_the_total_cap() {
    let ca = TestCa::start_with(
        "max_connections = 6\nmax_connections_per_source = 4\nrequest_start_timeout = \"1s\"\n",
        POLICY,
    )
    .await;
    let cfg = client_tls(&ca, b"h2");
    let (one, refused_one) = open_many(5, SOURCE_1, ca.addr, &cfg).await;
    let (three, refused_three) = open_many(3, SOURCE_3, ca.addr, &cfg).await;
    let (four, refused_four) = open_many(1, SOURCE_4, ca.addr, &cfg).await;
    assert_eq!(
        (
            one.len(),
            refused_one,
            three.len(),
            refused_three,
            four.len(),
            refused_four
        ),
        (4, 1, 2, 1, 0, 1),
        "4 from 127.0.0.1 (its cap), 2 from 127.0.0.3 (the total), none from 127.0.0.4"
    );
    let since = Instant::now();
    for c in one.into_iter().chain(three) {
        assert!(closed_after(c, since).await.is_some());
    }
    // Closed connections free their places (the server may take a moment to count them out).
    let mut served = false;
    for _ in 0..20 {
        if served_from(&ca, SOURCE_4).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "127.0.0.4 is served once the others are gone");
}

#[tokio::test]
async fn a_quiet_watch_keeps_its_connection_past_the_idle_timeout() {
    let ca = TestCa::start_with("idle_timeout = \"2s\"\n", POLICY).await;
    // Control: an HTTP/2 connection with no request is closed after about 2 s.
    let mut idle = tls_from(SOURCE_1, ca.addr, client_tls(&ca, b"h2"))
        .await
        .unwrap();
    idle.write_all(H2_START).await.unwrap();
    let opened = Instant::now();

    let watching = ca.admin_channel().await;
    let mut watch = RevocationClient::new(watching.clone())
        .watch(pb::WatchRequest { since: 0 })
        .await
        .unwrap()
        .into_inner();
    let idle_closed = closed_after(idle, opened).await;
    assert!(
        idle_closed.is_some_and(|t| t >= Duration::from_millis(1500)),
        "an idle connection is closed after idle_timeout: {idle_closed:?}"
    );
    // Well past the idle timeout, with no message on it: the stream must still be open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    match tokio::time::timeout(Duration::from_millis(200), watch.message()).await {
        Err(_) => {}
        Ok(r) => panic!("the watch ended or spoke while nothing happened: {r:?}"),
    }
    RevocationClient::new(ca.admin_channel().await)
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::SpiffeId(
                "spiffe://example.org/ns/dev/quiet".into(),
            )),
            reason: "transport test".into(),
            lift: false,
        })
        .await
        .unwrap();
    let entry = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch delivers the revocation")
        .expect("the watch stream is intact")
        .expect("the watch stream is open");
    assert_eq!(entry.spiffe_id, "spiffe://example.org/ns/dev/quiet");
}

/// The bundle endpoint address a CA wrote to its data dir.
fn bundle_endpoint(ca: &TestCa) -> SocketAddr {
    std::fs::read_to_string(ca.data_dir().join("bundle_endpoint.addr"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `GET /` on the bundle endpoint from `source`: the status line and body.
async fn fetch_bundle_from(ca: &TestCa, source: IpAddr) -> io::Result<String> {
    let mut tls = tls_from(source, bundle_endpoint(ca), client_tls(ca, b"http/1.1")).await?;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: lanyard\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    // A peer that closes without close_notify still sent its whole response.
    if !matches!(read, Ok(Ok(_)) | Ok(Err(_))) {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "no response"));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn the_bundle_endpoint_caps_sources_and_closes_silent_connections() {
    let ca = TestCa::start_with(
        "bundle_endpoint_listen = \"127.0.0.1:0\"\nbundle_endpoint_max_connections = 8\n\
         bundle_endpoint_max_connections_per_source = 4\nrequest_start_timeout = \"1s\"\n",
        POLICY,
    )
    .await;
    let cfg = client_tls(&ca, b"http/1.1");
    let (held, refused) = open_many(6, SOURCE_1, bundle_endpoint(&ca), &cfg).await;
    let opened = Instant::now();
    assert_eq!(
        (held.len(), refused),
        (4, 2),
        "connections beyond bundle_endpoint_max_connections_per_source are closed at once"
    );
    let answer = fetch_bundle_from(&ca, SOURCE_2).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("\"keys\""),
        "another source gets the bundle: {answer}"
    );
    for c in held {
        let at = closed_after(c, opened)
            .await
            .expect("a connection that sends no request is closed");
        assert!(at < Duration::from_secs(3), "closed after {at:?}");
    }
    let answer = fetch_bundle_from(&ca, SOURCE_1).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "127.0.0.1 is served again: {answer}"
    );
}

/// The soft and hard "Max open files" of a process.
fn open_file_limits(pid: u32) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut words = line["Max open files".len()..].split_whitespace();
    Some((words.next()?.to_string(), words.next()?.to_string()))
}

/// A `lanyard serve` child process started by a shell that first runs `ulimit`.
struct ChildCa {
    server: ChildGuard,
    addr: SocketAddr,
    bundle: Bundle,
    _dir: tempfile::TempDir,
}

/// Starts `lanyard serve` (config: `extra` and the test policy) after `ulimit <ulimit>` in the
/// shell that becomes the server, so it inherits the lowered limits; waits until it listens.
async fn serve_after_ulimit(ulimit: &str, extra: &str) -> ChildCa {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanyard.toml");
    std::fs::write(
        &config,
        format!("trust_domain = \"example.org\"\nlisten = \"127.0.0.1:0\"\n{extra}\n{POLICY}"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut shell = std::process::Command::new("sh");
    for v in LANYARD_ENV_VARS {
        shell.env_remove(v);
    }
    shell
        .arg("-c")
        .arg(format!(
            "ulimit {ulimit} && exec \"$0\" serve --config \"$1\" --data-dir \"$2\""
        ))
        .arg(lanyard_bin())
        .arg(&config)
        .arg(&data)
        .env("LANYARD_LOG", "info");
    let server = ChildGuard::spawn("lanyard serve", &mut shell, &dir.path().join("serve.log"));
    let addr = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        std::fs::read_to_string(data.join("serve.addr"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .await
    .unwrap_or_else(|| panic!("server did not start: {}", server.output()));
    let bundle = Bundle::from_pem(&std::fs::read(data.join("admin/bundle.pem")).unwrap()).unwrap();
    ChildCa {
        server,
        addr,
        bundle,
        _dir: dir,
    }
}

#[tokio::test]
async fn serve_raises_its_open_file_soft_limit_to_the_hard_limit() {
    // 512 stands for the common soft limit of 1024: any figure below the hard limit.
    let mut ca = serve_after_ulimit("-Sn 512", "").await;
    assert!(ca.server.is_running());
    let (soft, hard) = open_file_limits(ca.server.pid()).unwrap();
    assert_ne!(hard, "512", "the test needs a hard limit above 512");
    assert_eq!(soft, hard, "soft open-file limit after start");
    let log = ca.server.output();
    assert!(
        log.contains("open file limit") && log.contains(&hard),
        "the figure is logged: {log}"
    );
}

#[tokio::test]
async fn a_flood_under_a_low_hard_limit_never_runs_the_server_out_of_descriptors() {
    // A hard limit of 320 leaves 64 connections after the 256 descriptors kept in reserve: the
    // default caps (8192 in total, 1024 per source) must come down to that, so 400 connections
    // from one address are refused at the cap instead of running the server into EMFILE.
    let mut ca = serve_after_ulimit("-n 320", "request_start_timeout = \"3s\"\n").await;
    let cfg = client_tls_for(ca.bundle.clone(), b"h2");
    let (held, refused) = open_many(400, SOURCE_1, ca.addr, &cfg).await;
    assert_eq!((held.len(), refused), (64, 336));
    drop(held);
    let mut served = false;
    for _ in 0..20 {
        if grpc_served(ca.addr, cfg.clone(), SOURCE_2).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "served after the flood: {}", ca.server.output());
    assert!(ca.server.is_running());
    let log = ca.server.output();
    assert!(log.contains("connection caps lowered"), "{log}");
    assert!(!log.contains("accept failed"), "{log}");
    let warnings = log.matches("connections refused").count();
    assert!(
        (1..=2).contains(&warnings),
        "336 refusals make one warning (with a count), not one line each: {warnings}"
    );
}
