//! The audit log: typed events, the SHA-256 hash chain, group commit, and live subscription.
//!
//! [`AuditLog`] owns the only writer task. Callers hand it an [`Event`] plus the state changes
//! the event describes; the task assigns gapless sequence numbers, chains the hashes, commits a
//! whole group in one store transaction and one fsync, and only then answers each caller and
//! publishes the records to live subscribers.

mod chain;
mod log;

pub use chain::{ChainError, GENESIS_HASH, compute_hash, verify_chain};
pub use log::{AuditLog, Committed, Intent, Subscription};

use crate::store::StoreError;

/// Errors of the audit layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The store failed to commit or read; nothing of the failed batch was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer task has stopped (server shutting down).
    #[error("audit log is closed")]
    Closed,
    /// A record this event was based on changed concurrently (on another replica); nothing of
    /// the event was written.
    #[error("changed concurrently on another replica; list and retry")]
    Conflict,
}

/// What happened, as recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A certificate was issued with a join token.
    Issued,
    /// A certificate was renewed over mTLS.
    Renewed,
    /// A request was refused.
    Denied,
    /// An admin created a join token.
    TokenCreated,
    /// A certificate was revoked by serial, or an identity was revoked.
    Revoked,
    /// An admin revoked a join token: its redemption is refused from now on.
    TokenRevoked,
    /// An admin listed the join tokens (ids, bindings, uses, expiry; never secrets).
    TokensListed,
    /// The block on an identity was lifted.
    RevocationLifted,
    /// The policy was reloaded (or a reload was rejected).
    PolicyReloaded,
    /// The server started.
    ServerStarted,
    /// The server wrote a local credential (admin or its own serving cert).
    CredentialIssued,
    /// Someone asked for temporary roles.
    AccessRequested,
    /// An approver approved an access request (more approvals may be needed).
    AccessApproved,
    /// An access request was denied (or withdrawn).
    AccessDenied,
    /// An access request expired with nobody acting on it.
    AccessExpired,
    /// A grant started: the subject's next certificates carry the roles.
    AccessGranted,
    /// A grant ran out.
    AccessEnded,
    /// A grant was ended early; certificates carrying it were revoked.
    AccessRevoked,
    /// A trust bundle changed: a federated domain's (refreshed from its bundle endpoint, seeded
    /// from `initial_bundle`, or imported by an admin) or our own (CA rotation).
    BundleUpdated,
    /// A federated bundle was fetched but refused (malformed, not a CA, wrong domain); the last
    /// good bundle stays in force.
    BundleRejected,
    /// Revocations published by a federated domain's CA were relayed to this domain.
    RevocationImported,
    /// `lanyard ca rotate`: a new CA was staged and published next to the active one.
    CaRotationStaged,
    /// After the overlap, signing switched to the new CA; the old one still verifies.
    CaRotationSwitched,
    /// The old CA's last certificate has expired; it left the bundle and its key was deleted.
    CaRotationCompleted,
    /// `lanyard admin recover` ran on the stopped CA's data dir: identity rules on reserved IDs
    /// were lifted and a fresh admin credential was written.
    AdminRecovered,
    /// Archived audit events were deleted from the store (`lanyard audit export --prune`); the
    /// reason names the last one and its hash, the checkpoint the live log continues from.
    AuditArchived,
}

/// An audit event before it gets a sequence number and hash.
#[derive(Debug, Clone, Default)]
pub struct Event {
    /// What happened.
    pub kind: Option<Kind>,
    /// Who acted (SPIFFE ID, `token:<id>`, or `lanyard`).
    pub actor: String,
    /// Who was acted upon.
    pub subject: String,
    /// Certificate serial, hex.
    pub serial: String,
    /// Roles involved.
    pub roles: Vec<String>,
    /// Certificate notAfter, seconds.
    pub not_after: i64,
    /// Why.
    pub reason: String,
    /// The SPIFFE ID an unverified certificate claimed, on a refusal of a caller that could not be
    /// authenticated (whose `actor` is then `unauthenticated`). Never trusted, never an actor.
    pub claimed: String,
}

/// The actor of an event whose caller could not be authenticated.
pub const UNAUTHENTICATED: &str = "unauthenticated";

// === impl Kind ===

impl Kind {
    /// Every kind, for CLI validation.
    pub const ALL: [Kind; 26] = [
        Kind::Issued,
        Kind::Renewed,
        Kind::Denied,
        Kind::TokenCreated,
        Kind::Revoked,
        Kind::RevocationLifted,
        Kind::PolicyReloaded,
        Kind::ServerStarted,
        Kind::CredentialIssued,
        Kind::AccessRequested,
        Kind::AccessApproved,
        Kind::AccessDenied,
        Kind::AccessExpired,
        Kind::AccessGranted,
        Kind::AccessEnded,
        Kind::AccessRevoked,
        Kind::BundleUpdated,
        Kind::BundleRejected,
        Kind::RevocationImported,
        Kind::CaRotationStaged,
        Kind::CaRotationSwitched,
        Kind::CaRotationCompleted,
        Kind::AdminRecovered,
        Kind::TokenRevoked,
        Kind::TokensListed,
        Kind::AuditArchived,
    ];

    /// The wire and storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Issued => "issued",
            Kind::Renewed => "renewed",
            Kind::Denied => "denied",
            Kind::TokenCreated => "token_created",
            Kind::Revoked => "revoked",
            Kind::RevocationLifted => "revocation_lifted",
            Kind::PolicyReloaded => "policy_reloaded",
            Kind::ServerStarted => "server_started",
            Kind::CredentialIssued => "credential_issued",
            Kind::AccessRequested => "access_requested",
            Kind::AccessApproved => "access_approved",
            Kind::AccessDenied => "access_denied",
            Kind::AccessExpired => "access_expired",
            Kind::AccessGranted => "access_granted",
            Kind::AccessEnded => "access_ended",
            Kind::AccessRevoked => "access_revoked",
            Kind::BundleUpdated => "bundle_updated",
            Kind::BundleRejected => "bundle_rejected",
            Kind::RevocationImported => "revocation_imported",
            Kind::CaRotationStaged => "ca_rotation_staged",
            Kind::CaRotationSwitched => "ca_rotation_switched",
            Kind::CaRotationCompleted => "ca_rotation_completed",
            Kind::AdminRecovered => "admin_recovered",
            Kind::TokenRevoked => "token_revoked",
            Kind::TokensListed => "tokens_listed",
            Kind::AuditArchived => "audit_archived",
        }
    }
}

// === impl Event ===

impl Event {
    /// An event of `kind` by `actor`.
    pub fn new(kind: Kind, actor: impl Into<String>) -> Self {
        Self {
            kind: Some(kind),
            actor: actor.into(),
            ..Self::default()
        }
    }

    /// Sets the subject.
    pub fn subject(mut self, s: impl Into<String>) -> Self {
        self.subject = s.into();
        self
    }

    /// Sets the serial.
    pub fn serial(mut self, s: impl Into<String>) -> Self {
        self.serial = s.into();
        self
    }

    /// Sets the roles.
    pub fn roles(mut self, r: Vec<String>) -> Self {
        self.roles = r;
        self
    }

    /// Sets notAfter.
    pub fn not_after(mut self, t: i64) -> Self {
        self.not_after = t;
        self
    }

    /// Sets the reason.
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = r.into();
        self
    }

    /// Sets the identity an unverified certificate claimed.
    pub fn claimed(mut self, c: impl Into<String>) -> Self {
        self.claimed = c.into();
        self
    }
}
