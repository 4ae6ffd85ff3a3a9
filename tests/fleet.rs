//! The CA's side of a fleet: agents hold one connection each, kept across rotations and within
//! the connection caps; a renewed certificate takes over the connection it was issued over (and
//! only that one), so rotations need no new handshake, past the first certificate's expiry;
//! revoking the certificate a connection speaks for cuts its agent off; agents given several CA
//! addresses move to a live CA when theirs dies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TestCa, lanyard_cmd, poll_until, spawn_agent, wait_for_svid};
use lanyard::agent::{Agent, AgentConfig, AgentError, SvidState};
use lanyard::api::auth::CONNECTION_BOUND;
use lanyard::ca::SvidInfo;
use lanyard::client::csr_for;
use lanyard::pb::v1::{self as pb, ca_client::CaClient, revocation_client::RevocationClient};
use tonic::transport::Channel;

/// The client ports of established connections to local port `port` (the CA's side of each
/// client connection): a connection kept is the same port, a new one another.
fn peers_of(port: u16) -> std::collections::BTreeSet<u16> {
    let hex_port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|t| {
            let text = std::fs::read_to_string(t).unwrap_or_default();
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    (hex_port(f.get(1)?) == Some(port) && *f.get(3)? == "01")
                        .then(|| hex_port(f.get(2)?))
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn connections_to(port: u16) -> usize {
    peers_of(port).len()
}

fn agent_config(ca: &TestCa, token: &str, name: &str, ttl: u64) -> AgentConfig {
    AgentConfig {
        token: Some(token.to_string()),
        spiffe_id: Some(format!("spiffe://example.org/ns/dev/{name}")),
        ttl: Some(Duration::from_secs(ttl)),
        ..AgentConfig::new(ca.server())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_agents_from_one_address_stay_connected_with_the_default_caps() {
    // Default connection caps; an idle timeout far below the default, which the agents' watch
    // streams (requests in flight) must still not trip.
    let ca = TestCa::start_with("idle_timeout = \"1s\"", common::POLICY).await;
    let port = ca.addr.port();
    let n: usize = 1000;
    let token = ca
        .token("spiffe://example.org/ns/dev/*", &[], 0, n as u32)
        .await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut states = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let agent = Agent::new(agent_config(&ca, &token, &format!("a{i}"), 300));
        states.push(agent.subscribe());
        let stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move { agent.run(stop).await }));
        if i % 100 == 99 {
            // Enrol in waves, so join-token connections never pile up beside the kept ones.
            for s in &mut states[i - 99..=i] {
                tokio::time::timeout(Duration::from_secs(30), s.wait_for(|s| s.is_some()))
                    .await
                    .expect("agent got a certificate in time")
                    .unwrap();
            }
        }
    }
    // Every agent's link is open once its watches run: one connection each (plus the admin
    // channel the token came over).
    let settled = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let c = connections_to(port);
        (c >= n).then_some(c)
    })
    .await;
    assert!(
        settled.is_some(),
        "only {} connections for {n} agents",
        connections_to(port)
    );
    // Several idle timeouts later, nobody was cut off and nobody opened a second connection.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = connections_to(port);
    assert!(
        (n..=n + 1).contains(&c),
        "{c} connections for {n} agents after idling"
    );
    assert!(tasks.iter().all(|t| !t.is_finished()), "an agent stopped");
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// A CA, its port, an admin channel (then its one open connection: the token's own channel
/// has closed), and a join token for `ns/dev/*`.
/// Runs `agent` in a task until its first certificate: its state feed, the sender that keeps
/// it running (stops it when dropped), its task and that first state.
async fn start(
    agent: Agent,
) -> (
    lanyard::agent::SvidWatch,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), AgentError>>,
    std::sync::Arc<SvidState>,
) {
    let mut state = agent.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(agent.run(stop_rx));
    let first = state
        .wait_for(|s| s.is_some())
        .await
        .unwrap()
        .clone()
        .unwrap();
    (state, stop_tx, run, first)
}

async fn ca_with_admin_connection() -> (TestCa, u16, tonic::transport::Channel, String) {
    let ca = TestCa::start().await;
    let port = ca.addr.port();
    let admin = ca.admin_channel().await;
    let token = ca.token("spiffe://example.org/ns/dev/*", &[], 0, 1).await;
    poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        (connections_to(port) == 1).then_some(())
    })
    .await
    .expect("one admin connection");
    (ca, port, admin, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_keep_the_connection_past_the_first_certificate_and_revocation_cuts_it_off() {
    let (ca, port, admin, token) = ca_with_admin_connection().await;
    let base = 1;
    // 6 s certificates, renewed every ~3 s: within 15 s the first one (the one the connection
    // was opened with) has long expired, and every renewal rode the same connection, bound to
    // the newest certificate each time (no reopening near the old one's expiry).
    let agent = Agent::new(agent_config(&ca, &token, "kept", 6));
    let (state, _stop_tx, run, first) = start(agent).await;
    // The bootstrap (join token) connection closes; the agent's link stays.
    let one = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        (connections_to(port) == base + 1).then_some(())
    })
    .await;
    assert!(one.is_some(), "{} connections", connections_to(port) - base);
    let kept = peers_of(port);
    let mut serials = std::collections::BTreeSet::from([first.svid.serial.to_hex()]);
    let until = first.svid.not_after + 8;
    let mut current = first.clone();
    while lanyard::tls::unix_now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        current = state.borrow().clone().unwrap();
        serials.insert(current.svid.serial.to_hex());
        assert_eq!(
            peers_of(port),
            kept,
            "rotation {} changed the agent's connection",
            serials.len() - 1
        );
        assert!(!run.is_finished(), "the agent stopped");
    }
    assert!(
        serials.len() >= 4,
        "only {} certificates in {} s",
        serials.len(),
        until - first.svid.not_after
    );
    assert!(current.svid.not_after > lanyard::tls::unix_now());

    let revoke = |serial: String| {
        let admin = admin.clone();
        async move {
            revoke_serial(&admin, &serial, "key compromise")
                .await
                .unwrap();
        }
    };

    // Revoke the first certificate, the one the connection was opened with: the connection no
    // longer speaks for it (a serial revocation covers that certificate, not its renewals),
    // so the agent goes on, on the same connection.
    revoke(first.svid.serial.to_hex()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !run.is_finished(),
        "revoking a superseded certificate stopped the agent"
    );
    assert_eq!(peers_of(port), kept, "the connection was kept");

    // Revoke the current certificate, the one the connection speaks for: the agent is cut off.
    let current = state.borrow().clone().unwrap();
    revoke(current.svid.serial.to_hex()).await;
    let result = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the agent is cut off within seconds")
        .unwrap();
    assert!(matches!(result, Err(AgentError::Revoked(_))), "{result:?}");
}

/// `Revocation.Check` on `channel`: a call that needs the caller's certificate unexpired
/// (no renewal grace) and unrevoked.
async fn check(channel: &Channel, serial: &str) -> Result<(), tonic::Status> {
    RevocationClient::new(channel.clone())
        .check(pb::CheckRequest {
            serial: serial.to_string(),
        })
        .await
        .map(drop)
}

/// `Revocation.Revoke` of `serial` over `channel`.
async fn revoke_serial(channel: &Channel, serial: &str, reason: &str) -> Result<(), tonic::Status> {
    RevocationClient::new(channel.clone())
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::Serial(serial.to_string())),
            reason: reason.into(),
            lift: false,
        })
        .await
        .map(drop)
}

/// Renews `svid`'s identity over `channel` for `ttl` seconds; returns the new certificate and
/// the serial the CA says it bound to the connection.
async fn renew_over(channel: &Channel, svid: &SvidInfo, ttl: u32) -> (SvidInfo, Option<String>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let resp = CaClient::new(channel.clone())
        .issue(pb::IssueRequest {
            csr: csr_for(&svid.spiffe_id, &key).unwrap(),
            join_token: String::new(),
            jwt: String::new(),
            ttl_seconds: ttl,
            roles: vec![],
        })
        .await
        .unwrap();
    let bound = resp
        .metadata()
        .get(CONNECTION_BOUND)
        .map(|v| v.to_str().unwrap().to_string());
    let leaf = rustls_pki_types::CertificateDer::from(resp.into_inner().cert_chain[0].clone());
    (
        lanyard::ca::parse_svid(&leaf, &Default::default()).unwrap(),
        bound,
    )
}

/// The next message of a revocation watch, within 10 s.
async fn next_entry(
    watch: &mut tonic::Streaming<pb::RevocationEntry>,
) -> Result<Option<pb::RevocationEntry>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watch answers within 10 s")
}

/// Decision 65 end to end: a certificate renewed over connection A authenticates A from then
/// on — past the expiry of the certificate A was opened with — and never connection B, opened
/// with the same first certificate; revoking the bound certificate refuses A's next call and
/// ends the revocation watch A opened before that certificate was bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_authenticates_its_own_connection_and_no_other() {
    let ca = TestCa::start().await;
    let port = ca.addr.port();
    let admin = ca.admin_channel().await;
    let dir = ca
        .enroll("bound", "spiffe://example.org/ns/prod/bound", &[], 3)
        .await;
    let first = common::dir_svid(&dir).unwrap();
    let before = peers_of(port);
    let a = ca.channel_as(&dir).await;
    let b = ca.channel_as(&dir).await;
    check(&a, &first.serial.to_hex()).await.unwrap();
    check(&b, &first.serial.to_hex()).await.unwrap();
    let ours: std::collections::BTreeSet<u16> =
        peers_of(port).difference(&before).copied().collect();
    assert_eq!(ours.len(), 2, "connections A and B");

    let (second, bound) = renew_over(&a, &first, 60).await;
    assert_eq!(
        bound,
        Some(second.serial.to_hex()),
        "the CA says it bound the renewal to A"
    );
    // Past the first certificate's expiry (and nothing reconnected meanwhile).
    let wait = first.not_after + 2 - lanyard::tls::unix_now();
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64)).await;
    check(&a, &second.serial.to_hex())
        .await
        .expect("A speaks for the renewed certificate");
    let refused = check(&b, &first.serial.to_hex()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("expired"), "{refused:?}");
    let now: std::collections::BTreeSet<u16> =
        peers_of(port).difference(&before).copied().collect();
    assert_eq!(now, ours, "A and B are the connections they were");

    // A revocation watch on A, opened while A speaks for `second`.
    let watch = |ch: &Channel| {
        let mut client = RevocationClient::new(ch.clone());
        async move {
            client
                .watch(pb::WatchRequest { since: 0 })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut watch_a = watch(&a).await;

    // Renewing again on A binds the newest; renewing on B (its first certificate is within the
    // renewal grace) binds B's own, not A's.
    let (third, bound) = renew_over(&a, &second, 60).await;
    assert_eq!(bound, Some(third.serial.to_hex()));
    let (on_b, bound) = renew_over(&b, &first, 60).await;
    assert_eq!(bound, Some(on_b.serial.to_hex()));
    check(&b, &on_b.serial.to_hex()).await.unwrap();
    let mut watch_b = watch(&b).await;

    // Revoking the certificate A speaks for refuses A's next call, renewal included; B is
    // unaffected.
    revoke_serial(&admin, &third.serial.to_hex(), "key compromise")
        .await
        .unwrap();
    let refused = check(&a, &third.serial.to_hex()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("revoked"), "{refused:?}");
    // A's watch, opened before `third` existed, ends: the revoked certificate is the one its
    // connection speaks for now. B's goes on with the entry.
    let entry = next_entry(&mut watch_a)
        .await
        .unwrap()
        .expect("the entry first");
    assert_eq!(entry.serial, third.serial.to_hex());
    let ended = next_entry(&mut watch_a).await.unwrap_err();
    assert_eq!(ended.code(), tonic::Code::FailedPrecondition, "{ended:?}");
    assert!(
        ended.message().contains(&third.serial.to_hex()),
        "{ended:?}"
    );
    let entry = next_entry(&mut watch_b)
        .await
        .unwrap()
        .expect("B's watch goes on");
    assert_eq!(entry.serial, third.serial.to_hex());
    let key = rcgen::KeyPair::generate().unwrap();
    let renewal = CaClient::new(a.clone())
        .issue(pb::IssueRequest {
            csr: csr_for(&third.spiffe_id, &key).unwrap(),
            join_token: String::new(),
            jwt: String::new(),
            ttl_seconds: 60,
            roles: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(
        renewal.code(),
        tonic::Code::FailedPrecondition,
        "{renewal:?}"
    );
    check(&b, &on_b.serial.to_hex()).await.unwrap();
}

/// A refused call on a connection a renewal rebound is audited as the identity the connection
/// speaks for, also once the certificate the connection was opened with is past the renewal
/// grace (kept agent connections outlive it by hours), not as `unauthenticated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_on_a_rebound_connection_is_audited_as_its_identity() {
    let ca = TestCa::start_with("renewal_grace = \"1s\"", common::POLICY).await;
    let id = "spiffe://example.org/ns/prod/refused";
    let dir = ca.enroll("refused", id, &[], 2).await;
    let first = common::dir_svid(&dir).unwrap();
    let a = ca.channel_as(&dir).await;
    let (second, bound) = renew_over(&a, &first, 60).await;
    assert_eq!(bound, Some(second.serial.to_hex()));
    // Past the first certificate's expiry and its 1 s grace.
    let wait = first.not_after + 3 - lanyard::tls::unix_now();
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64)).await;
    let refused = revoke_serial(&a, &second.serial.to_hex(), "not an admin")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let log = ca.audit_log().await;
    let denied = log
        .iter()
        .rev()
        .find(|r| r.kind == "denied" && r.reason.contains("Revocation/Revoke"))
        .expect("the refusal is audited");
    assert_eq!(denied.actor, id, "{denied:?}");
}

/// A renewal due when the connection's certificate is already within the reopen margin (short
/// certificates: the 30 s backdate makes the margin as long as the time left at half-life) still
/// rides the connection in hand: opening again would present the same certificate, on every
/// call until the renewal lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_within_the_margin_rides_the_connection_in_hand() {
    let (ca, port, _admin, token) = ca_with_admin_connection().await;
    let before = peers_of(port);
    let agent = Agent::new(agent_config(&ca, &token, "short", 10));
    let (mut state, _stop_tx, run, first) = start(agent).await;
    let link = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let now = peers_of(port);
        (now.len() == before.len() + 1).then(|| now.difference(&before).copied().collect())
    })
    .await
    .expect("the agent's one connection");
    let link: std::collections::BTreeSet<u16> = link;
    tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(|s| {
            s.as_ref()
                .is_some_and(|s| s.svid.serial != first.svid.serial)
        }),
    )
    .await
    .expect("rotated in time")
    .unwrap();
    let after: std::collections::BTreeSet<u16> =
        peers_of(port).difference(&before).copied().collect();
    assert_eq!(after, link, "the renewal kept the agent's one connection");
    run.abort();
}

/// Starts `lanyard serve` over `data` listening on `port`.
fn serve(
    dir: &std::path::Path,
    config: &std::path::Path,
    port: u16,
    name: &str,
) -> common::ChildGuard {
    let mut cmd = lanyard_cmd();
    cmd.args(["serve", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"));
    common::ChildGuard::spawn(name, &mut cmd, &dir.join(format!("{name}.log")))
}

async fn wait_listening(port: u16) {
    let up = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await;
    assert!(up.is_some(), "no CA listening on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_given_two_ca_addresses_keeps_renewing_after_its_ca_dies() {
    // Without a shared store (etcd) replicas do not share enrollments, so the second address
    // is the same CA (same data dir) brought back on another port after the first one died.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanyard.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\nmin_ttl = \"1s\"\n{}",
            common::POLICY
        ),
    )
    .unwrap();
    let (p1, p2) = (common::free_port(), common::free_port());
    let mut first_ca = serve(dir.path(), &config, p1, "serve-1");
    wait_listening(p1).await;
    let admin = dir.path().join("data/admin");
    poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        admin.join("cert.pem").exists().then_some(())
    })
    .await
    .expect("admin credential");
    let out = lanyard_cmd()
        .args(["token", "create", "--server"])
        .arg(format!("127.0.0.1:{p1}"))
        .arg("--credential")
        .arg(&admin)
        .args(["--spiffe-id", "spiffe://example.org/ns/dev/failover"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // Both addresses, as a comma list; the second is dead for now.
    let servers = format!("127.0.0.1:{p1},127.0.0.1:{p2}");
    let out = dir.path().join("agent");
    let mut agent = spawn_agent(
        &servers,
        &token,
        &out,
        &["--ttl", "6s", "--max-backoff", "1s"],
    );
    let first = wait_for_svid(&out, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("no certificate:\n{}", agent.output()));

    // The CA dies without a goodbye (SIGKILL) and comes back on the other address.
    first_ca.child.kill().unwrap();
    first_ca.child.wait().unwrap();
    let _second_ca = serve(dir.path(), &config, p2, "serve-2");
    wait_listening(p2).await;
    let started = std::time::Instant::now();
    let mut last = first.serial.clone();
    let mut renewals = 0;
    while started.elapsed() < Duration::from_secs(15) && renewals < 2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(s) = common::dir_svid(&out)
            && s.serial != last
        {
            last = s.serial;
            renewals += 1;
        }
    }
    assert!(agent.is_running(), "agent stopped:\n{}", agent.output());
    assert!(
        renewals >= 2,
        "{renewals} renewals in 15 s from the CA on its second address:\n{}",
        agent.output()
    );
    assert!(common::dir_svid(&out).unwrap().not_after > lanyard::tls::unix_now());
}
