//! The embedded backend: sled trees, one per collection, plus an expiry index that makes pruning
//! proportional to what expired rather than to what is stored.

use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use tokio::sync::broadcast;

use super::{
    AccessRecord, AuditRecord, Consume, Enrollment, FEED_BUFFER, Guard, IssuedRecord,
    RevocationRecord, SharedChange, Store, StoreError, StoreHealth, StoreStats, TokenRecord,
    Versioned, Write,
};

/// Which collection an expiry-index entry points into.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Coll {
    Token = 1,
    Issued = 2,
    Revoked = 3,
    IdentityRule = 4,
    Access = 5,
}

/// The sled-backed [`Store`].
pub struct SledStore {
    db: sled::Db,
    /// The directory, for `health`.
    path: std::path::PathBuf,
    audit: sled::Tree,
    tokens: sled::Tree,
    enrollments: sled::Tree,
    /// serial → IssuedRecord.
    issued: sled::Tree,
    /// spiffe_id + 0 + serial → (), to list an identity's live certificates.
    issued_ids: sled::Tree,
    revoked: sled::Tree,
    identity_rules: sled::Tree,
    /// access request id → AccessRecord.
    access: sled::Tree,
    /// rev (8 bytes BE) + collection byte + key → (), for `revocations_since`.
    revs: sled::Tree,
    /// expires_at (8 bytes BE, offset) + collection byte + key → (), for `prune`.
    expiry: sled::Tree,
    /// shared key → version (8 bytes BE) + value.
    shared: sled::Tree,
    /// `checkpoint` → (seq, hash) of the last archived audit record.
    audit_meta: sled::Tree,
    /// Publishes this store's shared-value changes.
    shared_tx: broadcast::Sender<SharedChange>,
    /// The seq the next audit record must carry, once known. Only [`Store::commit`] appends to
    /// the audit tree and sled's directory lock keeps other processes out, so after one read of
    /// the head this is the truth; it saves a tree read and a decode on every group commit. The
    /// mutex is held across the commit, so commits are serialized (there is one writer anyway).
    /// `None` after a failed commit: the next one re-reads the head.
    next_seq: Mutex<Option<u64>>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // Lanyard flushes explicitly (group commit) before acknowledging anything; the periodic
        // background flush only bounds what an unacknowledged write may lose.
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(backend)?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        Ok(Self {
            audit: tree("audit")?,
            tokens: tree("tokens")?,
            enrollments: tree("enrollments")?,
            issued: tree("issued")?,
            issued_ids: tree("issued_ids")?,
            revoked: tree("revoked")?,
            identity_rules: tree("identity_rules")?,
            access: tree("access")?,
            revs: tree("revs")?,
            expiry: tree("expiry")?,
            shared: tree("shared")?,
            audit_meta: tree("audit_meta")?,
            shared_tx: broadcast::channel(FEED_BUFFER).0,
            path: dir.to_path_buf(),
            db,
            next_seq: Mutex::new(None),
        })
    }

    fn coll_tree(&self, c: u8) -> Option<&sled::Tree> {
        match c {
            x if x == Coll::Token as u8 => Some(&self.tokens),
            x if x == Coll::Issued as u8 => Some(&self.issued),
            x if x == Coll::Revoked as u8 => Some(&self.revoked),
            x if x == Coll::IdentityRule as u8 => Some(&self.identity_rules),
            x if x == Coll::Access as u8 => Some(&self.access),
            _ => None,
        }
    }
}

impl Store for SledStore {
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        get(&self.tokens, id.as_bytes())
    }

    fn consume_token(&self, id: &str, now: i64) -> Result<Consume, StoreError> {
        let key = id.as_bytes();
        // Exactly-once is a compare-and-swap on the one record: of two racers for the last use,
        // only the one whose swap still sees the old value wins; the other re-reads and finds no
        // use left. (A sled transaction would give the same guarantee, but sled writes out its
        // log buffer twice for every transaction, paid on every token issuance.)
        let outcome = loop {
            let Some(raw) = self.tokens.get(key).map_err(backend)? else {
                break Consume::Missing;
            };
            let rec: TokenRecord = decode(key, &raw)?;
            if rec.uses_left == 0 {
                break Consume::AlreadyUsed;
            }
            if rec.expires_at <= now {
                break Consume::Expired;
            }
            let mut after = rec.clone();
            after.uses_left -= 1;
            match self
                .tokens
                .compare_and_swap(key, Some(&raw), Some(encode(&after)))
                .map_err(backend)?
            {
                Ok(()) => break Consume::Won(rec),
                // Someone else took a use (or the record changed) in between: decide again.
                Err(_) => continue,
            }
        };
        // No fsync of its own. Durability comes from the caller's audit group commit:
        // `Issuance::with_token` answers only after the issuance's audit record is committed,
        // and that commit's `flush` makes every write made to this database before it durable as
        // well (sled has one log for all trees, and a flush covers everything already in it). So
        // no certificate is handed out on a use that a crash could give back; a crash before that
        // flush loses the use together with the never-sent certificate, and the token simply
        // keeps that use. Flushing here cost one extra fsync per issuance, paid on an async
        // worker thread.
        Ok(outcome)
    }

    fn enrollment(&self, spiffe_id: &str) -> Result<Option<Enrollment>, StoreError> {
        get(&self.enrollments, spiffe_id.as_bytes())
    }

    fn issued_for(&self, spiffe_id: &str) -> Result<Vec<IssuedRecord>, StoreError> {
        let prefix = issued_prefix(spiffe_id);
        let mut out = Vec::new();
        for kv in self.issued_ids.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(backend)?;
            if let Some(rec) = get(&self.issued, &k[prefix.len()..])? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn issued(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError> {
        get(&self.issued, serial.as_bytes())
    }

    fn revoked_serial(&self, serial: &str) -> Result<Option<RevocationRecord>, StoreError> {
        get(&self.revoked, serial.as_bytes())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.tokens
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode(&k, &v)
            })
            .collect()
    }

    fn access_all(&self) -> Result<Vec<AccessRecord>, StoreError> {
        self.access
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode(&k, &v)
            })
            .collect()
    }

    fn identity_rule(&self, spiffe_id: &str) -> Result<Option<RevocationRecord>, StoreError> {
        get(&self.identity_rules, spiffe_id.as_bytes())
    }

    fn identity_rules(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        self.identity_rules
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode(&k, &v)
            })
            .collect()
    }

    fn revocations_since(&self, since: u64) -> Result<Vec<RevocationRecord>, StoreError> {
        let start = since.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for kv in self.revs.range(start..) {
            let (k, _) = kv.map_err(backend)?;
            let Some(tree) = k.get(8).and_then(|c| self.coll_tree(*c)) else {
                continue;
            };
            if let Some(raw) = tree.get(&k[9..]).map_err(backend)? {
                out.push(decode(&k[9..], &raw)?);
            }
        }
        Ok(out)
    }

    fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        match self.audit.last().map_err(backend)? {
            None => Ok(None),
            Some((k, v)) => {
                let rec: AuditRecord = decode(&k, &v)?;
                Ok(Some((rec.seq, rec.hash)))
            }
        }
    }

    fn read_audit(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        if let Some((through, _)) = self.audit_checkpoint()?
            && from <= through
        {
            return Err(StoreError::Archived { through });
        }
        self.audit
            .range(from.to_be_bytes()..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode(&k, &v)
            })
            .collect()
    }

    fn truncate_audit(&self, through_seq: u64, hash: [u8; 32]) -> Result<usize, StoreError> {
        let at: Option<AuditRecord> = get(&self.audit, &through_seq.to_be_bytes())?;
        super::check_truncation(
            through_seq,
            hash,
            at.as_ref(),
            self.audit_head()?,
            self.audit_checkpoint()?,
        )?;
        // Checkpoint first and durable: a crash mid-deletion leaves records below it that reads
        // already refuse, never a gap without a checkpoint.
        self.audit_meta
            .insert(CHECKPOINT, encode(&(through_seq, hash)))
            .map_err(backend)?;
        self.db.flush().map_err(backend)?;
        let mut deleted = 0;
        for kv in self.audit.range(..=through_seq.to_be_bytes()) {
            let (k, _) = kv.map_err(backend)?;
            self.audit.remove(k).map_err(backend)?;
            deleted += 1;
        }
        self.db.flush().map_err(backend)?;
        Ok(deleted)
    }

    fn audit_checkpoint(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        get(&self.audit_meta, CHECKPOINT)
    }

    fn commit(&self, records: &[AuditRecord], writes: &[Write]) -> Result<(), StoreError> {
        let mut next_seq = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        if !records.is_empty() {
            let expected = match *next_seq {
                Some(n) => n,
                None => self.audit_head()?.map_or(1, |(seq, _)| seq + 1),
            };
            if let Some((i, r)) = records
                .iter()
                .enumerate()
                .find(|(i, r)| r.seq != expected + *i as u64)
            {
                return Err(StoreError::OutOfOrder {
                    expected: expected + i as u64,
                    got: r.seq,
                });
            }
        }
        // Encode every key and value before the transaction: sled runs a transaction under a
        // process-wide write lock that every other read and write (the issuance path's revocation
        // and enrollment lookups included) waits on, so only the inserts happen inside it.
        let audit: Vec<([u8; 8], Vec<u8>)> = records
            .iter()
            .map(|r| (r.seq.to_be_bytes(), encode(r)))
            .collect();
        let prepared: Vec<Prepared<'_>> = writes.iter().map(Prepared::new).collect();
        // More trees than sled's tuple impls take, so the slice form; the order is fixed here.
        let trees = [
            &self.audit,
            &self.tokens,
            &self.enrollments,
            &self.issued,
            &self.issued_ids,
            &self.revoked,
            &self.identity_rules,
            &self.revs,
            &self.expiry,
            &self.access,
        ];
        let result = trees[..]
            .transaction(|t| {
                let (audit_t, tokens, enrollments, issued, issued_ids) =
                    (&t[0], &t[1], &t[2], &t[3], &t[4]);
                let (revoked, rules, revs, expiry, access) = (&t[5], &t[6], &t[7], &t[8], &t[9]);
                // Guards first: a failed one aborts before anything is written.
                let mut failed = Vec::new();
                for (i, w) in prepared.iter().enumerate() {
                    if let Prepared::Guard(g) = w {
                        let holds = match g {
                            Guard::Access { id, expect } => {
                                let now: Option<AccessRecord> = access
                                    .get(id.as_bytes())?
                                    .map(|raw| decode(id.as_bytes(), &raw))
                                    .transpose()
                                    .map_err(ConflictableTransactionError::Abort)?;
                                now.as_ref() == expect.as_deref()
                            }
                            Guard::IdentityRule { spiffe_id, expect } => {
                                let now: Option<RevocationRecord> = rules
                                    .get(spiffe_id.as_bytes())?
                                    .map(|raw| decode(spiffe_id.as_bytes(), &raw))
                                    .transpose()
                                    .map_err(ConflictableTransactionError::Abort)?;
                                now.as_ref() == expect.as_deref()
                            }
                            Guard::TokenAbsent { id } => tokens.get(id.as_bytes())?.is_none(),
                        };
                        if !holds {
                            failed.push(i);
                        }
                    }
                }
                if !failed.is_empty() {
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::GuardFailed { writes: failed },
                    ));
                }
                for (k, v) in &audit {
                    audit_t.insert(k, v.as_slice())?;
                }
                for w in &prepared {
                    match w {
                        Prepared::Token {
                            key,
                            value,
                            expiry_key,
                        } => {
                            tokens.insert(*key, value.as_slice())?;
                            expiry.insert(expiry_key.as_slice(), &[])?;
                        }
                        Prepared::Enrollment { key, value } => {
                            enrollments.insert(*key, value.as_slice())?;
                        }
                        Prepared::Issued {
                            key,
                            value,
                            id_key,
                            expiry_key,
                        } => {
                            issued.insert(*key, value.as_slice())?;
                            issued_ids.insert(id_key.as_slice(), &[])?;
                            expiry.insert(expiry_key.as_slice(), &[])?;
                        }
                        Prepared::Revocation {
                            rec,
                            value,
                            expiry_key,
                        } => {
                            let (tree, coll, key) = if rec.identity_rule {
                                (rules, Coll::IdentityRule, rec.spiffe_id.as_bytes())
                            } else {
                                (revoked, Coll::Revoked, rec.serial.as_bytes())
                            };
                            if let Some(old) = tree.get(key)? {
                                // Replacing an entry: drop its old rev index key.
                                let old: RevocationRecord = decode(key, &old)
                                    .map_err(ConflictableTransactionError::Abort)?;
                                revs.remove(rev_key(old.rev, coll, key))?;
                            }
                            tree.insert(key, value.as_slice())?;
                            revs.insert(rev_key(rec.rev, coll, key), &[])?;
                            expiry.insert(expiry_key.as_slice(), &[])?;
                        }
                        Prepared::Access {
                            key,
                            value,
                            expiry_key,
                        } => {
                            access.insert(*key, value.as_slice())?;
                            expiry.insert(expiry_key.as_slice(), &[])?;
                        }
                        Prepared::Guard(_) => {}
                    }
                }
                Ok(())
            })
            .map_err(tx_err);
        *next_seq = match (&result, records.last()) {
            (Ok(()), Some(last)) => Some(last.seq + 1),
            (Ok(()), None) => *next_seq,
            (Err(_), _) => None,
        };
        result
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    fn prune(&self, now: i64) -> Result<usize, StoreError> {
        let end = expiry_prefix(now);
        let mut pruned = 0;
        for kv in self.expiry.range(..end) {
            let (k, _) = kv.map_err(backend)?;
            let coll = k[8];
            let key = &k[9..];
            if let Some(tree) = self.coll_tree(coll) {
                // The same key may have been re-indexed with a later expiry (a renewed token, a
                // re-revoked identity): only delete when the stored record is really expired.
                if let Some(raw) = tree.get(key).map_err(backend)?
                    && record_expiry(coll, key, &raw)? < now
                {
                    if coll == Coll::Revoked as u8 || coll == Coll::IdentityRule as u8 {
                        let rec: RevocationRecord = decode(key, &raw)?;
                        self.revs
                            .remove(rev_key(rec.rev, coll_of(coll), key))
                            .map_err(backend)?;
                    } else if coll == Coll::Issued as u8 {
                        let rec: IssuedRecord = decode(key, &raw)?;
                        let mut id_key = issued_prefix(&rec.spiffe_id);
                        id_key.extend_from_slice(key);
                        self.issued_ids.remove(id_key).map_err(backend)?;
                    }
                    tree.remove(key).map_err(backend)?;
                    pruned += 1;
                }
            }
            self.expiry.remove(&k).map_err(backend)?;
        }
        Ok(pruned)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(StoreStats {
            tokens: self.tokens.len(),
            issued: self.issued.len(),
            revoked_serials: self.revoked.len(),
            identity_rules: self.identity_rules.len(),
            audit: self.audit.len(),
            disk_bytes: self.db.size_on_disk().map_err(backend)?,
        })
    }

    fn health(&self) -> Result<StoreHealth, StoreError> {
        Ok(StoreHealth {
            location: self.path.display().to_string(),
            size_bytes: self.db.size_on_disk().map_err(backend)?,
            ..StoreHealth::default()
        })
    }

    fn shared_get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self
            .shared
            .get(key.as_bytes())
            .map_err(backend)?
            .and_then(|raw| versioned(&raw)))
    }

    fn shared_put(&self, key: &str, value: &[u8], expect: Option<u64>) -> Result<bool, StoreError> {
        let current = self.shared.get(key.as_bytes()).map_err(backend)?;
        if current.as_deref().and_then(versioned).map(|v| v.version) != expect {
            return Ok(false);
        }
        // Versions come from sled's monotonic id generator (+1: never 0), so a value written,
        // deleted and written again never repeats an earlier version.
        let version = self.db.generate_id().map_err(backend)? + 1;
        let mut raw = version.to_be_bytes().to_vec();
        raw.extend_from_slice(value);
        if self
            .shared
            .compare_and_swap(key.as_bytes(), current, Some(raw))
            .map_err(backend)?
            .is_err()
        {
            return Ok(false);
        }
        self.flush()?;
        let _ = self.shared_tx.send(SharedChange {
            key: key.to_string(),
            value: Some(Versioned {
                value: value.to_vec(),
                version,
            }),
        });
        Ok(true)
    }

    fn shared_delete(&self, key: &str, expect: Option<u64>) -> Result<bool, StoreError> {
        let Some(current) = self.shared.get(key.as_bytes()).map_err(backend)? else {
            return Ok(false);
        };
        if expect.is_some() && versioned(&current).map(|v| v.version) != expect {
            return Ok(false);
        }
        if self
            .shared
            .compare_and_swap(key.as_bytes(), Some(current), None::<&[u8]>)
            .map_err(backend)?
            .is_err()
        {
            return Ok(false);
        }
        self.flush()?;
        let _ = self.shared_tx.send(SharedChange {
            key: key.to_string(),
            value: None,
        });
        Ok(true)
    }

    fn shared_list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.shared.scan_prefix(prefix.as_bytes()) {
            let (k, raw) = kv.map_err(backend)?;
            if let Some(v) = versioned(&raw) {
                out.push((String::from_utf8_lossy(&k).into_owned(), v));
            }
        }
        Ok(out)
    }

    fn shared_changes(&self) -> broadcast::Receiver<SharedChange> {
        self.shared_tx.subscribe()
    }
}

/// Splits a stored shared value into its version and bytes.
/// The key of the archive checkpoint in `audit_meta`.
const CHECKPOINT: &[u8] = b"checkpoint";

fn versioned(raw: &[u8]) -> Option<Versioned> {
    let (v, value) = raw.split_first_chunk::<8>()?;
    Some(Versioned {
        value: value.to_vec(),
        version: u64::from_be_bytes(*v),
    })
}

fn coll_of(c: u8) -> Coll {
    match c {
        1 => Coll::Token,
        2 => Coll::Issued,
        3 => Coll::Revoked,
        5 => Coll::Access,
        _ => Coll::IdentityRule,
    }
}

fn record_expiry(coll: u8, key: &[u8], raw: &[u8]) -> Result<i64, StoreError> {
    Ok(match coll_of(coll) {
        Coll::Token => decode::<TokenRecord>(key, raw)?.expires_at,
        // The issued index is written with its prune time only in the expiry index; the record's
        // notAfter is a lower bound, and the index entry is only reached once that time passed.
        Coll::Issued => i64::MIN,
        Coll::Revoked | Coll::IdentityRule => decode::<RevocationRecord>(key, raw)?.expires_at,
        Coll::Access => decode::<AccessRecord>(key, raw)?.prune_at,
    })
}

fn issued_prefix(spiffe_id: &str) -> Vec<u8> {
    let mut k = spiffe_id.as_bytes().to_vec();
    k.push(0);
    k
}

fn rev_key(rev: u64, coll: Coll, key: &[u8]) -> Vec<u8> {
    let mut k = rev.to_be_bytes().to_vec();
    k.push(coll as u8);
    k.extend_from_slice(key);
    k
}

/// Expiry times are signed; offsetting by 2^63 keeps big-endian byte order equal to time order.
fn expiry_prefix(at: i64) -> [u8; 8] {
    ((at as u64) ^ (1 << 63)).to_be_bytes()
}

fn expiry_key(at: i64, coll: Coll, key: &[u8]) -> Vec<u8> {
    let mut k = expiry_prefix(at).to_vec();
    k.push(coll as u8);
    k.extend_from_slice(key);
    k
}

/// A [`Write`] with its keys and value already encoded, ready for the commit transaction.
enum Prepared<'a> {
    Token {
        key: &'a [u8],
        value: Vec<u8>,
        expiry_key: Vec<u8>,
    },
    Enrollment {
        key: &'a [u8],
        value: Vec<u8>,
    },
    Issued {
        key: &'a [u8],
        value: Vec<u8>,
        id_key: Vec<u8>,
        expiry_key: Vec<u8>,
    },
    /// Its rev-index cleanup needs a read inside the transaction.
    Revocation {
        rec: &'a RevocationRecord,
        value: Vec<u8>,
        expiry_key: Vec<u8>,
    },
    Access {
        key: &'a [u8],
        value: Vec<u8>,
        expiry_key: Vec<u8>,
    },
    Guard(&'a Guard),
}

impl<'a> Prepared<'a> {
    fn new(w: &'a Write) -> Self {
        match w {
            Write::PutToken(t) => Prepared::Token {
                key: t.id.as_bytes(),
                value: encode(t),
                expiry_key: expiry_key(t.expires_at, Coll::Token, t.id.as_bytes()),
            },
            Write::PutEnrollment(e) => Prepared::Enrollment {
                key: e.spiffe_id.as_bytes(),
                value: encode(e),
            },
            Write::PutIssued(i, prune_at) => {
                let mut id_key = issued_prefix(&i.spiffe_id);
                id_key.extend_from_slice(i.serial.as_bytes());
                Prepared::Issued {
                    key: i.serial.as_bytes(),
                    value: encode(i),
                    id_key,
                    expiry_key: expiry_key(*prune_at, Coll::Issued, i.serial.as_bytes()),
                }
            }
            Write::PutRevocation(r) => {
                let (coll, key) = if r.identity_rule {
                    (Coll::IdentityRule, r.spiffe_id.as_bytes())
                } else {
                    (Coll::Revoked, r.serial.as_bytes())
                };
                Prepared::Revocation {
                    rec: r,
                    value: encode(r),
                    expiry_key: expiry_key(r.expires_at, coll, key),
                }
            }
            Write::PutAccess(a) => Prepared::Access {
                key: a.id.as_bytes(),
                value: encode(a),
                expiry_key: expiry_key(a.prune_at, Coll::Access, a.id.as_bytes()),
            },
            Write::Guard(g) => Prepared::Guard(g),
        }
    }
}

pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

pub(super) fn decode<T: DeserializeOwned>(key: &[u8], raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>, StoreError> {
    tree.get(key)
        .map_err(backend)?
        .map(|raw| decode(key, &raw))
        .transpose()
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RECORD_VERSION;

    fn token(id: &str, uses: u32, expires_at: i64) -> TokenRecord {
        TokenRecord {
            v: RECORD_VERSION,
            id: id.into(),
            secret_hash: [7; 32],
            spiffe_id: "spiffe://example.org/a".into(),
            roles: vec![],
            max_ttl: 300,
            expires_at,
            uses_left: uses,
            revoked: None,
            created_by: "spiffe://example.org/lanyard/admin".into(),
        }
    }

    fn revocation(serial: &str, rev: u64, expires_at: i64) -> RevocationRecord {
        RevocationRecord {
            v: RECORD_VERSION,
            rev,
            serial: serial.into(),
            spiffe_id: "spiffe://example.org/a".into(),
            identity_rule: false,
            before: 0,
            reason: "test".into(),
            revoked_at: 0,
            expires_at,
            blocked: false,
            renewable: false,
            origin: String::new(),
        }
    }

    #[test]
    fn token_is_consumed_once_even_under_contention() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
        store
            .commit(&[], &[Write::PutToken(token("t1", 1, 1000))])
            .unwrap();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = store.clone();
                std::thread::spawn(move || s.consume_token("t1", 10).unwrap())
            })
            .collect();
        let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| matches!(o, Consume::Won(_)))
                .count(),
            1
        );
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == Consume::AlreadyUsed)
                .count(),
            7
        );
        assert_eq!(store.consume_token("nope", 10).unwrap(), Consume::Missing);
        store
            .commit(&[], &[Write::PutToken(token("t2", 1, 5))])
            .unwrap();
        assert_eq!(store.consume_token("t2", 10).unwrap(), Consume::Expired);
    }

    #[test]
    fn prune_removes_only_expired_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store
            .commit(
                &[],
                &[
                    Write::PutRevocation(revocation("aa", 1, 100)),
                    Write::PutRevocation(revocation("bb", 2, 300)),
                    Write::PutToken(token("t", 1, 150)),
                ],
            )
            .unwrap();
        assert_eq!(store.revocations_since(0).unwrap().len(), 2);
        assert_eq!(store.revocations_since(1).unwrap()[0].serial, "bb");
        assert_eq!(store.prune(200).unwrap(), 2);
        assert!(store.revoked_serial("aa").unwrap().is_none());
        assert!(store.revoked_serial("bb").unwrap().is_some());
        assert!(store.token("t").unwrap().is_none());
        assert_eq!(store.revocations_since(0).unwrap().len(), 1);
        assert_eq!(store.prune(200).unwrap(), 0);
    }

    #[test]
    fn audit_commit_rejects_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let rec = |seq| AuditRecord {
            v: RECORD_VERSION,
            seq,
            time_ms: 0,
            kind: "x".into(),
            actor: String::new(),
            subject: String::new(),
            serial: String::new(),
            roles: vec![],
            not_after: 0,
            reason: String::new(),
            claimed: String::new(),
            prev_hash: [0; 32],
            hash: [1; 32],
        };
        store.commit(&[rec(1)], &[]).unwrap();
        assert!(matches!(
            store.commit(&[rec(3)], &[]),
            Err(StoreError::OutOfOrder {
                expected: 2,
                got: 3
            })
        ));
        store.commit(&[rec(2)], &[]).unwrap();
        assert_eq!(store.audit_head().unwrap().unwrap().0, 2);
        assert_eq!(store.read_audit(2, 10).unwrap().len(), 1);
    }
}
