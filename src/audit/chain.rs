//! The canonical encoding and the hash chain.
//!
//! The encoding is hand-written rather than serde's so it can never change under us: a domain
//! tag, then each field in a fixed order, integers big-endian, strings length-prefixed.

use sha2::{Digest, Sha256};

use crate::store::AuditRecord;

/// `prev_hash` of the first record.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// Where a chain stops verifying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// A sequence number is missing or repeated.
    #[error("gap in the log: expected seq {expected}, found {found}")]
    Gap {
        /// The seq that should have come next.
        expected: u64,
        /// The seq found instead.
        found: u64,
    },
    /// A record's `prev_hash` is not the previous record's hash.
    #[error("broken link at seq {0}: prev_hash does not match the previous event's hash")]
    BrokenLink(u64),
    /// A record's `hash` does not match its contents (it was altered).
    #[error("event {0} was altered: its hash does not match its contents")]
    Altered(u64),
    /// A record has the largest possible seq, which no log reaches (and nothing can follow).
    #[error("sequence number {} is out of range", u64::MAX)]
    SeqOverflow,
}

/// SHA-256 over the canonical encoding of `r` (every field but `hash`).
pub fn compute_hash(r: &AuditRecord) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"lanyard-audit-v1\0");
    h.update(r.seq.to_be_bytes());
    h.update(r.time_ms.to_be_bytes());
    for s in [&r.kind, &r.actor, &r.subject, &r.serial] {
        put_str(&mut h, s);
    }
    h.update((r.roles.len() as u32).to_be_bytes());
    for role in &r.roles {
        put_str(&mut h, role);
    }
    h.update(r.not_after.to_be_bytes());
    put_str(&mut h, &r.reason);
    h.update(r.prev_hash);
    // Added after the fixed-length prev_hash, and only when set, so every record written before
    // the field existed keeps its hash and the encoding stays unambiguous.
    if !r.claimed.is_empty() {
        h.update(b"claimed\0");
        put_str(&mut h, &r.claimed);
    }
    h.finalize().into()
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u32).to_be_bytes());
    h.update(s.as_bytes());
}

/// Checks records that continue a chain at `(expected_seq, prev_hash)`; returns the state to
/// continue from (next seq and last hash). Start a whole log at `(1, GENESIS_HASH)`.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    mut expected_seq: u64,
    mut prev_hash: [u8; 32],
) -> Result<(u64, [u8; 32]), ChainError> {
    for r in records {
        if r.seq != expected_seq {
            return Err(ChainError::Gap {
                expected: expected_seq,
                found: r.seq,
            });
        }
        if r.prev_hash != prev_hash {
            return Err(ChainError::BrokenLink(r.seq));
        }
        if compute_hash(r) != r.hash {
            return Err(ChainError::Altered(r.seq));
        }
        prev_hash = r.hash;
        expected_seq = expected_seq.checked_add(1).ok_or(ChainError::SeqOverflow)?;
    }
    Ok((expected_seq, prev_hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RECORD_VERSION;

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = GENESIS_HASH;
        (1..=n)
            .map(|seq| {
                let mut r = AuditRecord {
                    v: RECORD_VERSION,
                    seq,
                    time_ms: 1000 + seq as i64,
                    kind: "issued".into(),
                    actor: "token:ab".into(),
                    subject: "spiffe://example.org/a".into(),
                    serial: "01ff".into(),
                    roles: vec!["db-read".into()],
                    not_after: 99,
                    reason: String::new(),
                    claimed: String::new(),
                    prev_hash: prev,
                    hash: [0; 32],
                };
                r.hash = compute_hash(&r);
                prev = r.hash;
                r
            })
            .collect()
    }

    /// The expected hashes were computed outside Rust (Python's hashlib over the documented
    /// encoding): a record without `claimed` hashes exactly as before the field existed, so old
    /// logs still verify; with it, the field is bound into the hash.
    #[test]
    fn hash_matches_the_documented_encoding_with_and_without_claimed() {
        let mut r = chain(1).remove(0);
        assert_eq!(
            crate::encoding::hex(&compute_hash(&r)),
            "9f517710ad6f887a28a6c97a741729ca609a800816240840dffe065c573d6e6b"
        );
        r.claimed = "spiffe://example.org/ops/alice".into();
        assert_eq!(
            crate::encoding::hex(&compute_hash(&r)),
            "064ce2f21da1de43c54e4894ad2439f10abbf2e23ee9bb6c74f8608882a98353"
        );
    }

    #[test]
    fn intact_chain_verifies() {
        let c = chain(5);
        assert_eq!(verify_chain(&c, 1, GENESIS_HASH).unwrap().0, 6);
    }

    #[test]
    fn tampering_gaps_and_relinks_are_caught() {
        let mut c = chain(5);
        c[2].roles.push("admin".into());
        assert_eq!(
            verify_chain(&c, 1, GENESIS_HASH),
            Err(ChainError::Altered(3))
        );

        let mut c = chain(5);
        c.remove(2);
        assert!(matches!(
            verify_chain(&c, 1, GENESIS_HASH),
            Err(ChainError::Gap {
                expected: 3,
                found: 4
            })
        ));

        // Re-hashing an altered record does not help: the next link breaks.
        let mut c = chain(5);
        c[1].reason = "edited".into();
        c[1].hash = compute_hash(&c[1]);
        assert_eq!(
            verify_chain(&c, 1, GENESIS_HASH),
            Err(ChainError::BrokenLink(3))
        );
    }

    /// Found writing the `audit_record` fuzz target: a correctly hashed record with the largest seq
    /// made the next expected seq overflow (a panic in debug builds).
    #[test]
    fn last_possible_seq_is_refused_without_overflow() {
        let mut r = chain(1).remove(0);
        r.seq = u64::MAX;
        r.hash = compute_hash(&r);
        assert_eq!(
            verify_chain([&r], u64::MAX, GENESIS_HASH),
            Err(ChainError::SeqOverflow)
        );
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let mut a = chain(1).remove(0);
        let mut b = a.clone();
        a.actor = "ab".into();
        a.subject = "c".into();
        b.actor = "a".into();
        b.subject = "bc".into();
        assert_ne!(compute_hash(&a), compute_hash(&b));
    }
}
