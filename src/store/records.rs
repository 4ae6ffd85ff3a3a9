//! Typed, versioned records kept in the store. Every record carries a `v` field so a later
//! release can read what an earlier one wrote (sled makes no on-disk format promise of its own).
//!
//! Two encodings are read: JSON (everything up to release 0.x wrote it, and etcd still does, so
//! replicas of mixed releases read each other), and a compact binary layout ([`Stored`]) that
//! sled now writes for the high-volume records (audit, issued, revocations, tokens): a third of
//! the bytes, and no text formatting on the issuance path. A JSON value starts with `{`, a binary
//! one with [`BINARY`], so each value says which it is.

use serde::de::DeserializeOwned;
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

/// First byte of a value in the binary layout (JSON values start with `{`).
pub(crate) const BINARY: u8 = 0xB1;

/// A value the sled backend stores: written in the compact binary layout where one exists,
/// read in either that or JSON (what earlier releases wrote).
pub(crate) trait Stored: Sized {
    /// The stored bytes.
    fn to_stored(&self) -> Vec<u8>;
    /// Reads stored bytes in either layout.
    fn from_stored(raw: &[u8]) -> Result<Self, String>;
}

/// Records with a binary layout: a type tag after [`BINARY`], then the fields in order.
trait Binary: Sized + Serialize + DeserializeOwned {
    /// Distinguishes the record types, so a value read as the wrong type fails to decode.
    const TAG: u8;
    fn write(&self, w: &mut Writer);
    fn read(r: &mut Reader<'_>) -> Option<Self>;
}

impl<T: Binary> Stored for T {
    fn to_stored(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(128));
        w.0.push(BINARY);
        w.0.push(T::TAG);
        self.write(&mut w);
        w.0
    }

    fn from_stored(raw: &[u8]) -> Result<Self, String> {
        match raw {
            [BINARY, tag, rest @ ..] if *tag == T::TAG => {
                let mut r = Reader(rest);
                match T::read(&mut r) {
                    Some(v) if r.0.is_empty() => Ok(v),
                    Some(_) => Err("trailing bytes after a binary record".into()),
                    None => Err("truncated or malformed binary record".into()),
                }
            }
            [BINARY, ..] => Err("binary record of another type".into()),
            _ => serde_json::from_slice(raw).map_err(|e| e.to_string()),
        }
    }
}

/// Records that stay JSON (rare, small, or shared with tools): the layout is serde's.
macro_rules! json_stored {
    ($($t:ty),*) => {$(
        impl Stored for $t {
            fn to_stored(&self) -> Vec<u8> {
                // Serializing these plain structs to JSON cannot fail (no non-string map keys).
                serde_json::to_vec(self).unwrap_or_default()
            }
            fn from_stored(raw: &[u8]) -> Result<Self, String> {
                serde_json::from_slice(raw).map_err(|e| e.to_string())
            }
        }
    )*};
}
json_stored!(Enrollment, AccessRecord, (u64, [u8; 32]));

/// Appends varints, strings and fixed fields.
struct Writer(Vec<u8>);

impl Writer {
    fn u64(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn i64(&mut self, v: i64) {
        // Zigzag: small negative and positive numbers both stay short.
        self.u64(((v << 1) ^ (v >> 63)) as u64);
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn strs(&mut self, v: &[String]) {
        self.u64(v.len() as u64);
        for s in v {
            self.str(s);
        }
    }
    fn bytes32(&mut self, b: &[u8; 32]) {
        self.0.extend_from_slice(b);
    }
    fn flag(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }
}

/// Reads what [`Writer`] wrote; `None` on anything malformed (never panics on input).
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u64(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.u64()?).ok()
    }
    fn i64(&mut self) -> Option<i64> {
        let z = self.u64()?;
        Some(((z >> 1) as i64) ^ -((z & 1) as i64))
    }
    fn str(&mut self) -> Option<String> {
        let n = usize::try_from(self.u64()?).ok()?;
        if n > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8(s.to_vec()).ok()
    }
    fn strs(&mut self) -> Option<Vec<String>> {
        let n = usize::try_from(self.u64()?).ok()?;
        // Every string takes at least one byte: a count beyond that is corrupt, not an
        // allocation to make.
        if n > self.0.len() {
            return None;
        }
        (0..n).map(|_| self.str()).collect()
    }
    fn bytes32(&mut self) -> Option<[u8; 32]> {
        let (b, rest) = self.0.split_first_chunk::<32>()?;
        self.0 = rest;
        Some(*b)
    }
    fn flag(&mut self) -> Option<bool> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        match b {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
}

impl Binary for TokenRecord {
    const TAG: u8 = 1;
    fn write(&self, w: &mut Writer) {
        w.u64(self.v.into());
        w.str(&self.id);
        w.bytes32(&self.secret_hash);
        w.str(&self.spiffe_id);
        w.strs(&self.roles);
        w.u64(self.max_ttl);
        w.i64(self.expires_at);
        w.u64(self.uses_left.into());
        w.str(&self.created_by);
        match &self.revoked {
            None => w.flag(false),
            Some(r) => {
                w.flag(true);
                w.str(&r.by);
                w.i64(r.at);
            }
        }
    }
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        Some(Self {
            v: r.u32()?,
            id: r.str()?,
            secret_hash: r.bytes32()?,
            spiffe_id: r.str()?,
            roles: r.strs()?,
            max_ttl: r.u64()?,
            expires_at: r.i64()?,
            uses_left: r.u32()?,
            created_by: r.str()?,
            revoked: if r.flag()? {
                Some(TokenRevocation {
                    by: r.str()?,
                    at: r.i64()?,
                })
            } else {
                None
            },
        })
    }
}

impl Binary for IssuedRecord {
    const TAG: u8 = 2;
    fn write(&self, w: &mut Writer) {
        w.u64(self.v.into());
        w.str(&self.spiffe_id);
        w.str(&self.serial);
        w.strs(&self.roles);
        w.i64(self.not_after);
    }
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        Some(Self {
            v: r.u32()?,
            spiffe_id: r.str()?,
            serial: r.str()?,
            roles: r.strs()?,
            not_after: r.i64()?,
        })
    }
}

impl Binary for RevocationRecord {
    const TAG: u8 = 3;
    fn write(&self, w: &mut Writer) {
        w.u64(self.v.into());
        w.u64(self.rev);
        w.str(&self.serial);
        w.str(&self.spiffe_id);
        w.flag(self.identity_rule);
        w.i64(self.before);
        w.str(&self.reason);
        w.i64(self.revoked_at);
        w.i64(self.expires_at);
        w.flag(self.blocked);
        w.flag(self.renewable);
        w.str(&self.origin);
    }
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        Some(Self {
            v: r.u32()?,
            rev: r.u64()?,
            serial: r.str()?,
            spiffe_id: r.str()?,
            identity_rule: r.flag()?,
            before: r.i64()?,
            reason: r.str()?,
            revoked_at: r.i64()?,
            expires_at: r.i64()?,
            blocked: r.flag()?,
            renewable: r.flag()?,
            origin: r.str()?,
        })
    }
}

impl Binary for AuditRecord {
    const TAG: u8 = 4;
    fn write(&self, w: &mut Writer) {
        w.u64(self.v.into());
        w.u64(self.seq);
        w.i64(self.time_ms);
        w.str(&self.kind);
        w.str(&self.actor);
        w.str(&self.subject);
        w.str(&self.serial);
        w.strs(&self.roles);
        w.i64(self.not_after);
        w.str(&self.reason);
        w.str(&self.claimed);
        w.bytes32(&self.prev_hash);
        w.bytes32(&self.hash);
    }
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        Some(Self {
            v: r.u32()?,
            seq: r.u64()?,
            time_ms: r.i64()?,
            kind: r.str()?,
            actor: r.str()?,
            subject: r.str()?,
            serial: r.str()?,
            roles: r.strs()?,
            not_after: r.i64()?,
            reason: r.str()?,
            claimed: r.str()?,
            prev_hash: r.bytes32()?,
            hash: r.bytes32()?,
        })
    }
}

/// Type tag of an issued record followed by its prune time: the etcd backend's issued-index
/// entries (sled keeps the prune time in its expiry index).
const ISSUED_PRUNE_TAG: u8 = 6;

/// An issued record and the time its index entry may be pruned, in the binary layout.
pub(crate) fn issued_with_prune_to_stored(rec: &IssuedRecord, prune_at: i64) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(96));
    w.0.push(BINARY);
    w.0.push(ISSUED_PRUNE_TAG);
    rec.write(&mut w);
    w.i64(prune_at);
    w.0
}

/// Reads what [`issued_with_prune_to_stored`] wrote; `None` when `raw` is not binary (JSON).
pub(crate) fn issued_with_prune_from_stored(
    raw: &[u8],
) -> Option<Result<(IssuedRecord, i64), String>> {
    let rest = match raw {
        [BINARY, ISSUED_PRUNE_TAG, rest @ ..] => rest,
        [BINARY, ..] => return Some(Err("binary record of another type".into())),
        _ => return None,
    };
    let mut r = Reader(rest);
    Some(match (IssuedRecord::read(&mut r), r.i64()) {
        (Some(rec), Some(prune_at)) if r.0.is_empty() => Ok((rec, prune_at)),
        (Some(_), Some(_)) => Err("trailing bytes after an issued entry".into()),
        _ => Err("truncated or malformed issued entry".into()),
    })
}

/// A serial revocation as sled now stores it under its serial's key: the record's numbers,
/// and its identity, reason and origin by the number of a string stored once in the
/// revocation strings tree (the in-memory index hands the numbers out). About 16 bytes
/// where a [`RevocationRecord`] takes 70 and more, most of it the SPIFFE ID that every entry
/// of an identity repeated. Only entries the index keeps in this form are written so (a serial
/// in canonical hex, no `before`, not `blocked`, `expires_at - revoked_at` in `u32`); the
/// others stay whole records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompactRevocation {
    /// Revision: the audit seq that wrote it.
    pub rev: u64,
    /// When the entry may be pruned.
    pub expires_at: i64,
    /// `expires_at - revoked_at`.
    pub lead: u32,
    /// The identity's string number.
    pub spiffe_id: u32,
    /// The reason's string number, with the top bit set when the holder may still renew.
    pub reason: u32,
    /// The origin's string number (the empty string for this CA's own entries).
    pub origin: u32,
}

impl CompactRevocation {
    /// Its type tag after [`BINARY`] (a value of layout version 1: a later layout takes
    /// another tag).
    pub(crate) const TAG: u8 = 5;

    /// The stored bytes.
    pub(crate) fn to_stored(self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(24));
        w.0.push(BINARY);
        w.0.push(Self::TAG);
        w.u64(self.rev);
        w.u64(self.spiffe_id.into());
        w.u64(self.reason.into());
        w.u64(self.origin.into());
        w.i64(self.expires_at);
        w.u64(self.lead.into());
        w.0
    }

    /// Whether stored bytes are of this type (else a [`RevocationRecord`], binary or JSON).
    pub(crate) fn is_stored(raw: &[u8]) -> bool {
        matches!(raw, [BINARY, Self::TAG, ..])
    }

    /// Reads what [`CompactRevocation::to_stored`] wrote.
    pub(crate) fn from_stored(raw: &[u8]) -> Result<Self, String> {
        let [BINARY, Self::TAG, rest @ ..] = raw else {
            return Err("not a compact revocation".into());
        };
        let mut r = Reader(rest);
        let c = (|| {
            Some(Self {
                rev: r.u64()?,
                spiffe_id: r.u32()?,
                reason: r.u32()?,
                origin: r.u32()?,
                expires_at: r.i64()?,
                lead: r.u32()?,
            })
        })();
        match c {
            Some(c) if r.0.is_empty() => Ok(c),
            Some(_) => Err("trailing bytes after a compact revocation".into()),
            None => Err("truncated or malformed compact revocation".into()),
        }
    }
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

    fn audit(claimed: &str) -> AuditRecord {
        AuditRecord {
            v: RECORD_VERSION,
            seq: 1 << 40,
            time_ms: -5,
            kind: "issued".into(),
            actor: "spiffe://td/a".into(),
            subject: "spiffe://td/b".into(),
            serial: "01ff".into(),
            roles: vec!["r1".into(), "é".into()],
            not_after: i64::MAX,
            reason: String::new(),
            claimed: claimed.into(),
            prev_hash: [3; 32],
            hash: [4; 32],
        }
    }

    fn revocation() -> RevocationRecord {
        RevocationRecord {
            v: RECORD_VERSION,
            rev: 7,
            serial: "01ab".into(),
            spiffe_id: "spiffe://td/x".into(),
            identity_rule: false,
            before: i64::MIN,
            reason: "key leak".into(),
            revoked_at: 1_700_000_000,
            expires_at: 1_700_000_600,
            blocked: false,
            renewable: true,
            origin: "b.example".into(),
        }
    }

    fn token(revoked: bool) -> TokenRecord {
        TokenRecord {
            v: RECORD_VERSION,
            id: "abcd".into(),
            secret_hash: [9; 32],
            spiffe_id: "spiffe://td/ns/*".into(),
            roles: vec![],
            max_ttl: 300,
            expires_at: 0,
            uses_left: u32::MAX,
            created_by: "spiffe://td/lanyard/admin".into(),
            revoked: revoked.then(|| TokenRevocation {
                by: "spiffe://td/lanyard/admin".into(),
                at: 12,
            }),
        }
    }

    fn issued() -> IssuedRecord {
        IssuedRecord {
            v: RECORD_VERSION,
            spiffe_id: "spiffe://td/y".into(),
            serial: "0102".into(),
            roles: vec!["admin".into()],
            not_after: 1_700_000_300,
        }
    }

    /// Both layouts read back as the same record: the binary one now written, and the JSON one
    /// earlier releases wrote (and etcd still writes).
    fn both_layouts<T: Stored + Serialize + PartialEq + std::fmt::Debug>(r: T) {
        let bin = r.to_stored();
        assert_eq!(bin[0], BINARY);
        assert_eq!(T::from_stored(&bin).unwrap(), r);
        let json = serde_json::to_vec(&r).unwrap();
        assert!(bin.len() < json.len(), "{} vs {}", bin.len(), json.len());
        assert_eq!(T::from_stored(&json).unwrap(), r);
        // Every truncation fails cleanly, and so does trailing garbage.
        for n in 0..bin.len() {
            assert!(T::from_stored(&bin[..n]).is_err(), "truncated at {n}");
        }
        let mut long = bin.clone();
        long.push(0);
        assert!(T::from_stored(&long).is_err());
    }

    #[test]
    fn records_round_trip_in_both_layouts() {
        both_layouts(audit(""));
        both_layouts(audit("spiffe://td/claimed"));
        both_layouts(revocation());
        both_layouts(RevocationRecord {
            identity_rule: true,
            serial: String::new(),
            blocked: true,
            origin: String::new(),
            ..revocation()
        });
        both_layouts(token(false));
        both_layouts(token(true));
        both_layouts(issued());
    }

    /// etcd's issued-index entries: the record and its prune time; JSON is told apart (None),
    /// other binary types, truncations and trailing bytes are refused.
    #[test]
    fn issued_entries_with_their_prune_time_round_trip() {
        for prune_at in [0, 1_700_000_000, -5, i64::MAX] {
            let raw = issued_with_prune_to_stored(&issued(), prune_at);
            assert_eq!(
                issued_with_prune_from_stored(&raw),
                Some(Ok((issued(), prune_at)))
            );
            for n in 2..raw.len() {
                assert!(matches!(
                    issued_with_prune_from_stored(&raw[..n]),
                    Some(Err(_))
                ));
            }
            let mut long = raw.clone();
            long.push(0);
            assert!(matches!(issued_with_prune_from_stored(&long), Some(Err(_))));
        }
        assert_eq!(issued_with_prune_from_stored(br#"{"v":1}"#), None);
        assert!(matches!(
            issued_with_prune_from_stored(&issued().to_stored()),
            Some(Err(_))
        ));
    }

    #[test]
    fn compact_revocations_round_trip_and_refuse_anything_else() {
        let c = CompactRevocation {
            rev: 1 << 40,
            expires_at: -3,
            lead: u32::MAX,
            spiffe_id: 70_000,
            reason: 5 | (1 << 31),
            origin: 0,
        };
        let raw = c.to_stored();
        assert!(CompactRevocation::is_stored(&raw));
        assert_eq!(CompactRevocation::from_stored(&raw), Ok(c));
        for n in 0..raw.len() {
            assert!(CompactRevocation::from_stored(&raw[..n]).is_err());
        }
        let mut long = raw.clone();
        long.push(0);
        assert!(CompactRevocation::from_stored(&long).is_err());
        // Neither layout of a whole record passes for a compact one, nor the other way round.
        for other in [
            revocation().to_stored(),
            serde_json::to_vec(&revocation()).unwrap(),
        ] {
            assert!(!CompactRevocation::is_stored(&other));
            assert!(CompactRevocation::from_stored(&other).is_err());
        }
        assert!(RevocationRecord::from_stored(&raw).is_err());
        // What the benchmark's entries take: a sixth of the whole binary record.
        let typical = CompactRevocation {
            rev: 1_000_000,
            expires_at: 1_800_000_000,
            lead: 3600,
            spiffe_id: 10_000,
            reason: 1,
            origin: 2,
        };
        assert_eq!(typical.to_stored().len(), 16);
    }

    #[test]
    fn a_binary_record_is_not_read_as_another_type() {
        let raw = revocation().to_stored();
        assert!(IssuedRecord::from_stored(&raw).is_err());
        assert!(AuditRecord::from_stored(&raw).is_err());
        // A string length past the end, a varint that never ends, a bad flag: errors, no panic.
        for bad in [
            vec![BINARY, 2, 1, 0xff, 0xff, 0xff, 0xff, 0x0f],
            [vec![BINARY, 2], vec![0xff; 20]].concat(),
            vec![BINARY, 3, 1, 1, 0, 0, 7],
            vec![BINARY],
            vec![],
        ] {
            assert!(IssuedRecord::from_stored(&bad).is_err());
            assert!(RevocationRecord::from_stored(&bad).is_err());
        }
    }

    /// Records exactly as the previous release stored them (JSON) still read.
    #[test]
    fn json_of_the_previous_release_reads() {
        let old = br#"{"v":1,"rev":3,"serial":"01ab","spiffe_id":"spiffe://td/x","identity_rule":false,"before":0,"reason":"r","revoked_at":1,"expires_at":2,"blocked":false}"#;
        let r = RevocationRecord::from_stored(old).unwrap();
        assert_eq!((r.rev, r.renewable, r.origin.as_str()), (3, false, ""));
        let old = br#"{"v":1,"spiffe_id":"spiffe://td/y","serial":"0102","roles":["admin"],"not_after":5}"#;
        assert_eq!(IssuedRecord::from_stored(old).unwrap().not_after, 5);
    }
}
