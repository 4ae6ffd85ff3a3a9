//! TLS session resumption between the CA and its clients (issue 13, docs/design.md decision on
//! resumption), over real TLS 1.3 and gRPC against a real CA. A resumed handshake skips the
//! certificate exchange, so these tests prove that every peer check still runs on a resumed
//! connection: the CA judges the client chain the session carries (revocation, expiry) on every
//! call, a client resumes only a session of the certificate it holds now and only under the same
//! server trust and expected identity, the key exchange is X25519 and the suite AES-128-GCM-SHA256,
//! and the CA sends tickets only to clients that ask. Each test asserts that the
//! connection it judges really was resumed (or really was not), so none can pass by accident.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{POLICY, TestCa};
use lanyard::ca::RolesOid;
use lanyard::client::{ClientError, Credential, connect, connect_with, csr_for};
use lanyard::pb::v1::{
    self as pb, ca_client::CaClient, revocation_client::RevocationClient, revoke_request::Target,
};
use lanyard::spiffe::SpiffeId;
use lanyard::tls::{Bundle, CertSlot, ServerTrust, ServerVerifier, unix_now};
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::Code;

const API: &str = "spiffe://example.org/ns/prod/api";

/// A renewal over a new connection presenting `slot`'s certificate (the slot is left as it is).
async fn renew_on_new_connection(
    ca: &TestCa,
    trust: Bundle,
    slot: &Arc<CertSlot>,
) -> Result<pb::IssueResponse, tonic::Status> {
    let channel = connect(
        &ca.server(),
        ServerTrust::Bundle(trust),
        Some(slot.clone()),
        RolesOid::default(),
    )
    .await
    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let key = KeyPair::generate().unwrap();
    let csr = csr_for(&SpiffeId::parse(API).unwrap(), &key).unwrap();
    CaClient::new(channel)
        .issue(pb::IssueRequest {
            csr,
            join_token: String::new(),
            jwt: String::new(),
            ttl_seconds: 60,
            roles: vec![],
        })
        .await
        .map(|r| r.into_inner())
}

/// The credential in `dir` and a slot presenting it.
fn load(dir: &Path) -> (Credential, Arc<CertSlot>) {
    let cred = Credential::load(dir, &RolesOid::default()).unwrap();
    let slot = cred.slot().unwrap();
    (cred, slot)
}

async fn revoke_serial(ca: &TestCa, serial: String) {
    RevocationClient::new(ca.admin_channel().await)
        .revoke(pb::RevokeRequest {
            target: Some(Target::Serial(serial)),
            reason: "key leaked".into(),
            lift: false,
        })
        .await
        .expect("the admin revokes");
}

#[tokio::test]
async fn a_resumed_session_is_refused_once_its_certificate_is_revoked() {
    let ca = TestCa::start().await;
    let dir = ca.enroll("api", API, &[], 600).await;
    let (cred, slot) = load(&dir);

    renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .expect("a full handshake renews");
    assert_eq!((slot.stats().full, slot.stats().resumed), (1, 0));
    // The second connection resumes, and the CA still finds the client's chain in it (a
    // renewal needs one): the session carries the chain of the full handshake.
    renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .expect("a resumed session renews");
    assert_eq!((slot.stats().full, slot.stats().resumed), (1, 1));

    revoke_serial(&ca, cred.svid.serial.to_hex()).await;
    let refused = renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .expect_err("a revoked certificate must not renew, resumed or not");
    assert_eq!(
        (slot.stats().full, slot.stats().resumed),
        (1, 2),
        "the refused connection was resumed"
    );
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
}

#[tokio::test]
async fn a_resumed_session_is_refused_once_its_certificate_has_expired() {
    // A 1 s renewal grace, so the test does not wait an hour.
    let ca = TestCa::start_with("renewal_grace = \"1s\"\n", POLICY).await;
    let dir = ca.enroll("api", API, &[], 3).await;
    let (cred, slot) = load(&dir);

    renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .expect("a full handshake renews");
    renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .expect("a resumed session renews while the certificate is valid");
    assert_eq!((slot.stats().full, slot.stats().resumed), (1, 1));

    // Past notAfter + grace: the session's ticket is still good, the certificate is not.
    let wait = cred.svid.not_after + 1 + 2 - unix_now();
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64)).await;
    let refused = renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .expect_err("an expired certificate must not renew, resumed or not");
    assert_eq!(
        (slot.stats().full, slot.stats().resumed),
        (1, 2),
        "the refused connection was resumed"
    );
    assert!(refused.message().contains("expired"), "{refused:?}");
}

#[tokio::test]
async fn a_renewed_certificate_makes_a_full_handshake_so_the_ca_judges_the_new_one() {
    let ca = TestCa::start().await;
    let dir = ca.enroll("api", API, &[], 600).await;
    let (cred, slot) = load(&dir);
    renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .unwrap();
    renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .unwrap();
    assert_eq!((slot.stats().full, slot.stats().resumed), (1, 1));

    // Renew, install the new certificate, revoke the old one: a session of the old certificate
    // would now be refused, so the next renewal succeeds only if it presents the new one.
    let key = KeyPair::generate().unwrap();
    let channel = connect(
        &ca.server(),
        ServerTrust::Bundle(cred.bundle.clone()),
        Some(slot.clone()),
        RolesOid::default(),
    )
    .await
    .unwrap();
    let resp = CaClient::new(channel)
        .issue(pb::IssueRequest {
            csr: csr_for(&SpiffeId::parse(API).unwrap(), &key).unwrap(),
            join_token: String::new(),
            jwt: String::new(),
            ttl_seconds: 60,
            roles: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = resp
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    slot.set(
        chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    revoke_serial(&ca, cred.svid.serial.to_hex()).await;
    let before = slot.stats();
    renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .expect("the new certificate renews");
    assert_eq!(
        (slot.stats().full, slot.stats().resumed),
        (before.full + 1, before.resumed),
        "a new certificate never resumes a session of the old one"
    );
    // And its own sessions resume from then on.
    renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .expect("the new certificate's session renews");
    assert_eq!(slot.stats().resumed, before.resumed + 1);
}

#[tokio::test]
async fn a_client_never_resumes_under_another_trust_bundle_or_expected_identity() {
    let ca = TestCa::start().await;
    let other = TestCa::start().await;
    let dir = ca.enroll("api", API, &[], 600).await;
    let (cred, slot) = load(&dir);
    renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
        .await
        .unwrap();
    assert_eq!(slot.stats().full, 1);

    // The client's bundle no longer holds this CA (a rotation it learned about, a rebuilt CA):
    // the session it has must not let the old CA in.
    let err = connect(
        &ca.server(),
        ServerTrust::Bundle(other.bundle()),
        Some(slot.clone()),
        RolesOid::default(),
    )
    .await
    .expect_err("a CA outside the trust bundle is refused, session or not");
    assert!(matches!(err, ClientError::Connect(..)), "{err:?}");

    // Another expected server identity: the same.
    let verifier = ServerVerifier::for_id(
        ServerTrust::Bundle(cred.bundle.clone()),
        SpiffeId::parse("spiffe://example.org/not/the/ca").unwrap(),
        RolesOid::default(),
    );
    let err = connect_with(&ca.server(), verifier, Some(slot.clone()))
        .await
        .expect_err("a server with another identity is refused, session or not");
    assert!(err.to_string().contains("presented"), "{err}");
    assert_eq!(slot.stats().resumed, 0, "nothing was resumed");

    // Back to the original trust: the slot keeps sessions for one policy only, so this is a full
    // handshake again, whose session then resumes.
    for _ in 0..2 {
        renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
            .await
            .unwrap();
    }
    assert_eq!((slot.stats().full, slot.stats().resumed), (2, 1));
}

#[tokio::test]
async fn the_ca_and_its_client_code_negotiate_x25519_full_and_resumed() {
    let ca = TestCa::start().await;
    let dir = ca.enroll("api", API, &[], 600).await;
    let (cred, slot) = load(&dir);
    for resumed in [0, 1] {
        renew_on_new_connection(&ca, cred.bundle.clone(), &slot)
            .await
            .unwrap();
        let stats = slot.stats();
        assert_eq!((stats.full, stats.resumed), (1, resumed));
        assert_eq!(
            stats.last_group,
            Some(rustls::NamedGroup::X25519),
            "the key exchange must be X25519 (a dependency bump that changes the order of the \
             provider's groups once made handshakes negotiate P-384 at twice the CPU)"
        );
        assert_eq!(
            stats.last_suite,
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            "the suite must be AES-128-GCM-SHA256 (a SHA-384 key schedule costs both sides more)"
        );
    }
    assert_eq!(
        lanyard::tls::provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect::<Vec<_>>(),
        lanyard::tls::KX_GROUPS.to_vec(),
        "both sides offer the explicit order"
    );
}

/// A bare TLS client config for the CA (no client certificate, no gRPC), trusting it as Lanyard's
/// client does, with rustls' default in-memory session store.
fn raw_config(
    ca: &TestCa,
    provider: Arc<rustls::crypto::CryptoProvider>,
    ticket_request: Option<rustls::client::TicketRequest>,
) -> Arc<rustls::ClientConfig> {
    let verifier = ServerVerifier::for_path(
        ServerTrust::Bundle(ca.bundle()),
        "/lanyard/server",
        RolesOid::default(),
    );
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.send_ticket_request = ticket_request;
    Arc::new(cfg)
}

/// One TLS connection to the CA with `cfg`: the handshake, then the HTTP/2 preface, then the
/// first bytes of the CA's answer (its SETTINGS, which it writes after any session ticket, so
/// by then the client has stored the ticket if one came). Returns how the handshake went.
async fn raw_connection(
    ca: &TestCa,
    cfg: Arc<rustls::ClientConfig>,
) -> (
    rustls::HandshakeKind,
    rustls::CipherSuite,
    rustls::NamedGroup,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: std::net::SocketAddr = ca.server().parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("the CA completes the handshake");
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut frame_header = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut frame_header))
        .await
        .expect("the CA answers the preface")
        .unwrap();
    let conn = tls.get_ref().1;
    (
        conn.handshake_kind().unwrap(),
        conn.negotiated_cipher_suite().unwrap().suite(),
        conn.negotiated_key_exchange_group().unwrap().name(),
    )
}

#[tokio::test]
async fn the_ca_picks_aes128_sha256_even_for_a_client_that_prefers_aes256() {
    let ca = TestCa::start().await;
    // ring's default order puts AES-256-GCM-SHA384 first, as most clients built on it do.
    let default = Arc::new(rustls::crypto::ring::default_provider());
    assert_eq!(
        default.cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        "this test needs a client that prefers another suite"
    );
    let (_, suite, _) = raw_connection(&ca, raw_config(&ca, default, None)).await;
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    // Lanyard's own provider offers the same order.
    let ours = lanyard::tls::provider();
    let (_, suite, group) = raw_connection(&ca, raw_config(&ca, ours.clone(), None)).await;
    assert_eq!(
        (suite, group),
        (
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::NamedGroup::X25519
        )
    );
    assert_eq!(
        ours.cipher_suites
            .iter()
            .filter(|s| s.tls13().is_some())
            .map(|s| s.suite())
            .collect::<Vec<_>>(),
        lanyard::tls::TLS13_SUITES.to_vec(),
        "the provider offers the explicit order"
    );
}

#[tokio::test]
async fn the_ca_sends_session_tickets_only_to_clients_that_ask_for_them() {
    use rustls::HandshakeKind::{Full, Resumed};
    let ca = TestCa::start().await;
    let provider = lanyard::tls::provider();
    // A client with a session store that does not send RFC 9149's ticket_request gets no
    // ticket, so its next connection is a full handshake.
    let silent = raw_config(&ca, provider.clone(), None);
    for _ in 0..2 {
        assert_eq!(raw_connection(&ca, silent.clone()).await.0, Full);
    }
    // Asking for none is the same.
    let none = raw_config(
        &ca,
        provider.clone(),
        Some(rustls::client::TicketRequest {
            new_session_count: 0,
            resumption_count: 0,
        }),
    );
    for _ in 0..2 {
        assert_eq!(raw_connection(&ca, none.clone()).await.0, Full);
    }
    // Asking as Lanyard's client does gets one ticket per connection: each next connection
    // resumes, and gets the ticket for the one after.
    let asking = raw_config(&ca, provider, Some(lanyard::tls::CA_TICKET_REQUEST));
    let kinds = [
        raw_connection(&ca, asking.clone()).await.0,
        raw_connection(&ca, asking.clone()).await.0,
        raw_connection(&ca, asking).await.0,
    ];
    assert_eq!(kinds, [Full, Resumed, Resumed]);
}
