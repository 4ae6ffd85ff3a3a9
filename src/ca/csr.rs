//! CSR checks: a CSR is only a signed public key plus the SPIFFE ID it asks for.
//!
//! Everything else a CSR may ask for (extra SANs, CA=true, key usages) is refused loudly rather
//! than silently dropped, so a misconfigured client learns why instead of getting a surprise cert.

use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509CertificationRequest};

use super::CaError;
use crate::spiffe::{SpiffeId, TrustDomain};

/// Largest CSR accepted, in bytes. A P-256 or Ed25519 CSR is about 300 bytes.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// A CSR that passed every check: its self-signature verifies and it asks for exactly one
/// SPIFFE ID in the CA's trust domain.
#[derive(Debug, Clone)]
pub struct ValidCsr {
    /// The requested SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The subject public key (SPKI), the only other thing copied into the certificate.
    pub public_key: rcgen::SubjectPublicKeyInfo,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_ED25519: &str = "1.3.101.112";

/// Parses and checks a DER PKCS#10 CSR for `td`.
pub fn parse_csr(der: &[u8], td: &TrustDomain) -> Result<ValidCsr, CaError> {
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
    check_key_type(&csr)?;
    csr.verify_signature().map_err(|_| {
        invalid("CSR signature does not verify with the CSR's own public key".into())
    })?;

    let mut uris = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            other => {
                                return Err(invalid(format!(
                                    "CSR asks for a {} SAN; Lanyard certificates carry only the SPIFFE ID as a URI SAN",
                                    san_kind(other)
                                )));
                            }
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(invalid(
                        "CSR asks for CA=true; Lanyard issues only leaf certificates".into(),
                    ));
                }
                ParsedExtension::ParseError { .. } => {
                    return Err(invalid(
                        "CSR carries an extension that does not parse".into(),
                    ));
                }
                _ => {}
            }
        }
    }
    let uri = match uris.as_slice() {
        [one] => one,
        [] => {
            return Err(invalid(
                "CSR has no URI SAN: put the SPIFFE ID (spiffe://trust-domain/path) in a URI SAN"
                    .into(),
            ));
        }
        many => {
            return Err(invalid(format!(
                "CSR has {} URI SANs; exactly one SPIFFE ID is allowed",
                many.len()
            )));
        }
    };
    let spiffe_id = SpiffeId::parse(uri).map_err(|e| invalid(format!("CSR URI SAN: {e}")))?;
    if !spiffe_id.is_in(td) {
        return Err(invalid(format!(
            "CSR asks for {spiffe_id}, which is outside this CA's trust domain {td}"
        )));
    }
    let public_key =
        rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|_| {
                invalid("CSR public key is not a supported SubjectPublicKeyInfo".into())
            })?;
    Ok(ValidCsr {
        spiffe_id,
        public_key,
    })
}

fn check_key_type(csr: &X509CertificationRequest<'_>) -> Result<(), CaError> {
    let spki = &csr.certification_request_info.subject_pki;
    let alg = spki.algorithm.algorithm.to_id_string();
    let ok = match alg.as_str() {
        OID_ED25519 => true,
        OID_EC_PUBLIC_KEY => spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve.to_id_string() == OID_P256),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CaError::InvalidCsr(format!(
            "CSR key type {alg} is not supported: use ECDSA P-256 or Ed25519"
        )))
    }
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
