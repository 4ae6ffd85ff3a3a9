//! `Revocation.GetCrl` answers share the CA's cached CRL instead of copying it per call
//! (decision 116): callers at once, on their own connections and on one shared connection, each
//! receive exactly the CRL the CA signed, in exactly the message prost encodes (the raw gRPC
//! message is compared byte for byte); a new revocation changes what every caller gets; and who
//! may call the Revocation service, with which status a refused caller is answered, is what it
//! was (a CRL needs no credential; every other call does).
//!
//! A real CA over real TLS; its revocations are committed to its sled store while it is stopped
//! (tests/common's `commit_serial_revocations`), enough for a CRL of ~720 KB: many HTTP/2 frames
//! and more than one 64 KiB flow-control window per answer.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::{POLICY, TestCa, commit_serial_revocations};
use lanyard::ca::RolesOid;
use lanyard::client::Credential;
use lanyard::codec::MAX_CRL_RESPONSE;
use lanyard::pb::v1::{self as pb, revocation_client::RevocationClient, revoke_request::Target};
use prost::Message;
use prost::bytes::{Buf, BufMut};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

/// Serial revocations in the CA: a CRL of ~720 KB (~36 bytes each).
const ENTRIES: usize = 20_000;
const API: &str = "spiffe://example.org/ns/prod/api";
const GET_CRL: &str = "/lanyard.v1.Revocation/GetCrl";

/// The CRL as a Lanyard client fetches it (`client::crl_client`'s limit).
async fn fetch(channel: Channel) -> Result<pb::Crl, Status> {
    RevocationClient::new(channel)
        .max_decoding_message_size(MAX_CRL_RESPONSE)
        .get_crl(pb::GetCrlRequest {})
        .await
        .map(tonic::Response::into_inner)
}

/// A codec that passes gRPC messages through as raw bytes: what is on the wire, undecoded.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = buf.remaining();
        Ok(Some(buf.copy_to_bytes(n).to_vec()))
    }
}

/// Calls `path` with `request` as the raw request message; returns the raw response message.
async fn raw_call(
    channel: Channel,
    path: &'static str,
    request: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_CRL_RESPONSE);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(request),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Checks that `der` is a CRL signed by the CA whose bundle is in `admin` and that it lists
/// exactly `revoked`; returns its CRL number.
fn check_crl(admin: &Path, der: &[u8], revoked: &HashSet<String>) -> Vec<u8> {
    let (rest, crl) = CertificateRevocationList::from_der(der).expect("the CRL parses");
    assert!(rest.is_empty(), "nothing after the CRL");
    let bundle = std::fs::read(admin.join("bundle.pem")).unwrap();
    let signed = CertificateDer::pem_slice_iter(&bundle).any(|c| {
        let c = c.unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&c).unwrap();
        cert.subject() == crl.issuer() && crl.verify_signature(cert.public_key()).is_ok()
    });
    assert!(signed, "the CRL is signed by the CA");
    let listed: HashSet<String> = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    assert_eq!(listed.len(), revoked.len());
    assert!(
        listed == *revoked,
        "the CRL lists exactly the revoked serials"
    );
    crl.crl_number().expect("a CRL number").to_bytes_be()
}

/// The code a call was refused with, or `Ok` when it was answered.
fn code<T>(r: Result<T, Status>) -> Result<(), Code> {
    r.map(|_| ()).map_err(|s| s.code())
}

fn serial_of(dir: &Path) -> String {
    Credential::load(dir, &RolesOid::default())
        .unwrap()
        .svid
        .serial
        .to_hex()
}

/// `n` `GetCrl` calls at once: one connection each, and as many streams on one shared
/// connection; every answer must be `expected`, byte for byte.
async fn fetch_at_once(ca: &TestCa, n: usize, expected: &pb::Crl) {
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        calls.spawn(fetch(ca.anon_channel().await));
    }
    let shared = ca.anon_channel().await;
    for _ in 0..n {
        calls.spawn(fetch(shared.clone()));
    }
    let mut answers = 0;
    while let Some(r) = calls.join_next().await {
        let crl = r.unwrap().expect("anyone may fetch the CRL");
        assert!(
            crl.der == expected.der,
            "every caller gets the same CRL bytes"
        );
        assert_eq!(crl.retiring, expected.retiring);
        answers += 1;
    }
    assert_eq!(answers, 2 * n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_get_crl_callers_each_get_the_exact_crl_and_a_revocation_changes_it() {
    let ca = TestCa::start_with("", POLICY).await;
    let (dir, config) = ca.stop().await;
    let mut revoked = commit_serial_revocations(&dir.path().join("data"), ENTRIES).await;
    let ca = TestCa::start_in(dir, config).await;
    let admin = ca.admin_dir();

    let first = fetch(ca.anon_channel().await).await.unwrap();
    assert!(first.der.len() > 512 << 10, "{} bytes", first.der.len());
    assert!(first.retiring.is_empty(), "no CA rotation here");
    let number = check_crl(&admin, &first.der, &revoked);
    // On the wire: exactly the message prost encodes for it (tonic's own encoding before).
    let raw = raw_call(ca.anon_channel().await, GET_CRL, Vec::new())
        .await
        .unwrap();
    assert!(
        raw == first.encode_to_vec(),
        "the wire message is prost's encoding"
    );

    fetch_at_once(&ca, 8, &first).await;

    // A new revocation: every caller now gets the new CRL, listing it.
    let w = ca.enroll("w", API, &[], 600).await;
    let serial = serial_of(&w);
    RevocationClient::new(ca.admin_channel().await)
        .revoke(pb::RevokeRequest {
            target: Some(Target::Serial(serial.clone())),
            reason: "key leak".into(),
            lift: false,
        })
        .await
        .expect("the admin revokes a serial");
    revoked.insert(serial);
    let second = fetch(ca.anon_channel().await).await.unwrap();
    assert!(second.der != first.der, "a new revocation changes the CRL");
    let next = check_crl(&admin, &second.der, &revoked);
    assert!(
        (next.len(), &next) > (number.len(), &number),
        "CRL numbers increase: {number:?} then {next:?}"
    );
    let raw = raw_call(ca.anon_channel().await, GET_CRL, Vec::new())
        .await
        .unwrap();
    assert!(
        raw == second.encode_to_vec(),
        "the wire message is prost's encoding"
    );
    fetch_at_once(&ca, 4, &second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_may_call_the_revocation_service_and_how_a_refusal_is_answered_are_unchanged() {
    let ca = TestCa::start_with("", POLICY).await;
    let anon = ca.anon_channel().await;

    // A CRL needs no credential (the proto says so): a caller without a certificate gets it.
    let crl = fetch(anon.clone()).await.expect("anyone may fetch the CRL");
    assert!(!crl.der.is_empty());
    // Every other Revocation call needs a certificate: UNAUTHENTICATED without one.
    let mut client = RevocationClient::new(anon.clone());
    let check = client
        .check(pb::CheckRequest {
            serial: "01".into(),
        })
        .await;
    assert_eq!(code(check), Err(Code::Unauthenticated));
    let watch = client.watch(pb::WatchRequest { since: 0 }).await;
    assert_eq!(code(watch), Err(Code::Unauthenticated));
    let revoke = client
        .revoke(pb::RevokeRequest {
            target: Some(Target::Serial("01".into())),
            reason: "r".into(),
            lift: false,
        })
        .await;
    assert_eq!(code(revoke), Err(Code::Unauthenticated));

    // A workload may check and fetch the CRL, not revoke: PERMISSION_DENIED.
    let w = ca.enroll("w", API, &[], 600).await;
    let mut workload = RevocationClient::new(ca.channel_as(&w).await);
    let revoke = workload
        .revoke(pb::RevokeRequest {
            target: Some(Target::Serial(serial_of(&w))),
            reason: "r".into(),
            lift: false,
        })
        .await;
    assert_eq!(code(revoke), Err(Code::PermissionDenied));
    let check = workload
        .check(pb::CheckRequest {
            serial: serial_of(&w),
        })
        .await
        .expect("a workload may check");
    assert!(!check.into_inner().revoked);
    let crl = fetch(ca.channel_as(&w).await)
        .await
        .expect("and fetch the CRL");
    assert!(!crl.der.is_empty());

    // A malformed GetCrl request is refused as any malformed request is: INVALID_ARGUMENT.
    let malformed = raw_call(anon.clone(), GET_CRL, vec![0xff, 0xff, 0xff]).await;
    assert_eq!(code(malformed), Err(Code::InvalidArgument));

    // Once the workload's certificate is revoked, its calls that need a credential are refused
    // (FAILED_PRECONDITION: "certificate … is revoked"); the CRL, which needs none, still
    // answers on its connection.
    RevocationClient::new(ca.admin_channel().await)
        .revoke(pb::RevokeRequest {
            target: Some(Target::Serial(serial_of(&w))),
            reason: "key leak".into(),
            lift: false,
        })
        .await
        .expect("the admin revokes a serial");
    let revoked_ch = ca.channel_as(&w).await;
    let check = RevocationClient::new(revoked_ch.clone())
        .check(pb::CheckRequest {
            serial: "01".into(),
        })
        .await;
    assert_eq!(code(check), Err(Code::FailedPrecondition));
    let crl = fetch(revoked_ch)
        .await
        .expect("the CRL needs no credential");
    let (_, parsed) = CertificateRevocationList::from_der(&crl.der).unwrap();
    assert_eq!(parsed.iter_revoked_certificates().count(), 1);
}
