//! Accepting every SPIFFE client on the Workload API's unix socket.
//!
//! gRPC's C core (Python, Ruby, C++) and grpc-java send the socket path as the HTTP/2
//! `:authority`, which the `h2` server rejects as a malformed authority (RST_STREAM
//! PROTOCOL_ERROR; hyperium/h2 PR 487 is still open). The authority means nothing on a unix
//! socket, so each connection goes through a small relay that re-encodes every client header
//! block with `:authority: localhost` and passes all other frames through untouched.
//!
//! The relay parses what any local process sends before the gRPC server (and its security
//! header check) sees it, so it enforces the limits the server advertises itself: frames of at
//! most [`MAX_FRAME_SIZE`] octets (refused on the frame header, before the payload is read),
//! encoded header blocks of at most [`MAX_HEADER_BLOCK`] octets, header lists that decode to at
//! most [`MAX_HEADER_LIST_SIZE`] octets (counted while decoding, never materialized past it) and
//! an HPACK table of at most [`HEADER_TABLE_SIZE`] octets. A client that breaks one gets a GOAWAY
//! with the matching HTTP/2 error code and the connection ends; other connections are unaffected.
//!
//! Memory per connection is therefore bounded at about 256 KiB in the relay: two 64 KiB duplex
//! buffers, one client frame (16 KiB), one header block (16 KiB), one decoded list (16 KiB of
//! fields, at most 512 of them) and its re-encoding, two 4 KiB HPACK tables and a 16 KiB copy
//! buffer for the server's frames.

use std::time::Duration;

use loona_hpack::decoder::DecoderError;
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tracing::debug;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// SETTINGS_MAX_FRAME_SIZE of the Workload API server (h2's default, set explicitly where the
/// server is built): the relay refuses longer client frames and never sends longer ones.
pub(crate) const MAX_FRAME_SIZE: u32 = 16_384;
/// SETTINGS_MAX_HEADER_LIST_SIZE of the Workload API server (hyper's default, set explicitly
/// where the server is built), counted as RFC 9113 §6.5.2 does: name + value + 32 per field.
pub(crate) const MAX_HEADER_LIST_SIZE: u32 = 16_384;
/// Largest encoded header block (HEADERS + CONTINUATION fragments). An encoder never needs more
/// octets than the list it encodes (a field costs at least 32 octets decoded, and its name and
/// value plus a few octets encoded), so this turns away no list the server would accept.
const MAX_HEADER_BLOCK: usize = MAX_HEADER_LIST_SIZE as usize;
/// SETTINGS_HEADER_TABLE_SIZE of the server (RFC 7541's 4,096, never changed): the most a
/// client's HPACK encoder may grow the relay's decoder table to.
const HEADER_TABLE_SIZE: usize = 4_096;
/// Bytes buffered in each direction between the relay and the gRPC server.
const DUPLEX_BUFFER: usize = 64 * 1024;
/// How long the relay tries to hand a GOAWAY to a client that does not read before closing.
const GOAWAY_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_FRAME: usize = MAX_FRAME_SIZE as usize;

/// Why the relay ended a client connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum RelayError {
    /// Reading from the client or writing to the server failed, or the client hung up mid-frame.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The connection did not open with the HTTP/2 client preface.
    #[error("not an HTTP/2 connection")]
    Preface,
    /// A client frame is longer than [`MAX_FRAME_SIZE`].
    #[error("frame of {0} octets exceeds the maximum frame size")]
    FrameSize(usize),
    /// Frames out of order or malformed (padding, priority, a stray or foreign CONTINUATION).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The header block does not decode, or resizes the HPACK table past [`HEADER_TABLE_SIZE`].
    #[error("header block does not decode: {0}")]
    Compression(DecoderError),
    /// The encoded header block is longer than [`MAX_HEADER_BLOCK`].
    #[error("header block exceeds {MAX_HEADER_BLOCK} octets")]
    BlockTooLarge,
    /// The header list decodes to more than [`MAX_HEADER_LIST_SIZE`].
    #[error("header list exceeds {MAX_HEADER_LIST_SIZE} octets")]
    ListTooLarge,
}

// === impl RelayError ===

impl RelayError {
    /// The HTTP/2 error code (RFC 9113 §7) of the GOAWAY that tells the client why; `None` when
    /// the client does not speak HTTP/2 or is gone.
    ///
    /// Oversized header blocks and lists get ENHANCE_YOUR_CALM rather than PROTOCOL_ERROR:
    /// SETTINGS_MAX_HEADER_LIST_SIZE is advisory (RFC 9113 §6.5.2), so going over it breaks no
    /// rule, but no Workload API client sends 16 KiB of headers, and §7 names ENHANCE_YOUR_CALM
    /// for a peer generating excessive load. It ends the connection (not just the stream)
    /// because the relay stopped keeping the fields and would have nothing to forward.
    pub(crate) fn goaway_code(&self) -> Option<u32> {
        match self {
            RelayError::Io(_) | RelayError::Preface => None,
            RelayError::Protocol(_) => Some(0x1),
            RelayError::FrameSize(_) => Some(0x6),
            RelayError::Compression(_) => Some(0x9),
            RelayError::BlockTooLarge | RelayError::ListTooLarge => Some(0xb),
        }
    }

    /// The error as `rewrite_client_frames` returns it.
    fn into_io(self) -> std::io::Error {
        match self {
            RelayError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// A decoded header field: name, value.
type Field = (Vec<u8>, Vec<u8>);

/// A GOAWAY the relay owes the client.
#[derive(Debug)]
struct GoAway {
    last_stream: u32,
    code: u32,
    reason: String,
}

/// Wraps an accepted unix connection; the returned stream is what the gRPC server should serve.
/// `slot` (one of the Workload API's connection slots) is held until the relay has ended.
pub(super) fn relay(stream: UnixStream, slot: OwnedSemaphorePermit) -> DuplexStream {
    let (server_side, relay_side) = tokio::io::duplex(DUPLEX_BUFFER);
    tokio::spawn(async move {
        let _slot = slot;
        let (mut client_r, mut client_w) = stream.into_split();
        let (mut relay_r, mut relay_w) = tokio::io::split(relay_side);
        let (goaway_tx, goaway_rx) = oneshot::channel();
        let up = async move {
            let mut last_stream = 0;
            let r = rewrite(&mut client_r, &mut relay_w, &mut last_stream).await;
            match r.as_ref().err().and_then(|e| Some((e, e.goaway_code()?))) {
                // The server side stays open until the GOAWAY is out, so that the server's
                // frames end at a frame boundary the GOAWAY can follow.
                Some((e, code)) => {
                    let _ = goaway_tx.send(GoAway {
                        last_stream,
                        code,
                        reason: e.to_string(),
                    });
                }
                None => {
                    let _ = relay_w.shutdown().await;
                }
            }
            r
        };
        let down = async move {
            let r = forward_server_frames(&mut relay_r, &mut client_w, goaway_rx).await;
            let _ = client_w.shutdown().await;
            r
        };
        tokio::pin!(up, down);
        let (up, down) = tokio::select! {
            u = &mut up => (Some(u), down.await),
            // The server is gone: nothing more can be relayed.
            d = &mut down => (None, d),
        };
        match up {
            Some(Err(e)) if e.goaway_code().is_some() => {
                debug!(error = %e, code = e.goaway_code(), "workload API client refused");
            }
            Some(Err(e)) => debug!(error = %e, "workload API connection ended"),
            _ => {}
        }
        if let Err(e) = down {
            debug!(error = %e, "workload API connection ended");
        }
    });
    server_side
}

/// Re-encodes every client header block read from `r` (see the module docs) and writes the
/// client's frames to `w`, until the client closes. An `InvalidData` error wraps the
/// [`RelayError`] that should end the connection. The entry point of the relay's fuzz target
/// ([`crate::fuzzing::relay`]); the relay itself calls `rewrite`.
pub(crate) async fn rewrite_client_frames<R, W>(r: &mut R, w: &mut W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut last_stream = 0;
    rewrite(r, w, &mut last_stream)
        .await
        .map_err(RelayError::into_io)
}

/// [`rewrite_client_frames`], keeping in `last_stream` the highest stream whose headers reached
/// the server (the GOAWAY's last-stream-id).
async fn rewrite<R, W>(r: &mut R, w: &mut W, last_stream: &mut u32) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    r.read_exact(&mut preface).await?;
    if preface != PREFACE {
        return Err(RelayError::Preface);
    }
    w.write_all(&preface).await?;
    let mut decoder = Decoder::new();
    decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
    let mut encoder = Encoder::new();
    let mut payload = Vec::with_capacity(MAX_FRAME);
    loop {
        let mut head = [0u8; 9];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let (len, kind, flags, stream) = parse_head(&head);
        read_payload(r, len, &mut payload).await?;
        match kind {
            HEADERS => {}
            CONTINUATION => return Err(RelayError::Protocol("CONTINUATION without HEADERS")),
            _ => {
                w.write_all(&head).await?;
                w.write_all(&payload).await?;
                w.flush().await?;
                continue;
            }
        }
        if stream == 0 {
            return Err(RelayError::Protocol("HEADERS on stream 0"));
        }
        let (priority, mut block) = split_headers_payload(flags, &payload)?;
        let mut end_headers = flags & END_HEADERS != 0;
        while !end_headers {
            let mut chead = [0u8; 9];
            r.read_exact(&mut chead).await?;
            let (clen, ckind, cflags, cstream) = parse_head(&chead);
            if ckind != CONTINUATION || cstream != stream {
                return Err(RelayError::Protocol("expected CONTINUATION"));
            }
            if clen > MAX_FRAME {
                return Err(RelayError::FrameSize(clen));
            }
            if block.len().saturating_add(clen) > MAX_HEADER_BLOCK {
                return Err(RelayError::BlockTooLarge);
            }
            read_payload(r, clen, &mut payload).await?;
            block.extend_from_slice(&payload);
            end_headers = cflags & END_HEADERS != 0;
        }
        let headers = decode_limited(&mut decoder, &block)?;
        let encoded = encoder.encode(headers.iter().map(|(n, v)| {
            if n == b":authority" {
                (n.as_slice(), &b"localhost"[..])
            } else {
                (n.as_slice(), v.as_slice())
            }
        }));
        write_headers(
            w,
            stream,
            flags & (END_STREAM | PRIORITY),
            priority,
            &encoded,
        )
        .await?;
        *last_stream = (*last_stream).max(stream);
    }
}

/// Reads a `len`-octet frame payload into `buf`, refusing (before reading any of it) a frame
/// longer than the server allows.
async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    buf: &mut Vec<u8>,
) -> Result<(), RelayError> {
    if len > MAX_FRAME {
        return Err(RelayError::FrameSize(len));
    }
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(())
}

/// Decodes `block`, refusing a header list larger than [`MAX_HEADER_LIST_SIZE`].
///
/// loona-hpack's callback cannot stop the decoder, so past the limit the callback only stops
/// keeping fields: the rest of the block (at most [`MAX_HEADER_BLOCK`] octets, so at most as many
/// fields) costs a table lookup each, and allocates no more than the block's own literals. The
/// decoder's table stays in step with the client's, though the connection ends anyway.
fn decode_limited(decoder: &mut Decoder<'_>, block: &[u8]) -> Result<Vec<Field>, RelayError> {
    let mut size = 0usize;
    let mut over = false;
    let mut headers = Vec::new();
    decoder
        .decode_with_cb(block, |name, value| {
            if over {
                return;
            }
            size = size.saturating_add(name.len() + value.len() + 32);
            if size > MAX_HEADER_LIST_SIZE as usize {
                over = true;
                headers = Vec::new();
                return;
            }
            headers.push((name.into_owned(), value.into_owned()));
        })
        .map_err(RelayError::Compression)?;
    if over {
        return Err(RelayError::ListTooLarge);
    }
    Ok(headers)
}

/// Copies the server's frames to the client whole, so that a GOAWAY from the relay can go
/// between two of them; sends it when `goaway` delivers one, and stops.
async fn forward_server_frames<R, W>(
    r: &mut R,
    w: &mut W,
    goaway: oneshot::Receiver<GoAway>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut goaway = Some(goaway);
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let mut head = [0u8; 9];
        // `read` is cancel-safe: when the GOAWAY wins, no server octet was consumed.
        let got = match goaway.as_mut() {
            Some(rx) => tokio::select! {
                biased;
                g = rx => match g {
                    Ok(g) => return send_goaway(w, &g).await,
                    Err(_) => {
                        goaway = None;
                        continue;
                    }
                },
                n = r.read(&mut head) => n?,
            },
            None => r.read(&mut head).await?,
        };
        if got == 0 {
            return Ok(());
        }
        r.read_exact(&mut head[got..]).await?;
        w.write_all(&head).await?;
        let (mut left, ..) = parse_head(&head);
        while left > 0 {
            let want = left.min(buf.len());
            let n = r.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            w.write_all(&buf[..n]).await?;
            left -= n;
        }
        w.flush().await?;
    }
}

/// Writes `g` as a GOAWAY frame; a client that does not take it within [`GOAWAY_TIMEOUT`] is
/// just closed.
async fn send_goaway<W: AsyncWrite + Unpin>(w: &mut W, g: &GoAway) -> std::io::Result<()> {
    let mut payload = Vec::with_capacity(8 + g.reason.len());
    payload.extend_from_slice(&(g.last_stream & 0x7fff_ffff).to_be_bytes());
    payload.extend_from_slice(&g.code.to_be_bytes());
    payload.extend_from_slice(g.reason.as_bytes());
    let send = async {
        write_frame(w, GOAWAY, 0, 0, &payload).await?;
        w.flush().await
    };
    tokio::time::timeout(GOAWAY_TIMEOUT, send)
        .await
        .unwrap_or(Ok(()))
}

fn parse_head(h: &[u8; 9]) -> (usize, u8, u8, u32) {
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    (len, h[3], h[4], stream)
}

/// Returns the priority bytes (if any) and the header block fragment, padding removed.
fn split_headers_payload(flags: u8, p: &[u8]) -> Result<(Option<[u8; 5]>, Vec<u8>), RelayError> {
    let mut rest = p;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        let (&n, r) = rest
            .split_first()
            .ok_or(RelayError::Protocol("bad padding"))?;
        pad = usize::from(n);
        rest = r;
    }
    let priority = if flags & PRIORITY != 0 {
        let (pr, r) = rest
            .split_at_checked(5)
            .ok_or(RelayError::Protocol("bad priority"))?;
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
        .ok_or(RelayError::Protocol("bad padding"))?;
    Ok((priority, rest[..end].to_vec()))
}

async fn write_headers<W: AsyncWrite + Unpin>(
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

async fn write_frame<W: AsyncWrite + Unpin>(
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

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A literal (indexed) header with a 4,000-octet value, then `refs` references to it.
    fn bomb_block(refs: usize) -> Vec<u8> {
        let mut b = vec![0x40, 6];
        b.extend_from_slice(b"x-bomb");
        b.extend_from_slice(&[0x7f, 0x80 | (3873 % 128) as u8, (3873 / 128) as u8]);
        b.extend(std::iter::repeat_n(b'a', 4000));
        b.extend(std::iter::repeat_n(0x80 | 62, refs));
        b
    }

    async fn refusal(input: &[u8]) -> (RelayError, Vec<u8>) {
        let mut out = Vec::new();
        let mut last = 0;
        let e = rewrite(&mut &input[..], &mut out, &mut last)
            .await
            .expect_err("refused");
        (e, out)
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        for f in frames {
            input.extend_from_slice(f);
        }
        input
    }

    #[tokio::test]
    async fn a_header_list_decoding_past_the_limit_is_refused_and_not_forwarded() {
        let block = bomb_block(12_000);
        assert!(block.len() <= MAX_FRAME);
        let input = with_preface(&[frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)]);
        let (e, out) = refusal(&input).await;
        assert!(matches!(e, RelayError::ListTooLarge), "{e}");
        assert_eq!(e.goaway_code(), Some(0xb));
        assert_eq!(out, PREFACE, "nothing of the bomb reached the server");

        // Just under the limit passes: 4 references = 4 × (6 + 4000 + 32) < 16 KiB.
        let input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &bomb_block(3))]);
        let mut out = Vec::new();
        rewrite_client_frames(&mut &input[..], &mut out)
            .await
            .unwrap();
        let (len, ..) = parse_head(out[24..33].try_into().unwrap());
        let headers = Decoder::new().decode(&out[33..33 + len]).unwrap();
        assert_eq!(headers.len(), 4);
    }

    #[tokio::test]
    async fn a_frame_over_the_max_frame_size_is_refused_on_its_header() {
        // Only the frame header: the payload is never waited for.
        for kind in [0x0, HEADERS, CONTINUATION] {
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&[0, 0x40, 0x01, kind, 0, 0, 0, 0, 1]);
            let (e, out) = refusal(&input).await;
            assert!(matches!(e, RelayError::FrameSize(16_385)), "{e}");
            assert_eq!(e.goaway_code(), Some(0x6));
            assert_eq!(out, PREFACE);
        }
        // The same inside a header block.
        let mut input = with_preface(&[frame(HEADERS, 0, 1, &[0x82])]);
        input.extend_from_slice(&[0x20, 0, 0, CONTINUATION, END_HEADERS, 0, 0, 0, 1]);
        let (e, _) = refusal(&input).await;
        assert!(matches!(e, RelayError::FrameSize(0x20_0000)), "{e}");
    }

    #[tokio::test]
    async fn an_encoded_block_over_the_limit_across_continuations_is_refused() {
        let part = vec![0x82; 10_000];
        let input = with_preface(&[
            frame(HEADERS, 0, 1, &part),
            frame(CONTINUATION, END_HEADERS, 1, &part),
        ]);
        let (e, out) = refusal(&input).await;
        assert!(matches!(e, RelayError::BlockTooLarge), "{e}");
        assert_eq!(e.goaway_code(), Some(0xb));
        assert_eq!(out, PREFACE);
    }

    #[tokio::test]
    async fn hpack_table_growth_past_the_advertised_size_is_a_compression_error() {
        // A dynamic table size update to 4,097 (5-bit prefix: 31, then 4,066), then :method GET.
        let block = [0x3f, 0x80 | (4066 % 128) as u8, (4066 / 128) as u8, 0x82];
        let input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &block)]);
        let (e, _) = refusal(&input).await;
        assert!(matches!(e, RelayError::Compression(_)), "{e}");
        assert_eq!(e.goaway_code(), Some(0x9));
        // 4,096 itself is allowed.
        let block = [0x3f, 0x80 | (4065 % 128) as u8, (4065 / 128) as u8, 0x82];
        let input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &block)]);
        rewrite_client_frames(&mut &input[..], &mut Vec::new())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn frames_out_of_order_are_protocol_errors() {
        let cases = [
            vec![frame(CONTINUATION, END_HEADERS, 1, &[0x82])],
            vec![frame(HEADERS, 0, 1, &[0x82]), frame(0x0, 0, 1, &[])],
            vec![
                frame(HEADERS, 0, 1, &[0x82]),
                frame(CONTINUATION, END_HEADERS, 3, &[0x82]),
            ],
            vec![frame(HEADERS, END_HEADERS, 0, &[0x82])],
            vec![frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82])],
        ];
        for frames in cases {
            let (e, _) = refusal(&with_preface(&frames)).await;
            assert!(matches!(e, RelayError::Protocol(_)), "{e}");
            assert_eq!(e.goaway_code(), Some(0x1));
        }
    }

    #[tokio::test]
    async fn the_relay_sends_goaway_between_server_frames_closes_and_frees_its_slot() {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let (mut client, theirs) = UnixStream::pair().unwrap();
        let slot = slots.clone().try_acquire_owned().unwrap();
        let mut server = relay(theirs, slot);

        // The server speaks first; its frame reaches the client whole.
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        server.write_all(&settings).await.unwrap();
        let mut first = [0u8; 15];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(&first[..], &settings[..]);

        let mut enc = Encoder::new();
        let ok = enc.encode([(&b":method"[..], &b"POST"[..]), (b":path", b"/x")]);
        let input = with_preface(&[
            frame(HEADERS, END_HEADERS, 1, &ok),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &bomb_block(12_000)),
        ]);
        client.write_all(&input).await.unwrap();

        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("the relay closes the connection")
            .unwrap();
        let got = [&first[..], &got[..]].concat();
        let (len, kind, _, stream) = parse_head(got[15..24].try_into().unwrap());
        assert_eq!((kind, stream), (GOAWAY, 0));
        let goaway = &got[24..24 + len];
        assert_eq!(
            goaway[..4],
            1u32.to_be_bytes(),
            "last stream: the one forwarded"
        );
        assert_eq!(goaway[4..8], 0xbu32.to_be_bytes(), "ENHANCE_YOUR_CALM");
        assert_eq!(got.len(), 24 + len, "nothing after the GOAWAY");

        // The server side sees the connection end; the slot comes back.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut rest)).await;
        let slot = tokio::time::timeout(Duration::from_secs(5), slots.acquire())
            .await
            .expect("slot released");
        drop(slot);
    }
}
