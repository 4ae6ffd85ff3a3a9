//! Issue 5, the agent's output used by software nobody here wrote: the PyPI `spiffe` client on
//! the Workload API socket (its high-level client and its own generated gRPC stubs), OpenSSL's
//! `s_server`/`s_client` doing a mutual handshake with agent-issued certificates, and nginx
//! serving with the agent's files and `ssl_verify_client on`, reloaded by `--on-rotate`; and
//! docs/nginx.md as written: `ssl_crl` on the agent's `crl.pem`, kept fresh through revocations
//! and short CRL validities, with an upstream that authorizes by SPIFFE ID.
//!
//! Outside tools: `python3` with `spiffe` and `cryptography` (pip), `openssl`, `nginx` and
//! `curl` (apt). When one is missing the test prints a loud skip, or fails when `CI` is set.
//! Every child process is stopped by a guard, even when an assertion fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{
    ChildGuard, TestCa, command_works, dir_svid, free_port, poll_until, require_tool, spawn_agent,
    wait_for_svid,
};
use lanyard::ca::RolesOid;
use lanyard::pb::v1::{self as pb, revocation_client::RevocationClient, revoke_request::Target};
use lanyard::tls::{Authorizer, TlsSource, client_config};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API: &str = "spiffe://example.org/ns/prod/api";
const DB: &str = "spiffe://example.org/ns/prod/db";
const WEB: &str = "spiffe://example.org/ns/prod/web";

// === helpers ===

/// Starts an agent for `id` writing to `<work>/<name>` and waits for its first certificate.
async fn start_agent(
    ca: &TestCa,
    work: &Path,
    name: &str,
    id: &str,
    extra: &[&str],
) -> (ChildGuard, PathBuf) {
    let token = ca.token(id, &["db-read"], 600, 1).await;
    let out = work.join(name);
    let agent = spawn_agent(&ca.server(), &token, &out, extra);
    if wait_for_svid(&out, Duration::from_secs(15)).await.is_none() {
        panic!("agent {name} wrote no certificate:\n{}", agent.output());
    }
    (agent, out)
}

/// Runs a command to completion with `input` on stdin; kills it after `timeout`.
async fn run(mut cmd: tokio::process::Command, input: &[u8], timeout: Duration) -> Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .expect("command finished in time")
        .expect("command ran")
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until something accepts TCP connections on `addr`.
async fn wait_listening(addr: SocketAddr, what: &mut ChildGuard) {
    let up = poll_until(Duration::from_secs(10), Duration::from_millis(25), || {
        std::net::TcpStream::connect(addr).ok()
    })
    .await;
    assert!(
        up.is_some(),
        "{} is not listening:\n{}",
        what.name,
        what.output()
    );
}

/// A self-signed certificate with a SPIFFE ID, not from Lanyard; returns (cert, key) paths.
fn self_signed(dir: &Path, id: &str) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    let cert = params.self_signed(&key).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// Serial hex without leading zeros (how Python and nginx print it), lowercase.
fn trim_serial(s: &str) -> String {
    s.trim_start_matches('0').to_ascii_lowercase()
}

fn python_ready() -> bool {
    require_tool(
        "python3 with the PyPI `spiffe` package",
        command_works("python3", &["-c", "import spiffe, cryptography, grpc"]),
        "`pip install spiffe cryptography`",
    )
}

fn openssl_ready() -> bool {
    require_tool(
        "openssl",
        command_works("openssl", &["version"]),
        "`apt-get install openssl`",
    )
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

// === the SPIFFE Workload API with a third-party client ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pypi_spiffe_client_fetches_the_svid_and_bundle() {
    if !python_ready() {
        return;
    }
    let ca = TestCa::start().await;
    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("agent.sock");
    let sock_arg = sock.to_str().unwrap();
    let (mut agent, out) = start_agent(
        &ca,
        work.path(),
        "svid",
        API,
        &["--ttl", "60s", "--workload-socket", sock_arg],
    )
    .await;

    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script("fetch_svid.py")).arg(&sock);
    let res = run(cmd, b"", Duration::from_secs(30)).await;
    assert!(res.status.success(), "{}", text(&res));
    let got: serde_json::Value =
        serde_json::from_slice(&res.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&res)));
    eprintln!("python spiffe client: {got}");

    assert_eq!(got["spiffe_id"], API);
    assert_eq!(got["trust_domain"], "example.org");
    assert_eq!(got["context_svids"], serde_json::json!([API]));
    let on_disk = dir_svid(&out).unwrap().serial.to_hex();
    assert_eq!(
        got["serial"].as_str().unwrap(),
        trim_serial(&on_disk),
        "the socket serves the certificate the agent wrote"
    );
    assert_eq!(got["chain_len"], 1);
    assert_eq!(got["key_matches_leaf"], true);
    assert_eq!(
        got["bundle_trust_domains"],
        serde_json::json!(["example.org"])
    );
    assert_eq!(got["issued_by_bundle"], true);
    let ca_sha: Vec<String> = ca
        .bundle()
        .certs()
        .iter()
        .map(|c| hex(&Sha256::digest(c.as_ref())))
        .collect();
    assert_eq!(
        got["bundle_sha256"],
        serde_json::json!(ca_sha),
        "the bundle is the CA's"
    );
    assert!(agent.is_running(), "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workload_api_stream_pushes_rotations_and_requires_the_security_header() {
    if !python_ready() {
        return;
    }
    let ca = TestCa::start().await;
    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("agent.sock");
    let (mut agent, out) = start_agent(
        &ca,
        work.path(),
        "svid",
        API,
        &["--ttl", "4s", "--workload-socket", sock.to_str().unwrap()],
    )
    .await;

    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script("watch_svid.py"))
        .arg(&sock)
        .args(["3", "15"]);
    let res = run(cmd, b"", Duration::from_secs(40)).await;
    assert!(res.status.success(), "{}", text(&res));
    let got: serde_json::Value =
        serde_json::from_slice(&res.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&res)));
    eprintln!("FetchX509SVID stream: {got}");

    assert_eq!(
        got["no_header"], "INVALID_ARGUMENT",
        "a call without `workload.spiffe.io: true`"
    );
    assert_eq!(
        got["bundle_keys"],
        serde_json::json!(["spiffe://example.org"])
    );
    assert!(got.get("stream_error").is_none(), "{got}");
    let responses = got["responses"].as_array().unwrap();
    let serials: Vec<&str> = responses
        .iter()
        .map(|r| r["serial"].as_str().unwrap())
        .collect();
    let mut distinct = serials.clone();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        3,
        "three certificates, one message each (no repeats): {serials:?}"
    );
    assert_eq!(distinct.len(), serials.len(), "{serials:?}");
    // The first message comes at once: it does not wait for a rotation (every ~2 s here).
    let first_after =
        responses[0]["at"].as_f64().unwrap() - got["stream_opened_at"].as_f64().unwrap();
    assert!(
        first_after < 1.0,
        "first message after {first_after} s: {got}"
    );
    // The last one is what the agent has on disk now (it was cancelled right after).
    assert_eq!(
        serials.last().copied().unwrap(),
        trim_serial(&dir_svid(&out).unwrap().serial.to_hex()),
    );
    for r in responses {
        assert_eq!(r["spiffe_id"], API);
        assert_eq!(r["crls"], 1, "each message carries the CA's CRL");
    }
    // Pushed on rotation: about half of the 4 s lifetime apart. (The first message is the
    // certificate the agent already held, so only the later gaps are rotation intervals.)
    for pair in responses[1..].windows(2) {
        let gap = pair[1]["at"].as_f64().unwrap() - pair[0]["at"].as_f64().unwrap();
        assert!((0.5..=3.5).contains(&gap), "gap {gap} s in {got}");
    }
    assert!(agent.is_running(), "{}", agent.output());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// === OpenSSL ===

/// `openssl s_server` with a credential, requiring a client certificate from the bundle.
fn s_server(work: &Path, name: &str, cert: &Path, key: &Path, ca: &Path) -> (ChildGuard, u16) {
    let port = free_port();
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .arg("-CAfile")
        .arg(ca)
        .args(["-Verify", "1", "-verify_return_error", "-www"]);
    let guard = ChildGuard::spawn(name, &mut cmd, &work.join(format!("{name}.log")));
    (guard, port)
}

/// `openssl s_client` with a credential (or none), verifying the server against `ca`; sends
/// an HTTP request and returns everything.
async fn s_client(port: u16, cred: Option<(&Path, &Path)>, ca: &Path, request: &str) -> Output {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-CAfile")
        .arg(ca)
        .args(["-verify_return_error", "-ign_eof"]);
    if let Some((cert, key)) = cred {
        cmd.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    run(cmd, request.as_bytes(), Duration::from_secs(15)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openssl_mutual_handshake_with_agent_certificates() {
    if !openssl_ready() {
        return;
    }
    let ca = TestCa::start().await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (_server_agent, srv) = start_agent(&ca, w, "db", DB, &["--ttl", "60s"]).await;
    let (_client_agent, cli) = start_agent(&ca, w, "api", API, &["--ttl", "60s"]).await;
    let client_serial = dir_svid(&cli).unwrap().serial.to_hex();

    let (mut server, port) = s_server(
        w,
        "s_server",
        &srv.join("cert.pem"),
        &srv.join("key.pem"),
        &srv.join("bundle.pem"),
    );
    wait_listening(([127, 0, 0, 1], port).into(), &mut server).await;
    const GET: &str = "GET / HTTP/1.0\r\n\r\n";

    // Agent cert against agent cert: both sides verify.
    let ok = s_client(
        port,
        Some((&cli.join("cert.pem"), &cli.join("key.pem"))),
        &cli.join("bundle.pem"),
        GET,
    )
    .await;
    let ok_text = text(&ok);
    assert!(ok.status.success(), "{ok_text}");
    assert!(
        ok_text.contains("Verify return code: 0 (ok)"),
        "s_client verified the server: {ok_text}"
    );
    assert!(ok_text.contains("HTTP/1.0 200 ok"), "{ok_text}");
    // s_server -www reports the client certificate it verified.
    let client_leaf = std::fs::read_to_string(cli.join("cert.pem")).unwrap();
    let client_b64: String = client_leaf
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let page: String = String::from_utf8_lossy(&ok.stdout)
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(
        page.contains(&client_b64[..64]),
        "the server saw client certificate {client_serial}: {ok_text}"
    );

    // A client certificate not from Lanyard: the server refuses it.
    let (bad_cert, bad_key) = self_signed(&w.join("rogue"), API);
    let refused = s_client(
        port,
        Some((&bad_cert, &bad_key)),
        &cli.join("bundle.pem"),
        GET,
    )
    .await;
    let refused_text = text(&refused);
    assert!(!refused_text.contains("200 ok"), "{refused_text}");
    let server_log = poll_until(Duration::from_secs(3), Duration::from_millis(25), || {
        let log = server.output();
        log.contains("self-signed certificate").then_some(log)
    })
    .await;
    assert!(
        server_log.is_some(),
        "s_server must reject the self-signed client certificate:\n{}\n{refused_text}",
        server.output()
    );
    // No client certificate at all: refused too (-Verify requires one).
    let none = s_client(port, None, &cli.join("bundle.pem"), GET).await;
    assert!(!text(&none).contains("200 ok"), "{}", text(&none));

    // And the other direction: a client verifying against the Lanyard bundle refuses a server
    // that is not from Lanyard.
    let (rogue_server_cert, rogue_server_key) = self_signed(&w.join("rogue-server"), DB);
    let (mut rogue, rogue_port) = s_server(
        w,
        "rogue_s_server",
        &rogue_server_cert,
        &rogue_server_key,
        &srv.join("bundle.pem"),
    );
    wait_listening(([127, 0, 0, 1], rogue_port).into(), &mut rogue).await;
    let out = s_client(
        rogue_port,
        Some((&cli.join("cert.pem"), &cli.join("key.pem"))),
        &cli.join("bundle.pem"),
        GET,
    )
    .await;
    let out_text = text(&out);
    assert!(!out.status.success(), "{out_text}");
    assert!(
        out_text.contains("self-signed certificate") && !out_text.contains("200 ok"),
        "{out_text}"
    );
}

// === nginx ===

fn nginx_bin() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A minimal nginx.conf: everything under `dir`, one TLS server on `port` with the agent's
/// files and `ssl_verify_client on` against its bundle.
fn nginx_conf(nginx: &Path, dir: &Path, port: u16, creds: &Path) -> PathBuf {
    let svid = creds.join("svid.pem");
    let server = format!(
        r#"    server {{
        listen 127.0.0.1:{port} ssl;
        # svid.pem holds the key and the chain.
        ssl_certificate {svid};
        ssl_certificate_key {svid};
        ssl_client_certificate {bundle};
        ssl_verify_client on;
        default_type text/plain;
        location / {{
            return 200 "verify=$ssl_client_verify serial=$ssl_client_serial\n";
        }}
    }}
"#,
        svid = svid.display(),
        bundle = creds.join("bundle.pem").display(),
    );
    nginx_conf_with(nginx, dir, &server)
}

/// An nginx.conf with everything under `dir` around `servers` (the `server` blocks).
fn nginx_conf_with(nginx: &Path, dir: &Path, servers: &str) -> PathBuf {
    // Temp paths only for the modules this build has (nginx-light lacks some).
    let built = std::process::Command::new(nginx)
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    let mut temp = String::new();
    for (flag, directive) in [
        ("client-body", "client_body_temp_path"),
        ("proxy", "proxy_temp_path"),
        ("fastcgi", "fastcgi_temp_path"),
        ("uwsgi", "uwsgi_temp_path"),
        ("scgi", "scgi_temp_path"),
    ] {
        if flag == "client-body" || built.contains(&format!("--http-{flag}-temp-path")) {
            temp.push_str(&format!("    {directive} {}/tmp/{flag};\n", dir.display()));
        }
    }
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let conf = format!(
        r#"daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
{temp}{servers}}}
"#,
        dir = dir.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

/// The base64 SHA-256 of a certificate's SubjectPublicKeyInfo (curl's --pinnedpubkey).
fn spki_pin(cert_pem: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = CertificateDer::from_pem_slice(cert_pem).unwrap();
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(cert.public_key().raw))
}

/// An HTTPS GET with `lanyard::tls::client_config`: the server must be `server_id`. Returns
/// the server's serial and the response.
async fn rustls_get(
    port: u16,
    source: &Arc<TlsSource>,
    server_id: &str,
) -> Result<(String, String), String> {
    let cfg = client_config(source, Authorizer::parse(&[server_id]).unwrap(), None).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let serial = lanyard::ca::parse_svid(&leaf, &RolesOid::default())
        .unwrap()
        .serial
        .to_hex();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    let _ = tls.read_to_end(&mut body).await;
    Ok((serial, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nginx_serves_with_agent_files_verifies_clients_and_reloads_on_rotation() {
    let nginx = nginx_bin();
    if !require_tool("nginx", nginx.is_some(), "`apt-get install nginx-light`")
        || !openssl_ready()
        || !require_tool(
            "curl",
            command_works("curl", &["--version"]),
            "`apt-get install curl`",
        )
    {
        return;
    }
    let nginx = nginx.unwrap();
    let ca = TestCa::start().await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let ngx_dir = w.join("nginx");
    std::fs::create_dir_all(&ngx_dir).unwrap();
    let port = free_port();
    let srv = w.join("web");
    let conf = nginx_conf(&nginx, &ngx_dir, port, &srv);
    let rotations = w.join("rotations.log");
    // The hook the docs recommend: reload nginx after each rotation. (The first run, before
    // nginx is up, fails harmlessly.)
    let hook = format!(
        "echo \"$LANYARD_SERIAL\" >> '{}'; '{}' -s reload -c '{}' -p '{}'",
        rotations.display(),
        nginx.display(),
        conf.display(),
        ngx_dir.display()
    );
    let (_server_agent, _) =
        start_agent(&ca, w, "web", WEB, &["--ttl", "10s", "--on-rotate", &hook]).await;
    let (_client_agent, cli) = start_agent(&ca, w, "api", API, &["--ttl", "60s"]).await;
    let client_serial = dir_svid(&cli).unwrap().serial.to_hex();

    let mut cmd = std::process::Command::new(&nginx);
    cmd.arg("-c").arg(&conf).arg("-p").arg(&ngx_dir);
    let mut server = ChildGuard::spawn("nginx", &mut cmd, &ngx_dir.join("stderr.log"));
    wait_listening(([127, 0, 0, 1], port).into(), &mut server).await;
    const GET: &str = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    // nginx prints the serial's bytes in upper-case hex.
    let expect_body = format!(
        "verify=SUCCESS serial={}",
        client_serial.to_ascii_uppercase()
    );

    // OpenSSL as the HTTP client, verifying nginx's chain against the Lanyard bundle.
    let ok = s_client(
        port,
        Some((&cli.join("cert.pem"), &cli.join("key.pem"))),
        &cli.join("bundle.pem"),
        GET,
    )
    .await;
    let ok_text = text(&ok);
    assert!(ok_text.contains("Verify return code: 0 (ok)"), "{ok_text}");
    assert!(ok_text.contains("HTTP/1.1 200 OK"), "{ok_text}");
    assert!(
        ok_text.contains(&expect_body),
        "nginx verified the agent's client certificate: {ok_text}"
    );

    // curl with the other agent's certificate. SPIFFE certificates carry only a URI SAN and
    // curl cannot skip just the host name check, so instead of --cacert it pins the public key
    // of the certificate the agent wrote for nginx (-k turns off the CA and name checks; the
    // pin is still enforced, and is stricter). The pin is re-read if a rotation intervenes.
    let mut curl_out = None;
    for _ in 0..5 {
        let pin = spki_pin(&std::fs::read(srv.join("cert.pem")).unwrap());
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "-k", "--pinnedpubkey", &format!("sha256//{pin}")])
            .arg("--cert")
            .arg(cli.join("cert.pem"))
            .arg("--key")
            .arg(cli.join("key.pem"))
            .args(["-w", "\nstatus=%{http_code}\n"])
            .arg(format!("https://127.0.0.1:{port}/"));
        let out = run(cmd, b"", Duration::from_secs(15)).await;
        // 90: pin mismatch (nginx not reloaded yet after a rotation).
        if out.status.code() != Some(90) {
            curl_out = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let curl_out = curl_out.expect("curl matched the pin");
    // The pin is enforced under -k: a key that is not nginx's is refused (exit 90).
    let wrong_pin = spki_pin(&std::fs::read(cli.join("cert.pem")).unwrap());
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "--pinnedpubkey",
        &format!("sha256//{wrong_pin}"),
    ])
    .arg("--cert")
    .arg(cli.join("cert.pem"))
    .arg("--key")
    .arg(cli.join("key.pem"))
    .arg(format!("https://127.0.0.1:{port}/"));
    let pinned_out = run(cmd, b"", Duration::from_secs(15)).await;
    assert_eq!(pinned_out.status.code(), Some(90), "{}", text(&pinned_out));
    let curl_text = text(&curl_out);
    assert!(curl_out.status.success(), "{curl_text}");
    assert!(curl_text.contains("status=200"), "{curl_text}");
    assert!(curl_text.contains(&expect_body), "{curl_text}");

    // lanyard::tls as the client: authenticates nginx by its SPIFFE ID.
    let source = TlsSource::from_dir(&cli, RolesOid::default(), Duration::from_millis(200))
        .await
        .unwrap();
    let (_, body) = rustls_get(port, &source, WEB).await.expect("rustls client");
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains(&expect_body), "{body}");
    // ... and refuses it when it expects another ID.
    let err = rustls_get(port, &source, DB)
        .await
        .expect_err("nginx is not the db");
    assert!(err.contains("matches no rule"), "{err}");

    // A client certificate not from Lanyard: nginx answers 400.
    let (bad_cert, bad_key) = self_signed(&w.join("rogue"), API);
    let bad = s_client(
        port,
        Some((&bad_cert, &bad_key)),
        &cli.join("bundle.pem"),
        GET,
    )
    .await;
    let bad_text = text(&bad);
    assert!(
        bad_text.contains("HTTP/1.1 400 Bad Request")
            && bad_text.contains("The SSL certificate error"),
        "{bad_text}"
    );
    // No client certificate: 400 too.
    let none = s_client(port, None, &cli.join("bundle.pem"), GET).await;
    let none_text = text(&none);
    assert!(
        none_text.contains("HTTP/1.1 400 Bad Request")
            && none_text.contains("No required SSL certificate was sent"),
        "{none_text}"
    );

    // Rotation: the agent renews at about 5 s, its hook reloads nginx, and new connections get
    // the new certificate.
    let runs = std::fs::read_to_string(&rotations)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(runs >= 1, "the hook ran for the first certificate");
    let rotated = poll_until(Duration::from_secs(12), Duration::from_millis(100), || {
        let log = std::fs::read_to_string(&rotations).unwrap_or_default();
        let lines: Vec<String> = log.lines().map(str::to_string).collect();
        (lines.len() > runs).then(|| lines[lines.len() - 1].clone())
    })
    .await
    .expect("the agent rotated nginx's certificate");
    let started = Instant::now();
    let served = loop {
        let (serial, body) = rustls_get(port, &source, WEB).await.expect("rustls client");
        if serial == rotated {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "nginx still serves {serial}, not {rotated}:\n{}",
            std::fs::read_to_string(ngx_dir.join("error.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "nginx serves the rotated certificate {:?} after the hook ran",
        started.elapsed()
    );
    assert!(served.starts_with("HTTP/1.1 200 OK"), "{served}");
    let error_log = std::fs::read_to_string(ngx_dir.join("error.log")).unwrap_or_default();
    assert!(error_log.contains("reconfiguring"), "{error_log}");
    assert!(server.is_running(), "nginx exited:\n{}", server.output());
}

/// The `server` block of docs/nginx.md, run as written but for its paths and ports, plus one
/// location that shows what `$ssl_client_s_dn` holds for an SVID.
fn doc_nginx_server(creds: &Path, port: u16, upstream: u16) -> String {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/nginx.md"))
        .unwrap();
    let start = doc
        .find("```nginx\n")
        .expect("docs/nginx.md has an nginx block")
        + 9;
    let block = &doc[start..start + doc[start..].find("```").unwrap()];
    let mut server = block.to_string();
    for (from, to) in [
        ("/var/lib/lanyard/web", creds.display().to_string()),
        ("listen 443 ssl;", format!("listen 127.0.0.1:{port} ssl;")),
        ("127.0.0.1:8080", format!("127.0.0.1:{upstream}")),
    ] {
        assert!(
            server.contains(from),
            "docs/nginx.md no longer has {from:?}"
        );
        server = server.replace(from, &to);
    }
    let end = server.rfind('}').unwrap();
    server.insert_str(
        end,
        "    location = /dn {\n        default_type text/plain;\n        return 200 \"dn=[$ssl_client_s_dn]\\n\";\n    }\n",
    );
    server
}

/// Decodes nginx's `$ssl_client_escaped_cert` (URL-escaped PEM).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(byte) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The upstream of docs/nginx.md's first pattern: authorizes by the SPIFFE ID in the
/// `X-Client-Cert` header nginx sets. Answers 200 to `allowed`, 403 to anybody else, 401
/// without the header. Returns its port.
async fn spawn_authorizing_upstream(allowed: &'static [&'static str]) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 64 * 1024 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req).into_owned();
                let cert = head.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("x-client-cert")
                        .then(|| unescape(value.trim()))
                });
                let id = cert.and_then(|pem| {
                    let der = CertificateDer::from_pem_slice(&pem).ok()?;
                    lanyard::ca::parse_svid(&der, &RolesOid::default()).ok()
                });
                let (status, body) = match id {
                    Some(svid) if allowed.contains(&svid.spiffe_id.as_str()) => {
                        ("200 OK", format!("hello {}\n", svid.spiffe_id))
                    }
                    Some(svid) => ("403 Forbidden", format!("{} may not\n", svid.spiffe_id)),
                    None => ("401 Unauthorized", "no client certificate\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nginx_follows_the_agents_crl_and_an_upstream_authorizes_by_spiffe_id() {
    const VICTIM: &str = "spiffe://example.org/ns/prod/victim";
    let nginx = nginx_bin();
    if !require_tool("nginx", nginx.is_some(), "`apt-get install nginx`") || !openssl_ready() {
        return;
    }
    let nginx = nginx.unwrap();
    // CRLs valid for 4 s: nginx must be handed a fresh one, period after period.
    let ca = TestCa::start_with("crl_validity = \"4s\"", common::POLICY).await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let ngx_dir = w.join("nginx");
    std::fs::create_dir_all(&ngx_dir).unwrap();
    let port = free_port();
    let upstream = spawn_authorizing_upstream(&[API, VICTIM]).await;
    let srv = w.join("web");
    let conf = nginx_conf_with(&nginx, &ngx_dir, &doc_nginx_server(&srv, port, upstream));
    // docs/nginx.md's hook, pointed at this nginx.
    let hook_log = w.join("hook.log");
    let hook = format!(
        "echo \"$LANYARD_EVENT\" >> '{}'; '{}' -s reload -c '{}' -p '{}'",
        hook_log.display(),
        nginx.display(),
        conf.display(),
        ngx_dir.display()
    );
    let (mut web_agent, _) =
        start_agent(&ca, w, "web", WEB, &["--ttl", "60s", "--on-rotate", &hook]).await;
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(25), || {
            srv.join("crl.pem").exists().then_some(())
        })
        .await
        .is_some(),
        "the agent wrote no crl.pem for nginx:\n{}",
        web_agent.output()
    );
    let api = ca.enroll("api", API, &[], 300).await;
    let db = ca.enroll("db", DB, &[], 300).await;
    let victim = ca.enroll("victim", VICTIM, &[], 300).await;

    let mut cmd = std::process::Command::new(&nginx);
    cmd.arg("-c").arg(&conf).arg("-p").arg(&ngx_dir);
    let mut server = ChildGuard::spawn("nginx", &mut cmd, &ngx_dir.join("stderr.log"));
    wait_listening(([127, 0, 0, 1], port).into(), &mut server).await;
    let bundle = srv.join("bundle.pem");
    let get = |dir: PathBuf, path: &'static str| {
        let bundle = bundle.clone();
        async move {
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            let out = s_client(
                port,
                Some((&dir.join("cert.pem"), &dir.join("key.pem"))),
                &bundle,
                &req,
            )
            .await;
            text(&out)
        }
    };
    let error_log = || std::fs::read_to_string(ngx_dir.join("error.log")).unwrap_or_default();

    // Authentication in nginx, authorization by SPIFFE ID in the upstream.
    let ok = get(api.clone(), "/").await;
    assert!(
        ok.contains("HTTP/1.1 200 OK") && ok.contains(&format!("hello {API}")),
        "{ok}\n{}",
        error_log()
    );
    let refused = get(db.clone(), "/").await;
    assert!(
        refused.contains("HTTP/1.1 403 Forbidden") && refused.contains(&format!("{DB} may not")),
        "{refused}"
    );
    // What the docs say nginx alone sees: an SVID's subject is empty.
    let dn = get(api.clone(), "/dn").await;
    assert!(dn.contains("dn=[]"), "{dn}");
    let none = text(&s_client(port, None, &bundle, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await);
    assert!(
        none.contains("No required SSL certificate was sent"),
        "{none}"
    );
    let before = get(victim.clone(), "/").await;
    assert!(before.contains("HTTP/1.1 200 OK"), "{before}");

    // Revoked: within a couple of seconds, after the hook's reload, nginx refuses it.
    let serial = dir_svid(&victim).unwrap().serial.to_hex();
    RevocationClient::new(ca.admin_channel().await)
        .revoke(pb::RevokeRequest {
            target: Some(Target::Serial(serial.clone())),
            reason: "test".into(),
            lift: false,
        })
        .await
        .expect("admin revokes");
    let revoked_at = Instant::now();
    loop {
        let out = get(victim.clone(), "/").await;
        if out.contains("HTTP/1.1 400 Bad Request") && out.contains("The SSL certificate error") {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(3),
            "nginx still admits revoked {serial} after {:?}:\n{out}\n{}",
            revoked_at.elapsed(),
            error_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "nginx refuses the revoked certificate {:?} after the revocation",
        revoked_at.elapsed()
    );
    assert!(
        error_log().contains("certificate revoked"),
        "{}",
        error_log()
    );

    // Four CRL validity periods later, a good client has never been refused: each refresh
    // reached nginx before the CRL in force expired.
    let started = Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(16) {
        let out = get(api.clone(), "/").await;
        assert!(
            out.contains("HTTP/1.1 200 OK"),
            "good client refused after {:?}:\n{out}\n{}",
            started.elapsed(),
            error_log()
        );
        requests += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = error_log();
    assert!(!log.contains("CRL has expired"), "{log}");
    let crl_reloads = std::fs::read_to_string(&hook_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == "crl")
        .count();
    eprintln!("{requests} requests over 4 CRL periods; {crl_reloads} reloads for new CRLs");
    assert!(
        crl_reloads >= 4,
        "the hook reloaded nginx on each CRL refresh"
    );
    assert!(
        web_agent.is_running(),
        "agent exited:\n{}",
        web_agent.output()
    );
    assert!(server.is_running(), "nginx exited:\n{}", server.output());
}
