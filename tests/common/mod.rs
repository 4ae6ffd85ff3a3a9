//! Shared test helpers: a real CA server on 127.0.0.1:0 over a temp data dir, real TLS, real
//! gRPC. Every helper here is used by several test files; append new ones at the end.
#![allow(dead_code, unreachable_pub)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail loudly"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lanyard::ca::{RolesOid, SvidInfo};
use lanyard::client::{Credential, connect, csr_for, write_credential};
use lanyard::config::{Overrides, ServeSettings};
use lanyard::pb::v1::{self as pb, admin_client::AdminClient, ca_client::CaClient};
use lanyard::server::{Running, start};
use lanyard::spiffe::SpiffeId;
use lanyard::tls::{Bundle, ServerTrust, TlsSource, peer_svid};
use rcgen::KeyPair;
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::transport::Channel;

/// The default test policy.
pub const POLICY: &str = r#"
[[policy]]
spiffe_id = "spiffe://example.org/ns/prod/*"
roles = ["db-read", "deploy"]
max_ttl = "10m"

[[policy]]
spiffe_id = "spiffe://example.org/ns/dev/*"
roles = []
max_ttl = "5m"

[[policy]]
spiffe_id = "spiffe://example.org/auditor"
roles = ["lanyard:auditor"]
max_ttl = "1h"
"#;

/// A running CA for one test.
pub struct TestCa {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub settings: ServeSettings,
    pub config_path: PathBuf,
    /// Dropping it (with the TestCa) stops the server: its shutdown sender closes.
    running: Option<Running>,
}

impl TestCa {
    /// A CA for example.org with the default test policy and a 1 s TTL floor.
    pub async fn start() -> Self {
        Self::start_with("", POLICY).await
    }

    /// A CA with extra top-level settings (TOML lines) and the given policy section.
    pub async fn start_with(extra: &str, policy: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("lanyard.toml");
        let config = format!(
            "trust_domain = \"example.org\"\nlisten = \"127.0.0.1:0\"\nmin_ttl = \"1s\"\n{extra}\n{policy}"
        );
        std::fs::write(&config_path, config).expect("write config");
        Self::start_in(dir, config_path).await
    }

    /// (Re)starts a CA over an existing data dir and config.
    pub async fn start_in(dir: TempDir, config_path: PathBuf) -> Self {
        let settings = ServeSettings::resolve(
            Some(&config_path),
            Overrides {
                data_dir: Some(dir.path().join("data")),
                ..Overrides::default()
            },
        )
        .expect("settings");
        let running = start(settings.clone()).await.expect("server starts");
        Self {
            addr: running.addr,
            dir,
            settings,
            config_path,
            running: Some(running),
        }
    }

    /// Stops the server and waits for it; returns the data dir for a restart.
    pub async fn stop(mut self) -> (TempDir, PathBuf) {
        if let Some(r) = self.running.take() {
            let _ = r.shutdown.send(true);
            let _ = r.done.await;
        }
        (self.dir, self.config_path)
    }

    /// host:port of the server.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The admin credential directory the server wrote.
    pub fn admin_dir(&self) -> PathBuf {
        self.data_dir().join("admin")
    }

    /// The CA bundle.
    pub fn bundle(&self) -> Bundle {
        Bundle::from_pem(&std::fs::read(self.admin_dir().join("bundle.pem")).unwrap()).unwrap()
    }

    /// A channel presenting the credential in `dir`.
    pub async fn channel_as(&self, dir: &Path) -> Channel {
        let cred = Credential::load(dir, &RolesOid::default()).expect("credential loads");
        connect(
            &self.server(),
            ServerTrust::Bundle(cred.bundle.clone()),
            Some(cred.slot().unwrap()),
            RolesOid::default(),
        )
        .await
        .expect("connect")
    }

    /// A channel presenting the admin credential.
    pub async fn admin_channel(&self) -> Channel {
        self.channel_as(&self.admin_dir()).await
    }

    /// A channel with no client certificate.
    pub async fn anon_channel(&self) -> Channel {
        connect(
            &self.server(),
            ServerTrust::Bundle(self.bundle()),
            None,
            RolesOid::default(),
        )
        .await
        .expect("connect")
    }

    /// Mints a token through the Admin API.
    pub async fn token(
        &self,
        spiffe_id: &str,
        roles: &[&str],
        max_ttl_secs: u32,
        uses: u32,
    ) -> String {
        self.try_token(spiffe_id, roles, max_ttl_secs, 0, uses)
            .await
            .expect("token created")
    }

    /// Mints a token; returns the status on failure.
    pub async fn try_token(
        &self,
        spiffe_id: &str,
        roles: &[&str],
        max_ttl_secs: u32,
        expires_in_secs: u32,
        uses: u32,
    ) -> Result<String, tonic::Status> {
        let mut admin = AdminClient::new(self.admin_channel().await);
        admin
            .create_join_token(pb::CreateJoinTokenRequest {
                spiffe_id: spiffe_id.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                max_ttl_seconds: max_ttl_secs,
                expires_in_seconds: expires_in_secs,
                uses,
            })
            .await
            .map(|r| r.into_inner().token)
    }

    /// Issues with a token for `id`, from a fresh key; returns the key and the response.
    pub async fn issue(
        &self,
        token: &str,
        id: &str,
        ttl_secs: u32,
    ) -> Result<(KeyPair, pb::IssueResponse), tonic::Status> {
        let key = KeyPair::generate().unwrap();
        let csr = csr_for(&SpiffeId::parse(id).unwrap(), &key).unwrap();
        let resp = self.issue_csr(token, csr, ttl_secs).await?;
        Ok((key, resp))
    }

    /// Sends a raw CSR with a token over a channel without a client certificate.
    pub async fn issue_csr(
        &self,
        token: &str,
        csr: Vec<u8>,
        ttl_secs: u32,
    ) -> Result<pb::IssueResponse, tonic::Status> {
        let mut ca = CaClient::new(self.anon_channel().await);
        ca.issue(pb::IssueRequest {
            csr,
            join_token: token.into(),
            jwt: String::new(),
            ttl_seconds: ttl_secs,
            roles: vec![],
        })
        .await
        .map(|r| r.into_inner())
    }

    /// Issues with a fresh token and writes the credential to `<tmp>/<name>`.
    pub async fn enroll(&self, name: &str, id: &str, roles: &[&str], ttl_secs: u32) -> PathBuf {
        let token = self.token(id, roles, 600, 1).await;
        let (key, resp) = self.issue(&token, id, ttl_secs).await.expect("issue");
        let dir = self.dir.path().join(name);
        write_response(&dir, &resp, &key);
        dir
    }

    /// Renews the credential in `dir` with a new key; writes the result back.
    pub async fn renew(
        &self,
        dir: &Path,
        ttl_secs: u32,
    ) -> Result<pb::IssueResponse, tonic::Status> {
        let cred = Credential::load(dir, &RolesOid::default()).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = csr_for(&cred.svid.spiffe_id, &key).unwrap();
        let mut ca = CaClient::new(self.channel_as(dir).await);
        let resp = ca
            .issue(pb::IssueRequest {
                csr,
                join_token: String::new(),
                jwt: String::new(),
                ttl_seconds: ttl_secs,
                roles: vec![],
            })
            .await?
            .into_inner();
        write_response(dir, &resp, &key);
        Ok(resp)
    }
}

/// Writes an Issue response and its key as a credential directory.
pub fn write_response(dir: &Path, resp: &pb::IssueResponse, key: &KeyPair) {
    let chain: Vec<CertificateDer<'_>> = resp
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let bundle: Vec<CertificateDer<'_>> = resp
        .trust_bundle
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    write_credential(dir, &chain, &bundle, &key.serialize_pem()).unwrap();
}

/// Path of the built `lanyard` binary.
pub fn lanyard_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lanyard"))
}

impl TestCa {
    /// A CA from a complete config file (it must set `trust_domain`; `listen` defaults to
    /// 127.0.0.1:0 when absent). Unlike [`TestCa::start_with`] it adds no `min_ttl`, so a test
    /// can set its own floor.
    pub async fn start_with_full_config(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("lanyard.toml");
        let config = if config.lines().any(|l| l.trim_start().starts_with("listen")) {
            config.to_string()
        } else {
            format!("listen = \"127.0.0.1:0\"\n{config}")
        };
        std::fs::write(&config_path, config).expect("write config");
        Self::start_in(dir, config_path).await
    }
}

// === audit and revocation helpers (tests/audit.rs, tests/revocation.rs) ===

/// Reads a whole audit stream (`follow = false`) into records, failing on malformed hashes.
pub async fn drain_audit(
    mut stream: tonic::Streaming<pb::AuditEvent>,
) -> Vec<lanyard::store::AuditRecord> {
    let mut out = Vec::new();
    while let Some(ev) = stream.message().await.expect("audit stream ends cleanly") {
        out.push(lanyard::api::audit::from_proto(ev).expect("event hashes are 32 bytes"));
    }
    out
}

impl TestCa {
    /// The whole stored audit log, read through `Audit.Subscribe` as the admin.
    pub async fn audit_log(&self) -> Vec<lanyard::store::AuditRecord> {
        self.try_audit_log().await.expect("admin may subscribe")
    }

    /// [`TestCa::audit_log`], or the status that refused the read.
    pub async fn try_audit_log(&self) -> Result<Vec<lanyard::store::AuditRecord>, tonic::Status> {
        let mut client = pb::audit_client::AuditClient::new(self.admin_channel().await);
        let stream = client
            .subscribe(pb::SubscribeRequest {
                from_seq: 1,
                follow: false,
                kinds: vec![],
                spiffe_id: String::new(),
            })
            .await?
            .into_inner();
        Ok(drain_audit(stream).await)
    }
}

// === process and agent helpers (tests/agent.rs, tests/agent_interop.rs, tests/mtls.rs) ===

/// A child process that is stopped and reaped on drop, so a failing assertion never leaks it.
/// Its stdout and stderr go to `log`. Started in its own process group: dropping it signals the
/// whole group (nginx's workers, a shell's children), TERM first, then KILL.
pub struct ChildGuard {
    pub child: std::process::Child,
    pub name: String,
    pub log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and output appended to `log`.
    pub fn spawn(name: &str, cmd: &mut std::process::Command, log: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        use std::process::Stdio;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open child log");
        let err = out.try_clone().expect("clone log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
            log: log.to_path_buf(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (without blocking the runtime) up to `timeout` for the process to exit.
    pub async fn wait_exit(
        &mut self,
        timeout: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Everything the process wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (e.g. "TERM") to the process group (with the shell's `kill`, which is
    /// always there, unlike procps).
    pub fn signal_group(&self, signal: &str) {
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("kill -s {signal} -- -{}", self.child.id()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            // The leader is gone; make sure nothing it started lingers.
            self.signal_group("KILL");
            return;
        }
        self.signal_group("TERM");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                self.signal_group("KILL");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.signal_group("KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Environment variables the `lanyard` binary reads; cleared so the host cannot leak into a test.
pub const LANYARD_ENV_VARS: &[&str] = &[
    "LANYARD_SERVER",
    "LANYARD_CREDENTIAL",
    "LANYARD_SERVER_BUNDLE",
    "LANYARD_TOKEN",
    "LANYARD_JWT_FILE",
    "LANYARD_AGENT_CACHE_DIR",
    "LANYARD_CONFIG",
    "LANYARD_DATA_DIR",
    "LANYARD_LISTEN",
    "LANYARD_TRUST_DOMAIN",
    "LANYARD_KEK_FILE",
    "LANYARD_REPLICA_ID",
    "LANYARD_STORE",
    "LANYARD_ETCD_PREFIX",
    "LANYARD_ETCD_CA_FILE",
    "LANYARD_ETCD_CERT_FILE",
    "LANYARD_ETCD_KEY_FILE",
    "LANYARD_ROLES_OID",
    "LANYARD_LOG",
    "LANYARD_LOG_FORMAT",
    "RUST_LOG",
    "SPIFFE_ENDPOINT_SOCKET",
    "NO_COLOR",
    "LANYARD_AGENT_METRICS_LISTEN",
    // A proxy in the environment would route the CA's webhook and bundle fetches elsewhere.
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// A `lanyard` command with a clean environment.
pub fn lanyard_cmd() -> std::process::Command {
    let mut cmd = std::process::Command::new(lanyard_bin());
    for v in LANYARD_ENV_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// Starts `lanyard agent --server <server> --token <token> --out <out> <extra...>`, logging to
/// `<out>.log` (next to the directory, so the credential directory holds only what the agent
/// writes).
pub fn spawn_agent(server: &str, token: &str, out: &Path, extra: &[&str]) -> ChildGuard {
    let log = out.with_extension("log");
    let mut cmd = lanyard_cmd();
    cmd.args(["agent", "--server", server, "--token", token, "--out"])
        .arg(out)
        .args(extra);
    ChildGuard::spawn("lanyard agent", &mut cmd, &log)
}

/// Polls `f` every `every` until it returns `Some` or `timeout` passes.
pub async fn poll_until<T>(
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// What the leaf of a PEM chain says (None if the PEM does not parse).
pub fn pem_leaf_svid(cert_pem: &[u8]) -> Option<lanyard::ca::SvidInfo> {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .ok()?;
    lanyard::ca::parse_svid(chain.first()?, &RolesOid::default()).ok()
}

/// The SVID currently in a credential directory (one generation, through `..data`), once the
/// named links are there too (an agent's directory; `lanyard issue` writes plain files): a
/// first generation's `..data` is in place a moment before its `cert.pem`, `key.pem`, ...
/// links (made in that order, `federated` last of those always made), and tests go on to open
/// files by those names.
pub fn dir_svid(dir: &Path) -> Option<lanyard::ca::SvidInfo> {
    if dir.join("..data").exists() && !dir.join("federated").exists() {
        return None;
    }
    let (cert, _) = lanyard::agent::read_consistent(dir).ok()?;
    pem_leaf_svid(&cert)
}

/// Waits up to `timeout` for `dir` to hold a certificate; returns it.
pub async fn wait_for_svid(
    dir: &Path,
    timeout: std::time::Duration,
) -> Option<lanyard::ca::SvidInfo> {
    poll_until(timeout, std::time::Duration::from_millis(25), || {
        dir_svid(dir)
    })
    .await
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether an outside tool the test needs is present. When it is not: with `CI` set, panics
/// with `install` (what `.ci/run` must install); otherwise prints a loud skip and returns false.
pub fn require_tool(what: &str, present: bool, install: &str) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is missing on CI: .ci/run must {install}");
    }
    // Straight to stderr: libtest captures `eprintln!` of passing tests, and a skip must show.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n================ SKIPPED: {what} is not installed ({install} to run this test) ================\n"
    );
    false
}

/// Whether `python3` is here for the tests that run the Python scripts (see [`require_tool`]).
pub fn require_python3() -> bool {
    require_tool(
        "python3",
        command_works("python3", &["--version"]),
        "apt-get install python3",
    )
}

/// Whether `program args...` runs and exits 0.
pub fn command_works(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// === restart helper (tests/access.rs) ===

impl TestCa {
    /// Stops the server and starts a new one over the same data dir and config. The old server's
    /// background tasks let go of the store a moment after [`TestCa::stop`] returns, so the start
    /// is retried while the store is still locked (up to 10 s).
    pub async fn restart(self) -> Self {
        let (dir, config_path) = self.stop().await;
        let settings = ServeSettings::resolve(
            Some(&config_path),
            Overrides {
                data_dir: Some(dir.path().join("data")),
                ..Overrides::default()
            },
        )
        .expect("settings");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let running = loop {
            match start(settings.clone()).await {
                Ok(r) => break r,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("server restarts: {e:?}"),
            }
        };
        Self {
            addr: running.addr,
            dir,
            settings,
            config_path,
            running: Some(running),
        }
    }
}

// === an mTLS echo server built with lanyard::tls (tests/mtls.rs, tests/federation.rs) ===

/// What the server saw of one connection: the client's SVID, or why the handshake failed.
pub type Event = Result<SvidInfo, String>;

/// A mutual-TLS echo server: greets each client with `hello <client id> <client serial>`, then
/// echoes lines. Records every handshake.
pub struct EchoServer {
    pub addr: SocketAddr,
    events: Arc<Mutex<Vec<Event>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    pub async fn start(config: ServerConfig, source: Arc<TlsSource>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let log = events.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let source = source.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(e) => {
                            log.lock().unwrap().push(Err(e.to_string()));
                            return;
                        }
                    };
                    let Some(peer) = peer_svid(tls.get_ref().1.peer_certificates(), &source) else {
                        log.lock()
                            .unwrap()
                            .push(Err("accepted without a client SVID".into()));
                        return;
                    };
                    log.lock().unwrap().push(Ok(peer.clone()));
                    let mut conn = BufReader::new(tls);
                    let hello = format!("hello {} {}\n", peer.spiffe_id, peer.serial);
                    if conn.write_all(hello.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut line = String::new();
                    while conn.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                        if conn.write_all(line.as_bytes()).await.is_err() {
                            return;
                        }
                        line.clear();
                    }
                });
            }
        });
        Self { addr, events, task }
    }

    /// The handshake events recorded since index `from`.
    pub fn events_since(&self, from: usize) -> Vec<Event> {
        self.events.lock().unwrap()[from..].to_vec()
    }

    pub fn event_count(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// The last handshake event recorded, if any.
    pub fn last_event(&self) -> Option<Event> {
        self.events.lock().unwrap().last().cloned()
    }

    /// Waits for the server to record a handshake after index `from`; returns it.
    pub async fn next_event(&self, from: usize) -> Event {
        poll_until(
            std::time::Duration::from_secs(5),
            std::time::Duration::from_millis(10),
            || self.events_since(from).into_iter().next(),
        )
        .await
        .expect("the server recorded the handshake")
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A SPIFFE Workload API client on the agent's unix socket (tests/crl.rs, tests/federation.rs,
/// tests/operability.rs).
pub async fn workload_client(
    socket: &Path,
) -> lanyard::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<Channel> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .expect("connect to the Workload API");
    lanyard::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
}

pub mod etcd;

/// Commits `n` serial revocations (random serials, live for an hour) to the store of a stopped
/// CA whose data dir is `data`, through its audit log as `Revoke` commits them (1,000 per
/// event), so a test gets a large CRL without `n` RPCs; returns the serials in hex
/// (tests/revocation_large_crl.rs, tests/revocation_shared_crl.rs).
pub async fn commit_serial_revocations(data: &Path, n: usize) -> std::collections::HashSet<String> {
    use lanyard::audit::{AuditLog, Event, Kind};
    use lanyard::store::{RECORD_VERSION, RevocationRecord, SledStore, Store, Write};
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&data.join("store")).unwrap());
    let log = AuditLog::start(store.clone()).unwrap();
    let now = lanyard::tls::unix_now();
    let mut serials = std::collections::HashSet::new();
    for start in (0..n).step_by(1000) {
        let writes: Vec<Write> = (start..(start + 1000).min(n))
            .map(|i| {
                let serial = lanyard::ca::Serial::random().to_hex();
                serials.insert(serial.clone());
                Write::PutRevocation(RevocationRecord {
                    v: RECORD_VERSION,
                    rev: 0,
                    serial,
                    spiffe_id: format!("spiffe://example.org/ns/prod/w{}", i % 100),
                    identity_rule: false,
                    before: 0,
                    reason: "bulk".into(),
                    revoked_at: now,
                    expires_at: now + 3600,
                    blocked: false,
                    renewable: false,
                    origin: String::new(),
                })
            })
            .collect();
        log.record(
            Event::new(Kind::Revoked, "spiffe://example.org/lanyard/admin").reason("bulk"),
            writes,
        )
        .await
        .unwrap();
    }
    drop(log);
    // The audit writer's thread lets go of the store a moment after the log's last handle.
    poll_until(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(10),
        || (Arc::strong_count(&store) == 1).then_some(()),
    )
    .await
    .expect("the audit writer stops");
    serials
}
