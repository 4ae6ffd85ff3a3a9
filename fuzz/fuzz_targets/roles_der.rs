//! The roles extension: its DER (`SEQUENCE OF UTF8String`) as read from a certificate, the
//! certificate reader around it (`lanyard::ca::parse_svid`), and the strings that configure it
//! (the roles OID, certificate serials).
//!
//! The first input byte picks the mode: 0 decodes the rest as an extension value, 1 builds a role
//! list from the rest and encodes it, 2 parses the rest as a certificate, 3 parses it as an OID
//! and as a serial.
//!
//! Invariants: decoded roles are valid, sorted and unique, and decode(encode(roles)) == roles;
//! for any list of valid role names, decode(encode(list)) is the list sorted and de-duplicated,
//! and its encoding is canonical (encode(decode(der)) == der); an OID or serial prints back to
//! a string that parses to the same value.
#![no_main]

use lanyard::ca::{RolesOid, Serial, encode_roles, parse_svid};
use lanyard::fuzzing::decode_roles;
use lanyard::spiffe::{SpiffeId, normalize_roles, validate_role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            if let Ok(roles) = decode_roles(rest) {
                check_normalized(&roles);
                let der = encode_roles(&roles);
                assert_eq!(decode_roles(&der).expect("own encoding decodes"), roles);
            }
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let list: Vec<String> = text.split(',').map(str::to_string).collect();
            if list.iter().any(|r| validate_role(r).is_err()) {
                return;
            }
            let der = encode_roles(&list);
            let decoded = decode_roles(&der).expect("valid roles round-trip");
            assert_eq!(decoded, normalize_roles(&list).expect("valid roles"));
            assert_eq!(encode_roles(&decoded), der, "encoding is not canonical");
        }
        2 => {
            if let Ok(info) = parse_svid(rest, &RolesOid::default()) {
                check_normalized(&info.roles);
                let id = SpiffeId::parse(info.spiffe_id.as_str()).expect("re-parses");
                assert_eq!(id, info.spiffe_id);
                assert_eq!(Serial::from_bytes(info.serial.as_bytes()), info.serial);
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(oid) = RolesOid::parse(text) {
                assert!(oid.arcs().len() >= 2 && oid.arcs().iter().all(|a| *a < 1 << 28));
                assert_eq!(RolesOid::parse(&oid.to_string()).expect("re-parses"), oid);
            }
            if let Some(serial) = Serial::parse_hex(text) {
                assert!(serial.as_bytes().len() <= 20);
                assert_eq!(Serial::parse_hex(&serial.to_hex()), Some(serial.clone()));
                assert_eq!(Serial::parse_hex(&serial.to_string()), Some(serial));
            }
        }
    }
});

fn check_normalized(roles: &[String]) {
    for r in roles {
        validate_role(r).expect("decoded role is valid");
    }
    assert!(
        roles.windows(2).all(|w| w[0] < w[1]),
        "roles not sorted and unique"
    );
}
