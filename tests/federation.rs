//! Issue 7, federation across trust domains, end to end: two real CA servers (`a.example` and
//! `b.example`) that serve their SPIFFE bundles at bundle endpoints and refresh each other's at
//! the refresh hint; a `lanyard agent` process in each domain that delivers the foreign bundle
//! to workloads (Workload API and `federated/<td>.pem`); and `lanyard::tls` services that do
//! mTLS across the domains — accepted when an authorization rule names the other domain,
//! refused when none does — and keep doing it through a CA rotation on one side with nothing
//! restarted. Bundle documents are checked with parsers nobody here wrote (PyJWT, `cryptography`
//! and py-spiffe).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    ChildGuard, TestCa, command_works, free_port, lanyard_cmd, poll_until, require_tool,
    spawn_agent, wait_for_svid,
};
use hyper_util::rt::TokioIo;
use lanyard::agent::split_der;
use lanyard::ca::{RolesOid, SvidInfo};
use lanyard::federation::SpiffeBundle;
use lanyard::pb::v1::{self as pb, admin_client::AdminClient, ca_client::CaClient};
use lanyard::pb::workload::{self as wl, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use lanyard::spiffe::TrustDomain;
use lanyard::tls::{Authorizer, TlsSource, client_config, peer_svid, server_config};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const A: &str = "a.example";
const B: &str = "b.example";
const A_WEB: &str = "spiffe://a.example/ns/prod/web";
const B_DB: &str = "spiffe://b.example/ns/prod/db";
/// How often `TlsSource::from_dir` looks at the agent's files.
const POLL: Duration = Duration::from_millis(100);

// === two federated CAs ===

/// The config of one domain's CA: a bundle endpoint on `port`, federated with `peer` whose
/// endpoint is on `peer_port`. `extra` holds more top-level settings.
fn ca_config(td: &str, port: u16, peer: &str, peer_port: u16, extra: &str) -> String {
    format!(
        r#"trust_domain = "{td}"
min_ttl = "1s"
bundle_endpoint_listen = "127.0.0.1:{port}"
bundle_refresh_hint = "1s"
{extra}

[[federation]]
trust_domain = "{peer}"
bundle_endpoint_url = "https://127.0.0.1:{peer_port}/bundle"
endpoint_spiffe_id = "spiffe://{peer}/lanyard/server"

[[policy]]
spiffe_id = "spiffe://{td}/ns/prod/*"
roles = ["db-read"]
max_ttl = "10m"
"#
    )
}

/// Two CAs federated with each other. B starts first, knowing nothing of A; A starts with B's
/// bundle as `initial_bundle`; B gets A's bundle with `lanyard bundle import` (the CLI). From
/// then on each refreshes the other's bundle from its endpoint.
struct Pair {
    a: TestCa,
    b: TestCa,
}

impl Pair {
    async fn start(extra_a: &str, extra_b: &str) -> Self {
        let (pa, pb_) = (free_port(), free_port());
        let b = TestCa::start_with_full_config(&ca_config(B, pb_, A, pa, extra_b)).await;
        let b_bundle = b.dir.path().join("b-bundle.json");
        std::fs::write(&b_bundle, spiffe_bundle(&b, "").await.jwks).unwrap();
        let a_extra = format!("{extra_a}\n");
        let mut a_config = ca_config(A, pa, B, pb_, &a_extra);
        a_config = a_config.replace(
            "endpoint_spiffe_id = \"spiffe://b.example/lanyard/server\"",
            &format!(
                "endpoint_spiffe_id = \"spiffe://b.example/lanyard/server\"\ninitial_bundle = \"{}\"",
                b_bundle.display()
            ),
        );
        let a = TestCa::start_with_full_config(&a_config).await;

        // `lanyard bundle export` on A, `lanyard bundle import` on B.
        let a_bundle = a.dir.path().join("a-bundle.json");
        let out = cli(
            &a,
            &["bundle", "export", "--out", a_bundle.to_str().unwrap()],
        )
        .await;
        assert!(out.status.success(), "bundle export: {out:?}");
        let out = cli(
            &b,
            &["bundle", "import", "--trust-domain", A, a_bundle.to_str().unwrap()],
        )
        .await;
        assert!(out.status.success(), "bundle import: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("installed: 1 authorities"),
            "{out:?}"
        );
        let pair = Self { a, b };
        pair.wait_federated(A, 1).await;
        pair.wait_federated(B, 1).await;
        pair
    }

    /// The CA of `td`, and the other one.
    fn of(&self, td: &str) -> (&TestCa, &TestCa) {
        if td == A {
            (&self.a, &self.b)
        } else {
            (&self.b, &self.a)
        }
    }

    /// Waits until the *other* CA holds `td`'s bundle with `n` authorities; returns it.
    async fn wait_federated(&self, td: &str, n: usize) -> SpiffeBundle {
        let (_, other) = self.of(td);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(b) = try_spiffe_bundle(other, td).await {
                let b = SpiffeBundle::decode(TrustDomain::new(td).unwrap(), b.jwks.as_bytes())
                    .unwrap();
                if b.authorities().len() == n {
                    return b;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the CA of the other domain never got {td}'s bundle with {n} authorities"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs `lanyard ARGS... --server <ca> --credential <ca admin>`.
async fn cli(ca: &TestCa, args: &[&str]) -> std::process::Output {
    let mut cmd = lanyard_cmd();
    cmd.args(args)
        .args(["--server", &ca.server(), "--credential"])
        .arg(ca.admin_dir());
    tokio::process::Command::from(cmd)
        .output()
        .await
        .expect("run lanyard")
}

async fn try_spiffe_bundle(ca: &TestCa, td: &str) -> Result<pb::SpiffeBundle, tonic::Status> {
    CaClient::new(ca.anon_channel().await)
        .get_spiffe_bundle(pb::GetSpiffeBundleRequest {
            trust_domain: td.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn spiffe_bundle(ca: &TestCa, td: &str) -> pb::SpiffeBundle {
    try_spiffe_bundle(ca, td).await.expect("GetSpiffeBundle")
}

/// The bundle endpoint address a CA wrote to its data dir.
fn endpoint_of(ca: &TestCa) -> SocketAddr {
    std::fs::read_to_string(ca.data_dir().join("bundle_endpoint.addr"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Starts a `lanyard agent` for `id` against `ca` with a Workload API socket; waits for its
/// first certificate. Returns the guard, the credential dir and the socket path.
async fn agent(ca: &TestCa, name: &str, id: &str, roles: &[&str]) -> (ChildGuard, PathBuf, PathBuf) {
    let token = ca.token(id, roles, 600, 1).await;
    let out = ca.dir.path().join(name);
    let sock = ca.dir.path().join(format!("{name}.sock"));
    let guard = spawn_agent(
        &ca.server(),
        &token,
        &out,
        &["--ttl", "6s", "--workload-socket", sock.to_str().unwrap()],
    );
    wait_for_svid(&out, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("agent {name} got no certificate: {}", guard.output()));
    (guard, out, sock)
}

/// CA certificates (DER) in a PEM file.
fn pem_certs(path: &Path) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).unwrap_or_default();
    rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

/// Waits until `dir/federated/<td>.pem` holds exactly the authorities of `want`.
async fn wait_federated_file(dir: &Path, td: &str, want: &SpiffeBundle) {
    let mut want: Vec<Vec<u8>> = want.authorities().iter().map(|c| c.to_vec()).collect();
    want.sort();
    let path = dir.join("federated").join(format!("{td}.pem"));
    poll_until(Duration::from_secs(15), Duration::from_millis(50), || {
        let mut got = pem_certs(&path);
        got.sort();
        (got == want).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{} never matched the federated bundle", path.display()));
}

// === the Workload API, as an unmodified client speaks it ===

async fn workload_client(socket: &Path) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .expect("connect to the Workload API");
    SpiffeWorkloadApiClient::new(channel)
}

fn with_header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// The first message of FetchX509SVID and of FetchX509Bundles.
async fn workload_state(socket: &Path) -> (wl::X509svidResponse, wl::X509BundlesResponse) {
    let mut c = workload_client(socket).await;
    let svid = c
        .fetch_x509svid(with_header(wl::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let bundles = c
        .fetch_x509_bundles(with_header(wl::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    (svid, bundles)
}

// === mTLS services built with lanyard::tls ===

/// What the server saw of one connection.
type Seen = Result<SvidInfo, String>;

/// An mTLS echo server that records each handshake.
struct EchoServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    async fn start(config: ServerConfig, source: Arc<TlsSource>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, source, log) = (acceptor.clone(), source.clone(), log.clone());
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(e) => {
                            log.lock().unwrap().push(Err(e.to_string()));
                            return;
                        }
                    };
                    let peer = peer_svid(tls.get_ref().1.peer_certificates(), &source).unwrap();
                    log.lock().unwrap().push(Ok(peer.clone()));
                    let mut conn = BufReader::new(tls);
                    let hello = format!("hello {}\n", peer.spiffe_id);
                    let _ = conn.write_all(hello.as_bytes()).await;
                    let mut line = String::new();
                    while conn.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                        if conn.write_all(line.as_bytes()).await.is_err() {
                            return;
                        }
                        line.clear();
                    }
                });
            }
        });
        Self { addr, seen, task }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    async fn seen_after(&self, from: usize) -> Seen {
        poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
            self.seen.lock().unwrap().get(from).cloned()
        })
        .await
        .expect("the server recorded the handshake")
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One call: handshake, greeting, echo. `Ok(server SVID, greeting)` or why it failed.
async fn call(addr: SocketAddr, config: &Arc<ClientConfig>) -> Result<(SvidInfo, String), String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = TlsConnector::from(config.clone())
            .connect(ServerName::try_from("db.invalid").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let server = lanyard::ca::parse_svid(&leaf, &RolesOid::default()).unwrap();
        let mut conn = BufReader::new(tls);
        conn.write_all(b"ping\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut greeting = String::new();
        match conn.read_line(&mut greeting).await {
            Ok(0) => return Err("first read: connection closed".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("first read: {e}")),
        }
        let mut echo = String::new();
        conn.read_line(&mut echo)
            .await
            .map_err(|e| format!("echo: {e}"))?;
        if echo != "ping\n" {
            return Err(format!("bad echo {echo:?}"));
        }
        Ok((server, greeting.trim().to_string()))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

async fn source(dir: &Path) -> Arc<TlsSource> {
    TlsSource::from_dir(dir, RolesOid::default(), POLL)
        .await
        .unwrap()
}

fn client(source: &Arc<TlsSource>, rules: &[&str]) -> Arc<ClientConfig> {
    Arc::new(client_config(source, Authorizer::parse(rules).unwrap(), None).unwrap())
}

async fn server(source: &Arc<TlsSource>, rules: &[&str]) -> EchoServer {
    let cfg = server_config(source, Authorizer::parse(rules).unwrap(), None).unwrap();
    EchoServer::start(cfg, source.clone()).await
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_domain_mtls_is_accepted_only_when_a_rule_names_the_other_domain() {
    let pair = Pair::start("", "").await;
    let (_web_agent, web_dir, web_sock) = agent(&pair.a, "web", A_WEB, &["db-read"]).await;
    let (_db_agent, db_dir, db_sock) = agent(&pair.b, "db", B_DB, &[]).await;

    // The foreign bundle reached both agents' files ...
    let a_bundle = pair.wait_federated(A, 1).await;
    let b_bundle = pair.wait_federated(B, 1).await;
    wait_federated_file(&db_dir, A, &a_bundle).await;
    wait_federated_file(&web_dir, B, &b_bundle).await;
    // ... and their Workload APIs: federated_bundles and bundles, keyed spiffe://<td>.
    let (svid, bundles) = workload_state(&db_sock).await;
    let a_der: Vec<u8> = a_bundle.concatenated_der();
    assert_eq!(svid.federated_bundles.get("spiffe://a.example"), Some(&a_der));
    assert_eq!(bundles.bundles.get("spiffe://a.example"), Some(&a_der));
    assert_eq!(
        bundles.bundles.get("spiffe://b.example").map(|d| split_der(d).unwrap().len()),
        Some(1),
        "the own bundle is there too"
    );
    let (svid, _) = workload_state(&web_sock).await;
    assert_eq!(
        svid.federated_bundles.get("spiffe://b.example"),
        Some(&b_bundle.concatenated_der())
    );

    // b.example's database accepts a.example's web tier by a rule that names a.example.
    let db_src = source(&db_dir).await;
    let web_src = source(&web_dir).await;
    let db = server(&db_src, &["spiffe://a.example/ns/prod/* role=db-read"]).await;
    let web_client = client(&web_src, &["td:b.example"]);
    let n = db.count();
    let (server_svid, greeting) = call(db.addr, &web_client).await.expect("accepted");
    assert_eq!(server_svid.spiffe_id.as_str(), B_DB);
    assert_eq!(greeting, format!("hello {A_WEB}"));
    let seen = db.seen_after(n).await.expect("server side accepted");
    assert_eq!(seen.roles, vec!["db-read"]);

    // A server whose rules name only its own domain refuses the foreign client, even though
    // it holds a.example's bundle: foreign identities are never implicitly trusted.
    let local_only = server(&db_src, &["spiffe://b.example/ns/prod/*"]).await;
    let n = local_only.count();
    assert!(call(local_only.addr, &web_client).await.is_err());
    let reason = local_only.seen_after(n).await.expect_err("refused");
    assert!(
        reason.contains(A_WEB) && reason.contains("no authorization rule names"),
        "{reason}"
    );
    // A rule naming the domain but a role the client lacks refuses it too.
    let wrong_role = server(&db_src, &["td:a.example role=deploy"]).await;
    let n = wrong_role.count();
    assert!(call(wrong_role.addr, &web_client).await.is_err());
    let reason = wrong_role.seen_after(n).await.expect_err("refused");
    assert!(reason.contains("matches no rule"), "{reason}");
    // And the client side: a client whose rules do not name b.example refuses the server.
    let err = call(db.addr, &client(&web_src, &["spiffe://a.example/ns/prod/*"]))
        .await
        .expect_err("the client refuses a server of an unnamed domain");
    assert!(err.contains("no authorization rule names"), "{err}");
}
