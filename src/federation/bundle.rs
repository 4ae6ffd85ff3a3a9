//! The SPIFFE trust bundle format: a JWKS document whose `x509-svid` keys carry one CA
//! certificate each (`x5c`), plus `spiffe_sequence` and `spiffe_refresh_hint`
//! (SPIFFE Trust Domain and Bundle specification, section 4).
//!
//! Decoding is strict about what it uses and lenient about what it does not: every `x509-svid`
//! key must hold exactly one certificate that parses, is a CA and matches the key's public
//! parameters; keys for other uses (`jwt-svid`, or a use we do not know) are skipped, as the
//! specification asks. A bundle without a single X.509 authority is refused: for federation it
//! would mean "trust nothing from that domain", which is never what a bundle endpoint means to say.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::spiffe::TrustDomain;
use crate::tls::Bundle;

/// Largest bundle document accepted (a bundle of 64 RSA-4096 roots is ~150 KiB).
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
/// Most X.509 authorities accepted in one bundle.
pub const MAX_AUTHORITIES: usize = 64;

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_ED25519: &str = "1.3.101.112";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";

/// Why a bundle document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The document is larger than [`MAX_BUNDLE_BYTES`].
    #[error("bundle document is {0} bytes; the limit is {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    /// The document is not a JWKS (bad JSON, `keys` missing or not an array, bad field types).
    #[error("not a SPIFFE bundle (JWKS): {0}")]
    Json(String),
    /// One `x509-svid` key is unusable; `index` is its position in `keys`.
    #[error("key {index} of the bundle: {reason}")]
    Key {
        /// Position in `keys`.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The bundle holds no X.509 authority at all.
    #[error("bundle has no x509-svid authority")]
    NoAuthorities,
    /// More than [`MAX_AUTHORITIES`] authorities.
    #[error("bundle has {0} x509-svid authorities; the limit is {MAX_AUTHORITIES}")]
    TooManyAuthorities(usize),
    /// A PEM bundle does not parse, or a certificate in it is not a CA.
    #[error("PEM bundle: {0}")]
    Pem(String),
    /// A certificate of ours cannot be expressed as a JWK (unsupported key type).
    #[error("cannot encode CA certificate as a JWK: {0}")]
    Encode(String),
}

/// A trust domain's X.509 trust bundle, with the SPIFFE bundle metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeBundle {
    trust_domain: TrustDomain,
    authorities: Vec<CertificateDer<'static>>,
    sequence: Option<u64>,
    refresh_hint: Option<Duration>,
}

/// The JWKS document as it travels.
#[derive(Debug, Serialize, Deserialize)]
struct Jwks {
    keys: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
}

/// The public parameters of a JWK, as they appear in the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
enum JwkParams {
    Ec {
        kty: &'static str,
        crv: &'static str,
        x: String,
        y: String,
    },
    Rsa {
        kty: &'static str,
        n: String,
        e: String,
    },
    Okp {
        kty: &'static str,
        crv: &'static str,
        x: String,
    },
}

// === impl SpiffeBundle ===

impl SpiffeBundle {
    /// A bundle of `authorities` (CA certificates, DER) for `trust_domain`. Every certificate
    /// must parse, be a CA and have a key a JWK can carry (so the bundle can always be encoded).
    pub fn new(
        trust_domain: TrustDomain,
        authorities: Vec<CertificateDer<'static>>,
        sequence: Option<u64>,
        refresh_hint: Option<Duration>,
    ) -> Result<Self, BundleError> {
        if authorities.is_empty() {
            return Err(BundleError::NoAuthorities);
        }
        if authorities.len() > MAX_AUTHORITIES {
            return Err(BundleError::TooManyAuthorities(authorities.len()));
        }
        for (i, c) in authorities.iter().enumerate() {
            check_ca(c).map_err(|reason| BundleError::Key { index: i, reason })?;
            jwk_params(c).map_err(|e| BundleError::Key {
                index: i,
                reason: e.to_string(),
            })?;
        }
        Ok(Self {
            trust_domain,
            authorities,
            sequence,
            refresh_hint,
        })
    }

    /// Decodes a SPIFFE bundle document (JWKS) for `trust_domain`.
    pub fn decode(trust_domain: TrustDomain, doc: &[u8]) -> Result<Self, BundleError> {
        if doc.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(doc.len()));
        }
        let jwks: Jwks =
            serde_json::from_slice(doc).map_err(|e| BundleError::Json(e.to_string()))?;
        let mut authorities = Vec::new();
        for (index, key) in jwks.keys.iter().enumerate() {
            let key_err = |reason: String| BundleError::Key { index, reason };
            let obj = key
                .as_object()
                .ok_or_else(|| key_err("not a JSON object".into()))?;
            match obj.get("use").and_then(serde_json::Value::as_str) {
                Some("x509-svid") => {}
                // jwt-svid keys, and uses this version does not know, are not ours to judge.
                _ => continue,
            }
            if authorities.len() == MAX_AUTHORITIES {
                return Err(BundleError::TooManyAuthorities(MAX_AUTHORITIES + 1));
            }
            authorities.push(decode_x509_key(obj).map_err(key_err)?);
        }
        if authorities.is_empty() {
            return Err(BundleError::NoAuthorities);
        }
        Ok(Self {
            trust_domain,
            authorities,
            sequence: jwks.spiffe_sequence,
            refresh_hint: jwks.spiffe_refresh_hint.map(Duration::from_secs),
        })
    }

    /// Reads a PEM file of CA certificates as a bundle (no sequence, no refresh hint).
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        if pem.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(pem.len()));
        }
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        if certs.is_empty() {
            return Err(BundleError::Pem("no certificates found".into()));
        }
        Self::new(trust_domain, certs, None, None)
    }

    /// Decodes either format: a document starting with `{` is a JWKS, anything else PEM.
    pub fn decode_any(trust_domain: TrustDomain, data: &[u8]) -> Result<Self, BundleError> {
        if data.trim_ascii_start().starts_with(b"{") {
            Self::decode(trust_domain, data)
        } else {
            Self::from_pem(trust_domain, data)
        }
    }

    /// Encodes the bundle as a SPIFFE bundle document (pretty-printed JSON, stable key order).
    pub fn encode(&self) -> Result<String, BundleError> {
        let keys = self
            .authorities
            .iter()
            .map(|c| {
                let params = jwk_params(c)?;
                let mut v =
                    serde_json::to_value(params).map_err(|e| BundleError::Encode(e.to_string()))?;
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("use".into(), "x509-svid".into());
                    obj.insert(
                        "x5c".into(),
                        serde_json::Value::Array(vec![STANDARD.encode(c.as_ref()).into()]),
                    );
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>, BundleError>>()?;
        let doc = Jwks {
            keys,
            spiffe_refresh_hint: self.refresh_hint.map(|d| d.as_secs()),
            spiffe_sequence: self.sequence,
        };
        serde_json::to_string_pretty(&doc).map_err(|e| BundleError::Encode(e.to_string()))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The X.509 authorities (CA certificates, DER).
    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    /// `spiffe_sequence`, when the document had one.
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    /// `spiffe_refresh_hint`, when the document had one.
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// The same authorities with another sequence number.
    pub fn with_sequence(mut self, sequence: Option<u64>) -> Self {
        self.sequence = sequence;
        self
    }

    /// The same authorities with another refresh hint.
    pub fn with_refresh_hint(mut self, hint: Option<Duration>) -> Self {
        self.refresh_hint = hint;
        self
    }

    /// Whether `other` names the same set of authorities (order and metadata aside).
    pub fn same_authorities(&self, other: &SpiffeBundle) -> bool {
        let mut a: Vec<&[u8]> = self.authorities.iter().map(|c| c.as_ref()).collect();
        let mut b: Vec<&[u8]> = other.authorities.iter().map(|c| c.as_ref()).collect();
        a.sort_unstable();
        b.sort_unstable();
        a == b
    }

    /// The authorities as webpki trust anchors.
    pub fn to_tls_bundle(&self) -> Result<Bundle, crate::tls::TlsError> {
        Bundle::new(self.authorities.clone())
    }

    /// The authorities as concatenated DER (the Workload API's bundle encoding).
    pub fn concatenated_der(&self) -> Vec<u8> {
        self.authorities
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect()
    }

    /// The authorities as PEM.
    pub fn to_pem(&self) -> String {
        crate::ca::certs_to_pem(&self.authorities)
    }
}

fn decode_x509_key(
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<CertificateDer<'static>, String> {
    let x5c = obj
        .get("x5c")
        .ok_or("x509-svid key without x5c")?
        .as_array()
        .ok_or("x5c is not an array")?;
    let [cert_b64] = x5c.as_slice() else {
        return Err(format!(
            "x5c must hold exactly one certificate, it holds {}",
            x5c.len()
        ));
    };
    let cert_b64 = cert_b64.as_str().ok_or("x5c entry is not a string")?;
    let der = STANDARD
        .decode(cert_b64)
        .map_err(|e| format!("x5c entry is not base64: {e}"))?;
    let cert = CertificateDer::from(der);
    check_ca(&cert)?;
    // The key's public parameters must be the certificate's: a consumer that reads only the JWK
    // and one that reads only x5c must trust the same key.
    let want = jwk_params(&cert).map_err(|e| e.to_string())?;
    let field = |name: &str| obj.get(name).and_then(serde_json::Value::as_str);
    let kty = field("kty").ok_or("kty missing")?;
    let matches = match &want {
        JwkParams::Ec { kty: k, crv, x, y } => {
            kty == *k
                && field("crv") == Some(crv)
                && field("x") == Some(x.as_str())
                && field("y") == Some(y.as_str())
        }
        JwkParams::Rsa { kty: k, n, e } => {
            kty == *k && field("n") == Some(n.as_str()) && field("e") == Some(e.as_str())
        }
        JwkParams::Okp { kty: k, crv, x } => {
            kty == *k && field("crv") == Some(crv) && field("x") == Some(x.as_str())
        }
    };
    if !matches {
        return Err(format!(
            "the key's public parameters (kty {kty}) do not match the certificate in x5c"
        ));
    }
    Ok(cert)
}

/// Checks that `cert` parses, is a CA and can serve as a webpki trust anchor.
fn check_ca(cert: &CertificateDer<'_>) -> Result<(), String> {
    let (rest, parsed) =
        X509Certificate::from_der(cert).map_err(|e| format!("certificate does not parse: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing data after the certificate".into());
    }
    if !parsed.is_ca() {
        return Err(format!(
            "certificate {} is not a CA (basicConstraints CA=false)",
            parsed.subject()
        ));
    }
    webpki::anchor_from_trusted_cert(cert)
        .map_err(|e| format!("certificate cannot be a trust anchor: {e:?}"))?;
    Ok(())
}

/// The JWK public parameters of a certificate's key.
fn jwk_params(cert: &CertificateDer<'_>) -> Result<JwkParams, BundleError> {
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| BundleError::Encode(e.to_string()))?;
    let spki = parsed.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    if alg == OID_ED25519 {
        return Ok(JwkParams::Okp {
            kty: "OKP",
            crv: "Ed25519",
            x: b64(&spki.subject_public_key.data),
        });
    }
    match spki
        .parsed()
        .map_err(|e| BundleError::Encode(e.to_string()))?
    {
        PublicKey::EC(point) if alg == OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| x509_parser::der_parser::oid::Oid::try_from(p.clone()).ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let (crv, len) = match curve.as_str() {
                OID_P256 => ("P-256", 32),
                OID_P384 => ("P-384", 48),
                OID_P521 => ("P-521", 66),
                other => return Err(BundleError::Encode(format!("unsupported curve {other}"))),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 0x04 {
                return Err(BundleError::Encode(
                    "EC point is not an uncompressed point of its curve".into(),
                ));
            }
            Ok(JwkParams::Ec {
                kty: "EC",
                crv,
                x: b64(&data[1..=len]),
                y: b64(&data[1 + len..]),
            })
        }
        PublicKey::RSA(rsa) => Ok(JwkParams::Rsa {
            kty: "RSA",
            n: b64(strip_zeros(rsa.modulus)),
            e: b64(strip_zeros(rsa.exponent)),
        }),
        _ => Err(BundleError::Encode(format!(
            "unsupported key algorithm {alg}"
        ))),
    }
}

/// A DER INTEGER's magnitude without leading zero bytes (JWK wants unsigned big-endian).
fn strip_zeros(b: &[u8]) -> &[u8] {
    let skip = b.iter().take_while(|x| **x == 0).count();
    &b[skip.min(b.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ca::{Authority, LeafParams, RolesOid};

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn ca(dir: &std::path::Path, name: &str) -> Authority {
        Authority::load_or_create(&dir.join(name), &td("a.example"), RolesOid::default()).unwrap()
    }

    fn rcgen_ca(alg: &'static rcgen::SignatureAlgorithm) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().der().clone()
    }

    /// Found by the `bundle` fuzz target: a PEM bundle whose CA key is on a curve a JWK cannot
    /// name was accepted, and every later `encode()` (persisting it, serving it) failed.
    #[test]
    fn authorities_a_jwk_cannot_carry_are_refused_up_front() {
        let mut der = rcgen_ca(&rcgen::PKCS_ECDSA_P256_SHA256).to_vec();
        // The P-256 curve OID, 1.2.840.10045.3.1.7, becomes 1.2.840.10044.3.1.7.
        let p256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let at = der.windows(p256.len()).position(|w| w == p256).unwrap();
        der[at + 6] = 0x3c;
        let cert = CertificateDer::from(der);
        assert!(matches!(
            SpiffeBundle::new(td("a.example"), vec![cert.clone()], None, None),
            Err(BundleError::Key { index: 0, .. })
        ));
        let pem = crate::ca::certs_to_pem(&[cert]);
        assert!(matches!(
            SpiffeBundle::from_pem(td("a.example"), pem.as_bytes()),
            Err(BundleError::Key { index: 0, .. })
        ));
    }

    #[test]
    fn round_trip_keeps_authorities_sequence_and_hint() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (ca(dir.path(), "a"), ca(dir.path(), "b"));
        let bundle = SpiffeBundle::new(
            td("a.example"),
            vec![a.root().clone(), b.root().clone()],
            Some(7),
            Some(Duration::from_secs(300)),
        )
        .unwrap();
        let doc = bundle.encode().unwrap();
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        let k = &v["keys"][0];
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert_eq!(
            k["x"].as_str().unwrap().len(),
            43,
            "32 bytes, base64url unpadded"
        );
        assert_eq!(k["x5c"].as_array().unwrap().len(), 1);
        let back = SpiffeBundle::decode(td("a.example"), doc.as_bytes()).unwrap();
        assert_eq!(back, bundle);
        assert_eq!(back.to_tls_bundle().unwrap().certs().len(), 2);
    }

    #[test]
    fn other_key_types_round_trip() {
        for alg in [
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_ECDSA_P256_SHA256,
        ] {
            let b = SpiffeBundle::new(td("x.example"), vec![rcgen_ca(alg)], None, None).unwrap();
            let doc = b.encode().unwrap();
            assert_eq!(
                SpiffeBundle::decode(td("x.example"), doc.as_bytes()).unwrap(),
                b
            );
            assert!(!doc.contains("spiffe_sequence"));
        }
    }

    #[test]
    fn foreign_uses_are_skipped_and_pem_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let a = ca(dir.path(), "a");
        let doc = SpiffeBundle::new(td("a.example"), vec![a.root().clone()], Some(1), None)
            .unwrap()
            .encode()
            .unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        v["keys"].as_array_mut().unwrap().push(serde_json::json!({
            "use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"
        }));
        v["keys"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"use": "something-new"}));
        let b = SpiffeBundle::decode(td("a.example"), v.to_string().as_bytes()).unwrap();
        assert_eq!(b.authorities().len(), 1);
        let pem = crate::ca::certs_to_pem([a.root()]);
        let from_pem = SpiffeBundle::decode_any(td("a.example"), pem.as_bytes()).unwrap();
        assert!(from_pem.same_authorities(&b));
        assert_eq!(from_pem.sequence(), None);
        assert_eq!(
            SpiffeBundle::decode_any(td("a.example"), doc.as_bytes())
                .unwrap()
                .sequence(),
            Some(1)
        );
    }

    #[test]
    fn malformed_documents_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let a = ca(dir.path(), "a");
        let good = SpiffeBundle::new(td("a.example"), vec![a.root().clone()], Some(1), None)
            .unwrap()
            .encode()
            .unwrap();
        let good: serde_json::Value = serde_json::from_str(&good).unwrap();
        let key = good["keys"][0].clone();
        let with_key = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut k = key.clone();
            f(&mut k);
            serde_json::json!({ "keys": [k] }).to_string()
        };
        // A leaf certificate in x5c: not a CA.
        let leaf = a
            .sign_leaf(
                &rcgen::KeyPair::generate().unwrap(),
                &LeafParams {
                    names: Default::default(),
                    spiffe_id: crate::spiffe::SpiffeId::parse("spiffe://a.example/w").unwrap(),
                    roles: vec![],
                    not_before: 0,
                    not_after: 4_000_000_000,
                },
            )
            .unwrap()
            .der;
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not a SPIFFE bundle"),
            ("{}".into(), "missing field `keys`"),
            (r#"{"keys": 3}"#.into(), "not a SPIFFE bundle"),
            (r#"{"keys": []}"#.into(), "no x509-svid authority"),
            (r#"{"keys": [7]}"#.into(), "not a JSON object"),
            (
                r#"{"keys": [], "spiffe_sequence": -1}"#.into(),
                "not a SPIFFE bundle",
            ),
            (
                with_key(&|k| {
                    k.as_object_mut().unwrap().remove("x5c");
                }),
                "without x5c",
            ),
            (
                with_key(&|k| k["x5c"] = serde_json::json!("abc")),
                "not an array",
            ),
            (
                with_key(&|k| {
                    let c = k["x5c"][0].clone();
                    k["x5c"] = serde_json::json!([c.clone(), c]);
                }),
                "exactly one certificate",
            ),
            (
                with_key(&|k| k["x5c"] = serde_json::json!(["!!!"])),
                "not base64",
            ),
            (
                with_key(&|k| k["x5c"] = serde_json::json!(["AAAA"])),
                "does not parse",
            ),
            (
                with_key(&|k| k["x5c"] = serde_json::json!([STANDARD.encode(leaf.as_ref())])),
                "not a CA",
            ),
            (
                with_key(&|k| k["x"] = serde_json::json!("AAAA")),
                "do not match",
            ),
            (
                with_key(&|k| {
                    k.as_object_mut().unwrap().remove("kty");
                }),
                "kty missing",
            ),
        ];
        for (doc, want) in cases {
            let err = SpiffeBundle::decode(td("a.example"), doc.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(want), "{doc}: {err}");
        }
        assert!(matches!(
            SpiffeBundle::decode(td("a.example"), &vec![b' '; MAX_BUNDLE_BYTES + 1]),
            Err(BundleError::TooLarge(_))
        ));
        assert!(SpiffeBundle::from_pem(td("a.example"), b"nothing").is_err());
        let leaf_pem = crate::ca::certs_to_pem([&leaf]);
        assert!(
            SpiffeBundle::from_pem(td("a.example"), leaf_pem.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("not a CA")
        );
    }
}
