//! Durable state behind a domain-shaped trait: tokens, enrollments, issued certificates,
//! revocations and the audit log. `sled.rs` is the embedded backend.
//!
//! All changes but token consumption go through [`Store::commit`], which writes a batch of audit
//! records and the state changes they describe in one transaction, then makes it durable. The
//! caller (the audit log's group-commit task) is the single writer, so sequence numbers are
//! gapless and every state change is on the record.

mod records;
mod sled;

pub use records::{
    AccessRecord, ApprovalRecord, AuditRecord, Enrollment, IssuedRecord, RECORD_VERSION,
    RevocationRecord, TokenRecord, TokenRevocation,
};
pub use sled::SledStore;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The embedded database failed (I/O, corruption).
    #[error("store backend: {0}")]
    Backend(String),
    /// A stored value does not decode (written by an unknown version, or corrupt).
    #[error("stored record {key} does not decode: {reason}")]
    Decode {
        /// Which record.
        key: String,
        /// Why.
        reason: String,
    },
    /// The audit log does not continue where the store's head is (a second writer?).
    #[error("audit append out of order: expected seq {expected}, got {got}")]
    OutOfOrder {
        /// The next seq the store expected.
        expected: u64,
        /// The seq offered.
        got: u64,
    },
}

/// Outcome of consuming one use of a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consume {
    /// This caller won the use; the record is as it was before the use.
    Won(TokenRecord),
    /// No use left.
    AlreadyUsed,
    /// Past its expiry.
    Expired,
    /// No such token.
    Missing,
}

/// One state change committed together with audit records.
#[derive(Debug, Clone)]
pub enum Write {
    /// Create a join token.
    PutToken(TokenRecord),
    /// Record (or replace) an identity's enrollment.
    PutEnrollment(Enrollment),
    /// Index an issued certificate until `not_after` + renewal grace.
    PutIssued(IssuedRecord, i64),
    /// Store a revocation; its `rev` is set to the seq of the record it is committed with.
    PutRevocation(RevocationRecord),
    /// Create or update an access request / grant (deleted at its `prune_at`).
    PutAccess(AccessRecord),
}

/// Durable state, in domain terms.
pub trait Store: Send + Sync + 'static {
    /// Looks a token up by public id.
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Every join token still kept (unexpired, or expired but not yet pruned), in id order.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Atomically takes one use of a token: of two concurrent callers for the last use, exactly
    /// one gets [`Consume::Won`]. Not flushed on its own: it becomes durable with the caller's
    /// next [`Store::commit`] + [`Store::flush`] (the issuance's audit event), and the caller
    /// answers only after that flush, so no certificate is ever handed out for a use that a crash
    /// could forget.
    fn consume_token(&self, id: &str, now: i64) -> Result<Consume, StoreError>;
    /// An identity's enrollment.
    fn enrollment(&self, spiffe_id: &str) -> Result<Option<Enrollment>, StoreError>;
    /// Live issued certificates of an identity.
    fn issued_for(&self, spiffe_id: &str) -> Result<Vec<IssuedRecord>, StoreError>;
    /// The issued-certificate record of one serial (hex), while it is indexed.
    fn issued(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError>;
    /// The revocation of one serial (hex), if any.
    fn revoked_serial(&self, serial: &str) -> Result<Option<RevocationRecord>, StoreError>;
    /// The identity rule of one SPIFFE ID, if any.
    fn identity_rule(&self, spiffe_id: &str) -> Result<Option<RevocationRecord>, StoreError>;
    /// Every identity rule (few: identities are revoked rarely, unlike serials).
    fn identity_rules(&self) -> Result<Vec<RevocationRecord>, StoreError>;
    /// Every access request and grant still kept.
    fn access_all(&self) -> Result<Vec<AccessRecord>, StoreError>;
    /// Every live revocation with `rev > since`, ordered by rev.
    fn revocations_since(&self, since: u64) -> Result<Vec<RevocationRecord>, StoreError>;
    /// The last audit record's seq and hash; `None` for an empty log.
    fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError>;
    /// Up to `limit` audit records from `from` (inclusive), in order.
    fn read_audit(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
    /// Writes audit records (whose seqs must continue the log) and the writes they describe in
    /// one transaction. Not yet durable: call [`Store::flush`].
    fn commit(&self, records: &[AuditRecord], writes: &[Write]) -> Result<(), StoreError>;
    /// Makes every earlier commit durable (one fsync for a whole group of commits).
    fn flush(&self) -> Result<(), StoreError>;
    /// Deletes tokens, issued-cert index entries and revocations whose expiry is before `now`.
    /// Returns how many were deleted.
    fn prune(&self, now: i64) -> Result<usize, StoreError>;
    /// Counts of live entries per kind, for status and benchmarks.
    fn stats(&self) -> Result<StoreStats, StoreError>;
}

/// Sizes of the store's collections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Join tokens not yet pruned.
    pub tokens: usize,
    /// Issued certificates still indexed.
    pub issued: usize,
    /// Serial revocations.
    pub revoked_serials: usize,
    /// Identity rules.
    pub identity_rules: usize,
    /// Audit records.
    pub audit: usize,
    /// Bytes on disk, as sled reports them.
    pub disk_bytes: u64,
}
