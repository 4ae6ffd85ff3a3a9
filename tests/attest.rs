//! JWT/OIDC attestation against a real HTTPS OIDC issuer on loopback (`scripts/oidc-issuer.py`:
//! discovery + JWKS, tokens signed by PyJWT), the real CA over gRPC, and the real agent binary.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{ChildGuard, TestCa, lanyard_cmd, require_tool, wait_for_svid};
use lanyard::pb::v1::{self as pb, ca_client::CaClient};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tonic::Code;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/oidc-issuer.py");

/// The simulated issuer process and its key directory.
struct Issuer {
    dir: tempfile::TempDir,
    _serve: ChildGuard,
    port: u16,
}

impl Issuer {
    fn run(args: &[&str]) -> String {
        let out = Command::new("python3")
            .arg(SCRIPT)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        for (iss, kid, alg, extra) in [
            ("k8s", "k1", "ES256", ""),
            ("k8s", "r1", "RS256", ""),
            ("k8s", "ghost", "ES256", "--unpublished"),
            ("k8s", "ghost2", "ES256", "--unpublished"),
            ("rot", "k1", "ES256", ""),
            ("rot", "k2", "ES256", "--unpublished"),
            ("gh", "k1", "RS256", ""),
        ] {
            let mut args = vec![
                "key", "--dir", &d, "--issuer", iss, "--kid", kid, "--alg", alg,
            ];
            if !extra.is_empty() {
                args.push(extra);
            }
            Self::run(&args);
        }
        let mut cmd = Command::new("python3");
        cmd.arg(SCRIPT).args(["serve", "--dir", &d]);
        let serve = ChildGuard::spawn("oidc issuer", &mut cmd, &dir.path().join("serve.log"));
        let port_file = dir.path().join("port");
        let port = common::poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            std::fs::read_to_string(&port_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .await
        .expect("issuer starts");
        Self {
            dir,
            _serve: serve,
            port,
        }
    }

    fn d(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    fn url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/{name}", self.port)
    }

    /// Mints one token per argument list (one python process for all).
    fn mint(&self, specs: &[Vec<&str>]) -> Vec<String> {
        use std::io::Write;
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .arg("batch")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = String::new();
        for s in specs {
            let mut args = vec!["--dir", self.d()];
            args.extend(s.iter().copied());
            input.push_str(&serde_json::to_string(&args).unwrap());
            input.push('\n');
        }
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let tokens: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(tokens.len(), specs.len());
        tokens
    }

    /// JWKS fetches the issuer has served for `name`.
    fn hits(&self, name: &str) -> u64 {
        let tls = self.dir.path().join("tls.pem");
        let out = Command::new("curl")
            .args(["-sf", "--cacert"])
            .arg(&tls)
            .arg(format!("{}/hits", self.url(name)))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["jwks"].as_u64().unwrap()
    }

    fn attestor(&self, name: &str, kind: &str, roles: &str) -> String {
        format!(
            "[[attestor]]\nname = \"{name}\"\nkind = \"{kind}\"\nissuer = \"{}\"\naudiences = [\"lanyard\"]\nca_file = \"{}\"\nmax_token_age = \"10m\"\nroles = {roles}\nmax_ttl = \"5m\"\n\n",
            self.url(name),
            self.dir.path().join("tls.pem").display()
        )
    }
}

fn tools_present() -> bool {
    require_tool(
        "python3 with PyJWT and cryptography",
        common::command_works("python3", &["-c", "import jwt, cryptography"]),
        "pip install pyjwt cryptography",
    ) && require_tool(
        "curl",
        common::command_works("curl", &["--version"]),
        "install curl",
    )
}

/// A CSR with no SAN, or with `id`.
fn csr(id: Option<&str>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    if let Some(id) = id {
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    }
    p.serialize_request(&key).unwrap().der().to_vec()
}

async fn issue(
    ca: &TestCa,
    jwt: &str,
    id: Option<&str>,
) -> Result<pb::IssueResponse, tonic::Status> {
    CaClient::new(ca.anon_channel().await)
        .issue(pb::IssueRequest {
            csr: csr(id),
            jwt: jwt.to_string(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

const POLICY: &str = r#"
[[policy]]
spiffe_id = "spiffe://example.org/ns/prod/*"
roles = ["db-read", "deploy"]
max_ttl = "10m"
id_pattern = "/ns/{ns}/sa/{sa}"
dns = ["{sa}.{ns}.svc"]

[[policy]]
spiffe_id = "spiffe://example.org/gh/octo-org/app/*"
roles = []
max_ttl = "5m"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_attestation_end_to_end() {
    if !tools_present() {
        return;
    }
    let issuer = Issuer::start().await;
    let attestors = format!(
        "{}{}{}",
        issuer.attestor("k8s", "kubernetes", "[\"db-read\"]"),
        issuer.attestor("rot", "kubernetes", "[]"),
        issuer.attestor("gh", "github", "[]"),
    );
    let ca = TestCa::start_with(&attestors, POLICY).await;

    let k8s =
        |kid: &'static str, sa: &'static str| vec!["--issuer", "k8s", "--kid", kid, "--k8s", sa];
    let with = |mut v: Vec<&'static str>, more: &[&'static str]| {
        v.extend_from_slice(more);
        v
    };
    let t = issuer.mint(&[
        k8s("k1", "prod/web"),                                   // 0 valid ES256
        k8s("r1", "prod/api"),                                   // 1 valid RS256
        with(k8s("k1", "prod/web"), &["--aud", "someone-else"]), // 2 wrong audience
        with(k8s("k1", "prod/web"), &["--age", "700"]),          // 3 expired
        with(
            k8s("k1", "prod/web"),
            &["--claims", r#"{"nbf": 4102444800}"#],
        ), // 4 not yet valid
        with(k8s("k1", "prod/web"), &["--age", "900", "--ttl", "3600"]), // 5 too old
        with(k8s("k1", "prod/web"), &["--attack", "none"]),      // 6 alg none
        with(k8s("k1", "prod/web"), &["--attack", "hs256"]),     // 7 HS256 w/ public key
        k8s("ghost", "prod/web"),                                // 8 unknown kid
        k8s("ghost2", "prod/web"),                               // 9 another unknown kid
        k8s("k1", "other/web"),                                  // 10 outside policy
        k8s("k1", "Prod/web"),                                   // 11 invalid: uppercase
        k8s("k1", "prod/.."),                                    // 12 invalid: ..
        vec!["--issuer", "rot", "--kid", "k2", "--k8s", "prod/rotated"], // 13 new kid after rotation
        vec![
            "--issuer",
            "gh",
            "--kid",
            "k1",
            "--github",
            "octo-org/app@refs/heads/main",
        ], // 14
        k8s("k1", "prod/csr"),                                           // 15 CSR asks another ID
        k8s("k1", "prod/agent"),                                         // 16 agent, first run
        k8s("k1", "prod/agent"),                                         // 17 agent, rescheduled
    ]);
    // 18: a token whose iss no attestor trusts (signed by a trusted key, even).
    let bad_iss = issuer.mint(&[with(
        k8s("k1", "prod/web"),
        &["--claims", r#"{"iss": "https://127.0.0.1:1/nope"}"#],
    )]);

    // A valid service-account token: the ID from the claims, roles = ceiling ∩ policy.
    let ok = issue(&ca, &t[0], None).await.unwrap();
    assert_eq!(ok.spiffe_id, "spiffe://example.org/ns/prod/sa/web");
    assert_eq!(ok.roles, vec!["db-read"]);
    assert!(
        ok.not_after - ok.not_before <= 5 * 60 + 30,
        "attestor max_ttl caps the lifetime"
    );
    let ok = issue(&ca, &t[1], Some("spiffe://example.org/ns/prod/sa/api"))
        .await
        .unwrap();
    assert_eq!(ok.spiffe_id, "spiffe://example.org/ns/prod/sa/api");

    // Each refusal: exact code and a message naming why.
    let refused = async |jwt: &str, id: Option<&str>, code: Code, why: &str| {
        let e = issue(&ca, jwt, id).await.unwrap_err();
        assert_eq!(e.code(), code, "{why}: {}", e.message());
        assert!(
            e.message().contains(why),
            "{why:?} not in {:?}",
            e.message()
        );
    };
    refused(&t[0], None, Code::FailedPrecondition, "already used").await;
    refused(&t[2], None, Code::Unauthenticated, "audience").await;
    refused(&t[3], None, Code::Unauthenticated, "expired at").await;
    refused(&t[4], None, Code::Unauthenticated, "not valid before").await;
    refused(&t[5], None, Code::Unauthenticated, "max_token_age").await;
    let mut parts: Vec<String> = t[1].split('.').map(str::to_string).collect();
    parts[2] = format!("{}AAAA", &parts[2][..parts[2].len() - 4]);
    refused(
        &parts.join("."),
        None,
        Code::Unauthenticated,
        "signature does not verify",
    )
    .await;
    refused(&t[6], None, Code::Unauthenticated, "algorithm \"none\"").await;
    refused(&t[7], None, Code::Unauthenticated, "algorithm \"HS256\"").await;
    refused(
        &bad_iss[0],
        None,
        Code::Unauthenticated,
        "no attestor trusts issuer",
    )
    .await;

    // Unknown kid: exactly one JWKS refetch, and none for a second unknown kid right after.
    let before = issuer.hits("k8s");
    refused(
        &t[8],
        None,
        Code::Unauthenticated,
        "no key with kid \"ghost\"",
    )
    .await;
    assert_eq!(issuer.hits("k8s"), before + 1);
    refused(
        &t[9],
        None,
        Code::Unauthenticated,
        "no key with kid \"ghost2\"",
    )
    .await;
    assert_eq!(
        issuer.hits("k8s"),
        before + 1,
        "unknown-kid refetches are rate-limited"
    );

    refused(&t[10], None, Code::PermissionDenied, "ns/other/sa/web").await;
    refused(&t[11], None, Code::PermissionDenied, "uppercase").await;
    refused(&t[12], None, Code::PermissionDenied, "'.' and '..'").await;
    refused(
        &t[15],
        Some("spiffe://example.org/ns/prod/sa/admin"),
        Code::PermissionDenied,
        "ask for exactly spiffe://example.org/ns/prod/sa/csr",
    )
    .await;

    // Key rotation at the issuer: the new kid is fetched once and accepted.
    Issuer::run(&[
        "key",
        "--dir",
        issuer.d(),
        "--issuer",
        "rot",
        "--kid",
        "k2",
        "--publish",
    ]);
    let before = issuer.hits("rot");
    let ok = issue(&ca, &t[13], None).await.unwrap();
    assert_eq!(ok.spiffe_id, "spiffe://example.org/ns/prod/sa/rotated");
    assert_eq!(issuer.hits("rot"), before + 1);

    // GitHub mapping: repository and ref become path segments, each checked.
    let ok = issue(&ca, &t[14], None).await.unwrap();
    assert_eq!(
        ok.spiffe_id,
        "spiffe://example.org/gh/octo-org/app/refs/heads/main"
    );
    assert!(ok.roles.is_empty());

    // The audit log: attested issuances name the attestor, issuer and claims; refusals are there.
    let log = ca.audit_log().await;
    let issued = log
        .iter()
        .find(|r| r.kind == "issued" && r.subject == "spiffe://example.org/ns/prod/sa/web")
        .expect("attested issuance audited");
    assert_eq!(issued.actor, "attestor:k8s");
    for part in [
        &format!("issuer {}", issuer.url("k8s")),
        "namespace=prod",
        "serviceaccount=web",
        "pod=web-7d9f8",
        "pod_uid=",
    ] {
        assert!(
            issued.reason.contains(part),
            "{part:?} not in {:?}",
            issued.reason
        );
    }
    let gh = log
        .iter()
        .find(|r| r.kind == "issued" && r.subject.starts_with("spiffe://example.org/gh/"))
        .unwrap();
    assert!(
        gh.reason.contains("repository=octo-org/app") && gh.reason.contains("workflow=ci"),
        "{}",
        gh.reason
    );
    let denied: Vec<&str> = log
        .iter()
        .filter(|r| r.kind == "denied")
        .map(|r| r.reason.as_str())
        .collect();
    for why in [
        "already used",
        "audience",
        "expired at",
        "not valid before",
        "max_token_age",
        "signature does not verify",
        "algorithm \"none\"",
        "algorithm \"HS256\"",
        "no attestor trusts issuer",
        "kid \"ghost\"",
        "kid \"ghost2\"",
        "ns/other/sa/web",
        "uppercase",
        "'.' and '..'",
        "ask for exactly",
    ] {
        assert!(
            denied.iter().any(|d| d.contains(why)),
            "no denied event with {why:?}"
        );
    }
    let unverified = log
        .iter()
        .find(|r| r.kind == "denied" && r.reason.contains("HS256"))
        .unwrap();
    assert_eq!(unverified.actor, "unauthenticated");
    assert!(
        unverified.claimed.starts_with("jwt iss="),
        "{}",
        unverified.claimed
    );
    let unmappable = log
        .iter()
        .find(|r| r.kind == "denied" && r.reason.contains("uppercase"))
        .unwrap();
    assert_eq!(
        unmappable.actor, "attestor:k8s",
        "a verified token's refusal names its attestor"
    );

    agent_reattests(&ca, &issuer, &t[16], &t[17]).await;
}

/// An agent with --jwt-file bootstraps; killed and its output wiped (a rescheduled pod, whose
/// kubelet wrote a fresh token), it attests again with no admin action.
async fn agent_reattests(ca: &TestCa, issuer: &Issuer, first: &str, second: &str) {
    let work = issuer.dir.path();
    let jwt_file = work.join("token");
    let out: PathBuf = work.join("out");
    let bundle = ca.admin_dir().join("bundle.pem");
    let spawn = |out: &Path| {
        let mut cmd = lanyard_cmd();
        cmd.args(["agent", "--server", &ca.server(), "--jwt-file"])
            .arg(&jwt_file)
            .arg("--bundle")
            .arg(&bundle)
            .args(["--dns-name", "agent.prod.svc"])
            .arg("--out")
            .arg(out);
        ChildGuard::spawn("agent", &mut cmd, &work.join("agent.log"))
    };
    std::fs::write(&jwt_file, first).unwrap();
    let agent = spawn(&out);
    let svid = wait_for_svid(&out, Duration::from_secs(20)).await;
    let svid = svid.unwrap_or_else(|| panic!("agent got no certificate: {}", agent.output()));
    assert_eq!(
        svid.spiffe_id.as_str(),
        "spiffe://example.org/ns/prod/sa/agent"
    );
    // The attested certificate carries the names the agent asks for, from its first issuance.
    let pem = std::fs::read(out.join("cert.pem")).unwrap();
    let (_, leaf) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let names = lanyard::ca::san_names(&leaf.contents).unwrap();
    assert_eq!(names.dns, ["agent.prod.svc"]);
    drop(agent);
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::write(&jwt_file, second).unwrap();
    let agent = spawn(&out);
    let again = wait_for_svid(&out, Duration::from_secs(20)).await;
    let again = again.unwrap_or_else(|| panic!("agent did not re-attest: {}", agent.output()));
    assert_eq!(again.spiffe_id, svid.spiffe_id);
    assert_ne!(again.serial, svid.serial);
    let log = ca.audit_log().await;
    let n = log
        .iter()
        .filter(|r| {
            r.kind == "issued" && r.actor == "attestor:k8s" && r.subject == svid.spiffe_id.as_str()
        })
        .count();
    assert_eq!(n, 2, "both attestations audited");
}

/// A CA outage longer than the certificate's lifetime plus the renewal grace: once the CA is
/// back, the agent's renewal is refused as expired, and it attests again with the (rotated)
/// token file instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reattests_after_expiry_past_grace() {
    if !tools_present() {
        return;
    }
    let issuer = Issuer::start().await;
    let port = common::free_port();
    let config = format!(
        "trust_domain = \"example.org\"\nlisten = \"127.0.0.1:{port}\"\nmin_ttl = \"1s\"\ndefault_ttl = \"2s\"\nrenewal_grace = \"1s\"\n{}{POLICY}",
        issuer.attestor("k8s", "kubernetes", "[]")
    );
    let ca = TestCa::start_with_full_config(&config).await;
    let t = issuer.mint(&[
        vec!["--issuer", "k8s", "--kid", "k1", "--k8s", "prod/outage"],
        vec!["--issuer", "k8s", "--kid", "k1", "--k8s", "prod/outage"],
    ]);
    let work = issuer.dir.path();
    let (jwt_file, out) = (work.join("token"), work.join("out"));
    std::fs::write(&jwt_file, &t[0]).unwrap();
    let mut cmd = lanyard_cmd();
    cmd.args([
        "agent",
        "--server",
        &ca.server(),
        "--ttl",
        "2s",
        "--max-backoff",
        "1s",
    ])
    .arg("--jwt-file")
    .arg(&jwt_file)
    .arg("--bundle")
    .arg(ca.admin_dir().join("bundle.pem"))
    .arg("--out")
    .arg(&out);
    let mut agent = ChildGuard::spawn("agent", &mut cmd, &work.join("agent.log"));
    let first = wait_for_svid(&out, Duration::from_secs(20))
        .await
        .expect("first certificate");

    let (dir, config_path) = ca.stop().await;
    // The kubelet rotates the token while the CA is away.
    std::fs::write(&jwt_file, &t[1]).unwrap();
    let past_grace = first.not_after + 1 + 1 - lanyard::tls::unix_now();
    tokio::time::sleep(Duration::from_secs(past_grace.max(0) as u64 + 1)).await;
    let ca = TestCa::start_in(dir, config_path).await;

    let again = common::poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        common::dir_svid(&out).filter(|s| s.serial != first.serial)
    })
    .await
    .unwrap_or_else(|| panic!("agent did not attest again: {}", agent.output()));
    assert_eq!(again.spiffe_id, first.spiffe_id);
    assert!(
        agent.is_running(),
        "the agent keeps running: {}",
        agent.output()
    );
    let log = ca.audit_log().await;
    let issued: Vec<_> = log
        .iter()
        .filter(|r| {
            r.subject == first.spiffe_id.as_str() && r.actor == "attestor:k8s" && r.kind == "issued"
        })
        .collect();
    assert_eq!(issued.len(), 2, "the bootstrap and the re-attestation");
    assert!(
        log.iter()
            .any(|r| r.kind == "denied" && r.reason.contains("beyond the renewal grace")),
        "the refused renewal is audited"
    );
}
