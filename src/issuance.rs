//! Issuance: the decisions around signing. Join-token bootstrap, mTLS renewal, local credentials
//! and token minting, each audited, each durable before the caller gets anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::PublicKeyData;
use rustls_pki_types::CertificateDer;
use tracing::{info, warn};

use crate::access::Grant;
use crate::audit::{AuditError, AuditLog, Event, Intent, Kind, UNAUTHENTICATED};
use crate::ca::{
    Authority, CaError, CaHandle, CaSet, LeafParams, SanNames, SvidInfo, ValidCsr, parse_csr,
};
use crate::metrics::{self, IssuePath};
use crate::policy::{self, Ask, Limits, PolicyHandle};
use crate::revocation::Revocations;
use crate::spiffe::{IdPattern, SpiffeId, normalize_roles};
use crate::store::{
    Consume, Enrollment, Guard, IssuedRecord, RECORD_VERSION, RevocationRecord, Store, TokenRecord,
    TokenRevocation, Write,
};
use crate::tls::unix_now;
use crate::tokens::JoinToken;

/// Seconds a certificate's notBefore is backdated, for clock skew between machines.
pub const BACKDATE_SECS: i64 = 30;

tokio::task_local! {
    /// The audit [`Intent`] of the token or renewal request running on this task: taken when the
    /// request starts, handed to the audit log with the request's one event (issued or denied),
    /// so the group commit knows an event is on its way while the CSR is checked and signed.
    static INTENT: std::cell::RefCell<Option<Intent>>;
}

/// The current task's audit intent, if it has one left.
fn take_intent() -> Option<Intent> {
    INTENT.try_with(|i| i.borrow_mut().take()).ok().flatten()
}

/// Lifetime settings of the issuance service.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Certificate lifetime when the request names none.
    pub default_ttl: Duration,
    /// Lifetime floor.
    pub min_ttl: Duration,
    /// Lifetime cap for every certificate.
    pub max_cert_lifetime: Duration,
    /// How long after expiry a certificate may still renew.
    pub renewal_grace: Duration,
    /// Default join token lifetime.
    pub token_ttl: Duration,
}

/// Why a request was refused. Each maps to one gRPC code at the API edge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The request itself is malformed (bad CSR, bad role name, bad ttl): `InvalidArgument`.
    #[error("{0}")]
    BadRequest(String),
    /// No valid credential (unknown, forged or expired token; bad client cert): `Unauthenticated`.
    #[error("{0}")]
    Unauthenticated(String),
    /// Policy forbids it: `PermissionDenied`.
    #[error("{0}")]
    Denied(String),
    /// The credential was valid but can no longer be used (token used up, cert or identity
    /// revoked): `FailedPrecondition`.
    #[error("{0}")]
    Precondition(String),
    /// The thing named does not exist (an unknown token id): `NotFound`.
    #[error("{0}")]
    Missing(String),
    /// Store, audit or signing failure: `Internal`, details only in the server log.
    #[error("internal error: {0}")]
    Internal(String),
}

/// One issuance request.
#[derive(Debug, Clone, Default)]
pub struct IssueRequest {
    /// DER PKCS#10.
    pub csr: Vec<u8>,
    /// Requested lifetime.
    pub ttl: Option<Duration>,
    /// Requested roles (empty: all allowed).
    pub roles: Vec<String>,
}

/// A signed certificate, ready to return.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Trust anchors.
    pub bundle: Vec<CertificateDer<'static>>,
    /// What the leaf says.
    pub svid: SvidInfo,
}

/// A token to mint.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// Exact ID or `/prefix/*` pattern.
    pub spiffe_id: String,
    /// Roles allowed.
    pub roles: Vec<String>,
    /// Longest certificate lifetime (`None`: the policy maximum).
    pub max_ttl: Option<Duration>,
    /// Token lifetime (`None`: the server default).
    pub expires_in: Option<Duration>,
    /// Uses (at least 1).
    pub uses: u32,
}

/// The issuance service.
pub struct Issuance {
    /// The CAs in force; swapped at runtime by a CA rotation.
    authority: CaHandle,
    policy: PolicyHandle,
    log: AuditLog,
    revocations: Arc<Revocations>,
    settings: Settings,
    /// Temporary-access grants, consulted at every issuance (set once at start-up).
    access: std::sync::OnceLock<Arc<crate::access::Access>>,
    /// JWT/OIDC attestors (set once at start-up when any is configured).
    attestors: std::sync::OnceLock<Arc<crate::attest::Attestors>>,
    /// Whether a join token's use is consumed right on the request's task. On a local store
    /// (sled, which publishes no commit feed of its own) it is a compare-and-swap of one record,
    /// a few µs like the token read just before it, and the hop to the blocking pool and back
    /// (two thread wake-ups) cost more than that: ~8% of a token issuance's CPU at 64 clients
    /// (`perf record` on `benches/issue.rs`). On a replicated store (etcd, which publishes
    /// every replica's commits itself) it is a network transaction: off the async workers.
    consume_inline: bool,
}

impl Issuance {
    /// Wires the service.
    pub fn new(
        authority: CaHandle,
        policy: PolicyHandle,
        log: AuditLog,
        revocations: Arc<Revocations>,
        settings: Settings,
    ) -> Self {
        let consume_inline = log.store().commit_feed().is_none();
        Self {
            authority,
            policy,
            log,
            revocations,
            settings,
            access: std::sync::OnceLock::new(),
            attestors: std::sync::OnceLock::new(),
            consume_inline,
        }
    }

    /// Connects the JWT/OIDC attestors: `Ca.Issue` with a `jwt` is verified by them.
    pub fn set_attestors(&self, attestors: Arc<crate::attest::Attestors>) {
        let _ = self.attestors.set(attestors);
    }

    /// Connects the temporary-access service: its live grants add roles to certificates.
    pub fn set_access(&self, access: Arc<crate::access::Access>) {
        let _ = self.access.set(access);
    }

    /// The signing CA now.
    pub fn authority(&self) -> Arc<Authority> {
        self.authority.active()
    }

    /// The CAs in force (the signing one plus any staged or retiring one).
    pub fn cas(&self) -> &CaHandle {
        &self.authority
    }

    /// Whether `svid` (or its identity) is revoked; a store failure counts as revoked, for the
    /// callers that then replace a credential rather than keep a possibly revoked one.
    pub fn is_revoked(&self, svid: &SvidInfo) -> bool {
        !matches!(self.revocations.status(svid), Ok(None))
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.log.store()
    }

    /// Bootstrap: issues a certificate to the holder of a join token, consuming one use.
    pub async fn with_token(&self, token: &str, req: IssueRequest) -> Result<Issued, IssueError> {
        let started = Instant::now();
        let intent = std::cell::RefCell::new(Some(self.log.intent()));
        let result = INTENT.scope(intent, self.token_inner(token, req)).await;
        metrics::ca().issuance(IssuePath::Token, started, &result);
        result
    }

    async fn token_inner(&self, token: &str, req: IssueRequest) -> Result<Issued, IssueError> {
        let actor_unknown = "token:?".to_string();
        let parsed = match JoinToken::parse(token) {
            Ok(t) => t,
            Err(e) => {
                return Err(self
                    .deny(
                        &actor_unknown,
                        "",
                        IssueError::Unauthenticated(e.to_string()),
                    )
                    .await);
            }
        };
        let actor = format!("token:{}", parsed.id);
        let csr = match self.check_csr(&req.csr) {
            Ok(c) => c,
            Err(e) => return Err(self.deny(&actor, "", e).await),
        };
        let subject = csr.spiffe_id.to_string();
        let record = match self.check_token(&parsed, &csr.spiffe_id) {
            Ok(r) => r,
            Err(e) => return Err(self.deny(&actor, &subject, e).await),
        };
        let prior = match self.check_enrollment(&record, &subject) {
            Ok(p) => p,
            Err(e) => return Err(self.deny(&actor, &subject, e).await),
        };
        let ceiling_ttl = Duration::from_secs(record.max_ttl);
        let (mut leaf, used) =
            match self.plan(&csr.spiffe_id, &record.roles, Some(ceiling_ttl), &req) {
                Ok(l) => l,
                Err(e) => return Err(self.deny(&actor, &subject, e).await),
            };
        leaf.names = match self.allowed_names(&csr) {
            Ok(n) => n,
            Err(e) => return Err(self.deny(&actor, &subject, e).await),
        };
        let (leaf, rule) = self.clear_of_lifted_rule(leaf).await?;
        // Sign before consuming: a failure here leaves the token usable.
        let signed = self.sign(&csr, leaf)?;
        let consumed = if self.consume_inline {
            self.store().consume_token(&parsed.id, unix_now())
        } else {
            // A network round trip (an etcd transaction): off the async workers.
            let (store, id) = (self.store().clone(), parsed.id.clone());
            tokio::task::spawn_blocking(move || store.consume_token(&id, unix_now()))
                .await
                .map_err(internal)?
        };
        match consumed.map_err(internal)? {
            Consume::Won(_) => {}
            Consume::AlreadyUsed => {
                // Revoked while this request ran: say so rather than "already used".
                let err = match self.check_token(&parsed, &csr.spiffe_id) {
                    Err(e @ IssueError::Precondition(_)) => e,
                    _ => IssueError::Precondition(format!("join token {} already used", parsed.id)),
                };
                return Err(self.deny(&actor, &subject, err).await);
            }
            Consume::Expired => {
                return Err(self
                    .deny(
                        &actor,
                        &subject,
                        IssueError::Unauthenticated(format!(
                            "join token {} has expired; ask an admin for a new one",
                            parsed.id
                        )),
                    )
                    .await);
            }
            Consume::Missing => {
                return Err(self.deny(&actor, &subject, invalid_token()).await);
            }
        }
        let enrollment = Enrollment {
            v: RECORD_VERSION,
            spiffe_id: subject.clone(),
            roles: record.roles.clone(),
            max_ttl: record.max_ttl,
            via: actor.clone(),
        };
        let reason = match &prior {
            Prior::Replaced(old) => format!(
                "join token {}; replaces the enrollment {} with {}",
                parsed.id,
                describe_enrollment(old),
                describe_enrollment(&enrollment)
            ),
            Prior::None | Prior::Own(_) => format!("join token {}", parsed.id),
        };
        // A token redeemed again for an identity it enrolled (a multi-use token, a workload that
        // lost its key) finds the very record it would write: writing it again would only add
        // a sled write (and a tree) to the group commit. Enrollments are unguarded, so a
        // replacement committed meanwhile wins either way, as if it came after this one.
        let mut writes = Vec::with_capacity(2);
        if !matches!(&prior, Prior::Own(old) if *old == enrollment) {
            writes.push(Write::PutEnrollment(enrollment));
        }
        writes.push(rule.guard());
        self.commit(Kind::Issued, &actor, signed, writes, reason, &used)
            .await
    }

    /// Attestation: issues a certificate to the holder of a JWT an `[[attestor]]` verifies, for
    /// the SPIFFE ID its claims map to. The attestor's roles and max_ttl are the ceiling (as a
    /// join token's are); policy decides within it. Each JWT is used once: its hash is kept
    /// (as a spent token record) until it could no longer be accepted anyway.
    pub async fn with_jwt(&self, jwt: &str, req: IssueRequest) -> Result<Issued, IssueError> {
        let started = Instant::now();
        let intent = std::cell::RefCell::new(Some(self.log.intent()));
        let result = INTENT.scope(intent, self.jwt_inner(jwt, req)).await;
        metrics::ca().issuance(IssuePath::Attest, started, &result);
        result
    }

    async fn jwt_inner(&self, jwt: &str, req: IssueRequest) -> Result<Issued, IssueError> {
        let attested = match self.attestors.get() {
            None => Err(crate::attest::AttestError::Disabled),
            Some(a) => a.attest(jwt, unix_now()).await,
        };
        let attested = match attested {
            Ok(a) => a,
            Err(e) if e.is_unauthenticated() => {
                let claimed = crate::attest::Attestors::claimed(jwt);
                let why = IssueError::Unauthenticated(e.to_string());
                return Err(self.deny_unverified(&claimed, why).await);
            }
            // The token verified, but its claims make no ID: the attestor vouches for the caller.
            Err(e) => {
                let actor = format!("attestor:{}", e.attestor().unwrap_or("?"));
                return Err(self
                    .deny(&actor, "", IssueError::Denied(e.to_string()))
                    .await);
            }
        };
        let actor = format!("attestor:{}", attested.attestor);
        let subject = attested.spiffe_id.to_string();
        let why = attested.describe();
        let deny = |e: IssueError| match e {
            IssueError::Internal(_) | IssueError::Missing(_) => e,
            IssueError::BadRequest(m) => IssueError::BadRequest(format!("{m} ({why})")),
            IssueError::Unauthenticated(m) => IssueError::Unauthenticated(format!("{m} ({why})")),
            IssueError::Denied(m) => IssueError::Denied(format!("{m} ({why})")),
            IssueError::Precondition(m) => IssueError::Precondition(format!("{m} ({why})")),
        };
        let csr = match crate::ca::parse_csr_assigned(
            &req.csr,
            self.authority.active().trust_domain(),
            &attested.spiffe_id,
        )
        .map_err(IssueError::from)
        .and_then(|c| self.check_csr_id(c))
        {
            Ok(c) => c,
            Err(e) => return Err(self.deny(&actor, &subject, deny(e)).await),
        };
        let Some(attestors) = self.attestors.get() else {
            return Err(internal("attestors vanished"));
        };
        // One request per token at a time on this CA; the store record covers the rest.
        let Some(_in_flight) = attestors.claim(attested.token_hash) else {
            let e = IssueError::Precondition("this JWT is being used by another request".into());
            return Err(self.deny(&actor, &subject, deny(e)).await);
        };
        let replay_id = format!(
            "{}{}",
            crate::attest::USED_JWT_PREFIX,
            crate::encoding::hex(&attested.token_hash)
        );
        if let Some(used) = self.store().token(&replay_id).map_err(internal)? {
            let e = IssueError::Precondition(format!(
                "this JWT was already used (for {}); each token is accepted once, present a fresh one",
                used.spiffe_id
            ));
            return Err(self.deny(&actor, &subject, deny(e)).await);
        }
        let (mut leaf, used) = match self.plan(
            &csr.spiffe_id,
            &attested.roles,
            Some(attested.max_ttl),
            &req,
        ) {
            Ok(l) => l,
            Err(e) => return Err(self.deny(&actor, &subject, deny(e)).await),
        };
        leaf.names = match self.allowed_names(&csr) {
            Ok(n) => n,
            Err(e) => return Err(self.deny(&actor, &subject, deny(e)).await),
        };
        let (leaf, rule) = self.clear_of_lifted_rule(leaf).await?;
        let signed = self.sign(&csr, leaf)?;
        let spent = TokenRecord {
            v: RECORD_VERSION,
            id: replay_id,
            secret_hash: attested.token_hash,
            spiffe_id: subject.clone(),
            roles: vec![],
            max_ttl: 0,
            expires_at: attested.expires_at,
            uses_left: 0,
            created_by: actor.clone(),
            revoked: None,
        };
        let enrollment = Enrollment {
            v: RECORD_VERSION,
            spiffe_id: subject.clone(),
            roles: attested.roles.clone(),
            max_ttl: attested.max_ttl.as_secs(),
            via: actor.clone(),
        };
        self.commit(
            Kind::Issued,
            &actor,
            signed,
            vec![
                // Exactly once across replicas: the spent record must not exist yet.
                Write::Guard(Guard::TokenAbsent {
                    id: spent.id.clone(),
                }),
                Write::PutToken(spent),
                Write::PutEnrollment(enrollment),
                rule.guard(),
            ],
            why.clone(),
            &used,
        )
        .await
    }

    /// Renewal: issues a new certificate for the same identity to an authenticated peer. Roles
    /// are re-evaluated: the identity's enrollment ceiling, intersected with policy now.
    pub async fn renew(&self, peer: &SvidInfo, req: IssueRequest) -> Result<Issued, IssueError> {
        let started = Instant::now();
        let intent = std::cell::RefCell::new(Some(self.log.intent()));
        let result = INTENT.scope(intent, self.renew_inner(peer, req)).await;
        metrics::ca().issuance(IssuePath::Renewal, started, &result);
        result
    }

    async fn renew_inner(&self, peer: &SvidInfo, req: IssueRequest) -> Result<Issued, IssueError> {
        let actor = peer.spiffe_id.to_string();
        let csr = match self.check_csr(&req.csr) {
            Ok(c) => c,
            Err(e) => return Err(self.deny(&actor, &actor, e).await),
        };
        if csr.spiffe_id != peer.spiffe_id {
            let e = IssueError::Denied(format!(
                "renewal must keep the identity: the client certificate is {}, the CSR asks for {}",
                peer.spiffe_id, csr.spiffe_id
            ));
            return Err(self.deny(&actor, csr.spiffe_id.as_str(), e).await);
        }
        let enrollment = match self.store().enrollment(&actor).map_err(internal)? {
            Some(e) => e,
            None => {
                let e = IssueError::Denied(format!(
                    "{actor} has no enrollment; bootstrap it with a join token"
                ));
                return Err(self.deny(&actor, &actor, e).await);
            }
        };
        let ceiling_ttl = Duration::from_secs(enrollment.max_ttl);
        let (mut leaf, used) =
            match self.plan(&csr.spiffe_id, &enrollment.roles, Some(ceiling_ttl), &req) {
                Ok(l) => l,
                Err(e) => return Err(self.deny(&actor, &actor, e).await),
            };
        // Names are re-checked like roles: a renewal keeps a name only while policy allows it.
        leaf.names = match self.allowed_names(&csr) {
            Ok(n) => n,
            Err(e) => return Err(self.deny(&actor, &actor, e).await),
        };
        let (leaf, rule) = self.clear_of_lifted_rule(leaf).await?;
        let signed = self.sign(&csr, leaf)?;
        self.commit(
            Kind::Renewed,
            &actor,
            signed,
            vec![rule.guard()],
            format!("renewal of {}", peer.serial),
            &used,
        )
        .await
    }

    /// Issues a credential the server makes for itself (its serving cert, with the operator's
    /// `server_names`; the admin credential, with none): no CSR, no policy lookup (the reserved
    /// `/lanyard/` identities are not in policy).
    pub async fn local(
        &self,
        id: &SpiffeId,
        roles: Vec<String>,
        ttl: Duration,
        key: &impl PublicKeyData,
        names: &SanNames,
    ) -> Result<Issued, IssueError> {
        let started = Instant::now();
        let result = self.local_inner(id, roles, ttl, key, names).await;
        metrics::ca().issuance(IssuePath::Local, started, &result);
        result
    }

    async fn local_inner(
        &self,
        id: &SpiffeId,
        roles: Vec<String>,
        ttl: Duration,
        key: &impl PublicKeyData,
        names: &SanNames,
    ) -> Result<Issued, IssueError> {
        let now = unix_now();
        let params = LeafParams {
            spiffe_id: id.clone(),
            roles: roles.clone(),
            not_before: now - BACKDATE_SECS,
            not_after: now + ttl.as_secs() as i64,
            names: names.clone(),
        };
        // After `lanyard admin recover` lifted a rule on a reserved identity, the fresh
        // credential must start after that rule's cutoff, or the rule would still cover it.
        // Exempt from the rule guard, as from the post-commit check: no revocation may stop the
        // CA from serving.
        let (params, _rule) = self.clear_of_lifted_rule(params).await?;
        let cas = self.authority.current();
        let leaf = cas.active().sign_leaf(key, &params).map_err(internal)?;
        let enrollment = Enrollment {
            v: RECORD_VERSION,
            spiffe_id: id.to_string(),
            roles,
            max_ttl: ttl.as_secs(),
            via: "local".into(),
        };
        let issued = finish(&cas, leaf.der, leaf.svid);
        self.commit(
            Kind::CredentialIssued,
            "lanyard",
            issued,
            vec![Write::PutEnrollment(enrollment)],
            "local credential".into(),
            &[],
        )
        .await
    }

    /// Mints a join token. The caller is an authenticated admin.
    pub async fn create_token(
        &self,
        actor: &str,
        spec: TokenSpec,
    ) -> Result<(String, TokenRecord), IssueError> {
        let pattern =
            IdPattern::parse(&spec.spiffe_id).map_err(|e| IssueError::BadRequest(e.to_string()))?;
        let authority = self.authority.active();
        let td = authority.trust_domain();
        if pattern.trust_domain_name() != td.as_str() {
            return Err(IssueError::BadRequest(format!(
                "{} is outside trust domain {td}",
                spec.spiffe_id
            )));
        }
        let probe = match &pattern {
            IdPattern::Exact(id) | IdPattern::Prefix(id) => id.clone(),
        };
        if policy::is_reserved(&probe) {
            return Err(IssueError::BadRequest(
                "the /lanyard/ path is reserved for the CA".into(),
            ));
        }
        let roles =
            normalize_roles(&spec.roles).map_err(|e| IssueError::BadRequest(e.to_string()))?;
        // The token may not promise more than policy allows today. For a prefix token, check the
        // rule that covers the prefix itself.
        let policy = self.policy.current();
        let probe_id = match &pattern {
            IdPattern::Exact(id) => id.clone(),
            IdPattern::Prefix(p) => SpiffeId::parse(&format!("{p}/x"))
                .map_err(|e| IssueError::BadRequest(e.to_string()))?,
        };
        let rule = policy.lookup(&probe_id).ok_or_else(|| {
            IssueError::Denied(format!("no policy rule allows {}", spec.spiffe_id))
        })?;
        if let Some(r) = roles.iter().find(|r| !rule.roles.contains(r)) {
            return Err(IssueError::Denied(format!(
                "role {r:?} is not allowed for {} by policy (allowed: {})",
                spec.spiffe_id,
                if rule.roles.is_empty() {
                    "none".into()
                } else {
                    rule.roles.join(",")
                }
            )));
        }
        let max_ttl = spec.max_ttl.unwrap_or(rule.max_ttl);
        if max_ttl > rule.max_ttl {
            return Err(IssueError::Denied(format!(
                "max ttl {}s is above the policy maximum of {}s for {}",
                max_ttl.as_secs(),
                rule.max_ttl.as_secs(),
                spec.spiffe_id
            )));
        }
        if max_ttl < self.settings.min_ttl {
            return Err(IssueError::BadRequest(format!(
                "max ttl {}s is below the minimum of {}s",
                max_ttl.as_secs(),
                self.settings.min_ttl.as_secs()
            )));
        }
        let expires_in = spec.expires_in.unwrap_or(self.settings.token_ttl);
        if expires_in.is_zero() || expires_in > Duration::from_secs(30 * 24 * 3600) {
            return Err(IssueError::BadRequest(
                "token lifetime must be between 1s and 30 days".into(),
            ));
        }
        let token = JoinToken::generate(authority.fingerprint(), &pattern.to_string());
        let record = TokenRecord {
            v: RECORD_VERSION,
            id: token.id.clone(),
            secret_hash: token.secret_hash(),
            spiffe_id: pattern.to_string(),
            roles: roles.clone(),
            max_ttl: max_ttl.as_secs(),
            expires_at: unix_now() + expires_in.as_secs() as i64,
            uses_left: spec.uses.max(1),
            created_by: actor.to_string(),
            revoked: None,
        };
        let event = Event::new(Kind::TokenCreated, actor)
            .subject(pattern.to_string())
            .roles(roles)
            .reason(format!(
                "token {} ({} uses, expires {})",
                token.id,
                record.uses_left,
                fmt_time(record.expires_at)
            ));
        self.log
            .record(event, vec![Write::PutToken(record.clone())])
            .await
            .map_err(internal)?;
        info!(token_id = %token.id, spiffe_id = %record.spiffe_id, "join token created");
        Ok((token.to_token_string(), record))
    }

    /// Every join token still kept, for an admin: the listing itself is audited (it shows
    /// which identities can still be bootstrapped, and by whom). Records carry no secret, only
    /// its hash, and callers must not show that either.
    pub async fn list_tokens(&self, actor: &str) -> Result<Vec<TokenRecord>, IssueError> {
        // Spent-JWT records share the token table (replay protection) but are not join tokens.
        let tokens: Vec<TokenRecord> = self
            .store()
            .tokens()
            .map_err(internal)?
            .into_iter()
            .filter(|t| !t.id.starts_with(crate::attest::USED_JWT_PREFIX))
            .collect();
        let event = Event::new(Kind::TokensListed, actor)
            .reason(format!("{} join tokens listed", tokens.len()));
        self.log.record(event, vec![]).await.map_err(internal)?;
        Ok(tokens)
    }

    /// Revokes a join token: it is kept with no use left and a revoked marker (so a later
    /// redemption is refused with who revoked it and when, until the token would have expired
    /// and is pruned). Revoking an already revoked token is refused; an unknown id is
    /// `NotFound`-shaped ([`IssueError::Missing`]).
    pub async fn revoke_token(&self, actor: &str, id: &str) -> Result<TokenRecord, IssueError> {
        let id = id.trim();
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IssueError::BadRequest(format!(
                "token id {id:?} is not valid: give the hex id that `lanyard token list` shows"
            )));
        }
        let mut record = self.store().token(id).map_err(internal)?.ok_or_else(|| {
            IssueError::Missing(format!(
                "no join token {id} (unknown, or expired and pruned)"
            ))
        })?;
        if let Some(r) = &record.revoked {
            return Err(IssueError::Precondition(format!(
                "join token {id} was already revoked by {} at {}",
                r.by,
                fmt_time(r.at)
            )));
        }
        let uses_left = record.uses_left;
        record.uses_left = 0;
        record.revoked = Some(TokenRevocation {
            by: actor.to_string(),
            at: unix_now(),
        });
        let event = Event::new(Kind::TokenRevoked, actor)
            .subject(record.spiffe_id.clone())
            .reason(format!(
                "token {id} revoked with {uses_left} uses left (created by {}, expires {})",
                record.created_by,
                fmt_time(record.expires_at)
            ));
        self.log
            .record(event, vec![Write::PutToken(record.clone())])
            .await
            .map_err(internal)?;
        info!(token_id = %id, spiffe_id = %record.spiffe_id, "join token revoked");
        Ok(record)
    }

    /// Checks the CSR (its self-signature included) right here on the calling task. The ~60 µs
    /// of CPU cost less than a hop to the blocking pool and back (two thread wake-ups, measured by
    /// `benches/issue.rs`), and the input is bounded: the gRPC layer refuses messages over 64 KiB
    /// and `parse_csr` refuses CSRs over 8 KiB before parsing them.
    fn check_csr(&self, der: &[u8]) -> Result<ValidCsr, IssueError> {
        let csr = parse_csr(der, self.authority.active().trust_domain())
            .map_err(|e| IssueError::BadRequest(e.to_string()))?;
        self.check_csr_id(csr)
    }

    /// The identity checks of [`Self::check_csr`]: not reserved, not blocked by a revocation.
    fn check_csr_id(&self, csr: ValidCsr) -> Result<ValidCsr, IssueError> {
        if policy::is_reserved(&csr.spiffe_id) {
            return Err(IssueError::Denied(format!(
                "{} is reserved for the CA itself",
                csr.spiffe_id
            )));
        }
        if let Some(rule) = self.revocations.blocked(&csr.spiffe_id).map_err(internal)? {
            return Err(IssueError::Precondition(format!(
                "{} was revoked at {} ({}); an admin must lift it with `lanyard revoke --spiffe-id {} --lift`",
                csr.spiffe_id,
                fmt_time(rule.revoked_at),
                rule.reason,
                csr.spiffe_id
            )));
        }
        Ok(csr)
    }

    fn check_token(&self, token: &JoinToken, id: &SpiffeId) -> Result<TokenRecord, IssueError> {
        let record = self
            .store()
            .token(&token.id)
            .map_err(internal)?
            .ok_or_else(invalid_token)?;
        if !token.matches(&record.secret_hash) {
            return Err(invalid_token());
        }
        if let Some(r) = &record.revoked {
            return Err(IssueError::Precondition(format!(
                "join token {} was revoked by {} at {}; ask an admin for a new one",
                token.id,
                r.by,
                fmt_time(r.at)
            )));
        }
        if record.expires_at <= unix_now() {
            return Err(IssueError::Unauthenticated(format!(
                "join token {} expired at {}; ask an admin for a new one",
                token.id,
                fmt_time(record.expires_at)
            )));
        }
        if record.uses_left == 0 {
            return Err(IssueError::Precondition(format!(
                "join token {} already used",
                token.id
            )));
        }
        let pattern = IdPattern::parse(&record.spiffe_id).map_err(internal)?;
        if !pattern.matches(id) {
            return Err(IssueError::Denied(format!(
                "join token {} is for {}, not {id}",
                token.id, record.spiffe_id
            )));
        }
        Ok(record)
    }

    /// The identity's stored enrollment as this redemption finds it: none, this token's own, or
    /// one it would replace (made by another token). A prefix token enrolls only new identities
    /// (or re-enrolls those it enrolled itself): one enrolled otherwise whose enrollment still
    /// backs a renewable certificate belongs to someone else, and replacing its role ceiling
    /// takes a token naming exactly that identity.
    fn check_enrollment(&self, token: &TokenRecord, subject: &str) -> Result<Prior, IssueError> {
        let Some(old) = self.store().enrollment(subject).map_err(internal)? else {
            return Ok(Prior::None);
        };
        if old.via.strip_prefix("token:") == Some(token.id.as_str()) {
            // Enrolled by this very token before (a multi-use token, a restarted workload that
            // lost its key): the same ceiling again, nobody else's enrollment is touched.
            return Ok(Prior::Own(old));
        }
        let prefix = matches!(
            IdPattern::parse(&token.spiffe_id).map_err(internal)?,
            IdPattern::Prefix(_)
        );
        if prefix && self.holds_renewable_certificate(subject)? {
            return Err(IssueError::Precondition(format!(
                "{subject} is already enrolled ({}) and holds a live certificate; join token {} is for {}, and a prefix token only enrolls new identities: to replace the enrollment, use a token for exactly {subject}",
                describe_enrollment(&old),
                token.id,
                token.spiffe_id
            )));
        }
        Ok(Prior::Replaced(old))
    }

    /// Whether `id` holds a certificate that is unexpired or still within the renewal grace.
    fn holds_renewable_certificate(&self, id: &str) -> Result<bool, IssueError> {
        let now = unix_now();
        let grace = self.settings.renewal_grace.as_secs() as i64;
        Ok(self
            .store()
            .issued_for(id)
            .map_err(internal)?
            .iter()
            .any(|c| c.not_after + grace >= now))
    }

    fn plan(
        &self,
        id: &SpiffeId,
        ceiling_roles: &[String],
        ceiling_ttl: Option<Duration>,
        req: &IssueRequest,
    ) -> Result<(LeafParams, Vec<Grant>), IssueError> {
        let requested_roles =
            normalize_roles(&req.roles).map_err(|e| IssueError::BadRequest(e.to_string()))?;
        let limits = Limits {
            default_ttl: self.settings.default_ttl,
            min_ttl: self.settings.min_ttl,
        };
        let now = unix_now();
        // Live grants add roles beyond the policy rule and the enrollment ceiling, but never
        // past the grant's end.
        let grants = self
            .access
            .get()
            .map(|a| a.active_grants(id.as_str(), now))
            .unwrap_or_default();
        let granted = |r: &String| grants.iter().any(|g| g.roles.contains(r));
        let (asked_granted, asked_policy): (Vec<String>, Vec<String>) =
            requested_roles.iter().cloned().partition(granted);
        let policy = self.policy.current();
        let decision = policy::decide(
            &policy,
            limits,
            &Ask {
                spiffe_id: id,
                ceiling_roles,
                ceiling_ttl,
                requested_roles: &asked_policy,
                requested_ttl: req.ttl,
            },
        )
        .map_err(|d| match d {
            policy::Denial::TtlTooShort { .. } => IssueError::BadRequest(d.to_string()),
            other => IssueError::Denied(other.to_string()),
        })?;
        let mut roles = if !requested_roles.is_empty() && asked_policy.is_empty() {
            Vec::new()
        } else {
            decision.roles
        };
        let mut not_after =
            now + decision.ttl.min(self.settings.max_cert_lifetime).as_secs() as i64;
        let mut used_grants = Vec::new();
        for g in grants {
            let used: Vec<&String> = g
                .roles
                .iter()
                .filter(|r| requested_roles.is_empty() || asked_granted.contains(r))
                .collect();
            if !used.is_empty() {
                roles.extend(used.into_iter().cloned());
                not_after = not_after.min(g.ends_at);
                used_grants.push(g);
            }
        }
        roles.sort();
        roles.dedup();
        let leaf = LeafParams {
            spiffe_id: id.clone(),
            roles,
            not_before: now - BACKDATE_SECS,
            not_after,
            names: SanNames::default(),
        };
        Ok((leaf, used_grants))
    }

    /// Keeps a new certificate outside a lifted identity rule: its notBefore may not be earlier
    /// than the rule's `before` (see [`Revocations::not_before_floor`]). When that instant is
    /// still ahead (a lift within a second of the revocation), waits for it, so the certificate
    /// is valid when it is returned and keeps its full lifetime. Returns the identity rule as
    /// read, which the commit guards: a rule that changes on another replica before the commit
    /// fails it (refused and audited) instead of leaving it to the post-commit check.
    async fn clear_of_lifted_rule(
        &self,
        mut leaf: LeafParams,
    ) -> Result<(LeafParams, RuleRead), IssueError> {
        let rule = self
            .store()
            .identity_rule(leaf.spiffe_id.as_str())
            .map_err(internal)?;
        let read = RuleRead {
            spiffe_id: leaf.spiffe_id.to_string(),
            rule: rule.clone(),
        };
        let floor = rule.filter(|r| !r.blocked).map(|r| r.before);
        let Some(floor) = floor.filter(|f| leaf.not_before < *f) else {
            return Ok((leaf, read));
        };
        let ahead = floor - unix_now();
        if ahead > 0 {
            // Do not hold the audit group commit open while sleeping.
            drop(take_intent());
            tokio::time::sleep(Duration::from_secs(ahead as u64)).await;
            leaf.not_after += ahead;
        }
        leaf.not_before = floor;
        Ok((leaf, read))
    }

    /// The CSR's DNS and IP names, once policy allows every one of them (checked against the
    /// policy in force now, so a renewal loses a name the moment its rule drops it).
    fn allowed_names(&self, csr: &ValidCsr) -> Result<SanNames, IssueError> {
        policy::check_names(&self.policy.current(), &csr.spiffe_id, &csr.names)
            .map_err(|d| IssueError::Denied(d.to_string()))?;
        Ok(csr.names.clone())
    }

    /// Signs inline, like `check_csr`: one ECDSA signature, ~20 µs.
    fn sign(&self, csr: &ValidCsr, leaf: LeafParams) -> Result<Issued, IssueError> {
        // Fail closed: a path that skipped `allowed_names` would silently drop (or add) names.
        if leaf.names != csr.names {
            return Err(internal("issuance path did not check the CSR's names"));
        }
        let cas = self.authority.current();
        let signed = cas
            .active()
            .sign_leaf(&csr.public_key, &leaf)
            .map_err(internal)?;
        Ok(finish(&cas, signed.der, signed.svid))
    }

    /// Records the certificate with its event (durable before the caller sees it). `used` are
    /// the grants whose roles it carries: if one was revoked while this issuance ran, the
    /// certificate is revoked the way the grant's revocation would have (see
    /// [`crate::access::Access::recheck`]).
    async fn commit(
        &self,
        kind: Kind,
        actor: &str,
        issued: Issued,
        mut writes: Vec<Write>,
        reason: String,
        used: &[Grant],
    ) -> Result<Issued, IssueError> {
        let s = &issued.svid;
        let serial = s.serial.to_hex();
        let spent_jwt = writes.iter().find_map(|w| match w {
            Write::Guard(Guard::TokenAbsent { id }) => Some(id.clone()),
            _ => None,
        });
        writes.push(Write::PutIssued(
            IssuedRecord {
                v: RECORD_VERSION,
                spiffe_id: s.spiffe_id.to_string(),
                serial: serial.clone(),
                roles: s.roles.clone(),
                not_after: s.not_after,
            },
            s.not_after + self.settings.renewal_grace.as_secs() as i64,
        ));
        let event = Event::new(kind, actor)
            .subject(s.spiffe_id.as_str())
            .serial(serial)
            .roles(s.roles.clone())
            .not_after(s.not_after)
            .reason(reason);
        match self.log.record_with(take_intent(), event, writes).await {
            Ok(_) => {}
            Err(AuditError::Conflict) => {
                let e = self.conflict(s.spiffe_id.as_str(), spent_jwt.as_deref())?;
                return Err(self.deny(actor, s.spiffe_id.as_str(), e).await);
            }
            Err(e) => return Err(internal(e)),
        }
        info!(spiffe_id = %s.spiffe_id, serial = %s.serial, kind = kind.as_str(), "certificate issued");
        if !used.is_empty()
            && let Some(access) = self.access.get()
        {
            access.recheck(s, used).await.map_err(internal)?;
        }
        // The identity may have been revoked since `plan` checked: the certificate is on record
        // now, so it is listed with the revocation and not handed out. (The server's own
        // credentials are exempt: no revocation may stop the CA from serving.)
        if kind != Kind::CredentialIssued
            && let Some(rule) = self
                .revocations
                .cover_if_revoked(s)
                .await
                .map_err(internal)?
        {
            return Err(IssueError::Precondition(format!(
                "{} was revoked while this certificate was being issued: {}",
                s.spiffe_id, rule.reason
            )));
        }
        Ok(issued)
    }

    /// Why an issuance's guarded commit failed: its JWT was spent, or its identity's rule
    /// changed, on another replica after this one read them. Nothing was written.
    fn conflict(&self, spiffe_id: &str, spent_jwt: Option<&str>) -> Result<IssueError, IssueError> {
        if let Some(id) = spent_jwt
            && let Some(used) = self.store().token(id).map_err(internal)?
        {
            return Ok(IssueError::Precondition(format!(
                "this JWT was already used (for {}, on another replica); each token is accepted once, present a fresh one",
                used.spiffe_id
            )));
        }
        let now = self.store().identity_rule(spiffe_id).map_err(internal)?;
        Ok(IssueError::Precondition(match now {
            Some(r) if r.blocked => format!(
                "{} was revoked on another replica while this certificate was being issued: {}",
                spiffe_id, r.reason
            ),
            _ => format!(
                "the revocation rule of {spiffe_id} changed on another replica while this certificate was being issued; retry"
            ),
        }))
    }

    /// Records a denial, then hands the error back for the caller to return.
    pub async fn deny(&self, actor: &str, subject: &str, err: IssueError) -> IssueError {
        self.record_denial(Event::new(Kind::Denied, actor).subject(subject), err)
            .await
    }

    /// Records the denial of a caller whose certificate did not verify: the actor is
    /// `unauthenticated`, and the identity the certificate claimed goes only in `claimed`.
    pub async fn deny_unverified(&self, claimed: &str, err: IssueError) -> IssueError {
        self.record_denial(
            Event::new(Kind::Denied, UNAUTHENTICATED).claimed(claimed),
            err,
        )
        .await
    }

    async fn record_denial(&self, event: Event, err: IssueError) -> IssueError {
        if matches!(err, IssueError::Internal(_)) {
            return err;
        }
        warn!(actor = %event.actor, subject = %event.subject, claimed = %event.claimed, reason = %err, "request denied");
        let event = event.reason(err.to_string());
        if let Err(e) = self.log.record_with(take_intent(), event, vec![]).await {
            warn!(error = %e, "cannot record denial");
        }
        err
    }
}

/// An identity's stored enrollment, as a join token's redemption finds it.
enum Prior {
    /// None is stored: the redemption enrolls the identity.
    None,
    /// This very token made it.
    Own(Enrollment),
    /// Another token (or `local`) made it: the redemption replaces it.
    Replaced(Enrollment),
}

/// An identity's rule as read while an issuance was decided, for the commit's guard.
struct RuleRead {
    spiffe_id: String,
    rule: Option<RevocationRecord>,
}

impl RuleRead {
    /// The commit fails unless the rule is still exactly as read (on any replica).
    fn guard(self) -> Write {
        Write::Guard(Guard::IdentityRule {
            spiffe_id: self.spiffe_id,
            expect: self.rule.map(Box::new),
        })
    }
}

/// The chain (leaf, then the signing CA's intermediates) and the bundle (every CA in force: during
/// a rotation the old and the new) of a leaf signed by `cas`'s active CA.
fn finish(cas: &CaSet, leaf: CertificateDer<'static>, svid: SvidInfo) -> Issued {
    let mut chain = vec![leaf];
    chain.extend(cas.active().intermediates().iter().cloned());
    Issued {
        chain,
        bundle: cas.roots(),
        svid,
    }
}

/// An enrollment as the audit log and error messages show it.
fn describe_enrollment(e: &Enrollment) -> String {
    format!(
        "(via {}, roles [{}], max ttl {}s)",
        e.via,
        e.roles.join(","),
        e.max_ttl
    )
}

fn invalid_token() -> IssueError {
    // Expired tokens are pruned from the store, so "unknown" cannot be told from "expired".
    IssueError::Unauthenticated(
        "join token is not valid (unknown, expired or forged); ask an admin for a new one".into(),
    )
}

fn internal(e: impl std::fmt::Display) -> IssueError {
    IssueError::Internal(e.to_string())
}

impl From<CaError> for IssueError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::InvalidCsr(m) => IssueError::BadRequest(m),
            CaError::IdMismatch(m) => IssueError::Denied(m),
            other => internal(other),
        }
    }
}

/// RFC 3339 rendering of milliseconds since the epoch (e.g. a bundle revision), for logs.
pub fn fmt_time_ms(unix_ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_ms.to_string())
}

/// RFC 3339 rendering of seconds since the epoch, for messages.
pub fn fmt_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}
