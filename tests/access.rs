//! Issue 6, temporary elevated access against a real CA over real TLS: a request with a reason,
//! approval by other `lanyard:approver` holders (never the requester nor the subject, one vote
//! each), grants that put roles into the subject's certificates without outliving the grant and
//! end by themselves, denial and withdrawal, expiry of pending requests, early revoke with
//! renewable certificate revocation (down to a real `lanyard agent` that keeps running; never
//! softening an earlier revocation; none missed while renewals race the revoke), two approvers
//! at once, the webhook and notify command, a restart, the audit trail of every step, the CLI.
//! Every child process is stopped by a guard, even when an assertion fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{TestCa, dir_svid, lanyard_cmd, poll_until, spawn_agent, wait_for_svid};
use lanyard::ca::{RolesOid, SvidInfo, parse_svid};
use lanyard::client::Credential;
use lanyard::pb::v1::{
    self as pb, access_client::AccessClient, ca_client::CaClient,
    revocation_client::RevocationClient,
};
use lanyard::store::AuditRecord;
use lanyard::tls::unix_now;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::{Code, Status};

const API: &str = "spiffe://example.org/ns/prod/api";
const WEB: &str = "spiffe://example.org/ns/prod/web";
const PAY: &str = "spiffe://example.org/ns/prod/payments/api";
const DEV: &str = "spiffe://example.org/ns/dev/tool";
const ALICE: &str = "spiffe://example.org/ops/alice";
const BOB: &str = "spiffe://example.org/ops/bob";
const CAROL: &str = "spiffe://example.org/ops/carol";
/// Holds `lanyard:admin` and `lanyard:approver`.
const LEAD: &str = "spiffe://example.org/ops/lead";
const ADMIN: &str = "spiffe://example.org/lanyard/admin";
/// Default renewal grace (1 h): renewable revocations live until notAfter + grace.
const GRACE: i64 = 3600;

/// Workloads hold db-read; engineers under /ops/ approve; the lead is also an admin. Prod
/// workloads may ask for db-write or deploy (one approval, 30 min at most); payments workloads,
/// under a narrower rule, only for db-admin, with two approvals; engineers for db-write.
const POLICY: &str = r#"
[[policy]]
spiffe_id = "spiffe://example.org/ns/prod/*"
roles = ["db-read"]
max_ttl = "10m"

[[policy]]
spiffe_id = "spiffe://example.org/ns/dev/*"
roles = []
max_ttl = "10m"

[[policy]]
spiffe_id = "spiffe://example.org/ops/*"
roles = ["lanyard:approver"]
max_ttl = "1h"

[[policy]]
spiffe_id = "spiffe://example.org/ops/lead"
roles = ["lanyard:admin", "lanyard:approver"]
max_ttl = "1h"

[[access]]
spiffe_id = "spiffe://example.org/ns/prod/*"
roles = ["db-write", "deploy"]
max_duration = "30m"
approvals = 1

[[access]]
spiffe_id = "spiffe://example.org/ns/prod/payments/*"
roles = ["db-admin"]
max_duration = "10m"
approvals = 2

[[access]]
spiffe_id = "spiffe://example.org/ops/*"
roles = ["db-write"]
max_duration = "1h"
"#;

// === fixture ===

/// A CA with enrolled credentials (directories inside the CA's temp dir).
struct World {
    ca: TestCa,
    api: PathBuf,
    alice: PathBuf,
    bob: PathBuf,
    carol: PathBuf,
    lead: PathBuf,
    dev: PathBuf,
    pay: PathBuf,
}

impl World {
    async fn start() -> Self {
        Self::start_with("").await
    }

    async fn start_with(extra: &str) -> Self {
        let ca = TestCa::start_with(extra, POLICY).await;
        let api = ca.enroll("api", API, &["db-read"], 300).await;
        let alice = ca.enroll("alice", ALICE, &["lanyard:approver"], 300).await;
        let bob = ca.enroll("bob", BOB, &["lanyard:approver"], 300).await;
        let carol = ca.enroll("carol", CAROL, &["lanyard:approver"], 300).await;
        let lead = ca
            .enroll("lead", LEAD, &["lanyard:admin", "lanyard:approver"], 300)
            .await;
        let dev = ca.enroll("dev", DEV, &[], 300).await;
        let pay = ca.enroll("pay", PAY, &["db-read"], 300).await;
        Self {
            ca,
            api,
            alice,
            bob,
            carol,
            lead,
            dev,
            pay,
        }
    }

    fn admin(&self) -> PathBuf {
        self.ca.admin_dir()
    }

    async fn client(&self, dir: &Path) -> AccessClient<Channel> {
        AccessClient::new(self.ca.channel_as(dir).await)
    }

    async fn request(
        &self,
        by: &Path,
        subject: &str,
        roles: &[&str],
        secs: u32,
        reason: &str,
    ) -> Result<pb::AccessRequest, Status> {
        self.client(by)
            .await
            .request(pb::AccessRequestCreate {
                spiffe_id: subject.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                duration_seconds: secs,
                reason: reason.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn approve(
        &self,
        by: &Path,
        id: &str,
        comment: &str,
    ) -> Result<pb::AccessRequest, Status> {
        approve_on(self.ca.channel_as(by).await, id, comment).await
    }

    async fn deny(&self, by: &Path, id: &str, reason: &str) -> Result<pb::AccessRequest, Status> {
        self.client(by)
            .await
            .deny(decision(id, reason))
            .await
            .map(|r| r.into_inner())
    }

    async fn revoke(&self, by: &Path, id: &str, reason: &str) -> Result<pb::AccessRequest, Status> {
        self.client(by)
            .await
            .revoke(decision(id, reason))
            .await
            .map(|r| r.into_inner())
    }

    async fn list(&self, by: &Path, pending_only: bool) -> Vec<pb::AccessRequest> {
        self.client(by)
            .await
            .list(pb::AccessListRequest {
                pending_only,
                spiffe_id: String::new(),
            })
            .await
            .expect("list")
            .into_inner()
            .requests
    }

    /// The record `id` as the admin sees it.
    async fn get(&self, id: &str) -> pb::AccessRequest {
        self.list(&self.admin(), false)
            .await
            .into_iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("request {id} is not listed"))
    }

    /// Renews the credential in `dir` (writing it back) and returns what the new leaf's DER says.
    async fn renew(&self, dir: &Path, ttl_secs: u32) -> SvidInfo {
        let resp = self.ca.renew(dir, ttl_secs).await.expect("renewal");
        leaf(&resp)
    }

    /// Audit events of the access kinds about request `id`, in log order.
    async fn access_events(&self, id: &str) -> Vec<AuditRecord> {
        self.ca
            .audit_log()
            .await
            .into_iter()
            .filter(|e| e.kind.starts_with("access_") && e.reason.contains(id))
            .collect()
    }
}

fn decision(id: &str, comment: &str) -> pb::AccessDecision {
    pb::AccessDecision {
        id: id.into(),
        comment: comment.into(),
    }
}

async fn approve_on(ch: Channel, id: &str, comment: &str) -> Result<pb::AccessRequest, Status> {
    AccessClient::new(ch)
        .approve(decision(id, comment))
        .await
        .map(|r| r.into_inner())
}

/// What the leaf certificate (DER) of an Issue response says.
fn leaf(resp: &pb::IssueResponse) -> SvidInfo {
    let der = CertificateDer::from(resp.cert_chain[0].as_slice());
    parse_svid(&der, &RolesOid::default()).expect("leaf is an SVID")
}

fn svid_in(dir: &Path) -> SvidInfo {
    Credential::load(dir, &RolesOid::default()).unwrap().svid
}

fn roles(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

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

async fn check(ca: &TestCa, serial: &str) -> pb::CheckResponse {
    RevocationClient::new(ca.admin_channel().await)
        .check(pb::CheckRequest {
            serial: serial.into(),
        })
        .await
        .expect("check")
        .into_inner()
}

/// Polls the record `id` until its state is `state` (every 100 ms, up to `timeout`).
async fn wait_state(w: &World, id: &str, state: &str, timeout: Duration) -> pb::AccessRequest {
    let deadline = Instant::now() + timeout;
    loop {
        let r = w.get(id).await;
        if r.state == state {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "request {id} still {} after {timeout:?}, expected {state}",
            r.state
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sleeps until the Unix clock (whole seconds) reaches `t`.
async fn sleep_until_unix(t: i64) {
    while unix_now() < t {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kinds(events: &[AuditRecord]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

// === 1. the full path ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_approve_renewal_carries_role_until_grant_end_then_drops_it() {
    let w = World::start().await;
    let before = svid_in(&w.api);
    assert_eq!(before.roles, roles(&["db-read"]));

    let reason = "INC-4211: repair orders table";
    let req = w
        .request(&w.api, API, &["db-write"], 4, reason)
        .await
        .expect("the subject may request a requestable role");
    assert_eq!(req.state, "pending");
    assert_eq!(req.spiffe_id, API);
    assert_eq!(req.requester, API);
    assert_eq!(req.roles, roles(&["db-write"]));
    assert_eq!(req.duration_seconds, 4);
    assert_eq!(req.reason, reason);
    assert_eq!(req.approvals_needed, 1);
    assert!(req.approvals.is_empty());
    assert_eq!(req.granted_at, 0);
    // Default access_request_ttl: 1 h.
    assert_eq!(req.expires_at, req.created_at + 3600);
    assert_eq!(req.id.len(), 16, "id {:?}", req.id);

    // Pending grants nothing.
    let pending = w.renew(&w.api, 60).await;
    assert_eq!(pending.roles, roles(&["db-read"]));

    let granted = w
        .approve(&w.alice, &req.id, "checked INC-4211")
        .await
        .expect("alice approves");
    assert_eq!(granted.state, "granted");
    assert_eq!(granted.approvals.len(), 1);
    assert_eq!(granted.approvals[0].approver, ALICE);
    assert_eq!(granted.approvals[0].comment, "checked INC-4211");
    assert!(granted.granted_at >= req.created_at && granted.granted_at <= unix_now());
    let end = granted.expires_at;
    assert_eq!(
        end,
        granted.granted_at + 4,
        "the grant lasts the requested 4 s"
    );
    assert_eq!(w.get(&req.id).await.state, "granted");

    // The next renewal carries the role, and its notAfter is clipped to the grant's end (the
    // certificate asked for 60 s).
    let with = w.renew(&w.api, 60).await;
    assert!(
        unix_now() < end,
        "the renewal came too late to test the grant"
    );
    assert_eq!(with.roles, roles(&["db-read", "db-write"]));
    assert_eq!(with.not_after, end, "notAfter is the grant's end");
    // The credential written to disk is the same certificate.
    assert_eq!(svid_in(&w.api).serial, with.serial);

    // After the end, the next renewal drops the role and gets its full lifetime again.
    sleep_until_unix(end).await;
    let after = w.renew(&w.api, 60).await;
    assert_eq!(after.roles, roles(&["db-read"]));
    let now = unix_now();
    assert!(
        after.not_after >= now + 58 && after.not_after <= now + 60,
        "notAfter {} is not ~60 s after {now}",
        after.not_after
    );

    // The sweeper ends the grant within a couple of seconds of its end.
    let ended = wait_state(&w, &req.id, "ended", Duration::from_secs(5)).await;
    assert_eq!(ended.approvals.len(), 1);
    assert!(w.list(&w.admin(), true).await.is_empty());

    let events = w.access_events(&req.id).await;
    assert_eq!(
        kinds(&events),
        [
            "access_requested",
            "access_approved",
            "access_granted",
            "access_ended"
        ]
    );
    let (requested, approved, grant, end_ev) = (&events[0], &events[1], &events[2], &events[3]);
    assert_eq!(requested.actor, API);
    assert_eq!(requested.subject, API);
    assert_eq!(requested.roles, roles(&["db-write"]));
    assert_eq!(
        requested.reason,
        format!("request {} for 4s (1 approvals needed): {reason}", req.id)
    );
    assert_eq!(approved.actor, ALICE);
    assert_eq!(approved.subject, API);
    assert_eq!(
        approved.reason,
        format!("request {}: approval 1/1: checked INC-4211", req.id)
    );
    assert_eq!(grant.actor, ALICE);
    assert_eq!(grant.not_after, end);
    assert!(
        grant
            .reason
            .starts_with(&format!("grant {} until ", req.id))
            && grant
                .reason
                .ends_with(&format!("after 1 approvals ({ALICE}): {reason}")),
        "{}",
        grant.reason
    );
    assert_eq!(end_ev.actor, "lanyard");
    assert_eq!(end_ev.subject, API);
    assert_eq!(end_ev.roles, roles(&["db-write"]));
    assert_eq!(end_ev.reason, format!("grant {} ran out", req.id));
    assert!(
        end_ev.time_ms >= end * 1000 && end_ev.time_ms <= end * 1000 + 3000,
        "access_ended at {} ms, the grant ended at {end} s",
        end_ev.time_ms
    );

    // The renewals are on the record with the roles they carried.
    let renewals: Vec<AuditRecord> =
        w.ca.audit_log()
            .await
            .into_iter()
            .filter(|e| e.kind == "renewed" && e.subject == API)
            .collect();
    let carried: Vec<&AuditRecord> = renewals
        .iter()
        .filter(|e| e.roles.contains(&"db-write".to_string()))
        .collect();
    assert_eq!(carried.len(), 1, "exactly one renewal carried db-write");
    assert_eq!(carried[0].serial, with.serial.to_hex());
    assert_eq!(carried[0].not_after, end);
}

// === 2. self-approval ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requester_and_subject_can_never_approve_even_as_approvers() {
    let w = World::start().await;

    // An approver asking for itself: it is both requester and subject.
    let own = w
        .request(&w.alice, ALICE, &["db-write"], 600, "INC-7: hotfix")
        .await
        .expect("alice may request for herself");
    assert_eq!(own.requester, ALICE);
    assert_status(
        w.approve(&w.alice, &own.id, "lgtm").await,
        Code::PermissionDenied,
        "the requester and the subject never approve their own access",
    );
    let still = w.get(&own.id).await;
    assert_eq!(still.state, "pending");
    assert!(still.approvals.is_empty(), "a refused approval was counted");
    // Without a role in the certificate, alice's renewal carries nothing extra.
    assert_eq!(
        w.renew(&w.alice, 60).await.roles,
        roles(&["lanyard:approver"])
    );
    let done = w
        .approve(&w.bob, &own.id, "ok")
        .await
        .expect("someone else may");
    assert_eq!(done.state, "granted");
    assert_eq!(
        w.renew(&w.alice, 60).await.roles,
        roles(&["db-write", "lanyard:approver"])
    );

    // An admin (who is also an approver) asking on behalf of another approver: neither the
    // requester nor the subject may approve, a third approver may.
    let behalf = w
        .request(&w.lead, BOB, &["db-write"], 600, "INC-8: bob repairs")
        .await
        .expect("an admin may request on someone's behalf");
    assert_eq!(behalf.requester, LEAD);
    assert_eq!(behalf.spiffe_id, BOB);
    let s = assert_status(
        w.approve(&w.lead, &behalf.id, "").await,
        Code::PermissionDenied,
        "cannot approve request",
    );
    assert!(s.message().contains(LEAD), "{}", s.message());
    let s = assert_status(
        w.approve(&w.bob, &behalf.id, "").await,
        Code::PermissionDenied,
        "cannot approve request",
    );
    assert!(s.message().contains(BOB), "{}", s.message());
    // The subject that is no approver at all is refused for lacking the role.
    let wl = w
        .request(&w.api, API, &["deploy"], 60, "CHG-1: deploy")
        .await
        .unwrap();
    assert_status(
        w.approve(&w.api, &wl.id, "").await,
        Code::PermissionDenied,
        "lacks lanyard:approver",
    );
    // An admin without lanyard:approver cannot approve either.
    assert_status(
        w.approve(&w.admin(), &wl.id, "").await,
        Code::PermissionDenied,
        "lacks lanyard:approver",
    );
    assert!(w.get(&behalf.id).await.approvals.is_empty());
    let done = w
        .approve(&w.carol, &behalf.id, "")
        .await
        .expect("carol may");
    assert_eq!(done.state, "granted");
    assert_eq!(done.approvals.len(), 1);
    assert_eq!(done.approvals[0].approver, CAROL);

    let approvals: Vec<(String, String)> =
        w.ca.audit_log()
            .await
            .into_iter()
            .filter(|e| e.kind == "access_approved")
            .map(|e| (e.actor, e.subject))
            .collect();
    assert_eq!(
        approvals,
        [
            (BOB.to_string(), ALICE.to_string()),
            (CAROL.to_string(), BOB.to_string())
        ],
        "refused approvals left no approval on the record"
    );
}

// === 3. several approvers ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_approvals_needed_from_distinct_approvers() {
    let w = World::start().await;
    let req = w
        .request(&w.pay, PAY, &["db-admin"], 60, "INC-9: reindex ledger")
        .await
        .expect("payments may request db-admin");
    assert_eq!(req.approvals_needed, 2, "the narrower rule applies");

    let one = w.approve(&w.alice, &req.id, "first").await.unwrap();
    assert_eq!(one.state, "pending");
    assert_eq!(one.approvals.len(), 1);
    assert_eq!(one.approvals[0].approver, ALICE);
    assert_eq!(one.granted_at, 0);
    assert_eq!(one.expires_at, req.expires_at, "still the pending deadline");
    assert_eq!(
        w.renew(&w.pay, 60).await.roles,
        roles(&["db-read"]),
        "one of two approvals grants nothing"
    );

    assert_status(
        w.approve(&w.alice, &req.id, "again").await,
        Code::FailedPrecondition,
        "already approved",
    );
    let still = w.get(&req.id).await;
    assert_eq!(still.state, "pending");
    assert_eq!(still.approvals.len(), 1, "the same approver counts once");

    let two = w.approve(&w.bob, &req.id, "second").await.unwrap();
    assert_eq!(two.state, "granted");
    let who: Vec<&str> = two.approvals.iter().map(|a| a.approver.as_str()).collect();
    assert_eq!(who, [ALICE, BOB]);
    assert_eq!(two.expires_at, two.granted_at + 60);
    let svid = w.renew(&w.pay, 600).await;
    assert_eq!(svid.roles, roles(&["db-admin", "db-read"]));
    assert_eq!(svid.not_after, two.expires_at);

    // A third approval is too late.
    assert_status(
        w.approve(&w.carol, &req.id, "").await,
        Code::FailedPrecondition,
        "is granted, not pending",
    );

    let events = w.access_events(&req.id).await;
    assert_eq!(
        kinds(&events),
        [
            "access_requested",
            "access_approved",
            "access_approved",
            "access_granted"
        ]
    );
    assert!(
        events[0]
            .reason
            .contains("for 60s (2 approvals needed): INC-9")
    );
    assert_eq!(events[1].actor, ALICE);
    assert_eq!(
        events[1].reason,
        format!("request {}: approval 1/2: first", req.id)
    );
    assert_eq!(events[2].actor, BOB);
    assert_eq!(
        events[2].reason,
        format!("request {}: approval 2/2: second", req.id)
    );
    assert_eq!(events[3].actor, BOB);
    assert!(
        events[3]
            .reason
            .contains(&format!("after 2 approvals ({ALICE}, {BOB}): INC-9")),
        "{}",
        events[3].reason
    );
}

// === 4. denial and withdrawal ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_or_withdrawn_requests_are_closed_for_good() {
    let w = World::start().await;

    let req = w
        .request(&w.api, API, &["db-write"], 600, "INC-10: bulk fix")
        .await
        .unwrap();
    assert_status(
        w.deny(&w.dev, &req.id, "no").await,
        Code::PermissionDenied,
        "lacks lanyard:approver and did not make request",
    );
    assert_status(
        w.deny(&w.alice, &req.id, "  ").await,
        Code::InvalidArgument,
        "reason is required",
    );
    let denied = w
        .deny(&w.alice, &req.id, "change freeze until Monday")
        .await
        .expect("an approver denies");
    assert_eq!(denied.state, "denied");
    assert_eq!(denied.closed_by, ALICE);
    assert_eq!(denied.close_reason, "change freeze until Monday");
    assert_status(
        w.approve(&w.bob, &req.id, "").await,
        Code::FailedPrecondition,
        "is denied, not pending",
    );
    assert_status(
        w.deny(&w.bob, &req.id, "also no").await,
        Code::FailedPrecondition,
        "not pending",
    );
    assert_status(
        w.revoke(&w.bob, &req.id, "x").await,
        Code::FailedPrecondition,
        "is not active",
    );
    assert_eq!(w.get(&req.id).await.state, "denied");
    assert_eq!(w.renew(&w.api, 60).await.roles, roles(&["db-read"]));

    // The requester withdraws its own request (it holds no approver role).
    let mine = w
        .request(&w.api, API, &["deploy"], 300, "CHG-2: hotfix deploy")
        .await
        .unwrap();
    let withdrawn = w
        .deny(&w.api, &mine.id, "fixed without it")
        .await
        .expect("the requester may withdraw");
    assert_eq!(withdrawn.state, "denied");
    assert_eq!(withdrawn.closed_by, API);
    assert_status(
        w.approve(&w.alice, &mine.id, "").await,
        Code::FailedPrecondition,
        "is denied, not pending",
    );
    assert_eq!(w.renew(&w.api, 60).await.roles, roles(&["db-read"]));
    assert!(w.list(&w.alice, true).await.is_empty());

    // Unknown ids.
    assert_status(
        w.approve(&w.alice, "0123456789abcdef", "").await,
        Code::NotFound,
        "no access request 0123456789abcdef",
    );

    let ev = w.access_events(&req.id).await;
    assert_eq!(kinds(&ev), ["access_requested", "access_denied"]);
    assert_eq!(ev[1].actor, ALICE);
    assert_eq!(ev[1].subject, API);
    assert_eq!(
        ev[1].reason,
        format!("request {}: change freeze until Monday", req.id)
    );
    let ev = w.access_events(&mine.id).await;
    assert_eq!(kinds(&ev), ["access_requested", "access_denied"]);
    assert_eq!(ev[1].actor, API);
    assert_eq!(
        ev[1].reason,
        format!("request {}: fixed without it", mine.id)
    );
}

// === 5. early revoke ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_grant_revokes_its_certificates_renewably() {
    let w = World::start().await;
    let plain = svid_in(&w.api);
    let req = w
        .request(&w.api, API, &["db-write"], 600, "INC-11: migrate")
        .await
        .unwrap();
    let grant = w.approve(&w.alice, &req.id, "").await.unwrap();
    assert_eq!(grant.state, "granted");
    let with = w.renew(&w.api, 120).await;
    assert_eq!(with.roles, roles(&["db-read", "db-write"]));
    // Keep a copy of the credential that carries the role.
    let old = w.ca.dir.path().join("api-with-role");
    copy_dir(&w.api, &old);

    assert_status(
        w.revoke(&w.api, &req.id, "done").await,
        Code::PermissionDenied,
        "lacks lanyard:approver or lanyard:admin",
    );
    assert_status(
        w.revoke(&w.alice, &req.id, "").await,
        Code::InvalidArgument,
        "reason is required",
    );
    let revoked = w
        .revoke(&w.alice, &req.id, "INC-11 resolved")
        .await
        .expect("an approver revokes");
    assert_eq!(revoked.state, "revoked");
    assert_eq!(revoked.closed_by, ALICE);
    assert_eq!(revoked.close_reason, "INC-11 resolved");
    assert!(revoked.expires_at <= unix_now());

    // The certificate with the role is revoked; the one from before the grant is not.
    let c = check(&w.ca, &with.serial.to_hex()).await;
    assert!(c.revoked, "the certificate carrying the grant is revoked");
    let e = c.entry.unwrap();
    assert_eq!(e.spiffe_id, API);
    assert!(!e.identity_rule);
    assert_eq!(
        e.reason,
        format!("grant {} revoked: INC-11 resolved", req.id)
    );
    assert_eq!(e.expires_at, with.not_after + GRACE);
    assert!(!check(&w.ca, &plain.serial.to_hex()).await.revoked);

    // Any other call with it is refused...
    let ch = w.ca.channel_as(&old).await;
    let refused = AccessClient::new(ch)
        .list(pb::AccessListRequest::default())
        .await;
    let s = assert_status(refused, Code::FailedPrecondition, "was revoked");
    assert!(
        s.message().contains(&with.serial.to_string())
            || s.message().contains(&with.serial.to_hex()),
        "{}",
        s.message()
    );
    // ...but it may renew, and gets a certificate without the role, which is not revoked.
    let renewed = w.renew(&old, 120).await;
    assert_eq!(renewed.roles, roles(&["db-read"]));
    assert_ne!(renewed.serial, with.serial);
    assert!(!check(&w.ca, &renewed.serial.to_hex()).await.revoked);
    assert!(w.list(&old, false).await.iter().any(|r| r.id == req.id));
    // The identity itself is not blocked: the credential without the role renews too.
    assert_eq!(w.renew(&w.api, 60).await.roles, roles(&["db-read"]));

    assert_status(
        w.revoke(&w.alice, &req.id, "again").await,
        Code::FailedPrecondition,
        "is not active (state revoked)",
    );

    // An admin may revoke too.
    let second = w
        .request(&w.api, API, &["deploy"], 600, "CHG-3: deploy")
        .await
        .unwrap();
    w.approve(&w.bob, &second.id, "").await.unwrap();
    assert_eq!(
        w.renew(&w.api, 60).await.roles,
        roles(&["db-read", "deploy"])
    );
    let by_admin = w
        .revoke(&w.admin(), &second.id, "change window closed")
        .await
        .expect("an admin revokes");
    assert_eq!(by_admin.state, "revoked");
    assert_eq!(by_admin.closed_by, ADMIN);
    assert_eq!(w.renew(&w.api, 60).await.roles, roles(&["db-read"]));

    let ev = w.access_events(&req.id).await;
    assert_eq!(
        kinds(&ev),
        [
            "access_requested",
            "access_approved",
            "access_granted",
            "access_revoked"
        ]
    );
    assert_eq!(ev[3].actor, ALICE);
    assert_eq!(
        ev[3].reason,
        format!("grant {}: INC-11 resolved (1 certificates revoked)", req.id)
    );
    // Revoked grants are not ended again by the sweeper.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.access_events(&req.id).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_a_grant_during_renewals_leaves_no_certificate_with_the_role_unrevoked() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let w = World::start().await;
    let id = svid_in(&w.api).spiffe_id;
    for round in 0..3 {
        let req = w
            .request(&w.api, API, &["db-write"], 600, &format!("INC-70.{round}"))
            .await
            .unwrap();
        w.approve(&w.alice, &req.id, "").await.unwrap();
        // Six clients renew as fast as they can (with the credential from before the grant,
        // which stays valid), while an approver revokes the grant.
        let stop = Arc::new(AtomicBool::new(false));
        let issued: Arc<Mutex<Vec<SvidInfo>>> = Arc::default();
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let mut ca = CaClient::new(w.ca.channel_as(&w.api).await);
            let (stop, issued, id) = (stop.clone(), issued.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let key = rcgen::KeyPair::generate().unwrap();
                    let resp = ca
                        .issue(pb::IssueRequest {
                            csr: lanyard::client::csr_for(&id, &key).unwrap(),
                            join_token: String::new(),
                            jwt: String::new(),
                            ttl_seconds: 60,
                            roles: vec![],
                        })
                        .await
                        .expect("renewal");
                    issued.lock().unwrap().push(leaf(&resp.into_inner()));
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        w.revoke(&w.bob, &req.id, "INC over").await.expect("revoke");
        let after: Vec<SvidInfo> = {
            let n = issued.lock().unwrap().len();
            tokio::time::sleep(Duration::from_millis(200)).await;
            issued.lock().unwrap()[n..].to_vec()
        };
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        // Certificates requested after the revocation returned: none carries the role (a
        // renewal in flight at that moment may finish just after; allow one per client).
        let late: Vec<&SvidInfo> = after
            .iter()
            .filter(|s| s.roles.contains(&"db-write".to_string()))
            .collect();
        assert!(
            late.len() <= 6,
            "round {round}: {} late certificates",
            late.len()
        );
        let with: Vec<SvidInfo> = issued
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.roles.contains(&"db-write".to_string()))
            .cloned()
            .collect();
        assert!(!with.is_empty(), "round {round}: nothing carried the grant");
        let mut rc = RevocationClient::new(w.ca.admin_channel().await);
        for s in &with {
            let c = rc
                .check(pb::CheckRequest {
                    serial: s.serial.to_hex(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                c.revoked,
                "round {round}: certificate {} carries the revoked grant but is not revoked",
                s.serial
            );
        }
    }
}

/// Revokes `target` as the local admin (by serial or identity, or lifts an identity).
async fn admin_revoke(ca: &TestCa, target: pb::revoke_request::Target, reason: &str, lift: bool) {
    RevocationClient::new(ca.admin_channel().await)
        .revoke(pb::RevokeRequest {
            target: Some(target),
            reason: reason.into(),
            lift,
        })
        .await
        .expect("admin revokes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_grant_never_softens_an_earlier_revocation() {
    use pb::revoke_request::Target;
    let w = World::start().await;
    let web = w.ca.enroll("web", WEB, &["db-read"], 300).await;

    // A certificate carrying a grant is revoked for good (a leaked key), then the grant is
    // revoked: the certificate must stay unable to renew.
    let req = w
        .request(&w.api, API, &["db-write"], 600, "INC-60")
        .await
        .unwrap();
    w.approve(&w.alice, &req.id, "").await.unwrap();
    let leaked = w.renew(&w.api, 120).await;
    assert!(leaked.roles.contains(&"db-write".to_string()));
    admin_revoke(
        &w.ca,
        Target::Serial(leaked.serial.to_hex()),
        "key leaked",
        false,
    )
    .await;
    let stolen = w.ca.dir.path().join("stolen");
    copy_dir(&w.api, &stolen);
    assert_status(
        w.ca.renew(&stolen, 60).await,
        Code::FailedPrecondition,
        "key leaked",
    );
    let revoked = w.revoke(&w.alice, &req.id, "INC-60 over").await.unwrap();
    assert_eq!(revoked.state, "revoked");
    let c = check(&w.ca, &leaked.serial.to_hex()).await;
    assert!(c.revoked);
    assert_eq!(
        c.entry.unwrap().reason,
        "key leaked",
        "the grant revocation replaced the admin's revocation"
    );
    assert_status(
        w.ca.renew(&stolen, 60).await,
        Code::FailedPrecondition,
        "key leaked",
    );

    // The same after an identity revocation that was lifted: the old certificates stay revoked.
    let req = w
        .request(&w.admin(), WEB, &["deploy"], 600, "CHG-60")
        .await
        .unwrap();
    w.approve(&w.bob, &req.id, "").await.unwrap();
    let old = w.renew(&web, 120).await;
    assert!(old.roles.contains(&"deploy".to_string()));
    let old_dir = w.ca.dir.path().join("web-old");
    copy_dir(&web, &old_dir);
    admin_revoke(
        &w.ca,
        Target::SpiffeId(WEB.into()),
        "host compromised",
        false,
    )
    .await;
    admin_revoke(&w.ca, Target::SpiffeId(WEB.into()), "host rebuilt", true).await;
    assert_status(
        w.ca.renew(&old_dir, 60).await,
        Code::FailedPrecondition,
        "host compromised",
    );
    w.revoke(&w.bob, &req.id, "CHG-60 over").await.unwrap();
    assert_status(
        w.ca.renew(&old_dir, 60).await,
        Code::FailedPrecondition,
        "host compromised",
    );
    assert_eq!(
        w.access_events(&req.id).await.last().unwrap().reason,
        format!("grant {}: CHG-60 over (0 certificates revoked)", req.id)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["cert.pem", "key.pem", "bundle.pem"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

// === 6. expiry of pending requests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_requests_expire_when_nobody_acts() {
    let w = World::start_with("access_request_ttl = \"2s\"").await;
    let req = w
        .request(&w.api, API, &["db-write"], 600, "INC-12: nobody around")
        .await
        .unwrap();
    assert_eq!(req.expires_at, req.created_at + 2);
    assert_eq!(w.list(&w.alice, true).await.len(), 1);

    let expired = wait_state(&w, &req.id, "expired", Duration::from_secs(6)).await;
    assert!(unix_now() >= req.expires_at);
    assert!(expired.approvals.is_empty());
    assert_status(
        w.approve(&w.alice, &req.id, "").await,
        Code::FailedPrecondition,
        "is expired, not pending",
    );
    assert_status(
        w.deny(&w.alice, &req.id, "late").await,
        Code::FailedPrecondition,
        "is expired, not pending",
    );
    assert!(w.list(&w.alice, true).await.is_empty());
    assert_eq!(w.renew(&w.api, 60).await.roles, roles(&["db-read"]));

    let ev = w.access_events(&req.id).await;
    assert_eq!(kinds(&ev), ["access_requested", "access_expired"]);
    assert_eq!(ev[1].actor, "lanyard");
    assert_eq!(ev[1].subject, API);
    assert_eq!(ev[1].roles, roles(&["db-write"]));
    assert_eq!(
        ev[1].reason,
        format!("request {}: no decision in time", req.id)
    );
    assert!(ev[1].time_ms >= req.expires_at * 1000);
}

// === 7. what may be requested, by whom ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requestable_roles_for_bounded_durations_by_the_subject_or_an_admin() {
    let w = World::start().await;
    let r = w
        .request(&w.api, API, &["lanyard:admin"], 60, "why not")
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "role \"lanyard:admin\" is not requestable for spiffe://example.org/ns/prod/api (requestable: db-write,deploy)",
    );
    // A role the policy already gives is not requestable either (nothing to elevate).
    assert_status(
        w.request(&w.api, API, &["db-read", "db-write"], 60, "x")
            .await,
        Code::PermissionDenied,
        "role \"db-read\" is not requestable",
    );
    // The most specific [[access]] rule decides: payments may ask only for db-admin.
    assert_status(
        w.request(&w.pay, PAY, &["db-write"], 60, "x").await,
        Code::PermissionDenied,
        "(requestable: db-admin)",
    );
    assert_status(
        w.request(&w.api, API, &["db-write"], 30 * 60 + 1, "INC-13")
            .await,
        Code::PermissionDenied,
        "duration 1801s is above the maximum of 1800s",
    );
    assert_status(
        w.request(&w.dev, DEV, &["db-write"], 60, "INC-13").await,
        Code::PermissionDenied,
        "no [[access]] rule lets spiffe://example.org/ns/dev/tool request roles",
    );
    // A workload (even an approver) may ask only for itself.
    assert_status(
        w.request(&w.api, WEB, &["db-write"], 60, "INC-13").await,
        Code::PermissionDenied,
        "may only request access for itself",
    );
    assert_status(
        w.request(&w.alice, API, &["db-write"], 60, "INC-13").await,
        Code::PermissionDenied,
        "may only request access for itself",
    );
    assert_status(
        w.request(&w.api, API, &["db-write"], 60, " ").await,
        Code::InvalidArgument,
        "a reason is required",
    );
    assert_status(
        w.request(&w.api, API, &[], 60, "INC-13").await,
        Code::InvalidArgument,
        "at least one role",
    );
    assert_status(
        w.request(&w.api, API, &["db-write"], 0, "INC-13").await,
        Code::InvalidArgument,
        "duration must be positive",
    );
    assert_status(
        w.request(&w.api, API, &["Bad Role"], 60, "INC-13").await,
        Code::InvalidArgument,
        "",
    );
    // Without a client certificate: nothing.
    let anon = AccessClient::new(w.ca.anon_channel().await)
        .request(pb::AccessRequestCreate {
            spiffe_id: API.into(),
            roles: roles(&["db-write"]),
            duration_seconds: 60,
            reason: "INC-13".into(),
        })
        .await;
    assert_status(anon, Code::Unauthenticated, "client certificate");
    assert!(
        w.list(&w.admin(), false).await.is_empty(),
        "a refused request left a record"
    );

    // An admin may ask on behalf of a workload; the grant is the workload's.
    let web = w.ca.enroll("web", WEB, &["db-read"], 300).await;
    let r = w
        .request(&w.admin(), WEB, &["deploy"], 1800, "CHG-4: release 2.3")
        .await
        .expect("an admin may request for another identity");
    assert_eq!(r.requester, ADMIN);
    assert_eq!(r.spiffe_id, WEB);
    assert_eq!(r.duration_seconds, 1800, "exactly the maximum is allowed");
    w.approve(&w.alice, &r.id, "").await.unwrap();
    assert_eq!(w.renew(&web, 60).await.roles, roles(&["db-read", "deploy"]));
    // ...and only that workload: the other one's renewal is unchanged.
    assert_eq!(w.renew(&w.api, 60).await.roles, roles(&["db-read"]));

    // Who sees what: the subject and requesters see their own; approvers and admins all.
    let mine = w
        .request(&w.api, API, &["db-write"], 60, "INC-14")
        .await
        .unwrap();
    // Free text is bounded, approval comments included (refused, not silently dropped).
    let long = "x".repeat(1025);
    assert_status(
        w.approve(&w.alice, &mine.id, &long).await,
        Code::InvalidArgument,
        "longer than 1024 bytes",
    );
    assert!(w.get(&mine.id).await.approvals.is_empty());
    assert_status(
        w.request(&w.api, API, &["db-write"], 60, &long).await,
        Code::InvalidArgument,
        "longer than 1024 bytes",
    );
    let seen_by =
        |v: Vec<pb::AccessRequest>| -> Vec<String> { v.into_iter().map(|r| r.id).collect() };
    assert_eq!(
        seen_by(w.list(&w.api, false).await),
        std::slice::from_ref(&mine.id)
    );
    assert_eq!(
        seen_by(w.list(&web, false).await),
        std::slice::from_ref(&r.id)
    );
    assert!(w.list(&w.dev, false).await.is_empty());
    let all = seen_by(w.list(&w.bob, false).await);
    assert_eq!(all.len(), 2);
    assert!(all.contains(&mine.id) && all.contains(&r.id));
    assert_eq!(
        seen_by(w.list(&w.lead, true).await),
        std::slice::from_ref(&mine.id)
    );

    let requested: Vec<AuditRecord> =
        w.ca.audit_log()
            .await
            .into_iter()
            .filter(|e| e.kind == "access_requested")
            .collect();
    assert_eq!(
        requested.len(),
        2,
        "only the accepted requests are recorded"
    );
    assert_eq!(requested[0].actor, ADMIN);
    assert_eq!(requested[0].subject, WEB);
}

// === 8. two approvers at once ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_approvals_are_counted_exactly_once() {
    let w = World::start().await;
    let alice = w.ca.channel_as(&w.alice).await;
    let bob = w.ca.channel_as(&w.bob).await;

    for round in 0..4 {
        // (a) Two approvals needed, both arrive at once: granted, each approval once.
        let req = w
            .request(&w.pay, PAY, &["db-admin"], 60, &format!("INC-20.{round}"))
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            approve_on(alice.clone(), &req.id, "a"),
            approve_on(bob.clone(), &req.id, "b")
        );
        let (a, b) = (a.expect("alice's approval"), b.expect("bob's approval"));
        let mut states = [a.state.as_str(), b.state.as_str()];
        states.sort_unstable();
        assert_eq!(states, ["granted", "pending"], "round {round}");
        let rec = w.get(&req.id).await;
        assert_eq!(rec.state, "granted");
        let mut who: Vec<&str> = rec.approvals.iter().map(|a| a.approver.as_str()).collect();
        who.sort_unstable();
        assert_eq!(who, [ALICE, BOB], "round {round}");
        let ev = w.access_events(&req.id).await;
        assert_eq!(
            kinds(&ev),
            [
                "access_requested",
                "access_approved",
                "access_approved",
                "access_granted"
            ],
            "round {round}"
        );
        assert!(ev[1].reason.contains("approval 1/2") && ev[2].reason.contains("approval 2/2"));
        assert_ne!(ev[1].actor, ev[2].actor);

        // (b) One approval needed, two at once: exactly one wins.
        let req = w
            .request(&w.api, API, &["deploy"], 60, &format!("CHG-20.{round}"))
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            approve_on(alice.clone(), &req.id, "a"),
            approve_on(bob.clone(), &req.id, "b")
        );
        let (ok, lost) = match (a, b) {
            (Ok(ok), Err(lost)) | (Err(lost), Ok(ok)) => (ok, lost),
            (a, b) => panic!("round {round}: expected one success and one refusal: {a:?} / {b:?}"),
        };
        assert_eq!(ok.state, "granted");
        assert_eq!(ok.approvals.len(), 1);
        assert_eq!(lost.code(), Code::FailedPrecondition, "{}", lost.message());
        assert!(
            lost.message().contains("is granted, not pending"),
            "{}",
            lost.message()
        );
        let rec = w.get(&req.id).await;
        assert_eq!(rec.approvals.len(), 1);
        assert_eq!(rec.approvals[0].approver, ok.approvals[0].approver);
        let ev = w.access_events(&req.id).await;
        assert_eq!(
            kinds(&ev),
            ["access_requested", "access_approved", "access_granted"],
            "round {round}"
        );
        assert_eq!(ev[1].actor, ok.approvals[0].approver);
    }
    // Every grant ended up in the certificates.
    assert_eq!(
        w.renew(&w.pay, 30).await.roles,
        roles(&["db-admin", "db-read"])
    );
    assert_eq!(
        w.renew(&w.api, 30).await.roles,
        roles(&["db-read", "deploy"])
    );
}

// === 9. notifications ===

/// One HTTP request as the listener received it.
struct Received {
    head: String,
    body: Vec<u8>,
}

/// Accepts one connection on `listener`, reads one request and answers 200.
async fn serve_one(listener: tokio::net::TcpListener) -> Received {
    let (sock, _) = listener.accept().await.expect("accept");
    read_one(sock).await
}

/// Reads one HTTP/1.1 request from `sock` and answers 200.
async fn read_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut sock: S,
) -> Received {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed before the headers ended");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("Content-Length header");
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .expect("answer");
    let _ = sock.shutdown().await;
    Received {
        head,
        body: buf[head_end..head_end + len].to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_requests_reach_the_webhook_and_the_notify_command() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hook = tokio::spawn(serve_one(listener));
    let work = tempfile::tempdir().unwrap();
    let env_file = work.path().join("notify.env");
    let extra = format!(
        "access_webhook = \"http://127.0.0.1:{port}/hooks/lanyard\"\n\
         access_notify_cmd = 'env | grep ^LANYARD_ACCESS_ > \"{0}.tmp\" && mv \"{0}.tmp\" \"{0}\"'\n",
        env_file.display()
    );
    let w = World::start_with(&extra).await;
    let reason = "INC-30: orders table \"stuck\"; $HOME stays literal";
    let req = w
        .request(&w.lead, API, &["deploy", "db-write"], 900, reason)
        .await
        .unwrap();

    let got = tokio::time::timeout(Duration::from_secs(10), hook)
        .await
        .expect("the webhook was called within 10 s")
        .expect("listener task");
    let first = got.head.lines().next().unwrap();
    assert_eq!(first, "POST /hooks/lanyard HTTP/1.1");
    assert!(
        got.head
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{}",
        got.head
    );
    let body: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON body");
    assert_eq!(body["event"], "access_requested");
    assert_eq!(body["id"], req.id.as_str());
    assert_eq!(body["spiffe_id"], API);
    assert_eq!(body["roles"], serde_json::json!(["db-write", "deploy"]));
    assert_eq!(body["duration_seconds"], 900);
    assert_eq!(body["reason"], reason);
    assert_eq!(body["requester"], LEAD);
    assert_eq!(body["approvals_needed"], 1);
    assert_eq!(body["expires_at"], req.expires_at);

    let env = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        std::fs::read_to_string(&env_file).ok()
    })
    .await
    .expect("the notify command wrote its environment");
    let var = |k: &str| -> String {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing from:\n{env}"))
            .to_string()
    };
    assert_eq!(var("LANYARD_ACCESS_ID"), req.id);
    assert_eq!(var("LANYARD_ACCESS_SUBJECT"), API);
    assert_eq!(var("LANYARD_ACCESS_ROLES"), "db-write,deploy");
    assert_eq!(var("LANYARD_ACCESS_DURATION"), "900");
    assert_eq!(var("LANYARD_ACCESS_REASON"), reason);
    assert_eq!(var("LANYARD_ACCESS_REQUESTER"), LEAD);

    // Decisions are not announced: only new requests are (the command runs once).
    std::fs::remove_file(&env_file).unwrap();
    w.approve(&w.alice, &req.id, "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!env_file.exists(), "an approval ran the notify command");
}

/// An https webhook is authenticated with the roots in `access_webhook_ca_file` (here the
/// receiver's self-signed certificate) and gets the same POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_is_delivered_to_a_receiver_the_configured_roots_trust() {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let work = tempfile::tempdir().unwrap();
    let roots = work.path().join("receiver.pem");
    std::fs::write(&roots, cert.pem()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(lanyard::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hook = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        read_one(acceptor.accept(tcp).await.expect("TLS handshake")).await
    });
    let extra = format!(
        "access_webhook = \"https://127.0.0.1:{port}/hooks/lanyard\"\naccess_webhook_ca_file = \"{}\"\n",
        roots.display()
    );
    let w = World::start_with(&extra).await;
    let req = w
        .request(&w.lead, API, &["deploy"], 900, "INC-31: over TLS")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), hook)
        .await
        .expect("the https webhook was called within 10 s")
        .expect("listener task");
    assert_eq!(
        got.head.lines().next().unwrap(),
        "POST /hooks/lanyard HTTP/1.1"
    );
    let body: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON body");
    assert_eq!(body["id"], req.id.as_str());
}

// === 10. a real agent through a revoked grant ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_keeps_running_through_a_revoked_grant_and_drops_the_role() {
    let w = World::start().await;
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("svid");
    let token = w.ca.token(WEB, &["db-read"], 600, 1).await;
    let mut agent = spawn_agent(&w.ca.server(), &token, &out, &["--ttl", "3s"]);
    let first = wait_for_svid(&out, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no certificate written:\n{}", agent.output()));
    assert_eq!(first.roles, roles(&["db-read"]));

    let req = w
        .request(&w.admin(), WEB, &["db-write"], 120, "INC-40: backfill")
        .await
        .unwrap();
    let grant = w.approve(&w.alice, &req.id, "").await.unwrap();
    let with = poll_until(Duration::from_secs(8), Duration::from_millis(25), || {
        dir_svid(&out).filter(|s| s.roles.contains(&"db-write".to_string()))
    })
    .await
    .unwrap_or_else(|| panic!("the agent never got db-write:\n{}", agent.output()));
    assert_eq!(with.roles, roles(&["db-read", "db-write"]));
    assert!(with.not_after <= grant.expires_at);
    assert!(
        with.not_after - with.not_before <= 3 + 30,
        "--ttl 3s (30 s backdated)"
    );
    // Let it rotate at least once more with the role.
    let second = poll_until(Duration::from_secs(6), Duration::from_millis(25), || {
        dir_svid(&out).filter(|s| s.serial != with.serial)
    })
    .await
    .unwrap_or_else(|| panic!("the agent did not rotate:\n{}", agent.output()));
    assert!(second.roles.contains(&"db-write".to_string()));

    let revoked = w
        .revoke(&w.alice, &req.id, "INC-40 done")
        .await
        .expect("revoke");
    let revoked_at = Instant::now();
    assert_eq!(revoked.state, "revoked");
    let ev = w.access_events(&req.id).await;
    let count: usize = ev
        .last()
        .and_then(|e| {
            e.reason
                .rsplit_once(" (")?
                .1
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .expect("revoked count in the reason");
    assert!(
        count >= 2,
        "both certificates with the role were revoked: {}",
        ev.last().unwrap().reason
    );

    let without = poll_until(Duration::from_secs(5), Duration::from_millis(25), || {
        dir_svid(&out).filter(|s| !s.roles.contains(&"db-write".to_string()))
    })
    .await
    .unwrap_or_else(|| panic!("the agent kept the role:\n{}", agent.output()));
    assert_eq!(without.roles, roles(&["db-read"]));
    assert!(
        revoked_at.elapsed() < Duration::from_secs(4),
        "took {:?}",
        revoked_at.elapsed()
    );
    for s in [&with, &second] {
        assert!(
            check(&w.ca, &s.serial.to_hex()).await.revoked,
            "{}",
            s.serial
        );
    }
    assert!(!check(&w.ca, &without.serial.to_hex()).await.revoked);
    assert!(
        !check(&w.ca, &first.serial.to_hex()).await.revoked,
        "a certificate without the role is left alone"
    );

    // It keeps running and rotating, never with the role again.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut serials = vec![without.serial.clone()];
    while Instant::now() < deadline {
        assert!(
            agent.is_running(),
            "the agent exited ({:?}):\n{}",
            agent.child.try_wait(),
            agent.output()
        );
        if let Some(s) = dir_svid(&out) {
            assert!(
                !s.roles.contains(&"db-write".to_string()),
                "db-write came back in {}",
                s.serial
            );
            if !serials.contains(&s.serial) {
                serials.push(s.serial);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serials.len() >= 2, "no rotation after the revocation");
}

// === 11. the CLI ===

/// Runs `lanyard access <args> --credential <cred>` against the CA; returns (ok, stdout, stderr).
async fn cli(ca: &TestCa, cred: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = lanyard_cmd();
    cmd.arg("access")
        .args(args)
        .arg("--credential")
        .arg(cred)
        .env("LANYARD_SERVER", ca.server());
    let out = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run lanyard access");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_request_list_approve_deny_revoke() {
    let w = World::start().await;
    let ca = &w.ca;

    let (ok, out, err) = cli(
        ca,
        &w.api,
        &[
            "request",
            "--spiffe-id",
            API,
            "--roles",
            "db-write,deploy",
            "--duration",
            "30m",
            "--reason",
            "INC-4211: repair orders table",
        ],
    )
    .await;
    assert!(ok, "request failed: {err}");
    let id = out.trim().to_string();
    assert_eq!(id.len(), 16, "stdout is the id: {out:?}");
    assert!(
        err.contains(&format!("request {id} is pending: 1 approval(s) needed")),
        "{err}"
    );

    let (ok, out, err) = cli(ca, &w.alice, &["list", "--pending"]).await;
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.starts_with(&id)).expect(&out);
    for part in [
        " pending ",
        API,
        "roles=db-write,deploy",
        "duration=1800s",
        "approvals=0/1",
        &format!("requester={API}"),
        "reason=\"INC-4211: repair orders table\"",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }

    // Self-approval through the CLI: refused, non-zero exit, the gRPC code in the message.
    let (ok, _, err) = cli(ca, &w.api, &["approve", &id]).await;
    assert!(!ok);
    assert!(err.contains("PermissionDenied"), "{err}");

    let (ok, out, err) = cli(
        ca,
        &w.alice,
        &["approve", &id, "--comment", "on call, checked"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.starts_with(&format!("{id} granted {API}")), "{out}");
    assert!(out.contains("approvals=1/1"), "{out}");
    assert!(out.contains(&format!("approved_by={ALICE}")), "{out}");
    assert_eq!(
        w.renew(&w.api, 60).await.roles,
        roles(&["db-read", "db-write", "deploy"])
    );

    let (ok, out, _) = cli(ca, &w.alice, &["list", "--pending"]).await;
    assert!(ok);
    assert!(!out.contains(&id), "{out}");
    let (ok, out, err) = cli(ca, &w.alice, &["list", "--json"]).await;
    assert!(ok, "{err}");
    let rec: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(rec["id"], id.as_str());
    assert_eq!(rec["state"], "granted");
    assert_eq!(rec["approvals"][0]["approver"], ALICE);
    assert_eq!(rec["approvals"][0]["comment"], "on call, checked");

    let (ok, out, err) = cli(ca, &w.bob, &["revoke", &id, "--reason", "INC-4211 fixed"]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with(&format!("{id} revoked ")), "{out}");
    assert!(
        out.contains(&format!("closed_by={BOB} close_reason=\"INC-4211 fixed\"")),
        "{out}"
    );
    let (ok, _, err) = cli(ca, &w.bob, &["revoke", &id, "--reason", "again"]).await;
    assert!(!ok);
    assert!(err.contains("FailedPrecondition"), "{err}");

    // An admin on behalf of another workload, then a denial.
    let (ok, out, err) = cli(
        ca,
        &ca.admin_dir(),
        &[
            "request",
            "--spiffe-id",
            WEB,
            "--roles",
            "deploy",
            "--duration",
            "10m",
            "--reason",
            "CHG-5",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let id2 = out.trim().to_string();
    let (ok, out, err) = cli(ca, &w.carol, &["deny", &id2, "--reason", "not today"]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with(&format!("{id2} denied {WEB}")), "{out}");
    assert!(out.contains(&format!("requester={ADMIN}")), "{out}");

    // The subject's certificate that carried the grant is revoked: calls other than renewal are
    // refused until it renews (without the roles).
    let (ok, _, err) = cli(ca, &w.api, &["list"]).await;
    assert!(!ok);
    assert!(
        err.contains("FailedPrecondition") && err.contains("was revoked"),
        "{err}"
    );
    assert_eq!(w.renew(&w.api, 60).await.roles, roles(&["db-read"]));
    let (ok, out, err) = cli(ca, &w.api, &["list"]).await;
    assert!(ok, "{err}");
    assert!(out.contains(&format!("{id} revoked")), "{out}");
    assert!(!out.contains(&id2), "api sees only its own requests: {out}");
    let (ok, out, err) = cli(ca, &w.lead, &["list", "--spiffe-id", WEB]).await;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with(&format!("{id2} denied")), "{out}");

    // Missing --reason is a usage error before any call.
    let (ok, _, err) = cli(ca, &w.alice, &["deny", &id2]).await;
    assert!(!ok);
    assert!(err.contains("--reason"), "{err}");
}

// === persistence ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_pending_requests_survive_a_restart() {
    let w = World::start().await;
    let granted = w
        .request(&w.api, API, &["db-write"], 600, "INC-50")
        .await
        .unwrap();
    w.approve(&w.alice, &granted.id, "").await.unwrap();
    let pending = w
        .request(&w.pay, PAY, &["db-admin"], 600, "INC-51")
        .await
        .unwrap();
    w.approve(&w.alice, &pending.id, "").await.unwrap();

    let w = World {
        ca: w.ca.restart().await,
        ..w
    };
    assert_eq!(w.get(&granted.id).await.state, "granted");
    assert_eq!(
        w.renew(&w.api, 60).await.roles,
        roles(&["db-read", "db-write"])
    );
    let p = w.get(&pending.id).await;
    assert_eq!(p.state, "pending");
    assert_eq!(p.approvals.len(), 1);
    assert_status(
        w.approve(&w.alice, &pending.id, "").await,
        Code::FailedPrecondition,
        "already approved",
    );
    assert_eq!(
        w.approve(&w.bob, &pending.id, "").await.unwrap().state,
        "granted"
    );
    assert_eq!(
        w.renew(&w.pay, 60).await.roles,
        roles(&["db-admin", "db-read"])
    );
}
