//! `lanyard.v1.Revocation`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use http_body_util::StreamBody;
use hyper::body::Frame;
use prost::bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{broadcast, watch};
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::auth::ConnAuth;
use super::{Authenticator, status};
use crate::ca::{CaHandle, Serial};
use crate::pb::v1::{
    self as pb,
    revocation_server::{Revocation, RevocationServer},
    revoke_request::Target,
};
use crate::policy::ROLE_ADMIN;
use crate::revocation::Revocations;
use crate::spiffe::SpiffeId;
use crate::store::RevocationRecord;

/// The Revocation service.
pub struct RevocationService {
    revocations: Arc<Revocations>,
    /// The CAs in force: CRLs are signed by the active one.
    authority: CaHandle,
    auth: Authenticator,
    crl_validity: Duration,
    /// Ends watch streams when the server stops, so graceful shutdown does not wait forever.
    shutdown: watch::Receiver<bool>,
}

impl RevocationService {
    /// Wires the service.
    pub fn new(
        revocations: Arc<Revocations>,
        authority: CaHandle,
        auth: Authenticator,
        crl_validity: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            revocations,
            authority,
            auth,
            crl_validity,
            shutdown,
        }
    }
}

/// Converts a stored entry to its wire form.
pub fn to_proto(r: RevocationRecord) -> pb::RevocationEntry {
    pb::RevocationEntry {
        rev: r.rev,
        serial: r.serial,
        spiffe_id: r.spiffe_id,
        identity_rule: r.identity_rule,
        before: r.before,
        reason: r.reason,
        revoked_at: r.revoked_at,
        expires_at: r.expires_at,
        blocked: r.blocked,
        trust_domain: r.origin,
    }
}

#[tonic::async_trait]
impl Revocation for RevocationService {
    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let admin = self
            .auth
            .require_role(&req, &[ROLE_ADMIN])
            .map_err(status::auth)?;
        let b = req.into_inner();
        let actor = admin.spiffe_id.as_str();
        let reason = b.reason.trim();
        if reason.is_empty() {
            return Err(Status::invalid_argument("a reason is required (--reason)"));
        }
        if reason.len() > 1024 {
            return Err(Status::invalid_argument("reason is longer than 1024 bytes"));
        }
        let entries = match b.target {
            Some(Target::Serial(s)) => {
                if b.lift {
                    return Err(Status::invalid_argument(
                        "--lift applies to --spiffe-id, not --serial",
                    ));
                }
                let serial = Serial::parse_hex(&s).ok_or_else(|| {
                    Status::invalid_argument(format!("{s:?} is not a hex serial number"))
                })?;
                self.revocations.revoke_serial(actor, &serial, reason).await
            }
            Some(Target::SpiffeId(id)) => {
                let id =
                    SpiffeId::parse(&id).map_err(|e| Status::invalid_argument(e.to_string()))?;
                if b.lift {
                    self.revocations.lift(actor, &id, reason).await
                } else {
                    if crate::policy::is_reserved(&id)
                        && id.is_in(self.authority.active().trust_domain())
                    {
                        return Err(Status::invalid_argument(format!(
                            "{id} is reserved for the CA itself and cannot be revoked by identity: that would lock the CA out of its own admin API or serving identity for good. Revoke a leaked certificate by --serial instead (and if an identity rule on a reserved ID exists from an older version, stop the CA and run `lanyard admin recover`)"
                        )));
                    }
                    self.revocations.revoke_identity(actor, &id, reason).await
                }
            }
            None => {
                return Err(Status::invalid_argument(
                    "name a --serial or a --spiffe-id to revoke",
                ));
            }
        }
        .map_err(status::revocation)?;
        Ok(Response::new(pb::RevokeResponse {
            entries: entries.into_iter().map(to_proto).collect(),
        }))
    }

    async fn check(
        &self,
        req: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        self.auth.peer(&req, false).map_err(status::auth)?;
        let s = &req.get_ref().serial;
        let serial = Serial::parse_hex(s)
            .ok_or_else(|| Status::invalid_argument(format!("{s:?} is not a hex serial number")))?;
        let entry = self.revocations.check(&serial).map_err(status::store)?;
        Ok(Response::new(pb::CheckResponse {
            revoked: entry.is_some(),
            entry: entry.map(to_proto),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationEntry, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Any identity of this domain; and the CA of a federated domain (its serving identity,
        // `/lanyard/server`), which relays this CA's own revocations to its workloads.
        let caller = self.auth.peer_any_domain(&req).map_err(status::auth)?;
        let conn = req.extensions().get::<Arc<ConnAuth>>().cloned();
        let td = self.authority.active().trust_domain().to_string();
        let foreign = caller.spiffe_id.trust_domain_name() != td;
        if foreign && caller.spiffe_id.path() != "/lanyard/server" {
            return Err(Status::permission_denied(format!(
                "{} may not watch the revocations of {td}: of a federated domain, only its CA (spiffe://<td>/lanyard/server) may",
                caller.spiffe_id
            )));
        }
        // A federated CA gets this CA's own entries only: trust is not transitive.
        let relay = move |r: &RevocationRecord| !foreign || r.origin.is_empty();
        let since = req.get_ref().since;
        // Subscribe before the snapshot so nothing committed in between is missed.
        // Revocation commits only: watchers do not wake for every issuance.
        let live = self.revocations.live();
        // No task and no channel per stream: the stream itself reads the feed, so an idle
        // watcher (one per connected agent) costs the CA only its receiver.
        let state = WatchState {
            revocations: self.revocations.clone(),
            live,
            shutdown: self.shutdown.clone(),
            caller,
            conn,
            relay: Box::new(relay),
            sent: since,
            resync: true,
            pending: std::collections::VecDeque::new(),
            done: false,
        };
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            state,
            |mut st| async move {
                let item = st.next().await?;
                Some((item, st))
            },
        ))))
    }

    async fn get_crl(&self, req: Request<pb::GetCrlRequest>) -> Result<Response<pb::Crl>, Status> {
        let cas = self.authority.current();
        let der = self
            .revocations
            .crl(cas.active(), self.crl_validity)
            .map_err(status::revocation)?;
        let retiring = match cas.retiring() {
            Some(old) => vec![
                self.revocations
                    .crl(old, self.crl_validity)
                    .map_err(status::revocation)?,
            ],
            None => Vec::new(),
        };
        // Behind `SharedCrlServer` (how the CA serves this service) the answer goes out as the
        // cached CRL itself, not a copy: the message stays empty and the layer writes it.
        if req.extensions().get::<ShareCrl>().is_some() {
            let mut answer = Response::new(pb::Crl::default());
            answer.extensions_mut().insert(SharedCrl { der, retiring });
            return Ok(answer);
        }
        Ok(Response::new(pb::Crl {
            der: Bytes::from_owner(CrlDer(der)),
            retiring: retiring
                .into_iter()
                .map(|c| Bytes::from_owner(CrlDer(c)))
                .collect(),
        }))
    }
}

/// The gRPC path of `Revocation.GetCrl`.
const GET_CRL_PATH: &str = "/lanyard.v1.Revocation/GetCrl";

/// Request marker: the `GetCrl` handler may answer with [`SharedCrl`] (a
/// [`SharedCrlServer`] in front of it writes the message).
#[derive(Debug, Clone, Copy)]
struct ShareCrl;

/// A `GetCrl` answer as the cache holds it: the CRLs (DER) to send, shared with the cache.
#[derive(Debug, Clone)]
struct SharedCrl {
    der: Arc<Vec<u8>>,
    retiring: Vec<Arc<Vec<u8>>>,
}

/// A cached CRL as a `Bytes` that holds it instead of copying it.
struct CrlDer(Arc<Vec<u8>>);

impl AsRef<[u8]> for CrlDer {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl SharedCrl {
    /// The gRPC message (the 5-byte length prefix, then a `Crl` as prost encodes it) in
    /// pieces: the small headers are written here, each CRL is the cached buffer itself. At a
    /// million revocations a CRL is 36 MB, and tonic encodes a message into a buffer of its
    /// own per call, held until the client has read it: N callers at once held N copies.
    fn into_chunks(self) -> Result<Vec<Bytes>, Status> {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        // `Crl`: bytes der = 1 (left out when empty, as proto3 encodes a default), repeated
        // bytes retiring = 2 (every element, empty or not).
        let der = (!self.der.is_empty()).then_some((1, self.der));
        let fields: Vec<(u32, Arc<Vec<u8>>)> = der
            .into_iter()
            .chain(self.retiring.into_iter().map(|r| (2, r)))
            .collect();
        let len: usize = fields
            .iter()
            .map(|(tag, v)| key_len(*tag) + encoded_len_varint(v.len() as u64) + v.len())
            .sum();
        // tonic's own limit and wording for a message past the 4-byte length prefix.
        let Ok(prefix) = u32::try_from(len) else {
            return Err(Status::resource_exhausted(format!(
                "Cannot return body with more than 4GB of data but got {len} bytes"
            )));
        };
        let mut chunks = Vec::with_capacity(2 * fields.len() + 1);
        let mut head = BytesMut::with_capacity(5 + 16);
        // Not compressed (flag 0). The CA is built without tonic's compression features, so
        // tonic never compresses an answer either; and the flag is per message, so an
        // uncompressed message is valid whatever `grpc-encoding` the headers name.
        head.put_u8(0);
        head.put_u32(prefix);
        for (tag, value) in fields {
            encode_key(tag, WireType::LengthDelimited, &mut head);
            encode_varint(value.len() as u64, &mut head);
            chunks.push(head.split().freeze());
            if !value.is_empty() {
                chunks.push(Bytes::from_owner(CrlDer(value)));
            }
        }
        if !head.is_empty() {
            chunks.push(head.freeze());
        }
        Ok(chunks)
    }
}

/// `lanyard.v1.Revocation` as the CA serves it: the generated server, with `GetCrl` answers
/// written from the cached CRL. Everything else about a `GetCrl` call (decoding the request,
/// the handler and its errors, the response headers) is the generated server's; only a
/// successful answer's body is replaced, by the same message in shared pieces and the same
/// trailers (`grpc-status: 0`). Any other call passes through untouched.
#[derive(Debug, Clone)]
pub struct SharedCrlServer<S> {
    inner: S,
}

impl SharedCrlServer<RevocationServer<RevocationService>> {
    /// Wraps the generated server (configured as the caller wants).
    pub fn new(inner: RevocationServer<RevocationService>) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for SharedCrlServer<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for SharedCrlServer<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let get_crl = req.uri().path() == GET_CRL_PATH;
        if get_crl {
            req.extensions_mut().insert(ShareCrl);
        }
        let answer = self.inner.call(req);
        Box::pin(async move {
            let mut resp = answer.await?;
            let Some(crl) = get_crl
                .then(|| resp.extensions_mut().remove::<SharedCrl>())
                .flatten()
            else {
                return Ok(resp);
            };
            let chunks = match crl.into_chunks() {
                Ok(c) => c,
                Err(status) => return Ok(status.into_http()),
            };
            // The trailers tonic ends a successful answer with (`grpc-status: 0`).
            let mut trailers = http::HeaderMap::new();
            if let Err(status) = Status::ok("").add_header(&mut trailers) {
                return Ok(status.into_http());
            }
            let frames = chunks
                .into_iter()
                .map(Frame::data)
                .chain(std::iter::once(Frame::trailers(trailers)))
                .map(Ok::<_, std::convert::Infallible>);
            let body = StreamBody::new(futures_util::stream::iter(frames));
            Ok(resp.map(|_| tonic::body::Body::new(body)))
        })
    }
}

/// Whether entry `r` (this CA's own, not relayed) revokes `svid`.
fn covers(r: &RevocationRecord, svid: &crate::ca::SvidInfo) -> bool {
    if !r.origin.is_empty() {
        return false;
    }
    if r.identity_rule {
        r.spiffe_id == svid.spiffe_id.as_str() && (r.blocked || svid.not_before < r.before)
    } else {
        r.serial.eq_ignore_ascii_case(&svid.serial.to_hex())
    }
}

/// Entries a `Revocation.Watch` reads from the store at once while catching up.
const WATCH_PAGE: usize = 1024;

/// One `Revocation.Watch` stream: a snapshot from the store, then the revocation feed.
struct WatchState {
    revocations: Arc<Revocations>,
    live: broadcast::Receiver<Option<Arc<crate::audit::Committed>>>,
    shutdown: watch::Receiver<bool>,
    /// The certificate that authenticated the caller when the stream opened.
    caller: crate::ca::SvidInfo,
    /// The connection's authentication state: a renewal on the connection since the stream
    /// opened makes the certificate it issued the one that counts (decision 65).
    conn: Option<Arc<ConnAuth>>,
    /// Whether an entry goes to this caller (a federated CA gets this CA's own only).
    relay: Box<dyn Fn(&RevocationRecord) -> bool + Send + Sync>,
    /// The highest revision sent.
    sent: u64,
    /// Read the store from `sent` before following the feed (at start, and after lagging).
    resync: bool,
    pending: std::collections::VecDeque<Result<pb::RevocationEntry, Status>>,
    done: bool,
}

impl WatchState {
    /// The next message, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Result<pb::RevocationEntry, Status>> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Some(m);
            }
            if self.done {
                return None;
            }
            if self.resync {
                self.resync = false;
                // A page at a time, each sent before the next is read: a watcher from 0 over a
                // million entries holds a page, not the whole store, and a slow reader holds
                // nothing more than its page.
                match self.revocations.page(self.sent, WATCH_PAGE) {
                    Ok(page) if page.is_empty() => {}
                    Ok(page) => {
                        self.resync = true;
                        for r in page {
                            self.sent = self.sent.max(r.rev);
                            if (self.relay)(&r) {
                                self.pending.push_back(Ok(to_proto(r)));
                            }
                        }
                    }
                    Err(e) => {
                        self.done = true;
                        self.pending.push_back(Err(status::store(e)));
                    }
                }
                continue;
            }
            let c = tokio::select! {
                c = self.live.recv() => c,
                () = crate::server::stopped(&mut self.shutdown) => return None,
            };
            match c {
                Ok(None) | Err(broadcast::error::RecvError::Lagged(_)) => self.resync = true,
                Err(broadcast::error::RecvError::Closed) => return None,
                Ok(Some(c)) => {
                    if c.record.seq <= self.sent {
                        continue;
                    }
                    for r in c.revocations.iter().filter(|r| (self.relay)(r)) {
                        self.pending.push_back(Ok(to_proto(r.clone())));
                    }
                    if !c.revocations.is_empty() {
                        self.sent = c.record.seq;
                    }
                    // The certificate that authenticates this connection now (the newest one a
                    // renewal bound to it, else the one it opened with) is revoked (by serial
                    // or identity): after the entries that say so, the stream ends, as every
                    // later call on the connection is refused, so a revoked credential cannot
                    // keep listening.
                    // Judged from the entries in hand, not the store: 10,000 watchers must not
                    // cost 10,000 store reads per revocation.
                    if c.revocations.is_empty() {
                        continue;
                    }
                    let current = self.conn.as_ref().and_then(|c| c.bound_svid());
                    let current = current.as_ref().unwrap_or(&self.caller);
                    if let Some(r) = c.revocations.iter().find(|r| covers(r, current)) {
                        self.done = true;
                        self.pending
                            .push_back(Err(Status::failed_precondition(format!(
                                "certificate {} is revoked: {}",
                                current.serial, r.reason
                            ))));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::audit::{AuditLog, Event, Kind};
    use crate::store::{RECORD_VERSION, SledStore, Store, Write};
    use crate::tls::unix_now;

    fn entry(serial: String) -> RevocationRecord {
        RevocationRecord {
            v: RECORD_VERSION,
            rev: 0,
            serial,
            spiffe_id: "spiffe://example.org/ns/a".into(),
            identity_rule: false,
            before: 0,
            reason: "key leak".into(),
            revoked_at: unix_now(),
            expires_at: unix_now() + 600,
            blocked: false,
            renewable: false,
            origin: String::new(),
        }
    }

    /// A client decodes a `Crl` into slices of the buffer the answer arrived in (tonic hands the
    /// decoder a `BytesMut`), so a 36 MB CRL is held once, not twice, while it is taken in.
    #[test]
    fn a_decoded_crl_shares_the_buffer_it_arrived_in() {
        let message = pb::Crl {
            der: vec![0x30; 5_000].into(),
            retiring: vec![vec![0x31; 300].into()],
        };
        let wire = Bytes::from(prost::Message::encode_to_vec(&message));
        let decoded: pb::Crl = prost::Message::decode(wire.clone()).unwrap();
        assert_eq!(decoded, message);
        let inside = |b: &Bytes| wire.as_ptr_range().contains(&b.as_ptr());
        assert!(inside(&decoded.der) && inside(&decoded.retiring[0]));
    }

    /// A shared `GetCrl` answer is, byte for byte, the gRPC message tonic writes for the same
    /// `Crl` encoded by prost: the 5-byte prefix (uncompressed, big-endian length), then the
    /// fields; an empty `der` left out, every `retiring` element kept, lengths of one to four
    /// varint bytes. Each CRL goes out as the cached buffer itself, not a copy.
    #[test]
    fn a_shared_crl_answer_is_the_message_tonic_and_prost_write() {
        let bytes = |n: usize| -> Vec<u8> { (0..n).map(|i| (i * 7 + n) as u8).collect() };
        let cases: Vec<(Vec<u8>, Vec<Vec<u8>>)> = vec![
            (Vec::new(), Vec::new()),
            (bytes(10), Vec::new()),
            (Vec::new(), vec![bytes(5)]),
            (bytes(300), vec![Vec::new(), bytes(20_000)]),
            (bytes(3 << 20), vec![bytes(200)]),
        ];
        for (der, retiring) in cases {
            let message = pb::Crl {
                der: der.clone().into(),
                retiring: retiring.iter().cloned().map(Bytes::from).collect(),
            };
            let mut expected = vec![0u8];
            expected
                .extend_from_slice(&(prost::Message::encoded_len(&message) as u32).to_be_bytes());
            expected.extend_from_slice(&prost::Message::encode_to_vec(&message));
            let der = Arc::new(der);
            let retiring: Vec<Arc<Vec<u8>>> = retiring.into_iter().map(Arc::new).collect();
            let chunks = SharedCrl {
                der: der.clone(),
                retiring: retiring.clone(),
            }
            .into_chunks()
            .unwrap();
            assert_eq!(chunks.concat(), expected, "der {} bytes", der.len());
            // The CRLs are shared, not copied: a chunk points into each one's own buffer.
            for crl in std::iter::once(&der).chain(&retiring) {
                if !crl.is_empty() {
                    assert!(chunks.iter().any(|c| c.as_ptr() == crl.as_ptr()));
                }
            }
        }
    }

    /// A watcher from 0 over more entries than a page gets every one once, in rev order, and
    /// then follows the live feed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_from_zero_streams_every_page_then_follows_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let revocations = Arc::new(Revocations::new(
            AuditLog::start(store).unwrap(),
            Duration::from_secs(5),
            Duration::from_secs(60),
        ));
        // Commits of 700 entries: pages of 1024 end on whole commits, so they hold 1400.
        let mut expected = Vec::new();
        for c in 0..4u32 {
            let writes: Vec<Write> = (0..700u32)
                .map(|i| Write::PutRevocation(entry(format!("{:08x}", c * 1000 + i + 1))))
                .collect();
            expected.extend((0..700u32).map(|i| format!("{:08x}", c * 1000 + i + 1)));
            revocations
                .log()
                .record(Event::new(Kind::Revoked, "test"), writes)
                .await
                .unwrap();
        }
        let (_stop, shutdown) = watch::channel(false);
        let mut st = WatchState {
            revocations: revocations.clone(),
            live: revocations.live(),
            shutdown,
            caller: crate::ca::SvidInfo {
                spiffe_id: SpiffeId::parse("spiffe://example.org/ns/watcher").unwrap(),
                roles: vec![],
                serial: Serial::from_bytes(&[0x77]),
                not_before: unix_now() - 10,
                not_after: unix_now() + 60,
            },
            conn: None,
            relay: Box::new(|_| true),
            sent: 0,
            resync: true,
            pending: std::collections::VecDeque::new(),
            done: false,
        };
        let mut got = Vec::new();
        let mut last_rev = 0;
        while got.len() < expected.len() {
            let e = st.next().await.unwrap().unwrap();
            assert!(e.rev >= last_rev);
            last_rev = e.rev;
            got.push(e.serial);
            // Never more than a page (here: two commits) read ahead of what was sent.
            assert!(st.pending.len() <= 1400);
        }
        assert_eq!(got, expected);
        // The live feed after the store: a new revocation arrives, nothing is repeated.
        revocations
            .log()
            .record(
                Event::new(Kind::Revoked, "test"),
                vec![Write::PutRevocation(entry("0000ffff".into()))],
            )
            .await
            .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), st.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(next.serial, "0000ffff");
    }
}
