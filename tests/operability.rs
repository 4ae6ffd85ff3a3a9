//! Issue 15, parts 1-3, as an operator meets them: Prometheus metrics of the CA (in process)
//! and of a real `lanyard agent` process, scraped over HTTP and parsed by Python's
//! `prometheus_client` (an independent parser); the agent's `/healthz` and `/readyz`; gRPC
//! health for every CA service; reflection v1 and v1alpha listing the CA's services and Health
//! but not the Workload API, which the CA does not serve.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{
    POLICY, TestCa, command_works, free_port, poll_until, require_tool, spawn_agent,
    workload_client,
};
use lanyard::pb::workload::{self as wl, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const CA_SERVICES: [&str; 5] = [
    "lanyard.v1.Ca",
    "lanyard.v1.Admin",
    "lanyard.v1.Access",
    "lanyard.v1.Audit",
    "lanyard.v1.Revocation",
];

/// Held by the tests that issue certificates from an in-process CA: the issuance counters count
/// for the whole process (as they do for a real `lanyard serve`), so a test that checks how much
/// they moved must not overlap with another test's issuances.
static ISSUING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `GET path` over HTTP/1.1; returns (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .unwrap();
    let text = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// Whether Python's `prometheus_client` is importable (skips loudly outside CI when not).
fn parser_ready() -> bool {
    require_tool(
        "python3 with the PyPI `prometheus_client` package",
        command_works("python3", &["-c", "import prometheus_client.parser"]),
        "`pip install prometheus_client` (scripts/test does)",
    )
}

/// Parses an exposition with `prometheus_client`'s OpenMetrics parser (the format served; the
/// parser is strict and fails on any format error, a missing `# EOF` included) into family name
/// → {type, samples: [[name, labels, value]]}. Its Prometheus text parser must read it too,
/// without error, as older tools do.
fn parse(exposition: &str) -> BTreeMap<String, Value> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families as prometheus_text
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
text = sys.stdin.read()
list(prometheus_text(text))
out = {}
for f in openmetrics(text):
    assert f.name not in out, "family %s twice" % f.name
    out[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps(out))
"#;
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected the exposition: {}\n---\n{exposition}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output is JSON")
}

/// The value of the sample `name` whose labels include every pair of `labels`.
fn sample(families: &BTreeMap<String, Value>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families.values().find_map(|f| {
        f["samples"].as_array()?.iter().find_map(|s| {
            let matches = s[0] == name
                && labels
                    .iter()
                    .all(|(k, v)| s[1].get(*k).and_then(Value::as_str) == Some(*v));
            if matches { s[2].as_f64() } else { None }
        })
    })
}

/// Whether a metric of this name (as docs/metrics.md spells it) is in the exposition.
fn has_metric(families: &BTreeMap<String, Value>, name: &str) -> bool {
    // OpenMetrics names counter and info families without their sample suffix.
    families.contains_key(name)
        || ["_total", "_info"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| families.contains_key(base))
        })
}

/// The metric names docs/metrics.md lists under `section` (a `## ` heading).
fn documented(section: &str) -> Vec<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"))
            .unwrap();
    let mut in_section = false;
    let mut names = Vec::new();
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            in_section = h.trim() == section;
            continue;
        }
        if in_section
            && let Some(rest) = line.strip_prefix("| `lanyard_")
            && let Some((name, _)) = rest.split_once('`')
        {
            names.push(format!("lanyard_{name}"));
        }
    }
    assert!(
        !names.is_empty(),
        "docs/metrics.md lists no metric under {section:?}"
    );
    names
}

fn metrics_addr(ca: &TestCa) -> SocketAddr {
    std::fs::read_to_string(ca.data_dir().join("metrics.addr"))
        .expect("metrics.addr written when metrics_listen is set")
        .trim()
        .parse()
        .unwrap()
}

async fn scrape(addr: SocketAddr) -> BTreeMap<String, Value> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_metrics_parse_and_count_issuances_and_denials() {
    if !parser_ready() {
        return;
    }
    let _alone = ISSUING.lock().await;
    // A peer CA whose bundle endpoint this CA refreshes from (per-domain federation metrics).
    let peer_port = free_port();
    let peer = TestCa::start_with_full_config(&format!(
        "trust_domain = \"b.example\"\nbundle_endpoint_listen = \"127.0.0.1:{peer_port}\"\n\
         bundle_refresh_hint = \"1s\"\n"
    ))
    .await;
    let ca = TestCa::start_with(
        &format!(
            "metrics_listen = \"127.0.0.1:0\"\n\n[[federation]]\ntrust_domain = \"b.example\"\n\
             bundle_endpoint_url = \"https://127.0.0.1:{peer_port}/bundle\"\n\
             endpoint_spiffe_id = \"spiffe://b.example/lanyard/server\"\n\
             initial_bundle = \"{}\"\n",
            peer.admin_dir().join("bundle.pem").display()
        ),
        POLICY,
    )
    .await;
    let addr = metrics_addr(&ca);
    let mut before = BTreeMap::new();
    for _ in 0..100 {
        before = scrape(addr).await;
        let fetched = sample(
            &before,
            "lanyard_federation_refreshes_total",
            &[("trust_domain", "b.example")],
        );
        if fetched >= Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let age = sample(
        &before,
        "lanyard_federation_bundle_age_seconds",
        &[("trust_domain", "b.example")],
    );
    assert!(
        age.is_some_and(|a| a < 60.0),
        "bundle age {age:?}: {before:?}"
    );
    assert_eq!(
        sample(
            &before,
            "lanyard_federation_refresh_errors_total",
            &[("trust_domain", "b.example")]
        ),
        Some(0.0)
    );
    for name in documented("CA metrics") {
        assert!(
            has_metric(&before, &name),
            "{name} is documented but not exposed"
        );
    }
    let ok = |f: &BTreeMap<String, Value>| {
        sample(
            f,
            "lanyard_issuances_total",
            &[("path", "token"), ("code", "ok")],
        )
        .unwrap_or(0.0)
    };
    let unauth = |f: &BTreeMap<String, Value>| {
        sample(
            f,
            "lanyard_issuances_total",
            &[("path", "token"), ("code", "unauthenticated")],
        )
        .unwrap_or(0.0)
    };
    let denied = |f: &BTreeMap<String, Value>| {
        sample(
            f,
            "lanyard_issuances_total",
            &[("path", "token"), ("code", "permission_denied")],
        )
        .unwrap_or(0.0)
    };

    let id = "spiffe://example.org/ns/dev/web";
    let token = ca.token(id, &[], 300, 1).await;
    ca.issue(&token, id, 60).await.expect("issued");
    let refused = ca.issue("not-a-token", id, 60).await;
    assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
    // Outside every policy rule: refused by policy.
    let outsider = "spiffe://example.org/elsewhere/x";
    if let Ok(t) = ca.try_token(outsider, &[], 300, 0, 1).await {
        let _ = ca.issue(&t, outsider, 60).await;
    }

    let after = scrape(addr).await;
    assert_eq!(ok(&after) - ok(&before), 1.0, "one token issuance counted");
    assert_eq!(
        unauth(&after) - unauth(&before),
        1.0,
        "one bad token counted"
    );
    assert!(denied(&after) >= denied(&before));
    let refused_unauth = |f: &BTreeMap<String, Value>| {
        sample(
            f,
            "lanyard_refused_calls_total",
            &[("code", "unauthenticated")],
        )
        .unwrap_or(0.0)
    };
    assert!(
        refused_unauth(&after) >= refused_unauth(&before) + 1.0,
        "the refusal layer counts the bad token"
    );
    let count = |f: &BTreeMap<String, Value>| {
        sample(
            f,
            "lanyard_issuance_duration_seconds_count",
            &[("path", "token")],
        )
        .unwrap_or(0.0)
    };
    assert!(
        count(&after) >= count(&before) + 2.0,
        "latency observed per request"
    );
    let local_ok = sample(
        &after,
        "lanyard_issuances_total",
        &[("path", "local"), ("code", "ok")],
    );
    assert!(
        local_ok >= Some(2.0),
        "serving + admin credentials: {local_ok:?}"
    );
    let groups = sample(&after, "lanyard_audit_group_size_count", &[]).unwrap();
    assert!(groups >= 1.0);
    // The store-scan gauges are at most a second old: wait for the token to show.
    let mut scanned = after.clone();
    for _ in 0..30 {
        if sample(&scanned, "lanyard_join_tokens", &[]) >= Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        scanned = scrape(addr).await;
    }
    assert!(sample(&scanned, "lanyard_join_tokens", &[]).unwrap() >= 1.0);
    assert!(sample(&scanned, "lanyard_audit_head_seq", &[]).unwrap() >= 3.0);
    assert!(sample(&scanned, "lanyard_store_disk_bytes", &[]).unwrap() > 0.0);
    assert!(
        sample(&after, "lanyard_open_connections", &[("listener", "grpc")]).is_some(),
        "grpc connections gauge"
    );
    let now = lanyard::tls::unix_now() as f64;
    let ca_end = sample(
        &after,
        "lanyard_ca_not_after_timestamp_seconds",
        &[("role", "active")],
    )
    .unwrap();
    assert!(
        ca_end > now,
        "the active CA's notAfter is in the future: {ca_end}"
    );

    // The CA's own probes.
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    assert_eq!(http_get(addr, "/nope").await.0, 404);
    drop(peer);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_listener_is_off_by_default() {
    let ca = TestCa::start().await;
    assert!(!ca.data_dir().join("metrics.addr").exists());
    assert_eq!(ca.settings.metrics_listen, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_health_readiness_and_metrics() {
    let with_parser = parser_ready();
    let _alone = ISSUING.lock().await;
    // The agent dials a port where nothing listens yet, so it starts without a certificate;
    // later a forwarder to the CA opens there.
    let ca = TestCa::start().await;
    let id = "spiffe://example.org/ns/dev/agent";
    let token = ca.token(id, &[], 300, 1).await;
    let server = format!("127.0.0.1:{}", free_port());

    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("cred");
    let socket = work.path().join("workload.sock");
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut agent = spawn_agent(
        &server,
        &token,
        &out,
        &[
            "--metrics-listen",
            &maddr.to_string(),
            "--workload-socket",
            socket.to_str().unwrap(),
            "--ttl",
            "4s",
            "--max-backoff",
            "1s",
        ],
    );
    let up = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        std::net::TcpStream::connect(maddr).ok()
    })
    .await;
    assert!(
        up.is_some(),
        "metrics listener never came up: {}",
        agent.output()
    );
    assert_eq!(http_get(maddr, "/healthz").await.0, 200);
    let (status, body) = http_get(maddr, "/readyz").await;
    assert_eq!(status, 503, "not ready without a certificate: {body}");
    if with_parser {
        let m = scrape(maddr).await;
        assert_eq!(sample(&m, "lanyard_agent_ready", &[]), Some(0.0));
    }

    // The CA becomes reachable: the agent bootstraps and becomes ready.
    let _forwarder = AbortOnDrop(tokio::spawn(forward(
        tokio::net::TcpListener::bind(&server).await.unwrap(),
        ca.addr,
    )));
    let mut ready = false;
    for _ in 0..150 {
        if http_get(maddr, "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "agent never became ready: {}", agent.output());
    assert!(agent.is_running());
    if !with_parser {
        return;
    }

    // One Workload API client with one open stream.
    let mut client = workload_client(&socket).await;
    let mut req = tonic::Request::new(wl::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client.fetch_x509svid(req).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("an SVID");

    // A 4 s certificate renews at about 2 s.
    let mut m = BTreeMap::new();
    for _ in 0..100 {
        m = scrape(maddr).await;
        if sample(&m, "lanyard_agent_renewals_total", &[("result", "success")]) >= Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for name in documented("Agent metrics") {
        assert!(
            has_metric(&m, &name),
            "{name} is documented but not exposed"
        );
    }
    assert!(
        sample(&m, "lanyard_agent_renewals_total", &[("result", "success")]) >= Some(1.0),
        "a renewal counted: {m:?}"
    );
    assert_eq!(
        sample(&m, "lanyard_agent_last_renewal_success", &[]),
        Some(1.0)
    );
    let now = lanyard::tls::unix_now() as f64;
    let last = sample(&m, "lanyard_agent_last_renewal_timestamp_seconds", &[]).unwrap();
    assert!((now - last).abs() < 30.0, "last renewal {last}, now {now}");
    let not_after = sample(
        &m,
        "lanyard_agent_certificate_not_after_timestamp_seconds",
        &[],
    )
    .unwrap();
    assert!(not_after > now - 1.0, "notAfter {not_after}, now {now}");
    assert_eq!(sample(&m, "lanyard_agent_ready", &[]), Some(1.0));
    assert_eq!(
        sample(&m, "lanyard_agent_workload_api_connections", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "lanyard_agent_workload_api_streams", &[]),
        Some(1.0)
    );
    assert!(sample(&m, "lanyard_agent_bundle_revision", &[]).is_some());
    drop(stream);
    drop(client);
    let mut streams = None;
    for _ in 0..50 {
        streams = sample(
            &scrape(maddr).await,
            "lanyard_agent_workload_api_streams",
            &[],
        );
        if streams == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(streams, Some(0.0), "a closed stream is uncounted");
    drop(ca);
}

/// Forwards every connection accepted on `listener` to `to`.
async fn forward(listener: tokio::net::TcpListener, to: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// Aborts the task when dropped, so a failing test leaves nothing running.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_reports_every_ca_service() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let ca = TestCa::start().await;
    let mut health = HealthClient::new(ca.anon_channel().await);
    for service in CA_SERVICES.into_iter().chain([""]) {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check {service:?}: {e}"))
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    let workload = health
        .check(HealthCheckRequest {
            service: "SpiffeWorkloadAPI".into(),
        })
        .await;
    assert_eq!(workload.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_does_not_serve_the_workload_api() {
    let ca = TestCa::start().await;
    let mut client = SpiffeWorkloadApiClient::new(ca.anon_channel().await);
    let mut req = tonic::Request::new(wl::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let r = client.fetch_x509svid(req).await;
    assert_eq!(r.unwrap_err().code(), Code::Unimplemented);
}

/// What reflection `v1` (or `v1alpha`) lists, and whether it can describe SpiffeWorkloadAPI.
macro_rules! reflect {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest,
            server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new($channel);
        let requests = tokio_stream::iter(vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "grpc.health.v1.Health".into(),
                )),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "SpiffeWorkloadAPI".into(),
                )),
            },
        ]);
        let mut stream = client
            .server_reflection_info(requests)
            .await
            .unwrap_or_else(|e| panic!("reflection {} served: {e}", stringify!($version)))
            .into_inner();
        let listed = match stream.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect::<BTreeSet<String>>()
            }
            other => panic!("unexpected answer: {other:?}"),
        };
        let health_described = matches!(
            stream.message().await.unwrap().unwrap().message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        );
        // An unknown symbol ends the stream with NOT_FOUND (or an error response).
        let workload_described = matches!(
            stream.message().await,
            Ok(Some(r)) if matches!(r.message_response, Some(MessageResponse::FileDescriptorResponse(_)))
        );
        (listed, workload_described, health_described)
    }};
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_v1_and_v1alpha_list_the_ca_services_and_health_only() {
    let ca = TestCa::start().await;
    let v1 = reflect!(v1, ca.anon_channel().await);
    let v1alpha = reflect!(v1alpha, ca.anon_channel().await);
    for (version, (listed, workload_described, health_described)) in
        [("v1", v1), ("v1alpha", v1alpha)]
    {
        for want in CA_SERVICES.into_iter().chain(["grpc.health.v1.Health"]) {
            assert!(
                listed.contains(want),
                "{version} lists {listed:?}, missing {want}"
            );
        }
        assert!(
            !listed.iter().any(|s| s.contains("SpiffeWorkloadAPI")),
            "{version} advertises the Workload API: {listed:?}"
        );
        assert!(!workload_described, "{version} describes SpiffeWorkloadAPI");
        assert!(
            health_described,
            "{version} cannot describe grpc.health.v1.Health"
        );
    }
}

/// The example manifests' probes use the metrics listener the same manifests turn on: the
/// agent's `/readyz` (ready with a valid certificate) and `/healthz`, and the CA's.
#[test]
fn kubernetes_probes_use_healthz_and_readyz() {
    if !require_tool(
        "python3 with PyYAML",
        command_works("python3", &["-c", "import yaml"]),
        "`pip install pyyaml` (scripts/test does)",
    ) {
        return;
    }
    const SCRIPT: &str = r#"
import json, sys, yaml
out = {"containers": [], "config": None}
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        if doc["kind"] == "ConfigMap":
            out["config"] = doc["data"]["lanyard.toml"]
        if doc["kind"] in ("StatefulSet", "Deployment"):
            spec = doc["spec"]["template"]["spec"]
            out["containers"] += spec.get("initContainers", []) + spec["containers"]
print(json.dumps(out))
"#;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(root.join("ca.yaml"))
        .arg(root.join("sidecar.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let config: toml::Value = toml::from_str(parsed["config"].as_str().unwrap()).unwrap();
    let ca_metrics: SocketAddr = config["metrics_listen"].as_str().unwrap().parse().unwrap();
    let containers = parsed["containers"].as_array().unwrap();
    let find = |name: &str| {
        containers
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    };
    // Which containerPort a probe's named port is.
    let probe_port = |c: &Value, probe: &str, path: &str| -> u64 {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{} {probe}", c["name"]);
        let port = &get["port"];
        port.as_u64().unwrap_or_else(|| {
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == *port)
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("{} has no port {port}", c["name"]))
        })
    };
    let ca = find("lanyard");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(probe_port(ca, probe, path), u64::from(ca_metrics.port()));
    }
    let agent = find("lanyard-agent");
    let listen: SocketAddr = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--metrics-listen="))
        .expect("the sidecar turns on --metrics-listen")
        .parse()
        .unwrap();
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/readyz"),
    ] {
        assert_eq!(probe_port(agent, probe, path), u64::from(listen.port()));
    }
}

/// A prober's kept-alive connection does not outlive the CA: the metrics listener closes it on
/// shutdown, so the store is released and a restart in the same process opens it.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_alive_probe_does_not_hold_the_store_past_shutdown() {
    let ca = TestCa::start_with("metrics_listen = \"127.0.0.1:0\"", POLICY).await;
    let addr = metrics_addr(&ca);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // A probe every 300 ms on one kept-alive connection, for as long as the server answers
    // (at most the listener's 30 s connection limit).
    let prober = AbortOnDrop(tokio::spawn(async move {
        let mut buf = vec![0; 4096];
        for _ in 0..200 {
            let probe = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            if s.write_all(probe.as_bytes()).await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // `restart` retries for 10 s while the old server's tasks let go of the store; the probe's
    // connection, were it kept past shutdown, would hold the store for 30 s.
    let again = tokio::time::timeout(Duration::from_secs(20), ca.restart())
        .await
        .expect("the CA restarts in time");
    assert_eq!(http_get(metrics_addr(&again), "/healthz").await.0, 200);
    drop(prober);
}
