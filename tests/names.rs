//! DNS and IP names in certificates (policy `dns`/`ip`/`id_pattern`, `--dns-name`/`--ip`), the
//! CA's own `server_names`, and join token list/revoke, through the real CLI against a real CA
//! and checked by real peers: Go's crypto/x509 `VerifyHostname`, `openssl verify
//! -verify_hostname`, `openssl x509 -checkhost` and `curl --cacert`. A real `lanyard agent` with
//! `--dns-name`/`--ip` serves them over the Workload API and to `openssl s_server` reached by curl;
//! a name dropped from policy stops its renewal (PERMISSION_DENIED, audited) until the agent stops
//! asking; `openssl s_client -verify_hostname` checks the CA's gRPC port by `server_names`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] functions"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::{TestCa, lanyard_cmd, require_tool};
use lanyard::ca::SanNames;
use lanyard::client::csr_with_names;
use lanyard::pb::v1::{self as pb, admin_client::AdminClient};
use lanyard::spiffe::SpiffeId;

const POLICY: &str = r#"
server_names = ["ca.lanyard.test", "127.0.0.1"]
bundle_endpoint_listen = "127.0.0.1:0"

[[policy]]
spiffe_id = "spiffe://example.org/ns/*"
id_pattern = "/ns/{ns}/sa/{sa}"
dns = ["{sa}.{ns}.svc.cluster.local", "*.web.example", "api.example.com"]
ip = ["10.0.0.0/8"]
max_ttl = "10m"

[[policy]]
spiffe_id = "spiffe://example.org/plain/*"
max_ttl = "10m"
"#;

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("spawn")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Builds the stdlib-only Go verifier once per test binary (network off).
fn go_verifier() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-svidverify-names");
        std::fs::create_dir_all(&tmp).unwrap();
        let out = tmp.join(format!("svidverify-{}", std::process::id()));
        let o = run(Command::new("go")
            .args(["build", "-buildvcs=false", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/go"))
            .env("GOCACHE", tmp.join("cache"))
            .env("GOPATH", tmp.join("gopath"))
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=mod")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0"));
        assert!(o.status.success(), "go build: {}", text(&o));
        out
    })
}

fn lanyard(args: &[&str]) -> Output {
    run(lanyard_cmd().args(args))
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_names_verify_everywhere_and_others_are_refused() {
    let tools = tools_present();
    if !tools {
        return;
    }
    let ca = TestCa::start_with("", POLICY).await;
    let server = ca.server();
    let id = "spiffe://example.org/ns/prod/sa/api";
    let token = ca.token(id, &[], 600, 1).await;
    let out = ca.dir.path().join("api");
    let o = lanyard(&[
        "issue",
        "--server",
        &server,
        "--token",
        &token,
        "--out",
        out.to_str().unwrap(),
        "--dns-name",
        "API.prod.svc.cluster.local.",
        "--dns-name",
        "a.web.example",
        "--ip",
        "10.1.2.3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let (cert, bundle) = (out.join("cert.pem"), out.join("bundle.pem"));

    // Go's crypto/x509: the chain verifies, and VerifyHostname takes exactly the names issued.
    let go = |host: &str| {
        run(Command::new(go_verifier())
            .arg("-bundle")
            .arg(&bundle)
            .arg("-cert")
            .arg(&cert)
            .args(["-hostname", host]))
    };
    let o = go("api.prod.svc.cluster.local");
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains(&format!("uri={id}\n")), "{stdout}");
    assert!(
        stdout.contains("dns=a.web.example,api.prod.svc.cluster.local\n"),
        "{stdout}"
    );
    assert!(stdout.contains("ip=10.1.2.3\n"), "{stdout}");
    for ok in ["a.web.example", "10.1.2.3"] {
        assert!(go(ok).status.success(), "{ok}: {}", text(&go(ok)));
    }
    for bad in [
        "b.web.example",
        "web.example",
        "api.example.com",
        "10.1.2.4",
    ] {
        let o = go(bad);
        assert!(!o.status.success(), "Go accepted {bad}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("VerifyHostname"),
            "{}",
            text(&o)
        );
    }

    // OpenSSL: verify -verify_hostname / -verify_ip and x509 -checkhost.
    let ossl_verify = |flag: &str, host: &str| {
        run(Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&bundle)
            .args([flag, host])
            .arg(&cert))
    };
    assert!(
        ossl_verify("-verify_hostname", "api.prod.svc.cluster.local")
            .status
            .success()
    );
    assert!(ossl_verify("-verify_ip", "10.1.2.3").status.success());
    let o = ossl_verify("-verify_hostname", "evil.example.com");
    assert!(
        !o.status.success(),
        "openssl accepted evil.example.com: {}",
        text(&o)
    );
    assert!(!ossl_verify("-verify_ip", "10.9.9.9").status.success());
    let checkhost = |host: &str| {
        let o = run(Command::new("openssl")
            .args(["x509", "-noout", "-in"])
            .arg(&cert)
            .args(["-checkhost", host]));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(
        checkhost("a.web.example").contains("does match"),
        "{}",
        checkhost("a.web.example")
    );
    assert!(checkhost("x.a.web.example").contains("does NOT match"));

    // Names policy does not allow are refused with the name, and audited; malformed ones are
    // INVALID_ARGUMENT before policy is asked.
    let refused = |id: &str, names: &[&str]| {
        let id = id.to_string();
        let names = SanNames::parse(names).unwrap();
        let ca = &ca;
        async move {
            let token = ca.token(&id, &[], 600, 1).await;
            let key = rcgen::KeyPair::generate().unwrap();
            let csr = csr_with_names(&SpiffeId::parse(&id).unwrap(), &key, &names).unwrap();
            ca.issue_csr(&token, csr, 0).await.expect_err("refused")
        }
    };
    let e = refused(id, &["evil.example.com"]).await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains(
            "\"evil.example.com\" is not allowed for spiffe://example.org/ns/prod/sa/api"
        ),
        "{e:?}"
    );
    // The template binds to the caller's own ID: another namespace's name is not its to take.
    let e = refused(
        "spiffe://example.org/ns/dev/sa/api",
        &["api.prod.svc.cluster.local"],
    )
    .await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = refused("spiffe://example.org/plain/x", &["a.web.example"]).await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("allowed: none"), "{e:?}");
    let e = refused(id, &["192.168.1.1"]).await;
    assert!(e.message().contains("\"192.168.1.1\""), "{e:?}");
    // A wildcard certificate is never issued, whatever `*.web.example` allows below it; the CLI
    // refuses it before calling, the CA refuses a hand-made CSR.
    let o = lanyard(&[
        "issue",
        "--server",
        &server,
        "--token",
        &ca.token(id, &[], 600, 1).await,
        "--out",
        ca.dir.path().join("w").to_str().unwrap(),
        "--dns-name",
        "*.web.example",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("wildcard"),
        "{}",
        text(&o)
    );
    let mut params = rcgen::CertificateParams::new(vec!["*.web.example".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(id.try_into().unwrap()));
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let e = ca
        .issue_csr(&ca.token(id, &[], 600, 1).await, csr, 0)
        .await
        .expect_err("wildcard");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("wildcard"), "{e:?}");
    let log = ca.audit_log().await;
    assert!(
        log.iter()
            .any(|r| r.kind == "denied" && r.reason.contains("evil.example.com")),
        "the refusal is audited"
    );

    // The CA's own serving certificate carries server_names: curl verifies the bundle endpoint
    // by name with only bundle.pem, and refuses a name the certificate does not hold.
    let addr = std::fs::read_to_string(ca.data_dir().join("bundle_endpoint.addr")).unwrap();
    let port = addr.trim().rsplit(':').next().unwrap().to_string();
    let curl = |name: &str| {
        run(Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&bundle)
            .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
            .arg(format!("https://{name}:{port}/")))
    };
    let o = curl("ca.lanyard.test");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"keys\""),
        "{}",
        text(&o)
    );
    let o = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&bundle)
        .arg(format!("https://127.0.0.1:{port}/")));
    assert!(o.status.success(), "{}", text(&o));
    let o = curl("other.lanyard.test");
    assert_eq!(
        o.status.code(),
        Some(60),
        "curl must refuse a name not in server_names: {}",
        text(&o)
    );
    // localhost is a default only: setting server_names replaces it.
    assert_eq!(curl("localhost").status.code(), Some(60));
}

#[tokio::test(flavor = "multi_thread")]
async fn join_tokens_are_listed_and_revoked_through_the_cli() {
    let ca = TestCa::start_with("", POLICY).await;
    let server = ca.server();
    let admin = ca.admin_dir();
    let conn = [
        "--server",
        server.as_str(),
        "--credential",
        admin.to_str().unwrap(),
    ];
    let id = "spiffe://example.org/plain/vm1";
    let o = lanyard(
        &[
            &["token", "create", "--spiffe-id", id, "--uses", "2"],
            &conn[..],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let token = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let other = ca.token("spiffe://example.org/plain/*", &[], 600, 1).await;

    let o = lanyard(&[&["token", "list", "--json"], &conn[..]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let row = rows.iter().find(|r| r["spiffe_id"] == id).expect("listed");
    assert_eq!(row["uses_left"], 2);
    assert_eq!(row["created_by"], "spiffe://example.org/lanyard/admin");
    let token_id = row["id"].as_str().unwrap().to_string();
    // The listing never shows the secret, nor its hash.
    let listing = String::from_utf8_lossy(&o.stdout).into_owned();
    for secret in [&token, &other] {
        let secret_part = secret.split('.').nth(2).unwrap();
        assert!(
            !listing.contains(secret_part),
            "listing leaks a secret: {listing}"
        );
    }
    assert!(!listing.contains("hash"), "{listing}");

    let o = lanyard(&[&["token", "revoke", &token_id], &conn[..]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = lanyard(&[&["token", "revoke", &token_id], &conn[..]].concat());
    assert!(
        !o.status.success() && text(&o).contains("already revoked"),
        "{}",
        text(&o)
    );
    let o = lanyard(&[&["token", "revoke", "00000000deadbeef"], &conn[..]].concat());
    assert!(
        !o.status.success() && text(&o).contains("no join token"),
        "{}",
        text(&o)
    );

    // Redemption after revocation: refused, saying by whom and when, and audited.
    let o = lanyard(&[
        "issue",
        "--server",
        &server,
        "--token",
        &token,
        "--out",
        ca.dir.path().join("vm1").to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "join token {token_id} was revoked by spiffe://example.org/lanyard/admin at "
        )),
        "{}",
        text(&o)
    );
    let o = lanyard(&[&["token", "list"], &conn[..]].concat());
    assert!(
        text(&o).contains("revoked by spiffe://example.org/lanyard/admin"),
        "{}",
        text(&o)
    );

    // Admin only: a workload certificate is refused.
    let wl = ca
        .enroll("wl", "spiffe://example.org/plain/wl", &[], 60)
        .await;
    let e = AdminClient::new(ca.channel_as(&wl).await)
        .list_join_tokens(pb::ListJoinTokensRequest {})
        .await
        .expect_err("not an admin");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    let log = ca.audit_log().await;
    let kinds: Vec<&str> = log.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "tokens_listed").count(),
        2,
        "{kinds:?}"
    );
    let revoked: Vec<_> = log.iter().filter(|r| r.kind == "token_revoked").collect();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].subject, id);
    assert!(revoked[0].reason.contains(&token_id), "{:?}", revoked[0]);
    assert!(log.iter().any(|r| r.kind == "denied"
        && r.actor == format!("token:{token_id}")
        && r.reason.contains("was revoked by")));
}

/// Policy for the agent tests: `ns` rule with DNS names, written again to narrow it.
fn agent_policy(web_dns: bool) -> String {
    let web = if web_dns { r#", "*.web.example""# } else { "" };
    format!(
        r#"trust_domain = "example.org"
listen = "127.0.0.1:0"
min_ttl = "1s"
server_names = ["ca.lanyard.test", "127.0.0.1"]

[[policy]]
spiffe_id = "spiffe://example.org/ns/*"
id_pattern = "/ns/{{ns}}/sa/{{sa}}"
dns = ["{{sa}}.{{ns}}.svc.cluster.local"{web}]
ip = ["10.0.0.0/8"]
max_ttl = "10m"
"#
    )
}

/// A CA started from [`agent_policy`] (with `*.web.example` allowed).
async fn agent_ca() -> common::TestCa {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanyard.toml");
    std::fs::write(&config, agent_policy(true)).unwrap();
    TestCa::start_in(dir, config).await
}

/// The leaf's names from a DER certificate: (URI SANs, DNS and IP SANs).
fn leaf_names(der: &[u8]) -> (Vec<String>, SanNames) {
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                if let GeneralName::URI(u) = n {
                    uris.push((*u).to_string());
                }
            }
        }
    }
    (uris, lanyard::ca::san_names(der).unwrap())
}

/// The leaf (first certificate) of a PEM file, as DER.
fn pem_leaf(path: &Path) -> Vec<u8> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let pem = std::fs::read(path).unwrap();
    CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and `bundle`).
fn split_der(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der).unwrap();
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    out
}

fn tools_present() -> bool {
    require_tool(
        "go",
        common::command_works("go", &["version"]),
        "install golang",
    ) && require_tool(
        "openssl",
        common::command_works("openssl", &["version"]),
        "apt-get install openssl",
    ) && require_tool(
        "curl",
        common::command_works("curl", &["--version"]),
        "apt-get install curl",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_names_reach_the_workload_api_and_verify_in_go_curl_and_openssl() {
    if !tools_present() {
        return;
    }
    go_verifier();
    let ca = agent_ca().await;
    let id = "spiffe://example.org/ns/prod/sa/web";
    let token = ca.token(id, &[], 600, 1).await;
    let work = ca.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = work.join("out");
    let sock = work.join("agent.sock");
    let mut agent = common::spawn_agent(
        &ca.server(),
        &token,
        &out,
        &[
            "--ttl",
            "60s",
            "--workload-socket",
            sock.to_str().unwrap(),
            "--dns-name",
            "web.prod.svc.cluster.local",
            "--dns-name",
            "shop.web.example",
            "--ip",
            "10.0.0.7",
        ],
    );
    let ready = common::poll_until(
        std::time::Duration::from_secs(15),
        std::time::Duration::from_millis(25),
        || (common::dir_svid(&out).is_some() && sock.exists()).then_some(()),
    )
    .await;
    assert!(
        ready.is_some() && agent.is_running(),
        "the agent wrote no certificate or socket:\n{}",
        agent.output()
    );
    let want =
        SanNames::parse(&["web.prod.svc.cluster.local", "shop.web.example", "10.0.0.7"]).unwrap();
    let (cert, bundle) = (out.join("cert.pem"), out.join("bundle.pem"));
    let (uris, names) = leaf_names(&pem_leaf(&cert));
    assert_eq!(uris, vec![id.to_string()], "exactly one URI SAN");
    assert_eq!(names, want);

    // The Workload API's X509-SVID carries the same names; Go verifies it by name.
    let mut client = common::workload_client(&sock).await;
    let mut req = tonic::Request::new(lanyard::pb::workload::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let msg = client
        .fetch_x509svid(req)
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("one X509SVIDResponse");
    assert_eq!(msg.svids.len(), 1);
    let svid = &msg.svids[0];
    assert_eq!(svid.spiffe_id, id);
    let chain = split_der(&svid.x509_svid);
    let (uris, names) = leaf_names(&chain[0]);
    assert_eq!(uris, vec![id.to_string()], "exactly one URI SAN");
    assert_eq!(names, want);
    let wl_chain = work.join("wl-chain.pem");
    let wl_bundle = work.join("wl-bundle.pem");
    let pem = |ders: &[Vec<u8>]| -> String {
        ders.iter()
            .map(|d| lanyard::ca::pem_encode("CERTIFICATE", d))
            .collect()
    };
    std::fs::write(&wl_chain, pem(&chain)).unwrap();
    std::fs::write(&wl_bundle, pem(&split_der(&svid.bundle))).unwrap();
    let go = |chain: &Path, bundle: &Path, host: &str| {
        run(Command::new(go_verifier())
            .arg("-bundle")
            .arg(bundle)
            .arg("-cert")
            .arg(chain)
            .args(["-hostname", host]))
    };
    for (chain, bundle) in [(&wl_chain, &wl_bundle), (&cert, &bundle)] {
        let o = go(chain, bundle, "web.prod.svc.cluster.local");
        assert!(o.status.success(), "{}", text(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains(&format!("uri={id}\n")), "{stdout}");
        assert!(
            stdout.contains("dns=shop.web.example,web.prod.svc.cluster.local\nip=10.0.0.7\n"),
            "{stdout}"
        );
        for ok in ["shop.web.example", "10.0.0.7"] {
            assert!(go(chain, bundle, ok).status.success(), "Go refused {ok}");
        }
        for bad in ["api.prod.svc.cluster.local", "x.web.example", "10.0.0.8"] {
            let o = go(chain, bundle, bad);
            assert!(
                !o.status.success() && text(&o).contains("VerifyHostname"),
                "Go accepted {bad}: {}",
                text(&o)
            );
        }
    }

    // A TLS server run with the agent's files: curl verifies it by name with only bundle.pem.
    let srv = work.join("srv");
    std::fs::create_dir_all(&srv).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(out.join(f), srv.join(f)).unwrap();
    }
    let port = common::free_port();
    let mut s_server = common::ChildGuard::spawn(
        "openssl s_server",
        Command::new("openssl")
            .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
            .arg("-cert")
            .arg(srv.join("cert.pem"))
            .arg("-cert_chain")
            .arg(srv.join("cert.pem"))
            .arg("-key")
            .arg(srv.join("key.pem"))
            .arg("-www"),
        &work.join("s_server.log"),
    );
    let listening = common::poll_until(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(25),
        // The probe connection closes at once: s_server serves one connection at a time.
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(drop)
        },
    )
    .await;
    assert!(listening.is_some(), "s_server: {}", s_server.output());
    let curl = |name: &str| {
        run(Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&bundle)
            .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
            .arg(format!("https://{name}:{port}/")))
    };
    for name in ["web.prod.svc.cluster.local", "shop.web.example"] {
        let o = curl(name);
        assert!(o.status.success(), "curl {name}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("s_server"),
            "{}",
            text(&o)
        );
    }
    let o = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&bundle)
        .arg(format!("https://10.0.0.7:{port}/"))
        .args(["--connect-to", &format!("10.0.0.7:{port}:127.0.0.1:{port}")]));
    assert!(o.status.success(), "curl by IP SAN: {}", text(&o));
    let o = curl("api.prod.svc.cluster.local");
    assert_eq!(o.status.code(), Some(60), "{}", text(&o));
    assert!(s_server.is_running(), "{}", s_server.output());

    // The CA's gRPC port: OpenSSL verifies its certificate by a server_names entry and refuses
    // any other name.
    let s_client = |name: &str| {
        run(Command::new("openssl")
            .args(["s_client", "-connect", &ca.server(), "-servername", name])
            .args(["-verify_hostname", name, "-CAfile"])
            .arg(&bundle)
            .arg("-verify_return_error"))
    };
    let o = s_client("ca.lanyard.test");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Verify return code: 0 (ok)"),
        "{}",
        text(&o)
    );
    let o = s_client("other.lanyard.test");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("hostname mismatch"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_dropped_from_policy_stops_renewal_until_the_agent_stops_asking() {
    use std::time::Duration;
    let ca = agent_ca().await;
    let id = "spiffe://example.org/ns/prod/sa/web";
    let token = ca.token(id, &[], 600, 1).await;
    let out = ca.dir.path().join("out");
    let names = [
        "--dns-name",
        "web.prod.svc.cluster.local",
        "--dns-name",
        "shop.web.example",
    ];
    let flags = [&["--ttl", "4s", "--max-backoff", "1s"][..], &names[..]].concat();
    let mut agent = common::spawn_agent(&ca.server(), &token, &out, &flags);
    let first = common::wait_for_svid(&out, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no certificate:\n{}", agent.output()));
    assert!(
        leaf_names(&pem_leaf(&out.join("cert.pem")))
            .1
            .dns
            .contains(&"shop.web.example".to_string())
    );

    // The operator narrows the rule; the CA re-reads the file within a second or two.
    std::fs::write(&ca.config_path, agent_policy(false)).unwrap();
    let refused = common::poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
        let log = agent.output();
        (log.contains("renewal refused by the CA's policy") && log.contains("shop.web.example"))
            .then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "the agent logged no policy refusal:\n{}",
        agent.output()
    );
    assert!(
        agent.is_running(),
        "a refusal is not fatal: {}",
        agent.output()
    );
    let audit = ca.audit_log().await;
    assert!(
        audit.iter().any(|r| r.kind == "policy_reloaded"),
        "{audit:?}"
    );
    let denied = audit
        .iter()
        .find(|r| r.kind == "denied" && r.reason.contains("shop.web.example"))
        .unwrap_or_else(|| panic!("the refused renewal is audited: {audit:?}"));
    assert_eq!(denied.subject, id, "{denied:?}");
    assert!(
        denied.reason.contains(
            "\"shop.web.example\" is not allowed for spiffe://example.org/ns/prod/sa/web"
        ),
        "{denied:?}"
    );
    // The refusal is PERMISSION_DENIED, naming the name (the agent logs the code only for
    // other failures, so ask the CA directly with the agent's key and certificate).
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = csr_with_names(
        &SpiffeId::parse(id).unwrap(),
        &key,
        &SanNames::parse(&["web.prod.svc.cluster.local", "shop.web.example"]).unwrap(),
    )
    .unwrap();
    let e = lanyard::pb::v1::ca_client::CaClient::new(ca.channel_as(&out).await)
        .issue(pb::IssueRequest {
            csr,
            join_token: String::new(),
            jwt: String::new(),
            ttl_seconds: 4,
            roles: vec![],
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"shop.web.example\""), "{e:?}");

    // Restarted without the dropped name, the agent reuses its credential and renews.
    agent.signal_group("TERM");
    let status = agent.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", agent.output());
    let mut cmd = lanyard_cmd();
    cmd.args(["agent", "--server", &ca.server(), "--out"])
        .arg(&out)
        .args(["--ttl", "4s", "--max-backoff", "1s"])
        .args(&names[..2]);
    let agent = common::ChildGuard::spawn("lanyard agent", &mut cmd, &out.with_extension("log2"));
    let renewed = common::poll_until(Duration::from_secs(15), Duration::from_millis(50), || {
        common::dir_svid(&out).filter(|s| {
            s.serial != first.serial && {
                let dns = leaf_names(&pem_leaf(&out.join("cert.pem"))).1.dns;
                dns == ["web.prod.svc.cluster.local"]
            }
        })
    })
    .await;
    assert!(
        renewed.is_some(),
        "the agent without the dropped name did not renew:\n{}",
        agent.output()
    );
    assert_eq!(renewed.unwrap().spiffe_id.as_str(), id);
}
