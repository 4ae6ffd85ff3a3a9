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
