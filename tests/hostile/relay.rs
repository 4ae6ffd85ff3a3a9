//! Hostile inputs: the agent's Workload API relay (issue #11, item 1). A real `lanyard agent`
//! serves its socket; each test attacks it over a raw `UnixStream`, asserts the HTTP/2 refusal
//! (GOAWAY with the right code, then the connection closes), that the agent's peak memory
//! (`VmHWM`) barely moved and that a normal Workload API client is still served.
//!
//! The bombs are sized so that the code before the fix shows the unbounded decode without
//! taking the machine down: the one-frame bomb decodes to ~48 MB there, and the issue's larger
//! frames are only ever sent in part (the old relay waited for the rest, so never decoded them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use lanyard::pb::workload::{self as wl, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::common::{ChildGuard, TestCa, spawn_agent, wait_for_svid};

const ID: &str = "spiffe://example.org/ns/prod/relay";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const FRAME_SIZE_ERROR: u32 = 0x6;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The SETTINGS_MAX_FRAME_SIZE the agent advertises (h2's default).
const MAX_FRAME: usize = 16_384;
/// How much the agent's peak RSS may grow while it is attacked (it is ~48 MB per bomb before
/// the fix, and the 250,000-reference bomb of the issue took it to 990 MB).
const HWM_GROWTH_KB: u64 = 16 * 1024;

// === helpers ===

/// Starts an agent serving the Workload API; waits for its first certificate.
async fn agent(ca: &TestCa, name: &str, extra: &[&str]) -> (ChildGuard, PathBuf) {
    let token = ca.token(ID, &["db-read"], 0, 1).await;
    let out = ca.dir.path().join(name);
    let sock = ca.dir.path().join(format!("{name}.sock"));
    let mut args = vec!["--ttl", "10m", "--workload-socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let guard = spawn_agent(&ca.server(), &token, &out, &args);
    wait_for_svid(&out, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("agent {name} got no certificate: {}", guard.output()));
    (guard, sock)
}

/// A `/proc/<pid>/status` field in kB (`VmHWM`: peak resident set).
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A Workload API client watching FetchX509SVID (kept open while held), and its first message.
type Watch = (
    SpiffeWorkloadApiClient<tonic::transport::Channel>,
    tonic::Streaming<wl::X509svidResponse>,
);

/// Opens a FetchX509SVID watch over the socket, as go-spiffe or tonic clients do.
async fn watch_svid(sock: &Path) -> Result<(Watch, wl::X509svidResponse), String> {
    let path = sock.to_path_buf();
    let call = async move {
        let channel = tonic::transport::Endpoint::try_from("http://localhost")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
            }))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut req = tonic::Request::new(wl::X509svidRequest {});
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let mut stream = client
            .fetch_x509svid(req)
            .await
            .map_err(|e| format!("call: {e}"))?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|e| format!("stream: {e}"))?
            .ok_or_else(|| "empty stream".to_string())?;
        Ok(((client, stream), first))
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// One FetchX509SVID message; the connection closes after it.
async fn fetch_svid(sock: &Path) -> Result<wl::X509svidResponse, String> {
    watch_svid(sock).await.map(|(_, first)| first)
}

/// Asserts the agent is alive and serves a normal client.
async fn assert_serving(agent: &mut ChildGuard, sock: &Path) {
    assert!(agent.is_running(), "agent died:\n{}", agent.output());
    let svid = fetch_svid(sock)
        .await
        .unwrap_or_else(|e| panic!("normal client not served: {e}\n{}", agent.output()));
    assert_eq!(svid.svids[0].spiffe_id, ID);
}

fn frame(kind: u8, flags: u8, stream: u32, len: usize) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[..3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
    h[3] = kind;
    h[4] = flags;
    h[5..].copy_from_slice(&stream.to_be_bytes());
    h
}

/// Connects and sends the client preface and an empty SETTINGS frame.
async fn open(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, 0)).await.unwrap();
    s
}

/// One literal header with incremental indexing (`x-bomb`, a 4,000-octet value) followed by
/// `refs` one-octet references to it: a tiny block that decodes to `refs` × 4 KB.
fn bomb_block(refs: usize) -> Vec<u8> {
    let mut b = vec![0x40, 6];
    b.extend_from_slice(b"x-bomb");
    // 4000 as an HPACK integer with a 7-bit prefix: 127, then 3873 in base 128.
    b.extend_from_slice(&[0x7f, 0x80 | (3873 % 128) as u8, (3873 / 128) as u8]);
    b.extend(std::iter::repeat_n(b'a', 4000));
    // Index 62: the first dynamic table entry.
    b.extend(std::iter::repeat_n(0x80 | 62, refs));
    b
}

/// Reads server frames until a GOAWAY (returns its error code) or the end of the connection
/// (None); gives up after 5 s. Write errors and resets after the GOAWAY are fine.
async fn goaway_code(s: &mut UnixStream) -> Option<u32> {
    let read = async {
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            assert!(len <= 1 << 20, "absurd frame from the agent: {len} octets");
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.ok()?;
            if head[3] == GOAWAY {
                assert!(len >= 8, "short GOAWAY");
                return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or(None)
}

/// After a GOAWAY the agent closes the connection: reads reach EOF (or a reset) promptly.
async fn assert_closed(s: &mut UnixStream) {
    let drain = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("the agent closes the connection after its GOAWAY");
}

// === tests ===

#[tokio::test]
async fn hpack_bomb_in_one_frame_gets_goaway_and_memory_stays_bounded() {
    let ca = TestCa::start().await;
    let (mut agent, sock) = agent(&ca, "bomb", &[]).await;
    // A client already watching its SVID, on its own connection.
    let ((mut watcher, _stream), _) = watch_svid(&sock).await.unwrap();
    let before = status_kb(agent.pid(), "VmHWM");

    // 12,000 references fit one 16 KiB frame and decode to 48 MB; four connections at once.
    let block = bomb_block(12_000);
    assert!(block.len() <= MAX_FRAME);
    let bombs: Vec<_> = (0..4)
        .map(|_| {
            let (sock, block) = (sock.clone(), block.clone());
            tokio::spawn(async move {
                let mut s = open(&sock).await;
                s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, block.len()))
                    .await
                    .unwrap();
                s.write_all(&block).await.unwrap();
                assert_eq!(goaway_code(&mut s).await, Some(ENHANCE_YOUR_CALM));
                assert_closed(&mut s).await;
            })
        })
        .collect();
    for b in bombs {
        b.await.unwrap();
    }

    let grown = status_kb(agent.pid(), "VmHWM").saturating_sub(before);
    eprintln!("agent peak RSS growth: {grown} kB (from {before} kB)");
    assert!(
        grown < HWM_GROWTH_KB,
        "agent peak RSS grew by {grown} kB under the bomb"
    );
    assert_serving(&mut agent, &sock).await;
    // The watcher's connection was not touched: it still makes calls.
    let mut req = tonic::Request::new(wl::X509BundlesRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let bundles = tokio::time::timeout(Duration::from_secs(5), watcher.fetch_x509_bundles(req))
        .await
        .expect("in time")
        .expect("the existing connection still serves");
    drop(bundles);
}

#[tokio::test]
async fn the_issues_bomb_frames_are_refused_by_their_length() {
    let ca = TestCa::start().await;
    let (mut agent, sock) = agent(&ca, "bigbomb", &[]).await;
    assert_serving(&mut agent, &sock).await;
    let before = status_kb(agent.pid(), "VmHWM");

    // The issue's frame (250,000 references, ~254 KB) and a 2 MB one. Only the first 64 KiB of
    // each payload is sent: the fix answers on the frame header alone, and the code before it
    // waited for the rest (so the test fails there by timing out rather than by exhausting
    // this machine's memory).
    for refs in [250_000, 2 * 1024 * 1024] {
        let block = bomb_block(refs);
        let mut s = open(&sock).await;
        s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, block.len()))
            .await
            .unwrap();
        // The agent may already have closed; what it answered is what counts.
        let _ = s.write_all(&block[..64 * 1024]).await;
        assert_eq!(goaway_code(&mut s).await, Some(FRAME_SIZE_ERROR), "{refs}");
        assert_closed(&mut s).await;
    }

    let grown = status_kb(agent.pid(), "VmHWM").saturating_sub(before);
    eprintln!("agent peak RSS growth: {grown} kB (from {before} kB)");
    assert!(grown < HWM_GROWTH_KB, "agent peak RSS grew by {grown} kB");
    assert_serving(&mut agent, &sock).await;
}

#[tokio::test]
async fn a_frame_one_octet_over_the_max_frame_size_gets_frame_size_error() {
    let ca = TestCa::start().await;
    let (mut agent, sock) = agent(&ca, "bigframe", &[]).await;

    // A padded HEADERS frame of 16,385 octets holding a harmless request: nothing in it but
    // its length is wrong.
    let mut block = vec![0x83, 0x86, 0x04, 0x20]; // :method POST, :scheme http, :path (32)
    block.extend_from_slice(b"/SpiffeWorkloadAPI/FetchX509SVID");
    block.extend_from_slice(&[0x00, 5]);
    block.extend_from_slice(b"x-pad");
    let pad = 255usize;
    let value = MAX_FRAME + 1 - 1 - pad - block.len() - 3;
    block.extend_from_slice(&[
        0x7f,
        0x80 | ((value - 127) % 128) as u8,
        ((value - 127) / 128) as u8,
    ]);
    block.extend(std::iter::repeat_n(b'p', value));
    let mut payload = vec![pad as u8];
    payload.extend_from_slice(&block);
    payload.extend(std::iter::repeat_n(0, pad));
    assert_eq!(payload.len(), MAX_FRAME + 1);

    let mut s = open(&sock).await;
    s.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM | PADDED,
        1,
        payload.len(),
    ))
    .await
    .unwrap();
    let _ = s.write_all(&payload).await;
    assert_eq!(goaway_code(&mut s).await, Some(FRAME_SIZE_ERROR));
    assert_closed(&mut s).await;
    assert_serving(&mut agent, &sock).await;
}

/// The agent's `lanyard_agent_workload_api_connections` gauge, from its metrics listener.
async fn workload_connections(metrics: u16) -> Option<i64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", metrics))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("lanyard_agent_workload_api_connections "))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (up to 30 s: the agent frees a slot asynchronously, slowly on a loaded machine) until
/// the agent counts no open Workload API connection.
async fn until_no_connections(metrics: u16, agent: &ChildGuard) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while workload_connections(metrics).await != Some(0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        workload_connections(metrics).await,
        Some(0),
        "the agent still counts open connections:\n{}",
        agent.output()
    );
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_and_clients_are_served_once_they_go() {
    let ca = TestCa::start().await;
    let metrics = crate::common::free_port();
    let listen = format!("127.0.0.1:{metrics}");
    let (mut agent, sock) = agent(
        &ca,
        "cap",
        &[
            "--workload-max-connections",
            "4",
            "--metrics-listen",
            &listen,
        ],
    )
    .await;
    assert_serving(&mut agent, &sock).await;
    // assert_serving's own connections hold slots until the agent notices they closed.
    until_no_connections(metrics, &agent).await;

    // Two idle connections and two clients watching their SVID take every slot...
    let mut idle = Vec::new();
    let mut watching = Vec::new();
    for _ in 0..2 {
        idle.push(open(&sock).await);
        watching.push(watch_svid(&sock).await.unwrap().0);
    }
    // ...so the next ones are closed at once, before the server says anything.
    for _ in 0..3 {
        let mut s = UnixStream::connect(&sock).await.unwrap();
        let _ = s.write_all(PREFACE).await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("a connection over the cap is closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "served over the cap: {n:?}");
    }
    assert!(fetch_svid(&sock).await.is_err(), "served over the cap");

    // Once they go (the watchers with their streams still open), a normal client is served.
    // The agent frees a slot when it notices the close, asynchronously: wait for its count of
    // open connections to drop (on a loaded machine that took longer than a fixed retry
    // window), then the next client must be served at once.
    drop(idle);
    drop(watching);
    until_no_connections(metrics, &agent).await;
    let svid = fetch_svid(&sock)
        .await
        .unwrap_or_else(|e| panic!("not served after the connections closed: {e}"));
    assert_eq!(svid.svids[0].spiffe_id, ID);
    assert!(agent.is_running());
    let refusals = agent
        .output()
        .matches("workload API connection refused")
        .count();
    assert!(
        (1..=2).contains(&refusals),
        "refusals are logged once, then rate-limited: {refusals} lines\n{}",
        agent.output()
    );
}
