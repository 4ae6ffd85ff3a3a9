//! Join tokens: `lanyard1.<id>.<secret>.<ca-fingerprint>.<spiffe-id>`.
//!
//! The id is public (it appears in the audit log); the secret is 256 random bits, stored only as
//! its SHA-256 and compared in constant time; the fingerprint pins the CA so a new machine that
//! holds nothing but the token can authenticate the server on its first call; the SPIFFE ID (or
//! `/prefix/*` pattern, base64url) tells the holder which identity to ask for. The server trusts
//! only its stored record, never the embedded ID.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "lanyard1";

/// A parsed join token. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct JoinToken {
    /// Public id, 16 hex chars.
    pub id: String,
    secret: [u8; 32],
    /// SHA-256 of the CA certificate the holder should trust.
    pub ca_fingerprint: [u8; 32],
    /// The SPIFFE ID or pattern the token is bound to (a hint for the holder).
    pub spiffe_id: String,
}

/// Why a token string was rejected before any lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("join token is malformed: expected lanyard1.<id>.<secret>.<ca-fingerprint>.<spiffe-id>")]
pub struct MalformedToken;

impl JoinToken {
    /// Mints a fresh token for the CA with `ca_fingerprint`.
    pub fn generate(ca_fingerprint: [u8; 32], spiffe_id: &str) -> Self {
        let id: [u8; 8] = rand::random();
        Self {
            id: crate::encoding::hex(&id),
            secret: rand::random(),
            ca_fingerprint,
            spiffe_id: spiffe_id.to_string(),
        }
    }

    /// Parses the string form.
    pub fn parse(s: &str) -> Result<Self, MalformedToken> {
        let mut parts = s.trim().split('.');
        let (Some(PREFIX), Some(id), Some(secret), Some(fp), Some(sid), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(MalformedToken);
        };
        if id.len() != 16
            || !id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(MalformedToken);
        }
        let decode32 = |s: &str| -> Result<[u8; 32], MalformedToken> {
            URL_SAFE_NO_PAD
                .decode(s)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(MalformedToken)
        };
        let spiffe_id = URL_SAFE_NO_PAD
            .decode(sid)
            .ok()
            .and_then(|v| String::from_utf8(v).ok())
            .filter(|s| s.len() <= 2048)
            .ok_or(MalformedToken)?;
        Ok(Self {
            id: id.to_string(),
            secret: decode32(secret)?,
            ca_fingerprint: decode32(fp)?,
            spiffe_id,
        })
    }

    /// SHA-256 of the secret: what the store keeps.
    pub fn secret_hash(&self) -> [u8; 32] {
        Sha256::digest(self.secret).into()
    }

    /// Whether this token's secret matches `stored_hash`, in constant time.
    pub fn matches(&self, stored_hash: &[u8; 32]) -> bool {
        self.secret_hash().ct_eq(stored_hash).into()
    }

    /// The string to hand to the new machine.
    pub fn to_token_string(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}.{}",
            self.id,
            URL_SAFE_NO_PAD.encode(self.secret),
            URL_SAFE_NO_PAD.encode(self.ca_fingerprint),
            URL_SAFE_NO_PAD.encode(self.spiffe_id.as_bytes())
        )
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("spiffe_id", &self.spiffe_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_matches_only_its_own_hash() {
        let t = JoinToken::generate([9; 32], "spiffe://example.org/a");
        let s = t.to_token_string();
        let back = JoinToken::parse(&s).unwrap();
        assert_eq!(back.id, t.id);
        assert_eq!(back.ca_fingerprint, [9; 32]);
        assert_eq!(back.spiffe_id, "spiffe://example.org/a");
        assert!(back.matches(&t.secret_hash()));
        assert!(!JoinToken::generate([9; 32], "spiffe://example.org/a").matches(&t.secret_hash()));
        assert!(!format!("{t:?}").contains(&s.split('.').nth(2).unwrap().to_string()));
    }

    #[test]
    fn rejects_malformed() {
        let good = JoinToken::generate([1; 32], "spiffe://example.org/a").to_token_string();
        let parts: Vec<&str> = good.split('.').collect();
        let short_secret = format!(
            "{}.{}.{}.{}.{}",
            parts[0],
            parts[1],
            &parts[2][2..],
            parts[3],
            parts[4]
        );
        let short_fp = format!(
            "{}.{}.{}.{}.{}",
            parts[0],
            parts[1],
            parts[2],
            &parts[3][1..],
            parts[4]
        );
        let bad_id = format!("{}.{}.{}.{}.%%%", parts[0], parts[1], parts[2], parts[3]);
        for bad in [
            "",
            "lanyard1",
            "lanyard2.0011223344556677.x.y.z",
            &good.replace("lanyard1.", "lanyard1.zz"),
            &format!("{good}.extra"),
            &short_secret,
            &short_fp,
            &bad_id,
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?}");
        }
    }
}
