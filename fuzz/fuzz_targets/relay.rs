//! The Workload API relay's client-to-server direction (`agent::uds::rewrite_client_frames`):
//! HTTP/2 frame splitting, HEADERS/CONTINUATION reassembly, padding and priority, and HPACK
//! decoding and re-encoding of every client header block. The input is what a local process
//! writes to the agent's socket.
//!
//! Invariants: the output (what reaches the gRPC server) is the preface followed by whole frames;
//! every header block the relay emits is in frames of at most 16 KiB, unpadded, ends with
//! END_HEADERS, decodes with one HPACK decoder for the connection, and carries no `:authority`
//! other than `localhost`.
#![no_main]

use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const MAX_FRAME: usize = 16_384;

fuzz_target!(|data: &[u8]| {
    let (result, out) = lanyard::fuzzing::relay(data);
    if out.is_empty() {
        assert!(
            result.is_err(),
            "the relay ended cleanly without forwarding the preface"
        );
        return;
    }
    assert!(
        out.starts_with(PREFACE),
        "output does not start with the preface"
    );
    check_frames(&out[PREFACE.len()..]);
});

fn check_frames(mut rest: &[u8]) {
    let mut decoder = loona_hpack::Decoder::new();
    // The header block being reassembled from relay-written HEADERS + CONTINUATION frames.
    let mut block: Option<(u32, Vec<u8>)> = None;
    while !rest.is_empty() {
        assert!(rest.len() >= 9, "a partial frame header reached the server");
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        assert!(
            rest.len() >= 9 + len,
            "a partial frame payload reached the server"
        );
        let payload = &rest[9..9 + len];
        rest = &rest[9 + len..];
        match (kind, block.as_mut()) {
            (HEADERS, None) => {
                assert!(len <= MAX_FRAME, "HEADERS frame of {len} bytes");
                assert_eq!(flags & PADDED, 0, "the relay re-emitted padding");
                let fragment = if flags & PRIORITY != 0 {
                    &payload[5..]
                } else {
                    payload
                };
                block = Some((stream, fragment.to_vec()));
            }
            (CONTINUATION, Some((s, b))) => {
                assert!(len <= MAX_FRAME, "CONTINUATION frame of {len} bytes");
                assert_eq!(*s, stream, "CONTINUATION on another stream");
                b.extend_from_slice(payload);
            }
            (_, Some(_)) => panic!("frame of type {kind} inside a relayed header block"),
            // Every other frame passes through untouched.
            (_, None) => continue,
        }
        if flags & END_HEADERS != 0
            && let Some((_, b)) = block.take()
        {
            let headers = decoder.decode(&b).unwrap_or_else(|e| {
                panic!("relay emitted a header block that does not decode: {e:?}")
            });
            for (name, value) in headers {
                if name == b":authority" {
                    assert_eq!(value, b"localhost", "authority was not rewritten");
                }
            }
        }
    }
    assert!(
        block.is_none(),
        "a relayed header block without END_HEADERS"
    );
}
