//! `lanyard serve`: load the CA, open the store, start the audit writer, mint the server's own
//! certificate and the local admin credential, then serve gRPC over TLS until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::access::{Access, AccessSettings, Notifier};
use crate::api::access::AccessService;
use crate::api::limit::DenialLimiter;
use crate::api::refusals::RefusalLayer;
use crate::api::{
    Authenticator,
    admin::AdminService,
    audit::AuditService,
    ca::CaService,
    revocation::{RevocationService, SharedCrlServer},
};
use crate::audit::{AuditLog, Event, Kind};
use crate::ca::{Authority, CaError, Kek, SanNames};
use crate::client::write_credential;
use crate::config::{ServeSettings, Transport};
use crate::federation::{
    BundleHub, RelayContext, serve_bundle_endpoint, spawn_refreshers, spawn_revocation_relays,
};
use crate::fsutil::{create_private_dir, write_atomic};
use crate::issuance::{Issuance, Settings};
use crate::net::{AcceptBackoff, Admission, Caps, Conn, TrackRequestsLayer, read_preface};
use crate::pb::v1::{
    access_server::AccessServer, admin_server::AdminServer, audit_server::AuditServer,
    ca_server::CaServer, revocation_server::RevocationServer,
};
use crate::policy::{PolicyHandle, ROLE_ADMIN, is_reserved};
use crate::replicas::Replicas;
use crate::revocation::Revocations;
use crate::rotation::{Rotation, RotationError, Timing};
use crate::spiffe::SpiffeId;
use crate::store::{SledStore, Store};
use crate::tls::{Bundle, CertSlot, DeferredClientVerifier, provider, unix_now};

/// Largest gRPC message the server decodes. CSRs are ~300 bytes; nothing legitimate is close.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How often the server PINGs an HTTP/2 connection that has been quiet, to find dead peers
/// (a vanished agent's watch streams would otherwise hold its connection forever).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// How long a PING may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2 receive window per stream. Requests are a CSR or a small query; the agent's watch
/// streams send nothing after their request, so a large window only lets a client park data
/// in the CA's memory.
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// HTTP/2 receive window per connection (all its streams).
pub const CONNECTION_WINDOW: u32 = 128 * 1024;
/// Concurrent streams one connection may open. An agent holds two watches and, now and then, a
/// renewal or a CRL fetch on its one connection; without a cap hyper accepts any number, each a
/// task and buffers on the server.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Largest decoded header list a request may carry (hyper refuses larger ones itself).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// How many scheduler ticks a runtime worker of `lanyard serve` runs between looks at tokio's
/// global queue: every tick. An issuance is answered by the audit writer's thread, outside the
/// runtime, so the tasks it wakes (the answers) land in the global queue, while a loaded
/// worker's own queue keeps filling with new requests. Looking there first finishes started
/// requests before it takes up new ones (design decision 125).
pub const GLOBAL_QUEUE_INTERVAL: u32 = 1;

/// Sets `builder` up as `lanyard serve` runs its runtime (see [`GLOBAL_QUEUE_INTERVAL`]); for
/// the CLI and for benchmarks that serve in-process.
pub fn tune_runtime(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    builder.global_queue_interval(GLOBAL_QUEUE_INTERVAL)
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(String),
    /// Another `lanyard serve` (or `admin recover`) holds the data dir's store.
    #[error("data dir {0} is in use by another lanyard serve (its store is locked); stop it first")]
    InUse(PathBuf),
    /// Data directory or credential file I/O.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// TLS set-up failed.
    #[error("tls: {0}")]
    Tls(String),
    /// Issuing the server's own credentials failed.
    #[error("issuing local credential: {0}")]
    Credential(String),
    /// The listener could not bind.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// Federation state (bundles under `<data_dir>/federation`) could not be loaded.
    #[error("federation: {0}")]
    Federation(String),
    /// The CA rotation state (`<data_dir>/ca/rotation.json`) could not be loaded.
    #[error("CA rotation: {0}")]
    Rotation(String),
}

/// A running server.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// The bundle endpoint's bound address, when `bundle_endpoint_listen` is set.
    pub bundle_endpoint: Option<SocketAddr>,
    /// The metrics listener's bound address, when `metrics_listen` is set.
    pub metrics: Option<SocketAddr>,
    /// Trips shutdown.
    pub shutdown: watch::Sender<bool>,
    /// Finishes when the server has stopped.
    pub done: tokio::task::JoinHandle<()>,
}

/// The identity the server presents.
pub fn server_id(settings: &ServeSettings) -> Result<SpiffeId, ServeError> {
    settings
        .trust_domain
        .id("/lanyard/server")
        .map_err(|e| ServeError::Credential(e.to_string()))
}

/// Runs the server until `shutdown` resolves.
pub async fn run(
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let running = start(settings).await?;
    let tx = running.shutdown.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let _ = running.done.await;
    Ok(())
}

/// Starts the server and returns once it is listening.
pub async fn start(settings: ServeSettings) -> Result<Running, ServeError> {
    // Each phase only adds to what the one before it made, so a failure leaves no more state
    // behind than that phase's predecessors wrote.
    let listeners = Listeners::bind(&settings).await?;
    let state = State::open(&settings)?;
    let core = Core::load(&settings, &state).await?;
    let slot = CertSlot::new();
    let server_not_after =
        issue_own_credentials(&settings, &state, &core, &slot, listeners.addr).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let limiter = Arc::new(DenialLimiter::new(
        settings.denial_rate,
        settings.denial_burst,
    ));
    let (background, conn_rx) = spawn_background(
        &settings,
        &state,
        &core,
        &slot,
        listeners,
        server_not_after,
        &limiter,
        &shutdown_rx,
    )?;
    let mut stop = shutdown_rx.clone();
    let signal = async move {
        stopped(&mut stop).await;
    };
    let serving = grpc_server(
        &settings,
        &state,
        &core,
        limiter,
        conn_rx,
        signal,
        &shutdown_rx,
    )
    .await?;
    let (addr, bundle_endpoint, metrics) = (
        background.addr,
        background.bundle_endpoint,
        background.metrics,
    );
    write_addr_file(&state.data, "serve.addr", addr)?;
    info!(%addr, trust_domain = %settings.trust_domain, data_dir = %state.data.display(), "lanyard CA listening");
    let (store, sweeper, tasks) = (state.store, core.sweeper, background.tasks);
    let attest_tasks = core.attest_tasks;
    let done = tokio::spawn(async move {
        if let Err(e) = serving.await {
            error!(error = %e, "server stopped with an error");
        }
        for task in tasks {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                warn!("a background task did not stop within 5s");
            }
        }
        if let Err(e) = store.flush() {
            error!(error = %e, "final flush failed");
        }
        sweeper.abort();
        for t in attest_tasks {
            t.abort();
        }
        info!("lanyard CA stopped");
    });
    Ok(Running {
        addr,
        bundle_endpoint,
        metrics,
        shutdown: shutdown_tx,
        done,
    })
}

/// Phase 1: every listening socket, bound before anything is written, so a port in use leaves
/// no CA key, credential or audit event behind. Also raises the open-file limit and fits the
/// connection caps into it.
struct Listeners {
    grpc: TcpListener,
    addr: SocketAddr,
    grpc_caps: Caps,
    bundle: Option<(TcpListener, SocketAddr, Caps)>,
    metrics: Option<(TcpListener, SocketAddr)>,
}

impl Listeners {
    async fn bind(settings: &ServeSettings) -> Result<Self, ServeError> {
        let transport = settings.transport;
        let (grpc_caps, bundle_caps) = crate::net::prepare_caps(
            Caps {
                total: transport.max_connections,
                per_source: transport.max_connections_per_source,
            },
            settings.bundle_endpoint_listen.map(|_| Caps {
                total: transport.bundle_endpoint_max_connections,
                per_source: transport.bundle_endpoint_max_connections_per_source,
            }),
        );
        let grpc = TcpListener::bind(settings.listen)
            .await
            .map_err(|e| ServeError::Bind(settings.listen, e))?;
        let addr = grpc
            .local_addr()
            .map_err(|e| ServeError::Bind(settings.listen, e))?;
        let bundle = match (settings.bundle_endpoint_listen, bundle_caps) {
            (Some(at), Some(caps)) => {
                let l = TcpListener::bind(at)
                    .await
                    .map_err(|e| ServeError::Bind(at, e))?;
                let bound = l.local_addr().map_err(|e| ServeError::Bind(at, e))?;
                Some((l, bound, caps))
            }
            _ => None,
        };
        let metrics = match settings.metrics_listen {
            Some(at) => {
                let l = crate::metrics::bind(at)
                    .await
                    .map_err(|e| ServeError::Bind(at, e))?;
                let bound = l.local_addr().map_err(|e| ServeError::Bind(at, e))?;
                Some((l, bound))
            }
            None => None,
        };
        Ok(Self {
            grpc,
            addr,
            grpc_caps,
            bundle,
            metrics,
        })
    }
}

/// Phase 2: the data dir, the store (locked: one server per data dir) and the audit log.
struct State {
    data: PathBuf,
    store: Arc<dyn Store>,
    log: AuditLog,
}

impl State {
    fn open(settings: &ServeSettings) -> Result<Self, ServeError> {
        let data = settings.data_dir.clone();
        create_private_dir(&data).map_err(|e| ServeError::Io(data.clone(), e))?;
        let store = open_store(settings)?;
        let log = AuditLog::start(store.clone()).map_err(|e| ServeError::Store(e.to_string()))?;
        Ok(Self { data, store, log })
    }
}

/// Phase 3: the CA (created on first start) and everything that decides: bundles,
/// revocations, policy, issuance, temporary access, the authenticator.
struct Core {
    rotation: Arc<Rotation>,
    cas: crate::ca::CaHandle,
    bundles: Arc<BundleHub>,
    revocations: Arc<Revocations>,
    policy: PolicyHandle,
    issuance: Arc<Issuance>,
    access: Arc<Access>,
    auth: Authenticator,
    replicas: Arc<Replicas>,
    sweeper: tokio::task::JoinHandle<()>,
    /// The attestors' key refresh loops (they hold no store).
    attest_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Core {
    async fn load(settings: &ServeSettings, state: &State) -> Result<Self, ServeError> {
        let log = &state.log;
        if settings.ca_rotation_overlap < settings.bundle_refresh_hint * 2 {
            warn!(
                overlap = %humantime::format_duration(settings.ca_rotation_overlap),
                refresh_hint = %humantime::format_duration(settings.bundle_refresh_hint),
                "ca_rotation_overlap is shorter than two bundle refresh hints: federated peers may not hold the new CA when it starts signing"
            );
        }
        let rotation = load_rotation(settings, log).await?;
        let cas = rotation.cas().clone();
        let bundles = BundleHub::open(
            &state.data.join("federation"),
            settings.trust_domain.clone(),
            cas.current().roots(),
            settings.bundle_refresh_hint,
            &settings
                .federation
                .iter()
                .map(|d| d.trust_domain.clone())
                .collect::<Vec<_>>(),
            log.clone(),
        )
        .await
        .map_err(|e| ServeError::Federation(e.to_string()))?;
        let revocations = new_revocations(settings, log);
        let relayed: Vec<_> = settings
            .federation
            .iter()
            .filter(|d| d.revocation_server.is_some())
            .map(|d| d.trust_domain.clone())
            .collect();
        revocations
            .retire_relayed(&relayed)
            .await
            .map_err(|e| ServeError::Store(e.to_string()))?;
        settings.warn_if_no_policy();
        let policy = PolicyHandle::new(settings.policy.clone());
        let issuance = new_issuance(settings, &cas, &policy, log, &revocations);
        let bundle =
            Bundle::new(cas.current().roots()).map_err(|e| ServeError::Tls(e.to_string()))?;
        let access = Access::load(
            log.clone(),
            policy.clone(),
            revocations.clone(),
            AccessSettings {
                request_ttl: settings.access_request_ttl,
                renewal_grace: settings.renewal_grace,
                trust_domain: settings.trust_domain.clone(),
            },
            Notifier {
                cmd: settings.access_notify_cmd.clone(),
                webhook: settings.access_webhook.clone(),
                webhook_ca_file: settings.access_webhook_ca_file.clone(),
            },
        )
        .map_err(|e| ServeError::Store(e.to_string()))?;
        issuance.set_access(access.clone());
        let attestors = Arc::new(crate::attest::Attestors::new(
            settings.attestors.clone(),
            settings.trust_domain.clone(),
        ));
        let attest_tasks = attestors.spawn_refresh();
        issuance.set_attestors(attestors);
        let sweeper = access.spawn_sweeper(Duration::from_secs(1));
        let auth = Authenticator::new(
            bundle,
            settings.roles_oid.clone(),
            settings.renewal_grace,
            revocations.clone(),
        )
        .with_federation(bundles.subscribe());
        let replicas = Arc::new(Replicas::new(
            state.store.clone(),
            &settings.replica_id,
            &settings.advertise_address,
            policy.clone(),
        ));
        Ok(Self {
            replicas,
            rotation,
            cas,
            bundles,
            revocations,
            policy,
            issuance,
            access,
            auth,
            sweeper,
            attest_tasks,
        })
    }
}

/// Phase 4: the server's serving certificate (into `slot`), the local admin credential, and the
/// `server_started` event. Returns the serving certificate's notAfter.
async fn issue_own_credentials(
    settings: &ServeSettings,
    state: &State,
    core: &Core,
    slot: &CertSlot,
    addr: SocketAddr,
) -> Result<i64, ServeError> {
    let sid = server_id(settings)?;
    let not_after = refresh_server_cert(
        &core.issuance,
        slot,
        &sid,
        settings.server_cert_ttl,
        &settings.server_names,
    )
    .await?;
    ensure_admin_credential(&core.issuance, settings, &settings.data_dir.join("admin")).await?;
    state
        .log
        .record(
            Event::new(Kind::ServerStarted, "lanyard")
                .subject(sid.as_str())
                .reason(format!(
                    "listening on {addr}; policy has {} rules",
                    settings.policy.len()
                )),
            vec![],
        )
        .await
        .map_err(|e| ServeError::Store(e.to_string()))?;
    Ok(not_after)
}

/// What phase 5 started.
struct Background {
    addr: SocketAddr,
    bundle_endpoint: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    /// Tasks that hold the store (through the audit log) or a listener: shutdown waits for
    /// them, so a restart in the same process finds the store unlocked.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Phase 5: the accept loops and every background task (federation, rotation, certificate
/// upkeep, pruning, refusal summaries, policy reload). Returns them and the stream of accepted
/// gRPC connections.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site: the phases of `start`"
)]
fn spawn_background(
    settings: &ServeSettings,
    state: &State,
    core: &Core,
    slot: &Arc<CertSlot>,
    listeners: Listeners,
    server_not_after: i64,
    limiter: &Arc<DenialLimiter>,
    shutdown_rx: &watch::Receiver<bool>,
) -> Result<(Background, Accepted), ServeError> {
    let transport = settings.transport;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(DeferredClientVerifier::new())
        .with_cert_resolver(slot.clone());
    tls.alpn_protocols = vec![b"h2".to_vec()];
    crate::tls::configure_ca_server(&mut tls).map_err(|e| ServeError::Tls(e.to_string()))?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let mut tasks = Vec::new();
    let mut bundle_endpoint = None;
    let grpc_admission = Admission::new("grpc", listeners.grpc_caps);
    let mut admissions = vec![("grpc", grpc_admission.clone())];
    if let Some((l, at, caps)) = listeners.bundle {
        write_addr_file(&state.data, "bundle_endpoint.addr", at)?;
        bundle_endpoint = Some(at);
        let admission = Admission::new("bundle_endpoint", caps);
        admissions.push(("bundle_endpoint", admission.clone()));
        tasks.push(tokio::spawn(serve_bundle_endpoint(
            l,
            slot.clone(),
            core.bundles.clone(),
            admission,
            transport,
            shutdown_rx.clone(),
        )));
    }
    let mut metrics = None;
    if let Some((l, at)) = listeners.metrics {
        write_addr_file(&state.data, "metrics.addr", at)?;
        metrics = Some(at);
        let exporter = crate::metrics::CaExporter::new(
            state.store.clone(),
            core.cas.clone(),
            core.bundles.clone(),
            core.access.clone(),
            admissions,
        );
        tasks.push(tokio::spawn(crate::metrics::serve(
            l,
            exporter,
            shutdown_rx.clone(),
        )));
    }
    tasks.extend(spawn_refreshers(
        core.bundles.clone(),
        settings.federation.clone(),
        settings.roles_oid.clone(),
        shutdown_rx.clone(),
    ));
    tasks.extend(spawn_revocation_relays(
        RelayContext {
            bundles: core.bundles.clone(),
            revocations: core.revocations.clone(),
            identity: slot.clone(),
            oid: settings.roles_oid.clone(),
        },
        &settings.federation,
        shutdown_rx.clone(),
    ));
    tasks.push(core.rotation.spawn(shutdown_rx.clone()));
    if is_shared(state.store.as_ref()) {
        // Replicas: publish this one in the registry, and apply the access records and
        // federated bundles the others change.
        tasks.push(core.replicas.spawn(shutdown_rx.clone()));
        tasks.push(core.access.spawn_follower(shutdown_rx.clone()));
        tasks.push(core.bundles.share(state.store.clone(), shutdown_rx.clone()));
    }
    tasks.push(tokio::spawn(
        follow_ca_changes(
            core.issuance.clone(),
            core.auth.clone(),
            core.bundles.clone(),
            slot.clone(),
            settings.clone(),
            shutdown_rx.clone(),
        )
        .instrument(info_span!("ca_changes")),
    ));
    let (conn_tx, conn_rx) = mpsc::channel(128);
    tasks.push(tokio::spawn(accept_loop(
        listeners.grpc,
        acceptor,
        grpc_admission,
        transport,
        conn_tx,
        shutdown_rx.clone(),
    )));
    let sid = server_id(settings)?;
    tasks.push(tokio::spawn(
        rotate_server_cert(
            core.issuance.clone(),
            slot.clone(),
            sid.clone(),
            settings.server_cert_ttl,
            settings.server_names.clone(),
            server_not_after,
            shutdown_rx.clone(),
        )
        .instrument(info_span!("rotate", spiffe_id = %sid)),
    ));
    tasks.push(tokio::spawn(maintain_admin(
        core.issuance.clone(),
        settings.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(prune_loop(
        state.store.clone(),
        settings.prune_interval,
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(record_suppressed_denials(
        limiter.clone(),
        state.log.clone(),
        settings.denial_rate,
        shutdown_rx.clone(),
    )));
    // Installed before the task is spawned, so an early SIGHUP reloads instead of killing the
    // process with the default action.
    let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot install SIGHUP handler; reloading on file change only");
            None
        }
    };
    tasks.push(tokio::spawn(policy_reload_loop(
        settings.clone(),
        core.policy.clone(),
        state.log.clone(),
        hup,
        shutdown_rx.clone(),
    )));
    Ok((
        Background {
            addr: listeners.addr,
            bundle_endpoint,
            metrics,
            tasks,
        },
        conn_rx,
    ))
}

/// Phase 6: the gRPC services behind the transport limits, the refusal budget and the
/// status-code rewrites, serving the accepted connections until `signal`.
async fn grpc_server<S: Future<Output = ()> + Send + 'static>(
    settings: &ServeSettings,
    state: &State,
    core: &Core,
    limiter: Arc<DenialLimiter>,
    conns: Accepted,
    signal: S,
    shutdown_rx: &watch::Receiver<bool>,
) -> Result<impl Future<Output = Result<(), tonic::transport::Error>> + Send + use<S>, ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    for name in SERVICE_NAMES {
        health_reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    tokio::spawn(not_serving_on_shutdown(
        health_reporter,
        shutdown_rx.clone(),
    ));
    // Both reflection versions: grpcurl up to 1.8 and many other tools speak only v1alpha. Only
    // the CA's own descriptors (and Health's): the Workload API is the agent's.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    Ok(tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // Fixed windows sized for small messages on mostly idle streams (no BDP probing).
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_adaptive_window(Some(false))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        // Outermost: it puts the TLS connect info back where tonic's `peer_certs` looks, which
        // the refusal layer reads.
        .layer(TrackRequestsLayer::<TlsInfo>::new())
        .layer(RefusalLayer::new(
            limiter,
            state.log.clone(),
            core.auth.clone(),
        ))
        .layer(tower::util::MapResponseLayer::new(
            crate::api::status::client_faults_keep_their_codes,
        ))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            CaServer::new(CaService::new(
                core.issuance.clone(),
                core.auth.clone(),
                core.bundles.clone(),
                shutdown_rx.clone(),
            ))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            AdminServer::new(AdminService::new(
                core.issuance.clone(),
                core.auth.clone(),
                core.bundles.clone(),
                core.rotation.clone(),
                core.replicas.clone(),
            ))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            AccessServer::new(AccessService::new(
                core.access.clone(),
                core.auth.clone(),
                shutdown_rx.clone(),
            ))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            AuditServer::new(AuditService::new(
                state.log.clone(),
                core.auth.clone(),
                shutdown_rx.clone(),
            ))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        // `GetCrl` answers share the cached CRL instead of a copy per call (decision 116).
        .add_service(SharedCrlServer::new(
            RevocationServer::new(RevocationService::new(
                core.revocations.clone(),
                core.cas.clone(),
                core.auth.clone(),
                settings.crl_validity,
                shutdown_rx.clone(),
            ))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        ))
        .serve_with_incoming_shutdown(ReceiverStream::new(conns), signal))
}

/// The gRPC services the CA serves, each reported by `grpc.health.v1.Health` (as is `""`, the
/// server as a whole).
pub const SERVICE_NAMES: [&str; 5] = [
    <CaServer<CaService> as NamedService>::NAME,
    <AdminServer<AdminService> as NamedService>::NAME,
    <AccessServer<AccessService> as NamedService>::NAME,
    <AuditServer<AuditService> as NamedService>::NAME,
    <RevocationServer<RevocationService> as NamedService>::NAME,
];

/// Turns every service's health to NOT_SERVING once shutdown starts, so probes and load
/// balancers stop sending work while in-flight calls drain.
async fn not_serving_on_shutdown(
    reporter: tonic_health::server::HealthReporter,
    mut shutdown: watch::Receiver<bool>,
) {
    stopped(&mut shutdown).await;
    for name in SERVICE_NAMES.into_iter().chain([""]) {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// Writes the bound address of a listener to `<data>/<name>`, for scripts and tests.
fn write_addr_file(data: &Path, name: &str, addr: SocketAddr) -> Result<(), ServeError> {
    let file = data.join(name);
    write_atomic(&file, addr.to_string().as_bytes(), 0o644).map_err(|e| ServeError::Io(file, e))
}

/// Opens the sled store under `data`; a store another process holds (a running server) is
/// named as such.
/// The configured store: sled under the data dir (locked: one server per dir), or etcd.
fn open_store(settings: &ServeSettings) -> Result<Arc<dyn Store>, ServeError> {
    let data = &settings.data_dir;
    if let crate::config::StoreChoice::Etcd(cfg) = &settings.store {
        tracing::info!(endpoints = ?cfg.endpoints, prefix = %cfg.prefix, "opening the etcd store");
        let store = crate::store::EtcdStore::open(cfg.clone())
            .map_err(|e| ServeError::Store(format!("etcd {:?}: {e}", cfg.endpoints)))?;
        return Ok(Arc::new(store));
    }
    let path = data.join("store");
    let store = SledStore::open(&path).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("could not acquire lock") {
            ServeError::InUse(data.to_path_buf())
        } else {
            ServeError::Store(msg)
        }
    })?;
    Ok(Arc::new(store))
}

/// The CA rotation state: the operator's CA files, the managed CAs under `<data_dir>/ca`, or
/// (replicas on a shared store) the managed CAs in the store, sealed under the KEK.
async fn load_rotation(
    settings: &ServeSettings,
    log: &AuditLog,
) -> Result<Arc<Rotation>, ServeError> {
    let timing = Timing {
        overlap: settings.ca_rotation_overlap,
        retire_after: settings.max_cert_lifetime + settings.renewal_grace,
    };
    let rotation_err = |e: RotationError| match e {
        RotationError::Ca(e) => ServeError::Ca(e),
        other => ServeError::Rotation(other.to_string()),
    };
    let store = log.store();
    Ok(match &settings.ca_files {
        Some((cert, key)) => Rotation::unmanaged(
            Authority::load(
                cert,
                key,
                &settings.trust_domain,
                settings.roles_oid.clone(),
            )?,
            timing,
            log.clone(),
        ),
        None if is_shared(store.as_ref()) => {
            let path = settings.kek_file.as_ref().ok_or_else(|| {
                ServeError::Rotation(
                    "replicas on a shared store keep the CA key in it, sealed: set kek_file (--kek-file) to a 32-byte key file every replica reads (lanyard kek generate FILE)".into(),
                )
            })?;
            let kek = Kek::load(path).map_err(|e| ServeError::Rotation(e.to_string()))?;
            info!(kek_id = kek.id(), "CA keys are sealed in the shared store");
            Rotation::load_shared(
                store.clone(),
                Arc::new(kek),
                &settings.trust_domain,
                settings.roles_oid.clone(),
                timing,
                log.clone(),
            )
            .await
            .map_err(rotation_err)?
        }
        None => Rotation::load(
            &settings.data_dir.join("ca"),
            &settings.trust_domain,
            settings.roles_oid.clone(),
            timing,
            log.clone(),
        )
        .await
        .map_err(rotation_err)?,
    })
}

/// Whether several replicas may share `store` (it publishes every replica's commits).
pub(crate) fn is_shared(store: &dyn Store) -> bool {
    store.commit_feed().is_some()
}

fn new_revocations(settings: &ServeSettings, log: &AuditLog) -> Arc<Revocations> {
    Arc::new(Revocations::new(
        log.clone(),
        settings.renewal_grace,
        settings.max_cert_lifetime,
    ))
}

fn new_issuance(
    settings: &ServeSettings,
    cas: &crate::ca::CaHandle,
    policy: &PolicyHandle,
    log: &AuditLog,
    revocations: &Arc<Revocations>,
) -> Arc<Issuance> {
    Arc::new(Issuance::new(
        cas.clone(),
        policy.clone(),
        log.clone(),
        revocations.clone(),
        Settings {
            default_ttl: settings.default_ttl,
            min_ttl: settings.min_ttl,
            max_cert_lifetime: settings.max_cert_lifetime,
            renewal_grace: settings.renewal_grace,
            token_ttl: settings.token_ttl,
        },
    ))
}

/// What [`recover`] did.
#[derive(Debug)]
pub struct Recovered {
    /// Reserved identities whose blocking rule was lifted.
    pub lifted: Vec<SpiffeId>,
    /// Where the fresh admin credential was written.
    pub admin_dir: PathBuf,
    /// Its certificate's serial, hex.
    pub serial: String,
}

/// `lanyard admin recover`: on a *stopped* CA's data dir, lifts every identity rule on this
/// trust domain's reserved `/lanyard/` identities (a lockout older versions allowed through
/// the API) and writes a fresh admin credential. Every step is audited.
pub async fn recover(settings: ServeSettings) -> Result<Recovered, ServeError> {
    let data = settings.data_dir.clone();
    let store = open_store(&settings)?;
    let log = AuditLog::start(store.clone()).map_err(|e| ServeError::Store(e.to_string()))?;
    let rotation = load_rotation(&settings, &log).await?;
    let revocations = new_revocations(&settings, &log);
    let store_err = |e: &dyn std::fmt::Display| ServeError::Store(e.to_string());
    let mut lifted = Vec::new();
    for rule in store.identity_rules().map_err(|e| store_err(&e))? {
        let Ok(id) = SpiffeId::parse(&rule.spiffe_id) else {
            continue;
        };
        if rule.blocked && is_reserved(&id) && id.is_in(&settings.trust_domain) {
            revocations
                .lift(
                    "lanyard",
                    &id,
                    "offline recovery (lanyard admin recover): reserved identities are never revoked by identity",
                )
                .await
                .map_err(|e| store_err(&e))?;
            warn!(spiffe_id = %id, "identity rule on a reserved identity lifted");
            lifted.push(id);
        }
    }
    let policy = PolicyHandle::new(settings.policy.clone());
    let issuance = new_issuance(&settings, rotation.cas(), &policy, &log, &revocations);
    let admin_dir = data.join("admin");
    let serial = mint_admin_credential(&issuance, &settings, &admin_dir).await?;
    let lifted_list: Vec<&str> = lifted.iter().map(SpiffeId::as_str).collect();
    log.record(
        Event::new(Kind::AdminRecovered, "lanyard")
            .serial(serial.clone())
            .reason(format!(
                "offline recovery: lifted {} identity rule(s) on reserved identities [{}]; fresh admin credential in {}",
                lifted.len(),
                lifted_list.join(", "),
                admin_dir.display()
            )),
        vec![],
    )
    .await
    .map_err(|e| store_err(&e))?;
    store.flush().map_err(|e| store_err(&e))?;
    Ok(Recovered {
        lifted,
        admin_dir,
        serial,
    })
}

/// Every second, writes one `denied` event per source that the [`DenialLimiter`] refused
/// without an audit event of its own, with how many: the record misses no request.
async fn record_suppressed_denials(
    limiter: Arc<DenialLimiter>,
    log: AuditLog,
    rate: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stopped(&mut shutdown) => return,
        }
        for (source, n) in limiter.drain() {
            let (actor, why) = match source {
                Some(s) => (
                    format!("ip:{s}"),
                    format!("more than {rate} refusals per second from this source"),
                ),
                None => (
                    "ip:*".to_string(),
                    "too many sources paying off refusals at once".to_string(),
                ),
            };
            warn!(actor, refused = n, "source over its refusal budget");
            let event = Event::new(Kind::Denied, actor)
                .reason(format!("{n} requests refused unaudited: {why}"));
            if let Err(e) = log.record(event, vec![]).await {
                warn!(error = %e, "cannot record suppressed denials");
            }
        }
    }
}

/// Resolves once `rx` says the server is stopping.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

type TlsConn = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
/// The gRPC connections the accept loop hands to the server.
type Accepted = mpsc::Receiver<Result<Conn<TlsConn>, std::io::Error>>;
type TlsInfo = TlsConnectInfo<TcpConnectInfo>;

/// Accepts gRPC connections: refuses those over the caps before the TLS handshake, gives each
/// `tls_handshake_timeout` for the handshake and then `request_start_timeout` for the HTTP/2
/// preface, and hands the rest to tonic wrapped in a [`Conn`] (idle timeout, permit).
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    admission: Arc<Admission>,
    transport: Transport,
    tx: mpsc::Sender<Result<Conn<TlsConn>, std::io::Error>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => {
                    backoff.succeeded("grpc");
                    c
                }
                Err(e) => {
                    let wait = backoff.failed("grpc", &e);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stopped(&mut shutdown) => return,
                    }
                    continue;
                }
            },
            () = stopped(&mut shutdown) => return,
        };
        // Dropping the socket is the whole refusal: no handshake, no work.
        let Ok(permit) = admission.try_admit(peer.ip()) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut tls =
                match tokio::time::timeout(transport.tls_handshake_timeout, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => return debug!(%peer, error = %e, "tls handshake failed"),
                    Err(_) => return debug!(%peer, "tls handshake timed out"),
                };
            if let Err(e) = read_preface(&mut tls, transport.request_start_timeout).await {
                return debug!(%peer, error = %e, "connection closed before the HTTP/2 preface");
            }
            let _ = tx
                .send(Ok(Conn::new(tls, permit, transport.idle_timeout)))
                .await;
        });
    }
}

/// Issues a fresh serving certificate into `slot`, carrying `names` (`server_names`) so
/// hostname-verifying clients accept it; returns its notAfter.
async fn refresh_server_cert(
    issuance: &Issuance,
    slot: &CertSlot,
    id: &SpiffeId,
    ttl: Duration,
    names: &SanNames,
) -> Result<i64, ServeError> {
    let key = KeyPair::generate().map_err(|e| ServeError::Credential(e.to_string()))?;
    let issued = issuance
        .local(id, vec![], ttl, &key, names)
        .await
        .map_err(|e| ServeError::Credential(e.to_string()))?;
    // Send the roots too, so a client holding only the CA fingerprint (a join token) can pin
    // it; during a CA rotation also the new CA cross-signed by the old one, so a client that
    // still trusts only the old CA keeps accepting this server.
    let mut chain = issued.chain.clone();
    chain.extend(issuance.cas().current().serving_extras());
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    slot.set(chain, key_der)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    Ok(issued.svid.not_after)
}

async fn rotate_server_cert(
    issuance: Arc<Issuance>,
    slot: Arc<CertSlot>,
    id: SpiffeId,
    ttl: Duration,
    names: SanNames,
    mut not_after: i64,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let wait = half_life_wait(not_after, ttl);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut shutdown) => return,
        }
        match refresh_server_cert(&issuance, &slot, &id, ttl, &names).await {
            Ok(n) => {
                debug!(not_after = %crate::issuance::fmt_time(n), "serving certificate rotated");
                not_after = n;
            }
            Err(e) => {
                error!(error = %e, "serving certificate rotation failed; retrying in 5s");
                not_after = unix_now() + 10;
            }
        }
    }
}

/// Applies every change of the CA set (a rotation step) everywhere it matters: client
/// certificate verification, the published bundle (sequence + 1), the serving certificate (now
/// from the signing CA, with the cross-signed certificate in its chain) and the admin credential.
async fn follow_ca_changes(
    issuance: Arc<Issuance>,
    auth: Authenticator,
    bundles: Arc<BundleHub>,
    slot: Arc<CertSlot>,
    settings: ServeSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = issuance.cas().subscribe();
    changes.borrow_and_update();
    let sid = match server_id(&settings) {
        Ok(id) => id,
        Err(e) => {
            error!(error = %e, "cannot follow CA changes");
            return;
        }
    };
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = stopped(&mut shutdown) => return,
        }
        let set = changes.borrow_and_update().clone();
        let roots = set.roots();
        match Bundle::new(roots.clone()) {
            Ok(b) => auth.set_bundle(b),
            Err(e) => error!(error = %e, "the new CA set does not form a bundle"),
        }
        if let Err(e) = bundles.set_own_authorities(roots, "CA rotation").await {
            error!(error = %e, "cannot publish the new trust bundle");
        }
        if let Err(e) = refresh_server_cert(
            &issuance,
            &slot,
            &sid,
            settings.server_cert_ttl,
            &settings.server_names,
        )
        .await
        {
            error!(error = %e, "cannot re-issue the serving certificate after a CA change");
        }
        if let Err(e) =
            ensure_admin_credential(&issuance, &settings, &settings.data_dir.join("admin")).await
        {
            error!(error = %e, "cannot refresh the admin credential after a CA change");
        }
        info!(ca_set = %set, "CA change applied");
    }
}

/// Time until half of a `ttl`-long certificate ending at `not_after` has passed (at least 1 s).
fn half_life_wait(not_after: i64, ttl: Duration) -> Duration {
    let at = not_after - (ttl.as_secs() as i64) / 2;
    Duration::from_secs((at - unix_now()).max(1) as u64)
}

/// Writes `dir/{cert,key,bundle}.pem` for the admin identity unless a valid one (same CA, more
/// than half its lifetime left) is already there.
async fn ensure_admin_credential(
    issuance: &Issuance,
    settings: &ServeSettings,
    dir: &Path,
) -> Result<(), ServeError> {
    let authority = issuance.authority();
    match existing_admin(dir, &authority, settings) {
        // A revoked admin certificate (by serial) would lock the admin API out until it aged:
        // replace it instead.
        Some(svid) if issuance.is_revoked(&svid) => {
            warn!(serial = %svid.serial, "the admin certificate is revoked; writing a fresh one");
        }
        Some(_) => {
            debug!(dir = %dir.display(), "reusing admin credential");
            return Ok(());
        }
        None => {}
    }
    mint_admin_credential(issuance, settings, dir).await?;
    Ok(())
}

/// Writes a fresh admin credential into `dir`; returns its serial.
async fn mint_admin_credential(
    issuance: &Issuance,
    settings: &ServeSettings,
    dir: &Path,
) -> Result<String, ServeError> {
    let id = settings
        .trust_domain
        .id("/lanyard/admin")
        .map_err(|e| ServeError::Credential(e.to_string()))?;
    let key = KeyPair::generate().map_err(|e| ServeError::Credential(e.to_string()))?;
    let issued = issuance
        .local(
            &id,
            vec![ROLE_ADMIN.to_string()],
            settings.admin_cert_ttl,
            &key,
            &SanNames::default(),
        )
        .await
        .map_err(|e| ServeError::Credential(e.to_string()))?;
    write_credential(dir, &issued.chain, &issued.bundle, &key.serialize_pem())
        .map_err(|e| ServeError::Io(dir.to_path_buf(), e))?;
    info!(dir = %dir.display(), spiffe_id = %id, serial = %issued.svid.serial, "admin credential written");
    Ok(issued.svid.serial.to_hex())
}

fn existing_admin(
    dir: &Path,
    authority: &Authority,
    settings: &ServeSettings,
) -> Option<crate::ca::SvidInfo> {
    let cert = std::fs::read(dir.join("cert.pem")).ok()?;
    std::fs::metadata(dir.join("key.pem")).ok()?;
    let bundle = Bundle::new(vec![authority.root().clone()]).ok()?;
    let chain: Vec<CertificateDer<'static>> = {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<_, _>>()
            .ok()?
    };
    let now = unix_now();
    let svid = crate::tls::verify_svid(
        &chain,
        &bundle,
        crate::tls::unix_time(now),
        webpki::KeyUsage::client_auth(),
        authority.roles_oid(),
    )
    .ok()?;
    let remaining = svid.not_after - now;
    (remaining > settings.admin_cert_ttl.as_secs() as i64 / 2).then_some(svid)
}

async fn maintain_admin(
    issuance: Arc<Issuance>,
    settings: ServeSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let dir = settings.data_dir.join("admin");
    loop {
        let wait = (settings.admin_cert_ttl / 4).max(Duration::from_secs(1));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut shutdown) => return,
        }
        if let Err(e) = ensure_admin_credential(&issuance, &settings, &dir).await {
            error!(error = %e, "refreshing admin credential failed");
        }
    }
}

async fn prune_loop(store: Arc<dyn Store>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stopped(&mut shutdown) => return,
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.prune(unix_now())).await {
            Ok(Ok(n)) if n > 0 => debug!(pruned = n, "expired entries pruned"),
            Ok(Err(e)) => warn!(error = %e, "prune failed"),
            _ => {}
        }
    }
}

async fn policy_reload_loop(
    settings: ServeSettings,
    policy: PolicyHandle,
    log: AuditLog,
    mut hup: Option<tokio::signal::unix::Signal>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(path) = settings.config_path.clone() else {
        return;
    };
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = mtime(&path);
    loop {
        let by_signal = tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            () = stopped(&mut shutdown) => return,
        };
        let now = mtime(&path);
        if !by_signal && now == last {
            continue;
        }
        last = now;
        let reason = match settings.reload_policy() {
            Ok(p) => {
                let n = p.len();
                policy.replace(p);
                info!(path = %path.display(), rules = n, "policy reloaded");
                format!("{}: {n} rules", path.display())
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, "policy reload rejected; keeping the previous policy");
                format!("rejected, previous policy kept: {e}")
            }
        };
        if let Err(e) = log
            .record(
                Event::new(Kind::PolicyReloaded, "lanyard").reason(reason),
                vec![],
            )
            .await
        {
            warn!(error = %e, "cannot audit policy reload");
        }
    }
}
