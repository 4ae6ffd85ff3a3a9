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
    ChildGuard, EchoServer, TestCa, command_works, free_port, lanyard_cmd, poll_until,
    require_tool, spawn_agent, wait_for_svid, workload_client,
};
use lanyard::agent::split_der;
use lanyard::ca::{RolesOid, SvidInfo};
use lanyard::federation::SpiffeBundle;
use lanyard::pb::v1::{self as pb, admin_client::AdminClient, ca_client::CaClient};
use lanyard::pb::workload as wl;
use lanyard::spiffe::TrustDomain;
use lanyard::tls::{Authorizer, GrantSet, RevocationSet, TlsSource, client_config, server_config};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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
        Self::start_with(extra_a, extra_b, false).await
    }

    /// `relay`: A also relays B's revocations (`revocation_server` in its `[[federation]]`).
    async fn start_with(extra_a: &str, extra_b: &str, relay: bool) -> Self {
        let (pa, pb_) = (free_port(), free_port());
        let b = TestCa::start_with_full_config(&ca_config(B, pb_, A, pa, extra_b)).await;
        let b_bundle = b.dir.path().join("b-bundle.json");
        std::fs::write(&b_bundle, spiffe_bundle(&b, "").await.jwks).unwrap();
        let a_extra = format!("{extra_a}\n");
        let mut a_config = ca_config(A, pa, B, pb_, &a_extra);
        a_config = a_config.replace(
            "endpoint_spiffe_id = \"spiffe://b.example/lanyard/server\"",
            &format!(
                "endpoint_spiffe_id = \"spiffe://b.example/lanyard/server\"\ninitial_bundle = \"{}\"{}",
                b_bundle.display(),
                if relay {
                    format!("\nrevocation_server = \"{}\"", b.server())
                } else {
                    String::new()
                }
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
            &[
                "bundle",
                "import",
                "--trust-domain",
                A,
                a_bundle.to_str().unwrap(),
            ],
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

    /// Writes `text` to `<ca's temp dir>/name`; returns the path.
    fn dir_file(&self, ca: &TestCa, name: &str, text: &str) -> PathBuf {
        let p = ca.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
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
                let b =
                    SpiffeBundle::decode(TrustDomain::new(td).unwrap(), b.jwks.as_bytes()).unwrap();
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

/// Starts a `lanyard agent` for `id` against `ca` with a Workload API socket and 6 s
/// certificates; waits for its first certificate. Returns the guard, the credential dir and the
/// socket path.
async fn agent(
    ca: &TestCa,
    name: &str,
    id: &str,
    roles: &[&str],
) -> (ChildGuard, PathBuf, PathBuf) {
    agent_with_ttl(ca, name, id, roles, "6s").await
}

async fn agent_with_ttl(
    ca: &TestCa,
    name: &str,
    id: &str,
    roles: &[&str],
    ttl: &str,
) -> (ChildGuard, PathBuf, PathBuf) {
    let token = ca.token(id, roles, 0, 1).await;
    let out = ca.dir.path().join(name);
    let sock = ca.dir.path().join(format!("{name}.sock"));
    let guard = spawn_agent(
        &ca.server(),
        &token,
        &out,
        &["--ttl", ttl, "--workload-socket", sock.to_str().unwrap()],
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
    assert_eq!(
        svid.federated_bundles.get("spiffe://a.example"),
        Some(&a_der)
    );
    assert_eq!(bundles.bundles.get("spiffe://a.example"), Some(&a_der));
    assert_eq!(
        bundles
            .bundles
            .get("spiffe://b.example")
            .map(|d| split_der(d).unwrap().len()),
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
    let db = server(&db_src, &["spiffe://a.example/ns/prod/*"]).await;
    let web_client = client(&web_src, &["td:b.example"]);
    let n = db.event_count();
    let (server_svid, greeting) = call(db.addr, &web_client).await.expect("accepted");
    assert_eq!(server_svid.spiffe_id.as_str(), B_DB);
    // The shared echo server greets with the client's ID and serial.
    assert!(
        greeting.starts_with(&format!("hello {A_WEB} ")),
        "{greeting}"
    );
    let seen = db.next_event(n).await.expect("server side accepted");
    assert!(
        seen.roles.is_empty(),
        "the roles a.example's CA wrote mean nothing in b.example: {:?}",
        seen.roles
    );
    // So a rule that requires a role refuses the foreign client although its certificate
    // carries that role: only b.example can give it one (the temporary-access test below).
    let needs_role = server(&db_src, &["spiffe://a.example/ns/prod/* role=db-read"]).await;
    let n = needs_role.event_count();
    assert!(call(needs_role.addr, &web_client).await.is_err());
    let reason = needs_role.next_event(n).await.expect_err("refused");
    assert!(reason.contains("(roles: none) matches no rule"), "{reason}");

    // A server whose rules name only its own domain refuses the foreign client, even though
    // it holds a.example's bundle: foreign identities are never implicitly trusted.
    let local_only = server(&db_src, &["spiffe://b.example/ns/prod/*"]).await;
    let n = local_only.event_count();
    assert!(call(local_only.addr, &web_client).await.is_err());
    let reason = local_only.next_event(n).await.expect_err("refused");
    assert!(
        reason.contains(A_WEB) && reason.contains("no authorization rule names"),
        "{reason}"
    );
    // A rule naming the domain but a role the client lacks refuses it too.
    let wrong_role = server(&db_src, &["td:a.example role=deploy"]).await;
    let n = wrong_role.event_count();
    assert!(call(wrong_role.addr, &web_client).await.is_err());
    let reason = wrong_role.next_event(n).await.expect_err("refused");
    assert!(reason.contains("matches no rule"), "{reason}");
    // And the client side: a client whose rules do not name b.example refuses the server.
    let err = call(
        db.addr,
        &client(&web_src, &["spiffe://a.example/ns/prod/*"]),
    )
    .await
    .expect_err("the client refuses a server of an unnamed domain");
    assert!(err.contains("no authorization rule names"), "{err}");
}

/// Sends `request_line` (plus Host, an empty body, Connection: close) to a bundle endpoint over
/// https_spiffe TLS; returns the response's status line.
async fn raw_request(endpoint: SocketAddr, ca: &TestCa, request_line: &str) -> String {
    let verifier = lanyard::tls::ServerVerifier::for_id(
        lanyard::tls::ServerTrust::Bundle(ca.bundle()),
        lanyard::spiffe::SpiffeId::parse(&format!(
            "spiffe://{}/lanyard/server",
            ca.settings.trust_domain
        ))
        .unwrap(),
        RolesOid::default(),
    );
    let cfg = ClientConfig::builder_with_provider(lanyard::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let tcp = TcpStream::connect(endpoint).await.unwrap();
    let mut tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("bundles.invalid").unwrap(), tcp)
        .await
        .expect("https_spiffe handshake");
    let req = format!(
        "{request_line}\r\nHost: bundles.invalid\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut line = String::new();
    BufReader::new(tls).read_line(&mut line).await.unwrap();
    line.trim().to_string()
}

// === parsers nobody here wrote ===

fn python_ready() -> bool {
    require_tool(
        "python3 with the PyPI `spiffe` package (and its PyJWT and cryptography)",
        command_works("python3", &["-c", "import spiffe, jwt, cryptography, grpc"]),
        "pip install spiffe cryptography",
    )
}

/// Runs tests/python/check_bundle.py; returns its JSON verdict (panics on a violation).
async fn py_check(args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_bundle.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check_bundle.py {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bundle_documents_and_delivery_validate_with_py_spiffe() {
    let pair = Pair::start("", "").await;
    // Minute-long certificates: whatever reaches this agent in the next seconds was pushed by
    // the CA's bundle watch, not carried by a renewal.
    let (_db_agent, db_dir, db_sock) = agent_with_ttl(&pair.b, "db", B_DB, &[], "2m").await;
    let a_bundle = pair.wait_federated(A, 1).await;
    wait_federated_file(&db_dir, A, &a_bundle).await;
    let serial = common::dir_svid(&db_dir).unwrap().serial;

    // An admin imports a third domain's bundle (PEM) into b.example: its workloads see it within
    // a second, through the files and the Workload API, with no new certificate.
    let c_key = rcgen::KeyPair::generate().unwrap();
    let mut c_params = rcgen::CertificateParams::default();
    c_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let c_root = c_params.self_signed(&c_key).unwrap();
    let resp = AdminClient::new(pair.b.admin_channel().await)
        .import_bundle(pb::ImportBundleRequest {
            trust_domain: "c.example".into(),
            bundle: c_root.pem().into_bytes(),
        })
        .await
        .expect("import")
        .into_inner();
    assert!(resp.changed && resp.authorities == 1 && resp.sequence == 0);
    let c_bundle = SpiffeBundle::new(
        TrustDomain::new("c.example").unwrap(),
        vec![c_root.der().clone()],
        None,
        None,
    )
    .unwrap();
    let pushed = Instant::now();
    wait_federated_file(&db_dir, "c.example", &c_bundle).await;
    let (_, bundles) = workload_state(&db_sock).await;
    assert_eq!(
        bundles.bundles.get("spiffe://c.example"),
        Some(&c_root.der().to_vec())
    );
    assert!(
        pushed.elapsed() < Duration::from_secs(5),
        "{:?}",
        pushed.elapsed()
    );
    assert_eq!(
        common::dir_svid(&db_dir).unwrap().serial,
        serial,
        "no renewal needed"
    );
    // Malformed imports are refused with the reason; the own domain cannot be imported.
    let mut admin = AdminClient::new(pair.b.admin_channel().await);
    let err = admin
        .import_bundle(pb::ImportBundleRequest {
            trust_domain: "c.example".into(),
            bundle: b"{\"keys\": [{\"use\": \"x509-svid\", \"kty\": \"EC\"}]}".to_vec(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("without x5c"), "{err:?}");
    let err = admin
        .import_bundle(pb::ImportBundleRequest {
            trust_domain: B.into(),
            bundle: c_root.pem().into_bytes(),
        })
        .await
        .expect_err("own domain");
    assert!(err.message().contains("own trust domain"), "{err:?}");
    // `lanyard bundle remove`: the agent drops it as fast.
    let out = cli(
        &pair.b,
        &["bundle", "remove", "--trust-domain", "c.example"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let gone = db_dir.join("federated/c.example.pem");
    poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        (!gone.exists()).then_some(())
    })
    .await
    .expect("the removed bundle leaves the agent's files");
    // Files and the Workload API are updated one after the other; wait for the socket too.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let bundles = loop {
        let (_, bundles) = workload_state(&db_sock).await;
        if !bundles.bundles.contains_key("spiffe://c.example")
            || std::time::Instant::now() > deadline
        {
            break bundles;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!bundles.bundles.contains_key("spiffe://c.example"));
    assert!(bundles.bundles.contains_key("spiffe://a.example"));

    // The endpoint answers GET on any path with the JSON document, and nothing but GET.
    let endpoint = endpoint_of(&pair.a);
    let url = format!("https://{endpoint}/any/path");
    let trust = lanyard::federation::EndpointTrust::Spiffe {
        id: lanyard::spiffe::SpiffeId::parse("spiffe://a.example/lanyard/server").unwrap(),
        bundle: pair.a.bundle(),
        oid: RolesOid::default(),
    };
    let doc = lanyard::federation::fetch(&url.parse().unwrap(), &trust)
        .await
        .expect("fetch over https_spiffe");
    let served = SpiffeBundle::decode(TrustDomain::new(A).unwrap(), &doc).unwrap();
    assert_eq!(served.sequence(), Some(1));
    assert_eq!(served.refresh_hint(), Some(Duration::from_secs(1)));
    assert!(served.same_authorities(&a_bundle));
    // The wrong endpoint ID is refused.
    let wrong = lanyard::federation::EndpointTrust::Spiffe {
        id: lanyard::spiffe::SpiffeId::parse("spiffe://a.example/not-the-server").unwrap(),
        bundle: pair.a.bundle(),
        oid: RolesOid::default(),
    };
    let err = lanyard::federation::fetch(&url.parse().unwrap(), &wrong)
        .await
        .expect_err("wrong endpoint ID");
    assert!(err.to_string().contains("expected"), "{err}");
    // Anything but GET is refused.
    let status_line = raw_request(endpoint, &pair.a, "POST /bundle HTTP/1.1").await;
    assert!(status_line.starts_with("HTTP/1.1 405"), "{status_line}");
    let status_line = raw_request(endpoint, &pair.a, "GET / HTTP/1.1").await;
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    // CLI export prints the same document.
    let out = cli(&pair.a, &["bundle", "export"]).await;
    assert!(out.status.success(), "{out:?}");
    let exported =
        SpiffeBundle::decode(TrustDomain::new(A).unwrap(), &out.stdout).expect("export parses");
    assert_eq!(exported, served);

    if !python_ready() {
        return;
    }
    // Fetched by Python's own TLS (https_spiffe: chain to the bundle, URI SAN = endpoint ID) and
    // parsed by PyJWT, cryptography and py-spiffe.
    let a_pem = pair.dir_file(&pair.a, "a-bundle.pem", &a_bundle.to_pem());
    let v = py_check(&[
        A,
        "--url",
        &url,
        "--ca",
        a_pem.to_str().unwrap(),
        "--endpoint-id",
        "spiffe://a.example/lanyard/server",
    ])
    .await;
    assert_eq!(v["keys"], 1);
    assert_eq!(v["sequence"], 1);
    assert_eq!(v["refresh_hint"], 1);
    // The federated copy B serves for a.example, and what b.example's workloads get from their
    // agent's Workload API for a.example (py-spiffe's WorkloadApiClient).
    let federated = spiffe_bundle(&pair.b, A).await.jwks;
    let file = pair.dir_file(&pair.b, "a-federated.json", &federated);
    let v = py_check(&[
        A,
        "--file",
        file.to_str().unwrap(),
        "--socket",
        db_sock.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["keys"], 1);
    assert_eq!(v["workload_api_matches"], true, "{v}");
}

// === CA rotation ===

/// When a call was made and what came of it.
type CallResult = (Instant, Result<String, String>);

/// a.example's settings for the rotation test: seconds-scale certificates, so the old CA's last
/// certificate expires (and the CA leaves the bundle) 12 s after the switch.
const FAST_CA: &str = r#"max_cert_lifetime = "10s"
renewal_grace = "2s"
default_ttl = "6s"
server_cert_ttl = "10s"
admin_cert_ttl = "10s"
ca_rotation_overlap = "3s""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_domain_mtls_survives_a_ca_rotation_on_one_side() {
    let pair = Pair::start(FAST_CA, "").await;
    let (_web_agent, web_dir, _) = agent(&pair.a, "web", A_WEB, &["db-read"]).await;
    let (_db_agent, db_dir, _) = agent(&pair.b, "db", B_DB, &[]).await;
    let old = pair.wait_federated(A, 1).await;
    wait_federated_file(&db_dir, A, &old).await;
    let old_root = old.authorities()[0].clone();

    let db_src = source(&db_dir).await;
    let web_src = source(&web_dir).await;
    let db = server(&db_src, &["spiffe://a.example/ns/prod/*"]).await;
    let web_client = client(&web_src, &["td:b.example"]);
    call(db.addr, &web_client)
        .await
        .expect("accepted before the rotation");

    // A client calling every 200 ms for the whole rotation, with nothing restarted.
    let calls: Arc<Mutex<Vec<CallResult>>> = Arc::default();
    let caller = {
        let (calls, cfg, addr) = (calls.clone(), web_client.clone(), db.addr);
        tokio::spawn(async move {
            loop {
                let r = call(addr, &cfg).await.map(|(_, greeting)| greeting);
                calls.lock().unwrap().push((Instant::now(), r));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let started = Instant::now();
    let out = cli(&pair.a, &["ca", "rotate"]).await;
    assert!(out.status.success(), "ca rotate: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("phase: staged"), "{text}");
    assert!(text.contains("bundle sequence: 2"), "{text}");
    let again = cli(&pair.a, &["ca", "rotate"]).await;
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("rotation is in progress"),
        "{again:?}"
    );

    // Staged: b.example refreshes a.example's bundle (old + new) and its agent delivers it.
    let both = pair.wait_federated(A, 2).await;
    assert!(both.authorities().contains(&old_root));
    assert_eq!(both.sequence(), Some(2));
    let new_root = both
        .authorities()
        .iter()
        .find(|c| **c != old_root)
        .unwrap()
        .clone();
    wait_federated_file(&db_dir, A, &both).await;
    eprintln!("staged and federated after {:?}", started.elapsed());

    // Switched: the web agent's next certificate comes from the new CA.
    let new_only = lanyard::tls::Bundle::new(vec![new_root.clone()]).unwrap();
    poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let (cert, _) = lanyard::agent::read_consistent(&web_dir).ok()?;
        use rustls_pki_types::pem::PemObject;
        let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
            rustls_pki_types::CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<_, _>>()
                .ok()?;
        lanyard::tls::verify_svid(
            &chain,
            &new_only,
            lanyard::tls::unix_time(lanyard::tls::unix_now()),
            webpki::KeyUsage::client_auth(),
            &RolesOid::default(),
        )
        .ok()
    })
    .await
    .expect("the web workload gets a certificate from the new CA");
    eprintln!(
        "web certificate from the new CA after {:?}",
        started.elapsed()
    );

    // Completed: the old CA leaves a.example's bundle, and b.example follows.
    let after = pair.wait_federated(A, 1).await;
    assert_eq!(after.authorities(), std::slice::from_ref(&new_root));
    assert_eq!(after.sequence(), Some(3));
    wait_federated_file(&db_dir, A, &after).await;
    eprintln!("old CA dropped after {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(600)).await;
    caller.abort();

    // Every call across the rotation went through.
    let calls = calls.lock().unwrap().clone();
    assert!(calls.len() > 20, "{} calls", calls.len());
    let failed: Vec<_> = calls.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "calls failed during the rotation: {failed:?}"
    );
    call(db.addr, &web_client)
        .await
        .expect("accepted after the rotation");

    // Audited on both sides.
    let kinds = |log: &[lanyard::store::AuditRecord], kind: &str| {
        log.iter().filter(|r| r.kind == kind).count()
    };
    let a_log = pair.a.audit_log().await;
    for k in [
        "ca_rotation_staged",
        "ca_rotation_switched",
        "ca_rotation_completed",
    ] {
        assert_eq!(kinds(&a_log, k), 1, "{k}");
    }
    let b_log = pair.b.audit_log().await;
    let updates: Vec<_> = b_log
        .iter()
        .filter(|r| r.kind == "bundle_updated" && r.subject == "spiffe://a.example")
        .map(|r| r.reason.clone())
        .collect();
    assert!(
        updates
            .iter()
            .any(|r| r.starts_with("2 authorities, sequence 2 from https://")),
        "{updates:?}"
    );
    assert!(
        updates
            .iter()
            .any(|r| r.starts_with("1 authorities, sequence 3 from https://")),
        "{updates:?}"
    );
}

// === persistence and failures ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_good_bundle_survives_an_unreachable_endpoint_and_a_restart() {
    let pair = Pair::start("", "").await;
    let a_bundle = pair.wait_federated(A, 1).await;
    let Pair { a, b } = pair;
    // a.example's CA (and its bundle endpoint) goes away; b.example keeps trying every second
    // and keeps what it had.
    drop(a.stop().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = spiffe_bundle(&b, A).await;
    assert_eq!(
        SpiffeBundle::decode(TrustDomain::new(A).unwrap(), kept.jwks.as_bytes()).unwrap(),
        a_bundle
    );
    // A restart of b.example, with a.example still down, starts from the persisted bundle.
    let b = b.restart().await;
    let kept = spiffe_bundle(&b, A).await;
    assert!(
        SpiffeBundle::decode(TrustDomain::new(A).unwrap(), kept.jwks.as_bytes())
            .unwrap()
            .same_authorities(&a_bundle)
    );
    // And its agents get it.
    let (_db_agent, db_dir, _) = agent(&b, "db", B_DB, &[]).await;
    wait_federated_file(&db_dir, A, &a_bundle).await;
    // Nothing changed, so nothing new was audited: one update (the import) only.
    let updates = b
        .audit_log()
        .await
        .into_iter()
        .filter(|r| r.kind == "bundle_updated" && r.subject == "spiffe://a.example")
        .count();
    assert_eq!(updates, 1);
}

// === temporary access for a foreign identity ===

/// a.example lets its web tier hold db-write and lanyard:approver in its own certificates:
/// b.example must ignore both.
const A_WEB_POLICY: &str = r#"
[[policy]]
spiffe_id = "spiffe://a.example/ns/prod/web"
roles = ["db-read", "db-write", "lanyard:approver"]
"#;

/// b.example lets a.example's prod workloads *ask* for db-write; b.example's ops approve.
const B_ACCESS: &str = r#"
[[policy]]
spiffe_id = "spiffe://b.example/ops/*"
roles = ["lanyard:approver"]
max_ttl = "1h"

[[access]]
spiffe_id = "spiffe://a.example/ns/prod/*"
roles = ["db-write"]
max_duration = "1h"
"#;

/// Runs `lanyard ARGS... --server <ca> --credential <dir> [--server-bundle <pem>]`: `Ok(stdout)`
/// or `Err(stderr)`.
async fn cli_as(
    ca: &TestCa,
    dir: &Path,
    server_bundle: Option<&Path>,
    args: &[&str],
) -> Result<String, String> {
    let mut cmd = lanyard_cmd();
    cmd.args(args)
        .args(["--server", &ca.server(), "--credential"])
        .arg(dir);
    if let Some(b) = server_bundle {
        cmd.arg("--server-bundle").arg(b);
    }
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .expect("run lanyard");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// `lanyard access request` by a.example's web for itself, at b.example's CA (trusted through the
/// federated bundle web's agent wrote).
async fn web_requests(
    pair: &Pair,
    web_dir: &Path,
    roles: &str,
    duration: &str,
    reason: &str,
) -> Result<String, String> {
    let b_pem = web_dir.join("federated").join("b.example.pem");
    let args = [
        "access",
        "request",
        "--spiffe-id",
        A_WEB,
        "--roles",
        roles,
        "--duration",
        duration,
        "--reason",
        reason,
    ];
    cli_as(&pair.b, web_dir, Some(&b_pem), &args).await
}

/// Calls until the outcome is `accepted` (or 10 s pass, which fails the test).
async fn until_call(addr: SocketAddr, client: &Arc<ClientConfig>, accepted: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if call(addr, client).await.is_ok() == accepted {
            return;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Aborts a background task when the test ends.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_identity_gets_temporary_access_through_the_other_domains_policy() {
    let pair = Pair::start(A_WEB_POLICY, B_ACCESS).await;
    let web_roles = ["db-read", "db-write", "lanyard:approver"];
    let (_web_agent, web_dir, _) = agent(&pair.a, "web", A_WEB, &web_roles).await;
    let (_db_agent, db_dir, _) = agent(&pair.b, "db", B_DB, &[]).await;
    wait_federated_file(&db_dir, A, &pair.wait_federated(A, 1).await).await;
    wait_federated_file(&web_dir, B, &pair.wait_federated(B, 1).await).await;

    // b.example's database wants db-write from a.example's web tier. It follows its own CA's
    // grants and revocations.
    let db_src = source(&db_dir).await;
    let web_src = source(&web_dir).await;
    let grants = GrantSet::new();
    let _grants_task = Abort(grants.follow(pair.b.server(), db_src.clone()));
    let revocations = RevocationSet::new();
    let _revocations_task = Abort(revocations.follow(pair.b.server(), db_src.clone()));
    let needs_write = Authorizer::parse(&["spiffe://a.example/ns/prod/* role=db-write"])
        .unwrap()
        .with_grants(grants.clone());
    let db = EchoServer::start(
        server_config(&db_src, needs_write, Some(revocations.clone())).unwrap(),
        db_src.clone(),
    )
    .await;
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        (grants.snapshots() > 0).then_some(())
    })
    .await
    .expect("the database follows b.example's grants");
    let web_client = client(&web_src, &["td:b.example"]);

    // No grant: refused, although web's own certificate says db-write.
    let n = db.event_count();
    assert!(call(db.addr, &web_client).await.is_err());
    let reason = db.next_event(n).await.expect_err("refused");
    assert!(reason.contains("(roles: none) matches no rule"), "{reason}");

    // web asks b.example's CA, with the certificate a.example's CA gave it, trusting b.example's
    // CA by the federated bundle its agent wrote.
    let b_pem = web_dir.join("federated").join("b.example.pem");
    let first = web_requests(&pair, &web_dir, "db-write", "6s", "MIG-7: backfill")
        .await
        .expect("a foreign identity may ask");
    let err = web_requests(&pair, &web_dir, "db-admin", "4s", "MIG-7")
        .await
        .expect_err("db-admin is not requestable");
    assert!(
        err.contains("PermissionDenied") && err.contains("not requestable"),
        "{err}"
    );
    // Its own CA's lanyard:approver counts for nothing in b.example.
    let err = cli_as(
        &pair.b,
        &web_dir,
        Some(&b_pem),
        &["access", "approve", &first],
    )
    .await
    .expect_err("a foreign approver role is ignored");
    assert!(
        err.contains("PermissionDenied") && err.contains("holds no roles in b.example"),
        "{err}"
    );
    let mine = cli_as(
        &pair.b,
        &web_dir,
        Some(&b_pem),
        &["access", "list", "--json"],
    )
    .await
    .unwrap();
    assert!(
        mine.contains(&first) && mine.contains("\"pending\""),
        "{mine}"
    );
    // Nor may it use b.example's CA for anything else: no certificate of b.example for it.
    let err = cli_as(&pair.b, &web_dir, Some(&b_pem), &["ca", "status"])
        .await
        .expect_err("not an identity of b.example");
    assert!(err.contains("Unauthenticated"), "{err}");

    // Bob, an approver of b.example, approves: the grant reaches the database within moments,
    // and it runs out on time.
    let bob = pair
        .b
        .enroll(
            "bob",
            "spiffe://b.example/ops/bob",
            &["lanyard:approver"],
            600,
        )
        .await;
    cli_as(&pair.b, &bob, None, &["access", "approve", &first])
        .await
        .expect("bob approves");
    until_call(db.addr, &web_client, true, "the grant never admitted web").await;
    let n = db.event_count();
    call(db.addr, &web_client).await.expect("accepted");
    assert_eq!(db.next_event(n).await.unwrap().spiffe_id.as_str(), A_WEB);
    until_call(db.addr, &web_client, false, "the 6 s grant never ended").await;

    // A second grant, ended early by an approver: refused again at once.
    let second = web_requests(&pair, &web_dir, "db-write", "1h", "MIG-7: second pass")
        .await
        .unwrap();
    cli_as(&pair.b, &bob, None, &["access", "approve", &second])
        .await
        .unwrap();
    until_call(
        db.addr,
        &web_client,
        true,
        "the second grant never admitted web",
    )
    .await;
    let revoked_at = Instant::now();
    cli_as(
        &pair.b,
        &bob,
        None,
        &["access", "revoke", &second, "--reason", "done early"],
    )
    .await
    .expect("bob ends the grant");
    until_call(
        db.addr,
        &web_client,
        false,
        "the revoked grant still admits web",
    )
    .await;
    eprintln!("revoked grant refused after {:?}", revoked_at.elapsed());

    // b.example revokes the foreign identity itself: its services refuse it (and keep refusing
    // the certificates a.example goes on issuing to it, whatever their notBefore, until the
    // revocation is lifted here: see `RevocationSet`'s tests), and it may not ask again.
    let any_role = server_config(
        &db_src,
        Authorizer::parse(&["spiffe://a.example/ns/prod/*"]).unwrap(),
        Some(revocations.clone()),
    )
    .unwrap();
    let open = EchoServer::start(any_role, db_src.clone()).await;
    call(open.addr, &web_client)
        .await
        .expect("accepted by a rule without roles");
    let out = cli(
        &pair.b,
        &[
            "revoke",
            "--spiffe-id",
            A_WEB,
            "--reason",
            "partner key leak",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    until_call(
        open.addr,
        &web_client,
        false,
        "the revoked foreign identity still gets in",
    )
    .await;
    let reason = open.last_event().unwrap();
    assert!(
        reason
            .as_ref()
            .is_err_and(|r| r.contains("partner key leak")),
        "{reason:?}"
    );
    let err = web_requests(&pair, &web_dir, "db-write", "1h", "again")
        .await
        .expect_err("a revoked foreign identity may not ask");
    assert!(err.contains("revoked"), "{err}");

    // b.example's audit log has all of it, with the foreign identity named. (The first grant's
    // end is recorded by the CA's sweeper, up to a second after services stopped honouring it.)
    let wanted = [
        ("access_requested", A_WEB),
        ("access_approved", "spiffe://b.example/ops/bob"),
        ("access_granted", "spiffe://b.example/ops/bob"),
        ("access_ended", "lanyard"),
        ("access_revoked", "spiffe://b.example/ops/bob"),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = pair.b.audit_log().await;
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(kind, actor)| {
                !log.iter()
                    .any(|r| r.kind == *kind && r.actor == *actor && r.subject == A_WEB)
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b.example's audit log lacks {missing:?} about {A_WEB}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// === revocations relayed across domains ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_revoked_by_its_own_ca_is_refused_in_the_federated_domain() {
    let pair = Pair::start_with("", "", true).await;
    let (_web_agent, web_dir, _) = agent(&pair.a, "web", A_WEB, &["db-read"]).await;
    let (_db_agent, db_dir, _) = agent(&pair.b, "db", B_DB, &[]).await;
    wait_federated_file(&db_dir, A, &pair.wait_federated(A, 1).await).await;
    wait_federated_file(&web_dir, B, &pair.wait_federated(B, 1).await).await;

    // a.example's web client follows only its own CA's revocations.
    let db_src = source(&db_dir).await;
    let web_src = source(&web_dir).await;
    let revocations = RevocationSet::new();
    let _follow = Abort(revocations.follow(pair.a.server(), web_src.clone()));
    let web_client = Arc::new(
        client_config(
            &web_src,
            Authorizer::parse(&["td:b.example"]).unwrap(),
            Some(revocations.clone()),
        )
        .unwrap(),
    );
    let db = server(&db_src, &["spiffe://a.example/ns/prod/*"]).await;
    call(db.addr, &web_client).await.expect("accepted");

    // b.example revokes its database; a.example's CA relays it and web refuses the database
    // within moments, not at its certificate's expiry.
    let out = cli(
        &pair.b,
        &[
            "revoke",
            "--spiffe-id",
            B_DB,
            "--reason",
            "db host compromised",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let revoked_at = Instant::now();
    until_call(
        db.addr,
        &web_client,
        false,
        "the relayed revocation never reached web",
    )
    .await;
    eprintln!(
        "relayed revocation refused after {:?}",
        revoked_at.elapsed()
    );
    let err = call(db.addr, &web_client).await.unwrap_err();
    assert!(err.contains("db host compromised"), "{err}");

    // On a.example's record: one relay event; the entry names its domain; a.example's CRL does
    // not list b.example's certificate.
    let log = pair.a.audit_log().await;
    assert!(
        log.iter()
            .any(|r| r.kind == "revocation_imported" && r.subject == "spiffe://b.example"),
        "no revocation_imported in a.example's log"
    );
    let mut watch =
        lanyard::pb::v1::revocation_client::RevocationClient::new(pair.a.admin_channel().await)
            .watch(pb::WatchRequest { since: 0 })
            .await
            .unwrap()
            .into_inner();
    let relayed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = watch.message().await.unwrap().unwrap();
            if e.spiffe_id == B_DB {
                return e;
            }
        }
    })
    .await
    .expect("the relayed entry is on a.example's watch");
    assert_eq!(relayed.trust_domain, B);
    let crl =
        lanyard::pb::v1::revocation_client::RevocationClient::new(pair.a.admin_channel().await)
            .get_crl(pb::GetCrlRequest {})
            .await
            .unwrap()
            .into_inner();
    assert!(crl.retiring.is_empty());

    // Of a federated domain only its CA may watch: a workload of a.example may not watch
    // b.example's revocations.
    let web_cred = lanyard::client::Credential::load(&web_dir, &RolesOid::default()).unwrap();
    let b_bundle = lanyard::tls::Bundle::from_pem(
        &std::fs::read(web_dir.join("federated/b.example.pem")).unwrap(),
    )
    .unwrap();
    let channel = lanyard::client::connect(
        &pair.b.server(),
        lanyard::tls::ServerTrust::Bundle(b_bundle),
        Some(web_cred.slot().unwrap()),
        RolesOid::default(),
    )
    .await
    .unwrap();
    let refused = lanyard::pb::v1::revocation_client::RevocationClient::new(channel)
        .watch(pb::WatchRequest { since: 0 })
        .await
        .expect_err("a foreign workload may not watch");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
}

// === bundle fetches through an HTTPS proxy ===

/// A CONNECT proxy on 127.0.0.1 that records every tunnel's target and relays its bytes.
async fn connect_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let targets = Arc::new(Mutex::new(Vec::new()));
    let seen = targets.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(client);
                let mut line = String::new();
                client.read_line(&mut line).await.ok()?;
                let target = line
                    .strip_prefix("CONNECT ")?
                    .split(' ')
                    .next()?
                    .to_string();
                // The rest of the request head.
                loop {
                    let mut header = String::new();
                    client.read_line(&mut header).await.ok()?;
                    if header == "\r\n" || header.is_empty() {
                        break;
                    }
                }
                let mut upstream = TcpStream::connect(&target).await.ok()?;
                seen.lock().unwrap().push(target);
                let mut client = client.into_inner();
                client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .ok()?;
                tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .ok()
            });
        }
    });
    (port, targets)
}

#[tokio::test(flavor = "multi_thread")]
async fn bundle_fetches_go_through_the_https_proxy_the_environment_names() {
    let (pa, pb_) = (free_port(), free_port());
    let b = TestCa::start_with_full_config(&ca_config(B, pb_, A, pa, "")).await;
    let work = tempfile::tempdir().unwrap();
    let b_bundle = work.path().join("b-bundle.json");
    std::fs::write(&b_bundle, spiffe_bundle(&b, "").await.jwks).unwrap();
    let config = work.path().join("a.toml");
    std::fs::write(
        &config,
        ca_config(A, pa, B, pb_, "listen = \"127.0.0.1:0\"").replace(
            "endpoint_spiffe_id = \"spiffe://b.example/lanyard/server\"",
            &format!(
                "endpoint_spiffe_id = \"spiffe://b.example/lanyard/server\"\ninitial_bundle = \"{}\"",
                b_bundle.display()
            ),
        ),
    )
    .unwrap();
    let (proxy, targets) = connect_proxy().await;
    let log = work.path().join("a.log");
    let mut cmd = lanyard_cmd();
    cmd.args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(work.path().join("data"))
        .env("HTTPS_PROXY", format!("http://127.0.0.1:{proxy}"))
        .env("LANYARD_LOG", "lanyard=debug");
    let a = ChildGuard::spawn("lanyard serve (a)", &mut cmd, &log);
    // The fetch went through the tunnel and the endpoint authenticated end to end in it.
    let fetched = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        a.output().contains("bundle fetched").then_some(())
    })
    .await;
    assert!(
        fetched.is_some(),
        "no bundle fetched through the proxy:\n{}",
        a.output()
    );
    assert!(
        targets
            .lock()
            .unwrap()
            .contains(&format!("127.0.0.1:{pb_}")),
        "the proxy never tunnelled to b's endpoint: {:?}",
        targets.lock().unwrap()
    );
}
