//! CSR checks: a CSR is only a signed public key plus the SPIFFE ID it asks for.
//!
//! A CSR that asks for more than a leaf certificate may hold is refused loudly rather than
//! silently trimmed, so a misconfigured (or hostile) client learns why instead of getting a
//! surprise certificate: SANs other than the one SPIFFE ID and valid DNS and IP names (those
//! are canonicalised here, see [`super::names`], and policy decides whether they are allowed), CA=true, the CA key usages keyCertSign and cRLSign, EKUs
//! other than serverAuth and clientAuth, the CA-only constraints (name constraints, policy
//! constraints and mappings, inhibitAnyPolicy), and any critical extension Lanyard does not act
//! on. What is *ignored* (the certificate's own values are used instead) is harmless and listed
//! in docs/security.md: the subject DN, the leaf key usages (digitalSignature, keyEncipherment,
//! keyAgreement...), serverAuth/clientAuth EKUs, CA:FALSE, and non-critical informational
//! extensions such as subjectKeyIdentifier.

use x509_parser::der_parser::oid::Oid;
use x509_parser::prelude::{
    FromDer, GeneralName, ParsedCriAttribute, ParsedExtension, X509CertificationRequest,
    X509Extension,
};

use super::CaError;
use super::names::{MAX_NAMES, SanNames, ip_from_bytes, normalize_dns};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Largest CSR accepted, in bytes. A P-256 or Ed25519 CSR is about 300 bytes.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// A CSR that passed every check: its self-signature verifies and it asks for exactly one
/// SPIFFE ID in the CA's trust domain.
#[derive(Debug, Clone)]
pub struct ValidCsr {
    /// The requested SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The subject public key, copied into the certificate.
    pub public_key: CsrKey,
    /// DNS and IP names asked for, canonical; copied only once policy allows each.
    pub names: SanNames,
}

/// A CSR's public key: its algorithm (P-256 or Ed25519, the two [`check_key_type`] accepts)
/// and the key bytes. Read straight from the parsed CSR: rcgen's `SubjectPublicKeyInfo::from_der`
/// parsed the SPKI a second time and encoded every algorithm rcgen knows to find the match
/// (~13k instructions per issuance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrKey {
    alg: &'static rcgen::SignatureAlgorithm,
    key: Vec<u8>,
}

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// id-ecPublicKey (1.2.840.10045.2.1), content octets.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1 (1.2.840.10045.3.1.7), content octets.
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// id-Ed25519 (1.3.101.112), content octets.
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// Parses and checks a DER PKCS#10 CSR for `td`.
pub fn parse_csr(der: &[u8], td: &TrustDomain) -> Result<ValidCsr, CaError> {
    parse_csr_checked(der, td, None)
}

/// Parses and checks a CSR whose identity the CA assigns (attestation): it may carry no URI SAN
/// (the ID is `assigned`) or exactly `assigned`; any other ID is refused with
/// [`CaError::IdMismatch`] naming the assigned one.
pub fn parse_csr_assigned(
    der: &[u8],
    td: &TrustDomain,
    assigned: &SpiffeId,
) -> Result<ValidCsr, CaError> {
    parse_csr_checked(der, td, Some(assigned))
}

fn parse_csr_checked(
    der: &[u8],
    td: &TrustDomain,
    assigned: Option<&SpiffeId>,
) -> Result<ValidCsr, CaError> {
    let invalid = |m: String| CaError::InvalidCsr(m);
    if der.is_empty() {
        return Err(invalid(
            "CSR is empty: send a DER-encoded PKCS#10 request".into(),
        ));
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(invalid(format!(
            "CSR is {} bytes; the limit is {MAX_CSR_BYTES}",
            der.len()
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|_| invalid("CSR is not a DER-encoded PKCS#10 request".into()))?;
    if !rest.is_empty() {
        return Err(invalid(
            "CSR has trailing bytes after the PKCS#10 structure".into(),
        ));
    }
    let alg = check_key_type(&csr)?;
    csr.verify_signature().map_err(|_| {
        invalid("CSR signature does not verify with the CSR's own public key".into())
    })?;

    let mut uris = Vec::new();
    let mut names = SanNames::default();
    for ext in requested_extensions(&csr) {
        check_extension(ext, &mut uris, &mut names)?;
    }
    names.canonicalize();
    if names.len() > MAX_NAMES {
        return Err(invalid(format!(
            "CSR asks for {} DNS and IP names; the limit is {MAX_NAMES}",
            names.len()
        )));
    }
    let uri = match (uris.as_slice(), assigned) {
        ([], Some(id)) => id.as_str(),
        ([one], _) => one,
        ([], None) => {
            return Err(invalid(
                "CSR has no URI SAN: put the SPIFFE ID (spiffe://trust-domain/path) in a URI SAN"
                    .into(),
            ));
        }
        (many, _) => {
            return Err(invalid(format!(
                "CSR has {} URI SANs; exactly one SPIFFE ID is allowed",
                many.len()
            )));
        }
    };
    let spiffe_id = SpiffeId::parse(uri).map_err(|e| invalid(format!("CSR URI SAN: {e}")))?;
    if let Some(id) = assigned
        && spiffe_id != *id
    {
        return Err(CaError::IdMismatch(format!(
            "the CSR asks for {spiffe_id}, but the token's claims make {id}: leave the URI SAN out or ask for exactly {id}"
        )));
    }
    if !spiffe_id.is_in(td) {
        return Err(invalid(format!(
            "CSR asks for {spiffe_id}, which is outside this CA's trust domain {td}"
        )));
    }
    let public_key = CsrKey {
        alg,
        key: csr
            .certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .to_vec(),
    };
    Ok(ValidCsr {
        spiffe_id,
        public_key,
        names,
    })
}

/// The extensions a CSR requests (its PKCS#9 extensionRequest attribute), with criticality.
fn requested_extensions<'a>(
    csr: &'a X509CertificationRequest<'_>,
) -> impl Iterator<Item = &'a X509Extension<'a>> {
    csr.certification_request_info
        .iter_attributes()
        .filter_map(|attr| match attr.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(r) => Some(r.extensions.iter()),
            _ => None,
        })
        .flatten()
}

/// Refuses an extension that asks for a privilege or that Lanyard cannot honour; collects URI
/// SANs into `uris` and DNS and IP SANs into `names`.
fn check_extension(
    ext: &X509Extension<'_>,
    uris: &mut Vec<String>,
    names: &mut SanNames,
) -> Result<(), CaError> {
    let refuse = |what: String| Err(CaError::InvalidCsr(what));
    match ext.parsed_extension() {
        ParsedExtension::SubjectAlternativeName(san) => {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => names.dns.push(
                        normalize_dns(d, false)
                            .map_err(|e| CaError::InvalidCsr(format!("CSR: {e}")))?,
                    ),
                    GeneralName::IPAddress(b) => names.ips.push(
                        ip_from_bytes(b).map_err(|e| CaError::InvalidCsr(format!("CSR: {e}")))?,
                    ),
                    other => {
                        return refuse(format!(
                            "CSR asks for a {} SAN; Lanyard certificates carry the SPIFFE ID as a URI SAN and, where policy allows, DNS and IP names",
                            san_kind(other)
                        ));
                    }
                }
            }
        }
        ParsedExtension::BasicConstraints(bc) if bc.ca => {
            return refuse("CSR asks for CA=true; Lanyard issues only leaf certificates".into());
        }
        ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
            return refuse(format!(
                "CSR asks for keyUsage {}, which only a CA may hold; Lanyard issues only leaf certificates",
                [
                    ("keyCertSign", ku.key_cert_sign()),
                    ("cRLSign", ku.crl_sign())
                ]
                .iter()
                .filter(|(_, on)| *on)
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(" and ")
            ));
        }
        ParsedExtension::ExtendedKeyUsage(eku) => {
            let mut other: Vec<String> = [
                ("anyExtendedKeyUsage", eku.any),
                ("codeSigning", eku.code_signing),
                ("emailProtection", eku.email_protection),
                ("timeStamping", eku.time_stamping),
                ("OCSPSigning", eku.ocsp_signing),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| (*n).to_string())
            .collect();
            other.extend(eku.other.iter().map(Oid::to_id_string));
            if !other.is_empty() {
                return refuse(format!(
                    "CSR asks for extendedKeyUsage {}; Lanyard certificates are for TLS only (serverAuth, clientAuth)",
                    other.join(", ")
                ));
            }
        }
        ParsedExtension::NameConstraints(_) => {
            return refuse(
                "CSR asks for nameConstraints, which only a CA certificate may carry".into(),
            );
        }
        ParsedExtension::PolicyConstraints(_)
        | ParsedExtension::PolicyMappings(_)
        | ParsedExtension::InhibitAnyPolicy(_) => {
            return refuse(format!(
                "CSR asks for extension {} (a CA policy constraint), which only a CA certificate may carry",
                ext.oid.to_id_string()
            ));
        }
        ParsedExtension::ParseError { .. } => {
            return refuse(format!(
                "CSR carries extension {} that does not parse",
                ext.oid.to_id_string()
            ));
        }
        _ if ext.critical && !HONOURED.contains(&ext.oid.to_id_string().as_str()) => {
            return refuse(format!(
                "CSR carries critical extension {}, which Lanyard does not support; drop it or mark it non-critical",
                ext.oid.to_id_string()
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Extensions a CSR may mark critical: subjectAlternativeName, basicConstraints, keyUsage,
/// extendedKeyUsage (each is checked above; the certificate carries Lanyard's own values).
const HONOURED: &[&str] = &["2.5.29.17", "2.5.29.19", "2.5.29.15", "2.5.29.37"];

/// The rcgen algorithm of the CSR's key, if Lanyard issues for it: P-256 (uncompressed) or
/// Ed25519. OIDs are compared as encoded bytes; the dotted form is made only for an error.
fn check_key_type(
    csr: &X509CertificationRequest<'_>,
) -> Result<&'static rcgen::SignatureAlgorithm, CaError> {
    let spki = &csr.certification_request_info.subject_pki;
    let oid = spki.algorithm.algorithm.as_bytes();
    let params = spki.algorithm.parameters.as_ref();
    let alg = if oid == OID_ED25519 {
        // RFC 8410: the parameters are absent.
        if params.is_some() {
            return Err(CaError::InvalidCsr(
                "CSR public key is not a supported SubjectPublicKeyInfo".into(),
            ));
        }
        Some(&rcgen::PKCS_ED25519)
    } else if oid == OID_EC_PUBLIC_KEY
        && params
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve.as_bytes() == OID_P256)
    {
        Some(&rcgen::PKCS_ECDSA_P256_SHA256)
    } else {
        None
    };
    let Some(alg) = alg else {
        return Err(CaError::InvalidCsr(format!(
            "CSR key type {} is not supported: use ECDSA P-256 or Ed25519",
            spki.algorithm.algorithm.to_id_string()
        )));
    };
    // ring (and so rustls and webpki) verifies only uncompressed P-256 points: a certificate
    // with a compressed key would be unusable, so say so instead of "signature does not verify".
    if oid == OID_EC_PUBLIC_KEY {
        match spki.subject_public_key.data.first() {
            Some(0x04) => {}
            Some(0x02 | 0x03) => {
                return Err(CaError::InvalidCsr(
                    "CSR's P-256 public key is a compressed point, which Lanyard does not support: send the uncompressed form (0x04 || X || Y)".into(),
                ));
            }
            _ => {
                return Err(CaError::InvalidCsr(
                    "CSR's P-256 public key is not a valid EC point".into(),
                ));
            }
        }
    }
    Ok(alg)
}

fn san_kind(name: &GeneralName<'_>) -> &'static str {
    match name {
        GeneralName::DNSName(_) => "DNS",
        GeneralName::IPAddress(_) => "IP address",
        GeneralName::RFC822Name(_) => "email",
        GeneralName::DirectoryName(_) => "directory name",
        GeneralName::OtherName(..) => "otherName",
        _ => "non-URI",
    }
}
