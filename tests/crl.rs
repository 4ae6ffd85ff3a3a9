//! Issue 15 part 4: the agent keeps the CA's CRLs fresh for file consumers and Workload API
//! clients. `crl.pem` (next to `bundle.pem`) and the `crl` field of `FetchX509SVID` change
//! within a second of a revocation seen on the agent's watch, are refreshed well before their
//! `nextUpdate` (checked over several short `crl_validity` periods), a burst of revocations is
//! fetched a few times, not once per revocation, and a hook runs on every change.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{POLICY, TestCa, poll_until, spawn_agent, wait_for_svid, workload_client};
use lanyard::ca::RolesOid;
use lanyard::pb::v1::{self as pb, revocation_client::RevocationClient, revoke_request::Target};
use lanyard::pb::workload as wl;
use lanyard::tls::unix_now;
use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

const API: &str = "spiffe://example.org/ns/prod/api";
const VICTIM: &str = "spiffe://example.org/ns/prod/victim";

/// What one DER CRL says: the serials it lists (lowercase hex) and its nextUpdate.
#[derive(Debug)]
struct CrlInfo {
    serials: HashSet<String>,
    next_update: i64,
}

fn crl_info(der: &[u8]) -> CrlInfo {
    let (_, crl) = CertificateRevocationList::from_der(der).expect("the CRL parses");
    CrlInfo {
        serials: crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
            .collect(),
        next_update: crl.next_update().expect("nextUpdate is set").timestamp(),
    }
}

/// The CRLs in `<dir>/crl.pem`; `None` when there is no such file.
fn file_crls(dir: &Path) -> Option<Vec<CrlInfo>> {
    let pem = std::fs::read(dir.join("crl.pem")).ok()?;
    let crls: Vec<CrlInfo> = CertificateRevocationListDer::pem_slice_iter(&pem)
        .map(|c| crl_info(c.expect("crl.pem is PEM").as_ref()))
        .collect();
    (!crls.is_empty()).then_some(crls)
}

/// Every `FetchX509SVID` message as it arrives: when, and its CRLs.
type Received = Arc<Mutex<Vec<(Instant, Vec<Vec<u8>>)>>>;

/// Follows `FetchX509SVID` on `socket` in the background.
async fn follow_workload_api(socket: &Path) -> Received {
    let mut client = workload_client(socket).await;
    let mut req = tonic::Request::new(wl::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client.fetch_x509svid(req).await.unwrap().into_inner();
    let received: Received = Arc::default();
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            sink.lock().unwrap().push((Instant::now(), m.crl));
        }
    });
    received
}

/// Issues a certificate for `VICTIM` (not held by any agent); returns its serial.
async fn issue_victims(ca: &TestCa, n: u32) -> Vec<String> {
    let token = ca.token(VICTIM, &[], 600, n).await;
    let mut serials = Vec::new();
    for _ in 0..n {
        let (_, resp) = ca.issue(&token, VICTIM, 300).await.expect("issue");
        let leaf = rustls_pki_types::CertificateDer::from(resp.cert_chain[0].clone());
        serials.push(
            lanyard::ca::parse_svid(&leaf, &RolesOid::default())
                .unwrap()
                .serial
                .to_hex(),
        );
    }
    serials
}

async fn revoke(client: &mut RevocationClient<tonic::transport::Channel>, serial: &str) {
    client
        .revoke(pb::RevokeRequest {
            target: Some(Target::Serial(serial.into())),
            reason: "test".into(),
            lift: false,
        })
        .await
        .expect("admin revokes a serial");
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Starts an agent for `API` writing to `<work>/out`, with `extra` flags; waits for its first
/// certificate and its crl.pem.
async fn start_agent(ca: &TestCa, work: &Path, extra: &[&str]) -> (common::ChildGuard, PathBuf) {
    let token = ca.token(API, &["db-read"], 600, 1).await;
    let out = work.join("out");
    let agent = spawn_agent(&ca.server(), &token, &out, extra);
    if wait_for_svid(&out, Duration::from_secs(15)).await.is_none() {
        panic!("the agent wrote no certificate:\n{}", agent.output());
    }
    let crl = poll_until(Duration::from_secs(5), Duration::from_millis(25), || {
        file_crls(&out)
    })
    .await;
    assert!(
        crl.is_some(),
        "the agent wrote no crl.pem next to bundle.pem:\n{}",
        agent.output()
    );
    assert_eq!(
        std::fs::read_link(out.join("crl.pem")).unwrap(),
        Path::new("..data").join("crl.pem"),
        "crl.pem is a link through ..data, like the other files"
    );
    (agent, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crl_file_and_workload_api_follow_a_revocation_within_seconds_and_never_expire() {
    // CRLs valid for 3 s: the refresh must keep up, period after period.
    let ca = TestCa::start_with("crl_validity = \"3s\"", POLICY).await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let socket = w.join("agent.sock");
    let hook_log = w.join("crl-hook.log");
    let rotate_log = w.join("rotate-hook.log");
    let crl_hook = format!(
        "echo \"$LANYARD_EVENT $LANYARD_SERIAL\" >> '{}'",
        hook_log.display()
    );
    let rotate_hook = format!("echo \"$LANYARD_EVENT\" >> '{}'", rotate_log.display());
    let socket_arg = socket.display().to_string();
    let (mut agent, out) = start_agent(
        &ca,
        w,
        &[
            "--ttl",
            "60s",
            "--workload-socket",
            &socket_arg,
            "--on-crl-change",
            &crl_hook,
            "--on-rotate",
            &rotate_hook,
        ],
    )
    .await;
    let own_serial = common::dir_svid(&out).unwrap().serial.to_hex();
    let received = follow_workload_api(&socket).await;
    let first = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        received.lock().unwrap().first().map(|(_, c)| c.clone())
    })
    .await
    .expect("FetchX509SVID answered");
    assert!(
        !first.is_empty(),
        "the Workload API carries the CA's CRL from the start"
    );

    // A revocation: crl.pem and the Workload API list it after the agent's settle and spread
    // (1-3 s: the fleet's `GetCrl` calls come after the push, spread), plus a second of slack.
    let victim = issue_victims(&ca, 1).await.remove(0);
    let mut admin = RevocationClient::new(ca.admin_channel().await);
    revoke(&mut admin, &victim).await;
    let revoked_at = Instant::now();
    let in_file = poll_until(Duration::from_secs(8), Duration::from_millis(10), || {
        file_crls(&out)
            .filter(|crls| crls.iter().any(|c| c.serials.contains(&victim)))
            .map(|_| revoked_at.elapsed())
    })
    .await
    .unwrap_or_else(|| panic!("crl.pem never listed {victim}:\n{}", agent.output()));
    let in_api = poll_until(Duration::from_secs(8), Duration::from_millis(10), || {
        received
            .lock()
            .unwrap()
            .iter()
            .find(|(_, crls)| {
                crls.iter()
                    .any(|der| crl_info(der).serials.contains(&victim))
            })
            .map(|(at, _)| at.saturating_duration_since(revoked_at))
    })
    .await
    .unwrap_or_else(|| panic!("the Workload API never listed {victim}"));
    eprintln!("revocation in crl.pem after {in_file:?}, on the Workload API after {in_api:?}");
    assert!(
        in_file <= Duration::from_secs(4),
        "crl.pem after {in_file:?}"
    );
    assert!(
        in_api <= Duration::from_secs(4),
        "Workload API after {in_api:?}"
    );
    // The CRL hook ran for it, with the agent's own serial and the event name.
    let hooked = poll_until(Duration::from_secs(3), Duration::from_millis(20), || {
        (!lines(&hook_log).is_empty()).then_some(())
    })
    .await;
    assert!(hooked.is_some(), "--on-crl-change never ran");
    for line in lines(&hook_log) {
        assert_eq!(line, format!("crl {own_serial}"), "hook environment");
    }
    // --on-crl-change replaces --on-rotate for CRL changes.
    assert!(
        lines(&rotate_log).iter().all(|l| l == "rotate"),
        "{:?}",
        lines(&rotate_log)
    );

    // Four validity periods later, neither crl.pem nor the Workload API ever held an expired
    // CRL, and the revocation stays listed.
    let hook_runs = lines(&hook_log).len();
    let started = Instant::now();
    let mut refreshes = HashSet::new();
    while started.elapsed() < Duration::from_secs(12) {
        assert!(agent.is_running(), "agent exited:\n{}", agent.output());
        let now = unix_now();
        let crls = file_crls(&out).expect("crl.pem is there");
        for c in &crls {
            assert!(
                c.next_update > now,
                "crl.pem expired at {} (now {now}):\n{}",
                c.next_update,
                agent.output()
            );
            assert!(c.serials.contains(&victim));
            refreshes.insert(c.next_update);
        }
        let latest = received.lock().unwrap().last().unwrap().1.clone();
        for der in &latest {
            let c = crl_info(der);
            assert!(
                c.next_update > now,
                "the Workload API's CRL expired at {} (now {now})",
                c.next_update
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refreshes.len() >= 4,
        "expected a refresh every ~1.5 s, saw nextUpdates {refreshes:?}"
    );
    assert!(
        lines(&hook_log).len() >= hook_runs + 4,
        "the hook ran on each refresh: {:?}",
        lines(&hook_log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_revocations_costs_a_few_fetches_and_runs_on_rotate_without_a_crl_hook() {
    // The default CRL validity (5 min): no timed refresh during the test, so every hook run
    // below is a fetch caused by revocations.
    let ca = TestCa::start().await;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let hook_log = w.join("hook.log");
    let hook = format!("echo \"$LANYARD_EVENT\" >> '{}'", hook_log.display());
    let (agent, out) = start_agent(&ca, w, &["--ttl", "60s", "--on-rotate", &hook]).await;
    let victims = issue_victims(&ca, 50).await;
    // Let the watch settle (its first replay may cause one fetch) before counting.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = lines(&hook_log).len();
    let mut admin = RevocationClient::new(ca.admin_channel().await);
    for serial in &victims {
        revoke(&mut admin, serial).await;
    }
    let done = Instant::now();
    let listed = poll_until(Duration::from_secs(8), Duration::from_millis(10), || {
        file_crls(&out)
            .filter(|crls| victims.iter().all(|v| crls[0].serials.contains(v)))
            .map(|_| done.elapsed())
    })
    .await
    .unwrap_or_else(|| panic!("crl.pem never listed all 50:\n{}", agent.output()));
    // The agent's settle and spread after a revocation (1-3 s), plus a second of slack.
    assert!(
        listed <= Duration::from_secs(4),
        "all 50 listed after {listed:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs: Vec<String> = lines(&hook_log)[before..].to_vec();
    eprintln!("50 revocations: {} CRL changes", runs.len());
    assert!(
        !runs.is_empty() && runs.iter().all(|l| l == "crl"),
        "--on-rotate runs on CRL changes when --on-crl-change is not given: {runs:?}"
    );
    assert!(
        runs.len() <= 12,
        "50 revocations in a row caused {} CRL fetches",
        runs.len()
    );
}
