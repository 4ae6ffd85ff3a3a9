//! Typed, versioned records kept in the store. Every value is JSON with a `v` field so a later
//! release can read what an earlier one wrote (sled makes no on-disk format promise of its own).

use serde::{Deserialize, Serialize};

/// Version of every record layout below.
pub const RECORD_VERSION: u32 = 1;

/// A join token, as stored: the secret only as a SHA-256 hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// Record layout version.
    pub v: u32,
    /// Public id (hex), the key.
    pub id: String,
    /// SHA-256 of the secret part.
    pub secret_hash: [u8; 32],
    /// `spiffe://td/path` or `spiffe://td/prefix/*`.
    pub spiffe_id: String,
    /// Roles the token may put in a certificate.
    pub roles: Vec<String>,
    /// Longest certificate lifetime, seconds.
    pub max_ttl: u64,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: i64,
    /// Issuances left.
    pub uses_left: u32,
    /// Who created it (SPIFFE ID).
    pub created_by: String,
    /// Set when an admin revoked it (its `uses_left` is then 0); absent in records written
    /// before revocation existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<TokenRevocation>,
}

/// Who revoked a join token, and when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRevocation {
    /// The admin (SPIFFE ID).
    pub by: String,
    /// Seconds since the Unix epoch.
    pub at: i64,
}

/// The role ceiling an identity enrolled with (from its join token); renewals never exceed it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enrollment {
    /// Record layout version.
    pub v: u32,
    /// The identity.
    pub spiffe_id: String,
    /// Roles the identity enrolled with.
    pub roles: Vec<String>,
    /// Longest certificate lifetime it enrolled with, seconds.
    pub max_ttl: u64,
    /// The token used, or `local` for credentials the server made itself.
    pub via: String,
}

/// A certificate the CA issued and that has not yet expired (plus renewal grace).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedRecord {
    /// Record layout version.
    pub v: u32,
    /// The identity.
    pub spiffe_id: String,
    /// Serial, hex.
    pub serial: String,
    /// Roles in the certificate.
    pub roles: Vec<String>,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

/// One revocation: a serial, or an identity rule (every cert of it with notBefore < `before`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevocationRecord {
    /// Record layout version.
    pub v: u32,
    /// Revision: the audit sequence number of the event that recorded it.
    pub rev: u64,
    /// Serial (hex) for a serial entry; empty for an identity rule.
    pub serial: String,
    /// The identity concerned.
    pub spiffe_id: String,
    /// Whether this is an identity rule.
    pub identity_rule: bool,
    /// Identity rules: certificates with notBefore before this instant are revoked.
    pub before: i64,
    /// Why.
    pub reason: String,
    /// When, seconds since the Unix epoch.
    pub revoked_at: i64,
    /// After this instant nothing the entry covers can be used any more; it is pruned.
    pub expires_at: i64,
    /// Identity rules: new issuance for the identity is refused while set.
    pub blocked: bool,
    /// Serial entries: the holder may still renew (peers must refuse the certificate). Used when
    /// a grant is revoked: the certificate carried roles it no longer may, the identity is fine.
    #[serde(default)]
    pub renewable: bool,
    /// The federated trust domain whose CA published this entry (relayed to this domain's
    /// workloads); empty for this CA's own revocations.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub origin: String,
}

/// A durable audit event, hash-chained to the one before it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// Record layout version.
    pub v: u32,
    /// Gapless sequence number, from 1.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Event kind, e.g. `issued`.
    pub kind: String,
    /// Who acted.
    pub actor: String,
    /// Who was acted upon.
    pub subject: String,
    /// Certificate serial, hex.
    pub serial: String,
    /// Roles involved.
    pub roles: Vec<String>,
    /// Certificate notAfter, seconds; 0 when none.
    pub not_after: i64,
    /// Why.
    pub reason: String,
    /// The identity an unverified caller's certificate claimed (see [`crate::audit::Event::claimed`]);
    /// empty for every other event, and then absent from the stored form and the hash.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub claimed: String,
    /// Hash of the previous record (zeros for the first).
    #[serde(with = "hex32")]
    pub prev_hash: [u8; 32],
    /// SHA-256 over the canonical encoding of this record.
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::encoding::hex(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        // Hex digits only: `from_str_radix` would also take a sign ("+f").
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(D::Error::custom("expected 64 hex characters"));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(D::Error::custom)?;
        }
        Ok(out)
    }
}

/// One approval of an access request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApprovalRecord {
    /// Who approved (SPIFFE ID).
    pub approver: String,
    /// Their comment.
    pub comment: String,
    /// When, seconds since the Unix epoch.
    pub at: i64,
}

/// A temporary access request and, once approved, the grant it became.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessRecord {
    /// Record layout version.
    pub v: u32,
    /// Request id (hex), the key; also the grant id.
    pub id: String,
    /// The identity that would receive the roles.
    pub spiffe_id: String,
    /// Roles asked for, sorted.
    pub roles: Vec<String>,
    /// Grant duration, seconds.
    pub duration_secs: u64,
    /// Why (free text, e.g. an incident number).
    pub reason: String,
    /// Who asked (SPIFFE ID).
    pub requester: String,
    /// When, seconds since the Unix epoch.
    pub created_at: i64,
    /// `pending`, `granted`, `denied`, `expired`, `ended` or `revoked`.
    pub state: String,
    /// Approvals so far.
    pub approvals: Vec<ApprovalRecord>,
    /// Approvals needed (from policy at request time).
    pub approvals_needed: u32,
    /// Pending: when the request expires. Granted: when the grant ends.
    pub expires_at: i64,
    /// When the grant started; 0 until granted.
    pub granted_at: i64,
    /// Who denied or revoked it.
    pub closed_by: String,
    /// Why it was denied or revoked.
    pub close_reason: String,
    /// When the record itself is deleted from the store (the audit log keeps the history).
    pub prune_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn audit_json(prev_hash: &str) -> String {
        format!(
            r#"{{"v":1,"seq":1,"time_ms":0,"kind":"issued","actor":"a","subject":"","serial":"","roles":[],"not_after":0,"reason":"","prev_hash":"{prev_hash}","hash":"{ZEROS}"}}"#
        )
    }

    /// Found by the `audit_record` fuzz target: `u8::from_str_radix` takes a sign, so "+0" was
    /// read as the byte 0x00 and one stored hash had several spellings.
    #[test]
    fn hashes_are_plain_hex_only() {
        let r: AuditRecord = serde_json::from_str(&audit_json(ZEROS)).unwrap();
        assert_eq!(r.prev_hash, [0; 32]);
        let upper = format!("AB{}", &ZEROS[2..]);
        let r: AuditRecord = serde_json::from_str(&audit_json(&upper)).unwrap();
        assert_eq!(r.prev_hash[0], 0xab);
        for bad in [format!("+0{}", &ZEROS[2..]), format!("-0{}", &ZEROS[2..])] {
            assert!(
                serde_json::from_str::<AuditRecord>(&audit_json(&bad)).is_err(),
                "{bad}"
            );
        }
    }
}
