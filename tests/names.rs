//! DNS and IP names in certificates (policy `dns`/`ip`/`id_pattern`, `--dns-name`/`--ip`), the
//! CA's own `server_names`, and join token list/revoke, through the real CLI against a real CA
//! and checked by real peers: Go's crypto/x509 `VerifyHostname`, `openssl verify
//! -verify_hostname`, `openssl x509 -checkhost` and `curl --cacert`.

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
    let tools = require_tool(
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
    );
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
