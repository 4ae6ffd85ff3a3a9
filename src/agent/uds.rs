//! Accepting every SPIFFE client on the Workload API's unix socket.
//!
//! gRPC's C core (Python, Ruby, C++) and grpc-java send the socket path as the HTTP/2
//! `:authority`, which the `h2` server rejects as a malformed authority (RST_STREAM
//! PROTOCOL_ERROR; hyperium/h2 PR 487 is still open). The authority means nothing on a unix
//! socket, so each connection goes through a small relay that re-encodes every client header
//! block with `:authority: localhost` and passes all other frames through untouched.

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::UnixStream;
use tracing::debug;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE; the relay never sends larger frames.
const MAX_FRAME: usize = 16_384;
/// Refuse header blocks larger than this (a client that sends more is misbehaving).
const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// Wraps an accepted unix connection; the returned stream is what the gRPC server should serve.
pub(super) fn relay(stream: UnixStream) -> DuplexStream {
    let (server_side, relay_side) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut client_r, mut client_w) = stream.into_split();
        let (mut relay_r, mut relay_w) = tokio::io::split(relay_side);
        let up = async {
            let r = rewrite_client_frames(&mut client_r, &mut relay_w).await;
            let _ = relay_w.shutdown().await;
            r
        };
        let down = async {
            let r = tokio::io::copy(&mut relay_r, &mut client_w).await;
            let _ = client_w.shutdown().await;
            r
        };
        let (up, down) = tokio::join!(up, down);
        if let Err(e) = up.and(down.map(|_| ())) {
            debug!(error = %e, "workload API connection ended");
        }
    });
    server_side
}

pub(crate) async fn rewrite_client_frames<R, W>(r: &mut R, w: &mut W) -> std::io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut preface = [0u8; 24];
    r.read_exact(&mut preface).await?;
    if preface != PREFACE {
        return Err(invalid("not an HTTP/2 connection"));
    }
    w.write_all(&preface).await?;
    let mut decoder = Decoder::new();
    let mut encoder = Encoder::new();
    loop {
        let mut head = [0u8; 9];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let (len, kind, flags, stream) = parse_head(&head);
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        if kind != HEADERS {
            w.write_all(&head).await?;
            w.write_all(&payload).await?;
            w.flush().await?;
            continue;
        }
        let (priority, mut block) = split_headers_payload(flags, &payload)?;
        let mut end_headers = flags & END_HEADERS != 0;
        while !end_headers {
            let mut chead = [0u8; 9];
            r.read_exact(&mut chead).await?;
            let (clen, ckind, cflags, cstream) = parse_head(&chead);
            if ckind != CONTINUATION || cstream != stream {
                return Err(invalid("expected CONTINUATION"));
            }
            let mut more = vec![0u8; clen];
            r.read_exact(&mut more).await?;
            block.extend_from_slice(&more);
            if block.len() > MAX_HEADER_BLOCK {
                return Err(invalid("header block too large"));
            }
            end_headers = cflags & END_HEADERS != 0;
        }
        let headers = decoder
            .decode(&block)
            .map_err(|e| invalid(&format!("hpack: {e:?}")))?;
        let rewritten: Vec<(Vec<u8>, Vec<u8>)> = headers
            .into_iter()
            .map(|(n, v)| {
                if n == b":authority" {
                    (n, b"localhost".to_vec())
                } else {
                    (n, v)
                }
            })
            .collect();
        let encoded = encoder.encode(rewritten.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        write_headers(
            w,
            stream,
            flags & (END_STREAM | PRIORITY),
            priority,
            &encoded,
        )
        .await?;
    }
}

fn parse_head(h: &[u8; 9]) -> (usize, u8, u8, u32) {
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    (len, h[3], h[4], stream)
}

/// Returns the priority bytes (if any) and the header block fragment, padding removed.
fn split_headers_payload(flags: u8, p: &[u8]) -> std::io::Result<(Option<[u8; 5]>, Vec<u8>)> {
    let mut rest = p;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        let (&n, r) = rest.split_first().ok_or_else(|| invalid("bad padding"))?;
        pad = usize::from(n);
        rest = r;
    }
    let priority = if flags & PRIORITY != 0 {
        let (pr, r) = rest
            .split_at_checked(5)
            .ok_or_else(|| invalid("bad priority"))?;
        rest = r;
        let mut out = [0u8; 5];
        out.copy_from_slice(pr);
        Some(out)
    } else {
        None
    };
    let end = rest
        .len()
        .checked_sub(pad)
        .ok_or_else(|| invalid("bad padding"))?;
    Ok((priority, rest[..end].to_vec()))
}

async fn write_headers<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: &[u8],
) -> std::io::Result<()> {
    let mut first = Vec::with_capacity(block.len().min(MAX_FRAME) + 5);
    if let Some(p) = priority {
        first.extend_from_slice(&p);
    }
    let room = MAX_FRAME - first.len();
    let (head_part, mut rest) = block.split_at(block.len().min(room));
    first.extend_from_slice(head_part);
    let end = if rest.is_empty() { END_HEADERS } else { 0 };
    write_frame(w, HEADERS, flags | end, stream, &first).await?;
    while !rest.is_empty() {
        let (chunk, r) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = r;
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        write_frame(w, CONTINUATION, end, stream, chunk).await?;
    }
    w.flush().await
}

async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = payload.len();
    let mut head = [0u8; 9];
    head[0] = (len >> 16) as u8;
    head[1] = (len >> 8) as u8;
    head[2] = len as u8;
    head[3] = kind;
    head[4] = flags;
    head[5..9].copy_from_slice(&stream.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn authority_is_rewritten_and_other_frames_pass() {
        let mut enc = Encoder::new();
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"/tmp/agent.sock"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        ]);
        let mut input = PREFACE.to_vec();
        // SETTINGS frame (type 4), empty.
        input.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        // HEADERS split over HEADERS + CONTINUATION, padded.
        let (a, b) = block.split_at(5);
        let mut p = vec![2u8];
        p.extend_from_slice(a);
        p.extend_from_slice(&[0, 0]);
        let len = p.len() as u8;
        input.extend_from_slice(&[0, 0, len, HEADERS, PADDED | END_STREAM, 0, 0, 0, 1]);
        input.extend_from_slice(&p);
        input.extend_from_slice(&[0, 0, b.len() as u8, CONTINUATION, END_HEADERS, 0, 0, 0, 1]);
        input.extend_from_slice(b);

        let mut out = Vec::new();
        rewrite_client_frames(&mut input.as_slice(), &mut out)
            .await
            .unwrap();
        assert_eq!(&out[..24], PREFACE);
        assert_eq!(&out[24..33], &[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let (len, kind, flags, stream) = parse_head(out[33..42].try_into().unwrap());
        assert_eq!(
            (kind, flags, stream),
            (HEADERS, END_STREAM | END_HEADERS, 1)
        );
        let headers = Decoder::new().decode(&out[42..42 + len]).unwrap();
        assert!(headers.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
        assert!(headers.contains(&(
            b":path".to_vec(),
            b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec()
        )));
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let mut out = Vec::new();
        assert!(
            rewrite_client_frames(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &mut out)
                .await
                .is_err()
        );
    }
}
