//! Interoperability: certificates from the real server must satisfy OpenSSL (`openssl verify
//! -purpose sslclient|sslserver`) and Go's crypto/x509 (Verify with ClientAuth and ServerAuth,
//! plus reading the roles extension), via the stdlib-only verifier in `tests/go/`.
//!
//! Without `openssl` or `go` the tests skip loudly, unless `CI` is set: then they fail, because
//! `.ci/run` must install them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::TestCa;

const API: &str = "spiffe://example.org/ns/prod/api";

/// Whether `tool` runs (`tool <version_arg>`). When it does not: panics under CI, else prints a
/// loud skip notice and returns false.
fn have(tool: &str, version_arg: &str, package: &str) -> bool {
    let ok = Command::new(tool)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "`{tool}` is not installed, but CI is set: .ci/run must install it (apt-get install -y {package})"
        );
    }
    // Written to the real stderr, not through `eprintln!`, which the test harness captures and
    // hides for passing tests: a skip must be visible.
    let bar = "!".repeat(72);
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\n!!! SKIPPED: `{tool}` is not installed; interop test not run.\n\
         !!! Install it (apt-get install -y {package}); under CI this is a failure.\n{bar}\n"
    );
    false
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

#[track_caller]
fn assert_success(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// `openssl verify -CAfile <bundle> -purpose <purpose> <cert>`.
fn openssl_verify(bundle: &Path, cert: &Path, purpose: &str) -> Output {
    run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(bundle)
        .args(["-purpose", purpose])
        .arg(cert))
}

/// Builds the Go verifier once per test binary, with caches under cargo's target tmp dir and
/// the network off (it is stdlib only).
fn go_verifier() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-svidverify");
        std::fs::create_dir_all(&tmp).unwrap();
        // One binary per test process (runs may overlap); sweep those of long-gone runs.
        for e in std::fs::read_dir(&tmp).unwrap().flatten() {
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600));
            if stale && e.file_name().to_string_lossy().starts_with("svidverify-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let out = tmp.join(format!("svidverify-{}", std::process::id()));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/go");
        let o = run(Command::new("go")
            .args(["build", "-buildvcs=false", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&src)
            .env("GOCACHE", tmp.join("cache"))
            .env("GOPATH", tmp.join("gopath"))
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=mod")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0"));
        assert_success(&o, "go build tests/go");
        out
    })
}

fn go_verify(bundle: &Path, cert: &Path) -> Output {
    run(Command::new(go_verifier())
        .arg("-bundle")
        .arg(bundle)
        .arg("-cert")
        .arg(cert))
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_verifies_leaves_for_client_and_server_use() {
    if !have("openssl", "version", "openssl") {
        return;
    }
    let ca = TestCa::start().await;
    let rogue = TestCa::start().await;
    let with_roles = ca.enroll("api", API, &["db-read", "deploy"], 120).await;
    let no_roles = ca
        .enroll("job", "spiffe://example.org/ns/prod/job", &[], 120)
        .await;
    let bundle = ca.admin_dir().join("bundle.pem");

    for dir in [&with_roles, &no_roles, &ca.admin_dir()] {
        let cert = dir.join("cert.pem");
        for purpose in ["sslclient", "sslserver"] {
            let o = openssl_verify(&bundle, &cert, purpose);
            assert_success(
                &o,
                &format!("openssl verify -purpose {purpose} {}", cert.display()),
            );
            assert!(
                text(&o.stdout).trim_end().ends_with(": OK"),
                "{}",
                text(&o.stdout)
            );
        }
    }

    // What OpenSSL reads out of the leaf.
    let o = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(with_roles.join("cert.pem")));
    assert_success(&o, "openssl x509 -text");
    let t = text(&o.stdout);
    for want in [
        "X509v3 Key Usage: critical",
        "Digital Signature",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "CA:FALSE",
        &format!("URI:{API}"),
        "1.3.9999.7781.1:",
    ] {
        assert!(t.contains(want), "openssl x509 -text lacks {want:?}:\n{t}");
    }
    assert!(
        !t.contains("1.3.9999.7781.1: critical"),
        "roles extension must be non-critical:\n{t}"
    );
    assert!(!t.contains("DNS:"), "{t}");

    // The check can fail: another CA's bundle (same name, same trust domain) is refused.
    let o = openssl_verify(
        &rogue.admin_dir().join("bundle.pem"),
        &with_roles.join("cert.pem"),
        "sslclient",
    );
    assert!(
        !o.status.success(),
        "openssl accepted a leaf against the wrong CA: {}",
        text(&o.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn go_crypto_x509_verifies_leaves_and_reads_roles() {
    if !have("go", "version", "golang-go") {
        return;
    }
    let ca = TestCa::start().await;
    let rogue = TestCa::start().await;
    let bundle = ca.admin_dir().join("bundle.pem");

    let with_roles = ca.enroll("api", API, &["deploy", "db-read"], 120).await;
    let o = go_verify(&bundle, &with_roles.join("cert.pem"));
    assert_success(&o, "go verifier (roles)");
    assert_eq!(
        text(&o.stdout),
        format!("uri={API}\nroles=db-read,deploy\n")
    );

    // A renewed certificate (new key, same identity) verifies the same way.
    ca.renew(&with_roles, 60).await.expect("renew");
    let o = go_verify(&bundle, &with_roles.join("cert.pem"));
    assert_success(&o, "go verifier (renewed)");
    assert_eq!(
        text(&o.stdout),
        format!("uri={API}\nroles=db-read,deploy\n")
    );

    let no_roles = ca
        .enroll("job", "spiffe://example.org/ns/prod/job", &[], 120)
        .await;
    let o = go_verify(&bundle, &no_roles.join("cert.pem"));
    assert_success(&o, "go verifier (no roles)");
    assert_eq!(
        text(&o.stdout),
        "uri=spiffe://example.org/ns/prod/job\nroles=\n"
    );

    let o = go_verify(&bundle, &ca.admin_dir().join("cert.pem"));
    assert_success(&o, "go verifier (admin credential)");
    assert_eq!(
        text(&o.stdout),
        "uri=spiffe://example.org/lanyard/admin\nroles=lanyard:admin\n"
    );

    // The verifier can fail: the same leaf against another CA's bundle.
    let o = go_verify(
        &rogue.admin_dir().join("bundle.pem"),
        &with_roles.join("cert.pem"),
    );
    assert!(
        !o.status.success(),
        "Go accepted a leaf against the wrong CA: {}",
        text(&o.stdout)
    );
    let err = text(&o.stderr);
    assert!(
        err.contains("verify for ClientAuth") && err.contains("unknown authority"),
        "{err}"
    );
}

// === CA rotation, seen by OpenSSL and Go ===

/// The certificates a TLS server presents, leaf first, as `openssl s_client -showcerts` sees
/// them (no client certificate: the CA makes it optional).
fn served_chain(addr: &str) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    let o = run(Command::new("openssl")
        .args(["s_client", "-connect", addr, "-showcerts"])
        .stdin(std::process::Stdio::null()));
    rustls_pki_types::CertificateDer::pem_slice_iter(&o.stdout)
        .collect::<Result<_, _>>()
        .unwrap_or_default()
}

/// (subject, issuer, whether it is a CA) of a DER certificate.
fn names(der: &[u8]) -> (Vec<u8>, Vec<u8>, bool) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(der).unwrap();
    (
        c.subject().as_raw().to_vec(),
        c.issuer().as_raw().to_vec(),
        c.is_ca(),
    )
}

/// Writes `certs` as one PEM file `dir/name`.
fn pem_file(dir: &Path, name: &str, certs: &[rustls_pki_types::CertificateDer<'_>]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lanyard::ca::certs_to_pem(certs)).unwrap();
    path
}

/// Issue #11 item 10: after a CA rotation, a client that holds only the OLD bundle accepts a leaf
/// of the NEW CA with the cross-signed certificate as its intermediate — in OpenSSL and in Go's
/// crypto/x509, which (unlike Lanyard's own verifier) enforce the trust anchor's
/// pathLenConstraint. So do clients with only the new bundle and with both.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_ca_verifies_with_only_the_old_bundle_in_openssl_and_go() {
    use lanyard::pb::v1::{self as pb, admin_client::AdminClient};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    if !have("openssl", "version", "openssl") {
        return;
    }
    let ca = TestCa::start_with("ca_rotation_overlap = \"1s\"", common::POLICY).await;
    let work = ca.dir.path().join("rotation");
    std::fs::create_dir_all(&work).unwrap();
    let old_root = ca.bundle().certs()[0].clone();
    let old_pem = pem_file(&work, "old.pem", std::slice::from_ref(&old_root));

    let st = AdminClient::new(ca.admin_channel().await)
        .rotate_ca(pb::RotateCaRequest {})
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(st.phase, "staged");
    // Switched (after the 1 s overlap): the serving chain carries the new CA cross-signed by the
    // old one, then both roots.
    let chain = common::poll_until(
        std::time::Duration::from_secs(15),
        std::time::Duration::from_millis(200),
        || {
            let chain = served_chain(&ca.server());
            chain
                .iter()
                .skip(1)
                .any(|c| {
                    let (subject, issuer, is_ca) = names(c);
                    is_ca && subject != issuer
                })
                .then_some(chain)
        },
    )
    .await
    .expect("the CA switches to the new CA and serves the cross-signed certificate");
    let cross = chain
        .iter()
        .skip(1)
        .find(|c| {
            let (subject, issuer, _) = names(c);
            subject != issuer
        })
        .unwrap()
        .clone();
    let (cross_subject, cross_issuer, _) = names(&cross);
    assert_eq!(
        cross_issuer,
        names(&old_root).0,
        "cross-signed by the old CA"
    );
    let new_root = chain
        .iter()
        .find(|c| {
            let (subject, issuer, _) = names(c);
            subject == issuer && subject == cross_subject
        })
        .expect("the new root is served too")
        .clone();
    assert_ne!(new_root, old_root);
    let cross_pem = pem_file(&work, "cross.pem", std::slice::from_ref(&cross));
    let new_pem = pem_file(&work, "new.pem", std::slice::from_ref(&new_root));
    let both_pem = pem_file(&work, "both.pem", &[new_root.clone(), old_root.clone()]);

    // A workload leaf issued by the new CA, and the CA's own serving leaf.
    let dir = ca.enroll("api", API, &["db-read"], 120).await;
    let leaf: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&std::fs::read(dir.join("cert.pem")).unwrap())
            .collect::<Result<_, _>>()
            .unwrap();
    assert_eq!(names(&leaf[0]).1, cross_subject, "issued by the new CA");
    let workload = pem_file(&work, "leaf.pem", &leaf[..1]);
    let server = pem_file(&work, "server.pem", &chain[..1]);

    for (leaf_pem, purpose) in [(&workload, "sslclient"), (&server, "sslserver")] {
        for (bundle, name) in [(&old_pem, "old"), (&new_pem, "new"), (&both_pem, "both")] {
            let o = run(Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(bundle)
                .arg("-untrusted")
                .arg(&cross_pem)
                .args(["-purpose", purpose])
                .arg(leaf_pem));
            assert_success(
                &o,
                &format!(
                    "openssl verify -purpose {purpose} with the {name} bundle and the cross-signed CA"
                ),
            );
        }
    }
    // The check can fail: the old bundle alone, without the cross-signed certificate.
    let o = openssl_verify(&old_pem, &workload, "sslclient");
    assert!(!o.status.success(), "{}", text(&o.stdout));

    if !have("go", "version", "golang-go") {
        return;
    }
    let with_cross = pem_file(&work, "leaf+cross.pem", &[leaf[0].clone(), cross.clone()]);
    let server_with_cross = pem_file(&work, "server+cross.pem", &[chain[0].clone(), cross]);
    for (cert, uri) in [
        (&with_cross, API),
        (&server_with_cross, "spiffe://example.org/lanyard/server"),
    ] {
        for (bundle, name) in [(&old_pem, "old"), (&new_pem, "new"), (&both_pem, "both")] {
            let o = go_verify(bundle, cert);
            assert_success(
                &o,
                &format!("go verifier with the {name} bundle and the cross-signed CA"),
            );
            assert!(text(&o.stdout).starts_with(&format!("uri={uri}\n")));
        }
    }
    let o = go_verify(&old_pem, &workload);
    assert!(!o.status.success(), "{}", text(&o.stdout));
}
