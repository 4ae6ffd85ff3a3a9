//! The `lanyard` binary end to end: `serve` as a real process, the admin and workload verbs
//! against it, restarts over the same data dir, and policy reloads (file change, broken file,
//! SIGHUP). Every server process is stopped by a guard, even when an assertion fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{POLICY, lanyard_cmd};
use lanyard::ca::RolesOid;
use lanyard::client::Credential;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

const API: &str = "spiffe://example.org/ns/prod/sa/api";

/// A `lanyard serve` process over a data dir; killed on drop.
struct Serve {
    child: Child,
    data: PathBuf,
    log: PathBuf,
    addr: String,
}

impl Serve {
    /// Starts `lanyard serve --config <config> --data-dir <data> --listen 127.0.0.1:0` and waits
    /// for it to write `<data>/serve.addr`. Logs go to `<log>`.
    fn start(config: &Path, data: &Path, log: &Path) -> Self {
        let addr_file = data.join("serve.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log_file = std::fs::File::create(log).unwrap();
        let mut cmd = lanyard_cmd();
        let child = cmd
            .args(["serve", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn lanyard serve");
        let mut serve = Self {
            child,
            data: data.to_path_buf(),
            log: log.to_path_buf(),
            addr: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                if !a.trim().is_empty() {
                    serve.addr = a.trim().to_string();
                    return serve;
                }
            }
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!(
                    "lanyard serve exited early ({status}); log:\n{}",
                    serve.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "serve.addr did not appear in 30s; log:\n{}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn admin(&self) -> PathBuf {
        self.data.join("admin")
    }

    /// Sends a signal with `kill(1)`.
    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "serve exited with {status} on SIGTERM; log:\n{}",
                    self.log()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not stop within 15s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log contains `needle` at least `count` times.
    fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.log().matches(needle).count() >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "log never showed {needle:?} x{count}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a client verb against this server with the admin credential.
    fn admin_cmd(&self, args: &[&str]) -> Output {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend([
            "--server".into(),
            self.addr.clone(),
            "--credential".into(),
            self.admin().display().to_string(),
        ]);
        lanyard(&full, &[])
    }

    /// `lanyard token create` for `id` with `roles`; returns the token.
    fn token(&self, id: &str, roles: &str) -> String {
        let out = self.admin_cmd(&[
            "token",
            "create",
            "--spiffe-id",
            id,
            "--roles",
            roles,
            "--max-ttl",
            "10m",
            "--expires-in",
            "1h",
        ]);
        assert_ok(&out, "token create");
        let token = stdout(&out).trim().to_string();
        assert!(
            token.starts_with("lanyard1."),
            "token create printed {token:?}"
        );
        assert_eq!(token.lines().count(), 1, "stdout is the token alone");
        token
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the binary with a clean `LANYARD_*` environment plus `env`.
fn lanyard<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut cmd = lanyard_cmd();
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    cmd.output().expect("run lanyard")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

#[track_caller]
fn assert_fails_with(o: &Output, what: &str, needle: &str) {
    assert!(
        !o.status.success(),
        "{what} unexpectedly succeeded:\nstdout: {}",
        stdout(o)
    );
    assert!(
        stderr(o).contains(needle),
        "{what}: stderr does not mention {needle:?}:\n{}",
        stderr(o)
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn pem_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

fn config_text(policy: &str) -> String {
    format!("trust_domain = \"example.org\"\nmin_ttl = \"1s\"\n\n{policy}")
}

/// A temp dir with `lanyard.toml` (the default test policy) and paths for data and logs.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let f = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(f.config(), config_text(POLICY)).unwrap();
        f
    }
    fn config(&self) -> PathBuf {
        self.dir.path().join("lanyard.toml")
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn serve(&self, log_name: &str) -> Serve {
        Serve::start(&self.config(), &self.data(), &self.path(log_name))
    }
}

/// The policy with `deploy` removed from the prod rule.
fn narrowed_policy() -> String {
    let p = POLICY.replace("roles = [\"db-read\", \"deploy\"]", "roles = [\"db-read\"]");
    assert_ne!(p, POLICY, "test policy changed shape; update this test");
    p
}

#[test]
fn walkthrough_token_issue_renew_inspect_audit_bundle() {
    let fx = Fixture::new();
    let serve = fx.serve("serve.log");
    let work = fx.path("work");

    // token create
    let token = serve.token(API, "db-read,deploy");

    // issue --ttl 2m
    let out = lanyard(
        &[
            "issue",
            "--token",
            &token,
            "--out",
            work.to_str().unwrap(),
            "--ttl",
            "2m",
            "--server",
            &serve.addr,
        ],
        &[],
    );
    assert_ok(&out, "issue");
    assert!(
        stdout(&out).contains(API) && stdout(&out).contains("roles=db-read,deploy"),
        "issue printed {}",
        stdout(&out)
    );
    let first = Credential::load(&work, &RolesOid::default()).expect("issue wrote a credential");
    assert_eq!(first.svid.spiffe_id.as_str(), API);
    assert_eq!(first.svid.roles, vec!["db-read", "deploy"]);
    assert_eq!(first.svid.not_after - first.svid.not_before, 120 + 30);
    assert_eq!(mode(&work.join("key.pem")), 0o600);
    let bundle_pem = std::fs::read(work.join("bundle.pem")).unwrap();
    let ca_pem = std::fs::read(fx.data().join("ca/ca.pem")).unwrap();
    assert_eq!(
        pem_certs(&bundle_pem),
        pem_certs(&ca_pem),
        "bundle.pem is the CA"
    );

    // The same token again: refused, and the credential on disk is untouched.
    let cert_before = std::fs::read(work.join("cert.pem")).unwrap();
    let key_before = std::fs::read(work.join("key.pem")).unwrap();
    let out = lanyard(
        &[
            "issue",
            "--token",
            &token,
            "--out",
            work.to_str().unwrap(),
            "--server",
            &serve.addr,
        ],
        &[],
    );
    assert_fails_with(&out, "issue with a used token", "already used");
    assert_eq!(std::fs::read(work.join("cert.pem")).unwrap(), cert_before);
    assert_eq!(std::fs::read(work.join("key.pem")).unwrap(), key_before);

    // renew: same ID, new key and serial.
    let out = lanyard(
        &[
            "renew",
            "--credential",
            work.to_str().unwrap(),
            "--server",
            &serve.addr,
        ],
        &[],
    );
    assert_ok(&out, "renew");
    let renewed = Credential::load(&work, &RolesOid::default()).unwrap();
    assert_eq!(renewed.svid.spiffe_id.as_str(), API);
    assert_eq!(renewed.svid.roles, vec!["db-read", "deploy"]);
    assert_ne!(renewed.svid.serial, first.svid.serial);
    assert_ne!(
        std::fs::read(work.join("key.pem")).unwrap(),
        key_before,
        "renew generates a new key"
    );
    assert_eq!(mode(&work.join("key.pem")), 0o600);

    // A credential directory whose key is not the certificate's is refused before any TLS,
    // naming the file.
    let mixed = fx.path("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for f in ["cert.pem", "bundle.pem"] {
        std::fs::copy(work.join(f), mixed.join(f)).unwrap();
    }
    std::fs::write(
        mixed.join("key.pem"),
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let out = lanyard(
        &[
            "renew",
            "--credential",
            mixed.to_str().unwrap(),
            "--server",
            &serve.addr,
        ],
        &[],
    );
    assert_fails_with(&out, "renew with another key", "key.pem");

    // inspect, plain and JSON.
    let cert_path = work.join("cert.pem");
    let out = lanyard(&["inspect", cert_path.to_str().unwrap()], &[]);
    assert_ok(&out, "inspect");
    let text = stdout(&out);
    assert!(text.contains(&format!("spiffe_id:  {API}")), "{text}");
    assert!(text.contains("roles:      db-read,deploy"), "{text}");
    assert!(
        text.contains(&format!("serial:     {}", renewed.svid.serial)),
        "{text}"
    );
    assert!(
        text.contains("not_before:") && text.contains("not_after:") && text.contains("expires in:"),
        "{text}"
    );
    let out = lanyard(&["inspect", "--json", cert_path.to_str().unwrap()], &[]);
    assert_ok(&out, "inspect --json");
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&out)).expect("inspect --json prints JSON");
    assert_eq!(v["spiffe_id"], API);
    assert_eq!(v["roles"], serde_json::json!(["db-read", "deploy"]));
    assert_eq!(v["serial"], renewed.svid.serial.to_hex());
    assert_eq!(
        v["not_after"],
        lanyard::issuance::fmt_time(renewed.svid.not_after)
    );
    assert_eq!(
        v["not_before"],
        lanyard::issuance::fmt_time(renewed.svid.not_before)
    );

    // audit tail shows the story, including the refused reuse.
    let out = serve.admin_cmd(&["audit", "tail"]);
    assert_ok(&out, "audit tail");
    let tail = stdout(&out);
    for kind in [
        " server_started ",
        " token_created ",
        " issued ",
        " denied ",
        " renewed ",
    ] {
        assert!(tail.contains(kind), "audit tail lacks{kind}:\n{tail}");
    }
    assert!(
        tail.lines()
            .any(|l| l.contains(" denied ") && l.contains("already used")),
        "{tail}"
    );
    assert!(
        tail.contains(&format!("serial={}", renewed.svid.serial)),
        "{tail}"
    );

    // audit verify, finding server and credential through the environment.
    let admin = serve.admin().display().to_string();
    let out = lanyard(
        &["audit", "verify"],
        &[
            ("LANYARD_SERVER", &serve.addr),
            ("LANYARD_CREDENTIAL", &admin),
        ],
    );
    assert_ok(&out, "audit verify");
    assert!(stdout(&out).contains("chain intact"), "{}", stdout(&out));

    // bundle prints the CA.
    let out = serve.admin_cmd(&["bundle"]);
    assert_ok(&out, "bundle");
    assert_eq!(pem_certs(stdout(&out).as_bytes()), pem_certs(&ca_pem));

    // Key files are private.
    assert_eq!(mode(&fx.data().join("ca/ca.key")), 0o600);
    assert_eq!(mode(&serve.admin().join("key.pem")), 0o600);

    // A token holder can also trust an explicit bundle instead of the token's fingerprint.
    let token = serve.token(API, "db-read");
    let work2 = fx.path("work2");
    let ca_path = fx.data().join("ca/ca.pem");
    let out = lanyard(
        &[
            "issue",
            "--token",
            &token,
            "--out",
            work2.to_str().unwrap(),
            "--bundle",
            ca_path.to_str().unwrap(),
            "--server",
            &serve.addr,
        ],
        &[],
    );
    assert_ok(&out, "issue --bundle");
    assert_eq!(
        Credential::load(&work2, &RolesOid::default())
            .unwrap()
            .svid
            .roles,
        vec!["db-read"]
    );

    serve.stop();
}

#[test]
fn restart_reuses_the_ca_the_admin_credential_and_the_store() {
    let fx = Fixture::new();
    let serve = fx.serve("serve1.log");
    let ca_pem = std::fs::read(fx.data().join("ca/ca.pem")).unwrap();
    let ca_key = std::fs::read(fx.data().join("ca/ca.key")).unwrap();
    let admin_cert = std::fs::read(serve.admin().join("cert.pem")).unwrap();
    let admin_key = std::fs::read(serve.admin().join("key.pem")).unwrap();
    let admin = Credential::load(&serve.admin(), &RolesOid::default()).unwrap();
    assert_eq!(
        admin.svid.spiffe_id.as_str(),
        "spiffe://example.org/lanyard/admin"
    );
    assert_eq!(admin.svid.roles, vec!["lanyard:admin"]);
    // A two-use token, used once before the restart.
    let out = serve.admin_cmd(&[
        "token",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ns/prod/*",
        "--roles",
        "db-read",
        "--uses",
        "2",
    ]);
    assert_ok(&out, "token create --uses 2");
    let token = stdout(&out).trim().to_string();
    let issue = |serve: &Serve, name: &str| {
        let out = fx.path(name);
        lanyard(
            &[
                "issue",
                "--token",
                &token,
                "--spiffe-id",
                &format!("spiffe://example.org/ns/prod/{name}"),
                "--out",
                out.to_str().unwrap(),
                "--server",
                &serve.addr,
            ],
            &[],
        )
    };
    assert_ok(&issue(&serve, "a"), "issue a");
    serve.stop();

    let serve = fx.serve("serve2.log");
    assert_eq!(
        std::fs::read(fx.data().join("ca/ca.pem")).unwrap(),
        ca_pem,
        "restart made a new CA"
    );
    assert_eq!(std::fs::read(fx.data().join("ca/ca.key")).unwrap(), ca_key);
    assert_eq!(
        std::fs::read(serve.admin().join("cert.pem")).unwrap(),
        admin_cert,
        "restart replaced the admin credential"
    );
    assert_eq!(
        std::fs::read(serve.admin().join("key.pem")).unwrap(),
        admin_key
    );
    // The old admin credential still works, the token kept its count, and the log its chain.
    assert_ok(&issue(&serve, "b"), "issue b after restart");
    assert_fails_with(
        &issue(&serve, "c"),
        "third use of a two-use token",
        "already used",
    );
    // The workload credential issued before the restart renews against the restarted CA.
    let out = lanyard(
        &[
            "renew",
            "--credential",
            fx.path("a").to_str().unwrap(),
            "--server",
            &serve.addr,
        ],
        &[],
    );
    assert_ok(&out, "renew after restart");
    let out = serve.admin_cmd(&["audit", "verify"]);
    assert_ok(&out, "audit verify after restart");
    assert!(stdout(&out).contains("chain intact"), "{}", stdout(&out));
    let out = serve.admin_cmd(&["audit", "tail", "--kind", "server_started"]);
    assert_eq!(
        stdout(&out).lines().count(),
        2,
        "two starts recorded:\n{}",
        stdout(&out)
    );
    serve.stop();
}

#[test]
fn broken_config_keeps_the_old_policy_and_a_good_one_is_picked_up() {
    let fx = Fixture::new();
    let serve = fx.serve("serve.log");
    std::fs::write(
        fx.config(),
        "trust_domain = \"example.org\"\n[[policy]\nspiffe_id = = broken\n",
    )
    .unwrap();
    serve.wait_for_log("policy reload rejected; keeping the previous policy", 1);

    // The old policy still rules: both prod roles are grantable and issuance works.
    let token = serve.token(API, "db-read,deploy");
    let work = fx.path("work");
    let out = lanyard(
        &[
            "issue",
            "--token",
            &token,
            "--out",
            work.to_str().unwrap(),
            "--server",
            &serve.addr,
        ],
        &[],
    );
    assert_ok(&out, "issue under the kept policy");
    assert_eq!(
        Credential::load(&work, &RolesOid::default())
            .unwrap()
            .svid
            .roles,
        vec!["db-read", "deploy"]
    );

    // A policy that is valid TOML but invalid policy is rejected the same way.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(
        fx.config(),
        config_text("[[policy]]\nspiffe_id = \"spiffe://other.org/x\"\n"),
    )
    .unwrap();
    serve.wait_for_log("policy reload rejected; keeping the previous policy", 2);
    assert!(
        serve.log().contains("outside trust domain example.org"),
        "the log says why:\n{}",
        serve.log()
    );

    // A good file is picked up on change.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(fx.config(), config_text(&narrowed_policy())).unwrap();
    serve.wait_for_log("policy reloaded", 1);
    let out = serve.admin_cmd(&["token", "create", "--spiffe-id", API, "--roles", "deploy"]);
    assert_fails_with(
        &out,
        "token with a role policy no longer allows",
        "PermissionDenied",
    );
    assert!(
        stderr(&out).contains("role \"deploy\" is not allowed"),
        "{}",
        stderr(&out)
    );
    // And the renewal of the existing credential drops the role.
    let out = lanyard(
        &[
            "renew",
            "--credential",
            work.to_str().unwrap(),
            "--server",
            &serve.addr,
        ],
        &[],
    );
    assert_ok(&out, "renew after reload");
    assert_eq!(
        Credential::load(&work, &RolesOid::default())
            .unwrap()
            .svid
            .roles,
        vec!["db-read"]
    );

    let out = serve.admin_cmd(&["audit", "tail", "--kind", "policy_reloaded"]);
    let tail = stdout(&out);
    assert_eq!(
        tail.lines()
            .filter(|l| l.contains("rejected, previous policy kept"))
            .count(),
        2,
        "{tail}"
    );
    assert_eq!(tail.lines().count(), 3, "{tail}");
    serve.stop();
}

#[test]
fn sighup_reloads_the_policy() {
    let fx = Fixture::new();
    let serve = fx.serve("serve.log");
    // Replace the file without changing its mtime, so only the signal can trigger a reload.
    let old_mtime = std::fs::metadata(fx.config()).unwrap().modified().unwrap();
    let staged = fx.path("staged.toml");
    std::fs::write(&staged, config_text(&narrowed_policy())).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&staged)
        .unwrap()
        .set_modified(old_mtime)
        .unwrap();
    std::fs::rename(&staged, fx.config()).unwrap();
    assert_eq!(
        std::fs::metadata(fx.config()).unwrap().modified().unwrap(),
        old_mtime
    );

    // Two poll periods later, nothing has been reloaded: `deploy` is still grantable.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !serve.log().contains("policy reloaded"),
        "reloaded without a signal:\n{}",
        serve.log()
    );
    serve.token(API, "deploy");

    serve.signal("HUP");
    serve.wait_for_log("policy reloaded", 1);
    let out = serve.admin_cmd(&["token", "create", "--spiffe-id", API, "--roles", "deploy"]);
    assert_fails_with(
        &out,
        "token after SIGHUP reload",
        "role \"deploy\" is not allowed",
    );
    serve.token(API, "db-read");
    // The process survived the signal and still serves.
    let out = serve.admin_cmd(&["bundle"]);
    assert_ok(&out, "bundle after SIGHUP");
    serve.stop();
}

#[test]
fn invalid_config_exits_64_before_listening() {
    let fx = Fixture::new();
    std::fs::write(
        fx.config(),
        "trust_domain = \"example.org\"\nbogus_setting = 1\n",
    )
    .unwrap();
    let out = lanyard(
        &[
            "serve",
            "--config",
            fx.config().to_str().unwrap(),
            "--data-dir",
            fx.data().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("bogus_setting"),
        "the error names the bad field: {}",
        stderr(&out)
    );
    assert!(!fx.data().join("serve.addr").exists());
}
