//! The CA core (issue 2) against the real server over real sockets: what a certificate looks
//! like, default and capped lifetimes, renewal, the public endpoints (bundle, health,
//! reflection), and every bad input the issue lists. Each refusal is checked for its gRPC code,
//! a meaningful part of its message, a `denied` audit event where the CA records one, and the
//! absence of partial state (the token still works afterwards, the server still serves).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::time::Duration;

use common::{POLICY, TestCa};
use lanyard::ca::RolesOid;
use lanyard::client::{Credential, connect, csr_for};
use lanyard::pb::v1::{
    self as pb, admin_client::AdminClient, audit_client::AuditClient, ca_client::CaClient,
};
use lanyard::spiffe::SpiffeId;
use lanyard::tls::{ServerTrust, unix_now, unix_time, verify_svid};
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;
use tonic::{Code, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const API: &str = "spiffe://example.org/ns/prod/api";
const ROLES_OID: &str = "1.3.9999.7781.1";

// --- helpers ---------------------------------------------------------------------------------

/// Asserts `r` failed with `code` and a message containing `needle`; returns the status.
#[track_caller]
fn assert_status<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, needle: &str) -> Status {
    match r {
        Ok(v) => panic!("expected {code:?} containing {needle:?}, got success: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {:?}", s.message());
            assert!(
                s.message().contains(needle),
                "{code:?} message {:?} does not contain {needle:?}",
                s.message()
            );
            s
        }
    }
}

/// A CSR for `params` signed by a fresh P-256 key.
fn csr_from(params: &CertificateParams) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    (key, csr)
}

/// CSR params with an empty subject and these SANs.
fn params_with_sans(sans: Vec<SanType>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_string().try_into().unwrap())
}

/// A well-formed CSR for `id`.
fn good_csr(id: &str) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let csr = csr_for(&SpiffeId::parse(id).unwrap(), &key).unwrap();
    (key, csr)
}

/// Every audit event of `kind`, read through Audit.Subscribe (admin credential, no follow).
async fn audit_events(ca: &TestCa, kind: &str) -> Vec<pb::AuditEvent> {
    let mut client = AuditClient::new(ca.admin_channel().await);
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            from_seq: 1,
            follow: false,
            kinds: vec![kind.to_string()],
            spiffe_id: String::new(),
        })
        .await
        .expect("audit subscribe")
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = stream.message().await.expect("audit stream") {
        assert_eq!(ev.kind, kind, "the kind filter leaked another kind");
        out.push(ev);
    }
    out
}

/// Asserts the audit log holds a `denied` event whose reason contains `needle`.
async fn assert_denied_audited(ca: &TestCa, needle: &str) {
    let denied = audit_events(ca, "denied").await;
    assert!(
        denied.iter().any(|e| e.reason.contains(needle)),
        "no denied audit event mentions {needle:?}; denied reasons: {:?}",
        denied.iter().map(|e| &e.reason).collect::<Vec<_>>()
    );
}

/// Sends `csr` with a fresh token for API, expects InvalidArgument mentioning `needle`, then
/// checks the refusal was audited and left the token unused (a good CSR still gets a cert).
async fn assert_bad_csr(csr: Vec<u8>, needle: &str) {
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 600, 1).await;
    assert_status(
        ca.issue_csr(&token, csr, 60).await,
        Code::InvalidArgument,
        needle,
    );
    assert_denied_audited(&ca, needle).await;
    assert!(
        audit_events(&ca, "issued").await.is_empty(),
        "a refused CSR produced an issued event"
    );
    let (_, resp) = ca
        .issue(&token, API, 60)
        .await
        .expect("the token survives a refused CSR");
    assert_eq!(resp.spiffe_id, API);
}

/// The expected roles extension value: DER SEQUENCE OF UTF8String, written out by hand.
fn roles_der(sorted: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    for r in sorted {
        body.push(0x0c);
        body.push(u8::try_from(r.len()).unwrap());
        body.extend_from_slice(r.as_bytes());
    }
    let mut out = vec![0x30, u8::try_from(body.len()).unwrap()];
    out.extend(body);
    out
}

fn issue_req(csr: Vec<u8>, token: &str, ttl: u32, roles: &[&str]) -> pb::IssueRequest {
    pb::IssueRequest {
        csr,
        join_token: token.to_string(),
        jwt: String::new(),
        ttl_seconds: ttl,
        roles: roles.iter().map(|r| r.to_string()).collect(),
    }
}

/// Adds a rule to the default test policy.
fn policy_plus(extra_rule: &str) -> String {
    format!("{POLICY}\n{extra_rule}\n")
}

/// Rewrites the config file's policy and waits until the server has reloaded it (a new
/// `policy_reloaded` event with a rule count, not a rejection).
async fn replace_policy(ca: &TestCa, policy: &str) {
    let before = audit_events(ca, "policy_reloaded").await.len();
    let text = format!(
        "trust_domain = \"example.org\"\nlisten = \"127.0.0.1:0\"\nmin_ttl = \"1s\"\n\n{policy}"
    );
    // Keep the mtime visibly different from the previous write even on coarse filesystems.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&ca.config_path, text).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reloads = audit_events(ca, "policy_reloaded").await;
        if reloads.len() > before {
            let last = reloads.last().unwrap();
            assert!(
                !last.reason.contains("rejected"),
                "policy reload was rejected: {}",
                last.reason
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not reload the policy within 10s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- happy paths -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn token_issue_produces_a_conforming_svid() {
    let ca = TestCa::start().await;
    // Roles deliberately unsorted and duplicated: the certificate must sort and de-duplicate.
    let token = ca
        .token(API, &["deploy", "db-read", "deploy"], 600, 1)
        .await;
    let (key, csr) = good_csr(API);
    let t0 = unix_now();
    let resp = CaClient::new(ca.anon_channel().await)
        .issue(issue_req(csr, &token, 120, &[]))
        .await
        .expect("issue")
        .into_inner();
    let t1 = unix_now();

    assert_eq!(resp.cert_chain.len(), 1, "a root-signed leaf comes alone");
    let leaf_der = &resp.cert_chain[0];
    let (rest, cert) = X509Certificate::from_der(leaf_der).unwrap();
    assert!(rest.is_empty());

    // Exactly one SAN, a URI, the SPIFFE ID.
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .expect("SAN present");
    assert_eq!(
        san.value.general_names.len(),
        1,
        "exactly one SAN: {:?}",
        san.value.general_names
    );
    assert!(matches!(san.value.general_names[0], GeneralName::URI(u) if u == API));
    // CA=false, present.
    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca);
    // keyUsage: digitalSignature only, critical.
    let ku = cert.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical, "keyUsage must be critical");
    assert!(ku.value.digital_signature());
    assert_eq!(ku.value.flags, 1, "only digitalSignature");
    // EKU: serverAuth + clientAuth, nothing else.
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!eku.value.any && !eku.value.code_signing && !eku.value.email_protection);
    assert!(eku.value.other.is_empty());
    // Serial: 0x01 then 128 random bits.
    let serial = cert.raw_serial();
    assert_eq!(serial.len(), 17, "serial {serial:02x?}");
    assert_eq!(serial[0], 0x01);
    assert_eq!(
        resp.serial,
        serial
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    // Roles extension: non-critical, sorted, de-duplicated SEQUENCE OF UTF8String.
    let roles_ext: Vec<_> = cert
        .extensions()
        .iter()
        .filter(|e| e.oid.to_id_string() == ROLES_OID)
        .collect();
    assert_eq!(roles_ext.len(), 1);
    assert!(
        !roles_ext[0].critical,
        "roles extension must be non-critical"
    );
    assert_eq!(
        roles_ext[0].value,
        roles_der(&["db-read", "deploy"]).as_slice()
    );
    assert_eq!(resp.roles, vec!["db-read", "deploy"]);
    // Validity: now - 30 s .. now + ttl.
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    assert!(
        (t0 - 30..=t1 - 30).contains(&nb),
        "notBefore {nb} not in [{}, {}]",
        t0 - 30,
        t1 - 30
    );
    assert!(
        (t0 + 120..=t1 + 120).contains(&na),
        "notAfter {na} not in [{}, {}]",
        t0 + 120,
        t1 + 120
    );
    assert_eq!((resp.not_before, resp.not_after), (nb, na));
    // Only the CSR's key made it in, and the chain verifies for both usages.
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    let chain = [CertificateDer::from(leaf_der.clone())];
    let bundle = ca.bundle();
    assert_eq!(
        resp.trust_bundle,
        bundle
            .certs()
            .iter()
            .map(|c| c.to_vec())
            .collect::<Vec<_>>()
    );
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        let svid = verify_svid(
            &chain,
            &bundle,
            unix_time(unix_now()),
            usage,
            &RolesOid::default(),
        )
        .expect("verifies");
        assert_eq!(svid.spiffe_id.as_str(), API);
    }
    // The issuance is audited with the token as actor.
    let issued = audit_events(&ca, "issued").await;
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].subject, API);
    assert_eq!(issued[0].serial, resp.serial);
    assert!(
        issued[0].actor.starts_with("token:"),
        "actor {}",
        issued[0].actor
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_but_key_and_id_is_copied_from_the_csr() {
    let ca = TestCa::start().await;
    let token = ca.token(API, &[], 600, 1).await;
    let mut p = params_with_sans(vec![uri(API)]);
    p.distinguished_name
        .push(DnType::CommonName, "attacker-chosen");
    p.distinguished_name
        .push(DnType::OrganizationName, "Evil Corp");
    // Leaf usages are ignored (CA usages are refused: tests/hostile/requests.rs).
    p.key_usages = vec![
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::DataEncipherment,
    ];
    let (key, csr) = csr_from(&p);
    let resp = ca.issue_csr(&token, csr, 60).await.expect("issues");
    let (_, cert) = X509Certificate::from_der(&resp.cert_chain[0]).unwrap();
    assert_eq!(
        cert.subject().iter().count(),
        0,
        "subject copied from the CSR: {}",
        cert.subject()
    );
    assert_eq!(
        cert.key_usage().unwrap().unwrap().value.flags,
        1,
        "key usages copied from the CSR"
    );
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    // No roles: the extension is omitted entirely.
    assert!(resp.roles.is_empty());
    assert!(
        !cert
            .extensions()
            .iter()
            .any(|e| e.oid.to_id_string() == ROLES_OID)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn default_ttl_is_five_minutes_capped_by_policy_and_token() {
    let ca = TestCa::start_with(
        "",
        &policy_plus("[[policy]]\nspiffe_id = \"spiffe://example.org/short/*\"\nroles = []\nmax_ttl = \"90s\"\n"),
    )
    .await;
    let life = |r: &pb::IssueResponse| r.not_after - r.not_before - 30;

    // Policy max 10m, no ttl asked: the 5 minute default.
    let token = ca.token(API, &[], 0, 1).await;
    let (_, r) = ca.issue(&token, API, 0).await.unwrap();
    assert_eq!(life(&r), 300);

    // Policy max 90s: the default is capped to it.
    let short = "spiffe://example.org/short/job";
    let token = ca.token(short, &[], 0, 1).await;
    let (_, r) = ca.issue(&token, short, 0).await.unwrap();
    assert_eq!(life(&r), 90);

    // A token max of 2m under a 10m policy caps the default too.
    let token = ca.token(API, &[], 120, 1).await;
    let (_, r) = ca.issue(&token, API, 0).await.unwrap();
    assert_eq!(life(&r), 120);
}

#[tokio::test(flavor = "multi_thread")]
async fn requested_ttl_below_the_max_is_honored() {
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    let (_, r) = ca.issue(&token, API, 45).await.unwrap();
    assert_eq!(r.not_after - r.not_before, 45 + 30);
    // Exactly the maximum is allowed too.
    let token = ca.token(API, &["db-read"], 0, 1).await;
    let (_, r) = ca.issue(&token, API, 600).await.unwrap();
    assert_eq!(r.not_after - r.not_before, 600 + 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_keeps_the_id_rotates_the_key_and_reevaluates_roles() {
    let ca = TestCa::start().await;
    let dir = ca.enroll("api", API, &["db-read", "deploy"], 60).await;
    let first = Credential::load(&dir, &RolesOid::default()).unwrap();
    assert_eq!(first.svid.roles, vec!["db-read", "deploy"]);

    // Renewal while policy is unchanged keeps both roles, with a new key and serial.
    let r1 = ca.renew(&dir, 60).await.expect("renews");
    let second = Credential::load(&dir, &RolesOid::default()).unwrap();
    assert_eq!(r1.spiffe_id, API);
    assert_eq!(r1.roles, vec!["db-read", "deploy"]);
    assert_ne!(second.svid.serial, first.svid.serial);
    let spki = |c: &Credential| {
        X509Certificate::from_der(&c.chain[0])
            .unwrap()
            .1
            .public_key()
            .raw
            .to_vec()
    };
    assert_ne!(spki(&second), spki(&first), "renewal must use the new key");

    // Policy drops `deploy`; the next renewal must not carry it.
    let narrowed = POLICY.replace("roles = [\"db-read\", \"deploy\"]", "roles = [\"db-read\"]");
    assert_ne!(
        narrowed, POLICY,
        "test policy changed shape; update this test"
    );
    replace_policy(&ca, &narrowed).await;
    let r2 = ca
        .renew(&dir, 60)
        .await
        .expect("renews after the policy change");
    assert_eq!(r2.spiffe_id, API);
    assert_eq!(r2.roles, vec!["db-read"]);
    let third = Credential::load(&dir, &RolesOid::default()).unwrap();
    assert_eq!(
        third.svid.roles,
        vec!["db-read"],
        "the certificate itself lost the role"
    );
    assert_ne!(spki(&third), spki(&second));

    // Asking for the dropped role explicitly is refused by policy.
    let key = KeyPair::generate().unwrap();
    let csr = csr_for(&third.svid.spiffe_id, &key).unwrap();
    let res = CaClient::new(ca.channel_as(&dir).await)
        .issue(issue_req(csr, "", 60, &["deploy"]))
        .await;
    assert_status(
        res,
        Code::PermissionDenied,
        "role \"deploy\" is not allowed",
    );

    let renewed = audit_events(&ca, "renewed").await;
    assert_eq!(renewed.len(), 2);
    assert_eq!(renewed[1].roles, vec!["db-read"]);
    assert_eq!(renewed[1].actor, API);
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_cannot_change_the_identity() {
    let ca = TestCa::start().await;
    let dir = ca.enroll("api", API, &["db-read"], 60).await;
    let (_, csr) = good_csr("spiffe://example.org/ns/prod/other");
    let res = CaClient::new(ca.channel_as(&dir).await)
        .issue(issue_req(csr, "", 60, &[]))
        .await;
    assert_status(
        res,
        Code::PermissionDenied,
        "renewal must keep the identity",
    );
    assert_denied_audited(&ca, "renewal must keep the identity").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_bundle_needs_no_credentials() {
    let ca = TestCa::start().await;
    let ca_pem = std::fs::read(ca.data_dir().join("ca/ca.pem")).unwrap();
    let root = rustls_pki_types::pem::PemObject::pem_slice_iter(&ca_pem)
        .collect::<Result<Vec<CertificateDer<'static>>, _>>()
        .unwrap();
    // Trust via the CA fingerprint only (what a join-token holder has), and no client cert.
    let token = ca.token(API, &[], 0, 1).await;
    let fp = lanyard::tokens::JoinToken::parse(&token)
        .unwrap()
        .ca_fingerprint;
    let channel = connect(
        &ca.server(),
        ServerTrust::Fingerprint(fp),
        None,
        RolesOid::default(),
    )
    .await
    .expect("connects with the token's fingerprint");
    let b = CaClient::new(channel)
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .expect("bundle")
        .into_inner();
    assert_eq!(b.trust_domain, "example.org");
    assert_eq!(
        b.ca_certs,
        root.iter().map(|c| c.to_vec()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_lanyard_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let ca = TestCa::start().await;
    let mut client = ServerReflectionClient::new(ca.anon_channel().await);
    let requests = tokio_stream::iter(vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("lanyard.v1.Ca".into())),
        },
    ]);
    let mut stream = client
        .server_reflection_info(requests)
        .await
        .expect("reflection served")
        .into_inner();

    let first = stream.message().await.unwrap().expect("list response");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("unexpected reflection answer: {:?}", first.message_response);
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "lanyard.v1.Ca",
        "lanyard.v1.Admin",
        "lanyard.v1.Audit",
        "lanyard.v1.Revocation",
    ] {
        assert!(
            names.contains(&want),
            "reflection lists {names:?}, missing {want}"
        );
    }

    let second = stream.message().await.unwrap().expect("file response");
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!(
            "unexpected reflection answer: {:?}",
            second.message_response
        );
    };
    assert!(!files.file_descriptor_proto.is_empty());
    let text = String::from_utf8_lossy(&files.file_descriptor_proto[0]).to_string();
    assert!(
        text.contains("lanyard/v1/ca.proto") && text.contains("Issue"),
        "descriptor: {text:?}"
    );
}

// --- bad CSRs --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn garbage_csr_is_invalid_argument() {
    assert_bad_csr(
        b"this is not a certificate signing request".to_vec(),
        "not a DER-encoded PKCS#10",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_csr_is_invalid_argument() {
    assert_bad_csr(Vec::new(), "CSR is empty").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_with_tampered_signature_is_invalid_argument() {
    let (_, mut csr) = good_csr(API);
    // The signature BIT STRING is last; its final byte is the low byte of ECDSA's `s`.
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    assert_bad_csr(csr, "signature does not verify").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_with_swapped_public_key_is_invalid_argument() {
    let (key, mut csr) = good_csr(API);
    let mine = key.subject_public_key_info();
    let other = KeyPair::generate().unwrap().subject_public_key_info();
    assert_eq!(mine.len(), other.len());
    let at = csr
        .windows(mine.len())
        .position(|w| w == mine.as_slice())
        .expect("SPKI inside the CSR");
    csr[at..at + mine.len()].copy_from_slice(&other);
    assert_bad_csr(csr, "signature does not verify").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_without_uri_san_is_invalid_argument() {
    let (_, csr) = csr_from(&params_with_sans(vec![]));
    assert_bad_csr(csr, "CSR has no URI SAN").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_with_two_uri_sans_is_invalid_argument() {
    let (_, csr) = csr_from(&params_with_sans(vec![
        uri(API),
        uri("spiffe://example.org/ns/prod/other"),
    ]));
    assert_bad_csr(csr, "CSR has 2 URI SANs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_with_email_san_is_invalid_argument() {
    // DNS and IP SANs are policy's to allow (tests/names.rs); other kinds are never issued.
    let email = SanType::Rfc822Name("api@example.org".try_into().unwrap());
    let (_, csr) = csr_from(&params_with_sans(vec![uri(API), email]));
    assert_bad_csr(csr, "email SAN").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_with_non_spiffe_uri_is_invalid_argument() {
    let (_, csr) = csr_from(&params_with_sans(vec![uri(
        "https://example.org/ns/prod/api",
    )]));
    assert_bad_csr(csr, "must start with spiffe://").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_for_another_trust_domain_is_invalid_argument() {
    let (_, csr) = csr_from(&params_with_sans(vec![uri(
        "spiffe://other.org/ns/prod/api",
    )]));
    assert_bad_csr(csr, "outside this CA's trust domain example.org").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_asking_for_ca_is_invalid_argument() {
    // rcgen refuses is_ca in a CSR, so request basicConstraints {cA TRUE} as a raw extension.
    let mut p = params_with_sans(vec![uri(API)]);
    let mut bc =
        CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    bc.set_criticality(true);
    p.custom_extensions = vec![bc];
    let (_, csr) = csr_from(&p);
    assert_bad_csr(csr, "CSR asks for CA=true").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_csr_below_the_message_limit_is_invalid_argument() {
    // 16 KiB: under the 64 KiB gRPC limit, over the 8 KiB CSR limit.
    assert_bad_csr(vec![0x30; 16 * 1024], "the limit is 8192").await;
}

// --- ttl and roles ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn ttl_above_policy_is_permission_denied() {
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    let (_, csr) = good_csr(API);
    assert_status(
        ca.issue_csr(&token, csr, 601).await,
        Code::PermissionDenied,
        "ttl 601s is above the maximum of 600s",
    );
    assert_denied_audited(&ca, "above the maximum of 600s").await;
    // A token's own max_ttl is a ceiling too.
    let small = ca.token(API, &["db-read"], 60, 1).await;
    let (_, csr) = good_csr(API);
    assert_status(
        ca.issue_csr(&small, csr, 61).await,
        Code::PermissionDenied,
        "above the maximum of 60s",
    );
    // Neither refusal consumed its token.
    ca.issue(&token, API, 600)
        .await
        .expect("token still usable");
    ca.issue(&small, API, 60).await.expect("token still usable");
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_below_the_floor_is_invalid_argument() {
    let ca = TestCa::start_with_full_config(&format!(
        "trust_domain = \"example.org\"\nmin_ttl = \"30s\"\n{POLICY}"
    ))
    .await;
    assert_eq!(ca.settings.min_ttl, Duration::from_secs(30));
    let token = ca.token(API, &[], 0, 1).await;
    let (_, csr) = good_csr(API);
    assert_status(
        ca.issue_csr(&token, csr, 10).await,
        Code::InvalidArgument,
        "ttl 10s is below the minimum of 30s",
    );
    assert_denied_audited(&ca, "below the minimum of 30s").await;
    let (_, r) = ca
        .issue(&token, API, 30)
        .await
        .expect("the floor itself is fine");
    assert_eq!(r.not_after - r.not_before, 60);
}

#[tokio::test(flavor = "multi_thread")]
async fn role_not_allowed_by_the_token_is_permission_denied() {
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    let (_, csr) = good_csr(API);
    let res = CaClient::new(ca.anon_channel().await)
        .issue(issue_req(csr, &token, 60, &["deploy"]))
        .await;
    assert_status(
        res,
        Code::PermissionDenied,
        "role \"deploy\" is not allowed for spiffe://example.org/ns/prod/api",
    );
    // Unknown role, not in any policy.
    let (_, csr) = good_csr(API);
    let res = CaClient::new(ca.anon_channel().await)
        .issue(issue_req(csr, &token, 60, &["root"]))
        .await;
    assert_status(res, Code::PermissionDenied, "role \"root\" is not allowed");
    // A privileged role is no different.
    let (_, csr) = good_csr(API);
    let res = CaClient::new(ca.anon_channel().await)
        .issue(issue_req(csr, &token, 60, &["lanyard:admin"]))
        .await;
    assert_status(
        res,
        Code::PermissionDenied,
        "role \"lanyard:admin\" is not allowed",
    );
    // A malformed role name is a bad request.
    let (_, csr) = good_csr(API);
    let res = CaClient::new(ca.anon_channel().await)
        .issue(issue_req(csr, &token, 60, &["Not A Role"]))
        .await;
    assert_status(res, Code::InvalidArgument, "not a valid role name");
    assert_denied_audited(&ca, "role \"root\" is not allowed").await;
    // The token is intact and grants exactly what it allows.
    let (_, csr) = good_csr(API);
    let ok = CaClient::new(ca.anon_channel().await)
        .issue(issue_req(csr, &token, 60, &["db-read"]))
        .await
        .expect("allowed role issues")
        .into_inner();
    assert_eq!(ok.roles, vec!["db-read"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_cannot_promise_more_than_policy() {
    let ca = TestCa::start().await;
    assert_status(
        ca.try_token(API, &["root"], 0, 0, 1).await,
        Code::PermissionDenied,
        "role \"root\" is not allowed for spiffe://example.org/ns/prod/api by policy",
    );
    assert_status(
        ca.try_token(API, &["db-read"], 601, 0, 1).await,
        Code::PermissionDenied,
        "above the policy maximum of 600s",
    );
    assert_status(
        ca.try_token(API, &["Bad Role"], 0, 0, 1).await,
        Code::InvalidArgument,
        "not a valid role name",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_for_an_id_outside_policy_is_refused_at_creation() {
    let ca = TestCa::start().await;
    assert_status(
        ca.try_token("spiffe://example.org/nowhere/x", &[], 0, 0, 1)
            .await,
        Code::PermissionDenied,
        "no policy rule allows spiffe://example.org/nowhere/x",
    );
    assert_status(
        ca.try_token("spiffe://example.org/nowhere/*", &[], 0, 0, 1)
            .await,
        Code::PermissionDenied,
        "no policy rule allows",
    );
    assert_status(
        ca.try_token("spiffe://other.org/ns/prod/api", &[], 0, 0, 1)
            .await,
        Code::InvalidArgument,
        "outside trust domain example.org",
    );
    assert_status(
        ca.try_token(
            "spiffe://example.org/lanyard/admin",
            &["lanyard:admin"],
            0,
            0,
            1,
        )
        .await,
        Code::InvalidArgument,
        "reserved",
    );
    assert_status(
        ca.try_token("not-a-spiffe-id", &[], 0, 0, 1).await,
        Code::InvalidArgument,
        "spiffe://",
    );
    assert!(
        audit_events(&ca, "token_created").await.is_empty(),
        "a refused token was recorded as created"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_calls_need_the_admin_role() {
    let ca = TestCa::start().await;
    let dir = ca.enroll("api", API, &["db-read", "deploy"], 60).await;
    let req = pb::CreateJoinTokenRequest {
        spiffe_id: API.into(),
        roles: vec![],
        max_ttl_seconds: 0,
        expires_in_seconds: 0,
        uses: 1,
    };
    let res = AdminClient::new(ca.channel_as(&dir).await)
        .create_join_token(req.clone())
        .await;
    assert_status(
        res,
        Code::PermissionDenied,
        "lacks the role this call needs",
    );
    let res = AdminClient::new(ca.anon_channel().await)
        .create_join_token(req)
        .await;
    assert_status(res, Code::Unauthenticated, "none was presented");
}

// --- tokens ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn expired_token_is_unauthenticated() {
    let ca = TestCa::start().await;
    let token = ca.try_token(API, &[], 0, 1, 1).await.expect("token");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, csr) = good_csr(API);
    assert_status(
        ca.issue_csr(&token, csr, 60).await,
        Code::Unauthenticated,
        "expired",
    );
    assert_denied_audited(&ca, "expired").await;
    assert!(audit_events(&ca, "issued").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn reused_token_is_failed_precondition() {
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    ca.issue(&token, API, 60).await.expect("first use");
    let s = assert_status(
        ca.issue(&token, API, 60).await,
        Code::FailedPrecondition,
        "already used",
    );
    let id = lanyard::tokens::JoinToken::parse(&token).unwrap().id;
    assert!(
        s.message().contains(&id),
        "the message names the token id: {}",
        s.message()
    );
    assert_denied_audited(&ca, "already used").await;
    assert_eq!(audit_events(&ca, "issued").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_use_token_allows_exactly_its_uses() {
    let ca = TestCa::start().await;
    let token = ca
        .token("spiffe://example.org/ns/prod/*", &["db-read"], 0, 2)
        .await;
    ca.issue(&token, "spiffe://example.org/ns/prod/a", 60)
        .await
        .expect("use 1");
    ca.issue(&token, "spiffe://example.org/ns/prod/b", 60)
        .await
        .expect("use 2");
    assert_status(
        ca.issue(&token, "spiffe://example.org/ns/prod/c", 60).await,
        Code::FailedPrecondition,
        "already used",
    );
    // A prefix token cannot be used outside its prefix.
    let token = ca.token("spiffe://example.org/ns/prod/*", &[], 0, 1).await;
    assert_status(
        ca.issue(&token, "spiffe://example.org/ns/dev/a", 60).await,
        Code::PermissionDenied,
        "is for spiffe://example.org/ns/prod/*",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_token_is_unauthenticated() {
    use base64::Engine;
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    // Same id, fingerprint and ID; a random secret.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    assert_eq!(parts.len(), 5);
    parts[2] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let forged = parts.join(".");
    assert_status(
        ca.issue(&forged, API, 60).await,
        Code::Unauthenticated,
        "not valid (unknown, expired or forged)",
    );
    // A well-formed token the server never minted.
    let mut unknown = parts.clone();
    unknown[1] = "0123456789abcdef".into();
    assert_status(
        ca.issue(&unknown.join("."), API, 60).await,
        Code::Unauthenticated,
        "not valid (unknown, expired or forged)",
    );
    assert_denied_audited(&ca, "unknown, expired or forged").await;
    // The forgery did not burn the real token.
    ca.issue(&token, API, 60)
        .await
        .expect("the real token still works");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_token_is_unauthenticated() {
    let ca = TestCa::start().await;
    for bad in [
        "garbage",
        "lanyard1.x.y.z.w",
        "lanyard1....",
        &"A".repeat(4000),
    ] {
        assert_status(
            ca.issue(bad, API, 60).await,
            Code::Unauthenticated,
            "join token is malformed",
        );
    }
    assert_denied_audited(&ca, "join token is malformed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_uses_of_one_token_have_exactly_one_winner() {
    const N: usize = 10;
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    let channel = ca.anon_channel().await;
    // Build every CSR first so the requests race as closely as possible.
    let csrs: Vec<Vec<u8>> = (0..N).map(|_| good_csr(API).1).collect();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = csrs
        .into_iter()
        .map(|csr| {
            let mut client = CaClient::new(channel.clone());
            let token = token.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                client
                    .issue(issue_req(csr, &token, 60, &[]))
                    .await
                    .map(|r| r.into_inner())
            })
        })
        .collect();
    let mut won = Vec::new();
    let mut lost = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => won.push(r),
            Err(s) => lost.push(s),
        }
    }
    assert_eq!(won.len(), 1, "exactly one winner; losers: {lost:?}");
    for s in &lost {
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("already used"), "{s:?}");
    }
    let issued = audit_events(&ca, "issued").await;
    assert_eq!(issued.len(), 1, "one issued event");
    assert_eq!(issued[0].serial, won[0].serial);
    assert_eq!(
        audit_events(&ca, "denied")
            .await
            .iter()
            .filter(|e| e.reason.contains("already used"))
            .count(),
        N - 1
    );
}

// --- renewal ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn renewal_beyond_the_grace_is_unauthenticated() {
    let ca = TestCa::start_with("renewal_grace = \"2s\"", POLICY).await;
    let dir = ca.enroll("api", API, &["db-read"], 2).await;
    let cred = Credential::load(&dir, &RolesOid::default()).unwrap();
    // Wait until the cert has been expired for longer than the grace.
    while unix_now() <= cred.svid.not_after + 3 {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let s = assert_status(
        ca.renew(&dir, 60).await,
        Code::Unauthenticated,
        "beyond the renewal grace of 2s",
    );
    assert!(
        s.message().contains("join token"),
        "the message says how to recover: {}",
        s.message()
    );
    assert_denied_audited(&ca, "beyond the renewal grace").await;
    assert!(audit_events(&ca, "renewed").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_within_the_grace_succeeds() {
    let ca = TestCa::start_with("renewal_grace = \"60s\"", POLICY).await;
    let dir = ca.enroll("api", API, &["db-read"], 2).await;
    let old = Credential::load(&dir, &RolesOid::default()).unwrap();
    while unix_now() <= old.svid.not_after + 1 {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = ca
        .renew(&dir, 60)
        .await
        .expect("an expired cert within the grace renews");
    assert_eq!(r.spiffe_id, API);
    assert_eq!(r.roles, vec!["db-read"]);
    assert!(r.not_after > unix_now() + 50);
    let new = Credential::load(&dir, &RolesOid::default()).unwrap();
    assert_ne!(new.svid.serial, old.svid.serial);
    // The fresh cert is a normal, unexpired credential again.
    verify_svid(
        &new.chain,
        &ca.bundle(),
        unix_time(unix_now()),
        webpki::KeyUsage::client_auth(),
        &RolesOid::default(),
    )
    .expect("renewed cert verifies");
    // Grace does not extend to other calls: the expired cert cannot read the audit log etc.
    let mut audit = AuditClient::new(connect_presenting(&ca, &old).await);
    let res = audit
        .subscribe(pb::SubscribeRequest {
            from_seq: 1,
            follow: false,
            kinds: vec![],
            spiffe_id: String::new(),
        })
        .await;
    assert_status(res.map(|_| ()), Code::Unauthenticated, "expired");
}

/// A channel to `ca` (trusting its bundle) that presents `cred` as the client certificate.
async fn connect_presenting(ca: &TestCa, cred: &Credential) -> tonic::transport::Channel {
    connect(
        &ca.server(),
        ServerTrust::Bundle(ca.bundle()),
        Some(cred.slot().unwrap()),
        RolesOid::default(),
    )
    .await
    .expect("connect")
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_with_a_cert_from_another_ca_is_refused() {
    let ca = TestCa::start().await;
    let rogue = TestCa::start().await;
    // The rogue CA has the same trust domain and issues the very same SPIFFE ID.
    let mine = ca.enroll("api", API, &["db-read"], 60).await;
    let theirs = rogue.enroll("api", API, &["db-read", "deploy"], 60).await;
    let cred = Credential::load(&theirs, &RolesOid::default()).unwrap();
    let key = KeyPair::generate().unwrap();
    let csr = csr_for(&cred.svid.spiffe_id, &key).unwrap();
    let mut client = CaClient::new(connect_presenting(&ca, &cred).await);
    let res = client.issue(issue_req(csr, "", 60, &[])).await;
    // The CA defers client-cert checks to the handler, so this is a status, not a TLS alert.
    // Both CAs are named "Lanyard CA example.org", so webpki finds a name match and then fails
    // the signature check; either way the chain is refused.
    assert_status(res, Code::Unauthenticated, "client certificate rejected");
    assert_denied_audited(&ca, "client certificate rejected").await;
    assert!(audit_events(&ca, "renewed").await.is_empty());
    // Neither the same connection nor the server is wedged.
    let b = client
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .expect("same channel still serves");
    assert_eq!(b.into_inner().trust_domain, "example.org");
    ca.renew(&mine, 60)
        .await
        .expect("the CA's own workloads still renew");
    // And the rogue's admin credential is no admin here.
    let rogue_admin = Credential::load(&rogue.admin_dir(), &RolesOid::default()).unwrap();
    let res = AdminClient::new(connect_presenting(&ca, &rogue_admin).await)
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: API.into(),
            roles: vec![],
            max_ttl_seconds: 0,
            expires_in_seconds: 0,
            uses: 1,
        })
        .await;
    assert_status(res, Code::Unauthenticated, "client certificate rejected");
}

#[tokio::test(flavor = "multi_thread")]
async fn renewal_without_cert_or_token_is_unauthenticated() {
    let ca = TestCa::start().await;
    let (_, csr) = good_csr(API);
    let res = CaClient::new(ca.anon_channel().await)
        .issue(issue_req(csr, "", 60, &[]))
        .await;
    assert_status(
        res,
        Code::Unauthenticated,
        "needs a Lanyard client certificate",
    );
    assert_denied_audited(&ca, "needs a Lanyard client certificate").await;
    assert!(audit_events(&ca, "renewed").await.is_empty());
    assert!(audit_events(&ca, "issued").await.is_empty());
}

// --- limits ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn ten_megabyte_request_is_refused_and_the_server_survives() {
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    let channel = ca.anon_channel().await;
    let mut client = CaClient::new(channel.clone());
    let started = std::time::Instant::now();
    let res = client
        .issue(issue_req(vec![0x30; 10 * 1024 * 1024], &token, 60, &[]))
        .await;
    let s = res.expect_err("a 10 MB request must be refused");
    assert!(
        s.code() == Code::ResourceExhausted,
        "expected ResourceExhausted, got {:?}: {}",
        s.code(),
        s.message()
    );
    assert!(
        s.message().contains("limited to 65536 bytes"),
        "{}",
        s.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusal took {:?}",
        started.elapsed()
    );
    // Nothing was consumed or issued; the same channel and a new one both still work.
    assert!(audit_events(&ca, "issued").await.is_empty());
    let (_, csr) = good_csr(API);
    let ok = client
        .issue(issue_req(csr, &token, 60, &[]))
        .await
        .expect("same channel, same token, still works");
    assert_eq!(ok.into_inner().roles, vec!["db-read"]);
    CaClient::new(ca.anon_channel().await)
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .expect("new channel works");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_over_its_refusal_budget_is_refused_unaudited_and_counted() {
    let ca = TestCa::start_with("denial_rate = 1\ndenial_burst = 3\n", POLICY).await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    let mut client = CaClient::new(ca.anon_channel().await);
    // CSRs made first, so the ten calls go out faster than the budget refills.
    let csrs: Vec<Vec<u8>> = (0..10).map(|_| good_csr(API).1).collect();
    let mut codes = Vec::new();
    for csr in csrs {
        let s = client
            .issue(issue_req(csr, "lanyard1.forged", 60, &[]))
            .await
            .expect_err("a forged token is refused");
        codes.push(s.code());
    }
    // The burst is audited one by one; the rest is refused at once (a refill of one token may
    // land in between on a slow machine).
    assert_eq!(&codes[..3], &[Code::Unauthenticated; 3], "{codes:?}");
    let exhausted = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert!(exhausted >= 6, "{codes:?}");
    // A good request from the same source waits for the budget too ...
    let (_, csr) = good_csr(API);
    let s = client
        .issue(issue_req(csr, &token, 60, &[]))
        .await
        .expect_err("still over budget");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains("too many refused requests"),
        "{}",
        s.message()
    );
    // ... and goes through once it refills; success costs no budget.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, csr) = good_csr(API);
    client
        .issue(issue_req(csr, &token, 60, &[]))
        .await
        .expect("served after a second");
    // Nothing went unrecorded: the requests refused unaudited are counted in summary events
    // (written every second).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let denied = audit_events(&ca, "denied").await;
        let individual = denied
            .iter()
            .filter(|e| e.reason.contains("join token"))
            .count() as u64;
        let summarised: u64 = denied
            .iter()
            .filter(|e| e.actor == "ip:127.0.0.1")
            .filter_map(|e| e.reason.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        if individual + summarised == 11 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "11 refused requests, {individual} audited and {summarised} summarised: {denied:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A multi-use token redeemed again for the identity it enrolled finds its own enrollment and
/// leaves it as it is; once another token has replaced that enrollment, redeeming the first
/// token again puts its own ceiling back (a renewal then gets exactly that ceiling's roles).
#[tokio::test(flavor = "multi_thread")]
async fn a_token_redeemed_again_keeps_or_restores_its_own_enrollment() {
    let ca = TestCa::start().await;
    let dir = ca.dir.path().join("api");
    let multi = ca.token(API, &["db-read"], 600, 5).await;
    for _ in 0..2 {
        let (key, resp) = ca.issue(&multi, API, 60).await.expect("issue");
        assert_eq!(resp.roles, vec!["db-read"]);
        common::write_response(&dir, &resp, &key);
        let renewed = ca.renew(&dir, 60).await.expect("renews");
        assert_eq!(renewed.roles, vec!["db-read"]);
    }
    // Another token for exactly this identity replaces the ceiling...
    let wider = ca.token(API, &["db-read", "deploy"], 600, 1).await;
    let (key, resp) = ca.issue(&wider, API, 60).await.expect("issue");
    assert_eq!(resp.roles, vec!["db-read", "deploy"]);
    common::write_response(&dir, &resp, &key);
    let renewed = ca.renew(&dir, 60).await.expect("renews");
    assert_eq!(renewed.roles, vec!["db-read", "deploy"]);
    // ...and the first token, redeemed again, writes its own back.
    let (key, resp) = ca.issue(&multi, API, 60).await.expect("issue");
    assert_eq!(resp.roles, vec!["db-read"]);
    common::write_response(&dir, &resp, &key);
    let renewed = ca.renew(&dir, 60).await.expect("renews");
    assert_eq!(renewed.roles, vec!["db-read"]);
    let log = ca.audit_log().await;
    let issued: Vec<&str> = log
        .iter()
        .filter(|e| e.kind == "issued" && e.subject == API)
        .map(|e| e.reason.as_str())
        .collect();
    assert_eq!(issued.len(), 4, "{issued:?}");
    assert!(!issued[1].contains("replaces"), "{}", issued[1]);
    assert!(
        issued[2].contains("replaces the enrollment"),
        "{}",
        issued[2]
    );
    assert!(
        issued[3].contains("replaces the enrollment")
            && issued[3].contains("roles [db-read,deploy]"),
        "{}",
        issued[3]
    );
}
