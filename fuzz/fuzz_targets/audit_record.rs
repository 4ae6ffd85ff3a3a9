//! Decoding of stored records (`lanyard::store`'s JSON values: audit records, tokens,
//! enrollments, issued certificates, revocations, access requests), of a `lanyard audit tail
//! --json` export as `lanyard audit verify --file` reads it (one audit record per line), and of an
//! audit event as it arrives over gRPC (`api::audit::from_proto`). Then hash-chain verification.
//!
//! Invariants: every record that decodes re-encodes to JSON that decodes to an equal record, with
//! its hashes printed as the hex that was read; verifying an export never panics, and the same
//! records re-chained (hashes recomputed from the first record's seq and prev_hash) verify,
//! unless they reach seq u64::MAX, which is refused.
#![no_main]

use lanyard::audit::{ChainError, compute_hash, verify_chain};
use lanyard::store::{
    AccessRecord, AuditRecord, Enrollment, IssuedRecord, RevocationRecord, TokenRecord,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    round_trip::<TokenRecord>(data);
    round_trip::<Enrollment>(data);
    round_trip::<IssuedRecord>(data);
    round_trip::<RevocationRecord>(data);
    round_trip::<AccessRecord>(data);
    if let Some(r) = round_trip::<AuditRecord>(data) {
        check_hex(data, &r);
    }

    // An export: one record per line, blank lines skipped, the first bad line ends it.
    let mut records = Vec::new();
    for line in data.split(|b| *b == b'\n') {
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<AuditRecord>(line) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
    }
    check_chain(&mut records);

    if let Ok(event) = lanyard::pb::v1::AuditEvent::decode(data)
        && let Some(r) = lanyard::api::audit::from_proto(event)
    {
        check_chain(&mut vec![r]);
    }
});

fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let value: T = serde_json::from_slice(data).ok()?;
    let json = serde_json::to_vec(&value).expect("a decoded record encodes");
    let back: T = serde_json::from_slice(&json).expect("an encoded record decodes");
    assert_eq!(back, value);
    Some(value)
}

/// The hashes of a decoded audit record print back as the hex that was stored.
fn check_hex(data: &[u8], r: &AuditRecord) {
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    for (field, bytes) in [("prev_hash", &r.prev_hash), ("hash", &r.hash)] {
        if let Some(stored) = obj.get(field).and_then(|v| v.as_str()) {
            let printed: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(
                stored.to_ascii_lowercase(),
                printed,
                "{field} is not canonical hex"
            );
        }
    }
}

fn check_chain(records: &mut [AuditRecord]) {
    let Some(first) = records.first() else {
        return;
    };
    let (start, prev) = (first.seq, first.prev_hash);
    let _ = verify_chain(records.iter(), start, prev);
    // Re-chain: consecutive seqs from `start`, each hash over the record and its predecessor.
    let mut prev_hash = prev;
    for (i, r) in records.iter_mut().enumerate() {
        let Some(seq) = start.checked_add(i as u64) else {
            return;
        };
        r.seq = seq;
        r.prev_hash = prev_hash;
        r.hash = compute_hash(r);
        prev_hash = r.hash;
    }
    let result = verify_chain(records.iter(), start, prev);
    match start.checked_add(records.len() as u64) {
        Some(next) => assert_eq!(result, Ok((next, prev_hash)), "a re-chained log verifies"),
        // The last record has seq u64::MAX: no real log reaches it.
        None => assert_eq!(result, Err(ChainError::SeqOverflow)),
    }
}
