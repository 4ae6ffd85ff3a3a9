//! Issue 5, the sidecar agent as a real process (`lanyard agent`) against a real CA on loopback:
//! rotation at about half-life with the on-rotate hook, riding out a CA outage past the
//! certificate's expiry (within the renewal grace), exiting with status 3 when revoked, and the
//! credential directory never showing a torn or mismatched file to concurrent readers.
//! Every agent process is stopped by a guard, even when an assertion fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    POLICY, TestCa, dir_svid, free_port, lanyard_cmd, pem_leaf_svid, poll_until, spawn_agent,
    wait_for_svid,
};
use lanyard::agent::read_consistent;
use lanyard::ca::{RolesOid, SvidInfo};
use lanyard::tls::{Bundle, check_key_matches, unix_now, unix_time, verify_svid};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const API: &str = "spiffe://example.org/ns/prod/api";

/// Milliseconds since the epoch, for comparing observations with notAfter.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Parses a PEM chain, leaf first.
fn chain_of(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .expect("chain PEM parses")
}

/// The first PEM block of `pem` whose label ends with "PRIVATE KEY", as text.
fn key_block(pem: &str) -> Option<&str> {
    let start = pem.find("-----BEGIN ")?;
    let end_marker = pem[start..].find("-----END ")? + start;
    let end = pem[end_marker..].find('\n')? + end_marker + 1;
    let block = &pem[start..end];
    block
        .lines()
        .next()
        .is_some_and(|l| l.ends_with("PRIVATE KEY-----"))
        .then_some(block)
}

/// `lanyard revoke ...` as the CA's local admin; panics unless it succeeds.
async fn revoke_cli(ca: &TestCa, target: &[&str], reason: &str) {
    let mut cmd = lanyard_cmd();
    cmd.arg("revoke")
        .args(target)
        .args(["--reason", reason, "--server", &ca.server(), "--credential"])
        .arg(ca.admin_dir());
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .expect("run lanyard revoke");
    assert!(
        out.status.success(),
        "lanyard revoke failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// === rotation ===

/// One generation of the credential as the test saw it appear.
struct Seen {
    svid: SvidInfo,
    at_ms: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_rotates_at_half_life_writes_valid_files_and_runs_the_hook() {
    let ca = TestCa::start().await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("svid");
    let hook_log = work.path().join("rotations.log");
    let token = ca.token(API, &["db-read"], 600, 1).await;
    let hook = format!(
        "echo \"$LANYARD_SPIFFE_ID $LANYARD_SERIAL\" >> '{}'",
        hook_log.display()
    );
    let mut agent = spawn_agent(
        &ca.server(),
        &token,
        &out,
        // 6 s: long enough that a renewal finishes well before expiry on a loaded 2-core CI
        // machine running the other agent tests at the same time.
        &["--ttl", "6s", "--on-rotate", &hook],
    );
    wait_for_svid(&out, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no certificate written:\n{}", agent.output()));

    let bundle = Bundle::from_pem(&std::fs::read(out.join("bundle.pem")).unwrap()).unwrap();
    let oid = RolesOid::default();
    let mut seen: Vec<Seen> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        assert!(agent.is_running(), "agent exited:\n{}", agent.output());
        let (cert, key) = read_consistent(&out).expect("credential readable");
        let chain = chain_of(&cert);
        let svid = pem_leaf_svid(&cert).expect("leaf is an SVID");
        if seen.last().map(|s| &s.svid.serial) != Some(&svid.serial) {
            assert!(
                seen.iter().all(|s| s.svid.serial != svid.serial),
                "serial {} came back after a newer one",
                svid.serial
            );
            check_key_matches(&chain[0], &key).expect("key.pem is the key of cert.pem");
            for usage in [
                webpki::KeyUsage::client_auth(),
                webpki::KeyUsage::server_auth(),
            ] {
                let v = verify_svid(&chain, &bundle, unix_time(unix_now()), usage, &oid)
                    .expect("new certificate verifies against bundle.pem");
                assert_eq!(v.spiffe_id.as_str(), API);
            }
            assert_eq!(svid.roles, vec!["db-read"]);
            assert_eq!(
                svid.not_after - svid.not_before,
                6 + lanyard::issuance::BACKDATE_SECS,
                "the CA honoured --ttl 6s"
            );
            assert_eq!(mode(&out.join("key.pem")), 0o600, "key.pem is 0600");
            assert_eq!(mode(&out.join("svid.pem")), 0o600, "svid.pem is 0600");
            for f in ["cert.pem", "key.pem", "bundle.pem", "svid.pem"] {
                assert_eq!(
                    std::fs::read_link(out.join(f)).unwrap(),
                    Path::new("..data").join(f),
                    "{f} is a symlink through ..data"
                );
            }
            seen.push(Seen {
                svid,
                at_ms: now_ms(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let serials: Vec<String> = seen.iter().map(|s| s.svid.serial.to_hex()).collect();
    assert!(
        seen.len() >= 3,
        "expected at least 3 certificates in 12 s with --ttl 6s, saw {serials:?}\n{}",
        agent.output()
    );
    for pair in seen.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        let gap = new.at_ms - old.at_ms;
        assert!(
            new.at_ms < old.svid.not_after * 1000,
            "certificate {} replaced only after it expired",
            old.svid.serial
        );
        // Half of 6 s, ±10 % jitter, plus whole-second rounding and 50 ms polling.
        assert!(
            (1000..=4500).contains(&gap),
            "rotation after {gap} ms is not about half of a 6 s lifetime"
        );
    }

    // The hook ran once per certificate, in order, with the right environment. It runs right
    // after the files are published, so give the last one a moment.
    let hook_lines = poll_until(Duration::from_secs(3), Duration::from_millis(50), || {
        let text = std::fs::read_to_string(&hook_log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= seen.len()).then_some(lines)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "on-rotate did not run for every rotation: {:?}",
            std::fs::read_to_string(&hook_log)
        )
    });
    let hook_serials: Vec<String> = hook_lines
        .iter()
        .map(|l| {
            let (id, serial) = l.split_once(' ').expect("\"<id> <serial>\"");
            assert_eq!(id, API, "LANYARD_SPIFFE_ID");
            serial.to_string()
        })
        .collect();
    assert_eq!(
        &hook_serials[..serials.len()],
        &serials[..],
        "LANYARD_SERIAL of each hook run, in order"
    );
    assert_eq!(
        hook_serials.iter().collect::<HashSet<_>>().len(),
        hook_serials.len(),
        "the hook ran once per certificate"
    );
}

// === CA outage ===

/// A `lanyard serve` process on a fixed loopback port over a data dir that outlives it.
struct ServeProc {
    guard: common::ChildGuard,
    addr: String,
}

impl ServeProc {
    /// Starts the CA and waits until it has written `<data>/serve.addr`.
    async fn start(config: &Path, data: &Path, port: u16, log: &Path) -> Self {
        let addr_file = data.join("serve.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = lanyard_cmd();
        cmd.args(["serve", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        let mut guard = common::ChildGuard::spawn("lanyard serve", &mut cmd, log);
        let addr = poll_until(Duration::from_secs(30), Duration::from_millis(25), || {
            std::fs::read_to_string(&addr_file)
                .ok()
                .filter(|a| !a.trim().is_empty())
        })
        .await;
        assert!(guard.is_running(), "CA exited:\n{}", guard.output());
        let addr = addr.unwrap_or_else(|| panic!("CA did not start:\n{}", guard.output()));
        Self {
            guard,
            addr: addr.trim().to_string(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_survives_a_ca_outage_past_expiry_and_renews_within_grace() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("lanyard.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\nmin_ttl = \"1s\"\nrenewal_grace = \"60s\"\n{POLICY}"
        ),
    )
    .unwrap();
    let data = work.path().join("data");
    let ca_log = work.path().join("ca.log");
    // A fixed port, so the restarted CA is where the agent expects it.
    let port = free_port();
    let mut ca = ServeProc::start(&config, &data, port, &ca_log).await;
    assert_eq!(ca.addr, format!("127.0.0.1:{port}"));

    let mut cmd = lanyard_cmd();
    cmd.args(["token", "create", "--spiffe-id", API, "--server", &ca.addr])
        .arg("--credential")
        .arg(data.join("admin"));
    let minted = tokio::process::Command::from(cmd).output().await.unwrap();
    assert!(minted.status.success(), "token create: {minted:?}");
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_string();

    let out = work.path().join("svid");
    let mut agent = spawn_agent(
        &ca.addr,
        &token,
        &out,
        &["--ttl", "4s", "--max-backoff", "1s"],
    );
    let first = wait_for_svid(&out, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no certificate written:\n{}", agent.output()));

    // The CA crashes (SIGKILL: no goodbye to the agent's open connections).
    ca.guard.signal_group("KILL");
    ca.guard
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("CA killed");
    let down_at = Instant::now();

    // Down until the last certificate the agent holds has been expired for a while.
    let last = dir_svid(&out).unwrap();
    while unix_now() <= last.not_after + 1 {
        assert!(
            agent.is_running(),
            "agent exited while the CA was down:\n{}",
            agent.output()
        );
        let now = dir_svid(&out).expect("credential stays on disk");
        assert_eq!(now.serial, last.serial, "nothing new can appear while down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(agent.is_running(), "agent exited:\n{}", agent.output());
    let (cert, key) = read_consistent(&out).unwrap();
    assert_eq!(pem_leaf_svid(&cert).unwrap().serial, last.serial);
    check_key_matches(&chain_of(&cert)[0], &key).expect("the kept cert and key still match");
    assert!(
        last.not_after < unix_now(),
        "the kept certificate has expired"
    );
    let log = agent.output();
    assert!(
        log.contains("certificate renewal failing"),
        "no loud renewal failure in the agent log:\n{log}"
    );

    // Same port, same data dir, same CA key.
    let ca = ServeProc::start(&config, &data, port, &ca_log).await;
    let restarted = Instant::now();
    let renewed = poll_until(Duration::from_secs(8), Duration::from_millis(50), || {
        dir_svid(&out).filter(|s| s.serial != last.serial)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "agent did not renew after the CA came back:\nagent:\n{}\nCA:\n{}",
            agent.output(),
            ca.guard.output()
        )
    });
    eprintln!(
        "CA down {:.1} s (certificate expired {} s before the restart); renewed {:.1} s after restart",
        (restarted - down_at).as_secs_f64(),
        unix_now() - last.not_after,
        restarted.elapsed().as_secs_f64()
    );
    assert_eq!(renewed.spiffe_id.as_str(), API);
    assert!(
        renewed.not_after > unix_now(),
        "the new certificate is valid"
    );
    assert_ne!(renewed.serial, first.serial);
    assert!(agent.is_running(), "agent exited:\n{}", agent.output());
    let (cert, key) = read_consistent(&out).unwrap();
    check_key_matches(&chain_of(&cert)[0], &key).unwrap();
    let recovered = poll_until(Duration::from_secs(2), Duration::from_millis(50), || {
        agent.output().contains("CA reachable again").then_some(())
    })
    .await;
    assert!(
        recovered.is_some(),
        "no recovery message:\n{}",
        agent.output()
    );
}

/// Reads a process's environment from `/proc`: what it runs with now, after any exec.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn environ_of(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|v| v.starts_with(b"MALLOC_"))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// Decision 123: an agent re-executes itself (same pid) with glibc's classic malloc thresholds
/// fixed, then gets its certificate as usual; an operator's own setting of either is kept as it
/// is.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_runs_with_glibc_malloc_thresholds_fixed_unless_the_operator_set_them() {
    let ca = TestCa::start().await;
    let work = tempfile::tempdir().unwrap();
    for (own, want) in [
        (
            None,
            vec![
                "MALLOC_MMAP_THRESHOLD_=131072".to_string(),
                "MALLOC_TRIM_THRESHOLD_=131072".to_string(),
            ],
        ),
        (
            Some("262144"),
            vec!["MALLOC_TRIM_THRESHOLD_=262144".to_string()],
        ),
    ] {
        let out = work.path().join(format!("svid-{}", want.len()));
        let token = ca.token(API, &[], 600, 1).await;
        let mut cmd = lanyard_cmd();
        cmd.env_remove("MALLOC_MMAP_THRESHOLD_")
            .env_remove("MALLOC_TRIM_THRESHOLD_");
        if let Some(v) = own {
            cmd.env("MALLOC_TRIM_THRESHOLD_", v);
        }
        cmd.args([
            "agent",
            "--server",
            &ca.server(),
            "--token",
            &token,
            "--out",
        ])
        .arg(&out);
        let mut agent =
            common::ChildGuard::spawn("lanyard agent", &mut cmd, &out.with_extension("log"));
        wait_for_svid(&out, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("no certificate written:\n{}", agent.output()));
        assert!(agent.is_running(), "agent exited:\n{}", agent.output());
        let mut env = environ_of(agent.pid());
        env.sort();
        assert_eq!(env, want, "operator's own value: {own:?}");
        assert!(
            !agent.output().contains("could not re-execute"),
            "{}",
            agent.output()
        );
    }
}

// === revocation ===

/// Starts an agent, revokes it with `lanyard revoke <target>`, and checks it exits 3 within 2 s
/// saying why; then checks that a restart over the same directory refuses to run too.
async fn revoked_agent_exits(by_serial: bool) {
    let ca = TestCa::start().await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("svid");
    let token = ca.token(API, &[], 600, 1).await;
    let mut agent = spawn_agent(&ca.server(), &token, &out, &["--ttl", "30s"]);
    let svid = wait_for_svid(&out, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no certificate written:\n{}", agent.output()));
    // Let the agent's revocation watch connect (it starts right after the first publish).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        agent.is_running(),
        "agent exited early:\n{}",
        agent.output()
    );

    let serial = svid.serial.to_hex();
    let target: Vec<&str> = if by_serial {
        vec!["--serial", &serial]
    } else {
        vec!["--spiffe-id", API]
    };
    revoke_cli(&ca, &target, "test: key leaked").await;
    let revoked_at = Instant::now();
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("agent still running 5 s after revoke:\n{}", agent.output()));
    let took = revoked_at.elapsed();
    eprintln!("agent exited {took:?} after the revoke call returned");
    assert_eq!(status.code(), Some(3), "exit status:\n{}", agent.output());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let log = agent.output();
    assert!(
        log.contains("error: revoked:") && log.contains("test: key leaked"),
        "stderr must say it was revoked and why:\n{log}"
    );

    // A restart over the same directory (no token left) must not serve the revoked cert.
    let log_path = work.path().join("restart.log");
    let mut cmd = lanyard_cmd();
    cmd.args(["agent", "--server", &ca.server(), "--out"])
        .arg(&out);
    let mut again = common::ChildGuard::spawn("lanyard agent (restart)", &mut cmd, &log_path);
    let restarted = Instant::now();
    let status = again
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("restarted agent kept running:\n{}", again.output()));
    eprintln!("restarted agent exited after {:?}", restarted.elapsed());
    assert_eq!(status.code(), Some(3), "restart:\n{}", again.output());
    assert!(
        restarted.elapsed() < Duration::from_secs(3),
        "a restarted agent learns it is revoked at once, not at its next renewal"
    );
    assert!(
        again.output().contains("error: revoked:"),
        "{}",
        again.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_exits_3_within_two_seconds_when_its_identity_is_revoked() {
    revoked_agent_exits(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_exits_3_within_two_seconds_when_its_serial_is_revoked() {
    revoked_agent_exits(true).await;
}

// === atomic replacement ===

/// What one reader thread saw.
#[derive(Default)]
struct ReadStats {
    reads: u64,
    failures: Vec<String>,
    serials: HashSet<String>,
}

impl ReadStats {
    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        } else {
            self.failures[19] = format!("(more) {what}");
        }
    }
}

/// Reads `svid.pem`: key and chain in one file, the key must be the leaf's.
fn read_svid_pem(dir: &Path, stats: &mut ReadStats) {
    let bytes = match std::fs::read(dir.join("svid.pem")) {
        Ok(b) => b,
        Err(e) => return stats.fail(format!("svid.pem: {e}")),
    };
    let text = String::from_utf8_lossy(&bytes);
    let Some(key) = key_block(&text) else {
        return stats.fail("svid.pem does not start with a complete private key".into());
    };
    let chain: Vec<CertificateDer<'static>> =
        match CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>() {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => return stats.fail("svid.pem has no certificate".into()),
            Err(e) => return stats.fail(format!("svid.pem: {e}")),
        };
    if let Err(e) = check_key_matches(&chain[0], key.as_bytes()) {
        return stats.fail(format!("svid.pem: {e}"));
    }
    match pem_leaf_svid(&bytes) {
        Some(s) => {
            stats.serials.insert(s.serial.to_hex());
        }
        None => stats.fail("svid.pem leaf is not an SVID".into()),
    }
}

/// Reads `cert.pem` and `key.pem` as separate files: each must be complete PEM. (Two separate
/// opens may straddle a rotation, so they are not required to match; `read_consistent` is.)
fn read_separate_files(dir: &Path, stats: &mut ReadStats) {
    match std::fs::read(dir.join("cert.pem")) {
        Ok(b) => {
            let complete = b.ends_with(b"-----END CERTIFICATE-----\n");
            match CertificateDer::pem_slice_iter(&b).collect::<Result<Vec<_>, _>>() {
                Ok(c) if !c.is_empty() && complete => {}
                _ => stats.fail(format!("cert.pem incomplete ({} bytes)", b.len())),
            }
        }
        Err(e) => stats.fail(format!("cert.pem: {e}")),
    }
    match std::fs::read(dir.join("key.pem")) {
        Ok(b) => {
            if PrivateKeyDer::from_pem_slice(&b).is_err() {
                stats.fail(format!("key.pem incomplete ({} bytes)", b.len()));
            }
        }
        Err(e) => stats.fail(format!("key.pem: {e}")),
    }
}

/// `read_consistent`: always a matching pair.
fn read_pair(dir: &Path, stats: &mut ReadStats) {
    match read_consistent(dir) {
        Ok((cert, key)) => {
            let chain = match CertificateDer::pem_slice_iter(&cert).collect::<Result<Vec<_>, _>>() {
                Ok(c) if !c.is_empty() => c,
                _ => return stats.fail("read_consistent: cert does not parse".into()),
            };
            if let Err(e) = check_key_matches(&chain[0], &key) {
                stats.fail(format!("read_consistent: {e}"));
            }
        }
        Err(e) => stats.fail(format!("read_consistent: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_never_see_a_torn_or_mismatched_credential() {
    let ca = TestCa::start().await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("svid");
    let token = ca.token(API, &["db-read"], 600, 1).await;
    let mut agent = spawn_agent(&ca.server(), &token, &out, &["--ttl", "4s"]);
    wait_for_svid(&out, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no certificate written:\n{}", agent.output()));

    let stop = Arc::new(AtomicBool::new(false));
    type Reader = fn(&Path, &mut ReadStats);
    let readers: [(&str, Reader); 5] = [
        ("svid.pem #1", read_svid_pem),
        ("svid.pem #2", read_svid_pem),
        ("cert.pem+key.pem #1", read_separate_files),
        ("cert.pem+key.pem #2", read_separate_files),
        ("read_consistent", read_pair),
    ];
    let handles: Vec<_> = readers
        .into_iter()
        .map(|(name, read)| {
            let dir: PathBuf = out.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut stats = ReadStats::default();
                while !stop.load(Ordering::Relaxed) {
                    read(&dir, &mut stats);
                    stats.reads += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                (name, stats)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let results = tokio::task::spawn_blocking(move || {
        handles
            .into_iter()
            .map(|h| h.join().expect("reader thread"))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(agent.is_running(), "agent exited:\n{}", agent.output());

    let mut total = 0;
    let mut serials = HashSet::new();
    for (name, stats) in &results {
        eprintln!(
            "{name}: {} reads, {} failures",
            stats.reads,
            stats.failures.len()
        );
        total += stats.reads;
        serials.extend(stats.serials.iter().cloned());
        assert!(
            stats.failures.is_empty(),
            "{name} saw a bad credential: {:#?}",
            stats.failures
        );
        assert!(stats.reads > 200, "{name} read only {} times", stats.reads);
    }
    assert!(total > 1000, "only {total} reads");
    assert!(
        serials.len() >= 3,
        "the readers must have run across at least two rotations; saw {serials:?}"
    );
}

// === CA shutdown with agents connected ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ca_exits_on_sigterm_while_an_agent_is_watching() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("lanyard.toml");
    std::fs::write(
        &config,
        format!("trust_domain = \"example.org\"\nmin_ttl = \"1s\"\n{POLICY}"),
    )
    .unwrap();
    let data = work.path().join("data");
    let mut ca = ServeProc::start(&config, &data, free_port(), &work.path().join("ca.log")).await;
    let mut cmd = lanyard_cmd();
    cmd.args(["token", "create", "--spiffe-id", API, "--server", &ca.addr])
        .arg("--credential")
        .arg(data.join("admin"));
    let minted = tokio::process::Command::from(cmd).output().await.unwrap();
    assert!(minted.status.success(), "token create: {minted:?}");
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_string();
    let out = work.path().join("svid");
    let mut agent = spawn_agent(&ca.addr, &token, &out, &["--ttl", "60s"]);
    wait_for_svid(&out, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no certificate written:\n{}", agent.output()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    ca.guard.signal_group("TERM");
    let status = ca.guard.wait_exit(Duration::from_secs(5)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the CA did not exit cleanly within 5 s of SIGTERM ({status:?}):\n{}",
        ca.guard.output()
    );
    assert!(agent.is_running(), "the agent outlives the CA");
}

/// `--cache-dir` is checked at start: a path where no file can be made is refused with the flag
/// named; a directory that does not exist yet is made, leaving nothing in it.
#[test]
fn cache_dir_is_made_at_start_and_a_path_that_cannot_hold_files_is_refused() {
    let work = tempfile::tempdir().unwrap();
    // The token is checked after the flags (it is malformed, so the agent then stops, without
    // calling any CA).
    let agent = |cache: &Path| {
        lanyard_cmd()
            .args(["agent", "--server", "127.0.0.1:1", "--token", "lanyard1.x"])
            .arg("--out")
            .arg(work.path().join("out"))
            .arg("--cache-dir")
            .arg(cache)
            .output()
            .unwrap()
    };
    let not_a_dir = work.path().join("plain-file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let out = agent(&not_a_dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "accepted a file as --cache-dir: {err}"
    );
    assert!(
        err.contains("--cache-dir") && err.contains("plain-file") && !err.contains("token"),
        "refused for the cache directory, before the token: {err}"
    );

    let fresh = work.path().join("cache/agent");
    let out = agent(&fresh);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("join token is malformed") && !err.contains("--cache-dir"),
        "past the cache directory's check: {err}"
    );
    assert!(fresh.is_dir(), "--cache-dir not made");
    assert_eq!(
        std::fs::read_dir(&fresh).unwrap().count(),
        0,
        "the probe file has no name"
    );
}
