//! The signing CA: created on first start or loaded from PEM files, then signs leaves and CRLs.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, SigningKey,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::CaError;
use super::names::SanNames;
use super::svid::{RolesOid, Serial, SvidInfo, encode_roles};
use crate::fsutil::{create_private_dir, write_atomic};
use crate::spiffe::{SpiffeId, TrustDomain};

/// How long a generated root CA is valid.
const ROOT_VALIDITY_SECS: i64 = 5 * 365 * 24 * 3600;

/// pathLenConstraint of a generated root: one CA certificate may sit between it and a leaf. That
/// one is the successor cross-signed by this root during a rotation; OpenSSL and Go enforce
/// the constraint of the trust anchor itself, so a root with 0 would make them refuse the chain
/// leaf ← successor (cross-signed) ← this root. Lanyard never issues other intermediates.
const ROOT_PATH_LEN: u8 = 1;

/// pathLenConstraint of a cross-signed certificate: only leaves may follow it, so it cannot
/// stretch the path any further.
const CROSS_PATH_LEN: u8 = 0;

/// The CA: its signing key, its certificate chain and the trust anchor.
pub struct Authority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate (the root, for a generated CA).
    signing_cert: CertificateDer<'static>,
    /// The signing certificate's common name, to rebuild its subject when cross-signing.
    common_name: Option<String>,
    /// Certificates sent after the leaf (intermediates; empty when the CA is the root).
    intermediates: Vec<CertificateDer<'static>>,
    /// The trust anchor workloads must trust.
    root: CertificateDer<'static>,
    fingerprint: [u8; 32],
    roles_oid: RolesOid,
    not_after: i64,
    /// The trust anchor's pathLenConstraint (`None`: not constrained).
    root_path_len: Option<u32>,
    /// What every leaf this CA signs shares, encoded once; `None` for a key whose signature
    /// algorithm [`alg_ident`] does not know (such a CA signs through rcgen).
    template: Option<LeafTemplate>,
}

/// The DER of a leaf's fields that depend only on the signing CA, encoded once when the CA is
/// loaded instead of once per certificate (rcgen re-encodes the issuer name, the signature
/// algorithm and the authority key identifier, and builds a `CertificateParams`, per leaf).
struct LeafTemplate {
    /// The signature AlgorithmIdentifier of the CA key.
    alg: &'static [u8],
    /// The issuer Name: the signing certificate's subject, byte for byte.
    issuer: Vec<u8>,
    /// The whole authorityKeyIdentifier Extension.
    aki: Vec<u8>,
    /// The roles extension's OBJECT IDENTIFIER, tag and length included.
    roles_oid: Vec<u8>,
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafParams {
    /// The one URI SAN.
    pub spiffe_id: SpiffeId,
    /// Roles for the roles extension (omitted when empty).
    pub roles: Vec<String>,
    /// notBefore, seconds since the Unix epoch (already backdated for clock skew).
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// DNS and IP SANs next to the URI SAN (already allowed by policy).
    pub names: SanNames,
}

/// A signed leaf certificate.
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    /// The leaf, DER.
    pub der: CertificateDer<'static>,
    /// Its serial.
    pub serial: Serial,
    /// What the leaf says, from the values that went into it (the same facts `parse_svid`
    /// reads back from `der`, without parsing the certificate just signed).
    pub svid: SvidInfo,
}

impl Authority {
    /// Loads `dir/ca.pem` + `dir/ca.key`, or creates a new P-256 root there (key mode 0600).
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &TrustDomain,
        roles_oid: RolesOid,
    ) -> Result<Self, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() || key_path.exists() {
            return Self::load(&cert_path, &key_path, trust_domain, roles_oid);
        }
        Self::create(
            dir,
            trust_domain,
            roles_oid,
            &format!("Lanyard CA {trust_domain}"),
        )
    }

    /// Creates a new P-256 root named `common_name` in `dir` (`ca.pem`, `ca.key` mode 0600); fails
    /// if either file exists. A rotated CA gets a name of its own, so no two CAs of one trust
    /// domain share a subject.
    pub fn create(
        dir: &Path,
        trust_domain: &TrustDomain,
        roles_oid: RolesOid,
        common_name: &str,
    ) -> Result<Self, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() || key_path.exists() {
            return Err(CaError::BadCaFiles(
                dir.to_path_buf(),
                "a CA already exists there".into(),
            ));
        }
        create_private_dir(dir).map_err(|e| io(dir, e))?;
        let (cert_pem, key_pem) = Self::generate_pem(trust_domain, common_name)?;
        write_atomic(&key_path, key_pem.as_bytes(), 0o600).map_err(|e| io(&key_path, e))?;
        write_atomic(&cert_path, cert_pem.as_bytes(), 0o644).map_err(|e| io(&cert_path, e))?;
        Self::load(&cert_path, &key_path, trust_domain, roles_oid)
    }

    /// Generates a new P-256 root named `common_name` in memory: its certificate and private
    /// key, both PEM (for a store that keeps them elsewhere than in files, sealed).
    pub fn generate_pem(
        trust_domain: &TrustDomain,
        common_name: &str,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(CaError::Sign)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let params = ca_params(
            trust_domain,
            common_name,
            now - 60,
            now + ROOT_VALIDITY_SECS,
            ROOT_PATH_LEN,
        )?;
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs `other`'s CA certificate with this CA's key: a certificate with `other`'s subject
    /// and key, issued by this CA. A leaf of `other` then also chains to this CA, so a client
    /// that still trusts only this CA (a join token minted before a rotation, a workload whose
    /// bundle is not updated yet) keeps accepting servers of `other`. Valid until the earlier of
    /// both CAs' notAfter; pathLenConstraint 0. OpenSSL and Go accept the chain only if this CA's
    /// root allows one intermediate ([`Authority::root_path_len`]); Lanyard's own verifier
    /// does not read the anchor's constraint.
    pub fn cross_sign(&self, other: &Authority) -> Result<CertificateDer<'static>, CaError> {
        let bad = |m: &str| CaError::BadCaFiles(std::path::PathBuf::new(), m.to_string());
        let cn = other
            .common_name
            .as_deref()
            .ok_or_else(|| bad("the CA certificate to cross-sign has no common name"))?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let params = ca_params(
            &other.trust_domain,
            cn,
            now - 60,
            self.not_after.min(other.not_after),
            CROSS_PATH_LEN,
        )?;
        let mut params = params;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(other.issuer.key(), &self.issuer)?;
        // Path building matches names byte for byte: the rebuilt subject must be the original.
        let subject = |der: &[u8]| {
            X509Certificate::from_der(der)
                .map(|(_, c)| c.subject().as_raw().to_vec())
                .map_err(|e| bad(&e.to_string()))
        };
        if subject(cert.der())? != subject(&other.signing_cert)? {
            return Err(bad(
                "cannot reproduce the subject of the CA to cross-sign (not written by Lanyard)",
            ));
        }
        Ok(cert.der().clone())
    }

    /// Loads a CA from a PEM chain file (signing cert first, then its parents up to the root) and
    /// a PEM private key.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &TrustDomain,
        roles_oid: RolesOid,
    ) -> Result<Self, CaError> {
        let pem = read(cert_path)?;
        let key_pem = String::from_utf8(read(key_path)?)
            .map_err(|_| CaError::BadCaFiles(key_path.to_path_buf(), "key is not PEM".into()))?;
        let mode = fs::metadata(key_path)
            .map_err(|e| io(key_path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::BadCaFiles(
                key_path.to_path_buf(),
                format!(
                    "key file mode is {:o}; it must not be readable by group or others (chmod 600)",
                    mode & 0o777
                ),
            ));
        }
        Self::from_pem(&pem, &key_pem, cert_path, trust_domain, roles_oid)
    }

    /// A CA from its PEM chain (signing cert first, then its parents up to the root) and PEM
    /// private key, held in memory; `origin` names where they came from, for errors.
    pub fn from_pem(
        pem: &[u8],
        key_pem: &str,
        origin: &Path,
        trust_domain: &TrustDomain,
        roles_oid: RolesOid,
    ) -> Result<Self, CaError> {
        let bad = |m: String| CaError::BadCaFiles(origin.to_path_buf(), m);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("cannot read PEM certificates: {e}")))?;
        let (signing, parents) = chain
            .split_first()
            .ok_or_else(|| bad("no certificate found".into()))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad(e.to_string()))?;
        let (_, parsed) = X509Certificate::from_der(signing)
            .map_err(|e| bad(format!("cannot parse CA certificate: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(bad(
                "the private key does not match the CA certificate".into()
            ));
        }
        if !parsed.is_ca() {
            return Err(bad(
                "the certificate is not a CA (basicConstraints CA=false)".into(),
            ));
        }
        let not_after = parsed.validity().not_after.timestamp();
        let common_name = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let issuer = Issuer::from_ca_cert_der(signing, key)?;
        let root = parents.last().unwrap_or(signing).clone();
        let intermediates = if parents.is_empty() {
            Vec::new()
        } else {
            chain[..chain.len() - 1].to_vec()
        };
        let fingerprint = Sha256::digest(root.as_ref()).into();
        let root_path_len = path_len(&root);
        let template = LeafTemplate::new(&parsed, issuer.key(), &roles_oid);
        Ok(Self {
            trust_domain: trust_domain.clone(),
            issuer,
            signing_cert: signing.clone(),
            common_name,
            intermediates,
            root,
            fingerprint,
            roles_oid,
            not_after,
            root_path_len,
            template,
        })
    }

    /// Signs a leaf X.509-SVID for `public_key`. Only the key and `params` go into it.
    ///
    /// The DER is written here, from the CA's [`LeafTemplate`] and `params`: the same bytes
    /// rcgen wrote for the same inputs (a test compares them), at a fraction of the
    /// allocations. A CA whose key algorithm has no template signs through rcgen.
    pub fn sign_leaf(
        &self,
        public_key: &impl PublicKeyData,
        params: &LeafParams,
    ) -> Result<SignedLeaf, CaError> {
        if !params.spiffe_id.is_in(&self.trust_domain) {
            return Err(CaError::InvalidCsr(format!(
                "{} is outside trust domain {}",
                params.spiffe_id, self.trust_domain
            )));
        }
        let serial = Serial::random();
        let not_after = params.not_after.min(self.not_after);
        let der = match &self.template {
            Some(t) => self.write_leaf(t, public_key, &serial, params, not_after)?,
            None => self.rcgen_leaf(public_key, &serial, params, not_after)?,
        };
        // The roles as the extension encodes them (`encode_roles` sorts and de-duplicates).
        let mut roles = params.roles.clone();
        roles.sort();
        roles.dedup();
        let svid = SvidInfo {
            spiffe_id: params.spiffe_id.clone(),
            roles,
            serial: serial.clone(),
            not_before: params.not_before,
            not_after,
        };
        Ok(SignedLeaf { der, serial, svid })
    }

    /// The leaf's DER, written from `t`: Certificate { TBSCertificate, signatureAlgorithm,
    /// signature }, with the TBS fields and extensions in the order rcgen writes them.
    fn write_leaf(
        &self,
        t: &LeafTemplate,
        public_key: &impl PublicKeyData,
        serial: &Serial,
        params: &LeafParams,
        not_after: i64,
    ) -> Result<CertificateDer<'static>, CaError> {
        let mut out = Vec::with_capacity(640);
        der_nested(&mut out, 0x30, |out| {
            der_nested(out, 0x30, |tbs| {
                // version [0] EXPLICIT v3
                tbs.extend_from_slice(&[0xa0, 0x03, 0x02, 0x01, 0x02]);
                der_uint(tbs, serial.as_bytes());
                tbs.extend_from_slice(t.alg);
                tbs.extend_from_slice(&t.issuer);
                der_nested(tbs, 0x30, |v| {
                    der_time(v, params.not_before)?;
                    der_time(v, not_after)
                })?;
                // An empty subject is what X.509-SVIDs use; the SAN is then critical (RFC 5280).
                tbs.extend_from_slice(&[0x30, 0x00]);
                write_spki(tbs, public_key);
                der_nested(tbs, 0xa3, |x| {
                    der_nested(x, 0x30, |exts| {
                        exts.extend_from_slice(&t.aki);
                        der_nested(exts, 0x30, |e| {
                            e.extend_from_slice(EXT_SAN_CRITICAL);
                            der_nested(e, 0x04, |v| {
                                der_nested(v, 0x30, |names| write_general_names(names, params))
                            })
                        })?;
                        exts.extend_from_slice(EXT_KEY_USAGE_DIGITAL_SIGNATURE);
                        exts.extend_from_slice(EXT_EKU_SERVER_CLIENT);
                        // basicConstraints CA=false, critical, as an empty SEQUENCE: rcgen's
                        // ExplicitNoCa encodes the DEFAULT `cA FALSE` explicitly, which DER
                        // forbids and strict parsers (Python's cryptography, hence py-spiffe)
                        // reject.
                        exts.extend_from_slice(EXT_BASIC_CONSTRAINTS_LEAF);
                        if !params.roles.is_empty() {
                            der_nested(exts, 0x30, |e| {
                                e.extend_from_slice(&t.roles_oid);
                                der_tlv(e, 0x04, &encode_roles(&params.roles));
                                Ok(())
                            })?;
                        }
                        Ok(())
                    })
                })
            })?;
            let signature = self.issuer.key().sign(out)?;
            out.extend_from_slice(t.alg);
            der_header(out, 0x03, signature.len() + 1);
            out.push(0);
            out.extend_from_slice(&signature);
            Ok(())
        })?;
        Ok(CertificateDer::from(out))
    }

    /// The leaf through rcgen's `CertificateParams`, for a CA key without a [`LeafTemplate`]
    /// (and, in tests, the reference [`Authority::write_leaf`] must match byte for byte).
    fn rcgen_leaf(
        &self,
        public_key: &impl PublicKeyData,
        serial: &Serial,
        params: &LeafParams,
        not_after: i64,
    ) -> Result<CertificateDer<'static>, CaError> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            params
                .spiffe_id
                .as_str()
                .to_string()
                .try_into()
                .map_err(CaError::Sign)?,
        )];
        for d in &params.names.dns {
            p.subject_alt_names.push(SanType::DnsName(
                d.as_str().try_into().map_err(CaError::Sign)?,
            ));
        }
        for ip in &params.names.ips {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        p.is_ca = IsCa::NoCa;
        let mut bc = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x00]);
        bc.set_criticality(true);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
        p.not_before = to_time(params.not_before)?;
        p.not_after = to_time(not_after)?;
        p.use_authority_key_identifier_extension = true;
        p.key_identifier_method = KeyIdMethod::Sha256;
        p.custom_extensions = vec![bc];
        if !params.roles.is_empty() {
            let mut ext = CustomExtension::from_oid_content(
                self.roles_oid.arcs(),
                encode_roles(&params.roles),
            );
            ext.set_criticality(false);
            p.custom_extensions.push(ext);
        }
        Ok(p.signed_by(public_key, &self.issuer)?.der().clone())
    }

    /// Signs a CRL (v2) listing `revoked` (serial, revocation time), with CRL number `crl_number`, valid from
    /// `this_update` to `next_update`. The DER is written here rather than by rcgen, which
    /// holds a `RevokedCertParams` per entry next to its own buffers: with a million entries
    /// that was hundreds of MB at once. The fields are exactly rcgen's: the signature algorithm
    /// of the CA key, the CA certificate's subject as issuer, UTCTime before 2050 and
    /// GeneralizedTime from then, entries of serial and revocation date only (no reason
    /// code), and the authority key identifier (SHA-256 of the key, truncated to 20 bytes)
    /// and CRL number extensions.
    pub fn sign_crl(
        &self,
        revoked: &[(Serial, i64)],
        crl_number: u64,
        this_update: i64,
        next_update: i64,
    ) -> Result<Vec<u8>, CaError> {
        let mut entries = CrlEntries::new();
        for (serial, at) in revoked {
            entries.push(serial.as_bytes(), *at)?;
        }
        self.sign_crl_entries(entries, crl_number, this_update, next_update)
    }

    /// [`Authority::sign_crl`] over entries encoded as they were listed (a CRL streamed from the
    /// revocation index, with no list of serials in between).
    pub fn sign_crl_entries(
        &self,
        revoked: CrlEntries,
        crl_number: u64,
        this_update: i64,
        next_update: i64,
    ) -> Result<Vec<u8>, CaError> {
        if next_update <= this_update {
            return Err(CaError::Sign(rcgen::Error::InvalidCrlNextUpdate));
        }
        let usages = self.issuer.key_usages();
        if !usages.is_empty() && !usages.contains(&KeyUsagePurpose::CrlSign) {
            return Err(CaError::Sign(rcgen::Error::IssuerNotCrlSigner));
        }
        let key = self.issuer.key();
        let alg = alg_ident(key.algorithm())?;
        let (_, cert) = X509Certificate::from_der(&self.signing_cert)
            .map_err(|e| CaError::InvalidCertificate(format!("CA certificate: {e}")))?;
        let CrlEntries { mut buf, count } = revoked;
        let entries_len = buf.len();
        // crlExtensions [0] { authorityKeyIdentifier, cRLNumber }.
        let ski = Sha256::digest(key.subject_public_key_info());
        let mut aki = Vec::with_capacity(40);
        der_tlv(&mut aki, 0x30, &{
            let mut v = Vec::new();
            der_tlv(&mut v, 0x06, OID_AUTHORITY_KEY_IDENTIFIER);
            der_tlv(&mut v, 0x04, &{
                let mut seq = Vec::new();
                der_tlv(&mut seq, 0x30, &{
                    let mut id = Vec::new();
                    der_tlv(&mut id, 0x80, &ski[..20]);
                    id
                });
                seq
            });
            v
        });
        let mut number = Vec::with_capacity(20);
        der_tlv(&mut number, 0x30, &{
            let mut v = Vec::new();
            der_tlv(&mut v, 0x06, OID_CRL_NUMBER);
            der_tlv(&mut v, 0x04, &{
                let mut int = Vec::new();
                der_uint(&mut int, &crl_number.to_be_bytes());
                int
            });
            v
        });
        let mut exts = Vec::with_capacity(aki.len() + number.len() + 8);
        der_tlv(&mut exts, 0xa0, &{
            let mut seq = Vec::new();
            der_tlv(&mut seq, 0x30, &[aki, number].concat());
            seq
        });
        buf.extend_from_slice(&exts);
        // Everything of the TBSCertList before the entries, then its own header, put in front
        // of the entries in place (one move of the buffer, no second copy of it).
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(&[0x02, 0x01, 0x01]);
        head.extend_from_slice(alg);
        head.extend_from_slice(cert.tbs_certificate.subject.as_raw());
        der_time(&mut head, this_update)?;
        der_time(&mut head, next_update)?;
        // RFC 5280 5.1.2.6: no revoked certificates, no (empty) list.
        if count > 0 {
            der_header(&mut head, 0x30, entries_len);
        }
        let mut tbs_header = Vec::with_capacity(6);
        der_header(&mut tbs_header, 0x30, head.len() + buf.len());
        buf.splice(0..0, tbs_header.into_iter().chain(head));
        let signature = key.sign(&buf)?;
        buf.extend_from_slice(alg);
        der_header(&mut buf, 0x03, signature.len() + 1);
        buf.push(0);
        buf.extend_from_slice(&signature);
        let mut outer = Vec::with_capacity(6);
        der_header(&mut outer, 0x30, buf.len());
        buf.splice(0..0, outer);
        buf.shrink_to_fit();
        Ok(buf)
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Certificates to send after a leaf (intermediates only).
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The trust anchor.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// SHA-256 of the trust anchor's DER: what a join token pins.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The roles extension OID.
    pub fn roles_oid(&self) -> &RolesOid {
        &self.roles_oid
    }

    /// The signing certificate's notAfter; no leaf outlives it.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The trust anchor's pathLenConstraint (`None`: unconstrained). Roots generated by
    /// earlier Lanyard versions say 0: OpenSSL and Go then refuse a successor cross-signed by them.
    pub fn root_path_len(&self) -> Option<u32> {
        self.root_path_len
    }

    /// The certificate whose key signs leaves (the root, for a generated CA).
    pub fn signing_cert(&self) -> &CertificateDer<'static> {
        &self.signing_cert
    }
}

/// Parameters of a Lanyard CA certificate: O=Lanyard, CN=`common_name`, the trust domain as URI
/// SAN, pathLenConstraint `path_len`.
fn ca_params(
    trust_domain: &TrustDomain,
    common_name: &str,
    not_before: i64,
    not_after: i64,
    path_len: u8,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Lanyard");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(
        trust_domain.id_string().try_into().map_err(CaError::Sign)?,
    )];
    params.serial_number = Some(SerialNumber::from_slice(Serial::random().as_bytes()));
    params.not_before = to_time(not_before)?;
    params.not_after = to_time(not_after)?;
    params.key_identifier_method = KeyIdMethod::Sha256;
    Ok(params)
}

/// PEM-encodes DER certificates.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect()
}

/// PEM-encodes one DER object under `label` (e.g. `X509 CRL`).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The pathLenConstraint of a CA certificate (`None`: absent, or the certificate does not parse;
/// it only decides a warning, and the bundle check refuses a root that does not parse).
fn path_len(der: &[u8]) -> Option<u32> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    cert.basic_constraints()
        .ok()
        .flatten()
        .and_then(|b| b.value.path_len_constraint)
}

/// The revoked certificates of a CRL, encoded as they are added (about 36 bytes each), for
/// [`Authority::sign_crl_entries`].
#[derive(Debug, Default)]
pub struct CrlEntries {
    buf: Vec<u8>,
    count: usize,
}

impl CrlEntries {
    /// No entries yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lists certificate `serial` (big-endian bytes, as a positive INTEGER) as revoked at
    /// `revoked_at`; fails only for a time no certificate can carry.
    pub fn push(&mut self, serial: &[u8], revoked_at: i64) -> Result<(), CaError> {
        let mut entry = [0u8; 64];
        let mut n = 0;
        let mut put = |b: &[u8]| {
            entry[n..n + b.len()].copy_from_slice(b);
            n += b.len();
        };
        let mut int = [0u8; 24];
        let int_len = uint_bytes(&mut int, serial);
        put(&[0x02, int_len as u8]);
        put(&int[..int_len]);
        let mut time = [0u8; 17];
        let (tag, time_len) = time_bytes(&mut time, revoked_at)?;
        put(&[tag, time_len as u8]);
        put(&time[..time_len]);
        // Serials are at most 20 bytes and times 15 or 17, so an entry stays below 128 bytes:
        // a one-byte length.
        self.buf.extend_from_slice(&[0x30, n as u8]);
        self.buf.extend_from_slice(&entry[..n]);
        self.count += 1;
        Ok(())
    }

    /// Entries listed.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none is listed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl LeafTemplate {
    /// The template of the CA whose signing certificate is `cert` and key is `key`, or `None`
    /// when [`alg_ident`] does not know the key's signature algorithm.
    fn new(cert: &X509Certificate<'_>, key: &KeyPair, roles_oid: &RolesOid) -> Option<Self> {
        let alg = alg_ident(key.algorithm()).ok()?;
        // The key identifier rcgen's `Issuer::from_ca_cert_der` puts in the authority key
        // identifier: the CA certificate's own subjectKeyIdentifier, else the first 20 bytes of
        // the SHA-256 of the CA's SubjectPublicKeyInfo.
        let kid = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
            .unwrap_or_else(|| Sha256::digest(key.subject_public_key_info())[..20].to_vec());
        let mut aki = Vec::with_capacity(kid.len() + 16);
        der_nested(&mut aki, 0x30, |e| {
            der_tlv(e, 0x06, OID_AUTHORITY_KEY_IDENTIFIER);
            der_nested(e, 0x04, |v| {
                der_nested(v, 0x30, |seq| {
                    der_tlv(seq, 0x80, &kid);
                    Ok(())
                })
            })
        })
        .ok()?;
        let mut oid = Vec::with_capacity(16);
        der_tlv(&mut oid, 0x06, &oid_content(roles_oid.arcs()));
        Some(Self {
            alg,
            issuer: cert.tbs_certificate.subject.as_raw().to_vec(),
            aki,
            roles_oid: oid,
        })
    }
}

/// The content octets of an OBJECT IDENTIFIER (X.690 8.19): the first two arcs as one
/// subidentifier, each subidentifier in base 128, high bit set on all but its last byte.
fn oid_content(arcs: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(arcs.len() * 2);
    let first = arcs.first().copied().unwrap_or(0) * 40 + arcs.get(1).copied().unwrap_or(0);
    for sub in std::iter::once(first).chain(arcs.iter().skip(2).copied()) {
        let mut bytes = [0u8; 10];
        let mut n = 0;
        let mut v = sub;
        loop {
            bytes[n] = (v & 0x7f) as u8 | if n == 0 { 0 } else { 0x80 };
            n += 1;
            v >>= 7;
            if v == 0 {
                break;
            }
        }
        out.extend(bytes[..n].iter().rev());
    }
    out
}

/// Appends the SubjectPublicKeyInfo of `key`: a fixed header for the P-256 and Ed25519 keys
/// Lanyard's CSRs carry, rcgen's encoding for any other.
fn write_spki(out: &mut Vec<u8>, key: &impl PublicKeyData) {
    /// SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes + 0 unused) }.
    const P256: &[u8] = &[
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    /// SEQUENCE { SEQUENCE { id-Ed25519 }, BIT STRING (32 bytes + 0 unused) }.
    const ED25519: &[u8] = &[
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let raw = key.der_bytes();
    let alg = key.algorithm();
    let header = if alg == &rcgen::PKCS_ECDSA_P256_SHA256 && raw.len() == 65 {
        Some(P256)
    } else if alg == &rcgen::PKCS_ED25519 && raw.len() == 32 {
        Some(ED25519)
    } else {
        None
    };
    match header {
        Some(h) => {
            out.extend_from_slice(h);
            out.extend_from_slice(raw);
        }
        None => out.extend_from_slice(&key.subject_public_key_info()),
    }
}

/// Appends a leaf's GeneralNames content: the SPIFFE ID as URI, then DNS names, then IP
/// addresses (IA5String names must be ASCII, as rcgen's `Ia5String` requires).
fn write_general_names(out: &mut Vec<u8>, params: &LeafParams) -> Result<(), CaError> {
    let ia5 = |out: &mut Vec<u8>, tag: u8, name: &str| {
        if !name.is_ascii() {
            return Err(CaError::InvalidCsr(format!(
                "{name:?} is not an ASCII (IA5String) name"
            )));
        }
        der_tlv(out, tag, name.as_bytes());
        Ok(())
    };
    ia5(out, 0x86, params.spiffe_id.as_str())?;
    for d in &params.names.dns {
        ia5(out, 0x82, d)?;
    }
    for ip in &params.names.ips {
        match ip {
            std::net::IpAddr::V4(a) => der_tlv(out, 0x87, &a.octets()),
            std::net::IpAddr::V6(a) => der_tlv(out, 0x87, &a.octets()),
        }
    }
    Ok(())
}

/// subjectAltName (2.5.29.17), critical: the Extension's OID and criticality, before its value.
const EXT_SAN_CRITICAL: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11, 0x01, 0x01, 0xff];
/// keyUsage (2.5.29.15), critical, digitalSignature only: the whole Extension.
const EXT_KEY_USAGE_DIGITAL_SIGNATURE: &[u8] = &[
    0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x07, 0x80,
];
/// extKeyUsage (2.5.29.37), serverAuth and clientAuth: the whole Extension.
const EXT_EKU_SERVER_CLIENT: &[u8] = &[
    0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x25, 0x04, 0x16, 0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01,
    0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
];
/// basicConstraints (2.5.29.19), critical, CA=false (an empty SEQUENCE): the whole Extension.
const EXT_BASIC_CONSTRAINTS_LEAF: &[u8] = &[
    0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00,
];

/// Appends a TLV whose content `content` appends: the content is written in place, then its
/// header is put in front of it (a move of the content bytes, no second buffer).
fn der_nested(
    out: &mut Vec<u8>,
    tag: u8,
    content: impl FnOnce(&mut Vec<u8>) -> Result<(), CaError>,
) -> Result<(), CaError> {
    let start = out.len();
    content(out)?;
    let mut h = [0u8; 10];
    let n = header_bytes(&mut h, tag, out.len() - start);
    out.splice(start..start, h[..n].iter().copied());
    Ok(())
}

/// A DER tag and length in the fewest bytes, into `out`; returns how many.
fn header_bytes(out: &mut [u8; 10], tag: u8, len: usize) -> usize {
    out[0] = tag;
    if len < 0x80 {
        out[1] = len as u8;
        return 2;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    out[1] = 0x80 | (bytes.len() - skip) as u8;
    out[2..2 + bytes.len() - skip].copy_from_slice(&bytes[skip..]);
    2 + bytes.len() - skip
}

/// id-ce-authorityKeyIdentifier (2.5.29.35), encoded.
const OID_AUTHORITY_KEY_IDENTIFIER: &[u8] = &[0x55, 0x1d, 0x23];
/// id-ce-cRLNumber (2.5.29.20), encoded.
const OID_CRL_NUMBER: &[u8] = &[0x55, 0x1d, 0x14];

/// The AlgorithmIdentifier of a signature by a key of `alg`, as rcgen writes it (parameters
/// absent for ECDSA and Ed25519, NULL for RSA PKCS#1 v1.5).
fn alg_ident(alg: &'static rcgen::SignatureAlgorithm) -> Result<&'static [u8], CaError> {
    const ECDSA_SHA256: &[u8] = &[
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
    ];
    const ECDSA_SHA384: &[u8] = &[
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
    ];
    const ED25519: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
    const RSA_SHA256: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00,
    ];
    const RSA_SHA384: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c, 0x05, 0x00,
    ];
    const RSA_SHA512: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d, 0x05, 0x00,
    ];
    let known = [
        (&rcgen::PKCS_ECDSA_P256_SHA256, ECDSA_SHA256),
        (&rcgen::PKCS_ECDSA_P384_SHA384, ECDSA_SHA384),
        (&rcgen::PKCS_ED25519, ED25519),
        (&rcgen::PKCS_RSA_SHA256, RSA_SHA256),
        (&rcgen::PKCS_RSA_SHA384, RSA_SHA384),
        (&rcgen::PKCS_RSA_SHA512, RSA_SHA512),
    ];
    known
        .iter()
        .find(|(a, _)| *a == alg)
        .map(|(_, der)| *der)
        .ok_or(CaError::Sign(rcgen::Error::UnsupportedSignatureAlgorithm))
}

/// A DER length header: tag, then the length in the fewest bytes.
fn der_header(out: &mut Vec<u8>, tag: u8, len: usize) {
    let mut h = [0u8; 10];
    let n = header_bytes(&mut h, tag, len);
    out.extend_from_slice(&h[..n]);
}

fn der_tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    der_header(out, tag, value.len());
    out.extend_from_slice(value);
}

/// A non-negative INTEGER of big-endian `bytes`.
fn der_uint(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut int = [0u8; 24];
    let n = uint_bytes(&mut int, bytes);
    der_tlv(out, 0x02, &int[..n]);
}

/// The content octets of a non-negative INTEGER (leading zeros dropped, a 0x00 in front of a
/// high bit; zero is one 0x00), as yasna's `write_bigint_bytes(_, true)` writes them; `bytes`
/// is at most 20 long (a serial) or 8 (a CRL number). Returns the length written to `out`.
fn uint_bytes(out: &mut [u8; 24], bytes: &[u8]) -> usize {
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let rest = &bytes[skip..bytes.len().min(skip + 23)];
    match rest.first() {
        None => {
            out[0] = 0;
            1
        }
        Some(b) if *b >= 0x80 => {
            out[0] = 0;
            out[1..=rest.len()].copy_from_slice(rest);
            rest.len() + 1
        }
        Some(_) => {
            out[..rest.len()].copy_from_slice(rest);
            rest.len()
        }
    }
}

/// A Time as RFC 5280 wants it: UTCTime (`YYMMDDHHMMSSZ`) for 1950 to 2049, GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) otherwise. Returns the tag and the content length written to `out`.
fn time_bytes(out: &mut [u8; 17], unix: i64) -> Result<(u8, usize), CaError> {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Days to a civil date (H. Hinnant's algorithm), without a calendar library per entry.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return Err(CaError::InvalidCsr(format!("time {unix} is out of range")));
    }
    let mut n = 0;
    let mut two = |v: i64| {
        out[n] = b'0' + (v / 10) as u8;
        out[n + 1] = b'0' + (v % 10) as u8;
        n += 2;
    };
    let tag = if (1950..2050).contains(&year) {
        two(year % 100);
        0x17
    } else {
        two(year / 100);
        two(year % 100);
        0x18
    };
    two(month);
    two(day);
    two(secs / 3600);
    two(secs / 60 % 60);
    two(secs % 60);
    out[n] = b'Z';
    Ok((tag, n + 1))
}

/// Appends a Time (see [`time_bytes`]).
fn der_time(out: &mut Vec<u8>, unix: i64) -> Result<(), CaError> {
    let mut t = [0u8; 17];
    let (tag, n) = time_bytes(&mut t, unix)?;
    der_tlv(out, tag, &t[..n]);
    Ok(())
}

fn to_time(unix: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|_| CaError::InvalidCsr(format!("time {unix} is out of range")))
}

fn io(path: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ca::parse_svid;

    /// The facts `sign_leaf` reports without parsing are exactly what the certificate says,
    /// including roles given unsorted with duplicates and a notAfter past the CA's own.
    #[test]
    fn signed_leaf_describes_what_it_signed() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let ca = Authority::load_or_create(dir.path(), &td, RolesOid::default()).unwrap();
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let cases = [
            (vec!["deploy", "db-read", "deploy"], now + 300),
            (vec![], now + 60),
            (vec!["a"], ca.not_after() + 3600),
        ];
        for (roles, not_after) in cases {
            let mut names = SanNames::default();
            names.dns.push("api.example.org".into());
            names.ips.push("10.0.0.7".parse().unwrap());
            let params = LeafParams {
                spiffe_id: SpiffeId::parse("spiffe://example.org/ns/a").unwrap(),
                roles: roles.into_iter().map(String::from).collect(),
                not_before: now - 30,
                not_after,
                names,
            };
            let signed = ca.sign_leaf(&key, &params).unwrap();
            let parsed = parse_svid(&signed.der, ca.roles_oid()).unwrap();
            assert_eq!(signed.svid, parsed);
            assert_eq!(signed.serial, parsed.serial);
        }
    }
}

#[cfg(test)]
mod leaf_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ca::parse_svid;

    /// The TBS of a certificate, and its signature checked with the CA key.
    fn tbs_of<'a>(ca: &Authority, der: &'a [u8]) -> &'a [u8] {
        let (rest, cert) = X509Certificate::from_der(der).unwrap();
        assert!(rest.is_empty());
        let (_, ca_cert) = X509Certificate::from_der(&ca.signing_cert).unwrap();
        let spki = ca_cert.public_key().subject_public_key.data.as_ref();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, spki)
            .verify(
                cert.tbs_certificate.as_ref(),
                cert.signature_value.data.as_ref(),
            )
            .expect("signed by the CA key");
        let tbs = cert.tbs_certificate.as_ref();
        // The slice of `der` that is the TBS (x509-parser's points into the input).
        let at = tbs.as_ptr() as usize - der.as_ptr() as usize;
        &der[at..at + tbs.len()]
    }

    /// (SPIFFE ID, roles, DNS names, IP addresses, notAfter) of one leaf.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, i64);

    /// The hand-written leaf is byte for byte what rcgen writes for the same inputs (the
    /// signature aside: ECDSA signatures are randomized), for P-256 and Ed25519 keys, with and
    /// without roles and names, under the default roles OID and one with large arcs.
    #[test]
    fn the_hand_written_leaf_is_what_rcgen_wrote() {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        for oid in ["1.3.9999.7781.1", "1.3.6.1.4.1.268435455.0.128.16383.16384"] {
            let dir = tempfile::tempdir().unwrap();
            let td = TrustDomain::new("example.org").unwrap();
            let ca =
                Authority::load_or_create(dir.path(), &td, RolesOid::parse(oid).unwrap()).unwrap();
            assert!(ca.template.is_some());
            let keys = [
                KeyPair::generate().unwrap(),
                KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
            ];
            let long_path = format!("spiffe://example.org/{}", "seg/".repeat(40) + "end");
            let cases: Vec<Case<'_>> = vec![
                (
                    "spiffe://example.org/ns/a",
                    vec!["deploy", "db-read", "deploy"],
                    vec![],
                    vec![],
                    now + 300,
                ),
                ("spiffe://example.org/x", vec![], vec![], vec![], now + 60),
                (
                    "spiffe://example.org/ns/b",
                    vec!["a"],
                    vec!["api.example.org", "*.svc.example.org"],
                    vec!["10.0.0.7", "fd00::1"],
                    ca.not_after() + 3600,
                ),
                // Long enough for multi-byte lengths in the SAN and the TBS.
                (
                    &long_path,
                    (0..20).map(|_| "role-x").collect(),
                    vec![],
                    vec![],
                    now + 300,
                ),
            ];
            for key in &keys {
                for (id, roles, dns, ips, not_after) in &cases {
                    let names = SanNames {
                        dns: dns.iter().map(|d| d.to_string()).collect(),
                        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
                    };
                    let params = LeafParams {
                        spiffe_id: SpiffeId::parse(id).unwrap(),
                        roles: roles.iter().map(|r| r.to_string()).collect(),
                        not_before: now - 30,
                        not_after: *not_after,
                        names,
                    };
                    let serial = Serial::random();
                    let not_after = params.not_after.min(ca.not_after());
                    let t = ca.template.as_ref().unwrap();
                    let ours = ca.write_leaf(t, key, &serial, &params, not_after).unwrap();
                    let theirs = ca.rcgen_leaf(key, &serial, &params, not_after).unwrap();
                    assert_eq!(
                        tbs_of(&ca, &ours),
                        tbs_of(&ca, &theirs),
                        "{oid} {id} {:?}",
                        key.algorithm()
                    );
                    // And what it says is what sign_leaf reports.
                    let signed = ca.sign_leaf(key, &params).unwrap();
                    assert_eq!(
                        parse_svid(&signed.der, ca.roles_oid()).unwrap(),
                        signed.svid
                    );
                }
            }
        }
    }

    #[test]
    fn oids_encode_as_x690_says() {
        assert_eq!(oid_content(&[2, 5, 29, 35]), vec![0x55, 0x1d, 0x23]);
        assert_eq!(
            oid_content(&[1, 2, 840, 10045, 2, 1]),
            vec![0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]
        );
        // A first subidentifier above 127 (2.999 = 1079).
        assert_eq!(oid_content(&[2, 999, 3]), vec![0x88, 0x37, 0x03]);
    }
}

#[cfg(test)]
mod crl_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rcgen::{CertificateRevocationListParams, RevokedCertParams};
    use x509_parser::prelude::{CertificateRevocationList, FromDer};

    use super::*;

    /// What rcgen wrote for the same CRL (the encoder `sign_crl` replaced), as a reference.
    fn rcgen_crl(
        ca: &Authority,
        revoked: &[(Vec<u8>, i64)],
        number: u64,
        this_update: i64,
        next_update: i64,
    ) -> Vec<u8> {
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(Serial::from_bytes(serial).as_bytes()),
                revocation_time: to_time(*at).unwrap(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        CertificateRevocationListParams {
            this_update: to_time(this_update).unwrap(),
            next_update: to_time(next_update).unwrap(),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca.issuer)
        .unwrap()
        .der()
        .to_vec()
    }

    /// Every field of two parsed CRLs, the signature aside (ECDSA signatures are randomized).
    fn assert_same_fields(
        ours: &CertificateRevocationList<'_>,
        theirs: &CertificateRevocationList<'_>,
    ) {
        let (a, b) = (&ours.tbs_cert_list, &theirs.tbs_cert_list);
        assert_eq!(a.version, b.version);
        assert_eq!(a.signature, b.signature);
        assert_eq!(ours.signature_algorithm, theirs.signature_algorithm);
        assert_eq!(a.issuer.as_raw(), b.issuer.as_raw());
        assert_eq!(a.this_update, b.this_update);
        assert_eq!(a.next_update, b.next_update);
        assert_eq!(a.revoked_certificates.len(), b.revoked_certificates.len());
        for (x, y) in a.revoked_certificates.iter().zip(&b.revoked_certificates) {
            assert_eq!(x.raw_serial(), y.raw_serial());
            assert_eq!(x.user_certificate, y.user_certificate);
            assert_eq!(x.revocation_date, y.revocation_date);
            assert_eq!(x.extensions(), y.extensions());
        }
        assert_eq!(a.extensions(), b.extensions());
        // Nothing else: the TBS is byte for byte what rcgen wrote.
        assert_eq!(a.as_ref(), b.as_ref());
    }

    #[test]
    fn the_hand_written_crl_is_what_rcgen_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let ca = Authority::load_or_create(dir.path(), &td, RolesOid::default()).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let y2050 = 2_524_608_000; // 2050-01-01T00:00:00Z: GeneralizedTime from here on.
        // (entries, CRL number, thisUpdate, nextUpdate)
        type Case = (Vec<(Vec<u8>, i64)>, u64, i64, i64);
        let cases: Vec<Case> = vec![
            // Empty: no revokedCertificates at all.
            (vec![], 0, now - 60, now + 3600),
            (
                vec![
                    // A leading high bit (a 0x00 goes in front), leading zeros (dropped), zero,
                    // a Lanyard serial and a 20-byte one.
                    (vec![0x80, 0x01, 0x02], now - 5),
                    (vec![0xff; 3], now),
                    (vec![0x00, 0x00, 0x7f, 0x10], 0),
                    (vec![0x00], now),
                    (Serial::random().as_bytes().to_vec(), now - 86_400 * 400),
                    (vec![0xc3; 20], y2050 - 1),
                    (vec![0x01; 20], y2050),
                    // Before 1950: GeneralizedTime too.
                    (vec![0x42], -700_000_000),
                ],
                u64::MAX,
                y2050 - 30,
                y2050 + 30,
            ),
            (
                (0..300u32)
                    .map(|i| (i.to_be_bytes().to_vec(), now - i64::from(i)))
                    .collect(),
                now as u64,
                now - 60,
                now + 86_400 * 365 * 30,
            ),
        ];
        for (revoked, number, this_update, next_update) in cases {
            let mut entries = CrlEntries::new();
            for (serial, at) in &revoked {
                entries.push(serial, *at).unwrap();
            }
            assert_eq!(entries.len(), revoked.len());
            let ours = ca
                .sign_crl_entries(entries, number, this_update, next_update)
                .unwrap();
            let theirs = rcgen_crl(&ca, &revoked, number, this_update, next_update);
            let (rest, a) = CertificateRevocationList::from_der(&ours).unwrap();
            assert!(rest.is_empty());
            let (_, b) = CertificateRevocationList::from_der(&theirs).unwrap();
            assert_same_fields(&a, &b);
            // The TBS is byte for byte rcgen's (assert_same_fields); only the randomized ECDSA
            // signature differs, and its DER length varies with r and s (69 to 72 bytes, rarely
            // less), so the whole CRLs' lengths are not compared.
            // The signature is the CA key's over exactly the TBS.
            let (_, cert) = X509Certificate::from_der(&ca.signing_cert).unwrap();
            let spki = cert.public_key().subject_public_key.data.as_ref();
            ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, spki)
                .verify(a.tbs_cert_list.as_ref(), a.signature_value.data.as_ref())
                .expect("signed by the CA key");
        }
    }

    #[test]
    fn a_crl_needs_a_later_next_update_and_a_representable_time() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let ca = Authority::load_or_create(dir.path(), &td, RolesOid::default()).unwrap();
        assert!(ca.sign_crl(&[], 1, 100, 100).is_err());
        let mut entries = CrlEntries::new();
        assert!(entries.push(&[1], 400_000_000_000).is_err());
        assert!(entries.push(&[1], -70_000_000_000).is_err());
        assert!(entries.is_empty());
    }
}
