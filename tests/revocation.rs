//! Issue 4, revocation against a real CA over real TLS: by serial and by identity (with lift),
//! `Revocation.Check`, `Revocation.Watch`, the signed CRL (checked by OpenSSL), the audit trail of
//! every revocation, and pruning once the revoked certificates have expired.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{POLICY, TestCa};
use lanyard::ca::RolesOid;
use lanyard::client::Credential;
use lanyard::pb::v1::{self as pb, revocation_client::RevocationClient, revoke_request::Target};
use lanyard::tls::unix_now;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

const API: &str = "spiffe://example.org/ns/prod/api";
const WEB: &str = "spiffe://example.org/ns/prod/web";
const AUDITOR: &str = "spiffe://example.org/auditor";
const ADMIN: &str = "spiffe://example.org/lanyard/admin";
/// Default renewal grace (1 h): serial entries live until notAfter + grace.
const GRACE: i64 = 3600;
/// Default max_cert_lifetime (24 h): a lifted identity rule lives until before + this + grace.
const MAX_LIFETIME: i64 = 24 * 3600;
/// Default crl_validity (5 min).
const CRL_VALIDITY: i64 = 300;

// === helpers ===

fn serial(dir: &Path) -> String {
    Credential::load(dir, &RolesOid::default())
        .unwrap()
        .svid
        .serial
        .to_hex()
}

fn not_after(dir: &Path) -> i64 {
    Credential::load(dir, &RolesOid::default())
        .unwrap()
        .svid
        .not_after
}

async fn revoke_on(
    ch: Channel,
    target: Target,
    reason: &str,
    lift: bool,
) -> Result<Vec<pb::RevocationEntry>, Status> {
    RevocationClient::new(ch)
        .revoke(pb::RevokeRequest {
            target: Some(target),
            reason: reason.into(),
            lift,
        })
        .await
        .map(|r| r.into_inner().entries)
}

async fn revoke_serial(ca: &TestCa, serial: &str, reason: &str) -> Vec<pb::RevocationEntry> {
    revoke_on(
        ca.admin_channel().await,
        Target::Serial(serial.into()),
        reason,
        false,
    )
    .await
    .expect("admin revokes a serial")
}

async fn revoke_id(ca: &TestCa, id: &str, reason: &str, lift: bool) -> Vec<pb::RevocationEntry> {
    revoke_on(
        ca.admin_channel().await,
        Target::SpiffeId(id.into()),
        reason,
        lift,
    )
    .await
    .expect("admin revokes an identity")
}

async fn check(ch: Channel, serial: &str) -> Result<pb::CheckResponse, Status> {
    RevocationClient::new(ch)
        .check(pb::CheckRequest {
            serial: serial.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn watch(ch: Channel, since: u64) -> Streaming<pb::RevocationEntry> {
    RevocationClient::new(ch)
        .watch(pb::WatchRequest { since })
        .await
        .expect("watch starts")
        .into_inner()
}

/// The next watch entry; fails if none arrives within 10 s.
async fn next_entry(s: &mut Streaming<pb::RevocationEntry>) -> pb::RevocationEntry {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an entry arrives in time")
        .expect("the stream is healthy")
        .expect("the stream is still open")
}

/// Everything a watch sends before going quiet for 500 ms.
async fn until_quiet(s: &mut Streaming<pb::RevocationEntry>) -> Vec<pb::RevocationEntry> {
    let mut out = Vec::new();
    while let Ok(item) = tokio::time::timeout(Duration::from_millis(500), s.message()).await {
        out.push(
            item.expect("the stream is healthy")
                .expect("the stream is still open"),
        );
    }
    out
}

/// What `Watch{since: 0}` holds right now.
async fn watch_snapshot(ch: Channel) -> Vec<pb::RevocationEntry> {
    until_quiet(&mut watch(ch, 0).await).await
}

fn serials(entries: &[pb::RevocationEntry]) -> HashSet<String> {
    entries
        .iter()
        .filter(|e| !e.identity_rule)
        .map(|e| e.serial.clone())
        .collect()
}

fn set(items: &[&str]) -> HashSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

async fn get_crl(ca: &TestCa) -> Vec<u8> {
    RevocationClient::new(ca.anon_channel().await)
        .get_crl(pb::GetCrlRequest {})
        .await
        .expect("anyone may fetch the CRL")
        .into_inner()
        .der
        .to_vec()
}

/// Serials a DER CRL lists (lowercase hex), its nextUpdate and its CRL number.
fn crl_contents(der: &[u8]) -> (HashSet<String>, i64, Vec<u8>) {
    let (rest, crl) = CertificateRevocationList::from_der(der).expect("the CRL parses");
    assert!(rest.is_empty());
    let listed = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let next = crl.next_update().expect("nextUpdate is set").timestamp();
    (
        listed,
        next,
        crl.crl_number().expect("CRL number is set").to_bytes_be(),
    )
}

fn openssl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs")
}

/// `openssl crl -verify` against `bundle`; returns (accepted, serials listed in upper-case hex).
fn openssl_crl(crl: &Path, form: &str, bundle: &Path) -> (bool, String) {
    let (crl, bundle) = (crl.to_str().unwrap(), bundle.to_str().unwrap());
    let v = openssl(&[
        "crl", "-inform", form, "-in", crl, "-CAfile", bundle, "-verify", "-noout",
    ]);
    let said = String::from_utf8_lossy(&v.stderr).to_string() + &String::from_utf8_lossy(&v.stdout);
    let text = openssl(&["crl", "-inform", form, "-in", crl, "-noout", "-text"]);
    assert!(text.status.success());
    (
        v.status.success() && said.contains("verify OK"),
        String::from_utf8_lossy(&text.stdout).into_owned(),
    )
}

// === revoke by serial ===

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_serial_cannot_renew_but_its_siblings_can() {
    let ca = TestCa::start().await;
    let a1 = ca.enroll("a1", API, &["db-read"], 600).await;
    let a2 = ca.enroll("a2", API, &["db-read"], 600).await;
    let (s1, s2) = (serial(&a1), serial(&a2));

    let before = unix_now();
    let entries = revoke_serial(&ca, &s1, "key leaked").await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(
        (
            e.serial.as_str(),
            e.spiffe_id.as_str(),
            e.identity_rule,
            e.blocked
        ),
        (s1.as_str(), API, false, false)
    );
    assert_eq!(e.reason, "key leaked");
    assert!((before..=unix_now()).contains(&e.revoked_at));
    assert_eq!(
        e.expires_at,
        not_after(&a1) + GRACE,
        "kept until the cert can no longer renew"
    );

    let err = ca.renew(&a1, 60).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&s1) && err.message().contains("key leaked"),
        "{err:?}"
    );
    // The revoked certificate is refused for every authenticated call, not just renewal.
    let err = check(ca.channel_as(&a1).await, &s2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Another certificate of the same identity is untouched.
    let r = ca.renew(&a2, 60).await.expect("the sibling renews");
    assert_eq!(
        (r.spiffe_id.as_str(), r.roles.clone()),
        (API, vec!["db-read".to_string()])
    );
    ca.renew(&a2, 60)
        .await
        .expect("and renews again with the renewed cert");

    // Serials are accepted as `openssl x509 -serial` prints them: upper case, with colons.
    let a3 = ca.enroll("a3", API, &[], 600).await;
    let s3 = serial(&a3);
    let colons: Vec<String> = s3
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into())
        .collect();
    let entries = revoke_serial(&ca, &colons.join(":"), "decommissioned").await;
    assert_eq!(entries[0].serial, s3);
    assert!(check(ca.channel_as(&a2).await, &s3).await.unwrap().revoked);
    assert_eq!(
        ca.renew(&a3, 60).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

// === revoke by identity ===

#[tokio::test(flavor = "multi_thread")]
async fn revoking_an_identity_cuts_off_every_cert_and_new_tokens_until_lifted() {
    let ca = TestCa::start().await;
    let x1 = ca.enroll("x1", API, &[], 600).await;
    let x2 = ca.enroll("x2", API, &[], 600).await;
    let y = ca.enroll("y", WEB, &[], 600).await;

    let before = unix_now();
    let entries = revoke_id(&ca, API, "host compromised", false).await;
    let rule = &entries[0];
    assert!(rule.identity_rule && rule.blocked, "{rule:?}");
    assert_eq!(
        (
            rule.spiffe_id.as_str(),
            rule.reason.as_str(),
            rule.serial.as_str()
        ),
        (API, "host compromised", "")
    );
    assert!(
        rule.before > before && rule.before <= unix_now() + 1,
        "{rule:?}"
    );
    assert_eq!(
        serials(&entries[1..]),
        set(&[&serial(&x1), &serial(&x2)]),
        "one CRL entry per live cert"
    );
    assert!(
        entries
            .iter()
            .all(|e| e.rev == rule.rev && e.spiffe_id == API)
    );

    for (dir, label) in [(&x1, "x1"), (&x2, "x2")] {
        let err = ca.renew(dir, 60).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{label}: {err:?}");
        assert!(
            err.message().contains("host compromised"),
            "{label}: {err:?}"
        );
    }
    ca.renew(&y, 60)
        .await
        .expect("another identity is untouched");

    // A new join token for the identity does not get it back in.
    let token = ca.token(API, &[], 600, 1).await;
    let err = ca.issue(&token, API, 60).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(API) && err.message().contains("--lift"),
        "{err:?}"
    );

    // Lifting needs the identity to be revoked, and is an admin verb with a reason.
    let lifted = revoke_id(&ca, API, "reimaged", true).await;
    assert_eq!(lifted.len(), 1);
    let l = &lifted[0];
    assert!(l.identity_rule && !l.blocked && l.rev > rule.rev, "{l:?}");
    assert_eq!(l.before, rule.before, "the old certificates stay covered");
    assert_eq!(l.expires_at, rule.before + MAX_LIFETIME + GRACE);
    let again = revoke_on(
        ca.admin_channel().await,
        Target::SpiffeId(API.into()),
        "twice",
        true,
    )
    .await
    .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");

    // After the lift a new token works and the new certificate is usable...
    let fresh = ca.enroll("x3", API, &[], 600).await;
    ca.renew(&fresh, 60)
        .await
        .expect("a certificate issued after the lift renews");
    assert!(
        !check(ca.channel_as(&fresh).await, &serial(&fresh))
            .await
            .unwrap()
            .revoked
    );
    // ...while the old ones stay revoked.
    for dir in [&x1, &x2] {
        assert_eq!(
            ca.renew(dir, 60).await.unwrap_err().code(),
            Code::FailedPrecondition
        );
        assert!(
            check(ca.channel_as(&y).await, &serial(dir))
                .await
                .unwrap()
                .revoked
        );
    }
}

// === Check and refusals ===

#[tokio::test(flavor = "multi_thread")]
async fn check_answers_one_serial_and_bad_revocations_are_refused() {
    let ca = TestCa::start().await;
    let a = ca.enroll("a", API, &[], 600).await;
    let b = ca.enroll("b", WEB, &[], 600).await;
    let auditor = ca
        .enroll("auditor", AUDITOR, &["lanyard:auditor"], 600)
        .await;
    let (sa, sb) = (serial(&a), serial(&b));
    revoke_serial(&ca, &sa, "key leaked").await;
    let head = ca.audit_log().await.len();

    // Any valid Lanyard certificate may ask.
    let yes = check(ca.channel_as(&b).await, &sa).await.unwrap();
    assert!(yes.revoked);
    let entry = yes.entry.expect("the entry comes with the answer");
    assert_eq!(
        (
            entry.serial.as_str(),
            entry.reason.as_str(),
            entry.spiffe_id.as_str()
        ),
        (sa.as_str(), "key leaked", API)
    );
    let no = check(ca.channel_as(&b).await, &sb).await.unwrap();
    assert!(!no.revoked && no.entry.is_none());
    let never_issued = "01".to_string() + &"ab".repeat(16);
    assert!(
        !check(ca.channel_as(&b).await, &never_issued)
            .await
            .unwrap()
            .revoked
    );
    let err = check(ca.anon_channel().await, &sa).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = check(ca.channel_as(&b).await, "not hex").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Refused revocations.
    let admin = ca.admin_channel().await;
    let refused = [
        (
            Target::Serial(never_issued.clone()),
            "lost",
            false,
            Code::NotFound,
        ),
        (Target::Serial(sb.clone()), "", false, Code::InvalidArgument),
        (
            Target::Serial(sb.clone()),
            "   ",
            false,
            Code::InvalidArgument,
        ),
        (
            Target::Serial("zz".into()),
            "bad serial",
            false,
            Code::InvalidArgument,
        ),
        (
            Target::Serial(sb.clone()),
            "lift a serial?",
            true,
            Code::InvalidArgument,
        ),
        (
            Target::SpiffeId("https://example.org/x".into()),
            "not spiffe",
            false,
            Code::InvalidArgument,
        ),
        (
            Target::SpiffeId(WEB.into()),
            "",
            false,
            Code::InvalidArgument,
        ),
        (
            Target::SpiffeId(WEB.into()),
            "never revoked",
            true,
            Code::NotFound,
        ),
    ];
    for (target, reason, lift, code) in refused {
        let err = revoke_on(admin.clone(), target.clone(), reason, lift)
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            code,
            "{target:?} {reason:?} lift={lift}: {err:?}"
        );
    }
    let err = RevocationClient::new(admin.clone())
        .revoke(pb::RevokeRequest {
            target: None,
            reason: "what?".into(),
            lift: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for (who, code) in [
        (ca.channel_as(&b).await, Code::PermissionDenied),
        (ca.channel_as(&auditor).await, Code::PermissionDenied),
        (ca.anon_channel().await, Code::Unauthenticated),
    ] {
        let err = revoke_on(who, Target::Serial(sb.clone()), "not yours", false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    }
    let err = revoke_on(
        ca.channel_as(&b).await,
        Target::SpiffeId(WEB.into()),
        "myself",
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // None of that changed anything.
    assert!(!check(ca.channel_as(&b).await, &sb).await.unwrap().revoked);
    ca.renew(&b, 60).await.expect("b still renews");
    let log = ca.audit_log().await;
    assert!(
        log[head..]
            .iter()
            .all(|r| r.kind != "revoked" && r.kind != "revocation_lifted"),
        "{:?}",
        &log[head..]
    );
}

// === Watch ===

#[tokio::test(flavor = "multi_thread")]
async fn watch_sends_existing_entries_then_live_ones_and_resumes_without_repeats() {
    let ca = TestCa::start().await;
    let a1 = ca.enroll("a1", API, &[], 600).await;
    let a2 = ca.enroll("a2", API, &[], 600).await;
    let w = ca.enroll("w", WEB, &[], 600).await;
    let watcher = ca
        .enroll("watcher", "spiffe://example.org/ns/prod/watcher", &[], 300)
        .await;
    let ch = ca.channel_as(&watcher).await;

    let r1 = revoke_serial(&ca, &serial(&a1), "one").await[0].rev;
    let mut live = watch(ch.clone(), 0).await;
    let first = next_entry(&mut live).await;
    assert_eq!((first.serial.clone(), first.rev), (serial(&a1), r1));
    assert!(
        until_quiet(&mut live).await.is_empty(),
        "only what exists is replayed"
    );

    // Live: each revocation arrives as it happens.
    let r2 = revoke_serial(&ca, &serial(&a2), "two").await[0].rev;
    let e = next_entry(&mut live).await;
    assert_eq!(
        (e.serial.clone(), e.rev, e.reason.as_str()),
        (serial(&a2), r2, "two")
    );
    let id_entries = revoke_id(&ca, WEB, "three", false).await;
    let r3 = id_entries[0].rev;
    let mut got = [next_entry(&mut live).await, next_entry(&mut live).await];
    got.sort_by_key(|e| !e.identity_rule);
    assert!(got[0].identity_rule && got[0].blocked && got[0].spiffe_id == WEB && got[0].rev == r3);
    assert_eq!((got[1].serial.clone(), got[1].rev), (serial(&w), r3));
    assert!(until_quiet(&mut live).await.is_empty());
    assert!(r1 < r2 && r2 < r3);

    // Resume after r1: everything newer, nothing repeated.
    let mut resumed = watch(ch.clone(), r1).await;
    let got = until_quiet(&mut resumed).await;
    assert_eq!(got.iter().map(|e| e.rev).collect::<Vec<_>>(), [r2, r3, r3]);
    assert_eq!(serials(&got), set(&[&serial(&a2), &serial(&w)]));
    // Resume at the newest rev: nothing until something happens.
    let mut caught_up = watch(ch.clone(), r3).await;
    assert!(until_quiet(&mut caught_up).await.is_empty());
    let lift = revoke_id(&ca, WEB, "fixed", true).await[0].clone();
    for s in [&mut live, &mut resumed, &mut caught_up] {
        let e = next_entry(s).await;
        assert_eq!(e, lift);
        assert!(e.identity_rule && !e.blocked);
        assert!(until_quiet(s).await.is_empty());
    }
    // Since 0 again: the current state, with the identity rule in its lifted form.
    let snapshot = watch_snapshot(ch.clone()).await;
    assert_eq!(
        serials(&snapshot),
        set(&[&serial(&a1), &serial(&a2), &serial(&w)])
    );
    let rules: Vec<_> = snapshot.iter().filter(|e| e.identity_rule).collect();
    assert_eq!(rules, [&lift]);

    // Watching needs a valid certificate.
    let err = RevocationClient::new(ca.anon_channel().await)
        .watch(pb::WatchRequest { since: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

// === CRL ===

#[tokio::test(flavor = "multi_thread")]
async fn the_crl_is_signed_lists_revoked_serials_and_expires_soon() {
    let ca = TestCa::start().await;
    let a1 = ca.enroll("a1", API, &[], 600).await;
    let a2 = ca.enroll("a2", API, &[], 600).await;
    let w = ca.enroll("w", WEB, &[], 600).await;
    revoke_serial(&ca, &serial(&a1), "key leaked").await;
    revoke_id(&ca, WEB, "host compromised", false).await;
    let bundle = ca.admin_dir().join("bundle.pem");

    let t0 = unix_now();
    let der = get_crl(&ca).await;
    let t1 = unix_now();
    let (listed, next_update, number) = crl_contents(&der);
    assert_eq!(listed, set(&[&serial(&a1), &serial(&w)]));
    assert!(
        (t0 + CRL_VALIDITY..=t1 + CRL_VALIDITY).contains(&next_update),
        "nextUpdate {next_update} should be crl_validity after now ({t0}..{t1})"
    );
    let file = ca.dir.path().join("crl.der");
    std::fs::write(&file, &der).unwrap();
    let (ok, text) = openssl_crl(&file, "DER", &bundle);
    assert!(ok, "openssl crl -verify accepts the CRL");
    for s in [serial(&a1), serial(&w)] {
        assert!(text.contains(&s.to_uppercase()), "{s} in\n{text}");
    }
    assert!(!text.contains(&serial(&a2).to_uppercase()));
    // Another CA's bundle does not verify it: the check above means something.
    let other = TestCa::start().await;
    let (ok, _) = openssl_crl(&file, "DER", &other.admin_dir().join("bundle.pem"));
    assert!(!ok, "a CRL verifies only against its own CA");

    // A new revocation shows up at once, under a higher CRL number.
    revoke_serial(&ca, &serial(&a2), "retired").await;
    let (listed, _, number2) = crl_contents(&get_crl(&ca).await);
    assert_eq!(listed, set(&[&serial(&a1), &serial(&a2), &serial(&w)]));
    let big = |b: &[u8]| b.iter().fold(0u128, |n, d| (n << 8) | u128::from(*d));
    assert!(big(&number2) > big(&number), "CRL numbers increase");

    // `lanyard crl --out` writes a PEM CRL that OpenSSL accepts.
    let pem = ca.dir.path().join("crl.pem");
    let out = tokio::process::Command::new(common::lanyard_bin())
        .args([
            "crl",
            "--out",
            pem.to_str().unwrap(),
            "--server",
            &ca.server(),
            "--credential",
        ])
        .arg(ca.admin_dir())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_to_string(&pem)
            .unwrap()
            .starts_with("-----BEGIN X509 CRL-----")
    );
    let (ok, text) = openssl_crl(&pem, "PEM", &bundle);
    assert!(ok, "openssl accepts the PEM CRL");
    for s in [serial(&a1), serial(&a2), serial(&w)] {
        assert!(text.contains(&s.to_uppercase()), "{s} in\n{text}");
    }
}

// === audit trail ===

#[tokio::test(flavor = "multi_thread")]
async fn every_revocation_and_lift_is_an_audit_event() {
    let ca = TestCa::start().await;
    let a = ca.enroll("a", API, &["db-read"], 600).await;
    let _w = ca.enroll("w", WEB, &[], 600).await;
    let by_serial = revoke_serial(&ca, &serial(&a), "key leaked").await;
    let by_id = revoke_id(&ca, WEB, "host stolen", false).await;
    let lifted = revoke_id(&ca, WEB, "host recovered", true).await;
    let refused = ca.renew(&a, 60).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let log = ca.audit_log().await;
    let at = |seq: u64| {
        log.iter()
            .find(|r| r.seq == seq)
            .expect("the entry's rev is its event's seq")
    };
    let e = at(by_serial[0].rev);
    assert_eq!(
        (e.kind.as_str(), e.actor.as_str(), e.subject.as_str()),
        ("revoked", ADMIN, API)
    );
    assert_eq!(
        (e.serial.clone(), e.reason.as_str(), e.not_after),
        (serial(&a), "key leaked", not_after(&a))
    );
    assert_eq!(e.roles, ["db-read"]);
    let e = at(by_id[0].rev);
    assert_eq!(
        (
            e.kind.as_str(),
            e.actor.as_str(),
            e.subject.as_str(),
            e.serial.as_str()
        ),
        ("revoked", ADMIN, WEB, "")
    );
    assert!(
        e.reason.contains("host stolen") && e.reason.contains("identity"),
        "{e:?}"
    );
    let e = at(lifted[0].rev);
    assert_eq!(
        (e.kind.as_str(), e.actor.as_str(), e.subject.as_str()),
        ("revocation_lifted", ADMIN, WEB)
    );
    assert_eq!(e.reason, "host recovered");
    assert_eq!(log.iter().filter(|r| r.kind == "revoked").count(), 2);
    assert_eq!(
        log.iter().filter(|r| r.kind == "revocation_lifted").count(),
        1
    );
    // The refused renewal is on the record too, naming the revoked serial.
    let denied = log
        .iter()
        .rfind(|r| r.kind == "denied")
        .expect("the refusal is audited");
    assert_eq!(denied.actor, API);
    assert!(denied.reason.contains(&serial(&a)), "{denied:?}");
    lanyard::audit::verify_chain(&log, 1, lanyard::audit::GENESIS_HASH).unwrap();
}

// === pruning ===

#[tokio::test(flavor = "multi_thread")]
async fn entries_are_pruned_once_the_revoked_cert_has_expired() {
    let ca = TestCa::start_with("renewal_grace = \"1s\"\nprune_interval = \"1s\"", POLICY).await;
    let short = ca.enroll("short", API, &[], 2).await;
    let long = ca.enroll("long", WEB, &[], 600).await;
    let watcher = ca
        .enroll("watcher", "spiffe://example.org/ns/prod/watcher", &[], 300)
        .await;
    let (ss, sl) = (serial(&short), serial(&long));
    let e = revoke_serial(&ca, &ss, "short-lived but leaked").await;
    assert_eq!(
        e[0].expires_at,
        not_after(&short) + 1,
        "notAfter + 1 s grace"
    );
    revoke_serial(&ca, &sl, "long-lived and leaked").await;
    // An identity that is still blocked is never pruned.
    revoke_id(
        &ca,
        "spiffe://example.org/ns/prod/gone",
        "decommissioned",
        false,
    )
    .await;
    let ch = ca.channel_as(&watcher).await;

    let before = watch_snapshot(ch.clone()).await;
    assert_eq!(serials(&before), set(&[&ss, &sl]));
    assert_eq!(before.iter().filter(|e| e.identity_rule).count(), 1);
    assert_eq!(crl_contents(&get_crl(&ca).await).0, set(&[&ss, &sl]));

    // notAfter (2 s) + grace (1 s) + a prune pass (1 s), with slack for a busy machine.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = watch_snapshot(ch.clone()).await;
        if !serials(&now).contains(&ss) {
            assert!(
                unix_now() > not_after(&short) + 1,
                "pruned only after notAfter + grace"
            );
            assert_eq!(serials(&now), set(&[&sl]));
            assert_eq!(
                now.iter().filter(|e| e.identity_rule && e.blocked).count(),
                1
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the expired entry was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(crl_contents(&get_crl(&ca).await).0, set(&[&sl]));
    assert!(
        !check(ch.clone(), &ss).await.unwrap().revoked,
        "gone from the store"
    );
    assert!(check(ch.clone(), &sl).await.unwrap().revoked);
    // Pruning reopens nothing: the certificate is now too old to renew at all.
    let err = ca.renew(&short, 60).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // ...and revoking it again is pointless: the CA has forgotten it.
    let err = revoke_on(
        ca.admin_channel().await,
        Target::Serial(ss.clone()),
        "again",
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

// === CRLs through a CA rotation ===

#[tokio::test(flavor = "multi_thread")]
async fn during_a_ca_rotation_the_retiring_ca_signs_a_crl_for_its_certificates() {
    let ca = TestCa::start_with("ca_rotation_overlap = \"1s\"\n", POLICY).await;
    let old = ca.enroll("old", API, &[], 600).await;
    let mut admin = pb::admin_client::AdminClient::new(ca.admin_channel().await);
    admin
        .rotate_ca(pb::RotateCaRequest {})
        .await
        .expect("the admin may rotate");
    // After the switch the new CA signs, and the old one, retiring, still has live certificates.
    let deadline = Instant::now() + Duration::from_secs(20);
    let crl = loop {
        let crl = RevocationClient::new(ca.anon_channel().await)
            .get_crl(pb::GetCrlRequest {})
            .await
            .unwrap()
            .into_inner();
        if !crl.retiring.is_empty() {
            break crl;
        }
        assert!(Instant::now() < deadline, "the rotation never switched");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(crl.retiring.len(), 1);
    let new = ca.enroll("new", API, &[], 600).await;
    revoke_serial(&ca, &serial(&old), "key leaked").await;

    // `lanyard crl` writes both; each lists the revocation.
    let run = |args: &[&str]| {
        let out = common::lanyard_cmd()
            .args(args)
            .args(["--server", &ca.server(), "--credential"])
            .arg(ca.admin_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out
    };
    let crls = ca.dir.path().join("crls.pem");
    run(&["crl", "--out", crls.to_str().unwrap()]);
    let bundle = ca.dir.path().join("both.pem");
    std::fs::write(&bundle, run(&["bundle"]).stdout).unwrap();
    let pem = std::fs::read_to_string(&crls).unwrap();
    assert_eq!(pem.matches("BEGIN X509 CRL").count(), 2, "{pem}");

    // OpenSSL checks each certificate against the CRL of *its* issuer: the retiring CA's CRL is
    // what lets it see the old certificate's revocation at all.
    let verify = |cert: &Path, crl_file: &Path| {
        let v = openssl(&[
            "verify",
            "-crl_check",
            "-CAfile",
            bundle.to_str().unwrap(),
            "-CRLfile",
            crl_file.to_str().unwrap(),
            cert.join("cert.pem").to_str().unwrap(),
        ]);
        String::from_utf8_lossy(&v.stdout).to_string() + &String::from_utf8_lossy(&v.stderr)
    };
    let said = verify(&old, &crls);
    assert!(said.contains("certificate revoked"), "{said}");
    let said = verify(&new, &crls);
    assert!(said.contains(": OK"), "{said}");
    let only_new = ca.dir.path().join("new-only.pem");
    std::fs::write(
        &only_new,
        pem.split_inclusive("-----END X509 CRL-----\n")
            .next()
            .unwrap(),
    )
    .unwrap();
    let said = verify(&old, &only_new);
    assert!(said.contains("unable to get certificate CRL"), "{said}");
}

/// An issuance decided against one identity rule and committed after the rule changed fails its
/// guard: refused and audited, and never on the chain as issued. The window is held open by the
/// lifted-rule wait (a token issuance right after a lift sleeps to the rule's `before`); the
/// identity is revoked again inside it. Without the guard the certificate would be committed
/// (and, revoked within the same second, even handed out: its notBefore equals the new rule's
/// `before`).
#[tokio::test]
async fn an_issuance_whose_identity_rule_changes_before_commit_fails_its_guard() {
    let ca = TestCa::start().await;
    let token = ca.token(API, &[], 600, 1).await;
    // Start early in a second, so revoke, lift and the issuance's plan share it.
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_millis()
        > 100
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    revoke_id(&ca, API, "first", false).await;
    revoke_id(&ca, API, "cleared", true).await;
    let issuing = ca.issue(&token, API, 60);
    let revoke_again = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        revoke_id(&ca, API, "again", false).await
    };
    let (issued, _) = tokio::join!(issuing, revoke_again);
    let Err(err) = issued else {
        panic!(
            "the issuance raced a revocation and must be refused, yet a certificate was returned"
        );
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(API), "{err:?}");
    let log = ca.audit_log().await;
    let again = log
        .iter()
        .position(|r| r.kind == "revoked" && r.reason.contains("again"))
        .expect("second revocation on the chain");
    assert!(
        log[again..]
            .iter()
            .all(|r| !(r.kind == "issued" && r.subject == API)),
        "no certificate committed after the rule changed: {:?}",
        &log[again..]
    );
    assert!(
        log[again..]
            .iter()
            .any(|r| r.kind == "denied" && r.subject == API && r.reason.contains("revoked")),
        "the refusal is audited"
    );
}
