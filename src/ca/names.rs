//! DNS and IP subject alternative names: what a leaf may carry besides its SPIFFE ID, in one
//! canonical form so policy compares like with like.
//!
//! A DNS name is kept lowercase, without a trailing dot, as IDNA A-labels only (a Unicode name is
//! refused: send its `xn--` form), each label 1–63 letters, digits or hyphens (no `_`, no
//! leading or trailing hyphen), 253 characters at most, and never an IP literal (that belongs in
//! an IP SAN). Wildcard names (`*.example`) are never issued: policy's `*.suffix` allows names
//! *under* a suffix, not a certificate for all of them (see docs/security.md).

use std::fmt;
use std::net::IpAddr;

/// Longest DNS name, in characters (RFC 1035, without the trailing dot).
pub(super) const MAX_DNS_NAME: usize = 253;

/// Longest DNS label (RFC 1035).
pub(super) const MAX_DNS_LABEL: usize = 63;

/// Most DNS plus IP names one certificate may carry: a workload that needs more is better
/// served by a wildcard-free redesign than by a 100-name certificate renewed every minutes.
pub const MAX_NAMES: usize = 32;

/// DNS and IP names of a certificate, each sorted and de-duplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SanNames {
    /// DNS names, canonical (see [`normalize_dns`]).
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
}

/// A name that cannot go into a certificate, with why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} name {name:?} is not valid: {why}")]
pub struct NameError {
    /// `DNS` or `IP`.
    pub kind: &'static str,
    /// The name as given.
    pub name: String,
    /// What is wrong, in terms the sender can act on.
    pub why: String,
}

/// Canonicalises one DNS name (see the module docs). `wildcard` allows a leading `*` label, for
/// policy patterns only.
pub fn normalize_dns(name: &str, wildcard: bool) -> Result<String, NameError> {
    let err = |why: &str| NameError {
        kind: "DNS",
        name: name.to_string(),
        why: why.to_string(),
    };
    if !name.is_ascii() {
        return Err(err(
            "non-ASCII characters: send the IDNA A-label form (xn--...)",
        ));
    }
    let lower = name.to_ascii_lowercase();
    let trimmed = lower.strip_suffix('.').unwrap_or(&lower);
    if trimmed.is_empty() {
        return Err(err("empty name"));
    }
    if trimmed.len() > MAX_DNS_NAME {
        return Err(err(&format!("longer than {MAX_DNS_NAME} characters")));
    }
    if trimmed.parse::<IpAddr>().is_ok() {
        return Err(err("an IP address goes in an IP SAN, not a DNS SAN"));
    }
    for (i, label) in trimmed.split('.').enumerate() {
        if label == "*" && i == 0 && wildcard {
            continue;
        }
        if label.is_empty() {
            return Err(err("empty label (two dots in a row, or a leading dot)"));
        }
        if label.contains('*') {
            return Err(err(if wildcard {
                "a wildcard must be the whole leftmost label, as in *.example.com"
            } else {
                "wildcard names are not issued; ask for each name"
            }));
        }
        if label.len() > MAX_DNS_LABEL {
            return Err(err(&format!(
                "label {label:?} is longer than {MAX_DNS_LABEL} characters"
            )));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(err(&format!(
                "label {label:?} may hold only letters, digits and '-'"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(err(&format!("label {label:?} starts or ends with '-'")));
        }
    }
    if wildcard && trimmed == "*" {
        return Err(err("a wildcard needs a suffix, as in *.example.com"));
    }
    Ok(trimmed.to_string())
}

/// Reads an IP SAN's bytes: 4 (IPv4) or 16 (IPv6); anything else (such as the 8- or 32-byte
/// address-and-mask of name constraints) is refused.
pub fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, NameError> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default())),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(bytes).unwrap_or_default(),
        )),
        n => Err(NameError {
            kind: "IP",
            name: crate::encoding::hex(bytes),
            why: format!("an IP SAN holds 4 or 16 bytes, this one {n}"),
        }),
    }
}

/// Parses an IP literal as written in a flag or config (`10.0.0.1`, `::1`).
pub fn parse_ip(s: &str) -> Result<IpAddr, NameError> {
    s.trim().parse().map_err(|_| NameError {
        kind: "IP",
        name: s.to_string(),
        why: "not an IPv4 or IPv6 address".into(),
    })
}

/// The DNS and IP names of a DER certificate (its URI SAN is read by [`super::parse_svid`]).
pub fn san_names(cert_der: &[u8]) -> Result<SanNames, super::CaError> {
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| super::CaError::InvalidCertificate(format!("cannot parse DER: {e}")))?;
    let mut out = SanNames::default();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                let bad = |e: NameError| super::CaError::InvalidCertificate(e.to_string());
                match name {
                    GeneralName::DNSName(d) => out.dns.push(normalize_dns(d, false).map_err(bad)?),
                    GeneralName::IPAddress(b) => out.ips.push(ip_from_bytes(b).map_err(bad)?),
                    _ => {}
                }
            }
        }
    }
    out.canonicalize();
    Ok(out)
}

// === impl SanNames ===

impl SanNames {
    /// Builds the set from strings: each is an IP literal or a DNS name (canonicalised).
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, NameError> {
        let mut out = Self::default();
        for n in names {
            let n = n.as_ref().trim();
            match n.parse::<IpAddr>() {
                Ok(ip) => out.ips.push(ip),
                Err(_) => out.dns.push(normalize_dns(n, false)?),
            }
        }
        out.canonicalize();
        Ok(out)
    }

    /// Sorts and de-duplicates both lists.
    pub fn canonicalize(&mut self) {
        self.dns.sort();
        self.dns.dedup();
        self.ips.sort();
        self.ips.dedup();
    }

    /// Whether there are no names.
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.ips.is_empty()
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.dns.len() + self.ips.len()
    }
}

impl fmt::Display for SanNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self
            .dns
            .iter()
            .cloned()
            .chain(self.ips.iter().map(IpAddr::to_string))
            .collect();
        f.write_str(&all.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_are_canonicalised() {
        assert_eq!(
            normalize_dns("API.Example.COM.", false).unwrap(),
            "api.example.com"
        );
        assert_eq!(normalize_dns("localhost", false).unwrap(), "localhost");
        assert_eq!(
            normalize_dns("xn--bcher-kva.example", false).unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            normalize_dns("*.svc.example", true).unwrap(),
            "*.svc.example"
        );
    }

    #[test]
    fn bad_dns_names_are_refused() {
        let long_label = format!("{}.example", "a".repeat(64));
        let long_name = vec!["a".repeat(60); 5].join(".");
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "bücher.example",
            "under_score.example",
            "-a.example",
            "a-.example",
            "*.example",
            "a.*.example",
            "10.0.0.1",
            "a b",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(normalize_dns(bad, false).is_err(), "{bad:?}");
        }
        assert!(normalize_dns("*", true).is_err());
        assert!(normalize_dns("a*.example", true).is_err());
        assert!(normalize_dns("*.*.example", true).is_err());
    }

    #[test]
    fn ip_sans_are_4_or_16_bytes() {
        assert_eq!(
            ip_from_bytes(&[127, 0, 0, 1]).unwrap().to_string(),
            "127.0.0.1"
        );
        assert_eq!(ip_from_bytes(&[0; 16]).unwrap().to_string(), "::");
        assert!(ip_from_bytes(&[10, 0, 0, 0, 255, 0, 0, 0]).is_err());
        assert!(ip_from_bytes(&[]).is_err());
    }

    #[test]
    fn mixed_lists_split_and_dedupe() {
        let n = SanNames::parse(&["B.example", "127.0.0.1", "b.example.", "::1"]).unwrap();
        assert_eq!(n.dns, vec!["b.example"]);
        assert_eq!(n.ips.len(), 2);
        assert_eq!(n.to_string(), "b.example,127.0.0.1,::1");
    }
}
