//! Hostile conditions for `lanyard agent` (issue #11 items 11 and 12): stop signals in every
//! phase, including while the CA is unreachable, and re-enrolling with a new join token over a
//! credential that is revoked or expired beyond the renewal grace.

use std::time::{Duration, Instant};

use crate::common::{
    ChildGuard, TestCa, dir_svid, free_port, poll_until, spawn_agent, wait_for_svid,
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
