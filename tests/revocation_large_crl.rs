//! A CRL larger than tonic's default 4 MiB message limit (a CA holding more than ~110,000 live
//! revocations; a million make a 36 MB CRL) reaches every Lanyard client that asks for it: the
//! `lanyard crl` command and `lanyard agent`'s `crl.pem`. Before `codec::MAX_CRL_RESPONSE` both
//! refused the CA's answer (OUT_OF_RANGE, "decoded message length too large"), so the agent
//! never wrote a CRL and the command failed. And the agent's Workload API still hands such a
//! CA's SVIDs to a SPIFFE client with gRPC's default 4 MiB receive limit (go-spiffe, py-spiffe,
//! tonic): the CRLs are left out of a response they would push past it (they were in every
//! `X509SVIDResponse`, so the client was refused the whole response and got no SVID), with one
//! warning in the agent's log.
//!
//! A real CA over real TLS and a real agent process; the revocations are committed to the CA's
//! sled store through its audit log while it is stopped (as `Revoke` commits them, a batch per
//! event), so the test does not pay 120,000 RPCs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    POLICY, TestCa, commit_serial_revocations, poll_until, spawn_agent, wait_for_svid,
    workload_client,
};
use lanyard::pb::v1::{self as pb, revocation_client::RevocationClient};
use lanyard::pb::workload as wl;
use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

/// Enough entries for a CRL over 4 MiB (~36 bytes each).
const ENTRIES: usize = 120_000;

/// The serials (hex) a DER CRL lists.
fn listed(der: &[u8]) -> HashSet<String> {
    let (_, crl) = CertificateRevocationList::from_der(der).expect("the CRL parses");
    crl.iter_revoked_certificates()
        .map(|r| hex(r.raw_serial()))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// `msg` with the Workload API's security header.
fn header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_over_four_mib_reaches_the_cli_and_the_agent() {
    let ca = TestCa::start_with("", POLICY).await;
    let (dir, config) = ca.stop().await;
    let revoked = commit_serial_revocations(&dir.path().join("data"), ENTRIES).await;
    let ca = TestCa::start_in(dir, config).await;

    // A client with tonic's default limit cannot take it: the case this test is about.
    let refused = RevocationClient::new(ca.anon_channel().await)
        .get_crl(pb::GetCrlRequest {})
        .await
        .expect_err("tonic's default 4 MiB limit refuses the CRL");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused}");

    // `lanyard crl --der --out`.
    let file = ca.dir.path().join("crl.der");
    let out = tokio::process::Command::new(common::lanyard_bin())
        .args(["crl", "--der", "--out", file.to_str().unwrap(), "--server"])
        .arg(ca.server())
        .arg("--credential")
        .arg(ca.admin_dir())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "lanyard crl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let der = std::fs::read(&file).unwrap();
    assert!(der.len() > 4 << 20, "the CRL is over 4 MiB: {}", der.len());
    assert_eq!(listed(&der), revoked);

    // `lanyard agent` fetches it and writes it to crl.pem.
    let token = ca
        .token("spiffe://example.org/ns/prod/agent", &[], 600, 1)
        .await;
    let out = ca.dir.path().join("agent");
    let socket = ca.dir.path().join("workload.sock");
    let agent = spawn_agent(
        &ca.server(),
        &token,
        &out,
        // Short-lived, so it rotates within the test: the new generation of files must carry
        // the CRL over (the agent no longer holds one this large in memory).
        &[
            "--workload-socket",
            socket.to_str().unwrap(),
            "--ttl",
            "6s",
            "--log",
            "info,lanyard::agent::crl=debug",
        ],
    );
    if wait_for_svid(&out, Duration::from_secs(30)).await.is_none() {
        panic!("the agent wrote no certificate:\n{}", agent.output());
    }
    let crl = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        let pem = std::fs::read(out.join("crl.pem")).ok()?;
        CertificateRevocationListDer::pem_slice_iter(&pem)
            .next()?
            .ok()
            .map(|c| c.as_ref().to_vec())
    })
    .await
    .unwrap_or_else(|| panic!("the agent wrote no CRL:\n{}", agent.output()));
    assert_eq!(listed(&crl), revoked);

    // The Workload API, to a client with tonic's default 4 MiB limit (as go-spiffe's and
    // py-spiffe's): the SVID of cert.pem and the bundles, without the CRLs, which do not fit.
    let own = common::dir_svid(&out).expect("cert.pem parses");
    let mut client = workload_client(&socket).await;
    let mut svids = client
        .fetch_x509svid(header(wl::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let svid = svids
        .message()
        .await
        .unwrap_or_else(|e| panic!("FetchX509SVID refused: {e}\n{}", agent.output()))
        .expect("a first FetchX509SVID message");
    let [one] = &svid.svids[..] else {
        panic!("one SVID, got {}", svid.svids.len())
    };
    assert_eq!(one.spiffe_id, "spiffe://example.org/ns/prod/agent");
    let chain = lanyard::agent::split_der(&one.x509_svid).expect("a DER chain");
    let leaf = lanyard::ca::parse_svid(&chain[0], &Default::default()).unwrap();
    // The SVID of cert.pem (which may have rotated meanwhile).
    let now_in_file = common::dir_svid(&out).unwrap().serial;
    assert!(
        leaf.serial == own.serial || leaf.serial == now_in_file,
        "the SVID of cert.pem"
    );
    assert!(!one.x509_svid_key.is_empty() && !one.bundle.is_empty());
    assert!(svid.crl.is_empty(), "CRLs over the limit are left out");
    let bundles = client
        .fetch_x509_bundles(header(wl::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap_or_else(|e| panic!("FetchX509Bundles refused: {e}"))
        .expect("a first FetchX509Bundles message");
    assert!(bundles.bundles.contains_key("spiffe://example.org"));
    assert!(bundles.crl.is_empty(), "CRLs over the limit are left out");
    // One warning for these CRLs, however many responses left them out.
    let warning = "too large for a Workload API response";
    let warned = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let log = agent.output();
        (log.matches(warning).count() > 0).then_some(log)
    })
    .await
    .expect("the agent warns that the CRLs were left out");
    assert_eq!(warned.matches(warning).count(), 1, "{warned}");

    // A rotation: the new generation's crl.pem still lists every serial, the Workload API
    // sends the new SVID (without the CRLs), and nothing more is warned: same CRLs.
    poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        common::dir_svid(&out).filter(|s| s.serial != own.serial)
    })
    .await
    .unwrap_or_else(|| panic!("the agent did not rotate:\n{}", agent.output()));
    let pem = std::fs::read(out.join("crl.pem")).expect("crl.pem after the rotation");
    let after: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&pem)
        .map(|c| c.unwrap().as_ref().to_vec())
        .collect();
    assert_eq!(after, vec![crl.clone()], "the same CRL, carried over");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), svids.message())
            .await
            .expect("the rotated SVID on the Workload API")
            .unwrap()
            .expect("the stream stays open");
        assert!(m.crl.is_empty());
        let chain = lanyard::agent::split_der(&m.svids[0].x509_svid).unwrap();
        let serial = lanyard::ca::parse_svid(&chain[0], &Default::default())
            .unwrap()
            .serial;
        // A rotated one (a second rotation may come before this message is read).
        if serial != own.serial {
            break;
        }
    }
    let log = agent.output();
    assert_eq!(log.matches(warning).count(), 1, "{log}");

    // The watch's catch-up from 0 replayed what the first CRL lists: no second fetch for it.
    poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
        agent
            .output()
            .contains("the CRLs in hand already list every serial revoked; not fetched")
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the catch-up cost a CRL fetch:\n{}", agent.output()));
}
