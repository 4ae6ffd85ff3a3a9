//! Durable state behind a domain-shaped trait: tokens, enrollments, issued certificates,
//! revocations and the audit log. `sled.rs` is the embedded backend.
//!
//! All changes but token consumption go through [`Store::commit`], which writes a batch of audit
//! records and the state changes they describe in one transaction, then makes it durable. The
//! caller (the audit log's group-commit task) is the single writer, so sequence numbers are
//! gapless and every state change is on the record.
//!
//! Several replicas may share one store (the etcd backend): then a commit also checks that the
//! audit chain head is where the writer believed it was ([`StoreError::HeadMoved`]) and that
//! every [`Guard`] still holds ([`StoreError::GuardFailed`]), and the backend publishes every
//! replica's commits on its own feed ([`Store::commit_feed`]). Small replica-shared values (CA
//! material, rotation state, policy hashes, the replica registry) live in a versioned key/value
//! space with compare-and-set ([`Store::shared_put`]) and a change feed
//! ([`Store::shared_changes`]).

mod etcd;
mod index;
mod records;
mod sled;
mod wal;

use std::sync::Arc;

use tokio::sync::broadcast;

pub use etcd::{EtcdConfig, EtcdStore, EtcdTls};
pub use records::{
    AccessRecord, ApprovalRecord, AuditRecord, Enrollment, IssuedRecord, RECORD_VERSION,
    RevocationRecord, TokenRecord, TokenRevocation,
};

pub use sled::SledStore;

/// Capacity of the shared-change and commit feeds; a subscriber that lags further re-reads.
pub const FEED_BUFFER: usize = 4096;

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
    /// Another replica appended to the audit chain first; nothing of this commit was written.
    /// Re-read [`Store::audit_head`], re-sequence the records and commit again.
    #[error("audit chain head moved (another replica appended first)")]
    HeadMoved,
    /// These writes' [`Guard`]s failed (the guarded record changed, on another replica);
    /// nothing of this commit was written. Indexes are into the `writes` slice.
    #[error("guarded records changed concurrently (writes {writes:?})")]
    GuardFailed {
        /// Indexes of the failed `Write::Guard`s.
        writes: Vec<usize>,
    },
    /// The audit records asked for were archived and deleted (`lanyard audit export --prune`).
    #[error(
        "audit events up to #{through} are archived (`lanyard audit export --prune`); read from #{next}, or check them with `lanyard audit verify --archive FILE`",
        next = through + 1
    )]
    Archived {
        /// The last archived (deleted) seq: the checkpoint.
        through: u64,
    },
    /// A truncation that does not match the stored log; nothing was deleted.
    #[error("cannot prune the audit log: {0}")]
    ArchiveMismatch(String),
    /// The backend could not be reached in time (etcd without quorum, network down); retryable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::HeadMoved)
    }
}

/// Checks a truncation request against the stored log: `at` is the stored record `through`
/// (if any), `head` the chain head. Shared by both backends so they refuse alike.
fn check_truncation(
    through: u64,
    hash: [u8; 32],
    at: Option<&AuditRecord>,
    head: Option<(u64, [u8; 32])>,
    checkpoint: Option<(u64, [u8; 32])>,
) -> Result<(), StoreError> {
    let mismatch = |m: String| Err(StoreError::ArchiveMismatch(m));
    let head_seq = head.map_or(0, |(s, _)| s);
    if through >= head_seq {
        return mismatch(format!(
            "#{through} is not below the head #{head_seq}; the newest event always stays in the log"
        ));
    }
    if let Some((c, _)) = checkpoint
        && through <= c
    {
        return mismatch(format!("events up to #{c} are already archived"));
    }
    match at {
        None => mismatch(format!("event #{through} is not in the log")),
        Some(r) if r.hash != hash => mismatch(format!(
            "the archive's last hash differs from the log's event #{through}: the archive is not of this log"
        )),
        Some(_) => Ok(()),
    }
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
    /// Writes nothing: the commit fails with [`StoreError::GuardFailed`] naming this write unless
    /// the guarded record is still exactly as the caller read it.
    Guard(Guard),
}

/// A precondition of a commit: a record is still as it was read. Callers pass the record they
/// read (not a version number), so single-node code needs no versions; the etcd backend turns it
/// into a mod-revision compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// The access request `id` is still `expect` (`None`: still absent).
    Access {
        /// Request id.
        id: String,
        /// The record as read.
        expect: Option<Box<AccessRecord>>,
    },
    /// The identity rule of `spiffe_id` is still `expect` (`None`: still absent).
    IdentityRule {
        /// The identity.
        spiffe_id: String,
        /// The rule as read.
        expect: Option<Box<RevocationRecord>>,
    },
    /// No token record `id` exists yet (a spent-JWT record: two replicas accepting one JWT
    /// within a round trip must not both commit).
    TokenAbsent {
        /// Token id.
        id: String,
    },
}

/// A replica-shared value and its version (changes on every write; never 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The bytes stored.
    pub value: Vec<u8>,
    /// Opaque version for [`Store::shared_put`]'s compare-and-set.
    pub version: u64,
}

/// A change of one shared key, as published by [`Store::shared_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedChange {
    /// The key (without the backend's prefix).
    pub key: String,
    /// The new value; `None` when deleted.
    pub value: Option<Versioned>,
}

/// An audit record that is durable, with the state it carried, as the live feed publishes it.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The audit record.
    pub record: AuditRecord,
    /// Revocation entries written with it, their `rev` set to the record's seq.
    pub revocations: Vec<RevocationRecord>,
    /// Access requests/grants written with it (so every replica's access view can refresh).
    pub access: Vec<AccessRecord>,
}

/// A live revocation reduced to what a CRL needs, without its strings (see
/// [`Store::for_each_revocation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevocationBrief {
    /// The serial's big-endian bytes, in the first `serial_len`; 0 when there is none.
    serial: [u8; 20],
    serial_len: u8,
    /// The revision (audit seq) that wrote the entry.
    pub rev: u64,
    /// When it was revoked.
    pub revoked_at: i64,
    /// When the entry may be pruned.
    pub expires_at: i64,
    /// An identity rule (no serial of its own).
    pub identity_rule: bool,
    /// Relayed from a federated domain's CA (another CA's certificate).
    pub relayed: bool,
}

impl RevocationBrief {
    /// A serial entry.
    pub(crate) fn serial(
        bytes: &[u8],
        rev: u64,
        revoked_at: i64,
        expires_at: i64,
        relayed: bool,
    ) -> Self {
        let mut serial = [0u8; 20];
        let len = bytes.len().min(20);
        serial[..len].copy_from_slice(&bytes[..len]);
        Self {
            serial,
            serial_len: len as u8,
            rev,
            revoked_at,
            expires_at,
            identity_rule: false,
            relayed,
        }
    }

    /// The brief of a whole record; a serial in any spelling `Serial::parse_hex` reads.
    pub(crate) fn of(r: &RevocationRecord) -> Self {
        let serial = if r.identity_rule {
            None
        } else {
            crate::ca::Serial::parse_hex(&r.serial)
        };
        Self {
            identity_rule: r.identity_rule,
            ..Self::serial(
                serial.as_ref().map_or(&[][..], |s| s.as_bytes()),
                r.rev,
                r.revoked_at,
                r.expires_at,
                !r.origin.is_empty(),
            )
        }
    }

    /// The serial's big-endian bytes; `None` for an identity rule or a serial that is not hex.
    pub fn serial_bytes(&self) -> Option<&[u8]> {
        Some(&self.serial[..usize::from(self.serial_len)]).filter(|b| !b.is_empty())
    }
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
    /// About `limit` of the live revocations with `rev > since` (more when one revision holds
    /// more), ordered by rev and ending on a whole revision, so the next page starts after the
    /// last one's rev; empty when none is left. What a `Watch` from far back streams, a page at
    /// a time.
    fn revocations_page(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<RevocationRecord>, StoreError>;
    /// Calls `f` with every live revocation (serial entries, relayed ones included, then identity
    /// rules), reduced to what a CRL needs: no record is built and the index is read a chunk at
    /// a time, so a million entries cost neither a million records nor a commit stall. One
    /// commit's entries are seen all or none.
    fn for_each_revocation(&self, f: &mut dyn FnMut(&RevocationBrief)) -> Result<(), StoreError>;
    /// The last audit record's seq and hash; `None` for an empty log.
    fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError>;
    /// Up to `limit` audit records from `from` (inclusive), in order.
    fn read_audit(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
    /// Deletes the audit records up to `through_seq`, which an archive holds, and keeps a
    /// checkpoint (that seq and `hash`) so the chain stays verifiable from the archive on. `hash`
    /// must be the stored hash of record `through_seq` (the archive's last), and `through_seq`
    /// must be below the head: the head record is never deleted. Durable on return. Returns how
    /// many records were deleted; reads below the checkpoint then fail with
    /// [`StoreError::Archived`].
    fn truncate_audit(&self, through_seq: u64, hash: [u8; 32]) -> Result<usize, StoreError>;
    /// The archive checkpoint: the last archived seq and its hash; `None` if never truncated.
    fn audit_checkpoint(&self) -> Result<Option<(u64, [u8; 32])>, StoreError>;
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
    /// Backend facts for `lanyard status`: where the data lives and how big it is; on etcd the
    /// members, the leader, the raft term and raised alarms (NOSPACE stops every write).
    fn health(&self) -> Result<StoreHealth, StoreError>;

    /// A replica-shared value.
    fn shared_get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Compare-and-set of a shared value, durable on return: writes when the stored version is
    /// `expect` (`None`: the key must not exist). `false` when the compare failed.
    fn shared_put(&self, key: &str, value: &[u8], expect: Option<u64>) -> Result<bool, StoreError>;
    /// Deletes a shared value if its version is `expect` (`None`: whatever it is). `false` when
    /// the compare failed or the key did not exist.
    fn shared_delete(&self, key: &str, expect: Option<u64>) -> Result<bool, StoreError>;
    /// Every shared value whose key starts with `prefix`, in key order.
    fn shared_list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// Feed of shared-value changes. Replicated backends publish every replica's changes (this
    /// replica's before its `shared_put` returns); sled publishes its own.
    fn shared_changes(&self) -> broadcast::Receiver<SharedChange>;
    /// The feed on which the backend itself publishes every replica's commits in seq order
    /// (each before the local commit that wrote it returns). `None` (sled): the audit writer
    /// publishes its own commits.
    fn commit_feed(&self) -> Option<broadcast::Sender<Arc<Committed>>> {
        None
    }
    /// Most keys one [`Store::commit`] may write (etcd limits operations per transaction); the
    /// audit writer splits larger groups.
    fn max_commit_ops(&self) -> usize {
        usize::MAX
    }
}

/// What the backend reports about itself (see [`Store::health`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Where the data lives: sled's directory, or the etcd endpoints and key prefix.
    pub location: String,
    /// Database size in bytes (etcd: as the answering member reports it).
    pub size_bytes: u64,
    /// etcd members (empty on sled).
    pub members: Vec<StoreMember>,
    /// Member id of the etcd leader (0: none known, or sled).
    pub leader: u64,
    /// The etcd raft term (0 on sled): it grows with every election.
    pub raft_term: u64,
    /// Raised etcd alarms, as `<member id hex>: NOSPACE` (empty when healthy).
    pub alarms: Vec<String>,
    /// Whether commits write audit, revocation and issued records in the compact binary layout now
    /// (sled: always; etcd: while every registered replica reads it, decision 124).
    pub binary_records: bool,
}

/// One etcd member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreMember {
    /// Member id.
    pub id: u64,
    /// Member name.
    pub name: String,
    /// Where clients reach it.
    pub client_urls: Vec<String>,
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
    /// Audit records still stored (archived ones are not counted).
    pub audit: usize,
    /// Bytes on disk, as sled reports them.
    pub disk_bytes: u64,
}
