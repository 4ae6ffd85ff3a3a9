//! A CRL larger than tonic's default 4 MiB message limit (a CA holding more than ~110,000 live
//! revocations; a million make a 36 MB CRL) reaches every Lanyard client that asks for it: the
//! `lanyard crl` command and `lanyard agent`'s `crl.pem`. Before `codec::MAX_CRL_RESPONSE` both
//! refused the CA's answer (OUT_OF_RANGE, "decoded message length too large"), so the agent
//! never wrote a CRL and the command failed.
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

use common::{POLICY, TestCa, commit_serial_revocations, poll_until, spawn_agent, wait_for_svid};
use lanyard::pb::v1::{self as pb, revocation_client::RevocationClient};
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
    let agent = spawn_agent(&ca.server(), &token, &out, &[]);
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
}
