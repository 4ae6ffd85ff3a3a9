//! Hostile conditions for `lanyard agent` (issue #11 items 11 and 12): stop signals in every
//! phase, including while the CA is unreachable, and re-enrolling with a new join token over a
//! credential that is revoked or expired beyond the renewal grace.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lanyard::pb::v1::{self as pb, revocation_client::RevocationClient};

use crate::common::{
    ChildGuard, POLICY, TestCa, dir_svid, free_port, lanyard_cmd, pem_leaf_svid, poll_until,
    spawn_agent, wait_for_svid,
};

/// Waits up to `timeout` for the child's log to contain `needle`.
async fn wait_log(child: &ChildGuard, needle: &str, timeout: Duration) {
    let seen = poll_until(timeout, Duration::from_millis(25), || {
        child.output().contains(needle).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "{} never logged {needle:?}:\n{}",
        child.name,
        child.output()
    );
}

/// Sends `signal` and asserts the agent exits cleanly (status 0) within 2 s.
async fn assert_stops_on(child: &mut ChildGuard, signal: &str, phase: &str) {
    let sent = Instant::now();
    child.signal_group(signal);
    let status = child.wait_exit(Duration::from_secs(2)).await;
    let took = sent.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!(
            "SIG{signal} {phase}: the agent was still running after 2 s:\n{}",
            child.output()
        )
    });
    assert!(
        status.success(),
        "SIG{signal} {phase}: exit {status}, want 0:\n{}",
        child.output()
    );
    assert!(
        child.output().contains("agent stopping"),
        "{}",
        child.output()
    );
    eprintln!("SIG{signal} {phase}: stopped after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_stops_at_once_on_sigterm_or_sigint_while_the_ca_is_unreachable_at_bootstrap() {
    let ca = TestCa::start().await;
    let token = ca
        .token("spiffe://example.org/ns/prod/stop", &[], 600, 2)
        .await;
    // Nothing listens there: every bootstrap attempt fails at once and the agent backs off.
    let closed = format!("127.0.0.1:{}", free_port());
    for signal in ["TERM", "INT"] {
        let out = ca.dir.path().join(format!("boot-{signal}"));
        let sock = ca.dir.path().join(format!("boot-{signal}.sock"));
        let mut agent = spawn_agent(
            &closed,
            &token,
            &out,
            &["--workload-socket", sock.to_str().unwrap()],
        );
        wait_log(
            &agent,
            "CA unreachable during bootstrap",
            Duration::from_secs(10),
        )
        .await;
        assert_stops_on(
            &mut agent,
            signal,
            "while bootstrapping against a closed port",
        )
        .await;
        assert!(dir_svid(&out).is_none());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_stops_at_once_while_serving_and_while_renewal_backs_off() {
    let ca = TestCa::start().await;
    let id = "spiffe://example.org/ns/prod/serving";
    // Serving normally: certificate written, Workload API up.
    let out = ca.dir.path().join("serving");
    let sock = ca.dir.path().join("serving.sock");
    let token = ca.token(id, &[], 600, 2).await;
    let mut agent = spawn_agent(
        &ca.server(),
        &token,
        &out,
        &["--workload-socket", sock.to_str().unwrap()],
    );
    wait_for_svid(&out, Duration::from_secs(10))
        .await
        .expect("the agent gets a certificate");
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(25), || sock
            .exists()
            .then_some(()))
        .await
        .is_some()
    );
    assert_stops_on(&mut agent, "TERM", "while serving").await;

    // Renewal failing against a stopped CA, backing off.
    let out = ca.dir.path().join("backoff");
    let mut agent = spawn_agent(&ca.server(), &token, &out, &["--ttl", "3s"]);
    wait_for_svid(&out, Duration::from_secs(10))
        .await
        .expect("the agent gets a certificate");
    let (_dir, _config) = ca.stop().await;
    wait_log(
        &agent,
        // "failed; retrying with backoff", or "failing" once the certificate is nearly expired.
        "certificate renewal fail",
        Duration::from_secs(10),
    )
    .await;
    assert_stops_on(&mut agent, "INT", "while renewal backs off").await;
}

/// Revokes (or, with `lift`, lifts the revocation of) every certificate of `id`.
async fn revoke_identity(ca: &TestCa, id: &str, lift: bool) {
    RevocationClient::new(ca.admin_channel().await)
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::SpiffeId(id.into())),
            reason: "host rebuilt".into(),
            lift,
        })
        .await
        .expect("revoke");
}

/// The one directory under `out/retired/`, once there is one.
fn retired_generation(out: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out.join("retired"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    (dirs.len() == 1).then(|| dirs.remove(0))
}

/// The old credential is kept whole under `retired/<time>/`, key still 0600.
fn assert_retired(out: &Path, serial: &lanyard::ca::Serial) -> PathBuf {
    let kept = retired_generation(out).expect("one retired credential");
    let cert = std::fs::read(kept.join("cert.pem")).expect("retired cert.pem");
    assert_eq!(&pem_leaf_svid(&cert).unwrap().serial, serial);
    let mode = std::fs::metadata(kept.join("key.pem"))
        .expect("retired key.pem")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(kept.join("bundle.pem").exists());
    let mode = std::fs::metadata(out.join("retired"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "retired/ is private");
    kept
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_token_re_enrolls_over_a_revoked_credential_after_the_revocation_is_lifted() {
    let ca = TestCa::start().await;
    let id = "spiffe://example.org/ns/prod/rebuilt";
    let out = ca.dir.path().join("rebuilt");
    let first = ca.token(id, &[], 600, 1).await;
    let mut agent = spawn_agent(&ca.server(), &first, &out, &[]);
    let old = wait_for_svid(&out, Duration::from_secs(10))
        .await
        .expect("first certificate");
    revoke_identity(&ca, id, false).await;
    let status = agent.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{}", agent.output());

    // Without --token: as before, exit 3, with a message saying what to do; nothing moved.
    let mut cmd = lanyard_cmd();
    cmd.args(["agent", "--server", &ca.server(), "--out"])
        .arg(&out);
    let log = ca.dir.path().join("no-token.log");
    let mut bare = ChildGuard::spawn("lanyard agent (no token)", &mut cmd, &log);
    let status = bare.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{}", bare.output());
    assert!(bare.output().contains("--token"), "{}", bare.output());
    assert!(!out.join("retired").exists());
    assert_eq!(dir_svid(&out).unwrap().serial, old.serial);

    // A token that cannot work does not cost the old credential.
    let mut bad = spawn_agent(&ca.server(), "not-a-token", &out, &[]);
    let status = bad.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{}", bad.output());
    assert!(!out.join("retired").exists(), "{}", bad.output());
    assert_eq!(dir_svid(&out).unwrap().serial, old.serial);

    // Lifted, and a new token: the agent sets the revoked credential aside and enrolls.
    revoke_identity(&ca, id, true).await;
    let second = ca.token(id, &[], 600, 1).await;
    let mut agent = spawn_agent(&ca.server(), &second, &out, &[]);
    let new = poll_until(Duration::from_secs(10), Duration::from_millis(25), || {
        dir_svid(&out).filter(|s| s.serial != old.serial)
    })
    .await
    .unwrap_or_else(|| panic!("no fresh certificate:\n{}", agent.output()));
    assert_eq!(new.spiffe_id.as_str(), id);
    let kept = assert_retired(&out, &old.serial);
    let log = agent.output();
    assert!(
        log.contains("existing credential set aside; enrolling with the join token")
            && log.contains(&kept.display().to_string())
            && log.contains("revoked"),
        "{log}"
    );
    assert!(agent.is_running(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_token_re_enrolls_over_a_credential_expired_beyond_the_renewal_grace() {
    let ca = TestCa::start_with("renewal_grace = \"1s\"", POLICY).await;
    let id = "spiffe://example.org/ns/prod/sleeper";
    let out = ca.dir.path().join("sleeper");
    let first = ca.token(id, &[], 600, 1).await;
    let mut agent = spawn_agent(&ca.server(), &first, &out, &["--ttl", "2s"]);
    wait_for_svid(&out, Duration::from_secs(10))
        .await
        .expect("first certificate");
    agent.signal_group("TERM");
    agent.wait_exit(Duration::from_secs(5)).await;
    let old = dir_svid(&out).unwrap();
    // Past notAfter + grace (whole seconds) with a second to spare.
    let wait = old.not_after + 1 + 1 - lanyard::tls::unix_now();
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64 + 1)).await;

    let second = ca.token(id, &[], 600, 1).await;
    let agent = spawn_agent(&ca.server(), &second, &out, &["--ttl", "60s"]);
    let new = poll_until(Duration::from_secs(10), Duration::from_millis(25), || {
        dir_svid(&out).filter(|s| s.serial != old.serial)
    })
    .await
    .unwrap_or_else(|| panic!("no fresh certificate:\n{}", agent.output()));
    assert!(new.not_after > lanyard::tls::unix_now() + 30);
    let kept = assert_retired(&out, &old.serial);
    let log = agent.output();
    assert!(
        log.contains("existing credential set aside; enrolling with the join token")
            && log.contains(&kept.display().to_string())
            && log.contains("renewal grace"),
        "{log}"
    );
}
