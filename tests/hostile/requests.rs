//! Hostile inputs: requests to the CA. Concurrent refusal floods, forged renewal certificates,
//! lockout of the admin API, prefix tokens aimed at existing identities, refused privileged
//! calls, CSRs asking for privileges, and inputs whose errors used to mislead. Each test checks
//! the exact status, that a normal client is still served, and that nothing changed beyond the
//! one `denied` event.

use std::sync::Arc;
use std::time::Duration;

use lanyard::audit::AuditLog;
use lanyard::ca::RolesOid;
use lanyard::client::{connect, csr_for};
use lanyard::pb::v1::{
    self as pb, access_client::AccessClient, admin_client::AdminClient, audit_client::AuditClient,
    ca_client::CaClient, revocation_client::RevocationClient,
};
use lanyard::revocation::Revocations;
use lanyard::spiffe::SpiffeId;
use lanyard::store::{AuditRecord, SledStore, Store};
use lanyard::tls::{CertSlot, ServerTrust};
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::Code;

use crate::common::{POLICY, TestCa, lanyard_cmd, poll_until};

const API: &str = "spiffe://example.org/ns/prod/api";
const AUDITOR: &str = "spiffe://example.org/ns/prod/auditor";
const ALICE: &str = "spiffe://example.org/ops/alice";
const ADMIN: &str = "spiffe://example.org/lanyard/admin";

fn csr(id: &str) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    csr_for(&SpiffeId::parse(id).unwrap(), &key).unwrap()
}

fn issue_req(csr: Vec<u8>, token: &str) -> pb::IssueRequest {
    pb::IssueRequest {
        csr,
        join_token: token.to_string(),
        jwt: String::new(),
        ttl_seconds: 60,
        roles: vec![],
    }
}

/// Events appended after `from` (a count of events), read as the admin. The admin shares its
/// source address with the attacks, so its read waits out a spent refusal budget.
async fn events_after(ca: &TestCa, from: usize) -> Vec<AuditRecord> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ca.try_audit_log().await {
            Ok(mut log) => return log.split_off(from),
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "budget never refilled"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => panic!("audit read refused: {s:?}"),
        }
    }
}

/// Asserts the log grew by exactly one `denied` event and returns it.
async fn one_denial_after(ca: &TestCa, from: usize) -> AuditRecord {
    let new = events_after(ca, from).await;
    assert_eq!(
        new.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        vec!["denied"],
        "exactly one denied event: {new:#?}"
    );
    new.into_iter().next().unwrap()
}

// === 3: the refusal budget holds under concurrency ===

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_refusals_cannot_exceed_the_budget() {
    let ca = TestCa::start_with("denial_rate = 1\ndenial_burst = 10\n", POLICY).await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    let before = ca.audit_log().await.len();
    let channel = ca.anon_channel().await;
    // CSRs first, so the 60 calls are all in flight within a fraction of the refill interval.
    let csrs: Vec<Vec<u8>> = (0..60).map(|_| csr(API)).collect();
    let calls = csrs.into_iter().map(|c| {
        let mut client = CaClient::new(channel.clone());
        async move { client.issue(issue_req(c, "lanyard1.forged")).await }
    });
    let codes: Vec<Code> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect_err("a forged token is refused").code())
        .collect();
    let refused_at_once = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    let audited_one_by_one = codes
        .iter()
        .filter(|c| **c == Code::Unauthenticated)
        .count();
    assert_eq!(refused_at_once + audited_one_by_one, 60, "{codes:?}");
    // The burst, plus at most a refill or two while the calls ran.
    assert!(
        (10..=12).contains(&audited_one_by_one),
        "60 concurrent refusals, {audited_one_by_one} processed: {codes:?}"
    );
    // Every request is on record: the processed ones one by one, the rest in per-source
    // summaries written every second. (Read once the budget has refilled, so the reads are not
    // refused and summarised themselves.)
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let new = events_after(&ca, before).await;
        let individual = new.iter().filter(|e| e.actor == "token:?").count();
        let summarised: u64 = new
            .iter()
            .filter(|e| e.actor == "ip:127.0.0.1")
            .filter_map(|e| e.reason.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(individual, audited_one_by_one, "{new:#?}");
        if individual as u64 + summarised == 60 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "60 refusals, {individual} audited, {summarised} summarised"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Once the budget refills, a normal client from the same source is served; nothing was
    // issued or consumed by the flood.
    let ok = CaClient::new(ca.anon_channel().await)
        .issue(issue_req(csr(API), &token))
        .await
        .expect("served once the budget refills")
        .into_inner();
    assert_eq!(ok.spiffe_id, API);
}

// === 4: a forged certificate's claim is not an actor ===

/// A self-signed certificate claiming `id`, as a client credential slot.
fn forged_slot(id: &str) -> Arc<CertSlot> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    let cert = params.self_signed(&key).unwrap();
    let slot = CertSlot::new();
    slot.set(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    slot
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_renewal_is_recorded_as_unauthenticated_with_the_claim_apart() {
    let ca = TestCa::start().await;
    let before = ca.audit_log().await.len();
    let channel = connect(
        &ca.server(),
        ServerTrust::Bundle(ca.bundle()),
        Some(forged_slot(ALICE)),
        RolesOid::default(),
    )
    .await
    .unwrap();
    let s = CaClient::new(channel)
        .issue(issue_req(csr(ALICE), ""))
        .await
        .expect_err("a self-signed certificate cannot renew");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let e = one_denial_after(&ca, before).await;
    assert_eq!(e.actor, "unauthenticated");
    assert_eq!(e.claimed, ALICE);
    assert_ne!(e.subject, ALICE, "the claim is not the subject either");
    // An auditor following alice sees nothing she did not do.
    let mut audit = AuditClient::new(ca.admin_channel().await);
    let mut stream = audit
        .subscribe(pb::SubscribeRequest {
            from_seq: 1,
            follow: false,
            kinds: vec![],
            spiffe_id: ALICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        stream.message().await.unwrap().is_none(),
        "no event is filed under alice"
    );
}

/// Waits until no task of this process holds the sled store under `data` (the server's and the
/// audit writer's tasks let go shortly after they stop), so another process may open it.
async fn wait_for_store_release(data: &std::path::Path) {
    let released = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        SledStore::open(&data.join("store")).ok().map(drop)
    })
    .await;
    assert!(released.is_some(), "store released");
}

// === 5: the admin API cannot be locked out; an old lockout can be recovered offline ===

#[tokio::test(flavor = "multi_thread")]
async fn reserved_identities_cannot_be_revoked_by_identity() {
    let ca = TestCa::start().await;
    let mut revocation = RevocationClient::new(ca.admin_channel().await);
    for id in [ADMIN, "spiffe://example.org/lanyard/server"] {
        let before = ca.audit_log().await.len();
        let s = revocation
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::SpiffeId(id.into())),
                reason: "lock everyone out".into(),
                lift: false,
            })
            .await
            .expect_err("a reserved identity is refused");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains("reserved"), "{}", s.message());
        let e = one_denial_after(&ca, before).await;
        assert_eq!(e.actor, ADMIN);
    }
    // The admin API still works, with a fresh connection too.
    AdminClient::new(ca.admin_channel().await)
        .get_ca_status(pb::GetCaStatusRequest {})
        .await
        .expect("admin still works");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_recover_lifts_an_old_lockout_on_a_stopped_server() {
    let ca = TestCa::start().await;
    let (dir, config) = ca.stop().await;
    let data = dir.path().join("data");
    wait_for_store_release(&data).await;
    // The lockout an older version let any admin cause: an identity rule on the admin ID.
    {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&data.join("store")).unwrap());
        let log = AuditLog::start(store.clone()).unwrap();
        let revocations =
            Revocations::new(log, Duration::from_secs(3600), Duration::from_secs(3600));
        revocations
            .revoke_identity(ADMIN, &SpiffeId::parse(ADMIN).unwrap(), "lockout")
            .await
            .unwrap();
        store.flush().unwrap();
    }
    wait_for_store_release(&data).await;
    let ca = TestCa::start_in(dir, config.clone()).await;
    let s = AdminClient::new(ca.admin_channel().await)
        .get_ca_status(pb::GetCaStatusRequest {})
        .await
        .expect_err("locked out");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");

    // Refused while the server runs: the store is in use.
    let out = lanyard_cmd()
        .args(["admin", "recover", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(ca.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (dir, config) = ca.stop().await;
    wait_for_store_release(&dir.path().join("data")).await;
    let out = lanyard_cmd()
        .args(["admin", "recover", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("lifted the identity rule on {ADMIN}")),
        "{stdout}"
    );
    assert!(stdout.contains("fresh admin credential"), "{stdout}");

    let ca = TestCa::start_in(dir, config).await;
    AdminClient::new(ca.admin_channel().await)
        .get_ca_status(pb::GetCaStatusRequest {})
        .await
        .expect("the admin API is back");
    let log = ca.audit_log().await;
    let kinds: Vec<&str> = log.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.contains(&"revocation_lifted"), "{kinds:?}");
    let recovered = log
        .iter()
        .find(|e| e.kind == "admin_recovered")
        .expect("the recovery is audited");
    assert!(recovered.reason.contains(ADMIN), "{}", recovered.reason);
}

// === 6: a prefix token cannot take over an existing identity ===

#[tokio::test(flavor = "multi_thread")]
async fn a_prefix_token_cannot_replace_a_live_enrollment() {
    let ca = TestCa::start().await;
    let auditor = ca.enroll("auditor", AUDITOR, &["db-read"], 60).await;
    let prefix = ca
        .token(
            "spiffe://example.org/ns/prod/*",
            &["db-read", "deploy"],
            0,
            5,
        )
        .await;
    let before = ca.audit_log().await.len();
    let s = ca
        .issue_csr(&prefix, csr(AUDITOR), 60)
        .await
        .expect_err("the auditor is already enrolled");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("already enrolled"), "{}", s.message());
    assert!(s.message().contains("roles [db-read]"), "{}", s.message());
    one_denial_after(&ca, before).await;
    // The real auditor keeps its ceiling; the token still enrolls new identities.
    let renewed = ca.renew(&auditor, 60).await.expect("auditor renews");
    assert_eq!(renewed.roles, vec!["db-read"]);
    let fresh = ca
        .issue_csr(&prefix, csr("spiffe://example.org/ns/prod/new"), 60)
        .await
        .expect("a new identity enrolls");
    assert_eq!(fresh.roles, vec!["db-read", "deploy"]);

    // Replacing the enrollment takes a token for exactly that identity, and says so.
    let exact = ca.token(AUDITOR, &["db-read", "deploy"], 0, 1).await;
    let replaced = ca
        .issue_csr(&exact, csr(AUDITOR), 60)
        .await
        .expect("an exact token may re-enroll");
    assert_eq!(replaced.roles, vec!["db-read", "deploy"]);
    let issued = ca
        .audit_log()
        .await
        .into_iter()
        .rfind(|e| e.kind == "issued")
        .unwrap();
    assert!(
        issued.reason.contains("replaces the enrollment")
            && issued.reason.contains("roles [db-read]")
            && issued.reason.contains("roles [db-read,deploy]"),
        "{}",
        issued.reason
    );
}

// === 7: refused privileged calls are audited ===

#[tokio::test(flavor = "multi_thread")]
async fn refused_privileged_calls_are_each_one_denied_event() {
    let policy = format!(
        "{POLICY}\n[[access]]\nspiffe_id = \"spiffe://example.org/ns/prod/*\"\nroles = [\"db-write\"]\nmax_duration = \"30m\"\napprovals = 1\n"
    );
    let ca = TestCa::start_with("", &policy).await;
    let api = ca.enroll("api", API, &["db-read"], 60).await;
    let channel = ca.channel_as(&api).await;
    let request = AccessClient::new(channel.clone())
        .request(pb::AccessRequestCreate {
            spiffe_id: API.into(),
            roles: vec!["db-write".into()],
            duration_seconds: 600,
            reason: "migration".into(),
        })
        .await
        .expect("a workload may ask for itself")
        .into_inner();

    let mut admin = AdminClient::new(channel.clone());
    let mut revocation = RevocationClient::new(channel.clone());
    let mut audit = AuditClient::new(channel.clone());
    let mut access = AccessClient::new(channel.clone());
    let attempts: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "lanyard.v1.Admin/CreateJoinToken",
            admin
                .create_join_token(pb::CreateJoinTokenRequest {
                    spiffe_id: API.into(),
                    roles: vec![],
                    max_ttl_seconds: 0,
                    expires_in_seconds: 0,
                    uses: 1,
                })
                .await
                .map(drop),
        ),
        (
            "lanyard.v1.Revocation/Revoke",
            revocation
                .revoke(pb::RevokeRequest {
                    target: Some(pb::revoke_request::Target::SpiffeId(
                        "spiffe://example.org/ns/prod/web".into(),
                    )),
                    reason: "x".into(),
                    lift: false,
                })
                .await
                .map(drop),
        ),
        (
            "lanyard.v1.Admin/RotateCa",
            admin.rotate_ca(pb::RotateCaRequest {}).await.map(drop),
        ),
        (
            "lanyard.v1.Audit/Subscribe",
            audit
                .subscribe(pb::SubscribeRequest {
                    from_seq: 1,
                    follow: false,
                    kinds: vec![],
                    spiffe_id: String::new(),
                })
                .await
                .map(drop),
        ),
        (
            "lanyard.v1.Access/Approve",
            access
                .approve(pb::AccessDecision {
                    id: request.id.clone(),
                    comment: "me, myself".into(),
                })
                .await
                .map(drop),
        ),
    ];
    let log = ca.audit_log().await;
    let denied: Vec<&AuditRecord> = log.iter().filter(|e| e.kind == "denied").collect();
    for (call, result) in &attempts {
        let s = result.as_ref().expect_err(call);
        assert_eq!(s.code(), Code::PermissionDenied, "{call}: {s:?}");
        let matching: Vec<_> = denied
            .iter()
            .filter(|e| e.reason.starts_with(&format!("{call}: ")))
            .collect();
        assert_eq!(matching.len(), 1, "{call}: {denied:#?}");
        assert_eq!(
            matching[0].actor, API,
            "{call}: the verified caller is the actor"
        );
    }
    assert_eq!(
        denied.len(),
        attempts.len(),
        "nothing else was denied: {denied:#?}"
    );
    // The request was not approved.
    let still = AccessClient::new(ca.admin_channel().await)
        .list(pb::AccessListRequest {
            pending_only: true,
            spiffe_id: API.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.requests.len(), 1, "still pending");
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_privileged_calls_share_the_refusal_budget() {
    let ca = TestCa::start_with("denial_rate = 1\ndenial_burst = 4\n", POLICY).await;
    let api = ca.enroll("api", API, &["db-read"], 60).await;
    let before = events_after(&ca, 0).await.len();
    let channel = ca.channel_as(&api).await;
    let calls = (0..30).map(|_| {
        let mut admin = AdminClient::new(channel.clone());
        async move { admin.rotate_ca(pb::RotateCaRequest {}).await }
    });
    let codes: Vec<Code> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect_err("not an admin").code())
        .collect();
    let processed = codes
        .iter()
        .filter(|c| **c == Code::PermissionDenied)
        .count();
    assert!((4..=6).contains(&processed), "{codes:?}");
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == Code::ResourceExhausted)
            .count(),
        30 - processed
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let new = events_after(&ca, before).await;
    assert_eq!(
        new.iter().filter(|e| e.actor == API).count(),
        processed,
        "{new:#?}"
    );
}

// === 8: CSRs that ask for privileges ===

/// A CSR for API with `edit` applied to its parameters.
fn csr_with(edit: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(API.to_string().try_into().unwrap())];
    edit(&mut params);
    params.serialize_request(&key).unwrap().der().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn csrs_asking_for_privileges_are_refused_by_name() {
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    // nameConstraints: permitted dNSName example.org.
    let name_constraints = [
        0x30, 0x11, 0xa0, 0x0f, 0x30, 0x0d, 0x82, 0x0b, b'e', b'x', b'a', b'm', b'p', b'l', b'e',
        b'.', b'o', b'r', b'g',
    ];
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            csr_with(|p| p.key_usages = vec![KeyUsagePurpose::KeyCertSign]),
            "keyCertSign",
        ),
        (
            csr_with(|p| {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign]
            }),
            "cRLSign",
        ),
        (
            csr_with(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning]),
            "codeSigning",
        ),
        (
            csr_with(|p| {
                p.custom_extensions = vec![CustomExtension::from_oid_content(
                    &[2, 5, 29, 30],
                    name_constraints.to_vec(),
                )]
            }),
            "nameConstraints",
        ),
        (
            csr_with(|p| {
                let mut e =
                    CustomExtension::from_oid_content(&[1, 3, 9999, 1, 2], vec![0x05, 0x00]);
                e.set_criticality(true);
                p.custom_extensions = vec![e];
            }),
            "critical extension 1.3.9999.1.2",
        ),
    ];
    for (der, needle) in cases {
        let before = ca.audit_log().await.len();
        let s = ca
            .issue_csr(&token, der, 60)
            .await
            .expect_err("a privileged CSR is refused");
        assert_eq!(s.code(), Code::InvalidArgument, "{needle}: {s:?}");
        assert!(s.message().contains(needle), "{needle}: {}", s.message());
        one_denial_after(&ca, before).await;
    }
    // What is harmless is ignored, and the token was never consumed.
    let ok = ca
        .issue_csr(
            &token,
            csr_with(|p| {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }),
            60,
        )
        .await
        .expect("leaf usages are fine");
    assert_eq!(ok.spiffe_id, API);
}

// === 9: errors that used to mislead ===

/// One DER TLV at the start of `d`: (tag, header length, content length).
fn tlv(d: &[u8]) -> (u8, usize, usize) {
    let (tag, first) = (d[0], d[1] as usize);
    if first < 0x80 {
        return (tag, 2, first);
    }
    let n = first & 0x7f;
    let len = d[2..2 + n]
        .iter()
        .fold(0usize, |a, b| (a << 8) | *b as usize);
    (tag, 2 + n, len)
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

/// Splits a SEQUENCE's content into its elements (each with its header).
fn elements(mut content: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let (_, h, l) = tlv(content);
        out.push(content[..h + l].to_vec());
        content = &content[h + l..];
    }
    out
}

fn content(element: &[u8]) -> &[u8] {
    let (_, h, l) = tlv(element);
    &element[h..h + l]
}

/// A CSR whose P-256 public key is re-encoded as a compressed point (the signature is left as
/// it was; a correct server reports the key form before checking it).
fn compressed_point_csr() -> Vec<u8> {
    let top = elements(content(&csr(API)));
    let mut cri = elements(content(&top[0]));
    let spki = elements(content(&cri[2]));
    let bits = content(&spki[1]);
    let point = &bits[1..];
    assert_eq!(point[0], 0x04, "rcgen writes uncompressed points");
    let (x, y) = (&point[1..33], &point[33..65]);
    let mut compressed = vec![0x00, if y[31] & 1 == 0 { 0x02 } else { 0x03 }];
    compressed.extend_from_slice(x);
    let new_spki = der(0x30, &[spki[0].clone(), der(0x03, &compressed)].concat());
    cri[2] = new_spki;
    let new_cri = der(0x30, &cri.concat());
    der(0x30, &[new_cri, top[1].clone(), top[2].clone()].concat())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compressed_point_is_named_not_called_a_bad_signature() {
    let ca = TestCa::start().await;
    let token = ca.token(API, &["db-read"], 0, 1).await;
    let s = ca
        .issue_csr(&token, compressed_point_csr(), 60)
        .await
        .expect_err("compressed points are unsupported");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("compressed point"), "{}", s.message());
    ca.issue_csr(&token, csr(API), 60)
        .await
        .expect("the token is still good");
}

/// An IssueRequest look-alike whose field 1 (`csr`, bytes) is a varint: not decodable as one.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAnIssueRequest {
    #[prost(uint64, tag = "1")]
    csr: u64,
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_protobuf_is_invalid_argument_not_internal() {
    let ca = TestCa::start().await;
    let mut grpc = tonic::client::Grpc::new(ca.anon_channel().await);
    grpc.ready().await.unwrap();
    let s = grpc
        .unary::<_, pb::IssueResponse, _>(
            tonic::Request::new(NotAnIssueRequest { csr: 7 }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/lanyard.v1.Ca/Issue"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("undecodable");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("malformed request"), "{}", s.message());
    CaClient::new(ca.anon_channel().await)
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .expect("a normal client is served");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_that_was_pruned_is_not_called_forged() {
    let ca = TestCa::start_with("prune_interval = \"1s\"\n", POLICY).await;
    let token = ca
        .try_token(API, &["db-read"], 0, 1, 1)
        .await
        .expect("a 1 s token");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = ca
            .issue_csr(&token, csr(API), 60)
            .await
            .expect_err("expired");
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        if s.message().contains("not valid") {
            assert!(
                s.message().contains("unknown, expired or forged"),
                "{}",
                s.message()
            );
            break;
        }
        // Not pruned yet: the message names the expiry.
        assert!(s.message().contains("expired"), "{}", s.message());
        assert!(std::time::Instant::now() < deadline, "never pruned");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_admin_certificate_is_replaced_at_the_next_start() {
    let ca = TestCa::start().await;
    let serial = lanyard::client::Credential::load(&ca.admin_dir(), &RolesOid::default())
        .unwrap()
        .svid
        .serial
        .to_hex();
    RevocationClient::new(ca.admin_channel().await)
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::Serial(serial.clone())),
            reason: "admin key copied to a laptop".into(),
            lift: false,
        })
        .await
        .expect("an admin may revoke a certificate by serial, its own included");
    let s = AdminClient::new(ca.admin_channel().await)
        .get_ca_status(pb::GetCaStatusRequest {})
        .await
        .expect_err("the revoked credential is refused");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let (dir, config) = ca.stop().await;
    wait_for_store_release(&dir.path().join("data")).await;
    let ca = TestCa::start_in(dir, config).await;
    AdminClient::new(ca.admin_channel().await)
        .get_ca_status(pb::GetCaStatusRequest {})
        .await
        .expect("a fresh admin credential after the restart");
    let fresh = lanyard::client::Credential::load(&ca.admin_dir(), &RolesOid::default())
        .unwrap()
        .svid
        .serial
        .to_hex();
    assert_ne!(fresh, serial);
}
