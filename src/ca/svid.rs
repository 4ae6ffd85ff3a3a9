//! X.509-SVID facts: serial numbers, the roles extension, and reading a certificate back.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::CaError;
use crate::spiffe::{SpiffeId, normalize_roles};

/// A certificate serial number in canonical form (big-endian, no leading zero bytes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

/// The OID of the roles extension, validated so every arc stays below 2^28.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolesOid(Vec<u64>);

/// What Lanyard reads back from an X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    /// The one URI SAN.
    pub spiffe_id: SpiffeId,
    /// Roles from the roles extension, sorted; empty when the extension is absent.
    pub roles: Vec<String>,
    /// The serial number.
    pub serial: Serial,
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Encodes role names as the extension value: DER `SEQUENCE OF UTF8String`, sorted, de-duplicated.
pub fn encode_roles(roles: &[String]) -> Vec<u8> {
    let mut sorted: Vec<&String> = roles.iter().collect();
    sorted.sort();
    sorted.dedup();
    yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            for r in sorted {
                w.next().write_utf8_string(r);
            }
        })
    })
}

/// Decodes the roles extension value (strict DER: definite, minimal lengths, nothing after the
/// sequence); every entry must be a valid role name.
pub(crate) fn decode_roles(value: &[u8]) -> Result<Vec<String>, CaError> {
    let roles = yasna::parse_der(value, |r| r.collect_sequence_of(|r| r.read_utf8string()))
        .map_err(|_| CaError::InvalidCertificate("malformed roles extension".into()))?;
    Ok(normalize_roles(roles)?)
}

/// Parses a DER certificate as a Lanyard SVID: exactly one URI SAN holding a SPIFFE ID, roles from
/// the extension at `oid`. It does not verify the signature or the validity period.
pub fn parse_svid(cert_der: &[u8], oid: &RolesOid) -> Result<SvidInfo, CaError> {
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| CaError::InvalidCertificate(format!("cannot parse DER: {e}")))?;
    let mut uris = Vec::new();
    let mut roles = Vec::new();
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::URI(u) = name {
                        uris.push(*u);
                    }
                }
            }
            _ if oid.matches(&ext.oid.iter().map(|i| i.collect::<Vec<_>>())) => {
                roles = decode_roles(ext.value)?;
            }
            _ => {}
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(CaError::InvalidCertificate(format!(
            "expected exactly one URI SAN, found {}",
            uris.len()
        )));
    };
    let spiffe_id = SpiffeId::parse(uri)?;
    let validity = cert.validity();
    Ok(SvidInfo {
        spiffe_id,
        roles,
        serial: Serial::from_bytes(cert.raw_serial()),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

// === impl Serial ===

impl Serial {
    /// A fresh serial: a 0x01 byte, then 128 random bits, so it is positive, fixed-length and well
    /// under RFC 5280's 20-octet limit.
    pub fn random() -> Self {
        let mut bytes = [0u8; 17];
        bytes[0] = 0x01;
        rand::Rng::fill(&mut rand::rng(), &mut bytes[1..]);
        Self(bytes.to_vec())
    }

    /// Canonicalizes big-endian bytes (leading zero bytes dropped).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let rest = &bytes[skip..];
        Self(if rest.is_empty() {
            vec![0]
        } else {
            rest.to_vec()
        })
    }

    /// Parses hex, with or without colons (as `openssl x509 -serial` prints it).
    pub fn parse_hex(s: &str) -> Option<Self> {
        let clean: String = s.trim().chars().filter(|c| *c != ':').collect();
        let clean = clean.strip_prefix("0x").unwrap_or(&clean);
        if clean.is_empty() || clean.len() > 40 {
            return None;
        }
        let padded = if clean.len() % 2 == 1 {
            format!("0{clean}")
        } else {
            clean.to_string()
        };
        let mut bytes = Vec::with_capacity(padded.len() / 2);
        for i in (0..padded.len()).step_by(2) {
            bytes.push(u8::from_str_radix(padded.get(i..i + 2)?, 16).ok()?);
        }
        Some(Self::from_bytes(&bytes))
    }

    /// The big-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lowercase hex without separators.
    pub fn to_hex(&self) -> String {
        crate::encoding::hex(&self.0)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.to_hex())
    }
}

// === impl RolesOid ===

impl RolesOid {
    /// The default private-arc OID, `1.3.9999.7781.1`.
    pub fn default_oid() -> Self {
        Self(vec![1, 3, 9999, 7781, 1])
    }

    /// Parses dotted decimal; every arc must be below 2^28 so Go's crypto/x509 accepts the cert.
    pub fn parse(s: &str) -> Result<Self, CaError> {
        let bad = || CaError::InvalidOid(s.to_string());
        let arcs = s
            .split('.')
            .map(|a| a.parse::<u64>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        if arcs.len() < 2 || arcs[0] > 2 || (arcs[0] < 2 && arcs[1] >= 40) {
            return Err(bad());
        }
        if arcs.iter().any(|a| *a >= 1 << 28) {
            return Err(bad());
        }
        Ok(Self(arcs))
    }

    /// The arcs.
    pub fn arcs(&self) -> &[u64] {
        &self.0
    }

    fn matches(&self, arcs: &Option<Vec<u64>>) -> bool {
        arcs.as_deref() == Some(self.0.as_slice())
    }
}

impl Default for RolesOid {
    fn default() -> Self {
        Self::default_oid()
    }
}

impl fmt::Display for RolesOid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        let roles = vec![
            "deploy".to_string(),
            "db-read".to_string(),
            "deploy".to_string(),
        ];
        let der = encode_roles(&roles);
        assert_eq!(der[0], 0x30);
        assert_eq!(decode_roles(&der).unwrap(), vec!["db-read", "deploy"]);
    }

    #[test]
    fn long_role_lists_use_long_form_lengths_and_round_trip() {
        let roles: Vec<String> = (0..30).map(|i| format!("role-number-{i:02}")).collect();
        let der = encode_roles(&roles);
        assert_eq!(
            &der[..2],
            &[0x30, 0x82],
            "{} bytes need a two-byte length",
            der.len()
        );
        assert_eq!(decode_roles(&der).unwrap(), roles);
    }

    #[test]
    fn roles_reject_garbage() {
        // Non-minimal length, indefinite length, trailing bytes, another string type.
        assert!(decode_roles(&[0x30, 0x81, 0x03, 0x0c, 0x01, b'a']).is_err());
        assert!(decode_roles(&[0x30, 0x80, 0x0c, 0x01, b'a', 0x00, 0x00]).is_err());
        assert!(decode_roles(&[0x30, 0x03, 0x0c, 0x01, b'a', 0x00]).is_err());
        assert!(decode_roles(&[0x30, 0x03, 0x13, 0x01, b'a']).is_err());
        assert!(decode_roles(&[0x30, 0x03, 0x0c, 0x01]).is_err());
        assert!(decode_roles(&[0x30, 0x03, 0x04, 0x01, b'a']).is_err());
        assert!(decode_roles(&[0x30, 0x03, 0x0c, 0x01, b'A']).is_err());
    }

    #[test]
    fn oid_arcs_must_fit_go() {
        assert_eq!(
            RolesOid::parse("1.3.9999.7781.1").unwrap(),
            RolesOid::default()
        );
        assert!(RolesOid::parse("2.25.329800735698586629295641978511506172918").is_err());
        assert!(RolesOid::parse(&format!("1.3.{}", 1u64 << 28)).is_err());
        assert!(RolesOid::parse("1").is_err());
        assert!(RolesOid::parse("1.x.3").is_err());
    }

    #[test]
    fn serials_are_positive_128_bit_and_parse_back() {
        let s = Serial::random();
        assert_eq!(s.as_bytes().len(), 17);
        assert_eq!(s.as_bytes()[0], 1);
        assert_ne!(s, Serial::random());
        let colons: Vec<String> = s.as_bytes().iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Serial::parse_hex(&colons.join(":")).unwrap(), s);
        assert_eq!(Serial::parse_hex(&s.to_hex()).unwrap(), s);
        assert!(Serial::parse_hex("zz").is_none());
        assert!(Serial::parse_hex("").is_none());
    }
}
