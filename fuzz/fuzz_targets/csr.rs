//! CSR parsing and checks (`lanyard::ca::parse_csr`), the first thing the CA does with a request.
//!
//! The first input byte picks the mode. Even: the rest is the DER as sent. Odd: the rest drives a
//! CSR built and signed with rcgen (SANs, CA flag, key usages, extensions), so inputs get past
//! the self-signature check and reach the SAN and extension rules.
//!
//! Invariants: an accepted CSR asks for exactly one SPIFFE ID, in the CA's trust domain, that
//! re-parses to itself; a built CSR is accepted only if it has exactly one SAN, a URI, and does not
//! ask for CA=true; a CSR that has exactly that and nothing else is accepted.
#![no_main]

use std::sync::OnceLock;

use lanyard::ca::{MAX_CSR_BYTES, parse_csr};
use lanyard::spiffe::{SpiffeId, TrustDomain};
use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use rcgen::{
    CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
};

const TD: &str = "example.org";

fn keys() -> &'static [KeyPair; 2] {
    static KEYS: OnceLock<[KeyPair; 2]> = OnceLock::new();
    KEYS.get_or_init(|| {
        [
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key"),
            KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new(TD).expect("trust domain");
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check_any(rest, &td);
    } else if let Ok(Some(built)) = build(&mut Unstructured::new(rest)) {
        let accepted = check_any(&built.der, &td);
        if let Some(id) = &accepted {
            assert!(
                built.only_one_uri_san,
                "accepted a CSR with other SANs: {id}"
            );
            assert!(!built.asks_ca, "accepted a CSR asking for CA=true: {id}");
            assert_eq!(Some(id.as_str()), built.first_uri.as_deref());
        }
        if built.plain && built.valid_id_in_td {
            assert!(
                accepted.is_some(),
                "refused a plain CSR for {:?}",
                built.first_uri
            );
        }
    }
});

/// Parses `der`; checks what holds for any accepted CSR; returns the accepted SPIFFE ID.
fn check_any(der: &[u8], td: &TrustDomain) -> Option<SpiffeId> {
    match parse_csr(der, td) {
        Ok(csr) => {
            assert!(der.len() <= MAX_CSR_BYTES);
            assert!(csr.spiffe_id.is_in(td));
            let again = SpiffeId::parse(csr.spiffe_id.as_str()).expect("accepted ID re-parses");
            assert_eq!(again, csr.spiffe_id);
            Some(csr.spiffe_id)
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            None
        }
    }
}

struct Built {
    der: Vec<u8>,
    first_uri: Option<String>,
    only_one_uri_san: bool,
    asks_ca: bool,
    /// One URI SAN, no CA flag, no key usages, no extensions.
    plain: bool,
    valid_id_in_td: bool,
}

fn build(u: &mut Unstructured<'_>) -> ArbResult<Option<Built>> {
    let key = &keys()[usize::from(u.arbitrary::<bool>()?)];
    let mut p = CertificateParams::default();
    let mut uris = Vec::new();
    let mut others = 0;
    for _ in 0..u.int_in_range(0..=3)? {
        let text = match u.int_in_range(0..=2)? {
            0 => format!("spiffe://{TD}/{}", u.arbitrary::<&str>()?),
            1 => format!(
                "spiffe://{}/{}",
                u.arbitrary::<&str>()?,
                u.arbitrary::<&str>()?
            ),
            _ => u.arbitrary::<String>()?,
        };
        let Ok(ia5) = rcgen::string::Ia5String::try_from(text.clone()) else {
            return Ok(None);
        };
        let san = match u.int_in_range(0..=5)? {
            0 => SanType::DnsName(ia5),
            1 => SanType::Rfc822Name(ia5),
            2 => SanType::IpAddress(std::net::IpAddr::from(u.arbitrary::<[u8; 4]>()?)),
            _ => SanType::URI(ia5),
        };
        match &san {
            SanType::URI(_) => uris.push(text),
            _ => others += 1,
        }
        p.subject_alt_names.push(san);
    }
    // rcgen cannot put basicConstraints in a CSR itself, so it goes in as a raw extension.
    let asks_ca = match u.int_in_range(0..=3)? {
        0 => {
            p.custom_extensions.push(basic_constraints(true));
            true
        }
        1 => {
            p.custom_extensions.push(basic_constraints(false));
            false
        }
        _ => false,
    };
    const USAGES: [KeyUsagePurpose; 4] = [
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::KeyEncipherment,
    ];
    for usage in USAGES {
        if u.ratio(1, 8)? {
            p.key_usages.push(usage);
        }
    }
    for eku in [
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::CodeSigning,
    ] {
        if u.ratio(1, 8)? {
            p.extended_key_usages.push(eku);
        }
    }
    for _ in 0..u.int_in_range(0..=2)? {
        let arcs: Vec<u64> = [1, 3, 6, 1, 4, 1]
            .into_iter()
            .chain([
                u64::from(u.arbitrary::<u16>()?),
                u64::from(u.arbitrary::<u8>()?),
            ])
            .collect();
        let mut ext = CustomExtension::from_oid_content(&arcs, u.arbitrary::<Vec<u8>>()?);
        ext.set_criticality(u.arbitrary()?);
        p.custom_extensions.push(ext);
    }
    let Ok(csr) = p.serialize_request(key) else {
        return Ok(None);
    };
    let first_uri = uris.first().cloned();
    let valid_id_in_td = first_uri
        .as_deref()
        .and_then(|s| SpiffeId::parse(s).ok())
        .is_some_and(|id| id.trust_domain_name() == TD);
    Ok(Some(Built {
        der: csr.der().to_vec(),
        only_one_uri_san: uris.len() == 1 && others == 0,
        plain: uris.len() == 1
            && others == 0
            && p.key_usages.is_empty()
            && p.extended_key_usages.is_empty()
            && p.custom_extensions.is_empty(),
        first_uri,
        asks_ca,
        valid_id_in_td,
    }))
}

/// A basicConstraints extension (OID 2.5.29.19) with the given CA flag.
fn basic_constraints(ca: bool) -> CustomExtension {
    let content = if ca {
        vec![0x30, 0x03, 0x01, 0x01, 0xff]
    } else {
        vec![0x30, 0x00]
    };
    CustomExtension::from_oid_content(&[2, 5, 29, 19], content)
}
